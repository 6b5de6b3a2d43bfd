"""DeepSeek-V3 weights on disk: HF sharded safetensors, official key names, FP8 checkpoints.

The HF layout (``config.json``, ``model-0000i-of-0000n.safetensors``, ``model.safetensors.index.json``)
is what the released V3/R1 checkpoints use and what transformers' ``DeepseekV3ForCausalLM`` loads and
saves; r1kit's state-dict names are that layout, so saving is sharding and loading is checking.
MTP layers (``model.layers.{num_hidden_layers + k}``) also carry copies of the embedding and head, as
in the released checkpoints (README_WEIGHTS.md L33-48). The official repository's ``convert.py`` names
(``layers.0.attn.wq_a.weight``, ``embed.weight``, ``...scale``) are mapped both ways. FP8 weights
(float8_e4m3fn + ``weight_scale_inv``) are dequantized on load.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1kit.errors import ConfigError, R1kitError
from r1kit.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from r1kit.models.fp8 import FP8, weight_dequant, weight_quant

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
V3_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the shared embedding/head

# HF module name -> official name (inference/convert.py `mapping`), applied to the second-to-last part.
OFFICIAL_NAMES = {
    "embed_tokens": "embed",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "lm_head": "head",
}
HF_NAMES = {v: k for k, v in OFFICIAL_NAMES.items()}


def hf_to_official(name: str) -> str:
    """``model.layers.3.mlp.experts.7.gate_proj.weight`` -> ``layers.3.ffn.experts.7.w1.weight``."""
    name = name.removeprefix("model.").replace("self_attn", "attn").replace("mlp", "ffn")
    name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
    parts = name.split(".")
    if len(parts) >= 2:
        parts[-2] = OFFICIAL_NAMES.get(parts[-2], parts[-2])
    return ".".join(parts)


def official_to_hf(name: str) -> str:
    """Inverse of ``hf_to_official``: ``layers.0.attn.wkv_b.weight`` -> ``model.layers.0.self_attn.kv_b_proj.weight``."""
    parts = name.split(".")
    if len(parts) >= 2:
        parts[-2] = HF_NAMES.get(parts[-2], parts[-2])
    name = ".".join(parts).replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
    name = re.sub(r"\.scale$", ".weight_scale_inv", name)
    name = re.sub(r"\.gate\.bias$", ".gate.e_score_correction_bias", name)
    return name if name.startswith("lm_head.") else "model." + name


def read_config(path: str | Path) -> dict:
    """The raw ``config.json`` dict of a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / CONFIG if path.is_dir() else path
    if not file.is_file():
        raise R1kitError(f"{file} not found; a DeepSeek-V3 checkpoint directory needs its config.json")
    return json.loads(file.read_text())


def is_deepseek_v3(path_or_config: str | Path | dict) -> bool:
    """Whether a checkpoint directory, config file or config dict describes a DeepSeek-V3/R1/V2 model."""
    if isinstance(path_or_config, dict):
        raw = path_or_config
    else:
        path = Path(path_or_config)
        if not (path / CONFIG).is_file() and not (path.is_file() and path.suffix == ".json"):
            return False
        raw = read_config(path)
    arch = raw.get("architectures") or []
    return raw.get("model_type") in V3_MODEL_TYPES or any(a.startswith(("DeepseekV3", "DeepseekV2")) for a in arch)


# ---------------------------------------------------------------------------------------------- save


