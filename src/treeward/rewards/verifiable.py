"""Rule-based verifiable rewards: answers checked against a reference, and checks of the response's shape.

- :class:`MathVerify`: mathematical equivalence through math-verify, run in a pool of worker processes with a
  real per-sample deadline (a sample that overruns is ``timeout`` and its worker is killed and replaced).
- :class:`ExactMatch`, :class:`SubstringMatch`, :class:`TokenF1`: SQuAD-normalised answer matching, max over
  references.
- :class:`NumericMatch`: the last number of the answer against the reference, within a relative / absolute
  tolerance.
- :class:`TagFormat`, :class:`RegexFormat`: required tags (order, exactly once, nothing outside) or a regex.
- :class:`LengthPenalty`, :class:`OverlongPenalty` (DAPO), :class:`RepetitionPenalty` (n-gram repetition rate).

Conventions shared by every reward here (and by :mod:`~treeward.rewards.text`, :mod:`~treeward.rewards.tools`,
:mod:`~treeward.rewards.retrieval`, which import the helpers below):

- A sample with no reference is not applicable: ``score=None``, status ``n/a``. A reference of the wrong type is
  ``parse_error`` with ``score=None``: the data is broken, not the response.
- A response whose answer cannot be found is a *wrong answer*: status ``parse_error`` (so it is counted) with the
  score a wrong answer gets (``parse_error_score``, 0.0 by default; pass ``None`` to drop such samples instead),
  the convention of :class:`~treeward.tasks.ArithmeticAnswer`.
- Outcome rewards are not applicable to partial prefixes (``Sample.partial``): search calls them on terminal nodes
  only. Shape penalties that are meaningful on a prefix (repetition) score prefixes too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import re
import signal
import string
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any

from treeward.rewards.base import RewardResult, Sample, Status

__all__ = [
    "CharCount",
    "ExactMatch",
    "LengthPenalty",
    "MathVerify",
    "MetadataCount",
    "NumericMatch",
    "OverlongPenalty",
    "RegexFormat",
    "RepetitionPenalty",
    "SubstringMatch",
    "TagFormat",
    "TokenCount",
    "TokenF1",
    "WordCount",
    "answer_tag",
    "answer_tag_or_text",
    "boxed",
    "exact_match",
    "last_number",
    "normalize_answer",
    "reference_strings",
    "repetition_rate",
    "token_f1",
    "whole_text",
    "wordpunct",
]

Extract = Callable[[str], "str | None"]
"""Pulls the answer out of a response (``None``: no answer found). Module-level functions pickle; lambdas do not."""


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------
def _na(reason: str, **info: Any) -> RewardResult:
    return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": reason, **info})


def _bad_reference(reason: str) -> RewardResult:
    return RewardResult(None, Status.PARSE_ERROR, info={"reason": f"reference: {reason}"})


def _precheck(sample: Sample, *, partial_ok: bool = False) -> RewardResult | None:
    """The result for a sample no reward can score (a partial prefix, a response that is not text), else None."""
    if not isinstance(sample.response, str):
        return RewardResult(
            None,
            Status.PARSE_ERROR,
            info={"reason": f"response is {type(sample.response).__name__}, not str"},
        )
    if sample.partial and not partial_ok:
        return _na("partial prefix: an outcome reward scores complete responses only")
    return None


def reference_strings(reference: Any) -> list[str] | None:
    """The reference as a list of strings: ``None`` and empty lists give ``None`` (no reference); a string or a
    number gives one; a list or tuple of strings / numbers gives each. Anything else raises ``TypeError``."""
    if reference is None:
        return None
    if isinstance(reference, str):
        return [reference]
    if isinstance(reference, bool):
        raise TypeError("a bool is not a reference answer")
    if isinstance(reference, (int, float, Fraction)):
        return [str(reference)]
    if isinstance(reference, (list, tuple)):
        out: list[str] = []
        for r in reference:
            if isinstance(r, str):
                out.append(r)
            elif isinstance(r, (int, float, Fraction)) and not isinstance(r, bool):
                out.append(str(r))
            else:
                raise TypeError(f"reference list holds a {type(r).__name__}, expected strings")
        return out or None
    raise TypeError(f"expected a string or a list of strings, got {type(reference).__name__}")


def _refs_or_result(sample: Sample) -> list[str] | RewardResult:
    try:
        refs = reference_strings(sample.reference)
    except TypeError as e:
        return _bad_reference(str(e))
    if refs is None:
        return _na("no reference")
    return refs


def _answer_and_refs(
    sample: Sample, extract: Extract, parse_error_score: float | None
) -> tuple[str, list[str]] | RewardResult:
    """The preamble of every answer-vs-reference reward: the sample checks, its references, its extracted answer;
    or the result that ends the scoring early (bad sample, no reference, no answer found)."""
    if (pre := _precheck(sample)) is not None:
        return pre
    refs = _refs_or_result(sample)
    if isinstance(refs, RewardResult):
        return refs
    ans = extract(sample.response)
    if ans is None:
        return RewardResult(parse_error_score, Status.PARSE_ERROR, info={"reason": "no answer found"})
    return ans, refs


# ---------------------------------------------------------------------------------------------------------------
# answer extraction
# ---------------------------------------------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` block, stripped; ``None`` when there is none."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def answer_tag_or_text(text: str) -> str:
    """The last ``<answer>`` block if there is one, else the whole response (stripped)."""
    got = answer_tag(text)
    return got if got is not None else text.strip()


def whole_text(text: str) -> str:
    """The whole response, stripped."""
    return text.strip()


def boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (braces matched), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


# ---------------------------------------------------------------------------------------------------------------
# SQuAD normalisation, exact match, token F1
# ---------------------------------------------------------------------------------------------------------------
_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower-case, drop ASCII punctuation, drop the articles a/an/the, squeeze whitespace
    (in that order, as in the official SQuAD v1.1 evaluation script)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_YES_NO = frozenset({"yes", "no", "noanswer"})


def _f1_prf(pred: str, gold: str, *, yes_no_exact: bool) -> tuple[float, float, float]:
    """(F1, precision, recall) of one prediction against one gold answer, SQuAD style."""
    np_, ng = normalize_answer(pred), normalize_answer(gold)
    if yes_no_exact and (np_ in _YES_NO or ng in _YES_NO) and np_ != ng:
        return 0.0, 0.0, 0.0
    pt, gt = np_.split(), ng.split()
    if not pt or not gt:  # SQuAD v2: two empty answers agree, one empty answer scores 0
        v = float(pt == gt)
        return v, v, v
    same = sum((Counter(pt) & Counter(gt)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p, r = same / len(pt), same / len(gt)
    return 2 * p * r / (p + r), p, r


def token_f1(pred: str, golds: Iterable[str], *, yes_no_exact: bool = False) -> float:
    """SQuAD token F1, max over the gold answers. ``yes_no_exact``: HotpotQA's rule that "yes", "no" and
    "noanswer" score 0 unless matched exactly (used by Router-R1)."""
    return max((_f1_prf(pred, g, yes_no_exact=yes_no_exact)[0] for g in golds), default=0.0)


def exact_match(pred: str, golds: Iterable[str]) -> float:
    """1.0 when the SQuAD-normalised prediction equals any normalised gold answer, else 0.0."""
    n = normalize_answer(pred)
    return float(any(n == normalize_answer(g) for g in golds))


class ExactMatch:
    """Exact match after SQuAD normalisation, max over references.

    No single paper: the SQuAD v1.1 metric (Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for Machine
    Comprehension of Text"), used as the outcome reward of Search-R1-style agents. Formula:
    ``EM = max_r [norm(answer) == norm(r)]`` with ``norm`` = :func:`normalize_answer`. The answer is
    ``extract(response)`` (default: the last ``<answer>`` block, else the whole response); no answer found →
    ``parse_error`` with ``parse_error_score``.
    """

    def __init__(
        self,
        *,
        extract: Extract = answer_tag_or_text,
        parse_error_score: float | None = 0.0,
        name: str = "exact_match",
    ) -> None:
        self.extract = extract
        self.parse_error_score = parse_error_score
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        got = _answer_and_refs(s, self.extract, self.parse_error_score)
        if isinstance(got, RewardResult):
            return got
        ans, refs = got
        em = exact_match(ans, refs)
        return RewardResult(em, components={"em": em}, info={"answer": ans})


class SubstringMatch:
    """Substring exact match ("sub-EM"): 1.0 when a normalised reference occurs inside the normalised answer.

    The "subem" check of the Search-R1 / Router-R1 code bases. Formula: ``max_r [norm(r) ⊆ norm(answer)]``.
    Departure: the containment is word-bounded ("art" does not match inside "start"; those code bases test plain
    substrings), and a reference that normalises to the empty string never matches.
    """

    def __init__(
        self,
        *,
        extract: Extract = answer_tag_or_text,
        parse_error_score: float | None = 0.0,
        name: str = "substring_match",
    ) -> None:
        self.extract = extract
        self.parse_error_score = parse_error_score
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        got = _answer_and_refs(s, self.extract, self.parse_error_score)
        if isinstance(got, RewardResult):
            return got
        ans, refs = got
        na = f" {normalize_answer(ans)} "
        hit = float(any((g := normalize_answer(r)) and f" {g} " in na for r in refs))
        return RewardResult(hit, components={"subem": hit}, info={"answer": ans})


class TokenF1:
    """Token-level F1 after SQuAD normalisation, max over references.

    The SQuAD v1.1 F1 (Rajpurkar et al., 2016): with ``P`` and ``G`` the normalised token multisets of answer and
    reference, ``prec = |P ∩ G| / |P|``, ``rec = |P ∩ G| / |G|``, ``F1 = 2·prec·rec / (prec + rec)`` (0 when
    nothing is shared); ``score = max_r F1(answer, r)``; ``components`` hold the F1, precision and recall of the best
    reference. Departures: two empty answers score 1 (SQuAD v2's rule); ``yes_no_exact=True`` adds HotpotQA's rule
    for yes / no / noanswer (Router-R1 uses it).
    """

    def __init__(
        self,
        *,
        extract: Extract = answer_tag_or_text,
        yes_no_exact: bool = False,
        parse_error_score: float | None = 0.0,
        name: str = "token_f1",
    ) -> None:
        self.extract = extract
        self.yes_no_exact = yes_no_exact
        self.parse_error_score = parse_error_score
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        got = _answer_and_refs(s, self.extract, self.parse_error_score)
        if isinstance(got, RewardResult):
            return got
        ans, refs = got
        f1, p, r = max(_f1_prf(ans, g, yes_no_exact=self.yes_no_exact) for g in refs)
        return RewardResult(f1, components={"f1": f1, "precision": p, "recall": r}, info={"answer": ans})


# ---------------------------------------------------------------------------------------------------------------
# numeric tolerance
# ---------------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*[-+]?\d+(?:\.\d+)?)?"
    r"|[-+]?\.\d+(?:[eE][-+]?\d+)?"
)


def _to_number(token: str) -> float | None:
    token = token.replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(Fraction(num) / Fraction(den))
        return float(token)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``-1,234.5``, ``3/4``, ``1e-3``; thousands commas allowed), or None.

    A fraction ``a/b`` is one number; a percent sign is ignored (``50%`` reads as 50).
    """
    for m in reversed(_NUMBER.findall(text)):
        v = _to_number(m)
        if v is not None and math.isfinite(v):
            return v
    return None


class NumericMatch:
    """1.0 when the answer's last number equals the reference within tolerance, else 0.0.

    No paper: the numeric check used for GSM8K-style answers. Formula: ``|a − r| ≤ max(rel_tol·max(|a|, |r|),
    abs_tol)`` (:func:`math.isclose`), any reference. A reference that holds no number is ``parse_error`` (score
    None); an answer that holds none is a wrong answer (``parse_error``, ``parse_error_score``).
    """

    def __init__(
        self,
        *,
        rel_tol: float = 1e-6,
        abs_tol: float = 1e-9,
        extract: Extract = answer_tag_or_text,
        parse_error_score: float | None = 0.0,
        name: str = "numeric_match",
    ) -> None:
        if rel_tol < 0 or abs_tol < 0:
            raise ValueError("tolerances must be non-negative")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.extract = extract
        self.parse_error_score = parse_error_score
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        if (pre := _precheck(s)) is not None:
            return pre
        refs = _refs_or_result(s)
        if isinstance(refs, RewardResult):
            return refs
        gold = [v for r in refs if (v := last_number(r)) is not None]
        if not gold:
            return _bad_reference(f"no number in {refs!r}")
        ans = self.extract(s.response)
        value = last_number(ans) if ans is not None else None
        if value is None:
            return RewardResult(
                self.parse_error_score, Status.PARSE_ERROR, info={"reason": "no number in the answer"}
            )
        ok = any(math.isclose(value, g, rel_tol=self.rel_tol, abs_tol=self.abs_tol) for g in gold)
        err = min(abs(value - g) for g in gold)
        return RewardResult(
            float(ok), components={"correct": float(ok), "abs_error": err}, info={"answer": value}
        )


# ---------------------------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------------------------
class TagFormat:
    """1.0 when the response has the required tags, else 0.0, with a breakdown of what failed.

    The R1-style format reward (DeepSeek-AI, 2025, "DeepSeek-R1"; TRL's ``think_format_reward``), e.g.
    ``<think>...</think><answer>...</answer>``. Checks, each a component in {0, 1}: every tag opened and closed
    (``present``), each exactly once (``exactly_once``), blocks in the given order and not nested
    (``ordered``), and only whitespace outside the blocks (``no_outside_text``). ``score`` is 1.0 when every
    enabled check passes. Departure: checks are independent flags instead of one regex, so the breakdown says why a
    response failed; use :class:`RegexFormat` for a paper's exact pattern.
    """

    def __init__(
        self,
        tags: Sequence[str] = ("think", "answer"),
        *,
        ordered: bool = True,
        exactly_once: bool = True,
        allow_outside_text: bool = False,
        name: str = "tag_format",
    ) -> None:
        if not tags:
            raise ValueError("TagFormat needs at least one tag")
        for t in tags:
            if not re.fullmatch(r"[A-Za-z_][\w\-]*", t):
                raise ValueError(f"invalid tag name {t!r}")
        self.tags = tuple(tags)
        self.ordered = ordered
        self.exactly_once = exactly_once
        self.allow_outside_text = allow_outside_text
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        if (pre := _precheck(s)) is not None:
            return pre
        text = s.response
        opens = {t: text.count(f"<{t}>") for t in self.tags}
        closes = {t: text.count(f"</{t}>") for t in self.tags}
        present = all(opens[t] >= 1 and closes[t] >= 1 for t in self.tags)
        once = all(opens[t] == 1 and closes[t] == 1 for t in self.tags)
        spans: list[tuple[int, int]] = []
        for t in self.tags:
            i = text.find(f"<{t}>")
            j = text.find(f"</{t}>", i + 1) if i >= 0 else -1
            spans.append((i, j + len(f"</{t}>") if j >= 0 else -1))
        ordered = present and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        ordered = ordered and all(i < j for i, j in spans)
        outside = text
        for t in self.tags:
            outside = re.sub(rf"<{t}>.*?</{t}>", "", outside, flags=re.DOTALL)
        no_outside = present and not outside.strip()
        checks = {"present": present, "exactly_once": once, "ordered": ordered, "no_outside_text": no_outside}
        enabled = {
            "present": True,
            "exactly_once": self.exactly_once,
            "ordered": self.ordered,
            "no_outside_text": not self.allow_outside_text,
        }
        ok = all(v for k, v in checks.items() if enabled[k])
        return RewardResult(float(ok), components={k: float(v) for k, v in checks.items()})


class RegexFormat:
    """1.0 when ``pattern`` is found in the response, else 0.0.

    The regex format rewards of R1-style recipes, e.g. BLEUBERI's ``^<think>.*?</think><answer>.*?</answer>$``
    (Chang et al., 2025). The pattern is *searched* with ``flags`` (default ``re.DOTALL``): anchor it with
    ``^...$`` (or ``\\A...\\Z``) for a full match. ``strip`` strips the response first (default True).
    """

    def __init__(
        self,
        pattern: str,
        *,
        flags: int = re.DOTALL,
        strip: bool = True,
        name: str = "regex_format",
    ) -> None:
        self.pattern = pattern
        self.flags = flags
        self.strip = strip
        self._re = re.compile(pattern, flags)
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if (pre := _precheck(s)) is not None:
                out.append(pre)
                continue
            text = s.response.strip() if self.strip else s.response
            ok = float(self._re.search(text) is not None)
            out.append(RewardResult(ok, components={"match": ok}))
        return out


# ---------------------------------------------------------------------------------------------------------------
# length
# ---------------------------------------------------------------------------------------------------------------
class WordCount:
    """Length of a response in whitespace-separated words."""

    def __call__(self, sample: Sample) -> int | None:
        return len(sample.response.split())


class CharCount:
    """Length of a response in characters."""

    def __call__(self, sample: Sample) -> int | None:
        return len(sample.response)


class MetadataCount:
    """Length read from ``sample.metadata[key]`` (e.g. the token count the generator reported); ``None`` if absent."""

    def __init__(self, key: str = "num_tokens") -> None:
        self.key = key

    def __call__(self, sample: Sample) -> int | None:
        v = sample.metadata.get(self.key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return None
        return v


class TokenCount:
    """Length in tokens of ``tokenizer.encode(response, add_special_tokens=False)`` (any Hugging Face tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, sample: Sample) -> int | None:
        return len(self.tokenizer.encode(sample.response, add_special_tokens=False))


LengthFn = Callable[[Sample], "int | None"]


def _length(fn: LengthFn, s: Sample) -> int | RewardResult:
    n = fn(s)
    if n is None:
        return _na("length unknown (the length function returned None)")
    return n


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning System
    at Scale", §3.4 "Overlong Reward Shaping").

    With ``L`` the response length, ``L_max = max_length`` and ``L_cache = cache_length``::

        R(L) = 0                                   if L ≤ L_max − L_cache
             = ((L_max − L_cache) − L) / L_cache   if L_max − L_cache < L ≤ L_max
             = −1                                  if L > L_max

    multiplied by ``penalty_factor`` (verl's ``overlong_buffer.penalty_factor``; 1.0 is the paper). DAPO adds this
    to the accuracy reward. Length is in whatever unit ``length`` counts: DAPO counts tokens, so pass
    :class:`TokenCount` or :class:`MetadataCount`; the default :class:`WordCount` is a tokenizer-free stand-in.
    Not applicable to partial prefixes.
    """

    def __init__(
        self,
        *,
        max_length: int,
        cache_length: int,
        penalty_factor: float = 1.0,
        length: LengthFn | None = None,
        name: str = "overlong_penalty",
    ) -> None:
        if not 0 < cache_length <= max_length:
            raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
        self.max_length, self.cache_length = max_length, cache_length
        self.penalty_factor = penalty_factor
        self.length: LengthFn = length if length is not None else WordCount()
        self.name = self.__name__ = name

    def penalty(self, n: int) -> float:
        """R(n) of the docstring (times ``penalty_factor``)."""
        free = self.max_length - self.cache_length
        if n <= free:
            r = 0.0
        elif n <= self.max_length:
            r = (free - n) / self.cache_length
        else:
            r = -1.0
        return r * self.penalty_factor

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if (pre := _precheck(s)) is not None:
                out.append(pre)
                continue
            n = _length(self.length, s)
            if isinstance(n, RewardResult):
                out.append(n)
                continue
            r = self.penalty(n)
            out.append(RewardResult(r, components={"length": float(n), "penalty": r}))
        return out


class LengthPenalty:
    """A linear penalty for length beyond a target: ``R(L) = max(floor, −per_unit · max(0, L − target))``.

    No paper: the simplest length regulariser (the unbounded-slope special case of DAPO's soft punishment, with a
    floor). Length is counted by ``length`` (default :class:`WordCount`). Not applicable to partial prefixes.
    """

    def __init__(
        self,
        *,
        target: int,
        per_unit: float,
        floor: float = -1.0,
        length: LengthFn | None = None,
        name: str = "length_penalty",
    ) -> None:
        if target < 0 or per_unit < 0 or floor > 0:
            raise ValueError("need target >= 0, per_unit >= 0 and floor <= 0")
        self.target, self.per_unit, self.floor = target, per_unit, floor
        self.length: LengthFn = length if length is not None else WordCount()
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if (pre := _precheck(s)) is not None:
                out.append(pre)
                continue
            n = _length(self.length, s)
            if isinstance(n, RewardResult):
                out.append(n)
                continue
            r = max(self.floor, -self.per_unit * max(0, n - self.target))
            out.append(RewardResult(r, components={"length": float(n), "penalty": r}))
        return out


_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def wordpunct(text: str) -> list[str]:
    """NLTK's ``wordpunct_tokenize`` (the regex ``\\w+|[^\\w\\s]+``), without importing NLTK."""
    return _WORDPUNCT.findall(text)


def repetition_rate(tokens: Sequence[str], n: int) -> tuple[float, int, int]:
    """(1 − distinct n-grams / n-grams, distinct, total); 0.0 when the text has fewer than ``n`` tokens."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0, 0, 0
    distinct = len(set(grams))
    return 1.0 - distinct / len(grams), distinct, len(grams)


class RepetitionPenalty:
    """Penalty for repeated n-grams: ``R = −weight · (1 − distinct n-grams / n-grams)`` ∈ [−weight, 0].

    The distinct-n-gram ratio that Kim & Seo's proxy reward multiplies in as its repetition term (``RP`` =
    distinct trigrams / trigrams, naver-ai/rethinking-proxy-reward), used here as an additive penalty, 0 for no
    repetition. (Yeo et al., 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs", penalise repeated
    n-grams token by token instead; that per-token form is not implemented.) Tokens: :func:`wordpunct` by default.
    Scores partial prefixes too (repetition is visible before the end).
    """

    def __init__(
        self,
        n: int = 3,
        *,
        weight: float = 1.0,
        tokenize: Callable[[str], list[str]] = wordpunct,
        name: str = "repetition_penalty",
    ) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n, self.weight, self.tokenize = n, weight, tokenize
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if (pre := _precheck(s, partial_ok=True)) is not None:
                out.append(pre)
                continue
            rate, distinct, total = repetition_rate(self.tokenize(s.response), self.n)
            out.append(
                RewardResult(
                    -self.weight * rate,
                    components={"repetition_rate": rate, "distinct_ngrams": distinct, "ngrams": total},
                )
            )
        return out


# ---------------------------------------------------------------------------------------------------------------
# math-verify in a process pool with a real deadline
# ---------------------------------------------------------------------------------------------------------------
_Check = tuple[str, "float | None", dict[str, Any]]  # (status value, score, info): plain types, cross a pipe


def _parse_gold(parse: Callable[..., list[Any]], gold: str) -> list[Any]:
    """A bare reference ("1+x^2", "\\sqrt{2}") is read as one math expression: math-verify's plain-text extraction
    would take its first number ("1"), so it is parsed inside ``$...$`` first."""
    delimited = any(m in gold for m in ("$", "\\boxed", "\\(", "\\["))
    got = [] if delimited else parse(f"${gold}$", parsing_timeout=None)
    return got or parse(gold, parsing_timeout=None)


def _check_math(pred: str, golds: Sequence[str]) -> _Check:
    """math-verify's verdict on one response: runs with math-verify's own timeouts off (the caller enforces the
    deadline) and its errors turned into ``False`` per comparison, as math-verify does by default."""
    from math_verify import parse, verify

    gold_parsed = [g for g in (_parse_gold(parse, gold) for gold in golds) if g]
    if not gold_parsed:
        return Status.PARSE_ERROR.value, None, {"reason": "reference: math-verify cannot parse it"}
    pred_parsed = parse(pred, parsing_timeout=None)
    answer = next((x for x in pred_parsed if isinstance(x, str)), None)
    if not pred_parsed:
        return Status.PARSE_ERROR.value, 0.0, {"reason": "no answer found"}
    ok = any(verify(g, pred_parsed, timeout_seconds=None) for g in gold_parsed)
    return Status.OK.value, float(ok), {"answer": answer}


@functools.cache
def _warm_up() -> None:
    """Import math-verify and run one check, once per process, so that no deadline pays for the imports and
    caches (about a second on a cold process)."""
    _check_math("1", ["1"])


def _watch_parent(ppid: int) -> None:  # pragma: no cover - runs in the worker
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid:
            os._exit(0)


def _die_with_parent(ppid: int) -> None:  # pragma: no cover - runs in the worker
    """Linux: the kernel SIGKILLs this worker when its parent goes (even while it is stuck in one long C call
    holding the GIL, where no Python thread can run). Elsewhere, and as a fallback, a watchdog thread polls."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != ppid:  # the parent died before the request took effect
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()


def _worker_main(conn: mpc.Connection, ppid: int) -> None:  # pragma: no cover - runs in the worker
    """A math-verify worker: answers ``(idx, pred, golds)`` requests until the pipe closes or the parent dies."""
    _die_with_parent(ppid)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # this process only: "timeout is disabled" notes
    _warm_up()  # before saying ready, so that no deadline pays for it
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, pred, golds = msg
        status, score, info = _check_math(pred, golds)
        conn.send(("result", idx, status, score, info))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child, os.getpid()), daemon=True, name="treeward-math-verify"
        )
        self.proc.start()
        child.close()
        self.conn: mpc.Connection = parent
        self.ready = False
        self.task: int | None = None
        self.since = time.monotonic()  # start time while starting, dispatch time while busy

    def stop(self, *, graceful: bool) -> None:
        if graceful and self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.proc.join(timeout=0.5)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop(graceful=True)


