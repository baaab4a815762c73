"""Self-training from search trees: the ReST-MCTS* loop, with ReST-EM and iterative MCTS-DPO as baselines.

One loop, :func:`selftrain`, three ways to turn the current policy's samples into a better policy. Every iteration
draws fresh training problems, spends the same generated-token budget per problem on them, grades the terminals
with the exact outcome verifier, trains, evaluates on fixed held-out problems, and checkpoints:

* ``"rest-mcts"``: **ReST-MCTS*** (Zhang, Zhoubian, Hu, Yue, Dong & Tang 2024, "ReST-MCTS*: LLM Self-Training via
  Process Reward Guided Tree Search"). Search with MCTS* (:func:`~treeward.search.mcts.mcts_star`) guided by the
  current PRM → grade → inferred values (:func:`~treeward.credit.values.rest_values`) → train the PRM
  (:func:`~treeward.train.prm.fit_prm`) and the policy (:func:`~treeward.train.sft.train_sft` on the verified
  traces, :func:`~treeward.credit.pairs.sft_examples`). As in the paper's loop, the policy goes on from the
  previous iteration's weights and trains on the verified traces of every iteration so far (``mix_traces``).
* ``"rest-em"``: **ReST-EM** (Singh et al. 2023, "Beyond Human Data: Scaling Self-Training for Problem-Solving with
  Language Models"). Best-of-N samples (:func:`~treeward.search.bon.best_of_n`) → keep the outcome-correct ones →
  SFT. No PRM. As in the paper, every iteration fine-tunes the *base* model (``restart_from_base``) on that
  iteration's samples only, drawn from the previous iteration's policy.
* ``"mcts-dpo"``: **iterative MCTS-DPO** (Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative
  Preference Learning"). MCTS* trees → Monte-Carlo step values → sibling step pairs completed to whole responses
  (:func:`~treeward.credit.pairs.step_pairs` with ``complete=True``) → step-level DPO
  (:func:`~treeward.train.prefs.train_dpo`, the reference being the policy at the start of the iteration).

Equal samples: every method gets ``samples_per_problem × cap`` generated tokens per training problem, where
``cap = 20·steps + 12`` is the token cap of one whole solution; best-of-N spends it on exactly
``samples_per_problem`` solutions, the tree searches on shared-prefix trees (the table reports the terminals and
tokens each actually generated).

The table (one :class:`IterationRow` per iteration; iteration 0 is the starting policy): greedy accuracy on fixed
held-out problems at each of ``eval_steps``, search accuracy at ``search_steps`` steps (MCTS* with the current PRM
when the method has one, else self-consistency best-of-N at the same budget), the PRM's step-level ROC AUC against
the exact step verifier on those search trees, samples and tokens generated for training, examples trained on,
and wall and CPU minutes (per phase too).

Files under ``out_dir``: ``config.json`` (the run's knobs), ``iter_k/state.json`` (row ``k`` and what was saved,
written last and atomically: an iteration without it did not finish), ``iter_k/policy`` and ``iter_k/prm``
(``from_pretrained`` folders), ``iter_k/traces.jsonl`` (the iteration's verified traces, SFT methods; what
``mix_traces`` reads back on resume), ``table.json`` and ``table.md``. Calling :func:`selftrain` again with the same
arguments and ``out_dir`` resumes after the last finished iteration; different arguments are refused.

Departures from the papers, all three: tiny budgets (hundreds of problems an iteration, a few SFT epochs at a
constant learning rate); the weight and data rules (``restart_from_base``, ``mix_traces``) default to each paper's
and can be swapped to compare like with like; ReST-MCTS*'s ``D_G`` starts empty (no human-written traces to mix
in). ReST-MCTS*: the PRM trains further on each iteration's trees only (no mixing of value data), and it learns the
per-step chance of reaching the right answer (Math-Shepherd's soft Monte-Carlo estimate, ``prm_data(values="mc")``),
which is what MCTS* reads as the process reward ``r_k`` and turns into the paper's quality value with the reasoning
distance; the paper's value model regresses the quality value itself. The inferred values
(:func:`~treeward.credit.values.rest_values`) rank the verified traces (shortest correct reasoning first) instead of
screening them through the value model; no self-critic, no reflection prompts. Iteration 1 searches with the PRM
passed as ``initial_prm`` (the shipped one, for instance), or, with none, with an uninformed scorer (every path
0.5, so the values MCTS* acts on carry no information and the tree's spread comes from its visit bonuses); the
step values that train the first PRM then come only from graded rollouts. MCTS-DPO: step values are Monte-Carlo
estimates from the tree's graded terminals, not the paper's Q (outcome plus self-evaluation); pairs come from
every node with two valued children, not only the chosen trajectory. ReST-EM: at most ``max_traces`` correct
solutions a problem (the paper: 10).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treeward.rewards.base import RewardResult, Sample, Status

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from treeward.credit.records import SFTExample
    from treeward.engine.hf import HFPolicy
    from treeward.rewards.base import Reward
    from treeward.tree import Problem, Tree

__all__ = [
    "HELDOUT_SEED",
    "METHODS",
    "IterationRow",
    "SelfTrainError",
    "UninformedScorer",
    "format_table",
    "selftrain",
]

METHODS = ("rest-mcts", "rest-em", "mcts-dpo")
HELDOUT_SEED = 1
"""Problems seed of the held-out arithmetic sets (as ``treeward search``); training problems use other seeds."""


class SelfTrainError(ValueError):
    """Arguments :func:`selftrain` cannot run with (the message says which and how to fix it)."""


@dataclass(frozen=True)
class IterationRow:
    """One row of the self-training table.

    ``iteration``         0: the starting policy (evaluated only); k ≥ 1: after the k-th search-and-train round.
    ``method``            one of :data:`METHODS`.
    ``greedy``            dict[str, float]: steps (as a string, for JSON) → greedy accuracy on the held-out problems.
    ``search``            accuracy of the search at ``search_steps`` steps on held-out problems.
    ``search_kind``       which search: ``"mcts_star+prm"`` or ``"majority@N"`` (no PRM).
    ``prm_auc``           step-level ROC AUC of the current PRM against the exact step verifier on the search's
                          held-out trees; ``None`` without a PRM (or when the steps were all right or all wrong).
    ``samples``           terminal paths generated on the training problems this iteration (0 at iteration 0).
    ``generated_tokens``  tokens generated on the training problems this iteration.
    ``solved``            training problems with at least one correct terminal.
    ``train_examples``    records the policy trained on (SFT traces or DPO pairs; with ``mix_traces``, the
                          verified traces of every iteration so far).
    ``new_examples``      records this iteration's trees gave (before mixing).
    ``prm_examples``      paths the PRM trained on (0 for methods without a PRM).
    ``train_loss``        [first, last] policy loss of the iteration's training, ``None`` when there was none.
    ``minutes``           wall minutes of the iteration (collection, training, evaluation).
    ``cpu_minutes``       CPU minutes of this process over the iteration (every thread; ``time.process_time``).
    ``phase_cpu``         dict[str, float]: CPU minutes per phase: ``"collect"`` (search and grading), ``"prm"``
                          (PRM training, ``rest-mcts``), ``"policy"`` (policy training), ``"eval"``.
    """

    iteration: int
    method: str
    greedy: dict[str, float]
    search: float
    search_kind: str
    prm_auc: float | None
    samples: int = 0
    generated_tokens: int = 0
    solved: int = 0
    train_examples: int = 0
    new_examples: int = 0
    prm_examples: int = 0
    train_loss: tuple[float, float] | None = None
    minutes: float = 0.0
    cpu_minutes: float = 0.0
    phase_cpu: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IterationRow:
        loss = d.get("train_loss")
        return cls(**{**d, "train_loss": None if loss is None else (float(loss[0]), float(loss[1]))})


class UninformedScorer:
    """A scorer with no opinion: every path scores 0.5 (``r = 0.5`` leaves MCTS*'s quality value unchanged).

    What the search acts on when there is no PRM yet; also the scorer of greedy decoding, where nothing is ranked.
    """

    name = "uninformed"
    __name__ = "uninformed"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return [RewardResult(0.5, Status.OK) for _ in samples]


# ---------------------------------------------------------------------- the loop
def selftrain(
    policy_path: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str],
    method: str = "rest-mcts",
    iterations: int = 3,
    problems_per_iter: int = 64,
    samples_per_problem: int = 8,
    train_steps: Sequence[int] = (2, 3, 4),
    seed: int = 0,
    eval_problems: int = 100,
    eval_steps: Sequence[int] = (2, 3, 4),
    search_problems: int = 50,
    search_steps: int = 4,
    initial_prm: str | os.PathLike[str] | None = None,
    lr: float | None = None,
    epochs: int = 2,
    batch_size: int = 16,
    warmup: int = 0,
    beta: float = 0.1,
    prm_epochs: int = 2,
    prm_lr: float = 1e-3,
    max_traces: int = 4,
    temperature: float = 1.0,
    restart_from_base: bool | None = None,
    mix_traces: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> list[IterationRow]:
    """Run (or resume) ``iterations`` rounds of self-training of the policy at ``policy_path``; returns the table.

    See the module docstring for the three methods, their papers and departures, and the files written to
    ``out_dir``. Returns every row so far, iteration 0 (the starting policy) first.

    Args:
        policy_path: a ``from_pretrained`` folder of a causal LM (e.g. ``treeward._paths.SHIPPED_POLICY``).
        out_dir: where checkpoints and tables go; a finished iteration found there is not run again.
        method: ``"rest-mcts"``, ``"rest-em"`` or ``"mcts-dpo"``.
        iterations: search-and-train rounds (≥ 1).
        problems_per_iter: fresh training problems each round, cycling through ``train_steps`` step counts.
        samples_per_problem: the per-problem budget in whole solutions: ``samples_per_problem × cap`` tokens.
        train_steps: step counts of the training problems, cycled; repeat one to weight it (``(2, 3, 4, 4)``:
            half the problems 4-step). Every problem gets the budget of the largest.
        seed: seeds problems, sampling and training; iteration ``k`` samples and trains with seed
            ``1000·seed + k``.
        eval_problems, eval_steps: held-out problems per step count for greedy accuracy.
        search_problems, search_steps: held-out problems for the search accuracy (and the PRM AUC).
        initial_prm: a PRM folder (``ProcessRewardModel``) to search with in the first round and to train on from
            there (``rest-mcts``); ``mcts-dpo`` searches with it every round. ``None``: the uninformed scorer, and
            ``rest-mcts`` builds its first PRM from ``policy_path``'s backbone.
        lr: the policy's learning rate; ``None``: 3e-5 for SFT, 1e-5 for DPO (1e-4 degraded the shipped policy
            in a measured ReST-EM / ReST-MCTS* round: its own correct traces have a loss of ~0.03, so Adam's
            normalised steps are mostly noise; measured again on 226 traces, 1e-4 lowered 4-step greedy
            accuracy with or without warm-up, 3e-5 raised it).
        epochs, batch_size: policy training passes and batch size (SFT traces or DPO pairs).
        warmup: optimiser steps of linear learning-rate warm-up of each round's SFT (SFT methods only; a non-zero
            value with ``mcts-dpo`` is refused, its trainer has none).
        beta: DPO's β.
        prm_epochs, prm_lr: PRM training (``rest-mcts``).
        max_traces: most verified traces per problem kept for SFT.
        temperature: sampling temperature of the training searches.
        restart_from_base: train each round's policy from the weights at ``policy_path`` (ReST-EM fine-tunes the
            base model at every iteration, against over-fitting and drift), not from the previous round's; the
            samples still come from the previous round's policy. ``None``: the paper's choice, True for
            ``rest-em``, False for the other two.
        mix_traces: train on the verified traces of every round so far (ReST-MCTS*'s growing trace set; without
            duplicates, oldest first), not only this round's. ``None``: the paper's choice, True for
            ``rest-mcts``, False for ``rest-em``. SFT methods only: True with ``mcts-dpo`` is refused.
        log: progress lines (``None``: silent).
    """
    say = log if log is not None else _silent
    cfg = _check_args(
        policy_path,
        out_dir=out_dir,
        method=method,
        iterations=iterations,
        problems_per_iter=problems_per_iter,
        samples_per_problem=samples_per_problem,
        train_steps=train_steps,
        seed=seed,
        eval_problems=eval_problems,
        eval_steps=eval_steps,
        search_problems=search_problems,
        search_steps=search_steps,
        initial_prm=initial_prm,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        warmup=warmup,
        beta=beta,
        prm_epochs=prm_epochs,
        prm_lr=prm_lr,
        max_traces=max_traces,
        temperature=temperature,
        restart_from_base=restart_from_base,
        mix_traces=mix_traces,
    )
    restart, mix = bool(cfg["restart_from_base"]), bool(cfg["mix_traces"])
    out = Path(out_dir)
    _claim(out, cfg)
    rows, policy_from, prm_from = _resume(out, Path(policy_path), initial_prm)
    if rows:
        say(f"resuming {out}: iterations 0..{rows[-1].iteration} already done")

    import torch
    from transformers.utils import logging as hf_logging

    from treeward.engine.hf import HFPolicy
    from treeward.search.core import grade
    from treeward.tasks import ArithmeticAnswer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    policy = HFPolicy.from_pretrained(policy_from)
    prm_model: PreTrainedModel | None = None
    evaluation = _Eval(
        eval_problems=eval_problems,
        eval_steps=tuple(eval_steps),
        search_problems=search_problems,
        search_steps=search_steps,
        samples=samples_per_problem,
    )
    if not rows:
        t0, c0 = time.perf_counter(), time.process_time()
        row = evaluation.run(policy, prm_from, method=method, iteration=0, seed=seed)
        cpu = (time.process_time() - c0) / 60
        row = replace(row, minutes=(time.perf_counter() - t0) / 60, cpu_minutes=cpu, phase_cpu={"eval": cpu})
        _checkpoint(out, row, policy=None, prm=prm_from)
        rows.append(row)
        say(format_table(rows))
    policy_lr = lr if lr is not None else (1e-5 if method == "mcts-dpo" else 3e-5)
    pool = (
        [e for j in range(1, rows[-1].iteration + 1) for e in _load_traces(out / f"iter_{j}")] if mix else []
    )
    for k in range(rows[-1].iteration + 1, iterations + 1):
        t0, clock = time.perf_counter(), _Clock()
        torch.manual_seed(seed * 1000 + k)
        problems = _training_problems(problems_per_iter, train_steps, seed=seed, iteration=k, cfg=evaluation)
        cap = _cap(max(train_steps))
        budget = samples_per_problem * cap
        scorer = _scorer(prm_from)
        trees = _collect(
            method,
            problems,
            policy,
            scorer,
            budget,
            cap=cap,
            samples=samples_per_problem,
            seed=seed * 1000 + k,
            temperature=temperature,
            max_depth=max(train_steps) + 2,
        )
        grade(trees, ArithmeticAnswer())
        stats = {
            "samples": sum(len(t.terminals()) for t in trees),
            "generated_tokens": int(sum(t.ledger.get("generated", 0) for t in trees)),
            "solved": sum(any((n.outcome or 0.0) >= 1.0 for n in t.terminals()) for t in trees),
        }
        clock.lap("collect")
        say(
            f"iteration {k}: {stats['samples']} samples, {stats['generated_tokens']} tokens, "
            f"{stats['solved']}/{len(trees)} problems solved ({clock.phases['collect']:.2f} CPU-min)"
        )
        prm_examples = 0
        if method == "rest-mcts":
            prm_model, prm_examples = _train_prm(
                trees, prm_model, prm_from, policy_from, prm_epochs, prm_lr, seed + k
            )
            clock.lap("prm")
        if restart:
            policy = HFPolicy.from_pretrained(policy_path)
        traces: list[SFTExample] | None = None
        if method == "mcts-dpo":
            n_examples, loss = _train_dpo(
                trees,
                policy,
                lr=policy_lr,
                epochs=epochs,
                batch_size=batch_size,
                beta=beta,
                seed=seed * 1000 + k,
            )
            n_new = n_examples
        else:
            traces = _verified_traces(method, trees, max_traces)
            pool = _mixed(pool, traces) if mix else traces
            n_new = len(traces)
            n_examples, loss = _train_sft(
                pool,
                policy,
                lr=policy_lr,
                epochs=epochs,
                batch_size=batch_size,
                warmup=warmup,
                seed=seed * 1000 + k,
            )
        clock.lap("policy")
        say(f"iteration {k}: trained on {n_examples} records ({n_new} new), loss {loss}")
        policy.clear_cache()
        prm_path = _checkpoint_models(out, k, policy, prm_model, prm_from, traces)
        row = evaluation.run(policy, prm_path, method=method, iteration=k, seed=seed)
        clock.lap("eval")
        row = replace(
            row,
            samples=stats["samples"],
            generated_tokens=stats["generated_tokens"],
            solved=stats["solved"],
            train_examples=n_examples,
            new_examples=n_new,
            prm_examples=prm_examples,
            train_loss=loss,
            minutes=(time.perf_counter() - t0) / 60,
            cpu_minutes=sum(clock.phases.values()),
            phase_cpu=dict(clock.phases),
        )
        _checkpoint(out, row, policy=out / f"iter_{k}" / "policy", prm=prm_path)
        rows.append(row)
        prm_from = prm_path
        policy_from = out / f"iter_{k}" / "policy"
        say(format_table(rows))
    _write_tables(out, rows)
    return rows


# ---------------------------------------------------------------------- arguments, files, resume
def _silent(line: str) -> None:
    del line


def _check_args(policy_path: str | os.PathLike[str], **kw: Any) -> dict[str, Any]:
    """Validate everything before any file is touched; return the run's config (JSON-able)."""
    folder = Path(policy_path)
    if not (folder / "config.json").is_file():
        raise SelfTrainError(
            f"no policy folder at {folder} (a from_pretrained folder with a config.json is needed, e.g. "
            "treeward._paths.SHIPPED_POLICY)"
        )
    if kw["method"] not in METHODS:
        raise SelfTrainError(f"method must be one of {', '.join(METHODS)}, got {kw['method']!r}")
    for name in (
        "iterations",
        "problems_per_iter",
        "samples_per_problem",
        "eval_problems",
        "search_problems",
        "epochs",
        "batch_size",
        "prm_epochs",
        "max_traces",
    ):
        if not isinstance(kw[name], int) or kw[name] < 1:
            raise SelfTrainError(f"{name} must be an integer ≥ 1, got {kw[name]!r}")
    for name in ("train_steps", "eval_steps"):
        steps = list(kw[name])
        if not steps or any(not 1 <= s <= 5 for s in steps):
            raise SelfTrainError(f"{name} must be a non-empty list of step counts in 1..5, got {steps!r}")
    if not 1 <= kw["search_steps"] <= 5:
        raise SelfTrainError(f"search_steps must be in 1..5, got {kw['search_steps']!r}")
    for name in ("lr", "prm_lr", "beta"):
        v = kw[name]
        if v is not None and not (math.isfinite(v) and v > 0):
            raise SelfTrainError(f"{name} must be a positive number, got {v!r}")
    if not (math.isfinite(kw["temperature"]) and kw["temperature"] > 0):
        raise SelfTrainError(f"temperature must be > 0 (training searches sample), got {kw['temperature']!r}")
    for name in ("restart_from_base", "mix_traces"):
        if kw[name] is not None and not isinstance(kw[name], bool):
            raise SelfTrainError(f"{name} must be True, False or None (the paper's choice), got {kw[name]!r}")
    if not isinstance(kw["warmup"], int) or kw["warmup"] < 0:
        raise SelfTrainError(f"warmup must be an integer ≥ 0 (optimiser steps), got {kw['warmup']!r}")
    if kw["warmup"] and kw["method"] == "mcts-dpo":
        raise SelfTrainError(
            "warmup applies to SFT; the DPO trainer has no warm-up: pass warmup=0 with mcts-dpo"
        )
    if kw["mix_traces"] and kw["method"] == "mcts-dpo":
        raise SelfTrainError(
            "mix_traces mixes verified SFT traces across rounds; mcts-dpo trains on preference pairs: "
            "pass mix_traces=False or None with it"
        )
    prm = kw["initial_prm"]
    if prm is not None and not (Path(prm) / "config.json").is_file():
        raise SelfTrainError(f"no PRM folder at {prm} (train one with treeward.train.prm, or pass None)")
    out = Path(kw["out_dir"])
    if out.exists() and not out.is_dir():
        raise SelfTrainError(f"out_dir {out} is a file; pass a folder")
    cfg = {k: v for k, v in kw.items() if k not in ("out_dir", "iterations")}
    cfg["policy_path"] = str(folder.resolve())
    cfg["initial_prm"] = None if prm is None else str(Path(prm).resolve())
    cfg["train_steps"], cfg["eval_steps"] = list(kw["train_steps"]), list(kw["eval_steps"])
    if cfg["restart_from_base"] is None:
        cfg["restart_from_base"] = kw["method"] == "rest-em"
    if cfg["mix_traces"] is None:
        cfg["mix_traces"] = kw["method"] == "rest-mcts"
    return cfg


