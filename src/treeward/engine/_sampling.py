"""Counter-based, batch-invariant sampling: Gumbel-max with noise hashed from (seed, sample, step, token).

A sampled token must depend only on its own row's logits and on ``(seed, j, t)``: not on which other rows share the
batch, how they are ordered, or whether a prefix cache was used. A stateful generator (``torch.Generator``) fails
that, because its stream is shared by the whole batch. Here every noise value is a pure function of its coordinates:

    key(seed, j)        = mix(mix(mix(seed_lo) ^ seed_hi) ^ j)            one per row
    bits(seed, j, t, v) = mix(mix(mix(key ^ t) ^ vkey(v)) ^ key)          one per row, step and vocabulary entry
    u                   = (bits >> 8 + 0.5) / 2**24                        uniform in (0, 1), never 0 or 1
    token               = argmax(logits / T - log(-log(u)))                Gumbel-max: a draw from softmax(logits / T)

``mix`` is a 32-bit integer finaliser (xorshift-multiply, the shape of murmur3's ``fmix32``), computed on int64
tensors. Its multipliers are below 2**31 so every product of a 32-bit value stays below 2**63: no signed overflow,
no reliance on wrap-around. :func:`reference_bits` is the same hash in plain Python, for the tests.
"""

from __future__ import annotations

import torch

__all__ = ["gumbel_argmax", "reference_bits", "row_keys", "step_keys", "uniforms", "vocab_keys"]

_MASK = 0xFFFFFFFF
_M1 = 0x7FEB352D  # both odd and < 2**31
_M2 = 0x1B873593
_VOCAB_STRIDE = 0x61C88647  # 2**32 minus the golden-ratio constant 0x9E3779B9, < 2**31


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) with good avalanche; ``x`` is int64 holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """One key per row from its prefix's seed (any int64) and its sample index ``j``. [B] int64 in, [B] out."""
    lo = seeds & _MASK
    hi = (seeds >> 32) & _MASK  # arithmetic shift, then masked: the two halves of the two's complement
    return _mix(_mix(_mix(lo) ^ hi) ^ (samples & _MASK))


def step_keys(keys: torch.Tensor, step: int) -> torch.Tensor:
    """Keys of decode step ``step`` (0 for a continuation's first token). [B] -> [B]."""
    return _mix(keys ^ (step & _MASK))


def vocab_keys(vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-token-id keys, computed once per vocabulary. [V] int64."""
    v = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return _mix((v * _VOCAB_STRIDE + 1) & _MASK)


def uniforms(step_key: torch.Tensor, vkeys: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) for every row and vocabulary entry. [B], [V] -> [B, V] float32."""
    k = step_key[:, None]
    bits = _mix(_mix(k ^ vkeys[None, :]) ^ k)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)


def gumbel_argmax(
    logits: torch.Tensor, temperature: float, step_key: torch.Tensor, vkeys: torch.Tensor
) -> torch.Tensor:
    """Sample one token per row of ``logits`` [B, V]; ``temperature == 0`` is argmax. Returns [B] int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    gumbel = -torch.log(-torch.log(uniforms(step_key, vkeys)))
    return (logits.float() / temperature + gumbel).argmax(dim=-1)


def _mix_py(x: int) -> int:
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def reference_bits(seed: int, j: int, t: int, v: int) -> int:
    """The hash of :func:`uniforms` (before the float conversion) for one coordinate, in plain Python."""
    seed &= 2**64 - 1
    key = _mix_py(_mix_py(_mix_py(seed & _MASK) ^ (seed >> 32)) ^ (j & _MASK))
    k = _mix_py(key ^ (t & _MASK))
    vkey = _mix_py((v * _VOCAB_STRIDE + 1) & _MASK)
    return _mix_py(_mix_py(k ^ vkey) ^ k)
