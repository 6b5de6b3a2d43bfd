"""The GRPO trainer: sample groups, score them, compute advantages, update the policy.

One *step* = one generation round (``prompts_per_step`` prompts × G completions) followed by
``num_iterations × steps_per_generation`` optimizer updates over it (GRPO_SPEC §1, DESIGN "One GRPO
step"). Notation: N = completions in the round, m = completions in a micro-batch, P/C = padded prompt /
completion length of a micro-batch, V = vocabulary.

Exactness notes:
  * Loss normalizers are counted over the whole optimizer step (``LossNormalizer``), so gradient
    accumulation does not change the gradient for any loss_type.
  * Under torchrun (``r1kit.train.distributed``) every rank holds the whole round (each samples and
    scores its slice, then the slices are gathered), forwards and backwards only its slice, divides by
    the global normalizers, and the gradients are summed over ranks: the update equals the single-
    process update of the same round for every loss_type (tested on 2 gloo ranks in float64).
  * With beta == 0 a completion whose advantage is exactly 0 (all of a group's rewards equal) has zero
    per-token loss and zero gradient; ``skip_zero_advantage`` leaves it out of the forward/backward
    passes while still counting it in the normalizers, so the update is unchanged and the compute
    that TRL spends on dead groups is saved. Gradients are kept as zero tensors (never None) so that
    AdamW steps every parameter exactly as it would have.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from r1kit.config import GRPOConfig
from r1kit.data.base import Example
from r1kit.data.templates import encode_prompt
from r1kit.errors import ConfigError, TrainingStopped
from r1kit.eval.evaluate import answer_histogram
from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM, KVCache, expert_load_keys, update_router_bias
from r1kit.models.loading import resolve_bf16
from r1kit.rewards.base import Verdict
from r1kit.rollout.base import Completion, SamplingEngine, SamplingParams
from r1kit.train import distributed
from r1kit.train.logging import n_steps
from r1kit.train.loop import (DataCursor, TrainLoop, enable_gradient_checkpointing, is_peft, lr_lambda, make_optimizer,
                              merged_weights_view, round_up)
from r1kit.train.losses import (ImportanceWeights, LossNormalizer, aggregate_loss, entropy_from_logits,
                                group_advantages, policy_loss_terms, rollout_importance_weights,
                                selective_log_softmax)


@dataclass
class Rollout:
    """Completions with their rewards, flattened prompt-major (completion i belongs to group i // G):
    a sampled and scored round (``GRPOTrainer.sample_round``, ``Rollout.of_round``), then the step's
    groups with their advantages (``generate_and_score``, ``Rollout.of_groups``).

    Attributes:
        examples, prompt_ids, completion_ids, sampling_logprobs, truncated, texts: per completion (N).
        rewards_per_func: (N, F) raw reward of each reward function.
        verdicts: verifier verdicts (N), for accuracy metrics and samples.
        policy_versions: per completion (N), the policy version (optimizer steps taken) it was sampled
            with; the trainer's step minus it is the sample's staleness.
        rewards: (N,) weighted sum.  advantages: (N,).  group_std: (N,): set by ``generate_and_score``.
        old_logps / ref_logps: per completion (C_i,) float tensors, when computed.
    """

    examples: list[Example]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampling_logprobs: list[list[float]]
    truncated: list[bool]
    texts: list[str]
    rewards_per_func: torch.Tensor
    verdicts: list[Verdict]
    policy_versions: list[int] | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    group_std: torch.Tensor | None = None
    old_logps: list[torch.Tensor] | None = None
    ref_logps: list[torch.Tensor] | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of_round(cls, exs: list[Example], pids: list[list[int]], comps: list[Completion], texts: list[str],
                 rewards_per_func: torch.Tensor, verdicts: list[Verdict], versions: list[int]) -> "Rollout":
        """A sampled, scored round of ``len(exs)`` groups: ``comps`` prompt-major, G = N / len(exs) each."""
        group = [i // (len(comps) // len(exs)) for i in range(len(comps))]
        return cls(examples=[exs[g] for g in group], prompt_ids=[pids[g] for g in group],
                   completion_ids=[o.token_ids for o in comps], sampling_logprobs=[o.logprobs for o in comps],
                   truncated=[o.truncated for o in comps], texts=texts, rewards_per_func=rewards_per_func,
                   verdicts=verdicts, policy_versions=versions)

    @classmethod
    def of_groups(cls, groups: list[tuple["Rollout", int]], G: int) -> "Rollout":
        """The completions of each (round, group index) in ``groups``, in that order (no rewards yet)."""
        rows = [(r, i) for r, g in groups for i in range(g * G, (g + 1) * G)]
        pick = {name: [getattr(r, name)[i] for r, i in rows]
                for name in ("examples", "prompt_ids", "completion_ids", "sampling_logprobs", "truncated", "texts",
                             "verdicts", "policy_versions")}
        return cls(**pick, rewards_per_func=torch.stack([r.rewards_per_func[i] for r, i in rows]))

    def __len__(self) -> int:
        return len(self.completion_ids)

    def mixed(self, g: int, G: int) -> bool:
        """Whether group ``g``'s verifier scores differ (DAPO dynamic sampling keeps only those)."""
        scores = [v.score for v in self.verdicts[g * G:(g + 1) * G]]
        return max(scores) != min(scores)

    def loss_mask_len(self, i: int, mask_truncated: bool) -> int:
        """Tokens of completion i that enter the loss (0 when truncated and masked: DAPO)."""
        return 0 if (mask_truncated and self.truncated[i]) else len(self.completion_ids[i])


def group_seed(seed: int, step: int, round_index: int, group: int) -> int:
    """The sampling seed of one group: a 63-bit hash of (run seed, step, sampling round, group index),
    so a group's completions do not depend on which worker draws it or what else shares its batch."""
    digest = hashlib.blake2b(f"{seed}/{step}/{round_index}/{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class MicroBatch:
    """A collated micro-batch with each distinct prompt stored once.

    Attributes:
        index: rollout indices of the m completions.
        prompt_ids, prompt_mask, prompt_pos: (u, P) the u distinct prompts, left-padded.
        prompt_of: (m,) which distinct prompt each completion continues.
        completion_ids, completion_attn: (m, C) right-padded completions and their attention mask.
        completion_pos: (m, C) position ids (prompt length + offset, as ``generate`` numbers them).
        mask: (m, C) float, 1 on completion tokens that enter the loss.
        multiple: P and C were rounded up to a multiple of this (``pad_to_multiple_of``); ``pack_rows``
            rounds its rows and scored positions the same way.
    """

    index: list[int]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_pos: torch.Tensor
    prompt_of: torch.Tensor
    completion_ids: torch.Tensor
    completion_attn: torch.Tensor
    completion_pos: torch.Tensor
    mask: torch.Tensor
    multiple: int = 1


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], index: list[int],
            pad_id: int, loss_lens: Sequence[int] | None = None, multiple: int = 1) -> MicroBatch:
    """Collate completions ``index``; identical prompts (a GRPO group) are stored once.

    ``loss_lens[j]`` tokens of completion j are marked in ``mask`` (default: all of them). P and C are
    rounded up to a multiple of ``multiple`` (``pad_to_multiple_of``: few matmul shapes, flat memory, as
    SFT's ``sft.TokenBatch`` says); the extra prompt columns are masked left padding, the extra
    completion columns masked right padding, so logprobs, loss and gradients are unchanged (tested).
    """
    distinct: dict[tuple[int, ...], int] = {}
    prompt_of = [distinct.setdefault(tuple(prompts[i]), len(distinct)) for i in index]
    p_w = round_up(max(len(p) for p in distinct), multiple)
    c_w = round_up(max(max(len(completions[i]) for i in index), 1), multiple)
    prompt_ids = torch.full((len(distinct), p_w), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(distinct), p_w), dtype=torch.long)
    for row, p in enumerate(distinct):
        prompt_ids[row, p_w - len(p):] = torch.as_tensor(p)
        prompt_mask[row, p_w - len(p):] = 1
    completion_ids = torch.full((len(index), c_w), pad_id, dtype=torch.long)
    completion_attn = torch.zeros((len(index), c_w), dtype=torch.long)
    mask = torch.zeros((len(index), c_w), dtype=torch.float32)
    for row, i in enumerate(index):
        c = completions[i]
        completion_ids[row, :len(c)] = torch.as_tensor(c, dtype=torch.long)
        completion_attn[row, :len(c)] = 1
        mask[row, :len(c) if loss_lens is None else loss_lens[row]] = 1.0
    prompt_of_t = torch.tensor(prompt_of)
    prompt_len = prompt_mask.sum(-1)[prompt_of_t]                                     # (m,)
    return MicroBatch(index, prompt_ids, prompt_mask, (prompt_mask.cumsum(-1) - 1).clamp(min=0), prompt_of_t,
                      completion_ids, completion_attn, prompt_len[:, None] + torch.arange(c_w), mask, multiple)


