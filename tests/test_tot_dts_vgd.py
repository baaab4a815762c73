"""Tree of Thoughts (BFS, DFS), DTS / DTS* and value-guided decoding (VAS, VED) against fakes whose right answer is
known, with the expected numbers derived by hand in comments."""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import CharPolicy, StepBandit
from treeward.rewards.base import RewardResult, Sample, Status
from treeward.search.core import SearchError, grade
from treeward.search.dts import TiltedDraw, dts, dts_star, greedy_child, tilted_probabilities
from treeward.search.ops import soft_backup, uniform_weights
from treeward.search.tot import tot_bfs, tot_dfs
from treeward.search.vgd import ValueAugmentedPick, sibling_spread, vas_decode, ved_decode
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Node, Problem, Tree

STEPS = ArithmeticSteps()
GOLDEN = Path(__file__).parent / "golden"

ALGORITHMS: dict[str, Callable[..., list[Tree]]] = {
    "tot_bfs": tot_bfs,
    "tot_dfs": tot_dfs,
    "dts": dts,
    "dts_star": dts_star,
    "vas": vas_decode,
    "ved": ved_decode,
}
# small knobs so that the fakes' trees stay small; rollout caps fit the StepBandit solutions (≤ 100 characters)
KNOBS: dict[str, dict[str, Any]] = {
    "tot_bfs": {"breadth": 2, "samples": 3},
    "tot_dfs": {"samples": 3},
    "dts": {"max_children": 2, "max_rollouts": 12, "max_tokens": 100},
    "dts_star": {"max_children": 2, "max_rollouts": 12, "max_tokens": 100},
    "vas": {"samples": 3},
    "ved": {"width": 2, "probe": 2, "extra": 2},
}


def _accuracy(trees: list[Tree]) -> float:
    grade(trees, ArithmeticAnswer())
    return sum(bool(t.correct) for t in trees) / len(trees)


# ---------------------------------------------------------------------- fakes
class _CharPolicy(CharPolicy):
    """The fakes below: prompt ``"Q\\n"``, no BOS; subclasses say which lines follow the lines written so far
    (``next_lines(done, seed, whole)``)."""

    prompt = "Q\n"

    def lines(self, text: str, seed: int, j: int, *, greedy: bool, whole: bool) -> list[tuple[str, float]]:
        done = tuple(ln + "\n" for ln in text[len(self.prompt) :].split("\n")[:-1])
        return self.next_lines(done, seed * 7919 + j, whole)

    def next_lines(self, done: tuple[str, ...], seed: int, whole: bool) -> list[tuple[str, float]]:
        """(line, probability) of the next line, or of every line to the answer when ``whole``."""
        raise NotImplementedError


class TwoBranch(_CharPolicy):
    """Step "A" with probability ``p_a``, else step "B"; then "Answer: a" after A, "Answer: b" after B."""

    def __init__(self, p_a: float) -> None:
        super().__init__()
        self.p_a = p_a

    def next_lines(self, done: tuple[str, ...], seed: int, whole: bool) -> list[tuple[str, float]]:
        if done:
            return [(f"Answer: {done[0][0].lower()}", 1.0)]
        a = random.Random(seed).random() < self.p_a
        step = ("A\n", self.p_a) if a else ("B\n", 1 - self.p_a)
        return [step, (f"Answer: {step[0][0].lower()}", 1.0)] if whole else [step]


class Scripted(_CharPolicy):
    """Each prefix has a list of next lines; the k-th request of a prefix gets the (k mod len)-th line."""

    def __init__(self, script: dict[tuple[str, ...], list[str]]) -> None:
        super().__init__()
        self.script = script
        self.served: dict[tuple[str, ...], int] = defaultdict(int)

    def next_lines(self, done: tuple[str, ...], seed: int, whole: bool) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        while True:
            options = self.script[done]
            line = options[self.served[done] % len(options)]
            self.served[done] += 1
            out.append((line, 1.0 / len(options)))
            if line.startswith("Answer") or not whole:
                return out
            done = (*done, line)


