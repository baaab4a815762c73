"""`selftrain`: one tiny iteration of each method with the shipped policy, resume after a kill, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from treeward._paths import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy
from treeward.rewards.base import Sample, Status
from treeward.train.selftrain import (
    IterationRow,
    SelfTrainError,
    UninformedScorer,
    format_table,
    selftrain,
)

torch.set_num_threads(1)

# 4 training problems (2-step, so solutions are short), 3 whole solutions' worth of tokens each, 2 held-out problems
TINY: dict[str, Any] = {
    "iterations": 1,
    "problems_per_iter": 4,
    "samples_per_problem": 3,
    "train_steps": (2,),
    "eval_problems": 2,
    "eval_steps": (2,),
    "search_problems": 2,
    "search_steps": 2,
    "epochs": 1,
    "log": None,
}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in HFPolicy.from_pretrained(folder).model.state_dict().items()}


@pytest.mark.parametrize("method", ["rest-mcts", "rest-em", "mcts-dpo"])
def test_one_iteration_writes_checkpoint_and_row(tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    rows = selftrain(SHIPPED_POLICY, out_dir=out, method=method, **TINY)
    # row 0 is the starting policy, row 1 the iteration
    assert [r.iteration for r in rows] == [0, 1]
    assert all(r.method == method for r in rows)
    first, row = rows
    assert set(row.greedy) == {"2"} and 0.0 <= row.greedy["2"] <= 1.0
    assert first.samples == 0 and first.train_loss is None
    if method == "rest-em":
        # best-of-N spends the budget on exactly samples_per_problem solutions: 4 problems × 3 = 12 terminals
        assert row.samples == 12
    # every terminal a training tree holds is a generated sample; budget 3 × (20·2 + 12) = 156 tokens a problem
    assert 0 < row.generated_tokens <= 4 * 156
    assert row.train_examples >= 1 and row.train_loss is not None

    # the checkpoint: a loadable policy whose weights moved, a PRM for rest-mcts only, the state with the row
    state = json.loads((out / "iter_1" / "state.json").read_text())
    assert IterationRow.from_dict(state["row"]) == row
    assert state["policy"] == "iter_1/policy"
    trained, shipped = _weights(out / "iter_1" / "policy"), _weights(SHIPPED_POLICY)
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)
    if method == "rest-mcts":
        assert state["prm"] == "iter_1/prm" and (out / "iter_1" / "prm" / "config.json").is_file()
        assert row.prm_examples >= 1
        assert row.search_kind == "mcts_star+prm"
    else:
        assert state["prm"] is None and not (out / "iter_1" / "prm").exists()
        assert row.prm_auc is None and row.prm_examples == 0
        assert row.search_kind == "majority@3"
    # the table files hold both rows, in order
    assert [IterationRow.from_dict(d) for d in json.loads((out / "table.json").read_text())] == rows
    assert (out / "table.md").read_text().strip() == format_table(rows)


def test_a_killed_run_resumes_after_the_last_finished_iteration(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lines: list[str] = []
    kw = {**TINY, "log": lines.append}
    full = selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **{**kw, "iterations": 2})
    assert [r.iteration for r in full] == [0, 1, 2]
    # kill during iteration 2: its checkpoint may be half written, its state.json (written last) is missing
    (out / "iter_2" / "state.json").unlink()
    shutil.rmtree(out / "iter_2" / "policy")
    finished = {k: (out / f"iter_{k}" / "state.json").stat().st_mtime_ns for k in (0, 1)}
    lines.clear()
    resumed = selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **{**kw, "iterations": 2})
    assert lines[0] == f"resuming {out}: iterations 0..1 already done"
    # iterations 0 and 1 were not run again: their states are untouched and their rows come back as they were
    assert {k: (out / f"iter_{k}" / "state.json").stat().st_mtime_ns for k in (0, 1)} == finished
    assert resumed[:2] == full[:2]
    # iteration 2 ran again from iteration 1's checkpoint, with the same seeds: the same numbers (wall time aside)
    assert replace(resumed[2], minutes=0.0) == replace(full[2], minutes=0.0)
    # asking for more iterations later goes on from there; asking for none extra runs nothing
    again = selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **{**kw, "iterations": 2})
    assert [asdict(r) for r in again] == [asdict(r) for r in resumed]


def test_a_run_folder_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **TINY)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SelfTrainError, match="other settings \\(method\\)"):
        selftrain(SHIPPED_POLICY, out_dir=out, method="mcts-dpo", **TINY)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"iterations": 0}, "iterations must be an integer ≥ 1, got 0"),
        ({"method": "ppo"}, "method must be one of rest-mcts, rest-em, mcts-dpo"),
        ({"samples_per_problem": 0}, "samples_per_problem must be an integer ≥ 1"),
        ({"eval_steps": (6,)}, "eval_steps must be a non-empty list of step counts in 1..5"),
        ({"initial_prm": "/no/such/prm"}, "no PRM folder at /no/such/prm"),
    ],
)
def test_bad_arguments_raise_one_clear_error_and_write_nothing(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SelfTrainError, match=message.replace("(", "\\(")):
        selftrain(SHIPPED_POLICY, out_dir=out, **{**TINY, **change})
    assert not out.exists()


def test_missing_policy_folder_is_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(SelfTrainError, match=r"no policy folder at .*nowhere"):
        selftrain(tmp_path / "nowhere", out_dir=out, **TINY)
    assert not out.exists()


def test_uninformed_scorer_has_no_preference() -> None:
    got = UninformedScorer()(
        [Sample(prompt="Q", response="a"), Sample(prompt="Q", response="b", partial=True)]
    )
    # every path 0.5: MCTS*'s quality step with r = 0.5 adds (1 - v)(2·0.5 - 1)/(m + 1) = 0
    assert [(r.score, r.status) for r in got] == [(0.5, Status.OK), (0.5, Status.OK)]


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "treeward.cli",
            "selftrain",
            "--iterations",
            "0",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: iterations must be an integer ≥ 1, got 0"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a fresh interpreter, model loads and 14 held-out evaluations: ~30 s on a busy 2-core box
def test_cli_runs_an_iteration_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--method", "rest-em", "--iterations", "1", "--problems-per-iter", "2", "--samples", "1"]
    args += ["--eval-problems", "2", "--search-problems", "2", "--epochs", "1", "--threads", "1"]
    r = subprocess.run(
        [sys.executable, "-m", "treeward.cli", "selftrain", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [IterationRow.from_dict(d) for d in json.loads((out / "table.json").read_text())]
    assert [row.iteration for row in rows] == [0, 1]
    # greedy accuracy at the default 2, 3 and 4 steps; the printed table is the saved one
    assert set(rows[1].greedy) == {"2", "3", "4"}
    assert format_table(rows) in r.stdout
    assert (out / "iter_1" / "policy" / "config.json").is_file()
