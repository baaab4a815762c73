"""Step values from search trees: Monte-Carlo values (Math-Shepherd), ReST-MCTS*'s inferred values, MCTS Q-values.

Every estimator has one signature, ``f(tree, *, knobs) -> NodeValues``: a value per node it could value, the evidence
behind each value, and the leaves it left out. Nothing here writes on the tree; nothing here calls a model.

Outcomes are read from terminal nodes only (``node.terminal`` and ``node.outcome is not None``); a terminal whose
outcome is ``None`` (never graded, or its grader failed) is *excluded and reported*, never counted as 0. A node is
"correct" when its outcome is ``>= correct_at`` (1.0 by default: the exact-answer check of the built-in task).

:func:`step_examples` turns any of these values into :class:`~treeward.credit.records.StepExample` rows (one per
root-to-terminal path), the input of the PRM / value-model exports and training loops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from treeward.credit.records import StepExample
from treeward.tree import Node, Tree

__all__ = [
    "CreditError",
    "NodeValues",
    "mc_hard_values",
    "mc_values",
    "mc_values_reference",
    "q_values",
    "rest_values",
    "step_examples",
    "thin_nodes",
]


class CreditError(ValueError):
    """Input credit assignment cannot turn into training data (an outcome out of range, a bad knob, ...)."""


@dataclass(frozen=True)
class NodeValues:
    """Per-node values of one tree, as every estimator of this module returns them.

    ``values``    dict[int, float]: node id → value, for the nodes the estimator could value (others are absent).
    ``counts``    dict[int, int]: node id → the evidence behind the value, for the same nodes: scored terminals in
                  the node's subtree (Monte-Carlo and ReST-MCTS* values) or visits (Q-values). A small count is a
                  thin estimate (see :func:`thin_nodes`).
    ``excluded``  tuple[int, ...]: the leaves (childless non-root nodes) that got no value, in id order: open
                  leaves and terminals without an outcome, plus what the estimator's own rule leaves out.
    """

    values: dict[int, float]
    counts: dict[int, int]
    excluded: tuple[int, ...]


# ---------------------------------------------------------------------- shared pieces
def _outcome(node: Node, *, unit: bool) -> float | None:
    """The node's outcome when it is a scored terminal, else ``None``; ``unit`` requires it to lie in [0, 1]."""
    if not node.terminal or node.outcome is None:
        return None
    o = float(node.outcome)
    if not math.isfinite(o) or (unit and not 0.0 <= o <= 1.0):
        raise CreditError(
            f"node {node.id} has outcome {node.outcome!r}; Monte-Carlo and ReST-MCTS* values need outcomes in "
            "[0, 1] (1 = correct): rescale the outcome reward, or grade with a 0/1 verifier"
        )
    return o


def _excluded(tree: Tree, values: Mapping[int, float]) -> tuple[int, ...]:
    return tuple(n.id for n in tree.leaves() if n.id not in values)


def _check_correct_at(correct_at: float) -> None:
    if not 0.0 < correct_at <= 1.0:
        raise CreditError(f"correct_at must be in (0, 1], got {correct_at}")


@dataclass(frozen=True)
class SubtreeStats:
    """Bottom-up sums over each node's subtree, lists [N] indexed by node id: outcome sum, scored nodes, correct
    nodes, and the lowest and highest outcome (so that a subtree whose outcomes are all equal gets exactly that
    value). Built by :func:`subtree_stats`; the Monte-Carlo values here and the tree advantages
    (:mod:`treeward.credit.advantages`) both read it."""

    sums: list[float]
    counts: list[int]
    correct: list[int]
    lo: list[float]
    hi: list[float]

    def mean(self, i: int) -> float:
        """Mean outcome in ``i``'s subtree (exactly the common value when all are equal); needs ``counts[i] > 0``."""
        return self.lo[i] if self.lo[i] == self.hi[i] else self.sums[i] / self.counts[i]

    def flat(self, i: int) -> bool:
        """All outcomes in ``i``'s subtree are equal, or there are none."""
        return self.counts[i] == 0 or self.lo[i] == self.hi[i]


