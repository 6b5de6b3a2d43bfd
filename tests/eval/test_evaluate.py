"""Evaluation statistics: pass@1 over k, maj@k, bootstrap intervals, paired before/after difference."""

import pytest

from r1kit.data.base import Example
from r1kit.eval.evaluate import (EvalResult, bootstrap_ci, eval_report, evaluate, majority_correct,
                                 paired_difference, pass1_interval, wilson_interval)
from r1kit.rewards.base import Verdict
from r1kit.rollout.base import Completion


def test_majority_correct():
    assert majority_correct(["3", "3", "4"], [True, True, False])
    assert not majority_correct(["4", "3", "4"], [False, True, False])
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, " 5", "5 "], [False, True, True])  # whitespace-normalized votes


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    vals = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(vals, seed=3)
    assert lo < 0.3 < hi and 0.18 < lo and hi < 0.42
    assert bootstrap_ci(vals, seed=3) == (lo, hi)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_wilson_interval_by_hand():
    """z = 1.959964, z² = 3.841459. At 0/n the upper bound is z²/(n + z²); at n/n the lower is n/(n + z²).
    30/100: center (0.3 + z²/200)/(1 + z²/100) = 0.307399, half-width 1.887457 · sqrt(0.0021 + z²/40000)
    = 0.088450, so [0.21895, 0.39585] (the 0.2189–0.3958 of published tables)."""
    assert wilson_interval(0.0, 200) == pytest.approx((0.0, 3.841459 / 203.841459), abs=1e-7)  # [0, 1.885%]
    assert wilson_interval(1.0, 200) == pytest.approx((200 / 203.841459, 1.0), abs=1e-7)  # [98.12%, 100%]
    assert wilson_interval(0.3, 100) == pytest.approx((0.21895, 0.39585), abs=1e-5)


def test_pass1_interval_is_wilson_for_k1_and_for_equal_scores_else_bootstrap():
    assert pass1_interval([0.0] * 200, k=1) == wilson_interval(0.0, 200)  # a bootstrap would give [0, 0]
    assert pass1_interval([1.0] * 30 + [0.0] * 70, k=1) == wilson_interval(0.3, 100)
    assert pass1_interval([1.0] * 50, k=4) == wilson_interval(1.0, 50)  # over problems, not 200 samples
    mixed = [0.0, 0.25, 0.5, 1.0] * 10
    assert pass1_interval(mixed, k=4, seed=2) == bootstrap_ci(mixed, seed=2)
    lo, hi = pass1_interval([], k=1)
    assert lo != lo and hi != hi  # nan


def _result(scores, k=1):
    rows = [{"id": f"p{i}", "gold": str(i), "correct": [s] * k, "extracted": [str(i)] * k} for i, s in enumerate(scores)]
    return EvalResult("t", len(rows), k, sum(scores) / len(scores), (0, 0), None, {}, rows)


def test_paired_difference_detects_a_real_gain_and_not_noise():
    before = _result([False] * 80 + [True] * 20)
    after = _result([False] * 60 + [True] * 40)  # 20 problems flipped to correct, none lost
    d = paired_difference(before, after)
    assert d["diff"] == pytest.approx(0.2)
    assert d["ci"][0] > 0.1 and d["p_le_zero"] == 0.0
    # a training prior none of these golds is in: every problem is prior-free
    assert "significant gain on the prior-free subset" in eval_report({"b": before, "a": after}, ["x"])[0]
    same = paired_difference(before, before)
    assert same["diff"] == 0 and same["ci"] == (0.0, 0.0)
    assert "no significant change" in eval_report({"b": before, "a": before}, ["x"])[0]
    with pytest.raises(ValueError):
        paired_difference(before, _result([True] * 99))


