"""Problem sources with verifiers: the built-in arithmetic task and user JSONL files.

A task gives problems (:class:`~treeward.tree.Problem`) and rewards that know how to check them. The arithmetic
task's rewards are exact: :class:`ArithmeticAnswer` (outcome) and :class:`ArithmeticSteps` (process).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.tasks.arithmetic import check_steps, format_prompt, generate_problems, parse_answer
from treeward.tree import Problem

__all__ = [
    "ArithmeticAnswer",
    "ArithmeticSteps",
    "ProblemFileError",
    "generate_problems",
    "load_problems",
    "parse_answer",
]


class ProblemFileError(ValueError):
    """A problems file that cannot be read; the message names the file and line."""


def load_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file with one ``{"question": ..., "answer": ...}`` object per line.

    Optional keys: ``"id"`` (default: ``"<file stem>-<line>"``) and ``"metadata"`` (a dict). Blank lines are
    skipped. Any other problem raises :class:`ProblemFileError` naming the line.
    """
    p = Path(path)
    if not p.is_file():
        raise ProblemFileError(f"problems file not found: {p}")
    problems: list[Problem] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemFileError(f"{p}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ProblemFileError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            q = row.get("question")
            if not isinstance(q, str) or not q.strip():
                raise ProblemFileError(f'{p}:{lineno}: missing or empty "question"')
            if "answer" not in row or row["answer"] is None or isinstance(row["answer"], (dict, list)):
                raise ProblemFileError(f'{p}:{lineno}: missing "answer" (a string or number)')
            meta = row.get("metadata", {})
            if not isinstance(meta, dict):
                raise ProblemFileError(f'{p}:{lineno}: "metadata" must be an object')
            problems.append(
                Problem(
                    id=str(row.get("id", f"{p.stem}-{lineno}")),
                    prompt=format_prompt(q),
                    answer=str(row["answer"]).strip(),
                    metadata={"question": q.strip(), **meta},
                )
            )
    if not problems:
        raise ProblemFileError(f"{p}: no problems in file")
    return problems


def same_number(answer: str, reference: object) -> bool:
    """Whether two answers are the same number ("7" == "007" == 7 == "7.0"); plain string equality otherwise."""
    try:
        return Fraction(str(answer).strip()) == Fraction(str(reference).strip())
    except (ValueError, ZeroDivisionError):
        return str(answer).strip() == str(reference).strip()


def _problem_of(sample: Sample) -> Problem:
    """The problem a sample was drawn for: search passes it in ``metadata["problem"]``; otherwise rebuild it."""
    prob = sample.metadata.get("problem")
    if isinstance(prob, Problem):
        return prob
    return Problem(
        id=sample.group_id or "",
        prompt=sample.prompt,
        answer=sample.reference,
        metadata={k: v for k, v in sample.metadata.items() if k in ("question", "start", "ops")},
    )


def _lines(sample: Sample) -> list[str]:
    """The steps to judge: ``Sample.steps`` as given (one score each), else the response's non-blank lines."""
    if sample.steps:
        return list(sample.steps)
    return [ln for ln in sample.response.split("\n") if ln.strip()]


class ArithmeticAnswer:
    """Outcome reward: 1.0 when the ``Answer:`` number equals the reference, else 0.0.

    Numbers compare as numbers ("007" and 7.0 match 7). A response with no ``Answer:`` line scores 0.0 with status
    ``parse_error`` when complete, and is not applicable (``None``, ``n/a``) when it is a partial prefix or the
    sample has no reference. No paper: the exact check of the built-in task.
    """

    name = "arithmetic_answer"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            got = parse_answer(s.response)
            if got is None:
                if s.partial:
                    out.append(RewardResult(None, Status.NOT_APPLICABLE))
                else:
                    out.append(RewardResult(0.0, Status.PARSE_ERROR, info={"reason": "no 'Answer: N' line"}))
                continue
            if s.reference is None:
                out.append(
                    RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no reference", "answer": got})
                )
                continue
            ok = same_number(got, s.reference)
            out.append(
                RewardResult(1.0 if ok else 0.0, components={"answer": float(ok)}, info={"answer": got})
            )
        return out


class ArithmeticSteps:
    """Process reward: the exact step verifier of the arithmetic task (see :func:`~treeward.tasks.arithmetic.check_steps`).

    ``step_scores`` holds 1.0 / 0.0 per step; ``score`` is their minimum (a path is as good as its worst step),
    the reduction used by PRM-guided search in Snell et al. / search-and-learn. A step the verifier cannot parse
    scores 0.0: an unparseable step is a wrong step here, not a failure of the reward.
    """

    name = "arithmetic_steps"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            lines = _lines(s)
            if not lines:
                out.append(RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no steps"}))
                continue
            ok = check_steps(_problem_of(s), lines)
            scores = tuple(1.0 if x else 0.0 for x in ok)
            out.append(
                RewardResult(min(scores), step_scores=scores, components={"steps_correct": sum(scores)})
            )
        return out
