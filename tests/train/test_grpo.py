"""GRPO trainer: one optimizer step's gradient is independent of micro-batching and of skipping
zero-advantage completions; resume is bit-exact; guards stop on non-finite values."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1kit.config import load_config
from r1kit.data.base import Example
from r1kit.errors import TrainingStopped
from r1kit.models.loading import load_policy
from r1kit.rewards.base import Verdict
from r1kit.rollout.base import Completion
from r1kit.rollout.hf import HFGenerateEngine
from r1kit.train.grpo import GRPOTrainer, RewardScorer, Rollout

HERE = Path(__file__).parent


class _NoVerifier:
    name = "none"

    def verify_batch(self, completions, examples, truncated=None):
        return [Verdict(False, 0.0, "none") for _ in completions]


def _rollout(G=4, groups=3, seed=0, vocab=1000):
    """A fixed rollout: varied prompt/completion lengths; group 1 has all-equal rewards (A = 0)."""
    g = torch.Generator().manual_seed(seed)
    n = G * groups
    rewards = torch.rand(n, generator=g)
    rewards[G:2 * G] = 0.5
    from r1kit.train.losses import group_advantages

    adv, std = group_advantages(rewards, G)
    prompts = [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(groups) for _ in range(G)]
    comps = [torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    ex = Example("toy/0", "p", "1")
    return Rollout(examples=[ex] * n, prompt_ids=prompts, completion_ids=comps,
                   sampling_logprobs=[[0.0] * len(c) for c in comps], truncated=[False] * n, texts=[""] * n,
                   rewards_per_func=rewards[:, None].double(), rewards=rewards.double(), advantages=adv.double(),
                   group_std=std,
                   verdicts=[Verdict(False, 0.0, "x")] * n)


def _trainer(model, tok, tmp_path, **over):
    cfg = load_config(overrides=dict(learning_rate=0.0, max_grad_norm=0.0, num_generations=4, prompts_per_step=3,
                                     bf16="false", max_completion_length=8) | over)
    engine = HFGenerateEngine(model, tok)
    scorer = RewardScorer(cfg, _NoVerifier(), [])
    return GRPOTrainer(cfg, model, tok, [Example("toy/0", "p", "1")], lambda e: e.prompt, scorer, engine, tmp_path)


def _grads_after_update(tiny_model_dir, tmp_path, ro, **over):
    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)  # float64: differences are the method's
    tr = _trainer(model, tok, tmp_path, **over)
    ro = copy.deepcopy(ro)
    idx = tr.forwarded(ro)
    tr.compute_old_and_ref(ro, idx)
    tr.update(ro, idx)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, idx


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_step_gradient_independent_of_micro_batches(tiny_model_dir, tmp_path, loss_type, beta):
    ro = _rollout()
    ref, _ = _grads_after_update(tiny_model_dir, tmp_path, ro, loss_type=loss_type, beta=beta, micro_batch_size=12)
    for mbs in (1, 5):
        got, _ = _grads_after_update(tiny_model_dir, tmp_path, ro, loss_type=loss_type, beta=beta, micro_batch_size=mbs)
        for name in ref:
            assert torch.allclose(ref[name], got[name], atol=1e-6, rtol=0), (name, mbs)
    assert sum(g.abs().sum() for g in ref.values()) > 0


def test_padding_free_update_equals_padded_update(tiny_model_dir, tmp_path):
    ro = _rollout()
    packed, _ = _grads_after_update(tiny_model_dir, tmp_path, ro, loss_type="grpo", beta=0.05, micro_batch_size=5)
    padded, _ = _grads_after_update(tiny_model_dir, tmp_path, ro, loss_type="grpo", beta=0.05, micro_batch_size=5,
                                    padding_free=False)
    for name in packed:
        assert torch.allclose(packed[name], padded[name], atol=1e-9, rtol=0), name


@pytest.mark.parametrize("padding_free", [True, False])
def test_pad_to_multiple_of_keeps_the_loss_and_gradients(tiny_model_dir, tmp_path, padding_free):
    """Micro-batch lengths and scored-token counts rounded up to 32 (as SFT's, for flat memory) give the
    step's loss and gradients of the exact shapes (float64; β > 0, so the reference pass is rounded too;
    micro-batches of 3 hold one prompt or two of different lengths)."""
    from r1kit.train.grpo import collate, pack_rows

    ro = _rollout()
    mb = collate(ro.prompt_ids, ro.completion_ids, [0, 1, 2, 3, 4], pad_id=0, multiple=32)
    assert mb.prompt_ids.shape[1] == 32 == mb.completion_ids.shape[1] and mb.multiple == 32
    packed = pack_rows(mb, pad_id=0)
    n = sum(len(ro.completion_ids[i]) for i in range(5))
    assert packed.input_ids.shape[1] == 32 and len(packed.src_row) == 32 and len(packed.target) == n
    out = []
    for multiple in (1, 32):
        model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
        tr = _trainer(model, tok, tmp_path, loss_type="grpo", beta=0.05, micro_batch_size=3,
                      padding_free=padding_free, pad_to_multiple_of=multiple)
        r = copy.deepcopy(ro)
        idx = tr.forwarded(r)
        tr.compute_old_and_ref(r, idx)
        stats = tr.update(r, idx)
        out.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (exact, g_exact), (rounded, g_rounded) = out
    assert exact["loss"] != 0.0 and abs(exact["loss"] - rounded["loss"]) < 1e-12
    for key in ("entropy", "kl"):
        assert abs(exact[key] - rounded[key]) < 1e-12, key
    for name in g_exact:
        torch.testing.assert_close(g_exact[name], g_rounded[name], rtol=0, atol=1e-12, msg=name)
    assert sum(g.abs().sum() for g in g_exact.values()) > 0


def test_second_iteration_uses_first_pass_logprobs_as_old(tiny_model_dir, tmp_path):
    """μ = 2 with one optimizer step per pass: π_old kept from the first (grad) pass gives the same
    weights, to float64 rounding, as a separate no-grad forward before the update (TRL's way)."""
    ro = _rollout()
    weights = []
    for separate in (False, True):
        model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
        tr = _trainer(model, tok, tmp_path, loss_type="dapo", num_iterations=2, micro_batch_size=5, learning_rate=1e-2)
        r = copy.deepcopy(ro)
        idx = tr.forwarded(r)
        tr.compute_old_and_ref(r, idx)
        assert r.old_logps is None
        if separate:
            r.old_logps = tr._logps_for(tr.policy, r, idx)
        stats = tr.update(r, idx)
        assert sorted(r.old_logps) == sorted(idx)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    moved = load_policy(str(tiny_model_dir), dtype=torch.float64)[0].model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(weights[0]["model.layers.0.mlp.up_proj.weight"], moved)
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-12, rtol=0), name
    assert stats["clip_ratio/region_mean"] > 0.0      # the second pass ran off-policy: its ratios moved past ε


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_skipping_zero_advantage_is_exact(tiny_model_dir, tmp_path, loss_type):
    ro = _rollout()
    skip, idx_skip = _grads_after_update(tiny_model_dir, tmp_path, ro, loss_type=loss_type, micro_batch_size=4)
    full, idx_full = _grads_after_update(tiny_model_dir, tmp_path, ro, loss_type=loss_type, micro_batch_size=4,
                                         skip_zero_advantage=False)
    assert len(idx_skip) == 8 and len(idx_full) == 12  # group 1 (4 completions) has A = 0 and is skipped
    for name in skip:
        assert torch.allclose(skip[name], full[name], atol=1e-7), name


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_importance_correction_with_identical_logprobs_is_an_exact_no_op(tiny_model_dir, tmp_path, mode):
    """Sampling logprobs equal to the trainer's (same micro-batches, so bit-identical): every weight is
    exactly 1 and the step's gradient equals the uncorrected one bit for bit."""
    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
    tr = _trainer(model, tok, tmp_path, micro_batch_size=4)
    ro = _rollout()
    idx = tr.forwarded(ro)
    trainer_logps = tr._logps_for(model, ro, idx)
    for i in idx:
        ro.sampling_logprobs[i] = trainer_logps[i].tolist()
    plain, _ = _grads_after_update(tiny_model_dir, tmp_path, ro, micro_batch_size=4)
    corrected, _ = _grads_after_update(tiny_model_dir, tmp_path, ro, micro_batch_size=4,
                                       rollout_importance_sampling_correction=True,
                                       rollout_importance_sampling_mode=mode,
                                       rollout_importance_sampling_clip_min=0.9,
                                       rollout_importance_sampling_clip_max=1.1)
    assert all(torch.equal(plain[n], corrected[n]) for n in plain)
    assert sum(g.abs().sum() for g in plain.values()) > 0
    # and the weights do act: the rollout's original logprobs (all 0.0) are far from the trainer's
    off, _ = _grads_after_update(tiny_model_dir, tmp_path, _rollout(), micro_batch_size=4,
                                 rollout_importance_sampling_correction=True, rollout_importance_sampling_mode=mode)
    assert any(not torch.allclose(plain[n], off[n]) for n in plain)


