"""DeepSeek-V3 / R1 (and V2-style configs) as one trainable PyTorch model.

Multi-head latent attention (MLA) with decoupled, YaRN-scaled RoPE in interleaved pairs; DeepSeekMoE
with shared experts, group-limited routing and the auxiliary-loss-free router bias; multi-token
prediction (MTP) modules laid out as the released checkpoints. Two attention paths share one set of
weights: ``naive`` (keys/values expanded per head, used for training) and ``absorbed`` (queries mapped
into the 512-dim latent space; the cache holds only the normalised latent and the rotary key,
576 values per token per layer at V3 sizes).

Module and parameter names follow the HF checkpoint layout (``model.layers.{i}.self_attn.kv_b_proj``...)
so a state dict is a checkpoint; ``r1kit.models.v3_io`` maps the official repository's names.

Sources: DeepSeek-V3 technical report (arXiv 2412.19437) §2.1-2.2 Eq. 1-25, §4.2; DeepSeek-V3
``inference/model.py`` (HEAD 9b4e978); transformers ``models/deepseek_v3``; r1kit's
``docs/DEEPSEEK_V3_SPEC.md`` (section numbers cited below as "spec §").

Notation for tensor shapes: b batch, s query length, t key length, d hidden size, h heads,
c kv_lora_rank, r qk_rope_head_dim, n qk_nope_head_dim, v v_head_dim, E routed experts,
K experts per token, T tokens (b·s), V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from r1kit.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

# config.json fields r1kit reads only to refuse other values (spec §8.7 for rope_interleave).
UNSUPPORTED_DEFAULTS = {"hidden_act": "silu", "attention_bias": False, "rope_interleave": True}

# Defaults of the official ``ModelArgs`` (inference/model.py L19-86), the 16B shape.
OFFICIAL_DEFAULTS = {
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
    "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6,
    "n_expert_groups": 1, "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "original_seq_len": 4096, "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
}


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclass
class DeepseekV3Config:
    """Model shape and routing, with the field names of the HF ``config.json`` (V3, R1, V2-Lite).

    Construction validates the MoE and head dimensions and raises ``ConfigError`` naming the fields.
    ``from_dict`` ignores keys it does not know (``architectures``, ``ep_size``...), so a released
    ``config.json`` loads as is.
    """

    vocab_size: int = 129280  # tokens
    hidden_size: int = 7168  # d
    intermediate_size: int = 18432  # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of each routed / shared expert
    num_hidden_layers: int = 61  # main decoder layers (MTP layers come after them)
    num_attention_heads: int = 128  # h
    n_shared_experts: int = 1  # fused into one SwiGLU of width n_shared·moe_intermediate_size
    n_routed_experts: int = 256  # E
    num_experts_per_tok: int = 8  # K
    n_group: int = 8  # expert groups (nodes) for group-limited routing
    topk_group: int = 4  # groups a token may route to
    routed_scaling_factor: float = 2.5  # multiplies the routed weights (official route_scale)
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3, bias), "group_limited_greedy" (V2), "greedy"
    norm_topk_prob: bool = True  # renormalise the K gathered weights to sum 1
    first_k_dense_replace: int = 3  # layers [0, k) use a dense MLP
    moe_layer_freq: int = 1  # layer i >= k is MoE iff i % freq == 0
    q_lora_rank: int | None = 1536  # None (or 0): a single q_proj
    kv_lora_rank: int = 512  # c
    qk_nope_head_dim: int = 128  # n
    qk_rope_head_dim: int = 64  # r, rotary part shared by all heads on the key side
    v_head_dim: int = 128  # v
    rope_theta: float = 10000.0  # RoPE base θ
    rope_scaling: dict | None = None  # YaRN: factor, original_max_position_embeddings, beta_fast/slow, mscale(_all_dim)
    max_position_embeddings: int = 163840  # tokens
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1  # MTP depth D
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006  # init std (V3 report §4.2)
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    aux_loss_alpha: float = 0.0001  # α of the sequence-wise balance loss (report Eq. 17-20)
    bias_update_speed: float = 0.001  # γ of the aux-loss-free bias update (report §2.1.2); r1kit field
    mtp_loss_weight: float = 0.3  # λ of the MTP loss (report Eq. 25); r1kit field
    num_key_value_heads: int | None = None  # checked: MLA has one key/value per head
    qk_head_dim: int | None = None  # checked: must be qk_nope_head_dim + qk_rope_head_dim
    head_dim: int | None = None  # checked: transformers sets it to qk_rope_head_dim
    quantization_config: dict | None = None  # FP8 checkpoints: {"quant_method": "fp8", "weight_block_size": [128, 128]}

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        self._check_heads()
        self._check_moe()
        self._check_rope()

    def _check_heads(self) -> None:
        derived = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.qk_head_dim is not None and self.qk_head_dim != derived:
            raise ConfigError(
                f"qk_head_dim={self.qk_head_dim} but qk_nope_head_dim + qk_rope_head_dim = "
                f"{self.qk_nope_head_dim} + {self.qk_rope_head_dim} = {derived}; fix one of them"
            )
        if self.head_dim is not None and self.head_dim != self.qk_rope_head_dim:
            raise ConfigError(f"head_dim={self.head_dim} must equal qk_rope_head_dim={self.qk_rope_head_dim}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
                f"{self.num_attention_heads} (MLA expands one key/value per head)"
            )
        for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    def _check_moe(self) -> None:
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func={self.scoring_func!r}: use 'sigmoid' (V3) or 'softmax' (V2)")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            raise ConfigError(
                f"topk_method={self.topk_method!r}: use 'noaux_tc', 'group_limited_greedy' or 'greedy'"
            )
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}; "
                "pick n_group dividing the expert count"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        allowed = per_group * (self.topk_group if self.topk_method != "greedy" else self.n_group)
        if not 1 <= self.num_experts_per_tok <= allowed:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {allowed} experts that "
                f"topk_group={self.topk_group} groups of n_routed_experts/n_group={per_group} hold"
            )
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            raise ConfigError(
                f"topk_method='noaux_tc' scores a group by its top-2 experts; n_routed_experts/n_group="
                f"{per_group} must be at least 2"
            )

    def _check_rope(self) -> None:
        if self.rope_scaling is None:
            return
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if kind != "yarn":
            raise ConfigError(f"rope_scaling type {kind!r} is not supported; DeepSeek configs use 'yarn'")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in self.rope_scaling:
                raise ConfigError(f"rope_scaling.{key} is missing (YaRN needs it)")

    @property
    def qk_dim(self) -> int:
        """Per-head query/key width n + r (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (MTP layers included) uses DeepSeekMoE (spec §3.7)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeepseekV3Config:
        """Build from a ``config.json`` dict; transformers' ``rope_parameters`` is read as rope_theta +
        rope_scaling. Unknown keys are ignored; hidden_act other than silu, attention_bias true or
        rope_interleave false raise ConfigError."""
        raw = dict(raw)
        unsupported = {k: raw[k] for k, ok in UNSUPPORTED_DEFAULTS.items() if k in raw and raw[k] != ok}
        if unsupported:
            raise ConfigError(f"config fields {unsupported} are not supported; r1kit's DeepSeek-V3 needs {UNSUPPORTED_DEFAULTS}")
        rope = raw.pop("rope_parameters", None)
        if rope is not None:
            raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raw.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_model_args(cls, args: dict[str, Any]) -> DeepseekV3Config:
        """Build from the official ``ModelArgs`` JSON (``inference/configs/config_671B.json``; spec §0).

        Missing keys take ModelArgs' defaults (the 16B shape). The router bias exists iff dim == 7168
        and weights are renormalised iff sigmoid scoring, as in the official code (spec §8.5-8.6);
        the official checkpoints carry no MTP layer (convert.py skips it).
        """
        a = {**OFFICIAL_DEFAULTS, **args}
        grouped = "group_limited_greedy" if a["n_expert_groups"] > 1 else "greedy"
        return cls(
            vocab_size=a["vocab_size"], hidden_size=a["dim"], intermediate_size=a["inter_dim"],
            moe_intermediate_size=a["moe_inter_dim"], num_hidden_layers=a["n_layers"],
            first_k_dense_replace=a["n_dense_layers"], num_attention_heads=a["n_heads"],
            n_routed_experts=a["n_routed_experts"], n_shared_experts=a["n_shared_experts"],
            num_experts_per_tok=a["n_activated_experts"], n_group=a["n_expert_groups"],
            topk_group=a["n_limited_groups"], scoring_func=a["score_func"], routed_scaling_factor=a["route_scale"],
            topk_method="noaux_tc" if a["dim"] == 7168 else grouped, norm_topk_prob=a["score_func"] == "sigmoid",
            q_lora_rank=a["q_lora_rank"], kv_lora_rank=a["kv_lora_rank"], qk_nope_head_dim=a["qk_nope_head_dim"],
            qk_rope_head_dim=a["qk_rope_head_dim"], v_head_dim=a["v_head_dim"], rope_theta=a["rope_theta"],
            rope_scaling={
                "type": "yarn", "factor": a["rope_factor"], "original_max_position_embeddings": a["original_seq_len"],
                "beta_fast": a["beta_fast"], "beta_slow": a["beta_slow"], "mscale": a["mscale"],
                "mscale_all_dim": a["mscale"],
            },
            num_nextn_predict_layers=0,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekV3Config:
        """Read a ``config.json`` (or a preset file)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def preset(cls, name: str) -> DeepseekV3Config:
        """A named preset from ``models/presets/<name>.json``: 671b, 16b, tiny-10m, tiny-50m."""
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
            raise ConfigError(f"unknown DeepSeek-V3 preset {name!r}; known presets: {known}")
        return cls.from_json(path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers' ``DeepseekV3ForCausalLM`` reads."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "q_lora_rank"}
        out.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            qk_head_dim=self.qk_dim,
            head_dim=self.qk_rope_head_dim,
            hidden_act="silu",
            rope_interleave=True,
        )
        return out


# ----------------------------------------------------------------------------------------------------
# Norm and rotary embedding
# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (spec §7; transformers' upcast)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim), same dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1·mscale·ln(factor) + 1 (report §4.3; model.py L434-437)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: DeepseekV3Config) -> torch.Tensor:
    """Inverse frequencies (r/2,) fp32 for the decoupled RoPE, YaRN-blended when rope_scaling is set.

    freq_i = θ^(-2i/r); with YaRN, indices below ``low`` keep freq_i, indices above ``high`` use
    freq_i/factor, and a linear ramp blends between (spec §2; model.py L297-375). YaRN is applied
    whenever rope_scaling is set (spec §8.2: the released long-context checkpoints need it).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ys = config.rope_scaling
    if ys is None:
        return freqs
    factor, original = ys["factor"], ys["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(ys.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(ys.get("beta_slow") or 1)), dim - 1)
    span = (high - low) or 1e-3
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


def softmax_scale(config: DeepseekV3Config) -> float:
    """Attention logit scale (n+r)^-0.5, times mscale² under YaRN (spec §1 "Softmax scale").

    The temperature uses ``mscale_all_dim`` (transformers' name for the official single ``mscale``);
    0.13523 for V3.
    """
    scale = config.qk_dim**-0.5
    ys = config.rope_scaling
    if ys is not None and ys.get("mscale_all_dim"):
        scale *= yarn_mscale(ys["factor"], ys["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle θ_i (spec §2, §8.7; model.py L390).

    x (b, s, ..., r); cos, sin (b, s, r/2) broadcast over the middle (head) dims. Returns x's shape
    and dtype; the rotation runs in fp32.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., r/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer pair of cached tensors, grown along the token axis (dim 1).

    Absorbed MLA stores (kv_norm(c) (b, t, c), rotated k_pe (b, t, r)); the naive path stores
    (k (b, t, h, n+r), v (b, t, h, v)). ``absorbed`` says which; a model call must use the path
    its cache was built for.
    """

    def __init__(self, absorbed: bool = True):
        self.absorbed = absorbed
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def seq_len(self) -> int:
        """Tokens cached (0 when empty)."""
        return next(iter(self.layers.values()))[0].shape[1] if self.layers else 0

    def update(self, layer: int, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens of ``layer`` and return the full cached pair."""
        if layer in self.layers:
            old_first, old_second = self.layers[layer]
            first, second = torch.cat([old_first, first], 1), torch.cat([old_second, second], 1)
        self.layers[layer] = (first, second)
        return first, second

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows: row j of the cache becomes old row index[j] (index (m,) int64); a GRPO
        group's completions share their prompt's cached entries this way."""
        self.layers = {i: (a.index_select(0, index), b.index_select(0, index)) for i, (a, b) in self.layers.items()}

    def truncate(self, length: int) -> None:
        """Drop cached tokens from position ``length`` on (speculative decoding rejects drafts)."""
        self.layers = {i: (a[:, :length], b[:, :length]) for i, (a, b) in self.layers.items()}

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values())


# ----------------------------------------------------------------------------------------------------
# Multi-head latent attention
# ----------------------------------------------------------------------------------------------------


class MLA(nn.Module):
    """Multi-head latent attention (report Eq. 1-11; model.py L396-497; spec §1)."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.n, self.r, self.v = (
            config.num_attention_heads,
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        self.c = config.kv_lora_rank
        d, h = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * config.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * config.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.c + self.r, bias=False)
        self.kv_a_layernorm = RMSNorm(self.c, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.c, h * (self.n + self.v), bias=False)
        self.o_proj = nn.Linear(h * self.v, d, bias=False)
        self.scale = softmax_scale(config)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, s, d) -> q_nope (b, s, h, n), rotated q_pe (b, s, h, r)."""
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.unflatten(-1, (self.h, self.n + self.r)).split([self.n, self.r], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, s, d) -> normalised latent kv_norm(c) (b, s, c), rotated shared key k_pe (b, s, r)."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.c, self.r], dim=-1)
        return self.kv_a_layernorm(latent), apply_rope(k_pe, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """x (b, s, d); cos, sin (b, s, r/2); mask (b, 1, s, t) additive, 0 or -inf-like, over the
        t = cached + s keys. ``absorb`` selects the latent-space path. Returns (b, s, d)."""
        q_nope, q_pe = self.queries(x, cos, sin)
        latent, k_pe = self.latents(x, cos, sin)
        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, mask, cache)
        else:
            out = self._naive(q_nope, q_pe, latent, k_pe, mask, cache)
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask, cache) -> torch.Tensor:
        """Expand keys/values per head (model.py L471-479). Returns (b, s, h, v)."""
        k_nope, value = self.kv_b_proj(latent).unflatten(-1, (self.h, self.n + self.v)).split([self.n, self.v], -1)
        key = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.h, -1)], dim=-1)  # (b, s, h, n+r)
        if cache is not None:
            key, value = cache.update(self.layer_idx, key, value)
        query = torch.cat([q_nope, q_pe], dim=-1)  # (b, s, h, n+r)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask.to(query.dtype),
            scale=self.scale,
        )  # (b, h, s, v)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask, cache) -> torch.Tensor:
        """Absorb W_UK into the query and W_UV into the output (model.py L480-496). Returns (b, s, h, v)."""
        if cache is not None:
            latent, k_pe = cache.update(self.layer_idx, latent, k_pe)
        w_kv = self.kv_b_proj.weight.unflatten(0, (self.h, self.n + self.v))  # (h, n+v, c)
        w_uk, w_uv = w_kv[:, : self.n], w_kv[:, self.n :]
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)
        scores = torch.einsum("bshc,btc->bhst", q_latent, latent) + torch.einsum("bshr,btr->bhst", q_pe, k_pe)
        probs = (scores.float() * self.scale + mask).softmax(-1).to(latent.dtype)
        out_latent = torch.einsum("bhst,btc->bshc", probs, latent)
        return torch.einsum("bshc,hvc->bshv", out_latent, w_uv)


# ----------------------------------------------------------------------------------------------------
# DeepSeekMoE
# ----------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) ⊙ up x) (model.py L633)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    """One router decision for T tokens."""

    weights: torch.Tensor  # (T, K) expert weights, gathered from the unbiased scores
    indices: torch.Tensor  # (T, K) int64 chosen experts
    scores: torch.Tensor  # (T, E) unbiased affinities s (sigmoid or softmax)


class Gate(nn.Module):
    """The router (model.py L535-598; spec §3).

    The weight is an ordinary parameter; ``e_score_correction_bias`` (noaux_tc only) is an fp32
    buffer that changes routing but never the weights, and is trained by ``update_router_bias``
    outside autograd.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        """x (T, d) -> Routing. The router runs in fp32 as in transformers (the official code uses bf16
        logits, spec §8.4); fp32 keeps the bias-driven choices stable in training. A float64 model
        routes in float64 (its parity tests compare batches split over ranks to 1e-10)."""
        cfg = self.config
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (T, E)
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            choice = self._limit_groups(choice)
        indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(weights * cfg.routed_scaling_factor, indices, scores)

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group best groups, others at -inf (spec §3.3, §8.1: official uses -inf).

        A group scores the sum of its top-2 biased affinities (noaux_tc) or its max (V2).
        choice (T, E) -> (T, E).
        """
        cfg = self.config
        grouped = choice.unflatten(-1, (cfg.n_group, -1))  # (T, G, E/G)
        if self.e_score_correction_bias is None:
            group_scores = grouped.amax(-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)


class MoE(nn.Module):
    """DeepSeekMoE: y = Σ_k w_k·Expert_k(x) + Shared(x) (report Eq. 12-16; model.py L636-693).

    In training mode with gradients on, every forward adds its routed-token counts to
    ``tokens_per_expert`` (E,) and stores the sequence-wise balance loss in ``balance_loss``;
    ``update_router_bias`` consumes the counts once per optimizer step.

    ``dispatcher`` is None in one process. ``r1kit.models.expert_parallel.shard_experts`` sets it to
    an ``ExpertDispatcher`` that runs the routed experts split over ranks (all-to-all) instead of the
    loop below; the router and the shared expert stay replicated.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None
        self.dispatcher = None
        self.count_tokens = True  # False while activation checkpointing recomputes the block

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, s, d); token_mask (b, s) bool, False at padding (excluded from load and loss).
        Returns (b, s, d)."""
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        routing = self.gate(flat)
        if self.dispatcher is not None:
            out = self.dispatcher(self.experts, flat, routing)
        else:
            out = torch.zeros_like(flat)
            for expert_id in routing.indices.unique().tolist():
                token_idx, slot = torch.where(routing.indices == expert_id)
                expert_out = self.experts[expert_id](flat[token_idx])
                out.index_add_(0, token_idx, (expert_out * routing.weights[token_idx, slot, None]).to(out.dtype))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(flat)
        if self.training and torch.is_grad_enabled():
            self._record(routing, b, token_mask)
        return out.view(b, s, d)

    def _record(self, routing: Routing, b: int, token_mask: torch.Tensor | None) -> None:
        """Accumulate per-expert token counts and compute the sequence-wise balance loss."""
        cfg = self.config
        valid = torch.ones(routing.indices.shape[0], dtype=torch.bool, device=routing.indices.device)
        if token_mask is not None:
            valid = token_mask.reshape(-1).bool()
        chosen = torch.zeros_like(routing.scores).scatter_(1, routing.indices, 1.0) * valid[:, None]  # (T, E)
        if self.count_tokens:
            self.tokens_per_expert += chosen.sum(0).to(self.tokens_per_expert)
        self.balance_loss = sequence_balance_loss(
            routing.scores.unflatten(0, (b, -1)),
            chosen.unflatten(0, (b, -1)),
            valid.view(b, -1),
            cfg.num_experts_per_tok,
        )


def sequence_balance_loss(
    scores: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Σ_i f_i·P_i per sequence, averaged over sequences (report Eq. 17-20); multiply by α outside.

    scores (b, s, E) unbiased affinities; chosen (b, s, E) 1 where expert i is in token t's top-K,
    0 elsewhere and at padding; valid (b, s) bool. f_i = E/(K·T)·Σ_t chosen, P_i = (1/T)·Σ_t s'_{i,t}
    with s' = s / Σ_j s_j. Returns a scalar; gradients flow through P only.
    """
    n_experts = scores.shape[-1]
    tokens = valid.sum(1, keepdim=True).clamp(min=1)  # (b, 1)
    freq = chosen.sum(1) * n_experts / (top_k * tokens)  # (b, E)
    normalised = scores / scores.sum(-1, keepdim=True)
    prob = (normalised * valid[..., None]).sum(1) / tokens  # (b, E)
    return (freq.detach() * prob).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------
# Decoder layers, MTP, model
# ----------------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)) (model.py L733-734)."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, token_mask=None, cache=None, absorb=False) -> torch.Tensor:
        """x (b, s, d) -> (b, s, d); the other arguments as in ``MLA.forward`` and ``MoE.forward``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, absorb)
        normed = self.post_attention_layernorm(x)
        return x + (self.mlp(normed, token_mask) if isinstance(self.mlp, MoE) else self.mlp(normed))


class SharedHead(nn.Module):
    """The MTP module's output norm; its ``head`` is the main model's lm_head (README_WEIGHTS L33-48)."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module k, stored as ``model.layers.{num_hidden_layers + k - 1}``.

    h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), embedding first as vLLM and the released
    checkpoints (spec §5), then a full decoder layer; logits = lm_head(shared_head.norm(h^k)).
    h^0 is the main model's final-normed hidden state, which is what vLLM and SGLang feed the released
    MTP weights. Embedding and head are shared with the main model.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, embeds, hidden, cos, sin, mask, token_mask=None, cache=None, absorb=False) -> torch.Tensor:
        """embeds (b, s, d) of tokens i+k, hidden (b, s, d) of depth k-1 at i -> h^k (b, s, d)."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        return super().forward(x, cos, sin, mask, token_mask, cache, absorb)


class Backbone(nn.Module):
    """Embedding, decoder layers (main then MTP) and final norm; HF prefix ``model.``."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        n_main = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(n_main)]
            + [MTPLayer(config, n_main + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class DeepseekV3Output:
    """What ``DeepseekV3ForCausalLM.forward`` returns."""

    logits: torch.Tensor  # (b, s, V)
    hidden: torch.Tensor  # (b, s, d) final-normed hidden states (the MTP input h^0)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (b, s-k, V), row i predicts t_{i+k+1}
    balance_loss: torch.Tensor | None = None  # Σ over MoE layers of the sequence-wise balance loss (before α)
    cache: KVCache | None = None


@contextlib.contextmanager
def not_counting(layer: nn.Module):
    """While activation checkpointing recomputes ``layer`` in the backward, its MoE adds no expert
    loads (the forward counted them); everything else is recomputed as it was."""
    moes = [m for m in layer.modules() if isinstance(m, MoE)]
    for moe in moes:
        moe.count_tokens = False
    try:
        yield
    finally:
        for moe in moes:
            moe.count_tokens = True


def causal_mask(
    s: int, past: int, attention_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask (b or 1, 1, s, past+s): query j sees keys <= past+j that attention_mask keeps.

    attention_mask (b, past+s) with 1 for real tokens, 0 for padding. Masked entries hold the most
    negative finite value, so a fully padded query row stays finite.
    """
    t = past + s
    allowed = torch.ones(s, t, dtype=torch.bool, device=device).tril(past)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class DeepseekV3ForCausalLM(nn.Module):
    """The DeepSeek-V3 causal LM: ``forward(input_ids (b, s)) -> DeepseekV3Output`` with logits (b, s, V).

    Training forwards (``self.training`` and gradients on) also run the MTP modules and collect the
    balance loss and expert loads; ``pretrain_loss`` combines them. With ``gradient_checkpointing``
    (``activation_checkpointing_enable``) a training forward without a KV cache stores only each main
    decoder block's input and recomputes the block in the backward.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.tie_weights()
        self.reset_parameters()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing per main decoder block (non-reentrant ``torch.utils.checkpoint``);
        transformers' method name and signature, so trainers enable it the same way for every policy.
        A forward with a KV cache is never checkpointed (the recompute would append to the cache again)."""
        if (activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ConfigError("DeepseekV3ForCausalLM checkpoints with use_reentrant=False only")
        self.gradient_checkpointing = True

    def tie_weights(self) -> None:
        """Share the embedding with the head when config.tie_word_embeddings (V3 does not)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute the RoPE frequencies and zero the expert-load counters (after ``to_empty``)."""
        self.inv_freq = rope_frequencies(self.config).to(self.inv_freq.device)
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()

    def cast(self, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
        """Cast parameters to ``dtype``; buffers stay fp32: router biases (spec §3.2), RoPE frequencies
        and expert-load counts. Returns self."""
        buffers = dict(self.named_buffers())
        self.to(dtype)
        for name, buffer in buffers.items():
            owner, _, attr = name.rpartition(".")
            setattr(self.get_submodule(owner), attr, buffer)
        return self

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for linear, embedding and router weights; norms at 1, bias 0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, Gate) and module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()

    @property
    def main_layers(self) -> nn.ModuleList:
        """The num_hidden_layers main decoder layers."""
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        """The num_nextn_predict_layers MTP modules."""
        return self.model.layers[self.config.num_hidden_layers :]

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (b, s) -> cos, sin (b, s, r/2) fp32 (angles t·freq_i, model.py L372-374)."""
        angles = position_ids[..., None].float() * self.inv_freq
        return angles.cos(), angles.sin()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        absorb: bool | None = None,
        run_mtp: bool | None = None,
        logits_to_keep: int = 0,
    ) -> DeepseekV3Output:
        """input_ids (b, s) int64; attention_mask (b, cached+s) 1/0; position_ids (b, s), default
        cached + arange(s). ``cache`` is extended in place; ``absorb`` defaults to the cache's path
        (absorbed when a cache is given, naive otherwise). ``run_mtp`` defaults to training with
        gradients and mtp_loss_weight > 0 (pass False to skip MTP compute, e.g. in GRPO).
        ``logits_to_keep`` > 0 computes logits (b, logits_to_keep, V) of the last positions only."""
        for moe in self.moe_layers():
            moe.balance_loss = None
        absorb = (cache.absorbed if cache is not None else False) if absorb is None else absorb
        if position_ids is None:
            past = cache.seq_len if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin, mask, token_mask = self._attention_inputs(position_ids, attention_mask, cache)
        x = self.model.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.main_layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, token_mask, None, absorb, use_reentrant=False,
                               context_fn=lambda layer=layer: (contextlib.nullcontext(), not_counting(layer)))
            else:
                x = layer(x, cos, sin, mask, token_mask, cache, absorb)
        hidden = self.model.norm(x)
        out = DeepseekV3Output(logits=self.lm_head(hidden[:, -logits_to_keep:]), hidden=hidden, cache=cache)
        if run_mtp is None:
            run_mtp = self.training and torch.is_grad_enabled() and self.config.mtp_loss_weight > 0
        if run_mtp:
            out.mtp_logits = self._mtp_logits(input_ids, hidden, position_ids, attention_mask)
        moe_losses = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        if self.training and torch.is_grad_enabled() and moe_losses:
            out.balance_loss = torch.stack(moe_losses).sum()
        return out

    def _attention_inputs(self, position_ids, attention_mask, cache):
        """cos, sin (b, s, r/2), additive mask (b|1, 1, s, t) and token mask (b, s) | None."""
        s = position_ids.shape[1]
        past = cache.seq_len if cache is not None else 0
        cos, sin = self.rotary(position_ids)
        mask = causal_mask(s, past, attention_mask, torch.float32, position_ids.device)
        token_mask = attention_mask[:, -s:].bool() if attention_mask is not None else None
        return cos, sin, mask, token_mask

    def mtp_step(
        self,
        depth: int,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``depth`` (1-based) at positions p: hidden (b, s, d) is h^{depth-1}_p, next_ids
        (b, s) the tokens t_{p+depth}; position_ids (b, s). Returns (h^depth (b, s, d), logits (b, s, V))
        where logits[:, j] predicts t_{p_j + depth + 1} (report Eq. 21-23)."""
        layer = self.mtp_layers[depth - 1]
        cos, sin, mask, token_mask = self._attention_inputs(position_ids, attention_mask, cache)
        absorb = cache.absorbed if cache is not None else False
        out = layer(self.model.embed_tokens(next_ids), hidden, cos, sin, mask, token_mask, cache, absorb)
        return out, self.lm_head(layer.shared_head.norm(out))

    def _mtp_logits(self, input_ids, hidden, position_ids, attention_mask) -> list[torch.Tensor]:
        """Training MTP: depth k combines h^{k-1}[:, i] with Emb(t_{i+k}) over the first s-k
        positions, where both tokens are real. Returns up to D tensors (b, s-k, V)."""
        logits = []
        for k in range(1, len(self.mtp_layers) + 1):
            n = input_ids.shape[1] - k
            if n <= 0:
                break
            sub_mask = None if attention_mask is None else attention_mask[:, :n] * attention_mask[:, k:]
            hidden, depth_logits = self.mtp_step(k, hidden[:, :n], input_ids[:, k:], position_ids[:, :n], None, sub_mask)
            logits.append(depth_logits)
        return logits

    def moe_layers(self) -> list[MoE]:
        """All MoE feed-forwards, main layers first then MTP layers."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> Path:
        """Write an HF checkpoint directory with ``r1kit.models.v3_io.save_deepseek_v3`` (always
        safetensors). transformers' signature, so r1kit's run directories and checkpoints save this
        model like any HF policy."""
        from r1kit.models.v3_io import save_deepseek_v3

        return save_deepseek_v3(self, path)


# ----------------------------------------------------------------------------------------------------
# Training: losses, aux-loss-free balancing, metrics
# ----------------------------------------------------------------------------------------------------


def pretrain_loss(
    model: DeepseekV3ForCausalLM,
    out: DeepseekV3Output,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Next-token loss + λ·MTP loss + α·balance loss (report Eq. 17, 25), mean over real tokens.

    input_ids (b, s); attention_mask (b, s) or None. Returns a dict with ``loss`` (to backpropagate),
    ``lm``, ``mtp`` and ``balance`` scalars. λ = config.mtp_loss_weight, α = config.aux_loss_alpha.
    """
    cfg = model.config
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lm = shifted_cross_entropy(out.logits, input_ids, mask, offset=1)
    mtp_terms = [shifted_cross_entropy(lg, input_ids, mask, offset=k + 1) for k, lg in enumerate(out.mtp_logits, 1)]
    mtp = torch.stack(mtp_terms).mean() if mtp_terms else lm.new_zeros(())
    balance = out.balance_loss if out.balance_loss is not None else lm.new_zeros(())
    loss = lm + cfg.mtp_loss_weight * mtp + cfg.aux_loss_alpha * balance
    return {"loss": loss, "lm": lm.detach(), "mtp": mtp.detach(), "balance": balance.detach()}


def shifted_cross_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, offset: int
) -> torch.Tensor:
    """Mean CE of logits[:, i] against input_ids[:, i + offset] where both positions are real.

    logits (b, n, V) with n >= s - offset; input_ids, mask (b, s). Returns a scalar (0 if no target).
    """
    s = input_ids.shape[1]
    n = s - offset
    if n <= 0:
        return logits.new_zeros(())
    targets = input_ids[:, offset:]
    keep = (mask[:, offset:] & mask[:, :n]).reshape(-1)
    ce = F.cross_entropy(logits[:, :n].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (ce * keep).sum() / keep.sum().clamp(min=1)


@torch.no_grad()
def update_router_bias(model: DeepseekV3ForCausalLM, gamma: float | None = None) -> dict[str, float]:
    """Aux-loss-free balancing: b_i += γ·sign(mean_load − load_i) per MoE layer, from the token
    counts accumulated since the last call (the whole batch), then reset the counts (report §2.1.2).

    gamma defaults to config.bias_update_speed. Call once per optimizer step, after ``step()``.
    Returns the per-layer load metrics of ``expert_load_metrics`` measured before the reset.
    """
    gamma = model.config.bias_update_speed if gamma is None else gamma
    metrics = expert_load_metrics(model)
    for moe in model.moe_layers():
        load = moe.tokens_per_expert
        bias = moe.gate.e_score_correction_bias
        if bias is not None and load.sum() > 0:
            bias += gamma * torch.sign(load.mean() - load).to(bias)
        load.zero_()
    return metrics


def expert_load_keys(model: DeepseekV3ForCausalLM) -> list[str]:
    """Every key ``expert_load_metrics`` can return for ``model``: two per MoE layer of the main model."""
    return [f"moe/layer{i}/{stat}" for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)
            for stat in ("max_over_mean", "min_over_mean")]


def expert_load_metrics(model: DeepseekV3ForCausalLM) -> dict[str, float]:
    """Per MoE layer ``moe/layer{i}/max_over_mean`` (1.0 = perfectly balanced) and ``.../min_over_mean``
    of the token counts accumulated since the last bias update; layers with no counts are skipped."""
    metrics = {}
    for layer_idx, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, MoE) or layer.mlp.tokens_per_expert.sum() == 0:
            continue
        load = layer.mlp.tokens_per_expert
        metrics[f"moe/layer{layer_idx}/max_over_mean"] = (load.max() / load.mean()).item()
        metrics[f"moe/layer{layer_idx}/min_over_mean"] = (load.min() / load.mean()).item()
    return metrics


def count_parameters(config: DeepseekV3Config) -> dict[str, int]:
    """Parameter counts from the shapes, without building the model: ``total`` (main model, MTP
    excluded, as the report's 671B), ``mtp`` (unique MTP weights: embedding and head are shared) and
    ``active`` per token (K of E routed experts). Router biases are buffers and not counted."""
    cfg = config
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    attn = q + kv + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
    expert = 3 * d * cfg.moe_intermediate_size
    moe = cfg.n_routed_experts * (expert + d) + cfg.n_shared_experts * expert

    def layer(i: int) -> int:
        return attn + 2 * d + (moe if cfg.is_moe_layer(i) else 3 * d * cfg.intermediate_size)

    main = range(cfg.num_hidden_layers)
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    total = embeddings + sum(layer(i) for i in main)
    mtp = sum(layer(cfg.num_hidden_layers + k) + 3 * d + 2 * d * d for k in range(cfg.num_nextn_predict_layers))
    inactive = sum(cfg.is_moe_layer(i) for i in main) * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    return {"total": total, "mtp": mtp, "active": total - inactive}
