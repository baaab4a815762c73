"""Tests of the rule-based built-in rewards: verifiable (math-verify pool, EM/F1, numeric, format, length,
repetition), text overlap (BLEU, chrF, ROUGE-L), tool calls (ToolRL, Router-R1) and retrieval (CaRR, nuggets,
GraphRAG-R1 shapes, regularised relevance).

Expected numbers are derived by hand in the comments above each assert. Library parity tests call sacrebleu,
rouge-score and NLTK directly. The math-verify deadline is proven with a real input that makes sympy slow.
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import sys
import threading
import time
from collections.abc import Iterator

import nltk
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from treeward.rewards import Reward, RewardResult, Sample, Status
from treeward.rewards.retrieval import (
    CitationRubricReward,
    CostAwareF1,
    LexicalNuggetMatcher,
    NuggetCoverage,
    RegularizedRelevance,
    RetrievalCount,
    RetrievalShaping,
    TermCosine,
    cited_urls,
)
from treeward.rewards.text import (
    BleuberiBLEU,
    BleuRougeF1,
    ChrF,
    RougeL,
    SentenceBLEU,
    UnicodeTokenizer,
    bleuberi_bleu,
)
from treeward.rewards.tools import (
    RollingCostNormalizer,
    RouterReward,
    ToolCallReward,
    match_score,
    parse_tool_calls,
    router_format,
    tool_call_correctness,
)
from treeward.rewards.verifiable import (
    ExactMatch,
    LengthPenalty,
    MathVerify,
    MetadataCount,
    NumericMatch,
    OverlongPenalty,
    RegexFormat,
    RepetitionPenalty,
    SubstringMatch,
    TagFormat,
    TokenF1,
    boxed,
    exact_match,
    last_number,
    normalize_answer,
    token_f1,
    wordpunct,
)


def S(response: object, reference: object = None, **kw: object) -> Sample:
    """A sample with a dummy prompt (``response`` may be a non-string on purpose)."""
    return Sample(prompt=str(kw.pop("prompt", "q")), response=response, reference=reference, **kw)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a killed but not yet reaped zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False
    except OSError:  # no /proc (not Linux): kill(0) is all there is
        return True


# ---------------------------------------------------------------------------------------------------------------
# the contract, for every reward that needs a reference
# ---------------------------------------------------------------------------------------------------------------
REFERENCE_REWARDS = [
    ExactMatch(),
    SubstringMatch(),
    TokenF1(),
    NumericMatch(),
    SentenceBLEU(),
    BleuberiBLEU(),
    ChrF(),
    RougeL(),
    BleuRougeF1(),
    ToolCallReward(),
    RouterReward(),
    CitationRubricReward(),
    NuggetCoverage(),
    CostAwareF1(),
]
SHAPE_REWARDS = [
    TagFormat(),
    RegexFormat(r"^<think>.*?</think><answer>.*?</answer>$"),
    OverlongPenalty(max_length=20, cache_length=5),
    LengthPenalty(target=10, per_unit=0.1),
    RepetitionPenalty(),
    RetrievalShaping(),
    RegularizedRelevance(),
]


@pytest.mark.parametrize("reward", REFERENCE_REWARDS + SHAPE_REWARDS, ids=lambda r: r.name)
def test_contract_names_pickle_and_bad_input(reward: Reward) -> None:
    # A stable name that TRL can use as the metric key, a Reward by protocol, picklable, one result per sample.
    assert reward.name and reward.__name__ == reward.name  # type: ignore[attr-defined]
    assert isinstance(reward, Reward)
    copy = pickle.loads(pickle.dumps(reward))
    batch = [S("<think>x</think><answer>42</answer>", "42"), S(None, "42"), S(12345, "x")]
    assert reward([]) == []
    for r in (reward, copy):
        out = r(batch)
        assert len(out) == 3 and all(isinstance(x, RewardResult) for x in out)
        # A response that is not text is a status with no score, never an exception.
        assert out[1].status == Status.PARSE_ERROR and out[1].score is None
        assert out[2].status == Status.PARSE_ERROR and out[2].score is None
    assert [x.score for x in copy(batch[:1])] == [x.score for x in reward(batch[:1])]


@pytest.mark.parametrize("reward", REFERENCE_REWARDS, ids=lambda r: r.name)
def test_missing_reference_is_not_applicable(reward: Reward) -> None:
    out = reward([S("<think>x</think><answer>42</answer>"), S("<answer>42</answer>", [])])
    assert [(r.score, r.status) for r in out] == [(None, Status.NOT_APPLICABLE)] * 2


@pytest.mark.parametrize("reward", REFERENCE_REWARDS, ids=lambda r: r.name)
def test_partial_prefix_is_not_applicable_for_outcome_rewards(reward: Reward) -> None:
    (r,) = reward([S("<think>x</think><answer>42</answer>", "42", partial=True)])
    assert (r.score, r.status) == (None, Status.NOT_APPLICABLE)


@pytest.mark.parametrize(
    "reward",
    [ExactMatch(), TokenF1(), NumericMatch(), BleuberiBLEU(), RougeL(), NuggetCoverage()],
    ids=lambda r: r.name,
)
def test_malformed_reference_is_parse_error_without_score(reward: Reward) -> None:
    (r,) = reward([S("<answer>42</answer>", {"not": "a string"})])
    assert r.status == Status.PARSE_ERROR and r.score is None and "reference" in r.info["reason"]


# ---------------------------------------------------------------------------------------------------------------
# SQuAD normalisation, EM, F1, numeric
# ---------------------------------------------------------------------------------------------------------------
def test_normalize_answer_is_squad() -> None:
    # lower → drop punctuation → drop articles → squeeze: "The  Eiffel-Tower!" → "the  eiffeltower" → "eiffeltower"
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_token_f1_by_hand() -> None:
    # pred "the cat sat on the mat" → [cat, sat, on, mat] (4); gold "a cat on a mat" → [cat, on, mat] (3)
    # shared 3: precision 3/4, recall 3/3, F1 = 2·(3/4)·1 / (3/4 + 1) = 6/7
    assert token_f1("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7)
    # max over references: the second reference matches exactly
    assert token_f1("the cat sat on the mat", ["a dog", "cat sat on mat"]) == 1.0
    # HotpotQA's yes/no rule: "yes" vs "yes it is" shares a token (F1 = 2·1·(1/3)/(4/3) = 1/2) but scores 0
    assert token_f1("yes", ["yes it is"]) == pytest.approx(0.5)
    assert token_f1("yes", ["yes it is"], yes_no_exact=True) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("", ["x"]) == 0.0


def test_exact_substring_and_f1_rewards() -> None:
    batch = [
        S("<think>...</think><answer>The Eiffel Tower!</answer>", ["eiffel tower", "tour eiffel"]),
        S("It is the Eiffel Tower in Paris", "Eiffel Tower"),
        S("<answer>Louvre</answer>", "Eiffel Tower"),
    ]
    em = ExactMatch()(batch)
    # 1: normalised "eiffel tower" == "eiffel tower"; 2: no tag → whole text, not equal; 3: different
    assert [r.score for r in em] == [1.0, 0.0, 0.0]
    assert em[0].info["answer"] == "The Eiffel Tower!"
    sub = SubstringMatch()(batch)
    # 2: "eiffel tower" occurs inside "it is eiffel tower in paris"
    assert [r.score for r in sub] == [1.0, 1.0, 0.0]
    f1 = TokenF1()(batch)
    # 2: pred [it, is, eiffel, tower, in, paris] (6) vs [eiffel, tower] (2): P = 2/6, R = 1, F1 = 2·(1/3)/(4/3) = 1/2
    assert [r.score for r in f1] == pytest.approx([1.0, 0.5, 0.0])
    assert f1[1].components == pytest.approx({"f1": 0.5, "precision": 1 / 3, "recall": 1.0})


def test_answer_extraction_failure_is_counted_not_hidden() -> None:
    from treeward.rewards.verifiable import answer_tag

    strict = ExactMatch(extract=answer_tag)
    (r,) = strict([S("Eiffel Tower", "Eiffel Tower")])
    # no <answer> block: a wrong answer (0.0) with status parse_error and the reason
    assert (r.score, r.status, r.info["reason"]) == (0.0, Status.PARSE_ERROR, "no answer found")
    (r,) = ExactMatch(extract=answer_tag, parse_error_score=None)([S("x", "x")])
    assert (r.score, r.status) == (None, Status.PARSE_ERROR)


def test_numeric_match_by_hand() -> None:
    assert last_number("pay 1,234.50 dollars, not 3") == 3.0
    assert last_number("x = -3/4") == -0.75
    assert last_number("about 2.5e3 m") == 2500.0 and last_number("none") is None
    assert boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    rew = NumericMatch(rel_tol=1e-6)
    batch = [
        S("<answer>about 1,234.5 dollars</answer>", "1234.5"),
        S("<answer>100.00005</answer>", 100),  # |Δ| = 5e-5 ≤ 1e-6·100.00005 ≈ 1.0e-4 → match
        S("<answer>101</answer>", [100, "99"]),  # neither within tolerance
        S("<answer>3/4</answer>", "0.75"),
        S("<answer>no idea</answer>", "7"),
        S("<answer>7</answer>", "seven"),
    ]
    out = rew(batch)
    assert [r.score for r in out[:4]] == [1.0, 1.0, 0.0, 1.0]
    # closest reference to 101 is 100: abs error 1
    assert out[2].components["abs_error"] == pytest.approx(1.0)
    assert (out[4].score, out[4].status) == (0.0, Status.PARSE_ERROR)
    assert (out[5].score, out[5].status) == (None, Status.PARSE_ERROR)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_f1_properties(a: str, b: str) -> None:
    # F1 is symmetric, in [0, 1], and an exact match has F1 1
    assert token_f1(a, [b]) == pytest.approx(token_f1(b, [a]))
    assert 0.0 <= token_f1(a, [b]) <= 1.0
    if exact_match(a, [b]):
        assert token_f1(a, [b]) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# format, length, repetition
# ---------------------------------------------------------------------------------------------------------------
def test_tag_format_breakdown() -> None:
    rew = TagFormat()
    cases = {
        "<think>a</think><answer>b</answer>": (1.0, 1, 1, 1, 1),
        "<think>a</think>\n<answer>b</answer>\n": (1.0, 1, 1, 1, 1),  # whitespace outside is allowed
        "<answer>b</answer><think>a</think>": (0.0, 1, 1, 0, 1),  # wrong order
        "<think>a</think><think>c</think><answer>b</answer>": (0.0, 1, 0, 1, 1),  # think twice
        "hi <think>a</think><answer>b</answer>": (0.0, 1, 1, 1, 0),  # text outside
        "<think>a</think>": (0.0, 0, 0, 0, 0),  # answer missing
        "<think>a<answer>b</answer></think>": (0.0, 1, 1, 0, 1),  # nested
    }
    for text, (score, present, once, ordered, outside) in cases.items():
        (r,) = rew([S(text)])
        assert r.score == score, text
        assert r.components == {
            "present": present,
            "exactly_once": once,
            "ordered": ordered,
            "no_outside_text": outside,
        }, text
    # relaxed checks: order and outside text not required
    (r,) = TagFormat(ordered=False, allow_outside_text=True)([S("x <answer>b</answer><think>a</think>")])
    assert r.score == 1.0
    assert (
        TagFormat()([S("<think>a</think><answer>b</answer>", partial=True)])[0].status
        == Status.NOT_APPLICABLE
    )


def test_regex_format_bleuberi_pattern() -> None:
    rew = RegexFormat(r"^<think>.*?</think><answer>.*?</answer>$")
    texts = [
        "<think>a\nb</think><answer>c</answer>",
        " <think>a</think><answer>c</answer>\n",
        "<answer>c</answer>",
    ]
    # DOTALL lets .*? span lines; the response is stripped first
    assert [r.score for r in rew([S(t) for t in texts])] == [1.0, 1.0, 0.0]


def test_overlong_penalty_dapo_by_hand() -> None:
    rew = OverlongPenalty(max_length=20, cache_length=5)
    # free up to L_max − L_cache = 15; L = 18 → (15 − 18)/5 = −0.6; L = 20 → −1; L = 21 → −1
    lengths = [1, 15, 16, 18, 20, 21]
    out = rew([S(" ".join(["w"] * n)) for n in lengths])
    assert [r.score for r in out] == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0])
    assert out[3].components == {"length": 18.0, "penalty": pytest.approx(-0.6)}
    # token counts from the generator's metadata; missing → n/a
    meta = OverlongPenalty(max_length=20, cache_length=5, length=MetadataCount("num_tokens"))
    a, b = meta([S("x", metadata={"num_tokens": 19}), S("x")])
    assert a.score == pytest.approx(-0.8) and (b.score, b.status) == (None, Status.NOT_APPLICABLE)
    # verl's penalty_factor scales the whole penalty
    assert OverlongPenalty(max_length=20, cache_length=5, penalty_factor=0.5).penalty(18) == pytest.approx(
        -0.3
    )


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.integers(0, 400), st.integers(0, 400))
def test_overlong_penalty_is_monotone_and_bounded(max_len: int, cache: int, a: int, b: int) -> None:
    cache = min(cache, max_len)
    p = OverlongPenalty(max_length=max_len, cache_length=cache).penalty
    lo, hi = sorted((a, b))
    assert -1.0 <= p(hi) <= p(lo) <= 0.0


def test_length_penalty_by_hand() -> None:
    rew = LengthPenalty(target=10, per_unit=0.1)
    # 13 words: −0.1·3 = −0.3; 30 words: −2.0 floored at −1; 5 words: 0
    out = rew([S(" ".join(["w"] * n)) for n in (13, 30, 5)])
    assert [r.score for r in out] == pytest.approx([-0.3, -1.0, 0.0])


def test_repetition_penalty_by_hand() -> None:
    # "a b a b a b", bigrams: ab ba ab ba ab → 5 total, 2 distinct → rate 1 − 2/5 = 0.6
    (r,) = RepetitionPenalty(n=2)([S("a b a b a b", partial=True)])
    assert r.score == pytest.approx(-0.6) and r.status == Status.OK  # prefixes are scored too
    assert r.components == {"repetition_rate": pytest.approx(0.6), "distinct_ngrams": 2, "ngrams": 5}
    (r,) = RepetitionPenalty(n=3)([S("too short")])
    assert r.score == 0.0


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \n\t.,;!?'-_()0123456789abcXYZéüßñøКошка猫が")), max_size=60))
def test_repetition_in_range_and_wordpunct_is_nltk(text: str) -> None:
    # (an alphabet on which Python's re and the `regex` engine of NLTK >= 3.9 agree about \w and \s; they differ
    # on control characters and on digits such as "²")
    (r,) = RepetitionPenalty()([S(text)])
    assert r.score is not None and -1.0 <= r.score <= 0.0
    assert wordpunct(text) == nltk.wordpunct_tokenize(text)


# ---------------------------------------------------------------------------------------------------------------
# math-verify: a real process pool with a real deadline
# ---------------------------------------------------------------------------------------------------------------
# 9^(9^9) has ~370 million digits: sympy evaluates it when comparing and does not come back for minutes (measured:
# > 20 s before the check was killed), in pure-Python loops.
SLOW = r"The answer is $\boxed{9^{9^{9}}}$"
DEADLINE = 1.5


@pytest.fixture(scope="module")
def pool() -> Iterator[MathVerify]:
    mv = MathVerify(deadline_s=DEADLINE, workers=2)
    mv([S(r"\boxed{1}", "1"), S(r"\boxed{2}", "2")])  # start both workers outside the timed tests
    yield mv
    mv.close()


def test_math_verify_contract_without_starting_workers() -> None:
    mv = MathVerify(deadline_s=DEADLINE, workers=2)
    assert mv.name == mv.__name__ == "math_verify" and isinstance(mv, Reward)
    out = mv(
        [S(r"\boxed{1}"), S(r"\boxed{1}", []), S(r"\boxed{1}", "1", partial=True), S(None, "1"), S("x", {1})]
    )
    assert [(r.score, r.status) for r in out] == [
        (None, Status.NOT_APPLICABLE),
        (None, Status.NOT_APPLICABLE),
        (None, Status.NOT_APPLICABLE),
        (None, Status.PARSE_ERROR),
        (None, Status.PARSE_ERROR),
    ]
    assert mv.worker_pids == []  # nothing to check: no process was started


def test_math_verify_verdicts(pool: MathVerify) -> None:
    batch = [
        S(r"so the answer is $\boxed{\frac{1}{2}}$", "0.5"),
        S(r"$\boxed{x^2+1}$", "1+x^2"),  # a bare LaTeX reference is read inside $...$
        S(r"$\boxed{3}$", ["4", "3"]),  # any reference may match
        S(r"$\boxed{3}$", "4"),
        S("I do not know", "4"),
        S(r"$\boxed{3}$", ""),  # a reference math-verify cannot parse
    ]
    out = pool(batch)
    assert [r.score for r in out[:4]] == [1.0, 1.0, 1.0, 0.0]
    assert all(r.status == Status.OK for r in out[:4]) and out[0].components == {"correct": 1.0}
    assert (out[4].score, out[4].status) == (0.0, Status.PARSE_ERROR)  # no answer: a wrong answer, counted
    assert (out[5].score, out[5].status) == (None, Status.PARSE_ERROR)
    assert "reference" in out[5].info["reason"]


def test_math_verify_deadline_kills_only_the_slow_sample(pool: MathVerify) -> None:
    before = set(pool.worker_pids)
    assert len(before) == 2
    batch = [S(SLOW, "1"), S(r"$\boxed{2}$", "2"), S(r"$\boxed{5}$", "6"), S(r"$\boxed{7}$", "7")]
    t0 = time.monotonic()
    out = pool(batch)
    elapsed = time.monotonic() - t0
    # the slow sample times out at the deadline; the other worker answers the rest meanwhile
    assert elapsed < DEADLINE + 2.5, elapsed
    assert (out[0].score, out[0].status) == (None, Status.TIMEOUT)
    assert out[0].info["latency_s"] >= DEADLINE
    assert [(r.score, r.status) for r in out[1:]] == [(1.0, Status.OK), (0.0, Status.OK), (1.0, Status.OK)]
    # the worker that ran it was killed and reaped; the pool never exceeds its size and still works
    killed = before - set(pool.worker_pids)
    assert len(killed) == 1 and not any(_alive(p) for p in killed)
    assert len(pool.worker_pids) <= 2
    assert [r.score for r in pool([S(r"$\boxed{4}$", "4")])] == [1.0]


def test_math_verify_serial_path_has_a_deadline_too() -> None:
    mv = MathVerify(deadline_s=1.0, workers=0)
    t0 = time.monotonic()
    out = mv([S(SLOW, "1"), S(r"$\boxed{\sqrt{4}}$", "2")])
    assert time.monotonic() - t0 < 1.0 + 2.0
    assert (out[0].score, out[0].status) == (None, Status.TIMEOUT)
    assert (out[1].score, out[1].status) == (1.0, Status.OK)
    assert mv.worker_pids == []  # in this process: no workers were started
    # small batches take the serial path when asked to
    small = MathVerify(deadline_s=1.0, workers=2, serial_max=1)
    assert [r.score for r in small([S(r"$\boxed{1}$", "1")])] == [1.0] and small.worker_pids == []


def test_math_verify_workers_do_not_leak(pool: MathVerify) -> None:
    # a pickled copy carries no processes; it starts its own, and they die with it (finalizer on collection)
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.worker_pids == [] and copy.workers == 2
    # this test is about processes, not deadlines: a loaded CI machine must not time it out
    copy.deadline_s = 60.0
    # first called from a thread that then ends: on Linux the kernel kills workers with the thread that started
    # them (PR_SET_PDEATHSIG); the next call notices and starts new ones instead of waiting forever
    got: list[float | None] = []

    def score_in_thread(reward: MathVerify) -> None:
        got.extend(r.score for r in reward([S(r"$\boxed{3}$", "3")]))

    t = threading.Thread(target=score_in_thread, args=(copy,))
    t.start()
    t.join()
    assert got == [1.0]
    first = copy.worker_pids
    assert len(first) == 1  # one task: one worker started, lazily
    if sys.platform.startswith("linux"):
        deadline = time.monotonic() + 5
        while _alive(first[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(first[0])
    again = copy([S(r"$\boxed{4}$", "4")])
    assert [r.score for r in again] == [1.0], again
    copy_pids = copy.worker_pids
    assert len(copy_pids) == 1 and all(_alive(p) for p in copy_pids)
    del copy
    gc.collect()
    assert not any(_alive(p) for p in copy_pids)
    # leaving a with-block closes: every worker is stopped and reaped
    pids = pool.worker_pids
    assert pids and all(_alive(p) for p in pids)
    with pool:
        pass
    assert pool.worker_pids == [] and not any(_alive(p) for p in pids)


# ---------------------------------------------------------------------------------------------------------------
# text overlap: parity with the libraries
# ---------------------------------------------------------------------------------------------------------------
PAIRS = [
    ("The cat sat on the mat.", ["The cat is on the mat."]),
    ("There is a cat on the mat.", ["The cat is on the mat.", "A cat sits on the mat."]),
    ("It is raining heavily today in London.", ["Today it rains heavily in London."]),
    ("Paris is the capital of France.", ["The capital of France is Paris."]),
    ("Use a for-loop; then return the list.", ["Iterate with a for loop and return the list."]),
    ("42", ["The answer is 42."]),
    (
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        ["Der flinke braune Fuchs springt über den Hund."],
    ),
    ("Le chat est assis sur le tapis.", ["Le chat s'est assis sur le tapis."]),
    ("El niño comió una manzana roja.", ["El niño se comió una manzana roja."]),
    ("猫がマットの上に座っている。", ["猫はマットの上に座った。"]),
    ("我喜欢在公园里散步。", ["我喜欢去公园散步。"]),
    ("Кошка сидит на ковре.", ["Кошка сидела на ковре."]),
    ("مرحبا بالعالم الجميل", ["مرحبا يا عالم جميل"]),
    ("고양이가 매트 위에 앉아 있다.", ["고양이가 매트 위에 앉았다."]),
]
NON_LATIN = PAIRS[9:]


def _lcs(a: list[str], b: list[str]) -> int:
    """Slow reference LCS length (dynamic programming)."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_bleu_and_chrf_match_sacrebleu() -> None:
    samples = [S(h, refs) for h, refs in PAIRS]
    bleu = [r.score for r in SentenceBLEU()(samples)]
    chrf = [r.score for r in ChrF()(samples)]
    for (h, refs), b, c in zip(PAIRS, bleu, chrf, strict=True):
        assert b == pytest.approx(sacrebleu.sentence_bleu(h, refs).score / 100), h
        assert c == pytest.approx(sacrebleu.sentence_chrf(h, refs).score / 100), h
    assert all(c is not None and c > 0 for c in chrf)  # chrF needs no word boundaries


