"""Supervised fine-tuning of a policy on selected traces, and the one optimisation loop every policy trainer shares.

Paper: the "improve" step of ReST-EM (Singh et al. 2023, "Beyond Human Data: Scaling Self-Training for Problem-Solving
with Language Models") and the policy self-training step of ReST-MCTS* (Zhang et al. 2024): maximise the likelihood of
verified solutions given their prompts. Departures: ReST-EM fine-tunes the *base* model afresh at every iteration and
ReST-MCTS* mixes traces across iterations; both are the caller's choice here (pass the model and examples you want).
The loss is the token-level mean over every completion token in the batch (as HF's ``labels=-100`` convention), not
a per-sequence mean; the optimiser is AdamW at a constant learning rate with gradient-norm clipping, no warm-up.

The token ids come from the examples (the tree's ids): nothing is re-tokenised, and the tokenizer is used only for
its pad id. Inputs are validated before the model is touched, so bad input raises :class:`TrainingDataError` and
leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from treeward.credit.records import SFTExample
from treeward.train._batch import completion_logprobs

__all__ = ["TrainHistory", "TrainingDataError", "sft_loss", "train_sft"]

log = logging.getLogger("treeward.train")

T = TypeVar("T")


class TrainingDataError(ValueError):
    """Training input a loop cannot use (empty, malformed or out-of-vocabulary); the message says what and how to fix."""


@dataclass(frozen=True)
class TrainHistory:
    """What a training loop did, one entry per optimiser step.

    ``losses`` [steps]: the loss of each step's batch, computed before that step's update; ``grad_norms`` [steps]:
    the total gradient norm before clipping; ``examples``: records trained on (pairs, lists or SFT examples); ``epochs``
    and ``steps`` the passes and optimiser steps taken; ``tokens``: completion tokens the policy was trained on, summed
    over steps; ``seconds``: wall time of the loop.
    """

    name: str
    losses: tuple[float, ...]
    grad_norms: tuple[float, ...]
    examples: int
    epochs: int
    steps: int
    tokens: int
    seconds: float


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the completion tokens of a batch (a scalar).

    ``logprobs`` [B, T-1] and ``completion_mask`` [B, T-1] are what
    :func:`treeward.train._batch.completion_logprobs` returns; positions outside the mask (prompt and padding) get no
    loss and no gradient. The mean is over all completion tokens of the batch, so a long completion weighs more than
    a short one, as in HF's own causal-LM loss with the prompt labelled ``-100``.
    """
    if logprobs.shape != completion_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and mask {tuple(completion_mask.shape)} differ in shape"
        )
    n = completion_mask.sum()
    if int(n) == 0:
        raise ValueError("the batch has no completion tokens to train on")
    return -(logprobs * completion_mask).sum() / n


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SFTExample],
    *,
    lr: float,
    epochs: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
) -> TrainHistory:
    """Fine-tune ``model`` in place on ``examples`` (prompt ids → completion ids); returns the per-step history.

    Args:
        model: a causal LM (any HF ``PreTrainedModel``); left in the train/eval mode it came in.
        tokenizer: the model's tokenizer; only its pad id is read.
        examples: the traces to imitate; each needs a non-empty prompt (its first token gives the first completion
            token its context; start prompts with BOS) and a non-empty completion.
        lr: AdamW learning rate. No default: it depends on the model's scale (the shipped ~2M-parameter policy trains
            stably at 1e-5 to 1e-4; billion-parameter models use ~1e-6).
        epochs: passes over ``examples``; each pass is shuffled with ``seed``.
        batch_size: examples per optimiser step (the last batch of a pass may be smaller).
        seed: seeds the shuffling and, inside a forked RNG, any dropout; the global RNG is left as it was.
        max_grad_norm: clip the total gradient norm to this (``None``: no clipping).
        weight_decay: AdamW's decoupled weight decay.
    """
    pad_id = _pad_id(tokenizer)
    _check_knobs(lr=lr, epochs=epochs, batch_size=batch_size, max_grad_norm=max_grad_norm)
    if len(examples) == 0:
        raise TrainingDataError("train_sft got no examples: pass at least one SFTExample")
    vocab = _vocab_size(model)
    for i, ex in enumerate(examples):
        where = f"example {i} (problem {ex.problem_id!r}, node {ex.node_id})"
        check_ids(ex.prompt_ids, f"{where}: prompt_ids", vocab)
        check_ids(ex.completion_ids, f"{where}: completion_ids", vocab)

    def batch_loss(batch: Sequence[SFTExample]) -> tuple[torch.Tensor, int]:
        lp, cmask = completion_logprobs(
            model, [ex.prompt_ids for ex in batch], [ex.completion_ids for ex in batch], pad_id
        )
        return sft_loss(lp, cmask), int(cmask.sum())

    return fit(
        model,
        examples,
        batch_loss,
        name="sft",
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_grad_norm=max_grad_norm,
        weight_decay=weight_decay,
    )