def _claim(out: Path, cfg: dict[str, Any]) -> None:
    """Write ``config.json``, or check that the run already in ``out`` had the same one."""
    path = out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        if diff:
            raise SelfTrainError(
                f"{out} holds a run with other settings ({', '.join(diff)}); resume with the same arguments "
                "or pass a new out_dir"
            )
        return
    if out.is_dir() and any(out.iterdir()):
        raise SelfTrainError(f"out_dir {out} is not empty and holds no selftrain run; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, cfg)


def _write_json(path: Path, obj: object) -> None:
    """Write atomically: a killed run leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _resume(
    out: Path, policy_path: Path, initial_prm: str | os.PathLike[str] | None
) -> tuple[list[IterationRow], Path, Path | None]:
    """Rows of the finished iterations (consecutive from 0), and the policy and PRM folders to go on from."""
    rows: list[IterationRow] = []
    policy_from, prm_from = policy_path, None if initial_prm is None else Path(initial_prm)
    k = 0
    while (state := out / f"iter_{k}" / "state.json").is_file():
        data = json.loads(state.read_text())
        rows.append(IterationRow.from_dict(data["row"]))
        if data["policy"] is not None:
            policy_from = out / data["policy"]
        if data["prm"] is not None:
            prm_from = Path(data["prm"]) if Path(data["prm"]).is_absolute() else out / data["prm"]
        k += 1
    return rows, policy_from, prm_from


def _checkpoint_models(
    out: Path,
    k: int,
    policy: HFPolicy,
    prm: PreTrainedModel | None,
    prm_from: Path | None,
    traces: Sequence[SFTExample] | None,
) -> Path | None:
    """Save the policy, this iteration's verified traces (SFT methods; ``traces.jsonl``, what ``mix_traces``
    reads back on resume) and a PRM trained this iteration into ``iter_k``; returns the PRM folder to use next."""
    from treeward.train.value import save_value_model

    folder = out / f"iter_{k}"
    folder.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(folder / "policy")
    policy.tokenizer.save_pretrained(folder / "policy")
    if traces is not None:
        tmp = folder / "traces.jsonl.tmp"
        tmp.write_text("".join(json.dumps(asdict(e)) + "\n" for e in traces))
        os.replace(tmp, folder / "traces.jsonl")
    if prm is None:
        return prm_from
    return save_value_model(prm, policy.tokenizer, folder / "prm")


def _load_traces(folder: Path) -> list[SFTExample]:
    """The verified traces an iteration saved (empty for an iteration that saved none)."""
    from treeward.credit.records import SFTExample

    path = folder / "traces.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        ids = {"prompt_ids": tuple(d["prompt_ids"]), "completion_ids": tuple(d["completion_ids"])}
        out.append(SFTExample(**{**d, **ids}))
    return out


class _Clock:
    """CPU minutes of this process per phase: ``lap(name)`` books the time since the last lap under ``name``."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.process_time()

    def lap(self, name: str) -> None:
        now = time.process_time()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._last) / 60
        self._last = now


