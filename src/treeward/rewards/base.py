"""The reward contract: one interface for outcome and process rewards.

A reward takes a batch of :class:`Sample` s and returns one :class:`RewardResult` each. Outcome rewards set
``score``; process rewards also fill ``step_scores`` (one per step of ``Sample.steps``) and reduce them to ``score``.
Search calls the same objects on partial prefixes (``Sample.partial=True``).

A reward never hides a failure as a number: a crash, a timeout or unparseable input is a ``status`` with
``score=None`` ("not applicable"), which trainers skip and searches record on the node.

Around the contract:

* :func:`ascore` gives any reward a coroutine: natively async rewards (:class:`AsyncReward`, with an
  ``async def ascore``) are awaited, plain ones run in a worker thread so an event loop never blocks on them;
  :func:`run_sync` runs a coroutine to completion from synchronous code, also inside a running loop.
* :func:`reward` turns a module-level per-sample function ``fn(sample) -> float | RewardResult | None`` into a
  picklable batched reward with a stable name (closures and lambdas are refused: they cannot cross a process
  boundary).
* :func:`explain` returns the tree of component values of one sample: composites record each child's result in
  ``info["children"]`` (:data:`CHILDREN`), so the tree shows what was actually computed, not a re-run.
* :class:`Configurable` and :func:`config_of`: composites serialise to plain dicts; a reward that is not a
  composite appears in a config by its name.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import numbers
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

__all__ = [
    "CHILDREN",
    "AsyncReward",
    "Configurable",
    "FunctionReward",
    "Reward",
    "RewardResult",
    "Sample",
    "Status",
    "ascore",
    "check_results",
    "config_of",
    "explain",
    "reward",
    "run_sync",
]

T = TypeVar("T")

#: The ``RewardResult.info`` key under which a composite keeps its children's results (``{child name: result}``).
CHILDREN = "children"


class Status(StrEnum):
    """Why a result has, or lacks, a score."""

    OK = "ok"
    NOT_APPLICABLE = "n/a"
    PARSE_ERROR = "parse_error"
    TIMEOUT = "timeout"
    EXEC_ERROR = "exec_error"
    JUDGE_ERROR = "judge_error"


@dataclass(frozen=True)
class Sample:
    """What a reward sees.

    ``response`` is the generated text (for a partial prefix: the steps so far); ``steps`` [S] is the same text cut
    into steps when the caller knows the cut (search does); ``reference`` is the gold answer or whatever the reward
    compares against; ``group_id`` ties siblings together (a GRPO group, a search's problem).
    """

    prompt: str
    response: str
    steps: tuple[str, ...] = ()
    reference: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    group_id: str | None = None
    partial: bool = False


@dataclass(frozen=True)
class RewardResult:
    """``score`` is ``None`` when not applicable or failed (see ``status``); ``step_scores`` [S] for process
    rewards; ``components`` names sub-scores for logging; ``info`` carries diagnostics (reason, latency, ...)."""

    score: float | None
    status: Status = Status.OK
    components: dict[str, float] = field(default_factory=dict)
    step_scores: tuple[float | None, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    """A batch scorer with a stable name (used as a metric key and in saved configs)."""

    name: str

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]: ...


@runtime_checkable
class AsyncReward(Protocol):
    """A reward that is natively asynchronous (an LLM judge, a remote sandbox): ``await r.ascore(samples)``.

    It is still a :class:`Reward`: its ``__call__`` is the synchronous entry point (usually
    ``run_sync(self.ascore(samples))``).
    """

    name: str

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]: ...

    def ascore(self, samples: Sequence[Sample]) -> Awaitable[list[RewardResult]]: ...


@runtime_checkable
class Configurable(Protocol):
    """A reward that serialises to a plain dict (composites); ``from_config`` in :mod:`treeward.rewards.compose`
    rebuilds it."""

    name: str

    def to_config(self) -> dict[str, Any]: ...


def config_of(r: Reward) -> dict[str, Any]:
    """The config of a reward: a composite's own dict, or ``{"type": "reward", "name": ...}`` for any other reward
    (resolved by name from a registry when the config is loaded)."""
    if isinstance(r, Configurable):
        return r.to_config()
    return {"type": "reward", "name": r.name}


def check_results(r: Reward, samples: Sequence[Sample], results: object) -> list[RewardResult]:
    """``results`` as returned by ``r(samples)``, checked: a list with one :class:`RewardResult` per sample.

    A reward that breaks the contract is a bug, not a per-sample failure: this raises ``TypeError`` /
    ``ValueError`` naming the reward.
    """
    if not isinstance(results, list):
        raise TypeError(
            f"reward {r.name!r} returned {type(results).__name__}, expected a list of RewardResult"
        )
    if len(results) != len(samples):
        raise ValueError(f"reward {r.name!r} returned {len(results)} results for {len(samples)} samples")
    for x in results:
        if not isinstance(x, RewardResult):
            raise TypeError(
                f"reward {r.name!r} returned a {type(x).__name__} where a RewardResult was expected"
            )
    return results


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code.

    With no event loop running in this thread it uses :func:`asyncio.run`; inside a running loop (a notebook, an
    async trainer) it runs the coroutine on a fresh loop in a helper thread, since the running loop cannot be
    re-entered.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="treeward-run-sync") as pool:
        return pool.submit(asyncio.run, coro).result()


async def ascore(r: Reward, samples: Sequence[Sample]) -> list[RewardResult]:
    """Score ``samples`` with any reward without blocking the event loop.

    A natively async reward (:class:`AsyncReward`) is awaited; a plain one runs in a worker thread
    (:func:`asyncio.to_thread`), so several rewards can be scored concurrently with :func:`asyncio.gather`.
    """
    samples = list(samples)
    if isinstance(r, AsyncReward):
        results = await r.ascore(samples)
    else:
        results = await asyncio.to_thread(r, samples)
    return check_results(r, samples, results)


# --- per-sample functions as rewards -------------------------------------------------------------------------

PerSampleFn = Callable[[Sample], Any]


def _check_picklable_function(fn: object) -> None:
    """Refuse what cannot be pickled by reference: anything but a plain function, lambdas and nested functions."""
    if not inspect.isfunction(fn):
        raise TypeError(
            f"reward() takes a module-level function, got {type(fn).__name__}; for a parameterised reward write a "
            "class with a `name` and `__call__(samples)` (its instances pickle with their attributes)"
        )
    qualname = fn.__qualname__
    if "<lambda>" in qualname:
        raise TypeError(
            f"reward() cannot wrap a lambda ({fn.__module__}.{qualname}): lambdas cannot be pickled, so the "
            "reward could not cross a process boundary (trainer workers, Ray); define a module-level function"
        )
    if "<locals>" in qualname:
        raise TypeError(
            f"reward() cannot wrap the nested function {fn.__module__}.{qualname}: closures cannot be pickled, so "
            "the reward could not cross a process boundary (trainer workers, Ray); define the function at module "
            "level, or write a class that keeps the captured values as attributes"
        )


def _resolve(module: str, qualname: str) -> object:
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load_function_reward(module: str, qualname: str, name: str) -> FunctionReward:
    """Unpickle a :class:`FunctionReward`: find the function by module and qualified name again."""
    obj = _resolve(module, qualname)
    if isinstance(obj, FunctionReward):
        return FunctionReward(obj.fn, name=name)
    if not callable(obj):
        raise TypeError(f"{module}.{qualname} is no longer a function; cannot unpickle reward {name!r}")
    return FunctionReward(obj, name=name)


def _as_result(value: object, r_name: str) -> RewardResult:
    if isinstance(value, RewardResult):
        return value
    if value is None:
        return RewardResult(None, Status.NOT_APPLICABLE)
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            return RewardResult(None, Status.EXEC_ERROR, info={"reason": f"non-finite score {x!r}"})
        return RewardResult(x)
    raise TypeError(
        f"reward {r_name!r}: the function returned {type(value).__name__}; expected a float, a RewardResult or "
        "None (not applicable)"
    )


def _crash(e: Exception) -> RewardResult:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return RewardResult(
        None,
        Status.EXEC_ERROR,
        info={"reason": f"{type(e).__name__}: {e}", "error": repr(e), "where": where},
    )


class FunctionReward:
    """A per-sample function as a batched :class:`Reward` (build it with :func:`reward`).

    ``fn(sample)`` returns a float, a :class:`RewardResult` or ``None`` ("not applicable"). A sample on which
    ``fn`` raises gets ``score=None`` with status ``exec_error`` and the exception in ``info`` (the rest of the
    batch is scored); a non-finite float is an ``exec_error`` too. Returning any other type is a bug and raises.
    An ``async def`` function makes a natively async reward: :meth:`ascore` runs the samples concurrently.

    Pickles by reference to the function (module and qualified name), so the function must stay importable.
    """

    def __init__(self, fn: PerSampleFn, *, name: str | None = None) -> None:
        _check_picklable_function(fn)
        self.fn = fn
        self.name: str = name or fn.__name__
        self.__name__ = self.name
        self.is_async = inspect.iscoroutinefunction(fn)

    def __repr__(self) -> str:
        return f"FunctionReward({self.fn.__module__}.{self.fn.__qualname__}, name={self.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_function_reward, (self.fn.__module__, self.fn.__qualname__, self.name))

    def _one(self, s: Sample) -> RewardResult:
        try:
            value = self.fn(s)
        except Exception as e:  # one sample's crash is that sample's status; the batch goes on
            return _crash(e)
        return _as_result(value, self.name)

    async def _aone(self, s: Sample) -> RewardResult:
        try:
            value = await self.fn(s)
        except Exception as e:  # one sample's crash is that sample's status; the batch goes on
            return _crash(e)
        return _as_result(value, self.name)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        if self.is_async:
            return run_sync(self.ascore(samples))
        return [self._one(s) for s in samples]

    async def ascore(self, samples: Sequence[Sample]) -> list[RewardResult]:
        if not self.is_async:
            return await asyncio.to_thread(self.__call__, samples)
        return list(await asyncio.gather(*(self._aone(s) for s in samples)))


@overload
def reward(fn: PerSampleFn, /, *, name: str | None = None) -> FunctionReward: ...


@overload
def reward(fn: None = None, /, *, name: str | None = None) -> Callable[[PerSampleFn], FunctionReward]: ...


def reward(
    fn: PerSampleFn | None = None, /, *, name: str | None = None
) -> FunctionReward | Callable[[PerSampleFn], FunctionReward]:
    """Make a batched, picklable :class:`Reward` from a per-sample function.

    Use as a decorator (``@reward`` or ``@reward(name="short_answer")``) or a factory (``reward(fn)``). The name
    (default: the function's ``__name__``) is the reward's ``name`` and ``__name__``, the metric key in TRL logs
    and the key in saved configs. Lambdas and nested functions raise ``TypeError``: they cannot be pickled.
    """
    if fn is None:
        return functools.partial(reward, name=name)
    return FunctionReward(fn, name=name)


# --- explanations --------------------------------------------------------------------------------------------


def _tree(name: str, result: RewardResult) -> dict[str, Any]:
    node: dict[str, Any] = {
        "name": name,
        "score": result.score,
        "status": result.status.value,
        "components": dict(result.components),
    }
    if result.step_scores is not None:
        node["step_scores"] = list(result.step_scores)
    if "reason" in result.info:
        node["reason"] = result.info["reason"]
    children = result.info.get(CHILDREN, {})
    node["children"] = [_tree(child, res) for child, res in children.items()]
    return node


def explain(r: Reward, sample: Sample) -> dict[str, Any]:
    """The component tree of one sample: ``{"name", "score", "status", "components", "children": [...]}`` (plus
    ``"step_scores"`` and ``"reason"`` when present), one node per reward that was evaluated.

    The sample is scored once, alone (group rewards see a group of one). Children come from what each composite
    recorded under ``info["children"]``, so a child a gate or cascade skipped does not appear.
    """
    result = check_results(r, [sample], r([sample]))[0]
    return _tree(r.name, result)
