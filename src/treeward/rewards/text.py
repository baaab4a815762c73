"""Reference-overlap rewards: BLEU, chrF, ROUGE-L, and BLEUBERI's BLEU.

BLEUBERI (Chang et al., 2025, "BLEUBERI: BLEU is a surprisingly effective reward for instruction following")
trains with sentence BLEU against one or more references as the GRPO reward. Its code (lilakk/BLEUBERI,
``training/utils.py``) calls Hugging Face ``evaluate``'s "bleu" with ``smooth=True``: the TensorFlow-NMT
``compute_bleu`` over 13a tokens, add-one smoothing on every n-gram order, n-gram counts clipped by the maximum
count in any reference, and the *shortest* reference for the brevity penalty. That is not sacrebleu's sentence
BLEU (exp smoothing, closest reference length), so both are here:

- :class:`BleuberiBLEU`: BLEUBERI's exact BLEU (the NMT arithmetic over sacrebleu's 13a tokenizer).
- :class:`SentenceBLEU`: sacrebleu's sentence BLEU (``effective_order=True``, exp smoothing by default).
- :class:`ChrF`: sacrebleu's sentence chrF (chrF2; ``word_order=2`` gives chrF++). Not used by BLEUBERI.
- :class:`RougeL`: ROUGE-L F1 through rouge-score, with :class:`UnicodeTokenizer` (rouge-score's default tokenizer
  keeps only ``[a-z0-9]`` and silently scores non-Latin text as empty); multi-reference = best F1.
- :class:`BleuRougeF1`: BLEUBERI's ``bleu_rouge_f1`` variant, the harmonic mean of the two.

All scores are in [0, 1] (sacrebleu's 0-100 divided by 100). The hypothesis is ``extract(response)`` (default: the
last ``<answer>`` block, else the whole response, as BLEUBERI does); references come from ``Sample.reference``
(a string or a list of strings). An empty hypothesis scores 0.0 (BLEUBERI's rule).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.rewards.verifiable import Extract, _precheck, _refs_or_result, answer_tag_or_text

__all__ = [
    "BleuRougeF1",
    "BleuberiBLEU",
    "ChrF",
    "RougeL",
    "SentenceBLEU",
    "UnicodeTokenizer",
    "bleuberi_bleu",
]


def _hypothesis_and_refs(sample: Sample, extract: Extract) -> tuple[str, list[str]] | RewardResult:
    if (pre := _precheck(sample)) is not None:
        return pre
    refs = _refs_or_result(sample)
    if isinstance(refs, RewardResult):
        return refs
    hyp = extract(sample.response)
    return (hyp or "").strip(), refs


def _empty(name: str) -> RewardResult:
    return RewardResult(0.0, components={name: 0.0}, info={"reason": "empty answer"})


# ---------------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------------
def _ngrams(tokens: Sequence[str], max_order: int) -> Counter[tuple[str, ...]]:
    c: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            c[tuple(tokens[i : i + n])] += 1
    return c


def bleuberi_bleu(
    hypothesis: str, references: Sequence[str], *, max_order: int = 4, smooth: bool = True
) -> dict[str, Any]:
    """BLEU as computed by TensorFlow-NMT's ``compute_bleu`` (behind ``evaluate.load("bleu")``) for one sentence.

    Tokens: sacrebleu's 13a tokenizer. ``p_n = (m_n + 1) / (c_n + 1)`` with smoothing (every order, Lin & Och
    2004), ``m_n / c_n`` without; ``m_n`` clips each hypothesis n-gram count by its maximum count in any
    reference, ``c_n = max(0, len(hyp) − n + 1)``. ``BLEU = BP · exp(Σ_n log p_n / N)`` (0 if any ``p_n`` is 0),
    ``BP = 1`` if ``len(hyp) > r`` else ``exp(1 − r / len(hyp))`` with ``r`` the *shortest* reference length.
    Returns ``bleu``, ``precisions``, ``brevity_penalty``, ``length_ratio``, ``translation_length`` and
    ``reference_length``, like ``evaluate``'s result.
    """
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    hyp = tok(hypothesis).split()
    refs = [tok(r).split() for r in references]
    if not refs:
        raise ValueError("bleuberi_bleu needs at least one reference")
    merged: Counter[tuple[str, ...]] = Counter()
    for r in refs:
        merged |= _ngrams(r, max_order)
    overlap = _ngrams(hyp, max_order) & merged
    matches = [0] * max_order
    for g, k in overlap.items():
        matches[len(g) - 1] += k
    possible = [max(0, len(hyp) - n + 1) for n in range(1, max_order + 1)]
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible, strict=True)]
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible, strict=True)]
    geo = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    ref_len = min(len(r) for r in refs)
    if ref_len == 0 or not hyp:
        ratio, bp = 0.0, 0.0
    else:
        ratio = len(hyp) / ref_len
        bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return {
        "bleu": geo * bp,
        "precisions": precisions,
        "brevity_penalty": bp,
        "length_ratio": ratio,
        "translation_length": len(hyp),
        "reference_length": ref_len,
    }


class BleuberiBLEU:
    """BLEUBERI's reward: smoothed sentence BLEU against all references (Chang et al., 2025).

    Formula: :func:`bleuberi_bleu` (``evaluate``'s "bleu" with ``smooth=True``, which BLEUBERI calls). Multiple
    references are BLEU's own multi-reference form (clipped counts against all references at once, shortest
    reference for the brevity penalty), not a max over references. Empty answer → 0.0, as in BLEUBERI.
    Departure: none in the arithmetic; tokens come from sacrebleu's 13a tokenizer, of which ``evaluate``'s
    tokenizer is a copy.
    """

    def __init__(
        self, *, extract: Extract = answer_tag_or_text, smooth: bool = True, name: str = "bleuberi_bleu"
    ) -> None:
        self.extract = extract
        self.smooth = smooth
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            got = _hypothesis_and_refs(s, self.extract)
            if isinstance(got, RewardResult):
                out.append(got)
                continue
            hyp, refs = got
            if not hyp:
                out.append(_empty("bleu"))
                continue
            b = bleuberi_bleu(hyp, refs, smooth=self.smooth)
            comps = {"bleu": b["bleu"], "brevity_penalty": b["brevity_penalty"]}
            comps.update({f"p{i + 1}": p for i, p in enumerate(b["precisions"])})
            out.append(RewardResult(b["bleu"], components=comps))
        return out


def _cached(obj: Any, attr: str, build: Callable[[], Any]) -> Any:
    """``obj.<attr>``, built on first use (library metric objects hold caches: they stay out of pickles)."""
    got = obj.__dict__.get(attr)
    if got is None:
        got = build()
        obj.__dict__[attr] = got
    return got


def _without(obj: Any, attr: str) -> dict[str, Any]:
    return {k: v for k, v in obj.__dict__.items() if k != attr}


class SentenceBLEU:
    """sacrebleu's sentence-level BLEU (Post, 2018, "A Call for Clarity in Reporting BLEU Scores"), / 100.

    Defaults are sacrebleu's recommendation for single sentences: 13a tokens, exp smoothing,
    ``effective_order=True``. Multiple references use sacrebleu's multi-reference BLEU (clipped counts against all
    references, closest reference length). For BLEUBERI's exact numbers use :class:`BleuberiBLEU` instead.
    """

    def __init__(
        self,
        *,
        extract: Extract = answer_tag_or_text,
        tokenize: str = "13a",
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        effective_order: bool = True,
        lowercase: bool = False,
        name: str = "bleu",
    ) -> None:
        self.extract = extract
        self.config: dict[str, Any] = {
            "tokenize": tokenize,
            "smooth_method": smooth_method,
            "smooth_value": smooth_value,
            "effective_order": effective_order,
            "lowercase": lowercase,
        }
        self._metric()  # fail fast on a bad configuration
        self.name = self.__name__ = name

    def _metric(self) -> Any:
        from sacrebleu.metrics import BLEU

        return _cached(self, "_bleu", lambda: BLEU(**self.config))

    def __getstate__(self) -> dict[str, Any]:
        return _without(self, "_bleu")

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        metric = self._metric()
        out = []
        for s in samples:
            got = _hypothesis_and_refs(s, self.extract)
            if isinstance(got, RewardResult):
                out.append(got)
                continue
            hyp, refs = got
            if not hyp:
                out.append(_empty("bleu"))
                continue
            b = metric.sentence_score(hyp, refs)
            score = b.score / 100.0
            out.append(RewardResult(score, components={"bleu": score, "brevity_penalty": b.bp}))
        return out


class ChrF:
    """sacrebleu's sentence chrF (Popović, 2015, "chrF: character n-gram F-score for automatic MT evaluation"), / 100.

    ``chrF_β`` over character n-grams up to ``char_order`` (6) and word n-grams up to ``word_order`` (0; 2 is
    chrF++), β = 2. With several references sacrebleu keeps the best-scoring one. BLEUBERI does not use chrF; it is
    here as the tokenizer-free overlap reward for languages without spaces.
    """

    def __init__(
        self,
        *,
        extract: Extract = answer_tag_or_text,
        char_order: int = 6,
        word_order: int = 0,
        beta: int = 2,
        lowercase: bool = False,
        name: str = "chrf",
    ) -> None:
        self.extract = extract
        self.config: dict[str, Any] = {
            "char_order": char_order,
            "word_order": word_order,
            "beta": beta,
            "lowercase": lowercase,
        }
        self._metric()
        self.name = self.__name__ = name

    def _metric(self) -> Any:
        from sacrebleu.metrics import CHRF

        return _cached(self, "_chrf", lambda: CHRF(**self.config))

    def __getstate__(self) -> dict[str, Any]:
        return _without(self, "_chrf")

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        metric = self._metric()
        out = []
        for s in samples:
            got = _hypothesis_and_refs(s, self.extract)
            if isinstance(got, RewardResult):
                out.append(got)
                continue
            hyp, refs = got
            if not hyp:
                out.append(_empty("chrf"))
                continue
            score = metric.sentence_score(hyp, refs).score / 100.0
            out.append(RewardResult(score, components={"chrf": score}))
        return out


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------------------
# Han ideographs, kana and CJK compatibility ideographs: scripts written without spaces, one token per character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNICODE_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


class UnicodeTokenizer:
    """A rouge-score tokenizer (anything with ``tokenize(text) -> list[str]``) that keeps every script.

    Lower-cases, then takes runs of letters and digits of any script as tokens, except that each Han / kana
    character is its own token (those scripts have no spaces). On ASCII text it gives exactly rouge-score's default
    tokens (runs of ``[a-z0-9]``), so English scores do not change. No stemming.
    """

    def tokenize(self, text: str) -> list[str]:
        return _UNICODE_TOKEN.findall(text.lower())


class RougeL:
    """ROUGE-L F1 (Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries") via rouge-score.

    With ``LCS`` the longest common token subsequence, ``P = LCS / |hyp|``, ``R = LCS / |ref|``,
    ``F1 = 2PR / (P + R)``; several references → the best F1 (rouge-score's ``score_multi``). BLEUBERI's ``rouge``
    reward is this F1 via ``evaluate`` (no stemmer). Departure: the tokenizer is :class:`UnicodeTokenizer`
    instead of rouge-score's ASCII-only default (identical on ASCII text).
    """

    def __init__(self, *, extract: Extract = answer_tag_or_text, name: str = "rouge_l") -> None:
        self.extract = extract
        self.name = self.__name__ = name

    def _scorer(self) -> Any:
        from rouge_score import rouge_scorer  # imports NLTK (seconds): only when first used

        return _cached(
            self,
            "_sc",
            lambda: rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer()),
        )

    def __getstate__(self) -> dict[str, Any]:
        return _without(self, "_sc")

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            got = _hypothesis_and_refs(s, self.extract)
            if isinstance(got, RewardResult):
                out.append(got)
                continue
            hyp, refs = got
            if not hyp:
                out.append(_empty("f1"))
                continue
            sc = self._scorer().score_multi(refs, hyp)["rougeL"]
            out.append(
                RewardResult(
                    sc.fmeasure,
                    components={"f1": sc.fmeasure, "precision": sc.precision, "recall": sc.recall},
                )
            )
        return out


class BleuRougeF1:
    """BLEUBERI's ``bleu_rouge_f1``: the harmonic mean ``2·B·R / (B + R)`` of :class:`BleuberiBLEU` and
    :class:`RougeL` (0 when both are 0). Departure: ROUGE-L uses :class:`UnicodeTokenizer`."""

    def __init__(self, *, extract: Extract = answer_tag_or_text, name: str = "bleu_rouge_f1") -> None:
        self.bleu = BleuberiBLEU(extract=extract)
        self.rouge = RougeL(extract=extract)
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for b, r in zip(self.bleu(samples), self.rouge(samples), strict=True):
            if b.score is None or r.score is None:
                out.append(b if b.status != Status.OK else r)
                continue
            hm = 2 * b.score * r.score / (b.score + r.score) if b.score + r.score > 0 else 0.0
            out.append(RewardResult(hm, components={"bleu": b.score, "rouge_l": r.score, "f1": hm}))
        return out
