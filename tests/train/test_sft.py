"""SFT conformance: the loss and gradient of a fixed batch equal a hand-computed masked NLL and TRL
1.16's SFTTrainer loss; the step gradient does not depend on the micro-batch split; packed equals
unpacked (float64, values and gradients); resume is bit-exact; LoRA's reference is the policy with its
adapters disabled; final/ of a LoRA run is merged and loads without PEFT."""

import json
from pathlib import Path

import pytest
import torch

from r1kit.config import SFTConfig, load_config
from r1kit.data.sft_data import TokenizedExample, load_sft_rows, render_sft_example, tokenize_rows
from r1kit.models.loading import load_policy
from r1kit.train.checkpoint import load_policy_weights
from r1kit.train.loop import apply_lora
from r1kit.train.sft import SFTTrainer, packed_batch, padded_batch, sft_token_terms

REASONINGS = ["One and one.", "Add them: 3 + 4 = 7.\nSo seven.", "Multiply 6 by 7 to get 42, a long line of thought.",
              "Half of ten is five.", "Nine minus two is seven; then seven plus one is eight."]


def _examples(tok, n=5, template="chat_think") -> list[TokenizedExample]:
    out = []
    for i in range(n):
        p, c = render_sft_example(f"Problem {i}: compute it.", REASONINGS[i % len(REASONINGS)], f"\\boxed{{{i}}}",
                                  tok, template)
        out.append(TokenizedExample(f"ex{i}", p, c))
    return out


def _cfg(tmp_path, **kw) -> SFTConfig:
    base = dict(bf16="false", output=str(tmp_path / "run"), lr_scheduler="constant", learning_rate=1e-3,
                max_grad_norm=0.0, plot=False, save_steps=0, max_steps=4)
    return load_config(overrides={**base, **kw}, cls=SFTConfig)


