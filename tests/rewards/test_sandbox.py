"""Sandbox basics, the rlimit fallback (chosen with a loud warning when bwrap is missing or fails),
and the pool: input order, back-pressure, and nothing left behind after many runs."""

import os
import shutil
import subprocess

import pytest

from r1kit.errors import ConfigError
from r1kit.rewards.sandbox import Limits, Sandbox, SandboxPool, SandboxWarning
from sandbox_helpers import needs_bwrap, sandbox_processes_gone, world_searchable_dir

SECRET = "r1kit-test-secret-51d0e2"
LIMITS = Limits(wall_s=2.0, cpu_s=1, memory_mb=256, nproc=16, fsize_mb=1, nofile=32, output_bytes=4096)


@pytest.fixture(scope="module")
def runs():
    with world_searchable_dir() as path:
        yield path


@pytest.fixture(scope="module")
def bwrap_sandbox(runs):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed; run scripts/setup.d/sandbox.sh")
    return Sandbox(LIMITS, backend="bwrap", tmp_root=runs)


@pytest.fixture(scope="module")
def rlimit_sandbox(runs):
    with pytest.warns(SandboxWarning, match="WITHOUT namespace isolation"):
        return Sandbox(LIMITS, backend="rlimit", tmp_root=runs)


def _assert_host_clean(sandbox):
    assert os.listdir(sandbox.tmp_root) == []
    assert sandbox_processes_gone(sandbox.tmp_root)


@pytest.mark.parametrize("field", ["wall_s", "cpu_s", "memory_mb", "nproc", "fsize_mb", "nofile", "output_bytes"])
def test_limits_must_be_positive(field):
    with pytest.raises(ConfigError, match=field):
        Limits(**{field: 0})


def test_unknown_backend_raises():
    with pytest.raises(ConfigError, match="docker"):
        Sandbox(backend="docker")


@needs_bwrap
def test_stdin_stdout_channel_and_exit_code(bwrap_sandbox):
    source = "import os, sys\nprint(sys.stdin.readline().upper(), end='')\nos.write(3, b'side')\nsys.exit(3)"
    r = bwrap_sandbox.run(source, stdin="hello\n")
    assert (r.status, r.returncode, r.stdout, r.channel, r.backend) == ("error", 3, "HELLO\n", "side", "bwrap")
    _assert_host_clean(bwrap_sandbox)


@needs_bwrap
def test_output_is_truncated_below_the_file_limit(bwrap_sandbox):
    r = bwrap_sandbox.run("print('y' * 10000)")
    assert r.status == "ok" and r.stdout == "y" * LIMITS.output_bytes
    assert r.truncated == ("stdout",)


@needs_bwrap
def test_cut_output_is_reported_not_silent(runs):
    """Issue 10: 200,001 characters came back as 65,536 with status ok and nothing saying so."""
    sandbox = Sandbox(Limits(wall_s=5.0), backend="bwrap", tmp_root=runs)
    r = sandbox.run("import os, sys\nsys.stdout.write('z' * 200_001)\nos.write(3, b'c' * 70_000)")
    assert (r.status, len(r.stdout), len(r.channel)) == ("ok", 65_536, 65_536)
    assert r.truncated == ("stdout", "channel")
    whole = sandbox.run("print('z' * 65_535)")  # 65,536 bytes with the newline: fits exactly
    assert (whole.stdout, whole.truncated) == ("z" * 65_535 + "\n", ())


@needs_bwrap
def test_string_hashing_is_deterministic(bwrap_sandbox):
    # PYTHONHASHSEED=0: set iteration order, and so rewards, do not change between runs.
    a, b = (bwrap_sandbox.run("print(hash('r1kit'), list({'a', 'b', 'c', 'd'}))").stdout for _ in range(2))
    assert a == b and a.strip()


def test_missing_bwrap_falls_back_loudly(monkeypatch, runs):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(SandboxWarning, match="bwrap is not installed"):
        sandbox = Sandbox(LIMITS, tmp_root=runs)
    assert sandbox.backend == "rlimit"
    r = sandbox.run("print(6 * 7)")
    assert (r.status, r.stdout, r.backend) == ("ok", "42\n", "rlimit")


def test_failing_bwrap_falls_back_loudly(runs):
    with pytest.warns(SandboxWarning, match="failed a trial run"):
        sandbox = Sandbox(LIMITS, bwrap="/bin/false", tmp_root=runs)
    assert sandbox.backend == "rlimit"
    _assert_host_clean(sandbox)


def test_bwrap_required_but_failing_raises(runs):
    with pytest.raises(ConfigError, match="unusable"):
        Sandbox(LIMITS, backend="bwrap", bwrap="/bin/false", tmp_root=runs)


