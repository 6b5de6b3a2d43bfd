"""Generated arithmetic: fixed disjoint splits, correct answers, the math verifier agrees; the
three-operand chains and their worked traces (every step exact, held-out operand triples)."""

import random

import pytest

from r1kit.data.arithmetic import (MAX_COMPLETION_TOKENS, arithmetic, arithmetic_chain, chain_answer, chain_terms,
                                   is_chain_test_problem, is_test_problem, random_chain_problem, random_document,
                                   random_problem, worked_trace)
from r1kit.data.loading import load_task
from r1kit.errors import ConfigError, DataError
from r1kit.rewards.math import MathVerifier
from r1kit.runtime import make_verifier


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


def test_worked_traces_by_hand_and_every_step_keeps_the_value():
    assert worked_trace("12+34+56=") == "46+56=102"
    assert worked_trace("12-34+5-7=") == "-22+5-7=-17-7=-24"
    assert worked_trace("0-29-29=") == "-29-29=-58" and worked_trace("3+4=") == "7"
    assert chain_answer("29+29+29=") == "87" and chain_terms("12-34+5=") == ([12, 34, 5], ["-", "+"])
    rng = random.Random(0)
    for _ in range(300):
        prompt, trace = random_chain_problem(rng)
        steps = trace.split("=")
        assert len(steps) == 2 and all(eval(step) == eval(prompt[:-1]) for step in steps)  # each step is exact
        assert steps[-1] == chain_answer(prompt) and not is_chain_test_problem(prompt)
        assert len(trace) + 1 <= MAX_COMPLETION_TOKENS["arithmetic_chain"]  # characters + eos
        assert all(0 <= x <= 29 for x in chain_terms(prompt)[0])
    prompt, trace = random_document("arithmetic_chain", random.Random(1), split="test")
    assert is_chain_test_problem(prompt) and trace == worked_trace(prompt)
    assert random_document("arithmetic", random.Random(1)) == random_problem(random.Random(1))
    with pytest.raises(ConfigError, match="no generated pretraining corpus"):
        random_document("gsm8k", rng)


def test_chain_splits_partition_every_problem_and_share_no_operands():
    train, test = load_task("arithmetic_chain", "train"), load_task("arithmetic_chain", "test")
    assert len(train) + len(test) == 30**3 * 4  # a, b, c in [0, 29], two signs each
    assert 0.09 < len(test) / (30**3 * 4) < 0.11 and len(test) % 4 == 0  # whole operand triples
    operands = lambda split: {tuple(chain_terms(e.prompt)[0]) for e in split}  # noqa: E731
    assert not operands(train) & operands(test)  # no held-out problem shares its numbers with a train one
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    for e in test[:400] + train[:400]:
        assert e.gold == str(eval(e.prompt[:-1])) and e.meta["trace"] == worked_trace(e.prompt)
        assert e.id == f"arithmetic_chain/{'test' if is_chain_test_problem(e.prompt) else 'train'}/{e.prompt[:-1]}"
    assert len({tuple(chain_terms(e.prompt)[0]) for e in test[:400]}) > 300  # hash order: sign variants spread
    assert [e.id for e in arithmetic_chain("test")[:5]] == [e.id for e in test[:5]]
    small = arithmetic_chain("train", max_operand=2) + arithmetic_chain("test", max_operand=2)
    assert sorted(e.prompt for e in small)[:3] == ["0+0+0=", "0+0+1=", "0+0+2="] and len(small) == 27 * 4
    with pytest.raises(DataError, match="splits: train, test"):
        arithmetic_chain("validation")
    with pytest.raises(ConfigError, match="operands >= 2"):
        arithmetic_chain("train", operands=1)


@pytest.mark.parametrize("bad", ["12*3+1=", "-1+2+3=", "12+3+4", "12++3=", "="])
def test_malformed_chain_is_an_error(bad):
    with pytest.raises(DataError, match="not an arithmetic chain"):
        chain_terms(bad)


def test_the_task_verifier_reads_only_the_final_answer_of_a_trace():
    ex = load_task("arithmetic_chain", "test")[0]
    trace, first = ex.meta["trace"], ex.meta["trace"].split("=")[0]
    wrong_final = f"{first}={int(ex.gold) + 1}"
    wrong_step = f"{first}0={ex.gold}"  # an intermediate step that is wrong, the right final answer
    verdicts = make_verifier("arithmetic_chain", "any").verify_batch([trace, wrong_final, wrong_step, ex.gold, ""], [ex] * 5)
    assert [v.correct for v in verdicts] == [True, False, True, True, False]
    assert verdicts[0].extracted == ex.gold
