"""The code verifier against reward hacks and against unusual but correct programs.

Each case runs the real harness in the real sandbox. Must earn nothing: objects with rigged
``__eq__``/``__hash__``/``__bool__``, subclasses of builtins, patched builtins and modules, exits
before the tests, forged reports, threads and trace hooks left behind, a redefined prompt helper,
programs that print forever, fork or sleep. Must earn full reward: correct programs written in
unusual ways (builtin subclasses with the right value, generators, ``map``, ``Counter``, threads that
finish, a redefined builtin name inside the program, the program's own classes used by the tests).
All cases are graded in one batch (a module fixture), so the suite costs one pool run.
"""

import pytest

from r1kit.data.base import Example
from r1kit.rewards.code import CodeVerifier, guard_test
from r1kit.rewards.sandbox import Limits


def task(name: str, entry_point: str, tests: list[str], setup: str = "", prompt_code: str = "") -> Example:
    meta = {"entry_point": entry_point, "tests": tests, "test_setup": setup}
    if prompt_code:
        meta["prompt_code"] = prompt_code
    return Example(f"adv/{name}", "p", None, meta=meta)


ADD = task("add", "add", ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, -1) == -2"])
HALF = task("half", "half", ["assert abs(half(3) - 1.5) < 1e-9", "assert math.isclose(half(1), 0.5)"],
            setup="import math")
EVEN = task("even", "is_even", ["assert is_even(2)", "assert not is_even(3)", "assert is_even(4) is True"])
WORDS = task("words", "split_words", ['assert split_words("a b") == ["a", "b"]', 'assert "b" in split_words("a b")',
                                      'assert len(split_words("x y z")) == 3'])
COUNT = task("count", "count_chars", ['assert count_chars("aab") == {"a": 2, "b": 1}'])
PAIRS = task("pairs", "longest", ["assert longest([Pair(1, 2), Pair(3, 4)]) == 2", "assert longest([]) == 0"])
QUAD = task("quad", "quad", ["assert double(candidate(1)) == 8", "assert candidate(2) == 8"],
            setup="candidate = quad",
            prompt_code='def double(x):\n    return 2 * x\n\n\ndef quad(x):\n    """Four times x."""\n')
MATHY = task("mathy", "root", ["assert math.isclose(root(4.0), 2.0)", "assert math.isclose(root(9.0), 3.0)"])