def _checkpoint(out: Path, row: IterationRow, *, policy: Path | None, prm: Path | None) -> None:
    """Write ``iter_k/state.json`` last: the iteration is finished once it exists. Folders inside ``out`` are
    stored relative to it (the run folder can move), others absolute."""

    def where(p: Path | None) -> str | None:
        if p is None:
            return None
        return os.path.relpath(p, out) if p.resolve().is_relative_to(out.resolve()) else str(p.resolve())

    folder = out / f"iter_{row.iteration}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "state.json", {"row": asdict(row), "policy": where(policy), "prm": where(prm)})
    _write_tables(out, _resume(out, out, None)[0])


def _write_tables(out: Path, rows: Sequence[IterationRow]) -> None:
    _write_json(out / "table.json", [asdict(r) for r in rows])
    (out / "table.md").write_text(format_table(rows) + "\n")


def format_table(rows: Sequence[IterationRow]) -> str:
    """The rows as a Markdown table (greedy accuracy per step count, search accuracy, PRM AUC, samples, time)."""
    if not rows:
        return "(no iterations)"
    steps = list(rows[0].greedy)
    head = [
        "iter",
        *(f"greedy@{s}" for s in steps),
        "search",
        "PRM AUC",
        "samples",
        "tokens",
        "solved",
        "examples (new)",
        "loss",
        "min",
        "CPU min",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r.iteration),
            *(f"{r.greedy[s]:.3f}" for s in steps),
            f"{r.search:.3f} ({r.search_kind})",
            "-" if r.prm_auc is None else f"{r.prm_auc:.3f}",
            str(r.samples),
            str(r.generated_tokens),
            str(r.solved),
            f"{r.train_examples} ({r.new_examples})",
            "-" if r.train_loss is None else f"{r.train_loss[0]:.3f}→{r.train_loss[1]:.3f}",
            f"{r.minutes:.2f}",
            f"{r.cpu_minutes:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return f"{rows[0].method}\n" + "\n".join(lines)


