"""Text-to-SQL rewards: execution match on a real SQLite database, syntax validity, schema linking, n-gram overlap,
and their combination in Reasoning-SQL (Pourreza et al. 2025).

Queries never run in this process. :func:`execute_queries` copies the database once per reward call (SQLite's
backup API), places the copy in a sandbox's temporary directory (:mod:`treeward.rewards.sandbox`) and runs the
gold and the predicted query in a child process that opens it read-only (``file:...?mode=ro``) behind an
authorizer that allows reading only (no writes, ``ATTACH``, ``PRAGMA``, transactions), with a per-query deadline
(SQLite's progress handler), a row cap, a cap on the bytes kept and a wall deadline that kills the child.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treeward.rewards.base import RewardResult, Sample, Status
from treeward.rewards.sandbox import ExecStatus, Limits, SandboxError, python_for_sandbox, run_sandboxed

__all__ = [
    "QueryResult",
    "ReasoningSqlReward",
    "SqlExecutionMatch",
    "SqlNgram",
    "SqlSchemaLinking",
    "SqlSyntax",
    "db_schema",
    "execute_queries",
    "extract_sql",
    "ngram_jaccard",
    "results_match",
    "schema_items",
    "sql_is_valid",
]

_SQL_FENCE = re.compile(r"```[ \t]*sql[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
_STARTS_LIKE_SQL = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)
# Tokens for n-grams: quoted strings and identifiers whole, words, two-character operators, other symbols.
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|\w+|<=|>=|<>|!=|==|\|\||[^\s\w]")
_REASONING_FORMAT = r"^\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>\s*$"


# --------------------------------------------------------------------------------------------- extraction, parsing
def extract_sql(text: str) -> str | None:
    """The SQL of a response: the last ```sql block; else the last ``<answer>…</answer>`` (a fence inside it is
    unwrapped); else the whole text when it starts with ``SELECT`` or ``WITH``. ``None`` when there is none."""
    blocks = _SQL_FENCE.findall(text)
    if blocks:
        sql = blocks[-1]
    else:
        answers = _ANSWER.findall(text)
        if answers:
            sql = answers[-1]
            inner = _ANY_FENCE.findall(sql)
            if inner:
                sql = inner[-1]
        elif _STARTS_LIKE_SQL.match(text):
            sql = text
        else:
            return None
    sql = sql.strip()
    return sql or None


def _parse(sql: str) -> Any | None:
    """One sqlglot expression (sqlite dialect) for a single query, else ``None``."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        exprs = sqlglot.parse(sql, read="sqlite")
    except (SqlglotError, RecursionError):
        return None
    exprs = [e for e in exprs if e is not None]
    if len(exprs) != 1 or not isinstance(exprs[0], exp.Query):
        return None
    return exprs[0]


def sql_is_valid(sql: str) -> bool:
    """Whether sqlglot (sqlite dialect) reads ``sql`` as exactly one query (``SELECT``, a compound, ``WITH … SELECT``).

    sqlglot is lenient ("hello world" parses as an aliased column), hence the one-query requirement."""
    return _parse(sql) is not None


def _ordered(gold_sql: str) -> bool:
    """Whether the gold query's outermost query has an ``ORDER BY`` (then row order is compared)."""
    tree = _parse(gold_sql)
    if tree is None:
        return bool(re.search(r"\border\s+by\b", gold_sql, re.IGNORECASE))
    return tree.args.get("order") is not None


def schema_items(sql: str, schema: dict[str, dict[str, str]] | None = None) -> set[str]:
    """The tables and columns a query uses: ``"table"`` and ``"table.column"`` (lower case, aliases resolved).

    With ``schema`` ({table: {column: type}}, e.g. :func:`db_schema`) sqlglot's ``qualify`` attributes unqualified
    columns to their table; a column it cannot place is kept as its bare name. CTE and subquery names are not
    schema items. An unparseable query uses nothing (empty set)."""
    from sqlglot import exp
    from sqlglot.errors import SqlglotError
    from sqlglot.optimizer.qualify import qualify
    from sqlglot.optimizer.scope import traverse_scope

    tree = _parse(sql)
    if tree is None:
        return set()
    known: dict[str, object] | None = dict(schema) if schema is not None else None
    try:
        tree = qualify(
            tree,
            schema=known,
            dialect="sqlite",
            validate_qualify_columns=False,
            quote_identifiers=False,
            identify=False,
        )
        scopes = traverse_scope(tree)
    except (SqlglotError, RecursionError):
        # qualification failed (an ambiguity, an odd construct): names as written
        tables = {t.name.lower() for t in tree.find_all(exp.Table) if t.name}
        return tables | {c.name.lower() for c in tree.find_all(exp.Column) if c.name}
    items: set[str] = set()
    for scope in scopes:
        tables_here = {a: s for a, s in scope.sources.items() if isinstance(s, exp.Table)}
        items |= {s.name.lower() for s in tables_here.values()}
        for col in scope.columns:
            src = scope.sources.get(col.table)
            if src is None and not col.table and len(tables_here) == 1:
                src = next(iter(tables_here.values()))
            if isinstance(src, exp.Table):
                items.add(f"{src.name.lower()}.{col.name.lower()}")
            elif src is None:
                items.add(col.name.lower())
            # a column of a CTE or a subquery is resolved inside that scope
    return items


def _jaccard(a: set[Any], b: set[Any]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _tokens(sql: str) -> list[str]:
    return [t if t[0] in "'\"" else t.lower() for t in _TOKEN.findall(sql)]


def ngram_jaccard(pred: str, gold: str, *, n: int = 2) -> float:
    """Jaccard similarity of the sets of token n-grams of two queries.

    Tokens: string literals and quoted identifiers whole, words, operators and symbols; everything but string
    literals lower-cased, whitespace ignored. A query shorter than ``n`` tokens is one n-gram (itself)."""

    def grams(tokens: list[str]) -> set[tuple[str, ...]]:
        if 0 < len(tokens) < n:
            return {tuple(tokens)}
        return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}

    return _jaccard(grams(_tokens(pred)), grams(_tokens(gold)))


# --------------------------------------------------------------------------------------------- execution
@dataclass(frozen=True)
class QueryResult:
    """One query's outcome: ``status`` is ``ok``, ``error`` (SQLite refused or failed it; ``error`` says why) or
    ``timeout``; ``truncated`` when more than the row cap (or byte cap) came back and ``rows`` holds the head."""

    status: str
    rows: tuple[tuple[Hashable, ...], ...] = ()
    columns: tuple[str, ...] = ()
    truncated: bool = False
    error: str | None = None


# Runs inside the sandbox, standard library only. Reads {"db", "queries", "timeout_s", "max_rows", "max_bytes",
# "max_value_bytes"} on stdin; writes one JSON line per query as soon as it is done (a later crash keeps them).
_WORKER = r"""
import json, sqlite3, sys, time
cfg = json.load(sys.stdin)
conn = sqlite3.connect("file:%s?mode=ro" % cfg["db"], uri=True, isolation_level=None)
if hasattr(conn, "setlimit"):  # Python 3.11+
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, cfg["max_value_bytes"])
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
READ_ONLY = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
def authorizer(action, arg1, arg2, dbname, source):
    return sqlite3.SQLITE_OK if action in READ_ONLY else sqlite3.SQLITE_DENY
conn.set_authorizer(authorizer)
def cell(v):
    return {"$blob": v.hex()} if isinstance(v, bytes) else v
for sql in cfg["queries"]:
    deadline = time.monotonic() + cfg["timeout_s"]
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    out = {"status": "ok"}
    try:
        cur = conn.execute(sql)
        rows, size, truncated = [], 0, False
        while True:
            row = cur.fetchone()
            if row is None:
                break
            if len(rows) >= cfg["max_rows"]:
                truncated = True
                break
            size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
            if size > cfg["max_bytes"]:
                truncated = True
                break
            rows.append([cell(v) for v in row])
        out.update(rows=rows, columns=[d[0] for d in cur.description or ()], truncated=truncated)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as e:
        timed_out = isinstance(e, sqlite3.OperationalError) and "interrupt" in str(e)
        out = {"status": "timeout" if timed_out else "error", "error": "%s: %s" % (type(e).__name__, e)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


def _row(values: list[Any]) -> tuple[Hashable, ...]:
    return tuple(("blob", v["$blob"]) if isinstance(v, dict) else v for v in values)


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent, read-only copy of a SQLite database (the backup API; WAL content included)."""
    s = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    try:
        d = sqlite3.connect(dst)
        try:
            s.backup(d)
            d.execute("PRAGMA journal_mode=DELETE")
        finally:
            d.close()
    finally:
        s.close()
    dst.chmod(0o444)


@contextmanager
def _db_copies(paths: set[str]) -> Iterator[dict[str, Path]]:
    """One read-only copy of each database for the duration of a reward call, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="treeward-sqldb-") as d:
        out = {}
        for i, p in enumerate(sorted(paths)):
            if not Path(p).is_file():
                continue
            out[p] = Path(d) / f"db{i}.sqlite"
            _copy_db(Path(p), out[p])
        yield out


def execute_queries(
    db_copy: str | Path,
    queries: Sequence[str],
    *,
    timeout_s: float = 5.0,
    max_rows: int = 10_000,
    max_bytes: int = 8_000_000,
    memory_mb: int = 512,
    python: str | None = None,
) -> list[QueryResult]:
    """Run ``queries`` in order on a database **copy** in one sandboxed child; one result per query.

    Each query has ``timeout_s`` (progress handler); the child has a wall deadline of
    ``len(queries) * timeout_s + 2`` s. Queries after a child crash or kill are ``error`` results naming it.
    Raises :class:`~treeward.rewards.sandbox.SandboxError` when the child cannot start."""
    cfg = {
        "db": "db.sqlite",
        "queries": list(queries),
        "timeout_s": timeout_s,
        "max_rows": max_rows,
        "max_bytes": max_bytes,
        "max_value_bytes": min(max_bytes, 1_000_000_000),
    }
    out_bytes = 4 * max_bytes + 1_000_000  # JSON of the capped rows (blobs double in hex)
    limits = Limits(
        wall_s=len(queries) * timeout_s + 2.0,
        memory_mb=memory_mb,
        file_size_mb=max(16, out_bytes * len(queries) // (1 << 20) + 1),
        output_bytes=out_bytes * len(queries),
        max_procs=4,
    )
    res = run_sandboxed(
        [python or python_for_sandbox(), "-I", "-S", "worker.py"],
        stdin=json.dumps(cfg),
        files={"worker.py": _WORKER, "db.sqlite": Path(db_copy)},
        limits=limits,
    )
    results: list[QueryResult] = []
    for line in res.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            break  # the last line was cut by a kill
        results.append(
            QueryResult(
                status=d["status"],
                rows=tuple(_row(r) for r in d.get("rows", ())),
                columns=tuple(d.get("columns", ())),
                truncated=bool(d.get("truncated", False)),
                error=d.get("error"),
            )
        )
    if len(results) < len(queries):
        if res.status is ExecStatus.TIMEOUT:
            why = QueryResult("timeout", error=f"killed at the sandbox deadline ({limits.wall_s:.1f} s)")
        else:
            tail = res.stderr.strip().splitlines()[-1:] or [f"{res.status.value}, signal {res.signal}"]
            why = QueryResult("error", error=f"the query child died: {tail[0]}")
        results += [why] * (len(queries) - len(results))
    return results


def results_match(pred: QueryResult, gold: QueryResult, *, ordered: bool) -> bool:
    """Execution match: same rows as multisets (or as sequences when ``ordered``); column names are ignored, the
    order of columns is not. Both must be complete (``ok`` and not truncated)."""
    if pred.status != "ok" or gold.status != "ok" or pred.truncated or gold.truncated:
        return False
    if ordered:
        return pred.rows == gold.rows
    return Counter(pred.rows) == Counter(gold.rows)


def db_schema(db_path: str | Path) -> dict[str, dict[str, str]]:
    """``{table: {column: declared type}}`` of a SQLite database (lower-case names), read-only."""
    schema: dict[str, dict[str, str]] = {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        ]
        for t in tables:
            cols = conn.execute("SELECT name, type FROM pragma_table_info(?)", (t,)).fetchall()
            schema[t.lower()] = {c.lower(): (ty or "") for c, ty in cols}
    finally:
        conn.close()
    return schema


# --------------------------------------------------------------------------------------------- rewards
@dataclass(frozen=True)
class _Inputs:
    pred: str
    gold: str
    db: str | None


def _inputs(sample: Sample, default_db: str | None, *, need_db: bool) -> _Inputs | RewardResult:
    """Predicted SQL, gold SQL and database of a sample, or the result that says why there are none.

    The gold query is ``Sample.reference`` (a string, or a mapping with ``"sql"`` and optional ``"db_path"``);
    the database is ``reference["db_path"]``, else ``Sample.metadata["db_path"]``, else the reward's ``db_path``."""
    if sample.partial:
        return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "partial response"})
    ref = sample.reference
    db = sample.metadata.get("db_path", default_db)
    if isinstance(ref, dict):
        db = ref.get("db_path", db)
        ref = ref.get("sql")
    if not isinstance(ref, str) or not ref.strip():
        return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no gold SQL"})
    if need_db and db is None:
        return RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "no database"})
    pred = extract_sql(sample.response)
    if pred is None:
        return RewardResult(None, Status.PARSE_ERROR, info={"reason": "no SQL in the response"})
    return _Inputs(pred=pred, gold=ref, db=None if db is None else str(db))


@dataclass(frozen=True)
class _Execution:
    """Execution verdict of one sample, shared by the execution-based rewards."""

    match: float | None  # None when it cannot be decided (see result)
    executes: float  # the predicted query ran (ok or timeout) rather than failing
    pred_timeout: bool
    result: RewardResult | None  # set when the sample cannot be scored
    info: dict[str, Any]


class _Executor:
    """Runs gold and predicted queries of a batch in sandboxes (database copies made once per call)."""

    def __init__(
        self, timeout_s: float, max_rows: int, max_workers: int, memory_mb: int, python: str | None
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_workers = max_workers
        self.memory_mb = memory_mb
        self.python = python

    def run(self, jobs: Sequence[_Inputs | None]) -> list[_Execution | None]:
        dbs = {j.db for j in jobs if j is not None and j.db is not None}
        with _db_copies(dbs) as copies:

            def one(j: _Inputs | None) -> _Execution | None:
                return None if j is None else self._one(j, copies.get(j.db or ""))

            if self.max_workers == 1 or len(jobs) <= 1:
                return [one(j) for j in jobs]
            with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
                return list(pool.map(one, jobs))

    def _one(self, j: _Inputs, copy: Path | None) -> _Execution:
        if copy is None:
            res = RewardResult(None, Status.NOT_APPLICABLE, info={"reason": f"database not found: {j.db}"})
            return _Execution(None, 0.0, False, res, {})
        try:
            gold, pred = execute_queries(
                copy,
                [j.gold, j.pred],
                timeout_s=self.timeout_s,
                max_rows=self.max_rows,
                memory_mb=self.memory_mb,
                python=self.python,
            )
        except SandboxError as e:
            res = RewardResult(None, Status.EXEC_ERROR, info={"reason": f"sandbox: {e}"})
            return _Execution(None, 0.0, False, res, {})
        info: dict[str, Any] = {
            "pred_status": pred.status,
            "gold_status": gold.status,
            "pred_rows": len(pred.rows),
            "gold_rows": len(gold.rows),
            "pred_truncated": pred.truncated,
        }
        if pred.error:
            info["pred_error"] = pred.error
        if gold.status != "ok" or gold.truncated:
            why = gold.error or f"the gold result has more than {self.max_rows} rows (raise max_rows)"
            st = Status.TIMEOUT if gold.status == "timeout" else Status.EXEC_ERROR
            res = RewardResult(None, st, info={**info, "reason": f"gold query: {why}"})
            return _Execution(None, 0.0, False, res, info)
        match = float(results_match(pred, gold, ordered=_ordered(j.gold)))
        executes = float(pred.status in ("ok", "timeout"))
        return _Execution(match, executes, pred.status == "timeout", None, info)


def _status(pred_timeout: bool, timeout_is_failure: bool, score: float) -> tuple[Status, float | None]:
    if not pred_timeout:
        return Status.OK, score
    return Status.TIMEOUT, (score if timeout_is_failure else None)


class SqlExecutionMatch:
    """Execution accuracy: 1.0 when the predicted query returns the gold query's rows, else 0.0.

    The execution-accuracy (EX) metric of Spider (Yu et al. 2018) and BIRD (Li et al. 2023, "Can LLM Already
    Serve as A Database Interface? A BIg Bench for Large-Scale Database Grounded Text-to-SQLs"), used as the
    outcome reward of Reasoning-SQL. Formula: ``score = [rows(pred) == rows(gold)]`` on the sample's database,
    rows compared as multisets (as sequences when the gold's outermost query has ``ORDER BY``); column names
    ignored. Departures: BIRD compares *sets* of rows (duplicates ignored); this compares multisets. A predicted
    query that fails scores 0.0 (status ``ok``, the error in ``info``). One that times out scores 0.0 with status
    ``timeout`` (``None`` with ``timeout_is_failure=False``). A gold query that fails, times out or exceeds
    ``max_rows`` gives ``None`` (``exec_error`` / ``timeout``): the reference is at fault. Sample inputs: see
    ``Sample.reference`` / ``metadata["db_path"]`` in the module; the SQL is taken by :func:`extract_sql`.
    """

    def __init__(
        self,
        *,
        db_path: str | None = None,
        timeout_s: float = 5.0,
        max_rows: int = 10_000,
        timeout_is_failure: bool = True,
        max_workers: int = 2,
        memory_mb: int = 512,
        python: str | None = None,
        name: str = "sql_execution",
    ) -> None:
        self.db_path = db_path
        self.timeout_is_failure = timeout_is_failure
        self.executor = _Executor(timeout_s, max_rows, max_workers, memory_mb, python)
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        prepared = [_inputs(s, self.db_path, need_db=True) for s in samples]
        jobs = [p if isinstance(p, _Inputs) else None for p in prepared]
        out = []
        for p, ex in zip(prepared, self.executor.run(jobs), strict=True):
            if isinstance(p, RewardResult):
                out.append(p)
                continue
            assert ex is not None
            if ex.result is not None:
                out.append(ex.result)
                continue
            assert ex.match is not None
            status, score = _status(ex.pred_timeout, self.timeout_is_failure, ex.match)
            out.append(RewardResult(score, status, components={"execution": ex.match}, info=ex.info))
        return out


class SqlSyntax:
    """Syntax validity: 1.0 when sqlglot (sqlite dialect) reads the predicted SQL as exactly one query, else 0.0.

    A database-free stand-in for the syntax-check reward of Reasoning-SQL (Pourreza et al. 2025), which gives
    1 when the query *executes* without error; :class:`ReasoningSqlReward` uses that execution-based check.
    Departure: sqlglot is more lenient than SQLite (it accepts unknown functions and columns) and stricter on some
    SQLite-only syntax. No SQL in the response → ``parse_error``, ``None``.
    """

    def __init__(self, *, name: str = "sql_syntax") -> None:
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            if s.partial:
                out.append(RewardResult(None, Status.NOT_APPLICABLE, info={"reason": "partial response"}))
                continue
            sql = extract_sql(s.response)
            if sql is None:
                out.append(RewardResult(None, Status.PARSE_ERROR, info={"reason": "no SQL in the response"}))
                continue
            ok = float(sql_is_valid(sql))
            out.append(RewardResult(ok, components={"syntax": ok}))
        return out


class SqlSchemaLinking:
    """Schema-linking reward of Reasoning-SQL (Pourreza et al. 2025): Jaccard similarity of the schema items used.

    Formula: ``|S(pred) ∩ S(gold)| / |S(pred) ∪ S(gold)|`` where ``S(q)`` is :func:`schema_items` (tables and
    ``table.column`` names, aliases resolved, with the database schema when a database is given); 1.0 when both
    use nothing. A predicted query sqlglot cannot read uses nothing (score 0.0 unless the gold uses nothing).
    Departure: items come from sqlglot's qualification; the paper does not say how it resolves them.
    """

    def __init__(self, *, db_path: str | None = None, name: str = "sql_schema_linking") -> None:
        self.db_path = db_path
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        schemas: dict[str, dict[str, dict[str, str]]] = {}
        for s in samples:
            p = _inputs(s, self.db_path, need_db=False)
            if isinstance(p, RewardResult):
                out.append(p)
                continue
            schema = None
            if p.db is not None and Path(p.db).is_file():
                if p.db not in schemas:
                    schemas[p.db] = db_schema(p.db)
                schema = schemas[p.db]
            v = _jaccard(schema_items(p.pred, schema), schema_items(p.gold, schema))
            out.append(RewardResult(v, components={"schema_linking": v}))
        return out


class SqlNgram:
    """N-gram similarity reward of Reasoning-SQL (Pourreza et al. 2025): Jaccard of token n-grams vs the gold.

    Formula: :func:`ngram_jaccard` (``n=2`` by default, the bigram setting reported for the paper). Departure: the
    tokenisation (literals whole, case-folded keywords) is this library's.
    """

    def __init__(self, *, n: int = 2, name: str = "sql_ngram") -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            p = _inputs(s, None, need_db=False)
            if isinstance(p, RewardResult):
                out.append(p)
                continue
            v = ngram_jaccard(p.pred, p.gold, n=self.n)
            out.append(RewardResult(v, components={"ngram": v}))
        return out


class ReasoningSqlReward:
    """The partial-reward sum of Reasoning-SQL (Pourreza et al. 2025, "Reasoning-SQL: Reinforcement Learning with
    SQL Tailored Partial Rewards for Reasoning-Enhanced Text-to-SQL").

    Formula: ``score = w_ex·R_ex + w_syn·R_syn + w_sl·R_sl + w_ng·R_ng + w_fmt·R_fmt`` with
    ``R_ex`` execution match (:class:`SqlExecutionMatch`), ``R_syn`` 1 when the predicted query executes without
    an SQLite error (a timeout counts as executing), ``R_sl`` schema-linking Jaccard, ``R_ng`` bigram Jaccard,
    ``R_fmt`` 1 when the response matches ``format_pattern`` (``<reasoning>…</reasoning><answer>…</answer>``).
    Defaults ``w = (3, 1, 1, 1, 1)``: execution 3 and the partial rewards 1 each, as in the paper and in a
    re-implementation we read; the format weight is not confirmed from the paper text. ``components`` holds the
    unweighted terms; ``info["weights"]`` the weights.

    Departures: the paper's LLM-as-a-judge reward (AI feedback) is not included here (it needs a model; add it
    with a weight through composition). Status rules are those of :class:`SqlExecutionMatch` (no SQL →
    ``parse_error``; gold failure → ``None``; a predicted timeout → status ``timeout``, score kept unless
    ``timeout_is_failure=False``).
    """

    def __init__(
        self,
        *,
        db_path: str | None = None,
        execution_weight: float = 3.0,
        syntax_weight: float = 1.0,
        schema_weight: float = 1.0,
        ngram_weight: float = 1.0,
        format_weight: float = 1.0,
        format_pattern: str = _REASONING_FORMAT,
        n: int = 2,
        timeout_s: float = 5.0,
        max_rows: int = 10_000,
        timeout_is_failure: bool = True,
        max_workers: int = 2,
        memory_mb: int = 512,
        python: str | None = None,
        name: str = "reasoning_sql",
    ) -> None:
        self.db_path = db_path
        self.weights = {
            "execution": execution_weight,
            "syntax": syntax_weight,
            "schema_linking": schema_weight,
            "ngram": ngram_weight,
            "format": format_weight,
        }
        self.format_pattern = format_pattern
        self.n = n
        self.timeout_is_failure = timeout_is_failure
        self.executor = _Executor(timeout_s, max_rows, max_workers, memory_mb, python)
        self.name = name
        self.__name__ = name

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        prepared = [_inputs(s, self.db_path, need_db=True) for s in samples]
        jobs = [p if isinstance(p, _Inputs) else None for p in prepared]
        schemas: dict[str, dict[str, dict[str, str]]] = {}
        fmt = re.compile(self.format_pattern, re.DOTALL)
        out = []
        for s, p, ex in zip(samples, prepared, self.executor.run(jobs), strict=True):
            if isinstance(p, RewardResult):
                out.append(p)
                continue
            assert ex is not None
            if ex.result is not None:
                out.append(ex.result)
                continue
            assert ex.match is not None and p.db is not None
            if p.db not in schemas:
                schemas[p.db] = db_schema(p.db)
            terms = {
                "execution": ex.match,
                "syntax": ex.executes,
                "schema_linking": _jaccard(
                    schema_items(p.pred, schemas[p.db]), schema_items(p.gold, schemas[p.db])
                ),
                "ngram": ngram_jaccard(p.pred, p.gold, n=self.n),
                "format": float(fmt.match(s.response) is not None),
            }
            total = sum(self.weights[k] * v for k, v in terms.items())
            status, score = _status(ex.pred_timeout, self.timeout_is_failure, total)
            out.append(
                RewardResult(score, status, components=terms, info={**ex.info, "weights": self.weights})
            )
        return out
