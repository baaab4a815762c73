"""`treeward search` end to end, as a user runs it: a real subprocess, the shipped model, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from treeward.tree import read_jsonl

CMD = [sys.executable, "-m", "treeward.cli"]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("algorithm", ["beam", "weighted", "greedy"])
def test_search_end_to_end_with_shipped_model(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "run"
    r = _run("search", "--algorithm", algorithm, "--n-problems", "4", "--budget", "600", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "algorithm",
        "n_problems",
        "accuracy",
        "generated_tokens_per_problem",
        "computed_tokens",
        "reused_tokens",
        "wall_seconds",
    ):
        assert key in summary
    assert summary["n_problems"] == 4
    trees = read_jsonl(out / "trees.jsonl")
    assert len(trees) == 4
    # the summary is computed from these trees: accuracy and tokens agree with them
    assert summary["accuracy"] == sum(bool(t.correct) for t in trees) / 4
    assert summary["generated_tokens_per_problem"] == sum(t.generated_tokens for t in trees) / 4
    assert all(t.generated_tokens <= 600 for t in trees)
    for t in trees:
        assert t.root.token_ids[0] == 1  # <bos>: prompts are encoded by the policy, not re-tokenised later
        if t.chosen is not None:
            assert t.nodes[t.chosen].terminal


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = r.stderr.strip()
    for needle in needles:
        assert needle in err, err


def test_missing_model_path_is_one_clear_error(tmp_path: Path) -> None:
    r = _run("search", "--model", str(tmp_path / "nope"), "--n-problems", "1", "--out", str(tmp_path / "o"))
    _one_line_error(r, "error:", "nope")
    assert len(r.stderr.strip().splitlines()) == 1


def test_malformed_problems_file_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"question": "Ann has 2 cards. Ann gets 3 more. How many?", "answer": 5}\n{"question": oops}\n'
    )
    r = _run("search", "--problems", str(f), "--out", str(tmp_path / "o"))
    _one_line_error(r, "error:", "p.jsonl:2:")


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_non_positive_budget_is_rejected(tmp_path: Path, budget: str) -> None:
    r = _run("search", "--budget", budget, "--out", str(tmp_path / "o"))
    _one_line_error(r, "error:", "--budget")
    assert not (tmp_path / "o").exists()  # nothing was started


def test_unknown_algorithm_is_rejected(tmp_path: Path) -> None:
    r = _run("search", "--algorithm", "astar", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "astar" in r.stderr


def test_user_problems_file_runs(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    rows = [
        {"question": "Ann has 12 cards. Ann gets 5 more. How many cards does Ann have?", "answer": 17},
        {"question": "Bob has 30 coins. Bob loses 4. How many coins does Bob have?", "answer": "26"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    r = _run("search", "--problems", str(f), "--algorithm", "greedy", "--out", str(out))
    assert r.returncode == 0, r.stderr
    trees = read_jsonl(out / "trees.jsonl")
    assert [t.problem.id for t in trees] == ["mine-1", "mine-2"]
    assert [t.problem.answer for t in trees] == ["17", "26"]


def test_ctrl_c_keeps_the_trees_already_written(tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [*CMD, "search", "--n-problems", "200", "--batch-problems", "2", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    trees_path = out / "trees.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if trees_path.exists() and trees_path.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no trees written within 120 s")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    trees = read_jsonl(trees_path)  # every written line is a whole, valid tree
    assert 2 <= len(trees) < 200
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["n_problems"] == len(trees)
