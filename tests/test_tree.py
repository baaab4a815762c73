"""Tests of :mod:`treeward.tree`: building, navigation, checks, summaries and the JSONL format."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treeward.tree import Node, Problem, Tree, TreeFormatError, iter_jsonl, read_jsonl, write_jsonl

# ---------------------------------------------------------------------------------------------------------------
# A hand-built tree used throughout. Shape (node id: text, tokens, logprobs):
#
#   0  root  "Q: 2+3?\n"          [10, 11, 12]
#   ├─ 1  "Step 1: 2+3=5\n"        [20, 21]      [-0.5, -0.25]       stop
#   │  ├─ 3  "Answer: 5"           [40, 41, 42]  [-0.1, -0.2, -0.3]  eos     terminal, answer "5", outcome 1.0
#   │  └─ 5  "Step 2: 5"           [60]          [-2.0]              length  terminal, answer None, outcome None
#   └─ 2  "Step 1: 2+3=6\n"        [30]          [-1.0]              stop
#      ├─ 4  "Answer: 6"           [50, 51]      [-0.4, -0.6]        eos     terminal, answer "6", outcome 0.0
#      └─ 6  "Answer: 5"           [70]          [-0.7]              eos     terminal, answer "5", outcome 1.0
# ---------------------------------------------------------------------------------------------------------------


def build_tree(*, reference: str | None = "5") -> Tree:
    problem = Problem(id="p1", prompt="Q: 2+3?\n", answer=reference, metadata={"task": "toy"})
    tree = Tree.new(problem, [10, 11, 12], algorithm="beam")
    tree.add(0, text="Step 1: 2+3=5\n", token_ids=[20, 21], logprobs=[-0.5, -0.25], finish_reason="stop")
    tree.add(0, text="Step 1: 2+3=6\n", token_ids=[30], logprobs=[-1.0], finish_reason="stop")
    tree.add(
        1,
        text="Answer: 5",
        token_ids=[40, 41, 42],
        logprobs=[-0.1, -0.2, -0.3],
        finish_reason="eos",
        terminal=True,
        answer="5",
        outcome=1.0,
    )
    tree.add(
        2,
        text="Answer: 6",
        token_ids=[50, 51],
        logprobs=[-0.4, -0.6],
        finish_reason="eos",
        terminal=True,
        answer="6",
        outcome=0.0,
    )
    tree.add(1, text="Step 2: 5", token_ids=[60], logprobs=[-2.0], finish_reason="length", terminal=True)
    tree.add(
        2,
        text="Answer: 5",
        token_ids=[70],
        logprobs=[-0.7],
        finish_reason="eos",
        terminal=True,
        answer="5",
        outcome=1.0,
    )
    tree.chosen = 3
    tree.answer = "5"
    tree.ledger = {"generated": 10.0, "calls": 4.0}
    return tree


# ---------------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------------


def test_new_holds_only_the_root_with_the_prompt_tokens():
    problem = Problem(id="p", prompt="Q: hi\n")
    tree = Tree.new(problem, [5, 6, 7], algorithm="bon")
    assert len(tree.nodes) == 1
    root = tree.root
    assert (root.id, root.parent, root.depth) == (0, None, 0)
    assert root.text == "Q: hi\n"
    assert root.token_ids == (5, 6, 7)
    assert root.logprobs == ()
    assert root.finish_reason is None
    assert root.children == []
    assert tree.algorithm == "bon"
    assert tree.chosen is None
    assert tree.generated_tokens == 0


def test_add_assigns_ids_depths_parents_and_children():
    tree = build_tree()
    # ids are positions in tree.nodes, in insertion order 0..6
    assert [n.id for n in tree.nodes] == [0, 1, 2, 3, 4, 5, 6]
    # parents as drawn in the diagram at the top of this file
    assert [n.parent for n in tree.nodes] == [None, 0, 0, 1, 2, 1, 2]
    # depth = parent's depth + 1: root 0, its children 1, grandchildren 2
    assert [n.depth for n in tree.nodes] == [0, 1, 1, 2, 2, 2, 2]
    # children in insertion order
    assert [n.children for n in tree.nodes] == [[1, 2], [3, 5], [4, 6], [], [], [], []]
    assert [n.id for n in tree.children(2)] == [4, 6]
    assert tree.children(3) == []


def test_add_returns_the_new_node_with_extra_fields_set():
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    node = tree.add(
        0, text="s", token_ids=[2, 3], logprobs=[-1.0, -2.0], reward=0.5, status="timeout", visits=3
    )
    assert node is tree.nodes[1]
    assert node.token_ids == (2, 3)  # stored as tuples
    assert node.logprobs == (-1.0, -2.0)
    assert (node.reward, node.status, node.visits) == (0.5, "timeout", 3)
    # defaults of the fields not given
    assert (node.value, node.terminal, node.answer, node.outcome) == (None, False, None, None)
    assert node.metadata == {}


def test_add_copies_token_sequences():
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    toks = [2, 3]
    tree.add(0, text="s", token_ids=toks)
    toks.append(4)
    assert tree.nodes[1].token_ids == (2, 3)


def test_add_without_logprobs_is_allowed():
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    node = tree.add(0, text="s", token_ids=[2, 3])
    assert node.logprobs == ()
    tree.validate()


@pytest.mark.parametrize("parent", [-1, 1, 7])
def test_add_rejects_a_parent_that_is_not_a_node(parent):
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    with pytest.raises(IndexError, match=f"parent {parent}"):
        tree.add(parent, text="s", token_ids=[2])
    assert len(tree.nodes) == 1  # nothing was appended
    assert tree.root.children == []


@pytest.mark.parametrize(("tokens", "logprobs"), [([2, 3], [-1.0]), ([2], [-1.0, -2.0])])
def test_add_rejects_logprobs_of_the_wrong_length(tokens, logprobs):
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    with pytest.raises(ValueError, match=f"{len(logprobs)} logprobs for {len(tokens)} tokens"):
        tree.add(0, text="s", token_ids=tokens, logprobs=logprobs)
    assert len(tree.nodes) == 1


# ---------------------------------------------------------------------------------------------------------------
# navigation
# ---------------------------------------------------------------------------------------------------------------


def test_path_runs_root_to_node():
    tree = build_tree()
    assert [n.id for n in tree.path(0)] == [0]
    assert [n.id for n in tree.path(4)] == [0, 2, 4]
    assert [n.id for n in tree.path(5)] == [0, 1, 5]


def test_steps_and_response_exclude_the_prompt():
    tree = build_tree()
    assert tree.steps(0) == []
    assert tree.response(0) == ""
    assert tree.steps(3) == ["Step 1: 2+3=5\n", "Answer: 5"]
    # steps joined with nothing in between (the "\n" is part of step 1's text)
    assert tree.response(3) == "Step 1: 2+3=5\nAnswer: 5"
    assert tree.response(6) == "Step 1: 2+3=6\nAnswer: 5"


def test_prefix_ids_concatenate_tokens_root_to_node():
    tree = build_tree()
    # root [10, 11, 12]
    assert tree.prefix_ids(0) == [10, 11, 12]
    # root [10, 11, 12] + node 1 [20, 21] + node 3 [40, 41, 42]
    assert tree.prefix_ids(3) == [10, 11, 12, 20, 21, 40, 41, 42]
    # root [10, 11, 12] + node 2 [30] + node 4 [50, 51]
    assert tree.prefix_ids(4) == [10, 11, 12, 30, 50, 51]


def test_leaves_and_terminals():
    tree = build_tree()
    # nodes without children, root excluded: 3, 4, 5, 6
    assert [n.id for n in tree.leaves()] == [3, 4, 5, 6]
    # terminal flag set on 3, 4, 5 (cut by length) and 6
    assert [n.id for n in tree.terminals()] == [3, 4, 5, 6]
    tree.nodes[5].terminal = False
    assert [n.id for n in tree.terminals()] == [3, 4, 6]
    assert [n.id for n in tree.leaves()] == [3, 4, 5, 6]  # still a leaf


def test_a_root_only_tree_has_no_leaves():
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    assert tree.leaves() == []


def test_iter_depth_first_is_preorder_with_children_in_insertion_order():
    tree = build_tree()
    # 0, then subtree of 1 (1, 3, 5), then subtree of 2 (2, 4, 6)
    assert [n.id for n in tree.iter_depth_first()] == [0, 1, 3, 5, 2, 4, 6]
    assert [n.id for n in tree.iter_depth_first(2)] == [2, 4, 6]
    assert [n.id for n in tree.iter_depth_first(4)] == [4]


def test_generated_tokens_counts_non_root_tokens():
    tree = build_tree()
    # node lengths 2 + 1 + 3 + 2 + 1 + 1 = 10; the 3 prompt tokens are not generated
    assert tree.generated_tokens == 10


def test_node_logprob_is_an_exact_fsum():
    tree = build_tree()
    # -0.5 + -0.25 is exact in binary
    assert tree.nodes[1].logprob == -0.75
    # The exact sum of the doubles nearest -0.1, -0.2, -0.3 is -0.60000000000000000555..., whose nearest double is
    # the double nearest -0.6. Left-to-right float addition gives -0.6000000000000001 instead.
    assert sum((-0.1, -0.2, -0.3)) == -0.6000000000000001
    assert tree.nodes[3].logprob == -0.6
    # the root has no logprobs: 0.0
    assert tree.root.logprob == 0.0


# ---------------------------------------------------------------------------------------------------------------
# summary and correctness
# ---------------------------------------------------------------------------------------------------------------


def test_summary_of_the_hand_built_tree():
    tree = build_tree()
    expected = {
        "problem_id": "p1",
        "algorithm": "beam",
        "answer": "5",
        "reference": "5",
        "correct": True,  # chosen node 3 has outcome 1.0 > 0
        "n_nodes": 7,
        "n_leaves": 4,  # 3, 4, 5, 6
        "n_terminals": 4,  # 3, 4, 5, 6
        "n_distinct_answers": 2,  # answers "5", "6", "5" (node 5 has None, not counted)
        "max_depth": 2,
        "generated_tokens": 10,  # 2 + 1 + 3 + 2 + 1 + 1
        "ledger_generated": 10.0,
        "ledger_calls": 4.0,
    }
    assert tree.summary() == expected
    json.dumps(tree.summary(), allow_nan=False)  # JSON-serialisable


def test_summary_of_a_root_only_tree():
    tree = Tree.new(Problem(id="q", prompt="Q\n"), [1, 2])
    expected = {
        "problem_id": "q",
        "algorithm": "",
        "answer": None,
        "reference": None,
        "correct": None,  # nothing chosen and no reference
        "n_nodes": 1,
        "n_leaves": 0,
        "n_terminals": 0,
        "n_distinct_answers": 0,
        "max_depth": 0,
        "generated_tokens": 0,
    }
    assert tree.summary() == expected


@pytest.mark.parametrize(
    ("reference", "chosen", "expected"),
    [
        ("5", None, False),  # a reference exists but search chose nothing
        (None, None, None),  # no reference, nothing chosen
        ("5", 3, True),  # outcome 1.0
        ("5", 4, False),  # outcome 0.0 is not > 0
        ("5", 5, None),  # outcome None: never scored
        (None, 3, True),  # the outcome decides even without a reference
    ],
)
def test_correct(reference, chosen, expected):
    tree = build_tree(reference=reference)
    tree.chosen = chosen
    assert tree.correct is expected


def test_correct_negative_outcome_is_false():
    tree = build_tree()
    tree.nodes[3].outcome = -1.0
    assert tree.correct is False


# ---------------------------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------------------------


def test_validate_accepts_the_hand_built_tree():
    build_tree().validate()


def _break_id(t: Tree) -> None:
    t.nodes[2].id = 5


def _parent_after_child(t: Tree) -> None:
    t.nodes[1].parent = 2


def _self_parent(t: Tree) -> None:
    t.nodes[3].parent = 3


def _wrong_depth(t: Tree) -> None:
    t.nodes[3].depth = 3


def _logprob_length(t: Tree) -> None:
    t.nodes[1].logprobs = (-0.5,)


def _unknown_finish(t: Tree) -> None:
    t.nodes[4].finish_reason = "timeout"


def _chosen_past_end(t: Tree) -> None:
    t.chosen = 7


def _chosen_negative(t: Tree) -> None:
    t.chosen = -1


def _second_root(t: Tree) -> None:
    t.nodes[2].parent = None


def _root_with_parent(t: Tree) -> None:
    t.nodes[0].parent = 0


def _missing_from_children(t: Tree) -> None:
    t.nodes[2].children.remove(4)


def _no_nodes(t: Tree) -> None:
    t.nodes.clear()


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_id, "node at index 2 has id 5"),
        (_parent_after_child, "node 1 has parent 2; parents must come first"),
        (_self_parent, "node 3 has parent 3"),
        (_wrong_depth, "node 3 has depth 3, parent depth 1"),
        (_logprob_length, "node 1: 1 logprobs for 2 tokens"),
        (_unknown_finish, "unknown finish_reason 'timeout'"),
        (_chosen_past_end, "chosen node 7"),
        (_chosen_negative, "chosen node -1"),
        (_second_root, "node 2 has no parent"),
        (_root_with_parent, "needs a root"),
        (_missing_from_children, "node 4 missing from its parent's children"),
        (_no_nodes, "needs a root"),
    ],
)
def test_validate_catches_each_broken_invariant(breaker, message):
    tree = build_tree()
    breaker(tree)
    with pytest.raises(TreeFormatError, match=message):
        tree.validate()


def test_validate_catches_a_root_with_nonzero_depth():
    tree = Tree.new(Problem(id="p", prompt="Q\n"), [1])
    tree.nodes[0].depth = 3
    tree.add(0, text="s", token_ids=[2])  # depth 4, consistent with the broken root
    with pytest.raises(TreeFormatError):
        tree.validate()


def test_validate_catches_a_children_entry_whose_parent_is_elsewhere():
    tree = build_tree()
    tree.nodes[1].children.append(4)  # node 4's parent is 2
    with pytest.raises(TreeFormatError):
        tree.validate()


# ---------------------------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------------------------


def build_unicode_tree() -> Tree:
    """Unicode text (incl. U+2028 and U+0085, which some line splitters treat as newlines), awkward floats, Nones."""
    problem = Problem(
        id="ü-1", prompt="Q: Zoë hat 3 Äpfel — wie viele? ✓\n", answer=None, metadata={"lang": "de"}
    )
    tree = Tree.new(problem, [1, 2, 3], algorithm="mcts")
    tree.add(
        0,
        text="Schritt 1: 3×4=12 🙂\u2028next\x85line\r\n",
        token_ids=[100, 200_000],
        logprobs=[-0.1, 1e-300],
        finish_reason="stop",
        reward=None,
        value=-0.0,
        metadata={"nested": {"k": None, "tags": ["a", "β"]}, "temperature": 0.7},
    )
    tree.add(
        1,
        text="Answer: 12",
        token_ids=[7],
        logprobs=[-5e-324],
        finish_reason="eos",
        reward=0.25,
        status="timeout",
        visits=9,
        terminal=True,
        answer="12",
        outcome=None,
    )
    tree.add(0, text="", token_ids=[], finish_reason="length")
    tree.chosen = None
    tree.ledger = {"generated": 3.0, "reused": 0.5}
    tree.metadata = {"beam_width": 4, "note": "日本語", "none": None}
    return tree


def test_jsonl_round_trip_is_lossless(tmp_path):
    trees = [build_tree(), build_unicode_tree()]
    path = tmp_path / "trees.jsonl"
    assert write_jsonl(trees, path) == 2
    # one line per tree
    assert len(path.read_text(encoding="utf-8").split("\n")) == 3  # two lines and the trailing ""
    back = read_jsonl(path)
    assert [t.to_dict() for t in back] == [t.to_dict() for t in trees]
    # children are not stored; they are rebuilt from the parents
    assert [[n.children for n in t.nodes] for t in back] == [[n.children for n in t.nodes] for t in trees]
    u = back[1]
    assert u.nodes[1].text == "Schritt 1: 3×4=12 🙂\u2028next\x85line\r\n"
    assert u.nodes[1].logprobs == (-0.1, 1e-300)
    assert isinstance(u.nodes[1].logprobs, tuple)
    assert math.copysign(1.0, u.nodes[1].value) == -1.0  # -0.0 keeps its sign
    assert u.nodes[2].logprobs == (-5e-324,)
    assert (u.problem.answer, u.chosen, u.nodes[1].reward, u.nodes[2].outcome) == (None, None, None, None)
    assert u.nodes[1].metadata == {"nested": {"k": None, "tags": ["a", "β"]}, "temperature": 0.7}
    assert u.metadata == {"beam_width": 4, "note": "日本語", "none": None}
    assert u.ledger == {"generated": 3.0, "reused": 0.5}
    assert u.nodes[3].token_ids == () and u.nodes[3].text == ""
    assert back[0].summary() == trees[0].summary()


def test_write_jsonl_accepts_str_paths_and_generators(tmp_path):
    path = str(tmp_path / "t.jsonl")
    assert write_jsonl((build_tree() for _ in range(3)), path) == 3
    assert len(read_jsonl(path)) == 3


def test_write_jsonl_append_adds_and_default_overwrites(tmp_path):
    path = tmp_path / "t.jsonl"
    a, b = build_tree(), build_unicode_tree()
    assert write_jsonl([a], path) == 1
    assert write_jsonl([b, a], path, append=True) == 2
    assert [t.problem.id for t in read_jsonl(path)] == ["p1", "ü-1", "p1"]
    assert write_jsonl([b], path) == 1  # append=False truncates
    assert [t.problem.id for t in read_jsonl(path)] == ["ü-1"]


def test_write_jsonl_refuses_nan_rather_than_writing_non_json(tmp_path):
    tree = build_tree()
    tree.nodes[1].logprobs = (math.nan, -0.25)
    with pytest.raises(ValueError):
        write_jsonl([tree], tmp_path / "t.jsonl")


def _line(tree: Tree) -> str:
    return json.dumps(tree.to_dict(), ensure_ascii=False)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(_line(build_tree()) + "\n" + _line(build_tree()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(TreeFormatError, match=":3:") as info:
        read_jsonl(path)
    assert str(path) in str(info.value)
    assert "not valid JSON" in str(info.value)
    # the two good lines before it are yielded first
    it = iter_jsonl(path)
    assert next(it).problem.id == "p1"
    assert next(it).problem.id == "p1"
    with pytest.raises(TreeFormatError, match=":3:"):
        next(it)


def test_parent_past_the_node_list_is_a_format_error(tmp_path):
    d = build_tree().to_dict()
    d["nodes"][4]["parent"] = 9  # 7 nodes
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(d) + "\n", encoding="utf-8")
    with pytest.raises(TreeFormatError, match=r":1: node 4 has parent 9"):
        read_jsonl(path)


def test_negative_parent_is_a_format_error():
    d = build_tree().to_dict()
    d["nodes"][4]["parent"] = -1
    with pytest.raises(TreeFormatError, match="parent -1"):
        Tree.from_dict(d)


def test_broken_invariant_in_a_record_is_a_format_error_with_line(tmp_path):
    d = build_tree().to_dict()
    d["nodes"][3]["depth"] = 7
    path = tmp_path / "bad.jsonl"
    path.write_text(_line(build_tree()) + "\n" + json.dumps(d) + "\n", encoding="utf-8")
    with pytest.raises(TreeFormatError, match=":2: node 3 has depth 7"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "record",
    [
        "[1, 2]",  # not an object
        "5",
        "null",
        '{"nodes": []}',  # no problem
        '{"problem": {"id": "p", "prompt": "Q"}}',  # no nodes
        '{"problem": {"id": "p", "prompt": "Q"}, "nodes": [{"id": 0}]}',  # node without parent/depth/text
        '{"problem": {"id": "p", "prompt": "Q"}, "nodes": [{"id": 0, "parent": null, "depth": 0, "text": "Q", '
        '"token_ids": ["x"]}]}',  # token id not an int
    ],
)
def test_records_that_are_not_trees_raise_format_errors(tmp_path, record):
    path = tmp_path / "bad.jsonl"
    path.write_text(record + "\n", encoding="utf-8")
    with pytest.raises(TreeFormatError, match=":1:"):
        read_jsonl(path)


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path):
    path = tmp_path / "t.jsonl"
    good = _line(build_tree())
    path.write_text("\n" + good + "\n\n   \n" + good + "\n\t\n", encoding="utf-8")
    assert len(read_jsonl(path)) == 2
    # lines: 1 blank, 2 tree, 3 blank, 4 blank, 5 tree, 6 blank, 7 bad
    path.write_text("\n" + good + "\n\n   \n" + good + "\n\t\n{\n", encoding="utf-8")
    with pytest.raises(TreeFormatError, match=":7:"):
        read_jsonl(path)


def test_empty_file_reads_as_no_trees(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    assert read_jsonl(path) == []


# ---------------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
json_dicts = st.dictionaries(st.text(max_size=6), json_values, max_size=3)


@st.composite
def random_trees(draw) -> Tree:
    problem = Problem(
        id=draw(texts), prompt=draw(texts), answer=draw(st.none() | texts), metadata=draw(json_dicts)
    )
    tree = Tree.new(problem, draw(st.lists(st.integers(0, 300_000), max_size=6)), algorithm=draw(texts))
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.integers(0, len(tree.nodes) - 1))
        n_tok = draw(st.integers(0, 5))
        tokens = draw(st.lists(st.integers(0, 300_000), min_size=n_tok, max_size=n_tok))
        logprobs = draw(st.lists(finite, min_size=n_tok, max_size=n_tok)) if draw(st.booleans()) else []
        tree.add(
            parent,
            text=draw(texts),
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=draw(st.sampled_from([None, "stop", "eos", "length"])),
            reward=draw(st.none() | finite),
            status=draw(st.sampled_from(["ok", "timeout", "exec_error"])),
            value=draw(st.none() | finite),
            visits=draw(st.integers(0, 1000)),
            terminal=draw(st.booleans()),
            answer=draw(st.none() | texts),
            outcome=draw(st.none() | finite),
            metadata=draw(json_dicts),
        )
    tree.chosen = draw(st.none() | st.integers(0, len(tree.nodes) - 1))
    tree.answer = draw(st.none() | texts)
    tree.ledger = draw(st.dictionaries(st.text(max_size=6), finite, max_size=3))
    tree.metadata = draw(json_dicts)
    return tree


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(random_trees(), min_size=1, max_size=3))
def test_random_trees_round_trip_exactly(trees):
    for t in trees:
        t.validate()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        assert write_jsonl(trees, path) == len(trees)
        back = read_jsonl(path)
    assert len(back) == len(trees)
    for orig, got in zip(trees, back, strict=True):
        got.validate()
        assert got.to_dict() == orig.to_dict()
        # stricter than ==: same float bits (-0.0 vs 0.0) and same key order
        assert json.dumps(got.to_dict()) == json.dumps(orig.to_dict())
        assert [n.children for n in got.nodes] == [n.children for n in orig.nodes]
        assert got.summary() == orig.summary()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_trees())
def test_navigation_invariants(tree):
    ids = [n.id for n in tree.iter_depth_first()]
    # depth-first from the root visits every node exactly once, each parent before its children
    assert sorted(ids) == list(range(len(tree.nodes)))
    position = {i: k for k, i in enumerate(ids)}
    for n in tree.nodes[1:]:
        assert position[n.parent] < position[n.id]
        # a node's prefix extends its parent's by its own tokens
        assert tree.prefix_ids(n.id) == tree.prefix_ids(n.parent) + list(n.token_ids)
        assert tree.steps(n.id) == [*tree.steps(n.parent), n.text]
        path = tree.path(n.id)
        assert len(path) == n.depth + 1
        assert [p.depth for p in path] == list(range(n.depth + 1))
    assert tree.generated_tokens == sum(len(n.token_ids) for n in tree.nodes[1:])
    # leaves are exactly the non-root nodes no node names as parent
    parents = {n.parent for n in tree.nodes}
    assert [n.id for n in tree.leaves()] == [n.id for n in tree.nodes[1:] if n.id not in parents]


def test_node_from_dict_defaults():
    n = Node.from_dict({"id": 1, "parent": 0, "depth": 1, "text": "s", "token_ids": [4, 5]})
    assert n.logprobs == ()
    assert (n.finish_reason, n.reward, n.status, n.value, n.visits) == (None, None, "ok", None, 0)
    assert (n.terminal, n.answer, n.outcome, n.metadata, n.children) == (False, None, None, {}, [])
