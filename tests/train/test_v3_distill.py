"""``r1kit pretrain v3-distill``: the stage graph of the distillation-vs-RL experiment, its budgets, a
tiny end-to-end run up to the teacher's samples (a barely pretrained teacher keeps none: one clear
error, the stages already made kept), and a rerun that reuses them."""

import dataclasses
import json

import pytest
import torch
from v3_helpers import one_thread  # noqa: F401 (autouse fixture)

from r1kit.cli import main
from r1kit.errors import ConfigError, R1kitError
from r1kit.pipeline.manifest import read_manifest
from r1kit.pipeline.stages import build_stage_config, PipelineContext
from r1kit.train.v3_distill import PRESETS, V3DistillConfig, run_v3_distill, stage_context, traces_section, v3_distill_stages

# a tiny V3 (hidden 32) so that pretraining steps take milliseconds
TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def test_stage_graph_gives_both_arms_the_student_and_the_same_budget(tmp_path):
    cfg = V3DistillConfig(output=str(tmp_path), student_seconds=123.0, teacher_grpo_seconds=45.0, max_steps=7)
    stages = {s.name: s for s in v3_distill_stages(cfg, tmp_path / "models" / "teacher")}
    assert list(stages) == ["student", "teacher", "samples", "rl", "distill"]  # rl just before distill: its Δ vs previous
    assert stages["rl"].model == stages["distill"].model == stages["student"].model == "base"  # the student
    assert stages["teacher"].model == str(tmp_path / "models" / "teacher") and stages["samples"].model == "teacher"
    assert stages["distill"].data == ["samples"] and not stages["samples"].evaluate
    ctx = PipelineContext(output=tmp_path, base_model="unused", common={}, eval=None)
    rl, sft, teacher = (build_stage_config(stages[n], ctx) for n in ("rl", "distill", "teacher"))
    assert rl.max_train_cpu_seconds == sft.max_train_cpu_seconds == 123.0 and teacher.max_train_cpu_seconds == 45.0
    assert rl.max_steps == sft.max_steps == teacher.max_steps == 7
    assert (rl.beta, rl.num_generations, rl.learning_rate) == (teacher.beta, teacher.num_generations, teacher.learning_rate)


def test_chain_preset_gives_every_stage_the_chain_task_and_its_trace_length(tmp_path):
    cfg = V3DistillConfig(**{**PRESETS["chain"], "output": str(tmp_path)})
    stages, ctx = stage_context(cfg)
    by_name = {s.name: s for s in stages}
    rl, teacher, samples = (build_stage_config(by_name[n], ctx) for n in ("rl", "teacher", "samples"))
    assert rl.task == teacher.task == samples.task == ctx.eval.task == "arithmetic_chain"
    assert rl.max_completion_length == teacher.max_completion_length == samples.max_tokens == ctx.eval.max_tokens == 12
    assert (samples.answer_extraction, ctx.eval.answer_extraction) == ("any", "any")  # the final number only
    assert rl.max_train_cpu_seconds == build_stage_config(by_name["distill"], ctx).max_train_cpu_seconds == 100.0
    a_b = {s.name: s for s in v3_distill_stages(V3DistillConfig(output=str(tmp_path)), tmp_path)}
    assert build_stage_config(a_b["rl"], ctx).max_completion_length == 6  # the a±b variant unchanged


