"""TreeGRPOTrainer: tree rollouts and (B, T) tree advantages inside TRL's real GRPOTrainer, on CPU."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

import treeward
from treeward.credit.records import Advantages
from treeward.tree import Problem, Tree

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install treeward[trl])"
)


def test_prompt_runs_and_token_matrix_by_hand() -> None:
    from treeward.train.trl_tree import TreeRolloutError, prompt_runs, token_matrix

    assert prompt_runs(["a", "a", "b", "b"], 2) == ["a", "b"]
    with pytest.raises(TreeRolloutError, match="not 2 copies"):
        prompt_runs(["a", "b", "b", "b"], 2)
    with pytest.raises(TreeRolloutError, match="whole number"):
        prompt_runs(["a", "a", "a"], 2)
    tree = Tree.new(Problem(id="q", prompt="Q"), [1])
    a = tree.add(0, text="A", token_ids=[5, 6]).id
    tree.add(a, text="A1", token_ids=[7])  # leaf 2
    tree.add(0, text="B", token_ids=[8, 9, 10])  # leaf 3, excluded by the estimator
    adv = Advantages(leaves=(2,), node_ids=((1, 2),), values=((0.5, -1.0),))
    out = token_matrix([tree], [adv], [(0, 3), (0, 2)], width=4)
    # row 0 is leaf 3: not in the record → zeros; row 1 is leaf 2: A's 2 tokens at 0.5, A1's token at −1
    assert out.tolist() == [[0, 0, 0, 0], [0.5, 0.5, -1.0, 0]]


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_two_tree_grpo_steps_on_the_shipped_policy(tmp_path: Any, one_thread: None) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from treeward.credit.advantages import token_advantages, treerpo
    from treeward.rewards import to_trl
    from treeward.search.rollouts import tree_rollouts
    from treeward.tasks import ArithmeticAnswer, generate_problems
    from treeward.train.trl_tree import TreeGRPOTrainer

    calls: list[tuple[Tree, dict[int, float], Advantages]] = []

    def recording_treerpo(tree: Tree, rewards: Mapping[int, float]) -> Advantages:
        adv = treerpo(tree, rewards)
        calls.append((tree, dict(rewards), adv))
        return adv

    outputs: list[dict[str, Any]] = []

    class Recorder(TreeGRPOTrainer):
        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            out = super()._generate_and_score_completions(inputs)
            outputs.append({"adv": out["advantages"].clone(), "ids": out["completion_ids"].clone()})
            return out

    tok = AutoTokenizer.from_pretrained(treeward.SHIPPED_POLICY)
    model = AutoModelForCausalLM.from_pretrained(treeward.SHIPPED_POLICY, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problems = generate_problems(2, 3, seed=5)
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in problems]  # no BOS: the engine adds it
    cfg = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=8,  # 2 prompts × 4 leaves
        num_generations=4,
        max_completion_length=128,
        learning_rate=1e-4,
        beta=0.0,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Recorder(
        model=model,
        reward_funcs=to_trl(ArithmeticAnswer()),
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        sampler=functools.partial(tree_rollouts, max_step_tokens=24, max_depth=6),
        advantage=recording_treerpo,
    )
    trainer.train()

    assert len(outputs) == 2 and len(calls) == 4  # 2 steps × 2 trees
    for tree, rewards, _ in calls:
        assert len(tree.leaves()) == 4 and tree.root.token_ids[0] == tok.bos_token_id
        assert set(rewards) <= {n.id for n in tree.leaves()}
        assert set(rewards.values()) <= {0.0, 1.0}  # ArithmeticAnswer through TRL's reward path
    for step, out in enumerate(outputs):
        # the (B, T) tensor TRL trained on is the estimator's token advantages, row by row
        assert out["adv"].dim() == 2 and out["adv"].shape == out["ids"].shape
        b = 0
        for tree, _, adv in calls[2 * step : 2 * step + 2]:
            rows_by_leaf = dict(zip(adv.leaves, token_advantages(tree, adv), strict=True))
            for leaf in sorted(n.id for n in tree.leaves()):
                ids = [t for n in tree.path(leaf)[1:] for t in n.token_ids]
                assert out["ids"][b, : len(ids)].tolist() == ids  # completion ids straight from the tree
                want = rows_by_leaf.get(leaf, np.zeros(len(ids)))
                assert np.allclose(out["adv"][b, : len(ids)].numpy(), want, atol=1e-6)
                b += 1
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved
    assert any("reward" in h for h in trainer.state.log_history)
