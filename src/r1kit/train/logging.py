"""Run observability: metrics.jsonl, optional TensorBoard, sampled completions, the curves PNG.

Every step appends one JSON line ``{"step": N, "<metric>": value, ...}`` to ``metrics.jsonl``; metric
names follow TRL where one exists (``reward``, ``reward_std``, ``rewards/<fn>/mean``, ``kl``,
``clip_ratio/low_mean``, ``entropy``, ``completions/mean_length``, ``frac_reward_zero_std``, ...).
Every row of a run has the same keys; a statistic a step did not measure (entropy on a step that
forwarded no completion) and any other non-finite value is written as null. Both trainers add
``rss_mb``: the process's resident memory (MiB, VmRSS) after the step (``r1kit.train.loop.rss_mb``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def n_steps(n: int) -> str:
    """``n`` with "step" or "steps", as messages, reports and plot titles say it ("1 step", "2 steps")."""
    return f"{n} step" if n == 1 else f"{n} steps"


class MetricsLogger:
    """Append-only metrics and samples for one run directory.

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: also write TensorBoard scalars under ``run_dir/tb``.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.step_logs = [self.metrics_path, self.samples_path]   # JSONL files keyed by "step", cut on resume
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop lines for steps > ``step`` from every file of ``step_logs`` (used on resume, so curves and
        per-step logs such as ``ray_groups.jsonl`` have no duplicates)."""
        for path in self.step_logs:
            if path.is_file():
                kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
                path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


GRPO_PANELS = [("reward", "reward"), ("accuracy", "accuracy"), ("completions/mean_length", "completion length (tokens)"),
               ("frac_reward_zero_std", "groups with zero reward std"),
               ("answers/top_share", "share of the most common answer")]


def plot_curves(metrics_path: Path, out_png: Path, window: int = 5,
                panels: list[tuple[str, str]] | None = None) -> Path:
    """Plot one panel per (metric key, title) of ``panels`` (default: GRPO's reward, accuracy,
    completion length, zero-std groups, answer collapse) per step, raw and a moving average, to a PNG; steps where a
    value is null or NaN are left out of its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = panels or GRPO_PANELS
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if _finite_or_none(r.get(key)) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, alpha=0.35, lw=1, label="per step")
            if len(ys) >= window:
                avg = [sum(ys[i - window + 1:i + 1]) / window for i in range(window - 1, len(ys))]
                ax.plot(xs[window - 1:], avg, lw=2, label=f"mean of {window}")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