def test_rouge_l_unicode_tokenizer_parity() -> None:
    tok = UnicodeTokenizer()
    default = rouge_scorer.RougeScorer(["rougeL"])
    out = RougeL()([S(h, refs) for h, refs in PAIRS])
    for (h, refs), r in zip(PAIRS, out, strict=True):
        # against a slow LCS over the same tokens, best reference
        best = 0.0
        for ref in refs:
            ht, rt = tok.tokenize(h), tok.tokenize(ref)
            lcs = _lcs(ht, rt)
            f = 2 * lcs / (len(ht) + len(rt)) if lcs else 0.0  # 2PR/(P+R) with P = lcs/|h|, R = lcs/|r|
            best = max(best, f)
        assert r.score == pytest.approx(best), h
        if h.isascii() and all(x.isascii() for x in refs):  # on ASCII text: rouge-score's default, unchanged
            assert r.score == pytest.approx(default.score_multi(refs, h)["rougeL"].fmeasure)
    for h, refs in NON_LATIN:  # the bug being fixed: the default tokenizer sees no tokens at all
        assert default.score_multi(refs, h)["rougeL"].fmeasure == 0.0
    # 猫がマットの上に座っている。vs 猫はマットの上に座った。: per-character tokens for Han / kana
    # hyp [猫 が マ ッ ト の 上 に 座 っ て い る] (13), ref [猫 は マ ッ ト の 上 に 座 っ た] (11);
    # LCS = 猫 マ ッ ト の 上 に 座 っ = 9 → F = 2·9/(13 + 11) = 0.75
    assert out[9].score == pytest.approx(0.75)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_unicode_tokenizer_equals_rouge_default_on_ascii(text: str) -> None:
    from rouge_score import tokenize

    assert UnicodeTokenizer().tokenize(text) == tokenize.tokenize(text, None)