def test_traces_section_counts_kept_traces_with_every_step_right(tmp_path):
    shards = tmp_path / "3_samples" / "run" / "shards"
    shards.mkdir(parents=True)
    rows = [{"prompt": "12+34+56=", "completion": "46+56=102"}, {"prompt": "1+2+3=", "completion": "4+3=6"},
            {"prompt": "5-9+1=", "completion": "-4+1=-3"}]  # the second: a wrong step, the right answer
    (shards / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "5_distill").mkdir()
    completions = ["46+56=102", "45+56=101", "47+56=102", "102", "-1+56=55"]  # right; consistent; lucky; bare; wrong
    (tmp_path / "5_distill" / "eval.json").write_text(json.dumps(
        {"per_problem": [{"id": "arithmetic_chain/test/12+34+56", "completions": completions}]}))
    text = traces_section(tmp_path, "arithmetic_chain")
    assert "3 kept samples of the teacher (final answer verified); 2 of them (66.7%) have every intermediate step right" in text
    assert "| distill | 5 | 20.0% | 60.0% | 20.0% |" in text  # first step 1/5; step holds 46+56, 45+56, -1+56; exact 1/5
    assert traces_section(tmp_path, "arithmetic") == ""
    with pytest.raises(ConfigError, match="task must be one of arithmetic, arithmetic_chain"):
        stage_context(V3DistillConfig(output=str(tmp_path), task="gsm8k"))


def test_zero_budget_is_one_clear_error(tmp_path, capsys):
    assert main(["pretrain", "v3-distill", "--output", str(tmp_path / "x"), "--student-seconds", "0"]) == 2
    err = capsys.readouterr().err
    assert "student_seconds must be > 0" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="teacher_grpo_seconds"):
        run_v3_distill(V3DistillConfig(output=str(tmp_path / "y"), teacher_grpo_seconds=-1))


@pytest.mark.parametrize("task", ["arithmetic", "arithmetic_chain"])
def test_tiny_run_makes_both_models_and_stages_then_reuses_them(tmp_path, capfd, task):
    out = tmp_path / "run"
    cfg = V3DistillConfig(output=str(out), max_steps=2, sample_limit=8, eval_limit=4, eval_k=1, model_overrides=TINY,
                          progress=False, task=task)
    with pytest.raises(R1kitError, match="failed verification"):  # a 2-step teacher answers nothing right
        run_v3_distill(cfg)
    teacher = json.loads((out / "models" / "teacher" / "history.json").read_text())
    student = json.loads((out / "models" / "student" / "history.json").read_text())
    assert teacher["steps"] == student["steps"] == 2 and student["parameters"] < teacher["parameters"]
    assert teacher["config"]["task"] == student["config"]["task"] == task  # pretrained on this task's corpus
    assert student["config"]["overrides"]["num_hidden_layers"] == 2 and "num_hidden_layers" not in teacher["config"]["overrides"]
    for name, d in (("student", "1_student"), ("teacher", "2_teacher")):
        m = read_manifest(out / d)
        assert m["status"] == "complete" and m["eval"]["n_problems"] == 4 and m["eval_settings"]["task"] == task
    assert read_manifest(out / "2_teacher")["counts"]["steps"] == 2
    assert read_manifest(out / "3_samples")["status"] == "running"  # failed: not complete
    samples = json.loads((out / "3_samples" / "run" / "manifest.json").read_text())  # the sampler's own
    assert samples["counts"]["kept"] == 0 and samples["counts"]["sampled"] > 0
    before = {d: (out / d / "manifest.json").read_text() for d in ("1_student", "2_teacher", "4_rl")}
    assert read_manifest(out / "4_rl")["status"] == "complete"  # GRPO alone on the student, in the second process
    capfd.readouterr()
    with pytest.raises(R1kitError, match="failed verification"):  # the rerun reuses everything already made
        run_v3_distill(cfg)
    log = capfd.readouterr().out
    assert "teacher: pretrained already, reused" in log and "student: pretrained already, reused" in log
    assert "[student] complete" in log and "[teacher] complete" in log and "[rl] complete" in log
    assert before == {d: (out / d / "manifest.json").read_text() for d in before}
    if task == "arithmetic":  # a rerun with another student budget: the second process's stage rl refuses it
        with pytest.raises(R1kitError, match="failed verification"):
            run_v3_distill(dataclasses.replace(cfg, student_seconds=cfg.student_seconds + 1))
        err = capfd.readouterr().err
        assert "Traceback" not in err and f"error: stage rl in {out / '4_rl'} was made with another config" in err
