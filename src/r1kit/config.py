"""Run configurations (GRPO, SFT): one dataclass each, named presets, YAML files and command-line overrides.

Resolution order (later wins): dataclass defaults → ``--preset`` → ``--config file.yaml`` →
individual ``--field value`` flags. The resolved config is written to every run and checkpoint
(``config.yaml``) so a run can be reproduced or resumed from it.

Presets (GRPO_SPEC.md §3-4):
  r1_zero   DeepSeek-R1-Zero RL: lr 3e-6, β 0.001 (k3), T 1.0, G 16, 32 prompts/step, reference
            replaced every 400 steps, each rollout split into 16 mini-batches, plain R1-Zero template.
  r1        R1 stage-1 reasoning RL: as r1_zero with clip ε = 10 and the chat template with <think>.
  dapo      DAPO: token-mean loss, clip-higher ε_high 0.28, β 0, dynamic sampling, overlong filtering.
  dr_grpo   Dr. GRPO: constant-normalizer loss, no std scaling of advantages, β 0.
  cpu_demo  sized for a 2-core CPU and the 135M embedded model on one-step word problems (SVAMP).
  cpu_demo_gsm8k  the same loop on GSM8K (``make demo``), capped to fit 30 minutes on 2 cores.

SFT presets (DISTILL_SPEC §6) are in ``SFT_PRESETS``; ``SFTConfig``'s docstring lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from r1kit.errors import ConfigError
from r1kit.eval.evaluate import COLLAPSE_SHARE
from r1kit.rollout.base import check_sampling
from r1kit.train.losses import IS_MODES, LOSS_TYPES, SCALE_REWARDS


@dataclass
class GRPOConfig:
    """Every knob of a GRPO run. Names follow TRL/verl and the papers."""

    # --- model and data ---
    model: str = "smollm2-135m-instruct"  # HF dir, GGUF file, or the embedded alias
    task: str = "gsm8k"  # registered task name or a local .jsonl/.parquet path
    train_split: str = "train"
    eval_task: str | None = None  # task for before/after evaluation (default: task)
    eval_split: str = "test"
    eval_limit: int | None = 200  # held-out problems evaluated before/after (None = all)
    eval_k: int = 1  # samples per held-out problem (pass@1 is their mean)
    eval_temperature: float = 0.6  # R1 evaluation protocol
    eval_top_p: float = 0.95
    prompt_field: str | None = None  # local files: field holding the problem
    answer_field: str | None = None  # local files: field holding the gold answer
    template: str = "chat_boxed"  # prompt template (r1kit.data.templates)
    answer_extraction: str = "tagged"  # "tagged" (<answer>/\boxed) or "any" (last number as fallback)
    max_train_examples: int | None = None  # use only the first N training problems (after shuffling)
    use_lora: bool = False  # train LoRA adapters through PEFT instead of all weights (β > 0: reference = adapters off)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # PEFT target_modules

    # --- rewards ---
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])  # names or "pkg.mod:fn"
    reward_weights: list[float] | None = None  # one per reward function (default: all 1.0)

    # --- rollout ---
    num_generations: int = 8  # G, completions per prompt
    prompts_per_step: int = 4  # prompts per generation batch (generation batch = prompts × G)
    max_prompt_length: int = 512  # tokens; longer prompts are an error (no silent truncation)
    max_completion_length: int = 256  # tokens sampled at most per completion
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # strings that end a completion, comma-separated; --stop '\n' = newline
    rollout_backend: str = "auto"  # auto (r1kit engine where it has an adapter, else hf) | engine | hf | vllm
    rollout_dtype: str = "auto"  # "auto" = bf16 when bf16 resolves on, else fp32; or "bf16" / "fp32"

    # --- objective ---
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo (GRPO_SPEC §2)
    scale_rewards: str = "group"  # group | batch | none
    beta: float = 0.0  # k3 KL coefficient; 0 = no reference model held
    epsilon: float = 0.2  # clip ε_low
    epsilon_high: float | None = None  # clip ε_high (None = epsilon; DAPO 0.28)
    num_iterations: int = 1  # μ, optimisation passes over each generation batch
    steps_per_generation: int = 1  # optimizer steps per generation batch (mini-batches)
    micro_batch_size: int = 8  # completions per forward/backward (gradient accumulation inside a step)
    padding_free: bool = True  # pack a group's completions behind one copy of its prompt (no pad tokens computed)
    pad_to_multiple_of: int = 32  # round micro-batch lengths and scored-token counts up to this (TRL): few shapes, flat RSS; 1 = off
    mask_truncated_completions: bool = False  # DAPO overlong filtering: truncated completions get no loss
    overlong_buffer: int = 0  # DAPO soft overlong punishment: L_cache tokens (0 = off)
    overlong_penalty: float = 1.0  # DAPO: maximum penalty at max_completion_length
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal accuracy and resample
    max_resample_rounds: int = 3  # dynamic sampling: extra generation rounds per step at most
    ref_model_sync_steps: int = 0  # replace the reference by the policy every N steps (R1-Zero 400; 0 = never)
    ref_model_mixup_alpha: float = 1.0  # ref ← α·policy + (1-α)·ref at each sync
    skip_zero_advantage: bool = True  # skip forward/backward of completions with A = 0 (exact when β = 0)
    rollout_importance_sampling_correction: bool = False  # reweight losses by π_old/π_rollout (TRL vllm_importance_sampling_*)
    rollout_importance_sampling_mode: str = "sequence_mask"  # {token,sequence}_{truncate,mask}: see docs/ROLLOUT.md
    rollout_importance_sampling_clip_max: float | None = 3.0  # ratio bound C_max >= 1 (None = no upper bound)
    rollout_importance_sampling_clip_min: float | None = None  # ratio bound C_min in (0, 1] (None = no lower bound)

    # --- optimisation ---
    learning_rate: float = 1e-6
    lr_scheduler: str = "constant"  # constant | cosine | linear (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0  # 0 = no clipping
    router_bias_update_speed: float = 0.0  # γ: DeepSeek-V3 router-bias step per update (V3 report §2.1.2); 0 = frozen, as V3 ends pretraining
    max_steps: int = 100
    max_train_minutes: float | None = None  # also stop training after this much wall time (min; checkpointed)
    max_train_cpu_seconds: float | None = None  # also stop after this much CPU time of the process (s; checkpointed)
    bf16: str = "auto"  # bf16 autocast + bf16 rollouts: auto (only where the CPU has AVX512-BF16/AMX), true, false
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (None = torch default)
    data_parallel: str = "ddp"  # under torchrun: ddp (replicas, gradients all-reduced) | fsdp2 (fully_shard per layer)
    dist_timeout_minutes: float = 10.0  # every collective of a torchrun run fails after this long (min), no hang
    gradient_checkpointing: bool = False  # recompute each decoder block in the backward: less activation memory, ~1/3 more compute

    # --- Ray (train/ray_grpo.py; SCALE_SPEC §5) ---
    ray: bool = False  # rollouts and rewards on Ray actors, the trainer in the driver (r1kit[ray])
    ray_address: str | None = None  # existing cluster (host:6379, ray://host:10001, auto); None = start a local one
    ray_num_cpus: int | None = None  # logical CPUs of a local cluster (None = os.cpu_count(), or what the workers reserve if more)
    rollout_workers: int = 1  # rollout actors, each with its own sampling engine (make_engine)
    reward_workers: int = 1  # reward actors running the verifier and reward functions
    ray_worker_cpus: float = 1.0  # logical CPUs each worker actor reserves
    ray_worker_threads: int = 1  # torch intra-op threads inside each worker actor
    ray_overlap: bool = False  # sample step t+1 while step t trains (one step stale; needs the rollout IS correction)
    ray_sync_timeout: float = 300.0  # s to wait for a worker start, a weight sync or a group's result before an error
    ray_reward_retries: int = 0  # re-score a group whose reward computation raised on another worker this many times, then stop
    ray_max_restarts: int = 8  # dead workers replaced per run at most, then stop
    rollout_group_seeds: bool = False  # seed each group's sampling from (seed, step, round, group): independent of batching and workers (always on with ray)

    # --- run directory, logging, checkpoints ---
    output: str = "runs/grpo"
    logging_steps: int = 1
    log_completions_steps: int = 10  # write sampled completions every N steps (0 = never)
    save_steps: int = 50  # checkpoint every N steps (and at the end; 0 = only at the end)
    save_total_limit: int = 2  # keep the last N checkpoints
    tensorboard: bool = False
    plot: bool = True  # PNG of reward/accuracy/length curves at the end
    eval_before: bool = False  # evaluate the initial policy on the held-out set (eval/before.json)
    eval_after: bool = False  # evaluate the trained policy on the held-out set and write eval/report.md

    # --- guards ---
    warn_truncated_ratio: float = 0.9  # warn when this share of completions is truncated ...
    warn_zero_std_ratio: float = 0.9  # ... or this share of groups has zero reward std ...
    warn_answer_share: float = COLLAPSE_SHARE  # ... or one extracted answer is this share of the completions (collapse to a prior; 0.3, the eval report's threshold) ...
    warn_patience: int = 3  # ... for this many steps in a row

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix for any invalid or inconsistent value."""
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (GRPO needs a group), got {self.num_generations}")
        if self.prompts_per_step < 1:
            raise ConfigError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        batch = self.prompts_per_step * self.num_generations
        if batch % self.steps_per_generation:
            raise ConfigError(
                f"generation batch {batch} (prompts_per_step × num_generations) is not divisible by "
                f"steps_per_generation={self.steps_per_generation}"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        for name in ("max_completion_length", "max_prompt_length", "micro_batch_size", "num_iterations",
                     "max_steps", "eval_k", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ConfigError(f"max_train_minutes must be > 0 (or none), got {self.max_train_minutes}")
        if self.max_train_cpu_seconds is not None and self.max_train_cpu_seconds <= 0:
            raise ConfigError(f"max_train_cpu_seconds must be > 0 (or none), got {self.max_train_cpu_seconds}")
        if not 0 < self.warn_answer_share <= 1:
            raise ConfigError(f"warn_answer_share must be in (0, 1], got {self.warn_answer_share}")
        if self.router_bias_update_speed < 0:
            raise ConfigError(f"router_bias_update_speed must be >= 0, got {self.router_bias_update_speed}")
        if not self.temperature > 0:  # NaN too; a group of greedy completions has no reward variance
            raise ConfigError(f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        check_sampling(self.eval_temperature, self.eval_top_p, names=("eval_temperature", "eval_top_p", ""))
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs"
            )
        if self.lr_scheduler not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr_scheduler must be constant, cosine or linear, got {self.lr_scheduler!r}")
        if self.rollout_backend not in ("auto", "hf", "engine", "vllm"):
            raise ConfigError(f"rollout_backend must be auto, engine, hf or vllm, got {self.rollout_backend!r}")
        if str(self.bf16).lower() not in ("auto", "true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        if self.overlong_buffer >= self.max_completion_length:
            raise ConfigError("overlong_buffer must be smaller than max_completion_length")
        self._validate_importance_sampling()
        self._validate_ray()
        validate_numbers(self)
        validate_lora(self)
        validate_distributed(self)

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError when ``world_size`` ranks cannot share a step's completions equally
        (``distributed.check_divisible``); the CLI checks it before it launches torchrun."""
        from r1kit.train.distributed import check_divisible

        check_divisible(self.generation_batch_size, world_size, f"prompts_per_step × num_generations "
                        f"({self.prompts_per_step} × {self.num_generations})", "change --prompts-per-step")

    def _validate_ray(self) -> None:
        """Worker counts >= 1; overlap only under --ray, with the rollout importance-sampling correction
        (the one-step-stale samples need it) and without dynamic sampling (which resamples inside a step)."""
        if not self.ray:
            if self.ray_overlap:
                raise ConfigError("ray_overlap needs ray true (--ray true)")
            return
        for name in ("rollout_workers", "reward_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 under ray, got {getattr(self, name)}")
        if self.ray_worker_cpus <= 0 or self.ray_sync_timeout <= 0 or self.ray_worker_threads < 1:
            raise ConfigError("ray_worker_cpus and ray_sync_timeout must be > 0 and ray_worker_threads >= 1")
        if self.ray_reward_retries < 0 or self.ray_max_restarts < 0:
            raise ConfigError("ray_reward_retries and ray_max_restarts must be >= 0")
        if self.ray_overlap and not self.rollout_importance_sampling_correction:
            raise ConfigError("ray_overlap trains on samples one step stale: set "
                              "--rollout-importance-sampling-correction true (or ray_overlap false)")
        if self.ray_overlap and self.dynamic_sampling:
            raise ConfigError("ray_overlap cannot honour dynamic_sampling (it resamples inside the step): "
                              "set one of them false")

    def _validate_importance_sampling(self) -> None:
        """Bounds must keep an on-policy token's weight at 1 (C_min <= 1 <= C_max); truncation needs one."""
        mode, low, high = (self.rollout_importance_sampling_mode, self.rollout_importance_sampling_clip_min,
                           self.rollout_importance_sampling_clip_max)
        if mode not in IS_MODES:
            raise ConfigError(f"rollout_importance_sampling_mode must be one of {IS_MODES}, got {mode!r}")
        if high is not None and high < 1:
            raise ConfigError(f"rollout_importance_sampling_clip_max must be >= 1, got {high}")
        if low is not None and not 0 < low <= 1:
            raise ConfigError(f"rollout_importance_sampling_clip_min must be in (0, 1], got {low}")
        if mode.endswith("truncate") and low is None and high is None:
            raise ConfigError(f"rollout_importance_sampling_mode={mode} needs rollout_importance_sampling_clip_max "
                              "or rollout_importance_sampling_clip_min")

    @property
    def generation_batch_size(self) -> int:
        """Completions sampled per generation round: prompts_per_step × num_generations."""
        return self.prompts_per_step * self.num_generations

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "r1_zero": dict(
        learning_rate=3e-6, beta=0.001, temperature=1.0, num_generations=16, prompts_per_step=32,
        max_completion_length=32768, ref_model_sync_steps=400, steps_per_generation=16, num_iterations=1,
        template="r1_zero", reward_funcs=["accuracy", "format"], loss_type="grpo", max_steps=10400,
    ),
    "r1": dict(
        learning_rate=3e-6, beta=0.001, temperature=1.0, num_generations=16, prompts_per_step=32,
        max_completion_length=32768, ref_model_sync_steps=400, steps_per_generation=16, epsilon=10.0,
        template="chat_think", reward_funcs=["accuracy", "format"], loss_type="grpo", max_steps=10400,
    ),
    "dapo": dict(
        learning_rate=1e-6, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_generations=16,
        dynamic_sampling=True, overlong_buffer=4096, max_completion_length=20480, temperature=1.0,
        template="chat_boxed", reward_funcs=["accuracy"], steps_per_generation=16, warmup_steps=10,
    ),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.0, template="chat_boxed"),
    # Sized for 2 CPU cores and the 135M embedded model (`make demo-svamp`). One-step word problems
    # (SVAMP train split), a direct-answer prompt and one-line answers (stop at "\n"), so that a
    # completion's last number is its answer; training is capped at 19 minutes so the run with both
    # evaluations fits 30 minutes. README "What the demos show" has the measured effect.
    "cpu_demo": dict(
        task="svamp", template="direct", answer_extraction="any", reward_funcs=["accuracy"], stop=["\n"],
        num_generations=8, prompts_per_step=8, max_completion_length=48, max_prompt_length=256,
        temperature=0.8, learning_rate=2e-5, lr_scheduler="constant", warmup_steps=2, beta=0.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, num_iterations=2, micro_batch_size=16, bf16="auto",
        max_steps=100, max_train_minutes=19.0, eval_limit=300, eval_k=2, save_steps=10, log_completions_steps=5,
    ),
}
# The main job (`make demo`): the same loop on GSM8K train problems, evaluated on 200 GSM8K test
# problems, with a step-by-step prompt and room for a few reasoning steps. The 135M model solves ~1%
# of GSM8K, so few groups carry reward variance; README says what this run achieves.
PRESETS["cpu_demo_gsm8k"] = dict(
    PRESETS["cpu_demo"], task="gsm8k", template="chat_boxed", max_prompt_length=512, max_completion_length=128, stop=[],
    max_steps=40, max_train_minutes=15.0, eval_limit=200, eval_k=1,
)


def validate_numbers(cfg: Any) -> None:
    """Fields every trainer shares: each float finite (a NaN passed every ``<``/``>`` check and failed
    at step 1 as a "non-finite loss"), the optimizer's in range, seeds and step counts not negative.

    Raises:
        ConfigError: naming the field, its value and the allowed range.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    checks = [("learning_rate", lambda v: v >= 0, ">= 0 (0 = frozen weights)"), ("weight_decay", lambda v: v >= 0, ">= 0"),
              ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
              ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)"), ("warmup_steps", lambda v: v >= 0, ">= 0"),
              ("seed", lambda v: v >= 0, ">= 0"), ("epsilon", lambda v: v >= 0, ">= 0"),
              ("epsilon_high", lambda v: v >= 0, ">= 0 (or none)")]
    for name, ok, allowed in checks:
        value = getattr(cfg, name, None)
        if value is not None and not ok(value):
            raise ConfigError(f"{name} must be {allowed}, got {value}")


def check_budgets_and_counts(cfg: Any, seconds: tuple[str, ...] = (), counts: tuple[str, ...] = ()) -> None:
    """Each field of ``seconds`` a finite number > 0 (NaN passes ``<= 0``, inf never ends), each of
    ``counts`` >= 1 where it is set (None means unset/all for the fields that allow it).

    Raises:
        ConfigError: naming the field, its value and the allowed range.
    """
    for name in seconds:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be > 0 CPU seconds and finite, got {value}")
    for name in counts:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def validate_distributed(cfg: Any) -> None:
    """The torchrun settings: data_parallel is ddp or fsdp2, the collective timeout positive."""
    if cfg.data_parallel not in ("ddp", "fsdp2"):
        raise ConfigError(f"data_parallel must be ddp or fsdp2, got {cfg.data_parallel!r}")
    if cfg.dist_timeout_minutes <= 0:
        raise ConfigError(f"dist_timeout_minutes must be > 0, got {cfg.dist_timeout_minutes}")


def validate_lora(cfg: Any) -> None:
    """LoRA fields (GRPOConfig, SFTConfig): a positive rank and alpha, a dropout in [0, 1), targets named."""
    if not cfg.use_lora:
        return
    if cfg.lora_r < 1 or cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_r must be >= 1 and lora_alpha > 0, got lora_r={cfg.lora_r}, lora_alpha={cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.lora_target_modules:
        raise ConfigError("lora_target_modules is empty: name the modules to adapt (e.g. all-linear or q_proj,v_proj)")


#: R1-Distill initial learning rates per student (DeepSeek-R1 v2 App. B.4.3 / DISTILL_SPEC §6); the
#: ``r1_distill`` preset uses the 1.5B value: pass ``--learning-rate`` from this table for other sizes.
R1_DISTILL_LEARNING_RATES = {
    "Qwen2.5-Math-1.5B": 1e-4, "Qwen2.5-Math-7B": 8e-5, "Qwen2.5-14B": 7e-5, "Qwen2.5-32B": 6e-5,
    "Llama-3.1-8B": 5e-5, "Llama-3.3-70B-Instruct": 2e-5,
}


@dataclass
class SFTConfig:
    """Every knob of a supervised fine-tuning run on (prompt, reasoning, answer) rows (DISTILL_SPEC §5).

    Presets (``SFT_PRESETS``, DISTILL_SPEC §6):
      r1_distill      R1-Distill students: 2 epochs, cosine to 0.1×, 32,768 tokens, batch 64, lr 1e-4
                      (Qwen-Math-1.5B; other sizes in ``R1_DISTILL_LEARNING_RATES``).
      cold_start      R1 cold start / stage-3 SFT on the base: 2 epochs, cosine 5e-5 → 5e-6, 32,768, batch 128.
      openr1_distill  OpenR1-Distill-7B: lr 4e-5, cosine min 0.1×, warmup 3%, 5 epochs, 32,768, no packing,
                      grad-norm 0.2, batch 128.
      s1              s1 (arXiv 2501.19393): 1K samples, lr 1e-5, warmup 5%, cosine, 5 epochs, batch 16, wd 1e-4.
      cpu_sft_demo    the embedded 135M model on GSM8K worked solutions (cold-start data), sized for 2 CPU cores.
      cpu_gsm8k       ``make demo``: the GSM8K target, cold-start SFT of the embedded model on 1,024 worked
                      solutions (128 steps of 8, lr 3e-4), evaluated greedily on all 1,319 test problems.
    """

    # --- model and data ---
    model: str = "smollm2-135m-instruct"  # HF dir, GGUF file, run dir, or the embedded alias
    data: str = "gsm8k"  # .jsonl/.parquet file, sampler output dir, task with worked solutions (gsm8k), or HF name
    data_split: str = "train"  # split of a registered task or hub dataset
    template: str = "chat_think"  # prompt template (r1kit.data.templates); the completion is rendered to match
    max_train_examples: int | None = None  # use only the first N rows (in file order)
    max_length: int = 1024  # tokens of prompt + completion at most; longer examples are dropped or an error
    overlong: str = "drop"  # drop (counted in examples_dropped) | error: what an over-long example does
    packing: bool = False  # pack examples into rows with a block-diagonal mask and per-document positions
    pad_to_multiple_of: int = 32  # round row lengths and trained-token counts up to this (TRL): few shapes, flat RSS; 1 = off
    use_lora: bool = False  # train LoRA adapters through PEFT; final/ is saved merged
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # PEFT target_modules

    # --- optimisation ---
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at this fraction of learning_rate (R1: 0.1)
    warmup_ratio: float = 0.0  # share of the optimizer steps spent in linear warmup
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # 0 = no clipping
    num_train_epochs: float = 1.0  # passes over the data (sets the step count when max_steps is none)
    max_steps: int | None = None  # optimizer steps (None = num_train_epochs over the data)
    per_device_train_batch_size: int = 4  # examples per forward/backward (micro-batch)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_train_minutes: float | None = None  # also stop after this much wall time in one call (min; checkpointed)
    max_train_cpu_seconds: float | None = None  # also stop after this much CPU time of the process in one call (s)
    bf16: str = "auto"  # bf16 autocast: auto (only where the CPU has AVX512-BF16/AMX), true, false
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (None = torch default)
    data_parallel: str = "ddp"  # under torchrun: ddp (replicas, gradients all-reduced) | fsdp2 (fully_shard per layer)
    dist_timeout_minutes: float = 10.0  # every collective of a torchrun run fails after this long (min), no hang
    gradient_checkpointing: bool = False  # recompute each decoder block in the backward: less activation memory, ~1/3 more compute

    # --- evaluation (the same protocol and report as GRPO) ---
    eval_task: str | None = None  # held-out task (default: data, when it is a registered task)
    eval_split: str = "test"
    eval_limit: int | None = 200  # held-out problems evaluated before/after (None = all)
    eval_k: int = 1  # samples per held-out problem
    eval_temperature: float = 0.6  # R1 evaluation protocol
    eval_top_p: float = 0.95
    eval_max_tokens: int = 512  # completion tokens sampled per held-out problem at most
    answer_extraction: str = "tagged"  # "tagged" (<answer>/\boxed) or "any" (last number as fallback)
    stop: list[str] = field(default_factory=list)  # strings that end an evaluation completion
    eval_before: bool = False  # evaluate the initial model on the held-out set (eval/before.json)
    eval_after: bool = False  # evaluate the trained model and write eval/report.md

    # --- run directory, logging, checkpoints ---
    output: str = "runs/sft"
    logging_steps: int = 1
    save_steps: int = 50  # checkpoint every N steps (and at the end; 0 = only at the end)
    save_total_limit: int = 2  # keep the last N checkpoints
    tensorboard: bool = False
    plot: bool = True  # PNG of loss/accuracy/entropy curves at the end

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError when ``world_size`` ranks cannot share a step's examples equally
        (``distributed.check_divisible``); the CLI checks it before it launches torchrun."""
        from r1kit.train.distributed import check_divisible

        check_divisible(self.examples_per_step, world_size, f"examples_per_step (per_device_train_batch_size × "
                        f"gradient_accumulation_steps = {self.per_device_train_batch_size} × "
                        f"{self.gradient_accumulation_steps})", "change --gradient-accumulation-steps")

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix for any invalid or inconsistent value."""
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "eval_k",
                     "eval_max_tokens", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 (or none to use num_train_epochs), got {self.max_steps}")
        if self.max_steps is None and self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        check_sampling(self.eval_temperature, self.eval_top_p, names=("eval_temperature", "eval_top_p", ""))
        if self.overlong not in ("drop", "error"):
            raise ConfigError(f"overlong must be drop or error, got {self.overlong!r}")
        if self.lr_scheduler not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr_scheduler must be constant, cosine or linear, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ConfigError(f"max_train_minutes must be > 0 (or none), got {self.max_train_minutes}")
        if self.max_train_cpu_seconds is not None and self.max_train_cpu_seconds <= 0:
            raise ConfigError(f"max_train_cpu_seconds must be > 0 (or none), got {self.max_train_cpu_seconds}")
        if str(self.bf16).lower() not in ("auto", "true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        validate_numbers(self)
        validate_lora(self)
        validate_distributed(self)

    @property
    def examples_per_step(self) -> int:
        """Examples per optimizer step: per_device_train_batch_size × gradient_accumulation_steps."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SFT_PRESETS: dict[str, dict[str, Any]] = {
    "r1_distill": dict(
        learning_rate=R1_DISTILL_LEARNING_RATES["Qwen2.5-Math-1.5B"], lr_scheduler="cosine", min_lr_ratio=0.1,
        num_train_epochs=2.0, max_length=32768, per_device_train_batch_size=1, gradient_accumulation_steps=64,
        template="chat_think", bf16="true", save_steps=500,
    ),
    "cold_start": dict(
        learning_rate=5e-5, lr_scheduler="cosine", min_lr_ratio=0.1, num_train_epochs=2.0, max_length=32768,
        per_device_train_batch_size=1, gradient_accumulation_steps=128, template="chat_think", bf16="true",
        save_steps=500,
    ),
    "openr1_distill": dict(
        learning_rate=4e-5, lr_scheduler="cosine", min_lr_ratio=0.1, warmup_ratio=0.03, num_train_epochs=5.0,
        max_length=32768, packing=False, max_grad_norm=0.2, per_device_train_batch_size=1,
        gradient_accumulation_steps=128, template="chat_think", bf16="true", save_steps=500,
    ),
    "s1": dict(
        learning_rate=1e-5, lr_scheduler="cosine", warmup_ratio=0.05, num_train_epochs=5.0, weight_decay=1e-4,
        adam_beta2=0.95, max_length=32768, per_device_train_batch_size=1, gradient_accumulation_steps=16,
        max_train_examples=1000, template="chat_think", bf16="true",
    ),
    # The embedded 135M model on GSM8K worked solutions (the cold-start data of the GSM8K target),
    # sized for 2 CPU cores: 4-example steps (~900 tokens, ~15-40 CPU s each here), training capped at
    # 600 CPU seconds; README "SFT" has the measured effect.
    "cpu_sft_demo": dict(
        data="gsm8k", template="chat_think", learning_rate=5e-5, lr_scheduler="cosine", min_lr_ratio=0.1,
        warmup_ratio=0.05, max_length=512, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_steps=40, max_train_cpu_seconds=600.0, eval_task="gsm8k", eval_limit=50, eval_max_tokens=256,
        bf16="auto", save_steps=10,
    ),
    # ``make demo``, the GSM8K target (README "What the demos show"): cold-start SFT of the embedded
    # 135M model on 1,024 GSM8K-train worked solutions (128 steps of 8 drawn from the 7,273 train rows;
    # the 200-row dev split is held out), about 2,100 CPU s of training (2.05 CPU s per example at
    # bf16 on an AVX512-BF16 core), then before/after on all 1,319 GSM8K test problems. Chosen on the
    # dev split only, never on test: lr 3e-4 (the R1-Distill rate 1e-4 of DISTILL_SPEC §6 is for a 1.5B
    # student; a 135M one takes a larger step), and greedy decoding, which scored above T=0.6 on dev at
    # both checkpoints tried (step 64: 2.5% vs 2.0%; step 128: 3.5% vs 2.0%, 200 problems each).
    "cpu_gsm8k": dict(
        data="gsm8k", template="chat_think", learning_rate=3e-4, lr_scheduler="cosine", min_lr_ratio=0.1,
        warmup_ratio=0.05, max_length=512, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_steps=128, eval_task="gsm8k", eval_split="test", eval_limit=None, eval_k=1, eval_temperature=0.0,
        eval_max_tokens=256, bf16="auto", save_steps=16, save_total_limit=2,
    ),
}

