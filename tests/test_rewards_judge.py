"""LLM-as-judge rewards (treeward.rewards.judge) against real servers on loopback.

* The judge modes run against llama.cpp's native ``llama-server`` serving a GGUF conversion of the shipped tiny
  policy (built and cached by ``scripts/llama_server.sh``; these tests skip, saying so, when it is not built).
  The tiny model is an arithmetic solver, not a judge, so the templates here are crafted so that its real greedy
  output parses (a question whose continuation ends in ``Answer: N``) or, on purpose, does not (the parse-error
  paths). Its answers are checked against transformers' greedy output for the same prompt, an independent
  implementation.
* Transport failures use small real servers started here: a socket that accepts and never answers (timeouts), an
  ``http.server`` that answers 500 (retries), a slow one that records how many requests overlap (concurrency and
  rate limits).
* Parsing, cache keys, shuffles and request bodies are pure functions, tested directly (with Hypothesis for the
  invariants).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treeward.rewards.base import Reward, Sample, Status, ascore
from treeward.rewards.judge import (
    CritiqueJudge,
    Decoding,
    JudgeClient,
    JudgeConfigError,
    ListwiseJudge,
    LlamaServer,
    PairwiseJudge,
    PointwiseJudge,
    PrincipleJudge,
    TokenLogprob,
    VerdictParseError,
    cache_key,
    find_llama_server,
    is_deterministic,
    model_hash,
    parse_logprobs,
    parse_pairwise,
    parse_principle_json,
    parse_ranking,
    parse_score,
    rank_scores,
    shuffle_order,
)
from treeward.tasks.arithmetic import generate_problems

BUILD = find_llama_server()
needs_server = pytest.mark.skipif(
    BUILD is None,
    reason="llama-server is not built: run scripts/llama_server.sh (it caches the server and the GGUF of the "
    "shipped policy under ${TREEWARD_CACHE:-~/.cache/treeward}/llama-server)",
)
MODEL_DIR = Path(__file__).resolve().parent.parent / "src" / "treeward" / "assets" / "tiny-policy"

# One-step problems in the task's format; the shipped model solves each of them greedily (checked against
# transformers below). Hand-derived answers: 50-3 = 47, 20+1 = 21, 12*2 = 24, 9-4 = 5.
PROBLEMS = {
    "Q: Ned has 50 shells. Ned gives away 3. How many shells does Ned have?\n": 47,
    "Q: Ann has 20 cards. Ann gets 1 more. How many cards does Ann have?\n": 21,
    "Q: Bob has 12 coins. Bob ends up with twice as many. How many coins does Bob have?\n": 24,
    "Q: Eve has 9 beads. Eve sells 4. How many beads does Eve have?\n": 5,
}
ANSWER = r"Answer: (?P<score>\d+)"


# ---------------------------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    assert BUILD is not None
    with LlamaServer(BUILD) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf_greedy() -> Any:
    """Greedy continuation by transformers, the reference the server must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()

    def greedy(prompt: str, max_new_tokens: int = 64) -> str:
        ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt)]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    return greedy


