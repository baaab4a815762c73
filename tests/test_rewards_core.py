"""Tests of the reward contract helpers, process reducers, composites and group transforms
(:mod:`treeward.rewards.base`, ``process``, ``compose``, ``group``).

The leaves are real rewards: the arithmetic task's exact verifiers and small per-sample functions written here
with :func:`treeward.rewards.reward`. Every expected number is worked out by hand in a comment first.
"""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeward.rewards import (
    Affine,
    AsyncReward,
    Cascade,
    Clip,
    ClipDeltaSteps,
    ClipSteps,
    DeltaSteps,
    DifficultyScale,
    Gate,
    GroupZScore,
    LastStep,
    Lexicographic,
    MaxOverReferences,
    MeanSteps,
    MinStep,
    ProcessReward,
    ProdSteps,
    Product,
    Rename,
    Reward,
    RewardResult,
    Sample,
    Status,
    SumSteps,
    Unlikeliness,
    WeightedSum,
    ascore,
    explain,
    from_config,
    registry_of,
    reward,
)
from treeward.rewards.base import FunctionReward, check_results, run_sync
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps
from treeward.tasks.arithmetic import format_prompt
from treeward.tree import Problem

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one arithmetic problem worked by hand (start 54; 54*3 = 162; 162-34 = 128; 128+15 = 143) and small
# module-level rewards (module level so that they pickle).
# ---------------------------------------------------------------------------------------------------------------
QUESTION = (
    "Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. Then Ann gets 15 more. "
    "How many cards does Ann have?"
)
PROBLEM = Problem(
    id="ann",
    prompt=format_prompt(QUESTION),
    answer="143",
    metadata={"question": QUESTION, "start": 54, "ops": [["*", 3], ["-", 34], ["+", 15]]},
)
RIGHT = "Step 1: 54*3=162\nStep 2: 162-34=128\nStep 3: 128+15=143\nAnswer: 143"
WRONG_STEP = "Step 1: 54*3=162\nStep 2: 162-34=129\nStep 3: 129+15=144\nAnswer: 144"
NO_ANSWER = "Step 1: 54*3=162"


def arith(response: str, *, group: str | None = "ann", **meta: object) -> Sample:
    return Sample(
        prompt=PROBLEM.prompt,
        response=response,
        reference=PROBLEM.answer,
        metadata={"problem": PROBLEM, **meta},
        group_id=group,
    )


@reward
def length_penalty(sample: Sample) -> float:
    """−(characters / 100): a length penalty."""
    return -len(sample.response) / 100


@reward(name="has_answer")
def has_answer(sample: Sample) -> float:
    """1.0 when the response has an ``Answer:`` line, else 0.0 (a format constraint)."""
    return 1.0 if "Answer:" in sample.response else 0.0


def _fixed(sample: Sample) -> float | None:
    """``metadata["x"]``: a reward whose value the test sets (None = not applicable)."""
    x = sample.metadata.get("x")
    return None if x is None else float(x)  # type: ignore[arg-type]


fixed = reward(_fixed, name="fixed")
fixed_b = reward(_fixed, name="fixed_b")


@reward
def fragile(sample: Sample) -> float:
    """Raises on a response that says "boom"; 0.5 otherwise."""
    if "boom" in sample.response:
        raise RuntimeError("boom")
    return 0.5


@reward
def returns_nan(sample: Sample) -> float:
    return math.nan


@reward
def returns_text(sample: Sample) -> str:
    return "oops"


@reward
async def slow_async(sample: Sample) -> float:
    await asyncio.sleep(0.3)
    return float(len(sample.response))


@reward
def timed_out(sample: Sample) -> RewardResult:
    """Always a timeout (a grader that never finishes)."""
    return RewardResult(None, Status.TIMEOUT, info={"reason": "grader timed out after 1 s"})


class Counting:
    """Wraps a reward and records every batch it is called on (to check what composites skip)."""

    def __init__(self, inner: Reward) -> None:
        self.inner = inner
        self.name = inner.name
        self.batches: list[list[str]] = []

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        self.batches.append([s.response for s in samples])
        return self.inner(samples)


