"""Model-based rewards on the real shipped models: the tiny outcome RM, a PRM head on the tiny policy's backbone,
and the endogenous reward of the tiny policy."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from treeward._paths import SHIPPED_POLICY, SHIPPED_RM
from treeward.engine.hf import HFPolicy, ModelLoadError
from treeward.rewards.base import Sample, Status
from treeward.rewards.model import (
    PRM_LABELS_KEY,
    ClassifierReward,
    EndogenousReward,
    ProcessRewardModel,
    encode_pieces,
    prm_label_ids,
    split_steps,
    step_positions,
)
from treeward.rewards.process import ClipSteps, DeltaSteps, LastStep, MinStep
from treeward.tasks import ArithmeticAnswer
from treeward.tasks.arithmetic import generate_problems, solution_text
from treeward.train.value import init_value_model, roc_auc, sample_outcome_data, save_value_model

PROMPT = (
    "Q: Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. How many cards does Ann have?\n"
)
STEPS = ("Step 1: 54*3=162\n", "Step 2: 162-34=128\n", "Answer: 128")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(SHIPPED_POLICY)


@pytest.fixture(scope="module")
def rm() -> ClassifierReward:
    return ClassifierReward(SHIPPED_RM)


@pytest.fixture(scope="module")
def prm_path(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:  # type: ignore[no-untyped-def]
    """A token-classification PRM: the shipped policy's backbone and a seeded random one-logit head (the reading
    of positions does not depend on what the head learned)."""
    model = init_value_model(SHIPPED_POLICY, token_level=True)
    with torch.no_grad():
        torch.manual_seed(0)
        model.score.weight.normal_(0, 0.3)
        model.score.bias.fill_(0.1)
    return save_value_model(model, tok, tmp_path_factory.mktemp("prm") / "prm", dtype=torch.float32)


@pytest.fixture(scope="module")
def prm_direct(prm_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(prm_path, dtype=torch.float32).eval()


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- inputs --------------------------------------------------------------------------------------------------------


def test_step_positions_by_hand() -> None:
    # prompt of 4 tokens, steps of 3, 1 and 2 tokens: ends at 4+3-1 = 6, 6+1 = 7, 7+2 = 9
    assert step_positions(4, [3, 1, 2]) == [6, 7, 9]
    assert step_positions(0, [1]) == [0]
    with pytest.raises(ValueError, match="step 2 has 0 tokens"):
        step_positions(4, [3, 0])


def test_split_steps_by_hand() -> None:
    assert split_steps("Step 1: 2+2=4\nAnswer: 4") == ["Step 1: 2+2=4\n", "Answer: 4"]
    # blank lines stay with the step before; leading blank lines go to the first step
    assert split_steps("\na\n\n\nb\n") == ["\na\n\n\n", "b\n"]
    assert split_steps(" \n\n") == []
    assert split_steps("") == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab \n", max_size=30))
def test_split_steps_cover_the_text_once(text: str) -> None:
    steps = split_steps(text)
    if text.strip():
        assert "".join(steps) == text
    else:
        assert steps == []
    for s in steps:
        # each step holds exactly one non-blank line
        assert sum(1 for line in s.split("\n") if line.strip()) == 1


def test_encode_pieces_layout(tok) -> None:  # type: ignore[no-untyped-def]
    ids, plen, lengths = encode_pieces(tok, PROMPT, STEPS)
    want_prompt = [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    assert ids[:plen] == want_prompt
    parts = [tok.encode(s, add_special_tokens=False) for s in STEPS]
    assert lengths == [len(p) for p in parts]
    assert ids[plen:] == [t for p in parts for t in p]
    # "Step 1: 54*3=162\n": Step, ' ', 1, :, ' ', 5, 4, *, 3, =, 1, 6, 2, \n (digits are single tokens)
    assert lengths[0] == 14


# --- the outcome RM ------------------------------------------------------------------------------------------------


def _pairs() -> list[tuple[Sample, Sample]]:
    """Right and corrupted solutions of fixed problems; the exact verifier confirms which is which."""
    out = []
    for p in generate_problems(8, [1, 2, 3, 4], seed=77):
        good = solution_text(p)
        lines = good.split("\n")
        last = lines[-2]  # the last step, "Step k: a op b=c"
        head, _, result = last.rpartition("=")
        wrong = int(result) + 10
        bad = "\n".join([*lines[:-2], f"{head}={wrong}", f"Answer: {wrong}"])
        pair = tuple(Sample(prompt=p.prompt, response=t, reference=p.answer) for t in (good, bad))
        verdict = ArithmeticAnswer()(list(pair))
        assert [v.score for v in verdict] == [1.0, 0.0]
        out.append(pair)  # type: ignore[arg-type]
    return out


def test_rm_separates_right_from_wrong_policy_samples(rm: ClassifierReward) -> None:
    """On fresh policy samples (problems the RM never saw, labelled by the exact verifier), the RM ranks right
    answers above wrong ones far more often than chance (AUC 0.5). Its held-out AUC at training was 0.77 on 1000
    samples; on these 96 the AUC's standard error is about 0.05, so 0.65 leaves more than two of them."""
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    data = sample_outcome_data(policy, generate_problems(24, [1, 2, 3, 4], seed=31), samples=4, seed=5)
    labels = [y for _, y in data]
    assert 0 < sum(labels) < len(labels)
    results = rm([s for s, _ in data])
    assert all(r.status is Status.OK for r in results)
    assert roc_auc([r.score for r in results], labels) > 0.65  # type: ignore[misc]


