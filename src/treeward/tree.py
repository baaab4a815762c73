"""The search tree: one record that travels from search to credit assignment to training.

A :class:`Tree` holds one :class:`Problem` and a flat list of :class:`Node` s. Node ``0`` is the root; its
``token_ids`` are the tokenised prompt. Every other node is one reasoning *step*: the token ids the policy generated
for it (never re-tokenised text), their log-probabilities, and whatever search and scoring wrote on it.

Fields, per node (shapes in brackets):

==================  =========================================================================================
``id``              int, index of the node in ``tree.nodes``
``parent``          int or ``None`` (root)
``depth``           int, 0 at the root, parent's depth + 1 otherwise
``text``            str, the decoded step (for the root: the prompt)
``token_ids``       tuple[int] [L], the step's tokens as generated (root: the prompt's tokens)
``logprobs``        tuple[float] [L] (or empty for the root), log p(token | prefix) under the sampling policy
                    at temperature 1 of the distribution actually sampled from
``finish_reason``   ``"stop"`` (step delimiter), ``"eos"``, ``"length"`` (cut by a token cap) or ``None`` (root)
``reward``          float or ``None``, the step reward a process scorer gave this step
``status``          str, ``"ok"`` or why ``reward`` is missing (``"timeout"``, ``"exec_error"``, ...)
``value``           float or ``None``, a value estimate written by search or credit assignment
``visits``          int, visit count (MCTS-style searches)
``terminal``        bool, the path ends here (an answer was given, EOS, or the step was cut)
``answer``          str or ``None``, the final answer parsed at a terminal node
``outcome``         float or ``None``, the outcome reward of the path ending here
``metadata``        dict, JSON-serialisable extras
==================  =========================================================================================

Records are plain dataclasses so that a search can update ``visits`` and ``value`` in place while it runs; every
function downstream (``credit``) treats them as read-only and returns new arrays.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Node", "Problem", "Tree", "TreeFormatError", "iter_jsonl", "read_jsonl", "write_jsonl"]

FINISH_REASONS = ("stop", "eos", "length")


class TreeFormatError(ValueError):
    """A tree record that cannot be read back (malformed JSON or a broken invariant)."""


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt given to the policy and, when known, the reference answer."""

    id: str
    prompt: str
    answer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(
            id=str(d["id"]), prompt=d["prompt"], answer=d.get("answer"), metadata=dict(d.get("metadata", {}))
        )


