"""r1kit's sampling engine: parity with HF ``generate`` and a full-forward logprob recompute, seeded
reproducibility, the samplers against hand-computed distributions, stops, slot reuse, errors.

A tiny random Llama (2 layers, GQA, the real 49152-token vocabulary so the real tokenizer applies)
keeps most tests fast; the embedded SmolLM2-135M proves parity on the real model (marked slow).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from r1kit.errors import ConfigError
from r1kit.models.embedded import embedded_model_dir
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine, draw, native_bf16, resolve_dtype, sample


def tiny_llama(seed: int = 0, context: int = 256) -> LlamaForCausalLM:
    """2 layers, D=64, 4 query heads over 2 KV heads (GQA), untied lm_head (tied ones make a random
    model echo its last token), fp32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=False, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init gives near-uniform logits; sharpen so greedy is far from ties
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def smol():
    return AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()


PROMPTS = [[1, 504, 3426], [1] + list(range(300, 340)), [1, 42, 7, 99, 1000, 2000, 3000], list(range(500, 517))]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def full_forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token from one forward over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return (logits / temperature).log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_tiny_greedy_equals_hf_generate_with_slot_refill(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=2)  # 4 prompts through 2 slots
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    assert [c.prompt_index for c in out] == [0, 1, 2, 3]
    for prompt, c in zip(PROMPTS, out):
        assert c.token_ids == hf_greedy(tiny, prompt, 12)
        assert c.finish_reason == "length"


def test_shared_prompt_prefix_is_prefilled_once_and_keeps_greedy_and_logprobs_exact(tiny, monkeypatch):
    """Prompts admitted together that share >= SHARED_PREFIX_MIN leading tokens (a system prompt)
    prefill them once; greedy tokens still equal HF generate and logprobs a full forward."""
    from r1kit.rollout.engine import SHARED_PREFIX_MIN

    prefix = list(range(700, 700 + SHARED_PREFIX_MIN + 4))
    prompts = [prefix + [5, 6, 7], prefix + list(range(900, 912)), prefix + [42]]
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=8)
    real_prefill = engine.adapter.prefill
    calls = []

    def spy(tokens, lengths, cache, slots, start=0):
        calls.append((tuple(tokens.shape), start))
        return real_prefill(tokens, lengths, cache, slots, start)

    monkeypatch.setattr(engine.adapter, "prefill", spy)
    out = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    assert calls == [((1, len(prefix)), 0), ((3, 12), len(prefix))]  # prefix once, then the 3 suffixes
    for prompt, c in zip(prompts, out):
        assert c.token_ids == hf_greedy(tiny, prompt, 10)
        torch.testing.assert_close(torch.tensor(c.logprobs), full_forward_logprobs(tiny, prompt, c.token_ids, 1.0),
                                   atol=1e-4, rtol=1e-4)


def test_logprobs_equal_full_forward_recompute(tiny):
    params = SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, top_k=50, n=2, seed=3)
    out = Engine(tiny, [], dtype=torch.float32).generate(PROMPTS[:2], params)
    for c in out:
        ref = full_forward_logprobs(tiny, PROMPTS[c.prompt_index], c.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=3)
    params = SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=11)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.logprobs for c in first] == [c.logprobs for c in again]
    other = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=12))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_group_of_n_shares_the_prompt_and_slot_reuse_keeps_greedy_exact(tiny):
    """Greedy with stop ids gives completions of different lengths, so slots free at different
    steps and get refilled and compacted; the result must not depend on the slot count."""
    reference = Engine(tiny, [], dtype=torch.float32, max_batch=1).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0)
    )
    stops = sorted({c.token_ids[1 + 3 * i] for i, c in enumerate(reference)})  # lengths 2, 5, 8, 11
    params = SamplingParams(max_tokens=12, temperature=0, n=3, stop_token_ids=stops)
    narrow = Engine(tiny, [], dtype=torch.float32, max_batch=2).generate(PROMPTS, params)
    wide = Engine(tiny, [], dtype=torch.float32, max_batch=12).generate(PROMPTS, params)
    assert [c.token_ids for c in narrow] == [c.token_ids for c in wide]
    assert [c.prompt_index for c in wide] == [i for i in range(4) for _ in range(3)]
    for c in wide:
        ref = reference[c.prompt_index].token_ids
        end = next(k for k, t in enumerate(ref) if t in stops)
        assert c.token_ids == ref[: end + 1] and c.finish_reason == "stop"
    assert len({len(c.token_ids) for c in wide}) > 1


