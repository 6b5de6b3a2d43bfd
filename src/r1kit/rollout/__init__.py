"""Sampling engines behind one interface (``SamplingEngine``)."""

from r1kit.rollout.base import Completion, SamplingEngine, SamplingParams

__all__ = ["Completion", "SamplingEngine", "SamplingParams"]
