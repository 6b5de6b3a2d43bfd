"""Code tasks: ``humaneval`` (Chen et al. 2021; 164 problems, split ``test``) and ``mbpp`` (Austin et
al. 2021; 974 problems in the standard splits by task_id: ``prompt`` 1-10 (few-shot), ``test``
11-510, ``validation`` 511-600, ``train`` 601-974), read from the repository's ``data/`` copies.

Each ``Example`` has ``gold=None`` and the ``meta`` fields the code verifier reads (see
``r1kit.rewards.code``): ``entry_point``, ``tests``, ``test_setup``, ``prompt_code`` (HumanEval),
plus ``canonical_solution`` (a full program that passes). Rows are validated at load: a row whose
tests or solution do not parse, or whose entry point cannot be found, raises ``DataError`` naming
the file and row.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from r1kit.data.base import Example, register_task
from r1kit.data.rows import DATA_DIR_ENV, data_dir, jsonl_rows
from r1kit.errors import DataError
from r1kit.rewards.code import parse_python

MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}

_MBPP_PROMPT = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}"
_HUMANEVAL_PROMPT = "Complete the following Python function.\n\n```python\n{prompt}```"


@register_task("humaneval", verifier="code")
def load_humaneval(split: str = "test", path: str | None = None) -> list[Example]:
    """The 164 HumanEval problems (split ``"test"`` only) from ``data/humaneval/HumanEval.jsonl.gz``
    or ``path``. Test steps: the top-level statements of ``check(candidate)``, each assert-bearing
    statement with the set-up statements before it.

    Raises DataError: unknown split, missing file, or a row that does not validate."""
    if split != "test":
        raise DataError(f"humaneval has only the split 'test' (got {split!r})")
    file = Path(path) if path else _data_file("humaneval", "HumanEval.jsonl.gz")
    return [_humaneval_example(file, n, row) for n, row in jsonl_rows(file)]


@register_task("mbpp", verifier="code")
def load_mbpp(split: str = "train", path: str | None = None) -> list[Example]:
    """MBPP problems of ``split`` (task_id ranges in ``MBPP_SPLITS``) from ``data/mbpp/mbpp.jsonl``
    or ``path``. Test steps: the rows' ``test_list`` asserts (``challenge_test_list`` is not used,
    as in the paper's evaluation). The entry point is the function of the canonical code that the
    first test calls.

    Raises DataError: unknown split, missing file, or a row that does not validate."""
    if split not in MBPP_SPLITS:
        raise DataError(f"mbpp has no split {split!r}; use one of {', '.join(MBPP_SPLITS)}")
    lo, hi = MBPP_SPLITS[split]
    file = Path(path) if path else _data_file("mbpp", "mbpp.jsonl")
    examples = [_mbpp_example(file, n, row, split) for n, row in jsonl_rows(file)]
    return [e for e in examples if lo <= e.meta["task_id"] <= hi]


def _humaneval_example(file: Path, n: int, row: dict[str, Any]) -> Example:
    where = f"{file} row {n}"
    task_id = _field(row, "task_id", str, where)
    prompt = _field(row, "prompt", str, where)
    entry_point = _field(row, "entry_point", str, where)
    solution = _field(row, "canonical_solution", str, where)
    test_module = _parse(_field(row, "test", str, where), f"{where} ({task_id}) field 'test'")
    if entry_point not in _function_names(_parse(prompt, f"{where} ({task_id}) field 'prompt'")):
        raise DataError(f"{where} ({task_id}): entry_point {entry_point!r} is not defined in the prompt")
    checks = [s for s in test_module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        raise DataError(f"{where} ({task_id}): field 'test' must define one check(candidate)")
    setup = [ast.unparse(s) for s in test_module.body if s is not checks[0]]
    return Example(
        id=f"humaneval/test/{task_id.rsplit('/', 1)[-1]}",
        prompt=_HUMANEVAL_PROMPT.format(prompt=prompt),
        gold=None,
        meta={
            "task_id": task_id,
            "entry_point": entry_point,
            "prompt_code": prompt,
            "tests": _test_steps(checks[0].body, f"{where} ({task_id})"),
            "test_setup": "\n".join(setup + [f"{checks[0].args.args[0].arg} = {entry_point}"]),
            "canonical_solution": prompt + solution,
        },
    )


def _test_steps(body: list[ast.stmt], where: str) -> list[str]:
    """Group statements into steps that each hold one assert-bearing statement, with the plain
    statements before it (imports, loop set-up); trailing plain statements join the last step."""
    steps: list[list[ast.stmt]] = [[]]
    for stmt in body:
        steps[-1].append(stmt)
        if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            steps.append([])
    if len(steps) == 1:
        raise DataError(f"{where}: check() has no assert")
    if steps[-1]:
        steps[-2].extend(steps.pop())
    return ["\n".join(ast.unparse(s) for s in step) for step in steps if step]


def _mbpp_example(file: Path, n: int, row: dict[str, Any], split: str) -> Example:
    where = f"{file} row {n}"
    task_id = _field(row, "task_id", int, where)
    text = _field(row, "text", str, where)
    code = _field(row, "code", str, where)
    tests = _field(row, "test_list", list, where)
    setup = _field(row, "test_setup_code", str, where)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where} (task {task_id}): test_list must be a non-empty list of strings")
    for i, test in enumerate(tests):
        _parse(test, f"{where} (task {task_id}) test_list[{i}]")
    defined = _function_names(_parse(code, f"{where} (task {task_id}) field 'code'"))
    entry_point = next((name for name in _called_names(tests[0]) if name in defined), None)
    if entry_point is None:
        raise DataError(f"{where} (task {task_id}): the first test calls no function defined in 'code'")
    return Example(
        id=f"mbpp/{split}/{task_id}",
        prompt=_MBPP_PROMPT.format(text=text.strip(), tests="\n".join(tests)),
        gold=None,
        meta={"task_id": task_id, "entry_point": entry_point, "tests": list(tests), "test_setup": setup,
              "canonical_solution": code},
    )


def _data_file(task: str, name: str) -> Path:
    """``<data dir>/<task>/<name>`` (see ``rows.data_dir``); DataError when the file is missing."""
    file = data_dir() / task / name
    if not file.is_file():
        raise DataError(f"{file} does not exist; set {DATA_DIR_ENV} to the data/ folder of an r1kit checkout")
    return file


def _field(row: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = row.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _parse(source: str, where: str) -> ast.Module:
    try:
        return parse_python(source)
    except (SyntaxError, ValueError) as err:
        raise DataError(f"{where}: does not parse as Python ({err})") from None


def _function_names(tree: ast.Module) -> set[str]:
    return {s.name for s in tree.body if isinstance(s, (ast.FunctionDef, ast.ClassDef))}


def _called_names(source: str) -> list[str]:
    """Names of plain functions called in ``source``, in source order."""
    calls = [n for n in ast.walk(parse_python(source)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return [c.func.id for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]
