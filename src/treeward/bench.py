"""Equal-budget sweeps: algorithms × budgets × seeds on one set of problems, resumable, with tables and plots.

A *cell* is one algorithm (a :class:`~treeward.registry.Entry` with its knobs bound) at one budget and one seed.
Each cell searches the problems in chunks and appends, after every chunk,

* the chunk's trees (graded) to ``<out>/trees/<algorithm>-b<budget>-s<seed>.jsonl``, then
* one line to ``<out>/trees/<algorithm>-b<budget>-s<seed>.stats.jsonl``: the chunk's problem ids, the cell's
  knobs, the search's wall time, the policy's wall time per phase and its ledger totals.

A problem is done when both hold it, so an interrupted sweep (Ctrl-C, a crash, a limit) loses at most the chunk in
flight, and rerunning the same sweep searches only what is missing (:func:`plan`). Every chunk gets a fresh policy
from ``make_policy``: its numbers (computed and reused tokens, engine calls) then depend on the chunk alone, so a
resumed cell reports what an uninterrupted one would (wall time aside).

The report (:func:`collect`) is recomputed from the stored trees and stats, never from memory: accuracy with a
seeded percentile-bootstrap 95 % CI over problems, actual generated tokens per problem (mean and max; max ≤ budget),
computed and reused tokens, computed / unique tree tokens, scorer tokens (what a model-based scorer computed, from
the trees' ledgers; 0 for rule-based scorers), engine calls, wall time per phase and per problem, and the KV
footprint of the algorithms that record one (REBASE and ETS: ``tree.metadata["kv_tokens_mean"]``, the distinct
tree tokens the retained nodes keep alive, averaged over depths).
Chunk-level numbers (wall time, batched engine calls) are shared equally among the chunk's problems, so a report
over any subset of the problems stays consistent. :func:`write_reports` writes ``results.json``, ``results.md`` and
two plots (accuracy vs generated tokens, accuracy vs wall time per problem).

Budgets are the same hard cap for every algorithm; how each algorithm's width grows with the budget is the
registry's :class:`~treeward.registry.Scale` (see :mod:`treeward.registry`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from treeward.engine.base import Policy
from treeward.registry import Entry, knob_json, knob_parameters, resolve_knobs
from treeward.rewards.base import Reward
from treeward.search.core import SearchError, grade
from treeward.tree import Problem, Tree, TreeFormatError, write_jsonl

__all__ = [
    "BenchError",
    "Cell",
    "CellPlan",
    "bench",
    "bootstrap_ci",
    "collect",
    "markdown_table",
    "plan",
    "run",
    "write_reports",
]

SETUP_FILE = "setup.json"


class BenchError(ValueError):
    """A sweep that cannot run or resume: a search error in a cell, or an output folder from another setup."""


@dataclass(frozen=True)
class Cell:
    """One algorithm at one budget and one seed."""

    entry: Entry
    budget: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.entry.name}-b{self.budget}-s{self.seed}"

    @property
    def knobs(self) -> dict[str, Any]:
        """The knobs this cell searches with: the entry's, its width scaled with the budget."""
        return resolve_knobs(self.entry, budget=self.budget)

    def knobs_json(self) -> dict[str, Any]:
        """Every knob the search runs with, the function's defaults included, as JSON (stored with each chunk:
        resuming with other knobs is an error)."""
        params = knob_parameters(self.entry.fn)
        full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        full.update(self.knobs)
        return {k: knob_json(v) for k, v in sorted(full.items())}


def cells(entries: Sequence[Entry], budgets: Sequence[int], seeds: Sequence[int]) -> list[Cell]:
    """Every (algorithm, budget, seed), algorithm-major, budgets ascending."""
    return [Cell(e, b, s) for e in entries for b in sorted(budgets) for s in seeds]


@dataclass
class CellPlan:
    """A cell and the problems it still has to search, in chunks."""

    cell: Cell
    chunks: list[list[Problem]]
    done: int


