"""N-gram decontamination against every evaluation split r1kit ships (DISTILL_SPEC §4).

Two rules, both on **word n-grams of normalized text** (NFKC, lower case; the tokens are the runs of
letters and digits and each arithmetic operator ``+ - * / = ^ × ÷`` (the minus sign U+2212 read as
``-``; a hyphen between two letters, ``t-shirt`` or ``t - shirt``, joins words and is no token); everything else
separates tokens; ``"What's 2+2?"`` → ``what s 2 + 2``). Operators are
tokens so that ``4-46=`` does not match ``4+46=`` (an earlier version dropped them, and 150 of 1,500
``a±b=`` training prompts were dropped as matches of a test problem with the other sign):

- ``question``: a training question that shares one word **8-gram** with an evaluation question is
  contaminated (open-r1 ``scripts/decontaminate.py``, s1): ``question_n``.
- ``solution``: a text (a training question, or a sampled completion) that shares one word **10-gram**
  with an evaluation question followed by its reference solution is contaminated (DeepSeek-R1 v2
  App. B.3.3, "any text segment containing a matching 10-gram sequence with evaluation questions or
  reference solutions"): ``solution_n``.

An n-gram held by more than ``MAX_EXAMPLES`` (10) evaluation examples is boilerplate, not one
problem's text, and is not matched: r1kit's MBPP prompt wrapper ("you are an expert python programmer
and here is your task"), AIME's "m and n are relatively prime positive integers" (83 question 8-grams
and 47 solution 10-grams of the shipped splits); otherwise every MBPP training prompt and any
competition problem with the stock phrase would be dropped. A text matching such a phrase plus the
problem's own words is still caught by those words. Formulaic short prompts still match each other:
354 of MBPP's 374 training prompts share an 8-gram with an MBPP test/validation prompt ("here is your
task write a function to find the ...", or the ``assert f([1, 2, 3]) == ...`` of its tests), as do
446 of SVAMP's 700 (its problems vary shared story texts; 328 by DeepSeek's 10-gram rule alone) and
100 of GSM8K's 7,473 (fractions: "2 / 5 of the total number of"); a longer ``question_n`` loosens the
rule for such tasks. (With operators ignored these were 350, 446 and 96.)

An evaluation text shorter than n words has no n-gram; upstream then never matches it. Here such a
question matches a training question whose normalized words are exactly the same (``"37+48="`` is
contaminated by ``"37 + 48 ="``, not by every text containing ``37 + 48 =``). Paraphrases are not caught
(as upstream acknowledges).

Evaluation splits: ``EVAL_SPLITS`` (a test checks that it covers the test split of every registered
task); a reference solution is the example's worked ``solution`` (GSM8K, MATH-500, AIME), its
``canonical_solution`` (HumanEval, MBPP), its ``equation`` (SVAMP), else its gold answer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from r1kit.data.base import Example

EVAL_SPLITS: tuple[tuple[str, str], ...] = (
    ("gsm8k", "test"), ("svamp", "test"), ("math500", "test"), ("aime24", "test"), ("amc23", "test"),
    ("humaneval", "test"), ("mbpp", "test"), ("mbpp", "validation"), ("arithmetic", "test"),
    ("arithmetic_chain", "test"),
)
QUESTION_NGRAM = 8  # open-r1 / s1
SOLUTION_NGRAM = 10  # DeepSeek-R1
MAX_EXAMPLES = 10  # an n-gram held by more evaluation examples than this is boilerplate, not a problem's text

OPERATORS = "+-*/=^×÷"  # arithmetic operators: each one is a token of its own
_TOKEN = re.compile(r"[^\W_]+|[" + re.escape(OPERATORS) + "]")
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])\s*-\s*(?=[^\W\d_])")  # a hyphen between two letters joins words: no minus


def normalized_words(text: str) -> list[str]:
    """The tokens of ``text`` after normalization (module docstring): letter/digit runs and operators."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2212", "-")
    return _TOKEN.findall(_WORD_HYPHEN.sub(" ", text))


