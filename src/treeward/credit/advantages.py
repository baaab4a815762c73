"""Tree advantages: pure functions from one rollout tree and its leaf rewards to an :class:`Advantages` record.

**One signature.** Every estimator is ``fn(tree, rewards, *, knobs...) -> Advantages`` with keyword-only knobs whose
defaults are the paper's. :data:`ESTIMATORS` maps a name to each, for the command line and the trainer
integrations.

**The samples are the leaves.** A sample is a *leaf* of the tree: a non-root node with no children
(:meth:`Tree.leaves`), terminal or cut by a budget alike. ``rewards`` maps leaf node ids to the leaf's scalar
reward (the outcome of the path ending there). A leaf missing from ``rewards``, or mapped to ``None`` (its reward
failed or was not applicable), is *excluded*: it takes no part in any statistic, gets no row, and is listed in
``metadata["excluded"]`` with the reason in ``metadata["reasons"]``; it is never treated as 0. A key that is not a
leaf of the tree, or a reward that is not a finite number, is an :class:`AdvantageError`.

**What comes back.** :class:`~treeward.credit.records.Advantages`: ``leaves`` [L] the included leaves in id order,
``node_ids[l]`` [S_l] the step nodes on leaf ``l``'s path (root excluded), ``values[l]`` [S_l] each step's advantage.
Sequence-level estimators (GRPO, RLOO, TreePO, unlikeliness) repeat one number along the path; step-level ones
(TreeRPO, Sibling-GRPO, SLATE, process rewards, MC step utility, redistribution) give each step its own. A step
shared by several leaves appears, with the same advantage for step-level estimators, in every row passing through
it: a trainer that treats rows as independent samples weighs a shared step by the number of included leaves below
it (``each_step_once=True`` in :func:`token_advantages` keeps it in the first row only).

**Per-step rewards** (SLATE, process rewards) are read from ``node.reward`` of the step nodes; a step whose
``reward`` is ``None`` or whose ``status`` is not ``"ok"`` excludes the leaves below it (with the reason).

**Token level.** :func:`token_advantages` gives every generated token of a step its step's advantage, [L][T_l], with
``T_l`` the tokens of the leaf's path without the root prompt, in the order of :func:`completion_ids`;
:func:`pad_advantages` stacks a batch of trees into a right-padded ``(B, T)`` array aligned with those completion
ids: what TRL's ``GRPOTrainer`` (``inputs["advantages"]``) and a verl estimator consume. Group normalisation that
spans trees (TreePO's batch whitening) is :func:`whiten_tokens` on that array. THR's per-token weights are
:func:`thr_weights`.

Conventions shared with :class:`treeward.rewards.group.GroupZScore`: standard deviations are Bessel-corrected (as
TRL's ``nanstd`` and ``torch.std``), ``eps = 1e-4`` (TRL's), and a group whose values are all equal (one member
included) gives exactly 0 to each member.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from treeward.credit.records import Advantages
from treeward.credit.values import subtree_stats
from treeward.rewards.group import unlikeliness_factors, zscore
from treeward.rewards.process import Refinement
from treeward.tree import Node, Tree

__all__ = [
    "ESTIMATORS",
    "AdvantageError",
    "Estimator",
    "completion_ids",
    "dr_grpo",
    "grpo",
    "mc_step_utility",
    "pad_advantages",
    "process_advantages",
    "redistribute",
    "rloo",
    "sibling_grpo",
    "slate",
    "thr_weights",
    "token_advantages",
    "treepo",
    "treerpo",
    "unlikeliness",
    "whiten_tokens",
]

Rewards = Mapping[int, float | None]
"""Leaf node id → the leaf's scalar reward (``None``: failed or not applicable, so the leaf is excluded)."""

Estimator = Callable[[Tree, Rewards], Advantages]
"""``fn(tree, rewards) -> Advantages``; every estimator below, with its knobs at their defaults."""

Importance = Callable[[Tree, Node], float]
"""``importance(tree, step_node) -> weight ≥ 0``, for :func:`redistribute`."""


class AdvantageError(ValueError):
    """Input an estimator cannot use: a reward for a node that is not a leaf, a non-finite reward, a knob out of
    range, or an :class:`Advantages` record that does not match its tree."""


# ---------------------------------------------------------------------- samples and shared arithmetic
@dataclass(frozen=True)
class _Samples:
    """The leaves an estimator uses (id → reward, in id order) and the ones it leaves out (id → reason)."""

    rewards: dict[int, float]
    excluded: dict[int, str]

    def without(self, leaves: Mapping[int, str]) -> _Samples:
        """The same samples less ``leaves`` (leaf id → reason), which join the excluded ones."""
        kept = {k: v for k, v in self.rewards.items() if k not in leaves}
        gone = {**self.excluded, **{k: why for k, why in leaves.items() if k in self.rewards}}
        return _Samples(kept, dict(sorted(gone.items())))