#: The presets of each config class (``load_config``, ``add_config_arguments`` and ``preset_names`` take the class).
PRESETS_OF: dict[type, dict[str, dict[str, Any]]] = {GRPOConfig: PRESETS, SFTConfig: SFT_PRESETS}


# Fields that do not change what a run makes (threads, logging and checkpoint cadence, a remote teacher's
# client settings): a pipeline stage's key leaves them out, and a --resume may change them.
RUNTIME_FIELDS = ("num_threads", "logging_steps", "log_completions_steps", "tensorboard", "plot", "save_steps",
                  "save_total_limit", "request_timeout", "max_retries", "max_concurrency", "api_key_env")
# What a --resume may change besides RUNTIME_FIELDS (``check_resume_config``, the one list): where the run
# writes; how long it trains (a longer max_steps / num_train_epochs, each call's wall and CPU budgets); the
# machine (collective timeout, ddp or fsdp2, gradient checkpointing: same gradients, tested; the Ray
# cluster, its timeouts and restarts); the held-out evaluation before/after training; the warnings. Every
# other field changes the trained result, and a resume that changes one is refused.
RESUME_FIELDS = RUNTIME_FIELDS + (
    "output", "max_steps", "num_train_epochs", "max_train_minutes", "max_train_cpu_seconds",
    "dist_timeout_minutes", "data_parallel", "gradient_checkpointing", "ray_address", "ray_num_cpus",
    "ray_worker_threads", "ray_sync_timeout", "ray_reward_retries", "ray_max_restarts",
    "eval_task", "eval_split", "eval_limit", "eval_k", "eval_temperature", "eval_top_p", "eval_max_tokens",
    "eval_before", "eval_after",
    "warn_truncated_ratio", "warn_zero_std_ratio", "warn_answer_share", "warn_patience",
)
# SFT's answer_extraction and stop apply to its evaluation only (GRPO's shape the rewards and the sampling).
RESUME_FIELDS_OF: dict[type, tuple[str, ...]] = {GRPOConfig: RESUME_FIELDS,
                                                 SFTConfig: RESUME_FIELDS + ("answer_extraction", "stop")}