def test_max_tokens_and_stop_token_finish_reasons(tiny):
    engine = Engine(tiny, [], dtype=torch.float32)
    ref = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(ref.token_ids) == 3 and ref.finish_reason == "length" and ref.truncated
    stop = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[ref.token_ids[1]]))
    assert stop[0].token_ids == ref.token_ids[:2] and stop[0].finish_reason == "stop"


def test_stop_string_ends_at_the_token_that_completes_it(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, dtype=torch.float32)
    free = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    target = tokenizer.decode(free[4:6])
    out = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0, stop=[target]))[0]
    first = next(k for k in range(1, 11) if target in tokenizer.decode(free[:k]))
    assert out.token_ids == free[:first] and out.finish_reason == "stop"


def test_sequence_stops_at_the_context_end():
    model = tiny_llama(context=20)
    out = Engine(model, [], dtype=torch.float32).generate([list(range(100, 115))], SamplingParams(max_tokens=50, temperature=0))
    assert len(out[0].token_ids) == 5 and out[0].finish_reason == "length"  # positions 15..19


def test_update_weights_samples_from_the_new_weights():
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    engine = Engine(model, [], dtype=torch.float32)
    params = SamplingParams(max_tokens=6, temperature=0)
    before = engine.generate(PROMPTS, params)
    model.load_state_dict(other.state_dict())
    engine.update_weights(model)
    after = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in after] == [hf_greedy(other, p, 6) for p in PROMPTS]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_bf16_engine_tracks_the_fp32_model(tiny):
    engine = Engine(tiny, [], dtype=torch.bfloat16)
    head = engine.adapter.lm_head.weight  # bf16 values, held in bf16 or (no native bf16) fp32
    assert torch.equal(head.float(), tiny.lm_head.weight.detach().bfloat16().float())
    assert engine.compute_dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    out = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    for c in out:
        ref = full_forward_logprobs(tiny, PROMPTS[c.prompt_index], c.token_ids, 1.0)
        assert (torch.tensor(c.logprobs) - ref).abs().max() < 0.15


def test_draw_follows_the_weights():
    weights = torch.tensor([[1.0, 0.0, 3.0]]).expand(4000, 3)
    picks = draw(weights, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=3)
    assert counts[1] == 0 and abs(counts[2].item() / 4000 - 0.75) < 0.03


def test_two_level_draw_matches_the_weights_across_blocks_and_never_draws_a_zero():
    # 700 entries: 3 blocks of DRAW_BLOCK = 256, the last one padded; mass in every block, zeros between.
    weights = torch.zeros(700)
    weights[::7] = torch.arange(100, dtype=torch.float32) % 5 + 1.0
    picks = draw(weights.expand(40000, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=700).float() / 40000
    assert freq[weights == 0].sum() == 0
    assert (freq - weights / weights.sum()).abs().max() < 0.006  # ~4 standard errors of the largest p


def test_top_k_then_top_p_keep_the_hand_computed_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05 (+ a tail of -inf): top_p=0.7 keeps {0, 1} (mass above 1 is 0.5 < 0.7).
    logits = torch.full((4000, 8), -float("inf"))
    logits[:, :4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    tokens, logp = sample(logits, SamplingParams(top_p=0.7), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1} and abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.3])[tokens].log())  # pre-truncation logprob
    # top_k=3 renormalizes to 0.5/0.95, 0.3/0.95, 0.15/0.95; top_p=0.9 then keeps all three.
    tokens, _ = sample(logits, SamplingParams(top_k=3, top_p=0.9), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1, 2}
    tokens, _ = sample(logits, SamplingParams(top_k=1, temperature=2.0), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0}


def test_top_p_beyond_the_candidate_window_uses_the_full_sort():
    logits = torch.linspace(0, -2, 4096).expand(200, 4096)  # top 1024 tokens hold < 50% of the mass
    tokens, _ = sample(logits, SamplingParams(top_p=0.5), torch.Generator().manual_seed(0))
    probs = logits[0].softmax(-1)
    nucleus = int(((probs.cumsum(-1) - probs) < 0.5).sum())
    assert nucleus > 1024 and tokens.max() < nucleus and tokens.max() >= 1024


def test_greedy_logprob_is_the_unscaled_log_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tokens, logp = sample(logits, SamplingParams(temperature=0), None)
    assert tokens.tolist() == [0]
    torch.testing.assert_close(logp, logits.log_softmax(-1)[:, 0])


