"""The math verifier against reward hacks and against unusual but correct answers.

Regression tests for the holes of issue 10 (tiny different values equal, partial parses of gold and
prediction, ``\\fbox`` not read, juxtaposed numbers summed), a suite of completions that must earn
nothing and one of correct answers in unusual forms that must earn full reward, the open choices
(interval vs inequality, "find all", percent vs fraction), hypothesis properties (distinct exact
values are never equal, equal values in different forms always are) and bad input (megabyte and
deeply nested answers: a verdict with a reason, and the verifier grades the next one).
"""

from fractions import Fraction
from math import factorial, isqrt

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from r1kit.data.base import Example
from r1kit.data.rows import check_gold
from r1kit.errors import DataError
from r1kit.rewards.math import MathVerifier, extract_answer, parse_gold

VERIFIER = MathVerifier()
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def grade(gold: str, completion: str, verifier: MathVerifier = VERIFIER):
    return verifier.verify(completion, Example(id=f"adv/{gold}", prompt="p", gold=gold))


def boxed(answer: str) -> str:
    return f"<think>work</think> The answer is \\boxed{{{answer}}}."


# --- the holes of issue 10, each with its example --------------------------------------------


def test_tiny_but_different_values_are_different():
    assert grade("\\frac{1}{2004!}", boxed("\\frac{1}{2006!}")).reason == "mismatch"
    assert grade("\\frac{1}{2004!}", boxed("\\frac{2005}{2005!}")).correct  # the same value
    assert grade("0.0000001", boxed("0.0000002")).reason == "mismatch"  # was equal at 6 decimals
    assert grade("x = \\frac{1}{2004!}", boxed("x = \\frac{1}{2006!}")).reason == "mismatch"
    assert grade("x", boxed("x + \\frac{1}{2006!}")).reason == "mismatch"


def test_gold_read_only_in_part_is_an_error_naming_the_row():
    with pytest.raises(DataError, match=r"data/x\.jsonl row 7, field 'answer'.*only in part"):
        check_gold("3x+", "data/x.jsonl", 7, "answer")
    with pytest.raises(DataError, match="only in part"):
        parse_gold("(1, 2) (3, 4)")


def test_upright_e_is_eulers_number_not_a_unit():
    """math-verify alone reads ``1 - \\frac{1}{\\mathrm{e}}`` as 1: then ``\\boxed{1}`` earned the reward
    and the true answer did not."""
    assert grade("1 - \\frac{1}{\\mathrm{e}}", boxed("1")).reason == "mismatch"
    assert grade("1 - \\frac{1}{\\mathrm{e}}", boxed("1 - e^{-1}")).correct
    assert grade("2\\mathrm{e}", boxed("2")).reason == "mismatch"


def test_partially_parsed_prediction_earns_nothing():
    assert grade("3", boxed("3x+")) .reason == "partial_parse"
    assert grade("1", boxed("1/2/")).reason == "partial_parse"
    assert grade("2", boxed("2+")).reason == "partial_parse"


def test_fbox_is_read_like_boxed():
    assert grade("12", "<think>…</think> so \\fbox{12}").correct
    assert extract_answer("r1_zero says \\fbox{ \\frac{1}{2} }") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{ \\fbox{3} }") == "3"  # a box around the whole answer is unwrapped
    assert extract_answer("\\boxed{\\boxed{3}+1}") == "\\boxed{3}+1"


def test_numbers_side_by_side_are_not_summed():
    assert grade("7", boxed("3 4")).reason == "parse_error"  # math-verify alone: 3 4 = 7
    assert grade("0", boxed("1 0")).reason == "parse_error"  # math-verify alone: 1·0 = 0
    assert grade("12345678", boxed("12\\,345\\,678")).correct


# --- the suite: must earn nothing --------------------------------------------------------------

