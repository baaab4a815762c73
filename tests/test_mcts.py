"""MCTS (UCT / PUCT) and ReST-MCTS*'s MCTS* against fakes whose right answer is known (tests/fakes.py)."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import StepBandit
from treeward.rewards.base import RewardResult, Sample
from treeward.search import SearchError, best_of_n, weighted_vote
from treeward.search.core import grade
from treeward.search.mcts import (
    best_value,
    mcts,
    mcts_star,
    mcts_star_select,
    quality_value,
    visit_weighted_backup,
)
from treeward.search.ops import mean_backup, puct_select, uct_select
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Node, Problem, Tree

STEPS = ArithmeticSteps()
GOLDEN = Path(__file__).parent / "golden"


def _accuracy(trees: list[Tree]) -> float:
    grade(trees, ArithmeticAnswer())
    return sum(bool(t.correct) for t in trees) / len(trees)


def _policy_children(tree: Tree, node: Node) -> list[Node]:
    """Children the tree policy may select: not rollout nodes, duplicate siblings or pruned steps."""
    hidden = ("rollout", "duplicate_of", "pruned")
    return [k for k in tree.children(node.id) if not any(h in k.metadata for h in hidden)]


# ---------------------------------------------------------------------- finding what greedy cannot
def test_mcts_solves_step_bandit_where_greedy_cannot() -> None:
    problems = generate_problems(20, 4, seed=7)
    # StepBandit writes the right line with q = 0.25, else the off-by-one line, so greedy (and any one sample but
    # 1 in 4**4 = 256) is wrong. After dedupe a node has at most two distinct children: the right line R and the
    # wrong line W. W's path score is 0 (the verifier's minimum), so it is pruned, never expanded; a node whose
    # children are all pruned is expanded again. MCTS therefore walks down the right lines, each level costing a
    # geometric number of expansions (3 samples each, the default) with success 1 - 0.75**3 = 0.578 (mean 1.73),
    # plus one for the answer line (always right after right steps): 4 × 1.73 + 1 = 7.9 expansions on average.
    # It fails only if that sum passes what 2,000 tokens pay for (≥ 27 expansions of 3 × 24 reserved tokens):
    # P(4 geometric draws sum past 26) < 1e-6 per problem.
    trees = mcts(problems, StepBandit(problems), STEPS, 2000)
    assert _accuracy(trees) == 1.0
    # tokens: 3 samples × ~16.5 tokens × 1.73 × 4 levels + 3 × 12 for the answer line ≈ 379 on average
    mean_tokens = sum(t.generated_tokens for t in trees) / len(trees)
    assert 250 < mean_tokens < 550
    greedy = best_of_n(problems, StepBandit(problems), STEPS, 2000, n=1, temperature=0.0, max_tokens=100)
    assert _accuracy(greedy) == 0.0
    # weighted best-of-N at ~400 tokens (4 samples of ~96): P(some sample right) = 1 - (1 - 1/256)**4 ≈ 1.6 %
    bon = best_of_n(problems, StepBandit(problems), STEPS, 400, n=4, aggregate=weighted_vote, max_tokens=100)
    assert _accuracy(bon) <= 0.1


def test_mcts_star_solves_step_bandit_and_stops_at_the_end_gate() -> None:
    problems = generate_problems(20, 4, seed=7)
    # With pruning on, MCTS* walks the right lines too. Its quality values with m_k = 12 - k climb by 1/12 a right
    # step (v_k = k/12) and the answer node (m = 0, r = 1) gets v = 1 ≥ 0.9: the search stops there.
    trees = mcts_star(problems, StepBandit(problems), STEPS, 3000, prune_below=0.0)
    assert _accuracy(trees) == 1.0
    for t in trees:
        assert t.metadata["end_gate_reached"]
        chosen = t.nodes[t.chosen]
        assert chosen.value == 1.0
        # right steps on the chosen path: v_k = k/12 for k = 1..4 (unvisited nodes keep their evaluation)
        path = t.path(t.chosen)[1:-1]
        assert [round(n.metadata["eval"], 9) for n in path] == [round(k / 12, 9) for k in range(1, 5)]
        assert t.generated_tokens < 3000  # the end gate stopped it before the budget did


# ---------------------------------------------------------------------- selection, batching, visits
def test_uct_expands_unvisited_children_first_puct_follows_values() -> None:
    [p] = generate_problems(1, 4, seed=7)
    knobs = dict(expansions=3, simulations=4, dedupe=False, prune_below=None)
    [t] = mcts([p], StepBandit([p], q=0.5), STEPS, 2000, select=uct_select, **knobs)
    # round 1 expands the root into nodes 1, 2, 3, of which only node 3 is a right step (value 1). UCT visits
    # unvisited children first, in order, whatever their values: rounds 2, 3, 4 expand nodes 1, 2 and 3.
    assert [t.nodes[i].metadata["score"] for i in (1, 2, 3)] == [0.0, 0.0, 1.0]
    assert [[k.id for k in t.children(i)] for i in (1, 2, 3)] == [[4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert [t.nodes[i].visits for i in (1, 2, 3)] == [1, 1, 1] and t.root.visits == 4
    # PUCT reads an unvisited child's value as its Q (priors are equal: every step's first token has logprob
    # ln 0.5). Round 2 at the root: node 3 scores 1 + (1/3)·sqrt(1)/1 against 0 + 1/3 → node 3. Round 3: its
    # right child 5. Round 4 at the root: node 3 (Q = mean(1, 1) = 1, n = 2) scores 1 + (1/3)·sqrt(3)/3 = 1.19
    # against 0.58 for nodes 1 and 2; at node 3, child 5 (Q 1, n 1) 1.24 against 0.47; at node 5, the right
    # children 8 and 9 tie at 1 + 1/3 and the first wins → node 8. Wrong first steps are never expanded.
    [t] = mcts([p], StepBandit([p], q=0.5), STEPS, 2000, select=puct_select, **knobs)
    assert [n.id for n in t.nodes if n.children] == [0, 3, 5, 8]
    assert [t.nodes[i].metadata["score"] for i in (3, 5, 8)] == [1.0, 1.0, 1.0]


def test_one_engine_call_per_round_for_all_problems() -> None:
    problems = generate_problems(6, 3, seed=3)
    policy = StepBandit(problems)
    trees = mcts(problems, policy, STEPS, 1500)
    rounds = max(t.metadata["simulations_run"] for t in trees)
    # one call per round covers every live problem's leaf (a round where every problem only re-visits makes none)
    assert len(policy.calls) <= rounds
    assert max(policy.calls) > 3  # some call carried several problems' leaves (3 rows each)


@settings(max_examples=25, deadline=None)
@given(
    budget=st.integers(min_value=24, max_value=900),
    k=st.integers(1, 5),
    sims=st.integers(1, 40),
    puct=st.booleans(),
    rollouts=st.integers(0, 2),
)
def test_mcts_budget_visits_and_backups(budget: int, k: int, sims: int, puct: bool, rollouts: int) -> None:
    problems = generate_problems(3, [1, 3], seed=budget)
    if budget < 24 + rollouts * 96:
        with pytest.raises(SearchError, match="smaller than one expansion"):
            mcts(problems, StepBandit(problems), STEPS, budget, rollouts=rollouts)
        return
    log: list[tuple[int, float]] = []

    def recording_mean(tree: Tree, node: Node, value: float) -> float:
        log.append((node.id, value))
        return mean_backup(tree, node, value)

    select = functools.partial(puct_select, c=0.5) if puct else uct_select
    for p in problems:  # one problem a call, so the log of backups belongs to one tree
        log.clear()
        [t] = mcts(
            [p],
            StepBandit(problems),
            STEPS,
            budget,
            expansions=k,
            simulations=sims,
            select=select,
            rollouts=rollouts,
            backup_rule=recording_mean,
        )
        t.validate()
        assert t.generated_tokens <= budget
        assert t.ledger["generated"] == t.generated_tokens
        assert t.root.visits == t.metadata["simulations_run"] <= sims
        # slow reference: split the log into backups (each ends at the root), the first entry is the leaf; every
        # node's value is the mean of the leaf values of the backups whose leaf lies below it
        backups, cur = [], []
        for node_id, value in log:
            cur.append(node_id)
            if node_id == 0:
                backups.append((cur[0], value))
                cur = []
        assert len(backups) == t.root.visits
        seen: dict[int, list[float]] = {}
        for leaf, value in backups:
            for n in t.path(leaf):
                seen.setdefault(n.id, []).append(value)
        for n in t.nodes:
            if n.id in seen:
                assert n.visits == len(seen[n.id])
                assert n.value == pytest.approx(math.fsum(seen[n.id]) / len(seen[n.id]))
            else:
                assert n.visits == 0
                assert n.value == n.metadata.get("eval")  # an unvisited node keeps its evaluation
            if n.metadata.get("rollout"):
                assert n.visits == 0 and all(k.metadata.get("rollout") for k in t.children(n.id))
            if n.visits and n.parent is not None:  # the tree policy only visits what it may select
                assert n in _policy_children(t, t.nodes[n.parent])
            if n.metadata.get("pruned"):  # a dead end is never expanded, rolled out or visited
                assert n.visits == 0 and not n.children


@settings(max_examples=20, deadline=None)
@given(budget=st.integers(min_value=72, max_value=900), k=st.integers(1, 4), roll=st.integers(0, 2))
def test_mcts_star_budget_visits_and_weighted_backups(budget: int, k: int, roll: int) -> None:
    problems = generate_problems(3, [2, 4], seed=budget)
    trees = mcts_star(problems, StepBandit(problems), STEPS, budget, expansions=k, roll_forward_steps=roll)
    for t in trees:
        t.validate()
        assert t.generated_tokens <= budget
        assert t.ledger["generated"] == t.generated_tokens
        assert t.root.visits == t.metadata["simulations_run"]
        for n in t.nodes:
            # MCTS* backpropagation: a node with visited children holds their visit-weighted mean value
            kids = [c for c in t.children(n.id) if c.visits > 0]
            if kids:
                expect = math.fsum(c.visits * c.value for c in kids) / sum(c.visits for c in kids)
                assert n.value == pytest.approx(expect)
            assert 0.0 <= (n.metadata.get("eval") or 0.0) <= 1.0  # quality values stay in [0, 1]


def test_duplicates_and_dead_ends_are_hidden_and_the_leaf_is_expanded_again() -> None:
    p = Problem(
        "one",
        "Q: Ann has 54 cards. Ann gets three times as many. How many cards does Ann have?\n",
        "162",
        {"start": 54, "ops": [["*", 3]]},
    )
    # q = 0: every sample is the same wrong line "Step 1: 54*3=163\n" (17 tokens), scored 0. The first is kept
    # and pruned, every later one is its duplicate; the root never gets a child the tree policy may select, so
    # each of the 3 rounds expands the root again: 3 × 2 samples × 17 tokens = 102.
    [t] = mcts([p], StepBandit([p], q=0.0), STEPS, 1000, expansions=2, simulations=3)
    assert t.generated_tokens == 102 and len(t.nodes) == 7
    first, dups = t.nodes[1], t.nodes[2:]
    assert first.metadata["pruned"] and first.metadata["duplicates"] == 5 and first.value == 0.0
    assert all(d.metadata["duplicate_of"] == 1 and d.value == 0.0 and d.reward == 0.0 for d in dups)
    assert _policy_children(t, t.root) == []
    assert (t.root.visits, t.root.value) == (3, 0.0)  # three backups of the best new step's value, 0
    assert t.chosen is None and t.answer is None


def test_rollouts_are_kept_marked_and_paid_for() -> None:
    p = Problem(
        "one",
        "Q: Ann has 54 cards. Ann gets three times as many. How many cards does Ann have?\n",
        "162",
        {"start": 54, "ops": [["*", 3]]},
    )
    policy = StepBandit([p], q=1.0)  # always the right line
    # budget 120 = one child's step cap (24) + one rollout's cap (96): exactly one expansion with one rollout
    [t] = mcts([p], policy, STEPS, 120, expansions=1, rollouts=1)
    # the child "Step 1: 54*3=162\n" (17 tokens) and its rollout, the answer line "Answer: 162" + EOS (12 tokens)
    assert [n.text for n in t.nodes[1:]] == ["Step 1: 54*3=162\n", "Answer: 162"]
    assert t.generated_tokens == t.ledger["generated"] == 17 + 12
    child, rollout = t.nodes[1], t.nodes[2]
    assert not child.metadata.get("rollout") and rollout.metadata["rollout"] is True
    # the child's value is the mean score of its one completed path (1.0), backed up to the root once
    assert child.value == 1.0 and rollout.value == 1.0 and t.root.value == 1.0 and t.root.visits == 1
    assert t.chosen == rollout.id and t.answer == "162"  # a rollout's answer can be chosen
    # without the rollout's 96 reserved tokens, 119 cannot pay for an expansion with a rollout
    with pytest.raises(SearchError, match="smaller than one expansion"):
        mcts([p], StepBandit([p]), STEPS, 119, expansions=1, rollouts=1)


# ---------------------------------------------------------------------- the primitives, by hand
def _star_tree() -> Tree:
    t = Tree.new(Problem("s", "Q\n"), [1])
    t.add(0, text="a", token_ids=[5], value=0.5, visits=3)
    t.add(0, text="b", token_ids=[6], value=0.2, visits=1)
    t.add(0, text="c", token_ids=[7], value=0.1, visits=0)
    t.root.visits = 4
    return t


def test_quality_value_by_hand() -> None:
    # r = 1, 1, 0 with distances 2, 1, 0:
    #   v1 = 0 + (1 - 0)/3 · (+1) = 1/3;  v2 = 1/3 + (2/3)/2 = 2/3;  v3 = max(2/3 - (1/3)/1, 0) = 1/3
    assert quality_value([1.0, 1.0, 0.0], [2, 1, 0]) == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    # right steps with exact distances climb linearly to 1: K = 4 → 1/4, 2/4, 3/4, 1
    assert quality_value([1.0] * 4, [3, 2, 1, 0]) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # a wrong first step floors at 0; r = 0.5 leaves the value where it was
    assert quality_value([0.0, 0.5], [3, 2]) == [0.0, 0.0]
    with pytest.raises(ValueError):
        quality_value([1.0], [-1])


def test_mcts_star_select_by_hand() -> None:
    t = _star_tree()
    # a (visited 3): 0.5 + 0.4·sqrt(2 ln 4 / 3) = 0.5 + 0.384 = 0.884;  b (1): 0.2 + 0.4·sqrt(2 ln 4) = 0.866;
    # c (unvisited): 0.1 + 0.8 = 0.9 → c
    assert mcts_star_select(t, t.root).text == "c"
    # a smaller bonus: c = 0.1 + 0.7 = 0.8 < a → a
    assert mcts_star_select(t, t.root, unvisited_bonus=0.7).text == "a"


def test_visit_weighted_backup_and_best_value_by_hand() -> None:
    t = _star_tree()
    # (3·0.5 + 1·0.2) / 4 = 0.425; c (unvisited) does not count
    assert visit_weighted_backup(t, t.root, 0.9) == pytest.approx(0.425)
    assert visit_weighted_backup(t, t.nodes[3], 0.9) == 0.9  # no visited children: the given value
    u = Tree.new(Problem("v", "Q\n"), [1])
    x = u.add(
        0, text="Answer: 1", token_ids=[5], logprobs=[-2.0], terminal=True, answer="1", value=0.8, visits=1
    )
    y = u.add(
        0, text="Answer: 2", token_ids=[6], logprobs=[-1.0], terminal=True, answer="2", value=0.8, visits=3
    )
    u.add(0, text="Answer: 3", token_ids=[7], logprobs=[-0.1], terminal=True, answer="3", value=0.7, visits=9)
    # highest value 0.8 ties between x and y; y has more visits
    assert best_value(u, u.terminals()) is y
    y.visits = 1  # visits tie too: the higher logprob wins, still y (-1.0 > -2.0)
    assert best_value(u, u.terminals()) is y
    assert best_value(u, [x]) is x and best_value(u, []) is None


# ---------------------------------------------------------------------- determinism, golden trees, errors
def _fields(trees: list[Tree]) -> list[dict[str, object]]:
    out = []
    for t in trees:
        nodes = [
            {
                "id": d["id"],
                "parent": d["parent"],
                "text": d["text"],
                "value": None if d["value"] is None else round(d["value"], 9),
                "visits": d["visits"],
                "terminal": d["terminal"],
                "rollout": bool(d["metadata"].get("rollout")),
                "duplicate_of": d["metadata"].get("duplicate_of"),
                "pruned": bool(d["metadata"].get("pruned")),
            }
            for d in t.to_dict()["nodes"]
        ]
        out.append({"problem": t.problem.id, "chosen": t.chosen, "answer": t.answer, "nodes": nodes})
    return out


@pytest.mark.parametrize(
    ("name", "search"),
    [
        ("mcts", functools.partial(mcts, expansions=3, rollouts=1, rollout_tokens=48)),
        ("mcts_star", functools.partial(mcts_star, prune_below=None)),
    ],
)
def test_golden_trees(name: str, search: functools.partial[list[Tree]]) -> None:
    problems = generate_problems(2, 2, seed=5)
    trees = search(problems, StepBandit(problems, q=0.5), STEPS, 400, seed=3)
    got = _fields(trees)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TREEWARD_REGOLD") == "1":
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    assert got == json.loads(path.read_text())


@pytest.mark.parametrize("search", [mcts, functools.partial(mcts, rollouts=1), mcts_star])
def test_same_seed_same_trees_whatever_the_batching(search: functools.partial[list[Tree]]) -> None:
    problems = generate_problems(5, [2, 3], seed=11)
    together = search(problems, StepBandit(problems, q=0.5), STEPS, 500, seed=5)
    apart = [t for p in problems for t in search([p], StepBandit(problems, q=0.5), STEPS, 500, seed=5)]
    assert [t.to_dict()["nodes"] for t in together] == [t.to_dict()["nodes"] for t in apart]
    other = search(problems, StepBandit(problems, q=0.5), STEPS, 500, seed=6)
    assert [t.to_dict()["nodes"] for t in together] != [t.to_dict()["nodes"] for t in other]


def test_bad_knobs_are_clear_errors() -> None:
    problems = generate_problems(2, 2, seed=0)
    with pytest.raises(SearchError, match="positive"):
        mcts(problems, StepBandit(problems), STEPS, 0)
    with pytest.raises(SearchError, match="smaller than one expansion"):
        mcts(problems, StepBandit(problems), STEPS, 10)
    with pytest.raises(SearchError, match="≥ 1"):
        mcts(problems, StepBandit(problems), STEPS, 500, expansions=0)
    with pytest.raises(SearchError, match="rollouts"):
        mcts(problems, StepBandit(problems), STEPS, 500, rollouts=-1)
    with pytest.raises(SearchError, match="alpha"):
        mcts_star(problems, StepBandit(problems), STEPS, 500, alpha=2.0)
    with pytest.raises(SearchError, match="roll_forward_steps"):
        mcts_star(problems, StepBandit(problems), STEPS, 500, roll_forward_steps=-1)
    with pytest.raises(SearchError, match="unique"):
        mcts([problems[0], problems[0]], StepBandit(problems), STEPS, 500)


class _Raises:
    name = "raises"

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        raise RuntimeError("scorer exploded")


@pytest.mark.parametrize("search", [mcts, mcts_star])
def test_failing_scorer_is_recorded_not_fatal(search: functools.partial[list[Tree]]) -> None:
    problems = generate_problems(2, 2, seed=0)
    with pytest.warns(RuntimeWarning, match="scorer exploded"):
        trees = search(problems, StepBandit(problems), _Raises(), 400)
    for t in trees:
        t.validate()
        assert t.generated_tokens <= 400
        assert all(n.status == "exec_error" for n in t.nodes[1:] if "duplicate_of" not in n.metadata)
