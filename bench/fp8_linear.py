"""FP8-simulated GEMM error vs bf16 at DeepSeek-V3 expert shapes (report §3.3; spec §6).

A routed expert's up projection (7168 -> 2048) with weights of std 0.006 (V3 init) and activations that
are Gaussian, or Gaussian with a few outlier channels, as seen after RMSNorm in trained models. Each
linear is computed three ways: fp32 (the anchor), bf16, and FP8-simulated (128×128 weight blocks,
1×128 activation tiles), and FP8 with 8x coarser 1024-wide scaling groups for contrast. Prints the relative Frobenius error of each against fp32.

Run: PYTHONPATH=src python bench/fp8_linear.py     (last line: fp8_over_bf16_error=<ratio, gaussian>)
"""

import torch

from r1kit.models.fp8 import linear_error_vs_bf16


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 7168, generator=gen) * 0.006
    gaussian = torch.randn(256, 7168, generator=gen)
    outliers = gaussian.clone()
    outliers[:, torch.randperm(7168, generator=gen)[:16]] *= 50
    ratio = None
    for name, x in [("gaussian", gaussian), ("outlier_channels", outliers)]:
        errors = linear_error_vs_bf16(weight, x)
        coarse = linear_error_vs_bf16(weight, x, block=1024)
        print(f"{name}: fp8_128_rel_error={errors['fp8']:.4f} fp8_1024_rel_error={coarse['fp8']:.4f} "
              f"bf16_rel_error={errors['bf16']:.4f}")
        ratio = ratio or errors["fp8"] / errors["bf16"]
    print(f"fp8_over_bf16_error={ratio:.2f}")


if __name__ == "__main__":
    main()
