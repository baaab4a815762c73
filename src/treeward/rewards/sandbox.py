"""Run untrusted work (model-written programs, model-written SQL) in a child process with hard limits.

One implementation, used by the code-execution and SQL rewards. :func:`run_sandboxed` starts a small launcher
(``python -I -S -c``) in a new session; the launcher isolates itself, forks the work as a child, applies
``setrlimit`` limits and (as root) drops to a fresh unprivileged uid, then ``execve`` s the work. The parent keeps a
wall-clock deadline and at the deadline sends SIGKILL to the whole process group.

What a run guarantees on Linux when the launcher runs as **root** (or, for non-root users, when unprivileged user
namespaces are enabled); :class:`Isolation` on every result says which of these were actually applied:

- **deadline**: at ``Limits.wall_s`` the process group is killed with SIGKILL. The work runs as PID 1 of a new PID
  namespace, so when it dies the kernel kills every process left in that namespace, including grandchildren that
  called ``setsid()`` to leave the group. As root, the work also runs under a uid of its own, and the parent then
  kills any process still owned by that uid (``ExecResult.strays_killed`` counts them; it should stay 0).
- **resource limits** (``setrlimit`` in the child, before ``execve``): CPU seconds (SIGKILL at the limit),
  address space (a Python ``MemoryError``), processes + threads (``RLIMIT_NPROC``: a fork bomb gets ``EAGAIN``),
  size of any one written file (``EFBIG``; stdout and stderr are files too), open files, no core dumps.
  ``RLIMIT_NPROC`` is **not enforced for root**; that is why root runs the work under a fresh uid (or inside a
  user namespace for non-root users, where the count is per namespace).
- **no network**: the work runs in a new network namespace that has only a loopback interface, which is down.
  ``connect`` to any IP address fails at once with ``ENETUNREACH`` — 127.0.0.1 included: the host's loopback
  services are not reachable. Not covered: Unix-domain sockets that have a path in the filesystem (a network
  namespace does not isolate those; file permissions still apply, and the fresh uid owns no such socket).
- **files**: the work starts in a fresh temporary directory (deleted afterwards) with only the files given to it.
  As root the fresh uid cannot write anything owned by root (the repository, the original database); it can
  still create files in world-writable directories (``/tmp``, ``/dev/shm``, ``/var/tmp``): the top-level entries it
  leaves there are deleted after the run. The total disk it writes is bounded by the file-size limit per file and
  by the deadline, not by a quota.
- **output**: stdout and stderr go to files; ``Limits.output_bytes`` of each come back (``*_truncated`` says so);
  the file-size limit bounds what a program can write at all.
- **environment**: a clean one (``PATH``, ``HOME`` = the work directory, ``LANG``, one-thread BLAS settings).

**Non-root users**: the work runs as your own user (a user namespace maps no other uid), so it can read and write
whatever you can, the io files of the run included; only root gets the fresh-uid file protection above. Run
untrusted code as root (in a container) or as a dedicated user.

Weaker fallback, **non-root without user namespaces** (``Isolation.network`` is ``False``): there is no network
isolation at all. The proxy variables are set to a closed local port (``http://127.0.0.1:9``), which only stops
HTTP clients that honour them. A grandchild that calls ``setsid()`` escapes the group kill, and ``RLIMIT_NPROC``
counts every process of the user, so it is set to the user's current count plus ``Limits.max_procs``.

Never a security boundary against a determined kernel-level attacker: no seccomp filter, no read-only root file
system, no cgroup memory or disk quota. For hostile code at scale, put this behind a VM or a container runtime.
"""

from __future__ import annotations

import contextlib
import functools
import marshal
import math
import os
import pwd
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "ExecResult",
    "ExecStatus",
    "Isolation",
    "Limits",
    "SandboxError",
    "probe_isolation",
    "python_for_sandbox",
    "run_python",
    "run_sandboxed",
]

