"""R1-Zero in miniature, from scratch: pretrain a tiny DeepSeek-V3 MoE on generated arithmetic, then
run GRPO on it with a rule reward, and report what each stage did.

``r1kit pretrain v3-zero --output DIR`` runs, in order:

1. pretraining (``r1kit.models.v3_pretrain``): next-token + λ·MTP + α·balance loss with the
   aux-loss-free router-bias update, for at most ``max_seconds`` of CPU time, on the train split of
   ``arithmetic`` (``"37+48=85"``) → ``DIR/pretrained/`` (V3 checkpoint, character tokenizer,
   ``history.json``);
2. GRPO through the normal recipe (``r1kit.train.recipe.run_grpo``): rollouts on the absorbed-MLA
   cache, the exact-answer reward from the math verifier, the router bias frozen (γ = 0, as the V3
   report ends pretraining; expert load still logged every step), held-out evaluation before and after on the test split (never trained on, never
   pretrained on) → ``DIR`` is the GRPO run directory (``metrics.jsonl``, ``final/``, ``eval/``);
3. the report: ``DIR/report.md``, ``report.json`` and ``report.png`` (pretraining loss curve, expert
   load balance through both stages, GRPO reward, held-out accuracy before/after with 95% CIs).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1kit.config import load_config
from r1kit.errors import ConfigError
from r1kit.eval.evaluate import EvalResult, load_result, paired_difference
from r1kit.models.loading import load_policy, save_pretrained_atomic
from r1kit.models.v3_pretrain import PretrainConfig, char_tokenizer, heldout_accuracy, pretrain
from r1kit.train.logging import n_steps, read_metrics
from r1kit.train.recipe import run_grpo

# The GRPO stage: exact-answer reward on bare "a±b=" prompts, G=8, DAPO's token-mean loss with
# clip-higher, no KL; fp32 (the CPU path). Evaluation: R1 protocol (T 0.6, top-p 0.95), k=4.
# Settings chosen on the training reward only (T=1, never on the held-out problems), GRPO runs of
# 100-200 steps on one 600-CPU-second checkpoint at ~0.47 train reward:
#   * router bias frozen (γ = 0), as DeepSeek-V3 ends pretraining (γ = 0 for the last 500B tokens): with
#     γ = 0.001 and lr = 0 the bias drift alone took the train reward from 0.47 to 0.30 in 200 steps;
#   * lr 3e-4 collapsed the policy (reward 0.42 → 0.06 in 200 steps, warmup or not); 1e-4 with 16
#     prompts per step stayed flat; 1e-4 with 64 prompts per step (and 10 warmup steps) rose
#     0.50 → 0.54 over 100 steps: larger batches, smaller steps.
GRPO_SETTINGS: dict[str, Any] = dict(
    task="arithmetic", template="bare", answer_extraction="any", reward_funcs=["accuracy"],
    num_generations=8, prompts_per_step=64, max_prompt_length=16, max_completion_length=6, temperature=1.0,
    learning_rate=1e-4, warmup_steps=10, lr_scheduler="constant", beta=0.0, loss_type="dapo", epsilon=0.2,
    epsilon_high=0.28, micro_batch_size=512, bf16="false", router_bias_update_speed=0.0, eval_before=True, eval_after=True,
    eval_limit=400, eval_k=4, save_steps=0, log_completions_steps=10,
)


@dataclass
class V3ZeroConfig:
    """What ``run_v3_zero`` runs; GRPO fields not listed here are ``GRPO_SETTINGS``."""

    output: str = "runs/v3-zero"  # run directory (must be empty or absent)
    max_seconds: float = 600.0  # pretraining budget, CPU seconds of this process (one thread: one core's time)
    pretrain_steps: int = 100_000  # pretraining optimizer steps at most (the time budget usually ends it first)
    grpo_steps: int = 100  # GRPO steps (generation rounds of prompts_per_step × G completions)
    preset: str = "tiny-2m"  # model shape (models/presets)
    batch_size: int = 64  # pretraining problems per optimizer step
    eval_limit: int = 400  # held-out test problems evaluated before and after GRPO
    seed: int = 0
    threads: int | None = 1  # torch intra-op threads (1 is fastest on a shared 2-core machine)
    progress: bool = True  # GRPO progress bar
    model_overrides: dict = dataclasses.field(default_factory=dict)  # DeepseekV3Config fields (tests)

    def validate(self) -> None:
        """Raise ConfigError naming the field for a budget that is not a finite number > 0, a count
        below 1, an unknown model preset, or an ``output`` that is a file or a non-empty directory;
        called before any work."""
        out = check_pretrain_settings(self, "preset", seconds=("max_seconds",),
                                      counts=("pretrain_steps", "grpo_steps", "batch_size", "eval_limit", "threads"))
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty; choose a new --output for a from-scratch run")


def check_pretrain_settings(cfg: Any, preset_field: str, seconds: tuple[str, ...], counts: tuple[str, ...]) -> Path:
    """The checks ``V3ZeroConfig`` and ``V3DistillConfig`` share (``check_budgets_and_counts``, a seed
    >= 0, a known ``models/presets`` name in ``preset_field``, ``cfg.output`` not a file); returns
    ``cfg.output`` as a Path.

    Raises:
        ConfigError: naming the field.
    """
    from r1kit.config import check_budgets_and_counts
    from r1kit.models.deepseek_v3 import DeepseekV3Config
    from r1kit.models.loading import check_output_path

    check_budgets_and_counts(cfg, seconds, counts)
    if cfg.seed < 0:
        raise ConfigError(f"seed must be >= 0, got {cfg.seed}")
    try:
        DeepseekV3Config.preset(getattr(cfg, preset_field))
    except ConfigError as err:
        raise ConfigError(f"{preset_field}: {err}") from None
    return check_output_path(cfg.output, "dir")


def run_v3_zero(cfg: V3ZeroConfig) -> dict[str, Any]:
    """Run the three stages of the module docstring; returns the report dict (also in report.json).

    Raises:
        ConfigError: from ``V3ZeroConfig.validate`` (before any work).
    """
    cfg.validate()
    out = Path(cfg.output)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = char_tokenizer()
    pre_cfg = PretrainConfig(preset=cfg.preset, steps=cfg.pretrain_steps, max_seconds=cfg.max_seconds,
                             batch_size=cfg.batch_size, seed=cfg.seed, overrides=cfg.model_overrides)
    print(f"pretraining {cfg.preset} for at most {cfg.max_seconds:.0f} CPU seconds...", flush=True)
    model, history = pretrain(pre_cfg, tok)
    history["heldout_greedy_accuracy"] = heldout_accuracy(model, tok, cfg.eval_limit)
    pretrained = save_pretrained_atomic(model, tok, out / "pretrained")
    (pretrained / "history.json").write_text(json.dumps(history))
    print(f"pretrained {n_steps(history['steps'])} in {history['cpu_seconds']:.0f} CPU s: lm loss {history['lm'][0]:.3f} → "
          f"{history['lm'][-1]:.3f}, held-out greedy accuracy {history['heldout_greedy_accuracy']:.3f}", flush=True)

    grpo_cfg = load_config(overrides={**GRPO_SETTINGS, "model": str(pretrained), "output": str(out),
                                      "max_steps": cfg.grpo_steps, "seed": cfg.seed, "eval_limit": cfg.eval_limit,
                                      "num_threads": cfg.threads})
    run_grpo(grpo_cfg, progress=cfg.progress)
    trained, _ = load_policy(str(out))
    report = build_report(history, read_metrics(out / "metrics.jsonl"), load_result(out / "eval" / "before.json"),
                          load_result(out / "eval" / "after.json"), heldout_accuracy(trained, tok, cfg.eval_limit))
    report["settings"] = {"v3_zero": dataclasses.asdict(cfg), "pretrain": dataclasses.asdict(pre_cfg),
                          "grpo": grpo_cfg.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    plot_report(history, read_metrics(out / "metrics.jsonl"), report, out / "report.png")
    print(report_markdown(report), flush=True)
    return report


def mean_of(values: list[float], n: int = 10, last: bool = False) -> float:
    """Mean of the first (or last) ``n`` values (fewer when the list is shorter)."""
    part = values[-n:] if last else values[:n]
    return sum(part) / len(part)


def layer_label(layer: str, history: dict) -> str:
    """``"layer4"`` → ``"layer4 (MTP)"`` for the MTP modules' layers."""
    return f"{layer} (MTP)" if layer in history["mtp_layers"] else layer


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values, one per value."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def build_report(history: dict, grpo_rows: list[dict], before: EvalResult, after: EvalResult,
                 greedy_after: float) -> dict[str, Any]:
    """The measured numbers: pretraining loss start/end (mean of the first/last 10 steps, nats per
    token), per-layer expert load max/mean at the start and end of pretraining and GRPO, GRPO train
    reward over the first/last 5 steps, held-out pass@1 before/after with 95% CIs and the paired
    difference, and greedy held-out accuracy before/after."""
    def load_at(rows: list[dict], last: bool) -> dict[str, float]:
        keys = sorted({k for r in rows for k, v in r.items() if k.endswith("max_over_mean") and v is not None})
        return {k.split("/")[1]: mean_of([r[k] for r in rows if r.get(k) is not None], 5, last) for k in keys}

    diff = paired_difference(before, after)
    return {
        "pretrain": {
            "steps": history["steps"], "seconds": history["seconds"], "cpu_seconds": history["cpu_seconds"],
            "tokens": history["tokens"],
            "lm_loss": [mean_of(history["lm"]), mean_of(history["lm"], last=True)],
            "mtp_loss": [mean_of(history["mtp"]), mean_of(history["mtp"], last=True)],
            "max_over_mean": {layer_label(layer, history): [mean_of(v), mean_of(v, last=True)]
                              for layer, v in history["load_per_layer"].items()},
        },
        "grpo": {
            "steps": len(grpo_rows),
            "reward": [mean_of([r["reward"] for r in grpo_rows], 5), mean_of([r["reward"] for r in grpo_rows], 5, True)],
            "max_over_mean": {layer: [first, load_at(grpo_rows, True)[layer]]
                              for layer, first in load_at(grpo_rows, False).items()},
        },
        "heldout": {
            "problems": before.n_problems, "k": before.k, "temperature": before.settings["temperature"],
            "pass1_before": before.pass1, "pass1_before_ci": list(before.pass1_ci),
            "pass1_after": after.pass1, "pass1_after_ci": list(after.pass1_ci),
            "pass1_change": diff["diff"], "pass1_change_ci": list(diff["ci"]),
            "greedy_before": history["heldout_greedy_accuracy"], "greedy_after": greedy_after,
        },
    }


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: one table per stage."""
    pre, grpo, held = report["pretrain"], report["grpo"], report["heldout"]

    def load_rows(loads: dict[str, list[float]]) -> str:
        return "".join(f"| {layer} | {a:.2f} | {b:.2f} |\n" for layer, (a, b) in loads.items())

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    return (
        "# R1-Zero in miniature: a tiny DeepSeek-V3 MoE pretrained from scratch, then GRPO\n\n"
        f"## Pretraining ({n_steps(pre['steps'])}, {pre['tokens']} tokens, {pre['cpu_seconds']:.0f} CPU s, "
        f"{pre['seconds']:.0f} s wall)\n\n"
        "| loss (nats/token) | first 10 steps | last 10 steps |\n|---|---|---|\n"
        f"| next-token | {pre['lm_loss'][0]:.3f} | {pre['lm_loss'][1]:.3f} |\n"
        f"| MTP (depth 1) | {pre['mtp_loss'][0]:.3f} | {pre['mtp_loss'][1]:.3f} |\n\n"
        "Expert load, max/mean tokens per routed expert (1.00 = balanced):\n\n"
        "| MoE layer | first 10 steps | last 10 steps |\n|---|---|---|\n" + load_rows(pre["max_over_mean"]) +
        f"\n## GRPO ({n_steps(grpo['steps'])})\n\n"
        f"Train reward (exact answer, T=1): {grpo['reward'][0]:.3f} (first 5 steps) → {grpo['reward'][1]:.3f} "
        "(last 5 steps).\n\n"
        "| MoE layer | load max/mean, first 5 steps | last 5 steps |\n|---|---|---|\n" + load_rows(grpo["max_over_mean"]) +
        f"\n## Held-out test problems ({held['problems']}, never trained on)\n\n"
        "| policy | pass@1 (k={k}, T={t}) | 95% CI | greedy accuracy |\n|---|---|---|---|\n".format(
            k=held["k"], t=held["temperature"]) +
        f"| pretrained | {pct(held['pass1_before'])} | [{pct(held['pass1_before_ci'][0])}, "
        f"{pct(held['pass1_before_ci'][1])}] | {pct(held['greedy_before'])} |\n"
        f"| after GRPO | {pct(held['pass1_after'])} | [{pct(held['pass1_after_ci'][0])}, "
        f"{pct(held['pass1_after_ci'][1])}] | {pct(held['greedy_after'])} |\n\n"
        f"pass@1 change {100 * held['pass1_change']:+.1f} points, paired-bootstrap 95% CI "
        f"[{100 * held['pass1_change_ci'][0]:+.1f}, {100 * held['pass1_change_ci'][1]:+.1f}].\n"
    )


def plot_report(history: dict, grpo_rows: list[dict], report: dict[str, Any], out_png: Path) -> Path:
    """report.png: pretraining loss, expert load max/mean per MoE layer during pretraining and during
    GRPO, and the GRPO reward with the held-out pass@1 before/after (95% CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, history["steps"] // 50)
    fig, ((loss_ax, pre_ax), (grpo_ax, reward_ax)) = plt.subplots(2, 2, figsize=(11, 7.5))
    loss_ax.plot(moving_mean(history["lm"], window), lw=1, label="next-token")
    loss_ax.plot(moving_mean(history["mtp"], window), lw=1, alpha=0.7, label="MTP depth 1")
    loss_ax.set(title=f"pretraining loss (nats/token, mean of {n_steps(window)})", xlabel="pretraining step")
    for layer, values in history["load_per_layer"].items():
        pre_ax.plot(moving_mean(values, window), lw=1, label=layer_label(layer, history))
        key = f"moe/{layer}/max_over_mean"
        points = [(r["step"], r[key]) for r in grpo_rows if r.get(key) is not None]
        if points:
            grpo_ax.plot(*zip(*points), lw=1, label=layer)
    pre_ax.set(title=f"expert load max/mean, pretraining (mean of {n_steps(window)})", xlabel="pretraining step")
    grpo_ax.set(title="expert load max/mean, GRPO (tokens trained on)", xlabel="GRPO step")
    steps = [r["step"] for r in grpo_rows]
    rewards = [r["reward"] for r in grpo_rows]
    reward_ax.plot(steps, rewards, lw=1, alpha=0.4, label="train reward (T=1)")
    reward_ax.plot(steps, moving_mean(rewards, 5), lw=2, label="train reward, mean of 5")
    held = report["heldout"]
    for x, key, name in ((0, "pass1_before", "held-out pass@1 before"), (len(grpo_rows), "pass1_after", "after")):
        low, high = held[f"{key}_ci"]
        reward_ax.errorbar([x], [held[key]], yerr=[[held[key] - low], [high - held[key]]], fmt="o", capsize=4, label=name)
    reward_ax.set(title="GRPO reward and held-out accuracy (95% CI)", xlabel="GRPO step")
    for ax in (loss_ax, pre_ax, grpo_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
