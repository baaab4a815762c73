"""The sandbox runner and the rewards that execute model output (Python programs, SQL), with real processes.

Every test that runs something uses a deadline of at most 2 s and small limits, so hostile programs (fork bomb,
memory bomb, huge file) cannot hurt the shared machine. Elapsed times are compared with the deadline, with slack
for a loaded machine, never with an absolute speed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeward.rewards.base import Sample, Status
from treeward.rewards.code import CodeExecution, TestCase, extract_python, parse_tests
from treeward.rewards.sandbox import (
    ExecStatus,
    Limits,
    SandboxError,
    probe_isolation,
    python_for_sandbox,
    run_python,
    run_sandboxed,
)
from treeward.rewards.sql import (
    ReasoningSqlReward,
    SqlExecutionMatch,
    SqlNgram,
    SqlSchemaLinking,
    SqlSyntax,
    execute_queries,
    extract_sql,
    ngram_jaccard,
    schema_items,
    sql_is_valid,
)

SLACK_S = 1.5  # start-up, kill and clean-up on a loaded 2-core machine
IS_ROOT = os.geteuid() == 0
# the range run_sandboxed draws its fresh uids from (root only)
SANDBOX_UIDS = range(0x2000_0000, 0x7000_0000)


def live_uids_in_sandbox_range() -> set[int]:
    """Uids of live (non-zombie) processes in the sandbox uid range: should be empty after every run."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        if uid in SANDBOX_UIDS and fields["State"].split()[0] not in ("Z", "X"):
            found.add(uid)
    return found


needs_netns = pytest.mark.skipif(
    not probe_isolation().network, reason="no network namespace here: the sandbox cannot isolate the network"
)
needs_uid = pytest.mark.skipif(not IS_ROOT, reason="the fresh-uid checks need the tests to run as root")


# ============================================================================================== sandbox
def test_ok_run_reports_output_and_isolation_and_removes_its_directory():
    res = run_python("import os\nprint('hello')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))")
    assert res.status is ExecStatus.OK and res.exit_code == 0 and res.signal is None
    hello, cwd, listing = res.stdout.splitlines()
    assert hello == "hello"
    assert listing == "['main.py']"  # a fresh directory with only the program in it
    assert not os.path.exists(cwd)  # deleted afterwards
    assert res.isolation.network == probe_isolation().network
    if IS_ROOT:
        assert res.isolation.uid in SANDBOX_UIDS


def test_nonzero_exit_is_exec_error_with_stderr():
    res = run_python("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)")
    assert res.status is ExecStatus.EXEC_ERROR and res.exit_code == 3
    assert res.stderr.strip() == "boom"


def test_rlimits_are_applied_in_the_child():
    lim = Limits(wall_s=2.0, cpu_s=1.0, memory_mb=300, max_procs=7, file_size_mb=3, open_files=33)
    src = (
        "import resource as r\n"
        "for n in ('CPU', 'AS', 'NPROC', 'FSIZE', 'NOFILE', 'CORE'):\n"
        "    print(n, *r.getrlimit(getattr(r, 'RLIMIT_' + n)))\n"
    )
    res = run_python(src, limits=lim, site=False)
    got = {line.split()[0]: tuple(int(x) for x in line.split()[1:]) for line in res.stdout.splitlines()}
    mb = 1 << 20
    assert got["CPU"] == (1, 1)  # ceil(1.0) s, soft = hard: SIGKILL at the limit
    assert got["AS"] == (300 * mb, 300 * mb)
    assert got["FSIZE"] == (3 * mb, 3 * mb)
    assert got["NOFILE"] == (33, 33)
    assert got["CORE"] == (0, 0)
    if IS_ROOT or res.isolation.user_namespace:
        assert got["NPROC"] == (7, 7)  # a per-run uid / per-namespace count: the exact budget


def test_environment_is_clean():
    os.environ["TREEWARD_SECRET_FOR_TEST"] = "x"
    try:
        res = run_python("import os, json\nprint(json.dumps(dict(os.environ)))", site=False)
    finally:
        del os.environ["TREEWARD_SECRET_FOR_TEST"]
    env = json.loads(res.stdout)
    assert "TREEWARD_SECRET_FOR_TEST" not in env
    assert env["HOME"] == env["TMPDIR"]
    assert env["OMP_NUM_THREADS"] == "1"


