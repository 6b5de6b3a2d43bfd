"""Verifiers (math, code) and reward functions; one verifier serves reward and evaluation."""

from r1kit.rewards.base import RewardFunction, Verdict, Verifier

__all__ = ["RewardFunction", "Verdict", "Verifier"]
