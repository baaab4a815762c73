"""The value-head training loop (outcome RM and PRM), its examples, AUC, and the outcome-RM data, on the shipped
policy's real weights."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from treeward._paths import SHIPPED_POLICY
from treeward.credit.records import StepExample
from treeward.engine.hf import HFPolicy, ModelLoadError
from treeward.rewards.model import ClassifierReward, encode_pieces
from treeward.tasks.arithmetic import check_steps, generate_problems, parse_answer, solution_text
from treeward.train.value import (
    RowPair,
    ValueDataError,
    ValueExample,
    grouped_auc,
    init_value_model,
    main,
    outcome_example,
    roc_auc,
    sample_outcome_data,
    save_value_model,
    step_example,
    train_value,
    value_loss,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(SHIPPED_POLICY)


# --- examples ----------------------------------------------------------------------------------------------------


def _step_ex(prompt_ids, step_ids, values) -> StepExample:  # type: ignore[no-untyped-def]
    return StepExample(
        problem_id="p0",
        prompt="Q",
        prompt_ids=tuple(prompt_ids),
        steps=tuple("s" for _ in step_ids),
        step_ids=tuple(tuple(s) for s in step_ids),
        values=tuple(values),
        labels=tuple(v >= 0.5 for v in values),
        node_ids=tuple(range(1, len(step_ids) + 1)),
    )


def test_step_example_reads_the_last_token_of_each_step() -> None:
    ex = _step_ex([5, 6, 7], [[8, 9], [10], [11, 12, 13]], [1.0, 0.5, 0.0])
    row = step_example(ex)
    # ids: prompt then the steps in order: 5 6 7 | 8 9 | 10 | 11 12 13 (indices 0..8)
    assert row.ids == (5, 6, 7, 8, 9, 10, 11, 12, 13)
    # step 1 ends at index 3+2-1 = 4 (token 9); step 2 at 4+1 = 5 (token 10); step 3 at 5+3 = 8 (token 13)
    assert row.positions == (4, 5, 8)
    assert [row.ids[p] for p in row.positions] == [9, 10, 13]
    assert row.targets == (1.0, 0.5, 0.0)


def test_step_example_refuses_bad_rows() -> None:
    with pytest.raises(ValueDataError, match=r"p0: step 2 has 0 tokens"):
        step_example(_step_ex([5], [[8], [], [9]], [1.0, 1.0, 0.0]))
    with pytest.raises(ValueDataError, match=r"p0: 2 steps but 1 values"):
        step_example(_step_ex([5], [[8], [9]], [1.0]))
    with pytest.raises(ValueDataError, match=r"targets must be in \[0, 1\]"):
        step_example(_step_ex([5], [[8], [9]], [1.0, 1.5]))


@pytest.mark.parametrize(
    ("ids", "positions", "targets", "message"),
    [
        ((), (0,), (1.0,), "ids is empty"),
        ((1, 2), (), (), "nothing to train on"),
        ((1, 2), (1,), (1.0, 0.0), "1 positions but 2 targets"),
        ((1, 2, 3), (2, 1), (1.0, 0.0), "strictly increasing"),
        ((1, 2), (2,), (1.0,), "outside the 2 tokens"),
    ],
)
def test_value_example_validation(ids, positions, targets, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueDataError, match=message):
        ValueExample(ids, positions, targets)
    assert issubclass(ValueDataError, ValueError)


def test_lm_start_and_row_pairs_are_checked() -> None:
    # lm_start is a token index in [1, T]: T = 3 tokens here
    assert ValueExample((1, 2, 3), (2,), (1.0,), lm_start=3).lm_start == 3
    for bad in (0, 4):
        with pytest.raises(ValueDataError, match=r"lm_start must be in \[1, 3\]"):
            ValueExample((1, 2, 3), (2,), (1.0,), lm_start=bad)
    one = ValueExample((1, 2), (1,), (1.0,))
    two = ValueExample((1, 2, 3), (1, 2), (1.0, 0.0))
    assert RowPair(one, one).better is one
    with pytest.raises(ValueDataError, match="exactly one position"):
        RowPair(one, two)


def test_outcome_example_reads_the_last_token() -> None:
    row = outcome_example([1, 50, 51], [60, 61], 1.0)
    # 5 tokens, read at index 4
    assert row.ids == (1, 50, 51, 60, 61) and row.positions == (4,) and row.targets == (1.0,)


# --- AUC -----------------------------------------------------------------------------------------------------------


def _auc_pairs(scores: list[float], labels: list[bool]) -> float:
    """Slow reference: the fraction of (positive, negative) pairs ranked right, ties worth one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_by_hand() -> None:
    # positives 0.35 and 0.8; negatives 0.1 and 0.4: 0.35 beats 0.1, loses to 0.4; 0.8 beats both → 3/4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # a tie is worth one half
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [True, True])