class LineTable:
    """Process scorer for scripted trees: a line's score from a table; the path score is the minimum."""

    name = "line_table"

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            scores = tuple(self.table[line] for line in s.steps)
            out.append(RewardResult(min(scores), step_scores=scores))
        return out


class AnswerTable:
    """Outcome scorer: the reward of a finished path's answer from a table; partial paths are not applicable."""

    name = "answer_table"

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            ans = s.response.rsplit("Answer: ", 1)[-1] if "Answer: " in s.response else None
            if s.partial or ans is None:
                out.append(RewardResult(None, Status.NOT_APPLICABLE))
            else:
                out.append(RewardResult(self.table[ans]))
        return out


def _problems(n: int) -> list[Problem]:
    return [Problem(f"p{i}", "Q\n") for i in range(n)]


# ---------------------------------------------------------------------- Tree of Thoughts
DEAD_END = {
    (): ["a\n", "b\n"],
    ("a\n",): ["a1\n", "a2\n"],
    ("b\n",): ["Answer: 7"],
    ("a\n", "a1\n"): ["Answer: 1"],
    ("a\n", "a2\n"): ["Answer: 2"],
}
DEAD_END_SCORES = {
    "a\n": 0.9,
    "b\n": 0.6,
    "a1\n": 0.1,
    "a2\n": 0.1,
    "Answer: 7": 1.0,
    "Answer: 1": 1,
    "Answer: 2": 1,
}


def test_tot_dfs_backtracks_out_of_a_dead_end() -> None:
    policy = Scripted(DEAD_END)
    [tree] = tot_dfs(_problems(1), policy, LineTable(DEAD_END_SCORES), 200, samples=2, threshold=0.5)
    # round 0 expands the root: a (0.9) and b (0.6) both pass 0.5; a is tried first (higher value).
    # round 1 expands a: a1 and a2 score min(0.9, 0.1) = 0.1 < 0.5, both pruned: a's subtree is a dead end.
    # round 2 pops b, whose parent (the root) is not the node expanded last (a): one backtrack. b's two samples are
    # "Answer: 7", path value min(0.6, 1.0) = 0.6 ≥ 0.5: solved.
    assert tree.answer == "7"
    assert tree.metadata["expansions"] == 3 and tree.metadata["backtracks"] == 1
    assert tree.metadata["solved"] and tree.metadata["stopped"] == "solved"
    assert [n.text for n in tree.path(tree.chosen)[1:]] == ["b\n", "Answer: 7"]
    # tokens: "a\n" 2 + "b\n" 2 + "a1\n" 3 + "a2\n" 3 + 2 × ("Answer: 7" 9 + EOS) = 30
    assert tree.generated_tokens == 30 == tree.ledger["generated"]
    assert policy.calls == [2, 2, 2]  # one engine call per round, 2 samples each
    # with no backtrack allowed the search stops before b: no terminal was ever seen, so no answer
    [tree] = tot_dfs(
        _problems(1), Scripted(DEAD_END), LineTable(DEAD_END_SCORES), 200, samples=2, max_backtracks=0
    )
    assert tree.chosen is None and tree.metadata["stopped"] == "max_backtracks"


def test_tot_dfs_rounds_batch_every_live_problem() -> None:
    problems = generate_problems(6, 3, seed=4)
    policy = StepBandit(problems, q=0.5)
    trees = tot_dfs(problems, policy, STEPS, 2000, samples=4)
    # every round sends one expansion per live problem, in one call: as many calls as the longest search had
    # expansions, and a call's rows are 4 × (problems still searching)
    expansions = [t.metadata["expansions"] for t in trees]
    assert len(policy.calls) == max(expansions)
    assert policy.calls == [4 * sum(e > r for e in expansions) for r in range(max(expansions))]


