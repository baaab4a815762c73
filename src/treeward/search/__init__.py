"""Search algorithms as short compositions of shared primitives (:mod:`treeward.search.core`).

Every algorithm is a function ``f(problems, policy, scorer, budget, *, knobs...) -> list[Tree]`` with the paper's
defaults for its knobs and an exact budget in generated tokens per problem.
"""

from treeward.search.beam import beam_search
from treeward.search.bon import best_of_n
from treeward.search.core import (
    Budget,
    SearchError,
    best_score,
    extract_answer,
    grade,
    majority_vote,
    weighted_vote,
)
from treeward.search.dts import dts, dts_star
from treeward.search.dvts import dvts
from treeward.search.mcts import mcts, mcts_star
from treeward.search.rebase import ets, rebase
from treeward.search.rollouts import finished_leaves, slate_rollouts, thicken, tree_rollouts
from treeward.search.tot import tot_bfs, tot_dfs
from treeward.search.vgd import vas_decode, ved_decode

__all__ = [
    "Budget",
    "SearchError",
    "beam_search",
    "best_of_n",
    "best_score",
    "dts",
    "dts_star",
    "dvts",
    "ets",
    "extract_answer",
    "finished_leaves",
    "grade",
    "majority_vote",
    "mcts",
    "mcts_star",
    "rebase",
    "slate_rollouts",
    "thicken",
    "tot_bfs",
    "tot_dfs",
    "tree_rollouts",
    "vas_decode",
    "ved_decode",
    "weighted_vote",
]
