"""Hostile programs under the bubblewrap backend: each is contained, reported with a status, and
leaves the host unchanged (files, secrets, network listeners, processes, temporary directories).

Network cases only target 127.0.0.1 and 192.0.2.1 (TEST-NET-1, RFC 5737, never routed)."""

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from r1kit.rewards.sandbox import ExecResult, Limits, Sandbox
from sandbox_helpers import needs_bwrap, sandbox_processes_gone, world_searchable_dir

pytestmark = needs_bwrap

SECRET = "r1kit-test-secret-7f3a9c"
LIMITS = Limits(wall_s=2.0, cpu_s=1, memory_mb=256, nproc=16, fsize_mb=1, nofile=32, output_bytes=4096)


@dataclass
class Host:
    victim: str  # a host directory with keep.txt that programs try to delete or write into
    secret_file: str  # a secret in the (temporary) HOME of the user running r1kit
    port: int  # a host listener on 127.0.0.1
    listener: socket.socket
    sleeper: subprocess.Popen  # a host process that kill(-1) must not reach


@dataclass
class Case:
    id: str
    source: str
    status: str
    check: Callable[[ExecResult, Host], None] | None = None


def _no_secret(r: ExecResult, host: Host) -> None:
    assert SECRET not in r.stdout + r.stderr + r.channel


def _stderr_has(text: str) -> Callable[[ExecResult, Host], None]:
    def check(r: ExecResult, host: Host) -> None:
        assert text in r.stderr, r.stderr[-500:]

    return check


def _stdout_is(text: str) -> Callable[[ExecResult, Host], None]:
    def check(r: ExecResult, host: Host) -> None:
        assert r.stdout.strip() == text, (r.stdout, r.stderr[-300:])

    return check


def _no_connection(r: ExecResult, host: Host) -> None:
    host.listener.settimeout(0.2)
    with pytest.raises(socket.timeout):
        host.listener.accept()
    assert "OSError" in r.stderr or "Error" in r.stderr


def _victim_intact(r: ExecResult, host: Host) -> None:
    assert sorted(os.listdir(host.victim)) == ["keep.txt"]
    with open(os.path.join(host.victim, "keep.txt")) as f:
        assert f.read() == "keep"


def _int_stdout_below(bound: int) -> Callable[[ExecResult, Host], None]:
    def check(r: ExecResult, host: Host) -> None:
        assert 0 < int(r.stdout.strip()) < bound, r.stdout

    return check


def _quick(r: ExecResult, host: Host) -> None:
    assert r.wall_s < LIMITS.wall_s, r.wall_s


def _sleeper_alive(r: ExecResult, host: Host) -> None:
    assert host.sleeper.poll() is None
    assert r.stdout.strip() == "survived-kill-all"


def _output_capped(r: ExecResult, host: Host) -> None:
    assert len(r.stdout) <= LIMITS.output_bytes and len(r.stderr) <= LIMITS.output_bytes


