"""Evaluation with the R1 protocol: k samples per problem, pass@1 as their mean, maj@k (cons@k).

Defaults follow DeepSeek-R1 §3 (GRPO_SPEC §4): temperature 0.6, top-p 0.95, pass@1 = mean correctness
over k samples per problem, cons@k = correctness of the majority answer. The verifier is the same
object the accuracy reward uses. The 95% interval of pass@1 (``pass1_interval``) is:

  * k = 1: the Wilson score interval (Wilson 1927) of the binomial proportion correct/n. Unlike a
    bootstrap it never collapses to a point at 0/n or n/n (0/200 gives [0, 1.88%]), and its coverage
    stays near 95% for small n and extreme proportions, where the normal approximation fails.
  * k > 1: a percentile bootstrap over problems (seeded, so a report is reproducible), since the k
    samples of a problem are correlated and the problem is the unit to resample; when every problem
    has the same score the bootstrap has nothing to resample and collapses to a point, so the Wilson
    interval over the n problems is used instead. It is conservative there: a score in [0, 1] with
    mean μ has variance at most μ(1 − μ), the Bernoulli variance Wilson assumes.

Before/after comparisons use a paired bootstrap of the difference.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Sequence

from r1kit.data.base import Example
from r1kit.data.templates import encode_prompt
from r1kit.rollout.base import SamplingEngine, SamplingParams


@dataclass
class EvalResult:
    """Scores of one model on one task.

    Attributes:
        pass1: mean over problems of (correct samples / k), in [0, 1].
        pass1_ci: (low, high) 95% interval of pass1 (``pass1_interval``: Wilson for k = 1, else bootstrap).
        majk: share of problems whose majority extracted answer is correct (cons@k); None when k = 1.
        per_problem: per problem: id, gold, correct (k bools), extracted (k strings), completions.
    """

    task: str
    n_problems: int
    k: int
    pass1: float
    pass1_ci: tuple[float, float]
    majk: float | None
    settings: dict
    per_problem: list[dict] = field(repr=False)

    def problem_scores(self) -> list[float]:
        return [sum(p["correct"]) / len(p["correct"]) for p in self.per_problem]


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling items with replacement)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]


def wilson_interval(p_hat: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p_hat`` observed over ``n`` trials, at level 1 − alpha.

    center = (p̂ + z²/2n) / (1 + z²/n), half-width = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²), z the
    1 − alpha/2 normal quantile (Wilson 1927; Brown, Cai & DasGupta 2001 §4.1). At p̂ = 0 the upper
    bound is z²/(n + z²). Returns (nan, nan) for n = 0.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    z2 = NormalDist().inv_cdf(1 - alpha / 2) ** 2
    center = (p_hat + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2) / (1 + z2 / n) * math.sqrt(p_hat * (1 - p_hat) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def pass1_interval(scores: Sequence[float], k: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of pass@1 from per-problem scores (correct/k each): Wilson for k = 1 or when every
    score is equal, else the percentile bootstrap over problems (module docstring says why)."""
    if k == 1 or len(set(scores)) <= 1:
        return wilson_interval(sum(scores) / max(len(scores), 1), len(scores))
    return bootstrap_ci(scores, seed=seed)


def paired_difference(before: EvalResult, after: EvalResult, n_boot: int = 2000, seed: int = 0) -> dict:
    """after − before on the same problems: mean difference, 95% paired-bootstrap interval, and the
    share of bootstrap resamples with difference <= 0 (a one-sided p-value estimate).

    Raises:
        ValueError: the two results are not over the same problems in the same order.
    """
    ids_b = [p["id"] for p in before.per_problem]
    if ids_b != [p["id"] for p in after.per_problem]:
        raise ValueError("before and after evaluations cover different problems")
    d = [a - b for a, b in zip(after.problem_scores(), before.problem_scores())]
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"diff": sum(d) / n, "ci": (means[int(0.025 * n_boot)], means[min(n_boot - 1, int(0.975 * n_boot))]),
            "p_le_zero": sum(m <= 0 for m in means) / n_boot, "n_problems": n}


