"""The learned PRM: Monte-Carlo step labels from treeward's own search trees, a PRM on the shipped policy's
weights, saved as a folder that :class:`~treeward.rewards.model.ProcessRewardModel` loads.

* :func:`prm_data`: trees → :class:`~treeward.credit.records.StepExample` rows, targets from Math-Shepherd's
  Monte-Carlo values, soft (:func:`~treeward.credit.values.mc_values`) or hard
  (:func:`~treeward.credit.values.mc_hard_values`), or ReST-MCTS*'s inferred values
  (:func:`~treeward.credit.values.rest_values`), token ids from the trees; :func:`sibling_pairs`: ranking pairs
  between sibling steps of the same trees.
* :func:`fit_prm`: those rows → a trained PRM with one of two heads: a one-logit token-classification head
  (``head="token"``, BCE through :func:`~treeward.train.value.train_value`), or Math-Shepherd's LM head
  (``head="lm"``: the causal LM itself, a step's score the softmax over two label tokens, :func:`init_lm_prm`,
  trained with :func:`lm_prm_loss`).
* :func:`grow_trees`: the labelling pipeline's trees: tree rollouts from the policy, thin nodes thickened with
  completion rollouts, terminals graded by the exact outcome verifier.

``python -m treeward.train.prm --out src/treeward/assets/tiny-prm`` builds a PRM end to end and writes
``training_log.json`` beside it; the shipped one (:data:`treeward._paths.SHIPPED_PRM`) records its arguments there.

Papers and departures. Math-Shepherd (Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step
without Human Annotations") labels each step of a sampled solution by decoding ``N = 8`` fresh completions from it
and trains the PRM on the hard ("any completion right") or soft ("fraction right") estimate with a language-model
head reading a step tag. Here the completions are the leaves of a tree: TreePO-style tree rollouts
(:func:`~treeward.search.rollouts.tree_rollouts`) share prefixes, and every open node that has fewer than
``min_leaves`` finished leaves below it is topped up with independent completions
(:func:`~treeward.search.rollouts.thicken`), so ancestors reuse their descendants' completions instead of drawing
``N`` of their own (cheaper; a node's estimate rests on at least ``min_leaves`` outcomes, more near the root).
With ``head="lm"`` the PRM is, as in the paper, the language model scoring two label tokens ("Y"/"X" here,
tokens the task never uses, rather than "+"/"-", which are its operators), read at each step's last token rather
than at an inserted step tag; two additions the paper does not have: a language-modelling loss on the steps of
outcome-correct paths (rejection-sampling fine-tuning on the trees' own right answers, to sharpen the arithmetic the
labels must check) and an optional Bradley–Terry ranking loss between sibling steps with different values.
With ``head="token"`` the target is regressed with binary cross-entropy on a one-logit token-classification
head (as TRL's ``PRMTrainer`` lays it out). ReST-MCTS* (Zhang et al. 2024) targets are available with
``values="rest"``.

Measured (benchmarks/learned_prm.py, 200 held-out problems; one CPU thread on a shared machine). The shipped PRM:
``--problems 3000 --steps 1,2,3,3,4,4,4 --values hard --head lm`` (trees: 1.12M generated tokens in 695 s;
11,063 paths, 48,782 step labels; 692 steps of 32 in 1,326 s): step AUC 0.76 against the exact verifier's
"every step so far right" (the previous token-classification PRM, 1,000 problems, soft labels, 190 steps: 0.61);
beam search (2 × 8, ≤ 1,000 tokens) with it 20 % at 4 steps (previous: 12 %; greedy 41 %; the exact verifier
87.5 %). Right and wrong sibling steps still score within ~0.001 of each other: the model has learned which
questions and depths succeed, not to check a step's arithmetic. Learning rate 3e-4 instead of 1e-3 (AUC 0.68, beam
18 % on 60 problems) and the sibling ranking loss (its loss did not fall in 340 steps) did not help.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from treeward.credit.records import StepExample
from treeward.credit.values import mc_hard_values, mc_values, rest_values, step_examples
from treeward.train.value import (
    RowPair,
    ValueDataError,
    ValueExample,
    ValueTrainLog,
    init_value_model,
    step_example,
    train_value,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from treeward.engine.base import Policy
    from treeward.rewards.base import Reward
    from treeward.tree import Problem, Tree

__all__ = [
    "LABEL_TOKENS",
    "PRMDataError",
    "fit_prm",
    "grow_trees",
    "heldout_prompts",
    "init_lm_prm",
    "lm_prm_loss",
    "lm_row",
    "prm_data",
    "sibling_pairs",
    "training_problems",
]

VALUE_KINDS = ("mc", "hard", "rest")


class PRMDataError(ValueDataError):
    """Trees or rows that cannot become PRM training data (the message says what to change)."""


def prm_data(trees: Sequence[Tree], *, values: str = "mc", threshold: float = 0.5) -> list[StepExample]:
    """PRM rows from graded trees: one :class:`StepExample` per distinct root-to-terminal path whose steps all have
    a value (:func:`~treeward.credit.values.step_examples`), trees in order.

    ``values="mc"``: Math-Shepherd's soft estimate, the mean outcome of the terminals below each step
    (:func:`~treeward.credit.values.mc_values`); ``"hard"``: its hard estimate, 1 when any terminal below is
    correct (:func:`~treeward.credit.values.mc_hard_values`). ``values="rest"``: ReST-MCTS*'s inferred process rewards
    (:func:`~treeward.credit.values.rest_values`; a tree with no correct terminal gives no rows). ``labels`` are
    ``value >= threshold``. Token ids are the trees' (the root's prompt ids, each step node's generated ids).
    Terminals need outcomes (grade the trees first, e.g. :func:`~treeward.search.core.grade`); ungraded ones are
    left out, as the value estimators leave them out.
    """
    if values not in VALUE_KINDS:
        raise PRMDataError(
            f'values must be "mc" or "hard" (Math-Shepherd soft / hard estimation) or "rest" (ReST-MCTS*), '
            f"got {values!r}"
        )
    if not 0.0 <= threshold <= 1.0:
        raise PRMDataError(f"threshold is a value in [0, 1], got {threshold}")
    out: list[StepExample] = []
    for tree in trees:
        estimate = {"mc": mc_values, "hard": mc_hard_values, "rest": rest_values}[values]
        node_values = estimate(tree)
        for ex in step_examples(tree, node_values.values, threshold=threshold):
            kept = _scorer_layout(ex, tree.nodes[ex.node_ids[-1]].finish_reason)
            if kept is not None:
                out.append(kept)
    return out


LABEL_TOKENS = ("Y", "X")
"""The LM-head PRM's label tokens (good, bad): single tokens of the shipped tokenizer that no arithmetic problem or
solution uses, so their embeddings serve as output rows only (the policy ties input and output embeddings)."""


def init_lm_prm(
    policy_path: str | os.PathLike[str], *, labels: tuple[str, str] = LABEL_TOKENS
) -> PreTrainedModel:
    """An LM-head PRM to train: the causal LM at ``policy_path`` (float32), its config naming the ``labels``
    tokens (good, bad) under :data:`~treeward.rewards.model.PRM_LABELS_KEY`, and both tokens' output rows set to
    zero, so every first step score is exactly 0.5 (the first label loss ``ln 2``).

    Raises :class:`PRMDataError` when a label is not one token of the folder's tokenizer, or both are the same.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treeward.engine.hf import ModelLoadError
    from treeward.rewards.model import PRM_LABELS_KEY

    try:
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(policy_path)
    except Exception as e:  # re-raised with the path first; the cause stays chained
        raise ModelLoadError(f"cannot build an LM-head PRM from {policy_path}: {e}") from e
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in labels]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise PRMDataError(
            f"label tokens {labels!r} encode to {ids}: pick two different strings that are one token each"
        )
    good, bad = ids[0][0], ids[1][0]
    model.config.update({PRM_LABELS_KEY: [good, bad]})
    out = model.get_output_embeddings()
    if out is None:
        raise ModelLoadError(f"{policy_path}: the causal LM has no output embeddings to read labels from")
    with torch.no_grad():
        out.weight[[good, bad]] = 0.0
        if out.bias is not None:
            out.bias[[good, bad]] = 0.0
    return model


