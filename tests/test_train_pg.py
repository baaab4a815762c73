"""The online policy-gradient loop: pg_loss numbers by hand, a slow reference, and real steps on the shipped policy."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.optimizer import register_optimizer_step_pre_hook

from treeward._paths import SHIPPED_POLICY
from treeward.credit.advantages import AdvantageError, grpo
from treeward.credit.records import Advantages
from treeward.engine.base import Policy
from treeward.engine.hf import HFPolicy
from treeward.rewards.base import RewardResult, Sample, Status
from treeward.search.core import path_sample
from treeward.tasks import ArithmeticAnswer, generate_problems, parse_answer
from treeward.train.pg import (
    LOSS_AGG,
    IndependentSampler,
    PGError,
    PGStep,
    evaluate,
    pg_loss,
    reweighted_ref_logp,
    train_pg,
)
from treeward.tree import Problem, Tree

LN2 = math.log(2)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# -- pg_loss by hand --------------------------------------------------------------------------------------------------


def test_clipping_inactive_and_active_by_hand() -> None:
    # Four tokens, clip_eps = 0.2, so the ratio is clipped to [0.8, 1.2]:
    #   ratio 1.4, A = +1: min(1.4, 1.2) = 1.2    -> token loss -1.2, clipped (gradient cut)
    #   ratio 1.4, A = -1: min(-1.4, -1.2) = -1.4 -> token loss +1.4, not clipped
    #   ratio 0.5, A = +1: min(0.5, 0.8) = 0.5    -> token loss -0.5, not clipped
    #   ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> token loss +0.8, clipped
    # token-mean loss = (-1.2 + 1.4 - 0.5 + 0.8) / 4 = 0.125; clip_frac = 2/4.
    old = t([[0.0, 0.0, 0.0, 0.0]])
    logp = torch.log(t([[1.4, 1.4, 0.5, 0.5]])).requires_grad_()
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = pg_loss(logp, old, adv, torch.ones(1, 4))
    assert loss.item() == pytest.approx(0.125)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx((1.4 + 1.4 + 0.5 + 0.5) / 4)
    assert stats["ratio_max"] == pytest.approx(1.4)
    # d loss / d logp = -A * ratio / 4 where unclipped, 0 where clipped: [0, 1.4/4, -0.5/4, 0].
    loss.backward()
    assert logp.grad is not None
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.35, -0.125, 0.0])


def test_clip_eps_high_decouples_the_upper_bound() -> None:
    # ratio 1.25, A = 1. With clip_eps = 0.2 the upper bound is 1.2: loss -1.2, clipped.
    # DAPO's clip-higher at 0.28 lifts it to 1.28: loss -1.25, not clipped. The lower bound stays 0.8.
    old, logp, adv, mask = t([[0.0]]), torch.log(t([[1.25]])), t([[1.0]]), torch.ones(1, 1)
    loss, stats = pg_loss(logp, old, adv, mask)
    assert (loss.item(), stats["clip_frac"]) == (pytest.approx(-1.2), 1.0)
    loss, stats = pg_loss(logp, old, adv, mask, clip_eps_high=0.28)
    assert (loss.item(), stats["clip_frac"]) == (pytest.approx(-1.25), 0.0)
    # ratio 0.7, A = -1: lower bound 0.8 either way: min(-0.7, -0.8) = -0.8 -> loss 0.8.
    loss, _ = pg_loss(torch.log(t([[0.7]])), old, -adv, mask, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(0.8)


def test_plain_policy_gradient_at_ratio_one() -> None:
    # logp == old: ratio 1 everywhere, nothing clipped; token-mean over 3 real tokens gives
    # d loss / d logp = -A / 3 on real tokens and 0 on the padded one.
    logp = t([[-1.0, -2.0], [-0.5, 0.0]]).requires_grad_()
    adv = t([[0.6, 0.6], [-1.5, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = pg_loss(logp, logp.detach(), adv, mask)
    # loss = -(0.6 + 0.6 - 1.5) / 3 = 0.1
    assert loss.item() == pytest.approx(0.1)
    assert stats["clip_frac"] == 0.0 and stats["approx_kl_old"] == 0.0
    loss.backward()
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([-0.2, -0.2, 0.5, 0.0])


def test_kl_terms_by_hand() -> None:
    # One token, ratio 1 and A = 0 (so the pg term is 0); pi = 0.25, ref = 0.5: d = ln 0.5 - ln 0.25 = ln 2.
    #   reverse k3: e^d - d - 1 = 2 - ln 2 - 1 = 0.306853
    #   forward (RAPO): rho = e^d = 2; rho ln rho - rho + 1 = 2 ln 2 - 1 = 0.386294
    # loss = kl_coef * kl = 0.1 * kl.
    logp, ref, zero, mask = torch.log(t([[0.25]])), torch.log(t([[0.5]])), t([[0.0]]), torch.ones(1, 1)
    loss, stats = pg_loss(logp, logp, zero, mask, kl="reverse", kl_coef=0.1, ref_logp=ref)
    assert stats["kl"] == pytest.approx(1 - LN2)
    assert loss.item() == pytest.approx(0.1 * (1 - LN2))
    loss, stats = pg_loss(logp, logp, zero, mask, kl="forward", kl_coef=0.1, ref_logp=ref)
    assert stats["kl"] == pytest.approx(2 * LN2 - 1)
    assert loss.item() == pytest.approx(0.1 * (2 * LN2 - 1))
    # Both vanish when the policy equals the reference, and their gradients too (a minimum).
    lp = torch.log(t([[0.5]])).requires_grad_()
    for kind in ("reverse", "forward"):
        loss, stats = pg_loss(lp, lp.detach(), zero, mask, kl=kind, ref_logp=ref)
        loss.backward()
        assert stats["kl"] == 0.0 and lp.grad is not None and lp.grad.item() == 0.0
        lp.grad = None


def test_padding_never_turns_the_loss_into_nan() -> None:
    # Off the mask anything goes (the loop leaves prompt log-probs there, and 0 for old / ref): a log-ratio of
    # +1000 would overflow exp to inf, and inf * 0 is nan. The loss and its gradient must ignore those positions.
    logp = t([[-1000.0, -0.5]]).requires_grad_()
    zeros = t([[0.0, 0.0]])
    mask = torch.tensor([[0, 1]])
    for kind in ("reverse", "forward"):
        loss, stats = pg_loss(logp, t([[-2000.0, -0.5]]), t([[1.0, 1.0]]), mask, kl=kind, ref_logp=zeros)
        loss.backward()
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
        assert (
            logp.grad is not None and logp.grad[0, 0].item() == 0.0 and math.isfinite(logp.grad[0, 1].item())
        )
        logp.grad = None


def test_loss_aggregations_by_hand() -> None:
    # Row 0 has one real token (value 4), row 1 has three (values 1, 2, 3); padded width T = 3.
    #   token-mean:              (4 + 1 + 2 + 3) / 4 = 2.5
    #   seq-mean-token-mean:     (4/1 + 6/3) / 2 = 3.0            (GRPO)
    #   seq-mean-token-sum:      (4 + 6) / 2 = 5.0
    #   seq-mean-token-sum-norm: (4 + 6) / (2 rows * 3) = 10/6    (Dr. GRPO with the padded width as constant)
    # With ratio 1 and a zero KL, the per-token loss is -A, so A = -value gives those numbers.
    values = t([[4.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    expected = {
        "token-mean": 2.5,
        "seq-mean-token-mean": 3.0,
        "seq-mean-token-sum": 5.0,
        "seq-mean-token-sum-norm": 10 / 6,
    }
    assert set(expected) == set(LOSS_AGG)
    for name, want in expected.items():
        loss, stats = pg_loss(zeros, zeros, -values, mask, loss_agg=name)
        assert loss.item() == pytest.approx(want), name
        assert stats["pg_loss"] == pytest.approx(2.5)  # stats are token means whatever the aggregation


def test_entropy_from_logits() -> None:
    # Uniform logits over V = 4: H = ln 4 at every position. entropy_coef 0.5 subtracts 0.5 ln 4 from the loss.
    logits = torch.zeros(1, 2, 4)
    zeros = torch.zeros(1, 2)
    loss, stats = pg_loss(zeros, zeros, zeros, torch.ones(1, 2), logits=logits)
    assert stats["entropy"] == pytest.approx(math.log(4)) and loss.item() == 0.0
    loss, _ = pg_loss(zeros, zeros, zeros, torch.ones(1, 2), logits=logits, entropy_coef=0.5)
    assert loss.item() == pytest.approx(-0.5 * math.log(4))


def test_pg_loss_rejects_bad_input() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(PGError, match="advantages has shape"):
        pg_loss(x, x, torch.zeros(2, 2), x)
    with pytest.raises(PGError, match="needs ref_logp"):
        pg_loss(x, x, x, x, kl="reverse")
    with pytest.raises(PGError, match="kl must be"):
        pg_loss(x, x, x, x, kl="both", ref_logp=x)  # type: ignore[arg-type]
    with pytest.raises(PGError, match="unknown loss_agg"):
        pg_loss(x, x, x, x, loss_agg="mean")
    with pytest.raises(PGError, match="needs logits"):
        pg_loss(x, x, x, x, entropy_coef=0.1)
    with pytest.raises(PGError, match="clip_eps"):
        pg_loss(x, x, x, x, clip_eps=0.0)


# -- slow reference -----------------------------------------------------------------------------------------------


def slow_pg_loss(
    logp: list[list[float]],
    old: list[list[float]],
    adv: list[list[float]],
    mask: list[list[int]],
    *,
    eps: float,
    eps_high: float,
    kl: str | None,
    coef: float,
    ref: list[list[float]],
    agg: str,
) -> float:
    """The loss written token by token, straight from the formulas in pg_loss's docstring."""
    per: list[list[float]] = []
    for b in range(len(logp)):
        row = []
        for i in range(len(logp[b])):
            ratio = math.exp(logp[b][i] - old[b][i])
            value = -min(ratio * adv[b][i], min(max(ratio, 1 - eps), 1 + eps_high) * adv[b][i])
            d = ref[b][i] - logp[b][i]
            if kl == "reverse":
                value += coef * (math.exp(d) - d - 1)
            elif kl == "forward":
                value += coef * (math.exp(d) * d - math.exp(d) + 1)
            row.append(value)
        per.append(row)
    real = [[v for v, m in zip(r, mr, strict=True) if m] for r, mr in zip(per, mask, strict=True)]
    if agg == "token-mean":
        flat = [v for r in real for v in r]
        return sum(flat) / max(len(flat), 1)
    if agg == "seq-mean-token-mean":
        means = [sum(r) / len(r) for r in real if r]
        return sum(means) / max(len(means), 1)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in real) / len(real)
    return sum(sum(r) for r in real) / (len(real) * len(mask[0]))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.data(),
    st.sampled_from([None, "reverse", "forward"]),
    st.sampled_from(sorted(LOSS_AGG)),
    st.sampled_from([(0.2, 0.2), (0.1, 0.3)]),
)
def test_pg_loss_matches_the_slow_reference(
    b: int, width: int, data: st.DataObject, kl: str | None, agg: str, eps: tuple[float, float]
) -> None:
    floats = st.floats(-3.0, 0.0, allow_nan=False)
    grid = st.lists(st.lists(floats, min_size=width, max_size=width), min_size=b, max_size=b)
    logp, old, ref = data.draw(grid), data.draw(grid), data.draw(grid)
    adv = data.draw(
        st.lists(
            st.lists(st.floats(-2, 2, allow_nan=False), min_size=width, max_size=width),
            min_size=b,
            max_size=b,
        )
    )
    mask = data.draw(
        st.lists(st.lists(st.integers(0, 1), min_size=width, max_size=width), min_size=b, max_size=b)
    )
    loss, _ = pg_loss(
        t(logp),
        t(old),
        t(adv),
        torch.tensor(mask),
        clip_eps=eps[0],
        clip_eps_high=eps[1],
        kl=kl,  # type: ignore[arg-type]
        kl_coef=0.3,
        ref_logp=t(ref),
        loss_agg=agg,
    )
    want = slow_pg_loss(logp, old, adv, mask, eps=eps[0], eps_high=eps[1], kl=kl, coef=0.3, ref=ref, agg=agg)
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


