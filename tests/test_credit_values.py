"""Step values from trees: Monte-Carlo (Math-Shepherd SE / HE), ReST-MCTS* inferred values, MCTS Q-values, and the
StepExample rows built from them. Small hand-built trees with the expected numbers derived in comments; Hypothesis
properties on random trees; the fast Monte-Carlo pass against its slow reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import StepBandit
from treeward.credit.values import (
    CreditError,
    mc_hard_values,
    mc_values,
    mc_values_reference,
    q_values,
    rest_values,
    step_examples,
    thin_nodes,
)
from treeward.search.core import grade
from treeward.search.mcts import mcts
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Problem, Tree


def build(spec: list[tuple[int, str, bool, float | None]]) -> Tree:
    """A tree from ``(parent, text, terminal, outcome)`` rows, in node-id order (node 0 is the root "Q\\n").
    Tokens are characters (``ord``), so every step's ids are its text."""
    tree = Tree.new(Problem(id="p", prompt="Q\n", answer="1"), [1, *map(ord, "Q\n")])
    for parent, text, terminal, outcome in spec:
        tree.add(parent, text=text, token_ids=[ord(c) for c in text], terminal=terminal, outcome=outcome)
    return tree


# root(0)
# ├─ 1 A ─┬─ 3 C  terminal, outcome 1
# │       ├─ 4 D  terminal, outcome 0
# │       └─ 5 E  terminal, outcome 1
# ├─ 2 B ─┬─ 6 F  terminal, outcome 0
# │       └─ 7 G  open leaf (never finished)
# └─ 8 H  terminal, outcome None (grading failed)
MC_TREE = [
    (0, "A\n", False, None),
    (0, "B\n", False, None),
    (1, "C", True, 1.0),
    (1, "D", True, 0.0),
    (1, "E", True, 1.0),
    (2, "F", True, 0.0),
    (2, "G\n", False, None),
    (0, "H", True, None),
]


# ---------------------------------------------------------------------- Monte-Carlo values
def test_mc_values_on_a_hand_built_tree() -> None:
    tree = build(MC_TREE)
    got = mc_values(tree)
    # SE = mean outcome of the scored terminals below: A has C, D, E → (1 + 0 + 1) / 3 = 2/3; B has F → 0/1 = 0;
    # the root has C, D, E, F → 2/4 = 0.5; terminals are their own outcome. G (open) and H (no outcome) have no
    # scored terminal below: no value, reported as excluded, never counted as 0 (else the root would be 2/5).
    assert got.values == pytest.approx({0: 0.5, 1: 2 / 3, 2: 0.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 0.0})
    assert got.counts == {0: 4, 1: 3, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}
    assert got.excluded == (7, 8)
    assert mc_values_reference(tree) == got


def test_mc_hard_values_any_correct_completion() -> None:
    tree = build(MC_TREE)
    got = mc_hard_values(tree)
    # HE = 1 when some completion through the step is right: A (C, E right) → 1, B (only F, wrong) → 0, root → 1
    assert got.values == {0: 1.0, 1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 0.0}
    assert got.counts == mc_values(tree).counts and got.excluded == (7, 8)
    # with 0/1 outcomes any bar in (0, 1] marks the same terminals correct
    assert mc_hard_values(tree, correct_at=0.5).values == got.values
    with pytest.raises(CreditError, match="correct_at"):
        mc_hard_values(tree, correct_at=0.0)


def test_thin_nodes_are_open_nodes_with_few_scored_terminals() -> None:
    tree = build(MC_TREE)
    # counts: root 4, A 3, B 1, G 0; terminals (C, D, E, F, H) are never thin. With min_leaves=2: B and G.
    assert thin_nodes(tree, min_leaves=2) == [2, 7]
    # with 4: A (3) joins; the root (4) does not
    assert thin_nodes(tree, min_leaves=4) == [1, 2, 7]
    # a search's duplicate sibling is skipped (its rollouts are its twin's)
    tree.nodes[7].metadata["duplicate_of"] = 6
    assert thin_nodes(tree, min_leaves=2) == [2]
    with pytest.raises(CreditError, match="min_leaves"):
        thin_nodes(tree, min_leaves=0)


