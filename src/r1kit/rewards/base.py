"""The reward seam: verifiers and reward functions.

A ``Verifier`` decides whether one completion answers one ``Example`` correctly and says why. The
same verifier object is used by the accuracy reward during RL and by evaluation, so a model is never
trained against one notion of "correct" and scored against another.

A ``RewardFunction`` maps a batch of completions to scalar rewards, one per completion; the trainer
sums them with configurable weights and logs each under ``rewards/<name>/mean`` and ``/std``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from r1kit.data.base import Example
from r1kit.data.reasoning import THINK_CLOSE
from r1kit.errors import ConfigError


def answer_region(completion: str) -> str:
    """The part of a completion a verifier reads the final answer (or program) from: the text after
    its last ``</think>``, or all of it when it has none, so trial answers and code inside the
    reasoning never count. (Serving splits at the first ``</think>``, ``data.reasoning``: there the
    reasoning is shown, here only the final answer may score.)"""
    return completion.rsplit(THINK_CLOSE, 1)[-1]


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one completion.

    Attributes:
        correct: the completion's answer is equivalent to the gold answer (code: all tests pass).
        score: in [0, 1]; 1.0/0.0 for binary checks, the fraction of tests passed for partial credit.
        reason: short machine-readable reason, e.g. ``"ok"``, ``"no_answer"``, ``"mismatch"``,
            ``"timeout"``, ``"syntax_error"``.
        extracted: the answer (or program) pulled out of the completion, or ``None``.
    """

    correct: bool
    score: float
    reason: str
    extracted: str | None = None


def batch_flags(completions: Sequence[str], examples: Sequence[Example],
                truncated: Sequence[bool] | None = None) -> list[bool]:
    """The truncation flags of a ``verify_batch`` call (all False for None), once the lengths agree.

    Raises:
        ConfigError: the completions, examples and flags are not equally many (names the three counts).
    """
    flags = [False] * len(completions) if truncated is None else list(truncated)
    if not len(completions) == len(examples) == len(flags):
        raise ConfigError(f"verify_batch got {len(completions)} completions for {len(examples)} examples "
                          f"and {len(flags)} truncation flags")
    return flags


@runtime_checkable
class Verifier(Protocol):
    """Checks completions against examples. ``name`` labels the metric (e.g. ``"math"``)."""

    name: str

    def verify(self, completion: str, example: Example) -> Verdict:
        """Verify one completion; never raises for a bad completion (returns a failed Verdict)."""
        ...

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example],
                     truncated: Sequence[bool] | None = None) -> list[Verdict]:
        """Verify ``completions[i]`` against ``examples[i]``; same length in and out. ``truncated[i]``
        says the completion hit the token limit (None: none did); a verifier may refuse to read a
        final answer out of a cut-off text."""
        ...


@runtime_checkable
class RewardFunction(Protocol):
    """A named reward: ``__call__(completions, examples) -> list[float]`` (len = len(completions))."""

    name: str

    def __call__(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]: ...
