"""Search primitives shared by every algorithm: budgets, batched expansion, scoring, selection, final choice.

An algorithm is a short loop over these pieces. Each piece works on *all problems at once*: ``expand`` sends the
frontier nodes of every problem to the engine in one batched call, ``score_paths`` sends every new path to the
scorer in one batch. Nothing here re-tokenises text: children are built from the token ids the engine returned.

Budgets are exact: :class:`Budget` counts generated tokens per problem, and a request never asks the engine for
more tokens than the problem has left (each row's ``max_new_tokens`` is reserved up front), so no algorithm can
exceed its budget.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from treeward.engine.base import Continuation, Counts, Ledger, Policy
from treeward.rewards.base import Reward, RewardResult, Sample, Status
from treeward.tree import Node, Problem, Tree

__all__ = [
    "AnswerFn",
    "Budget",
    "Request",
    "best_score",
    "check_budget",
    "expand",
    "expand_and_score",
    "extract_answer",
    "finish",
    "grade",
    "init_trees",
    "majority_vote",
    "node_seed",
    "path_key",
    "path_sample",
    "score_paths",
    "scored_tokens",
    "snapshot",
    "weighted_vote",
]

AnswerFn = Callable[[str], "str | None"]
_ANSWER = re.compile(r"Answer:\s*([^\n]+)")


def extract_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` in ``text`` (stripped), or ``None``: the default answer convention."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    ans = found[-1].strip()
    return ans or None


class SearchError(ValueError):
    """Invalid search arguments (budget, knobs, problems)."""


@dataclass
class Budget:
    """Generated-token budget of one problem. ``reserve`` is exact: it never lets ``spent`` pass ``total``."""

    total: int
    spent: int = 0

    def __post_init__(self) -> None:
        if self.total <= 0:
            raise SearchError(f"budget must be a positive number of generated tokens, got {self.total}")

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def affordable(self, rows: int, cap: int) -> int:
        """How many of ``rows`` continuations of up to ``cap`` tokens each the remaining budget can pay for."""
        return min(rows, self.remaining // cap) if cap > 0 else rows


def check_budget(budget: int, cap: int, unit: str) -> None:
    """A budget must be positive and pay for at least one ``unit`` of ``cap`` tokens."""
    if budget <= 0:
        raise SearchError(f"budget must be a positive number of generated tokens, got {budget}")
    if budget < cap:
        raise SearchError(f"budget {budget} is smaller than one {unit}'s cap of {cap} tokens")


@dataclass(frozen=True)
class Request:
    """Expand node ``node`` of tree ``tree`` with ``n`` samples of at most ``max_new_tokens`` tokens each.

    ``salt`` keys the draws (see :func:`expand`); ``None`` takes the ``salt`` of the :func:`expand` call.
    """

    tree: int
    node: int
    n: int
    max_new_tokens: int
    salt: int | None = None


def node_seed(seed: int, problem_id: str, node_id: int, salt: int = 0) -> int:
    """A stable per-node seed: the same (seed, problem, node) gives the same draws in any batch."""
    return zlib.crc32(f"{seed}:{problem_id}:{node_id}:{salt}".encode()) & 0x7FFFFFFF


def init_trees(problems: Sequence[Problem], policy: Policy, algorithm: str) -> list[Tree]:
    """One root-only tree per problem; problem ids must be unique (they key the compute ledger)."""
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SearchError(f"problem ids must be unique; {dup!r} appears more than once")
    return [Tree.new(p, policy.encode_prompt(p.prompt), algorithm=algorithm) for p in problems]


class _Delimiters:
    """Which token ids end a step (their text contains the delimiter), memoised per token."""

    def __init__(self, policy: Policy, delimiter: str) -> None:
        self._policy, self._delim, self._memo = policy, delimiter, dict[int, bool]()

    def __call__(self, token: int) -> bool:
        if token not in self._memo:
            self._memo[token] = self._delim in self._policy.decode([token])
        return self._memo[token]


def _split_steps(c: Continuation, ends_step: Callable[[int], bool]) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the steps in a continuation (a span ends with a delimiter token)."""
    spans, start = [], 0
    for i, t in enumerate(c.token_ids):
        if ends_step(t):
            spans.append((start, i + 1))
            start = i + 1
    if start < len(c.token_ids):
        spans.append((start, len(c.token_ids)))
    return spans


