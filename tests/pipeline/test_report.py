"""The pipeline report built from stage results: the side-by-side table, paired tests, priors, PNG."""

from pathlib import Path

from r1kit.eval.evaluate import EvalResult, pass1_interval, save_result
from r1kit.pipeline.manifest import write_manifest
from r1kit.pipeline.report import write_report
from r1kit.pipeline.stages import PipelineContext, Stage


def _result(correct: list[bool], extracted: list[str | None], golds: list[str]) -> EvalResult:
    scores = [float(c) for c in correct]
    per = [{"id": f"t/{i}", "gold": g, "correct": [c], "extracted": [e], "truncated": [e is None]}
           for i, (c, e, g) in enumerate(zip(correct, extracted, golds))]
    return EvalResult(task="t/test", n_problems=len(per), k=1, pass1=sum(scores) / len(scores),
                      pass1_ci=pass1_interval(scores, 1), majk=None,
                      settings={"temperature": 0.6, "top_p": 0.95, "max_tokens": 8, "seed": 0}, per_problem=per)


def test_report_side_by_side(tmp_path):
    golds = [str(i % 10) for i in range(40)]
    base = _result([False] * 40, [None] * 40, golds)
    # stage 1 answers every problem, right on the first 20 (gold "0".."9" twice)
    sft = _result([i < 20 for i in range(40)], [g if i < 20 else "7" for i, g in enumerate(golds)], golds)
    stages = [Stage("base", "0_base", "eval", description="the base"),
              Stage("sft", "1_sft", "sft", description="SFT"), Stage("rl", "2_rl", "grpo", model="sft")]
    ctx = PipelineContext(output=tmp_path, base_model="m", common={}, eval=None)
    for st, res, cpu in ((stages[0], base, 3.0), (stages[1], sft, 10.0)):
        save_result(res, tmp_path / st.dirname / "eval.json")
        write_manifest(tmp_path / st.dirname, {"status": "complete", "cpu_seconds": cpu, "wall_seconds": cpu / 2,
                                               "counts": {"examples": 40},
                                               "phase_seconds": {"training": {"cpu": cpu - 1}, "evaluation": {"cpu": 1}},
                                               "eval": {"no_answer_rate": sum(e is None for e in [p["extracted"][0] for p in res.per_problem]) / 40}})
    md = write_report(stages, ctx, "T", train_golds=["1"] * 30 + ["2"] * 10).read_text()
    rows = {}
    for ln in md.splitlines():  # the first table: one row per evaluated stage
        if ln.startswith("| "):
            rows.setdefault(ln.split("|")[1].strip(), ln)
    assert "| 0.00% | [0.00%, 8.76%] | 100.00% |" in rows["base"]  # Wilson 0/40 upper bound: 3.84/43.84
    assert "| 50.00% | [35.20%, 64.80%] | 0.00% |" in rows["sft"]
    # paired Δ vs base and vs the previous stage (the base): +50 points, interval above 0; on the 36
    # prior-free problems (gold not "1", the common training answer) also +50
    assert rows["sft"].count("+50.00 [") == 3 and rows["sft"].count("↑") == 3
    assert "the 36 problems whose gold is not one of the common answers ['1']" in md
    assert "| rl | not run |" in md and "| sft | complete | SFT | examples 40 | 9 / 1 | 5 |" in md
    assert "Total: 13 CPU s" in md
    # the answer-prior section of eval_report: the best constant training answer is "1"
    assert "always '1' scores 10.00%" in md
    assert (tmp_path / "report.png").stat().st_size > 5000 and (tmp_path / "report.priors.json").is_file()
