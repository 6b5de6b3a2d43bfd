"""Sampling engines behind one interface (``SamplingEngine``)."""

from r1kit.rollout import families  # noqa: F401  (registers the Qwen2, Qwen3 and Mistral engine adapters)
from r1kit.rollout.base import Completion, SamplingEngine, SamplingParams

__all__ = ["Completion", "SamplingEngine", "SamplingParams"]
