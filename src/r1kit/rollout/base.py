"""The rollout seam: one sampling-engine interface for RL, distillation, evaluation and serving.

Backends (HF ``generate``, r1kit's own engine, vLLM) implement ``SamplingEngine``. Token ids in and
out; text decoding belongs to the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from r1kit.errors import ConfigError


def check_sampling(temperature: float, top_p: float, top_k: int = 0, *,
                   names: tuple[str, str, str] = ("temperature", "top_p", "top_k")) -> None:
    """Raise ConfigError naming the value when ``temperature`` is not a finite number >= 0 (0 = greedy),
    ``top_p`` is not in (0, 1] or ``top_k`` is < 0 (NaN fails every check). ``names`` spells the three as
    the caller's user wrote them: config fields (``eval_temperature``) or flags (``--top-p``)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"{names[0]} must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{names[1]} must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"{names[2]} must be >= 0 (0 = off), got {top_k}")


@dataclass
class SamplingParams:
    """Sampling settings for one ``generate`` call.

    Attributes:
        max_tokens: completion tokens to sample at most (> 0).
        temperature: softmax temperature (>= 0; 0 means greedy).
        top_p: nucleus mass in (0, 1].
        top_k: keep the k most likely tokens (0 = off).
        n: completions per prompt (the group size G in GRPO); prompts are repeated n times in order,
            so output ``i*n + j`` is the j-th completion of prompt i.
        seed: seed for the sampler's own generator (None = use the global RNG).
        stop_token_ids: ids that end a completion (included in ``token_ids``, finish_reason "stop").
        stop: strings that end a completion (engine support varies; HF backend checks decoded text).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ConfigError naming the field if a value is out of range."""
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be > 0, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")


@dataclass
class Completion:
    """One sampled completion.

    Attributes:
        token_ids: sampled ids, ending with the stop token when ``finish_reason == "stop"``.
        logprobs: log-probability (nats) of each sampled token under the sampling distribution
            (after temperature); same length as ``token_ids``.
        finish_reason: ``"stop"`` (EOS / stop string) or ``"length"`` (hit max_tokens: truncated).
        prompt_index: index of the prompt in the ``generate`` call this completion belongs to.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_index: int = 0

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class SamplingEngine(Protocol):
    """Batched sampling from a causal LM."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample ``params.n`` completions for each prompt; returns ``len(prompt_ids) * n`` items
        ordered prompt-major. Raises ConfigError for invalid params or prompts longer than the
        context. r1kit's engine and the HF backend also take ``on_finished`` (called with {prompt
        index: its n completions} as prompts finish; ``eval.evaluate.generate_streaming``)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (no-op if it shares the module)."""
        ...
