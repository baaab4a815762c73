"""The verl estimator: trees rebuilt from path uids, advantages laid out as verl's (B, T) tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from treeward.credit.advantages import grpo, token_advantages, treerpo
from treeward.train.verl_tree import UidError, leaf_uids, tree_advantage, trees_from_uids
from treeward.tree import Problem, Tree


def _verl_batch(rows: list[tuple[int, float]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's layout: right-padded responses, the scalar reward on the last response token."""
    rewards = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (n, r) in enumerate(rows):
        mask[b, :n] = 1
        rewards[b, n - 1] = r
    return rewards, mask


def test_flat_batch_with_verl_prompt_uids_is_grpo() -> None:
    rewards, mask = _verl_batch([(2, 1.0), (3, 0.0), (1, 0.0), (2, 1.0)], width=4)
    index = np.array(["p0"] * 4, dtype=object)  # verl's own uid: one per prompt
    adv, returns = tree_advantage(rewards, mask, index)
    # mean 0.5, Bessel std sqrt(4 · 0.25 / 3) = 0.57735; (±0.5) / (0.57735 + 1e-4) = ±0.86588
    z = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([[z, z, 0, 0], [-z, -z, -z, 0], [-z, 0, 0, 0], [z, z, 0, 0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.equal(adv, returns)
    trees, _ = trees_from_uids(list(index), [2, 3, 1, 2])
    flat = grpo(trees[0], {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0})
    assert [v[0] for v in flat.values] == pytest.approx([z, -z, -z, z])


def _tree() -> Tree:
    tree = Tree.new(Problem(id="q", prompt="Q"), [1, 2])
    a = tree.add(0, text="A", token_ids=[5, 6]).id
    tree.add(a, text="A1", token_ids=[7])  # node 2, reward 1
    tree.add(a, text="A2", token_ids=[8, 9, 10])  # node 3, reward 0
    tree.add(0, text="B", token_ids=[11])  # node 4, reward 0
    return tree


def test_tree_paths_round_trip_and_give_treerpo_per_token() -> None:
    tree = _tree()
    uids = leaf_uids(tree, "q")
    assert uids == {2: "q#0.2#0.1", 3: "q#0.2#1.3", 4: "q#1.1"}
    rewards, mask = _verl_batch([(3, 1.0), (5, 0.0), (1, 0.0)], width=6)
    adv, _ = tree_advantage(rewards, mask, [uids[2], uids[3], uids[4]], estimator="treerpo")
    # TreeRPO: A1 = 1, A2 = 0, A = mean 0.5, B = 0.
    # root group {A .5, B 0}: mean .25, std sqrt(2 · .0625 / 1) = 0.35355 → ±.25 / 0.35365 = ±0.70691
    # A's group {1, 0}: mean .5, std 0.70711 → ±.5 / 0.70721 = ±0.70701
    a, c = 0.25 / (math.sqrt(0.125) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)
    expected = torch.tensor(
        [[a, a, c, 0, 0, 0], [a, a, -c, -c, -c, 0], [-a, 0, 0, 0, 0, 0]], dtype=torch.float32
    )
    assert torch.allclose(adv, expected, atol=1e-6)
    # the same numbers as the estimator on the original tree
    direct = treerpo(tree, {2: 1.0, 3: 0.0, 4: 0.0})
    rows = dict(zip(direct.leaves, token_advantages(tree, direct), strict=True))
    for b, leaf in enumerate([2, 3, 4]):
        assert adv[b, : len(rows[leaf])].tolist() == pytest.approx(rows[leaf].tolist(), abs=1e-6)


def test_bad_uids_are_refused_with_the_reason() -> None:
    rewards, mask = _verl_batch([(3, 1.0), (2, 0.0)], width=3)
    with pytest.raises(UidError, match="names 2 tokens but its response mask has 3"):
        tree_advantage(rewards, mask, ["q#0.2", "q#1.2"])
    with pytest.raises(UidError, match=r"not '<branch>\.<tokens>'"):
        tree_advantage(rewards, mask, ["q#0.3", "q#x"])
    with pytest.raises(UidError, match="share the path"):
        trees_from_uids(["q#0.2", "q#0.2"], [2, 2])
    with pytest.raises(UidError, match="continue"):
        trees_from_uids(["q#0.2", "q#0.2#0.1"], [2, 3])
    with pytest.raises(UidError, match="contains '#'"):
        leaf_uids(_tree(), "a#b")
