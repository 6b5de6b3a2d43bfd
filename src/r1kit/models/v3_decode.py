"""Decoding with the DeepSeek-V3 model: batched sampling on the absorbed-MLA cache, a
``SamplingEngine`` for the rollout seam, and MTP self-speculative greedy decoding.

``generate`` takes left-padded prompts like transformers' ``generate`` and returns prompt + new tokens;
``V3SamplingEngine`` serves GRPO, distillation and evaluation through ``r1kit.rollout.base``.
``mtp_speculative_generate`` drafts one token with the MTP module and verifies it with the main model in
the same forward pass that produces the next token (V3 report §2.2 "MTP in inference", §5.4.3: 85-90%
acceptance of the second token); its output equals plain greedy decoding token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r1kit.errors import ConfigError
from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM, KVCache
from r1kit.rollout.base import Completion, SamplingParams
from r1kit.rollout.sampling import filter_logits


@dataclass
class Sampler:
    """How ``decode`` picks tokens: greedy at temperature 0, else softmax(filtered logits / T)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (b, V) -> token (b,) int64 and its log-probability (b,) in nats under
        softmax(logits / T) (raw logits when greedy)."""
        logits = logits.float()
        if self.temperature == 0:
            token = logits.argmax(-1)
            return token, logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
        scaled = logits / self.temperature
        probs = filter_logits(scaled, self.top_k, self.top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return token, scaled.log_softmax(-1).gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def decode(
    model: DeepseekV3ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    sampler: Sampler | None = None,
    stop_token_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` per row on the absorbed cache (576 values per token per layer at V3).

    input_ids (b, s) left-padded, attention_mask (b, s) 1/0 (default all ones); positions count real
    tokens only. Returns tokens (b, n), their log-probabilities (b, n) and finished (b,) bool (a stop
    token was emitted), with n <= max_new_tokens (it stops early once every row has finished).
    Entries after a row's stop token are meaningless.
    """
    sampler = sampler or Sampler()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache(absorbed=True)
    logits = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        token, logprob = sampler(logits)
        tokens.append(token)
        logprobs.append(logprob)
        finished |= torch.isin(token, stops)
        if finished.all() or step == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = model(token[:, None], attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), finished


def generate(
    model: DeepseekV3ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    sampler: Sampler | None = None,
) -> torch.Tensor:
    """transformers-style ``generate``: (b, s) left-padded prompts -> (b, s + n) prompt + new tokens,
    greedy unless a ``sampler`` is given; after ``eos_token_id`` a row holds ``pad_token_id``."""
    stops = () if eos_token_id is None else (eos_token_id,)
    tokens, _, _ = decode(model, input_ids, max_new_tokens, attention_mask, sampler, stops)
    if eos_token_id is not None:
        after_eos = (tokens == eos_token_id).long().cumsum(1) - (tokens == eos_token_id).long() > 0
        tokens = tokens.masked_fill(after_eos, pad_token_id)
    return torch.cat([input_ids, tokens], 1)


class V3SamplingEngine:
    """``r1kit.rollout.base.SamplingEngine`` for the DeepSeek-V3 model, decoding on the absorbed cache.

    Works on token ids only, so ``SamplingParams.stop`` strings are refused (use stop_token_ids);
    the model's eos ids always stop.
    """

    def __init__(self, model: DeepseekV3ForCausalLM, pad_token_id: int = 0):
        self.model = model
        self.pad_token_id = pad_token_id

    def update_weights(self, model: DeepseekV3ForCausalLM) -> None:
        """Sample from ``model`` from now on (the module is shared, not copied)."""
        self.model = model

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions per prompt, prompt-major. Raises ConfigError for invalid params,
        stop strings, empty prompts, or prompts longer than max_position_embeddings."""
        params.validate()
        if params.stop:
            raise ConfigError("V3SamplingEngine decodes ids only: pass stop_token_ids instead of stop strings")
        limit = self.model.config.max_position_embeddings
        for i, prompt in enumerate(prompt_ids):
            if not 0 < len(prompt) <= limit - params.max_tokens:
                raise ConfigError(f"prompt {i} has {len(prompt)} tokens; allowed 1..{limit - params.max_tokens} "
                                  f"(max_position_embeddings={limit} minus max_tokens={params.max_tokens})")
        rows = [list(p) for p in prompt_ids for _ in range(params.n)]
        width = max(len(r) for r in rows)
        device = self.model.lm_head.weight.device
        ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        sampler = Sampler(params.temperature, params.top_k, params.top_p, generator)
        stops = tuple(params.stop_token_ids) + tuple(eos_ids(self.model))
        tokens, logprobs, _ = decode(self.model, ids, params.max_tokens, mask, sampler, stops)
        return [completion(t.tolist(), lp.tolist(), stops, i // params.n) for i, (t, lp) in enumerate(zip(tokens, logprobs))]


def eos_ids(model: DeepseekV3ForCausalLM) -> list[int]:
    """The config's eos_token_id as a list (it may be an int, a list or None)."""
    eos = model.config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def completion(tokens: list[int], logprobs: list[float], stops: tuple[int, ...], prompt_index: int) -> Completion:
    """Cut a decoded row after its first stop token: finish_reason "stop", else "length"."""
    for j, token in enumerate(tokens):
        if token in stops:
            return Completion(tokens[: j + 1], logprobs[: j + 1], "stop", prompt_index)
    return Completion(tokens, logprobs, "length", prompt_index)


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
    while len(tokens) < max_new_tokens and eos_token_id not in tokens:
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
