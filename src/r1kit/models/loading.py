"""``load_policy``: one entry point for every model r1kit trains or samples from.

Accepted ``name_or_path``:
  * ``smollm2-135m-instruct``: the embedded default (see ``r1kit.models.embedded``);
  * an HF model directory (``config.json`` + safetensors/bin, any causal LM transformers supports);
  * a ``.gguf`` file (dequantized by transformers' GGUF support);
  * an r1kit run directory or checkpoint (``checkpoint-N/`` or a run dir with ``final/``).

A DeepSeek-V3/R1 (or V2) directory, by ``model_type`` or ``architectures`` in its config.json, loads as
r1kit's own ``DeepseekV3ForCausalLM`` (trainable router bias, absorbed-MLA decoding), whether saved by
r1kit (``r1kit.models.v3_io``) or by transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1kit.errors import ConfigError, R1kitError
from r1kit.io import atomic_dir, check_writable
from r1kit.models import embedded

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"fp64": torch.float64, "float64": torch.float64, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 / AMX), as torch's oneDNN sees them.

    Without them torch emulates bf16 matmuls, several times slower than fp32 (measured on an AVX2
    CPU: 0.45 vs 34 GFLOP/s), so bf16 must never be switched on blindly.
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_bf16(setting: str | bool) -> bool:
    """Resolve a ``bf16`` setting: "auto" = ``native_bf16()`` (or CUDA), else a boolean.

    Raises R1kitError for any other value.
    """
    if isinstance(setting, bool):
        return setting
    value = str(setting).lower()
    if value == "auto":
        return torch.cuda.is_available() or native_bf16()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise R1kitError(f"bf16 must be auto, true or false, got {setting!r}")


ENGINE_DTYPES = ("auto", "bf16", "fp32")  # --dtype of `r1kit eval` and `r1kit serve`: auto = bf16 where native, else fp32


def check_engine_dtype(value: str, flag: str = "--dtype") -> None:
    """Raise ConfigError naming ``flag``, ``value`` and exactly the values that work (``ENGINE_DTYPES``:
    the engines sample in bf16 or fp32) when ``value`` is not one of them; called before the model loads."""
    if value not in ENGINE_DTYPES:
        raise ConfigError(f"{flag} must be one of {', '.join(ENGINE_DTYPES)}, got {value!r}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"fp32"``/... or a torch dtype → torch dtype; ``"auto"`` = bf16 where
    ``resolve_bf16("auto")`` (CUDA or native CPU bf16), else fp32. Raises ConfigError for unknown names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if resolve_bf16("auto") else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_dir(name_or_path: str) -> Path:
    """Map an alias, run directory or checkpoint to the HF directory (or GGUF file) to load.

    Raises:
        R1kitError: the path does not exist or holds no model; names what was looked for.
    """
    if name_or_path == embedded.ALIAS:
        return embedded.embedded_model_dir()
    path = Path(name_or_path)
    if not path.exists():
        raise R1kitError(
            f"model {name_or_path!r} not found: pass an HF model directory, a .gguf file, an r1kit run "
            f"directory, or the alias {embedded.ALIAS!r}"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise R1kitError(f"model file {path} is not a .gguf file")
        return path
    if (path / "config.json").is_file():
        return path
    for sub in ("final", "policy"):
        if (path / sub / "config.json").is_file():
            return path / sub
    ckpts = sorted(path.glob("checkpoint-*/policy/config.json"), key=lambda p: int(p.parent.parent.name.split("-")[1]))
    if ckpts:
        return ckpts[-1].parent
    raise R1kitError(f"{path} holds no config.json, final/ model or checkpoint-*/ directory")


def save_pretrained_atomic(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as an HF directory at ``out_dir`` atomically
    (``state_dict``: the tensors to write instead of the model's own, e.g. an FSDP2 model gathered whole)."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def check_output_path(path: str | Path, kind: str, flag: str = "--output") -> Path:
    """Raise ConfigError naming ``flag`` when ``path`` cannot be written as a ``kind`` ("dir" or
    "file"): it exists as the other kind, one of its parents is a file, or it cannot be created or
    written (``io.check_writable``: the OS reason, e.g. a path under /proc or a read-only mount).
    Call before any work."""
    path = Path(path)
    if path.exists() and (path.is_dir() != (kind == "dir")):
        want = "a directory" if kind == "dir" else "a file path"
        raise ConfigError(f"{flag} {path} is an existing {'file' if kind == 'dir' else 'directory'}; pass {want}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return check_writable(path, kind, flag)


def load_policy(name_or_path: str, dtype: str | torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: alias, HF directory, GGUF file or r1kit run/checkpoint directory.
        dtype: parameter dtype (training keeps fp32 master weights; use bf16 autocast for speed).

    Returns:
        (model, tokenizer): the model in eval mode (a ``transformers.PreTrainedModel`` with no
        quantization config attached, or r1kit's ``DeepseekV3ForCausalLM`` for a DeepSeek-V3
        directory), and its tokenizer with ``pad_token`` set and ``padding_side="left"``.

    Raises:
        R1kitError: missing package/file (names the install command), or transformers cannot load it.
    """
    from transformers.utils import logging as hf_logging

    from r1kit.models.v3_io import is_deepseek_v3

    hf_logging.disable_progress_bar()
    src = resolve_model_dir(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    if src.is_dir() and is_deepseek_v3(src):
        model, tokenizer = load_deepseek_v3_policy(src, torch_dtype)
    else:
        model, tokenizer = load_hf_policy(src, torch_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def load_hf_policy(src: Path, dtype: torch.dtype):
    """(model, tokenizer) of an HF directory or GGUF file through transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": src.name} if src.is_file() else {}
    root = src.parent if src.is_file() else src
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise R1kitError(f"transformers could not load {src}: {e}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_deepseek_v3_policy(src: Path, dtype: torch.dtype):
    """(r1kit's DeepseekV3ForCausalLM, the directory's HF tokenizer). Raises R1kitError when the
    directory has no tokenizer files, or (from ``load_deepseek_v3``) lists missing or mis-shaped weights."""
    from transformers import AutoTokenizer

    from r1kit.models.v3_io import load_deepseek_v3

    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise R1kitError(f"{src} holds a DeepSeek-V3 model but no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                         "save one next to the weights with tokenizer.save_pretrained")
    return load_deepseek_v3(src, dtype), AutoTokenizer.from_pretrained(src)
