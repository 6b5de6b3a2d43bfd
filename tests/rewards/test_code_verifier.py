"""The code verifier: extraction, specific failure reasons, partial credit, reward hacks that must
not pay, and canonical vs broken solutions of HumanEval and MBPP."""

import random

import pytest

from r1kit.data.base import Example, get_task_loader
from r1kit.errors import ConfigError
from r1kit.rewards.base import Verifier
from r1kit.rewards.code import REASONS, CodeVerifier, extract_program
from r1kit.rewards.registry import get_verifier
from r1kit.rewards.sandbox import Limits, SandboxWarning

LIMITS = Limits(wall_s=3.0, cpu_s=2, memory_mb=512)
ADD = Example("toy/add", "Write add(a, b).", None, meta={
    "entry_point": "add", "test_setup": "",
    "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, -1) == -2"]})


@pytest.fixture(scope="module")
def verifier():
    return get_verifier("code", limits=LIMITS, workers=2)


@pytest.fixture(scope="module")
def partial():
    return CodeVerifier(partial_credit=True, limits=LIMITS, workers=2)


@pytest.fixture(scope="module")
def humaneval():
    return get_task_loader("humaneval")("test")


def fence(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_registry_builds_a_verifier(verifier):
    assert isinstance(verifier, Verifier) and verifier.name == "code"


@pytest.mark.parametrize("completion,expected", [
    ("a\n```python\ndef a(): pass\n```\nb\n```python\ndef b(): pass\n```", "def b(): pass\n"),
    ("<think>```python\ndef bad(\n```</think>\n```py\nx = 1\n```", "x = 1\n"),
    ("```\ndef f(): return 1\n```", "def f(): return 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),
    ("```bash\nls\n```", None),
    ("The answer is 42.", None),
    ("```python\n\n```", None),
])
def test_extract_program(completion, expected):
    assert extract_program(completion) == expected


def test_extract_prefers_the_last_block_defining_the_entry_point():
    completion = ("```python\ndef add(a, b):\n    return a - b\n```\nFixed:\n```python\ndef add(a, b):\n    return a + b\n```\n"
                  "Usage:\n```python\nprint(add(1, 2))\n```")
    assert extract_program(completion, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_program(completion) == "print(add(1, 2))\n"


@pytest.mark.parametrize("completion,reason", [
    ("", "empty"),
    ("  \n\t", "empty"),
    ("I would add the two numbers.", "no_code"),
    (fence("def add(a, b) return a + b"), "syntax_error"),
    (fence("def plus(a, b):\n    return a + b"), "wrong_entry_point"),
    (fence("raise ValueError('at import')\ndef add(a, b):\n    return a + b"), "runtime_error"),
    (fence("def add(a, b):\n    while True:\n        pass"), "timeout"),
    (fence("import ctypes\ndef add(a, b):\n    return ctypes.string_at(0)"), "crashed"),
    (fence("def add(a, b):\n    return a - b"), "tests_failed"),
    (fence("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)"), "runtime_error"),
    (fence("import os\ndef add(a, b):\n    return 0\nos._exit(0)"), "tests_failed"),
    (fence("import os\ndef add(a, b):\n    return 0\nfor i in range(3):\n    os.write(3, f'pass {i}\\n'.encode())\n"
           "os.write(3, b'done\\n')\nprint('pass 0')\nos._exit(0)"), "tests_failed"),
])
def test_failures_have_specific_reasons(verifier, completion, reason):
    verdict = verifier.verify(completion, ADD)
    assert (verdict.correct, verdict.score, verdict.reason) == (False, 0.0, reason)
    assert reason in REASONS


@pytest.mark.parametrize("hack", [
    "import builtins\nbuiltins.exec = lambda *a, **k: None",
    "import os\n_w = os.write\nos.write = lambda fd, data: _w(fd, data.replace(b'fail', b'pass'))",
    "import builtins\nbuiltins.range = lambda n: [0, -3, -6]\nbuiltins.enumerate = lambda xs: [(0, 'pass'), (-3, 'pass'), (-6, 'pass')]",
])
def test_patching_the_harness_does_not_pay(verifier, hack):
    verdict = verifier.verify(fence(f"def add(a, b):\n    return 0\n{hack}"), ADD)
    assert (verdict.correct, verdict.score, verdict.reason) == (False, 0.0, "tests_failed")


def test_main_block_is_not_run(verifier):
    completion = fence("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(int(input()), 1))")
    assert verifier.verify(completion, ADD).reason == "ok"


def test_correct_chat_completion_after_think(verifier):
    completion = "<think>add them</think>\n" + fence("def add(a, b):\n    return a + b")
    verdict = verifier.verify(completion, ADD)
    assert (verdict.correct, verdict.score, verdict.reason) == (True, 1.0, "ok")
    assert verdict.extracted == "def add(a, b):\n    return a + b\n"


def test_partial_credit_is_the_fraction_of_tests(verifier, partial):
    completion = fence("def add(a, b):\n    return a + b if a > 0 else 0")  # fails only add(-1, -1)
    binary, fraction = verifier.verify(completion, ADD), partial.verify(completion, ADD)
    assert (binary.correct, binary.score, binary.reason) == (False, 0.0, "tests_failed")
    assert (fraction.correct, fraction.reason) == (False, "tests_failed")
    assert fraction.score == pytest.approx(2 / 3)


def test_partial_credit_keeps_steps_before_a_timeout(partial):
    completion = fence("def add(a, b):\n    if a < 0:\n        while True: pass\n    return a + b")
    verdict = partial.verify(completion, ADD)
    assert (verdict.reason, verdict.score) == ("timeout", pytest.approx(2 / 3))


@pytest.mark.parametrize("form", ["body", "fenced_function", "fenced_body", "think_then_body"])
def test_humaneval_completion_forms(verifier, humaneval, form):
    example = humaneval[0]
    body = example.meta["canonical_solution"][len(example.meta["prompt_code"]):]
    function = "def has_close_elements(numbers, threshold):\n" + body
    completion = {"body": body, "fenced_function": fence(function), "fenced_body": fence(body),
                  "think_then_body": "<think>pairs</think>" + body}[form]
    assert verifier.verify(completion, example).reason == "ok"


@pytest.mark.parametrize("completion,reason", [
    (fence("def close(numbers, threshold):\n    return False"), "wrong_entry_point"),
    ("It returns True when two numbers are close.", "no_code"),
    ("    for x in numbers:\n  return", "syntax_error"),
    ("    return False\n", "tests_failed"),
])
def test_humaneval_failures(verifier, humaneval, completion, reason):
    assert verifier.verify(completion, humaneval[0]).reason == reason


def test_verify_batch_checks_lengths(verifier):
    """The same ConfigError as the math verifier's (``rewards.base.batch_flags``), truncation flags counted."""
    with pytest.raises(ConfigError, match="^verify_batch got 2 completions for 1 examples and 2 truncation flags$"):
        verifier.verify_batch(["", ""], [ADD])
    with pytest.raises(ConfigError, match="^verify_batch got 1 completions for 1 examples and 3 truncation flags$"):
        verifier.verify_batch([""], [ADD], truncated=[False] * 3)


def test_math_examples_are_a_config_error(verifier):
    with pytest.raises(ConfigError, match="'gsm8k/test/0' has no meta"):
        verifier.verify("42", Example("gsm8k/test/0", "1+41?", "42"))


@pytest.mark.parametrize("completion", [
    fence("def add(a, b):\n    return a + b  # \ud800"),
    fence("def add(a, b):\n    return a + b\x00"),
    fence("(" * 300 + ")" * 300),
])
def test_undecodable_or_pathological_code_is_a_syntax_error(verifier, completion):
    assert verifier.verify(completion, ADD).reason == "syntax_error"


def test_sandbox_survives_a_lone_surrogate(verifier):
    result = verifier.sandbox.run("print('\ud800')")
    assert result.status == "error" and "UnicodeDecodeError" in result.stderr


def test_limits_from_a_config_dict():
    assert CodeVerifier(limits={"wall_s": 2.5, "nproc": 8}).sandbox.limits == Limits(wall_s=2.5, nproc=8)
    with pytest.raises(ConfigError, match="unknown field.*'walltime'"):
        CodeVerifier(limits={"walltime": 2})


def test_partial_credit_must_be_boolean():
    with pytest.raises(ConfigError, match="partial_credit"):
        CodeVerifier(partial_credit="yes")


def test_fallback_backend_verifies_too():
    with pytest.warns(SandboxWarning):
        fallback = CodeVerifier(limits=LIMITS, backend="rlimit", workers=1)
    assert fallback.verify(fence("def add(a, b):\n    return a + b"), ADD).correct


def test_humaneval_canonical_solutions_all_pass(verifier, humaneval):
    completions = [e.meta["canonical_solution"][len(e.meta["prompt_code"]):] for e in humaneval]
    verdicts = verifier.verify_batch(completions, humaneval)
    assert [(e.id, v.reason) for e, v in zip(humaneval, verdicts) if not v.correct] == []


def test_humaneval_broken_solutions_fail(verifier, humaneval):
    sample = random.Random(0).sample(humaneval, 30)
    verdicts = verifier.verify_batch(["    return None\n"] * len(sample), sample)
    assert [e.id for e, v in zip(sample, verdicts) if v.correct] == []


def test_mbpp_canonical_pass_and_broken_fail(verifier):
    rows = [e for split in ("prompt", "test", "validation", "train") for e in get_task_loader("mbpp")(split)]
    sample = random.Random(0).sample(rows, 40)
    canonical = [fence(e.meta["canonical_solution"]) for e in sample]
    broken = [fence(e.meta["canonical_solution"] + f"\n{e.meta['entry_point']} = lambda *a, **k: None") for e in sample]
    verdicts = verifier.verify_batch(canonical + broken, sample + sample)
    assert [e.id for e, v in zip(sample, verdicts[:40]) if not v.correct] == []
    assert [e.id for e, v in zip(sample, verdicts[40:]) if v.correct] == []