CASES = [
    Case("net_loopback_tcp", "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)", "error", _no_connection),
    Case("net_outside_tcp", "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)", "error", _stderr_has("Network is unreachable")),
    Case("net_outside_udp", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 53))", "error", _stderr_has("Network is unreachable")),
    Case("net_interfaces", "import socket\nprint([n for _, n in socket.if_nameindex()])", "ok", _stdout_is("['lo']")),
    Case("write_outside_workdir", "open('VICTIM/pwned.txt', 'w').write('x')", "error", _victim_intact),
    Case("write_usr", "open('/usr/pwned.txt', 'w').write('x')", "error", _stderr_has("Read-only file system")),
    Case("write_root", "open('/pwned.txt', 'w').write('x')", "error", _stderr_has("Read-only file system")),
    Case("write_tmp", "open('/tmp/r1kit-pwned.txt', 'w').write('x')", "error",
         lambda r, h: (_stderr_has("No such file")(r, h), not os.path.exists("/tmp/r1kit-pwned.txt") or pytest.fail("host /tmp written"))),
    Case("write_dev_shm", "open('/dev/shm/pwned', 'w').write('x')", "error", _stderr_has("Read-only file system")),
    Case("read_home_secret", "print(open('SECRET_FILE').read())", "error", _no_secret),
    Case("read_etc_shadow", "print(open('/etc/shadow').read())", "error", _stderr_has("No such file")),
    Case("read_repository", f"print(open({__file__!r}).read())", "error", _stderr_has("No such file")),
    Case("find_host_dirs", "import os\nprint([d for d in ('/root', '/home', '/tmp', '/etc/ssh', '/var') if os.path.exists(d)])", "ok",
         _stdout_is("[]")),
    Case("read_env", "import os\nprint(dict(os.environ))", "ok", _no_secret),
    Case("read_proc_environ", "import os\nfor p in ('/proc/1/environ', '/proc/self/environ', '/proc/HOST_PID/environ'):\n"
         "    try: print(open(p, 'rb').read())\n    except OSError as e: print(p, e)", "ok", _no_secret),
    Case("fork_bomb", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", "timeout"),
    Case("thread_bomb", "import threading, time\nn = 0\ntry:\n    while True:\n"
         "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n += 1\n"
         "except RuntimeError:\n    print(n, flush=True)\nimport os\nos._exit(0)", "ok", _int_stdout_below(LIMITS.nproc)),
    Case("memory_bomb", "x = bytearray(4 << 30)", "error", _stderr_has("MemoryError")),
    Case("memory_bomb_incremental", "chunks = []\nwhile True: chunks.append(bytearray(16 << 20))", "error", _stderr_has("MemoryError")),
    Case("infinite_loop", "while True: pass", "timeout"),
    Case("sleep_past_limit", "import time\ntime.sleep(60)", "timeout", lambda r, h: r.wall_s < LIMITS.wall_s + 2 or pytest.fail(r.wall_s)),
    Case("ignore_sigterm_and_sigxcpu", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass", "timeout"),
    Case("signal_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('parent-signalled')", "ok",
         _stdout_is("parent-signalled")),
    Case("signal_host_process", "import os, signal\nos.kill(HOST_PID, signal.SIGKILL)", "error", _stderr_has("ProcessLookupError")),
    Case("kill_all_processes", "import os, signal, time\nif os.fork() == 0:\n    time.sleep(60)\n"
         "os.kill(-1, signal.SIGKILL)\nprint('survived-kill-all')", "ok", _sleeper_alive),
    Case("background_child", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent-exits')", "ok", _quick),
    Case("daemon_writes_later", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
         "        time.sleep(1)\n        open('VICTIM/late.txt', 'w').write('x')\n    os._exit(0)", "ok",
         lambda r, h: (time.sleep(1.5), _victim_intact(r, h))),
    Case("print_gigabytes_stdout", "import sys\nwhile True: sys.stdout.write('x' * (1 << 20))", "output_limit", _output_capped),
    Case("print_gigabytes_stderr", "import sys\nwhile True: sys.stderr.write('x' * (1 << 20))", "output_limit", _output_capped),
    Case("fill_disk", "with open('big.bin', 'wb') as f:\n    while True: f.write(b'x' * (1 << 20))", "error", _stderr_has("File too large")),
    Case("ctypes_crash", "import ctypes\nctypes.string_at(0)", "crashed", lambda r, h: r.returncode == -signal.SIGSEGV or pytest.fail(r.returncode)),
    Case("deep_recursion", "def f(n): return f(n + 1)\nf(0)", "error", _stderr_has("RecursionError")),
    Case("deep_c_recursion", "import sys\nsys.setrecursionlimit(10**8)\nclass A:\n"
         "    def __getattr__(self, name): return getattr(self, name)\nA().x", "crashed"),
    Case("chdir_and_delete", "import json, os, shutil\nos.chdir('/')\nlib = os.path.dirname(json.__file__)\n"
         "for p in ('VICTIM', lib, '/work'):\n    shutil.rmtree(p, ignore_errors=True)\n"
         "print(os.path.exists('VICTIM'), os.path.exists(lib))", "ok",
         lambda r, h: (_stdout_is("False True")(r, h), _victim_intact(r, h))),
    Case("symlink_escape", "import os\nos.symlink('VICTIM', 'v')\nos.symlink('/', 'root')\nos.chmod('.', 0)", "ok", _victim_intact),
    Case("chmod_dirs_unreadable", "import os\nos.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\n"
         "os.chmod('a/b/c', 0)\nos.chmod('a/b', 0)\nos.chmod('a', 0)", "ok"),
    Case("exhaust_fds", "fs = []\ntry:\n    while True: fs.append(open('/dev/null'))\nexcept OSError:\n    print(len(fs))", "ok",
         _int_stdout_below(LIMITS.nofile)),
    Case("become_root", "import os\nprint(os.getuid())\nos.setuid(0)", "error",
         lambda r, h: (r.stdout.strip() != "0" or pytest.fail("uid 0"), _stderr_has("os.setuid(0)")(r, h))),
    Case("nested_user_namespace", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.unshare(0x10000000))", "ok",
         _stdout_is("-1")),
    Case("raise_own_limits", "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))", "error",
         _stderr_has("ValueError")),
]


@pytest.fixture(scope="module")
def sandbox():
    with world_searchable_dir() as runs:
        yield Sandbox(LIMITS, backend="bwrap", tmp_root=runs)


@pytest.fixture
def host(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_secret").write_text(SECRET)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("R1KIT_TEST_SECRET", SECRET)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sleeper = subprocess.Popen(["sleep", "60"])
    yield Host(str(victim), str(home / ".ssh" / "id_secret"), listener.getsockname()[1], listener, sleeper)
    sleeper.kill()
    sleeper.wait()
    listener.close()


def test_suite_is_large_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_program_is_contained(case, sandbox, host):
    source = (case.source.replace("VICTIM", host.victim).replace("SECRET_FILE", host.secret_file)
              .replace("HOST_PID", str(os.getpid())).replace("PORT", str(host.port)))
    result = sandbox.run(source)
    assert result.backend == "bwrap"
    assert result.status == case.status, (result.status, result.returncode, result.stderr[-500:])
    if case.check is not None:
        case.check(result, host)
    _victim_intact(result, host)
    assert os.listdir(sandbox.tmp_root) == []
    assert sandbox_processes_gone(sandbox.tmp_root)