class _Engine:
    """Returns, for prompt i, completion j: the text 'i' (correct) when j < i % 3, else 'x'."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, prompt_ids, params):
        out = []
        for i in range(len(prompt_ids)):
            for j in range(params.n):
                text = str(i) if j < i % 3 else "x"
                out.append(Completion(self.tok.encode(text), [0.0], "stop", i))
        return out


class _Tok:
    def encode(self, text):
        return [ord(c) for c in text]

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(map(chr, x)) for x in ids]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.encode(text)}

    bos_token = None


class _Verifier:
    def verify_batch(self, texts, examples, truncated=None):
        return [Verdict(t == e.gold, float(t == e.gold), "ok", t) for t, e in zip(texts, examples)]


def test_evaluate_pass1_is_mean_over_k_and_majk():
    exs = [Example(f"e{i}", f"q{i}", str(i)) for i in range(6)]
    r = evaluate(_Engine(_Tok()), _Tok(), exs, _Verifier(), lambda e: e.prompt, k=3)
    # correct samples per problem: i % 3 of 3 → 0, 1/3, 2/3, 0, 1/3, 2/3
    assert r.pass1 == pytest.approx((0 + 1 / 3 + 2 / 3) * 2 / 6)
    # majority answer correct when 2 of 3 agree on the gold: problems 2 and 5
    assert r.majk == pytest.approx(2 / 6)
    assert [p["correct"] for p in r.per_problem][2] == [True, True, False]
    assert r.pass1_ci == bootstrap_ci([0, 1 / 3, 2 / 3] * 2, seed=0)
    r1 = evaluate(_Engine(_Tok()), _Tok(), exs, _Verifier(), lambda e: e.prompt, k=1)  # correct: i % 3 > 0
    assert r1.pass1 == pytest.approx(4 / 6) and r1.pass1_ci == wilson_interval(4 / 6, 6)


def test_evaluate_passes_stops_and_truncation_to_engine_and_verifier():
    """The run's stop strings reach the sampler, and each completion's truncation flag reaches the
    verifier (a cut-off direct answer has no final number)."""
    from r1kit.rewards.math import MathVerifier

    seen = {}

    class Engine:
        def generate(self, prompt_ids, params):
            seen["stop"] = params.stop
            return [Completion(_Tok().encode("so 3 + 4 = 7"), [0.0], "length", 0),
                    Completion(_Tok().encode("so 3 + 4 = 7"), [0.0], "stop", 0)]

    r = evaluate(Engine(), _Tok(), [Example("e0", "q", "7")], MathVerifier("any"), lambda e: e.prompt, k=2,
                 stop=["\n"])
    assert seen["stop"] == ["\n"] and r.settings["stop"] == ["\n"]
    assert r.per_problem[0]["correct"] == [False, True] and r.per_problem[0]["truncated"] == [True, False]


def test_records_stream_as_problems_finish_and_done_problems_are_not_sampled_again(embedded_dir):
    """``on_problem`` sees each record as its problem is scored, before r1kit's engine's ``generate``
    returns; the result is the same with or without it; ``done`` rows are reused as given and their
    prompts not sampled again."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from r1kit.rewards.math import MathVerifier
    from r1kit.rollout.engine import Engine

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                         max_position_embeddings=128)).eval()
    engine = Engine(model, tok, dtype=torch.float32, max_batch=2)  # one problem (k = 2) at a time
    calls, seen, generate = [], [], engine.generate

    def counting(prompt_ids, params, on_finished=None):
        calls.append(len(prompt_ids))
        out = generate(prompt_ids, params, on_finished=on_finished)
        calls.append("returned")
        return out

    engine.generate = counting
    examples = [Example(f"p{i}", f"What is {i} plus 1?", str(i + 1)) for i in range(5)]
    kw = dict(k=2, temperature=1.0, max_tokens=3, seed=4)
    render = lambda e: e.prompt  # noqa: E731
    streamed = evaluate(engine, tok, examples, MathVerifier(), render,
                        on_problem=lambda row: seen.append((row["id"], calls[-1])), **kw)
    plain = evaluate(engine, tok, examples, MathVerifier(), render, **kw)
    assert streamed.per_problem == plain.per_problem
    assert sorted(seen) == [(e.id, 5) for e in examples]  # each once, while generate was still running
    fake = {"id": "p1", "gold": "2", "correct": [True, True], "extracted": ["2", "2"], "truncated": [False, False]}
    resumed = evaluate(engine, tok, examples, MathVerifier(), render, done=[fake], **kw)
    assert calls == [5, "returned", 5, "returned", 4, "returned"] and resumed.per_problem[1] is fake
