"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, and a toy task file."""

import json
import sys
from pathlib import Path

import pytest
import torch

# the tiny DeepSeek-V3 helpers (tests/models/v3_helpers.py) import as `v3_helpers` from every test directory
sys.path.insert(0, str(Path(__file__).parent / "models"))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from r1kit.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer random LlamaForCausalLM (hidden 32) saved with SmolLM2's tokenizer; seeded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def toy_task(tmp_path) -> Path:
    """A local JSONL task of 12 one-step sums with numeric gold answers."""
    path = tmp_path / "toy.jsonl"
    rows = [{"question": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
