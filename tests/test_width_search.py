"""DVTS, REBASE, ETS and beam search with lookahead, against the fake policy whose right answer is known
(tests/fakes.py: each step is right with probability q, else off by one; greedy takes the likelier line)."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import StepBandit
from treeward.rewards.base import RewardResult, Sample
from treeward.search import SearchError, beam_search
from treeward.search.core import grade
from treeward.search.dvts import dvts
from treeward.search.rebase import (
    EtsProgram,
    ets,
    ets_program,
    ets_widths,
    kv_tokens,
    rebase,
    rebase_widths,
    solve_ets,
)
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Node, Problem, Tree

STEPS = ArithmeticSteps()
GOLDEN = Path(__file__).parent / "golden"


def _accuracy(trees: list[Tree]) -> float:
    grade(trees, ArithmeticAnswer())
    return sum(bool(t.correct) for t in trees) / len(trees)


def _search_nodes(tree: Tree) -> list[Node]:
    """The nodes the search kept or could keep: everything but lookahead rollouts."""
    return [n for n in tree.nodes[1:] if not n.metadata.get("lookahead")]


# ---------------------------------------------------------------------- DVTS
def test_dvts_accuracy_matches_the_subtree_calculation() -> None:
    problems = generate_problems(60, 4, seed=7)
    policy = StepBandit(problems, q=0.25)
    trees = dvts(problems, policy, STEPS, 4000, n=16, expansions=4)
    # 4 subtrees, each keeps the best of 4 samples per step: a step is lost when all 4 are wrong, 0.75**4 = 0.316,
    # so a subtree is right through 4 steps with (1 - 0.316)**4 = 0.219 (the answer line is always consistent).
    # Weighted vote: right paths score 1, wrong ones 0, so the problem is solved when any subtree is right:
    # 1 - (1 - 0.219)**4 = 0.628 (sd over 60 problems ≈ 0.06).
    assert 0.45 <= _accuracy(trees) <= 0.8
    # one engine call per depth for every subtree of every problem: 4 steps + the answer line = 5 calls, each
    # 60 problems × 4 subtrees × 4 samples (the root's 16 samples are one request split among the subtrees)
    assert policy.calls == [60 * 16] * 5


def test_dvts_subtrees_stay_independent() -> None:
    problems = generate_problems(4, [2, 4], seed=5)
    for t in dvts(problems, StepBandit(problems, q=0.4), STEPS, 2000, n=12, expansions=3):
        nodes = _search_nodes(t)
        assert {n.metadata["subtree"] for n in nodes} == {0, 1, 2, 3}  # 12 / 3 subtrees
        for s in range(4):  # each subtree owns exactly its `expansions` children of the root
            assert sum(n.parent == 0 and n.metadata["subtree"] == s for n in nodes) == 3
        for n in nodes:  # and, by induction from the root's children, no node sits under another subtree
            parent = t.nodes[n.parent]  # type: ignore[index]
            assert n.parent == 0 or parent.metadata["subtree"] == n.metadata["subtree"]
        # a greedy subtree expands one node per depth: at most one expanded node per subtree and depth
        expanded = {(n.depth, n.metadata["subtree"], n.parent) for n in nodes}
        assert len(expanded) == len({(d, s) for d, s, _ in expanded})


def test_dvts_votes_over_each_subtrees_last_candidates() -> None:
    problems = generate_problems(3, 2, seed=2)
    for t in dvts(problems, StepBandit(problems), STEPS, 2000, n=8, expansions=4):
        # 2 steps + the answer line: the answer candidates are the 4 samples of the answer line in each subtree,
        # all terminal, all answered; the chosen one is among them
        answers = [n for n in t.terminals() if n.depth == 3]
        assert len(answers) == 8 and t.chosen in {n.id for n in answers}
        assert t.metadata["finished_subtrees"] == 2


# ---------------------------------------------------------------------- REBASE
def _fan(values: Sequence[float | None]) -> tuple[Tree, list[Node]]:
    """A root with one child per value (2 tokens each)."""
    t = Tree.new(Problem("f", "Q\n"), [1, 2, 3])
    kids = [t.add(0, text=f"s{i}\n", token_ids=[10 + i, 9], value=v) for i, v in enumerate(values)]
    return t, kids


def test_rebase_widths_by_hand() -> None:
    t, kids = _fan([1.0, 0.0, 1.0, 0.0, 1.0])
    # T = 0.2: a right step weighs e^(1/0.2) = e^5 = 148.4 against 1 for a wrong one. 16 slots: a right one gets
    # 16·148.4 / (3·148.4 + 2) = 5.37, a wrong one 0.036; floors 5, 0, 5, 0, 5; the one leftover goes to the
    # largest remainder (0.37, the first right step)
    assert rebase_widths(t, kids, 16, temperature=0.2) == [6, 0, 5, 0, 5]
    # unscored nodes get nothing while another node is scored, and an even split when none is
    t, kids = _fan([None, 0.5, None])
    assert rebase_widths(t, kids, 4, temperature=0.2) == [0, 4, 0]
    t, kids = _fan([None, None])
    assert rebase_widths(t, kids, 5, temperature=0.2) == [3, 2]


def test_rebase_finds_what_greedy_misses() -> None:
    problems = generate_problems(40, 4, seed=7)
    policy = StepBandit(problems, q=0.25)
    trees = rebase(problems, policy, STEPS, 4000, width=16)
    # T = 0.2 puts almost all 16 rows on right nodes (a wrong node gets < 0.04 of a row), so a step is lost only
    # when all 16 rows are wrong: 0.75**16 = 0.010 per step, (1 - 0.010)**4 = 0.96 per problem (greedy: 0 %)
    assert _accuracy(trees) >= 0.85
    assert policy.calls == [40 * 16] * 5  # one call per depth; W = 16 rows every depth (no path ends early)


def _check_widths(t: Tree) -> None:
    """Each depth's widths sum to its total, the total is W less the paths finished before that depth, and each
    frontier node got exactly its width in children."""
    finished = 0
    for depth, pairs in enumerate(t.metadata["widths"]):
        widths = dict(pairs)
        assert sum(widths.values()) <= t.metadata["width"] - finished
        assert len(widths) == t.metadata["frontier"][depth]
        for nid, w in widths.items():
            assert len(t.nodes[nid].children) == w
        finished += sum(t.nodes[c].terminal for nid in widths for c in t.nodes[nid].children)
    assert finished == t.metadata["finished"]


@settings(max_examples=15, deadline=None)
@given(budget=st.integers(24, 900), width=st.integers(1, 10), lam=st.sampled_from([0.0, 1.0, 3.0]))
def test_width_searches_respect_budget_and_allocation(budget: int, width: int, lam: float) -> None:
    problems = generate_problems(3, [1, 3], seed=budget)
    for algorithm in (rebase, partial(ets, lambda_c=lam, lambda_s=lam)):
        trees = algorithm(problems, StepBandit(problems), STEPS, budget, width=width)
        for t in trees:
            assert t.generated_tokens == t.ledger["generated"] <= budget
            t.validate()
            _check_widths(t)
            for depth, pairs in enumerate(t.metadata["widths"]):
                # allocate_widths is respected: the widths sum to the depth's total (W less finished, less what
                # the budget cannot pay for), exactly
                retained = [t.nodes[nid] for nid, w in pairs if w > 0]
                assert t.metadata["kv_tokens"][depth] == kv_tokens(t, retained)
                assert t.metadata["retained"][depth] == len(retained)


def test_rebase_allocation_sums_to_width_when_budget_is_ample() -> None:
    problems = generate_problems(5, 3, seed=4)
    for t in rebase(problems, StepBandit(problems), STEPS, 5000, width=8):
        finished = 0
        for pairs in t.metadata["widths"]:
            assert sum(w for _, w in pairs) == 8 - finished  # the whole width, less the finished paths
            finished += sum(t.nodes[c].terminal for nid, _ in pairs for c in t.nodes[nid].children)


# ---------------------------------------------------------------------- ETS
def _branchy() -> tuple[Tree, list[Node]]:
    """root (3 tokens) → a, b (2 tokens each); a → a1, a2, a3; b → b1 (1 token each); all leaves score 1."""
    t = Tree.new(Problem("b", "Q\n"), [1, 2, 3])
    a = t.add(0, text="a\n", token_ids=[4, 5], value=1.0)
    b = t.add(0, text="b\n", token_ids=[6, 7], value=1.0)
    leaves = [t.add(a.id, text="same\n", token_ids=[8], value=1.0) for _ in range(3)]
    leaves.append(t.add(b.id, text="other\n", token_ids=[9], value=1.0))
    return t, leaves


def test_ets_program_by_hand() -> None:
    t, leaves = _branchy()
    kw: dict[str, Any] = {"temperature": 0.2, "lambda_s": 0.0}
    # equal scores, 4 slots: REBASE shares 1, 1, 1, 1 → rewards 0.25 each. N = 4 leaves, M = 3 branches
    # (root, a, b), so a node costs λ_c / 7.
    # λ_c = 1: keep all: 1.0 - 7/7 = 0;  {a1, a2, a3}: 0.75 - (3 + 2)/7 = 0.036;  {b1}: 0.25 - 3/7 < 0;
    #          {a1, a2}: 0.5 - 4/7 < 0.  ETS drops the lone branch b and shares the width among a's children.
    assert ets_widths(t, leaves, 4, lambda_c=1.0, **kw) == [2, 1, 1, 0]
    assert kv_tokens(t, leaves[:3]) == 3 + 2 + 3 and kv_tokens(t, leaves) == 3 + 2 + 2 + 4  # 8 vs 11 tokens
    # λ_c = 0.5: keep all: 1 - 3.5/7 = 0.5 beats {a1, a2, a3}: 0.75 - 2.5/7 = 0.393 → REBASE's widths
    assert ets_widths(t, leaves, 4, lambda_c=0.5, **kw) == [1, 1, 1, 1]
    # coverage: a's children share one text, b1 has its own (K = 2 clusters, λ_s / K = 0.5 per cluster).
    # λ_c = 1, λ_s = 1: keep all: 0 + 1.0 = 1.0; {a1, a2, b1}: 0.75 - 6/7 + 1.0 = 0.893; {a1, a2, a3}: 0.536
    program = ets_program(t, leaves, 4, temperature=0.2, lambda_c=1.0, lambda_s=1.0)
    assert program.n_clusters == 2 and program.objective([True] * 4) == pytest.approx(1.0)
    assert program.objective([True, True, False, True]) == pytest.approx(0.75 - 6 / 7 + 1.0)
    assert solve_ets(program) == [True] * 4


def _letters(texts: Sequence[str]) -> np.ndarray:
    """A cheap lexical embedding: letter counts (stands in for a sentence-transformers model)."""
    return np.array([[s.count(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] for s in texts], dtype=float)


def test_ets_coverage_with_a_lexical_embedding() -> None:
    # two leaves under different branches: root → a → x ("seven\n"), root → b → y ("eleven\n"); equal scores
    t = Tree.new(Problem("c", "Q\n"), [1])
    a = t.add(0, text="a\n", token_ids=[2], value=1.0)
    b = t.add(0, text="b\n", token_ids=[3], value=1.0)
    x = t.add(a.id, text="seven\n", token_ids=[4], value=1.0)
    y = t.add(b.id, text="eleven\n", token_ids=[5], value=1.0)
    # rewards 0.5 each; N = 2, M = 3 (root, a, b), λ_c = 2 → a node costs 2/5.
    # no coverage: {x}: 0.5 - 3·0.4 = -0.7 beats both: 1.0 - 5·0.4 = -1.0 → keep one
    kw: dict[str, Any] = {"temperature": 0.2, "lambda_c": 2.0}
    assert sum(w > 0 for w in ets_widths(t, [x, y], 2, lambda_s=0.0, **kw)) == 1
    # exact-text clusters (embed=None): 2 clusters, λ_s = 2 → 1 per cluster: {x}: 0.3, both: 1.0 → keep both
    assert ets_widths(t, [x, y], 2, lambda_s=2.0, **kw) == [1, 1]
    # letter counts: "seven" = e2 n1 s1 v1, "eleven" = e3 l1 n1 v1: cosine (6 + 1 + 1) / (√7·√12) = 0.873. At
    # similarity 0.85 they are one cluster (K = 1, 2 per cluster): {x}: 1.3 beats both: 1.0 → keep one again
    assert (
        sum(w > 0 for w in ets_widths(t, [x, y], 2, lambda_s=2.0, embed=_letters, similarity=0.85, **kw)) == 1
    )
    assert ets_widths(t, [x, y], 2, lambda_s=2.0, embed=_letters, similarity=0.9, **kw) == [1, 1]


def _brute_force(program: EtsProgram) -> float:
    """The slow exact optimum: every non-empty kept set, its branches and covered clusters counted directly."""
    n = len(program.reward)
    size = n + program.n_branches
    cost = (program.lambda_c if program.lambda_c > 0 else -1e-4) / size
    best = -math.inf
    for keep in itertools.product([False, True], repeat=n):
        if not any(keep):
            continue
        kept = [i for i in range(n) if keep[i]]
        branches = set().union(*(program.ancestors[i] for i in kept))
        value = sum(program.reward[i] for i in kept) - cost * (len(kept) + len(branches))
        if program.lambda_s > 0:
            value += program.lambda_s * len({program.clusters[i] for i in kept}) / len(set(program.clusters))
        best = max(best, value)
    return best


@st.composite
def _programs(draw: Callable[..., Any]) -> EtsProgram:
    """Random small ETS programs: branches form a tree (branch j's parent is an earlier branch), each leaf hangs
    under one branch and has that branch's chain of ancestors; rewards are REBASE-like shares."""
    m = draw(st.integers(1, 5))
    parent = [None] + [draw(st.integers(0, j - 1)) for j in range(1, m)]
    n = draw(st.integers(1, 7))
    ancestors = []
    for _ in range(n):
        chain, j = [], draw(st.integers(0, m - 1))
        while j is not None:
            chain.append(j)
            j = parent[j]
        ancestors.append(tuple(chain))
    raw = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    total = sum(raw) or 1
    return EtsProgram(
        reward=tuple(r / total for r in raw),
        ancestors=tuple(ancestors),
        n_branches=m,
        clusters=tuple(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))),
        lambda_c=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
        lambda_s=draw(st.sampled_from([0.0, 0.7, 1.5, 4.0])),
    )