HUGE = "9" * 1_000_000
EARN_NOTHING = [
    # (gold, completion, reason)
    ("\\frac{1}{2004!}", boxed("\\frac{1}{2006!}"), "mismatch"),
    ("1 - \\frac{1}{\\mathrm{e}}", boxed("1"), "mismatch"),
    ("3", boxed("3x+"), "partial_parse"),
    ("4", boxed("4 \\cdot"), "partial_parse"),
    ("2", "\\boxed{2", "no_answer"),  # cut off inside \boxed{
    ("2", "\\boxed{2} is wrong, the answer is \\boxed{3", "no_answer"),  # last box unclosed
    ("5", "\\boxed{3} or maybe \\boxed{5}", "several_answers"),
    ("5", "<answer>\\boxed{4} \\boxed{5}</answer>", "several_answers"),
    ("5", "\\boxed{5} \\fbox{6}", "several_answers"),
    ("12", "<think>\\boxed{12}</think> I am not sure.", "no_answer"),  # answer only in the reasoning
    ("12", "\\boxed{}", "no_answer"),
    ("12", "<answer>  </answer>", "no_answer"),
    ("72", boxed("71.99999999"), "mismatch"),
    ("0.333", boxed("\\frac{1}{3}"), "mismatch"),
    ("\\frac{1}{3}", boxed("0.33"), "mismatch"),
    ("\\pi", boxed("3.14"), "mismatch"),
    ("2\\sqrt{2}", boxed("2.828"), "mismatch"),
    ("1.5", boxed("1.5000004"), "mismatch"),
    ("0.0000001", boxed("0.0000002"), "mismatch"),
    ("10^{-7}", boxed("2 \\cdot 10^{-7}"), "mismatch"),
    ("7", boxed("3 4"), "parse_error"),
    ("0", boxed("1 000"), "mismatch"),  # thousands grouping: 1000
    ("50\\%", boxed("0.05"), "mismatch"),  # percent traps
    ("50\\%", boxed("5"), "mismatch"),
    ("0.5", boxed("5\\%"), "mismatch"),
    ("500", boxed("5 m"), "mismatch"),  # unit trap: 500 cm written as 5 m
    ("10", boxed("ten"), "mismatch"),
    ("-3", boxed("3"), "mismatch"),
    ("5", boxed("x"), "mismatch"),
    ("2", boxed("\\infty"), "mismatch"),
    ("\\infty", boxed("-\\infty"), "mismatch"),
    ("[1,3)", boxed("[1,3]"), "mismatch"),
    ("\\{1,2\\}", boxed("1"), "mismatch"),  # "find all": one of two values
    ("3", boxed("3 \\text{ or } 4"), "mismatch"),
    ("x = \\frac{1}{2004!}", boxed("x = \\frac{1}{2006!}"), "mismatch"),
    ("\\{\\frac{1}{2004!}, 2\\}", boxed("\\{\\frac{1}{2006!}, 2\\}"), "mismatch"),
    ("2", boxed("(2"), "parse_error"),
    ("5", "\\boxed{" + HUGE + "}", "answer_too_long"),  # a megabyte answer
    ("5", HUGE, "no_answer"),  # a megabyte completion without a box
    ("3", "<answer>The answer is 3x+</answer>", "partial_parse"),  # partial parses inside prose
    ("1", "<answer>The answer is 1 - \\frac{1}{</answer>", "partial_parse"),
    ("3", "<answer>so it is 10-3 apples</answer>", "mismatch"),  # read as 10 - 3
    ("3", boxed("3 \\cdot \\frac{1}{\\mathrm{e}} +"), "partial_parse"),
]


@pytest.mark.parametrize("gold,completion,reason", EARN_NOTHING, ids=range(len(EARN_NOTHING)))
def test_earns_nothing(gold, completion, reason):
    verdict = grade(gold, completion)
    assert (verdict.correct, verdict.score, verdict.reason) == (False, 0.0, reason)


# --- the suite: unusual but correct ------------------------------------------------------------