# ---------------------------------------------------------------------- files
def _paths(out: Path, cell: Cell) -> tuple[Path, Path]:
    d = out / "trees"
    return d / f"{cell.name}.jsonl", d / f"{cell.name}.stats.jsonl"


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a killed process left without its newline (appends would glue onto it)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    """One JSON line in one ``write`` call (a Ctrl-C never leaves half of it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record, allow_nan=False) + "\n").encode())
    finally:
        os.close(fd)


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) of the file's complete JSON lines; a last line without its newline (a killed writer)
    is left out."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[
        :-1
    ]  # after the last newline: nothing, or a partial line
    out = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except ValueError as e:
                raise BenchError(
                    f"{path}:{lineno}: not valid JSON ({e}); move the file away to redo the cell"
                ) from e
    return out


def _load_cell(out: Path, cell: Cell) -> tuple[dict[str, Tree], dict[str, dict[str, Any]]]:
    """The cell's finished trees by problem id and, for each, the stats record of the chunk that searched it.

    A problem is finished when both files hold it; when it was searched more than once (a crash between the two
    writes), its last tree and last record count. Reads only.
    """
    trees_path, stats_path = _paths(out, cell)
    by_problem: dict[str, dict[str, Any]] = {}
    for _, rec in _records(stats_path):
        for pid in rec["problems"]:
            by_problem[pid] = rec
    trees: dict[str, Tree] = {}
    for where, rec in _records(trees_path):
        try:
            t = Tree.from_dict(rec)
        except TreeFormatError as e:
            raise BenchError(f"{where}: {e}; move the file away to redo the cell") from e
        if t.problem.id in by_problem:
            trees[t.problem.id] = t
    return trees, {pid: rec for pid, rec in by_problem.items() if pid in trees}


def _check_setup(out: Path, setup: Mapping[str, Any]) -> None:
    path = out / SETUP_FILE
    want = json.loads(json.dumps(setup))
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in {*have, *want} if have.get(k) != want.get(k))
            raise BenchError(
                f"{out} holds a sweep with another setup ({', '.join(diff)} differ: "
                f"{', '.join(f'{k}={have.get(k)!r}' for k in diff)}); choose another output folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1) + "\n")


# ---------------------------------------------------------------------- plan and run
def plan(
    sweep: Sequence[Cell],
    problems: Sequence[Problem],
    out: Path,
    *,
    chunk_size: int = 16,
    setup: Mapping[str, Any] | None = None,
) -> list[CellPlan]:
    """What each cell still has to search: the problems not yet in its files, in chunks of ``chunk_size``.

    ``setup`` (JSON: task, policy, scorer, ...) is stored in ``<out>/setup.json`` on the first run and must match
    on every later one. A cell whose stored knobs differ from its knobs now, or whose stored problem under an id
    differs from the problem now, is an error: the folder holds another sweep.
    """
    if chunk_size < 1:
        raise BenchError(f"chunk size must be ≥ 1, got {chunk_size}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise BenchError("problem ids must be unique")
    names = [c.name for c in sweep]
    if len(set(names)) != len(names):
        raise BenchError(f"a cell appears twice in the sweep: {next(n for n in names if names.count(n) > 1)}")
    _check_setup(out, setup or {})
    (out / "trees").mkdir(parents=True, exist_ok=True)
    plans = []
    for cell in sweep:
        for path in _paths(out, cell):
            _drop_partial_line(path)  # appends must start on a fresh line
        trees, stats = _load_cell(out, cell)
        knobs = cell.knobs_json()
        for rec in stats.values():
            if rec["knobs"] != knobs:
                raise BenchError(
                    f"{cell.name} in {out} was searched with knobs {rec['knobs']}, now {knobs}; "
                    "choose another output folder"
                )
        for p in problems:
            if p.id in trees and trees[p.id].problem.prompt != p.prompt:
                raise BenchError(f"{cell.name} in {out} holds another problem under the id {p.id!r}")
        todo = [p for p in problems if p.id not in trees]
        chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
        plans.append(CellPlan(cell, chunks, done=len(problems) - len(todo)))
    return plans


def run(
    plans: Sequence[CellPlan],
    make_policy: Callable[[], Policy],
    scorer: Reward,
    outcome: Reward,
    out: Path,
    *,
    on_chunk: Callable[[Cell, Sequence[Tree]], None] | None = None,
) -> None:
    """Search every planned chunk with a fresh policy, grade it with ``outcome``, append trees then stats.

    ``on_chunk(cell, trees)`` is called after each chunk is on disk (a progress bar; raising stops the sweep with
    everything so far kept). A :class:`~treeward.search.core.SearchError` becomes a :class:`BenchError` naming the
    cell.
    """
    for p in plans:
        cell = p.cell
        trees_path, stats_path = _paths(out, cell)
        knobs = cell.knobs
        for chunk in p.chunks:
            policy = make_policy()
            t0 = time.perf_counter()
            try:
                trees = cell.entry.fn(chunk, policy, scorer, cell.budget, seed=cell.seed, **knobs)
            except SearchError as e:
                raise BenchError(f"{cell.name}: {e}") from e
            wall = time.perf_counter() - t0
            grade(trees, outcome)
            write_jsonl(trees, trees_path, append=True)
            _append_line(
                stats_path,
                {
                    "problems": [t.problem.id for t in trees],
                    "knobs": cell.knobs_json(),
                    "wall": wall,
                    "wall_by_phase": dict(policy.ledger.wall),
                    "ledger": policy.ledger.total.to_dict(),
                },
            )
            if on_chunk is not None:
                on_chunk(cell, trees)


# ---------------------------------------------------------------------- statistics
def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (resampled with replacement, seeded)."""
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _unique_tokens(tree: Tree) -> int:
    """Tokens of every node of the tree, the prompt included: what a perfect prefix cache computes once."""
    return sum(len(n.token_ids) for n in tree.nodes)


