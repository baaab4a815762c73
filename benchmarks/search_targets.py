"""Every numeric target of the search suite (issue 3), measured side by side in one run on the shipped policy.

    .venv/bin/python benchmarks/search_targets.py --problems 200 --threads 1

One equal-budget sweep (``treeward.bench``: the same cells, files, resuming and statistics as ``treeward bench``)
on held-out 4-step arithmetic problems with the shipped policy and the exact step verifier:

* weighted best-of-N, beam, MCTS, REBASE, ETS and DTS* at every budget of ``--budgets`` (256, 512, 1024);
* every other tree search (DVTS, MCTS*, ToT BFS and DFS, DTS, VAS, VED) at the largest budget.

Chunks of all cells are run in rounds (every cell searches its k-th chunk before any cell searches its k+1-th), so
load from other jobs on the machine falls on all algorithms alike. Then each target is checked on the pooled rows:

1. the best tree search reaches ≥ 90 % with ≤ 1,000 generated tokens per problem (mean over problems; every
   problem is also under its hard cap);
2. MCTS ≥ weighted best-of-N in accuracy at every budget (the ReST-MCTS* claim);
3. tree-search wall time per problem ≤ 1.5× best-of-N's at equal generated tokens (weighted best-of-N's wall time
   at the tree search's spend, interpolated linearly between its budgets, extrapolated from its end segments),
   and computed tokens / unique tree tokens ≤ 1.1, for every tree-search cell (the worst is reported);
4. ETS computes ≥ 1.5× fewer tokens than REBASE at the same budget with accuracy within 2 points, and keeps a
   ≥ 1.5× smaller KV footprint (unique tree tokens the retained nodes keep alive, averaged over depths, the
   quantity behind the ETS paper's 1.8× claim);
5. DTS* reaches weighted best-of-N's accuracy with ≤ 1/3 of its generated tokens (DTS*'s tokens to reach each
   best-of-N budget's accuracy, interpolated linearly between DTS*'s budgets);
6. against llm-reasoners (``benchmarks/peer_llm_reasoners.py``, which runs the peer in its own virtual environment
   side by side with treeward): treeward's best ≥ the peer's accuracy at ≤ 0.5× its wall time per problem. With
   ``--peer`` that script runs now on the same problems and threads; otherwise its last recorded JSON is read and
   the row says so.

Prints the cells and a table of target / measured / pass; writes JSON to ``--out`` and the trees to
``<out folder>/search_targets-p<problems>-t<threads>/`` (rerunning the same command resumes: finished chunks are
read back, not searched again; their wall times are those of the run that searched them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treeward import bench, registry
from treeward._paths import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy
from treeward.registry import Entry
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems

STEPS = 4
HELDOUT_SEED = 1  # the problems of `treeward bench` and the other benchmarks
BON = "weighted"
SWEPT = (BON, "beam", "mcts", "rebase", "ets", "dts_star")
AT_TOP = ("dvts", "mcts_star", "tot_bfs", "tot_dfs", "dts", "vas", "ved")
BASELINES = frozenset(
    {"greedy", "bon", "majority", "weighted"}
)  # everything else in the registry is a tree search
PEER_SCRIPT = Path(__file__).with_name("peer_llm_reasoners.py")

Row = Mapping[str, Any]


# ---------------------------------------------------------------------- measures
def bon_wall_at(bon: Sequence[Row], tokens: float) -> float:
    """Best-of-N's wall time per problem at ``tokens`` generated tokens per problem: linear between its cells,
    extended linearly from the end segments (a single cell: proportional to tokens)."""
    pts = sorted((r["generated_tokens_per_problem"], r["wall_per_problem"]) for r in bon)
    if len(pts) == 1:
        return pts[0][1] * tokens / pts[0][0]
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if tokens <= x[0]:
        i = 0
    elif tokens >= x[-1]:
        i = len(x) - 2
    else:
        return float(np.interp(tokens, x, y))
    slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    return float(y[i] + slope * (tokens - x[i]))


def tokens_to_reach(points: Sequence[Row], accuracy: float) -> tuple[float | None, str]:
    """Generated tokens per problem at which a budget sweep first reaches ``accuracy``: linear between the last cell
    below it and the first at or above it. ``(None, why)`` when no cell reaches it; when the cheapest cell already
    does, its tokens (an upper bound, marked ``≤``)."""
    pts = sorted((r["generated_tokens_per_problem"], r["accuracy"]) for r in points)
    for k, (g, a) in enumerate(pts):
        if a >= accuracy:
            if k == 0:
                return g, "≤"
            g0, a0 = pts[k - 1]
            return g0 + (accuracy - a0) / (a - a0) * (g - g0), ""
    return None, f"not reached (best {max(a for _, a in pts):.3f})"


# ---------------------------------------------------------------------- the targets
def check_targets(
    rows: Sequence[Row], budgets: Sequence[int], peer: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """One record per checked target: ``target``, ``measured`` (text), ``pass`` (bool, or None when not checked),
    and the numbers behind it."""
    at = {(r["algorithm"], r["budget"]): r for r in rows if r["n_problems"]}
    tree = [r for r in at.values() if r["algorithm"] not in BASELINES]
    bon = [at[BON, b] for b in budgets if (BON, b) in at]
    out: list[dict[str, Any]] = []

    # 1. the best tree search at ≤ 1,000 generated tokens per problem
    cheap = [r for r in tree if r["generated_tokens_per_problem"] <= 1000]
    if cheap:
        best = max(cheap, key=lambda r: (r["accuracy"], -r["generated_tokens_per_problem"]))
        lo, hi = best["accuracy_ci"]
        out.append(
            {
                "target": "best tree search ≥ 0.90 at ≤ 1,000 generated tokens / problem",
                "measured": f"{best['algorithm']}@{best['budget']}: {best['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"at {best['generated_tokens_per_problem']:.0f} tokens (max {best['max_generated_tokens']})",
                "pass": best["accuracy"] >= 0.90,
                "algorithm": best["algorithm"],
                "budget": best["budget"],
                "accuracy": best["accuracy"],
                "generated_tokens_per_problem": best["generated_tokens_per_problem"],
            }
        )

    # 2. MCTS ≥ weighted best-of-N at every budget
    for b in budgets:
        if ("mcts", b) in at and (BON, b) in at:
            m, w = at["mcts", b], at[BON, b]
            out.append(
                {
                    "target": f"MCTS ≥ weighted best-of-N at budget {b}",
                    "measured": f"{m['accuracy']:.3f} vs {w['accuracy']:.3f} "
                    f"({m['generated_tokens_per_problem']:.0f} vs {w['generated_tokens_per_problem']:.0f} tokens)",
                    "pass": m["accuracy"] >= w["accuracy"],
                    "budget": b,
                    "mcts": m["accuracy"],
                    "bon": w["accuracy"],
                }
            )

    # 3. wall time at equal generated tokens, and computed / unique tree tokens, over every tree-search cell
    if bon and tree:
        ratios = {
            f"{r['algorithm']}@{r['budget']}": r["wall_per_problem"]
            / bon_wall_at(bon, r["generated_tokens_per_problem"])
            for r in tree
        }
        worst = max(ratios, key=lambda k: ratios[k])
        out.append(
            {
                "target": "tree-search wall / best-of-N wall at equal generated tokens ≤ 1.5 (every cell)",
                "measured": f"worst {worst}: {ratios[worst]:.2f}×; median {np.median(list(ratios.values())):.2f}×; "
                f"beam@{max(budgets)}: {ratios.get(f'beam@{max(budgets)}', float('nan')):.2f}×",
                "pass": ratios[worst] <= 1.5,
                "ratios": ratios,
            }
        )
    cpu = {
        f"{r['algorithm']}@{r['budget']}": r["computed_per_unique"] for r in tree if r["computed_per_unique"]
    }
    if cpu:
        worst = max(cpu, key=lambda k: cpu[k])
        out.append(
            {
                "target": "computed tokens / unique tree tokens ≤ 1.1 (every tree-search cell)",
                "measured": f"worst {worst}: {cpu[worst]:.3f}; median {np.median(list(cpu.values())):.3f}",
                "pass": cpu[worst] <= 1.1,
                "ratios": cpu,
            }
        )

    # 4. ETS against REBASE at each budget: computed tokens and the KV footprint, at accuracy within 2 points
    for b in budgets:
        if ("ets", b) not in at or ("rebase", b) not in at:
            continue
        e, r = at["ets", b], at["rebase", b]
        gap = e["accuracy"] - r["accuracy"]
        close = abs(gap) <= 0.02
        computed = r["computed_tokens"] / e["computed_tokens"]
        out.append(
            {
                "target": f"ETS ≥ 1.5× fewer computed tokens than REBASE, accuracy within 2 points (budget {b})",
                "measured": f"{computed:.2f}× fewer; accuracy {e['accuracy']:.3f} vs {r['accuracy']:.3f} "
                f"({100 * gap:+.1f} points)",
                "pass": computed >= 1.5 and close,
                "budget": b,
                "computed_ratio": computed,
                "accuracy_gap": gap,
            }
        )
        if e["kv_tokens_mean"] and r["kv_tokens_mean"]:
            kv = r["kv_tokens_mean"] / e["kv_tokens_mean"]
            out.append(
                {
                    "target": f"ETS KV footprint ≥ 1.5× smaller than REBASE's (seed claim 1.8×; budget {b})",
                    "measured": f"{kv:.2f}× ({e['kv_tokens_mean']:.0f} vs {r['kv_tokens_mean']:.0f} unique tokens "
                    "kept alive per depth)",
                    "pass": kv >= 1.5 and close,
                    "budget": b,
                    "kv_ratio": kv,
                }
            )

    # 5. DTS*: tokens to reach best-of-N's accuracy, against best-of-N's tokens
    dts = [at["dts_star", b] for b in budgets if ("dts_star", b) in at]
    for w in bon if dts else []:
        need, note = tokens_to_reach(dts, w["accuracy"])
        spent = w["generated_tokens_per_problem"]
        out.append(
            {
                "target": f"DTS* reaches weighted best-of-N@{w['budget']}'s accuracy with ≤ 1/3 of its tokens",
                "measured": f"best-of-N {w['accuracy']:.3f} at {spent:.0f} tokens; DTS* "
                + (note if need is None else f"{note}{need:.0f} tokens ({need / spent:.2f}× best-of-N's)"),
                "pass": need is not None and need <= spent / 3,
                "budget": w["budget"],
                "dts_star_tokens": need,
                "bon_tokens": spent,
            }
        )

    # 6. the peer, from benchmarks/peer_llm_reasoners.py's side-by-side run
    if peer is not None:
        where = "this run" if peer["ran_now"] else f"recorded in {peer['path']}"
        for c in peer["data"].get("ratios", []):
            out.append(
                {
                    "target": f"treeward's best ≥ {c['peer']}'s accuracy at ≤ 0.5× its wall time / problem",
                    "measured": f"{c['treeward']}: {100 * c['accuracy_difference']:+.1f} points, "
                    f"{c['wall_per_problem_ratio']:.2f}× wall, {c['tokens_ratio']:.2f}× tokens ({where})",
                    "pass": bool(c["target_met"]),
                    "measured_in_this_run": peer["ran_now"],
                    **c,
                }
            )
    return out


# ---------------------------------------------------------------------- running
def _entries(names: Sequence[str]) -> list[Entry]:
    """Registry entries bound as ``treeward bench`` binds them (``max_tokens`` from the problems' length)."""
    out = []
    for name in names:
        e = registry.get(name)
        out.append(replace(e, knobs=registry.resolve_knobs(e, defaults={"max_tokens": 20 * STEPS + 12})))
    return out


def run_sweep(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    problems = generate_problems(args.problems, STEPS, seed=HELDOUT_SEED)
    budgets = sorted(args.budgets)
    sweep = [
        *bench.cells(_entries(SWEPT), budgets, args.seeds),
        *bench.cells(_entries(AT_TOP), [budgets[-1]], args.seeds),
    ]
    scorer, outcome = ArithmeticSteps(), ArithmeticAnswer()
    setup = {
        "problems": f"arithmetic:{STEPS}-step:seed{HELDOUT_SEED}",
        "model": "shipped:tiny-policy",
        "scorer": scorer.name,
        "outcome": outcome.name,
        "torch_threads": args.threads,
    }
    plans = bench.plan(sweep, problems, folder, chunk_size=args.chunk_size, setup=setup)
    model = HFPolicy.from_pretrained(SHIPPED_POLICY)

    def fresh_policy() -> HFPolicy:  # same weights, empty ledger and KV store
        return HFPolicy(model.model, model.tokenizer)

    rounds = max((len(p.chunks) for p in plans), default=0)
    for k in range(rounds):  # every cell's k-th chunk before any cell's (k+1)-th
        for p in plans:
            if k < len(p.chunks):
                t0 = time.perf_counter()
                bench.run(
                    [bench.CellPlan(p.cell, [p.chunks[k]], p.done)], fresh_policy, scorer, outcome, folder
                )
                print(
                    f"round {k + 1}/{rounds}  {p.cell.name:<24} {len(p.chunks[k]):>3} problems "
                    f"{time.perf_counter() - t0:6.1f} s",
                    flush=True,
                )
    return bench.collect(sweep, problems, folder)


def peer_results(args: argparse.Namespace) -> dict[str, Any] | None:
    """The peer comparison: run now with ``--peer``, else the last recorded JSON (``None`` if there is none)."""
    path = args.out.parent / "peer_llm_reasoners.json"
    if args.peer:
        cmd = [
            sys.executable,
            str(PEER_SCRIPT),
            "--n-problems",
            str(args.problems),
            "--threads",
            str(args.threads),
        ]
        subprocess.run([*cmd, "--seed", str(args.seeds[0]), "--out", str(path)], check=True)
    if not path.exists():
        return None
    return {"path": str(path), "ran_now": args.peer, "data": json.loads(path.read_text())}


def _fmt_cells(rows: Sequence[Row], bon: Sequence[Row]) -> str:
    head = (
        f"{'algorithm':<10} {'budget':>6} {'accuracy':>8} {'tokens':>7} {'wall ms':>8} {'÷ BoN':>6} "
        f"{'comp/uniq':>9} {'KV':>6}"
    )
    lines = [head]
    for r in rows:
        if not r["n_problems"]:
            continue
        ratio = (
            r["wall_per_problem"] / bon_wall_at(bon, r["generated_tokens_per_problem"])
            if bon
            else float("nan")
        )
        kv = "–" if r["kv_tokens_mean"] is None else f"{r['kv_tokens_mean']:.0f}"
        lines.append(
            f"{r['algorithm']:<10} {r['budget']:>6} {r['accuracy']:>8.3f} {r['generated_tokens_per_problem']:>7.0f} "
            f"{1000 * r['wall_per_problem']:>8.0f} {ratio:>6.2f} {r['computed_per_unique'] or float('nan'):>9.3f} "
            f"{kv:>6}"
        )
    return "\n".join(lines)


def _fmt_targets(targets: Sequence[Mapping[str, Any]]) -> str:
    width = max(len(t["target"]) for t in targets)
    lines = [f"{'target':<{width}}  pass  measured"]
    for t in targets:
        mark = "–" if t["pass"] is None else ("yes" if t["pass"] else "NO")
        lines.append(f"{t['target']:<{width}}  {mark:<4}  {t['measured']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=200, help="held-out 4-step problems (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0], help="e.g. 0,1,2")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024])
    ap.add_argument("--chunk-size", type=int, default=16, help="problems searched together (default 16)")
    ap.add_argument(
        "--peer", action="store_true", help="run benchmarks/peer_llm_reasoners.py now (needs .peer-venv)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/search_targets.json"))
    args = ap.parse_args()
    if args.problems < 1 or args.threads < 1 or not args.seeds or min(args.budgets) < 1:
        ap.error("--problems, --threads and --budgets must be ≥ 1, and --seeds non-empty")
    torch.set_num_threads(args.threads)
    folder = args.out.parent / f"search_targets-p{args.problems}-t{args.threads}"
    t0 = time.perf_counter()
    results = run_sweep(args, folder)
    peer = peer_results(args)
    budgets = sorted(args.budgets)
    targets = check_targets(results["rows"], budgets, peer)
    bon = [r for r in results["rows"] if r["algorithm"] == BON and r["n_problems"]]
    print()
    print(f"{args.problems} problems × seeds {args.seeds}, {args.threads} torch thread(s); trees in {folder}")
    print(_fmt_cells(results["rows"], bon))
    print()
    print(_fmt_targets(targets))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_seconds_this_run": time.perf_counter() - t0,
        "targets": targets,
        "passed": sum(bool(t["pass"]) for t in targets),
        "checked": sum(t["pass"] is not None for t in targets),
        **results,
    }
    args.out.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    print(f"\n{record['passed']}/{record['checked']} targets met; wrote {args.out}")


if __name__ == "__main__":
    main()
