"""``r1kit distill --teacher T --student S --task X``: distillation, the short form of R1's stage 3
(R1 v2 §3, F.1; DISTILL_SPEC §1: "distilled students are SFT only on the stage-3 data, no RL").

  stage     kind    model          data
  student   eval    the student    (its held-out evaluation before distillation)
  teacher   eval    the teacher    (what the student could at best inherit; ``evaluate_teacher``)
  samples   sample  the teacher    ``task`` prompts (train split): verified, filtered, decontaminated
  distill   SFT     the student    the teacher's kept samples

Each stage is a directory with ``manifest.json`` under ``output``; reruns skip, resume and
``--from``/``--until`` as in ``r1kit.pipeline.stages``; ``report.md``/``report.png`` compare the
student before and after with the teacher, on held-out problems never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from r1kit.errors import ConfigError
from r1kit.pipeline.config import PipelineFields, load_pipeline_config


@dataclass
class DistillConfig(PipelineFields):
    """Distillation: teacher, student, task, the shared fields and evaluation, two stage sections."""

    teacher: str | None = None  # model that samples (load_policy name/path); required: no default teacher
    student: str = "smollm2-135m-instruct"  # model that is fine-tuned on the teacher's verified samples
    task: str = "gsm8k"  # prompts (train split) with verifiable answers; evaluation on eval_task/eval_split
    output: str = "runs/distill"  # pipeline directory
    evaluate_teacher: bool = True  # evaluate the teacher too (the report's reference row)
    samples: dict = field(default_factory=dict)  # SampleConfig section (may hold preset)
    distill: dict = field(default_factory=dict)  # SFTConfig section (may hold preset)


PRESETS: dict[str, dict[str, Any]] = {
    # R1-Distill: 4 samples per prompt at the R1 sampling settings; student SFT per r1_distill.
    "r1_distill": dict(template="chat_think", samples=dict(preset="r1_rejection"), distill=dict(preset="r1_distill")),
}


def load_distill_config(preset: str | None = None, yaml_path: str | None = None,
                        overrides: dict[str, Any] | None = None) -> DistillConfig:
    """defaults → preset → YAML → overrides, validated. Raises ConfigError (also when no teacher is
    given: distilling the default student into itself is never what a user meant)."""
    cfg = load_pipeline_config(DistillConfig, PRESETS, preset, yaml_path, overrides)
    if not cfg.teacher:
        raise ConfigError("r1kit distill needs --teacher (the model that samples: an r1kit run directory, an HF "
                          "directory, a .gguf or smollm2-135m-instruct)")
    return cfg


def distill_stages(cfg: DistillConfig):
    from r1kit.pipeline.stages import Stage

    return [
        Stage("student", "0_student", "eval", model="base", description="the student before distillation"),
        Stage("teacher", "1_teacher", "eval", model=cfg.teacher, evaluate=cfg.evaluate_teacher,
              description="the teacher"),
        Stage("samples", "2_samples", "sample", model=cfg.teacher, overrides=cfg.samples, evaluate=False,
              description="the teacher samples the training prompts; verified and filtered"),
        Stage("distill", "3_distill", "sft", model="base", data=["samples"], overrides=cfg.distill,
              description="SFT of the student on the teacher's verified samples"),
    ]


def run_distill(cfg: DistillConfig, from_stage: str | None = None, until_stage: str | None = None,
                progress: bool = True) -> Path:
    """Run the distillation stages (module docstring), write the report; return ``cfg.output``.

    Raises:
        ConfigError / R1kitError: as ``run_stages`` (bad stage config before any work, a missing
            model or artifact, a stage made with another config), and the stages' own errors (a
            teacher whose every sample fails verification is an error from the sampler).
    """
    from r1kit.data.loading import load_task
    from r1kit.pipeline.report import write_report
    from r1kit.pipeline.stages import PipelineContext, run_stages

    cfg.validate()
    shared = dict(template=cfg.template, seed=cfg.seed)
    common = {"sft": dict(shared), "sample": {**shared, "task": cfg.task, "answer_extraction": cfg.answer_extraction}}
    ctx = PipelineContext(output=Path(cfg.output), base_model=cfg.student, common=common,
                          eval=cfg.eval_settings(cfg.task), num_threads=cfg.num_threads, progress=progress)
    stages = distill_stages(cfg)
    run_stages(stages, ctx, from_stage, until_stage, record=cfg.to_dict())
    write_report(stages, ctx, title=f"Distillation: {cfg.teacher} → {cfg.student} on {cfg.task}",
                 train_golds=[e.gold for e in load_task(cfg.task, "train")])
    return ctx.output
