"""The stage runner shared by ``r1kit pipeline r1`` and ``r1kit distill`` (DISTILL_SPEC §1).

A pipeline is an ordered list of ``Stage``s. Each stage reads a model (the base, a literal model, or
an earlier stage's artifact) and data (task names, files, or earlier stages' artifacts), runs one
of r1kit's own commands (SFT, GRPO, rejection sampling) into ``<output>/<dirname>/run``, optionally
evaluates the model it made on the pipeline's held-out set (``eval.json``), and records everything in
``manifest.json`` (``r1kit.pipeline.manifest``).

Rerun semantics (``run_stages``):
  * a stage whose manifest is complete and whose key (config + input hashes) matches is skipped;
  * a stage whose manifest says "running" with the same key is resumed through the stage's own
    resume (GRPO/SFT from their latest checkpoint, the sampler from its shards); one that finished
    training but not its evaluation only evaluates;
  * a stage whose manifest was made with another config or other inputs is an error naming the
    changed fields: nothing already written is overwritten;
  * ``from_stage``: earlier stages are not run, their artifacts must exist (complete manifests);
    ``until_stage``: later stages are not run.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from r1kit.config import RUNTIME_FIELDS  # left out of the stage key, so a rerun may change them
from r1kit.errors import ConfigError, R1kitError
from r1kit.pipeline.manifest import canonical_sha256, changed_fields, read_manifest, sha256_path, write_manifest

STAGE_KINDS = ("eval", "sft", "grpo", "sample")
# Config fields the pipeline sets from its graph: a stage section naming one is refused.
GRAPH_FIELDS = {"eval": (), "sft": ("model", "output", "data"), "grpo": ("model", "output"),
                "sample": ("teacher", "output")}


@dataclass
class Stage:
    """One node of a pipeline.

    Attributes:
        name: the stage's name (``--from``/``--until`` and the config section use it).
        dirname: its directory under the pipeline output (``1_cold_start``).
        kind: "eval" (evaluate ``model`` only), "sft", "grpo" or "sample".
        model: "base", the name of an earlier stage (its artifact), or a literal model spec.
        data: data specs: names of earlier stages (their artifacts) or literal task names/files.
        data_limits: per data spec, its first N rows only (None = all); SFT stages.
        overrides: the stage's config section (may hold ``preset``), applied over the stage's
            defaults and under the fields the pipeline sets (template, seed, ...).
        evaluate: evaluate the stage's model on the held-out set after it is made.
        description: one line for the report (paper stage and what it does).
    """

    name: str
    dirname: str
    kind: str
    model: str = "base"
    data: list[str] = field(default_factory=list)
    data_limits: list[int | None] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = True
    description: str = ""


@dataclass
class EvalSettings:
    """The held-out evaluation every stage's model gets (R1 protocol: T 0.6, top-p 0.95)."""

    task: str  # registered task or local file, never trained on
    split: str  # its split
    limit: int | None  # first N problems (a fixed subset), None = all
    k: int  # samples per problem
    temperature: float
    top_p: float
    max_tokens: int  # completion tokens at most
    template: str  # prompt template (the one every stage trains with)
    answer_extraction: str  # MathVerifier extraction
    seed: int
    stop: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PipelineContext:
    """What every stage shares: the output directory, the base model, the pipeline-wide fields every
    stage config gets (``common``: template, seed, ...), and the held-out evaluation."""

    output: Path
    base_model: str
    common: dict[str, dict[str, Any]]  # kind → fields set on every stage of that kind
    eval: EvalSettings | None
    num_threads: int | None = None
    progress: bool = True
    stage_hooks: dict[str, Callable] = field(default_factory=dict)  # kind → runner (tests may add kinds)
    run_kind: str = "pipeline"  # the command writing ``output`` (a ``runs.KINDS`` key): pipeline r1, distill, ...

    def stage_dir(self, stage: Stage) -> Path:
        return self.output / stage.dirname


# ---------------------------------------------------------------- stage configs


