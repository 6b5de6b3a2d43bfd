"""Generated arithmetic: the corpus and task of r1kit's from-scratch DeepSeek-V3 (R1-Zero in miniature).

A problem is ``"a+b="`` or ``"a-b="`` with a, b in [0, max_operand] (49 by default: 5,000 problems);
its answer is the integer result (``"37+48="`` → ``"85"``, ``"12-40="`` → ``"-28"``). Every problem
belongs to one split for good:
``test`` when sha256(``SPLIT_SALT`` + prompt) falls in the lowest ``TEST_FRACTION`` of hashes, else
``train``. Pretraining draws only train problems, so the test split is held out from pretraining and
GRPO alike.

``arithmetic_chain`` is the same idea with intermediate steps: ``"12+34+56="`` is answered by its
worked trace ``"46+56=102"`` (``worked_trace``: the first two operands replaced by their result until
one number is left); the verifier reads only the number after the last ``=``. Its split hashes the
operands, not the signs.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from functools import lru_cache

from r1kit.data.base import Example, register_task
from r1kit.errors import ConfigError, DataError

SPLIT_SALT = "r1kit-arithmetic-split-v1:"
TEST_FRACTION = 0.1
MAX_OPERAND = 49


def _hash(prompt: str) -> int:
    return int(hashlib.sha256((SPLIT_SALT + prompt).encode()).hexdigest()[:16], 16)


def is_test_problem(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out test split."""
    return _hash(prompt) < TEST_FRACTION * 16**16


def solve(a: int, op: str, b: int) -> str:
    """The answer string of ``a op b`` for op ``+`` or ``-``."""
    return str(a + b if op == "+" else a - b)


def random_problem(rng: random.Random, max_operand: int = MAX_OPERAND, split: str = "train") -> tuple[str, str]:
    """A uniformly drawn (prompt, answer) of ``split``: operands in [0, max_operand], ``+`` or ``-``
    with equal probability (test problems are redrawn when ``split="train"`` and vice versa)."""
    while True:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-")
        prompt = f"{a}{op}{b}="
        if is_test_problem(prompt) == (split == "test"):
            return prompt, solve(a, op, b)


@register_task("arithmetic", verifier="math")
def arithmetic(split: str = "train", max_operand: int = MAX_OPERAND) -> list[Example]:
    """Every ``a±b=`` problem of ``split`` (operands in [0, max_operand]), in a fixed hash order, so
    that the first N are a uniform sample. Ids are ``"arithmetic/<split>/<prompt>"``.

    Use with the ``bare`` template and ``answer_extraction="any"``. Raises DataError for an unknown
    split, ConfigError for a negative ``max_operand``.
    """
    if split not in ("train", "test"):
        raise DataError(f"task 'arithmetic' has no split {split!r}; splits: train, test")
    if max_operand < 0:
        raise ConfigError(f"max_operand must be >= 0, got {max_operand}")
    problems = [(f"{a}{op}{b}=", solve(a, op, b)) for a in range(max_operand + 1) for b in range(max_operand + 1)
                for op in "+-"]
    kept = sorted((p for p in problems if is_test_problem(p[0]) == (split == "test")), key=lambda p: _hash(p[0]))
    return [Example(f"arithmetic/{split}/{prompt[:-1]}", prompt, answer) for prompt, answer in kept]


# --- multi-step chains: "a±b±c=" answered with a worked trace ------------------------------------------
CHAIN_SALT = "r1kit-arithmetic-chain-split-v1:"
CHAIN_MAX_OPERAND = 29
CHAIN_OPERANDS = 3
_TERM = re.compile(r"([+-]?)(\d+)")


def chain_terms(prompt: str) -> tuple[list[int], list[str]]:
    """``"12-34+5="`` → ``([12, 34, 5], ["-", "+"])``. Raises DataError for a prompt that is not a
    chain of non-negative integers joined by ``+``/``-`` and ended by ``=``."""
    body = prompt[:-1] if prompt.endswith("=") else None
    terms = _TERM.findall(body or "")
    if body is None or not terms or terms[0][0] or "".join(s + d for s, d in terms) != body:
        raise DataError(f"not an arithmetic chain: {prompt!r}; expected e.g. '12-34+5='")
    return [int(d) for _, d in terms], [s for s, _ in terms[1:]]


def is_chain_test_problem(prompt: str) -> bool:
    """Whether the chain ``prompt`` belongs to the held-out test split. The hash covers the operands
    only, not the signs: ``12+34+5=`` and ``12-34-5=`` are in the same split, so no test problem shares
    its numbers with a train one (the sampler's n-gram decontamination reads both as ``12 34 5``)."""
    return _chain_hash(chain_terms(prompt)[0]) < TEST_FRACTION * 16**16


def _chain_hash(operands) -> int:
    return int(hashlib.sha256((CHAIN_SALT + " ".join(map(str, operands))).encode()).hexdigest()[:16], 16)


