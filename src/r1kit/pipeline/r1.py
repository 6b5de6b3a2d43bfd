"""``r1kit pipeline r1``: the four stages of DeepSeek-R1 (R1 v2 §3, App. A.1; DISTILL_SPEC §1).

  stage               kind    starts from         data
  base                eval    the base model      (the held-out evaluation of the base)
  cold_start          SFT     the base            ``cold_start_data`` (long-CoT worked solutions)
  reasoning_rl        GRPO    cold_start          ``task`` prompts; accuracy + format (+ language)
  rejection_sampling  sample  reasoning_rl        ``task`` prompts; verified, filtered completions
  rejection_sft       SFT     **the base again**  ``cold_start_data`` + rejection_sampling's samples
  final_rl            GRPO    rejection_sft       ``task`` prompts

Stages 1-2 are data generators for stage 3, which restarts from the base as R1 does. Every stage is
a directory ``<output>/<n>_<stage>/`` with ``manifest.json`` (``r1kit.pipeline.manifest``); reruns,
resumes and ``--from``/``--until`` follow ``r1kit.pipeline.stages.run_stages``. ``--from``/``--until``
also take the paper's stage numbers 0-4 (3 = rejection_sampling as --from, rejection_sft as --until).
At the end ``report.md`` and ``report.png`` put every stage's held-out evaluation side by side.

Config resolution and stage sections: ``r1kit.pipeline.config`` (a section such as
``cold_start: {preset: cold_start, learning_rate: 5e-5}`` holds that stage's SFTConfig, GRPOConfig
or SampleConfig fields).

Presets:
  r1      the paper's recipe at full scale (cold start 2 epochs at 5e-5 → 5e-6; GRPO with ε 10,
          accuracy + format + language; rejection sampling at T 0.6 / top-p 0.95, 4 per prompt;
          stage-3 SFT 2 epochs; final RL at T 0.7 for 1,700 steps). Needs a GPU cluster.
  cpu_r1  the embedded SmolLM2-135M-Instruct on GSM8K, sized for about 30 minutes of training on
          2 cores (budgets in steps, measured in CPU seconds; README "The R1 pipeline on a CPU").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from r1kit.errors import ConfigError
from r1kit.pipeline.config import PipelineFields, load_pipeline_config

STAGE_NUMBERS_FROM = {"0": "base", "1": "cold_start", "2": "reasoning_rl", "3": "rejection_sampling", "4": "final_rl"}
STAGE_NUMBERS_UNTIL = {**STAGE_NUMBERS_FROM, "3": "rejection_sft"}


@dataclass
class R1PipelineConfig(PipelineFields):
    """The R1 pipeline: the base, the data, the shared fields and evaluation, one section per stage."""

    model: str = "smollm2-135m-instruct"  # the base model (stages cold_start and rejection_sft start from it)
    task: str = "gsm8k"  # RL and rejection-sampling prompts: registered task or local .jsonl/.parquet (train split)
    cold_start_data: str = "gsm8k"  # cold-start SFT data: task with worked solutions, local file, or sampler directory
    cold_start_limit: int | None = None  # use the first N cold-start rows only (stages 1 and 3); None = all
    output: str = "runs/r1"  # pipeline directory: one subdirectory per stage, report.md, report.png
    evaluate_base: bool = True  # evaluate the base model too (the report's first row)
    cold_start: dict = field(default_factory=dict)  # stage 1 SFTConfig section (may hold preset)
    reasoning_rl: dict = field(default_factory=dict)  # stage 2 GRPOConfig section
    rejection_sampling: dict = field(default_factory=dict)  # stage 3 SampleConfig section
    rejection_sft: dict = field(default_factory=dict)  # stage 3 SFTConfig section
    final_rl: dict = field(default_factory=dict)  # stage 4 GRPOConfig section


PRESETS: dict[str, dict[str, Any]] = {
    "r1": dict(
        template="chat_think", task="gsm8k", cold_start_data="gsm8k", eval_max_tokens=32768,
        cold_start=dict(preset="cold_start"),
        reasoning_rl=dict(preset="r1", reward_funcs=["accuracy", "format", "language"]),
        rejection_sampling=dict(preset="r1_rejection"),
        rejection_sft=dict(preset="cold_start", num_train_epochs=2),
        final_rl=dict(preset="r1", temperature=0.7, max_steps=1700),
    ),
}
# The embedded SmolLM2-135M-Instruct on GSM8K (README "The R1 pipeline on a CPU"). Evaluation: the
# first 200 GSM8K test problems (never trained on), k=1, T=0.6, top-p 0.95, 256 tokens. Budgets are
# step counts (no wall-clock caps, so a run is the same on a busy machine), sized from measured CPU
# seconds (SFT 2.2 CPU s per example, evaluation 140-270 CPU s per 200 problems): 240 + 192 SFT
# examples, 4 + 2 GRPO steps of 32 completions, 48 prompts × 4 samples. Measured: 1,394 CPU s of
# training and 919 of evaluation (about 20 minutes of an idle 2-core machine; README). RL and rejection sampling use GSM8K-train problems of at most two calculator steps
# (gsm8k_easy: a 135M model solves some, so groups carry reward variance and samples verify); both
# SFT stages see the same first 480 GSM8K-train worked solutions. Learning rates: SFT 1e-4, the
# spec's R1-Distill rate for its smallest student (DISTILL_SPEC §6), cosine to 0.1×; GRPO 2e-5 with
# the DAPO loss, as the CPU GRPO demos. Nothing here was tuned on test problems. GSM8K `train` excludes
# the 200-row dev split (r1kit.data.math_tasks.gsm8k), so no stage trains on it.
_CPU_SFT = dict(preset="cold_start", learning_rate=1e-4, min_lr_ratio=0.1, warmup_ratio=0.05, max_length=512,
                per_device_train_batch_size=8, gradient_accumulation_steps=1, bf16="auto", save_steps=5,
                save_total_limit=1, num_train_epochs=1.0)
_CPU_GRPO = dict(task="gsm8k_easy", num_generations=8, prompts_per_step=4, max_completion_length=256,
                 max_prompt_length=512, temperature=1.0, learning_rate=2e-5, loss_type="dapo", epsilon_high=0.28,
                 beta=0.0, micro_batch_size=16, bf16="auto", save_steps=2, save_total_limit=1, log_completions_steps=2)
PRESETS["cpu_r1"] = dict(
    model="smollm2-135m-instruct", task="gsm8k_easy", cold_start_data="gsm8k", cold_start_limit=480,
    template="chat_think", answer_extraction="tagged", eval_task="gsm8k", eval_split="test", eval_limit=200,
    eval_k=1, eval_temperature=0.6, eval_top_p=0.95, eval_max_tokens=256, output="runs/r1-cpu",
    cold_start=dict(_CPU_SFT, max_steps=30),
    reasoning_rl=dict(_CPU_GRPO, reward_funcs=["accuracy", "format", "language"], max_steps=4),
    rejection_sampling=dict(preset="r1_rejection", task="gsm8k_easy", split="train", limit=48, num_samples=4,
                            max_tokens=256, prompts_per_shard=4),
    rejection_sft=dict(_CPU_SFT, max_steps=24),
    final_rl=dict(_CPU_GRPO, reward_funcs=["accuracy", "format"], temperature=0.7, max_steps=2),
)

def preset_names() -> list[str]:
    return sorted(PRESETS)


def load_r1_config(preset: str | None = None, yaml_path: str | None = None,
                   overrides: dict[str, Any] | None = None) -> R1PipelineConfig:
    """defaults → preset → YAML → overrides, validated (``load_pipeline_config``). Raises ConfigError
    (unknown preset, file, stage or field; bad YAML; invalid value)."""
    return load_pipeline_config(R1PipelineConfig, PRESETS, preset, yaml_path, overrides)


def r1_stages(cfg: R1PipelineConfig):
    """The stage graph of the R1 pipeline (module docstring)."""
    from r1kit.pipeline.stages import Stage

    return [
        Stage("base", "0_base", "eval", model="base", evaluate=cfg.evaluate_base,
              description="the base model, evaluated"),
        Stage("cold_start", "1_cold_start", "sft", model="base", data=[cfg.cold_start_data],
              data_limits=[cfg.cold_start_limit], overrides=cfg.cold_start, description="stage 1: cold-start SFT of the base on worked solutions"),
        Stage("reasoning_rl", "2_reasoning_rl", "grpo", model="cold_start", overrides=cfg.reasoning_rl,
              description="stage 2: reasoning GRPO from stage 1"),
        Stage("rejection_sampling", "3a_rejection_sampling", "sample", model="reasoning_rl",
              overrides=cfg.rejection_sampling, evaluate=False,
              description="stage 3a: rejection sampling from stage 2 on training prompts"),
        Stage("rejection_sft", "3b_rejection_sft", "sft", model="base",
              data=[cfg.cold_start_data, "rejection_sampling"], data_limits=[cfg.cold_start_limit, None],
              overrides=cfg.rejection_sft,
              description="stage 3b: SFT of the base (again) on cold-start data + verified samples"),
        Stage("final_rl", "4_final_rl", "grpo", model="rejection_sft", overrides=cfg.final_rl,
              description="stage 4: final GRPO from stage 3"),
    ]


def r1_context(cfg: R1PipelineConfig, progress: bool = True):
    """The PipelineContext of an R1 pipeline config: fields every stage kind gets, the evaluation."""
    from r1kit.pipeline.stages import PipelineContext

    shared = dict(template=cfg.template, seed=cfg.seed)
    common = {"grpo": {**shared, "task": cfg.task, "answer_extraction": cfg.answer_extraction},
              "sft": dict(shared),
              "sample": {**shared, "task": cfg.task, "answer_extraction": cfg.answer_extraction}}
    return PipelineContext(output=Path(cfg.output), base_model=cfg.model, common=common, eval=cfg.eval_settings(cfg.task),
                           num_threads=cfg.num_threads, progress=progress, run_kind="pipeline r1")


def resolve_stage_flag(value: str | None, numbers: dict[str, str], flag: str = "--from",
                       names: Sequence[str] = ()) -> str | None:
    """A --from/--until value: a stage name, or the paper's stage number 0-4 (``numbers``).

    Raises:
        ConfigError: a number that is not one of them, naming ``flag``, the numbers and the stage ``names``
            (another name is left to ``stages.check_stage_names``).
    """
    if value is None:
        return None
    value = str(value).strip()
    if value.lstrip("+-").isdigit() and value not in numbers:
        raise ConfigError(f"{flag}: {value} is not a stage; use {min(numbers)}-{max(numbers)} or one of: "
                          f"{', '.join(names or numbers.values())}")
    return numbers.get(value, value)


def run_r1_pipeline(cfg: R1PipelineConfig, from_stage: str | None = None, until_stage: str | None = None,
                    progress: bool = True) -> Path:
    """Run the R1 pipeline (module docstring); write ``report.md``/``report.png``; return ``cfg.output``.

    Raises:
        ConfigError: unknown stage name, bad stage config (before any work).
        R1kitError: missing artifact or model, a stage made with another config, a stage's own errors.
    """
    from r1kit.pipeline.report import write_report
    from r1kit.pipeline.stages import run_stages

    cfg.validate()
    stages = r1_stages(cfg)
    ctx = r1_context(cfg, progress)
    out = Path(cfg.output)
    names = [s.name for s in stages]
    run_stages(stages, ctx, resolve_stage_flag(from_stage, STAGE_NUMBERS_FROM, "--from", names),
               resolve_stage_flag(until_stage, STAGE_NUMBERS_UNTIL, "--until", names), record=cfg.to_dict())
    from r1kit.data.loading import load_task
    from r1kit.data.sft_data import load_sft_rows

    # the answer prior of everything the stages train on: cold-start golds and the RL/sampling prompts
    golds = [r.meta.get("gold") for r in load_sft_rows(cfg.cold_start_data, limit=cfg.cold_start_limit)]
    golds = [g for g in golds if g is not None] + [e.gold for e in load_task(cfg.task, "train")]
    write_report(stages, ctx, title=f"R1 pipeline: {cfg.model}, cold start on {cfg.cold_start_data}, RL on {cfg.task}",
                 train_golds=golds)
    return out

