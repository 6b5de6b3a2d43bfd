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

import inspect
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
from r1kit.errors import R1kitError
from r1kit.io import write_atomic  # pipeline.sample and train.v3_distill import it from here
from r1kit.rollout.base import Completion, SamplingEngine, SamplingParams


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


def paired_difference(before: EvalResult, after: EvalResult, n_boot: int = 2000, seed: int = 0,
                      ids: set[str] | None = None) -> dict:
    """after − before on the same problems: mean difference, 95% paired-bootstrap interval, and the
    share of bootstrap resamples with difference <= 0 (a one-sided p-value estimate). ``ids``: only
    the problems with these ids (the prior-free subset); None = all.

    Raises:
        ValueError: the two results are not over the same problems in the same order, or ``ids``
            selects none of them.
    """
    ids_b = [p["id"] for p in before.per_problem]
    if ids_b != [p["id"] for p in after.per_problem]:
        raise ValueError("before and after evaluations cover different problems")
    d = [a - b for i, a, b in zip(ids_b, after.problem_scores(), before.problem_scores()) if ids is None or i in ids]
    if not d:
        raise ValueError("the id subset selects none of the evaluated problems")
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


def generate_streaming(engine: SamplingEngine, prompt_ids: list[list[int]], params: SamplingParams,
                       on_finished: Callable[[dict[int, list[Completion]]], None]) -> list[Completion]:
    """``engine.generate``, calling ``on_finished({prompt index: its n completions})`` as prompts finish
    where the engine reports them (r1kit's engine after each step, the HF backend after each batch);
    for the others (vLLM, ``V3SamplingEngine``) once, for every prompt, when the call returns. What is
    sampled is the same either way."""
    if "on_finished" in inspect.signature(engine.generate).parameters:
        return engine.generate(prompt_ids, params, on_finished=on_finished)
    comps = engine.generate(prompt_ids, params)
    on_finished({i: comps[i * params.n:(i + 1) * params.n] for i in range(len(prompt_ids))})
    return comps


def evaluate(engine: SamplingEngine, tokenizer, examples: list[Example], verifier,
             render: Callable[[Example], str], *, k: int = 1, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int = 512, seed: int = 0, task: str = "", keep_completions: bool = True,
             stop: Sequence[str] = (), done: Sequence[dict] = (),
             on_problem: Callable[[dict], None] | None = None) -> EvalResult:
    """Sample k completions per problem and score them with ``verifier``.

    Args:
        engine: a SamplingEngine (its model is evaluated as it is).
        tokenizer: decodes completions (special tokens skipped).
        examples: the problems (held out from training).
        render: Example → prompt text (the same template the model was trained with).
        k, temperature, top_p, max_tokens, seed: sampling settings (R1: 0.6 / 0.95).
        stop: strings that end a completion (the run's ``stop``, so training and evaluation agree).
        done: per-problem records of an earlier, interrupted run with these settings (``r1kit eval
            --resume``): the problems with those ids are not sampled again. The others are sampled in
            one call of their own, so at temperature > 0 their samples are not those an uninterrupted
            run would have drawn (the engine's generator is shared by the batch).
        on_problem: called with each problem's record (a ``per_problem`` row) as soon as its k samples
            are scored (``generate_streaming``), so a caller can keep them if the run is cut short;
            None = score every problem in one ``verify_batch`` once all are sampled.

    Returns:
        EvalResult, ``per_problem`` in the order of ``examples``.
    """
    reuse = {row["id"]: row for row in done}
    todo = [i for i, e in enumerate(examples) if e.id not in reuse]  # indices into examples
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=k, seed=seed,
                            stop=list(stop))
    rows: dict[int, dict] = {}

    def score(finished: dict[int, list[Completion]]) -> None:
        order = sorted(finished)
        comps = [c for j in order for c in finished[j]]
        texts = tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
        verdicts = verifier.verify_batch(texts, [examples[todo[j]] for j in order for _ in range(k)],
                                         [c.truncated for c in comps])
        for m, j in enumerate(order):
            ex, sl = examples[todo[j]], range(m * k, (m + 1) * k)
            row = {"id": ex.id, "gold": ex.gold, "correct": [verdicts[x].correct for x in sl],
                   "extracted": [verdicts[x].extracted for x in sl], "truncated": [comps[x].truncated for x in sl]}
            if keep_completions:
                row["completions"] = [texts[x] for x in sl]
            rows[todo[j]] = row
            if on_problem is not None:
                on_problem(row)

    prompt_ids = [encode_prompt(render(examples[i]), tokenizer) for i in todo]
    if prompt_ids and on_problem is not None:
        generate_streaming(engine, prompt_ids, params, score)
    elif prompt_ids:  # nobody waits for records: verify in one batch (the code verifier runs it in parallel)
        comps = engine.generate(prompt_ids, params)
        score({j: comps[j * k:(j + 1) * k] for j in range(len(todo))})
    per_problem = [reuse[e.id] if e.id in reuse else rows[i] for i, e in enumerate(examples)]
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
    return write_atomic(path, json.dumps(asdict(result), indent=1))


