"""Train the shipped tiny policy from scratch: a byte-level BPE tokenizer and a ~1.8M-parameter Llama.

Run ``python -m treeward.train.pretrain --out src/treeward/assets/tiny-policy`` (seeded; about 10 minutes on 2
CPU cores). The result is a ``from_pretrained``-loadable folder (config, weights, tokenizer).

The model is meant to be *imperfect*: trained just long enough to do arithmetic word problems most of the time at
1 step and a third of the time at 4 steps, so that search, process rewards and RL have room to help. Problems of
1–4 steps are drawn with weights 1:2:2:2; 5-step problems are never seen (a length-generalisation probe).

Recipe (from the CPU feasibility notes in the design docs): digits split into single tokens, vocabulary 320,
hidden 192, 4 layers, 4 heads, MLP 512, tied embeddings; AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1), 40
warm-up steps then cosine decay to 10 %, batch 64, loss on the solution tokens only, bf16 autocast on CPU. The one
departure: training length is a fixed number of optimiser steps instead of a wall-clock budget, so the same seed
gives the same model on a busy or an idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from treeward.tasks.arithmetic import generate_problems, make_problem, solution_text

__all__ = ["build_model", "build_tokenizer", "train"]

SPECIAL = ("<pad>", "<bos>", "<eos>")


def build_tokenizer(
    *, vocab_size: int = 320, n_texts: int = 20_000, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on generated problems, with every digit its own token."""
    texts = [
        p.prompt + solution_text(p) for p in generate_problems(n_texts, [1, 2, 3, 4, 5], seed=10_000 + seed)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def build_model(
    vocab_size: int, *, pad_token_id: int, bos_token_id: int, eos_token_id: int
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return LlamaForCausalLM(config)


def _batch(
    rng: random.Random, tok: PreTrainedTokenizerFast, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and labels (-100 on the prompt and padding) for one batch."""
    rows, lab = [], []
    for _ in range(batch_size):
        steps = rng.choices([1, 2, 3, 4], weights=[1, 2, 2, 2])[0]
        p = make_problem(rng, steps)
        prompt = [tok.bos_token_id, *tok.encode(p.prompt, add_special_tokens=False)]
        answer = [*tok.encode(solution_text(p), add_special_tokens=False), tok.eos_token_id]
        rows.append(prompt + answer)
        lab.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in lab])
    return ids, mask, labels


def train(
    out: Path,
    *,
    steps: int = 850,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 40,
    seed: int = 0,
    threads: int = 2,
    bf16: bool = True,
    log_every: int = 50,
) -> dict[str, float]:
    """Train and save to ``out``; returns a small log (final loss EMA, seconds, tokens)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(f"treeward-pretrain-{seed}")
    tok = build_tokenizer(seed=seed)
    model = build_model(
        len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, {n_params:,} parameters, {steps} steps of {batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    t0, ema, tokens = time.perf_counter(), None, 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, mask, labels = _batch(rng, tok, batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(mask.sum())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            dt = time.perf_counter() - t0
            print(
                f"step {step + 1:5d}  loss(ema) {ema:.3f}  lr {lr_at(step):.2e}  {dt:6.0f}s  {tokens / dt:,.0f} tok/s",
                flush=True,
            )
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    log = {
        "steps": steps,
        "seed": seed,
        "loss_ema": float(ema or 0.0),
        "seconds": time.perf_counter() - t0,
        "tokens": tokens,
        "parameters": n_params,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=850)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    train(args.out, steps=args.steps, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
