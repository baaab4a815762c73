"""Self-training at equal samples: ReST-MCTS* vs ReST-EM vs iterative MCTS-DPO on the shipped policy.

    .venv/bin/python benchmarks/selftrain.py --iterations 3 --problems-per-iter 64 --samples 8

Runs :func:`treeward.train.selftrain.selftrain` once per method, with the same problems, budgets and seeds, and
writes every method's per-iteration table to ``benchmarks/out/selftrain.json`` (after each method, so a partial
run still reports). Checkpoints go to ``--runs`` (default ``runs/selftrain-bench/<method>``); rerunning the same
command resumes each method after its last finished iteration. Targets (issue 5): 4-step greedy accuracy from
~37-45 % to >= 60 % within 3 iterations and <= 45 CPU-minutes, ReST-MCTS* above ReST-EM at equal samples.

The scale knobs (``--train-steps`` weights step counts by repetition, ``--lr``, ``--warmup``, ``--epochs``) and the
paper-fidelity switches (``--restart-from-base``, ``--mix-traces``; unset: each paper's own choice) go straight to
``selftrain``. The JSON records, per method, wall and CPU minutes (this process, every thread) summed over rows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.train.selftrain import METHODS, format_table, selftrain


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts such as 2,3,4,4, got {text!r}"
        ) from e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_POLICY)
    ap.add_argument("--prm", type=Path, default=None, help="initial PRM folder (default: none)")
    ap.add_argument("--methods", type=str, default=",".join(METHODS))
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--problems-per-iter", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument(
        "--train-steps", type=_steps, default=(2, 3, 4), help="step counts, cycled; repeat one to weight it"
    )
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--search-problems", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="policy lr (default: selftrain's per method)")
    ap.add_argument("--warmup", type=int, default=0, help="SFT warm-up steps (SFT methods)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prm-epochs", type=int, default=2)
    ap.add_argument("--restart-from-base", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--mix-traces", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=Path("runs/selftrain-bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/selftrain.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "methods": {},
    }
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        rows = selftrain(
            args.model,
            out_dir=args.runs / method,
            method=method,
            iterations=args.iterations,
            problems_per_iter=args.problems_per_iter,
            samples_per_problem=args.samples,
            train_steps=args.train_steps,
            eval_problems=args.eval_problems,
            search_problems=args.search_problems,
            epochs=args.epochs,
            lr=args.lr,
            warmup=args.warmup if method != "mcts-dpo" else 0,
            batch_size=args.batch_size,
            prm_epochs=args.prm_epochs,
            restart_from_base=args.restart_from_base,
            mix_traces=args.mix_traces if method != "mcts-dpo" else None,
            seed=args.seed,
            initial_prm=args.prm,
            log=lambda line: print(line, flush=True),
        )
        methods = results["methods"]
        assert isinstance(methods, dict)
        methods[method] = {
            "rows": [asdict(r) for r in rows],
            "minutes_total": sum(r.minutes for r in rows),
            "cpu_minutes_total": sum(r.cpu_minutes for r in rows),
            "wall_minutes_this_run": (time.perf_counter() - t0) / 60,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(format_table(rows), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