def test_grpo_run_with_importance_correction_logs_its_ratios(tiny_model_dir, toy_task, tmp_path, monkeypatch):
    """A full run (r1kit engine, fp32 rollouts and training) with the correction on: the engine's
    sampling logprobs equal the trainer's recompute to ~1e-5, so the weights stay at 1 and none is clipped."""
    import json

    monkeypatch.syspath_prepend(str(HERE))
    from r1kit.train import recipe

    out = tmp_path / "run"
    cfg = load_config(overrides=dict(model=str(tiny_model_dir), task=str(toy_task), template="direct",
                                     answer_extraction="any", reward_funcs=["toy_rewards:distinct_chars"],
                                     num_generations=4, prompts_per_step=2, max_completion_length=8,
                                     learning_rate=1e-3, max_steps=2, bf16="false", rollout_backend="engine",
                                     rollout_importance_sampling_correction=True,
                                     rollout_importance_sampling_mode="token_truncate",
                                     rollout_importance_sampling_clip_max=2.0, output=str(out), plot=False))
    recipe.run_grpo(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    key = "sampling/importance_sampling_ratio"
    for r in rows:
        assert r[f"{key}/min"] <= r[f"{key}/mean"] <= r[f"{key}/max"]
        assert abs(r[f"{key}/mean"] - 1) < 1e-4 and abs(r[f"{key}/min"] - 1) < 1e-3 and abs(r[f"{key}/max"] - 1) < 1e-3
        assert r[f"{key}/clipped_fraction"] == 0.0
        assert r["logprob_mismatch/max"] < 1e-3
        assert 50 < r["rss_mb"] < 1e6                                     # MiB of this process after the step


def _cli(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "r1kit.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def _train_args(tiny_model_dir, toy_task, out, steps=4):
    return ["train", "grpo", "--model", str(tiny_model_dir), "--task", str(toy_task), "--template", "direct",
            "--answer-extraction", "any", "--reward-funcs", "accuracy,toy_rewards:distinct_chars",
            "--num-generations", "4", "--prompts-per-step", "2", "--max-completion-length", "8",
            "--micro-batch-size", "3", "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--max-steps", str(steps),
            "--save-steps", "1", "--save-total-limit", "10", "--bf16", "false", "--num-threads", "1",
            "--output", str(out), "--no-progress", "--log-completions-steps", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parents[1] / "src"), env.get("PYTHONPATH", "")])
    return env


