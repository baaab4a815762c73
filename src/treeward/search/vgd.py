"""Value-guided decoding at the step level: VAS-style value-augmented sampling and V-STAR's value-guided efficient
decoding (VED).

Both are one loop (:func:`_value_guided_decode`) that grows a small frontier of prefixes one step per round:

1. **probe**: every frontier node is expanded ``probe`` times (all problems in one batched engine call) and the new
   steps are scored (one batched scorer call);
2. **extra** (VED only): nodes whose probed children disagree most in value (the *decisive* nodes) get ``extra``
   more samples, in a second batched call;
3. **pick**: a rule picks the next frontier among all new children; picked terminal nodes are finished paths.

They differ only in the pick rule and in whether step 2 runs: VAS keeps one path and picks by policy logprob plus
``beta`` × value; VED keeps the ``width`` best-valued prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

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
    expand_and_score,
    extract_answer,
    finish,
    init_trees,
    node_seed,
    path_key,
    snapshot,
)
from treeward.tree import Node, Problem, Tree

__all__ = ["ValueAugmentedPick", "sibling_spread", "top_by_value", "vas_decode", "ved_decode"]

Pick = Callable[[Tree, Sequence[Node], int, np.random.Generator], list[Node]]
"""``pick(tree, candidates, width, rng) -> next frontier`` (at most ``width`` nodes, best first)."""

Decisiveness = Callable[[Sequence[float]], float]
"""Values of a node's children → how decisive the node is (0: not at all)."""


# ---------------------------------------------------------------------- rules
def sibling_spread(values: Sequence[float]) -> float:
    """How much sibling values disagree: their population standard deviation (0 for fewer than two values).

    For scores in {0, 1} (an exact verifier) it is ``sqrt(m (1 - m))`` with ``m`` the fraction of good children: the
    uncertainty of a Bernoulli value, largest when half of the siblings succeed."""
    return float(np.std(values)) if len(values) >= 2 else 0.0


def top_by_value(tree: Tree, candidates: Sequence[Node], width: int, rng: np.random.Generator) -> list[Node]:
    """VED's pick: the ``width`` best candidates by (path value, cumulative logprob); unscored ones last."""
    return sorted(candidates, key=partial(path_key, tree), reverse=True)[:width]


class ValueAugmentedPick:
    """VAS's pick: each candidate step ``c`` gets ``mean token logprob(c) + beta · value(c)``; the rule takes the
    argmax (``stochastic=False``) or samples ∝ exp of it (``stochastic=True``). Unscored candidates get ``-inf``
    (never picked while a scored one exists); when none is scored, the logprob alone decides."""

    def __init__(self, beta: float, *, stochastic: bool = False) -> None:
        self.beta, self.stochastic = beta, stochastic
        self.__name__ = f"value_augmented(beta={beta:g}{', sampled' if stochastic else ''})"

    def scores(self, candidates: Sequence[Node]) -> np.ndarray:
        lp = np.array([c.logprob / len(c.logprobs) if c.logprobs else 0.0 for c in candidates], dtype=float)
        if all(c.value is None for c in candidates):
            return lp
        scored = np.array([c.value is not None for c in candidates])
        v = np.array([0.0 if c.value is None else c.value for c in candidates], dtype=float)
        return np.where(scored, lp + self.beta * v, -math.inf)

    def __call__(
        self, tree: Tree, candidates: Sequence[Node], width: int, rng: np.random.Generator
    ) -> list[Node]:
        if not candidates:
            return []
        s = self.scores(candidates)
        if not self.stochastic:
            return [candidates[int(np.argmax(s))]]  # ties: the earlier candidate
        w = np.exp(s - s.max())
        return [candidates[int(rng.choice(len(candidates), p=w / w.sum()))]]


