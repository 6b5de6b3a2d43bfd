"""Roofline of rollouts on this CPU: can r1kit's engine reach 3x HF ``generate`` at all?

The workload is bench/rollout.py's: SmolLM2-135M, ``--batch`` chat-templated GSM8K prompts, exactly
``--new-tokens`` sampled tokens each (EOS ignored), in ``--dtype`` on both sides: by default the
CPU's native dtype (bf16 where it has AVX512-BF16/AMX matmuls, ``native_bf16``; else fp32). For each
thread count the script measures, in one run:

1. the GEMM rate (GFLOP/s) in that dtype achieved at every matrix shape of the workload (decode:
   batch x 576 -> 960 / 576 / 3072, 1536 -> 576, 576 -> 49152; prefill: the packed prompt tokens
   through the same layers), with ``F.linear`` (MKL in fp32, oneDNN unpacked in bf16: what HF runs)
   and oneDNN prepacked weights (the engine's ``Linear``), keeping the faster;
2. the streaming read bandwidth (GB/s), which bounds decode attention (it reads every cached key
   and value once per step);
3. from the model config, the FLOPs per token (checked against ``torch.utils.flop_counter`` on one HF
   decode forward) and the KV-cache bytes per step (2 bytes a value in bf16, 4 in fp32), hence the
   fastest possible time of the workload: every GEMM at its measured rate, attention at the read
   bandwidth, norms/sampling/Python free;
4. HF ``generate`` and the engine on the workload (bench/rollout.py's timers).

With one thread everything is timed in this process's CPU seconds (``time.process_time``), so other
jobs on a shared machine change the wall time but not the measurement; with more threads, in wall
seconds, only meaningful on a quiet machine (see the printed load): one preempted thread stalls the
other at every barrier, which on the shared development VM cut 2-thread decode GEMMs to 3-28 GFLOP/s.

It prints each system's share of that ceiling and ``max_ratio_vs_hf = ceiling / HF``, the ratio an
engine doing the same arithmetic could reach if it wasted nothing. The ceiling counts each prompt
token once (no padding); ``with_prefix_reuse`` also counts the prompts' shared leading tokens once.

    PYTHONPATH=src python bench/rollout_roofline.py [--threads 1] [--batch 64] [--new-tokens 128] [--dtype auto|bf16|fp32]

Last line: ``max_ratio_vs_hf_<dtype>=<the largest max_ratio_vs_hf over the thread counts>``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rollout import chat_prompts, engine_tokens_per_s, hf_tokens_per_s
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from r1kit.models.embedded import embedded_model_dir
from r1kit.rollout.engine import Engine, Linear, native_bf16

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Shape:
    """The matmul dimensions of a Llama-family model: L layers, D model, F MLP, H/K query/KV heads of d, V vocab."""

    L: int
    D: int
    F: int
    H: int
    K: int
    d: int
    V: int

    @classmethod
    def of(cls, cfg) -> "Shape":
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, d, cfg.vocab_size)

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of each projection of one layer, fused as the engine runs them: qkv, o, gate_up, down."""
        return [(self.D, (self.H + 2 * self.K) * self.d), (self.H * self.d, self.D), (self.D, 2 * self.F),
                (self.F, self.D)]

    def linear_flops(self, lm_head: bool = True) -> int:
        """FLOPs of the projections for one token (2 per multiply-add), lm_head included when asked."""
        per_layer = sum(2 * i * o for i, o in self.layer_linears())
        return self.L * per_layer + (2 * self.D * self.V if lm_head else 0)

    def attention_flops(self, context: int) -> int:
        """QK^T and PV FLOPs of one query token over ``context`` cached positions, all layers."""
        return self.L * 4 * self.H * self.d * context

    def kv_bytes(self, context: int, itemsize: int = 4) -> int:
        """Bytes of cached keys and values one decoded token reads, all layers."""
        return self.L * 2 * self.K * self.d * context * itemsize


