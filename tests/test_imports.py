"""Packages and entry modules import on their own in a fresh interpreter (catches import cycles
that depend on which module a user imports first)."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import r1kit


def test_each_module_imports_first():
    # packages (their __init__ imports are where cycles start) and the leaves users import first
    names = [m.name for m in pkgutil.walk_packages(r1kit.__path__, "r1kit.") if m.ispkg]
    names += ["r1kit.cli", "r1kit.train.recipe", "r1kit.rewards.math", "r1kit.data.loading"]
    assert "r1kit.rewards" in names and "r1kit.data" in names
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            f"for n in {names!r}:\n"
            "    r = subprocess.run([sys.executable, '-c', 'import ' + n], capture_output=True, text=True)\n"
            "    if r.returncode: bad.append((n, r.stderr.strip().splitlines()[-1]))\n"
            "print(bad)\n")
    src = str(Path(r1kit.__path__[0]).parent)  # the r1kit under test (a worktree's), not the installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