@settings(max_examples=60, deadline=None)
@given(_programs())
def test_ets_milp_matches_brute_force(program: EtsProgram) -> None:
    keep = solve_ets(program)
    assert any(keep)
    assert program.objective(keep) == pytest.approx(_brute_force(program), abs=1e-7)


def test_ets_with_zero_lambdas_is_rebase() -> None:
    problems = generate_problems(6, [2, 4], seed=9)
    a = rebase(problems, StepBandit(problems, q=0.4), STEPS, 700, width=6)
    b = ets(problems, StepBandit(problems, q=0.4), STEPS, 700, width=6, lambda_c=0.0, lambda_s=0.0)
    assert [t.to_dict()["nodes"] for t in a] == [t.to_dict()["nodes"] for t in b]
    assert [t.metadata["widths"] for t in a] == [t.metadata["widths"] for t in b]


def test_ets_keeps_fewer_nodes_than_rebase() -> None:
    problems = generate_problems(10, 4, seed=3)
    a = rebase(problems, StepBandit(problems, q=0.6), STEPS, 4000, width=16)
    b = ets(problems, StepBandit(problems, q=0.6), STEPS, 4000, width=16, lambda_c=3.0)
    # with many right siblings each gets a small share (1/10 of the width, say) while keeping it costs 3/(N + M);
    # ETS concentrates the width on fewer nodes, so it holds less KV at the same accuracy on this easy fake
    kv_a = sum(t.metadata["kv_tokens_mean"] for t in a)
    kv_b = sum(t.metadata["kv_tokens_mean"] for t in b)
    assert kv_b < kv_a
    assert sum(sum(t.metadata["retained"]) for t in b) < sum(sum(t.metadata["retained"]) for t in a)
    assert _accuracy(b) >= _accuracy(a) - 0.2


