"""LLM-as-judge rewards through any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp's ``llama-server``, APIs).

Two layers:

* :class:`JudgeClient`: an async client for ``/v1/completions`` and ``/v1/chat/completions`` with a concurrency
  limit (a semaphore per event loop), a rate limit (requests per second, shared by every loop and thread using the
  client), retries with jittered exponential backoff on 5xx / 429 / connection errors / timeouts, a per-request
  deadline, in-flight deduplication, and a content-addressed SQLite cache for deterministic requests (temperature
  0 or a fixed seed). It counts HTTP requests, cache hits and retries in :attr:`JudgeClient.stats`. It pickles as
  plain configuration: HTTP clients and SQLite connections are opened per :meth:`JudgeClient.session` (one per
  scored batch) and never stored on the object.
* Judge modes, each a :class:`~treeward.rewards.base.Reward` with a synchronous ``__call__`` and a native async
  ``ascore``: :class:`PointwiseJudge`, :class:`PairwiseJudge` (with position-swap debiasing),
  :class:`ListwiseJudge` (seeded, recorded candidate shuffle), :class:`PrincipleJudge` (RewardAnything) and
  :class:`CritiqueJudge` (RationalRewards / WebArbiter: critique first, then a score).

Prompt templates are plain ``str.format`` strings (literal braces doubled), checked for unknown fields when the
judge is built. Verdicts are parsed with strict regexes. An unparseable verdict never becomes a silent number:
``on_unparseable="error"`` gives status ``parse_error`` with ``score=None`` and the raw text in ``info["raw"]``;
``"retry"`` asks again up to ``unparseable_retries`` times (attempt ``k`` samples at ``retry_temperature`` with seed
``seed + k``, so retries are reproducible and cacheable) and then fails the same way; a float gives that score,
still with status ``parse_error`` so it is counted (RewardBench 2 scores a failed parse 0.25). Transport failures are
statuses too: ``timeout`` when the last attempt timed out, ``judge_error`` for HTTP errors, refused connections and
malformed responses. ``info`` always carries ``cache_hit``, ``latency_s`` and ``http_requests``.

A local judge server for tests and benchmarks: :func:`find_llama_server` reads the build that
``scripts/llama_server.sh`` caches (llama.cpp's native server and a GGUF of the shipped tiny policy), and
:class:`LlamaServer` starts it on a free loopback port with the sampling defaults pinned. Notes and pitfalls:
``shared/reference/openai-server.md``.

Needs ``httpx`` (imported when a session opens, so importing this module stays cheap).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import socket
import sqlite3
import string
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from treeward._paths import SHIPPED_POLICY
from treeward.rewards.base import RewardResult, Sample, Status, run_sync

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Completion",
    "CritiqueJudge",
    "Decoding",
    "JudgeClient",
    "JudgeConfigError",
    "JudgeRequestError",
    "JudgeSession",
    "JudgeStats",
    "ListwiseJudge",
    "LlamaServer",
    "LlamaServerBuild",
    "PairwiseJudge",
    "PointwiseJudge",
    "PrincipleJudge",
    "TokenLogprob",
    "VerdictParseError",
    "cache_key",
    "find_llama_server",
    "is_deterministic",
    "model_hash",
    "parse_logprobs",
    "parse_pairwise",
    "parse_principle_json",
    "parse_ranking",
    "parse_score",
    "rank_scores",
    "shuffle_order",
]

T = TypeVar("T")
V = TypeVar("V")
Endpoint = Literal["completions", "chat"]
OnUnparseable = Literal["error", "retry"] | float

_PATHS: dict[str, str] = {"completions": "/completions", "chat": "/chat/completions"}
_CACHE_VERSION = 1


class JudgeConfigError(ValueError):
    """A judge or client was built with bad settings (the message says which and how to fix it)."""


class VerdictParseError(ValueError):
    """The judge's text holds no verdict the mode's pattern accepts (``str(e)`` says why)."""


class JudgeRequestError(Exception):
    """A request failed for good (after retries): ``status`` is ``timeout`` or ``judge_error``."""

    def __init__(self, status: Status, reason: str, *, attempts: int) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.attempts = attempts


# ---------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability, and the ``top`` alternatives [K] as (token, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """One judge answer. ``logprobs`` [T] only when requested; ``cached``: served from the SQLite cache (or from an
    identical request in flight), with ``http_requests`` = 0; ``latency_s``: wall time of this request."""

    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] | None
    cached: bool
    http_requests: int
    latency_s: float


@dataclass(frozen=True)
class Decoding:
    """How a judge asks: endpoint, sampling and extra request fields.

    ``temperature=0`` (the default) makes requests deterministic and therefore cacheable; so does a fixed ``seed``.
    ``system`` is the chat system message (chat endpoint only). ``logprobs``: top-K log-probs per generated token
    (``None``: not requested). ``extra`` is merged into the request body last (e.g. ``{"repeat_penalty": 1.0}`` for
    llama-cpp-python's server, whose default penalty changes greedy text).
    """

    endpoint: Endpoint = "completions"
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    logprobs: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in _PATHS:
            raise JudgeConfigError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.max_tokens < 1:
            raise JudgeConfigError(f"max_tokens must be ≥ 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise JudgeConfigError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if isinstance(self.stop, str):
            raise JudgeConfigError("stop is a tuple of strings, e.g. stop=('\\n',), not a string")
        if self.logprobs is not None and self.logprobs < 0:
            raise JudgeConfigError(f"logprobs must be ≥ 0 or None, got {self.logprobs}")

    def body(self, model: str, prompt: str | Sequence[Mapping[str, str]]) -> dict[str, Any]:
        """The JSON request body for ``prompt`` (a string for completions, chat messages for chat)."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.endpoint == "completions":
            if not isinstance(prompt, str):
                raise JudgeConfigError("the completions endpoint takes a string prompt, not chat messages")
            body["prompt"] = prompt
            if self.logprobs is not None:
                body["logprobs"] = self.logprobs
        else:
            if isinstance(prompt, str):
                messages: list[dict[str, str]] = []
                if self.system is not None:
                    messages.append({"role": "system", "content": self.system})
                messages.append({"role": "user", "content": prompt})
            else:
                messages = [dict(m) for m in prompt]
            body["messages"] = messages
            if self.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = self.logprobs
        if self.stop:
            body["stop"] = list(self.stop)
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra)
        return body


@dataclass
class JudgeStats:
    """Counters of one client object (not shared with its pickled copies). ``http_requests`` counts every HTTP
    attempt, retries included; ``cache_hits`` includes identical requests served from one in flight."""

    http_requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    retries: int = 0
    timeouts: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(
        self,
        *,
        http_requests: int = 0,
        cache_hits: int = 0,
        cache_misses: int = 0,
        retries: int = 0,
        timeouts: int = 0,
        errors: int = 0,
    ) -> None:
        with self._lock:
            self.http_requests += http_requests
            self.cache_hits += cache_hits
            self.cache_misses += cache_misses
            self.retries += retries
            self.timeouts += timeouts
            self.errors += errors

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "http_requests": self.http_requests,
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
                "retries": self.retries,
                "timeouts": self.timeouts,
                "errors": self.errors,
            }


