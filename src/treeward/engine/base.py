"""The policy contract shared by every engine backend, and the compute ledger.

A *policy* turns token-id prefixes into continuations. Search never hands it text: a node carries its token ids and
the policy extends them, so prefix caches (ours, vLLM's, a server's) always hit.

Sampling contract (every backend honours it):

* ``expand(prefixes, n=n, seeds=seeds)`` draws ``n`` continuations per prefix. Continuation ``j`` of prefix ``i``
  is a function of ``(prefixes[i], seeds[i], j)`` and the model only: the same inputs give the same tokens whether
  the prefix is expanded alone or inside a batch, and with or without a prefix cache.
* ``logprobs`` are log-probabilities of the generated tokens under the model at temperature 1 (the raw
  ``log_softmax`` of the logits), whatever temperature was used to sample. ``score`` returns the same numbers for
  the same tokens, so a tree's logprobs can serve as "old" logprobs in policy-gradient training.
* With ``stop`` set (the step delimiter, ``"\\n"`` by default), a continuation ends with the first token whose text
  contains it; that token is part of the continuation. A continuation also ends at EOS (included in ``token_ids``,
  excluded from ``text``) or after its ``max_new_tokens``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Continuation", "Counts", "FinishReason", "Ledger", "Policy"]

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class Continuation:
    """One sampled continuation of a prefix.

    ``token_ids`` [L] and ``logprobs`` [L] are aligned; ``text`` is the decoded tokens (EOS excluded).
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} logprobs")


@dataclass
class Counts:
    """Token and call counts booked by an engine.

    * ``generated``: tokens sampled.
    * ``computed``: token positions run through the model's forward pass (prefill and decode; padding excluded).
    * ``reused``: prefix positions whose key/value states came from a cache instead of being computed.
      ``computed + reused`` is what the same calls would cost with no cache at all.
    * ``calls``: engine calls (one batched ``expand`` or ``score`` call counts once per problem it serves).
    * ``scored``: tokens a model-based scorer (a learned PRM, an LLM judge) computed to score this policy's paths.
      The scorer reports them per result (``RewardResult.info["scored_tokens"]``) and the search books them
      (:func:`treeward.search.core.score_paths`); rule-based scorers compute none.
    """

    generated: int = 0
    computed: int = 0
    reused: int = 0
    calls: int = 0
    scored: int = 0

    def add(self, other: Counts) -> None:
        self.generated += other.generated
        self.computed += other.computed
        self.reused += other.reused
        self.calls += other.calls
        self.scored += other.scored

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Ledger:
    """Compute booked per group (a problem id) and in total, plus wall time per phase.

    Engines book every call; searches book the tokens a model-based scorer reports (``scored``) and read the
    per-problem counts into each tree's ``ledger`` field. The ledger is owned by one policy object and is not
    thread-safe.
    """

    total: Counts = field(default_factory=Counts)
    groups: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    wall: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def book(
        self,
        group: str | None = None,
        *,
        generated: int = 0,
        computed: int = 0,
        reused: int = 0,
        scored: int = 0,
    ) -> None:
        """Add tokens to the total and, when ``group`` is given, to that group."""
        c = Counts(generated=generated, computed=computed, reused=reused, scored=scored)
        self.total.add(c)
        if group is not None:
            self.groups[group].add(c)

    def book_call(self, groups: Sequence[str | None] = ()) -> None:
        """Count one engine call: once in the total and once for each distinct group it served."""
        self.total.calls += 1
        for g in set(groups):
            if g is not None:
                self.groups[g].calls += 1

    def group(self, name: str) -> Counts:
        """Counts booked for one group (zeros if none were)."""
        return self.groups[name] if name in self.groups else Counts()

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``phase``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[phase] += time.perf_counter() - t0

    def reset(self) -> None:
        self.total = Counts()
        self.groups = defaultdict(Counts)
        self.wall = defaultdict(float)

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total.to_dict(),
            "wall": dict(self.wall),
            "groups": {k: v.to_dict() for k, v in self.groups.items()},
        }


@runtime_checkable
class Policy(Protocol):
    """What search and training need from a language model. See the module docstring for the sampling contract."""

    ledger: Ledger

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as the model expects it to start (BOS prepended when the tokenizer has one)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens skipped."""
        ...

    def expand(
        self,
        prefixes: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 1.0,
        stop: str | None = "\n",
        seeds: int | Sequence[int] = 0,
        groups: Sequence[str] | None = None,
    ) -> list[list[Continuation]]:
        """Sample ``n`` continuations of each prefix; one inner list of length ``n`` per prefix.

        ``max_new_tokens`` and ``seeds`` are one value for all prefixes or one per prefix; ``temperature=0`` is
        greedy. ``groups`` (one name per prefix, e.g. the problem id) says whom to book the compute to.
        """
        ...

    def score(
        self,
        prefixes: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        *,
        groups: Sequence[str] | None = None,
    ) -> list[list[float]]:
        """Teacher-forced log-probabilities (temperature 1) of each continuation's tokens given its prefix."""
        ...
