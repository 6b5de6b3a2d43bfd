"""Run directories (r1kit/runs.py) and resume (r1kit/config.py ``check_resume_config``): a directory
holding a run of one kind is refused by every command of another kind, and a --resume that changes a
setting that changes the result is refused; each is one `error:` line, exit 2, nothing written."""

import dataclasses
import json

import pytest
import yaml

from r1kit.cli import main
from r1kit.config import RESUME_FIELDS_OF, GRPOConfig, SFTConfig, check_resume_config, save_config
from r1kit.errors import ConfigError
from r1kit.runs import run_kind


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    """A finished 1-step SFT run of the tiny Llama (config.yaml, metrics.jsonl, checkpoint-1, final/)."""
    tmp = tmp_path_factory.mktemp("sft_run")
    data = tmp / "traces.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus 1?", "reasoning": f"{a} and 1 make {a + 1}.",
                                        "answer": f"\\boxed{{{a + 1}}}"}) + "\n" for a in range(4)))
    out = tmp / "sft"
    assert main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--max-steps", "1", "--per-device-train-batch-size", "2", "--bf16", "false", "--plot", "false",
                 "--eval-limit", "none", "--no-progress"]) == 0
    return out


def _grpo_dir(tmp_path):
    """What ``TrainLoop.train`` writes first into a GRPO run directory: its config.yaml."""
    out = tmp_path / "grpo"
    out.mkdir()
    save_config(GRPOConfig(output=str(out)), out / "config.yaml")
    return out