def test_grouped_auc_by_hand() -> None:
    scores = [0.1, 0.9, 0.5, 0.2, 0.7, 0.8, 0.3, 0.3]
    labels = [False, True, True, False, True, True, True, False]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    # a: 1.0 (0.9 > 0.1); b: 1.0 (0.5 > 0.2); c has no negative, skipped; d: a tie, 0.5 → (1 + 1 + 0.5) / 3
    assert grouped_auc(scores, labels, groups) == pytest.approx(2.5 / 3)
    assert grouped_auc([0.1], [True], ["a"]) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, -3.0]), st.booleans()), min_size=2, max_size=30
    ).filter(lambda xs: 0 < sum(y for _, y in xs) < len(xs))
)
def test_roc_auc_matches_the_pairwise_reference(rows: list[tuple[float, bool]]) -> None:
    scores, labels = [s for s, _ in rows], [y for _, y in rows]
    assert roc_auc(scores, labels) == pytest.approx(_auc_pairs(scores, labels), abs=1e-12)


# --- the model and the loop ----------------------------------------------------------------------------------------


def _outcome_batch(tok) -> list[ValueExample]:  # type: ignore[no-untyped-def]
    """Four outcome rows of different lengths: two right solutions (target 1), two with a wrong answer (0)."""
    rows = []
    for k, p in enumerate(generate_problems(4, [1, 2, 3, 4], seed=5)):
        text = solution_text(p)
        if k % 2:
            text = text.rsplit("Answer: ", 1)[0] + f"Answer: {int(p.answer) + 7}"
        ids, plen, _ = encode_pieces(tok, p.prompt, [text])
        rows.append(outcome_example(ids[:plen], ids[plen:], 0.0 if k % 2 else 1.0))
    return rows


def _step_batch(tok) -> list[ValueExample]:  # type: ignore[no-untyped-def]
    """PRM rows from StepExamples: the right solution with one step's result corrupted, targets from the exact
    step verifier."""
    rows = []
    for p in generate_problems(3, [2, 3, 4], seed=6):
        lines = solution_text(p).split("\n")
        a, _, res = lines[0].rpartition("=")
        lines[0] = f"{a}={int(res) + 1}"  # step 1 now wrong; later steps chain from the written result
        steps = [ln + "\n" for ln in lines[:-1]] + [lines[-1]]
        ok = check_steps(p, steps)
        ids, plen, lengths = encode_pieces(tok, p.prompt, steps)
        step_ids, at = [], plen
        for n in lengths:
            step_ids.append(ids[at : at + n])
            at += n
        ex = _step_ex(ids[:plen], step_ids, [1.0 if x else 0.0 for x in ok])
        rows.append(step_example(ex))
    return rows


@pytest.mark.parametrize("token_level", [False, True])
def test_first_loss_is_ln2_and_one_step_lowers_it(tok, token_level: bool) -> None:  # type: ignore[no-untyped-def]
    model = init_value_model(SHIPPED_POLICY, token_level=token_level)
    batch = _step_batch(tok) if token_level else _outcome_batch(tok)
    # the head starts at zero: every logit is 0, σ = 0.5, and BCE is ln 2 whatever the target
    with torch.no_grad():
        before = value_loss(model, batch).item()
    assert before == pytest.approx(math.log(2), abs=1e-6)
    log = train_value(model, batch, epochs=1, batch_size=len(batch), warmup=1, lr=1e-3, log=None)
    assert log.steps == 1 and log.losses[0] == pytest.approx(before, abs=1e-6)
    with torch.no_grad():
        after = value_loss(model, batch).item()
    assert after < before - 1e-3
    assert not model.training


