"""Math answer checking: extraction of the final answer, math-verify equivalence, the accuracy reward.

One ``MathVerifier`` object serves both the accuracy reward during RL and evaluation, so a model is
trained and scored against the same notion of "correct" (DESIGN.md, the reward seam).

Pipeline for one completion: ``extract_answer`` pulls the final answer out of the text (the last
``<answer>…</answer>`` or ``\\boxed{…}``, or, in mode ``"any"``, the last number); math-verify parses
it and the gold answer into SymPy objects and compares them, gold first (``verify(gold, pred)``;
math-verify's ``grader.py``). The equivalences it accepts (``0.5`` = ``1/2`` = ``\\frac{1}{2}``,
``1,000`` = ``1 000`` = ``1000``, ``50%`` = ``0.5`` = ``50``, ``5 cm`` = ``5``, sets in any order) are
pinned down in ``tests/rewards/test_math_verifier.py``; what must earn nothing (partial parses,
several answers, near-equal values) in ``tests/rewards/test_math_adversarial.py``. The answer must
parse as a whole (``_parse_math``) and numbers compare exactly first (``r1kit.rewards.numeric``).

Timeouts: math-verify's own timeout is a whole-second ``signal.alarm`` that raises in threads; we
turn it off and bound the parse + compare of one completion with one ``setitimer`` alarm of
``timeout_s`` seconds of process CPU time instead (``ITIMER_PROF``, so a loaded machine does not turn a
slow check into a timeout). Off the main thread no alarm can be set and checks run unbounded.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from r1kit.data.base import Example
from r1kit.errors import ConfigError, DataError
from r1kit.rewards.base import Verdict, answer_region, batch_flags
from r1kit.rewards.numeric import hardened
from r1kit.rewards.registry import register_verifier

EXTRACTION_MODES = ("tagged", "any")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number not glued to a preceding word or digit, so "10-2" yields "2", not "-2".
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
# A "$" that opens or closes LaTeX math (an escaped "\$" is a dollar sign).
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so math-verify's ``except Exception`` cannot swallow it."""


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; ours replaces it (see module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _logger in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger).addFilter(_DropDisabledTimeoutWarning())


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_Timeout`` in the body after ``seconds`` of this process's CPU time (main thread only).

    CPU time, not wall time: on a loaded machine (or at a low scheduling priority) a check that takes
    0.2 s of CPU can take many seconds of wall time, and a wall-clock limit would score a correct
    answer as a timeout, or reject a valid gold answer at load.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise _Timeout

    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
    if fired:  # the alarm fired but its exception was swallowed (inside a gc callback, a library's bare except)
        raise _Timeout


_LATEX_ONLY = (LatexExtractionConfig(),)
_EXPR_ONLY = (ExprExtractionConfig(),)
# Upright constants of ISO notation; math-verify's normalisation drops ``\mathrm{e}`` after a number
# or a brace as if it were a unit ("2\mathrm{e}" → 2, "\frac{1}{\mathrm{e}}" → "\frac{1}{").
_UPRIGHT_CONSTANT = re.compile(r"\\(?:mathrm|rm|text|operatorname)\s*\{\s*([ei])\s*\}")
# Space between digits: a blank, or LaTeX's thin/normal/medium/thick spaces and ties.
_GAP = r"(?:\s|\\[,;: ]|~|\\thinspace)+"
# Thousands grouped by spaces ("1 000", "12\,345\,678"; SI style): one number.
_GROUPED = re.compile(rf"(?<![\d.,])\d{{1,3}}(?:{_GAP}\d{{3}})+(?!\d)")
# Two numbers side by side after that: math-verify reads "3 4" as 7 and "1 0" as 0; ambiguous.
_JUXTAPOSED = re.compile(rf"\d{_GAP}[\d.]")
# ``\fbox{x}`` and ``\boxed{x}`` draw the same frame; answers are read from either.
_FBOX = re.compile(r"\\fbox\s*\{")


def normalize_boxes(text: str) -> str:
    """``text`` with every ``\\fbox{`` written as ``\\boxed{``."""
    return _FBOX.sub(r"\\boxed{", text)


