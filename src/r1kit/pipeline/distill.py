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
    train_cpu_seconds: float | None = None  # CPU budget of sampling + SFT (process s): the SFT gets what sampling left
    samples: dict = field(default_factory=dict)  # SampleConfig section (may hold preset)
    distill: dict = field(default_factory=dict)  # SFTConfig section (may hold preset)

    def validate(self) -> None:
        super().validate()
        if self.train_cpu_seconds is not None and self.train_cpu_seconds <= 0:
            raise ConfigError(f"train_cpu_seconds must be > 0 (or none), got {self.train_cpu_seconds}")


PRESETS: dict[str, dict[str, Any]] = {
    # R1-Distill: 4 samples per prompt at the R1 sampling settings; student SFT per r1_distill.
    "r1_distill": dict(template="chat_think", samples=dict(preset="r1_rejection"), distill=dict(preset="r1_distill")),
    # Rejection-sampling fine-tuning of the embedded model on SVAMP (`make demo-rft`; R1 stage 3 in
    # miniature): it samples each train problem 4 times (sampler preset cpu_demo: T 0.8 as the GRPO
    # demo's rollouts, one-line answers), its verified answers are fine-tuned back into it (R1 stage-3
    # SFT: 2 epochs, cosine 5e-5 -> 5e-6), sampling + SFT capped at the GRPO demo's 19 minutes of one
    # thread (1,140 CPU s); evaluated as `make demo-svamp` (300 test problems, k=2, 48 tokens, stop "\n").
    # Decontamination: DeepSeek's 10-gram rule only (question and question + solution); open-r1's
    # 8-gram question rule would drop 446 of the 700 prompts (SVAMP varies shared stories).
    "rft_svamp": dict(
        teacher="smollm2-135m-instruct", student="smollm2-135m-instruct", task="svamp", evaluate_teacher=False,
        template="direct", answer_extraction="any", output="runs/rft-svamp", train_cpu_seconds=19 * 60.0,
        eval_limit=300, eval_k=2, eval_max_tokens=48, eval_stop=["\n"],
        samples=dict(preset="cpu_demo", decontam_question_ngram=10),
        distill=dict(learning_rate=5e-5, lr_scheduler="cosine", min_lr_ratio=0.1, num_train_epochs=2.0,
                     max_length=256, per_device_train_batch_size=8, gradient_accumulation_steps=1, bf16="auto",
                     save_steps=10),
    ),
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


def sft_budget(cfg: DistillConfig, samples_dir: Path) -> float:
    """The SFT stage's CPU seconds under ``train_cpu_seconds``: the budget less the samples stage's CPU
    seconds (its manifest), at most the distill section's own ``max_train_cpu_seconds``.

    Raises:
        R1kitError: sampling spent the whole budget (names both figures and the fix).
    """
    from r1kit.errors import R1kitError
    from r1kit.pipeline.manifest import read_manifest

    spent = (read_manifest(samples_dir) or {}).get("cpu_seconds", 0.0)
    left = cfg.train_cpu_seconds - spent
    if left <= 0:
        raise R1kitError(f"sampling used {spent:.0f} CPU s of the train_cpu_seconds budget {cfg.train_cpu_seconds:g}, "
                         f"leaving nothing for the SFT; raise train_cpu_seconds or sample fewer prompts "
                         f"(samples: {{limit: N}} or {{num_samples: N}})")
    own = cfg.distill.get("max_train_cpu_seconds")
    return min(left, float(own)) if own is not None else left


def run_distill(cfg: DistillConfig, from_stage: str | None = None, until_stage: str | None = None,
                progress: bool = True) -> Path:
    """Run the distillation stages (module docstring), write the report; return ``cfg.output``.
    With ``train_cpu_seconds`` the stages up to the samples run first, then the SFT with what the
    sampling left of the budget (``sft_budget``).

    Raises:
        ConfigError / R1kitError: as ``run_stages`` (bad stage config before any work, a missing
            model or artifact, a stage made with another config), and the stages' own errors (a
            teacher whose every sample fails verification is an error from the sampler; sampling
            that spent the whole ``train_cpu_seconds``).
    """
    from r1kit.data.loading import load_task
    from r1kit.pipeline.report import write_report
    from r1kit.pipeline.stages import PipelineContext, check_stage_names, run_stages

    cfg.validate()
    shared = dict(template=cfg.template, seed=cfg.seed)
    common = {"sft": dict(shared), "sample": {**shared, "task": cfg.task, "answer_extraction": cfg.answer_extraction}}
    ctx = PipelineContext(output=Path(cfg.output), base_model=cfg.student, common=common,
                          eval=cfg.eval_settings(cfg.task), num_threads=cfg.num_threads, progress=progress,
                          run_kind="distill")
    stages = distill_stages(cfg)
    names = [s.name for s in stages]
    check_stage_names(stages, {"--from": from_stage, "--until": until_stage})
    lo, hi = names.index(from_stage or names[0]), names.index(until_stage or names[-1])
    if cfg.train_cpu_seconds is None or lo > hi:
        run_stages(stages, ctx, from_stage, until_stage, record=cfg.to_dict())
    else:
        if lo < names.index("distill"):
            run_stages(stages, ctx, from_stage, names[min(hi, names.index("samples"))], record=cfg.to_dict())
        if hi == names.index("distill"):
            distill = stages[names.index("distill")]
            distill.overrides = {**distill.overrides,
                                 "max_train_cpu_seconds": sft_budget(cfg, ctx.stage_dir(stages[names.index("samples")]))}
            run_stages(stages, ctx, "distill", until_stage, record=cfg.to_dict())
    write_report(stages, ctx, title=f"Distillation: {cfg.teacher} → {cfg.student} on {cfg.task}",
                 train_golds=[e.gold for e in load_task(cfg.task, "train")])
    return ctx.output
