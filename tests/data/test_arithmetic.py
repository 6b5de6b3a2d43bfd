"""Generated arithmetic: fixed disjoint splits, correct answers, the math verifier agrees."""

import random

import pytest

from r1kit.data.arithmetic import arithmetic, is_test_problem, random_problem
from r1kit.data.loading import load_task
from r1kit.errors import DataError
from r1kit.rewards.math import MathVerifier


def test_splits_partition_every_problem_and_are_fixed():
    train, test = load_task("arithmetic", "train"), load_task("arithmetic", "test")
    assert len(train) + len(test) == 2 * 50 * 50  # a, b in [0, 49], + and -
    assert 0.09 < len(test) / 5000 < 0.11
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert [e.id for e in arithmetic("test")[:5]] == [e.id for e in test[:5]]  # same order every load
    assert all(is_test_problem(e.prompt) for e in test[:50])


def test_answers_are_the_integer_results():
    small = arithmetic("train", max_operand=3) + arithmetic("test", max_operand=3)
    assert len(small) == 32
    by_prompt = {e.prompt: e.gold for e in small}
    assert by_prompt["3+2="] == "5" and by_prompt["1-3="] == "-2" and by_prompt["0-0="] == "0"
    assert all(e.id == f"arithmetic/{'test' if is_test_problem(e.prompt) else 'train'}/{e.prompt[:-1]}" for e in small)


def test_random_problems_stay_in_their_split():
    rng = random.Random(0)
    drawn = [random_problem(rng) for _ in range(300)]
    assert not any(is_test_problem(p) for p, _ in drawn)
    prompt, answer = random_problem(random.Random(1), split="test")
    assert is_test_problem(prompt) and str(eval(prompt[:-1])) == answer
    a, b = (int(x) for x in prompt[:-1].replace("-", "+").split("+"))
    assert 0 <= a <= 49 and 0 <= b <= 49


def test_the_verifier_accepts_exactly_the_answer():
    ex = arithmetic("test")[0]
    verdicts = MathVerifier(extraction="any").verify_batch([ex.gold, str(int(ex.gold) + 1), ""], [ex] * 3)
    assert [v.correct for v in verdicts] == [True, False, False]


def test_unknown_split_is_an_error():
    with pytest.raises(DataError, match="splits: train, test"):
        arithmetic("validation")