# ---------------------------------------------------------------------- the shared loop
def _value_guided_decode(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    algorithm: str,
    width: int,
    probe: int,
    extra: int,
    n_decisive: int,
    decisive: Decisiveness,
    pick: Pick,
    aggregate: Aggregate,
    temperature: float,
    max_step_tokens: int,
    max_depth: int,
    seed: int,
    answer_fn: AnswerFn,
    knobs: dict[str, object],
) -> list[Tree]:
    if width < 1 or probe < 1:
        raise SearchError(f"width and samples must be ≥ 1, got {width} and {probe}")
    if extra < 0 or n_decisive < 0:
        raise SearchError(f"extra and n_decisive must be ≥ 0, got {extra} and {n_decisive}")
    if max_depth < 1:
        raise SearchError(f"max_depth must be ≥ 1, got {max_depth}")
    check_budget(budget, max_step_tokens, "step")
    trees = init_trees(problems, policy, algorithm)
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    rngs = [np.random.default_rng(node_seed(seed, t.problem.id, 0, salt=0x7A5)) for t in trees]
    frontier: list[list[Node]] = [[t.root] for t in trees]
    finished: list[list[Node]] = [[] for _ in trees]
    seen: list[list[Node]] = [
        [] for _ in trees
    ]  # every terminal candidate (the fallback answer's candidates)
    decisive_nodes = [0] * len(trees)
    for depth in range(max_depth):
        requests: list[Request] = []
        with policy.ledger.timed("select"):
            for i, live in enumerate(frontier):
                rows = budgets[i].affordable(len(live) * probe, max_step_tokens)
                frontier[i] = live[: -(-rows // probe)]
                for j, node in enumerate(frontier[i]):
                    requests.append(Request(i, node.id, min(probe, rows - j * probe), max_step_tokens))
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
            salt=2 * depth,
        )
        if extra > 0 and n_decisive > 0:
            with policy.ledger.timed("select"):
                more = _decisive_requests(
                    trees, budgets, requests, new, decisive, extra, n_decisive, max_step_tokens
                )
                for r in more:
                    decisive_nodes[r.tree] += 1
            if more:
                requests = [*requests, *more]
                new = [
                    *new,
                    *expand_and_score(
                        policy,
                        scorer,
                        trees,
                        budgets,
                        more,
                        temperature=temperature,
                        seed=seed,
                        answer_fn=answer_fn,
                        salt=2 * depth + 1,
                    ),
                ]
        with policy.ledger.timed("select"):
            candidates: list[list[Node]] = [[] for _ in trees]
            for r, nodes in zip(requests, new, strict=True):
                candidates[r.tree].extend(nodes)
            for i, cands in enumerate(candidates):
                if not cands:
                    continue
                seen[i].extend(c for c in cands if c.terminal)
                kept = pick(trees[i], cands, width, rngs[i])
                finished[i].extend(c for c in kept if c.terminal)
                frontier[i] = [c for c in kept if not c.terminal]
    final = [done if done else terms for done, terms in zip(finished, seen, strict=True)]
    for i, t in enumerate(trees):
        t.metadata.update(
            {
                **knobs,
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
                "finished": len(finished[i]),
                "decisive_nodes": decisive_nodes[i],
            }
        )
    return finish(policy, trees, final, aggregate, before)


def _decisive_requests(
    trees: Sequence[Tree],
    budgets: Sequence[Budget],
    requests: Sequence[Request],
    new: Sequence[Sequence[Node]],
    decisive: Decisiveness,
    extra: int,
    n_decisive: int,
    cap: int,
) -> list[Request]:
    """Extra expansions for each problem's ``n_decisive`` most decisive probed nodes (decisiveness > 0; ties to the
    higher-valued prefix), most decisive first, as many as the budget pays for."""
    by_tree: dict[int, list[tuple[float, tuple[float, ...], int]]] = {}
    for r, nodes in zip(requests, new, strict=True):
        vals = [c.value for c in nodes if c.value is not None]
        d = decisive(vals)
        if d > 0:
            by_tree.setdefault(r.tree, []).append(
                (d, path_key(trees[r.tree], trees[r.tree].nodes[r.node]), r.node)
            )
    out: list[Request] = []
    for i, ranked in by_tree.items():
        ranked.sort(key=lambda x: (x[0], x[1]), reverse=True)
        chosen = ranked[:n_decisive]
        rows = budgets[i].affordable(len(chosen) * extra, cap)
        for j, (_, _, node) in enumerate(chosen[: -(-rows // extra)]):
            out.append(Request(i, node, min(extra, rows - j * extra), cap))
    return out


# ---------------------------------------------------------------------- the algorithms
def vas_decode(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    samples: int = 8,
    beta: float = 1.0,
    stochastic: bool = False,
    aggregate: Aggregate = best_score,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Value-augmented sampling at the step level (after Han et al. 2024, "Value Augmented Sampling for Language
    Model Alignment and Personalization").

    One path per problem. At each step the frozen policy proposes ``samples`` candidate steps (all problems in one
    batched call); the scorer values each partial path; the step taken is the argmax over candidates of
    ``mean token logprob + beta · value`` (:class:`ValueAugmentedPick`), or, with ``stochastic=True``, a draw
    ∝ exp of that score. ``beta`` trades the policy's preference against the value: 0 follows the policy's most
    likely sample, large values follow the scorer. The path ends at an answer, EOS, a cut step, ``max_depth``, or
    when the budget cannot pay for one more step; with no finished path, ``aggregate`` picks among the terminal
    candidates seen on the way.

    Departures: VAS works at the token level, reweighting the base policy's top-k next tokens by
    ``exp(beta · Q(s, a))`` with a value network trained on the frozen policy's samples; here the unit is a step,
    the candidates are sampled steps (so the base policy's probability already enters through sampling; the logprob
    term adds it again, scaled against ``beta``), the value is any :class:`Reward` on the partial path (the exact
    step verifier needs no training), and the default pick is the deterministic argmax (the paper samples from the
    augmented distribution; ``stochastic=True`` does). The budget is a hard cap in generated tokens.
    """
    return _value_guided_decode(
        problems,
        policy,
        scorer,
        budget,
        algorithm="vas",
        width=1,
        probe=samples,
        extra=0,
        n_decisive=0,
        decisive=sibling_spread,
        pick=ValueAugmentedPick(beta, stochastic=stochastic),
        aggregate=aggregate,
        temperature=temperature,
        max_step_tokens=max_step_tokens,
        max_depth=max_depth,
        seed=seed,
        answer_fn=answer_fn,
        knobs={"samples": samples, "beta": beta, "stochastic": stochastic},
    )


def ved_decode(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    width: int = 2,
    probe: int = 4,
    extra: int = 4,
    n_decisive: int = 1,
    decisive: Decisiveness = sibling_spread,
    aggregate: Aggregate = best_score,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Value-guided efficient decoding, VED (Jiang, Huang et al. 2026, "Spend Search Where It Pays: Value-Guided
    Structured Sampling and Optimization for Generative Recommendation", the decoding half of V-STAR).

    Keeps the ``width`` highest-value prefixes per problem ("deepen high-potential prefixes"). Each round, every
    kept prefix is expanded ``probe`` times and the children are scored; then the prefixes whose children's values
    disagree most (``decisive``, default :func:`sibling_spread`: the branching decision there changes the value)
    are the decisive nodes: the ``n_decisive`` most decisive ones with decisiveness > 0 get ``extra`` more samples,
    and only they do. The next frontier is the best ``width`` children by (value, cumulative logprob); picked
    terminals are finished paths and ``aggregate`` (default: best value) picks the answer among them.

    Departures: V-STAR decodes item identifiers (a few semantic-ID tokens) with a learned value model under a
    latency budget; here a node is a reasoning step, the value is any :class:`Reward` on the partial path, and the
    budget is a hard cap in generated tokens. The decisiveness rule and the knob defaults are ours (the paper's
    abstract names the idea: find decisive nodes by value, deepen the high-potential prefixes). Extra samples cost a
    second batched engine call per round. Note that with a 0/1 verifier a node whose probes all fail has spread 0
    and gets no extra samples: decisiveness targets choices that matter, not prefixes that need rescue.
    """
    return _value_guided_decode(
        problems,
        policy,
        scorer,
        budget,
        algorithm="ved",
        width=width,
        probe=probe,
        extra=extra,
        n_decisive=n_decisive,
        decisive=decisive,
        pick=top_by_value,
        aggregate=aggregate,
        temperature=temperature,
        max_step_tokens=max_step_tokens,
        max_depth=max_depth,
        seed=seed,
        answer_fn=answer_fn,
        knobs={
            "width": width,
            "probe": probe,
            "extra": extra,
            "n_decisive": n_decisive,
            "decisive": decisive.__name__,
        },
    )