def test_outcomes_outside_unit_interval_are_one_clear_error() -> None:
    tree = build([(0, "A", True, 2.0)])
    with pytest.raises(CreditError, match=r"node 1 has outcome 2\.0.*\[0, 1\]"):
        mc_values(tree)
    tree.nodes[1].outcome = math.nan
    with pytest.raises(CreditError, match="node 1"):
        mc_values_reference(tree)


# ---------------------------------------------------------------------- ReST-MCTS* inferred values
# root(0)
# ├─ 1 a ─┬─ 2 b ─┬─ 3 T  terminal, correct (1)
# │       │       └─ 5 u  terminal, wrong (0)
# │       └─ 4 c  terminal, wrong (0)
# ├─ 6 e  open leaf
# └─ 7 w  terminal, wrong (0)
REST_TREE = [
    (0, "a\n", False, None),
    (1, "b\n", False, None),
    (2, "T", True, 1.0),
    (1, "c", True, 0.0),
    (2, "u", True, 0.0),
    (0, "e\n", False, None),
    (0, "w", True, 0.0),
]


def test_rest_values_hand_worked_example() -> None:
    got = rest_values(build(REST_TREE))
    # reasoning distances on the correct path: T 0, b 1, a 2, root 3.
    # v_0 = 0; on-path steps rise by (1 - v)/(m + 1):
    #   v_a = 0 + 1/3 = 1/3;  v_b = 1/3 + (2/3)/2 = 2/3;  v_T = 2/3 + (1/3)/1 = 1.
    # off-path steps fall by (1 - v_parent)/(m_A + 1), m_A = the nearest on-path ancestor's distance:
    #   c (below a, m = 2): 1/3 - (2/3)/3 = 1/9;  u (below b, m = 1): 2/3 - (1/3)/2 = 1/2;
    #   w (below the root, m = 3): max(0 - 1/4, 0) = 0.
    # e is an open leaf with no scored terminal below: no value.
    assert got.values == pytest.approx({0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: 1 / 9, 5: 0.5, 7: 0.0})
    assert got.excluded == (6,)
    # counts are the scored terminals below: root has T, u, c, w
    assert got.counts == {0: 4, 1: 3, 2: 2, 3: 1, 4: 1, 5: 1, 7: 1}


def test_rest_distance_is_to_the_nearest_correct_terminal() -> None:
    # root → a → b → T (correct), and a → T2 (correct): a is one step from T2, so m_a = 1, not 2
    tree = build(
        [(0, "a\n", False, None), (1, "b\n", False, None), (2, "T", True, 1.0), (1, "T2", True, 1.0)]
    )
    got = rest_values(tree)
    # v_a = 0 + 1/2 = 1/2; v_b = 1/2 + (1/2)/2 = 3/4; v_T = 3/4 + (1/4)/1 = 1; v_T2 = 1/2 + (1/2)/1 = 1
    assert got.values == pytest.approx({0: 0.0, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0})


def test_rest_values_need_a_correct_answer() -> None:
    tree = build([(0, "a", True, 0.0), (0, "b\n", False, None)])
    got = rest_values(tree)
    # no oracle-correct terminal: nothing to infer from (the released code emits no value samples)
    assert got.values == {} and got.excluded == (1, 2)


# ---------------------------------------------------------------------- Q-values
def test_q_values_read_visits_and_backups() -> None:
    tree = build([(0, "a\n", False, None), (0, "b\n", False, None), (1, "c", True, 1.0)])
    for node, (value, visits) in zip(tree.nodes, [(0.6, 5), (0.8, 4), (0.2, 1), (1.0, 0)], strict=True):
        node.value, node.visits = value, visits
    got = q_values(tree)
    # node 3 was never visited (its value is only an evaluation): left out by default, kept with min_visits=0
    assert got.values == {0: 0.6, 1: 0.8, 2: 0.2} and got.counts == {0: 5, 1: 4, 2: 1}
    assert got.excluded == (3,)  # the leaves are b (2, visited) and c (3, no Q)
    assert q_values(tree, min_visits=0).values[3] == 1.0