def check_resume_config(cfg: Any, saved_yaml: Path) -> None:
    """Refuse a --resume whose resolved ``cfg`` differs from the run's saved ``config.yaml`` in a field
    that changes the result (any field outside ``RESUME_FIELDS_OF[type(cfg)]``). A field the saved config
    lacks (written by an older r1kit) counts as its default; one this r1kit no longer has is ignored.

    Raises:
        ConfigError: listing every changed field as ``name: old → new``, and the fixes.
    """
    saved = read_yaml_mapping(str(saved_yaml), "saved config")
    new = yaml.safe_load(config_yaml(cfg))             # the values as config.yaml holds them (lists, None)
    defaults = yaml.safe_load(config_yaml(type(cfg)()))
    allowed = RESUME_FIELDS_OF[type(cfg)]
    changed = [f"{name}: {saved.get(name, defaults[name])!r} → {value!r}" for name, value in new.items()
               if name not in allowed and saved.get(name, defaults[name]) != value]
    if changed:
        raise ConfigError(f"--resume of {saved_yaml.parent} with settings that change the result: {'; '.join(changed)}. "
                          f"Resume with the run's own settings (--resume without --preset/--config reuses "
                          f"{saved_yaml}), or start a new run with another --output (r1kit/config.py "
                          "RESUME_FIELDS lists what a resume may change)")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/command-line value to the field's annotated type; ConfigError names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        non_none = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        return _coerce(value, non_none[0], name)
    if origin is list:
        # a YAML/preset list is taken as written (a stop string may be "\n"); a command-line
        # string is split on commas and each item stripped
        items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
        return [_coerce(v, args[0], name) for v in items]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _kind(cls: type) -> str:
    """"GRPO" for GRPOConfig, "SFT" for SFTConfig (used in messages)."""
    return cls.__name__.removesuffix("Config")