# ---------------------------------------------------------------------------------------------------------------
# pure helpers: cache keys, logprobs, verdict parsing, shuffles
# ---------------------------------------------------------------------------------------------------------------
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(model: str, endpoint: Endpoint, body: Mapping[str, Any]) -> str:
    """The content address of a request: sha256 of the canonical JSON of (cache version, model name, endpoint,
    body). The base URL is not part of it, so the same model served elsewhere hits the same entries."""
    return hashlib.sha256(
        _canonical({"v": _CACHE_VERSION, "model": model, "endpoint": endpoint, "body": dict(body)}).encode()
    ).hexdigest()


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Whether a request may be cached: greedy (``temperature`` 0; an absent temperature is the OpenAI default 1)
    or seeded (``seed`` set)."""
    return body.get("temperature", 1.0) == 0 or body.get("seed") is not None


def parse_logprobs(obj: Any) -> tuple[TokenLogprob, ...] | None:
    """The per-token log-probs of a choice, from either shape servers send:

    * ``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}, ...]}``: chat completions,
      and llama.cpp's ``llama-server`` on ``/v1/completions`` too;
    * ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...]}``: OpenAI's legacy
      completions shape (llama-cpp-python's server, vLLM).

    ``None`` → ``None``. Anything else raises :class:`VerdictParseError`.
    """
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise VerdictParseError(f"logprobs is a {type(obj).__name__}, expected an object")
    try:
        if "content" in obj:
            items = obj["content"] or []
            return tuple(
                TokenLogprob(
                    str(it["token"]),
                    float(it["logprob"]),
                    tuple((str(t["token"]), float(t["logprob"])) for t in it.get("top_logprobs") or ()),
                )
                for it in items
            )
        if "tokens" in obj and "token_logprobs" in obj:
            tokens, lps = obj["tokens"], obj["token_logprobs"]
            tops = obj.get("top_logprobs") or [None] * len(tokens)
            if not (len(tokens) == len(lps) == len(tops)):
                raise VerdictParseError(
                    "legacy logprobs: tokens, token_logprobs and top_logprobs differ in length"
                )
            return tuple(
                TokenLogprob(
                    str(tok),
                    float(lp),
                    tuple((str(k), float(v)) for k, v in (top or {}).items()),
                )
                for tok, lp, top in zip(tokens, lps, tops, strict=True)
            )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, VerdictParseError):
            raise
        raise VerdictParseError(f"malformed logprobs entry: {type(e).__name__}: {e}") from e
    raise VerdictParseError(f"unknown logprobs shape with keys {sorted(obj)}")


def _compile(pattern: str | re.Pattern[str], groups: Sequence[str], what: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    except re.error as e:
        raise JudgeConfigError(f"{what}: invalid regex {pattern!r}: {e}") from e
    missing = [g for g in groups if g not in rx.groupindex]
    if missing:
        raise JudgeConfigError(
            f"{what}: the regex {rx.pattern!r} needs the named group(s) {missing}, e.g. (?P<{missing[0]}>...)"
        )
    return rx


def parse_score(text: str, pattern: re.Pattern[str], *, score_range: tuple[float, float] | None) -> float:
    """The number captured by group ``score`` of the *last* match of ``pattern`` in ``text`` (judges often quote
    the format before giving their verdict), checked against the inclusive ``score_range``."""
    matches = list(pattern.finditer(text))
    if not matches:
        raise VerdictParseError(f"no verdict matching {pattern.pattern!r}")
    raw = matches[-1].group("score")
    try:
        x = float(raw)
    except (TypeError, ValueError) as e:
        raise VerdictParseError(f"verdict {raw!r} is not a number") from e
    if not math.isfinite(x):
        raise VerdictParseError(f"verdict {raw!r} is not finite")
    if score_range is not None and not score_range[0] <= x <= score_range[1]:
        raise VerdictParseError(f"score {x:g} is outside the range {score_range[0]:g}..{score_range[1]:g}")
    return x


def parse_pairwise(text: str, pattern: re.Pattern[str], labels: tuple[str, str, str | None]) -> int | None:
    """The winner named by group ``verdict`` of the last match: 0 (first shown), 1 (second shown) or ``None``
    (tie, when ``labels[2]`` is a tie label). Any other captured text is a :class:`VerdictParseError`."""
    matches = list(pattern.finditer(text))
    if not matches:
        raise VerdictParseError(f"no verdict matching {pattern.pattern!r}")
    v = matches[-1].group("verdict")
    if v == labels[0]:
        return 0
    if v == labels[1]:
        return 1
    if labels[2] is not None and v == labels[2]:
        return None
    raise VerdictParseError(f"verdict {v!r} is none of the labels {[x for x in labels if x is not None]}")


def parse_ranking(text: str, pattern: re.Pattern[str], separator: re.Pattern[str], n: int) -> tuple[int, ...]:
    """Displayed positions best → worst (0-based) from group ``ranking`` of the last match, split by ``separator``
    into the labels ``1..n``; it must name each label exactly once."""
    matches = list(pattern.finditer(text))
    if not matches:
        raise VerdictParseError(f"no ranking matching {pattern.pattern!r}")
    raw = matches[-1].group("ranking")
    parts = [p.strip() for p in separator.split(raw.strip()) if p.strip()]
    want = {str(i) for i in range(1, n + 1)}
    if len(parts) != n or set(parts) != want:
        raise VerdictParseError(f"ranking {raw!r} is not an order of the labels 1..{n}")
    return tuple(int(p) - 1 for p in parts)


_THINK_END = "</think>"
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def parse_principle_json(
    text: str, labels: Sequence[str], *, score_range: tuple[float, float] = (1.0, 5.0)
) -> tuple[dict[str, float], tuple[str, ...]]:
    """RewardAnything's verdict: ``{"scores": {label: s}, "best-to-worst": [label, ...]}`` after an optional
    ``<think>...</think>`` block and code fence. Strict: the JSON object spans from the first ``{`` to the last
    ``}`` of what remains, every label is scored once within ``score_range`` and ranked once, no other label.
    (RewardAnything also repairs quotes and trailing commas; here such output is a parse error.)"""
    body = text.rsplit(_THINK_END, 1)[-1].strip()
    body = _FENCE.sub("", body)
    i, j = body.find("{"), body.rfind("}")
    if i < 0 or j < i:
        raise VerdictParseError("no JSON object in the verdict")
    try:
        obj = json.loads(body[i : j + 1])
    except json.JSONDecodeError as e:
        raise VerdictParseError(f"the verdict is not valid JSON: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("scores"), dict):
        raise VerdictParseError('the verdict has no "scores" object')
    order = obj.get("best-to-worst")
    if not isinstance(order, list):
        raise VerdictParseError('the verdict has no "best-to-worst" list')
    want = set(labels)
    if set(obj["scores"]) != want:
        raise VerdictParseError(f"scores are for {sorted(obj['scores'])}, expected {sorted(want)}")
    if len(order) != len(want) or set(order) != want:
        raise VerdictParseError(f"best-to-worst {order} is not an order of {sorted(want)}")
    scores: dict[str, float] = {}
    for k, v in obj["scores"].items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise VerdictParseError(f"score of {k!r} is {v!r}, not a number")
        if not score_range[0] <= v <= score_range[1]:
            raise VerdictParseError(f"score of {k!r} is {v}, outside {score_range[0]:g}..{score_range[1]:g}")
        scores[k] = float(v)
    return scores, tuple(order)


def shuffle_order(n: int, *, seed: int, key: str) -> tuple[int, ...]:
    """A reproducible permutation of ``range(n)``: ``order[p]`` is the candidate shown at position ``p``. It depends
    on ``seed`` and on ``key`` (the group's content), so different groups get different orders (unlike a fixed
    ``random.seed(42)``, which gives every group of size ``n`` the same permutation)."""
    rng = random.Random(hashlib.sha256(f"{seed}\0{key}".encode()).digest())
    order = list(range(n))
    rng.shuffle(order)
    return tuple(order)


def rank_scores(ranking: Sequence[int], n: int) -> list[float]:
    """Per position, ``(n − 1 − rank) / (n − 1)``: 1.0 for the best, 0.0 for the worst, evenly spaced (n ≥ 2)."""
    if n < 2:
        raise ValueError("rank scores need at least two candidates")
    out = [0.0] * n
    for rank, pos in enumerate(ranking):
        out[pos] = (n - 1 - rank) / (n - 1)
    return out


def _template_fields(template: str, allowed: set[str], what: str) -> set[str]:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise JudgeConfigError(
            f"{what}: not a valid format string ({e}); double literal braces: {{{{ }}}}"
        ) from e
    bad = {n for n in names if n not in allowed}
    if bad:
        raise JudgeConfigError(
            f"{what}: unknown field(s) {sorted(bad)}; allowed: {sorted(allowed)} (double literal braces: {{{{ }}}})"
        )
    return names


# ---------------------------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------------------------
class _Cache:
    """A content-addressed response store in one SQLite file (WAL, shared by processes)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "PRAGMA synchronous=NORMAL"
        )  # WAL stays consistent; a crash may lose the last few entries
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "endpoint TEXT NOT NULL, body TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, model: str, endpoint: str, body: Mapping[str, Any], response: Any) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
            (key, model, endpoint, _canonical(dict(body)), json.dumps(response), time.time()),
        )

    def close(self) -> None:
        self.db.close()


