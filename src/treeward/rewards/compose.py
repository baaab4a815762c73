"""Composite rewards: rewards built from rewards, each one a :class:`~treeward.rewards.base.Reward` itself.

| composite | score |
|---|---|
| :class:`WeightedSum` | ``Σ w_i r_i`` (a weight of 0 logs a child without rewarding it) |
| :class:`Gate` | ``then`` when ``constraint ≥ threshold``, else ``fail_score`` |
| :class:`Lexicographic` | the first failing constraint tier decides its fail score; all pass → ``objective`` |
| :class:`Product` | ``Π r_i`` |
| :class:`MaxOverReferences` | ``max_j inner(sample with reference j)`` over a list of references |
| :class:`Cascade` | the first stage with a score decides (a cheap rule first, an expensive judge when undecided) |
| :class:`Clip`, :class:`Affine` | ``min(max(r, lo), hi)``, ``a·r + b`` |
| :class:`Rename` | the inner reward under another name |

Every composite reports every evaluated child's score and components in its own ``components``, prefixed by
the child's name (``"answer"``, ``"answer/exact"``), and keeps the child results in ``info["children"]`` for
:func:`~treeward.rewards.base.explain`. Child names inside one composite must differ (wrap one in
:class:`Rename`). A child that fails (``score=None``) makes the composite's score ``None`` with the child's status
and ``info["reason"]``/``info["failed"]`` naming it, unless the composite's docstring says it tolerates that.

Children are called in order, each once per composite call, on the samples that need them (a gate does not call
``then`` on samples that fail the constraint). A child that raises is a bug and the exception propagates; per-sample
failures are statuses.

Composites serialise to plain, JSON-ready dicts (``to_config()``) and load with :func:`from_config`, which
resolves the leaves (any non-composite reward) by name from a registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from treeward.rewards.base import CHILDREN, Reward, RewardResult, Sample, Status, check_results, config_of
from treeward.rewards.group import DifficultyScale, GroupZScore, Unlikeliness
from treeward.rewards.process import ProcessReward, reducer_from_config

__all__ = [
    "Affine",
    "Cascade",
    "Clip",
    "Gate",
    "Lexicographic",
    "MaxOverReferences",
    "Product",
    "Rename",
    "WeightedSum",
    "from_config",
    "registry_of",
]

Build = Callable[[Mapping[str, Any]], Reward]


def _unique(names: Iterable[str], where: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(
                f"{where}: two children are named {n!r}; wrap one in Rename(reward, 'other_name')"
            )
        seen.add(n)


def _call(child: Reward, samples: Sequence[Sample]) -> list[RewardResult]:
    return check_results(child, samples, child(samples)) if samples else []


def _parts(name: str, r: RewardResult) -> dict[str, float]:
    """A child's score and components, prefixed by its name."""
    comps = {f"{name}/{k}": v for k, v in r.components.items()}
    if r.score is not None:
        comps[name] = r.score
    return comps


def _failure(
    name: str, r: RewardResult, comps: dict[str, float], children: dict[str, RewardResult]
) -> RewardResult:
    """The composite's result when child ``name`` has no score: ``None`` with the child's status."""
    status = r.status if r.status is not Status.OK else Status.NOT_APPLICABLE
    reason = f"{name}: {r.info.get('reason', r.status.value)}"
    return RewardResult(
        None, status, components=comps, info={"reason": reason, "failed": name, CHILDREN: children}
    )