def test_bleuberi_bleu_by_hand() -> None:
    # hyp [the cat sat on the mat] vs ref [the cat is on the mat], 6 tokens each
    # matches / possible: 1-grams 5/6, 2-grams 3/5 (the-cat, on-the, the-mat), 3-grams 1/4 (on-the-mat), 4-grams 0/3
    # add-one smoothing: 6/7, 4/6, 2/5, 1/4; BP = 1 (equal lengths); BLEU = (6/7·2/3·2/5·1/4)^(1/4) = (2/35)^(1/4)
    b = bleuberi_bleu("the cat sat on the mat", ["the cat is on the mat"])
    assert b["precisions"] == pytest.approx([6 / 7, 4 / 6, 2 / 5, 1 / 4])
    assert b["bleu"] == pytest.approx((2 / 35) ** 0.25)
    # without smoothing the missing 4-gram match makes it 0
    assert bleuberi_bleu("the cat sat on the mat", ["the cat is on the mat"], smooth=False)["bleu"] == 0.0
    # brevity penalty uses the *shortest* reference: hyp 3 tokens, refs of 4 and 6 → r = 4, BP = exp(1 − 4/3)
    b = bleuberi_bleu("a b c", ["a b c d", "a b c d e f"])
    assert b["brevity_penalty"] == pytest.approx(math.exp(1 - 4 / 3)) and b["reference_length"] == 4
    (r,) = BleuberiBLEU()(
        [S("<think>t</think><answer>the cat sat on the mat</answer>", "the cat is on the mat")]
    )
    assert r.score == pytest.approx((2 / 35) ** 0.25)  # the <answer> block is the hypothesis
    (r,) = BleuberiBLEU()([S("<answer> </answer>", "x")])
    assert r.score == 0.0  # BLEUBERI: an empty answer scores 0