def test_the_loop_is_seeded(tok) -> None:  # type: ignore[no-untyped-def]
    batch = _outcome_batch(tok)
    runs = []
    for _ in range(2):
        model = init_value_model(SHIPPED_POLICY)
        runs.append(train_value(model, batch, epochs=2, batch_size=2, log=None).losses)
    assert len(runs[0]) == 4  # 2 epochs × 2 batches
    assert runs[0] == runs[1]


def test_token_loss_reads_the_step_positions(tok) -> None:  # type: ignore[no-untyped-def]
    """value_loss on a token classifier is BCE at exactly the rows' positions (checked against a hand forward)."""
    model = init_value_model(SHIPPED_POLICY, token_level=True)
    with torch.no_grad():
        torch.manual_seed(1)
        model.score.weight.normal_(0, 0.5)  # a non-trivial head
        batch = _step_batch(tok)
        by_hand, n = 0.0, 0
        for row in batch:
            logits = model(input_ids=torch.tensor([row.ids])).logits[0, :, 0]
            for p, t in zip(row.positions, row.targets, strict=True):
                x = logits[p].item()
                by_hand += max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))  # stable BCE with logits
                n += 1
        assert value_loss(model, batch).item() == pytest.approx(by_hand / n, abs=1e-5)


def test_sequence_classifier_is_read_at_the_last_token_only(tok) -> None:  # type: ignore[no-untyped-def]
    model = init_value_model(SHIPPED_POLICY)
    with pytest.raises(ValueError, match="last token only"):
        value_loss(model, [ValueExample((1, 50, 51), (1,), (1.0,))])


def test_init_from_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot build a value model"):
        init_value_model(tmp_path / "nope")


def test_saved_model_loads_as_a_classifier_reward(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = init_value_model(SHIPPED_POLICY)
    batch = _outcome_batch(tok)
    train_value(model, batch, epochs=1, batch_size=4, warmup=1, lr=1e-3, log=None)
    folder = save_value_model(model, tok, tmp_path / "rm")
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 4_000_000  # bfloat16: about 2 bytes × 1.8M parameters
    rm = ClassifierReward(folder)
    p = generate_problems(1, 2, seed=5)[0]
    from treeward.rewards.base import Sample

    got = rm([Sample(prompt=p.prompt, response=solution_text(p))])[0]
    ids, _, _ = encode_pieces(tok, p.prompt, [solution_text(p)])
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    # the saved weights are bfloat16: the logit moves by rounding only
    assert got.components["logit"] == pytest.approx(want, abs=0.05)
    assert got.info["scored_tokens"] == len(ids)


# --- the outcome-RM data and the CLI -------------------------------------------------------------------------------


def test_sample_outcome_data_labels_with_the_exact_verifier() -> None:
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    problems = generate_problems(4, [1, 2, 3, 4], seed=3)
    data = sample_outcome_data(policy, problems, samples=3, seed=0)
    assert len(data) == 12  # 4 problems × 3 samples, problem by problem
    for k, (s, label) in enumerate(data):
        p = problems[k // 3]
        assert s.prompt == p.prompt and s.reference == p.answer and not s.partial
        assert label == (parse_answer(s.response) == p.answer)
    # seeded: the same call gives the same completions
    again = sample_outcome_data(policy, problems, samples=3, seed=0)
    assert [s.response for s, _ in again] == [s.response for s, _ in data]


def test_cli_builds_a_loadable_rm(tmp_path: Path) -> None:
    out = tmp_path / "rm"
    log = main(["--out", str(out), "--problems", "8", "--heldout", "12", "--samples", "2", "--epochs", "1"])
    written = json.loads((out / "training_log.json").read_text())
    assert written["heldout"] == log["heldout"]
    assert written["train"]["completions"] == 16 and written["heldout"]["completions"] == 24
    assert written["heldout"]["unscored"] == 0
    assert 0.0 <= written["heldout"]["accuracy"] <= 1.0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert "LlamaForSequenceClassification" in json.loads((out / "config.json").read_text())["architectures"]
    assert "auc_within_problem" in written["heldout"]