RIGGED = "class R:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
EARN_NOTHING = [
    # (name, example, program, reason)
    ("eq_always_true", ADD, RIGGED + "def add(a, b): return R()", "untrusted_result"),
    ("eq_in_a_list", WORDS, RIGGED + "def split_words(s): return [R(), R()]", "untrusted_result"),
    ("int_subclass_eq", ADD, "class I(int):\n    __eq__ = lambda s, o: True\ndef add(a, b): return I(0)", "tests_failed"),
    ("str_subclass_eq", WORDS, "class S(str):\n    __eq__ = lambda s, o: True\n    __hash__ = str.__hash__\n"
                               "def split_words(s): return [S('q'), S('q')]", "tests_failed"),
    ("list_subclass_eq", WORDS, "class L(list):\n    __eq__ = lambda s, o: True\n    __len__ = lambda s: 3\n"
                                "    __contains__ = lambda s, x: True\ndef split_words(s): return L()", "tests_failed"),
    ("dict_subclass_eq", COUNT, "class D(dict):\n    __eq__ = lambda s, o: True\ndef count_chars(s): return D()",
     "tests_failed"),
    ("float_subclass_sub", HALF, "class F(float):\n    __sub__ = lambda s, o: 0.0\n    __eq__ = lambda s, o: True\n"
                                 "def half(x): return F(7.0)", "tests_failed"),
    ("bool_counter", EVEN, "class B:\n    n = 0\n    def __bool__(self):\n        B.n += 1\n        return B.n == 1\n"
                           "def is_even(n): return B()", "untrusted_result"),
    ("hash_eq_for_in", WORDS, "class H:\n    __hash__ = lambda s: hash('b')\n    __eq__ = lambda s, o: True\n"
                              "def split_words(s): return {H()}", "untrusted_result"),
    ("len_only", WORDS, "class N:\n    __len__ = lambda s: 3\n    __contains__ = lambda s, x: True\n"
                        "    __eq__ = lambda s, o: True\ndef split_words(s): return N()", "untrusted_result"),
    ("class_spoofs_int", ADD, "class R:\n    __class__ = property(lambda s: int)\n    __eq__ = lambda s, o: True\n"
                              "def add(a, b): return R()", "untrusted_result"),
    ("metaclass_instance", ADD, "class M(type):\n    __eq__ = lambda c, o: True\n    __hash__ = type.__hash__\n"
                                "class add(metaclass=M):\n    def __init__(self, a, b): pass\n    __eq__ = lambda s, o: True",
     "untrusted_result"),
    ("generator_of_rigged", WORDS, RIGGED + "def split_words(s):\n    yield R()\n    yield R()", "untrusted_result"),
    ("patch_builtins_abs", HALF, "import builtins, math\nbuiltins.abs = lambda x: 0\nmath.isclose = lambda *a, **k: True\n"
                                 "def half(x): return 99.0", "tests_failed"),
    ("patch_abs_at_call", HALF, "def half(x):\n    import builtins, math\n    builtins.abs = lambda x: 0\n"
                                "    math.isclose = lambda *a, **k: True\n    return 99.0", "tests_failed"),
    ("module_level_abs", HALF, "import math\nabs = lambda x: 0\nclass math:\n    isclose = staticmethod(lambda *a: True)\n"
                               "def half(x): return 99.0", "tests_failed"),
    ("fake_math_module", MATHY, "import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a: True\n"
                                "sys.modules['math'] = fake\nmath = fake\ndef root(x): return -1.0", "tests_failed"),
    ("patch_assertion_error", ADD, "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
                                   "def add(a, b): return 0", "tests_failed"),
    ("builtins_dict_via_globals", ADD, "def add(a, b):\n    globals()['__builtins__'].AssertionError = KeyError\n"
                                       "    return 0", "tests_failed"),
    ("redefine_prompt_helper", QUAD, "def double(x):\n    return 8\n\ndef quad(x):\n    return 0", "tests_failed"),
    ("harness_names", ADD, "__r1kit_clean__ = __r1kit_call__ = lambda *a: True\n" + RIGGED + "def add(a, b): return R()",
     "untrusted_result"),
    ("sys_exit_before_tests", ADD, "import sys\ndef add(a, b): return 0\nsys.exit(0)", "runtime_error"),
    ("os_exit_before_tests", ADD, "import os\ndef add(a, b): return 0\nos._exit(0)", "tests_failed"),
    ("exit_inside_call", ADD, "import os\ndef add(a, b): os._exit(0)", "tests_failed"),
    ("kill_self", ADD, "import os, signal\ndef add(a, b): os.kill(os.getpid(), signal.SIGKILL)", "timeout"),
    ("reread_nonce_forge", ADD, "import os\ndef add(a, b): return 0\nos.lseek(0, 0, 0)\nn = (os.read(0, 100).decode().split() or ['x'])[0]\n"
                                "os.write(3, f'{n} pass 0\\n{n} pass 1\\n{n} pass 2\\n{n} done\\n'.encode())\nos._exit(0)",
     "tests_failed"),
    ("proc_stdin_forge", ADD, "n = open('/proc/self/fd/0').read().split()\nimport os\n"
                              "os.write(3, ''.join(f'{w} pass 0\\n{w} pass 1\\n{w} pass 2\\n{w} done\\n' for w in n).encode())\n"
                              "def add(a, b): return 0", "tests_failed"),
    ("guessed_report", ADD, "import os\nfor i in range(3): os.write(3, f'pass {i}\\n'.encode())\nos.write(3, b'done\\n')\n"
                            "print('pass 0')\ndef add(a, b): return 0", "tests_failed"),
    ("flood_channel", ADD, "import os\nos.write(3, b'x' * 70000)\ndef add(a, b): return 0", "output_limit"),
    ("close_channel", ADD, "import os\nos.close(3)\ndef add(a, b): return a + b", "tests_failed"),
    ("thread_repatches", HALF, "import threading, builtins, time\ndef loop():\n    while True:\n"
                               "        builtins.abs = lambda x: 0\nthreading.Thread(target=loop, daemon=True).start()\n"
                               "def half(x): return 99.0", "untrusted_result"),
    ("finalizer_repatches", HALF, "import gc, builtins, math\ngc.set_threshold(1)\nclass Bomb:\n"
                                  "    def __del__(self):\n        builtins.abs = lambda x: 0\n"
                                  "        math.isclose = lambda *a, **k: True\n"
                                  "def half(x):\n    b = Bomb()\n    b.me = b\n    return 99.0", "tests_failed"),
    ("import_in_test_patched", task("imp", "f", ["import math\nassert math.isclose(f(), 2.0)"]),
     "import math\nmath.isclose = lambda *a, **k: True\ndef f(): return 7.0", "tests_failed"),
    ("settrace_hook", ADD, "import sys\ndef tr(frame, event, arg):\n    frame.f_locals.clear()\n    return tr\n"
                           "sys.settrace(tr)\ndef add(a, b): return 0", "tests_failed"),
    ("raise_in_eq_of_expected", ADD, "def add(a, b):\n    raise SystemExit(0)", "tests_failed"),
    ("print_forever", ADD, "import sys\ndef add(a, b):\n    while True: sys.stdout.write('x' * 65536)", "output_limit"),
    ("fork_bomb", ADD, "import os\ndef add(a, b):\n    while True:\n        try: os.fork()\n        except OSError: pass",
     "timeout"),
    ("sleep_forever", ADD, "import time\ndef add(a, b):\n    time.sleep(60)", "timeout"),
    ("wrong_answer", ADD, "def add(a, b): return a - b", "tests_failed"),
]

