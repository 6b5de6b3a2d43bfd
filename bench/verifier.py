"""What the reward hardening of issue 10 costs: verifications per second before and after, same run.

Math (plain numbers: SVAMP golds; LaTeX expressions: MATH-500 golds), each over completions whose
boxed answer is the gold (correct) or the gold of another problem (wrong), half each:

- ``bare``: math-verify alone on the whole completion (``verify(parse(gold), parse(completion))``,
  timeouts off), what a TRL-style accuracy reward runs;
- ``before``: r1kit's extraction, then math-verify's stock parse and comparison of the extracted
  answer (r1kit's math verifier before the hardening);
- ``after``: ``MathVerifier.verify`` (whole-answer parse, several-answer check, exact-first
  numbers; ``r1kit.rewards.numeric``).

Code, per test step: HumanEval's canonical solutions (all tests pass) through the sandbox, once with
a plain harness (program and tests in one namespace, ``==`` on whatever the program returns: the
pre-hardening harness) and once with ``CodeVerifier`` (trusted comparison), the same pool; per
wall second and per CPU second (this process and the sandboxed programs, ``RUSAGE_CHILDREN``),
the latter steadier on a shared machine. Math rates are per CPU second of this process.

GRPO share: ``MathVerifier(extraction="any")`` on a batch of 64 one-line direct answers of the
``cpu_demo`` preset's shape (SVAMP, 8 prompts x 8 completions, "... = 12" style, a quarter cut by
the token limit), before and after, against the preset's step time (``--step-s``, default 29 s:
the median step of the SVAMP demo in README.md).

    PYTHONPATH=src python bench/verifier.py [--math-n 400] [--code-n 40] [--workers 2] [--step-s 29]

Prints the CPU flags first and ``name=value`` lines last.
"""

from __future__ import annotations

import argparse
import random
import resource
import secrets
import time

from math_verify import parse, verify

from r1kit.data.loading import load_task
from r1kit.rewards.code import CodeVerifier, parse_report
from r1kit.rewards.math import MathVerifier, extract_answer, parse_gold
from r1kit.rewards.sandbox import Limits

# The pre-hardening harness: the program and its tests in one namespace, one report line per step.
PLAIN_HARNESS = """
import os, sys
def _plain(program, setup, tests):
    nonce = sys.stdin.readline().strip()
    write = os.write
    g = {"__name__": "solution", "__builtins__": __builtins__}
    exec(compile(program, "solution.py", "exec"), g)
    exec(compile(setup, "test_setup.py", "exec"), g)
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{i}.py", "exec"), g)
            write(3, f"{nonce} pass {i}\\n".encode())
        except BaseException:
            write(3, f"{nonce} fail {i}\\n".encode())
    write(3, f"{nonce} done\\n".encode())
_plain(%r, %r, %r)
"""


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f"{name}={'yes' if name in flags else 'no'}" for name in wanted)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the sandboxed programs)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def rate(fn, n: int) -> float:
    """Calls per second of ``fn`` (which does ``n`` verifications), process CPU time."""
    start = time.process_time()
    fn()
    return n / max(time.process_time() - start, 1e-9)


def math_workload(task: str, split: str, n: int, seed: int = 0):
    examples = load_task(task, split)[:n]
    rng = random.Random(seed)
    completions = []
    for i, ex in enumerate(examples):
        answer = ex.gold if i % 2 == 0 else rng.choice(examples).gold
        completions.append(f"<think>Let me work it out.</think> The answer is $\\boxed{{{answer}}}$.")
    return completions, examples


def bare(completions, examples) -> list[bool]:
    golds = {ex.gold: parse(f"${ex.gold}$", parsing_timeout=None) for ex in examples}
    return [verify(golds[ex.gold], parse(c, parsing_timeout=None), timeout_seconds=None)
            for c, ex in zip(completions, examples)]


def before(completions, examples, mode: str = "tagged", truncated=None) -> list[bool]:
    truncated = truncated or [False] * len(completions)
    out = []
    for c, ex, cut in zip(completions, examples, truncated):
        answer = extract_answer(c, mode, finished=not cut)
        if answer is None:
            out.append(False)
            continue
        text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
        out.append(verify(parse_gold(ex.gold), parse(text, parsing_timeout=None), timeout_seconds=None))
    return out