# ---------------------------------------------------------------------- beam lookahead
def test_lookahead_with_a_greedy_wrong_policy_misleads_the_beam() -> None:
    problems = generate_problems(20, 4, seed=7)
    # q = 0.25: greedy always writes the wrong (+1) line. A one-step greedy rollout from any candidate is wrong,
    # so every extended path scores min(…, 0) = 0 until the rollout is the answer line, and ties go to the higher
    # logprob: the wrong line (log 0.75 > log 0.25). The beams fill with wrong steps and the answer is wrong:
    # accuracy ≈ 0. Without lookahead the same beam scores ≥ 0.9 (tests/test_search.py).
    trees = beam_search(problems, StepBandit(problems), STEPS, 8000, beam_width=2, expansions=16, lookahead=1)
    assert _accuracy(trees) <= 0.1
    plain = beam_search(problems, StepBandit(problems), STEPS, 8000, beam_width=2, expansions=16)
    assert _accuracy(plain) >= 0.9


def test_lookahead_rollouts_are_scored_kept_out_and_paid_for() -> None:
    problems = generate_problems(5, 4, seed=3)
    policy = StepBandit(problems, q=0.6)
    trees = beam_search(problems, policy, STEPS, 3000, beam_width=2, expansions=4, lookahead=1)
    # per depth: the candidates, then one greedy step for each non-terminal one. Depth 0: 5 × 4 and 20 rollouts;
    # depths 1-3: 5 × 2 × 4 and 40 rollouts (at depth 3 the rollouts are answer lines); depth 4: the answer lines
    # are terminal, no rollout
    assert policy.calls == [20, 20] + [40, 40] * 3 + [40]
    for t in trees:
        assert t.generated_tokens == t.ledger["generated"] <= 3000  # rollout tokens count
        for n in t.nodes[1:]:
            parent = t.nodes[n.parent]  # type: ignore[index]
            if parent.metadata.get("lookahead"):
                assert n.metadata.get("lookahead")  # nothing but rollouts grows from a rollout node
            if "lookahead_tip" in n.metadata:
                tip = t.nodes[n.metadata["lookahead_tip"]]
                assert tip.parent == n.id and tip.metadata["lookahead"] and n.value == tip.value
        assert not t.nodes[t.chosen].metadata.get("lookahead")  # type: ignore[index]