def test_run_kind_reads_the_file_each_command_writes(tmp_path, sft_run):
    from r1kit.pipeline.distill import DistillConfig
    from r1kit.pipeline.r1 import R1PipelineConfig
    from r1kit.train.v3_distill import V3DistillConfig

    assert run_kind(sft_run) == ("train sft", "config.yaml")
    assert run_kind(_grpo_dir(tmp_path)) == ("train grpo", "config.yaml")
    for name, record, kind in (("r1", R1PipelineConfig().to_dict(), "pipeline r1"),
                               ("distill", DistillConfig().to_dict(), "distill"),
                               ("v3", dataclasses.asdict(V3DistillConfig()), "pretrain v3-distill")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipeline.yaml").write_text(yaml.safe_dump(record, sort_keys=False))  # as run_stages writes it
        assert run_kind(tmp_path / name) == (kind, "pipeline.yaml")
    stage = tmp_path / "pipe" / "1_cold_start"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text(json.dumps({"stage": "cold_start", "kind": "sft", "key": "ab", "status": "running"}))
    assert run_kind(stage) == ("pipeline stage", "manifest.json")
    assert run_kind(stage.parent) == ("pipeline", "1_cold_start/manifest.json")  # before pipeline.yaml is written
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "plan.json").write_text("{}")
    assert run_kind(tmp_path / "sample") == ("sample", "plan.json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("seed: 0\n")  # fields of both configs: no kind
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert run_kind(tmp_path / "other") is None and run_kind(tmp_path / "missing") is None


def test_train_grpo_resume_of_an_sft_run_says_it_is_an_sft_run(capsys, sft_run):
    """It said 'config.yaml: unknown GRPO config field 'data''."""
    before = _tree(sft_run)
    assert main(["train", "grpo", "--resume", "--output", str(sft_run), "--no-progress"]) == 2
    assert _err(capsys) == (f"error: --output {sft_run} holds an SFT run (its config.yaml), not a GRPO training run: "
                            f"choose another --output for this `r1kit train grpo`, or continue it with "
                            f"`r1kit train sft --resume --output {sft_run}`")
    assert _tree(sft_run) == before


@pytest.mark.parametrize("command, kind", [
    (["train", "grpo"], "a GRPO training run"), (["train", "grpo", "--resume", "--preset", "cpu_demo"], "a GRPO training run"),
    (["pipeline", "r1", "--preset", "cpu_r1"], "an R1 pipeline"), (["distill", "--preset", "rft_svamp"], "a distillation pipeline"),
    (["sample", "--teacher", "smollm2-135m-instruct", "--task", "gsm8k"], "a rejection-sampling run"),
    (["pretrain", "v3-distill"], "a v3-distill run"),
])
def test_commands_of_another_kind_refuse_an_sft_run_directory(capsys, sft_run, command, kind):
    before = _tree(sft_run)
    assert main([*command, "--output", str(sft_run), "--no-progress"]) == 2
    assert _err(capsys) == (f"error: --output {sft_run} holds an SFT run (its config.yaml), not {kind}: choose "
                            f"another --output for this `r1kit {' '.join(command[:2 if command[0] in ('train', 'pipeline', 'pretrain') else 1])}`, "
                            f"or continue it with `r1kit train sft --resume --output {sft_run}`")
    assert _tree(sft_run) == before


@pytest.mark.parametrize("command", [
    ["train", "sft"], ["train", "sft", "--resume"], ["distill", "--preset", "rft_svamp"],
    ["sample", "--teacher", "smollm2-135m-instruct", "--task", "gsm8k"],
])
def test_commands_of_another_kind_refuse_a_grpo_run_directory(capsys, tmp_path, command):
    out = _grpo_dir(tmp_path)
    before = _tree(out)
    assert main([*command, "--output", str(out), "--no-progress"]) == 2
    assert _err(capsys).startswith(f"error: --output {out} holds a GRPO training run (its config.yaml), not ")
    assert _tree(out) == before


def test_a_training_run_refuses_a_pipeline_directory(capsys, tmp_path):
    from r1kit.pipeline.r1 import R1PipelineConfig

    out = tmp_path / "pipe"
    out.mkdir()
    (out / "pipeline.yaml").write_text(yaml.safe_dump(R1PipelineConfig().to_dict(), sort_keys=False))
    assert main(["train", "sft", "--output", str(out), "--no-progress"]) == 2
    assert _err(capsys) == (f"error: --output {out} holds an R1 pipeline (its pipeline.yaml), not an SFT run: choose "
                            f"another --output for this `r1kit train sft`, or rerun `r1kit pipeline r1 --output {out}` "
                            "with its config to continue it")


def test_resume_with_settings_that_change_the_result_lists_them(capsys, sft_run):
    before = _tree(sft_run)
    assert main(["train", "sft", "--resume", "--output", str(sft_run), "--learning-rate", "1e-3", "--seed", "3",
                 "--max-steps", "2", "--no-progress"]) == 2
    assert _err(capsys) == (f"error: --resume of {sft_run} with settings that change the result: learning_rate: "
                            "2e-05 → 0.001; seed: 0 → 3. Resume with the run's own settings (--resume without "
                            f"--preset/--config reuses {sft_run / 'config.yaml'}), or start a new run with another "
                            "--output (r1kit/config.py RESUME_FIELDS lists what a resume may change)")
    assert _tree(sft_run) == before


def test_resume_may_extend_the_run_and_change_its_cadence_threads_and_evaluation(capsys, sft_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    capsys.readouterr()
    assert main(["train", "sft", "--resume", "--output", str(run), "--max-steps", "2", "--logging-steps", "2",
                 "--save-steps", "1", "--num-threads", "1", "--max-train-cpu-seconds", "600", "--eval-k", "2",
                 "--stop", "###", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out and (run / "checkpoint-2").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2


def test_the_allowed_fields_are_the_documented_list(tmp_path):
    """Every field of RESUME_FIELDS_OF may change; answer_extraction/stop only for SFT (its evaluation's),
    not for GRPO (they shape its rewards and sampling); a field an older config.yaml lacks is its default."""
    for cls in (GRPOConfig, SFTConfig):
        saved = tmp_path / f"{cls.__name__}.yaml"
        save_config(cls(), saved)
        cfg = cls()
        for f in dataclasses.fields(cls):
            if f.name in RESUME_FIELDS_OF[cls] and f.type in (int, "int", float, "float", bool, "bool", str, "str"):
                value = getattr(cfg, f.name)
                setattr(cfg, f.name, (not value) if isinstance(value, bool) else f"{value}/2" if isinstance(value, str)
                        else 2 * value + 1)
        check_resume_config(cfg, saved)
    save_config(GRPOConfig(), saved := tmp_path / "g.yaml")
    with pytest.raises(ConfigError, match=r"answer_extraction: 'tagged' → 'any'; stop: \[\] → \['###'\]\."):
        check_resume_config(GRPOConfig(answer_extraction="any", stop=["###"]), saved)
    old = yaml.safe_load(saved.read_text())
    del old["beta"]
    saved.write_text(yaml.safe_dump(old))
    check_resume_config(GRPOConfig(), saved)
    with pytest.raises(ConfigError, match="beta: 0.0 → 0.5"):
        check_resume_config(GRPOConfig(beta=0.5), saved)