def _finite(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def _samples(tree: Tree, rewards: Rewards) -> _Samples:
    tree.validate()
    leaves = {n.id for n in tree.leaves()}
    kept: dict[int, float] = {}
    excluded: dict[int, str] = {}
    for key, r in rewards.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise AdvantageError(f"rewards are keyed by leaf node id (int), got key {key!r}")
        if key not in leaves:
            what = (
                "not a node of the tree"
                if not 0 <= key < len(tree.nodes)
                else "the root"
                if key == 0
                else f"an inner node (children {tree.nodes[key].children})"
            )
            raise AdvantageError(
                f"rewards name node {key}, which is {what}: rewards belong to the leaves {sorted(leaves)}"
            )
        if r is None:
            excluded[key] = "reward is None"
        elif not _finite(r):
            raise AdvantageError(
                f"reward of leaf {key} is {r!r}; give a finite number, or leave the leaf out (or None) if its "
                "reward failed"
            )
        else:
            kept[key] = float(r)
    for leaf in leaves - kept.keys() - excluded.keys():
        excluded[leaf] = "no reward"
    return _Samples(dict(sorted(kept.items())), dict(sorted(excluded.items())))


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise AdvantageError(f"eps must be a finite number ≥ 0, got {eps}")


def _steps(tree: Tree, leaf: int) -> list[Node]:
    return tree.path(leaf)[1:]


def _below(tree: Tree, node_id: int, leaves: Mapping[int, float]) -> list[int]:
    """The included leaves in the subtree of ``node_id`` (itself included)."""
    return [n.id for n in tree.iter_depth_first(node_id) if n.id in leaves]


def _advantages(
    tree: Tree,
    s: _Samples,
    values: Mapping[int, Sequence[float]],
    name: str,
    knobs: Mapping[str, object],
) -> Advantages:
    leaves = tuple(s.rewards)
    return Advantages(
        leaves=leaves,
        node_ids=tuple(tuple(n.id for n in _steps(tree, leaf)) for leaf in leaves),
        values=tuple(tuple(float(v) for v in values[leaf]) for leaf in leaves),
        metadata={
            "estimator": name,
            "knobs": dict(knobs),
            "excluded": tuple(s.excluded),
            "reasons": dict(s.excluded),
        },
    )


def _per_sequence(tree: Tree, s: _Samples, adv: Mapping[int, float]) -> dict[int, list[float]]:
    return {leaf: [adv[leaf]] * len(_steps(tree, leaf)) for leaf in s.rewards}


def _per_step(tree: Tree, s: _Samples, adv: Mapping[int, float]) -> dict[int, list[float]]:
    return {leaf: [adv[n.id] for n in _steps(tree, leaf)] for leaf in s.rewards}


def _leaf_means(tree: Tree, rewards: Mapping[int, float]) -> dict[int, float]:
    """Mean included leaf reward below each node that has one (the Monte-Carlo value of its prefix: each leaf
    below counts once), from :func:`treeward.credit.values.subtree_stats`."""
    st = subtree_stats(tree, rewards)
    return {i: st.mean(i) for i in range(len(tree.nodes)) if st.counts[i] > 0}


def _recursive_means(tree: Tree, rewards: Mapping[int, float]) -> dict[int, float]:
    """TreeRPO's bottom-up expectation: a leaf's value is its reward, an inner node's the plain mean of its valued
    children's values (not of the leaves below: in an unbalanced tree a shallow leaf weighs more)."""
    values: dict[int, float] = dict(rewards)
    for n in reversed(tree.nodes):
        if n.children:
            vs = [values[c] for c in n.children if c in values]
            if vs:
                values[n.id] = vs[0] if all(v == vs[0] for v in vs) else math.fsum(vs) / len(vs)
    return values


def _sibling_relative(
    tree: Tree, s: _Samples, values: Mapping[int, float], *, scale: bool, eps: float
) -> dict[int, float]:
    """Each step's advantage against its siblings: the valued children of one parent form a group, z-scored (or
    centred); a step with no valued sibling gets 0 (nothing to compare it with)."""
    adv: dict[int, float] = {}
    for p in tree.nodes:
        group = [c for c in p.children if c in values]
        zs = (
            zscore([values[c] for c in group], scale=scale, eps=eps) if len(group) > 1 else [0.0] * len(group)
        )
        adv.update(zip(group, zs, strict=True))
    return adv


def _step_score(node: Node) -> tuple[float | None, str | None]:
    """A step's own reward (``node.reward``), or why it has none."""
    if node.status != "ok":
        return None, f"step {node.id} has status {node.status!r}"
    if node.reward is None:
        return None, f"step {node.id} has no reward"
    if not _finite(node.reward):
        raise AdvantageError(
            f"step {node.id} has reward {node.reward!r}; step rewards must be finite numbers"
        )
    return float(node.reward), None


# ---------------------------------------------------------------------- sequence-level estimators
def grpo(tree: Tree, rewards: Rewards, *, scale: bool = True, eps: float = 1e-4) -> Advantages:
    """GRPO's group-relative advantage: Shao et al. (2024), "DeepSeekMath" (arXiv 2402.03300), §4.1.2 outcome
    supervision.

    The included leaves of the tree are one group (one prompt): ``A_l = (r_l − mean) / (std + eps)`` with the
    Bessel-corrected ``std`` (``scale=True``, the paper's std-scaled variant), the same number on every step of
    the path; ``scale=False`` only centres (``r_l − mean``: Dr. GRPO, :func:`dr_grpo`). Sums to 0 over the leaves
    when unscaled, and to ``0`` up to the ``eps`` shrinkage when scaled.

    Departures: ``eps = 1e-4`` as TRL (the paper has none; verl uses 1e-6); an all-equal group gives exactly 0. No
    KL term (the loss's business) and no choice of token- vs sequence-mean loss normalisation here: that is the
    trainer's aggregation (DeepSeekMath averages per sequence, then over the group).
    """
    _check_eps(eps)
    s = _samples(tree, rewards)
    zs = zscore(list(s.rewards.values()), scale=scale, eps=eps)
    adv = dict(zip(s.rewards, zs, strict=True))
    return _advantages(tree, s, _per_sequence(tree, s, adv), "grpo", {"scale": scale, "eps": eps})


def dr_grpo(tree: Tree, rewards: Rewards) -> Advantages:
    """Dr. GRPO: Liu et al. (2025), "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv
    2503.20783): GRPO without the division by the group's std (``A_l = r_l − mean``), which biases updates towards
    too-easy and too-hard questions. Its other fix, dropping the per-sequence length normalisation of the loss
    (sum over tokens divided by a constant), is the trainer's loss aggregation, not an advantage. Sums to 0."""
    adv = grpo(tree, rewards, scale=False)
    return Advantages(adv.leaves, adv.node_ids, adv.values, {**adv.metadata, "estimator": "dr_grpo"})


def rloo(tree: Tree, rewards: Rewards) -> Advantages:
    """REINFORCE Leave-One-Out: Ahmadian et al. (2024), "Back to Basics: Revisiting REINFORCE Style Optimization
    for Learning from Human Feedback in LLMs" (arXiv 2402.14740), after Kool et al. (2019).

    Each leaf's baseline is the mean reward of the *other* included leaves:
    ``A_l = r_l − (Σ_j r_j − r_l) / (G − 1) = G / (G − 1) · (r_l − mean)``; no std scaling. Sums to 0 over the
    leaves. Departure: a group of one has no baseline and gets 0 (verl's RLOO passes the raw reward through).
    """
    s = _samples(tree, rewards)
    g = len(s.rewards)
    total = math.fsum(s.rewards.values())
    flat = len(set(s.rewards.values())) <= 1  # exactly 0, no rounding noise
    adv = {leaf: 0.0 if flat else r - (total - r) / (g - 1) for leaf, r in s.rewards.items()}
    return _advantages(tree, s, _per_sequence(tree, s, adv), "rloo", {})


def treepo(
    tree: Tree, rewards: Rewards, *, size_weighted: bool = False, skip_flat_subgroups: bool = False
) -> Advantages:
    """TreePO's multi-level sub-group advantage: m-a-p / ByteDance Seed (2025), "TreePO: Bridging the Gap of Policy
    Optimization and Efficacy and Inference Efficiency with Heuristic Tree-based Modeling" (arXiv 2508.17445), as
    its released estimator ``compute_tree_reinforce_plus_plus_baseline_outcome_advantage``
    (multimodal-art-projection/TreePO, ``verl/trainer/ppo/core_algos.py``).

    For leaf ``l`` and each node ``a`` strictly above it (the root included) whose subtree holds more than one
    included leaf (the root always counts), the sub-group advantage is ``r_l − mean(rewards of the included leaves
    below a)``; the leaf's advantage is their plain average (``size_weighted=False``: ``adv_weight_strategy=
    "average"``, the value in the released training script) or their average weighted by sub-group size
    (``size_weighted=True``, the function's own default ``"group_size"``). ``skip_flat_subgroups=True`` also
    drops non-root sub-groups whose rewards are all equal (``remove_no_std_subgroup``). One scalar per leaf,
    repeated along its path. No std scaling inside sub-groups; no zero-sum guarantee (the leaves average over
    different sets of sub-groups). A tree whose leaves all hang from the root gives Dr. GRPO's ``r_l − mean``.

    Departure: the released code then whitens the advantages over the whole batch's tokens (verl's
    ``masked_whiten``); that spans trees, so it is not done here: apply :func:`whiten_tokens` to the padded batch.
    The released segment-progress estimator (``compute_tree_rfpp_progress_outcome_advantage``) is not ported.
    """
    s = _samples(tree, rewards)
    st = subtree_stats(tree, s.rewards)
    count = st.counts
    mean = [st.mean(i) if st.counts[i] else math.nan for i in range(len(tree.nodes))]
    flat = [st.flat(i) for i in range(len(tree.nodes))]
    # one top-down pass: for every node, Σ w·mean and Σ w over the kept sub-groups strictly above it
    wsum, wmean = [0.0] * len(tree.nodes), [0.0] * len(tree.nodes)
    for n in tree.nodes[1:]:
        a = n.parent
        assert a is not None
        wsum[n.id], wmean[n.id] = wsum[a], wmean[a]
        if a == 0 or (count[a] > 1 and not (skip_flat_subgroups and flat[a])):
            w = float(count[a]) if size_weighted else 1.0
            wsum[n.id] += w
            wmean[n.id] += w * mean[a]
    # Σ w·(r − mean_a) / Σ w = r − (Σ w·mean_a) / Σ w; the root always counts, so Σ w > 0
    adv = {leaf: 0.0 if flat[0] else r - wmean[leaf] / wsum[leaf] for leaf, r in s.rewards.items()}
    knobs = {"size_weighted": size_weighted, "skip_flat_subgroups": skip_flat_subgroups}
    return _advantages(tree, s, _per_sequence(tree, s, adv), "treepo", knobs)


def unlikeliness(
    tree: Tree,
    rewards: Rewards,
    *,
    beta: float = 0.25,
    length_normalized: bool = True,
    scale: bool = True,
    eps: float = 1e-4,
) -> Advantages:
    """GRPO on unlikeliness-reweighted rewards: He, Fried, Welleck (2025), "Rewarding the Unlikely: Lifting GRPO
    Beyond Distribution Sharpening" (EMNLP 2025; AndreHe02/rewarding-unlikely-release).

    The included leaves are ranked by the log-probability of their path under the sampling policy (from the step
    nodes' ``logprobs``), rank 0 = least likely, ties by leaf id; each reward is scaled
    ``r̃_l = r_l · (1 − β · rank_l / G)`` with G the number ranked, then :func:`grpo`'s z-score (``scale``, ``eps``)
    gives the advantage. As in the released code the log-prob is the *mean* per-token log-prob of the completion
    (``length_normalized=False``: the sum, which ranks long paths lower) and β = 0.25; the arithmetic is
    :class:`treeward.rewards.group.Unlikeliness`'s. A leaf with a step that has tokens but no logprobs, or with
    no generated tokens, is excluded (reason in metadata).
    """
    _check_eps(eps)
    if not (math.isfinite(beta) and 0 <= beta <= 1):
        raise AdvantageError(f"beta must be in [0, 1] (so the factors stay ≥ 0), got {beta}")
    s = _samples(tree, rewards)
    lps: dict[int, float] = {}
    missing: dict[int, str] = {}
    for leaf in s.rewards:
        steps = _steps(tree, leaf)
        bare = [n.id for n in steps if n.token_ids and not n.logprobs]
        n_tok = sum(len(n.token_ids) for n in steps)
        if bare:
            missing[leaf] = f"step {bare[0]} has tokens but no logprobs"
        elif n_tok == 0:
            missing[leaf] = "no generated tokens"
        else:
            lp = math.fsum(x for n in steps for x in n.logprobs)
            lps[leaf] = lp / n_tok if length_normalized else lp
    s = s.without(missing)
    _, factors = unlikeliness_factors([lps[leaf] for leaf in s.rewards], beta)
    shaped = [r * f for r, f in zip(s.rewards.values(), factors, strict=True)]
    adv = dict(zip(s.rewards, zscore(shaped, scale=scale, eps=eps), strict=True))
    knobs = {"beta": beta, "length_normalized": length_normalized, "scale": scale, "eps": eps}
    return _advantages(tree, s, _per_sequence(tree, s, adv), "unlikeliness", knobs)


# ---------------------------------------------------------------------- step-level estimators
def treerpo(tree: Tree, rewards: Rewards, *, scale: bool = True, eps: float = 1e-4) -> Advantages:
    """TreeRPO's step-level group advantages: Yang, Guo, Huang, Liang, Wang, Tang (2025), "TreeRPO: Tree Relative
    Policy Optimization" (arXiv 2506.05183).

    Node values by the paper's bottom-up expectation: a leaf's value is its reward, an inner node's the mean of
    its children's values (recursively, so not the flat mean of the leaves below in an unbalanced tree). The
    children of one parent are a step-level group: each step's advantage is its value's GRPO z-score among its
    valued siblings (``scale=True``) or its deviation from their mean (``scale=False``: the variant of Sapir &
    Erlihson's omrisapir1/treerpo trainer, "child reward − sibling mean", Dr.-GRPO style). A step without a valued
    sibling gets 0. Each step keeps its own advantage on every path through it. Sums to 0 within every sibling
    group when unscaled. A tree whose leaves all hang from the root gives :func:`grpo` exactly.

    What could not be checked: the paper's body (group std convention and ``eps``): they follow :func:`grpo`.
    """
    _check_eps(eps)
    s = _samples(tree, rewards)
    adv = _sibling_relative(tree, s, _recursive_means(tree, s.rewards), scale=scale, eps=eps)
    return _advantages(tree, s, _per_step(tree, s, adv), "treerpo", {"scale": scale, "eps": eps})


def sibling_grpo(tree: Tree, rewards: Rewards, *, scale: bool = True, eps: float = 1e-4) -> Advantages:
    """Sibling-GRPO of V-STAR: Jiang, Huang, Wang, Wang, Xiong, Zhang, Yu (2026), "Spend Search Where It Pays:
    Value-Guided Structured Sampling and Optimization for Generative Recommendation" (arXiv 2602.10699).

    At each branch point the children of one parent are normalised against each other: a child's value is the
    Monte-Carlo mean of the included leaf rewards below it (every sampled leaf counts once), and its advantage is
    the z-score of that value among its valued siblings (``scale=False``: centred only). Steps that are not at a
    branch point (an only child) get 0, which concentrates the signal on the branching decisions. Sums to 0
    within every sibling group when unscaled; a tree whose leaves all hang from the root gives :func:`grpo`.

    Departures and what could not be checked: the abstract (checked) says sibling-relative advantages at branch
    points; the paper's exact value estimate and any weighting against a sequence-level GRPO term were not
    reachable. Against :func:`treerpo` the only difference is the value: flat leaf mean here, recursive mean of
    children there (equal on balanced trees).
    """
    _check_eps(eps)
    s = _samples(tree, rewards)
    adv = _sibling_relative(tree, s, _leaf_means(tree, s.rewards), scale=scale, eps=eps)
    return _advantages(tree, s, _per_step(tree, s, adv), "sibling_grpo", {"scale": scale, "eps": eps})


def slate(tree: Tree, rewards: Rewards, *, scale: bool = True, eps: float = 1e-4) -> Advantages:
    """SLATE's step-level advantages: Samarinas, Chang, Zamani (2026), "Truncated Step-Level Sampling with Process
    Rewards for Retrieval-Augmented Reasoning" (arXiv 2602.23440; algoprog/slate).

    Truncated step-level sampling draws k continuations of one shared prefix that differ only in the next step, so
    a step's group is its siblings, and each is scored on its own by a dense (LLM-judge) step reward. Here a step's
    score is ``rewards[leaf]`` for an included leaf (a truncated continuation, or the answer step) and
    ``node.reward`` for an inner node (the step that was continued): both must be the same judge's score of that
    one step. The advantage is the score's GRPO z-score among its scored siblings (``scale=False``: centred);
    a step with no scored sibling gets 0 (it was not a sampled decision). An inner step without a usable
    ``node.reward`` (``None``, or ``status`` not ``"ok"``) that has siblings excludes the leaves below it. A tree
    whose leaves all hang from the root gives :func:`grpo`.

    Departures: no early-answer bonus or ternary judge here (rewards are the caller's); the normalisation
    (z-score with this module's std and ``eps``) follows :func:`grpo`, the paper's exact normaliser could not be
    checked.
    """
    _check_eps(eps)
    s = _samples(tree, rewards)
    unscored: dict[int, str] = {}
    scores: dict[int, float] = {}
    for n in tree.nodes[1:]:
        if not n.children:
            if n.id in s.rewards:
                scores[n.id] = s.rewards[n.id]
            continue
        score, why = _step_score(n)
        if score is not None:
            scores[n.id] = score
        elif n.parent is not None and len(tree.nodes[n.parent].children) > 1:
            for leaf in _below(tree, n.id, s.rewards):
                unscored.setdefault(leaf, f"{why} (SLATE needs a score for every sampled step)")
    s = s.without(unscored)
    for n_id in [k for k in scores if not tree.nodes[k].children and k not in s.rewards]:
        del scores[n_id]
    adv = _sibling_relative(tree, s, scores, scale=scale, eps=eps)
    for leaf in s.rewards:  # an unscored only child was no sampled decision: 0
        for n in _steps(tree, leaf):
            adv.setdefault(n.id, 0.0)
    return _advantages(tree, s, _per_step(tree, s, adv), "slate", {"scale": scale, "eps": eps})


def process_advantages(
    tree: Tree,
    rewards: Rewards,
    *,
    refine: Refinement | None = None,
    outcome_weight: float = 0.0,
    normalize: bool = True,
    eps: float = 1e-4,
) -> Advantages:
    """Process-reward advantages from per-step (PRM) rewards, DeepSeekMath's process supervision (Shao et al. 2024,
    arXiv 2402.03300, §4.1.3) with Gao et al.'s Clip / Delta refinements (arXiv 2410.15115).

    For each included leaf, the step rewards ``r_k`` [S] are the step nodes' ``node.reward`` (a step without one,
    or with a status other than ``"ok"``, excludes the leaf). ``refine`` (a :class:`~treeward.rewards.process.ClipSteps`,
    :class:`~treeward.rewards.process.DeltaSteps` or :class:`~treeward.rewards.process.ClipDeltaSteps`) replaces them
    with its ``transform``; ``outcome_weight · rewards[leaf]`` is added to the last step (Gao et al. put the success
    reward there). With ``normalize`` (the paper's default) every step reward of the group, pooled over the
    included paths, is z-scored ``(r − mean) / (std + eps)``; the advantage of step ``t`` is the sum of the
    (normalised) step rewards from ``t`` to the end of its path, ``A_t = Σ_{k ≥ t} r̃_k``.

    Defaults = DeepSeekMath process supervision (no refinement, no outcome term, normalised). Departures: in a tree
    a step shared by several paths is pooled once per path through it (each path is a sample); Delta's value
    depends on the next step, so refinement is per path. Gao et al. trained with PPO and a critic; here the group
    normalisation stands in for the critic's baseline, and ``normalize=False`` gives the bare refined return.
    """
    _check_eps(eps)
    if not math.isfinite(outcome_weight):
        raise AdvantageError(f"outcome_weight must be finite, got {outcome_weight}")
    s = _samples(tree, rewards)
    unscored: dict[int, str] = {}
    shaped: dict[int, list[float]] = {}
    for leaf, r in s.rewards.items():
        step_rewards: list[float] = []
        for n in _steps(tree, leaf):
            score, why = _step_score(n)
            if score is None:
                unscored[leaf] = f"{why} (process rewards need every step scored)"
                break
            step_rewards.append(score)
        else:
            xs = refine.transform(step_rewards) if refine is not None else step_rewards
            xs = [float(x) for x in xs]
            xs[-1] += outcome_weight * r
            shaped[leaf] = xs
    s = s.without(unscored)
    if normalize:
        pooled = [x for leaf in s.rewards for x in shaped[leaf]]
        zs = iter(zscore(pooled, scale=True, eps=eps))
        shaped = {leaf: [next(zs) for _ in shaped[leaf]] for leaf in s.rewards}
    values = {leaf: list(np.cumsum(shaped[leaf][::-1])[::-1]) for leaf in s.rewards}
    knobs = {
        "refine": None if refine is None else refine.to_config(),
        "outcome_weight": outcome_weight,
        "normalize": normalize,
        "eps": eps,
    }
    return _advantages(tree, s, values, "process", knobs)


def mc_step_utility(tree: Tree, rewards: Rewards, *, global_weight: float = 0.0) -> Advantages:
    """Monte-Carlo step utility: TreePS-RAG, Zhang, Li, Li, Li, Luo, Wu, Glass, Meng (2026), "TreePS-RAG:
    Tree-based Process Supervision for Reinforcement Learning in Agentic RAG" (arXiv 2601.06922).

    A node's utility ``V(n)`` is the Monte-Carlo estimate over its descendant outcomes: the mean reward of the
    included leaves below it (a leaf's is its own reward). A step's advantage is what it added,
    ``A(n) = V(n) − V(parent(n))``, plus ``global_weight · (V(n) − V(root))``. With ``global_weight=1`` this is the
    sum of TreeRL's global and local advantages (Hou et al. 2025, THUDM/TreeRL), without TreeRL's optional
    re-weighting and leave-one-out leaf normalisation. The count-weighted sum of the local term over the children of
    any node is 0; a tree whose leaves all hang from the root gives Dr. GRPO's ``r_l − mean``.

    What could not be checked: TreePS-RAG's normalisation of the process advantage (the abstract says MC estimation
    over descendant outcomes yields the process advantages); none is applied here.
    """
    if not math.isfinite(global_weight):
        raise AdvantageError(f"global_weight must be finite, got {global_weight}")
    s = _samples(tree, rewards)
    v = _leaf_means(tree, s.rewards)
    adv: dict[int, float] = {}
    for leaf in s.rewards:
        for n in _steps(tree, leaf):
            assert n.parent is not None
            adv[n.id] = v[n.id] - v[n.parent] + global_weight * (v[n.id] - v[0])
    return _advantages(tree, s, _per_step(tree, s, adv), "mc_step_utility", {"global_weight": global_weight})


def redistribute(
    tree: Tree,
    rewards: Rewards,
    *,
    importance: Importance | None = None,
    scale: bool = True,
    eps: float = 1e-4,
) -> Advantages:
    """Importance-weighted redistribution of a trajectory's reward along its steps, after ReviBranch (2025),
    "ReviBranch: Deep Reinforcement Learning for Branch-and-Bound with Revived Trajectories" (arXiv
    2508.17452).

    Each leaf's sparse terminal signal, here its :func:`grpo` advantage ``A_l`` (``scale``, ``eps``), becomes dense
    step feedback: step ``k`` of the path gets ``A_l · w̃_k`` with ``w̃_k = S · w_k / Σ_j w_j`` (mean weight 1
    per path, so uniform importance gives GRPO back; ``Σ_k w̃_k = S`` keeps the path's total). ``importance``
    (``tree, step node -> weight ≥ 0``) gives ``w_k``; by default it is ``|V(n) − V(parent)|``, how much the step
    moved the Monte-Carlo success estimate of its prefix (mean included leaf reward below, as in
    :func:`mc_step_utility`). A path whose weights are all 0 falls back to uniform.

    Departure: ReviBranch's importance weights come from branch-and-bound quantities that text steps do not have,
    and its exact redistribution formula could not be checked; the tree-value importance above is this library's
    choice, and any other goes in through ``importance``.
    """
    _check_eps(eps)
    s = _samples(tree, rewards)
    a = dict(zip(s.rewards, zscore(list(s.rewards.values()), scale=scale, eps=eps), strict=True))
    v = _leaf_means(tree, s.rewards)
    values: dict[int, list[float]] = {}
    for leaf in s.rewards:
        steps = _steps(tree, leaf)
        if importance is None:
            ws = [abs(v[n.id] - v[n.parent]) for n in steps if n.parent is not None]
        else:
            ws = [float(importance(tree, n)) for n in steps]
            bad = [(n.id, w) for n, w in zip(steps, ws, strict=True) if not (math.isfinite(w) and w >= 0)]
            if bad:
                raise AdvantageError(f"importance must be finite and ≥ 0; step {bad[0][0]} got {bad[0][1]!r}")
        total = math.fsum(ws)
        tilde = [len(ws) * w / total for w in ws] if total > 0 else [1.0] * len(ws)
        values[leaf] = [a[leaf] * w for w in tilde]
    knobs = {"importance": "mc_value_change" if importance is None else "custom", "scale": scale, "eps": eps}
    return _advantages(tree, s, values, "redistribute", knobs)


ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "treepo": treepo,
    "unlikeliness": unlikeliness,
    "treerpo": treerpo,
    "sibling_grpo": sibling_grpo,
    "slate": slate,
    "process": process_advantages,
    "mc_step_utility": mc_step_utility,
    "redistribute": redistribute,
}
"""Every estimator by name, with its knobs at the paper defaults (bind others with :func:`functools.partial`)."""