def test_infinite_loop_is_killed_at_the_deadline():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", limits=Limits(wall_s=0.5), site=False)
    elapsed = time.monotonic() - t0
    assert res.status is ExecStatus.TIMEOUT and res.signal == 9 and res.exit_code is None
    assert 0.5 <= res.duration_s <= 0.5 + SLACK_S
    assert elapsed <= 0.5 + SLACK_S


@needs_uid
def test_grandchildren_die_at_the_deadline_even_after_setsid():
    # a background sleeper in the group, one that left the group with setsid(), then the program hangs
    src = (
        "import subprocess\n"
        "subprocess.Popen(['/bin/sleep', '60'])\n"
        "subprocess.Popen(['/bin/sleep', '60'], start_new_session=True)\n"
        "print('started', flush=True)\n"
        "while True:\n    pass\n"
    )
    res = run_python(src, limits=Limits(wall_s=0.8), site=False)
    assert res.status is ExecStatus.TIMEOUT and res.stdout.strip() == "started"
    assert res.isolation.uid not in live_uids_in_sandbox_range()
    assert res.duration_s <= 0.8 + SLACK_S


@needs_uid
def test_background_processes_die_when_the_program_exits():
    src = "import subprocess\nsubprocess.Popen(['/bin/sleep', '60'], start_new_session=True)\nprint('bye')"
    res = run_python(src, limits=Limits(wall_s=2.0), site=False)
    assert res.status is ExecStatus.OK and res.stdout.strip() == "bye"
    assert res.isolation.uid not in live_uids_in_sandbox_range()


def test_process_count_is_bounded_by_max_procs():
    # children sleep; the parent forks until EAGAIN and reports how many it got
    src = (
        "import os, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print(n)\n"
    )
    res = run_python(src, limits=Limits(wall_s=2.0, max_procs=6), site=False)
    assert res.status is ExecStatus.OK
    # RLIMIT_NPROC = 6 counts the program itself, so at most 5 children (fewer if the count was not exact)
    assert 1 <= int(res.stdout) <= 5


def test_fork_bomb_is_bounded_killed_and_leaves_nothing_behind():
    src = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    res = run_python(src, limits=Limits(wall_s=1.0, max_procs=8), site=False)
    assert res.status is ExecStatus.TIMEOUT
    assert time.monotonic() - t0 <= 1.0 + SLACK_S
    if IS_ROOT:
        assert live_uids_in_sandbox_range() == set()
    # the machine stays responsive: the next run starts and finishes normally
    after = run_python("print(1)", limits=Limits(wall_s=2.0), site=False)
    assert after.status is ExecStatus.OK and after.stdout.strip() == "1"


def test_memory_bomb_is_bounded():
    src = "chunks = []\nwhile True:\n    chunks.append(bytearray(10_000_000))"
    res = run_python(src, limits=Limits(wall_s=2.0, memory_mb=200), site=False)
    assert res.status is ExecStatus.EXEC_ERROR
    assert res.stderr.strip().endswith("MemoryError")


def test_huge_file_is_bounded_by_the_file_size_limit():
    src = (
        "import os\n"
        "f = open('big', 'wb')\n"
        "try:\n"
        "    while True:\n"
        "        f.write(b'x' * 1_000_000)\n"
        "        f.flush()\n"
        "except OSError as e:\n"
        "    print(e.errno, os.path.getsize('big'))\n"
    )
    res = run_python(src, limits=Limits(wall_s=2.0, file_size_mb=2), site=False)
    assert res.status is ExecStatus.OK
    code, size = map(int, res.stdout.split())
    assert code == errno.EFBIG
    assert size <= 2 * (1 << 20)  # never more than the limit


def test_output_is_capped():
    src = "import sys\nwhile True:\n    sys.stdout.write('y' * 10_000)"
    res = run_python(src, limits=Limits(wall_s=2.0, file_size_mb=1, output_bytes=1000), site=False)
    # stdout is a file: the file-size limit ends the program (EFBIG), the caller gets the first 1000 bytes
    assert res.status is ExecStatus.EXEC_ERROR
    assert res.stdout == "y" * 1000 and res.stdout_truncated
    assert res.duration_s <= 2.0


