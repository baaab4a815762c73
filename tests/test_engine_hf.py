"""HFPolicy: exact batching, seeded sampling, prefix KV reuse, stopping and the ledger, on tiny random-init Llamas."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from treeward.engine import Policy
from treeward.engine._kvstore import KVStore, SeqKV
from treeward.engine._sampling import gumbel_argmax, reference_bits, row_keys, step_keys, uniforms, vocab_keys
from treeward.engine.hf import HFPolicy, ModelLoadError, _attention_mask

TEXTS = [
    "Q: Ann has 54 cards. Ann gets three times as many. How many cards does Ann have?\nStep 1: 54*3=162\nAnswer: 162",
    "Q: Bob has 17 apples. Bob loses 5. Then Bob gets 25 more. How many apples does Bob have?\n"
    "Step 1: 17-5=12\nStep 2: 12+25=37\nAnswer: 37",
    "Q: Cy has 8 coins. Cy gets twice as many. Then Cy loses 3.\nStep 1: 8*2=16\nStep 2: 16-3=13\nAnswer: 13",
]
TOL = 1e-4


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads that
    spin-wait on each other make every forward ~100x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits split, every byte in the alphabet) with <pad>=0, <bos>=1, <eos>=2; 320 ids."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def _llama(vocab: int, *, hidden: int, inter: int, layers: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """hidden 64, 2 layers, 4 heads of 16: KV is 2 layers x (K, V) x 4 x 16 x 4 bytes = 1024 bytes per token."""
    return _llama(len(tok), hidden=64, inter=128, layers=2, tie=False)


@pytest.fixture(scope="module")
def shipped(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The shipped policy's config: vocab 320, hidden 192, intermediate 512, 4 layers, 4 heads, tied embeddings."""
    return _llama(320, hidden=192, inter=512, layers=4, tie=True)


