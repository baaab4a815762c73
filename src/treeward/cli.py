"""The ``treeward`` command.

Configuration lives here, at the edge: the command parses flags, builds the policy, the problems and the scorer,
and passes flat arguments to the library's functions. It owns files and progress bars; the library owns neither.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from treeward import registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="treeward: reward-guided search over language-model reasoning, and training signal from its trees.",
)

HELDOUT_SEED = 1
"""Problems seed of the held-out arithmetic set (training draws from a different stream)."""

DEFAULT_BENCH_ALGORITHMS = "greedy,majority,weighted,beam"
DEFAULT_BENCH_PROBLEMS = 50


@app.callback()
def _root() -> None:
    """treeward: reward-guided search over language-model reasoning, and training signal from its trees."""


def _fail(msg: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _load_policy(model: Path | None) -> Any:
    from transformers.utils import logging as hf_logging

    from treeward._paths import SHIPPED_POLICY
    from treeward.engine.hf import HFPolicy

    hf_logging.disable_progress_bar()  # the command shows its own progress
    return HFPolicy.from_pretrained(model if model is not None else SHIPPED_POLICY)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _load_problems(problems: Path | None, n_problems: int, steps: int) -> tuple[list[Any], str]:
    """The problems to search and a description of where they came from (bad input: one error line)."""
    from treeward.tasks import ProblemFileError, generate_problems, load_problems

    if n_problems < 1:
        _fail(f"--n-problems must be ≥ 1, got {n_problems}")
    try:
        if problems is not None:
            return load_problems(problems)[:n_problems], str(problems)
        if not 1 <= steps <= 5:
            _fail(f"--steps must be in 1..5, got {steps}")
        source = f"arithmetic:{steps}-step:seed{HELDOUT_SEED}"
        return generate_problems(n_problems, steps, seed=HELDOUT_SEED), source
    except ProblemFileError as e:
        _fail(str(e))


def _max_tokens(probs: Sequence[Any]) -> int:
    """Whole solutions need ~20 tokens a step plus the answer line (the feasibility study's cap)."""
    return 20 * (max(p.metadata.get("n_steps", 5) for p in probs)) + 12


ALGORITHMS = ", ".join(registry.REGISTRY)
SCORER_NAMES = ", ".join(registry.SCORERS) + " (steps: the exact step verifier; prm: the shipped learned PRM)"
SCALES = "Widths scaled with the budget: " + ", ".join(
    f"{e.name} {e.scale.knob} = budget // {e.scale.per}" for e in registry.ENTRIES if e.scale is not None
)
KNOB_HELP = (
    "A knob of the algorithm(s) as name=value, or algorithm.name=value for one of them (repeatable); "
    "checked against the search function's keyword-only parameters."
)


@app.command()
def search(
    algorithm: Annotated[str, typer.Option(help=f"Search algorithm: {ALGORITHMS}.")] = "beam",
    budget: Annotated[int, typer.Option(help="Generated-token budget per problem (a hard cap).")] = 1000,
    n_problems: Annotated[int, typer.Option(help="Number of held-out arithmetic problems.")] = 100,
    steps: Annotated[int, typer.Option(help="Steps per arithmetic problem (1-5).")] = 4,
    problems: Annotated[
        Path | None, typer.Option(help="JSONL file of {question, answer} problems instead.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Policy folder (from_pretrained); default: shipped.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/search-<time>).")] = None,
    n: Annotated[int, typer.Option(help="Samples per problem (best-of-N variants).")] = 8,
    beam_width: Annotated[int, typer.Option(help="Beam width (beam).")] = 2,
    expansions: Annotated[int, typer.Option(help="Samples per beam per step (beam).")] = 8,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    batch_problems: Annotated[int, typer.Option(help="Problems searched together in one batch.")] = 16,
    knob: Annotated[list[str] | None, typer.Option(help=KNOB_HELP)] = None,
    scorer: Annotated[
        str, typer.Option(help=f"Process scorer guiding the search: {SCORER_NAMES}.")
    ] = "steps",
) -> None:
    """Search problems with a policy and a scorer; write trees.jsonl and summary.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from treeward.search.core import SearchError, grade
    from treeward.tasks import ArithmeticAnswer
    from treeward.tree import write_jsonl

    try:
        entry = registry.get(algorithm)
        overrides = registry.parse_knob_args(knob or [], [entry.name])[entry.name]
        guide = registry.scorer(scorer)
    except ValueError as e:  # KnobError, or ModelLoadError from a scorer's model
        _fail(str(e))
    if budget <= 0:
        _fail(f"--budget must be a positive number of tokens, got {budget}")
    if batch_problems < 1:
        _fail(f"--batch-problems must be ≥ 1, got {batch_problems}")
    probs, source = _load_problems(problems, n_problems, steps)
    # the command's flags reach the algorithms that have such knobs; the entry's own knobs (greedy's n=1) win
    flags = {
        "n": n,
        "beam_width": beam_width,
        "expansions": expansions,
        "temperature": temperature,
        "max_tokens": _max_tokens(probs),
    }
    knobs = registry.resolve_knobs(entry, defaults=flags, overrides=overrides)
    try:
        policy = _load_policy(model)
    except ValueError as e:  # ModelLoadError
        _fail(str(e))
    outcome = ArithmeticAnswer()

    out = out or Path("runs") / f"search-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and any(out.iterdir()):
        _fail(f"output folder {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    trees_path = out / "trees.jsonl"
    trees_path.touch()

    done: list[Any] = []
    t0 = time.perf_counter()
    interrupted = False
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("acc {task.fields[acc]}"),
    )
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(entry.name, total=len(probs), acc="-")
        try:
            for chunk in _chunks(probs, batch_problems):
                trees = entry.fn(chunk, policy, guide, budget, seed=seed, **knobs)
                grade(trees, outcome)
                write_jsonl(trees, trees_path, append=True)
                done.extend(trees)
                acc = sum(bool(t.correct) for t in done) / len(done)
                bar.update(task, advance=len(chunk), acc=f"{acc:.3f}")
        except SearchError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            interrupted = True
    wall = time.perf_counter() - t0
    summary = summarize(entry.name, knobs, done, policy, wall=wall, budget=budget, seed=seed)
    summary.update(
        {
            "interrupted": interrupted,
            "n_requested": len(probs),
            "model": str(model) if model else "shipped:tiny-policy",
            "problems": source,
            "scorer": guide.name,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    typer.echo(
        f"{entry.name}: accuracy {summary['accuracy']:.3f} on {summary['n_problems']} problems, "
        f"{summary['generated_tokens_per_problem']:.0f} generated tokens/problem, {wall:.1f} s"
        + (" (interrupted)" if interrupted else "")
    )
    typer.echo(f"wrote {trees_path} and {out / 'summary.json'}")
    if interrupted:
        raise typer.Exit(130)


def summarize(
    algorithm: str,
    knobs: dict[str, Any],
    trees: Sequence[Any],
    policy: Any,
    *,
    wall: float,
    budget: int,
    seed: int,
) -> dict[str, Any]:
    """The run's numbers: accuracy and compute per problem, from the trees and the policy's ledger."""
    k = max(1, len(trees))
    total = policy.ledger.total
    return {
        "algorithm": algorithm,
        "knobs": {key: registry.knob_json(v) for key, v in knobs.items()},
        "budget": budget,
        "seed": seed,
        "n_problems": len(trees),
        "accuracy": sum(bool(t.correct) for t in trees) / k,
        "answered": sum(t.answer is not None for t in trees) / k,
        "generated_tokens_per_problem": sum(t.ledger.get("generated", 0) for t in trees) / k,
        "max_generated_tokens": max((t.ledger.get("generated", 0) for t in trees), default=0),
        "generated_tokens": total.generated,
        "computed_tokens": total.computed,
        "reused_tokens": total.reused,
        "scored_tokens": total.scored,
        "engine_calls": total.calls,
        "wall_seconds": wall,
        "wall_by_phase": dict(policy.ledger.wall),
    }


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{flag} takes comma-separated integers, got {text!r}")
    if not values:
        _fail(f"{flag} is empty")
    if len(set(values)) != len(values):
        _fail(f"{flag} repeats a value: {text!r}")
    return values


def _print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    """The sweep's rows as a terminal table (results.md has the same numbers)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "algorithm",
        "budget",
        "seeds",
        "problems",
        "accuracy [95% CI]",
        "tokens/problem (max)",
        "computed/unique",
        "scorer tokens/problem",
        "wall/problem",
    ):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for r in rows:
        if not r["n_problems"]:
            table.add_row(
                r["algorithm"], str(r["budget"]), ",".join(map(str, r["seeds"])), "0", "-", "-", "-", "-", "-"
            )
            continue
        lo, hi = r["accuracy_ci"]
        table.add_row(
            r["algorithm"],
            str(r["budget"]),
            ",".join(map(str, r["seeds"])),
            str(r["n_problems"]),
            f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]",
            f"{r['generated_tokens_per_problem']:.0f} ({r['max_generated_tokens']})",
            f"{r['computed_per_unique']:.3f}",
            f"{r['scored_tokens_per_problem']:.0f}",
            f"{1000 * r['wall_per_problem']:.0f} ms",
        )
    Console(width=140).print(table)