class WeightedSum:
    """``Σ_i w_i · r_i`` over the children with ``w_i ≠ 0``; children with weight 0 are logged, not rewarded.

    The weighted sum of TRL's ``reward_weights`` and of verifiers' ``Rubric`` (whose ``add_metric`` is the weight-0
    child). A weighted child without a score makes the sum ``None`` with that child's status; with
    ``skip_na=True`` a child that is *not applicable* (status ``n/a``) is left out of the sum instead (TRL's
    NaN-sum over reward functions, for multi-task data), and the sum is ``None`` only when every weighted child is
    n/a. A weight-0 child never affects the score: its failures are tolerated (and logged by absence).
    """

    def __init__(
        self, terms: Sequence[tuple[Reward, float]], *, skip_na: bool = False, name: str = "weighted_sum"
    ) -> None:
        if not terms:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        for t in terms:
            if not (isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], int | float)):
                raise TypeError(f"WeightedSum terms are (reward, weight) pairs, got {t!r}")
        _unique((r.name for r, _ in terms), f"WeightedSum {name!r}")
        self.terms = [(r, float(w)) for r, w in terms]
        self.skip_na = skip_na
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        per_child = [_call(r, samples) for r, _ in self.terms]
        out = []
        for j in range(len(samples)):
            comps: dict[str, float] = {}
            children = {r.name: res[j] for (r, _), res in zip(self.terms, per_child, strict=True)}
            total, used, fail = 0.0, 0, None
            for (r, w), res in zip(self.terms, per_child, strict=True):
                x = res[j]
                comps.update(_parts(r.name, x))
                if w == 0.0:
                    continue
                if x.score is None:
                    if self.skip_na and x.status is Status.NOT_APPLICABLE:
                        continue
                    fail = fail or (r.name, x)
                    continue
                total += w * x.score
                used += 1
            if fail is not None:
                out.append(_failure(fail[0], fail[1], comps, children))
            elif used == 0:
                reason = "every weighted child is not applicable"
                out.append(
                    RewardResult(
                        None, Status.NOT_APPLICABLE, comps, info={"reason": reason, CHILDREN: children}
                    )
                )
            else:
                out.append(RewardResult(total, components=comps, info={CHILDREN: children}))
        return out

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "WeightedSum",
            "name": self.name,
            "skip_na": self.skip_na,
            "terms": [{"reward": config_of(r), "weight": w} for r, w in self.terms],
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> WeightedSum:
        terms = [(build(t["reward"]), float(t["weight"])) for t in cfg["terms"]]
        return cls(terms, skip_na=bool(cfg.get("skip_na", False)), name=cfg["name"])


def _tiered(
    constraints: Sequence[Reward],
    fail_scores: Sequence[float],
    threshold: float,
    objective: Reward,
    samples: list[Sample],
) -> list[RewardResult]:
    """Lexicographic evaluation: tier t is called only on the samples that passed tiers < t."""
    comps: list[dict[str, float]] = [{} for _ in samples]
    children: list[dict[str, RewardResult]] = [{} for _ in samples]
    out: list[RewardResult | None] = [None] * len(samples)
    live = list(range(len(samples)))
    for c, fail_score in zip(constraints, fail_scores, strict=True):
        results = _call(c, [samples[i] for i in live])
        still = []
        for i, r in zip(live, results, strict=True):
            comps[i].update(_parts(c.name, r))
            children[i][c.name] = r
            if r.score is None:
                out[i] = _failure(c.name, r, comps[i], children[i])
            elif r.score < threshold:
                info = {"decided_by": c.name, CHILDREN: children[i]}
                out[i] = RewardResult(fail_score, components=comps[i], info=info)
            else:
                still.append(i)
        live = still
    for i, r in zip(live, _call(objective, [samples[i] for i in live]), strict=True):
        comps[i].update(_parts(objective.name, r))
        children[i][objective.name] = r
        if r.score is None:
            out[i] = _failure(objective.name, r, comps[i], children[i])
        else:
            out[i] = RewardResult(
                r.score, components=comps[i], info={"decided_by": objective.name, CHILDREN: children[i]}
            )
    return [x for x in out if x is not None]  # every sample was decided by a tier or the objective


class Gate:
    """A hard gate: ``then`` when ``constraint ≥ threshold``, else ``fail_score`` (``then`` is not called).

    Router-R1's format gate (−1 when the format is wrong; ulab-uiuc/Router-R1) and SearchLLM's bottom-line
    constraints (arXiv 2603.10473, whose exact gating function could not be checked: this is the hard-step reading)
    have this shape. A constraint without a score makes the result ``None`` with the
    constraint's status, as does ``then`` without a score.
    """

    def __init__(
        self,
        constraint: Reward,
        then: Reward,
        *,
        threshold: float = 1.0,
        fail_score: float = -1.0,
        name: str = "gate",
    ) -> None:
        _unique([constraint.name, then.name], f"Gate {name!r}")
        self.constraint = constraint
        self.then = then
        self.threshold = threshold
        self.fail_score = fail_score
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return _tiered([self.constraint], [self.fail_score], self.threshold, self.then, list(samples))

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Gate",
            "name": self.name,
            "constraint": config_of(self.constraint),
            "then": config_of(self.then),
            "threshold": self.threshold,
            "fail_score": self.fail_score,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Gate:
        return cls(
            build(cfg["constraint"]),
            build(cfg["then"]),
            threshold=float(cfg["threshold"]),
            fail_score=float(cfg["fail_score"]),
            name=cfg["name"],
        )


