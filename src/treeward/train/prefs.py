"""Preference learning from trees: (step-level) DPO on pairs and TPO list ranking on K candidates.

Both losses score a continuation by its *implicit reward* ``r = β·(log π(y|x) − log π_ref(y|x))``, with ``log π(y|x)``
the summed log-probability of the continuation's tokens given the shared prefix ``x``. Step-level DPO (Step-DPO, Lai
et al. 2024; MCTS-DPO, Xie et al. 2024) is plain DPO on pairs whose prompt is the question *plus the steps both
continuations share* and whose chosen/rejected are the diverging next steps: exactly what a
:class:`~treeward.credit.records.PreferencePair` holds. The continuations' ids come from the tree and are used as they
are: no EOS is appended, so a non-terminal step does not teach the model to stop (TRL's DPOTrainer, fed strings,
appends one).

The two loops share one path (:func:`_train_groups`): a batch is a set of groups (one prompt, ``K`` candidates with
target scores); the policy scores every candidate in one padded forward pass, the frozen reference's scores are
computed once up front (under ``torch.no_grad``, in eval mode), and the loss function passed in turns the
``[B, K]`` score tables into a scalar. Pairs are groups with ``K = 2`` and scores ``(1, 0)``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from treeward.credit.records import PreferenceList, PreferencePair
from treeward.train._batch import completion_logprobs
from treeward.train._loop import (
    TrainHistory,
    TrainingDataError,
    check_ids,
    check_knobs,
    fit,
    pad_id_of,
    vocab_size,
)

__all__ = ["dpo_loss", "tpo_loss", "tpo_loss_reference", "train_dpo", "train_tpo"]

#: ``(policy_lp [B, K], ref_lp [B, K], scores [B, K], mask [B, K]) -> scalar loss``: what a preference loop minimises.
GroupLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- losses (pure) ------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_lp: torch.Tensor,
    policy_rejected_lp: torch.Tensor,
    ref_chosen_lp: torch.Tensor,
    ref_rejected_lp: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """Sigmoid DPO loss, averaged over the batch (a scalar).

    Paper: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
    ``−log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])``, with β = 0.1 the paper's default.
    This is the plain sigmoid (Bradley–Terry) variant: no label smoothing (cDPO), no IPO/hinge, no length
    normalisation (the inputs are *summed* log-probabilities [B]). Step-level DPO is this same loss on step pairs.
    With the policy equal to the reference the loss is ``log 2``.
    """
    lps = (policy_chosen_lp, policy_rejected_lp, ref_chosen_lp, ref_rejected_lp)
    if any(t.dim() != 1 or t.shape != policy_chosen_lp.shape for t in lps) or policy_chosen_lp.numel() == 0:
        raise ValueError(
            f"dpo_loss wants four non-empty [B] tensors, got shapes {[tuple(t.shape) for t in lps]}"
        )
    _check_beta(beta)
    logits = (policy_chosen_lp - ref_chosen_lp) - (policy_rejected_lp - ref_rejected_lp)
    return -F.logsigmoid(beta * logits).mean()


def tpo_loss(
    policy_lp: torch.Tensor,
    ref_lp: torch.Tensor,
    scores: torch.Tensor,
    *,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TPO's preference-list ranking loss over ``K`` candidates per list, averaged over the lists (a scalar).

    Paper: Liao et al. 2024, "TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference Trees",
    whose Preference List Ranking uses LambdaRank's λ-weighted pairwise logistic loss on implicit rewards (the form
    LiPO-λ, Liu et al. 2024, brought to LM alignment). Per list, with ``r_i = β·(policy_lp_i − ref_lp_i)``::

        loss = Σ_{i,j : s_i > s_j}  λ_ij · −log σ(r_i − r_j)
        λ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|,   G_i = 2^{s_i} − 1,   D(τ) = log2(1 + τ)

    where ``s`` are the target scores (higher is better) and ``τ_i`` is candidate ``i``'s 1-based rank when the list
    is sorted by ``r`` (descending): the |ΔNDCG| of swapping ``i`` and ``j`` in the policy's current ranking. ``λ`` is
    a constant weight (no gradient flows through the ranks), pairs with equal scores contribute nothing.

    Shapes: ``policy_lp``, ``ref_lp``, ``scores``, ``mask`` are [B, K]; ``mask`` (bool, default all True) marks the
    real candidates of lists shorter than ``K``.

    Departures, all deliberate:

    * **Ties in r** (e.g. at step 0, when the policy equals the reference) are broken by the target score, so a tie
      counts as correctly ranked and the loss does not depend on the order candidates are listed in.
    * ``D`` uses base 2 (the NDCG convention); a natural log would only scale every λ by 1/ln 2.
    * **No Adaptive Step Reward.** TPO re-weights each step's log-ratio in the non-top responses by how similar its
      hidden-state embedding is to the top response's matching step (the official code weights it by ``1 + cos``),
      to separate full responses that share sub-trajectories. Here each candidate is a continuation of an explicit
      shared prefix (:class:`~treeward.credit.records.PreferenceList`): the shared steps sit in the prompt and cancel
      exactly, and scores such as adaptive step rewards are the credit stage's job, arriving in ``scores``.
    * The official release (github.com/MrBlankness/TPO) departs from the λ-weighting in code: ``loss.py`` uses
      unweighted pairwise logistic terms normalised by K(K−1), ``tpo_trainer.py`` weights pairs by label differences
      of a fixed linspace; we follow the LambdaRank formulation.
    * β = 0.1 (DPO's default, so ``K = 2`` matches :func:`dpo_loss` up to λ); the release's config uses 0.05.

    With ``K = 2`` the loss is ``λ_12 · dpo_loss`` where ``λ_12 = |2^{s_1} − 2^{s_2}| · (1 − 1/log2 3)`` whatever the
    ranking: DPO scaled by a per-pair constant, so the same gradient direction.
    """
    _check_beta(beta)
    if policy_lp.dim() != 2 or policy_lp.shape[0] == 0:
        raise ValueError(f"tpo_loss wants [B, K] tensors with B >= 1, got {tuple(policy_lp.shape)}")
    if mask is None:
        mask = torch.ones_like(policy_lp, dtype=torch.bool)
    shapes = {tuple(t.shape) for t in (policy_lp, ref_lp, scores, mask)}
    if len(shapes) != 1:
        raise ValueError(f"tpo_loss inputs differ in shape: {sorted(shapes)}")
    mask = mask.bool()
    scores = scores.to(policy_lp.dtype)
    r = beta * (policy_lp - ref_lp)  # [B, K]

    # Ranks τ under the current implicit rewards (r descending, ties by score descending); padding sorts last.
    neg_inf = torch.tensor(-math.inf, dtype=r.dtype)
    r_key = torch.where(mask, r.detach(), neg_inf)
    s_key = torch.where(mask, scores, neg_inf)
    by_score = torch.sort(s_key, dim=1, descending=True, stable=True).indices
    by_reward = torch.sort(r_key.gather(1, by_score), dim=1, descending=True, stable=True).indices
    order = by_score.gather(1, by_reward)  # order[b, k] = candidate at rank k + 1
    tau = torch.empty_like(order)
    tau.scatter_(1, order, torch.arange(1, order.shape[1] + 1).expand_as(order).contiguous())
    inv_discount = 1.0 / torch.log2(1.0 + tau.to(r.dtype))  # [B, K]

    gain = torch.pow(2.0, scores) - 1.0
    lam = (gain[:, :, None] - gain[:, None, :]).abs() * (
        inv_discount[:, :, None] - inv_discount[:, None, :]
    ).abs()
    ordered = (
        (scores[:, :, None] > scores[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    )  # [B, K, K]: s_i > s_j
    pair_loss = -F.logsigmoid(r[:, :, None] - r[:, None, :])
    per_list = torch.where(ordered, lam.detach() * pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2))
    return per_list.mean()


def tpo_loss_reference(
    policy_lp: Sequence[Sequence[float]],
    ref_lp: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    *,
    beta: float = 0.1,
) -> float:
    """:func:`tpo_loss` written as plain loops over lists and pairs (slow, obviously correct; lists may differ in K)."""
    total = 0.0
    for p, q, s in zip(policy_lp, ref_lp, scores, strict=True):
        r = [beta * (a - b) for a, b in zip(p, q, strict=True)]
        ranked = sorted(range(len(r)), key=lambda i: (-r[i], -s[i]))
        tau = {cand: pos + 1 for pos, cand in enumerate(ranked)}
        loss = 0.0
        for i in range(len(r)):
            for j in range(len(r)):
                if s[i] > s[j]:
                    lam = abs(2 ** s[i] - 2 ** s[j]) * abs(
                        1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j])
                    )
                    x = r[i] - r[j]  # -log σ(x), written to not overflow
                    loss += lam * (max(0.0, -x) + math.log1p(math.exp(-abs(x))))
        total += loss
    return total / len(policy_lp)


