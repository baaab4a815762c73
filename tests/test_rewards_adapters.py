"""Tests of the trainer adapters (:mod:`treeward.rewards.adapters`), each called the way its trainer calls it, and
of the import weight of :mod:`treeward.rewards`.

* TRL: keyword call ``f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=...,
  log_extra=..., log_metric=...)`` as in ``GRPOTrainer._calculate_rewards`` (TRL 1.16), plus two real
  ``GRPOTrainer`` steps on CPU with the shipped policy (slow tier).
* verl: ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` as verl's naive reward manager
  calls it, accumulating the returned dicts per key as it does.
* OpenRLHF: ``reward_func(queries, prompts, labels)``, merging ``extra_logs`` across calls with ``torch.cat`` as
  OpenRLHF does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import math
import pickle
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

import treeward
from treeward.rewards import (
    GroupZScore,
    Reward,
    RewardResult,
    Sample,
    WeightedSum,
    reward,
    to_openrlhf,
    to_trl,
    to_verl,
)
from treeward.rewards.adapters import AsyncTRLReward, TRLReward
from treeward.tasks import ArithmeticAnswer

Q1 = "Q: Ann has 5 cards. Ann gets 2 more. How many cards does Ann have?\n"
Q2 = "Q: Bob has 9 pens. Bob loses 4. How many pens does Bob have?\n"


@reward
def short(sample: Sample) -> float:
    """A length penalty: −(characters / 100)."""
    return -len(sample.response) / 100


def objective() -> WeightedSum:
    """answer + 0.5 · length penalty."""
    return WeightedSum([(ArithmeticAnswer(), 1.0), (short, 0.5)], name="objective")


class TRLLogs:
    """What TRL's ``_log_completion_extra`` / ``_log_metric`` do with the values (lists per key)."""

    def __init__(self) -> None:
        self.extra: dict[str, list[Any]] = defaultdict(list)
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def log_extra(self, column: str, values: list[Any]) -> None:
        self.extra[column].extend(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(value)


def trl_kwargs(logs: TRLLogs, **columns: Any) -> dict[str, Any]:
    return {
        **columns,
        "trainer_state": SimpleNamespace(global_step=3),
        "log_extra": logs.log_extra,
        "log_metric": logs.log_metric,
    }


# ---------------------------------------------------------------------------------------------------------------
# import weight
# ---------------------------------------------------------------------------------------------------------------


def test_import_treeward_rewards_is_light() -> None:
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import treeward.rewards\n"
        "dt = time.perf_counter() - t\n"
        "heavy = ['torch', 'trl', 'sacrebleu', 'math_verify']\n"
        "print(json.dumps({'seconds': dt, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["seconds"] < 5.0


# ---------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------


def test_trl_adapter_standard_format() -> None:
    f = to_trl(objective())
    assert isinstance(f, TRLReward) and f.__name__ == "objective"
    logs = TRLLogs()
    completions = ["Step 1: 5+2=7\nAnswer: 7", "Answer: 8", "no answer", "Answer: 5"]
    out = f(
        prompts=[Q1, Q1, Q1, Q2],
        completions=completions,
        completion_ids=[[1, 2], [3], [4], [5]],
        **trl_kwargs(logs, answer=["7", "7", "7", None], task=["a", "a", "a", "b"]),
    )
    # #0 correct, 13 + 1 + 9 = 23 chars: 1 + 0.5·(−0.23) = 0.885;  #1 wrong, 9 chars: 0 − 0.045 = −0.045
    # #2 no Answer line (parse_error, a score of 0), 9 chars: −0.045;  #3 no reference → None (TRL's n/a)
    assert out == pytest.approx([0.885, -0.045, -0.045, None])
    assert logs.extra["objective/status"] == ["ok", "ok", "ok", "n/a"]
    assert logs.extra["objective/arithmetic_answer"] == [1.0, 0.0, 0.0, None]
    assert logs.metrics["objective/short"] == pytest.approx([(-0.23 - 0.09 - 0.09 - 0.09) / 4])
    assert logs.metrics["objective/n/a_frac"] == [0.25]


def test_trl_adapter_builds_samples_from_columns_and_conversations() -> None:
    seen: list[Sample] = []

    class Recorder:
        name = "recorder"

        def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
            seen.extend(samples)
            return [RewardResult(1.0) for _ in samples]

    f = to_trl(Recorder(), log_components=False)
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]] * 2
    completions = [
        [{"role": "assistant", "content": "Answer: 4"}],
        [
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Answer: "}, {"type": "text", "text": "5"}],
            }
        ],
    ]
    assert f(
        prompts=prompts, completions=completions, completion_ids=[[7], [8]], answer=["4", "4"], lvl=[1, 2]
    ) == [
        1.0,
        1.0,
    ]
    a, b = seen
    assert (a.prompt, a.response, a.reference) == ("2+2?", "Answer: 4", "4")
    assert b.response == "Answer: 5"
    assert a.metadata["lvl"] == 1 and b.metadata["lvl"] == 2 and a.metadata["completion_ids"] == [7]
    assert a.metadata["prompt_messages"] == prompts[0] and "answer" not in a.metadata
    assert a.group_id == b.group_id == "system: Be brief.\nuser: 2+2?"


