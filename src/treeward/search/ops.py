"""Selection, backup and pruning primitives shared by the tree searches.

Each is a small pure function over node statistics (``visits``, ``value``, ``logprobs``), in the spirit of mctx's
``qtransforms`` and action-selection functions: algorithms bind them with keyword arguments or
``functools.partial`` instead of re-implementing them.

Selection rules take ``(tree, node, *, knobs..., children=None)`` and return one child; ``children`` is the explicit
set to choose among (a tree policy that must not pick some children, such as MCTS's rollout, duplicate and pruned
nodes, passes the others), every child of ``node`` by default.

Conventions: ``node.visits`` is N(s), ``node.value`` is the search's current value estimate V(s) (``None`` until
evaluated). Backups walk from a leaf to the root, updating every node on the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from treeward.tree import Node, Tree

__all__ = [
    "BackupRule",
    "ChildWeights",
    "allocate_widths",
    "backup",
    "choices",
    "dedupe_exact",
    "max_backup",
    "mean_backup",
    "merge_semantic",
    "puct_select",
    "sibling_priors",
    "soft_backup",
    "uct_select",
    "uniform_weights",
    "visit_weights",
]


# ---------------------------------------------------------------------- selection
def choices(tree: Tree, node: Node, children: Sequence[Node] | None) -> Sequence[Node]:
    """The children a selection rule chooses among: ``children`` when the caller passes them (a search that hides
    some children from its tree policy passes the ones it may select), else every child of ``node``."""
    kids = tree.children(node.id) if children is None else children
    if not kids:
        raise ValueError(f"node {node.id} has no children to select from")
    return kids


def uct_select(
    tree: Tree,
    node: Node,
    *,
    c: float = math.sqrt(2),
    default_q: float = 0.0,
    children: Sequence[Node] | None = None,
) -> Node:
    """UCT (Kocsis & Szepesvári 2006): argmax over children of ``Q + c·sqrt(ln N(parent) / N(child))``.

    Unvisited children come first (in order). ``Q`` of an unevaluated child is ``default_q``. Ties go to the first
    child, so selection is deterministic. ``children`` restricts the choice (see :func:`choices`).
    """
    kids = choices(tree, node, children)
    for k in kids:
        if k.visits == 0:
            return k
    log_n = math.log(max(1, node.visits))
    scores = [(default_q if k.value is None else k.value) + c * math.sqrt(log_n / k.visits) for k in kids]
    return kids[int(np.argmax(scores))]


def sibling_priors(tree: Tree, nodes: Sequence[Node], *, temperature: float = 1.0) -> np.ndarray:
    """Priors over sibling steps from the policy: softmax of each step's mean token logprob / ``temperature``.

    The mean (not the sum) keeps long steps from being penalised for their length. Steps without logprobs get the
    average prior.
    """
    if not nodes:
        return np.zeros(0)
    means = np.array([n.logprob / len(n.logprobs) if n.logprobs else np.nan for n in nodes], dtype=float)
    if np.all(np.isnan(means)):
        return np.full(len(nodes), 1.0 / len(nodes))
    means = np.where(np.isnan(means), np.nanmean(means), means) / max(temperature, 1e-8)
    w = np.exp(means - means.max())
    return w / w.sum()


def puct_select(
    tree: Tree,
    node: Node,
    *,
    c: float = 1.0,
    priors: Sequence[float] | None = None,
    default_q: float = 0.0,
    children: Sequence[Node] | None = None,
) -> Node:
    """PUCT (Silver et al. 2017, as in AlphaZero / rStar-Math): argmax of
    ``Q + c·P·sqrt(N(parent)) / (1 + N(child))``, with priors ``P`` from :func:`sibling_priors` (over the children
    chosen among) unless given.

    Ties go to the first child. With every child unvisited the prior decides. ``children`` restricts the choice
    (see :func:`choices`); ``priors``, when given, are aligned with the children chosen among.
    """
    kids = choices(tree, node, children)
    p = np.asarray(priors if priors is not None else sibling_priors(tree, kids), dtype=float)
    q = np.array([default_q if k.value is None else k.value for k in kids], dtype=float)
    n = np.array([k.visits for k in kids], dtype=float)
    scores = q + c * p * math.sqrt(max(1, node.visits)) / (1.0 + n)
    return kids[int(np.argmax(scores))]


def allocate_widths(scores: Sequence[float], total: int, *, temperature: float = 1.0) -> list[int]:
    """REBASE width allocation (Wu et al. 2024): split ``total`` expansions among nodes in proportion to
    ``softmax(score / temperature)``, rounded to integers that sum to ``total`` (largest remainder; ties to the
    earlier node)."""
    if total < 0:
        raise ValueError(f"total must be ≥ 0, got {total}")
    if not scores:
        return []
    s = np.asarray(scores, dtype=float) / max(temperature, 1e-8)
    w = np.exp(s - s.max())
    share = w / w.sum() * total
    widths = np.floor(share).astype(int)
    rest = total - int(widths.sum())
    order = sorted(range(len(scores)), key=lambda i: (-(share[i] - widths[i]), i))
    for i in order[:rest]:
        widths[i] += 1
    return [int(x) for x in widths]


# ---------------------------------------------------------------------- backup
BackupRule = Callable[[Tree, Node, float], float]
"""``rule(tree, node, leaf_value) -> node's new value``, called bottom-up along the path before ``visits`` grows."""


def mean_backup(tree: Tree, node: Node, leaf_value: float) -> float:
    """Running mean of the leaf values that passed through ``node`` (MCTS's Q)."""
    old = 0.0 if node.value is None or node.visits == 0 else node.value
    return (old * node.visits + leaf_value) / (node.visits + 1)