def _parse_math(text: str) -> tuple[list, str | None]:
    """Parse an answer string with math-verify so that the value covers the whole answer.

    Returns ``(parsed, failure)``: ``parsed`` is math-verify's result (SymPy object(s), then the
    matched string); ``failure`` is None, ``"parse_error"`` (no math) or ``"partial_parse"`` (math-verify
    reads only part of it: ``"3x+"`` as 3, ``"1 - \\frac{1}{"`` as 1).

    Before parsing: ``\\fbox`` is read as ``\\boxed``, ``\\mathrm{e}``/``\\mathrm{i}`` as the constants
    e and i, and digits grouped by spaces (``1 000``, ``1\\,000``) as one number; two numbers side by
    side otherwise (``3 4``, which math-verify reads as 7) are a parse error.

    Math-looking text (no plain words, see ``_looks_like_words``) is wrapped in ``$…$`` when it has
    no math delimiters and must parse as one LaTeX expression (math-verify's LaTeX extraction on its
    first, whole-text match, no fall-back to a number inside it); a plain expression (``2**10``) is
    accepted when math-verify's expression match is the whole text. Prose (``"The answer is 72
    dollars."``) is read as math-verify reads it (its answer anchors and number fall-back), but the
    value read must stand alone in the text (``_stands_alone``: not ``"The answer is 3x+"``).
    """
    text = _UPRIGHT_CONSTANT.sub(r"\1", normalize_boxes(text))
    text = _GROUPED.sub(lambda m: re.sub(_GAP, "", m.group()), text)
    if _JUXTAPOSED.search(text):
        return [text], "parse_error"
    wrapped = text if (_MATH_DOLLAR.search(text) or "\\boxed" in text) else f"${text}$"
    if _looks_like_words(text):
        parsed = parse(wrapped, parsing_timeout=None)
        if not _has_math(parsed):
            return parsed, "parse_error"
        return parsed, (None if _stands_alone(text, parsed[-1]) else "partial_parse")
    latex = parse(wrapped, _LATEX_ONLY, parsing_timeout=None, extraction_mode="first_match")
    if _has_math(latex):
        return latex, None
    expr = parse(text, _EXPR_ONLY, parsing_timeout=None, extraction_mode="first_match")
    if _has_math(expr) and expr[-1].strip() == text.strip():
        return expr, None
    anywhere = parse(wrapped, parsing_timeout=None)
    return latex, ("partial_parse" if _has_math(anywhere) else "parse_error")


_OPERATOR_AFTER = frozenset("+-*/^=\\_({[|!")
_OPERATOR_BEFORE = frozenset("+-*/^\\_({[|")


def _stands_alone(text: str, matched: str) -> bool:
    """False when the math math-verify read out of prose is glued to more math: an operator or a
    letter right after it, or an operator before it ("is 3x+", "is 1 - \\frac{1}{", "is 10-3")."""
    at = text.rfind(matched)
    if at < 0 or not matched:
        return True
    rest = text[at + len(matched):]
    after, before = rest.lstrip()[:1], text[:at].rstrip()[-1:]
    return not (after in _OPERATOR_AFTER and after or rest[:1].isalnum() or before in _OPERATOR_BEFORE and before)


def _has_math(parsed: list) -> bool:
    """True when math-verify produced a SymPy object, not only its fallback string."""
    return any(not isinstance(p, str) for p in parsed)


# LaTeX commands and \text{…}-style arguments are allowed to hold words ("\text{Evelyn}", "\in");
# what is left must not hold a plain word, which math-verify would read as a product of symbols
# ("banana" → a³·b·n², "N/A" → n/a) and so reward nothing.
_WORDY_ARGS = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname|begin|end)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}|\b[A-Za-z]/[A-Za-z]\b")


def _looks_like_words(text: str) -> bool:
    """True when ``text`` holds a plain word outside LaTeX commands (e.g. "banana", "N/A")."""
    return bool(_WORD.search(_COMMAND.sub(" ", _WORDY_ARGS.sub(" ", text))))


def parse_gold(text: str | None, timeout_s: float = 5.0) -> list:
    """Parse a gold answer with math-verify (cached per answer text; do not mutate the result).

    Args:
        text: the reference answer (``"72"``, ``"\\frac{3}{4}"``, ``"(3,4]"``, ``"\\text{(C)}"``).
        timeout_s: CPU-time limit for the parse, seconds.

    Returns:
        math-verify's parse result: SymPy object(s) followed by the matched string.

    Raises:
        DataError: the answer is missing/empty or math-verify finds no math in it (GRPO_SPEC §5:
            such a gold would reward everything 0 or 1). Loaders add the file, row and field.
    """
    if text is None or not str(text).strip():
        raise DataError("gold answer is empty; give the final answer (a number or LaTeX expression)")
    return _parse_gold_cached(str(text), timeout_s)


@lru_cache(maxsize=65536)
def _parse_gold_cached(text: str, timeout_s: float) -> list:
    try:
        with _time_limit(timeout_s):
            parsed, failure = _parse_math(text)
    except _Timeout:
        parsed, failure = [], "timeout"
    if failure == "partial_parse":
        raise DataError(
            f"gold answer {text!r} is read by math-verify only in part (as {parsed[-1] if parsed else ''!r}); "
            "rewrite it as one complete number or LaTeX expression"
        )
    if failure is not None or _looks_like_words(text):
        raise DataError(
            f"gold answer {text!r} does not parse with math-verify; "
            "write it as a number or a LaTeX expression"
        )
    return parsed