# ---------------------------------------------------------------------- token level
def _check_record(tree: Tree, adv: Advantages) -> None:
    if not len(adv.leaves) == len(adv.node_ids) == len(adv.values):
        raise AdvantageError(
            f"advantages hold {len(adv.leaves)} leaves, {len(adv.node_ids)} paths and {len(adv.values)} value rows"
        )
    for leaf, ids, vals in zip(adv.leaves, adv.node_ids, adv.values, strict=True):
        if not 0 < leaf < len(tree.nodes):
            raise AdvantageError(f"advantages name leaf {leaf}, not a non-root node of this tree")
        path = tuple(n.id for n in _steps(tree, leaf))
        if tuple(ids) != path:
            raise AdvantageError(f"advantages give leaf {leaf} the steps {tuple(ids)}; its path is {path}")
        if len(vals) != len(ids):
            raise AdvantageError(f"leaf {leaf}: {len(vals)} advantages for {len(ids)} steps")
        if not all(_finite(x) for x in vals):
            raise AdvantageError(f"leaf {leaf}: advantages must be finite numbers, got {tuple(vals)}")


def completion_ids(tree: Tree, adv: Advantages) -> list[list[int]]:
    """The token ids each row of ``adv`` trains on, [L][T_l]: the leaf's step tokens concatenated, prompt excluded
    (what TRL calls ``completion_ids``); :func:`token_advantages` is aligned with them."""
    _check_record(tree, adv)
    return [[t for n in _steps(tree, leaf) for t in n.token_ids] for leaf in adv.leaves]


