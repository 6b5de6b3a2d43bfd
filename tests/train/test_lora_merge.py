"""The rollout engine's view of a LoRA policy (``merged_weights_view``, used by GRPO's engine refresh every
step) equals ``merged_for_save`` (PEFT's ``merge_and_unload`` on a deep copy) bit for bit, without copying
the model: same parameter names, order and values, the un-adapted tensors shared with the policy, the
policy left unmerged; the engine samples the same tokens from either; other adapters fall back."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine
from r1kit.train.loop import merged_for_save, merged_weights_view


def _lora_policy(model_dir, **lora):
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                            LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}))
    with torch.no_grad():                                      # B = 0 at init would make the delta vanish
        for name, p in policy.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_magnitude" in name:
                p.normal_(0, 0.1)
    return policy


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_view_is_the_merged_model_bit_for_bit_and_copies_nothing_else(tiny_model_dir):
    policy = _lora_policy(tiny_model_dir)
    before = _state(policy)
    merged, view = merged_for_save(policy), merged_weights_view(policy)
    m, v = merged.state_dict(), view.state_dict()
    assert list(v) == list(m) and all(torch.equal(v[k], m[k]) for k in m)
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in merged.named_parameters()]
    q = "model.layers.0.self_attn.q_proj"
    base_q = policy.get_base_model().get_submodule(q).base_layer.weight
    assert not torch.equal(v[f"{q}.weight"], base_q)           # the adapter's delta is in it
    shared = policy.get_base_model().model.embed_tokens.weight
    assert view.model.embed_tokens.weight is shared and view.model.norm.weight is policy.get_base_model().model.norm.weight
    after = _state(policy)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(getattr(mod, "merged", False) for mod in policy.modules())
    ids = torch.tensor([[1, 57, 300, 9, 4000, 12]])
    with torch.no_grad():
        assert torch.equal(view(ids).logits, merged(ids).logits)


def test_the_engine_refreshed_from_the_view_samples_what_the_merged_copy_gives(tiny_model_dir):
    policy = _lora_policy(tiny_model_dir)
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=7)
    prompts = [[1, 57, 300, 9], [1, 4000, 12]]
    engine = Engine(merged_for_save(policy), [], dtype=torch.float32)
    want = engine.generate(prompts, params)
    engine.update_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # other weights in between
    assert [c.token_ids for c in engine.generate(prompts, params)] != [c.token_ids for c in want]
    engine.update_weights(merged_weights_view(policy))
    got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.logprobs for c in got] == [c.logprobs for c in want]


@pytest.mark.parametrize("lora", [dict(use_dora=True), dict(target_modules=["q_proj", "embed_tokens"])])
def test_other_adapters_get_the_deep_merged_copy(tiny_model_dir, lora):
    policy = _lora_policy(tiny_model_dir, **lora)
    view = merged_weights_view(policy)
    assert not any(hasattr(mod, "lora_A") for mod in view.modules())   # merged and unloaded, PEFT's way
    m, v = merged_for_save(policy).state_dict(), view.state_dict()
    assert list(v) == list(m) and all(torch.equal(v[k], m[k]) for k in m)


def test_a_plain_policy_is_passed_through(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert merged_weights_view(model) is model
