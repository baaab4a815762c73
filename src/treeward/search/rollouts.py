"""Tree rollouts for RL: a rollout tree per prompt with shared prefixes and a fixed leaf budget.

Where a search looks for one good answer, a rollout sampler gives a trainer a *group*: exactly ``leaves``
finished completions per prompt (GRPOTrainer's ``num_generations``), grown as a tree so that shared prefixes
are generated (and prefilled, through the engine's prefix KV reuse) once. Every draw goes through
:func:`~treeward.search.core.expand`, batched across all problems.

How a tree grows (one round = one batched engine call per temperature and salt, for every problem at once):

* Every live *tip* owes a number of finished leaves, its **quota** (the root owes ``leaves``). A
  :class:`BranchRule` splits a tip's quota among the children it samples this round: ``[q]`` continues the
  path with one child, ``[2, 2]`` branches into two children that owe two leaves each, a zero share (SLATE)
  samples a one-step sibling that is never continued.
* A child that finishes (an answer, EOS, a step cut by its token cap, or ``max_depth`` reached) is one
  finished leaf; whatever else it owed, and the whole quota of a child that ``early_stop`` judges dead, is
  **owed** again: the rule's :meth:`~BranchRule.fork_point` names the node on its path where the owed leaves
  are sampled anew next round (with ``semantic_key``, the ancestor whose children disagree most; with
  probability ``restart_eps``, the root).
* The sum of the live quotas, the owed leaves and the finished leaves is always ``leaves``, and the loop runs
  until nothing is owed, so every tree ends with exactly ``leaves`` finished leaves (:func:`finished_leaves`).

Compositions: :func:`tree_rollouts` (TreePO-style fixed branching or TreeRL-style branching at uncertain
steps), :func:`slate_rollouts` (SLATE's truncated step-level sampling is a branch rule with zero shares), and
:func:`thicken` (Math-Shepherd completions from thin nodes are the same loop with every quota split into
ones).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal, Protocol

from treeward.engine.base import Policy
from treeward.rewards.base import Reward, Sample, Status
from treeward.search.core import (
    AnswerFn,
    Budget,
    Request,
    SearchError,
    expand,
    extract_answer,
    finish,
    init_trees,
    majority_vote,
    node_seed,
    path_sample,
    score_paths,
    snapshot,
)
from treeward.tree import Node, Problem, Tree

__all__ = [
    "BranchRule",
    "EntropyBranching",
    "FixedBranching",
    "SlateBranching",
    "even_split",
    "finished_leaves",
    "path_surprise",
    "slate_rollouts",
    "step_surprise",
    "thicken",
    "tree_rollouts",
]

Branching = Literal["step", "segment"]
SemanticKey = Callable[[str], Hashable]
"""The meaning of a step's text: two steps with equal keys say the same thing (e.g. the number a step
computes, or a cluster id from an embedding model)."""
DepthTemperature = Callable[[int], float] | tuple[float, float]
"""Temperature by level (0 for the root's children): a function, or a ``(start, end)`` pair interpolated
linearly from level 0 to level ``max_depth - 1``."""

_UNLIMITED = 1 << 62  # rollouts have a leaf budget, not a token budget: Budget only counts what they generate
# thicken's draws use salts no search uses, so its completions never repeat a search's own samples
_THICKEN_SALT = 1 << 16
_RESTART_SALT = 1 << 20  # the ε coin flips, apart from every draw


def even_split(quota: int, k: int) -> list[int]:
    """``quota`` split into ``k`` shares as even as possible, the larger shares first: ``even_split(7, 2) ==
    [4, 3]``."""
    if k < 1 or quota < 0:
        raise SearchError(f"cannot split a quota of {quota} into {k} shares")
    return [quota // k + (1 if i < quota % k else 0) for i in range(k)]


def step_surprise(node: Node) -> float:
    """Uncertainty of a step: the largest surprise ``-log p`` of its sampled tokens (0 without logprobs).

    The engine returns the log-probability of the sampled token only, so the surprise of that token stands in
    for the entropy of the distribution it came from (its expectation over draws *is* that entropy)."""
    return max((-lp for lp in node.logprobs), default=0.0)


def path_surprise(tree: Tree, node: Node) -> float:
    """The largest :func:`step_surprise` of the steps from the root to ``node`` (0 at the root)."""
    return max((step_surprise(n) for n in tree.path(node.id)[1:]), default=0.0)


class BranchRule(Protocol):
    """Where a rollout tree branches. Both methods are pure functions of the tree."""

    def split(self, tree: Tree, tip: Node, quota: int, level: int, factor: int) -> list[int]:
        """Shares of ``quota`` for the children ``tip`` samples this round, one share per child, summing to
        ``quota`` (a zero share is a one-step sibling that is never continued). ``level`` counts the
        expansions from the root to ``tip`` (0 at the root); ``factor`` is the rollout's ``branch_factor``."""
        ...

    def fork_point(self, tree: Tree, node: Node) -> Node:
        """The node, a strict ancestor of ``node``, from which the leaves that finished or dead ``node`` still
        owes are sampled anew."""
        ...


@dataclass(frozen=True)
class FixedBranching:
    """TreePO's fixed divergence (arXiv 2508.17445; its rollout's ``fixed_step_width``): from level ``start``
    on, every tip that owes more than one leaf branches into ``min(factor, quota)`` children with even shares;
    before ``start`` paths run as chains, so the first ``start`` steps are shared by every leaf. Owed leaves
    are re-sampled from the parent of the node that owed them (TreePO's fallback by one segment).

    ``max_surprise``: a tip whose :func:`path_surprise` (the most surprising token of its path so far) is above
    it runs as a chain, so that branching is spent on paths the policy wrote confidently: a path with a
    surprising step is likely wrong already, and so is every leaf below it, branched or not. After TreePO's
    probability-driven divergence (its ``inverse_node_logprob_weighted_div``: more branches for paths of higher
    log-probability). Departures: TreePO shares one divergence budget among a level's live paths by a softmax
    of their last segment's mean log-probability; here each tip decides alone, from its own path, with a hard
    threshold on the largest token surprise. The decision never looks at the children a tip samples, so it
    does not tilt which next step a leaf takes (a leaf is still a policy sample; only which leaves share a
    prefix changes); the default (``inf``) is plain TreePO."""

    start: int = 0
    max_surprise: float = math.inf

    def __post_init__(self) -> None:
        if self.start < 0:
            raise SearchError(f"FixedBranching.start is a level ≥ 0, got {self.start}")
        if math.isnan(self.max_surprise) or self.max_surprise < 0:
            raise SearchError(
                f"FixedBranching.max_surprise is a surprise (-log p) ≥ 0 or inf, got {self.max_surprise}"
            )

    def split(self, tree: Tree, tip: Node, quota: int, level: int, factor: int) -> list[int]:
        if level < self.start or quota == 1:
            return [quota]
        if self.max_surprise < math.inf and path_surprise(tree, tip) > self.max_surprise:
            return [quota]
        return even_split(quota, min(factor, quota))

    def fork_point(self, tree: Tree, node: Node) -> Node:
        return _parent(tree, node)


@dataclass(frozen=True)
class EntropyBranching:
    """TreeRL's entropy-guided tree search (EPTree; Hou et al., ACL 2025), at step boundaries: the root
    samples ``min(factor, quota)`` chains (EPTree's ``M`` initial chains), every path runs as a chain, and
    when a path finishes owing more leaves they are forked from just before the most uncertain step of its
    path (the step with the largest :func:`step_surprise`; ties go to the deeper step, which shares more).

    Departures: EPTree forks at the highest-entropy *tokens* of all chains after each round of completions;
    here a fork happens at the step boundary before the uncertain step (nodes are steps and are never split),
    per path, as soon as that path finishes, and uncertainty is the sampled token's surprise rather than the
    entropy."""

    def split(self, tree: Tree, tip: Node, quota: int, level: int, factor: int) -> list[int]:
        return even_split(quota, min(factor, quota)) if level == 0 else [quota]

    def fork_point(self, tree: Tree, node: Node) -> Node:
        steps = tree.path(node.id)[1:]
        most = max(range(len(steps)), key=lambda i: (step_surprise(steps[i]), i))
        return _parent(tree, steps[most])


@dataclass(frozen=True)
class SlateBranching:
    """SLATE's truncated step-level sampling (arXiv 2602.23440): every tip samples ``factor`` next steps from
    its prefix; the first (a plain policy sample) continues the path with the whole quota, the others are
    one-step siblings (share 0) that differ from it only at that step. Owed leaves are re-sampled from the
    parent."""

    def split(self, tree: Tree, tip: Node, quota: int, level: int, factor: int) -> list[int]:
        return [quota] + [0] * (factor - 1)

    def fork_point(self, tree: Tree, node: Node) -> Node:
        return _parent(tree, node)


_RULES: dict[str, BranchRule] = {"fixed": FixedBranching(), "entropy": EntropyBranching()}


def _parent(tree: Tree, node: Node) -> Node:
    if node.parent is None:
        raise SearchError("the root has no parent to fork from")
    return tree.nodes[node.parent]


def _semantic_fork(
    tree: Tree, node: Node, *, key: SemanticKey, fallback: Callable[[Tree, Node], Node]
) -> Node:
    """ROSE's semantic-entropy branching point ("reinforced efficient reasoning via semantically diverse
    explorations"): among the strict ancestors of ``node``, the
    one whose children's texts have the highest entropy of meanings (``key``); ties go to the deeper node.
    With no disagreement anywhere (every entropy 0), ``fallback`` decides."""
    best, best_h = None, 0.0
    for anc in tree.path(node.id)[:-1]:
        kids = tree.children(anc.id)
        counts = Counter(key(k.text) for k in kids)
        h = -sum(c / len(kids) * math.log(c / len(kids)) for c in counts.values()) if kids else 0.0
        if h > 1e-12 and h >= best_h:
            best, best_h = anc, h
    return best if best is not None else fallback(tree, node)


def finished_leaves(tree: Tree) -> list[Node]:
    """The completions of a rollout tree: its terminal nodes, less SLATE's one-step siblings."""
    return [n for n in tree.terminals() if not n.metadata.get("sibling")]


# ---------------------------------------------------------------------- the growth loop
@dataclass
class _Grower:
    """Growth state of one tree: live tips and what they owe, owed leaves waiting at fork points, levels."""

    tree: Tree
    tips: dict[int, int]  # live tip id -> leaves its subtree owes
    level: dict[int, int]  # node id -> expansions from the root to it (the step depth in step mode)
    forks: dict[int, int] = field(default_factory=dict)  # node id -> leaves to sample from it next round
    finished: list[Node] = field(default_factory=list)
    pruned: int = 0
    restarts: int = 0


@dataclass(frozen=True)
class _Settings:
    rule: BranchRule
    fork: Callable[[Tree, Node], Node]
    factor: int
    seed: int
    temperatures: tuple[float, ...]  # by level, [max_depth]
    segment: bool
    cap: int
    max_depth: int
    answer_fn: AnswerFn
    early_stop: Reward | None
    stop_below: float
    prune_limit: int
    restart_eps: float
    salt_base: int
    mark: tuple[tuple[str, object], ...]  # metadata set on every node the loop creates


def _coin(s: _Settings, tree: Tree, node_id: int, salt: int) -> bool:
    """A seeded ε coin: True with probability ``restart_eps``; the same (seed, problem, node, salt), the same
    flip."""
    if s.restart_eps <= 0.0:
        return False
    rng = random.Random(node_seed(s.seed, tree.problem.id, node_id, _RESTART_SALT + salt))
    return rng.random() < s.restart_eps


def _plan(g: _Grower, s: _Settings) -> list[tuple[int, list[int], bool]]:
    """This round's expansions of one tree: (node id, child shares, is a fork). Tips split by the rule (a
    branch other than the first goes to the root instead with probability ε), then owed leaves at fork
    points."""
    tree, out = g.tree, []
    tips, g.tips = g.tips, {}
    for nid, quota in tips.items():
        shares = s.rule.split(tree, tree.nodes[nid], quota, g.level[nid], s.factor)
        if not shares or sum(shares) != quota or min(shares) < 0:
            raise SearchError(
                f"{s.rule!r}.split returned {shares} for a quota of {quota}: shares must be ≥ 0 and sum to it"
            )
        kept = shares[:1]
        for i, share in enumerate(shares[1:], 1):
            if share > 0 and nid != 0 and _coin(s, tree, nid, i):
                g.forks[0] = g.forks.get(0, 0) + share
                g.restarts += 1
            else:
                kept.append(share)
        out.append((nid, kept, False))
    forks, g.forks = g.forks, {}
    out.extend((nid, even_split(m, min(s.factor, m)), True) for nid, m in forks.items())
    return out


def _current_line(tree: Tree, node: Node) -> str:
    """The text of the line ``node`` ends: its own text and that of its ancestors back to the last newline."""
    parts: list[str] = []
    for n in reversed(tree.path(node.id)[1:]):
        if parts and n.text.endswith("\n"):
            break
        parts.append(n.text)
    return "".join(reversed(parts))


def _settle_segment(tree: Tree, node: Node, answer_fn: AnswerFn) -> None:
    """A segment cut by its token cap is not the end of the solution; one that ended at EOS takes its answer
    from the whole last line, which may have started in an earlier segment."""
    if node.finish_reason == "length":
        node.terminal, node.answer = False, None
    elif node.terminal:
        node.answer = answer_fn(_current_line(tree, node))


def _line_sample(tree: Tree, node: Node) -> Sample | None:
    """The reward input for a segment path: its complete lines as the steps (segments cut lines in two), or
    ``None`` before the first complete line."""
    s = path_sample(tree, node)
    head = s.response[: s.response.rfind("\n") + 1]
    lines = tuple(ln + "\n" for ln in head.split("\n")[:-1])
    return replace(s, response=head, steps=lines) if lines else None


def _dead(node: Node, below: float) -> bool:
    """Early stop: an unparseable path, or one scored below the threshold (a scorer failure is no verdict)."""
    return node.status == Status.PARSE_ERROR.value or (node.value is not None and node.value < below)


def _grow(policy: Policy, growers: Sequence[_Grower], s: _Settings) -> None:
    """Run rounds until no tree has a live tip or owed leaves (see the module docstring)."""
    trees = [g.tree for g in growers]
    budgets = [Budget(_UNLIMITED) for _ in growers]
    owed_total = max((sum(g.tips.values()) + sum(g.forks.values()) for g in growers), default=0)
    # every round moves each lineage one level deeper; a new lineage starts only when a leaf finishes or a
    # branch is pruned (≤ owed_total + prune_limit times) or a split restarts at the root (≤ owed_total)
    bound = (3 * owed_total + s.prune_limit + 1) * (s.max_depth + 1)
    for _ in range(bound + 1):
        if not any(g.tips or g.forks for g in growers):
            return
        plans = [_plan(g, s) for g in growers]
        calls: dict[tuple[float, int], list[tuple[int, int, list[int], bool]]] = defaultdict(list)
        for gi, (g, plan) in enumerate(zip(growers, plans, strict=True)):
            for nid, shares, is_fork in plan:
                key = (s.temperatures[g.level[nid]], s.salt_base + len(g.tree.nodes[nid].children))
                calls[key].append((gi, nid, shares, is_fork))
        born: list[tuple[int, Node, int]] = []  # (tree index, child, share)
        # calls in a fixed order, so that the ids of a tree's new nodes never depend on the rest of the batch
        for (temperature, salt), entries in sorted(calls.items()):
            requests = [Request(gi, nid, len(shares), s.cap) for gi, nid, shares, _ in entries]
            new = expand(
                policy,
                trees,
                budgets,
                requests,
                temperature=temperature,
                seed=s.seed,
                stop=None if s.segment else "\n",
                answer_fn=s.answer_fn,
                salt=salt,
            )
            for (gi, nid, shares, is_fork), children in zip(entries, new, strict=True):
                born.extend(_adopt(growers[gi], nid, children, shares, is_fork, s, gi))
        _judge(policy, trees, growers, born, s)
        for gi, child, share in born:
            _settle(growers[gi], child, share, s)
    raise RuntimeError(f"tree rollouts did not finish within {bound} rounds (a bug: please report it)")


def _adopt(
    g: _Grower,
    nid: int,
    children: Sequence[Node],
    shares: Sequence[int],
    is_fork: bool,
    s: _Settings,
    gi: int,
) -> list[tuple[int, Node, int]]:
    """Record levels and marks on the new nodes of one request; returns the children that owe leaves."""
    tree, lvl, out = g.tree, g.level[nid] + 1, []
    for child, share in zip(children, shares, strict=True):
        for node in reversed(tree.path(child.id)):  # a segment is a chain of line nodes, all of one level
            if node.id == nid:
                break
            g.level[node.id] = lvl
            node.metadata.update(s.mark)
        if s.segment:
            _settle_segment(tree, child, s.answer_fn)
        if is_fork:
            child.metadata["fork"] = True
        if share == 0:
            child.metadata["sibling"] = True
        else:
            out.append((gi, child, share))
    return out


def _judge(
    policy: Policy,
    trees: Sequence[Tree],
    growers: Sequence[_Grower],
    born: Sequence[tuple[int, Node, int]],
    s: _Settings,
) -> None:
    """Score the new unfinished paths of trees that may still prune, in one batch (early stop)."""
    if s.early_stop is None:
        return
    refs = [(gi, c) for gi, c, _ in born if not c.terminal and growers[gi].pruned < s.prune_limit]
    with policy.ledger.timed("score"):
        score_paths(
            s.early_stop,
            trees,
            refs,
            ledger=policy.ledger,
            sample=_line_sample if s.segment else path_sample,
            step_rewards=not s.segment,
        )


def _settle(g: _Grower, child: Node, share: int, s: _Settings) -> None:
    """A new child becomes a finished leaf, a pruned branch or a live tip; what it still owes, a fork."""
    if child.terminal:
        g.finished.append(child)
        owed = share - 1
    elif s.early_stop is not None and g.pruned < s.prune_limit and _dead(child, s.stop_below):
        child.metadata["dead"] = True
        g.pruned += 1
        owed = share
    elif g.level[child.id] >= s.max_depth:
        child.terminal = True
        child.metadata["truncated"] = "max_depth"
        g.finished.append(child)
        owed = share - 1
    else:
        g.tips[child.id] = share
        owed = 0
    if owed:
        target = s.fork(g.tree, child)
        if target.id not in {n.id for n in g.tree.path(child.id)[:-1]}:
            raise SearchError(f"fork point {target.id} is not a strict ancestor of node {child.id}")
        if target.id != 0 and _coin(s, g.tree, child.id, 0):
            target = g.tree.root
            g.restarts += 1
        g.forks[target.id] = g.forks.get(target.id, 0) + owed


def _temperatures(
    temperature: float, depth_temperature: DepthTemperature | None, max_depth: int
) -> tuple[float, ...]:
    if depth_temperature is None:
        temps = [temperature] * max_depth
    elif isinstance(depth_temperature, tuple):
        start, end = depth_temperature
        span = max(1, max_depth - 1)
        temps = [start + (end - start) * level / span for level in range(max_depth)]
    else:
        temps = [float(depth_temperature(level)) for level in range(max_depth)]
    bad = [(lvl, t) for lvl, t in enumerate(temps) if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise SearchError(f"temperatures must be finite and ≥ 0; level {bad[0][0]} gets {bad[0][1]}")
    return tuple(temps)


# ---------------------------------------------------------------------- public compositions
def tree_rollouts(
    problems: Sequence[Problem],
    policy: Policy,
    *,
    leaves: int = 8,
    seed: int = 0,
    branching: Branching = "step",
    segment_tokens: int = 512,
    branch_factor: int = 2,
    temperature: float = 1.0,
    depth_temperature: DepthTemperature | None = None,
    branch_on: Literal["fixed", "entropy"] | BranchRule = "fixed",
    restart_eps: float = 0.0,
    semantic_key: SemanticKey | None = None,
    early_stop: Reward | None = None,
    stop_below: float = 0.5,
    max_depth: int = 12,
    max_step_tokens: int = 24,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """Tree rollouts with a fixed leaf budget: every tree ends with exactly ``leaves`` finished leaves
    (:func:`finished_leaves`), shared prefixes stored and generated once. Deterministic for a given ``seed``,
    and a tree does not depend on the other problems of the batch.

    A composition of the papers of the tree-RL family (see the module docstring for the loop):

    * **TreePO** (arXiv 2508.17445): ``branch_on="fixed"`` (:class:`FixedBranching`) branches every tip by
      ``branch_factor`` (TreePO's ``fixed_step_width``, default 2) until the quota is spread;
      ``branching="segment"`` grows fixed-length segments of ``segment_tokens`` tokens (TreePO's
      ``max_token_per_step``, 512) instead of steps; ``max_depth`` bounds the levels (steps or segments).
      ``early_stop``: dead branches (``early_stop`` scores the path below ``stop_below``, or cannot parse it)
      stop growing and their leaves are sampled anew at the rule's fork point.
      ``branch_on=FixedBranching(start=..., max_surprise=...)`` delays the first branching or keeps paths with a
      surprising step as chains (TreePO's probability-driven divergence).
    * **TreeRL / EPTree** (Hou et al., ACL 2025): ``branch_on="entropy"`` (:class:`EntropyBranching`) forks
      where the policy was most uncertain.
    * **ROSE** ("semantically diverse explorations"): ``semantic_key`` sends owed leaves to the ancestor whose
      children disagree most in meaning (semantic entropy); ``restart_eps`` starts a new branch from the root
      with probability ε.
    * **Dynamic-TreeRPO** (the sliding-window noise schedule, for text): ``depth_temperature`` sets the
      sampling temperature per level, a function or a ``(start, end)`` pair; otherwise ``temperature``
      everywhere.

    Departures: quotas are exact leaf counts rather than TreePO's divergence budget transfer (owed leaves go
    to a fork point, not to the other live paths); at most ``leaves`` branches per tree are pruned, after
    which early stop is off for that tree (so it always ends); a path that reaches ``max_depth`` unfinished is
    a finished leaf with ``metadata["truncated"] = "max_depth"`` (answer ``None``), TreePO's
    ``MAX_INFER_STEPS``; ε-restarts apply to every branch after a tip's first child and to every fork. Engine
    calls: one per round per distinct (temperature, salt), where a node's salt is its number of children (so
    re-expanding a node draws new samples). Segment mode judges ``early_stop`` on complete lines only. Node
    marks: ``metadata["fork"]`` (sampled for owed leaves), ``"dead"`` (pruned), ``"truncated"``;
    ``tree.metadata`` records the knobs, ``pruned`` and ``restarts``; ``tree.answer`` is the majority answer
    of the leaves.
    """
    rule = _rule(branch_on)
    temperatures = _temperatures(temperature, depth_temperature, max_depth)
    if branching not in ("step", "segment"):
        raise SearchError(f'branching must be "step" or "segment", got {branching!r}')
    cap = segment_tokens if branching == "segment" else max_step_tokens
    _check(leaves=leaves, branch_factor=branch_factor, max_depth=max_depth, cap=cap)
    if not 0.0 <= restart_eps <= 1.0:
        raise SearchError(f"restart_eps is a probability in [0, 1], got {restart_eps}")
    return _rollouts(
        problems,
        policy,
        "tree_rollouts",
        leaves=leaves,
        rule=rule,
        fork=rule.fork_point
        if semantic_key is None
        else partial(_semantic_fork, key=semantic_key, fallback=rule.fork_point),
        factor=branch_factor,
        seed=seed,
        temperatures=temperatures,
        segment=branching == "segment",
        cap=cap,
        max_depth=max_depth,
        answer_fn=answer_fn,
        early_stop=early_stop,
        stop_below=stop_below,
        restart_eps=restart_eps,
        knobs={
            "leaves": leaves,
            "seed": seed,
            "branching": branching,
            "segment_tokens": segment_tokens,
            "branch_factor": branch_factor,
            "temperature": temperature,
            "temperatures": list(temperatures),  # by level, after depth_temperature
            "branch_on": repr(rule),
            "restart_eps": restart_eps,
            "semantic_key": semantic_key is not None,
            "early_stop": None if early_stop is None else early_stop.name,
            "stop_below": stop_below,
            "max_depth": max_depth,
            "max_step_tokens": max_step_tokens,
        },
    )


def slate_rollouts(
    problems: Sequence[Problem],
    policy: Policy,
    *,
    k: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    depth_temperature: DepthTemperature | None = None,
    max_depth: int = 12,
    max_step_tokens: int = 24,
    answer_fn: AnswerFn = extract_answer,
) -> list[Tree]:
    """SLATE's truncated step-level sampling (arXiv 2602.23440): one trajectory per problem, and at every step
    ``k`` next steps sampled from the same prefix, so that each step's ``k`` candidates share the prefix and
    differ only at that step. The first candidate (a plain policy sample) continues the trajectory; the other
    ``k - 1`` are one-step siblings (``metadata["sibling"] = True``), scored and compared by the credit side
    (e.g. :func:`~treeward.search.core.score_paths` with a judge).

    It is :func:`tree_rollouts` with one leaf and :class:`SlateBranching`. Departures: SLATE's LLM-judge
    rewards are not part of sampling here; the trajectory continues from a policy sample rather than a judged
    one; ``k=4`` is our default (the notes we have do not give the paper's).
    """
    _check(leaves=1, branch_factor=k, max_depth=max_depth, cap=max_step_tokens, factor_name="k")
    rule = SlateBranching()
    return _rollouts(
        problems,
        policy,
        "slate_rollouts",
        leaves=1,
        rule=rule,
        fork=rule.fork_point,
        factor=k,
        seed=seed,
        temperatures=_temperatures(temperature, depth_temperature, max_depth),
        segment=False,
        cap=max_step_tokens,
        max_depth=max_depth,
        answer_fn=answer_fn,
        early_stop=None,
        stop_below=0.0,
        restart_eps=0.0,
        knobs={
            "k": k,
            "seed": seed,
            "temperature": temperature,
            "max_depth": max_depth,
            "max_step_tokens": max_step_tokens,
        },
    )


def thicken(
    trees: Sequence[Tree],
    policy: Policy,
    *,
    min_leaves: int = 8,
    seed: int = 0,
    max_depth: int = 12,
    max_step_tokens: int = 24,
    temperature: float = 1.0,
    answer_fn: AnswerFn = extract_answer,
) -> list[int]:
    """Completion rollouts (Math-Shepherd, Wang et al. 2024): every unfinished node whose subtree has fewer
    than ``min_leaves`` terminal leaves gets independent completions to the end until it has them, so that
    Monte-Carlo step values rest on at least ``min_leaves`` outcomes. Adds the nodes to ``trees`` in place,
    marked ``metadata["rollout"] = True``; returns the tokens generated per tree (also in
    ``tree.metadata["thicken"]``).

    Deepest nodes first, so a deep node's completions count for its ancestors too; one batched pass of the
    rollout loop per depth (each thin node samples its missing completions at once, then each runs as a
    chain). Departures: terminal nodes, nodes made by an earlier ``thicken`` and nodes at ``max_depth`` or
    deeper are not completed; a completion that reaches depth ``max_depth`` unfinished ends there as a
    truncated leaf. Draws use salts no search uses, so completions never repeat a search's own samples.
    """
    _check(
        leaves=min_leaves, branch_factor=2, max_depth=max_depth, cap=max_step_tokens, leaves_name="min_leaves"
    )
    if len({t.problem.id for t in trees}) != len(trees):
        raise SearchError("trees must have unique problem ids (they key the draws and the compute ledger)")
    settings = _Settings(
        rule=FixedBranching(),
        fork=FixedBranching().fork_point,
        factor=min_leaves,  # a thin node splits its deficit into ones: independent completions
        seed=seed,
        temperatures=_temperatures(temperature, None, max_depth),
        segment=False,
        cap=max_step_tokens,
        max_depth=max_depth,
        answer_fn=answer_fn,
        early_stop=None,
        stop_below=0.0,
        prune_limit=0,
        restart_eps=0.0,
        salt_base=_THICKEN_SALT,
        mark=(("rollout", True),),
    )
    sizes = [len(t.nodes) for t in trees]
    for depth in range(max(max(n.depth for n in t.nodes) for t in trees) if trees else -1, -1, -1):
        growers = []
        for t in trees:
            counts = _terminal_counts(t)
            tips = {
                n.id: min_leaves - counts[n.id]
                for n in t.nodes
                if n.depth == depth < max_depth
                and not n.terminal
                and not n.metadata.get("rollout")
                and counts[n.id] < min_leaves
            }
            growers.append(_Grower(t, tips, {n.id: n.depth for n in t.nodes}))
        _grow(policy, growers, settings)
    costs = [sum(len(n.token_ids) for n in t.nodes[size:]) for t, size in zip(trees, sizes, strict=True)]
    for t, cost in zip(trees, costs, strict=True):
        t.metadata["thicken"] = {"generated": cost, "min_leaves": min_leaves, "seed": seed}
    return costs


def _terminal_counts(tree: Tree) -> list[int]:
    """Terminal nodes in each node's subtree (itself included); parents come before children in a tree."""
    counts = [1 if n.terminal else 0 for n in tree.nodes]
    for n in reversed(tree.nodes):
        if n.parent is not None:
            counts[n.parent] += counts[n.id]
    return counts


def _rule(branch_on: str | BranchRule) -> BranchRule:
    if isinstance(branch_on, str):
        if branch_on not in _RULES:
            raise SearchError(f"branch_on must be one of {sorted(_RULES)} or a BranchRule, got {branch_on!r}")
        return _RULES[branch_on]
    return branch_on


def _check(
    *,
    leaves: int,
    branch_factor: int,
    max_depth: int,
    cap: int,
    leaves_name: str = "leaves",
    factor_name: str = "branch_factor",
) -> None:
    if leaves < 1:
        raise SearchError(f"{leaves_name} must be ≥ 1, got {leaves}")
    if branch_factor < 2:
        raise SearchError(
            f"{factor_name} must be ≥ 2 (a branch has at least two children), got {branch_factor}"
        )
    if max_depth < 1:
        raise SearchError(f"max_depth must be ≥ 1, got {max_depth}")
    if cap < 1:
        raise SearchError(f"a step or segment needs a token cap ≥ 1, got {cap}")


def _rollouts(
    problems: Sequence[Problem],
    policy: Policy,
    algorithm: str,
    *,
    leaves: int,
    rule: BranchRule,
    fork: Callable[[Tree, Node], Node],
    factor: int,
    seed: int,
    temperatures: tuple[float, ...],
    segment: bool,
    cap: int,
    max_depth: int,
    answer_fn: AnswerFn,
    early_stop: Reward | None,
    stop_below: float,
    restart_eps: float,
    knobs: dict[str, object],
) -> list[Tree]:
    trees = init_trees(problems, policy, algorithm)
    before = snapshot(policy, trees)
    settings = _Settings(
        rule=rule,
        fork=fork,
        factor=factor,
        seed=seed,
        temperatures=temperatures,
        segment=segment,
        cap=cap,
        max_depth=max_depth,
        answer_fn=answer_fn,
        early_stop=early_stop,
        stop_below=stop_below,
        prune_limit=leaves,
        restart_eps=restart_eps,
        salt_base=0,
        mark=(),
    )
    growers = [_Grower(t, {0: leaves}, {0: 0}) for t in trees]
    _grow(policy, growers, settings)
    for g in growers:
        g.tree.metadata.update(
            {**knobs, "pruned": g.pruned, "restarts": g.restarts, "finished": len(g.finished)}
        )
    return finish(policy, trees, [g.finished for g in growers], majority_vote, before)
