"""Run untrusted, model-written Python programs in isolation: bubblewrap namespaces + resource limits.

The code verifier (``r1kit.rewards.code``) turns a completion into a program with its tests and runs
it here, once per completion, thousands of times per RL step. ``Sandbox.run`` runs one program;
``SandboxPool.map`` runs many in parallel with back-pressure.

Threat model
------------
*Adversary.* Programs written by a policy model during RL or evaluation: buggy (infinite loops,
memory or output blow-ups, fork loops, segfaults through ``ctypes``) or reward-hacking (reading the
the user's files or secrets, killing the grader, editing files, phoning home, leaving a process behind
to interfere with later runs). Not in scope: programs crafted by a human to exploit the kernel
(the sandbox shares the host kernel), timing side channels, and a program that inspects the grading
harness's own interpreter (frames, ``gc``) to forge its test report; run a VM or gVisor for those.

*Protected.* The host file system and the files of the user running r1kit, the parent's
environment (API keys), the network, the grader process and the other sandboxes, and the machine's
CPU, memory, process table and disk.

*Mechanisms, bubblewrap backend (``backend="bwrap"``, preferred).* ``bwrap`` (Debian package
``bubblewrap``, installed by ``scripts/setup.d/sandbox.sh``) puts the program in new user, pid,
network, ipc, uts and cgroup namespaces (``--unshare-all``): no network interfaces but a downed
loopback, so no connection leaves, not even to the host's 127.0.0.1; only the program's own
processes are visible or signalable; ``--disable-userns`` stops nested namespaces. The file system is
an empty read-only root with ``/usr`` (and the interpreter's prefix when outside ``/usr``) bound
read-only, a private ``/proc``, a read-only minimal ``/dev``, and one fresh writable directory,
``/work``, created per run and deleted after it. ``/home``, ``/root``, ``/etc``, ``/tmp`` and the
repository do not exist inside. When r1kit runs as root, each run also gets its own unprivileged uid
(a free slot in a private range), so kernel checks apply: ``RLIMIT_NPROC`` is not enforced for uid 0,
and the uid cannot read root-only files nor signal other users' processes.

*Mechanisms, both backends.* The child starts from a clean environment (no parent variables) in a
new session (``start_new_session``); a small runner sets hard ``setrlimit`` limits before the
program's first line: CPU seconds, address space, processes/threads, file size (stdout and stderr
are files, so this caps output), open files, and no core dumps. The parent waits ``wall_s``, then
SIGKILLs the process group; under bwrap the namespace's init dies with it (``--die-with-parent``),
and the kernel kills every process in the namespace (within milliseconds, asynchronously); in
the fallback, when running as root, every process left with the run's uid is killed before ``run``
returns. Outputs are read back capped at ``output_bytes``; a cut stream is named in
``ExecResult.truncated``, never passed on silently.

*Fallback (``backend="rlimit"``).* Where bwrap is missing or fails to start, programs run with the
resource limits, clean environment, process-group kill and (as root) a private uid, but without
namespaces: the network and world-readable files are reachable, and world-writable directories
(``/tmp``) writable. r1kit warns loudly
(``SandboxWarning`` and a log line) each time a ``Sandbox`` is built on this backend. Run as a
normal user there, background children that call ``setsid`` can outlive the run (nothing
identifies them) and the parent's ``/proc/<pid>/environ`` is readable; ``RLIMIT_NPROC`` then counts
all of the user's processes, so forking usually fails outright.

Source of the bwrap flags: bubblewrap(1) (0.8.0); limits: setrlimit(2).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from itertools import repeat
from typing import Iterable, Iterator

from r1kit.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "bwrap", "rlimit")

# Moves the side channel to fd 3, closes any other inherited fd (a directory fd would let
# openat(fd, "..") walk the host tree), sets hard limits, then runs main.py in a fresh namespace.
_RUNNER = """
import os, resource, sys
cpu, mem, nproc, fsize, nofile, chan = map(int, sys.argv[1:7])
if chan != 3:
    os.dup2(chan, 3)
