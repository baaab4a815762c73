"""Tool-use rewards: ToolRL's format + correctness reward, and Router-R1's format / outcome / cost reward.

- :class:`ToolCallReward` (Qian et al., 2025, "ToolRL: Reward is All Tool Learning Needs"): a format reward in
  {0, 1} plus a correctness reward in [−3, 3] from tool-name, parameter-name and parameter-value matching.
- :class:`RouterReward` (Zhang, Feng & You, 2025, "Router-R1: Teaching LLMs Multi-Round Routing and Aggregation
  via Reinforcement Learning"): a hierarchical reward — format failure → −1; a wrong answer → 0; otherwise
  ``(1 − α)·F1 + α·cost_reward``, with the cost of the routed calls normalised over a rolling window
  (:class:`RollingCostNormalizer`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.rewards.verifiable import _na, _precheck, reference_strings, token_f1

__all__ = [
    "RollingCostNormalizer",
    "RouterReward",
    "ToolCallReward",
    "ToolCallsError",
    "match_score",
    "parse_tool_calls",
    "router_format",
    "tool_call_correctness",
]


# ---------------------------------------------------------------------------------------------------------------
# ToolRL
# ---------------------------------------------------------------------------------------------------------------
class ToolCallsError(ValueError):
    """A ``<tool_call>`` block whose content is not a list of ``{"name", "parameters"}`` calls."""


_TOOL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _normalize_call(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallsError(f"a tool call must be an object with a string 'name', got {obj!r:.80}")
    params = obj["parameters"] if "parameters" in obj else obj.get("arguments")
    if isinstance(params, str):  # OpenAI-style arguments: a JSON string
        try:
            params = json.loads(params)
        except json.JSONDecodeError as e:
            raise ToolCallsError(f"arguments of {obj['name']!r} are not JSON: {e.msg}") from e
    if not isinstance(params, dict):
        raise ToolCallsError(f"tool call {obj['name']!r} has no 'parameters' object")
    return {"name": obj["name"], "parameters": params}


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls in the first ``<tool_call>...</tool_call>`` block of ``text``, or ``None`` when there is none.

    The block holds one JSON object per line (ToolRL's format) or one JSON list of objects. Each call is
    ``{"name": str, "parameters": dict}``; ``"arguments"`` (a dict or a JSON string, OpenAI's form) is accepted for
    ``"parameters"``. Raises :class:`ToolCallsError` on anything else.
    """
    m = _TOOL_BLOCK.search(text)
    if m is None:
        return None
    body = m.group(1).strip()
    try:
        whole = json.loads(body)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [_normalize_call(c) for c in whole]
    if isinstance(whole, dict):
        return [_normalize_call(whole)]
    calls = []
    for line in body.split("\n"):
        if not line.strip():
            continue
        try:
            calls.append(_normalize_call(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ToolCallsError(f"tool call line is not JSON: {e.msg}: {line.strip()!r:.80}") from e
    if not calls:
        raise ToolCallsError("empty <tool_call> block")
    return calls


def match_score(a: Sequence[Any], b: Sequence[Any]) -> float:
    """ToolRL's multiset Jaccard ``|A ∩ B| / (|A| + |B| − |A ∩ B|)``; 1.0 for equal lists (also both empty), 0.0
    when exactly one is empty."""
    if list(a) == list(b):
        return 1.0
    if not a or not b:
        return 0.0
    ca, cb = Counter(map(_hashable, a)), Counter(map(_hashable, b))
    inter = sum((ca & cb).values())
    return inter / (len(a) + len(b) - inter)


def _hashable(x: Any) -> Any:
    return json.dumps(x, sort_keys=True) if isinstance(x, (dict, list)) else x


def tool_call_correctness(
    gold: Sequence[Mapping[str, Any]], pred: Sequence[Mapping[str, Any]], *, lo: float = -3.0, hi: float = 3.0
) -> tuple[float, dict[str, float]]:
    """ToolRL's correctness reward ``R = (hi − lo)·S / S_max + lo`` and its parts.

    Exact list equality scores ``hi``. Otherwise ``S = match_score(gold names, pred names)`` plus, for each gold
    call in order, the best *unused* predicted call with the same name, scored
    ``match_score(gold param names, pred param names) + #{k: pred[k] == gold[k]}`` (a candidate must score > 0
    to be taken); ``S_max = 1 + Σ_gold (1 + |gold params|)``.
    """
    if [dict(g) for g in gold] == [dict(p) for p in pred]:
        return hi, {"name_match": 1.0, "param_match": 1.0, "s": 1.0, "s_max": 1.0, "exact": 1.0}
    names = match_score([g["name"] for g in gold], [p["name"] for p in pred])
    s, s_max, used = names, 1.0, set()
    param_total = 0.0
    for g in gold:
        gp = g["parameters"]
        s_max += 1.0 + len(gp)
        best, best_i = 0.0, -1
        for i, p in enumerate(pred):
            if i in used or p["name"] != g["name"]:
                continue
            pp = p["parameters"]
            sc = match_score(list(gp.keys()), list(pp.keys())) + sum(
                1.0 for k, v in gp.items() if k in pp and pp[k] == v
            )
            if sc > best:
                best, best_i = sc, i
        if best_i >= 0:
            used.add(best_i)
            s += best
            param_total += best
    r = (hi - lo) * s / s_max + lo
    return r, {"name_match": names, "param_match": param_total, "s": s, "s_max": s_max, "exact": 0.0}


def _gold_parts(reference: Any) -> tuple[list[dict[str, Any]], bool, bool]:
    """(gold calls, gold has a tool call, gold has a <response>) from a ToolRL ground-truth string or a list of
    call dicts. Raises TypeError / ToolCallsError on a malformed reference."""
    if isinstance(reference, str):
        calls = parse_tool_calls(reference)
        return calls or [], calls is not None, "<response>" in reference
    if isinstance(reference, (list, tuple)):
        calls = [_normalize_call(c) for c in reference]
        return calls, bool(calls), False
    raise TypeError(
        f"expected a ToolRL ground-truth string or a list of calls, got {type(reference).__name__}"
    )


_FORMATS = {
    (True, False): r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$",
    (False, True): r"^<think>.*?</think>\n<response>.*?</response>$",
    (True, True): r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$",
    (False, False): r"^<think>.*?</think>$",
}


def _toolrl_format(response: str, has_call: bool, has_response: bool) -> bool:
    if re.search(_FORMATS[(has_call, has_response)], response, re.DOTALL) is None:
        return False
    tags = (["tool_call"] if has_call else []) + (["response"] if has_response else [])
    return all(response.count(f"<{t}>") == 1 and response.count(f"</{t}>") == 1 for t in tags)


class ToolCallReward:
    """ToolRL's reward (Qian et al., 2025): ``R = R_format + R_correct`` ∈ [−3, 4] by default.

    ``R_format`` ∈ {0, ``format_max``}: the stripped response matches the template the ground truth calls for
    (think, then ``<tool_call>`` and/or ``<response>``, each tag exactly once; think alone when the ground truth has
    neither). ``R_correct`` ∈ [``correct_min``, ``correct_max``] = :func:`tool_call_correctness`; a missing or
    unparseable ``<tool_call>`` block scores ``correct_min``; a ground truth without tool calls gives 0.

    ``Sample.reference``: ToolRL's ground-truth text (``<tool_call>`` lines of JSON, optional ``<response>``) or a
    list of ``{"name", "parameters"}`` dicts. Departures: ``"arguments"`` is accepted for ``"parameters"``, a
    JSON list inside one block is accepted and blank lines in a block are skipped; a ``<tool_call>`` block that does not parse makes the format reward 0
    (status ``parse_error``; ToolRL checks only the tags); the paper's schedules and ablations (coarse /
    intermediate rewards, length reward) are not built in — pass other bounds or compose rewards instead.
    """

    def __init__(
        self,
        *,
        format_max: float = 1.0,
        correct_min: float = -3.0,
        correct_max: float = 3.0,
        name: str = "toolrl",
    ) -> None:
        if correct_min > correct_max:
            raise ValueError("correct_min must be <= correct_max")
        self.format_max = format_max
        self.correct_min, self.correct_max = correct_min, correct_max
        self.name = self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        if (pre := _precheck(s)) is not None:
            return pre
        if s.reference is None or (isinstance(s.reference, (list, tuple)) and not s.reference):
            return _na("no reference")
        try:
            gold, gold_call, gold_resp = _gold_parts(s.reference)
        except (TypeError, ToolCallsError) as e:
            return RewardResult(None, Status.PARSE_ERROR, info={"reason": f"reference: {e}"})
        response = s.response.strip()
        fmt = self.format_max * _toolrl_format(response, gold_call, gold_resp)
        try:
            pred = parse_tool_calls(response)
        except ToolCallsError as e:
            correct = self.correct_min if gold_call else 0.0
            comps = {"format": 0.0, "correctness": correct}
            return RewardResult(correct, Status.PARSE_ERROR, components=comps, info={"reason": str(e)})
        info: dict[str, Any] = {"calls": pred}
        parts: dict[str, float] = {}
        if not gold_call:
            correct = 0.0
        elif pred is None:
            correct = self.correct_min
            info["reason"] = "no <tool_call> block"
        else:
            correct, parts = tool_call_correctness(gold, pred, lo=self.correct_min, hi=self.correct_max)
        return RewardResult(
            fmt + correct, components={"format": fmt, "correctness": correct, **parts}, info=info
        )


# ---------------------------------------------------------------------------------------------------------------
# Router-R1
# ---------------------------------------------------------------------------------------------------------------
class RollingCostNormalizer:
    """Router-R1's cost normaliser: ``v = sqrt(cost)`` is appended to a window of the last ``window`` values, then
    ``cost_reward = 1 − clip((v − q_lo) / (q_hi − q_lo), 0, 1)`` with ``q_lo``, ``q_hi`` the ``q_low`` / ``q_high``
    percentiles of the window (min / max while it holds one value); 0.5 when ``q_hi − q_lo < eps``. Cheaper is
    higher.

    Stateful on purpose (the paper's rolling window): values depend on the order of calls. The state lives in this
    object (owned by the reward that uses it, pickled with it), not in a module global as in the paper's code.
    """

    def __init__(
        self, *, window: int = 1000, q_low: float = 0.05, q_high: float = 0.95, eps: float = 1e-8
    ) -> None:
        if window < 1 or not 0.0 <= q_low < q_high <= 1.0:
            raise ValueError("need window >= 1 and 0 <= q_low < q_high <= 1")
        self.window, self.q_low, self.q_high, self.eps = window, q_low, q_high, eps
        self.buffer: deque[float] = deque(maxlen=window)

    def __call__(self, cost: float) -> float:
        import numpy as np

        v = math.sqrt(cost)
        self.buffer.append(v)
        arr = np.asarray(self.buffer)
        if len(arr) >= 2:
            lo, hi = float(np.percentile(arr, 100 * self.q_low)), float(np.percentile(arr, 100 * self.q_high))
        else:
            lo, hi = float(arr.min()), float(arr.max())
        if hi - lo < self.eps:
            return 0.5
        return 1.0 - float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))