# -- loops --------------------------------------------------------------------------------------------------------


def train_dpo(
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    lr: float,
    beta: float = 0.1,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
) -> TrainHistory:
    """Train ``model`` in place with (step-level) DPO on ``pairs``; returns the per-step history.

    Paper: DPO (Rafailov et al. 2023; β = 0.1, batch 64) applied to step pairs as in Step-DPO / MCTS-DPO: see
    :func:`dpo_loss`. Departures: AdamW at a constant ``lr`` with clipping (the paper: RMSprop, 150 warm-up steps);
    the reference log-probabilities are computed once before training (the reference is frozen, so this is exact).
    A pair's ``margin`` is not used by the DPO loss.

    Args:
        model: the policy to train (an HF causal LM), left in the mode it came in.
        ref_model: the frozen reference; ``None`` uses a frozen copy of ``model`` as it is now. It must not be
            ``model`` itself nor share its parameters.
        tokenizer: the model's tokenizer; only its pad id is read.
        pairs: each needs non-empty ``prompt_ids`` (start with BOS), non-empty and different ``chosen_ids`` and
            ``rejected_ids``, all within the model's vocabulary.
        lr: AdamW learning rate; no default, it depends on the model's scale (the paper fine-tunes billion-parameter
            models at 1e-6; the shipped ~2M-parameter policy needs ~1e-5 to 1e-4).
        beta, epochs, batch_size, seed, max_grad_norm, weight_decay: as in :func:`dpo_loss` and
            :func:`treeward.train.sft.train_sft`; ``batch_size`` counts pairs.
    """
    if len(pairs) == 0:
        raise TrainingDataError("train_dpo got no pairs: pass at least one PreferencePair")
    groups = []
    for i, pair in enumerate(pairs):
        where = f"pair {i} (problem {pair.problem_id!r}, nodes {pair.chosen_node}/{pair.rejected_node})"
        if tuple(pair.chosen_ids) == tuple(pair.rejected_ids):
            raise TrainingDataError(f"{where}: chosen and rejected have the same token ids; drop the pair")
        groups.append(
            _Group(
                where, tuple(pair.prompt_ids), (tuple(pair.chosen_ids), tuple(pair.rejected_ids)), (1.0, 0.0)
            )
        )
    _check_beta(beta)
    loss_fn: GroupLoss = functools.partial(_dpo_on_groups, beta=beta)
    return _train_groups(
        model,
        ref_model,
        tokenizer,
        groups,
        loss_fn,
        name="dpo",
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_grad_norm=max_grad_norm,
        weight_decay=weight_decay,
    )


