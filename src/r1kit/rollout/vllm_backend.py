"""Rollouts through vLLM on a GPU (optional extra: ``pip install 'r1kit[vllm]'``).

``VLLMEngine`` implements ``SamplingEngine`` over ``vllm.LLM`` colocated with the trainer on one GPU:
token ids in, token ids and per-token sampling logprobs out, and ``update_weights`` pushes the
trainer's current weights into vLLM's model (then drops vLLM's prefix cache, which holds keys and
values computed with the old weights). vLLM is imported only when an engine is built, so r1kit
imports and its CPU tests run without it.

The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that ``update_weights``
hands tensors to the model directly instead of pickling them to a worker process.

Logprobs are vLLM's ``processed_logprobs`` (after temperature and top-k/top-p, as TRL's colocate
mode uses), so with top-k/top-p they are renormalized over the kept tokens, unlike r1kit's own
engine, which reports ``log_softmax(logits / T)`` before truncation; without truncation they agree.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from r1kit.errors import R1kitError
from r1kit.rollout.base import Completion, SamplingParams

INSTALL_HINT = "pip install 'r1kit[vllm]'"


def import_vllm():
    """Import vllm, or raise R1kitError naming the install command."""
    try:
        import vllm
    except ImportError as err:
        raise R1kitError(f"the vLLM rollout backend needs vllm, which is not installed: {INSTALL_HINT}") from err
    return vllm


def vllm_sampling_kwargs(params: SamplingParams) -> dict:
    """``vllm.SamplingParams`` keyword arguments equivalent to ``params``.

    top_k 0 (off) becomes -1, which every vLLM version reads as "all tokens"; ``logprobs=0`` asks
    for the logprob of the sampled token only.
    """
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or -1,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "logprobs": 0,
    }


def completions_from_outputs(outputs) -> list[Completion]:
    """Flatten vLLM ``RequestOutput``s (one per prompt, in prompt order, each with n ``outputs``)
    into prompt-major ``Completion``s; vLLM's "stop" and "abort" both map to "stop"."""
    completions = []
    for prompt_index, request in enumerate(outputs):
        for out in request.outputs:
            ids = list(out.token_ids)
            logprobs = [step[token].logprob for step, token in zip(out.logprobs, ids)]
            reason = "length" if out.finish_reason == "length" else "stop"
            completions.append(Completion(ids, logprobs, reason, prompt_index))
    return completions


class VLLMEngine:
    """``SamplingEngine`` backed by ``vllm.LLM`` on the local GPU.

    Args:
        model: the trainer's HF model (its ``name_or_path`` tells vLLM the architecture and initial
            weights; its current weights are pushed right away) or a model path.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); leave the
            rest to the trainer.
        max_model_len: context length vLLM plans its cache for (None = the model's).
        dtype: vLLM's dtype ("auto" = the checkpoint's).
        seed: vLLM's global seed (per-call seeds come from ``SamplingParams.seed``).

    Raises:
        R1kitError: vllm is not installed.
    """

    def __init__(
        self,
        model: torch.nn.Module | str,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        self.vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        path = model if isinstance(model, str) else model.name_or_path
        self.llm = self.vllm.LLM(
            model=str(path),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            logprobs_mode="processed_logprobs",
        )
        if not isinstance(model, str):
            self.update_weights(model)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample ``params.n`` completions per prompt, prompt-major. Raises ConfigError for
        invalid params (vLLM itself refuses prompts longer than ``max_model_len``)."""
        params.validate()
        sampling = self.vllm.SamplingParams(**vllm_sampling_kwargs(params))
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        return completions_from_outputs(self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False))

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into vLLM's model and drop the prefix cache."""
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        self.llm.reset_prefix_cache()
