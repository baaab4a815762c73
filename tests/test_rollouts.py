"""Tree rollouts (fixed leaf budget), SLATE step sampling and Math-Shepherd thickening, against fakes whose
draws are known (tests/fakes.py StepBandit, and the Typist below) and once on the shipped model."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import EOS, StepBandit
from treeward import SHIPPED_POLICY
from treeward.engine.base import Continuation, Ledger
from treeward.engine.hf import HFPolicy
from treeward.search.core import SearchError, grade
from treeward.search.rollouts import (
    EntropyBranching,
    FixedBranching,
    SlateBranching,
    even_split,
    finished_leaves,
    path_surprise,
    slate_rollouts,
    step_surprise,
    thicken,
    tree_rollouts,
)
from treeward.search.rollouts import _semantic_fork as semantic_fork
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tasks.arithmetic import check_steps
from treeward.tree import Node, Problem, Tree

# Ann: 54, ×3, −34. Right lines: "Step 1: 54*3=162\n" (17 chars), "Step 2: 162-34=128\n" (19), "Answer: 128"
# (11). StepBandit's wrong line is off by one and the same length here: "...=163\n" (17), "Step 2:
# 163-34=130\n" (19), and every answer line is 11 chars + EOS = 12 tokens (tokens are characters).
P2 = Problem(
    "p2",
    "Q: Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. How many cards does Ann have?\n",
    "128",
    {"start": 54, "ops": [["*", 3], ["-", 34]]},
)
P1 = Problem(
    "p1",
    "Q: Ann has 54 cards. Ann gets three times as many. How many cards does Ann have?\n",
    "162",
    {"start": 54, "ops": [["*", 3]]},
)


def _depths(tree: Tree) -> list[int]:
    c = Counter(n.depth for n in tree.nodes)
    return [c[d] for d in range(max(c) + 1)]


def _shape(trees: Sequence[Tree]) -> list[list[tuple[int | None, tuple[int, ...], bool, str | None]]]:
    return [[(n.parent, n.token_ids, n.terminal, n.answer) for n in t.nodes] for t in trees]


class Typist:
    """A fake that types a fixed script per prompt: whatever the prefix, it goes on with the script's next
    characters (tokens are characters, EOS after the script), even from the middle of a line, so segment cuts
    can be followed by hand. Every sample is the same."""

    def __init__(self, scripts: dict[str, str]) -> None:
        self.scripts = scripts
        self.ledger = Ledger()
        self.calls: list[int] = []

    @property
    def eos_token_id(self) -> int:
        return EOS

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != EOS)

    def expand(self, prefixes, *, n=1, max_new_tokens=64, temperature=1.0, stop="\n", seeds=0, groups=None):  # type: ignore[no-untyped-def]
        caps = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.ledger.book_call(list(groups or []))
        self.calls.append(len(prefixes) * n)
        out = []
        for prefix, cap in zip(prefixes, caps, strict=True):
            text = self.decode(prefix)
            prompt = next(p for p in self.scripts if text.startswith(p))
            rest = self.scripts[prompt][len(text) - len(prompt) :]
            ids = [*self.encode(rest), EOS]
            if stop is not None and stop in rest:
                ids = ids[: rest.index(stop) + 1]
            finish = "eos" if ids[-1] == EOS else "stop"
            if len(ids) > cap:
                ids, finish = ids[:cap], "length"
            c = Continuation(tuple(ids), self.decode(ids), (0.0,) * len(ids), finish)  # type: ignore[arg-type]
            out.append([c] * n)
        return out

    def score(self, prefixes, continuations, *, groups=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError


# ---------------------------------------------------------------------- structure by hand
def test_fixed_branching_tree_by_hand() -> None:
    policy = StepBandit([P2], q=0.25)
    [tree] = tree_rollouts([P2], policy, leaves=4, branch_factor=2, seed=0)
    # round 0: the root (quota 4) branches into 2 step-1 children owing 2 each; round 1: each branches into 2
    # step-2 children owing 1; round 2: the 4 step-2 nodes write their answer lines: 1 + 2 + 4 + 4 = 11 nodes
    assert _depths(tree) == [1, 2, 4, 4]
    assert policy.calls == [2, 4, 4]  # one batched engine call per round, rows = samples
    assert len(finished_leaves(tree)) == 4 and all(n.depth == 3 for n in finished_leaves(tree))
    # generated once per node: 2 × 17 + 4 × 19 + 4 × 12 = 158 tokens, where 4 independent samples cost
    # 4 × (17 + 19 + 12) = 192
    assert tree.generated_tokens == 158 == tree.ledger["generated"]
    assert tree.metadata["pruned"] == 0 and tree.metadata["finished"] == 4
    tree.validate()


def test_leaves_not_divisible_by_the_branch_factor() -> None:
    [tree] = tree_rollouts([P2], StepBandit([P2]), leaves=5, branch_factor=2)
    # quota 5 → [3, 2]; 3 → [2, 1] and 2 → [1, 1]: four step-2 nodes, one of which (quota 2) branches again at
    # the answer line: 1 + 2 + 4 + 5 nodes
    assert _depths(tree) == [1, 2, 4, 5]
    assert len(finished_leaves(tree)) == 5
    assert even_split(5, 2) == [3, 2] and even_split(7, 3) == [3, 2, 2] and even_split(1, 1) == [1]


def test_late_branching_shares_the_first_steps() -> None:
    [tree] = tree_rollouts([P2], StepBandit([P2]), leaves=4, branch_on=FixedBranching(start=1))
    # level 0 runs as a chain (one step-1 node shared by all leaves), then 4 → [2, 2] → [1, 1] at the answers
    assert _depths(tree) == [1, 1, 2, 4]
    # 17 + 2 × 19 + 4 × 12 = 103 generated tokens for 4 leaves
    assert tree.generated_tokens == 103


def test_max_depth_ends_a_path_as_a_truncated_leaf() -> None:
    [tree] = tree_rollouts([P2], StepBandit([P2]), leaves=2, max_depth=1)
    # both step-1 children reach max_depth = 1 unfinished: each is a finished, truncated leaf with no answer
    assert _depths(tree) == [1, 2]
    leaves = finished_leaves(tree)
    assert len(leaves) == 2
    assert all(n.metadata["truncated"] == "max_depth" and n.answer is None for n in leaves)


def test_step_token_cap_cuts_a_leaf() -> None:
    [tree] = tree_rollouts([P2], StepBandit([P2]), leaves=2, max_step_tokens=5)
    # a 17-char step cut at 5 tokens ends its path ("length" is terminal): 2 leaves of 5 tokens
    assert _depths(tree) == [1, 2]
    assert all(n.finish_reason == "length" and len(n.token_ids) == 5 for n in finished_leaves(tree))


# ---------------------------------------------------------------------- early stop and reallocation
def test_early_stop_reallocates_dead_branches_by_hand() -> None:
    policy = StepBandit([P1], q=0.0)  # every step is wrong (54*3=163), every answer repeats it
    [tree] = tree_rollouts([P1], policy, leaves=2, early_stop=ArithmeticSteps(), stop_below=0.5)
    # round 0: root → 2 wrong steps, both dead (pruned 2 = the limit, `leaves`); their 2 owed leaves are
    # forked from their parent, the root; round 1: the root samples 2 more steps (new salt: it has 2
    # children), wrong again but early stop is now off; round 2: their answer lines finish
    root_kids = tree.children(0)
    assert [k.metadata.get("dead", False) for k in root_kids] == [True, True, False, False]
    assert [k.metadata.get("fork", False) for k in root_kids] == [False, False, True, True]
    assert all(not k.children for k in root_kids[:2]) and all(len(k.children) == 1 for k in root_kids[2:])
    assert tree.metadata["pruned"] == 2
    assert len(finished_leaves(tree)) == 2
    # the verifier's score is written on the judged nodes; once pruning is spent the tree is not judged any
    # more
    assert [n.value for n in root_kids] == [0.0, 0.0, None, None]
    assert policy.calls == [2, 2, 2]


def test_early_stop_keeps_only_verified_paths_while_it_can_prune() -> None:
    problems = generate_problems(12, 3, seed=5)
    trees = tree_rollouts(problems, StepBandit(problems, q=0.8), leaves=4, early_stop=ArithmeticSteps())
    grade(trees, ArithmeticAnswer())
    checked = 0
    for t in trees:
        assert len(finished_leaves(t)) == 4
        dead = [n for n in t.nodes if n.metadata.get("dead")]
        assert len(dead) == t.metadata["pruned"] <= 4
        assert all(not n.terminal and not n.children for n in dead)
        if t.metadata["pruned"] < 4:  # pruning never ran out: every finished path passed the exact verifier
            checked += 1
            assert all(n.outcome == 1.0 for n in finished_leaves(t))
    assert checked >= 6  # P(a 3-step path dies) ≈ 1 − 0.8³ ≈ 0.49, so most trees prune fewer than 4 times


def test_a_crashing_early_stop_scorer_is_a_status_not_a_death() -> None:
    class Boom:
        name = "boom"

        def __call__(self, samples):  # type: ignore[no-untyped-def]
            raise RuntimeError("judge down")

    with pytest.warns(RuntimeWarning, match="judge down"):
        [tree] = tree_rollouts([P2], StepBandit([P2]), leaves=2, early_stop=Boom())
    assert tree.metadata["pruned"] == 0 and len(finished_leaves(tree)) == 2
    assert all(n.status == "exec_error" for n in tree.nodes[1:] if not n.terminal)


# ---------------------------------------------------------------------- where to branch
def _chain(surprises: list[float]) -> Tree:
    t = Tree.new(P2, [1, 2])
    parent = 0
    for s in surprises:
        parent = t.add(parent, text="x\n", token_ids=[7, 8], logprobs=[-0.01, -s]).id
    return t


def test_entropy_rule_forks_before_the_most_uncertain_step() -> None:
    t = _chain([0.1, 2.0, 0.5])  # nodes 1, 2, 3; step 2 (node 2) has the most surprising token
    assert step_surprise(t.nodes[2]) == 2.0
    assert EntropyBranching().fork_point(t, t.nodes[3]).id == 1  # fork from node 2's parent
    tie = _chain([2.0, 2.0, 0.5])
    assert EntropyBranching().fork_point(tie, tie.nodes[3]).id == 1  # ties go to the deeper step (node 2)
    assert FixedBranching().fork_point(t, t.nodes[3]).id == 2  # TreePO fallback: the parent


def test_path_surprise_is_the_most_surprising_token_so_far() -> None:
    t = _chain([0.1, 2.0, 0.5])
    # the root has no steps (0); node 1 sees 0.1; nodes 2 and 3 see step 2's 2.0
    assert [path_surprise(t, n) for n in t.nodes] == [0.0, 0.1, 2.0, 2.0]


def test_surprise_gate_keeps_confident_branching_only_by_hand() -> None:
    # q = 0.25: a right line has surprise ln 4 ≈ 1.39 (above the gate of 1.0), a wrong one ln 4/3 ≈ 0.29
    # (below). The root (no steps) branches into two step-1 children owing 2 leaves each. A right child is
    # gated: it runs as a chain (one step 2, one answer line), that leaf finishes owing 1 more, and the owed
    # leaf is sampled from the answer line's parent: 17 + 19 + 2 × 12 = 60 tokens, 1 fork node. A wrong child
    # branches as TreePO does: 17 + 2 × 19 + 2 × 12 = 79 tokens, no fork.
    kinds = set()
    for seed in range(8):
        policy = StepBandit([P2], q=0.25)
        [tree] = tree_rollouts([P2], policy, leaves=4, branch_on=FixedBranching(max_surprise=1.0), seed=seed)
        step1 = tree.children(0)
        right = [step_surprise(c) > 1.0 for c in step1]
        assert len(step1) == 2
        assert [len(tree.children(c.id)) for c in step1] == [1 if r else 2 for r in right]
        assert tree.generated_tokens == sum(60 if r else 79 for r in right)
        assert sum(1 for n in tree.nodes if n.metadata.get("fork")) == sum(right)
        assert len(finished_leaves(tree)) == 4
        tree.validate()
        kinds.add(tuple(sorted(right)))
    assert len(kinds) >= 2  # gated and ungated children both occur among these seeds
    # no token is surprising enough (q = 1/2: every line ln 2 ≈ 0.69 ≤ 1.0): plain TreePO, as the default
    policy = StepBandit([P2], q=0.5)
    [gated] = tree_rollouts([P2], policy, leaves=4, branch_on=FixedBranching(max_surprise=1.0))
    [plain] = tree_rollouts([P2], StepBandit([P2], q=0.5), leaves=4)
    assert _shape([gated]) == _shape([plain]) and _depths(gated) == [1, 2, 4, 4]


def test_surprise_gate_does_not_tilt_what_a_leaf_says() -> None:
    # the gate looks only at a tip's own path, never at the children it samples, so every leaf is still a
    # policy sample: with StepBandit each step is right with probability q = 0.25 on its own, whatever came
    # before, so about a quarter of the leaves' step-k lines are right at every k, gated or not. 300 trees of
    # 4 leaves: even if the 4 leaves of a tree agreed, the sd of the fraction is √(0.25 · 0.75 / 300) ≈ 0.025;
    # the bound is 3 sd. (A rule that moved leaves towards confident paths, as TreePO's softmax over a level
    # does, would put fewer than a quarter under right lines: here the wrong lines are the confident ones.)
    problems = generate_problems(300, 3, seed=5)
    trees = tree_rollouts(
        problems, StepBandit(problems, q=0.25), leaves=4, branch_on=FixedBranching(max_surprise=1.0)
    )
    gated = sum(1 for t in trees for n in t.nodes if not n.terminal and len(t.children(n.id)) == 1)
    assert gated > 300  # the gate did act: many tips ran as chains
    right = [0, 0, 0]
    n_leaves = 0
    for t in trees:
        for leaf in finished_leaves(t):
            ok = check_steps(t.problem, t.steps(leaf.id))
            n_leaves += 1
            for k in range(3):
                right[k] += ok[k]
    assert n_leaves == 1200
    assert all(abs(r / n_leaves - 0.25) < 0.075 for r in right), [r / n_leaves for r in right]


def test_entropy_rollouts_fork_before_the_most_surprising_step() -> None:
    # q = 0.25: a right line's first token has surprise ln 4 ≈ 1.39, a wrong one's ln 4/3 ≈ 0.29, an answer's 0
    where = set()
    for seed in range(12):
        [tree] = tree_rollouts([P2], StepBandit([P2], q=0.25), leaves=3, branch_on="entropy", seed=seed)
        # the root samples 2 chains owing [2, 1]; the first finishes owing 1 more leaf, which is forked once
        [fork] = [n for n in tree.nodes if n.metadata.get("fork")]
        step1 = tree.children(0)[0]
        step2 = tree.children(step1.id)[0]
        # before step 1 (at the root) if step 1 is the more surprising, else before step 2 (ties go deeper)
        expected = 0 if step_surprise(step1) > step_surprise(step2) else step1.id
        assert fork.parent == expected
        where.add(expected == 0)
        assert len(finished_leaves(tree)) == 3
    assert where == {True, False}  # both cases occur among these seeds


def test_semantic_fork_goes_where_children_disagree() -> None:
    t = Tree.new(P2, [1])
    a = t.add(0, text="A", token_ids=[1])
    t.add(0, text="B", token_ids=[2])
    c = t.add(a.id, text="C", token_ids=[3])
    t.add(a.id, text="C", token_ids=[3])
    leaf = t.add(c.id, text="end", token_ids=[4])

    def fallback(tree: Tree, node: Node) -> Node:
        return tree.nodes[node.parent]  # type: ignore[index]

    # the root's children say A and B (entropy ln 2); a's children both say C (entropy 0): fork at the root
    assert semantic_fork(t, leaf, key=str, fallback=fallback).id == 0
    # with one meaning everywhere there is no disagreement: the fallback decides (leaf's parent, c)
    assert semantic_fork(t, leaf, key=lambda s: 0, fallback=fallback).id == c.id
    # end to end: with a key, owed leaves still come out exact
    problems = generate_problems(4, 3, seed=2)
    for tree in tree_rollouts(problems, StepBandit(problems, q=0.5), leaves=6, semantic_key=str):
        assert len(finished_leaves(tree)) == 6


def test_restart_eps_one_makes_every_branch_start_at_the_root() -> None:
    [tree] = tree_rollouts([P2], StepBandit([P2]), leaves=4, restart_eps=1.0)
    # every branch after a tip's first child goes to the root instead, so the root ends with all 4 leaves'
    # first steps and no other node has more than one child: independent sampling
    assert len(tree.children(0)) == 4
    assert all(len(n.children) <= 1 for n in tree.nodes[1:])
    assert tree.metadata["restarts"] == 2  # round 1: each of the 2 step-1 tips sends its second branch home
    [plain] = tree_rollouts([P2], StepBandit([P2]), leaves=4, restart_eps=0.0)
    assert plain.metadata["restarts"] == 0 and len(plain.children(0)) == 2


def test_depth_temperature_by_level() -> None:
    problems = generate_problems(3, 3, seed=4)
    trees = tree_rollouts(
        problems, StepBandit(problems, q=0.25), leaves=4, depth_temperature=(1.0, 0.0), max_depth=5
    )
    # linear from 1.0 at level 0 to 0.0 at level max_depth − 1 = 4
    assert trees[0].metadata["temperatures"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # StepBandit is greedy only at temperature 0: with levels ≥ 1 greedy, every sibling set below the root
    # is identical (the likelier, wrong line)
    greedy = tree_rollouts(
        problems, StepBandit(problems, q=0.25), leaves=4, depth_temperature=lambda lvl: 0.0 if lvl else 1.0
    )
    for t in greedy:
        for n in t.nodes[1:]:
            assert len({k.token_ids for k in t.children(n.id)}) <= 1
    # while at temperature 1 throughout some sibling sets below the root differ (the control)
    plain = tree_rollouts(problems, StepBandit(problems, q=0.25), leaves=4)
    assert any(len({k.token_ids for k in t.children(n.id)}) > 1 for t in plain for n in t.nodes[1:])


# ---------------------------------------------------------------------- segments
def test_segments_cut_lines_and_the_answer_is_read_from_the_whole_line() -> None:
    policy = Typist({P1.prompt: "Step 1: 54*3=162\nAnswer: 162"})
    [tree] = tree_rollouts([P1], policy, leaves=2, branching="segment", segment_tokens=8)
    # 29 tokens (28 chars + EOS) in segments of 8: "Step 1: " | "54*3=162" | "\n" + "Answer:" (cut into two
    # line nodes) | " 162" + EOS; the root branches into 2 identical chains
    leaves = finished_leaves(tree)
    assert len(leaves) == 2
    assert tree.steps(leaves[0].id) == ["Step 1: ", "54*3=162", "\n", "Answer:", " 162"]
    assert [n.answer for n in leaves] == ["162", "162"]
    answer_cut = tree.nodes[leaves[0].parent]  # type: ignore[index]
    assert answer_cut.text == "Answer:" and answer_cut.finish_reason == "length" and not answer_cut.terminal
    assert policy.calls == [2, 2, 2, 2]  # one call per segment level
    # with 3 segments allowed, paths end at "Answer:" unfinished: truncated leaves with no answer
    [short] = tree_rollouts(
        [P1],
        Typist({P1.prompt: "Step 1: 54*3=162\nAnswer: 162"}),
        leaves=2,
        branching="segment",
        segment_tokens=8,
        max_depth=3,
    )
    assert [(n.text, n.answer, n.metadata["truncated"]) for n in finished_leaves(short)] == [
        ("Answer:", None, "max_depth")
    ] * 2


def test_segment_early_stop_judges_complete_lines_only() -> None:
    policy = Typist({P1.prompt: "Step 1: 54*3=163\nAnswer: 163"})
    [tree] = tree_rollouts(
        [P1], policy, leaves=1, branching="segment", segment_tokens=8, early_stop=ArithmeticSteps()
    )
    by_text = {n.text: n for n in tree.nodes[1:] if not n.metadata.get("fork")}
    # "Step 1: " and "54*3=163" end mid-line: nothing complete to judge yet
    assert by_text["Step 1: "].value is None and by_text["54*3=163"].value is None
    # segment 3 completes the line "Step 1: 54*3=163\n", which is wrong: its last node "Answer:" dies, and its
    # one owed leaf is sampled again from its parent (the "\n" node); pruning is then spent (limit 1)
    dead = by_text["Answer:"]
    assert dead.metadata["dead"] and dead.value == 0.0
    [leaf] = finished_leaves(tree)
    assert tree.steps(leaf.id)[:3] == ["Step 1: ", "54*3=163", "\n"]
    assert leaf.answer == "163"


# ---------------------------------------------------------------------- properties
RULES = {
    "fixed": "fixed",
    "entropy": "entropy",
    "late": FixedBranching(start=1),
    "gated": FixedBranching(max_surprise=1.0),
    "late gated": FixedBranching(start=1, max_surprise=0.5),
}


@settings(max_examples=40, deadline=None)
@given(
    leaves=st.integers(1, 10),
    factor=st.integers(2, 4),
    rule=st.sampled_from(sorted(RULES)),
    q=st.floats(0.0, 1.0),
    eps=st.sampled_from([0.0, 0.3, 1.0]),
    stop=st.booleans(),
    steps=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_exact_leaf_budget_and_prefixes_generated_once(
    leaves: int, factor: int, rule: str, q: float, eps: float, stop: bool, steps: int, seed: int
) -> None:
    problems = generate_problems(2, steps, seed=seed)
    policy = StepBandit(problems, q=q)
    trees = tree_rollouts(
        problems,
        policy,
        leaves=leaves,
        branch_factor=factor,
        branch_on=RULES[rule],  # type: ignore[arg-type]
        restart_eps=eps,
        early_stop=ArithmeticSteps() if stop else None,
        seed=seed,
        max_depth=steps + 2,
    )
    for t in trees:
        t.validate()
        assert len(finished_leaves(t)) == leaves == len(t.terminals())
        # every generated token is stored in exactly one node: shared prefixes are never generated twice
        assert t.ledger["generated"] == t.generated_tokens
        assert max(n.depth for n in t.nodes) <= steps + 2
        assert t.metadata["pruned"] <= leaves
        for n in t.nodes[1:]:
            if not n.children:  # a childless node is a finished leaf or a pruned branch, nothing else
                assert n.terminal != bool(n.metadata.get("dead"))
    assert policy.ledger.total.generated == sum(t.generated_tokens for t in trees)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), rule=st.sampled_from(sorted(RULES)))
def test_same_seed_same_trees_alone_or_batched(seed: int, rule: str) -> None:
    problems = generate_problems(3, 3, seed=11)
    kw = {
        "leaves": 5,
        "seed": seed,
        "branch_on": RULES[rule],
        "restart_eps": 0.3,
        "early_stop": ArithmeticSteps(),
    }
    batched = tree_rollouts(problems, StepBandit(problems, q=0.5), **kw)  # type: ignore[arg-type]
    again = tree_rollouts(problems, StepBandit(problems, q=0.5), **kw)  # type: ignore[arg-type]
    alone = [tree_rollouts([p], StepBandit(problems, q=0.5), **kw)[0] for p in problems]  # type: ignore[arg-type]
    assert _shape(batched) == _shape(again) == _shape(alone)
    assert [t.ledger for t in batched] == [t.ledger for t in alone]


def test_a_different_seed_gives_different_trees() -> None:
    problems = generate_problems(4, 4, seed=11)
    a = tree_rollouts(problems, StepBandit(problems, q=0.5), leaves=8, seed=0)
    b = tree_rollouts(problems, StepBandit(problems, q=0.5), leaves=8, seed=1)
    assert _shape(a) != _shape(b)


# ---------------------------------------------------------------------- SLATE
def test_slate_k_candidates_per_step_that_differ_only_at_that_step() -> None:
    policy = StepBandit([P2])
    [tree] = slate_rollouts([P2], policy, k=3)
    # every spine node samples 3 next steps; the first continues: 1 + 3 + 3 + 3 nodes, 3 calls of 3 rows
    assert _depths(tree) == [1, 3, 3, 3]
    assert policy.calls == [3, 3, 3]
    spine = finished_leaves(tree)
    assert len(spine) == 1
    for node in tree.path(spine[0].id)[:-1]:
        kids = tree.children(node.id)
        assert len(kids) == 3 and [bool(k.metadata.get("sibling")) for k in kids] == [False, True, True]
        assert all(not k.children for k in kids[1:])  # siblings are one step long
    assert tree.algorithm == "slate_rollouts" and tree.metadata["k"] == 3


# ---------------------------------------------------------------------- thicken
def test_thicken_by_hand() -> None:
    policy = StepBandit([P2], q=0.25)
    t = Tree.new(P2, policy.encode_prompt(P2.prompt))
    a = t.add(0, text="Step 1: 54*3=162\n", token_ids=policy.encode("Step 1: 54*3=162\n"))  # a thin dead end
    b = t.add(0, text="Step 1: 54*3=163\n", token_ids=policy.encode("Step 1: 54*3=163\n"))
    c = t.add(b.id, text="Step 2: 163-34=129\n", token_ids=policy.encode("Step 2: 163-34=129\n"))
    t.add(
        c.id, text="Answer: 129", token_ids=[*policy.encode("Answer: 129"), EOS], terminal=True, answer="129"
    )
    [cost] = thicken([t], policy, min_leaves=2)
    # deepest first: c (1 terminal below) gets 1 completion, an answer line (12 tokens); a (none) gets 2, each
    # a step 2 (19) and an answer (12); b then has 2 terminals and the root 4, so they get none: 12 + 2 × 31 =
    # 74
    assert cost == 74 == t.metadata["thicken"]["generated"]
    assert [len(t.children(n)) for n in (0, a.id, b.id, c.id)] == [2, 2, 1, 2]
    new = t.nodes[5:]
    assert len(new) == 5 and all(n.metadata["rollout"] for n in new)
    assert policy.calls == [1, 2, 2]  # depth 2: one row; depth 1: two rows, two rounds (step 2, then answers)
    t.validate()
    # every original unfinished node now has at least 2 terminal leaves below it; a second call adds nothing
    assert thicken([t], policy, min_leaves=2) == [0]
    # and more leaves come from new draws (thicken's own salts), never copies of the samples already there
    thicken([t], policy, min_leaves=3)
    assert len(t.terminals()) >= 3


def test_thicken_counts_for_every_node_of_a_rollout_tree() -> None:
    problems = generate_problems(3, 3, seed=9)
    policy = StepBandit(problems, q=0.5)
    trees = slate_rollouts(problems, policy, k=2)
    before = [len(t.nodes) for t in trees]
    costs = thicken(trees, policy, min_leaves=3)
    for t, n0, cost in zip(trees, before, costs, strict=True):
        t.validate()
        assert cost == sum(len(n.token_ids) for n in t.nodes[n0:])
        for n in t.nodes[:n0]:
            if not n.terminal:
                below = sum(1 for m in t.iter_depth_first(n.id) if m.terminal)
                assert below >= 3


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"leaves": 0}, "leaves must be ≥ 1"),
        ({"branch_factor": 1}, "branch_factor must be ≥ 2"),
        ({"branch_on": "widest"}, "branch_on must be one of"),
        ({"restart_eps": 1.5}, "restart_eps"),
        ({"branching": "tokens"}, "branching must be"),
        ({"depth_temperature": (1.0, -1.0), "max_depth": 3}, "temperatures must be finite and ≥ 0"),
        ({"max_depth": 0}, "max_depth"),
        ({"branching": "segment", "segment_tokens": 0}, "token cap"),
    ],
)
def test_bad_knobs_raise_one_clear_error(kw: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SearchError, match=match):
        tree_rollouts([P2], StepBandit([P2]), **kw)


@pytest.mark.parametrize(
    ("kw", "match"), [({"start": -1}, "start is a level ≥ 0"), ({"max_surprise": -0.5}, "max_surprise")]
)
def test_bad_fixed_branching_knobs_raise_one_clear_error(kw: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SearchError, match=match):
        FixedBranching(**kw)
    with pytest.raises(SearchError, match="max_surprise"):
        FixedBranching(max_surprise=math.nan)


def test_a_rule_that_loses_leaves_is_refused() -> None:
    class Leaky(SlateBranching):
        def split(self, tree: Tree, tip: Node, quota: int, level: int, factor: int) -> list[int]:
            return [quota - 1, 0] if quota > 1 else [quota]

    with pytest.raises(SearchError, match="sum to it"):
        tree_rollouts([P2], StepBandit([P2]), leaves=3, branch_on=Leaky())


# ---------------------------------------------------------------------- the shipped model
def test_tree_rollouts_on_the_shipped_policy() -> None:
    problems = generate_problems(3, 2, seed=1)
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    trees = tree_rollouts(problems, policy, leaves=4, seed=3)
    again = tree_rollouts(
        problems, HFPolicy.from_pretrained(SHIPPED_POLICY, prefix_cache=False), leaves=4, seed=3
    )
    assert _shape(trees) == _shape(again)  # the same draws with or without the prefix cache
    for t in trees:
        t.validate()
        assert len(finished_leaves(t)) == 4
        assert t.ledger["generated"] == t.generated_tokens
        for n in t.nodes[1:]:  # a node keeps the engine's tokens: its text is their decoding
            assert policy.decode(n.token_ids) == n.text
    # the root's children share the prompt's prefill: the cache served positions instead of computing them
    assert policy.ledger.total.reused > 0
    assert math.isfinite(sum(n.logprob for t in trees for n in t.nodes))


def test_gated_segments_on_the_shipped_policy() -> None:
    # the configuration the benchmark recommends for tree RL: segments of 24 tokens, surprise gate 2
    problems = generate_problems(3, 4, seed=1)
    policy = HFPolicy.from_pretrained(SHIPPED_POLICY)
    trees = tree_rollouts(
        problems,
        policy,
        leaves=8,
        seed=0,
        branching="segment",
        segment_tokens=24,
        max_depth=5,
        branch_on=FixedBranching(max_surprise=2.0),
    )
    for t in trees:
        t.validate()
        assert len(finished_leaves(t)) == 8 == len(t.terminals())  # exactly the leaf budget
        assert t.ledger["generated"] == t.generated_tokens  # shared prefixes generated once
        for n in t.nodes:
            # two children not sampled for owed leaves came from one split: the gate let that tip branch
            split = [c for c in t.children(n.id) if not c.metadata.get("fork")]
            if len(split) > 1:
                assert path_surprise(t, n) <= 2.0
