"""Best-of-N: sample whole solutions, score them, pick one answer."""

from __future__ import annotations

from collections.abc import Sequence

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
from treeward.tree import Node, Problem, Tree

__all__ = ["best_of_n"]


def best_of_n(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    n: int = 8,
    aggregate: Aggregate = weighted_vote,
    temperature: float = 1.0,
    max_tokens: int = 128,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Best-of-N over whole sampled solutions (Cobbe et al. 2021 "verifier"; Snell et al. 2024 / search-and-learn
    for the naive, majority and weighted variants).

    Each problem gets up to ``n`` solutions of at most ``max_tokens`` tokens, sampled in one batched engine call
    per wave; each is cut into step nodes at newlines, scored by ``scorer`` (a process scorer's step scores land on
    the step nodes, its path score on the last one), and ``aggregate`` picks the answer: :func:`best_score` (naive
    BoN), :func:`majority_vote` (self-consistency; the scorer only breaks ties) or :func:`weighted_vote` (default).

    Departures: the budget is a hard cap in generated tokens, so a problem draws samples in waves until it has
    ``n`` or cannot afford another ``max_tokens``-token sample; with a tight budget it ends with fewer than ``n``
    (recorded in ``tree.metadata["samples"]``). Samples never exceed the budget.
    """
    if n < 1:
        raise SearchError(f"n must be ≥ 1, got {n}")
    if max_tokens < 1:
        raise SearchError(f"max_tokens must be ≥ 1, got {max_tokens}")
    trees = init_trees(problems, policy, "best_of_n")
    check_budget(budget, max_tokens, "sample")
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    finals: list[list[Node]] = [[] for _ in trees]
    wave = 0
    while True:
        requests = []
        for i, b in enumerate(budgets):
            m = b.affordable(n - len(finals[i]), max_tokens)
            if m > 0:
                requests.append(Request(i, 0, m, max_tokens))
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
            stop=None,
            answer_fn=answer_fn,
            salt=wave,
        )
        for r, nodes in zip(requests, new, strict=True):
            finals[r.tree].extend(nodes)
        wave += 1
    for t, f in zip(trees, finals, strict=True):
        t.metadata.update(
            {
                "n": n,
                "samples": len(f),
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "seed": seed,
            }
        )
    return finish(policy, trees, finals, aggregate, before)