def stop_strings(name: str, value: Any) -> Any:
    """A ``stop``/``eval_stop`` value typed on the command line ("\\n,###") as its list of strings, the
    escapes decoded ("\\n" is a newline; nothing stripped); any other value unchanged."""
    if name in ("stop", "eval_stop") and isinstance(value, str):
        return [v.encode("latin-1", "backslashreplace").decode("unicode_escape") for v in value.split(",") if v]
    return value


def apply_overrides(cfg: Any, values: dict[str, Any], source: str) -> Any:
    """Return ``cfg`` (a GRPOConfig or SFTConfig) with ``values`` applied. Unknown keys raise
    ConfigError naming ``source``."""
    types = _field_types(type(cfg))
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ConfigError(f"{source}: unknown {_kind(type(cfg))} config field {key!r}")
        value = stop_strings(name, value)
        setattr(cfg, name, _coerce(value, types[name], name))
    return cfg


def preset_names(cls: type = GRPOConfig) -> list[str]:
    return sorted(PRESETS_OF[cls])


def load_config(preset: str | None = None, yaml_path: str | None = None,
                overrides: dict[str, Any] | None = None, cls: type = GRPOConfig) -> Any:
    """Resolve a config of class ``cls`` (GRPOConfig or SFTConfig): defaults → preset → YAML file →
    overrides; validated.

    Raises:
        ConfigError: unknown preset, unreadable YAML, unknown field or invalid value.
    """
    cfg = cls()
    presets = PRESETS_OF[cls]
    if preset:
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(preset_names(cls))}")
        apply_overrides(cfg, presets[preset], f"preset {preset}")
    if yaml_path:
        apply_overrides(cfg, read_yaml_mapping(yaml_path), yaml_path)
    if overrides:
        apply_overrides(cfg, overrides, "command line")
    cfg.validate()
    return cfg


