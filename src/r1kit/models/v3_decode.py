"""Decoding with the DeepSeek-V3 model: batched generation on the absorbed-MLA cache, and MTP
self-speculative greedy decoding.

``generate`` takes left-padded prompts like transformers' ``generate`` and returns prompt + new tokens.
``mtp_speculative_generate`` drafts one token with the MTP module and verifies it with the main model in
the same forward pass that produces the next token (V3 report §2.2 "MTP in inference", §5.4.3: 85-90%
acceptance of the second token); its output equals plain greedy decoding token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM, KVCache


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (b, V) -> (b,) int64: argmax at temperature 0, else a sample of softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DeepseekV3ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` per row on the absorbed cache (576 values per token per layer at V3).

    input_ids (b, s) left-padded, attention_mask (b, s) 1/0 (default all ones). Positions count real
    tokens only. Rows that emit ``eos_token_id`` are padded with ``pad_token_id`` afterwards.
    Returns (b, s + n) int64 with n <= max_new_tokens (stops early when every row has finished).
    """
    b, s = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache(absorbed=True)
    out = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    tokens = [input_ids]
    for step in range(max_new_tokens):
        token = next_token(out.logits[:, -1], temperature, generator)
        tokens.append(token.masked_fill(done, pad_token_id)[:, None])
        if eos_token_id is not None:
            done |= token == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(token[:, None], attention_mask=mask, position_ids=positions, cache=cache)  # finished rows too
    return torch.cat(tokens, 1)


@dataclass
class SpeculativeResult:
    """Tokens and draft statistics of ``mtp_speculative_generate``."""

    tokens: list[int]  # the new tokens (prompt excluded)
    drafted: int  # MTP drafts verified
    accepted: int  # drafts equal to the main model's greedy token

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def mtp_speculative_generate(
    model: DeepseekV3ForCausalLM, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> SpeculativeResult:
    """Greedy decoding with one MTP draft per main-model forward (batch 1, absorbed caches).

    Each step feeds [last token, draft] to the main model: the logits at the last token give the
    greedy next token g; if g equals the draft, the logits at the draft give one more token for free,
    otherwise the draft's cache entry is dropped. The MTP module then consumes the new main hidden
    states with the tokens that follow them (embedding of t_{i+1} with h_i) and drafts again.
    Raises ValueError when the model has no MTP module.
    """
    if not len(model.mtp_layers):
        raise ValueError("the model has num_nextn_predict_layers=0: no MTP module to draft with")
    device = model.lm_head.weight.device
    main_cache, mtp_cache = KVCache(), KVCache()
    ids = torch.tensor([prompt], device=device)
    out = model(ids, cache=main_cache)
    tokens = [int(out.logits[0, -1].argmax())]
    hidden, hidden_pos = out.hidden, torch.arange(len(prompt), device=device)[None]
    follow = torch.tensor([prompt[1:] + tokens], device=device)
    result = SpeculativeResult(tokens=tokens, drafted=0, accepted=0)
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        _, mtp_logits = model.mtp_step(1, hidden, follow, hidden_pos, mtp_cache)
        draft = int(mtp_logits[0, -1].argmax())
        start = main_cache.seq_len
        step = model(torch.tensor([[tokens[-1], draft]], device=device), cache=main_cache)
        greedy = int(step.logits[0, 0].argmax())
        result.drafted += 1
        if greedy == draft:
            result.accepted += 1
            new = [draft, int(step.logits[0, 1].argmax())]
            hidden = step.hidden
        else:
            main_cache.truncate(start + 1)
            new = [greedy]
            hidden = step.hidden[:, :1]
        tokens.extend(new)
        hidden_pos = torch.arange(start, start + hidden.shape[1], device=device)[None]
        follow = torch.tensor([new], device=device)
    result.tokens = cut_after_eos(tokens[:max_new_tokens], eos_token_id)
    return result


def cut_after_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    """Tokens up to and including the first ``eos_token_id``."""
    if eos_token_id is None or eos_token_id not in tokens:
        return tokens
    return tokens[: tokens.index(eos_token_id) + 1]