def test_tot_bfs_keeps_the_best_states_and_finds_what_sampling_misses() -> None:
    problems = generate_problems(20, 4, seed=7)
    policy = StepBandit(problems)
    # breadth 2, 16 samples per state: a step is lost only if all 16 samples of both states are wrong,
    # ≤ 0.75**16 ≈ 0.010, so a 4-step problem is solved with probability ≥ (1 - 0.010)**4 ≈ 0.96
    trees = tot_bfs(problems, policy, STEPS, 4000, breadth=2, samples=16)
    assert _accuracy(trees) >= 0.9
    # depths 0..3 write the steps, depth 4 the answer line: one call per depth for all 20 problems
    assert policy.calls == [20 * 16] + [20 * 2 * 16] * 4


def test_tot_bfs_threshold_prunes_states() -> None:
    # breadth 1: the root's children a (0.9) and b (0.6); a is kept; a's children score 0.1. With threshold 0.5
    # they are pruned, nothing is left and the search ends without an answer; without it, a1 goes on to answer
    scorer = LineTable(DEAD_END_SCORES)
    [pruned] = tot_bfs(_problems(1), Scripted(DEAD_END), scorer, 200, breadth=1, samples=2, threshold=0.5)
    assert pruned.chosen is None and pruned.metadata["finished"] == 0
    [kept] = tot_bfs(_problems(1), Scripted(DEAD_END), scorer, 200, breadth=1, samples=2)
    assert kept.answer in ("1", "2") and kept.nodes[kept.chosen].value == pytest.approx(0.1)


# ---------------------------------------------------------------------- DTS and DTS*
def _tilted_mass(tree: Tree, text: str, lam: float) -> float:
    """Probability that a draw from the final tree takes a root child with this text (the tree's sample law)."""
    kids = tree.children(0)
    p = tilted_probabilities(kids, lam)
    return float(sum(pi for pi, k in zip(p, kids, strict=True) if k.text == text))


def test_dts_sample_converges_to_the_tilted_distribution() -> None:
    # Two branches: A with p = 0.25 and reward 1, B with p = 0.75 and reward 0. With λ = ln 3 the target is
    #   π(A) = 0.25·e^{λ} / (0.25·e^{λ} + 0.75·e^0) = 0.75 / (0.75 + 0.75) = 0.5.
    lam = math.log(3)
    scorer = AnswerTable({"a": 1.0, "b": 0.0})
    # With a fixed cap of 4 children the root's children are 4 draws, n ~ Binomial(4, 0.25) of them A; values are
    # exact (every path below a child ends with the same reward), so a draw takes A with probability
    # 3n / (3n + 4 - n). Over n = 0..4 (probabilities .3164, .4219, .2109, .0469, .0039):
    #   E = .4219·3/6 + .2109·6/8 + .0469·9/10 + .0039·1 = .2109 + .1582 + .0422 + .0039 = 0.415:
    # a finite set of children biases the sample away from the target.
    trees = dts(_problems(200), TwoBranch(0.25), scorer, 10_000, inverse_temperature=lam, max_rollouts=8)
    assert all(len(t.children(0)) == 4 for t in trees)
    fixed = float(np.mean([_tilted_mass(t, "A\n", lam) for t in trees]))
    assert fixed == pytest.approx(0.415, abs=0.065)  # 3 standard errors: per-problem sd 0.31 / sqrt(200)
    # Progressive widening (⌈2·N^0.5⌉ children) lets the root keep drawing children: after 200 rollouts it has 29,
    # and the bias shrinks: E[3n / (2n + 29)] over n ~ Bin(29, 0.25) is 0.488 (per-problem sd 0.11, so the mean
    # over 100 problems has a standard error of 0.011).
    trees = dts(
        _problems(100),
        TwoBranch(0.25),
        scorer,
        100_000,
        inverse_temperature=lam,
        max_children=2,
        widening=0.5,
        max_rollouts=200,
    )
    assert all(len(t.children(0)) == 29 for t in trees)
    widened = float(np.mean([_tilted_mass(t, "A\n", lam) for t in trees]))
    assert widened == pytest.approx(0.488, abs=0.035)
    assert abs(widened - 0.5) < abs(fixed - 0.5)
    # the answers DTS returns are those draws: about half are "a"
    assert np.mean([t.answer == "a" for t in trees]) == pytest.approx(0.5, abs=0.15)


