"""The GRPO recipe: everything ``r1kit train grpo`` does, in order.

1. seed; load the policy, the training problems and the held-out problems (checked disjoint);
2. build template, verifier, reward functions, rollout engine, trainer (or resume from a checkpoint);
3. evaluate the initial policy (``eval_before``), train, save ``final/``, evaluate again (``eval_after``);
4. write ``eval/report.md`` (``eval_report``: before/after with 95% intervals, read against the
   training split's answer prior; figures in ``eval/report.priors.json``) and ``curves.png``.

Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoint-N/, final/, eval/, curves.png.
Under torchrun (``r1kit.train.distributed``) every rank trains; rank 0 alone evaluates and writes them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from r1kit.config import GRPOConfig
from r1kit.errors import ConfigError, DataError, R1kitError
from r1kit.eval.evaluate import EvalResult, eval_report, evaluate, load_result, markdown_table, save_report, save_result
from r1kit.models.loading import check_output_path, load_policy, resolve_bf16, resolve_dtype, save_pretrained_atomic
from r1kit.runtime import make_engine, make_render, make_verifier
from r1kit.train import checkpoint as ckpt
from r1kit.train import distributed
from r1kit.train.grpo import GRPOTrainer, RewardScorer
from r1kit.train.logging import n_steps, plot_curves
from r1kit.train.loop import apply_lora, merged_for_save


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_disjoint(train, held_out) -> None:
    """Raise DataError if any held-out problem text also appears in the training problems."""
    seen = {e.prompt.strip() for e in train}
    clash = [e.id for e in held_out if e.prompt.strip() in seen]
    if clash:
        raise DataError(f"{len(clash)} evaluation problems also appear in the training data (first: {clash[0]}); "
                        "choose another --eval-split or --eval-task so that no evaluation problem is trained on")


def check_completion_budget(cfg: GRPOConfig, template, tokenizer) -> None:
    """Raise ConfigError when max_completion_length cannot hold even a minimal well-formed answer
    plus the end-of-sequence token."""
    minimal = template.shortest_answer
    need = len(tokenizer(minimal, add_special_tokens=False).input_ids) + 1
    if cfg.max_completion_length < need:
        raise ConfigError(f"max_completion_length={cfg.max_completion_length} is too small for template "
                          f"{cfg.template!r}, whose shortest well-formed answer {minimal!r} needs {need} tokens; "
                          "raise --max-completion-length")


def save_final(policy, tokenizer, run_dir: Path, env: distributed.DistEnv = distributed.DistEnv()) -> bool:
    """Save the trained policy as an HF directory at ``run_dir/final`` atomically (a LoRA policy merged,
    so that ``load_policy`` and the sampling engines load it without PEFT). Under torchrun rank 0
    writes it (an FSDP2 policy gathered whole first, with every rank); returns whether this rank wrote."""
    full = distributed.full_state_dict(policy, env) if env.enabled and env.strategy == "fsdp2" else None
    if env.is_main:
        save_pretrained_atomic(merged_for_save(policy), tokenizer, run_dir / "final", state_dict=full)
    return env.is_main


def run_complete(run_dir: Path, total_steps: int, eval_after: bool) -> bool:
    """Whether ``run_dir`` holds a finished run: ``final/``, a checkpoint at or past ``total_steps``
    and, when ``eval_after`` asks for one, ``eval/report.md``. A run stopped by ``max_train_minutes``
    is not finished: ``--resume`` continues it for another budget."""
    last = ckpt.latest_checkpoint(run_dir)
    return ((run_dir / "final").is_dir() and last is not None and ckpt.checkpoint_step(last) >= total_steps
            and (not eval_after or (run_dir / "eval" / "report.md").is_file()))


def check_run_dir(run_dir: Path, resume: bool, cfg) -> None:
    """The run-directory checks GRPO and SFT share, before any work: refuse an --output that is a file
    (or under one), one holding a run of another kind (``runs.check_run_kind``), a fresh run over one
    that holds checkpoints (R1kitError names --resume) or the metrics.jsonl/samples.jsonl of an earlier
    start that never checkpointed (a fresh start would append to them), a --resume with no complete checkpoint, and a --resume whose ``cfg`` changes a field
    of the run's saved config.yaml that changes the result (``config.check_resume_config``)."""
    from r1kit.config import GRPOConfig, check_resume_config
    from r1kit.runs import check_run_kind

    check_output_path(run_dir, "dir")
    check_run_kind(run_dir, "train grpo" if isinstance(cfg, GRPOConfig) else "train sft")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume and ckpt.list_checkpoints(run_dir):
        raise R1kitError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose another --output")
    logs = [name for name in ("metrics.jsonl", "samples.jsonl") if (run_dir / name).is_file()]
    if logs and not resume:  # an earlier start stopped before its first checkpoint: a fresh one would append
        raise R1kitError(f"{run_dir / logs[0]} holds the steps of an earlier start that stopped before its first "
                         f"checkpoint (nothing to --resume); choose another --output, or remove {run_dir} "
                         f"(or its {' and '.join(logs)}) to start over")
    if resume:  # before any evaluation or directory is made
        resume_checkpoint(run_dir)
        if (run_dir / "config.yaml").is_file():
            check_resume_config(cfg, run_dir / "config.yaml")


