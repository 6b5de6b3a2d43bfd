"""Wiring shared by the training and evaluation commands: template → render function, task → verifier,
backend name → sampling engine. Components stay independent; this is the one place that joins them."""

from __future__ import annotations

from typing import Callable

import torch

from r1kit.data.base import Example
from r1kit.errors import ConfigError


def make_render(template_name: str, tokenizer) -> tuple[Callable[[Example], str], object]:
    """(Example → prompt text, the PromptTemplate). Raises ConfigError for an unknown template."""
    from r1kit.data.templates import get_template, render_prompt

    template = get_template(template_name)
    return (lambda ex: render_prompt(ex, tokenizer, template)), template


def make_verifier(task: str, answer_extraction: str = "tagged"):
    """The verifier registered for ``task``'s kind (math: math-verify with the given extraction)."""
    from r1kit.data.loading import task_verifier_kind
    from r1kit.rewards.registry import get_verifier

    kind = task_verifier_kind(task)
    return get_verifier(kind, extraction=answer_extraction) if kind == "math" else get_verifier(kind)


def describe_engine(engine) -> str:
    """The one line naming what samples: r1kit's engine with its dtype and compute path
    (``Engine.compute_path``: the C kernels or torch ops, and why), or the other backend."""
    from r1kit.rollout.engine import Engine

    if isinstance(engine, Engine):
        return f"r1kit engine ({engine.dtype}, {engine.compute_path})"
    names = {"HFGenerateEngine": "transformers generate (torch ops)", "VLLMEngine": "vLLM",
             "V3SamplingEngine": "r1kit DeepSeek-V3 V3SamplingEngine (torch ops)"}
    return names.get(type(engine).__name__, type(engine).__name__)


def make_engine(model: torch.nn.Module, tokenizer, backend: str = "auto", dtype: torch.dtype | None = None,
                max_batch_size: int = 64):
    """A SamplingEngine over ``model``: "engine" (r1kit's), "hf" (transformers generate), "vllm", or
    "auto" (r1kit's engine when it has an adapter for the model type: Llama, and Qwen2/Qwen2.5, Qwen3 and
    Mistral from ``rollout/families.py``; else transformers generate).

    r1kit's DeepSeek-V3 model samples with ``V3SamplingEngine`` (absorbed-MLA cache, in the model's own
    dtype) under "auto" and "engine"; "hf" and "vllm" raise ConfigError for it."""
    from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM

    if isinstance(model, DeepseekV3ForCausalLM):
        if backend not in ("auto", "engine"):
            raise ConfigError(f"rollout backend {backend!r} cannot run r1kit's DeepSeek-V3 model; use auto or engine")
        from r1kit.models.v3_decode import V3SamplingEngine

        return V3SamplingEngine(model, pad_token_id=tokenizer.pad_token_id or 0)
    if backend == "auto":
        from r1kit.rollout.engine import ADAPTERS

        backend = "engine" if getattr(model.config, "model_type", None) in ADAPTERS else "hf"
    if backend == "hf":
        from r1kit.rollout.hf import HFGenerateEngine

        return HFGenerateEngine(model, tokenizer, dtype=dtype, max_batch_size=max_batch_size)
    if backend == "engine":
        from r1kit.rollout.engine import Engine

        return Engine(model, tokenizer, dtype=dtype or torch.float32, max_batch=max_batch_size)
    if backend == "vllm":
        from r1kit.rollout.vllm_backend import VLLMEngine

        names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
        return VLLMEngine(model, dtype=names.get(dtype, "auto"))
    raise ConfigError(f"rollout backend must be auto, engine, hf or vllm, got {backend!r}")
