"""Fixtures for the sampler tests: a tiny Llama trained to answer "7", and a task file whose gold is 7
for some problems and 8 for others (so the verifier keeps some samples and rejects others)."""

import json
from pathlib import Path

import pytest
import torch
from sample_helpers import seven_task_rows


@pytest.fixture()
def seven_task(tmp_path) -> Path:
    path = tmp_path / "seven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in seven_task_rows(8)))
    return path


@pytest.fixture(scope="session")
def seven_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny random Llama trained (seeded, 30 Adam steps, ~9 CPU s) to continue any ``direct``-template
    prompt with "7" and the end-of-turn token (loss ~0.04: "7" with probability ~0.98)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1kit.data.base import Example
    from r1kit.data.templates import encode_prompt, get_template, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    template = get_template("direct")
    target = tok("7", add_special_tokens=False).input_ids + [tok.eos_token_id]
    seqs = [encode_prompt(render_prompt(Example(str(i), r["question"], r["answer"]), tok, template), tok) + target
            for i, r in enumerate(seven_task_rows(8))]
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = (torch.arange(width) >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(30):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -len(target) - 1:-1]
        logits = model.lm_head(hidden)  # (b, len(target), V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(target).repeat(len(seqs)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("seven_llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