class Stepped:
    """A fake PRM: ``step_scores`` taken from ``metadata["steps"]``; the score is their last value."""

    name = "stepped"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            steps = tuple(s.metadata.get("steps", ()))
            if not steps:
                out.append(RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no steps"}))
            else:
                out.append(RewardResult(steps[-1], step_scores=steps))
        return out


# ---------------------------------------------------------------------------------------------------------------
# reward(): per-sample functions as picklable batched rewards
# ---------------------------------------------------------------------------------------------------------------


def test_reward_decorator_names_scores_and_pickles() -> None:
    # length_penalty: "Answer: 143" has 11 characters → −0.11; has_answer → 1.0; NO_ANSWER → 0.0
    samples = [arith("Answer: 143"), arith(NO_ANSWER)]
    assert isinstance(length_penalty, Reward)
    assert length_penalty.name == length_penalty.__name__ == "length_penalty"
    assert has_answer.name == has_answer.__name__ == "has_answer"
    assert [r.score for r in length_penalty(samples)] == pytest.approx([-0.11, -0.16])
    assert [r.score for r in has_answer(samples)] == [1.0, 0.0]
    for r in (length_penalty, has_answer, fixed, slow_async):
        back = pickle.loads(pickle.dumps(r))
        assert isinstance(back, FunctionReward) and back.name == r.name and back.fn is r.fn
    assert [r.score for r in pickle.loads(pickle.dumps(has_answer))(samples)] == [1.0, 0.0]


def test_reward_none_and_result_passthrough() -> None:
    # metadata x=None → not applicable; a returned RewardResult is kept as is
    assert fixed([arith("a")])[0] == RewardResult(None, Status.NOT_APPLICABLE)
    assert fixed([arith("a", x=2)])[0] == RewardResult(2.0)
    assert timed_out([arith("a")])[0].status is Status.TIMEOUT


def test_reward_refuses_closures_lambdas_and_objects() -> None:
    def local(sample: Sample) -> float:
        return 1.0

    with pytest.raises(TypeError, match="closures cannot be pickled"):
        reward(local)
    with pytest.raises(TypeError, match="lambda"):
        reward(lambda s: 1.0)
    with pytest.raises(TypeError, match="module-level function"):
        reward(ArithmeticAnswer())  # type: ignore[arg-type]


def test_reward_crash_is_a_status_and_the_batch_goes_on() -> None:
    res = fragile([arith("fine"), arith("boom"), arith("fine")])
    assert [r.score for r in res] == [0.5, None, 0.5]
    assert res[1].status is Status.EXEC_ERROR
    assert res[1].info["reason"] == "RuntimeError: boom"
    nan = returns_nan([arith("x")])[0]
    assert nan.score is None and nan.status is Status.EXEC_ERROR and "non-finite" in nan.info["reason"]
    with pytest.raises(TypeError, match="returned str"):
        returns_text([arith("x")])


def test_async_function_reward_runs_concurrently_and_from_sync_code() -> None:
    # three samples of 0.3 s each: concurrent ≈ 0.3 s, sequential would be 0.9 s
    samples = [arith("ab"), arith("abc"), arith("abcd")]
    assert isinstance(slow_async, AsyncReward)
    t0 = time.perf_counter()
    assert [r.score for r in slow_async(samples)] == [2.0, 3.0, 4.0]
    assert time.perf_counter() - t0 < 0.75

    async def inside_a_loop() -> list[float | None]:
        # the synchronous entry point, called while an event loop runs in this thread
        return [r.score for r in slow_async(samples)]

    assert asyncio.run(inside_a_loop()) == [2.0, 3.0, 4.0]


def test_ascore_awaits_async_rewards_and_threads_sync_ones() -> None:
    seen: list[str] = []

    class RecordsThread:
        name = "records_thread"

        def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
            seen.append(threading.current_thread().name)
            return [RewardResult(1.0) for _ in samples]

    async def main() -> tuple[list[RewardResult], list[RewardResult]]:
        a, b = await asyncio.gather(ascore(RecordsThread(), [arith("x")]), ascore(slow_async, [arith("xy")]))
        return a, b

    a, b = asyncio.run(main())
    assert a[0].score == 1.0 and b[0].score == 2.0
    assert seen and seen[0] != threading.main_thread().name  # the sync reward did not block the loop's thread
    assert run_sync(ascore(ArithmeticAnswer(), [arith(RIGHT)]))[0].score == 1.0


def test_check_results_names_the_reward() -> None:
    class Short:
        name = "short"

        def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
            return []

    with pytest.raises(ValueError, match="'short' returned 0 results for 1 samples"):
        check_results(Short(), [arith("x")], Short()([arith("x")]))
    with pytest.raises(ValueError, match="'short' returned 0 results"):
        WeightedSum([(Short(), 1.0)])([arith("x")])


# ---------------------------------------------------------------------------------------------------------------
# process reducers and Gao et al.'s Clip / Delta
# ---------------------------------------------------------------------------------------------------------------
STEPS = [0.9, 0.2, 0.6, 0.8]


def test_simple_reducers_by_hand() -> None:
    # min 0.2; last 0.8; mean (0.9+0.2+0.6+0.8)/4 = 2.5/4 = 0.625; prod 0.9·0.2·0.6·0.8 = 0.0864; sum 2.5
    assert MinStep()(STEPS) == 0.2
    assert LastStep()(STEPS) == 0.8
    assert MeanSteps()(STEPS) == pytest.approx(0.625)
    assert ProdSteps()(STEPS) == pytest.approx(0.0864)
    assert SumSteps()(STEPS) == pytest.approx(2.5)


def test_clip_and_delta_by_hand() -> None:
    # Clip η=0.5: min(r−0.5, 0) = [min(0.4,0), min(−0.3,0), min(0.1,0), min(0.3,0)] = [0, −0.3, 0, 0]; sum −0.3
    assert ClipSteps(0.5).transform(STEPS) == pytest.approx([0.0, -0.3, 0.0, 0.0])
    assert ClipSteps(0.5)(STEPS) == pytest.approx(-0.3)
    # Delta: [0.9−0.2, 0.2−0.6, 0.6−0.8, 0 (last dropped)] = [0.7, −0.4, −0.2, 0]; sum 0.1 = r1 − r4 = 0.9 − 0.8
    assert DeltaSteps().transform(STEPS) == pytest.approx([0.7, -0.4, -0.2, 0.0])
    assert DeltaSteps()(STEPS) == pytest.approx(0.1)
    # keep_last: last step keeps 0.8; sum telescopes to r1 = 0.9
    assert DeltaSteps(keep_last=True).transform(STEPS) == pytest.approx([0.7, -0.4, -0.2, 0.8])
    assert DeltaSteps(keep_last=True)(STEPS) == pytest.approx(0.9)
    # Clip then Delta: c = [0, −0.3, 0, 0] → [0−(−0.3), −0.3−0, 0−0, 0] = [0.3, −0.3, 0, 0]; sum 0 = c1 − c4
    assert ClipDeltaSteps(0.5).transform(STEPS) == pytest.approx([0.3, -0.3, 0.0, 0.0])
    assert ClipDeltaSteps(0.5)(STEPS) == pytest.approx(0.0)


step_lists = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    steps=step_lists, extra=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), eta=st.floats(0.0, 1.0)
)
def test_refined_returns_are_bounded_whatever_the_padding(
    steps: list[float], extra: list[float], eta: float
) -> None:
    # Clip: every refined step ≤ 0, so the sum is ≤ 0 and appending steps never raises it
    assert ClipSteps(eta)(steps) <= 0.0
    assert ClipSteps(eta)(steps + extra) <= ClipSteps(eta)(steps) + 1e-12
    # Delta telescopes: Σ = r1 − rS (keep_last: r1), in [−1, 1] whatever the number of steps
    assert DeltaSteps()(steps + extra) == pytest.approx(steps[0] - extra[-1], abs=1e-9)
    assert DeltaSteps(keep_last=True)(steps + extra) == pytest.approx(steps[0], abs=1e-9)
    # repeating the same good step k times gains nothing under Delta
    assert DeltaSteps(keep_last=True)(steps + [steps[-1]] * len(extra)) == pytest.approx(steps[0], abs=1e-9)


