"""r1kit's sampling engine: batched, KV-cached, continuously batched sampling from a causal LM.

The engine owns the loop (``Scheduler``: admission, sampling, stops, slot reuse), driven either by
the batch call ``Engine.generate`` (RL, evaluation, distillation) or request by request
(``add_request`` / ``step`` / ``abort``: the server's continuous batching across requests, each with
its own sampling settings and seed); a small per-model *adapter* owns the forward: ``prefill`` a
batch of prompts into cache slots, ``decode`` one token for every slot, or both in one ``forward``
(chunked prefill: the running decodes and prompt chunks share a model call). ``LlamaAdapter`` runs HF
Llama-family models with its own forward over the HF module's weights (fused QKV and gate/up
projections prepacked for oneDNN, a per-slot KV cache grown in blocks so decode attention is two
batched matmuls over one contiguous block per layer, prefill without padding, no per-token HF
``forward`` call), so per-token Python work is a few hundred tensor ops; where r1kit's C kernels
build (``native.py``: AVX-512 and a C compiler), attention (the decode rows and every prompt token
of a prefill) reads only the positions each token sees and the layer's elementwise steps are one
pass each. Another model (the r1kit DeepSeek-V3
with its absorbed MLA cache) plugs in with ``register_adapter``.

Notation: S cache slots, T cache positions, w slots in one decode step (the slots in use), u prompts
in one prefill, s their padded length, L layers, H query heads, K key/value heads, G = H / K,
d head dim, D model dim, V vocabulary.

Reference semantics: HF ``transformers`` ``LlamaForCausalLM`` (models/llama/modeling_llama.py) for
the forward; HF ``TopKLogitsWarper`` / ``TopPLogitsWarper`` for top-k then top-p filtering.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from r1kit.errors import ConfigError
from r1kit.models.loading import native_bf16, resolve_dtype
from r1kit.rollout import native
from r1kit.rollout.base import Completion, SamplingParams
from r1kit.rollout.sampling import truncated_candidates

SHARED_PREFIX_MIN = 16  # prompts admitted together that share this many leading tokens prefill them once
DRAW_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF draw
ROWS_EXACT = 64  # prepacked matmuls of more rows than this run at a rounded-up row count (padded_rows)
CACHE_BLOCK = 64  # a growable cache holds a multiple of this many positions (grown and shrunk in these steps)


@dataclass
class SlotCache:
    """Per-slot inference cache: every tensor has the slot on dim 1, e.g. (L, S, K, T, d).

    A growable cache (``grows``) holds only as many positions as its longest sequence needs, in
    steps of ``CACHE_BLOCK`` up to ``limit``, so the torch path's decode attention reads a
    contiguous (S, K, T, d) block per layer instead of a strided slice of a cache sized for the
    longest possible sequence; a fixed one holds all ``limit`` positions from the start.

    Attributes:
        tensors: the cache tensors (a Llama cache holds keys and values; an MLA cache holds the
            compressed latent and the rotary key).
        position_dim: the dim that indexes positions (3 for (L, S, K, T, d)).
        limit: the most positions the cache holds.
        grows: whether ``fit`` grows and shrinks it (False: allocated at ``limit`` positions).
    """

    tensors: list[torch.Tensor]
    position_dim: int
    limit: int
    grows: bool = True

    @property
    def positions(self) -> int:
        """Positions the cache holds now (T)."""
        return self.tensors[0].shape[self.position_dim]

    def fit(self, needed: int, shrink: bool = False) -> None:
        """Hold at least ``needed`` positions (rounded up to ``CACHE_BLOCK``, at most ``limit``): grow,
        keeping every position; with ``shrink``, also drop the positions beyond that once they are half
        the cache (the caller guarantees none of them is still read). No-op for a fixed cache."""
        if not self.grows:
            return
        have, dim = self.positions, self.position_dim
        want = min(self.limit, -(-needed // CACHE_BLOCK) * CACHE_BLOCK)
        if want > have or (shrink and 2 * want <= have):
            keep = min(want, have)
            resized = []
            for t in self.tensors:
                # Zeroed, not empty: masked positions still meet the values (0 x NaN garbage would be NaN).
                grown = t.new_zeros(t.shape[:dim] + (want,) + t.shape[dim + 1 :])
                grown.narrow(dim, 0, keep).copy_(t.narrow(dim, 0, keep))
                resized.append(grown)
            self.tensors = resized

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, positions: int | None = None) -> None:
        """Copy slots ``src`` (n,) onto slots ``dst`` (n,), their first ``positions`` positions only
        when given (the rest of ``dst`` is left as it was); used to share one prefilled prompt among
        its n completions and to compact slots in use to the front."""
        for t in self.tensors:
            if positions is not None and positions < t.shape[self.position_dim]:
                t = t.narrow(self.position_dim, 0, positions)
            t[:, dst] = t[:, src]


@dataclass
class Chunks:
    """Prompt pieces prefilled in one forward: u chunks, chunk j holding tokens at cache positions
    ``starts[j]`` .. ``starts[j] + lengths[j] - 1`` of cache slot ``slots[j]``, whose earlier positions
    already hold that prompt's start (a shared prefix or its earlier chunks).

    Attributes:
        tokens: (u, s) int64, right-padded to s; lengths: (u,) true lengths; slots: (u,) cache
            slots; starts: (u,) first cache position of each chunk.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor


class ModelAdapter(Protocol):
    """The per-model forward the engine drives. Logits are float32 (b, V) at the given rows."""

    vocab_size: int
    max_context: int  # positions the model supports (prompt + completion)

    def cache_bytes(self, slots: int, length: int) -> int:
        """Bytes of a cache with ``slots`` slots of ``length`` positions."""
        ...

    def new_cache(self, slots: int, length: int, whole: bool = False) -> SlotCache:
        """Allocate a cache whose every entry is finite; ``whole``: the caller fills nearly all of
        ``length`` (a ``generate`` call), so an adapter may allocate it at once instead of growing it."""
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

    def forward(self, cache: SlotCache, tokens: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                span: int = 0, rows: torch.Tensor | None = None,
                chunks: Chunks | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One model call for a decode step and prompt chunks together (vLLM's chunked prefill): the
        decode rows as in ``decode`` (None when ``tokens`` is None) and ``chunks`` as in ``prefill``,
        each chunk attending to its slot's cached positions and causally within itself; a chunk's
        writes land after the decode rows' (a prefilling slot's dummy decode row writes its last
        prompt position, which the last chunk overwrites). Returns (decode logits (r, V) or None,
        logits (u, V) at each chunk's last token or None)."""
        ...

    def load(self, model: torch.nn.Module) -> None:
        """(Re)load weights from ``model``."""
        ...


ADAPTERS: dict[str, Callable[[torch.nn.Module, torch.dtype], ModelAdapter]] = {}


def register_adapter(model_type: str, factory: Callable[[torch.nn.Module, torch.dtype], ModelAdapter]) -> None:
    """Serve models whose ``config.model_type`` is ``model_type`` with ``factory(model, dtype)``."""
    ADAPTERS[model_type] = factory


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


def padded_rows(n: int) -> int:
    """Rows a prepacked matmul of ``n`` rows runs with: ``n`` up to ``ROWS_EXACT`` (decode batches,
    bounded by the slots), else ``n`` rounded up to a multiple of 1/16 of the power of two above it
    (8 shapes per octave, at most 12.5% padding: 4264 prefill rows run as 4608). oneDNN caches a
    primitive per input shape, up to 1024 of them. An engine fed 1-7 prompts of 5-200 random tokens
    per call (bf16, embedded model) grew +173 MB in 60 calls and rising without this; with these
    steps +117 MB in 100 calls, the growth slowing as the ~40 shapes fill in; unbounded prompt
    lengths would otherwise grow a server's or trainer's memory for hours."""
    if n <= ROWS_EXACT:
        return n
    step = 2 ** ((n - 1).bit_length() - 4)  # 1/16 of the power of two >= n: >= 8 for n > 64
    return -(-n // step) * step


class Linear:
    """``y = x W^T + b`` for x (n, in). The weight is prepacked once for oneDNN, which runs the
    (64 x 576) @ (576 x 49152) lm_head about 1.7x faster than ``F.linear`` (MKL) in fp32 on an AVX2
    CPU, and in bf16 on an AVX512-BF16 CPU 1.2x faster at batch 64, 1.5-2x at batch 1, with
    bit-identical results (microbenchmarks, 1 thread); a torch without the op uses ``F.linear``.

    Args:
        weight: (out, in); bias: (out,) or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias, self.packed = weight, bias, None
        if weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except (AttributeError, RuntimeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        n = x.shape[0]
        rows = padded_rows(n)
        if rows != n:  # a bounded set of shapes: oneDNN keeps a primitive (MBs) per input shape
            x = F.pad(x, (0, 0, 0, rows - n))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:n]


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
        self.scale = self.head_dim**-0.5  # HF LlamaAttention.scaling
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.max_position_embeddings
        # Decode attention over each slot's own positions and the elementwise steps in C
        # (r1kit/rollout/native.py) where the kernels are built with AVX-512, else torch ops.
        self.native = native.available(self.compute, self.head_dim)
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

    def new_cache(self, slots: int, length: int, whole: bool = False) -> SlotCache:
        """A growable cache of up to ``length`` positions, starting at one ``CACHE_BLOCK``; with
        ``whole`` on the C-kernel path, all ``length`` positions at once: its decode attention reads
        each slot's own positions only, so a longer cache costs nothing per step, and growing a
        64-slot cache 64 -> 128 -> ... -> 286 positions (allocate, zero, copy) took 0.3 s of a 13 s
        batch-64 rollout. The torch path keeps growing it: its attention reads every position held."""
        grows = not (whole and self.native)
        shape = (self.n_layers, slots, self.n_kv, min(length, CACHE_BLOCK) if grows else length, self.head_dim)
        # Zeroed on both paths: the torch path's masked matmuls meet every position, and a cache read
        # whole (copied, compared) must not hold uninitialized NaN.
        return SlotCache([torch.zeros(shape, dtype=self.compute), torch.zeros(shape, dtype=self.compute)],
                         position_dim=3, limit=length, grows=grows)

    # The layer's elementwise steps: one C pass each where the kernels are on (native.py), else torch
    # ops with the same roundings.
    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm(x + delta) * weight) for x, delta (n, D); delta None: no add."""
        if self.native:
            return x, native.add_rms_norm(x, delta, weight, self.eps)  # x updated in place
        x = x if delta is None else x + delta
        return x, rms_norm(x, weight, self.eps)

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up of gate_up (n, 2F) -> (n, F)."""
        if self.native:
            return native.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rope_store(self, qkv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k of qkv (n, H+2K, d), each token at its position (torch path: cos, sin (n, 1, d)
        already gathered), and write k and v to the layer's cache (S, K, T, d) at [slot, :, position];
        returns q (n, H, d) and k (n, K, d)."""
        H = self.n_heads
        if self.native:
            return native.rope_store(qkv, self.cos, self.sin, slots, positions, keys, values)
        qk = rotate(qkv[:, : H + self.n_kv], cos, sin)
        keys[slots, :, positions] = qk[:, H:]
        values[slots, :, positions] = qkv[:, H + self.n_kv :]
        return qk[:, :H], qk[:, H:]

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: SlotCache, slots: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        chunks = Chunks(tokens, lengths, slots, torch.full_like(lengths, start))
        return self.forward(cache, chunks=chunks)[1]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache, span: int,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(cache, tokens, positions, span, rows)[0]

    def forward(self, cache: SlotCache, tokens: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                span: int = 0, rows: torch.Tensor | None = None,
                chunks: Chunks | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w = 0 if tokens is None else tokens.shape[0]
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        G = H // K
        needed = span if chunks is None else max(span, int((chunks.starts + chunks.lengths).max()))
        # With decode rows, span covers every live position (a prefilling slot rides at its last prompt
        # position): every position >= needed is dead and the cache shrinks after long sequences.
        cache.fit(needed, shrink=w > 0)
        keys, values = cache.tensors
        x = []
        # Tokens whose k and v go to the cache, as (rows, slots, positions, cos, sin): the decode rows
        # first, then the prompt chunks (a prefilling slot's dummy decode row writes its last prompt
        # position, which the chunk then overwrites); cos/sin gathered once for the torch path.
        groups = []
        if w:
            T = cache.positions
            if not self.native:
                hidden = torch.arange(T)[None] > positions[:, None]  # (w, T): positions a slot does not see
                bias = torch.zeros(w, 1, 1, T, dtype=self.compute).masked_fill_(hidden[:, None, None], float("-inf"))
                bias = bias.expand(w, K, G, T).reshape(w * K, G, T)  # 0 or -inf, exact in bf16
            else:
                lengths = positions + 1  # (w,): a slot sees its positions 0..pos
            groups.append((slice(0, w), torch.arange(w), positions))
            x.append(self.embed[tokens])  # (w, D)
        if chunks is not None:
            # Prompt tokens run packed (no padding): projections and MLP on all of them at once,
            # attention prompt by prompt (on right-padded (u, s) grids the CPU kernels spent half their
            # time on pads: 2.6x slower for GSM8K chat prompts of 32-134 tokens).
            s = chunks.tokens.shape[1]
            lens, starts = chunks.lengths.tolist(), chunks.starts.tolist()
            ends = chunks.lengths.cumsum(0).tolist()
            real = (torch.arange(s)[None] < chunks.lengths[:, None]).flatten().nonzero()[:, 0]  # (n,) into u*s
            chunk_pos = chunks.starts[real // s] + real % s  # (n,) cache position of each token
            groups.append((slice(w, None), chunks.slots[real // s], chunk_pos))
            if self.native:  # token i of a chunk at start sees its slot's positions <= start + i
                chunk_slots, chunk_lengths = groups[-1][1], chunk_pos + 1
            else:  # the same as (bottom-right causal) masks, prompt by prompt
                visible = [torch.arange(a + n)[None] <= torch.arange(n)[:, None] + a if a else None
                           for a, n in zip(starts, lens)]
            x.append(self.embed[chunks.tokens.flatten()[real]])  # (n, D)
        if not self.native:
            groups = [(rows, slots, pos, self.cos[pos][:, None], self.sin[pos][:, None]) for rows, slots, pos in groups]
        else:
            groups = [(rows, slots, pos, None, None) for rows, slots, pos in groups]
        x = torch.cat(x) if len(x) > 1 else x[0]  # (w + n, D)
        x, h = self._add_norm(x, None, self.layers[0].attn_norm)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(h).view(-1, H + 2 * K, d)
            rotated = [self._rope_store(qkv[rows], slots, pos, cos, sin, keys[i], values[i])
                       for rows, slots, pos, cos, sin in groups]  # [(q (., H, d), k (., K, d))] per group
            parts = []
            if w and self.native:
                q = rotated[0][0].view(w, K, G, d)
                parts.append(native.cache_attention(q, keys[i], values[i], lengths, self.scale).view(w, H * d))
            elif w:
                # The G query heads sharing a KV head ride as G query rows of that head, against the
                # contiguous (w·K, T, d) cache block: two batched matmuls (the CPU flash kernel of
                # scaled_dot_product_attention was 2-3x slower on these (G x d)(d x T) blocks, a strided
                # [:span] slice 3-5x slower in bf16). Softmax in fp32 (HF eager attention's softmax
                # dtype); in bf16 the scores are rounded to bf16 first, as in HF eager attention.
                q = rotated[0][0].reshape(w * K, G, d)
                scores = torch.baddbmm(bias, q, keys[i, :w].view(w * K, T, d).transpose(1, 2), alpha=self.scale)
                probs = torch.softmax(scores, -1, dtype=torch.float32).to(x.dtype)  # (w·K, G, T)
                parts.append(torch.bmm(probs, values[i, :w].view(w * K, T, d)).view(w, H * d))  # (w, H*d)
            if chunks is not None and self.native:
                qc = rotated[-1][0].view(-1, K, G, d)
                parts.append(native.cache_attention(qc, keys[i], values[i], chunk_lengths, self.scale, chunk_slots, False)
                             .view(-1, H * d))
            elif chunks is not None:
                qc, kc = rotated[-1]
                for row, (length, end, a) in enumerate(zip(lens, ends, starts)):
                    q = qc[end - length : end].transpose(0, 1)[None]  # (1, H, length, d)
                    if a:  # earlier positions are in the cache: attend over the slot's first a+length
                        slot = chunks.slots[row]
                        k = keys[i, slot, :, : a + length][None]  # (1, K, a+length, d)
                        v = values[i, slot, :, : a + length][None]
                        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[row], enable_gqa=True)
                    else:
                        k = kc[end - length : end].transpose(0, 1)[None]  # (1, K, length, d)
                        v = qkv[w + end - length : w + end, H + K :].transpose(0, 1)[None]
                        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    parts.append(attn[0].transpose(0, 1).reshape(length, H * d))
            # (w + n, H*d) -> (w + n, D), then the MLP; h is the next layer's (or the final) norm of x.
            x, h = self._add_norm(x, layer.o(torch.cat(parts) if len(parts) > 1 else parts[0]), layer.mlp_norm)
            after = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.final_norm
            x, h = self._add_norm(x, layer.down(self._act(layer.gate_up(h))), after)
        picked = []  # rows whose logits are asked for: decode rows, then each chunk's last token
        if w:
            picked.append(torch.arange(w) if rows is None else rows)
        if chunks is not None:
            picked.append(w + chunks.lengths.cumsum(0) - 1)
        r = len(picked[0]) if w else 0
        if not (w and chunks is None and r == w):
            h = h[torch.cat(picked) if len(picked) > 1 else picked[0]]
        logits = self.lm_head(h).float()  # (r + chunks, V)
        return (logits[:r] if w else None), (logits[r:] if chunks is not None else None)

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
        # One fused softmax pass gives the draw's weights and (its log at the token) the logprob, to
        # fp32 rounding of the probability (relative 6e-8); the written-out max/sub/exp/sum passes
        # took 4x as long at 64 x 49152.
        probs = native.softmax_rows(scaled.contiguous()) if native.enabled() else scaled.softmax(-1)
        tokens = draw(probs, generator)
        return tokens, probs.gather(1, tokens[:, None])[:, 0].log()
    logp = scaled.log_softmax(-1)
    ids, weights = truncated_candidates(logp, params.top_k, params.top_p)
    tokens = ids.gather(1, draw(weights, generator)[:, None])[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``weights`` (b, V) >= 0 with probability proportional to the weight,
    by inverting the CDF with one uniform per row. ``torch.multinomial`` draws an exponential per
    vocabulary entry instead (b·V random numbers, ~150 ms for 64 x 49152 on this CPU).

    The CDF is inverted in two levels, over the sums of ``DRAW_BLOCK``-entry blocks and then inside
    the chosen block, so the one full (b, V) pass is a vectorized sum instead of a sequential
    cumsum (a full cumsum took 5% of a batch-64 decode step). The point searched for is kept inside
    [0, mass) at both levels, so a zero-weight entry is never drawn."""
    b, vocab = weights.shape
    blocks = -(-vocab // DRAW_BLOCK)
    padded = weights if blocks * DRAW_BLOCK == vocab else F.pad(weights, (0, blocks * DRAW_BLOCK - vocab))
    grid = padded.reshape(b, blocks, DRAW_BLOCK)
    sums = grid.sum(-1)  # (b, blocks)
    cdf = sums.cumsum(-1)  # (b, blocks)
    total = cdf[:, -1:]
    u = torch.rand(b, 1, generator=generator) * total  # (b, 1), in [0, total)
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=blocks - 1)  # (b, 1)
    inner = grid[torch.arange(b), block[:, 0]].cumsum(-1)  # (b, DRAW_BLOCK)
    last = inner[:, -1:]
    rest = (u - (cdf.gather(1, block) - sums.gather(1, block))).clamp_(min=0)
    rest = torch.minimum(rest, last.nextafter(torch.zeros_like(last)))
    within = torch.searchsorted(inner, rest, right=True).clamp_(max=DRAW_BLOCK - 1)
    return (block * DRAW_BLOCK + within)[:, 0].clamp_(max=vocab - 1)


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

    Two ways in, one scheduler (``Scheduler``) under both:

    * ``generate(prompt_ids, params)``: the batch call of RL, evaluation and distillation. Prompt i's
      n completions are sequences i·n .. i·n+n-1 of one scheduler sized for the call.
    * the request API of the server: ``add_request`` (own ``SamplingParams``, own seed), ``step``
      (one prefill of newly admitted requests or one decode step for every slot in use; returns the
      per-sequence token deltas), ``abort`` (frees the slots at once). New requests join the running
      batch between decode steps. The serving scheduler has ``max_batch`` slots of
      ``max_model_len`` positions, allocated on the first request (or by ``open_requests``).

    Args:
        model: an HF causal LM whose ``config.model_type`` has an adapter (``register_adapter``;
            "llama" is built in). Its weights are copied; call ``update_weights`` after training.
        tokenizer_or_eos_ids: a tokenizer (EOS ids and stop strings) or a list of EOS ids (stop
            strings then unsupported). Pass ``[]`` to never stop on EOS (benchmarks).
        dtype: weight precision; "auto" = bf16 where the CPU has native bf16 matmuls (or CUDA is
            present: ``r1kit.models.loading.resolve_dtype``), else fp32.
            Matmuls and the cache run in ``compute_dtype(dtype)`` (bf16 only where native).
        max_batch: cache slots, i.e. sequences decoded together.
        max_cache_bytes: KV-cache budget in bytes (default: half the available memory).
        max_model_len: positions per slot (prompt + completion) of the request API's cache
            (default: the model's context).
        max_num_batched_tokens: the request API's chunked prefill: tokens per step, decodes
            included (vLLM's setting of that name), so prompts are prefilled in chunks of at most
            this minus the running decodes; None = whole prompts in a step of their own. ``generate``
            always prefills whole prompts (the throughput case).

    Raises:
        ConfigError: no adapter for the model type, a bad dtype, max_batch < 1, a max_model_len
            outside [2, the model's context] or a max_num_batched_tokens below max_batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer_or_eos_ids,
        dtype: torch.dtype | str = "auto",
        max_batch: int = 64,
        max_cache_bytes: int | None = None,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
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
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"dtype must be 'auto', float32 or bfloat16, got {dtype!r}")
        self.compute_dtype = compute_dtype(self.dtype)
        self.adapter = ADAPTERS[model_type](model, self.dtype)
        self.eos_ids, self.tokenizer = eos_ids_of(model, tokenizer_or_eos_ids)
        self.max_batch = max_batch
        self.max_cache_bytes = max_cache_bytes
        context = self.adapter.max_context
        self.max_model_len = context if max_model_len is None else max_model_len
        if not 2 <= self.max_model_len <= context:
            raise ConfigError(f"max_model_len must be in [2, {context}] (the model's context), got {max_model_len}")
        if max_num_batched_tokens is not None and max_num_batched_tokens < max_batch:
            raise ConfigError(f"max_num_batched_tokens must be >= max_batch ({max_batch}) so a step can decode "
                              f"every slot and still prefill, got {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.live: Scheduler | None = None

    @property
    def compute_path(self) -> str:
        """Which path the engine computes on: "C kernels" (``native.py``), or "torch ops: C kernels
        <why not>" (``native.status()``, or the dtype/head_dim they do not take)."""
        if getattr(self.adapter, "native", False):
            return "C kernels"
        return f"torch ops: C kernels {native.status()}" if not native.enabled() else \
            f"torch ops: C kernels on, not for {self.compute_dtype} with head_dim {self.adapter.head_dim}"

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current weights into the engine."""
        self.adapter.load(model)

    def _check_prompt(self, i: int, prompt: Sequence[int], context: int) -> None:
        if not 0 < len(prompt) < context:
            raise ConfigError(
                f"prompt {i} has {len(prompt)} tokens; it must have 1 to {context - 1} "
                f"(the model's context is {context}): shorten or drop it"
            )
        if min(prompt) < 0 or max(prompt) >= self.adapter.vocab_size:
            raise ConfigError(f"prompt {i} has a token id outside [0, {self.adapter.vocab_size})")

    def _check_budget(self, slots: int, length: int) -> None:
        need = self.adapter.cache_bytes(slots, length)
        budget = self.max_cache_bytes if self.max_cache_bytes is not None else available_memory_bytes() // 2
        if need > budget:
            raise ConfigError(
                f"the KV cache needs {need} bytes ({need / 2**30:.2f} GiB) for {slots} slots x {length} "
                f"positions, over the budget of {budget} bytes; lower max_batch or max_tokens, "
                "or raise max_cache_bytes"
            )

    def _check(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> tuple[int, int]:
        """Validate a ``generate`` call before any work; returns (slots, cache length)."""
        params.validate()
        if not prompt_ids:
            raise ConfigError("prompt_ids is empty: pass at least one prompt")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer: build the Engine with one instead of EOS ids")
        context = self.adapter.max_context
        for i, p in enumerate(prompt_ids):
            self._check_prompt(i, p, context)
        slots = min(self.max_batch, len(prompt_ids) * params.n)
        length = min(max(len(p) for p in prompt_ids) + params.max_tokens, context)
        self._check_budget(slots, length)
        return slots, length

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                 on_finished: Callable[[dict[int, list[Completion]]], None] | None = None) -> list[Completion]:
        """Sample ``params.n`` completions per prompt; returns them prompt-major (i·n + j).

        All sequences share one sampler generator (seeded by ``params.seed``) and are sampled in one
        draw per step, so the result depends on the seed and the prompts only. ``on_finished``, when
        given, is called after each step that finished prompts, with {prompt index: its n completions}
        (evaluation writes its records as they come; it does not change what is sampled).

        Raises ConfigError (before any work) for invalid params, an empty or too long prompt, stop
        strings without a tokenizer, or a KV cache over the memory budget.
        """
        slots, length = self._check(prompt_ids, params)
        scheduler = Scheduler(self, slots, length, whole=True)  # a fixed batch: its cache at full length
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        stops = StopChecker(self.tokenizer, params.stop) if params.stop else None
        requests = [scheduler.add(Request(i, list(p), params, generator, stops, self.eos_ids))
                    for i, p in enumerate(prompt_ids)]
        def done(r: Request) -> list[Completion]:
            return [Completion(s.token_ids, s.logprobs, s.finish_reason, r.request_id) for s in r.sequences]

        reported: set[int] = set()
        while scheduler.has_unfinished():
            scheduler.step()
            if on_finished is not None:
                finished = {r.request_id: done(r) for r in requests
                            if not r.unfinished and r.request_id not in reported}
                if finished:
                    reported.update(finished)
                    on_finished(finished)
        return [c for r in requests for c in done(r)]

    # The request API (the server's engine loop). Not thread-safe: one thread drives it.

    def open_requests(self) -> Scheduler:
        """The serving scheduler (``max_batch`` slots x ``max_model_len`` positions), allocated on the
        first call. Raises ConfigError when that cache is over the memory budget."""
        if self.live is None:
            self._check_budget(self.max_batch, self.max_model_len)
            self.live = Scheduler(self, self.max_batch, self.max_model_len, self.max_num_batched_tokens)
        return self.live

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0) -> None:
        """Raise ConfigError naming the field when ``add_request`` would refuse the request: invalid
        params, a prompt that is empty, has an id outside the vocabulary or leaves no room in
        ``max_model_len``, stop strings without a tokenizer, top_logprobs < 0. Reads configuration
        only, so another thread may call it."""
        params.validate()
        if top_logprobs < 0:
            raise ConfigError(f"top_logprobs must be >= 0, got {top_logprobs}")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer: build the Engine with one instead of EOS ids")
        self._check_prompt(0, prompt_ids, self.max_model_len)

    @torch.inference_mode()
    def add_request(self, request_id, prompt_ids: Sequence[int], params: SamplingParams,
                    top_logprobs: int = 0) -> None:
        """Queue ``params.n`` sequences of ``prompt_ids`` under ``request_id`` (unique among the
        unfinished requests), sampled with their own generator when ``params.seed`` is set.
        ``top_logprobs`` > 0 adds that many most likely (id, logprob) pairs to each delta.

        Raises ConfigError as ``check_request``, or for a request_id already in use.
        """
        self.check_request(prompt_ids, params, top_logprobs)
        scheduler = self.open_requests()
        if request_id in scheduler.requests:
            raise ConfigError(f"request_id {request_id!r} is already in use")
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        stops = StopChecker(self.tokenizer, params.stop) if params.stop else None
        scheduler.add(Request(request_id, list(prompt_ids), params, generator, stops, self.eos_ids, top_logprobs))

    @torch.inference_mode()
    def step(self) -> list[SequenceDelta]:
        """One scheduler step of the serving requests (see ``Scheduler.step``); [] when idle."""
        return self.live.step() if self.live is not None and self.live.has_unfinished() else []

    @torch.inference_mode()
    def abort(self, request_id, index: int | None = None) -> bool:
        """Stop sequence ``index`` of ``request_id`` (all of them when None) and free their slots now.
        Returns False when the request is not (or no longer) known."""
        return self.live is not None and self.live.abort(request_id, index)

    def has_unfinished(self) -> bool:
        """True while a serving request waits or decodes."""
        return self.live is not None and self.live.has_unfinished()

    def stats(self) -> dict:
        """Serving counters: slots_total, slots_in_use, waiting and prefilling (sequences), requests, steps."""
        live = self.live
        if live is None:
            return {"slots_total": self.max_batch, "slots_in_use": 0, "waiting": 0, "prefilling": 0, "requests": 0,
                    "steps": 0}
        return live.stats()


@dataclass(slots=True)
class SequenceDelta:
    """What one step added to one sequence.

    Attributes:
        request_id: the request it belongs to.
        index: the sequence's index in its request (the choice index, 0..n-1).
        token_ids: new token ids (one per step).
        logprobs: their sampling logprobs (nats, as ``Completion.logprobs``).
        top_logprobs: per new token, the request's top_logprobs most likely (id, logprob) pairs of the
            same distribution, most likely first; None when not asked for.
        finish_reason: None while generating, else "stop" (EOS, stop token or stop string) or
            "length" (max_tokens or the end of the cache).
    """

    request_id: object
    index: int
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None


@dataclass(eq=False)
class SequenceState:
    """One completion of a request: its tokens so far and the cache slot it holds (-1 = none)."""

    request: Request
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int = -1
    job: PrefillJob | None = None  # set while its prompt is being prefilled in chunks


@dataclass(eq=False)
class PrefillJob:
    """A prompt prefilled chunk by chunk (chunked prefill): ``done`` of its tokens are in the cache slot
    of ``seqs[0]`` (its home); the request's sequences ``seqs`` hold reserved slots, which get a copy of
    the home slot when the last chunk is in."""

    request: Request
    seqs: list[SequenceState]
    done: int = 0  # prompt tokens already in the home slot's cache


class Request:
    """A prompt, its sampling settings and its ``params.n`` sequences.

    Sequences of requests with equal temperature/top_k/top_p, the same generator (or none) and the
    same top_logprobs are sampled together, in one draw per step.
    """

    def __init__(self, request_id, prompt_ids: list[int], params: SamplingParams, generator: torch.Generator | None,
                 stops: StopChecker | None, eos_ids: Sequence[int], top_logprobs: int = 0) -> None:
        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.generator, self.stops, self.top_logprobs = generator, stops, top_logprobs
        self.stop_ids = set(eos_ids) | set(params.stop_token_ids)
        self.sequences = [SequenceState(self, j) for j in range(params.n)]
        self.unfinished = params.n
        self.key = (params.temperature, params.top_k, params.top_p, None if generator is None else id(generator),
                    top_logprobs)


class Scheduler:
    """Cache slots and the queue of sequences waiting for one.

    Without a token budget (``max_num_batched_tokens`` None), each step either admits waiting sequences
    into free slots (their prompts are prefilled whole, once per request, and the cache copied to the
    slots of its other sequences; a prefix shared by the admitted prompts is prefilled once) or decodes
    one token for every slot in use. With a budget B (chunked prefill, vLLM's
    ``max_num_batched_tokens``), each step gives waiting sequences free slots and then, in ONE model
    call (``ModelAdapter.forward``), decodes one token for every decoding sequence (w tokens) and
    prefills at most B - w prompt tokens, first come first served, so a long prompt (or many new ones)
    makes each running decode step longer by one bounded chunk instead of stalling it for the whole
    prefill, and the chunk shares the step's weight reads; a prompt's first token is sampled when its
    last chunk is in. A finished or aborted sequence frees
    its slot at once; when nothing waits or prefills and half the slots are idle, the busy ones are
    compacted to the front so the tail decodes narrow.

    Args:
        engine: the engine whose adapter, EOS ids and tokenizer it uses.
        slots: cache slots S; length: cache positions T per slot (prompt + completion).
        max_num_batched_tokens: tokens (decoded + prefilled) per step, >= S; None = prefill whole prompts.
        whole: the sequences will fill about ``length`` (a ``generate`` batch): see ``new_cache``.
    """

    def __init__(self, engine: Engine, slots: int, length: int, max_num_batched_tokens: int | None = None,
                 whole: bool = False) -> None:
        self.adapter = engine.adapter
        self.length = length
        self.budget = max_num_batched_tokens
        self.jobs: list[PrefillJob] = []  # prompts being prefilled in chunks, in arrival order
        self.cache = self.adapter.new_cache(slots, length, whole)
        self.requests: dict[object, Request] = {}
        self.waiting: deque[SequenceState] = deque()
        self.seq: list[SequenceState | None] = [None] * slots  # sequence held by each slot
        self.width = 0  # slots [0, width) are decoded each step
        self.last = torch.zeros(slots, dtype=torch.long)  # last sampled token per slot
        self.pos = torch.zeros(slots, dtype=torch.long)  # cache position the last token goes to
        self.steps = 0
        self.out: list[SequenceDelta] = []

    def add(self, request: Request) -> Request:
        """Queue the request's sequences behind those already waiting."""
        self.requests[request.request_id] = request
        self.waiting.extend(request.sequences)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or self.width > 0

    def stats(self) -> dict:
        return {"slots_total": len(self.seq), "slots_in_use": sum(s is not None for s in self.seq),
                "waiting": len(self.waiting), "prefilling": sum(len(j.seqs) for j in self.jobs),
                "requests": len(self.requests), "steps": self.steps}

    def step(self) -> list[SequenceDelta]:
        """Admit or decode once (with a token budget: decode, then prefill a bounded chunk); returns
        the deltas of every sequence that got a token."""
        self.out = []
        if self.budget is not None:
            decoding = sum(q is not None and q.job is None for q in self.seq[: self.width])
            if decoding:
                self._compact()
            budget = self.budget - decoding
            self._forward(decoding > 0, self._plan_chunks(budget - self._reserve(budget)))
        elif self.waiting and None in self.seq:
            self._admit()
        elif self.width:
            self._compact()
            self._forward(True, [])
        self.steps += 1
        return self.out

    def abort(self, request_id, index: int | None = None) -> bool:
        """Finish the request's unfinished sequences (only ``index`` when given) with "abort", freeing
        their slots and queue places; returns False for an unknown request."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        for seq in request.sequences:
            if seq.finish_reason is not None or (index is not None and seq.index != index):
                continue
            if seq.slot >= 0:
                if seq.job is not None:
                    self._leave_job(seq)
                self._finish(seq.slot, "abort")
            else:
                self.waiting.remove(seq)
                self._retire(seq, "abort")
        return True

    def _admit(self) -> None:
        """Prefill the prompts of waiting sequences into free slots and sample their first token."""
        free = [s for s, q in enumerate(self.seq) if q is None][: len(self.waiting)]
        seqs = [self.waiting.popleft() for _ in free]
        requests = list(dict.fromkeys(q.request for q in seqs))  # in queue order
        home = {r: free[[q.request for q in seqs].index(r)] for r in requests}  # the slot each is prefilled into
        prompts = [r.prompt_ids for r in requests]
        start = self._prefill_shared_prefix(prompts, [home[r] for r in requests])
        tokens, lengths = self._padded(prompts, start)
        logits = self.adapter.prefill(tokens, lengths, self.cache, torch.tensor([home[r] for r in requests]), start)
        copies = [(home[q.request], s) for q, s in zip(seqs, free) if home[q.request] != s]
        if copies:
            src, dst = torch.tensor(copies).T
            self.cache.copy_slots(src, dst, max(len(r.prompt_ids) for r in requests))
        for q, s in zip(seqs, free):
            self.seq[s], q.slot, self.pos[s] = q, s, len(q.request.prompt_ids)
        self.width = max(self.width, max(free) + 1)
        rows = torch.tensor([requests.index(q.request) for q in seqs])  # each sequence's prefill row
        self._sample(torch.tensor(free), logits[rows])

    def _reserve(self, budget: int) -> int:
        """Chunked prefill: give waiting sequences free slots and open a ``PrefillJob`` per request
        among them (a prefix shared by the new prompts, if it fits in ``budget``, is prefilled once
        now). Returns the prompt tokens prefilled."""
        free = [s for s, q in enumerate(self.seq) if q is None][: len(self.waiting)]
        if not free:
            return 0
        jobs: dict[Request, PrefillJob] = {}
        for s in free:
            q = self.waiting.popleft()
            q.job = jobs.setdefault(q.request, PrefillJob(q.request, []))
            q.job.seqs.append(q)
            # Until its prompt is in, the slot rides along in decode steps as a dummy row whose write
            # lands on the last prompt position, which the last chunk (or the home copy) overwrites.
            self.seq[s], q.slot, self.pos[s] = q, s, len(q.request.prompt_ids) - 1
        self.width = max(self.width, max(free) + 1)
        self.jobs.extend(jobs.values())
        start = self._prefill_shared_prefix([j.request.prompt_ids for j in jobs.values()],
                                            [j.seqs[0].slot for j in jobs.values()], limit=budget)
        for job in jobs.values():
            job.done = start
        return start

    def _plan_chunks(self, budget: int) -> list[tuple[PrefillJob, int]]:
        """Up to ``budget`` prompt tokens of the open jobs, oldest first: (job, chunk length) pairs."""
        plan = []
        for job in self.jobs:
            if budget <= 0:
                break
            take = min(len(job.request.prompt_ids) - job.done, budget)
            plan.append((job, take))
            budget -= take
        return plan

    def _forward(self, decode: bool, plan: list[tuple[PrefillJob, int]]) -> None:
        """One model call for a decode step of every slot in use (when ``decode``) and the ``plan``'s
        prompt chunks; samples the decoded tokens, then the first token of the jobs whose last chunk
        went in."""
        if not decode and not plan:
            return
        chunks = None
        if plan:
            tokens, lengths = self._padded([j.request.prompt_ids[j.done : j.done + take] for j, take in plan])
            chunks = Chunks(tokens, lengths, torch.tensor([j.seqs[0].slot for j, _ in plan]),
                            torch.tensor([j.done for j, _ in plan]))
        if decode:
            w = self.width
            span = int(self.pos[:w].max()) + 1
            busy = torch.tensor([q is not None and q.job is None for q in self.seq[:w]]).nonzero()[:, 0]
            logits, chunk_logits = self.adapter.forward(self.cache, self.last[:w], self.pos[:w], span, busy, chunks)
            self.pos[busy] += 1  # idle slots stay at position 0
            self._sample(busy, logits)
        else:
            _, chunk_logits = self.adapter.forward(self.cache, chunks=chunks)
        finished: list[tuple[PrefillJob, torch.Tensor]] = []
        for row, (job, take) in enumerate(plan):
            job.done += take
            if job.done == len(job.request.prompt_ids):
                finished.append((job, chunk_logits[row]))
        if not finished:
            return
        # Siblings of a request get its home slot's prompt cache; all start decoding next step.
        copies = [(job.seqs[0].slot, q.slot) for job, _ in finished for q in job.seqs[1:]]
        if copies:
            src, dst = torch.tensor(copies).T
            self.cache.copy_slots(src, dst, max(len(job.request.prompt_ids) for job, _ in finished))
        slots, rows = [], []
        for row, (job, _) in enumerate(finished):
            self.jobs.remove(job)
            for q in job.seqs:
                q.job = None
                self.pos[q.slot] = len(job.request.prompt_ids)
                slots.append(q.slot)
                rows.append(row)
        self._sample(torch.tensor(slots), torch.stack([lg for _, lg in finished])[torch.tensor(rows)])

    def _leave_job(self, q: SequenceState) -> None:
        """Take a sequence that is being prefilled out of its job (abort); the job's partial cache
        moves to the next sequence's slot when ``q`` held it."""
        job, q.job = q.job, None
        if job.seqs[0] is q and len(job.seqs) > 1:
            self.cache.copy_slots(torch.tensor([q.slot]), torch.tensor([job.seqs[1].slot]), len(job.request.prompt_ids))
        job.seqs.remove(q)
        if not job.seqs:
            self.jobs.remove(job)

    def _prefill_shared_prefix(self, ids: list[list[int]], slots: list[int], limit: int | None = None) -> int:
        """Prefill the longest prefix the prompts ``ids`` share (a system prompt, a template's preamble)
        once into the first of their ``slots`` and copy it to the others; returns its length (0 when
        under ``SHARED_PREFIX_MIN`` tokens or over ``limit``). Every prompt keeps at least one token of
        its own, whose logits start its completion."""
        start = min(len(os.path.commonprefix(ids)), min(map(len, ids)) - 1)
        if len(ids) < 2 or start < SHARED_PREFIX_MIN or (limit is not None and start > limit):
            return 0
        self.adapter.prefill(torch.tensor([ids[0][:start]]), torch.tensor([start]), self.cache, torch.tensor(slots[:1]))
        self.cache.copy_slots(torch.tensor(slots[:1] * (len(slots) - 1)), torch.tensor(slots[1:]), start)
        return start

    @staticmethod
    def _padded(prompts: list[list[int]], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (u, s) and lengths (u,) of ``prompts`` from position ``start`` on."""
        lengths = torch.tensor([len(p) - start for p in prompts])
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : lengths[row]] = torch.tensor(p[start:])
        return tokens, lengths

    def _sample(self, slots: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample the next token of the sequences in ``slots`` (n,) from ``logits`` (n, V), one draw per
        group of sequences with the same sampling key, and record them."""
        seqs = [self.seq[s] for s in slots.tolist()]
        groups: dict[tuple, list[int]] = {}
        for row, q in enumerate(seqs):
            groups.setdefault(q.request.key, []).append(row)
        top: list[list[tuple[int, float]] | None] = [None] * len(seqs)
        if len(groups) == 1:  # the batch call: one draw over every row, as a single request
            request = seqs[0].request
            tokens, logp = sample(logits, request.params, request.generator)
            self._top_logprobs(logits, request, range(len(seqs)), top)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long)
            logp = torch.empty(len(seqs), dtype=torch.float32)
            for rows in groups.values():
                request, idx = seqs[rows[0]].request, torch.tensor(rows)
                tokens[idx], logp[idx] = sample(logits[idx], request.params, request.generator)
                self._top_logprobs(logits[idx], request, rows, top)
        self._record(slots, seqs, tokens, logp, top)

    @staticmethod
    def _top_logprobs(logits: torch.Tensor, request: Request, rows, top: list) -> None:
        """Fill ``top[row]`` with the request's top_logprobs (id, logprob) pairs of the distribution its
        sampling logprobs come from (``log_softmax(logits / T)``, T = 1 when greedy)."""
        k = request.top_logprobs
        if not k:
            return
        t = request.params.temperature or 1.0
        values, ids = (logits / t).log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
        for row, v, i in zip(rows, values.tolist(), ids.tolist()):
            top[row] = list(zip(i, v))

    def _record(self, slots: torch.Tensor, seqs: list[SequenceState], tokens: torch.Tensor, logp: torch.Tensor,
                top: list) -> None:
        """Append the sampled tokens (n,) to the sequences in ``slots`` (n,), emit their deltas and
        retire the finished ones."""
        self.last[slots] = tokens
        # A token at position pos makes the sequence pos + 1 long; the cache holds self.length.
        positions = self.pos[slots].tolist()
        for slot, q, token, lp, pos, tops in zip(slots.tolist(), seqs, tokens.tolist(), logp.tolist(), positions, top):
            q.token_ids.append(token)
            q.logprobs.append(lp)
            request = q.request
            stop = token in request.stop_ids or (
                request.stops is not None and request.stops.hit(q.token_ids[-request.stops.window:]))
            full = len(q.token_ids) >= request.params.max_tokens or pos + 1 >= self.length
            reason = "stop" if stop else "length" if full else None
            self.out.append(SequenceDelta(request.request_id, q.index, [token], [lp],
                                          None if tops is None else [tops], reason))
            if reason:
                self._finish(slot, reason)

    def _finish(self, slot: int, reason: str) -> None:
        """Free ``slot`` and retire its sequence."""
        q = self.seq[slot]
        self.seq[slot] = None
        q.slot = -1
        self.pos[slot] = 0  # an idle slot decodes a dummy token at position 0
        while self.width and self.seq[self.width - 1] is None:
            self.width -= 1
        self._retire(q, reason)

    def _retire(self, q: SequenceState, reason: str) -> None:
        q.finish_reason = reason
        q.request.unfinished -= 1
        if not q.request.unfinished:
            del self.requests[q.request.request_id]

    def _compact(self) -> None:
        """With nothing waiting or prefilling, move busy slots to the front once half of [0, width) is idle."""
        busy = [s for s in range(self.width) if self.seq[s] is not None]
        if self.waiting or self.jobs or 2 * len(busy) > self.width:
            return
        src, dst = torch.tensor(busy), torch.arange(len(busy))
        self.cache.copy_slots(src, dst, int(self.pos[src].max()) + 1)  # positions >= pos are unwritten
        for t in (self.last, self.pos):
            t[dst] = t[src]
        self.seq[: len(busy)] = [self.seq[s] for s in busy]
        self.seq[len(busy) : self.width] = [None] * (self.width - len(busy))
        for s, q in enumerate(self.seq[: len(busy)]):
            q.slot = s
        self.width = len(busy)
