"""The ``treeward`` command.

Configuration lives here, at the edge: the command parses flags, builds the policy, the problems and the scorer,
and passes flat arguments to the library's functions. It owns files and progress bars; the library owns neither.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="treeward: reward-guided search over language-model reasoning, and training signal from its trees.",
)

HELDOUT_SEED = 1
"""Problems seed of the held-out arithmetic set (training draws from a different stream)."""


class Algorithm(StrEnum):
    greedy = "greedy"
    bon = "bon"
    majority = "majority"
    weighted = "weighted"
    beam = "beam"


@dataclass(frozen=True)
class SearchSpec:
    """An algorithm bound to its knobs: ``run(problems, policy, scorer, budget, seed)``."""

    name: str
    run: Callable[..., list[Any]]
    knobs: dict[str, Any]


def build_search(
    algorithm: Algorithm, *, n: int, beam_width: int, expansions: int, temperature: float, max_tokens: int
) -> SearchSpec:
    """Bind an algorithm name and flags to a search function (the only place names map to functions)."""
    from treeward.search import beam_search, best_of_n, best_score, majority_vote, weighted_vote

    if algorithm is Algorithm.greedy:
        knobs: dict[str, Any] = {
            "n": 1,
            "temperature": 0.0,
            "aggregate": best_score,
            "max_tokens": max_tokens,
        }
        return SearchSpec("greedy", best_of_n, knobs)
    if algorithm in (Algorithm.bon, Algorithm.majority, Algorithm.weighted):
        agg = {
            Algorithm.bon: best_score,
            Algorithm.majority: majority_vote,
            Algorithm.weighted: weighted_vote,
        }
        knobs = {"n": n, "temperature": temperature, "aggregate": agg[algorithm], "max_tokens": max_tokens}
        return SearchSpec(f"bon-{agg[algorithm].__name__}", best_of_n, knobs)
    knobs = {"beam_width": beam_width, "expansions": expansions, "temperature": temperature}
    return SearchSpec("beam", beam_search, knobs)


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


@app.command()
def search(
    algorithm: Annotated[Algorithm, typer.Option(help="Search algorithm.")] = Algorithm.beam,
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
) -> None:
    """Search problems with a policy and a scorer; write trees.jsonl and summary.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from treeward.search.core import SearchError, grade
    from treeward.tasks import (
        ArithmeticAnswer,
        ArithmeticSteps,
        ProblemFileError,
        generate_problems,
        load_problems,
    )
    from treeward.tree import write_jsonl

    if budget <= 0:
        _fail(f"--budget must be a positive number of tokens, got {budget}")
    if batch_problems < 1:
        _fail(f"--batch-problems must be ≥ 1, got {batch_problems}")
    try:
        if problems is not None:
            probs = load_problems(problems)[:n_problems]
        else:
            if not 1 <= steps <= 5:
                _fail(f"--steps must be in 1..5, got {steps}")
            if n_problems < 1:
                _fail(f"--n-problems must be ≥ 1, got {n_problems}")
            probs = generate_problems(n_problems, steps, seed=HELDOUT_SEED)
    except ProblemFileError as e:
        _fail(str(e))
    # whole solutions need ~20 tokens a step plus the answer line (the feasibility study's cap)
    max_tokens = 20 * (max(p.metadata.get("n_steps", 5) for p in probs)) + 12
    spec = build_search(
        algorithm,
        n=n,
        beam_width=beam_width,
        expansions=expansions,
        temperature=temperature,
        max_tokens=max_tokens,
    )
    try:
        policy = _load_policy(model)
    except ValueError as e:  # ModelLoadError
        _fail(str(e))
    scorer, outcome = ArithmeticSteps(), ArithmeticAnswer()

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
        task = bar.add_task(spec.name, total=len(probs), acc="-")
        try:
            for chunk in _chunks(probs, batch_problems):
                trees = spec.run(chunk, policy, scorer, budget, seed=seed, **spec.knobs)
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
    summary = summarize(spec, done, policy, wall=wall, budget=budget, seed=seed)
    summary.update(
        {
            "interrupted": interrupted,
            "n_requested": len(probs),
            "model": str(model) if model else "shipped:tiny-policy",
            "problems": str(problems) if problems else f"arithmetic:{steps}-step:seed{HELDOUT_SEED}",
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    typer.echo(
        f"{spec.name}: accuracy {summary['accuracy']:.3f} on {summary['n_problems']} problems, "
        f"{summary['generated_tokens_per_problem']:.0f} generated tokens/problem, {wall:.1f} s"
        + (" (interrupted)" if interrupted else "")
    )
    typer.echo(f"wrote {trees_path} and {out / 'summary.json'}")
    if interrupted:
        raise typer.Exit(130)


def summarize(
    spec: SearchSpec, trees: Sequence[Any], policy: Any, *, wall: float, budget: int, seed: int
) -> dict[str, Any]:
    """The run's numbers: accuracy and compute per problem, from the trees and the policy's ledger."""
    k = max(1, len(trees))
    total = policy.ledger.total
    return {
        "algorithm": spec.name,
        "knobs": {key: getattr(v, "__name__", v) for key, v in spec.knobs.items()},
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
        "engine_calls": total.calls,
        "wall_seconds": wall,
        "wall_by_phase": dict(policy.ledger.wall),
    }


def main() -> None:
    app()


if __name__ == "__main__":
    main()