def build_stage_config(stage: Stage, ctx: PipelineContext):
    """The stage's resolved config object: defaults → preset → the pipeline's common fields → the
    stage section. Graph fields (model/teacher, output) are placeholders until inputs are resolved.

    Raises:
        ConfigError: unknown field or preset, invalid value, or a graph field set in the section;
            the message names the stage.
    """
    overrides = dict(stage.overrides)
    preset = overrides.pop("preset", None)
    for name in GRAPH_FIELDS.get(stage.kind, ()):
        if name in overrides:
            raise ConfigError(f"pipeline stage {stage.name}: {name!r} is set by the pipeline (this stage reads "
                              f"{stage.model!r} and writes {stage.dirname}/run); remove it from the stage section")
    values = {**ctx.common.get(stage.kind, {}), **overrides}
    try:
        return _load_kind_config(stage.kind, preset, values)
    except ConfigError as e:
        raise ConfigError(f"pipeline stage {stage.name}: {e}") from None


def _load_kind_config(kind: str, preset: str | None, values: dict[str, Any]):
    if kind == "eval":
        if preset or values:
            raise ConfigError("an evaluation stage takes no config fields (the pipeline's eval_* fields set it)")
        return None
    if kind == "grpo":
        from r1kit.config import load_config

        return load_config(preset, None, values)
    if kind == "sft":
        from r1kit.config import SFTConfig, load_config

        return load_config(preset, None, values, cls=SFTConfig)
    if kind == "sample":
        from r1kit.pipeline.sample import sample_config

        return sample_config(preset, **values)
    raise ConfigError(f"unknown stage kind {kind!r}; kinds: {', '.join(STAGE_KINDS)}")


def config_dict(cfg) -> dict[str, Any]:
    return {} if cfg is None else dataclasses.asdict(cfg)


# ---------------------------------------------------------------- inputs


def data_fingerprint(spec: str) -> dict[str, str]:
    """{"spec", "path", "sha256"} of a data spec: a file or directory (its content hash), a registered
    task (the hash of its folder under ``data/``), else the spec itself (a hub name: not hashable)."""
    from r1kit.data.base import task_names
    from r1kit.data.rows import data_dir

    path = Path(spec).expanduser()
    if path.exists():
        return {"spec": spec, "path": str(path.resolve()), "sha256": sha256_path(path)}
    if spec in task_names():
        folder = data_dir() / spec.split("_")[0]  # gsm8k_easy reads data/gsm8k
        if not folder.is_dir():
            folder = data_dir() / spec
        if folder.is_dir():
            return {"spec": spec, "path": str(folder), "sha256": sha256_path(folder)}
    return {"spec": spec, "path": "", "sha256": canonical_sha256(spec)}


def model_fingerprint(spec: str) -> dict[str, str]:
    """{"spec", "path", "sha256"} of a model spec (alias, HF dir, run dir, .gguf).

    Raises:
        R1kitError: the model does not exist (from ``resolve_model_dir``, naming what was looked for).
    """
    from r1kit.models.loading import resolve_model_dir

    path = resolve_model_dir(spec)
    return {"spec": spec, "path": str(path), "sha256": sha256_path(path)}


def stage_artifact(stage_name: str, stages: dict[str, Stage], ctx: PipelineContext, needed_by: str) -> Path:
    """The artifact path of a complete earlier stage.

    Raises:
        R1kitError: that stage has no complete manifest (names it, the directory and the fix).
    """
    stage = stages[stage_name]
    sdir = ctx.stage_dir(stage)
    manifest = read_manifest(sdir)
    if manifest is None or manifest.get("status") != "complete":
        state = "does not exist" if manifest is None else f"is {manifest.get('status')!r}, not complete"
        raise R1kitError(f"stage {needed_by} needs the artifact of stage {stage_name}, whose manifest "
                         f"{sdir / 'manifest.json'} {state}; run stage {stage_name} first "
                         f"(--from {stage_name}, or no --from)")
    path = sdir / manifest["artifact"]["path"]
    if not path.exists():
        raise R1kitError(f"stage {stage_name}'s artifact {path} is missing although its manifest is complete; "
                         f"delete {sdir} and rerun with --from {stage_name}")
    return path


# ---------------------------------------------------------------- evaluation