def say_complete(run_dir: Path, total_steps: int) -> None:
    print(f"{run_dir} is complete (max_steps={total_steps} reached, final/ written): nothing to resume; "
          "raise --max-steps to train further", flush=True)


def resume_checkpoint(run_dir: Path, checked: bool = False) -> Path:
    """The newest complete checkpoint of ``run_dir``, the one ``--resume`` continues from.

    Raises:
        R1kitError: there is none; ``checked``: ``check_run_dir`` found one before, so it was removed
            since (the error says so).
    """
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        since = " any more (there was one when the run's checks ran: was it removed since?)" if checked else ""
        raise R1kitError(f"--resume: no complete checkpoint in {run_dir}{since}; run without --resume to start it")
    return last


def resume_latest(trainer, run_dir: Path) -> None:
    """Restore ``trainer`` (a ``TrainLoop``) from the newest complete checkpoint of ``run_dir``
    (``check_run_dir`` refused a --resume without one; this guards against one removed since)."""
    last = resume_checkpoint(run_dir, checked=True)
    trainer.resume_from(last)
    print(f"resumed from {last} (step {trainer.step})")


def evaluate_before(run_eval: Callable[[], EvalResult], n: int, k: int, eval_dir: Path) -> EvalResult:
    """The initial policy's held-out result: ``eval/before.json`` when a previous call wrote it, else
    ``run_eval()`` (RNG states restored after, so evaluation does not change what training draws)."""
    if (eval_dir / "before.json").is_file():
        before = load_result(eval_dir / "before.json")
    else:
        print(f"evaluating the initial policy on {n} held-out problems × k={k}...", flush=True)
        rng = ckpt.rng_state()
        before = run_eval()
        ckpt.set_rng_state(rng)
        save_result(before, eval_dir / "before.json")
    print("before training:\n" + markdown_table([("initial policy", before)]))
    return before


def evaluate_after(run_eval: Callable[[], EvalResult], n: int, k: int, eval_dir: Path,
                   before: EvalResult | None, header: str, train_golds: list | None,
                   train_missing: str = "no training split was given") -> EvalResult:
    """Evaluate the trained policy; write ``eval/after.json`` and ``eval/report.md`` (``header``, then
    ``eval_report``: the before/after comparison with its paired interval, or the trained policy's
    table, read against the training golds' answer prior; its figures in ``eval/report.priors.json``)."""
    print(f"evaluating the trained policy on {n} held-out problems × k={k}...", flush=True)
    after = run_eval()
    save_result(after, eval_dir / "after.json")
    report, analysis = eval_report({"before": before, "after": after} if before is not None
                                   else {"trained policy": after}, train_golds, train_missing=train_missing)
    save_report(eval_dir / "report.md", header + report, analysis)
    print(header + report)
    return after


