"""Tree-GRPO vs our GRPO vs TRL's GRPOTrainer at equal generated tokens, on the shipped policy.

    .venv/bin/python benchmarks/tree_rl.py [--budget 60000] [--seeds 0] [--lr 5e-5] [--full]
        [--out benchmarks/out/tree_rl.json]

Three trainers start from the shipped policy with the same reward (:class:`~treeward.tasks.ArithmeticAnswer`, 1.0
for the right ``Answer:``), learning rate, group size (``--leaves`` completions per problem), problems per step
(``--batch-problems``) and problem stream (the order :func:`~treeward.train.pg.train_pg` draws from
``generate_problems(512, 4, seed=0)``; TRL gets the same rows in the same order with ``shuffle_dataset=False``):

* **tree-GRPO**: :func:`~treeward.train.pg.train_pg` with :func:`~treeward.search.rollouts.tree_rollouts`
  (TreePO-style fixed branching by 2 at every step, ``leaves`` finished leaves per tree, shared prefixes generated
  once) and :func:`~treeward.credit.advantages.treerpo` (TreeRPO's step-level sibling z-scores).
* **our GRPO**: :func:`~treeward.train.pg.train_pg` with :class:`~treeward.train.pg.IndependentSampler` (``leaves``
  whole solutions per problem) and :func:`~treeward.credit.advantages.grpo` (std-scaled group z-scores).
* **TRL GRPO**: ``trl.GRPOTrainer`` with ``to_trl(ArithmeticAnswer())``; TRL's defaults otherwise match ours: loss
  ``"dapo"`` (token-mean, = our ``loss_agg="token-mean"``), ``scale_rewards="group"`` (std-scaled), ``epsilon=0.2``,
  ``beta=0`` (no KL), one gradient step per generation batch, max grad norm 1, no weight decay; the scheduler is
  set to constant (ours has none).

**Equal generated tokens.** Each trainer gets the same budget of generated completion tokens per seed and stops
after the step in which its running total reaches it (so each overshoots by less than one step's tokens; the exact
counts are reported). Our loops count ``Tree.generated_tokens`` (a tree's shared prefix once); TRL's count is the
length of the ``completion_ids`` its reward function receives. ``train_pg`` has no token budget of its own, so the
script stops it from its per-step ``log`` callback (the model is trained in place; the step that crossed the
budget is complete).

Reported per trainer and seed: greedy accuracy on the same held-out 4-step problems (``generate_problems(n, 4,
seed=1)``, the set every benchmark here uses) before and after, steps, generated tokens, wall seconds of the
training call, throughput (generated tokens / that wall time: sampling, scoring and updates, no evaluation), and
the mean training reward. Ratios are against our GRPO. Trainers run one after another within a seed, so load from
other processes on a shared machine can fall unevenly; the wall times say how much.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.credit.advantages import grpo, treerpo
from treeward.engine.hf import HFPolicy
from treeward.rewards.adapters import TRLReward, to_trl
from treeward.search.rollouts import tree_rollouts
from treeward.tasks import ArithmeticAnswer, generate_problems
from treeward.train.pg import IndependentSampler, PGStep, evaluate, step_problems, train_pg
from treeward.tree import Problem

TRAIN_SEED = 0
HELD_SEED = 1
DIFFICULTY = 4
MAX_TOKENS = 96  # per whole solution (20 × 4 steps + 12 is 92; the train_pg CLI's default 96)
METHODS = ("tree-GRPO", "our GRPO", "TRL GRPO")


class _BudgetSpent(Exception):
    """Raised from train_pg's log callback once the token budget is spent (train_pg has no budget knob)."""


