"""Group rewards: results that depend on every sample sharing a ``group_id`` (a GRPO group, a search's problem).

Each wraps an inner reward, scores the whole batch with it, then transforms the scores group by group. Groups are
formed by ``Sample.group_id`` inside the batch, never across the whole call (z-scoring a whole call is a known
bug in released code, rewards.md §7.1), so a batch must hold whole groups: one trainer call per group, or a batch
of whole groups. A sample with no ``group_id`` is not applicable for the group transforms that need one.

A sample whose inner score is ``None`` keeps the inner status and takes no part in its group's statistics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from treeward.rewards.base import CHILDREN, Reward, RewardResult, Sample, Status, check_results, config_of

__all__ = ["DifficultyScale", "GroupZScore", "Unlikeliness", "group_indices"]


def group_indices(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Indices of the samples of each ``group_id`` (in batch order); samples without a group are left out."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.group_id is not None:
            groups[s.group_id].append(i)
    return dict(groups)


def _inner_parts(name: str, r: RewardResult) -> dict[str, float]:
    comps = {f"{name}/{k}": v for k, v in r.components.items()}
    if r.score is not None:
        comps[name] = r.score
    return comps


def _failed(name: str, r: RewardResult) -> RewardResult:
    reason = f"{name}: {r.info.get('reason', r.status.value)}"
    status = r.status if r.status is not Status.OK else Status.NOT_APPLICABLE
    return RewardResult(None, status, info={"reason": reason, "failed": name, CHILDREN: {name: r}})


def _no_group(name: str, r: RewardResult) -> RewardResult:
    return RewardResult(
        None,
        Status.NOT_APPLICABLE,
        components=_inner_parts(name, r),
        info={"reason": "sample has no group_id", CHILDREN: {name: r}},
    )


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and Bessel-corrected standard deviation of ``xs`` (std 0 for a group of one); ``xs`` not empty."""
    mean = math.fsum(xs) / len(xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def zscore(xs: Sequence[float], *, scale: bool = True, eps: float = 1e-4) -> list[float]:
    """Group-relative advantages: ``(x − mean) / (std + eps)`` with the Bessel-corrected std, or ``x − mean`` when
    not ``scale``. A group whose values are all equal (a group of one included) gives exactly 0 each, never
    rounding noise divided by ``eps``. Shared by :class:`GroupZScore` and the GRPO-family advantage estimators."""
    if not xs:
        return []
    if all(x == xs[0] for x in xs):
        return [0.0] * len(xs)
    mean, std = mean_std(xs)
    return [(x - mean) / (std + eps) if scale else x - mean for x in xs]


class GroupZScore:
    """Per-group standardisation, the group-relative advantage of GRPO (Shao et al. 2024, "DeepSeekMath").

    ``z_i = (r_i − mean_g) / (std_g + eps)`` over the scored samples of the group, with ``std_g`` the sample
    standard deviation (Bessel-corrected, as TRL's ``nanstd`` and ``torch.std``) and ``eps = 1e-4`` (TRL's). A
    group whose scores are all equal, a group of one included, gives exactly 0 for every sample (no signal, and no
    0/eps blow-up of rounding noise). ``scale=False`` only centres (``r_i − mean_g``: Dr. GRPO, Liu et al. 2025).

    Components: the inner score and components (under the inner name), ``group_mean``, ``group_std``,
    ``group_size``. Departure: none for a scalar reward; GDPO-style per-component normalisation is a
    :class:`~treeward.rewards.compose.WeightedSum` of ``GroupZScore`` children.
    """

    def __init__(
        self, inner: Reward, *, eps: float = 1e-4, scale: bool = True, name: str | None = None
    ) -> None:
        if eps < 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        self.inner = inner
        self.eps = eps
        self.scale = scale
        self.name = name or f"{inner.name}_z"
        self.__name__ = self.name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        inner = check_results(self.inner, samples, self.inner(samples))
        n = self.inner.name
        out: list[RewardResult] = [
            _failed(n, r) if r.score is None else _no_group(n, r) for r in inner
        ]  # overwritten below for scored, grouped samples
        for idx in group_indices(samples).values():
            pairs = [(i, x) for i in idx if (x := inner[i].score) is not None]
            scored, xs = [i for i, _ in pairs], [x for _, x in pairs]
            if not xs:
                continue
            mean, std = mean_std(xs)
            for i, z in zip(scored, zscore(xs, scale=self.scale, eps=self.eps), strict=True):
                comps = _inner_parts(n, inner[i])
                comps.update(group_mean=mean, group_std=std, group_size=float(len(xs)))
                out[i] = RewardResult(z, components=comps, info={CHILDREN: {n: inner[i]}})
        return out

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "GroupZScore",
            "name": self.name,
            "inner": config_of(self.inner),
            "eps": self.eps,
            "scale": self.scale,
        }


def unlikeliness_factors(logprobs: Sequence[float], beta: float) -> tuple[list[int], list[float]]:
    """Rank of each sample by log-prob (0 = least likely; ties by position) and its factor ``1 − β · rank / G``
    (Rewarding the Unlikely). Shared by :class:`Unlikeliness` and the unlikeliness advantage estimator."""
    order = sorted(range(len(logprobs)), key=lambda i: logprobs[i])  # stable: ties keep their order
    ranks = [0] * len(logprobs)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks, [1.0 - beta * r / len(logprobs) for r in ranks]


