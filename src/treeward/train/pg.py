"""Online policy gradient for the shipped policy: sample trees, score leaves, PPO-clipped token-level updates.

One step of :func:`train_pg`, top to bottom:

1. **Sample.** ``sampler(problems, policy, seed=...)`` grows one tree per problem on the engine (independent
   samples, tree rollouts, any search), so shared prefixes are computed once.
2. **Score.** Every leaf's root-to-leaf path goes to ``reward`` in one batch (the reward contract of
   :mod:`treeward.rewards.base`). A leaf whose result has ``score=None`` (failed, timed out, not applicable) is
   *excluded* from training and counted in the log, never turned into 0.
3. **Credit.** ``advantage(tree, rewards)`` returns an :class:`~treeward.credit.Advantages` record: one value per
   step on each leaf's path. Every token of a step gets its step's advantage.
4. **Rows.** A leaf becomes one training row: ``prompt_ids`` = the root's tokens, ``completion_ids`` = the
   concatenated token ids of the steps on its path, as the tree holds them (never re-tokenised text).
5. **Old log-probs** come from the tree's node logprobs by default. The engine contract
   (:mod:`treeward.engine.base`) makes them the temperature-1 log-probabilities of the sampled tokens under the
   weights that sampled them, which is exactly ``pi_old`` of the PPO ratio, and it saves one forward pass per
   step. The first training forward checks them: ``old_logp_gap`` in the log is the largest difference between
   the tree's numbers and the recomputed ones before any update (~1e-6 on the HF engine). ``recompute_old=True``
   replaces them with a no-grad forward (for trees sampled elsewhere, without logprobs, or by other weights).
6. **Update.** ``ppo_epochs`` passes over the rows in ``minibatches`` gradient steps each, minimising
   :func:`pg_loss` (PPO-clipped surrogate, optional KL to a frozen reference, optional entropy bonus), AdamW,
   gradient clipping.
7. **Invalidate** the engine's prefix KV store (:meth:`~treeward.engine.hf.HFPolicy.clear_cache`): cached keys and
   values were computed by the old weights. (HFPolicy also notices in-place parameter writes on its own; the loop
   does not rely on that detection.)
8. **Log and checkpoint.** One :class:`PGStep` per step (reward mean, accuracy, generated tokens, tokens/s,
   entropy, KL, clip fraction, ...). Every ``checkpoint_every`` steps the model, optimizer, step, RNG state and
   history go to ``checkpoint_dir``; a run started on a directory holding a checkpoint resumes from it, so a killed
   run continues where it left off and ends in the same state as an uninterrupted one.

Papers: PPO (Schulman et al. 2017) for the clipped surrogate; GRPO (Shao et al. 2024, DeepSeekMath) for group
advantages without a value model and the k3 reverse-KL term in the loss; DAPO (Yu et al. 2025) for token-mean
aggregation and the decoupled upper clip ``clip_eps_high``; Dr. GRPO (Liu et al. 2025) for the sum-then-constant
aggregation; RAPO (Deng et al. 2025, "Unlocking Reasoning Capabilities in LLMs via Reinforcement Learning
Exploration") for the forward KL to a reward-reweighted reference.

Departures:

* The policy is updated with **token-level advantages from a tree** (one value per step), not one scalar per
  completion; with a flat tree and a GRPO estimator this is exactly GRPO.
* Rows sharing a tree prefix each carry that prefix's tokens, so a shared step is trained once per leaf below it,
  with the value the estimator gave that step on that leaf's path (the forward pass repeats the shared prefix).
* **No value model, no GAE** (GRPO-style); ``pi_old`` is the sampling policy, so with ``ppo_epochs=1`` and one
  minibatch the ratio is 1 and the update is the plain policy gradient (clipping acts from the second gradient
  step on).
* The KL estimators use samples from ``pi_old``, not from ``pi_theta`` (as GRPO does); RAPO's reweighted reference
  is normalised **per token** over the vocabulary (the paper writes it per sequence, whose normaliser is
  intractable), with one exponent ``phi(r)`` per row from its leaf's reward. ``phi`` is a knob (:func:`rapo_phi`:
  the reward clipped to [0, 1]), as the paper's exact mapping is not restated here. RAPO's entropy bonus is
  ``entropy_coef`` (off by default).
* Accuracy in the log is the fraction of scored leaves with score >= 1 (the exact-answer rewards' "correct").

Parity with TRL: with :class:`IndependentSampler`, :func:`~treeward.credit.advantages.grpo` and the defaults
(token-mean, ``clip_eps=0.2``, no KL, one epoch of one minibatch, AdamW without weight decay, grad norm clipped to
1), a step on a batch of completions is the step ``trl.GRPOTrainer`` takes on the same completions with
``loss_type="dapo"``, ``scale_rewards="group"``, ``beta=0`` and a constant learning rate: same advantages, loss,
gradient and new weights up to float rounding (``tests/test_train_pg.py`` checks it against the installed TRL).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import random
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from transformers import PreTrainedModel

from treeward.credit.advantages import Estimator, completion_ids, grpo, token_advantages
from treeward.engine.base import Policy
from treeward.engine.hf import HFPolicy
from treeward.rewards.base import Reward, check_results
from treeward.search.core import Budget, Request, expand, init_trees, path_sample
from treeward.train._batch import completion_logprobs
from treeward.tree import Problem, Tree

__all__ = [
    "LOSS_AGG",
    "IndependentSampler",
    "PGError",
    "PGStep",
    "Sampler",
    "evaluate",
    "pg_loss",
    "print_step",
    "rapo_phi",
    "reweighted_ref_logp",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "step_problems",
    "token_mean",
    "train_pg",
]

KLKind = Literal["reverse", "forward"]
LossAgg = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHECKPOINT = "pg-checkpoint.pt"


class PGError(ValueError):
    """Invalid arguments or inputs to the policy-gradient loop (knobs, trees, advantages, checkpoints)."""


# ====================================================================================================================
# The loss: pure functions of [B, T] tensors
# ====================================================================================================================


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over every real token of the batch (DAPO; TRL's and verl's default): long rows weigh more."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens within each row, then over rows with at least one token (the GRPO paper's 1/G Σ 1/|o|)."""
    per_row = mask.sum(-1)
    has = per_row > 0
    return ((x * mask).sum(-1)[has] / per_row[has]).sum() / has.sum().clamp(min=1)