_ROUTER_TAGS = ("search", "answer", "think", "information")
_ROUTER_BLOCK = re.compile(r"<(search|answer|think|information)>(.*?)</\1>", re.DOTALL)


def router_format(response: str, models: Iterable[str] | None = None) -> tuple[bool, str]:
    """Router-R1's format check: (valid, reason). ``models``: the routable model names (case-insensitive); ``None``
    accepts any name. Invalid when: no tag blocks; unbalanced ``<search|think|answer|information>`` tags; a think
    block empty or "..."; nested tags; not exactly one answer; no think; #search ≠ #information; the text does not
    start with ``<think>`` or end with ``</answer>``; a route that is not ``model-name: query`` (one colon, a
    non-empty query that is not a placeholder and does not contain the model name); an unknown model."""
    blocks = _ROUTER_BLOCK.findall(response)
    if not blocks:
        return False, "no tag blocks"
    for t in _ROUTER_TAGS:
        if response.count(f"<{t}>") != response.count(f"</{t}>"):
            return False, f"unbalanced <{t}>"
    known = None if models is None else {m.strip().lower() for m in models}
    counts: Counter[str] = Counter()
    bad_query = bad_model = False
    for tag, content in blocks:
        content = content.strip()
        counts[tag] += 1
        if tag == "think" and content in ("", "..."):
            return False, "empty think"
        if any(f"<{t}>" in content or f"</{t}>" in content for t in _ROUTER_TAGS):
            return False, "nested tags"
        if tag == "search":
            if content.count(":") != 1:
                bad_query = True
                continue
            model, query = (x.strip() for x in content.split(":"))
            low = content.lower()
            if not query or "llm-name" in low or "your-query" in low or model.lower() in query.lower():
                bad_query = True
            if known is not None and model.lower() not in known:
                bad_model = True
    if counts["answer"] != 1 or counts["think"] == 0 or counts["search"] != counts["information"]:
        return False, "wrong number of answer / think / search-information blocks"
    text = response.strip()
    if not text.startswith("<think>"):
        return False, "does not start with <think>"
    if not text.endswith("</answer>"):
        return False, "does not end with </answer>"
    if bad_query:
        return False, "malformed route (expected 'model-name: query')"
    if bad_model:
        return False, "unknown model"
    return True, ""


