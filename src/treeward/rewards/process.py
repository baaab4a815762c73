"""Process rewards: reduce a reward's step scores to one score, and Gao et al.'s Clip and Delta refinements.

A process reward (a PRM, an exact step verifier such as :class:`~treeward.tasks.ArithmeticSteps`) fills
``RewardResult.step_scores`` [S], one value per step. :class:`ProcessReward` turns that vector into ``score`` with a
**reducer** and keeps the vector, so search and credit assignment still see every step:

* :class:`MinStep` (a path is as good as its worst step), :class:`LastStep` (the PRM's value of the whole prefix),
  :class:`MeanSteps`, :class:`ProdSteps` (steps as independent probabilities of being right), :class:`SumSteps`;
* :class:`ClipSteps`, :class:`DeltaSteps` and :class:`ClipDeltaSteps`: the refinements of Gao et al. (2024) that
  bound the return of a trajectory, so that padding a solution with extra "good" steps cannot farm reward. They
  sum the refined per-step rewards; :meth:`transform` gives the refined vector itself, for dense per-step credit.

A reducer is a small frozen object (picklable, serialisable with ``to_config``), not a string flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from treeward.rewards.base import CHILDREN, Reward, RewardResult, Sample, Status, check_results, config_of

__all__ = [
    "ClipDeltaSteps",
    "ClipSteps",
    "DeltaSteps",
    "LastStep",
    "MeanSteps",
    "MinStep",
    "ProcessReward",
    "ProdSteps",
    "Reducer",
    "Refinement",
    "SumSteps",
    "reducer_from_config",
]


@runtime_checkable
class Reducer(Protocol):
    """Reduces step scores [S] (S ≥ 1, all numbers) to one score."""

    name: str

    def __call__(self, steps: Sequence[float]) -> float: ...

    def to_config(self) -> dict[str, Any]: ...


@runtime_checkable
class Refinement(Reducer, Protocol):
    """A reducer that first refines the step rewards (Clip, Delta): ``transform(steps)`` [S] is the refined
    vector, and the reducer returns its sum."""

    def transform(self, steps: Sequence[float]) -> list[float]: ...


@dataclass(frozen=True)
class MinStep:
    """``min_k r_k``: a path is as good as its worst step (Snell et al. 2024, PRM-guided search)."""

    name = "min"

    def __call__(self, steps: Sequence[float]) -> float:
        return min(steps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "MinStep"}


@dataclass(frozen=True)
class LastStep:
    """``r_S``: the score of the last step, i.e. the PRM's value of the whole prefix."""

    name = "last"

    def __call__(self, steps: Sequence[float]) -> float:
        return steps[-1]

    def to_config(self) -> dict[str, Any]:
        return {"type": "LastStep"}


@dataclass(frozen=True)
class MeanSteps:
    """``(1/S) Σ_k r_k``."""

    name = "mean"

    def __call__(self, steps: Sequence[float]) -> float:
        return math.fsum(steps) / len(steps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "MeanSteps"}


@dataclass(frozen=True)
class ProdSteps:
    """``Π_k r_k``: the probability that every step is right, when the scores are independent probabilities."""

    name = "prod"

    def __call__(self, steps: Sequence[float]) -> float:
        return math.prod(steps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "ProdSteps"}


@dataclass(frozen=True)
class SumSteps:
    """``Σ_k r_k``: the plain return. Unbounded in the number of steps: a policy can farm it by adding steps
    (the failure Gao et al. 2024 report); prefer :class:`ClipSteps` or :class:`DeltaSteps` for RL."""

    name = "sum"

    def __call__(self, steps: Sequence[float]) -> float:
        return math.fsum(steps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "SumSteps"}


@dataclass(frozen=True)
class ClipSteps:
    """Clip mechanism of Gao, Xu, Ye, Liu, He, Fu, Mei, Wang, Wu (2024), "On Designing Effective RL Reward at
    Training Time for LLM Reasoning" (arXiv 2410.15115).

    Per step ``r̃_k = min(r_k − η, 0)``: every refined step reward is ≤ 0, so the return ``Σ_k r̃_k`` is bounded
    above by 0 and adding steps can only lower it; steps the PRM scores above the threshold ``η`` cost nothing,
    steps below it are penalised by how far below they are. The reducer returns that sum; the paper adds the
    success (outcome) reward at the last step, which here is a :class:`~treeward.rewards.compose.WeightedSum`
    of this process reward and the outcome reward (same return).

    Departures: ``η`` has no default (the paper's choice of η for each PRM is not reproduced here; pick a value
    near the PRM's typical score on correct steps); no extra coefficient scales the clipped reward (weight it in
    the composite instead).
    """

    eta: float
    name = "clip"

    def transform(self, steps: Sequence[float]) -> list[float]:
        """The refined per-step rewards ``[min(r_k − η, 0)]`` [S]."""
        return [min(r - self.eta, 0.0) for r in steps]

    def __call__(self, steps: Sequence[float]) -> float:
        return math.fsum(self.transform(steps))

    def to_config(self) -> dict[str, Any]:
        return {"type": "ClipSteps", "eta": self.eta}


def _delta(steps: Sequence[float], keep_last: bool) -> list[float]:
    out = [steps[k] - steps[k + 1] for k in range(len(steps) - 1)]
    out.append(steps[-1] if keep_last else 0.0)
    return out