def test_q_values_of_a_real_mcts_search() -> None:
    problems = generate_problems(3, 2, seed=11)
    trees = mcts(problems, StepBandit(problems), ArithmeticSteps(), 600, seed=2)
    for tree in trees:
        got = q_values(tree)
        visited = [n for n in tree.nodes if n.visits >= 1]
        # every visited node has its backed-up value as Q and its visits as the count; the root was visited once
        # per round
        assert got.counts == {n.id: n.visits for n in visited}
        assert got.values == {n.id: n.value for n in visited}
        assert got.counts[0] == tree.root.visits > 0
        assert all(0.0 <= v <= 1.0 for v in got.values.values())


# ---------------------------------------------------------------------- StepExample rows
def test_step_examples_soft_values_and_hard_labels() -> None:
    tree = build(MC_TREE)
    se, he = mc_values(tree), mc_hard_values(tree)
    rows = step_examples(tree, se.values, label_values=he.values, threshold=1.0)
    # one row per scored root-to-terminal path: C, D, E (under A) and F (under B); H has no value (no outcome)
    assert [r.metadata["terminal"] for r in rows] == [3, 4, 5, 6]
    first = rows[0]
    assert first.node_ids == (1, 3) and first.steps == ("A\n", "C")
    assert first.values == pytest.approx((2 / 3, 1.0))
    assert first.labels == (True, True)  # HE: A leads to a right answer, C is right
    assert rows[3].values == (0.0, 0.0) and rows[3].labels == (False, False)  # B → F: nothing right below
    assert first.prompt_ids == tree.root.token_ids and first.step_ids == (tuple(map(ord, "A\n")), (ord("C"),))
    # thresholding the soft values instead: A's 2/3 < 0.7 → False, ≥ 0.5 → True
    assert step_examples(tree, se.values, threshold=0.7)[0].labels == (False, True)
    assert step_examples(tree, se.values, threshold=0.5)[0].labels == (True, True)


def test_step_examples_dedupe_identical_paths() -> None:
    # two identical terminal steps under A (a search's duplicate sample): one row
    tree = build([(0, "A\n", False, None), (1, "C", True, 1.0), (1, "C", True, 1.0)])
    rows = step_examples(tree, mc_values(tree).values, threshold=0.5)
    assert len(rows) == 1 and rows[0].node_ids == (1, 2)


def test_step_examples_refuse_values_outside_unit_interval() -> None:
    tree = build([(0, "A", True, 1.0)])
    with pytest.raises(CreditError, match=r"node 1 has value 3\.0"):
        step_examples(tree, {0: 0.5, 1: 3.0}, threshold=0.5)


# ---------------------------------------------------------------------- properties on random trees
@st.composite
def random_trees(draw: st.DrawFn, outcomes: st.SearchStrategy[float] | None = None) -> Tree:
    n = draw(st.integers(1, 25))
    parents = [draw(st.integers(0, i)) for i in range(n)]  # node i + 1 hangs under an earlier node
    tree = Tree.new(Problem(id="r", prompt="Q\n"), [1])
    for i, p in enumerate(parents):
        tree.add(p, text=f"s{i}\n", token_ids=[100 + i])
    outcome = st.sampled_from([0.0, 1.0]) if outcomes is None else outcomes
    for leaf in tree.leaves():
        kind = draw(st.sampled_from(["scored", "scored", "scored", "unscored", "open"]))
        if kind != "open":
            leaf.terminal = True
            leaf.outcome = draw(outcome) if kind == "scored" else None
    return tree