def _router_f1(answer: str, golds: Sequence[str]) -> float:
    return token_f1(answer, golds, yes_no_exact=True)


class RouterReward:
    """Router-R1's hierarchical reward (Zhang, Feng & You, 2025; ulab-uiuc/Router-R1).

    ``f`` ∈ {−1, 0} is the format reward (:func:`router_format`); ``m`` = ``outcome(answer, references)`` with the
    answer in the last ``<answer>`` block (default: SQuAD token F1 with HotpotQA's yes/no rule, max over
    references; pass :func:`~treeward.rewards.verifiable.exact_match` for EM); ``c`` = the cost reward::

        R = f                               if f = −1      (format gates everything)
          = m + f  (= 0)                    elif m = 0     (no cost bonus for cheap wrong answers)
          = (m + f)·(1 − α) + c·α           otherwise, α = cost_weight (0.0 in the released train.sh)

    Cost: ``metadata["routes"]`` = ``[{"model": name, "completion_tokens": n}, ...]`` priced with ``prices`` (USD
    per million completion tokens), or a raw ``metadata["cost"]``; ``c = normalizer(raw cost)``
    (:class:`RollingCostNormalizer`, stateful as in the paper). Every sample with a cost feeds the normaliser,
    in batch order, as in the paper's reward manager. With ``α > 0`` and no cost in the metadata the sample is
    ``n/a``. Departure: model names are checked against ``prices`` (the paper checks its own registry); the
    paper's answer-equivalence step through a math checker is left out.
    """

    def __init__(
        self,
        *,
        prices: Mapping[str, float] | None = None,
        cost_weight: float = 0.0,
        outcome: Callable[[str, Sequence[str]], float] = _router_f1,
        normalizer: Callable[[float], float] | None = None,
        name: str = "router_r1",
    ) -> None:
        if not 0.0 <= cost_weight <= 1.0:
            raise ValueError("cost_weight must be in [0, 1]")
        self.prices = {k.lower(): float(v) for k, v in prices.items()} if prices is not None else None
        self.cost_weight = cost_weight
        self.outcome = outcome
        self.normalizer: Callable[[float], float] = (
            normalizer if normalizer is not None else RollingCostNormalizer()
        )
        self.name = self.__name__ = name

    def raw_cost(self, metadata: Mapping[str, Any]) -> float | None:
        """Σ completion_tokens × price / 1e6 over ``metadata["routes"]``, else ``metadata["cost"]``, else None.
        Raises ValueError on an unpriced model or a malformed route."""
        routes = metadata.get("routes")
        if routes is not None:
            if self.prices is None:
                raise ValueError("metadata['routes'] needs prices")
            total = 0.0
            for r in routes:
                model, n = str(r["model"]).lower(), r["completion_tokens"]
                if model not in self.prices:
                    raise ValueError(f"no price for model {r['model']!r}")
                if not isinstance(n, (int, float)) or n < 0:
                    raise ValueError(f"bad completion_tokens {n!r}")
                total += n * self.prices[model] / 1e6
            return total
        cost = metadata.get("cost")
        if cost is None:
            return None
        if not isinstance(cost, (int, float)) or cost < 0 or not math.isfinite(cost):
            raise ValueError(f"bad cost {cost!r}")
        return float(cost)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> RewardResult:
        if (pre := _precheck(s)) is not None:
            return pre
        try:
            golds = reference_strings(s.reference)
        except TypeError as e:
            return RewardResult(None, Status.PARSE_ERROR, info={"reason": f"reference: {e}"})
        if golds is None:
            return _na("no reference")
        try:
            raw = self.raw_cost(s.metadata)
        except (ValueError, KeyError, TypeError) as e:
            return RewardResult(None, Status.PARSE_ERROR, info={"reason": f"metadata cost: {e!r}"})
        cost = self.normalizer(raw) if raw is not None else None
        comps: dict[str, float] = {} if cost is None else {"cost": cost, "raw_cost": raw or 0.0}
        if self.cost_weight > 0 and cost is None:
            return _na("no routing cost in metadata ('routes' or 'cost')")
        ok, why = router_format(s.response, None if self.prices is None else self.prices.keys())
        if not ok:
            return RewardResult(-1.0, components={"format": -1.0, **comps}, info={"reason": why})
        answers = re.findall(r"<answer>(.*?)</answer>", s.response, re.DOTALL)
        answer = answers[-1].strip()
        m = float(self.outcome(answer, golds))
        comps.update({"format": 0.0, "outcome": m})
        if m == 0.0:
            return RewardResult(0.0, components=comps, info={"answer": answer})
        a = self.cost_weight
        score = m * (1 - a) + (cost if cost is not None else 0.0) * a
        return RewardResult(score, components=comps, info={"answer": answer})
