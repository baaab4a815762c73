"""Exports: rows for TRL (PRM, DPO, reward, SFT) and verl, loaded through the real consumers where they exist
(TRL 1.16's DPOTrainer / RewardTrainer / SFTTrainer dataset preparation and one training step on the shipped
model; datasets' JSON and parquet loaders), and JSONL / parquet round trips."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.test_credit_values import build
from treeward import SHIPPED_POLICY
from treeward.credit.exports import (
    dpo_rows,
    prm_rows,
    reward_rows,
    sft_rows,
    verl_rows,
    write_rows_jsonl,
    write_rows_parquet,
)
from treeward.credit.pairs import sft_examples, step_pairs, tree_pairs
from treeward.credit.values import CreditError, mc_hard_values, mc_values, step_examples
from treeward.engine.hf import HFPolicy
from treeward.search import best_of_n
from treeward.search.core import grade
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tree import Problem, Tree

# root(0) ─┬─ 1 "Step 1: 2+2=4\n" ─┬─ 3 "Answer: 4"  terminal, outcome 1
#          │                       └─ 4 "Answer: 5"  terminal, outcome 0
#          └─ 2 "Step 1: 2+2=5\n" ─── 5 "Answer: 5"  terminal, outcome 0
SPEC = [
    (0, "Step 1: 2+2=4\n", False, None),
    (0, "Step 1: 2+2=5\n", False, None),
    (1, "Answer: 4", True, 1.0),
    (1, "Answer: 5", True, 0.0),
    (2, "Answer: 5", True, 0.0),
]


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped(one_thread):  # type: ignore[no-untyped-def]
    """Real trees from the shipped model: best-of-8 on 4-step problems (greedy gets ~37 %), graded exactly."""
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    problems = generate_problems(3, 4, seed=21)
    trees = best_of_n(problems, policy, ArithmeticSteps(), 8 * 128, n=8, seed=5)
    grade(trees, ArithmeticAnswer())
    return policy.tokenizer, trees


def _load_json(path: Path, cache: Path) -> list[dict]:  # type: ignore[type-arg]
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache)).to_list()


# ---------------------------------------------------------------------- PRM rows
def test_prm_rows_hard_labels_with_soft_side_column(tmp_path: Path) -> None:
    import datasets

    tree = build(SPEC)
    se, he = mc_values(tree), mc_hard_values(tree)
    rows = prm_rows(step_examples(tree, se.values, label_values=he.values, threshold=1.0))
    # paths: [1, 3], [1, 4], [2, 5]. SE: node 1 = (1 + 0)/2 = 0.5, node 2 = 0; HE: node 1 = 1 (3 is right), node 2 = 0
    assert [r["labels"] for r in rows] == [[True, True], [True, False], [False, False]]
    assert [r["values"] for r in rows] == [[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]]
    # the trailing separator is removed (TRL appends step_separator to each step), nothing else
    assert rows[0]["completions"] == ["Step 1: 2+2=4", "Answer: 4"]
    assert rows[0]["completion_ids"] == [list(map(ord, "Step 1: 2+2=4\n")), list(map(ord, "Answer: 4"))]
    assert rows[0]["prompt"] == "Q\n" and rows[0]["prompt_ids"] == [1, *map(ord, "Q\n")]
    # the stepwise-supervision schema TRL's PRM trainer read: string prompt, list of strings, list of bools
    ds = datasets.Dataset.from_list(rows)
    assert ds.features["labels"].feature.dtype == "bool"
    assert ds.features["completions"].feature.dtype == "string"
    assert ds.features["values"].feature.dtype == "float64"
    write_rows_jsonl(rows, tmp_path / "prm.jsonl")
    assert _load_json(tmp_path / "prm.jsonl", tmp_path / "cache") == rows
    write_rows_parquet(rows, tmp_path / "prm.parquet")
    assert pq.read_table(tmp_path / "prm.parquet").to_pylist() == rows


def test_prm_rows_refuse_a_separator_inside_a_step() -> None:
    tree = build([(0, "a\nb\n", True, 1.0)])
    ex = step_examples(tree, mc_values(tree).values, threshold=0.5)
    with pytest.raises(CreditError, match=r"step 0: 'a\\nb\\n' contains the step separator"):
        prm_rows(ex)
    assert prm_rows(ex, step_separator="\n\n")[0]["completions"] == ["a\nb\n"]  # another separator is fine


# ---------------------------------------------------------------------- DPO rows
def test_dpo_rows_refuse_intermediate_steps() -> None:
    tree = build(SPEC)
    values = mc_values(tree).values
    steps = step_pairs(tree, values)  # root: step 1 (0.5) over step 2 (0.0), two intermediate steps
    with pytest.raises(CreditError, match=r"intermediate step.*complete=True"):
        dpo_rows(steps)
    assert len(dpo_rows(steps, drop_intermediate=True)) == 1  # only the terminal pair under node 1 survives
    rows = dpo_rows(step_pairs(tree, values, complete=True))
    # completed: step 1 continues to its best answer (4, value 1), step 2 to its only one
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (
        "Step 1: 2+2=4\nAnswer: 4",
        "Step 1: 2+2=5\nAnswer: 5",
    )
    assert rows[0]["prompt"] == "Q\n" and rows[0]["margin"] == 0.5


def test_trl_appends_eos_after_an_intermediate_step(shipped) -> None:  # type: ignore[no-untyped-def]
    """The hazard dpo_rows guards against, shown on TRL's own code path: a standard-format intermediate step gets
    the EOS token right after it."""
    tok, _ = shipped
    row = {"prompt": "<bos>Q: ?\n", "chosen": "Step 1: 2+2=4\n", "rejected": "Step 1: 2+2=5\n"}
    trainer = _dpo_trainer(tok, [row])
    chosen = trainer.train_dataset[0]["chosen_ids"]
    assert chosen[-1] == tok.eos_token_id and tok.decode(chosen[:-1]) == "Step 1: 2+2=4\n"


def _dpo_trainer(tok, rows):  # type: ignore[no-untyped-def]
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=1,
        per_device_train_batch_size=min(4, len(rows)),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_POLICY)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)


def test_dpo_rows_through_trl_reproduce_the_tree_ids(shipped) -> None:  # type: ignore[no-untyped-def]
    tok, trees = shipped
    pairs = [p for t in trees for p in step_pairs(t, mc_values(t).values, complete=True)]
    pairs += [p for t in trees for p in tree_pairs(t)]
    assert pairs, "the search trees should hold both right and wrong answers"
    rows = dpo_rows(pairs, prompt_prefix=tok.bos_token)
    trainer = _dpo_trainer(tok, rows)
    eos = tok.eos_token_id
    for ours, theirs in zip(rows, trainer.train_dataset, strict=True):
        # TRL re-tokenises prompt and prompt + side and appends EOS; with the BOS text prepended, that reproduces
        # the tree's ids exactly (the EOS the policy emitted is already there; a side that ended on an answer line
        # without one gets it, which is right: the response ends there)
        assert theirs["prompt_ids"] == ours["prompt_ids"]
        for side in ("chosen_ids", "rejected_ids"):
            expected = ours[side] if ours[side][-1] == eos else [*ours[side], eos]
            assert theirs[side] == expected
            assert theirs[side].count(eos) == 1  # one EOS, at the very end: nothing teaches stopping mid-way
    loss = trainer.train().training_loss
    assert math.isfinite(loss)


# ---------------------------------------------------------------------- reward rows
def test_reward_rows_through_trl_keep_ids_and_margin(shipped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok, trees = shipped
    # intermediate step pairs (a reward model scores prefixes) and whole-response pairs
    pairs = [p for t in trees for p in step_pairs(t, mc_values(t).values, per_node=None)]
    pairs += [p for t in trees for p in tree_pairs(t)]
    rows = reward_rows(pairs)
    assert len(rows) >= 2 and all(r["margin"] > 0 for r in rows)
    first = pairs[0]
    assert rows[0]["chosen_ids"] == [*first.prompt_ids, *first.chosen_ids]
    model = AutoModelForSequenceClassification.from_pretrained(SHIPPED_POLICY, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=min(4, len(rows)),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    # TRL saw chosen_ids / rejected_ids and used them as they are: no re-tokenisation, no EOS appended
    assert trainer.train_dataset["chosen_ids"] == [r["chosen_ids"] for r in rows]
    assert trainer.train_dataset["rejected_ids"] == [r["rejected_ids"] for r in rows]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([dict(r) for r in rows[:2]])
    assert batch["margin"].tolist() == pytest.approx([r["margin"] for r in rows[:2]])
    assert math.isfinite(trainer.train().training_loss)
    write_rows_jsonl(rows, tmp_path / "rm.jsonl")
    assert _load_json(tmp_path / "rm.jsonl", tmp_path / "cache") == rows


# ---------------------------------------------------------------------- SFT rows
def test_sft_rows_through_trl_train_on_the_tree_ids(shipped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, trees = shipped
    examples = [e for t in trees for e in sft_examples(t)]
    assert examples, "some sampled solution should be right"
    rows = sft_rows(examples)
    for r, t in zip(
        rows, (next(t for t in trees if t.problem.id == e.problem_id) for e in examples), strict=True
    ):
        assert r["input_ids"] == t.prefix_ids(r["node_id"])
        assert r["completion_mask"] == [0] * len(r["prompt_ids"]) + [1] * len(r["completion_ids"])
    from transformers import AutoModelForCausalLM

    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=min(4, len(rows)),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_POLICY)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    prepared = trainer.train_dataset[0]
    # TRL kept our ids and masked the prompt out of the loss (labels -100 on it)
    assert prepared["input_ids"] == rows[0]["input_ids"]
    n_prompt = len(rows[0]["prompt_ids"])
    assert prepared["labels"][:n_prompt] == [-100] * n_prompt
    assert prepared["labels"][n_prompt:] == rows[0]["completion_ids"]
    assert math.isfinite(trainer.train().training_loss)
    write_rows_parquet(rows, tmp_path / "sft.parquet")
    assert pq.read_table(tmp_path / "sft.parquet").to_pylist() == rows


# ---------------------------------------------------------------------- verl rows
def test_verl_rows_parquet_as_verl_loads_it(shipped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import datasets

    _, trees = shipped
    rows = verl_rows(trees, data_source="treeward/arithmetic")
    assert rows[0]["prompt"] == [{"role": "user", "content": trees[0].problem.prompt}]
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": trees[0].problem.answer}
    assert rows[1]["extra_info"]["index"] == 1 and rows[0]["extra_info"]["prompt_ids"] == list(
        trees[0].root.token_ids
    )
    write_rows_parquet(rows, tmp_path / "train.parquet")
    # verl's RLHFDataset reads parquet with datasets
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "train.parquet"), split="train", cache_dir=str(tmp_path / "c")
    )
    assert ds.to_list() == rows
    assert set(ds.column_names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    write_rows_jsonl(rows, tmp_path / "train.jsonl")
    assert _load_json(tmp_path / "train.jsonl", tmp_path / "cache") == rows
    no_answer = build(SPEC)
    no_answer.problem = Problem(id="x", prompt="Q\n")
    with pytest.raises(CreditError, match="no reference answer"):
        verl_rows([no_answer])


# ---------------------------------------------------------------------- writers
def test_writers_fail_whole_and_leave_existing_files(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    assert write_rows_jsonl([{"a": 1}], path) == 1
    with pytest.raises(CreditError, match="row 1 cannot be written as JSON"):
        write_rows_jsonl([{"a": 2}, {"a": math.nan}], path)
    assert path.read_text() == '{"a": 1}\n'  # the old file is untouched
    with pytest.raises(CreditError, match="no rows"):
        write_rows_parquet([], tmp_path / "x.parquet")
    with pytest.raises(CreditError, match="row 1 has columns"):
        write_rows_parquet([{"a": 1}, {"b": 2}], tmp_path / "x.parquet")
    with pytest.raises(CreditError, match="one parquet table"):
        write_rows_parquet([{"a": 1}, {"a": "text"}], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_rows_keep_tree_ids_for_every_kind() -> None:
    tree: Tree = build(SPEC)
    values = mc_values(tree).values
    pair = tree_pairs(tree)[
        0
    ]  # answer 4 (under step 1) over answer 5 (under step 2): common prefix = the prompt
    (dpo,) = dpo_rows([pair])
    assert dpo["prompt_ids"] + dpo["chosen_ids"] == tree.prefix_ids(3)
    (rm,) = reward_rows([pair])
    assert rm["chosen_ids"] == tree.prefix_ids(3) and rm["rejected_ids"] == tree.prefix_ids(5)
    (sft,) = sft_rows(sft_examples(tree, values))
    assert sft["input_ids"] == tree.prefix_ids(3)
