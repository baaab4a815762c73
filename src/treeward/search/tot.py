"""Tree of Thoughts: breadth-first and depth-first search over reasoning steps, guided by a scorer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from treeward.engine.base import Policy
from treeward.rewards.base import Reward
from treeward.search.beam import BeamPool, beam_rounds
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
    path_key,
    snapshot,
)
from treeward.tree import Node, Problem, Tree

__all__ = ["keep_passing", "tot_bfs", "tot_dfs"]


def _passes(node: Node, threshold: float | None) -> bool:
    """A scored node passes when its value reaches ``threshold``; an unscored one is never pruned (it ranks last)."""
    return threshold is None or node.value is None or node.value >= threshold


def keep_passing(
    tree: Tree, pool: BeamPool, candidates: Sequence[Node], *, threshold: float | None
) -> list[Node]:
    """ToT-BFS's selection (a :data:`~treeward.search.beam.KeepRule`): of the candidates that pass ``threshold``,
    the best ``width`` (b) by :func:`~treeward.search.core.path_key`. Unlike beam search's rule, finished
    solutions do not take slots: every depth keeps up to b states."""
    passing = [c for c in candidates if _passes(c, threshold)]
    return sorted(passing, key=partial(path_key, tree), reverse=True)[: pool.width]


def tot_bfs(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    breadth: int = 5,
    samples: int = 5,
    threshold: float | None = None,
    aggregate: Aggregate = best_score,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Tree of Thoughts, breadth-first (Yao et al. 2023, "Tree of Thoughts: Deliberate Problem Solving with Large
    Language Models", Algorithm 1, ToT-BFS).

    Per depth, every kept state is expanded ``samples`` times (k, the "sample" thought generator), all states of all
    problems in one batched engine call; every new state is evaluated by ``scorer`` (the state evaluator V); states
    whose value is below ``threshold`` are pruned; the best ``breadth`` (b) of the rest are kept, ranked by (value,
    cumulative logprob). This is the round of :func:`~treeward.search.beam.beam_rounds`, with one pool of width b
    per problem and :func:`keep_passing` as its selection rule. A kept state that is terminal (an answer, EOS, or
    cut) is a finished solution and leaves the frontier. ``aggregate`` picks the answer among finished solutions
    (default: the best-valued, as ToT outputs the best final state). Defaults b = 5 and k = 5 are the paper's
    Game-of-24 breadth and creative-writing sample count.

    Departures: the paper's evaluator is the LM itself (value or vote prompts) and its depth is fixed per task; here
    the evaluator is any :class:`Reward` on the partial path, and depth varies (a path ends when it answers, up to
    ``max_depth``). Selection is greedy (the paper's default; its sampled selection is not implemented). The value
    threshold (the paper's DFS pruning rule, off by default here) may also prune BFS candidates. The budget is a hard
    cap in generated tokens: when it runs short, fewer states are expanded (best first), the last with fewer than
    ``samples`` samples.
    """
    if breadth < 1 or samples < 1:
        raise SearchError(f"breadth and samples must be ≥ 1, got {breadth} and {samples}")
    if max_depth < 1:
        raise SearchError(f"max_depth must be ≥ 1, got {max_depth}")
    check_budget(budget, max_step_tokens, "step")
    trees = init_trees(problems, policy, "tot_bfs")
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    pools = [BeamPool(i, breadth, [t.root]) for i, t in enumerate(trees)]
    beam_rounds(
        policy,
        scorer,
        trees,
        budgets,
        pools,
        expansions=samples,
        lookahead=0,
        temperature=temperature,
        max_step_tokens=max_step_tokens,
        max_depth=max_depth,
        seed=seed,
        answer_fn=answer_fn,
        keep=partial(keep_passing, threshold=threshold),
    )
    for t, p in zip(trees, pools, strict=True):
        t.metadata.update(
            {
                "breadth": breadth,
                "samples": samples,
                "threshold": threshold,
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
                "finished": len(p.finished),
                "unfinished_states": len(p.live),
            }
        )
    return finish(policy, trees, [p.finished for p in pools], aggregate, before)


@dataclass
class _DFS:
    """Depth-first state of one problem: the stack of states still to try (best on top) and the counters."""

    stack: list[Node]
    last: int | None = None  # the node expanded last; expanding a node that is not its child is a backtrack
    backtracks: int = 0
    expansions: int = 0
    solution: Node | None = None
    stopped: str = ""  # why the search of this problem ended
    seen: list[Node] = field(default_factory=list)  # every terminal found (the fallback answer's candidates)


