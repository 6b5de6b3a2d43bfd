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

Resolution order (later wins): dataclass defaults → ``--preset`` → ``--config file.yaml`` →
``--field value`` flags. A stage section (``cold_start: {preset: cold_start, learning_rate: 5e-5}``)
holds the stage's own config fields (SFTConfig, GRPOConfig, SampleConfig) and optionally ``preset``;
a YAML section updates the preset's section field by field.

Presets:
  r1      the paper's recipe at full scale (cold start 2 epochs at 5e-5 → 5e-6; GRPO with ε 10,
          accuracy + format + language; 16 samples per prompt; stage-3 SFT 2 epochs; final RL
          at T 0.7 for 1,700 steps). Needs a GPU cluster.
  cpu_r1  the embedded SmolLM2-135M-Instruct on GSM8K, sized for about 30 minutes of training on
          2 cores (budgets in steps, measured in CPU seconds; README "The R1 pipeline on a CPU").
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from r1kit.errors import ConfigError

STAGE_SECTIONS = ("cold_start", "reasoning_rl", "rejection_sampling", "rejection_sft", "final_rl")
STAGE_NUMBERS_FROM = {"0": "base", "1": "cold_start", "2": "reasoning_rl", "3": "rejection_sampling", "4": "final_rl"}
STAGE_NUMBERS_UNTIL = {**STAGE_NUMBERS_FROM, "3": "rejection_sft"}