def _three_leaves() -> Scripted:
    """Step A (p 1/2) leads to an x leaf 3 times in 4 and to a y leaf once; step B (p 1/2) always to a z leaf."""
    return Scripted(
        {
            (): ["A\n", "B\n"],
            ("A\n",): ["Answer: x", "Answer: x", "Answer: x", "Answer: y"],
            ("B\n",): ["Answer: z"],
        }
    )


def test_dts_star_greedy_finds_the_max_reward_leaf() -> None:
    # Hand-built: the greedy rule takes the highest soft value, ties to the less visited child, then the earlier.
    t = Tree.new(Problem("g", "Q\n"), [1])
    for v, n in [(0.5, 3), (0.9, 2), (0.9, 1), (None, 0)]:
        t.add(0, text="s", token_ids=[5], value=v, visits=n)
    assert greedy_child(t, t.children(0), 1.0, np.random.default_rng(0)).id == 3
    # The search, rewards x = 0.6, y = 0.9, z = 0.5, 4 children per node, λ = 10. Rollouts 1-4 fill the root
    # with A→x, B→z, A→x, B→z (the script alternates). Rollout 5: greedy takes the first A (0.6 > 0.5; the two A
    # tie, both once visited) and, A having 1 child of 4, rolls out from it: x. Rollout 6: the second A (same
    # value, fewer visits): y. Its soft value becomes log((e^6 + e^9) / 2) / 10 = 0.831 and greedy stays in A's
    # subtree; the B steps never get a second child. The answer is the best leaf found: y.
    scorer = AnswerTable({"x": 0.6, "y": 0.9, "z": 0.5})
    [tree] = dts_star(
        _problems(1), _three_leaves(), scorer, 10_000, inverse_temperature=10.0, max_rollouts=12
    )
    assert tree.answer == "y" and tree.nodes[tree.chosen].value == 0.9
    second_a = [k for k in tree.children(0) if k.text == "A\n"][1]
    assert tree.children(second_a.id)[1].answer == "y"
    assert all(len(tree.children(k.id)) == 1 for k in tree.children(0) if k.text == "B\n")
    # DTS with λ = 10 samples instead: it too ends with y in the tree, but its answer is a draw, not the max
    [sampled] = dts(_problems(1), _three_leaves(), scorer, 10_000, inverse_temperature=10.0, max_rollouts=12)
    assert sampled.chosen is not None and sampled.answer in ("x", "y", "z")


def test_dts_runs_one_rollout_per_problem_per_engine_call() -> None:
    problems = generate_problems(5, 3, seed=8)
    policy = StepBandit(problems, q=0.5)
    trees = dts_star(problems, policy, STEPS, 5000, max_children=4, max_rollouts=6, max_tokens=100)
    # with 4 children allowed per node, no descent reaches a terminal within 6 iterations (the root fills first,
    # then its children's chains): every iteration is one call with one whole-solution row per problem
    assert policy.calls == [5] * 6
    assert all(t.metadata["rollouts"] == 6 and t.root.visits == 6 for t in trees)
    assert all(len(t.children(0)) == 4 for t in trees)


def _slow_soft_value(tree: Tree, node: Node, lam: float) -> float | None:
    """Reference: recompute a node's soft value from the leaves, recursively, with plain Python."""
    if node.terminal:
        return node.value if node.visits > 0 else None
    vals = [_slow_soft_value(tree, k, lam) for k in tree.children(node.id)]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return math.log(sum(math.exp(lam * v) for v in vals) / len(vals)) / lam


