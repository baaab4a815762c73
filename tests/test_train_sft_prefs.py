"""SFT, DPO and TPO: hand-checked losses, and one real optimisation step of each loop on the shipped tiny policy."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treeward._paths import SHIPPED_POLICY
from treeward.credit.records import PreferenceList, PreferencePair, SFTExample
from treeward.engine.hf import HFPolicy
from treeward.tasks.arithmetic import generate_problems, solution_text
from treeward.train._batch import completion_logprobs
from treeward.train.prefs import dpo_loss, tpo_loss, tpo_loss_reference, train_dpo, train_tpo
from treeward.train.sft import TrainingDataError, sft_loss, train_sft

LOG2 = math.log(2.0)
INV_LOG2_3 = 1.0 / math.log2(3.0)  # 0.630930: 1/D(τ=2)

# -- fixtures: the real shipped policy and data built from arithmetic problems -------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy() -> HFPolicy:
    return HFPolicy.from_pretrained(SHIPPED_POLICY, prefix_cache=False)


@pytest.fixture
def model(policy: HFPolicy) -> torch.nn.Module:
    """A fresh trainable copy of the shipped weights for each test."""
    return copy.deepcopy(policy.model)


def _sft_examples(policy: HFPolicy, n: int = 6) -> list[SFTExample]:
    eos = policy.tokenizer.eos_token_id
    out = []
    for i, p in enumerate(generate_problems(n, [1, 2, 3], seed=7)):
        sol = solution_text(p)
        out.append(
            SFTExample(
                p.id, p.prompt, tuple(policy.encode_prompt(p.prompt)), sol, (*policy.encode(sol), eos), i
            )
        )
    return out


def _steps(policy: HFPolicy, n: int) -> list[tuple[str, str, list[str]]]:
    """(problem id, prompt, [correct step 2, step 2 with a wrong result, step 2 with the wrong first operand]) for
    two-step problems; the prompt already holds the (correct) first step, the shared prefix of the candidates."""
    rows = []
    for p in generate_problems(n, 2, seed=11):
        step1, step2, _ = solution_text(p).split("\n")
        lhs, result = step2.split("=")
        a, op_b = lhs.removeprefix("Step 2: "), ""
        for op in "+-*":
            if op in a:
                a, op_b = a.split(op)[0], op + a.split(op)[1]
        wrong_result = f"{lhs}={int(result) + 1}"
        wrong_operand = f"Step 2: {int(a) + 3}{op_b}={result}"
        rows.append(
            (p.id, p.prompt + step1 + "\n", [step2 + "\n", wrong_result + "\n", wrong_operand + "\n"])
        )
    return rows


def _pairs(policy: HFPolicy, n: int = 6) -> list[PreferencePair]:
    out = []
    for pid, prompt, (good, bad, _) in _steps(policy, n):
        out.append(
            PreferencePair(
                pid,
                prompt,
                tuple(policy.encode_prompt(prompt)),
                good,
                tuple(policy.encode(good)),
                bad,
                tuple(policy.encode(bad)),
                margin=1.0,
                chosen_node=1,
                rejected_node=2,
            )
        )
    return out


def _lists(policy: HFPolicy, n: int = 6) -> list[PreferenceList]:
    out = []
    for pid, prompt, cands in _steps(policy, n):
        out.append(
            PreferenceList(
                pid,
                prompt,
                tuple(policy.encode_prompt(prompt)),
                tuple(cands),
                tuple(tuple(policy.encode(c)) for c in cands),
                scores=(1.0, 0.5, 0.0),
                node_ids=(1, 2, 3),
            )
        )
    return out


def _seq_lp(model: torch.nn.Module, prompts: list, completions: list, pad: int) -> torch.Tensor:
    with torch.no_grad():
        lp, cmask = completion_logprobs(model, prompts, completions, pad)
    return (lp * cmask).sum(-1)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- SFT ------------------------------------------------------------------------------------------------------------


def test_sft_loss_hand_numbers() -> None:
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    cmask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    # completion tokens: -2, -3 (row 0) and -4 (row 1); token-level mean NLL = (2 + 3 + 4) / 3 = 3.0
    assert sft_loss(lp, cmask).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no completion tokens"):
        sft_loss(lp, torch.zeros_like(cmask))


def test_sft_loss_equals_hf_loss_with_prompt_labels_masked(policy: HFPolicy) -> None:
    examples = _sft_examples(policy, 4)
    pad = policy.tokenizer.pad_token_id
    lp, cmask = completion_logprobs(
        policy.model, [e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad
    )
    ours = sft_loss(lp, cmask).item()
    # Independent reference: HF's own causal-LM loss, labels -100 on prompt and padding, mean over labelled tokens.
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        row = [*e.prompt_ids, *e.completion_ids]
        fill = width - len(row)
        ids.append(row + [pad] * fill)
        labels.append([-100] * len(e.prompt_ids) + list(e.completion_ids) + [-100] * fill)
        mask.append([1] * len(row) + [0] * fill)
    with torch.no_grad():
        hf = policy.model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
        ).loss.item()
    assert ours == pytest.approx(hf, abs=1e-5)


def test_sft_puts_no_loss_on_prompt_tokens(policy: HFPolicy, model: torch.nn.Module) -> None:
    examples = _sft_examples(policy, 3)
    captured: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        captured.append(out)

    handle = model.lm_head.register_forward_hook(keep)
    try:
        lp, cmask = completion_logprobs(
            model, [e.prompt_ids for e in examples], [e.completion_ids for e in examples], 0
        )
        sft_loss(lp, cmask).backward()
    finally:
        handle.remove()
    grad = captured[0].grad.abs().sum(-1)  # [B, T]: gradient reaching the logits at each position
    for b, e in enumerate(examples):
        p, c = len(e.prompt_ids), len(e.completion_ids)
        # logits at position t predict token t+1: positions p-1 .. p+c-2 predict the completion, the rest must be 0
        assert torch.all(grad[b, : p - 1] == 0), "a logit predicting a prompt token got gradient"
        assert torch.all(grad[b, p + c - 1 :] == 0), (
            "a logit at the last token or in the padding got gradient"
        )
        assert torch.all(grad[b, p - 1 : p + c - 1] > 0)


def test_train_sft_one_step_lowers_loss_on_its_batch(policy: HFPolicy, model: torch.nn.Module) -> None:
    examples = _sft_examples(policy)
    pad = policy.tokenizer.pad_token_id
    hist = train_sft(model, policy.tokenizer, examples, lr=1e-4, epochs=1, batch_size=len(examples))
    assert (hist.name, hist.steps, hist.epochs, hist.examples) == ("sft", 1, 1, len(examples))
    assert hist.tokens == sum(len(e.completion_ids) for e in examples)
    with torch.no_grad():
        lp, cmask = completion_logprobs(
            model, [e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad
        )
        after = sft_loss(lp, cmask).item()
    assert after < hist.losses[0]
    assert not model.training  # came in eval mode (from_pretrained), left in eval mode


def test_train_sft_is_seeded_and_reads_ids_not_text(policy: HFPolicy) -> None:
    examples = _sft_examples(policy)
    garbled = [
        SFTExample(e.problem_id, "?", e.prompt_ids, "nonsense", e.completion_ids, e.node_id) for e in examples
    ]
    m1, m2 = copy.deepcopy(policy.model), copy.deepcopy(policy.model)
    rng_state = torch.get_rng_state()
    h1 = train_sft(m1, policy.tokenizer, examples, lr=1e-4, epochs=2, batch_size=4, seed=5)
    h2 = train_sft(m2, policy.tokenizer, garbled, lr=1e-4, epochs=2, batch_size=4, seed=5)
    # 6 examples in batches of 4 -> 2 steps per epoch, 4 in all; same seed and same ids -> the same run exactly
    assert h1.steps == 4 and h1.losses == h2.losses
    assert _same(_params(m1), _params(m2))
    # seeding happened inside a forked RNG: the caller's global RNG state is exactly as it was
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_train_sft_logs_one_line_per_step(
    policy: HFPolicy, model: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="treeward.train"):
        hist = train_sft(model, policy.tokenizer, _sft_examples(policy), lr=1e-5, batch_size=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "treeward.train"]
    assert len(lines) == hist.steps == 2
    assert all("sft" in line and "loss" in line for line in lines)
    assert f"{hist.losses[1]:.4f}" in lines[1]


# -- DPO ------------------------------------------------------------------------------------------------------------


def test_dpo_loss_hand_numbers() -> None:
    t = torch.tensor
    # policy - ref on chosen: -10 - (-11) = 1; on rejected: -12 - (-11) = -1; logits = 1 - (-1) = 2; β·2 = 0.2
    # loss = -log σ(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139
    assert dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=0.1).item() == pytest.approx(
        0.598139, abs=1e-6
    )
    # swapped roles: -log σ(-0.2) = log(1 + e^0.2) = 0.798139; the batch mean of both = 0.698139
    both = dpo_loss(t([-10.0, -12.0]), t([-12.0, -10.0]), t([-11.0, -11.0]), t([-11.0, -11.0]), beta=0.1)
    assert both.item() == pytest.approx((0.598139 + 0.798139) / 2, abs=1e-6)
    # policy == reference: every logit is 0, loss = -log σ(0) = log 2
    x = torch.randn(5)
    y = torch.randn(5)
    assert dpo_loss(x, y, x, y).item() == pytest.approx(LOG2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, y, x, y, beta=0.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_loss(x, y[:3], x, y)


def test_train_dpo_starts_at_log2_and_one_step_lowers_loss(policy: HFPolicy, model: torch.nn.Module) -> None:
    pairs = _pairs(policy)
    ref = copy.deepcopy(model)
    ref_before = _params(ref)
    hist = train_dpo(model, ref, policy.tokenizer, pairs, lr=1e-4, batch_size=len(pairs))
    # policy == reference before the first update: the loss is log 2 (up to float rounding across batch shapes)
    assert hist.name == "dpo" and hist.steps == 1
    assert hist.losses[0] == pytest.approx(LOG2, abs=1e-5)
    pad = policy.tokenizer.pad_token_id
    prompts = [p.prompt_ids for p in pairs]
    pc, pr = (
        _seq_lp(model, prompts, [p.chosen_ids for p in pairs], pad),
        _seq_lp(model, prompts, [p.rejected_ids for p in pairs], pad),
    )
    rc, rr = (
        _seq_lp(ref, prompts, [p.chosen_ids for p in pairs], pad),
        _seq_lp(ref, prompts, [p.rejected_ids for p in pairs], pad),
    )
    assert dpo_loss(pc, pr, rc, rr).item() < hist.losses[0]
    # the reference is frozen: untouched, no gradients
    assert _same(_params(ref), ref_before)
    assert all(p.grad is None for p in ref.parameters())


def test_train_dpo_default_reference_is_a_frozen_copy(policy: HFPolicy, model: torch.nn.Module) -> None:
    pairs = _pairs(policy, 4)
    h1 = train_dpo(model, None, policy.tokenizer, pairs, lr=1e-4, epochs=2, batch_size=4)
    # step 1 runs with policy == copy: log 2; step 2 with the updated policy against the same frozen copy: lower
    assert h1.losses[0] == pytest.approx(LOG2, abs=1e-5)
    assert h1.losses[1] < h1.losses[0]


# -- TPO ------------------------------------------------------------------------------------------------------------


def test_tpo_loss_hand_numbers() -> None:
    s = torch.tensor([[1.0, 0.5, 0.0]])
    z = torch.zeros(1, 3)
    # G = 2^s - 1 = (1, 0.414214, 0). All r = 0: ties broken by score, so τ = (1, 2, 3) and 1/D(τ) = (1, 0.630930, 0.5).
    # λ01 = 0.585786 * 0.369070 = 0.216198; λ02 = 1 * 0.5 = 0.5; λ12 = 0.414214 * 0.130930 = 0.054233
    # every pair loss is -log σ(0) = log 2, so loss = (0.216198 + 0.5 + 0.054233) * 0.693147 = 0.534021
    assert tpo_loss(z, z, s).item() == pytest.approx(0.534021, abs=1e-5)
    # β = 1, r = policy - ref = (0, 1, 0): τ = (2, 1, 3) (tie between candidates 0 and 2 broken by score),
    # 1/D(τ) = (0.630930, 1, 0.5).
    # pair (0,1): λ = 0.585786 * 0.369070 = 0.216198, -log σ(0 - 1) = 1.313262 -> 0.283923
    # pair (0,2): λ = 1 * 0.130930 = 0.130930,        -log σ(0)     = 0.693147 -> 0.090754
    # pair (1,2): λ = 0.414214 * 0.5 = 0.207107,      -log σ(1)     = 0.313262 -> 0.064879
    # total 0.439556
    policy = torch.tensor([[0.0, 1.0, 0.0]])
    assert tpo_loss(policy, z, s, beta=1.0).item() == pytest.approx(0.439556, abs=1e-5)
    # equal scores: no ordered pair, no loss
    assert tpo_loss(policy, z, torch.full((1, 3), 0.3), beta=1.0).item() == 0.0


@pytest.mark.parametrize(("scores", "lam"), [((1.0, 0.0), 0.369070), ((0.25, 0.75), 0.181799)])
def test_tpo_with_two_candidates_is_dpo_times_lambda(scores: tuple[float, float], lam: float) -> None:
    # K = 2: the only ranks are 1 and 2 whatever the rewards, so λ = |2^s1 - 2^s2| * (1 - 1/log2 3):
    # (1, 0): 1 * 0.369070 = 0.369070;  (0.25, 0.75): (1.681793 - 1.189207) * 0.369070 = 0.181799
    gen = torch.Generator().manual_seed(0)
    p, r = torch.randn(8, 2, generator=gen) * 3, torch.randn(8, 2, generator=gen) * 3
    s = torch.tensor([scores]).repeat(8, 1)
    w, l_ = (0, 1) if scores[0] > scores[1] else (1, 0)
    expected = lam * dpo_loss(p[:, w], p[:, l_], r[:, w], r[:, l_], beta=0.5)
    assert tpo_loss(p, r, s, beta=0.5).item() == pytest.approx(expected.item(), rel=1e-5)


_lists_st = st.lists(
    st.integers(2, 5).flatmap(
        lambda k: st.tuples(
            st.lists(st.floats(-20, 0), min_size=k, max_size=k),
            st.lists(st.floats(-20, 0), min_size=k, max_size=k),
            st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=k, max_size=k),
        )
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(_lists_st, st.sampled_from([0.1, 0.5, 1.0]), st.randoms(use_true_random=False))
def test_tpo_loss_matches_the_loop_reference_and_ignores_candidate_order(lists, beta, rnd) -> None:  # type: ignore[no-untyped-def]
    k = max(len(p) for p, _, _ in lists)

    def table(col: int) -> torch.Tensor:
        return torch.tensor(
            [list(row[col]) + [0.0] * (k - len(row[col])) for row in lists], dtype=torch.float64
        )

    mask = torch.tensor([[j < len(row[0]) for j in range(k)] for row in lists])
    fast = tpo_loss(table(0), table(1), table(2), beta=beta, mask=mask).item()
    slow = tpo_loss_reference([r[0] for r in lists], [r[1] for r in lists], [r[2] for r in lists], beta=beta)
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-12)
    assert fast >= 0.0
    # permuting the candidates inside each list changes nothing (ties are broken by score, not by position)
    shuffled = []
    for p, q, s in lists:
        idx = list(range(len(p)))
        rnd.shuffle(idx)
        shuffled.append(([p[i] for i in idx], [q[i] for i in idx], [s[i] for i in idx]))
    again = tpo_loss_reference(
        [r[0] for r in shuffled], [r[1] for r in shuffled], [r[2] for r in shuffled], beta=beta
    )
    assert again == pytest.approx(slow, rel=1e-9, abs=1e-12)


def test_train_tpo_starts_at_hand_value_and_one_step_lowers_loss(
    policy: HFPolicy, model: torch.nn.Module
) -> None:
    lists = _lists(policy)
    ref = copy.deepcopy(model)
    hist = train_tpo(model, ref, policy.tokenizer, lists, lr=1e-4, batch_size=len(lists))
    # every list has scores (1, 0.5, 0) and starts with policy == reference: 0.534021 each (see the hand numbers)
    assert hist.name == "tpo" and hist.steps == 1
    assert hist.losses[0] == pytest.approx(0.534021, abs=1e-4)
    pad = policy.tokenizer.pad_token_id
    prompts = [pl.prompt_ids for pl in lists for _ in pl.candidate_ids]
    cands = [c for pl in lists for c in pl.candidate_ids]
    p_lp = _seq_lp(model, prompts, cands, pad).view(len(lists), 3)
    r_lp = _seq_lp(ref, prompts, cands, pad).view(len(lists), 3)
    after = tpo_loss(p_lp, r_lp, torch.tensor([pl.scores for pl in lists])).item()
    assert after < hist.losses[0]


def test_train_tpo_handles_lists_of_different_lengths(policy: HFPolicy, model: torch.nn.Module) -> None:
    lists = _lists(policy, 4)
    short = PreferenceList(
        "short",
        lists[0].prompt,
        lists[0].prompt_ids,
        lists[0].candidates[:2],
        lists[0].candidate_ids[:2],
        (1.0, 0.0),
        (1, 2),
    )
    hist = train_tpo(model, None, policy.tokenizer, [*lists, short], lr=1e-4, batch_size=5)
    # 4 lists at 0.534021 and one K=2 list at λ·log 2 = 0.369070 * 0.693147 = 0.255819; mean = 0.478381
    assert hist.losses[0] == pytest.approx((4 * 0.534021 + 0.255819) / 5, abs=1e-4)


# -- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_raises_one_clear_error_and_leaves_the_model_alone(
    policy: HFPolicy, model: torch.nn.Module
) -> None:
    tok = policy.tokenizer
    before = _params(model)
    pair = _pairs(policy, 1)[0]
    plist = _lists(policy, 1)[0]
    ex = _sft_examples(policy, 1)[0]
    cases = [
        (lambda: train_sft(model, tok, [], lr=1e-4), "no examples"),
        (lambda: train_dpo(model, None, tok, [], lr=1e-4), "no pairs"),
        (lambda: train_tpo(model, None, tok, [], lr=1e-4), "no lists"),
        (
            lambda: train_dpo(model, None, tok, [replace(pair, rejected_ids=())], lr=1e-4),
            "rejected|candidate 1.*empty",
        ),
        (
            lambda: train_dpo(model, None, tok, [replace(pair, prompt_ids=())], lr=1e-4),
            "prompt_ids is empty",
        ),
        (
            lambda: train_dpo(model, None, tok, [replace(pair, rejected_ids=pair.chosen_ids)], lr=1e-4),
            "same token ids",
        ),
        (
            lambda: train_dpo(model, None, tok, [replace(pair, chosen_ids=(5, 999))], lr=1e-4),
            "999.*vocabulary of 320",
        ),
        (
            lambda: train_sft(model, tok, [replace(ex, completion_ids=())], lr=1e-4),
            "completion_ids is empty",
        ),
        (lambda: train_tpo(model, None, tok, [_replace_list(plist, k=1)], lr=1e-4), "at least 2"),
        (
            lambda: train_tpo(model, None, tok, [_replace_list(plist, scores=(0.5, 0.5, 0.5))], lr=1e-4),
            "all 3 scores are equal",
        ),
        (
            lambda: train_tpo(model, None, tok, [_replace_list(plist, scores=(1.0, math.nan, 0.0))], lr=1e-4),
            "non-finite",
        ),
    ]
    for call, message in cases:
        with pytest.raises(TrainingDataError, match=message):
            call()
    with pytest.raises(ValueError, match="policy itself"):
        train_dpo(model, model, tok, [pair], lr=1e-4)
    with pytest.raises(ValueError, match="lr must be"):
        train_sft(model, tok, [ex], lr=0.0)
    with pytest.raises(ValueError, match="beta"):
        train_tpo(model, None, tok, [plist], lr=1e-4, beta=-1.0)
    assert _same(_params(model), before)


def _replace_list(
    pl: PreferenceList, *, k: int | None = None, scores: tuple[float, ...] | None = None
) -> PreferenceList:
    k = len(pl.candidates) if k is None else k
    return PreferenceList(
        pl.problem_id, pl.prompt, pl.prompt_ids, pl.candidates[:k], pl.candidate_ids[:k],
        scores if scores is not None else pl.scores[:k], pl.node_ids[:k],
    )  # fmt: skip
