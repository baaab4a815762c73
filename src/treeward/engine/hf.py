"""The transformers backend: :class:`HFPolicy` runs any HF causal LM with its own batched decode loop.

How it departs from ``model.generate()``, and why:

* **One loop for many prefixes × n samples**, chunked into at most ``max_batch_rows`` rows sorted by length. Every
  forward gets an explicit 4D attention mask and explicit position ids, so padding (on the left, or in the middle
  between a cached part and a new suffix) never changes a row's numbers: a row's logprobs are the same, within float
  rounding (~1e-6), alone or in any batch. ``generate()`` left-pads with 2D masks and cannot mix cached and uncached
  parts in one batch.
* **Seeded, batch-invariant sampling.** Gumbel-max with noise hashed from ``(seed, j, step, token id)``
  (:mod:`treeward.engine._sampling`), so continuation ``j`` of a prefix depends on ``(prefix, seed, j)`` only: not on
  batch composition, chunking or caching. ``generate()`` draws from one shared ``torch.Generator`` stream.
* **Per-row stopping with compaction.** A row stops at its first token whose text contains ``stop`` (a per-token
  test against a precomputed id set, as the contract in :mod:`treeward.engine.base` defines it), at EOS, or at its
  own ``max_new_tokens``. Finished rows are dropped from the batch (KV cache and all) once they are a quarter of it,
  rather than decoded as padding to the longest row.
* **Prefix KV reuse.** Identical prefixes in one call are prefilled once and their KV shared by all their rows. Across
  calls a bounded LRU store (:mod:`treeward.engine._kvstore`) keeps the KV of every prefix and of every finished
  ``prefix + continuation[:-1]``, and a prefix is prefilled only past its longest stored prefix, so expanding a child
  node computes just the new step. At least a prefix's last token is always recomputed (its logits are not stored).
* **An exact ledger.** Every position run through the model is booked as ``computed``, every position served from
  the store or shared within the call as ``reused`` (see :meth:`HFPolicy.expand`).

Supported models: decoder-only causal LMs whose forward takes ``attention_mask`` (4D), ``position_ids``, ``cache``
and ``logits_to_keep`` (Llama, Mistral, Qwen2, Gemma, ... in transformers 5) with the ``sdpa`` or ``eager``
attention implementation. Sliding-window attention is not applied (the 4D mask is full causal).
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from treeward.engine._kvstore import KVStore, SeqKV
from treeward.engine._sampling import gumbel_argmax, row_keys, step_keys, vocab_keys
from treeward.engine.base import Continuation, FinishReason, Ledger

__all__ = ["HFPolicy", "ModelLoadError", "check_model_path"]

#: Rows × padded length allowed in one forward (bounds the 4D mask and activations of a chunk).
_MAX_BATCH_TOKENS = 65536
_SUPPORTED_ATTENTION = ("sdpa", "eager")
_HUB_ID = re.compile(r"^[\w-][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A model folder is missing, incomplete or unreadable."""


@dataclass
class _Row:
    """One continuation in flight: sample ``sample`` of prefix ``prefix_index``."""

    prefix_index: int
    sample: int
    prefix: tuple[int, ...]
    max_new: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason = "length"