@settings(max_examples=12, deadline=None)
@given(
    budget=st.integers(100, 1500),
    k=st.integers(1, 4),
    lam=st.sampled_from([0.5, 1.0, 4.0]),
    widening=st.sampled_from([0.0, 0.5]),
    greedy=st.booleans(),
)
def test_dts_values_and_visits_match_a_slow_recomputation(
    budget: int, k: int, lam: float, widening: float, greedy: bool
) -> None:
    problems = generate_problems(3, [1, 2], seed=budget)
    algo = dts_star if greedy else dts
    trees = algo(
        problems,
        StepBandit(problems, q=0.5),
        STEPS,
        budget,
        inverse_temperature=lam,
        max_children=k,
        widening=widening,
        max_rollouts=30,
        max_tokens=100,
    )
    for t in trees:
        assert t.generated_tokens <= budget
        # every rollout (and every revisit of a terminal) is one simulation that passes through the root
        assert t.root.visits == t.metadata["rollouts"] + t.metadata["revisits"] - t.metadata["unscored"]
        for n in t.nodes:
            kids = t.children(n.id)
            if kids:  # a visit of a node continues into exactly one child
                assert n.visits == sum(c.visits for c in kids)
            slow = _slow_soft_value(t, n, lam)
            if n.id > 0 or slow is not None:
                assert n.value == pytest.approx(slow, rel=1e-9, abs=1e-12)


def test_uniform_soft_backup_by_hand_and_versus_the_visit_weighted_one() -> None:
    t = Tree.new(Problem("s", "Q\n"), [1])
    t.add(0, text="x", token_ids=[5], value=0.0, visits=1)
    t.add(0, text="y", token_ids=[6], value=1.0, visits=3)
    t.add(0, text="z", token_ids=[7], value=None, visits=0)  # an unscored rollout: left out of both averages
    uniform = soft_backup(1.0, weights=uniform_weights)  # the backup DTS and DTS* use
    # uniform over the two children: log((e^0 + e^1) / 2) = log(1.859) = 0.620
    assert uniform(t, t.root, 0.0) == pytest.approx(math.log((1 + math.e) / 2))
    # visit-weighted (the default): log((1·1 + 3·e) / 4) = log(2.289) = 0.828
    assert soft_backup(1.0)(t, t.root, 0.0) == pytest.approx(math.log((1 + 3 * math.e) / 4))
    # a leaf keeps the leaf value; λ → large approaches the max
    assert uniform(t, t.nodes[1], 0.3) == 0.3
    assert soft_backup(200.0, weights=uniform_weights)(t, t.root, 0.0) == pytest.approx(1.0, abs=0.01)
    assert uniform.__name__ == "soft_backup(λ=1, uniform_weights)"
    assert _backup_name(dts) == uniform.__name__
    with pytest.raises(ValueError):
        soft_backup(0.0, weights=uniform_weights)


def _backup_name(algo: Callable[..., list[Tree]]) -> str:
    """The backup rule a DTS search records in its trees' metadata."""
    problems = generate_problems(1, 1, seed=0)
    [t] = algo(problems, StepBandit(problems), STEPS, 200, max_rollouts=1, max_tokens=100)
    return str(t.metadata["backup"])


def test_tilted_draw_is_seeded_and_follows_the_values() -> None:
    t = Tree.new(Problem("d", "Q\n"), [1])
    t.add(0, text="A", token_ids=[5], value=1.0, visits=1, terminal=True, answer="a")
    t.add(0, text="B", token_ids=[6], value=0.0, visits=1, terminal=True, answer="b")
    t.add(
        0, text="C", token_ids=[7], value=None, visits=0, terminal=True, answer="c"
    )  # unscored: never drawn
    # probabilities e^λ / (e^λ + 1) and 1 / (e^λ + 1); λ = ln 4 → 0.8 and 0.2
    assert tilted_probabilities(t.children(0), math.log(4)) == pytest.approx([0.8, 0.2, 0.0])
    draws = [TiltedDraw(math.log(4), seed)(t, []) for seed in range(400)]
    assert np.mean([d.answer == "a" for d in draws]) == pytest.approx(0.8, abs=0.06)  # sd 0.02
    assert TiltedDraw(1.0, 5)(t, []) is TiltedDraw(1.0, 5)(t, [])