def test_process_reward_on_the_exact_step_verifier() -> None:
    prm = ProcessReward(ArithmeticSteps(), reducer=MinStep())
    assert prm.name == "arithmetic_steps_min"
    right, wrong = prm([arith(RIGHT), arith(WRONG_STEP)])
    # RIGHT: 3 correct steps + a correct answer line → [1, 1, 1, 1], min 1
    assert right.score == 1.0 and right.step_scores == (1.0, 1.0, 1.0, 1.0)
    assert right.components == {"arithmetic_steps": 1.0, "arithmetic_steps/steps_correct": 4.0, "steps": 4.0}
    # WRONG_STEP: step 2 says 162−34 = 129 (it is 128) → 0; step 3 chains on what step 2 wrote (129+15 = 144 is
    # right from there) → 1; "Answer: 144" repeats the last result → 1. Vector [1, 0, 1, 1], min 0, mean 3/4
    assert wrong.score == 0.0 and wrong.step_scores == (1.0, 0.0, 1.0, 1.0)
    mean = ProcessReward(ArithmeticSteps(), reducer=MeanSteps())([arith(WRONG_STEP)])[0]
    assert mean.score == pytest.approx(0.75)


def test_process_reward_keeps_the_vector_and_shapes_into_info() -> None:
    r = ProcessReward(Stepped(), reducer=ClipSteps(0.5))([arith("x", steps=STEPS)])[0]
    assert r.score == pytest.approx(-0.3)
    assert r.step_scores == tuple(STEPS)  # the inner vector, unchanged
    assert r.info["shaped_steps"] == pytest.approx([0.0, -0.3, 0.0, 0.0])