def completion_logprobs(model: torch.nn.Module, mb: MicroBatch, temperature: float, bf16: bool,
                        with_entropy: bool = False, padding_free: bool = False, prefix_cache: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log π(o_t | q, o_<t) of the completion tokens under softmax(logits / T).

    Shared-prefix forward: each distinct prompt (u of them) runs once, its KV cache is gathered for
    the m completions that continue it, and the completions run on top. Equal to one forward over
    the (m, P+C) concatenation (tested to 1e-6 in float64, gradients included), at the cost of
    u·P + m·C instead of m·(P+C) tokens: a GRPO group of G completions pays for its prompt once.

    ``padding_free`` (transformers models with SDPA attention and a plain lm_head, see ``can_pack``):
    the group's completions are packed end to end behind one copy of their prompt under a block mask
    (``packed_logprobs``), so no pad token and no prompt position reaches a matmul or the lm_head:
    u·P + Σ C_i tokens instead of u·P + m·C. Same values and gradients (tested in float64).

    ``prefix_cache`` False (activation checkpointing, which recomputes a block in the backward and so
    cannot keep a KV cache the forward appended to): one forward over the (m, P+C) concatenation
    (``full_sequence_logits``) where the padding-free path does not apply.

    Returns (logps (m, C) float32, entropy (m, C) or None); positions past a completion's end hold 0
    on the padding-free path and unspecified values otherwise (callers mask them).
    """
    if padding_free and can_pack(model):
        with autocast(bf16):
            return packed_logprobs(model, mb, temperature, with_entropy)
    with autocast(bf16):
        if prefix_cache:
            last, rest = (v3_prefix_logits if isinstance(model, DeepseekV3ForCausalLM) else hf_prefix_logits)(model, mb)
            logits = torch.cat([last[mb.prompt_of], rest[:, :-1]], dim=1)             # (m, C, V)
        else:
            logits = full_sequence_logits(model, mb)
    logps = selective_log_softmax(logits, mb.completion_ids, temperature)
    return logps, (entropy_from_logits(logits, temperature) if with_entropy else None)


#: model types whose causal LM is ``lm_head(decoder(x))`` with no logit scaling or soft-capping.
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: completion tokens packed behind one prompt copy at most (attention in a packed row is quadratic).
PACK_TOKENS = 1024


def can_pack(model: torch.nn.Module) -> bool:
    """Whether ``packed_logprobs`` is exact for ``model``: a listed transformers model type running SDPA
    attention (which takes the boolean block mask as is; eager attention would add it as numbers) and
    no sliding window (the block mask replaces the model's own mask, window included)."""
    config = getattr(model, "config", None)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) == "sdpa" and not sliding)


