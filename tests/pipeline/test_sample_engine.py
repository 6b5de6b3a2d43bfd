"""Rejection sampling with a local teacher through the sampling engine: end to end on a tiny trained
Llama, resume after SIGKILL in a real subprocess, and a run where every sample fails verification."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1kit.data.loading import load_task
from r1kit.errors import ConfigError, R1kitError
from r1kit.pipeline.sample import CHECKS, run_sample, sample_config, shard_seed, state_sha256
from r1kit.rewards.math import MathVerifier

from sample_helpers import seven_task_rows

SRC = Path(__file__).resolve().parents[2] / "src"


def read_rows(out: Path, folder: str) -> list[dict]:
    return [json.loads(line) for f in sorted((out / folder).glob("shard-*.jsonl")) for line in f.read_text().splitlines()]


def test_engine_teacher_end_to_end(seven_model_dir, seven_task, tmp_path):
    """Gold 7 problems keep one sample each (the model says "7" four times: three exact duplicates);
    gold 8 problems keep none; every count of the manifest equals a count over the written rows."""
    from r1kit.models.loading import load_policy

    cfg = sample_config(teacher=str(seven_model_dir), task=str(seven_task), template="direct", num_samples=4,
                        max_tokens=8, prompts_per_shard=3, output=str(tmp_path / "out"), temperature=1.0)
    out = run_sample(cfg)
    kept, dropped = read_rows(out, "shards"), read_rows(out, "dropped")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["complete"] and manifest["shards_total"] == 3 == len(list((out / "index").glob("*.json")))
    assert counts["sampled"] == 8 * 4 == len(kept) + len(dropped) == counts["kept"] + sum(counts[c] for c in CHECKS)
    for check in CHECKS:
        assert counts[check] == sum(r["dropped_by"] == check for r in dropped)
    examples = {e.id: e for e in load_task(str(seven_task))}
    verifier = MathVerifier(extraction="any")
    for row in kept:  # each kept row verifies independently, with full provenance
        ex = examples[row["prompt_id"]]
        assert row["gold"] == ex.gold == "7" and row["prompt"] == ex.prompt
        assert verifier.verify(row["completion"], ex).correct and row["verdict"]["correct"]
        assert row["answer"] == row["completion"].strip() and row["reasoning"] is None
        assert row["finish_reason"] == "stop" and row["teacher"] == str(seven_model_dir)
        assert row["sampling"]["temperature"] == 1.0 and row["sampling"]["n"] == 4
    shard_of = {pid: k for k, shard in enumerate(json.loads((out / "plan.json").read_text())["shards"]) for pid in shard}
    assert all(r["seed"] == shard_seed(0, shard_of[r["prompt_id"]]) for r in kept + dropped)
    assert {r["prompt_id"] for r in kept} <= {e.id for e in examples.values() if e.gold == "7"}
    assert len(kept) == len({r["prompt_id"] for r in kept})  # one survivor per prompt: the rest are duplicates
    assert counts["duplicate"] >= 8
    assert all(not r["verdict"]["correct"] for r in dropped if r["gold"] == "8")
    model, _ = load_policy(str(seven_model_dir))
    assert manifest["weights_sha256"] == kept[0]["weights_sha256"] == state_sha256(model)
    assert manifest["decontamination"]["enabled"] and "gsm8k/test" in manifest["decontamination"]["splits"]
    index = json.loads((out / "index" / "shard-00000.json").read_text())
    assert [p["prompt_id"] for p in index["prompts"]] == ["seven/q0", "seven/q1", "seven/q2"]
    assert all(p["sampled"] == 4 and p["kept"] + sum(p["dropped"].values()) == 4 for p in index["prompts"])
    # a rerun of the finished run returns at once and rewrites nothing; other settings are refused
    before = {p: p.stat().st_mtime_ns for p in out.rglob("shard-*")}
    assert run_sample(cfg) == out and before == {p: p.stat().st_mtime_ns for p in out.rglob("shard-*")}
    with pytest.raises(ConfigError, match="num_samples"):
        run_sample(sample_config(**{**cfg.to_dict(), "num_samples": 2}))


def test_every_sample_failing_verification_is_one_clear_error(seven_model_dir, tmp_path):
    task = tmp_path / "eights.jsonl"
    task.write_text("".join(json.dumps({"question": f"What is {i} plus {8 - i}?", "answer": "8"}) + "\n"
                            for i in range(3)))
    cfg = sample_config(teacher=str(seven_model_dir), task=str(task), template="direct", num_samples=2,
                        max_tokens=4, output=str(tmp_path / "out"), decontaminate=False)
    with pytest.raises(R1kitError, match="every one of the 6 samples failed verification"):
        run_sample(cfg)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["kept"] == 0 and manifest["counts"]["verifier"] == 6
    assert len(read_rows(tmp_path / "out", "dropped")) == 6  # the failures stay listed


def _cli(out: Path, model: Path, task: Path) -> list[str]:
    return [sys.executable, "-m", "r1kit.cli", "sample", "--teacher", str(model), "--task", str(task),
            "--template", "direct", "--num-samples", "4", "--max-tokens", "8", "--prompts-per-shard", "1",
            "--decontaminate", "false", "--dedup", "false", "--seed", "5", "--output", str(out), "--no-progress"]


def test_sigkill_then_resume_equals_uninterrupted(seven_model_dir, tmp_path):
    """A real `r1kit sample` process killed with SIGKILL after its first shards, then rerun, writes
    exactly the rows of an uninterrupted run: none lost, none twice."""
    task = tmp_path / "seven.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in seven_task_rows(12)))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, seven_model_dir, task), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "shards" / "shard-00001.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((killed / "shards").glob("shard-*.jsonl")))
    assert 2 <= done_at_kill < 12, "the run must be killed part-way"
    assert not (killed / "manifest.json").exists()
    (killed / "shards" / ".shard-00009.jsonl.x.tmp").write_text('{"id": "half-written')  # a kill mid-write
    resumed = subprocess.run(_cli(killed, seven_model_dir, task), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = tmp_path / "whole"
    cfg = sample_config(teacher=str(seven_model_dir), task=str(task), template="direct", num_samples=4, max_tokens=8,
                        prompts_per_shard=1, decontaminate=False, dedup=False, seed=5, output=str(whole))
    run_sample(cfg, progress=False)
    for folder in ("shards", "dropped"):
        got, want = read_rows(killed, folder), read_rows(whole, folder)
        assert len({r["id"] for r in got}) == len(got)
        assert got == want
    assert json.loads((killed / "manifest.json").read_text())["counts"] == \
        json.loads((whole / "manifest.json").read_text())["counts"]
    assert not list(killed.rglob("*.tmp"))


def test_a_run_that_failed_before_sampling_reruns_with_other_settings(seven_model_dir, seven_task, tmp_path):
    """A teacher URL that refuses fails the first request, after plan.json is written; with nothing
    sampled, a rerun with another teacher and settings starts afresh (it used to be refused until the
    directory was removed). Once a shard is written, other settings are refused and nothing is lost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "out"
    refused = sample_config(teacher="teacher", teacher_url=f"http://127.0.0.1:{port}/v1", task=str(seven_task),
                            num_samples=1, max_retries=0, output=str(out), decontaminate=False)
    with pytest.raises(R1kitError, match="refused the connection"):
        run_sample(refused)
    assert (out / "plan.json").is_file()
    local = sample_config(teacher=str(seven_model_dir), task=str(seven_task), template="direct", num_samples=2,
                          max_tokens=8, prompts_per_shard=4, output=str(out), decontaminate=False)
    run_sample(local, resume=False)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["teacher"] == str(seven_model_dir) and plan["config"]["num_samples"] == 2
    assert json.loads((out / "manifest.json").read_text())["counts"]["sampled"] == 8 * 2
    kept = {p: p.read_bytes() for p in (out / "shards").glob("*.jsonl")}
    with pytest.raises(ConfigError, match="teacher_url"):
        run_sample(refused)
    assert kept == {p: p.read_bytes() for p in (out / "shards").glob("*.jsonl")}
    assert json.loads((out / "plan.json").read_text()) == plan