def test_trl_adapter_groups_by_prompt() -> None:
    # group Q1: [1, 0] → z = ±0.5/(0.7071 + 1e-4); group Q2: [1, 1] → zero std → 0, 0
    f = to_trl(GroupZScore(ArithmeticAnswer()), log_components=False)
    out = f(
        prompts=[Q1, Q2, Q1, Q2],
        completions=["Answer: 7", "Answer: 5", "Answer: 6", "Answer: 5"],
        answer=["7", "5", "7", "5"],
    )
    z = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert out == pytest.approx([z, 0.0, -z, 0.0])


def test_trl_adapter_pickles_and_async_variant() -> None:
    f = to_trl(objective())
    back = pickle.loads(pickle.dumps(f))
    assert back.__name__ == "objective"
    assert back(prompts=[Q1], completions=["Answer: 7"], answer=["7"]) == pytest.approx([1.0 - 0.045])
    g = to_trl(objective(), asynchronous=True)
    assert isinstance(g, AsyncTRLReward)
    assert inspect.iscoroutinefunction(g.__call__)  # what TRL's is_async_callable checks on instances
    logs = TRLLogs()
    out = asyncio.run(
        g(prompts=[Q1, Q1], completions=["Answer: 7", "Answer: 1"], **trl_kwargs(logs, answer=["7", "7"]))
    )
    assert out == pytest.approx([0.955, -0.045])
    assert logs.extra["objective/arithmetic_answer"] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------------------------


def test_verl_compute_score_as_the_naive_manager_calls_it() -> None:
    compute_score = to_verl(
        objective(), none_score=0.0, components=("arithmetic_answer", "short", "objective")
    )
    assert compute_score.__name__ == "objective"
    reward_extra_info: dict[str, list[float]] = defaultdict(list)
    rows = [
        ("Answer: 7", "7"),  # 1 + 0.5·(−0.09) = 0.955
        ("Answer: 3", "7"),  # 0 − 0.045 = −0.045
        ("Answer: 7", None),  # no reference → n/a → none_score 0.0, valid 0
    ]
    scores = []
    for i, (solution, truth) in enumerate(rows):
        extra_info = {"index": i, "num_turns": None}
        result = compute_score(
            data_source="arith", solution_str=solution, ground_truth=truth, extra_info=extra_info
        )
        assert isinstance(result, dict)
        scores.append(result["score"])
        for key, value in result.items():
            reward_extra_info[key].append(value)
    assert scores == pytest.approx([0.955, -0.045, 0.0])
    assert set(reward_extra_info) == {"score", "valid", "arithmetic_answer", "short", "objective"}
    assert all(len(v) == 3 for v in reward_extra_info.values())
    assert reward_extra_info["valid"] == [1.0, 1.0, 0.0]
    assert reward_extra_info["arithmetic_answer"][:2] == [1.0, 0.0]
    assert math.isnan(reward_extra_info["arithmetic_answer"][2]) and math.isnan(
        reward_extra_info["objective"][2]
    )
    assert reward_extra_info["objective"][:2] == pytest.approx([0.955, -0.045])
    with pytest.raises(ValueError, match="components may not be named"):
        to_verl(objective(), none_score=0.0, components=("score",))