def test_bleuberi_arithmetic_matches_sacrebleu_where_they_agree() -> None:
    # Without smoothing, with every n-gram order matched and hyp no longer than every reference (so sacrebleu's
    # closest reference is the shortest one), NMT BLEU and sacrebleu's BLEU are the same number.
    cases = [
        ("the quick brown fox jumps over the lazy dog", ["the quick brown fox jumped over the lazy dog"]),
        (
            "a man is playing a guitar on stage",
            ["a man is playing a guitar on the stage", "a man is playing the guitar on a stage today"],
        ),
        (
            "it rains in London today",
            ["it rains in London today , again", "today it rains in London , sadly"],
        ),
    ]
    metric = sacrebleu.metrics.BLEU(smooth_method="none")
    for h, refs in cases:
        ref = metric.sentence_score(h, refs).score / 100
        assert ref > 0
        assert bleuberi_bleu(h, refs, smooth=False)["bleu"] == pytest.approx(ref), h


def test_bleu_rouge_f1_is_the_harmonic_mean() -> None:
    (r,) = BleuRougeF1()([S("the cat sat on the mat", "the cat is on the mat")])
    b = (2 / 35) ** 0.25
    # ROUGE-L: LCS(the cat on the mat) = 5 of 6 and 6 → F = 5/6
    assert r.components["rouge_l"] == pytest.approx(5 / 6)
    assert r.score == pytest.approx(2 * b * (5 / 6) / (b + 5 / 6))