# -- RAPO's reweighted reference --------------------------------------------------------------------------------------


def test_reweighted_reference_by_hand() -> None:
    # Reference over V = 2 tokens: [0.8, 0.2].
    #   phi = 1:   the reference itself, log [0.8, 0.2]
    #   phi = 0:   uniform, log [0.5, 0.5]
    #   phi = 0.5: [sqrt 0.8, sqrt 0.2] = sqrt(0.2) * [2, 1], normalised [2/3, 1/3]
    logits = torch.log(torch.tensor([0.8, 0.2])).expand(3, 2, 2).clone()  # [B=3, T=2, V=2]
    tokens = torch.tensor([[0, 1], [0, 1], [0, 1]])
    out = reweighted_ref_logp(logits, tokens, torch.tensor([1.0, 0.0, 0.5])).exp()
    assert out.tolist() == [
        pytest.approx([0.8, 0.2]),
        pytest.approx([0.5, 0.5]),
        pytest.approx([2 / 3, 1 / 3]),
    ]
    with pytest.raises(PGError, match=r"\[0, 1\]"):
        reweighted_ref_logp(logits, tokens, torch.tensor([1.0, 1.5, 0.0]))
    with pytest.raises(PGError, match="one exponent per row"):
        reweighted_ref_logp(logits, tokens, torch.tensor([1.0]))