def _retry_after(resp: httpx.Response) -> float | None:
    v = resp.headers.get("retry-after")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


class JudgeClient:
    """An OpenAI-compatible endpoint for judges (picklable configuration; see :meth:`session`).

    ``base_url`` ends before the endpoint path (``http://127.0.0.1:8080/v1``); ``model`` is the name sent in
    requests and part of the cache key. ``max_concurrency`` requests at once per event loop; ``requests_per_s``
    spaces request starts evenly across all loops and threads (``None``: no rate limit). Each HTTP attempt has a
    wall-clock deadline of ``timeout_s``; 5xx, 429, connection errors and timeouts are retried ``max_retries``
    times, waiting ``min(max_backoff_s, backoff_s · 2^k)`` times a jitter in [0.5, 1] (or the server's
    ``Retry-After``); other 4xx fail at once. ``cache_path``: a SQLite file for deterministic requests (``None``:
    no cache). ``api_key`` is sent as a bearer token.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        requests_per_s: float | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise JudgeConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1:
            raise JudgeConfigError(f"max_concurrency must be ≥ 1, got {max_concurrency}")
        if requests_per_s is not None and not requests_per_s > 0:
            raise JudgeConfigError(f"requests_per_s must be > 0 or None, got {requests_per_s}")
        if not timeout_s > 0:
            raise JudgeConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise JudgeConfigError("max_retries, backoff_s and max_backoff_s must be ≥ 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.requests_per_s = requests_per_s
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.cache_path = None if cache_path is None else Path(cache_path)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("stats", "_lock", "_next_slot", "_sems"):
            del state[k]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"JudgeClient({self.base_url!r}, model={self.model!r})"

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            sem = self._sems.get(loop)
            if sem is None:
                sem = self._sems[loop] = asyncio.Semaphore(self.max_concurrency)
            return sem

    def _rate_wait(self) -> float:
        """Seconds until this request's start slot (and books the slot)."""
        if self.requests_per_s is None:
            return 0.0
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1.0 / self.requests_per_s
            return slot - now

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[JudgeSession]:
        """An open HTTP client (and cache connection) for one batch: ``async with client.session() as s``."""
        try:
            import httpx
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LLM judges need httpx: pip install httpx") from e
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        cache = _Cache(self.cache_path) if self.cache_path is not None else None
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        try:
            async with httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s), headers=headers, limits=limits, trust_env=False
            ) as http:
                yield JudgeSession(self, http, cache)
        finally:
            if cache is not None:
                cache.close()


