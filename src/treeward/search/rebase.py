"""Width-allocation tree search: REBASE and ETS share one loop and differ in how they split the width.

At every depth the frontier (the non-terminal nodes made at the previous depth) shares a total width ``W`` (less
the paths already finished): REBASE gives each node a share proportional to ``softmax(score / T)``
(:func:`~treeward.search.ops.allocate_widths`); ETS first chooses which nodes to keep with an integer linear
program that trades the REBASE allocation against the KV cost of the retained tree and for semantic coverage,
then splits the width among the kept nodes the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from treeward.engine.base import Policy
from treeward.rewards.base import Reward
from treeward.search.core import (
    Aggregate,
    AnswerFn,
    Budget,
    Request,
    SearchError,
    check_budget,
    expand_and_score,
    extract_answer,
    finish,
    init_trees,
    snapshot,
    weighted_vote,
)
from treeward.search.ops import Embed, allocate_widths, merge_semantic
from treeward.tree import Node, Problem, Tree

__all__ = [
    "EtsProgram",
    "ets",
    "ets_program",
    "ets_widths",
    "kv_tokens",
    "rebase",
    "rebase_widths",
    "solve_ets",
]

Select = Callable[[Tree, Sequence[Node], int], list[int]]
"""``select(tree, frontier, total) -> widths``: how many children each frontier node gets; the widths sum to
``total``."""


# ---------------------------------------------------------------------- generic helpers (candidates for ops)
def kv_tokens(tree: Tree, nodes: Sequence[Node]) -> int:
    """KV-size proxy: distinct tokens on the paths from the root to ``nodes`` (the prompt and every shared
    ancestor counted once), i.e. what a prefix-sharing engine must hold to extend all of them."""
    seen: set[int] = set()
    total = 0
    for n in nodes:
        for m in tree.path(n.id):
            if m.id not in seen:
                seen.add(m.id)
                total += len(m.token_ids)
    return total


def _scores(nodes: Sequence[Node]) -> list[float]:
    """Frontier scores for the softmax: the path value; unscored nodes get no width (``-inf``) unless no node
    is scored, when all are equal."""
    if all(n.value is None for n in nodes):
        return [0.0] * len(nodes)
    return [-math.inf if n.value is None else float(n.value) for n in nodes]


def rebase_widths(tree: Tree, frontier: Sequence[Node], total: int, *, temperature: float) -> list[int]:
    """REBASE: ``total`` split in proportion to ``softmax(score / temperature)``."""
    return allocate_widths(_scores(frontier), total, temperature=temperature)


# ---------------------------------------------------------------------- ETS's integer program
@dataclass(frozen=True)
class EtsProgram:
    """ETS's selection problem over ``N`` frontier nodes ("leaves") and ``M`` distinct ancestors ("branches").

    ``reward`` [N]: each leaf's REBASE share (its allocated width / the total). ``ancestors`` [N]: for each leaf,
    the indices (0..M-1) of its branches. ``clusters`` [N]: each leaf's semantic cluster label (K distinct).
    The objective of a kept set S (x = its indicator, y_j = 1 when some kept leaf lies under branch j,
    c_k = 1 when some kept leaf is in cluster k):

        Σ_i reward_i·x_i − node_cost·(Σ_i x_i + Σ_j y_j) + (λ_s / K)·Σ_k c_k,   node_cost = λ_c / (N + M)

    subject to Σ x ≥ 1. With λ_c = 0, ``node_cost`` is ETS's guard −1e-4 / (N + M): a tiny bonus for keeping a
    node, so that ties keep everything and ETS reduces to REBASE.
    """

    reward: tuple[float, ...]
    ancestors: tuple[tuple[int, ...], ...]
    n_branches: int
    clusters: tuple[int, ...]
    lambda_c: float
    lambda_s: float

    @property
    def node_cost(self) -> float:
        size = len(self.reward) + self.n_branches
        return (self.lambda_c if self.lambda_c > 0 else -1e-4) / size

    @property
    def n_clusters(self) -> int:
        return len(set(self.clusters))

    def objective(self, keep: Sequence[bool]) -> float:
        """The objective of keeping the leaves flagged in ``keep`` (branches and clusters follow from it)."""
        kept = [i for i, k in enumerate(keep) if k]
        branches = {j for i in kept for j in self.ancestors[i]}
        covered = {self.clusters[i] for i in kept}
        value = sum(self.reward[i] for i in kept) - self.node_cost * (len(kept) + len(branches))
        if self.lambda_s > 0:
            value += self.lambda_s / self.n_clusters * len(covered)
        return value


def solve_ets(program: EtsProgram) -> list[bool]:
    """Which leaves to keep: the exact optimum of :class:`EtsProgram` by ``scipy.optimize.milp`` (HiGHS).

    Variables ``[x (N), y (M), c (K)]``, all binary; ``y_j ≥ x_i`` for every leaf i under branch j and
    ``y_j ≤ Σ_{i under j} x_i``; ``c_k ≤ Σ_{i in k} x_i``; ``Σ x ≥ 1``.
    """
    n, m = len(program.reward), program.n_branches
    if n == 1:  # the one leaf must be kept
        return [True]
    k = program.n_clusters if program.lambda_s > 0 else 0
    size = n + m + k
    cost = np.zeros(size)  # milp minimises: the negated objective
    cost[:n] = -np.asarray(program.reward, dtype=float) + program.node_cost
    cost[n : n + m] = program.node_cost
    if k:
        cost[n + m :] = -program.lambda_s / k
    rows, lo, hi = [], [], []

    def row(coefs: dict[int, float], low: float, high: float) -> None:
        r = np.zeros(size)
        for idx, v in coefs.items():
            r[idx] += v
        rows.append(r)
        lo.append(low)
        hi.append(high)

    under: list[list[int]] = [[] for _ in range(m)]
    for i, anc in enumerate(program.ancestors):
        for j in anc:
            under[j].append(i)
            row({i: 1.0, n + j: -1.0}, -np.inf, 0.0)  # x_i ≤ y_j
    for j, leaves in enumerate(under):
        row({n + j: 1.0, **{i: -1.0 for i in leaves}}, -np.inf, 0.0)  # y_j ≤ Σ x
    if k:
        for c, label in enumerate(sorted(set(program.clusters))):
            members = {i: -1.0 for i, ci in enumerate(program.clusters) if ci == label}
            row({n + m + c: 1.0, **members}, -np.inf, 0.0)  # c_k ≤ Σ_{i in k} x_i
    row(dict.fromkeys(range(n), 1.0), 1.0, np.inf)  # keep at least one leaf
    res = milp(
        cost,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.ones(size),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},  # the exact optimum, not one within HiGHS's default 0.01 %
    )
    if res.x is None:  # only if HiGHS fails: keeping every leaf is always feasible, so fall back to REBASE
        return [True] * n
    return [bool(v > 0.5) for v in res.x[:n]]


def _clusters(nodes: Sequence[Node], embed: Embed | None, similarity: float) -> list[int]:
    """Cluster index per node: :func:`~treeward.search.ops.merge_semantic` of the step texts, or with no ``embed``
    one cluster per distinct step text."""
    if embed is None:
        first: dict[str, int] = {}
        return [first.setdefault(n.text, len(first)) for n in nodes]
    label = {}
    for c, group in enumerate(merge_semantic(nodes, embed, threshold=similarity)):
        for n in group:
            label[n.id] = c
    return [label[n.id] for n in nodes]


def ets_program(
    tree: Tree,
    frontier: Sequence[Node],
    total: int,
    *,
    temperature: float,
    lambda_c: float,
    lambda_s: float,
    embed: Embed | None = None,
    similarity: float = 0.95,
) -> EtsProgram:
    """The :class:`EtsProgram` of a frontier: REBASE shares as rewards, the frontier's distinct ancestors as
    branches, clusters of the step texts."""
    shares = allocate_widths(_scores(frontier), total, temperature=temperature)
    branch: dict[int, int] = {}
    ancestors = []
    for n in frontier:
        anc = []
        for m in tree.path(n.id)[:-1]:
            anc.append(branch.setdefault(m.id, len(branch)))
        ancestors.append(tuple(anc))
    return EtsProgram(
        reward=tuple(s / max(1, total) for s in shares),
        ancestors=tuple(ancestors),
        n_branches=len(branch),
        clusters=tuple(_clusters(frontier, embed, similarity)),
        lambda_c=lambda_c,
        lambda_s=lambda_s,
    )


def ets_widths(
    tree: Tree,
    frontier: Sequence[Node],
    total: int,
    *,
    temperature: float,
    lambda_c: float,
    lambda_s: float,
    embed: Embed | None = None,
    similarity: float = 0.95,
) -> list[int]:
    """ETS: keep the frontier nodes :func:`solve_ets` chooses, then split ``total`` among them by REBASE's rule."""
    program = ets_program(
        tree,
        frontier,
        total,
        temperature=temperature,
        lambda_c=lambda_c,
        lambda_s=lambda_s,
        embed=embed,
        similarity=similarity,
    )
    keep = solve_ets(program)
    idx = [i for i, k in enumerate(keep) if k]
    part = allocate_widths(_scores([frontier[i] for i in idx]), total, temperature=temperature)
    widths = [0] * len(frontier)
    for i, w in zip(idx, part, strict=True):
        widths[i] = w
    return widths