FALLBACK_CASES = [
    ("infinite_loop", "while True: pass", "timeout", ""),
    ("sleep_past_limit", "import time\ntime.sleep(60)", "timeout", ""),
    ("memory_bomb", "x = bytearray(4 << 30)", "error", "MemoryError"),
    ("fork_bomb", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", "timeout", ""),
    ("print_gigabytes", "import sys\nwhile True: sys.stdout.write('x' * (1 << 20))", "output_limit", ""),
    ("ctypes_crash", "import ctypes\nctypes.string_at(0)", "crashed", ""),
    ("read_env", "import os\nprint(dict(os.environ))", "ok", "PYTHONHASHSEED"),
]


@pytest.mark.parametrize("name,source,status,expected", FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES])
def test_fallback_contains_resource_abuse(rlimit_sandbox, monkeypatch, name, source, status, expected):
    monkeypatch.setenv("R1KIT_TEST_SECRET", SECRET)
    r = rlimit_sandbox.run(source)
    assert (r.status, r.backend) == (status, "rlimit"), (r.returncode, r.stderr[-300:])
    assert expected in r.stdout + r.stderr and SECRET not in r.stdout + r.stderr
    assert len(r.stdout) <= LIMITS.output_bytes
    _assert_host_clean(rlimit_sandbox)


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback reaps setsid children by uid, only when run as root")
def test_fallback_kills_background_children(rlimit_sandbox):
    r = rlimit_sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('bye')")
    assert (r.status, r.stdout) == ("ok", "bye\n")
    assert r.wall_s < LIMITS.wall_s
    _assert_host_clean(rlimit_sandbox)


@pytest.mark.skipif(os.geteuid() != 0, reason="as a normal user the fallback runs with the caller's uid")
def test_fallback_cannot_signal_the_grader(rlimit_sandbox):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        parent = rlimit_sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        everyone = rlimit_sandbox.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('sent')")
        assert parent.status == "error" and "PermissionError" in parent.stderr
        # kill(-1) reports success even when every target refused (EPERM); nothing outside dies.
        assert (everyone.status, everyone.stdout) == ("ok", "sent\n")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    _assert_host_clean(rlimit_sandbox)


@needs_bwrap
def test_pool_keeps_order_and_applies_back_pressure(bwrap_sandbox):
    pulled = []

    def sources():
        for i in range(10):
            pulled.append(i)
            yield f"import time\ntime.sleep({0.3 if i % 4 == 0 else 0})\nprint({i})"

    results = SandboxPool(bwrap_sandbox, workers=2, max_pending=3).map(sources())
    first = next(results)
    assert len(pulled) == 4  # 3 in flight + the one that waited for a free slot
    outputs = [first.stdout] + [r.stdout for r in results]
    assert outputs == [f"{i}\n" for i in range(10)]


def test_pool_rejects_fewer_pending_than_workers(rlimit_sandbox):
    with pytest.raises(ConfigError, match="max_pending"):
        SandboxPool(rlimit_sandbox, workers=4, max_pending=2)


@needs_bwrap
def test_many_runs_leave_no_process_or_directory(runs):
    sandbox = Sandbox(Limits(wall_s=1.0, cpu_s=1, nproc=16), backend="bwrap", tmp_root=runs)
    kinds = {
        0: ("import time\ntime.sleep(60)", "timeout"),
        1: ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('x')", "ok"),
        2: ("import ctypes\nctypes.string_at(0)", "crashed"),
        3: ("raise SystemExit(1)", "error"),
    }
    sources = [kinds.get(i % 25, ("print(1)", "ok"))[0] for i in range(100)]
    expected = [kinds.get(i % 25, ("print(1)", "ok"))[1] for i in range(100)]
    results = list(SandboxPool(sandbox, workers=3).map(sources))
    assert [r.status for r in results] == expected
    _assert_host_clean(sandbox)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs switch uid")
def test_private_tmp_root_is_rejected_as_root(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="searchable by other users"):
        Sandbox(LIMITS, backend="rlimit", tmp_root=str(private))


def test_interpreter_must_be_reachable_by_other_users(runs):
    from r1kit.rewards.sandbox import _others_can_execute

    for name, mode in (("open", 0o711), ("hidden", 0o700)):
        folder = os.path.join(runs, name)
        os.mkdir(folder)
        os.chmod(folder, mode)
        with open(os.path.join(folder, "python3"), "w"):
            pass
        os.chmod(os.path.join(folder, "python3"), 0o755)
    try:
        assert _others_can_execute(os.path.join(runs, "open", "python3"))
        assert not _others_can_execute(os.path.join(runs, "hidden", "python3"))
        os.chmod(os.path.join(runs, "open", "python3"), 0o750)
        assert not _others_can_execute(os.path.join(runs, "open", "python3"))
    finally:
        shutil.rmtree(os.path.join(runs, "open"))
        shutil.rmtree(os.path.join(runs, "hidden"))
