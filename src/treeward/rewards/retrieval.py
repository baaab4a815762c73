"""Rewards for retrieval-augmented answers: citations and rubrics, nuggets, retrieval cost, regularised relevance.

- :class:`CitationRubricReward` — CaRR (Citation-aware Rubric Rewards; THUDM/CaRR, arXiv 2601.06021): rubric items
  with entity placeholders, checked against the evidence the answer *cites*, kept only when connected to the
  answer entity; mixed with an outcome reward. The rule-based steps are implemented; the three steps the paper
  gives to an LLM judge (entity identification, rubric support, outcome) are hooks with lexical defaults.
- :class:`NuggetCoverage` — Search-Gen-V's nugget-as-rubric (Ma et al., arXiv 2510.14660): the weighted fraction of
  reference nuggets the answer supports, with a pluggable matcher (:class:`LexicalNuggetMatcher` by default).
- :class:`RetrievalShaping`, :class:`CostAwareF1` — the *shapes* GraphRAG-R1 (Yu et al., arXiv 2507.23581)
  describes for its PRA and CAF rewards. The paper's equations could not be verified (no released training code;
  only the abstract was reachable): these are documented stand-ins, not reproductions.
- :class:`RegularizedRelevance` — R³'s idea (Kim & Seo, 2024, "Preference-free Alignment Learning with Regularized
  Relevance Reward"; code announced at naver-ai/RRR, not found) in the form its authors released in
  naver-ai/rethinking-proxy-reward: ``length incentive × relevance × repetition penalty``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.rewards.verifiable import (
    Extract,
    _na,
    _precheck,
    _refs_or_result,
    answer_tag_or_text,
    normalize_answer,
    reference_strings,
    repetition_rate,
    token_f1,
    wordpunct,
)

__all__ = [
    "NUGGET_LABELS",
    "CitationRubricReward",
    "CostAwareF1",
    "LexicalNuggetMatcher",
    "LexicalSupport",
    "NuggetCoverage",
    "RegularizedRelevance",
    "RetrievalCount",
    "RetrievalShaping",
    "TermCosine",
    "cited_urls",
    "contains_reference",
    "rubric_entities",
]


def _judge_error(reason: str) -> RewardResult:
    return RewardResult(None, Status.JUDGE_ERROR, info={"reason": reason})


def _contains(haystack_norm: str, needle: str) -> bool:
    n = normalize_answer(needle)
    return bool(n) and f" {n} " in f" {haystack_norm} "


# ---------------------------------------------------------------------------------------------------------------
# CaRR
# ---------------------------------------------------------------------------------------------------------------
_CITATION = re.compile(r"\[\d+\]\((?:view-source:)?(https?://[^\s)]+)\)")
_ENTITY = re.compile(r"<(E\d+)>")
_JINA = re.compile(r"^https?://r\.jina\.ai/")


def cited_urls(text: str, max_citations: int = 20) -> list[str]:
    """The URLs cited as ``[n](url)`` in ``text``, de-duplicated in order of first citation, at most
    ``max_citations`` (CaRR's cap is 20); ``view-source:`` and ``r.jina.ai/`` reader prefixes are removed."""
    out: list[str] = []
    for url in _CITATION.findall(text):
        url = _JINA.sub("", url)
        if url not in out:
            out.append(url)
        if len(out) == max_citations:
            break
    return out


def rubric_entities(rubrics: Sequence[str]) -> list[str]:
    """The entity ids (``E0``, ``E1``, ...) used by the rubrics, sorted by number."""
    ids = {e for r in rubrics for e in _ENTITY.findall(r)}
    return sorted(ids, key=lambda e: int(e[1:]))


def contains_reference(question: str, response: str, answers: Sequence[str]) -> bool:
    """Default outcome check: a SQuAD-normalised reference answer occurs, word-bounded, in the response."""
    norm = normalize_answer(response)
    return any(_contains(norm, a) for a in answers)


class LexicalSupport:
    """Default rubric judge: a statement is supported when at least ``threshold`` of its SQuAD-normalised tokens
    (as a multiset) occur in the cited evidence. A lexical stand-in for CaRR's LLM judge."""

    def __init__(self, threshold: float = 0.6) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold

    def __call__(self, statements: Sequence[str], evidence: str) -> list[bool]:
        ev = Counter(normalize_answer(evidence).split())
        out = []
        for st in statements:
            toks = Counter(normalize_answer(st).split())
            n = sum(toks.values())
            out.append(n > 0 and sum((toks & ev).values()) / n >= self.threshold)
        return out


EntityFinder = Callable[[str, Sequence[str], str], Mapping[str, "str | None"]]
"""(question, rubrics, response) → {entity id: the entity's name in the response, or None}."""
SupportJudge = Callable[[Sequence[str], str], Sequence[bool]]
"""(filled rubric statements, cited evidence text) → one support verdict per statement."""
OutcomeJudge = Callable[[str, str, Sequence[str]], bool]
"""(question, response, reference answers) → whether the response's final answer is correct."""


class _GoldEntities:
    """Entity identification from gold aliases: entity ``Ek`` is identified when one of
    ``metadata["entities"]["Ek"]`` (a name or a list of names) occurs in the response; ``E0`` defaults to the
    reference answers. The lexical stand-in for CaRR's LLM entity-identification step."""

    def __init__(self, aliases: Mapping[str, Sequence[str]]) -> None:
        self.aliases = aliases

    def __call__(self, question: str, rubrics: Sequence[str], response: str) -> dict[str, str | None]:
        norm = normalize_answer(response)
        return {
            e: next((a for a in self.aliases.get(e, ()) if _contains(norm, a)), None)
            for e in rubric_entities(rubrics)
        }


def _aliases(sample: Sample, answers: Sequence[str]) -> dict[str, list[str]]:
    raw = sample.metadata.get("entities", {})
    if not isinstance(raw, Mapping):
        raise TypeError("metadata['entities'] must map entity ids to a name or a list of names")
    out: dict[str, list[str]] = {}
    for k, v in raw.items():
        names = reference_strings(v)
        out[str(k)] = names or []
    out.setdefault("E0", list(answers))
    return out


class CitationRubricReward:
    """CaRR: citation-aware rubric reward mixed with an outcome reward (THUDM/CaRR, arXiv 2601.06021).

    Inputs: ``response`` — the final report, citing sources as ``[n](url)``; ``reference`` — the gold answer(s);
    ``metadata["rubrics"]`` — atomic statements with entity placeholders ``<E0>`` (the answer), ``<E1>``, ...;
    ``metadata["evidence"]`` — ``{url: text the agent saw for that url}`` (CaRR rebuilds it from the tool history:
    search snippets, opened pages, find results); ``metadata["entities"]`` (for the default entity finder) —
    ``{"E1": name or [aliases], ...}``; ``metadata["question"]`` (default: the prompt).

    Steps (CaRR's ``get_rubric_reward``): (1) identify every entity in the response (``entity_finder``; CaRR: an
    LLM, retried until the ids match); a rubric with an unidentified entity scores 0. (2) fill the placeholders;
    collect the cited URLs (≤ ``max_citations``) and their evidence; no cited evidence → rubric reward 0.
    (3) ``support_judge`` marks each filled rubric supported or not *given only the cited evidence* (CaRR: an
    LLM). (4) BFS from ``E0`` over supported rubrics, two rubrics linked when they share an entity id; only
    reachable rubrics count. ``R_rubric = #reachable supported / #rubrics``. Outcome ``R_out`` ∈ {0, 1} from
    ``outcome_judge`` (CaRR: an LLM grader in the BrowseComp style; default here: :func:`contains_reference`),
    judged on the text before any "## References" section. ``R = (1 − λ)·R_out + λ·R_rubric``, λ =
    ``rubric_weight`` (0.3 in CaRR's training script); the outcome is skipped when λ = 1, the rubric when λ = 0.

    Rule-based here: citation extraction and validity, placeholder filling, connectivity, the mix. LLM in the
    paper, hooks here (any callable; a hook that raises or returns the wrong shape → ``judge_error``): entity
    identification, rubric support, outcome. Departures: citations need only ``[n](url)`` (CaRR's regex also wants
    a closing ``]`` or ``,`` right after); ``components["valid_citations"]`` (the share of cited URLs present in the
    evidence) is reported but not scored, as in CaRR. C-GRPO's group options (normalise by the group max, rubric
    only for correct answers) are group transforms, not part of this per-sample reward. Missing rubrics or evidence
    (when λ > 0), or a missing reference (when λ < 1) → ``n/a``.
    """

    def __init__(
        self,
        *,
        rubric_weight: float = 0.3,
        max_citations: int = 20,
        entity_finder: EntityFinder | None = None,
        support_judge: SupportJudge | None = None,
        outcome_judge: OutcomeJudge = contains_reference,
        name: str = "carr",
    ) -> None:
        if not 0.0 <= rubric_weight <= 1.0:
            raise ValueError("rubric_weight must be in [0, 1]")
        self.rubric_weight = rubric_weight
        self.max_citations = max_citations
        self.entity_finder = entity_finder
        self.support_judge: SupportJudge = support_judge if support_judge is not None else LexicalSupport()
        self.outcome_judge = outcome_judge
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        if (pre := _precheck(s)) is not None:
            return pre
        lam = self.rubric_weight
        question = str(s.metadata.get("question", s.prompt))
        judged = (
            s.response.rsplit("## References", 1)[0].strip() if "## References" in s.response else s.response
        )
        try:
            answers = reference_strings(s.reference) or []
        except TypeError as e:
            return RewardResult(None, Status.PARSE_ERROR, info={"reason": f"reference: {e}"})
        comps: dict[str, float] = {}
        info: dict[str, Any] = {}
        r_out = 0.0
        if lam < 1.0:
            if not answers:
                return _na("no reference")
            try:
                r_out = float(bool(self.outcome_judge(question, judged, answers)))
            except Exception as e:  # a judge hook failed: the sample has no score, the batch goes on
                return _judge_error(f"outcome judge: {e!r}")
            comps["outcome"] = r_out
        r_rubric = 0.0
        if lam > 0.0:
            got = self._rubric(s, question, judged, answers, comps, info)
            if isinstance(got, RewardResult):
                return got
            r_rubric = got
            comps["rubric"] = r_rubric
        return RewardResult((1 - lam) * r_out + lam * r_rubric, components=comps, info=info)

    def _rubric(
        self,
        s: Sample,
        question: str,
        response: str,
        answers: Sequence[str],
        comps: dict[str, float],
        info: dict[str, Any],
    ) -> float | RewardResult:
        rubrics = s.metadata.get("rubrics")
        if not rubrics:
            return _na("no rubrics in metadata['rubrics']")
        if isinstance(rubrics, str) or not all(isinstance(r, str) for r in rubrics):
            return RewardResult(
                None, Status.PARSE_ERROR, info={"reason": "metadata['rubrics'] must be strings"}
            )
        evidence = s.metadata.get("evidence")
        if not isinstance(evidence, Mapping):
            return _na("no evidence in metadata['evidence'] ({url: text})")
        ids = rubric_entities(rubrics)
        # (1) entities
        finder = self.entity_finder
        if finder is None:
            try:
                finder = _GoldEntities(_aliases(s, answers))
            except TypeError as e:
                return RewardResult(None, Status.PARSE_ERROR, info={"reason": f"metadata['entities']: {e}"})
        try:
            found = dict(finder(question, rubrics, response))
        except Exception as e:  # a judge hook failed: the sample has no score, the batch goes on
            return _judge_error(f"entity identification: {e!r}")
        if set(found) != set(ids) or not all(v is None or isinstance(v, str) for v in found.values()):
            return _judge_error(f"entity identification returned keys {sorted(found)} for entities {ids}")
        # (2) fill, cite
        filled: list[tuple[int, str]] = []
        rows = []
        for i, r in enumerate(rubrics):
            es = _ENTITY.findall(r)
            text = r
            for ent in es:
                if found[ent] is not None:
                    text = text.replace(f"<{ent}>", str(found[ent]))
            ok = all(found[ent] is not None for ent in es)
            rows.append(
                {"rubric": r, "filled": text, "identified": ok, "supported": False, "connected": False}
            )
            if ok:
                filled.append((i, text))
        urls = cited_urls(s.response, self.max_citations)
        valid = [u for u in urls if u in evidence]
        comps.update(
            {
                "citations": float(len(urls)),
                "valid_citations": len(valid) / len(urls) if urls else 0.0,
                "entities_identified": sum(v is not None for v in found.values()) / len(ids) if ids else 1.0,
            }
        )
        info["rubric_scores"] = rows
        info["cited_urls"] = urls
        content = "\n\n".join(str(evidence[u]) for u in valid)
        if not filled or not content.strip():
            comps.update({"supported": 0.0, "connected": 0.0})
            return 0.0
        # (3) support from the cited evidence only
        try:
            verdicts = list(self.support_judge([t for _, t in filled], content))
        except Exception as e:  # a judge hook failed
            return _judge_error(f"support judge: {e!r}")
        if len(verdicts) != len(filled) or not all(isinstance(v, bool) for v in verdicts):
            return _judge_error(f"support judge returned {len(verdicts)} verdicts for {len(filled)} rubrics")
        for (i, _), v in zip(filled, verdicts, strict=True):
            rows[i]["supported"] = v
        # (4) connectivity from E0
        by_entity: dict[str, set[int]] = defaultdict(set)
        for i, row in enumerate(rows):
            if row["supported"]:
                for ent in _ENTITY.findall(row["rubric"]):
                    by_entity[ent].add(i)
        seen, reach, queue = {"E0"}, set(), deque(["E0"])
        while queue:
            for i in by_entity[queue.popleft()]:
                reach.add(i)
                for ent in _ENTITY.findall(rows[i]["rubric"]):
                    if ent not in seen:
                        seen.add(ent)
                        queue.append(ent)
        for i in reach:
            rows[i]["connected"] = True
        comps.update({"supported": float(sum(r["supported"] for r in rows)), "connected": float(len(reach))})
        return len(reach) / len(rubrics)


# ---------------------------------------------------------------------------------------------------------------
# Search-Gen-V: nugget-as-rubric
# ---------------------------------------------------------------------------------------------------------------
NUGGET_LABELS = ("support", "partial_support", "not_support")

NuggetMatcher = Callable[[str, Sequence[str]], Sequence[str]]
"""(answer, nuggets) → one label of :data:`NUGGET_LABELS` per nugget (one call per answer, as Search-Gen-V batches
all of an answer's nuggets into one verifier call)."""


class LexicalNuggetMatcher:
    """Default nugget matcher: with ``c`` the share of the nugget's SQuAD-normalised tokens (multiset) found in the
    answer, ``support`` if ``c ≥ support_at``, ``partial_support`` if ``c ≥ partial_at``, else ``not_support``.
    A lexical stand-in for Search-Gen-V's generative verifier."""

    def __init__(self, *, support_at: float = 0.8, partial_at: float = 0.5) -> None:
        if not 0.0 < partial_at <= support_at <= 1.0:
            raise ValueError("need 0 < partial_at <= support_at <= 1")
        self.support_at, self.partial_at = support_at, partial_at

    def __call__(self, answer: str, nuggets: Sequence[str]) -> list[str]:
        have = Counter(normalize_answer(answer).split())
        out = []
        for n in nuggets:
            toks = Counter(normalize_answer(n).split())
            total = sum(toks.values())
            c = sum((toks & have).values()) / total if total else 0.0
            out.append(
                "support"
                if c >= self.support_at
                else "partial_support"
                if c >= self.partial_at
                else "not_support"
            )
        return out


class NuggetCoverage:
    """Search-Gen-V's nugget-as-rubric reward (Ma et al., 2025, arXiv 2510.14660; linyue-ma/Search-Gen-V).

    The reference is a list of nuggets (atomic facts; a short-form answer is one nugget). A matcher labels each
    nugget ``support`` / ``partial_support`` / ``not_support`` for the answer, and ``R = Σ_i w(label_i) / N`` with
    ``w = {support: 1, partial_support: 0.5, not_support: 0}`` by default. Departures: Search-Gen-V's verifier is a
    trained 1.7B/4B model (plug it in as ``matcher``); the label weights, in particular partial credit 0.5, are this
    library's choice (the paper says the policy reward is a function of the labels). A matcher that raises or
    returns the wrong number of labels → ``judge_error``.
    """

    def __init__(
        self,
        *,
        matcher: NuggetMatcher | None = None,
        weights: Mapping[str, float] | None = None,
        extract: Extract = answer_tag_or_text,
        name: str = "nugget_coverage",
    ) -> None:
        self.matcher: NuggetMatcher = matcher if matcher is not None else LexicalNuggetMatcher()
        self.weights = (
            dict(weights)
            if weights is not None
            else {"support": 1.0, "partial_support": 0.5, "not_support": 0.0}
        )
        if set(self.weights) != set(NUGGET_LABELS):
            raise ValueError(f"weights must give exactly the labels {NUGGET_LABELS}")
        self.extract = extract
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        if (pre := _precheck(s)) is not None:
            return pre
        nuggets = _refs_or_result(s)
        if isinstance(nuggets, RewardResult):
            return nuggets
        answer = self.extract(s.response) or ""
        try:
            labels = list(self.matcher(answer, nuggets))
        except Exception as e:  # a verifier hook failed
            return _judge_error(f"nugget matcher: {e!r}")
        if len(labels) != len(nuggets) or any(lab not in self.weights for lab in labels):
            return _judge_error(f"matcher returned {labels!r:.120} for {len(nuggets)} nuggets")
        score = sum(self.weights[lab] for lab in labels) / len(nuggets)
        comps = {lab: labels.count(lab) / len(nuggets) for lab in NUGGET_LABELS}
        return RewardResult(score, components={"coverage": score, **comps}, info={"labels": labels})


# ---------------------------------------------------------------------------------------------------------------
# GraphRAG-R1 shapes (unverified)
# ---------------------------------------------------------------------------------------------------------------
class RetrievalCount:
    """The number of retrieval calls: ``metadata[metadata_key]`` when it is an int, else the number of
    ``<tag>...</tag>`` blocks in the response."""

    def __init__(self, *, tag: str = "search", metadata_key: str = "num_retrievals") -> None:
        self.tag, self.metadata_key = tag, metadata_key
        self._re = re.compile(rf"<{re.escape(tag)}>.*?</{re.escape(tag)}>", re.DOTALL)

    def __call__(self, sample: Sample) -> int:
        v = sample.metadata.get(self.metadata_key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
        return len(self._re.findall(sample.response))


class RetrievalShaping:
    """Attenuating reward for retrieval calls: ``R(n) = 1 − decay^n`` for ``n`` calls (0 for none; each further
    call adds ``decay`` times the previous one's increment; bounded by 1).

    The shape of GraphRAG-R1's Progressive Retrieval Attenuation (Yu et al., 2025, arXiv 2507.23581: "encourage
    essential retrievals", with a marginal reward that decays as calls accumulate). UNVERIFIED: the paper's PRA
    equation and constants could not be read (no released training code); this is a stand-in with the described
    shape, not the paper's formula. Scores partial prefixes too (it is a process reward).
    """

    def __init__(
        self,
        *,
        decay: float = 0.5,
        count: Callable[[Sample], int] | None = None,
        name: str = "retrieval_shaping",
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.decay = decay
        self.count: Callable[[Sample], int] = count if count is not None else RetrievalCount()
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if (pre := _precheck(s, partial_ok=True)) is not None:
                out.append(pre)
                continue
            n = self.count(s)
            r = 1.0 - self.decay**n
            out.append(RewardResult(r, components={"retrievals": float(n), "shaping": r}))
        return out


class CostAwareF1:
    """Answer F1 discounted by retrieval cost: ``R = F1 · exp(−cost_weight · max(0, n − free_calls))``.

    The shape of GraphRAG-R1's Cost-Aware F1 (Yu et al., 2025, arXiv 2507.23581: F1 balanced against computational
    cost, against over-thinking). UNVERIFIED: the paper's CAF equation and constants could not be read; this
    multiplicative discount is a stand-in (a wrong answer stays 0 however cheap, a free answer keeps its F1). F1 is
    SQuAD token F1, max over references (:func:`~treeward.rewards.verifiable.token_f1`).
    """

    def __init__(
        self,
        *,
        cost_weight: float = 0.1,
        free_calls: int = 0,
        count: Callable[[Sample], int] | None = None,
        extract: Extract = answer_tag_or_text,
        name: str = "cost_aware_f1",
    ) -> None:
        if cost_weight < 0 or free_calls < 0:
            raise ValueError("cost_weight and free_calls must be >= 0")
        self.cost_weight, self.free_calls = cost_weight, free_calls
        self.count: Callable[[Sample], int] = count if count is not None else RetrievalCount()
        self.extract = extract
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if (pre := _precheck(s)) is not None:
                out.append(pre)
                continue
            refs = _refs_or_result(s)
            if isinstance(refs, RewardResult):
                out.append(refs)
                continue
            ans = self.extract(s.response)
            if ans is None:
                out.append(RewardResult(0.0, Status.PARSE_ERROR, info={"reason": "no answer found"}))
                continue
            f1 = token_f1(ans, refs)
            n = self.count(s)
            discount = math.exp(-self.cost_weight * max(0, n - self.free_calls))
            out.append(
                RewardResult(
                    f1 * discount, components={"f1": f1, "retrievals": float(n), "discount": discount}
                )
            )
        return out


# ---------------------------------------------------------------------------------------------------------------
# R³: regularised relevance
# ---------------------------------------------------------------------------------------------------------------
Relevance = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""(queries, responses) → one relevance score per pair (batched, for a retriever such as Contriever)."""


class TermCosine:
    """Default relevance: cosine similarity of the term-frequency vectors of the SQuAD-normalised tokens, in [0, 1].
    A lexical stand-in for the Contriever dot product the authors use."""

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> list[float]:
        out = []
        for q, r in zip(queries, responses, strict=True):
            a, b = Counter(normalize_answer(q).split()), Counter(normalize_answer(r).split())
            dot = sum(a[t] * b[t] for t in a.keys() & b.keys())
            na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
            out.append(dot / (na * nb) if na and nb else 0.0)
        return out


class RegularizedRelevance:
    """Relevance regularised by length and repetition: ``R = LI × QR × RP``.

    R³ (Kim & Seo, 2024, "Preference-free Alignment Learning with Regularized Relevance Reward") rewards the
    retriever relevance of a response to its query, regularised against reward hacking; its code (naver-ai/RRR)
    was not found. The formula here is the one the same authors released in naver-ai/rethinking-proxy-reward
    (``ReversedEngineeredRewardForInference``): ``LI = #wordpunct tokens / 100`` (length incentive), ``QR =
    relevance(query, response)`` (Contriever dot product there; :class:`TermCosine` by default here), ``RP =
    distinct trigrams / trigrams`` (1 with fewer than 3 tokens). With ``reward_branching``, a sample whose
    ``metadata["qtype"] == "CONSTRAINED"`` is scored by relevance to the *reference*, mapped linearly from
    ``relevance_range`` to ``[0, max_sequence_length / 100]``, times RP. The query is ``metadata["query"]`` if
    given, else the prompt (the authors strip their chat template from the prompt first). Departures: no
    stop-sequence stripping; ``relevance_range`` defaults to (0, 1) to match :class:`TermCosine` (the authors use
    (0, 3.5) with Contriever). Reference-free except for branched samples.
    """

    def __init__(
        self,
        *,
        relevance: Relevance | None = None,
        length_incentive: bool = True,
        repetition_penalty: bool = True,
        reward_branching: bool = False,
        max_sequence_length: int = 512,
        relevance_range: tuple[float, float] = (0.0, 1.0),
        name: str = "regularized_relevance",
    ) -> None:
        if relevance_range[1] <= relevance_range[0]:
            raise ValueError("relevance_range must be increasing")
        self.relevance: Relevance = relevance if relevance is not None else TermCosine()
        self.length_incentive, self.repetition_penalty = length_incentive, repetition_penalty
        self.reward_branching = reward_branching
        self.max_sequence_length = max_sequence_length
        self.relevance_range = relevance_range
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        jobs: list[tuple[int, str, str, bool]] = []  # (index, query-or-reference, response, branched)
        for i, s in enumerate(samples):
            if (pre := _precheck(s)) is not None:
                results[i] = pre
                continue
            branched = self.reward_branching and s.metadata.get("qtype") == "CONSTRAINED"
            if branched:
                refs = _refs_or_result(s)
                if isinstance(refs, RewardResult):
                    results[i] = refs
                    continue
                jobs.append((i, refs[0], s.response, True))
            else:
                jobs.append((i, str(s.metadata.get("query", s.prompt)), s.response, False))
        if jobs:
            try:
                rel = [float(x) for x in self.relevance([j[1] for j in jobs], [j[2].strip() for j in jobs])]
            except Exception as e:  # a relevance hook failed: no sample it was asked about gets a score
                for i, *_ in jobs:
                    results[i] = _judge_error(f"relevance: {e!r}")
                rel = []
            if rel and len(rel) != len(jobs):
                for i, *_ in jobs:
                    results[i] = _judge_error(f"relevance returned {len(rel)} scores for {len(jobs)} pairs")
            elif rel:
                for (i, _, resp, branched), qr in zip(jobs, rel, strict=True):
                    results[i] = self._combine(resp, qr, branched)
        return [r if r is not None else RewardResult(None, Status.EXEC_ERROR) for r in results]

    def _combine(self, response: str, qr: float, branched: bool) -> RewardResult:
        tokens = wordpunct(response.strip())
        li = len(tokens) / 100
        rate, _, total = repetition_rate(tokens, 3)
        rp = 1.0 - rate if total else 1.0
        if branched:
            lo, hi = self.relevance_range
            base = (qr - lo) / (hi - lo) * (self.max_sequence_length / 100)
        else:
            base = (li if self.length_incentive else 1.0) * qr
        score = base * (rp if self.repetition_penalty else 1.0)
        return RewardResult(score, components={"length_incentive": li, "relevance": qr, "repetition": rp})
