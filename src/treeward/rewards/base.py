"""The reward contract: one interface for outcome and process rewards.

A reward takes a batch of :class:`Sample` s and returns one :class:`RewardResult` each. Outcome rewards set
``score``; process rewards also fill ``step_scores`` (one per step of ``Sample.steps``) and reduce them to ``score``.
Search calls the same objects on partial prefixes (``Sample.partial=True``).

A reward never hides a failure as a number: a crash, a timeout or unparseable input is a ``status`` with
``score=None`` ("not applicable"), which trainers skip and searches record on the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

__all__ = ["Reward", "RewardResult", "Sample", "Status"]


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