@needs_netns
def test_no_network_loopback_services_and_outside_addresses_unreachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        src = (
            "import socket\n"
            f"for addr in [('127.0.0.1', {port}), ('127.0.0.1', 1), ('192.0.2.1', 80)]:\n"
            "    s = socket.socket()\n"
            "    s.settimeout(1.0)\n"
            "    print(s.connect_ex(addr))\n"
        )
        res = run_python(src, limits=Limits(wall_s=2.0), site=False)
        # a listening port of the host, a closed port, and TEST-NET-1 (RFC 5737, never routed)
        assert res.stdout.split() == [str(errno.ENETUNREACH)] * 3
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing ever connected to the host's server
            server.accept()


def test_fallback_without_namespaces_sets_dead_proxies():
    res = run_sandboxed(
        [python_for_sandbox(), "-I", "-S", "-c", "import os; print(os.environ['https_proxy'])"], isolate=False
    )
    assert res.isolation.network is False and res.isolation.pid_namespace is False
    assert res.stdout.strip() == "http://127.0.0.1:9"


@needs_uid
def test_cannot_write_root_files_and_leftovers_in_tmp_are_removed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    name = f"treeward-test-leftover-{os.getpid()}"
    src = (
        f"open('/tmp/{name}', 'w').write('junk')\n"
        "try:\n"
        f"    open({str(target)!r}, 'a').write('x')\n"
        "except PermissionError:\n"
        "    print('denied')\n"
    )
    res = run_python(src, limits=Limits(wall_s=2.0), site=False)
    assert res.stdout.strip() == "denied"
    assert target.read_text() == "keep"
    assert not os.path.exists(f"/tmp/{name}")


def test_files_are_placed_read_only(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("payload")
    src = "print(open('data.txt').read(), open('note.txt').read())"
    res = run_python(src, files={"data.txt": data, "note.txt": "hi"}, site=False)
    assert res.stdout.split() == ["payload", "hi"]
    assert data.read_text() == "payload"
    with pytest.raises(SandboxError):
        run_python("pass", files={"../escape": "x"})


def test_concurrent_runs_are_independent():
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * 2)", site=False), range(3)))
    assert [r.stdout.strip() for r in results] == ["0", "2", "4"]
    if IS_ROOT:
        assert len({r.isolation.uid for r in results}) == 3


def test_missing_interpreter_is_a_sandbox_error():
    with pytest.raises(SandboxError):
        run_sandboxed(["/nonexistent/python", "-c", "pass"])
    with pytest.raises(SandboxError):
        run_sandboxed(["relative/python"])


def test_limits_are_validated():
    with pytest.raises(ValueError):
        Limits(wall_s=0)
    with pytest.raises(ValueError):
        Limits(max_procs=-1)


# ============================================================================================== code reward
def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


SUM_TESTS = [
    TestCase(stdin="1 2\n", expected_stdout="3\n"),
    TestCase(stdin="-5 5\n", expected_stdout="0"),
    TestCase(stdin="10 20\n", expected_stdout="30\n", name="big"),
]
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"


def code_sample(code_or_text: str, tests, *, raw: bool = False, partial: bool = False) -> Sample:
    return Sample(
        prompt="p", response=code_or_text if raw else fenced(code_or_text), reference=tests, partial=partial
    )


def test_code_correct_program_passes_every_test():
    (r,) = CodeExecution(timeout_s=2.0)([code_sample(SUM_OK, SUM_TESTS)])
    # 3 of 3 tests pass: 3 / 3 = 1.0
    assert r.status is Status.OK and r.score == 1.0
    assert r.components == {"test_0": 1.0, "test_1": 1.0, "big": 1.0}
    assert [t["verdict"] for t in r.info["tests"]] == ["pass", "pass", "pass"]


def test_code_wrong_program_scores_its_pass_rate():
    wrong = "a, b = map(int, input().split())\nprint(abs(a) + b)"
    (r,) = CodeExecution(timeout_s=2.0)([code_sample(wrong, SUM_TESTS)])
    # 1+2=3 ok; abs(-5)+5=10 != 0 wrong; 10+20=30 ok -> 2 / 3
    assert r.status is Status.OK and r.score == pytest.approx(2 / 3)
    assert r.components == {"test_0": 1.0, "test_1": 0.0, "big": 1.0}
    assert r.info["tests"][1]["verdict"] == "wrong_output"