# A proxy that goes nowhere, for the fallback without a network namespace (port 9 is "discard", closed here).
_DEAD_PROXY = "http://127.0.0.1:9"
_MB = 1 << 20


class SandboxError(RuntimeError):
    """The sandbox could not run the work at all (the interpreter is missing, the launcher failed, ...).

    The work's own failures (a crash, a timeout) are never raised: they are an :class:`ExecResult` status.
    """


class ExecStatus(StrEnum):
    """How the work ended: exit code 0, the wall deadline, a non-zero exit, or a signal (a limit, a crash)."""

    OK = "ok"
    TIMEOUT = "timeout"
    EXEC_ERROR = "exec_error"
    KILLED = "killed"


@dataclass(frozen=True)
class Limits:
    """Limits of one run. Sizes in MiB; ``output_bytes`` of stdout and of stderr come back to the caller.

    ``cpu_s`` defaults to ``ceil(wall_s)`` (the CPU rlimit has whole-second resolution; SIGKILL one second later).
    ``max_procs`` counts processes and threads of the sandbox, the work itself included.
    """

    wall_s: float = 2.0
    cpu_s: float | None = None
    memory_mb: int = 512
    max_procs: int = 16
    file_size_mb: int = 16
    open_files: int = 64
    output_bytes: int = 64_000

    def __post_init__(self) -> None:
        for name in ("wall_s", "memory_mb", "max_procs", "file_size_mb", "open_files", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"Limits.cpu_s must be positive, got {self.cpu_s}")


@dataclass(frozen=True)
class Isolation:
    """What was actually applied to a run (see the module docstring for what each one means)."""

    network: bool = False  # a new, empty network namespace
    pid_namespace: bool = False  # the work is PID 1 of a new PID namespace: all of it dies with it
    user_namespace: bool = False  # non-root path: namespaces obtained through a user namespace
    uid: int | None = None  # the fresh unprivileged uid the work ran as (root only)
    notes: tuple[str, ...] = ()  # why a step was not applied


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one run. ``exit_code`` is set when the work exited, ``signal`` when a signal ended it;
    ``duration_s`` is wall time from start to the end of the run (deadline kill included)."""

    status: ExecStatus
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    isolation: Isolation = field(default_factory=Isolation)
    strays_killed: int = 0


# --------------------------------------------------------------------------------------------- the launcher
# Runs as `python -I -S -c _LAUNCHER <config>` in a new session. Standard library only, and few imports (start-up
# time is paid on every run): the config is ``marshal`` (written by the parent), the status file is "key=value"
# lines (parsed strictly by the parent: in the non-root fallback the work could overwrite it). It isolates itself
# (namespaces), forks the work, applies limits and the uid drop in the child and execs it; then waits and writes
# how the work ended. Failures before the exec come back through a close-on-exec pipe.
_LAUNCHER = r"""
import ctypes, marshal, os, resource, signal, sys
cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
if os.getppid() != cfg["ppid"]:
    os._exit(1)
report = {"network": False, "pid_namespace": False, "user_namespace": False, "notes": []}
NEWNET, NEWPID, NEWUSER = 0x40000000, 0x20000000, 0x10000000

def unshare(flags):
    if libc.unshare(flags) == 0:
        return True
    report["notes"].append("unshare(%#x) failed: %s" % (flags, os.strerror(ctypes.get_errno())))
    return False

uid, gid = os.getuid(), os.getgid()
if cfg["isolate"]:
    if uid == 0 and unshare(NEWNET | NEWPID):
        report.update(network=True, pid_namespace=True)
    elif unshare(NEWUSER | NEWNET | NEWPID):
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (uid, uid)),
                           ("/proc/self/gid_map", "%d %d 1" % (gid, gid))):
            with open(path, "w") as f:
                f.write(text)
        report.update(network=True, pid_namespace=True, user_namespace=True)