# ---------------------------------------------------------------------------------------------------------------
# ToolRL
# ---------------------------------------------------------------------------------------------------------------
GOLD = '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}\n</tool_call>'


def _call(*lines: str, think: str = "I need the weather.") -> str:
    return f"<think>{think}</think>\n<tool_call>\n" + "\n".join(lines) + "\n</tool_call>"


def test_toolrl_by_hand() -> None:
    rew = ToolCallReward()
    batch = [
        # exact match: format 1 + correctness 3
        S(_call('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'), GOLD),
        # one wrong value: S = name J 1 + (key J 1 + 1 value) = 3; S_max = 1 + (1 + 2) = 4; 6·3/4 − 3 = 1.5
        S(_call('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "F"}}'), GOLD),
        # wrong tool: name J 0, no same-name call → S = 0 → −3; format still 1
        S(_call('{"name": "get_time", "parameters": {"city": "Paris", "unit": "C"}}'), GOLD),
        # an extra call, one param: names J = 1/(1 + 2 − 1) = 0.5; keys J = 1/(2 + 1 − 1) = 0.5, city right (+1)
        # S = 0.5 + 1.5 = 2 → 6·2/4 − 3 = 0
        S(
            _call(
                '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                '{"name": "get_news", "parameters": {}}',
            ),
            GOLD,
        ),
    ]
    out = rew(batch)
    assert [r.score for r in out] == pytest.approx([4.0, 2.5, -2.0, 1.0])
    assert [r.components["correctness"] for r in out] == pytest.approx([3.0, 1.5, -3.0, 0.0])
    assert out[1].components["s"] == pytest.approx(3.0) and out[1].components["s_max"] == pytest.approx(4.0)