def counted_decode_flops(model, context: int) -> int:
    """FLOPs torch's FlopCounterMode counts for one HF decode token after ``context - 1`` cached ones."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=torch.ones(1, context - 1, dtype=torch.long), past_key_values=cache, use_cache=True)
        counter = FlopCounterMode(display=False)
        with counter:
            model(input_ids=torch.ones(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    return counter.get_total_flops()


def best_time(fn, reps: int, clock) -> float:
    """Fastest of ``reps`` timed calls after one warm-up (seconds of ``clock``)."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def gemm_rate(rows: int, n_in: int, n_out: int, reps: int, clock,
              dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(``F.linear``, oneDNN-prepacked) GFLOP/s of (rows x n_in) @ (n_in x n_out) in ``dtype``."""
    x, w = torch.randn(rows, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
    packed = Linear(w, None)
    flops = 2 * rows * n_in * n_out
    with torch.inference_mode():
        mkl = flops / best_time(lambda: F.linear(x, w), reps, clock) / 1e9
        onednn = flops / best_time(lambda: packed(x), reps, clock) / 1e9
    return mkl, onednn


def read_bandwidth(clock, reps: int = 5) -> float:
    """GB/s of a streaming read of 256 MiB (a sum), the bound on reading the KV cache."""
    a = torch.ones(64 * 2**20)
    return a.numel() * 4 / best_time(lambda: a.sum(), reps, clock) / 1e9


def workload_seconds(shape: Shape, rates: dict, bandwidth: float, prompt_lens: list[int], prefix: int,
                     new_tokens: int, itemsize: int = 4) -> tuple[float, float]:
    """(prefill, decode) seconds of the workload with every GEMM at its measured rate (GFLOP/s) and
    decode attention at the read ``bandwidth`` (GB/s) over a cache of ``itemsize``-byte values; the
    first ``prefix`` prompt tokens are shared."""
    b, layers = len(prompt_lens), shape.layer_linears()
    tokens = sum(prompt_lens) - prefix * (b - 1)
    prefill = shape.L * sum(tokens * 2 * i * o / rates["prefill", i, o] for i, o in layers)
    causal = sum(shape.L * 2 * shape.H * shape.d * n * n for n in prompt_lens)  # QK^T + PV, half the square
    prefill += causal / rates[("prefill", *layers[0])]
    step = shape.L * sum(b * 2 * i * o / rates["decode", i, o] for i, o in layers)
    step += b * 2 * shape.D * shape.V / rates["decode", shape.D, shape.V]
    decode = 0.0
    for t in range(new_tokens - 1):  # the first token comes from the prefill logits
        decode += step + sum(shape.kv_bytes(n + t + 1, itemsize) for n in prompt_lens) / bandwidth
    return prefill / 1e9, decode / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts (>1 only on a quiet machine)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per GEMM (the fastest counts)")
    ap.add_argument("--skip-systems", action="store_true", help="only the roofline, not HF and the engine")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="dtype of the GEMMs, the cache, HF and the engine; auto = bf16 where the CPU has native bf16")
    args = ap.parse_args()
    name = args.dtype if args.dtype != "auto" else "bf16" if native_bf16() else "fp32"
    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    shape = Shape.of(model.config)
    prompts = chat_prompts(tokenizer, args.batch)
    lens = [len(p) for p in prompts]
    prefix = len(os.path.commonprefix(prompts))
    mid = max(lens) + args.new_tokens // 2
    print(f"load_1min={os.getloadavg()[0]:.2f} cpus={os.cpu_count()} model=smollm2-135m dtype={name} "
          f"native_bf16={native_bf16()} {shape}")
    print(f"flops_per_decoded_token linear={shape.linear_flops() / 1e6:.1f}M "
          f"attention={shape.attention_flops(1) / 1e3:.1f}K/position; at context {mid}: "
          f"{(shape.linear_flops() + shape.attention_flops(mid)) / 1e6:.1f}M "
          f"(FlopCounterMode on one HF decode forward, matmuls only as it does not count CPU SDPA: "
          f"{counted_decode_flops(model, mid) / 1e6:.1f}M)")
    print(f"workload batch={args.batch} new_tokens={args.new_tokens} prompt_tokens={sum(lens)} "
          f"padded_prompt_tokens={len(lens) * max(lens)} shared_prefix={prefix}")
    summary = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        clock, clock_name = (time.process_time, "cpu") if threads == 1 else (time.perf_counter, "wall")
        rates, lines = {}, []
        for phase, rows in (("decode", args.batch), ("prefill", sum(lens))):
            for i, o in shape.layer_linears() + ([(shape.D, shape.V)] if phase == "decode" else []):
                plain, packed = gemm_rate(rows, i, o, args.reps, clock, dtype)
                rates[(phase, i, o)] = max(plain, packed)
                lines.append(f"{phase} {rows}x{i}->{o} f_linear={plain:.1f} onednn_packed={packed:.1f}")
        bandwidth = read_bandwidth(clock)
        print(f"threads={threads} clock={clock_name} load_1min={os.getloadavg()[0]:.2f} "
              f"read_bandwidth_GB_s={bandwidth:.1f}")
        print("  gemm_GFLOP_s " + "; ".join(lines))
        pre, dec = workload_seconds(shape, rates, bandwidth, lens, 0, args.new_tokens, itemsize)
        pre_r, dec_r = workload_seconds(shape, rates, bandwidth, lens, prefix, args.new_tokens, itemsize)
        tokens = args.batch * args.new_tokens
        ceiling, ceiling_reuse = tokens / (pre + dec), tokens / (pre_r + dec_r)
        print(f"  ceiling_tok_s={ceiling:.1f} (prefill {pre:.1f} s + decode {dec:.1f} s) "
              f"with_prefix_reuse={ceiling_reuse:.1f} (prefill {pre_r:.1f} s)")
        if args.skip_systems:
            continue
        engine = Engine(model, [], dtype=dtype, max_batch=args.batch)
        ours = engine_tokens_per_s(engine, prompts, args.new_tokens, clock)
        hf = hf_tokens_per_s(model, tokenizer, prompts, args.new_tokens, clock)
        best = max(ceiling, ceiling_reuse)
        print(f"  hf_tok_s={hf:.1f} ({hf / ceiling:.0%} of ceiling) engine_tok_s={ours:.1f} "
              f"({ours / best:.0%} of ceiling_with_prefix_reuse) ratio_vs_hf={ours / hf:.2f} "
              f"max_ratio_vs_hf={best / hf:.2f} load_1min={os.getloadavg()[0]:.2f}")
        summary.append(best / hf)
    if summary:
        print(f"max_ratio_vs_hf_{name}={max(summary):.2f}")


if __name__ == "__main__":
    main()