def save_report(path: Path, markdown: str, analysis: dict) -> Path:
    """Write an ``eval_report``: the markdown at ``path`` (``.md``) and its analysis beside it as
    ``<stem>.priors.json``; returns the markdown's path."""
    path = Path(path)
    write_atomic(path.with_name(path.stem + ".priors.json"), json.dumps(analysis, indent=1))
    return write_atomic(path, markdown)


class PartialRecords:
    """The per-problem records of an evaluation in progress: ``path`` holds a header line (the run's
    ``settings``) and then one ``per_problem`` row per finished problem, appended and flushed as each
    finishes, so that an interrupted run keeps them (``r1kit eval`` writes ``<report>.partial.jsonl``
    and removes it once the reports are written).

    Args:
        path: the partial file.
        settings: what decides the samples (model, task, template, sampling settings, ...); a file
            written under other settings is not resumed.
    """

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = Path(path), json.loads(json.dumps(settings))
        self.count, self._file = 0, None

    def load(self) -> list[dict]:
        """The rows of an earlier run. A last line cut off mid-write is dropped. Raises R1kitError
        naming the file and the first setting that differs, or a line that is not a record."""
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])["settings"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if not isinstance(header, dict):
            raise R1kitError(f"{self.path} is not a partial evaluation file (no settings line): delete it")
        for key in sorted(set(header) | set(self.settings)):
            if header.get(key) != self.settings.get(key):
                raise R1kitError(f"--resume: {self.path} was written with {key} = {header.get(key)!r}, this run has "
                                 f"{self.settings.get(key)!r}: rerun with the same arguments, or delete the file "
                                 "to start over")
        rows = []
        for n, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # the write an interruption cut short
                    break
                raise R1kitError(f"{self.path} line {n} is not JSON: delete the file to start over") from None
            if not isinstance(row, dict) or "id" not in row or "correct" not in row:
                raise R1kitError(f"{self.path} line {n} is not a per-problem record: delete the file to start over")
            rows.append(row)
        return rows

    def start(self, rows: Sequence[dict]) -> None:
        """Write the header and ``rows`` (atomically), then keep the file open for ``append``."""
        lines = [json.dumps({"settings": self.settings})] + [json.dumps(r) for r in rows]
        write_atomic(self.path, "".join(line + "\n" for line in lines))
        self.count = len(rows)
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, row: dict) -> None:
        """Add one finished problem's record and flush it to the file."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_result(path: Path) -> EvalResult:
    data = json.loads(Path(path).read_text())
    data["pass1_ci"] = tuple(data["pass1_ci"])
    return EvalResult(**data)


# ----- answer priors: what a policy that learned only which answers are common would score -----

PRIOR_MASS = 0.2  # the common answers: the most frequent training golds that together cover 20% of the training golds
COLLAPSE_SHARE = 0.3  # collapse to a prior: one answer is more than 30% of a policy's samples ...
MIN_COLLAPSE_PROBLEMS = 20  # ... over at least this many problems (prior_analysis says why)
TOP_ANSWERS = 5  # answers listed in a report's answer distribution


def answer_key(text: str | None) -> str | None:
    """The form in which answers are counted: a number as its value (``"2.0"``, ``" 2"``, ``"$2"``,
    ``"1,000"`` → ``"2"``, ``"2"``, ``"2"``, ``"1000"``), anything else stripped with whitespace runs
    collapsed; None for no answer. The verifier decides correctness; this only groups equal answers."""
    if text is None or not text.strip():
        return None
    t = " ".join(text.split())
    num = t.replace(",", "").removeprefix("$").removesuffix("%").strip()
    try:
        value = float(num)
    except ValueError:
        return t
    if not math.isfinite(value):
        return t
    return str(int(value)) if value == int(value) else repr(value)


def answer_histogram(extracted: Sequence[str | None], top: int = TOP_ANSWERS) -> dict:
    """The distribution of extracted answers over samples.

    Returns: ``n`` (samples), ``no_answer`` (samples with none), ``top`` ([answer, count] for the
    ``top`` most frequent, ties by answer text), ``top_share`` (count of the most frequent answer / n)
    and ``entropy_bits`` (Shannon entropy, bits, of the distribution over samples that have an
    answer); ``top_share`` and ``entropy_bits`` are None when no sample has an answer.
    """
    keys = [answer_key(e) for e in extracted]
    counts = Counter(k for k in keys if k is not None)
    answered = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    entropy = (-sum(c / answered * math.log2(c / answered) for c in counts.values()) + 0.0) if answered else None
    return {"n": len(keys), "no_answer": len(keys) - answered, "top": [list(kv) for kv in ranked[:top]],
            "top_share": ranked[0][1] / len(keys) if answered else None, "entropy_bits": entropy}


def common_answers(golds: Sequence[str | None], mass: float = PRIOR_MASS) -> list[str]:
    """The common answers of a split: its most frequent golds (as ``answer_key``s; ties by answer text),
    taken in order until they cover at least ``mass`` of the golds (at least one). [] when there are none."""
    counts = Counter(k for k in map(answer_key, golds) if k is not None)
    total, out, covered = sum(counts.values()), [], 0
    for key, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if out and covered >= mass * total:
            break
        out.append(key)
        covered += c
    return out


def _share(result: EvalResult, per_sample: Callable[[dict, int], bool]) -> dict:
    """Mean over problems of the share of samples j of problem p with ``per_sample(p, j)``, with the
    ``pass1_interval`` over problems."""
    scores = [sum(per_sample(p, j) for j in range(len(p["correct"]))) / len(p["correct"]) for p in result.per_problem]
    return {"share": sum(scores) / max(len(scores), 1), "ci": pass1_interval(scores, result.k, seed=result.settings.get("seed", 0))}


def constant_baselines(eval_golds: Sequence[str | None], train_golds: Sequence[str | None] | None,
                       train_missing: str = "no training split was given") -> dict:
    """Accuracy of answering one constant on every evaluation problem, with its Wilson 95% interval.

    ``train``: the most frequent training gold (the best constant a policy can learn from its training
    data) applied to the evaluation split. ``eval_mode``: the evaluation split's own most frequent gold,
    an upper bound on any constant answer. A baseline that cannot be computed is ``{"missing": why}``:
    no training golds (``train_missing`` says why), or an evaluation split with fewer than two distinct
    golds (every constant is then right on all problems or on none).
    """
    keys = [answer_key(g) for g in eval_golds]
    n, distinct = len(keys), len({k for k in keys if k is not None})

    def score(answer: str) -> dict:
        acc = sum(k == answer for k in keys) / n
        return {"answer": answer, "accuracy": acc, "ci": wilson_interval(acc, n)}

    out = {}
    if distinct < 2:
        out["eval_mode"] = {"missing": f"the evaluation split has {distinct} distinct gold answer(s); a constant "
                                       "answer is then right on all problems or on none"}
    else:
        out["eval_mode"] = score(common_answers(eval_golds, 0.0)[0])
    train_top = common_answers(train_golds, 0.0) if train_golds is not None else []
    if train_golds is None or not train_top:
        out["train"] = {"missing": train_missing if train_golds is None else "the training split has no gold answers"}
    elif distinct < 2:
        out["train"] = {"missing": out["eval_mode"]["missing"]}
    else:
        out["train"] = score(train_top[0])
    return out


def prior_analysis(results: dict[str, EvalResult], train_golds: Sequence[str | None] | None, *,
                   train_missing: str = "no training split was given", mass: float = PRIOR_MASS,
                   collapse_share: float = COLLAPSE_SHARE) -> dict:
    """The figures that tell a learned skill from a learned answer prior, for named results over the
    same problems (e.g. ``{"before": b, "after": a}``).

    Args:
        results: name → EvalResult; all over the same problems (a before/after pair, or one result).
        train_golds: the gold answers of the training examples (``[e.gold for e in train]``), or None
            when there is no training split (``train_missing`` says why).
        mass: the prior cut: the common answers are the most frequent training golds covering
            ``mass`` of them (``common_answers``); the prior-free subset is the evaluation problems
            whose gold is not one of them. Without training golds the cut is taken from the
            evaluation split's own golds, and the report says so.
        collapse_share: a result collapsed to a prior when one answer is more than this share of
            its samples, over at least ``MIN_COLLAPSE_PROBLEMS`` (20) problems. Why 20: a problem's k
            samples may rightly agree, so the check must need an answer shared across problems.
            Under 1 / collapse_share (3.3) problems one problem's samples are already above 30% and
            the check cannot fail (at 2 problems every result with an answer "collapsed"); at 20 an
            answer above 30% needs at least 7 problems' worth of samples, which two problems whose
            samples agree (10%) or a few problems with the same gold cannot give. A smaller
            evaluation is never called collapsed (its answer distribution is still reported).

    Returns: a JSON-able dict: ``baselines`` (``constant_baselines``), ``cut`` (common answers, their
    source and share of training golds, the prior-free problem count or why there is none), per result
    ``pass1``/``prior_free_pass1``/``no_answer``/``truncated`` ({share, ci}; ``truncated`` missing for
    results saved before truncation flags were kept), ``answers`` (``answer_histogram``) and
    ``collapsed``; with exactly two results, the paired after − before tests ``paired`` and
    ``paired_prior_free`` (``paired_difference``; the second result minus the first).

    Raises:
        ValueError: the results cover different problems.
    """
    named = list(results.items())
    first = named[0][1]
    golds = [p["gold"] for p in first.per_problem]
    baselines = constant_baselines(golds, train_golds, train_missing)
    source = "training split" if train_golds is not None else "evaluation split (no training split)"
    common = common_answers(train_golds if train_golds is not None else golds, mass)
    prior_free = {p["id"] for p in first.per_problem if answer_key(p["gold"]) not in common}
    cut = {"mass": mass, "source": source, "common_answers": common, "n_prior_free": len(prior_free)}
    if train_golds is not None:
        keys = [answer_key(g) for g in train_golds]
        cut["common_share_of_train"] = sum(k in common for k in keys) / max(len(keys), 1)
    if not prior_free:
        cut["missing"] = (f"every evaluation gold is one of the common answers {common}" if common
                          else "no gold answers to take the common answers from")
    out = {"baselines": baselines, "cut": cut, "collapse_share": collapse_share,
           "collapse_min_problems": MIN_COLLAPSE_PROBLEMS, "results": {}}
    for name, r in named:
        if [p["id"] for p in r.per_problem] != [p["id"] for p in first.per_problem]:
            raise ValueError(f"result {name!r} covers different problems from {named[0][0]!r}")
        sub = [p for p in r.per_problem if p["id"] in prior_free]
        sub_scores = [sum(p["correct"]) / len(p["correct"]) for p in sub]
        hist = answer_histogram([e for p in r.per_problem for e in p["extracted"]])
        row = {"pass1": {"share": r.pass1, "ci": tuple(r.pass1_ci)},
               "prior_free_pass1": ({"share": sum(sub_scores) / len(sub_scores),
                                     "ci": pass1_interval(sub_scores, r.k, seed=r.settings.get("seed", 0)),
                                     "n_problems": len(sub)} if sub else {"missing": cut["missing"]}),
               "no_answer": _share(r, lambda p, j: answer_key(p["extracted"][j]) is None),
               "answers": hist,
               "collapsed": (len(r.per_problem) >= MIN_COLLAPSE_PROBLEMS and hist["top_share"] is not None
                             and hist["top_share"] > collapse_share)}
        if hist["top"]:
            top = hist["top"][0][0]
            row["top_answer"] = _share(r, lambda p, j: answer_key(p["extracted"][j]) == top)
        row["truncated"] = (_share(r, lambda p, j: bool(p["truncated"][j]))
                            if all("truncated" in p for p in r.per_problem)
                            else {"missing": "this result was saved without truncation flags"})
        out["results"][name] = row
    if len(named) == 2:
        (_, before), (_, after) = named
        out["paired"] = paired_difference(before, after)
        out["paired_prior_free"] = (paired_difference(before, after, ids=prior_free) if prior_free
                                    else {"missing": cut["missing"]})
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _share_cell(s: dict) -> str:
    if "missing" in s:
        return "not computed"
    return f"{_pct(s['share'])} [{_pct(s['ci'][0])}, {_pct(s['ci'][1])}]"


def _diff_text(d: dict) -> str:
    lo, hi = d["ci"]
    return (f"{100 * d['diff']:+.2f} points, paired-bootstrap 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}] over "
            f"{d['n_problems']} problems, P(change <= 0) ≈ {d['p_le_zero']:.3f}")


def verdict(analysis: dict) -> str:
    """The plain-words reading of a ``prior_analysis``, one line. "significant gain" only when the
    paired interval on the prior-free subset lies above 0; it says when the last result scores at or
    below the best constant answer and when it collapsed onto one answer (over at least
    ``MIN_COLLAPSE_PROBLEMS`` problems, ``prior_analysis``)."""
    names = list(analysis["results"])
    last = analysis["results"][names[-1]]
    parts = []
    if "paired" in analysis:
        lo_all, hi_all = analysis["paired"]["ci"]
        pf = analysis["paired_prior_free"]
        if "missing" in pf:
            parts.append(("the change over all problems has a 95% interval above 0, but it is not called significant: "
                          if lo_all > 0 else "no significant change over all problems; ") +
                         f"no prior-free subset ({pf['missing']})")
        elif pf["ci"][0] > 0:
            parts.append("significant gain on the prior-free subset (95% interval above 0)")
        elif lo_all > 0:
            parts.append("not a real gain: the interval over all problems is above 0 but on the prior-free subset it "
                         "contains 0; the gain is explained by common answers")
        elif hi_all < 0 or pf["ci"][1] < 0:
            parts.append("significant loss (95% interval below 0" + (")" if hi_all < 0 else " on the prior-free subset)"))
        else:
            parts.append("no significant change (both intervals contain 0)")
    base = analysis["baselines"]
    p1 = last["pass1"]["share"]
    if "accuracy" in base["train"] and p1 <= base["train"]["accuracy"]:
        parts.append(f"{names[-1]} scores at or below the best constant answer (always {base['train']['answer']!r}, "
                     f"the most frequent training gold: {_pct(base['train']['accuracy'])})")
    elif "accuracy" in base["eval_mode"] and p1 <= base["eval_mode"]["accuracy"]:
        parts.append(f"{names[-1]} scores at or below the evaluation split's most frequent gold "
                     f"({base['eval_mode']['answer']!r}: {_pct(base['eval_mode']['accuracy'])})")
    elif "accuracy" in base["eval_mode"]:
        parts.append(f"{names[-1]} scores above every constant answer")
    if last["collapsed"]:
        top, count = last["answers"]["top"][0]
        parts.append(f"collapse to a prior: {names[-1]} answers {top!r} in {count} of its "
                     f"{last['answers']['n']} samples ({_pct(last['answers']['top_share'])} > {analysis['collapse_share']:.0%})")
    if not parts:
        parts.append("no constant-answer baseline could be computed")
    return "; ".join(parts) + "."


def prior_markdown(analysis: dict) -> str:
    """The markdown section of a ``prior_analysis``: baselines, the cut, a table per result, the paired
    tests and the verdict line."""
    base, cut = analysis["baselines"], analysis["cut"]
    lines = ["## Against answer priors", ""]
    for key, label in (("train", "best constant answer (most frequent training gold)"),
                       ("eval_mode", "upper bound: the evaluation split's own most frequent gold")):
        b = base[key]
        lines.append(f"- {label}: " + (f"not computed: {b['missing']}" if "missing" in b else
                                       f"always {b['answer']!r} scores {_pct(b['accuracy'])} "
                                       f"[{_pct(b['ci'][0])}, {_pct(b['ci'][1])}] (Wilson 95%)"))
    covered = (f": {_pct(cut['common_share_of_train'])}" if "common_share_of_train" in cut else "")
    lines.append(f"- prior-free subset: the {cut['n_prior_free']} problems whose gold is not one of the common answers "
                 f"{cut['common_answers']} (the most frequent golds of the {cut['source']}, taken until they cover "
                 f"at least {cut['mass']:.0%} of its golds{covered})" + (f"; none: {cut['missing']}" if "missing" in cut else ""))
    lines += ["", "| policy | pass@1 | prior-free pass@1 | no answer | truncated | top answers (share of samples) | "
              "answer entropy |", "|---|---|---|---|---|---|---|"]
    for name, r in analysis["results"].items():
        h = r["answers"]
        tops = ", ".join([f"{h['top'][0][0]!r} {_share_cell(r['top_answer'])}"] +
                         [f"{a!r} {_pct(c / h['n'])}" for a, c in h["top"][1:]]) if h["top"] else "none"
        ent = "–" if h["entropy_bits"] is None else f"{h['entropy_bits']:.2f} bits"
        lines.append(f"| {name} | {_share_cell(r['pass1'])} | {_share_cell(r['prior_free_pass1'])} | "
                     f"{_share_cell(r['no_answer'])} | {_share_cell(r['truncated'])} | {tops} | {ent} |")
    lines.append("")
    if "paired" in analysis:
        lines.append(f"pass@1 change, all problems: {_diff_text(analysis['paired'])}.  ")
        pf = analysis["paired_prior_free"]
        lines.append("pass@1 change, prior-free subset: " +
                     (f"not computed: {pf['missing']}" if "missing" in pf else _diff_text(pf)) + ".")
        lines.append("")
    lines.append(f"**Verdict: {verdict(analysis)}**")
    return "\n".join(lines) + "\n"


def eval_report(results: EvalResult | dict[str, EvalResult], train_golds: Sequence[str | None] | None, *,
                train_missing: str = "no training split was given") -> tuple[str, dict]:
    """The one evaluation report of r1kit (``r1kit eval``, GRPO/SFT/pipeline runs): pass@1 with maj@k,
    then the answer-prior section (``prior_analysis``, ``prior_markdown``).

    Args:
        results: one EvalResult (named "policy"), or name → EvalResult over the same problems; with two,
            the second is compared against the first (before → after).
        train_golds: gold answers of the training examples the policy learned from
            (``[e.gold for e in train]``); None when there is no training split, with ``train_missing``
            saying why (the report names the baseline it could not compute and still reports the rest).

    Returns: (markdown, analysis dict to save as JSON).

    Raises:
        ValueError: the results cover different problems.
    """
    named = {"policy": results} if isinstance(results, EvalResult) else dict(results)
    analysis = prior_analysis(named, train_golds, train_missing=train_missing)
    return markdown_table(list(named.items())) + "\n" + prior_markdown(analysis), analysis


def markdown_table(rows: list[tuple[str, EvalResult]]) -> str:
    """A markdown table of named results: pass@1 with its 95% interval, and maj@k."""
    lines = ["| model | task | problems | k | pass@1 | 95% CI | maj@k |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r.task} | {r.n_problems} | {r.k} | {_pct(r.pass1)} | "
                     f"[{_pct(r.pass1_ci[0])}, {_pct(r.pass1_ci[1])}] | {_pct(r.majk)} |")
    return "\n".join(lines) + "\n"
