"""r1kit's DeepSeek-V3 in the pipeline: load_policy, the V3 sampling engine, GRPO steps (router-bias
update, expert-load metrics, checkpoints, resume), evaluation, and the v3-zero command."""

import json

import pytest
import torch
from v3_helpers import one_thread, tiny_model  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.cli import main
from r1kit.config import load_config
from r1kit.data.loading import load_task
from r1kit.errors import ConfigError, R1kitError
from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1kit.models.loading import load_policy, save_pretrained_atomic
from r1kit.models.v3_decode import V3SamplingEngine
from r1kit.models.v3_pretrain import char_tokenizer
from r1kit.rollout.base import SamplingParams
from r1kit.runtime import make_engine, make_render, make_verifier
from r1kit.train.grpo import GRPOTrainer, RewardScorer

GAMMA = 0.01


def char_model(**overrides) -> DeepseekV3ForCausalLM:
    """The tiny test V3 (2 layers, 8 experts, MTP) over the 22-id character vocabulary."""
    return tiny_model(vocab_size=22, bos_token_id=0, eos_token_id=1, **overrides)


@pytest.fixture()
def v3_dir(tmp_path):
    return save_pretrained_atomic(char_model(), char_tokenizer(), tmp_path / "v3")


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_policy_returns_our_v3_with_its_tokenizer(v3_dir, tmp_path):
    model, tok = load_policy(str(v3_dir))
    assert isinstance(model, DeepseekV3ForCausalLM) and not model.training
    assert same_state(model, char_model())
    assert tok("37+48=").input_ids == char_tokenizer()("37+48=").input_ids and tok.padding_side == "left"
    (v3_dir / "tokenizer.json").unlink()
    (v3_dir / "tokenizer_config.json").unlink()
    with pytest.raises(R1kitError, match="no tokenizer"):
        load_policy(str(v3_dir))


def test_load_policy_reads_a_transformers_saved_v3_as_ours(tmp_path):
    from v3_helpers import transformers_twin

    ours = char_model(num_nextn_predict_layers=0)
    transformers_twin(ours).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model, _ = load_policy(str(tmp_path))
    assert isinstance(model, DeepseekV3ForCausalLM) and same_state(model, ours)


def test_engine_is_v3_and_its_greedy_tokens_equal_plain_greedy_decoding(v3_dir):
    model, tok = load_policy(str(v3_dir))
    engine = make_engine(model, tok, "auto")
    assert isinstance(engine, V3SamplingEngine) and isinstance(make_engine(model, tok, "engine"), V3SamplingEngine)
    with pytest.raises(ConfigError, match="auto or engine"):
        make_engine(model, tok, "hf")
    prompts = [tok(p).input_ids for p in ("7+8=", "93-41=", "5-60=")]
    got = engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0))
    for prompt, completion in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():  # full forward over the growing sequence, no cache, no padding
            for _ in range(5):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
        assert completion.token_ids == ids[len(prompt):]


def distinct_chars(completions, examples):
    """Reward variance for a random model: distinct characters / 10."""
    return [len(set(c)) / 10.0 for c in completions]


def v3_trainer(model, tok, run_dir, **over):
    cfg = load_config(overrides=dict(task="arithmetic", template="bare", answer_extraction="any", num_generations=4,
                                     prompts_per_step=2, max_completion_length=4, max_prompt_length=16,
                                     learning_rate=1e-2, bf16="false", router_bias_update_speed=GAMMA, max_steps=2,
                                     save_steps=1, output=str(run_dir), **over))
    render, _ = make_render(cfg.template, tok)
    scorer = RewardScorer(cfg, make_verifier(cfg.task, "any"), [(distinct_chars, 1.0)])
    return GRPOTrainer(cfg, model, tok, load_task("arithmetic", "train", limit=8), render, scorer,
                       make_engine(model, tok), run_dir)


def skewed_v3(v3_dir):
    """The tiny V3 with every token routed to expert 0 (its selection bias at +10)."""
    model, tok = load_policy(str(v3_dir))
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.zero_()[0] = 10.0
    return model, tok


