"""The training-loop skeleton GRPO and SFT share: steps, time budget, logging, checkpoints, resume.

A trainer subclasses ``TrainLoop`` and provides ``train_step()`` (one optimizer step's work, returning
its metrics) and ``progress_postfix``; the skeleton owns everything around it:

  * the run directory and its ``config.yaml``;
  * the step loop up to ``total_steps``, with ``max_train_minutes`` of wall time and
    ``max_train_cpu_seconds`` of process CPU time per call (the step that crosses a budget is finished
    and checkpointed, so ``--resume`` continues from it);
  * after each step, the freed heap handed back to the OS (``release_free_memory``) and the
    process's resident memory in the metrics (``rss_mb``);
  * ``metrics.jsonl`` every ``logging_steps`` (``MetricsLogger``), checkpoints every ``save_steps``
    and at the end (``checkpoint.save_checkpoint``: policy, optimizer, scheduler, RNG, trainer state);
  * resume: weights, optimizer, scheduler, RNG, the data cursor and the trainer's own state;
  * the guard message (``stop_message``) naming the last good checkpoint;
  * the seeded per-epoch shuffle (``DataCursor``) and the learning-rate schedule (``lr_lambda``);
  * under torchrun (``self.dist``, ``r1kit.train.distributed``): rank 0 alone writes config, metrics,
    samples and checkpoints, the others wait for it at a barrier after each checkpoint.

LoRA (``apply_lora``): the policy becomes a PEFT model whose adapters alone train; checkpoints hold
the adapter weights, ``final/`` the merged model (``merged_for_save``), which ``load_policy`` and the
sampling engines load like any HF directory.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from r1kit.config import config_yaml, save_config
from r1kit.errors import ConfigError, R1kitError
from r1kit.train import checkpoint as ckpt
from r1kit.train import distributed
from r1kit.train.logging import MetricsLogger


def lr_lambda(kind: str, warmup_steps: int, total_updates: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per update: linear warmup over ``warmup_steps`` updates, then constant, or cosine /
    linear decay from 1 to ``min_ratio`` at ``total_updates`` (R1 distillation: cosine to 0.1×)."""

    def f(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (update - warmup_steps) / max(1, total_updates - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return f


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (≥ 1): the batch lengths of both trainers
    (``pad_to_multiple_of``), so a run meets few tensor shapes and its memory stays flat (why:
    ``sft.TokenBatch``)."""
    return -(-n // multiple) * multiple


def release_free_memory() -> None:
    """Hand glibc's free heap pages back to the OS (``malloc_trim(0)``; a no-op without glibc).
    Activations of ever-different sizes, below glibc's dynamic mmap threshold (up to 32 MiB), are
    served from the heap and, once freed, stay resident as fragments: after 40 SFT steps of the 135M
    model at batch 1, RSS was 3954 MiB without and 2849 MiB with this call (``bench/sft_memory.py``)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def rss_mb() -> float:
    """This process's resident set size now, MiB (``VmRSS`` of /proc/self/status; NaN where absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def make_optimizer(params: list[torch.nn.Parameter], cfg: Any) -> torch.optim.AdamW:
    """AdamW over ``params`` with the config's learning_rate, adam_beta1/2 and weight_decay."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


class DataCursor:
    """A seeded shuffle of ``n`` items per epoch, read in order across epochs; (epoch, cursor) is the
    resumable state. The order of epoch e is ``randperm(n)`` under seed ``seed·1000003 + e``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        """The next ``k`` item indices (wrapping into the next epoch's order)."""
        out = []
        order = self.order(self.epoch)
        while len(out) < k:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self.order(self.epoch)
            out.append(order[self.cursor])
            self.cursor += 1
        return out


def apply_lora(policy: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """The policy with LoRA adapters (PEFT ``get_peft_model``; Hu et al. 2021) on
    ``cfg.lora_target_modules``, rank ``lora_r``, scale ``lora_alpha / lora_r``; only the adapters train.

    Raises ConfigError when PEFT finds none of the target modules."""
    from peft import LoraConfig, get_peft_model

    from r1kit.errors import ConfigError

    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets[0] if targets == ["all-linear"] else list(targets))
    try:
        return get_peft_model(policy, lora)
    except ValueError as err:
        raise ConfigError(f"lora_target_modules={targets}: {err}") from None


def enable_gradient_checkpointing(policy: torch.nn.Module) -> None:
    """Activation checkpointing (``gradient_checkpointing``): each decoder block keeps only its input
    and is recomputed in the backward (non-reentrant ``torch.utils.checkpoint``), through the model's
    own ``activation_checkpointing_enable`` (transformers models, PEFT-wrapped or not, and r1kit's
    DeepSeek-V3, per block). Gradients are unchanged (tested); compute grows by about one forward.

    Raises:
        ConfigError: the model has no such method (names the setting and the fix).
    """
    enable = getattr(policy, "activation_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(f"gradient_checkpointing: {type(policy).__name__} has no activation_checkpointing_enable; "
                          "set --gradient-checkpointing false")
    enable(activation_checkpointing_kwargs={"use_reentrant": False})


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def merged_for_save(policy: torch.nn.Module) -> torch.nn.Module:
    """What ``final/`` holds: the policy itself, or for a PEFT model a merged copy (W + scale·BA) that
    loads without PEFT. The training policy keeps its adapters."""
    if not is_peft(policy):
        return policy
    return copy.deepcopy(policy).merge_and_unload()


def merged_weights_view(policy: torch.nn.Module) -> torch.nn.Module:
    """The weights ``merged_for_save`` gives, for a consumer that copies them (the rollout engines'
    ``update_weights``, every GRPO step), without copying the model: a shallow copy of the PEFT
    policy's base model in which each plain LoRA ``Linear`` is a ``_MergedLinear`` holding
    W + scale·BA (PEFT's own ``get_delta_weight``, added in ``merge``'s order, so bit-equal to
    ``merge_and_unload``; tested) and every other module and tensor is the policy's own, shared. Same
    parameter names and order as the merged copy. A policy that is no PEFT model comes back as is;
    one with anything but plain LoRA on linear layers (DoRA and other variants, ``lora_bias``, LoRA on
    embeddings, ``modules_to_save``) gets ``merged_for_save``. Read-only: do not train or cast it."""
    if not is_peft(policy):
        return policy
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrapped = [m for m in policy.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    if not all(type(m) is LoraLinear and not m.lora_variant and not any(m.lora_bias.values()) for m in wrapped):
        return merged_for_save(policy)

    def view(module: torch.nn.Module) -> torch.nn.Module:
        if isinstance(module, LoraLinear):
            return _MergedLinear(module)
        if not any(isinstance(m, LoraLinear) for m in module.modules()):
            return module                                        # no adapter below: shared as is
        clone = copy.copy(module)                                # its own _modules dict, the same parameters
        clone.__dict__["_modules"] = {name: view(child) for name, child in module._modules.items()}
        return clone

    with torch.no_grad():
        return view(policy.get_base_model())


class _MergedLinear(torch.nn.Module):
    """A LoRA ``Linear`` merged out of place: ``weight`` = W + Σ scale·B·A over the active adapters not
    yet merged (the order ``LoraLayer.merge`` adds them in), ``bias`` the base layer's own."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        base = layer.get_base_layer()
        weight = base.weight
        for name in layer.active_adapters:
            if name in layer.lora_A and name not in layer.merged_adapters:
                weight = weight + layer.get_delta_weight(name)
        self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)  # (out, in)
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class TrainLoop:
    """The shared skeleton (module docstring). A subclass sets, in ``__init__``: ``cfg``, ``policy``,
    ``tokenizer``, ``optimizer``, ``scheduler``, ``run_dir``, ``logger`` (``MetricsLogger``), ``step``,
    ``total_steps``; and implements ``train_step``, ``progress_postfix``, and ``state``/``load_state``
    for what it keeps beyond the step. ``checkpoint_reference`` and ``after_resume`` are hooks."""

    desc = "train"

    def init_loop(self, cfg: Any, run_dir: Path, total_steps: int) -> None:
        self.cfg, self.run_dir, self.total_steps, self.step = cfg, Path(run_dir), total_steps, 0
        self.dist = distributed.current(cfg.data_parallel)
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard and self.dist.is_main)

    # ----- hooks -----
    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {}

    def state(self) -> dict:
        return {"step": self.step}

    def load_state(self, state: dict) -> None:
        self.step = state["step"]

    def checkpoint_reference(self) -> torch.nn.Module | None:
        """A reference model to store in checkpoints (GRPO with a synced reference), else None."""
        return None

    def after_resume(self, path: Path) -> None:
        """Called after a checkpoint is restored (GRPO: reference weights, rollout engine)."""

    # ----- checkpoints -----
    def stop_message(self, what: str) -> str:
        """A guard's message: what happened, the last good checkpoint and the fix."""
        last = ckpt.latest_checkpoint(self.run_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        return (f"training stopped at step {self.step + 1}: {what}; {where}. Lower --learning-rate, set "
                f"--max-grad-norm, or check the reward functions, then resume with --resume")

    def save(self) -> Path:
        """Write ``checkpoint-<step>``: ddp replicas hold identical weights, optimizer and global RNG, so
        rank 0 writes one copy that resumes on any number of ranks; FSDP2 ranks write their model and
        optimizer shards with ``torch.distributed.checkpoint`` into ``dcp/`` (resharded on load) and rank 0
        the rest, ``policy/`` gathered whole. Every rank returns after the checkpoint is complete."""
        path = self.run_dir / f"checkpoint-{self.step}"
        full, sharded = None, None
        if self.dist.enabled and self.dist.strategy == "fsdp2":
            full, sharded = self._save_shards()
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, policy=self.policy, tokenizer=self.tokenizer,
                                        optimizer=self.optimizer, scheduler=self.scheduler,
                                        trainer_state=self.state(), config_yaml=config_yaml(self.cfg),
                                        reference=self.checkpoint_reference(), keep=self.cfg.save_total_limit,
                                        policy_state_dict=full, sharded=sharded)
        distributed.barrier(self.dist)
        return path

    def _save_shards(self) -> tuple[dict | None, Path]:
        """FSDP2: every rank's shards into a temporary ``dcp`` directory; the full policy state dict on
        rank 0 (None elsewhere). Both are collectives."""
        import shutil

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as sd

        tmp = self.run_dir / f".dcp-{self.step}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier(self.dist)
        dcp.save({"model": sd.get_model_state_dict(self.policy),
                  "optimizer": sd.get_optimizer_state_dict(self.policy, self.optimizer)}, checkpoint_id=str(tmp))
        full = distributed.full_state_dict(self.policy, self.dist)
        return full, tmp

    def resume_from(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and the trainer state from a checkpoint directory,
        on any number of ranks: an FSDP2 checkpoint (``dcp/``) under either strategy, a whole one
        (ddp, or one process) under ddp, or under FSDP2, where every rank takes its shards of it.

        Raises:
            R1kitError: the checkpoint is incomplete or another model or config wrote it.
        """
        fsdp = self.dist.enabled and self.dist.strategy == "fsdp2"
        whole_into_shards = fsdp and not (path / "dcp").is_dir()
        if fsdp and not whole_into_shards:
            ckpt.load_sharded(path / "dcp", self.policy, self.optimizer, with_model=True)
        elif whole_into_shards:
            ckpt.load_whole_into_shards(self.policy, path / "policy")
        else:
            ckpt.load_policy_weights(self.policy, path / "policy")
        self.after_resume(path)
        self.load_state(ckpt.load_training_state(path, self.optimizer, self.scheduler, model=self.policy,
                                                 sharded=whole_into_shards))
        if self.dist.is_main:
            self.logger.truncate_after(self.step)

    # ----- the loop -----
    def _budget_spent(self, wall_s: float, cpu_s: float) -> str | None:
        """Which time budget of this call is spent ("time budget of 15 min" / "CPU budget of 600 s"), or None."""
        c = self.cfg
        if c.max_train_minutes is not None and wall_s >= 60 * c.max_train_minutes:
            return f"time budget of {c.max_train_minutes:g} min"
        if c.max_train_cpu_seconds is not None and cpu_s >= c.max_train_cpu_seconds:
            return f"CPU budget of {c.max_train_cpu_seconds:g} s"
        return None

    def train(self, progress: bool = True, stop_after: int | None = None) -> list[dict[str, float]]:
        """Run until ``total_steps`` (or ``stop_after`` steps in this call, used to simulate a kill), or
        until ``max_train_minutes`` of wall time have passed in this call: the step that crosses the
        budget is finished and checkpointed, so ``--resume`` continues from it.

        Raises:
            TrainingStopped: a guard fired (non-finite loss / grad norm); nothing was saved for that step.
        """
        from tqdm.auto import tqdm

        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        main = self.dist.is_main
        if main:
            save_config(c, self.run_dir / "config.yaml")
        history = []
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and main), desc=self.desc,
                   dynamic_ncols=True)
        done = 0
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            while self.step < self.total_steps and (stop_after is None or done < stop_after):
                spent = distributed.broadcast_object(  # rank 0's clocks decide, so every rank stops together
                    self._budget_spent(time.perf_counter() - start, time.process_time() - start_cpu), self.dist)
                if spent:
                    print(f"{spent} reached after step {self.step}", flush=True)
                    if self.step > 0 and distributed.broadcast_object(
                            not (self.run_dir / f"checkpoint-{self.step}").exists(), self.dist):
                        self.save()
                    break
                m = self.train_step()
                release_free_memory()
                m["rss_mb"] = rss_mb()
                done += 1
                history.append(m)
                if self.step % c.logging_steps == 0 and main:
                    self.logger.log(self.step, m)
                if (c.save_steps and self.step % c.save_steps == 0) or self.step == self.total_steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(**self.progress_postfix(m))
        finally:
            bar.close()
        return history