def worked_trace(prompt: str) -> str:
    """The completion of a chain that writes its steps: the first two operands are replaced by their
    result and the rest is rewritten, until one number is left, which is the answer (the text after the
    last ``=``): ``"12+34+56="`` → ``"46+56=102"``, ``"12-34+5-7="`` → ``"-22+5-7=-17-7=-24"``.
    A two-operand prompt's trace is its answer alone. Raises DataError for a malformed prompt."""
    operands, signs = chain_terms(prompt)
    value, steps = operands[0], []
    for i, (sign, b) in enumerate(zip(signs, operands[1:])):
        value = value + b if sign == "+" else value - b
        rest = "".join(s + str(x) for s, x in zip(signs[i + 1:], operands[i + 2:]))
        steps.append(f"{value}{rest}")
    return "=".join(steps)


def chain_answer(prompt: str) -> str:
    """The integer result of a chain prompt (the text after the last ``=`` of ``worked_trace``)."""
    return worked_trace(prompt).rsplit("=", 1)[-1]


def random_chain_problem(rng: random.Random, max_operand: int = CHAIN_MAX_OPERAND, split: str = "train",
                         operands: int = CHAIN_OPERANDS) -> tuple[str, str]:
    """A uniformly drawn (prompt, worked trace) of ``split``: ``operands`` integers in [0, max_operand]
    joined by ``+``/``-`` with equal probability (problems of the other split are redrawn)."""
    while True:
        xs = [rng.randint(0, max_operand) for _ in range(operands)]
        prompt = str(xs[0]) + "".join(rng.choice("+-") + str(x) for x in xs[1:]) + "="
        if is_chain_test_problem(prompt) == (split == "test"):
            return prompt, worked_trace(prompt)


@register_task("arithmetic_chain", verifier="math")
def arithmetic_chain(split: str = "train", max_operand: int = CHAIN_MAX_OPERAND,
                     operands: int = CHAIN_OPERANDS) -> list[Example]:
    """Every ``a±b±c=`` problem of ``split`` (``operands`` integers in [0, max_operand]; 108,000 in
    all by default, 10% of operand triples held out), in a fixed hash order, so that the first N are
    a uniform sample. Gold = the integer result; ``meta["trace"]`` = ``worked_trace`` (what
    pretraining shows; the verifier reads only the number after the last ``=``). Ids are
    ``"arithmetic_chain/<split>/<prompt>"``.

    Use with the ``bare`` template and ``answer_extraction="any"``. Raises DataError for an unknown
    split, ConfigError for a negative ``max_operand`` or fewer than 2 ``operands``.
    """
    if split not in ("train", "test"):
        raise DataError(f"task 'arithmetic_chain' has no split {split!r}; splits: train, test")
    if max_operand < 0 or operands < 2:
        raise ConfigError(f"max_operand must be >= 0 and operands >= 2, got {max_operand} and {operands}")
    return [Example(f"arithmetic_chain/{split}/{prompt[:-1]}", prompt, trace.rsplit("=", 1)[-1], {"trace": trace})
            for prompt, trace in _chain_split(split, max_operand, operands)]


@lru_cache(maxsize=8)
def _chain_split(split: str, max_operand: int, operands: int) -> tuple[tuple[str, str], ...]:
    """(prompt, trace) of every chain problem of ``split``, ordered by sha256(salt + prompt)."""
    rows = []
    for xs in itertools.product(range(max_operand + 1), repeat=operands):
        if (_chain_hash(xs) < TEST_FRACTION * 16**16) != (split == "test"):
            continue
        for signs in itertools.product("+-", repeat=operands - 1):
            prompt = str(xs[0]) + "".join(s + str(x) for s, x in zip(signs, xs[1:])) + "="
            rows.append((_hash(prompt), prompt))
    return tuple((prompt, worked_trace(prompt)) for _, prompt in sorted(rows))


# --- the pretraining corpora of the from-scratch V3 (r1kit.models.v3_pretrain) --------------------------
MAX_COMPLETION_TOKENS = {"arithmetic": 6, "arithmetic_chain": 12}  # longest completion + eos, in characters


def random_document(task: str, rng: random.Random, max_operand: int | None = None,
                    split: str = "train") -> tuple[str, str]:
    """One pretraining (prompt, completion) of ``task``: ``"37+48="``, ``"85"`` for ``arithmetic``;
    ``"12+34+56="``, ``"46+56=102"`` (the worked trace) for ``arithmetic_chain``. ``max_operand``
    None = the task's default. Raises ConfigError for another task."""
    if task == "arithmetic":
        return random_problem(rng, MAX_OPERAND if max_operand is None else max_operand, split)
    if task == "arithmetic_chain":
        return random_chain_problem(rng, CHAIN_MAX_OPERAND if max_operand is None else max_operand, split)
    raise ConfigError(f"no generated pretraining corpus for task {task!r}; choose one of {', '.join(MAX_COMPLETION_TOKENS)}")