@dataclass
class _Acc:
    """Sums over the problems of one cell (or one row of several seeds)."""

    correct: list[float] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    scored: int = 0
    unique: int = 0
    calls: float = 0.0
    wall: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    terminals: int = 0
    answered: int = 0
    kv: list[float] = field(default_factory=list)

    def add(self, tree: Tree, rec: Mapping[str, Any]) -> None:
        share = 1 / len(rec["problems"])
        self.correct.append(1.0 if tree.correct else 0.0)
        self.generated.append(tree.generated_tokens)
        self.computed += int(tree.ledger.get("computed", 0))
        self.reused += int(tree.ledger.get("reused", 0))
        self.scored += int(tree.ledger.get("scored", 0))
        self.unique += _unique_tokens(tree)
        self.calls += rec["ledger"]["calls"] * share
        self.wall += rec["wall"] * share
        for k, v in rec["wall_by_phase"].items():
            self.phases[k] += v * share
        self.terminals += len(tree.terminals())
        self.answered += tree.answer is not None
        if "kv_tokens_mean" in tree.metadata:
            self.kv.append(float(tree.metadata["kv_tokens_mean"]))

    def numbers(self) -> dict[str, Any]:
        n = len(self.correct)
        return {
            "n_problems": n,
            "accuracy": sum(self.correct) / n,
            "answered": self.answered / n,
            "generated_tokens_per_problem": sum(self.generated) / n,
            "max_generated_tokens": max(self.generated),
            "computed_tokens": self.computed,
            "reused_tokens": self.reused,
            "unique_tree_tokens": self.unique,
            "computed_per_unique": self.computed / self.unique if self.unique else None,
            "computed_tokens_per_problem": self.computed / n,
            "scored_tokens": self.scored,
            "scored_tokens_per_problem": self.scored / n,
            "engine_calls": self.calls,
            "terminals_per_problem": self.terminals / n,
            # unique tree tokens kept alive per depth (REBASE/ETS record it), mean over depths and problems
            "kv_tokens_mean": sum(self.kv) / len(self.kv) if self.kv else None,
            "wall_seconds": self.wall,
            "wall_per_problem": self.wall / n,
            "wall_by_phase": dict(self.phases),
        }


