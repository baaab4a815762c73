"""Selection, backup and pruning primitives, on hand-built trees with values derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeward.search.ops import (
    allocate_widths,
    backup,
    dedupe_exact,
    max_backup,
    merge_semantic,
    puct_select,
    sibling_priors,
    soft_backup,
    uct_select,
    uniform_weights,
)
from treeward.tree import Problem, Tree


def _tree() -> Tree:
    """root → a (1 token, logprob -1), b (2 tokens, logprobs -0.5, -0.5); a → c."""
    t = Tree.new(Problem("t", "Q\n"), [1])
    t.add(0, text="a", token_ids=[5], logprobs=[-1.0])
    t.add(0, text="b", token_ids=[6, 7], logprobs=[-0.5, -0.5])
    t.add(1, text="c", token_ids=[8], logprobs=[-0.1])
    return t


def test_uct_visits_unvisited_first_then_balances() -> None:
    t = _tree()
    assert uct_select(t, t.root).text == "a"
    t.nodes[1].visits, t.nodes[1].value = 3, 0.9
    assert uct_select(t, t.root).text == "b"  # unvisited b before any score
    t.nodes[2].visits, t.nodes[2].value = 1, 0.1
    t.root.visits = 4
    # a: 0.9 + 1.41·sqrt(ln 4 / 3) = 0.9 + 0.961 = 1.861;  b: 0.1 + 1.41·sqrt(ln 4 / 1) = 0.1 + 1.665 = 1.765
    assert uct_select(t, t.root).text == "a"
    # with c = 2: a = 0.9 + 1.360 = 2.260, b = 0.1 + 2.355 = 2.455
    assert uct_select(t, t.root, c=2.0).text == "b"
    with pytest.raises(ValueError, match="no children"):
        uct_select(t, t.nodes[2])


def test_selection_among_the_children_the_caller_passes() -> None:
    t = _tree()
    a, b = t.children(0)
    t.root.visits = 4
    a.visits, a.value = 3, 0.9
    b.visits, b.value = 1, 0.1
    # by the values above UCT and PUCT pick a (see the by-hand tests); restricted to [b], both must pick b
    assert uct_select(t, t.root, children=[b]) is b
    assert puct_select(t, t.root, children=[b]) is b
    with pytest.raises(ValueError, match="no children"):
        uct_select(t, t.root, children=[])


def test_sibling_priors_use_mean_token_logprob() -> None:
    t = _tree()
    kids = t.children(0)
    # means: a = -1.0, b = -0.5 → softmax: b / a = e^0.5; p_a = 1 / (1 + e^0.5) = 0.3775
    p = sibling_priors(t, kids)
    assert p == pytest.approx([1 / (1 + math.e**0.5), math.e**0.5 / (1 + math.e**0.5)])


def test_puct_by_hand() -> None:
    t = _tree()
    t.root.visits = 4
    t.nodes[1].visits, t.nodes[1].value = 3, 0.5
    t.nodes[2].visits, t.nodes[2].value = 0, None
    # priors given: a 0.9, b 0.1.  a: 0.5 + 1·0.9·2/4 = 0.95;  b: 0 + 1·0.1·2/1 = 0.2 → a
    assert puct_select(t, t.root, priors=[0.9, 0.1]).text == "a"
    # c = 10: a = 0.5 + 4.5 = 5.0; b = 2.0 → still a; priors swapped: a = 0.5 + 0.5 = 1.0, b = 18.0 → b
    assert puct_select(t, t.root, c=10, priors=[0.1, 0.9]).text == "b"


def test_allocate_widths_by_hand() -> None:
    # scores 0 and ln 3 at T=1: shares 1/4 and 3/4 of 8 → 2 and 6
    assert allocate_widths([0.0, math.log(3)], 8) == [2, 6]
    # three equal scores, 8 slots: 2.67 each → floors 2,2,2, the two leftovers go to the first two
    assert allocate_widths([1.0, 1.0, 1.0], 8) == [3, 3, 2]
    assert allocate_widths([], 5) == []
    with pytest.raises(ValueError):
        allocate_widths([1.0], -1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=12), st.integers(0, 64), st.floats(0.05, 5))
def test_allocate_widths_sums_to_total(scores: list[float], total: int, temp: float) -> None:
    w = allocate_widths(scores, total, temperature=temp)
    assert sum(w) == total and all(x >= 0 for x in w)
    # a higher score never gets fewer slots than a lower one (by more than the rounding)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                assert w[i] >= w[j] - 1


def test_mean_backup_by_hand() -> None:
    t = _tree()
    c = t.nodes[3]
    backup(t, c, 1.0)  # path root, a, c: each mean 1.0, visits 1
    backup(t, t.nodes[2], 0.0)  # path root, b
    backup(t, c, 0.5)
    # root saw 1.0, 0.0, 0.5 → mean 0.5, 3 visits; a saw 1.0, 0.5 → 0.75; b saw 0.0
    assert (t.root.value, t.root.visits) == (pytest.approx(0.5), 3)
    assert (t.nodes[1].value, t.nodes[1].visits) == (pytest.approx(0.75), 2)
    assert (t.nodes[2].value, t.nodes[2].visits) == (0.0, 1)


def test_max_backup_by_hand() -> None:
    t = _tree()
    backup(t, t.nodes[3], 0.2, rule=max_backup)
    backup(t, t.nodes[2], 0.7, rule=max_backup)
    backup(t, t.nodes[3], 0.4, rule=max_backup)
    assert t.root.value == 0.7 and t.nodes[1].value == 0.4 and t.nodes[2].value == 0.7


def test_soft_backup_interpolates_mean_and_max() -> None:
    t = _tree()
    t.nodes[1].visits, t.nodes[1].value = 1, 1.0
    t.nodes[2].visits, t.nodes[2].value = 3, 0.0
    # λ = 1: log(1/4·e^1 + 3/4·e^0) = log(0.6796 + 0.75) = log(1.4296) = 0.3574
    assert soft_backup(1.0)(t, t.root, 0.0) == pytest.approx(math.log(0.25 * math.e + 0.75))
    # large λ → max (1.0); small λ → visit-weighted mean (0.25)
    assert soft_backup(200.0)(t, t.root, 0.0) == pytest.approx(1.0, abs=0.01)
    assert soft_backup(1e-4)(t, t.root, 0.0) == pytest.approx(0.25, abs=1e-3)
    assert soft_backup(1.0)(t, t.nodes[3], 0.3) == 0.3  # a leaf takes the leaf value


def _slow_soft(children: list[tuple[int, float | None]], lam: float, uniform: bool) -> float | None:
    """Reference: the soft value from (visits, value) pairs with plain Python floats, ``None`` without any."""
    used = [(n, v) for n, v in children if n > 0 and v is not None]
    if not used:
        return None
    weights = [1.0 if uniform else float(n) for n, _ in used]
    mean = sum(w * math.exp(lam * v) for w, (_, v) in zip(weights, used, strict=True)) / sum(weights)
    return math.log(mean) / lam


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.none() | st.floats(-3, 3)), min_size=1, max_size=6),
    st.sampled_from([0.1, 1.0, 7.0]),
    st.booleans(),
)
def test_soft_backup_matches_slow_reference(
    children: list[tuple[int, float | None]], lam: float, uniform: bool
) -> None:
    t = Tree.new(Problem("t", "Q\n"), [1])
    for visits, value in children:
        t.add(0, text="s", token_ids=[5], value=value, visits=visits)
    rule = soft_backup(lam, weights=uniform_weights) if uniform else soft_backup(lam)
    expect = _slow_soft(children, lam, uniform)
    # no visited, valued child: the leaf value passes through
    assert rule(t, t.root, 0.25) == pytest.approx(0.25 if expect is None else expect, rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.floats(0, 1)), min_size=1, max_size=30))
def test_mean_backup_matches_slow_reference(sims: list[tuple[int, float]]) -> None:
    t = _tree()
    seen: dict[int, list[float]] = {i: [] for i in range(4)}
    for leaf, value in sims:
        backup(t, t.nodes[leaf], value)
        for n in t.path(leaf):
            seen[n.id].append(value)
    assert t.root.visits == len(sims)  # visit counts sum to simulations
    for i, vals in seen.items():
        if vals:
            assert t.nodes[i].value == pytest.approx(sum(vals) / len(vals))
            assert t.nodes[i].visits == len(vals)


def test_dedupe_and_semantic_merge() -> None:
    t = Tree.new(Problem("t", "Q\n"), [1])
    a1 = t.add(0, text="x=1\n", token_ids=[5, 6])
    t.add(0, text="x=1\n", token_ids=[5, 6])
    b = t.add(0, text="y=2\n", token_ids=[7])
    kept = dedupe_exact(t.children(0))
    assert kept == [a1, b] and a1.metadata["duplicates"] == 1

    def embed(texts: list[str]) -> np.ndarray:  # letter counts: "x=1" and "x = 1" match, "y=2" does not
        return np.array([[s.count(ch) for ch in "xy12"] for s in texts], dtype=float)

    c = t.add(0, text="x = 1\n", token_ids=[9])
    groups = merge_semantic([a1, b, c], embed, threshold=0.99)
    assert [[n.id for n in g] for g in groups] == [[a1.id, c.id], [b.id]]
