"""Tiny V3 pretraining from scratch on generated arithmetic, and its character tokenizer."""

import random

import pytest
import torch
from v3_helpers import one_thread  # noqa: F401 (autouse fixture)

from r1kit.data.arithmetic import arithmetic, arithmetic_chain, is_chain_test_problem, is_test_problem, worked_trace
from r1kit.models import v3_pretrain
from r1kit.models.v3_pretrain import (PretrainConfig, char_tokenizer, heldout_accuracy, learning_rate, pretrain,
                                      training_batch)

MICRO = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2)


def test_char_tokenizer_ids_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    assert len(tok) == 22 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("12+7=19").input_ids == [0, 5, 6, 14, 11, 16, 5, 13]  # bos, then 4 + index in ALPHABET
    assert tok("2x3", add_special_tokens=False).input_ids == [6, 3, 7]  # unknown character -> <unk>
    assert tok.batch_decode([[5, 13, 1, 2, 2]], skip_special_tokens=True) == ["19"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("-98+0=\n").input_ids == tok("-98+0=\n").input_ids and again.pad_token_id == 2


def test_batches_hold_train_problems_with_one_eos_each():
    tok = char_tokenizer()
    ids, mask = training_batch(tok, random.Random(0), 8, 49)
    assert ids.shape == mask.shape and ids.shape[0] == 8
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert ids[mask.bool()].eq(tok.eos_token_id).sum() == 8 and (ids[:, 0] == tok.bos_token_id).all()
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    for text in texts:
        prompt, answer = text.split("=")
        assert str(eval(prompt)) == answer and not is_test_problem(prompt + "=")


def test_pretraining_lowers_the_loss_and_logs_expert_load():
    cfg = PretrainConfig(steps=25, batch_size=16, max_operand=9, lr=1e-2, warmup_steps=5, overrides=MICRO)
    model, history = pretrain(cfg)
    assert history["steps"] == 25 and len(history["max_over_mean"]) == 25
    assert sum(history["lm"][-3:]) / 3 < history["lm"][0] - 1.0  # from ~ln(22) = 3.1 towards the digits
    assert all(1.0 <= r <= 4.0 for r in history["max_over_mean"])  # 8 experts, top-2: at most 8/2
    assert set(history["load_per_layer"]) == {"layer1", "layer2"}  # main MoE layer and the MTP layer
    assert history["max_over_mean"] == [max(v) for v in zip(*history["load_per_layer"].values())]
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())


def test_heldout_accuracy_counts_exact_answers_of_the_first_test_problems(monkeypatch):
    tok = char_tokenizer()
    problems = arithmetic("test")[:4]
    answers = [problems[0].gold, problems[1].gold + "0", problems[2].gold, "9" + problems[3].gold]

    def generate(model, ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id):
        assert [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, attention_mask)] == [
            p.prompt for p in problems]
        rows = [tok(a, add_special_tokens=False).input_ids + [eos_token_id] for a in answers]
        new = torch.tensor([r + [pad_token_id] * (max_new_tokens - len(r)) for r in rows])
        return torch.cat([ids, new], 1)

    monkeypatch.setattr(v3_pretrain, "generate", generate)
    assert heldout_accuracy(None, tok, n=4) == 0.5


def test_chain_batches_hold_train_problems_with_their_worked_traces():
    tok = char_tokenizer()
    ids, mask = training_batch(tok, random.Random(0), 8, None, task="arithmetic_chain")
    assert ids[mask.bool()].eq(tok.eos_token_id).sum() == 8
    for text in tok.batch_decode(ids, skip_special_tokens=True):
        prompt, trace = text.split("=", 1)
        assert trace == worked_trace(prompt + "=") and trace.count("=") == 1 and not is_chain_test_problem(prompt + "=")


def test_chain_heldout_accuracy_reads_the_answer_after_the_last_equals(monkeypatch):
    tok = char_tokenizer()
    problems = arithmetic_chain("test")[:4]
    first = problems[2].meta["trace"].split("=")[0]
    answers = [problems[0].meta["trace"], problems[1].meta["trace"] + "1", f"{first}0={problems[2].gold}",
               problems[3].gold]  # right; final answer wrong; a wrong step with the right answer; answer alone

    def generate(model, ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id):
        assert max_new_tokens == 12
        rows = [tok(a, add_special_tokens=False).input_ids + [eos_token_id] for a in answers]
        return torch.cat([ids, torch.tensor([r + [pad_token_id] * (max_new_tokens - len(r)) for r in rows])], 1)

    monkeypatch.setattr(v3_pretrain, "generate", generate)
    assert heldout_accuracy(None, tok, n=4, task="arithmetic_chain") == 0.75


def test_learning_rate_warms_up_then_decays_to_the_floor_as_the_budget_is_spent():
    cfg = PretrainConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-3)  # warm-up: (0 + 1) / 10
    assert learning_rate(cfg, 9, 0.0) == pytest.approx(1e-2)
    assert learning_rate(cfg, 500, 0.5) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # cosine at its midpoint
    assert learning_rate(cfg, 900, 1.0) == learning_rate(cfg, 900, 1.3) == pytest.approx(1e-3)