def collect(
    sweep: Sequence[Cell],
    problems: Sequence[Problem],
    out: Path,
    *,
    n_boot: int = 2000,
    ci_seed: int = 0,
) -> dict[str, Any]:
    """The sweep's numbers, recomputed from the stored trees and stats of ``sweep``'s cells over ``problems``.

    Returns ``{"cells": [...], "rows": [...], "complete": bool}``: one entry per cell, and one row per (algorithm,
    budget) pooling its seeds. A row's accuracy is the mean over problems of each problem's mean correctness over
    the seeds, and its CI resamples problems (a problem is the unit that varies between benchmarks; seeds are
    averaged within it). A row covers the problems every one of its seeds has finished.
    """
    wanted = [p.id for p in problems]
    cell_out: list[dict[str, Any]] = []
    groups: dict[tuple[str, int], list[tuple[Cell, dict[str, Tree], dict[str, dict[str, Any]]]]] = {}
    complete = True
    for cell in sweep:
        trees, stats = _load_cell(out, cell)
        ids = [pid for pid in wanted if pid in trees]
        complete &= len(ids) == len(wanted)
        groups.setdefault((cell.entry.name, cell.budget), []).append((cell, trees, stats))
        entry: dict[str, Any] = {
            "cell": cell.name,
            "algorithm": cell.entry.name,
            "budget": cell.budget,
            "seed": cell.seed,
            "knobs": cell.knobs_json(),
            "n_requested": len(wanted),
        }
        if ids:
            acc = _Acc()
            for pid in ids:
                acc.add(trees[pid], stats[pid])
            entry.update(acc.numbers())
            entry["accuracy_ci"] = bootstrap_ci(acc.correct, n_boot=n_boot, seed=ci_seed)
        else:
            entry["n_problems"] = 0
        cell_out.append(entry)
    rows = []
    for (name, budget), members in groups.items():
        ids = [pid for pid in wanted if all(pid in trees for _, trees, _ in members)]
        row: dict[str, Any] = {
            "algorithm": name,
            "budget": budget,
            "seeds": [c.seed for c, _, _ in members],
            "knobs": members[0][0].knobs_json(),
            "n_requested": len(wanted),
        }
        if ids:
            acc = _Acc()
            for _, trees, stats in members:
                for pid in ids:
                    acc.add(trees[pid], stats[pid])
            per_problem = np.asarray(acc.correct).reshape(len(members), len(ids)).mean(axis=0)
            nums = acc.numbers()
            k = len(members)
            nums.update(
                {
                    "n_problems": len(ids),
                    "accuracy": float(per_problem.mean()),
                    "accuracy_ci": bootstrap_ci(per_problem.tolist(), n_boot=n_boot, seed=ci_seed),
                    # sums over seeds become per-seed means so rows compare with single cells
                    "computed_tokens": acc.computed / k,
                    "reused_tokens": acc.reused / k,
                    "scored_tokens": acc.scored / k,
                    "unique_tree_tokens": acc.unique / k,
                    "engine_calls": acc.calls / k,
                    "wall_seconds": acc.wall / k,
                    "wall_by_phase": {p: v / k for p, v in acc.phases.items()},
                }
            )
            row.update(nums)
        else:
            row["n_problems"] = 0
        rows.append(row)
    return {"cells": cell_out, "rows": rows, "complete": complete}


