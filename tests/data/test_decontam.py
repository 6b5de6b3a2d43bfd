"""N-gram decontamination: planted evaluation questions and solutions are caught, clean text survives,
and every shipped evaluation split is covered."""

import pytest

from r1kit.data.base import Example, task_names
from r1kit.data.decontam import Decontaminator, Match, normalized_words, shipped_decontaminator
from r1kit.data.loading import load_task
from r1kit.errors import DataError

CLEAN = [
    "A farmer plants 12 rows of corn with 8 plants in each row. How many plants are there?",
    "Compute the remainder when 2^100 is divided by 7.",
    "Write a function that returns the reverse of a string.",
]


@pytest.fixture(scope="module")
def decon():
    return shipped_decontaminator()


def test_normalized_words():
    assert normalized_words("What's  2+2?\nÉCOLE_x") == ["what", "s", "2", "+", "2", "école", "x"]
    assert normalized_words("3*4−1=11, 8/2^1÷4") == ["3", "*", "4", "-", "1", "=", "11", "8", "/", "2", "^", "1", "÷", "4"]
    assert normalized_words("a t-shirt, two t - shirts; x -5") == ["a", "t", "shirt", "two", "t", "shirts", "x", "-", "5"]


def test_operators_tell_problems_apart():
    """``4-46=`` is not ``4+46=`` (an operator-blind normalization made them one text), for short
    questions matched whole and for n-grams alike; the same problem spaced otherwise still matches."""
    d = Decontaminator([Example("ar/test/0", "4+46=", "50"),
                        Example("ev/test/1", "What is 12 - 5 + 3 - 1?", "9")])  # 9 tokens: two 8-grams
    assert d.check_question("4-46=") is None and d.check_question("4*46=") is None
    assert d.check_question("4 + 46 =").eval_id == "ar/test/0"
    assert d.check_question("So, what is 12 + 5 + 3 - 1?") is None
    assert d.check_question("So, what is 12-5+3-1?").eval_id == "ev/test/1"


def test_planted_questions_are_caught_and_clean_ones_survive(decon):
    gsm = load_task("gsm8k", "test")[7]
    assert decon.check_question(gsm.prompt) == Match("question", gsm.id, " ".join(normalized_words(gsm.prompt)[:8]))
    problem = next(e for e in load_task("math500", "test") if len(e.prompt.split()) > 30)
    words = problem.prompt.split()
    inside = "Before we start, a warm-up. " + " ".join(words[2:10]) + " That is all for today."
    match = decon.check_question(inside)
    assert match.rule == "question" and match.eval_id == problem.id
    assert match.ngram == " ".join(normalized_words(" ".join(words[2:10]))[:8])
    for text in CLEAN:
        assert decon.check_question(text) is None and decon.check_text(text) is None


def test_eight_words_catch_seven_do_not():
    ev = Example("ev/test/0", "the quick brown fox jumps over the lazy dog today", "1")
    d = Decontaminator([ev], question_n=8, solution_n=10)
    assert d.check_question("so: quick brown fox jumps over the lazy dog!").eval_id == "ev/test/0"
    assert d.check_question("so: quick brown fox jumps over the lazy cat!") is None  # 7 shared words


def test_boilerplate_held_by_many_evaluation_examples_is_not_matched(decon):
    stock = "let m and n be relatively prime positive integers such that"
    evals = [Example(f"ev/test/{i}", f"{stock} item {i} number {i * 7} holds", "1") for i in range(11)]
    assert Decontaminator(evals).check_question(f"In a new problem, {stock} m + n = 9.") is None  # 11 > 10 holders
    assert Decontaminator(evals[:10]).check_question(f"In a new problem, {stock} m + n = 9.").rule == "question"
    assert Decontaminator(evals).check_question(f"{stock} item 3 number 21 holds").eval_id == "ev/test/3"
    wrapper = "You are an expert Python programmer, and here is your task:"  # in all 590 MBPP eval prompts
    assert decon.check_question(f"{wrapper} Compute it.") is None


def test_solution_ten_grams_in_a_completion(decon):
    gsm = load_task("gsm8k", "test")[11]
    solution_words = gsm.meta["solution"].split()
    completion = "<think>\nLet me think. " + " ".join(solution_words[:12]) + "\n</think> \\boxed{1}"
    match = decon.check_text(completion)
    assert match.rule == "solution" and match.eval_id == gsm.id
    d = Decontaminator([Example("ev/test/0", "q", "1", {"solution": "one two three four five six seven eight nine ten"})])
    assert d.check_text("it is one two three four five six seven eight nine ten.").rule == "solution"
    assert d.check_text("it is one two three four five six seven eight nine.") is None


def test_short_questions_match_only_whole(decon):
    arith = load_task("arithmetic", "test")[0]  # "a+b=" or "a-b=": two words after normalization
    assert decon.check_question(arith.prompt.replace("+", " + ")).eval_id == arith.id
    assert decon.check_question(f"Earlier {arith.prompt} was asked, and much more.") is None


def test_every_registered_test_split_is_covered(decon):
    for name in task_names():
        try:
            examples = load_task(name, "test")
        except DataError:
            continue  # the task has no test split
        missed = [e.id for e in examples if decon.check_question(e.prompt) is None]
        assert not missed, f"{name} test problems not covered by EVAL_SPLITS: {missed[:3]}"