class JudgeSession:
    """A client's open connection for one batch (from :meth:`JudgeClient.session`); identical deterministic
    requests in flight at once are sent once."""

    def __init__(self, client: JudgeClient, http: httpx.AsyncClient, cache: _Cache | None) -> None:
        self.client = client
        self._http = http
        self._cache = cache
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def generate(self, decoding: Decoding, prompt: str | Sequence[Mapping[str, str]]) -> Completion:
        """Ask once (a completion for a string prompt on ``completions``; chat for messages or ``chat``)."""
        body = decoding.body(self.client.model, prompt)
        t0 = time.monotonic()
        payload, cached, n_http = await self.request(decoding.endpoint, body)
        try:
            choice = payload["choices"][0]
            text = choice["text"] if decoding.endpoint == "completions" else choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"the answer text is a {type(text).__name__}")
            logprobs = parse_logprobs(choice.get("logprobs")) if decoding.logprobs is not None else None
        except (KeyError, IndexError, TypeError, VerdictParseError) as e:
            raise JudgeRequestError(
                Status.JUDGE_ERROR,
                f"malformed {decoding.endpoint} response ({type(e).__name__}: {e}): {json.dumps(payload)[:300]}",
                attempts=n_http,
            ) from e
        return Completion(text, choice.get("finish_reason"), logprobs, cached, n_http, time.monotonic() - t0)

    async def request(self, endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool, int]:
        """POST ``body`` to ``endpoint``: (response JSON, served from cache, HTTP attempts made). Deterministic
        requests go through the cache and the in-flight table; failures raise :class:`JudgeRequestError` and are
        never cached."""
        c = self.client
        if not is_deterministic(body):
            payload, n = await self._send(endpoint, body)
            return payload, False, n
        key = cache_key(c.model, endpoint, body)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            c.stats.add(cache_hits=1)
            return hit, True, 0
        if (fut := self._inflight.get(key)) is not None:
            payload = await asyncio.shield(fut)
            c.stats.add(cache_hits=1)
            return payload, True, 0
        c.stats.add(cache_misses=1)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            payload, n = await self._send(endpoint, body)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it; none waiting is fine
            raise
        finally:
            del self._inflight[key]
        choices = payload.get("choices")
        if (
            self._cache is not None and isinstance(choices, list) and choices
        ):  # never cache a malformed answer
            self._cache.put(key, c.model, endpoint, body, payload)
        fut.set_result(payload)
        return payload, False, n

    async def _send(self, endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        import httpx

        c = self.client
        url = c.base_url + _PATHS[endpoint]
        rng = random.Random()
        last_status, last_reason = Status.JUDGE_ERROR, "no attempt made"
        for attempt in range(c.max_retries + 1):
            retry_after: float | None = None
            if (wait := c._rate_wait()) > 0:
                await asyncio.sleep(wait)
            async with c._semaphore():
                c.stats.add(http_requests=1)
                try:
                    async with asyncio.timeout(c.timeout_s):
                        resp = await self._http.post(url, json=dict(body))
                except (TimeoutError, httpx.TimeoutException):
                    c.stats.add(timeouts=1)
                    last_status = Status.TIMEOUT
                    last_reason = f"no answer from {url} within {c.timeout_s:g} s"
                except httpx.TransportError as e:
                    last_status, last_reason = Status.JUDGE_ERROR, f"{type(e).__name__} on {url}: {e}"
                else:
                    if resp.status_code < 400:
                        try:
                            payload = resp.json()
                        except ValueError as e:
                            c.stats.add(errors=1)
                            raise JudgeRequestError(
                                Status.JUDGE_ERROR,
                                f"HTTP {resp.status_code} from {url} is not JSON: {resp.text[:300]!r}",
                                attempts=attempt + 1,
                            ) from e
                        if not isinstance(payload, dict):
                            c.stats.add(errors=1)
                            raise JudgeRequestError(
                                Status.JUDGE_ERROR,
                                f"{url} answered a JSON {type(payload).__name__}",
                                attempts=attempt + 1,
                            )
                        return payload, attempt + 1
                    reason = f"HTTP {resp.status_code} from {url}: {resp.text[:300]}"
                    if resp.status_code != 429 and resp.status_code < 500:
                        c.stats.add(errors=1)
                        raise JudgeRequestError(Status.JUDGE_ERROR, reason, attempts=attempt + 1)
                    last_status, last_reason = Status.JUDGE_ERROR, reason
                    retry_after = _retry_after(resp)
            if attempt < c.max_retries:
                c.stats.add(retries=1)
                delay = min(c.max_backoff_s, c.backoff_s * 2**attempt) * rng.uniform(0.5, 1.0)
                if retry_after is not None:
                    delay = min(c.max_backoff_s, retry_after)
                await asyncio.sleep(delay)
        c.stats.add(errors=1)
        n = c.max_retries + 1
        raise JudgeRequestError(last_status, f"{last_reason} (after {n} attempt(s))", attempts=n)


# ---------------------------------------------------------------------------------------------------------------
# shared judge machinery
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Policy:
    on_unparseable: OnUnparseable
    retries: int
    retry_temperature: float

    @staticmethod
    def make(on_unparseable: OnUnparseable, retries: int, retry_temperature: float) -> _Policy:
        if isinstance(on_unparseable, bool) or not (
            on_unparseable in ("error", "retry") or isinstance(on_unparseable, int | float)
        ):
            raise JudgeConfigError(
                f"on_unparseable must be 'error', 'retry' or a default score, got {on_unparseable!r}"
            )
        if isinstance(on_unparseable, int | float) and not math.isfinite(on_unparseable):
            raise JudgeConfigError("a default score for unparseable verdicts must be finite")
        if retries < 0:
            raise JudgeConfigError(f"unparseable_retries must be ≥ 0, got {retries}")
        if not retry_temperature >= 0:
            raise JudgeConfigError(f"retry_temperature must be ≥ 0, got {retry_temperature}")
        return _Policy(on_unparseable, retries if on_unparseable == "retry" else 0, retry_temperature)

    def decoding(self, d: Decoding, attempt: int) -> Decoding:
        if attempt == 0:
            return d
        return dataclasses.replace(d, temperature=self.retry_temperature, seed=(d.seed or 0) + attempt)


@dataclass
class _Calls:
    """What a sample's judge calls cost: for ``info``."""

    cached: list[bool] = field(default_factory=list)
    http: int = 0
    latency: float = 0.0

    def add(self, c: Completion) -> None:
        self.cached.append(c.cached)
        self.http += c.http_requests
        self.latency += c.latency_s

    def info(self) -> dict[str, Any]:
        return {
            "cache_hit": bool(self.cached) and all(self.cached),
            "http_requests": self.http,
            "latency_s": self.latency,
        }


@dataclass(frozen=True)
class _Outcome(Generic[V]):
    value: V | None
    raw: str
    failed_raw: tuple[str, ...]
    reason: str | None


Ask = Callable[[Decoding], Awaitable[tuple[str, dict[str, Any]]]]


async def _ask_parsed(
    ask: Ask, parse: Callable[[str], T], decoding: Decoding, policy: _Policy, extras: dict[str, Any]
) -> _Outcome[T]:
    """Ask (``ask(decoding)`` → raw text, extra info) and parse, retrying unparseable verdicts per ``policy``."""
    failed: list[str] = []
    reason: str | None = None
    raw = ""
    for attempt in range(policy.retries + 1):
        raw, extra = await ask(policy.decoding(decoding, attempt))
        extras.update(extra)
        try:
            return _Outcome(parse(raw), raw, tuple(failed), None)
        except VerdictParseError as e:
            reason = str(e)
            failed.append(raw)
    return _Outcome(None, raw, tuple(failed[:-1]), reason)


def _unparseable(policy: _Policy, reason: str, info: dict[str, Any]) -> RewardResult:
    info = {**info, "reason": f"unparseable verdict: {reason}"}
    if isinstance(policy.on_unparseable, int | float) and not isinstance(policy.on_unparseable, bool):
        return RewardResult(
            float(policy.on_unparseable), Status.PARSE_ERROR, info={**info, "default_score": True}
        )
    return RewardResult(None, Status.PARSE_ERROR, info=info)


def _request_failed(e: JudgeRequestError, info: dict[str, Any]) -> RewardResult:
    """The result of a sample whose judge request failed for good; ``http_requests`` includes the failed ones."""
    n = int(info.get("http_requests", 0)) + e.attempts
    return RewardResult(
        None, e.status, info={**info, "http_requests": n, "reason": e.reason, "attempts": e.attempts}
    )


def _na(reason: str) -> RewardResult:
    return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": reason})


def _check_sample(s: Sample, partial_ok: bool) -> RewardResult | None:
    if not isinstance(s.response, str):
        return RewardResult(
            None, Status.PARSE_ERROR, info={"reason": f"response is {type(s.response).__name__}"}
        )
    if s.partial and not partial_ok:
        return _na("partial prefix: this judge scores complete responses (partial_ok=False)")
    return None


def _reference_text(s: Sample) -> str | RewardResult:
    if s.reference is None:
        return _na("no reference")
    if isinstance(s.reference, str):
        return s.reference
    if isinstance(s.reference, (list, tuple)) and len(s.reference) == 1 and isinstance(s.reference[0], str):
        return s.reference[0]
    return RewardResult(
        None,
        Status.PARSE_ERROR,
        info={"reason": f"reference must be one string, got {type(s.reference).__name__}"},
    )


def _format(template: str, **fields: Any) -> str:
    return template.format_map(fields)


def _groups(samples: Sequence[Sample], key: Callable[[Sample], str]) -> dict[str, list[int]]:
    """Sample indices by group key, in first-seen order."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        out.setdefault(key(s), []).append(i)
    return out


def _group_key(s: Sample) -> str:
    """``group_id`` when set, else the prompt: samples answering one prompt form one group."""
    return f"id:{s.group_id}" if s.group_id is not None else f"prompt:{s.prompt}"


async def _batch(
    client: JudgeClient,
    score: Callable[[JudgeSession, list[Sample]], Awaitable[list[RewardResult]]],
    samples: Sequence[Sample],
) -> list[RewardResult]:
    """Score a batch inside one client session (the ``ascore`` of every judge mode)."""
    samples = list(samples)
    if not samples:
        return []
    async with client.session() as session:
        return await score(session, samples)


def _decoding(decoding: Decoding | None) -> Decoding:
    if decoding is not None and not isinstance(decoding, Decoding):
        raise JudgeConfigError(f"decoding must be a Decoding, got {type(decoding).__name__}")
    return decoding or Decoding()


# ---------------------------------------------------------------------------------------------------------------
# judge modes
# ---------------------------------------------------------------------------------------------------------------
POINTWISE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Consider helpfulness, relevance, accuracy, depth and level of detail. Begin "
    "with a short explanation, then rate the response on a scale of 1 to 10 by strictly following this format: "
    '"[[rating]]", for example: "Rating: [[5]]".\n\n[Question]\n{prompt}\n\n'
    "[The Start of Assistant's Answer]\n{response}\n[The End of Assistant's Answer]\n"
)
SCORE_PATTERN = r"\[\[(?P<score>-?\d+(?:\.\d+)?)\]\]"


class _Judge:
    """What every judge mode shares: sync ``__call__`` over the async ``ascore``, one client session per batch, and
    (unless a mode scores its batch jointly) each sample judged on its own by the mode's ``_one``. Modes set
    ``client``, ``name`` and ``partial_ok``."""

    client: JudgeClient
    name: str
    partial_ok: bool
    template: str
    _fields: set[str]

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return run_sync(self.ascore(samples))

    async def ascore(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return await _batch(self.client, self._score, samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, client={self.client!r})"

    async def _score(self, session: JudgeSession, samples: list[Sample]) -> list[RewardResult]:
        return list(await asyncio.gather(*(self._one(session, s) for s in samples)))

    async def _one(self, session: JudgeSession, s: Sample) -> RewardResult:
        raise NotImplementedError(f"{type(self).__name__} scores its batch jointly")

    def _judge_prompt(self, s: Sample) -> str | RewardResult:
        """The mode's ``template`` filled with the sample (prompt, response, and the reference when the template
        names it), or the result that says why the sample cannot be judged."""
        if (pre := _check_sample(s, self.partial_ok)) is not None:
            return pre
        ref = ""
        if "reference" in self._fields:
            got = _reference_text(s)
            if isinstance(got, RewardResult):
                return got
            ref = got
        return _format(self.template, prompt=s.prompt, response=s.response, reference=ref)


class _GroupJudge(_Judge):
    """A mode that judges the responses to one prompt together (listwise, principle): the batch is cut into groups,
    each group's responses are shown in a seeded shuffled order, one request judges the group, and a failed or
    unparseable verdict is every member's status. Modes set ``shuffle``, ``shuffle_seed``, ``decoding`` and
    ``policy``, and write ``_group``."""

    shuffle: bool
    shuffle_seed: int
    decoding: Decoding
    policy: _Policy

    def _skip(self, s: Sample) -> RewardResult | None:
        """Why ``s`` cannot be judged (its result), or ``None``."""
        return _check_sample(s, self.partial_ok)

    def _key(self, s: Sample) -> str:
        """Samples with one key are judged together."""
        return _group_key(s)

    async def _score(self, session: JudgeSession, samples: list[Sample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        live: list[int] = []
        for i, s in enumerate(samples):
            if (pre := self._skip(s)) is not None:
                results[i] = pre
            else:
                live.append(i)
        groups = _groups([samples[i] for i in live], self._key)
        jobs = [[live[j] for j in idx] for idx in groups.values()]
        outs = await asyncio.gather(*(self._group(session, [samples[i] for i in g]) for g in jobs))
        for g, res in zip(jobs, outs, strict=True):
            for i, r in zip(g, res, strict=True):
                results[i] = r
        return [r if r is not None else _na("not scored") for r in results]

    async def _group(self, session: JudgeSession, group: list[Sample]) -> list[RewardResult]:
        raise NotImplementedError

    def _shuffled(self, n: int, content: Any) -> tuple[int, ...]:
        """The display order of a group of ``n`` (``order[p]`` = index shown at position ``p``), seeded by
        ``shuffle_seed`` and the group's ``content``; identity when ``shuffle`` is off."""
        if not self.shuffle:
            return tuple(range(n))
        return shuffle_order(n, seed=self.shuffle_seed, key=_canonical(content))

    async def _verdict(
        self,
        session: JudgeSession,
        messages: str | list[dict[str, str]],
        parse: Callable[[str], T],
        base: dict[str, Any],
        tags: Sequence[dict[str, Any]],
    ) -> tuple[T, dict[str, Any]] | list[RewardResult]:
        """Ask for the group's verdict and parse it (retrying per ``policy``): the parsed value and the info every
        member shares, or, when the request fails or the verdict never parses, every member's result (member
        ``k`` tagged with ``tags[k]``)."""
        calls = _Calls()

        async def ask(d: Decoding) -> tuple[str, dict[str, Any]]:
            c = await session.generate(d, messages)
            calls.add(c)
            return c.text, {}

        try:
            out = await _ask_parsed(ask, parse, self.decoding, self.policy, {})
        except JudgeRequestError as e:
            return [_request_failed(e, {**calls.info(), **base, **tag}) for tag in tags]
        info = {**calls.info(), **base, "raw": out.raw}
        if out.failed_raw:
            info["unparseable_raw"] = list(out.failed_raw)
        if out.value is None:
            return [_unparseable(self.policy, out.reason or "", {**info, **tag}) for tag in tags]
        return out.value, info