def user_tasks(u):
    n = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/status" % p) as f:
                lines = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(lines["Uid"].split()[0]) == u:
            n += int(lines["Threads"])
    return n

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(r)
        nproc = cfg["max_procs"]
        if cfg["uid"] is None and uid != 0 and not report["user_namespace"]:
            nproc += user_tasks(uid)
        for name, soft, hard in cfg["rlimits"] + [["RLIMIT_NPROC", nproc, nproc]]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.chdir(cfg["cwd"])
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:
        os.write(w, ("%s: %s" % (type(e).__name__, e)).encode()[:2000])
    os._exit(127)
os.close(w)
err = b""
while True:
    chunk = os.read(r, 4096)
    if not chunk:
        break
    err += chunk
_, status = os.waitpid(pid, 0)
if err:
    report["error"] = err.decode("utf-8", "replace")
elif os.WIFSIGNALED(status):
    report["signal"] = os.WTERMSIG(status)
else:
    report["exit_code"] = os.WEXITSTATUS(status)
lines = ["%s=%s" % (k, int(report[k])) for k in ("network", "pid_namespace", "user_namespace")]
lines += ["%s=%d" % (k, report[k]) for k in ("signal", "exit_code") if k in report]
lines += ["note=" + " ".join(n.split()) for n in report["notes"]]
if "error" in report:
    lines.append("error=" + " ".join(report["error"].split()))
with open(cfg["status"], "w") as f:
    f.write("\n".join(lines) + "\n")
"""

_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


def _fresh_uid() -> int:
    """An unprivileged uid that no account and no other run of this process uses (root only)."""
    rng = random.SystemRandom()
    with _uids_lock:
        while True:
            uid = rng.randrange(0x2000_0000, 0x7000_0000)
            if uid in _uids_in_use:
                continue
            try:
                pwd.getpwuid(uid)
            except KeyError:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uids_lock:
        _uids_in_use.discard(uid)


def _uid_of(pid: int) -> int | None:
    """The real uid of process ``pid``, or ``None`` when it is gone or a zombie (dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                    return None
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _pids_of_uid(uid: int) -> list[int]:
    """Live processes whose real uid is ``uid`` (a scan of /proc)."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and _uid_of(int(n)) == uid]


def _kill_uid(uid: int, *, patience_s: float = 2.0) -> int:
    """SIGKILL every process of ``uid`` until none is left (or ``patience_s`` runs out); returns how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + patience_s
    while True:
        pids = _pids_of_uid(uid)
        if not pids or time.monotonic() > deadline:
            return len(killed)
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)  # pins the process: the signal cannot reach a recycled pid
            except OSError:
                continue
            try:
                if _uid_of(pid) == uid:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed.add(pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.01)


def _remove_tree(path: Path) -> None:
    def onerror(func: Callable[[str], object], p: str, exc_info: object) -> None:
        # a program may leave a directory without write or search permission: open it up and retry
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:
        shutil.rmtree(path, onerror=onerror)


def _remove_owned(uid: int) -> None:
    """Delete the top-level entries that ``uid`` created in the world-writable temporary directories."""
    for d in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"}:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    _remove_tree(Path(e.path))
                else:
                    os.unlink(e.path)
            except OSError:
                continue


