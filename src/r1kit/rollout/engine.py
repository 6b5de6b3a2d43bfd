"""r1kit's sampling engine: batched, KV-cached, continuously batched sampling from a causal LM.

The engine owns the loop (admission, sampling, stops, slot reuse); a small per-model *adapter* owns
the forward: ``prefill`` a batch of prompts into cache slots and ``decode`` one token for every
slot. ``LlamaAdapter`` runs HF Llama-family models with its own forward over the HF module's
weights (fused QKV and gate/up projections, a preallocated per-slot KV cache, no per-token HF
``forward`` call), so per-token Python work is a few hundred tensor ops. Another model (the r1kit
DeepSeek-V3 with its absorbed MLA cache) plugs in with ``register_adapter``.

Notation: S cache slots, T cache positions, w slots in one decode step (the slots in use), u prompts
in one prefill, s their padded length, L layers, H query heads, K key/value heads, G = H / K,
d head dim, D model dim, V vocabulary.

Reference semantics: HF ``transformers`` ``LlamaForCausalLM`` (models/llama/modeling_llama.py) for
the forward; HF ``TopKLogitsWarper`` / ``TopPLogitsWarper`` for top-k then top-p filtering.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from r1kit.errors import ConfigError
from r1kit.rollout.base import Completion, SamplingParams

TOP_P_CANDIDATES = 1024  # tokens kept before the exact top-p cut; a full sort is the fallback
SHARED_PREFIX_MIN = 16  # prompts admitted together that share this many leading tokens prefill them once


@dataclass
class SlotCache:
    """Per-slot inference cache: every tensor has the slot on dim 1, e.g. (L, S, K, T, d).

    Attributes:
        tensors: the cache tensors (a Llama cache holds keys and values; an MLA cache holds the
            compressed latent and the rotary key).
    """

    tensors: list[torch.Tensor]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src`` (n,) onto slots ``dst`` (n,); used to share one prefilled prompt
        among its n completions and to compact slots in use to the front."""
        for t in self.tensors:
            t[:, dst] = t[:, src]


class ModelAdapter(Protocol):
    """The per-model forward the engine drives. Logits are float32 (b, V) at the given rows."""

    vocab_size: int
    max_context: int  # positions the model supports (prompt + completion)

    def cache_bytes(self, slots: int, length: int) -> int:
        """Bytes of a cache with ``slots`` slots of ``length`` positions."""
        ...

    def new_cache(self, slots: int, length: int) -> SlotCache:
        """Allocate a cache whose every entry is finite."""
        ...

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: SlotCache, slots: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        """Run prompts ``tokens`` (u, s) right-padded to s, true ``lengths`` (u,), at positions
        start..start+s-1 of cache ``slots`` (u,), whose positions < start already hold a shared prefix.
        Returns logits (u, V) at each last prompt token."""
        ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache, span: int,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """One step for slots 0..w-1: ``tokens`` (w,) at ``positions`` (w,); attends over cache
        positions ``< span`` (span > max position). Returns logits (r, V) at ``rows`` (r,) only, the
        slots still generating (None = all w)."""
        ...

    def load(self, model: torch.nn.Module) -> None:
        """(Re)load weights from ``model``."""
        ...


ADAPTERS: dict[str, Callable[[torch.nn.Module, torch.dtype], ModelAdapter]] = {}


def register_adapter(model_type: str, factory: Callable[[torch.nn.Module, torch.dtype], ModelAdapter]) -> None:
    """Serve models whose ``config.model_type`` is ``model_type`` with ``factory(model, dtype)``."""
    ADAPTERS[model_type] = factory