# ---------------------------------------------------------------------- value-guided decoding
def test_vas_beta_trades_the_policy_against_the_value() -> None:
    problems = generate_problems(40, 4, seed=2)
    # β = 0: the candidate with the highest mean token logprob, which in StepBandit is always the wrong line
    # (probability 0.75 > 0.25): like greedy decoding, it never solves a problem.
    zero = vas_decode(problems, StepBandit(problems), STEPS, 2000, samples=8, beta=0.0)
    assert _accuracy(zero) == 0.0
    # β = 10: the value decides (a right step scores 1, a wrong one 0). A step goes wrong only when all 8 samples
    # are wrong, 0.75**8 = 0.10, so a 4-step problem is solved with probability 0.9**4 = 0.66 (sd over 40: 0.075).
    high = vas_decode(problems, StepBandit(problems), STEPS, 2000, samples=8, beta=10.0)
    assert 0.4 <= _accuracy(high) <= 0.9
    assert all(t.metadata["finished"] == 1 for t in high)
    sampled = vas_decode(problems, StepBandit(problems), STEPS, 2000, samples=8, beta=10.0, stochastic=True)
    assert _accuracy(sampled) >= 0.4  # exp(10) vs exp(0): the sampled pick almost always takes a right step


def test_value_augmented_pick_by_hand() -> None:
    t = Tree.new(Problem("v", "Q\n"), [1])
    a = t.add(0, text="a", token_ids=[5, 6], logprobs=[-1.0, -1.0], value=0.5)  # mean logprob -1
    b = t.add(0, text="b", token_ids=[7], logprobs=[-0.2], value=0.0)  # mean logprob -0.2
    c = t.add(0, text="c", token_ids=[8], logprobs=[-0.1], value=None)  # unscored: -inf
    rng = np.random.default_rng(0)
    # β = 1: a = -1 + 0.5 = -0.5; b = -0.2 → b.  β = 2: a = 0.0 > b = -0.2 → a
    assert ValueAugmentedPick(1.0)(t, [a, b, c], 1, rng) == [b]
    assert ValueAugmentedPick(2.0)(t, [a, b, c], 1, rng) == [a]
    assert ValueAugmentedPick(2.0).scores([a, b, c]) == pytest.approx([0.0, -0.2, -math.inf])


def test_ved_spends_extra_samples_only_at_decisive_nodes() -> None:
    problems = generate_problems(10, 4, seed=5)
    trees = ved_decode(
        problems, StepBandit(problems, q=0.5), STEPS, 4000, width=2, probe=2, extra=3, n_decisive=1
    )
    extra_nodes = 0
    for t in trees:
        per_depth: dict[int, int] = defaultdict(int)
        for n in t.nodes:
            kids = t.children(n.id)
            assert len(kids) in (0, 2, 5)  # probe only, or probe + extra
            if len(kids) == 5:
                # the first two (the probe) disagreed: one right (1.0), one wrong (0.0)
                assert sibling_spread([k.value for k in kids[:2]]) == pytest.approx(0.5)
                per_depth[n.depth] += 1
        assert all(v <= 1 for v in per_depth.values())  # n_decisive = 1 per problem and depth
        extra_nodes += sum(per_depth.values())
        assert t.metadata["decisive_nodes"] == sum(per_depth.values())
    assert extra_nodes > 0
    assert sibling_spread([1.0]) == 0.0 and sibling_spread([0.0, 1.0]) == 0.5