@pytest.fixture()
def tiny64(tiny_model_dir):
    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float64)
    return model, tok


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def test_loss_and_gradient_equal_a_hand_computed_masked_nll(tiny64, tmp_path):
    """One forward per unpadded example, log-softmax at every completion position (the end-of-turn
    token included), summed and divided by the completion tokens of the whole step."""
    model, tok = tiny64
    examples = _examples(tok, 4)
    tr = SFTTrainer(_cfg(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2), model, tok,
                    examples, tmp_path / "run")
    tr.optimizer.zero_grad(set_to_none=False)
    stats = tr.accumulate(examples)
    ours = _grads(model)

    model.zero_grad(set_to_none=False)
    total = sum(len(e.completion_ids) for e in examples)
    hand = 0.0
    for e in examples:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)                   # (s, V)
        p = len(e.prompt_ids)
        hand = hand - sum(logp[p + j - 1, t] for j, t in enumerate(e.completion_ids)) / total
    hand.backward()
    assert stats["loss"] == pytest.approx(hand.item(), abs=1e-12)
    assert stats["trained_tokens"] == total
    for a, b in zip(ours, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_loss_equals_trl_sft_trainer_on_the_same_batch(tiny_model_dir, tmp_path):
    """TRL 1.16 SFTTrainer with completion_only_loss on the same pre-tokenized rows (completion_mask)."""
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig as TRLConfig, SFTTrainer as TRLTrainer

    model, tok = load_policy(str(tiny_model_dir), dtype=torch.float32)
    examples = _examples(tok, 4)
    rows = [{"input_ids": e.prompt_ids + e.completion_ids,
             "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.completion_ids)} for e in examples]
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_length=None,
                     completion_only_loss=True, report_to=[], use_cpu=True, bf16=False, logging_strategy="no",
                     save_strategy="no")
    trl = TRLTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trl.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        trl_loss = trl.compute_loss(model, dict(batch)).item()
    tr = SFTTrainer(_cfg(tmp_path, per_device_train_batch_size=4), model, tok, examples, tmp_path / "run")
    with torch.no_grad():
        nll, _, _ = sft_token_terms(model, padded_batch(examples, tok.pad_token_id))
    assert nll.sum().item() / nll.numel() == pytest.approx(trl_loss, rel=1e-5)
    assert tr.total_steps == 4


@pytest.mark.parametrize("micro, packing", [(1, False), (2, False), (2, True)])
def test_step_gradient_independent_of_micro_batches(tiny64, tmp_path, micro, packing):
    """One optimizer step over 4 examples: 1 micro-batch of 4 vs k = 4/micro micro-batches (packed or not)."""
    model, tok = tiny64
    examples = _examples(tok, 4)
    grads = []
    for size, accumulate, pack in ((4, 1, False), (micro, 4 // micro, packing)):
        tr = SFTTrainer(_cfg(tmp_path, per_device_train_batch_size=size, gradient_accumulation_steps=accumulate,
                             packing=pack), model, tok, examples, tmp_path / "run")
        tr.optimizer.zero_grad(set_to_none=False)
        tr.accumulate(examples)
        grads.append(_grads(model))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_packed_equals_unpacked_in_float64(tiny64):
    model, tok = tiny64
    examples = _examples(tok, 5)
    budget = max(len(e) for e in examples) * 2
    packed = packed_batch(examples, budget)
    assert packed.input_ids.shape[0] < len(examples)                  # documents really share rows
    out = {}
    for name, batch in (("padded", padded_batch(examples, tok.pad_token_id)), ("packed", packed)):
        model.zero_grad(set_to_none=True)
        nll, correct, entropy = sft_token_terms(model, batch)
        nll.sum().backward()
        out[name] = (nll.detach(), correct, entropy, _grads(model))
    torch.testing.assert_close(out["padded"][0], out["packed"][0], rtol=0, atol=1e-10)
    assert torch.equal(out["padded"][1], out["packed"][1])
    torch.testing.assert_close(out["padded"][2], out["packed"][2], rtol=0, atol=1e-9)
    for a, b in zip(out["padded"][3], out["packed"][3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _data_file(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "traces.jsonl"
    rows = [{"prompt": f"What is {a} plus {a + 1}?", "reasoning": f"{a} and {a + 1} make {2 * a + 1}.",
             "answer": f"\\boxed{{{2 * a + 1}}}"} for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("packing", [False, True])
def test_pad_to_multiple_of_rounds_shapes_and_keeps_values(tiny64, packing):
    """Rows and trained-token counts rounded up to 32 (bounded shapes: flat RSS) give the same NLL,
    accuracy, entropy and gradients as the exact shapes (float64)."""
    model, tok = tiny64
    examples = _examples(tok, 5)
    budget = max(len(e) for e in examples) * 2
    def make(multiple):
        return packed_batch(examples, budget, multiple) if packing else padded_batch(examples, tok.pad_token_id, multiple)

    exact, rounded = make(1), make(32)
    n = sum(len(e.completion_ids) for e in examples)
    assert exact.input_ids.shape[1] % 32 != 0 and rounded.input_ids.shape[1] % 32 == 0
    assert rounded.input_ids.shape[1] - exact.input_ids.shape[1] < 32
    assert len(exact.src_row) == n != len(rounded.src_row) and len(rounded.src_row) % 32 == 0
    assert len(rounded.target) == n
    out = []
    for batch in (exact, rounded):
        model.zero_grad(set_to_none=True)
        nll, correct, entropy = sft_token_terms(model, batch)
        nll.sum().backward()
        out.append((nll.detach(), correct, entropy.detach(), _grads(model)))
    assert out[1][0].shape == (n,)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-12)
    assert torch.equal(out[0][1], out[1][1])
    torch.testing.assert_close(out[0][2], out[1][2], rtol=0, atol=1e-12)
    for a, b in zip(out[0][3], out[1][3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_resume_is_bit_exact(tiny_model_dir, tmp_path):
    from r1kit.train.recipe import resume_latest

    data = _data_file(tmp_path)
    finals = []
    for name, kill in (("straight", None), ("killed", 2)):
        run = tmp_path / name
        cfg = _cfg(tmp_path, data=str(data), output=str(run), save_steps=2, lr_scheduler="cosine",
                   per_device_train_batch_size=2, gradient_accumulation_steps=2, bf16="false")
        torch.manual_seed(0)
        model, tok = load_policy(str(tiny_model_dir))
        examples, _ = tokenize_rows(load_sft_rows(str(data)), tok, cfg.template, cfg.max_length)
        tr = SFTTrainer(cfg, model, tok, examples, run)
        tr.train(progress=False, stop_after=kill)
        if kill:
            torch.manual_seed(123)                                      # the resumed process starts elsewhere
            model, tok = load_policy(str(tiny_model_dir))
            tr = SFTTrainer(cfg, model, tok, examples, run)
            resume_latest(tr, run)
            assert tr.step == 2
            tr.train(progress=False)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(50 < r["rss_mb"] < 1e6 for r in rows)                  # MiB of this process, every step
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_run_sft_end_to_end_with_lora_saves_a_merged_final(tiny_model_dir, tmp_path, capsys):
    """`r1kit train sft` on sampler-style rows with LoRA: loss falls on a repeated batch, final/ loads
    through load_policy without PEFT and gives the trained (merged) model's logits."""
    from r1kit.cli import main
    from r1kit.train.logging import read_metrics

    data = _data_file(tmp_path, 4)
    out = tmp_path / "lora"
    assert main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--use-lora", "true", "--lora-r", "4", "--learning-rate", "5e-2", "--lr-scheduler", "constant",
                 "--max-steps", "6", "--per-device-train-batch-size", "4", "--bf16", "false", "--no-progress",
                 "--plot", "true"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert not (out / "final" / "adapter_config.json").exists() and (out / "curves.png").is_file()
    adapter_dir = out / "checkpoint-6" / "policy"
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    final, tok = load_policy(str(out))                               # plain transformers model, merged
    peft_model, _ = load_policy(str(tiny_model_dir))
    peft_model = apply_lora(peft_model, load_config(overrides={"use_lora": True, "lora_r": 4}, cls=SFTConfig))
    load_policy_weights(peft_model, adapter_dir)
    base, _ = load_policy(str(tiny_model_dir))
    ids = torch.tensor([tok("What is 1 plus 2?").input_ids])
    with torch.no_grad():
        merged, adapted, plain = (m(input_ids=ids).logits for m in (final, peft_model, base))
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)
    assert (merged - plain).abs().max() > 1e-3
    capsys.readouterr()
    assert main(["train", "sft", "--output", str(out), "--resume", "--no-progress"]) == 0   # config.yaml reused
    assert f"{out} is complete (max_steps=6 reached, final/ written): nothing to resume" in capsys.readouterr().out


def test_lora_grpo_reference_is_the_policy_with_adapters_disabled(tiny_model_dir, tmp_path):
    """With β > 0 and LoRA no reference copy is held: the reference logprobs are the base model's."""
    from r1kit.config import load_config as load_grpo
    from r1kit.data.base import Example
    from r1kit.rewards.functions import build_reward_functions
    from r1kit.runtime import make_engine, make_render, make_verifier
    from r1kit.train.grpo import GRPOTrainer, RewardScorer, collate, completion_logprobs
    from r1kit.train.loop import merged_for_save

    cfg = load_grpo(overrides=dict(use_lora=True, lora_r=4, beta=0.04, num_generations=2, prompts_per_step=1,
                                   max_completion_length=8, bf16="false", output=str(tmp_path / "g")))
    base, tok = load_policy(str(tiny_model_dir))
    policy, _ = load_policy(str(tiny_model_dir))
    policy = apply_lora(policy, cfg)
    with torch.no_grad():                                   # move the adapters off zero so policy != base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    render, _ = make_render("chat_boxed", tok)
    verifier = make_verifier("gsm8k")
    engine = make_engine(merged_for_save(policy), tok, "auto", torch.float32)
    train = [Example("t/0", "What is 1 plus 1?", "2")]
    scorer = RewardScorer(cfg, verifier, build_reward_functions(["accuracy"], None, verifier))
    tr = GRPOTrainer(cfg, policy, tok, train, render, scorer, engine, tmp_path / "g")
    assert tr.reference is None
    ro = tr.generate_and_score()
    index = list(range(len(ro)))
    tr.compute_old_and_ref(ro, index)
    mb = collate(ro.prompt_ids, ro.completion_ids, index, tok.pad_token_id)
    with torch.no_grad():
        base_logps, _ = completion_logprobs(base, mb, cfg.temperature, False, padding_free=True)
        policy_logps, _ = completion_logprobs(policy, mb, cfg.temperature, False, padding_free=True)
    for i in index:
        n = len(ro.completion_ids[i])
        torch.testing.assert_close(ro.ref_logps[i], base_logps[i, :n], rtol=0, atol=1e-5)
        assert not torch.allclose(ro.ref_logps[i], policy_logps[i, :n], atol=1e-3)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    metrics = tr.train_step()                               # a full LoRA GRPO step: update, merged engine refresh
    assert metrics["kl"] is not None and tr.step == 1
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("row, flags, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, [], "row 1: field 'messages' has no assistant turn"),
    ({"prompt": "q", "reasoning": "long " * 400, "answer": "a"}, ["--overlong", "error"],
     "example bad/1 has"),
    ({"prompt": "q", "reasoning": "long " * 400, "answer": "a"}, [], "no SFT examples to train on"),
])
def test_cli_bad_sft_input_is_one_error_line(tiny_model_dir, tmp_path, capsys, row, flags, needle):
    from r1kit.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(row) + "\n")
    code = main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-length", "256", "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_cpu_budget_stops_after_the_crossing_step_and_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """max_train_cpu_seconds (shared TrainLoop): process CPU time faked at 60 s per read; the check
    before step 2 reads 120 s >= 100 s, so one step runs and is checkpointed."""
    import time

    model, tok = load_policy(str(tiny_model_dir))
    tr = SFTTrainer(_cfg(tmp_path, max_train_cpu_seconds=100.0, max_steps=5), model, tok, _examples(tok, 4),
                    tmp_path / "run")
    ticks = iter(range(0, 10_000, 60))
    monkeypatch.setattr(time, "process_time", lambda: float(next(ticks)))
    tr.train(progress=False)
    assert tr.step == 1 and (tmp_path / "run" / "checkpoint-1").is_dir()


def test_deepseek_v3_student_loss_equals_per_example_forwards():
    """r1kit's DeepSeek-V3 model (a possible student) trains through the same padded batch: its NLL
    equals one unpadded forward per example."""
    from v3_helpers import tiny_model

    model = tiny_model().double()
    examples = [TokenizedExample("a", [1, 5, 9], [4, 4, 2]), TokenizedExample("b", [3, 7, 8, 11, 12], [6, 2])]
    nll, _, _ = sft_token_terms(model, padded_batch(examples, pad_id=0))
    hand = []
    for e in examples:
        logits = model(torch.tensor([e.prompt_ids + e.completion_ids]), run_mtp=False).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        p = len(e.prompt_ids)
        hand += [-logp[p + j - 1, t] for j, t in enumerate(e.completion_ids)]
    torch.testing.assert_close(nll.detach(), torch.stack(hand).detach(), rtol=0, atol=1e-10)
