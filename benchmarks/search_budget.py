"""Greedy, majority@N, weighted best-of-N and beam search at equal generated-token budgets.

    .venv/bin/python benchmarks/search_budget.py --n-problems 200 --steps 4

Runs every algorithm on the same held-out arithmetic problems with the shipped policy and the exact step verifier,
side by side in one process, and prints accuracy, generated tokens per problem, wall time and wall time per 1,000
generated tokens (the fair speed comparison: beam and best-of-N rarely spend exactly the same tokens).
Best-of-N's N is matched to what beam actually spent. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy
from treeward.search import beam_search, best_of_n, best_score, majority_vote, weighted_vote
from treeward.search.core import grade
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems


def run(name, fn, problems, args, **knobs):  # type: ignore[no-untyped-def]
    policy = HFPolicy.from_pretrained(args.model)  # a fresh policy: empty prefix cache, empty ledger
    trees = []
    t0 = time.perf_counter()
    for i in range(0, len(problems), args.batch_problems):
        chunk = problems[i : i + args.batch_problems]
        trees.extend(fn(chunk, policy, ArithmeticSteps(), args.budget, seed=args.seed, **knobs))
    wall = time.perf_counter() - t0
    grade(trees, ArithmeticAnswer())
    gen = sum(t.ledger["generated"] for t in trees)
    row = {
        "algorithm": name,
        "knobs": {k: getattr(v, "__name__", v) for k, v in knobs.items()},
        "accuracy": sum(bool(t.correct) for t in trees) / len(trees),
        "generated_tokens_per_problem": gen / len(trees),
        "max_generated_tokens": max(t.ledger["generated"] for t in trees),
        "computed_tokens": policy.ledger.total.computed,
        "reused_tokens": policy.ledger.total.reused,
        "engine_calls": policy.ledger.total.calls,
        "wall_seconds": wall,
        "wall_per_1k_generated": 1000 * wall / max(1, gen),
    }
    print(
        f"{name:<22} acc {row['accuracy']:.3f}  tokens/problem {row['generated_tokens_per_problem']:7.1f}  "
        f"wall {wall:6.1f} s  s/1k tokens {row['wall_per_1k_generated']:.3f}  calls {row['engine_calls']}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_POLICY)
    ap.add_argument("--n-problems", type=int, default=200)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--expansions", type=int, default=8)
    ap.add_argument("--batch-problems", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/search_budget.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = generate_problems(args.n_problems, args.steps, seed=1)
    cap = 20 * args.steps + 12
    rows = [
        run("greedy", best_of_n, problems, args, n=1, temperature=0.0, max_tokens=cap, aggregate=best_score)
    ]
    beam = run("beam", beam_search, problems, args, beam_width=args.beam_width, expansions=args.expansions)
    # match best-of-N's N to beam's spend: N ≈ beam tokens / greedy solution length
    n = max(1, round(beam["generated_tokens_per_problem"] / rows[0]["generated_tokens_per_problem"]))
    rows.append(run(f"majority@{n}", best_of_n, problems, args, n=n, max_tokens=cap, aggregate=majority_vote))
    rows.append(
        run(f"weighted-bon@{n}", best_of_n, problems, args, n=n, max_tokens=cap, aggregate=weighted_vote)
    )
    rows.insert(1, beam)
    bon = rows[-1]
    ratios = {
        "beam_wall_over_bon_wall": beam["wall_seconds"] / bon["wall_seconds"],
        "beam_wall_per_token_over_bon": beam["wall_per_1k_generated"] / bon["wall_per_1k_generated"],
        "beam_tokens_over_bon_tokens": beam["generated_tokens_per_problem"]
        / bon["generated_tokens_per_problem"],
    }
    print(
        f"beam / weighted-BoN: wall {ratios['beam_wall_over_bon_wall']:.2f}×, wall per generated token "
        f"{ratios['beam_wall_per_token_over_bon']:.2f}×, tokens {ratios['beam_tokens_over_bon_tokens']:.2f}×"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "ratios": ratios}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
