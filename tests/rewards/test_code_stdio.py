"""stdin/stdout grading (Codeforces / LiveCodeBench style): one sandbox run per test case under its
own time limit, output compared in the parent exactly or by whitespace-separated tokens, a cut
output reported as ``output_limit``, never compared as if whole."""

import logging
import shutil
import time
from pathlib import Path

import pytest
from sandbox_helpers import needs_bwrap, world_searchable_dir

from r1kit.data.base import Example
from r1kit.errors import ConfigError
from r1kit.rewards.code import CodeVerifier, outputs_match
from r1kit.rewards.sandbox import Limits, Sandbox, SandboxPool


def sum_task(compare: str = "whitespace", time_limit_s: float | None = None) -> Example:
    meta = {"io_tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}],
            "compare": compare}
    if time_limit_s is not None:
        meta["time_limit_s"] = time_limit_s
    return Example(f"io/sum/{compare}", "Read a and b, print a + b.", None, meta=meta)


SUM = "a, b = map(int, input().split())\n"
CASES = [
    # (name, example, program, correct, reason, score with partial credit)
    ("correct", sum_task(), SUM + "print(a + b)", True, "ok", 1.0),
    ("correct_exact", sum_task("exact"), SUM + "print(a + b)", True, "ok", 1.0),
    ("trailing_space_whitespace", sum_task(), SUM + "print(a + b, end=' \\n\\n')", True, "ok", 1.0),
    ("trailing_space_exact", sum_task("exact"), SUM + "print(a + b, end=' \\n')", False, "wrong_answer", 0.0),
    ("no_final_newline_exact", sum_task("exact"), SUM + "print(a + b, end='')", True, "ok", 1.0),
    ("leading_zero", sum_task(), SUM + "print(f'{a + b:02d}')", False, "wrong_answer", 0.0),
    ("memorised_first_answer", sum_task(), "print(3)", False, "wrong_answer", 0.5),
    ("runtime_error", sum_task(), "raise SystemExit(input() and 1)", False, "runtime_error", 0.0),
    ("sleep_past_limit", sum_task(time_limit_s=0.5), SUM + "import time\nif a == 10: time.sleep(5)\nprint(a + b)",
     False, "timeout", 0.5),
    ("print_forever", sum_task(), "while True: print('x' * 1000)", False, "output_limit", 0.0),
    ("print_past_the_kept_bytes", sum_task(), SUM + "print(a + b)\nprint('x' * 70000)", False, "output_limit", 0.0),
    ("fork_bomb", sum_task(time_limit_s=1.0), "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
     False, "timeout", 0.0),
    ("forged_stdout_fd", sum_task(), "import os\nos.write(1, b'3\\n')\nos._exit(1)", False, "runtime_error", 0.0),
    ("unfenced_script", sum_task(), None, True, "ok", 1.0),
]


@pytest.fixture(scope="module")
def graded():
    verifier = CodeVerifier(partial_credit=True, limits=Limits(wall_s=3.0, cpu_s=2, memory_mb=512, nproc=16),
                            workers=2)
    completions = [f"```python\n{p}\n```" if p is not None else SUM + "print(a + b)\n" for _, _, p, *_ in CASES]
    return dict(zip([c[0] for c in CASES], verifier.verify_batch(completions, [c[1] for c in CASES])))


@pytest.mark.parametrize("name,correct,reason,score", [(c[0], *c[3:]) for c in CASES], ids=[c[0] for c in CASES])
def test_stdio_verdicts(graded, name, correct, reason, score):
    v = graded[name]
    assert (v.correct, v.reason, v.score) == (correct, reason, score)


def test_per_test_time_limit_is_applied():
    """The example's 0.5 s per test case, not the verifier's 20 s, ends a sleeping program."""
    verifier = CodeVerifier(limits=Limits(wall_s=20.0, cpu_s=20), workers=2)
    start = time.monotonic()
    verdict = verifier.verify("```python\nimport time\ntime.sleep(30)\n```", sum_task(time_limit_s=0.5))
    assert verdict.reason == "timeout" and time.monotonic() - start < 5.0


def test_binary_score_without_partial_credit():
    verifier = CodeVerifier(limits=Limits(wall_s=3.0, cpu_s=2), workers=1)
    assert verifier.verify("```python\nprint(3)\n```", sum_task()).score == 0.0


@pytest.mark.parametrize("got,expected,mode,match", [
    ("3\n", "3\n", "exact", True),
    ("3", "3\n", "exact", True),
    ("3\r\n", "3\n", "exact", True),
    ("3 \n", "3\n", "exact", False),
    ("1\n2\n", "1 2", "whitespace", True),
    ("1  2\t\n\n", "1 2\n", "whitespace", True),
    ("1.0", "1", "whitespace", False),
    ("", "", "whitespace", True),
    ("12", "1 2", "whitespace", False),
])
def test_outputs_match(got, expected, mode, match):
    assert outputs_match(got, expected, mode) is match


@pytest.mark.parametrize("meta,message", [
    ({"io_tests": []}, "non-empty list"),
    ({"io_tests": [{"input": "1"}]}, r"io_tests\[0\]"),
    ({"io_tests": [{"input": "1", "output": "1"}], "compare": "float"}, "compare='float'"),
    ({"io_tests": [{"input": "1", "output": "1"}], "time_limit_s": 0}, "time_limit_s=0"),
])
def test_bad_io_meta_is_an_error_naming_the_example(meta, message):
    verifier = CodeVerifier(limits=Limits(wall_s=3.0, cpu_s=2), workers=1)
    with pytest.raises(ConfigError, match=f"example 'io/bad'.*{message}"):
        verifier.verify("print(1)", Example("io/bad", "p", None, meta=meta))


@needs_bwrap
def test_a_sandbox_that_fails_to_start_is_reported_and_logged_on_both_paths(caplog):
    """bwrap that passes the verifier's trial run, then refuses to start programs: stdin/stdout and
    function-test examples both get reason ``sandbox_error`` (never a wrong answer) and both log it (the
    stdin/stdout path used not to: a broken sandbox looked like a run of failing programs)."""


    real = shutil.which("bwrap")
    with world_searchable_dir() as d:                          # runs start as another uid
        broken, fake = Path(d) / "broken", Path(d) / "bwrap"
        fake.write_text(f"#!/bin/sh\nif [ -e {broken} ]; then echo 'bwrap: Creating new namespace failed' >&2; "
                        f"exit 1; fi\nexec {real} \"$@\"\n")
        fake.chmod(0o755)
        verifier = CodeVerifier()
        verifier.sandbox = Sandbox(verifier.sandbox.limits, backend="bwrap", bwrap=str(fake))
        verifier.pool = SandboxPool(verifier.sandbox, workers=1)
        broken.touch()
        function_task = Example("fn/add", "def add(a, b):", None,
                                meta={"entry_point": "add", "tests": ["assert add(1, 2) == 3"]})
        with caplog.at_level(logging.ERROR, logger="r1kit.rewards.code"):
            verdicts = verifier.verify_batch([f"```python\n{SUM}print(a + b)\n```",
                                              "```python\ndef add(a, b):\n    return a + b\n```"],
                                             [sum_task(), function_task])
    assert [(v.correct, v.reason) for v in verdicts] == [(False, "sandbox_error"), (False, "sandbox_error")]
    logged = [r.getMessage() for r in caplog.records if "sandbox failed to start" in r.getMessage()]
    assert len(logged) == 3 and all("Creating new namespace failed" in m for m in logged)  # 2 io runs + 1 harness
