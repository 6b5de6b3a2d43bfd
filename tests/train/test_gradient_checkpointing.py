"""Activation checkpointing (``gradient_checkpointing``) leaves the update unchanged (float64): one GRPO
round (padding-free and padded paths) and one SFT step on the tiny Llama, and the DeepSeek-V3
pretraining gradients with per-block checkpointing, expert loads counted once; and it is really on:
the forward keeps fewer saved activations."""

import pytest
import torch
from test_distributed import _grpo_update, _rollout, _sft_step  # the 1-process scenarios
from v3_helpers import one_thread, tiny_model  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.errors import ConfigError
from r1kit.models.deepseek_v3 import pretrain_loss
from r1kit.models.loading import load_policy
from r1kit.train.grpo import collate, completion_logprobs
from r1kit.train.loop import enable_gradient_checkpointing


def _equal(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-10, msg=k)


def saved_numel(fn) -> int:
    """Elements of the tensors autograd saves for the backward while ``fn()`` runs (checkpointed blocks
    keep theirs behind the checkpoint's own hooks, so only block inputs count)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("padding_free", [True, False])
def test_grpo_round_is_the_same_with_gradient_checkpointing(tiny_model_dir, tmp_path, padding_free):
    off = _grpo_update(str(tiny_model_dir), tmp_path / "off", padding_free=padding_free)
    on = _grpo_update(str(tiny_model_dir), tmp_path / "on", padding_free=padding_free, gradient_checkpointing=True)
    assert any(v.abs().max() > 0 for k, v in off.items() if k.startswith("grad/"))
    _equal(on, off)


def test_sft_step_is_the_same_with_gradient_checkpointing(tiny_model_dir, tmp_path):
    _equal(_sft_step(str(tiny_model_dir), tmp_path / "on", gradient_checkpointing=True),
           _sft_step(str(tiny_model_dir), tmp_path / "off"))


def test_checkpointed_transformers_policy_saves_fewer_activations(tiny_model_dir):
    ro = _rollout()
    mb = collate(ro.prompt_ids, ro.completion_ids, list(range(4)), 0)
    saved = {}
    for on in (False, True):
        model, _ = load_policy(str(tiny_model_dir), dtype=torch.float64)
        if on:
            enable_gradient_checkpointing(model)
        model.train()
        saved[on] = saved_numel(lambda: completion_logprobs(model, mb, 1.0, False, prefix_cache=not on)[0].sum())
    assert saved[True] < 0.8 * saved[False]


def _v3_grads(checkpointed: bool):
    model = tiny_model(seed=0).cast(torch.float64).train()
    if checkpointed:
        model.activation_checkpointing_enable()
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def step():
        loss = pretrain_loss(model, model(ids, attention_mask=mask), ids, mask)["loss"]
        loss.backward()

    saved = saved_numel(step)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, [m.tokens_per_expert.clone() for m in model.moe_layers()], saved


def test_v3_per_block_checkpointing_keeps_gradients_and_counts_expert_loads_once():
    (g_on, loads_on, saved_on), (g_off, loads_off, saved_off) = _v3_grads(True), _v3_grads(False)
    _equal(g_on, g_off)
    for a, b in zip(loads_on, loads_off):
        assert torch.equal(a, b) and a.sum() > 0                 # the recompute adds no second count
    assert saved_on < 0.8 * saved_off


def test_v3_refuses_reentrant_checkpointing():
    with pytest.raises(ConfigError, match="use_reentrant=False only"):
        tiny_model().activation_checkpointing_enable({"use_reentrant": True})


def test_a_model_without_checkpointing_support_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"gradient_checkpointing: Linear has no .*--gradient-checkpointing false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