def lm_row(ex: StepExample) -> ValueExample:
    """An LM-head PRM row: :func:`~treeward.train.value.step_example`'s label positions and targets, plus a
    language-modelling loss on the steps' tokens (``lm_start`` = the prompt's length) when the path's terminal
    was graded correct (``ex.metadata["outcome"] == 1``)."""
    row = step_example(ex)
    if ex.metadata.get("outcome") == 1.0:
        return replace(row, lm_start=len(ex.prompt_ids))
    return row


def sibling_pairs(trees: Sequence[Tree], *, values: str = "hard") -> list[RowPair]:
    """Ranking pairs between sibling steps: at every node, each child step valued above a sibling
    (:func:`~treeward.credit.pairs.step_pairs` with ``per_node=None``, values as in :func:`prm_data`) gives a
    :class:`~treeward.train.value.RowPair` of ``prefix + step`` rows read at the step's last token (an EOS the
    step ended with is dropped, as the scorer never sees it; a side left with no token drops the pair)."""
    from treeward.credit.pairs import step_pairs

    if values not in VALUE_KINDS:
        raise PRMDataError(f'values must be "mc", "hard" or "rest", got {values!r}')
    estimate = {"mc": mc_values, "hard": mc_hard_values, "rest": rest_values}[values]
    out: list[RowPair] = []
    for tree in trees:
        eos = {n.id for n in tree.nodes if n.finish_reason == "eos"}
        for p in step_pairs(tree, estimate(tree).values, per_node=None):
            sides = []
            for ids, path in (
                (p.chosen_ids, p.metadata["chosen_path"]),
                (p.rejected_ids, p.metadata["rejected_path"]),
            ):
                step = ids[:-1] if path[-1] in eos else ids
                sides.append(step)
            if not all(sides):
                continue
            better, worse = ((*p.prompt_ids, *side) for side in sides)
            out.append(
                RowPair(
                    ValueExample(better, (len(better) - 1,), (p.metadata["chosen_value"],)),
                    ValueExample(worse, (len(worse) - 1,), (p.metadata["rejected_value"],)),
                )
            )
    return out


