"""Model-based rewards: classifier reward models and PRMs through transformers, and the endogenous reward.

* :class:`ClassifierReward`: an outcome reward model, any ``AutoModelForSequenceClassification`` folder (the shipped
  one is ``treeward._paths.SHIPPED_RM``, trained by :mod:`treeward.train.value`); one logit per response.
* :class:`ProcessRewardModel`: a PRM, any ``AutoModelForTokenClassification`` folder (one logit per step) or a
  causal LM whose config names two label tokens (:data:`PRM_LABELS_KEY`; Math-Shepherd's LM-head PRM), read at the
  step's last token, reduced to a score by the reducers of :mod:`treeward.rewards.process`.
* :class:`EndogenousReward`: the reward that a causal LM's own logits define (Li et al. 2025, "Generalist Reward
  Models: Found Inside Large Language Models"), through the engine's teacher-forced :meth:`Policy.score`.

How text becomes tokens (the same everywhere, and in :mod:`treeward.train.value`, so a model is scored on exactly
the input layout it was trained on): BOS when the tokenizer has one, then the prompt, then each piece of the
response (the whole response, or each step), every part tokenized on its own with no special tokens added
(:func:`encode_pieces`). No chat template is applied: a chat RM needs its conversation rendered into
``Sample.prompt`` / ``Sample.response`` by the caller.

Every result carries ``info["scored_tokens"]``: the token positions the scorer ran for that sample (0 when it was
not scored), which search books in the ledger's scorer-token column.

The rewards keep the model's path and load it on first use, so they pickle cheaply (the loaded model is not
pickled) and cross process boundaries. Importing this module is cheap: torch and transformers load with the model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.rewards.process import MinStep, Reducer, Refinement

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from treeward.engine.base import Policy

__all__ = [
    "PRM_LABELS_KEY",
    "ClassifierReward",
    "EndogenousReward",
    "ProcessRewardModel",
    "encode_pieces",
    "label_logits",
    "position_logits",
    "prm_label_ids",
    "split_steps",
    "step_positions",
]


# --- inputs: tokens and positions ------------------------------------------------------------------------------


def step_positions(prompt_len: int, step_lengths: Sequence[int]) -> list[int]:
    """Index of each step's last token in ``prompt + step_1 + ... + step_S``: ``[S]``.

    ``positions[k] = prompt_len + len(step_1) + ... + len(step_{k+1}) - 1``. A step with no tokens has no last
    token: ``ValueError``.
    """
    if prompt_len < 0:
        raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
    out, end = [], prompt_len
    for k, n in enumerate(step_lengths):
        if n < 1:
            raise ValueError(f"step {k + 1} has {n} tokens; every step needs at least one to be read at")
        end += n
        out.append(end - 1)
    return out


def encode_pieces(
    tokenizer: PreTrainedTokenizerBase, prompt: str, pieces: Sequence[str]
) -> tuple[list[int], int, list[int]]:
    """The scorer input ``[BOS] + prompt + piece_1 + ... + piece_S`` (each part tokenized alone, no special tokens).

    Returns ``(ids [T], prompt_len, piece_lengths [S])``; ``prompt_len`` counts the BOS.
    """
    bos = tokenizer.bos_token_id
    ids: list[int] = [bos] if isinstance(bos, int) else []
    ids += tokenizer.encode(prompt, add_special_tokens=False)
    prompt_len = len(ids)
    lengths = []
    for piece in pieces:
        part = tokenizer.encode(piece, add_special_tokens=False) if piece else []
        ids += part
        lengths.append(len(part))
    return ids, prompt_len, lengths


def split_steps(text: str) -> list[str]:
    """A response cut into steps at newlines, each step keeping its newline(s): ``"".join(steps) == text``.

    Blank lines are not steps: they stay attached to the step before them (or, at the start, to the first step).
    Text with no non-blank character has no steps (``[]``). This is the cut the engine makes when it expands with
    ``stop="\\n"``, so a tree's steps and a split response tokenize alike.
    """
    out: list[str] = []
    lead = ""
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):
        if not line.strip():
            if out:
                out[-1] += line
            else:
                lead += line
        else:
            out.append(lead + line)
            lead = ""
    return out


def position_logits(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logit 0 of a classifier at chosen positions: ``[B, P]`` from ``ids``/``mask`` [B, T] and ``positions`` [B, P].

    A token classifier (logits [B, T, labels]) is read at every position asked for. A sequence classifier gives one
    logit per row, at the row's last real token (transformers pools the rightmost non-pad token), so each row must
    ask for exactly that position (padding the positions with it is fine); anything else is a ``ValueError``.
    Positions past a row's length are read anyway (callers mask them).
    """
    out = model(input_ids=ids, attention_mask=mask).logits
    if out.dim() == 3:
        return out[..., 0].gather(1, positions)
    last = mask.sum(1) - 1  # right padding: the last real token of each row
    if not bool((positions == last[:, None]).all()):
        raise ValueError(
            "a sequence classifier is read at each row's last token only; use a token classifier "
            "(AutoModelForTokenClassification) to read other positions"
        )
    pad = model.config.get_text_config().pad_token_id
    if pad is not None and bool((ids.gather(1, last[:, None]) == pad).any()):
        raise ValueError(f"a row ends with the pad token {pad}; the sequence classifier cannot find its end")
    return out[:, :1].expand(-1, positions.shape[1])