def _read_head(f: BinaryIO, n: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(n + 1)
    return data[:n].decode("utf-8", "replace"), len(data) > n


def _clean_env(work: Path, extra: Mapping[str, str] | None, network_isolated: bool) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # BLAS thread pools would spend RLIMIT_NPROC (threads count) before the program runs
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if not network_isolated:
        for k in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy"):
            env[k] = env[k.upper()] = _DEAD_PROXY
        env["no_proxy"] = env["NO_PROXY"] = ""
    env.update(extra or {})
    return env


def run_sandboxed(
    argv: Sequence[str],
    *,
    stdin: str | bytes = b"",
    files: Mapping[str, str | bytes | os.PathLike[str]] | None = None,
    limits: Limits = Limits(),
    env: Mapping[str, str] | None = None,
    isolate: bool = True,
) -> ExecResult:
    """Run ``argv`` (``argv[0]`` an absolute path) in a fresh temporary directory under ``limits``.

    ``files`` are placed in the work directory before the run, read-only: text or bytes are written; a path is
    copied, or, as root, hard-linked when the fresh uid cannot write it anyway (not writable by others). ``stdin`` is fed from a file. ``isolate=False``
    skips the namespaces (limits, session kill and the uid drop still apply); it exists for tests of the fallback.
    Raises :class:`SandboxError` only when the work could not be started at all.
    """
    if not argv or not os.path.isabs(argv[0]):
        raise SandboxError(f"argv[0] must be an absolute path, got {argv[:1]!r}")
    root = os.geteuid() == 0
    uid = _fresh_uid() if root else None
    base = Path(tempfile.mkdtemp(prefix="treeward-sbx-"))
    try:
        os.chmod(base, 0o711)  # the sandbox uid may pass through to its work directory, not list it
        work, io = base / "work", base / "io"
        work.mkdir(mode=0o700)
        io.mkdir(mode=0o700)
        for name, content in (files or {}).items():
            target = work / name
            if target.parent != work:
                raise SandboxError(f"file names must be plain names, got {name!r}")
            if isinstance(content, os.PathLike):
                _place(Path(content), target, shared=uid is not None)
            else:
                target.write_bytes(content.encode() if isinstance(content, str) else content)
                os.chmod(target, 0o444)
        if uid is not None:
            os.chown(work, uid, uid)
        (io / "stdin").write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
        # CPU soft = hard: SIGKILL at the limit (PID 1 of a namespace ignores SIGXCPU, the soft-limit signal)
        cpu = math.ceil(limits.cpu_s or limits.wall_s)
        rlimits = [
            ["RLIMIT_CPU", cpu, cpu],
            ["RLIMIT_AS", limits.memory_mb * _MB, limits.memory_mb * _MB],
            ["RLIMIT_FSIZE", limits.file_size_mb * _MB, limits.file_size_mb * _MB],
            ["RLIMIT_NOFILE", limits.open_files, limits.open_files],
            ["RLIMIT_CORE", 0, 0],
        ]
        cfg = {
            "argv": list(argv),
            "cwd": str(work),
            "env": _clean_env(work, env, network_isolated=isolate),
            "uid": uid,
            "rlimits": rlimits,
            "max_procs": limits.max_procs,
            "status": str(io / "status"),
            "isolate": isolate,
            "ppid": os.getpid(),
        }
        with (
            open(io / "stdin", "rb") as fin,
            open(io / "stdout", "w+b") as fout,
            open(io / "stderr", "w+b") as ferr,
        ):
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _LAUNCHER, marshal.dumps(cfg).hex()],
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=work,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                    start_new_session=True,
                )
            except OSError as e:
                raise SandboxError(f"cannot start the sandbox launcher: {e}") from e
            timed_out = not _wait_exit(proc, limits.wall_s - (time.monotonic() - t0))
            if timed_out and uid is not None:
                # kill the work first, so that the launcher reaps it and reports; then the group
                _kill_uid(uid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1.0)
            _kill_group(proc.pid)  # at the deadline, and after a normal exit: background children go too
            proc.wait()
            duration = time.monotonic() - t0
            strays = _kill_uid(uid) if uid is not None else 0
            stdout, out_trunc = _read_head(fout, limits.output_bytes)
            stderr, err_trunc = _read_head(ferr, limits.output_bytes)
        report = _read_report(io / "status")
        if report is None and not timed_out and proc.returncode >= 0:
            raise SandboxError(f"the sandbox launcher failed (exit {proc.returncode}): {stderr[-2000:]}")
        if report is not None and "error" in report:
            raise SandboxError(f"cannot start {argv[0]!r} in the sandbox: {report['error'][0]}")
        rep = report or {}
        iso = Isolation(
            network=rep.get("network") == ["1"],
            pid_namespace=rep.get("pid_namespace") == ["1"],
            user_namespace=rep.get("user_namespace") == ["1"],
            uid=uid,
            notes=tuple(rep.get("note", ())),
        )
        exit_code = _int(rep.get("exit_code"))
        sig = _int(rep.get("signal")) if report else (-proc.returncode if proc.returncode < 0 else None)
        if timed_out:
            status = ExecStatus.TIMEOUT
        elif sig is not None:
            status = ExecStatus.KILLED
        elif exit_code == 0:
            status = ExecStatus.OK
        else:
            status = ExecStatus.EXEC_ERROR
        return ExecResult(
            status=status,
            exit_code=None if timed_out else exit_code,
            signal=signal.SIGKILL.value if timed_out else sig,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            stdout_truncated=out_trunc,
            stderr_truncated=err_trunc,
            isolation=iso,
            strays_killed=strays,
        )
    finally:
        if uid is not None:
            _remove_owned(uid)
            _release_uid(uid)
        _remove_tree(base)


