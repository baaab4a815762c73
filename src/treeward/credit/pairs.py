"""Preference data from search trees: sibling step pairs (MCTS-DPO), ranked lists per node (TPO), pairs of complete
responses sharing a prefix (the tree-structured preference sets of "Reward Generalization in RLHF"), and verified
traces for self-training (ReST-MCTS*, ReST-EM).

Every builder is a pure function ``f(tree, [values,] *, knobs) -> list[record]`` returning the shared records of
:mod:`treeward.credit.records`; token ids come from the tree. The shared prefix of a pair or list (the prompt plus
the steps both sides share) is the record's ``prompt`` / ``prompt_ids``; the sides are what follows it.

Metadata every pair carries (the exporters rely on it): ``kind`` ("step" or "response"), ``chosen_terminal`` /
``rejected_terminal`` (the side ends where a response ends, so an end-of-sequence token after it is right),
``chosen_path`` / ``rejected_path`` (node ids of the side's steps).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from treeward.credit.records import PreferenceList, PreferencePair, SFTExample
from treeward.credit.values import CreditError
from treeward.tree import Node, Tree

__all__ = ["preference_lists", "sft_examples", "step_pairs", "tree_pairs"]


# ---------------------------------------------------------------------- shared pieces
def _reaches_end(tree: Tree) -> list[bool]:
    """Per node: a terminal lies in its subtree (itself included)."""
    ends = [False] * len(tree.nodes)
    for node in reversed(tree.nodes):
        ends[node.id] = ends[node.id] or node.terminal
        if node.parent is not None:
            ends[node.parent] = ends[node.parent] or ends[node.id]
    return ends


def _completion(
    tree: Tree, start: Node, values: Mapping[int, float], ends: Sequence[bool]
) -> list[Node] | None:
    """``start`` and the steps after it down to a terminal, always taking the highest-valued child that still
    reaches a terminal (ties: the earlier node); ``None`` when no terminal lies below ``start``."""
    if not ends[start.id]:
        return None
    path = [start]
    while not path[-1].terminal:
        kids = [k for k in tree.children(path[-1].id) if ends[k.id]]
        path.append(max(kids, key=lambda k: (values.get(k.id, -math.inf), -k.id)))
    return path


def _distinct_valued_children(tree: Tree, node: Node, values: Mapping[int, float]) -> list[Node]:
    """Children with a value, one per distinct token sequence (the earliest), in id order."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for k in tree.children(node.id):
        if k.id in values and k.token_ids not in seen:
            seen.add(k.token_ids)
            out.append(k)
    return out


def _join(path: Sequence[Node]) -> tuple[str, tuple[int, ...]]:
    return "".join(n.text for n in path), tuple(t for n in path for t in n.token_ids)


def _prefix(tree: Tree, node_id: int) -> tuple[str, tuple[int, ...]]:
    """The shared prefix ending at ``node_id``: prompt text plus steps, and all their token ids."""
    return tree.problem.prompt + tree.response(node_id), tuple(tree.prefix_ids(node_id))


def _check_margin(min_margin: float) -> None:
    if not (math.isfinite(min_margin) and min_margin >= 0.0):
        raise CreditError(f"min_margin must be a finite number >= 0, got {min_margin}")


