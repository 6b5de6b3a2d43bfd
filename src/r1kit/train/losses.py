"""GRPO losses as pure tensor functions.

Notation: n = completions in a micro-batch (prompts × G), s = completion length (padded),
G = num_generations. All log-probabilities are natural-log, per token.

Sources: DeepSeekMath (arXiv 2402.03300) §4.1 Eq. 3-4 (group advantages, clipped surrogate, k3 KL);
DAPO (arXiv 2503.14476) Eq. 8 (token-mean aggregation, clip-higher); Dr. GRPO (arXiv 2503.20783) §3
(no std scaling, constant normalizer); Yao et al. 2025 (truncated importance sampling of the rollout
engine's samples); TRL 1.16 ``GRPOTrainer._compute_loss`` as executable reference.
See ``docs/`` and GRPO_SPEC.md §1-2 for the contract these functions implement.

The one deliberate difference from TRL: ``aggregate_loss`` takes the *whole optimizer step's*
sequence and token counts as normalizers, so that one optimizer step has the same gradient whether its
batch is processed in one micro-batch or in k gradient-accumulation micro-batches (GRPO_SPEC §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r1kit.errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome-supervised group advantages ``A_i = (r_i - mean_group(r)) / (std + eps)``.

    Args:
        rewards: (n,) total reward per completion, grouped contiguously: rows ``g*G .. g*G+G-1`` are
            the G completions of prompt g.
        num_generations: G (>= 2).
        scale_rewards: "group" (std within each group, DeepSeekMath), "batch" (std over all n),
            "none" (Dr. GRPO: no division).
        eps: added to the std (TRL uses 1e-4).

    Returns:
        advantages (n,) and group_std (n,) (each completion's group std, unbiased n-1; used to count
        groups with zero reward variance).

    Raises:
        ConfigError: unknown scale_rewards, G < 2, or n not divisible by G.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 2:
        raise ConfigError(f"num_generations must be >= 2 for group advantages, got {num_generations}")
    if rewards.numel() % num_generations:
        raise ConfigError(f"{rewards.numel()} rewards are not divisible by num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)                                   # (n/G, G)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)                 # (n,)
    group_std = grouped.std(dim=1).repeat_interleave(num_generations)             # (n,)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages, group_std


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref) (Schulman 2020; DeepSeekMath Eq. 4).

    With ``δ = ref_logps - logps``: ``exp(δ) - δ - 1`` (>= 0, unbiased). Shapes (n, s) → (n, s).
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLossTerms:
    """Per-token pieces of the clipped objective (all (n, s)).

    Attributes:
        per_token_loss: ``-min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) + β·kl``.
        ratio: ρ = exp(logps - old_logps).
        kl: k3 KL per token, or None when beta == 0.
        is_low_clipped / is_high_clipped: bool masks of tokens where the clip is active (ρ < 1-ε_low
            with A < 0; ρ > 1+ε_high with A > 0), for the clip_ratio metrics.
    """

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None
    is_low_clipped: torch.Tensor
    is_high_clipped: torch.Tensor


def policy_loss_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float, beta: float = 0.0,
                      ref_logps: torch.Tensor | None = None,
                      is_weights: torch.Tensor | None = None) -> PolicyLossTerms:
    """The clipped surrogate of DeepSeekMath Eq. 3 per token, times the rollout importance weight when
    given, plus ``beta * k3`` KL (the KL term is not reweighted, as in TRL 1.16).

    Args:
        logps: (n, s) log π_θ of the sampled tokens (with grad).
        old_logps: (n, s) log π_old (detached); pass ``logps.detach()`` when π_old = π_θ.
        advantages: (n,) one scalar per completion, broadcast over its tokens.
        epsilon_low, epsilon_high: clip range [1-ε_low, 1+ε_high] (DAPO clip-higher: ε_high = 0.28).
        beta: KL coefficient; when 0, ``ref_logps`` is not needed and ``kl`` is None.
        ref_logps: (n, s) log π_ref (detached), required when beta != 0.
        is_weights: (n, s) or (n, 1) detached rollout importance weights (``rollout_importance_weights``),
            or None for no correction.

    Raises:
        ValueError: beta != 0 without ref_logps.
    """
    adv = advantages.unsqueeze(1)                                                  # (n, 1)
    ratio = torch.exp(logps - old_logps)                                           # (n, s)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = kl_k3(logps, ref_logps)
        per_token_loss = per_token_loss + beta * kl
    return PolicyLossTerms(
        per_token_loss=per_token_loss,
        ratio=ratio,
        kl=kl,
        is_low_clipped=(ratio < 1 - epsilon_low) & (adv < 0),
        is_high_clipped=(ratio > 1 + epsilon_high) & (adv > 0),
    )


@dataclass
class ImportanceWeights:
    """Rollout importance weights and what the truncation/mask did to them.

    Attributes:
        weights: (n, s) for token modes, (n, 1) for sequence modes; detached, multiply the per-token
            policy loss.
        ratio: the raw ratios π_old / π_rollout, same shape, before truncation or masking.
        clipped: bool, same shape: True where the ratio was outside [clip_min, clip_max] (truncated
            to the bound in ``*_truncate`` modes, set to 0 in ``*_mask`` modes).
    """

    weights: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def rollout_importance_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                               mode: str, clip_min: float | None = None,
                               clip_max: float | None = 3.0) -> ImportanceWeights:
    """Importance weights correcting the training/inference mismatch: the rollout engine sampled from
    π_rollout (its own kernels, bf16, ...), the loss assumes samples from π_old (the trainer's recompute).

    The per-token ratio is ``ρ_t = exp(old_logps_t - sampling_logps_t)``; sequence modes use the product
    over the completion, ``exp(Σ_t mask_t (old_t - sampling_t))``, broadcast to all its tokens. Ratios
    outside [clip_min, clip_max] are truncated to the bound (``*_truncate``; truncated IS, Yao et al. 2025
    "Your efficient RL framework secretly brings you off-policy RL training") or set to 0 (``*_mask``).
    NaN differences (a backend that could not score a token) count as 0, i.e. weight 1. Same semantics
    as TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` (``vllm_importance_sampling_*``).

    Args:
        old_logps: (n, s) trainer log π_old of the sampled tokens (detached).
        sampling_logps: (n, s) the rollout engine's sampling logprobs of the same tokens.
        mask: (n, s) 1 on completion tokens, 0 on padding.
        mode: one of IS_MODES.
        clip_min, clip_max: bounds (None = unbounded on that side).

    Returns:
        ImportanceWeights; with ``sampling_logps == old_logps`` (and clip_min <= 1 <= clip_max) every
        weight is exactly 1.0, so the correction is an exact no-op.

    Raises:
        ConfigError: unknown mode, or a truncate mode with neither bound.
    """
    if mode not in IS_MODES:
        raise ConfigError(f"importance sampling mode must be one of {IS_MODES}, got {mode!r}")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ConfigError(f"importance sampling mode {mode!r} needs clip_min or clip_max")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)        # (n, s)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)                                          # (n, 1)
    ratio = torch.exp(diff).detach()
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    clipped = (ratio < low) | (ratio > high)
    if mode.endswith("truncate"):
        weights = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        weights = ratio.masked_fill(clipped, 0.0)
    return ImportanceWeights(weights=weights, ratio=ratio, clipped=clipped)


@dataclass(frozen=True)
class LossNormalizer:
    """Counts over the whole optimizer step, so micro-batching does not change the gradient.

    Attributes:
        num_sequences: completions in the optimizer step on this rank (all micro-batches).
        num_tokens: active completion tokens in the optimizer step on this rank.
        global_num_tokens: active tokens in the optimizer step across all ranks (dapo).
        world_size: data-parallel ranks whose gradients are averaged (DDP/FSDP divide by it).
        max_completion_length: the constant L of dr_grpo.
    """

    num_sequences: int
    num_tokens: int
    global_num_tokens: int
    world_size: int = 1
    max_completion_length: int = 1


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
                   norm: LossNormalizer) -> torch.Tensor:
    """Reduce a micro-batch's per-token loss to the scalar whose gradient is added for this micro-batch.

    Summing the returned value over all micro-batches (and averaging over ranks, as DDP does) gives
    exactly the optimizer step's loss of GRPO_SPEC §2:

    | loss_type | step loss |
    |---|---|
    | grpo    | mean over sequences of (Σ_t ℓ_{i,t} / |o_i|)                 (DeepSeekMath Eq. 3) |
    | bnpo    | Σ ℓ / active tokens of this rank's step batch                                     |
    | dr_grpo | Σ ℓ / (sequences in the step × max_completion_length)         (Dr. GRPO)          |
    | dapo    | Σ ℓ / active tokens of the step across all ranks              (DAPO Eq. 8)        |

    Args:
        per_token_loss: (n, s) float.
        mask: (n, s) 1 for completion tokens counted in the loss, 0 for padding / after EOS.
        loss_type: one of LOSS_TYPES.
        norm: step-wide counts (see LossNormalizer).

    Returns:
        scalar tensor (0-dim).

    Raises:
        ConfigError: unknown loss_type.
    """
    mask = mask.to(per_token_loss.dtype)
    masked_sum = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        per_seq = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)   # (n,)
        return per_seq.sum() / max(norm.num_sequences, 1)
    if loss_type == "bnpo":
        return masked_sum / max(norm.num_tokens, 1)
    if loss_type == "dr_grpo":
        return masked_sum / (max(norm.num_sequences, 1) * norm.max_completion_length)
    if loss_type == "dapo":
        return masked_sum * norm.world_size / max(norm.global_num_tokens, 1)
    raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) gathered at ``index``, without materialising the (n, s, V) log-softmax.

    Args:
        logits: (n, s, V) float (any dtype; computed in float32).
        index: (n, s) token ids.
        temperature: the sampling temperature, so logprobs match the sampling distribution.

    Returns:
        (n, s) log-probabilities in float32 (float64 if the logits are float64).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)            # (n, s)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy (nats) of softmax(logits / T). (n, s, V) → (n, s), float32, no grad."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)
