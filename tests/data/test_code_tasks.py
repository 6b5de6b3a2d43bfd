"""humaneval and mbpp: counts and splits, meta fields, test-step grouping, row validation."""

import json

import pytest

from r1kit.data.base import get_task_loader, task_names, task_verifier
from r1kit.errors import DataError


@pytest.fixture(scope="module")
def humaneval():
    return get_task_loader("humaneval")("test")


def test_registered_with_the_code_verifier():
    assert {"humaneval", "mbpp"} <= set(task_names())
    assert task_verifier("humaneval") == task_verifier("mbpp") == "code"


def test_humaneval_rows(humaneval):
    assert len(humaneval) == 164 and len({e.id for e in humaneval}) == 164
    first = humaneval[0]
    assert first.id == "humaneval/test/0" and first.gold is None
    assert first.meta["entry_point"] == "has_close_elements"
    assert first.meta["prompt_code"] in first.prompt
    assert len(first.meta["tests"]) == 7  # the seven asserts of check(candidate)
    assert first.meta["tests"][0] == "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    assert first.meta["test_setup"].endswith("candidate = has_close_elements")
    assert first.meta["canonical_solution"].startswith(first.meta["prompt_code"])


def test_humaneval_groups_setup_statements_with_the_next_assert(humaneval):
    # HumanEval/32: imports and an rng set-up before a for-loop of asserts form one step.
    steps = humaneval[32].meta["tests"]
    assert len(steps) == 1
    assert steps[0].startswith("import math") and "for _ in range(100):" in steps[0]
    # HumanEval/151: two assignments between asserts join the assert after them.
    steps = humaneval[151].meta["tests"]
    assert len(steps) == 7 and steps[-1].count("\n") == 2 and "assert candidate(lst) == odd_sum" in steps[-1]


@pytest.mark.parametrize("split,count,lo,hi", [("prompt", 10, 1, 10), ("test", 500, 11, 510),
                                               ("validation", 90, 511, 600), ("train", 374, 601, 974)])
def test_mbpp_standard_splits(split, count, lo, hi):
    rows = get_task_loader("mbpp")(split)
    ids = [e.meta["task_id"] for e in rows]
    assert len(rows) == count and min(ids) == lo and max(ids) == hi and len(set(ids)) == count
    assert all(e.id == f"mbpp/{split}/{e.meta['task_id']}" for e in rows)


def test_mbpp_row_fields():
    row = get_task_loader("mbpp")("prompt")[1]  # task 2
    assert row.meta["entry_point"] == "similar_elements"
    assert row.meta["tests"][0] == "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)"
    assert row.prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to find the similar")
    assert all(t in row.prompt for t in row.meta["tests"])


def test_unknown_splits_raise():
    with pytest.raises(DataError, match="validation"):
        get_task_loader("mbpp")("dev")
    with pytest.raises(DataError, match="only the split 'test'"):
        get_task_loader("humaneval")("train")


GOOD_MBPP = {"task_id": 601, "text": "Add.", "code": "def add(a, b):\n    return a + b",
             "test_list": ["assert add(1, 2) == 3"], "test_setup_code": "", "challenge_test_list": []}


@pytest.mark.parametrize("change,message", [
    ({"test_list": []}, "row 2 .*test_list must be a non-empty list"),
    ({"test_list": ["assert add(1, 2) =="]}, r"row 2 \(task 601\) test_list\[0\]: does not parse"),
    ({"code": "def plus(a, b): return a + b"}, "row 2 .*calls no function defined in 'code'"),
    ({"code": "def add(a, b) return"}, "row 2 .*field 'code': does not parse"),
    ({"task_id": "601"}, "row 2: field 'task_id' must be a int"),
])
def test_bad_mbpp_rows_name_file_and_row(tmp_path, change, message):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(GOOD_MBPP) + "\n" + json.dumps({**GOOD_MBPP, **change}) + "\n")
    with pytest.raises(DataError, match=message) as err:
        get_task_loader("mbpp")("train", path=str(path))
    assert str(path) in str(err.value)


def test_bad_humaneval_row_names_file_and_row(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def f(x):\n    pass\n", "entry_point": "g",
           "canonical_solution": "", "test": "def check(candidate):\n    assert candidate(1)\n"}
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"he.jsonl row 1 \(HumanEval/0\): entry_point 'g' is not defined"):
        get_task_loader("humaneval")("test", path=str(path))
    path.write_text(json.dumps({**row, "entry_point": "f", "test": "x = 1\n"}) + "\n")
    with pytest.raises(DataError, match="must define one check"):
        get_task_loader("humaneval")("test", path=str(path))


def test_not_json_names_the_line(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(GOOD_MBPP) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        get_task_loader("mbpp")("train", path=str(path))