def test_code_assert_tests_in_several_forms():
    prog = "def add(a, b):\n    return a + b"
    reward = CodeExecution(timeout_s=2.0)
    as_string = "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    as_dicts = [{"assert": "assert add(1, 2) == 3", "name": "small"}, {"assert": "assert add(2, 2) == 5"}]
    r1, r2 = reward([code_sample(prog, as_string), code_sample(prog, as_dicts)])
    assert r1.score == 1.0  # one script, passes
    # first assert holds, second (2+2 == 5) fails: 1 / 2
    assert r2.score == 0.5 and r2.components == {"small": 1.0, "test_1": 0.0}
    assert (
        r2.info["tests"][1]["verdict"] == "error" and "AssertionError" in r2.info["tests"][1]["stderr_tail"]
    )


def test_code_assert_tests_cannot_be_faked_by_exiting_early():
    cheat = "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0"
    (r,) = CodeExecution(timeout_s=2.0)([code_sample(cheat, "assert add(1, 2) == 3")])
    # the assertion fails, the hook turns the exit code into 0, but the end-of-script marker never printed
    assert r.score == 0.0
    assert r.info["tests"][0]["reason"] == "the test script did not run to its end"


def test_code_syntax_error_fails_every_test_after_one_run():
    broken = "a, b = map(int, input().split()\nprint(a + b)"
    t0 = time.monotonic()
    (r,) = CodeExecution(timeout_s=2.0)([code_sample(broken, SUM_TESTS)])
    # 0 of 3: 0.0; a compile error is the program's failure, a verdict, not a failed reward
    assert r.status is Status.OK and r.score == 0.0
    assert "SyntaxError" in r.info["compile_error"]
    assert [t["verdict"] for t in r.info["tests"]] == ["error", "error", "error"]
    assert "status" not in r.info["tests"][1]  # not run: the first run showed it does not compile
    assert time.monotonic() - t0 <= 2.0 + SLACK_S


def test_code_infinite_loop_is_a_timeout_within_the_deadline():
    loop = "while True:\n    pass"
    t0 = time.monotonic()
    (r,) = CodeExecution(timeout_s=0.5)([code_sample(loop, [TestCase(stdin="", expected_stdout="1")])])
    assert time.monotonic() - t0 <= 0.5 + SLACK_S
    # the only failure is a timeout: status timeout, score 0 / 1 = 0.0 (a timeout fails its test)
    assert r.status is Status.TIMEOUT and r.score == 0.0
    assert r.info["tests"][0]["verdict"] == "timeout"
    (r2,) = CodeExecution(timeout_s=0.5, timeout_is_failure=False)([code_sample(loop, [TestCase(stdin="")])])
    assert r2.status is Status.TIMEOUT and r2.score is None


def test_code_status_rule_for_mixed_failures():
    # loops forever on input 0, echoes otherwise
    prog = "x = int(input())\nwhile x == 0:\n    pass\nprint(x)"
    tests_timeout_only = [TestCase("1\n", "1"), TestCase("0\n", "0")]
    tests_mixed = [TestCase("1\n", "1"), TestCase("0\n", "0"), TestCase("2\n", "3")]
    r1, r2 = CodeExecution(timeout_s=0.5)(
        [code_sample(prog, tests_timeout_only), code_sample(prog, tests_mixed)]
    )
    # pass + timeout: 1 / 2 = 0.5, every failure a timeout -> status timeout
    assert r1.score == 0.5 and r1.status is Status.TIMEOUT
    # pass + timeout + wrong output: 1 / 3, not every failure a timeout -> status ok
    assert r2.score == pytest.approx(1 / 3) and r2.status is Status.OK


