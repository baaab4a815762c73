"""Step-level beam search guided by a process scorer."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

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

__all__ = ["beam_search"]


def beam_search(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    beam_width: int = 2,
    expansions: int = 8,
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
    leaves the beam and joins the finished set; the search of a problem ends when no beam is live, at ``max_depth``, or when the budget cannot pay for one more
    step of one beam. ``aggregate`` picks the answer among finished paths (default: the best-scored).

    Departures from search-and-learn: beams are kept by (score, logprob) rather than score alone, the root is
    expanded ``expansions`` times rather than ``beam_width × expansions`` (the same as any beam), and the budget is
    a hard cap in generated tokens: when the budget runs short, fewer beams are expanded that step (best first),
    the last of them with fewer than ``expansions`` samples.
    """
    if beam_width < 1 or expansions < 1:
        raise SearchError(f"beam_width and expansions must be ≥ 1, got {beam_width} and {expansions}")
    check_budget(budget, max_step_tokens, "step")
    trees = init_trees(problems, policy, "beam_search")
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    beams: list[list[Node]] = [[t.root] for t in trees]
    finished: list[list[Node]] = [[] for _ in trees]
    for depth in range(max_depth):
        requests: list[Request] = []
        for i, live in enumerate(beams):
            # each beam wants `expansions` rows of `max_step_tokens`; when the budget runs short the best beams
            # are served first and the last one served may get fewer rows
            rows = budgets[i].affordable(len(live) * expansions, max_step_tokens)
            beams[i] = live[: -(-rows // expansions)]
            for j, node in enumerate(beams[i]):
                requests.append(Request(i, node.id, min(expansions, rows - j * expansions), max_step_tokens))
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
        score_paths(
            scorer, trees, [(r.tree, c) for r, nodes in zip(requests, new, strict=True) for c in nodes]
        )
        candidates: list[list[Node]] = [[] for _ in trees]
        for r, nodes in zip(requests, new, strict=True):
            candidates[r.tree].extend(nodes)
        for i, cands in enumerate(candidates):
            if not cands:
                continue
            slots = beam_width - len(finished[i])  # finished beams leave the beam for good
            kept = sorted(cands, key=partial(path_key, trees[i]), reverse=True)[:slots]
            finished[i].extend(c for c in kept if c.terminal)
            beams[i] = [c for c in kept if not c.terminal]
    for t, live in zip(trees, beams, strict=True):
        t.metadata.update(
            {
                "beam_width": beam_width,
                "expansions": expansions,
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
                "unfinished_beams": len(live),
            }
        )
    return finish(policy, trees, finished, aggregate, before)