def evaluate_model(model_path: str, settings: EvalSettings, out: Path):
    """Evaluate ``model_path`` on the held-out set; the result is written atomically to ``out``.

    Returns:
        EvalResult (``r1kit.eval.evaluate``).
    """
    import torch

    from r1kit.data.loading import load_task
    from r1kit.eval.evaluate import evaluate, save_result
    from r1kit.models.loading import load_policy, resolve_bf16
    from r1kit.runtime import make_engine, make_render, make_verifier

    problems = load_task(settings.task, settings.split, limit=settings.limit)
    model, tok = load_policy(model_path, dtype=torch.float32)
    render, _ = make_render(settings.template, tok)
    verifier = make_verifier(settings.task, settings.answer_extraction)
    engine = make_engine(model, tok, "auto", torch.bfloat16 if resolve_bf16("auto") else torch.float32)
    torch.manual_seed(settings.seed)
    res = evaluate(engine, tok, problems, verifier, render, k=settings.k, temperature=settings.temperature,
                   top_p=settings.top_p, max_tokens=settings.max_tokens, seed=settings.seed,
                   task=f"{settings.task}/{settings.split}", stop=settings.stop)
    save_result(res, out)
    return res


def eval_summary(res) -> dict[str, Any]:
    """pass@1, its interval, no-answer and truncation rates of an EvalResult (for manifests)."""
    samples = [e for p in res.per_problem for e in p["extracted"]]
    truncated = [t for p in res.per_problem for t in p.get("truncated", [])]
    return {"pass1": res.pass1, "pass1_ci": list(res.pass1_ci), "n_problems": res.n_problems, "k": res.k,
            "no_answer_rate": sum(e is None for e in samples) / max(len(samples), 1),
            "truncated_rate": sum(truncated) / max(len(truncated), 1)}


# ---------------------------------------------------------------- the runner


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_stage_names(stages: list[Stage], names: dict[str, str | None], source: str = "") -> None:
    """Raise ConfigError for a name in ``names`` ({flag: stage name}) that is not a stage."""
    known = [s.name for s in stages]
    for flag, name in names.items():
        if name is not None and name not in known:
            raise ConfigError(f"{flag} {name!r}: no such stage{source}; stages: {', '.join(known)}")


def run_stages(stages: list[Stage], ctx: PipelineContext, from_stage: str | None = None,
               until_stage: str | None = None, record: dict | None = None) -> list[dict]:
    """Run (or skip, or resume) ``stages`` in order; return their manifests (those that exist).
    ``record``: the pipeline's resolved config, written to ``<output>/pipeline.yaml`` once every
    check has passed.

    Raises:
        ConfigError: an unknown stage name, a bad stage config, an output holding a run of another
            kind (``runs.check_run_kind``), all checked before any work.
        R1kitError: a missing input artifact or model, a stage made with another config, or the
            stage's own errors.
    """
    check_stage_names(stages, {"--from": from_stage, "--until": until_stage})
    from r1kit.models.loading import check_output_path
    from r1kit.runs import check_run_kind

    check_output_path(ctx.output, "dir")  # a file there: one error line, before any work
    check_run_kind(ctx.output, ctx.run_kind)  # a GRPO/SFT/sample run or another pipeline there
    order = [s.name for s in stages]
    lo = order.index(from_stage) if from_stage else 0
    hi = order.index(until_stage) if until_stage else len(order) - 1
    if lo > hi:
        raise ConfigError(f"--from {from_stage} comes after --until {until_stage}; stages in order: {', '.join(order)}")
    by_name = {s.name: s for s in stages}
    # every config error of the stages to run before any work (later stages are checked when they run)
    configs = {s.name: build_stage_config(s, ctx) for s in stages[lo:hi + 1]}
    from r1kit.models.loading import resolve_model_dir

    for s in stages[lo:hi + 1]:
        for ref in [s.model, *s.data] if s.model != "base" else s.data:
            if ref in by_name and order.index(ref) >= order.index(s.name):
                raise ConfigError(f"stage {s.name} reads stage {ref}, which does not come before it")
        if s.model == "base" or s.model not in by_name:  # the base or a literal model: it must exist before any work
            try:
                resolve_model_dir(ctx.base_model if s.model == "base" else s.model)
            except R1kitError as e:
                raise R1kitError(f"stage {s.name}: {e}") from None
    if ctx.num_threads:
        import torch

        torch.set_num_threads(ctx.num_threads)
    ctx.output.mkdir(parents=True, exist_ok=True)
    if record is not None:
        import yaml

        from r1kit.io import write_atomic

        write_atomic(ctx.output / "pipeline.yaml", yaml.safe_dump(record, sort_keys=False))
    manifests = []
    for i, stage in enumerate(stages):
        if i > hi:
            break
        if i < lo:  # not run; a selected stage that reads it checks its artifact in _resolve_inputs
            m = read_manifest(ctx.stage_dir(stage))
            if m:
                manifests.append(m)
            continue
        manifests.append(_run_one(stage, configs[stage.name], by_name, ctx))
    return manifests