def max_backup(tree: Tree, node: Node, leaf_value: float) -> float:
    """The best leaf value seen below ``node`` (max backup, as in greedy searches such as DTS*)."""
    return leaf_value if node.value is None or node.visits == 0 else max(node.value, leaf_value)


ChildWeights = Callable[[Sequence[Node]], np.ndarray]
"""``weights(children) -> [len(children)]`` non-negative weights of the children in a soft backup's average."""


def visit_weights(children: Sequence[Node]) -> np.ndarray:
    """Weight ``N(c)``: the children's visit counts (the average becomes a visit-weighted one)."""
    return np.array([k.visits for k in children], dtype=float)


def uniform_weights(children: Sequence[Node]) -> np.ndarray:
    """Weight 1 per child: the plain average over the children, whatever their visits."""
    return np.ones(len(children))


class soft_backup:
    """Soft (log-sum-exp) value backup of Diffusion Tree Sampling (Jain et al. 2025):
    ``V(s) = λ⁻¹ log Σ_c w(c) exp(λ V(c)) / Σ_c w(c)`` over the visited children ``c`` of ``s`` that carry a value,
    and the leaf value at a node without such children.

    ``λ`` (``inverse_temperature``) → ∞ gives max backup, → 0 the ``w``-weighted mean. ``weights`` picks ``w``:

    * :func:`visit_weights` (default), ``w(c) = N(c)``: the visit-weighted soft value, the soft analogue of MCTS's
      mean backup.
    * :func:`uniform_weights`, ``w(c) = 1``: the paper's soft Bellman backup. The children of a DTS node are i.i.d.
      draws from the policy, so the plain average over them is the Monte Carlo estimate of
      ``E_{p(c|s)}[exp(λ V(c))]``. Visit counts are not draws from the policy: DTS visits a child with probability
      ∝ exp(λ v̂(c)), so weighting by visits tilts the average a second time and overestimates ``V(s)`` (for two
      children with values 0 and 1 and λ = 1 visited in the ratio 1 : e, the visit weights give
      ``log((1 + e²)/(1 + e)) = 0.81`` instead of the uniform ``log((1 + e)/2) = 0.62``). DTS and DTS* use it.

    Departure: the paper backs up over every child; here a child counts once it has been visited (a rollout the
    scorer could not score stays unvisited and has no value to average).
    """

    def __init__(self, inverse_temperature: float = 1.0, *, weights: ChildWeights = visit_weights) -> None:
        if inverse_temperature <= 0:
            raise ValueError(f"inverse_temperature must be > 0, got {inverse_temperature}")
        self.lam = inverse_temperature
        self.weights = weights
        variant = "" if weights is visit_weights else f", {weights.__name__}"
        self.__name__ = f"soft_backup(λ={inverse_temperature:g}{variant})"

    def __call__(self, tree: Tree, node: Node, leaf_value: float) -> float:
        kids = [k for k in tree.children(node.id) if k.visits > 0 and k.value is not None]
        if not kids:
            return leaf_value
        w = self.weights(kids)
        v = self.lam * np.array([k.value for k in kids], dtype=float)
        m = v.max()
        return float((m + math.log(float(np.sum(w / w.sum() * np.exp(v - m))))) / self.lam)


def backup(tree: Tree, leaf: Node, leaf_value: float, *, rule: BackupRule = mean_backup) -> None:
    """Propagate ``leaf_value`` from ``leaf`` to the root: each node's value becomes ``rule(...)`` and its visit
    count grows by one. Children are updated before their parents, so rules may read updated children."""
    for node in reversed(tree.path(leaf.id)):
        node.value = rule(tree, node, leaf_value)
        node.visits += 1


# ---------------------------------------------------------------------- pruning and merging
def dedupe_exact(nodes: Sequence[Node]) -> list[Node]:
    """Drop nodes whose (parent, token ids) repeat an earlier one; the first of each kind is kept and records how
    many it stands for in ``metadata["duplicates"]``."""
    seen: dict[tuple[int | None, tuple[int, ...]], Node] = {}
    for n in nodes:
        key = (n.parent, n.token_ids)
        if key in seen:
            first = seen[key]
            first.metadata["duplicates"] = first.metadata.get("duplicates", 0) + 1
        else:
            seen[key] = n
    return list(seen.values())


Embed = Callable[[Sequence[str]], np.ndarray]
"""Texts → an array [len(texts), dim] of embeddings (e.g. a sentence-transformers model's ``encode``)."""


def merge_semantic(nodes: Sequence[Node], embed: Embed, *, threshold: float = 0.95) -> list[list[Node]]:
    """Group nodes whose step texts are semantically the same (cosine similarity ≥ ``threshold``), greedily in
    order: each node joins the first group whose first member it matches. Returns the groups; their first members
    are the representatives (ETS keeps one per cluster)."""
    if not nodes:
        return []
    vecs = np.asarray(embed([n.text for n in nodes]), dtype=float)
    if vecs.shape[0] != len(nodes):
        raise ValueError(f"embed returned {vecs.shape[0]} vectors for {len(nodes)} texts")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = vecs / np.where(norms == 0, 1.0, norms)
    groups: list[list[int]] = []
    for i in range(len(nodes)):
        for g in groups:
            if float(unit[i] @ unit[g[0]]) >= threshold:
                g.append(i)
                break
        else:
            groups.append([i])
    return [[nodes[i] for i in g] for g in groups]
