"""DeepSeek-V3 checkpoints: HF sharded safetensors both ways with transformers, official names, bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from v3_helpers import one_thread, tiny_model  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.errors import R1kitError
from r1kit.models.v3_io import (
    INDEX,
    hf_to_official,
    is_deepseek_v3,
    load_deepseek_v3,
    official_to_hf,
    save_deepseek_v3,
)

TOKENS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_deepseek_v3(model, tmp_path_factory.mktemp("ours"), max_shard_bytes=60_000)


def test_saved_checkpoint_is_sharded_with_a_complete_index(model, saved):
    index = json.loads((saved / INDEX).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((saved / f).is_file() for f in files)
    stored = {name for f in files for name in load_file(saved / f)}
    assert stored == set(index["weight_map"])
    assert set(model.state_dict()) <= stored
    assert "model.layers.2.embed_tokens.weight" in stored  # MTP layer carries the shared copies
    assert is_deepseek_v3(saved) and not is_deepseek_v3({"model_type": "llama"})


def test_transformers_loads_ours_with_the_same_logits(model, saved):
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=0)


def test_we_load_transformers_checkpoints_with_the_same_logits(model, saved, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(saved).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    ours = load_deepseek_v3(tmp_path)
    assert ours.config.num_nextn_predict_layers == 0  # transformers drops the MTP layer
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, hf(TOKENS).logits, atol=1e-5, rtol=0)


def test_round_trip_keeps_mtp_and_router_bias(model, saved):
    again = load_deepseek_v3(saved)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(again(TOKENS, run_mtp=True).mtp_logits[0], model(TOKENS, run_mtp=True).mtp_logits[0])
    bf16 = load_deepseek_v3(saved, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32  # spec §3.2


def test_official_key_names_follow_convert_py(model):
    expected = {  # inference/convert.py `mapping` applied by hand
        "model.embed_tokens.weight": "embed.weight",
        "lm_head.weight": "head.weight",
        "model.norm.weight": "norm.weight",
        "model.layers.0.input_layernorm.weight": "layers.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "layers.0.ffn_norm.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight": "layers.0.attn.q_norm.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": "layers.0.attn.wkv_a.weight",
        "model.layers.0.mlp.down_proj.weight": "layers.0.ffn.w2.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias": "layers.1.ffn.gate.bias",
        "model.layers.1.mlp.experts.5.up_proj.weight": "layers.1.ffn.experts.5.w3.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight": "layers.1.ffn.shared_experts.w1.weight",
        "model.layers.1.self_attn.o_proj.weight_scale_inv": "layers.1.attn.wo.scale",
    }
    for hf, official in expected.items():
        assert hf_to_official(hf) == official
        assert official_to_hf(official) == hf
    for name in model.state_dict():
        assert official_to_hf(hf_to_official(name)) == name


def test_loads_official_names(model, saved, tmp_path):
    state = {hf_to_official(n): t.contiguous() for n, t in model.state_dict().items()}
    save_file(state, tmp_path / "model0-mp1.safetensors")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    ours = load_deepseek_v3(tmp_path)
    with torch.no_grad():
        assert torch.equal(ours(TOKENS).logits, model(TOKENS).logits)


def test_missing_and_misshaped_tensors_are_listed(model, saved, tmp_path):
    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    state["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(5, 5)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(R1kitError) as err:
        load_deepseek_v3(tmp_path)
    message = str(err.value)
    assert "missing (1): model.layers.1.mlp.experts.3.up_proj.weight" in message
    assert "model.layers.0.self_attn.kv_b_proj.weight: checkpoint (5, 5) vs model (112, 32)" in message
    assert "unexpected (1): model.layers.0.self_attn.rotary_emb.inv_freq" in message
