"""FP8 (e4m3) block quantization as DeepSeek-V3 uses it, in plain PyTorch for CPU study.

Weights: float8_e4m3fn with an fp32 ``weight_scale_inv`` per 128×128 block, W ≈ W_fp8·scale_inv
(a multiplier despite its name). Activations: dynamic, one scale per 1×128 tile along the last dim,
s = max(amax, 1e-4)/448. ``Fp8Linear`` quantizes and dequantizes both in the forward pass with a
straight-through gradient, so FP8 training error can be measured against bf16 without FP8 kernels.

Sources: DeepSeek-V3 report §3.3 (fine-grained quantization, pp.15-17); ``inference/kernel.py``
(act_quant L23-54, weight_dequant L76-85, fp8_gemm L147-166); README_WEIGHTS.md L66-90;
r1kit ``docs/DEEPSEEK_V3_SPEC.md`` §6.

Error bound of one round trip (e4m3: 3 mantissa bits, smallest subnormal 2^-9): each element is off by
at most 2^-4 of its magnitude, or 2^-10·scale in the subnormal range (``FP8_REL_ERR``, ``FP8_SUBNORMAL_ERR``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
BLOCK = 128  # weight blocks are BLOCK×BLOCK, activation tiles 1×BLOCK
FP8_REL_ERR = 2.0**-4  # half a unit in the last place with 3 mantissa bits
FP8_SUBNORMAL_ERR = 2.0**-10  # half the subnormal spacing 2^-9, in units of the block scale


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad a (o, i) matrix to multiples of ``block`` (README_WEIGHTS L85-90)."""
    o, i = w.shape
    return F.pad(w, (0, -i % block, 0, -o % block))


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight (o, i) per block×block block.

    Returns (w_fp8 (o, i) float8_e4m3fn, scale_inv (⌈o/block⌉, ⌈i/block⌉) fp32) with
    w ≈ w_fp8·scale_inv; scale_inv = amax/448 of each block (an all-zero block gets scale 1).
    """
    o, i = w.shape
    blocks = _pad_to_blocks(w.float(), block).unflatten(0, (-1, block)).unflatten(2, (-1, block))  # (O, b, I, b)
    amax = blocks.abs().amax(dim=(1, 3))  # (O, I)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(2).flatten(0, 1)[:o, :i].contiguous(), scale_inv


def weight_dequant(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> torch.Tensor:
    """W[i, j] = W_fp8[i, j]·scale_inv[i // block, j // block] (kernel.py L76-85).

    w_fp8 (o, i); scale_inv (⌈o/block⌉, ⌈i/block⌉). Raises ValueError when the scale grid does not
    tile the weight.
    """
    o, i = w_fp8.shape
    if scale_inv.shape != (math.ceil(o / block), math.ceil(i / block)):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not tile weight {(o, i)} in {block}-blocks")
    scales = scale_inv.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return (w_fp8.float() * scales).to(dtype)


def act_quant(x: torch.Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per 1×block tile of the last dim (kernel.py L23-54).

    x (..., k) with k % block == 0 -> (x_fp8 (..., k), scale (..., k/block) fp32), x ≈ x_fp8·scale,
    s = max(amax, 1e-4)/448; with ``ue8m0`` the scale is rounded up to a power of two (V3.1).
    Raises ValueError when k is not a multiple of block.
    """
    if x.shape[-1] % block:
        raise ValueError(f"activation width {x.shape[-1]} is not a multiple of the {block}-wide tile")
    tiles = x.float().unflatten(-1, (-1, block))  # (..., k/block, block)
    scale = tiles.abs().amax(-1).clamp(min=1e-4) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2), scale


def act_dequant(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant``: (..., k) fp8 and (..., k/block) scales -> (..., k)."""
    return (x_fp8.float().unflatten(-1, (scale.shape[-1], -1)) * scale[..., None]).flatten(-2).to(dtype)


def fake_quant_weight(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize a weight per block×block block with a straight-through gradient."""
    dequant = weight_dequant(*weight_quant(w, block), dtype=w.dtype, block=block)
    return w + (dequant - w).detach()


def fake_quant_act(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize activations per 1×block tile with a straight-through gradient."""
    dequant = act_dequant(*act_quant(x, block), dtype=x.dtype)
    return x + (dequant - x).detach()


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward sees FP8-rounded weights (128×128 blocks) and inputs (1×128 tiles).

    The product accumulates in the input dtype, as if the FP8 GEMM promoted to FP32 every 128
    products (report §3.3.2). Gradients pass straight through the rounding. in_features must be a
    multiple of 128.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        return F.linear(fake_quant_act(x), fake_quant_weight(self.weight), self.bias)


def to_fp8_linears(module: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace, in place, every nn.Linear whose in_features is a multiple of 128 by an Fp8Linear
    sharing its parameters; names ending in ``skip`` stay as they are (V3 keeps the head in bf16;
    its router is not an nn.Linear; spec §6). Returns ``module``."""
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and child.in_features % BLOCK == 0 and not full.endswith(skip):
                fp8 = Fp8Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                fp8.weight, fp8.bias = child.weight, child.bias
                setattr(parent, name, fp8)
    return module


def linear_error_vs_bf16(weight: torch.Tensor, x: torch.Tensor, block: int = BLOCK) -> dict[str, float]:
    """Relative Frobenius error of the FP8-simulated and the bf16 linear against fp32.

    weight (o, i), x (T, i) fp32; ``block`` the weight block and activation tile width (128 in V3;
    i.e. one scale per token row when block = i). Returns {"fp8": ‖y_fp8 − y‖/‖y‖, "bf16": ‖y_bf16 − y‖/‖y‖}.
    """
    exact = x @ weight.T
    fp8 = fake_quant_act(x, block) @ fake_quant_weight(weight, block).T
    bf16 = (x.bfloat16() @ weight.bfloat16().T).float()
    return {
        "fp8": ((fp8 - exact).norm() / exact.norm()).item(),
        "bf16": ((bf16 - exact).norm() / exact.norm()).item(),
    }