# -- the shared loop and its checks (also used by treeward.train.prefs) --------------------------------------------


def fit(
    model: torch.nn.Module,
    items: Sequence[T],
    batch_loss: Callable[[Sequence[T]], tuple[torch.Tensor, int]],
    *,
    name: str,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    max_grad_norm: float | None,
    weight_decay: float,
) -> TrainHistory:
    """The one optimisation loop: shuffled batches of ``items``, ``batch_loss(batch) -> (loss, tokens)``, AdamW.

    Logs one line per step (``treeward.train`` logger, INFO). The model is in train mode during the loop and restored
    to its previous mode afterwards, also on error.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingDataError(
            f"{name}: the model has no trainable parameters (all have requires_grad=False)"
        )
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    clip = math.inf if max_grad_norm is None else max_grad_norm
    order_rng = random.Random(seed)
    losses: list[float] = []
    norms: list[float] = []
    tokens = 0
    steps_per_epoch = math.ceil(len(items) / batch_size)
    was_training = model.training
    t0 = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for epoch in range(epochs):
                order = list(range(len(items)))
                order_rng.shuffle(order)
                for b in range(steps_per_epoch):
                    batch = [items[i] for i in order[b * batch_size : (b + 1) * batch_size]]
                    loss, n_tokens = batch_loss(batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                    opt.step()
                    losses.append(float(loss.detach()))
                    norms.append(norm)
                    tokens += n_tokens
                    log.info(
                        "%s epoch %d step %d/%d  loss %.4f  grad_norm %.3f",
                        name,
                        epoch + 1,
                        len(losses),
                        epochs * steps_per_epoch,
                        losses[-1],
                        norm,
                    )
    finally:
        model.train(was_training)
    return TrainHistory(
        name=name,
        losses=tuple(losses),
        grad_norms=tuple(norms),
        examples=len(items),
        epochs=epochs,
        steps=len(losses),
        tokens=tokens,
        seconds=time.perf_counter() - t0,
    )


def check_ids(ids: Sequence[int], what: str, vocab: int) -> None:
    """Raise :class:`TrainingDataError` unless ``ids`` is a non-empty sequence of ids in ``[0, vocab)``."""
    if len(ids) == 0:
        raise TrainingDataError(f"{what} is empty: every prompt and completion needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise TrainingDataError(
            f"{what} holds token id {bad[0]}, outside the model's vocabulary of {vocab}: "
            "the ids must come from this model's tokenizer"
        )


def _check_knobs(*, lr: float, epochs: int, batch_size: int, max_grad_norm: float | None) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any valid id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    raise ValueError(
        "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token before training"
    )


def _vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding: the exclusive upper bound of a valid token id."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise TypeError(f"expected an nn.Embedding input layer, got {type(emb).__name__}")
    return emb.num_embeddings