def test_toolrl_format_and_parse_failures() -> None:
    rew = ToolCallReward()
    broken = _call('{"name": "get_weather", "parameters": {"city": "Paris"')  # not JSON
    no_call = "<think>I know it.</think>\n<response>It is sunny.</response>"
    no_newline = '<think>x</think><tool_call>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}</tool_call>'
    a, b, c = rew([S(broken, GOLD), S(no_call, GOLD), S(no_newline, GOLD)])
    # unparseable calls: parse_error, format 0, the paper's minimum correctness
    assert (a.score, a.status, a.components["format"]) == (-3.0, Status.PARSE_ERROR, 0.0)
    # no tool call although one was expected: a wrong answer (−3) and the wrong template (format 0)
    assert (b.score, b.status) == (-3.0, Status.OK)
    # ToolRL's template wants newlines around the call: format 0, correctness 3
    assert (c.score, c.components["format"]) == (3.0, 0.0)
    # a ground truth with a response and no call: think + response template, correctness 0
    (d,) = rew([S(no_call, "<response>It is sunny today.</response>")])
    assert (d.score, d.components) == (1.0, {"format": 1.0, "correctness": 0.0})


def test_toolrl_accepts_arguments_lists_and_dict_references() -> None:
    calls = parse_tool_calls('<tool_call>[{"name": "f", "arguments": "{\\"x\\": 1}"}]</tool_call>')
    assert calls == [{"name": "f", "parameters": {"x": 1}}]
    assert parse_tool_calls("no calls here") is None
    gold = [{"name": "f", "parameters": {"x": 1}}]
    (r,) = ToolCallReward()([S(_call('{"name": "f", "arguments": {"x": 1}}'), gold)])
    assert r.score == 4.0
    (r,) = ToolCallReward()([S(_call('{"name": "f", "parameters": {}}'), [{"name": "f"}])])
    assert r.status == Status.PARSE_ERROR and r.score is None  # a malformed reference


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from("abc"), max_size=5),
    st.lists(st.sampled_from("abc"), max_size=5),
    st.dictionaries(st.sampled_from("xyz"), st.integers(0, 2), max_size=3),
    st.dictionaries(st.sampled_from("xyz"), st.integers(0, 2), max_size=3),
)
def test_toolrl_properties(a: list[str], b: list[str], pa: dict[str, int], pb: dict[str, int]) -> None:
    assert match_score(a, b) == pytest.approx(match_score(b, a)) and 0.0 <= match_score(a, b) <= 1.0
    gold = [{"name": n, "parameters": pa} for n in a] or [{"name": "a", "parameters": pa}]
    pred = [{"name": n, "parameters": pb} for n in b]
    r, _ = tool_call_correctness(gold, pred)
    assert -3.0 <= r <= 3.0
    assert tool_call_correctness(gold, gold)[0] == 3.0


# ---------------------------------------------------------------------------------------------------------------
# Router-R1
# ---------------------------------------------------------------------------------------------------------------
PRICES = {"qwen-7b": 0.2, "llama-70b": 0.6}
GOOD = (
    "<think>I should ask a model.</think>\n<search>qwen-7b: who wrote Hamlet?</search>\n"
    "<information>Shakespeare wrote it.</information>\n<think>Done.</think>\n<answer>William Shakespeare</answer>"
)


def test_router_format_rules() -> None:
    assert router_format(GOOD, PRICES) == (True, "")
    bad = {
        "unknown model": GOOD.replace("qwen-7b:", "gpt-9:"),
        "no think": GOOD.replace("<think>I should ask a model.</think>\n", "").replace(
            "<think>Done.</think>\n", ""
        ),
        "two answers": GOOD + "<answer>x</answer>",
        "search without information": GOOD.replace("<information>Shakespeare wrote it.</information>\n", ""),
        "trailing text": GOOD + " thanks",
        "empty think": GOOD.replace("Done.", "..."),
        "no route colon": GOOD.replace("qwen-7b: who", "qwen-7b who"),
        "nested": GOOD.replace("Done.", "Done <answer>x</answer>"),
    }
    for why, text in bad.items():
        assert router_format(text, PRICES)[0] is False, why
    assert router_format(GOOD.replace("qwen-7b:", "gpt-9:"), None)[0] is True  # no registry: any name


def test_router_reward_hierarchy_by_hand() -> None:
    rew = RouterReward(prices=PRICES)
    a, b, c = rew(
        [S(GOOD, "Shakespeare"), S(GOOD.replace("qwen-7b:", "gpt-9:"), "Shakespeare"), S(GOOD, "Marlowe")]
    )
    # F1("william shakespeare", "shakespeare") with P = 1/2, R = 1 → 2/3; α = 0 → R = F1
    assert a.score == pytest.approx(2 / 3) and a.components["format"] == 0.0
    # format failure gates everything
    assert b.score == -1.0 and b.info["reason"] == "unknown model"
    # a wrong answer gets 0, not a cost bonus
    assert c.score == 0.0


def test_router_cost_term_by_hand() -> None:
    rew = RouterReward(prices=PRICES, cost_weight=0.5)
    cheap = S(
        GOOD, "Shakespeare", metadata={"routes": [{"model": "qwen-7b", "completion_tokens": 1_000_000}]}
    )
    dear = S(
        GOOD, "Shakespeare", metadata={"routes": [{"model": "Llama-70B", "completion_tokens": 1_000_000}]}
    )
    a, b, c = rew([cheap, dear, S(GOOD, "Shakespeare")])
    # raw costs 0.2 and 0.6 USD. Window after a: [√0.2] → one value → cost reward 0.5.
    # R_a = (2/3)(1 − 0.5) + 0.5·0.5 = 1/3 + 1/4 = 7/12
    assert a.components["raw_cost"] == pytest.approx(0.2) and a.components["cost"] == 0.5
    assert a.score == pytest.approx(7 / 12)
    # window [√0.2, √0.6]: 5th / 95th percentiles lie inside the two values, √0.6 is above the 95th → clipped to 1
    # → cost reward 0; R_b = (2/3)(0.5) = 1/3
    assert b.components["cost"] == 0.0 and b.score == pytest.approx(1 / 3)
    # α > 0 but no cost in metadata → not applicable
    assert (c.score, c.status) == (None, Status.NOT_APPLICABLE)
    (d,) = rew([S(GOOD, "x", metadata={"routes": [{"model": "nope", "completion_tokens": 1}]})])
    assert d.status == Status.PARSE_ERROR and d.score is None


