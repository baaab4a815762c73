"""`treeward bench` and its library (treeward.bench, treeward.registry): sweeps on a fake whose numbers are derived by
hand, the bootstrap CI, resuming, the files the command writes, and its error lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest
from typer.testing import CliRunner

from tests.fakes import StepBandit
from tests.test_search import CountingPRM
from treeward import bench as B
from treeward import registry
from treeward.cli import app
from treeward.registry import Entry, KnobError, Scale
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Problem, Tree, read_jsonl

P0 = Problem(
    "p0",
    "Q: Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. How many cards does Ann have?\n",
    "128",
    {"start": 54, "ops": [["*", 3], ["-", 34]]},
)


def _entries(*names: str, max_tokens: int = 100) -> list[Entry]:
    """Registry entries bound as the command binds them (max_tokens from the task)."""
    out = []
    for name in names:
        e = registry.get(name)
        out.append(replace(e, knobs=registry.resolve_knobs(e, defaults={"max_tokens": max_tokens})))
    return out


class _Factory:
    """A fresh StepBandit per chunk, counting how many it made and how many rows they expanded."""

    def __init__(self, problems: list[Problem], q: float) -> None:
        self.problems, self.q = problems, q
        self.made: list[StepBandit] = []

    def __call__(self) -> StepBandit:
        self.made.append(StepBandit(self.problems, q=self.q))
        return self.made[-1]

    @property
    def rows(self) -> int:
        return sum(sum(p.calls) for p in self.made)


def _bench(
    out: Path,
    problems: list[Problem],
    factory: _Factory,
    names: tuple[str, ...],
    budgets: list[int],
    **kw: Any,
):  # type: ignore[no-untyped-def]
    return B.bench(
        _entries(*names),
        budgets,
        kw.pop("seeds", [0]),
        problems,
        factory,
        ArithmeticSteps(),
        ArithmeticAnswer(),
        out,
        setup={"policy": f"StepBandit(q={factory.q})"},
        **kw,
    )


def _cell(results: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in results["cells"] if c["cell"] == name)


def _strip_wall(results: dict[str, Any]) -> dict[str, Any]:
    """The results without wall times (they differ between identical runs) and batched engine calls (they depend
    on how problems were cut into chunks)."""
    drop = {"wall_seconds", "wall_per_problem", "wall_by_phase", "engine_calls"}
    return {
        k: [{kk: vv for kk, vv in c.items() if kk not in drop} for c in v] if isinstance(v, list) else v
        for k, v in results.items()
    }


# ---------------------------------------------------------------------- numbers by hand
def test_sweep_on_an_always_right_bandit_by_hand(tmp_path: Path) -> None:
    # q = 1: every sample is the correct solution of P0, 48 tokens:
    #   "Step 1: 54*3=162\n" 17, "Step 2: 162-34=128\n" 19, "Answer: 128" 11 + EOS = 12.
    factory = _Factory([P0], q=1.0)
    res = _bench(tmp_path, [P0], factory, ("greedy", "weighted", "beam"), [256])
    prompt = len(StepBandit([P0]).encode_prompt(P0.prompt))  # BOS + one token per character

    greedy = _cell(res, "greedy-b256-s0")
    # one greedy sample: 48 tokens, one engine call; the fake computes prefix + generated - 1 tokens per row
    assert greedy["generated_tokens_per_problem"] == greedy["max_generated_tokens"] == 48
    assert greedy["accuracy"] == 1.0 and greedy["accuracy_ci"] == (1.0, 1.0)
    assert greedy["computed_tokens"] == prompt + 47
    assert greedy["unique_tree_tokens"] == prompt + 48
    assert greedy["engine_calls"] == 1

    weighted = _cell(res, "weighted-b256-s0")
    # n scales to 256 (never binds); samples of cap 100 come in waves while the rest of the budget pays for one:
    #   256 → 2 samples (96 spent), 160 → 1 (144), 112 → 1 (192), 64 < 100 stop: 4 samples, 192 tokens, 3 calls
    assert weighted["knobs"]["n"] == 256
    assert weighted["generated_tokens_per_problem"] == 4 * 48 == 192
    assert weighted["engine_calls"] == 3
    assert weighted["terminals_per_problem"] == 4
    assert weighted["computed_tokens"] == 4 * (prompt + 47)  # the fake has no prefix cache
    assert weighted["unique_tree_tokens"] == prompt + 192

    beam = _cell(res, "beam-b256-s0")
    # expansions = 256 // 128 = 2, width 2: depth 0 samples the root twice (2 × 17), depth 1 two beams twice
    # (4 × 19), depth 2 the answer lines (4 × 12), of which two finish the beam: 34 + 76 + 48 = 158 tokens
    assert beam["knobs"]["expansions"] == 2
    assert beam["generated_tokens_per_problem"] == 158
    assert beam["engine_calls"] == 3
    assert beam["computed_tokens"] == 2 * (prompt + 16) + 4 * (prompt + 17 + 18) + 4 * (prompt + 36 + 11)
    assert beam["unique_tree_tokens"] == prompt + 158
    assert beam["accuracy"] == 1.0

    # one row per (algorithm, budget) with one seed: the same numbers as the cell
    rows = {(r["algorithm"], r["budget"]): r for r in res["rows"]}
    assert rows["beam", 256]["generated_tokens_per_problem"] == 158
    assert rows["weighted", 256]["accuracy_ci"] == (1.0, 1.0)
    assert res["complete"] is True


def test_scorer_tokens_by_hand(tmp_path: Path) -> None:
    # CountingPRM reports prompt + response characters per scored path; the prompt of P0 is 100 characters
    factory = _Factory([P0], q=1.0)
    res = B.bench(
        _entries("greedy", "beam"), [256], [0], [P0], factory, CountingPRM(), ArithmeticAnswer(), tmp_path
    )
    # greedy: one path of 47 characters of text (EOS is no text): 100 + 47 = 147
    assert _cell(res, "greedy-b256-s0")["scored_tokens_per_problem"] == 147
    # beam (2 expansions, width 2, as in the hand case above): 2 paths of 17 characters, 4 of 17 + 19, 4 of
    # 17 + 19 + 11: 2·117 + 4·136 + 4·147 = 234 + 544 + 588 = 1366
    beam = _cell(res, "beam-b256-s0")
    assert beam["scored_tokens"] == beam["scored_tokens_per_problem"] == 1366
    md = B.markdown_table(res["rows"])
    assert "| scorer tokens / problem |" in md.splitlines()[0]
    # the beam row: computed / unique = 1370 / 259 = 5.290 (the hand case above; the fake has no cache), then
    # the scorer tokens, then 3 engine calls
    assert "| 1.000 [1.000, 1.000] | 158 (158) | 5.290 | 1366 | 3 |" in md


def test_kv_footprint_by_hand(tmp_path: Path) -> None:
    # REBASE at 256: width 256 // 64 = 4. q = 1, so every sample is the right line and every split is even.
    # depth 0 keeps the root alive: the prompt, 101 tokens (BOS + 100 characters); depth 1 its 4 children
    # "Step 1: 54*3=162\n" (17 each, 4 distinct nodes): 101 + 68 = 169; depth 2 their 4 children of 19 tokens:
    # 169 + 76 = 245; the answer lines then finish all 4 paths. Mean over depths: (101 + 169 + 245) / 3 = 171.67
    res = _bench(tmp_path, [P0], _Factory([P0], q=1.0), ("rebase", "weighted"), [256])
    assert _cell(res, "rebase-b256-s0")["kv_tokens_mean"] == pytest.approx((101 + 169 + 245) / 3)
    assert _cell(res, "weighted-b256-s0")["kv_tokens_mean"] is None  # best-of-N records none


def test_sweep_ranks_algorithms_as_the_bandit_predicts(tmp_path: Path) -> None:
    problems = generate_problems(8, 4, seed=7)
    factory = _Factory(problems, q=0.25)
    res = _bench(tmp_path, problems, factory, ("greedy", "beam"), [512, 1024], chunk_size=3)
    rows = {(r["algorithm"], r["budget"]): r for r in res["rows"]}
    # q = 0.25 < 0.5: greedy always writes the wrong line, so it never solves a problem, at any budget
    assert rows["greedy", 512]["accuracy"] == rows["greedy", 1024]["accuracy"] == 0.0
    # beam at 1024 (8 expansions per beam): a step is lost only if all 8 samples are wrong, 0.75**8 ≈ 0.10, so a
    # 4-step problem is solved with probability ≈ 0.9**4 ≈ 0.66 (seeded draw: at least 4 of 8)
    assert rows["beam", 1024]["accuracy"] >= 0.5
    for r in res["rows"]:
        assert r["max_generated_tokens"] <= r["budget"]
        lo, hi = r["accuracy_ci"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
    # 8 problems in chunks of 3: 3 chunks per cell, a fresh policy each
    assert len(factory.made) == 4 * 3


def test_seeds_pool_into_one_row(tmp_path: Path) -> None:
    problems = generate_problems(4, 2, seed=3)
    res = _bench(tmp_path, problems, _Factory(problems, q=0.5), ("weighted",), [256], seeds=[0, 1])
    [row] = res["rows"]
    cells = [_cell(res, "weighted-b256-s0"), _cell(res, "weighted-b256-s1")]
    assert row["seeds"] == [0, 1]
    # the row's accuracy is the mean over problems of the per-problem mean over seeds = the mean of the cells'
    assert row["accuracy"] == pytest.approx(sum(c["accuracy"] for c in cells) / 2)
    assert row["max_generated_tokens"] == max(c["max_generated_tokens"] for c in cells)
    assert row["computed_tokens"] == pytest.approx(sum(c["computed_tokens"] for c in cells) / 2)


# ---------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_hand_cases() -> None:
    assert B.bootstrap_ci([1.0] * 20) == (1.0, 1.0)  # every resample of all-correct has mean 1
    assert B.bootstrap_ci([0.0] * 5) == (0.0, 0.0)
    # two problems, one right: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % quantiles are 0 and 1
    assert B.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # seeded: the same values and seed give the same interval; it contains the mean and shrinks with more data
    x = [1.0] * 30 + [0.0] * 20
    assert B.bootstrap_ci(x, seed=3) == B.bootstrap_ci(x, seed=3)
    lo, hi = B.bootstrap_ci(x)
    assert lo < 0.6 < hi
    lo4, hi4 = B.bootstrap_ci(x * 4)
    assert hi4 - lo4 < hi - lo
    with pytest.raises(ValueError):
        B.bootstrap_ci([])


# ---------------------------------------------------------------------- resume
def test_rerun_searches_nothing_and_reports_the_same(tmp_path: Path) -> None:
    problems = generate_problems(5, 3, seed=1)
    first = _Factory(problems, q=0.5)
    res1 = _bench(tmp_path, problems, first, ("weighted", "beam"), [256], chunk_size=2)
    assert len(first.made) == 2 * 3
    again = _Factory(problems, q=0.5)
    res2 = _bench(tmp_path, problems, again, ("weighted", "beam"), [256], chunk_size=2)
    assert again.made == []  # no policy, no engine call
    assert res2 == res1  # wall times included: they come from the stored stats


def test_half_run_then_rest_only_equals_one_run(tmp_path: Path) -> None:
    problems = generate_problems(6, 3, seed=2)
    whole = _bench(tmp_path / "whole", problems, _Factory(problems, 0.5), ("beam",), [256], chunk_size=2)
    half = _Factory(problems, 0.5)
    _bench(tmp_path / "split", problems[:3], half, ("beam",), [256], chunk_size=2)
    rest = _Factory(problems, 0.5)
    split = _bench(tmp_path / "split", problems, rest, ("beam",), [256], chunk_size=2)
    # the rest only: 3 problems in chunks of 2 → 2 fresh policies, and they saw only problems 3..5
    assert len(rest.made) == 2
    assert {g for p in rest.made for g in p.ledger.groups} == {p.id for p in problems[3:]}
    assert _strip_wall(split) == _strip_wall(whole)
    trees = {t.problem.id: t for t in read_jsonl(tmp_path / "split" / "trees" / "beam-b256-s0.jsonl")}
    ref = {t.problem.id: t for t in read_jsonl(tmp_path / "whole" / "trees" / "beam-b256-s0.jsonl")}
    assert {k: t.to_dict() for k, t in trees.items()} == {k: t.to_dict() for k, t in ref.items()}


def test_interrupted_sweep_keeps_finished_chunks_and_resumes(tmp_path: Path) -> None:
    problems = generate_problems(6, 2, seed=4)
    sweep = B.cells(_entries("greedy", "weighted"), [256], [0])
    seen: list[str] = []

    def stop_after_three(cell: B.Cell, trees: Any) -> None:
        seen.append(cell.name)
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C after the third chunk is on disk

    factory = _Factory(problems, 0.5)
    plans = B.plan(sweep, problems, tmp_path, chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        B.run(plans, factory, ArithmeticSteps(), ArithmeticAnswer(), tmp_path, on_chunk=stop_after_three)
    # greedy finished (3 chunks of 2); weighted has not started
    assert len(read_jsonl(tmp_path / "trees" / "greedy-b256-s0.jsonl")) == 6
    assert not (tmp_path / "trees" / "weighted-b256-s0.jsonl").exists()
    partial = B.collect(sweep, problems, tmp_path)
    assert partial["complete"] is False and _cell(partial, "weighted-b256-s0")["n_problems"] == 0
    B.markdown_table(partial["rows"])  # a table with an empty row still renders

    rest = _Factory(problems, 0.5)
    plans = B.plan(sweep, problems, tmp_path, chunk_size=2)
    assert [len(p.chunks) for p in plans] == [0, 3]
    B.run(plans, rest, ArithmeticSteps(), ArithmeticAnswer(), tmp_path)
    assert len(rest.made) == 3
    assert B.collect(sweep, problems, tmp_path)["complete"] is True


def test_a_half_written_line_is_dropped_and_searched_again(tmp_path: Path) -> None:
    problems = generate_problems(4, 2, seed=5)
    _bench(tmp_path, problems, _Factory(problems, 0.5), ("greedy",), [256], chunk_size=2)
    trees_path = tmp_path / "trees" / "greedy-b256-s0.jsonl"
    stats_path = tmp_path / "trees" / "greedy-b256-s0.stats.jsonl"
    # a kill in the middle of the second chunk's stats line: its trees are on disk, its stats line is half there
    stats = stats_path.read_text().splitlines()
    stats_path.write_text(stats[0] + "\n" + stats[1][:20])
    again = _Factory(problems, 0.5)
    res = _bench(tmp_path, problems, again, ("greedy",), [256], chunk_size=2)
    assert len(again.made) == 1  # the second chunk is searched again
    assert stats_path.read_text().count("\n") == 2
    assert (
        len(read_jsonl(trees_path)) == 6
    )  # its first trees stay in the file; the report counts the last ones
    assert res["cells"][0]["n_problems"] == 4


def test_a_corrupt_record_is_an_error_naming_its_line(tmp_path: Path) -> None:
    problems = generate_problems(2, 2, seed=6)
    _bench(tmp_path, problems, _Factory(problems, 0.5), ("greedy",), [256])
    stats_path = tmp_path / "trees" / "greedy-b256-s0.stats.jsonl"
    stats_path.write_text(stats_path.read_text() + "{oops\n")
    with pytest.raises(B.BenchError, match=r"greedy-b256-s0\.stats\.jsonl:2: not valid JSON"):
        _bench(tmp_path, problems, _Factory(problems, 0.5), ("greedy",), [256])


def test_another_setup_or_other_knobs_is_an_error(tmp_path: Path) -> None:
    problems = generate_problems(2, 2, seed=6)
    _bench(tmp_path, problems, _Factory(problems, 0.5), ("weighted",), [256])
    with pytest.raises(B.BenchError, match="another setup"):
        _bench(tmp_path, problems, _Factory(problems, 0.9), ("weighted",), [256])
    hot = [replace(e, knobs={**e.knobs, "temperature": 0.7}) for e in _entries("weighted")]
    with pytest.raises(B.BenchError, match="knobs"):
        B.plan(B.cells(hot, [256], [0]), problems, tmp_path, setup={"policy": "StepBandit(q=0.5)"})
    other = [replace(problems[0], prompt=problems[1].prompt), problems[1]]
    with pytest.raises(B.BenchError, match="another problem"):
        B.plan(
            B.cells(_entries("weighted"), [256], [0]), other, tmp_path, setup={"policy": "StepBandit(q=0.5)"}
        )


def test_search_error_names_the_cell(tmp_path: Path) -> None:
    problems = generate_problems(2, 2, seed=6)
    with pytest.raises(B.BenchError, match=r"weighted-b64-s0: budget 64 is smaller than one sample's cap"):
        _bench(tmp_path, problems, _Factory(problems, 0.5), ("weighted",), [64])


# ---------------------------------------------------------------------- registry and knobs
def _toy(
    problems: Any,
    policy: Any,
    scorer: Any,
    budget: int,
    *,
    width: int = 2,
    c: float = 1.0,
    greedy: bool = False,
    mode: Literal["uct", "puct"] = "uct",
    depth: int | None = None,
    seed: int = 0,
) -> list[Tree]:
    return []


def test_knobs_are_parsed_against_the_signature() -> None:
    assert registry.parse_knob(_toy, "width", "4") == 4
    assert registry.parse_knob(_toy, "c", "0.5") == 0.5
    assert registry.parse_knob(_toy, "greedy", "true") is True
    assert registry.parse_knob(_toy, "mode", "puct") == "puct"
    assert registry.parse_knob(_toy, "depth", "none") is None
    assert registry.parse_knob(_toy, "depth", "3") == 3
    with pytest.raises(KnobError, match=r"expects an integer, got '1\.5'"):
        registry.parse_knob(_toy, "width", "1.5")
    with pytest.raises(KnobError, match="expects one of uct, puct"):
        registry.parse_knob(_toy, "mode", "ucb")
    with pytest.raises(KnobError, match="unknown knob 'beta'"):
        registry.parse_knob(_toy, "beta", "1")
    with pytest.raises(KnobError, match="not a knob"):
        registry.parse_knob(_toy, "seed", "1")
    # function-valued knobs by name
    assert registry.parse_knob_args(["aggregate=majority_vote"], ["weighted"])["weighted"][
        "aggregate"
    ].__name__ == ("majority_vote")


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=lambda e: e.name)
def test_every_registered_knob_round_trips_through_text(entry: Entry) -> None:
    # what `--knob name=<default>` parses to is the default itself, for every plain-valued knob of every entry
    for name, p in registry.knob_parameters(entry.fn).items():
        if isinstance(p.default, bool | int | float | str):
            assert registry.parse_knob(entry.fn, name, str(p.default)) == p.default, name
    for name, value in entry.knobs.items():
        text = registry.knob_json(value)
        assert registry.knob_json(registry.parse_knob(entry.fn, name, str(text))) == text, name


def test_knob_args_scope_and_errors() -> None:
    got = registry.parse_knob_args(["temperature=0.5", "beam.expansions=3"], ["weighted", "beam"])
    assert got == {"weighted": {"temperature": 0.5}, "beam": {"temperature": 0.5, "expansions": 3}}
    for args, needle in [
        (["nope=1"], "unknown knob 'nope'"),
        (["astar.n=1"], "unknown algorithm 'astar'"),
        (["greedy.n=1"], "not selected"),
        (["n"], "name=value"),
    ]:
        with pytest.raises(KnobError, match=needle):
            registry.parse_knob_args(args, ["weighted", "beam"])


def test_resolve_knobs_layers_and_scale() -> None:
    greedy, beam = registry.get("greedy"), registry.get("beam")
    # the command's settings reach only the functions that take them; the entry's own knobs win over them
    k = registry.resolve_knobs(
        greedy, defaults={"n": 8, "temperature": 1.0, "expansions": 4, "max_tokens": 92}
    )
    assert k == {
        "n": 1,
        "temperature": 0.0,
        "aggregate": registry.get("greedy").knobs["aggregate"],
        "max_tokens": 92,
    }
    assert registry.resolve_knobs(beam, budget=1024)["expansions"] == 8
    assert registry.resolve_knobs(beam, budget=100)["expansions"] == 1  # at least 1
    assert registry.resolve_knobs(beam, budget=1024, overrides={"expansions": 3})["expansions"] == 3
    with pytest.raises(KnobError):
        registry.resolve_knobs(beam, overrides={"n": 3})
    with pytest.raises(KnobError, match="has no knob"):
        Entry("bad", _toy, {"nope": 1})
    assert Scale("simulations", per=64).value(1024) == 16


# ---------------------------------------------------------------------- the command
# In-process (typer's runner): the same code path as `treeward bench`, without paying for a second interpreter's
# torch import. test_cli.py runs `treeward search` as a real subprocess.
def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """``--threads 1`` sets torch's global thread count: put it back for the tests that follow."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