# ---------------------------------------------------------------------- MCTS-DPO step pairs
def step_pairs(
    tree: Tree,
    values: Mapping[int, float],
    *,
    min_margin: float = 0.0,
    per_node: int | None = 1,
    complete: bool = False,
) -> list[PreferencePair]:
    """Step-level preference pairs between sibling steps, MCTS-DPO's construction (Xie et al. 2024, "Monte Carlo
    Tree Search Boosts Reasoning via Iterative Preference Learning"): at a node, the child step with the highest
    value is *chosen* and the one with the lowest is *rejected*; ``margin = value(chosen) - value(rejected)``.

    ``values`` are per-node step values (:func:`~treeward.credit.values.q_values` as in the paper, or Monte-Carlo /
    ReST-MCTS* values). Siblings with identical tokens count once. A pair needs ``margin > 0`` and
    ``margin >= min_margin``. ``per_node`` pairs are kept per node, widest margin first (1: the paper's best vs
    worst; ``None``: every sibling pair that passes the margin). The prompt is the shared prefix up to the parent.

    ``complete=True`` continues each side from its step down to a terminal, always through the highest-valued child
    (so both sides are whole responses that diverge at the step, and an end-of-sequence token after each is
    right); a pair with a side that reaches no terminal is left out. With ``complete=False`` a side is the single
    step, and ``metadata["chosen_terminal"]`` says whether it ends the response (intermediate steps must not get an
    EOS appended: see :func:`treeward.credit.exports.dpo_rows`).

    Departures: the paper pairs the children of each node on the trajectory the search finally took, with
    siblings' completions extended through single-child chains, and smooths labels by visit counts; here every
    node of the tree with two valued children gives pairs, sides are one step (or the value-greedy completion), and
    confidence is left to the trainer (``metadata`` carries both values).
    """
    _check_margin(min_margin)
    if per_node is not None and per_node < 1:
        raise CreditError(f"per_node must be >= 1 or None, got {per_node}")
    tree.validate()
    ends = _reaches_end(tree)
    out: list[PreferencePair] = []
    for node in tree.nodes:
        kids = _distinct_valued_children(tree, node, values)
        if len(kids) < 2:
            continue
        ranked = sorted(
            (
                (float(values[a.id]) - float(values[b.id]), a, b)
                for a, b in itertools.permutations(kids, 2)
                if float(values[a.id]) - float(values[b.id]) > 0.0
            ),
            key=lambda t: (-t[0], t[1].id, t[2].id),
        )
        kept = 0
        prompt, prompt_ids = _prefix(tree, node.id)
        for gap, a, b in ranked:
            if gap < min_margin or (per_node is not None and kept >= per_node):
                break
            sides = (
                [_completion(tree, a, values, ends), _completion(tree, b, values, ends)]
                if complete
                else [[a], [b]]
            )
            chosen_path, rejected_path = sides
            if chosen_path is None or rejected_path is None:
                continue
            chosen, chosen_ids = _join(chosen_path)
            rejected, rejected_ids = _join(rejected_path)
            out.append(
                PreferencePair(
                    problem_id=tree.problem.id,
                    prompt=prompt,
                    prompt_ids=prompt_ids,
                    chosen=chosen,
                    chosen_ids=chosen_ids,
                    rejected=rejected,
                    rejected_ids=rejected_ids,
                    margin=gap,
                    chosen_node=a.id,
                    rejected_node=b.id,
                    metadata={
                        "kind": "step",
                        "parent": node.id,
                        "chosen_value": float(values[a.id]),
                        "rejected_value": float(values[b.id]),
                        "chosen_terminal": chosen_path[-1].terminal,
                        "rejected_terminal": rejected_path[-1].terminal,
                        "chosen_path": tuple(n.id for n in chosen_path),
                        "rejected_path": tuple(n.id for n in rejected_path),
                    },
                )
            )
            kept += 1
    return out