def test_grpo_steps_train_v3_balance_the_skewed_router_and_checkpoint(v3_dir, tmp_path):
    torch.manual_seed(0)
    model, tok = skewed_v3(v3_dir)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = v3_trainer(model, tok, tmp_path / "run")
    trainer.train(progress=False)
    main_bias, mtp_bias = (m.gate.e_score_correction_bias for m in model.moe_layers())
    assert main_bias[0].item() == pytest.approx(10.0 - 2 * GAMMA)  # overloaded both steps: -γ each
    assert (main_bias[1:] == 2 * GAMMA).any()  # experts that got no token: +γ each step
    assert mtp_bias[0] == 10.0 and (mtp_bias[1:] == 0).all()  # GRPO does not run the MTP module
    changed = [k for k, v in model.state_dict().items() if "bias" not in k and not torch.equal(v, initial[k])]
    assert any("experts.0." in k for k in changed) and any("self_attn" in k for k in changed)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["moe/layer1/max_over_mean"] for r in rows] == pytest.approx([8 / 3] * 2)  # all tokens on one of 8/3
    reloaded, _ = load_policy(str(tmp_path / "run" / "checkpoint-2" / "policy"))
    assert same_state(reloaded, model)


def test_reference_sync_copies_the_router_biases(v3_dir, tmp_path):
    model, tok = skewed_v3(v3_dir)
    trainer = v3_trainer(model, tok, tmp_path / "run", beta=0.05, ref_model_sync_steps=1)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias[3] = -1.5
    trainer.sync_reference()  # α = 1: the reference becomes the policy, routing included
    assert same_state(trainer.reference, model)


def test_resumed_v3_run_is_bit_exact(v3_dir, tmp_path):
    torch.manual_seed(0)
    straight = v3_trainer(*skewed_v3(v3_dir), tmp_path / "a")
    straight.train(progress=False)
    torch.manual_seed(123)  # resume must restore the RNG itself
    resumed = v3_trainer(*skewed_v3(v3_dir), tmp_path / "b")
    resumed.resume_from(tmp_path / "a" / "checkpoint-1")
    resumed.train(progress=False)
    assert resumed.step == 2 and same_state(resumed.policy, straight.policy)


def test_eval_command_runs_on_a_v3_dir(v3_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "--model", str(v3_dir), "--task", "arithmetic", "--template", "bare", "--answer-extraction",
               "any", "--k", "2", "--limit", "4", "--max-tokens", "4", "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "arithmetic_test_k2.json").read_text())
    assert data["n_problems"] == 4 and all(len(p["correct"]) == 2 for p in data["per_problem"])


def test_v3_zero_command_pretrains_runs_grpo_and_reports(tmp_path, capsys):
    out = tmp_path / "zero"
    args = ["pretrain", "v3-zero", "--output", str(out), "--pretrain-steps", "4", "--grpo-steps", "2", "--eval-limit",
            "4", "--no-progress"]  # seeded and a fixed number of steps: the same run every time
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pretrain"]["steps"] == 4 and report["grpo"]["steps"] == 2
    assert set(report["pretrain"]["max_over_mean"]) == {"layer1", "layer2", "layer3", "layer4 (MTP)"}
    assert set(report["grpo"]["max_over_mean"]) == {"layer1", "layer2", "layer3"}  # GRPO does not run MTP
    assert report["heldout"]["problems"] == 4 and report["heldout"]["k"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loads = [r["moe/layer1/max_over_mean"] for r in rows if r["moe/layer1/max_over_mean"] is not None]  # trained
    assert [r["step"] for r in rows] == [1, 2] and loads and all(1.0 <= x <= 4.0 for x in loads)  # top-2 of 8
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and "## GRPO (2 steps)" in (out / "report.md").read_text()
    pretrained, tok = load_policy(str(out / "pretrained"))
    trained, _ = load_policy(str(out))
    assert isinstance(pretrained, DeepseekV3ForCausalLM) and len(tok) == 22
    assert not same_state(pretrained, trained)  # GRPO moved the weights (or at least the router biases)
    capsys.readouterr()
    assert main(args) == 2 and "is not empty" in capsys.readouterr().err