@dataclass
class Node:
    """One step of a search tree. See the module docstring for the meaning and shape of each field."""

    id: int
    parent: int | None
    depth: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    reward: float | None = None
    status: str = "ok"
    value: float | None = None
    visits: int = 0
    terminal: bool = False
    answer: str | None = None
    outcome: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    children: list[int] = field(default_factory=list, repr=False)

    @property
    def logprob(self) -> float:
        """Sum of the step's token log-probabilities (0.0 for the root)."""
        return math.fsum(self.logprobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "depth": self.depth,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "finish_reason": self.finish_reason,
            "reward": self.reward,
            "status": self.status,
            "value": self.value,
            "visits": self.visits,
            "terminal": self.terminal,
            "answer": self.answer,
            "outcome": self.outcome,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        return cls(
            id=int(d["id"]),
            parent=None if d["parent"] is None else int(d["parent"]),
            depth=int(d["depth"]),
            text=d["text"],
            token_ids=tuple(int(t) for t in d["token_ids"]),
            logprobs=tuple(float(x) for x in d.get("logprobs", ())),
            finish_reason=d.get("finish_reason"),
            reward=d.get("reward"),
            status=d.get("status", "ok"),
            value=d.get("value"),
            visits=int(d.get("visits", 0)),
            terminal=bool(d.get("terminal", False)),
            answer=d.get("answer"),
            outcome=d.get("outcome"),
            metadata=dict(d.get("metadata", {})),
        )


@dataclass
class Tree:
    """A search tree over one problem.

    ``chosen`` is the id of the node whose path is the search's final answer (or ``None`` if the search produced
    none); ``answer`` is that node's answer. ``ledger`` holds the compute booked for this problem (generated,
    computed and reused tokens, engine calls); ``metadata`` holds the algorithm's knobs and anything else it reports.
    """

    problem: Problem
    nodes: list[Node] = field(default_factory=list)
    algorithm: str = ""
    chosen: int | None = None
    answer: str | None = None
    ledger: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def new(cls, problem: Problem, prompt_ids: Sequence[int], *, algorithm: str = "") -> Tree:
        """A tree holding only its root, whose tokens are the tokenised prompt."""
        root = Node(id=0, parent=None, depth=0, text=problem.prompt, token_ids=tuple(prompt_ids))
        return cls(problem=problem, nodes=[root], algorithm=algorithm)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add(
        self,
        parent: int,
        *,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float] = (),
        finish_reason: str | None = None,
        **fields: Any,
    ) -> Node:
        """Append a child of ``parent`` and return it. Extra keyword fields are set on the node."""
        if not 0 <= parent < len(self.nodes):
            raise IndexError(f"parent {parent} is not a node of this tree ({len(self.nodes)} nodes)")
        if logprobs and len(logprobs) != len(token_ids):
            raise ValueError(f"{len(logprobs)} logprobs for {len(token_ids)} tokens")
        node = Node(
            id=len(self.nodes),
            parent=parent,
            depth=self.nodes[parent].depth + 1,
            text=text,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            finish_reason=finish_reason,
            **fields,
        )
        self.nodes.append(node)
        self.nodes[parent].children.append(node.id)
        return node

    # ------------------------------------------------------------------ navigation
    def children(self, node_id: int) -> list[Node]:
        return [self.nodes[c] for c in self.nodes[node_id].children]

    def path(self, node_id: int) -> list[Node]:
        """Nodes from the root to ``node_id``, both included."""
        out: list[Node] = []
        cur: int | None = node_id
        while cur is not None:
            out.append(self.nodes[cur])
            cur = self.nodes[cur].parent
        out.reverse()
        return out

    def steps(self, node_id: int) -> list[str]:
        """Step texts from the first step to ``node_id`` (the root's prompt excluded)."""
        return [n.text for n in self.path(node_id)[1:]]

    def prefix_ids(self, node_id: int) -> list[int]:
        """All token ids from the prompt through ``node_id``: what the policy conditions on to extend the node."""
        ids: list[int] = []
        for n in self.path(node_id):
            ids.extend(n.token_ids)
        return ids

    def response(self, node_id: int) -> str:
        """The generated text from the first step to ``node_id`` (steps joined as generated)."""
        return "".join(self.steps(node_id))

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if not n.children and n.parent is not None]

    def terminals(self) -> list[Node]:
        return [n for n in self.nodes if n.terminal]

    def iter_depth_first(self, node_id: int = 0) -> Iterator[Node]:
        stack = [node_id]
        while stack:
            n = self.nodes[stack.pop()]
            yield n
            stack.extend(reversed(n.children))

    @property
    def generated_tokens(self) -> int:
        """Tokens in all non-root nodes: what the policy generated for this tree."""
        return sum(len(n.token_ids) for n in self.nodes[1:])

    # ------------------------------------------------------------------ checks and summaries
    def validate(self) -> None:
        """Raise :class:`TreeFormatError` if an invariant is broken (ids, parents, depths, children, lengths)."""
        if not self.nodes or self.nodes[0].parent is not None:
            raise TreeFormatError("a tree needs a root (node 0, parent None)")
        if self.nodes[0].depth != 0:
            raise TreeFormatError(f"the root has depth {self.nodes[0].depth}, not 0")
        for i, n in enumerate(self.nodes):
            if n.id != i:
                raise TreeFormatError(f"node at index {i} has id {n.id}")
            if n.parent is not None:
                if not 0 <= n.parent < i:
                    raise TreeFormatError(f"node {i} has parent {n.parent}; parents must come first")
                if n.depth != self.nodes[n.parent].depth + 1:
                    raise TreeFormatError(
                        f"node {i} has depth {n.depth}, parent depth {self.nodes[n.parent].depth}"
                    )
                if i not in self.nodes[n.parent].children:
                    raise TreeFormatError(f"node {i} missing from its parent's children")
            elif i != 0:
                raise TreeFormatError(f"node {i} has no parent; only the root may")
            if n.logprobs and len(n.logprobs) != len(n.token_ids):
                raise TreeFormatError(f"node {i}: {len(n.logprobs)} logprobs for {len(n.token_ids)} tokens")
            if n.finish_reason is not None and n.finish_reason not in FINISH_REASONS:
                raise TreeFormatError(f"node {i}: unknown finish_reason {n.finish_reason!r}")
        for n in self.nodes:  # and the converse link: every listed child points back, once
            for c in n.children:
                if not 0 <= c < len(self.nodes) or self.nodes[c].parent != n.id:
                    raise TreeFormatError(f"node {n.id} lists child {c}, whose parent is not {n.id}")
            if len(set(n.children)) != len(n.children):
                raise TreeFormatError(f"node {n.id} lists a child twice")
        if self.chosen is not None and not 0 <= self.chosen < len(self.nodes):
            raise TreeFormatError(f"chosen node {self.chosen} is not in the tree")

    @property
    def correct(self) -> bool | None:
        """Whether the chosen node's outcome is positive.

        ``False`` when the search chose nothing for a problem with a reference answer; ``None`` when there is no
        reference or the chosen node was never scored.
        """
        if self.chosen is None:
            return False if self.problem.answer is not None else None
        outcome = self.nodes[self.chosen].outcome
        return None if outcome is None else outcome > 0

    def summary(self) -> dict[str, Any]:
        """Root-level statistics of the search, JSON-serialisable."""
        terminals = self.terminals()
        answers = [n.answer for n in terminals if n.answer is not None]
        return {
            "problem_id": self.problem.id,
            "algorithm": self.algorithm,
            "answer": self.answer,
            "reference": self.problem.answer,
            "correct": self.correct,
            "n_nodes": len(self.nodes),
            "n_leaves": len(self.leaves()),
            "n_terminals": len(terminals),
            "n_distinct_answers": len(set(answers)),
            "max_depth": max(n.depth for n in self.nodes),
            "generated_tokens": self.generated_tokens,
            **{f"ledger_{k}": v for k, v in self.ledger.items()},
        }

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem.to_dict(),
            "algorithm": self.algorithm,
            "chosen": self.chosen,
            "answer": self.answer,
            "ledger": self.ledger,
            "metadata": self.metadata,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tree:
        try:
            nodes = [Node.from_dict(nd) for nd in d["nodes"]]
            for n in nodes:
                if n.parent is not None:
                    if not 0 <= n.parent < len(nodes):
                        raise TreeFormatError(f"node {n.id} has parent {n.parent}, not a node of the tree")
                    nodes[n.parent].children.append(n.id)
            tree = cls(
                problem=Problem.from_dict(d["problem"]),
                nodes=nodes,
                algorithm=d.get("algorithm", ""),
                chosen=None if d.get("chosen") is None else int(d["chosen"]),
                answer=d.get("answer"),
                ledger=dict(d.get("ledger", {})),
                metadata=dict(d.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TreeFormatError):
                raise
            raise TreeFormatError(f"not a tree record: {type(e).__name__}: {e}") from e
        tree.validate()
        return tree


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a tree record")


# ---------------------------------------------------------------------- JSONL I/O
def write_jsonl(trees: Iterable[Tree], path: str | Path, *, append: bool = False) -> int:
    """Write one tree per line; returns the number written. ``append=True`` adds to an existing file.

    All lines of one call go out in a single ``write`` system call on the file, so a program interrupted
    (Ctrl-C) between calls, or even during one, never leaves half a line behind.
    """
    lines = [json.dumps(t.to_dict(), ensure_ascii=False, allow_nan=False) + "\n" for t in trees]
    data = "".join(lines).encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:  # regular files take it all at once; the loop only guards against a short write
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return len(lines)


def iter_jsonl(path: str | Path) -> Iterator[Tree]:
    """Yield trees from a JSONL file, raising :class:`TreeFormatError` with the line number on a bad line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                raise TreeFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except ValueError as e:
                raise TreeFormatError(f"{path}:{lineno}: {e}") from e
            try:
                yield Tree.from_dict(d)
            except TreeFormatError as e:
                raise TreeFormatError(f"{path}:{lineno}: {e}") from e


def read_jsonl(path: str | Path) -> list[Tree]:
    return list(iter_jsonl(path))