def token_advantages(tree: Tree, adv: Advantages, *, each_step_once: bool = False) -> list[np.ndarray]:
    """Every generated token of a step gets its step's advantage: [L][T_l] float64 arrays, ``T_l`` the tokens of
    leaf ``l``'s path without the root prompt, aligned with :func:`completion_ids`.

    ``each_step_once=True`` keeps a step shared by several rows in the first row that reaches it (leaves in the
    record's order) and gives its tokens 0 in the others, so that every step is trained once (TreeRPO's and
    SLATE's view of a step as one decision); the default repeats it in every row.
    """
    _check_record(tree, adv)
    seen: set[int] = set()
    rows: list[np.ndarray] = []
    for ids, vals in zip(adv.node_ids, adv.values, strict=True):
        parts = []
        for node_id, v in zip(ids, vals, strict=True):
            if each_step_once and node_id in seen:
                v = 0.0
            seen.add(node_id)
            parts.append(np.full(len(tree.nodes[node_id].token_ids), float(v)))
        rows.append(np.concatenate(parts) if parts else np.zeros(0))
    return rows


def pad_advantages(
    batch: Sequence[tuple[Tree, Advantages]], *, width: int | None = None, each_step_once: bool = False
) -> np.ndarray:
    """A batch of trees' token advantages as one ``(B, T)`` float64 array, right-padded with 0.

    Rows come tree by tree, leaves in each record's order: the order of :func:`completion_ids` over the batch,
    so row ``b`` lines up with the ``b``-th completion right-padded to ``T`` (TRL's ``completion_ids`` layout).
    ``T`` is ``width`` when given (e.g. ``completion_ids.shape[1]``; a row longer than it is an error, never
    truncated) or the longest row.
    """
    rows = [r for tree, adv in batch for r in token_advantages(tree, adv, each_step_once=each_step_once)]
    if not rows:
        raise AdvantageError("cannot pad an empty batch (no included leaves)")
    longest = max(len(r) for r in rows)
    if width is None:
        width = longest
    elif width < longest:
        raise AdvantageError(f"a row has {longest} tokens, more than width={width}; pass a larger width")
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def whiten_tokens(
    adv: np.ndarray, mask: np.ndarray, *, shift_mean: bool = True, eps: float = 1e-8
) -> np.ndarray:
    """Whiten token advantages over every masked-in token of a batch, verl's ``masked_whiten``: ``(a − mean) /
    sqrt(var + eps)`` with the Bessel-corrected variance of the tokens where ``mask`` is 1 (each token counts, so
    long rows weigh more); ``shift_mean=False`` adds the mean back. Masked-out positions are 0. TreePO applies it
    to its advantages over the whole batch. ``adv`` and ``mask`` are (B, T)."""
    adv = np.asarray(adv, dtype=float)
    m = np.asarray(mask, dtype=float)
    if adv.shape != m.shape:
        raise AdvantageError(f"advantages {adv.shape} and mask {m.shape} differ in shape")
    n = m.sum()
    if n < 2:
        raise AdvantageError(f"whitening needs at least 2 masked-in tokens, got {n:g}")
    mean = (adv * m).sum() / n
    var = (((adv - mean) ** 2) * m).sum() / (n - 1)
    out = (adv - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def thr_weights(scores: Sequence[np.ndarray], *, p: float, tau: float = 0.0) -> list[np.ndarray]:
    """Per-token weights for THR-guided reweighting: Deng, Ren, Li, Gong, Sutherland, Li, Thrampoulidis (2025),
    "Token Hidden Reward: Steering Exploration-Exploitation in Group Relative Deep Reinforcement Learning" (arXiv
    2510.03669).

    ``scores`` [L][T_l] are each token's THR (its influence on the likelihood of the group's correct responses,
    positive = exploitation, negative = exploration). A token with THR ``> tau`` gets weight ``1 + p``, one with THR
    ``< −tau`` gets ``1 − p``, the rest 1: multiply them into :func:`token_advantages`' rows. ``p > 0`` amplifies
    positive-THR tokens and weakens negative ones (the paper: better greedy accuracy); ``p < 0`` the reverse
    (better pass@k).

    Not here: computing THR itself needs the policy's hidden states and token distributions during training, so it
    belongs to the training loop, and the paper's exact formula, its ``p`` and threshold could not be checked: ``p``
    has no default, and ``|p| ≤ 1`` keeps every weight ≥ 0 (no advantage changes sign).
    """
    if not (math.isfinite(p) and -1 <= p <= 1):
        raise AdvantageError(f"p must be in [-1, 1] so that no weight is negative, got {p}")
    if not (math.isfinite(tau) and tau >= 0):
        raise AdvantageError(f"tau must be a finite number ≥ 0, got {tau}")
    out = []
    for row in scores:
        x = np.asarray(row, dtype=float)
        if not np.all(np.isfinite(x)):
            raise AdvantageError("THR scores must be finite")
        out.append(np.where(x > tau, 1.0 + p, np.where(x < -tau, 1.0 - p, 1.0)))
    return out


# ---------------------------------------------------------------------- slow references (tests check agreement)
def _slow_treepo(
    tree: Tree, rewards: Mapping[int, float], *, size_weighted: bool, skip_flat_subgroups: bool
) -> dict[int, float]:
    """TreePO's released loop, transcribed: leaves as path strings ``"0#a#b"``, grouped by prefix depth by depth;
    each group's mean is recomputed from scratch. ``rewards`` are the included leaves only."""
    uid = {leaf: "#".join(str(n.id) for n in tree.path(leaf)) for leaf in rewards}
    contribs: dict[int, list[tuple[float, int]]] = defaultdict(list)
    max_depth = max(u.count("#") for u in uid.values())
    for depth in range(max_depth):
        prefix = {leaf: "#".join(u.split("#")[: depth + 1]) for leaf, u in uid.items()}
        groups: dict[str, list[float]] = defaultdict(list)
        for leaf, pre in prefix.items():
            groups[pre].append(rewards[leaf])
        for leaf, pre in prefix.items():
            g = groups[pre]
            mean = sum(g) / len(g)
            flat = max(g) == min(g)
            if depth == 0 or (len(g) > 1 and not (skip_flat_subgroups and flat)):
                contribs[leaf].append((rewards[leaf] - mean, len(g)))
    out = {}
    for leaf, cs in contribs.items():
        if size_weighted:
            out[leaf] = sum(c * g for c, g in cs) / sum(g for _, g in cs)
        else:
            out[leaf] = sum(c for c, _ in cs) / len(cs)
    return out


def _slow_leaf_means(tree: Tree, rewards: Mapping[int, float]) -> dict[int, float]:
    """Mean included leaf reward below each node, by walking every subtree from scratch."""
    out = {}
    for n in tree.nodes:
        below = [rewards[leaf] for leaf in _below(tree, n.id, rewards)]
        if below:
            out[n.id] = sum(below) / len(below)
    return out