class PointwiseJudge(_Judge):
    """Single-answer grading: the judge rates one response; the parsed rating is the score.

    Paper: Zheng et al. (2023), "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena" (single-answer grading
    prompt, ``[[rating]]`` on 1–10; the default template is an abridged version of theirs). Departures: the
    rating is the *last* ``pattern`` match (group ``score``), must lie in ``score_range`` (else a parse error), and
    is returned raw (wrap in :class:`~treeward.rewards.compose.Affine` to rescale); no reference-guided variant
    beyond the optional ``{reference}`` field.

    Template fields: ``{prompt}``, ``{response}``, ``{reference}`` (a sample without a reference is n/a when the
    template uses it). Components: ``rating``.
    """

    def __init__(
        self,
        client: JudgeClient,
        *,
        template: str = POINTWISE_TEMPLATE,
        pattern: str | re.Pattern[str] = SCORE_PATTERN,
        score_range: tuple[float, float] | None = (1.0, 10.0),
        decoding: Decoding | None = None,
        on_unparseable: OnUnparseable = "error",
        unparseable_retries: int = 2,
        retry_temperature: float = 1.0,
        partial_ok: bool = False,
        name: str = "judge_pointwise",
    ) -> None:
        self.client = client
        self.template = template
        self._fields = _template_fields(
            template, {"prompt", "response", "reference"}, "PointwiseJudge template"
        )
        self.pattern = _compile(pattern, ["score"], "PointwiseJudge pattern")
        if score_range is not None and not score_range[0] <= score_range[1]:
            raise JudgeConfigError(f"score_range must be (low, high) with low ≤ high, got {score_range}")
        self.score_range = score_range
        self.decoding = _decoding(decoding)
        self.policy = _Policy.make(on_unparseable, unparseable_retries, retry_temperature)
        self.partial_ok = partial_ok
        self.name = self.__name__ = name

    async def _one(self, session: JudgeSession, s: Sample) -> RewardResult:
        prompt = self._judge_prompt(s)
        if isinstance(prompt, RewardResult):
            return prompt
        calls = _Calls()

        async def ask(d: Decoding) -> tuple[str, dict[str, Any]]:
            c = await session.generate(d, prompt)
            calls.add(c)
            return c.text, {}

        try:
            out = await _ask_parsed(
                ask,
                lambda t: parse_score(t, self.pattern, score_range=self.score_range),
                self.decoding,
                self.policy,
                {},
            )
        except JudgeRequestError as e:
            return _request_failed(e, calls.info())
        info = {**calls.info(), "raw": out.raw}
        if out.failed_raw:
            info["unparseable_raw"] = list(out.failed_raw)
        if out.value is None:
            return _unparseable(self.policy, out.reason or "", info)
        return RewardResult(out.value, components={"rating": out.value}, info=info)