@dataclass(frozen=True)
class DeltaSteps:
    """Delta mechanism of Gao et al. (2024), arXiv 2410.15115 (see :class:`ClipSteps`).

    Per step ``r̃_k = r_k − r_{k+1}`` for ``k < S``; the last step's process reward is dropped (``r̃_S = 0``;
    the success reward goes there). The return from step t telescopes: ``Σ_{k≥t} r̃_k = r_t − r_S``, bounded by
    the PRM's range whatever the number of steps, so repeating good steps gains nothing. The reducer returns
    the whole-trajectory sum, ``r_1 − r_S``.

    ``keep_last=True`` keeps the last step's own score (``r̃_S = r_S``), so the sum telescopes to ``r_1``: the
    reading in the project's reference notes. The dropped last step follows the paper's Figure (the last step's
    process reward is crossed out); the equation text itself could not be checked, so both are offered.

    Caution, measured in ``benchmarks/prm_hacking.py``: with ``keep_last=False`` the return ``r_1 − r_S`` *rises*
    when the last step is wrong, so appending a wrong trailing line pays (a correct solution with its last line
    duplicated scored 2.0 against 1.0 under an exact step verifier plus the outcome reward). Pair it with an
    outcome reward that fails such answers, or use ``keep_last=True`` or :class:`ClipSteps`, which do not reward it.
    """

    keep_last: bool = False
    name = "delta"

    def transform(self, steps: Sequence[float]) -> list[float]:
        """The refined per-step rewards [S]."""
        return _delta(steps, self.keep_last)

    def __call__(self, steps: Sequence[float]) -> float:
        return math.fsum(self.transform(steps))

    def to_config(self) -> dict[str, Any]:
        return {"type": "DeltaSteps", "keep_last": self.keep_last}


@dataclass(frozen=True)
class ClipDeltaSteps:
    """Clip, then Delta (Gao et al. 2024, arXiv 2410.15115): ``c_k = min(r_k − η, 0)``, then
    ``r̃_k = c_k − c_{k+1}`` (and ``r̃_S = 0``, or ``c_S`` with ``keep_last``). Sum: ``c_1 − c_S``."""

    eta: float
    keep_last: bool = False
    name = "clip_delta"

    def transform(self, steps: Sequence[float]) -> list[float]:
        """The refined per-step rewards [S]."""
        return _delta(ClipSteps(self.eta).transform(steps), self.keep_last)

    def __call__(self, steps: Sequence[float]) -> float:
        return math.fsum(self.transform(steps))

    def to_config(self) -> dict[str, Any]:
        return {"type": "ClipDeltaSteps", "eta": self.eta, "keep_last": self.keep_last}


_SIMPLE: dict[str, Reducer] = {
    "MinStep": MinStep(),
    "LastStep": LastStep(),
    "MeanSteps": MeanSteps(),
    "ProdSteps": ProdSteps(),
    "SumSteps": SumSteps(),
}


def reducer_from_config(cfg: Mapping[str, Any]) -> Reducer:
    """The reducer a ``to_config()`` dict describes."""
    kind = cfg.get("type")
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if kind == "ClipSteps":
        return ClipSteps(float(cfg["eta"]))
    if kind == "DeltaSteps":
        return DeltaSteps(keep_last=bool(cfg.get("keep_last", False)))
    if kind == "ClipDeltaSteps":
        return ClipDeltaSteps(float(cfg["eta"]), keep_last=bool(cfg.get("keep_last", False)))
    raise ValueError(
        f"unknown reducer type {kind!r}; known: {[*_SIMPLE, 'ClipSteps', 'DeltaSteps', 'ClipDeltaSteps']}"
    )


class ProcessReward:
    """Reduce an inner reward's ``step_scores`` [S] into ``score`` with ``reducer``, keeping the vector.

    The result's ``step_scores`` are the inner reward's, unchanged (search writes them on the step nodes); a
    refining reducer's per-step rewards are in ``info["shaped_steps"]``. Components: the inner score under the
    inner reward's name, its components prefixed ``"<inner>/"``, and ``"steps"`` (S).

    Not applicable (``None``): the inner reward failed or was not applicable (its status is kept), it gave no
    step scores, or one step has no score (``info["reason"]`` names the step). No paper: the reducers name theirs.
    """

    def __init__(self, inner: Reward, *, reducer: Reducer | None = None, name: str | None = None) -> None:
        self.inner = inner
        self.reducer: Reducer = reducer if reducer is not None else MinStep()
        self.name = name or f"{inner.name}_{self.reducer.name}"
        self.__name__ = self.name

    def _one(self, r: RewardResult) -> RewardResult:
        children = {CHILDREN: {self.inner.name: r}}
        if r.score is None and r.status is not Status.OK:
            reason = f"{self.inner.name}: {r.info.get('reason', r.status.value)}"
            return RewardResult(
                None, r.status, info={"reason": reason, "failed": self.inner.name, **children}
            )
        steps = r.step_scores
        if not steps:
            reason = f"{self.inner.name} gave no step scores"
            return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": reason, **children})
        missing = [k for k, x in enumerate(steps) if x is None]
        if missing:
            reason = f"{self.inner.name}: step {missing[0] + 1} of {len(steps)} has no score"
            return RewardResult(
                None, Status.NOT_APPLICABLE, step_scores=steps, info={"reason": reason, **children}
            )
        values = [float(x) for x in steps if x is not None]
        components = {f"{self.inner.name}/{k}": v for k, v in r.components.items()}
        if r.score is not None:
            components[self.inner.name] = r.score
        components["steps"] = float(len(values))
        info: dict[str, Any] = dict(children)
        if isinstance(self.reducer, Refinement):
            info["shaped_steps"] = self.reducer.transform(values)
        return RewardResult(self.reducer(values), components=components, step_scores=steps, info=info)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        inner = check_results(self.inner, samples, self.inner(samples))
        return [self._one(r) for r in inner]

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "ProcessReward",
            "name": self.name,
            "inner": config_of(self.inner),
            "reducer": self.reducer.to_config(),
        }
