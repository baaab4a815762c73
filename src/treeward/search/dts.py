"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*), applied to reasoning steps.

The tree is the one every search here builds: a node is a step, its children are steps sampled from the policy
after it. One iteration of DTS, for every live problem at once:

1. **select**: from the root, descend through nodes that already have their full quota of children, choosing a
   child with the algorithm's rule (DTS: sample ∝ exp(λ v̂(child)); DTS*: the child of highest v̂);
2. **expand + roll out**: at the first node that may take a new child, sample the rest of the solution with
   ``expand(..., stop=None)`` (one batched engine call for all problems); its first step is the new child, the
   remaining steps are appended below it as a chain, ending at a terminal node;
3. **score**: the scorer's score of the completed path is the terminal reward r (one batched scorer call);
4. **backup**: the terminal's value is r; every ancestor's soft value is recomputed from its children with
   :class:`~treeward.search.ops.soft_backup` with :func:`~treeward.search.ops.uniform_weights` (the paper's
   uniform average over the children), and its visit count grows by one.

A descent that ends at an existing terminal node costs no tokens: its reward is backed up again (in the paper a
selection that reaches ``x_0`` is a finished sample too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from treeward.engine.base import Policy
from treeward.rewards.base import Reward
from treeward.search.core import (
    Aggregate,
    AnswerFn,
    Budget,
    Request,
    SearchError,
    best_score,
    check_budget,
    expand,
    extract_answer,
    finish,
    init_trees,
    node_seed,
    score_paths,
    snapshot,
)
from treeward.search.ops import backup, soft_backup, uniform_weights
from treeward.tree import Node, Problem, Tree

__all__ = [
    "TiltedDraw",
    "boltzmann_child",
    "dts",
    "dts_star",
    "greedy_child",
    "tilted_probabilities",
]

SelectChild = Callable[[Tree, Sequence[Node], float, np.random.Generator], Node]
"""``select(tree, children, λ, rng) -> child``: how a DTS descent picks among a node's existing children."""


# ---------------------------------------------------------------------- selection rules
def tilted_probabilities(children: Sequence[Node], lam: float) -> np.ndarray:
    """``softmax(λ v̂)`` over ``children``; children without a value get probability 0 (all of them unvalued:
    uniform). Since the children are draws from the policy, picking among them with these probabilities samples a
    child ∝ p(child) · exp(λ V(child)), the reward-tilted transition."""
    vals = np.array([np.nan if c.value is None else c.value for c in children], dtype=float)
    if np.all(np.isnan(vals)):
        return np.full(len(children), 1.0 / len(children))
    z = lam * vals
    z = np.where(np.isnan(z), -np.inf, z - np.nanmax(z))
    w = np.exp(z)
    return w / w.sum()


def boltzmann_child(tree: Tree, children: Sequence[Node], lam: float, rng: np.random.Generator) -> Node:
    """DTS selection: sample a child with probability :func:`tilted_probabilities`."""
    p = tilted_probabilities(children, lam)
    return children[int(rng.choice(len(children), p=p))]


def greedy_child(tree: Tree, children: Sequence[Node], lam: float, rng: np.random.Generator) -> Node:
    """DTS* selection: the child of highest soft value (unvalued children last); ties go to the less visited
    child, then to the earlier one. Deterministic (``rng`` is unused)."""
    best = max(
        range(len(children)),
        key=lambda j: (
            -math.inf if children[j].value is None else children[j].value,
            -children[j].visits,
            -j,
        ),
    )
    return children[best]


class TiltedDraw:
    """The answer rule of DTS: one path drawn from the finished tree by descending from the root with
    :func:`boltzmann_child` on the final soft values, ending at a terminal node. The draw is seeded per problem
    (``seed``, problem id), so it is reproducible and independent of batching. ``candidates`` are ignored: the draw
    uses the whole tree."""

    def __init__(self, inverse_temperature: float, seed: int) -> None:
        self.lam, self.seed = inverse_temperature, seed
        self.__name__ = f"tilted_draw(λ={inverse_temperature:g})"

    def __call__(self, tree: Tree, candidates: Sequence[Node]) -> Node | None:
        rng = np.random.default_rng(node_seed(self.seed, tree.problem.id, 0, salt=0x7D5))
        node = tree.root
        while not node.terminal:
            kids = tree.children(node.id)
            if not kids:
                return None if node.parent is None else node
            node = boltzmann_child(tree, kids, self.lam, rng)
        return node


# ---------------------------------------------------------------------- the shared loop
def _widening(node: Node, max_children: int, exponent: float) -> int:
    """How many children ``node`` may have: ``⌈max_children · max(1, N)^exponent⌉`` (exponent 0: a fixed cap)."""
    return math.ceil(max_children * max(1, node.visits) ** exponent)


def _descend(
    tree: Tree,
    select: SelectChild,
    lam: float,
    rng: np.random.Generator,
    max_children: int,
    widening: float,
) -> Node:
    """The node to expand (it may take another child), or the terminal node the descent ended at."""
    node = tree.root
    while not node.terminal:
        kids = tree.children(node.id)
        if len(kids) < _widening(node, max_children, widening):
            return node
        node = select(tree, kids, lam, rng)
    return node


def _diffusion_tree_search(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    algorithm: str,
    select: SelectChild,
    inverse_temperature: float,
    max_children: int,
    widening: float,
    max_rollouts: int,
    aggregate: Aggregate | None,
    temperature: float,
    max_tokens: int,
    seed: int,
    answer_fn: AnswerFn,
) -> list[Tree]:
    if inverse_temperature <= 0:
        raise SearchError(f"inverse_temperature must be > 0, got {inverse_temperature}")
    if max_children < 1:
        raise SearchError(f"max_children must be ≥ 1, got {max_children}")
    if not 0 <= widening <= 1:
        raise SearchError(f"widening must be in [0, 1], got {widening}")
    if max_rollouts < 1:
        raise SearchError(f"max_rollouts must be ≥ 1, got {max_rollouts}")
    if max_tokens < 1:
        raise SearchError(f"max_tokens must be ≥ 1, got {max_tokens}")
    check_budget(budget, max_tokens, "rollout")
    trees = init_trees(problems, policy, algorithm)
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    rule = soft_backup(inverse_temperature, weights=uniform_weights)
    rngs = [np.random.default_rng(node_seed(seed, t.problem.id, 0, salt=0xD75)) for t in trees]
    live = [True] * len(trees)
    rollouts = [0] * len(trees)  # rollouts that generated tokens
    revisits = [0] * len(trees)  # descents that ended at an existing terminal (no tokens)
    unscored = [0] * len(trees)
    terminals: list[list[Node]] = [[] for _ in trees]
    for it in range(max_rollouts):
        requests: list[Request] = []
        ends: list[tuple[int, Node]] = []  # descents that ended at a terminal already in the tree
        with policy.ledger.timed("select"):
            for i, tree in enumerate(trees):
                if not live[i]:
                    continue
                node = _descend(tree, select, inverse_temperature, rngs[i], max_children, widening)
                if node.terminal:
                    ends.append((i, node))
                elif budgets[i].affordable(1, max_tokens) == 0:
                    live[i] = False
                else:
                    requests.append(Request(i, node.id, 1, max_tokens))
        if not requests and not ends:
            break
        new = expand(
            policy,
            trees,
            budgets,
            requests,
            temperature=temperature,
            seed=seed,
            stop=None,
            answer_fn=answer_fn,
            salt=it,
        )
        leaves = [(r.tree, nodes[0]) for r, nodes in zip(requests, new, strict=True)]
        with policy.ledger.timed("score"):
            score_paths(scorer, trees, leaves, ledger=policy.ledger)
        with policy.ledger.timed("select"):
            for i, leaf in leaves:
                rollouts[i] += 1
                terminals[i].append(leaf)
            for i, _ in ends:
                revisits[i] += 1
            for i, leaf in [*leaves, *ends]:
                if leaf.value is None:  # no reward to back up: the rollout stays in the tree, unvisited
                    unscored[i] += 1
                    continue
                backup(trees[i], leaf, leaf.value, rule=rule)
    answer = aggregate if aggregate is not None else TiltedDraw(inverse_temperature, seed)
    for i, t in enumerate(trees):
        t.metadata.update(
            {
                "inverse_temperature": inverse_temperature,
                "max_children": max_children,
                "widening": widening,
                "max_rollouts": max_rollouts,
                "budget": budget,
                "aggregate": answer.__name__,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "seed": seed,
                "rollouts": rollouts[i],
                "revisits": revisits[i],
                "unscored": unscored[i],
                "backup": rule.__name__,
            }
        )
    return finish(policy, trees, terminals, answer, before)


def dts(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    inverse_temperature: float = 1.0,
    max_children: int = 4,
    widening: float = 0.0,
    max_rollouts: int = 256,
    aggregate: Aggregate | None = None,
    temperature: float = 1.0,
    max_tokens: int = 128,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Diffusion Tree Sampling (Jain, Sareen, Pedramfar & Ravanbakhsh 2025, "Diffusion Tree Sampling: Scalable
    inference-time alignment of diffusion models"), over reasoning steps instead of denoising steps.

    Samples from the reward-tilted distribution ``π*(path) ∝ p(path) · exp(λ r(path))`` (λ = ``inverse_temperature``,
    r = the scorer's score of the completed path). Each iteration runs one rollout per live problem (see the module
    docstring): the descent samples children ∝ exp(λ v̂) (:func:`boltzmann_child`), a node takes a new child while it
    has fewer than ``⌈max_children · N^widening⌉`` (the paper's cap on children; ``widening`` > 0 is progressive
    widening, which the exactness of the sample needs as the number of iterations grows), values are backed up with
    :class:`~treeward.search.ops.soft_backup` over uniform weights (the paper's backup). The search of a problem ends
    after ``max_rollouts`` iterations or when the budget cannot pay for one more rollout of ``max_tokens`` tokens.

    The answer, by default, is :class:`TiltedDraw`: one path drawn from the final tree with the final soft values,
    the paper's way of producing a sample (the rollouts themselves are draws from a sampler that is still learning
    its values). Pass ``aggregate=`` (e.g. :func:`~treeward.search.core.weighted_vote`) to vote over the rollouts'
    terminals instead; that is a better point estimate of the answer, but no longer a sample.

    Departures: a node is a reasoning step (newline-delimited), not a denoising step, so depth varies per path and a
    "rollout" from a node samples the remaining steps in one engine call; the paper's rollouts always run to ``x_0``,
    ours end at an answer, EOS or the ``max_tokens`` cap (a cut path is terminal and scored as it is). The
    paper's ``λ`` and children cap are tuned per task; the defaults here (λ = 1, the target ``p · exp(r)`` of the
    paper's project page, and 4 children) are ours. Rollouts the scorer cannot score stay in the tree unvisited (no
    reward to back up), and selection ranks unvalued children last. The budget is a hard cap in generated tokens.
    """
    return _diffusion_tree_search(
        problems,
        policy,
        scorer,
        budget,
        algorithm="dts",
        select=boltzmann_child,
        inverse_temperature=inverse_temperature,
        max_children=max_children,
        widening=widening,
        max_rollouts=max_rollouts,
        aggregate=aggregate,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        answer_fn=answer_fn,
    )


def dts_star(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    inverse_temperature: float = 1.0,
    max_children: int = 4,
    widening: float = 0.0,
    max_rollouts: int = 256,
    aggregate: Aggregate = best_score,
    temperature: float = 1.0,
    max_tokens: int = 128,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Diffusion Tree Search, DTS* (Jain et al. 2025, "Diffusion Tree Sampling: Scalable inference-time alignment
    of diffusion models"), over reasoning steps: the greedy variant of :func:`dts`, for finding high-reward paths.

    Identical to :func:`dts` except for the selection rule, as in the paper: the descent takes the child of highest
    soft value (:func:`greedy_child`) instead of sampling. Exploration comes from the children cap: a node keeps
    taking new children (new rollouts) until it has ``⌈max_children · N^widening⌉``. Values are still backed up
    softly (:class:`~treeward.search.ops.soft_backup`, uniform weights), which keeps one lucky high reward from
    dominating a subtree the way a max backup would. The answer is the highest-reward terminal found
    (``aggregate=best_score``).

    Departures: as for :func:`dts`; in addition, ties between equal soft values (frequent with a 0/1 verifier) go to
    the less visited child, which the paper does not specify.
    """
    return _diffusion_tree_search(
        problems,
        policy,
        scorer,
        budget,
        algorithm="dts_star",
        select=greedy_child,
        inverse_temperature=inverse_temperature,
        max_children=max_children,
        widening=widening,
        max_rollouts=max_rollouts,
        aggregate=aggregate,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        answer_fn=answer_fn,
    )
