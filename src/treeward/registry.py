"""Search algorithms by name, for the command line: ``name → function + the knobs that define the variant``.

This is configuration at the edge. Components never see it: a search function takes flat keyword knobs, and this
module only says which function a name means, which knobs make the named variant (``greedy`` is best-of-N with one
sample at temperature 0), and which knob a budget sweep widens with the budget. ``treeward search`` and
``treeward bench`` both read it.

Adding an algorithm is one row of :data:`ENTRIES` (plus its import), e.g.::

    Entry("mcts", mcts, scale=Scale("simulations", per=64)),

Knobs given as text (``--knob name=value``) are parsed against the function's keyword-only parameters with
:func:`inspect.signature` and their annotations: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``X | None`` and the function-valued knobs named in :data:`NAMED_FUNCTIONS` (answer rules, backup rules).

**Budget sweeps.** Every cell of a sweep gets the same hard cap in generated tokens per problem (the ``budget``
argument, never exceeded). So that an algorithm can use a bigger budget, the sweep also widens one knob with it,
``knob = max(1, budget // per)`` (:class:`Scale`):

* best-of-N variants: ``n`` with ``per=1``, i.e. more samples than the cap can ever pay for, so the cap alone decides:
  ``best_of_n`` draws waves of samples until the remaining budget cannot pay for one more ``max_tokens``-token
  sample. Fixing ``n`` from the expected sample length would leave budget unspent (a sample reserves its cap, not
  its length) or depend on the model; filling the cap does neither.
* beam search: ``expansions`` (samples per beam per step) with ``per=128``: width 2 × 8 expansions spend about
  850 tokens on 4-step arithmetic with the shipped policy (README), so 1,024 tokens buy 8 expansions, 256 buy 2.
  Beam needs a calibrated width: given more expansions than the budget pays for, it runs out before it finishes.
* ``greedy`` has no width: it spends what one greedy solution costs at any budget.

The sweep reports what each cell actually spent, so plots put actual tokens on the x axis.

**Scorers.** :data:`SCORERS` names the process scorers a search can be guided by (``treeward search --scorer``):
``steps``, the built-in task's exact step verifier (the default); ``prm``, the shipped learned PRM
(:data:`treeward._paths.SHIPPED_PRM`, trained on Monte-Carlo labels from search trees by
:mod:`treeward.train.prm`); and ``endogenous``, the shipped policy's own step log-likelihoods, min over steps. Each is a factory, so nothing loads until a command picks it.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from treeward.rewards.base import Reward
from treeward.search import (
    beam_search,
    best_of_n,
    best_score,
    dts,
    dts_star,
    dvts,
    ets,
    majority_vote,
    mcts,
    mcts_star,
    rebase,
    tot_bfs,
    tot_dfs,
    vas_decode,
    ved_decode,
    weighted_vote,
)
from treeward.search.ops import max_backup, mean_backup, soft_backup
from treeward.tree import Tree

__all__ = [
    "ENTRIES",
    "NAMED_FUNCTIONS",
    "REGISTRY",
    "SCORERS",
    "Entry",
    "KnobError",
    "Scale",
    "SearchFn",
    "get",
    "knob_json",
    "knob_parameters",
    "parse_knob",
    "parse_knob_args",
    "resolve_knobs",
    "scorer",
]

SearchFn = Callable[..., list[Tree]]
"""``fn(problems, policy, scorer, budget, *, knobs..., seed=0, answer_fn=...) -> list[Tree]``."""

RESERVED = frozenset({"seed", "answer_fn"})
"""Keyword parameters that are not knobs: the seed comes from ``--seed(s)``, the answer convention from the task."""


class KnobError(ValueError):
    """An unknown algorithm, an unknown knob, or a knob value of the wrong type."""


def knob_parameters(fn: SearchFn) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of ``fn`` that are knobs (``seed`` and ``answer_fn`` are not)."""
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in RESERVED
    }