def seq_mean_token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over tokens within each row, then mean over rows (no length normalisation)."""
    return (x * mask).sum(-1).mean()


def seq_mean_token_sum_norm(x: torch.Tensor, mask: torch.Tensor, *, norm: int | None = None) -> torch.Tensor:
    """Dr. GRPO: sum over all tokens divided by ``rows × norm``, a constant length (default: the batch's padded
    width ``T``; bind the generation budget with ``functools.partial(seq_mean_token_sum_norm, norm=...)`` to make
    it the same constant for every batch, as the paper does)."""
    width = mask.shape[-1] if norm is None else norm
    return (x * mask).sum() / (mask.shape[0] * width)


#: Loss aggregations by name (the names verl uses); ``pg_loss`` also takes any function ``(x, mask) -> scalar``.
LOSS_AGG: dict[str, LossAgg] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def _reverse_k3(d: torch.Tensor) -> torch.Tensor:
    """GRPO's per-token estimator of KL(pi_theta || pi_ref): ``exp(d) - d - 1`` with ``d = log pi_ref - log pi_theta``
    (>= 0)."""
    return torch.exp(d) - d - 1


def _forward_kl(d: torch.Tensor) -> torch.Tensor:
    """RAPO's per-token estimator of KL(pi_ref || pi_theta): ``rho log rho - rho + 1``, ``rho = exp(d)`` =
    ``pi_ref / pi_theta`` (>= 0; its expectation under pi_theta is the forward KL)."""
    rho = torch.exp(d)
    return rho * d - rho + 1


_KL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reverse": _reverse_k3,
    "forward": _forward_kl,
}


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl: KLKind | None = None,
    kl_coef: float = 0.04,
    ref_logp: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg: str | LossAgg = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO-clipped policy-gradient loss with token-level advantages, optional KL and entropy terms.

    All tensors are [B, T] (``logits`` [B, T, V]); ``mask`` is 1 on the tokens to train. Per token, with
    ``ratio = exp(logp - old_logp)``::

        pg  = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A)        (PPO, Schulman et al. 2017)
        kl  = exp(d) - d - 1,               d = ref_logp - logp   for kl="reverse"    (GRPO's k3, KL(pi || ref))
              rho * log(rho) - rho + 1,     rho = exp(d)          for kl="forward"    (RAPO, KL(ref_hat || pi))
        loss = agg(pg + kl_coef * kl - entropy_coef * H, mask)

    For ``kl="forward"`` pass ``ref_logp`` from :func:`reweighted_ref_logp` to get RAPO's reweighted reference.
    ``clip_eps_high`` defaults to ``clip_eps`` (DAPO's clip-higher sets it apart, 0.28). ``kl_coef`` defaults to
    GRPO's beta = 0.04. ``loss_agg`` is a name from :data:`LOSS_AGG` or a function ``(x, mask) -> scalar``; the
    default is token-mean (DAPO / TRL); the GRPO paper uses ``"seq-mean-token-mean"``, Dr. GRPO
    ``"seq-mean-token-sum-norm"``. ``logits`` gives the exact entropy ``H`` (needed when ``entropy_coef > 0``).

    Returns the scalar loss and stats, all token means over ``mask`` whatever ``loss_agg`` is: ``pg_loss``,
    ``clip_frac`` (tokens whose clipped term is the smaller one, i.e. whose gradient is cut), ``ratio_mean``,
    ``ratio_max``, ``approx_kl_old`` (k3 of the update so far, KL(pi || pi_old)), ``kl`` (when ``kl`` is set) and
    ``entropy`` (when ``logits`` are given).
    """
    shape = logp.shape
    for name, t in (
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        ("ref_logp", ref_logp),
    ):
        if t is not None and t.shape != shape:
            raise PGError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(shape)}; all must be [B, T]")
    if logits is not None and logits.shape[:-1] != shape:
        raise PGError(
            f"logits have shape {tuple(logits.shape)}; expected [B, T, V] with [B, T] = {tuple(shape)}"
        )
    if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
        raise PGError(f"clip_eps and clip_eps_high must be > 0, got {clip_eps} and {clip_eps_high}")
    if kl is not None and kl not in _KL:
        raise PGError(f"kl must be None, 'reverse' or 'forward', got {kl!r}")
    if kl is not None and ref_logp is None:
        raise PGError(f"kl={kl!r} needs ref_logp (the reference's token log-probabilities)")
    if entropy_coef and logits is None:
        raise PGError("entropy_coef > 0 needs logits to compute the entropy")
    agg = _loss_agg(loss_agg)
    m = mask.to(logp.dtype)
    on = (
        m > 0
    )  # off the mask, log-ratios are set to 0 before exp: padding must not overflow into inf * 0 = nan
    high = clip_eps if clip_eps_high is None else clip_eps_high

    log_ratio = torch.where(on, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)

    stats: dict[str, float] = {}
    with torch.no_grad():
        stats["pg_loss"] = float(token_mean(per_token, m))
        stats["clip_frac"] = float(token_mean((clipped < unclipped).to(m.dtype), m))
        stats["ratio_mean"] = float(token_mean(ratio, m))
        stats["ratio_max"] = float(ratio[on].max()) if bool(on.any()) else 1.0
        stats["approx_kl_old"] = float(token_mean(_reverse_k3(-log_ratio), m))
    if kl is not None:
        assert ref_logp is not None
        kl_t = _KL[kl](torch.where(on, ref_logp - logp, 0.0))
        per_token = per_token + kl_coef * kl_t
        stats["kl"] = float(token_mean(kl_t.detach(), m))
    if logits is not None:
        if entropy_coef:
            ent = _entropy(logits)
            per_token = per_token - entropy_coef * ent
        else:
            with torch.no_grad():
                ent = _entropy(logits)
        stats["entropy"] = float(token_mean(ent.detach(), m))
    loss = agg(per_token, m)
    stats["loss"] = float(loss.detach())
    return loss, stats


