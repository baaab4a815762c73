"""Adapters: the exact callables TRL, verl and OpenRLHF expect, generated from one reward object.

* :func:`to_trl` → ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]`` for TRL's
  ``GRPOTrainer(reward_funcs=...)`` (and ``RLOOTrainer``): extra dataset columns arrive as keyword lists (the
  reference is read from ``reference_key``, default ``"answer"``), completions may be strings or conversational
  message lists, ``None`` is TRL's "not applicable". The object has a ``__name__`` (TRL's metric key), pickles
  (module-level classes), and with ``asynchronous=True`` has an ``async def __call__`` that TRL gathers with its
  other async rewards. Components go to TRL's ``log_extra`` (one column per component) and ``log_metric``.
* :func:`to_verl` → ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict``
  (``"score"`` plus a fixed set of components) for verl's ``reward.custom_reward_function``.
* :func:`to_openrlhf` → ``reward_func(queries, prompts, labels, **kwargs) -> {"rewards", "scores", "extra_logs"}``
  for OpenRLHF's ``--reward.remote_url reward_func.py`` (a module-level ``reward_func = to_openrlhf(...)``).

verl and OpenRLHF have no "not applicable": a sample scored ``None`` gets the ``none_score`` you pass (there is
no default, so it is never a silent 0), and a ``valid`` flag says which samples had a real score. Both collect
extra values per key across samples, so their components are a fixed list named up front (missing → ``missing``).

Group rewards see the samples of one call: TRL's call holds whole groups when one process holds them (the
default on one device); the group id is the prompt text unless ``group_key`` names a column.

Nothing here imports trl or verl; torch is imported only when the OpenRLHF function is called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from treeward.rewards.base import Reward, RewardResult, Sample, Status, ascore, check_results

__all__ = [
    "AsyncTRLReward",
    "OpenRLHFReward",
    "TRLReward",
    "VerlComputeScore",
    "to_openrlhf",
    "to_trl",
    "to_verl",
]

#: Keyword arguments TRL passes that are not dataset columns.
TRL_RESERVED = frozenset({"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"})


def _content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(b.get("text", "")) for b in content if isinstance(b, Mapping) and b.get("type") == "text"
        )
    return "" if content is None else str(content)


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, Mapping) for m in x)


def _prompt_text(p: Any) -> str:
    """A prompt as text: the string itself, or the last message's content of a conversation."""
    if _is_messages(p):
        return _content_text(p[-1].get("content")) if p else ""
    return str(p)


def _completion_text(c: Any) -> str:
    """A completion as text: the string itself, or the concatenated contents of its messages."""
    if _is_messages(c):
        return "".join(_content_text(m.get("content")) for m in c)
    return str(c)


def _group_text(p: Any) -> str:
    if _is_messages(p):
        return "\n".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}" for m in p)
    return str(p)


def _trl_samples(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any] | None,
    columns: Mapping[str, Any],
    reference_key: str,
    group_key: str | None,
) -> list[Sample]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    cols = {k: v for k, v in columns.items() if k not in TRL_RESERVED}
    for k, v in cols.items():
        if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != len(prompts):
            raise ValueError(f"dataset column {k!r} is not a list of {len(prompts)} values")
    state = columns.get("trainer_state")
    step = state.global_step if state is not None else None
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        meta: dict[str, Any] = {k: v[i] for k, v in cols.items() if k != reference_key}
        if completion_ids is not None:
            meta["completion_ids"] = list(completion_ids[i])
        if _is_messages(p):
            meta["prompt_messages"] = p
        if _is_messages(c):
            meta["completion_messages"] = c
        if step is not None:
            meta["step"] = int(step)
        ref = cols[reference_key][i] if reference_key in cols else None
        gid = str(cols[group_key][i]) if group_key is not None else _group_text(p)
        out.append(
            Sample(
                prompt=_prompt_text(p),
                response=_completion_text(c),
                reference=ref,
                metadata=meta,
                group_id=gid,
            )
        )
    return out


