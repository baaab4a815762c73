"""Best-of-N and beam search against a fake policy whose right answer is known (tests/fakes.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import StepBandit
from treeward import registry
from treeward.rewards.base import RewardResult, Sample, Status
from treeward.search import (
    SearchError,
    beam_search,
    best_of_n,
    best_score,
    majority_vote,
    weighted_vote,
)
from treeward.search.core import Budget, Request, expand, grade, init_trees
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Node, Problem, Tree

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


# ---------------------------------------------------------------------- draws of one node in one call
def _draws(requests: list[Request], *, salt: int = 0) -> list[list[tuple[int, ...]]]:
    """Token ids of each request's samples, in one expand call on fresh trees of three 3-step problems."""
    problems = generate_problems(3, 3, seed=2)
    policy = StepBandit(problems, q=0.5)
    trees = init_trees(problems, policy, "draws")
    budgets = [Budget(100_000) for _ in trees]
    new = expand(policy, trees, budgets, requests, temperature=1.0, seed=4, stop=None, salt=salt)
    return [[n.token_ids for n in nodes] for nodes in new]


def test_two_requests_for_one_node_in_one_call_draw_as_one_request() -> None:
    # Whole solutions of 3 steps, each step right with q = 0.5: 8 equally likely solutions per problem.
    # Requests of 3 and then 5 samples of problem 0's root in one call continue one sequence of draws: together
    # they are exactly the 8 samples of one request for 8; the request for problem 1 in between changes nothing.
    split = _draws([Request(0, 0, 3, 100), Request(1, 0, 2, 100), Request(0, 0, 5, 100)])
    whole = _draws([Request(0, 0, 8, 100), Request(1, 0, 2, 100)])
    assert split[0] + split[2] == whole[0] and split[1] == whole[1]
    # so the second request does not repeat the first one's draws (it would if each request started at draw 0):
    # P(5 draws repeat 3 given ones, all of them from 8 solutions) is (1/8)**3 ≈ 0.002; the seeds make it certain
    assert split[2][:3] != split[0]
    # a request's own salt is the call's salt for that request only
    assert _draws([Request(0, 0, 4, 100, salt=7)]) == _draws([Request(0, 0, 4, 100)], salt=7)
    assert (
        _draws([Request(0, 0, 4, 100, salt=7), Request(0, 0, 4, 100)])[1]
        == _draws([Request(0, 0, 4, 100)])[0]
    )
    # and a different salt draws anew: P(the same 4 solutions again) = (1/8)**4
    assert _draws([Request(0, 0, 4, 100, salt=7)]) != _draws([Request(0, 0, 4, 100)])


# ---------------------------------------------------------------------- scorer tokens in the ledger
class CountingPRM:
    """A model-based scorer stand-in: the exact step verifier's scores, and in ``info["scored_tokens"]`` what a
    PRM would run to score the sample (the prompt and the response, one token a character as in StepBandit)."""

    name = "counting_prm"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [
            replace(r, info={**r.info, "scored_tokens": len(s.prompt) + len(s.response)})
            for s, r in zip(samples, STEPS(samples), strict=True)
        ]


class BadCount:
    """A scorer that breaks the contract: ``scored_tokens`` must be a non-negative int."""

    name = "bad_count"

    def __init__(self, value: object) -> None:
        self.value = value

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [replace(r, info={"scored_tokens": self.value}) for r in STEPS(samples)]


P0 = Problem(
    "p0",
    "Q: Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. How many cards does Ann have?\n",
    "128",
    {"start": 54, "ops": [["*", 3], ["-", 34]]},
)


def test_scorer_tokens_are_booked_per_problem_by_hand() -> None:
    policy = StepBandit([P0], q=0.25)
    [tree] = best_of_n([P0], policy, CountingPRM(), 1000, n=1, temperature=0.0, max_tokens=100)
    # the prompt is 100 characters; greedy writes "Step 1: 54*3=163\n" (17) "Step 2: 163-34=130\n" (19)
    # "Answer: 130" (11; EOS is not text): the one scored path is 100 + 47 = 147 tokens
    assert tree.ledger["scored"] == 147
    assert policy.ledger.group("p0").scored == policy.ledger.total.scored == 147
    assert tree.summary()["ledger_scored"] == 147
    # a rule-based scorer reports none
    [plain] = best_of_n([P0], StepBandit([P0], q=0.25), STEPS, 1000, n=1, temperature=0.0, max_tokens=100)
    assert plain.ledger["scored"] == 0


def _every_step(t: Tree) -> list[Node]:
    return t.nodes[1:]


@pytest.mark.parametrize(
    ("search", "scored_nodes"),
    [(beam_search, _every_step), (best_of_n, Tree.terminals)],
    ids=["beam scores every step (score_paths)", "best_of_n scores whole samples (expand_and_score)"],
)
def test_scorer_tokens_match_a_recount_of_every_scored_path(
    search: Callable[..., list[Tree]], scored_nodes: Callable[[Tree], list[Node]]
) -> None:
    problems = generate_problems(3, [2, 3], seed=5)
    policy = StepBandit(problems, q=0.5)
    trees = search(problems, policy, CountingPRM(), 600, seed=1)
    for t in trees:
        # slow recount: every path the scorer saw cost its prompt plus its text
        paths = scored_nodes(t)
        expect = sum(len(t.problem.prompt) + len("".join(t.steps(n.id))) for n in paths)
        assert paths and t.ledger["scored"] == expect == policy.ledger.group(t.problem.id).scored
    assert policy.ledger.total.scored == sum(t.ledger["scored"] for t in trees)


@pytest.mark.parametrize("value", [-1, 1.5, "12", True, None])
def test_a_bad_scored_token_count_is_a_scorer_error(value: object) -> None:
    problems = generate_problems(2, 2, seed=0)
    policy = StepBandit(problems)
    with pytest.warns(RuntimeWarning, match="scored_tokens"):
        trees = beam_search(problems, policy, BadCount(value), 400)
    assert all(
        n.status == "exec_error" and "scored_tokens" in n.metadata["error"]
        for t in trees
        for n in t.nodes[1:]
    )
    assert policy.ledger.total.scored == 0 and all(t.ledger["scored"] == 0 for t in trees)


def test_grade_books_scorer_tokens_only_when_asked() -> None:
    [tree] = best_of_n([P0], StepBandit([P0], q=0.25), STEPS, 1000, n=1, temperature=0.0, max_tokens=100)
    policy = StepBandit([P0])
    grade([tree], CountingPRM())  # evaluation: not the search's compute, nothing booked
    assert policy.ledger.total.scored == 0
    grade([tree], CountingPRM(), ledger=policy.ledger)
    assert policy.ledger.group("p0").scored == 147  # the one terminal path, as above
    assert tree.nodes[tree.chosen].outcome == 0.0  # graded by the step verifier: the steps are wrong


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_every_algorithm_books_its_scorer_tokens(name: str) -> None:
    problems = generate_problems(2, 2, seed=3)
    policy = StepBandit(problems, q=0.5)
    entry = registry.get(name)
    knobs = registry.resolve_knobs(entry, defaults={"max_tokens": 100}, budget=512)
    trees = entry.fn(problems, policy, CountingPRM(), 512, seed=0, **knobs)
    for t in trees:
        # every algorithm scores at least one path, and a path costs at least its prompt (91 and 97 characters)
        assert t.ledger["scored"] >= len(t.problem.prompt)
        assert t.ledger["scored"] == policy.ledger.group(t.problem.id).scored