EARN_FULL = [
    # (name, example, program)
    ("int_subclass_right_value", ADD, "class I(int):\n    pass\ndef add(a, b): return I(a + b)"),
    ("bool_result", EVEN, "def is_even(n): return n % 2 == 0"),
    ("int_enum", ADD, "import enum\nclass E(enum.IntEnum):\n    THREE = 3\n    FOUR = 4\n    M2 = -2\n"
                      "def add(a, b): return E(a + b)"),
    ("float_subclass", HALF, "class F(float):\n    pass\ndef half(x): return F(x / 2)"),
    ("numbers_fraction_free", HALF, "def half(x):\n    return x * 0.5"),
    ("str_subclass", WORDS, "class S(str):\n    pass\ndef split_words(s): return [S(w) for w in s.split()]"),
    ("list_subclass", WORDS, "class L(list):\n    pass\ndef split_words(s): return L(s.split())"),
    ("counter", COUNT, "from collections import Counter\ndef count_chars(s): return Counter(s)"),
    ("defaultdict", COUNT, "from collections import defaultdict\ndef count_chars(s):\n    d = defaultdict(int)\n"
                           "    for c in s: d[c] += 1\n    return d"),
    ("ordered_dict", COUNT, "from collections import OrderedDict\ndef count_chars(s):\n"
                            "    return OrderedDict((c, s.count(c)) for c in s)"),
    ("recursion", ADD, "import sys\nsys.setrecursionlimit(10000)\ndef add(a, b):\n"
                       "    return a if b == 0 else (add(a + 1, b - 1) if b > 0 else add(a - 1, b + 1))"),
    ("lru_cache", ADD, "from functools import lru_cache\n@lru_cache(None)\ndef add(a, b): return a + b"),
    ("finished_thread", ADD, "import threading\ndef add(a, b):\n    out = []\n"
                             "    t = threading.Thread(target=lambda: out.append(a + b))\n    t.start(); t.join()\n    return out[0]"),
    ("own_math_use", HALF, "import math\ndef half(x): return math.ldexp(x, -1)"),
    ("shadowing_builtin_in_program", ADD, "abs = None\nsum = lambda *a: 0\ndef add(a, b): return a + b"),
    ("prints_debug", ADD, "def add(a, b):\n    print('pass 0 done', a, b)\n    return a + b"),
    ("main_block_skipped", ADD, "def add(a, b): return a + b\nif __name__ == '__main__':\n    input()"),
    ("globals_state", ADD, "CALLS = 0\ndef add(a, b):\n    global CALLS\n    CALLS += 1\n    return a + b"),
    ("own_eq_class_inside", ADD, "class V:\n    def __init__(self, x): self.x = x\n    def __eq__(self, o): return True\n"
                                 "def add(a, b): return V(a).x + V(b).x"),
    ("program_class_used_by_tests", PAIRS, "class Pair:\n    def __init__(self, a, b): self.a, self.b = a, b\n"
                                           "def longest(pairs): return len(pairs)"),
    ("helper_redefined_harmlessly", QUAD, "def double(x):\n    return x + x\n\ndef quad(x):\n    return double(double(x))"),
    ("patches_math_then_correct", MATHY, "import math\nmath.isclose = lambda *a, **k: False\n"
                                         "def root(x): return x ** 0.5"),
    ("patches_builtins_then_correct", ADD, "import builtins\nbuiltins.abs = None\ndef add(a, b): return a + b"),
    ("lambda_entry", ADD, "add = lambda a, b: a + b"),
    ("class_callable_instance_returns_int", ADD, "class Adder:\n    def __call__(self, a, b): return a + b\nadd = Adder()"),
    ("big_int", ADD, "def add(a, b): return (a + b) * (10 ** 5000) // (10 ** 5000)"),
    ("words_tuple_elements", WORDS, "def split_words(s): return list(tuple(s.split()))"),
    ("set_membership", WORDS, "def split_words(s):\n    return [w for w in s.split(' ') if w]"),
    ("even_int_subclass_bool", EVEN, "def is_even(n): return bool(n % 2 == 0)"),
    ("numpy_free_root", MATHY, "def root(x):\n    r = x\n    for _ in range(60): r = (r + x / r) / 2\n    return r"),
    ("count_dict_comprehension", COUNT, "def count_chars(s): return {c: s.count(c) for c in dict.fromkeys(s)}"),
    ("unicode_names", ADD, "def add(a, b):\n    résultat = a + b\n    return résultat"),
]