@dataclass
class R1PipelineConfig:
    """The R1 pipeline: shared fields, the held-out evaluation, and one section per stage."""

    model: str = "smollm2-135m-instruct"  # the base model (stages cold_start and rejection_sft start from it)
    task: str = "gsm8k"  # RL and rejection-sampling prompts: registered task or local .jsonl/.parquet (train split)
    cold_start_data: str = "gsm8k"  # cold-start SFT data: task with worked solutions, local file, or sampler directory
    template: str = "chat_boxed"  # prompt template of every stage and of the evaluation (r1kit.data.templates)
    answer_extraction: str = "tagged"  # MathVerifier extraction for rewards, sampling and evaluation
    seed: int = 0  # seed of every stage
    num_threads: int | None = None  # torch intra-op threads (None = torch default)
    output: str = "runs/r1"  # pipeline directory: one subdirectory per stage, report.md, report.png
    evaluate_base: bool = True  # evaluate the base model too (the report's first row)
    eval_task: str | None = None  # held-out task (default: task), never trained on
    eval_split: str = "test"  # its split
    eval_limit: int | None = 200  # the first N problems of eval_split: a fixed subset (None = all)
    eval_k: int = 1  # samples per held-out problem (pass@1 = their mean)
    eval_temperature: float = 0.6  # R1 evaluation protocol
    eval_top_p: float = 0.95  # R1 evaluation protocol
    eval_max_tokens: int = 256  # completion tokens at most in evaluation
    cold_start: dict = field(default_factory=dict)  # stage 1 SFTConfig section (may hold preset)
    reasoning_rl: dict = field(default_factory=dict)  # stage 2 GRPOConfig section
    rejection_sampling: dict = field(default_factory=dict)  # stage 3 SampleConfig section
    rejection_sft: dict = field(default_factory=dict)  # stage 3 SFTConfig section
    final_rl: dict = field(default_factory=dict)  # stage 4 GRPOConfig section

    def validate(self) -> None:
        """Raise ConfigError naming the field for an invalid value."""
        for name in ("eval_k", "eval_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"eval_limit must be >= 1 (or none), got {self.eval_limit}")
        for name in STAGE_SECTIONS:
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"stage section {name} must be a mapping of config fields, "
                                  f"got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "r1": dict(
        template="chat_think", task="gsm8k", cold_start_data="gsm8k", eval_max_tokens=32768,
        cold_start=dict(preset="cold_start"),
        reasoning_rl=dict(preset="r1", reward_funcs=["accuracy", "format", "language"]),
        rejection_sampling=dict(num_samples=16, temperature=1.0),
        rejection_sft=dict(preset="cold_start", num_train_epochs=2),
        final_rl=dict(preset="r1", temperature=0.7, max_steps=1700),
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(R1PipelineConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(R1PipelineConfig)}


def apply_pipeline_overrides(cfg: R1PipelineConfig, values: dict[str, Any], source: str) -> R1PipelineConfig:
    """Apply ``values``; a stage section updates the current section key by key.

    Raises:
        ConfigError: an unknown field or stage section (names ``source``, the stages and the fields).
    """
    from r1kit.config import _coerce

    types = _field_types()
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in STAGE_SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: stage section {name} must be a mapping of config fields, got {value!r}")
            setattr(cfg, name, {**getattr(cfg, name), **value})
        elif name in types:
            setattr(cfg, name, _coerce(value, types[name], name))
        else:
            plain = [n for n in types if n not in STAGE_SECTIONS]
            raise ConfigError(f"{source}: {key!r} is neither a pipeline stage ({', '.join(STAGE_SECTIONS)}) "
                              f"nor a pipeline field ({', '.join(plain)})")
    return cfg


def load_r1_config(preset: str | None = None, yaml_path: str | None = None,
                   overrides: dict[str, Any] | None = None) -> R1PipelineConfig:
    """defaults → preset → YAML → overrides, validated. Raises ConfigError (unknown preset, file,
    stage or field; bad YAML)."""
    cfg = R1PipelineConfig()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown pipeline preset {preset!r}; presets: {', '.join(preset_names())}")
        apply_pipeline_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"pipeline config file {yaml_path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"pipeline config file {yaml_path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"pipeline config file {yaml_path} must hold a mapping of field: value")
        apply_pipeline_overrides(cfg, data, yaml_path)
    if overrides:
        apply_pipeline_overrides(cfg, overrides, "command line")
    cfg.validate()
    return cfg


def r1_stages(cfg: R1PipelineConfig):
    """The stage graph of the R1 pipeline (module docstring)."""
    from r1kit.pipeline.stages import Stage

    return [
        Stage("base", "0_base", "eval", model="base", evaluate=cfg.evaluate_base,
              description="the base model, evaluated"),
        Stage("cold_start", "1_cold_start", "sft", model="base", data=[cfg.cold_start_data],
              overrides=cfg.cold_start, description="stage 1: cold-start SFT of the base on worked solutions"),
        Stage("reasoning_rl", "2_reasoning_rl", "grpo", model="cold_start", overrides=cfg.reasoning_rl,
              description="stage 2: reasoning GRPO from stage 1"),
        Stage("rejection_sampling", "3a_rejection_sampling", "sample", model="reasoning_rl",
              overrides=cfg.rejection_sampling, evaluate=False,
              description="stage 3a: rejection sampling from stage 2 on training prompts"),
        Stage("rejection_sft", "3b_rejection_sft", "sft", model="base",
              data=[cfg.cold_start_data, "rejection_sampling"], overrides=cfg.rejection_sft,
              description="stage 3b: SFT of the base (again) on cold-start data + verified samples"),
        Stage("final_rl", "4_final_rl", "grpo", model="rejection_sft", overrides=cfg.final_rl,
              description="stage 4: final GRPO from stage 3"),
    ]


def r1_context(cfg: R1PipelineConfig, progress: bool = True):
    """The PipelineContext of an R1 pipeline config: fields every stage kind gets, the evaluation."""
    from r1kit.pipeline.stages import EvalSettings, PipelineContext

    shared = dict(template=cfg.template, seed=cfg.seed)
    common = {"grpo": {**shared, "task": cfg.task, "answer_extraction": cfg.answer_extraction},
              "sft": dict(shared),
              "sample": {**shared, "task": cfg.task, "answer_extraction": cfg.answer_extraction}}
    ev = EvalSettings(task=cfg.eval_task or cfg.task, split=cfg.eval_split, limit=cfg.eval_limit, k=cfg.eval_k,
                      temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, max_tokens=cfg.eval_max_tokens,
                      template=cfg.template, answer_extraction=cfg.answer_extraction, seed=cfg.seed)
    return PipelineContext(output=Path(cfg.output), base_model=cfg.model, common=common, eval=ev,
                           num_threads=cfg.num_threads, progress=progress)


def resolve_stage_flag(value: str | None, numbers: dict[str, str]) -> str | None:
    """A --from/--until value: a stage name, or the paper's stage number 0-4."""
    return None if value is None else numbers.get(str(value), value)


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
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_stages(stages, ctx, resolve_stage_flag(from_stage, STAGE_NUMBERS_FROM),
               resolve_stage_flag(until_stage, STAGE_NUMBERS_UNTIL))
    from r1kit.data.loading import load_task

    write_report(stages, ctx, title=f"R1 pipeline: {cfg.model} on {cfg.task}",
                 train_golds=[e.gold for e in load_task(cfg.task, "train")])
    return out


def add_pipeline_arguments(parser) -> None:
    """One ``--field-name`` option per plain R1PipelineConfig field (stage sections: --config only)."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    comments = {m.group(1): m.group(2) for m in map(pattern.match, inspect.getsource(R1PipelineConfig).splitlines())
                if m}
    for f in dataclasses.fields(R1PipelineConfig):
        if f.name not in STAGE_SECTIONS:
            parser.add_argument("--" + f.name.replace("_", "-"), dest="pl_" + f.name, default=None, metavar="V",
                                help=comments.get(f.name, ""))


def pipeline_overrides_from_args(args) -> dict[str, Any]:
    return {k[3:]: v for k, v in vars(args).items() if k.startswith("pl_") and v is not None}