def test_rm_score_is_the_sigmoid_of_a_direct_forward(rm: ClassifierReward, tok) -> None:  # type: ignore[no-untyped-def]
    s = Sample(prompt=PROMPT, response="".join(STEPS))
    got = rm([s])[0]
    model = AutoModelForSequenceClassification.from_pretrained(SHIPPED_RM, dtype=torch.float32).eval()
    ids = [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    ids += tok.encode("".join(STEPS), add_special_tokens=False)
    with torch.no_grad():
        logit = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert got.components["logit"] == pytest.approx(logit, abs=1e-5)
    assert got.score == pytest.approx(_sigmoid(logit), abs=1e-6)
    assert got.info["scored_tokens"] == len(ids)
    raw = ClassifierReward(SHIPPED_RM, sigmoid=False)([s])[0]
    assert raw.score == pytest.approx(logit, abs=1e-5)


def test_rm_batch_equals_one_at_a_time(rm: ClassifierReward) -> None:
    samples = [s for pair in _pairs()[:4] for s in pair]  # lengths differ: the batch pads
    together = [r.score for r in ClassifierReward(SHIPPED_RM, batch_size=8)(samples)]
    alone = [rm([s])[0].score for s in samples]
    assert together == pytest.approx(alone, abs=1e-5)


def test_rm_partial_prefixes_are_opt_in(rm: ClassifierReward) -> None:
    s = Sample(prompt=PROMPT, response=STEPS[0], partial=True)
    r = rm([s])[0]
    assert r.score is None and r.status is Status.NOT_APPLICABLE and r.info["scored_tokens"] == 0
    assert "partial" in r.info["reason"]
    scored = ClassifierReward(SHIPPED_RM, score_partial=True)([s])[0]
    assert scored.status is Status.OK and scored.score is not None


def test_rm_too_long_is_a_status_or_an_announced_truncation(rm: ClassifierReward, tok) -> None:  # type: ignore[no-untyped-def]
    long = "Step 1: 1+1=2\n" * 30  # 30 × 12 tokens = 360 tokens: past the 256-position context
    s = Sample(prompt=PROMPT, response=long)
    r = rm([s])[0]
    n = len(encode_pieces(tok, PROMPT, [long])[0])
    assert r.score is None and r.status is Status.NOT_APPLICABLE
    assert r.info["reason"] == f"{n} tokens exceed the model's context of 256"
    t = ClassifierReward(SHIPPED_RM, truncate=True)([s])[0]
    assert t.status is Status.OK and t.info["truncated"] == n - 256 and t.info["scored_tokens"] == 256


def test_missing_and_broken_models_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model folder at .*missing"):
        ClassifierReward(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty has no config\.json"):
        ProcessRewardModel(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    lazy = ClassifierReward(broken)  # loads on first use
    with pytest.raises(ModelLoadError, match="cannot load a sequence-classification model"):
        lazy([Sample(prompt="Q", response="A")])
    # a causal LM is not a reward model, and an outcome RM is not a PRM: the missing head is named
    with pytest.raises(
        ModelLoadError, match=r"not a trained sequence-classification model: weights \['score.weight'\]"
    ):
        ClassifierReward(SHIPPED_POLICY)([Sample(prompt="Q", response="A")])
    with pytest.raises(
        ModelLoadError, match=r"not a trained token-classification model: weights \['score.bias'\]"
    ):
        ProcessRewardModel(SHIPPED_RM)([Sample(prompt="Q", response="A")])
    assert issubclass(ModelLoadError, ValueError)


def test_rewards_pickle_without_their_models(rm: ClassifierReward, prm_path: Path) -> None:
    samples = [s for pair in _pairs()[:2] for s in pair]
    before = rm(samples)
    blob = pickle.dumps(rm)
    assert len(blob) < 2000  # the path and the knobs, not the weights
    back = pickle.loads(blob)
    assert back.name == rm.name == "rm_tiny-rm"
    assert [r.score for r in back(samples)] == [r.score for r in before]
    prm = ProcessRewardModel(prm_path, reduce=ClipSteps(0.5))
    back_prm = pickle.loads(pickle.dumps(prm))
    assert back_prm.name == "prm_prm_clip" and back_prm.reduce == ClipSteps(0.5)


# --- the PRM -------------------------------------------------------------------------------------------------------


def test_prm_reads_exactly_the_step_boundaries(prm_path: Path, prm_direct, tok) -> None:  # type: ignore[no-untyped-def]
    r = ProcessRewardModel(prm_path)([Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])[0]
    prompt_ids = [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    step_ids = [tok.encode(s, add_special_tokens=False) for s in STEPS]
    ids = prompt_ids + [t for s in step_ids for t in s]
    # boundaries by hand: the last token of each step ("\n", "\n", the answer's last digit)
    ends, at = [], len(prompt_ids)
    for s in step_ids:
        at += len(s)
        ends.append(at - 1)
    assert [tok.decode([ids[e]]) for e in ends] == ["\n", "\n", "8"]
    assert r.info["positions"] == ends and r.info["scored_tokens"] == len(ids)
    with torch.no_grad():
        logits = prm_direct(input_ids=torch.tensor([ids])).logits[0, :, 0]
    want = [_sigmoid(logits[e].item()) for e in ends]
    assert list(r.step_scores) == pytest.approx(want, abs=1e-6)
    # and nowhere else: the neighbours of each boundary give other numbers
    assert all(abs(_sigmoid(logits[e - 1].item()) - w) > 1e-4 for e, w in zip(ends, want, strict=True))
    assert r.score == pytest.approx(min(want)) and r.components["steps"] == 3.0
    assert r.info["steps_from"] == "steps"


@pytest.fixture(scope="module")
def lm_prm_path(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:  # type: ignore[no-untyped-def]
    """An LM-head PRM: the shipped policy with label tokens named in its config and seeded random label rows."""
    from treeward.train.prm import init_lm_prm

    model = init_lm_prm(SHIPPED_POLICY)
    good, bad = model.config.to_dict()[PRM_LABELS_KEY]
    with torch.no_grad():
        torch.manual_seed(0)
        model.lm_head.weight[[good, bad]] = torch.randn(2, model.config.hidden_size) * 0.3
    return save_value_model(model, tok, tmp_path_factory.mktemp("lmprm") / "lm-prm", dtype=torch.float32)


def test_lm_head_prm_reads_two_label_tokens_at_the_step_ends(lm_prm_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    prm = ProcessRewardModel(lm_prm_path)
    r = prm([Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])[0]
    assert prm.head == "lm"
    direct = AutoModelForCausalLM.from_pretrained(lm_prm_path, dtype=torch.float32).eval()
    good, bad = direct.config.to_dict()[PRM_LABELS_KEY]
    prompt_ids = [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    step_ids = [tok.encode(s, add_special_tokens=False) for s in STEPS]
    ids = prompt_ids + [t for s in step_ids for t in s]
    ends = r.info["positions"]
    with torch.no_grad():
        logits = direct(input_ids=torch.tensor([ids])).logits[0]
    # step k's score: the softmax over the two label tokens at its last token, p(good) = σ(l_good − l_bad)
    want = [torch.softmax(logits[e, [good, bad]], -1)[0].item() for e in ends]
    assert list(r.step_scores) == pytest.approx(want, abs=1e-6)
    assert r.score == pytest.approx(min(want))
    # batched with other samples, the numbers do not move
    samples = [
        Sample(prompt=p.prompt, response=solution_text(p)) for p in generate_problems(4, [1, 4], seed=9)
    ]
    together = prm([*samples, Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])
    assert list(together[-1].step_scores) == pytest.approx(want, abs=1e-5)


def test_malformed_prm_labels_are_one_clear_error(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    assert prm_label_ids({"vocab_size": 10}) is None
    assert prm_label_ids({PRM_LABELS_KEY: [59, 58]}) == (59, 58)
    with pytest.raises(ValueError, match="two different token ids"):
        prm_label_ids({PRM_LABELS_KEY: [59, 59]})
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_POLICY)
    model.config.update({PRM_LABELS_KEY: [59]})
    folder = save_value_model(model, tok, tmp_path / "bad", dtype=torch.float32)
    with pytest.raises(
        ModelLoadError, match=r"cannot load a token-classification model.*two different token ids"
    ):
        ProcessRewardModel(folder)([Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])


def test_prm_scores_partial_prefixes_as_prefixes_of_the_full_path(prm_path: Path) -> None:
    prm = ProcessRewardModel(prm_path, reduce=LastStep())
    full = prm([Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])[0]
    for k in (1, 2):
        part = prm([Sample(prompt=PROMPT, response="".join(STEPS[:k]), steps=STEPS[:k], partial=True)])[0]
        # a causal model: the first k step scores do not depend on what follows
        assert part.status is Status.OK
        assert list(part.step_scores) == pytest.approx(list(full.step_scores[:k]), abs=1e-6)
        assert part.score == pytest.approx(full.step_scores[k - 1], abs=1e-6)


def test_prm_falls_back_to_newlines(prm_path: Path) -> None:
    prm = ProcessRewardModel(prm_path)
    given_steps = prm([Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])[0]
    split = prm([Sample(prompt=PROMPT, response="".join(STEPS))])[0]
    assert split.info["steps_from"] == "newlines"
    assert split.step_scores == given_steps.step_scores


def test_prm_reducers_and_refinements(prm_path: Path) -> None:
    s = Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)
    base = ProcessRewardModel(prm_path)([s])[0]
    steps = list(base.step_scores)
    assert base.score == pytest.approx(min(steps))
    clip = ProcessRewardModel(prm_path, reduce=ClipSteps(0.5))([s])[0]
    # Clip: Σ min(r_k − 0.5, 0)
    assert clip.score == pytest.approx(sum(min(x - 0.5, 0.0) for x in steps))
    assert clip.info["shaped_steps"] == pytest.approx([min(x - 0.5, 0.0) for x in steps])
    delta = ProcessRewardModel(prm_path, reduce=DeltaSteps())([s])[0]
    # Delta telescopes to r_1 − r_S
    assert delta.score == pytest.approx(steps[0] - steps[-1])
    assert clip.step_scores == base.step_scores


def test_prm_batch_equals_one_at_a_time(prm_path: Path) -> None:
    samples = [
        Sample(prompt=p.prompt, response=solution_text(p)) for p in generate_problems(6, [1, 2, 3, 4], seed=9)
    ]
    prm = ProcessRewardModel(prm_path, batch_size=6)
    together = prm(samples)
    for s, r in zip(samples, together, strict=True):
        assert list(r.step_scores) == pytest.approx(list(prm([s])[0].step_scores), abs=1e-5)


def test_prm_unscorable_samples_are_statuses(prm_path: Path) -> None:
    prm = ProcessRewardModel(prm_path, reduce=MinStep())
    out = prm(
        [
            Sample(prompt=PROMPT, response=" \n"),
            Sample(prompt=PROMPT, response="x", steps=("Step 1: 1+1=2\n", "")),
            Sample(prompt=PROMPT, response="Step 1: 1+1=2\n" * 30),
            Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS),
        ]
    )
    assert [r.status for r in out] == [Status.NOT_APPLICABLE] * 3 + [Status.OK]
    assert out[0].info["reason"] == "no steps"
    assert out[1].info["reason"] == "step 2 of 2 has no tokens"
    assert "exceed the model's context of 256" in out[2].info["reason"]
    assert [r.info["scored_tokens"] for r in out[:3]] == [0, 0, 0]


# --- the endogenous reward -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    return AutoModelForCausalLM.from_pretrained(SHIPPED_POLICY, dtype=torch.float32).eval()


def _ids(tok, prompt: str, response: str, eos: bool) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    prefix = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
    cont = tok.encode(response, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])
    return prefix + cont, len(prefix)


def test_endogenous_reward_is_the_paper_return_minus_the_prompt_value(lm, tok) -> None:  # type: ignore[no-untyped-def]
    """The paper's token rewards r_h = f(s_h, a_h) − logsumexp f(s_{h+1}, ·) (α = 1), with V = 0 after EOS, summed
    over the response, equal our score plus V(s_1) = logsumexp f(s_1, ·)."""
    reward = EndogenousReward(HFPolicy.from_pretrained(SHIPPED_POLICY))
    response = "".join(STEPS)
    got = reward([Sample(prompt=PROMPT, response=response)])[0]
    ids, plen = _ids(tok, PROMPT, response, eos=True)
    with torch.no_grad():
        f = lm(input_ids=torch.tensor([ids])).logits[0].double()  # f[t] scores token t+1
    lse = torch.logsumexp(f, dim=-1)
    # the state before response token h (index plen+h) is read at f[plen+h-1]
    paper = 0.0
    for t in range(plen, len(ids)):
        v_next = lse[t].item() if t + 1 < len(ids) else 0.0  # terminal after EOS
        paper += f[t - 1, ids[t]].item() - v_next
    v1 = lse[plen - 1].item()
    assert got.score == pytest.approx(paper - v1, abs=1e-3)
    # and it is the response's log-likelihood including EOS
    loglik = sum(torch.log_softmax(f[t - 1], -1)[ids[t]].item() for t in range(plen, len(ids)))
    assert got.score == pytest.approx(loglik, abs=1e-3)
    assert got.components["tokens"] == len(ids) - plen
    assert got.info["scored_tokens"] == len(ids) - 1 and got.info["dropped"] == "V(s_1)"


def test_endogenous_partial_prefix_has_no_eos(lm, tok) -> None:  # type: ignore[no-untyped-def]
    reward = EndogenousReward(SHIPPED_POLICY, alpha=2.0)
    got = reward([Sample(prompt=PROMPT, response=STEPS[0], partial=True)])[0]
    ids, plen = _ids(tok, PROMPT, STEPS[0], eos=False)
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    loglik = sum(lp[t - 1, ids[t]].item() for t in range(plen, len(ids)))
    assert got.components["logprob"] == pytest.approx(loglik, abs=1e-3)
    assert got.score == pytest.approx(2.0 * loglik, abs=2e-3)  # α scales the return
    assert got.info["dropped"] == "V(s_1) - V(s_{H+1})"
    empty = reward([Sample(prompt=PROMPT, response="", partial=True)])[0]
    assert empty.status is Status.NOT_APPLICABLE and empty.info["scored_tokens"] == 0


def test_endogenous_ranks_the_right_solution_higher_and_pickles() -> None:
    reward = EndogenousReward(SHIPPED_POLICY)
    pairs = _pairs()[:4]
    res = reward([s for pair in pairs for s in pair])
    # the policy was trained on right solutions: their likelihood beats a corrupted last step
    assert all(g.score > b.score for g, b in zip(res[0::2], res[1::2], strict=True))
    back = pickle.loads(pickle.dumps(reward))
    assert back._policy is None and back.path == str(SHIPPED_POLICY)
    assert [r.score for r in back([s for pair in pairs for s in pair])] == pytest.approx(
        [r.score for r in res], abs=1e-5
    )
    with pytest.raises(ValueError, match="alpha must be > 0"):
        EndogenousReward(SHIPPED_POLICY, alpha=0.0)


def test_endogenous_step_scores_split_the_log_likelihood_at_step_ends(lm, tok) -> None:  # type: ignore[no-untyped-def]
    """With a reducer, each step's score is the summed log-prob of its own tokens (EOS in the last step), read
    from one teacher-forced pass: the step scores add up to the response's log-likelihood."""
    reward = EndogenousReward(SHIPPED_POLICY, reduce=MinStep())
    got = reward([Sample(prompt=PROMPT, response="".join(STEPS), steps=STEPS)])[0]
    ids = [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    bounds = []
    for step in STEPS:
        ids += tok.encode(step, add_special_tokens=False)
        bounds.append(len(ids))
    ids.append(tok.eos_token_id)
    bounds[-1] += 1  # the EOS closes the last step
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    start = len(ids) - sum(len(tok.encode(step, add_special_tokens=False)) for step in STEPS) - 1
    want = []
    for end in bounds:
        want.append(sum(lp[t - 1, ids[t]].item() for t in range(start, end)))
        start = end
    assert got.step_scores == pytest.approx(want, abs=1e-3)
    assert got.score == pytest.approx(min(want), abs=1e-3)  # MinStep
    assert sum(want) == pytest.approx(got.components["logprob"], abs=1e-3)


def test_endogenous_step_scores_put_a_right_step_above_a_wrong_one() -> None:
    """The process use: on fixed problems, the corrupted last step (result off by 10) gets a lower step score than
    the right one, with the steps before it scored identically."""
    reward = EndogenousReward(SHIPPED_POLICY, reduce=MinStep())
    pairs = _pairs()[:6]
    samples = []
    for good, bad in pairs:
        for s in (good, bad):
            lines = s.response.split("\n")
            steps = (*(ln + "\n" for ln in lines[:-1]), lines[-1])
            samples.append(Sample(prompt=s.prompt, response=s.response, steps=steps, partial=True))
    res = reward(samples)
    for g, b in zip(res[0::2], res[1::2], strict=True):
        assert g.step_scores is not None and b.step_scores is not None
        assert g.step_scores[:-2] == pytest.approx(b.step_scores[:-2], abs=1e-6)  # shared steps
        assert g.step_scores[-2] > b.step_scores[-2]  # the corrupted step itself
