"""DeepSeek-V3 model: config validation, presets, parity with transformers, MLA paths, cache, routing."""

import math

import pytest
import torch
from v3_helpers import one_thread, tiny_config, tiny_model, transformers_twin, YARN  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.errors import ConfigError
from r1kit.models.deepseek_v3 import (
    DeepseekV3Config,
    Gate,
    KVCache,
    count_parameters,
    rope_frequencies,
    softmax_scale,
)


def ids(b=2, s=11, vocab=97, seed=1):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (dict(n_routed_experts=10, n_group=4), ["n_routed_experts=10", "n_group=4"]),
        (dict(topk_group=5, n_group=4), ["topk_group=5", "n_group=4"]),
        (dict(num_experts_per_tok=5, topk_group=2), ["num_experts_per_tok=5", "topk_group=2"]),
        (dict(qk_head_dim=30), ["qk_head_dim=30", "qk_nope_head_dim", "qk_rope_head_dim"]),
        (dict(head_dim=16), ["head_dim=16", "qk_rope_head_dim=8"]),
        (dict(qk_rope_head_dim=7), ["qk_rope_head_dim=7"]),
        (dict(num_key_value_heads=1), ["num_key_value_heads=1", "num_attention_heads=4"]),
        (dict(scoring_func="relu"), ["scoring_func"]),
        (dict(rope_scaling={"type": "linear", "factor": 2}), ["rope_scaling"]),
    ],
)
def test_inconsistent_config_fails_naming_fields(overrides, fields):
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    for name in fields:
        assert name in str(err.value)


@pytest.mark.parametrize("field, value", [("rope_interleave", False), ("attention_bias", True), ("hidden_act", "gelu")])
def test_unsupported_config_json_values_are_refused(field, value):
    raw = tiny_config().to_hf_dict()
    assert DeepseekV3Config.from_dict(raw).hidden_size == 64  # the supported values load
    with pytest.raises(ConfigError, match=field):
        DeepseekV3Config.from_dict({**raw, field: value})


def test_presets_match_the_papers_sizes():
    v3 = count_parameters(DeepseekV3Config.preset("671b"))
    assert round(v3["total"] / 1e9) == 671  # V3 report §4.2: 671B total
    assert 37.0e9 < v3["active"] < 38.0e9  # 37B activated per token
    lite = count_parameters(DeepseekV3Config.preset("16b"))
    assert round(lite["total"] / 1e9, 1) == 15.7  # V2 report: V2-Lite 15.7B total
    for name, target in [("tiny-10m", 10e6), ("tiny-50m", 50e6)]:
        cfg = DeepseekV3Config.preset(name)
        assert abs(count_parameters(cfg)["total"] - target) / target < 0.1
        assert cfg.n_group > 1 and cfg.n_shared_experts == 1 and cfg.num_nextn_predict_layers == 1
    with pytest.raises(ConfigError, match="671b"):
        DeepseekV3Config.preset("7b")


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None, tie_word_embeddings=True)])
def test_parameter_count_matches_the_built_model(overrides):
    model = tiny_model(**overrides)
    counts = count_parameters(model.config)
    mtp = sum(p.numel() for p in model.mtp_layers.parameters())
    assert counts["mtp"] == mtp
    assert counts["total"] == sum(p.numel() for p in model.parameters()) - mtp


OFFICIAL_671B = {  # deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 8,
    "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid", "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8",
}


def test_official_model_args_map_to_the_671b_preset():
    official = DeepseekV3Config.from_model_args(OFFICIAL_671B)
    preset = DeepseekV3Config.preset("671b")
    training_only = {"num_nextn_predict_layers", "initializer_range", "aux_loss_alpha", "bias_update_speed",
                     "mtp_loss_weight", "max_position_embeddings"}
    for name, value in vars(preset).items():
        if name not in training_only:
            assert getattr(official, name) == value, name
    lite = DeepseekV3Config.from_model_args({})  # ModelArgs defaults: the 16B shape
    assert lite.q_lora_rank is None and lite.topk_method == "greedy" and not lite.norm_topk_prob