# ---------------------------------------------------------------------- TPO preference lists
def preference_lists(
    tree: Tree,
    values: Mapping[int, float],
    *,
    min_candidates: int = 2,
    complete: bool = True,
) -> list[PreferenceList]:
    """One ranked list per node for list-ranking losses, from Tree Preference Optimization (Liao, Chu & Wang 2025,
    "TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference Trees").

    At every node with at least ``min_candidates`` distinct valued children, the candidates are the responses that
    continue the shared prefix through each child: with ``complete=True`` (TPO ranks whole responses) the child step
    plus its value-greedy completion down to a terminal (children that reach no terminal are left out), with
    ``complete=False`` the child step alone. A candidate's score is its child step's value; candidates are sorted
    best first (ties: earlier node), as TPO's ranking loss reads list order. Lists whose scores are all equal carry
    no ranking and are left out.

    TPO's *adaptive step reward* weights each step of a dispreferred response by the cosine similarity between its
    hidden-state embedding and that of the preferred response's step at the same index (the released code multiplies
    the step's token log-probabilities by ``1 + similarity``), so that steps the responses share are told apart from
    the steps where they diverge. It needs the policy's hidden states, so it belongs to the training loss; this
    builder supplies what it needs: ``metadata["step_lengths"]`` (per candidate, the token count of each step, in
    order: the step boundaries inside ``candidate_ids``) and ``metadata["paths"]`` (the node
    ids). Departures: the paper's trees come from Tree-of-Thoughts with an LLM judge's scores and lists of a fixed
    size; here a list per node, scored by the given step values, of whatever size the tree offers.
    """
    if min_candidates < 2:
        raise CreditError(f"min_candidates must be >= 2, got {min_candidates}")
    tree.validate()
    ends = _reaches_end(tree)
    out: list[PreferenceList] = []
    for node in tree.nodes:
        kids = _distinct_valued_children(tree, node, values)
        paths = [(k, _completion(tree, k, values, ends) if complete else [k]) for k in kids]
        ranked = sorted(
            ((k, p) for k, p in paths if p is not None), key=lambda kp: (-float(values[kp[0].id]), kp[0].id)
        )
        if len(ranked) < min_candidates:
            continue
        scores = tuple(float(values[k.id]) for k, _ in ranked)
        if max(scores) == min(scores):
            continue
        joined = [_join(p) for _, p in ranked]
        prompt, prompt_ids = _prefix(tree, node.id)
        out.append(
            PreferenceList(
                problem_id=tree.problem.id,
                prompt=prompt,
                prompt_ids=prompt_ids,
                candidates=tuple(text for text, _ in joined),
                candidate_ids=tuple(ids for _, ids in joined),
                scores=scores,
                node_ids=tuple(k.id for k, _ in ranked),
                metadata={
                    "kind": "list",
                    "parent": node.id,
                    "step_lengths": tuple(tuple(len(n.token_ids) for n in p) for _, p in ranked),
                    "paths": tuple(tuple(n.id for n in p) for _, p in ranked),
                    "terminal": tuple(p[-1].terminal for _, p in ranked),
                },
            )
        )
    return out


