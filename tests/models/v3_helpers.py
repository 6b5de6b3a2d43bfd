"""Shared builders for the DeepSeek-V3 tests: tiny configs and a transformers twin with identical weights."""

from __future__ import annotations

import pytest
import torch

from r1kit.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread: on a shared 2-core machine two OpenMP threads make these
    small matmuls 3-5x slower (spin-waiting); restores the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> DeepseekV3Config:
    """2 main layers (1 dense, 1 MoE), 8 experts in 4 groups (2 allowed), top-3, a shared expert,
    q_lora, YaRN, one MTP layer; hidden 64."""
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rope_scaling=dict(YARN),
        max_position_embeddings=256, num_nextn_predict_layers=1, initializer_range=0.1,
    )
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def tiny_model(seed: int = 0, randomize_bias: bool = True, **overrides) -> DeepseekV3ForCausalLM:
    """A seeded fp32 tiny model in eval mode; norms and router biases randomised so they matter."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.uniform_(0.5, 1.5)
        if randomize_bias:
            for moe in model.moe_layers():
                if moe.gate.e_score_correction_bias is not None:
                    moe.gate.e_score_correction_bias.normal_(std=0.2)
    return model


def transformers_twin(model: DeepseekV3ForCausalLM, v2: bool = False):
    """transformers' DeepseekV3ForCausalLM (or DeepseekV2ForCausalLM when ``v2``) with the same weights,
    experts fused as transformers stores them in memory."""
    import transformers

    name = "DeepseekV2" if v2 else "DeepseekV3"
    hf_config = getattr(transformers, f"{name}Config")(**model.config.to_hf_dict())
    hf = getattr(transformers, f"{name}ForCausalLM")(hf_config).eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(mtp_prefix(model))}
    fused = {}
    for layer_idx, layer in enumerate(model.main_layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        prefix = f"model.layers.{layer_idx}.mlp.experts"
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
        fused[f"{prefix}.down_proj"] = torch.stack([e.down_proj.weight for e in experts])
        for key in [k for k in ours if k.startswith(prefix + ".")]:
            del ours[key]
    missing, unexpected = hf.load_state_dict({**ours, **fused}, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return hf


def mtp_prefix(model: DeepseekV3ForCausalLM) -> str:
    """State-dict prefix of the first MTP layer."""
    return f"model.layers.{model.config.num_hidden_layers}."
