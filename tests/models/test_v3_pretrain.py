"""Tiny V3 pretraining from scratch on generated arithmetic."""

import json
import random

import pytest
from v3_helpers import one_thread  # noqa: F401 (autouse fixture)

from r1kit.errors import ConfigError
from r1kit.models.v3_io import load_deepseek_v3
from r1kit.models.v3_pretrain import CharTokenizer, PretrainConfig, arithmetic_problem, main, pretrain, training_batch

MICRO = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2)


def test_tokenizer_round_trip_and_alphabet():
    tok = CharTokenizer()
    ids = tok.encode("12+7=19")
    assert ids[0] == tok.bos and len(ids) == 8
    assert tok.decode(ids[1:] + [tok.eos, 5]) == "12+7=19"
    with pytest.raises(ConfigError, match="'x'"):
        tok.encode("2x3")


def test_problems_and_batches():
    prompt, answer = arithmetic_problem(random.Random(0), 99)
    a, op, b = prompt[:-1].partition("+") if "+" in prompt else prompt[:-1].partition("-")
    assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    ids, mask = training_batch(CharTokenizer(), random.Random(0), 4, 9)
    assert ids.shape == mask.shape and ids.shape[0] == 4
    assert (ids[mask == 0] == CharTokenizer.pad).all()
    assert (ids[mask.bool()].eq(CharTokenizer.eos).sum()) == 4  # one eos per row


def test_pretraining_lowers_the_loss_and_logs_expert_load():
    cfg = PretrainConfig(steps=25, batch_size=16, max_operand=9, lr=1e-2, warmup_steps=5, overrides=MICRO)
    model, history = pretrain(cfg)
    assert history["steps"] == 25 and len(history["max_over_mean"]) == 25
    assert sum(history["lm"][-3:]) / 3 < history["lm"][0] - 1.0  # from ~ln(21) = 3.0 towards the digits
    assert all(1.0 <= r <= 4.0 for r in history["max_over_mean"])  # 8 experts, top-2: at most 8/2
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())


def test_command_writes_a_loadable_checkpoint_and_history(tmp_path, capsys):
    main(["--out", str(tmp_path), "--steps", "1", "--batch-size", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("final_lm_loss=")
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["steps"] == 1 and 0.0 <= history["accuracy"] <= 1.0
    assert load_deepseek_v3(tmp_path).config.vocab_size == CharTokenizer().vocab_size