def _place(src: Path, target: Path, *, shared: bool) -> None:
    """Hard-link ``src`` into the work directory when the work cannot write it (it runs under a fresh uid and the
    file is neither its own nor writable by others), else copy it read-only."""
    st = src.stat()
    if shared and not st.st_mode & stat.S_IWOTH:
        try:
            os.link(src, target)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(src, target)
    os.chmod(target, 0o444)


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to exit; whether it did. Blocks on a pidfd (Linux 5.3+) rather than
    ``Popen.wait``'s polling loop, whose sleeps add up to 50 ms to every run."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        try:
            proc.wait(timeout=max(timeout_s, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], max(timeout_s, 0.0))
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _read_report(path: Path) -> dict[str, list[str]] | None:
    """The launcher's "key=value" lines (a key may repeat), or ``None`` when there is no report."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key, []).append(value)
    return out


def _int(values: list[str] | None) -> int | None:
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def python_for_sandbox() -> str:
    """An interpreter the sandbox can run: ``sys.executable`` when the sandbox uid can reach it, else the first
    system ``python3`` that works (as root the fresh uid cannot enter directories like ``/root``, where pyenv
    puts interpreters). Probed once per process; raises :class:`SandboxError` when none runs."""
    return _probe()[0]


def probe_isolation() -> Isolation:
    """The isolation this machine gives a run (from the same one-time probe)."""
    return _probe()[1]


@functools.cache
def _probe() -> tuple[str, Isolation]:
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable)]
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        candidates += [f"{d}/python{sys.version_info.major}.{sys.version_info.minor}", f"{d}/python3"]
    tried = []
    for c in dict.fromkeys(candidates):
        if not os.path.isfile(c):
            continue
        try:
            res = run_sandboxed([c, "-I", "-S", "-c", "pass"], limits=Limits(wall_s=10.0))
        except SandboxError as e:
            tried.append(f"{c}: {e}")
            continue
        if res.status is ExecStatus.OK:
            return c, res.isolation
        tried.append(f"{c}: {res.status.value} {res.stderr.strip()[-200:]}")
    raise SandboxError("no Python interpreter runs inside the sandbox; tried " + "; ".join(tried))


def run_python(
    source: str,
    *,
    stdin: str | bytes = b"",
    files: Mapping[str, str | bytes | os.PathLike[str]] | None = None,
    limits: Limits = Limits(),
    python: str | None = None,
    site: bool = True,
) -> ExecResult:
    """Run a Python program (``source``, saved as ``main.py``) in the sandbox with ``python -I`` (isolated mode:
    no user site, no ``PYTHON*`` variables); ``site=False`` also skips site-packages (faster start-up)."""
    exe = python or python_for_sandbox()
    args = [exe, "-I", "-B"] + ([] if site else ["-S"]) + ["main.py"]
    return run_sandboxed(args, stdin=stdin, files={**(files or {}), "main.py": source}, limits=limits)