# -- the loop on the shipped policy -----------------------------------------------------------------------------------


class Recording:
    """A sampler that keeps the trees it returned."""

    def __init__(self, inner: IndependentSampler) -> None:
        self.inner = inner
        self.trees: list[Tree] = []

    def __call__(self, problems: Sequence[Problem], policy: Policy, *, seed: int) -> list[Tree]:
        trees = self.inner(problems, policy, seed=seed)
        self.trees.extend(trees)
        return trees


def shipped() -> HFPolicy:
    return HFPolicy.from_pretrained(SHIPPED_POLICY)


def completion_logprob(policy: HFPolicy, tree: Tree, leaf: int) -> float:
    completion = [tok for n in tree.path(leaf)[1:] for tok in n.token_ids]
    return math.fsum(policy.score([tree.root.token_ids], [completion])[0])


def test_one_step_raises_the_rewarded_completions() -> None:
    # A 2-step problem where the shipped policy solves 6 of 8 samples (checked below, so the toy is what we think):
    # GRPO gives the 6 correct completions a positive advantage and the 2 wrong ones a negative one, so one
    # gradient step must raise the log-probability of every correct completion and lower every wrong one. (A small
    # step: Adam's first step moves every weight by about lr, and at 1e-4 it overshoots for this 2M-weight model.)
    policy = shipped()
    problem = generate_problems(3, 2, seed=0)[2]
    sampler = Recording(IndependentSampler(n=8, max_tokens=48))
    history = train_pg(
        policy,
        [problem],
        sampler=sampler,
        reward=ArithmeticAnswer(),
        advantage=grpo,
        steps=1,
        lr=1e-5,
        batch_problems=1,
        log=None,
    )
    (tree,) = sampler.trees
    results = ArithmeticAnswer()(
        [Sample(tree.problem.prompt, tree.response(n.id), reference=problem.answer) for n in tree.leaves()]
    )
    correct = {n.id: r.score == 1.0 for n, r in zip(tree.leaves(), results, strict=True)}
    assert sorted(correct.values()) == [False] * 2 + [True] * 6
    assert history[0].samples == 8 and history[0].accuracy == 0.75
    assert history[0].old_logp_gap < 1e-4  # the tree's logprobs are the training forward's, before the update
    for leaf, ok in correct.items():
        before = sum(n.logprob for n in tree.path(leaf)[1:])
        after = completion_logprob(policy, tree, leaf)
        assert (after > before) == ok, (leaf, ok, before, after)