def test_v3_rope_and_softmax_scale_match_the_spec():
    cfg = DeepseekV3Config.preset("671b")
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(cfg) == pytest.approx(0.13523, abs=1e-5)  # spec §1
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    yarn = rope_frequencies(cfg)
    # spec §2: low=10, high=23 — indices <= 10 keep their frequency, indices >= 23 are divided by 40
    torch.testing.assert_close(yarn[:11], base[:11])
    torch.testing.assert_close(yarn[23:], base[23:] / 40)
    ramp = (16 - 10) / 13
    assert yarn[16].item() == pytest.approx((base[16] / 40 * ramp + base[16] * (1 - ramp)).item(), rel=1e-6)


def test_transformers_saved_config_reads_back():
    from transformers import DeepseekV3Config as HFConfig

    cfg = tiny_config()
    hf = HFConfig(**cfg.to_hf_dict()).to_dict()  # rope_scaling becomes rope_parameters
    again = DeepseekV3Config.from_dict(hf)
    assert again.rope_scaling["factor"] == YARN["factor"] and again.rope_theta == cfg.rope_theta
    assert again.q_lora_rank == 48 and again.n_group == 4 and again.num_nextn_predict_layers == 1


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(q_lora_rank=None), dict(rope_scaling=None), dict(n_shared_experts=2, num_hidden_layers=3),
     dict(n_group=1, topk_group=1, num_experts_per_tok=5, routed_scaling_factor=1.0)],
    ids=["q_lora+yarn", "no_q_lora", "no_yarn", "2shared_3layers", "one_group_top5"],
)
def test_logits_match_transformers(overrides):
    model = tiny_model(**overrides)
    hf = transformers_twin(model)
    tokens = ids()
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(tokens).logits
    assert ours.abs().max() > 1.0  # the weights are not trivially small
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [dict(topk_method="group_limited_greedy", routed_scaling_factor=16.0),
     dict(topk_method="greedy", n_group=1, topk_group=1, n_shared_experts=2)],
    ids=["v2_236b_style", "v2_lite_style"],
)
def test_v2_style_softmax_routing_matches_transformers_deepseek_v2(overrides):
    model = tiny_model(scoring_func="softmax", norm_topk_prob=False, q_lora_rank=None, **overrides)
    hf = transformers_twin(model, v2=True)
    tokens = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=0)


def test_yarn_applies_even_within_the_original_context():
    """Spec §8.2: official model.py enables YaRN and mscale² only when max_seq_len > original_seq_len,
    transformers whenever rope_scaling is set. The released checkpoints were trained long-context, so
    the spec (and r1kit) always apply them; here max_position_embeddings == original and it still matters."""
    scaling = dict(YARN, original_max_position_embeddings=64)
    model = tiny_model(rope_scaling=scaling, max_position_embeddings=64)
    plain = tiny_model(rope_scaling=None, max_position_embeddings=64)
    hf = transformers_twin(model)
    tokens = ids(s=40)
    with torch.no_grad():
        ours = model(tokens).logits
        torch.testing.assert_close(ours, hf(tokens).logits, atol=1e-5, rtol=0)
        assert (ours - plain(tokens).logits).abs().max() > 1e-2


def group_of(indices, n_experts=8, n_group=4):
    return indices // (n_experts // n_group)


def test_group_mask_is_minus_inf_when_biased_scores_are_negative():
    """Spec §8.1: official masks dropped groups with -inf (fix 1398800); older transformers used 0.0,
    which lets a dropped group win when every biased score is negative. r1kit follows -inf."""
    cfg = tiny_config()
    gate = Gate(cfg)
    torch.manual_seed(3)
    gate.weight.data.normal_(std=1.0)
    gate.e_score_correction_bias.fill_(-2.0)  # sigmoid in (0, 1): every biased score is negative
    x = torch.randn(64, cfg.hidden_size)
    routing = gate(x)
    scores = routing.scores - 2.0
    grouped = scores.view(64, 4, 2)
    kept = grouped.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # (T, topk_group)
    in_kept = (group_of(routing.indices)[:, :, None] == kept[:, None, :]).any(-1)
    assert in_kept.all()
    zero_filled = grouped.masked_fill(
        ~torch.zeros(64, 4, dtype=torch.bool).scatter(1, kept, True)[..., None], 0.0).flatten(1)
    zero_choice = zero_filled.topk(3, dim=-1).indices
    assert not (group_of(zero_choice)[:, :, None] == kept[:, None, :]).any(-1).all()  # the case matters