class _Recorder(BaseHTTPRequestHandler):
    """Answers every POST with ``server.status`` after ``server.delay_s``; records hits, start times and the
    largest number of requests in progress at once."""

    server: _RecordingServer

    def do_POST(self) -> None:
        srv = self.server
        length = int(self.headers.get("Content-Length", 0))
        srv.bodies.append(json.loads(self.rfile.read(length)))
        with srv.lock:
            srv.starts.append(time.monotonic())
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        time.sleep(srv.delay_s)
        with srv.lock:
            srv.in_flight -= 1
        if srv.status == 200 and srv.garbage:
            body = b"<html>not json</html>"
        elif srv.status == 200 and self.path.endswith("/chat/completions"):
            msg = {"role": "assistant", "content": "Rating: [[7]]"}
            body = json.dumps({"choices": [{"message": msg, "finish_reason": "stop"}]}).encode()
        elif srv.status == 200:
            body = json.dumps({"choices": [{"text": "Rating: [[7]]", "finish_reason": "stop"}]}).encode()
        else:
            body = b'{"error": "boom"}'
        self.send_response(srv.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int, delay_s: float, garbage: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.status, self.delay_s, self.garbage = status, delay_s, garbage
        self.lock = threading.Lock()
        self.starts: list[float] = []
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture
def recording_server(request: pytest.FixtureRequest) -> Iterator[_RecordingServer]:
    srv = _RecordingServer(*request.param)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback socket that accepts connections and reads requests but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    stop.set()
    t.join()
    for c in held:
        c.close()
    sock.close()


def pointwise(client: JudgeClient, **kw: Any) -> PointwiseJudge:
    """A 'judge' whose template is the question itself: the model's greedy solution ends in ``Answer: N``."""
    kw.setdefault("decoding", Decoding(max_tokens=48))
    return PointwiseJudge(client, template="{prompt}", pattern=ANSWER, score_range=None, **kw)


def samples() -> list[Sample]:
    return [Sample(prompt=p, response="(ignored by this template)") for p in PROBLEMS]


# ---------------------------------------------------------------------------------------------------------------
# the real llama-server
# ---------------------------------------------------------------------------------------------------------------
@needs_server
def test_pointwise_scores_the_real_greedy_verdict(server: LlamaServer, hf_greedy: Any) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    results = pointwise(client)(samples())
    for (prompt, answer), r in zip(PROBLEMS.items(), results, strict=True):
        # the server's greedy text is transformers' greedy text, and its "Answer: N" is the hand-derived answer
        assert r.status is Status.OK, r.info
        assert r.info["raw"] == hf_greedy(prompt, 48)
        assert r.score == answer
        assert r.components == {"rating": float(answer)}
        assert r.info["cache_hit"] is False and r.info["http_requests"] == 1
    assert client.stats.http_requests == 4


@needs_server
def test_cache_second_run_makes_no_http_request(server: LlamaServer, tmp_path: Path) -> None:
    db = tmp_path / "judge.sqlite"
    client = JudgeClient(server.base_url, model="tiny", cache_path=db)
    judge = pointwise(client)
    first = judge(samples())
    assert client.stats.as_dict() | {} == {
        "http_requests": 4,
        "cache_hits": 0,
        "cache_misses": 4,
        "retries": 0,
        "timeouts": 0,
        "errors": 0,
    }
    second = judge(samples())
    # 4 more lookups, all hits: the HTTP count stays at 4
    assert client.stats.http_requests == 4 and client.stats.cache_hits == 4
    assert [r.score for r in second] == [r.score for r in first]
    assert all(r.info["cache_hit"] and r.info["http_requests"] == 0 for r in second)
    # the key ignores the base URL: another client reaching the same model by another host name hits too
    other = JudgeClient(server.base_url.replace("127.0.0.1", "localhost"), model="tiny", cache_path=db)
    third = pointwise(other)(samples())
    assert other.stats.http_requests == 0 and other.stats.cache_hits == 4
    assert [r.score for r in third] == [r.score for r in first]
    # one row per distinct request, holding the body that was sent
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT model, endpoint, body FROM responses").fetchall()
    assert len(rows) == 4 and {(m, e) for m, e, _ in rows} == {("tiny", "completions")}
    assert {json.loads(b)["prompt"] for _, _, b in rows} == set(PROBLEMS)


@needs_server
def test_sampled_requests_are_cached_only_with_a_seed(server: LlamaServer, tmp_path: Path) -> None:
    client = JudgeClient(server.base_url, model="tiny", cache_path=tmp_path / "c.sqlite")
    unseeded = pointwise(client, decoding=Decoding(max_tokens=48, temperature=1.0))
    unseeded(samples()[:2])
    unseeded(samples()[:2])
    # temperature 1 without a seed is not deterministic: 2 + 2 requests, nothing looked up
    assert client.stats.http_requests == 4 and client.stats.cache_hits == 0 and client.stats.cache_misses == 0
    seeded = pointwise(client, decoding=Decoding(max_tokens=48, temperature=1.0, seed=7))
    a = seeded(samples()[:2])
    b = seeded(samples()[:2])
    # seeded: 2 new requests, then 2 hits with the same texts
    assert client.stats.http_requests == 6 and client.stats.cache_hits == 2
    assert [r.info["raw"] for r in a] == [r.info["raw"] for r in b]


@needs_server
def test_identical_requests_in_one_batch_are_sent_once(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")  # no cache file: in-flight deduplication only
    prompt = next(iter(PROBLEMS))
    results = pointwise(client)([Sample(prompt, "x")] * 5)
    # five equal requests → one HTTP request, four answered from it
    assert client.stats.http_requests == 1 and client.stats.cache_hits == 4
    assert {r.score for r in results} == {47.0}


@needs_server
def test_concurrent_requests_match_serial_ones(server: LlamaServer) -> None:
    distinct = [Sample(p.prompt, "x") for p in generate_problems(12, [1, 2, 3], seed=5)]
    serial = pointwise(JudgeClient(server.base_url, model="tiny", max_concurrency=1))(distinct)
    client = JudgeClient(server.base_url, model="tiny", max_concurrency=8)
    parallel = pointwise(client)(distinct)
    assert client.stats.http_requests == 12
    # continuous batching on the server does not change greedy text: same raw verdicts, same scores and statuses
    assert [r.info["raw"] for r in parallel] == [r.info["raw"] for r in serial]
    assert [(r.score, r.status) for r in parallel] == [(r.score, r.status) for r in serial]


@needs_server
def test_logprobs_from_both_endpoints(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    prompt = next(iter(PROBLEMS))

    async def both() -> list[Any]:
        async with client.session() as s:
            return [
                await s.generate(Decoding(max_tokens=12, logprobs=2), prompt),
                await s.generate(Decoding(endpoint="chat", max_tokens=12, logprobs=2), prompt),
            ]

    for c in asyncio.run(both()):
        assert c.logprobs is not None and len(c.logprobs) >= 1
        # the chosen tokens spell the text; each has two alternatives; log-probs are ≤ 0
        assert "".join(t.token for t in c.logprobs) == c.text
        assert all(len(t.top) == 2 and t.logprob <= 0.0 for t in c.logprobs)
        # greedy: the chosen token is the most likely alternative
        assert all(t.top[0][0] == t.token for t in c.logprobs)
    completions, chat = asyncio.run(both())
    assert completions.text.startswith("Step 1: 50-3=47")
    assert chat.finish_reason in {"stop", "length"}


@needs_server
def test_critique_then_score(server: LlamaServer, hf_greedy: Any) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    # stage 1 writes the steps and stops before "\nAnswer:"; stage 2 continues after "\nAnswer:" with the number
    judge = CritiqueJudge(
        client,
        template="{prompt}",
        score_template="\nAnswer:",
        pattern=r"^\s*(?P<score>\d+)",
        score_range=(0, 999),
        decoding=Decoding(max_tokens=48, stop=("\nAnswer:",)),
    )
    results = judge(samples())
    for (prompt, answer), r in zip(PROBLEMS.items(), results, strict=True):
        assert r.status is Status.OK and r.score == answer
        # the two requests together reproduce the one-shot greedy solution: critique + "\nAnswer:" + score text
        assert r.info["critique"] + "\nAnswer:" + r.info["raw"] == hf_greedy(prompt, 48)
        assert r.info["http_requests"] == 2
    # a score outside the range is a parse error, not a clipped number: 47 > 10
    strict = CritiqueJudge(
        client,
        template="{prompt}",
        score_template="\nAnswer:",
        pattern=r"^\s*(?P<score>\d+)",
        score_range=(1, 10),
        decoding=Decoding(max_tokens=48, stop=("\nAnswer:",)),
    )
    r = strict(samples()[:1])[0]
    assert r.status is Status.PARSE_ERROR and r.score is None and "outside the range" in r.info["reason"]


@needs_server
def test_pairwise_swap_cancels_a_position_biased_judge(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    # this "judge" ignores both answers and always says "Answer: 1" (3-2 = 1), i.e. "the first one shown wins"
    kw: dict[str, Any] = {
        "template": "Q: Ann has 3 cards. Ann loses 2. How many cards does Ann have?\n",
        "pattern": r"Answer: (?P<verdict>\d+)",
        "labels": ("1", "2", None),
        "decoding": Decoding(max_tokens=32),
    }
    s = Sample("q", "my answer", reference="the baseline")
    once = PairwiseJudge(client, swap=False, **kw)([s])[0]
    # shown first, "wins": 1.0
    assert once.score == 1.0 and once.components == {"win_ab": 1.0}
    swapped = PairwiseJudge(client, swap=True, **kw)([s])[0]
    # first in "ab" (win 1.0), second in "ba" (loss 0.0): mean 0.5 — the position bias cancels
    assert swapped.score == 0.5 and swapped.components == {"win_ab": 1.0, "win_ba": 0.0}
    assert swapped.info["verdicts"] == {"ab": "A", "ba": "A"}
    # no reference to compare against: not applicable
    assert PairwiseJudge(client, **kw)([Sample("q", "a")])[0].status is Status.NOT_APPLICABLE


@needs_server
def test_listwise_shuffle_is_recorded_and_reproducible(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    # the model answers "Answer: 21" (20+1): read as the ranking "2 > 1" of the two positions shown
    kw: dict[str, Any] = {
        "template": "Q: Ann has 20 cards. Ann gets 1 more. How many cards does Ann have?\n",
        "pattern": r"Answer: (?P<ranking>\d\d)\b",
        "separator": r"(?<=\d)(?=\d)",
        "decoding": Decoding(max_tokens=32),
    }
    group = [Sample("q", "first", group_id="g"), Sample("q", "second", group_id="g")]
    seen = set()
    for seed in range(6):
        judge = ListwiseJudge(client, shuffle_seed=seed, **kw)
        res = judge(group)
        order = res[0].info["shuffle"]
        seen.add(tuple(order))
        assert tuple(order) == judge.order(group) == shuffle_order(2, seed=seed, key=json_key(group))
        # position 2 is ranked best: the sample shown there (order[1]) scores 1.0, the other 0.0
        best = order[1]
        assert [r.score for r in res] == [1.0 if k == best else 0.0 for k in range(2)]
        assert res[best].info["position"] == 2 and res[best].components == {"rank": 1.0}
        assert all(r.info["ranking"] == [2, 1] for r in res)
        # the same seed gives the same shuffle and scores again
        assert [r.score for r in judge(group)] == [r.score for r in res]
    assert seen == {(0, 1), (1, 0)}  # both orders occur over the seeds
    # a group of one cannot be ranked
    assert ListwiseJudge(client, **kw)([Sample("q", "alone")])[0].status is Status.NOT_APPLICABLE


def json_key(group: list[Sample]) -> str:
    """The group key ListwiseJudge.order shuffles by (its documented content: prompts and responses)."""
    return json.dumps([[s.prompt, s.response] for s in group], sort_keys=True, separators=(",", ":"))


@needs_server
def test_real_unparseable_output_is_a_parse_error_with_the_raw_text(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    # with the candidates written above the question the model answers "Answer: 22": not an order of 1..2
    judge = ListwiseJudge(
        client,
        template="{candidates}Q: Ann has 20 cards. Ann gets 1 more. How many cards does Ann have?\n",
        candidate_template="{label}: {response}\n",
        pattern=r"Answer: (?P<ranking>\d\d)\b",
        separator=r"(?<=\d)(?=\d)",
        decoding=Decoding(max_tokens=32),
    )
    res = judge([Sample("q", "Answer: 5", group_id="g"), Sample("q", "Answer: 7", group_id="g")])
    for r in res:
        assert r.status is Status.PARSE_ERROR and r.score is None
        assert "not an order of the labels 1..2" in r.info["reason"]
        assert re.search(r"Answer: \d\d", r.info["raw"])
        assert sorted(r.info["shuffle"]) == [0, 1]  # the shuffle is recorded on failures too
    assert sorted(r.info["position"] for r in res) == [1, 2]


@needs_server
def test_unparseable_policies_retry_and_default(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    # the model never writes "[[n]]": every attempt is unparseable
    prompt = next(iter(PROBLEMS))
    kw: dict[str, Any] = {"template": "{prompt}", "decoding": Decoding(max_tokens=24)}
    err = PointwiseJudge(client, **kw)([Sample(prompt, "x")])[0]
    assert err.status is Status.PARSE_ERROR and err.score is None
    assert err.info["raw"].startswith("Step 1:") and err.info["http_requests"] == 1
    retry = PointwiseJudge(client, on_unparseable="retry", unparseable_retries=2, **kw)(
        [Sample(prompt, "x")]
    )[0]
    # 1 greedy attempt + 2 sampled retries (seeds 1 and 2), then the same parse error; the earlier raw texts kept
    assert retry.status is Status.PARSE_ERROR and retry.score is None
    assert retry.info["http_requests"] == 1 + 2 and len(retry.info["unparseable_raw"]) == 2
    default = PointwiseJudge(client, on_unparseable=0.25, **kw)([Sample(prompt, "x")])[0]
    # the default score is given, but the status still says the verdict failed
    assert default.score == 0.25 and default.status is Status.PARSE_ERROR and default.info["default_score"]


@needs_server
def test_principle_judge_on_the_real_server(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    group = [Sample("q", "a", group_id="g"), Sample("q", "b", group_id="g")]
    # the default RewardAnything prompt does not fit the tiny model's 256-token context: HTTP 400, not retried
    big = PrincipleJudge(client, principle="be brief", decoding=Decoding(max_tokens=16))
    res = big(group)
    assert all(r.status is Status.JUDGE_ERROR and "exceed" in r.info["reason"] for r in res)
    assert client.stats.http_requests == 1 and client.stats.retries == 0  # one request for the whole group
    # a short template fits; the tiny model writes no JSON verdict: parse error, shuffle and principle recorded
    short = PrincipleJudge(client, template="{request}", decoding=Decoding(max_tokens=16))
    res = short([Sample("q", "a", group_id="g", metadata={"principle": "be brief"}), group[1]])
    assert res[1].status is Status.NOT_APPLICABLE  # no principle on that sample
    assert res[0].status is Status.PARSE_ERROR and res[0].info["principle"] == "be brief"
    assert res[0].info["label"] == "model-1" and "JSON" in res[0].info["reason"]


@needs_server
def test_judges_pickle_and_score_after_unpickling(server: LlamaServer) -> None:
    client = JudgeClient(server.base_url, model="tiny")
    judge = pointwise(client)
    judge(samples()[:1])
    copy = pickle.loads(pickle.dumps(judge))
    # the copy carries the configuration, fresh counters, and works on its own
    assert copy.client.stats.http_requests == 0
    assert copy(samples()[:1])[0].score == 47.0
    assert isinstance(copy, Reward) and copy.name == "judge_pointwise"


@needs_server
def test_ascore_inside_a_running_loop(server: LlamaServer) -> None:
    judge = pointwise(JudgeClient(server.base_url, model="tiny"))

    async def main() -> tuple[list[Any], list[Any]]:
        # the async entry point, and the sync one called from inside a running loop (run_sync's helper thread)
        return await ascore(judge, samples()[:2]), judge(samples()[:2])

    a, b = asyncio.run(main())
    assert [r.score for r in a] == [r.score for r in b] == [47.0, 21.0]


# ---------------------------------------------------------------------------------------------------------------
# transport failures, against small real servers
# ---------------------------------------------------------------------------------------------------------------
def test_timeout_is_a_timeout_status(silent_server: str) -> None:
    client = JudgeClient(silent_server, model="m", timeout_s=0.3, max_retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    r = PointwiseJudge(client)([Sample("q", "a")])[0]
    elapsed = time.monotonic() - t0
    # two attempts of 0.3 s each, both unanswered
    assert r.status is Status.TIMEOUT and r.score is None
    assert r.info["attempts"] == 2 and "0.3 s" in r.info["reason"]
    assert client.stats.timeouts == 2 and client.stats.retries == 1
    assert 0.6 <= elapsed < 0.6 + 2.0


@pytest.mark.parametrize("recording_server", [(500, 0.0)], indirect=True)
def test_server_errors_are_retried_then_judge_error(recording_server: _RecordingServer) -> None:
    client = JudgeClient(recording_server.base_url, model="m", max_retries=2, backoff_s=0.01)
    r = PointwiseJudge(client)([Sample("q", "a")])[0]
    # 1 + 2 retries = 3 requests reached the server, then the sample is a judge error naming the status
    assert len(recording_server.starts) == 3
    assert r.status is Status.JUDGE_ERROR and r.score is None and "HTTP 500" in r.info["reason"]
    assert client.stats.as_dict() == {
        "http_requests": 3,
        "cache_hits": 0,
        "cache_misses": 1,
        "retries": 2,
        "timeouts": 0,
        "errors": 1,
    }


@pytest.mark.parametrize("recording_server", [(404, 0.0)], indirect=True)
def test_client_errors_are_not_retried(recording_server: _RecordingServer) -> None:
    client = JudgeClient(recording_server.base_url, model="m", max_retries=3, backoff_s=0.01)
    r = PointwiseJudge(client)([Sample("q", "a")])[0]
    assert (
        len(recording_server.starts) == 1
        and r.status is Status.JUDGE_ERROR
        and "HTTP 404" in r.info["reason"]
    )


def test_refused_connection_is_a_judge_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = JudgeClient(f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01)
    r = PointwiseJudge(client)([Sample("q", "a")])[0]
    assert r.status is Status.JUDGE_ERROR and "ConnectError" in r.info["reason"] and r.info["attempts"] == 2


@pytest.mark.parametrize("recording_server", [(200, 0.15)], indirect=True)
def test_concurrency_limit_is_respected(recording_server: _RecordingServer) -> None:
    client = JudgeClient(recording_server.base_url, model="m", max_concurrency=3)
    judge = PointwiseJudge(client)

    async def two_batches() -> list[list[Any]]:
        # two batches at once on one event loop (two sessions): the limit is shared, not per batch
        return list(
            await asyncio.gather(*(judge.ascore([Sample(f"{k}{i}", "a") for i in range(6)]) for k in "xy"))
        )

    results = asyncio.run(two_batches())
    # the stub answers "Rating: [[7]]"; at most 3 of the 12 requests were ever in progress together, and 3 were
    assert [r.score for batch in results for r in batch] == [7.0] * 12
    assert recording_server.max_in_flight == 3
    # the judge sent what Decoding says: greedy, the default max_tokens, the model name
    assert {(b["model"], b["temperature"], b["max_tokens"]) for b in recording_server.bodies} == {
        ("m", 0.0, 256)
    }


@pytest.mark.parametrize("recording_server", [(200, 0.0)], indirect=True)
def test_rate_limit_spaces_request_starts(recording_server: _RecordingServer) -> None:
    client = JudgeClient(recording_server.base_url, model="m", requests_per_s=10.0)
    t0 = time.monotonic()
    PointwiseJudge(client)([Sample(f"q{i}", "a") for i in range(5)])
    elapsed = time.monotonic() - t0
    starts = sorted(recording_server.starts)
    # 5 requests at 10/s start at 0, 0.1, ..., 0.4 s: the batch takes ≥ 0.4 s, and the server sees the first and
    # last start ≥ 0.4 s apart (slack for thread scheduling on a loaded machine; without the limit: ~10 ms)
    assert elapsed >= 0.4
    assert starts[-1] - starts[0] >= 0.4 - 0.08
    # the same batch with no rate limit is not spaced
    recording_server.starts.clear()
    PointwiseJudge(JudgeClient(recording_server.base_url, model="m"))(
        [Sample(f"r{i}", "a") for i in range(5)]
    )
    assert max(recording_server.starts) - min(recording_server.starts) < 0.3


@pytest.mark.parametrize("recording_server", [(200, 0.0, True)], indirect=True)
def test_a_reply_that_is_not_json_is_a_judge_error(recording_server: _RecordingServer) -> None:
    client = JudgeClient(recording_server.base_url, model="m", max_retries=2, backoff_s=0.01)
    r = PointwiseJudge(client)([Sample("q", "a")])[0]
    # a 200 with an HTML body is the server's bug, not a transient one: one request, no retry
    assert (
        r.status is Status.JUDGE_ERROR
        and "not JSON" in r.info["reason"]
        and len(recording_server.starts) == 1
    )


@pytest.mark.parametrize("recording_server", [(200, 0.0)], indirect=True)
def test_critique_judge_on_the_chat_endpoint(recording_server: _RecordingServer) -> None:
    client = JudgeClient(recording_server.base_url, model="m")
    judge = CritiqueJudge(
        client,
        pattern=r"\[\[(?P<score>\d+)\]\]",
        score_template="Now the rating only.",
        decoding=Decoding(endpoint="chat", system="You are a judge."),
    )
    r = judge([Sample("What is 2+2?", "5")])[0]
    # the stub answers "Rating: [[7]]" to both requests: critique, then the score 7
    assert r.status is Status.OK and r.score == 7.0 and r.info["critique"] == "Rating: [[7]]"
    first, second = recording_server.bodies
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert "What is 2+2?" in first["messages"][1]["content"] and "5" in first["messages"][1]["content"]
    # the score request continues the conversation: the critique as the assistant's turn, then the score question
    assert second["messages"][1:] == [
        first["messages"][1],
        {"role": "assistant", "content": "Rating: [[7]]"},
        {"role": "user", "content": "Now the rating only."},
    ]
    assert second["max_tokens"] == 8 and first["max_tokens"] == 256


def test_find_llama_server_reads_the_manifest_and_rejects_stale_builds(tmp_path: Path) -> None:
    binary, gguf = tmp_path / "llama-server", tmp_path / "m.gguf"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    gguf.write_bytes(b"GGUF")
    h = model_hash(MODEL_DIR)
    manifest = tmp_path / f"manifest-{h[:16]}.json"
    entry = {"binary": str(binary), "gguf": str(gguf), "commit": "c" * 40, "model_hash": h}
    manifest.write_text(json.dumps(entry))
    found = find_llama_server(MODEL_DIR, cache_dir=tmp_path)
    assert found is not None and found.binary == binary and found.gguf == gguf and found.commit == "c" * 40
    # a manifest whose full hash differs (the model changed), or a missing GGUF, means "not built"
    manifest.write_text(json.dumps({**entry, "model_hash": h[:16] + "0" * 48}))
    assert find_llama_server(MODEL_DIR, cache_dir=tmp_path) is None
    manifest.write_text(json.dumps(entry))
    gguf.unlink()
    assert find_llama_server(MODEL_DIR, cache_dir=tmp_path) is None
    assert find_llama_server(MODEL_DIR, cache_dir=tmp_path / "empty") is None


# ---------------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------------
def test_parse_logprobs_chat_shape() -> None:
    # the shape llama-server sends on both endpoints (from shared/reference/openai-server.md)
    obj = {
        "content": [
            {
                "id": 261,
                "token": "Step",
                "bytes": [83, 116, 101, 112],
                "logprob": -6.26e-05,
                "top_logprobs": [
                    {"id": 261, "token": "Step", "logprob": -6.26e-05},
                    {"id": 13, "token": "+", "logprob": -11.0535},
                ],
            }
        ]
    }
    assert parse_logprobs(obj) == (TokenLogprob("Step", -6.26e-05, (("Step", -6.26e-05), ("+", -11.0535))),)


def test_parse_logprobs_legacy_shape() -> None:
    # OpenAI's legacy completions shape (llama-cpp-python's server)
    obj = {
        "text_offset": [0, 4],
        "token_logprobs": [-6.34e-05, -0.5],
        "tokens": ["Step", " 1"],
        "top_logprobs": [{"Step": -6.34e-05, "+": -11.0533}, {" 1": -0.5}],
    }
    assert parse_logprobs(obj) == (
        TokenLogprob("Step", -6.34e-05, (("Step", -6.34e-05), ("+", -11.0533))),
        TokenLogprob(" 1", -0.5, ((" 1", -0.5),)),
    )
    assert parse_logprobs(None) is None
    with pytest.raises(VerdictParseError, match="unknown logprobs shape"):
        parse_logprobs({"foo": 1})
    with pytest.raises(VerdictParseError, match="differ in length"):
        parse_logprobs({"tokens": ["a"], "token_logprobs": [], "top_logprobs": []})


def test_parse_score_takes_the_last_match_and_checks_the_range() -> None:
    rx = re.compile(r"\[\[(?P<score>-?\d+(?:\.\d+)?)\]\]")
    # the format example "[[5]]" comes first, the verdict last
    assert parse_score('Format: "[[5]]". My rating: [[8.5]]', rx, score_range=(1, 10)) == 8.5
    with pytest.raises(VerdictParseError, match="no verdict"):
        parse_score("Rating: 8", rx, score_range=(1, 10))
    with pytest.raises(VerdictParseError, match=r"outside the range 1\.\.10"):
        parse_score("[[11]]", rx, score_range=(1, 10))


def test_parse_pairwise_labels() -> None:
    rx = re.compile(r"\[\[(?P<verdict>[A-Z])\]\]")
    labels = ("A", "B", "C")
    assert parse_pairwise("[[A]]", rx, labels) == 0
    assert parse_pairwise("[[A]] ... final: [[B]]", rx, labels) == 1
    assert parse_pairwise("[[C]]", rx, labels) is None  # tie
    with pytest.raises(VerdictParseError, match="none of the labels"):
        parse_pairwise("[[D]]", rx, labels)
    with pytest.raises(VerdictParseError, match="none of the labels"):
        parse_pairwise("[[C]]", rx, ("A", "B", None))  # ties not allowed


def test_parse_ranking_needs_a_full_order() -> None:
    rx, sep = re.compile(r"\[\[(?P<ranking>[^\[\]]+)\]\]"), re.compile(r"\s*(?:>|,)\s*")
    assert parse_ranking("so [[2 > 3 > 1]]", rx, sep, 3) == (1, 2, 0)
    assert parse_ranking("[[3, 1, 2]]", rx, sep, 3) == (2, 0, 1)
    for bad in ("[[2 > 2 > 1]]", "[[1 > 2]]", "[[1 > 2 > 4]]", "[[a > b > c]]"):
        with pytest.raises(VerdictParseError, match="not an order"):
            parse_ranking(bad, rx, sep, 3)


def test_parse_principle_json() -> None:
    labels = ["model-1", "model-2"]
    text = '<think>model-2 is shorter</think>\n```json\n{"scores": {"model-1": 2, "model-2": 5}, "best-to-worst": ["model-2", "model-1"]}\n```'
    assert parse_principle_json(text, labels) == ({"model-1": 2.0, "model-2": 5.0}, ("model-2", "model-1"))
    bad = {
        '{"scores": {"model-1": 2}, "best-to-worst": ["model-1", "model-2"]}': "scores are for",
        '{"scores": {"model-1": 2, "model-2": 9}, "best-to-worst": ["model-2", "model-1"]}': "outside 1..5",
        '{"scores": {"model-1": 2, "model-2": 3}, "best-to-worst": ["model-2"]}': "not an order",
        '{"scores": {"model-1": 2, "model-2": 3}, }': "not valid JSON",
        "no verdict": "no JSON object",
    }
    for t, why in bad.items():
        with pytest.raises(VerdictParseError, match=re.escape(why)):
            parse_principle_json(t, labels)


def test_cache_key_and_determinism() -> None:
    body = {"model": "m", "prompt": "p", "temperature": 0.0, "max_tokens": 8}
    # key order does not matter; the endpoint, the model and every field do
    assert cache_key("m", "completions", body) == cache_key("m", "completions", dict(reversed(body.items())))
    assert cache_key("m", "completions", body) != cache_key("m", "chat", body)
    assert cache_key("m", "completions", body) != cache_key("m2", "completions", body)
    assert cache_key("m", "completions", body) != cache_key("m", "completions", {**body, "max_tokens": 9})
    assert is_deterministic(body) and is_deterministic({"temperature": 1.0, "seed": 3})
    assert not is_deterministic({"temperature": 0.7}) and not is_deterministic(
        {}
    )  # absent = OpenAI's default 1


def test_decoding_bodies() -> None:
    d = Decoding(max_tokens=8, stop=("\n",), seed=3, logprobs=2, extra={"repeat_penalty": 1.0})
    assert d.body("m", "hi") == {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 8,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": 3,
        "logprobs": 2,
        "repeat_penalty": 1.0,
    }
    c = Decoding(endpoint="chat", system="be fair", logprobs=2)
    assert c.body("m", "hi") == {
        "model": "m",
        "messages": [{"role": "system", "content": "be fair"}, {"role": "user", "content": "hi"}],
        "max_tokens": 256,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 2,
    }


def test_bad_settings_raise_one_clear_error() -> None:
    client = JudgeClient("http://127.0.0.1:9/v1", model="m")
    cases = [
        (lambda: PointwiseJudge(client, template="{prompt} {answer}"), "unknown field"),
        (lambda: PointwiseJudge(client, pattern=r"(\d+)"), "named group"),
        (lambda: PointwiseJudge(client, pattern=r"(?P<score>"), "invalid regex"),
        (lambda: PointwiseJudge(client, on_unparseable="ignore"), "on_unparseable"),  # type: ignore[arg-type]
        (lambda: PointwiseJudge(client, score_range=(10, 1)), "score_range"),
        (lambda: PairwiseJudge(client, labels=("A", "A", None)), "distinct"),
        (lambda: ListwiseJudge(client, candidate_template="{label} {text}"), "unknown field"),
        (lambda: Decoding(stop="\n"), "tuple of strings"),  # type: ignore[arg-type]
        (lambda: Decoding(endpoint="embeddings"), "endpoint"),  # type: ignore[arg-type]
        (lambda: JudgeClient("127.0.0.1:8080", model="m"), "http://"),
        (lambda: JudgeClient("http://x/v1", model="m", max_concurrency=0), "max_concurrency"),
    ]
    for make, why in cases:
        with pytest.raises(JudgeConfigError, match=why):
            make()
    assert issubclass(JudgeConfigError, ValueError)


@given(n=st.integers(1, 12), seed=st.integers(0, 10**6), key=st.text(max_size=20))
def test_shuffle_order_is_a_reproducible_permutation(n: int, seed: int, key: str) -> None:
    order = shuffle_order(n, seed=seed, key=key)
    assert sorted(order) == list(range(n))
    assert shuffle_order(n, seed=seed, key=key) == order


@given(perm=st.permutations(list(range(6))).flatmap(lambda p: st.just(tuple(p))))
def test_rank_scores_invariants(perm: tuple[int, ...]) -> None:
    scores = rank_scores(perm, 6)
    # best → 1, worst → 0, strictly decreasing along the ranking, evenly spaced by 1/5
    assert scores[perm[0]] == 1.0 and scores[perm[-1]] == 0.0
    assert [scores[p] for p in perm] == [(5 - r) / 5 for r in range(6)]
