"""MathVerifier: answer extraction, math-verify equivalence (what it accepts and rejects), errors.

The equivalence table pins down math-verify 0.9's semantics as r1kit uses it (gold first, answers
wrapped in ``$…$`` when they carry no math delimiters). Notable, and deliberate in math-verify:
percentages match both their fraction and their bare number (``50%`` = ``0.5`` = ``50``), units after
a number are dropped (``5 cm`` = ``5``), a bare ``x = 5`` matches ``5``, an escaped dollar sign is dropped (``\\$32`` = ``32``). Numbers
compare exactly first, decimals approximating a non-terminating value within a relative 2e-6
(r1kit's, in place of math-verify's rounding to 6 decimals; ``r1kit.rewards.numeric``).
"""

import threading
import time

import pytest

from r1kit.data.base import Example
from r1kit.errors import ConfigError, DataError
from r1kit.rewards.base import Verdict, Verifier
from r1kit.rewards import math as math_module
from r1kit.rewards.math import AccuracyReward, MathVerifier, extract_answer, parse_gold
from r1kit.rewards.registry import get_verifier

# (gold, predicted answer as written inside \boxed{}, expected correct)
EQUIVALENCE = [
    # fractions and decimals
    ("0.5", "1/2", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "\\tfrac12", True),
    ("\\frac{3}{4}", "0.75", True),
    ("2/4", "\\frac{1}{2}", True),
    ("1/3", "0.3333333", True),
    ("0.333", "1/3", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("-\\frac{3}{4}", "\\frac{3}{4}", False),
    ("12.50", "12.5", True),
    ("72", "72.0", True),
    ("72", "71.99999999", False),
    ("025", "25", True),
    # integers, negatives, thousands separators
    ("42", "42", True),
    ("42", "43", False),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("3", "-3", False),
    ("1000", "1,000", True),
    ("1,000", "1000", True),
    ("1000", "1 000", True),  # SI thousands grouping (math-verify alone reads 1·000 = 0)
    ("1000", "1\\,000", True),
    ("1234567", "1,234,567", True),
    ("1e3", "1000", False),
    # percentages (math-verify accepts both readings of a percentage)
    ("50%", "0.5", True),
    ("0.5", "50%", True),
    ("50\\%", "50", True),
    ("50", "50\\%", True),
    ("50%", "0.05", False),
    # units and text
    ("5", "5 cm", True),
    ("5", "5\\text{ cm}", True),
    ("5", "6 cm", False),
    ("\\text{(C)}", "C", True),
    ("\\text{(C)}", "D", False),
    ("10", "ten", False),
    ("\\$32", "32", True),
    ("\\$32", "23", False),
    # LaTeX vs plain text, radicals, pi, powers, algebra
    ("\\sqrt{2}", "2^{1/2}", True),
    ("\\sqrt{2}", "1.41421356", True),
    ("\\sqrt{2}", "1.414", False),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\pi", "3.14159265", True),
    ("\\pi", "3.14", False),
    ("2^{10}", "1024", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+1", "x^2-1", False),
    ("x=5", "5", True),
    ("5", "x=5", True),
    ("\\infty", "\\infty", True),
    # sets, tuples and intervals
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "1,2", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("[1,3)", "[1,3)", True),
    ("[1,3)", "[1,3]", False),
    ("(1,2)", "(1, 2)", True),
    ("(3,4]", "(3,4)", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
]


@pytest.fixture(scope="module")
def verifier():
    return MathVerifier()


def example(gold: str) -> Example:
    return Example(id=f"t/{gold}", prompt="p", gold=gold)


@pytest.mark.parametrize("gold,pred,expected", EQUIVALENCE)
def test_equivalence(verifier, gold, pred, expected):
    verdict = verifier.verify(f"<think>work</think> The answer is \\boxed{{{pred}}}.", example(gold))
    assert verdict.correct is expected
    assert verdict.score == (1.0 if expected else 0.0)
    assert verdict.reason == ("ok" if expected else "mismatch")
    assert verdict.extracted == pred


def test_table_has_forty_cases_with_true_negatives():
    assert len(EQUIVALENCE) >= 40
    assert sum(not expected for _, _, expected in EQUIVALENCE) >= 15


@pytest.mark.parametrize(
    "completion,mode,expected",
    [
        ("<think>maybe 3</think><answer>7</answer>", "tagged", "7"),
        ("<answer>1</answer> then <answer> 2 </answer>", "tagged", "2"),
        ("<answer>so \\boxed{\\frac{1}{2}} it is</answer>", "tagged", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}}", "tagged", None),  # several answers: a hedge
        ("first \\boxed{ 1} then \\fbox{1 }", "tagged", "1"),  # the same answer twice
        ("<think>\\boxed{3}</think> final: 4", "tagged", None),
        ("<think>\\boxed{3}</think> \\boxed{4}", "tagged", "4"),
        ("unclosed \\boxed{12", "tagged", None),
        ("empty <answer>  </answer>", "tagged", None),
        ("I think it is 42.", "tagged", None),
        ("I think it is 42.", "any", "42"),
        ("10-2 = 8, so 1,250.5 in total", "any", "1,250.5"),
        ("the change is -7", "any", "-7"),
        ("10-2", "any", "2"),
        ("<think>7 apples</think> no number here", "any", None),
        ("\\boxed{9} and later 10", "any", "9"),
    ],
)
def test_extract_answer(completion, mode, expected):
    assert extract_answer(completion, mode) == expected


def test_no_answer_and_parse_error_reasons(verifier):
    assert verifier.verify("I give up.", example("5")) == Verdict(False, 0.0, "no_answer", None)
    assert verifier.verify("\\boxed{)(}", example("5")) == Verdict(False, 0.0, "parse_error", ")(")


def test_answer_tag_with_prose(verifier):
    verdict = verifier.verify("<think>8*9</think> <answer>The answer is 72 dollars.</answer>", example("72"))
    assert verdict.correct and verdict.reason == "ok"


def test_direct_extraction_mode():
    assert MathVerifier(extraction="any").verify("It costs 1,000 dollars", example("1000")).correct
    assert MathVerifier(extraction="tagged").verify("It costs 1,000 dollars", example("1000")).reason == "no_answer"


def test_truncated_completion_has_no_last_number_answer():
    """A direct answer cut off by the token limit ends on an intermediate number: no answer. A tagged
    answer written before the cut still counts."""
    direct = MathVerifier(extraction="any")
    cut = "Adam has 10 apples.\nJackie has 2 apples.\nAdam has 10 + 2 = 12 apples.\nAdam has 1"
    assert direct.verify(cut, example("1")) == Verdict(True, 1.0, "ok", "1")  # finished: last number
    assert direct.verify(cut, example("1"), truncated=True) == Verdict(False, 0.0, "truncated", None)
    boxed = "So the answer is \\boxed{12}. Let me check: 10 + 2 = 1"
    assert direct.verify(boxed, example("12"), truncated=True).correct
    assert MathVerifier().verify(boxed, example("12"), truncated=True).correct
    verdicts = direct.verify_batch([cut, cut], [example("1"), example("1")], truncated=[False, True])
    assert [v.reason for v in verdicts] == ["ok", "truncated"]
    with pytest.raises(ConfigError, match="and 1 truncation flags"):
        direct.verify_batch([cut, cut], [example("1"), example("1")], truncated=[True])


def test_verify_batch_and_accuracy_reward(verifier):
    golds = [example("3"), example("\\frac{1}{2}"), example("7")]
    completions = ["\\boxed{3}", "<answer>0.5</answer>", "\\boxed{8}"]
    verdicts = verifier.verify_batch(completions, golds)
    assert [v.reason for v in verdicts] == ["ok", "ok", "mismatch"]
    reward = AccuracyReward(verifier)
    assert reward.name == "accuracy"
    assert reward(completions, golds) == [1.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="verify_batch got 2 completions for 3 examples and 2 truncation flags"):
        verifier.verify_batch(completions[:2], golds)


def test_timeout_reason():
    slow = "+".join(["x"] * 50)  # about 0.4 s of CPU to parse and compare
    verdict = MathVerifier(timeout_s=1e-6).verify(f"\\boxed{{{slow}}}", example("\\frac{2}{4}"))
    assert verdict == Verdict(False, 0.0, "timeout", slow)


def test_timeout_whose_exception_is_swallowed_is_still_a_timeout(monkeypatch):
    """The alarm can fire where its exception is lost (a gc callback runs inside the parse; a library
    catches everything): the verdict is still a timeout, never the result of an unbounded check."""
    real_parse = math_module._parse_math

    def swallowing_parse(text):
        start = time.process_time()
        try:
            while time.process_time() - start < 0.2:
                pass
        except BaseException:
            pass
        return real_parse(text)

    monkeypatch.setattr(math_module, "_parse_math", swallowing_parse)
    verdict = MathVerifier(timeout_s=0.01).verify("\\boxed{\\frac{1}{2}}", example("\\frac{2}{4}"))
    assert verdict == Verdict(False, 0.0, "timeout", "\\frac{1}{2}")


def test_timeout_counts_cpu_time_not_waiting(monkeypatch):
    """A loaded machine stretches wall time, not CPU time: waiting must not turn a correct answer into
    a timeout."""
    real_parse = math_module._parse_math

    def waiting_parse(text):
        time.sleep(0.3)
        return real_parse(text)

    monkeypatch.setattr(math_module, "_parse_math", waiting_parse)
    verdict = MathVerifier(timeout_s=0.1).verify("\\boxed{\\frac{1}{2}}", example("\\frac{2}{4}"))
    assert verdict == Verdict(True, 1.0, "ok", "\\frac{1}{2}")


def test_verify_off_main_thread_runs_without_alarm(verifier):
    results = []
    thread = threading.Thread(target=lambda: results.append(verifier.verify("\\boxed{0.5}", example("1/2"))))
    thread.start()
    thread.join()
    assert results[0].correct


def test_unparseable_gold_raises():
    with pytest.raises(DataError, match=r"gold answer '\)\(' does not parse"):
        parse_gold(")(")
    with pytest.raises(DataError, match="gold answer is empty"):
        parse_gold("  ")
    with pytest.raises(DataError, match="example 'bad/1'"):
        MathVerifier().verify("\\boxed{1}", Example("bad/1", "p", "x^{"))


def test_parse_gold_values():
    assert parse_gold("\\frac{3}{4}")[0] * 4 == 3
    assert parse_gold("1,000")[0] == 1000


def test_registry_and_protocol():
    built = get_verifier("math", extraction="any", timeout_s=1.0)
    assert isinstance(built, MathVerifier) and isinstance(built, Verifier)
    assert (built.name, built.extraction, built.timeout_s) == ("math", "any", 1.0)
    with pytest.raises(ConfigError, match="extraction 'last'"):
        MathVerifier(extraction="last")
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        MathVerifier(timeout_s=0)


@pytest.mark.parametrize("gold", ["banana", "N/A", "hello world", "unknown"])
def test_gold_that_is_words_is_an_error(gold):
    """math-verify reads a plain word as a product of symbols ("banana" → a³·b·n²): such a gold
    would reward nothing, so it is refused like any unparseable gold."""
    with pytest.raises(DataError, match="does not parse"):
        parse_gold(gold)


@pytest.mark.parametrize("gold", ["\\text{Evelyn}", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", "x \\in [-2,7]",
                                  "90^\\circ", "p - q"])
def test_words_inside_latex_commands_are_math(gold):
    assert parse_gold(gold)