PAIRWISE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Avoid any position biases and do not let the order in which the responses "
    "were presented influence your decision. Begin with a short explanation, then output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and '
    '"[[C]]" for a tie.\n\n[User Question]\n{prompt}\n\n[The Start of Assistant A\'s Answer]\n{a}\n'
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]\n"
)
PAIRWISE_PATTERN = r"\[\[(?P<verdict>[ABC])\]\]"


class PairwiseJudge(_Judge):
    """The response against an opponent (``Sample.reference``: a baseline or reference answer): 1 for a win, 0.5
    for a tie, 0 for a loss.

    Paper: Zheng et al. (2023), MT-Bench pairwise comparison (``[[A]]`` / ``[[B]]`` / ``[[C]]``), whose position
    bias they counter by asking twice with the order swapped. With ``swap=True`` (the default) the judge sees both
    orders and the score is the mean of the two per-order scores (so a judge that always prefers one position gives
    0.5, as MT-Bench's "conservative" rule would; a consistent win and tie give 0.75 where theirs gives a tie).
    ``swap=False`` asks once with the response as A. A failed verdict in either order fails the sample.

    Template fields: ``{prompt}``, ``{a}``, ``{b}``. ``labels``: the verdict texts for first shown, second shown,
    tie (``None``: ties not allowed). Components: ``win_ab`` (and ``win_ba``), the sample's score in each order.
    ``info["verdicts"]``: the raw verdict per order.
    """

    def __init__(
        self,
        client: JudgeClient,
        *,
        template: str = PAIRWISE_TEMPLATE,
        pattern: str | re.Pattern[str] = PAIRWISE_PATTERN,
        labels: tuple[str, str, str | None] = ("A", "B", "C"),
        swap: bool = True,
        decoding: Decoding | None = None,
        on_unparseable: OnUnparseable = "error",
        unparseable_retries: int = 2,
        retry_temperature: float = 1.0,
        partial_ok: bool = False,
        name: str = "judge_pairwise",
    ) -> None:
        self.client = client
        self.template = template
        _template_fields(template, {"prompt", "a", "b"}, "PairwiseJudge template")
        self.pattern = _compile(pattern, ["verdict"], "PairwiseJudge pattern")
        if len(labels) != 3 or labels[0] == labels[1] or (labels[2] is not None and labels[2] in labels[:2]):
            raise JudgeConfigError(
                f"labels must be three distinct (first, second, tie-or-None) texts, got {labels}"
            )
        self.labels = labels
        self.swap = swap
        self.decoding = _decoding(decoding)
        self.policy = _Policy.make(on_unparseable, unparseable_retries, retry_temperature)
        self.partial_ok = partial_ok
        self.name = self.__name__ = name

    async def _order(
        self, session: JudgeSession, calls: _Calls, prompt: str, first: str, second: str
    ) -> _Outcome[int | None]:
        text = _format(self.template, prompt=prompt, a=first, b=second)

        async def ask(d: Decoding) -> tuple[str, dict[str, Any]]:
            c = await session.generate(d, text)
            calls.add(c)
            return c.text, {}

        def parse(t: str) -> int | None:
            return parse_pairwise(t, self.pattern, self.labels)

        return await _ask_parsed(ask, parse, self.decoding, self.policy, {})

    async def _one(self, session: JudgeSession, s: Sample) -> RewardResult:
        if (pre := _check_sample(s, self.partial_ok)) is not None:
            return pre
        other = _reference_text(s)
        if isinstance(other, RewardResult):
            return other
        calls = _Calls()
        orders = [("ab", s.response, other)] + ([("ba", other, s.response)] if self.swap else [])
        try:
            outs = await asyncio.gather(*(self._order(session, calls, s.prompt, x, y) for _, x, y in orders))
        except JudgeRequestError as e:
            return _request_failed(e, calls.info())
        info: dict[str, Any] = {
            **calls.info(),
            "raw": {k: o.raw for (k, _, _), o in zip(orders, outs, strict=True)},
        }
        comps: dict[str, float] = {}
        for (k, _, _), o in zip(orders, outs, strict=True):
            if o.reason is not None:
                return _unparseable(self.policy, f"order {k}: {o.reason}", info)
            # the sample is shown first in "ab", second in "ba"
            mine = 0 if k == "ab" else 1
            comps[f"win_{k}"] = 0.5 if o.value is None else float(o.value == mine)
        info["verdicts"] = {
            k: ("tie" if o.value is None else "AB"[o.value])
            for (k, _, _), o in zip(orders, outs, strict=True)
        }
        return RewardResult(sum(comps.values()) / len(comps), components=comps, info=info)


LISTWISE_TEMPLATE = (
    "Please act as an impartial judge and rank the {n} responses below to the user question from best to worst. "
    "Begin with a short explanation, then give the full ranking of the response numbers by strictly following "
    'this format: "[[2 > 1 > 3]]".\n\n[Question]\n{prompt}\n\n{candidates}\n'
)
CANDIDATE_TEMPLATE = "[Response {label}]\n{response}\n[End of Response {label}]\n"
RANKING_PATTERN = r"\[\[(?P<ranking>[^\[\]]+)\]\]"
RANKING_SEPARATOR = r"\s*(?:>|,)\s*"


class ListwiseJudge(_GroupJudge):
    """A group's responses ranked in one judge call; a response's score is ``(n − 1 − rank)/(n − 1)`` (best 1.0,
    worst 0.0).

    Paper: the *rankings* mode of RewardBench 2's generative judges (Malik et al., 2025, "RewardBench 2"), which
    shows all candidates at once at shuffled positions; the full ranking follows RankGPT-style listwise prompting
    (Sun et al., 2023). Departures: a full order of the labels ``1..n`` is parsed (RewardBench 2 parses one winner);
    the shuffle is seeded per group (``shuffle_order(n, seed=shuffle_seed, key=group content)``) so it is
    reproducible and recorded, and differs between groups.

    Groups are samples with the same ``group_id`` (or, without one, the same prompt); a group of one is n/a.
    Template fields: ``{prompt}``, ``{candidates}`` (each response through ``candidate_template`` with
    ``{label}``, ``{response}``), ``{n}``. ``info``: ``shuffle`` (``shuffle[p]`` = index within the group shown at
    position ``p``), ``position`` (this sample's label), ``ranking`` (labels best → worst), ``raw``.
    Components: ``rank`` (1 = best).
    """

    def __init__(
        self,
        client: JudgeClient,
        *,
        template: str = LISTWISE_TEMPLATE,
        candidate_template: str = CANDIDATE_TEMPLATE,
        pattern: str | re.Pattern[str] = RANKING_PATTERN,
        separator: str | re.Pattern[str] = RANKING_SEPARATOR,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        decoding: Decoding | None = None,
        on_unparseable: OnUnparseable = "error",
        unparseable_retries: int = 2,
        retry_temperature: float = 1.0,
        partial_ok: bool = False,
        name: str = "judge_listwise",
    ) -> None:
        self.client = client
        self.template = template
        _template_fields(template, {"prompt", "candidates", "n"}, "ListwiseJudge template")
        self.candidate_template = candidate_template
        _template_fields(candidate_template, {"label", "response"}, "ListwiseJudge candidate_template")
        self.pattern = _compile(pattern, ["ranking"], "ListwiseJudge pattern")
        self.separator = _compile(separator, [], "ListwiseJudge separator")
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.decoding = _decoding(decoding)
        self.policy = _Policy.make(on_unparseable, unparseable_retries, retry_temperature)
        self.partial_ok = partial_ok
        self.name = self.__name__ = name

    def order(self, group: Sequence[Sample]) -> tuple[int, ...]:
        """The display order of a group (``order[p]`` = index shown at position ``p``)."""
        return self._shuffled(len(group), [[s.prompt, s.response] for s in group])

    async def _group(self, session: JudgeSession, group: list[Sample]) -> list[RewardResult]:
        n = len(group)
        if n < 2:
            return [_na("a listwise judge needs a group of at least two responses")]
        order = self.order(group)
        cands = "\n".join(
            _format(self.candidate_template, label=p + 1, response=group[k].response)
            for p, k in enumerate(order)
        )
        text = _format(self.template, prompt=group[0].prompt, candidates=cands, n=n)
        base = {"shuffle": list(order), "shuffle_seed": self.shuffle_seed, "group_size": n}
        pos_of = {k: p for p, k in enumerate(order)}
        got = await self._verdict(
            session,
            text,
            lambda t: parse_ranking(t, self.pattern, self.separator, n),
            base,
            [{"position": pos_of[k] + 1} for k in range(n)],
        )
        if isinstance(got, list):
            return got
        value, info = got
        by_pos = rank_scores(value, n)
        rank_of = {p: r for r, p in enumerate(value)}
        ranking = [p + 1 for p in value]
        return [
            RewardResult(
                by_pos[pos_of[k]],
                components={"rank": float(rank_of[pos_of[k]] + 1)},
                info={**info, "position": pos_of[k] + 1, "ranking": ranking},
            )
            for k in range(n)
        ]