def ngrams(words: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    """The word n-grams of ``words``, in order (none when there are fewer than n words)."""
    return (tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def reference_solution(example: Example) -> str:
    """The reference solution of an evaluation example (module docstring), or ``""``."""
    for key in ("solution", "canonical_solution", "equation"):
        if example.meta.get(key):
            return str(example.meta[key])
    return example.gold or ""


@dataclass(frozen=True)
class Match:
    """Why a text is contaminated.

    Attributes:
        rule: ``"question"`` (n-gram of an evaluation question) or ``"solution"`` (of question +
            reference solution).
        eval_id: the id of the evaluation example it matches (e.g. ``"gsm8k/test/17"``).
        ngram: the shared n-gram, words joined by spaces (the whole question for a short one).
    """

    rule: str
    eval_id: str
    ngram: str

    def to_dict(self) -> dict:
        return {"rule": self.rule, "eval_id": self.eval_id, "ngram": self.ngram}


class NgramIndex:
    """Word n-grams of a set of evaluation texts → the first evaluation id holding each.

    Args:
        texts: (eval id, text) pairs.
        n: n-gram length in words.
        rule: the name reported in a ``Match``.
        max_examples: n-grams held by more evaluation texts than this are dropped (``common``).

    Raises ConfigError for n or max_examples below 1.
    """

    def __init__(self, texts: Iterable[tuple[str, str]], n: int, rule: str, max_examples: int = MAX_EXAMPLES):
        if n < 1 or max_examples < 1:
            from r1kit.errors import ConfigError

            raise ConfigError(f"decontamination needs n >= 1 and max_examples >= 1, got {n} and {max_examples}")
        self.n, self.rule = n, rule
        self.grams: dict[tuple[str, ...], str] = {}
        self.short: dict[tuple[str, ...], str] = {}
        holders: dict[tuple[str, ...], int] = {}
        for eval_id, text in texts:
            words = normalized_words(text)
            if 0 < len(words) < n:
                self.short.setdefault(tuple(words), eval_id)
            for gram in set(ngrams(words, n)):
                self.grams.setdefault(gram, eval_id)
                holders[gram] = holders.get(gram, 0) + 1
        self.common = {gram for gram, count in holders.items() if count > max_examples}
        for gram in self.common:
            del self.grams[gram]

    def __len__(self) -> int:
        return len(self.grams) + len(self.short)

    def match(self, text: str, whole: bool = False) -> Match | None:
        """The first n-gram of ``text`` found in the index; with ``whole``, also a short evaluation
        text equal to all of ``text``. None when clean."""
        words = normalized_words(text)
        if whole and tuple(words) in self.short:
            return Match(self.rule, self.short[tuple(words)], " ".join(words))
        for gram in ngrams(words, self.n):
            if gram in self.grams:
                return Match(self.rule, self.grams[gram], " ".join(gram))
        return None


class Decontaminator:
    """Both rules over the evaluation examples ``examples`` (default: every split in ``EVAL_SPLITS``).

    Args:
        examples: evaluation examples; None loads ``EVAL_SPLITS`` with ``load_task``.
        question_n: n of the question rule (8).
        solution_n: n of the question + solution rule (10).
        max_examples: n-grams held by more evaluation examples than this are not matched (10).
    """

    def __init__(self, examples: Sequence[Example] | None = None, question_n: int = QUESTION_NGRAM,
                 solution_n: int = SOLUTION_NGRAM, max_examples: int = MAX_EXAMPLES):
        examples = list(eval_examples() if examples is None else examples)
        self.splits = sorted({e.id.rsplit("/", 1)[0] for e in examples})
        self.question_n, self.solution_n, self.max_examples = question_n, solution_n, max_examples
        self.questions = NgramIndex(((e.id, e.prompt) for e in examples), question_n, "question", max_examples)
        self.solutions = NgramIndex(((e.id, f"{e.prompt}\n{reference_solution(e)}") for e in examples),
                                    solution_n, "solution", max_examples)

    def check_question(self, question: str) -> Match | None:
        """A training question against both rules; None when clean."""
        return self.questions.match(question, whole=True) or self.solutions.match(question)

    def check_text(self, text: str) -> Match | None:
        """Any other text (a sampled completion) against the question + solution rule; None when clean."""
        return self.solutions.match(text)


@lru_cache(maxsize=1)
def eval_examples() -> tuple[Example, ...]:
    """Every example of ``EVAL_SPLITS``, loaded once per process."""
    from r1kit.data.loading import load_task

    return tuple(e for task, split in EVAL_SPLITS for e in load_task(task, split))


@lru_cache(maxsize=4)
def shipped_decontaminator(question_n: int = QUESTION_NGRAM, solution_n: int = SOLUTION_NGRAM,
                           max_examples: int = MAX_EXAMPLES) -> Decontaminator:
    """The ``Decontaminator`` over every shipped evaluation split, built once per setting."""
    return Decontaminator(None, question_n, solution_n, max_examples)