class _StopAt:
    """A ``train_pg`` log callback: keeps every step and stops the loop after the step that spends ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.history: list[PGStep] = []
        self.tokens = 0

    def __call__(self, step: PGStep) -> None:
        self.history.append(step)
        self.tokens += step.generated_tokens
        if self.tokens >= self.budget:
            raise _BudgetSpent


def run_ours(
    method: str,
    train: Sequence[Problem],
    held: Sequence[Problem],
    *,
    budget: int,
    lr: float,
    seed: int,
    batch_problems: int,
    leaves: int,
) -> dict[str, Any]:
    """tree-GRPO or our GRPO through ``train_pg`` until ``budget`` generated tokens are spent."""
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    if method == "tree-GRPO":
        sampler: Any = partial(tree_rollouts, leaves=leaves)
        advantage: Any = treerpo
    else:
        sampler = IndependentSampler(n=leaves, max_tokens=MAX_TOKENS)
        advantage = grpo
    stop = _StopAt(budget)
    t0 = time.perf_counter()
    with contextlib.suppress(_BudgetSpent):  # raised by stop() after the step that spends the budget
        train_pg(
            policy,
            train,
            sampler=sampler,
            reward=ArithmeticAnswer(),
            advantage=advantage,
            steps=len(train) // batch_problems * 1000,  # more than any budget needs: the budget stops it
            lr=lr,
            batch_problems=batch_problems,
            seed=seed,
            log=stop,
        )
    wall = time.perf_counter() - t0
    if stop.tokens < budget:
        raise RuntimeError(f"{method} ended before spending its budget ({stop.tokens} < {budget} tokens)")
    after = evaluate(policy, held, ArithmeticAnswer(), max_tokens=MAX_TOKENS)
    rewards = [h.reward_mean for h in stop.history if h.reward_mean is not None]
    return {
        "steps": len(stop.history),
        "generated_tokens": stop.tokens,
        "seconds": wall,
        "tokens_per_s": stop.tokens / wall,
        "sample_s": sum(h.sample_s for h in stop.history),
        "update_s": sum(h.update_s for h in stop.history),
        "reward_mean": statistics.fmean(rewards) if rewards else None,
        "completions": sum(h.samples for h in stop.history),
        "accuracy_after": after,
        "history": [asdict(h) for h in stop.history],
    }


class _CountingReward:
    """A TRL reward function that counts the completion tokens it is shown, then delegates."""

    def __init__(self, inner: TRLReward) -> None:
        self.inner = inner
        self.__name__ = inner.__name__
        self.tokens = 0
        self.calls = 0
        self.scores: list[float] = []

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        self.tokens += sum(len(ids) for ids in completion_ids)
        self.calls += 1
        out = self.inner(prompts, completions, completion_ids, **kwargs)
        self.scores.extend(s for s in out if s is not None)
        return out


def run_trl(
    train: Sequence[Problem],
    held: Sequence[Problem],
    *,
    budget: int,
    lr: float,
    seed: int,
    batch_problems: int,
    leaves: int,
) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same problem stream until ``budget`` completion tokens are spent."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    inner = to_trl(ArithmeticAnswer(), log_components=False)
    assert isinstance(inner, TRLReward)  # the synchronous adapter
    counter = _CountingReward(inner)

    class StopAtBudget(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if counter.tokens >= budget:
                control.should_training_stop = True
            return control

    tok = AutoTokenizer.from_pretrained(SHIPPED_POLICY)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_POLICY)
    # the same stream train_pg draws: step s takes step_problems(train, batch_problems, seed, s)
    max_steps = len(train) // batch_problems * 4
    stream = [p for s in range(1, max_steps + 1) for p in step_problems(train, batch_problems, seed, s)]
    # the tokenizer adds no BOS: write it into the prompt text (cpu-feasibility.md §4)
    rows = [{"prompt": "<bos>" + p.prompt, "answer": p.answer} for p in stream]
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            per_device_train_batch_size=batch_problems * leaves,
            num_generations=leaves,
            max_completion_length=MAX_TOKENS,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            learning_rate=lr,
            lr_scheduler_type="constant",
            beta=0.0,
            max_steps=max_steps,
            shuffle_dataset=False,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=counter,
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[StopAtBudget()],
        )
        trainer.remove_callback(PrinterCallback)  # one line per run is printed here instead
        trainer.remove_callback(ProgressCallback)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    if counter.tokens < budget:
        raise RuntimeError(f"TRL ended before spending its budget ({counter.tokens} < {budget} tokens)")
    assert trainer.model is model  # trained in place (no PEFT, no wrapping on one CPU process)
    model.eval()
    policy = HFPolicy(model, AutoTokenizer.from_pretrained(SHIPPED_POLICY))
    after = evaluate(policy, held, ArithmeticAnswer(), max_tokens=MAX_TOKENS)
    return {
        "steps": int(trainer.state.global_step),
        "generated_tokens": counter.tokens,
        "seconds": wall,
        "tokens_per_s": counter.tokens / wall,
        "reward_mean": statistics.fmean(counter.scores) if counter.scores else None,
        "completions": len(counter.scores),
        "accuracy_after": after,
    }


def _summary(runs: Sequence[dict[str, Any]], before: float) -> dict[str, Any]:
    keys = ("accuracy_after", "steps", "generated_tokens", "seconds", "tokens_per_s", "reward_mean")
    out: dict[str, Any] = {k: statistics.fmean(float(r[k]) for r in runs) for k in keys}
    accs = [r["accuracy_after"] for r in runs]
    out["accuracy_after_sd"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    out["accuracy_gain"] = out["accuracy_after"] - before
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=60_000, help="generated tokens per trainer and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--lr", type=float, default=5e-5, help="5e-5 is stable for the shipped policy; 2e-4 collapses"
    )
    p.add_argument("--batch-problems", type=int, default=4)
    p.add_argument("--leaves", type=int, default=8, help="group size: completions (leaves) per problem")
    p.add_argument("--n-held", type=int, default=200)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--full", action="store_true", help="the issue's configuration: 3 seeds, 500k tokens each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/out/tree_rl.json")
    args = p.parse_args(argv)
    if args.full:
        args.seeds, args.budget = [0, 1, 2], 500_000
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    train = generate_problems(512, DIFFICULTY, seed=TRAIN_SEED)
    held = generate_problems(args.n_held, DIFFICULTY, seed=HELD_SEED)
    before = evaluate(
        HFPolicy.from_pretrained(SHIPPED_POLICY), held, ArithmeticAnswer(), max_tokens=MAX_TOKENS
    )
    print(
        f"greedy 4-step accuracy before training: {before:.3f} on {len(held)} held-out problems", flush=True
    )
    knobs = {"lr": args.lr, "seed": 0, "batch_problems": args.batch_problems, "leaves": args.leaves}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        knobs["seed"] = seed
        for method in args.methods:
            if method == "TRL GRPO":
                r = run_trl(train, held, budget=args.budget, **knobs)
            else:
                r = run_ours(method, train, held, budget=args.budget, **knobs)
            r["seed"] = seed
            runs[method].append(r)
            print(
                f"seed {seed} {method:10s} steps {r['steps']:4d} tokens {r['generated_tokens']:7d} "
                f"{r['seconds']:6.1f} s {r['tokens_per_s']:6.0f} tok/s  train reward {r['reward_mean'] or 0:.3f}  "
                f"acc {before:.3f} → {r['accuracy_after']:.3f}",
                flush=True,
            )

    summary = {m: _summary(rs, before) for m, rs in runs.items()}
    base = summary.get("our GRPO")
    print(
        f"\n{len(args.seeds)} seed(s), {args.budget} generated tokens each, lr {args.lr}, group {args.leaves}"
    )
    cols = ("acc after", "± sd", "gain", "steps", "tokens", "wall s", "tok/s", "tok/s ratio", "wall ratio")
    print(f"{'trainer':12s}" + "".join(f"{c:>12s}" for c in cols))
    for m, s in summary.items():
        if base is not None:
            s["tokens_per_s_ratio"] = s["tokens_per_s"] / base["tokens_per_s"]
            s["seconds_ratio"] = s["seconds"] / base["seconds"]
        vals = (
            f"{s['accuracy_after']:.3f}",
            f"{s['accuracy_after_sd']:.3f}",
            f"{s['accuracy_gain']:+.3f}",
            f"{s['steps']:.0f}",
            f"{s['generated_tokens']:.0f}",
            f"{s['seconds']:.1f}",
            f"{s['tokens_per_s']:.0f}",
            f"{s.get('tokens_per_s_ratio', float('nan')):.2f}",
            f"{s.get('seconds_ratio', float('nan')):.2f}",
        )
        print(f"{m:12s}" + "".join(f"{v:>12s}" for v in vals))
    print(
        f"(before: {before:.3f}; ratios against our GRPO; 1 sd of an accuracy over {len(held)} problems ≈ "
        f"{(before * (1 - before) / len(held)) ** 0.5:.3f})"
    )

    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "difficulty": DIFFICULTY,
        "max_tokens": MAX_TOKENS,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "accuracy_before": before,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
