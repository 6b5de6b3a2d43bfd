"""Evaluation against answer priors: constant-answer baselines, the prior-free subset, the answer
distribution and the verdict that calls a gain significant only when it holds without common answers."""

import json
import math
import random

import pytest

from r1kit.data.base import Example
from r1kit.eval.evaluate import (answer_histogram, answer_key, common_answers, eval_report, evaluate,
                                 paired_difference, prior_analysis, save_report, verdict, wilson_interval)
from r1kit.rewards.math import MathVerifier
from r1kit.rollout.base import Completion
from test_evaluate import _Tok  # tests/eval is on sys.path (pytest's rootdir-relative imports)

# Synthetic split, golds seeded: '2' and '1' are the common answers (as in SVAMP), the rest spread out.
_RNG = random.Random(0)
TRAIN_GOLDS = ["2"] * 60 + ["1"] * 50 + ["3"] * 30 + [str(_RNG.randrange(10, 500)) for _ in range(360)]
EVAL_GOLDS = ["2"] * 24 + ["1"] * 18 + [str(v) for v in range(10, 168)]  # 200 problems; 42 common golds
EXAMPLES = [Example(f"s/{i}", f"q{i}", g) for i, g in enumerate(EVAL_GOLDS)]


class _Policy:
    """A sampling engine whose completion j for problem i is ``answer(i, j)`` (None: the token limit cut it)."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompt_ids, params):
        out = []
        for i in range(len(prompt_ids)):
            for j in range(params.n):
                a = self.answer(i, j)
                out.append(Completion(_Tok().encode("so" if a is None else f"The answer is {a}"), [0.0],
                                      "length" if a is None else "stop", i))
        return out


def _evaluate(answer, k=2):
    return evaluate(_Policy(answer), _Tok(), EXAMPLES, MathVerifier("any"), lambda e: e.prompt, k=k, task="synthetic")


def test_answer_key_groups_equal_numbers_only():
    assert [answer_key(a) for a in ("2", "2.0", " 2 ", "$2", "2.50", "1,000", "x  y", "", None)] == \
        ["2", "2", "2", "2", "2.5", "1000", "x y", None, None]


def test_common_answers_cover_the_set_share():
    # '2' 60/500 = 12%, then '1' brings 22% >= 20%: the cut is ['2', '1'] and stops there
    assert common_answers(TRAIN_GOLDS, 0.2) == ["2", "1"]
    assert common_answers(TRAIN_GOLDS, 0.0) == ["2"] and common_answers(TRAIN_GOLDS, 0.25) == ["2", "1", "3"]
    assert common_answers([None, None]) == []


def test_answer_histogram_by_hand():
    h = answer_histogram(["7"] * 6 + ["3.0", "3"] + [None, None])
    assert h["n"] == 10 and h["no_answer"] == 2 and h["top"] == [["7", 6], ["3", 2]] and h["top_share"] == 0.6
    assert h["entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    empty = answer_histogram([None, None])
    assert empty["top_share"] is None and empty["entropy_bits"] is None and empty["top"] == []


def test_constant_answer_policy_scores_exactly_the_constant_baseline_and_zero_prior_free():
    res = _evaluate(lambda i, j: "2")
    a = prior_analysis({"constant": res}, TRAIN_GOLDS)
    base = a["baselines"]["train"]
    assert base["answer"] == "2" and base["accuracy"] == 24 / 200 == res.pass1
    assert base["ci"] == wilson_interval(24 / 200, 200)
    assert a["baselines"]["eval_mode"]["answer"] == "2"  # the evaluation split's own mode is the same here
    assert a["cut"]["common_answers"] == ["2", "1"] and a["cut"]["n_prior_free"] == 158
    row = a["results"]["constant"]
    assert row["prior_free_pass1"]["share"] == 0.0 and row["prior_free_pass1"]["n_problems"] == 158
    assert row["answers"]["top"] == [["2", 400]] and row["collapsed"] and row["no_answer"]["share"] == 0.0
    line = verdict(a)
    assert "at or below the best constant answer (always '2'" in line and "collapse to a prior" in line


def test_gain_from_learning_the_prior_is_not_called_significant():
    before = _evaluate(lambda i, j: None if j else "0")  # answers nothing right
    after = _evaluate(lambda i, j: "2" if j else None)   # learned to say the most common answer
    md, a = eval_report({"before": before, "after": after}, TRAIN_GOLDS)
    assert a["paired"]["ci"][0] > 0                      # over all problems the gain looks real ...
    assert a["paired_prior_free"]["diff"] == 0.0         # ... and is nothing on the prior-free subset
    assert "significant gain" not in md and "not a real gain" in md
    assert a["results"]["after"]["truncated"]["share"] == 0.5 == a["results"]["after"]["no_answer"]["share"]


def test_a_policy_right_on_rare_answers_shows_its_gain_only_on_the_prior_free_subset():
    """Before: always '2', right on the 24 problems with gold 2 (12%). After: right on the 23 problems with
    an uncommon gold and an index divisible by 7 (42, 49, ..., 196), no answer elsewhere: 11.5% over all
    problems, a change of -0.5 points, but 0 → 23/158 on the prior-free subset."""
    rare = {i for i, g in enumerate(EVAL_GOLDS) if g not in ("1", "2") and i % 7 == 0}
    assert len(rare) == 23
    before = _evaluate(lambda i, j: "2")
    after = _evaluate(lambda i, j: EVAL_GOLDS[i] if i in rare else None)
    md, a = eval_report({"before": before, "after": after}, TRAIN_GOLDS)
    assert a["paired"]["diff"] == pytest.approx(-0.005) and a["paired"]["ci"][0] < 0 < a["paired"]["ci"][1]
    pf = a["paired_prior_free"]
    assert pf["diff"] == pytest.approx(23 / 158) and pf["ci"][0] > 0 and pf["n_problems"] == 158
    assert a["results"]["before"]["prior_free_pass1"]["share"] == 0.0
    assert a["results"]["after"]["prior_free_pass1"]["share"] == pytest.approx(23 / 158)
    line = verdict(a)
    assert line.startswith("significant gain on the prior-free subset") and "collapse" not in line
    assert "after scores at or below the best constant answer (always '2'" in line  # 11.5% <= 12%
    assert a["paired"] == paired_difference(before, after)


def test_one_distinct_gold_and_no_train_split_name_the_missing_baselines_and_report_the_rest(tmp_path):
    exs = [Example(f"c/{i}", f"q{i}", "5") for i in range(20)]
    res = evaluate(_Policy(lambda i, j: "5" if i < 5 else "4"), _Tok(), exs, MathVerifier("any"),
                   lambda e: e.prompt, k=1, task="const")
    md, a = eval_report(res, None, train_missing="c.jsonl is a local file, which has no training split")
    assert "best constant answer (most frequent training gold): not computed: c.jsonl is a local file" in md
    assert ("upper bound: the evaluation split's own most frequent gold: not computed: the evaluation split "
            "has 1 distinct gold answer(s)") in md
    assert "evaluation split (no training split)" in md and a["cut"]["common_answers"] == ["5"]
    assert a["results"]["policy"]["prior_free_pass1"] == {"missing": "every evaluation gold is one of the common "
                                                                      "answers ['5']"}
    assert a["results"]["policy"]["pass1"]["share"] == 0.25 and "| 25.00% |" in md  # the rest is reported
    assert a["results"]["policy"]["answers"]["top"] == [["4", 15], ["5", 5]]
    save_report(tmp_path / "r.md", md, a)
    assert (tmp_path / "r.md").read_text() == md
    assert json.loads((tmp_path / "r.priors.json").read_text())["baselines"]["train"]["missing"].startswith("c.jsonl")
    # without a training split the prior-free cut comes from the evaluation split's own golds
    a2 = prior_analysis({"p": _evaluate(lambda i, j: "2")}, None)
    assert a2["cut"]["common_answers"] == ["2", "1"] and a2["cut"]["n_prior_free"] == 158
    assert "missing" in a2["baselines"]["train"] and a2["baselines"]["eval_mode"]["accuracy"] == 0.12


@pytest.mark.parametrize(("n", "collapsed"), [(2, False), (19, False), (20, True), (200, True)])
def test_collapse_is_called_only_over_enough_problems(n, collapsed):
    """Every sample answering '7' is a collapse over 20 problems or more; over 2 (where any answer of
    one problem is > 30% of the samples) or 19 problems the verdict does not call it one."""
    exs = [Example(f"t/{i}", f"q{i}", str(10 + i)) for i in range(n)]
    res = evaluate(_Policy(lambda i, j: "7"), _Tok(), exs, MathVerifier("any"), lambda e: e.prompt, k=2, task="t")
    a = prior_analysis({"policy": res}, TRAIN_GOLDS)
    row = a["results"]["policy"]
    assert row["answers"]["top"] == [["7", 2 * n]] and row["answers"]["top_share"] == 1.0  # reported either way
    assert row["collapsed"] is collapsed and a["collapse_min_problems"] == 20
    assert ("collapse to a prior: policy answers '7' in " in verdict(a)) is collapsed
