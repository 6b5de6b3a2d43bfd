"""Rollout backend over transformers' ``generate`` (KV-cached, batched).

Sampling is done by r1kit's own logits processors (temperature, top-k, top-p) with generate's own
warpers switched off, so the sampling distribution is defined in one place and the per-token
sampling logprobs can be recorded without keeping (n, steps, V) logits: a processor stores the
previous step's log-softmax (n, V) and gathers the token that was sampled from it at the next call.

Logprobs are of the temperature-scaled distribution ``log_softmax(logits / T)`` before top-k/top-p
truncation: the same quantity the trainer recomputes, so their difference measures the
training/inference mismatch (GRPO_SPEC §5).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from r1kit.errors import ConfigError
from r1kit.rollout.base import Completion, SamplingParams
from r1kit.rollout.engine import eos_ids_of
from r1kit.rollout.sampling import filter_logits


class _SampleWarper(LogitsProcessor):
    """Temperature, then records log-softmax, then top-k / top-p masking (scores: (n, V))."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.prev_logprobs: torch.Tensor | None = None  # (n, V) log-softmax of the previous step
        self.picked: list[torch.Tensor] = []  # per step: (n,) logprob of the sampled token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev_logprobs is not None:
            self.picked.append(self.prev_logprobs.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = scores.float()
        if self.params.temperature > 0:
            scores = scores / self.params.temperature
        self.prev_logprobs = torch.log_softmax(scores, dim=-1)
        return filter_logits(scores, self.params.top_k, self.params.top_p)

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(n, steps) logprobs of the sampled tokens, given the output sequences (n, p + steps)."""
        if self.prev_logprobs is not None:
            self.picked.append(self.prev_logprobs.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.picked, dim=1) if self.picked else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)


class HFGenerateEngine:
    """``SamplingEngine`` over ``model.generate``.

    Args:
        model: a transformers causal LM (the trainer's policy).
        tokenizer: its tokenizer (pad id). End-of-sequence ids are ``eos_ids_of(model, tokenizer)``,
            the same rule as the r1kit engine: the tokenizer's EOS and every id of the model's
            ``generation_config.eos_token_id`` (a list for Qwen2.5, Llama-3, Phi-3.5).
        dtype: sampling dtype. If it differs from the model's, a copy in this dtype is kept and
            refreshed by ``update_weights`` (bf16 decoding is ~1.5x faster on AVX512-BF16 CPUs).
        max_batch_size: sequences decoded together at most; larger requests are chunked.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, dtype: torch.dtype | None = None, max_batch_size: int = 128):
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_ids_of(model, tokenizer)[0]
        model_dtype = next(model.parameters()).dtype
        self.owns_copy = dtype is not None and dtype != model_dtype
        self.model = copy.deepcopy(model).to(dtype) if self.owns_copy else model
        self.model.eval()
        self.max_context = getattr(model.config, "max_position_embeddings", None)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s parameters into the sampling copy (no-op when ``model`` is the shared module;
        a different module with the same parameters, such as a LoRA policy's merged copy, is copied)."""
        if model is self.model:
            return
        with torch.no_grad():
            for dst, src in zip(self.model.parameters(), model.parameters()):
                dst.copy_(src)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                 on_finished: Callable[[dict[int, list[Completion]]], None] | None = None) -> list[Completion]:
        """Sample ``params.n`` completions per prompt (prompt-major order). See ``SamplingEngine``;
        ``on_finished`` as ``Engine.generate``'s, called after each batch of ``max_batch_size`` sequences.

        Raises:
            ConfigError: invalid params, an empty prompt, or prompt + max_tokens beyond the context.
        """
        params.validate()
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ConfigError(f"prompt {i} is empty")
            if self.max_context and len(p) + params.max_tokens > self.max_context:
                raise ConfigError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={params.max_tokens} it exceeds the "
                    f"model context of {self.max_context}"
                )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        flat = [(i, list(p)) for i, p in enumerate(prompt_ids) for _ in range(params.n)]
        out: list[Completion] = []
        n = params.n
        for start in range(0, len(flat), self.max_batch_size):
            reported = len(out) // n
            out.extend(self._generate_chunk(flat[start:start + self.max_batch_size], params))
            if on_finished is not None and len(out) // n > reported:
                on_finished({i: out[i * n:(i + 1) * n] for i in range(reported, len(out) // n)})
        return out

    @torch.no_grad()
    def _generate_chunk(self, items: list[tuple[int, list[int]]], params: SamplingParams) -> list[Completion]:
        width = max(len(p) for _, p in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (_, p) in enumerate(items):  # left padding
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention_mask[row, width - len(p):] = 1
        stop_ids = list(dict.fromkeys(self.eos_ids + list(params.stop_token_ids)))
        warper = _SampleWarper(params)
        gen_cfg = GenerationConfig(
            max_new_tokens=params.max_tokens, do_sample=params.temperature > 0, temperature=1.0, top_p=1.0,
            top_k=0, eos_token_id=stop_ids, pad_token_id=self.pad_id, bos_token_id=None,
            stop_strings=list(params.stop) or None,
        )
        seqs = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
            logits_processor=LogitsProcessorList([warper]), tokenizer=self.tokenizer if params.stop else None,
        )
        new = seqs[:, width:]                                                      # (n, steps)
        logprobs = warper.finish(seqs)                                             # (n, steps)
        completions = []
        for row, (prompt_index, _) in enumerate(items):
            ids = new[row].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stop_ids), None)
            finish = "stop" if end is not None else "length"
            end = end if end is not None else len(ids)
            completions.append(Completion(ids[:end], logprobs[row, :end].tolist(), finish, prompt_index))
        return completions
