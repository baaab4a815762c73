"""The learned PRM: Monte-Carlo step labels from treeward's own search trees, a token-level value head on the
shipped policy's backbone, saved as a folder that :class:`~treeward.rewards.model.ProcessRewardModel` loads.

* :func:`prm_data`: trees → :class:`~treeward.credit.records.StepExample` rows, soft targets from Math-Shepherd's
  Monte-Carlo values (:func:`~treeward.credit.values.mc_values`) or ReST-MCTS*'s inferred values
  (:func:`~treeward.credit.values.rest_values`), token ids from the trees.
* :func:`fit_prm`: those rows → a trained ``AutoModelForTokenClassification`` (the loop is
  :func:`~treeward.train.value.train_value`, the rows :func:`~treeward.train.value.step_example`).
* :func:`grow_trees`: the labelling pipeline's trees: tree rollouts from the policy, thin nodes thickened with
  completion rollouts, terminals graded by the exact outcome verifier.

``python -m treeward.train.prm --out src/treeward/assets/tiny-prm`` builds the shipped PRM
(:data:`treeward._paths.SHIPPED_PRM`) end to end and writes ``training_log.json`` beside it.

Papers and departures. Math-Shepherd (Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step
without Human Annotations") labels each step of a sampled solution by decoding ``N = 8`` fresh completions from it
and trains the PRM on the hard ("any completion right") or soft ("fraction right") estimate with a language-model
head reading a step tag. Here the completions are the leaves of a tree: TreePO-style tree rollouts
(:func:`~treeward.search.rollouts.tree_rollouts`) share prefixes, and every open node that has fewer than
``min_leaves`` finished leaves below it is topped up with independent completions
(:func:`~treeward.search.rollouts.thicken`), so ancestors reuse their descendants' completions instead of drawing
``N`` of their own (cheaper; a node's estimate rests on at least ``min_leaves`` outcomes, more near the root). The
target is the soft estimate regressed with binary cross-entropy on a one-logit token-classification head read at
each step's last token (as TRL's ``PRMTrainer`` lays it out), not a "+"/"-" token of the LM head. ReST-MCTS*
(Zhang et al. 2024) targets are available with ``values="rest"``; the shipped model uses ``"mc"``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from treeward.credit.records import StepExample
from treeward.credit.values import mc_hard_values, mc_values, rest_values, step_examples
from treeward.train.value import ValueDataError, ValueTrainLog, init_value_model, step_example, train_value

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from treeward.engine.base import Policy
    from treeward.rewards.base import Reward
    from treeward.tree import Problem, Tree

__all__ = [
    "PRMDataError",
    "fit_prm",
    "grow_trees",
    "heldout_prompts",
    "prm_data",
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


def _is_token_classifier(model: PreTrainedModel) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values())


def fit_prm(
    model_or_path: PreTrainedModel | str | os.PathLike[str],
    examples: Sequence[StepExample],
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> tuple[PreTrainedModel, ValueTrainLog]:
    """Train a PRM on ``examples``: BCE between ``σ(logit)`` at each step's last token and the step's soft value.

    ``model_or_path``: a token-classification value model (trained further, in place), or a causal-LM folder
    (the shipped policy, say) to initialise one from, with a zero head
    (:func:`~treeward.train.value.init_value_model` with ``token_level=True``). Returns the model (eval mode)
    and the run's :class:`~treeward.train.value.ValueTrainLog`. The loop, its schedule and its departures from
    the papers are :func:`~treeward.train.value.train_value`'s; ``log`` gets its progress lines (``None``:
    silent). Save with :func:`~treeward.train.value.save_value_model`.
    """
    if not examples:
        raise PRMDataError("no PRM examples to train on; grow and grade more trees (prm_data returned none)")
    if isinstance(model_or_path, (str, os.PathLike)):
        model = init_value_model(model_or_path, token_level=True, seed=seed)
    else:
        model = model_or_path
        if not _is_token_classifier(model):
            raise PRMDataError(
                f"{type(model).__name__} is not a token classifier: a PRM reads every step's last token; pass "
                "an AutoModelForTokenClassification, or a policy folder to initialise one from"
            )
    rows = [step_example(e) for e in examples]
    run = train_value(model, rows, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log)
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
    ap.add_argument("--problems", type=int, default=1000, help="training problems (1-4 steps, cycled)")
    ap.add_argument("--leaves", type=int, default=8, help="finished leaves per tree rollout")
    ap.add_argument("--min-leaves", type=int, default=4, help="terminals every open node is thickened to")
    ap.add_argument("--values", choices=VALUE_KINDS, default="mc")
    ap.add_argument(
        "--trees",
        type=Path,
        default=None,
        help="JSONL of graded trees: read when it exists, else grown and written",
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
    problems = training_problems(args.problems, seed=args.seed)
    grown = args.trees is None or not args.trees.exists()
    if not grown:
        trees = read_jsonl(args.trees)
        if [t.problem.id for t in trees] != [p.id for p in problems]:
            raise PRMDataError(
                f"{args.trees} holds trees of other problems; pass the --problems/--seed that grew it"
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
    model, run = fit_prm(
        args.policy,
        examples,
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
