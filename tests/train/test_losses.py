"""Loss conformance: r1kit's GRPO losses against TRL 1.16's GRPOTrainer._compute_loss and by hand.

TRL's method is called on fixed tensors with a stand-in ``self`` (its per-token logprob function is
replaced by one returning our fixed tensor), so the comparison is against TRL's own code.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from r1kit.errors import ConfigError
from r1kit.train.losses import (IS_MODES, LossNormalizer, aggregate_loss, group_advantages, kl_k3,
                                policy_loss_terms, rollout_importance_weights, selective_log_softmax)

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

N, S, L = 6, 5, 8  # completions, padded completion length, max_completion_length


def fixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(N, S, generator=g) * 3).requires_grad_(True)
    old = logps.detach() + (torch.rand(N, S, generator=g) - 0.5) * 0.8   # ratios well outside [0.8, 1.28]
    ref = logps.detach() + (torch.rand(N, S, generator=g) - 0.5) * 0.5
    adv = torch.tensor([1.2, -0.7, 0.0, 2.0, -1.5, 0.3])
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(S)[None] < lengths[:, None]).float()
    return logps, old, ref, adv, mask


def trl_loss(loss_type, beta, eps_low, eps_high, logps, old, ref, adv, mask, is_weights=None):
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=is_weights is not None,
        vllm_importance_sampling_correction=is_weights is not None, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=L, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
    )
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    inputs = {
        "prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.zeros(N, S, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    if is_weights is not None:
        inputs["importance_sampling_ratio"] = is_weights
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


def ours(loss_type, beta, eps_low, eps_high, logps, old, ref, adv, mask, micro=None, is_weights=None):
    norm = LossNormalizer(num_sequences=N, num_tokens=int(mask.sum()), global_num_tokens=int(mask.sum()),
                          max_completion_length=L)
    parts = micro or [list(range(N))]
    total = 0.0
    for idx in parts:
        terms = policy_loss_terms(logps[idx], old[idx], adv[idx], eps_low, eps_high, beta, ref[idx] if beta else None,
                                  None if is_weights is None else is_weights[idx])
        total = total + aggregate_loss(terms.per_token_loss, mask[idx], loss_type, norm)
    return total


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_loss_and_grad_match_trl(loss_type, beta, eps_high):
    logps, old, ref, adv, mask = fixed_batch()
    ref_loss = trl_loss(loss_type, beta, 0.2, eps_high, logps, old, ref, adv, mask)
    (ref_grad,) = torch.autograd.grad(ref_loss, logps)
    our_loss = ours(loss_type, beta, 0.2, eps_high, logps, old, ref, adv, mask)
    (our_grad,) = torch.autograd.grad(our_loss, logps)
    assert abs(our_loss.item() - ref_loss.item()) < 1e-6
    assert torch.allclose(our_grad, ref_grad, atol=1e-7)
    assert our_grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_invariance(loss_type):
    logps, old, ref, adv, mask = fixed_batch(1)
    full = ours(loss_type, 0.04, 0.2, 0.28, logps, old, ref, adv, mask)
    (g_full,) = torch.autograd.grad(full, logps)
    for split in ([[0, 1, 2], [3, 4, 5]], [[0], [1, 2, 3, 4], [5]], [[i] for i in range(N)]):
        acc = ours(loss_type, 0.04, 0.2, 0.28, logps, old, ref, adv, mask, micro=split)
        (g_acc,) = torch.autograd.grad(acc, logps)
        assert torch.allclose(g_full, g_acc, atol=1e-6), split
        assert abs(full.item() - acc.item()) < 1e-6


def test_trl_grpo_loss_is_not_accumulation_invariant_but_ours_is():
    """Documents why the step-wide normalizer exists: TRL's per-micro-batch mean over sequences,
    divided by the accumulation steps, weights sequences differently when micro-batches differ in
    size (here 1 + 5); ours gives every sequence 1/N."""
    logps, old, ref, adv, mask = fixed_batch(2)
    parts = [[0], [1, 2, 3, 4, 5]]
    trl_like = sum(((policy_loss_terms(logps[p], old[p], adv[p], 0.2, 0.2).per_token_loss * mask[p]).sum(-1)
                    / mask[p].sum(-1)).mean() / 2 for p in parts)
    full = ours("grpo", 0.0, 0.2, 0.2, logps, old, ref, adv, mask)
    assert abs(trl_like.item() - full.item()) > 1e-3
    assert abs(ours("grpo", 0.0, 0.2, 0.2, logps, old, ref, adv, mask, micro=parts).item() - full.item()) < 1e-6


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(r, 4, "group")
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5
    expect = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    assert torch.allclose(adv[:4], expect, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # zero-variance group: exactly zero advantage
    assert torch.allclose(std, torch.tensor([0.5] * 4 + [0.0] * 4))
    adv_none, _ = group_advantages(r, 4, "none")
    assert torch.allclose(adv_none, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    adv_batch, _ = group_advantages(r, 4, "batch")
    assert torch.allclose(adv_batch, adv_none / (r.std() + 1e-4))


def test_group_advantages_errors():
    with pytest.raises(ConfigError, match="num_generations"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ConfigError, match="not divisible"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")


def test_kl_k3_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    d = -0.5
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([torch.exp(torch.tensor(d)) - d - 1, 0.0]))


def test_ratio_one_gives_zero_loss_but_nonzero_grad():
    """GRPO_SPEC §1: μ = 1, π_old = π_θ: the loss value is 0, its gradient is not."""
    logps, _, _, adv, mask = fixed_batch()
    adv = adv - adv.mean()  # group advantages sum to zero
    terms = policy_loss_terms(logps, logps.detach(), adv, 0.2, 0.2)
    loss = aggregate_loss(terms.per_token_loss, mask, "grpo",
                          LossNormalizer(N, int(mask.sum()), int(mask.sum()), 1, L))
    (g,) = torch.autograd.grad(loss, logps)
    assert abs(loss.item()) < 1e-6 and g.abs().sum() > 0
    # d/dlogp of -A·exp(logp - old) at ratio 1 is -A, divided by |o_i| and N
    assert torch.allclose(g[0, 0], -adv[0] / mask[0].sum() / N)


def test_selective_log_softmax_matches_full():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    idx = torch.randint(0, 11, (2, 3), generator=g)
    full = torch.log_softmax(logits / 0.7, -1).gather(-1, idx[..., None])[..., 0]
    assert torch.allclose(selective_log_softmax(logits, idx, 0.7), full, atol=1e-6)


def test_unknown_loss_type():
    with pytest.raises(ConfigError, match="loss_type"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "ppo", LossNormalizer(1, 1, 1))


# ----- rollout importance sampling (training/inference mismatch) -----

def is_case():
    """Two completions (3 and 2 tokens, padded to 4) whose π_old/π_rollout ratios are chosen by hand:
    row 0: 2, 0.25, 1.5 (product 0.75); row 1: 4, 0.8 (product 3.2). Padding holds garbage."""
    ratios = torch.tensor([[2.0, 0.25, 1.5, 1.0], [4.0, 0.8, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    sampling = torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-3.0, -0.1, -9.0, 5.0]], dtype=torch.float64)
    old = torch.where(mask > 0, sampling + ratios.log(), torch.tensor(-4.0, dtype=torch.float64))
    return old, sampling, mask


IS_BY_HAND = {  # clip_min 0.5, clip_max 3: weights on the real tokens (token modes) or per completion
    "token_truncate": ([[2.0, 0.5, 1.5], [3.0, 0.8]], [[False, True, False], [True, False]]),
    "token_mask": ([[2.0, 0.0, 1.5], [0.0, 0.8]], [[False, True, False], [True, False]]),
    "sequence_truncate": ([[0.75], [3.0]], [[False], [True]]),
    "sequence_mask": ([[0.75], [0.0]], [[False], [True]]),
}


@pytest.mark.parametrize("mode", IS_MODES)
def test_importance_weights_by_hand(mode):
    old, sampling, mask = is_case()
    isw = rollout_importance_weights(old, sampling, mask, mode, clip_min=0.5, clip_max=3.0)
    want, want_clipped = IS_BY_HAND[mode]
    rows = [(0, 3), (1, 2)] if mode.startswith("token") else [(0, 1), (1, 1)]
    for (r, n), w, c in zip(rows, want, want_clipped):
        assert torch.allclose(isw.weights[r, :n], torch.tensor(w, dtype=torch.float64), atol=1e-12), (mode, r)
        assert isw.clipped[r, :n].tolist() == c
    if mode.startswith("token"):
        assert torch.equal(isw.weights[mask == 0], torch.ones(3, dtype=torch.float64))  # padding: diff masked to 0
    else:
        assert isw.weights.shape == (2, 1) and torch.allclose(isw.ratio[:, 0], torch.tensor([0.75, 3.2], dtype=torch.float64))


def test_importance_weights_one_sided_bounds():
    old, sampling, mask = is_case()
    only_max = rollout_importance_weights(old, sampling, mask, "token_truncate", clip_min=None, clip_max=3.0)
    assert torch.allclose(only_max.weights[0, :3], torch.tensor([2.0, 0.25, 1.5], dtype=torch.float64))
    only_min = rollout_importance_weights(old, sampling, mask, "sequence_mask", clip_min=0.8, clip_max=None)
    assert torch.allclose(only_min.weights[:, 0], torch.tensor([0.0, 3.2], dtype=torch.float64))
    with pytest.raises(ConfigError, match="mode"):
        rollout_importance_weights(old, sampling, mask, "token_clip")
    with pytest.raises(ConfigError, match="clip_min or clip_max"):
        rollout_importance_weights(old, sampling, mask, "token_truncate", clip_min=None, clip_max=None)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_importance_weighted_loss_matches_trl(mode, beta):
    """TRL 1.16 multiplies the clipped per-token policy loss by ``importance_sampling_ratio`` before adding
    β·KL; our is_weights must give the same loss and gradient for every loss_type."""
    logps, old, ref, adv, mask = fixed_batch(3)
    g = torch.Generator().manual_seed(4)
    sampling = old + (torch.rand(N, S, generator=g) - 0.5) * 0.6
    weights = rollout_importance_weights(old, sampling, mask, mode, clip_min=0.8, clip_max=1.2).weights
    assert weights.unique().numel() > 2  # truncation / masking active and not everything clipped
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        ref_loss = trl_loss(loss_type, beta, 0.2, 0.28, logps, old, ref, adv, mask, is_weights=weights)
        (ref_grad,) = torch.autograd.grad(ref_loss, logps)
        our_loss = ours(loss_type, beta, 0.2, 0.28, logps, old, ref, adv, mask, is_weights=weights)
        (our_grad,) = torch.autograd.grad(our_loss, logps)
        assert abs(our_loss.item() - ref_loss.item()) < 1e-6, loss_type
        assert torch.allclose(our_grad, ref_grad, atol=1e-7), loss_type


@pytest.mark.parametrize("mode", IS_MODES)
def test_identical_sampling_logprobs_make_the_correction_a_no_op(mode):
    logps, old, ref, adv, mask = fixed_batch(5)
    isw = rollout_importance_weights(old, old.clone(), mask, mode, clip_min=0.5, clip_max=2.0)
    assert torch.equal(isw.weights, torch.ones_like(isw.weights)) and not isw.clipped.any()
    plain = ours("dapo", 0.04, 0.2, 0.28, logps, old, ref, adv, mask)
    (g_plain,) = torch.autograd.grad(plain, logps)
    corrected = ours("dapo", 0.04, 0.2, 0.28, logps, old, ref, adv, mask, is_weights=isw.weights)
    (g_corr,) = torch.autograd.grad(corrected, logps)
    assert torch.equal(plain, corrected) and torch.equal(g_plain, g_corr)
