"""Rewards: one contract for outcome and process rewards, composition, group transforms and trainer adapters.

* the contract (:mod:`~treeward.rewards.base`): :class:`Sample`, :class:`RewardResult`, :class:`Status`,
  :class:`Reward`; :func:`reward` (a per-sample function as a picklable batched reward), :func:`ascore` /
  :class:`AsyncReward` (async scoring), :func:`explain` (the component tree of one sample);
* process rewards (:mod:`~treeward.rewards.process`): :class:`ProcessReward` and its step reducers, with the
  Clip / Delta refinements of Gao et al. (2024);
* composition (:mod:`~treeward.rewards.compose`): :class:`WeightedSum`, :class:`Gate`, :class:`Lexicographic`,
  :class:`Product`, :class:`MaxOverReferences`, :class:`Cascade`, :class:`Clip`, :class:`Affine`,
  :class:`Rename`; configs with ``to_config()`` / :func:`from_config`;
* group transforms (:mod:`~treeward.rewards.group`): :class:`GroupZScore`, :class:`Unlikeliness`,
  :class:`DifficultyScale`;
* adapters (:mod:`~treeward.rewards.adapters`): :func:`to_trl`, :func:`to_verl`, :func:`to_openrlhf`.

Importing this package is cheap: no torch, trl, sacrebleu or math-verify at import time.
"""

from treeward.rewards.adapters import to_openrlhf, to_trl, to_verl
from treeward.rewards.base import (
    AsyncReward,
    Reward,
    RewardResult,
    Sample,
    Status,
    ascore,
    explain,
    reward,
    run_sync,
)
from treeward.rewards.compose import (
    Affine,
    Cascade,
    Clip,
    Gate,
    Lexicographic,
    MaxOverReferences,
    Product,
    Rename,
    WeightedSum,
    from_config,
    registry_of,
)
from treeward.rewards.group import DifficultyScale, GroupZScore, Unlikeliness
from treeward.rewards.process import (
    ClipDeltaSteps,
    ClipSteps,
    DeltaSteps,
    LastStep,
    MeanSteps,
    MinStep,
    ProcessReward,
    ProdSteps,
    SumSteps,
)

# --- built-in reward catalogue: exports added by the lead ------------------------------------------------------
# (verifiable.py, text.py, tools.py, retrieval.py, sandbox.py, sql.py, code.py; keep their heavy imports lazy)
# --- end of built-in reward catalogue ---------------------------------------------------------------------------

__all__ = [
    "Affine",
    "AsyncReward",
    "Cascade",
    "Clip",
    "ClipDeltaSteps",
    "ClipSteps",
    "DeltaSteps",
    "DifficultyScale",
    "Gate",
    "GroupZScore",
    "LastStep",
    "Lexicographic",
    "MaxOverReferences",
    "MeanSteps",
    "MinStep",
    "ProcessReward",
    "ProdSteps",
    "Product",
    "Rename",
    "Reward",
    "RewardResult",
    "Sample",
    "Status",
    "SumSteps",
    "Unlikeliness",
    "WeightedSum",
    "ascore",
    "explain",
    "from_config",
    "registry_of",
    "reward",
    "run_sync",
    "to_openrlhf",
    "to_trl",
    "to_verl",
    # built-in reward catalogue (added by the lead)
]
