"""Diverse Verifier Tree Search: independent greedy subtrees under a process scorer."""

from __future__ import annotations

from collections.abc import Sequence

from treeward.engine.base import Policy
from treeward.rewards.base import Reward
from treeward.search.beam import BeamPool, beam_rounds
from treeward.search.core import (
    Aggregate,
    AnswerFn,
    Budget,
    SearchError,
    check_budget,
    extract_answer,
    finish,
    init_trees,
    snapshot,
    weighted_vote,
)
from treeward.tree import Node, Problem, Tree

__all__ = ["dvts"]


def dvts(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    n: int = 16,
    expansions: int = 4,
    lookahead: int = 0,
    aggregate: Aggregate = weighted_vote,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Diverse Verifier Tree Search (Beeching, Tunstall & Rush 2024, "Scaling test-time compute with open models";
    the search-and-learn ``dvts`` recipe).

    The width ``n`` is split into ``n / expansions`` independent subtrees. Each is a greedy beam: at every step its
    one live path samples ``expansions`` candidates (search-and-learn's ``beam_width`` M), the scorer scores them
    (with ``lookahead`` as in :func:`~treeward.search.beam.beam_search`), and the subtree keeps its best one by
    (path score, cumulative logprob); a subtree ends when the kept candidate is terminal. All subtrees of all
    problems are expanded together, one engine call per depth (the root's ``n`` samples are one request, split
    among the subtrees in order); candidates carry their subtree in ``metadata["subtree"]``, and no node of one
    subtree is ever under another subtree's root child. The answer is ``aggregate`` (default: weighted vote, as
    search-and-learn evaluates DVTS) over every terminal candidate of each subtree's last round: its kept path and
    its answered siblings, as search-and-learn returns the ``M`` candidates of each subtree's last step.

    Departures: subtrees are kept by (score, logprob) rather than score alone; the budget is a hard cap in
    generated tokens, so a candidate reserves ``max_step_tokens × (1 + lookahead)`` and, when a problem cannot pay
    for every subtree's step, subtrees are served in order and those left unserved end there (search-and-learn has
    no token cap, only ``num_iterations``); the final step is cut at ``max_step_tokens`` like any other rather than
    run to EOS.
    """
    if expansions < 1 or n < expansions or n % expansions:
        raise SearchError(
            f"n must be a positive multiple of expansions (n / expansions subtrees), got n={n}, "
            f"expansions={expansions}"
        )
    if lookahead < 0:
        raise SearchError(f"lookahead must be ≥ 0 steps, got {lookahead}")
    unit = "step" if lookahead == 0 else f"step with a {lookahead}-step lookahead"
    check_budget(budget, max_step_tokens * (1 + lookahead), unit)
    trees = init_trees(problems, policy, "dvts")
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    subtrees = n // expansions
    pools = [
        BeamPool(i, 1, [t.root], tag={"subtree": s}) for i, t in enumerate(trees) for s in range(subtrees)
    ]
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
    answers: list[list[Node]] = [[] for _ in trees]
    for p in pools:
        seen = {c.id for c in answers[p.tree]}
        for c in [*p.finished, *p.last]:
            if c.terminal and c.id not in seen:
                answers[p.tree].append(c)
                seen.add(c.id)
    for i, t in enumerate(trees):
        mine = pools[i * subtrees : (i + 1) * subtrees]
        t.metadata.update(
            {
                "n": n,
                "expansions": expansions,
                "subtrees": subtrees,
                "finished_subtrees": sum(bool(p.finished) for p in mine),
                "lookahead": lookahead,
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
            }
        )
    return finish(policy, trees, answers, aggregate, before)