def subtree_stats(
    tree: Tree, outcomes: Mapping[int, float] | None = None, *, correct_at: float = 1.0
) -> SubtreeStats:
    """Sum, count, correct count, min and max of the outcomes in every node's subtree, in one pass from the last
    node to the root (parents precede children in a valid tree).

    ``outcomes`` maps node ids to outcomes; by default the scored terminals' ``outcome`` fields (which must lie in
    [0, 1]). A node counts as correct when its outcome is ``>= correct_at``.
    """
    tree.validate()
    n = len(tree.nodes)
    if outcomes is None:
        outcomes = {node.id: o for node in tree.nodes if (o := _outcome(node, unit=True)) is not None}
    sums, counts, correct = [0.0] * n, [0] * n, [0] * n
    lo, hi = [math.inf] * n, [-math.inf] * n
    for i, o in outcomes.items():
        sums[i], counts[i], correct[i], lo[i], hi[i] = o, 1, int(o >= correct_at), o, o
    for node in reversed(tree.nodes[1:]):
        i, p = node.id, node.parent
        assert p is not None  # validated: only the root has none
        sums[p] += sums[i]
        counts[p] += counts[i]
        correct[p] += correct[i]
        lo[p], hi[p] = min(lo[p], lo[i]), max(hi[p], hi[i])
    return SubtreeStats(sums, counts, correct, lo, hi)


# ---------------------------------------------------------------------- Monte-Carlo values (Math-Shepherd)
def mc_values(tree: Tree) -> NodeValues:
    """Monte-Carlo step values, Math-Shepherd's *soft estimation* (Wang et al. 2024, "Math-Shepherd: Verify and
    Reinforce LLMs Step-by-step without Human Annotations"): a node's value is the mean outcome of the scored
    terminals in its subtree, ``SE(s) = Σ_j o_j / N`` over the ``N`` completed paths through ``s``.

    With 0/1 outcomes this is the fraction of completions through the step that reach the right answer. Values lie
    in [0, 1]; a node with no scored terminal below it gets none (``counts`` says how many terminals each value
    rests on). An inner node's value is the count-weighted mean of its children's values (its own outcome joins
    when it is itself a scored terminal).

    Departures: the paper decodes ``N`` fresh completions from every step; here the completions are the terminal
    paths the search left under the node, so ancestors share them and thin subtrees give noisy values (find them
    with :func:`thin_nodes` and thicken them with completion rollouts). Fractional outcomes are averaged as they
    are. One O(nodes) pass; :func:`mc_values_reference` is the slow obvious version.
    """
    f = subtree_stats(tree)
    values = {i: f.mean(i) for i in range(len(tree.nodes)) if f.counts[i]}
    counts = {i: f.counts[i] for i in values}
    return NodeValues(values, counts, _excluded(tree, values))


def mc_values_reference(tree: Tree) -> NodeValues:
    """The slow obvious :func:`mc_values`: for every node, walk its whole subtree and average the outcomes found."""
    tree.validate()
    values, counts = {}, {}
    for node in tree.nodes:
        found = [o for n in tree.iter_depth_first(node.id) if (o := _outcome(n, unit=True)) is not None]
        if found:
            values[node.id] = found[0] if min(found) == max(found) else math.fsum(found) / len(found)
            counts[node.id] = len(found)
    return NodeValues(values, counts, _excluded(tree, values))


def mc_hard_values(tree: Tree, *, correct_at: float = 1.0) -> NodeValues:
    """Math-Shepherd's *hard estimation* (Wang et al. 2024): ``HE(s) = 1`` if any completion through the step reaches
    the right answer (a scored terminal below with outcome ``>= correct_at``), else ``0``.

    Same nodes, counts and exclusions as :func:`mc_values`; values are 0.0 or 1.0. With 0/1 outcomes,
    ``HE(s) = 1`` exactly when ``SE(s) > 0``. Departure as in :func:`mc_values`: the completions are the tree's.
    """
    _check_correct_at(correct_at)
    f = subtree_stats(tree, correct_at=correct_at)
    values = {i: float(f.correct[i] > 0) for i in range(len(tree.nodes)) if f.counts[i]}
    counts = {i: f.counts[i] for i in values}
    return NodeValues(values, counts, _excluded(tree, values))


def thin_nodes(tree: Tree, *, min_leaves: int = 8) -> list[int]:
    """Ids of the open nodes whose Monte-Carlo value rests on fewer than ``min_leaves`` scored terminals.

    These are the nodes to thicken with completion rollouts before trusting :func:`mc_values` (Math-Shepherd
    decodes ``N = 8`` completions per step, hence the default). Terminal nodes are never thin (their value is their
    own outcome) and copies of a sibling (``metadata["duplicate_of"]``, written by the searches' dedupe) are
    skipped: their rollouts are the sibling's. The root counts as any other open node. Id order.
    """
    if min_leaves < 1:
        raise CreditError(f"min_leaves must be >= 1, got {min_leaves}")
    f = subtree_stats(tree)
    return [
        n.id
        for n in tree.nodes
        if not n.terminal and "duplicate_of" not in n.metadata and f.counts[n.id] < min_leaves
    ]


