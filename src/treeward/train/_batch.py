"""Batching helpers shared by the training loops: pad token sequences and read per-token log-probabilities.

Shapes: ``B`` sequences, ``T`` the longest sequence's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` to one length: ``ids`` [B, T] (long) and ``mask`` [B, T] (1 on real tokens)."""
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def join(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[int]]:
    """Concatenate prompt and completion ids per row; also return where each completion starts."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    return rows, [len(p) for p in prompts]


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[b, t]`` = log p(ids[b, t+1] | ids[b, :t+1]) under a causal LM, [B, T-1]; padded positions hold 0."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp * mask[:, 1:]


def completion_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of each completion given its prompt, and the mask of completion tokens.

    Returns ``(lp, cmask)``, both [B, T-1], aligned so that ``lp[b, t]`` scores token ``t+1`` of the joined row and
    ``cmask[b, t]`` is 1 exactly when that token belongs to the completion. ``(lp * cmask).sum(-1)`` is the
    completion's log-likelihood.
    """
    if any(len(c) == 0 for c in completions):
        raise ValueError("a completion has no tokens")
    rows, starts = join(prompts, completions)
    ids, mask = pad_right(rows, pad_id)
    lp = token_logprobs(model, ids, mask)
    pos = torch.arange(ids.shape[1] - 1)[None, :] + 1  # index of the token each column scores
    start = torch.tensor(starts)[:, None]
    cmask = (pos >= start).long() * mask[:, 1:]
    return lp, cmask
