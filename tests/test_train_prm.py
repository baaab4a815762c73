"""The learned PRM: rows from trees (by hand), training lowers the loss, the shipped PRM ranks right steps above
wrong ones, and ``treeward search --scorer prm`` runs end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from treeward import registry
from treeward._paths import SHIPPED_POLICY, SHIPPED_PRM, SHIPPED_RM
from treeward.rewards.base import Sample
from treeward.rewards.model import PRM_LABELS_KEY, EndogenousReward, ProcessRewardModel, encode_pieces
from treeward.rewards.process import MinStep
from treeward.tasks import ArithmeticSteps, generate_problems
from treeward.tasks.arithmetic import solution_text
from treeward.train.prm import (
    LABEL_TOKENS,
    PRMDataError,
    fit_prm,
    heldout_prompts,
    init_lm_prm,
    lm_prm_loss,
    lm_row,
    prm_data,
    sibling_pairs,
    training_problems,
)
from treeward.train.value import (
    RowPair,
    ValueExample,
    init_value_model,
    save_value_model,
    step_example,
    value_loss,
)
from treeward.tree import Problem, Tree

EOS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_tree() -> Tree:
    """Problem 54 → ×3 → −34 = 128. Ids are arbitrary small token ids; a step that ended at EOS carries it last.

    root ─ a "Step 1: 54*3=162"  ─ b "Step 2: 162-34=128" ─ T1 "Answer: 128"  (outcome 1)
         │                      │                       └ T2 "Answer: 127"  (outcome 0)
         │                      └ c "Step 2: 162-43=119" ─ T3 "Answer: 119"  (outcome 0)
         └ d "Step 1: 54+3=57"  ─ T4 ""  (EOS only, no answer, outcome 0)
                                └ e "Step 2: 57-34=23"  (open: nothing below it)
    """
    p = Problem(
        "hand", "Q: Ann has 54 cards.\n", "128", {"start": 54, "ops": [["*", 3], ["-", 34]], "n_steps": 2}
    )
    t = Tree.new(p, (1, 10, 11))
    a = t.add(0, text="Step 1: 54*3=162\n", token_ids=(20, 21), finish_reason="stop")
    b = t.add(a.id, text="Step 2: 162-34=128\n", token_ids=(22, 23), finish_reason="stop")
    t.add(b.id, text="Answer: 128", token_ids=(24, EOS), finish_reason="eos", terminal=True, outcome=1.0)
    t.add(b.id, text="Answer: 127", token_ids=(25, EOS), finish_reason="eos", terminal=True, outcome=0.0)
    c = t.add(a.id, text="Step 2: 162-43=119\n", token_ids=(26, 27), finish_reason="stop")
    t.add(c.id, text="Answer: 119", token_ids=(28, EOS), finish_reason="eos", terminal=True, outcome=0.0)
    d = t.add(0, text="Step 1: 54+3=57\n", token_ids=(29, 30), finish_reason="stop")
    t.add(d.id, text="", token_ids=(EOS,), finish_reason="eos", terminal=True, outcome=0.0)
    t.add(d.id, text="Step 2: 57-34=23\n", token_ids=(31,), finish_reason="stop")
    return t


def test_prm_data_mc_values_by_hand() -> None:
    rows = prm_data([hand_tree()])
    # Monte-Carlo values (mean outcome of the terminals below): T1 1, T2 0, T3 0, T4 0; b = (1+0)/2 = 1/2;
    # c = 0; a = (1+0+0)/3 = 1/3; d = 0 (only T4 below). e has no terminal below: no value, no row.
    # Rows in terminal-id order T1 (3), T2 (4), T3 (6), T4 (8); T4 is EOS only: its step is dropped, d stays.
    assert [r.node_ids for r in rows] == [(1, 2, 3), (1, 2, 4), (1, 5, 6), (7,)]
    assert [r.values for r in rows] == [(1 / 3, 0.5, 1.0), (1 / 3, 0.5, 0.0), (1 / 3, 0.0, 0.0), (0.0,)]
    # labels: value >= 0.5
    assert [r.labels for r in rows] == [(False, True, True), (False, True, False), (False,) * 3, (False,)]
    # the EOS id leaves the last step (the scorer reads the step's text, which never had it); others untouched
    assert rows[0].step_ids == ((20, 21), (22, 23), (24,))
    assert rows[2].step_ids == ((20, 21), (26, 27), (28,))
    assert rows[3].step_ids == ((29, 30),) and rows[3].steps == ("Step 1: 54+3=57\n",)
    assert rows[3].metadata["dropped_empty_step"] == 8
    assert all(r.prompt_ids == (1, 10, 11) for r in rows)
    # the training row reads the head at each step's last token: prompt 3 tokens, steps of 2, 2, 1 tokens
    assert step_example(rows[0]).positions == (4, 6, 7)


def test_prm_data_rest_values_and_threshold_by_hand() -> None:
    rows = prm_data([hand_tree()], values="rest", threshold=0.6)
    # ReST-MCTS*: distances to the correct terminal T1: a 2, b 1, T1 0 (root 3).
    # v_a = 0 + 1/3 = 1/3;  v_b = 1/3 + (2/3)/2 = 2/3;  v_T1 = 2/3 + (1/3)/1 = 1.
    # off-path: T2 under b (m=1): 2/3 − (1/3)/2 = 1/2;  c under a (m=2): 1/3 − (2/3)/3 = 1/9;
    # T3 under c (m=2): max(1/9 − (8/9)/3, 0) = 0;  d under the root (m=3): max(0 − 1/4, 0) = 0.
    want = [(1 / 3, 2 / 3, 1.0), (1 / 3, 2 / 3, 0.5), (1 / 3, 1 / 9, 0.0), (0.0,)]
    for r, w in zip(rows, want, strict=True):
        assert r.values == pytest.approx(w)
    # labels at threshold 0.6: only b's 2/3 and T1's 1 pass
    assert [r.labels for r in rows] == [(False, True, True), (False, True, False), (False,) * 3, (False,)]


def test_prm_data_hard_values_by_hand() -> None:
    rows = prm_data([hand_tree()], values="hard")
    # Math-Shepherd's hard estimate: 1 when any terminal below is correct. Only T1 is: a, b, T1 get 1;
    # T2, c, T3, d (and the dropped T4) get 0.
    assert [r.values for r in rows] == [(1.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0,)]


def test_prm_data_rejects_bad_knobs() -> None:
    with pytest.raises(PRMDataError, match="values must be"):
        prm_data([hand_tree()], values="soft")
    with pytest.raises(PRMDataError, match="threshold"):
        prm_data([hand_tree()], threshold=1.5)


def test_training_problems_avoid_the_heldout_set() -> None:
    banned = heldout_prompts()
    # the CLI's and the benchmarks' held-out 4-step problems are in it
    assert {p.prompt for p in generate_problems(50, 4, seed=1)} <= banned
    probs = training_problems(40)
    assert len(probs) == 40 and len({p.prompt for p in probs}) == 40
    assert not {p.prompt for p in probs} & banned
    assert [p.metadata["n_steps"] for p in probs[:4]] == [1, 2, 3, 4]
    assert [p.id for p in training_problems(40)] == [p.id for p in probs]  # seeded


def test_rows_from_real_trees_match_the_scorer_input() -> None:
    """What the PRM trains on is exactly what ProcessRewardModel feeds it at search time (same ids, same reads)."""
    from transformers import AutoTokenizer

    from treeward.engine.hf import HFPolicy
    from treeward.search.core import grade
    from treeward.search.rollouts import tree_rollouts
    from treeward.tasks import ArithmeticAnswer

    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    trees = tree_rollouts(training_problems(3, seed=5)[1:], policy, leaves=4, seed=0)
    grade(trees, ArithmeticAnswer())
    rows = prm_data(trees)
    assert rows
    tok = AutoTokenizer.from_pretrained(SHIPPED_POLICY)
    for r in rows:
        ids, _prompt_len, lengths = encode_pieces(tok, r.prompt, r.steps)
        assert tuple(ids) == (*r.prompt_ids, *(t for s in r.step_ids for t in s))
        assert lengths == [len(s) for s in r.step_ids]
        assert EOS not in ids


def test_fit_prm_lowers_the_loss_on_a_fixed_batch() -> None:
    rows = prm_data([hand_tree()])
    batch = [step_example(r) for r in rows]
    model, run = fit_prm(SHIPPED_POLICY, rows, epochs=12, batch_size=4, lr=1e-3, log=None)
    # a zero head predicts 0.5 everywhere: the first loss is exactly ln 2
    assert run.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert run.steps == 12 and run.examples == 4
    with torch.no_grad():
        after = value_loss(model, batch).item()
    assert after < 0.9 * math.log(2)
    # a model passed in is trained further in place
    again, _ = fit_prm(model, rows, epochs=4, batch_size=4, log=None)
    assert again is model
    with torch.no_grad():
        assert value_loss(model, batch).item() < after


def test_fit_prm_rejects_what_it_cannot_train() -> None:
    with pytest.raises(PRMDataError, match="no PRM examples"):
        fit_prm(SHIPPED_POLICY, [], log=None)
    seq = init_value_model(SHIPPED_POLICY, token_level=False)
    with pytest.raises(PRMDataError, match="is not a PRM"):
        fit_prm(seq, prm_data([hand_tree()]), log=None)


# --- the LM-head PRM (Math-Shepherd's design) ------------------------------------------------------------------


def test_lm_rows_carry_an_lm_loss_only_on_outcome_correct_paths() -> None:
    rows = prm_data([hand_tree()], values="hard")
    lm = [lm_row(r) for r in rows]
    # only T1's path (outcome 1) is a correct solution: its steps (from the prompt's end, 3 prompt ids) get the
    # LM loss; T2, T3 and T4 (outcome 0) none. Label positions and targets are step_example's.
    assert [e.lm_start for e in lm] == [3, None, None, None]
    assert [(e.positions, e.targets) for e in lm] == [
        (step_example(r).positions, step_example(r).targets) for r in rows
    ]


def test_init_lm_prm_names_zeroed_label_tokens() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED_POLICY)
    model = init_lm_prm(SHIPPED_POLICY)
    good, bad = (tok.encode(t, add_special_tokens=False)[0] for t in LABEL_TOKENS)
    assert model.config.to_dict()[PRM_LABELS_KEY] == [good, bad]
    # both output rows are zero: logit[good] − logit[bad] = 0 everywhere, every first score σ(0) = 0.5
    ids = torch.tensor([tok.encode("Q: Ann has 5 cards.\nStep 1: 5+1=6\n")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    assert torch.equal(logits[:, good], logits[:, bad])
    with pytest.raises(PRMDataError, match="one token each"):
        init_lm_prm(SHIPPED_POLICY, labels=("good", "bad"))
    with pytest.raises(PRMDataError, match="one token each"):
        init_lm_prm(SHIPPED_POLICY, labels=("Y", "Y"))


def test_lm_prm_loss_is_label_bce_plus_lm_cross_entropy() -> None:
    """The loss of one row by hand: BCE at the read positions plus the mean next-token CE of the LM tokens."""
    model = init_lm_prm(SHIPPED_POLICY)
    good, bad = model.config.to_dict()[PRM_LABELS_KEY]
    ids = (1, 40, 41, 42, 43, 44, 45)
    row = ValueExample(ids, (4, 6), (1.0, 0.0), lm_start=4)
    with torch.no_grad():
        model.lm_head.weight[good] += 0.01 * torch.arange(
            192, dtype=torch.float32
        )  # a non-trivial label logit
        got = lm_prm_loss(model, [row], labels=(good, bad), lm_weight=0.5).item()
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    d = logits[:, good] - logits[:, bad]
    # BCE: target 1 at position 4 → −log σ(d4); target 0 at position 6 → −log(1 − σ(d6)); mean over 2 positions
    # (−log σ(x) = log(1 + e^−x), −log(1 − σ(x)) = log(1 + e^x), in double precision)
    bce = (math.log1p(math.exp(-d[4].item())) + math.log1p(math.exp(d[6].item()))) / 2
    # LM: tokens 4, 5, 6 (ids 43, 44, 45), each predicted at the position before: mean of −log p
    logp = torch.log_softmax(logits, -1)
    ce = -(logp[3, 43] + logp[4, 44] + logp[5, 45]).item() / 3
    assert got == pytest.approx(bce + 0.5 * ce, rel=1e-5)
    # no LM tokens in the batch: the label BCE alone
    plain = ValueExample(ids, (4, 6), (1.0, 0.0))
    with torch.no_grad():
        assert lm_prm_loss(model, [plain], labels=(good, bad)).item() == pytest.approx(bce, rel=1e-5)


def test_fit_lm_prm_lowers_the_loss_and_loads_as_a_prm(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    rows = prm_data([hand_tree()], values="hard")
    model, run = fit_prm(
        SHIPPED_POLICY, rows, head="lm", lm_weight=0.0, epochs=12, batch_size=4, lr=1e-3, log=None
    )
    # zeroed label rows predict 0.5 everywhere and the LM loss is off: the first loss is exactly ln 2
    assert run.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert run.steps == 12 and sum(run.losses[-3:]) < 0.9 * math.log(2) * 3
    # a model passed in is trained further in place, with its own (LM) head
    again, more = fit_prm(model, rows, lm_weight=0.0, epochs=2, batch_size=4, log=None)
    assert again is model and more.losses[0] < run.losses[0]
    save_value_model(model, AutoTokenizer.from_pretrained(SHIPPED_POLICY), tmp_path / "lm-prm")
    # the saved folder (bfloat16 weights) loads as an LM-head PRM with the same label tokens
    prm = ProcessRewardModel(tmp_path / "lm-prm")
    assert prm.head == "lm"
    loaded = prm.load()[0].config.to_dict()[PRM_LABELS_KEY]
    assert loaded == model.config.to_dict()[PRM_LABELS_KEY]


def test_fit_lm_prm_rejects_label_tokens_the_solutions_use() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED_POLICY)
    rows = prm_data([hand_tree()], values="hard")
    y = tok.encode("Y", add_special_tokens=False)[0]
    clash = [replace(rows[0], step_ids=((*rows[0].step_ids[0], y), *rows[0].step_ids[1:]))]
    with pytest.raises(PRMDataError, match="label token"):
        fit_prm(SHIPPED_POLICY, clash, head="lm", log=None)
    with pytest.raises(PRMDataError, match='head must be "token"'):
        fit_prm(SHIPPED_POLICY, rows, head="tag", log=None)


def test_sibling_pairs_by_hand() -> None:
    pairs = sibling_pairs([hand_tree()])
    # hard values: a 1, d 0 (root's children); b 1, c 0 (a's); T1 1, T2 0 (b's); d's children T4 (0) and e
    # (no terminal below: no value) make no pair. Sides are the shared prefix plus one step, read at its last
    # token; the terminals' EOS is dropped (T1 (24, EOS) → (24,)).
    assert [(p.better.ids, p.worse.ids) for p in pairs] == [
        ((1, 10, 11, 20, 21), (1, 10, 11, 29, 30)),
        ((1, 10, 11, 20, 21, 22, 23), (1, 10, 11, 20, 21, 26, 27)),
        ((1, 10, 11, 20, 21, 22, 23, 24), (1, 10, 11, 20, 21, 22, 23, 25)),
    ]
    assert all(p.better.positions == (len(p.better.ids) - 1,) for p in pairs)
    assert [(p.better.targets, p.worse.targets) for p in pairs] == [((1.0,), (0.0,))] * 3


def test_lm_prm_loss_ranks_a_pair_bradley_terry() -> None:
    model = init_lm_prm(SHIPPED_POLICY)
    good, bad = model.config.to_dict()[PRM_LABELS_KEY]
    better = ValueExample((1, 40, 41, 42), (3,), (1.0,))
    worse = ValueExample((1, 40, 41, 43, 44), (4,), (0.0,))
    with torch.no_grad():
        model.lm_head.weight[good] += 0.001 * torch.arange(192, dtype=torch.float32)
        got = lm_prm_loss(model, [RowPair(better, worse)], labels=(good, bad), pair_weight=2.0).item()
        a = model(input_ids=torch.tensor([better.ids])).logits[0, 3]
        b = model(input_ids=torch.tensor([worse.ids])).logits[0, 4]
    margin = (a[good] - a[bad] - (b[good] - b[bad])).item()
    # 2 × −log σ(margin) = 2 × log(1 + e^−margin); no rows in the batch: no BCE, no LM term
    assert got == pytest.approx(2 * math.log1p(math.exp(-margin)), rel=1e-5)
    with pytest.raises(PRMDataError, match="LM-head PRM only"):
        fit_prm(SHIPPED_POLICY, prm_data([hand_tree()]), pairs=[RowPair(better, worse)], log=None)


# --- the shipped PRM -------------------------------------------------------------------------------------------


def _wrong(step: str) -> str:
    """``Step i: a op b=c`` with the result off by 7 (an arithmetic slip the verifier rejects)."""
    head, _, result = step.rpartition("=")
    return f"{head}={int(result) + 7}"


@pytest.mark.xfail(
    strict=True,
    reason="known shortfall (issue 5): the shipped PRM, trained on ~11k Monte-Carlo-labelled paths, has not learned "
    "to check a step's arithmetic; its step scores track the question and the depth, not the step (held-out step "
    "AUC 0.72; right and wrong siblings differ by ~0.001)",
)
def test_shipped_prm_ranks_right_steps_above_wrong_ones() -> None:
    prm = ProcessRewardModel(SHIPPED_PRM)
    problems = generate_problems(6, [2, 3, 4], seed=1)  # held out from the PRM's training problems
    right, wrong = [], []
    for p in problems:
        lines = [line + "\n" for line in solution_text(p).split("\n")]
        bad = [lines[0], _wrong(lines[1].rstrip("\n")) + "\n", *lines[2:]]
        # the exact verifier agrees: step 2 of `bad` is wrong, every step of `lines` is right
        assert ArithmeticSteps()([Sample(p.prompt, "".join(bad), steps=tuple(bad), metadata=p.metadata)])[
            0
        ].step_scores == (1.0, 0.0, *([1.0] * (len(lines) - 2)))
        right.append(Sample(p.prompt, "".join(lines), steps=tuple(lines), metadata=p.metadata))
        wrong.append(Sample(p.prompt, "".join(bad), steps=tuple(bad), metadata=p.metadata))
    good, bad_results = prm(right), prm(wrong)
    for g, b in zip(good, bad_results, strict=True):
        assert g.step_scores is not None and b.step_scores is not None
        # step 1 is the same text in both: the same score (causal model)
        assert g.step_scores[0] == pytest.approx(b.step_scores[0], abs=1e-5)
        # the right step 2 scores above the wrong one, and the path score (min over steps) follows
        assert g.step_scores[1] > b.step_scores[1]
        assert g.score is not None and b.score is not None and g.score > b.score


def test_shipped_prm_is_an_lm_head_folder() -> None:
    """The shipped PRM is Math-Shepherd's LM-head design: a causal LM naming two label tokens, trained by
    ``python -m treeward.train.prm`` on hard Monte-Carlo labels with an LM loss on outcome-correct paths."""
    from transformers import AutoTokenizer

    cfg = json.loads((SHIPPED_PRM / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(SHIPPED_PRM)
    assert cfg[PRM_LABELS_KEY] == [tok.encode(t, add_special_tokens=False)[0] for t in LABEL_TOKENS]
    assert ProcessRewardModel(SHIPPED_PRM).head == "lm"
    log = json.loads((SHIPPED_PRM / "training_log.json").read_text())
    assert log["args"]["head"] == "lm" and log["args"]["values"] == "hard"
    assert log["train"]["loss_last10"] < log["train"]["loss_first"]


# --- as a search scorer ----------------------------------------------------------------------------------------


def test_registry_scorers() -> None:
    assert isinstance(registry.scorer("steps"), ArithmeticSteps)
    prm = registry.scorer("prm")
    assert isinstance(prm, ProcessRewardModel) and Path(prm.path) == SHIPPED_PRM
    endo = registry.scorer("endogenous")
    assert isinstance(endo, EndogenousReward) and isinstance(endo.reduce, MinStep)
    with pytest.raises(registry.KnobError, match="unknown scorer 'rm'; choose from steps, prm, endogenous"):
        registry.scorer("rm")


CMD = [sys.executable, "-m", "treeward.cli"]


def test_search_with_the_learned_prm_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(
        [
            *CMD,
            "search",
            "--scorer",
            "prm",
            "--algorithm",
            "beam",
            "--n-problems",
            "2",
            "--budget",
            "600",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scorer"] == "learned_prm" and summary["n_problems"] == 2
    # the PRM ran: its tokens are booked as scorer tokens, and it wrote a score on the scored nodes
    assert summary["scored_tokens"] > 0
    from treeward.tree import read_jsonl

    trees = read_jsonl(out / "trees.jsonl")
    assert len(trees) == 2 and all(t.generated_tokens <= 600 for t in trees)
    scored = [n for t in trees for n in t.nodes[1:] if n.value is not None]
    assert scored and all(0.0 <= n.value <= 1.0 for n in scored if n.value is not None)


def test_unknown_scorer_is_one_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [*CMD, "search", "--scorer", "oracle", "--n-problems", "1", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown scorer 'oracle'" in r.stderr
    assert SHIPPED_RM.exists()  # unrelated assets untouched