def make_grpo_trainer(cfg: GRPOConfig, train: list, run_dir: Path) -> GRPOTrainer:
    """The policy (LoRA-wrapped when asked), template, verifier, reward functions, rollout engine and the
    trainer of a GRPO run: ``RayGRPOTrainer`` (train/ray_grpo.py) with ``ray``, else ``GRPOTrainer``.
    Every prompt is checked against max_prompt_length before any work (ConfigError names the row)."""
    from r1kit.rewards.functions import build_reward_functions

    verifier = make_verifier(cfg.task, cfg.answer_extraction)
    policy, tokenizer = load_policy(cfg.model, dtype=torch.float32)
    if cfg.use_lora:
        policy = apply_lora(policy, cfg)
    render, template = make_render(cfg.template, tokenizer)
    check_completion_budget(cfg, template, tokenizer)
    reward_fns = build_reward_functions(cfg.reward_funcs, cfg.reward_weights, verifier,
                                        think_in_prompt=template.think_in_prompt)
    rollout_dtype = ((torch.bfloat16 if resolve_bf16(cfg.bf16) else torch.float32) if cfg.rollout_dtype == "auto"
                     else resolve_dtype(cfg.rollout_dtype))
    engine = make_engine(merged_for_save(policy), tokenizer, cfg.rollout_backend, rollout_dtype)
    scorer = RewardScorer(cfg, verifier, reward_fns)
    if cfg.ray:
        from r1kit.train.ray_grpo import RayGRPOTrainer

        trainer = RayGRPOTrainer(cfg, policy, tokenizer, train, render, scorer, engine, run_dir, rollout_dtype)
    else:
        trainer = GRPOTrainer(cfg, policy, tokenizer, train, render, scorer, engine, run_dir)
    for ex in train:
        trainer.prompt_ids(ex)
    return trainer


def run_grpo(cfg: GRPOConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run the GRPO recipe described in the module docstring; returns the run directory. With
    ``resume`` on a finished run (``run_complete``) it says so and returns at once: nothing is
    loaded, trained or rewritten.

    Raises:
        R1kitError (and subclasses): bad config, data or model; TrainingStopped from a guard.
    """
    from r1kit.data.loading import load_task

    cfg.validate()
    env = distributed.init_distributed(cfg.dist_timeout_minutes, cfg.data_parallel)
    if env.enabled and cfg.ray:
        raise ConfigError("--ray and torchrun are two ways to scale one run: launch with one of them (Ray places "
                          "the rollout and reward workers itself)")
    if env.enabled and env.strategy == "fsdp2":
        raise ConfigError("data_parallel=fsdp2 is not yet wired to the GRPO rollout engine (it samples from whole "
                          "weights); use --data-parallel ddp for GRPO runs")
    run_dir = Path(cfg.output)
    check_run_dir(run_dir, resume, cfg)
    if resume and run_complete(run_dir, cfg.max_steps, cfg.eval_after):
        say_complete(run_dir, cfg.max_steps)
        return run_dir
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    train = load_task(cfg.task, cfg.train_split, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field)
    if cfg.max_train_examples:
        train = train[:cfg.max_train_examples]
    eval_task = cfg.eval_task or cfg.task
    held_out = []
    if cfg.eval_before or cfg.eval_after:
        held_out = load_task(eval_task, cfg.eval_split, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                             limit=cfg.eval_limit)
        check_disjoint(train, held_out)
    trainer = make_grpo_trainer(cfg, train, run_dir)
    engine, tokenizer, verifier, render, policy = (trainer.engine, trainer.tokenizer, trainer.scorer.verifier,
                                                   trainer.render, trainer.policy)
    if resume:
        resume_latest(trainer, run_dir)
    eval_dir = run_dir / "eval"

    def run_eval() -> EvalResult:
        return evaluate(engine, tokenizer, held_out, verifier, render, k=cfg.eval_k, temperature=cfg.eval_temperature,
                        top_p=cfg.eval_top_p, max_tokens=cfg.max_completion_length, seed=cfg.seed,
                        task=f"{eval_task}/{cfg.eval_split}", stop=cfg.stop)

    before = (evaluate_before(run_eval, len(held_out), cfg.eval_k, eval_dir)
              if cfg.eval_before and env.is_main else None)
    try:
        trainer.train(progress=progress)
    finally:
        if cfg.ray:
            trainer.close()
    trainer.logger.close()
    if cfg.ray:
        trainer.refresh_local_engine()                  # the driver's engine evaluates the trained policy
    if not save_final(policy, tokenizer, run_dir, env):
        return run_dir
    if cfg.plot and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if cfg.eval_after:
        header = (f"# {cfg.task} GRPO run: held-out evaluation\n\nmodel {cfg.model}, {n_steps(trainer.step)}, "
                  f"template {cfg.template}, eval on {eval_task}/{cfg.eval_split} (never trained on), "
                  f"k={cfg.eval_k}, T={cfg.eval_temperature}, top-p={cfg.eval_top_p}; answer prior from the "
                  f"{len(train)} training problems of {cfg.task}/{cfg.train_split}\n\n")
        evaluate_after(run_eval, len(held_out), cfg.eval_k, eval_dir, before, header, [e.gold for e in train])
    return run_dir