def test_code_total_budget_skips_the_rest():
    loop = "while True:\n    pass"
    tests = [TestCase(stdin=str(i)) for i in range(3)]
    t0 = time.monotonic()
    (r,) = CodeExecution(timeout_s=0.5, total_timeout_s=0.8)([code_sample(loop, tests)])
    # test 0 uses 0.5 s, test 1 gets the remaining ~0.3 s, test 2 is skipped
    assert time.monotonic() - t0 <= 0.8 + 2 * SLACK_S
    verdicts = [t["verdict"] for t in r.info["tests"]]
    assert verdicts[0] == "timeout" and verdicts[-1] == "skipped"
    assert r.status is Status.TIMEOUT and r.score == 0.0


def test_code_fork_bomb_fails_its_test_and_leaves_nothing_behind():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    (r,) = CodeExecution(timeout_s=1.0, max_procs=8)([code_sample(bomb, [TestCase(expected_stdout="1")])])
    assert time.monotonic() - t0 <= 1.0 + SLACK_S
    assert r.score == 0.0 and r.info["tests"][0]["verdict"] == "timeout"
    if IS_ROOT:
        assert live_uids_in_sandbox_range() == set()


def test_code_memory_bomb_and_huge_file_fail_quickly():
    mem = "x = []\nwhile True:\n    x.append(bytearray(10_000_000))"
    disk = "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 1_000_000)"
    reward = CodeExecution(timeout_s=2.0, memory_mb=200, file_size_mb=2)
    t0 = time.monotonic()
    r1, r2 = reward([code_sample(mem, [TestCase(expected_stdout="")]), code_sample(disk, [TestCase()])])
    assert time.monotonic() - t0 <= 2 * 2.0 + SLACK_S
    assert r1.score == 0.0 and "MemoryError" in r1.info["tests"][0]["stderr_tail"]
    assert r2.score == 0.0 and "File too large" in r2.info["tests"][0]["stderr_tail"]


@needs_netns
def test_code_network_access_fails_inside_the_sandbox():
    prog = (
        "import socket\n"
        "for addr in [('127.0.0.1', 1), ('192.0.2.1', 80)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=1.0)\n"
        "        print('connected')\n"
        "    except OSError as e:\n"
        "        print(e.errno)\n"
    )
    unreachable = f"{errno.ENETUNREACH}\n{errno.ENETUNREACH}"
    (r,) = CodeExecution(timeout_s=2.0)([code_sample(prog, [TestCase(expected_stdout=unreachable)])])
    assert r.score == 1.0  # both attempts: "Network is unreachable"


def test_code_statuses_without_a_score():
    reward = CodeExecution(timeout_s=1.0)
    no_code, no_tests, partial, bad_tests = reward(
        [
            code_sample("I think the answer is 3.", SUM_TESTS, raw=True),
            code_sample(SUM_OK, None),
            code_sample(SUM_OK, SUM_TESTS, partial=True),
            code_sample(SUM_OK, 42),
        ]
    )
    assert no_code.status is Status.PARSE_ERROR and no_code.score is None
    assert no_tests.status is Status.NOT_APPLICABLE and no_tests.score is None
    assert partial.status is Status.NOT_APPLICABLE and partial.score is None
    assert bad_tests.status is Status.NOT_APPLICABLE and "unreadable" in bad_tests.info["reason"]


def test_code_reward_is_picklable_with_a_stable_name():
    reward = CodeExecution(timeout_s=1.0, name="unit_tests")
    back = pickle.loads(pickle.dumps(reward))
    assert back.name == back.__name__ == "unit_tests"
    assert CodeExecution().__name__ == "code_execution"


def test_extract_python_and_parse_tests():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```\nnot python\n```"
    assert extract_python(text) == "print(2)\n"
    assert extract_python("```python\n\n```") is None
    assert parse_tests({"inputs": ["1 2", ["3", "4"]], "outputs": ["3", "7"]}) == [
        TestCase(stdin="1 2", expected_stdout="3"),
        TestCase(stdin="3\n4", expected_stdout="7"),
    ]
    assert parse_tests([{"input": "x", "output": "y", "name": "n"}]) == [TestCase("x", "y", name="n")]
    with pytest.raises(ValueError):
        parse_tests({"inputs": [], "outputs": [], "fn_name": "f"})