PRM_LABELS_KEY = "prm_label_ids"
"""The ``config.json`` key of an LM-head PRM: ``[good_id, bad_id]``, the two label tokens whose logits give a step's
score (:func:`label_logits`). A causal-LM folder without it is a policy, not a PRM."""


def prm_label_ids(config: dict[str, Any]) -> tuple[int, int] | None:
    """The ``(good, bad)`` label token ids an LM-head PRM's config (as a dict) names under :data:`PRM_LABELS_KEY`;
    ``None`` when it names none. A malformed entry (not two different non-negative ints) is a ``ValueError``."""
    ids = config.get(PRM_LABELS_KEY)
    if ids is None:
        return None
    if not (
        isinstance(ids, (list, tuple))
        and len(ids) == 2
        and all(isinstance(i, int) and i >= 0 for i in ids)
        and ids[0] != ids[1]
    ):
        raise ValueError(f"{PRM_LABELS_KEY} must be two different token ids [good, bad], got {ids!r}")
    return int(ids[0]), int(ids[1])


def label_logits(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    labels: tuple[int, int],
) -> torch.Tensor:
    """An LM-head PRM's step logit at chosen positions: ``logit[good] − logit[bad]`` of the causal LM's next-token
    logits, ``[B, P]`` from ``ids``/``mask`` [B, T] and ``positions`` [B, P].

    ``σ`` of it is the softmax over the two label tokens alone, Math-Shepherd's ``p("+")`` (the other tokens'
    logits do not enter). Positions past a row's length are read anyway (callers mask them).
    """
    out = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    good, bad = labels
    diff = out[..., good] - out[..., bad]
    return diff.gather(1, positions)


# --- loading ---------------------------------------------------------------------------------------------------


def _check_folder(path: str | os.PathLike[str]) -> str:
    """:func:`treeward.engine.hf.check_model_path`, imported on use (it loads torch and transformers)."""
    from treeward.engine.hf import check_model_path

    return check_model_path(path)


def _lm_head_prm(path: str) -> bool:
    """Whether the folder's config names PRM label tokens (:data:`PRM_LABELS_KEY`): an LM-head PRM."""
    from transformers import AutoConfig

    return prm_label_ids(AutoConfig.from_pretrained(path).to_dict()) is not None