def _resolve_inputs(stage: Stage, by_name: dict[str, Stage], ctx: PipelineContext) -> tuple[dict, dict]:
    """({role: fingerprint}, {role: path str}) of the stage's model and data."""
    inputs, paths = {}, {}
    model_spec = ctx.base_model if stage.model == "base" else (
        str(stage_artifact(stage.model, by_name, ctx, stage.name)) if stage.model in by_name else stage.model)
    try:
        inputs["model"] = model_fingerprint(model_spec)
    except R1kitError as e:
        raise R1kitError(f"stage {stage.name}: {e}") from None
    paths["model"] = inputs["model"]["path"]
    for j, ref in enumerate(stage.data):
        spec = str(stage_artifact(ref, by_name, ctx, stage.name)) if ref in by_name else ref
        inputs[f"data{j}"] = data_fingerprint(spec)
        paths[f"data{j}"] = spec
    return inputs, paths


def stage_key(stage: Stage, cfg, cfg_d: dict, inputs: dict, old: dict | None) -> str:
    """sha256 of what makes a stage's artifact: its kind, config (less graph and runtime fields), data
    limits and input hashes. A config field the old manifest does not know (added by a newer r1kit)
    is left out when it holds its default, so an upgrade does not invalidate finished stages."""
    keyed = {k: v for k, v in cfg_d.items() if k not in GRAPH_FIELDS.get(stage.kind, ()) and k not in RUNTIME_FIELDS}
    if old is not None and cfg is not None:
        defaults = dataclasses.asdict(type(cfg)())
        keyed = {k: v for k, v in keyed.items() if k in old.get("config", {}) or v != defaults.get(k)}
    return canonical_sha256({"kind": stage.kind, "config": keyed, "data_limits": stage.data_limits,
                             "inputs": {r: f["sha256"] for r, f in sorted(inputs.items())}})