def test_update_invalidates_the_engine_cache() -> None:
    # Sampling fills the KV store; after the update it must be empty, and a new expansion of the same prompt must
    # give exactly what the new weights give without any cache (not the old weights' numbers).
    policy = shipped()
    problem = generate_problems(1, 2, seed=1)[0]
    prompt = policy.encode_prompt(problem.prompt)
    before = policy.expand([prompt], max_new_tokens=12, stop=None, seeds=7)[0][0]
    assert policy.cache_nbytes > 0
    train_pg(
        policy,
        [problem],
        sampler=IndependentSampler(n=4, max_tokens=48),
        reward=ArithmeticAnswer(),
        advantage=grpo,
        steps=1,
        lr=1e-3,
        batch_problems=1,
        log=None,
    )
    assert policy.cache_nbytes == 0
    after = policy.expand([prompt], max_new_tokens=12, stop=None, seeds=7)[0][0]
    fresh = HFPolicy(policy.model, policy.tokenizer, prefix_cache=False)
    truth = fresh.score([prompt], [after.token_ids])[0]
    assert after.logprobs == pytest.approx(truth, abs=1e-5)
    old_weights = shipped().score([prompt], [after.token_ids])[0]
    assert max(abs(a - b) for a, b in zip(after.logprobs, old_weights, strict=True)) > 1e-3
    assert before.logprobs == pytest.approx(shipped().score([prompt], [before.token_ids])[0], abs=1e-5)