@app.command()
def bench(
    algorithms: Annotated[
        str, typer.Option(help=f"Comma-separated algorithms to sweep, from: {ALGORITHMS}. {SCALES}")
    ] = DEFAULT_BENCH_ALGORITHMS,
    budgets: Annotated[
        str, typer.Option(help="Comma-separated generated-token budgets per problem (hard caps).")
    ] = "256,512,1024",
    seeds: Annotated[str, typer.Option(help="Comma-separated sampling seeds.")] = "0",
    n_problems: Annotated[
        int, typer.Option(help="Number of held-out arithmetic problems.")
    ] = DEFAULT_BENCH_PROBLEMS,
    steps: Annotated[int, typer.Option(help="Steps per arithmetic problem (1-5).")] = 4,
    problems: Annotated[
        Path | None, typer.Option(help="JSONL file of {question, answer} problems instead.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Policy folder (from_pretrained); default: shipped.")
    ] = None,
    knob: Annotated[list[str] | None, typer.Option(help=KNOB_HELP)] = None,
    out: Annotated[
        Path, typer.Option(help="Output folder; rerunning the same command resumes from what it holds.")
    ] = Path("runs/bench"),
    batch_problems: Annotated[int, typer.Option(help="Problems searched together in one chunk.")] = 16,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % CIs.")] = 2000,
) -> None:
    """Sweep algorithms × budgets × seeds at equal generated-token budgets; write results.json, results.md, plots.

    Every cell gets the same hard cap in generated tokens per problem, and its width knob grows with the budget
    (see --algorithms; best-of-N's n never binds, so it draws as many samples as the cap pays for); the tables and
    plots use the tokens each cell actually spent. Trees go to <out>/trees/ as they are searched: rerun the same command
    after a Ctrl-C or a crash and only the missing problems are searched.
    """
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from treeward import bench as bench_lib
    from treeward.tasks import ArithmeticAnswer, ArithmeticSteps

    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    if not names:
        _fail("--algorithms is empty")
    if len(set(names)) != len(names):
        _fail(f"--algorithms repeats a name: {algorithms!r}")
    budget_list = _int_list(budgets, "--budgets")
    if min(budget_list) <= 0:
        _fail(f"--budgets must be positive numbers of tokens, got {budgets!r}")
    seed_list = _int_list(seeds, "--seeds")
    if batch_problems < 1:
        _fail(f"--batch-problems must be ≥ 1, got {batch_problems}")
    if bootstrap < 1:
        _fail(f"--bootstrap must be ≥ 1, got {bootstrap}")
    if threads is not None and threads < 1:
        _fail(f"--threads must be ≥ 1, got {threads}")
    try:
        found = [registry.get(a) for a in names]
        overrides = registry.parse_knob_args(knob or [], names)
    except registry.KnobError as e:
        _fail(str(e))
    probs, source = _load_problems(problems, n_problems, steps)
    entries = []
    for found_entry in found:
        ov = overrides[found_entry.name]
        knobs = registry.resolve_knobs(found_entry, defaults={"max_tokens": _max_tokens(probs)}, overrides=ov)
        # a width fixed with --knob is no longer scaled with the budget
        scale = found_entry.scale
        entries.append(replace(found_entry, knobs=knobs, scale=None if scale and scale.knob in ov else scale))
    try:
        loaded = _load_policy(model)
    except ValueError as e:  # ModelLoadError
        _fail(str(e))
    import torch

    from treeward.engine.hf import HFPolicy

    if threads is not None:
        torch.set_num_threads(threads)

    def fresh_policy() -> Any:  # same weights, empty ledger and KV store
        return HFPolicy(loaded.model, loaded.tokenizer)

    scorer, outcome = ArithmeticSteps(), ArithmeticAnswer()
    model_name = str(model) if model else "shipped:tiny-policy"
    setup = {"problems": source, "model": model_name, "scorer": scorer.name, "outcome": outcome.name}
    sweep = bench_lib.cells(entries, budget_list, seed_list)
    try:
        plans = bench_lib.plan(sweep, probs, out, chunk_size=batch_problems, setup=setup)
    except bench_lib.BenchError as e:
        _fail(str(e))
    total = sum(len(p.chunks) for p in plans)
    resumed = sum(p.done for p in plans)
    if resumed:
        typer.echo(
            f"resuming {out}: {resumed} cell-problems already searched, {total} chunks to go", err=True
        )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeElapsedColumn(),
    )
    t0 = time.perf_counter()
    interrupted = False
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("bench", total=total)

        def advance(cell: Any, trees: Sequence[Any]) -> None:
            bar.update(task, advance=1, description=cell.name)

        try:
            bench_lib.run(plans, fresh_policy, scorer, outcome, out, on_chunk=advance)
        except bench_lib.BenchError as e:
            _fail(f"{e} (finished trees are kept in {out / 'trees'})")
        except KeyboardInterrupt:
            interrupted = True
    wall = time.perf_counter() - t0
    results = bench_lib.collect(sweep, probs, out, n_boot=bootstrap)
    results = {
        "setup": setup,
        "algorithms": names,
        "budgets": sorted(budget_list),
        "seeds": seed_list,
        "n_problems": len(probs),
        "chunk_size": batch_problems,
        "budget_rule": {
            e.name: None if e.scale is None else {"knob": e.scale.knob, "per": e.scale.per} for e in entries
        },
        "environment": {"torch_threads": torch.get_num_threads(), "wall_seconds_this_run": wall},
        "interrupted": interrupted,
        **results,
    }
    title = f"{source} · {len(probs)} problems · {model_name} · {scorer.name}"
    paths = bench_lib.write_reports(results, out, title=title)

    _print_table(results["rows"], title + (" (interrupted)" if interrupted else ""))
    typer.echo(f"{wall:.1f} s; wrote {', '.join(str(p) for p in paths)}")
    if interrupted:
        raise typer.Exit(130)