def _run_one(stage: Stage, cfg, by_name: dict[str, Stage], ctx: PipelineContext) -> dict:
    sdir = ctx.stage_dir(stage)
    inputs, paths = _resolve_inputs(stage, by_name, ctx)
    cfg_d = config_dict(cfg)
    old = read_manifest(sdir)
    key = stage_key(stage, cfg, cfg_d, inputs, old)
    eval_d = ctx.eval.to_dict() if (ctx.eval and stage.evaluate) else None
    if old is not None and old.get("key") != key:
        diff = changed_fields({"config": old.get("config", {}), "inputs": {r: f.get("sha256") for r, f in
                                                                       old.get("inputs", {}).items()}},
                              {"config": cfg_d, "inputs": {r: f["sha256"] for r, f in inputs.items()}})
        diff = [d for d in diff if d.split(".")[-1] not in ("output", "model", "teacher")] or ["inputs"]
        raise R1kitError(f"stage {stage.name} in {sdir} was made with another config or other inputs "
                         f"(changed: {', '.join(diff[:8])}); delete {sdir} (and the stages after it) to rerun it "
                         "with this config, or choose another --output")
    if old is not None and old.get("status") == "complete" and old.get("eval_settings") == eval_d:
        print(f"[{stage.name}] complete, inputs and config unchanged: skipped ({sdir})", flush=True)
        return old
    manifest = old or {"stage": stage.name, "kind": stage.kind, "description": stage.description,
                       "started": _now(), "cpu_seconds": 0.0, "wall_seconds": 0.0, "runs": 0,
                       "phase": "training"}
    manifest.update(status="running", key=key, inputs=inputs, config=cfg_d, eval_settings=eval_d)
    manifest["runs"] = manifest.get("runs", 0) + 1
    if old is not None:
        print(f"[{stage.name}] resuming an interrupted stage (phase {manifest.get('phase')}) in {sdir}", flush=True)
    write_manifest(sdir, manifest)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def account(phase: str) -> None:
        nonlocal cpu0, wall0
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        manifest["cpu_seconds"] = manifest.get("cpu_seconds", 0.0) + cpu
        manifest["wall_seconds"] = manifest.get("wall_seconds", 0.0) + wall
        manifest.setdefault("phase_seconds", {}).setdefault(phase, {"cpu": 0.0, "wall": 0.0})
        manifest["phase_seconds"][phase]["cpu"] += cpu
        manifest["phase_seconds"][phase]["wall"] += wall
        cpu0, wall0 = time.process_time(), time.perf_counter()

    if manifest.get("phase") == "training":
        print(f"[{stage.name}] {stage.description or stage.kind}", flush=True)
        runner = ctx.stage_hooks.get(stage.kind) or RUNNERS[stage.kind]
        artifact, counts, metrics = runner(stage, cfg, paths, sdir / "run", ctx)
        account("training")
        artifact = Path(artifact)
        rel = artifact.relative_to(sdir) if artifact.is_relative_to(sdir) else artifact.resolve()
        manifest.update(artifact={"path": str(rel), "sha256": sha256_path(artifact)},
                        counts=counts, metrics=metrics, phase="evaluating")
        write_manifest(sdir, manifest)
    if eval_d is not None:
        model = sdir / manifest["artifact"]["path"]
        print(f"[{stage.name}] evaluating {model} on {ctx.eval.limit or 'all'} held-out problems of "
              f"{ctx.eval.task}/{ctx.eval.split} (k={ctx.eval.k}, T={ctx.eval.temperature})...", flush=True)
        res = evaluate_model(str(model), ctx.eval, sdir / "eval.json")
        account("evaluation")
        manifest["eval"] = eval_summary(res)
        print(f"[{stage.name}] held-out pass@1 {100 * res.pass1:.2f}% [{100 * res.pass1_ci[0]:.2f}, "
              f"{100 * res.pass1_ci[1]:.2f}]", flush=True)
    manifest.update(status="complete", phase="complete", finished=_now())
    write_manifest(sdir, manifest)
    return manifest


# ---------------------------------------------------------------- the stage kinds


def _run_eval_stage(stage: Stage, cfg, paths: dict, run_dir: Path, ctx: PipelineContext):
    """An evaluation-only stage: its artifact is the model it read (nothing is trained)."""
    return Path(paths["model"]), {}, {}


def _last_metrics(run_dir: Path, keys: tuple[str, ...], n: int = 5) -> dict[str, Any]:
    """``steps`` and the mean of each of ``keys`` over the last ``n`` rows of ``run_dir/metrics.jsonl``."""
    from r1kit.train.logging import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    out: dict[str, Any] = {"steps": rows[-1]["step"] if rows else 0}
    for key in keys:
        vals = [r[key] for r in rows[-n:] if r.get(key) is not None]
        if vals:
            out[f"train_{key.replace('/', '_')}_last{n}"] = sum(vals) / len(vals)
    return out


def _fresh_or_resume(run_dir: Path) -> bool:
    """Resume when ``run_dir`` holds a complete checkpoint; a run killed before its first checkpoint has
    nothing to resume and is started over (its partial logs removed)."""
    from r1kit.train import checkpoint as ckpt

    if ckpt.list_checkpoints(run_dir):
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return False