# ---------------------------------------------------------------------- ReST-MCTS* inferred values
def quality_step(prev: float, reward: float, distance: int) -> float:
    """One step of ReST-MCTS*'s quality value: ``max(v + (1 - v)(2r - 1)/(m + 1), 0)``, with ``r`` clipped to
    [0, 1]. Shared with MCTS*'s online evaluation (:mod:`treeward.search.mcts`)."""
    r = min(1.0, max(0.0, reward))
    return max(prev + (1.0 - prev) * (2.0 * r - 1.0) / (distance + 1), 0.0)


def _rest_step(prev: float, on_path: bool, denominator: int) -> float:
    """:func:`quality_step` with ``r`` = on_path (0/1) and ``m + 1`` = ``denominator``."""
    return quality_step(prev, 1.0 if on_path else 0.0, denominator - 1)


def rest_values(tree: Tree, *, correct_at: float = 1.0) -> NodeValues:
    """ReST-MCTS*'s inferred process rewards (Zhang, Zhoubian, Hu, Yue, Dong & Tang 2024, "ReST-MCTS*: LLM
    Self-Training via Process Reward Guided Tree Search", eqs. 1–2 and their value-target inference; released
    code: ``treeNode.get_full_value_samples_vm``): the value target of step ``s_k`` is its quality value

        ``v_0 = 0``,   ``v_k = max(v_{k-1} + w_k, 0)``,   ``w_k = (1 - v_{k-1}) / (m_k + 1) · (2 r_k - 1)``,

    computed top-down from the root (``v_{k-1}`` is the parent's value), where, given the oracle outcomes,

    * ``r_k = 1`` when the step lies on a path to a correct terminal (outcome ``>= correct_at``), else ``0``;
    * ``m_k`` is the *reasoning distance*: for a step on a correct path, the fewest steps from it to a correct
      terminal below it (``0`` at a correct terminal, which therefore gets ``v = 1``); for a step off every correct
      path, the reasoning distance ``m_A`` of its nearest ancestor ``A`` on a correct path (the code's
      ``min_steps_to_correct`` copied down to the wrong leaf).

    A right path of ``K`` steps climbs linearly, ``v_k = k/K``; a wrong step drops below its parent. Worked
    example (the tests' tree): root → a → b → T (correct), a → c (wrong terminal), b → u (wrong terminal).
    ``m``: T 0, b 1, a 2. ``v_a = 0 + 1/3 = 1/3``, ``v_b = 1/3 + (2/3)/2 = 2/3``, ``v_T = 2/3 + (1/3)/1 = 1``;
    ``c`` is off-path below ``a`` (``m = 2``): ``v_c = 1/3 - (2/3)/3 = 1/9``; ``u`` below ``b`` (``m = 1``):
    ``v_u = 2/3 - (1/3)/2 = 1/2``.

    Which nodes get a value (as in the released code): the root (``v_0 = 0``), every node on a path to a correct
    terminal, and every node on the way from such a node down to a *scored wrong terminal*. Open subtrees
    (no scored terminal below) and unscored terminals get none; a tree with no correct terminal gets no values at
    all (the inference needs an oracle-correct answer). ``counts`` are the scored terminals below each node.

    Departures: the paper writes the step term with the process reward ``r_{s_k}`` of a PRM; for value-target
    inference from a finished tree the released code uses ``r = ±1`` (on / off a correct path), as here. A
    "correct" leaf is a terminal whose outcome is ``>= correct_at`` rather than an answer string match. The same
    recurrence drives MCTS*'s search-time evaluation (:func:`treeward.search.mcts.quality_value`), there with the
    scorer's path score as ``r`` and an estimated distance.
    """
    _check_correct_at(correct_at)
    f = subtree_stats(tree, correct_at=correct_at)
    n = len(tree.nodes)
    inf = math.inf
    # steps from each node down to its nearest correct terminal (inf: none below)
    down: list[float] = [inf] * n
    wrong_below = [False] * n
    for node in reversed(tree.nodes):
        o = _outcome(node, unit=True)
        if o is not None:
            if o >= correct_at:
                down[node.id] = 0
            else:
                wrong_below[node.id] = True
        if node.parent is not None:
            down[node.parent] = min(down[node.parent], down[node.id] + 1)
            wrong_below[node.parent] = wrong_below[node.parent] or wrong_below[node.id]
    values: dict[int, float] = {}
    anchor: list[float] = [inf] * n  # reasoning distance of the nearest on-path node at or above each node
    if down[0] < inf:
        values[0] = 0.0
        anchor[0] = down[0]
    for node in tree.nodes[1:]:
        assert node.parent is not None  # validated: only the root has none
        p = node.parent
        if p not in values:
            continue
        on_path = down[node.id] < inf
        if on_path:
            anchor[node.id] = down[node.id]
            values[node.id] = _rest_step(values[p], True, int(down[node.id]) + 1)
        elif wrong_below[node.id]:
            anchor[node.id] = anchor[p]
            values[node.id] = _rest_step(values[p], False, int(anchor[p]) + 1)
    counts = {i: f.counts[i] for i in values}
    return NodeValues(values, counts, _excluded(tree, values))


