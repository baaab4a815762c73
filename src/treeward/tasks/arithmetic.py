"""The built-in task: multi-step arithmetic word problems with exact outcome and step verifiers.

A problem starts from a value and applies 1–5 operations (``+a``, ``-a`` with the result kept ≥ 1, ``×k`` for
k = 2..5; values stay ≤ 999). Its worked solution is one line per operation, then the answer::

    Q: Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. How many cards does Ann have?
    Step 1: 54*3=162
    Step 2: 162-34=128
    Answer: 128

Difficulty is the number of steps. Two verifiers come free:

* the **outcome** verifier: the ``Answer:`` number equals the reference;
* the **step** verifier: a step is right when its arithmetic is right, its first operand is the previous result
  (the start value for step 1), and its operator and second operand are the question's operation for that step.
  For problems that carry no structure (loaded from a user file), the operator check is dropped and the second
  operand must be a number the question mentions (digits, or a multiplier word such as "twice").
  The ``Answer:`` line is right when it repeats the last result (and, with structure, comes after the last step).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from treeward.tree import Problem

__all__ = [
    "MAX_STEPS",
    "MAX_VALUE",
    "check_steps",
    "format_prompt",
    "generate_problems",
    "make_problem",
    "numbers_in_question",
    "parse_answer",
    "parse_step",
    "solution_text",
]

MAX_VALUE = 999
MAX_STEPS = 5

_NAMES = (
    "Ann",
    "Bob",
    "Cara",
    "Dan",
    "Eve",
    "Finn",
    "Gia",
    "Hal",
    "Ivy",
    "Jon",
    "Kim",
    "Leo",
    "Mia",
    "Ned",
    "Ola",
)
_ITEMS = ("cards", "apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "stamps", "beads")
_MULT_WORDS = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}
_ADD = ("{n} gets {a} more", "{n} finds {a} more", "{n} buys {a} more")
_SUB = ("{n} loses {a}", "{n} gives away {a}", "{n} sells {a}")
_MUL = ("{n} gets {w} as many", "{n} ends up with {w} as many")

_STEP_RE = re.compile(r"^\s*Step\s+(\d+)\s*:\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
_MULT_RE = re.compile(r"\b(twice|three times|four times|five times)\b")


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def format_prompt(question: str) -> str:
    """The prompt the policy sees for a question (the shipped model was trained on this format)."""
    return f"Q: {question.strip()}\n"


def make_problem(rng: random.Random, n_steps: int, *, problem_id: str = "") -> Problem:
    """One random problem with ``n_steps`` operations, drawn from ``rng``."""
    if not 1 <= n_steps <= MAX_STEPS:
        raise ValueError(f"n_steps must be in 1..{MAX_STEPS}, got {n_steps}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start = rng.randint(2, 60)
    value = start
    ops: list[tuple[str, int]] = []
    sentences = [f"{name} has {start} {item}."]
    for i in range(n_steps):
        choices = ["-"] if value >= MAX_VALUE else ["+", "-"]
        if value * 2 <= MAX_VALUE:
            choices.append("*")
        if value <= 1:
            choices = [c for c in choices if c != "-"] or ["+"]
        op = rng.choice(choices)
        if op == "+":
            arg = rng.randint(1, min(60, MAX_VALUE - value))
            text = rng.choice(_ADD).format(n=name, a=arg)
        elif op == "-":
            arg = rng.randint(1, min(60, value - 1))
            text = rng.choice(_SUB).format(n=name, a=arg)
        else:
            arg = rng.randint(2, min(5, MAX_VALUE // value))
            text = rng.choice(_MUL).format(n=name, w=_MULT_WORDS[arg])
        value = _apply(value, op, arg)
        ops.append((op, arg))
        sentences.append(("Then " if i else "") + text + ".")
    sentences.append(f"How many {item} does {name} have?")
    question = " ".join(sentences)
    return Problem(
        id=problem_id,
        prompt=format_prompt(question),
        answer=str(value),
        metadata={
            "task": "arithmetic",
            "question": question,
            "start": start,
            "ops": [list(o) for o in ops],
            "n_steps": n_steps,
        },
    )


def generate_problems(n: int, steps: int | Sequence[int], *, seed: int = 0) -> list[Problem]:
    """``n`` problems from a seeded generator; ``steps`` is one step count or a list to cycle through.

    Ids are ``arith-s{steps}-{seed}-{i}``, so the same arguments always give the same problems.
    """
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    counts = [steps] if isinstance(steps, int) else list(steps)
    if not counts:
        raise ValueError("steps must be a step count or a non-empty list of step counts")
    rng = random.Random(f"treeward-arith-{seed}")
    out = []
    for i in range(n):
        k = counts[i % len(counts)]
        out.append(make_problem(rng, k, problem_id=f"arith-s{k}-{seed}-{i}"))
    return out


def solution_text(problem: Problem) -> str:
    """The worked solution of a generated problem (step lines and the answer line, newline-separated)."""
    value = int(problem.metadata["start"])
    lines = []
    for i, (op, arg) in enumerate(problem.metadata["ops"], 1):
        new = _apply(value, op, arg)
        lines.append(f"Step {i}: {value}{op}{arg}={new}")
        value = new
    lines.append(f"Answer: {value}")
    return "\n".join(lines)


def parse_answer(text: str) -> str | None:
    """The number after the last ``Answer:`` in ``text``, or ``None``."""
    found = _ANSWER_RE.findall(text)
    return str(int(found[-1])) if found else None


@dataclass(frozen=True)
class ParsedStep:
    index: int
    a: int
    op: str
    b: int
    result: int


def parse_step(line: str) -> ParsedStep | None:
    """Parse ``"Step i: a op b=c"``; ``None`` if the line is not one."""
    m = _STEP_RE.match(line)
    if m is None:
        return None
    return ParsedStep(int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5]))


def numbers_in_question(question: str) -> set[int]:
    """Numbers a question mentions: digit runs and multiplier words ("twice" → 2, "three times" → 3, ...)."""
    nums = {int(x) for x in re.findall(r"\d+", question)}
    words = {w: k for k, w in _MULT_WORDS.items()}
    nums.update(words[m] for m in _MULT_RE.findall(question))
    return nums


def _question(problem: Problem) -> str:
    q = problem.metadata.get("question")
    if isinstance(q, str):
        return q
    return problem.prompt[3:] if problem.prompt.startswith("Q: ") else problem.prompt


def check_steps(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Verify each step line of a (possibly partial) solution; one bool per line. See the module docstring.

    Once a step is wrong, later steps are still judged on their own: each must chain from the result its
    predecessor *wrote*, so one slip does not mark every later step wrong.
    """
    ops = problem.metadata.get("ops")
    structured = isinstance(ops, list) and "start" in problem.metadata
    mentioned = numbers_in_question(_question(problem))
    prev: int | None = int(problem.metadata["start"]) if structured else None
    out: list[bool] = []
    n_ops_done = 0
    for i, raw in enumerate(steps, 1):
        line = raw.strip()
        ans = _ANSWER_RE.fullmatch(line)
        if ans is not None:
            value = int(ans[1])
            ok = prev is not None and value == prev
            if structured and ops is not None:
                ok = ok and n_ops_done == len(ops)
            out.append(ok)
            continue
        st = parse_step(line)
        if st is None:
            out.append(False)
            prev = None
            continue
        ok = st.index == i and _apply(st.a, st.op, st.b) == st.result
        if structured and ops is not None:
            if i - 1 < len(ops):
                want_op, want_arg = ops[i - 1]
                ok = ok and st.a == prev and st.op == want_op and st.b == int(want_arg)
            else:
                ok = False
        else:
            first_ok = st.a in mentioned if i == 1 else st.a == prev
            ok = ok and first_ok and st.b in mentioned
        out.append(ok)
        n_ops_done += 1
        prev = st.result
    return out
