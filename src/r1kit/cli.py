"""``r1kit`` command line.

  r1kit train grpo --preset cpu_demo --output runs/demo [--config c.yaml] [--<field> value ...] [--resume]
  r1kit train grpo --preset cpu_demo [--<field> value ...] --print-config
  r1kit train sft --preset cpu_sft_demo --output runs/sft [--data FILE|DIR|gsm8k] [--<field> value ...] [--resume]
  r1kit train grpo|sft ... --nproc N [--master-port P]   (execs torchrun --nproc-per-node N -m r1kit train ...)
  r1kit eval --model M --task T [--k K] [--limit N] [--output DIR] [--resume]   (pass@1 against answer priors)
  r1kit pretrain v3-zero --output DIR [--max-seconds 600] [--grpo-steps 100]
  r1kit pretrain v3-distill --output DIR [--preset cpu|chain] [--student-seconds 180] [...]
  r1kit export MODEL --format gguf|hf [--dtype f16|bf16|q8_0 | fp32|bf16|fp16] --output PATH
  r1kit pipeline r1 --preset cpu_r1 | --config FILE [--from STAGE] [--until STAGE] [--output DIR] [--<field> V]
  r1kit distill --teacher T --student S --task X [--output DIR] [...]
  r1kit sample --teacher M --task T --num-samples N --output DIR [--teacher-url URL] [--<field> value ...]
  r1kit serve MODEL [--host 127.0.0.1] [--port 8000] [--think] [--max-num-seqs 32] [--max-model-len 2048]
  r1kit tasks

Bad input (R1kitError) prints one ``error:`` line and exits with status 2; a guard stop exits with 3; the
system failing mid-run (an OSError such as a full disk) prints one ``error:`` line and exits with 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from r1kit.errors import R1kitError, TrainingStopped


def _train(args: argparse.Namespace, cls: type, run, default_output: str) -> int:
    """``r1kit train grpo|sft``: resolve the config (a --resume without --preset/--config reuses the run's
    config.yaml, once ``runs.check_run_kind`` has found a run of this kind there), print it or run
    ``run(cfg, resume, progress)``."""
    import os

    from r1kit.config import config_yaml, load_config, overrides_from_args
    from r1kit.runs import check_run_kind
    from r1kit.train import distributed

    overrides = overrides_from_args(args)
    if args.resume and not args.config and not args.preset:
        saved = Path(overrides.get("output", default_output)) / "config.yaml"
        check_run_kind(saved.parent, f"train {args.algo}")  # an SFT run's config.yaml is no GRPO config
        if saved.is_file():
            args.config = str(saved)
    cfg = load_config(args.preset, args.config, overrides, cls=cls)
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        argv = distributed.torchrun_argv(_without_launcher_flags(args.argv), args.nproc, args.master_port)
        if not args.print_config:
            cfg.check_world_size(args.nproc)  # once, here, rather than on every rank after torchrun starts
            sys.stdout.flush()
            os.execv(argv[0], argv)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    run_dir = run(cfg, resume=args.resume, progress=not args.no_progress)
    if distributed.current().is_main:
        print(f"run directory: {run_dir}")
    distributed.shutdown()
    return 0


def _without_launcher_flags(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` and ``--master-port P`` (also in ``--flag=value`` form)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--master-port"):
            skip = True
        elif not a.startswith(("--nproc=", "--master-port=")):
            out.append(a)
    return out


def _train_grpo(args: argparse.Namespace) -> int:
    from r1kit.config import GRPOConfig
    from r1kit.train.recipe import run_grpo

    return _train(args, GRPOConfig, run_grpo, "runs/grpo")


def _train_sft(args: argparse.Namespace) -> int:
    from r1kit.config import SFTConfig
    from r1kit.train.sft import run_sft

    return _train(args, SFTConfig, run_sft, "runs/sft")


def _check_eval_args(args: argparse.Namespace) -> None:
    """Raise R1kitError naming the flag when --k, --limit or --max-tokens is not a positive count, when
    --temperature or --top-p is out of range (``rollout.base.check_sampling``), --dtype is not one of
    ``ENGINE_DTYPES`` (``models.loading.check_engine_dtype``), or when the report
    directory (--output, else the default ``eval_output``) is an existing file or cannot be created or
    written (``models.loading.check_output_path``), before any work (no data read, no model loaded)."""
    from r1kit.models.loading import check_engine_dtype, check_output_path
    from r1kit.rollout.base import check_sampling

    for flag, value in (("--k", args.k), ("--limit", args.limit), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise R1kitError(f"{flag} must be >= 1, got {value}")
    check_sampling(args.temperature, args.top_p, names=("--temperature", "--top-p", ""))
    check_engine_dtype(args.dtype)
    check_output_path(eval_output(args), "dir")


def eval_output(args: argparse.Namespace) -> Path:
    """The directory ``r1kit eval`` writes its reports to: --output, else ``<model>/eval`` for a model
    directory, else runs/eval."""
    if args.output:
        return Path(args.output)
    return Path(args.model) / "eval" if Path(args.model).is_dir() else Path("runs/eval")


def report_name(task: str, split: str, k: int) -> str:
    """File name (no suffix) of an eval report: ``<file stem>_k<k>`` for a local task file (it has no
    split), else ``<task>_<split>_k<k>`` with ``/`` in a hub name replaced by ``_``."""
    from r1kit.data.rows import FILE_SUFFIXES

    if task.endswith(FILE_SUFFIXES):
        return f"{Path(task).stem}_k{k}"
    return f"{task.replace('/', '_')}_{split}_k{k}"


def prior_golds(args: argparse.Namespace, run_cfg: dict) -> tuple[list[str] | None, str]:
    """The gold answers the answer prior is taken from, and where from (or why there are none): the
    training problems of the r1kit run being evaluated (its config.yaml), else the ``train`` split of
    the evaluated task. A local file is one split, so it has none; neither has an unreachable hub."""
    from r1kit.data.loading import load_task
    from r1kit.data.rows import FILE_SUFFIXES
    from r1kit.errors import DataError

    if run_cfg.get("task"):
        task, split = run_cfg["task"], run_cfg.get("train_split", "train")
        kw = {"prompt_field": run_cfg.get("prompt_field"), "answer_field": run_cfg.get("answer_field")}
    elif args.task.endswith(FILE_SUFFIXES):
        return None, f"{args.task} is a local file, which has no training split to take the answer prior from"
    else:
        task, split, kw = args.task, "train", {"prompt_field": args.prompt_field, "answer_field": args.answer_field}
    try:
        train = load_task(task, split, **kw)
    except DataError as err:
        return None, f"the training split could not be read ({err})"
    if run_cfg.get("max_train_examples"):
        train = train[:run_cfg["max_train_examples"]]
    return [e.gold for e in train], f"{len(train)} training problems of {task}/{split}"


def _eval(args: argparse.Namespace) -> int:
    """``r1kit eval``: per-problem records go to ``<report>.partial.jsonl`` as problems finish
    (``PartialRecords``); the reports are written atomically at the end and the partial file removed.
    An interrupted run says how many problems it kept and where; ``--resume`` reuses them."""
    import torch
    import yaml

    from r1kit.config import load_config
    from r1kit.data.loading import load_task
    from r1kit.eval.evaluate import PartialRecords, eval_report, evaluate, save_report, save_result
    from r1kit.models.loading import load_policy, resolve_dtype
    from r1kit.runtime import describe_engine, make_engine, make_render, make_verifier

    _check_eval_args(args)
    run_cfg = {}
    cfg_path = Path(args.model) / "config.yaml"
    if cfg_path.is_file():  # an r1kit run: default to the template, extraction and stops it was trained with
        run_cfg = yaml.safe_load(cfg_path.read_text()) or {}
    template = args.template or run_cfg.get("template", "chat_boxed")
    max_tokens = (args.max_tokens if args.max_tokens is not None          # GRPO runs, then SFT runs, then 512
                  else run_cfg.get("max_completion_length", run_cfg.get("eval_max_tokens", 512)))
    extraction = args.answer_extraction or run_cfg.get("answer_extraction", "tagged")
    stop = load_config(overrides={"stop": args.stop}).stop if args.stop is not None else run_cfg.get("stop") or []
    out = eval_output(args)
    name = report_name(args.task, args.split, args.k)
    partial = PartialRecords(out / f"{name}.partial.jsonl", {
        "model": str(args.model), "task": args.task, "split": args.split, "prompt_field": args.prompt_field,
        "answer_field": args.answer_field, "template": template, "answer_extraction": extraction, "k": args.k,
        "temperature": args.temperature, "top_p": args.top_p, "max_tokens": max_tokens, "seed": args.seed,
        "stop": list(stop), "backend": args.backend, "dtype": args.dtype})
    if partial.path.exists() and not args.resume:
        raise R1kitError(f"{partial.path} holds the records of an interrupted evaluation: pass --resume to reuse "
                         "them, or delete it to start over")
    done = partial.load() if args.resume and partial.path.exists() else []
    torch.manual_seed(args.seed)
    examples = load_task(args.task, args.split, prompt_field=args.prompt_field, answer_field=args.answer_field,
                         limit=args.limit)                     # data errors before the model loads
    if not examples:
        raise R1kitError(f"task {args.task!r} split {args.split!r} has no problems to evaluate")
    ids = {e.id for e in examples}
    done = [row for row in done if row["id"] in ids]
    model, tok = load_policy(args.model, dtype=torch.float32)
    render, _ = make_render(template, tok)
    verifier = make_verifier(args.task, extraction)
    dtype = resolve_dtype(args.dtype)
    engine = make_engine(model, tok, args.backend, dtype)
    print(f"r1kit eval: {args.model} on {describe_engine(engine)}", flush=True)
    resumed = f", {len(done)} reused from {partial.path}" if done else ""
    print(f"evaluating {len(examples)} problems × k={args.k} (template {template}, max {max_tokens} "
          f"tokens{resumed})...", flush=True)
    partial.start(done)
    try:
        res = evaluate(engine, tok, examples, verifier, render, k=args.k, temperature=args.temperature,
                       top_p=args.top_p, max_tokens=max_tokens, seed=args.seed, task=f"{args.task}/{args.split}",
                       stop=stop, done=done, on_problem=partial.append)
    except KeyboardInterrupt:
        print(f"interrupted: {partial.count} of {len(examples)} problems done, their records are in {partial.path} "
              "(rerun with --resume to continue)", file=sys.stderr)
        return 130
    finally:
        partial.close()
    golds, source = prior_golds(args, run_cfg)
    table, analysis = eval_report({str(args.model): res}, golds, train_missing=source)
    if golds is not None:
        table += f"\nanswer prior from the {source}.\n"
    print(table)
    save_result(res, out / f"{name}.json")
    save_report(out / f"{name}.md", table, analysis)
    partial.path.unlink()
    print(f"wrote {out / (name + '.json')}, {name}.md and {name}.priors.json")
    return 0


def _pretrain_v3_zero(args: argparse.Namespace) -> int:
    from r1kit.train.v3_zero import V3ZeroConfig, run_v3_zero

    run_v3_zero(V3ZeroConfig(output=args.output, max_seconds=args.max_seconds, pretrain_steps=args.pretrain_steps,
                             grpo_steps=args.grpo_steps,
                             preset=args.preset, batch_size=args.batch_size, eval_limit=args.eval_limit,
                             seed=args.seed, threads=args.threads, progress=not args.no_progress))
    print(f"run directory: {args.output} (report.md, report.png)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from r1kit.serve.app import ServeConfig, serve

    serve(ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)}))
    return 0


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default appended, unless its help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def _add_serve_parser(sub) -> None:
    from dataclasses import fields

    from r1kit.serve.app import ServeConfig
    from r1kit.serve.runner import SERVE_BACKENDS, SERVE_DTYPES

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                        description="OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, "
                                    "/health) with the reasoning in reasoning_content; see r1kit/serve/app.py.",
                        formatter_class=_DefaultsFormatter)
    sv.add_argument("model", help="HF dir, .gguf, r1kit run dir, or smollm2-135m-instruct")
    helps = {
        "served_model_name": "the model name clients send (default: MODEL as given)",
        "host": "interface to bind", "port": "TCP port (0 = a free one)",
        "max_num_seqs": "engine slots: sequences decoded together",
        "max_model_len": "prompt + completion tokens per sequence (sizes the KV cache)",
        "max_num_batched_tokens": "tokens per engine step, decodes included: prompts are prefilled in chunks so "
                                  "running streams keep flowing (chunked prefill); 0 = whole prompts",
        "max_queue": "sequences that may wait for a slot; beyond that, 503",
        "max_n": "the largest n a request may ask for",
        "think": "the R1 setting: prefill '<think>\\n' and fold system messages into the user turn",
        "shutdown_timeout": "seconds requests in flight get to finish after SIGTERM",
        "dtype": f"engine weights, one of {', '.join(SERVE_DTYPES)} (auto: bf16 where the CPU has native bf16)",
        "backend": f"one of {', '.join(SERVE_BACKENDS)} (auto: r1kit's engine when the model has an adapter, else hf)",
    }
    for f in fields(ServeConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            sv.add_argument(flag, action="store_true", help=helps[f.name])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            sv.add_argument(flag, type=kind, default=f.default, help=helps[f.name])
    sv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    sv.set_defaults(func=_serve)



def _export(args: argparse.Namespace) -> int:
    from r1kit.models.export import export_model

    out = export_model(args.model, args.format, args.output, args.dtype)
    print(f"wrote {out}")
    return 0


def _pretrain_v3_distill(args: argparse.Namespace) -> int:
    from r1kit.train.v3_distill import PRESETS, V3DistillConfig, run_v3_distill

    values = {**PRESETS[args.preset]}
    for f in dataclasses.fields(V3DistillConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("student_overrides", "model_overrides", "progress"):
            values[f.name] = value
    report = run_v3_distill(V3DistillConfig(**values, progress=not args.no_progress))
    print(f"report: {report} (report.png beside it, one manifest.json per stage)")
    return 0


def _run_stages(args: argparse.Namespace, load, run, what: str) -> int:
    """Shared body of ``r1kit pipeline r1`` and ``r1kit distill``: resolve the config (preset, YAML,
    flags), print it with --print-config, else run the stages between --from and --until."""
    from r1kit.pipeline.config import pipeline_overrides_from_args

    cfg = load(args.preset, args.config, pipeline_overrides_from_args(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    out = run(cfg, from_stage=args.from_stage, until_stage=args.until_stage, progress=not args.no_progress)
    print(f"{what} directory: {out} (report.md, report.png, one manifest.json per stage)")
    return 0


def _pipeline_r1(args: argparse.Namespace) -> int:
    from r1kit.pipeline.r1 import load_r1_config, run_r1_pipeline

    return _run_stages(args, load_r1_config, run_r1_pipeline, "pipeline")


def _distill(args: argparse.Namespace) -> int:
    from r1kit.pipeline.distill import load_distill_config, run_distill

    return _run_stages(args, load_distill_config, run_distill, "distillation")


def _pipeline_flags(p: argparse.ArgumentParser, presets: list[str], cls: type) -> None:
    """The flags ``r1kit pipeline r1`` and ``r1kit distill`` share, and one per plain config field."""
    from r1kit.pipeline.config import add_pipeline_arguments

    p.add_argument("--preset", help=f"named pipeline preset: {', '.join(presets)}")
    p.add_argument("--config", help="YAML file of pipeline fields and stage sections")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage (earlier stages "
                   "must be complete)")
    p.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage")
    p.add_argument("--print-config", action="store_true", help="print the resolved pipeline config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    add_pipeline_arguments(p, cls)


def _sample(args: argparse.Namespace) -> int:
    import json

    from r1kit.pipeline.sample import config_from_args, run_sample

    out = run_sample(config_from_args(args), resume=not args.no_resume, progress=not args.no_progress)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    print(f"kept {counts['kept']} of {counts['sampled']} samples; output: {out} (shards/, manifest.json, dropped/)")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from r1kit.data.base import task_names, task_verifier

    for name in task_names():
        print(f"{name:16s} verifier={task_verifier(name)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands refuse flags they do not know themselves, with their own usage
    (``r1kit train sft: error: unrecognized arguments: --bogus 1``). Plain argparse hands a subparser's
    leftovers up to the top-level parser, whose usage names no subcommand's flags. ``add_subparsers``
    makes every subparser of this class."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from r1kit.config import GRPOConfig, SFTConfig, add_config_arguments, preset_names
    from r1kit.train.v3_zero import V3ZeroConfig as V3ZeroDefaults

    p = _Parser(prog="r1kit", description="Reproduce DeepSeek-R1: GRPO on verified rewards, evaluation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy")
    tsub = train.add_subparsers(dest="algo", required=True)
    grpo = tsub.add_parser(
        "grpo", help="GRPO on rule-verified rewards",
        description="GRPO training. Every config field is a --flag; see r1kit/config.py. The defaults shown are "
                    "the base GRPOConfig values: --preset overrides them, --config overrides the preset, and "
                    "--flags override both.",
        epilog=f"presets: {', '.join(preset_names())}. `r1kit train grpo --preset P [--flags] --print-config` "
               "prints the resolved config.")
    sft = tsub.add_parser(
        "sft", help="supervised fine-tuning on reasoning traces (completion-only loss)",
        description="SFT on (prompt, reasoning, answer) rows: chat/prompt-completion files, sampler output, "
                    "gsm8k worked solutions, HF datasets. Every config field is a --flag; see SFTConfig in "
                    "r1kit/config.py. The defaults shown are the base SFTConfig values: --preset overrides them, "
                    "--config overrides the preset, and --flags override both.",
        epilog=f"presets: {', '.join(preset_names(SFTConfig))}. `r1kit train sft --preset P [--flags] "
               "--print-config` prints the resolved config.")
    for parser, cls, func in ((grpo, GRPOConfig, _train_grpo), (sft, SFTConfig, _train_sft)):
        parser.add_argument("--preset",
                            help=f"named preset applied before --config and flags: {', '.join(preset_names(cls))}")
        parser.add_argument("--config", help="YAML file of config fields")
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output (without --preset/--config: with "
                                 "its config.yaml); a flag that changes the result is refused, config.py "
                                 "RESUME_FIELDS lists what may change")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config (defaults, preset, --config, flags) as YAML and exit; "
                                 "loads no model")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--nproc", type=int, default=None,
                            help="data-parallel processes on this machine: execs `torchrun --nproc-per-node N -m "
                                 "r1kit` with the other arguments (gloo on CPU, NCCL on GPU; docs/SCALE.md)")
        parser.add_argument("--master-port", type=int, default=29500, help="rendezvous port for --nproc")
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        add_config_arguments(parser, cls)
        parser.set_defaults(func=func)

    ev = sub.add_parser("eval", help="evaluate a model (R1 protocol: pass@1 over k samples, maj@k)")
    ev.add_argument("--model", required=True, help="HF dir, .gguf, r1kit run dir, or smollm2-135m-instruct")
    ev.add_argument("--task", required=True, help="task name (see `r1kit tasks`) or a local .jsonl/.parquet")
    ev.add_argument("--split", default="test")
    ev.add_argument("--k", type=int, default=1, help="samples per problem (pass@1 = their mean)")
    ev.add_argument("--limit", type=int, default=None, help="first N problems only")
    ev.add_argument("--temperature", type=float, default=0.6)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--max-tokens", type=int, default=None,
                    help="completion tokens at most (default: the run's max_completion_length, else 512)")
    ev.add_argument("--template", default=None, help="prompt template (default: the run's, else chat_boxed)")
    ev.add_argument("--stop", default=None,
                    help="stop strings, comma-separated, '\\n' = newline (default: the run's, else none)")
    ev.add_argument("--answer-extraction", default=None, choices=["tagged", "any"])
    ev.add_argument("--prompt-field", default=None)
    ev.add_argument("--answer-field", default=None)
    ev.add_argument("--backend", default="auto", choices=["auto", "engine", "hf", "vllm"])
    ev.add_argument("--dtype", default="auto",
                    help="sampling dtype: auto (bf16 only where the CPU has native bf16), bf16 or fp32")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output", default=None, help="directory for the JSON and markdown report")
    ev.add_argument("--resume", action="store_true",
                    help="reuse the problems an interrupted run with the same arguments finished: their records "
                         "are appended to <report>.partial.jsonl in the output directory as each problem is "
                         "scored (removed once the reports are written). The rest are sampled in a call of their "
                         "own, so at temperature > 0 their samples differ from an uninterrupted run's")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    ev.set_defaults(func=_eval)

    pre = sub.add_parser("pretrain", help="pretrain a model from scratch")
    psub = pre.add_subparsers(dest="recipe", required=True)
    zero = psub.add_parser("v3-zero", help="R1-Zero in miniature: a tiny DeepSeek-V3 MoE pretrained on generated "
                           "arithmetic, then GRPO with the exact-answer reward, with a report",
                           formatter_class=_DefaultsFormatter)
    d = V3ZeroDefaults()
    zero.add_argument("--output", required=True, help="run directory (must be empty or absent)")
    zero.add_argument("--max-seconds", type=float, default=d.max_seconds, help="pretraining budget in CPU seconds of this process (wall seconds on an idle core)")
    zero.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                      help="pretraining optimizer steps at most (the time budget usually ends it first)")
    zero.add_argument("--grpo-steps", type=int, default=d.grpo_steps, help="GRPO steps after pretraining")
    zero.add_argument("--preset", default=d.preset, help="DeepSeek-V3 model preset (r1kit/models/presets)")
    zero.add_argument("--batch-size", type=int, default=d.batch_size, help="pretraining problems per step")
    zero.add_argument("--eval-limit", type=int, default=d.eval_limit, help="held-out problems evaluated before/after")
    zero.add_argument("--seed", type=int, default=d.seed)
    zero.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    zero.add_argument("--no-progress", action="store_true", help="no progress bar")
    zero.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    zero.set_defaults(func=_pretrain_v3_zero)

    from r1kit.train.v3_distill import PRESETS as V3_DISTILL_PRESETS
    from r1kit.train.v3_distill import V3DistillConfig

    dist = psub.add_parser("v3-distill", help="R1's distillation claim in miniature: a V3 teacher pretrained and "
                           "GRPO-trained, sampled and verified; a smaller V3 student gets SFT on its samples or "
                           "GRPO alone for the same CPU time; held-out report", )
    dist.add_argument("--output", required=True, help="run directory (a rerun skips what is done)")
    dist.add_argument("--preset", default="cpu", choices=sorted(V3_DISTILL_PRESETS), help="budget preset")
    for f in dataclasses.fields(V3DistillConfig):
        if f.name in ("output", "preset", "student_overrides", "model_overrides", "progress"):
            continue
        kind = {"float": float, "int": int, "int | None": int,
                "bool": lambda v: {"true": True, "false": False}[v.lower()]}.get(str(f.type), str)
        dist.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                          help=f"default {f.default!r} (train/v3_distill.py: V3DistillConfig)")
    dist.add_argument("--no-progress", action="store_true", help="no progress bars")
    dist.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    dist.set_defaults(func=_pretrain_v3_distill)

    _add_serve_parser(sub)

    ex = sub.add_parser("export", help="write a model as GGUF (llama.cpp, Ollama) or an HF directory (transformers, vLLM)")
    ex.add_argument("model", help="HF dir, .gguf, r1kit run dir, or smollm2-135m-instruct")
    ex.add_argument("--format", required=True, help="gguf (Llama-family models) or hf (safetensors, every model)")
    ex.add_argument("--dtype", default=None,
                    help="gguf: f16 (default), bf16 or q8_0 for the 2-D weights; hf: fp32 (default), bf16 or fp16")
    ex.add_argument("--output", required=True, help="the .gguf file or HF directory to write (replaced atomically)")
    ex.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    ex.set_defaults(func=_export)

    pipe = sub.add_parser("pipeline", help="multi-stage pipelines")
    pipesub = pipe.add_subparsers(dest="pipeline", required=True)
    from r1kit.pipeline.distill import PRESETS as DISTILL_PRESETS
    from r1kit.pipeline.distill import DistillConfig
    from r1kit.pipeline.r1 import R1PipelineConfig
    from r1kit.pipeline.r1 import preset_names as r1_presets

    r1 = pipesub.add_parser(
        "r1", help="the four-stage DeepSeek-R1 pipeline: cold-start SFT, reasoning RL, rejection sampling + "
                   "SFT from the base, final RL; one report",
        description="The R1 pipeline (r1kit/pipeline/r1.py). Each stage is a directory with manifest.json; a "
                    "rerun skips finished stages and resumes an interrupted one. Stages: base, cold_start, "
                    "reasoning_rl, rejection_sampling, rejection_sft, final_rl (or the paper's numbers 0-4).")
    _pipeline_flags(r1, r1_presets(), R1PipelineConfig)
    r1.set_defaults(func=_pipeline_r1)

    dist = sub.add_parser(
        "distill", help="sample a teacher, keep its verified samples, fine-tune a student on them, evaluate",
        description="Distillation (r1kit/pipeline/distill.py): stages student (eval), teacher (eval), samples, "
                    "distill (SFT); each a directory with manifest.json, reruns skip and resume. Stage "
                    "sections samples: (SampleConfig) and distill: (SFTConfig) go in --config.")
    _pipeline_flags(dist, sorted(DISTILL_PRESETS), DistillConfig)
    dist.set_defaults(func=_distill)
    from r1kit.pipeline.sample import PRESETS as SAMPLE_PRESETS, add_sample_arguments

    smp = sub.add_parser(
        "sample", help="rejection sampling: a teacher's verified, filtered, decontaminated completions",
        description="Rejection sampling (R1 §2.3.3): N completions per prompt from a teacher (a model r1kit loads, "
                    "or --teacher-url, an OpenAI-compatible endpoint), kept when the task's verifier accepts them and "
                    "the readability, dedup and decontamination checks pass. Every SampleConfig field is a --flag "
                    "(r1kit/pipeline/sample.py). A rerun with the same --output resumes.",
        epilog=f"presets: {', '.join(sorted(SAMPLE_PRESETS))}")
    smp.add_argument("--preset", default=None, help=f"named preset applied before the flags: {', '.join(sorted(SAMPLE_PRESETS))}")
    smp.add_argument("--no-resume", action="store_true", help="refuse an --output that already holds a run")
    smp.add_argument("--no-progress", action="store_true", help="no per-shard progress lines")
    smp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    add_sample_arguments(smp)
    smp.set_defaults(func=_sample)

    tasks = sub.add_parser("tasks", help="list registered tasks")
    tasks.set_defaults(func=_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except TrainingStopped as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3
    except R1kitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort for the environment failing mid-run (a full disk): exit 1, no traceback
        line = os_error_line(e)
        if line is None or args.debug:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


def os_error_line(err: BaseException) -> str | None:
    """The one ``error:`` line for an OSError raised mid-run (a full disk, errno 28; a read-only mount) or
    a safetensors SafetensorError that says "No space left", naming the file and the OS message (None
    for any other exception: a bug keeps its traceback). The claim about what was already written holds
    because artifacts and checkpoints go through ``r1kit.io.atomic_file``/``atomic_dir``, which remove
    their temporary on an error and leave the previous artifact in place."""
    from safetensors import SafetensorError

    if isinstance(err, OSError):
        where = f" on {err.filename}" if err.filename else ""
        what = f"{err.strerror} (errno {err.errno})" if err.strerror else str(err)
    elif isinstance(err, SafetensorError) and "No space left" in str(err):
        where, what = " writing safetensors", str(err)
    else:
        return None
    return (f"the system failed{where}: {what}; artifacts and checkpoints are written atomically, so none "
            f"already written was changed; fix the cause and rerun (a training run: with --resume)")


if __name__ == "__main__":
    sys.exit(main())
