"""Accuracy table of a policy on the arithmetic task: greedy, one sample, maj@k and pass@k per step count.

    .venv/bin/python benchmarks/policy_accuracy.py --n-problems 200 --k 8

Used to document the shipped tiny policy (README). Problems are the held-out set (problems seed 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy
from treeward.search import best_of_n, majority_vote
from treeward.search.core import grade
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_POLICY)
    ap.add_argument("--n-problems", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=str, default="1,2,3,4,5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/policy_accuracy.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = HFPolicy.from_pretrained(args.model)
    outcome, steps_reward = ArithmeticAnswer(), ArithmeticSteps()
    rows = []
    print(
        f"{'steps':>5} {'greedy':>7} {'sample':>7} {'maj@k':>7} {'pass@k':>7} {'steps ok':>8} {'seconds':>8}"
    )
    for k_steps in [int(s) for s in args.steps.split(",")]:
        t0 = time.perf_counter()
        problems = generate_problems(args.n_problems, k_steps, seed=1)
        cap = 20 * k_steps + 12
        budget = cap * args.k
        greedy = best_of_n(problems, policy, steps_reward, cap, n=1, temperature=0.0, max_tokens=cap)
        sampled = best_of_n(
            problems, policy, steps_reward, budget, n=args.k, max_tokens=cap, aggregate=majority_vote
        )
        grade(greedy, outcome)
        grade(sampled, outcome)
        finals = [t.terminals() for t in sampled]
        n = len(problems)
        step_nodes = [s for t in sampled for s in t.nodes[1:] if s.reward is not None and not s.terminal]
        row = {
            "steps": k_steps,
            "greedy": sum(bool(t.correct) for t in greedy) / n,
            "sample": sum((f[0].outcome or 0) > 0 for f in finals if f) / n,
            "maj@k": sum(bool(t.correct) for t in sampled) / n,
            "pass@k": sum(any((x.outcome or 0) > 0 for x in f) for f in finals) / n,
            "arithmetic_correct_steps": sum(s.reward for s in step_nodes) / max(1, len(step_nodes)),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"{k_steps:>5} {row['greedy']:7.3f} {row['sample']:7.3f} {row['maj@k']:7.3f} {row['pass@k']:7.3f} "
            f"{row['arithmetic_correct_steps']:8.3f} {row['seconds']:8.1f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "k": args.k, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