def lm_prm_loss(
    model: PreTrainedModel,
    examples: Sequence[ValueExample | RowPair],
    *,
    labels: tuple[int, int],
    lm_weight: float = 1.0,
    pair_weight: float = 1.0,
) -> torch.Tensor:
    """The LM-head PRM's loss on a batch of rows and pairs, from one forward pass.

    Rows: binary cross-entropy between the two-label-token softmax (``σ(logit[good] − logit[bad])``) at every read
    position and its target, averaged over read positions, plus ``lm_weight`` × the next-token cross-entropy
    averaged over the batch's LM tokens (``ids[lm_start:]`` of the rows that have one). Pairs: ``pair_weight`` ×
    the mean of ``−log σ(s_better − s_worse)`` (Bradley–Terry on the two sides' label logits). A term with nothing
    in the batch is 0."""
    from treeward.train._batch import pad_right
    from treeward.train.value import _pad_id

    if not examples:
        raise PRMDataError("empty batch")
    rows = [e for e in examples if isinstance(e, ValueExample)]
    pairs = [e for e in examples if isinstance(e, RowPair)]
    seqs = [*rows, *(p.better for p in pairs), *(p.worse for p in pairs)]
    ids, mask = pad_right([e.ids for e in seqs], _pad_id(model))
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
    good, bad = labels
    diff = logits[..., good] - logits[..., bad]  # [B, T]
    loss = logits.new_zeros(())
    if pairs:
        at = torch.tensor([e.positions[0] for e in seqs[len(rows) :]])
        s = diff[len(rows) :].gather(1, at[:, None])[:, 0]
        margin = s[: len(pairs)] - s[len(pairs) :]
        loss = loss + pair_weight * torch.nn.functional.softplus(-margin).mean()
    if not rows:
        return loss
    ids, mask, logits, diff = ids[: len(rows)], mask[: len(rows)], logits[: len(rows)], diff[: len(rows)]
    width = max(len(e.positions) for e in rows)
    positions = torch.tensor([[*e.positions] + [e.positions[-1]] * (width - len(e.positions)) for e in rows])
    targets = torch.tensor([[*e.targets] + [0.0] * (width - len(e.targets)) for e in rows])
    pmask = torch.tensor([[1.0] * len(e.positions) + [0.0] * (width - len(e.positions)) for e in rows])
    read = diff.gather(1, positions)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(read, targets, reduction="none")
    loss = loss + (bce * pmask).sum() / pmask.sum()
    # LM targets: token t+1 predicted at t, for t+1 >= lm_start (and a real token)
    lm_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, e in enumerate(rows):
        if e.lm_start is not None:
            lm_mask[b, max(e.lm_start, 1) : len(e.ids)] = True
    predicted = lm_mask[:, 1:]
    if lm_weight > 0 and bool(predicted.any()):
        ce = torch.nn.functional.cross_entropy(logits[:, :-1][predicted], ids[:, 1:][predicted])
        loss = loss + lm_weight * ce
    return loss