def _comparable(h: PGStep) -> dict[str, object]:
    d = dataclasses.asdict(h)
    for timing in ("tokens_per_s", "sample_s", "update_s"):
        d.pop(timing)
    return d


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    problems = generate_problems(4, 2, seed=0)
    knobs: dict[str, Any] = dict(
        sampler=IndependentSampler(n=4, max_tokens=48),
        reward=ArithmeticAnswer(),
        advantage=grpo,
        lr=1e-3,
        batch_problems=2,
        kl="reverse",
        seed=5,
        log=None,
    )
    straight = shipped()
    full = train_pg(straight, problems, steps=2, **knobs)

    killed = shipped()
    train_pg(killed, problems, steps=1, checkpoint_dir=tmp_path, **knobs)
    assert (tmp_path / "pg-checkpoint.pt").is_file()
    resumed = shipped()  # a new process: fresh weights, the run's state comes from the checkpoint
    history = train_pg(resumed, problems, steps=2, checkpoint_dir=tmp_path, **knobs)

    assert [_comparable(h) for h in history] == [_comparable(h) for h in full]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in shipped().model.state_dict().items())  # it did train

    with pytest.raises(PGError, match="same problems and knobs"):
        train_pg(shipped(), problems, steps=3, checkpoint_dir=tmp_path, **{**knobs, "lr": 2e-3})


class FailsOnOddLength:
    """Scores like ArithmeticAnswer, but a response of odd length is a reward failure (score None)."""

    name = "fails_on_odd_length"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        scored = ArithmeticAnswer()(samples)
        return [
            RewardResult(None, Status.EXEC_ERROR) if len(s.response) % 2 else r
            for s, r in zip(samples, scored, strict=True)
        ]


def test_failed_rewards_are_excluded_not_zero() -> None:
    policy = shipped()
    problems = generate_problems(2, 1, seed=4)
    sampler = Recording(IndependentSampler(n=6, max_tokens=32))
    (step,) = train_pg(
        policy,
        problems,
        sampler=sampler,
        reward=FailsOnOddLength(),
        advantage=grpo,
        steps=1,
        lr=1e-5,
        batch_problems=2,
        log=None,
    )
    responses = [(t, n) for t in sampler.trees for n in t.leaves()]
    odd = [(t, n) for t, n in responses if len(t.response(n.id)) % 2]
    kept = [(t, n) for t, n in responses if not len(t.response(n.id)) % 2]
    assert odd and kept  # both kinds occur in this batch
    assert (step.samples, step.excluded) == (len(kept), len(odd))
    scores = [
        r.score
        for r in ArithmeticAnswer()(
            [Sample(t.problem.prompt, t.response(n.id), reference=t.problem.answer) for t, n in kept]
        )
    ]
    assert step.reward_mean == pytest.approx(statistics.fmean(s for s in scores if s is not None))
    assert step.trained_tokens == sum(len(t.prefix_ids(n.id)) - len(t.root.token_ids) for t, n in kept)


def test_kl_stats_and_recomputed_old_logprobs() -> None:
    problems = generate_problems(3, 2, seed=0)[2:]  # the toy of test_one_step_raises_the_rewarded_completions
    common: dict[str, Any] = dict(
        sampler=IndependentSampler(n=8, max_tokens=48),
        reward=ArithmeticAnswer(),
        advantage=grpo,
        steps=1,
        lr=1e-4,
        batch_problems=1,
        log=None,
    )
    # The reference is the policy itself at step 1 (one gradient step, measured before it): the reverse KL is 0.
    (rev,) = train_pg(shipped(), problems, kl="reverse", **common)
    assert rev.kl == pytest.approx(0.0, abs=1e-6)
    # RAPO's forward KL to the reweighted reference: leaves with reward 0 get a uniform reference (phi = 0), far
    # from this peaked policy, so the KL is positive whenever a sample is wrong.
    (fwd,) = train_pg(shipped(), problems, kl="forward", **common)
    assert fwd.accuracy is not None and fwd.accuracy < 1.0
    assert fwd.kl is not None and fwd.kl > 0.1
    # pi_old from a no-grad forward instead of the tree: the same update (the tree's numbers are the model's).
    tree_old, recomputed = shipped(), shipped()
    (a,) = train_pg(tree_old, problems, **common)
    (b,) = train_pg(recomputed, problems, recompute_old=True, **common)
    assert b.old_logp_gap == 0.0 and a.old_logp_gap < 1e-4
    assert a.loss == pytest.approx(b.loss, abs=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)  # the same gradient, to float noise
    # Adam's first step moves each weight by about lr * sign(gradient), so weights whose gradient is ~0 may go
    # either way: the two models agree to within 2 lr per weight.
    sa, sb = tree_old.model.state_dict(), recomputed.model.state_dict()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 2e-4 + 1e-7