def fence(program: str) -> str:
    return f"```python\n{program}\n```"


@pytest.fixture(scope="module")
def verdicts():
    """Every case of both suites graded in one batch: {name: Verdict}."""
    verifier = CodeVerifier(limits=Limits(wall_s=3.0, cpu_s=2, memory_mb=512, nproc=16), workers=2)
    cases = [(n, e, p) for n, e, p, _ in EARN_NOTHING] + EARN_FULL
    graded = verifier.verify_batch([fence(p) for _, _, p in cases], [e for _, e, _ in cases])
    return {name: v for (name, _, _), v in zip(cases, graded)}


@pytest.mark.parametrize("name,reason", [(n, r) for n, _, _, r in EARN_NOTHING], ids=[c[0] for c in EARN_NOTHING])
def test_earns_nothing(verdicts, name, reason):
    v = verdicts[name]
    assert (v.correct, v.score, v.reason) == (False, 0.0, reason)


@pytest.mark.parametrize("name", [c[0] for c in EARN_FULL], ids=[c[0] for c in EARN_FULL])
def test_earns_full_reward(verdicts, name):
    v = verdicts[name]
    assert (v.correct, v.score, v.reason) == (True, 1.0, "ok")


def test_suites_are_large_enough():
    assert len(EARN_NOTHING) >= 30 and len(EARN_FULL) >= 30


def test_issue_example_rigged_eq_earns_nothing(verdicts):
    """Issue 10: ``add`` returning an object whose ``__eq__`` is always True passed
    ``assert add(1, 2) == 3`` with reward 1.0."""
    assert verdicts["eq_always_true"].score == 0.0


def test_guard_rewrites_calls_and_operands():
    assert guard_test("assert f(1) == 3") == "assert __r1kit_clean__(__r1kit_clean__(__r1kit_call__(f, 1)) == __r1kit_clean__(3))"
    assert guard_test("x = not g(a=1)") == "x = not __r1kit_clean__(__r1kit_call__(g, a=1))"


def test_bad_input_gets_a_verdict_and_the_verifier_grades_the_next():
    """A megabyte completion and a deeply nested expression: a verdict with a reason, no crash."""
    verifier = CodeVerifier(limits=Limits(wall_s=3.0, cpu_s=2, memory_mb=512), workers=1)
    megabyte = fence("def add(a, b):\n    return a + b\n" + "# filler\n" * 110_000)
    nested = fence("def add(a, b):\n    return " + "(" * 100_000 + "a + b" + ")" * 100_000)
    verdicts = verifier.verify_batch([megabyte, nested, fence("def add(a, b): return a + b")], [ADD] * 3)
    assert [(v.correct, v.reason) for v in verdicts] == [(True, "ok"), (False, "syntax_error"), (True, "ok")]