# ============================================================================================== SQL rewards
SCHEMA_SQL = """
CREATE TABLE dept(id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE emp(id INTEGER PRIMARY KEY, name TEXT, dept_id INTEGER REFERENCES dept(id), salary REAL);
INSERT INTO dept VALUES (1, 'eng'), (2, 'ops');
INSERT INTO emp VALUES (1, 'ada', 1, 120.0), (2, 'bob', 1, 90.0), (3, 'cy', 2, 70.0), (4, 'di', 2, 95.0);
"""


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sql") / "company.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_SQL)
    conn.commit()
    conn.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sql_sample(pred: str, gold: str, db: Path | None, *, wrap: bool = True) -> Sample:
    return Sample(
        prompt="q",
        response=f"```sql\n{pred}\n```" if wrap else pred,
        reference=gold,
        metadata={} if db is None else {"db_path": str(db)},
    )


GOLD_ENG = "SELECT e.name FROM emp AS e JOIN dept AS d ON e.dept_id = d.id WHERE d.name = 'eng'"


def test_sql_execution_right_and_wrong_queries(db):
    reward = SqlExecutionMatch(timeout_s=1.0)
    right = "SELECT name FROM emp WHERE dept_id IN (SELECT id FROM dept WHERE name = 'eng')"
    reordered = "SELECT name FROM emp WHERE dept_id = 1 ORDER BY name DESC"  # same rows, other order
    wrong = "SELECT name FROM emp WHERE salary > 90"
    r_right, r_order, r_wrong = reward([sql_sample(q, GOLD_ENG, db) for q in (right, reordered, wrong)])
    # gold rows {ada, bob}; the gold has no ORDER BY, so order is ignored
    assert r_right.score == 1.0 and r_right.components == {"execution": 1.0}
    assert r_order.score == 1.0
    # salary > 90: {ada, di} != {ada, bob}
    assert r_wrong.score == 0.0 and r_wrong.status is Status.OK


def test_sql_order_and_duplicates(db):
    reward = SqlExecutionMatch(timeout_s=1.0)
    gold_ordered = "SELECT name FROM emp ORDER BY salary DESC"
    r1, r2 = reward(
        [
            sql_sample("SELECT name FROM emp ORDER BY salary DESC", gold_ordered, db),
            sql_sample("SELECT name FROM emp ORDER BY salary ASC", gold_ordered, db),
        ]
    )
    assert r1.score == 1.0 and r2.score == 0.0  # gold has ORDER BY: order is compared
    (dup,) = reward([sql_sample("SELECT DISTINCT dept_id FROM emp", "SELECT dept_id FROM emp", db)])
    # gold (1, 1, 2, 2) vs pred (1, 2): equal as sets (BIRD), not as multisets (here)
    assert dup.score == 0.0


def test_sql_syntax_error_scores_zero_with_the_error(db):
    (r,) = SqlExecutionMatch(timeout_s=1.0)([sql_sample("SELEC name FROM emp", GOLD_ENG, db)])
    assert r.score == 0.0 and r.status is Status.OK
    assert "syntax error" in r.info["pred_error"]


@pytest.mark.parametrize(
    "attack",
    [
        "DROP TABLE emp",
        "DELETE FROM emp",
        "UPDATE emp SET salary = 0",
        "ATTACH DATABASE 'other.db' AS other",
        "PRAGMA writable_schema = 1",
        "SELECT 1; DROP TABLE emp",
        "VACUUM",
    ],
)
def test_sql_writes_are_refused_and_the_database_is_unchanged(db, attack):
    before = sha256(db)
    (r,) = SqlExecutionMatch(timeout_s=1.0)([sql_sample(attack, GOLD_ENG, db)])
    assert r.score == 0.0
    assert r.info["pred_status"] == "error"
    assert sha256(db) == before  # the original file is byte-identical


def test_sql_refusals_on_the_copy_name_the_authorizer(db, tmp_path):
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(db.read_bytes())
    results = execute_queries(
        copy,
        ["DROP TABLE emp", "INSERT INTO dept VALUES (3, 'x')", "SELECT count(*) FROM emp"],
        timeout_s=1.0,
    )
    assert [r.status for r in results] == ["error", "error", "ok"]
    assert all("not authorized" in (r.error or "") for r in results[:2])
    assert results[2].rows == ((4,),)  # the table is still there, with its 4 rows