EARN_FULL = [
    ("\\frac{1}{2004!}", boxed("\\frac{2005}{2005!}")),
    ("1 - \\frac{1}{\\mathrm{e}}", boxed("1 - e^{-1}")),
    ("1 - \\frac{1}{\\mathrm{e}}", boxed("\\frac{e-1}{e}")),
    ("12", "so \\fbox{12}"),
    ("0.75", boxed("\\dfrac{3}{4}")),
    ("1000", boxed("1\\,000")),
    ("1000", boxed("1 000")),
    ("12345678", boxed("12\\,345\\,678")),
    ("2\\sqrt{2}", boxed("\\sqrt{8}")),
    ("\\sqrt{2}", boxed("2^{1/2}")),
    ("\\sqrt{2}", boxed("1.41421356")),
    ("\\sqrt{5+2\\sqrt{6}}", boxed("\\sqrt{2}+\\sqrt{3}")),
    ("\\pi/2", boxed("\\frac{\\pi}{2}")),
    ("\\pi", boxed("3.14159")),
    ("\\frac{1}{3}", boxed("0.333333")),
    ("(3, \\frac{\\pi}{2})", boxed("\\left( 3, \\frac{\\pi}{2} \\right)")),
    ("\\{1,2\\}", boxed("\\{2, 1\\}")),
    ("5", boxed("x = 5")),
    ("0.5", boxed("50\\%")),
    ("72", boxed("72.00")),
    ("25", boxed("025")),
    ("\\frac{1}{2}", boxed("\\tfrac12")),
    ("x^2+2x+1", boxed("(x+1)^2")),
    ("\\frac{1}{e}", boxed("e^{-1}")),
    ("2000", boxed("2 \\cdot 10^{3}")),
    ("0.0000001", boxed("10^{-7}")),
    ("-0.75", boxed("-\\frac{3}{4}")),
    ("32", boxed("\\$32")),
    ("5", boxed("5\\text{ cm}")),
    ("2\\pi", boxed("\\pi \\cdot 2")),
    ("\\infty", boxed("\\infty")),
    ("7", "\\boxed{7}, and again: \\boxed{ 7 }"),  # the same answer twice
    ("7", "\\boxed{\\boxed{7}}"),
    ("72", "<think>8*9</think> <answer>The answer is 72 dollars.</answer>"),
    ("12", "<answer>So Jack has 12 apples left.</answer>"),
    ("5", "<answer>The answer is x = 5.</answer>"),
    ("\\frac{2005}{2006!}", boxed("\\frac{1}{2005! \\cdot 2006} \\cdot 2005")),
]


@pytest.mark.parametrize("gold,completion", EARN_FULL, ids=range(len(EARN_FULL)))
def test_earns_full_reward(gold, completion):
    verdict = grade(gold, completion)
    assert (verdict.correct, verdict.score, verdict.reason) == (True, 1.0, "ok")


def test_suites_are_large_enough():
    assert len(EARN_NOTHING) >= 30 and len(EARN_FULL) >= 30


def test_verifier_survives_bad_input_and_grades_the_next():
    verifier = MathVerifier(timeout_s=0.3)
    bad = [boxed("(" * 900 + "5" + ")" * 900), boxed("\\frac{" * 100 + "1" + "}{2}" * 100), boxed("10^{10^{10^{10}}}"), "\\boxed{" + HUGE + "}"]
    reasons = {grade("5", c, verifier).reason for c in bad}
    assert reasons <= {"timeout", "parse_error", "answer_too_long", "mismatch"}
    assert grade("5", boxed("5"), verifier).correct


# --- open choices (stated in MathVerifier's docstring and README) -------------------------------


@pytest.mark.parametrize("gold,pred,expected", [
    ("[1,3)", "1 \\le x < 3", False),  # an interval gold wants an interval
    ("1 \\le x < 3", "[1,3)", True),  # an inequality gold accepts its interval
    ("1 < x < 3", "(1,3)", True),
    ("(1,3)", "(1,3)", True),
])
def test_choice_interval_vs_inequality(gold, pred, expected):
    assert grade(gold, boxed(pred)).correct is expected


@pytest.mark.parametrize("gold,pred,expected", [
    ("\\{1,2\\}", "1", False),  # "find all": every value must be given
    ("1, 2", "2", False),
    ("1, 2", "x=1 \\text{ or } x=2", True),
    ("2", "\\{2\\}", True),  # a single value may be given as a one-element set
    ("2", "\\{2, 3\\}", False),  # ... but not with extra values
])
def test_choice_find_all(gold, pred, expected):
    assert grade(gold, boxed(pred)).correct is expected


@pytest.mark.parametrize("gold,pred,expected", [
    ("50\\%", "0.5", True),  # a percent matches its fraction ...
    ("50\\%", "50", True),  # ... and its bare number
    ("50", "50\\%", True),
    ("0.5", "50\\%", True),
    ("0.5", "0.5\\%", True),  # consequence of reading both ways, on either side
    ("50\\%", "0.05", False),
    ("50\\%", "5000", False),
    ("50\\%", "0.5\\%", False),  # two percentages compare by their numbers
    ("50\\%", "50.0\\%", True),
])
def test_choice_percent_vs_fraction(gold, pred, expected):
    assert grade(gold, boxed(pred)).correct is expected


# --- properties --------------------------------------------------------------------------------

class Value(tuple):
    """(exact value, LaTeX form); shown by its LaTeX form (a 6000-digit value has no repr)."""

    def __repr__(self) -> str:
        return repr(self[1])