def test_clipping_acts_from_the_second_gradient_step() -> None:
    # pi_old is the sampling policy, so the first gradient step sees ratio 1 everywhere (nothing clipped, plain
    # policy gradient). Later PPO epochs over the same rows see the moved policy: with lr 1e-3 the ratios leave
    # [0.8, 1.2] on some tokens and clipping cuts their gradient.
    problems = generate_problems(3, 2, seed=0)[2:]
    common: dict[str, Any] = dict(
        sampler=IndependentSampler(n=8, max_tokens=48),
        reward=ArithmeticAnswer(),
        advantage=grpo,
        steps=1,
        lr=1e-3,
        batch_problems=1,
        log=None,
    )
    (one,) = train_pg(shipped(), problems, ppo_epochs=1, **common)
    (four,) = train_pg(shipped(), problems, ppo_epochs=2, minibatches=2, **common)
    assert one.clip_frac == 0.0
    assert four.clip_frac > 0.0


def test_tree_rollouts_plug_in_with_step_level_advantages() -> None:
    # The rollout sampler grows trees with shared prefixes: every leaf is a row whose completion repeats the shared
    # steps, so the rows hold more tokens than were generated. The old log-probs of a row are its path's node
    # logprobs concatenated across steps, and must still match the training forward token for token.
    from treeward.credit.advantages import treerpo
    from treeward.search.rollouts import tree_rollouts

    problems = generate_problems(2, 2, seed=0)
    (step,) = train_pg(
        shipped(),
        problems,
        sampler=functools.partial(tree_rollouts, leaves=4),
        reward=ArithmeticAnswer(),
        advantage=treerpo,
        steps=1,
        lr=1e-5,
        batch_problems=2,
        log=None,
    )
    assert step.samples + step.excluded >= 8  # 4 finished leaves per tree, each scored
    assert step.trained_tokens > step.generated_tokens
    assert step.old_logp_gap < 1e-4


def test_evaluate_is_greedy_accuracy() -> None:
    # The fraction of problems whose temperature-0 solution has the reference answer, counted here by hand.
    policy = shipped()
    problems = generate_problems(6, 3, seed=0)
    greedy = policy.expand(
        [policy.encode_prompt(p.prompt) for p in problems], temperature=0.0, max_new_tokens=80, stop=None
    )
    right = [parse_answer(c[0].text) == p.answer for c, p in zip(greedy, problems, strict=True)]
    assert 0 < sum(right) < len(problems)  # a mix, so the count means something
    assert evaluate(policy, problems, ArithmeticAnswer(), max_tokens=80) == pytest.approx(
        sum(right) / len(problems)
    )


def test_evaluate_sampled_accuracy_counts_every_sample() -> None:
    # 3 problems x 4 samples at temperature 1, seed 5: the engine's draws are seeded, so the same call through the
    # sampler gives the same 12 solutions; the accuracy is the fraction of the 12 that have the reference answer.
    policy = shipped()
    problems = generate_problems(3, 2, seed=0)
    trees = IndependentSampler(n=4, max_tokens=48, temperature=1.0)(problems, policy, seed=5)
    right = [
        parse_answer(tree.response(n.id)) == tree.problem.answer for tree in trees for n in tree.leaves()
    ]
    assert len(right) == 12 and 0 < sum(right) < 12  # a mix, so the count means something
    got = evaluate(policy, problems, ArithmeticAnswer(), max_tokens=48, seed=5, temperature=1.0, samples=4)
    assert got == pytest.approx(sum(right) / 12)
    with pytest.raises(PGError, match="samples == 1 when temperature == 0"):
        evaluate(policy, problems, ArithmeticAnswer(), samples=4)
    with pytest.raises(PGError, match="samples >= 1"):
        evaluate(policy, problems, ArithmeticAnswer(), temperature=1.0, samples=0)