def test_sql_long_query_is_stopped_within_the_deadline(db):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    t0 = time.monotonic()
    (r,) = SqlExecutionMatch(timeout_s=0.5)([sql_sample(endless, GOLD_ENG, db)])
    assert time.monotonic() - t0 <= 0.5 + SLACK_S
    # the predicted query timed out: it fails (0.0) and the status says why
    assert r.status is Status.TIMEOUT and r.score == 0.0
    assert r.info["pred_status"] == "timeout"


def test_sql_huge_result_is_capped_by_the_row_cap(db):
    huge = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000000) SELECT x FROM c"
    t0 = time.monotonic()
    (r,) = SqlExecutionMatch(timeout_s=2.0, max_rows=1000)([sql_sample(huge, GOLD_ENG, db)])
    assert time.monotonic() - t0 <= 2.0 + SLACK_S
    assert r.info["pred_truncated"] is True and r.info["pred_rows"] == 1000
    assert r.score == 0.0


def test_sql_gold_failure_and_missing_inputs_have_no_score(db, tmp_path):
    reward = SqlExecutionMatch(timeout_s=1.0)
    bad_gold, no_db, missing_db, no_sql, partial = reward(
        [
            sql_sample("SELECT 1", "SELECT nope FROM nowhere", db),
            sql_sample("SELECT 1", "SELECT 1", None),
            sql_sample("SELECT 1", "SELECT 1", tmp_path / "absent.sqlite"),
            sql_sample("I don't know.", "SELECT 1", db, wrap=False),
            Sample(prompt="q", response="```sql\nSELECT 1\n```", reference="SELECT 1", partial=True),
        ]
    )
    assert bad_gold.score is None and bad_gold.status is Status.EXEC_ERROR
    assert "gold query" in bad_gold.info["reason"]
    assert no_db.score is None and no_db.status is Status.NOT_APPLICABLE
    assert missing_db.score is None and missing_db.status is Status.NOT_APPLICABLE
    assert no_sql.score is None and no_sql.status is Status.PARSE_ERROR
    assert partial.score is None and partial.status is Status.NOT_APPLICABLE


def test_sql_syntax_reward_uses_sqlglot():
    assert sql_is_valid("SELECT a FROM t WHERE b > 1")
    assert sql_is_valid("WITH x AS (SELECT 1 AS a) SELECT a FROM x UNION SELECT 2")
    assert not sql_is_valid("SELEC a FROM t")
    assert not sql_is_valid("hello world")  # sqlglot reads this as an alias: not a query
    assert not sql_is_valid("SELECT 1; DROP TABLE t")  # two statements
    assert not sql_is_valid("DROP TABLE t")
    ok, bad = SqlSyntax()(
        [sql_sample("SELECT 1", "SELECT 1", None), sql_sample("SELECT FROM", "SELECT 1", None)]
    )
    assert ok.score == 1.0 and bad.score == 0.0


def test_schema_items_resolve_aliases_with_the_schema(db):
    from treeward.rewards.sql import db_schema

    schema = db_schema(db)
    assert schema_items(GOLD_ENG, schema) == {
        "emp",
        "dept",
        "emp.name",
        "emp.dept_id",
        "dept.id",
        "dept.name",
    }
    assert schema_items("SELECT name FROM emp WHERE dept_id = 1", schema) == {
        "emp",
        "emp.name",
        "emp.dept_id",
    }
    # a CTE is not a schema item; its source table and column are
    assert schema_items("WITH x AS (SELECT id FROM dept) SELECT id FROM x", schema) == {"dept", "dept.id"}
    assert schema_items("SELEC nonsense", schema) == set()


def test_schema_linking_reward_is_jaccard(db):
    (r,) = SqlSchemaLinking()([sql_sample("SELECT name FROM emp WHERE dept_id = 1", GOLD_ENG, db)])
    # pred {emp, emp.name, emp.dept_id} ⊂ gold {emp, dept, emp.name, emp.dept_id, dept.id, dept.name}: 3 / 6
    assert r.score == pytest.approx(0.5) and r.components == {"schema_linking": pytest.approx(0.5)}