def test_rolling_cost_normalizer() -> None:
    n = RollingCostNormalizer(window=3)
    # first value: degenerate window → 0.5; a dearer one → 0 (clipped); the cheapest again → 1
    assert [n(0.04), n(0.16), n(0.04)] == pytest.approx([0.5, 0.0, 1.0])
    assert len(n.buffer) == 3
    n(1.0)
    assert len(n.buffer) == 3  # rolling window
    m = pickle.loads(pickle.dumps(n))
    assert list(m.buffer) == list(n.buffer)


# ---------------------------------------------------------------------------------------------------------------
# CaRR
# ---------------------------------------------------------------------------------------------------------------
CARR_RESPONSE = (
    "The ceiling of the Sistine Chapel [1](https://a.org/sistine), where popes are elected "
    "[2](https://b.org/conclave), was painted by Michelangelo. Leonardo [3](https://c.org/leo) was born in "
    "Florence [4](https://not-visited.org/x).\n\n## References\n[1](https://a.org/sistine)"
)
CARR_META = {
    "question": "Who painted the ceiling of the chapel where popes are elected?",
    "rubrics": [
        "<E0> painted the ceiling of <E1>",
        "<E1> is the chapel where popes are elected",
        "<E2> was born in Florence",
    ],
    "entities": {"E1": ["Sistine Chapel"], "E2": "Leonardo"},
    "evidence": {
        "https://a.org/sistine": "Michelangelo painted the ceiling of the Sistine Chapel between 1508 and 1512.",
        "https://b.org/conclave": "The Sistine Chapel is the chapel where popes are elected in a conclave.",
        "https://c.org/leo": "Leonardo da Vinci was born in Vinci, near Florence.",
    },
}


def test_cited_urls() -> None:
    text = "a [1](https://x.org/a) b [2](view-source:https://y.org) c [3](https://r.jina.ai/https://x.org/a) [x](y)"
    # de-duplicated after removing the reader prefix; "[x](y)" is not a numbered citation
    assert cited_urls(text) == ["https://x.org/a", "https://y.org"]
    assert cited_urls(text, max_citations=1) == ["https://x.org/a"]


def test_carr_by_hand() -> None:
    rew = CitationRubricReward(rubric_weight=0.3)
    (r,) = rew([S(CARR_RESPONSE, "Michelangelo", metadata=CARR_META)])
    # entities: E0 = Michelangelo (the reference), E1 = Sistine Chapel, E2 = Leonardo → all identified
    # cited: 4 URLs, 3 in the evidence → valid 3/4
    # support (token recall ≥ 0.6 against the cited evidence):
    #   "Michelangelo painted the ceiling of Sistine Chapel" → 6/6; "Sistine Chapel is the chapel where popes are
    #   elected" → 8/8; "Leonardo was born in Florence" → 5/5: all supported
    # BFS from E0: rubric 0 (E0, E1) → E1 → rubric 1; rubric 2 (E2 only) is not connected → R_rubric = 2/3
    # outcome: "michelangelo" occurs in the report → 1;  R = 0.7·1 + 0.3·(2/3) = 0.9
    assert r.score == pytest.approx(0.9)
    assert r.components == pytest.approx(
        {
            "outcome": 1.0,
            "rubric": 2 / 3,
            "citations": 4.0,
            "valid_citations": 0.75,
            "entities_identified": 1.0,
            "supported": 3.0,
            "connected": 2.0,
        }
    )
    assert [row["connected"] for row in r.info["rubric_scores"]] == [True, True, False]


def test_carr_needs_cited_evidence_and_connectivity() -> None:
    rew = CitationRubricReward(rubric_weight=0.3)
    uncited = S(CARR_RESPONSE.replace("[2](https://b.org/conclave)", ""), "Michelangelo", metadata=CARR_META)
    bare = S("Michelangelo painted it.", "Michelangelo", metadata=CARR_META)
    wrong = S(CARR_RESPONSE.replace("Michelangelo", "Raphael"), "Michelangelo", metadata=CARR_META)
    a, b, c = rew([uncited, bare, wrong])
    # rubric 1 is true but its evidence is no longer cited → only rubric 0 connects: R = 0.7 + 0.3·(1/3) = 0.8
    assert a.score == pytest.approx(0.8)
    # no citations at all → rubric reward 0 → R = 0.7
    assert b.score == pytest.approx(0.7) and b.components["rubric"] == 0.0
    # wrong answer: E0 is not identified, so rubric 0 fails and nothing connects to E0 → 0
    assert c.score == 0.0
    # rubric only
    (d,) = CitationRubricReward(rubric_weight=1.0)([S(CARR_RESPONSE, None, metadata=CARR_META)])
    # no reference is needed when the outcome is not used, but then E0 has no name to find: nothing connects
    assert (d.score, d.status) == (0.0, Status.OK)