def native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 / AMX); without them torch
    emulates bf16 matmuls, several times slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"auto"`` -> bf16 where the CPU has native bf16 matmuls, else fp32; a dtype passes through.

    Raises ConfigError for anything but "auto", float32 or bfloat16.
    """
    if dtype == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dtype must be 'auto', torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in for weights of ``dtype``: bf16 weights compute in bf16 only where
    the CPU has native bf16 matmuls; elsewhere in fp32 on the (exactly representable) bf16 values,
    which is faster than emulated bf16 and at least as accurate, at 2x the weight memory."""
    return torch.bfloat16 if dtype == torch.bfloat16 and native_bf16() else torch.float32


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); falls back to free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dim, statistics in fp32 (HF ``LlamaRMSNorm``). x: (..., D)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split layout (HF ``apply_rotary_pos_emb``). x (..., d); cos/sin
    broadcastable to x."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear:
    """``y = x W^T + b`` for x (n, in). In fp32 the weight is prepacked once for oneDNN, which runs the
    (64 x 576) @ (576 x 49152) lm_head about 1.7x faster than ``F.linear`` (MKL) on an AVX2 CPU
    (microbenchmark, 1 thread); bf16, or a torch without the op, uses ``F.linear``.

    Args:
        weight: (out, in); bias: (out,) or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias, self.packed = weight, bias, None
        if weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
            except (AttributeError, RuntimeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@dataclass
class LlamaLayer:
    """One decoder layer's weights, projections fused: qkv (H·d + 2·K·d, D), gate_up (2F, D)."""

    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def _cat_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


