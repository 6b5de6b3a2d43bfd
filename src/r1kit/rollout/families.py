"""Engine adapters for the model families people distill reasoning into, besides Llama.

Each is ``LlamaAdapter`` (RMSNorm, rotary, GQA, SwiGLU over a per-slot KV cache) with what the
family changes, registered with ``register_adapter`` under its ``config.model_type``:

* **qwen2** (Qwen2 / Qwen2.5, the DeepSeek-R1-Distill-Qwen students): biases on q, k and v
  (HF ``Qwen2Attention``); ``LlamaAdapter`` already fuses biases with the projections.
* **qwen3**: RMSNorm over each head's d dims of q and of k, after the projection and before the
  rotary embedding (HF ``Qwen3Attention``: ``q_norm``, ``k_norm``); head dim from ``config.head_dim``.
* **mistral**: the Llama layout (HF ``MistralForCausalLM``).

Sliding-window attention (Mistral's ``sliding_window``; Qwen's ``layer_types`` with
"sliding_attention") is not implemented: token i attends to j only when i - j < window (HF
``sliding_window_overlay``), which equals full attention while a sequence fits in the window. Such
a model is served with its context capped at the window, so every result is exact: longer prompts
are refused and completions end there with finish_reason "length".

Notation as in ``engine.py``: n tokens, H query heads, K key/value heads, d head dim, D model dim.
"""

from __future__ import annotations

import torch

from r1kit.rollout.engine import Linear, LlamaAdapter, LlamaLayer, register_adapter, rms_norm


def sliding_window(cfg) -> int | None:
    """The attention window (positions) of an HF config, None when every layer attends fully."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return cfg.sliding_window if "sliding_attention" in layer_types else None
    return getattr(cfg, "sliding_window", None)


class WindowedLlamaAdapter(LlamaAdapter):
    """``LlamaAdapter`` whose context is capped at the model's sliding window, if it has one."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__(model, dtype)
        window = sliding_window(model.config)
        if window is not None:
            self.max_context = min(self.max_context, window)


class QKNormLinear:
    """The fused qkv projection followed by Qwen3's per-head RMSNorm of q and k: x (n, D) ->
    (n, (H + 2K)·d) with each q head and each k head normalized over its d dims (v untouched).

    Args:
        qkv: the fused projection; q_norm, k_norm: (d,) weights; n_heads H, n_kv K, head_dim d; eps.
    """

    def __init__(self, qkv: Linear, q_norm: torch.Tensor, k_norm: torch.Tensor, n_heads: int, n_kv: int,
                 head_dim: int, eps: float) -> None:
        self.qkv, self.q_norm, self.k_norm = qkv, q_norm, k_norm
        self.n_heads, self.n_kv, self.head_dim, self.eps = n_heads, n_kv, head_dim, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        H, K = self.n_heads, self.n_kv
        out = self.qkv(x).view(x.shape[0], H + 2 * K, self.head_dim)
        q = rms_norm(out[:, :H], self.q_norm, self.eps)
        k = rms_norm(out[:, H : H + K], self.k_norm, self.eps)
        return torch.cat((q, k, out[:, H + K :]), dim=1).view(x.shape[0], -1)


class Qwen3Adapter(WindowedLlamaAdapter):
    """``LlamaAdapter`` with Qwen3's q/k RMSNorm per head (HF ``Qwen3Attention``)."""

    def _layer(self, layer: torch.nn.Module) -> LlamaLayer:
        fused = super()._layer(layer)
        a = layer.self_attn
        fused.qkv = QKNormLinear(fused.qkv, self._cast(a.q_norm.weight), self._cast(a.k_norm.weight),
                                 self.n_heads, self.n_kv, self.head_dim, self.eps)
        return fused


register_adapter("qwen2", WindowedLlamaAdapter)
register_adapter("qwen3", Qwen3Adapter)
register_adapter("mistral", WindowedLlamaAdapter)