# ---------------------------------------------------------------------- problems, scorers, collection
def _cap(steps: int) -> int:
    """Token cap of one whole solution of a ``steps``-step problem (the feasibility study's ``20·steps + 12``)."""
    return 20 * steps + 12


@dataclass(frozen=True)
class _Eval:
    eval_problems: int
    eval_steps: tuple[int, ...]
    search_problems: int
    search_steps: int
    samples: int

    def greedy_sets(self) -> dict[int, list[Problem]]:
        """Held-out problems per step count, for greedy accuracy."""
        from treeward.tasks import generate_problems

        return {s: generate_problems(self.eval_problems, s, seed=HELDOUT_SEED) for s in self.eval_steps}

    def search_set(self) -> list[Problem]:
        """Held-out problems for the search accuracy (the first ones of the same stream as the greedy set)."""
        from treeward.tasks import generate_problems

        return generate_problems(self.search_problems, self.search_steps, seed=HELDOUT_SEED)

    def prompts(self) -> set[str]:
        """Every held-out prompt (training problems must avoid them)."""
        return {p.prompt for ps in [*self.greedy_sets().values(), self.search_set()] for p in ps}

    def run(
        self, policy: HFPolicy, prm: Path | None, *, method: str, iteration: int, seed: int
    ) -> IterationRow:
        """Greedy accuracy per step count, search accuracy and PRM AUC on the held-out problems."""
        from treeward.search import best_of_n, majority_vote
        from treeward.search.core import grade
        from treeward.search.mcts import mcts_star
        from treeward.tasks import ArithmeticAnswer

        outcome, flat = ArithmeticAnswer(), UninformedScorer()
        greedy = {}
        for s, problems in self.greedy_sets().items():
            trees = best_of_n(problems, policy, flat, _cap(s), n=1, temperature=0.0, max_tokens=_cap(s))
            grade(trees, outcome)
            greedy[str(s)] = sum(bool(t.correct) for t in trees) / len(trees)
        cap = _cap(self.search_steps)
        budget = self.samples * cap
        problems = self.search_set()
        auc = None
        if prm is not None:
            scorer = _scorer(prm)
            trees = mcts_star(
                problems, policy, scorer, budget, max_depth=self.search_steps + 2, seed=seed + 7
            )
            kind = "mcts_star+prm"
            auc = _prm_auc(trees, scorer)
        else:
            trees = best_of_n(
                problems,
                policy,
                flat,
                budget,
                n=self.samples,
                temperature=1.0,
                max_tokens=cap,
                aggregate=majority_vote,
                seed=seed + 7,
            )
            kind = f"majority@{self.samples}"
        grade(trees, outcome)
        search = sum(bool(t.correct) for t in trees) / len(trees)
        return IterationRow(
            iteration=iteration, method=method, greedy=greedy, search=search, search_kind=kind, prm_auc=auc
        )


