"""Tests of the arithmetic task (:mod:`treeward.tasks.arithmetic`) and its rewards and loader (:mod:`treeward.tasks`)."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from treeward.rewards import Reward, RewardResult, Sample, Status
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, ProblemFileError, load_problems
from treeward.tasks.arithmetic import (
    MAX_STEPS,
    MAX_VALUE,
    ParsedStep,
    check_steps,
    format_prompt,
    generate_problems,
    make_problem,
    numbers_in_question,
    parse_answer,
    parse_step,
    solution_text,
)
from treeward.tree import Problem

# ---------------------------------------------------------------------------------------------------------------
# One fixed problem, built by hand. Worked by hand:
#   start 54;  54*3 = 162;  162-34 = 128;  128+15 = 143.
# The question mentions 54, 34 and 15 as digits and 3 as "three times" (the digit run "34" is not a 3).
# ---------------------------------------------------------------------------------------------------------------
QUESTION = (
    "Ann has 54 cards. Ann gets three times as many. Then Ann loses 34. Then Ann gets 15 more. "
    "How many cards does Ann have?"
)
STRUCTURED = Problem(
    id="ann",
    prompt=format_prompt(QUESTION),
    answer="143",
    metadata={"question": QUESTION, "start": 54, "ops": [["*", 3], ["-", 34], ["+", 15]]},
)
TEXT_ONLY = Problem(
    id="ann-text", prompt=format_prompt(QUESTION), answer="143", metadata={"question": QUESTION}
)
RIGHT = ["Step 1: 54*3=162", "Step 2: 162-34=128", "Step 3: 128+15=143", "Answer: 143"]


# ---------------------------------------------------------------------------------------------------------------
# generate_problems / make_problem / solution_text
# ---------------------------------------------------------------------------------------------------------------


def _replay(problem: Problem) -> list[int]:
    """The chain of values start, v1, ..., vn, recomputed from the metadata."""
    values = [problem.metadata["start"]]
    for op, arg in problem.metadata["ops"]:
        v = values[-1]
        values.append(v + arg if op == "+" else v - arg if op == "-" else v * arg)
    return values


def test_generate_problems_is_deterministic_for_a_seed():
    a = generate_problems(25, [1, 2, 3, 4, 5], seed=7)
    b = generate_problems(25, [1, 2, 3, 4, 5], seed=7)
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert a == b


def test_different_seeds_give_different_problems():
    a = generate_problems(25, 3, seed=0)
    b = generate_problems(25, 3, seed=1)
    assert [p.prompt for p in a] != [p.prompt for p in b]
    assert {p.id for p in a}.isdisjoint({p.id for p in b})


def test_ids_cycle_step_counts():
    ps = generate_problems(5, [2, 4], seed=5)
    # step counts cycle 2, 4, 2, 4, 2; id is arith-s{k}-{seed}-{i}
    assert [p.id for p in ps] == [
        "arith-s2-5-0",
        "arith-s4-5-1",
        "arith-s2-5-2",
        "arith-s4-5-3",
        "arith-s2-5-4",
    ]
    assert [p.metadata["n_steps"] for p in ps] == [2, 4, 2, 4, 2]
    assert [len(p.metadata["ops"]) for p in ps] == [2, 4, 2, 4, 2]


@pytest.mark.parametrize("k", range(1, MAX_STEPS + 1))
def test_step_counts_are_honoured(k):
    for p in generate_problems(20, k, seed=3):
        assert p.metadata["n_steps"] == k
        assert len(p.metadata["ops"]) == k
        # one sentence per op; every op after the first starts with "Then "
        assert p.metadata["question"].count("Then ") == k - 1
        assert len(solution_text(p).split("\n")) == k + 1  # k steps and the answer line


def test_generate_zero_and_negative():
    assert generate_problems(0, 3) == []
    with pytest.raises(ValueError, match="n must be"):
        generate_problems(-1, 3)


@pytest.mark.parametrize("bad", [0, MAX_STEPS + 1])
def test_make_problem_rejects_step_counts_out_of_range(bad):
    with pytest.raises(ValueError, match="n_steps"):
        make_problem(random.Random(0), bad)


def test_two_hundred_generated_problems_verify_fully():
    problems = generate_problems(200, [1, 2, 3, 4, 5], seed=11)
    for p in problems:
        values = _replay(p)
        # every value along the chain stays in 1..999
        assert all(1 <= v <= MAX_VALUE for v in values), (p.id, values)
        assert p.answer == str(values[-1])
        assert p.prompt == format_prompt(p.metadata["question"])
        assert p.metadata["task"] == "arithmetic"
        sol = solution_text(p)
        lines = sol.split("\n")
        assert check_steps(p, lines) == [True] * len(lines)
        assert parse_answer(sol) == p.answer
        # the weaker text-only verifier accepts every right solution too
        text_only = Problem(
            id=p.id, prompt=p.prompt, answer=p.answer, metadata={"question": p.metadata["question"]}
        )
        assert check_steps(text_only, lines) == [True] * len(lines)


def test_an_off_by_one_result_is_caught_at_its_step():
    for p in generate_problems(60, [1, 2, 3, 4, 5], seed=2):
        lines = solution_text(p).split("\n")
        for j in range(len(lines) - 1):
            st = parse_step(lines[j])
            assert st is not None
            bad = [*lines[:j], f"Step {st.index}: {st.a}{st.op}{st.b}={st.result + 1}", *lines[j + 1 :]]
            ok = check_steps(p, bad)
            assert ok[:j] == [True] * j
            assert ok[j] is False


def test_solution_text_of_the_fixed_problem():
    assert solution_text(STRUCTURED) == "\n".join(RIGHT)


# ---------------------------------------------------------------------------------------------------------------
# check_steps, structured problem
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(RIGHT, [True, True, True, True], id="right"),
        pytest.param(RIGHT[:2], [True, True], id="right-partial"),
        pytest.param([], [], id="empty"),
        # 54*3 is 162, not 172. Step 2 starts from 162, but step 1 *wrote* 172, so it does not chain;
        # step 3 chains from step 2's 128 and is right; the answer repeats 143 after three steps.
        pytest.param(["Step 1: 54*3=172", *RIGHT[1:]], [False, False, True, True], id="wrong-arithmetic"),
        # each later step chains from the wrong 172 correctly: 172-34=138, 138+15=153, Answer 153.
        pytest.param(
            ["Step 1: 54*3=172", "Step 2: 172-34=138", "Step 3: 138+15=153", "Answer: 153"],
            [False, True, True, True],
            id="later-steps-judged-on-their-own",
        ),
        # 160-34=126 is right arithmetic, but step 1 gave 162; step 3 chains from 126: 126+15=141.
        pytest.param(
            ["Step 1: 54*3=162", "Step 2: 160-34=126", "Step 3: 126+15=141", "Answer: 141"],
            [True, False, True, True],
            id="wrong-chaining",
        ),
        # misread operand: 162-3=159 is right arithmetic, right chain, right operator, but the question says 34
        pytest.param(["Step 1: 54*3=162", "Step 2: 162-3=159"], [True, False], id="misread-operand"),
        # wrong operator: 54+3=57 is right arithmetic from the start value, but step 1 is a multiplication
        pytest.param(["Step 1: 54+3=57"], [False], id="wrong-operator"),
        # the first operand must be the start value 54
        pytest.param(["Step 1: 55*3=165"], [False], id="wrong-start"),
        # step index: the second line says "Step 3"
        pytest.param(["Step 1: 54*3=162", "Step 3: 162-34=128"], [True, False], id="wrong-index"),
        # an unparseable line is wrong and breaks the chain: the next step has no written result to chain from
        pytest.param(
            ["Step 1: 54*3=162", "so we take away 34", "Step 3: 128+15=143"],
            [True, False, False],
            id="unparseable",
        ),
        pytest.param(["Step 1: 54 times 3 is 162"], [False], id="unparseable-words"),
        # answer does not repeat the last result 143
        pytest.param([*RIGHT[:3], "Answer: 142"], [True, True, True, False], id="answer-not-last-result"),
        # answer after two of three steps: it repeats 128, but the problem has three operations
        pytest.param([*RIGHT[:2], "Answer: 128"], [True, True, False], id="answer-too-early"),
        pytest.param(["Answer: 54"], [False], id="answer-before-any-step"),
        # a fourth step where the problem has three operations
        pytest.param([*RIGHT[:3], "Step 4: 143+1=144"], [True, True, True, False], id="step-beyond-ops"),
        # surrounding and inner whitespace, trailing newlines are tolerated
        pytest.param(
            ["  Step 1 : 54 * 3 = 162\n", "Step 2: 162-34=128\n", "Step 3:128+15=143\n", "Answer:143\n"],
            [True, True, True, True],
            id="whitespace",
        ),
    ],
)
def test_check_steps_structured(steps, expected):
    assert check_steps(STRUCTURED, steps) == expected


def test_check_steps_accepts_ops_as_tuples_and_start_as_string():
    p = Problem(
        id="x", prompt=STRUCTURED.prompt, metadata={"question": QUESTION, "start": "54", "ops": [("*", "3")]}
    )
    assert check_steps(p, ["Step 1: 54*3=162", "Answer: 162"]) == [True, True]


# ---------------------------------------------------------------------------------------------------------------
# check_steps, text-only problem (no "start"/"ops"): operator unchecked, operands must be mentioned
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(RIGHT, [True, True, True, True], id="right"),
        # 3 is mentioned only as "three times"
        pytest.param(["Step 1: 54*3=162"], [True], id="three-times-is-3"),
        # 4 is not mentioned
        pytest.param(["Step 1: 54*4=216"], [False], id="operand-not-mentioned"),
        # 55 is not a number in the question
        pytest.param(["Step 1: 55*3=165"], [False], id="first-operand-not-mentioned"),
        # step 1 may start from any mentioned number: 15 and 34 are both in the question
        pytest.param(["Step 1: 15+34=49"], [True], id="first-operand-any-mentioned"),
        # the operator is not checked without structure: 54+3=57 passes (it fails the structured check)
        pytest.param(["Step 1: 54+3=57"], [True], id="operator-unchecked"),
        # 43 is not in the question
        pytest.param(["Step 1: 54*3=162", "Step 2: 162-43=119"], [True, False], id="misread-operand"),
        pytest.param(["Step 1: 54*3=172"], [False], id="wrong-arithmetic"),
        pytest.param(["Step 1: 54*3=162", "Step 2: 160-34=126"], [True, False], id="wrong-chaining"),
        pytest.param(
            ["Step 1: 54*3=172", "Step 2: 172-34=138", "Answer: 138"], [False, True, True], id="judged-on-own"
        ),
        pytest.param(["Step 1: 54*3=162", "Step 3: 162-34=128"], [True, False], id="wrong-index"),
        pytest.param(["Step 1: 54*3=162", "blah"], [True, False], id="unparseable"),
        pytest.param([*RIGHT[:3], "Answer: 142"], [True, True, True, False], id="answer-not-last-result"),
        # without structure the verifier cannot know how many steps there are: an early answer that repeats the
        # last result is accepted
        pytest.param([*RIGHT[:2], "Answer: 128"], [True, True, True], id="early-answer-accepted"),
        # nothing to repeat yet
        pytest.param(["Answer: 143"], [False], id="answer-first"),
    ],
)
def test_check_steps_text_only(steps, expected):
    assert check_steps(TEXT_ONLY, steps) == expected


def test_text_only_falls_back_to_the_prompt_without_a_question():
    p = Problem(id="bare", prompt=format_prompt(QUESTION))
    assert check_steps(p, RIGHT) == [True, True, True, True]
    assert check_steps(p, ["Step 1: 54*4=216"]) == [False]


def test_text_only_twice_is_2():
    q = "Bob has 10 coins. Bob gets twice as many. How many coins does Bob have?"
    p = Problem(id="bob", prompt=format_prompt(q), metadata={"question": q})
    # 10*2=20; 2 comes only from "twice"
    assert check_steps(p, ["Step 1: 10*2=20", "Answer: 20"]) == [True, True]
    assert check_steps(p, ["Step 1: 10*3=30"]) == [False]


# ---------------------------------------------------------------------------------------------------------------
# parsing helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 143", "143"),
        ("Step 1: 2+3=5\nAnswer: 5\nAnswer: 7", "7"),  # last wins
        ("Answer: 007", "7"),
        ("Answer: 0", "0"),
        ("Answer: -12", "-12"),
        ("Answer: -0", "0"),
        ("Answer:5", "5"),
        ("The Answer: 42 cards", "42"),
        ("Step 1: 54*3=162", None),
        ("Answer: many", None),
        ("", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Step 2: 162-34=128", ParsedStep(2, 162, "-", 34, 128)),
        ("Step 1: 54*3=162", ParsedStep(1, 54, "*", 3, 162)),
        ("  Step 3 :128 + 15= 143 ", ParsedStep(3, 128, "+", 15, 143)),
        ("Step 1: -5+-3=-8", ParsedStep(1, -5, "+", -3, -8)),
        # the parser does not check arithmetic
        ("Step 1: 2+2=5", ParsedStep(1, 2, "+", 2, 5)),
        ("Step 1: 54x3=162", None),
        ("Step 1: 6/2=3", None),
        ("Step 1: 54*3", None),
        ("Step: 54*3=162", None),
        ("Step 1: 54*3=162 because", None),
        ("Answer: 5", None),
        ("", None),
    ],
)
def test_parse_step(line, expected):
    assert parse_step(line) == expected


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (QUESTION, {54, 3, 34, 15}),
        ("Cara has 7 beads. Cara gets twice as many. Then Cara ends up with five times as many.", {7, 2, 5}),
        ("Dan has 12 coins. Dan gets four times as many. Then Dan finds 4 more.", {12, 4}),
        ("no numbers here", set()),
        ("", set()),
        ("Eve has 007 shells.", {7}),
    ],
)
def test_numbers_in_question(question, expected):
    assert numbers_in_question(question) == expected


def test_format_prompt():
    assert format_prompt("  What is 2+3?  \n") == "Q: What is 2+3?\n"
    assert format_prompt(QUESTION) == "Q: " + QUESTION + "\n"


# ---------------------------------------------------------------------------------------------------------------
# load_problems
# ---------------------------------------------------------------------------------------------------------------


def test_load_problems_good_file(tmp_path):
    path = tmp_path / "probs.jsonl"
    rows = [
        json.dumps(
            {"question": "Ann has 3 cards. Ann gets 2 more. How many cards does Ann have?", "answer": 5}
        ),
        "",
        json.dumps(
            {
                "id": "custom",
                "question": "  Bob has 10 coins.  ",
                "answer": " 7 ",
                "metadata": {"source": "hand"},
            }
        ),
        "   ",
        json.dumps({"id": 17, "question": "Cara has 1 bead.", "answer": "1"}),
        json.dumps({"question": "Dan has 2 coins.", "answer": -4}),
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ps = load_problems(path)
    # ids: "<stem>-<physical line>" unless given; line 2 and 4 are blank
    assert [p.id for p in ps] == ["probs-1", "custom", "17", "probs-6"]
    assert [p.answer for p in ps] == ["5", "7", "1", "-4"]  # stringified and stripped
    assert ps[0].prompt == "Q: Ann has 3 cards. Ann gets 2 more. How many cards does Ann have?\n"
    assert ps[1].prompt == "Q: Bob has 10 coins.\n"
    assert ps[1].metadata == {"question": "Bob has 10 coins.", "source": "hand"}
    assert ps[2].metadata == {"question": "Cara has 1 bead."}
    assert load_problems(str(path)) == ps  # str paths too


def test_loaded_problem_is_checked_in_text_only_mode(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": QUESTION, "answer": 143}) + "\n", encoding="utf-8")
    (p,) = load_problems(path)
    assert check_steps(p, RIGHT) == [True, True, True, True]
    assert check_steps(p, ["Step 1: 54+3=57"]) == [True]  # no operator check without structure


@pytest.mark.parametrize(
    ("line", "why"),
    [
        pytest.param("{not json", "not valid JSON", id="invalid-json"),
        pytest.param('[{"question": "q", "answer": 1}]', "expected a JSON object, got list", id="array"),
        pytest.param('"just a string"', "expected a JSON object, got str", id="string"),
        pytest.param('{"answer": 1}', "question", id="missing-question"),
        pytest.param('{"question": "   ", "answer": 1}', "question", id="empty-question"),
        pytest.param('{"question": 5, "answer": 1}', "question", id="question-not-a-string"),
        pytest.param('{"question": "q"}', "answer", id="missing-answer"),
        pytest.param('{"question": "q", "answer": null}', "answer", id="null-answer"),
        pytest.param('{"question": "q", "answer": [1]}', "answer", id="list-answer"),
        pytest.param('{"question": "q", "answer": {"v": 1}}', "answer", id="dict-answer"),
        pytest.param('{"question": "q", "answer": 1, "metadata": [1]}', "metadata", id="metadata-list"),
        pytest.param('{"question": "q", "answer": 1, "metadata": "x"}', "metadata", id="metadata-string"),
    ],
)
def test_load_problems_malformed_line_is_named(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "Ann has 3 cards.", "answer": 3})
    path.write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(ProblemFileError, match=":2:") as info:
        load_problems(path)
    assert str(path) in str(info.value)
    assert why in str(info.value)


def test_load_problems_missing_file(tmp_path):
    with pytest.raises(ProblemFileError, match="not found"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(ProblemFileError, match="not found"):
        load_problems(tmp_path)  # a directory is not a problems file


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_load_problems_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ProblemFileError, match="no problems"):
        load_problems(path)


def test_problem_file_error_is_a_value_error():
    assert issubclass(ProblemFileError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------------


def _sample(response: str, *, steps=(), reference="143", partial=False, metadata=None) -> Sample:
    return Sample(
        prompt=STRUCTURED.prompt,
        response=response,
        steps=tuple(steps),
        reference=reference,
        metadata={} if metadata is None else metadata,
        partial=partial,
    )


def test_answer_reward_cases():
    samples = [
        _sample("\n".join(RIGHT)),  # right
        _sample("Step 1: 54*3=162\nAnswer: 142"),  # wrong
        _sample("Answer: 0143"),  # leading zero normalised: right
        _sample("Answer: 143", reference=143),  # an int reference is stringified
        _sample("Step 1: 54*3=162\nStep 2: 162-34=128"),  # complete, no answer line
        _sample("Step 1: 54*3=162", partial=True),  # partial, no answer yet
        _sample("Answer: 143", partial=True),  # a partial with an answer is scored
    ]
    got = ArithmeticAnswer()(samples)
    assert len(got) == len(samples)
    assert [r.score for r in got] == [1.0, 0.0, 1.0, 1.0, 0.0, None, 1.0]
    assert [r.status for r in got] == [
        Status.OK,
        Status.OK,
        Status.OK,
        Status.OK,
        Status.PARSE_ERROR,
        Status.NOT_APPLICABLE,
        Status.OK,
    ]
    assert got[4].status == "parse_error" and got[5].status == "n/a"
    assert got[0].components == {"answer": 1.0}
    assert got[1].components == {"answer": 0.0}
    assert got[1].info == {"answer": "142"}
    assert all(r.step_scores is None for r in got)


def test_answer_reward_empty_batch():
    assert ArithmeticAnswer()([]) == []
    assert ArithmeticSteps()([]) == []


@pytest.mark.parametrize(("response", "reference"), [("Answer: 7", "007"), ("Answer: 12", 12.0)])
def test_answer_reward_compares_numbers_not_strings(response, reference):
    (r,) = ArithmeticAnswer()([_sample(response, reference=reference)])
    assert r.score == 1.0


def test_steps_reward_aligns_with_given_steps():
    steps = ("Step 1: 54*3=162\n", "Step 2: 162-34=128\n", "   ")
    (r,) = ArithmeticSteps()([_sample("".join(steps), steps=steps, metadata={"problem": STRUCTURED})])
    # right, right, blank (unparseable: 0.0)
    assert r.step_scores == (1.0, 1.0, 0.0)
    assert r.score == 0.0  # min
    assert r.status is Status.OK
    assert r.components == {"steps_correct": 2.0}


def test_steps_reward_blank_step_in_the_middle():
    steps = ("Step 1: 54*3=162\n", "", "Step 3: 128+15=143\n")
    (r,) = ArithmeticSteps()([_sample("".join(steps), steps=steps, metadata={"problem": STRUCTURED})])
    # the blank step is wrong and breaks the chain, so step 3 (which needs 128 written before it) is wrong too
    assert r.step_scores == (1.0, 0.0, 0.0)
    assert len(r.step_scores) == len(steps)


def test_steps_reward_uses_the_structured_problem_from_metadata():
    steps = ("Step 1: 54+3=57",)
    with_problem = _sample(steps[0], steps=steps, metadata={"problem": STRUCTURED})
    text_only = _sample(steps[0], steps=steps, metadata={"question": QUESTION})
    r_struct, r_text = ArithmeticSteps()([with_problem, text_only])
    # structured: the operator must be "*"; text only: the operator is not checked
    assert r_struct.step_scores == (0.0,)
    assert r_text.step_scores == (1.0,)


def test_steps_reward_rebuilds_structure_from_sample_metadata():
    meta = {"question": QUESTION, "start": 54, "ops": [["*", 3], ["-", 34], ["+", 15]], "other": 1}
    (r,) = ArithmeticSteps()([_sample("Step 1: 54+3=57", steps=("Step 1: 54+3=57",), metadata=meta)])
    assert r.step_scores == (0.0,)


def test_steps_reward_splits_the_response_when_no_steps_given():
    # blank lines are dropped: two steps, both right
    (r,) = ArithmeticSteps()(
        [_sample("Step 1: 54*3=162\n\nStep 2: 162-34=128\n", metadata={"problem": STRUCTURED})]
    )
    assert r.step_scores == (1.0, 1.0)
    assert r.score == 1.0


@pytest.mark.parametrize("response", ["", "  \n\n "])
def test_steps_reward_without_steps_is_not_applicable(response):
    (r,) = ArithmeticSteps()([_sample(response)])
    assert r.score is None
    assert r.status is Status.NOT_APPLICABLE
    assert r.step_scores is None


def test_steps_reward_score_is_min_of_step_scores():
    cases = [
        RIGHT,
        ["Step 1: 54*3=172", *RIGHT[1:]],
        ["Step 1: 54*3=172", "Step 2: 172-34=138", "Step 3: 138+15=153", "Answer: 153"],
        [*RIGHT[:2], "Answer: 128"],
        ["Step 1: 54*3=162", "junk"],
    ]
    samples = [_sample("\n".join(c), steps=c, metadata={"problem": STRUCTURED}) for c in cases]
    results = ArithmeticSteps()(samples)
    for case, r in zip(cases, results, strict=True):
        assert r.step_scores == tuple(1.0 if x else 0.0 for x in check_steps(STRUCTURED, case))
        assert len(r.step_scores) == len(case)
        assert r.score == min(r.step_scores)
    # by hand: all right -> 1.0; the others each have a wrong step -> 0.0
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_steps_reward_on_generated_solutions_is_all_ones():
    problems = generate_problems(30, [1, 2, 3, 4, 5], seed=4)
    samples = []
    for p in problems:
        lines = solution_text(p).split("\n")
        steps = (*(ln + "\n" for ln in lines[:-1]), lines[-1])
        samples.append(Sample(prompt=p.prompt, response="".join(steps), steps=steps, metadata={"problem": p}))
    for p, r in zip(problems, ArithmeticSteps()(samples), strict=True):
        assert r.step_scores == (1.0,) * (p.metadata["n_steps"] + 1)
        assert r.score == 1.0


@pytest.mark.parametrize(
    ("cls", "name"), [(ArithmeticAnswer, "arithmetic_answer"), (ArithmeticSteps, "arithmetic_steps")]
)
def test_rewards_have_stable_names_and_pickle(cls, name):
    reward = cls()
    assert reward.name == name
    assert cls.name == name
    assert isinstance(reward, Reward)
    clone = pickle.loads(pickle.dumps(reward))
    assert type(clone) is cls
    assert clone.name == name
    samples = [
        _sample("\n".join(RIGHT), steps=RIGHT, metadata={"problem": STRUCTURED}),
        _sample("Step 1: 54*3=172\nAnswer: 172", metadata={"problem": STRUCTURED}),
    ]
    expected = reward(samples)
    assert clone(samples) == expected
    assert all(isinstance(r, RewardResult) for r in expected)
