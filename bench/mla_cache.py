"""KV-cache bytes per token at DeepSeek-V3 sizes: absorbed MLA (latent + rotary key) vs a naive MHA cache.

One decoder layer with V3's attention shape (128 heads, kv_lora_rank 512, head dims 128/64/128) but a
small hidden size (the cache does not depend on it) prefills the same tokens twice, once into an
absorbed cache and once into a naive per-head key/value cache; the bytes are read from the allocated
cache tensors. Spec §1: 576 values per token per layer absorbed vs 128·(192+128) = 40,960 naive.

Run: PYTHONPATH=src python bench/mla_cache.py     (last line: mla_cache_ratio=<naive/absorbed>)
"""

import dataclasses

import torch

from r1kit.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, KVCache

TOKENS = 32


def v3_attention_probe() -> DeepseekV3ForCausalLM:
    """A one-layer dense model with the 671b preset's attention dims and a 256-wide residual stream."""
    v3 = DeepseekV3Config.preset("671b")
    cfg = dataclasses.replace(
        v3, vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
        first_k_dense_replace=1, num_nextn_predict_layers=0, q_lora_rank=256,
    )
    return DeepseekV3ForCausalLM(cfg).cast(torch.bfloat16).eval()


def cache_bytes_per_token(model: DeepseekV3ForCausalLM, absorbed: bool) -> float:
    """Bytes per token per layer held by a cache after prefilling TOKENS tokens."""
    cache = KVCache(absorbed=absorbed)
    with torch.no_grad():
        model(torch.arange(TOKENS)[None], cache=cache)
    return cache.nbytes() / (TOKENS * model.config.num_hidden_layers)


def main() -> None:
    torch.manual_seed(0)
    model = v3_attention_probe()
    absorbed = cache_bytes_per_token(model, absorbed=True)
    naive = cache_bytes_per_token(model, absorbed=False)
    layers = DeepseekV3Config.preset("671b").num_hidden_layers
    print(f"absorbed_bytes_per_token_per_layer={absorbed:.0f} (bf16, {absorbed / 2:.0f} values)")
    print(f"naive_bytes_per_token_per_layer={naive:.0f} (bf16, {naive / 2:.0f} values)")
    print(f"absorbed_kib_per_token_61_layers={absorbed * layers / 1024:.1f}")
    print(f"naive_kib_per_token_61_layers={naive * layers / 1024:.1f}")
    print(f"mla_cache_ratio={naive / absorbed:.2f}")


if __name__ == "__main__":
    main()