@dataclass
class PackedRows:
    """Completions packed behind their prompt, r rows of length L.

    Attributes:
        input_ids, position_ids: (r, L); position ids restart at the prompt length for each completion.
        allowed: (r, 1, L, L) bool, True where a query may attend a key: its prompt (causally) and the
            earlier tokens of its own completion; a pad position attends only itself.
        src_row, src_pos: (n',) the row and position whose hidden state predicts each completion token;
            n' is n rounded up to ``mb.multiple``, the n' − n extra entries point at (0, 0) and their
            logits are dropped (``packed_logprobs``).
        dst_row, dst_col, target: (n,) where that token sits in the (m, C) micro-batch, and its id.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    src_row: torch.Tensor
    src_pos: torch.Tensor
    dst_row: torch.Tensor
    dst_col: torch.Tensor
    target: torch.Tensor


def pack_rows(mb: MicroBatch, pad_id: int, budget: int = PACK_TOKENS) -> PackedRows:
    """Pack ``mb``'s completions: each row is one prompt followed by as many of its completions as fit
    in ``budget`` tokens (at least one), the row length rounded up to ``mb.multiple``. n = Σ C_i
    scored tokens."""
    p_w = mb.prompt_ids.shape[1]
    lens = mb.completion_attn.sum(-1).tolist()                                         # (m,)
    prompt_lens = mb.prompt_mask.sum(-1).tolist()                                      # (u,)
    prompt_of = mb.prompt_of.tolist()
    rows: list[tuple[int, list[int]]] = []
    for u in range(mb.prompt_ids.shape[0]):
        current, used = [], 0
        for j in (j for j, pu in enumerate(prompt_of) if pu == u):
            if current and used + lens[j] > budget:
                rows.append((u, current))
                current, used = [], 0
            current.append(j)
            used += lens[j]
        if current:
            rows.append((u, current))
    L = round_up(max(prompt_lens[u] + sum(lens[j] for j in js) for u, js in rows), mb.multiple)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    allowed = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1, 1)              # (r, 1, L, L)
    src_row, src_pos, dst_row, dst_col = [], [], [], []
    for r, (u, js) in enumerate(rows):
        p = prompt_lens[u]
        ids[r, :p] = mb.prompt_ids[u, p_w - p:]
        pos[r, :p] = torch.arange(p)
        allowed[r, 0, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        start = p
        for j in js:
            n = lens[j]
            end = start + n
            ids[r, start:end] = mb.completion_ids[j, :n]
            pos[r, start:end] = torch.arange(p, p + n)
            allowed[r, 0, start:end, :p] = True
            allowed[r, 0, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
            src_row += [r] * n
            src_pos += [p - 1] + list(range(start, end - 1))
            dst_row += [j] * n
            dst_col += list(range(n))
            start = end
    extra = round_up(len(src_row), mb.multiple) - len(src_row)
    src_row, src_pos = src_row + [0] * extra, src_pos + [0] * extra
    dst_row_t, dst_col_t = torch.tensor(dst_row, dtype=torch.long), torch.tensor(dst_col, dtype=torch.long)
    return PackedRows(ids, pos, allowed, torch.tensor(src_row, dtype=torch.long), torch.tensor(src_pos, dtype=torch.long),
                      dst_row_t, dst_col_t, mb.completion_ids[dst_row_t, dst_col_t])


def packed_logprobs(model: torch.nn.Module, mb: MicroBatch, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``completion_logprobs`` on packed rows: decoder over (r, L), lm_head over the n scored positions
    only (n' with ``mb.multiple``, the extra rows dropped). Returns (logps (m, C) float32 with 0 past
    each completion's end, entropy (m, C) or None)."""
    packed = pack_rows(mb, pad_id=0)                       # pad positions are never scored; any id will do
    logits = decoder_logits(model, packed.input_ids, packed.position_ids, packed.allowed,
                            packed.src_row, packed.src_pos)[:len(packed.target)]       # (n, V) of (n', V)
    flat = selective_log_softmax(logits[None], packed.target[None], temperature)[0]   # (n,) float32/64

    def unpack(values: torch.Tensor) -> torch.Tensor:                                  # (n,) → (m, C)
        out = torch.zeros(mb.completion_ids.shape, dtype=values.dtype)
        return out.index_put((packed.dst_row, packed.dst_col), values)

    entropy = unpack(entropy_from_logits(logits[None], temperature)[0]) if with_entropy else None
    return unpack(flat), entropy


def decoder_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor, src_row: torch.Tensor, src_pos: torch.Tensor) -> torch.Tensor:
    """The decoder over (r, L) rows, then the lm_head on the n positions (``src_row``, ``src_pos``) only:
    (n, V) logits. ``attention_mask``: (r, L) 1/0 or an (r, 1, L, L) bool mask (True = may attend),
    which SDPA takes as is (``can_pack`` says for which models this equals ``model(...).logits``)."""
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state                     # (r, L, D)
    return model.get_output_embeddings()(hidden[src_row, src_pos])                      # (n, V)


