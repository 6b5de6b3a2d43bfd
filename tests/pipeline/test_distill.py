"""``r1kit distill`` on tiny models: a teacher trained to answer "7" is sampled, its verified samples
fine-tune a random student, and the report compares them; a SIGKILL during the sampling stage
(a real kill of the pipeline process) and a rerun give exactly the rows of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sample_helpers import seven_task_rows

from r1kit.pipeline.distill import load_distill_config, run_distill
from r1kit.pipeline.manifest import read_manifest

SRC = Path(__file__).resolve().parents[2] / "src"
HERE = Path(__file__).parent


def _config(tmp_path, teacher, student, task, **extra) -> dict:
    held_out = tmp_path / "held_out.jsonl"  # rows 4-7 (gold 7, 8, 7, 8): never sampled or trained on
    held_out.write_text("".join(json.dumps(r) + "\n" for r in seven_task_rows(8)[4:]))
    return dict(teacher=str(teacher), student=str(student), task=str(task), template="direct",
                answer_extraction="any", output=str(tmp_path / "d"), eval_task=str(held_out), eval_k=2,
                eval_max_tokens=6, num_threads=1,
                samples=dict(num_samples=4, max_tokens=6, temperature=1.0, prompts_per_shard=2, limit=4),
                distill=dict(learning_rate=1e-2, lr_scheduler="constant", max_steps=12, per_device_train_batch_size=4,
                             max_length=256, bf16="false", save_steps=4, plot=False), **extra)


def _kept(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "shards").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_distill_end_to_end(seven_model_dir, tiny_model_dir, seven_task, tmp_path):
    cfg = load_distill_config(None, None, _config(tmp_path, seven_model_dir, tiny_model_dir, seven_task,
                                                  train_cpu_seconds=900, eval_stop=["\n"]))
    out = run_distill(cfg, progress=False)
    m = {s: read_manifest(out / d) for s, d in (("student", "0_student"), ("teacher", "1_teacher"),
                                                ("samples", "2_samples"), ("distill", "3_distill"))}
    assert all(x["status"] == "complete" for x in m.values())
    # the SFT gets what the sampling left of train_cpu_seconds; the evaluation stops at eval_stop
    assert m["distill"]["config"]["max_train_cpu_seconds"] == pytest.approx(900 - m["samples"]["cpu_seconds"])
    assert m["student"]["eval_settings"]["stop"] == ["\n"] == m["distill"]["eval_settings"]["stop"]
    kept = _kept(out / "2_samples" / "run")
    assert kept and all(r["gold"] == "7" for r in kept)  # only verified samples: the gold-7 problems
    assert m["samples"]["counts"]["kept"] == len(kept)
    assert m["distill"]["inputs"]["model"]["sha256"] == m["student"]["inputs"]["model"]["sha256"]
    assert m["distill"]["inputs"]["data0"]["sha256"] == m["samples"]["artifact"]["sha256"]
    assert m["distill"]["counts"]["rows from samples"] == len(kept)
    # the random student never answers; the teacher answers 7: right on the 2 gold-7 problems of 4
    assert m["student"]["eval"]["pass1"] == 0.0 and m["student"]["eval"]["no_answer_rate"] == 1.0
    assert m["teacher"]["eval"]["pass1"] == 0.5
    losses = [json.loads(x)["loss"] for x in (out / "3_distill" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]  # the student fit the teacher's samples
    report = (out / "report.md").read_text()
    assert "| distill | base |" in report and "| teacher |" in report and (out / "report.png").is_file()
    assert "always '7'" in report  # the constant-answer baseline: the student learned the teacher's one answer


def test_sigkill_during_sampling_then_rerun_loses_and_repeats_nothing(seven_model_dir, tiny_model_dir, tmp_path):
    """The pipeline process is SIGKILLed by itself right after the 3rd shard of the sampling stage is
    written (a ``sitecustomize`` on its path counts the shard files; the kill is a real SIGKILL);
    the rerun resumes the stage and its kept rows equal those of an uninterrupted run, row by row."""
    task = tmp_path / "seven.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in seven_task_rows(8)))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('KILL_AFTER_SHARDS'):\n"
        "    import r1kit.pipeline.sample as s\n"
        "    _write, n = s._write_atomic, [0]\n"
        "    def write(path, text):\n"
        "        _write(path, text)\n"
        "        if path.parent.name == 'shards':\n"
        "            n[0] += 1\n"
        "            if n[0] == int(os.environ['KILL_AFTER_SHARDS']):\n"
        "                os.kill(os.getpid(), signal.SIGKILL)\n"
        "    s._write_atomic = write\n")
    results = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        cfg = _config(tmp_path / name, seven_model_dir, tiny_model_dir, task, evaluate_teacher=False)
        cfg["samples"].update(prompts_per_shard=1, limit=None)  # 8 shards
        path = tmp_path / name / "distill.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = [sys.executable, "-m", "r1kit.cli", "distill", "--config", str(path), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(SRC), str(HERE)])}
        if name == "killed":
            r = subprocess.run(args, env={**env, "KILL_AFTER_SHARDS": "3"}, capture_output=True, text=True, timeout=600)
            assert r.returncode == -9, r.stderr[-2000:]  # killed by SIGKILL mid-stage
            out = Path(cfg["output"])
            assert read_manifest(out / "2_samples")["status"] == "running"
            assert len(list((out / "2_samples" / "run" / "shards").glob("*.jsonl"))) == 3
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        results[name] = Path(cfg["output"])
    a, b = _kept(results["straight"] / "2_samples" / "run"), _kept(results["killed"] / "2_samples" / "run")
    ids_b = [r["id"] for r in b]
    assert len(ids_b) == len(set(ids_b))  # no duplicate sample
    assert ids_b == [r["id"] for r in a] and [r["completion"] for r in b] == [r["completion"] for r in a]  # none missing
    m = read_manifest(results["killed"] / "2_samples")
    assert m["status"] == "complete" and m["runs"] == 2 and m["counts"]["kept"] == len(b)
    assert read_manifest(results["killed"] / "3_distill")["counts"]["rows from samples"] == len(b)


def test_distill_without_teacher_is_one_error(capsys, tmp_path):
    from r1kit.cli import main

    assert main(["distill", "--student", "smollm2-135m-instruct", "--task", "gsm8k", "--output", str(tmp_path / "d")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_sampling_that_spent_the_budget_is_one_error(tmp_path):
    from r1kit.errors import R1kitError
    from r1kit.pipeline.distill import sft_budget
    from r1kit.pipeline.manifest import write_manifest

    cfg = load_distill_config(None, None, dict(teacher="smollm2-135m-instruct", train_cpu_seconds=100,
                                               distill=dict(max_train_cpu_seconds=30)))
    write_manifest(tmp_path, {"status": "complete", "cpu_seconds": 60.0})
    assert sft_budget(cfg, tmp_path) == 30.0  # the section's own cap is lower than the 40 s left
    cfg.distill = {}
    assert sft_budget(cfg, tmp_path) == 40.0
    write_manifest(tmp_path, {"status": "complete", "cpu_seconds": 120.0})
    with pytest.raises(R1kitError, match="sampling used 120 CPU s of the train_cpu_seconds budget 100"):
        sft_budget(cfg, tmp_path)


def test_rft_svamp_evaluates_as_the_grpo_svamp_demo():
    """``rft_svamp``'s held-out evaluation is the GRPO demo's (preset cpu_demo: 300 SVAMP test
    problems, k=2, its template, extraction, token limit, stop, T, top-p and seed), its samples are
    drawn at the demo's rollout temperature, and sampling + SFT get the demo's 19 training minutes."""
    from r1kit.config import load_config

    grpo = load_config("cpu_demo", None, {})
    rft = load_distill_config("rft_svamp")
    ev = rft.eval_settings(rft.task)
    assert (ev.task, ev.split, ev.limit, ev.k, ev.template, ev.answer_extraction, ev.max_tokens, ev.stop, ev.seed) == (
        grpo.task, grpo.eval_split, grpo.eval_limit, grpo.eval_k, grpo.template, grpo.answer_extraction,
        grpo.max_completion_length, grpo.stop, grpo.seed)
    assert (ev.temperature, ev.top_p) == (grpo.eval_temperature, grpo.eval_top_p)
    assert rft.train_cpu_seconds == 60 * grpo.max_train_minutes and rft.teacher == rft.student == grpo.model
    from r1kit.pipeline.sample import sample_config

    samples = sample_config(**{**rft.samples, "template": rft.template, "answer_extraction": rft.answer_extraction})
    assert (samples.temperature, samples.max_tokens, samples.stop) == (
        grpo.temperature, grpo.max_completion_length, grpo.stop)