def train_tpo(
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    lists: Sequence[PreferenceList],
    *,
    lr: float,
    beta: float = 0.1,
    epochs: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
) -> TrainHistory:
    """Train ``model`` in place with TPO's list-ranking loss on ``lists``; returns the per-step history.

    Paper: TPO (Liao et al. 2024); the loss and how it departs from the paper are in :func:`tpo_loss`. Lists may
    have different lengths ``K`` (padded and masked in a batch). ``batch_size`` counts lists (16, the release's
    effective batch per device). Every list needs at least two candidates, non-empty and within the model's
    vocabulary, finite scores, and two different scores (a list whose scores are all equal teaches nothing). Other
    arguments are as in :func:`train_dpo`.
    """
    if len(lists) == 0:
        raise TrainingDataError("train_tpo got no lists: pass at least one PreferenceList")
    groups = []
    for i, pl in enumerate(lists):
        where = f"list {i} (problem {pl.problem_id!r})"
        if len(pl.candidate_ids) < 2:
            raise TrainingDataError(
                f"{where} has {len(pl.candidate_ids)} candidate(s): a ranking needs at least 2"
            )
        if len(pl.scores) != len(pl.candidate_ids):
            raise TrainingDataError(
                f"{where} has {len(pl.candidate_ids)} candidates but {len(pl.scores)} scores"
            )
        if not all(math.isfinite(s) for s in pl.scores):
            raise TrainingDataError(
                f"{where} has a non-finite score {list(pl.scores)}: give every candidate a number"
            )
        if len(set(pl.scores)) < 2:
            raise TrainingDataError(
                f"{where}: all {len(pl.scores)} scores are equal, so it ranks nothing; drop it"
            )
        candidates = tuple(tuple(c) for c in pl.candidate_ids)
        groups.append(_Group(where, tuple(pl.prompt_ids), candidates, tuple(float(s) for s in pl.scores)))
    _check_beta(beta)
    loss_fn: GroupLoss = functools.partial(_tpo_on_groups, beta=beta)
    return _train_groups(
        model,
        ref_model,
        tokenizer,
        groups,
        loss_fn,
        name="tpo",
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_grad_norm=max_grad_norm,
        weight_decay=weight_decay,
    )


