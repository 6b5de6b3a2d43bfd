"""Engine adapters for Qwen2/Qwen2.5, Qwen3 and Mistral: greedy token for token equal to HF ``generate``
(fp32) and sampling logprobs equal to a full forward, on tiny random configs; sliding-window models
capped at their window; chunked prefill inside the decode step exact; ``make_engine("auto")`` picks
r1kit's engine for each."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from r1kit.errors import ConfigError
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine, LlamaAdapter
from r1kit.runtime import make_engine
from tests.rollout.test_engine import PROMPTS, full_forward_logprobs, hf_greedy

COMMON = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2)


def randomized(model):
    """Sharpen the head (greedy far from ties) and randomize norms and biases so they matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.5)
    return model.eval()


def qwen2(**kw):
    torch.manual_seed(0)
    return randomized(Qwen2ForCausalLM(Qwen2Config(**{**COMMON, "rope_parameters": {"rope_type": "default",
                                                                                    "rope_theta": 1e6}, **kw})))


def qwen3(**kw):  # head_dim 32 != hidden / heads (16), as in Qwen3 checkpoints where they differ
    torch.manual_seed(0)
    return randomized(Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 32, **kw})))


def mistral(**kw):
    torch.manual_seed(0)
    return randomized(MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": None, **kw})))


FAMILIES = {"qwen2": qwen2, "qwen3": qwen3, "mistral": mistral}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]()


def test_greedy_equals_hf_generate_with_slot_refill(family):
    assert family.config.model_type in ("qwen2", "qwen3", "mistral")
    out = Engine(family, [], dtype=torch.float32, max_batch=2).generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    for prompt, c in zip(PROMPTS, out):
        assert c.token_ids == hf_greedy(family, prompt, 12)


def test_sampling_logprobs_equal_a_full_forward(family):
    params = SamplingParams(max_tokens=8, temperature=0.8, n=2, seed=0)
    for c in Engine(family, [], dtype=torch.float32).generate(PROMPTS[:2], params):
        ref = full_forward_logprobs(family, PROMPTS[c.prompt_index], c.token_ids, 0.8)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_inside_the_decode_step_equals_hf_generate(family):
    """Request API with a token budget: a 40-token prompt goes in as chunks riding in the decode steps
    of a running request (one model call per step); both stay token for token equal to HF generate."""
    engine = Engine(family, [], dtype=torch.float32, max_batch=2, max_model_len=96, max_num_batched_tokens=12)
    engine.add_request("short", PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))
    got = {"short": [d.token_ids[0] for d in engine.step()]}
    engine.add_request("long", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0))
    while engine.has_unfinished():
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    assert got["short"] == hf_greedy(family, PROMPTS[0], 10)
    assert got["long"] == hf_greedy(family, PROMPTS[1], 6)


def test_the_family_changes_the_output():
    """The family's own parts matter on these configs: without Qwen2's biases HF generate gives other
    tokens, and the plain Llama forward on Qwen3 (no q/k norms) gives other tokens than HF."""
    biased = qwen2()
    unbiased = qwen2()
    with torch.no_grad():
        for name, p in unbiased.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    assert hf_greedy(biased, PROMPTS[1], 8) != hf_greedy(unbiased, PROMPTS[1], 8)
    model = qwen3()
    engine = Engine(model, [], dtype=torch.float32)
    engine.adapter = LlamaAdapter(model, torch.float32)  # the Llama forward, without q/k norms
    params = SamplingParams(max_tokens=8, temperature=0)
    assert engine.generate(PROMPTS[1:2], params)[0].token_ids != hf_greedy(model, PROMPTS[1], 8)


@pytest.mark.parametrize("build", [lambda: mistral(sliding_window=24),
                                   lambda: qwen2(use_sliding_window=True, sliding_window=24, max_window_layers=1)])
def test_sliding_window_models_are_served_exactly_up_to_the_window(build):
    model = build()
    engine = Engine(model, [], dtype=torch.float32)
    assert engine.adapter.max_context == 24
    prompt = list(range(100, 110))
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert len(out.token_ids) == 14 and out.finish_reason == "length"  # positions 10..23
    assert out.token_ids == hf_greedy(model, prompt, 14)
    with pytest.raises(ConfigError, match="the model.s context is 24"):
        engine.generate([list(range(100, 130))], SamplingParams(max_tokens=4))


def test_auto_backend_picks_the_engine(family):
    assert isinstance(make_engine(family, [], "auto", torch.float32), Engine)


def test_bf16_engine_tracks_the_fp32_model(family):
    """bf16 weights (computed in bf16 where the CPU has native bf16 matmuls): sampled-token logprobs
    stay within 0.15 nats of the fp32 model's, as for Llama (test_engine.py)."""
    out = Engine(family, [], dtype=torch.bfloat16).generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    for c in out:
        ref = full_forward_logprobs(family, PROMPTS[c.prompt_index], c.token_ids, 1.0)
        assert (torch.tensor(c.logprobs) - ref).abs().max() < 0.15
