"""Preference data from trees: MCTS-DPO sibling pairs, TPO lists, tree-structured response pairs, verified SFT
traces. Hand-built trees with hand-set values (expected records derived in comments), and properties on random
trees and on real search trees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import StepBandit
from tests.test_credit_values import build, random_trees
from treeward.credit.pairs import preference_lists, sft_examples, step_pairs, tree_pairs
from treeward.credit.values import CreditError, mc_values, q_values
from treeward.search.core import grade
from treeward.search.mcts import mcts
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Tree

# root(0)
# ├─ 1 "A\n"  v 0.9 ── 4 "X"   terminal, outcome 1 (v 1)
# ├─ 2 "B\n"  v 0.5 ─┬ 5 "Y"   terminal, outcome 1 (v 1)
# │                  └ 6 "Z"   terminal, outcome 0 (v 0)
# ├─ 3 "C\n"  v 0.1 ── 7 "W\n" open leaf: no terminal below C
# └─ 8 "A\n"  v 0.2    the same tokens as node 1 (a duplicate sample): counts once, as node 1
SPEC = [
    (0, "A\n", False, None),
    (0, "B\n", False, None),
    (0, "C\n", False, None),
    (1, "X", True, 1.0),
    (2, "Y", True, 1.0),
    (2, "Z", True, 0.0),
    (3, "W\n", False, None),
    (0, "A\n", False, None),
]
VALUES = {0: 0.5, 1: 0.9, 2: 0.5, 3: 0.1, 4: 1.0, 5: 1.0, 6: 0.0, 8: 0.2}


def ids(text: str) -> tuple[int, ...]:
    return tuple(map(ord, text))


ROOT_IDS = (1, *ids("Q\n"))


# ---------------------------------------------------------------------- MCTS-DPO step pairs
def test_step_pairs_best_vs_worst_sibling() -> None:
    pairs = step_pairs(build(SPEC), VALUES)
    # root: distinct valued children A 0.9, B 0.5, C 0.1 (node 8 repeats A's tokens) → A over C, margin 0.8;
    # B: Y 1.0 over Z 0.0, margin 1.0; A and C have one child each: no pair.
    assert [(p.metadata["parent"], p.chosen_node, p.rejected_node) for p in pairs] == [(0, 1, 3), (2, 5, 6)]
    a_over_c, y_over_z = pairs
    assert a_over_c.margin == pytest.approx(0.8) and y_over_z.margin == pytest.approx(1.0)
    assert (a_over_c.prompt, a_over_c.prompt_ids) == ("Q\n", ROOT_IDS)
    assert (a_over_c.chosen, a_over_c.chosen_ids, a_over_c.rejected) == ("A\n", ids("A\n"), "C\n")
    assert not a_over_c.metadata["chosen_terminal"]  # one intermediate step
    # the shared prefix of Y vs Z is the prompt plus B
    assert (y_over_z.prompt, y_over_z.prompt_ids) == ("Q\nB\n", ROOT_IDS + ids("B\n"))
    assert y_over_z.metadata["chosen_terminal"] and y_over_z.metadata["rejected_terminal"]


def test_step_pairs_all_pairs_and_min_margin() -> None:
    tree = build(SPEC)
    every = step_pairs(tree, VALUES, per_node=None)
    # root: A-C 0.8, A-B 0.4, B-C 0.4 (widest first, ties by node ids); then Y-Z 1.0 under B
    assert [(p.chosen_node, p.rejected_node) for p in every] == [(1, 3), (1, 2), (2, 3), (5, 6)]
    assert [p.margin for p in every] == pytest.approx([0.8, 0.4, 0.4, 1.0])
    wide = step_pairs(tree, VALUES, per_node=None, min_margin=0.5)
    assert [(p.chosen_node, p.rejected_node) for p in wide] == [(1, 3), (5, 6)]
    # equal values give no pair, whatever the margin knob
    assert step_pairs(tree, {**VALUES, 5: 0.0}) == step_pairs(tree, VALUES)[:1]
    with pytest.raises(CreditError, match="min_margin"):
        step_pairs(tree, VALUES, min_margin=-0.1)
    with pytest.raises(CreditError, match="per_node"):
        step_pairs(tree, VALUES, per_node=0)


def test_complete_step_pairs_continue_each_side_to_a_terminal() -> None:
    pairs = step_pairs(build(SPEC), VALUES, complete=True)
    # root: A over C first, but C reaches no terminal (only the open leaf W), so that pair is left out and the next
    # widest, A over B (0.4), is kept. A continues to X; B continues through its best child, Y (1.0 > Z's 0.0).
    first = pairs[0]
    assert (first.chosen_node, first.rejected_node, first.margin) == (1, 2, pytest.approx(0.4))
    assert (first.chosen, first.rejected) == ("A\nX", "B\nY")
    assert first.chosen_ids == ids("A\nX") and first.rejected_ids == ids("B\nY")
    assert first.metadata["chosen_path"] == (1, 4) and first.metadata["rejected_path"] == (2, 5)
    assert first.metadata["chosen_terminal"] and first.metadata["rejected_terminal"]
    assert (pairs[1].chosen, pairs[1].rejected) == ("Y", "Z")  # already terminal steps
    assert len(pairs) == 2


# ---------------------------------------------------------------------- TPO lists
def test_preference_lists_rank_each_nodes_continuations() -> None:
    tree = build(SPEC)
    lists = preference_lists(tree, VALUES)
    # root: A (0.9) → X and B (0.5) → Y as whole responses; C reaches no terminal, node 8 repeats A. Under B: Y, Z.
    root, under_b = lists
    assert root.candidates == ("A\nX", "B\nY") and root.scores == (0.9, 0.5) and root.node_ids == (1, 2)
    assert root.candidate_ids == (ids("A\nX"), ids("B\nY"))
    assert root.metadata["step_lengths"] == (
        (2, 1),
        (2, 1),
    )  # the step boundaries TPO's step reward aligns on
    assert root.prompt_ids == ROOT_IDS
    assert under_b.candidates == ("Y", "Z") and under_b.scores == (1.0, 0.0) and under_b.prompt == "Q\nB\n"
    # one step per candidate: C joins the root's list, best first
    steps = preference_lists(tree, VALUES, complete=False)[0]
    assert steps.candidates == ("A\n", "B\n", "C\n") and steps.scores == (0.9, 0.5, 0.1)
    # a list with equal scores ranks nothing: left out
    assert [x.metadata["parent"] for x in preference_lists(tree, {**VALUES, 6: 1.0})] == [0]
    with pytest.raises(CreditError, match="min_candidates"):
        preference_lists(tree, VALUES, min_candidates=1)


# ---------------------------------------------------------------------- tree-structured response pairs
def test_tree_pairs_compare_whole_responses_at_their_common_prefix() -> None:
    pairs = tree_pairs(build(SPEC))
    # scored responses: X (1, under A), Y (1, under B), Z (0, under B). X vs Y tie: no pair.
    # X over Z: common prefix is the prompt; Y over Z: common prefix is the prompt plus B.
    assert [(p.metadata["parent"], p.chosen, p.rejected) for p in pairs] == [
        (0, "A\nX", "B\nZ"),
        (2, "Y", "Z"),
    ]
    x_over_z = pairs[0]
    assert x_over_z.margin == 1.0 and x_over_z.chosen_node == 1 and x_over_z.rejected_node == 2
    assert x_over_z.metadata["chosen_path"] == (1, 4) and x_over_z.metadata["rejected_path"] == (2, 6)
    assert pairs[1].prompt_ids == ROOT_IDS + ids("B\n")
    assert tree_pairs(build(SPEC), min_margin=1.5) == []


# ---------------------------------------------------------------------- SFT traces
def test_sft_examples_keep_distinct_correct_traces() -> None:
    tree = build([*SPEC, (1, "X", True, 1.0)])  # node 9: X again under A (the same trace twice)
    out = sft_examples(tree)
    # correct terminals X (4), Y (5), X again (9, dropped as a duplicate); Z is wrong
    assert [(e.node_id, e.completion) for e in out] == [(4, "A\nX"), (5, "B\nY")]
    assert out[0].completion_ids == ids("A\nX") and out[0].prompt_ids == ROOT_IDS
    # screened by step values: the lowest step value on X's path is 0.9 (A), on Y's 0.5 (B)
    assert [e.node_id for e in sft_examples(tree, VALUES, min_value=0.6)] == [4]
    # ordered by that lowest value, best first, and capped per problem
    assert [e.node_id for e in sft_examples(tree, {**VALUES, 1: 0.3}, max_per_problem=1)] == [5]
    with pytest.raises(CreditError, match="pass values"):
        sft_examples(tree, min_value=0.5)


# ---------------------------------------------------------------------- properties
def _path_ids(tree: Tree, path: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t for i in path for t in tree.nodes[i].token_ids)


@settings(max_examples=120, deadline=None)
@given(random_trees(), st.booleans())
def test_step_pairs_properties(tree: Tree, complete: bool) -> None:
    values = mc_values(tree).values
    for p in step_pairs(tree, values, per_node=None, complete=complete):
        parent = p.metadata["parent"]
        assert p.margin > 0 and p.margin == pytest.approx(values[p.chosen_node] - values[p.rejected_node])
        assert tree.nodes[p.chosen_node].parent == tree.nodes[p.rejected_node].parent == parent
        assert p.prompt_ids == tuple(tree.prefix_ids(parent))
        assert p.chosen_ids == _path_ids(tree, p.metadata["chosen_path"])
        assert p.rejected_ids == _path_ids(tree, p.metadata["rejected_path"])
        assert p.chosen_ids != p.rejected_ids
        if complete:
            assert p.metadata["chosen_terminal"] and p.metadata["rejected_terminal"]


@settings(max_examples=120, deadline=None)
@given(random_trees())
def test_tree_pairs_and_lists_properties(tree: Tree) -> None:
    for p in tree_pairs(tree):
        good, bad = p.metadata["chosen_path"][-1], p.metadata["rejected_path"][-1]
        assert p.prompt_ids + p.chosen_ids == tuple(tree.prefix_ids(good))
        assert p.prompt_ids + p.rejected_ids == tuple(tree.prefix_ids(bad))
        assert tree.nodes[good].outcome - tree.nodes[bad].outcome == p.margin > 0  # type: ignore[operator]
    values = mc_values(tree).values
    for lst in preference_lists(tree, values):
        assert list(lst.scores) == sorted(lst.scores, reverse=True) and len(set(lst.candidate_ids)) == len(
            lst.scores
        )
        assert all(
            sum(lens) == len(c)
            for lens, c in zip(lst.metadata["step_lengths"], lst.candidate_ids, strict=True)
        )


# ---------------------------------------------------------------------- on real search trees
def test_pairs_from_a_real_mcts_search() -> None:
    problems = generate_problems(4, 3, seed=5)
    trees = mcts(problems, StepBandit(problems, q=0.4), ArithmeticSteps(), 500, seed=4, prune_below=None)
    grade(trees, ArithmeticAnswer())
    n_pairs = 0
    for tree in trees:
        q = q_values(tree, min_visits=0)
        for p in step_pairs(tree, q.values):
            n_pairs += 1
            assert q.values[p.chosen_node] > q.values[p.rejected_node]
        for ex in sft_examples(tree):
            # a verified trace: its terminal's outcome is 1 and its ids are the tree's from the first step on
            assert tree.nodes[ex.node_id].outcome == 1.0
            assert list(ex.prompt_ids) + list(ex.completion_ids) == tree.prefix_ids(ex.node_id)
    assert n_pairs > 0
