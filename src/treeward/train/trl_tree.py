"""Tree rollouts and token-level tree advantages inside TRL's ``GRPOTrainer``: :class:`TreeGRPOTrainer`.

TRL declined tree credit assignment as out of scope (huggingface/trl#4294) but left two hooks this module uses, and
nothing else: ``rollout_func`` (the experimental hook that replaces generation) and ``(B, T)`` advantages (its
``_compute_loss`` accepts per-token advantages "to support subclasses"). Everything else (reward functions and their
weights, the clipped loss, KL, logging, checkpoints, accelerate) stays TRL's.

How a generation batch flows:

1. TRL hands ``rollout_func`` the batch's prompts, each repeated ``num_generations`` times in a row (its sampler
   repeats every dataset row). Each run of ``num_generations`` identical prompts becomes one :class:`Problem`.
2. ``sampler(problems, policy, leaves=num_generations, seed=...)`` grows one tree per problem with exactly
   ``num_generations`` leaves (default: :func:`treeward.search.rollouts.tree_rollouts`), through an
   :class:`~treeward.engine.hf.HFPolicy` wrapped around the trainer's own model, so shared prefixes are computed once.
3. Each leaf becomes one completion row: ``completion_ids`` are the step token ids of its path taken from the tree
   (never re-tokenised), ``logprobs`` the sampling log-probs the tree recorded.
4. TRL scores the rows with its ``reward_funcs`` as usual. The weighted sum of the reward functions (TRL's
   ``sum_then_normalize`` numerator; a row every function returned ``None`` for is left out) is handed, per tree, to
   ``advantage(tree, rewards)`` (default: TreeRPO, :func:`treeward.credit.advantages.treerpo`), expanded to tokens and
   written over TRL's ``(B,)`` group advantages as a ``(B, T)`` tensor.

Departures and limits: one process only (TRL gathers rewards across ranks; this subclass reads the local slice, so
with several processes each process must hold whole trees: it checks that every prompt run is complete). The
dataset's ``prompt`` column holds plain text *without* BOS: the policy's ``encode_prompt`` adds it. Generation for
evaluation also goes through the tree sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from trl import GRPOTrainer

from treeward.credit.records import Advantages
from treeward.engine.base import Policy
from treeward.engine.hf import HFPolicy
from treeward.tree import Problem, Tree

__all__ = ["TreeGRPOTrainer", "TreeRolloutError"]

Sampler = Callable[..., list[Tree]]
AdvantageFn = Callable[[Tree, Mapping[int, float]], Advantages]


class TreeRolloutError(ValueError):
    """The trainer's batch cannot be turned into trees (incomplete prompt groups, a sampler leaf count mismatch)."""


def _default_sampler() -> Sampler:
    from treeward.search.rollouts import tree_rollouts

    return tree_rollouts


def _default_advantage() -> AdvantageFn:
    from treeward.credit.advantages import treerpo

    return treerpo


def prompt_runs(prompts: Sequence[Any], n: int) -> list[Any]:
    """The distinct prompts of a TRL generation batch, checking it is runs of ``n`` identical prompts."""
    if n < 1 or len(prompts) % n:
        raise TreeRolloutError(
            f"{len(prompts)} prompts is not a whole number of groups of num_generations={n}"
        )
    runs = [prompts[i] for i in range(0, len(prompts), n)]
    for k, p in enumerate(runs):
        if any(q != p for q in prompts[k * n : (k + 1) * n]):
            raise TreeRolloutError(
                f"prompts {k * n}..{(k + 1) * n - 1} are not {n} copies of one prompt; TreeGRPOTrainer needs TRL's "
                "repeat sampler (each row repeated num_generations times in a row)"
            )
    return runs


def leaf_rows(tree: Tree, leaves: Sequence[int]) -> tuple[list[list[int]], list[list[float]]]:
    """Completion token ids and sampling log-probs of each leaf's path, root prompt excluded."""
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    for leaf in leaves:
        path = tree.path(leaf)[1:]
        ids.append([t for n in path for t in n.token_ids])
        lps.append([lp for n in path for lp in (n.logprobs or (0.0,) * len(n.token_ids))])
    return ids, lps


def token_matrix(
    trees: Sequence[Tree], advs: Sequence[Advantages], rows: Sequence[tuple[int, int]], width: int
) -> np.ndarray:
    """``out[b, t]`` = advantage of token ``t`` of row ``b``'s completion, [B, width]; padding and excluded leaves 0.

    ``rows[b]`` is (tree index, leaf id); a leaf the estimator left out (its reward was ``None``) gets zeros, as TRL
    does for an unscorable row. Token values come from :func:`treeward.credit.advantages.token_advantages`.
    """
    from treeward.credit.advantages import token_advantages

    by_leaf = [
        dict(zip(adv.leaves, token_advantages(tree, adv), strict=True))
        for tree, adv in zip(trees, advs, strict=True)
    ]
    out = np.zeros((len(rows), width), dtype=np.float32)
    for b, (ti, leaf) in enumerate(rows):
        row = by_leaf[ti].get(leaf)
        if row is not None:
            out[b, : len(row)] = row
    return out


class TreeGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose completions are the leaves of rollout trees and whose advantages are per token.

    Args (beyond ``GRPOTrainer``'s; ``rollout_func`` is taken):
        sampler: ``sampler(problems, policy, *, leaves, seed) -> list[Tree]``, each tree with exactly ``leaves``
            leaves. Default :func:`treeward.search.rollouts.tree_rollouts` with its defaults; bind knobs with
            ``functools.partial``.
        advantage: ``advantage(tree, rewards) -> Advantages`` with ``rewards`` mapping leaf id to scalar reward.
            Default TreeRPO. Bind knobs with ``functools.partial``.
        seed: base seed of the tree sampler; step ``s`` samples with ``seed + s``.
    """

    def __init__(
        self,
        *args: Any,
        sampler: Sampler | None = None,
        advantage: AdvantageFn | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("rollout_func") is not None:
            raise TypeError("TreeGRPOTrainer supplies its own rollout_func; pass `sampler=` instead")
        kwargs["rollout_func"] = self._tree_rollout
        super().__init__(*args, **kwargs)
        self.sampler: Sampler = sampler or _default_sampler()
        self.advantage: AdvantageFn = advantage or _default_advantage()
        self.tree_seed = seed
        self.trees: list[Tree] = []  # the current generation batch's trees, for inspection and export
        self._rows: list[tuple[int, int]] = []  # (tree index, leaf id) per completion row
        self._rewards: torch.Tensor | None = None
        self._policy: HFPolicy | None = None

    # -- generation ---------------------------------------------------------------------------------------------

    def policy(self) -> Policy:
        """The engine over the trainer's current model (its prefix store notices weight updates)."""
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processing_class
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TreeRolloutError("TreeGRPOTrainer needs a tokenizer as processing_class (text-only models)")
        if self._policy is None or self._policy.model is not model:
            self._policy = HFPolicy(model, tokenizer, device=str(self.accelerator.device))
        return self._policy

    def _tree_rollout(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        training = self.model is not None and self.model.training
        n = (self.num_generations if training else self.num_generations_eval) or 0
        runs = prompt_runs(prompts, n)
        if any(not isinstance(p, str) for p in runs):
            raise TreeRolloutError("TreeGRPOTrainer needs plain-text prompts (a string `prompt` column)")
        step = self.state.global_step
        problems = [
            Problem(id=f"s{step}-p{self.accelerator.process_index}-{k}", prompt=p) for k, p in enumerate(runs)
        ]
        trees = self.sampler(problems, self.policy(), leaves=n, seed=self.tree_seed + step)
        prompt_ids: list[list[int]] = []
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        rows: list[tuple[int, int]] = []
        for ti, tree in enumerate(trees):
            leaves = sorted(n_.id for n_ in tree.leaves())
            if len(leaves) != n:
                raise TreeRolloutError(
                    f"the sampler grew {len(leaves)} leaves for problem {ti}, expected {n}"
                )
            ids, lps = leaf_rows(tree, leaves)
            prompt_ids += [list(tree.root.token_ids)] * n
            completion_ids += ids
            logprobs += lps
            rows += [(ti, leaf) for leaf in leaves]
        self.trees, self._rows = trees, rows
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    # -- advantages ---------------------------------------------------------------------------------------------

    def _calculate_rewards(
        self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any
    ) -> torch.Tensor:
        rewards_per_func: torch.Tensor = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = super()._generate_and_score_completions(inputs)
        if self._rewards is None:
            raise TreeRolloutError("TRL computed no rewards for this batch")
        per_func = self._rewards
        weights = self.reward_weights.to(per_func.device)
        local = slice(
            self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs)
        )
        per_func = per_func[local]
        scorable = ~torch.isnan(per_func).all(dim=1)
        total = (per_func * weights[None, :]).nansum(dim=1)
        by_tree: list[dict[int, float]] = [{} for _ in self.trees]
        for (ti, leaf), ok, r in zip(self._rows, scorable.tolist(), total.tolist(), strict=True):
            if ok:
                by_tree[ti][leaf] = float(r)
        advs = [self.advantage(tree, rewards) for tree, rewards in zip(self.trees, by_tree, strict=True)]
        width = out["completion_ids"].shape[1]
        adv = token_matrix(self.trees, advs, self._rows, width)
        out["advantages"] = torch.from_numpy(adv).to(out["completion_ids"].device)
        self._rewards = None
        return out