class LlamaAdapter:
    """Forward of an HF Llama-family causal LM (``LlamaForCausalLM``: RMSNorm, rotary, GQA, SwiGLU,
    optionally tied lm_head) over a per-slot KV cache (2: keys, values; each (L, S, K, T, d)).

    Args:
        model: an HF ``LlamaForCausalLM`` (``model.model.layers``, ``model.lm_head``, config).
        dtype: weight precision (float32 or bfloat16); matmuls and the cache use
            ``compute_dtype(dtype)``.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        cfg = model.config
        self.dtype, self.compute = dtype, compute_dtype(dtype)
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.max_position_embeddings
        self.load(model)

    def load(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights, rounded to ``dtype``, into fused compute-dtype tensors and
        tabulate cos/sin for every position (through the model's own rotary module, so every HF
        rope type is honored)."""
        with torch.no_grad():
            self.embed = self._cast(model.model.embed_tokens.weight)  # (V, D)
            self.final_norm = self._cast(model.model.norm.weight)
            self.lm_head = Linear(self._cast(model.lm_head.weight), None)  # (V, D)
            self.layers = [self._layer(layer) for layer in model.model.layers]
            positions = torch.arange(self.max_context)[None]  # (1, T)
            cos, sin = model.model.rotary_emb(self.embed[:1].float(), positions)
            self.cos, self.sin = self._cast(cos[0]), self._cast(sin[0])  # (T, d)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of ``t`` rounded to ``dtype``, held in the compute dtype."""
        return t.detach().to(self.dtype).to(self.compute, copy=True)

    def _layer(self, layer: torch.nn.Module) -> LlamaLayer:
        a, m = layer.self_attn, layer.mlp

        def fused(*linears: torch.nn.Linear) -> Linear:
            bias = _cat_or_none([lin.bias for lin in linears])
            weight = self._cast(torch.cat([lin.weight for lin in linears]))
            return Linear(weight, None if bias is None else self._cast(bias))

        return LlamaLayer(
            attn_norm=self._cast(layer.input_layernorm.weight),
            qkv=fused(a.q_proj, a.k_proj, a.v_proj),
            o=fused(a.o_proj),
            mlp_norm=self._cast(layer.post_attention_layernorm.weight),
            gate_up=fused(m.gate_proj, m.up_proj),
            down=fused(m.down_proj),
        )

    def cache_bytes(self, slots: int, length: int) -> int:
        itemsize = torch.empty((), dtype=self.compute).element_size()
        return 2 * self.n_layers * slots * self.n_kv * length * self.head_dim * itemsize

    def new_cache(self, slots: int, length: int) -> SlotCache:
        shape = (self.n_layers, slots, self.n_kv, length, self.head_dim)
        # Zeroed, not empty: masked positions still meet the values (0 x NaN garbage would be NaN).
        return SlotCache([torch.zeros(shape, dtype=self.compute), torch.zeros(shape, dtype=self.compute)])

    def _mlp(self, x: torch.Tensor, layer: LlamaLayer) -> torch.Tensor:
        """x + SwiGLU(RMSNorm(x)); x (..., D)."""
        gate, up = layer.gate_up(rms_norm(x, layer.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(b, D) -> float32 logits (b, V)."""
        return self.lm_head(rms_norm(x, self.final_norm, self.eps)).float()

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: SlotCache, slots: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        u, s = tokens.shape
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        keys, values = cache.tensors
        # Projections and MLP run on the n real tokens only, packed; attention on the padded grid.
        real = (torch.arange(s)[None] < lengths[:, None]).flatten().nonzero()[:, 0]  # (n,) into u*s
        cos, sin = self.cos[start + real % s][:, None], self.sin[start + real % s][:, None]  # (n, 1, d)
        # Query i sees the shared prefix and suffix positions <= i (bottom-right causal); right padding:
        # causal masking alone keeps real tokens off the pads.
        visible = torch.arange(start + s)[None] <= torch.arange(s)[:, None] + start  # (s, start+s)
        x = self.embed[tokens.flatten()[real]]  # (n, D)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.attn_norm, self.eps)).view(-1, H + 2 * K, d)
            grid = qkv.new_zeros(u * s, H + 2 * K, d)
            grid[real] = torch.cat((rotate(qkv[:, : H + K], cos, sin), qkv[:, H + K :]), dim=1)
            grid = grid.view(u, s, H + 2 * K, d).transpose(1, 2)  # (u, H+2K, s, d)
            q, k, v = grid[:, :H], grid[:, H : H + K], grid[:, H + K :]
            keys[i, slots, :, start : start + s] = k
            values[i, slots, :, start : start + s] = v
            if start:
                k, v = keys[i, slots, :, : start + s], values[i, slots, :, : start + s]  # (u, K, start+s, d)
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (u, H, s, d)
            attn = attn.transpose(1, 2).reshape(u * s, H * d)[real]  # (n, H*d)
            x = x + layer.o(attn)
            x = self._mlp(x, layer)
        return self._logits(x[lengths.cumsum(0) - 1])  # last prompt token of each row

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache, span: int,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        w = tokens.shape[0]
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        keys, values = cache.tensors
        slots = torch.arange(w)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (w, 1, d)
        visible = (torch.arange(span)[None] <= positions[:, None])[:, None, None]  # (w, 1, 1, span)
        x = self.embed[tokens]  # (w, D)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.attn_norm, self.eps)).view(w, H + 2 * K, d)
            qk = rotate(qkv[:, : H + K], cos, sin)  # (w, H+K, d)
            keys[i, slots, :, positions] = qk[:, H:]
            values[i, slots, :, positions] = qkv[:, H + K :]
            # The G query heads sharing a KV head ride as G query positions of that head.
            q = qk[:, :H].view(w, K, H // K, d)
            attn = F.scaled_dot_product_attention(
                q, keys[i, :w, :, :span], values[i, :w, :, :span], attn_mask=visible
            )  # (w, K, G, d)
            x = x + layer.o(attn.reshape(w, H * d))
            x = self._mlp(x, layer)
        return self._logits(x if rows is None or len(rows) == w else x[rows])


register_adapter("llama", LlamaAdapter)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return its sampling logprob.

    Args:
        logits: float32 (b, V).
        params: temperature (0 = greedy), top_k (0 = off), top_p (1 = off); top-k is applied
            first, then top-p over the renormalized top-k mass (HF warper order).
        generator: the engine's seeded generator (None = global RNG).

    Returns:
        tokens (b,) int64 and logprobs (b,) float32: ``log_softmax(logits / T)`` at the token,
        before top-k/top-p truncation, i.e. what a trainer recomputes from a full forward. For
        greedy (T = 0) the logprob is taken at T = 1.
    """
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    scaled = logits if params.temperature == 1 else logits / params.temperature  # (b, V)
    if params.top_k == 0 and params.top_p == 1:
        # log_softmax written out so the (b, V) passes are shared with the draw's weights.
        shifted = scaled - scaled.amax(-1, keepdim=True)
        weights = shifted.exp()
        tokens = draw(weights, generator)
        return tokens, shifted.gather(1, tokens[:, None])[:, 0] - weights.sum(-1).log()
    logp = scaled.log_softmax(-1)
    tokens = _sample_truncated(logp, params.top_k, params.top_p, generator)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _sample_truncated(logp: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from the top-k, then top-p, truncation of ``logp`` (b, V). Top-p alone looks at the
    ``TOP_P_CANDIDATES`` most likely tokens and sorts the full vocabulary only for a batch where
    they hold less than ``top_p`` of the mass."""
    vocab = logp.shape[-1]
    k = min(top_k or TOP_P_CANDIDATES, vocab)
    cand_logp, cand_ids = logp.topk(k, dim=-1)  # (b, k), sorted descending
    if top_k:
        cand_logp = cand_logp.log_softmax(-1)  # top-p acts on the renormalized top-k mass
    probs = cand_logp.exp()
    if top_p < 1:
        if not top_k and bool((probs.sum(-1) < top_p).any()):
            cand_logp, cand_ids = logp.sort(dim=-1, descending=True)
            probs = cand_logp.exp()
        mass_before = probs.cumsum(-1) - probs  # keep a token while the mass above it is < top_p
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return cand_ids.gather(1, draw(probs, generator)[:, None])[:, 0]


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``weights`` (b, V) >= 0 with probability proportional to the weight,
    by inverting the CDF with one uniform per row. ``torch.multinomial`` draws an exponential per
    vocabulary entry instead (b·V random numbers, ~150 ms for 64 x 49152 on this CPU)."""
    cdf = weights.cumsum(-1)  # (b, V)
    u = torch.rand(weights.shape[0], 1, generator=generator) * cdf[:, -1:]  # (b, 1), in [0, total)
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)


class StopChecker:
    """Per-sequence stop strings: decodes the tail of a completion and looks for each string."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.window = max(len(s) for s in stop) + 4  # a string of c chars spans at most c tokens

    def hit(self, tail: list[int]) -> bool:
        """True if a stop string occurs in the decoded ``tail`` (the last ``window`` tokens)."""
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in self.stop)


def eos_ids_of(model: torch.nn.Module, tokenizer_or_eos_ids) -> tuple[list[int], object | None]:
    """End-of-sequence ids and the tokenizer (None when only ids were given).

    A tokenizer contributes its ``eos_token_id`` and the model's ``generation_config.eos_token_id``.
    """
    if hasattr(tokenizer_or_eos_ids, "decode"):
        ids = {tokenizer_or_eos_ids.eos_token_id}
        gen = getattr(model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return sorted(i for i in ids if i is not None), tokenizer_or_eos_ids
    return [int(i) for i in tokenizer_or_eos_ids], None


class Engine:
    """Batched, KV-cached sampling engine with continuous batching (implements ``SamplingEngine``).

    Sequences (prompt i's n completions are sequences i·n .. i·n+n-1) wait in a queue; up to
    ``max_batch`` of them hold cache slots. Each prompt is prefilled once and its cache copied to the
    slots of its completions; every step decodes one token for all slots in use; a finished
    sequence frees its slot for the next waiting one, and when the queue is empty and half the
    slots are idle, the busy ones are compacted to the front so the tail decodes narrow.

    Args:
        model: an HF causal LM whose ``config.model_type`` has an adapter (``register_adapter``;
            "llama" is built in). Its weights are copied; call ``update_weights`` after training.
        tokenizer_or_eos_ids: a tokenizer (EOS ids and stop strings) or a list of EOS ids (stop
            strings then unsupported). Pass ``[]`` to never stop on EOS (benchmarks).
        dtype: weight precision; "auto" = bf16 where the CPU has native bf16 matmuls, else fp32.
            Matmuls and the cache run in ``compute_dtype(dtype)`` (bf16 only where native).
        max_batch: cache slots, i.e. sequences decoded together.
        max_cache_bytes: KV-cache budget in bytes (default: half the available memory).

    Raises:
        ConfigError: no adapter for the model type, a bad dtype or max_batch < 1.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer_or_eos_ids,
        dtype: torch.dtype | str = "auto",
        max_batch: int = 64,
        max_cache_bytes: int | None = None,
    ) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ADAPTERS:
            raise ConfigError(
                f"no engine adapter for model_type {model_type!r} (have {sorted(ADAPTERS)}); "
                "register one with r1kit.rollout.engine.register_adapter"
            )
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.dtype = resolve_dtype(dtype)
        self.compute_dtype = compute_dtype(self.dtype)
        self.adapter = ADAPTERS[model_type](model, self.dtype)
        self.eos_ids, self.tokenizer = eos_ids_of(model, tokenizer_or_eos_ids)
        self.max_batch = max_batch
        self.max_cache_bytes = max_cache_bytes

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current weights into the engine."""
        self.adapter.load(model)

    def _check(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> tuple[int, int]:
        """Validate the call before any work; returns (slots, cache length)."""
        params.validate()
        if not prompt_ids:
            raise ConfigError("prompt_ids is empty: pass at least one prompt")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer: build the Engine with one instead of EOS ids")
        context = self.adapter.max_context
        for i, p in enumerate(prompt_ids):
            if not 0 < len(p) < context:
                raise ConfigError(
                    f"prompt {i} has {len(p)} tokens; it must have 1 to {context - 1} "
                    f"(the model's context is {context}): shorten or drop it"
                )
            if min(p) < 0 or max(p) >= self.adapter.vocab_size:
                raise ConfigError(f"prompt {i} has a token id outside [0, {self.adapter.vocab_size})")
        slots = min(self.max_batch, len(prompt_ids) * params.n)
        length = min(max(len(p) for p in prompt_ids) + params.max_tokens, context)
        need = self.adapter.cache_bytes(slots, length)
        budget = self.max_cache_bytes if self.max_cache_bytes is not None else available_memory_bytes() // 2
        if need > budget:
            raise ConfigError(
                f"the KV cache needs {need} bytes ({need / 2**30:.2f} GiB) for {slots} slots x {length} "
                f"positions, over the budget of {budget} bytes; lower max_batch or max_tokens, "
                "or raise max_cache_bytes"
            )
        return slots, length

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample ``params.n`` completions per prompt; returns them prompt-major (i·n + j).

        Raises ConfigError (before any work) for invalid params, an empty or too long prompt, stop
        strings without a tokenizer, or a KV cache over the memory budget.
        """
        slots, length = self._check(prompt_ids, params)
        run = _Run(self, prompt_ids, params, slots, length)
        return run.loop()


class _Run:
    """State of one ``generate`` call: the queue, the slots and the per-slot output buffers."""

    def __init__(self, engine: Engine, prompt_ids, params: SamplingParams, slots: int, length: int) -> None:
        self.adapter = engine.adapter
        self.prompts = [list(p) for p in prompt_ids]
        self.params = params
        self.length = length
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.stop_ids = torch.tensor(sorted(set(engine.eos_ids) | set(params.stop_token_ids)), dtype=torch.long)
        self.stops = StopChecker(engine.tokenizer, params.stop) if params.stop else None
        self.cache = self.adapter.new_cache(slots, length)
        self.waiting = deque(range(len(self.prompts) * params.n))
        self.seq = [-1] * slots  # sequence held by each slot, -1 = free
        self.width = 0  # slots [0, width) are decoded each step
        self.last = torch.zeros(slots, dtype=torch.long)  # last sampled token per slot
        self.pos = torch.zeros(slots, dtype=torch.long)  # cache position the last token goes to
        self.count = torch.zeros(slots, dtype=torch.long)  # completion tokens so far
        self.out_ids = torch.zeros(slots, params.max_tokens, dtype=torch.long)
        self.out_logp = torch.zeros(slots, params.max_tokens, dtype=torch.float32)
        self.results: list[Completion | None] = [None] * len(self.waiting)

    def loop(self) -> list[Completion]:
        while self.waiting or self.width:
            if self.waiting and -1 in self.seq:
                self._admit()
            else:
                self._compact()
                self._decode()
        return self.results

    def _admit(self) -> None:
        """Prefill the prompts of waiting sequences into free slots and sample their first token."""
        n = self.params.n
        free = [s for s, q in enumerate(self.seq) if q == -1][: len(self.waiting)]
        seqs = [self.waiting.popleft() for _ in free]
        prompt_of = [q // n for q in seqs]
        unique = sorted(set(prompt_of))
        home = {p: free[prompt_of.index(p)] for p in unique}  # the slot each prompt is prefilled into
        start = self._prefill_shared_prefix(unique, [home[p] for p in unique])
        tokens, lengths = self._padded(unique, start)
        logits = self.adapter.prefill(tokens, lengths, self.cache, torch.tensor([home[p] for p in unique]), start)
        copies = [(home[p], s) for p, s in zip(prompt_of, free) if home[p] != s]
        if copies:
            src, dst = torch.tensor(copies).T
            self.cache.copy_slots(src, dst)
        for q, s in zip(seqs, free):
            self.seq[s], self.pos[s], self.count[s] = q, len(self.prompts[q // n]), 0
        self.width = max(self.width, max(free) + 1)
        rows = torch.tensor([unique.index(p) for p in prompt_of])  # each sequence's prefill row
        self._record(torch.tensor(free), *sample(logits[rows], self.params, self.generator))

    def _prefill_shared_prefix(self, prompts: list[int], slots: list[int]) -> int:
        """Prefill the longest prefix the ``prompts`` share (a system prompt, a template's preamble) once
        into the first of their ``slots`` and copy it to the others; returns its length (0 when under
        ``SHARED_PREFIX_MIN`` tokens). Every prompt keeps at least one token of its own, whose logits
        start its completion."""
        ids = [self.prompts[p] for p in prompts]
        start = min(len(os.path.commonprefix(ids)), min(map(len, ids)) - 1)
        if len(ids) < 2 or start < SHARED_PREFIX_MIN:
            return 0
        self.adapter.prefill(torch.tensor([ids[0][:start]]), torch.tensor([start]), self.cache, torch.tensor(slots[:1]))
        self.cache.copy_slots(torch.tensor(slots[:1] * (len(slots) - 1)), torch.tensor(slots[1:]))
        return start

    def _padded(self, prompts: list[int], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (u, s) and lengths (u,) of the prompts with these indices, from
        position ``start`` on."""
        lengths = torch.tensor([len(self.prompts[p]) - start for p in prompts])
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : lengths[row]] = torch.tensor(self.prompts[p][start:])
        return tokens, lengths

    def _decode(self) -> None:
        w = self.width
        span = int(self.pos[:w].max()) + 1
        busy = torch.tensor([q >= 0 for q in self.seq[:w]]).nonzero()[:, 0]
        logits = self.adapter.decode(self.last[:w], self.pos[:w], self.cache, span, busy)  # (b, V)
        self.pos[busy] += 1  # idle slots stay at position 0
        self._record(busy, *sample(logits, self.params, self.generator))

    def _record(self, slots: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor) -> None:
        """Append the sampled tokens (n,) to ``slots`` (n,) and retire the finished sequences."""
        self.out_ids[slots, self.count[slots]] = tokens
        self.out_logp[slots, self.count[slots]] = logp
        self.count[slots] += 1
        self.last[slots] = tokens
        stopped = torch.isin(tokens, self.stop_ids)
        # A token at position pos makes the sequence pos + 1 long; the cache holds self.length.
        full = (self.count[slots] >= self.params.max_tokens) | (self.pos[slots] + 1 >= self.length)
        for slot, stop, is_full in zip(slots.tolist(), stopped.tolist(), full.tolist()):
            stop = stop or (self.stops is not None and self.stops.hit(self._tail(slot, self.stops.window)))
            if stop or is_full:
                self._finish(slot, "stop" if stop else "length")

    def _tail(self, slot: int, window: int) -> list[int]:
        """The last ``window`` completion tokens of ``slot``."""
        n = int(self.count[slot])
        return self.out_ids[slot, max(0, n - window) : n].tolist()

    def _finish(self, slot: int, reason: str) -> None:
        q, n = self.seq[slot], int(self.count[slot])
        self.results[q] = Completion(
            token_ids=self.out_ids[slot, :n].tolist(),
            logprobs=self.out_logp[slot, :n].tolist(),
            finish_reason=reason,
            prompt_index=q // self.params.n,
        )
        self.seq[slot] = -1
        self.pos[slot] = 0  # an idle slot decodes a dummy token at position 0
        while self.width and self.seq[self.width - 1] == -1:
            self.width -= 1

    def _compact(self) -> None:
        """With nothing waiting, move busy slots to the front once half of [0, width) is idle."""
        busy = [s for s in range(self.width) if self.seq[s] >= 0]
        if self.waiting or 2 * len(busy) > self.width:
            return
        src, dst = torch.tensor(busy), torch.arange(len(busy))
        self.cache.copy_slots(src, dst)
        for t in (self.last, self.pos, self.count, self.out_ids, self.out_logp):
            t[dst] = t[src]
        self.seq[: len(busy)] = [self.seq[s] for s in busy]
        self.seq[len(busy) : self.width] = [-1] * (self.width - len(busy))
        self.width = len(busy)