@pytest.mark.parametrize(
    ("params", "prompts", "message"),
    [
        (SamplingParams(max_tokens=0), PROMPTS, "max_tokens"),
        (SamplingParams(top_p=0.0), PROMPTS, "top_p"),
        (SamplingParams(top_p=1.5), PROMPTS, "top_p"),
        (SamplingParams(temperature=-1.0), PROMPTS, "temperature"),
        (SamplingParams(), [[1] * 256], "prompt 0 has 256 tokens"),
        (SamplingParams(), [[1, 2], []], "prompt 1 has 0 tokens"),
        (SamplingParams(), [[1, 49152]], "token id outside"),
        (SamplingParams(), [], "empty"),
        (SamplingParams(stop=["</answer>"]), PROMPTS, "need a tokenizer"),
    ],
)
def test_bad_input_is_refused_before_any_work(tiny, params, prompts, message):
    with pytest.raises(ConfigError, match=message):
        Engine(tiny, [], dtype=torch.float32).generate(prompts, params)


def test_cache_over_budget_is_refused_with_its_size(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=4, max_cache_bytes=10_000)
    # 2 (k, v) x 2 layers x 4 slots x 2 kv heads x (40 prompt + 60 new) positions x 16 dims x 4 bytes
    need = 2 * 2 * 4 * 2 * 100 * 16 * 4
    with pytest.raises(ConfigError, match=f"needs {need} bytes"):
        engine.generate([[1] * 40] * 4, SamplingParams(max_tokens=60))


def test_unknown_model_type_and_dtype_are_refused(tiny):
    with pytest.raises(ConfigError, match="float16"):
        Engine(tiny, [], dtype=torch.float16)
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    assert resolve_dtype("auto") == (torch.bfloat16 if native_bf16() or torch.cuda.is_available() else torch.float32)
    tiny.config.model_type = "gpt2"
    try:
        with pytest.raises(ConfigError, match="register_adapter"):
            Engine(tiny, [])
    finally:
        tiny.config.model_type = "llama"


@pytest.mark.slow
def test_embedded_model_greedy_equals_hf_generate_left_padded(smol, tokenizer):
    texts = ["What is 7 times 8?", "Name three colors.", "Write one sentence about the moon and the tides, please."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False)
        for t in texts
    ]
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        hf = smol.generate(**batch, max_new_tokens=16, do_sample=False)[:, batch["input_ids"].shape[1] :]
    out = Engine(smol, tokenizer, dtype=torch.float32, max_batch=2).generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    for row, c in zip(hf.tolist(), out):
        expected = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
        assert c.token_ids == expected
        assert c.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")


@pytest.mark.slow
def test_embedded_model_sampling_logprobs_equal_full_forward(smol, tokenizer):
    prompt = tokenizer("The capital of France is")["input_ids"]
    out = Engine(smol, [], dtype=torch.float32).generate([prompt], SamplingParams(max_tokens=12, temperature=0.8, n=2, seed=0))
    for c in out:
        ref = full_forward_logprobs(smol, prompt, c.token_ids, 0.8)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-4, rtol=1e-4)


def test_prepacked_matmul_rows_are_rounded_to_a_bounded_set_and_results_unchanged():
    from r1kit.rollout.engine import ROWS_EXACT, Linear, padded_rows

    assert [padded_rows(n) for n in (1, 7, ROWS_EXACT)] == [1, 7, ROWS_EXACT]  # decode batches exact
    shapes = {padded_rows(n) for n in range(ROWS_EXACT + 1, 4097)}
    assert len(shapes) <= 8 * 6  # 8 per octave from 64 to 4096
    assert all(n <= padded_rows(n) <= 1.125 * n for n in range(ROWS_EXACT + 1, 4097))
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 32, generator=g), torch.randn(70, 32, generator=g)
    out = Linear(weight, None)(x)
    assert out.shape == (70, 96)
    torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_on_finished_reports_each_prompt_once_as_it_finishes_and_changes_nothing(tiny, tokenizer, backend):
    """Evaluation writes a problem's record as soon as its samples are done; the callback must see
    each prompt once, with the completions ``generate`` returns, before the call ends, and in more
    than one report when the slots (3) cannot hold every sequence (8) at once."""
    from r1kit.rollout.hf import HFGenerateEngine

    engine = (Engine(tiny, [], dtype=torch.float32, max_batch=3) if backend == "engine"
              else HFGenerateEngine(tiny, tokenizer, max_batch_size=3))
    params = SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=5)
    reports = []
    out = engine.generate(PROMPTS, params, on_finished=lambda done: reports.append(done))
    plain = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert len(reports) > 1 and sorted(i for r in reports for i in r) == [0, 1, 2, 3]
    for r in reports:
        for i, comps in r.items():
            assert [c.token_ids for c in comps] == [c.token_ids for c in out[2 * i:2 * i + 2]]