def _load_classifier(
    path: str, *, token_level: bool, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A classifier and its tokenizer, float32, eval mode; every weight must come from the folder. With
    ``token_level``, a folder whose config names PRM label tokens loads as the causal LM it is (an LM-head PRM)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from treeward.engine.hf import ModelLoadError

    kind = "token-classification" if token_level else "sequence-classification"
    auto: Any = AutoModelForTokenClassification if token_level else AutoModelForSequenceClassification
    try:
        if token_level and _lm_head_prm(path):
            kind, auto = "LM-head PRM (causal LM)", AutoModelForCausalLM
        model, loading = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # re-raised with the path first; the cause stays chained
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load a {kind} model and tokenizer from {path}: {reason}") from e
    missing = sorted(loading["missing_keys"])
    if missing:
        raise ModelLoadError(
            f"{path} is not a trained {kind} model: weights {missing[:4]} are not in the folder (a causal LM, or "
            f"the other kind of classifier?); train one with treeward.train.value"
        )
    model.to(torch.device(device))
    model.eval()
    return model, tokenizer


def _context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Most tokens the model takes: the smaller of the config's position limit and the tokenizer's, when set."""
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 10**9 else []
    positions = model.config.get_text_config().to_dict().get("max_position_embeddings")
    if isinstance(positions, int):
        limits.append(positions)
    return min(limits) if limits else None


def _read_rows(
    model: PreTrainedModel,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    device: str,
    one_per_forward: bool = False,
    read: Callable[..., torch.Tensor] = position_logits,
) -> list[list[float] | Exception]:
    """``read``'s logit (default logit 0, :func:`position_logits`) at each row's positions, for rows
    ``(ids, positions)``: batched by length, right-padded.

    A forward that raises makes every row of its chunk that exception (the caller turns it into a status).
    Padding never changes a real position's logit (causal attention, 2D mask), so the numbers match one row at a
    time up to float rounding.
    """
    import torch

    from treeward.train._batch import pad_right

    pad = model.config.get_text_config().pad_token_id
    pad_id = pad if isinstance(pad, int) else 0
    size = 1 if one_per_forward else batch_size
    out: list[list[float] | Exception] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        try:
            ids, mask = pad_right([rows[i][0] for i in chunk], pad_id)
            width = max(len(rows[i][1]) for i in chunk)
            # positions [B, P], each row padded with its own last position (read, then dropped below)
            pos = torch.tensor([[*rows[i][1]] + [rows[i][1][-1]] * (width - len(rows[i][1])) for i in chunk])
            with torch.inference_mode():
                logits = read(model, ids.to(device), mask.to(device), pos.to(device)).float().cpu()
            for b, i in enumerate(chunk):
                out[i] = logits[b, : len(rows[i][1])].tolist()
        except Exception as e:  # a failed forward is a status on its samples, not a crashed batch
            for i in chunk:
                out[i] = e
    return out


def _forward_error(e: Exception) -> RewardResult:
    return RewardResult(
        None,
        Status.EXEC_ERROR,
        info={"reason": f"forward failed: {type(e).__name__}: {e}", "error": repr(e), "scored_tokens": 0},
    )


def _too_long(n: int, context: int) -> RewardResult:
    return RewardResult(
        None,
        Status.NOT_APPLICABLE,
        info={
            "reason": f"{n} tokens exceed the model's context of {context}",
            "tokens": n,
            "scored_tokens": 0,
        },
    )


def _filled(out: list[RewardResult | None]) -> list[RewardResult]:
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise AssertionError(f"samples {missing[:5]} got no result")  # a bug in this module, never input
    return [r for r in out if r is not None]


def _squash(logit: float, sigmoid: bool) -> float:
    if not sigmoid:
        return logit
    return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))


class _ModelHandle:
    """A classifier's path and, once loaded, the model and tokenizer; pickles as the path alone."""

    def __init__(self, path: str | os.PathLike[str], *, token_level: bool, device: str) -> None:
        self.path = _check_folder(path)
        self.token_level = token_level
        self.device = device
        self._loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer (loaded on first use; :class:`~treeward.engine.hf.ModelLoadError` if broken)."""
        if self._loaded is None:
            self._loaded = _load_classifier(self.path, token_level=self.token_level, device=self.device)
        return self._loaded


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


# --- the rewards -----------------------------------------------------------------------------------------------


class ClassifierReward:
    """An outcome reward model: a sequence classifier's logit 0 for ``prompt + response``.

    The reward-model reading of InstructGPT (Ouyang et al. 2022) and of RewardBench's classifier path: a scalar
    head on the last token of the response. ``sigmoid=True`` (default) reports ``σ(logit)``, the probability of
    "correct" for a model trained with a binary loss such as the shipped one; ``False`` reports the raw logit, as
    RewardBench does for Bradley–Terry models. Components: ``logit``.

    Not scored (``None``): a partial prefix (an outcome model judges complete responses; ``score_partial=True``
    scores prefixes too), an input longer than the model's context (``n/a`` with the reason; with
    ``truncate=True`` the oldest tokens are dropped instead and ``info["truncated"]`` says how many), and a forward
    pass that raises (``exec_error``). ``info["scored_tokens"]`` is the input length.

    Departures: no chat template (see the module docstring); logit 0 is read whatever the number of labels.

    The shipped RM (``SHIPPED_RM``) separates right from wrong answers across problems (held-out AUC 0.77) but not
    among the answers to one problem (AUC 0.51): it learned difficulty. See :mod:`treeward.train.value`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 16,
        device: str = "cpu",
        sigmoid: bool = True,
        truncate: bool = False,
        score_partial: bool = False,
        name: str | None = None,
    ) -> None:
        self._model = _ModelHandle(path, token_level=False, device=device)
        self.path = self._model.path
        self.batch_size = _check_batch_size(batch_size)
        self.device = device
        self.sigmoid = sigmoid
        self.truncate = truncate
        self.score_partial = score_partial
        self.name: str = name or f"rm_{Path(self.path).name}"
        self.__name__ = self.name

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer (loaded on first use; :class:`~treeward.engine.hf.ModelLoadError` if broken)."""
        return self._model.load()

    def __repr__(self) -> str:
        return f"ClassifierReward({self.path!r}, name={self.name!r})"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        model, tokenizer = self.load()
        context = _context(model, tokenizer)
        out: list[RewardResult | None] = [None] * len(samples)
        rows: list[tuple[list[int], list[int]]] = []
        where: list[tuple[int, dict[str, Any]]] = []
        for i, s in enumerate(samples):
            if s.partial and not self.score_partial:
                out[i] = RewardResult(
                    None,
                    Status.NOT_APPLICABLE,
                    info={"reason": "partial prefix (score_partial=False)", "scored_tokens": 0},
                )
                continue
            ids, _, _ = encode_pieces(tokenizer, s.prompt, [s.response])
            info: dict[str, Any] = {}
            if context is not None and len(ids) > context:
                if not self.truncate:
                    out[i] = _too_long(len(ids), context)
                    continue
                info["truncated"] = len(ids) - context
                ids = ids[-context:]
            info["scored_tokens"] = len(ids)
            rows.append((ids, [len(ids) - 1]))
            where.append((i, info))
        read = _read_rows(
            model,
            rows,
            batch_size=self.batch_size,
            device=self.device,
            one_per_forward=model.config.get_text_config().pad_token_id is None,
        )
        for (i, info), logits in zip(where, read, strict=True):
            if isinstance(logits, Exception):
                out[i] = _forward_error(logits)
                continue
            logit = logits[0]
            if not math.isfinite(logit):
                out[i] = RewardResult(
                    None, Status.EXEC_ERROR, info={**info, "reason": f"non-finite logit {logit!r}"}
                )
                continue
            out[i] = RewardResult(_squash(logit, self.sigmoid), components={"logit": logit}, info=info)
        return _filled(out)


class ProcessRewardModel:
    """A process reward model: a model read at the last token of every step, reduced to one score.

    The PRM of Lightman et al. (2023, "Let's Verify Step by Step") and Math-Shepherd (Wang et al. 2024): one
    score per step, each the model's belief that the solution so far is on track. Step ``k``'s score is
    ``σ(logit)`` (or the raw logit, ``sigmoid=False``) at the last token of step ``k``
    (:func:`step_positions`); ``score = reduce(step_scores)``, :class:`~treeward.rewards.process.MinStep` by
    default (Snell et al. 2024's choice for PRM-guided search), or any reducer of
    :mod:`treeward.rewards.process` (``LastStep``, ``MeanSteps``, Gao et al.'s ``ClipSteps`` / ``DeltaSteps``,
    whose refined per-step rewards go to ``info["shaped_steps"]``).

    The folder says which head the logit comes from (:attr:`head`, known once loaded):

    * ``"token"``: an ``AutoModelForTokenClassification`` folder; the logit is its one-logit head (as TRL's
      ``PRMTrainer`` trains it).
    * ``"lm"``: a causal-LM folder whose ``config.json`` names two label tokens under :data:`PRM_LABELS_KEY`
      (Math-Shepherd's design: the PRM is a language model, a step's score its probability of the "good" token
      against the "bad" one); the logit is ``logit[good] − logit[bad]`` of the LM's next-token logits
      (:func:`label_logits`), so ``σ(logit)`` is the softmax over the two label tokens.

    Steps are ``Sample.steps``; when it is empty the response is cut at newlines (:func:`split_steps`; blank
    lines are not steps) and ``info["steps_from"]`` says ``"newlines"``. Partial prefixes are scored like
    complete ones: the model is causal, so a prefix's step scores are the first step scores of any completion
    of it. ``info`` also holds ``positions`` [S] (token indices read) and ``scored_tokens``.

    Not scored (``None``, ``n/a``): no steps, a step with no tokens, an input longer than the model's context (no
    truncation: dropping early tokens would shift every step); a forward that raises is ``exec_error``.

    Departures: Math-Shepherd appends a step tag token after every step and reads the label tokens there; the
    LM head here is read at each step's own last token (no tag is inserted, so the input is the solution text
    as the policy wrote it); no chat template.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reduce: Reducer = MinStep(),  # noqa: B008  # a frozen, immutable reducer
        batch_size: int = 16,
        device: str = "cpu",
        sigmoid: bool = True,
        name: str | None = None,
    ) -> None:
        self._model = _ModelHandle(path, token_level=True, device=device)
        self.path = self._model.path
        self.batch_size = _check_batch_size(batch_size)
        self.device = device
        self.reduce = reduce
        self.sigmoid = sigmoid
        self.name: str = name or f"prm_{Path(self.path).name}_{reduce.name}"
        self.__name__ = self.name

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer (loaded on first use; :class:`~treeward.engine.hf.ModelLoadError` if broken)."""
        return self._model.load()

    @property
    def head(self) -> str:
        """``"lm"`` for an LM-head PRM (its config names label tokens), else ``"token"`` (loads the model)."""
        return "token" if prm_label_ids(self.load()[0].config.to_dict()) is None else "lm"

    def __repr__(self) -> str:
        return f"ProcessRewardModel({self.path!r}, reduce={self.reduce!r}, name={self.name!r})"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        model, tokenizer = self.load()
        context = _context(model, tokenizer)
        out: list[RewardResult | None] = [None] * len(samples)
        rows: list[tuple[list[int], list[int]]] = []
        where: list[tuple[int, dict[str, Any]]] = []
        for i, s in enumerate(samples):
            steps = list(s.steps) if s.steps else split_steps(s.response)
            source = "steps" if s.steps else "newlines"
            if not steps:
                out[i] = RewardResult(
                    None, Status.NOT_APPLICABLE, info={"reason": "no steps", "scored_tokens": 0}
                )
                continue
            ids, prompt_len, lengths = encode_pieces(tokenizer, s.prompt, steps)
            empty = [k + 1 for k, n in enumerate(lengths) if n == 0]
            if empty:
                reason = f"step {empty[0]} of {len(steps)} has no tokens"
                out[i] = RewardResult(
                    None, Status.NOT_APPLICABLE, info={"reason": reason, "scored_tokens": 0}
                )
                continue
            if context is not None and len(ids) > context:
                out[i] = _too_long(len(ids), context)
                continue
            positions = step_positions(prompt_len, lengths)
            rows.append((ids, positions))
            where.append((i, {"scored_tokens": len(ids), "positions": positions, "steps_from": source}))
        labels = prm_label_ids(model.config.to_dict())
        read = _read_rows(
            model,
            rows,
            batch_size=self.batch_size,
            device=self.device,
            read=position_logits if labels is None else partial(label_logits, labels=labels),
        )
        for (i, info), logits in zip(where, read, strict=True):
            if isinstance(logits, Exception):
                out[i] = _forward_error(logits)
                continue
            bad = [k + 1 for k, x in enumerate(logits) if not math.isfinite(x)]
            if bad:
                reason = f"non-finite logit at step {bad[0]}"
                out[i] = RewardResult(None, Status.EXEC_ERROR, info={**info, "reason": reason})
                continue
            scores = [_squash(x, self.sigmoid) for x in logits]
            if isinstance(self.reduce, Refinement):
                info["shaped_steps"] = self.reduce.transform(scores)
            out[i] = RewardResult(
                self.reduce(scores),
                components={"steps": float(len(scores))},
                step_scores=tuple(scores),
                info=info,
            )
        return _filled(out)


class EndogenousReward:
    """The endogenous reward of a causal LM (Li et al. 2025, "Generalist Reward Models: Found Inside Large Language
    Models", arXiv 2506.23235), computed from teacher-forced log-probabilities (:meth:`Policy.score`).

    The paper reads an LM's logits ``f`` as a soft Q-function, ``Q = α·f``, with soft value
    ``V(s) = α·logsumexp f(s, ·)``, and defines the token reward by the inverse soft Bellman equation
    ``r(s_h, a_h) = Q(s_h, a_h) − V(s_{h+1})``. Since ``α·log π(a|s) = Q(s, a) − V(s)``, a response's return
    telescopes::

        Σ_h r(s_h, a_h) = α·Σ_h log π(a_h | s_h) + V(s_1) − V(s_{H+1})

    **This reward is** ``score = α·Σ_h log π(a_h | s_h)`` over the response tokens, plus the EOS token when the
    sample is complete (``partial=False``) and the policy has an EOS. That is the paper's return minus
    ``V(s_1)``, the soft value of the prompt:

    * ``V(s_{H+1}) = 0`` for a complete response: the episode ends at EOS, and past a terminal state the
      finite-horizon soft Bellman equation has no continuation value. (An implementation that instead reads the
      LM's logits after EOS would differ by that logsumexp.)
    * ``V(s_1)`` is dropped: log-probabilities cannot recover it (softmax forgets the logits' offset), and it is
      the same for every response to one prompt, so rankings of a group's responses, and group-relative
      advantages (GRPO), are unchanged. Scores of different prompts are not comparable.
    * For a partial prefix (no EOS) the result is the prefix's log-likelihood: the paper's return minus
      ``V(s_1) − V(s_{H+1})``, the second term depending on the prefix. ``info["dropped"]`` names what was left
      out for each sample.

    **Step level** (``reduce`` given): the per-token rewards are summed within each step of ``Sample.steps``
    (each step tokenized alone; the EOS belongs to the last step) into ``step_scores``, and the score is
    ``reduce(step_scores)`` (e.g. :class:`~treeward.rewards.process.MinStep`): a process reward with no training.
    This is a departure: the paper scores whole responses. Measured on the shipped policy's own tree rollouts
    (60 held-out 4-step problems, 1,798 steps): a step's summed log-probability predicts the exact step verifier's
    verdict with AUC 0.945, and the minimum over a path predicts "every step so far is right" with AUC 0.935, where
    the learned PRM reaches 0.61.

    Knobs: ``alpha`` is the paper's temperature α (a positive scale here; default 1, i.e. the logits are Q);
    ``instruction`` is text put before the prompt in the context (the paper conditions the model on a judging
    instruction; its wording is not reproduced, so the default is none). Components: ``logprob`` (the sum, α
    not applied) and ``tokens`` (response tokens scored). ``info["scored_tokens"]`` counts the teacher-forced
    positions of the sample (``prefix + continuation − 1``) whether or not the engine's prefix cache served some
    of them; the engine books its exact computed/reused split in its own ledger (to no group).

    ``policy`` is a :class:`~treeward.engine.base.Policy`, or the path of a causal-LM folder, loaded on first use
    as an :class:`~treeward.engine.hf.HFPolicy` (then pickling keeps the path only). A failing ``score`` call
    makes every sample of the batch ``exec_error``; an empty partial response is ``n/a``.
    """

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str],
        *,
        alpha: float = 1.0,
        instruction: str | None = None,
        reduce: Reducer | None = None,
        device: str = "cpu",
        name: str = "endogenous",
    ) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if isinstance(policy, (str, os.PathLike)):
            self.path: str | None = _check_folder(policy)
            self._policy: Policy | None = None
        else:
            self.path = None
            self._policy = policy
        self.alpha = alpha
        self.instruction = instruction
        self.reduce = reduce
        self.device = device
        self.name = name
        self.__name__ = name

    def __repr__(self) -> str:
        return (
            f"EndogenousReward({self.path or self._policy!r}, alpha={self.alpha}, reduce={self.reduce!r}, "
            f"name={self.name!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_policy"] = None
        return state

    @property
    def policy(self) -> Policy:
        """The scoring policy (loaded from ``path`` on first use)."""
        if self._policy is None:
            from treeward.engine.hf import HFPolicy

            assert self.path is not None  # one of the two is always set
            self._policy = HFPolicy.from_pretrained(self.path, device=self.device)
        return self._policy

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        policy = self.policy
        eos = policy.eos_token_id
        out: list[RewardResult | None] = [None] * len(samples)
        todo: list[tuple[int, list[int], list[int], str]] = []
        pieces: dict[int, list[int]] = {}  # sample index -> tokens per step (step level only)
        for i, s in enumerate(samples):
            prefix = policy.encode_prompt((self.instruction or "") + s.prompt)
            if self.reduce is not None:
                steps = list(s.steps) if s.steps else ([s.response] if s.response else [])
                parts = [policy.encode(st) for st in steps]
                pieces[i] = [len(p) for p in parts]
                cont = [t for p in parts for t in p]
            else:
                cont = policy.encode(s.response) if s.response else []
            terminal = False
            if not s.partial and eos is not None:
                cont.append(eos)
                terminal = True
                if i in pieces:  # the EOS closes the last step (or is the only one)
                    pieces[i] = [*pieces[i][:-1], pieces[i][-1] + 1] if pieces[i] else [1]
            if not cont:
                out[i] = RewardResult(
                    None,
                    Status.NOT_APPLICABLE,
                    info={"reason": "empty partial response", "scored_tokens": 0},
                )
                continue
            dropped = "V(s_1)" if terminal else "V(s_1) - V(s_{H+1})"
            todo.append((i, prefix, cont, dropped))
        try:
            lps = policy.score([p for _, p, _, _ in todo], [c for _, _, c, _ in todo]) if todo else []
            if len(lps) != len(todo):
                raise ValueError(f"policy.score returned {len(lps)} rows for {len(todo)} pairs")
        except Exception as e:  # a failed scoring call is a status on its samples
            for i, _, _, _ in todo:
                out[i] = _forward_error(e)
            return _filled(out)
        for (i, prefix, cont, dropped), lp in zip(todo, lps, strict=True):
            total = math.fsum(lp)
            info = {"scored_tokens": len(prefix) + len(cont) - 1, "dropped": dropped}
            if not math.isfinite(total):
                out[i] = RewardResult(
                    None, Status.EXEC_ERROR, info={**info, "reason": f"non-finite log-probability {total!r}"}
                )
                continue
            if self.reduce is None:
                out[i] = RewardResult(
                    self.alpha * total, components={"logprob": total, "tokens": float(len(cont))}, info=info
                )
                continue
            step_scores: list[float] = []
            at = 0
            for n in pieces[i]:
                step_scores.append(self.alpha * math.fsum(lp[at : at + n]))
                at += n
            out[i] = RewardResult(
                float(self.reduce(step_scores)),
                components={"logprob": total, "tokens": float(len(cont))},
                step_scores=tuple(step_scores),
                info=info,
            )
        return _filled(out)
