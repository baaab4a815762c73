"""Step-level beam search guided by a process scorer, and the beam round it shares with DVTS."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

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
    path_key,
    score_paths,
    snapshot,
)
from treeward.tree import Node, Problem, Tree

__all__ = ["BeamPool", "KeepRule", "beam_rounds", "beam_search", "keep_best"]


@dataclass
class BeamPool:
    """Live beams of one problem that compete for ``width`` slots.

    Beam search runs one pool per problem, DVTS one per subtree. ``live`` [≤ width] holds the beams to expand
    next, best first; ``finished`` the kept candidates that ended (an answer, EOS, or cut); ``last`` every
    candidate of the pool's latest round; ``tag`` is merged into the metadata of every candidate the pool creates.
    """

    tree: int
    width: int
    live: list[Node]
    finished: list[Node] = field(default_factory=list)
    last: list[Node] = field(default_factory=list)
    tag: dict[str, Any] = field(default_factory=dict)


KeepRule = Callable[[Tree, BeamPool, Sequence[Node]], list[Node]]
"""``keep(tree, pool, candidates) -> kept``: which of a pool's scored candidates of this round it keeps, best first
(the terminal ones among them finish, the others are the next live beams)."""


def keep_best(tree: Tree, pool: BeamPool, candidates: Sequence[Node]) -> list[Node]:
    """Beam search's rule: the best ``width − len(finished)`` candidates by :func:`path_key` (a finished path keeps
    its slot for good)."""
    ranked = sorted(candidates, key=partial(path_key, tree), reverse=True)
    return ranked[: pool.width - len(pool.finished)]


def beam_rounds(
    policy: Policy,
    scorer: Reward,
    trees: Sequence[Tree],
    budgets: Sequence[Budget],
    pools: Sequence[BeamPool],
    *,
    expansions: int,
    lookahead: int,
    temperature: float,
    max_step_tokens: int,
    max_depth: int,
    seed: int,
    answer_fn: AnswerFn,
    keep: KeepRule = keep_best,
) -> None:
    """Run beam rounds over every pool of every problem until no pool has a live beam, or ``max_depth`` rounds.

    A round: every live beam samples ``expansions`` one-step candidates (one batched engine call for all pools of
    all problems; pools of one problem that share a node, such as DVTS subtrees at the root, get different
    samples of it, as :func:`~treeward.search.core.expand` draws them); with ``lookahead = k`` each non-terminal
    candidate is rolled forward up to ``k`` greedy steps (one engine call per step) and takes the score of the
    extended path; the paths are scored in one batch; each pool keeps the candidates ``keep`` picks (default
    :func:`keep_best`: its best ``width − len(finished)`` by :func:`path_key`), moving the terminal ones to
    ``finished``.

    Budget: a candidate reserves ``max_step_tokens × (1 + lookahead)`` tokens; when a problem cannot pay for all
    its beams' candidates, its pools are served in order and each pool's beams best first, the last served beam
    with fewer than ``expansions`` samples; unserved beams are dropped.
    """
    cost = max_step_tokens * (1 + lookahead)
    by_tree: dict[int, list[BeamPool]] = defaultdict(list)
    for p in pools:
        by_tree[p.tree].append(p)
    for depth in range(max_depth):
        plan: list[tuple[BeamPool, Request]] = []
        with policy.ledger.timed("select"):
            for i, mine in sorted(by_tree.items()):
                wanted = [(p, node) for p in mine for node in p.live]
                rows = budgets[i].affordable(len(wanted) * expansions, cost)
                served = -(-rows // expansions)
                for j, (p, node) in enumerate(wanted[:served]):
                    n = min(expansions, rows - j * expansions)
                    plan.append((p, Request(i, node.id, n, max_step_tokens)))
                left = served
                for p in mine:  # beams the budget cannot serve leave the search
                    p.live = p.live[: max(0, left)]
                    left -= len(p.live)
        requests = [r for _, r in plan]
        if not requests:
            break
        new = expand(
            policy,
            trees,
            budgets,
            requests,
            temperature=temperature,
            seed=seed,
            answer_fn=answer_fn,
            salt=depth,
        )
        cands: dict[int, list[Node]] = defaultdict(list)  # id(pool) -> its candidates this round
        refs: list[tuple[int, Node]] = []
        for (p, _), nodes in zip(plan, new, strict=True):
            for c in nodes:
                c.metadata.update(p.tag)
                cands[id(p)].append(c)
                refs.append((p.tree, c))
        tips = _roll_out(policy, trees, budgets, refs, lookahead, max_step_tokens, seed, answer_fn, depth)
        with policy.ledger.timed("score"):
            score_paths(scorer, trees, tips, ledger=policy.ledger)
        for (_, cand), (_, tip) in zip(refs, tips, strict=True):
            if tip is not cand:  # the candidate is judged by its rolled-out path
                cand.value, cand.status = tip.value, tip.status
                cand.metadata["lookahead_tip"] = tip.id
        with policy.ledger.timed("select"):
            for p in pools:
                mine_c = cands.get(id(p), [])
                if not mine_c:
                    continue
                kept = keep(trees[p.tree], p, mine_c)
                p.finished.extend(c for c in kept if c.terminal)
                p.live = [c for c in kept if not c.terminal]
                p.last = mine_c


def _roll_out(
    policy: Policy,
    trees: Sequence[Tree],
    budgets: Sequence[Budget],
    refs: Sequence[tuple[int, Node]],
    steps: int,
    max_step_tokens: int,
    seed: int,
    answer_fn: AnswerFn,
    salt: int,
) -> list[tuple[int, Node]]:
    """Extend each candidate by up to ``steps`` greedy steps (one engine call per step, every problem at once);
    returns the tip of each rollout (the candidate itself when it is terminal or ``steps`` is 0). Rollout nodes
    stay in the tree with ``metadata["lookahead"] = True``; a problem's rollouts stop when its budget cannot pay
    for another step."""
    tips = list(refs)
    for _ in range(steps):
        requests, which = [], []
        served: dict[int, int] = defaultdict(int)
        for k, (ti, tip) in enumerate(tips):
            if tip.terminal or budgets[ti].affordable(served[ti] + 1, max_step_tokens) <= served[ti]:
                continue
            served[ti] += 1
            requests.append(Request(ti, tip.id, 1, max_step_tokens))
            which.append(k)
        if not requests:
            break
        new = expand(
            policy, trees, budgets, requests, temperature=0.0, seed=seed, answer_fn=answer_fn, salt=salt
        )
        for k, [node] in zip(which, new, strict=True):
            node.metadata["lookahead"] = True
            tips[k] = (tips[k][0], node)
    return tips


def beam_search(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    beam_width: int = 2,
    expansions: int = 8,
    lookahead: int = 0,
    aggregate: Aggregate = best_score,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Step-level beam search with a process reward (Snell et al. 2024, "Scaling LLM test-time compute"; the
    search-and-learn recipe).

    Every live beam samples ``expansions`` one-step continuations (the root counts as one beam); every new path is
    scored by ``scorer``; candidates are ranked by (path score, cumulative logprob) and the best ``beam_width`` are
    kept, less one for every path already finished. A kept candidate that is terminal (an answer, EOS, or cut)
    leaves the beam and joins the finished set; the search of a problem ends when no beam is live, at
    ``max_depth``, or when the budget cannot pay for one more step of one beam. ``aggregate`` picks the answer
    among finished paths (default: the best-scored).

    ``lookahead = k`` (search-and-learn's ``lookahead``): each candidate is rolled forward up to ``k`` more steps
    at temperature 0 and ranked by the score of the extended path (written on the candidate, with the rollout's
    last node in ``metadata["lookahead_tip"]``); the beam continues from the candidate, not from the rollout.
    Rollout nodes stay in the tree with ``metadata["lookahead"] = True``, their tokens count in the budget, and they
    are never kept as beams. With ``k = 0`` nothing is rolled out.

    Departures from search-and-learn: beams are kept by (score, logprob) rather than score alone, the root is
    expanded ``expansions`` times rather than ``beam_width × expansions`` (the same as any beam), rollouts also
    run at the last depth, and the budget is a hard cap in generated tokens: a candidate reserves
    ``max_step_tokens × (1 + lookahead)``, and when the budget runs short fewer beams are expanded that step (best
    first), the last of them with fewer than ``expansions`` samples.
    """
    if beam_width < 1 or expansions < 1:
        raise SearchError(f"beam_width and expansions must be ≥ 1, got {beam_width} and {expansions}")
    if lookahead < 0:
        raise SearchError(f"lookahead must be ≥ 0 steps, got {lookahead}")
    unit = "step" if lookahead == 0 else f"step with a {lookahead}-step lookahead"
    check_budget(budget, max_step_tokens * (1 + lookahead), unit)
    trees = init_trees(problems, policy, "beam_search")
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    pools = [BeamPool(i, beam_width, [t.root]) for i, t in enumerate(trees)]
    beam_rounds(
        policy,
        scorer,
        trees,
        budgets,
        pools,
        expansions=expansions,
        lookahead=lookahead,
        temperature=temperature,
        max_step_tokens=max_step_tokens,
        max_depth=max_depth,
        seed=seed,
        answer_fn=answer_fn,
    )
    for t, p in zip(trees, pools, strict=True):
        t.metadata.update(
            {
                "beam_width": beam_width,
                "expansions": expansions,
                "lookahead": lookahead,
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
                "unfinished_beams": len(p.live),
            }
        )
    return finish(policy, trees, [p.finished for p in pools], aggregate, before)