def test_verl_metadata_from_extra_info() -> None:
    seen: list[Sample] = []

    class Recorder:
        name = "recorder"

        def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
            seen.extend(samples)
            return [RewardResult(None)]

    compute_score = to_verl(Recorder(), none_score=-1.0)
    out = compute_score("gsm8k", "Answer: 1", "1", {"prompt": "Q?", "group_id": 17, "split": "train"}, foo=2)
    assert out == {"score": -1.0, "valid": 0.0}
    s = seen[0]
    assert (s.prompt, s.response, s.reference, s.group_id) == ("Q?", "Answer: 1", "1", "17")
    assert s.metadata["data_source"] == "gsm8k" and s.metadata["split"] == "train" and s.metadata["foo"] == 2


# ---------------------------------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------------------------------


def test_openrlhf_reward_func() -> None:
    import torch

    reward_func = to_openrlhf(objective(), none_score=0.0, components=("arithmetic_answer",))
    prompts = [Q1, Q1, Q2]
    queries = [Q1 + "Answer: 7", Q1 + "Answer: 2", " " + Q2 + "Answer: 5"]  # the last decodes differently
    out = reward_func(queries, prompts, ["7", "7", "5"])
    # #0: 1 + 0.5·(−0.09) = 0.955; #1: −0.045; #2: the query is not prefixed by the prompt → the whole query is the
    # response: it ends in "Answer: 5" (right) and has len(Q2) + 10 characters
    long = -(len(Q2) + 10) / 100 * 0.5
    assert out["rewards"].dtype == torch.float32 and out["rewards"].shape == (3,)
    assert out["rewards"].tolist() == pytest.approx([0.955, -0.045, 1.0 + long])
    assert torch.equal(out["scores"], out["rewards"])
    assert set(out["extra_logs"]) == {"objective/valid", "objective/arithmetic_answer"}
    assert out["extra_logs"]["objective/arithmetic_answer"].tolist() == [1.0, 0.0, 1.0]
    # OpenRLHF merges every call's extra_logs with torch.cat per key
    second = reward_func([Q1 + "Answer: 7"], [Q1], [None])
    assert second["rewards"].tolist() == [0.0] and second["extra_logs"]["objective/valid"].tolist() == [0.0]
    merged = {k: torch.cat([out["extra_logs"][k], second["extra_logs"][k]]) for k in out["extra_logs"]}
    assert merged["objective/valid"].tolist() == [1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# two real GRPOTrainer steps (slow tier)
# ---------------------------------------------------------------------------------------------------------------


class Recording:
    """Records what the trainer sent (batch sizes, references, groups) around a real reward."""

    def __init__(self, inner: Reward) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[list[Sample]] = []

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        self.calls.append(list(samples))
        return self.inner(samples)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """On a busy 2-core machine intra-op threads that spin-wait on each other make a tiny model's steps far
    slower; one thread is enough for it. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
# TRL 1.16 itself still calls transformers' deprecated `is_gradient_checkpointing`
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install treeward[trl])"
)
def test_two_grpo_steps_with_a_composite_reward(tmp_path: Any, one_thread: None) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import get_callable_name, is_async_callable

    from treeward.tasks import generate_problems

    recording = Recording(objective())
    f = to_trl(recording)
    assert get_callable_name(f) == "objective" and not is_async_callable(f)
    assert is_async_callable(to_trl(recording, asynchronous=True))

    tok = AutoTokenizer.from_pretrained(treeward.SHIPPED_POLICY)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(treeward.SHIPPED_POLICY)
    problems = generate_problems(2, 2, seed=0)
    # the tokenizer adds no BOS: write it into the prompt text (cpu-feasibility.md §4)
    rows = [{"prompt": "<bos>" + p.prompt, "answer": p.answer} for p in problems]
    cfg = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing
        per_device_train_batch_size=8,  # 2 prompts × 4 generations
        num_generations=4,
        max_completion_length=48,
        temperature=1.0,
        learning_rate=1e-5,
        beta=0.0,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=f, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()

    assert len(recording.calls) == 2
    answers = {r["prompt"]: r["answer"] for r in rows}
    for batch in recording.calls:
        assert len(batch) == 8
        assert all(
            s.reference == answers[s.group_id] for s in batch
        )  # the answer column, the prompt as group
        sizes = [sum(t.group_id == g for t in batch) for g in {s.group_id for s in batch}]
        assert sizes and all(n % 4 == 0 for n in sizes)  # whole groups of num_generations completions
    logged = [h for h in trainer.state.log_history if "rewards/objective/mean" in h]
    assert len(logged) == 2
    for h in logged:
        assert "objective/arithmetic_answer" in h and "objective/short" in h
        assert math.isfinite(h["rewards/objective/mean"])