class Lexicographic:
    """Tiers of constraints before an objective: the first failing tier decides the score.

    SearchLLM's hierarchy (arXiv 2603.10473): bottom-line constraints (grounding, format,
    safety) gate the behaviour objectives. Tier ``t`` fails when its score is below ``threshold``; the result is
    then ``fail_scores[t]`` and later tiers are not called. Default fail scores ``−T, −(T−1), …, −1`` for T tiers
    put an earlier failure strictly below a later one, and both below any objective ≥ 0. The paper's exact gated
    aggregation could not be checked; this is the hard lexicographic reading (for a soft gate multiply with
    :class:`Product`).
    """

    def __init__(
        self,
        tiers: Sequence[Reward],
        objective: Reward,
        *,
        threshold: float = 1.0,
        fail_scores: Sequence[float] | None = None,
        name: str = "lexicographic",
    ) -> None:
        if not tiers:
            raise ValueError("Lexicographic needs at least one constraint tier")
        _unique([*(t.name for t in tiers), objective.name], f"Lexicographic {name!r}")
        if fail_scores is None:
            fail_scores = [-float(len(tiers) - t) for t in range(len(tiers))]
        if len(fail_scores) != len(tiers):
            raise ValueError(f"{len(fail_scores)} fail scores for {len(tiers)} tiers")
        self.tiers = list(tiers)
        self.objective = objective
        self.threshold = threshold
        self.fail_scores = [float(x) for x in fail_scores]
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return _tiered(self.tiers, self.fail_scores, self.threshold, self.objective, list(samples))

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Lexicographic",
            "name": self.name,
            "tiers": [config_of(t) for t in self.tiers],
            "objective": config_of(self.objective),
            "threshold": self.threshold,
            "fail_scores": list(self.fail_scores),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Lexicographic:
        return cls(
            [build(t) for t in cfg["tiers"]],
            build(cfg["objective"]),
            threshold=float(cfg["threshold"]),
            fail_scores=[float(x) for x in cfg["fail_scores"]],
            name=cfg["name"],
        )


class Product:
    """``Π_i r_i``: every factor matters (the proxy reward ``length × relevance × repetition`` of
    naver-ai/rethinking-proxy-reward, EMNLP 2024; a soft gate). Any factor without a score makes the
    product ``None`` with that factor's status."""

    def __init__(self, factors: Sequence[Reward], *, name: str = "product") -> None:
        if not factors:
            raise ValueError("Product needs at least one factor")
        _unique((f.name for f in factors), f"Product {name!r}")
        self.factors = list(factors)
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        per = [_call(f, samples) for f in self.factors]
        out = []
        for j in range(len(samples)):
            comps: dict[str, float] = {}
            children = {f.name: res[j] for f, res in zip(self.factors, per, strict=True)}
            for f, res in zip(self.factors, per, strict=True):
                comps.update(_parts(f.name, res[j]))
            missing = next(
                ((f.name, res[j]) for f, res in zip(self.factors, per, strict=True) if res[j].score is None),
                None,
            )
            if missing is not None:
                out.append(_failure(missing[0], missing[1], comps, children))
            else:
                value = math.prod(float(x) for res in per if (x := res[j].score) is not None)
                out.append(RewardResult(value, components=comps, info={CHILDREN: children}))
        return out

    def to_config(self) -> dict[str, Any]:
        return {"type": "Product", "name": self.name, "factors": [config_of(f) for f in self.factors]}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Product:
        return cls([build(f) for f in cfg["factors"]], name=cfg["name"])