def majority_correct(extracted: list[str | None], correct: list[bool]) -> bool:
    """cons@k for one problem: is the most frequent extracted answer a correct one? (None never wins.)"""
    votes = Counter(e.strip() for e in extracted if e is not None and e.strip())
    if not votes:
        return False
    best = votes.most_common(1)[0][0]
    return any(c for e, c in zip(extracted, correct) if e is not None and e.strip() == best)


def evaluate(engine: SamplingEngine, tokenizer, examples: list[Example], verifier,
             render: Callable[[Example], str], *, k: int = 1, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int = 512, seed: int = 0, task: str = "", keep_completions: bool = True,
             stop: Sequence[str] = ()) -> EvalResult:
    """Sample k completions per problem and score them with ``verifier``.

    Args:
        engine: a SamplingEngine (its model is evaluated as it is).
        tokenizer: decodes completions (special tokens skipped).
        examples: the problems (held out from training).
        render: Example → prompt text (the same template the model was trained with).
        k, temperature, top_p, max_tokens, seed: sampling settings (R1: 0.6 / 0.95).
        stop: strings that end a completion (the run's ``stop``, so training and evaluation agree).

    Returns:
        EvalResult.
    """
    prompt_ids = [encode_prompt(render(e), tokenizer) for e in examples]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=k, seed=seed,
                            stop=list(stop))
    comps = engine.generate(prompt_ids, params)
    texts = tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
    flat_ex = [examples[c.prompt_index] for c in comps]
    verdicts = verifier.verify_batch(texts, flat_ex, [c.truncated for c in comps])
    per_problem = []
    for i, ex in enumerate(examples):
        sl = range(i * k, (i + 1) * k)
        row = {"id": ex.id, "gold": ex.gold, "correct": [verdicts[j].correct for j in sl],
               "extracted": [verdicts[j].extracted for j in sl],
               "truncated": [comps[j].truncated for j in sl]}
        if keep_completions:
            row["completions"] = [texts[j] for j in sl]
        per_problem.append(row)
    scores = [sum(p["correct"]) / k for p in per_problem]
    majk = (sum(majority_correct(p["extracted"], p["correct"]) for p in per_problem) / len(per_problem)
            if k > 1 and per_problem else None)
    settings = {"k": k, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
                "stop": list(stop)}
    return EvalResult(task=task, n_problems=len(examples), k=k, pass1=sum(scores) / max(len(scores), 1),
                      pass1_ci=pass1_interval(scores, k, seed=seed), majk=majk, settings=settings,
                      per_problem=per_problem)


def save_result(result: EvalResult, path: Path) -> Path:
    """Write the full result (settings, summary, per-problem rows) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=1))
    return path


def load_result(path: Path) -> EvalResult:
    data = json.loads(Path(path).read_text())
    data["pass1_ci"] = tuple(data["pass1_ci"])
    return EvalResult(**data)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def markdown_table(rows: list[tuple[str, EvalResult]]) -> str:
    """A markdown table of named results: pass@1 with its 95% interval, and maj@k."""
    lines = ["| model | task | problems | k | pass@1 | 95% CI | maj@k |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r.task} | {r.n_problems} | {r.k} | {_pct(r.pass1)} | "
                     f"[{_pct(r.pass1_ci[0])}, {_pct(r.pass1_ci[1])}] | {_pct(r.majk)} |")
    return "\n".join(lines) + "\n"


def comparison_markdown(before: EvalResult, after: EvalResult) -> str:
    """Before/after table plus the paired difference with its interval and a plain-words verdict."""
    d = paired_difference(before, after)
    lo, hi = d["ci"]
    verdict = ("significant gain (95% interval above 0)" if lo > 0 else
               "significant loss (95% interval below 0)" if hi < 0 else "no significant change (interval contains 0)")
    return (markdown_table([("before", before), ("after", after)]) +
            f"\npass@1 change: {100 * d['diff']:+.2f} points, paired-bootstrap 95% CI "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}] over {d['n_problems']} problems; "
            f"P(change <= 0) ≈ {d['p_le_zero']:.3f}: **{verdict}**.\n")
