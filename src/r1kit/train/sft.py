"""The SFT trainer and recipe (``r1kit train sft``): completion-only NLL on rendered reasoning traces.

One *step* = one optimizer update over ``examples_per_step`` examples (``per_device_train_batch_size``
× ``gradient_accumulation_steps``) from a seeded per-epoch shuffle (DISTILL_SPEC §5):

  loss = Σ_{trained tokens t of the step} −log π(y_t | y_<t) / (trained tokens of the whole step)

Trained tokens are the completion's (the whole reasoning, the answer and the end-of-turn token,
``r1kit.data.sft_data``), never the prompt's; the normalizer counts the whole optimizer step, so the
gradient does not depend on how the step is split into micro-batches (the transformers GA bug fixed
in 4.46). Examples longer than ``max_length`` are dropped before training and counted (or an error),
never cut. With ``packing`` the examples of a micro-batch are laid end to end in rows of at most
``max_length`` tokens under a block-diagonal causal mask with positions restarting at 0 per
document, which gives the same values and gradients as the padded batch (tested in float64).
Under torchrun every rank draws the same global step batch, forwards its contiguous slice, divides by
the trained tokens of the whole step (an all-reduce of the per-rank counts) and the gradients are
summed over ranks (``r1kit.train.distributed``): the update equals one process's on that batch.

Notation: m = examples in a micro-batch, S = its padded length, n = trained tokens, V = vocabulary.

Recipe (``run_sft``): load rows and model, render and filter, evaluate the initial model (optional),
train on the shared ``TrainLoop`` (run dir, checkpoints, resume, metrics, time budget, guards), save
``final/`` (merged when LoRA), plot curves, evaluate again and write ``eval/report.md`` with the
same code as the GRPO recipe.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1kit.config import SFTConfig
from r1kit.data.base import Example
from r1kit.data.sft_data import SFTRow, TokenizedExample, load_sft_rows, tokenize_rows
from r1kit.errors import ConfigError, DataError, TrainingStopped
from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1kit.models.loading import resolve_bf16
from r1kit.train import checkpoint as ckpt
from r1kit.train import distributed
from r1kit.train.grpo import autocast, can_pack, decoder_logits
from r1kit.train.losses import entropy_from_logits
from r1kit.train.loop import (DataCursor, TrainLoop, enable_gradient_checkpointing, lr_lambda, make_optimizer,
                              round_up)

#: metrics.jsonl keys of every SFT step (TRL's names where it has one).
SFT_METRICS = ("loss", "mean_token_accuracy", "entropy", "grad_norm", "learning_rate", "num_tokens",
               "trained_tokens", "tokens_per_s", "examples_dropped", "epoch", "time/step")
SFT_PANELS = [("loss", "loss (NLL per trained token)"), ("mean_token_accuracy", "token accuracy"),
              ("entropy", "entropy (nats)"), ("learning_rate", "learning rate")]


@dataclass
class TokenBatch:
    """The forward inputs of a micro-batch and where its trained tokens are.

    Attributes:
        input_ids, position_ids: (r, L) rows (padded batch: one example per row; packed: several).
        attention: (r, L) 1/0 padding mask, or (r, 1, L, L) bool block-diagonal causal mask (packed).
        src_row, src_pos: (n',) row and position whose output predicts each trained token; n' is n
            rounded up to ``pad_to_multiple_of``, the n' − n extra entries point at (0, 0) and their
            logits are dropped (``trained_token_logits``).
        target: (n,) the trained token ids.

    Why the rounding: bf16 matmuls on CPU go through oneDNN, whose primitive caches (ideep's
    ``LRU_CACHE_CAPACITY`` and oneDNN's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, 1024 entries each) keep
    one entry per matmul shape: measured +12 MB of RSS per new sequence length (forward + backward,
    SmolLM2-135M; flat with both caches off, and in fp32), and glibc's heap fragments under
    ever-new tensor sizes; rounding L and n bounds the shapes a run sees (``bench/sft_memory.py``).
    Pads are masked and never scored: the loss is unchanged (tested).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    src_row: torch.Tensor
    src_pos: torch.Tensor
    target: torch.Tensor


def _targets(examples: list[TokenizedExample], starts: list[tuple[int, int]], multiple: int = 1
             ) -> tuple[list[int], list[int], list[int]]:
    """(src_row, src_pos, target) for examples placed at (row, offset): completion token j of an
    example with prompt length p is predicted at offset + p + j − 1; src_row/src_pos are padded with
    (0, 0) to a multiple of ``multiple``."""
    src_row, src_pos, target = [], [], []
    for ex, (r, off) in zip(examples, starts):
        p, c = len(ex.prompt_ids), len(ex.completion_ids)
        src_row += [r] * c
        src_pos += range(off + p - 1, off + p + c - 1)
        target += ex.completion_ids
    extra = round_up(len(target), multiple) - len(target)
    return src_row + [0] * extra, src_pos + [0] * extra, target


def padded_batch(examples: list[TokenizedExample], pad_id: int, multiple: int = 1) -> TokenBatch:
    """One right-padded row per example (r = m, L = S rounded up to ``multiple``)."""
    L = round_up(max(len(e) for e in examples), multiple)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, :len(e)] = torch.tensor(e.prompt_ids + e.completion_ids)
        mask[r, :len(e)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rows, cols, target = _targets(examples, [(r, 0) for r in range(len(examples))], multiple)
    return TokenBatch(ids, pos, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(target))


def packed_batch(examples: list[TokenizedExample], budget: int, multiple: int = 1) -> TokenBatch:
    """Examples laid end to end (first fit, in order) in rows of at most ``budget`` tokens, the row
    length then rounded up to ``multiple``; each attends only to its own earlier tokens
    (block-diagonal causal mask) and its positions start at 0. Pad positions attend to themselves
    only and are never scored."""
    rows: list[list[int]] = []
    used: list[int] = []
    starts: list[tuple[int, int]] = []
    for i, e in enumerate(examples):
        r = next((r for r, u in enumerate(used) if u + len(e) <= budget), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        starts.append((r, used[r]))
        rows[r].append(i)
        used[r] += len(e)
    L = round_up(max(used), multiple)
    ids = torch.zeros((len(rows), L), dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    allowed = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1, 1)                # (r, 1, L, L)
    for i, e in enumerate(examples):
        r, off = starts[i]
        n = len(e)
        ids[r, off:off + n] = torch.tensor(e.prompt_ids + e.completion_ids)
        pos[r, off:off + n] = torch.arange(n)
        allowed[r, 0, off:off + n, off:off + n] = torch.ones(n, n, dtype=torch.bool).tril()
    src_row, src_pos, target = _targets(examples, starts, multiple)
    return TokenBatch(ids, pos, allowed, torch.tensor(src_row), torch.tensor(src_pos), torch.tensor(target))


def trained_token_logits(model: torch.nn.Module, batch: TokenBatch, whole_model: bool = False) -> torch.Tensor:
    """(n, V) logits that predict the trained tokens. Models with a plain lm_head (``can_pack``-able
    transformers models) run the head on those n positions only; others produce all logits and are
    indexed (a packed batch needs a plain head: the block mask goes to the decoder). ``whole_model``:
    always call the model itself (FSDP2 gathers the root's weights in the model's forward hook). The
    head runs on all n' rounded-up positions (one shape per bucket); the extra n' − n rows are dropped."""
    n = len(batch.target)
    if isinstance(model, DeepseekV3ForCausalLM):
        logits = model(batch.input_ids, attention_mask=batch.attention, position_ids=batch.position_ids,
                       run_mtp=False).logits
        return logits[batch.src_row, batch.src_pos][:n]
    if can_pack(model) and not whole_model:
        return decoder_logits(model, batch.input_ids, batch.position_ids, batch.attention, batch.src_row,
                              batch.src_pos)[:n]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention, position_ids=batch.position_ids,
                   use_cache=False).logits
    return logits[batch.src_row, batch.src_pos][:n]


def sft_token_terms(model: torch.nn.Module, batch: TokenBatch, bf16: bool = False, whole_model: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per trained token: (NLL (n,) with grad, correct (n,) bool: argmax = target, entropy (n,) nats)."""
    with autocast(bf16):
        logits = trained_token_logits(model, batch, whole_model)                                     # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = torch.nn.functional.cross_entropy(logits, batch.target, reduction="none")     # (n,)
    correct = logits.detach().argmax(-1) == batch.target
    return nll, correct, entropy_from_logits(logits[None])[0]


class SFTTrainer(TrainLoop):
    """Completion-only SFT on the shared ``TrainLoop`` (module docstring).

    Args:
        cfg: the resolved SFTConfig.
        policy: causal LM to train (fp32 parameters; a PEFT model when ``use_lora``).
        tokenizer: its tokenizer.
        examples: the rendered examples that fit ``max_length``.
        run_dir: output directory.
        examples_dropped: how many over-long examples were left out (logged every step).

    Raises:
        ConfigError: no examples, or packing on a model the block mask is not exact for.
    """

    desc = "sft"

    def __init__(self, cfg: SFTConfig, policy, tokenizer, examples: list[TokenizedExample], run_dir: Path,
                 examples_dropped: int = 0):
        cfg.validate()
        if not examples:
            raise ConfigError(f"no SFT examples to train on from {cfg.data!r} ({examples_dropped} dropped as longer "
                              f"than max_length={cfg.max_length})")
        if cfg.packing and not can_pack(policy):
            raise ConfigError("packing needs a transformers model with SDPA attention, a plain lm_head and no "
                              f"sliding window (model type {getattr(policy.config, 'model_type', '?')!r}); "
                              "set --packing false")
        env = distributed.current(cfg.data_parallel)
        cfg.check_world_size(env.world_size)
        distributed.broadcast_parameters(policy, env)
        if cfg.packing and env.enabled and env.strategy == "fsdp2":
            raise ConfigError("packing calls the decoder with a block mask, which FSDP2's root hook does not see; "
                              "set --packing false or --data-parallel ddp")
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        distributed.shard_model(policy, env)
        self.policy, self.tokenizer, self.examples = policy, tokenizer, examples
        self.examples_dropped = examples_dropped
        self.bf16 = resolve_bf16(cfg.bf16)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.params = [p for p in policy.parameters() if p.requires_grad]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer = make_optimizer(self.params, cfg)
        total = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(examples) / cfg.examples_per_step))
        warmup = math.ceil(cfg.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, warmup, total, cfg.min_lr_ratio))
        self.data = DataCursor(len(examples), cfg.seed)
        self.num_tokens = 0
        self.init_loop(cfg, run_dir, total)

    def micro_batches(self, batch: list[TokenizedExample]) -> list[TokenBatch]:
        size = self.cfg.per_device_train_batch_size
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        multiple = self.cfg.pad_to_multiple_of
        if self.cfg.packing:
            return [packed_batch(ch, self.cfg.max_length, multiple) for ch in chunks]
        return [padded_batch(ch, self.pad_id, multiple) for ch in chunks]

    def accumulate(self, batch: list[TokenizedExample]) -> dict[str, float]:
        """Forward/backward of one optimizer step's examples into ``.grad`` (not zeroed here), each
        micro-batch's NLL sum divided by the step's trained tokens. Under torchrun ``batch`` is this
        rank's slice and the normalizer and the returned statistics are those of the whole step.
        Returns loss, accuracy, entropy, trained_tokens.

        Raises TrainingStopped on a non-finite loss."""
        n_step = int(distributed.sum_scalars({"n": sum(len(e.completion_ids) for e in batch)}, self.dist)["n"])
        loss = correct = entropy = 0.0
        self.policy.train()
        for mb in self.micro_batches(batch):
            nll, right, ent = sft_token_terms(self.policy, mb, self.bf16, whole_model=self.dist.strategy == "fsdp2")
            part = nll.sum() / n_step
            if not torch.isfinite(part):
                raise TrainingStopped(self.stop_message(f"non-finite loss ({part.item()})"))
            part.backward()
            loss += part.item()
            correct += right.sum().item()
            entropy += ent.sum().item()
        self.policy.eval()
        tot = distributed.sum_scalars({"loss": loss, "correct": correct, "entropy": entropy}, self.dist)
        return {"loss": tot["loss"], "mean_token_accuracy": tot["correct"] / n_step, "entropy": tot["entropy"] / n_step,
                "trained_tokens": float(n_step)}

    def train_step(self) -> dict[str, float]:
        c = self.cfg
        t0 = time.perf_counter()
        batch = [self.examples[i] for i in self.data.take(c.examples_per_step)]
        lo, hi = distributed.shard_bounds(len(batch), self.dist)
        self.optimizer.zero_grad(set_to_none=False)
        m = self.accumulate(batch[lo:hi])
        distributed.sum_gradients(self.params, self.dist)
        grad_norm = distributed.clip_grad_norm(self.params, c.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingStopped(self.stop_message(f"non-finite grad norm ({grad_norm.item()})"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.num_tokens += int(m["trained_tokens"])
        dt = time.perf_counter() - t0
        m.update({"grad_norm": grad_norm.item(), "learning_rate": lr, "num_tokens": float(self.num_tokens),
                  "tokens_per_s": sum(len(e) for e in batch) / max(dt, 1e-9),
                  "examples_dropped": float(self.examples_dropped),
                  "epoch": self.data.epoch + self.data.cursor / len(self.examples), "time/step": dt})
        return {k: m[k] for k in SFT_METRICS}

    def progress_postfix(self, m: dict[str, float]) -> dict[str, str]:
        return dict(loss=f"{m['loss']:.3f}", acc=f"{m['mean_token_accuracy']:.3f}", s=f"{m['time/step']:.1f}")

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.data.epoch, "cursor": self.data.cursor,
                "num_tokens": self.num_tokens, "total_steps": self.total_steps}

    def load_state(self, st: dict) -> None:
        self.step, self.data.epoch, self.data.cursor = st["step"], st["epoch"], st["cursor"]
        self.num_tokens = st["num_tokens"]


def sft_total_steps(cfg: SFTConfig, run_dir: Path) -> int | None:
    """The step count of a run: ``max_steps``, else what its latest checkpoint recorded (None: no
    checkpoint yet; the count then follows from the data)."""
    if cfg.max_steps:
        return cfg.max_steps
    last = ckpt.latest_checkpoint(run_dir)
    return None if last is None else json.loads((last / "trainer_state.json").read_text()).get("total_steps")


def sft_eval_task(cfg: SFTConfig) -> str | None:
    """The held-out task: ``eval_task``, else ``data`` when it is a registered task, else None."""
    from r1kit.data.base import task_names

    return cfg.eval_task or (cfg.data if cfg.data in task_names() else None)


def run_sft(cfg: SFTConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run the SFT recipe (module docstring); returns the run directory (config.yaml, metrics.jsonl,
    checkpoint-N/, final/, curves.png, eval/ when asked). ``resume`` on a finished run says so and
    returns at once.

    Raises:
        R1kitError (and subclasses): bad config, data or model; TrainingStopped from a guard.
    """
    from r1kit.data.loading import load_task
    from r1kit.eval.evaluate import EvalResult, evaluate
    from r1kit.models.loading import load_policy
    from r1kit.runtime import make_engine, make_render, make_verifier
    from r1kit.train.logging import n_steps, plot_curves
    from r1kit.train.loop import apply_lora, merged_for_save
    from r1kit.train.recipe import (check_disjoint, check_run_dir, evaluate_after, evaluate_before, resume_latest,
                                    run_complete, save_final, say_complete, seed_everything)

    cfg.validate()
    env = distributed.init_distributed(cfg.dist_timeout_minutes, cfg.data_parallel)
    run_dir = Path(cfg.output)
    check_run_dir(run_dir, resume, cfg)
    total = sft_total_steps(cfg, run_dir)
    if resume and total is not None and run_complete(run_dir, total, cfg.eval_after):
        say_complete(run_dir, total)
        return run_dir
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    rows = load_sft_rows(cfg.data, cfg.data_split, limit=cfg.max_train_examples)
    if not rows:
        raise DataError(f"SFT data {cfg.data!r} has no rows")
    eval_task = sft_eval_task(cfg)
    held_out = []
    if cfg.eval_before or cfg.eval_after:
        if eval_task is None:
            raise ConfigError(f"eval_before/eval_after need --eval-task: {cfg.data!r} is not a registered task")
        held_out = load_task(eval_task, cfg.eval_split, limit=cfg.eval_limit)
        check_disjoint([_as_example(r) for r in rows], held_out)
    policy, tokenizer = load_policy(cfg.model, dtype=torch.float32)
    render, template = make_render(cfg.template, tokenizer)
    examples, dropped = tokenize_rows(rows, tokenizer, template, cfg.max_length, cfg.overlong)
    if dropped:
        print(f"dropped {len(dropped)} of {len(rows)} examples longer than max_length={cfg.max_length} "
              f"(first: {dropped[0]}); none was cut", flush=True)
    verifier = make_verifier(eval_task or "gsm8k", cfg.answer_extraction)
    eval_dir = run_dir / "eval"

    def run_eval(model: torch.nn.Module) -> EvalResult:
        engine = make_engine(model, tokenizer, "auto", torch.bfloat16 if resolve_bf16(cfg.bf16) else torch.float32)
        return evaluate(engine, tokenizer, held_out, verifier, render, k=cfg.eval_k, temperature=cfg.eval_temperature,
                        top_p=cfg.eval_top_p, max_tokens=cfg.eval_max_tokens, seed=cfg.seed,
                        task=f"{eval_task}/{cfg.eval_split}", stop=cfg.stop)

    before = (evaluate_before(lambda: run_eval(policy), len(held_out), cfg.eval_k, eval_dir)
              if cfg.eval_before and env.is_main else None)
    if cfg.use_lora:
        policy = apply_lora(policy, cfg)
    trainer = SFTTrainer(cfg, policy, tokenizer, examples, run_dir, examples_dropped=len(dropped))
    if resume:
        resume_latest(trainer, run_dir)
    print(f"training on {len(examples)} examples, {n_steps(trainer.total_steps)} of {cfg.examples_per_step}", flush=True)
    trainer.train(progress=progress)
    trainer.logger.close()
    if not save_final(policy, tokenizer, run_dir, env):
        return run_dir
    if cfg.plot and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", panels=SFT_PANELS)
    if cfg.eval_after:
        header = (f"# SFT run: held-out evaluation\n\nmodel {cfg.model}, data {cfg.data} ({len(examples)} examples, "
                  f"{len(dropped)} dropped as over-long), {n_steps(trainer.step)}, template {cfg.template}, eval on "
                  f"{eval_task}/{cfg.eval_split} (never trained on), k={cfg.eval_k}, T={cfg.eval_temperature}, "
                  f"top-p={cfg.eval_top_p}\n\n")
        golds = [r.meta.get("gold") for r in rows]
        evaluate_after(lambda: run_eval(merged_for_save(policy)), len(held_out), cfg.eval_k, eval_dir, before, header,
                       golds if any(g is not None for g in golds) else None,
                       train_missing=f"the SFT data {cfg.data!r} carries no gold answers")
    return run_dir


def _as_example(row: SFTRow) -> Example:
    """An SFTRow as an Example (prompt text only) for ``check_disjoint``."""
    return Example(row.id, row.prompt, None)