# ---------------------------------------------------------------------- the shared loop
@dataclass(frozen=True)
class _Depth:
    """What one depth of a width search did to one problem."""

    total: int  # the width shared out
    widths: tuple[tuple[int, int], ...]  # (frontier node id, its width)
    kv_tokens: int  # KV proxy of the retained (expanded) nodes


def _width_search(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    algorithm: str,
    select: Select,
    width: int,
    aggregate: Aggregate,
    temperature: float,
    max_step_tokens: int,
    max_depth: int,
    seed: int,
    answer_fn: AnswerFn,
) -> list[Tree]:
    """Expand each depth's frontier by the widths ``select`` gives; each tree's metadata records, per depth, the
    widths, the frontier and retained (expanded) node counts and the KV proxy of the retained nodes."""
    if width < 1:
        raise SearchError(f"width must be ≥ 1, got {width}")
    if max_step_tokens < 1 or max_depth < 1:
        raise SearchError(f"max_step_tokens and max_depth must be ≥ 1, got {max_step_tokens} and {max_depth}")
    check_budget(budget, max_step_tokens, "step")
    trees = init_trees(problems, policy, algorithm)
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    frontier: list[list[Node]] = [[t.root] for t in trees]
    finished: list[list[Node]] = [[] for _ in trees]
    log: list[list[_Depth]] = [[] for _ in trees]
    for depth in range(max_depth):
        requests: list[Request] = []
        with policy.ledger.timed("select"):
            for i, t in enumerate(trees):
                # REBASE's width left: W less the finished paths, and no more rows than the budget can pay for
                total = min(width - len(finished[i]), budgets[i].remaining // max_step_tokens)
                if not frontier[i] or total <= 0:
                    frontier[i] = []
                    continue
                widths = select(t, frontier[i], total)
                retained = [n for n, w in zip(frontier[i], widths, strict=True) if w > 0]
                pairs = tuple((n.id, w) for n, w in zip(frontier[i], widths, strict=True))
                log[i].append(_Depth(total, pairs, kv_tokens(t, retained)))
                requests.extend(
                    Request(i, n.id, w, max_step_tokens)
                    for n, w in zip(frontier[i], widths, strict=True)
                    if w > 0
                )
        if not requests:
            break
        new = expand_and_score(
            policy,
            scorer,
            trees,
            budgets,
            requests,
            temperature=temperature,
            seed=seed,
            answer_fn=answer_fn,
            salt=depth,
        )
        refs = [(r.tree, c) for r, nodes in zip(requests, new, strict=True) for c in nodes]
        frontier = [[] for _ in trees]
        for ti, c in refs:
            (finished[ti] if c.terminal else frontier[ti]).append(c)
    for t, records, done in zip(trees, log, finished, strict=True):
        kv = [r.kv_tokens for r in records]
        t.metadata.update(
            {
                "width": width,
                "finished": len(done),
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
                "widths": [[list(p) for p in r.widths] for r in records],
                "frontier": [len(r.widths) for r in records],
                "retained": [sum(w > 0 for _, w in r.widths) for r in records],
                "kv_tokens": kv,
                "kv_tokens_mean": sum(kv) / len(kv) if kv else 0.0,
            }
        )
    return finish(policy, trees, finished, aggregate, before)


def rebase(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    width: int = 16,
    softmax_temperature: float = 0.2,
    aggregate: Aggregate = weighted_vote,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """REBASE, reward-balanced search (Wu, Sun, Li, Welleck & Yang 2024, "Inference Scaling Laws: An Empirical
    Analysis of Compute-Optimal Inference for Problem-Solving with Language Models").

    The root is expanded ``width`` times. At each later depth the frontier (every non-terminal node made at the
    previous depth) shares ``W = width − finished paths``: node i gets ``W·softmax(score_i / softmax_temperature)``
    children, rounded to integers that sum to ``W`` (:func:`~treeward.search.ops.allocate_widths`); a node that
    gets 0 is dropped for good. Every new step is scored; terminal ones (an answer, EOS, or cut) are finished. The
    search of a problem ends when ``W`` reaches 0, the frontier is empty, or at ``max_depth``; ``aggregate``
    (default: weighted vote, as the paper answers) picks among the finished paths.

    ``tree.metadata`` records, per depth, the widths (``[[node id, width], ...]``), the ``frontier`` size, the
    number of ``retained`` (expanded) nodes and the KV proxy ``kv_tokens`` (distinct tree tokens on the retained
    nodes' paths, see :func:`kv_tokens`), and ``kv_tokens_mean``, its mean over depths.

    Departures: the score of a path is the scorer's path score (for a PRM, its aggregate of step scores) rather
    than the last step's reward; widths are rounded by largest remainder (the reference code takes ceilings in
    order of score); unscored nodes get no width unless none is scored; and the budget is a hard cap in generated
    tokens: a depth allocates ``min(W, remaining // max_step_tokens)`` instead of ``W``, so when the budget runs
    short the same softmax splits fewer rows.
    """
    if softmax_temperature <= 0:
        raise SearchError(f"softmax_temperature must be > 0, got {softmax_temperature}")
    trees = _width_search(
        problems,
        policy,
        scorer,
        budget,
        algorithm="rebase",
        select=partial(rebase_widths, temperature=softmax_temperature),
        width=width,
        aggregate=aggregate,
        temperature=temperature,
        max_step_tokens=max_step_tokens,
        max_depth=max_depth,
        seed=seed,
        answer_fn=answer_fn,
    )
    for t in trees:
        t.metadata["softmax_temperature"] = softmax_temperature
    return trees


def ets(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    width: int = 16,
    softmax_temperature: float = 0.2,
    lambda_c: float = 1.0,
    lambda_s: float = 1.5,
    embed: Embed | None = None,
    similarity: float = 0.95,
    aggregate: Aggregate = weighted_vote,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """ETS, efficient tree search (Hooper, Kim, Moon, Dilmen, Maheswaran, Lee, Mahoney, Shao, Keutzer & Gholami
    2025, "ETS: Efficient Tree Search for Inference-Time Scaling"; SqueezeAILab/ETS ``softmax_costmodel``).

    The loop of :func:`rebase`, but at each depth an integer linear program (:class:`EtsProgram`, solved exactly by
    :func:`solve_ets`) first chooses which frontier nodes to keep: it maximises their REBASE shares, minus
    ``lambda_c`` times the number of distinct retained nodes (kept frontier nodes and all their ancestors, shared
    ancestors once: the KV the search must hold), normalised by the node count, plus ``lambda_s`` times the
    fraction of semantic clusters covered. The width is then split among the kept nodes by REBASE's softmax.
    Clusters come from :func:`~treeward.search.ops.merge_semantic` over the step texts with ``embed`` (e.g. a
    sentence-transformers model's ``encode``) at cosine ``similarity``; with ``embed=None`` every distinct step text
    is its own cluster. With ``lambda_c = lambda_s = 0`` ETS keeps every node and is REBASE.

    ``tree.metadata`` holds the same records as :func:`rebase`'s.

    Departures: the defaults are the reference's width-16 settings (λ_c = 1, λ_s = 1.5, softmax temperature 0.2);
    clusters are merge_semantic's greedy threshold groups rather than average-linkage clustering at cosine distance
    0.05; REBASE's shares are rounded by largest remainder; the node cost is uniform per node as in the reference
    code (not per token); and the budget is a hard cap as in :func:`rebase`.
    """
    if softmax_temperature <= 0:
        raise SearchError(f"softmax_temperature must be > 0, got {softmax_temperature}")
    if lambda_c < 0 or lambda_s < 0:
        raise SearchError(f"lambda_c and lambda_s must be ≥ 0, got {lambda_c} and {lambda_s}")
    if not 0 < similarity <= 1:
        raise SearchError(f"similarity must be in (0, 1], got {similarity}")
    trees = _width_search(
        problems,
        policy,
        scorer,
        budget,
        algorithm="ets",
        select=partial(
            ets_widths,
            temperature=softmax_temperature,
            lambda_c=lambda_c,
            lambda_s=lambda_s,
            embed=embed,
            similarity=similarity,
        ),
        width=width,
        aggregate=aggregate,
        temperature=temperature,
        max_step_tokens=max_step_tokens,
        max_depth=max_depth,
        seed=seed,
        answer_fn=answer_fn,
    )
    for t in trees:
        t.metadata.update(
            {
                "softmax_temperature": softmax_temperature,
                "lambda_c": lambda_c,
                "lambda_s": lambda_s,
                "semantic_clusters": embed is not None,
                "similarity": similarity,
            }
        )
    return trees
