"""Code-execution reward: the pass rate of a Python program, extracted from the response, over test cases.

Every test runs the program in a fresh sandbox (:mod:`treeward.rewards.sandbox`: a wall deadline that kills the
whole process tree, CPU / memory / process / file-size limits, no network where the machine allows it).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.rewards.sandbox import ExecResult, ExecStatus, Limits, SandboxError, run_python

__all__ = ["CodeExecution", "TestCase", "extract_python", "parse_tests"]

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
# A program that does not compile: CPython prints the error without a "Traceback" header.
_COMPILE_ERROR = re.compile(r"^(SyntaxError|IndentationError|TabError): ", re.MULTILINE)
_DONE = "__treeward_tests_done__"
_ERROR_LINE = re.compile(r'File "[^"]*main\.py", line (\d+)')


@dataclass(frozen=True)
class TestCase:
    """One test. With ``script`` set, the script is appended to the program and the test passes when the whole
    runs and exits 0 (assert-based tests). Otherwise the program reads ``stdin`` and passes when its stdout equals
    ``expected_stdout`` after normalisation (trailing whitespace of each line and trailing blank lines ignored);
    with no ``expected_stdout`` it passes when it exits 0."""

    __test__ = False  # not a pytest test class

    stdin: str = ""
    expected_stdout: str | None = None
    script: str | None = None
    name: str | None = None


def extract_python(text: str) -> str | None:
    """The last fenced Python block (```python, ```python3 or ```py) of ``text``, or ``None``."""
    blocks = _FENCE.findall(text)
    if not blocks or not blocks[-1].strip():
        return None
    return str(blocks[-1])


def parse_tests(reference: Any) -> list[TestCase]:
    """Test cases from the forms datasets use; raises ``ValueError`` on anything else.

    Accepted: a list of :class:`TestCase`; a string (one assert-based script); an APPS/TACO-style mapping
    ``{"inputs": [...], "outputs": [...]}`` (stdin/stdout; call-based ``fn_name`` tests are not supported);
    a list of mappings, each ``{"input"|"stdin": ..., "output"|"stdout"|"expected_output": ...}`` or
    ``{"assert"|"script"|"test": ...}``, with an optional ``"name"``.
    """
    if isinstance(reference, str):
        return [TestCase(script=reference)]
    if isinstance(reference, Mapping):
        if "fn_name" in reference:
            raise ValueError("call-based tests (fn_name) are not supported; use assert scripts")
        ins, outs = reference.get("inputs"), reference.get("outputs")
        if not isinstance(ins, Sequence) or not isinstance(outs, Sequence) or len(ins) != len(outs):
            raise ValueError("a mapping of tests needs 'inputs' and 'outputs' lists of the same length")
        return [TestCase(stdin=_text(i), expected_stdout=_text(o)) for i, o in zip(ins, outs, strict=True)]
    if isinstance(reference, Sequence):
        return [_one_test(t) for t in reference]
    raise ValueError(f"cannot read tests from a {type(reference).__name__}")


def _text(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Sequence):
        return "\n".join(str(v) for v in x)
    return str(x)


def _one_test(t: Any) -> TestCase:
    if isinstance(t, TestCase):
        return t
    if isinstance(t, str):
        return TestCase(script=t)
    if not isinstance(t, Mapping):
        raise ValueError(f"cannot read a test from a {type(t).__name__}")
    name = t.get("name")
    for key in ("assert", "script", "test"):
        if key in t:
            return TestCase(script=str(t[key]), name=name)
    stdin = next((t[k] for k in ("input", "stdin") if k in t), "")
    out = next((t[k] for k in ("output", "stdout", "expected_output") if k in t), None)
    return TestCase(stdin=_text(stdin), expected_stdout=None if out is None else _text(out), name=name)


def _normalize(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.rstrip().splitlines())


class CodeExecution:
    """Pass rate of the response's Python program over the sample's tests, each run in a sandbox.

    No single paper: the execution-feedback reward of code RL (the unit-test pass rate of CodeRL, Le et al. 2022,
    "CodeRL: Mastering Code Generation through Pretrained Models and Deep Reinforcement Learning", and of
    DeepSeek-Coder / open-r1 style GRPO code rewards). Formula: ``score = passed / total`` over the tests of
    ``Sample.reference`` (or ``Sample.metadata["tests"]``; forms in :func:`parse_tests`); ``components`` holds
    1.0 / 0.0 per test, named ``TestCase.name`` or ``test_<i>``; ``info["tests"]`` has each test's verdict
    (``pass``, ``wrong_output``, ``error``, ``killed`` (a signal: CPU or process limit), ``timeout``, ``skipped``
    (the sample's ``total_timeout_s`` ran out)), exit code, duration and stderr tail.

    Rules:
    - no fenced Python block → ``parse_error``, ``None``; no tests, or a partial prefix → ``n/a``, ``None``.
    - a program that does not compile fails every test (score 0.0, status ``ok``, ``info["compile_error"]``);
      the remaining tests are not run.
    - a test that times out (or is skipped) **fails**: the time limit is part of the task, as in competitive
      programming. The sample's status is ``timeout`` when at least one test failed and every failed test timed
      out (or was skipped); the score is still ``passed / total``. With ``timeout_is_failure=False`` such a sample
      scores ``None`` instead (for callers who read a wall-clock timeout as "unknown", e.g. on a loaded machine).
    - the sandbox failing to start at all → ``exec_error``, ``None`` (an infrastructure failure, never a 0).

    Assert tests run inside the program's process, so the program could fake a pass by exiting 0 early (an
    ``atexit`` hook calling ``os._exit(0)``); a test therefore also requires a per-run random marker that the
    appended script prints as its last statement. That raises the bar; it is no proof (the program can read its
    own source). stdin/stdout tests do not have this hole.

    Departures: binary per-test credit with no partial output credit; stdout compared after stripping trailing
    whitespace; one sandbox process per test (isolation over speed, ~0.1 s per test on this machine).
    """

    def __init__(
        self,
        *,
        timeout_s: float = 2.0,
        total_timeout_s: float | None = None,
        memory_mb: int = 512,
        max_procs: int = 16,
        file_size_mb: int = 16,
        timeout_is_failure: bool = True,
        max_workers: int = 2,
        python: str | None = None,
        name: str = "code_execution",
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.timeout_s = timeout_s
        self.total_timeout_s = total_timeout_s
        self.limits = Limits(
            wall_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, file_size_mb=file_size_mb
        )
        self.timeout_is_failure = timeout_is_failure
        self.max_workers = max_workers
        self.python = python
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        if self.max_workers == 1 or len(samples) <= 1:
            return [self._score(s) for s in samples]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self._score, samples))

    def _score(self, sample: Sample) -> RewardResult:
        if sample.partial:
            return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "partial response"})
        raw = sample.reference if sample.reference is not None else sample.metadata.get("tests")
        if raw is None:
            return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no tests"})
        try:
            tests = parse_tests(raw)
        except ValueError as e:
            return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": f"unreadable tests: {e}"})
        if not tests:
            return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no tests"})
        code = extract_python(sample.response)
        if code is None:
            return RewardResult(None, Status.PARSE_ERROR, info={"reason": "no ```python block"})
        try:
            verdicts, compile_error = self._run_tests(code, tests)
        except SandboxError as e:
            return RewardResult(None, Status.EXEC_ERROR, info={"reason": f"sandbox: {e}"})
        names = [t.name or f"test_{i}" for i, t in enumerate(tests)]
        components = {n: float(v["verdict"] == "pass") for n, v in zip(names, verdicts, strict=True)}
        passed = sum(components.values())
        failures = [v["verdict"] for v in verdicts if v["verdict"] != "pass"]
        info: dict[str, Any] = {"tests": verdicts, "passed": int(passed), "total": len(tests)}
        if compile_error is not None:
            info["compile_error"] = compile_error
        score: float | None = passed / len(tests)
        status = Status.OK
        if failures and all(f in ("timeout", "skipped") for f in failures):
            status = Status.TIMEOUT
            if not self.timeout_is_failure:
                score = None
        return RewardResult(score, status, components=components, info=info)

    def _run_tests(self, code: str, tests: list[TestCase]) -> tuple[list[dict[str, Any]], str | None]:
        verdicts: list[dict[str, Any]] = []
        compile_error: str | None = None
        t0 = time.monotonic()
        for t in tests:
            left = None if self.total_timeout_s is None else self.total_timeout_s - (time.monotonic() - t0)
            if compile_error is not None or (left is not None and left <= 0.05):
                verdicts.append({"verdict": "error" if compile_error is not None else "skipped"})
                continue
            wall = self.timeout_s if left is None else min(self.timeout_s, left)
            nonce = secrets.token_hex(8)
            # an assert test passes only if the script ran to its end: exit 0 alone is easy to fake (os._exit(0))
            source = code if t.script is None else f"{code}\n\n{t.script}\n\nprint({_DONE!r} + {nonce!r})\n"
            out_cap = max(self.limits.output_bytes, 2 * len(t.expected_stdout or "") + 1024)
            limits = Limits(
                wall_s=wall,
                memory_mb=self.limits.memory_mb,
                max_procs=self.limits.max_procs,
                file_size_mb=self.limits.file_size_mb,
                output_bytes=out_cap,
            )
            res = run_python(source, stdin=t.stdin, limits=limits, python=self.python)
            v = _verdict(res, t, _DONE + nonce)
            verdicts.append(v)
            if v["verdict"] == "error" and _program_does_not_compile(res.stderr, code):
                compile_error = res.stderr.strip().splitlines()[-1]
        return verdicts, compile_error


def _program_does_not_compile(stderr: str, code: str) -> bool:
    """Whether the run failed to compile, at a line of the program (not of an appended test script)."""
    if "Traceback (most recent call last)" in stderr or not _COMPILE_ERROR.search(stderr):
        return False
    where = _ERROR_LINE.search(stderr)
    return where is None or int(where.group(1)) <= code.count("\n") + 1


def _verdict(res: ExecResult, t: TestCase, done_marker: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": res.status.value,
        "exit_code": res.exit_code,
        "duration_s": round(res.duration_s, 4),
    }
    if res.status is ExecStatus.TIMEOUT:
        out["verdict"] = "timeout"
    elif res.status is ExecStatus.KILLED:
        out["verdict"] = "killed"
        out["signal"] = res.signal
    elif res.status is ExecStatus.EXEC_ERROR:
        out["verdict"] = "error"
    elif t.script is None and t.expected_stdout is not None:
        same = not res.stdout_truncated and _normalize(res.stdout) == _normalize(t.expected_stdout)
        out["verdict"] = "pass" if same else "wrong_output"
        if not same:
            out["stdout_head"] = res.stdout[:200]
    elif t.script is not None and done_marker not in res.stdout.splitlines():
        out["verdict"] = "error"
        out["reason"] = "the test script did not run to its end"
    else:
        out["verdict"] = "pass"
    if out["verdict"] != "pass" and res.stderr:
        out["stderr_tail"] = res.stderr[-300:]
    return out