PRINCIPLE_SYSTEM = (
    "You are an evaluator judging model responses by a given principle. Think briefly inside <think></think>, then "
    'output only a JSON object: {"scores": {"model-1": s, ...}, "best-to-worst": ["model-2", ...]} '
    "where each score is an integer from 1 (violates the principle) to 5 (follows it perfectly) and best-to-worst "
    "orders every model, breaking ties between equal scores."
)
PRINCIPLE_TEMPLATE = "{system}\n\n{request}\n"


class PrincipleJudge(_GroupJudge):
    """Principle-following scoring: principle + prompt + a group of responses → a 1–5 score per response and a
    best-to-worst ranking, as JSON.

    Paper: Yu et al. (2025), "RewardAnything: Generalizable Principle-Following Reward Models" (arXiv
    2506.03637): the user turn is the JSON of ``{principle, prompt, responses}`` with responses masked as
    ``model-1..N``; the answer is ``{"scores": {...}, "best-to-worst": [...]}`` after a ``<think>`` block.
    Departures: the masking shuffle is seeded per group and recorded (RewardAnything uses a fixed
    ``random.seed(42)``, the same permutation for every group of a given size); parsing is strict (no quote or
    comma repair); the score is the raw 1–5 value (components: ``rank``, 1 = best); ``info["consistent"]`` says
    whether the ranking agrees with the scores (it is recorded, not enforced).

    The principle is ``principle`` or, when that is ``None``, ``Sample.metadata["principle"]`` (no principle →
    n/a). Groups as in :class:`ListwiseJudge` (and the same principle); a group of one is scored too.
    Template fields: ``{system}`` (``system``), ``{request}`` (the JSON), ``{principle}``, ``{prompt}``.
    """

    def __init__(
        self,
        client: JudgeClient,
        *,
        principle: str | None = None,
        system: str = PRINCIPLE_SYSTEM,
        template: str = PRINCIPLE_TEMPLATE,
        score_range: tuple[float, float] = (1.0, 5.0),
        shuffle: bool = True,
        shuffle_seed: int = 0,
        decoding: Decoding | None = None,
        on_unparseable: OnUnparseable = "error",
        unparseable_retries: int = 2,
        retry_temperature: float = 1.0,
        partial_ok: bool = False,
        name: str = "judge_principle",
    ) -> None:
        self.client = client
        self.principle = principle
        self.system = system
        self.template = template
        _template_fields(template, {"system", "request", "principle", "prompt"}, "PrincipleJudge template")
        self.score_range = score_range
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.decoding = _decoding(decoding)
        self.policy = _Policy.make(on_unparseable, unparseable_retries, retry_temperature)
        self.partial_ok = partial_ok
        self.name = self.__name__ = name

    def _principle(self, s: Sample) -> str | None:
        if self.principle is not None:
            return self.principle
        p = s.metadata.get("principle")
        return p if isinstance(p, str) else None

    def _skip(self, s: Sample) -> RewardResult | None:
        if (pre := _check_sample(s, self.partial_ok)) is not None:
            return pre
        if self._principle(s) is None:
            return _na("no principle (pass principle= or set Sample.metadata['principle'])")
        return None

    def _key(self, s: Sample) -> str:
        return f"{_group_key(s)}\0{self._principle(s)}"

    async def _group(self, session: JudgeSession, group: list[Sample]) -> list[RewardResult]:
        n = len(group)
        principle = self._principle(group[0]) or ""
        order = self._shuffled(n, [principle, [s.response for s in group]])
        labels = [f"model-{p + 1}" for p in range(n)]
        request = json.dumps(
            {
                "principle": principle,
                "prompt": group[0].prompt,
                "responses": {labels[p]: group[k].response for p, k in enumerate(order)},
            },
            ensure_ascii=False,
            indent=2,
        )
        text = _format(
            self.template, system=self.system, request=request, principle=principle, prompt=group[0].prompt
        )
        messages: str | list[dict[str, str]] = text
        if self.decoding.endpoint == "chat":
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": request}]
        pos_of = {k: p for p, k in enumerate(order)}
        base = {
            "shuffle": list(order),
            "shuffle_seed": self.shuffle_seed,
            "group_size": n,
            "principle": principle,
        }
        got = await self._verdict(
            session,
            messages,
            lambda t: parse_principle_json(t, labels, score_range=self.score_range),
            base,
            [{"label": labels[pos_of[k]]} for k in range(n)],
        )
        if isinstance(got, list):
            return got
        (scores, ranking), info = got
        consistent = all(scores[a] >= scores[b] for a, b in itertools.pairwise(ranking))
        info.update(ranking=list(ranking), consistent=consistent)
        return [
            RewardResult(
                scores[labels[pos_of[k]]],
                components={"rank": float(ranking.index(labels[pos_of[k]]) + 1)},
                info={**info, "label": labels[pos_of[k]]},
            )
            for k in range(n)
        ]


CRITIQUE_TEMPLATE = (
    "Please act as an impartial judge. Write a critique of the response below to the user question: go through "
    "its correctness, completeness and clarity, and point out every flaw.\n\n[Question]\n{prompt}\n\n"
    "[The Start of the Response]\n{response}\n[The End of the Response]\n\nCritique:"
)
SCORE_TEMPLATE = "\n\nBased on this critique, rate the response from 1 to 10. Rating:"
CRITIQUE_SCORE_PATTERN = r"^\s*\[*(?P<score>-?\d+(?:\.\d+)?)"


