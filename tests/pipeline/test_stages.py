"""The stage runner on real tiny stages (a random 2-layer Llama, GRPO and evaluation): manifests,
skip on rerun, resume of an interrupted stage, --from/--until, bad input, the report."""

import json
from pathlib import Path

import pytest

from r1kit.errors import ConfigError, R1kitError
from r1kit.pipeline.manifest import read_manifest, sha256_path
from r1kit.pipeline.stages import EvalSettings, PipelineContext, Stage, run_stages

HERE = Path(__file__).parent
GRPO = dict(reward_funcs=["toy_rewards:distinct_chars"], num_generations=4, prompts_per_step=2,
            max_completion_length=8, learning_rate=1e-3, max_steps=2, save_steps=1, bf16="false",
            plot=False, log_completions_steps=0)


@pytest.fixture(autouse=True)
def _toy_rewards(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE.parent / "train"))


def _stages(rl2=None):
    return [Stage("base", "0_base", "eval", description="the base"),
            Stage("rl1", "1_rl1", "grpo", model="base", overrides=dict(GRPO), description="GRPO from the base"),
            Stage("rl2", "2_rl2", "grpo", model="rl1", overrides=dict(GRPO, **(rl2 or {})), description="GRPO again")]


def _ctx(out, tiny_model_dir, toy_task):
    common = {"grpo": dict(task=str(toy_task), template="direct", answer_extraction="any", seed=0, num_threads=1)}
    ev = EvalSettings(task=str(toy_task), split="test", limit=4, k=2, temperature=0.6, top_p=0.95, max_tokens=6,
                      template="direct", answer_extraction="any", seed=0)
    return PipelineContext(output=out, base_model=str(tiny_model_dir), common=common, eval=ev, progress=False)


def test_run_skip_rerun_and_changed_config(tiny_model_dir, toy_task, tmp_path, capsys):
    ctx = _ctx(tmp_path / "p", tiny_model_dir, toy_task)
    manifests = run_stages(_stages(), ctx)
    assert [m["stage"] for m in manifests] == ["base", "rl1", "rl2"]
    for m in manifests:
        assert m["status"] == "complete" and m["runs"] == 1 and m["cpu_seconds"] > 0
        assert m["eval"]["n_problems"] == 4 and m["eval"]["k"] == 2
    rl1 = read_manifest(tmp_path / "p" / "1_rl1")
    assert rl1["inputs"]["model"]["sha256"] == sha256_path(tiny_model_dir)
    assert rl1["artifact"] == {"path": "run/final", "sha256": sha256_path(tmp_path / "p" / "1_rl1" / "run" / "final")}
    assert rl1["counts"] == {"steps": 2} and rl1["config"]["learning_rate"] == 1e-3
    rl2 = read_manifest(tmp_path / "p" / "2_rl2")
    assert rl2["inputs"]["model"]["sha256"] == rl1["artifact"]["sha256"]  # stage 2 read stage 1's model
    assert rl2["artifact"]["sha256"] != rl1["artifact"]["sha256"]        # and trained it further
    ev = json.loads((tmp_path / "p" / "2_rl2" / "eval.json").read_text())
    assert len(ev["per_problem"]) == 4 and all(len(p["correct"]) == 2 for p in ev["per_problem"])

    capsys.readouterr()
    again = run_stages(_stages(), ctx)  # same config, same inputs: every stage skipped, nothing rewritten
    assert [m["finished"] for m in again] == [m["finished"] for m in manifests]
    assert capsys.readouterr().out.count("skipped") == 3

    with pytest.raises(R1kitError, match=r"stage rl2 .* another config .*config\.learning_rate.*delete"):
        run_stages(_stages(rl2={"learning_rate": 2e-3}), ctx)
    assert read_manifest(tmp_path / "p" / "2_rl2")["key"] == rl2["key"]  # nothing overwritten