def _boxed_spans(text: str) -> list[str | None]:
    """Contents of every outermost ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, in order, braces
    balanced; None (last) for one left unclosed."""
    text = normalize_boxes(text)
    spans: list[str | None] = []
    start = text.find("\\boxed{")
    while start >= 0:
        begin, depth, end = start + len("\\boxed{"), 1, None
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                end = i
                break
        spans.append(None if end is None else text[begin:end])
        if end is None:
            break
        start = text.find("\\boxed{", end)  # a box inside this one is part of its content
    return spans


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` or ``\\fbox{…}`` in ``text`` (braces balanced), or None
    if there is none or it is unclosed."""
    spans = _boxed_spans(text)
    return _unwrap_box(spans[-1]) if spans else None


def _unwrap_box(content: str | None) -> str | None:
    """``3`` for the content ``\\boxed{3}`` of ``\\boxed{\\boxed{3}}`` (boxes around the whole answer)."""
    while content is not None:
        inner = _boxed_spans(content)
        if len(inner) != 1 or inner[0] is None or normalize_boxes(content).strip() != f"\\boxed{{{inner[0]}}}":
            break
        content = inner[0]
    return content


# Two boxes hold the same answer when they differ only in blanks, braces and inner boxes.
_BOX_KEY = re.compile(r"\\boxed|[\s{}]")


class _SeveralAnswers(Exception):
    """The answer region holds several different boxed answers."""


def _final_boxed(text: str) -> str | None:
    """The one boxed answer of ``text``; raises _SeveralAnswers when its closed boxes differ
    (hedging over several answers earns nothing); None when there is none or the last is unclosed."""
    spans = _boxed_spans(text)
    if not spans or spans[-1] is None:
        return None
    if len({_BOX_KEY.sub("", b) for b in spans if b is not None}) > 1:
        raise _SeveralAnswers
    return _unwrap_box(spans[-1])


def _tagged_answer(text: str) -> str | None:
    answers = _ANSWER_TAG.findall(text)
    if answers:
        inner = answers[-1]
        boxed = _final_boxed(inner)
        return boxed if boxed is not None else inner
    return _final_boxed(text)


def extract_answer(completion: str, mode: str = "tagged", finished: bool = True) -> str | None:
    """The final answer written in a completion, as a string, or None when there is none.

    Only the text after the last ``</think>`` is searched when the completion has one, so numbers and
    trial answers inside the reasoning do not count.

    Args:
        completion: the generated text.
        mode: ``"tagged"``: the content of the last ``<answer>…</answer>`` (its ``\\boxed{}`` content if
            it holds one), else of the last ``\\boxed{…}`` (``\\fbox{…}`` counts as a box). Several
            different boxed answers, or a last box left unclosed, give no answer: a hedge or a cut-off
            answer is not an answer. ``"any"``: the tagged answer if present,
            else the last number (``-1,234.5`` style) — for direct-answer templates.
        finished: the completion ended on its own (EOS or a stop string). The last-number fallback
            needs this: a completion cut off by the token limit has not stated its final number yet,
            and its last number is an intermediate one, so it gives no answer (a tagged answer
            written before the cut still counts, as in R1's evaluation).

    Raises:
        ConfigError: unknown mode.
    """
    return _extract(completion, mode, finished)[0]


def check_extraction(mode: str) -> None:
    """Raise ConfigError naming ``mode`` unless it is one of ``EXTRACTION_MODES``."""
    if mode not in EXTRACTION_MODES:
        raise ConfigError(f"extraction {mode!r} is unknown; use one of {', '.join(EXTRACTION_MODES)}")


def _extract(completion: str, mode: str, finished: bool) -> tuple[str | None, str | None]:
    """``(answer, None)``, or ``(None, reason)`` with reason ``"no_answer"`` or ``"several_answers"``
    (different boxed answers in the answer region). See ``extract_answer``."""
    check_extraction(mode)
    text = answer_region(completion)
    try:
        answer = _tagged_answer(text)
    except _SeveralAnswers:
        return None, "several_answers"
    if answer is None and mode == "any" and finished:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    if answer is None or not answer.strip():
        return None, "no_answer"
    return answer.strip(), None


@register_verifier("math")
class MathVerifier:
    """Checks math completions against ``Example.gold`` with math-verify.

    Args:
        extraction: ``"tagged"`` (``<answer>``/``\\boxed{}``) or ``"any"`` (also the last number); see
            ``extract_answer``.
        timeout_s: CPU-time limit for parsing and comparing one completion, seconds.

        max_answer_chars: a longer extracted answer is not parsed (reason ``"answer_too_long"``).

    ``verify`` never raises for a bad completion; the Verdict's reason is ``"ok"``, ``"no_answer"``
    (nothing extracted, or the last box left unclosed), ``"several_answers"`` (different boxed
    answers), ``"truncated"`` (extraction ``"any"``: cut off by the token limit before a final
    number), ``"answer_too_long"``, ``"parse_error"`` (math-verify cannot read the extracted
    answer), ``"partial_parse"`` (it reads only part of it: ``3x+`` as 3), ``"mismatch"`` or
    ``"timeout"``. A gold answer that does not parse, or parses only in part, raises DataError
    (loaders validate golds, so this only happens for hand-made Examples). Parsed golds are cached by
    ``parse_gold``, so each distinct gold is parsed once per process.

    Numbers are compared exactly first (``r1kit.rewards.numeric``): ``1/2004!`` ≠ ``1/2006!``; a
    decimal equals a terminating value only exactly (``72`` ≠ ``71.99999999``) and approximates a
    non-terminating one within a relative 2e-6 (``0.333333`` = 1/3, ``3.14`` ≠ π).

    Choices the R1 recipe and math-verify leave open, as r1kit makes them (tested in
    ``tests/rewards/test_math_adversarial.py``):

    - Interval vs inequality: an inequality gold (``1 \\le x < 3``) accepts its interval
      (``[1,3)``); an interval gold wants an interval, not the inequality (math-verify's
      ``allow_set_relation_comp=False``).
    - "Find all" with one value: a gold of several values (``\\{1,2\\}``, ``1, 2``) needs all of them,
      in any order; one value alone earns nothing. A single-value gold accepts a one-element set.
    - Percent vs fraction: a percentage matches both its fraction and its bare number, on either
      side (``50\\%`` = ``0.5`` = ``50``; so ``0.5\\%`` earns gold ``0.5``), as in math-verify; problems
      asking "what percent" are answered either way.
    """

    name = "math"

    def __init__(self, extraction: str = "tagged", timeout_s: float = 2.0, max_answer_chars: int = 2000):
        check_extraction(extraction)
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if not max_answer_chars > 0:
            raise ConfigError(f"max_answer_chars must be > 0, got {max_answer_chars}")
        self.extraction = extraction
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars

    def _gold(self, example: Example) -> list:
        try:
            return parse_gold(example.gold)
        except DataError as err:
            raise DataError(f"example {example.id!r}: {err}") from None

    def verify(self, completion: str, example: Example, truncated: bool = False) -> Verdict:
        """Verify one completion against ``example.gold``; see the class docstring for reasons.
        ``truncated``: the completion hit the token limit (see ``extract_answer``'s ``finished``)."""
        gold = self._gold(example)
        extracted, failure = _extract(completion, self.extraction, finished=not truncated)
        if extracted is None:
            if failure == "no_answer" and truncated and self.extraction == "any":
                failure = "truncated"
            return Verdict(False, 0.0, failure, None)
        if len(extracted) > self.max_answer_chars:
            return Verdict(False, 0.0, "answer_too_long", extracted[:self.max_answer_chars])
        try:
            with hardened(), _time_limit(self.timeout_s):
                pred, failure = _parse_math(extracted)
                correct = failure is None and verify(gold, pred, timeout_seconds=None)
        except _Timeout:
            return Verdict(False, 0.0, "timeout", extracted)
        except (RecursionError, MemoryError):
            return Verdict(False, 0.0, "parse_error", extracted)
        if correct:
            return Verdict(True, 1.0, "ok", extracted)
        return Verdict(False, 0.0, failure or "mismatch", extracted)

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example],
                     truncated: Sequence[bool] | None = None) -> list[Verdict]:
        """Verify ``completions[i]`` against ``examples[i]`` (``truncated[i]``: it hit the token limit).
        Raises ConfigError on a length mismatch (``base.batch_flags``)."""
        truncated = batch_flags(completions, examples, truncated)
        return [self.verify(c, e, t) for c, e, t in zip(completions, examples, truncated)]


class AccuracyReward:
    """Reward 1.0 for a correct final answer, else 0.0: ``Verdict.score`` of the verifier
    (DeepSeek-R1 §2.2.2 "accuracy rewards"). Logged as ``rewards/accuracy``."""

    name = "accuracy"

    def __init__(self, verifier):
        self.verifier = verifier

    def __call__(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        return [v.score for v in self.verifier.verify_batch(completions, examples)]