def read_yaml_mapping(yaml_path: str, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML config file holds.

    Raises:
        ConfigError: the file is missing, not valid YAML (line and column), or not a mapping.
    """
    path = Path(yaml_path)
    if not path.is_file():
        raise ConfigError(f"{what} {yaml_path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {yaml_path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {yaml_path} must hold a mapping of field: value")
    return data


def _field_comments(cls: type) -> dict[str, str]:
    """The one-line comment after each field in the config class's source, used as ``--help`` text."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    return {m.group(1): m.group(2) for m in map(pattern.match, inspect.getsource(cls).splitlines()) if m}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = GRPOConfig) -> None:
    """Add one ``--field-name`` option per field of ``cls`` (default: unset, so presets apply); a bool
    field's flag alone means true (``--ray`` = ``--ray true``)."""
    comments = _field_comments(cls)
    defaults = cls()
    types = _field_types(cls)
    for f in fields(cls):
        flag = dict(nargs="?", const="true") if types[f.name] is bool else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None, metavar="V", **flag,
            help=(comments.get(f.name, "") if "default" in comments.get(f.name, "")
                  else f"{comments.get(f.name, '')} (default: {getattr(defaults, f.name)!r})".strip()),
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--field`` values given on the command line, as {field: raw string}."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML, fields in declaration order (the format of every ``config.yaml``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(config_yaml(cfg))