def _training_problems(
    n: int, steps: Sequence[int], *, seed: int, iteration: int, cfg: _Eval
) -> list[Problem]:
    """Fresh problems for iteration ``iteration``: their own seed stream, none of the held-out prompts."""
    from treeward.tasks import generate_problems

    held = cfg.prompts()
    return [
        p
        for p in generate_problems(n, list(steps), seed=10_000 + 100 * seed + iteration)
        if p.prompt not in held
    ]


def _scorer(prm: Path | None) -> Reward:
    from treeward.rewards.model import ProcessRewardModel

    return UninformedScorer() if prm is None else ProcessRewardModel(prm)


def _prm_auc(trees: Sequence[Tree], prm: Reward) -> float | None:
    """ROC AUC of the PRM's score for each step (the last step of each node's path) against the exact step
    verifier's verdict on that step, over every non-duplicate node of ``trees``."""
    from treeward.search.core import path_sample
    from treeward.tasks import ArithmeticSteps
    from treeward.train.value import roc_auc

    refs = [(t, n) for t in trees for n in t.nodes[1:] if n.token_ids and "duplicate_of" not in n.metadata]
    if not refs:
        return None
    samples = [path_sample(t, n) for t, n in refs]
    truth, guess = ArithmeticSteps()(samples), prm(samples)
    scores: list[float] = []
    labels: list[bool] = []
    for a, b in zip(truth, guess, strict=True):
        right, score = (a.step_scores or (None,))[-1], (b.step_scores or (None,))[-1]
        if right is not None and score is not None:
            labels.append(right >= 1.0)
            scores.append(score)
    if not 0 < sum(labels) < len(labels):
        return None
    return roc_auc(scores, labels)


