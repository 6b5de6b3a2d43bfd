"""Sandbox throughput on MBPP canonical solutions, against the same programs run unsandboxed.

Runs ``--n`` executions (cycling through MBPP's 974 canonical solutions with their tests, exactly
as the code verifier builds them) through ``SandboxPool``, then the same programs with a bare
``python`` subprocess each (same interpreter and thread pool; no namespaces, limits, uid or clean-up)
as the anchor. Prints how many canonical solutions passed (and which did not), the processes and
temporary directories left behind, the overhead factor, and last ``sandbox_exec_per_s=<N>``.

    PYTHONPATH=src python bench/sandbox.py [--n 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from r1kit.data.base import get_task_loader
from r1kit.rewards.code import harness_source, parse_report
from r1kit.rewards.sandbox import Sandbox, SandboxPool, sandbox_pids

# The unsandboxed anchor: put the report file on fd 3 as the sandbox runner does, then run main.py.
_BARE_RUNNER = "import os, sys\nos.dup2(int(sys.argv[1]), 3)\nexec(compile(open('main.py').read(), 'main.py', 'exec'), {'__name__': '__main__'})"


def mbpp_jobs(n: int) -> list[tuple[object, str, str]]:
    """``n`` (example, harness source, nonce) triples cycling through all MBPP rows."""
    rows = [e for split in ("prompt", "test", "validation", "train") for e in get_task_loader("mbpp")(split)]
    jobs = []
    for i in range(n):
        example = rows[i % len(rows)]
        jobs.append((example, harness_source(example.meta["canonical_solution"], example), secrets.token_hex(16)))
    return jobs


def run_bare(python: str, source: str, stdin: str) -> str:
    """Run ``source`` in a plain subprocess in a temporary directory; return its fd-3 report."""
    with tempfile.TemporaryDirectory(prefix="r1kit-bare-") as work:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(source)
        with open(os.path.join(work, "chan"), "w+b") as chan:
            subprocess.run([python, "-S", "-s", "-c", _BARE_RUNNER, str(chan.fileno())], input=stdin.encode(),
                           cwd=work, pass_fds=(chan.fileno(),), capture_output=True, timeout=60)
            chan.seek(0)
            return chan.read().decode()


def passed(example, channel: str, nonce: str) -> bool:
    report = parse_report(channel, nonce)
    return report.done and len(report.passed) == len(example.meta["tests"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="executions (default 1000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel runs (default: CPU count)")
    args = parser.parse_args()

    jobs = mbpp_jobs(args.n)
    tmp_root = tempfile.mkdtemp(prefix="r1kit-bench-runs-")
    os.chmod(tmp_root, 0o711)
    sandbox = Sandbox(tmp_root=tmp_root)
    pool = SandboxPool(sandbox, workers=args.workers)

    start = time.perf_counter()
    results = list(pool.map((src for _, src, _ in jobs), (nonce + "\n" for _, _, nonce in jobs)))
    sandboxed_s = time.perf_counter() - start

    with ThreadPoolExecutor(args.workers) as ex:
        start = time.perf_counter()
        bare = list(ex.map(lambda job: run_bare(sandbox.python, job[1], job[2] + "\n"), jobs))
        bare_s = time.perf_counter() - start

    failed = sorted({e.id for (e, _, nonce), r in zip(jobs, results) if not passed(e, r.channel, nonce)})
    bare_failed = sorted({e.id for (e, _, nonce), ch in zip(jobs, bare) if not passed(e, ch, nonce)})
    distinct = len({e.id for e, _, _ in jobs})
    time.sleep(0.5)  # the kernel tears pid namespaces down asynchronously
    left_procs = sandbox_pids()
    left_dirs = os.listdir(tmp_root)
    os.rmdir(tmp_root)

    print(f"backend={sandbox.backend} python={sandbox.python} workers={args.workers} executions={args.n}")
    print(f"mbpp_canonical_pass={distinct - len(failed)}/{distinct} failed={failed} unsandboxed_failed={bare_failed}")
    print(f"leftover_processes={len(left_procs)} leftover_dirs={len(left_dirs)}")
    print(f"sandboxed_s={sandboxed_s:.2f} unsandboxed_s={bare_s:.2f} unsandboxed_exec_per_s={args.n / bare_s:.1f}")
    print(f"overhead_x={sandboxed_s / bare_s:.2f} per_exec_overhead_ms={1000 * (sandboxed_s - bare_s) * args.workers / args.n:.1f}")
    print(f"sandbox_exec_per_s={args.n / sandboxed_s:.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
