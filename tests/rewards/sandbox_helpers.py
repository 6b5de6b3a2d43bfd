"""Shared by the sandbox tests: find processes a sandbox left behind."""

import contextlib
import os
import shutil
import tempfile
import time

import pytest

from r1kit.rewards import sandbox as sandbox_mod

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed; run scripts/setup.d/sandbox.sh")


def sandbox_processes_gone(tmp_root, within_s: float = 3.0) -> bool:
    """True once no sandbox process is left, polling up to ``within_s``: under bwrap the kernel
    kills a namespace's processes asynchronously after its init dies."""
    deadline = time.monotonic() + within_s
    while sandbox_processes(tmp_root):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def sandbox_processes(tmp_root) -> list[int]:
    """Live pids that belong to a sandbox run: a uid of this process's sandbox range (when root) or
    a command line naming a run directory under ``tmp_root``."""
    found = set(sandbox_mod.sandbox_pids())
    for pid in sandbox_mod._pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(tmp_root).encode() in f.read() and sandbox_mod._live_uid(pid) is not None:
                    found.add(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(found)


@contextlib.contextmanager
def world_searchable_dir():
    """A fresh directory under the system temp dir that sandbox uids can pass through (pytest's
    tmp_path lives under a 0700 directory); removed afterwards."""
    path = tempfile.mkdtemp(prefix="r1kit-test-runs-")
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)
