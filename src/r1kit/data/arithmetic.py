"""Generated arithmetic: the corpus and task of r1kit's from-scratch DeepSeek-V3 (R1-Zero in miniature).

A problem is ``"a+b="`` or ``"a-b="`` with a, b in [0, max_operand] (49 by default: 5,000 problems);
its answer is the integer result (``"37+48="`` → ``"85"``, ``"12-40="`` → ``"-28"``). Every problem
belongs to one split for good:
``test`` when sha256(``SPLIT_SALT`` + prompt) falls in the lowest ``TEST_FRACTION`` of hashes, else
``train``. Pretraining draws only train problems, so the test split is held out from pretraining and
GRPO alike.
"""

from __future__ import annotations

import hashlib
import random

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