def test_resume_after_kill_is_bit_exact(tiny_model_dir, toy_task, tmp_path):
    straight = tmp_path / "straight"
    r = _cli(_train_args(tiny_model_dir, toy_task, straight), env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "r1kit.cli", *_train_args(tiny_model_dir, toy_task, killed)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before checkpoint-2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    r = _cli(_train_args(tiny_model_dir, toy_task, killed) + ["--resume"], env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights
    rows_a = (straight / "metrics.jsonl").read_text().splitlines()
    rows_b = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 4
    for key in ('"reward"', '"step"'):
        assert [ln.split(key)[1][:12] for ln in rows_a] == [ln.split(key)[1][:12] for ln in rows_b]
    for f in ("metrics.jsonl", "samples.jsonl", "curves.png", "config.yaml"):
        assert (straight / f).is_file(), f


def test_nan_gradient_stops_and_last_checkpoint_loads(tiny_model_dir, toy_task, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    from r1kit.train import recipe

    out = tmp_path / "run"
    cfg = load_config(overrides=dict(model=str(tiny_model_dir), task=str(toy_task), template="direct",
                                     answer_extraction="any", reward_funcs=["toy_rewards:distinct_chars"],
                                     num_generations=4, prompts_per_step=2, max_completion_length=8,
                                     learning_rate=1e-3, max_steps=5, save_steps=1, bf16="false", output=str(out)))
    calls = {"n": 0}
    real_update = GRPOTrainer.update

    def poisoned_update(self, ro, index):
        calls["n"] += 1
        if calls["n"] == 3:  # third step: a NaN reaches the gradients
            self.policy.model.norm.weight.register_hook(lambda g: g * float("nan"))
        return real_update(self, ro, index)

    monkeypatch.setattr(GRPOTrainer, "update", poisoned_update)
    with pytest.raises(TrainingStopped, match=r"non-finite grad norm.*checkpoint-2"):
        recipe.run_grpo(cfg, progress=False)
    assert not (out / "checkpoint-3").exists() and not (out / "final").exists()
    model, _ = load_policy(str(out / "checkpoint-2" / "policy"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = load_file(str(out / "checkpoint-2" / "policy" / "model.safetensors"))
    assert any(not torch.equal(saved[k], v) for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items())


def _check_shared_prefix_logprobs(model, vocab: int, weights, atol: float, rtol: float = 0.0,
                                  padding_free: bool = False, multiple: int = 1):
    """completion_logprobs runs each distinct prompt once; values and gradients (w.r.t. ``weights``) must
    equal a plain forward over the left-padded prompt + right-padded completion concatenation, also
    with the micro-batch's lengths rounded up to ``multiple`` (more masked padding)."""
    from r1kit.train.grpo import collate, completion_logprobs
    from r1kit.train.losses import selective_log_softmax

    g = torch.Generator().manual_seed(1)
    distinct = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 7)]
    prompts = [distinct[i // 3] for i in range(9)]
    comps = [torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
             for _ in range(9)]
    mb = collate(prompts, comps, list(range(9)), pad_id=2, multiple=multiple)
    assert mb.prompt_ids.shape[0] == 3 and mb.prompt_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert mb.prompt_ids.shape[1] % multiple == 0 == mb.completion_ids.shape[1] % multiple
    P, C = max(map(len, prompts)), max(map(len, comps))
    got, _ = completion_logprobs(model, mb, 0.7, bf16=False, padding_free=padding_free)
    assert got.shape == mb.completion_ids.shape
    got = got[:, :C]
    ids = torch.full((9, P + C), 2)
    att = torch.zeros((9, P + C), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, comps)):
        ids[r, P - len(p):P + len(c)] = torch.tensor(p + c)
        att[r, P - len(p):P + len(c)] = 1
    logits = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    ref = selective_log_softmax(logits[:, P - 1:-1], ids[:, P:], 0.7)
    m = mb.mask[:, :C].double()
    assert mb.mask[:, C:].sum() == 0 and torch.allclose(got * m, ref * m, atol=1e-10)
    for g_got, g_ref in zip(torch.autograd.grad((got * m).sum(), weights), torch.autograd.grad((ref * m).sum(), weights)):
        assert torch.allclose(g_got, g_ref, atol=atol, rtol=rtol) and g_ref.abs().max() > 1e-4


@pytest.mark.parametrize("multiple", [1, 32])
def test_shared_prefix_logprobs_equal_one_concatenated_forward(tiny_model_dir, multiple):
    model, _ = load_policy(str(tiny_model_dir), dtype=torch.float64)
    _check_shared_prefix_logprobs(model, 1000, [model.model.layers[0].self_attn.q_proj.weight], atol=1e-6,
                                  multiple=multiple)


@pytest.mark.parametrize("multiple", [1, 32])
def test_padding_free_logprobs_equal_one_concatenated_forward(tiny_model_dir, multiple):
    """Completions packed behind one prompt copy under a block mask: same values and gradients."""
    from r1kit.train.grpo import can_pack

    model, _ = load_policy(str(tiny_model_dir), dtype=torch.float64)
    assert can_pack(model)
    _check_shared_prefix_logprobs(model, 1000, [model.model.layers[0].self_attn.q_proj.weight], atol=1e-6,
                                  padding_free=True, multiple=multiple)


def test_packing_is_refused_where_the_block_mask_would_not_be_exact(tiny_model_dir):
    from r1kit.train.grpo import can_pack

    model, _ = load_policy(str(tiny_model_dir))
    assert can_pack(model)
    model.config.sliding_window, model.config.use_sliding_window = 16, True
    assert not can_pack(model)                  # the packed mask would drop the window
    model.config.sliding_window = None
    model.config._attn_implementation = "eager"
    assert not can_pack(model)                  # eager attention adds the mask as numbers


def test_pack_rows_layout_and_budget():
    """Two prompts (lengths 2 and 3, left-padded to 3) with completions of 2, 1 | 3, 2 tokens; a budget of
    4 completion tokens splits the second group over two rows, each with its own prompt copy."""
    from r1kit.train.grpo import collate, pack_rows

    prompts = [[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]]
    comps = [[10, 11], [12], [13, 14, 15], [16, 17]]
    packed = pack_rows(collate(prompts, comps, [0, 1, 2, 3], pad_id=0), pad_id=0, budget=4)
    assert packed.input_ids.tolist() == [[5, 6, 10, 11, 12, 0], [7, 8, 9, 13, 14, 15], [7, 8, 9, 16, 17, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]]
    # token 12 (completion 1) sees the prompt and itself, not completion 0
    assert packed.allowed[0, 0, 4].tolist() == [True, True, False, False, True, False]
    assert packed.allowed[0, 0, 5].tolist() == [False] * 5 + [True]                   # pad: itself only
    assert list(zip(packed.src_row.tolist(), packed.src_pos.tolist())) == [
        (0, 1), (0, 2), (0, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3)]
    assert packed.target.tolist() == [10, 11, 12, 13, 14, 15, 16, 17]
    assert list(zip(packed.dst_row.tolist(), packed.dst_col.tolist())) == [
        (0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]


@pytest.mark.parametrize("multiple", [1, 32])
def test_shared_prefix_logprobs_equal_one_concatenated_forward_for_deepseek_v3(multiple):
    """The V3 path runs on r1kit's naive-MLA KVCache; a MoE layer and its router are exercised. Gradients
    to fp32 precision: the router computes in fp32 even in a float64 model."""
    from r1kit.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=40, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, initializer_range=0.2)).cast(torch.float64)
    weights = [model.model.layers[0].self_attn.kv_b_proj.weight, model.model.layers[1].mlp.gate.weight]
    _check_shared_prefix_logprobs(model, 40, weights, atol=1e-6, rtol=1e-6, multiple=multiple)


def test_time_budget_stops_after_the_crossing_step_and_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """max_train_minutes: the loop stops at the first step boundary past the budget, and the last
    step is checkpointed so --resume continues from it. The clock is faked: 50 s per step."""
    import r1kit.train.grpo as grpo_mod

    model, tok = load_policy(str(tiny_model_dir))
    tr = _trainer(model, tok, tmp_path, max_steps=10, max_train_minutes=2.0, save_steps=0)
    ticks = iter(range(0, 10_000, 50))
    monkeypatch.setattr(grpo_mod.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(tr, "train_step", lambda: (setattr(tr, "step", tr.step + 1), {
        "reward": 0.0, "accuracy": 0.0, "completions/mean_length": 1.0, "time/step": 50.0})[1])
    monkeypatch.setattr(tr.logger, "log", lambda step, m: None)
    tr.train(progress=False)
    # the clock reads 0 at the start, then 50, 100, 150 at the checks before steps 1, 2, 3: 150 s ≥ 120 s
    assert tr.step == 2
    assert (tmp_path / "checkpoint-2").is_dir()


def _dead(ro: Rollout) -> Rollout:
    """``ro`` with every reward 0.5: all groups have zero std, so with β = 0 nothing is forwarded."""
    ro.rewards[:] = 0.5
    ro.rewards_per_func[:] = 0.5
    ro.advantages.zero_()
    ro.group_std.zero_()
    return ro


@pytest.mark.parametrize("num_iterations", [1, 2])  # 2: old logprobs and the mismatch come from a no-grad pass
def test_a_step_that_forwards_nothing_logs_the_same_keys(tiny_model_dir, tmp_path, num_iterations):
    """Constant rewards: loss and grad_norm are exactly 0 (every advantage is 0, β = 0); what was not
    measured is NaN in the step's metrics and null in metrics.jsonl, never a missing key."""
    import json
    import math

    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
    tr = _trainer(model, tok, tmp_path, num_iterations=num_iterations)
    rollouts = iter([_rollout(), _dead(_rollout(seed=1))])
    tr.generate_and_score = lambda: next(rollouts)
    live, dead = tr.train_step(), tr.train_step()
    assert live["forwarded_fraction"] == pytest.approx(8 / 12) and dead["forwarded_fraction"] == 0.0
    assert list(live) == list(dead)
    assert dead["loss"] == 0.0 and dead["grad_norm"] == 0.0 and dead["reward"] == 0.5
    unmeasured = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                  "logprob_mismatch/mean", "logprob_mismatch/max"]
    assert all(math.isnan(dead[k]) and math.isfinite(live[k]) for k in unmeasured)
    assert live["entropy"] > 0 and live["grad_norm"] > 0
    tr.logger.log(1, live)
    tr.logger.log(2, dead)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert list(rows[0]) == list(rows[1]) and all(rows[1][k] is None for k in unmeasured)


def test_plot_curves_leaves_out_null_and_nan_values(tmp_path, monkeypatch):
    import matplotlib.axes

    from r1kit.train.logging import plot_curves

    rows = ['{"step": 1, "reward": 0.25, "accuracy": null}', '{"step": 2, "reward": NaN, "accuracy": null}',
            '{"step": 3, "reward": 0.75, "accuracy": null}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    plotted = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(ax, xs, ys, *args, **kw):
        plotted.append((list(xs), list(ys)))
        return real_plot(ax, xs, ys, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", window=2)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plotted == [([1, 3], [0.25, 0.75]), ([3], [0.5])]  # reward per step and its mean of 2; no accuracy


def test_resume_of_a_finished_run_rewrites_nothing(tiny_model_dir, toy_task, tmp_path, capsys):
    """--resume on a run that reached max_steps says so and exits 0 with final/ untouched; raising
    --max-steps resumes training."""
    from r1kit.cli import main

    out = tmp_path / "run"
    assert main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(toy_task), "--template", "direct",
                 "--answer-extraction", "any", "--reward-funcs", "accuracy", "--num-generations", "2",
                 "--prompts-per-step", "1", "--max-completion-length", "4", "--max-steps", "1", "--bf16", "false",
                 "--plot", "false", "--output", str(out), "--no-progress"]) == 0
    final = out / "final" / "model.safetensors"
    stamp, metrics = final.stat().st_mtime_ns, (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "grpo", "--output", str(out), "--resume", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"{out} is complete (max_steps=1 reached, final/ written): nothing to resume" in said
    assert "resumed from" not in said
    assert final.stat().st_mtime_ns == stamp and (out / "metrics.jsonl").read_text() == metrics
    assert main(["train", "grpo", "--output", str(out), "--resume", "--max-steps", "2", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert final.stat().st_mtime_ns != stamp and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_stop_strings_reach_the_rollout_sampler(tiny_model_dir, tmp_path):
    model, tok = load_policy(str(tiny_model_dir))
    params = _trainer(model, tok, tmp_path, stop=["\n"], top_k=5).sampling_params()
    assert (params.stop, params.top_k, params.n, params.max_tokens) == (["\n"], 5, 4, 8)


def _answering(ro: Rollout, answers: list) -> Rollout:
    ro.verdicts = [Verdict(False, 0.0, "mismatch" if a else "no_answer", a) for a in answers]
    return ro


def test_collapse_onto_one_answer_is_logged_and_warned(tiny_model_dir, tmp_path):
    """A policy answering '7' in 6 of its 10 completions (60% >= warn_answer_share 0.3) for warn_patience
    steps warns; the top-answer share and the answer entropy are logged every step, null when no
    completion has an answer."""
    import json
    import math
    import warnings

    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
    tr = _trainer(model, tok, tmp_path, num_generations=5, prompts_per_step=2, warn_patience=2)
    collapsed = ["7"] * 6 + ["3", "3.0", None, None]
    rollouts = iter([_answering(_rollout(G=5, groups=2, seed=s), a)
                     for s, a in enumerate([[None] * 10, collapsed, collapsed, ["1", "2", "3", "4", "5"] * 2])])
    tr.generate_and_score = lambda: next(rollouts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [tr.train_step() for _ in range(4)]
    said = [str(w.message) for w in caught if "collapsing onto a common answer" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("step 3: one answer is 60% of the completions (answer entropy 0.81 bits)")
    assert math.isnan(steps[0]["answers/top_share"]) and math.isnan(steps[0]["answers/entropy"])
    assert steps[1]["answers/top_share"] == 0.6
    assert steps[1]["answers/entropy"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert steps[3]["answers/top_share"] == 0.2 and steps[3]["answers/entropy"] == pytest.approx(math.log2(5))
    assert tr.warn_counts["collapse"] == 0  # reset by the spread-out step
    for i, m in enumerate(steps):
        tr.logger.log(i + 1, m)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(list(r) == list(rows[0]) for r in rows) and rows[0]["answers/top_share"] is None


def test_a_guard_with_patience_one_says_one_step(tiny_model_dir, tmp_path):
    """warn_patience 1 warned "(for 1 steps in a row)"; counts in messages and reports say 1 step, 2 steps."""
    import warnings

    from r1kit.train.logging import n_steps

    assert (n_steps(0), n_steps(1), n_steps(2)) == ("0 steps", "1 step", "2 steps")
    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
    tr = _trainer(model, tok, tmp_path, num_generations=5, prompts_per_step=2, warn_patience=1)
    ro = _answering(_rollout(G=5, groups=2), ["7"] * 6 + ["3", "3.0", None, None])
    tr.generate_and_score = lambda: ro
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train_step()
    said = [str(w.message) for w in caught if "collapsing onto a common answer" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("step 1: one answer is 60%") and said[0].endswith("(for 1 step in a row)")


class _PatternEngine:
    """Completions by problem: problem i's G completions all say "yes" when i is even or ``all_dead``
    (a dead group), else alternate "yes"/"no" (a mixed group)."""

    def __init__(self, tok, prompt_of: dict, all_dead: bool):
        self.tok, self.prompt_of, self.all_dead = tok, prompt_of, all_dead

    def generate(self, prompt_ids, params):
        out = []
        for k, p in enumerate(prompt_ids):
            i = self.prompt_of[tuple(p)]
            for j in range(params.n):
                word = "yes" if (self.all_dead or i % 2 == 0 or j % 2 == 0) else "no"
                out.append(Completion(self.tok.encode(f" {word} {i}"), [-0.5] * 3, "stop", k))
        return out

    def update_weights(self, weights):
        pass


class _SaysYes:
    name = "yes"

    def verify_batch(self, completions, examples, truncated=None):
        return [Verdict("yes" in c, float("yes" in c), "x", c.split()[-1]) for c in completions]


@pytest.mark.parametrize("all_dead", [False, True])
def test_dynamic_sampling_keeps_the_first_mixed_groups_in_order(tiny_model_dir, tmp_path, all_dead):
    """DAPO dynamic sampling over rounds of 3 problems × G=2: only groups whose scores differ (odd
    problems here) are kept, in draw order, until prompts_per_step; every round dead: the last round's
    groups. Each completion keeps its own problem, prompt, text, reward and policy version."""
    from r1kit.train.loop import DataCursor

    model, tok = load_policy(str(tiny_model_dir))
    examples = [Example(f"toy/{i}", f"q{i}", "1") for i in range(10)]
    cfg = load_config(overrides=dict(num_generations=2, prompts_per_step=3, dynamic_sampling=True,
                                     max_resample_rounds=3, max_completion_length=8, bf16="false"))
    from r1kit.rewards.functions import build_reward_functions

    verifier = _SaysYes()
    tr = GRPOTrainer(cfg, model, tok, examples, lambda e: e.prompt,
                     RewardScorer(cfg, verifier, build_reward_functions(["accuracy"], None, verifier)),
                     HFGenerateEngine(model, tok), tmp_path)
    tr.engine = _PatternEngine(tok, {tuple(tr.prompt_ids(e)): i for i, e in enumerate(examples)}, all_dead)
    ro = tr.generate_and_score()

    drawn = DataCursor(10, cfg.seed).take(12)                   # 4 rounds of 3 problems
    rounds = [drawn[r * 3:(r + 1) * 3] for r in range(4)]
    if all_dead:
        want, n_rounds = rounds[-1], 4                          # max_resample_rounds + 1, then the last round
    else:
        mixed = [i for i in drawn if i % 2]
        want = mixed[:3]
        n_rounds = next(r + 1 for r in range(4) if sum(i % 2 for i in drawn[:(r + 1) * 3]) >= 3)
    assert [e.id for e in ro.examples] == [f"toy/{i}" for i in want for _ in range(2)]
    assert ro.prompt_ids == [tr.prompt_ids(examples[i]) for i in want for _ in range(2)]
    words = [["yes", "yes"] if all_dead or i % 2 == 0 else ["yes", "no"] for i in want]
    assert ro.texts == [f" {w} {i}" for i, ws in zip(want, words) for w in ws]
    assert ro.rewards.tolist() == [float(w == "yes") for ws in words for w in ws]
    assert ro.rewards_per_func.shape == (6, 1) and ro.policy_versions == [0] * 6
    a = 0.5 / (2 ** -0.5 + 1e-4)
    assert ro.advantages.tolist() == ([0.0] * 6 if all_dead else pytest.approx([a, -a] * 3))  # (1 - ½) / (std + 1e-4)
    assert ro.stats == {"dynamic_sampling/rounds": float(n_rounds),
                        "dynamic_sampling/kept_groups": 0.0 if all_dead else 3.0}