def _is_token_classifier(model: PreTrainedModel) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values())


def fit_prm(
    model_or_path: PreTrainedModel | str | os.PathLike[str],
    examples: Sequence[StepExample],
    *,
    head: str = "token",
    labels: tuple[str, str] = LABEL_TOKENS,
    lm_weight: float = 1.0,
    pairs: Sequence[RowPair] = (),
    pair_weight: float = 1.0,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> tuple[PreTrainedModel, ValueTrainLog]:
    """Train a PRM on ``examples``; returns the model (eval mode) and the run's
    :class:`~treeward.train.value.ValueTrainLog`.

    ``model_or_path``: a PRM (trained further, in place; its own head decides the loss), or a causal-LM folder
    (the shipped policy, say) to initialise one from, with the head ``head``:

    * ``"token"``: a one-logit token-classification head, initialised to zero
      (:func:`~treeward.train.value.init_value_model` with ``token_level=True``); loss: BCE between ``σ(logit)``
      at each step's last token and the step's value (:func:`~treeward.train.value.value_loss`).
    * ``"lm"``: Math-Shepherd's LM-head PRM (:func:`init_lm_prm`, label tokens ``labels``); loss
      :func:`lm_prm_loss`: BCE on the two-label-token softmax at each step's last token, plus ``lm_weight`` ×
      the language-modelling loss on the steps of outcome-correct paths (:func:`lm_row`), plus ``pair_weight`` ×
      a ranking loss on ``pairs`` (sibling steps, :func:`sibling_pairs`), shuffled in with the rows.

    The loop, its schedule and its departures from the papers are :func:`~treeward.train.value.train_value`'s;
    ``log`` gets its progress lines (``None``: silent). Save with :func:`~treeward.train.value.save_value_model`
    (an LM-head PRM's label tokens travel in its config).
    """
    from treeward.rewards.model import prm_label_ids

    if not examples:
        raise PRMDataError("no PRM examples to train on; grow and grade more trees (prm_data returned none)")
    if head not in ("token", "lm"):
        raise PRMDataError(
            f'head must be "token" (a classification head) or "lm" (label tokens), got {head!r}'
        )
    if not lm_weight >= 0:
        raise PRMDataError(f"lm_weight must be >= 0, got {lm_weight}")
    if isinstance(model_or_path, (str, os.PathLike)):
        if head == "lm":
            model = init_lm_prm(model_or_path, labels=labels)
        else:
            model = init_value_model(model_or_path, token_level=True, seed=seed)
    else:
        model = model_or_path
    label_ids = prm_label_ids(model.config.to_dict())
    if label_ids is None and not _is_token_classifier(model):
        raise PRMDataError(
            f"{type(model).__name__} is not a PRM: a PRM reads every step's last token; pass an "
            "AutoModelForTokenClassification, a causal LM whose config names label tokens (init_lm_prm), or a "
            "policy folder to initialise one from"
        )
    if label_ids is None:
        if pairs:
            raise PRMDataError("ranking pairs train an LM-head PRM only; pass head='lm' or no pairs")
        rows = [step_example(e) for e in examples]
        run = train_value(model, rows, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log)
        return model, run
    rows = [lm_row(e) for e in examples]
    seqs = [*rows, *(p.better for p in pairs), *(p.worse for p in pairs)]
    clash = next((e for e in seqs if set(label_ids) & set(e.ids)), None)
    if clash is not None:
        raise PRMDataError(
            f"a training row holds a label token {label_ids}: label tokens must be tokens the solutions never "
            "use; pick others (labels=...)"
        )
    run = train_value(
        model,
        [*rows, *pairs],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log=log,
        loss=partial(lm_prm_loss, labels=label_ids, lm_weight=lm_weight, pair_weight=pair_weight),
    )
    return model, run


def _scorer_layout(ex: StepExample, last_finish: str | None) -> StepExample | None:
    """``ex`` as the scorer reads it: a terminal step that ended at EOS keeps the EOS id in the tree, but the
    scorer sees the step's text (EOS excluded), so the id is dropped; a step left with no tokens (the policy said
    only EOS) is dropped with its value. ``None`` when no step is left."""
    if last_finish != "eos":
        return ex
    last = ex.step_ids[-1][:-1]
    if last:
        return replace(ex, step_ids=(*ex.step_ids[:-1], last))
    if len(ex.step_ids) == 1:
        return None
    return replace(
        ex,
        steps=ex.steps[:-1],
        step_ids=ex.step_ids[:-1],
        values=ex.values[:-1],
        labels=ex.labels[:-1],
        node_ids=ex.node_ids[:-1],
        metadata={**ex.metadata, "dropped_empty_step": ex.node_ids[-1]},
    )


# --- the pipeline ----------------------------------------------------------------------------------------------


def heldout_prompts(*, seed: int = 1, n: int = 1000) -> set[str]:
    """Prompts of the held-out arithmetic problems that ``treeward search``, ``treeward bench`` and the benchmarks
    evaluate on (problems seed ``seed``, the CLI's ``HELDOUT_SEED``): the first ``n`` of every step count 1–5 and
    of the mixed 1–4 stream. Training problems must avoid them."""
    from treeward.tasks.arithmetic import MAX_STEPS, generate_problems

    streams: list[int | list[int]] = [*range(1, MAX_STEPS + 1), [1, 2, 3, 4]]
    return {p.prompt for steps in streams for p in generate_problems(n, steps, seed=seed)}


def training_problems(n: int, *, seed: int = 0, steps: Sequence[int] = (1, 2, 3, 4)) -> list[Problem]:
    """``n`` arithmetic problems (step counts cycled through ``steps``) from problems seed ``100 + seed``, none of
    them a held-out problem (:func:`heldout_prompts`) nor a repeat."""
    from treeward.tasks.arithmetic import generate_problems

    banned = heldout_prompts()
    out: list[Problem] = []
    seen: set[str] = set()
    pool = generate_problems(2 * n + 16, list(steps), seed=100 + seed)
    for p in pool:
        if p.prompt not in banned and p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
        if len(out) == n:
            return out
    raise PRMDataError(f"could not draw {n} fresh training problems from {len(pool)}; ask for fewer")


def grow_trees(
    problems: Sequence[Problem],
    policy: Policy,
    outcome: Reward,
    *,
    leaves: int = 8,
    min_leaves: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    max_step_tokens: int = 24,
    batch_problems: int = 64,
    log: Callable[[str], None] | None = print,
) -> list[Tree]:
    """Labelled trees for PRM training: :func:`~treeward.search.rollouts.tree_rollouts` (``leaves`` finished
    leaves per problem, binary step-level branching at ``temperature``), then
    :func:`~treeward.search.rollouts.thicken` (every open node topped up to ``min_leaves`` terminals below it), then
    every terminal graded by ``outcome`` (:func:`~treeward.search.core.grade`; 0/1 for the exact verifier).
    ``batch_problems`` problems share each engine call."""
    from treeward.search.core import grade
    from treeward.search.rollouts import thicken, tree_rollouts

    if batch_problems < 1:
        raise ValueError(f"batch_problems must be >= 1, got {batch_problems}")
    out: list[Tree] = []
    t0 = time.perf_counter()
    for start in range(0, len(problems), batch_problems):
        chunk = problems[start : start + batch_problems]
        trees = tree_rollouts(
            chunk, policy, leaves=leaves, seed=seed, temperature=temperature, max_step_tokens=max_step_tokens
        )
        thicken(
            trees,
            policy,
            min_leaves=min_leaves,
            seed=seed,
            temperature=temperature,
            max_step_tokens=max_step_tokens,
        )
        grade(trees, outcome)
        out.extend(trees)
        if log is not None:
            log(f"trees {len(out)}/{len(problems)}  {time.perf_counter() - t0:5.0f}s")
    return out


def _data_stats(examples: Sequence[StepExample]) -> dict[str, object]:
    values = [v for e in examples for v in e.values]
    return {
        "rows": len(examples),
        "steps": len(values),
        "mean_value": round(sum(values) / max(1, len(values)), 4),
        "zero_value_steps": sum(v == 0.0 for v in values),
        "one_value_steps": sum(v == 1.0 for v in values),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Build the shipped PRM (see the module docstring); returns the log it writes beside the model."""
    from transformers.utils import logging as hf_logging

    from treeward._paths import SHIPPED_POLICY
    from treeward.engine.hf import HFPolicy
    from treeward.tasks import ArithmeticAnswer
    from treeward.train.value import save_value_model
    from treeward.tree import read_jsonl, write_jsonl

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policy", type=Path, default=SHIPPED_POLICY)
    ap.add_argument("--problems", type=int, default=1000, help="training problems (step counts cycled)")
    ap.add_argument(
        "--steps", default="1,2,3,4", help="step counts the problems cycle through (comma-separated)"
    )
    ap.add_argument("--leaves", type=int, default=8, help="finished leaves per tree rollout")
    ap.add_argument("--min-leaves", type=int, default=4, help="terminals every open node is thickened to")
    ap.add_argument("--values", choices=VALUE_KINDS, default="mc")
    ap.add_argument(
        "--trees",
        type=Path,
        default=None,
        help="JSONL of graded trees: read when it exists, else grown and written",
    )
    ap.add_argument("--head", choices=("token", "lm"), default="token")
    ap.add_argument("--lm-weight", type=float, default=1.0, help="LM-head PRM: weight of the LM loss")
    ap.add_argument(
        "--pair-weight",
        type=float,
        default=0.0,
        help="LM-head PRM: weight of the sibling ranking loss (0: none)",
    )
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the expected "score.weight missing" load report
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    policy = HFPolicy.from_pretrained(args.policy)
    try:
        steps = tuple(int(k) for k in args.steps.split(","))
    except ValueError:
        ap.error(f"--steps takes comma-separated step counts such as 1,2,3,4, got {args.steps!r}")
    problems = training_problems(args.problems, seed=args.seed, steps=steps)
    grown = args.trees is None or not args.trees.exists()
    if not grown:
        trees = read_jsonl(args.trees)
        if [t.problem.id for t in trees] != [p.id for p in problems]:
            raise PRMDataError(
                f"{args.trees} holds trees of other problems; pass the --problems/--steps/--seed that grew it"
            )
    else:
        trees = grow_trees(
            problems,
            policy,
            ArithmeticAnswer(),
            leaves=args.leaves,
            min_leaves=args.min_leaves,
            seed=args.seed,
            log=lambda line: print(line, flush=True),
        )
        if args.trees is not None:
            write_jsonl(trees, args.trees)
    examples = prm_data(trees, values=args.values)
    t_trees = time.perf_counter() - t0
    stats = _data_stats(examples)
    generated = sum(t.generated_tokens for t in trees)
    print(f"{generated} tokens generated in {t_trees:.0f}s; data {json.dumps(stats)}", flush=True)
    pairs = sibling_pairs(trees, values=args.values) if args.pair_weight > 0 else []
    stats["pairs"] = len(pairs)
    model, run = fit_prm(
        args.policy,
        examples,
        head=args.head,
        lm_weight=args.lm_weight,
        pairs=pairs,
        pair_weight=args.pair_weight,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        log=lambda line: print(line, flush=True),
    )
    save_value_model(model, policy.tokenizer, args.out)
    tail = run.losses[-10:]
    log: dict[str, object] = {
        "policy": str(args.policy),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "problems": {"n": len(problems), "seed": 100 + args.seed, "first_id": problems[0].id},
        "trees": {
            "n": len(trees),
            "generated_tokens": generated,
            "seconds": round(t_trees, 1),
            "read_from": None if grown else str(args.trees),
        },
        "data": stats,
        "train": {
            "steps": run.steps,
            "examples": run.examples,
            "positions": run.positions,
            "seconds": round(run.seconds, 1),
            "loss_first": run.losses[0],
            "loss_last10": sum(tail) / len(tail),
        },
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(
        f"trees {t_trees:.0f}s, training {run.seconds:.0f}s, total {log['total_seconds']}s; wrote {args.out}"
    )
    return log


if __name__ == "__main__":
    main()