def _run_grpo_stage(stage: Stage, cfg, paths: dict, run_dir: Path, ctx: PipelineContext):
    """GRPO from the stage's model (``run_grpo``); resumed from the run's latest checkpoint."""
    from r1kit.train.recipe import run_grpo

    cfg = dataclasses.replace(cfg, model=paths["model"], output=str(run_dir), eval_before=False, eval_after=False)
    if stage.data:
        cfg.task = paths["data0"]
    run_grpo(cfg, resume=_fresh_or_resume(run_dir), progress=ctx.progress)
    metrics = _last_metrics(run_dir, ("reward", "accuracy", "completions/mean_length"))
    return run_dir / "final", {"steps": metrics["steps"]}, metrics


def combine_sft_data(specs: list[str], out: Path, limits: list[int | None] | None = None) -> tuple[Path, list[int]]:
    """Write the SFT rows of every spec (``load_sft_rows``, the first ``limits[j]`` rows of spec j
    when given) into one JSONL file of r1kit's prompt/reasoning/answer layout (ids prefixed with the
    source's index so they stay unique, gold kept); returns (the file, rows per spec). Written
    atomically.

    Raises:
        DataError: from ``load_sft_rows``, or a spec that yields no rows (names it).
    """
    import json

    from r1kit.data.sft_data import load_sft_rows
    from r1kit.errors import DataError
    from r1kit.io import write_atomic

    lines, counts = [], []
    for j, spec in enumerate(specs):
        rows = load_sft_rows(spec, limit=(limits or [None] * len(specs))[j])
        if not rows:
            raise DataError(f"SFT data {spec!r} has no rows: nothing to add to the stage's training data")
        counts.append(len(rows))
        lines += [json.dumps({"id": f"{j}:{r.id}", "prompt": r.prompt, "reasoning": r.reasoning, "answer": r.answer,
                              "gold": r.meta.get("gold")}) for r in rows]
    write_atomic(out, "".join(line + "\n" for line in lines))
    return out, counts


def _run_sft_stage(stage: Stage, cfg, paths: dict, run_dir: Path, ctx: PipelineContext):
    """SFT of the stage's model on its data (``run_sft``); several data specs are combined into one
    file first (``combine_sft_data``); resumed from the run's latest checkpoint."""
    from r1kit.data.sft_data import load_sft_rows
    from r1kit.train.sft import run_sft

    specs = [paths[f"data{j}"] for j in range(len(stage.data))]
    limits = stage.data_limits or [None] * len(specs)
    if len(specs) == 1:
        data, counts = specs[0], [len(load_sft_rows(specs[0], limit=limits[0]))]
        cfg = dataclasses.replace(cfg, max_train_examples=limits[0] or cfg.max_train_examples)
    else:
        data, counts = combine_sft_data(specs, run_dir.parent / "data.jsonl", limits)
    cfg = dataclasses.replace(cfg, model=paths["model"], data=str(data), output=str(run_dir), eval_before=False,
                              eval_after=False)
    run_sft(cfg, resume=_fresh_or_resume(run_dir), progress=ctx.progress)
    metrics = _last_metrics(run_dir, ("loss", "mean_token_accuracy", "examples_dropped"))
    rows = {f"rows from {name}": n for name, n in zip(stage.data, counts)}
    return run_dir / "final", {"steps": metrics["steps"], **rows}, metrics


def _run_sample_stage(stage: Stage, cfg, paths: dict, run_dir: Path, ctx: PipelineContext):
    """Rejection sampling with the stage's model as the teacher (``run_sample``, always with resume: its
    shards are the unit of resume, so a killed stage loses and repeats no sample)."""
    import json

    from r1kit.pipeline.sample import run_sample

    cfg = dataclasses.replace(cfg, teacher=paths["model"], output=str(run_dir))
    if stage.data:
        cfg.task = paths["data0"]
    run_sample(cfg, resume=True, progress=ctx.progress)
    summary = json.loads((run_dir / "manifest.json").read_text())
    counts = {"prompts_sampled": summary["prompts_sampled"], "prompts_decontaminated": summary["prompts_decontaminated"],
              **summary["counts"]}
    return run_dir, counts, {"shards": summary["shards_total"], "decontamination": summary["decontamination"]}


RUNNERS: dict[str, Callable] = {"eval": _run_eval_stage, "grpo": _run_grpo_stage, "sft": _run_sft_stage,
                                "sample": _run_sample_stage}
