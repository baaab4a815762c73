"""Exports: credit records as the rows TRL and verl read, and writers for them (JSONL, parquet).

Row builders are pure (records in, ``list[dict]`` out, JSON-serialisable); only :func:`write_rows_jsonl` and
:func:`write_rows_parquet` touch files. Every row keeps the tree's token ids next to the text:

==================  =========================================================================================
:func:`prm_rows`    TRL stepwise supervision (``prompt``, ``completions`` [S], ``labels`` [S] bools) + ``values``
                    [S] soft targets, ``prompt_ids``, ``completion_ids`` [S][L]. TRL casts labels to int, so soft
                    values live only in the side column. (TRL removed its PRM trainer after 1.13, trl#7133.)
:func:`dpo_rows`    TRL DPOTrainer (``prompt``, ``chosen``, ``rejected``) + ``prompt_ids``, ``chosen_ids``,
                    ``rejected_ids`` (TRL's own column names; its DPO path re-tokenises the text and overwrites them)
:func:`reward_rows` TRL RewardTrainer (``prompt``, ``chosen``, ``rejected``, ``margin``) + ``chosen_ids`` /
                    ``rejected_ids`` = prompt + side ids; with these columns present TRL uses them as they are
:func:`sft_rows`    TRL SFTTrainer prompt-completion (``prompt``, ``completion``) + ``input_ids`` and
                    ``completion_mask``, which TRL uses as they are, and ``prompt_ids`` / ``completion_ids``
:func:`verl_rows`   verl RL prompts (``data_source``, ``prompt`` messages, ``ability``, ``reward_model`` {style,
                    ground_truth}, ``extra_info`` {split, index, problem_id, prompt_ids})
==================  =========================================================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from treeward.credit.records import PreferencePair, SFTExample, StepExample
from treeward.credit.values import CreditError
from treeward.tree import Tree

__all__ = [
    "dpo_rows",
    "prm_rows",
    "reward_rows",
    "sft_rows",
    "verl_rows",
    "write_rows_jsonl",
    "write_rows_parquet",
]

Row = dict[str, Any]


# ---------------------------------------------------------------------- PRM (stepwise supervision)
def prm_rows(examples: Sequence[StepExample], *, step_separator: str = "\n") -> list[Row]:
    """TRL stepwise-supervision rows, one per :class:`~treeward.credit.records.StepExample`.

    TRL's PRM trainer (``trl.experimental.prm``, TRL ≤ 1.13; removed since, trl#7133) tokenises each step on its own, appends
    ``step_separator`` and puts the step's label on the separator's last token, and casts labels with ``int()``
    (a soft 0.625 would become 0). So: ``completions`` are the steps with their one trailing ``step_separator``
    removed (the trainer puts it back: text round-trips), ``labels`` the hard bools, and the soft targets go in a
    ``values`` side column for soft-label / regression trainers. A step that still contains the separator would be
    split wrongly at inference and is an error (pick another separator). Side columns: ``problem_id``,
    ``node_ids``, ``prompt_ids`` [P], ``completion_ids`` [S][L] (each step's ids as the tree holds them, the
    separator token included).
    """
    if not step_separator:
        raise CreditError("step_separator must be a non-empty string")
    rows = []
    for i, ex in enumerate(examples):
        steps = []
        for j, step in enumerate(ex.steps):
            text = step.removesuffix(step_separator)
            if step_separator in text:
                raise CreditError(
                    f"example {i} ({ex.problem_id!r}), step {j}: {step!r} contains the step separator "
                    f"{step_separator!r} before its end; choose a separator the steps do not contain"
                )
            steps.append(text)
        rows.append(
            {
                "prompt": ex.prompt,
                "completions": steps,
                "labels": [bool(b) for b in ex.labels],
                "values": [float(v) for v in ex.values],
                "problem_id": ex.problem_id,
                "node_ids": list(ex.node_ids),
                "prompt_ids": list(ex.prompt_ids),
                "completion_ids": [list(s) for s in ex.step_ids],
            }
        )
    return rows


# ---------------------------------------------------------------------- preference rows
def _terminal_flags(i: int, pair: PreferencePair) -> tuple[bool, bool]:
    meta = pair.metadata
    if "chosen_terminal" not in meta or "rejected_terminal" not in meta:
        raise CreditError(
            f"pair {i} ({pair.problem_id!r}) has no chosen_terminal / rejected_terminal in its metadata; build pairs "
            "with treeward.credit.pairs, or set both flags (does the side end the response?)"
        )
    return bool(meta["chosen_terminal"]), bool(meta["rejected_terminal"])


def dpo_rows(
    pairs: Sequence[PreferencePair], *, prompt_prefix: str = "", drop_intermediate: bool = False
) -> list[Row]:
    """TRL DPOTrainer rows (standard format, explicit prompt): ``prompt`` = ``prompt_prefix`` + the shared prefix,
    ``chosen`` / ``rejected`` = the two sides; side columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (tree
    ids), ``margin``, ``problem_id``, ``chosen_node``, ``rejected_node``, ``kind``.

    TRL's DPO path (1.16: ``DPOTrainer._prepare_dataset``) appends the EOS token to every standard-format
    ``chosen`` / ``rejected`` text that lacks it, then tokenises ``prompt`` and ``prompt + side`` itself. A side that
    is an intermediate step would then teach the model to stop after that step. So every side must end a response
    (``metadata["chosen_terminal"]`` and ``["rejected_terminal"]``): build step pairs with
    ``step_pairs(..., complete=True)`` (each side continued to a terminal) or use :func:`tree_pairs`. A pair with an
    intermediate side is an error, or skipped with ``drop_intermediate=True``. (treeward's own DPO loop reads the
    records' token ids and needs none of this.)

    ``prompt_prefix`` is prepended to each prompt: pass the tokenizer's BOS text (``"<bos>"`` for the shipped
    model) when the policy was prompted with a BOS its tokenizer does not add by itself, so that TRL's
    re-tokenisation reproduces the tree's ids (TRL overwrites the id columns with its own tokenisation).
    """
    rows = []
    for i, p in enumerate(pairs):
        chosen_end, rejected_end = _terminal_flags(i, p)
        if not (chosen_end and rejected_end):
            if drop_intermediate:
                continue
            raise CreditError(
                f"pair {i} ({p.problem_id!r}, nodes {p.chosen_node}/{p.rejected_node}) has a side that stops at an "
                "intermediate step; TRL's DPOTrainer appends EOS to it and would teach the model to stop there. "
                "Use step_pairs(..., complete=True), or pass drop_intermediate=True to skip such pairs"
            )
        rows.append(
            {
                "prompt": prompt_prefix + p.prompt,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "prompt_ids": list(p.prompt_ids),
                "chosen_ids": list(p.chosen_ids),
                "rejected_ids": list(p.rejected_ids),
                "margin": float(p.margin),
                "problem_id": p.problem_id,
                "chosen_node": p.chosen_node,
                "rejected_node": p.rejected_node,
                "kind": str(p.metadata.get("kind", "")),
            }
        )
    return rows


def reward_rows(pairs: Sequence[PreferencePair]) -> list[Row]:
    """TRL RewardTrainer rows with a ``margin`` column (its loss is ``-log σ(r_chosen - r_rejected - margin)``):
    ``prompt``, ``chosen``, ``rejected``, ``margin`` (the pair's value or outcome gap), and the token ids
    ``chosen_ids`` = prompt + chosen ids, ``rejected_ids`` = prompt + rejected ids (RewardTrainer's convention:
    whole sequences). When those two columns are present TRL 1.16 skips its own tokenisation and EOS appending
    and scores the tree's ids as they are, so intermediate steps are fine here (a reward model scores prefixes).
    Side columns: ``prompt_ids``, ``problem_id``, ``chosen_node``, ``rejected_node``, ``kind``.
    """
    return [
        {
            "prompt": p.prompt,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "margin": float(p.margin),
            "chosen_ids": [*p.prompt_ids, *p.chosen_ids],
            "rejected_ids": [*p.prompt_ids, *p.rejected_ids],
            "prompt_ids": list(p.prompt_ids),
            "problem_id": p.problem_id,
            "chosen_node": p.chosen_node,
            "rejected_node": p.rejected_node,
            "kind": str(p.metadata.get("kind", "")),
        }
        for p in pairs
    ]


# ---------------------------------------------------------------------- SFT rows
def sft_rows(examples: Sequence[SFTExample]) -> list[Row]:
    """TRL SFTTrainer prompt-completion rows: ``prompt``, ``completion``, and the tree's ids as TRL's processed
    columns, ``input_ids`` = prompt + completion ids and ``completion_mask`` (0 on prompt tokens, 1 on completion
    tokens). With ``input_ids`` present TRL 1.16 tokenises nothing and trains on these ids (loss on the completion
    only, its default). Side columns: ``prompt_ids``, ``completion_ids``, ``problem_id``, ``node_id``.
    """
    rows = []
    for i, ex in enumerate(examples):
        if not ex.completion_ids:
            raise CreditError(f"example {i} ({ex.problem_id!r}) has an empty completion")
        rows.append(
            {
                "prompt": ex.prompt,
                "completion": ex.completion,
                "input_ids": [*ex.prompt_ids, *ex.completion_ids],
                "completion_mask": [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids),
                "prompt_ids": list(ex.prompt_ids),
                "completion_ids": list(ex.completion_ids),
                "problem_id": ex.problem_id,
                "node_id": ex.node_id,
            }
        )
    return rows


# ---------------------------------------------------------------------- verl prompts
def verl_rows(
    trees: Sequence[Tree], *, data_source: str = "treeward", ability: str = "math", split: str = "train"
) -> list[Row]:
    """verl RL-dataset rows, one per tree's problem (verl samples its own responses; it needs prompts and the
    reference its rule reward checks): ``data_source`` (verl dispatches ``compute_score`` on it), ``prompt`` = one
    user message with the problem's prompt, ``ability``, ``reward_model = {"style": "rule", "ground_truth":
    answer}``, ``extra_info = {"split", "index", "problem_id", "prompt_ids"}`` (the root's token ids). A problem
    without a reference answer is an error: a rule reward has nothing to check.
    """
    rows = []
    for i, t in enumerate(trees):
        if t.problem.answer is None:
            raise CreditError(
                f"problem {t.problem.id!r} has no reference answer; verl's rule reward needs a ground truth"
            )
        rows.append(
            {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": t.problem.prompt}],
                "ability": ability,
                "reward_model": {"style": "rule", "ground_truth": str(t.problem.answer)},
                "extra_info": {
                    "split": split,
                    "index": i,
                    "problem_id": t.problem.id,
                    "prompt_ids": list(t.root.token_ids),
                },
            }
        )
    return rows


# ---------------------------------------------------------------------- writers
def write_rows_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write rows as JSON lines (UTF-8); returns the number written. The file appears whole or not at all: it is
    written beside ``path`` and renamed over it, so a failure (an unserialisable value, a NaN) leaves any existing
    file untouched."""
    path = Path(path)
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        except (TypeError, ValueError) as e:
            raise CreditError(f"row {i} cannot be written as JSON: {e}") from e
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return len(lines)


def write_rows_parquet(rows: Sequence[Mapping[str, Any]], path: str | Path) -> int:
    """Write rows as one parquet table with pyarrow (the column types are inferred from the rows, so every row must
    have the same keys and value types); returns the number written. Written beside ``path`` and renamed over it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise CreditError("no rows to write: a parquet file needs at least one row to infer its columns")
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise CreditError(
                f"row {i} has columns {sorted(row)}, row 0 has {sorted(keys)}; every row needs the same columns"
            )
    try:
        table = pa.Table.from_pylist([dict(r) for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CreditError(f"rows cannot form one parquet table: {e}") from e
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return len(rows)
