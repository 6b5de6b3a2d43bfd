"""R1's distillation claim in miniature, from scratch (R1 v2 F.1, Table 16; DISTILL_SPEC §1): at
equal student size, is SFT on a stronger RL-trained teacher's verified samples better than GRPO on
the student itself, for the same student CPU time?

``r1kit pretrain v3-distill --output DIR`` runs, in order (budgets are CPU seconds of this process):

With ``parallel`` (default), steps 2 and the ``student`` and ``rl`` stages run in a second process
while the first runs step 1 and the ``teacher`` and ``samples`` stages (one core each; each budget is
the CPU time of the process that spends it); then ``distill`` and the report.

1. ``DIR/models/teacher``: a DeepSeek-V3 MoE pretrained from scratch on the train split of
   ``arithmetic`` (``r1kit.models.v3_pretrain``) for ``teacher_pretrain_seconds``;
2. ``DIR/models/student``: a smaller V3 (``student_overrides``: fewer layers) pretrained the same way
   for ``student_pretrain_seconds`` (a weaker model, as a small open model is against R1);
3. the stages, through the pipeline runner (``r1kit.pipeline.stages``: manifests, skip, resume):

   ======== ====== ================ ==================================================================
   stage    kind   model            what
   ======== ====== ================ ==================================================================
   student  eval   the student      its held-out evaluation before anything (the base of the Δ columns)
   teacher  grpo   the teacher      GRPO (``v3_zero.GRPO_SETTINGS``) for ``teacher_grpo_seconds``
   samples  sample the RL teacher   ``num_samples`` per train prompt at T=1; the verifier keeps correct ones
   rl       grpo   the student      (b) GRPO alone, the same settings, for ``student_seconds``
   distill  sft    the student      (a) SFT on the teacher's kept samples for ``student_seconds``
   ======== ====== ================ ==================================================================

   Every model is evaluated on the same held-out test problems (never pretrained or trained on;
   k samples at T=0.6); ``DIR/report.md`` / ``report.png`` give pass@1 with 95% intervals, the
   paired-bootstrap difference of ``distill`` against ``rl`` (its "Δ vs previous"), and the
   constant-answer baselines (``eval_report``).

With ``task="arithmetic"`` (preset ``cpu``) the answers need no intermediate step (``"37+48="`` →
``"85"``): what the student inherits is the teacher's answers, not its reasoning. With
``task="arithmetic_chain"`` (preset ``chain``) every completion is a worked trace (``"12+34+56="`` →
``"46+56=102"``): both models learn the step format in pretraining (``v3_pretrain`` on generated
traces), the teacher's GRPO and sampling are rewarded and filtered on the final answer only (the
task's verifier, the object reward and evaluation use), and the student is fine-tuned on the
teacher's whole traces; the report counts the kept traces whose every step is right and, for
every model's held-out completions, how often the steps are right and the answer follows from them.

The comparison is at equal *student* CPU time; the teacher's own cost (pretraining, GRPO, sampling)
is reported beside it, as R1 reports its teacher's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1kit.errors import ConfigError, R1kitError
from r1kit.train.v3_zero import GRPO_SETTINGS, check_pretrain_settings

# GRPO settings of v3_zero (chosen there on training reward only); the stage runner sets model/output
# and does the evaluation, so GRPO's own before/after evaluation is off.
GRPO_STAGE = {k: v for k, v in GRPO_SETTINGS.items() if not k.startswith("eval")}
GRPO_STAGE.update(eval_before=False, eval_after=False, max_steps=100_000, log_completions_steps=0)

# SFT of the student on the teacher's verified answers: the pretraining learning rate scale of this
# model size (3e-3 peak there), a third of it, constant, no warm-up; batch 64 problems as
# GRPO's 64 prompts per step. Fixed before the first run, never tuned on held-out problems.
SFT_STAGE: dict[str, Any] = dict(
    learning_rate=1e-3, lr_scheduler="constant", warmup_ratio=0.0, per_device_train_batch_size=64,
    gradient_accumulation_steps=1, num_train_epochs=100, max_steps=100_000, max_length=32, bf16="false",
    save_steps=0, plot=False,
)

# Rejection sampling of the arithmetic train prompts: 4 per prompt at T=1 (R1 v2 B.3.2); the
# readability filters are for natural-language CoT and are off for bare answers (nothing to read);
# exact duplicates of a prompt's samples are still dropped (one kept answer per prompt).
SAMPLE_STAGE: dict[str, Any] = dict(
    num_samples=4, max_tokens=6, temperature=1.0, top_p=1.0, prompts_per_shard=256, filter_language=False,
    filter_repetition=False, filter_long_paragraphs=False, filter_code_blocks=False, dtype="fp32",
)


# Preset ``chain``: the same experiment on ``arithmetic_chain`` (a±b±c=, operands in [0, 29]), whose
# completions are worked traces (about twice the tokens of a±b). Budgets (about 650 CPU s in all) sized
# to the wall time left on a 2-core machine shared with many jobs, never from any held-out score; the
# teacher's GRPO budget was cut from 120 to 40 CPU s for that reason before its GRPO started in the
# measured run. Every other setting is the ``cpu`` preset's.
CHAIN_BUDGETS: dict[str, Any] = dict(
    task="arithmetic_chain", teacher_pretrain_seconds=240.0, student_pretrain_seconds=60.0,
    teacher_grpo_seconds=40.0, student_seconds=100.0, sample_limit=1000,
)


@dataclass
class V3DistillConfig:
    """What ``run_v3_distill`` runs. The defaults (preset ``cpu``) spend about 1,050 CPU seconds at one
    thread: about 20 minutes on an idle 2-core machine, about 35 on one shared with 5 other jobs."""

    output: str = "runs/v3-distill"  # run directory (models/, one stage directory each, report.md/png)
    task: str = "arithmetic"  # "arithmetic" (a±b=, bare answers) or "arithmetic_chain" (a±b±c=, worked traces)
    model_preset: str = "tiny-2m"  # model shape of the teacher (models/presets)
    student_overrides: dict = field(default_factory=lambda: {"num_hidden_layers": 2})  # the student: 1 dense + 1 MoE layer
    teacher_pretrain_seconds: float = 330.0  # teacher pretraining budget (CPU s)
    student_pretrain_seconds: float = 90.0  # student pretraining budget (CPU s)
    teacher_grpo_seconds: float = 180.0  # teacher GRPO budget (CPU s)
    student_seconds: float = 150.0  # each arm's budget on the student: SFT (a) and GRPO (b) (CPU s)
    sample_limit: int | None = 1500  # train prompts the teacher samples (None = all 4,500)
    batch_size: int = 64  # pretraining problems per optimizer step
    max_steps: int = 100_000  # optimizer steps at most of every training phase (the CPU budgets end them first)
    eval_limit: int = 400  # held-out test problems every model is evaluated on
    eval_k: int = 4  # samples per held-out problem (T=0.6, top-p 0.95)
    seed: int = 0
    threads: int | None = 1  # torch intra-op threads (1 is fastest on a shared 2-core machine)
    parallel: bool = True  # run the student's chain (pretraining, evaluation, GRPO) in a second process
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)  # DeepseekV3Config fields of both models (tests)

    def validate(self) -> None:
        """Raise ConfigError naming the field for a budget that is not a finite number > 0, a count
        below 1, an unknown task or model preset, an ``output`` that is an existing file or holds a run
        of another kind (``runs.check_run_kind``); called before any work (no child process started,
        nothing written)."""
        from r1kit.runs import check_run_kind

        task_settings(self.task)
        check_pretrain_settings(self, "model_preset", seconds=("teacher_pretrain_seconds", "student_pretrain_seconds",
                                                               "teacher_grpo_seconds", "student_seconds"),
                                counts=("sample_limit", "batch_size", "max_steps", "eval_limit", "eval_k", "threads"))
        check_run_kind(self.output, "pretrain v3-distill")  # before the pretraining, not at the stages


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults: about 1,050 CPU s (20 minutes on an idle 2-core machine)
    # a±b±c= answered by a worked trace ("12+34+56=" → "46+56=102"): what the student gets is the
    # teacher's steps, verified by the final answer only. Budgets: CHAIN_BUDGETS.
    "chain": CHAIN_BUDGETS,
}


def task_settings(task: str) -> dict[str, Any]:
    """The completion length (tokens) every stage of ``task`` uses: GRPO's ``max_completion_length``,
    the sampler's and the evaluation's ``max_tokens`` (``arithmetic.MAX_COMPLETION_TOKENS``).
    Raises ConfigError for a task without a generated corpus."""
    from r1kit.data.arithmetic import MAX_COMPLETION_TOKENS

    if task not in MAX_COMPLETION_TOKENS:
        raise ConfigError(f"task must be one of {', '.join(MAX_COMPLETION_TOKENS)} (a generated corpus), got {task!r}")
    return {"task": task, "max_tokens": MAX_COMPLETION_TOKENS[task]}


def pretrain_once(out: Path, preset: str, seconds: float, overrides: dict, cfg: V3DistillConfig) -> Path:
    """Pretrain a V3 into ``out`` (``save_pretrained_atomic``; ``history.json`` beside it), or reuse
    the one already there (a rerun continues with the stages). Returns ``out``."""
    from r1kit.models.loading import save_pretrained_atomic
    from r1kit.models.v3_pretrain import PretrainConfig, char_tokenizer, heldout_accuracy, pretrain
    from r1kit.train.logging import n_steps

    if (out / "history.json").is_file():
        print(f"{out}: pretrained already, reused", flush=True)
        return out
    tok = char_tokenizer()
    pre = PretrainConfig(preset=preset, steps=cfg.max_steps, max_seconds=seconds, batch_size=cfg.batch_size, seed=cfg.seed,
                         task=cfg.task, overrides={**cfg.model_overrides, **overrides})
    print(f"pretraining {out.name} ({preset}, overrides {pre.overrides}) for {seconds:.0f} CPU s...", flush=True)
    model, history = pretrain(pre, tok)
    history["parameters"] = sum(p.numel() for p in model.parameters())
    history["heldout_greedy_accuracy"] = heldout_accuracy(model, tok, cfg.eval_limit, cfg.task)
    history["config"] = dataclasses.asdict(pre)
    save_pretrained_atomic(model, tok, out)
    from r1kit.eval.evaluate import write_atomic

    write_atomic(out / "history.json", json.dumps({k: v for k, v in history.items() if k not in
                                                   ("loss", "balance", "max_over_mean", "load_per_layer")}))
    print(f"{out.name}: {history['parameters']:,} parameters, {n_steps(history['steps'])}, "
          f"{history['cpu_seconds']:.0f} CPU s, greedy held-out {history['heldout_greedy_accuracy']:.3f}", flush=True)
    return out


def v3_distill_stages(cfg: V3DistillConfig, teacher: Path):
    from r1kit.pipeline.stages import Stage

    lengths = task_settings(cfg.task)
    grpo = dict(GRPO_STAGE, seed=cfg.seed, max_steps=cfg.max_steps, task=cfg.task, max_completion_length=lengths["max_tokens"])
    return [
        Stage("student", "1_student", "eval", description="the student, pretrained only"),
        Stage("teacher", "2_teacher", "grpo", model=str(teacher),
              overrides={**grpo, "max_train_cpu_seconds": cfg.teacher_grpo_seconds},
              description=f"the teacher: GRPO on the larger pretrained V3 ({cfg.teacher_grpo_seconds:.0f} CPU s)"),
        Stage("samples", "3_samples", "sample", model="teacher", evaluate=False,
              overrides={**SAMPLE_STAGE, "limit": cfg.sample_limit, "seed": cfg.seed, **lengths},
              description="the RL teacher samples the train prompts; the verifier keeps correct answers"),
        Stage("rl", "4_rl", "grpo", overrides={**grpo, "max_train_cpu_seconds": cfg.student_seconds},
              description=f"(b) GRPO on the student alone ({cfg.student_seconds:.0f} CPU s)"),
        Stage("distill", "5_distill", "sft", data=["samples"],
              overrides={**SFT_STAGE, "seed": cfg.seed, "max_steps": cfg.max_steps, "max_train_cpu_seconds": cfg.student_seconds},
              description=f"(a) SFT of the student on the teacher's verified samples ({cfg.student_seconds:.0f} CPU s)"),
    ]


def run_v3_distill(cfg: V3DistillConfig, progress: bool | None = None) -> Path:
    """Run the module docstring's steps; return the report path (``DIR/report.md``).

    Raises:
        ConfigError: from ``V3DistillConfig.validate`` (before any work).
        R1kitError: from the stage runner (a stage made with another config, ...) and the stages.
    """
    import torch

    from r1kit.data.loading import load_task
    from r1kit.eval.evaluate import write_atomic
    from r1kit.pipeline.report import write_report
    from r1kit.pipeline.stages import run_stages

    out = Path(cfg.output)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    child = None
    if cfg.parallel:  # the student's chain needs nothing of the teacher's: a second core runs it meanwhile
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=student_chain_process, args=(cfg,),
                                                             name="student-chain")
        child.start()
    teacher = pretrain_once(out / "models" / "teacher", cfg.model_preset, cfg.teacher_pretrain_seconds, {}, cfg)
    if child is not None:
        stages, ctx = stage_context(cfg, progress)
        try:
            run_stages(stages, ctx, from_stage="teacher", until_stage="samples")  # reads no student artifact
        finally:  # an error here waits for the student's chain: nothing is left half-written
            child.join()
        if child.exitcode != 0:
            raise R1kitError(f"the student's chain (second process) failed with exit code {child.exitcode}; "
                             f"its error is printed above; rerun the same command to resume ({out})")
    student_chain(cfg, only_pretrain=True)
    stages, ctx = stage_context(cfg, progress)
    run_stages(stages, ctx, record=dataclasses.asdict(cfg))  # skips every stage already complete
    what = "a±b±c with worked traces" if cfg.task == "arithmetic_chain" else "a±b"
    report = write_report(stages, ctx, title=f"Distillation vs RL at equal student size: DeepSeek-V3 from scratch, {what}",
                          train_golds=[e.gold for e in load_task(cfg.task, "train")])
    write_atomic(report, report.read_text() + models_section(out) + traces_section(out, cfg.task))
    return report


def stage_context(cfg: V3DistillConfig, progress: bool | None = None):
    """(stages, PipelineContext) of the run: the student (``DIR/models/student``) is the base; every
    stage renders with the bare template; held-out evaluation on the test split of ``cfg.task``."""
    from r1kit.pipeline.stages import EvalSettings, PipelineContext

    out = Path(cfg.output)
    lengths = task_settings(cfg.task)
    shared = dict(template="bare", answer_extraction="any", seed=cfg.seed)
    common = {"grpo": dict(shared, task=cfg.task), "sft": dict(template="bare", seed=cfg.seed),
              "sample": dict(shared, task=cfg.task)}
    ev = EvalSettings(task=cfg.task, split="test", limit=cfg.eval_limit, k=cfg.eval_k, temperature=0.6,
                      top_p=0.95, max_tokens=lengths["max_tokens"], template="bare", answer_extraction="any", seed=cfg.seed)
    ctx = PipelineContext(output=out, base_model=str(out / "models" / "student"), common=common, eval=ev,
                          num_threads=cfg.threads, progress=cfg.progress if progress is None else progress,
                          run_kind="pretrain v3-distill")
    return v3_distill_stages(cfg, out / "models" / "teacher"), ctx


def student_chain(cfg: V3DistillConfig, only_pretrain: bool = False) -> None:
    """Pretrain the student (or reuse it), then, unless ``only_pretrain``, its stages that read no
    teacher artifact: ``student`` (evaluation) and ``rl`` (GRPO alone). Run in the second process
    when ``cfg.parallel``."""
    import torch

    from r1kit.pipeline.stages import run_stages

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pretrain_once(Path(cfg.output) / "models" / "student", cfg.model_preset, cfg.student_pretrain_seconds,
                  cfg.student_overrides, cfg)
    if not only_pretrain:
        stages, ctx = stage_context(cfg, progress=False)
        run_stages(stages, ctx, until_stage="student")
        run_stages(stages, ctx, from_stage="rl", until_stage="rl")


def student_chain_process(cfg: V3DistillConfig) -> None:
    """``student_chain`` as the second process runs it: an R1kitError (bad input a user can fix: a stage
    made with another config, ...) is printed as one ``error:`` line and exits with status 2, as the CLI
    does (a bug keeps its traceback); the first process then names the failed chain."""
    import sys

    try:
        student_chain(cfg)
    except R1kitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def models_section(out: Path) -> str:
    """The two pretrained models (parameters, steps, CPU s, greedy held-out accuracy) as markdown."""
    lines = ["", "## The pretrained models", "", "| model | parameters | pretraining steps | CPU s | "
             "greedy held-out accuracy |", "|---|---|---|---|---|"]
    for name in ("teacher", "student"):
        h = json.loads((out / "models" / name / "history.json").read_text())
        lines.append(f"| {name} | {h['parameters']:,} | {h['steps']} | {h['cpu_seconds']:.0f} | "
                     f"{100 * h['heldout_greedy_accuracy']:.1f}% |")
    return "\n".join(lines) + "\n"


def traces_section(out: Path, task: str) -> str:
    """For ``arithmetic_chain``, as markdown: how many of the teacher's kept samples (verified by their
    final answer only) have every step right (equal to ``worked_trace``), and, for every evaluated
    stage's held-out completions (``<stage dir>/eval.json``), the share whose first step is right, whose
    last step follows from the intermediate it wrote, and whose whole trace is right. "" for other tasks."""
    if task != "arithmetic_chain":
        return ""
    from r1kit.data.arithmetic import worked_trace

    rows = [json.loads(line) for f in sorted((out / "3_samples" / "run" / "shards").glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]
    exact = sum(r["completion"].strip() == worked_trace(r["prompt"]) for r in rows)
    text = (f"\n## The traces\n\n{len(rows):,} kept samples of the teacher (final answer verified); {exact:,} of them "
            f"({100 * exact / max(len(rows), 1):.1f}%) have every intermediate step right (equal to the worked trace).\n\n"
            "Held-out completions:\n\n| stage | completions | first step right | last step follows from the written "
            "intermediate | whole trace right |\n|---|---|---|---|---|\n")
    for path in sorted(out.glob("[0-9]_*/eval.json")):
        counts = [0, 0, 0, 0]
        for problem in json.loads(path.read_text())["per_problem"]:
            trace = worked_trace(problem["id"].split("/", 2)[2] + "=")
            for completion in problem["completions"]:
                steps = completion.strip().split("=")
                counts[0] += 1
                counts[1] += steps[0] == trace.split("=")[0]
                counts[2] += len(steps) == 2 and _step_holds(steps[0], steps[1])
                counts[3] += completion.strip() == trace
        n = max(counts[0], 1)
        text += (f"| {path.parent.name.split('_', 1)[1]} | {counts[0]:,} | {100 * counts[1] / n:.1f}% | "
                 f"{100 * counts[2] / n:.1f}% | {100 * counts[3] / n:.1f}% |\n")
    return text


def _step_holds(expression: str, result: str) -> bool:
    """Whether the written step ``expression`` (``"46+56"``, ``"-22+5"``) equals ``result``."""
    from r1kit.data.arithmetic import chain_answer
    from r1kit.errors import DataError

    try:
        return chain_answer(("0" if expression.startswith("-") else "") + expression + "=") == result
    except DataError:  # not a chain ("4x", "")
        return False