def _biased(model: LlamaForCausalLM, bias: dict[int, float]) -> LlamaForCausalLM:
    """A copy whose LM head adds ``bias`` to some logits (random-init logits are all near 0)."""
    out = copy.deepcopy(model)
    head = torch.nn.Linear(out.lm_head.in_features, out.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(out.lm_head.weight)
        head.bias.zero_()
        for token, b in bias.items():
            head.bias[token] = b
    out.lm_head = head
    return out


def _prompts(policy: HFPolicy) -> list[list[int]]:
    """Three prompts of different lengths (BOS first)."""
    return [
        policy.encode_prompt(TEXTS[0][:30]),
        policy.encode_prompt(TEXTS[1][:75]),
        policy.encode_prompt(TEXTS[2][:12]),
    ]


def _close(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOL for x, y in zip(a, b, strict=True))


# -- the contract -----------------------------------------------------------------------------------------------------


def test_is_a_policy_and_tokenizes(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    policy = HFPolicy(tiny, tok)
    assert isinstance(policy, Policy)
    ids = policy.encode("Step 1: 54*3=162\n")
    assert policy.encode_prompt("Step 1: 54*3=162\n") == [tok.bos_token_id, *ids]
    assert policy.decode([tok.bos_token_id, *ids, tok.eos_token_id]) == "Step 1: 54*3=162\n"
    assert policy.eos_token_id == 2


def test_import_engine_does_not_import_torch() -> None:
    code = (
        "import sys, treeward.engine; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cached_and_uncached_give_same_tokens_and_logprobs(
    shipped: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    cached, plain = HFPolicy(shipped, tok), HFPolicy(shipped, tok, prefix_cache=False)
    prompts = _prompts(cached)
    kwargs = {"n": 3, "max_new_tokens": [6, 4, 5], "seeds": [11, 12, 13], "stop": None}
    first = cached.expand(prompts, **kwargs)
    again = plain.expand(prompts, **kwargs)
    # A second step from every continuation: the cached policy now serves each child's prefix from its store.
    children = [[*p, *c.token_ids] for p, conts in zip(prompts, first, strict=True) for c in conts]
    second = cached.expand(children, n=2, max_new_tokens=5, seeds=7, stop=None)
    second_plain = plain.expand(children, n=2, max_new_tokens=5, seeds=7, stop=None)
    for a_rows, b_rows in [*zip(first, again, strict=True), *zip(second, second_plain, strict=True)]:
        for a, b in zip(a_rows, b_rows, strict=True):
            assert a.token_ids == b.token_ids
            assert _close(a.logprobs, b.logprobs)
    assert cached.ledger.total.reused > 0 and plain.ledger.total.reused == 0
    total = cached.ledger.total
    assert total.computed + total.reused == plain.ledger.total.computed


def test_batched_with_uneven_cached_parts_equals_alone(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    policy = HFPolicy(tiny, tok)
    p1, p2, _ = _prompts(policy)
    p3 = policy.encode(TEXTS[2][:12])  # no BOS: shares no tokens with p1 or p2
    (c1,), (c2,) = policy.expand([p1, p2], max_new_tokens=4, temperature=0, stop=None)
    # The store now holds p1 + c1[:-1] (len(p1) + 3 tokens) and p2 + c2[:-1]. The batch below mixes:
    #   child1 = p1 + c1 + extra: cached len(p1) + 3, suffix 1 + len(extra)  (c1's last token, then extra)
    #   child2 = p2 + c2:         cached len(p2) + 3, suffix 1
    #   p3:                       nothing cached,     suffix len(p3)
    # so the prefill batch has pasts and suffixes of three different lengths, padded in the middle.
    extra = policy.encode(" 7+1")
    child1 = [*p1, *c1.token_ids, *extra]
    child2 = [*p2, *c2.token_ids]
    prefixes = [child1, child2, p3]
    prefill = (1 + len(extra)) + 1 + len(p3)
    policy.ledger.reset()
    batched = policy.expand(prefixes, n=2, max_new_tokens=5, seeds=[3, 4, 5], stop=None)
    # decode: 6 rows x 4 fed-back tokens = 24
    assert policy.ledger.total.computed == prefill + 24
    assert policy.ledger.total.reused == 2 * sum(map(len, prefixes)) - prefill
    for prefix, seed, rows in zip(prefixes, [3, 4, 5], batched, strict=True):
        alone = HFPolicy(tiny, tok, prefix_cache=False).expand(
            [prefix], n=2, max_new_tokens=5, seeds=seed, stop=None
        )
        for a, b in zip(rows, alone[0], strict=True):
            assert a.token_ids == b.token_ids
            assert _close(a.logprobs, b.logprobs)


def test_chunking_changes_nothing(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    kwargs = {"n": 3, "max_new_tokens": [4, 6, 5], "seeds": [1, 2, 3], "stop": None}
    for prefix_cache in (True, False):
        wide = HFPolicy(tiny, tok, prefix_cache=prefix_cache)
        narrow = HFPolicy(tiny, tok, prefix_cache=prefix_cache, max_batch_rows=2)  # 9 rows -> 5 chunks
        a, b = wide.expand(_prompts(wide), **kwargs), narrow.expand(_prompts(narrow), **kwargs)
        for row_a, row_b in zip(a, b, strict=True):
            for x, y in zip(row_a, row_b, strict=True):
                assert x.token_ids == y.token_ids and _close(x.logprobs, y.logprobs)
        assert wide.ledger.total.computed == narrow.ledger.total.computed


def test_expand_logprobs_equal_score(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    newline = tok.encode("\n")[0]
    model = _biased(tiny, {newline: 4.0})  # rows stop at different lengths
    for prefix_cache in (True, False):
        policy = HFPolicy(model, tok, prefix_cache=prefix_cache)
        prompts = _prompts(policy)
        out = policy.expand(prompts, n=3, max_new_tokens=8, seeds=1)
        flat = [(p, c) for p, conts in zip(prompts, out, strict=True) for c in conts]
        assert len({len(c.token_ids) for _, c in flat}) > 1
        policy.ledger.reset()
        scored = policy.score([p for p, _ in flat], [c.token_ids for _, c in flat])
        for (_, c), lp in zip(flat, scored, strict=True):
            assert _close(c.logprobs, lp)
        # Needed per pair: prefix + continuation[:-1]. With the cache, expand stored every prefix, so each pair
        # runs only [prefix[-1]] + continuation[:-1] and reuses prefix[:-1].
        generated = sum(len(c.token_ids) for _, c in flat)
        if prefix_cache:
            expected = {"computed": generated, "reused": sum(len(p) - 1 for p, _ in flat)}
        else:
            expected = {"computed": sum(len(p) - 1 for p, _ in flat) + generated, "reused": 0}
        assert {k: policy.ledger.total.to_dict()[k] for k in expected} == expected


def test_greedy_is_argmax_of_a_plain_forward(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    policy = HFPolicy(tiny, tok)
    prompt = _prompts(policy)[0]
    (greedy,) = policy.expand([prompt], max_new_tokens=6, temperature=0, stop=None)[0]
    with torch.no_grad():
        logits = tiny(torch.tensor([[*prompt, *greedy.token_ids]])).logits[0]
    steps = logits[len(prompt) - 1 : -1]  # logits that chose each generated token
    assert greedy.token_ids == tuple(steps.argmax(-1).tolist())
    assert _close(greedy.logprobs, torch.log_softmax(steps, -1).max(-1).values.tolist())
    # A tiny temperature sharpens the Gumbel draw into the argmax.
    (cold,) = policy.expand([prompt], max_new_tokens=6, temperature=1e-4, stop=None, seeds=5)[0]
    assert cold.token_ids == greedy.token_ids


def test_seeds_and_sample_index_decide_the_draw(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    policy = HFPolicy(tiny, tok)
    prompt = _prompts(policy)[2]
    a = policy.expand([prompt], n=3, max_new_tokens=8, seeds=0, stop=None)[0]
    # The second time the prefix comes from the store: same tokens, logprobs within rounding.
    b = policy.expand([prompt], n=3, max_new_tokens=8, seeds=0, stop=None)[0]
    c = policy.expand([prompt], n=3, max_new_tokens=8, seeds=1, stop=None)[0]
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert all(_close(x.logprobs, y.logprobs) for x, y in zip(a, b, strict=True))
    assert len({x.token_ids for x in a}) == 3  # j = 0, 1, 2 differ
    assert all(x.token_ids != y.token_ids for x, y in zip(a, c, strict=True))
    # The same prefix twice in one call, with the same seed: the same draws (a function of prefix, seed and j).
    twice = policy.expand([prompt, prompt], n=3, max_new_tokens=8, seeds=0, stop=None)
    assert twice[0] == twice[1]
    assert [x.token_ids for x in twice[0]] == [x.token_ids for x in a]


# -- stopping ---------------------------------------------------------------------------------------------------------


def test_rows_stop_at_their_own_stop_token_or_limit(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    newline = tok.encode("\n")[0]
    policy = HFPolicy(_biased(tiny, {newline: 4.0}), tok)  # p(newline) ~ e^4 / (e^4 + 319) ~ 0.15 per token
    prompts = _prompts(policy)
    limits = [1, 12, 0]
    out = policy.expand(prompts, n=6, max_new_tokens=limits, seeds=2)
    assert out[2] == [out[2][0]] * 6 and out[2][0].token_ids == () and out[2][0].finish_reason == "length"
    reasons = set()
    for limit, conts in zip(limits[:2], out[:2], strict=True):
        for c in conts:
            has_stop = ["\n" in tok.decode([t]) for t in c.token_ids]
            reasons.add(c.finish_reason)
            assert not any(has_stop[:-1])  # nothing before the last token contains the stop string
            if c.finish_reason == "stop":
                assert has_stop[-1] and c.text.endswith("\n")
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == limit and not has_stop[-1]
            assert 1 <= len(c.token_ids) <= limit
    assert reasons == {"stop", "length"}
    assert len({len(c.token_ids) for c in out[1]}) > 1  # rows of one prefix stopped at different lengths


def test_eos_ends_a_row_and_is_left_out_of_the_text(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    eos = tok.eos_token_id
    policy = HFPolicy(_biased(tiny, {eos: 3.5}), tok)  # p(eos) ~ e^3.5 / (e^3.5 + 319) ~ 0.1 per token
    out = policy.expand(_prompts(policy), n=4, max_new_tokens=10, seeds=0, stop=None)
    conts = [c for row in out for c in row]
    assert {c.finish_reason for c in conts} == {"eos", "length"}
    for c in conts:
        assert eos not in c.token_ids[:-1]
        if c.finish_reason == "eos":
            assert c.token_ids[-1] == eos and c.text == tok.decode(c.token_ids[:-1])
        else:
            assert len(c.token_ids) == 10


def test_finished_rows_leave_the_batch(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    batch_sizes: list[int] = []

    def record(_module: torch.nn.Module, _args: tuple[object, ...], kwargs: dict[str, torch.Tensor]) -> None:
        batch_sizes.append(kwargs["input_ids"].shape[0])

    model = copy.deepcopy(tiny)
    model.register_forward_pre_hook(record, with_kwargs=True)
    a, b = _prompts(HFPolicy(model, tok))[:2]
    # 8 rows: a's 4 finish after 1 token (half the batch >= a quarter), so b's 4 rows decode alone.
    # Cached: prefill of the 2 distinct prefixes, then b's rows feed 5 tokens each (6 generated).
    HFPolicy(model, tok).expand([a, b], n=4, max_new_tokens=[1, 6], stop=None)
    assert batch_sizes == [2, 4, 4, 4, 4, 4]
    batch_sizes.clear()
    # Uncached: one prefill row per sample, then the same decode.
    HFPolicy(model, tok, prefix_cache=False).expand([a, b], n=4, max_new_tokens=[1, 6], stop=None)
    assert batch_sizes == [8, 4, 4, 4, 4, 4]


# -- the ledger -------------------------------------------------------------------------------------------------------


def test_ledger_hand_computed_case(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    eos = tok.eos_token_id
    model = _biased(tiny, {eos: 4.0})  # p(eos) ~ 0.15 per token
    prefix = [1, 40, 41, 42, 43]  # 5 tokens
    # Find a seed whose two samples have 3 and 4 tokens (EOS at 3, then EOS or the limit at 4).
    probe = HFPolicy(model, tok, prefix_cache=False)

    def lengths(seed: int) -> list[int]:
        return [
            len(c.token_ids) for c in probe.expand([prefix], n=2, max_new_tokens=4, seeds=seed, stop=None)[0]
        ]

    seed = next(s for s in range(500) if lengths(s) == [3, 4])
    plain, cached = HFPolicy(model, tok, prefix_cache=False), HFPolicy(model, tok)
    plain.expand([prefix], n=2, max_new_tokens=4, seeds=seed, stop=None, groups=["p"])
    cached.expand([prefix], n=2, max_new_tokens=4, seeds=seed, stop=None, groups=["p"])
    # No cache: each row prefills 5 positions, then feeds back all but its last token: 2*5 + (2 + 3) = 15.
    assert plain.ledger.group("p").to_dict() == {
        "generated": 7,
        "computed": 15,
        "reused": 0,
        "calls": 1,
        "scored": 0,
    }
    # Cache from an empty store: the prefix once (5) + the same decode (5) = 10; the second row reuses 5.
    assert cached.ledger.group("p").to_dict() == {
        "generated": 7,
        "computed": 10,
        "reused": 5,
        "calls": 1,
        "scored": 0,
    }
    assert plain.ledger.wall["generate"] > 0


def test_cross_call_reuse_computes_only_the_new_step(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    policy = HFPolicy(tiny, tok)
    prompt = _prompts(policy)[1]
    (step1,) = policy.expand([prompt], max_new_tokens=5, seeds=1, stop=None, groups=["g"])[0]
    # First call, empty store: prefill len(prompt), decode 4.
    assert policy.ledger.group("g").computed == len(prompt) + 4
    child = [*prompt, *step1.token_ids]
    policy.expand([child], n=2, max_new_tokens=3, seeds=1, stop=None, groups=["h"])
    # The store holds prompt + step1[:-1]; only step1's last token is new: prefill 1, decode 2 x 2.
    assert policy.ledger.group("h").to_dict() == {
        "generated": 6,
        "computed": 1 + 4,
        "reused": 2 * len(child) - 1,
        "calls": 1,
        "scored": 0,
    }


@settings(max_examples=12, deadline=None)
@given(
    picks=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    n=st.integers(1, 3),
    max_new=st.integers(0, 4),
    seed=st.integers(0, 2**40),
)
def test_computed_plus_reused_does_not_depend_on_the_cache(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast, picks: list[int], n: int, max_new: int, seed: int
) -> None:
    pool = [[1, 5, 6], [1, 5, 6, 7, 8], [1, 9], [1, 5, 6]]  # duplicates and shared prefixes on purpose
    prefixes = [pool[k] for k in picks]
    groups = [f"g{k}" for k in picks]
    counts = []
    for prefix_cache in (True, False):
        policy = HFPolicy(tiny, tok, prefix_cache=prefix_cache)
        policy.expand(prefixes[:1], n=1, max_new_tokens=2, seeds=seed, stop=None)  # something in the store
        policy.ledger.reset()
        out = policy.expand(prefixes, n=n, max_new_tokens=max_new, seeds=seed, stop=None, groups=groups)
        generated = sum(len(c.token_ids) for row in out for c in row)
        assert policy.ledger.total.generated == generated
        counts.append({g: (c.generated, c.computed + c.reused) for g, c in policy.ledger.groups.items()})
    assert counts[0] == counts[1]


# -- the store --------------------------------------------------------------------------------------------------------


def _kv(length: int) -> SeqKV:
    return SeqKV(((torch.zeros(1, length, 1), torch.zeros(1, length, 1)),))


def test_store_longest_prefix_subsumption_and_lru() -> None:
    store = KVStore(capacity_bytes=10**6)
    store.insert((1, 2, 3), _kv(3))
    store.insert((1, 2, 3, 4, 5), _kv(5))  # (1, 2, 3) is a prefix: dropped, the new entry serves it
    store.insert((1, 2), _kv(2))  # covered: nothing new stored
    assert len(store) == 1 and store.nbytes == 2 * 5 * 4
    assert store.lookup((1, 2, 3, 9), max_length=4)[0] == 3
    assert store.lookup((1, 2, 3, 4, 5, 6), max_length=4)[0] == 4
    assert store.lookup((7,), max_length=1) == (0, None)
    # (1, 2, 9) splits the edge 1-2-3-4-5 after 2; evicting it must keep the split node, which (1, 2, 3, 4, 5)
    # still runs through. Room for 8 positions (64 bytes).
    split = KVStore(capacity_bytes=64)
    split.insert((1, 2, 3, 4, 5), _kv(5))
    split.insert((1, 2, 9), _kv(3))
    split.lookup((1, 2, 3, 4, 5), max_length=5)  # (1, 2, 9) is now the least recently used
    split.insert((7,), _kv(1))  # 72 bytes: evicts (1, 2, 9)
    assert len(split) == 2 and split.lookup((1, 2, 3, 4, 5), max_length=5)[0] == 5
    # LRU by bytes: entries of 80 bytes each (10 positions x K and V x 4 bytes); room for two.
    lru = KVStore(capacity_bytes=2 * 80)
    for first in (10, 20, 30):
        lru.insert(tuple(range(first, first + 10)), _kv(10))
    assert len(lru) == 2 and lru.nbytes == 160 and lru.lookup(tuple(range(10, 20)), max_length=10)[0] == 0
    lru.lookup(tuple(range(20, 30)), max_length=10)  # touch 20..29: 30..39 is now the oldest
    lru.insert(tuple(range(40, 50)), _kv(10))
    assert lru.lookup(tuple(range(20, 30)), max_length=10)[0] == 10
    assert lru.lookup(tuple(range(30, 40)), max_length=10)[0] == 0


def _kv_of(tokens: list[int] | tuple[int, ...]) -> SeqKV:
    """KV whose values are the tokens themselves, so a lookup's answer can be checked."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, :, None]
    return SeqKV(((t, t.clone()),))


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 3), min_size=1, max_size=7)), max_size=40),
    capacity=st.integers(0, 600),
)
def test_store_agrees_with_brute_force(ops: list[tuple[bool, list[int]]], capacity: int) -> None:
    store = KVStore(capacity_bytes=capacity)
    for is_insert, seq in ops:
        if is_insert:
            store.insert(seq, _kv_of(seq))
        else:
            stored = [e.tokens for e in store._entries.values()]
            common = max((_common_prefix(seq, s) for s in stored), default=0)
            depth, kv = store.lookup(seq, max_length=len(seq))
            assert depth == common
            assert (
                (kv is None)
                if depth == 0
                else kv is not None and kv.layers[0][0][0, :, 0].tolist() == seq[:depth]
            )
        entries = [e.tokens for e in store._entries.values()]
        assert not any(
            a != b and b[: len(a)] == a for a in entries for b in entries
        )  # no entry prefixes another
        assert store.nbytes == sum(8 * len(e) for e in entries) <= capacity


def test_store_lookup_is_fast() -> None:
    gen = torch.Generator().manual_seed(0)
    seqs = [tuple(torch.randint(0, 320, (150,), generator=gen).tolist()) for _ in range(256)]
    store = KVStore(capacity_bytes=10**9)
    for s in seqs:
        store.insert(s, _kv(150))
    t0 = time.perf_counter()
    hits = [store.lookup(s, max_length=149)[0] for s in seqs]
    assert time.perf_counter() - t0 < 0.1  # ~5 ms: one dict step per token
    assert hits == [149] * 256


def test_policy_store_respects_cache_bytes(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    # 1024 bytes per token (see `tiny`); three 15-token prefixes are 45 KiB, the store holds 40 KiB.
    policy = HFPolicy(tiny, tok, cache_bytes=40 * 1024)
    # No shared tokens: a lookup refreshes the entry it hits, even for one token.
    prefixes = [list(range(k, k + 15)) for k in (10, 30, 50)]
    for p in prefixes:  # max_new_tokens=1 stores prefix + continuation[:-1] = the prefix
        policy.expand([p], max_new_tokens=1, stop=None)
    assert policy.cache_nbytes == 30 * 1024 <= 40 * 1024
    policy.ledger.reset()
    policy.expand([prefixes[2]], max_new_tokens=1, stop=None, groups=["kept"])
    policy.expand([prefixes[0]], max_new_tokens=1, stop=None, groups=["evicted"])
    assert policy.ledger.group("kept").computed == 1  # only the last prefix token: its logits are not stored
    assert policy.ledger.group("evicted").computed == 15


def test_weight_update_clears_the_store(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    model = copy.deepcopy(tiny)
    policy = HFPolicy(model, tok)
    prompt = _prompts(policy)[0]
    policy.expand([prompt], max_new_tokens=2, stop=None)
    assert policy.cache_nbytes > 0
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # any in-place write, as an optimizer step does
    policy.ledger.reset()
    policy.expand([prompt], max_new_tokens=2, stop=None)
    assert policy.ledger.total.computed == len(prompt) + 1 and policy.ledger.total.reused == 0


# -- padding and NaN --------------------------------------------------------------------------------------------------


def test_padding_never_produces_nan(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    valid = torch.tensor([[False, False, True, False, False, True], [True, True, True, True, True, True]])
    mask = _attention_mask(valid, 3, torch.float32)
    assert mask.shape == (2, 1, 3, 6)
    assert ((mask == 0).sum(-1) >= 1).all()  # every query, padding included, sees at least itself
    # Row 0 of a batch: 1 past token then a 1-token suffix, padded on both sides (slots 0-1 and 3-4).
    policy = HFPolicy(tiny, tok)
    past = policy._forward([None], [[1, 40]], all_logits=False)[0].kv(0).prefix(1)
    batch, logits = policy._forward([past, None], [[40], [1, 5, 6, 7]], all_logits=True)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(layer.keys).all() for layer in batch.cache.layers)
    alone = policy._forward([None], [[1, 40]], all_logits=True)[1]
    assert torch.allclose(logits[0, -1], alone[0, -1], atol=TOL)


# -- sampling ---------------------------------------------------------------------------------------------------------


def test_hash_matches_the_python_reference() -> None:
    seeds, samples = torch.tensor([0, -5, 2**63 - 1]), torch.tensor([0, 1, 7])
    u = uniforms(step_keys(row_keys(seeds, samples), 3), vocab_keys(4))
    expected = [
        [((reference_bits(s, j, 3, v) >> 8) + 0.5) / 2**24 for v in range(4)]
        for s, j in zip(seeds.tolist(), samples.tolist(), strict=True)
    ]
    assert torch.allclose(u, torch.tensor(expected), atol=1e-7)


def test_gumbel_draws_follow_the_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    draws = 20000
    keys = step_keys(row_keys(torch.full((draws,), 123), torch.arange(draws)), 0)
    tokens = gumbel_argmax(logits.expand(draws, 5), 1.0, keys, vocab_keys(5))
    freq = torch.bincount(tokens, minlength=5) / draws
    # softmax = [0.076, 0.207, 0.563, 0.028, 0.126]; binomial sd <= 0.0035, so 0.015 is > 4 sd.
    assert torch.allclose(freq, torch.softmax(logits, -1), atol=0.015)
    assert gumbel_argmax(logits[None], 0.0, keys[:1], vocab_keys(5)).item() == 2


# -- loading and validation -------------------------------------------------------------------------------------------


def test_from_pretrained_round_trip(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tiny.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    loaded = HFPolicy.from_pretrained(tmp_path / "policy", prefix_cache=False)
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    original = HFPolicy(tiny, tok, prefix_cache=False)
    prompt = _prompts(original)[0]
    kwargs = {"n": 2, "max_new_tokens": 6, "seeds": 3, "stop": None}
    assert loaded.expand([prompt], **kwargs) == original.expand([prompt], **kwargs)


def test_model_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model folder at .*missing"):
        HFPolicy.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty has no config\.json"):
        HFPolicy.from_pretrained(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(
        ModelLoadError, match=re.escape(f"cannot load a causal LM and tokenizer from {broken}")
    ):
        HFPolicy.from_pretrained(broken)
    assert issubclass(ModelLoadError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ({"max_new_tokens": [3]}, "max_new_tokens has 1 values for 2 prefixes"),
        ({"seeds": [1, 2, 3]}, "seeds has 3 values for 2 prefixes"),
        ({"groups": ["a"]}, "groups must hold one name per prefix"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"stop": ""}, "stop must be a non-empty string"),
        ({"prefixes": [[1, 2], []]}, "prefix 1 is empty"),
        (
            {"prefixes": [[1, 2], [1, 320]]},
            r"prefix 1 has token ids outside the vocabulary \[0, 320\): \[320\]",
        ),
        ({"prefixes": [[1, -1]]}, "prefix 0 has token ids outside"),
    ],
)
def test_bad_arguments(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast, kwargs: dict, message: str
) -> None:
    policy = HFPolicy(tiny, tok)
    prefixes = kwargs.pop("prefixes", [[1, 2], [1, 3]])
    with pytest.raises(ValueError, match=message):
        policy.expand(prefixes, **kwargs)


def test_score_validation_and_empty_continuations(
    tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    policy = HFPolicy(tiny, tok)
    with pytest.raises(ValueError, match="2 prefixes but 1 continuations"):
        policy.score([[1, 2], [1, 3]], [[4]])
    with pytest.raises(ValueError, match="continuation 0 has token ids outside"):
        policy.score([[1, 2]], [[999]])
    assert policy.score([[1, 2], [1, 3]], [[], [4, 5]])[0] == []
    # Only the second pair runs: [1, 3, 4] (prefix[:-1] = [1], then [3, 4]).
    assert policy.ledger.total.computed == 2 + 1


def test_expand_restores_training_mode(tiny: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    model = copy.deepcopy(tiny).train()
    HFPolicy(model, tok).expand([[1, 2]], max_new_tokens=1)
    assert model.training