@dataclass
class _Batch:
    """Rows in one forward pass: their KV cache and which cache slots hold their own tokens.

    Slots are shared by all rows; a row's tokens occupy an increasing subset of them (``valid``), the rest is padding
    that no real query ever attends to.
    """

    cache: DynamicCache
    valid: torch.Tensor  # [B, L] bool: slot holds one of the row's tokens
    pos: torch.Tensor  # [B] int64: position id of the row's next token (= its number of tokens)

    def kv(self, b: int) -> SeqKV:
        """Compact copy of row ``b``'s KV (its valid slots only)."""
        idx = self.valid[b].nonzero().squeeze(1)
        return SeqKV(
            tuple((k[b].index_select(1, idx), v[b].index_select(1, idx)) for k, v in _layers(self.cache))
        )

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.valid = self.valid[keep]
        self.pos = self.pos[keep]


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` [B, heads, L, head_dim] of a cache made of plain dynamic layers."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise TypeError(f"HFPolicy supports full-attention KV caches only, got a {type(layer).__name__}")
        if layer.keys is None or layer.values is None:
            raise TypeError("a cache layer was never filled (a model that shares KV across layers?)")
        out.append((layer.keys, layer.values))
    return out


def _attention_mask(valid: torch.Tensor, first_query: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, Q, L] for queries in slots ``first_query .. L-1`` over keys in slots ``0 .. L-1``.

    A query sees the valid slots up to its own (causal by slot; a row's tokens are in slot order), and always its own
    slot, so a padding query is never fully masked: SDPA would give NaN there, and NaN values in the cache poison
    every row that later multiplies them by a zero weight. Masked entries are ``finfo.min``, not ``-inf``, for the
    same reason.
    """
    length = valid.shape[1]
    q = torch.arange(first_query, length, device=valid.device)[:, None]
    k = torch.arange(length, device=valid.device)[None, :]
    allowed = (valid[:, None, :] & (k <= q)) | (k == q)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _stack_past(pasts: Sequence[SeqKV | None], width: int) -> DynamicCache:
    """A batch cache of ``width`` slots holding each row's past right-aligned (left padding is zeros)."""
    present = [p for p in pasts if p is not None and p.length > 0]
    if width == 0 or not present:
        return DynamicCache()
    layers = []
    for i, (k0, v0) in enumerate(present[0].layers):
        keys = k0.new_zeros(len(pasts), k0.shape[0], width, k0.shape[2])
        values = v0.new_zeros(len(pasts), v0.shape[0], width, v0.shape[2])
        for b, past in enumerate(pasts):
            if past is not None and past.length > 0:
                k, v = past.layers[i]
                keys[b, :, width - past.length :] = k
                values[b, :, width - past.length :] = v
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


def _chunks(order: Sequence[int], lengths: Sequence[int], max_rows: int) -> Iterator[list[int]]:
    """Split ``order`` (sorted by decreasing length) into runs of at most ``max_rows`` rows and
    ``_MAX_BATCH_TOKENS`` padded positions."""
    chunk: list[int] = []
    for item in order:
        if chunk and (len(chunk) >= max_rows or (len(chunk) + 1) * lengths[chunk[0]] > _MAX_BATCH_TOKENS):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout) and restore the training flag afterwards: the model may be mid-training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits."""
    seed &= 2**64 - 1
    return seed - 2**64 if seed >= 2**63 else seed


def check_model_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string once it names a saved model folder (with a ``config.json``) or looks like a hub id
    (``org/name``); otherwise one :class:`ModelLoadError` naming the path. Every model loader runs this first."""
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no config.json: not a saved model folder")
    elif folder.exists():
        raise ModelLoadError(f"{folder} is a file, not a model folder")
    elif not _HUB_ID.match(text):
        raise ModelLoadError(f"no model folder at {folder}")
    return text


class HFPolicy:
    """A :class:`~treeward.engine.base.Policy` over a transformers causal LM and its (fast) tokenizer.

    Args:
        model: any decoder-only ``PreTrainedModel`` (see the module docstring for what it must accept). It is moved
            to ``device``; each call runs it in eval mode under ``torch.inference_mode`` and restores its mode.
        tokenizer: the model's tokenizer.
        prefix_cache: reuse prefix KV within and across calls. Off, every row recomputes its whole prefix (as plain
            batched sampling does) and nothing is stored.
        cache_bytes: bound of the cross-call KV store (least recently used entries are evicted).
        max_batch_rows: most rows in one forward pass.
        device: where the model runs and the KV store lives.

    The store is cleared automatically when the model's parameters change in place (an optimizer step,
    ``load_state_dict``): stale KV would silently mix two policies. :meth:`clear_cache` clears it by hand.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prefix_cache: bool = True,
        cache_bytes: int = 512 * 2**20,
        max_batch_rows: int = 256,
        device: str = "cpu",
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        attention = model.config._attn_implementation
        if attention not in _SUPPORTED_ATTENTION:
            raise ValueError(
                f"HFPolicy needs attention implementation {' or '.join(_SUPPORTED_ATTENTION)} (it passes 4D masks), "
                f"got {attention!r}; call model.set_attn_implementation('sdpa') first"
            )
        self.device = torch.device(device)
        model.to(self.device)  # type: ignore[arg-type]  # in place; transformers' decorator confuses mypy
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.max_batch_rows = max_batch_rows
        self.ledger = Ledger()
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        self._store = KVStore(cache_bytes)
        self._vocab_keys = vocab_keys(self.vocab_size, self.device)
        self._stop_ids: dict[str, torch.Tensor] = {}
        self._weights_version = self._parameter_version()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        prefix_cache: bool = True,
        cache_bytes: int = 512 * 2**20,
        max_batch_rows: int = 256,
        device: str = "cpu",
    ) -> HFPolicy:
        """Load a saved model folder (or a hub id such as ``org/name``) in float32, in eval mode.

        Raises :class:`ModelLoadError` naming the path when the folder is missing, has no ``config.json``, or
        transformers cannot load a causal LM and tokenizer from it.
        """
        text = check_model_path(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(text)
        except Exception as e:  # re-raised with the path first; the cause stays chained
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load a causal LM and tokenizer from {text}: {reason}") from e
        model.eval()
        return cls(
            model,
            tokenizer,
            prefix_cache=prefix_cache,
            cache_bytes=cache_bytes,
            max_batch_rows=max_batch_rows,
            device=device,
        )

    # -- tokens and text ------------------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return eos if isinstance(eos, int) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt: BOS first when the tokenizer has one, then ``text`` with no special tokens."""
        bos = self.tokenizer.bos_token_id
        return ([bos] if isinstance(bos, int) else []) + self.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens skipped."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # -- the KV store ---------------------------------------------------------------------------------------------

    @property
    def cache_nbytes(self) -> int:
        """Bytes of KV held by the cross-call store."""
        return self._store.nbytes

    def clear_cache(self) -> None:
        """Drop every stored KV state."""
        self._store.clear()

    def _parameter_version(self) -> int:
        # Tensor._version counts in-place writes; the sum grows whenever any parameter is updated in place.
        return sum(p._version for p in self.model.parameters())

    def _check_weights(self) -> None:
        version = self._parameter_version()
        if version != self._weights_version:
            self._store.clear()
            self._weights_version = version

    # -- the contract ---------------------------------------------------------------------------------------------

    def expand(
        self,
        prefixes: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 1.0,
        stop: str | None = "\n",
        seeds: int | Sequence[int] = 0,
        groups: Sequence[str] | None = None,
    ) -> list[list[Continuation]]:
        """Sample ``n`` continuations of each prefix (see :class:`~treeward.engine.base.Policy`).

        Booked per prefix, to its group: ``generated`` = tokens in its continuations; ``computed`` = prefill
        positions run for it (without the cache: its whole prefix once per row; with it: the part past the longest
        stored prefix, once per distinct prefix, booked to the first prefix in the call with those tokens) plus
        decode positions (every generated token but a row's last is fed back); ``reused`` = rows × prefix length −
        its computed prefill positions. ``computed + reused`` is therefore the same with and without the cache.
        A prefix with ``max_new_tokens == 0`` gets ``n`` empty continuations and costs nothing.
        """
        seqs = self._check_sequences(prefixes, "prefix", allow_empty=False)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if stop == "":
            raise ValueError("stop must be a non-empty string or None")
        limits = self._per_prefix(max_new_tokens, "max_new_tokens", len(seqs))
        if any(m < 0 for m in limits):
            raise ValueError(f"max_new_tokens must be >= 0, got {min(limits)}")
        seed_list = self._per_prefix(seeds, "seeds", len(seqs))
        group_list = self._check_groups(groups, len(seqs))

        with self.ledger.timed("generate"), torch.inference_mode(), _eval_mode(self.model):
            self.ledger.book_call(group_list)
            self._check_weights()
            rows = [
                _Row(i, j, seq, limits[i], _as_int64(seed_list[i]))
                for i, seq in enumerate(seqs)
                if limits[i] > 0
                for j in range(n)
            ]
            prefill = [0] * len(seqs)  # prefill positions computed, per prefix
            if rows:
                stop_ids = self._stop_token_mask(stop)
                if self.prefix_cache:
                    self._expand_cached(rows, prefill, temperature, stop_ids)
                else:
                    self._expand_uncached(rows, prefill, temperature, stop_ids)

            texts = self.tokenizer.batch_decode([r.tokens for r in rows], skip_special_tokens=True)
            out: list[list[Continuation]] = [
                [Continuation((), "", (), "length")] * n if limits[i] == 0 else [] for i in range(len(seqs))
            ]
            generated, decoded, row_positions = [0] * len(seqs), [0] * len(seqs), [0] * len(seqs)
            for row, text in zip(rows, texts, strict=True):
                i = row.prefix_index
                out[i].append(Continuation(tuple(row.tokens), text, tuple(row.logprobs), row.finish))
                generated[i] += len(row.tokens)
                decoded[i] += len(row.tokens) - 1
                row_positions[i] += len(row.prefix)
            for i in range(len(seqs)):
                self.ledger.book(
                    group_list[i],
                    generated=generated[i],
                    computed=prefill[i] + decoded[i],
                    reused=row_positions[i] - prefill[i],
                )
        return out

    def score(
        self,
        prefixes: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        *,
        groups: Sequence[str] | None = None,
    ) -> list[list[float]]:
        """Teacher-forced ``log p`` (temperature 1) of each continuation token given its prefix.

        The positions needed are ``prefix + continuation[:-1]``. Without the cache every pair runs them all. With it,
        ``prefix[:-1]`` is taken from the store as far as it goes and the rest of it is computed once per distinct
        ``prefix[:-1]`` (booked to the first pair that has it); then each pair runs ``[prefix[-1]] + continuation[:-1]``.
        ``reused`` = ``len(prefix) - 1`` − the ``prefix[:-1]`` positions computed for the pair. Empty continuations
        get ``[]`` and cost nothing.
        """
        seqs = self._check_sequences(prefixes, "prefix", allow_empty=False)
        conts = self._check_sequences(continuations, "continuation", allow_empty=True)
        if len(conts) != len(seqs):
            raise ValueError(f"{len(seqs)} prefixes but {len(conts)} continuations")
        group_list = self._check_groups(groups, len(seqs))

        with self.ledger.timed("score"), torch.inference_mode(), _eval_mode(self.model):
            self.ledger.book_call(group_list)
            self._check_weights()
            pairs = [i for i in range(len(seqs)) if conts[i]]
            result: list[list[float]] = [[] for _ in seqs]
            prefill = [0] * len(seqs)  # prefix[:-1] positions computed, per pair (cached path)
            if self.prefix_cache:
                heads = self._prefill_kv([seqs[i][:-1] for i in pairs], pairs, prefill)
                pasts = {i: heads[k] for k, i in enumerate(pairs)}
                suffixes = {i: (seqs[i][-1], *conts[i][:-1]) for i in pairs}
            else:
                pasts = dict.fromkeys(pairs)
                suffixes = {i: (*seqs[i], *conts[i][:-1]) for i in pairs}
            order = sorted(pairs, key=lambda i: -len(suffixes[i]))
            lengths = [len(suffixes.get(i, ())) for i in range(len(seqs))]
            for chunk in _chunks(order, lengths, self.max_batch_rows):
                batch, logits = self._forward(
                    [pasts[i] for i in chunk], [suffixes[i] for i in chunk], all_logits=True
                )
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for b, i in enumerate(chunk):
                    target = torch.tensor(conts[i], device=self.device)
                    result[i] = logprobs[b, -len(target) :].gather(1, target[:, None])[:, 0].tolist()
                    if self.prefix_cache:
                        self._store.insert((*seqs[i], *conts[i][:-1]), batch.kv(b))
            for i in pairs:
                reused = len(seqs[i]) - 1 - prefill[i] if self.prefix_cache else 0
                self.ledger.book(group_list[i], computed=prefill[i] + len(suffixes[i]), reused=reused)
        return result

    # -- expansion ------------------------------------------------------------------------------------------------

    def _expand_uncached(
        self, rows: list[_Row], prefill: list[int], temperature: float, stop_ids: torch.Tensor | None
    ) -> None:
        """Every row prefills its whole prefix, then decodes, chunk by chunk."""
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].prefix))
        lengths = [len(r.prefix) for r in rows]
        for chunk in _chunks(order, lengths, self.max_batch_rows):
            batch_rows = [rows[r] for r in chunk]
            batch, logits = self._forward(
                [None] * len(chunk), [r.prefix for r in batch_rows], all_logits=False
            )
            for row in batch_rows:
                prefill[row.prefix_index] += len(row.prefix)
            self._decode(batch, batch_rows, logits[:, -1], temperature, stop_ids, store=False)

    def _expand_cached(
        self, rows: list[_Row], prefill: list[int], temperature: float, stop_ids: torch.Tensor | None
    ) -> None:
        """Prefill each distinct prefix once (past its longest stored prefix), then decode its rows from a copy."""
        owner: dict[tuple[int, ...], int] = {}  # distinct prefix -> the first prefix index with it
        for row in rows:
            owner.setdefault(row.prefix, row.prefix_index)
        distinct = {prefix: k for k, prefix in enumerate(owner)}
        last_logits: dict[int, torch.Tensor] = {}
        pasts = self._prefill_kv(list(owner), list(owner.values()), prefill, last_logits=last_logits)

        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].prefix), distinct[rows[r].prefix]))
        lengths = [len(r.prefix) for r in rows]
        for chunk in _chunks(order, lengths, self.max_batch_rows):
            batch_rows = [rows[r] for r in chunk]
            kvs = [pasts[distinct[r.prefix]] for r in batch_rows]
            width = max(len(r.prefix) for r in batch_rows)
            lens = torch.tensor([len(r.prefix) for r in batch_rows], device=self.device)
            batch = _Batch(
                cache=_stack_past(kvs, width),
                valid=torch.arange(width, device=self.device)[None, :] >= (width - lens)[:, None],
                pos=lens,
            )
            logits = torch.stack([last_logits[distinct[r.prefix]] for r in batch_rows])
            self._decode(batch, batch_rows, logits, temperature, stop_ids, store=True)

    def _prefill_kv(
        self,
        seqs: Sequence[tuple[int, ...]],
        owner: Sequence[int],
        prefill: list[int],
        *,
        last_logits: dict[int, torch.Tensor] | None = None,
    ) -> dict[int, SeqKV | None]:
        """KV of each distinct sequence in ``seqs`` (keyed by its first index), from the store plus a prefill.

        With ``last_logits`` the next-token logits of each sequence are needed too, so at least its last token is
        computed. Lookups all happen before any insert, so what is reused does not depend on chunking. Computed
        positions are booked to ``prefill[owner[k]]`` for the first ``k`` with those tokens.
        """
        first: dict[tuple[int, ...], int] = {}
        for k, seq in enumerate(seqs):
            first.setdefault(seq, k)
        reserve = (
            1 if last_logits is not None else 0
        )  # positions that must be computed whatever the store holds
        hits = {k: self._store.lookup(seq, max_length=len(seq) - reserve) for seq, k in first.items()}
        result: dict[int, SeqKV | None] = {k: hits[k][1] for k in first.values()}
        todo = [k for k in first.values() if hits[k][0] < len(seqs[k])]
        lengths = [len(seq) - hits[k][0] if k in hits else 0 for k, seq in enumerate(seqs)]
        order = sorted(todo, key=lambda k: -lengths[k])
        for chunk in _chunks(order, lengths, self.max_batch_rows):
            batch, logits = self._forward(
                [hits[k][1] for k in chunk], [seqs[k][hits[k][0] :] for k in chunk], all_logits=False
            )
            for b, k in enumerate(chunk):
                result[k] = kv = batch.kv(b)
                self._store.insert(seqs[k], kv)
                prefill[owner[k]] += lengths[k]
                if last_logits is not None:
                    last_logits[k] = logits[b, -1]
        # Callers index by position in ``seqs``: point duplicates at their first occurrence.
        return {k: result[first[seq]] for k, seq in enumerate(seqs)}

    # -- forward passes -------------------------------------------------------------------------------------------

    def _forward(
        self, pasts: Sequence[SeqKV | None], suffixes: Sequence[Sequence[int]], *, all_logits: bool
    ) -> tuple[_Batch, torch.Tensor]:
        """Run each row's ``suffix`` after its ``past`` KV in one forward pass.

        Layout of row ``b`` in the ``C + S`` cache slots (``C`` = longest past, ``S`` = longest suffix)::

            [pad ... past_b][pad ... suffix_b]

        Suffixes are left-padded so every row's last token is in the last slot. Returns the batch (cache now
        holding pasts and suffixes) and logits [B, S, V] (``all_logits``) or [B, 1, V].
        """
        device = self.device
        past_len = torch.tensor([0 if p is None else p.length for p in pasts], device=device)
        suffix_len = torch.tensor([len(s) for s in suffixes], device=device)
        width, span = int(past_len.max()), int(suffix_len.max())
        valid = torch.cat(
            [
                torch.arange(width, device=device)[None, :] >= (width - past_len)[:, None],
                torch.arange(span, device=device)[None, :] >= (span - suffix_len)[:, None],
            ],
            dim=1,
        )
        input_ids = torch.tensor(
            [[self._pad_id] * (span - len(s)) + list(s) for s in suffixes], device=device
        )
        offset = torch.arange(span, device=device)[None, :] - (span - suffix_len)[:, None]  # < 0 on padding
        position_ids = (past_len[:, None] + offset).clamp(min=0)
        cache = _stack_past(pasts, width)
        output = self.model(
            input_ids=input_ids,
            attention_mask=_attention_mask(valid, width, self.model.dtype),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return _Batch(cache, valid, past_len + suffix_len), output.logits

    def _decode(
        self,
        batch: _Batch,
        rows: list[_Row],
        logits: torch.Tensor,
        temperature: float,
        stop_ids: torch.Tensor | None,
        *,
        store: bool,
    ) -> None:
        """Sample rows token by token from next-token ``logits`` [B, V] until each one stops.

        A finished row feeds padding (its slot stays invalid) until finished rows are a quarter of the batch; then
        their KV (``prefix + continuation[:-1]``) goes to the store when ``store`` is set and they leave the batch.
        """
        device = self.device
        keys = row_keys(
            torch.tensor([r.seed for r in rows], device=device),
            torch.tensor([r.sample for r in rows], device=device),
        )
        limit = torch.tensor([r.max_new for r in rows], device=device)
        live = torch.ones(len(rows), dtype=torch.bool, device=device)
        eos = self.eos_token_id
        in_batch = list(rows)  # batch position -> row
        step = 0
        while True:
            token = gumbel_argmax(logits, temperature, step_keys(keys, step), self._vocab_keys)
            logprob = torch.log_softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]
            is_eos = token == eos if eos is not None else torch.zeros_like(live)
            is_stop = stop_ids[token] if stop_ids is not None else torch.zeros_like(live)
            done = live & (is_eos | is_stop | (limit <= step + 1))
            for row, t, lp, alive, d, e, s in zip(
                in_batch,
                token.tolist(),
                logprob.tolist(),
                live.tolist(),
                done.tolist(),
                is_eos.tolist(),
                is_stop.tolist(),
                strict=True,
            ):
                if alive:
                    row.tokens.append(t)
                    row.logprobs.append(lp)
                    if d:
                        row.finish = "eos" if e else "stop" if s else "length"
            live &= ~done
            n_live = int(live.sum())
            if n_live == 0:
                break
            if (len(in_batch) - n_live) * 4 >= len(in_batch):
                self._retire(batch, in_batch, live, store=store)
                keep = live.nonzero().squeeze(1)
                batch.select(keep)
                in_batch = [in_batch[b] for b in keep.tolist()]
                keys, limit, token, live = keys[keep], limit[keep], token[keep], live[keep]
            batch.valid = torch.cat([batch.valid, live[:, None]], dim=1)
            output = self.model(
                input_ids=torch.where(live, token, self._pad_id)[:, None],
                attention_mask=_attention_mask(batch.valid, batch.valid.shape[1] - 1, self.model.dtype),
                position_ids=batch.pos[:, None],
                cache=batch.cache,
                use_cache=True,
            )
            batch.pos = batch.pos + live
            logits = output.logits[:, -1]
            step += 1
        self._retire(batch, in_batch, live, store=store)

    def _retire(self, batch: _Batch, in_batch: list[_Row], live: torch.Tensor, *, store: bool) -> None:
        """Store the KV of the batch's finished rows (their prefix and all but the last generated token)."""
        if not store:
            return
        for b, alive in enumerate(live.tolist()):
            if not alive:
                row = in_batch[b]
                self._store.insert((*row.prefix, *row.tokens[:-1]), batch.kv(b))

    # -- validation -----------------------------------------------------------------------------------------------

    def _stop_token_mask(self, stop: str | None) -> torch.Tensor | None:
        """[V] bool: token ids whose text contains ``stop``; computed once per stop string."""
        if stop is None:
            return None
        if stop not in self._stop_ids:
            n = min(len(self.tokenizer), self.vocab_size)
            texts = self.tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[torch.tensor([i for i, t in enumerate(texts) if stop in t], dtype=torch.long)] = True
            self._stop_ids[stop] = mask.to(self.device)
        return self._stop_ids[stop]

    def _check_sequences(
        self, seqs: Sequence[Sequence[int]], what: str, *, allow_empty: bool
    ) -> list[tuple[int, ...]]:
        out = []
        for i, seq in enumerate(seqs):
            try:
                ids = tuple(map(operator.index, seq))
            except TypeError:
                raise ValueError(f"{what} {i} holds something other than integer token ids") from None
            if not ids:
                if not allow_empty:
                    raise ValueError(f"{what} {i} is empty")
            elif min(ids) < 0 or max(ids) >= self.vocab_size:
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                raise ValueError(
                    f"{what} {i} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
            out.append(ids)
        return out

    @staticmethod
    def _per_prefix(value: int | Sequence[int], name: str, count: int) -> list[int]:
        if not isinstance(value, Sequence):
            return [operator.index(value)] * count
        values = [operator.index(v) for v in value]
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} values for {count} prefixes")
        return values

    @staticmethod
    def _check_groups(groups: Sequence[str] | None, count: int) -> list[str | None]:
        if groups is None:
            return [None] * count
        if isinstance(groups, str) or len(groups) != count:
            raise ValueError(f"groups must hold one name per prefix ({count}), got {groups!r}")
        return list(groups)