class CritiqueJudge(_Judge):
    """Critique, then score: the judge first writes a critique of the response, then is asked for a score in a
    second request that continues from its critique; the score is parsed from that second answer.

    Papers: RationalRewards ("RationalRewards: Reasoning Rewards Scale Visual Generation Both Training and Test Time"):
    explicit critiques before the score make the reward interpretable; WebArbiter ("WebArbiter: A Principle-Guided
    Reasoning Process Reward Model for Web Agents"): reasoning that concludes with a verdict. Departures: text
    only and pointwise (RationalRewards scores several visual dimensions, WebArbiter compares two web actions); the
    two stages are separate requests, so the critique cannot leak a premature score into the parse and the score
    request is short. On ``completions`` the second prompt is ``stage-1 prompt + critique + score_template``; on
    ``chat`` the critique is an assistant turn followed by ``score_template`` as a user turn.

    Template fields (``template``): ``{prompt}``, ``{response}``, ``{reference}``; ``score_template`` has none.
    ``decoding`` drives the critique; ``score_decoding`` (default: ``decoding`` with ``max_tokens=score_max_tokens``
    and ``stop=("\n",)``) the score, sampling like the critique on a retry. ``info["critique"]`` keeps the critique, ``info["raw"]`` the score answer. Components: ``rating``.
    """

    def __init__(
        self,
        client: JudgeClient,
        *,
        template: str = CRITIQUE_TEMPLATE,
        score_template: str = SCORE_TEMPLATE,
        pattern: str | re.Pattern[str] = CRITIQUE_SCORE_PATTERN,
        score_range: tuple[float, float] | None = (1.0, 10.0),
        decoding: Decoding | None = None,
        score_decoding: Decoding | None = None,
        score_max_tokens: int = 8,
        on_unparseable: OnUnparseable = "error",
        unparseable_retries: int = 2,
        retry_temperature: float = 1.0,
        partial_ok: bool = False,
        name: str = "judge_critique",
    ) -> None:
        self.client = client
        self.template = template
        self._fields = _template_fields(
            template, {"prompt", "response", "reference"}, "CritiqueJudge template"
        )
        self.score_template = score_template
        self.pattern = _compile(pattern, ["score"], "CritiqueJudge pattern")
        if score_range is not None and not score_range[0] <= score_range[1]:
            raise JudgeConfigError(f"score_range must be (low, high) with low ≤ high, got {score_range}")
        self.score_range = score_range
        self.decoding = _decoding(decoding)
        self.score_decoding = (
            _decoding(score_decoding)
            if score_decoding is not None
            else dataclasses.replace(self.decoding, max_tokens=score_max_tokens, stop=("\n",))
        )
        if self.score_decoding.endpoint != self.decoding.endpoint:
            raise JudgeConfigError("decoding and score_decoding must use the same endpoint")
        self.policy = _Policy.make(on_unparseable, unparseable_retries, retry_temperature)
        self.partial_ok = partial_ok
        self.name = self.__name__ = name

    async def _one(self, session: JudgeSession, s: Sample) -> RewardResult:
        first = self._judge_prompt(s)
        if isinstance(first, RewardResult):
            return first
        calls = _Calls()
        chat = self.decoding.endpoint == "chat"

        async def ask(d: Decoding) -> tuple[str, dict[str, Any]]:
            c1 = await session.generate(d, first)
            calls.add(c1)
            critique = c1.text
            # the score request samples like the critique did (same seed / temperature on a retry)
            sd = dataclasses.replace(self.score_decoding, temperature=d.temperature, seed=d.seed)
            if chat:
                msgs: list[dict[str, str]] = []
                if sd.system is not None:
                    msgs.append({"role": "system", "content": sd.system})
                msgs += [
                    {"role": "user", "content": first},
                    {"role": "assistant", "content": critique},
                    {"role": "user", "content": self.score_template},
                ]
                c2 = await session.generate(sd, msgs)
            else:
                c2 = await session.generate(sd, first + critique + self.score_template)
            calls.add(c2)
            return c2.text, {"critique": critique}

        extras: dict[str, Any] = {}
        try:
            out = await _ask_parsed(
                ask,
                lambda t: parse_score(t, self.pattern, score_range=self.score_range),
                self.decoding,
                self.policy,
                extras,
            )
        except JudgeRequestError as e:
            return _request_failed(e, {**calls.info(), **extras})
        info = {**calls.info(), **extras, "raw": out.raw}
        if out.failed_raw:
            info["unparseable_raw"] = list(out.failed_raw)
        if out.value is None:
            return _unparseable(self.policy, out.reason or "", info)
        return RewardResult(out.value, components={"rating": out.value}, info=info)


# ---------------------------------------------------------------------------------------------------------------
# a local llama-server (tests, benchmarks, local judging)
# ---------------------------------------------------------------------------------------------------------------
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def model_hash(model_dir: str | os.PathLike[str]) -> str:
    """The hash ``scripts/llama_server.sh`` keys a GGUF by: sha256 of the ``sha256sum`` lines of the files the
    converter reads (config, weights, tokenizer), in a fixed order."""
    d = Path(model_dir)
    lines = "".join(f"{hashlib.sha256((d / f).read_bytes()).hexdigest()}  {f}\n" for f in _MODEL_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class LlamaServerBuild:
    """A cached llama.cpp server build and the GGUF of one model (from the manifest the build script writes)."""

    binary: Path
    gguf: Path
    commit: str
    model_hash: str


def find_llama_server(
    model_dir: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> LlamaServerBuild | None:
    """The build ``scripts/llama_server.sh`` made for ``model_dir`` (default: the shipped tiny policy), or ``None``
    when it is missing or stale (the model's files changed since). ``cache_dir`` defaults to
    ``${TREEWARD_CACHE:-~/.cache/treeward}/llama-server``."""
    if cache_dir is None:
        root = os.environ.get("TREEWARD_CACHE") or str(Path.home() / ".cache" / "treeward")
        cache_dir = Path(root) / "llama-server"
    h = model_hash(model_dir if model_dir is not None else SHIPPED_POLICY)
    manifest = Path(cache_dir) / f"manifest-{h[:16]}.json"
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    b = LlamaServerBuild(Path(m["binary"]), Path(m["gguf"]), str(m["commit"]), str(m["model_hash"]))
    if b.model_hash != h or not os.access(b.binary, os.X_OK) or not b.gguf.is_file():
        return None
    return b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """llama.cpp's ``llama-server`` on a free loopback port, serving ``build.gguf`` under the name ``alias``.

    Sampling defaults are pinned so that a request's own fields decide (temperature 1, top-k/top-p/min-p off, no
    repeat penalty); ``-t 1`` because spinning worker threads slow it down on small machines; ``slots`` parallel
    sequences (also the most ``n`` a request may ask for). Use as a context manager; :attr:`base_url` is the
    ``/v1`` root. The process is stopped by its pid on exit.
    """

    def __init__(
        self,
        build: LlamaServerBuild,
        *,
        alias: str = "tiny",
        threads: int = 1,
        slots: int = 16,
        ctx: int = 4096,
        seed: int = 0,
        startup_timeout_s: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.build = build
        self.alias = alias
        self.args = [
            "-c", str(ctx), "-np", str(slots), "-kvu", "-t", str(threads), "-a", alias,
            "--temp", "1.0", "--top-k", "0", "--top-p", "1.0", "--min-p", "0.0", "--repeat-penalty", "1.0",
            "--seed", str(seed), *extra_args,
        ]  # fmt: skip
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        last = ""
        for _ in range(3):  # a port picked free can be taken before the server binds it: try another
            port = _free_port()
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server; closed in stop()
            cmd = [
                str(self.build.binary),
                "-m",
                str(self.build.gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            self._proc = subprocess.Popen(cmd + self.args, stdout=self._log, stderr=subprocess.STDOUT)
            if self._wait_healthy(port):
                self.port = port
                return self
            last = self._tail()
            self.stop()
        raise RuntimeError(f"llama-server did not come up; last log lines:\n{last}")

    def _wait_healthy(self, port: int) -> bool:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.startup_timeout_s
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        proc, self._proc, self.port = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
