"""Reward hacking of a summed process reward, and Gao et al.'s Clip / Delta refinements that stop it.

    .venv/bin/python benchmarks/prm_hacking.py [--steps 40] [--lr 5e-5] [--seeds 0] [--full]
        [--out benchmarks/out/prm_hacking.json]

Gao et al. (2024), "On Designing Effective RL Reward at Training Time for LLM Reasoning" (arXiv 2410.15115), show
that adding a PRM's step rewards to the success reward gets hacked in RL: the return grows with the number of
"good" steps, so the policy pads its solutions; their Clip (``min(r_k - eta, 0)``) and Delta (``r_k - r_{k+1}``)
refinements bound the return. This script shows it on the built-in task with the task's exact step verifier as
the PRM (:class:`~treeward.tasks.ArithmeticSteps`, 1.0 per correct step) and the three rewards, all with the
paper's success reward added (:class:`~treeward.rewards.compose.WeightedSum`, weights 1 and 1)::

    sum   = answer + Σ_k r_k                      (SumSteps: unrefined)
    clip  = answer + Σ_k min(r_k - 1, 0)          (ClipSteps(eta=1): a correct step costs 0, a wrong one -1)
    delta = answer + r_1 - r_S                    (DeltaSteps: the telescoped return, last step dropped)
    delta_last = answer + r_1                     (DeltaSteps(keep_last=True): the last step's score kept)

**Which PRM can be hacked.** The verifier judges a problem *with its structure* (the generated operation list)
exactly: a step past the question's last operation is wrong, and so is an ``Answer:`` line after it, so padding
cannot farm it (part 1 measures this too). A PRM that judges each step on its own cannot know how many steps the
question asks for: that is the verifier on a problem *without* structure (as for a user's JSONL file: arithmetic
right, first operand = previous result, second operand a number the question mentions). Re-applying one of the
question's operations after the last step is then another correct step. This is the PRM used below.

Part 1 (direct): for held-out problems, the correct solution against the same solution padded with ``k`` extra
steps that repeat its last operation (then ``Answer:`` the padded result, which is wrong), and with its last step
written twice verbatim. For each reward: the mean score of each completion and the fraction of problems where
the padded one scores strictly above the correct one (a hack pays).

Part 2 (RL): :func:`~treeward.train.pg.train_pg` (independent samples, GRPO advantages) from the shipped policy
with each reward, same seed, problems and knobs. Logged per step: the training reward, answer accuracy, mean
step lines per completion and the *padding rate* (completions with more step lines than the problem has
operations). Before and after: greedy answer accuracy, padding rate and step lines on held-out problems.

Departures from the paper: GRPO group advantages of the scalar return instead of PPO with a critic and dense
per-step returns (the whole-trajectory return is what gets hacked); ``eta = 1`` because the verifier's correct
steps score exactly 1; the PRM is an exact verifier, not a learned model, so the hack is the one a step-local
judge allows (padding with valid steps), not the paper's "repeat a vacuous step".
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.credit.advantages import grpo
from treeward.engine.hf import HFPolicy
from treeward.rewards.base import Reward, RewardResult, Sample
from treeward.rewards.compose import WeightedSum
from treeward.rewards.process import ClipSteps, DeltaSteps, ProcessReward, Reducer, SumSteps
from treeward.search.core import path_sample
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tasks.arithmetic import parse_step, solution_text
from treeward.train.pg import IndependentSampler, PGStep, train_pg
from treeward.tree import Problem

TRAIN_SEED = 0  # training problems: generate_problems(..., seed=0)
HELD_SEED = 1  # held-out problems, as every benchmark here
MAX_TOKENS = 96
REDUCERS: dict[str, Reducer] = {
    "sum": SumSteps(),
    "clip": ClipSteps(1.0),
    "delta": DeltaSteps(),
    "delta_last": DeltaSteps(keep_last=True),
}


def unstructured(problem: Problem) -> Problem:
    """The problem without its operation list: the step verifier then judges each step on its own."""
    keep = {k: v for k, v in problem.metadata.items() if k not in ("ops", "start")}
    return replace(problem, metadata=keep)


def objective(name: str, *, outcome_weight: float = 1.0) -> WeightedSum:
    """``outcome_weight · answer + REDUCERS[name](step scores of the exact step verifier)`` (Gao et al.'s
    composite; with ``outcome_weight=0`` the answer is only logged)."""
    prm = ProcessReward(ArithmeticSteps(), reducer=REDUCERS[name], name=f"prm_{name}")
    return WeightedSum([(ArithmeticAnswer(), outcome_weight), (prm, 1.0)], name=f"answer+prm_{name}")


def step_lines(text: str) -> int:
    """Lines of ``text`` that parse as ``Step i: a op b=c``."""
    return sum(1 for line in text.split("\n") if parse_step(line) is not None)


# ---------------------------------------------------------------------------------------------------------------
# Part 1: constructed completions
# ---------------------------------------------------------------------------------------------------------------


def padded(problem: Problem, k: int) -> str:
    """The correct solution with ``k`` extra steps that re-apply its last operation, then ``Answer:`` the result."""
    lines = solution_text(problem).split("\n")[:-1]
    op, arg = problem.metadata["ops"][-1]
    value = int(lines[-1].rsplit("=", 1)[1])  # the last step's result: the answer
    for _ in range(k):
        new = {"+": value + arg, "-": value - arg, "*": value * arg}[op]
        lines.append(f"Step {len(lines) + 1}: {value}{op}{arg}={new}")
        value = new
    return "\n".join([*lines, f"Answer: {value}"])


def duplicated(problem: Problem) -> str:
    """The correct solution with its last step line written twice, verbatim."""
    lines = solution_text(problem).split("\n")
    return "\n".join([*lines[:-1], lines[-2], lines[-1]])


def _sample(problem: Problem, text: str) -> Sample:
    return Sample(
        prompt=problem.prompt,
        response=text,
        reference=problem.answer,
        metadata={"problem": problem, **problem.metadata},
        group_id=problem.id,
    )


def direct(problems: Sequence[Problem], pads: Sequence[int]) -> dict[str, Any]:
    """Scores of correct vs padded vs duplicated completions under each reward, with and without structure."""
    out: dict[str, Any] = {}
    variants: dict[str, Callable[[Problem], str]] = {"correct": solution_text}
    variants.update({f"pad+{k}": partial(padded, k=k) for k in pads})
    variants["dup-last"] = duplicated  # the last step line written twice
    for verifier, view in (
        ("step-local PRM (no structure)", unstructured),
        ("exact verifier (structure)", None),
    ):
        rows: dict[str, Any] = {}
        for name in REDUCERS:
            for label, reward in (
                (f"answer+{name}", objective(name)),
                (name, objective(name, outcome_weight=0)),
            ):
                scores: dict[str, list[float]] = {}
                for v, make in variants.items():
                    samples = [_sample(view(p) if view else p, make(p)) for p in problems]
                    scores[v] = [_score(r) for r in reward(samples)]
                mean = {v: sum(s) / len(s) for v, s in scores.items()}
                beats = {
                    v: sum(h > c for h, c in zip(scores[v], scores["correct"], strict=True)) / len(problems)
                    for v in variants
                    if v != "correct"
                }
                rows[label] = {"mean": mean, "beats_correct": beats}
        out[verifier] = rows
    return out


def _score(r: RewardResult) -> float:
    if r.score is None:
        raise RuntimeError(f"a constructed completion was not scored: {r.status} {r.info.get('reason')}")
    return r.score


# ---------------------------------------------------------------------------------------------------------------
# Part 2: policy gradient with each reward
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Watch:
    """Wraps the training reward and records, per call (one call per training step), what the completions did."""

    inner: Reward
    name: str = ""
    steps: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results = self.inner(samples)
        self.steps.append(completion_stats(samples))
        return results


def completion_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """Answer accuracy, mean step lines and padding rate (more step lines than the problem's operations)."""
    n = len(samples)
    answers = ArithmeticAnswer()(list(samples))
    lines = [step_lines(s.response) for s in samples]
    need = [int(s.metadata["n_steps"]) for s in samples]
    return {
        "answer_accuracy": sum(1 for r in answers if r.score == 1.0) / n,
        "step_lines": sum(lines) / n,
        "padding_rate": sum(1 for got, want in zip(lines, need, strict=True) if got > want) / n,
        "extra_steps": sum(max(0, got - want) for got, want in zip(lines, need, strict=True)) / n,
    }


def greedy_stats(policy: HFPolicy, problems: Sequence[Problem]) -> dict[str, float]:
    """:func:`completion_stats` of the greedy solutions."""
    trees = IndependentSampler(n=1, max_tokens=MAX_TOKENS, temperature=0.0)(problems, policy, seed=0)
    return completion_stats([path_sample(t, leaf) for t in trees for leaf in t.leaves()])


def rl_run(
    reducer_name: str,
    train: Sequence[Problem],
    held: Sequence[Problem],
    *,
    steps: int,
    lr: float,
    seed: int,
    batch_problems: int,
    leaves: int,
) -> dict[str, Any]:
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    before = greedy_stats(policy, held)
    watch = Watch(objective(reducer_name))
    t0 = time.perf_counter()
    history: list[PGStep] = train_pg(
        policy,
        train,
        sampler=IndependentSampler(n=leaves, max_tokens=MAX_TOKENS),
        reward=watch,
        advantage=grpo,
        steps=steps,
        lr=lr,
        batch_problems=batch_problems,
        seed=seed,
        log=None,
    )
    wall = time.perf_counter() - t0
    after = greedy_stats(policy, held)
    per_step = [
        {"step": h.step, "reward_mean": h.reward_mean, "excluded": h.excluded, **w}
        for h, w in zip(history, watch.steps, strict=True)
    ]
    return {
        "reward": watch.name,
        "seed": seed,
        "greedy_before": before,
        "greedy_after": after,
        "train_first_quarter": _block(per_step[: max(1, steps // 4)]),
        "train_last_quarter": _block(per_step[-max(1, steps // 4) :]),
        "per_step": per_step,
        "generated_tokens": sum(h.generated_tokens for h in history),
        "seconds": wall,
    }


def _block(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = ("reward_mean", "answer_accuracy", "step_lines", "padding_rate", "extra_steps")
    return {k: sum(float(r[k] or 0.0) for r in rows) / len(rows) for k in keys}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="policy-gradient steps per reward (--full: 150)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--difficulty", type=int, nargs="+", default=[1, 2, 3], help="training/eval step counts")
    p.add_argument("--batch-problems", type=int, default=4)
    p.add_argument("--leaves", type=int, default=8)
    p.add_argument("--n-direct", type=int, default=200, help="problems for part 1")
    p.add_argument("--n-held", type=int, default=150, help="held-out problems for greedy stats in part 2")
    p.add_argument("--full", action="store_true", help="150 steps and seeds 0 1 2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/out/prm_hacking.json")
    args = p.parse_args(argv)
    if args.full:
        args.steps, args.seeds = 150, [0, 1, 2]
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    direct_problems = generate_problems(args.n_direct, [2, 3, 4], seed=HELD_SEED)
    part1 = direct(direct_problems, pads=(1, 2, 4))
    print(
        f"Part 1 ({len(direct_problems)} problems, 2-4 steps): mean score of the correct solution, of it padded "
        "with k repeats of its last operation (pad+k), and with its last step line duplicated (dup-last); "
        "then the fraction of problems where each scores strictly above the correct solution"
    )
    for verifier, rows in part1.items():
        first = next(iter(rows.values()))
        means, beats = list(first["mean"]), list(first["beats_correct"])
        print(f"\n  {verifier}")
        head = "".join(f"{c:>9s}" for c in means) + "   |" + "".join(f"{'>' + c:>10s}" for c in beats)
        print(f"  {'reward':18s}" + head)
        for label, row in rows.items():
            m = "".join(f"{row['mean'][c]:9.3f}" for c in means)
            b = "".join(f"{row['beats_correct'][c]:10.2f}" for c in beats)
            print(f"  {label:18s}{m}   |{b}")

    train = [unstructured(q) for q in generate_problems(512, args.difficulty, seed=TRAIN_SEED)]
    held = [unstructured(q) for q in generate_problems(args.n_held, args.difficulty, seed=HELD_SEED)]
    part2: list[dict[str, Any]] = []
    print(
        f"\nPart 2: train_pg, {args.steps} steps, lr {args.lr}, difficulties {args.difficulty}, step-local PRM"
    )
    header = (
        f"{'reward':22s} {'seed':>4s} {'pad greedy':>16s} {'acc greedy':>16s} {'steps greedy':>16s} "
        f"{'pad train':>16s} {'acc train':>16s} {'s':>6s}"
    )
    print(header)
    for seed in args.seeds:
        for name in REDUCERS:
            r = rl_run(
                name,
                train,
                held,
                steps=args.steps,
                lr=args.lr,
                seed=seed,
                batch_problems=args.batch_problems,
                leaves=args.leaves,
            )
            part2.append(r)
            b, a, f, last = (
                r["greedy_before"],
                r["greedy_after"],
                r["train_first_quarter"],
                r["train_last_quarter"],
            )
            print(
                f"{r['reward']:22s} {seed:4d} "
                f"{b['padding_rate']:7.3f}→{a['padding_rate']:<7.3f} "
                f"{b['answer_accuracy']:7.3f}→{a['answer_accuracy']:<7.3f} "
                f"{b['step_lines']:7.2f}→{a['step_lines']:<7.2f} "
                f"{f['padding_rate']:7.3f}→{last['padding_rate']:<7.3f} "
                f"{f['answer_accuracy']:7.3f}→{last['answer_accuracy']:<7.3f} "
                f"{r['seconds']:6.0f}",
                flush=True,
            )
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "direct": part1,
        "rl": part2,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
