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
from treeward.credit.records import SFTExample
from treeward.engine.hf import HFPolicy
from treeward.rewards.base import Sample, Status
from treeward.train.selftrain import (
    IterationRow,
    SelfTrainError,
    UninformedScorer,
    format_table,
    selftrain,
)
from treeward.train.sft import train_sft

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


def _untimed(row: IterationRow) -> IterationRow:
    return replace(row, minutes=0.0, cpu_minutes=0.0, phase_cpu={})


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
    # CPU time is booked per phase; the PRM phase exists only where a PRM trains
    phases = {"collect", "policy", "eval"} | ({"prm"} if method == "rest-mcts" else set())
    assert set(row.phase_cpu) == phases and all(v > 0 for v in row.phase_cpu.values())
    assert row.cpu_minutes == pytest.approx(sum(row.phase_cpu.values()))
    assert set(first.phase_cpu) == {"eval"} and first.cpu_minutes == first.phase_cpu["eval"]

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
    # iteration 2 ran again from iteration 1's checkpoint, with the same seeds: the same numbers (times aside)
    assert _untimed(resumed[2]) == _untimed(full[2])
    # asking for more iterations later goes on from there; asking for none extra runs nothing
    again = selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **{**kw, "iterations": 2})
    assert [asdict(r) for r in again] == [asdict(r) for r in resumed]


def test_a_run_folder_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **TINY)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # the config records the resolved paper defaults: rest-em restarts from the base model, mcts-dpo does not
    with pytest.raises(SelfTrainError, match="other settings \\(method, restart_from_base\\)"):
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
        ({"method": "mcts-dpo", "mix_traces": True}, "mix_traces mixes verified SFT traces across rounds"),
        ({"restart_from_base": "yes"}, "restart_from_base must be True, False or None"),
        ({"mix_traces": 1}, "mix_traces must be True, False or None"),
        ({"warmup": -1}, "warmup must be an integer ≥ 0"),
        ({"method": "mcts-dpo", "warmup": 5}, "the DPO trainer has no warm-up"),
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


def _traces(folder: Path) -> list[SFTExample]:
    out = []
    for line in (folder / "traces.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append(
            SFTExample(
                **{**d, "prompt_ids": tuple(d["prompt_ids"]), "completion_ids": tuple(d["completion_ids"])}
            )
        )
    return out


def _trained(start: Path, traces: list[SFTExample], *, seed: int) -> dict[str, torch.Tensor]:
    """The weights ``selftrain`` should produce: ``start`` after SFT on ``traces`` with TINY's knobs (default SFT
    lr 3e-5, 1 epoch, batch 16) and the iteration's documented seed."""
    policy = HFPolicy.from_pretrained(start)
    train_sft(policy.model, policy.tokenizer, traces, lr=3e-5, epochs=1, batch_size=16, seed=seed)
    return {k: v.clone() for k, v in policy.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rest_mcts_mixes_traces_across_rounds_and_continues_from_the_last_policy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rows = selftrain(SHIPPED_POLICY, out_dir=out, method="rest-mcts", **{**TINY, "iterations": 2})
    one, two = _traces(out / "iter_1"), _traces(out / "iter_2")
    assert one and two
    # the paper's default for rest-mcts, recorded in the run's config: mix, continue
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["mix_traces"], cfg["restart_from_base"]) == (True, False)
    # round 1 trains on its own traces; round 2 on round 1's then its own (fresh problems each round, so no
    # trace repeats): train_examples = n1 + n2
    assert rows[1].new_examples == rows[1].train_examples == len(one)
    assert rows[2].new_examples == len(two)
    assert rows[2].train_examples == len(one) + len(two)
    assert not {e.problem_id for e in one} & {e.problem_id for e in two}
    # round 2's policy is round 1's policy after SFT on [round 1's traces, round 2's traces] with seed 1000·0 + 2
    assert _same(_weights(out / "iter_2" / "policy"), _trained(out / "iter_1" / "policy", one + two, seed=2))


def test_rest_em_restarts_from_the_base_model_on_this_rounds_traces_only(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rows = selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **{**TINY, "iterations": 2})
    two = _traces(out / "iter_2")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["mix_traces"], cfg["restart_from_base"]) == (False, True)
    # no mixing: each round trains on exactly the traces it collected
    assert (
        [r.train_examples for r in rows[1:]]
        == [r.new_examples for r in rows[1:]]
        == [len(_traces(out / "iter_1")), len(two)]
    )
    # round 2's policy is the *shipped* policy after SFT on round 2's traces alone (seed 1000·0 + 2), although
    # round 2 sampled with round 1's policy
    assert _same(_weights(out / "iter_2" / "policy"), _trained(SHIPPED_POLICY, two, seed=2))
    assert not _same(_weights(out / "iter_2" / "policy"), _trained(out / "iter_1" / "policy", two, seed=2))


def test_a_killed_mixing_run_resumes_with_the_same_trace_pool(tmp_path: Path) -> None:
    out = tmp_path / "run"
    kw = {**TINY, "iterations": 2, "method": "rest-em", "mix_traces": True, "restart_from_base": False}
    full = selftrain(SHIPPED_POLICY, out_dir=out, **kw)
    (out / "iter_2" / "state.json").unlink()
    resumed = selftrain(SHIPPED_POLICY, out_dir=out, **kw)
    # the pool came back from iter_1/traces.jsonl: round 2 trained on the same records to the same numbers
    assert resumed[2].train_examples == full[1].new_examples + full[2].new_examples
    assert _untimed(resumed[2]) == _untimed(full[2])


def test_sft_warmup_scales_the_first_step_by_one_over_warmup(tmp_path: Path) -> None:
    # fit's warm-up: step 0 runs at lr·1/warmup, so one step at lr 1e-3 with warmup 10 is one step at lr 1e-4
    out = tmp_path / "run"
    selftrain(SHIPPED_POLICY, out_dir=out, method="rest-em", **TINY)
    traces = _traces(out / "iter_1")[:1]
    runs = []
    for lr, warmup in [(1e-3, 10), (1e-4, 0), (1e-3, 0)]:
        policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
        train_sft(policy.model, policy.tokenizer, traces, lr=lr, warmup=warmup, seed=0)
        runs.append({k: v.clone() for k, v in policy.model.state_dict().items()})
    assert _same(runs[0], runs[1])
    assert not _same(runs[0], runs[2])
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        train_sft(policy.model, policy.tokenizer, traces, lr=1e-4, warmup=-1)