# ---------------------------------------------------------------------- MCTS Q-values
def q_values(tree: Tree, *, min_visits: int = 1) -> NodeValues:
    """Q-values of an MCTS tree: for every node visited at least ``min_visits`` times, ``Q(parent, step) =
    node.value``, the value the search's backups left on it; ``counts`` are the visits ``N``.

    This is how MCTS-DPO (Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference
    Learning") ranks sibling steps: their backed-up Q, with visit counts as the confidence. The backup rule is the
    search's (:func:`treeward.search.mcts` default: the running mean of backed-up values, so ``Q`` is the visit-
    weighted mean; MCTS*: visit-weighted children). ``min_visits=0`` also returns unvisited children's
    evaluations (their prior value, no backup behind it). Values are the search's scale (in [0, 1] for the shipped
    scorers). Departure: MCTS-DPO's ``Q`` adds a step reward (self-evaluation) to the discounted child value;
    here the scorer's evaluation already went into the backups.
    """
    if min_visits < 0:
        raise CreditError(f"min_visits must be >= 0, got {min_visits}")
    tree.validate()
    values, counts = {}, {}
    for node in tree.nodes:
        if node.value is None or node.visits < min_visits:
            continue
        v = float(node.value)
        if not math.isfinite(v):
            raise CreditError(f"node {node.id} has value {node.value!r}; a Q-value must be finite")
        values[node.id] = v
        counts[node.id] = node.visits
    return NodeValues(values, counts, _excluded(tree, values))


# ---------------------------------------------------------------------- PRM / value-model rows
def step_examples(
    tree: Tree,
    values: Mapping[int, float],
    *,
    threshold: float,
    label_values: Mapping[int, float] | None = None,
) -> list[StepExample]:
    """One :class:`~treeward.credit.records.StepExample` per distinct root-to-terminal path whose steps all have a
    value: soft targets ``values`` (e.g. ``mc_values(tree).values``) and hard labels ``label >= threshold``.

    The labels threshold ``label_values`` when given, else ``values``: e.g. Math-Shepherd's hard-estimation labels
    next to its soft values, ``step_examples(tree, mc_values(t).values, label_values=mc_hard_values(t).values,
    threshold=1.0)``. Token ids come from the tree (``prompt_ids`` = the root's, ``step_ids`` = each step node's).
    Paths are deduplicated by their step token ids (a search's duplicate siblings give one row); the first in
    terminal-id order is kept. ``metadata`` holds the terminal's id and outcome. Paths with a step missing from
    ``values`` (or ``label_values``) are left out: see the estimator's ``excluded`` for why.
    """
    tree.validate()
    labels_from = values if label_values is None else label_values
    out: list[StepExample] = []
    seen: set[tuple[tuple[int, ...], ...]] = set()
    for term in tree.terminals():
        path = tree.path(term.id)[1:]
        if not path or any(n.id not in values or n.id not in labels_from for n in path):
            continue
        step_ids = tuple(n.token_ids for n in path)
        if step_ids in seen:
            continue
        seen.add(step_ids)
        soft = tuple(float(values[n.id]) for n in path)
        for n, v in zip(path, soft, strict=True):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise CreditError(
                    f"node {n.id} has value {v!r}; step targets must lie in [0, 1] (rescale the values first)"
                )
        out.append(
            StepExample(
                problem_id=tree.problem.id,
                prompt=tree.problem.prompt,
                prompt_ids=tree.root.token_ids,
                steps=tuple(n.text for n in path),
                step_ids=step_ids,
                values=soft,
                labels=tuple(bool(float(labels_from[n.id]) >= threshold) for n in path),
                node_ids=tuple(n.id for n in path),
                metadata={"terminal": term.id, "outcome": term.outcome},
            )
        )
    return out