@settings(max_examples=150, deadline=None)
@given(random_trees(st.floats(0.0, 1.0)))
def test_mc_values_properties(tree: Tree) -> None:
    got = mc_values(tree)
    ref = mc_values_reference(tree)
    assert got.counts == ref.counts and got.excluded == ref.excluded
    assert got.values == pytest.approx(ref.values, abs=1e-12)
    for i, v in got.values.items():
        assert 0.0 <= v <= 1.0
        node = tree.nodes[i]
        kids = [k.id for k in tree.children(i) if k.id in got.values]
        if kids and node.outcome is None:
            # an inner node's value is the leaf-count-weighted mean of its children's values
            mean = sum(got.counts[k] * got.values[k] for k in kids) / sum(got.counts[k] for k in kids)
            assert v == pytest.approx(mean, abs=1e-12)
    assert set(got.excluded) == {n.id for n in tree.leaves()} - set(got.values)


@settings(max_examples=100, deadline=None)
@given(random_trees(), st.floats(0.0, 1.0))
def test_one_shared_outcome_gives_that_value_everywhere(tree: Tree, c: float) -> None:
    for t in tree.terminals():
        if t.outcome is not None:
            t.outcome = c
    # exactly c, not c up to rounding (e.g. (0.1 + 0.1 + 0.1) / 3 is 0.10000000000000002)
    assert all(v == c for v in mc_values(tree).values.values())
    assert all(v == c for v in mc_values_reference(tree).values.values())
    assert all(v == float(c >= 1.0) for v in mc_hard_values(tree).values.values())


def _rest_brute_force(tree: Tree) -> dict[int, float]:
    """ReST-MCTS* values straight from the definitions: per node, search its subtree for correct terminals."""

    def below(i: int) -> list[tuple[int, float]]:  # (depth below i, outcome) of scored terminals under i
        root_depth = tree.nodes[i].depth
        return [
            (n.depth - root_depth, float(n.outcome))
            for n in tree.iter_depth_first(i)
            if n.terminal and n.outcome is not None
        ]

    def m_on_path(i: int) -> int | None:
        d = [depth for depth, o in below(i) if o >= 1.0]
        return min(d) if d else None

    if m_on_path(0) is None:
        return {}
    out = {0: 0.0}
    for node in tree.nodes[1:]:
        path = tree.path(node.id)
        if any(n.id not in out for n in path[:-1]):
            continue
        parent_v = out[path[-2].id]
        m = m_on_path(node.id)
        if m is not None:
            out[node.id] = max(parent_v + (1 - parent_v) / (m + 1), 0.0)
        elif any(o < 1.0 for _, o in below(node.id)):
            anchor = next(a for a in reversed(path) if m_on_path(a.id) is not None)
            m_a = m_on_path(anchor.id)
            assert m_a is not None
            out[node.id] = max(parent_v - (1 - parent_v) / (m_a + 1), 0.0)
    return out


@settings(max_examples=150, deadline=None)
@given(random_trees())
def test_rest_values_properties(tree: Tree) -> None:
    got = rest_values(tree)
    assert got.values == pytest.approx(_rest_brute_force(tree), abs=1e-12)
    for i, v in got.values.items():
        assert 0.0 <= v <= 1.0
        node = tree.nodes[i]
        if node.terminal and node.outcome == 1.0:
            assert v == pytest.approx(1.0)  # a correct terminal is where the quality value reaches 1
        if node.parent is not None:
            parent_v = got.values[node.parent]  # a valued node's parent is valued
            on_path = mc_hard_values(tree).values.get(i) == 1.0
            assert v >= parent_v if on_path else v <= parent_v


# ---------------------------------------------------------------------- on real search trees
def test_values_on_graded_search_trees() -> None:
    problems = generate_problems(4, 3, seed=3)
    trees = mcts(problems, StepBandit(problems, q=0.4), ArithmeticSteps(), 500, seed=1)
    grade(trees, ArithmeticAnswer())
    for tree in trees:
        se = mc_values(tree)
        assert se == mc_values_reference(tree)
        # every StepExample's steps are the tree's tokens along the path to its terminal
        for ex in step_examples(tree, se.values, threshold=0.5):
            term = ex.metadata["terminal"]
            assert list(ex.prompt_ids) + [t for s in ex.step_ids for t in s] == tree.prefix_ids(term)
            assert ex.values[-1] == tree.nodes[term].outcome
