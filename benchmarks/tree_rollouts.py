"""Tree rollouts vs independent sampling at equal leaf count, on the shipped policy.

    .venv/bin/python benchmarks/tree_rollouts.py [--n-problems 100] [--leaves 8] [--out
    benchmarks/out/tree_rollouts.json]

What is compared, per problem (``generate_problems(n, 4, seed=1)``, the held-out 4-step problems every
benchmark here uses), all at temperature 1 from the full distribution:

* **independent**: ``leaves`` whole solutions sampled from the prompt in one batched ``expand`` request
  (``n = leaves``, at most 92 new tokens each, cut into step nodes at newlines), as best-of-N samples them:
  the group GRPO trains on without a tree.
* **tree rollouts** (:func:`treeward.search.rollouts.tree_rollouts`, ``leaves`` finished leaves per tree,
  steps capped at 24 tokens): TreePO's fixed branching by 2 from the root, the same from step 2 or step 3 on
  (``FixedBranching(start=1 or 2)``: the first one or two steps shared by all leaves), TreeRL-style branching
  at the most uncertain step, TreePO segments of each ``--segment-tokens`` length, the longest segments again
  with the surprise gate (``FixedBranching(max_surprise=...)`` for each ``--max-surprise``: a path whose most
  surprising token so far has ``-log p`` above it stops branching), and fixed branching with early stop by the
  task's exact step verifier (an oracle process reward: it shows what pruning dead branches buys when the
  judge is right), alone and with the late branching.

Why TreePO ×2 costs 0.73× and not the ~0.47× of a binary tree over four steps: a solution here is five lines
(four steps of ~14 tokens and an ``Answer:`` line of ~7), and the root branches too, so the three binary levels
fall on steps 1–3 with 2, 4 and 8 nodes, and step 4 and the answer line are generated once per leaf: (2 + 4 + 8
+ 8) × 14 + 8 × 7 tokens against 8 × (4 × 14 + 7), 0.73. Nothing is regenerated and no extra root is started
(measured on 50 problems: not one fork node; a fork happens only when a path ends early).

Each configuration runs once per sampling seed (``--seeds``) and the numbers are pooled over seeds; the
correct-leaf fraction of each seed is kept too, since its spread shows the sampling noise. Measured per
configuration: generated tokens per finished leaf (a tree counts a shared prefix once; that is
what the engine generated), engine-computed tokens per leaf (prefill + decode; the prefix cache's effect), the
fraction of finished leaves whose ``Answer:`` is right (exact outcome verifier), the fraction of problems
whose group has both right and wrong leaves (the groups that give GRPO a gradient), and wall time. Ratios are
against independent sampling; the differences in correct-leaf and mixed-group fraction carry a 95 % paired
bootstrap interval (problem draws resampled, leaves of one draw kept together, the same draws for both
configurations), so "within noise" means the interval holds 0. Problems run in chunks; every configuration
runs its share of a chunk before the next chunk starts, so load from other jobs falls on all of them alike.
The policy's prefix cache is cleared before each configuration's share of a chunk.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy
from treeward.search.core import Budget, Request, expand, grade, init_trees
from treeward.search.rollouts import FixedBranching, finished_leaves, tree_rollouts
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Problem, Tree

PROBLEM_SEED = 1
SAMPLE_TOKENS = 92  # max new tokens per whole solution: 20 × steps + 12, as the other benchmarks
STEP_TOKENS = 24
BOOTSTRAP = 2000  # resamples for the paired intervals


def independent(problems: Sequence[Problem], policy: HFPolicy, *, leaves: int, seed: int) -> list[Tree]:
    """``leaves`` whole solutions per problem: one ``expand`` request of ``n = leaves`` per root, one call."""
    trees = init_trees(problems, policy, "independent")
    budgets = [Budget(leaves * SAMPLE_TOKENS) for _ in trees]
    requests = [Request(i, 0, leaves, SAMPLE_TOKENS) for i in range(len(trees))]
    expand(policy, trees, budgets, requests, temperature=1.0, seed=seed, stop=None)
    return trees


@dataclass
class Config:
    name: str
    run: Callable[..., list[Tree]]
    trees: dict[int, list[Tree]] = field(default_factory=dict)  # by sampling seed
    seconds: float = 0.0
    computed: int = 0


def configs(leaves: int, segment_tokens: Sequence[int], max_surprise: Sequence[float]) -> list[Config]:
    tree = partial(tree_rollouts, leaves=leaves, max_step_tokens=STEP_TOKENS)

    def segments(tokens: int, **kw: Any) -> Callable[..., list[Tree]]:
        return partial(
            tree,
            branching="segment",
            segment_tokens=tokens,
            max_depth=SAMPLE_TOKENS // tokens + 2,
            **kw,
        )

    longest = max(segment_tokens)
    return [
        Config("independent (n=leaves)", partial(independent, leaves=leaves)),
        Config("tree fixed ×2 (TreePO)", tree),
        Config("tree fixed ×2 from step 2", partial(tree, branch_on=FixedBranching(start=1))),
        Config("tree fixed ×2 from step 3", partial(tree, branch_on=FixedBranching(start=2))),
        Config("tree entropy (TreeRL-style)", partial(tree, branch_on="entropy")),
        *(Config(f"tree segments of {n}", segments(n)) for n in segment_tokens),
        *(
            Config(
                f"tree segments of {longest}, gate {gate:g}",
                segments(longest, branch_on=FixedBranching(max_surprise=gate)),
            )
            for gate in max_surprise
        ),
        Config("tree fixed ×2 + early stop (oracle)", partial(tree, early_stop=ArithmeticSteps())),
        Config(
            "tree from step 3 + early stop (oracle)",
            partial(tree, branch_on=FixedBranching(start=2), early_stop=ArithmeticSteps()),
        ),
    ]


def correct_fraction(trees: Sequence[Tree]) -> float:
    leaves = [n for t in trees for n in finished_leaves(t)]
    return sum(1 for n in leaves if n.outcome == 1.0) / len(leaves)


def _draws(c: Config) -> list[tuple[int, int]]:
    """(right leaves, finished leaves) per problem draw, in a fixed order: seeds, then problems."""
    out = []
    for seed in sorted(c.trees):
        for t in c.trees[seed]:
            f = finished_leaves(t)
            out.append((sum(1 for n in f if n.outcome == 1.0), len(f)))
    return out


def _fractions(draws: Sequence[tuple[int, int]], idx: Sequence[int]) -> tuple[float, float]:
    """Pooled correct-leaf fraction and mixed-group fraction of the draws at ``idx``."""
    right = sum(draws[i][0] for i in idx)
    total = sum(draws[i][1] for i in idx)
    mixed = sum(1 for i in idx if 0 < draws[i][0] < draws[i][1])
    return right / total, mixed / len(idx)


def paired_bootstrap(
    draws: Sequence[tuple[int, int]], base: Sequence[tuple[int, int]], *, n: int = BOOTSTRAP, seed: int = 0
) -> dict[str, list[float]]:
    """95 % percentile intervals of (this − base) in correct-leaf and mixed-group fraction, resampling problem
    draws with replacement (the same draws on both sides: every configuration ran the same problems and
    seeds)."""
    if len(draws) != len(base):
        raise ValueError(f"paired draws differ in number: {len(draws)} vs {len(base)}")
    rng = random.Random(seed)
    m = len(draws)
    deltas: list[tuple[float, float]] = []
    for _ in range(n):
        idx = [rng.randrange(m) for _ in range(m)]
        a, b = _fractions(draws, idx), _fractions(base, idx)
        deltas.append((a[0] - b[0], a[1] - b[1]))

    def interval(k: int) -> list[float]:
        v = sorted(d[k] for d in deltas)
        return [v[int(0.025 * n)], v[min(n - 1, int(0.975 * n))]]

    return {"correct_fraction_delta_ci95": interval(0), "mixed_group_delta_ci95": interval(1)}


def summarise(c: Config) -> dict[str, object]:
    """Pooled over every seed's trees, plus the correct-leaf fraction of each seed (its spread is the noise)."""
    trees = [t for ts in c.trees.values() for t in ts]
    n_problems = len(trees)
    leaves = [finished_leaves(t) for t in trees]
    n_leaves = sum(len(f) for f in leaves)
    right = [sum(1 for n in f if n.outcome == 1.0) for f in leaves]
    return {
        "problem_draws": n_problems,
        "leaves": n_leaves,
        "generated_tokens": sum(t.generated_tokens for t in trees),
        "tokens_per_leaf": sum(t.generated_tokens for t in trees) / n_leaves,
        "computed_per_leaf": c.computed / n_leaves,
        "correct_leaf_fraction": sum(right) / n_leaves,
        "correct_leaf_fraction_by_seed": [correct_fraction(ts) for ts in c.trees.values()],
        "problems_any_correct": sum(r > 0 for r in right) / n_problems,
        "problems_mixed_group": sum(0 < r < len(f) for r, f in zip(right, leaves, strict=True)) / n_problems,
        "seconds": c.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n-problems", type=int, default=100)
    parser.add_argument("--leaves", type=int, default=8)
    parser.add_argument(
        "--segment-tokens", type=int, nargs="+", default=[16, 24], help="one segment row per length"
    )
    parser.add_argument(
        "--max-surprise",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="surprise gates tried on the longest segments",
    )
    parser.add_argument(
        "--chunk", type=int, default=25, help="problems per chunk (configurations interleave)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds, pooled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/tree_rollouts.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy = HFPolicy.from_pretrained(str(SHIPPED_POLICY))
    problems = generate_problems(args.n_problems, 4, seed=PROBLEM_SEED)
    rows = configs(args.leaves, args.segment_tokens, args.max_surprise)
    for seed in args.seeds:
        for lo in range(0, len(problems), args.chunk):
            chunk = problems[lo : lo + args.chunk]
            for c in rows:
                policy.clear_cache()
                before = policy.ledger.total.computed
                t0 = time.perf_counter()
                trees = c.run(chunk, policy, seed=seed)
                c.seconds += time.perf_counter() - t0
                c.computed += policy.ledger.total.computed - before
                c.trees.setdefault(seed, []).extend(trees)
    for c in rows:
        for ts in c.trees.values():
            grade(ts, ArithmeticAnswer())
    results: dict[str, dict[str, Any]] = {c.name: summarise(c) for c in rows}
    base_draws = _draws(rows[0])
    for c in rows[1:]:
        results[c.name].update(paired_bootstrap(_draws(c), base_draws))
    base = results[rows[0].name]

    header = (
        f"{'configuration':<39} {'tok/leaf':>8} {'ratio':>6} {'comp/leaf':>9} {'correct':>8} "
        f"{'Δ [95% CI]':>24} {'mixed':>6} {'Δ [95% CI]':>24} {'wall s':>7} {'ratio':>6}"
    )
    print(
        f"{args.n_problems} four-step problems × seeds {args.seeds}, {args.leaves} leaves each, "
        f"{args.threads} thread(s); correct: pooled fraction of correct leaves; mixed: fraction of groups with "
        "right and wrong leaves; Δ: against independent, paired bootstrap over problem draws"
    )
    print(header)
    print("-" * len(header))

    def delta(d: float, ci: list[float] | None) -> str:
        return f"{d:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")

    for name, r in results.items():
        r["tokens_per_leaf_ratio"] = r["tokens_per_leaf"] / base["tokens_per_leaf"]
        r["computed_per_leaf_ratio"] = r["computed_per_leaf"] / base["computed_per_leaf"]
        r["correct_fraction_delta"] = r["correct_leaf_fraction"] - base["correct_leaf_fraction"]
        r["mixed_group_delta"] = r["problems_mixed_group"] - base["problems_mixed_group"]
        r["wall_ratio"] = r["seconds"] / base["seconds"]
        correct_ci = delta(r["correct_fraction_delta"], r.get("correct_fraction_delta_ci95"))
        mixed_ci = delta(r["mixed_group_delta"], r.get("mixed_group_delta_ci95"))
        print(
            f"{name:<39} {r['tokens_per_leaf']:>8.1f} {r['tokens_per_leaf_ratio']:>6.2f} "
            f"{r['computed_per_leaf']:>9.1f} {r['correct_leaf_fraction']:>8.3f} {correct_ci:>24} "
            f"{r['problems_mixed_group']:>6.2f} {mixed_ci:>24} {r['seconds']:>7.1f} {r['wall_ratio']:>6.2f}"
        )
    print("target (issue 6): tokens per leaf ≤ 0.5× independent, no loss in the fraction of correct leaves")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "n_problems": args.n_problems,
        "steps": 4,
        "problem_seed": PROBLEM_SEED,
        "leaves": args.leaves,
        "seeds": args.seeds,
        "segment_tokens": args.segment_tokens,
        "max_surprise": args.max_surprise,
        "bootstrap_resamples": BOOTSTRAP,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