class Unlikeliness:
    """Unlikeliness reward of He, Fried, Welleck (2025), "Rewarding the Unlikely: Lifting GRPO Beyond Distribution
    Sharpening" (EMNLP 2025; AndreHe02/rewarding-unlikely-release).

    Within a group, rank the samples by their log-probability under the sampling policy, rank 0 = least likely,
    and scale each reward: ``r̃_i = r_i · (1 − β · rank_i / G)`` with G the group size. With a 0/1 verifier only
    correct samples change: the rarest correct sample keeps its full reward, the most likely one gets
    ``1 − β(G−1)/G``. The GRPO normalisation comes after (wrap this in :class:`GroupZScore`).

    As in the released code (``ray_lean_trainer._compute_advantages``): the ranks run over every sample of the
    group (not only the correct ones), ``G`` counts them all, ties break by batch order (a stable sort; the
    released code's double ``argsort`` leaves tie order unspecified), β = 0.25 as in ``examples/lean/grpo.sh``.
    The log-prob is read from ``Sample.metadata[logprob_key]``: the released code uses the *mean per-token*
    log-prob of the completion under the policy that sampled it; a summed log-prob ranks long completions lower.

    Departures: samples whose inner score is ``None`` or that carry no log-prob (not applicable, reason in
    ``info``) are left out of the ranking and of G.
    """

    def __init__(
        self, inner: Reward, *, beta: float = 0.25, logprob_key: str = "logprob", name: str | None = None
    ) -> None:
        self.inner = inner
        self.beta = beta
        self.logprob_key = logprob_key
        self.name = name or f"{inner.name}_unlikely"
        self.__name__ = self.name

    def _logprob(self, s: Sample) -> float | None:
        v = s.metadata.get(self.logprob_key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        inner = check_results(self.inner, samples, self.inner(samples))
        n = self.inner.name
        out: list[RewardResult] = [_failed(n, r) if r.score is None else _no_group(n, r) for r in inner]
        for idx in group_indices(samples).values():
            ranked: list[tuple[float, int, float]] = []  # (log-prob, batch index, inner score)
            for i in idx:
                score = inner[i].score
                if score is None:
                    continue
                lp = self._logprob(samples[i])
                if lp is None:
                    out[i] = RewardResult(
                        None,
                        Status.NOT_APPLICABLE,
                        components=_inner_parts(n, inner[i]),
                        info={"reason": f"no finite metadata[{self.logprob_key!r}]", CHILDREN: {n: inner[i]}},
                    )
                    continue
                ranked.append((lp, i, score))
            ranks, factors = unlikeliness_factors([lp for lp, _, _ in ranked], self.beta)
            for (lp, i, score), rank, factor in zip(ranked, ranks, factors, strict=True):
                comps = _inner_parts(n, inner[i])
                comps.update(rank=float(rank), factor=factor, logprob=lp)
                out[i] = RewardResult(score * factor, components=comps, info={CHILDREN: {n: inner[i]}})
        return out

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Unlikeliness",
            "name": self.name,
            "inner": config_of(self.inner),
            "beta": self.beta,
            "logprob_key": self.logprob_key,
        }


class DifficultyScale:
    """Reward scaled by a per-prompt difficulty factor, the operation of GRPO-S in DR-IRL: Cheng, Ma, Wang, Duan,
    Liu, Jia, Qin, Cao, Liu, Jia (2025/ICLR 2026), "Inverse Reinforcement Learning with Dynamic Reward Scaling for
    LLM Alignment" (arXiv 2503.18991).

    ``r̃_i = w_g · r_i`` with ``w_g = Sample.metadata[key]``, the same for every sample of a group (it is a
    property of the prompt); a group whose samples disagree on ``w`` is a data error (``parse_error`` for the whole
    group, reason in ``info``), a sample without a finite ``w`` is not applicable.

    What is and is not from the paper: the paper (abstract, checked) scales the reward during GRPO optimisation by
    task difficulty, combining a data-level hardness measured by text-encoder (CLIP) cosine similarity and a
    model-level responsiveness measured by reward gaps. How those two combine into the factor could not be checked
    (the method section was not reachable), so this class does not compute the factor: the caller does, and puts it
    in the metadata. Only the scaling itself is implemented.
    """

    def __init__(self, inner: Reward, *, key: str = "difficulty", name: str | None = None) -> None:
        self.inner = inner
        self.key = key
        self.name = name or f"{inner.name}_scaled"
        self.__name__ = self.name

    def _factor(self, s: Sample) -> float | None:
        v = s.metadata.get(self.key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        inner = check_results(self.inner, samples, self.inner(samples))
        n = self.inner.name
        out: list[RewardResult] = []
        for s, r in zip(samples, inner, strict=True):
            if r.score is None:
                out.append(_failed(n, r))
                continue
            w = self._factor(s)
            if w is None:
                reason = f"no finite metadata[{self.key!r}]"
                info = {"reason": reason, CHILDREN: {n: r}}
                out.append(
                    RewardResult(None, Status.NOT_APPLICABLE, components=_inner_parts(n, r), info=info)
                )
                continue
            comps = _inner_parts(n, r)
            comps[self.key] = w
            out.append(RewardResult(w * r.score, components=comps, info={CHILDREN: {n: r}}))
        for gid, idx in group_indices(samples).items():
            ws = {w for i in idx if (w := self._factor(samples[i])) is not None}
            if len(ws) > 1:
                reason = f"group {gid!r} has different metadata[{self.key!r}] values: {sorted(ws)}"
                for i in idx:
                    out[i] = RewardResult(
                        None, Status.PARSE_ERROR, info={"reason": reason, CHILDREN: {n: inner[i]}}
                    )
        return out

    def to_config(self) -> dict[str, Any]:
        return {"type": "DifficultyScale", "name": self.name, "inner": config_of(self.inner), "key": self.key}
