"""Tree advantages as a verl advantage estimator: :func:`tree_advantage` and :func:`register`.

verl's trainer hands an estimator only ``token_level_rewards`` [B, T], ``response_mask`` [B, T], ``config`` and
``index`` (``non_tensor_batch["uid"]``, one string per response), so the tree has to travel in the uid. treeward
writes each leaf's uid as its path, TreePO-style, with each step's token count appended::

    "<prompt uid>#<branch>.<tokens>#<branch>.<tokens>..."

``branch`` is the step's index among its parent's children and ``tokens`` its token count, so the tree (which
responses share which steps, and where each step's tokens lie in the response) is rebuilt exactly from the batch.
:func:`leaf_uids` writes these uids from a treeward tree on the rollout side; a uid with no ``#`` (verl's default
prompt uid) is a one-step response, so a flat GRPO batch still works and gives GRPO's advantages under TreeRPO.

Usage, inside the process that runs verl's trainer (verl needs CUDA and is not a treeward dependency)::

    from treeward.train.verl_tree import register
    register("treeward_treerpo", estimator="treerpo")   # then set algorithm.adv_estimator=treeward_treerpo

Departures: a leaf's reward is the sum of its ``token_level_rewards`` (what verl's GRPO does); the returned
``returns`` equal the advantages (as verl's GRPO and RLOO return them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from treeward.credit.advantages import ESTIMATORS, token_advantages
from treeward.credit.records import Advantages
from treeward.tree import Problem, Tree

__all__ = ["UidError", "leaf_uids", "register", "tree_advantage", "trees_from_uids"]


class UidError(ValueError):
    """A uid that does not encode a tree path, or paths that contradict each other or the response mask."""


def leaf_uids(tree: Tree, prompt_uid: str, leaves: Sequence[int] | None = None) -> dict[int, str]:
    """The verl uid of each leaf (default: every leaf) of ``tree``: its path with branch indices and token counts."""
    if "#" in prompt_uid:
        raise UidError(f"prompt uid {prompt_uid!r} contains '#', the path separator")
    out: dict[int, str] = {}
    for leaf in leaves if leaves is not None else [n.id for n in tree.leaves()]:
        parts = [prompt_uid]
        for node in tree.path(leaf)[1:]:
            assert node.parent is not None
            branch = tree.nodes[node.parent].children.index(node.id)
            parts.append(f"{branch}.{len(node.token_ids)}")
        out[leaf] = "#".join(parts)
    return out


def _parse(uid: str, length: int) -> tuple[str, list[tuple[int, int]] | None]:
    """The prompt uid and the path, or ``None`` for a bare prompt uid (a one-step response)."""
    head, *steps = uid.split("#")
    if not steps:
        return head, None
    path: list[tuple[int, int]] = []
    for s in steps:
        branch, _, tokens = s.partition(".")
        if not (branch.isdigit() and tokens.isdigit()):
            raise UidError(f"uid {uid!r}: step {s!r} is not '<branch>.<tokens>'")
        path.append((int(branch), int(tokens)))
    if sum(t for _, t in path) != length:
        raise UidError(
            f"uid {uid!r} names {sum(t for _, t in path)} tokens but its response mask has {length}"
        )
    return head, path


def trees_from_uids(uids: Sequence[str], lengths: Sequence[int]) -> tuple[list[Tree], list[tuple[int, int]]]:
    """Rebuild one tree per prompt uid from the rows' path uids; returns the trees and each row's (tree, leaf).

    Node token ids are placeholders (zeros) of the right count: the estimator needs the structure and the token
    counts, never the tokens. Two rows with the same path are an error (a leaf is one sample).
    """
    if len(uids) != len(lengths):
        raise UidError(f"{len(uids)} uids for {len(lengths)} responses")
    trees: dict[str, Tree] = {}
    nodes: dict[tuple[str, tuple[tuple[int, int], ...]], int] = {}
    rows: list[tuple[str, int]] = []
    for uid, length in zip(uids, lengths, strict=True):
        head, path = _parse(str(uid), int(length))
        tree = trees.setdefault(head, Tree.new(Problem(id=head, prompt=""), []))
        if path is None:  # verl's own uid: every response of the prompt is its own one-step leaf
            rows.append((head, tree.add(0, text="", token_ids=[0] * int(length)).id))
            continue
        parent = 0
        for k in range(len(path)):
            key = (head, tuple(path[: k + 1]))
            if key not in nodes:
                nodes[key] = tree.add(parent, text="", token_ids=[0] * path[k][1]).id
            parent = nodes[key]
        if tree.nodes[parent].children:
            raise UidError(f"uid {uid!r} ends at an inner node: another row's path continues past it")
        if any(r == (head, parent) for r in rows):
            raise UidError(f"two rows share the path {uid!r}; each response must be its own leaf")
        rows.append((head, parent))
    for head, leaf in rows:
        if trees[head].nodes[leaf].children:
            raise UidError(
                f"a row ends at node {leaf} of prompt {head!r}, which another row's path continues"
            )
    order = list(trees)
    return [trees[h] for h in order], [(order.index(h), leaf) for h, leaf in rows]


def tree_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[str],
    config: Any = None,
    *,
    estimator: Callable[[Tree, Mapping[int, float]], Advantages] | str = "treerpo",
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's estimator signature: ``(token_level_rewards [B, T], response_mask [B, T], index [B] uids, config)`` →
    ``(advantages [B, T], returns [B, T])``, with any treeward estimator (a name of
    :data:`treeward.credit.advantages.ESTIMATORS` or a function) run on the trees the uids encode.

    Each response's tokens are laid out left to right in its mask (verl right-pads responses); a row whose reward
    the estimator excluded gets zeros.
    """
    fn = ESTIMATORS[estimator] if isinstance(estimator, str) else estimator
    mask = response_mask.bool()
    lengths = mask.sum(dim=1).tolist()
    trees, rows = trees_from_uids(list(index), lengths)
    totals = (token_level_rewards * response_mask).sum(dim=1).tolist()
    rewards: list[dict[int, float]] = [{} for _ in trees]
    for (ti, leaf), r in zip(rows, totals, strict=True):
        rewards[ti][leaf] = float(r)
    advs = [fn(tree, rw) for tree, rw in zip(trees, rewards, strict=True)]
    by_leaf = [
        dict(zip(a.leaves, token_advantages(t, a), strict=True)) for t, a in zip(trees, advs, strict=True)
    ]
    out = torch.zeros_like(token_level_rewards, dtype=torch.float32)
    for b, (ti, leaf) in enumerate(rows):
        row = by_leaf[ti].get(leaf)
        if row is not None:
            out[b, mask[b]] = torch.as_tensor(row, dtype=torch.float32)
    return out, out.clone()


def register(name: str = "treeward_tree", *, estimator: str = "treerpo") -> Callable[..., Any]:
    """Register :func:`tree_advantage` with ``estimator`` in verl under ``name`` (needs verl installed)."""
    if estimator not in ESTIMATORS:
        raise KeyError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
    try:
        from verl.trainer.ppo.core_algos import register_adv_est
    except ImportError as e:
        raise ImportError(
            "register() needs verl (pip install verl, a CUDA build); tree_advantage itself does not"
        ) from e

    def fn(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: Any = None,
        config: Any = None,
        **kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tree_advantage(token_level_rewards, response_mask, index, config, estimator=estimator)

    fn.__name__ = name
    registered: Callable[..., Any] = register_adv_est(name)(fn)
    return registered