def expand(
    policy: Policy,
    trees: Sequence[Tree],
    budgets: Sequence[Budget],
    requests: Sequence[Request],
    *,
    temperature: float,
    seed: int,
    stop: str | None = "\n",
    answer_fn: AnswerFn = extract_answer,
    salt: int = 0,
) -> list[list[Node]]:
    """Expand every requested node in one batched engine call; returns the new nodes per request.

    With ``stop`` set each continuation becomes one child (one step). With ``stop=None`` (whole solutions, as
    best-of-N samples them) a continuation is cut into a chain of step nodes at newline tokens, and the returned
    list holds the *last* node of each chain. The last node of a chain is terminal when it ended at EOS, was cut
    by the token cap, or contains an answer; its ``answer`` is ``answer_fn`` of that last node's text.

    Draws: sample ``j`` of a request is the ``k``-th draw of (its node, its salt), seeded by
    :func:`node_seed` ``(seed, problem, node, salt·1000003 + k)``, where ``k = j`` plus the samples that earlier
    requests of the same call asked of the same node with the same salt. So two requests for one node in one call
    draw different samples (the same ones as one request for both), a node's draws never depend on other nodes
    or problems in the batch, and a search that expands a node again in a later round gives that round its own
    salt (e.g. the round number) to draw new samples.
    """
    if not requests:
        return []
    for r in requests:
        b = budgets[r.tree]
        if r.n * r.max_new_tokens > b.remaining:
            raise SearchError(
                f"request of {r.n}×{r.max_new_tokens} tokens exceeds problem {trees[r.tree].problem.id!r}'s "
                f"remaining budget {b.remaining}"
            )
        b.spent += r.n * r.max_new_tokens  # reserve; refunded below once lengths are known
    outs = _sample(policy, trees, requests, temperature=temperature, seed=seed, stop=stop, salt=salt)
    ends_step = _Delimiters(policy, "\n")
    new: list[list[Node]] = []
    for r, conts in zip(requests, outs, strict=True):
        tree, budget = trees[r.tree], budgets[r.tree]
        budget.spent -= r.n * r.max_new_tokens - sum(len(c.token_ids) for c in conts)
        created = []
        for c in conts:
            spans = [(0, len(c.token_ids))] if stop is not None else _split_steps(c, ends_step)
            parent = r.node
            node: Node | None = None
            for k, (lo, hi) in enumerate(spans):
                last = k == len(spans) - 1
                ids = c.token_ids[lo:hi]
                node = tree.add(
                    parent,
                    text=policy.decode(ids) if not (last and stop is not None) else c.text,
                    token_ids=ids,
                    logprobs=c.logprobs[lo:hi],
                    finish_reason=c.finish_reason if last else "stop",
                )
                parent = node.id
            if node is None:  # an empty continuation (a zero-token cap): record it as a cut step
                node = tree.add(r.node, text="", token_ids=(), finish_reason=c.finish_reason)
            answer = answer_fn(node.text)
            if answer is not None or c.finish_reason in ("eos", "length"):
                node.terminal = True
                node.answer = answer
            created.append(node)
        new.append(created)
    return new


def _sample(
    policy: Policy,
    trees: Sequence[Tree],
    requests: Sequence[Request],
    *,
    temperature: float,
    seed: int,
    stop: str | None,
    salt: int,
) -> list[list[Continuation]]:
    """One engine call for all requests. Each sample is drawn with its own seed as a separate row (the engine
    shares the prefix's KV between the rows); seeds as :func:`expand` says."""
    prefixes, caps, seeds, groups = [], [], [], []
    drawn: dict[tuple[int, int, int], int] = defaultdict(int)  # (tree, node, salt) -> draws so far this call
    for r in requests:
        t = trees[r.tree]
        prefix = t.prefix_ids(r.node)
        s = salt if r.salt is None else r.salt
        first = drawn[r.tree, r.node, s]
        drawn[r.tree, r.node, s] += r.n
        for j in range(r.n):
            prefixes.append(prefix)
            caps.append(r.max_new_tokens)
            seeds.append(node_seed(seed, t.problem.id, r.node, s * 1_000_003 + first + j))
            groups.append(t.problem.id)
    flat = policy.expand(
        prefixes, n=1, max_new_tokens=caps, temperature=temperature, stop=stop, seeds=seeds, groups=groups
    )
    out, i = [], 0
    for r in requests:
        out.append([flat[i + j][0] for j in range(r.n)])
        i += r.n
    return out