def checkpoint_state(model: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors to save: the state dict plus each MTP layer's copies of embedding and head."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for k in range(model.config.num_nextn_predict_layers):
        prefix = f"model.layers.{model.config.num_hidden_layers + k}."
        state[prefix + MTP_SHARED[0]] = model.model.embed_tokens.weight
        state[prefix + MTP_SHARED[1]] = model.lm_head.weight
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def save_deepseek_v3(
    model: DeepseekV3ForCausalLM, path: str | Path, max_shard_bytes: int = 2**30, fp8: bool = False
) -> Path:
    """Write ``model`` as an HF checkpoint directory: config.json, shards, model.safetensors.index.json.

    ``fp8`` stores every 2-D linear weight of the decoder layers as float8_e4m3fn with a 128×128-block
    ``weight_scale_inv`` and adds V3's ``quantization_config`` (embedding, head, router and norms stay
    as they are; spec §6). Shards hold at most ``max_shard_bytes`` (a larger tensor gets its own shard).
    Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(model)
    config = model.config.to_hf_dict()
    if fp8:
        state = quantize_state(state)
        config["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        }
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    shards = shard(state, max_shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    return path


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8-quantize the decoder layers' linear weights, adding ``<name>_scale_inv`` for each."""
    out = {}
    for name, tensor in state.items():
        is_linear = name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith(
            (".gate.weight", *MTP_SHARED))
        if is_linear:
            out[name], out[name + "_scale_inv"] = weight_quant(tensor)
        else:
            out[name] = tensor
    return out


def shard(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of the names, in order, into shards of at most ``max_shard_bytes``."""
    shards, current, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


# ---------------------------------------------------------------------------------------------- load


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (via its index, else every ``*.safetensors``), with
    official names mapped to HF names and FP8 weights dequantized to fp32."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise R1kitError(f"no *.safetensors files in {path}")
    parallel = [f for f in files if re.fullmatch(r"model\d+-mp(\d+)\.safetensors", f) and not f.endswith("-mp1.safetensors")]
    if parallel:
        raise R1kitError(
            f"{path} holds model-parallel shards ({parallel[0]}, ...); convert the HF checkpoint again with "
            "inference/convert.py --model-parallel 1, or load the HF directory itself"
        )
    raw = {}
    for file in files:
        if not (path / file).is_file():
            raise R1kitError(f"{path / file} is listed in {INDEX} but missing")
        with safe_open(path / file, framework="pt") as f:
            raw.update({name: f.get_tensor(name) for name in f.keys()})
    if "embed.weight" in raw:
        raw = {official_to_hf(name): t for name, t in raw.items()}
    return dequantize_state(raw)


def dequantize_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each float8 ``<name>`` + ``<name>_scale_inv`` pair by the fp32 weight (kernel.py L76-85).

    Raises R1kitError listing FP8 weights without a scale."""
    unscaled = [n for n, t in raw.items() if t.dtype == FP8 and n + "_scale_inv" not in raw]
    if unscaled:
        raise R1kitError(f"FP8 weights without weight_scale_inv: {unscaled[:10]}")
    return {
        name: weight_dequant(t, raw[name + "_scale_inv"]) if t.dtype == FP8 else t
        for name, t in raw.items()
        if not name.endswith("_scale_inv")
    }


def load_deepseek_v3(
    path: str | Path, dtype: torch.dtype = torch.float32, config: DeepseekV3Config | None = None
) -> DeepseekV3ForCausalLM:
    """Build a DeepseekV3ForCausalLM from a checkpoint directory (HF or official names, bf16/fp32/FP8).

    ``config`` defaults to the directory's config.json; for an official converted directory (no
    config.json) pass ``DeepseekV3Config.from_model_args(json.load(open("config_671B.json")))``. A checkpoint without any MTP weights (as
    transformers saves) loads with num_nextn_predict_layers=0. Raises R1kitError listing missing,
    mis-shaped or unexpected tensors; ConfigError for an inconsistent config.
    """
    path = Path(path)
    if config is None:
        raw_config = read_config(path)
        if not is_deepseek_v3(raw_config):
            raise ConfigError(f"{path / CONFIG}: model_type {raw_config.get('model_type')!r} is not a DeepSeek-V3 model")
        config = DeepseekV3Config.from_dict(raw_config)
    tensors = read_tensors(path)
    config = dataclasses.replace(config, quantization_config=None)  # FP8 weights are dequantized now
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."
    if config.num_nextn_predict_layers and not any(n.startswith(mtp_prefix) for n in tensors):
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    check_tensors(model, tensors, path)
    model = model.to_empty(device="cpu").cast(dtype)
    model.tie_weights()
    model.load_state_dict({n: tensors[n] for n in model.state_dict() if n in tensors}, strict=False)
    model.reset_buffers()
    return model.eval()


def check_tensors(model: DeepseekV3ForCausalLM, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise R1kitError listing the missing, mis-shaped and unexpected tensors of a checkpoint."""
    problems = tensor_problems(model, tensors)
    if problems:
        raise R1kitError(f"checkpoint {path} does not match its config: " + "; ".join(problems))


def tensor_problems(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """How a checkpoint's ``tensors`` differ from ``model``'s state dict: "missing (n): names",
    "mis-shaped (n): name: checkpoint (..) vs model (..)" and "unexpected (n): names" ([] when they
    match). A tied weight is expected under its first name only (as saved); MTP layers' copies of the
    shared embedding and head are not unexpected. Any model (r1kit's V3 or a transformers one)."""
    expected, seen = model.state_dict(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            expected.pop(name, None)
        seen.add(id(p))
    missing = sorted(set(expected) - set(tensors))
    shared = tuple(f".{s}" for s in MTP_SHARED)
    unexpected = sorted(n for n in set(tensors) - set(expected)
                        if not (n.startswith("model.layers.") and n.endswith(shared)))
    misshaped = [
        f"{n}: checkpoint {tuple(tensors[n].shape)} vs model {tuple(expected[n].shape)}"
        for n in sorted(set(expected) & set(tensors))
        if tensors[n].shape != expected[n].shape
    ]
    return [
        f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
        for label, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected))
        if items
    ]