def _loss_agg(loss_agg: str | LossAgg) -> LossAgg:
    if callable(loss_agg):
        return loss_agg
    if loss_agg not in LOSS_AGG:
        raise PGError(f"unknown loss_agg {loss_agg!r}; choose one of {sorted(LOSS_AGG)} or pass a function")
    return LOSS_AGG[loss_agg]


def reweighted_ref_logp(ref_logits: torch.Tensor, tokens: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """RAPO's reweighted reference, per token: ``log pi_ref_hat(a) = phi * log pi_ref(a) - log Σ_v pi_ref(v)^phi``.

    ``ref_logits`` [B, T, V] are the reference's logits at each position, ``tokens`` [B, T] the tokens scored there,
    ``phi`` [B] one exponent in [0, 1] per row (from its reward, :func:`rapo_phi`). ``phi = 1`` gives the reference
    itself, ``phi = 0`` the uniform distribution: a low reward flattens the reference so the forward KL pulls the
    policy toward covering more of the vocabulary there. Returns [B, T].
    """
    if phi.dim() != 1 or phi.shape[0] != ref_logits.shape[0]:
        raise PGError(
            f"phi must hold one exponent per row ({ref_logits.shape[0]}), got shape {tuple(phi.shape)}"
        )
    if bool(((phi < 0) | (phi > 1)).any()):
        raise PGError(f"phi must lie in [0, 1], got {phi.tolist()}")
    scaled = phi[:, None, None].to(ref_logits.dtype) * torch.log_softmax(ref_logits.float(), dim=-1)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def rapo_phi(reward: float) -> float:
    """The default reward-to-exponent map of the reweighted reference: the reward clipped to [0, 1]."""
    return min(1.0, max(0.0, reward))


# ====================================================================================================================
# Samplers and the evaluation helper
# ====================================================================================================================


class Sampler(Protocol):
    """Grows one tree per problem: ``sampler(problems, policy, seed=...)``. Every leaf of a returned tree is one
    sample. ``functools.partial(tree_rollouts, leaves=8)`` and :class:`IndependentSampler` both fit."""

    def __call__(self, problems: Sequence[Problem], policy: Policy, *, seed: int) -> list[Tree]: ...


@dataclass(frozen=True)
class IndependentSampler:
    """``n`` whole solutions per problem, each sampled independently from the root and cut into step nodes at
    newlines (the flat tree GRPO trains on). ``temperature=0`` with ``n=1`` is greedy decoding."""

    n: int = 8
    max_tokens: int = 96
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1 or self.temperature < 0:
            raise PGError(
                f"IndependentSampler needs n >= 1, max_tokens >= 1 and temperature >= 0, got n={self.n}, "
                f"max_tokens={self.max_tokens}, temperature={self.temperature}"
            )

    def __call__(self, problems: Sequence[Problem], policy: Policy, *, seed: int) -> list[Tree]:
        trees = init_trees(problems, policy, "independent")
        budgets = [Budget(self.n * self.max_tokens) for _ in trees]
        requests = [Request(i, 0, self.n, self.max_tokens) for i in range(len(trees))]
        expand(policy, trees, budgets, requests, temperature=self.temperature, seed=seed, stop=None)
        return trees


def _score_leaves(trees: Sequence[Tree], reward: Reward) -> list[dict[int, float | None]]:
    """Score every leaf's path in one reward call: per tree, ``{leaf id: score or None}``."""
    refs = [(t, leaf) for t in trees for leaf in t.leaves()]
    samples = [path_sample(t, leaf) for t, leaf in refs]
    results = check_results(reward, samples, reward(samples)) if samples else []
    out: list[dict[int, float | None]] = [{} for _ in trees]
    index = {id(t): i for i, t in enumerate(trees)}
    for (t, leaf), res in zip(refs, results, strict=True):
        out[index[id(t)]][leaf.id] = res.score
    return out


def evaluate(
    policy: Policy,
    problems: Sequence[Problem],
    reward: Reward,
    *,
    max_tokens: int = 96,
    seed: int = 0,
    temperature: float = 0.0,
    samples: int = 1,
) -> float:
    """Accuracy: the fraction of solutions that score >= 1 (a failed score counts as wrong). By default greedy, one
    solution per problem; ``temperature > 0`` with ``samples`` solutions per problem (seeded by ``seed``) gives the
    sampled accuracy, the quantity policy-gradient training raises directly (mean pass@1 at that temperature)."""
    if not problems:
        raise PGError("evaluate needs at least one problem")
    if samples < 1 or (temperature == 0 and samples != 1):
        raise PGError(
            f"evaluate needs samples >= 1, and samples == 1 when temperature == 0 (greedy solutions are all the "
            f"same), got samples={samples}, temperature={temperature}"
        )
    sampler = IndependentSampler(n=samples, max_tokens=max_tokens, temperature=temperature)
    scores = _score_leaves(sampler(problems, policy, seed=seed), reward)
    correct = sum(1 for s in scores for v in s.values() if v is not None and v >= 1.0)
    return correct / (len(problems) * samples)


# ====================================================================================================================
# From trees to training rows
# ====================================================================================================================


@dataclass(frozen=True)
class _Rows:
    """Training rows of one step, one per leaf kept. Lists are aligned; per row, the completion ``[C]`` and its
    ``old_logp`` ``[C]`` and ``advantages`` ``[C]`` (or an empty ``old_logp`` when it is to be recomputed)."""

    prompts: list[tuple[int, ...]]
    completions: list[tuple[int, ...]]
    old_logp: list[tuple[float, ...]]
    advantages: list[tuple[float, ...]]
    rewards: list[float]


def _rows(
    trees: Sequence[Tree],
    scores: Sequence[Mapping[int, float | None]],
    advantage: Estimator,
    *,
    need_logprobs: bool,
    each_step_once: bool,
) -> _Rows:
    """Advantages per tree, expanded to token level along each leaf's path (every token gets its step's value, by
    :func:`~treeward.credit.advantages.token_advantages`), with the completion ids and old log-probs it lines up
    with. A leaf with a ``None`` score reaches the estimator as ``None``, which excludes it (and says why in the
    record's metadata)."""
    rows = _Rows([], [], [], [], [])
    for tree, score in zip(trees, scores, strict=True):
        rewards = {leaf: s for leaf, s in score.items() if s is not None}
        if not rewards:
            continue
        adv = advantage(tree, score)
        ids = completion_ids(tree, adv)  # checks the record against the tree (paths, lengths)
        values = token_advantages(tree, adv, each_step_once=each_step_once)
        for leaf, path, completion, token_adv in zip(adv.leaves, adv.node_ids, ids, values, strict=True):
            if leaf not in rewards:
                raise PGError(
                    f"the advantage estimator returned leaf {leaf} of {tree.problem.id!r}, which has no reward"
                )
            if not completion:
                continue  # a zero-token leaf (a zero cap) has nothing to train
            old: list[float] = []
            if need_logprobs:
                for node in (tree.nodes[i] for i in path):
                    if len(node.logprobs) != len(node.token_ids):
                        raise PGError(
                            f"node {node.id} of {tree.problem.id!r} has {len(node.logprobs)} logprobs for "
                            f"{len(node.token_ids)} tokens; sample with an engine that returns logprobs or set "
                            "recompute_old=True"
                        )
                    old.extend(node.logprobs)
            rows.prompts.append(tuple(tree.root.token_ids))
            rows.completions.append(tuple(completion))
            rows.old_logp.append(tuple(old))
            rows.advantages.append(tuple(token_adv.tolist()))
            rows.rewards.append(rewards[leaf])
    return rows


def _place(values: Sequence[Sequence[float]], cmask: torch.Tensor) -> torch.Tensor:
    """Per-row completion values laid out on the [B, T-1] grid of :func:`completion_logprobs` (0 elsewhere)."""
    out = torch.zeros(cmask.shape, dtype=torch.float32)
    out[cmask.bool()] = torch.tensor([v for row in values for v in row], dtype=torch.float32)
    return out


class _KeepLogits(torch.nn.Module):
    """Wraps a causal LM and keeps the logits of its last forward, so one forward through
    :func:`completion_logprobs` also gives the entropy (and the reference's full distributions for RAPO)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.logits: torch.Tensor | None = None

    def forward(self, **inputs: Any) -> Any:
        out = self.model(**inputs)
        self.logits = out.logits
        return out


def _score_rows(
    model: torch.nn.Module, rows: _Rows, idx: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion log-probs [B, T-1], completion mask [B, T-1] and logits [B, T-1, V] of rows ``idx``."""
    keep = _KeepLogits(model)
    lp, cmask = completion_logprobs(
        keep, [rows.prompts[i] for i in idx], [rows.completions[i] for i in idx], pad_id
    )
    assert keep.logits is not None
    return lp, cmask, keep.logits[:, :-1]


def _completion_logp(model: torch.nn.Module, rows: _Rows, pad_id: int) -> list[tuple[float, ...]]:
    """Each row's completion log-probs under ``model`` (eval mode, no gradients): the recomputed ``pi_old``."""
    with torch.no_grad(), _mode(model, training=False):
        lp, cmask, _ = _score_rows(model, rows, range(len(rows.completions)), pad_id)
    return [tuple(lp[i][cmask[i].bool()].tolist()) for i in range(lp.shape[0])]


def _reference_logp(
    ref: torch.nn.Module, rows: _Rows, kl: KLKind, phi: Callable[[float], float], pad_id: int
) -> list[tuple[float, ...]]:
    """Each row's completion log-probs under the reference: as is for the reverse KL, reweighted by
    ``phi(reward)`` (:func:`reweighted_ref_logp`) for RAPO's forward KL."""
    with torch.no_grad(), _mode(ref, training=False):
        lp, cmask, logits = _score_rows(ref, rows, range(len(rows.completions)), pad_id)
        if kl == "forward":
            tokens = torch.zeros(
                cmask.shape, dtype=torch.long
            )  # the token each column scores (0 off the mask)
            tokens[cmask.bool()] = torch.tensor([t for c in rows.completions for t in c])
            phis = torch.tensor([phi(r) for r in rows.rewards], dtype=torch.float32)
            lp = reweighted_ref_logp(logits, tokens, phis)
    return [tuple(lp[i][cmask[i].bool()].tolist()) for i in range(lp.shape[0])]


@contextlib.contextmanager
def _mode(model: torch.nn.Module, *, training: bool) -> Iterator[None]:
    """Train or eval mode for the block, then the previous mode back."""
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


# ====================================================================================================================
# The loop
# ====================================================================================================================


@dataclass(frozen=True)
class PGStep:
    """What one step of :func:`train_pg` did. Token counts are exact; ``*_s`` are wall seconds.

    ``samples`` leaves were trained on and ``excluded`` were not (their reward failed or did not apply);
    ``reward_mean`` / ``accuracy`` are over the trained leaves (``None`` if none); ``generated_tokens`` counts every
    token the sampler generated (a shared prefix once), ``trained_tokens`` the completion tokens of the rows;
    ``tokens_per_s`` = generated tokens / the step's wall time (sampling, scoring and update). ``entropy``, ``kl``,
    ``clip_frac``, ``loss`` and ``grad_norm`` are means over the step's gradient steps; ``old_logp_gap`` is the
    largest |tree logprob − training forward| before the update (0 when ``recompute_old``). ``eval_accuracy`` is
    the greedy accuracy on the eval problems after this step, when evaluated.
    """

    step: int
    reward_mean: float | None
    accuracy: float | None
    samples: int
    excluded: int
    generated_tokens: int
    trained_tokens: int
    tokens_per_s: float
    sample_s: float
    update_s: float
    entropy: float
    kl: float | None
    clip_frac: float
    loss: float
    grad_norm: float
    old_logp_gap: float
    eval_accuracy: float | None = None


def print_step(s: PGStep) -> None:
    """The default log: one line per step."""
    parts = [
        f"step {s.step:4d}",
        f"reward {s.reward_mean:.3f}" if s.reward_mean is not None else "reward   -  ",
        f"acc {s.accuracy:.3f}" if s.accuracy is not None else "acc   -  ",
        f"n {s.samples}" + (f" (-{s.excluded})" if s.excluded else ""),
        f"gen {s.generated_tokens}",
        f"tok/s {s.tokens_per_s:.0f}",
        f"H {s.entropy:.3f}",
        f"kl {s.kl:.4f}" if s.kl is not None else "",
        f"clip {s.clip_frac:.3f}",
        f"loss {s.loss:+.4f}",
        f"|g| {s.grad_norm:.3f}",
        f"eval {s.eval_accuracy:.3f}" if s.eval_accuracy is not None else "",
    ]
    print("  ".join(p for p in parts if p), flush=True)


def _step_seed(seed: int, step: int) -> int:
    return zlib.crc32(f"treeward-pg:{seed}:{step}".encode()) & 0x7FFFFFFF


def step_problems(problems: Sequence[Problem], batch: int, seed: int, step: int) -> list[Problem]:
    """Problems of 1-based ``step``: epoch ``e`` is a seeded shuffle of all problems cut into whole batches (a
    remainder is dropped), so a step's batch depends on (problems, batch, seed, step) only and never repeats a
    problem."""
    per_epoch = len(problems) // batch
    epoch, k = divmod(step - 1, per_epoch)
    order = list(range(len(problems)))
    random.Random(f"treeward-pg-order:{seed}:{epoch}").shuffle(order)
    return [problems[i] for i in order[k * batch : (k + 1) * batch]]


def _mean(stats: Sequence[Mapping[str, float]], key: str) -> float:
    values = [s[key] for s in stats if key in s]
    return sum(values) / len(values) if values else 0.0


def _fingerprint(problems: Sequence[Problem], knobs: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the problems and the knobs that shape the run."""
    ids = "\n".join(p.id for p in problems)
    return {"problems": zlib.crc32(ids.encode()), **knobs}


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a run killed mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_pg(
    policy: HFPolicy,
    problems: Sequence[Problem],
    *,
    sampler: Sampler,
    reward: Reward,
    advantage: Estimator,
    steps: int,
    lr: float,
    batch_problems: int = 4,
    ppo_epochs: int = 1,
    minibatches: int = 1,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl: KLKind | None = None,
    kl_coef: float = 0.04,
    ref: PreTrainedModel | None = None,
    phi: Callable[[float], float] = rapo_phi,
    entropy_coef: float = 0.0,
    loss_agg: str | LossAgg = "token-mean",
    each_step_once: bool = False,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
    recompute_old: bool = False,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    eval_problems: Sequence[Problem] | None = None,
    eval_every: int = 10,
    eval_max_tokens: int = 96,
    log: Callable[[PGStep], None] | None = print_step,
) -> list[PGStep]:
    """Train ``policy.model`` in place for ``steps`` steps (counted from 0, including steps a checkpoint already
    holds) of online policy gradient; returns the per-step history. See the module docstring for the recipe.

    Args:
        policy: the engine that samples; its model is the one trained (AdamW, ``lr``, ``weight_decay``).
        problems: the training problems; each step takes ``batch_problems`` of them (seeded shuffles, no repeats
            within an epoch).
        sampler: grows one tree per problem (:class:`Sampler`).
        reward: scores each leaf's path; ``None`` scores exclude the leaf.
        advantage: an estimator of :mod:`treeward.credit.advantages`, ``fn(tree, rewards) -> Advantages`` (bind
            its knobs with ``functools.partial``).
        each_step_once: train a step shared by several leaves in one row only (see
            :func:`~treeward.credit.advantages.token_advantages`); by default every row through it trains it.
        ppo_epochs, minibatches: passes over a step's rows, and gradient steps per pass.
        clip_eps, clip_eps_high, kl, kl_coef, entropy_coef, loss_agg: passed to :func:`pg_loss`.
        ref: the frozen reference for ``kl``; default a copy of the model as it is when training starts (saved in
            the checkpoint, so a resumed run keeps the original reference).
        phi: reward -> exponent of RAPO's reweighted reference (``kl="forward"`` only).
        recompute_old: take ``pi_old`` from a no-grad forward instead of the tree's logprobs.
        seed: seeds the problem order and the sampler (one derived seed per step).
        checkpoint_dir: where to checkpoint every ``checkpoint_every`` steps and at the end; a checkpoint already
            there is resumed (it must come from a run with the same problems and knobs).
        eval_problems: greedy accuracy on these every ``eval_every`` steps and at the last step.
        log: called with each step's :class:`PGStep` (``None``: silent).
    """
    if steps < 0:
        raise PGError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise PGError(f"lr must be > 0, got {lr}")
    if batch_problems < 1 or batch_problems > len(problems):
        raise PGError(
            f"batch_problems must be in 1..{len(problems)} (the number of problems), got {batch_problems}"
        )
    if ppo_epochs < 1 or minibatches < 1:
        raise PGError(f"ppo_epochs and minibatches must be >= 1, got {ppo_epochs} and {minibatches}")
    if checkpoint_every < 1 or eval_every < 1:
        raise PGError(
            f"checkpoint_every and eval_every must be >= 1, got {checkpoint_every} and {eval_every}"
        )
    if kl is not None and kl not in _KL:
        raise PGError(f"kl must be None, 'reverse' or 'forward', got {kl!r}")
    _loss_agg(loss_agg)  # fail before sampling on an unknown name

    model = policy.model
    tok = policy.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if ref is not None and kl is None:
        raise PGError("a reference model is only used with kl='reverse' or kl='forward'; set kl or drop ref")
    if kl is not None and ref is None:
        ref = copy.deepcopy(model)
    if ref is not None:
        ref.eval().requires_grad_(False)

    # -- resume --------------------------------------------------------------------------------------------------
    history: list[PGStep] = []
    start = 0
    fingerprint = _fingerprint(
        problems,
        {
            "seed": seed,
            "batch_problems": batch_problems,
            "lr": lr,
            "kl": kl,
            "ppo_epochs": ppo_epochs,
            "minibatches": minibatches,
        },
    )
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=policy.device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise PGError(
                f"{ckpt} was written by a run with {state['fingerprint']}, this run has {fingerprint}; resume with "
                "the same problems and knobs, or use another checkpoint_dir"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ref is not None and state["ref"] is not None:
            ref.load_state_dict(state["ref"])
        torch.set_rng_state(state["torch_rng"])  # for models that draw from it in training (dropout)
        start = int(state["step"])
        history = [PGStep(**h) for h in state["history"]]
        policy.clear_cache()

    def checkpoint(step: int) -> None:
        if ckpt is None:
            return
        _save(
            ckpt,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ref": ref.state_dict() if ref is not None else None,
                "torch_rng": torch.get_rng_state(),
                "history": [asdict(h) for h in history],
                "fingerprint": fingerprint,
            },
        )

    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()

        # 1-2. sample trees and score their leaves
        batch = step_problems(problems, batch_problems, seed, step)
        trees = sampler(batch, policy, seed=_step_seed(seed, step))
        generated = sum(t.generated_tokens for t in trees)
        scores = _score_leaves(trees, reward)
        excluded = sum(1 for s in scores for v in s.values() if v is None)
        t_sampled = time.perf_counter()

        # 3-4. advantages and token-level rows
        rows = _rows(trees, scores, advantage, need_logprobs=not recompute_old, each_step_once=each_step_once)
        n = len(rows.completions)
        stats: list[dict[str, float]] = []
        gap = 0.0
        if n:
            # 5. old log-probs (tree or recomputed) and the reference's, once per step, without gradients
            if recompute_old:
                rows = dataclasses.replace(rows, old_logp=_completion_logp(model, rows, pad_id))
            ref_lp = (
                _reference_logp(ref, rows, kl, phi, pad_id) if kl is not None and ref is not None else None
            )

            # 6. PPO epochs over shuffled minibatches
            gen = torch.Generator().manual_seed(_step_seed(seed, step))
            with _mode(model, training=True):
                for epoch in range(ppo_epochs):
                    perm = torch.randperm(n, generator=gen).tolist()
                    for mb in range(minibatches):
                        idx = perm[mb * n // minibatches : (mb + 1) * n // minibatches]
                        if not idx:
                            continue
                        lp, cmask, logits = _score_rows(model, rows, idx, pad_id)
                        old_t = _place([rows.old_logp[i] for i in idx], cmask)
                        adv_t = _place([rows.advantages[i] for i in idx], cmask)
                        ref_t = _place([ref_lp[i] for i in idx], cmask) if ref_lp is not None else None
                        if epoch == 0 and mb == 0 and not recompute_old:
                            gap = float(((lp.detach() - old_t).abs() * cmask).max())
                        loss, st = pg_loss(
                            lp,
                            old_t,
                            adv_t,
                            cmask,
                            clip_eps=clip_eps,
                            clip_eps_high=clip_eps_high,
                            kl=kl,
                            kl_coef=kl_coef,
                            ref_logp=ref_t,
                            logits=logits,
                            entropy_coef=entropy_coef,
                            loss_agg=loss_agg,
                        )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        st["grad_norm"] = float(
                            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                        )
                        optimizer.step()
                        stats.append(st)
            # 7. the engine's cached KV came from the old weights
            policy.clear_cache()
        t_updated = time.perf_counter()

        # 8. log, evaluate, checkpoint
        eval_acc = None
        if eval_problems and (step % eval_every == 0 or step == steps):
            eval_acc = evaluate(policy, eval_problems, reward, max_tokens=eval_max_tokens, seed=seed)
        record = PGStep(
            step=step,
            reward_mean=sum(rows.rewards) / n if n else None,
            accuracy=sum(1 for r in rows.rewards if r >= 1.0) / n if n else None,
            samples=n,
            excluded=excluded,
            generated_tokens=generated,
            trained_tokens=sum(len(c) for c in rows.completions),
            tokens_per_s=generated / max(t_updated - t0, 1e-9),
            sample_s=t_sampled - t0,
            update_s=t_updated - t_sampled,
            entropy=_mean(stats, "entropy"),
            kl=_mean(stats, "kl") if kl is not None else None,
            clip_frac=_mean(stats, "clip_frac"),
            loss=_mean(stats, "loss"),
            grad_norm=_mean(stats, "grad_norm"),
            old_logp_gap=gap,
            eval_accuracy=eval_acc,
        )
        history.append(record)
        if log is not None:
            log(record)
        if step % checkpoint_every == 0 or step == steps:
            checkpoint(step)
    return history


# ====================================================================================================================
# python -m treeward.train.pg
# ====================================================================================================================


def main(argv: Sequence[str] | None = None) -> list[PGStep]:
    """GRPO (std-scaled group advantages, no KL, token-mean) on generated arithmetic problems with the shipped
    policy, printing one log line per step."""
    from treeward._paths import SHIPPED_POLICY
    from treeward.tasks import ArithmeticAnswer, generate_problems

    p = argparse.ArgumentParser(prog="python -m treeward.train.pg", description=main.__doc__)
    p.add_argument("--model", default=str(SHIPPED_POLICY), help="a from_pretrained folder (default: shipped)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--lr",
        type=float,
        default=2e-5,
        help="at 5e-5 the shipped policy loses ~10 points of greedy accuracy in 12 steps (TRL's trainer too)",
    )
    p.add_argument(
        "--difficulty", type=int, nargs="+", default=[4], help="arithmetic step counts to train on"
    )
    p.add_argument("--problems", type=int, default=512)
    p.add_argument("--batch-problems", type=int, default=4)
    p.add_argument("--leaves", type=int, default=8, help="samples per problem")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--kl", choices=["reverse", "forward"], default=None)
    p.add_argument("--kl-coef", type=float, default=0.04)
    p.add_argument("--eval-problems", type=int, default=0, help="greedy eval on this many held-out problems")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--out", default=None, help="save the trained model and tokenizer here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    policy = HFPolicy.from_pretrained(args.model)
    train = generate_problems(args.problems, args.difficulty, seed=args.seed)
    held = (
        generate_problems(args.eval_problems, args.difficulty, seed=args.seed + 1)
        if args.eval_problems
        else None
    )
    reward = ArithmeticAnswer()
    if held:
        print(
            f"eval before training: greedy accuracy {evaluate(policy, held, reward, max_tokens=args.max_tokens):.3f}"
        )
    history = train_pg(
        policy,
        train,
        sampler=IndependentSampler(n=args.leaves, max_tokens=args.max_tokens),
        reward=reward,
        advantage=grpo,
        steps=args.steps,
        lr=args.lr,
        batch_problems=args.batch_problems,
        ppo_epochs=args.ppo_epochs,
        minibatches=args.minibatches,
        kl=args.kl,
        kl_coef=args.kl_coef,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        eval_problems=held,
        eval_every=args.eval_every,
        eval_max_tokens=args.max_tokens,
    )
    done = [h for h in history if h.samples]
    if done:
        gen = sum(h.generated_tokens for h in done)
        wall = sum(h.sample_s + h.update_s for h in done)
        print(
            f"{len(done)} steps: {gen} generated tokens in {wall:.1f} s = {gen / wall:.0f} tokens/s end to end"
        )
    if args.out:
        policy.model.save_pretrained(args.out)
        policy.tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return history


if __name__ == "__main__":
    main()
