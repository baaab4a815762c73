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
* LLM judges over any OpenAI-compatible endpoint (:mod:`~treeward.rewards.judge`): :class:`JudgeClient` (async,
  retries, rate limits, SQLite cache) and the :class:`PointwiseJudge`, :class:`PairwiseJudge`,
  :class:`ListwiseJudge`, :class:`PrincipleJudge` and :class:`CritiqueJudge` modes;
* model-based rewards (:mod:`~treeward.rewards.model`): :class:`ClassifierReward` (a sequence-classification RM),
  :class:`ProcessRewardModel` (a PRM read at step ends: a token-classification head or an LM scoring two label
  tokens), :class:`EndogenousReward` (a causal LM's own log-likelihood reward, Generalist Reward Models), all loaded
  lazily from a path;
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

# --- built-in reward catalogue (each module keeps its heavy imports lazy) ------------------------------------------
from treeward.rewards.code import CodeExecution
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
from treeward.rewards.judge import (
    CritiqueJudge,
    Decoding,
    JudgeClient,
    ListwiseJudge,
    PairwiseJudge,
    PointwiseJudge,
    PrincipleJudge,
)
from treeward.rewards.model import ClassifierReward, EndogenousReward, ProcessRewardModel
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
from treeward.rewards.retrieval import (
    CitationRubricReward,
    CostAwareF1,
    NuggetCoverage,
    RegularizedRelevance,
    RetrievalShaping,
)
from treeward.rewards.sql import ReasoningSqlReward, SqlExecutionMatch, SqlNgram, SqlSchemaLinking, SqlSyntax
from treeward.rewards.text import BleuberiBLEU, BleuRougeF1, ChrF, RougeL, SentenceBLEU
from treeward.rewards.tools import RouterReward, ToolCallReward
from treeward.rewards.verifiable import (
    ExactMatch,
    LengthPenalty,
    MathVerify,
    NumericMatch,
    OverlongPenalty,
    RegexFormat,
    RepetitionPenalty,
    SubstringMatch,
    TagFormat,
    TokenF1,
)

# --- end of built-in reward catalogue ---------------------------------------------------------------------------

__all__ = [
    "Affine",
    "AsyncReward",
    "BleuRougeF1",
    "BleuberiBLEU",
    "Cascade",
    "ChrF",
    "CitationRubricReward",
    "ClassifierReward",
    "Clip",
    "ClipDeltaSteps",
    "ClipSteps",
    "CodeExecution",
    "CostAwareF1",
    "CritiqueJudge",
    "Decoding",
    "DeltaSteps",
    "DifficultyScale",
    "EndogenousReward",
    "ExactMatch",
    "Gate",
    "GroupZScore",
    "JudgeClient",
    "LastStep",
    "LengthPenalty",
    "Lexicographic",
    "ListwiseJudge",
    "MathVerify",
    "MaxOverReferences",
    "MeanSteps",
    "MinStep",
    "NuggetCoverage",
    "NumericMatch",
    "OverlongPenalty",
    "PairwiseJudge",
    "PointwiseJudge",
    "PrincipleJudge",
    "ProcessReward",
    "ProcessRewardModel",
    "ProdSteps",
    "Product",
    "ReasoningSqlReward",
    "RegexFormat",
    "RegularizedRelevance",
    "Rename",
    "RepetitionPenalty",
    "RetrievalShaping",
    "Reward",
    "RewardResult",
    "RougeL",
    "RouterReward",
    "Sample",
    "SentenceBLEU",
    "SqlExecutionMatch",
    "SqlNgram",
    "SqlSchemaLinking",
    "SqlSyntax",
    "Status",
    "SubstringMatch",
    "SumSteps",
    "TagFormat",
    "TokenF1",
    "ToolCallReward",
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
]