def test_process_reward_missing_steps() -> None:
    prm = ProcessReward(Stepped())
    no_steps, hole = prm([arith("x"), arith("y", steps=[0.5, None, 0.7])])
    assert no_steps.score is None and no_steps.status is Status.NOT_APPLICABLE
    assert hole.score is None and hole.status is Status.NOT_APPLICABLE
    assert hole.info["reason"] == "stepped: step 2 of 3 has no score"


# ---------------------------------------------------------------------------------------------------------------
# composites
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_sum_by_hand_with_a_log_only_child() -> None:
    ws = WeightedSum([(ArithmeticAnswer(), 1.0), (length_penalty, 0.5), (has_answer, 0.0)])
    right, no_answer = ws([arith("Answer: 143"), arith(NO_ANSWER)])
    # "Answer: 143": answer 1.0, length −11/100 = −0.11 → 1.0 + 0.5·(−0.11) = 0.945; has_answer logged only
    assert right.score == pytest.approx(0.945)
    assert right.components == pytest.approx(
        {
            "arithmetic_answer": 1.0,
            "arithmetic_answer/answer": 1.0,
            "length_penalty": -0.11,
            "has_answer": 1.0,
        }
    )
    # NO_ANSWER (16 chars): ArithmeticAnswer scores 0.0 with status parse_error (a score, not a failure)
    # → 0.0 + 0.5·(−0.16) = −0.08
    assert no_answer.score == pytest.approx(-0.08)
    assert no_answer.status is Status.OK


def test_weighted_sum_failures_propagate_unless_tolerated() -> None:
    ws = WeightedSum([(fixed, 1.0), (fragile, 1.0)])
    boom = ws([arith("boom", x=1)])[0]
    assert boom.score is None and boom.status is Status.EXEC_ERROR
    assert boom.info["failed"] == "fragile" and boom.info["reason"].startswith("fragile: RuntimeError")
    # a weight-0 child may fail: the score is unaffected
    assert WeightedSum([(fixed, 2.0), (fragile, 0.0)])([arith("boom", x=1)])[0].score == 2.0
    # not applicable: a failure by default, skipped with skip_na (x=None → fixed is n/a; fixed_b... also n/a)
    na = arith("fine")
    assert WeightedSum([(fixed, 1.0), (fragile, 1.0)])([na])[0].status is Status.NOT_APPLICABLE
    assert WeightedSum([(fixed, 1.0), (fragile, 1.0)], skip_na=True)([na])[0].score == 0.5
    both_na = WeightedSum([(fixed, 1.0), (fixed_b, 1.0)], skip_na=True)([na])[0]
    assert both_na.score is None and both_na.status is Status.NOT_APPLICABLE


def test_gate_skips_then_on_failing_samples() -> None:
    then = Counting(ArithmeticAnswer())
    gate = Gate(has_answer, then, fail_score=-1.0)
    passed, failed = gate([arith("Answer: 143"), arith(NO_ANSWER)])
    assert passed.score == 1.0 and passed.info["decided_by"] == "arithmetic_answer"
    assert failed.score == -1.0 and failed.info["decided_by"] == "has_answer"
    assert failed.components == {"has_answer": 0.0}
    assert then.batches == [["Answer: 143"]]  # one batched call, only on the sample that passed


