"""Best-of-N and beam search against a fake policy whose right answer is known (tests/fakes.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import StepBandit
from treeward.rewards.base import RewardResult, Sample, Status
from treeward.search import (
    SearchError,
    beam_search,
    best_of_n,
    best_score,
    majority_vote,
    weighted_vote,
)
from treeward.search.core import grade
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Problem, Tree

STEPS = ArithmeticSteps()


def _accuracy(trees: list[Tree]) -> float:
    grade(trees, ArithmeticAnswer())
    return sum(bool(t.correct) for t in trees) / len(trees)


def test_greedy_token_count_and_answer_by_hand() -> None:
    p = Problem(
        "p0",
        "Q: Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. How many cards does Ann have?\n",
        "128",
        {"start": 54, "ops": [["*", 3], ["-", 34]]},
    )
    policy = StepBandit([p], q=0.25)
    [tree] = best_of_n([p], policy, STEPS, 1000, n=1, temperature=0.0, max_tokens=100)
    # greedy takes the likelier (wrong, +1) line each step and chains on from it:
    #   "Step 1: 54*3=163\n" 17 chars, "Step 2: 163-34=130\n" 19 chars, "Answer: 130" 11 chars + EOS = 12
    assert tree.steps(tree.chosen) == ["Step 1: 54*3=163\n", "Step 2: 163-34=130\n", "Answer: 130"]
    assert tree.generated_tokens == 17 + 19 + 12 == 48
    assert tree.ledger["generated"] == 48
    assert tree.answer == "130"
    # step rewards from the exact verifier: both steps wrong arithmetic, the answer repeats the last result
    assert [n.reward for n in tree.path(tree.chosen)[1:]] == [0.0, 0.0, 1.0]
    assert tree.nodes[tree.chosen].value == 0.0  # min of the step scores
    assert _accuracy([tree]) == 0.0


def test_beam_finds_what_sampling_and_greedy_miss() -> None:
    problems = generate_problems(20, 4, seed=7)
    # Beam, width 2, 16 samples per beam: a step is lost only if all 16 samples are wrong, 0.75**16 ≈ 0.010,
    # so a 4-step problem is solved with probability ≥ (1 - 0.010)**4 ≈ 0.96 (the answer line is always right).
    beam = beam_search(problems, StepBandit(problems), STEPS, 4000, beam_width=2, expansions=16)
    # Weighted BoN, n=8: a whole sample is right with probability 0.25**4 = 1/256; some sample of 8 in ≈ 3 %.
    bon = best_of_n(problems, StepBandit(problems), STEPS, 2000, n=8, aggregate=weighted_vote, max_tokens=100)
    # Greedy always takes the wrong line: 0 %.
    greedy = best_of_n(problems, StepBandit(problems), STEPS, 2000, n=1, temperature=0.0, max_tokens=100)
    assert _accuracy(beam) >= 0.9
    assert _accuracy(bon) <= 0.15
    assert _accuracy(greedy) == 0.0


def test_beam_batches_all_problems_into_one_call_per_depth() -> None:
    problems = generate_problems(5, 4, seed=3)
    policy = StepBandit(problems)
    trees = beam_search(problems, policy, STEPS, 2000, beam_width=2, expansions=4)
    # depths 0..3 write the four steps and depth 4 the answer line: 5 calls in all, whatever the problem count
    assert len(policy.calls) == 5
    # depth 0 expands each root 4 times; later depths expand 2 beams × 4 for each of the 5 problems
    assert policy.calls == [5 * 4] + [5 * 2 * 4] * 4
    assert all(t.chosen is not None for t in trees)


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(min_value=24, max_value=700), width=st.integers(1, 3), k=st.integers(1, 6))
def test_beam_never_exceeds_budget(budget: int, width: int, k: int) -> None:
    problems = generate_problems(3, [2, 4], seed=budget)
    policy = StepBandit(problems)
    trees = beam_search(problems, policy, STEPS, budget, beam_width=width, expansions=k, max_step_tokens=24)
    for t in trees:
        assert t.generated_tokens <= budget
        assert t.ledger["generated"] == t.generated_tokens
        t.validate()


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(min_value=100, max_value=900), n=st.integers(1, 12))
def test_bon_never_exceeds_budget(budget: int, n: int) -> None:
    problems = generate_problems(3, [1, 3], seed=n)
    trees = best_of_n(problems, StepBandit(problems), STEPS, budget, n=n, max_tokens=100)
    for t in trees:
        assert t.generated_tokens <= budget
        # a budget of B affords at least min(n, B // 100) samples of cap 100
        assert t.metadata["samples"] >= min(n, budget // 100)
        assert t.metadata["samples"] <= n


def test_bad_budgets_are_clear_errors() -> None:
    problems = generate_problems(2, 2, seed=0)
    with pytest.raises(SearchError, match="positive"):
        beam_search(problems, StepBandit(problems), STEPS, 0)
    with pytest.raises(SearchError, match="smaller than one step's cap"):
        beam_search(problems, StepBandit(problems), STEPS, 10, max_step_tokens=24)
    with pytest.raises(SearchError, match="smaller than one sample's cap"):
        best_of_n(problems, StepBandit(problems), STEPS, 50, max_tokens=100)
    with pytest.raises(SearchError, match="unique"):
        best_of_n([problems[0], problems[0]], StepBandit(problems), STEPS, 500)


def test_same_seed_same_trees_whatever_the_batching() -> None:
    problems = generate_problems(6, 3, seed=11)
    together = beam_search(problems, StepBandit(problems), STEPS, 600, seed=5)
    apart = [t for p in problems for t in beam_search([p], StepBandit(problems), STEPS, 600, seed=5)]
    assert [t.to_dict()["nodes"] for t in together] == [t.to_dict()["nodes"] for t in apart]
    other = beam_search(problems, StepBandit(problems), STEPS, 600, seed=6)
    assert [t.to_dict()["nodes"] for t in together] != [t.to_dict()["nodes"] for t in other]


class _Raises:
    name = "raises"

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        raise RuntimeError("scorer exploded")


class _NotApplicable:
    name = "nothing"

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        return [RewardResult(None, Status.TIMEOUT) for _ in samples]


def test_failing_scorer_is_recorded_not_fatal() -> None:
    problems = generate_problems(2, 2, seed=0)
    with pytest.warns(RuntimeWarning, match="scorer exploded"):
        trees = beam_search(problems, StepBandit(problems), _Raises(), 400)
    scored = [n for t in trees for n in t.nodes[1:]]
    assert scored and all(n.status == "exec_error" and n.value is None for n in scored)
    trees = beam_search(problems, StepBandit(problems), _NotApplicable(), 400)
    assert all(n.status == "timeout" for t in trees for n in t.nodes[1:])
    assert all(t.chosen is not None for t in trees)  # unscored paths still end, ranked by logprob


def _voting_tree() -> tuple[Tree, list]:
    """Five answered leaves under one root: answers a, a, b, b, c with path scores 0.2, 0.2, 0.9, 0.0, 0.95."""
    t = Tree.new(Problem("v", "Q?\n", "b"), [1])
    leaves = []
    for ans, val, lp in [
        ("a", 0.2, -1.0),
        ("a", 0.2, -2.0),
        ("b", 0.9, -3.0),
        ("b", 0.0, -0.5),
        ("c", 0.95, -9.0),
    ]:
        n = t.add(
            0, text=f"Answer: {ans}", token_ids=[5], logprobs=[lp], terminal=True, answer=ans, value=val
        )
        leaves.append(n)
    return t, leaves


def test_answer_rules_by_hand() -> None:
    t, leaves = _voting_tree()
    # naive: the single best path score, 0.95 → "c"
    assert best_score(t, leaves).answer == "c"
    # weighted: a = 0.2 + 0.2 = 0.4, b = 0.9 + 0.0 = 0.9, c = 0.95 → "c"
    assert weighted_vote(t, leaves).answer == "c"
    # majority: a and b both appear twice; the tie goes to the answer of the best path among them: b (0.9)
    assert majority_vote(t, leaves).answer == "b"
    # with c's leaf removed, weighted: a 0.4 vs b 0.9 → b, represented by its best path (value 0.9)
    chosen = weighted_vote(t, leaves[:4])
    assert chosen.answer == "b" and chosen.value == 0.9
    assert best_score(t, []) is None and majority_vote(t, []) is None
