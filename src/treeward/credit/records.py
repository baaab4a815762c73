"""The records credit assignment hands to trainers and exporters.

Every record carries token ids taken from the tree (never re-tokenised text) next to the text, so exports and the
training loops agree on what the model saw. Shapes: ``S`` = steps on a path, ``K`` = candidates in a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepExample:
    """One root-to-node path with a target per step: a PRM / value-model training row.

    ``step_ids`` [S] are the token ids of each step as the tree holds them; ``values`` [S] are soft targets in
    [0, 1] (e.g. Monte-Carlo step values); ``labels`` [S] are the hard labels (``value >= threshold``);
    ``node_ids`` [S] name the nodes the steps come from.
    """

    problem_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    steps: tuple[str, ...]
    step_ids: tuple[tuple[int, ...], ...]
    values: tuple[float, ...]
    labels: tuple[bool, ...]
    node_ids: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferencePair:
    """Two continuations of one shared prefix, the ``chosen`` one judged better by ``margin`` (> 0).

    ``prompt_ids`` is the whole shared prefix (the problem's prompt plus the steps the two continuations share);
    ``chosen_ids`` / ``rejected_ids`` are the continuations' token ids from the tree.
    """

    problem_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    chosen: str
    chosen_ids: tuple[int, ...]
    rejected: str
    rejected_ids: tuple[int, ...]
    margin: float
    chosen_node: int
    rejected_node: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferenceList:
    """``K`` continuations of one shared prefix with a score each (higher is better): a list-ranking (TPO) row."""

    problem_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    candidates: tuple[str, ...]
    candidate_ids: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]
    node_ids: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SFTExample:
    """A prompt and a completion to imitate (a verified path, for ReST-EM / ReST-MCTS* self-training)."""

    problem_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    completion: str
    completion_ids: tuple[int, ...]
    node_id: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Advantages:
    """Advantages for the leaves of one tree, one per step on each leaf's path (every estimator returns this).

    ``leaves`` [L] are the leaf node ids the trainer turns into samples; ``node_ids[l]`` [S_l] are the step nodes on
    leaf ``l``'s path (root excluded, root-to-leaf order); ``values[l]`` [S_l] is each step's advantage. A
    sequence-level estimator (GRPO, RLOO) repeats one number along the path; every token of a step gets its step's
    advantage when expanded to tokens.
    """

    leaves: tuple[int, ...]
    node_ids: tuple[tuple[int, ...], ...]
    values: tuple[tuple[float, ...], ...]
    metadata: dict[str, Any] = field(default_factory=dict)
