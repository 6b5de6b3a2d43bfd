"""DeepSeek-V3 training pieces: aux-loss-free bias update, balance loss, MTP layout and loss."""

import pytest
import torch
from v3_helpers import one_thread, tiny_model  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.models.deepseek_v3 import (
    expert_load_metrics,
    pretrain_loss,
    sequence_balance_loss,
    shifted_cross_entropy,
    update_router_bias,
)

TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def skewed_model():
    """Tiny model whose routers send every token to experts 0 and 1 (aligned with the mean MoE input)."""
    model = tiny_model(randomize_bias=False)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
             for m in model.moe_layers()]
    with torch.no_grad():
        model(TOKENS, run_mtp=True)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for moe in model.moe_layers():
            mean = inputs[moe].reshape(-1, inputs[moe].shape[-1]).mean(0)
            moe.gate.weight[:2] += 4 * mean / mean.norm()
    return model.train()


def max_over_mean_per_step(gamma, steps=10):
    model = skewed_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ratios = []
    for _ in range(steps):
        pretrain_loss(model, model(TOKENS), TOKENS)["loss"].backward()
        opt.step()
        opt.zero_grad()
        metrics = update_router_bias(model, gamma)
        ratios.append(max(v for k, v in metrics.items() if k.endswith("max_over_mean")))
    return ratios


def test_bias_update_balances_a_skewed_router_and_gamma_zero_does_not():
    balanced = max_over_mean_per_step(gamma=0.1)
    frozen = max_over_mean_per_step(gamma=0.0)
    top = 8 / 3  # every token picks expert 0: load T over mean T·K/E
    assert balanced[0] == pytest.approx(top) and frozen[0] == pytest.approx(top)
    assert sum(balanced[-4:]) / 4 < 0.75 * top
    assert min(frozen[-4:]) > 0.9 * top


def test_bias_moves_by_gamma_sign_and_stays_out_of_autograd():
    model = tiny_model(randomize_bias=False).train()
    moe = model.moe_layers()[0]
    pretrain_loss(model, model(TOKENS), TOKENS)["loss"].backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert not moe.gate.e_score_correction_bias.requires_grad
    load = moe.tokens_per_expert.clone()
    assert load.sum() == TOKENS.numel() * 3  # K=3 experts per token
    metrics = expert_load_metrics(model)
    assert metrics["moe/layer1/max_over_mean"] == pytest.approx((load.max() / load.mean()).item())
    update_router_bias(model, gamma=0.01)
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert moe.tokens_per_expert.sum() == 0


def test_no_grad_forwards_do_not_count_load():
    model = tiny_model().train()
    with torch.no_grad():
        model(TOKENS)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())


def test_sequence_balance_loss_hand_values():
    # uniform routing: f_i = 1 and P_i = 1/E, so Σ f_i P_i = 1
    scores = torch.full((1, 4, 4), 0.5)
    chosen = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1.0]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert sequence_balance_loss(scores, chosen, valid, top_k=2).item() == pytest.approx(1.0)
    # all tokens on experts 0,1 whose normalised affinity is 0.4 each: f = (2, 2, 0, 0), P = (.4, .4, .1, .1)
    scores = torch.tensor([0.8, 0.8, 0.2, 0.2]).expand(1, 4, 4)
    chosen = torch.tensor([1, 1, 0, 0.0]).expand(1, 4, 4)
    assert sequence_balance_loss(scores, chosen, valid, top_k=2).item() == pytest.approx(2 * 0.4 * 2)
    # a padded token is excluded from T
    padded = torch.tensor([[True, True, True, False]])
    chosen_pad = chosen.clone()
    chosen_pad[:, 3] = 0
    assert sequence_balance_loss(scores, chosen_pad, padded, top_k=2).item() == pytest.approx(1.6)


def test_mtp_takes_the_embedding_first():
    """Spec §5: checkpoints and vLLM concatenate [enorm(Emb(t_{i+1})), hnorm(h_i)]. With eh_proj's
    hidden half zeroed, the MTP logits depend on the tokens only, not on the main layers."""
    model = tiny_model()
    mtp = model.mtp_layers[0]
    d = model.config.hidden_size
    with torch.no_grad():
        mtp.eh_proj.weight[:, d:] = 0
        before = model(TOKENS, run_mtp=True)
        model.main_layers[0].self_attn.o_proj.weight.mul_(3.0)
        after = model(TOKENS, run_mtp=True)
    assert before.mtp_logits[0].shape == (2, 11, 97)
    torch.testing.assert_close(after.mtp_logits[0], before.mtp_logits[0])
    assert (after.logits - before.logits).abs().max() > 1e-3  # the main model did change


def test_pretrain_loss_combines_lm_mtp_and_balance():
    model = tiny_model().train()
    out = model(TOKENS)
    parts = pretrain_loss(model, out, TOKENS)
    mask = torch.ones_like(TOKENS, dtype=torch.bool)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), TOKENS[:, 1:].reshape(-1))
    mtp = torch.nn.functional.cross_entropy(out.mtp_logits[0][:, :-1].reshape(-1, 97), TOKENS[:, 2:].reshape(-1))
    assert parts["lm"].item() == pytest.approx(lm.item(), rel=1e-6)
    assert parts["mtp"].item() == pytest.approx(mtp.item(), rel=1e-6)
    assert shifted_cross_entropy(out.mtp_logits[0], TOKENS, mask, offset=2).item() == pytest.approx(mtp.item())
    expected = lm + 0.3 * mtp + 0.0001 * parts["balance"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["balance"].item() > 0.9  # Σ f_i P_i is about 1 near balance


def test_mtp_runs_in_training_only_when_weighted():
    model = tiny_model().train()
    assert len(model(TOKENS).mtp_logits) == 1
    with torch.no_grad():
        assert model(TOKENS).mtp_logits == []  # no gradients: an evaluation pass
    model.config.mtp_loss_weight = 0.0  # e.g. GRPO, where only next-token logprobs matter
    assert model(TOKENS).mtp_logits == []