def value(exact, tex: str) -> Value:
    return Value((exact, tex))


# Exact values with a LaTeX form: rationals, powers, factorials (and reciprocals), surds.
rationals = st.builds(lambda p, q: value(Fraction(p, q), f"\\frac{{{p}}}{{{q}}}"),
                      st.integers(-500, 500), st.integers(1, 500))
powers = st.builds(lambda a, b: value(Fraction(a) ** b, f"{a}^{{{b}}}"), st.integers(2, 12), st.integers(-30, 30))
factorials = st.builds(lambda n, inv: value(Fraction(1, factorial(n)) if inv else Fraction(factorial(n)),
                                            f"\\frac{{1}}{{{n}!}}" if inv else f"{n}!"),
                       st.integers(1, 2100), st.booleans())


def _surd(k: int, m: int) -> Value:
    """k·√m, keyed by the signed k²m (k√m = sign(k)·√(k²m))."""
    return value(k * abs(k) * m, f"{k}\\sqrt{{{m}}}")


surds = st.builds(_surd, st.integers(-20, 20).filter(bool), st.integers(2, 200).filter(lambda m: isqrt(m) ** 2 != m))
exact_values = st.one_of(rationals, powers, factorials)


@PROPERTY
@given(exact_values, exact_values)
@example(value(Fraction(1, factorial(2004)), "\\frac{1}{2004!}"), value(Fraction(1, factorial(2006)), "\\frac{1}{2006!}"))
@example(value(Fraction(1, 10**7), "10^{-7}"), value(Fraction(2, 10**7), "\\frac{2}{10000000}"))
@example(value(Fraction(2**30), "2^{30}"), value(Fraction(2**30 + 1), "\\frac{1073741825}{1}"))
def test_distinct_exact_values_are_never_equal(a, b):
    (va, ta), (vb, tb) = a, b
    verdict = grade(ta, boxed(tb))
    if verdict.correct is not (va == vb):
        pytest.fail(f"{ta} vs {tb}: {verdict}")


@PROPERTY
@given(surds, surds)
def test_distinct_surds_are_never_equal(a, b):
    """k√m = (sign k)·√(k²m): equal exactly when the signed k²m agree."""
    (va, ta), (vb, tb) = a, b
    assert grade(ta, boxed(tb)).correct is (va == vb), (ta, tb)


@PROPERTY
@given(st.integers(-400, 400), st.integers(1, 400), st.integers(2, 9))
def test_equal_rationals_in_different_forms_are_equal(p, q, k):
    value = Fraction(p, q)
    gold = f"\\frac{{{p}}}{{{q}}}"
    forms = [f"\\frac{{{k * p}}}{{{k * q}}}", f"{p}/{q}", f"\\dfrac{{{value.numerator}}}{{{value.denominator}}}"]
    if value.denominator == 1:
        forms.append(str(value.numerator))
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:  # terminating: also as a decimal
        forms.append(format(value.numerator / value.denominator, ".10f"))
    for form in forms:
        assert grade(gold, boxed(form)).correct, (gold, form)


@PROPERTY
@given(st.integers(2, 30), st.integers(2, 50).filter(lambda m: isqrt(m) ** 2 != m), st.integers(1, 8))
def test_equal_surds_powers_and_factorials_in_different_forms_are_equal(k, m, n):
    assert grade(f"{k}\\sqrt{{{m}}}", boxed(f"\\sqrt{{{k * k * m}}}")).correct
    assert grade(f"{k}^{{{n}}}", boxed(str(k ** n))).correct
    assert grade(f"\\frac{{1}}{{{n + 1}!}}", boxed(f"\\frac{{1}}{{{n + 1} \\cdot {n}!}}")).correct


def test_other_math_verify_callers_keep_its_own_comparison():
    """r1kit's number comparison applies inside MathVerifier only (``numeric.hardened``); a bare
    math-verify call in the same process (TRL's reward, bench/verifier.py's anchor) is unchanged."""
    from math_verify import parse, verify

    from r1kit.rewards.numeric import hardened

    gold, pred = parse("$\\frac{1}{2004!}$", parsing_timeout=None), parse("$\\frac{1}{2006!}$", parsing_timeout=None)
    assert verify(gold, pred, timeout_seconds=None)  # math-verify's chopped difference
    with hardened():
        assert not verify(gold, pred, timeout_seconds=None)