# ---------------------------------------------------------------------- shared contract
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_same_seed_same_trees_whatever_the_batching(name: str) -> None:
    algo, knobs = ALGORITHMS[name], KNOBS[name]
    problems = generate_problems(4, [2, 3], seed=11)
    together = algo(problems, StepBandit(problems, q=0.5), STEPS, 500, seed=5, **knobs)
    apart = [t for p in problems for t in algo([p], StepBandit(problems, q=0.5), STEPS, 500, seed=5, **knobs)]
    assert [t.to_dict() for t in together] == [t.to_dict() for t in apart]
    other = algo(problems, StepBandit(problems, q=0.5), STEPS, 500, seed=6, **knobs)
    assert [t.to_dict()["nodes"] for t in together] != [t.to_dict()["nodes"] for t in other]


@settings(max_examples=8, deadline=None)
@given(
    budget=st.integers(100, 900), name=st.sampled_from(sorted(ALGORITHMS)), q=st.sampled_from([0.25, 0.75])
)
def test_budgets_are_never_exceeded(budget: int, name: str, q: float) -> None:
    problems = generate_problems(3, [1, 4], seed=budget)
    trees = ALGORITHMS[name](problems, StepBandit(problems, q=q), STEPS, budget, **KNOBS[name])
    for t in trees:
        assert t.generated_tokens <= budget
        assert t.ledger["generated"] == t.generated_tokens
        t.validate()


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_bad_knobs_and_budgets_are_clear_errors(name: str) -> None:
    algo = ALGORITHMS[name]
    problems = generate_problems(1, 2, seed=0)
    with pytest.raises(SearchError, match="positive"):
        algo(problems, StepBandit(problems), STEPS, 0)
    with pytest.raises(SearchError, match="smaller than one"):
        algo(problems, StepBandit(problems), STEPS, 10)
    bad = {
        "tot_bfs": {"breadth": 0},
        "tot_dfs": {"max_backtracks": -1},
        "dts": {"inverse_temperature": 0.0},
        "dts_star": {"widening": 2.0},
        "vas": {"samples": 0},
        "ved": {"extra": -1},
    }[name]
    with pytest.raises(SearchError):
        algo(problems, StepBandit(problems), STEPS, 1000, **bad)


class _Raises:
    name = "raises"

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        raise RuntimeError("scorer exploded")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_failing_scorer_is_recorded_not_fatal(name: str) -> None:
    problems = generate_problems(2, 2, seed=0)
    with pytest.warns(RuntimeWarning, match="scorer exploded"):
        trees = ALGORITHMS[name](problems, StepBandit(problems), _Raises(), 400, **KNOBS[name])
    for t in trees:
        scored = [n for n in t.nodes[1:] if n.status != "ok"]
        assert scored and all(n.status == "exec_error" and n.value in (None,) for n in scored)
        assert t.generated_tokens <= 400
        t.validate()


# ---------------------------------------------------------------------- golden trees
def _golden_view(tree: Tree) -> dict[str, Any]:
    keys = ("id", "parent", "text", "value", "visits", "terminal", "answer")
    return {
        "chosen": tree.chosen,
        "answer": tree.answer,
        "nodes": [{k: n[k] for k in keys} for n in tree.to_dict()["nodes"]],
    }


def _golden_trees() -> dict[str, Any]:
    problems = generate_problems(1, 2, seed=9)
    out: dict[str, Any] = {}
    for name in ("tot_bfs", "tot_dfs", "dts", "dts_star"):
        [tree] = ALGORITHMS[name](problems, StepBandit(problems, q=0.5), STEPS, 300, seed=7, **KNOBS[name])
        out[name] = _golden_view(tree)
    out["vgd"] = {
        name: _golden_view(ALGORITHMS[name](problems, StepBandit(problems, q=0.5), STEPS, 300, seed=7)[0])
        for name in ("vas", "ved")
    }
    return out


def _close(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 (soft values go through exp and log)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("name", ["tot_bfs", "tot_dfs", "dts", "dts_star", "vgd"])
def test_golden_tree(name: str) -> None:
    got = _golden_trees()[name]
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TREEWARD_REGOLD") == "1":
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    assert _close(got, json.loads(path.read_text()))