def test_carr_hooks_and_their_failures() -> None:
    meta = dict(CARR_META)

    def finder(question: str, rubrics: list[str], response: str) -> dict[str, str | None]:
        return {"E0": "Michelangelo", "E1": "Sistine Chapel", "E2": None}

    def never(statements: list[str], evidence: str) -> list[bool]:
        return [False] * len(statements)

    def broken(statements: list[str], evidence: str) -> list[bool]:
        raise RuntimeError("judge down")

    def short(statements: list[str], evidence: str) -> list[bool]:
        return [True]

    s = S(CARR_RESPONSE, "Michelangelo", metadata=meta)
    (a,) = CitationRubricReward(entity_finder=finder)([s])
    # E2 unidentified → rubric 2 fails; rubrics 0 and 1 connect → still 2/3 → 0.9
    assert a.score == pytest.approx(0.9) and a.components["entities_identified"] == pytest.approx(2 / 3)
    (b,) = CitationRubricReward(support_judge=never)([s])
    assert b.score == pytest.approx(0.7)
    for judge in (broken, short):
        (c,) = CitationRubricReward(support_judge=judge)([s])
        assert (c.score, c.status) == (None, Status.JUDGE_ERROR)
    (d,) = CitationRubricReward(entity_finder=lambda q, r, t: {"E0": "x"})([s])
    assert d.status == Status.JUDGE_ERROR  # keys do not match the rubric entities
    bad_entities = {**meta, "entities": {"E1": {"not": "a name"}}}
    (f,) = CitationRubricReward()([S(CARR_RESPONSE, "Michelangelo", metadata=bad_entities)])
    assert (f.score, f.status) == (None, Status.PARSE_ERROR)  # broken data, not a failing judge
    no_evidence = {k: v for k, v in meta.items() if k != "evidence"}
    (e,) = CitationRubricReward()([S(CARR_RESPONSE, "Michelangelo", metadata=no_evidence)])
    assert (e.score, e.status) == (None, Status.NOT_APPLICABLE)


# ---------------------------------------------------------------------------------------------------------------
# nuggets, GraphRAG-R1 shapes, regularised relevance
# ---------------------------------------------------------------------------------------------------------------
NUGGETS = [
    "Paris is the capital of France",
    "Paris has about 2 million inhabitants",
    "The Seine flows through Paris",
]


def test_nugget_coverage_by_hand() -> None:
    answer = "<answer>Paris, the capital of France, lies on the Seine.</answer>"
    (r,) = NuggetCoverage()([S(answer, NUGGETS)])
    # answer tokens: paris capital of france lies on seine
    # nugget 1 [paris is capital of france]: 4/5 = 0.8 → support; nugget 2: 1/6 → not_support;
    # nugget 3 [seine flows through paris]: 2/4 = 0.5 → partial_support
    # R = (1 + 0 + 0.5)/3 = 0.5
    assert r.info["labels"] == ["support", "not_support", "partial_support"]
    assert r.score == pytest.approx(0.5)
    assert r.components == pytest.approx(
        {"coverage": 0.5, "support": 1 / 3, "partial_support": 1 / 3, "not_support": 1 / 3}
    )
    assert LexicalNuggetMatcher()("", ["x"]) == ["not_support"]


def test_nugget_matcher_hook_failures() -> None:
    def wrong_count(answer: str, nuggets: list[str]) -> list[str]:
        return ["support"]

    def bad_label(answer: str, nuggets: list[str]) -> list[str]:
        return ["yes"] * len(nuggets)

    for m in (wrong_count, bad_label):
        (r,) = NuggetCoverage(matcher=m)([S("x", NUGGETS)])
        assert (r.score, r.status) == (None, Status.JUDGE_ERROR)
    (r,) = NuggetCoverage(matcher=lambda a, n: ["support"] * len(n))([S("x", NUGGETS)])
    assert r.score == 1.0


def test_graphrag_shapes_by_hand() -> None:
    search = "<search>q</search>"
    shaping = RetrievalShaping(decay=0.5)
    out = shaping([S(search * n, partial=True) for n in range(4)])
    # R(n) = 1 − 0.5^n: 0, 0.5, 0.75, 0.875 (each call adds half the previous increment)
    assert [r.score for r in out] == pytest.approx([0.0, 0.5, 0.75, 0.875])
    assert RetrievalCount()(S("no tags", metadata={"num_retrievals": 5})) == 5
    caf = CostAwareF1(cost_weight=0.1, free_calls=1)
    a, b = caf(
        [S(search * 3 + "<answer>Paris</answer>", "Paris"), S(search + "<answer>Paris</answer>", "Paris")]
    )
    # F1 1; 3 calls, 1 free → exp(−0.1·2) = exp(−0.2)
    assert a.score == pytest.approx(math.exp(-0.2)) and b.score == 1.0


def test_regularized_relevance_by_hand() -> None:
    rew = RegularizedRelevance()
    a, b = rew(
        [
            S("bake bread bake bread", prompt="bake bread"),
            S("bake bread bake bread bake", prompt="bake bread"),
        ]
    )
    # a: 4 tokens → LI 0.04; tf {bake 2, bread 2} vs {bake 1, bread 1} → cosine 1; trigrams 2 distinct / 2 → RP 1
    assert a.score == pytest.approx(0.04)
    # b: 5 tokens → LI 0.05; tf {bake 3, bread 2}: cosine 5/(√2·√13); trigrams 2 distinct / 3 → RP 2/3
    assert b.score == pytest.approx(0.05 * 5 / (math.sqrt(2) * math.sqrt(13)) * 2 / 3)
    assert b.components["repetition"] == pytest.approx(2 / 3)
    # branching: CONSTRAINED queries are scored by relevance to the reference, mapped to [0, 512/100]
    br = RegularizedRelevance(reward_branching=True)
    c, d = br(
        [
            S("bake bread", "bake bread", metadata={"qtype": "CONSTRAINED"}),
            S("x", metadata={"qtype": "CONSTRAINED"}),
        ]
    )
    assert c.score == pytest.approx(5.12)
    assert (d.score, d.status) == (None, Status.NOT_APPLICABLE)  # a branched sample needs its reference

    def down(queries: list[str], responses: list[str]) -> list[float]:
        raise ConnectionError("retriever down")

    out = RegularizedRelevance(relevance=down)([S("a"), S("b")])
    assert [(r.score, r.status) for r in out] == [(None, Status.JUDGE_ERROR)] * 2
    assert TermCosine()(["x"], [""]) == [0.0]
