"""FP8 block quantization: round-trip bounds, scale layout, simulated linear, FP8 checkpoints."""

import pytest
import torch
from safetensors.torch import load_file
from v3_helpers import one_thread, tiny_model  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.models.fp8 import (
    FP8,
    FP8_MAX,
    FP8_REL_ERR,
    FP8_SUBNORMAL_ERR,
    Fp8Linear,
    act_dequant,
    act_quant,
    linear_error_vs_bf16,
    to_fp8_linears,
    weight_dequant,
    weight_quant,
)
from r1kit.models.v3_io import load_deepseek_v3, save_deepseek_v3


def block_scales(scale_inv, shape, block=128):
    return scale_inv.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def test_weight_round_trip_within_the_e4m3_bound():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 0, 200)  # columns over three decades: subnormals too
    q, scale_inv = weight_quant(w)
    assert q.dtype == FP8 and q.shape == (300, 200) and scale_inv.shape == (3, 2)
    assert scale_inv[2, 1] == w[256:, 128:].abs().max() / FP8_MAX  # the padded block ignores its zeros
    err = (weight_dequant(q, scale_inv) - w).abs()
    bound = FP8_REL_ERR * w.abs() + FP8_SUBNORMAL_ERR * block_scales(scale_inv, w.shape)
    assert (err <= bound * (1 + 1e-6)).all()
    rel = err / w.abs()
    assert rel[w.abs() > 0.1].max() > FP8_REL_ERR / 2  # the bound is nearly reached: rounding happens


def test_weight_dequant_hand_values():
    q = torch.tensor([[1.0, 2.0], [-0.5, 448.0]]).to(FP8)
    scale_inv = torch.tensor([[0.25]])
    torch.testing.assert_close(weight_dequant(q, scale_inv), torch.tensor([[0.25, 0.5], [-0.125, 112.0]]))
    with pytest.raises(ValueError, match="does not tile"):
        weight_dequant(q, torch.ones(2, 2))


def test_activation_tiles_and_scales():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 256)
    x[0, 0, :128] = 0  # an all-zero tile takes the 1e-4 floor
    q, scale = act_quant(x)
    assert q.dtype == FP8 and scale.shape == (3, 5, 2)
    assert scale[0, 0, 0] == pytest.approx(1e-4 / FP8_MAX)
    assert scale[1, 2, 1] == pytest.approx(x[1, 2, 128:].abs().max().item() / FP8_MAX)
    err = (act_dequant(q, scale) - x).abs()
    assert (err <= FP8_REL_ERR * x.abs() + FP8_SUBNORMAL_ERR * scale.repeat_interleave(128, -1) + 1e-12).all()
    _, pow2 = act_quant(x, ue8m0=True)
    assert torch.equal(torch.log2(pow2), torch.log2(pow2).round()) and (pow2 >= scale).all()
    with pytest.raises(ValueError, match="multiple"):
        act_quant(torch.ones(2, 100))


def test_fp8_linear_forward_rounds_and_gradient_passes_straight_through():
    torch.manual_seed(2)
    layer = Fp8Linear(256, 64, bias=False)
    x = torch.randn(8, 256, requires_grad=True)
    y = layer(x)
    expected = act_dequant(*act_quant(x.detach())) @ weight_dequant(*weight_quant(layer.weight.detach())).T
    torch.testing.assert_close(y.detach(), expected)
    assert (y.detach() - x.detach() @ layer.weight.detach().T).abs().max() > 1e-3
    y.sum().backward()
    # straight-through: d/dx uses the rounded weight, d/dW the rounded input, the rounding itself is identity
    w_q = weight_dequant(*weight_quant(layer.weight.detach()))
    x_q = act_dequant(*act_quant(x.detach()))
    torch.testing.assert_close(x.grad, w_q.sum(0).expand(8, -1))
    torch.testing.assert_close(layer.weight.grad, x_q.sum(0).expand(64, -1))


def test_fp8_error_is_reported_against_bf16():
    torch.manual_seed(3)
    errors = linear_error_vs_bf16(torch.randn(256, 512) * 0.02, torch.randn(64, 512))
    assert 0.01 < errors["fp8"] < 0.06  # per-element e4m3 error ≈ 2^-5 averages to a few percent
    assert errors["bf16"] < errors["fp8"] / 4


def test_model_with_fp8_linears_stays_close():
    model = tiny_model(hidden_size=128, q_lora_rank=128, first_k_dense_replace=2)  # dense: no routing flips
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits
        to_fp8_linears(model)
        simulated = model(tokens).logits
    swapped = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(swapped) > 10 and not isinstance(model.lm_head, Fp8Linear)
    rel = (simulated - reference).norm() / reference.norm()
    assert 1e-2 < rel < 0.25  # about 3% per GEMM, compounded over 2 layers of 8 chained GEMMs


def test_synthetic_fp8_checkpoint_loads_equal_to_its_bf16_source_within_the_bound(tmp_path):
    model = tiny_model(hidden_size=128, q_lora_rank=128, intermediate_size=160).cast(torch.bfloat16)
    save_deepseek_v3(model, tmp_path, fp8=True)
    stored = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(f).items()}
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert stored[name].dtype == FP8 and stored[name + "_scale_inv"].shape == (1, 1)
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # router stays unquantized
    model_loaded = load_deepseek_v3(tmp_path, dtype=torch.bfloat16)
    assert model_loaded.config.quantization_config is None  # dense now: saving it again writes no FP8 config
    loaded = model_loaded.state_dict()
    checked = 0
    for key, source in model.state_dict().items():
        if key + "_scale_inv" not in stored:
            assert torch.equal(loaded[key], source), key
            continue
        source = source.float()
        scales = block_scales(stored[key + "_scale_inv"], source.shape)
        bound = (FP8_REL_ERR + 2.0**-8) * source.abs() + FP8_SUBNORMAL_ERR * scales  # + bf16 rounding on load
        assert ((loaded[key].float() - source).abs() <= bound * (1 + 1e-3)).all(), key
        checked += 1
    assert checked > 20