def test_interrupted_stage_resumes_from_its_checkpoint(tiny_model_dir, toy_task, tmp_path, monkeypatch):
    from r1kit.train.grpo import GRPOTrainer

    ctx = _ctx(tmp_path / "p", tiny_model_dir, toy_task)
    stages = _stages(rl2={"max_steps": 3})
    original = GRPOTrainer.train

    def killed_after_one_step(self, progress=True, stop_after=None):
        if self.cfg.max_steps == 3:
            original(self, progress, stop_after=1)
            raise KeyboardInterrupt  # the process dies after checkpoint-1 of rl2
        return original(self, progress, stop_after)

    monkeypatch.setattr(GRPOTrainer, "train", killed_after_one_step)
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, ctx)
    m = read_manifest(tmp_path / "p" / "2_rl2")
    assert m["status"] == "running" and m["phase"] == "training"
    assert (tmp_path / "p" / "2_rl2" / "run" / "checkpoint-1").is_dir()
    monkeypatch.setattr(GRPOTrainer, "train", original)
    manifests = run_stages(stages, ctx)
    m = manifests[-1]
    assert m["status"] == "complete" and m["runs"] == 2 and m["counts"] == {"steps": 3}
    steps = [json.loads(x)["step"] for x in (tmp_path / "p" / "2_rl2" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # resumed at step 2: no step lost or logged twice
    assert [mm["runs"] for mm in manifests[:2]] == [1, 1]  # the finished stages were skipped


def test_from_until_and_missing_artifacts(tiny_model_dir, toy_task, tmp_path):
    ctx = _ctx(tmp_path / "p", tiny_model_dir, toy_task)
    with pytest.raises(R1kitError, match=r"stage rl2 needs the artifact of stage rl1.*does not exist.*--from rl1"):
        run_stages(_stages(), ctx, from_stage="rl2")
    done = run_stages(_stages(), ctx, until_stage="rl1")
    assert [m["stage"] for m in done] == ["base", "rl1"] and not (tmp_path / "p" / "2_rl2").exists()
    done = run_stages(_stages(), ctx, from_stage="rl2")
    assert [m["stage"] for m in done] == ["base", "rl1", "rl2"] and done[-1]["runs"] == 1
    with pytest.raises(ConfigError, match=r"--from 'rl9': no such stage; stages: base, rl1, rl2"):
        run_stages(_stages(), ctx, from_stage="rl9")
    with pytest.raises(ConfigError, match=r"--from rl2 comes after --until rl1"):
        run_stages(_stages(), ctx, from_stage="rl2", until_stage="rl1")


def test_bad_stage_config_is_one_error_before_any_work(tiny_model_dir, toy_task, tmp_path):
    ctx = _ctx(tmp_path / "p", tiny_model_dir, toy_task)
    with pytest.raises(ConfigError, match=r"pipeline stage rl2: .*unknown GRPO config field 'lerning_rate'"):
        run_stages(_stages(rl2={"lerning_rate": 1.0}), ctx)
    with pytest.raises(ConfigError, match=r"pipeline stage rl2: 'model' is set by the pipeline"):
        run_stages(_stages(rl2={"model": "x"}), ctx)
    assert not (tmp_path / "p").exists()
    bad = [Stage("base", "0_base", "eval"), Stage("rl", "1_rl", "grpo", model="later", overrides=dict(GRPO))]
    with pytest.raises(R1kitError, match=r"stage rl: model 'later' not found"):
        run_stages(bad, ctx)


def test_a_config_field_added_later_at_its_default_keeps_the_key():
    from dataclasses import asdict, dataclass

    from r1kit.pipeline.stages import stage_key

    @dataclass
    class Old:
        lr: float = 1.0

    @dataclass
    class New:
        lr: float = 1.0
        cpu_budget: float | None = None  # a field a newer r1kit added

    st = Stage("s", "1_s", "grpo")
    inputs = {"model": {"sha256": "ab"}}
    made = stage_key(st, Old(), asdict(Old()), inputs, None)
    old_manifest = {"config": asdict(Old()), "key": made}
    assert stage_key(st, New(), asdict(New()), inputs, old_manifest) == made
    assert stage_key(st, New(cpu_budget=5.0), asdict(New(cpu_budget=5.0)), inputs, old_manifest) != made
    assert stage_key(st, New(lr=2.0), asdict(New(lr=2.0)), inputs, old_manifest) != made
    assert stage_key(st, New(), asdict(New()), {"model": {"sha256": "cd"}}, old_manifest) != made