@app.command()
def selftrain(
    method: Annotated[
        str, typer.Option(help="rest-mcts (ReST-MCTS*), rest-em (ReST-EM) or mcts-dpo.")
    ] = "rest-mcts",
    iterations: Annotated[int, typer.Option(help="Search-and-train rounds.")] = 3,
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder; rerunning the same command resumes after the last finished iteration."
        ),
    ] = Path("runs/selftrain"),
    model: Annotated[
        Path | None, typer.Option(help="Policy folder (from_pretrained); default: shipped.")
    ] = None,
    prm: Annotated[
        Path | None,
        typer.Option(
            help="PRM folder to search with first (default: the shipped PRM when installed, else none: an "
            "uninformed scorer)."
        ),
    ] = None,
    problems_per_iter: Annotated[int, typer.Option(help="Fresh training problems per iteration.")] = 64,
    samples: Annotated[
        int, typer.Option(help="Budget per training problem, in whole solutions (equal across methods).")
    ] = 8,
    eval_problems: Annotated[
        int, typer.Option(help="Held-out problems per step count (greedy accuracy).")
    ] = 100,
    search_problems: Annotated[
        int, typer.Option(help="Held-out 4-step problems for the search accuracy.")
    ] = 50,
    epochs: Annotated[int, typer.Option(help="Policy training passes per iteration.")] = 2,
    train_steps: Annotated[
        str, typer.Option(help="Training step counts, comma-separated and cycled; repeat one to weight it.")
    ] = "2,3,4",
    lr: Annotated[
        float | None, typer.Option(help="Policy learning rate (default: 3e-5 SFT, 1e-5 DPO).")
    ] = None,
    warmup: Annotated[int, typer.Option(help="SFT warm-up steps (rest-mcts, rest-em).")] = 0,
    restart_from_base: Annotated[
        bool | None,
        typer.Option(help="Train each round from the base weights (default: the paper's choice per method)."),
    ] = None,
    mix_traces: Annotated[
        bool | None,
        typer.Option(help="Train on every round's verified traces so far (default: the paper's choice)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of problems, sampling and training.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    """Self-train a policy from its own search trees (ReST-MCTS*, or the ReST-EM / MCTS-DPO baselines at equal
    samples); print and save a per-iteration table, checkpoint every iteration into <out>/iter_k/."""
    from treeward._paths import SHIPPED_POLICY, SHIPPED_PRM
    from treeward.train.selftrain import selftrain as run_selftrain

    if prm is None and (SHIPPED_PRM / "config.json").is_file():
        prm = SHIPPED_PRM

    if threads is not None and threads < 1:
        _fail(f"--threads must be ≥ 1, got {threads}")
    try:
        steps = tuple(int(s) for s in train_steps.split(",") if s.strip())
    except ValueError:
        _fail(f"--train-steps takes comma-separated step counts such as 2,3,4,4, got {train_steps!r}")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        rows = run_selftrain(
            model if model is not None else SHIPPED_POLICY,
            out_dir=out,
            method=method,
            iterations=iterations,
            problems_per_iter=problems_per_iter,
            samples_per_problem=samples,
            eval_problems=eval_problems,
            search_problems=search_problems,
            epochs=epochs,
            train_steps=steps,
            lr=lr,
            warmup=warmup,
            restart_from_base=restart_from_base,
            mix_traces=mix_traces,
            seed=seed,
            initial_prm=prm,
            log=lambda line: typer.echo(line, err=True),
        )
    except ValueError as e:  # SelfTrainError, ModelLoadError
        _fail(str(e))
    from treeward.train.selftrain import format_table

    typer.echo(format_table(rows))
    typer.echo(f"wrote {out / 'table.md'} and {out / 'table.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