class MaxOverReferences:
    """``max_j inner(sample with reference = refs[j])`` when ``Sample.reference`` is a list or tuple of
    references (multi-reference F1 / BLEU: SQuAD, BLEUBERI's several references); a single reference is passed
    through as is. Components: the best reference's index (``best_ref``) and the best result's components under
    the inner name. Every reference of every sample is scored in one batched call to ``inner``.

    Tolerates *not applicable* references (left out of the max). A reference whose result failed (another status
    with no score) makes the result ``None`` with that status: a timeout on the matching reference must not turn
    into a lower score. An empty reference list is not applicable.
    """

    def __init__(self, inner: Reward, *, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or f"{inner.name}_maxref"
        self.__name__ = self.name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        flat: list[Sample] = []
        spans: list[tuple[int, int]] = []
        for s in samples:
            refs = list(s.reference) if isinstance(s.reference, list | tuple) else [s.reference]
            spans.append((len(flat), len(flat) + len(refs)))
            flat.extend(replace(s, reference=r) for r in refs)
        results = _call(self.inner, flat)
        n = self.inner.name
        out = []
        for a, b in spans:
            rs = results[a:b]
            if not rs:
                out.append(RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "empty reference list"}))
                continue
            failed = next((r for r in rs if r.score is None and r.status is not Status.NOT_APPLICABLE), None)
            if failed is not None:
                out.append(_failure(n, failed, {}, {n: failed}))
                continue
            scored = [(r.score, k) for k, r in enumerate(rs) if r.score is not None]
            if not scored:
                out.append(_failure(n, rs[0], {}, {n: rs[0]}))
                continue
            best_score, best = max(scored, key=lambda t: (t[0], -t[1]))  # the first reference wins ties
            comps = _parts(n, rs[best])
            comps["best_ref"] = float(best)
            out.append(RewardResult(best_score, components=comps, info={CHILDREN: {n: rs[best]}}))
        return out

    def to_config(self) -> dict[str, Any]:
        return {"type": "MaxOverReferences", "name": self.name, "inner": config_of(self.inner)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> MaxOverReferences:
        return cls(build(cfg["inner"]), name=cfg["name"])


class Cascade:
    """Stages in order, cheapest first: the first stage that gives a score decides; a stage's ``None`` (of any
    status: not applicable, parse error, timeout) means *undecided* and sends the sample to the next stage.

    The cheap-rule-then-model pattern: exact match then a generative verifier (Search-Gen-V, arXiv 2510.14660,
    "EM + verifier"), Math-Verify then an LLM judge. Each stage is called once, on the undecided samples only.
    ``components["decided_by"]`` is the deciding stage's index. When no stage decides, the result is ``None``
    with the last stage's status. Tolerates the failures of every stage but the last.
    """

    def __init__(self, stages: Sequence[Reward], *, name: str = "cascade") -> None:
        if not stages:
            raise ValueError("Cascade needs at least one stage")
        _unique((s.name for s in stages), f"Cascade {name!r}")
        self.stages = list(stages)
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        comps: list[dict[str, float]] = [{} for _ in samples]
        children: list[dict[str, RewardResult]] = [{} for _ in samples]
        out: list[RewardResult | None] = [None] * len(samples)
        live = list(range(len(samples)))
        last: dict[int, tuple[str, RewardResult]] = {}
        for k, stage in enumerate(self.stages):
            still = []
            for i, r in zip(live, _call(stage, [samples[i] for i in live]), strict=True):
                comps[i].update(_parts(stage.name, r))
                children[i][stage.name] = r
                if r.score is None:
                    last[i] = (stage.name, r)
                    still.append(i)
                else:
                    comps[i]["decided_by"] = float(k)
                    info = {"decided_by": stage.name, CHILDREN: children[i]}
                    out[i] = RewardResult(r.score, components=comps[i], info=info)
            live = still
        for i in live:
            out[i] = _failure(*last[i], comps[i], children[i])
        return [x for x in out if x is not None]

    def to_config(self) -> dict[str, Any]:
        return {"type": "Cascade", "name": self.name, "stages": [config_of(s) for s in self.stages]}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Cascade:
        return cls([build(s) for s in cfg["stages"]], name=cfg["name"])


def _map_score(
    inner: Reward, samples: Sequence[Sample], f: Callable[[float], float], extra: Mapping[str, float]
) -> list[RewardResult]:
    n = inner.name
    out = []
    for r in _call(inner, list(samples)):
        comps = _parts(n, r)
        if r.score is None:
            out.append(_failure(n, r, comps, {n: r}))
        else:
            out.append(
                RewardResult(
                    f(r.score),
                    components=comps | dict(extra),
                    step_scores=r.step_scores,
                    info={CHILDREN: {n: r}},
                )
            )
    return out


class Clip:
    """``min(max(r, lo), hi)`` (either bound may be ``None``). The inner ``step_scores`` pass through unchanged.
    No paper: a transform."""

    def __init__(
        self, inner: Reward, *, lo: float | None = None, hi: float | None = None, name: str | None = None
    ) -> None:
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"Clip needs lo ≤ hi, got lo={lo}, hi={hi}")
        self.inner = inner
        self.lo = lo
        self.hi = hi
        self.name = name or f"{inner.name}_clip"
        self.__name__ = self.name

    def _clip(self, x: float) -> float:
        if self.lo is not None:
            x = max(x, self.lo)
        if self.hi is not None:
            x = min(x, self.hi)
        return x

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return _map_score(self.inner, samples, self._clip, {})

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Clip",
            "name": self.name,
            "inner": config_of(self.inner),
            "lo": self.lo,
            "hi": self.hi,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Clip:
        return cls(build(cfg["inner"]), lo=cfg.get("lo"), hi=cfg.get("hi"), name=cfg["name"])