def test_lexicographic_first_failing_tier_decides() -> None:
    objective = Counting(length_penalty)
    tier2 = Counting(ArithmeticAnswer())
    lex = Lexicographic([has_answer, tier2], objective)
    # default fail scores for 2 tiers: [−2, −1]
    # NO_ANSWER fails tier 1 → −2; "Answer: 7" passes tier 1, fails tier 2 (wrong) → −1;
    # "Answer: 143" passes both → objective −11/100 = −0.11
    res = lex([arith(NO_ANSWER), arith("Answer: 7"), arith("Answer: 143")])
    assert [r.score for r in res] == pytest.approx([-2.0, -1.0, -0.11])
    assert tier2.batches == [["Answer: 7", "Answer: 143"]]
    assert objective.batches == [["Answer: 143"]]
    with pytest.raises(ValueError, match="2 fail scores for 1 tiers"):
        Lexicographic([has_answer], objective, fail_scores=[-1.0, -2.0])


def test_product_and_its_failures() -> None:
    # 0.5 × 0.4 = 0.2
    p = Product([fixed, Affine(fragile, scale=0.8, name="f08")])
    assert p([arith("fine", x=0.5)])[0].score == pytest.approx(0.5 * 0.4)
    bad = p([arith("boom", x=0.5)])[0]
    assert bad.score is None and bad.status is Status.EXEC_ERROR and bad.info["failed"] == "f08"


def test_max_over_references() -> None:
    inner = Counting(ArithmeticAnswer())
    m = MaxOverReferences(inner)
    two = Sample(prompt="q", response="Answer: 7", reference=["5", "7", "9"])
    one = Sample(prompt="q", response="Answer: 7", reference="7")
    r_two, r_one = m([two, one])
    # references 5, 7, 9 → 0, 1, 0 → max 1 at index 1; a plain reference passes through
    assert r_two.score == 1.0 and r_two.components["best_ref"] == 1.0
    assert r_one.score == 1.0 and r_one.components["best_ref"] == 0.0
    assert len(inner.batches) == 1 and len(inner.batches[0]) == 4  # 3 + 1 references in one batched call
    empty = m([Sample(prompt="q", response="Answer: 7", reference=[])])[0]
    assert empty.score is None and empty.status is Status.NOT_APPLICABLE
    # a failed reference is a failure (not a lower score)
    timeout = MaxOverReferences(timed_out)([two])[0]
    assert timeout.score is None and timeout.status is Status.TIMEOUT


def test_cascade_calls_the_expensive_stage_only_when_undecided() -> None:
    cheap = fixed  # metadata x, or None (undecided)
    expensive = Counting(ArithmeticAnswer())
    c = Cascade([cheap, expensive])
    decided, undecided = c([arith("Answer: 143", x=0.25), arith("Answer: 143")])
    assert decided.score == 0.25 and decided.components["decided_by"] == 0.0
    assert undecided.score == 1.0 and undecided.components["decided_by"] == 1.0
    assert expensive.batches == [["Answer: 143"]]
    # nobody decides: the last stage's status
    nobody = Cascade([fixed, timed_out])([arith("x")])[0]
    assert nobody.score is None and nobody.status is Status.TIMEOUT
    # a cheap stage's timeout is undecided, not a failure
    assert Cascade([timed_out, fixed])([arith("x", x=1)])[0].score == 1.0


def test_clip_affine_rename() -> None:
    # fixed 2.5 → clip to [0, 1] → 1.0; affine 6·0.5 − 3 = 0 (ToolRL's [0,1] → [−3,3]); −1 → clipped up to 0
    assert Clip(fixed, lo=0.0, hi=1.0)([arith("x", x=2.5)])[0].score == 1.0
    assert Clip(fixed, lo=0.0)([arith("x", x=-1)])[0].score == 0.0
    assert Affine(fixed, scale=6.0, shift=-3.0)([arith("x", x=0.5)])[0].score == 0.0
    r = Rename(fixed, "other")
    assert r.name == r.__name__ == "other" and r([arith("x", x=3)])[0].score == 3.0
    with pytest.raises(ValueError, match="Clip needs lo ≤ hi"):
        Clip(fixed, lo=1.0, hi=0.0)