def test_bad_loop_input_is_refused_before_sampling() -> None:
    policy = shipped()
    problems = generate_problems(2, 1, seed=0)
    common: dict[str, Any] = dict(
        sampler=IndependentSampler(n=2), reward=ArithmeticAnswer(), advantage=grpo, log=None
    )
    with pytest.raises(PGError, match="batch_problems"):
        train_pg(policy, problems, steps=1, lr=1e-4, batch_problems=3, **common)
    with pytest.raises(PGError, match="lr"):
        train_pg(policy, problems, steps=1, lr=0.0, batch_problems=1, **common)
    with pytest.raises(PGError, match="unknown loss_agg"):
        train_pg(policy, problems, steps=1, lr=1e-4, batch_problems=1, loss_agg="avg", **common)
    with pytest.raises(PGError, match="only used with kl"):
        train_pg(policy, problems, steps=1, lr=1e-4, batch_problems=1, ref=policy.model, **common)
    assert policy.ledger.total.generated == 0  # refused before anything was sampled

    def wrong_paths(tree: Tree, rewards: Mapping[int, float | None]) -> Advantages:
        leaves = tuple(rewards)
        return Advantages(leaves, tuple((leaf,) for leaf in leaves), tuple((1.0,) for _ in leaves))

    with pytest.raises(AdvantageError, match="its path is"):
        train_pg(
            policy,
            problems,
            steps=1,
            lr=1e-4,
            sampler=IndependentSampler(n=2, max_tokens=32),
            reward=ArithmeticAnswer(),
            advantage=wrong_paths,
            batch_problems=1,
            log=None,
        )


