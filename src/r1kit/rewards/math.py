"""Math answer checking: extraction of the final answer, math-verify equivalence, the accuracy reward.

One ``MathVerifier`` object serves both the accuracy reward during RL and evaluation, so a model is
trained and scored against the same notion of "correct" (DESIGN.md, the reward seam).

Pipeline for one completion: ``extract_answer`` pulls the final answer out of the text (the last
``<answer>…</answer>`` or ``\\boxed{…}``, or, in mode ``"any"``, the last number); math-verify parses
it and the gold answer into SymPy objects and compares them, gold first (``verify(gold, pred)``;
math-verify's ``grader.py``). The equivalences it accepts (``0.5`` = ``1/2`` = ``\\frac{1}{2}``,
``1,000`` = ``1000``, ``50%`` = ``0.5`` = ``50``, ``5 cm`` = ``5``, sets in any order, numbers equal
after rounding to 6 decimals) are pinned down in ``tests/rewards/test_math_verifier.py``.

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

from math_verify import parse, verify

from r1kit.data.base import Example
from r1kit.errors import ConfigError, DataError
from r1kit.rewards.base import Verdict
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

    def on_alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _parse_math(text: str) -> list:
    """math-verify ``parse`` of an answer string; bare LaTeX (``\\sqrt{2}``, ``[1,3)``) is wrapped in
    ``$…$`` so math-verify reads it as math, text that already has math delimiters is left as is."""
    if not (_MATH_DOLLAR.search(text) or "\\boxed" in text):
        text = f"${text}$"
    return parse(text, parsing_timeout=None)


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
            parsed = _parse_math(text)
    except _Timeout:
        parsed = []
    if not _has_math(parsed) or _looks_like_words(text):
        raise DataError(
            f"gold answer {text!r} does not parse with math-verify; "
            "write it as a number or a LaTeX expression"
        )
    return parsed


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` in ``text`` (braces balanced), or None if there is none
    or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def _tagged_answer(text: str) -> str | None:
    answers = _ANSWER_TAG.findall(text)
    if answers:
        inner = answers[-1]
        boxed = last_boxed(inner)
        return boxed if boxed is not None else inner
    return last_boxed(text)


def extract_answer(completion: str, mode: str = "tagged", finished: bool = True) -> str | None:
    """The final answer written in a completion, as a string, or None when there is none.

    Only the text after the last ``</think>`` is searched when the completion has one, so numbers and
    trial answers inside the reasoning do not count.

    Args:
        completion: the generated text.
        mode: ``"tagged"``: the content of the last ``<answer>…</answer>`` (its ``\\boxed{}`` content if
            it holds one), else of the last ``\\boxed{…}``. ``"any"``: the tagged answer if present,
            else the last number (``-1,234.5`` style) — for direct-answer templates.
        finished: the completion ended on its own (EOS or a stop string). The last-number fallback
            needs this: a completion cut off by the token limit has not stated its final number yet,
            and its last number is an intermediate one, so it gives no answer (a tagged answer
            written before the cut still counts, as in R1's evaluation).

    Raises:
        ConfigError: unknown mode.
    """
    if mode not in EXTRACTION_MODES:
        raise ConfigError(f"extraction mode {mode!r} is unknown; use one of {', '.join(EXTRACTION_MODES)}")
    text = completion.rsplit("</think>", 1)[-1]
    answer = _tagged_answer(text)
    if answer is None and mode == "any" and finished:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    if answer is None or not answer.strip():
        return None
    return answer.strip()


@register_verifier("math")
class MathVerifier:
    """Checks math completions against ``Example.gold`` with math-verify.

    Args:
        extraction: ``"tagged"`` (``<answer>``/``\\boxed{}``) or ``"any"`` (also the last number); see
            ``extract_answer``.
        timeout_s: CPU-time limit for parsing and comparing one completion, seconds.

    ``verify`` never raises for a bad completion; the Verdict's reason is ``"ok"``, ``"no_answer"``
    (nothing extracted), ``"truncated"`` (extraction ``"any"``: cut off by the token limit before a
    final number), ``"parse_error"`` (math-verify cannot read the extracted answer),
    ``"mismatch"`` or ``"timeout"``. A gold answer that does not parse raises DataError (loaders
    validate golds, so this only happens for hand-made Examples). Parsed golds are cached by
    ``parse_gold``, so each distinct gold is parsed once per process.
    """

    name = "math"

    def __init__(self, extraction: str = "tagged", timeout_s: float = 2.0):
        if extraction not in EXTRACTION_MODES:
            raise ConfigError(
                f"extraction {extraction!r} is unknown; use one of {', '.join(EXTRACTION_MODES)}"
            )
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.extraction = extraction
        self.timeout_s = timeout_s

    def _gold(self, example: Example) -> list:
        try:
            return parse_gold(example.gold)
        except DataError as err:
            raise DataError(f"example {example.id!r}: {err}") from None

    def verify(self, completion: str, example: Example, truncated: bool = False) -> Verdict:
        """Verify one completion against ``example.gold``; see the class docstring for reasons.
        ``truncated``: the completion hit the token limit (see ``extract_answer``'s ``finished``)."""
        gold = self._gold(example)
        extracted = extract_answer(completion, self.extraction, finished=not truncated)
        if extracted is None:
            no_number = truncated and self.extraction == "any"
            return Verdict(False, 0.0, "truncated" if no_number else "no_answer", None)
        try:
            with _time_limit(self.timeout_s):
                pred = _parse_math(extracted)
                correct = verify(gold, pred, timeout_seconds=None)
        except _Timeout:
            return Verdict(False, 0.0, "timeout", extracted)
        if correct:
            return Verdict(True, 1.0, "ok", extracted)
        return Verdict(False, 0.0, "mismatch" if _has_math(pred) else "parse_error", extracted)

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example],
                     truncated: Sequence[bool] | None = None) -> list[Verdict]:
        """Verify ``completions[i]`` against ``examples[i]`` (``truncated[i]``: it hit the token limit).
        Raises ValueError on a length mismatch."""
        truncated = [False] * len(completions) if truncated is None else list(truncated)
        if not len(completions) == len(examples) == len(truncated):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples "
                             f"and {len(truncated)} truncation flags")
        return [self.verify(c, e, t) for c, e, t in zip(completions, examples, truncated)]


class AccuracyReward:
    """Reward 1.0 for a correct final answer, else 0.0: ``Verdict.score`` of the verifier
    (DeepSeek-R1 §2.2.2 "accuracy rewards"). Logged as ``rewards/accuracy``."""

    name = "accuracy"

    def __init__(self, verifier):
        self.verifier = verifier

    def __call__(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        return [v.score for v in self.verifier.verify_batch(completions, examples)]