def test_duplicate_child_names_are_refused() -> None:
    with pytest.raises(ValueError, match="two children are named 'fixed'"):
        WeightedSum([(fixed, 1.0), (fixed, 2.0)])
    WeightedSum([(fixed, 1.0), (Rename(fixed, "fixed2"), 2.0)])  # fine


def test_explain_shows_the_tree_that_was_computed() -> None:
    ws = WeightedSum([(ArithmeticAnswer(), 1.0), (length_penalty, 0.5)], name="quality")
    gate = Gate(has_answer, ws, name="format_gate")
    tree = explain(gate, arith("Answer: 143"))
    assert tree["name"] == "format_gate" and tree["score"] == pytest.approx(0.945) and tree["status"] == "ok"
    assert [c["name"] for c in tree["children"]] == ["has_answer", "quality"]
    quality = tree["children"][1]
    assert [c["name"] for c in quality["children"]] == ["arithmetic_answer", "length_penalty"]
    assert quality["children"][0]["components"] == {"answer": 1.0}
    # a failing gate: "quality" was never evaluated, so it is not in the tree
    skipped = explain(gate, arith(NO_ANSWER))
    assert skipped["score"] == -1.0 and [c["name"] for c in skipped["children"]] == ["has_answer"]
    json.dumps(tree)  # plain data


def test_configs_round_trip_through_json() -> None:
    composite = Lexicographic(
        [has_answer],
        WeightedSum(
            [
                (Cascade([fixed, ArithmeticAnswer()], name="answer"), 1.0),
                (Clip(Affine(length_penalty, scale=2.0, shift=0.1), lo=-1.0, hi=0.0), 0.5),
                (Product([fixed_b, Rename(fixed, "fixed_again")]), 0.0),
                (MaxOverReferences(ArithmeticAnswer(), name="maxref"), 0.25),
                (ProcessReward(ArithmeticSteps(), reducer=ClipDeltaSteps(0.5, keep_last=True)), 1.0),
                (Unlikeliness(GroupZScore(fixed_b, eps=1e-3, scale=False), beta=0.5, logprob_key="lp"), 0.1),
                (DifficultyScale(Gate(has_answer, fixed_b, threshold=0.5, fail_score=-2.0), key="w"), 0.1),
            ],
            skip_na=True,
            name="objective",
        ),
        fail_scores=[-5.0],
    )
    cfg = composite.to_config()
    text = json.dumps(cfg)
    registry = registry_of(has_answer, fixed, fixed_b, ArithmeticAnswer(), ArithmeticSteps(), length_penalty)
    rebuilt = from_config(json.loads(text), registry)
    assert rebuilt.to_config() == cfg
    samples = [
        arith(RIGHT, x=None, lp=-1.0, w=2.0, group="g"),
        arith("Answer: 143", x=0.5, lp=-2.0, w=2.0, group="g"),
        arith(NO_ANSWER, x=1.0, lp=-0.5, w=2.0, group="g"),
    ]
    assert composite(samples) == rebuilt(samples)
    with pytest.raises(ValueError, match="'nope' is not in the registry"):
        from_config({"type": "reward", "name": "nope"}, registry)
    with pytest.raises(ValueError, match="unknown composite type 'Mystery'"):
        from_config({"type": "Mystery"}, registry)


def test_composites_pickle() -> None:
    ws = WeightedSum([(ArithmeticAnswer(), 1.0), (length_penalty, 0.5)])
    back = pickle.loads(pickle.dumps(Gate(has_answer, ws)))
    samples = [arith("Answer: 143"), arith(NO_ANSWER)]
    assert back(samples) == Gate(has_answer, ws)(samples)


# ---------------------------------------------------------------------------------------------------------------
# group transforms
# ---------------------------------------------------------------------------------------------------------------


