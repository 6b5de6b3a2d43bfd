"""The R1 pipeline's config: presets, YAML stage sections, and bad input (one clear error each)."""

import subprocess
import sys
from pathlib import Path

import pytest

from r1kit.errors import ConfigError, R1kitError
from r1kit.pipeline.r1 import STAGE_NUMBERS_FROM, STAGE_NUMBERS_UNTIL, load_r1_config, r1_stages, resolve_stage_flag

ROOT = Path(__file__).parents[2]


def test_cpu_r1_graph_restarts_stage_3_from_the_base():
    cfg = load_r1_config("cpu_r1")
    stages = {s.name: s for s in r1_stages(cfg)}
    assert [s.name for s in r1_stages(cfg)] == ["base", "cold_start", "reasoning_rl", "rejection_sampling",
                                               "rejection_sft", "final_rl"]
    assert stages["reasoning_rl"].model == "cold_start" and stages["rejection_sampling"].model == "reasoning_rl"
    assert stages["rejection_sft"].model == "base"  # R1: stage 3 SFT starts from the base again
    assert stages["rejection_sft"].data == ["gsm8k", "rejection_sampling"]
    assert stages["final_rl"].model == "rejection_sft"
    assert cfg.eval_task == "gsm8k" and cfg.eval_split == "test" and cfg.eval_limit == 200
    assert resolve_stage_flag("3", STAGE_NUMBERS_FROM) == "rejection_sampling"
    assert resolve_stage_flag("3", STAGE_NUMBERS_UNTIL) == "rejection_sft"
    with pytest.raises(ConfigError, match=r"^--until: -1 is not a stage; use 0-4 or one of: base, cold_start, "):
        resolve_stage_flag("-1", STAGE_NUMBERS_UNTIL, "--until", [s.name for s in r1_stages(cfg)])


def test_yaml_section_updates_the_preset_field_by_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("eval_limit: 50\nreasoning_rl:\n  max_steps: 3\n")
    cfg = load_r1_config("cpu_r1", str(path), {"output": str(tmp_path / "out")})
    assert cfg.eval_limit == 50 and cfg.reasoning_rl["max_steps"] == 3
    assert cfg.reasoning_rl["learning_rate"] == 2e-5  # the rest of the preset's section is kept
    assert cfg.output == str(tmp_path / "out")


@pytest.mark.parametrize("text, match", [
    ("cold_strat:\n  max_steps: 3\n", r"'cold_strat' is neither a pipeline stage \(cold_start, reasoning_rl, "
                                      r"rejection_sampling, rejection_sft, final_rl\) nor a pipeline field"),
    ("final_rl: 3\n", r"stage section final_rl must be a mapping"),
    ("eval_k: 0\n", r"eval_k must be >= 1"),
    ("[1, 2]\n", r"must hold a mapping"),
])
def test_bad_pipeline_config_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_r1_config(None, str(path))


def _cli(*args):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "r1kit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "p"
    cases = [
        (["--preset", "cpu_r1", "--from", "cold_strat"], "error: --from 'cold_strat': no such stage; stages: base, "
                                                         "cold_start, reasoning_rl"),
        (["--preset", "cpu_r1", "--from", "9"], "error: --from: 9 is not a stage; use 0-4 or one of: base, cold_start, "
                                                "reasoning_rl, rejection_sampling, rejection_sft, final_rl"),
        (["--preset", "nope"], "error: unknown pipeline preset 'nope'; presets: cpu_r1, r1"),
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["--preset", "cpu_r1", "--model", str(tmp_path / "no-model")], "error: stage base: model "),
        (["--preset", "cpu_r1", "--from", "rejection_sft"], "error: stage rejection_sft needs the artifact of stage "
                                                            "rejection_sampling"),
    ]
    for args, expected in cases:
        r = _cli("pipeline", "r1", *args, "--output", str(out), "--no-progress")
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, r.stderr)
    assert not (out / "1_cold_start").exists()


def test_stage_section_naming_a_graph_field_is_refused(tmp_path):
    from r1kit.pipeline.r1 import run_r1_pipeline

    cfg = load_r1_config("cpu_r1", None, {"output": str(tmp_path / "p")})
    cfg.cold_start = {**cfg.cold_start, "data": "other.jsonl"}
    with pytest.raises(R1kitError, match=r"pipeline stage cold_start: 'data' is set by the pipeline"):
        run_r1_pipeline(cfg, until_stage="cold_start", progress=False)


def test_eval_stop_typed_on_the_command_line_decodes_escapes_like_stop():
    # `--eval-stop '\n'` arrives as backslash + n; it means a newline, as `r1kit sample --stop` reads it
    cfg = load_r1_config("cpu_r1", overrides={"eval_stop": "\\n,###"})
    assert cfg.eval_stop == ["\n", "###"]
    assert load_r1_config("cpu_r1", overrides={"eval_stop": ["\\n"]}).eval_stop == ["\\n"]  # YAML lists stay literal


def test_an_output_that_is_a_file_is_one_error_before_any_work(tmp_path, capsys):
    """`pipeline r1 --output README.md` was a FileExistsError traceback (distill the same: one runner)."""
    from r1kit.cli import main

    notes = tmp_path / "README.md"
    notes.write_text("keep me")
    for command in (["pipeline", "r1", "--preset", "cpu_r1"], ["distill", "--preset", "rft_svamp"]):
        assert main([*command, "--output", str(notes), "--no-progress"]) == 2, command
        assert f"--output {notes} is an existing file; pass a directory" in capsys.readouterr().err
    assert notes.read_text() == "keep me"