def _trl_log(name: str, results: Sequence[RewardResult], columns: Mapping[str, Any]) -> None:
    """Per-completion component and status columns (``log_extra``) and batch means (``log_metric``)."""
    log_extra = columns.get("log_extra")
    log_metric = columns.get("log_metric")
    keys = sorted({k for r in results for k in r.components})
    if log_extra is not None:
        log_extra(f"{name}/status", [r.status.value for r in results])
        for k in keys:
            log_extra(f"{name}/{k}", [r.components.get(k) for r in results])
    if log_metric is not None:
        for k in keys:
            vals = [r.components[k] for r in results if k in r.components]
            log_metric(f"{name}/{k}", math.fsum(vals) / len(vals))
        for status in sorted({r.status for r in results} - {Status.OK}):
            frac = sum(r.status is status for r in results) / len(results)
            log_metric(f"{name}/{status.value}_frac", frac)


class TRLReward:
    """A reward as a TRL ``reward_funcs`` callable (see :func:`to_trl`)."""

    def __init__(
        self,
        reward: Reward,
        *,
        reference_key: str = "answer",
        group_key: str | None = None,
        log_components: bool = True,
        name: str | None = None,
    ) -> None:
        self.reward = reward
        self.reference_key = reference_key
        self.group_key = group_key
        self.log_components = log_components
        self.name = name or reward.name
        self.__name__ = self.name

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        samples = _trl_samples(
            prompts, completions, completion_ids, kwargs, self.reference_key, self.group_key
        )
        results = check_results(self.reward, samples, self.reward(samples))
        if self.log_components and results:
            _trl_log(self.name, results, kwargs)
        return [r.score for r in results]


class AsyncTRLReward:
    """A reward as an ``async`` TRL ``reward_funcs`` callable (see :func:`to_trl`): TRL runs every async reward
    function of a step concurrently; a natively async reward is awaited, a plain one runs in a worker thread."""

    def __init__(
        self,
        reward: Reward,
        *,
        reference_key: str = "answer",
        group_key: str | None = None,
        log_components: bool = True,
        name: str | None = None,
    ) -> None:
        self.reward = reward
        self.reference_key = reference_key
        self.group_key = group_key
        self.log_components = log_components
        self.name = name or reward.name
        self.__name__ = self.name

    async def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        samples = _trl_samples(
            prompts, completions, completion_ids, kwargs, self.reference_key, self.group_key
        )
        results = await ascore(self.reward, samples)
        if self.log_components and results:
            _trl_log(self.name, results, kwargs)
        return [r.score for r in results]


def to_trl(
    reward: Reward,
    *,
    reference_key: str = "answer",
    group_key: str | None = None,
    log_components: bool = True,
    asynchronous: bool = False,
    name: str | None = None,
) -> TRLReward | AsyncTRLReward:
    """``reward`` as a TRL ``GRPOTrainer`` reward function.

    Each call builds one :class:`~treeward.rewards.base.Sample` per completion: ``prompt`` is the prompt string
    (or the last message of a conversation), ``response`` the completion string (or its messages' contents),
    ``reference`` the ``reference_key`` column, ``group_id`` the prompt (or the ``group_key`` column), and
    ``metadata`` every other dataset column plus ``completion_ids``, the message lists and the trainer's ``step``.
    Returns one float or ``None`` per completion. ``name`` (default ``reward.name``) is the ``__name__``.
    """
    cls = AsyncTRLReward if asynchronous else TRLReward
    return cls(
        reward, reference_key=reference_key, group_key=group_key, log_components=log_components, name=name
    )


def _row(
    name: str, r: RewardResult, none_score: float, components: Sequence[str], missing: float
) -> dict[str, float]:
    row = {"score": none_score if r.score is None else r.score, "valid": 0.0 if r.score is None else 1.0}
    for k in components:
        if k == name:
            row[k] = missing if r.score is None else r.score
        else:
            row[k] = r.components.get(k, missing)
    return row