def test_router_weights_come_from_unbiased_scores():
    cfg = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True)
    gate = Gate(cfg)
    gate.weight.data.zero_()
    gate.weight.data[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    routing = gate(x)
    assert sorted(routing.indices[0].tolist()) == [0, 7]  # the bias pulls expert 7 in
    s0, s7 = torch.sigmoid(torch.tensor(3.0)), torch.sigmoid(torch.tensor(-4.0))
    expected = torch.tensor([s0, s7]) / (s0 + s7) * 2.5  # Eq. 16: weights without the bias
    got = routing.weights[0][routing.indices[0].argsort()]
    torch.testing.assert_close(got, expected)


def test_softmax_scoring_v2_style_routing():
    cfg = tiny_config(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                      routed_scaling_factor=1.0, n_group=1, topk_group=1)
    gate = Gate(cfg)
    assert gate.e_score_correction_bias is None
    torch.manual_seed(0)
    gate.weight.data.normal_()
    x = torch.randn(5, cfg.hidden_size)
    routing = gate(x)
    probs = (x @ gate.weight.T).softmax(-1)
    top = probs.topk(3, dim=-1)
    torch.testing.assert_close(routing.weights, top.values)
    assert torch.equal(routing.indices, top.indices)


# ---------------------------------------------------------------------------------------------- MLA paths


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_absorbed_equals_naive(q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank)
    tokens = ids(s=13)
    with torch.no_grad():
        naive = model(tokens, absorb=False).logits
        absorbed = model(tokens, absorb=True).logits
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("absorbed", [True, False])
def test_incremental_decoding_equals_full_forward(absorbed):
    model = tiny_model()
    tokens = ids(s=12)
    cache = KVCache(absorbed=absorbed)
    with torch.no_grad():
        full = model(tokens).logits
        steps = [model(tokens[:, :5], cache=cache).logits, model(tokens[:, 5:8], cache=cache).logits]
        steps += [model(tokens[:, j : j + 1], cache=cache).logits for j in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.seq_len == 12


def test_absorbed_cache_holds_only_latent_and_rope_key():
    cfg = tiny_config()
    model = tiny_model()
    cache, naive = KVCache(absorbed=True), KVCache(absorbed=False)
    with torch.no_grad():
        model(ids(b=1, s=10), cache=cache)
        model(ids(b=1, s=10), cache=naive)
    per_token_layer = cache.nbytes() / (10 * cfg.num_hidden_layers * 4)
    assert per_token_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 32 + 8 values
    naive_values = naive.nbytes() / (10 * cfg.num_hidden_layers * 4)
    assert naive_values == cfg.num_attention_heads * (cfg.qk_dim + cfg.v_head_dim)


def test_padding_mask_leaves_real_tokens_unchanged():
    model = tiny_model()
    tokens = ids(b=1, s=9)
    padded = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :9], model(tokens).logits,
                                   atol=1e-5, rtol=0)


def test_bf16_model_keeps_the_router_bias_fp32_and_tracks_fp32():
    model = tiny_model()
    tokens = ids()
    with torch.no_grad():
        reference = model(tokens).logits
        model.cast(torch.bfloat16)
        naive = model(tokens).logits.float()
        cache = KVCache()
        absorbed = torch.cat([model(tokens[:, :6], cache=cache).logits, model(tokens[:, 6:], cache=cache).logits], 1)
    assert model.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert model.inv_freq.dtype == torch.float32 and model.moe_layers()[0].tokens_per_expert.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16 and absorbed.dtype == torch.bfloat16
    assert (naive - reference).norm() / reference.norm() < 0.05
    assert (absorbed.float() - reference).norm() / reference.norm() < 0.05
