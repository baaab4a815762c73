"""A bounded store of per-sequence key/value states with longest-prefix lookup.

Each entry holds the KV of one token sequence, all layers. A radix tree over token ids (a trie whose edges carry
runs of tokens) says, for any query, how long a prefix of it some stored sequence shares; the KV of a sequence also
serves every prefix of it, so an entry answers for every node on its path. Eviction is least-recently-used by bytes.

Invariants, kept by :meth:`KVStore.insert`:

* no entry is a prefix of another: a new sequence already covered by an entry only refreshes it, and entries that
  are prefixes of a new sequence are dropped (the new one answers for them);
* every node lies on the path of at least one entry, ``node.through`` lists those entries, and every entry ends at
  a node boundary, so a lookup takes any entry of the deepest node it reaches.

Lookup and insert compare whole edges as tuple slices and create at most two nodes per insert: a 150-token lookup
costs a few microseconds when its path shares long runs with stored sequences.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["KVStore", "SeqKV"]


@dataclass(frozen=True)
class SeqKV:
    """Key/value states of one sequence: per layer ``(keys, values)``, each [heads, length, head_dim]."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1] if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)

    def prefix(self, length: int) -> SeqKV:
        """The states of the first ``length`` tokens (views, no copy)."""
        if length == self.length:
            return self
        return SeqKV(tuple((k[:, :length], v[:, :length]) for k, v in self.layers))


class _Node:
    __slots__ = ("children", "edge", "end", "through")

    def __init__(self, edge: tuple[int, ...]) -> None:
        self.edge = edge  # tokens on the edge from the parent to this node
        self.children: dict[int, _Node] = {}  # by the first token of the child's edge
        self.through: set[int] = (
            set()
        )  # ids of the entries whose sequence runs through this node (or ends at it)
        self.end: int | None = None  # id of the entry whose sequence ends here


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    kv: SeqKV
    nbytes: int


class KVStore:
    """Longest-prefix KV lookup over token ids, bounded to ``capacity_bytes`` (LRU)."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._root = _Node(())
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._root = _Node(())
        self._entries.clear()
        self.nbytes = 0

    def lookup(self, tokens: Sequence[int], *, max_length: int) -> tuple[int, SeqKV | None]:
        """Longest stored prefix of ``tokens[:max_length]``: its length and KV (``(0, None)`` on a miss).

        A hit marks the serving entry as recently used.
        """
        path, depth, _ = self._walk(tuple(tokens[:max_length]))
        if depth == 0:
            return 0, None
        entry_id = next(iter(path[-1].through))
        self._entries.move_to_end(entry_id)
        return depth, self._entries[entry_id].kv.prefix(depth)

    def insert(self, tokens: Sequence[int], kv: SeqKV) -> None:
        """Store ``kv`` (which must own its memory: no views into a bigger batch tensor) for ``tokens``."""
        if kv.length != len(tokens):
            raise ValueError(f"KV of {kv.length} positions for {len(tokens)} tokens")
        nbytes = kv.nbytes
        tokens = tuple(tokens)
        if not tokens or nbytes > self.capacity_bytes:
            return
        path, depth, into = self._walk(tokens)
        if depth == len(tokens):  # already covered by a stored sequence
            self._entries.move_to_end(next(iter(path[-1].through)))
            return
        # Entries ending on the way down are prefixes of the new sequence (a node entered part way is not passed).
        passed = path if not path or into == len(path[-1].edge) else path[:-1]
        subsumed = [node.end for node in passed if node.end is not None]
        if len(passed) < len(path):  # the new sequence leaves the last edge part way: split it there
            child = path[-1]
            parent = path[-2] if len(path) > 1 else self._root
            mid = _Node(child.edge[:into])
            mid.through = set(child.through)
            child.edge = child.edge[into:]
            mid.children[child.edge[0]] = child
            parent.children[mid.edge[0]] = mid
            path[-1] = mid
        leaf = _Node(tokens[depth:])
        (path[-1] if path else self._root).children[leaf.edge[0]] = leaf
        path.append(leaf)

        entry_id = self._next_id
        self._next_id += 1
        for node in path:
            node.through.add(entry_id)
        leaf.end = entry_id
        self._entries[entry_id] = _Entry(tokens, kv, nbytes)
        self.nbytes += nbytes
        for old in subsumed:
            self._remove(old)
        while self.nbytes > self.capacity_bytes:
            self._remove(next(iter(self._entries)))

    def _walk(self, tokens: tuple[int, ...]) -> tuple[list[_Node], int, int]:
        """Follow ``tokens`` down the tree: the nodes entered, the tokens matched, and how many tokens of the last
        node's edge matched (its whole edge unless the match ended inside it)."""
        path: list[_Node] = []
        node, depth, into = self._root, 0, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                break
            edge = child.edge
            n = min(len(edge), len(tokens) - depth)
            if tokens[depth : depth + n] == edge[:n]:
                into = n
            else:
                into = next(i for i in range(n) if tokens[depth + i] != edge[i])
            path.append(child)
            depth += into
            if into < len(edge):
                break
            node = child
        return path, depth, into

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        node, depth = self._root, 0
        while depth < len(entry.tokens):  # the entry ends at a node boundary, so whole edges match
            child = node.children[entry.tokens[depth]]
            child.through.discard(entry_id)
            if not child.through:  # nothing else passes here, nor (a fortiori) below
                del node.children[entry.tokens[depth]]
                return
            node, depth = child, depth + len(child.edge)
        if node.end == entry_id:
            node.end = None
