"""``r1kit export``: a trained model out to llama.cpp / Ollama (GGUF) or to transformers / vLLM (HF).

GGUF (``--format gguf``) covers the Llama family r1kit trains (the embedded SmolLM2 and its
fine-tunes: ``config.model_type == "llama"`` with a byte-level BPE tokenizer). It is written with the
``gguf`` package's ``GGUFWriter`` and follows llama.cpp's ``convert_hf_to_gguf.py`` semantics:
tensor names from ``gguf.get_tensor_name_map(LLAMA)``, q/k projection rows permuted from HF's
half-split rotary layout to llama.cpp's interleaved one (``LlamaModel.permute``), 1-D tensors kept
F32, the tokenizer as ``tokenizer.ggml.*`` (model "gpt2", tokens, token types, merges, special ids,
add-BOS/EOS flags, pre-tokenizer name) and the chat template as ``tokenizer.chat_template``.
transformers' GGUF loader undoes the permutation (``LlamaTensorProcessor._reverse_permute_weights``).

HF (``--format hf``) covers every model r1kit trains: an HF ``PreTrainedModel`` through
``save_pretrained`` (safetensors), r1kit's DeepSeek-V3 through ``v3_io.save_deepseek_v3`` (the HF
DeepSeek-V3 layout transformers and vLLM load), each with its tokenizer.

Both are written atomically: into a temporary sibling, then renamed over the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from r1kit.errors import ConfigError, R1kitError
from r1kit.io import atomic_dir, atomic_file

FORMATS = ("gguf", "hf")
GGUF_DTYPES = ("f16", "bf16", "q8_0")  # tensor types of 2-D weights; 1-D tensors (norms) stay F32
HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# llama.cpp's name for the pre-tokenizer (``tokenizer.ggml.pre``), keyed by the HF tokenizer.json
# ``pre_tokenizer`` it describes: plain GPT-2 byte-level splitting, or SmolLM's (digits split one by one).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    json.dumps(_BYTE_LEVEL, sort_keys=True): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
               sort_keys=True): "smollm",
}


def export_model(name_or_path: str, fmt: str, output: str | Path, dtype: str | None = None) -> Path:
    """Load ``name_or_path`` with ``load_policy`` and write it as ``fmt`` ("gguf" or "hf") at ``output``.

    ``dtype``: for gguf one of ``GGUF_DTYPES`` (default f16); for hf one of ``HF_DTYPES`` (default:
    the loaded fp32 weights). Returns the output path.

    Raises:
        ConfigError: an unknown format or dtype (checked before the model loads).
        R1kitError: the model cannot be loaded or has no GGUF mapping (see ``export_gguf``).
    """
    from r1kit.models.loading import check_output_path, load_policy

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    allowed = GGUF_DTYPES if fmt == "gguf" else tuple(HF_DTYPES)
    if dtype is not None and dtype not in allowed:
        raise ConfigError(f"--dtype for --format {fmt} must be one of {', '.join(allowed)}, got {dtype!r}")
    check_output_path(output, "file" if fmt == "gguf" else "dir")
    check_export_target(name_or_path, output, fmt)
    model, tokenizer = load_policy(name_or_path, dtype=torch.float32)
    if fmt == "gguf":
        return export_gguf(model, tokenizer, output, dtype or "f16", name=Path(str(name_or_path)).name)
    return export_hf(model, tokenizer, output, dtype)


# ---------------------------------------------------------------------------------------------- HF


def check_export_target(source: str | Path, output: str | Path, fmt: str) -> None:
    """Refuse an ``--output`` whose replacement would lose something: the source itself (or a
    directory holding it), an existing file that is not a GGUF file, or an existing directory that
    is not an earlier HF export: an r1kit run of any kind (``runs.run_kind``), one holding a
    ``metrics.jsonl`` (a run whose config is gone), one with subdirectories or without config.json.
    An earlier export of the same format is replaced, atomically.

    Raises:
        ConfigError: naming ``--output``, what it holds (a run's kind and the file that says so) and the
            fix (a new path).
    """
    from r1kit.runs import KINDS, run_kind

    out, src = Path(output), Path(str(source))
    if not out.exists():
        return
    fix = "pass a new path, or remove it yourself if it is meant to go"
    if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise ConfigError(f"--output {out} is (or holds) the model being exported, {src}; {fix}")
    if fmt == "gguf":
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"--output {out} exists and is not a GGUF file; {fix}")
        return
    found = run_kind(out)
    if found is not None:
        kind, marker = found
        raise ConfigError(f"--output {out} holds {KINDS[kind][0]} (its {marker}), not an earlier HF export; {fix}")
    if (out / "metrics.jsonl").is_file():
        raise ConfigError(f"--output {out} holds a run's metrics.jsonl, not an earlier HF export; {fix}")
    entries = list(out.iterdir())
    if entries and (any(e.is_dir() for e in entries) or not (out / "config.json").is_file()):
        raise ConfigError(f"--output {out} exists and is not an earlier HF export (it holds "
                          f"{', '.join(sorted(e.name for e in entries)[:4])}...); {fix}")


def export_hf(model, tokenizer, output: str | Path, dtype: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF directory (safetensors) at ``output``, atomically.

    r1kit's ``DeepseekV3ForCausalLM`` is written by ``save_deepseek_v3`` (HF DeepSeek-V3 names,
    sharded, with its MTP layer), any other model by ``save_pretrained``. ``dtype`` casts a copy of
    the weights first (None keeps them). Returns the directory.
    """
    from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM
    from r1kit.models.loading import save_pretrained_atomic
    from r1kit.models.v3_io import save_deepseek_v3

    if dtype is not None:
        model = _cast_copy(model, HF_DTYPES[dtype])
    if not isinstance(model, DeepseekV3ForCausalLM):
        return save_pretrained_atomic(model, tokenizer, Path(output))

    with atomic_dir(output) as tmp:
        save_deepseek_v3(model, tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def _cast_copy(model, dtype: torch.dtype):
    """A deep copy of ``model`` in ``dtype`` (r1kit's V3 model casts with ``cast``, keeping fp32 router state)."""
    import copy

    clone = copy.deepcopy(model)
    return clone.cast(dtype) if hasattr(clone, "cast") else clone.to(dtype)


# -------------------------------------------------------------------------------------------- GGUF


def export_gguf(model, tokenizer, output: str | Path, dtype: str = "f16", name: str = "r1kit") -> Path:
    """Write an HF Llama ``model`` and its ``tokenizer`` as one GGUF file at ``output``, atomically.

    Args:
        model: an HF ``LlamaForCausalLM`` (config.model_type "llama", default rope, no biases).
        tokenizer: its byte-level BPE tokenizer (``PRE_TOKENIZERS`` lists the pre-tokenizers known).
        dtype: "f16", "bf16" or "q8_0" for the 2-D weights (a Q8_0 tensor whose rows are not a
            multiple of 32 falls back to F16, as llama.cpp does); norms stay F32.
        name: ``general.name``.

    Raises:
        R1kitError: the model is not a plain Llama (model type, rope scaling, attention/MLP biases)
            or the tokenizer is not byte-level BPE with a known pre-tokenizer; names the field.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    cfg = model.config
    check_llama_for_gguf(cfg)
    tok_meta = tokenizer_metadata(tokenizer, cfg.vocab_size)
    with atomic_file(output) as tmp:  # GGUFWriter creates it, so the umask applies
        writer = gguf.GGUFWriter(tmp, "llama")
        add_llama_metadata(writer, cfg, dtype, name)
        add_tokenizer_metadata(writer, tok_meta)
        for gguf_name, array, qtype in llama_gguf_tensors(model, dtype):
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(output)


def check_llama_for_gguf(cfg) -> None:
    """Raise R1kitError unless ``cfg`` is a Llama that llama.cpp's "llama" architecture runs as is."""
    if getattr(cfg, "model_type", None) != "llama":
        raise R1kitError(f"GGUF export supports Llama-family models (model_type 'llama'), this one is "
                         f"{getattr(cfg, 'model_type', None)!r}; use --format hf")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise R1kitError(f"GGUF export supports the default rope only, config has rope_type {rope.get('rope_type')!r}; "
                         "use --format hf")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(cfg, field, False):
            raise R1kitError(f"GGUF export of a Llama with {field}=true is not supported; use --format hf")


def rope_theta(cfg) -> float:
    """Rotary base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (4.x)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def add_llama_metadata(writer, cfg, dtype: str, name: str) -> None:
    """``general.*`` and ``llama.*`` hyperparameters (llama.cpp ``LlamaModel.set_gguf_parameters``)."""
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection (n_head·d, D) from HF's half-split rotary order (each head's
    first d/2 rows pair with its last d/2) to llama.cpp's interleaved one (rows 2i, 2i+1 pair):
    per head, (2, d/2) -> (d/2, 2). The inverse of transformers' ``_reverse_permute_weights``."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama_gguf_tensors(model, dtype: str):
    """Yield (GGUF name, numpy array, GGML type or None) for every tensor of an HF Llama.

    2-D weights are rounded to ``dtype`` (Q8_0 blocks via ``gguf.quants``); the tied lm_head is
    not written (llama.cpp and transformers then tie ``output`` to ``token_embd``).
    """
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = cfg.tie_word_embeddings
    for hf_name, param in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise R1kitError(f"no GGUF name for tensor {hf_name!r} of this Llama model")
        w = param.detach().float()
        if hf_name.endswith("q_proj.weight"):
            w = permute_for_llama_cpp(w, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_for_llama_cpp(w, cfg.num_key_value_heads)
        yield (gguf_name, *_encode(w, dtype))


def _encode(w: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    """(array, raw GGML type) of a fp32 tensor for ``GGUFWriter.add_tensor``."""
    from gguf import GGMLQuantizationType, quants

    if w.dim() < 2:
        return w.numpy(), None  # F32
    if dtype == "bf16":
        return quants.quantize(w.numpy(), GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if dtype == "q8_0" and w.shape[-1] % 32 == 0:
        return quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return w.numpy().astype(np.float16), None  # F16


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The ``tokenizer.*`` GGUF fields of a byte-level BPE HF tokenizer (llama.cpp
    ``TextModel.get_vocab_base``): one token per model row (ids without a token become
    ``[PAD<id>]``, user-defined), special added tokens CONTROL, other added tokens USER_DEFINED.

    Raises R1kitError when the tokenizer is not a fast byte-level BPE with a known pre-tokenizer, or
    has more tokens than the model has rows.
    """
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise R1kitError("GGUF export needs a fast (tokenizers) tokenizer; this one has no backend_tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("normalizer") is not None:
        raise R1kitError(f"GGUF export supports byte-level BPE tokenizers without a normalizer; this one is "
                         f"{spec['model']['type']} with normalizer {spec.get('normalizer')}")
    pre = PRE_TOKENIZERS.get(json.dumps(spec.get("pre_tokenizer"), sort_keys=True))
    if pre is None:
        raise R1kitError(f"GGUF export knows the GPT-2 and SmolLM pre-tokenizers; this tokenizer's is "
                         f"{json.dumps(spec.get('pre_tokenizer'))}")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise R1kitError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    starts_with = with_special[: len(with_special) - len(plain)]
    return {
        "pre": pre, "tokens": tokens, "types": [int(t) for t in types], "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": bool(starts_with) and starts_with[0] == tokenizer.bos_token_id,
        "add_eos": len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def add_tokenizer_metadata(writer, meta: dict) -> None:
    """Write the fields of ``tokenizer_metadata`` (``gguf.SpecialVocab.add_to_gguf`` key names)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