def test_the_command_line_entry_prints_the_log_and_saves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from treeward.train.pg import main

    argv = ["--steps", "2", "--problems", "4", "--batch-problems", "2", "--leaves", "2", "--max-tokens", "32"]
    history = main([*argv, "--difficulty", "1", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert [h.step for h in history] == [1, 2]
    assert out.count("step ") == 2 and "tokens/s end to end" in out
    assert history[-1].samples == 4  # 2 problems x 2 leaves
    reloaded = HFPolicy.from_pretrained(tmp_path / "out")  # a from_pretrained folder: model and tokenizer
    assert reloaded.encode_prompt("Q: 1+1") == shipped().encode_prompt("Q: 1+1")


# -- parity with TRL's GRPOTrainer ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_one_step_equals_trl_grpo_trainer_on_the_same_completions(tmp_path: Path) -> None:
    # benchmarks/tree_rl.py compares train_pg with TRL's GRPOTrainer and claims the two updates are the same recipe
    # (token-mean "dapo" loss over every completion token of the batch, EOS included; group z-scores with the
    # Bessel std + 1e-4; eps 0.2; no KL; one AdamW step per batch, betas (0.9, 0.999), eps 1e-8, no weight decay;
    # grad norm clipped to 1; lr constant). Fed the SAME completions (TRL through its rollout_func hook), one step
    # of each must give the same advantages, loss, gradient and new weights, up to float rounding (TRL left-pads
    # prompts, we right-pad rows: ~1e-6). Any drift in normalisation, masking, EOS handling or optimizer settings
    # breaks this. (Measured on the 4-problem x 8-sample batch of the benchmark: loss 0.0011761 both, grad norm
    # 0.42964 both, weight deltas cosine 1.000000.)
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from treeward.rewards.adapters import TRLReward, to_trl
    from treeward.train.pg import step_problems

    lr = 5e-5
    problems = generate_problems(3, 2, seed=0)
    batch = step_problems(problems, 2, 0, 1)
    trees = IndependentSampler(n=4, max_tokens=48)(batch, shipped(), seed=3)
    rewards = [ArithmeticAnswer()([path_sample(t, n) for n in t.leaves()]) for t in trees]
    # precondition: at least one group with mixed rewards, so the gradient is not zero
    assert any(len({r.score for r in rs}) > 1 for rs in rewards)

    grads: dict[str, dict[str, torch.Tensor]] = {}
    current: dict[str, Any] = {}  # the model being trained and its name, for the hook

    def keep_grads(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        model = current["model"]
        grads[current["name"]] = {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    hook = register_optimizer_step_pre_hook(keep_grads)
    try:
        ours = shipped()
        current.update(model=ours.model, name="ours")
        history = train_pg(
            ours,
            batch,
            sampler=lambda problems, policy, *, seed: copy.deepcopy(trees),
            reward=ArithmeticAnswer(),
            advantage=grpo,
            steps=1,
            lr=lr,
            batch_problems=2,
            log=None,
        )

        leaves = {t.problem.prompt: sorted(n.id for n in t.leaves()) for t in trees}
        by_prompt = {t.problem.prompt: t for t in trees}
        trl_adv: list[torch.Tensor] = []

        def rollout(prompts: list[str], trainer: Any) -> dict[str, Any]:
            seen: dict[str, int] = {}
            out: dict[str, list[list[Any]]] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
            for p in prompts:  # TRL repeats each prompt num_generations times in a row
                tree, k = by_prompt[p], seen.get(p, 0)
                seen[p] = k + 1
                path = tree.path(leaves[p][k])[1:]
                out["prompt_ids"].append(list(tree.root.token_ids))
                out["completion_ids"].append([x for n in path for x in n.token_ids])
                out["logprobs"].append([x for n in path for x in n.logprobs])
            return out

        class Recorder(GRPOTrainer):
            def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
                out: dict[str, Any] = super()._generate_and_score_completions(inputs)
                trl_adv.append(out["advantages"].clone())
                return out

        trl_reward = to_trl(ArithmeticAnswer(), log_components=False)
        assert isinstance(trl_reward, TRLReward)  # the synchronous adapter
        model = AutoModelForCausalLM.from_pretrained(SHIPPED_POLICY)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        current.update(model=model, name="trl")
        cfg = GRPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=48,
            learning_rate=lr,
            lr_scheduler_type="constant",
            beta=0.0,
            max_steps=1,
            shuffle_dataset=False,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            activation_checkpointing=False,
        )
        trainer = Recorder(
            model=model,
            reward_funcs=trl_reward,
            args=cfg,
            train_dataset=Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in batch]),
            processing_class=AutoTokenizer.from_pretrained(SHIPPED_POLICY),
            rollout_func=rollout,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    finally:
        hook.remove()

    # the same advantages: TRL's (B,) row values are our per-leaf GRPO values (every step of a leaf's path carries
    # its one value), rows in the order rollout() gave them
    expected: list[float] = []
    for t, rs in zip(trees, rewards, strict=True):
        adv = grpo(t, {n.id: r.score for n, r in zip(t.leaves(), rs, strict=True)})
        value = {leaf: steps[0] for leaf, steps in zip(adv.leaves, adv.values, strict=True)}
        expected += [value[leaf] for leaf in leaves[t.problem.prompt]]
    assert trl_adv[0].tolist() == pytest.approx(expected, abs=1e-6)
    # the same loss and pre-clip gradient norm as TRL logs them (measured 1e-5 apart; a per-sequence mean instead
    # of the token mean moves the norm by 1.5 %)
    (logged,) = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert history[0].grad_norm > 0
    assert history[0].loss == pytest.approx(logged["loss"], rel=1e-4, abs=1e-7)
    assert history[0].grad_norm == pytest.approx(logged["grad_norm"], rel=1e-4)
    # the same gradient, parameter by parameter (after clipping, which scales both by the same factor; measured
    # 1e-5 apart relative to its norm)
    assert grads["ours"].keys() == grads["trl"].keys()
    flat_ours = torch.cat([g.flatten() for g in grads["ours"].values()])
    flat_trl = torch.cat([grads["trl"][n].flatten() for n in grads["ours"]])
    assert float((flat_ours - flat_trl).norm() / flat_trl.norm()) < 1e-4
    # and the same new weights (measured 5e-4 apart relative to the update: Adam's first step is about
    # lr * sign(g), so weights whose gradient is near Adam's eps = 1e-8 amplify the 1e-5 gradient rounding)
    after_ours, after_trl = ours.model.state_dict(), model.state_dict()
    delta_ours = torch.cat([(after_ours[k] - start[k]).flatten() for k in start])
    delta_trl = torch.cat([(after_trl[k] - start[k]).flatten() for k in start])
    assert float(delta_trl.norm()) > 0
    assert float((delta_ours - delta_trl).norm() / delta_trl.norm()) < 1e-2