# ---------------------------------------------------------------------- tree-structured response pairs
def _scored_terminals(tree: Tree) -> list[tuple[Node, float]]:
    """Scored terminals, one per distinct full token path (the earliest), in id order."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for t in tree.terminals():
        if t.outcome is None:
            continue
        o = float(t.outcome)
        if not math.isfinite(o):
            raise CreditError(f"node {t.id} has outcome {t.outcome!r}; outcomes must be finite")
        key = tuple(tree.prefix_ids(t.id))
        if key not in seen:
            seen.add(key)
            out.append((t, o))
    return out


def tree_pairs(tree: Tree, *, min_margin: float = 0.0) -> list[PreferencePair]:
    """Pairs of complete responses that share a prefix: the tree-structured preference dataset of Qiu et al. 2025
    ("Reward Generalization in RLHF: A Topological Perspective"), where responses are generated as a prefix tree
    and every pair of responses (leaves) is compared, so pairs share their common prefix and the comparisons tie
    together through the tree.

    Every two scored terminals (one per distinct token path) whose outcomes differ by ``margin > 0`` and
    ``>= min_margin`` give a pair: the better outcome is chosen; the prompt is the shared prefix down to their
    lowest common ancestor; each side is the rest of its response (whole responses, so
    ``chosen_terminal = rejected_terminal = True``). Order: by common ancestor, then chosen, then rejected node.
    All O(T²) pairs are returned; sample them downstream if that is too many.

    Departures: the paper's labels are human / AI-judge preferences between the two responses; here the oracle is
    the outcome reward (ties give no pair). Its trees branch at fixed depths; here they are whatever the search
    grew.
    """
    _check_margin(min_margin)
    tree.validate()
    terms = _scored_terminals(tree)
    paths = {t.id: [n.id for n in tree.path(t.id)] for t, _ in terms}
    found = []
    for (ta, oa), (tb, ob) in itertools.combinations(terms, 2):
        if oa == ob:
            continue
        (good, og), (bad, ob_) = ((ta, oa), (tb, ob)) if oa > ob else ((tb, ob), (ta, oa))
        gap = og - ob_
        if gap < min_margin:
            continue
        pg, pb = paths[good.id], paths[bad.id]
        common = 0
        while common < min(len(pg), len(pb)) and pg[common] == pb[common]:
            common += 1
        lca = pg[common - 1]
        if common == len(pg) or common == len(pb):
            continue  # one response is a prefix of the other: nothing to compare after the shared part
        found.append((lca, good, bad, gap, pg[common:], pb[common:]))
    out = []
    for lca, good, bad, gap, gpath, bpath in sorted(found, key=lambda f: (f[0], f[1].id, f[2].id)):
        prompt, prompt_ids = _prefix(tree, lca)
        chosen, chosen_ids = _join([tree.nodes[i] for i in gpath])
        rejected, rejected_ids = _join([tree.nodes[i] for i in bpath])
        out.append(
            PreferencePair(
                problem_id=tree.problem.id,
                prompt=prompt,
                prompt_ids=prompt_ids,
                chosen=chosen,
                chosen_ids=chosen_ids,
                rejected=rejected,
                rejected_ids=rejected_ids,
                margin=gap,
                chosen_node=gpath[0],
                rejected_node=bpath[0],
                metadata={
                    "kind": "response",
                    "parent": lca,
                    "chosen_outcome": good.outcome,
                    "rejected_outcome": bad.outcome,
                    "chosen_terminal": True,
                    "rejected_terminal": True,
                    "chosen_path": tuple(gpath),
                    "rejected_path": tuple(bpath),
                },
            )
        )
    return out


# ---------------------------------------------------------------------- verified traces for self-training
def sft_examples(
    tree: Tree,
    values: Mapping[int, float] | None = None,
    *,
    correct_at: float = 1.0,
    min_value: float | None = None,
    max_per_problem: int | None = None,
) -> list[SFTExample]:
    """Verified reasoning traces to imitate: the paths to terminals whose outcome is ``>= correct_at``, one per
    distinct completion (token ids), for ReST-EM (Singh et al. 2023, "Beyond Human Data: Scaling Self-Training for
    Problem-Solving with Language Models": outcome-filtered samples) and ReST-MCTS* (Zhang et al. 2024: correct
    traces from the search tree, screened by their process values).

    ``min_value`` (needs ``values``) keeps only traces whose every step has a value ``>= min_value`` (ReST-MCTS*'s
    screen against right answers reached through wrong steps); steps missing from ``values`` fail it. With
    ``values``, traces are ordered by their lowest step value, best first (ties: earlier node), else by node id;
    ``max_per_problem`` keeps the first that many (ReST-EM caps at 10 solutions per problem; default no cap).
    ``completion`` is the steps' text joined as generated and ``completion_ids`` their token ids (an EOS the policy
    emitted stays at the end). Departure: ReST-MCTS* scores traces with its trained value model; here any per-node
    values do.
    """
    if not math.isfinite(correct_at):
        raise CreditError(f"correct_at must be a finite outcome threshold, got {correct_at}")
    if min_value is not None and values is None:
        raise CreditError("min_value screens traces by their step values: pass values too")
    if max_per_problem is not None and max_per_problem < 1:
        raise CreditError(f"max_per_problem must be >= 1 or None, got {max_per_problem}")
    tree.validate()
    kept: list[tuple[float, Node, list[Node]]] = []
    seen: set[tuple[int, ...]] = set()
    for term in tree.terminals():
        if term.outcome is None:
            continue
        o = float(term.outcome)
        if not math.isfinite(o):
            raise CreditError(f"node {term.id} has outcome {term.outcome!r}; outcomes must be finite")
        if o < correct_at:
            continue
        steps = tree.path(term.id)[1:]
        ids = tuple(t for n in steps for t in n.token_ids)
        if not steps or ids in seen:
            continue
        lowest = math.inf
        if values is not None:
            lowest = min((float(values.get(n.id, -math.inf)) for n in steps), default=-math.inf)
            if min_value is not None and lowest < min_value:
                continue
        seen.add(ids)
        kept.append((lowest, term, steps))
    if values is not None:
        kept.sort(key=lambda k: (-k[0], k[1].id))
    if max_per_problem is not None:
        kept = kept[:max_per_problem]
    out = []
    for lowest, term, steps in kept:
        text, ids = _join(steps)
        meta: dict[str, object] = {"outcome": term.outcome, "path": tuple(n.id for n in steps)}
        if values is not None:
            meta["min_value"] = lowest
        out.append(
            SFTExample(
                problem_id=tree.problem.id,
                prompt=tree.problem.prompt,
                prompt_ids=tree.root.token_ids,
                completion=text,
                completion_ids=ids,
                node_id=term.id,
                metadata=meta,
            )
        )
    return out