class _Deadline(BaseException):
    """Raised by the serial path's alarm; a BaseException so that math-verify's ``except Exception`` lets it by."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Deadline


class MathVerify:
    """1.0 when math-verify finds the response equivalent to the reference, else 0.0.

    Uses Hugging Face's math-verify (Kydlíček, 2025): ``parse`` extracts the answer (LaTeX / plain
    expressions, ``\\boxed`` first) and ``verify`` compares it with the parsed reference symbolically and
    numerically. Formula: ``score = [∃ r: verify(parse(r), parse(response))]``.

    The deadline is real: checks run in ``workers`` worker processes (spawned on first use and reused), and a
    sample still running ``deadline_s`` seconds after it was handed to a worker gets ``timeout`` (score None); its
    worker is killed and replaced, and the rest of the batch is unaffected. (math-verify's own ``signal.alarm``
    timeout does not work off the main thread, rounds to whole seconds, and reports a timeout as a silent False.)
    A worker that dies gives ``exec_error``. Workers exit when the pipe closes, on :meth:`close`, when the object is
    collected, at interpreter exit, and when the parent process dies (Linux: ``PR_SET_PDEATHSIG``, which works even
    while a worker is stuck in one long C call; elsewhere a watchdog thread). On Linux the kernel ties workers to
    the *thread* that started them: if that thread ends, they are killed and the next call starts new ones.
    ``with MathVerify() as r: ...`` closes on exit. Calls on one instance are serialised by a lock.

    Serial path: batches of at most ``serial_max`` samples (default 0: never), and every batch when ``workers=0``,
    run in this process with a ``SIGALRM`` interval timer as the deadline. That needs the main thread (elsewhere
    the pool is used), and an alarm cannot interrupt a single long C-level operation (a giant integer power): the
    pool is the only hard guarantee. Inside a daemonic process (which cannot start workers) the serial path is
    used on the main thread; off it, samples get ``exec_error``.

    Statuses: no reference → ``n/a``; a reference math-verify cannot parse → ``parse_error`` (None); a response
    with no parseable answer → ``parse_error`` with ``parse_error_score``; partial prefixes → ``n/a``.
    The reference may be a string, a number or a list of them (any may match). Spawned workers re-import the main
    module: guard scripts with ``if __name__ == "__main__":``.
    """

    def __init__(
        self,
        *,
        deadline_s: float = 5.0,
        workers: int | None = None,
        serial_max: int = 0,
        startup_timeout_s: float = 60.0,
        parse_error_score: float | None = 0.0,
        name: str = "math_verify",
    ) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("MathVerify needs math-verify: pip install 'treeward[rewards]'")
        if deadline_s <= 0 or startup_timeout_s <= 0:
            raise ValueError("deadline_s and startup_timeout_s must be positive")
        self.deadline_s = deadline_s
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers
        if self.workers < 0 or serial_max < 0:
            raise ValueError("workers and serial_max must be >= 0")
        self.serial_max = serial_max
        self.startup_timeout_s = startup_timeout_s
        self.parse_error_score = parse_error_score
        self.name = self.__name__ = name
        self._pool: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)
        # one batch at a time per instance: concurrent calls queue here instead of sharing workers
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (the next call starts new ones)."""
        with self._lock:
            _shutdown(self._pool)

    def __enter__(self) -> MathVerify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_pool"], state["_finalizer"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool = []
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)
        self._lock = threading.Lock()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._pool if w.proc.pid is not None]

    # -- scoring ---------------------------------------------------------------------------------------------
    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        tasks: list[tuple[int, str, list[str]]] = []
        for i, s in enumerate(samples):
            if (pre := _precheck(s)) is not None:
                results[i] = pre
                continue
            refs = _refs_or_result(s)
            if isinstance(refs, RewardResult):
                results[i] = refs
                continue
            tasks.append((i, s.response, refs))
        if tasks:
            main = threading.current_thread() is threading.main_thread()
            daemonic = bool(mp.current_process().daemon)
            if main and (self.workers == 0 or len(tasks) <= self.serial_max or daemonic):
                done = self._run_serial(tasks)
            elif daemonic or self.workers == 0:
                why = "no deadline can be enforced: serial path off the main thread"
                done = {i: RewardResult(None, Status.EXEC_ERROR, info={"reason": why}) for i, _, _ in tasks}
            else:
                with self._lock:
                    done = self._run_pool(tasks)
            for i, r in done.items():
                results[i] = r
        return [r if r is not None else RewardResult(None, Status.EXEC_ERROR) for r in results]

    def _result(self, check: _Check, latency: float) -> RewardResult:
        status, score, info = check
        st = Status(status)
        if st == Status.PARSE_ERROR and score is not None:
            score = self.parse_error_score
        comps = {"correct": score} if st == Status.OK and score is not None else {}
        return RewardResult(score, st, components=comps, info={**info, "latency_s": latency})

    def _timeout(self, latency: float) -> RewardResult:
        why = f"math-verify ran past the {self.deadline_s:g} s deadline"
        return RewardResult(None, Status.TIMEOUT, info={"reason": why, "latency_s": latency})

    def _run_serial(self, tasks: Sequence[tuple[int, str, list[str]]]) -> dict[int, RewardResult]:
        out: dict[int, RewardResult] = {}
        _warm_up()
        for i, pred, golds in tasks:
            t0 = time.monotonic()
            old = signal.signal(signal.SIGALRM, _alarm)
            try:
                try:
                    signal.setitimer(signal.ITIMER_REAL, self.deadline_s)
                    check = _check_math(pred, golds)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                out[i] = self._result(check, time.monotonic() - t0)
            except _Deadline:
                out[i] = self._timeout(time.monotonic() - t0)
            finally:
                signal.signal(signal.SIGALRM, old)
        return out

    def _retire(self, w: _Worker) -> None:
        w.stop(graceful=False)
        self._pool.remove(w)

    def _run_pool(self, tasks: Sequence[tuple[int, str, list[str]]]) -> dict[int, RewardResult]:
        ctx = mp.get_context("spawn")
        pending = deque(tasks)
        out: dict[int, RewardResult] = {}
        failed_starts = 0
        while pending or any(w.task is not None for w in self._pool):
            busy = sum(w.task is not None for w in self._pool)
            while len(self._pool) < min(self.workers, busy + len(pending)):
                self._pool.append(_Worker(ctx))
            for w in list(self._pool):
                if w.ready and w.task is None and pending:
                    if not w.proc.is_alive():  # died while idle (e.g. killed with the thread that started it)
                        self._retire(w)
                        continue
                    task = pending.popleft()
                    try:
                        w.conn.send(task)
                    except OSError:  # the worker died while idle: the task never ran
                        pending.appendleft(task)
                        self._retire(w)
                        continue
                    w.task, w.since = task[0], time.monotonic()
            if not any(w.task is not None or not w.ready for w in self._pool):
                continue  # nothing running or starting (idle workers died): start new ones first
            now = time.monotonic()
            waits = [
                w.since + (self.deadline_s if w.task is not None else self.startup_timeout_s) - now
                for w in self._pool
                if w.task is not None or not w.ready
            ]
            ready = mpc.wait([w.conn for w in self._pool], max(0.0, min(waits)) if waits else None)
            for w in [w for w in list(self._pool) if w.conn in ready]:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    if w.task is not None:
                        why = f"math-verify worker died (exit code {w.proc.exitcode})"
                        out[w.task] = RewardResult(None, Status.EXEC_ERROR, info={"reason": why})
                    elif not w.ready:
                        failed_starts += 1
                    self._retire(w)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                else:
                    _, idx, status, score, info = msg
                    out[idx] = self._result((status, score, info), time.monotonic() - w.since)
                    w.task = None
            now = time.monotonic()
            for w in list(self._pool):
                if w.task is not None and now - w.since >= self.deadline_s:
                    out[w.task] = self._timeout(now - w.since)
                    self._retire(w)
                elif not w.ready and now - w.since >= self.startup_timeout_s:
                    failed_starts += 1
                    self._retire(w)
            if failed_starts >= 3 and pending and not any(w.ready for w in self._pool):
                why = "math-verify workers failed to start"
                for i, _, _ in pending:
                    out[i] = RewardResult(None, Status.EXEC_ERROR, info={"reason": why})
                pending.clear()
        return out
