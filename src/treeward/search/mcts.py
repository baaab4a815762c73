"""Monte Carlo tree search over reasoning steps: UCT / PUCT MCTS, and the MCTS* of ReST-MCTS*.

Both algorithms are one loop, :func:`_search`, run with different *phases* (mctx's shape: a search function of
callbacks). A simulation round does, for every live problem at once:

1. **select**: walk from the root with the tree policy (``select(tree, node, children=...)``) to a node with no
   :func:`selectable` children (never expanded, or every sample it got was pruned or a duplicate);
2. **expand**: give that node ``expansions`` one-step children, in ONE engine call covering every problem's leaf
   (a terminal leaf is not expanded again: it is backed up again);
3. **score and evaluate**: score the new paths in one scorer call, then give each new child a value (its path
   score; a rollout mean; ReST-MCTS*'s quality value and greedy lookahead);
4. **backup**: update values and visit counts from the leaf to the root, once per round, with
   :func:`~treeward.search.ops.backup`.

Node fields the searches write: ``value`` (an unvisited node: its evaluation; a visited one: what its backup rule
made of the values backed up through it), ``visits`` (backups through the node), ``metadata["score"]`` (the
scorer's path score, never overwritten), ``metadata["eval"]`` (the node's evaluation), and the marks of nodes the
tree policy never selects: ``metadata["rollout"]`` (sampled only to evaluate another node; complete, scored paths
that can be the answer), ``metadata["duplicate_of"]`` (the same tokens as a sibling) and ``metadata["pruned"]``
(a dead end).

Generic primitives defined here and not (yet) in :mod:`~treeward.search.ops` / ``core``: :func:`best_value` (an
answer rule), :func:`mcts_star_select`, :func:`visit_weighted_backup`, :func:`quality_value`, :func:`selectable`
(the children the tree policy may select).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from treeward.credit.values import quality_step
from treeward.engine.base import Policy
from treeward.rewards.base import Reward
from treeward.search.core import (
    Aggregate,
    AnswerFn,
    Budget,
    Request,
    SearchError,
    check_budget,
    expand,
    extract_answer,
    finish,
    init_trees,
    path_key,
    score_paths,
    snapshot,
)
from treeward.search.ops import BackupRule, backup, choices, dedupe_exact, mean_backup, uct_select
from treeward.tree import Node, Problem, Tree

__all__ = [
    "best_value",
    "mcts",
    "mcts_star",
    "mcts_star_select",
    "quality_value",
    "selectable",
    "visit_weighted_backup",
]

SelectFn = Callable[..., Node]
"""``select(tree, node, *, c, children, ...) -> child``: a tree policy from :mod:`~treeward.search.ops` (or a
partial). The search passes ``children``, the children the tree policy may select (see :func:`selectable`)."""


# ---------------------------------------------------------------------- generic primitives (candidates for ops/core)
def best_value(tree: Tree, candidates: Sequence[Node]) -> Node | None:
    """Answer rule of MCTS: the answered candidate with the highest ``value`` (after search: its backed-up value),
    ties broken by more visits, then as :func:`~treeward.search.core.path_key` breaks them (cumulative logprob,
    then the earlier node). Unvalued candidates rank last."""
    answered = [n for n in candidates if n.answer is not None]

    def key(n: Node) -> tuple[float, ...]:
        value, *rest = path_key(tree, n)  # (value, logprob, earlier node)
        return (value, n.visits, *rest)

    return max(answered, key=key, default=None)


def mcts_star_select(
    tree: Tree,
    node: Node,
    *,
    c: float = 0.4,
    unvisited_bonus: float = 0.8,
    children: Sequence[Node] | None = None,
) -> Node:
    """The UCB of ReST-MCTS*'s MCTS* (Zhang et al. 2024; their released ``getBestChild``): argmax over children of
    ``V + c·sqrt(2 ln N(parent) / N(child))`` for visited children and ``V + unvisited_bonus`` for unvisited ones.

    Unlike :func:`~treeward.search.ops.uct_select`, an unvisited child is not always first: its bonus is finite, so
    a visited child whose value is high enough wins. ``V`` of an unvalued child is 0 (the paper's lower bound).
    Ties go to the first child. ``children`` restricts the choice (:func:`~treeward.search.ops.choices`).
    """
    kids = choices(tree, node, children)
    log_n = math.log(max(1, node.visits))
    scores = [
        (0.0 if k.value is None else k.value)
        + (unvisited_bonus if k.visits == 0 else c * math.sqrt(2.0 * log_n / k.visits))
        for k in kids
    ]
    return kids[int(np.argmax(scores))]


def visit_weighted_backup(tree: Tree, node: Node, leaf_value: float) -> float:
    """MCTS*'s value backpropagation: ``V(s) = Σ_c N(c)·V(c) / Σ_c N(c)`` over the visited children of ``s``;
    a node without visited children keeps ``leaf_value`` (the value it was given)."""
    kids = [k for k in tree.children(node.id) if k.visits > 0 and k.value is not None]
    if not kids:
        return leaf_value
    return math.fsum(k.visits * (k.value or 0.0) for k in kids) / sum(k.visits for k in kids)


def quality_value(rewards: Sequence[float], distances: Sequence[int]) -> list[float]:
    """ReST-MCTS*'s quality values ``v_1..v_K`` of a path's prefixes (Zhang et al. 2024, eqs. 1–2):

    ``v_0 = 0``, ``v_k = max(v_{k-1} + w_k, 0)``, ``w_k = (1 - v_{k-1}) / (m_k + 1) · (2 r_k - 1)``,

    where ``r_k`` ∈ [0, 1] is the process reward of prefix ``k`` (1 = it can still reach the right answer; values
    outside are clipped) and ``m_k`` ≥ 0 the reasoning distance (steps still needed after step ``k``). Values stay
    in [0, 1]; a path of right steps with exact distances climbs linearly to 1 at its last step (``m_K = 0``).
    """
    if len(rewards) != len(distances):
        raise ValueError(f"{len(rewards)} rewards for {len(distances)} distances")
    out, v = [], 0.0
    for r, m in zip(rewards, distances, strict=True):
        if m < 0:
            raise ValueError(f"reasoning distances must be ≥ 0, got {m}")
        v = quality_step(v, r, m)
        out.append(v)
    return out


# ---------------------------------------------------------------------- the shared loop
def _hidden(node: Node) -> bool:
    meta = node.metadata
    return bool(meta.get("rollout") or meta.get("pruned")) or "duplicate_of" in meta


def selectable(tree: Tree, node: Node) -> list[Node]:
    """The children of ``node`` the tree policy may select: all but rollout nodes, duplicate siblings and pruned
    steps. The searches pass them to the selection rule as its ``children``."""
    return [k for k in tree.children(node.id) if not _hidden(k)]


@dataclass(frozen=True)
class _Ctx:
    """What evaluation phases need to call the engine and the scorer themselves (rollouts)."""

    policy: Policy
    scorer: Reward
    trees: list[Tree]
    budgets: list[Budget]
    temperature: float
    seed: int
    answer_fn: AnswerFn
    max_step_tokens: int
    max_depth: int


Evaluate = Callable[[_Ctx, list[tuple[int, list[Node]]], int], None]
"""Give each new child (tree index, new children of one leaf) its ``metadata["eval"]`` and ``value``; the int is
the salt for any engine call it makes (distinct from the round's expansion salt)."""
Update = Callable[[Tree, Node, list[Node]], None]
"""Back up one round: the selected leaf and its new children (empty when the leaf was not expanded)."""


@dataclass(frozen=True)
class _Phases:
    select: SelectFn  # called as select(tree, node, children=...)
    evaluate: Evaluate
    update: Update
    reserve: Callable[[int], int]  # generated tokens a round that expands one leaf into m children may cost
    done: Callable[[Tree], bool]  # the problem's search ends early


def _never(tree: Tree) -> bool:
    return False


def _round_cost(children: int, *, per_child: int, fixed: int) -> int:
    """Generated tokens a round may cost: each child's reservation plus a fixed part (MCTS*'s rollout)."""
    return children * per_child + fixed


def _dead_end(node: Node, max_depth: int) -> bool:
    """A path that cannot go on and has no answer (EOS or cut without one, or at the depth limit)."""
    return node.answer is None and (node.terminal or node.depth >= max_depth)


def _prune(kids: list[Node], prune_below: float | None) -> None:
    """Mark new steps whose path score is at or below ``prune_below``: dead ends, hidden from the tree policy."""
    if prune_below is None:
        return
    for k in kids:
        score = k.metadata.get("score")
        if score is not None and score <= prune_below:
            k.metadata["pruned"] = True


def _descend(tree: Tree, select: SelectFn) -> Node:
    """Walk down with the tree policy to a node with no :func:`selectable` children. A node whose samples were all
    pruned or duplicates has none, so it is expanded again: the search widens where every sampled step was a dead
    end."""
    node = tree.root
    while not node.terminal and (kids := selectable(tree, node)):
        node = select(tree, node, children=kids)
    return node


def _dedupe(tree: Tree, leaf: int, kids: list[Node]) -> tuple[list[Node], list[Node]]:
    """Split new children into fresh steps and duplicates of a sibling (same tokens; :func:`dedupe_exact`).

    A duplicate is marked ``metadata["duplicate_of"]`` and hidden from the tree policy. Returns the fresh children
    and, for the backup, the distinct steps the new samples stand for (fresh ones and the siblings they repeat).
    """
    new_ids = {k.id for k in kids}
    older = [  # earlier distinct steps of this leaf, pruned ones included (not only the selectable ones)
        n
        for n in tree.children(leaf)
        if n.id not in new_ids and not n.metadata.get("rollout") and "duplicate_of" not in n.metadata
    ]
    kept = dedupe_exact(older + kids)
    kept_ids = {k.id for k in kept}
    by_tokens = {k.token_ids: k for k in kept}
    fresh, represented = [], {}
    for k in kids:
        if k.id in kept_ids:
            fresh.append(k)
        else:
            k.metadata["duplicate_of"] = by_tokens[k.token_ids].id
        rep = by_tokens[k.token_ids]
        represented[rep.id] = rep
    return fresh, list(represented.values())


def _copy_evaluation(tree: Tree, dups: list[Node]) -> None:
    """A duplicate step carries its sibling's scores (it was never scored itself)."""
    for d in dups:
        src = tree.nodes[d.metadata["duplicate_of"]]
        d.reward, d.status = src.reward, src.status
        d.metadata["score"] = src.metadata.get("score")
        d.metadata["eval"] = d.value = src.metadata.get("eval")
        if src.metadata.get("pruned"):
            d.metadata["pruned"] = True


def _score(ctx: _Ctx, refs: list[tuple[int, Node]]) -> None:
    """Score paths in one batch; keep the scorer's path score in ``metadata["score"]``."""
    with ctx.policy.ledger.timed("score"):
        score_paths(ctx.scorer, ctx.trees, refs, ledger=ctx.policy.ledger)
    for _, node in refs:
        node.metadata["score"] = node.value


def _mark_rollout(tree: Tree, end: Node, stop_at: int) -> None:
    """Mark the chain from ``end`` up to (not including) node ``stop_at`` as rollout nodes."""
    cur: Node | None = end
    while cur is not None and cur.id != stop_at:
        cur.metadata["rollout"] = True
        cur = None if cur.parent is None else tree.nodes[cur.parent]


def _name(fn: Callable[..., object]) -> str:
    """A knob's name for ``tree.metadata``: the function's name, with a partial's bound keywords."""
    if isinstance(fn, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items())
        return f"{_name(fn.func)}({kw})"
    return fn.__name__


def _search(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    algorithm: str,
    phases: _Phases,
    simulations: int,
    expansions: int,
    max_depth: int,
    max_step_tokens: int,
    temperature: float,
    aggregate: Aggregate,
    seed: int,
    answer_fn: AnswerFn,
    dedupe: bool,
    prune_below: float | None,
    knobs: dict[str, object],
) -> list[Tree]:
    """The simulation loop shared by :func:`mcts` and :func:`mcts_star` (see the module docstring)."""
    if simulations < 1 or expansions < 1 or max_depth < 1 or max_step_tokens < 1:
        raise SearchError(
            f"simulations, expansions, max_depth and max_step_tokens must be ≥ 1, got {simulations}, "
            f"{expansions}, {max_depth} and {max_step_tokens}"
        )
    if temperature < 0:
        raise SearchError(f"temperature must be ≥ 0, got {temperature}")
    check_budget(budget, phases.reserve(1), "expansion")
    trees = init_trees(problems, policy, algorithm)
    budgets = [Budget(budget) for _ in trees]
    ctx = _Ctx(policy, scorer, trees, budgets, temperature, seed, answer_fn, max_step_tokens, max_depth)
    before = snapshot(policy, trees)
    rounds = [0] * len(trees)
    live = list(range(len(trees)))
    round_index = 0
    while live:
        requests: list[Request] = []
        revisits: list[tuple[int, Node]] = []
        with policy.ledger.timed("select"):
            still = []
            for i in live:
                width = next(
                    (m for m in range(expansions, 0, -1) if phases.reserve(m) <= budgets[i].remaining), 0
                )
                if rounds[i] >= simulations or width == 0 or phases.done(trees[i]):
                    continue
                still.append(i)
                leaf = _descend(trees[i], phases.select)
                if leaf.terminal or leaf.depth >= max_depth:
                    revisits.append((i, leaf))
                else:
                    requests.append(Request(i, leaf.id, width, max_step_tokens))
            live = still
        # salts: a problem's k-th round is the same round of the loop however problems are batched, so seeds
        # (seed, problem, node, salt) never depend on the batch; a node expanded again draws new samples
        new = expand(
            policy,
            trees,
            budgets,
            requests,
            temperature=temperature,
            seed=seed,
            answer_fn=answer_fn,
            salt=2 * round_index,
        )
        fresh, stands_for = [], []
        with policy.ledger.timed("select"):
            for r, kids in zip(requests, new, strict=True):
                f, s = _dedupe(trees[r.tree], r.node, kids) if dedupe else (kids, kids)
                fresh.append(f)
                stands_for.append(s)
        _score(ctx, [(r.tree, c) for r, kids in zip(requests, fresh, strict=True) for c in kids])
        for kids in fresh:
            _prune(kids, prune_below)
        phases.evaluate(
            ctx, [(r.tree, kids) for r, kids in zip(requests, fresh, strict=True)], 2 * round_index + 1
        )
        with policy.ledger.timed("select"):
            for r, kids in zip(requests, new, strict=True):
                _copy_evaluation(trees[r.tree], [k for k in kids if "duplicate_of" in k.metadata])
            for i, leaf in revisits:
                phases.update(trees[i], leaf, [])
            for r, s in zip(requests, stands_for, strict=True):
                phases.update(trees[r.tree], trees[r.tree].nodes[r.node], s)
        for i in live:
            rounds[i] += 1
        round_index += 1
    for t, n_run in zip(trees, rounds, strict=True):
        t.metadata.update(
            {
                **knobs,
                "simulations": simulations,
                "simulations_run": n_run,
                "expansions": expansions,
                "budget": budget,
                "aggregate": _name(aggregate),
                "temperature": temperature,
                "max_depth": max_depth,
                "max_step_tokens": max_step_tokens,
                "seed": seed,
                "dedupe": dedupe,
                "prune_below": prune_below,
            }
        )
    return finish(policy, trees, [t.terminals() for t in trees], aggregate, before)


# ---------------------------------------------------------------------- MCTS (UCT / PUCT)
def _eval_of(node: Node, max_depth: int) -> float | None:
    """A node's own evaluation from its path score; a dead end (no answer, cannot go on) is worth 0."""
    if _dead_end(node, max_depth) and node.terminal:
        return 0.0
    score = node.metadata.get("score")
    return None if score is None else float(score)


def _evaluate_scores(ctx: _Ctx, new: list[tuple[int, list[Node]]], salt: int = 0) -> None:
    """MCTS evaluation without rollouts: a child's value is its path score."""
    for _, kids in new:
        for k in kids:
            k.metadata["eval"] = k.value = _eval_of(k, ctx.max_depth)


def _evaluate_rollouts(
    ctx: _Ctx, new: list[tuple[int, list[Node]]], salt: int, *, rollouts: int, rollout_tokens: int
) -> None:
    """MCTS evaluation with rollouts: complete each non-terminal child ``rollouts`` times (whole solutions, one
    engine call for every problem) and take the mean of the completed paths' scores (a completion without an
    answer scores 0; unscored completions are left out; none scored → no value)."""
    _evaluate_scores(ctx, new)
    requests = [
        Request(i, k.id, rollouts, rollout_tokens)
        for i, kids in new
        for k in kids
        if not k.terminal and not k.metadata.get("pruned")
    ]
    if not requests:
        return
    ends = expand(
        ctx.policy,
        ctx.trees,
        ctx.budgets,
        requests,
        temperature=ctx.temperature,
        seed=ctx.seed,
        stop=None,
        answer_fn=ctx.answer_fn,
        salt=salt,
    )
    for r, chain_ends in zip(requests, ends, strict=True):
        for end in chain_ends:
            _mark_rollout(ctx.trees[r.tree], end, r.node)
    _score(ctx, [(r.tree, e) for r, chain_ends in zip(requests, ends, strict=True) for e in chain_ends])
    for r, chain_ends in zip(requests, ends, strict=True):
        child = ctx.trees[r.tree].nodes[r.node]
        values = [v for v in (_eval_of(e, ctx.max_depth) for e in chain_ends) if v is not None]
        for e in chain_ends:
            e.metadata["eval"] = e.value = _eval_of(e, ctx.max_depth)
        child.metadata["eval"] = child.value = math.fsum(values) / len(values) if values else None


def _backup_best_child(tree: Tree, leaf: Node, kids: list[Node], *, rule: BackupRule, max_depth: int) -> None:
    """One MCTS backup per round: the value of the simulation is the best new child's value (a one-step greedy
    lookahead from the leaf); a leaf that was not expanded backs up its own evaluation (0 for a dead end)."""
    if kids:
        values = [k.value for k in kids if k.value is not None]
        value = max(values) if values else 0.0
    elif _dead_end(leaf, max_depth):
        value = 0.0
    else:
        ev = leaf.metadata.get("eval")
        value = 0.0 if ev is None else float(ev)
    backup(tree, leaf, value, rule=rule)


def mcts(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    simulations: int = 64,
    expansions: int = 3,
    select: SelectFn = uct_select,
    c: float = 1.0,
    rollouts: int = 0,
    rollout_tokens: int = 96,
    backup_rule: BackupRule = mean_backup,
    dedupe: bool = True,
    prune_below: float | None = 0.0,
    max_depth: int = 12,
    max_step_tokens: int = 24,
    temperature: float = 1.0,
    aggregate: Aggregate = best_value,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Monte Carlo tree search over steps: UCT (Kocsis & Szepesvári 2006, "Bandit based Monte-Carlo planning") or
    PUCT (Silver et al. 2017, "Mastering the game of Go without human knowledge"; used for LLM reasoning by
    e.g. rStar-Math, Guan et al. 2025), with a process scorer as the evaluation.

    Each round, every live problem selects one leaf with ``select`` (``uct_select``, or
    ``functools.partial(puct_select, ...)``; ``c`` and the :func:`selectable` ``children`` are passed to it),
    gives it ``expansions`` one-step children in one engine call shared by all problems, and scores them in one
    scorer call. A child's value is its path
    score; with ``rollouts=k > 0`` it is the mean score of ``k`` whole completions sampled from it (up to
    ``rollout_tokens`` each; they stay in the tree, marked ``metadata["rollout"]``, count against the budget and
    can be the answer). The round then backs up once, from the leaf to the root, with ``backup_rule`` (default
    the running mean): the value of the best new child. A terminal leaf is not expanded again; selected again it
    backs up its value again (a path that ended without an answer, or a leaf at ``max_depth``, backs up 0). A
    problem's search ends after ``simulations`` rounds, or when its budget cannot pay for one more expansion
    (each child reserves ``max_step_tokens`` plus ``rollouts × rollout_tokens``; when the budget is short a round
    expands fewer children rather than none). ``aggregate`` picks the answer among all terminal paths: by
    default :func:`best_value`, the highest backed-up value, ties by visits, then logprob.

    Two knobs shape the tree the policy sees. ``dedupe``: samples identical to a sibling (same tokens) are one
    action; the copies stay in the tree, marked ``metadata["duplicate_of"]``, carry the sibling's scores and are
    never selected. ``prune_below``: a step whose path score is ≤ ``prune_below`` is a dead end
    (``metadata["pruned"]``), never selected, expanded or rolled out. A node left with no selectable child (all
    its samples pruned or duplicates) is expanded again when the search comes back to it: progressive widening
    exactly where every sampled step failed. With a scorer whose scores stay above ``prune_below`` (a learned PRM
    in (0, 1)) nothing is pruned and the search is plain fixed-width MCTS.

    Defaults, measured on the shipped policy with the exact step verifier (200 four-step problems): UCT, 3
    children per expansion, no rollouts, pruning at 0 and dedupe. The tiny policy writes a right step as one
    string, so after dedupe a node has one right child and a few wrong ones; pruning hides the wrong ones and
    widening resamples where none was right, so the search walks down right steps and stops spending once it
    has a right answer (a terminal of value 1 keeps winning the selection, at no cost). Accuracy 0.73 / 0.935 /
    0.98 / 0.99 at budgets of 250 / 500 / 1,000 / 2,000 tokens, spending 204 / 244 / 266 / 280. One child per
    expansion spends less (0.975 on 170 tokens at 1,000) but needs twice the rounds, so twice the engine calls
    and wall time; more children spend tokens on siblings the search never uses. UCT and PUCT select the same
    nodes here (one selectable child is the common case), UCT with a third of the bookkeeping. Rollouts (2
    children, 1 rollout each: 0.965 on 324 tokens) cost more and take longer. ``c = 1`` suits values in [0, 1].

    Departures from textbook MCTS: children are evaluated when created, so an unvisited child carries a value
    (PUCT reads it as Q; UCT still visits unvisited children first); one backup per round, of the best new
    child's value, so ``root.visits`` equals the rounds run; dedupe, pruning and widening as above; budgets are a
    hard cap in generated tokens.
    """
    if rollouts < 0:
        raise SearchError(f"rollouts must be ≥ 0, got {rollouts}")
    if rollouts and rollout_tokens < 1:
        raise SearchError(f"rollout_tokens must be ≥ 1, got {rollout_tokens}")
    evaluate: Evaluate = (
        functools.partial(_evaluate_rollouts, rollouts=rollouts, rollout_tokens=rollout_tokens)
        if rollouts
        else _evaluate_scores
    )
    per_child = max_step_tokens + rollouts * rollout_tokens
    phases = _Phases(
        select=functools.partial(select, c=c),
        evaluate=evaluate,
        update=functools.partial(_backup_best_child, rule=backup_rule, max_depth=max_depth),
        reserve=functools.partial(_round_cost, per_child=per_child, fixed=0),
        done=_never,
    )
    knobs: dict[str, object] = {
        "select": _name(select),
        "c": c,
        "rollouts": rollouts,
        "rollout_tokens": rollout_tokens,
        "backup_rule": _name(backup_rule),
    }
    return _search(
        problems,
        policy,
        scorer,
        budget,
        algorithm="mcts",
        phases=phases,
        simulations=simulations,
        expansions=expansions,
        max_depth=max_depth,
        max_step_tokens=max_step_tokens,
        temperature=temperature,
        aggregate=aggregate,
        seed=seed,
        answer_fn=answer_fn,
        dedupe=dedupe,
        prune_below=prune_below,
        knobs=knobs,
    )


# ---------------------------------------------------------------------- MCTS* (ReST-MCTS*)
def _quality_eval(tree: Tree, node: Node, max_depth: int) -> float | None:
    """A node's quality value from its parent's, its path score ``r`` and the distance estimate ``m``."""
    score = node.metadata.get("score")
    if score is None:
        return None
    if _dead_end(node, max_depth) and node.terminal:
        return 0.0
    parent = tree.nodes[node.parent] if node.parent is not None else None
    prev = 0.0 if parent is None or parent.parent is None else parent.metadata.get("eval")
    distance = 0 if node.terminal else max(1, max_depth - node.depth)
    return quality_step(0.0 if prev is None else float(prev), float(score), distance)


def _evaluate_star(
    ctx: _Ctx,
    new: list[tuple[int, list[Node]]],
    salt: int,
    *,
    roll_forward_steps: int,
    roll_branch: int,
    alpha: float,
) -> None:
    """MCTS* evaluation: quality values for the new children, then a greedy lookahead ("greedy MC rollout") of
    ``roll_forward_steps`` steps from the best new non-terminal child, ``roll_branch`` samples a step, following
    the best; the child's value becomes ``(1 - α)·V + α·max(rollout values)`` and it counts one visit."""
    for i, kids in new:
        for k in kids:
            k.metadata["eval"] = k.value = _quality_eval(ctx.trees[i], k, ctx.max_depth)
    roll_nodes: dict[int, Node] = {}
    for i, kids in new:
        open_kids = [k for k in kids if not k.terminal and not k.metadata.get("pruned")]
        if open_kids and roll_forward_steps > 0:
            roll_nodes[i] = max(open_kids, key=lambda k: -math.inf if k.value is None else k.value)
    cursor = dict(roll_nodes)
    best: dict[int, float] = {}
    for _ in range(roll_forward_steps):
        requests = [
            Request(i, n.id, roll_branch, ctx.max_step_tokens)
            for i, n in cursor.items()
            if not n.terminal and n.depth < ctx.max_depth
        ]
        if not requests:
            break
        out = expand(
            ctx.policy,
            ctx.trees,
            ctx.budgets,
            requests,
            temperature=ctx.temperature,
            seed=ctx.seed,
            answer_fn=ctx.answer_fn,
            salt=salt,
        )
        for kids in out:
            for k in kids:
                k.metadata["rollout"] = True
        _score(ctx, [(r.tree, k) for r, kids in zip(requests, out, strict=True) for k in kids])
        cursor = {}
        for r, kids in zip(requests, out, strict=True):
            tree = ctx.trees[r.tree]
            for k in kids:
                k.metadata["eval"] = k.value = _quality_eval(tree, k, ctx.max_depth)
            top = max(kids, key=lambda k: -math.inf if k.value is None else k.value)
            if top.value is not None:
                best[r.tree] = max(best.get(r.tree, 0.0), top.value)
            cursor[r.tree] = top
    for i, node in roll_nodes.items():
        if i in best:
            v = 0.0 if node.value is None else node.value
            node.value = (1.0 - alpha) * v + alpha * best[i]
            node.visits += 1


def _backup_star(tree: Tree, leaf: Node, kids: list[Node], *, max_depth: int) -> None:
    """One MCTS* backup per round: visit-weighted means of the children, from the leaf to the root."""
    value = 0.0 if _dead_end(leaf, max_depth) or leaf.value is None else leaf.value
    backup(tree, leaf, value, rule=visit_weighted_backup)


def _end_gate_reached(tree: Tree, *, end_gate: float) -> bool:
    return any(n.answer is not None and (n.metadata.get("eval") or 0.0) >= end_gate for n in tree.terminals())


def mcts_star(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    simulations: int = 100,
    expansions: int = 3,
    c: float = 0.4,
    unvisited_bonus: float = 0.8,
    roll_forward_steps: int = 2,
    roll_branch: int = 1,
    alpha: float = 0.5,
    end_gate: float = 0.9,
    dedupe: bool = True,
    prune_below: float | None = None,
    max_depth: int = 12,
    max_step_tokens: int = 24,
    temperature: float = 0.7,
    aggregate: Aggregate = best_value,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """MCTS* of ReST-MCTS* (Zhang, Zhoubian, Hu, Yue, Dong & Tang 2024, "ReST-MCTS*: LLM Self-Training via
    Process Reward Guided Tree Search"), on the loop shared with :func:`mcts` (same selection → expansion →
    evaluation → backup round; the four phases are MCTS*'s). Defaults are the released code's (``evaluate.py``:
    ``iteration_limit=100, branch=3, exploration_constant=0.4, inf=0.8, roll_forward_steps=2, roll_branch=1,
    alpha=0.5, end_gate=0.9, temperature=0.7``).

    What is implemented:

    * **Quality value** (the paper's eqs. 1–2, :func:`quality_value`): a new node's evaluation is
      ``v_k = max(v_{k-1} + w_k, 0)``, ``w_k = (1 - v_{k-1}) / (m_k + 1) · (2 r_k - 1)``, ``v_0 = 0``, with
      ``r_k`` the process reward of the prefix and ``m_k`` the reasoning distance (steps still to go). The sign is
      written so that ``r = 1`` (a right step) raises the value, as the released code labels steps (``r = +1`` on
      a path to the right answer, ``-1`` off it, divided by its ``min_steps_to_correct`` = ``m_k + 1``).
    * **Selection** (:func:`mcts_star_select`): from the root down to a node with no children, the child
      maximising ``V + c·sqrt(2 ln N(parent) / N(child))``, or ``V + inf`` when unvisited (``unvisited_bonus``).
    * **Expansion**: ``expansions`` (the code's ``branch``) one-step children of the selected leaf, each
      evaluated at once; identical samples are one child (the code keys children by their text; ``dedupe``).
    * **Greedy MC rollout**: from the best new child, ``roll_forward_steps`` steps of ``roll_branch`` samples,
      always following the best-valued sample; the child's value becomes ``(1 - α)·V + α·max(rollout values)``
      and it gets one visit.
    * **Backpropagation** (:func:`visit_weighted_backup`): from the leaf to the root, ``V(s) = Σ N(c)V(c) /
      Σ N(c)`` over visited children, ``N(s) += 1``.
    * **Termination and answer**: the search ends once a terminal path's quality value reaches ``end_gate``,
      after ``simulations`` rounds, or when the budget cannot pay for one more round (``expansions`` steps plus
      the rollout's ``roll_forward_steps × roll_branch`` steps, ``max_step_tokens`` each). The answer is chosen
      among terminal paths by ``aggregate`` (default :func:`best_value`, the highest value: the end-gate node if
      one was found, else the code's ``getBestV``; ``weighted_vote`` is the code's ``weighted_verify``).

    Departures: (1) no trained value model: ``r_k`` is the scorer's path score of the prefix (for a step
    verifier whose path score is the minimum, "every step so far is right", that is the paper's hard label) and
    the reasoning distance, unknown at test time, is estimated as ``m_k = max_depth − k`` (at least 1) for an
    open node and 0 for a terminal one: right steps climb by ``1/max_depth`` a step and a right terminal path
    gets ``v = 1``. (2) The end gate applies to terminal paths with an answer (the paper applies it to any
    selected node and asks an LLM self-critic whether the problem is solved); a terminal met by a rollout counts
    too, since rollout nodes stay in the tree here. (3) No reflection prompts. (4) Rollout nodes are kept
    (marked ``metadata["rollout"]``; the tree policy never selects them) and the answer may come from one; the
    code's ``getBestV`` may return an unfinished leaf, here only terminal paths are answers. (5) Expansions,
    scoring and each rollout step are batched across problems; the budget is a hard cap in generated tokens.
    (6) ``prune_below`` (off by default, as in the paper) adds :func:`mcts`'s dead-end pruning and widening.
    """
    if roll_forward_steps < 0 or roll_branch < 1:
        raise SearchError(
            f"roll_forward_steps must be ≥ 0 and roll_branch ≥ 1, got {roll_forward_steps}, {roll_branch}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise SearchError(f"alpha must be in [0, 1], got {alpha}")
    rollout_cost = roll_forward_steps * roll_branch * max_step_tokens
    phases = _Phases(
        select=functools.partial(mcts_star_select, c=c, unvisited_bonus=unvisited_bonus),
        evaluate=functools.partial(
            _evaluate_star, roll_forward_steps=roll_forward_steps, roll_branch=roll_branch, alpha=alpha
        ),
        update=functools.partial(_backup_star, max_depth=max_depth),
        reserve=functools.partial(_round_cost, per_child=max_step_tokens, fixed=rollout_cost),
        done=functools.partial(_end_gate_reached, end_gate=end_gate),
    )
    knobs: dict[str, object] = {
        "c": c,
        "unvisited_bonus": unvisited_bonus,
        "roll_forward_steps": roll_forward_steps,
        "roll_branch": roll_branch,
        "alpha": alpha,
        "end_gate": end_gate,
    }
    trees = _search(
        problems,
        policy,
        scorer,
        budget,
        algorithm="mcts_star",
        phases=phases,
        simulations=simulations,
        expansions=expansions,
        max_depth=max_depth,
        max_step_tokens=max_step_tokens,
        temperature=temperature,
        aggregate=aggregate,
        seed=seed,
        answer_fn=answer_fn,
        dedupe=dedupe,
        prune_below=prune_below,
        knobs=knobs,
    )
    for t in trees:
        t.metadata["end_gate_reached"] = _end_gate_reached(t, end_gate=end_gate)
    return trees