def expand_and_score(
    policy: Policy,
    scorer: Reward,
    trees: Sequence[Tree],
    budgets: Sequence[Budget],
    requests: Sequence[Request],
    *,
    temperature: float,
    seed: int,
    stop: str | None = "\n",
    answer_fn: AnswerFn = extract_answer,
    salt: int = 0,
) -> list[list[Node]]:
    """:func:`expand` the requests in one engine call, then score every new node's path in one scorer call (timed
    as the "score" phase, its scorer tokens booked in the policy's ledger); returns the new nodes per request, as
    :func:`expand` does."""
    new = expand(
        policy,
        trees,
        budgets,
        requests,
        temperature=temperature,
        seed=seed,
        stop=stop,
        answer_fn=answer_fn,
        salt=salt,
    )
    with policy.ledger.timed("score"):
        score_paths(
            scorer,
            trees,
            [(r.tree, c) for r, nodes in zip(requests, new, strict=True) for c in nodes],
            ledger=policy.ledger,
        )
    return new


def path_key(tree: Tree, node: Node) -> tuple[float, float, int]:
    """Ranking key of a path (higher is better): path score, then cumulative logprob, then the earlier node.

    Unscored paths rank last. The logprob is rounded to 1e-3 so that float noise between batch layouts (~1e-6)
    cannot reorder paths that tie, such as two samples of the same step: with or without the prefix cache, the same
    seed keeps the same beams.
    """
    score = -math.inf if node.value is None else node.value
    return (score, round(sum(n.logprob for n in tree.path(node.id)), 3), -node.id)


def path_sample(tree: Tree, node: Node) -> Sample:
    """The reward input for the path from the root to ``node``: its steps, the problem, partial unless terminal."""
    steps = tuple(tree.steps(node.id))
    return Sample(
        prompt=tree.problem.prompt,
        response="".join(steps),
        steps=steps,
        reference=tree.problem.answer,
        metadata={"problem": tree.problem, **tree.problem.metadata},
        group_id=tree.problem.id,
        partial=not node.terminal,
    )


def scored_tokens(result: RewardResult) -> int:
    """Tokens a model-based scorer computed for one result: its ``info["scored_tokens"]``, 0 when absent.

    The contract for model-based rewards: put the number of tokens the scoring model ran (prefill and decode) for
    this sample in ``info["scored_tokens"]`` as a non-negative ``int``; anything else is a :class:`ValueError`.
    """
    n = result.info.get("scored_tokens", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f'info["scored_tokens"] must be a non-negative int, got {n!r}')
    return n


def _book_scored(ledger: Ledger, groups: Sequence[str], results: Sequence[RewardResult]) -> None:
    """Book each result's :func:`scored_tokens` to its group (the problem id), one booking per group. Every
    result is checked before anything is booked."""
    per_group: dict[str, int] = defaultdict(int)
    for g, res in zip(groups, results, strict=True):
        per_group[g] += scored_tokens(res)
    for g, n in per_group.items():
        if n:
            ledger.book(g, scored=n)


def grade(trees: Sequence[Tree], outcome: Reward, *, ledger: Ledger | None = None) -> None:
    """Write ``outcome`` (e.g. an exact-answer check against the reference) on every terminal node.

    Evaluation, not search: searches never see references. A failed check leaves ``outcome`` at ``None`` and
    records the reward's status in the node's ``metadata["outcome_status"]``. With a ``ledger``, the tokens a
    model-based ``outcome`` reports (:func:`scored_tokens`) are booked per problem as ``scored``; by default they
    are not, since grading is not part of the search's compute.
    """
    refs = [(t, n) for t in trees for n in t.terminals()]
    if not refs:
        return
    results = outcome([path_sample(t, n) for t, n in refs])
    if ledger is not None:
        _book_scored(ledger, [t.problem.id for t, _ in refs], results)
    for (_, n), res in zip(refs, results, strict=True):
        n.outcome = res.score
        if res.status != Status.OK:
            n.metadata["outcome_status"] = res.status.value