# -- the shared preference step -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """One prompt and its ``K`` candidates with target scores; ``ref_lp`` [K] is filled in before training."""

    where: str
    prompt_ids: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]
    ref_lp: tuple[float, ...] = ()


def _dpo_on_groups(
    policy: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """DPO on groups of two, the chosen candidate first."""
    return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=beta)


def _tpo_on_groups(
    policy: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    return tpo_loss(policy, ref, scores, beta=beta, mask=mask)


def _group_logprobs(
    model: torch.nn.Module, groups: Sequence[_Group], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed completion log-probabilities [B, K_max] of every candidate (0 where padded), the mask [B, K_max], and
    the number of completion tokens scored. One padded forward pass for all candidates of all groups."""
    prompts = [g.prompt_ids for g in groups for _ in g.candidates]
    completions = [c for g in groups for c in g.candidates]
    lp, cmask = completion_logprobs(model, prompts, completions, pad_id)
    seq = (lp * cmask).sum(-1)  # [N]
    sizes = [len(g.candidates) for g in groups]
    table = torch.nn.utils.rnn.pad_sequence(list(seq.split(sizes)), batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(k, dtype=torch.bool) for k in sizes], batch_first=True)
    return table, mask, int(cmask.sum())


def _train_groups(
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[_Group],
    loss_fn: GroupLoss,
    *,
    name: str,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    max_grad_norm: float | None,
    weight_decay: float,
) -> TrainHistory:
    """The preference step every preference loss shares: validate, score the reference once, then :func:`fit`."""
    pad_id = pad_id_of(tokenizer)
    check_knobs(lr=lr, epochs=epochs, batch_size=batch_size, max_grad_norm=max_grad_norm)
    vocab = vocab_size(model)
    for g in groups:
        check_ids(g.prompt_ids, f"{g.where}: prompt_ids", vocab)
        for k, c in enumerate(g.candidates):
            check_ids(c, f"{g.where}: candidate {k}", vocab)
    if ref_model is None:
        ref_model = copy.deepcopy(model)
    elif ref_model is model:
        raise ValueError(
            "ref_model is the policy itself: pass a frozen copy (or None to copy the policy now)"
        )
    elif {id(p) for p in ref_model.parameters()} & {id(p) for p in model.parameters()}:
        raise ValueError("ref_model shares parameters with the policy: pass a separate copy (or None)")

    # The reference is frozen: score every candidate once, in eval mode, without gradients.
    scored: list[_Group] = []
    was_training = ref_model.training
    ref_model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(groups), batch_size):
                chunk = groups[start : start + batch_size]
                table, _, _ = _group_logprobs(ref_model, chunk, pad_id)
                for g, row in zip(chunk, table.tolist(), strict=True):
                    scored.append(
                        _Group(g.where, g.prompt_ids, g.candidates, g.scores, tuple(row[: len(g.candidates)]))
                    )
    finally:
        ref_model.train(was_training)

    def batch_loss(batch: Sequence[_Group]) -> tuple[torch.Tensor, int]:
        policy, mask, n_tokens = _group_logprobs(model, batch, pad_id)
        ref = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(g.ref_lp, dtype=policy.dtype) for g in batch], batch_first=True
        )
        scores = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(g.scores, dtype=policy.dtype) for g in batch], batch_first=True
        )
        return loss_fn(policy, ref, scores, mask), n_tokens

    return fit(
        model,
        scored,
        batch_loss,
        name=name,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_grad_norm=max_grad_norm,
        weight_decay=weight_decay,
    )


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta}")