def hf_prefix_logits(model: torch.nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers models: logits at each distinct prompt's last token (u, 1, V) and at every
    completion token (m, C, V), the prompts' DynamicCache gathered for their completions."""
    from transformers import DynamicCache

    first = model(input_ids=mb.prompt_ids, attention_mask=mb.prompt_mask, position_ids=mb.prompt_pos,
                  past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    cache = first.past_key_values
    cache.reorder_cache(mb.prompt_of)                                                  # (u, ...) → (m, ...)
    rest = model(input_ids=mb.completion_ids, position_ids=mb.completion_pos, past_key_values=cache,
                 attention_mask=torch.cat([mb.prompt_mask[mb.prompt_of], mb.completion_attn], dim=1),
                 use_cache=True).logits
    return first.logits, rest


def full_sequence_logits(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """(m, C, V) logits predicting every completion token from one forward over each completion behind
    its own copy of its (left-padded) prompt, no KV cache: m·(P+C) tokens, the head on the last C+1."""
    ids = torch.cat([mb.prompt_ids[mb.prompt_of], mb.completion_ids], dim=1)           # (m, P+C)
    attn = torch.cat([mb.prompt_mask[mb.prompt_of], mb.completion_attn], dim=1)
    pos = torch.cat([mb.prompt_pos[mb.prompt_of], mb.completion_pos], dim=1)
    keep = mb.completion_ids.shape[1] + 1
    if isinstance(model, DeepseekV3ForCausalLM):
        logits = model(ids, attention_mask=attn, position_ids=pos, run_mtp=False, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=keep).logits
    return logits[:, :-1]


def v3_prefix_logits(model: DeepseekV3ForCausalLM, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """r1kit's DeepSeek-V3: as ``hf_prefix_logits`` on its naive-MLA KVCache (the training path; the
    absorbed path is for decoding), without the MTP modules, which GRPO does not train."""
    cache = KVCache(absorbed=False)
    first = model(mb.prompt_ids, attention_mask=mb.prompt_mask, position_ids=mb.prompt_pos, cache=cache,
                  run_mtp=False, logits_to_keep=1)
    cache.reorder(mb.prompt_of)                                                        # (u, ...) → (m, ...)
    rest = model(mb.completion_ids, attention_mask=torch.cat([mb.prompt_mask[mb.prompt_of], mb.completion_attn], 1),
                 position_ids=mb.completion_pos, cache=cache, run_mtp=False)
    return first.logits, rest.logits


def balance_experts(policy: torch.nn.Module, gamma: float,
                    env: distributed.DistEnv = distributed.DistEnv()) -> dict[str, float]:
    """After an optimizer step of a DeepSeek-V3 policy: the aux-loss-free router-bias update with speed
    ``gamma`` over the tokens of that step (V3 report §2.1.2), returning each MoE layer's expert load
    ``moe/layer{i}/max_over_mean`` and ``min_over_mean``. Under torchrun the loads are summed over ranks
    first (as torchtitan does), so every rank applies the same update. Other models: nothing, {}."""
    if not isinstance(policy, DeepseekV3ForCausalLM):
        return {}
    for moe in policy.moe_layers():
        distributed.all_reduce_sum_(moe.tokens_per_expert, env)
    return update_router_bias(policy, gamma)


def autocast(bf16: bool):
    """bf16 autocast on CPU when asked (fp32 master weights and optimizer state are kept)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class RewardScorer:
    """Scores completions: verifier verdicts once, then each reward function, weighted.

    The reward named ``accuracy`` is the verifier's score (computed once and reused for the accuracy
    metric); ``overlong`` is DAPO's soft overlong punishment (needs completion lengths).
    """

    def __init__(self, cfg: GRPOConfig, verifier, reward_fns: list[tuple[object, float]]):
        self.cfg = cfg
        self.verifier = verifier
        self.reward_fns = reward_fns
        self.names = [getattr(fn, "name", f"reward_{i}") for i, (fn, _) in enumerate(reward_fns)]
        if cfg.overlong_buffer > 0:
            self.names.append("overlong")
        weights = [w for _, w in reward_fns] + ([1.0] if cfg.overlong_buffer > 0 else [])
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def __call__(self, texts: list[str], examples: list[Example], lengths: list[int],
                 truncated: list[bool] | None = None):
        """Returns (rewards_per_func (N, F), verdicts); ``truncated[i]``: completion i hit the token limit."""
        verdicts = self.verifier.verify_batch(texts, examples, truncated)
        cols = []
        for fn, _ in self.reward_fns:
            if getattr(fn, "name", None) == "accuracy":
                cols.append([v.score for v in verdicts])
            else:
                vals = list(fn(texts, examples))
                if len(vals) != len(texts):
                    raise ConfigError(f"reward function {getattr(fn, 'name', fn)!r} returned {len(vals)} "
                                      f"values for {len(texts)} completions")
                cols.append([math.nan if v is None else float(v) for v in vals])
        if self.cfg.overlong_buffer > 0:
            cols.append([overlong_penalty(n, self.cfg.max_completion_length, self.cfg.overlong_buffer,
                                          self.cfg.overlong_penalty) for n in lengths])
        return torch.tensor(cols, dtype=torch.float32).T.contiguous(), verdicts


def overlong_penalty(length: int, max_len: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO soft overlong punishment (arXiv 2503.14476 Eq. 13): 0 up to max_len - buffer, then
    linearly down to -penalty at max_len."""
    start = max_len - buffer
    if length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)


class GRPOTrainer(TrainLoop):
    """GRPO on rule-verified rewards (DeepSeekMath §4.1; DeepSeek-R1 §2.2), on the shared ``TrainLoop``.

    Args:
        cfg: the resolved GRPOConfig.
        policy: causal LM to train (fp32 parameters); a PEFT model with LoRA adapters when
            ``use_lora`` (with β > 0 the reference is then the policy with its adapters disabled).
        tokenizer: its tokenizer.
        train_examples: the training problems.
        render: ``Example -> prompt text`` (the template).
        scorer: a RewardScorer.
        engine: the rollout SamplingEngine (sampling from ``policy``; refreshed after each update).
        run_dir: output directory.
    """

    desc = "grpo"

    def __init__(self, cfg: GRPOConfig, policy, tokenizer, train_examples: list[Example],
                 render: Callable[[Example], str], scorer: RewardScorer, engine: SamplingEngine, run_dir: Path):
        cfg.validate()
        if not train_examples:
            raise ConfigError(f"task {cfg.task!r} split {cfg.train_split!r} has no training examples")
        env = distributed.current(cfg.data_parallel)
        cfg.check_world_size(env.world_size)
        distributed.broadcast_parameters(policy, env)
        self.cfg, self.policy, self.tokenizer, self.scorer, self.engine = cfg, policy, tokenizer, scorer, engine
        if cfg.use_lora and cfg.beta != 0.0 and cfg.ref_model_sync_steps:
            raise ConfigError("use_lora with beta > 0 takes the reference as the policy with its adapters disabled, "
                              "which cannot be re-synced: set ref_model_sync_steps 0 or use_lora false")
        self.bf16 = resolve_bf16(cfg.bf16)
        self.examples = train_examples
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompt_cache: dict[str, list[int]] = {}
        self.render = render
        self.reference = self._make_reference() if cfg.beta != 0.0 and not is_peft(policy) else None
        self.fsdp = env.enabled and env.strategy == "fsdp2"
        # FSDP2 gathers the root's weights in the model's own forward: the padding-free path calls the decoder.
        self.padding_free = cfg.padding_free and not self.fsdp
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        for model in (policy, self.reference):
            if model is not None:
                distributed.shard_model(model, env)
        params = [p for p in policy.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        self.params = params
        self.optimizer = make_optimizer(params, cfg)
        total_updates = cfg.max_steps * cfg.steps_per_generation * cfg.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_updates))
        self.data = DataCursor(len(train_examples), cfg.seed)
        self.warn_counts = {"truncated": 0, "zero_std": 0, "collapse": 0}
        self.init_loop(cfg, run_dir, cfg.max_steps)

    # ----- data -----
    def next_examples(self, n: int) -> list[Example]:
        """The next ``n`` training problems in a seeded per-epoch shuffle (the data cursor)."""
        return [self.examples[i] for i in self.data.take(n)]

    def prompt_ids(self, ex: Example) -> list[int]:
        """Token ids of the rendered prompt. Raises ConfigError when longer than max_prompt_length."""
        ids = self.prompt_cache.get(ex.id)
        if ids is None:
            ids = encode_prompt(self.render(ex), self.tokenizer)
            if len(ids) > self.cfg.max_prompt_length:
                raise ConfigError(f"prompt of {ex.id} has {len(ids)} tokens > max_prompt_length="
                                  f"{self.cfg.max_prompt_length}; raise --max-prompt-length or drop the row")
            self.prompt_cache[ex.id] = ids
        return ids

    # ----- reference -----
    def _make_reference(self):
        ref = copy.deepcopy(self.policy)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref.eval()

    @torch.no_grad()
    def sync_reference(self) -> None:
        """ref ← α·policy + (1-α)·ref (R1-Zero: α = 1 every 400 steps; TRL ref_model_sync_steps)."""
        a = self.cfg.ref_model_mixup_alpha
        for r, p in zip(self.reference.parameters(), self.policy.parameters()):
            r.mul_(1 - a).add_(p.detach(), alpha=a)
        for (name, r), p in zip(self.reference.named_buffers(), self.policy.buffers()):
            if name.endswith("e_score_correction_bias"):  # V3 router biases route like weights
                r.mul_(1 - a).add_(p, alpha=a)

    # ----- rollout -----
    def sampling_params(self) -> SamplingParams:
        c = self.cfg
        return SamplingParams(max_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                              top_k=c.top_k, n=c.num_generations, stop=list(c.stop))

    def generate_and_score(self) -> Rollout:
        """Sample, score and compute advantages for one round (with DAPO dynamic sampling if on)."""
        c = self.cfg
        G = c.num_generations
        kept: list[tuple[Rollout, int]] = []                   # (round, group index)
        rounds = 0
        stats = {"dynamic_sampling/rounds": 0.0}
        while True:
            sr = self.next_round(rounds)
            groups = range(len(sr) // G)
            kept += [(sr, g) for g in groups if not c.dynamic_sampling or sr.mixed(g, G)]
            rounds += 1
            if not c.dynamic_sampling or len(kept) >= c.prompts_per_step or rounds > c.max_resample_rounds:
                break
        if c.dynamic_sampling:
            stats["dynamic_sampling/rounds"] = float(rounds)
            stats["dynamic_sampling/kept_groups"] = float(min(len(kept), c.prompts_per_step))
            kept = kept[:c.prompts_per_step]
            if not kept:  # every group was dead in every round: fall back to the last round's groups
                kept = [(sr, g) for g in groups]
        ro = Rollout.of_groups(kept, G)
        ro.rewards = torch.nansum(ro.rewards_per_func * self.scorer.weights, dim=1)          # (N,)
        ro.advantages, ro.group_std = group_advantages(ro.rewards, G, c.scale_rewards)
        ro.stats = stats
        return ro

    def next_round(self, round_index: int) -> Rollout:
        """The next ``prompts_per_step`` problems' sampled, scored round (``sample_round``). The Ray
        trainer's overlap mode overrides this to hand out a round sampled during the previous step."""
        exs = self.next_examples(self.cfg.prompts_per_step)
        pids = [self.prompt_ids(e) for e in exs]
        return self.sample_round(exs, pids, round_index)

    def group_params(self, round_index: int, group: int, step: int | None = None) -> SamplingParams:
        """Sampling params of one group of ``step`` (default: the current one), seeded from
        (seed, step, round, group) (``group_seed``)."""
        step = self.step if step is None else step
        return replace(self.sampling_params(), seed=group_seed(self.cfg.seed, step, round_index, group))

    def sample_round(self, exs: list[Example], pids: list[list[int]], round_index: int = 0) -> Rollout:
        """Sample G completions per prompt and score them, prompt-major: the seam a distributed trainer
        replaces (``ray_grpo.RayGRPOTrainer`` runs it on rollout and reward actors).

        Under torchrun each rank samples and scores its contiguous slice of the N completions (a group
        may straddle ranks) with its own seed, and the slices are gathered, so every rank returns the
        whole round. In one process with ``rollout_group_seeds`` each group is one ``generate`` call
        seeded by ``group_params``, so the round depends on the weights, prompts and seeds only, not on
        how groups are batched or which worker draws them; otherwise one batched call on the global RNG."""
        G, env = self.cfg.num_generations, self.dist
        if env.enabled:
            lo, hi = distributed.shard_bounds(len(exs) * G, env)
            owners = [j // G for j in range(lo, hi)]
            seed = ((self.cfg.seed * 1000003 + self.step) * 1009 + round_index) * env.world_size + env.rank
            comps = self.engine.generate([pids[g] for g in owners], replace(self.sampling_params(), n=1, seed=seed))
        elif self.cfg.rollout_group_seeds:
            comps = []
            for g, p in enumerate(pids):
                comps += [replace(o, prompt_index=g) for o in self.engine.generate([p], self.group_params(round_index, g))]
            owners = [o.prompt_index for o in comps]
        else:
            comps = self.engine.generate(pids, self.sampling_params())
            owners = [o.prompt_index for o in comps]
        texts = self.tokenizer.batch_decode([o.token_ids for o in comps], skip_special_tokens=True)
        rpf, verdicts = self.scorer(texts, [exs[g] for g in owners], [len(o.token_ids) for o in comps],
                                    [o.truncated for o in comps])
        if env.enabled:
            parts = distributed.all_gather_objects((comps, texts, rpf, verdicts), env)
            comps, texts = [o for p in parts for o in p[0]], [t for p in parts for t in p[1]]
            rpf, verdicts = torch.cat([p[2] for p in parts]), [v for p in parts for v in p[3]]
        return Rollout.of_round(exs, pids, comps, texts, rpf, verdicts, [self.step] * len(comps))

    def my_slice(self, n: int) -> range:
        """The rollout indices this rank forwards and backwards (all of them in one process)."""
        return range(*distributed.shard_bounds(n, self.dist))

    # ----- no-grad passes -----
    def forwarded(self, ro: Rollout) -> list[int]:
        """Completions that need forward passes: all, or (β = 0) those with a non-zero advantage. Under
        FSDP2 all of them (zero-advantage and masked completions add exactly 0), so that every rank runs
        as many forwards, each a collective."""
        c = self.cfg
        if self.fsdp:
            return list(range(len(ro)))
        return [i for i in range(len(ro))
                if ro.loss_mask_len(i, c.mask_truncated_completions) > 0
                and (c.beta != 0.0 or not c.skip_zero_advantage or ro.advantages[i].item() != 0.0)]

    @torch.no_grad()
    def _logps_for(self, model, ro: Rollout, index: list[int]) -> dict[int, torch.Tensor]:
        out = {}
        for start in range(0, len(index), self.cfg.micro_batch_size):
            idx = index[start:start + self.cfg.micro_batch_size]
            mb = collate(ro.prompt_ids, ro.completion_ids, idx, self.pad_id, multiple=self.cfg.pad_to_multiple_of)
            logps, _ = completion_logprobs(model, mb, self.cfg.temperature, self.bf16,
                                           padding_free=self.padding_free)
            for row, i in enumerate(idx):
                out[i] = logps[row, :len(ro.completion_ids[i])].clone()
        return out

    def compute_old_and_ref(self, ro: Rollout, index: list[int]) -> None:
        """Reference logprobs (β > 0) and old-policy logprobs when the policy moves before a completion's
        first forward (steps_per_generation > 1). With one optimizer step per pass (num_iterations > 1,
        steps_per_generation = 1) the first pass runs on π_old, so ``update`` keeps its logprobs instead
        of paying for a separate no-grad forward."""
        c = self.cfg
        mine = self.my_slice(len(ro))
        index = [i for i in index if i in mine]
        if self.reference is not None:
            ro.ref_logps = self._logps_for(self.reference, ro, index)
        elif c.beta != 0.0:                                   # LoRA: the reference is the adapter-free policy
            with self.policy.disable_adapter():
                ro.ref_logps = self._logps_for(self.policy, ro, index)
        if c.steps_per_generation > 1:
            ro.old_logps = self._logps_for(self.policy, ro, index)

    # ----- update -----
    def update(self, ro: Rollout, index: list[int]) -> dict[str, float]:
        """All optimizer updates of one round; returns token-weighted loss statistics."""
        c = self.cfg
        N = len(ro)
        S = c.steps_per_generation
        order = distributed.broadcast_object(torch.randperm(N).tolist(), self.dist) if S > 1 else list(range(N))
        mine = self.my_slice(N)
        active = {i for i in index if i in mine}
        acc = _Accumulator()
        keep_old = {} if (ro.old_logps is None and c.num_iterations > 1) else None
        self.policy.train()
        for it in range(c.num_iterations):
            if it == 1 and keep_old is not None:
                ro.old_logps = keep_old                         # π_old = the first pass's logprobs
            for s in range(S):
                chunk = order[s * N // S:(s + 1) * N // S]
                n_tokens = sum(ro.loss_mask_len(i, c.mask_truncated_completions) for i in chunk)
                norm = LossNormalizer(num_sequences=len(chunk), num_tokens=n_tokens, global_num_tokens=n_tokens,
                                      world_size=1, max_completion_length=c.max_completion_length)
                fwd = [i for i in chunk if i in active]
                self.optimizer.zero_grad(set_to_none=False)
                step_loss = 0.0
                for start in range(0, len(fwd), c.micro_batch_size):
                    idx = fwd[start:start + c.micro_batch_size]
                    step_loss += self._micro_step(ro, idx, norm, acc, first_iteration=(it == 0),
                                                  keep_old=keep_old if it == 0 else None)
                if self.fsdp:                       # as many forward/backward collectives as the busiest rank
                    have = math.ceil(len(fwd) / c.micro_batch_size)
                    for _ in range(distributed.max_int(have, self.dist) - have):
                        self._zero_micro_step(ro, [mine[0]])
                acc.add("loss", distributed.sum_scalars({"loss": step_loss}, self.dist)["loss"], 1.0)
                distributed.sum_gradients(self.params, self.dist)
                grad_norm = distributed.clip_grad_norm(self.params, c.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise TrainingStopped(self.stop_message(f"non-finite grad norm ({grad_norm.item()})"))
                self.optimizer.step()
                self.scheduler.step()
                acc.add("grad_norm", grad_norm.item(), 1.0)
                for key, value in balance_experts(self.policy, c.router_bias_update_speed, self.dist).items():
                    acc.add(key, value, 1.0)
        self.policy.eval()
        return acc.merged(self.dist).means()

    def _micro_step(self, ro: Rollout, idx: list[int], norm: LossNormalizer, acc: "_Accumulator",
                    first_iteration: bool, keep_old: dict[int, torch.Tensor] | None = None) -> float:
        """Forward/backward of one micro-batch; returns its share of the step loss. Statistics of the
        round's fixed quantities (logprob mismatch, importance weights) are taken in the first iteration,
        which sees every forwarded completion once. ``keep_old`` collects this pass's detached logprobs
        (completion i → (C_i,)) as π_old for the later iterations."""
        c = self.cfg
        loss_lens = [ro.loss_mask_len(i, c.mask_truncated_completions) for i in idx]
        mb = collate(ro.prompt_ids, ro.completion_ids, idx, self.pad_id, loss_lens, c.pad_to_multiple_of)
        logps, entropy = completion_logprobs(self.policy, mb, c.temperature, self.bf16, with_entropy=True,
                                             padding_free=self.padding_free, prefix_cache=not c.gradient_checkpointing)
        # With μ = 1 and one optimizer step per round the policy has not moved yet: π_old = π_θ.
        old = self._stack(ro.old_logps, idx, logps) if ro.old_logps is not None else logps.detach()
        if keep_old is not None:
            for row, i in enumerate(idx):
                keep_old[i] = old[row, :len(ro.completion_ids[i])].clone()
        ref = self._stack(ro.ref_logps, idx, logps) if ro.ref_logps is not None else None
        adv = ro.advantages[idx]
        isw = None
        if c.rollout_importance_sampling_correction:
            isw = self._importance_weights(ro, idx, old, mb.completion_attn)
        terms = policy_loss_terms(logps, old, adv, c.epsilon, c.eps_high, c.beta, ref,
                                  None if isw is None else isw.weights)
        loss = aggregate_loss(terms.per_token_loss, mb.mask, c.loss_type, norm)
        if not torch.isfinite(loss):
            raise TrainingStopped(self.stop_message(f"non-finite loss ({loss.item()})"))
        loss.backward()
        m = mb.mask
        n_tok = m.sum().item()
        acc.add("entropy", (entropy * m).sum().item() / max(n_tok, 1), n_tok)
        acc.add("clip_ratio/low_mean", (terms.is_low_clipped * m).sum().item() / max(n_tok, 1), n_tok)
        acc.add("clip_ratio/high_mean", (terms.is_high_clipped * m).sum().item() / max(n_tok, 1), n_tok)
        acc.add("clip_ratio/region_mean", ((terms.is_low_clipped | terms.is_high_clipped) * m).sum().item() / max(n_tok, 1), n_tok)
        if terms.kl is not None:
            acc.add("kl", (terms.kl.detach() * m).sum().item() / max(n_tok, 1), n_tok)
        if first_iteration and ro.old_logps is None:
            self._mismatch(ro, idx, logps.detach(), acc)
        if first_iteration and isw is not None:
            self._importance_stats(isw, mb.completion_attn, acc)
        return loss.item()

    def _zero_micro_step(self, ro: Rollout, idx: list[int]) -> None:
        """A forward/backward that adds exactly 0 to every gradient: FSDP2 ranks with fewer micro-batches
        in an update run these so that every rank joins each all-gather and reduce-scatter."""
        mb = collate(ro.prompt_ids, ro.completion_ids, idx, self.pad_id, multiple=self.cfg.pad_to_multiple_of)
        logps, _ = completion_logprobs(self.policy, mb, self.cfg.temperature, self.bf16, padding_free=False,
                                       prefix_cache=not self.cfg.gradient_checkpointing)
        (logps.sum() * 0.0).backward()

    def _importance_weights(self, ro: Rollout, idx: list[int], old: torch.Tensor,
                            attn: torch.Tensor) -> ImportanceWeights:
        """π_old / π_rollout weights of micro-batch ``idx`` (old, attn: (m, C)) from the engine's sampling logprobs.

        Raises:
            ConfigError: the rollout backend returned no logprob for some token.
        """
        c = self.cfg
        sampling = torch.zeros_like(old)
        for row, i in enumerate(idx):
            lp = ro.sampling_logprobs[i]
            if len(lp) != len(ro.completion_ids[i]):
                raise ConfigError(f"rollout_importance_sampling_correction needs a sampling logprob per token; the "
                                  f"{c.rollout_backend} backend gave {len(lp)} for {len(ro.completion_ids[i])} tokens")
            sampling[row, :len(lp)] = torch.tensor(lp, dtype=old.dtype)
        return rollout_importance_weights(old, sampling, attn.to(old.dtype), c.rollout_importance_sampling_mode,
                                          c.rollout_importance_sampling_clip_min,
                                          c.rollout_importance_sampling_clip_max)

    @staticmethod
    def _importance_stats(isw: ImportanceWeights, attn: torch.Tensor, acc: "_Accumulator") -> None:
        """Weight mean/min/max (TRL's names) and the fraction truncated or masked: over completion tokens
        (token modes) or completions (sequence modes)."""
        keep = (attn > 0) if isw.weights.shape == attn.shape else torch.ones_like(isw.weights, dtype=torch.bool)
        w, clipped = isw.weights[keep], isw.clipped[keep]
        if w.numel():
            key = "sampling/importance_sampling_ratio"
            acc.add(f"{key}/mean", w.mean().item(), w.numel())
            acc.add(f"{key}/clipped_fraction", clipped.float().mean().item(), w.numel())
            acc.add_min(f"{key}/min", w.min().item())
            acc.add_max(f"{key}/max", w.max().item())

    @staticmethod
    def _stack(per_seq: dict[int, torch.Tensor], idx: list[int], like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like, requires_grad=False)
        for row, i in enumerate(idx):
            out[row, :per_seq[i].numel()] = per_seq[i]
        return out

    @staticmethod
    def _mismatch(ro: Rollout, idx: list[int], logps: torch.Tensor, acc: "_Accumulator") -> None:
        """|sampling logprob − trainer logprob| per token (training/inference mismatch, GRPO_SPEC §5)."""
        for row, i in enumerate(idx):
            s = torch.tensor(ro.sampling_logprobs[i])
            if s.numel():
                d = (s - logps[row, :s.numel()]).abs()
                acc.add("logprob_mismatch/mean", d.mean().item(), s.numel())
                acc.add_max("logprob_mismatch/max", d.max().item())

    # ----- one step -----
    def train_step(self) -> dict[str, float]:
        """One generation round and its updates; returns the step's metrics."""
        c = self.cfg
        t0 = time.perf_counter()
        ro = self.generate_and_score()
        t1 = time.perf_counter()
        index = self.forwarded(ro)
        self.compute_old_and_ref(ro, index)
        t2 = time.perf_counter()
        if ro.old_logps is not None:
            acc = _Accumulator()
            for i in (i for i in index if i in ro.old_logps):          # this rank's slice
                self._mismatch(ro, [i], ro.old_logps[i].unsqueeze(0), acc)
            mismatch = acc.merged(self.dist).means()
        else:
            mismatch = {}
        loss_stats = self.update(ro, index)
        self.refresh_engine()
        t3 = time.perf_counter()
        self.step += 1
        if self.reference is not None and c.ref_model_sync_steps and self.step % c.ref_model_sync_steps == 0:
            self.sync_reference()
        metrics = self._metrics(ro, index, t1 - t0, t2 - t1, t3 - t2)
        metrics.update(dict.fromkeys(self.update_metric_keys(), math.nan))
        metrics.update(loss_stats)
        metrics.update(mismatch)
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        self._guards(metrics)
        if c.log_completions_steps and (self.step % c.log_completions_steps == 0 or self.step == 1) and self.dist.is_main:
            self.logger.log_samples(self.step, self._samples(ro))
        return metrics

    def update_metric_keys(self) -> list[str]:
        """The update statistics every step of this run logs, so that each metrics.jsonl row has the same
        keys. The set depends on the config and the model only: ``kl`` with β > 0, the importance ratios
        with the rollout correction on, ``moe/*`` expert loads for a DeepSeek-V3 policy.

        A step that forwards no completion (every group's rewards equal and β = 0, or every completion
        masked) measures none of entropy, clip_ratio/*, kl, logprob_mismatch/*, the importance ratios or
        the expert loads: they are NaN (null in metrics.jsonl), not 0. Its ``loss`` and ``grad_norm``
        are measured and exact: every per-token term is 0 (advantage 0 with β = 0) or masked out, so the
        loss is 0.0 and so is the gradient.
        """
        c = self.cfg
        keys = ["loss", "grad_norm", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "logprob_mismatch/mean", "logprob_mismatch/max"]
        if c.beta != 0.0:
            keys.append("kl")
        if c.rollout_importance_sampling_correction:
            keys += [f"sampling/importance_sampling_ratio/{s}" for s in ("mean", "clipped_fraction", "min", "max")]
        if isinstance(self.policy, DeepseekV3ForCausalLM):
            keys += expert_load_keys(self.policy)
        return keys

    def _metrics(self, ro: Rollout, index: list[int], t_roll: float, t_ref: float, t_upd: float) -> dict[str, float]:
        G = self.cfg.num_generations
        lengths = torch.tensor([len(x) for x in ro.completion_ids], dtype=torch.float32)
        group_std = ro.group_std.view(-1, G)[:, 0]
        m = {
            "reward": ro.rewards.mean().item(),
            "reward_std": group_std.mean().item(),
            "accuracy": sum(v.correct for v in ro.verdicts) / len(ro.verdicts),
            "frac_reward_zero_std": (group_std.abs() < 1e-8).float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/min_length": lengths.min().item(),
            "completions/clipped_ratio": sum(ro.truncated) / len(ro.truncated),
            "forwarded_fraction": len(index) / len(ro),
            "tokens_per_s": lengths.sum().item() / max(t_roll, 1e-9),
            "time/rollout": t_roll, "time/reference": t_ref, "time/update": t_upd,
            "time/step": t_roll + t_ref + t_upd,
            **ro.stats,
        }
        for j, name in enumerate(self.scorer.names):
            col = ro.rewards_per_func[:, j]
            m[f"rewards/{name}/mean"] = torch.nanmean(col).item()
            m[f"rewards/{name}/std"] = col[~col.isnan()].std().item() if (~col.isnan()).sum() > 1 else 0.0
        answers = answer_histogram([v.extracted for v in ro.verdicts], top=1)
        m["answers/top_share"] = math.nan if answers["top_share"] is None else answers["top_share"]
        m["answers/entropy"] = math.nan if answers["entropy_bits"] is None else answers["entropy_bits"]
        if "format" in self.scorer.names:
            m["format_rate"] = (ro.rewards_per_func[:, self.scorer.names.index("format")] > 0).float().mean().item()
        return m

    def _guards(self, m: dict[str, float]) -> None:
        c = self.cfg
        checks = {"truncated": (m["completions/clipped_ratio"] >= c.warn_truncated_ratio,
                                f"{m['completions/clipped_ratio']:.0%} of completions hit max_completion_length="
                                f"{c.max_completion_length}: rewards are computed on cut-off text; raise "
                                "--max-completion-length or shorten the template"),
                  "zero_std": (m["frac_reward_zero_std"] >= c.warn_zero_std_ratio,
                               f"{m['frac_reward_zero_std']:.0%} of groups have zero reward std: almost no learning "
                               "signal; try an easier task, more generations, or --dynamic-sampling true"),
                  "collapse": (m["answers/top_share"] >= c.warn_answer_share,
                               f"one answer is {m['answers/top_share']:.0%} of the completions (answer entropy "
                               f"{m['answers/entropy']:.2f} bits): the policy is collapsing onto a common answer, "
                               "a prior rather than a skill; lower --learning-rate or check the data's answer "
                               "distribution")}
        for key, (bad, msg) in checks.items():
            self.warn_counts[key] = self.warn_counts[key] + 1 if bad else 0
            if self.warn_counts[key] == c.warn_patience:
                warnings.warn(f"step {self.step}: {msg} (for {n_steps(c.warn_patience)} in a row)", stacklevel=2)

    def _samples(self, ro: Rollout, per_step: int = 4) -> list[dict]:
        G = self.cfg.num_generations
        rows = []
        for i in range(0, min(len(ro), per_step * G), G):
            rows.append({"id": ro.examples[i].id, "prompt": ro.examples[i].prompt, "gold": ro.examples[i].gold,
                         "completions": [{"text": ro.texts[j], "reward": ro.rewards[j].item(),
                                          "advantage": ro.advantages[j].item(), "extracted": ro.verdicts[j].extracted,
                                          "truncated": ro.truncated[j]} for j in range(i, i + G)]})
        return rows

    def refresh_engine(self) -> None:
        """Give the rollout engine the current weights (a LoRA policy: merged, ``merged_weights_view``)."""
        self.engine.update_weights(merged_weights_view(self.policy))

    # ----- TrainLoop hooks -----
    def progress_postfix(self, m: dict[str, float]) -> dict[str, str]:
        return dict(reward=f"{m['reward']:.3f}", acc=f"{m['accuracy']:.3f}",
                    len=f"{m['completions/mean_length']:.0f}", s=f"{m['time/step']:.1f}")

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.data.epoch, "cursor": self.data.cursor, "warn_counts": self.warn_counts}

    def load_state(self, st: dict) -> None:
        self.step, self.data.epoch, self.data.cursor = st["step"], st["epoch"], st["cursor"]
        self.warn_counts = {**self.warn_counts, **st["warn_counts"]}  # checkpoints from before a guard was added
        self.refresh_engine()

    def checkpoint_reference(self):
        return self.reference if (self.reference is not None and self.cfg.ref_model_sync_steps) else None

    def after_resume(self, path: Path) -> None:
        if self.reference is not None and (path / "reference").is_dir():
            from r1kit.models.v3_io import read_tensors

            self.reference.load_state_dict(read_tensors(path / "reference"), strict=False)


class _Accumulator:
    """Weighted running means (and maxima, minima) of scalar statistics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.mins: dict[str, float] = {}

    def add(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def add_max(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, -math.inf), value)

    def add_min(self, key: str, value: float) -> None:
        self.mins[key] = min(self.mins.get(key, math.inf), value)

    def merged(self, env: distributed.DistEnv) -> "_Accumulator":
        """The accumulator of all ranks' statistics (sums and weights added, extremes combined); a
        statistic every rank adds with weight 1 (loss, grad_norm: already global) keeps its value."""
        if not env.enabled:
            return self
        out = _Accumulator()
        for part in distributed.all_gather_objects(self, env):
            for k in part.sums:
                out.add(k, part.sums[k] / part.weights[k] if part.weights[k] else 0.0, part.weights[k])
            for k, v in part.maxes.items():
                out.add_max(k, v)
            for k, v in part.mins.items():
                out.add_min(k, v)
        return out

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}
        out.update(self.maxes)
        out.update(self.mins)
        return out
