"""The pipeline report: every stage's held-out evaluation side by side (``report.md`` + ``report.png``).

Rows are the stages that were evaluated, in pipeline order (the base first). Columns: pass@1 with its
95% interval (``r1kit.eval.evaluate.pass1_interval``: Wilson for k = 1), the share of samples with
no extracted answer and of truncated ones, the stage's CPU and wall seconds, and paired-bootstrap
tests (``paired_difference``) of each stage against the base and against the previous evaluated
stage, over the same problems, on all problems and on the prior-free subset (problems whose gold is
not one of the training split's common answers). Then the answer-prior section of r1kit's one
evaluation report (``r1kit.eval.evaluate.eval_report``): the best constant answers, prior-free
pass@1, the answer distribution of every stage.
"""

from __future__ import annotations

from pathlib import Path

from r1kit.eval.evaluate import EvalResult, eval_report, load_result, paired_difference
from r1kit.io import write_atomic
from r1kit.pipeline.manifest import read_manifest


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _diff(d: dict | None) -> str:
    if d is None:
        return "–"
    lo, hi = d["ci"]
    mark = " ↑" if lo > 0 else " ↓" if hi < 0 else ""
    return f"{100 * d['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{mark}"


def collect(stages, ctx) -> list[tuple[object, dict, EvalResult]]:
    """(stage, manifest, EvalResult) of every stage that has a manifest and an ``eval.json``."""
    rows = []
    for stage in stages:
        sdir = ctx.stage_dir(stage)
        m = read_manifest(sdir)
        if m is not None and (sdir / "eval.json").is_file():
            rows.append((stage, m, load_result(sdir / "eval.json")))
    return rows


def report_markdown(rows: list[tuple[object, dict, EvalResult]], title: str, all_stages, ctx,
                    train_golds=None, train_missing: str = "no training split was given") -> tuple[str, dict]:
    """The report text (module docstring) from ``collect``'s rows and every stage's manifest, and the
    answer-prior analysis (``eval_report``) as a dict (None when no stage was evaluated)."""
    lines = [f"# {title}", ""]
    if rows:
        r0 = rows[0][2]
        s = r0.settings
        lines += [f"Held-out evaluation: {r0.task}, {r0.n_problems} problems (never trained on), k={r0.k}, "
                  f"T={s.get('temperature')}, top-p={s.get('top_p')}, at most {s.get('max_tokens')} tokens. "
                  "Intervals are 95% (Wilson for k=1, else a bootstrap over problems); Δ columns are paired-"
                  "bootstrap 95% intervals of the change in pass@1 points (↑/↓: the interval excludes 0).", ""]
    prior_md, analysis = (eval_report({st.name: r for st, _, r in rows}, train_golds, train_missing=train_missing)
                          if rows else ("", None))
    prior_free = None
    if analysis is not None and "missing" not in analysis["cut"]:
        common = set(analysis["cut"]["common_answers"])
        from r1kit.eval.evaluate import answer_key

        prior_free = {p["id"] for p in rows[0][2].per_problem if answer_key(p["gold"]) not in common}
    lines += ["| stage | starts from | pass@1 | 95% CI | no answer | truncated | Δ vs base | Δ vs previous | "
              "Δ vs base, prior-free |", "|---|---|---|---|---|---|---|---|---|"]
    base = rows[0][2] if rows and rows[0][0].kind == "eval" else None
    prev = None
    for stage, m, res in rows:
        ev = m.get("eval") or {}
        vs_base = paired_difference(base, res) if base is not None and res is not base else None
        vs_prev = paired_difference(prev, res) if prev is not None else None
        vs_base_pf = (paired_difference(base, res, ids=prior_free)
                      if vs_base is not None and prior_free else None)
        lines.append(f"| {stage.name} | {stage.model} | {_pct(res.pass1)} | [{_pct(res.pass1_ci[0])}, "
                     f"{_pct(res.pass1_ci[1])}] | {_pct(ev.get('no_answer_rate'))} | {_pct(ev.get('truncated_rate'))} | "
                     f"{_diff(vs_base)} | {_diff(vs_prev)} | {_diff(vs_base_pf)} |")
        prev = res
    lines += ["", "| stage | status | what | counts | CPU s (train / eval) | wall s |", "|---|---|---|---|---|---|"]
    total_cpu = total_wall = 0.0
    for stage in all_stages:
        m = read_manifest(ctx.stage_dir(stage))
        if m is None:
            lines.append(f"| {stage.name} | not run | {stage.description} | – | – | – |")
            continue
        ph = m.get("phase_seconds", {})
        counts = ", ".join(f"{k} {v}" for k, v in (m.get("counts") or {}).items()) or "–"
        total_cpu += m.get("cpu_seconds", 0.0)
        total_wall += m.get("wall_seconds", 0.0)
        lines.append(f"| {stage.name} | {m.get('status')} | {stage.description} | {counts} | "
                     f"{ph.get('training', {}).get('cpu', 0):.0f} / {ph.get('evaluation', {}).get('cpu', 0):.0f} | "
                     f"{m.get('wall_seconds', 0):.0f} |")
    lines += ["", f"Total: {total_cpu:.0f} CPU s (time.process_time of the pipeline process, all threads), "
              f"{total_wall:.0f} wall s.", ""]
    if prior_md:
        lines += ["## Every evaluated stage", "", prior_md]
    return "\n".join(lines), analysis


def plot_report(rows, out_png: Path) -> Path:
    """Bar chart of held-out pass@1 per stage with 95% intervals, and the no-answer rate beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [st.name for st, _, _ in rows]
    p = [100 * r.pass1 for _, _, r in rows]
    err = [[max(0.0, 100 * (r.pass1 - r.pass1_ci[0])) for _, _, r in rows],
           [max(0.0, 100 * (r.pass1_ci[1] - r.pass1)) for _, _, r in rows]]
    na = [100 * (m.get("eval") or {}).get("no_answer_rate", 0.0) for _, m, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(names, p, yerr=err, capsize=4, color="#4c72b0")
    axes[0].set_ylabel("held-out pass@1 (%)")
    axes[0].set_title("pass@1 with 95% interval", fontsize=10)
    axes[1].bar(names, na, color="#dd8452")
    axes[1].set_ylabel("samples with no answer (%)")
    axes[1].set_title("no extracted answer", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(stages, ctx, title: str, train_golds=None,
                 train_missing: str = "no training split was given") -> Path:
    """Write ``<output>/report.md``, ``report.priors.json`` and ``report.png`` (when any stage was
    evaluated); returns the .md. ``train_golds``: the gold answers of the training prompts, for the
    constant-answer baselines and the prior-free subset."""
    import json

    rows = collect(stages, ctx)
    md, analysis = report_markdown(rows, title, stages, ctx, train_golds, train_missing)
    out = ctx.output / "report.md"
    if rows:
        plot_report(rows, ctx.output / "report.png")
        md += "\n![report](report.png)\n"
        write_atomic(ctx.output / "report.priors.json", json.dumps(analysis, indent=1, default=str))
    write_atomic(out, md)
    print(md, flush=True)
    return out
