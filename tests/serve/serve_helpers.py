"""Serving test helpers: a tiny Llama whose weights are written by hand so that it *says* a reasoning
reply, and a helper that starts ``r1kit serve`` as a real uvicorn process on a free loopback port.

The scripted model (1 layer, D = 64, SmolLM2's tokenizer and chat template) is a bigram model: each
script token's embedding is a one-hot direction and the lm_head maps it to the next script token,
so after the chat template's final ``\\n`` it answers (greedy; at temperature 1 each token has
probability > 0.999)::

    <think>Two and two make four</think>The answer is 4!<|im_end|>

The ``>`` that closes both tags needs one bit of state: an attention head that looks only at ``</``
(its key is the only non-zero one; the query is constant; rope's slowest pair keeps the score
position-free) writes a "closed" direction into the residual, and the lm_head sends ``>`` to
``Two`` before it and to ``The`` after it. A prompt ending in `` la`` instead loops
`` la di do la ...`` forever (long streams for the disconnect and shutdown tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPLY = "<think>Two and two make four</think>The answer is 4!"
REASONING, CONTENT = "Two and two make four", "The answer is 4!"
LOOP_PROMPT = "Sing: la"
ROOT = Path(__file__).resolve().parents[2]


def scripted_llama(tok):
    """The hand-written LlamaForCausalLM described in the module docstring (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    D, CONST, CLOSED, A = 64, 60, 61, 24.0
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=D, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = LlamaForCausalLM(cfg).eval()
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    loop = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" la", " di", " do")]
    newline, close_open, gt = tok("\n")["input_ids"][0], reply[8], reply[2]
    chain = [newline] + reply + [tok.eos_token_id]
    slot: dict[int, int] = {}
    for t in chain[:-1] + loop:
        slot.setdefault(t, len(slot))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        emb, head, attn = model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].self_attn
        emb[:, CONST] = 1.0
        for t, s in slot.items():
            emb[t, s] = 1.0
        successors = {a: b for a, b in zip(chain, chain[1:]) if a != gt}
        successors.update({a: b for a, b in zip(loop, loop[1:] + loop[:1])})
        for a, b in successors.items():
            head[b, slot[a]] = A
        before, after = reply[3], reply[11]  # "Two" after "<think>", "The" after "</think>"
        head[before, slot[gt]], head[before, CLOSED] = A, -A
        head[after, slot[gt]], head[after, CLOSED], head[after, CONST] = A, A, -A / 2
        attn.q_proj.weight[31, CONST] = 3.0  # dims 31/63: rope's slowest pair (angle < 0.004 rad at 2048)
        attn.k_proj.weight[31, slot[close_open]] = 3.0
        attn.v_proj.weight[0, slot[close_open]] = 1.0
        attn.o_proj.weight[CLOSED, 0] = 0.25
    return model


class ServerProcess:
    """``r1kit serve`` in a subprocess; ``url`` is its /v1 base once it printed its address."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "r1kit.cli", "serve", str(model_dir), "--port", "0", "--served-model-name", "tiny",
             "--dtype", "fp32", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.base = m.group(1)
                self.url = self.base + "/v1"
                return
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.lines) + (self.proc.stdout.read() or ""))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
