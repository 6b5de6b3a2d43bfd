"""Pretrain a tiny DeepSeek-V3 MoE from scratch on generated arithmetic, on the CPU.

The first half of "R1-Zero in miniature" (``r1kit.train.v3_zero``): a character-level corpus of sums
and differences (``"37+48=85"``, train split of ``r1kit.data.arithmetic`` only; or, with
``task="arithmetic_chain"``, three-operand chains with their worked traces, ``"12+34+56=46+56=102"``), next-token + λ·MTP +
α·balance loss, the aux-loss-free router-bias update after every optimizer step, and a history of the
loss curve and per-layer expert load. Saved with ``save_pretrained_atomic`` the checkpoint (HF layout,
``r1kit.models.v3_io``) carries the tokenizer's files, so ``load_policy`` reads both back.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass

import torch

from r1kit.data.arithmetic import MAX_COMPLETION_TOKENS, random_document
from r1kit.models.deepseek_v3 import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    pretrain_loss,
    update_router_bias,
)
from r1kit.models.v3_decode import generate


SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")  # ids 0-3; bos 0 / eos 1 as DeepSeek-V3's config
ALPHABET = "0123456789+-=*() \n"


def char_tokenizer():
    """A character-level HF tokenizer for generated arithmetic: ids 0-3 are ``SPECIALS``, then one id per
    character of ``ALPHABET`` (22 ids); encoding prepends ``<bos>``, other characters become ``<unk>``,
    decoding joins characters without spaces.

    It is a ``PreTrainedTokenizerFast``, so ``save_pretrained`` writes ``tokenizer.json`` next to the
    checkpoint and ``load_policy`` / ``AutoTokenizer`` read it back.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *ALPHABET])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.add_special_tokens(list(SPECIALS))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def training_batch(tok, rng: random.Random, batch_size: int, max_operand: int | None,
                   task: str = "arithmetic") -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size train-split problems of ``task`` with their completions (the answer, or the worked
    trace of ``arithmetic_chain``) and eos, right-padded: input_ids, attention_mask (b, s)."""
    rows = []
    for _ in range(batch_size):
        prompt, completion = random_document(task, rng, max_operand)
        rows.append(tok(prompt + completion).input_ids + [tok.eos_token_id])
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), tok.pad_token_id)
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@dataclass
class PretrainConfig:
    """What ``pretrain`` runs."""

    preset: str = "tiny-10m"  # model shape (models/presets); vocab_size is set to the tokenizer's
    steps: int = 100_000  # optimizer steps at most
    max_seconds: float = 600.0  # budget in CPU seconds of this process (a shared machine's load does not shrink it)
    batch_size: int = 32  # problems per step
    task: str = "arithmetic"  # corpus: "arithmetic" (a±b=answer) or "arithmetic_chain" (a±b±c=worked trace)
    max_operand: int | None = None  # operands in [0, max_operand] (None = the task's default: 49, 29)
    lr: float = 3e-3  # AdamW peak learning rate, linear warm-up over warmup_steps, then cosine decay
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio·lr when the budget (steps or CPU time) is spent
    bias_update_speed: float = 0.001  # γ of the router-bias update (V3 report §4.2)
    seed: int = 0
    overrides: dict = dataclasses.field(default_factory=dict)  # DeepseekV3Config fields to change


def build_model(cfg: PretrainConfig, tok) -> DeepseekV3ForCausalLM:
    """The preset with the tokenizer's vocabulary, bos/eos and ``overrides``, seeded."""
    fields = {**dataclasses.asdict(DeepseekV3Config.preset(cfg.preset)), **cfg.overrides}
    fields.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  bias_update_speed=cfg.bias_update_speed)
    torch.manual_seed(cfg.seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**fields))


def pretrain(cfg: PretrainConfig, tok=None) -> tuple[DeepseekV3ForCausalLM, dict]:
    """Train from scratch; returns the model (eval mode) and the history: per step ``loss``, ``lm``,
    ``mtp``, ``balance`` (nats) and ``max_over_mean`` (worst MoE layer's max/mean expert load), per
    MoE layer ``load_per_layer[name]`` (max/mean per step), plus ``steps``, ``seconds`` (wall),
    ``cpu_seconds``, ``tokens`` and ``mtp_layers`` (the names of the MTP modules' layers). Training stops
    after ``cfg.steps`` steps or once ``cfg.max_seconds`` of process CPU time are spent."""
    tok = tok or char_tokenizer()
    model = build_model(cfg, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    history = {key: [] for key in ("loss", "lm", "mtp", "balance", "max_over_mean")}
    history["load_per_layer"] = {}
    start, cpu_start, tokens = time.monotonic(), time.process_time(), 0
    for step in range(cfg.steps):
        ids, mask = training_batch(tok, rng, cfg.batch_size, cfg.max_operand, cfg.task)
        parts = pretrain_loss(model, model(ids, attention_mask=mask), ids, mask)
        parts["loss"].backward()
        spent = max(step / cfg.steps, (time.process_time() - cpu_start) / cfg.max_seconds)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, spent)
        opt.step()
        opt.zero_grad()
        loads = {k.split("/")[1]: v for k, v in update_router_bias(model).items() if k.endswith("max_over_mean")}
        for key in ("loss", "lm", "mtp", "balance"):
            history[key].append(parts[key].item())
        history["max_over_mean"].append(max(loads.values(), default=1.0))
        for layer, value in loads.items():
            history["load_per_layer"].setdefault(layer, []).append(value)
        tokens += int(mask.sum())
        if time.process_time() - cpu_start > cfg.max_seconds:
            break
    n_main = model.config.num_hidden_layers
    history.update(steps=len(history["loss"]), seconds=time.monotonic() - start,
                   cpu_seconds=time.process_time() - cpu_start, tokens=tokens,
                   mtp_layers=[f"layer{n_main + k}" for k in range(model.config.num_nextn_predict_layers)])
    return model.eval(), history


def learning_rate(cfg: PretrainConfig, step: int, spent: float) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, times a cosine from 1 down to ``min_lr_ratio``
    as ``spent`` (fraction of the budget used, steps or CPU time, whichever is further) goes 0 → 1.
    The run ends at a small learning rate whichever budget stops it, not in the middle of a loss spike."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(spent, 1.0)))
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def heldout_accuracy(model: DeepseekV3ForCausalLM, tok, n: int = 200, task: str = "arithmetic") -> float:
    """Fraction of the first ``n`` test-split problems of ``task`` (default operand range) whose
    greedy completion (up to eos, at most ``MAX_COMPLETION_TOKENS[task]``) ends in the exact answer:
    the text after its last ``=`` (all of it for ``arithmetic``) equals the gold."""
    from r1kit.data.loading import load_task

    problems = load_task(task, "test")[:n]
    prompts = [tok(p.prompt).input_ids for p in problems]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = generate(model, ids, max_new_tokens=MAX_COMPLETION_TOKENS[task], attention_mask=mask, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    answers = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(a.rsplit("=", 1)[-1] == p.gold for a, p in zip(answers, problems)) / len(problems)