class Affine:
    """``scale · r + shift``, e.g. ToolRL's map of a [0, 1] match score to [−3, 3] (``scale=6, shift=−3``;
    ToolRL, arXiv 2504.13958). The inner ``step_scores`` pass through unchanged. No paper: a transform."""

    def __init__(
        self, inner: Reward, *, scale: float = 1.0, shift: float = 0.0, name: str | None = None
    ) -> None:
        self.inner = inner
        self.scale = scale
        self.shift = shift
        self.name = name or f"{inner.name}_affine"
        self.__name__ = self.name

    def _map(self, x: float) -> float:
        return self.scale * x + self.shift

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return _map_score(self.inner, samples, self._map, {})

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Affine",
            "name": self.name,
            "inner": config_of(self.inner),
            "scale": self.scale,
            "shift": self.shift,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Affine:
        return cls(
            build(cfg["inner"]), scale=float(cfg["scale"]), shift=float(cfg["shift"]), name=cfg["name"]
        )


class Rename:
    """The inner reward under another name (its results unchanged): two children of one composite that would
    otherwise share a name, or a shorter metric key."""

    def __init__(self, inner: Reward, name: str) -> None:
        self.inner = inner
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return _call(self.inner, list(samples))

    def to_config(self) -> dict[str, Any]:
        return {"type": "Rename", "name": self.name, "inner": config_of(self.inner)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], build: Build) -> Rename:
        return cls(build(cfg["inner"]), cfg["name"])


# --- configs -------------------------------------------------------------------------------------------------


def _process_from_config(cfg: Mapping[str, Any], build: Build) -> Reward:
    return ProcessReward(build(cfg["inner"]), reducer=reducer_from_config(cfg["reducer"]), name=cfg["name"])


def _zscore_from_config(cfg: Mapping[str, Any], build: Build) -> Reward:
    return GroupZScore(build(cfg["inner"]), eps=float(cfg["eps"]), scale=bool(cfg["scale"]), name=cfg["name"])


def _unlikely_from_config(cfg: Mapping[str, Any], build: Build) -> Reward:
    return Unlikeliness(
        build(cfg["inner"]), beta=float(cfg["beta"]), logprob_key=cfg["logprob_key"], name=cfg["name"]
    )


def _difficulty_from_config(cfg: Mapping[str, Any], build: Build) -> Reward:
    return DifficultyScale(build(cfg["inner"]), key=cfg["key"], name=cfg["name"])


_BUILDERS: dict[str, Callable[[Mapping[str, Any], Build], Reward]] = {
    "WeightedSum": WeightedSum.from_config,
    "Gate": Gate.from_config,
    "Lexicographic": Lexicographic.from_config,
    "Product": Product.from_config,
    "MaxOverReferences": MaxOverReferences.from_config,
    "Cascade": Cascade.from_config,
    "Clip": Clip.from_config,
    "Affine": Affine.from_config,
    "Rename": Rename.from_config,
    "ProcessReward": _process_from_config,
    "GroupZScore": _zscore_from_config,
    "Unlikeliness": _unlikely_from_config,
    "DifficultyScale": _difficulty_from_config,
}


def registry_of(*rewards: Reward) -> dict[str, Reward]:
    """``{reward.name: reward}`` for :func:`from_config`; two rewards with one name raise ``ValueError``."""
    _unique((r.name for r in rewards), "registry")
    return {r.name: r for r in rewards}


def from_config(cfg: Mapping[str, Any], registry: Mapping[str, Reward]) -> Reward:
    """Rebuild a composite from its ``to_config()`` dict; leaves (``{"type": "reward", "name": ...}``) are looked
    up by name in ``registry`` (e.g. :func:`registry_of`). Unknown types or names raise ``ValueError``."""

    def build(c: Mapping[str, Any]) -> Reward:
        kind = c.get("type")
        if kind == "reward":
            name = c.get("name")
            if not isinstance(name, str) or name not in registry:
                raise ValueError(f"reward {name!r} is not in the registry (known: {sorted(registry)})")
            return registry[name]
        if not isinstance(kind, str) or kind not in _BUILDERS:
            raise ValueError(f"unknown composite type {kind!r} (known: {sorted(_BUILDERS)})")
        return _BUILDERS[kind](c, build)

    return build(cfg)
