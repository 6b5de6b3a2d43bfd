"""The vLLM backend: the parts that need no GPU (missing-package error, parameter and output
mapping) always run; generation and weight pushing run only where vllm and a CUDA GPU exist."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from r1kit.errors import R1kitError
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.vllm_backend import INSTALL_HINT, VLLMEngine, completions_from_outputs, vllm_sampling_kwargs

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAVE_VLLM, reason="vllm is installed, so the missing-package error cannot occur")
def test_missing_vllm_is_a_clear_error_naming_the_extra():
    with pytest.raises(R1kitError, match=r"pip install 'r1kit\[vllm\]'"):
        VLLMEngine("unused-path")
    assert "r1kit[vllm]" in INSTALL_HINT


def test_sampling_params_map_onto_vllm_fields():
    params = SamplingParams(max_tokens=7, temperature=0.6, top_p=0.95, top_k=0, n=4, seed=9, stop_token_ids=[2], stop=["</a>"])
    assert vllm_sampling_kwargs(params) == {
        "n": 4, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_tokens": 7, "seed": 9,
        "stop": ["</a>"], "stop_token_ids": [2], "logprobs": 0,
    }
    assert vllm_sampling_kwargs(SamplingParams(top_k=20))["top_k"] == 20


def test_outputs_flatten_prompt_major_with_sampled_token_logprobs():
    def out(ids, lps, reason):
        steps = [{t: SimpleNamespace(logprob=lp), 999: SimpleNamespace(logprob=-9.0)} for t, lp in zip(ids, lps)]
        return SimpleNamespace(token_ids=ids, logprobs=steps, finish_reason=reason)

    outputs = [
        SimpleNamespace(outputs=[out([5, 2], [-0.1, -0.2], "stop"), out([7, 8, 9], [-1.0, -2.0, -3.0], "length")]),
        SimpleNamespace(outputs=[out([4], [-0.5], "abort"), out([3, 2], [-0.3, -0.4], "stop")]),
    ]
    got = completions_from_outputs(outputs)
    assert [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in got] == [
        (0, [5, 2], [-0.1, -0.2], "stop"),
        (0, [7, 8, 9], [-1.0, -2.0, -3.0], "length"),
        (1, [4], [-0.5], "stop"),
        (1, [3, 2], [-0.3, -0.4], "stop"),
    ]


def test_make_engine_builds_vllm_with_the_rollout_dtype_and_pushes_the_weights(monkeypatch):
    """The trainer's wiring (runtime.make_engine) against a stand-in ``vllm`` module: no GPU needed."""
    import sys

    from r1kit.runtime import make_engine

    built, pushed = {}, []

    class FakeLLM:
        def __init__(self, **kwargs):
            built.update(kwargs)

        def apply_model(self, fn):
            fn(SimpleNamespace(load_weights=lambda weights: pushed.append(dict(weights))))

        def reset_prefix_cache(self):
            pushed.append("reset")

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=FakeLLM))
    model = torch.nn.Linear(2, 2)
    model.name_or_path = "/models/policy"
    make_engine(model, tokenizer=None, backend="vllm", dtype=torch.bfloat16)
    assert built["model"] == "/models/policy" and built["dtype"] == "bfloat16"
    assert 0 < built["gpu_memory_utilization"] < 1 and built["logprobs_mode"] == "processed_logprobs"
    assert torch.equal(pushed[0]["weight"], model.weight) and pushed[1] == "reset"


@pytest.mark.skipif(not (HAVE_VLLM and torch.cuda.is_available()), reason="needs vllm and a CUDA GPU")
def test_vllm_greedy_matches_hf_and_follows_pushed_weights():
    from transformers import AutoModelForCausalLM

    from r1kit.models.embedded import embedded_model_dir

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
    engine = VLLMEngine(model, gpu_memory_utilization=0.2, max_model_len=512, dtype="float32")
    prompt = [1, 504, 3426, 314, 253]
    params = SamplingParams(max_tokens=8, temperature=0)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    got = engine.generate([prompt], params)[0]
    assert got.token_ids == hf[0, len(prompt) :].tolist()[: len(got.token_ids)]
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # tied: flips the embedding too, so greedy output must change
    engine.update_weights(model)
    assert engine.generate([prompt], params)[0].token_ids != got.token_ids