def test_group_zscore_by_hand_and_per_group() -> None:
    z = GroupZScore(fixed)
    samples = [arith("a", x=x, group="g1") for x in (1, 0, 0, 1)] + [
        arith("b", x=5, group="g2"),
        arith("c", x=5, group="g2"),
        arith("d", x=3, group="solo"),
        arith("e", x=None, group="g2"),
        arith("f", x=1, group=None),
    ]
    res = z(samples)
    # g1: mean 0.5; sample std sqrt(4·0.25/3) = sqrt(1/3) = 0.577350; z = ±0.5/(0.577350 + 1e-4) = ±0.865876
    zs = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert [r.score for r in res[:4]] == pytest.approx([zs, -zs, -zs, zs])
    assert res[0].components["group_std"] == pytest.approx(math.sqrt(1 / 3))
    # g2: scores 5, 5 (the n/a sample is left out) → zero std → exactly 0; a group of one → 0
    assert [r.score for r in res[4:7]] == [0.0, 0.0, 0.0]
    assert res[4].components["group_size"] == 2.0
    assert res[7].score is None and res[7].status is Status.NOT_APPLICABLE
    assert res[8].score is None and res[8].info["reason"] == "sample has no group_id"
    # not scaled (Dr. GRPO): r − mean
    assert [r.score for r in GroupZScore(fixed, scale=False)(samples[:4])] == [0.5, -0.5, -0.5, 0.5]


@settings(max_examples=60, deadline=None)
@given(xs=st.lists(st.floats(-100, 100), min_size=2, max_size=16))
def test_group_zscore_sums_to_zero(xs: list[float]) -> None:
    res = GroupZScore(fixed)([arith("a", x=x) for x in xs])
    zs = [r.score for r in res]
    assert all(z is not None for z in zs)
    assert math.fsum(z for z in zs if z is not None) == pytest.approx(0.0, abs=1e-6)


def _released_unlikeliness(scores: list[float], logprobs: list[float], beta: float) -> list[float]:
    """The released code's arithmetic (ray_lean_trainer._compute_advantages, before normalisation), transcribed
    with numpy: ranks = argsort(argsort(logprobs)); scores · (1 − ranks/G · β)."""
    ranks = np.argsort(np.argsort(np.asarray(logprobs)))
    return list(np.asarray(scores) * (1 - ranks / len(scores) * beta))


def test_unlikeliness_by_hand() -> None:
    # scores [1, 1, 0, 1], log-probs [−0.5, −2.0, −1.0, −0.1]; ascending log-prob: #1 (rank 0), #2 (1), #0 (2),
    # #3 (3); G = 4, β = 0.25 → factors #0: 1 − 0.25·2/4 = 0.875, #1: 1, #2: 0.9375, #3: 1 − 0.25·3/4 = 0.8125
    samples = [
        arith("a", x=x, logprob=lp) for x, lp in zip([1, 1, 0, 1], [-0.5, -2.0, -1.0, -0.1], strict=True)
    ]
    res = Unlikeliness(fixed)(samples)
    assert [r.score for r in res] == pytest.approx([0.875, 1.0, 0.0, 0.8125])
    assert [r.components["rank"] for r in res] == [2.0, 0.0, 1.0, 3.0]
    missing = Unlikeliness(fixed)([arith("a", x=1)])[0]
    assert missing.score is None and missing.status is Status.NOT_APPLICABLE


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([0.0, 1.0]), st.floats(-10, 0)),
        min_size=1,
        max_size=16,
        unique_by=lambda t: t[1],
    ),
    beta=st.floats(0.0, 1.0),
)
def test_unlikeliness_matches_the_released_code(rows: list[tuple[float, float]], beta: float) -> None:
    samples = [arith("a", x=x, logprob=lp) for x, lp in rows]
    got = [r.score for r in Unlikeliness(fixed, beta=beta)(samples)]
    want = _released_unlikeliness([x for x, _ in rows], [lp for _, lp in rows], beta)
    assert got == pytest.approx(want)


def test_difficulty_scale() -> None:
    d = DifficultyScale(fixed)
    ok = d([arith("a", x=0.5, difficulty=2.0, group="g"), arith("b", x=1, difficulty=2.0, group="g")])
    # 0.5 · 2 = 1.0; 1 · 2 = 2.0
    assert [r.score for r in ok] == [1.0, 2.0] and ok[0].components["difficulty"] == 2.0
    mixed = d([arith("a", x=1, difficulty=2.0, group="g"), arith("b", x=1, difficulty=3.0, group="g")])
    assert all(r.score is None and r.status is Status.PARSE_ERROR for r in mixed)
    assert d([arith("a", x=1)])[0].status is Status.NOT_APPLICABLE
