"""Exact-first comparison of numbers for the math verifier, in place of math-verify's numeric check.

math-verify (``grader.sympy_numeric_eq``) calls two numbers equal when ``(a - b).evalf(chop=True)``
is 0, which chops any difference below ~1e-15 (``1/2004!`` = ``1/2006!``), and compares decimals after
rounding to 6 decimal places, an absolute tolerance (``1e-7`` = ``2e-7``). Every comparison inside
sets, tuples, intervals, relations and matrices goes through that one function, so r1kit replaces it
there, while a ``MathVerifier`` check runs (``hardened()``; other callers of math-verify in the same
process keep its own behaviour):

1. Exact values (no decimal written): equal when equal as rationals, or, for irrational closed
   forms (``\\sqrt{8}`` vs ``2\\sqrt{2}``), when they agree to ``EXACT_DIGITS`` significant digits
   evaluated at higher precision; else math-verify goes on to ``simplify(gold - pred) == 0``.
2. A decimal against a decimal or a terminating fraction (``12.50``, ``0.75`` vs ``3/4``): equal only
   when equal as exact rationals, so ``72`` ≠ ``71.99999999`` and ``0.333`` ≠ ``1/3``.
3. A decimal against a value with no terminating expansion (``1/3``, ``\\sqrt{2}``, ``\\pi``): equal
   within the relative tolerance ``REL_TOL`` (about 6 significant digits: ``0.333333`` = 1/3,
   ``3.14159`` = π, ``3.14`` ≠ π), relative so that small values are not all equal.
4. Expressions with free symbols are never equal here (math-verify's symbolic check decides).

Percentages (``X%``, math-verify's ``X * UnevaluatedExpr(1/100)``) are compared by both readings,
the fraction and the bare number, as math-verify does (``50%`` = ``0.5`` = ``50``): the documented
"percent vs fraction" choice of ``r1kit.rewards.math``. Two percentages compare by their numbers
(``50%`` ≠ ``0.5%``).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

import math_verify.grader as _grader
from sympy import Basic, Float, Mul, Rational, UnevaluatedExpr, nan, zoo
from sympy.matrices import MatrixBase

REL_TOL = 2e-6  # relative error allowed for a decimal approximating a non-terminating value
EXACT_DIGITS = 50  # significant digits two irrational closed forms must share to count as equal

_stock_numeric_eq = _grader.sympy_numeric_eq
_hardened = contextvars.ContextVar("r1kit_hardened_numeric", default=False)
_PCT = UnevaluatedExpr(Rational(1, 100))


@contextmanager
def hardened() -> Iterator[None]:
    """Within the block (this thread/context only), math-verify compares numbers with
    ``numbers_equal`` instead of its chopping/rounding check."""
    token = _hardened.set(True)
    try:
        yield
    finally:
        _hardened.reset(token)


def _dispatch(a, b, float_rounding: int, numeric_precision: int) -> bool:
    if not _hardened.get():
        return _stock_numeric_eq(a, b, float_rounding, numeric_precision)
    return numbers_equal(a, b)


_grader.sympy_numeric_eq = _dispatch


def numbers_equal(gold: Basic | MatrixBase, pred: Basic | MatrixBase) -> bool:
    """True when two SymPy numbers (or matrices of them) are equal by the rules of the module
    docstring; False for anything with free symbols or that cannot be evaluated."""
    if isinstance(gold, MatrixBase) or isinstance(pred, MatrixBase):
        gold, pred = _grader.safe_sympy_doit(gold), _grader.safe_sympy_doit(pred)
        if not (isinstance(gold, MatrixBase) and isinstance(pred, MatrixBase) and gold.shape == pred.shape):
            return False
        return all(numbers_equal(g, p) for g, p in zip(gold, pred))
    try:
        if _is_percent(gold) and _is_percent(pred):  # 50% vs 0.5%: the numbers, not the readings
            return _value_equal(gold.args[0], pred.args[0])
        return any(_value_equal(g, p) for g in _readings(gold) for p in _readings(pred))
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        return False


def _is_percent(x: Basic) -> bool:
    return isinstance(x, Mul) and len(x.args) == 2 and x.args[1] == _PCT


def _readings(x: Basic) -> list[Basic]:
    """A percentage's fraction and bare number; anything else as itself (evaluated)."""
    if _is_percent(x):
        return [x.args[0] / 100, x.args[0]]
    return [_grader.safe_sympy_doit(x)]


def _value_equal(a: Basic, b: Basic) -> bool:
    if not (getattr(a, "is_number", False) and getattr(b, "is_number", False)):
        return False
    if not (a.is_finite and b.is_finite):  # ∞, −∞, complex ∞, nan: only the same one
        return a == b and a is not nan
    a_dec, b_dec = a.has(Float), b.has(Float)
    if not (a_dec or b_dec):
        if a.is_Rational and b.is_Rational:
            return a == b
        return _agree(a, b, 10.0 ** -EXACT_DIGITS, EXACT_DIGITS + 10)
    exact_a, exact_b = _terminating(a), _terminating(b)
    if exact_a is not None and exact_b is not None:
        return exact_a == exact_b
    return _agree(a, b, REL_TOL, 30)


def _terminating(x: Basic) -> Rational | None:
    """``x`` as an exact rational when it is a written decimal or a fraction whose decimal
    expansion ends (denominator 2^i 5^j); else None."""
    if isinstance(x, Float):
        return Rational(str(x))
    if x.is_Rational:
        q = int(x.q)
        for p in (2, 5):
            while q % p == 0:
                q //= p
        return x if q == 1 else None
    return None


def _agree(a: Basic, b: Basic, rel: float, digits: int) -> bool:
    """|a − b| ≤ rel · max(|a|, |b|), both evaluated to ``digits`` significant digits."""
    va, vb = a.evalf(digits), b.evalf(digits)
    if not (va.is_number and vb.is_number) or va.has(nan, zoo) or vb.has(nan, zoo):
        return False
    scale = max(abs(va), abs(vb))
    if scale == 0:
        return True
    return bool(abs(va - vb) <= Float(rel, digits) * scale)