TINY = (
    "--algorithms",
    "greedy,beam",
    "--budgets",
    "256",
    "--n-problems",
    "3",
    "--batch-problems",
    "2",
    "--threads",
    "1",
)


def test_bench_end_to_end_with_shipped_model(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "b"
    r = _invoke("bench", *TINY, "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "accuracy" in r.stdout and "beam" in r.stdout
    for name in (
        "results.json",
        "results.md",
        "accuracy_vs_tokens.png",
        "accuracy_vs_wall.png",
        "setup.json",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and res["interrupted"] is False
    assert res["environment"]["torch_threads"] == 1
    for cell in res["cells"]:
        trees = read_jsonl(out / "trees" / f"{cell['cell']}.jsonl")
        stats = [
            json.loads(x) for x in (out / "trees" / f"{cell['cell']}.stats.jsonl").read_text().splitlines()
        ]
        assert len(trees) == cell["n_problems"] == 3 and len(stats) == 2  # chunks of 2 and 1
        # the JSON's numbers are the trees' numbers
        assert cell["accuracy"] == sum(bool(t.correct) for t in trees) / 3
        assert cell["generated_tokens_per_problem"] == sum(t.generated_tokens for t in trees) / 3
        assert cell["max_generated_tokens"] == max(t.generated_tokens for t in trees) <= 256
        assert cell["computed_tokens"] == sum(t.ledger["computed"] for t in trees)
        assert cell["reused_tokens"] == sum(t.ledger["reused"] for t in trees)
        assert cell["unique_tree_tokens"] == sum(len(n.token_ids) for t in trees for n in t.nodes)
        assert cell["engine_calls"] == pytest.approx(sum(s["ledger"]["calls"] for s in stats))
        assert cell["wall_seconds"] == pytest.approx(sum(s["wall"] for s in stats))
        assert (
            0.8 <= cell["computed_per_unique"] <= 1.1
        )  # the prefix cache computes each tree token about once
    md = (out / "results.md").read_text()
    assert md.count("| greedy | 256 |") == 1 and md.count("| beam | 256 |") == 1

    # the same command again: nothing to search, the same numbers
    r = _invoke("bench", *TINY, "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "0 chunks to go" in r.stderr
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == res["cells"] and again["rows"] == res["rows"]


def test_bench_ctrl_c_writes_what_is_done_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "b"
    real_run = B.run

    def interrupted_run(plans: Any, *args: Any, on_chunk: Any = None) -> None:
        def chunk_then_ctrl_c(cell: B.Cell, trees: Any) -> None:
            on_chunk(cell, trees)
            raise KeyboardInterrupt

        real_run(plans, *args, on_chunk=chunk_then_ctrl_c)

    monkeypatch.setattr(B, "run", interrupted_run)
    r = _invoke("bench", *TINY, "--out", str(out))
    assert r.exit_code == 130, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] is True and res["complete"] is False
    assert [c["n_problems"] for c in res["cells"]] == [2, 0]  # greedy's first chunk only
    monkeypatch.setattr(B, "run", real_run)
    r = _invoke("bench", *TINY, "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "2 cell-problems already searched, 3 chunks to go" in r.stderr
    assert json.loads((out / "results.json").read_text())["complete"] is True


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["bench", "--algorithms", "greedy,astar"], ["error:", "unknown algorithm 'astar'"]),
        (["bench", "--knob", "beam.expansions=many"], ["error:", "beam.expansions", "integer", "'many'"]),
        (["bench", "--knob", "depth=3"], ["error:", "unknown knob 'depth'"]),
        (["bench", "--budgets", "256,x"], ["error:", "--budgets"]),
        (["bench", "--budgets", "0"], ["error:", "--budgets"]),
        (["search", "--algorithm", "beam", "--knob", "n=3"], ["error:", "unknown knob 'n'"]),
        (["search", "--algorithm", "astar"], ["error:", "unknown algorithm 'astar'"]),
    ],
)
def test_bad_algorithm_or_knob_is_one_error_line(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    r = _invoke(*args, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_a_budget_too_small_for_a_cell_names_it(tmp_path: Path) -> None:
    r = _invoke(
        "bench", "--algorithms", "weighted", "--budgets", "64", "--n-problems", "2", "--out", str(tmp_path)
    )
    assert r.exit_code == 2
    assert "weighted-b64-s0: budget 64 is smaller than one sample's cap of 92 tokens" in r.stderr