def _collect(
    method: str,
    problems: Sequence[Problem],
    policy: HFPolicy,
    scorer: Reward,
    budget: int,
    *,
    cap: int,
    samples: int,
    seed: int,
    temperature: float,
    max_depth: int,
) -> list[Tree]:
    """The iteration's training trees: best-of-N solutions (ReST-EM) or MCTS* trees (the other two)."""
    from treeward.search import best_of_n, majority_vote
    from treeward.search.mcts import mcts_star

    if method == "rest-em":
        return best_of_n(
            problems,
            policy,
            scorer,
            budget,
            n=samples,
            temperature=temperature,
            max_tokens=cap,
            aggregate=majority_vote,
            seed=seed,
        )
    return mcts_star(
        problems, policy, scorer, budget, max_depth=max_depth, temperature=temperature, seed=seed
    )


# ---------------------------------------------------------------------- training
def _train_prm(
    trees: Sequence[Tree],
    model: PreTrainedModel | None,
    prm_from: Path | None,
    policy_from: Path,
    epochs: int,
    lr: float,
    seed: int,
) -> tuple[PreTrainedModel | None, int]:
    """Train the PRM further on this iteration's trees (from ``prm_from``, else a fresh head on the policy)."""
    from treeward.rewards.model import ProcessRewardModel
    from treeward.train.prm import fit_prm, prm_data

    rows = prm_data(trees, values="mc", threshold=0.5)
    if not rows:
        return model, 0
    if model is None:
        model = ProcessRewardModel(prm_from).load()[0] if prm_from is not None else None
    start: PreTrainedModel | Path = model if model is not None else policy_from
    trained, _ = fit_prm(start, rows, epochs=epochs, lr=lr, seed=seed, log=None)
    return trained, len(rows)


