"""The one optimisation loop every training recipe shares (SFT, DPO / TPO, value models), and its input checks.

``fit`` takes the items, a ``batch_loss(batch) -> (loss, tokens)`` closure and the optimiser knobs; the recipes own
their losses and data checks. AdamW with gradient-norm clipping; an optional linear warm-up then cosine decay to
``min_lr_ratio`` of ``lr``; optional bfloat16 autocast for the forward (weights and optimiser stay float32).
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

__all__ = ["TrainHistory", "TrainingDataError", "check_ids", "check_knobs", "fit", "pad_id_of", "vocab_size"]

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
    betas: tuple[float, float] = (0.9, 0.999),
    warmup: int = 0,
    cosine: bool = False,
    min_lr_ratio: float = 0.1,
    bf16: bool = False,
    order_rng: random.Random | None = None,
    report: Callable[[str], None] | None = None,
    report_every: int = 1,
) -> TrainHistory:
    """The one optimisation loop: shuffled batches of ``items``, ``batch_loss(batch) -> (loss, tokens)``, AdamW.

    The learning rate is ``lr``, or with ``warmup`` steps of linear warm-up and/or ``cosine`` decay to
    ``min_lr_ratio · lr`` over the run. ``bf16`` runs ``batch_loss`` under bfloat16 autocast. Batches are shuffled
    per epoch by ``order_rng`` (default ``random.Random(seed)``). Logs one line per step (``treeward.train`` logger,
    INFO) and, when ``report`` is given, sends it a line every ``report_every`` steps and at the last. The model is in
    train mode during the loop and restored to its previous mode afterwards, also on error.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingDataError(
            f"{name}: the model has no trainable parameters (all have requires_grad=False)"
        )
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    clip = math.inf if max_grad_norm is None else max_grad_norm
    order_rng = random.Random(seed) if order_rng is None else order_rng
    losses: list[float] = []
    norms: list[float] = []
    tokens = 0
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if not cosine:
            return lr
        progress = (step - warmup) / max(1, total - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    device_type = next(iter(params)).device.type
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
                    for g in opt.param_groups:
                        g["lr"] = lr_at(len(losses))
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
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
                    if report is not None and (len(losses) % report_every == 0 or len(losses) == total):
                        recent = losses[-report_every:]
                        report(
                            f"{name} step {len(losses):4d}/{total}  loss {sum(recent) / len(recent):.4f}  "
                            f"lr {lr_at(len(losses) - 1):.2e}  {time.perf_counter() - t0:5.0f}s"
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


def check_knobs(*, lr: float, epochs: int, batch_size: int, max_grad_norm: float | None) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any valid id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    raise ValueError(
        "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token before training"
    )


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding: the exclusive upper bound of a valid token id."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise TypeError(f"expected an nn.Embedding input layer, got {type(emb).__name__}")
    return emb.num_embeddings