def score_paths(
    scorer: Reward,
    trees: Sequence[Tree],
    refs: Sequence[tuple[int, Node]],
    *,
    ledger: Ledger | None = None,
    sample: Callable[[Tree, Node], Sample | None] = path_sample,
    step_rewards: bool = True,
) -> None:
    """Score the paths ending at ``refs`` (tree index, node) in one batch and write the results on the nodes.

    The path's ``score`` becomes the end node's ``value``; each ``step_scores[i]`` becomes the ``reward`` of the
    path's i-th step node when that node has none yet. A missing score is recorded as the node's ``status``; a
    scorer that raises marks the whole batch ``exec_error`` (with the error in ``metadata``) instead of ending the
    search, and a scorer whose ``step_scores`` do not match the steps marks the node ``parse_error``.

    With a ``ledger`` (searches pass their policy's), the tokens a model-based scorer reports per result
    (:func:`scored_tokens`) are booked as ``scored``, summed per problem. A result whose ``info["scored_tokens"]``
    is not a non-negative int breaks the scorer's contract: the batch is handled as a scorer that raised (nothing
    is booked).

    ``sample`` builds the reward's input for a path (default :func:`path_sample`; ``None`` skips the path, e.g. a
    segment rollout before its first complete line). With ``step_rewards=False`` the result's ``step_scores`` are
    not written on the step nodes (for samples whose steps are not the tree's nodes).
    """
    built = [(ti, node, smp) for ti, node in refs if (smp := sample(trees[ti], node)) is not None]
    if not built:
        return
    refs = [(ti, node) for ti, node, _ in built]
    samples = [smp for _, _, smp in built]
    try:
        results: list[RewardResult] = scorer(samples)
        if len(results) != len(samples):
            raise ValueError(f"scorer returned {len(results)} results for {len(samples)} samples")
        if ledger is not None:
            _book_scored(ledger, [trees[ti].problem.id for ti, _ in refs], results)
    except Exception as e:  # a failing scorer is recorded on the nodes, the search goes on
        warnings.warn(
            f"scorer {getattr(scorer, 'name', scorer)!r} failed: {e!r}", RuntimeWarning, stacklevel=2
        )
        for _, node in refs:
            node.status = Status.EXEC_ERROR.value
            node.metadata["error"] = repr(e)
        return
    for (ti, node), s, res in zip(refs, samples, results, strict=True):
        node.value = res.score
        node.status = (
            res.status.value if res.status != Status.OK or res.score is not None else Status.NOT_APPLICABLE
        )
        if res.step_scores is not None and step_rewards:
            if len(res.step_scores) != len(s.steps):
                node.status = Status.PARSE_ERROR.value
                node.metadata["error"] = f"{len(res.step_scores)} step scores for {len(s.steps)} steps"
                continue
            for step_node, sc in zip(trees[ti].path(node.id)[1:], res.step_scores, strict=True):
                if step_node.reward is None:
                    step_node.reward = sc
        elif node.reward is None:
            node.reward = res.score


# ---------------------------------------------------------------------- final answer rules
Aggregate = Callable[[Tree, Sequence[Node]], "Node | None"]


def best_score(tree: Tree, candidates: Sequence[Node]) -> Node | None:
    """Naive best-of-N: the candidate with the highest path score (ties: higher cumulative logprob)."""
    answered = [n for n in candidates if n.answer is not None]
    return max(answered, key=lambda n: path_key(tree, n), default=None)


def majority_vote(tree: Tree, candidates: Sequence[Node]) -> Node | None:
    """Self-consistency (Wang et al. 2023): the most frequent answer; its best-scored path represents it."""
    return _vote(tree, candidates, lambda n: 1.0)


def weighted_vote(tree: Tree, candidates: Sequence[Node]) -> Node | None:
    """Weighted best-of-N (Li et al. 2023; search-and-learn): the answer whose paths' scores sum highest."""
    return _vote(tree, candidates, lambda n: max(0.0, n.value) if n.value is not None else 0.0)


def _vote(tree: Tree, candidates: Sequence[Node], weight: Callable[[Node], float]) -> Node | None:
    totals: dict[str, float] = defaultdict(float)
    for n in candidates:
        if n.answer is not None:
            totals[n.answer] += weight(n)
    if not totals:
        return None
    # ties between answers break toward the answer of the best single path
    best = max(totals.values())
    winners = {a for a, v in totals.items() if v == best}
    return best_score(tree, [n for n in candidates if n.answer in winners])


def finish(
    policy: Policy,
    trees: Sequence[Tree],
    candidates: Sequence[Sequence[Node]],
    aggregate: Aggregate,
    before: Sequence[Counts],
) -> list[Tree]:
    """Choose each tree's answer with ``aggregate`` and attach the compute booked for its problem."""
    for tree, cands, b in zip(trees, candidates, before, strict=True):
        chosen = aggregate(tree, cands)
        tree.chosen = None if chosen is None else chosen.id
        tree.answer = None if chosen is None else chosen.answer
        now = policy.ledger.group(tree.problem.id)
        tree.ledger = {
            "generated": now.generated - b.generated,
            "computed": now.computed - b.computed,
            "reused": now.reused - b.reused,
            "calls": now.calls - b.calls,
            "scored": now.scored - b.scored,
        }
    return list(trees)


def snapshot(policy: Policy, trees: Sequence[Tree]) -> list[Counts]:
    """The ledger counts of each tree's problem now (to report what one search adds)."""
    out = []
    for t in trees:
        g = policy.ledger.group(t.problem.id)
        out.append(Counts(g.generated, g.computed, g.reused, g.calls, g.scored))
    return out