def math_rates(label: str, task: str, split: str, n: int) -> list[tuple[str, float]]:
    completions, examples = math_workload(task, split, n)
    hardened = MathVerifier()
    for ex in examples:  # warm the gold caches of both paths
        parse_gold(ex.gold)
    bare(completions[:20], examples[:20])
    return [(f"math_{label}_bare_per_s", rate(lambda: bare(completions, examples), n)),
            (f"math_{label}_before_per_s", rate(lambda: before(completions, examples), n)),
            (f"math_{label}_after_per_s", rate(lambda: hardened.verify_batch(completions, examples), n))]


def code_rates(n: int, workers: int) -> list[tuple[str, float]]:
    examples = load_task("humaneval", "test")[:n]
    completions = [ex.meta["canonical_solution"][len(ex.meta["prompt_code"]):] for ex in examples]
    n_tests = sum(len(ex.meta["tests"]) for ex in examples)
    verifier = CodeVerifier(limits=Limits(wall_s=10.0, cpu_s=5), workers=workers)
    programs = [ex.meta["canonical_solution"] for ex in examples]
    nonces = [secrets.token_hex(16) for _ in examples]
    sources = [PLAIN_HARNESS % (p, ex.meta["test_setup"], list(ex.meta["tests"])) for p, ex in zip(programs, examples)]

    def plain() -> int:
        results = verifier.pool.map(sources, (nonce + "\n" for nonce in nonces))
        return sum(len(parse_report(r.channel, nonce).passed) for r, nonce in zip(results, nonces))

    def rates(fn) -> tuple[float, float, object]:
        """(tests per wall second, tests per CPU second of this process and its sandboxes, result)."""
        start, cpu = time.perf_counter(), cpu_seconds()
        out = fn()
        return n_tests / (time.perf_counter() - start), n_tests / (cpu_seconds() - cpu), out

    plain_rate, plain_cpu, plain_passed = rates(plain)
    trusted_rate, trusted_cpu, verdicts = rates(lambda: verifier.verify_batch(completions, examples))
    if plain_passed != n_tests or not all(v.correct for v in verdicts):
        raise SystemExit(f"canonical solutions failed: plain {plain_passed}/{n_tests}, "
                         f"trusted {sum(v.correct for v in verdicts)}/{len(verdicts)}")
    return [("code_tests", n_tests), ("code_plain_tests_per_s", plain_rate), ("code_trusted_tests_per_s", trusted_rate),
            ("code_plain_tests_per_cpu_s", plain_cpu), ("code_trusted_tests_per_cpu_s", trusted_cpu)]


def grpo_share(step_s: float, repeats: int = 5) -> list[tuple[str, float]]:
    """Seconds the verifier spends on one cpu_demo step (64 completions) before and after."""
    examples = load_task("svamp", "train")[:8]
    rng = random.Random(0)
    batch, golds, cut = [], [], []
    for ex in examples:
        for g in range(8):
            value = ex.gold if g % 3 == 0 else str(int(float(ex.gold)) + rng.randint(1, 9))
            truncated = g % 4 == 3  # cut by the 48-token limit: its last number is an intermediate one
            text = f" {rng.randint(2, 99)} + {rng.randint(2, 99)} = {value}"
            batch.append(text + f", then {rng.randint(2, 99)} -" if truncated else text)
            golds.append(ex)
            cut.append(truncated)
    hardened = MathVerifier(extraction="any")
    for ex in examples:
        parse_gold(ex.gold)

    def seconds(fn) -> float:
        start = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - start) / repeats

    before_s = seconds(lambda: before(batch, golds, "any", cut))
    after_s = seconds(lambda: hardened.verify_batch(batch, golds, truncated=cut))
    return [("grpo_batch_completions", len(batch)), ("grpo_verifier_before_s", before_s),
            ("grpo_verifier_after_s", after_s), ("grpo_step_s", step_s),
            ("grpo_verifier_share_after_pct", 100 * after_s / step_s),
            ("grpo_step_growth_pct", 100 * (after_s - before_s) / step_s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--math-n", type=int, default=400, help="completions per math workload")
    parser.add_argument("--code-n", type=int, default=40, help="HumanEval problems for the code workload")
    parser.add_argument("--workers", type=int, default=2, help="sandbox pool workers")
    parser.add_argument("--step-s", type=float, default=29.0, help="GRPO step time of the cpu_demo preset, seconds")
    args = parser.parse_args()
    print(f"cpu: {cpu_flags()}")
    results = (math_rates("plain", "svamp", "train", args.math_n) + math_rates("latex", "math500", "test", args.math_n)
               + code_rates(args.code_n, args.workers) + grpo_share(args.step_s))
    for name, value in results:
        print(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")


if __name__ == "__main__":
    main()
