"""Tree advantages on hand-built trees (expected numbers derived in the comments), properties over random trees, and
agreement of the fast estimators with their slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeward.credit.advantages import (
    ESTIMATORS,
    AdvantageError,
    _leaf_means,
    _slow_leaf_means,
    _slow_treepo,
    completion_ids,
    dr_grpo,
    grpo,
    mc_step_utility,
    pad_advantages,
    process_advantages,
    redistribute,
    rloo,
    sibling_grpo,
    slate,
    thr_weights,
    token_advantages,
    treepo,
    treerpo,
    unlikeliness,
    whiten_tokens,
)
from treeward.credit.records import Advantages
from treeward.rewards.process import ClipSteps, DeltaSteps
from treeward.tree import Problem, Tree

EPS = 1e-4


def _tree() -> Tree:
    """The running example (ids in brackets, tokens per step in parentheses)::

        root[0] ─ a[1](2) ─ c[3](1)            leaf, r = 1
                │         └ g[4](3) ─ d[6](1)  leaf, r = 0
                │                   └ f[7](2)  leaf, r = 0
                └ b[2](1) ─ e[5](2)            leaf, r = 1

    Flat leaf means V: root 2/4 = .5, a 1/3, b 1, g 0, leaves their rewards.
    TreeRPO's recursive means: g = mean(0, 0) = 0, a = mean(c 1, g 0) = .5, b = 1.
    """
    t = Tree.new(Problem("p", "Q"), [1, 2])
    t.add(0, text="a", token_ids=[10, 11], logprobs=[-0.5, -0.5])
    t.add(0, text="b", token_ids=[12], logprobs=[-1.0])
    t.add(1, text="c", token_ids=[13], logprobs=[-0.1])
    t.add(1, text="g", token_ids=[14, 15, 16], logprobs=[-0.2, -0.2, -0.2])
    t.add(2, text="e", token_ids=[17, 18], logprobs=[-0.3, -0.3])
    t.add(4, text="d", token_ids=[19], logprobs=[-2.0])
    t.add(4, text="f", token_ids=[20, 21], logprobs=[-1.0, -1.0])
    return t


R = {3: 1.0, 5: 1.0, 6: 0.0, 7: 0.0}
Z = 0.5 / (
    math.sqrt(1 / 3) + EPS
)  # rewards 1, 1, 0, 0: mean .5, Bessel std sqrt(4·.25/3) = .57735 → ±.865875


def _paths(adv: Advantages) -> dict[int, tuple[float, ...]]:
    return dict(zip(adv.leaves, adv.values, strict=True))


def _close(adv: Advantages, expected: dict[int, list[float]]) -> None:
    got = _paths(adv)
    assert set(got) == set(expected)
    for leaf, vals in expected.items():
        assert got[leaf] == pytest.approx(vals, abs=1e-9), leaf


# ---------------------------------------------------------------------- hand-built trees
def test_grpo_dr_grpo_rloo_repeat_one_number_along_each_path() -> None:
    t = _tree()
    adv = grpo(t, R)
    assert adv.leaves == (3, 5, 6, 7)
    assert adv.node_ids == ((1, 3), (2, 5), (1, 4, 6), (1, 4, 7))
    _close(adv, {3: [Z, Z], 5: [Z, Z], 6: [-Z] * 3, 7: [-Z] * 3})
    # Dr. GRPO: r − mean = ±.5
    _close(dr_grpo(t, R), {3: [0.5] * 2, 5: [0.5] * 2, 6: [-0.5] * 3, 7: [-0.5] * 3})
    assert dr_grpo(t, R).metadata["estimator"] == "dr_grpo"
    # RLOO: 1 − (1 + 0 + 0)/3 = 2/3; 0 − (1 + 1 + 0)/3 = −2/3
    _close(rloo(t, R), {3: [2 / 3] * 2, 5: [2 / 3] * 2, 6: [-2 / 3] * 3, 7: [-2 / 3] * 3})


def test_treerpo_uses_recursive_means_and_sibling_groups() -> None:
    t = _tree()
    # root group a(.5) vs b(1): mean .75 → a −.25, b +.25; a's group c(1) vs g(0): ±.5; g's group d, f (0, 0): 0;
    # e is an only child: 0
    _close(
        treerpo(t, R, scale=False),
        {3: [-0.25, 0.5], 5: [0.25, 0.0], 6: [-0.25, -0.5, 0.0], 7: [-0.25, -0.5, 0.0]},
    )
    # scaled: a two-member group (x, y) has Bessel std |x − y|/√2, so ±(|x−y|/2)/(|x−y|/√2 + eps)
    root = 0.25 / (0.5 / math.sqrt(2) + EPS)  # .706907
    mid = 0.5 / (1 / math.sqrt(2) + EPS)  # .707007
    _close(treerpo(t, R), {3: [-root, mid], 5: [root, 0.0], 6: [-root, -mid, 0.0], 7: [-root, -mid, 0.0]})


def test_sibling_grpo_uses_flat_leaf_means() -> None:
    t = _tree()
    # root group a(1/3) vs b(1): mean 2/3 → a −1/3, b +1/3 (TreeRPO's recursive a = .5 gave ±.25)
    _close(
        sibling_grpo(t, R, scale=False),
        {3: [-1 / 3, 0.5], 5: [1 / 3, 0.0], 6: [-1 / 3, -0.5, 0.0], 7: [-1 / 3, -0.5, 0.0]},
    )


def test_treepo_averages_subgroup_advantages() -> None:
    t = _tree()
    # c (r 1): root group (4 leaves, mean .5) → +.5; a (3 leaves, mean 1/3) → +2/3; average .583333
    # e (r 1): root → +.5; b holds one leaf → skipped; .5
    # d (r 0): root −.5; a −1/3; g (d, f: mean 0) → 0; average −.833333/3 = −.277778
    _close(treepo(t, R), {3: [7 / 12] * 2, 5: [0.5] * 2, 6: [-5 / 18] * 3, 7: [-5 / 18] * 3})
    # size-weighted: c (4·.5 + 3·2/3)/7 = 4/7; d (4·−.5 + 3·−1/3 + 2·0)/9 = −1/3
    _close(treepo(t, R, size_weighted=True), {3: [4 / 7] * 2, 5: [0.5] * 2, 6: [-1 / 3] * 3, 7: [-1 / 3] * 3})
    # skipping the flat sub-group g: d (−.5 − 1/3)/2 = −5/12
    _close(
        treepo(t, R, skip_flat_subgroups=True),
        {3: [7 / 12] * 2, 5: [0.5] * 2, 6: [-5 / 12] * 3, 7: [-5 / 12] * 3},
    )


def test_mc_step_utility_is_the_change_in_leaf_mean() -> None:
    t = _tree()
    # A(n) = V(n) − V(parent): a 1/3 − .5 = −1/6, b 1 − .5 = .5, c 1 − 1/3 = 2/3, g 0 − 1/3 = −1/3, e/d/f 0
    _close(
        mc_step_utility(t, R),
        {3: [-1 / 6, 2 / 3], 5: [0.5, 0.0], 6: [-1 / 6, -1 / 3, 0.0], 7: [-1 / 6, -1 / 3, 0.0]},
    )
    # global_weight 1 adds V(n) − V(root): a −1/6 → −1/3, c +.5 → 7/6, b +.5 → 1, e +.5, g −.5 → −5/6, d/f −.5
    _close(
        mc_step_utility(t, R, global_weight=1.0),
        {3: [-1 / 3, 7 / 6], 5: [1.0, 0.5], 6: [-1 / 3, -5 / 6, -0.5], 7: [-1 / 3, -5 / 6, -0.5]},
    )


def test_slate_scores_inner_steps_with_their_node_reward() -> None:
    t = _tree()
    t.nodes[1].reward, t.nodes[2].reward, t.nodes[4].reward = 0.2, 0.8, 0.4
    # root group a(.2) vs b(.8): ∓.3; a's group c (leaf, 1) vs g (.4): ±.3; d/f (0, 0): 0; e only child: 0
    _close(
        slate(t, R, scale=False),
        {3: [-0.3, 0.3], 5: [0.3, 0.0], 6: [-0.3, -0.3, 0.0], 7: [-0.3, -0.3, 0.0]},
    )
    # g's judge failed: d and f are excluded, and c has no scored sibling left (0)
    t.nodes[4].reward, t.nodes[4].status = None, "timeout"
    adv = slate(t, R, scale=False)
    _close(adv, {3: [-0.3, 0.0], 5: [0.3, 0.0]})
    assert adv.metadata["excluded"] == (6, 7)
    assert "status 'timeout'" in adv.metadata["reasons"][6]


def _chain_tree() -> Tree:
    """root ─ p[1](r .5) ─ q[2](r 1)  leaf, outcome 1;   root ─ s[3](r .5) ─ u[4](r 0)  leaf, outcome 0."""
    t = Tree.new(Problem("c", "Q"), [1])
    t.add(0, text="p", token_ids=[5], reward=0.5)
    t.add(1, text="q", token_ids=[6], reward=1.0)
    t.add(0, text="s", token_ids=[7], reward=0.5)
    t.add(3, text="u", token_ids=[8], reward=0.0)
    return t


def test_process_advantages_deepseekmath_and_clip_delta() -> None:
    t = _chain_tree()
    rewards = {2: 1.0, 4: 0.0}
    # pooled step rewards .5, 1, .5, 0: mean .5, Bessel std sqrt(.5/3); z = 0, +k, 0, −k; returns-to-go
    k = 0.5 / (math.sqrt(0.5 / 3) + EPS)  # 1.224445
    _close(process_advantages(t, rewards), {2: [k, k], 4: [-k, -k]})
    # Clip η=.8: min(r − .8, 0) → [−.3, 0] and [−.3, −.8]; outcome at the last step → [−.3, 1], [−.3, −.8];
    # returns [.7, 1] and [−1.1, −.8]
    clip = process_advantages(t, rewards, refine=ClipSteps(0.8), outcome_weight=1.0, normalize=False)
    _close(clip, {2: [0.7, 1.0], 4: [-1.1, -0.8]})
    assert clip.metadata["knobs"]["refine"] == {"type": "ClipSteps", "eta": 0.8}
    # Delta: [.5 − 1, 0] + outcome → [−.5, 1] → returns [.5, 1]; [.5 − 0, 0] + 0 → returns [.5, 0]
    delta = process_advantages(t, rewards, refine=DeltaSteps(), outcome_weight=1.0, normalize=False)
    _close(delta, {2: [0.5, 1.0], 4: [0.5, 0.0]})
    # an unscored step excludes its leaf, with the reason
    t.nodes[3].reward = None
    adv = process_advantages(t, rewards, normalize=False)
    _close(adv, {2: [1.5, 1.0]})
    assert adv.metadata["reasons"] == {4: "step 3 has no reward (process rewards need every step scored)"}


def _three_leaves() -> Tree:
    """root ─ x[1], y[2], z[3], two tokens each, mean per-token log-probs −1, −2, −3."""
    t = Tree.new(Problem("u", "Q"), [1])
    for name, lp in (("x", -1.0), ("y", -2.0), ("z", -3.0)):
        t.add(0, text=name, token_ids=[4, 5], logprobs=[lp, lp])
    return t


def test_unlikeliness_ranks_by_path_logprob_then_zscores() -> None:
    t = _three_leaves()
    # ranks (least likely first): z 0, y 1, x 2; G = 3, β = .25 → factors 1, 1 − .25/3, 1 − .5/3
    shaped = [1 * (1 - 0.5 / 3), 1 * (1 - 0.25 / 3), 0.0]  # x .833333, y .916667, z 0
    mean = sum(shaped) / 3
    std = math.sqrt(sum((s - mean) ** 2 for s in shaped) / 2)
    expected = [(s - mean) / (std + EPS) for s in shaped]  # .4931, .6575, −1.1506
    _close(unlikeliness(t, {1: 1.0, 2: 1.0, 3: 0.0}), {i + 1: [v] for i, v in enumerate(expected)})
    # x more likely than y, so x gets the smaller advantage though both are correct
    adv = _paths(unlikeliness(t, {1: 1.0, 2: 1.0, 3: 0.0}))
    assert adv[1][0] < adv[2][0]
    # a path without logprobs is excluded, not ranked
    t.nodes[2].logprobs = ()
    adv2 = unlikeliness(t, {1: 1.0, 2: 1.0, 3: 0.0})
    assert adv2.leaves == (1, 3)
    assert adv2.metadata["reasons"][2] == "step 2 has tokens but no logprobs"


def test_redistribute_spreads_the_grpo_advantage_by_value_change() -> None:
    t = _tree()
    # c: |ΔV| a 1/6, c 2/3, sum 5/6 → w̃ = 2·(1/6)/(5/6) = .4, 1.6; e: .5, 0 → 2, 0; d: 1/6, 1/3, 0 → 1, 2, 0
    _close(
        redistribute(t, R),
        {3: [0.4 * Z, 1.6 * Z], 5: [2 * Z, 0.0], 6: [-Z, -2 * Z, 0.0], 7: [-Z, -2 * Z, 0.0]},
    )
    # a token-count importance: c's path a(2), c(1) → w̃ = 2·2/3, 2·1/3
    by_tokens = redistribute(t, R, importance=lambda tree, n: float(len(n.token_ids)))
    assert _paths(by_tokens)[3] == pytest.approx([4 / 3 * Z, 2 / 3 * Z])
    with pytest.raises(AdvantageError, match="finite and ≥ 0"):
        redistribute(t, R, importance=lambda tree, n: -1.0)


# ---------------------------------------------------------------------- inputs
def test_missing_and_none_rewards_are_excluded_and_listed() -> None:
    t = _tree()
    adv = grpo(t, {3: 1.0, 5: None, 6: 0.0})
    # only c (1) and d (0): mean .5, std 1/√2 → ±.5/(.707107 + eps)
    assert adv.leaves == (3, 6)
    assert adv.metadata["excluded"] == (5, 7)
    assert adv.metadata["reasons"] == {5: "reward is None", 7: "no reward"}
    assert _paths(adv)[3][0] == pytest.approx(0.5 / (1 / math.sqrt(2) + EPS))


@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        ({1: 1.0}, "inner node"),
        ({0: 1.0}, "the root"),
        ({99: 1.0}, "not a node"),
        ({3: float("nan")}, "finite number"),
        ({3: float("inf")}, "finite number"),
        ({3: True}, "finite number"),
        ({"3": 1.0}, "keyed by leaf node id"),
    ],
)
def test_bad_rewards_raise_one_clear_error(rewards: dict, match: str) -> None:
    with pytest.raises(AdvantageError, match=match):
        grpo(_tree(), rewards)


def test_knobs_out_of_range_raise() -> None:
    with pytest.raises(AdvantageError, match="eps"):
        grpo(_tree(), R, eps=-1.0)
    with pytest.raises(AdvantageError, match="beta"):
        unlikeliness(_tree(), R, beta=2.0)
    with pytest.raises(AdvantageError, match="p must be"):
        thr_weights([np.zeros(2)], p=1.5)


def test_non_finite_step_reward_is_an_error_not_an_exclusion() -> None:
    t = _chain_tree()
    t.nodes[1].reward = float("nan")
    with pytest.raises(AdvantageError, match="step 1 has reward nan"):
        process_advantages(t, {2: 1.0, 4: 0.0})


# ---------------------------------------------------------------------- token level
def test_token_advantages_expand_steps_to_their_tokens() -> None:
    t = _tree()
    adv = treerpo(t, R, scale=False)
    rows = token_advantages(t, adv)
    # c: a (2 tokens) −.25, c (1) .5;  e: b (1) .25, e (2) 0;  d: a −.25 ×2, g −.5 ×3, d 0;  f: …, f 0 ×2
    assert rows[0].tolist() == [-0.25, -0.25, 0.5]
    assert rows[1].tolist() == [0.25, 0.0, 0.0]
    assert rows[2].tolist() == [-0.25, -0.25, -0.5, -0.5, -0.5, 0.0]
    assert rows[3].tolist() == [-0.25, -0.25, -0.5, -0.5, -0.5, 0.0, 0.0]
    assert completion_ids(t, adv)[3] == [10, 11, 14, 15, 16, 20, 21]
    # each step once: a is first met in c's row, g in d's row; f's row keeps only f
    once = token_advantages(t, adv, each_step_once=True)
    assert once[2].tolist() == [0.0, 0.0, -0.5, -0.5, -0.5, 0.0]
    assert once[3].tolist() == [0.0] * 7


def test_pad_advantages_right_pads_a_batch_of_trees() -> None:
    t1, t2 = _tree(), _three_leaves()
    a1, a2 = dr_grpo(t1, R), dr_grpo(t2, {1: 1.0, 2: 0.0})
    out = pad_advantages([(t1, a1), (t2, a2)])
    # rows: 4 leaves of t1 (3, 3, 6, 7 tokens) then 2 of t2 (2, 2 tokens), width = 7
    assert out.shape == (6, 7)
    assert out[0].tolist() == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert out[3].tolist() == [-0.5] * 7
    assert out[5].tolist() == [-0.5, -0.5, 0, 0, 0, 0, 0]
    assert pad_advantages([(t2, a2)], width=5).shape == (2, 5)
    with pytest.raises(AdvantageError, match="larger width"):
        pad_advantages([(t1, a1)], width=6)
    with pytest.raises(AdvantageError, match="empty batch"):
        pad_advantages([])


def test_a_record_from_another_tree_is_rejected() -> None:
    t = _tree()
    adv = grpo(t, R)
    broken = Advantages(adv.leaves, ((1, 4, 3), *adv.node_ids[1:]), adv.values)
    with pytest.raises(AdvantageError, match="its path is"):
        token_advantages(t, broken)
    with pytest.raises(AdvantageError, match="advantages hold"):
        token_advantages(t, Advantages(adv.leaves, adv.node_ids, adv.values[:2]))


def test_whiten_tokens_over_masked_in_tokens() -> None:
    adv = np.array([[1.0, 3.0, 9.0], [2.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    # tokens 1, 3, 2: mean 2, Bessel variance (1 + 1 + 0)/2 = 1 → −1, +1, 0; padding 0
    assert whiten_tokens(adv, mask) == pytest.approx(np.array([[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), abs=1e-7)
    assert whiten_tokens(adv, mask, shift_mean=False) == pytest.approx(
        np.array([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]]), abs=1e-7
    )
    with pytest.raises(AdvantageError, match="at least 2"):
        whiten_tokens(adv, np.array([[1, 0, 0], [0, 0, 0]]))


def test_thr_weights_amplify_positive_and_damp_negative_tokens() -> None:
    scores = [np.array([0.5, -0.2, 0.0]), np.array([-1.0])]
    # p = .5: THR > 0 → 1.5, < 0 → .5, 0 → 1
    assert [w.tolist() for w in thr_weights(scores, p=0.5)] == [[1.5, 0.5, 1.0], [0.5]]
    # tau = .3 leaves |THR| ≤ .3 at 1; p < 0 (exploration) reverses the roles
    assert [w.tolist() for w in thr_weights(scores, p=-0.5, tau=0.3)] == [[0.5, 1.0, 1.0], [1.5]]


# ---------------------------------------------------------------------- properties over random trees
@st.composite
def trees(draw: st.DrawFn) -> tuple[Tree, dict[int, float]]:
    """A random tree (each node's parent drawn among the earlier ones) with tokens, logprobs and step rewards on
    every node, and a reward for every leaf (binary or continuous)."""
    n = draw(st.integers(2, 12))
    t = Tree.new(Problem("h", "Q"), [1])
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        k = draw(st.integers(1, 3))
        lps = draw(st.lists(st.floats(-5.0, -0.01), min_size=k, max_size=k))
        t.add(parent, text=f"s{i}", token_ids=[i] * k, logprobs=lps, reward=draw(st.floats(0.0, 1.0)))
    value = st.sampled_from([0.0, 1.0]) if draw(st.booleans()) else st.floats(-3.0, 3.0)
    rewards = {leaf.id: draw(value) for leaf in t.leaves()}
    return t, rewards


def _flat(adv: Advantages) -> list[float]:
    return [v for row in adv.values for v in row]


def _by_node(adv: Advantages) -> dict[int, float]:
    out: dict[int, float] = {}
    for ids, vals in zip(adv.node_ids, adv.values, strict=True):
        for i, v in zip(ids, vals, strict=True):
            assert out.setdefault(i, v) == pytest.approx(v)  # a shared step has one advantage
    return out


@settings(max_examples=60, deadline=None)
@given(trees())
def test_group_advantages_sum_to_zero(case: tuple[Tree, dict[int, float]]) -> None:
    t, rewards = case
    # sequence level: GRPO (scaled or not), Dr. GRPO, RLOO, unlikeliness sum to 0 over the leaves
    for adv in (grpo(t, rewards), dr_grpo(t, rewards), rloo(t, rewards), unlikeliness(t, rewards)):
        assert math.fsum(v[0] for v in adv.values) == pytest.approx(0.0, abs=1e-9)
    # step level: TreeRPO, Sibling-GRPO, SLATE sum to 0 within every sibling group of ≥ 2
    for fn in (treerpo, sibling_grpo, slate):
        for scale in (True, False):
            a = _by_node(fn(t, rewards, scale=scale))
            for p in t.nodes:
                if len(p.children) > 1:
                    assert math.fsum(a[c] for c in p.children) == pytest.approx(0.0, abs=1e-9)
    # MC step utility: Σ_children |leaves below| · (V(c) − V(p)) = 0 at every inner node
    a = _by_node(mc_step_utility(t, rewards))
    below = {n.id: sum(1 for m in t.iter_depth_first(n.id) if m.id in rewards) for n in t.nodes}
    for p in t.nodes:
        if p.children:
            assert math.fsum(below[c] * a[c] for c in p.children) == pytest.approx(0.0, abs=1e-9)
    # process (normalised): the first steps' returns add up to the sum of all pooled z-scores, 0
    assert math.fsum(v[0] for v in process_advantages(t, rewards).values) == pytest.approx(0.0, abs=1e-8)


@settings(max_examples=60, deadline=None)
@given(trees(), st.floats(-2.0, 2.0))
def test_one_shared_reward_gives_zero_everywhere(case: tuple[Tree, dict[int, float]], r: float) -> None:
    t, rewards = case
    for n in t.nodes[1:]:
        n.reward = r  # SLATE and the process estimator read step rewards: the same everywhere too
    same = dict.fromkeys(rewards, r)
    for name, fn in ESTIMATORS.items():
        if name == "unlikeliness":
            continue  # by design: equal non-zero rewards are reweighted by likelihood rank (tested at r = 0)
        assert all(v == 0.0 for vals in fn(t, same).values for v in vals), name  # exactly: no rounding noise
    assert all(v == 0.0 for vals in unlikeliness(t, dict.fromkeys(rewards, 0.0)).values for v in vals)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=10))
def test_a_flattened_tree_gives_grpo(rs: list[float]) -> None:
    t = Tree.new(Problem("f", "Q"), [1])
    for i in range(len(rs)):
        t.add(0, text=f"s{i}", token_ids=[i, i])
    rewards = {i + 1: r for i, r in enumerate(rs)}
    scaled, unscaled = _flat(grpo(t, rewards)), _flat(dr_grpo(t, rewards))
    for fn in (treerpo, sibling_grpo, slate):
        assert _flat(fn(t, rewards)) == pytest.approx(scaled, abs=1e-12)
        assert _flat(fn(t, rewards, scale=False)) == pytest.approx(unscaled, abs=1e-12)
    assert _flat(redistribute(t, rewards)) == pytest.approx(scaled, abs=1e-12)
    assert _flat(treepo(t, rewards)) == pytest.approx(unscaled, abs=1e-12)
    assert _flat(treepo(t, rewards, size_weighted=True)) == pytest.approx(unscaled, abs=1e-12)
    assert _flat(mc_step_utility(t, rewards)) == pytest.approx(unscaled, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(trees(), st.booleans(), st.booleans())
def test_fast_estimators_agree_with_slow_references(
    case: tuple[Tree, dict[int, float]], size_weighted: bool, skip_flat: bool
) -> None:
    t, rewards = case
    assert _leaf_means(t, rewards) == pytest.approx(_slow_leaf_means(t, rewards), abs=1e-12)
    fast = treepo(t, rewards, size_weighted=size_weighted, skip_flat_subgroups=skip_flat)
    slow = _slow_treepo(t, rewards, size_weighted=size_weighted, skip_flat_subgroups=skip_flat)
    assert {leaf: v[0] for leaf, v in _paths(fast).items()} == pytest.approx(slow, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(trees(), st.sampled_from(sorted(ESTIMATORS)))
def test_token_rows_match_path_token_counts(case: tuple[Tree, dict[int, float]], name: str) -> None:
    t, rewards = case
    adv = ESTIMATORS[name](t, rewards)
    rows = token_advantages(t, adv)
    ids = completion_ids(t, adv)
    assert adv.leaves == tuple(sorted(rewards))
    for leaf, row, cid, vals, nodes in zip(adv.leaves, rows, ids, adv.values, adv.node_ids, strict=True):
        assert len(row) == len(cid) == sum(len(n.token_ids) for n in t.path(leaf)[1:])
        assert row.tolist() == [v for v, n in zip(vals, nodes, strict=True) for _ in t.nodes[n].token_ids]
    padded = pad_advantages([(t, adv)])
    assert padded.shape == (len(rows), max(len(r) for r in rows))
    for i, row in enumerate(rows):
        assert padded[i, : len(row)].tolist() == row.tolist()
        assert not padded[i, len(row) :].any()