class VerlComputeScore:
    """A reward as verl's ``compute_score`` (see :func:`to_verl`)."""

    def __init__(
        self,
        reward: Reward,
        *,
        none_score: float,
        components: Sequence[str] = (),
        missing: float = math.nan,
        group_key: str = "group_id",
        prompt_key: str = "prompt",
    ) -> None:
        bad = {"score", "valid"} & set(components)
        if bad:
            raise ValueError(f"components may not be named {sorted(bad)}: those keys are the adapter's")
        self.reward = reward
        self.none_score = float(none_score)
        self.components = tuple(components)
        self.missing = missing
        self.group_key = group_key
        self.prompt_key = prompt_key
        self.name = reward.name
        self.__name__ = reward.name

    def __call__(
        self,
        data_source: Any,
        solution_str: str,
        ground_truth: Any,
        extra_info: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        meta: dict[str, Any] = {**(extra_info or {}), **kwargs, "data_source": data_source}
        gid = meta.get(self.group_key)
        sample = Sample(
            prompt=str(meta.get(self.prompt_key, "")),
            response=solution_str,
            reference=ground_truth,
            metadata=meta,
            group_id=None if gid is None else str(gid),
        )
        r = check_results(self.reward, [sample], self.reward([sample]))[0]
        return _row(self.name, r, self.none_score, self.components, self.missing)


def to_verl(
    reward: Reward,
    *,
    none_score: float,
    components: Sequence[str] = (),
    missing: float = math.nan,
    group_key: str = "group_id",
    prompt_key: str = "prompt",
) -> VerlComputeScore:
    """``reward`` as verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw)``.

    The sample: ``response`` = ``solution_str`` (verl passes the response only), ``reference`` =
    ``ground_truth``, ``metadata`` = ``extra_info`` entries + extra keywords + ``data_source``, ``prompt`` =
    ``extra_info[prompt_key]`` when present, ``group_id`` = ``extra_info[group_key]`` when present. Returns
    ``{"score", "valid", *components}`` with the same keys for every sample (verl appends each key's values per
    sample): ``score`` is ``none_score`` where the reward gave ``None`` (``valid`` = 0); each named component (a
    key of ``RewardResult.components``, or the reward's own name for its score) is ``missing`` where absent.
    Group rewards see a group of one here; use them with verl's batch reward manager instead.
    """
    return VerlComputeScore(
        reward,
        none_score=none_score,
        components=components,
        missing=missing,
        group_key=group_key,
        prompt_key=prompt_key,
    )


class OpenRLHFReward:
    """A reward as OpenRLHF's ``reward_func`` (see :func:`to_openrlhf`)."""

    def __init__(
        self,
        reward: Reward,
        *,
        none_score: float,
        components: Sequence[str] = (),
        missing: float = 0.0,
    ) -> None:
        self.reward = reward
        self.none_score = float(none_score)
        self.components = tuple(components)
        self.missing = missing
        self.name = reward.name
        self.__name__ = reward.name

    def __call__(
        self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any
    ) -> dict[str, Any]:
        import torch  # only when OpenRLHF calls: importing treeward.rewards stays light

        if not len(queries) == len(prompts) == len(labels):
            raise ValueError(f"{len(queries)} queries, {len(prompts)} prompts, {len(labels)} labels")
        samples = []
        for q, p, label in zip(queries, prompts, labels, strict=True):
            response = q[len(p) :] if q.startswith(p) else q
            samples.append(
                Sample(prompt=p, response=response, reference=label, metadata=dict(kwargs), group_id=p)
            )
        results = check_results(self.reward, samples, self.reward(samples))
        rows = [_row(self.name, r, self.none_score, self.components, self.missing) for r in results]
        rewards = torch.tensor([row["score"] for row in rows], dtype=torch.float32)
        extra = {
            f"{self.name}/{k}": torch.tensor([row[k] for row in rows], dtype=torch.float32)
            for k in ("valid", *self.components)
        }
        return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": extra}


def to_openrlhf(
    reward: Reward, *, none_score: float, components: Sequence[str] = (), missing: float = 0.0
) -> OpenRLHFReward:
    """``reward`` as OpenRLHF's ``reward_func(queries, prompts, labels, **kwargs)``.

    ``queries`` are prompt + response: the response is the query minus its prompt prefix (the whole query when the
    decoded prompt differs). ``labels`` are the references; the prompt is the group id. Returns ``rewards`` (a
    float32 tensor [B]; ``none_score`` where the reward gave ``None``), ``scores`` (the same values, which
    OpenRLHF's dynamic filtering reads), and ``extra_logs``: one float32 tensor [B] per key, ``"<name>/valid"``
    and ``"<name>/<component>"`` for each named component (``missing`` where absent; OpenRLHF concatenates each
    key across calls, so the keys are fixed).
    """
    return OpenRLHFReward(reward, none_score=none_score, components=components, missing=missing)