# ---------------------------------------------------------------------- reports
def _fmt_seeds(seeds: Sequence[int]) -> str:
    return ",".join(str(s) for s in seeds)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (algorithm, budget): accuracy with its CI, actual spend, cache efficiency, scorer tokens, wall
    time."""
    head = (
        "| algorithm | budget | seeds | problems | accuracy [95 % CI] | generated tokens / problem (max) "
        "| computed / unique tokens | scorer tokens / problem | engine calls | wall / problem |\n"
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if not r["n_problems"]:
            lines.append(
                f"| {r['algorithm']} | {r['budget']} | {_fmt_seeds(r['seeds'])} | 0 | – | – | – | – | – | – |"
            )
            continue
        lo, hi = r["accuracy_ci"]
        ratio = r["computed_per_unique"]
        lines.append(
            f"| {r['algorithm']} | {r['budget']} | {_fmt_seeds(r['seeds'])} | {r['n_problems']} "
            f"| {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {r['generated_tokens_per_problem']:.0f} ({r['max_generated_tokens']}) "
            f"| {'–' if ratio is None else f'{ratio:.3f}'} | {r['scored_tokens_per_problem']:.0f} "
            f"| {r['engine_calls']:.0f} "
            f"| {1000 * r['wall_per_problem']:.0f} ms |"
        )
    return head + "\n".join(lines) + "\n"


MARKERS = "osD^vP*X<>"
DODGE = 0.03
"""Horizontal offset between algorithms, in log2 units (±2 % in x): majority and weighted best-of-N spend exactly
the same tokens, and their error bars would otherwise hide each other. The JSON keeps the exact numbers."""


def _labels(x: Sequence[float], y: Sequence[float], budgets: Sequence[int]) -> list[tuple[float, float, str]]:
    """One label per cluster of nearby points (greedy spends about the same at every budget): budgets joined."""
    out: list[tuple[float, float, list[str]]] = []
    for xi, yi, b in sorted(zip(x, y, budgets, strict=True), key=lambda t: t[0]):
        if out and abs(math.log2(xi / out[-1][0])) < 0.2 and abs(yi - out[-1][1]) < 0.04:
            out[-1][2].append(str(b))
        else:
            out.append((xi, yi, [str(b)]))
    return [(xi, yi, ",".join(sorted(bs, key=int))) for xi, yi, bs in out]


def _plot(rows: Sequence[Mapping[str, Any]], x_key: str, xlabel: str, path: Path, title: str) -> None:
    """Accuracy (with CI error bars) against ``x_key`` on a log2 axis, one line per algorithm, points labelled
    with their budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_algo: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["n_problems"] and r[x_key] > 0:
            by_algo[r["algorithm"]].append(r)
    for i, (name, rs) in enumerate(by_algo.items()):
        rs = sorted(rs, key=lambda r: r["budget"])
        shift = 2 ** (DODGE * (i - (len(by_algo) - 1) / 2))
        x = [r[x_key] * shift for r in rs]
        y = [r["accuracy"] for r in rs]
        err = [
            [r["accuracy"] - r["accuracy_ci"][0] for r in rs],
            [r["accuracy_ci"][1] - r["accuracy"] for r in rs],
        ]
        line = ax.errorbar(x, y, yerr=err, marker=MARKERS[i % len(MARKERS)], capsize=3, label=name)
        for lx, ly, text in _labels(x, y, [r["budget"] for r in rs]):
            ax.annotate(
                text,
                (lx, ly),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=7,
                color=line[0].get_color(),
            )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (95 % bootstrap CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.margins(x=0.08)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best", title="algorithm (points: budget)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(results: Mapping[str, Any], out: Path, *, title: str = "") -> list[Path]:
    """Write ``results.json``, ``results.md`` and the two plots into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        out / "results.json",
        out / "results.md",
        out / "accuracy_vs_tokens.png",
        out / "accuracy_vs_wall.png",
    ]
    paths[0].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    head = f"{title}\n\n" if title else ""
    paths[1].write_text(head + markdown_table(results["rows"]))
    _plot(
        results["rows"],
        "generated_tokens_per_problem",
        "generated tokens per problem (actual)",
        paths[2],
        title,
    )
    _plot(results["rows"], "wall_per_problem", "wall seconds per problem", paths[3], title)
    return paths


def bench(
    entries: Sequence[Entry],
    budgets: Sequence[int],
    seeds: Sequence[int],
    problems: Sequence[Problem],
    make_policy: Callable[[], Policy],
    scorer: Reward,
    outcome: Reward,
    out: Path,
    *,
    chunk_size: int = 16,
    setup: Mapping[str, Any] | None = None,
    n_boot: int = 2000,
    on_chunk: Callable[[Cell, Sequence[Tree]], None] | None = None,
) -> dict[str, Any]:
    """Plan, run and collect a sweep (resuming whatever ``out`` already holds); returns :func:`collect`'s dict.

    Reports are not written: call :func:`write_reports` (the command does, with progress and a title).
    """
    sweep = cells(entries, budgets, seeds)
    run(
        plan(sweep, problems, out, chunk_size=chunk_size, setup=setup),
        make_policy,
        scorer,
        outcome,
        out,
        on_chunk=on_chunk,
    )
    return collect(sweep, problems, out, n_boot=n_boot)