os.closerange(4, 2**31 - 1)
for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                        (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
                        (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(res, (soft, hard))
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    code = compile(f.read(), "main.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

_UID_SLOTS = 1000


class SandboxWarning(RuntimeWarning):
    """Programs will run without namespace isolation (bubblewrap missing or failing to start)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. All hard: the program cannot raise them.

    Attributes:
        wall_s: wall-clock seconds before the whole process group is SIGKILLed.
        cpu_s: CPU seconds per process (RLIMIT_CPU; SIGXCPU, then SIGKILL one second later).
        memory_mb: address space per process in MiB (RLIMIT_AS); allocations past it fail.
        nproc: processes + threads (RLIMIT_NPROC), counted in the sandbox's user namespace (under
            bwrap its init counts as one). The kernel bounds memory per process, not per run:
            a run can hold up to ``nproc * memory_mb`` MiB, a pool ``workers`` times that; lower
            these on small machines.
        fsize_mb: largest file the program may write, in MiB (RLIMIT_FSIZE); stdout and stderr
            are files, so this is also the output cap; reaching it gives status ``"output_limit"``.
        nofile: open file descriptors (RLIMIT_NOFILE).
        output_bytes: bytes of stdout, stderr and the side channel kept in ``ExecResult``; a stream
            longer than that is cut and named in ``ExecResult.truncated``.
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    nproc: int = 8
    fsize_mb: int = 8
    nofile: int = 64
    output_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ConfigError(f"sandbox limit {f.name}={getattr(self, f.name)!r} must be > 0")


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one run.

    Attributes:
        status: ``"ok"`` (exit 0), ``"error"`` (non-zero exit), ``"timeout"`` (wall or CPU limit),
            ``"output_limit"`` (a file or stream reached ``fsize_mb``), ``"crashed"`` (killed by a
            signal, e.g. SIGSEGV), ``"sandbox_error"`` (bwrap failed to start the program).
        returncode: exit status (negative: signal number), ``None`` after a wall time-out.
        stdout: the first ``output_bytes`` of stdout, decoded as UTF-8 with replacement.
        stderr: the same for stderr.
        channel: the same for what the program wrote to file descriptor 3.
        wall_s: seconds from start to the end of clean-up.
        backend: ``"bwrap"`` or ``"rlimit"``.
        truncated: the streams, of ``("stdout", "stderr", "channel")``, that held more than
            ``output_bytes`` and were cut to it; empty when all came back whole. A consumer of a cut
            stream must not grade it as if it were complete (``status`` stays the exit status).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    channel: str
    wall_s: float
    backend: str
    truncated: tuple[str, ...] = ()


class Sandbox:
    """Runs one Python program per call in isolation (see the module docstring's threat model).

    Args:
        limits: resource limits of each run.
        backend: ``"auto"`` (bwrap if it starts, else ``"rlimit"`` with a ``SandboxWarning``),
            ``"bwrap"`` (ConfigError if unavailable) or ``"rlimit"`` (warns).
        python: interpreter inside the sandbox; default: this one, or ``/usr/bin/python3`` when the
            sandbox uid cannot execute this one (running as root from ``/root``).
        bwrap: path of the bwrap executable; default: ``bwrap`` on PATH.
        tmp_root: where per-run directories are created (default: the system temp directory).

    Raises:
        ConfigError: unknown backend, bwrap requested but unusable, no usable interpreter.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        backend: str = "auto",
        python: str | None = None,
        bwrap: str | None = None,
        tmp_root: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"sandbox backend {backend!r} unknown; use one of {', '.join(BACKENDS)}")
        self.limits = limits or Limits()
        self.tmp_root = tmp_root
        self._uids = _uid_slots() if os.geteuid() == 0 else None
        if self._uids and not _others_can_search(tmp_root or tempfile.gettempdir()):
            raise ConfigError(f"sandbox tmp_root={tmp_root!r}: every directory on its path must be "
                              "searchable by other users (chmod o+x), as runs use their own uid")
        self.python = python or _default_python(self._uids is not None)
        self._bwrap = bwrap or shutil.which("bwrap")
        self.backend = self._choose_backend(backend)

    def run(self, source: str, stdin: str = "", limits: Limits | None = None) -> ExecResult:
        """Run ``source`` as ``/work/main.py`` with ``stdin`` on standard input, under ``limits``
        (default: the sandbox's; e.g. a per-test time limit); never raises for anything the program
        does. Returns its ``ExecResult`` once the run's process group is killed and its directory
        deleted. Thread-safe."""
        limits = limits or self.limits
        uid = self._uids.acquire() if self._uids else None
        root = tempfile.mkdtemp(prefix="r1kit-sbx-", dir=self.tmp_root)
        start = time.monotonic()
        try:
            status, rc, outs, truncated = self._execute(root, source, stdin, uid, limits)
        finally:
            if uid is not None:
                if self.backend == "rlimit":  # under bwrap the pid namespace died with its init
                    _kill_uid(uid)
                self._uids.release(uid)
            _remove_tree(root)
        return ExecResult(status, rc, *outs, wall_s=time.monotonic() - start, backend=self.backend,
                          truncated=truncated)

    def _execute(self, root: str, source: str, stdin: str, uid: int | None,
                 limits: Limits) -> tuple[str, int | None, list[str], tuple[str, ...]]:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        os.chmod(root, 0o711)  # the run's uid may pass through to work/, not list its siblings
        # surrogatepass: a lone surrogate (bad token decoding) fails inside the sandbox, not here.
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(source)
        with open(os.path.join(root, "stdin"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(stdin)
        if uid is not None:
            os.chown(work, uid, uid)
            os.chown(os.path.join(work, "main.py"), uid, uid)
        names = ("stdin", "stdout", "stderr", "channel")
        files = [open(os.path.join(root, n), "rb" if n == "stdin" else "w+b") for n in names]
        os.unlink(os.path.join(root, "stdin"))  # reachable through fd 0 only, never by a path
        try:
            raw_rc, timed_out = self._spawn_and_wait(work, uid, limits, *files)
            rc = self._exit_code(raw_rc)
            sizes = [os.fstat(f.fileno()).st_size for f in files[1:]]
            outs = [_read_capped(f, limits.output_bytes) for f in files[1:]]
        finally:
            for f in files:
                f.close()
        truncated = tuple(n for n, size in zip(names[1:], sizes) if size > limits.output_bytes)
        status = self._status(rc, timed_out, sizes[:2], outs[1], limits)
        return status, (None if timed_out else rc), outs, truncated

    def _spawn_and_wait(self, work: str, uid: int | None, lim: Limits, fin, fout, ferr, fchan) -> tuple[int, bool]:
        sandboxed = self.backend == "bwrap"
        home = "/work" if sandboxed else work
        runner = [self.python, "-S", "-s", "-c", _RUNNER, str(lim.cpu_s), str(lim.memory_mb << 20),
                  str(lim.nproc), str(lim.fsize_mb << 20), str(lim.nofile), str(fchan.fileno())]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        argv = self._bwrap_argv(work) + runner if sandboxed else runner
        proc = subprocess.Popen(
            argv, stdin=fin, stdout=fout, stderr=ferr, pass_fds=(fchan.fileno(),), cwd=work, env=env,
            start_new_session=True, user=uid, group=uid, extra_groups=[] if uid is not None else None,
        )
        try:
            timed_out = not _exited_within(proc, lim.wall_s)
        finally:
            _kill_group(proc.pid)
        return proc.wait(), timed_out

    def _bwrap_argv(self, work: str) -> list[str]:
        argv = [self._bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(self.python)))
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            argv += ["--ro-bind", prefix, prefix]
        for path in ("/etc/ld.so.cache", "/etc/localtime"):
            argv += ["--ro-bind-try", path, path]
        return argv + ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--bind", work, "/work",
                       "--remount-ro", "/", "--chdir", "/work", "--"]

    def _exit_code(self, raw: int) -> int:
        """The program's exit status, negative for a signal; bwrap reports a signal as 128 + n."""
        return 128 - raw if self.backend == "bwrap" and raw > 128 else raw

    def _status(self, rc: int, timed_out: bool, sizes: list[int], stderr: str, limits: Limits) -> str:
        sig = max(-rc, 0)
        if timed_out or sig in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout"
        if sig == signal.SIGXFSZ or max(sizes) >= limits.fsize_mb << 20:
            return "output_limit"
        if sig:
            return "crashed"
        if self.backend == "bwrap" and rc == 1 and stderr.startswith("bwrap:"):
            return "sandbox_error"
        return "ok" if rc == 0 else "error"

    def _choose_backend(self, backend: str) -> str:
        if backend == "rlimit":
            _warn_unisolated("backend='rlimit' was requested")
            return backend
        problem = self._bwrap_problem()
        if problem is None:
            return "bwrap"
        if backend == "bwrap":
            raise ConfigError(f"sandbox backend 'bwrap' unusable: {problem}; run scripts/setup.d/sandbox.sh")
        _warn_unisolated(problem)
        return "rlimit"

    def _bwrap_problem(self) -> str | None:
        """Why bwrap cannot run programs here, or None: a trial run of ``print(1)``."""
        if not self._bwrap:
            return "bwrap is not installed (Debian: apt-get install bubblewrap)"
        self.backend = "bwrap"
        probe = self.run("print(1)")
        if probe.status == "ok" and probe.stdout == "1\n":
            return None
        return f"{self._bwrap} failed a trial run ({probe.status}): {probe.stderr.strip()[:300]}"


class SandboxPool:
    """Runs many programs in parallel on one ``Sandbox``, in order, with back-pressure.

    Args:
        sandbox: the sandbox each run uses.
        workers: runs in flight at once (default: the CPU count).
        max_pending: submitted but unread results before ``map`` stops pulling from its input
            (default: ``2 * workers``), so a generator of a million programs needs bounded memory.
    """

    def __init__(self, sandbox: Sandbox, workers: int | None = None, max_pending: int | None = None) -> None:
        self.sandbox = sandbox
        self.workers = workers or os.cpu_count() or 1
        self.max_pending = max_pending or 2 * self.workers
        if self.max_pending < self.workers:
            raise ConfigError(f"max_pending={self.max_pending} must be >= workers={self.workers}")

    def map(self, sources: Iterable[str], stdins: Iterable[str] | None = None,
            limits: Iterable[Limits | None] | None = None) -> Iterator[ExecResult]:
        """Yield ``sandbox.run(source, stdin, limit)`` for each triple, in input order (stdin ""
        and the sandbox's limits if absent)."""
        stdins = stdins if stdins is not None else repeat("")
        limits = limits if limits is not None else repeat(None)
        pending: deque[Future[ExecResult]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="r1kit-sbx") as pool:
            for source, stdin, limit in zip(sources, stdins, limits):
                if len(pending) >= self.max_pending:
                    yield pending.popleft().result()
                pending.append(pool.submit(self.sandbox.run, source, stdin, limit))
            while pending:
                yield pending.popleft().result()


class _UidSlots:
    """A thread-safe queue of free uids ``base .. base + n - 1``, one per run in flight. Used in
    rotation: a uid's killed processes may still count against its RLIMIT_NPROC until init reaps
    them, so it is not handed out again right away."""

    def __init__(self, base: int, n: int) -> None:
        self.pid = os.getpid()
        self.uids = range(base, base + n)
        self._free = deque(self.uids)
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise ConfigError(f"more than {_UID_SLOTS} sandbox runs in flight; use fewer pool workers")
            return self._free.popleft()

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


_slots: _UidSlots | None = None
_slots_lock = threading.Lock()


def _uid_slots() -> _UidSlots:
    """This process's uids, shared by all its sandboxes: a private range far above system and
    login users, offset by pid (rebuilt after a fork) so that two processes rarely share a uid."""
    global _slots
    with _slots_lock:
        if _slots is None or _slots.pid != os.getpid():
            _slots = _UidSlots(1_000_000_000 + (os.getpid() % 1_000_000) * _UID_SLOTS, _UID_SLOTS)
        return _slots


def _warn_unisolated(why: str) -> None:
    msg = (f"r1kit sandbox: running model code WITHOUT namespace isolation ({why}); network and "
           "world-readable files are reachable. Install bubblewrap: scripts/setup.d/sandbox.sh")
    log.warning(msg)
    warnings.warn(msg, SandboxWarning, stacklevel=3)


def _default_python(drop_uid: bool) -> str:
    """This interpreter, or a system one the unprivileged sandbox uid can execute."""
    candidates = [os.path.realpath(sys.executable)]
    if drop_uid:
        candidates = [c for c in candidates if _others_can_execute(c)]
        candidates += [os.path.realpath(p) for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                       if os.path.exists(p) and _others_can_execute(p)]
    if not candidates:
        raise ConfigError("no Python interpreter executable by the sandbox uid; run "
                          "scripts/setup.d/sandbox.sh (installs /usr/bin/python3) or pass python=<path> "
                          "to a world-executable interpreter")
    return candidates[0]


def _others_can_execute(path: str) -> bool:
    """The file is world-readable and -executable, and every directory on the way world-searchable."""
    path = os.path.realpath(path)
    return _others_can_search(path) and bool(os.stat(path).st_mode & 0o004)


def _others_can_search(path: str) -> bool:
    """``path`` and every directory above it have the others-execute (search) bit."""
    path = os.path.realpath(path)
    return all(os.stat(p).st_mode & 0o001 for p in [path, *_parents(path)])


def _parents(path: str) -> Iterator[str]:
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        yield path


def _exited_within(proc: subprocess.Popen, seconds: float) -> bool:
    """Block until ``proc`` exits or ``seconds`` pass; True if it exited. A pidfd (Linux >= 5.3)
    wakes up at once, where ``Popen.wait(timeout)``, the fallback, polls with sleeps up to 50 ms."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def _read_capped(f, n: int) -> str:
    f.seek(0)
    return f.read(n).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def sandbox_pids() -> list[int]:
    """Live processes running under this r1kit process's sandbox uids (when root; else none can be
    attributed and the list is empty). Empty once every run has returned and the kernel has torn
    its namespace down: the leak check of the tests and ``bench/sandbox.py``."""
    if os.geteuid() != 0:
        return []
    uids = _uid_slots().uids
    return [pid for pid in _pids() if _live_uid(pid) in uids]


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process whose real uid is ``uid`` until none is left (setsid'd
    stragglers)."""
    for _ in range(100):
        pids = [pid for pid in _pids() if _live_uid(pid) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    log.error("r1kit sandbox: processes of uid %d survived 100 kill rounds", uid)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _live_uid(pid: int) -> int | None:
    """Real uid of a process from ``/proc/<pid>/status``; None if it is gone or a zombie. The
    status file, unlike the owner of ``/proc/<pid>``, is right even for non-dumpable processes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if text[text.index("\nState:") + 7:].split(None, 1)[0] in ("Z", "X"):
        return None
    return int(text[text.index("\nUid:") + 5:].split(None, 1)[0])


def _remove_tree(path: str) -> None:
    """Delete a run directory, first making its directories writable again (a program may have
    chmod-ed them to 0); symlinks are never followed."""
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)