def _verified_traces(method: str, trees: Sequence[Tree], max_traces: int) -> list[SFTExample]:
    """This round's SFT data: up to ``max_traces`` outcome-correct traces per problem, ranked by ReST-MCTS*'s
    inferred values (``rest-mcts``: shortest correct reasoning first) or in sampling order (``rest-em``)."""
    from treeward.credit.pairs import sft_examples
    from treeward.credit.values import rest_values

    if method == "rest-mcts":
        return [e for t in trees for e in sft_examples(t, rest_values(t).values, max_per_problem=max_traces)]
    return [e for t in trees for e in sft_examples(t, max_per_problem=max_traces)]


def _mixed(pool: Sequence[SFTExample], new: Sequence[SFTExample]) -> list[SFTExample]:
    """``pool`` then the traces of ``new`` it does not hold yet (same problem id and completion token ids)."""
    seen = {(e.problem_id, tuple(e.completion_ids)) for e in pool}
    out = list(pool)
    for e in new:
        key = (e.problem_id, tuple(e.completion_ids))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _train_sft(
    traces: Sequence[SFTExample],
    policy: HFPolicy,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    warmup: int,
    seed: int,
) -> tuple[int, tuple[float, float] | None]:
    """SFT on verified traces (ReST-MCTS*, ReST-EM), in place; returns the traces trained on and [first, last]
    loss (0 and ``None`` when there were none)."""
    from treeward.train.sft import train_sft

    if not traces:
        return 0, None
    hist = train_sft(
        policy.model,
        policy.tokenizer,
        traces,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        warmup=warmup,
        seed=seed,
    )
    return len(traces), (hist.losses[0], hist.losses[-1])


def _train_dpo(
    trees: Sequence[Tree],
    policy: HFPolicy,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    beta: float,
    seed: int,
) -> tuple[int, tuple[float, float] | None]:
    """Step-level DPO on completed sibling step pairs (MCTS-DPO), in place, the reference being the policy as it
    is now; returns the pairs trained on and [first, last] loss."""
    from treeward.credit.pairs import step_pairs
    from treeward.credit.values import mc_values
    from treeward.train.prefs import train_dpo

    pairs = [p for t in trees for p in step_pairs(t, mc_values(t).values, complete=True)]
    if not pairs:
        return 0, None
    hist = train_dpo(
        policy.model,
        None,
        policy.tokenizer,
        pairs,
        lr=lr,
        beta=beta,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    return len(pairs), (hist.losses[0], hist.losses[-1])
