"""A fake policy whose right answer is known, for search tests.

``StepBandit`` writes solutions to *real* arithmetic problems one step at a time. At every step it writes the
correct line with probability ``q`` and otherwise a line whose result is off by one (wrong arithmetic), then
chains on from whatever it wrote. With ``q < 0.5`` its greedy (temperature 0) choice is always the wrong line, so
greedy decoding never solves a problem, while a search that samples and checks each step can.

Tokens are characters (``id = ord(c)``), so token counts are easy to derive by hand. It honours the engine
contract of :mod:`treeward.engine.base`: per-row seeds, ``stop`` at newline, EOS after the answer line,
``max_new_tokens`` caps, and it books the ledger (no cache: ``computed`` = prefix + generated - 1 per row).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from treeward.engine.base import Continuation, Ledger
from treeward.tasks.arithmetic import parse_step
from treeward.tree import Problem

EOS = 3
BOS = 2


class CharPolicy:
    """The engine contract over character tokens: subclasses say which lines follow a prefix, this class turns
    them into continuations (``stop`` at newline keeps the first line, EOS after an answer line, ``max_new_tokens``
    caps, each line's probability on its first token) and books the ledger (no cache: ``computed`` = prefix +
    generated - 1 per row)."""

    bos: int | None = None  # prepended by encode_prompt when set

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.calls: list[int] = []  # rows per expand call

    @property
    def eos_token_id(self) -> int:
        return EOS

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_prompt(self, text: str) -> list[int]:
        return ([self.bos] if self.bos is not None else []) + self.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids if t not in (BOS, EOS))

    def lines(self, text: str, seed: int, j: int, *, greedy: bool, whole: bool) -> list[tuple[str, float]]:
        """(line, probability) of the next line after the decoded prefix ``text`` (the ``j``-th sample of a row
        seeded ``seed``), or of every line to the answer when ``whole``."""
        raise NotImplementedError

    def expand(
        self,
        prefixes: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 1.0,
        stop: str | None = "\n",
        seeds: int | Sequence[int] = 0,
        groups: Sequence[str] | None = None,
    ) -> list[list[Continuation]]:
        caps = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        seed_list = [seeds] * len(prefixes) if isinstance(seeds, int) else list(seeds)
        self.ledger.book_call(list(groups or []))
        self.calls.append(len(prefixes) * n)
        out = []
        for i, prefix in enumerate(prefixes):
            text = self.decode(prefix)
            row = []
            for j in range(n):
                lines = self.lines(text, seed_list[i], j, greedy=temperature == 0, whole=stop is None)
                if stop is not None:
                    lines = lines[:1]
                ids: list[int] = []
                lps: list[float] = []
                for line, prob in lines:
                    toks = self.encode(line) + ([EOS] if line.startswith("Answer") else [])
                    ids.extend(toks)
                    lps.extend([math.log(prob)] + [0.0] * (len(toks) - 1))
                finish = "eos" if ids and ids[-1] == EOS else "stop"
                if len(ids) > caps[i]:
                    ids, lps, finish = ids[: caps[i]], lps[: caps[i]], "length"
                row.append(Continuation(tuple(ids), self.decode(ids), tuple(lps), finish))  # type: ignore[arg-type]
                g = groups[i] if groups else None
                self.ledger.book(g, generated=len(ids), computed=len(prefix) + max(0, len(ids) - 1))
            out.append(row)
        return out

    def score(self, prefixes, continuations, *, groups=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("search tests never teacher-force")


class StepBandit(CharPolicy):
    bos = BOS

    def __init__(self, problems: Sequence[Problem], q: float = 0.25) -> None:
        super().__init__()
        self.q = q
        self.by_prompt = {p.prompt: p for p in problems}

    def lines(self, text: str, seed: int, j: int, *, greedy: bool, whole: bool) -> list[tuple[str, float]]:
        """Every remaining step, each right with probability ``q`` (drawn in turn), then the answer line."""
        prompt = next(p for p in self.by_prompt if text.startswith(p))
        problem = self.by_prompt[prompt]
        done = [ln for ln in text[len(prompt) :].split("\n") if ln]
        rng = random.Random(f"{seed}:{j}")
        ops = problem.metadata["ops"]
        value = int(problem.metadata["start"])
        for line in done:
            st = parse_step(line)
            if st is not None:
                value = st.result
        out = []
        for i in range(len(done), len(ops)):
            op, arg = ops[i]
            right = {"+": value + arg, "-": value - arg, "*": value * arg}[op]
            correct = (self.q >= 0.5) if greedy else rng.random() < self.q
            result = right if correct else right + 1
            out.append((f"Step {i + 1}: {value}{op}{arg}={result}\n", self.q if correct else 1 - self.q))
            value = result
        out.append((f"Answer: {value}", 1.0))
        return out