@dataclass(frozen=True)
class Scale:
    """How a budget sweep sets a width knob from the budget: ``knob = max(1, budget // per)``."""

    knob: str
    per: int

    def value(self, budget: int) -> int:
        return max(1, budget // self.per)


@dataclass(frozen=True)
class Entry:
    """A named algorithm: its search function, the knobs that make this variant, and its sweep width."""

    name: str
    fn: SearchFn
    knobs: Mapping[str, Any] = field(default_factory=dict)
    scale: Scale | None = None

    def __post_init__(self) -> None:
        params = knob_parameters(self.fn)
        for k in [*self.knobs, *([self.scale.knob] if self.scale else [])]:
            if k not in params:
                raise KnobError(f"registry entry {self.name!r}: {self.fn.__name__} has no knob {k!r}")


ENTRIES: tuple[Entry, ...] = (
    Entry("greedy", best_of_n, {"n": 1, "temperature": 0.0, "aggregate": best_score}),
    Entry("bon", best_of_n, {"aggregate": best_score}, Scale("n", per=1)),
    Entry("majority", best_of_n, {"aggregate": majority_vote}, Scale("n", per=1)),
    Entry("weighted", best_of_n, {"aggregate": weighted_vote}, Scale("n", per=1)),
    Entry("beam", beam_search, scale=Scale("expansions", per=128)),
    # DVTS's n must stay a multiple of its expansions, so it is not widened with the budget
    Entry("dvts", dvts, {"n": 12}),
    # REBASE width 13 spends ~790 tokens on 4-step problems with the shipped policy: ~64 tokens per unit of width
    Entry("rebase", rebase, scale=Scale("width", per=64)),
    # λ_c = 2 halves the retained tree (KV proxy) at REBASE's accuracy; the ETS code's default 1 barely prunes here
    Entry("ets", ets, {"lambda_c": 2.0}, Scale("width", per=64)),
    # MCTS stops spending once a path scores 1 (about 270 tokens a problem here): the budget only caps it
    Entry("mcts", mcts),
    Entry("mcts_star", mcts_star),
    Entry("tot_bfs", tot_bfs),
    Entry("tot_dfs", tot_dfs),
    Entry("dts", dts),
    Entry("dts_star", dts_star),
    Entry("vas", vas_decode),
    Entry("ved", ved_decode),
)
REGISTRY: dict[str, Entry] = {e.name: e for e in ENTRIES}

NAMED_FUNCTIONS: dict[str, dict[str, Callable[..., Any]]] = {
    "Aggregate": {f.__name__: f for f in (best_score, majority_vote, weighted_vote)},
    "BackupRule": {"mean_backup": mean_backup, "max_backup": max_backup, "soft_backup": soft_backup()},
}
"""Function-valued knob types → the functions a command line may name for them. Keyed by the name of the type
alias as the search function's signature writes it (``aggregate: Aggregate = ...``): resolving an alias with
``typing.get_type_hints`` rebuilds it, so the alias object itself cannot be the key."""


def exact_steps() -> Reward:
    """The arithmetic task's exact step verifier (:class:`~treeward.tasks.ArithmeticSteps`)."""
    from treeward.tasks import ArithmeticSteps

    return ArithmeticSteps()


def shipped_prm() -> Reward:
    """The shipped learned PRM (:class:`~treeward.rewards.model.ProcessRewardModel` on
    :data:`~treeward._paths.SHIPPED_PRM`, min over step scores), loaded now so that a broken folder is one
    :class:`~treeward.engine.hf.ModelLoadError` here rather than a scorer failing on every node of a search."""
    from treeward._paths import SHIPPED_PRM
    from treeward.rewards.model import ProcessRewardModel

    prm = ProcessRewardModel(SHIPPED_PRM, name="learned_prm")
    prm.load()
    return prm


def endogenous_steps() -> Reward:
    """The shipped policy's own step log-likelihood as a process reward (:class:`~treeward.rewards.model.
    EndogenousReward` at step level, min over steps): no training, no verifier."""
    from treeward._paths import SHIPPED_POLICY
    from treeward.rewards.model import EndogenousReward
    from treeward.rewards.process import MinStep

    return EndogenousReward(SHIPPED_POLICY, reduce=MinStep(), name="endogenous_steps")


SCORERS: dict[str, Callable[[], Reward]] = {
    "steps": exact_steps,
    "prm": shipped_prm,
    "endogenous": endogenous_steps,
}
"""Scorer names → factories of the scorer a search is guided by (see the module docstring)."""


def scorer(name: str) -> Reward:
    """A fresh scorer called ``name`` (:data:`SCORERS`); :class:`KnobError` listing the known names otherwise, and
    the factory's own error (a ``ValueError``, e.g. ``ModelLoadError``) when it cannot build the scorer."""
    if name not in SCORERS:
        raise KnobError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return SCORERS[name]()


def get(name: str) -> Entry:
    """The registry entry called ``name``; :class:`KnobError` listing the known names otherwise."""
    if name not in REGISTRY:
        raise KnobError(f"unknown algorithm {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _hints(fn: SearchFn) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError):  # annotations naming things only imported for type checkers
        return {}


def _coerce(raw: str, hint: Any, default: Any) -> Any:
    """``raw`` as a value of type ``hint``; ValueError with the expected type's name otherwise."""
    origin = get_origin(hint)
    if origin is Literal:
        for choice in get_args(hint):
            if str(choice) == raw:
                return choice
        raise ValueError(f"one of {', '.join(map(str, get_args(hint)))}")
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if type(None) in args and raw.lower() == "none":
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(raw, arg, default)
                except ValueError:
                    pass
        raise ValueError(" or ".join(_type_name(a) for a in args))
    if hint is inspect.Parameter.empty or hint is None:  # unannotated: go by the default's type
        if isinstance(default, bool | int | float | str):
            return _coerce(raw, type(default), default)
        raise ValueError("a value this command line cannot write")
    if hint is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("true or false")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("an integer") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("a number") from None
    if hint is str:
        return raw
    raise ValueError(f"a {_type_name(hint)}, which cannot be set from the command line")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def parse_knob(fn: SearchFn, name: str, raw: str, *, algorithm: str = "") -> Any:
    """The value of knob ``name`` of ``fn`` written as text, type-checked against its annotation."""
    label = algorithm or fn.__name__
    params = knob_parameters(fn)
    if name in RESERVED:
        raise KnobError(f"{name!r} is not a knob of {label} (the command sets it)")
    if name not in params:
        raise KnobError(f"unknown knob {name!r} for {label}; its knobs are {', '.join(params)}")
    written = params[name].annotation  # the annotation's text (the search modules postpone annotations)
    try:
        if isinstance(written, str) and written in NAMED_FUNCTIONS:
            choices = NAMED_FUNCTIONS[written]
            if raw not in choices:
                raise ValueError(f"one of {', '.join(choices)}")
            return choices[raw]
        hint = _hints(fn).get(name, written)
        if isinstance(hint, str):  # an annotation get_type_hints could not resolve
            hint = inspect.Parameter.empty
        return _coerce(raw, hint, params[name].default)
    except ValueError as e:
        raise KnobError(f"knob {label}.{name} expects {e}, got {raw!r}") from None


def parse_knob_args(args: Iterable[str], algorithms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Parse ``--knob`` arguments for the selected algorithms: ``name=value`` sets the knob of every selected
    algorithm that has it (at least one must), ``algorithm.name=value`` sets it for that algorithm only."""
    out: dict[str, dict[str, Any]] = {a: {} for a in algorithms}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key.strip():
            raise KnobError(f"--knob takes name=value or algorithm.name=value, got {arg!r}")
        key, raw = key.strip(), raw.strip()
        algo, dot, name = key.rpartition(".")
        if dot:
            if algo not in out:
                get(algo)  # an unknown name gets the unknown-algorithm message
                raise KnobError(f"--knob {arg!r} names {algo!r}, which is not selected")
            out[algo][name] = parse_knob(get(algo).fn, name, raw, algorithm=algo)
            continue
        takers = [a for a in algorithms if name in knob_parameters(get(a).fn)]
        if not takers:
            if name in RESERVED:
                raise KnobError(f"{name!r} is not a knob (the command sets it)")
            raise KnobError(f"unknown knob {name!r}: none of {', '.join(algorithms)} has it")
        for a in takers:
            out[a][name] = parse_knob(get(a).fn, name, raw, algorithm=a)
    return out


def resolve_knobs(
    entry: Entry,
    *,
    defaults: Mapping[str, Any] = {},
    overrides: Mapping[str, Any] = {},
    budget: int | None = None,
) -> dict[str, Any]:
    """The knobs to call ``entry.fn`` with. Later layers win:

    1. ``defaults`` that the function accepts (settings of the command or the task, e.g. ``max_tokens`` from the
       problems' length or ``--temperature``), silently skipped where the function has no such knob;
    2. the entry's own knobs (what makes the variant: greedy's ``n=1``);
    3. the entry's width scaled with ``budget`` when one is given (a sweep);
    4. ``overrides`` (``--knob``), which must all be knobs of the function. Overriding the width knob fixes it.
    """
    params = knob_parameters(entry.fn)
    unknown = [k for k in overrides if k not in params]
    if unknown:
        raise KnobError(f"unknown knob {unknown[0]!r} for {entry.name}; its knobs are {', '.join(params)}")
    knobs = {k: v for k, v in defaults.items() if k in params}
    knobs.update(entry.knobs)
    if budget is not None and entry.scale is not None:
        knobs[entry.scale.knob] = entry.scale.value(budget)
    knobs.update(overrides)
    return knobs


def knob_json(value: Any) -> Any:
    """A knob value as JSON: numbers, strings and ``None`` as they are, functions by name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return getattr(value, "__name__", repr(value))