@settings(max_examples=15, deadline=None)
@given(budget=st.integers(48, 700), k=st.integers(0, 2), width=st.integers(1, 3))
def test_beam_lookahead_and_dvts_never_exceed_budget(budget: int, k: int, width: int) -> None:
    problems = generate_problems(3, [2, 4], seed=budget)
    if budget >= 24 * (1 + k):
        for t in beam_search(problems, StepBandit(problems), STEPS, budget, beam_width=width, lookahead=k):
            assert t.generated_tokens == t.ledger["generated"] <= budget
            t.validate()
        for t in dvts(problems, StepBandit(problems), STEPS, budget, n=2 * width, expansions=2, lookahead=k):
            assert t.generated_tokens == t.ledger["generated"] <= budget
            t.validate()
    else:
        with pytest.raises(SearchError, match="lookahead"):
            beam_search(problems, StepBandit(problems), STEPS, budget, lookahead=k)


# ---------------------------------------------------------------------- shared contract
ALGORITHMS: dict[str, Callable[..., list[Tree]]] = {
    "dvts": partial(dvts, n=4, expansions=2),
    "rebase": partial(rebase, width=4),
    "ets": partial(ets, width=4, lambda_c=2.0),
    "beam_lookahead": partial(beam_search, beam_width=2, expansions=2, lookahead=1),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_same_seed_same_trees_whatever_the_batching(name: str) -> None:
    algorithm = ALGORITHMS[name]
    problems = generate_problems(5, [2, 3], seed=11)
    together = algorithm(problems, StepBandit(problems, q=0.4), STEPS, 500, seed=5)
    apart = [t for p in problems for t in algorithm([p], StepBandit(problems, q=0.4), STEPS, 500, seed=5)]
    assert [t.to_dict()["nodes"] for t in together] == [t.to_dict()["nodes"] for t in apart]
    assert [t.chosen for t in together] == [t.chosen for t in apart]
    other = algorithm(problems, StepBandit(problems, q=0.4), STEPS, 500, seed=6)
    assert [t.to_dict()["nodes"] for t in together] != [t.to_dict()["nodes"] for t in other]


def _golden_view(tree: Tree) -> dict[str, Any]:
    fields = ("id", "parent", "text", "value", "visits", "terminal", "answer", "metadata")
    return {
        "chosen": tree.chosen,
        "answer": tree.answer,
        "nodes": [{k: n[k] for k in fields} for n in tree.to_dict()["nodes"]],
    }


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_golden_tree(name: str) -> None:
    problems = generate_problems(1, 2, seed=21)
    [tree] = ALGORITHMS[name](problems, StepBandit(problems, q=0.5), STEPS, 400, seed=3)
    got = _golden_view(tree)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TREEWARD_REGOLD") == "1":
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    assert got == json.loads(path.read_text())


class _Raises:
    name = "raises"

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        raise RuntimeError("scorer exploded")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_failing_scorer_is_recorded_not_fatal(name: str) -> None:
    problems = generate_problems(2, 2, seed=0)
    with pytest.warns(RuntimeWarning, match="scorer exploded"):
        trees = ALGORITHMS[name](problems, StepBandit(problems), _Raises(), 600)
    assert all(n.status == "exec_error" for t in trees for n in t.nodes[1:])  # rollouts and candidates alike
    assert all(t.chosen is not None for t in trees)  # unscored paths still end and are voted on


def test_bad_knobs_are_clear_errors() -> None:
    problems = generate_problems(2, 2, seed=0)
    policy = StepBandit(problems)
    with pytest.raises(SearchError, match="multiple of expansions"):
        dvts(problems, policy, STEPS, 500, n=6, expansions=4)
    with pytest.raises(SearchError, match="width"):
        rebase(problems, policy, STEPS, 500, width=0)
    with pytest.raises(SearchError, match="softmax_temperature"):
        rebase(problems, policy, STEPS, 500, softmax_temperature=0.0)
    with pytest.raises(SearchError, match="lambda_c"):
        ets(problems, policy, STEPS, 500, lambda_c=-1.0)
    with pytest.raises(SearchError, match="similarity"):
        ets(problems, policy, STEPS, 500, similarity=0.0)
    with pytest.raises(SearchError, match="lookahead"):
        beam_search(problems, policy, STEPS, 500, lookahead=-1)
    with pytest.raises(SearchError, match="smaller than one step's cap"):
        rebase(problems, policy, STEPS, 10)
    with pytest.raises(SearchError, match="2-step lookahead"):
        dvts(problems, policy, STEPS, 50, lookahead=2)