def tot_dfs(
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Reward,
    budget: int,
    *,
    samples: int = 5,
    threshold: float = 0.5,
    max_backtracks: int | None = None,
    aggregate: Aggregate = best_score,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    max_depth: int = 12,
    seed: int = 0,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Tree of Thoughts, depth-first (Yao et al. 2023, "Tree of Thoughts: Deliberate Problem Solving with Large
    Language Models", Algorithm 2, ToT-DFS).

    Each problem keeps a stack of states. A round pops the top state and expands it ``samples`` times (k); the
    children are evaluated by ``scorer``; children whose value is below ``threshold`` (v_th) are pruned and the rest
    are pushed in value order (best on top, ties by cumulative logprob), so the next round explores the best child
    first. When no child survives, the next pop returns to an earlier sibling or an ancestor's sibling: a backtrack.
    A problem's search ends at the first terminal child whose value passes the threshold (its answer is the
    result), when its stack is exhausted, after ``max_backtracks`` backtracks, or when the budget cannot pay for one
    more expansion; without a passing solution, ``aggregate`` (default: best value) picks among every terminal found.
    States at ``max_depth`` are not expanded (a dead end).

    DFS is sequential within a problem, but every round advances all live problems by one expansion in one batched
    engine call and one scorer call.

    Departures: the paper's evaluator is the LM (value prompts) and its DFS was run on crosswords with a task-specific
    threshold and a cap of 100 DFS steps; here the evaluator is any :class:`Reward` on the partial path, the default
    threshold 0.5 suits scores in [0, 1] (the exact step verifier's 0/1), the cap is on backtracks (unbounded by
    default; the budget bounds the search), and a terminal path must itself pass the threshold to end the search. An
    unscored child (the scorer failed) is never pruned and is tried last; an unscored terminal never ends the search.
    """
    if samples < 1:
        raise SearchError(f"samples must be ≥ 1, got {samples}")
    if max_backtracks is not None and max_backtracks < 0:
        raise SearchError(f"max_backtracks must be ≥ 0 or None, got {max_backtracks}")
    if max_depth < 1:
        raise SearchError(f"max_depth must be ≥ 1, got {max_depth}")
    check_budget(budget, max_step_tokens, "step")
    trees = init_trees(problems, policy, "tot_dfs")
    budgets = [Budget(budget) for _ in trees]
    before = snapshot(policy, trees)
    states = [_DFS(stack=[t.root]) for t in trees]
    rnd = 0
    while True:
        requests: list[Request] = []
        with policy.ledger.timed("select"):
            for i, st in enumerate(states):
                if st.stopped:
                    continue
                node = _next_state(st, max_depth)
                if node is None:
                    st.stopped = "exhausted"
                    continue
                if st.last is not None and node.parent != st.last:
                    st.backtracks += 1
                    if max_backtracks is not None and st.backtracks > max_backtracks:
                        st.stopped = "max_backtracks"
                        continue
                m = budgets[i].affordable(samples, max_step_tokens)
                if m == 0:
                    st.stopped = "budget"
                    continue
                st.last = node.id
                st.expansions += 1
                requests.append(Request(i, node.id, m, max_step_tokens))
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
            salt=rnd,
        )
        with policy.ledger.timed("select"):
            for r, nodes in zip(requests, new, strict=True):
                st = states[r.tree]
                ranked = sorted(nodes, key=partial(path_key, trees[r.tree]), reverse=True)
                st.seen.extend(c for c in ranked if c.terminal)
                solved = [c for c in ranked if c.terminal and c.value is not None and _passes(c, threshold)]
                if solved:
                    st.solution, st.stopped = solved[0], "solved"
                    continue
                st.stack.extend(reversed([c for c in ranked if not c.terminal and _passes(c, threshold)]))
        rnd += 1
    candidates = [[st.solution] if st.solution is not None else st.seen for st in states]
    for t, st in zip(trees, states, strict=True):
        t.metadata.update(
            {
                "samples": samples,
                "threshold": threshold,
                "max_backtracks": max_backtracks,
                "budget": budget,
                "aggregate": aggregate.__name__,
                "temperature": temperature,
                "max_step_tokens": max_step_tokens,
                "max_depth": max_depth,
                "seed": seed,
                "expansions": st.expansions,
                "backtracks": st.backtracks,
                "solved": st.solution is not None,
                "stopped": st.stopped or "budget",
            }
        )
    return finish(policy, trees, candidates, aggregate, before)


def _next_state(st: _DFS, max_depth: int) -> Node | None:
    """Pop the next state to expand (skipping states at ``max_depth``), or ``None`` when the stack is empty."""
    while st.stack:
        node = st.stack.pop()
        if node.depth < max_depth:
            return node
    return None