def test_ngram_jaccard_by_hand():
    # pred bigrams: (select name) (name from) (from emp)                                  -> 3
    # gold bigrams: those 3 + (emp where) (where id) (id =) (= 1)                           -> 7
    # intersection 3, union 7
    assert ngram_jaccard("SELECT name FROM emp", "select  name\nFROM emp WHERE id = 1") == pytest.approx(
        3 / 7
    )
    # string literals keep their case: only the last bigrams (= 'Eng') and (= 'eng') differ: 6 shared, union 8
    assert ngram_jaccard(
        "SELECT a FROM t WHERE n = 'Eng'", "select a from t where n = 'eng'"
    ) == pytest.approx(6 / 8)
    (r,) = SqlNgram()([sql_sample("SELECT name FROM emp", "SELECT name FROM emp WHERE id = 1", None)])
    assert r.score == pytest.approx(3 / 7)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["SELECT", "a", "b", "FROM", "t", "WHERE", "=", "1", ",", "'x'"]), max_size=12),
    st.lists(st.sampled_from(["SELECT", "a", "b", "FROM", "t", "WHERE", "=", "1", ",", "'x'"]), max_size=12),
)
def test_ngram_jaccard_properties(xs, ys):
    a, b = " ".join(xs), " ".join(ys)
    v = ngram_jaccard(a, b)
    assert 0.0 <= v <= 1.0
    assert v == ngram_jaccard(b, a)  # symmetric
    assert ngram_jaccard(a, a) == 1.0  # identity


def test_reasoning_sql_combination_by_hand(db):
    reward = ReasoningSqlReward(timeout_s=1.0)
    gold = "SELECT name FROM emp WHERE id = 1"
    good = (
        "<reasoning>id 1 is ada</reasoning>\n<answer>```sql\nSELECT name FROM emp WHERE id = 1\n```</answer>"
    )
    partial_credit = "<reasoning>all names</reasoning><answer>SELECT name FROM emp</answer>"
    unformatted_error = "```sql\nSELECT nme FROM emp\n```"
    r_good, r_part, r_err = reward(
        [sql_sample(t, gold, db, wrap=False) for t in (good, partial_credit, unformatted_error)]
    )
    # identical query, right format: 3·1 + 1·1 + 1·1 + 1·1 + 1·1 = 7
    assert r_good.score == pytest.approx(7.0)
    # executes but 4 rows != 1: execution 0, syntax 1;
    # schema {emp, emp.name} vs {emp, emp.name, emp.id}: 2/3; bigrams 3 of 7 (see the n-gram test); format 1
    # 0 + 1 + 2/3 + 3/7 + 1 = 65/21
    assert r_part.components == pytest.approx(
        {"execution": 0.0, "syntax": 1.0, "schema_linking": 2 / 3, "ngram": 3 / 7, "format": 1.0}
    )
    assert r_part.score == pytest.approx(65 / 21)
    # unknown column: SQLite error -> execution 0, syntax 0; schema: "nme" unresolved, {emp, emp.nme}
    # vs {emp, emp.name, emp.id} -> 1/4; bigrams (select nme)(nme from)(from emp) vs 7 -> 1 shared of 9; no format
    # 0 + 0 + 1/4 + 1/9 + 0 = 13/36
    assert r_err.components["syntax"] == 0.0
    assert r_err.components["schema_linking"] == pytest.approx(1 / 4)
    assert r_err.components["ngram"] == pytest.approx(1 / 9)
    assert r_err.score == pytest.approx(13 / 36)


def test_extract_sql_forms():
    assert extract_sql("x\n```sql\nSELECT 1\n```\nthen\n```sql\nSELECT 2;\n```") == "SELECT 2;"
    assert extract_sql("<answer>```sql\nSELECT 3\n```</answer>") == "SELECT 3"
    assert extract_sql("<answer> SELECT 4 </answer>") == "SELECT 4"
    assert extract_sql("  select 5") == "select 5"
    assert extract_sql("no query here") is None


def test_sql_rewards_are_picklable_with_stable_names(db):
    for reward, name in [
        (SqlExecutionMatch(db_path=str(db)), "sql_execution"),
        (SqlSyntax(), "sql_syntax"),
        (SqlSchemaLinking(), "sql_schema_linking"),
        (SqlNgram(), "sql_ngram"),
        (ReasoningSqlReward(), "reasoning_sql"),
    ]:
        back = pickle.loads(pickle.dumps(reward))
        assert back.name == back.__name__ == name
