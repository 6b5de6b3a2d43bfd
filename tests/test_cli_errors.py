"""More bad input at the command line: each is one `error:` line, exit 2, before any work (no model
loaded, no child process started, nothing already written touched)."""

import pytest

from r1kit.cli import build_parser, main


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_serve_help_shows_each_default_once(capsys):
    """`--served-model-name` read '(default: MODEL as given) (default: None)'."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    options = " ".join(capsys.readouterr().out.split("options:")[1].split())
    flags = options.split(" --")[1:]                     # one entry per flag: its name, metavar and help
    assert len(flags) == 14 and all(f.count("default") <= 1 for f in flags), flags
    assert any(f.startswith("served-model-name") and f.endswith("(default: MODEL as given)") for f in flags)


@pytest.mark.parametrize("flag, value, accepted", [
    ("--dtype", "fp16", "auto, bf16, fp32"), ("--dtype", "foo", "auto, bf16, fp32"),
    ("--backend", "vllm", "auto, engine, hf"),
])
def test_serve_dtype_and_backend_list_exactly_the_accepted_values_before_loading(capsys, tmp_path, flag, value, accepted):
    """`--dtype foo` listed fp64, float16, ... after loading the model; `--dtype fp16` got past that list
    and failed in the engine. The model does not exist: a check after loading would say 'not found'."""
    assert main(["serve", str(tmp_path / "no_such_model"), flag, value]) == 2
    assert _err(capsys) == f"error: {flag} must be one of {accepted}, got {value!r}"
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert f"{flag} {flag[2:].upper()} " in help_text and f"one of {accepted} " in help_text


@pytest.mark.parametrize("value", ["fp16", "float16", "foo"])
def test_eval_dtype_names_the_flag_and_the_values_that_work_before_loading(capsys, tmp_path, toy_task, value):
    """`r1kit eval --dtype fp16` loaded the model, then failed in the engine naming torch.float16."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tmp_path / "no_such_model"), "--task", str(toy_task), "--dtype", value,
                 "--output", str(out)]) == 2
    assert _err(capsys) == f"error: --dtype must be one of auto, bf16, fp32, got {value!r}"
    assert not out.exists()
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "--dtype DTYPE sampling dtype: auto (bf16 only where the CPU has native bf16), bf16 or fp32" in help_text


@pytest.mark.parametrize("name", ["README.md", "notes"])
def test_sft_data_of_an_unsupported_format_names_the_accepted_extensions(capsys, tmp_path, tiny_model_dir, name):
    """It said the file was 'not a file, a directory, a task or a hub dataset name'."""
    data = tmp_path / "docs" / name
    data.parent.mkdir()
    data.write_text("# r1kit\n")
    out = tmp_path / "run"
    assert main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--no-progress"]) == 2
    kind = "a .md file" if name.endswith(".md") else "a file without an extension"
    assert _err(capsys) == (f"error: SFT data {data}: {kind} is not a format r1kit reads; pass a .jsonl, .json, "
                            ".parquet file, a sampler output directory, a task (gsm8k, gsm8k_easy) or a hub dataset "
                            "name (owner/name)")
    assert not out.exists()


@pytest.mark.parametrize("command, args, message", [
    ("v3-distill", ["--student-seconds", "nan"], "student_seconds must be > 0 CPU seconds and finite, got nan"),
    ("v3-distill", ["--teacher-grpo-seconds", "inf"], "teacher_grpo_seconds must be > 0 CPU seconds and finite, got inf"),
    ("v3-distill", ["--student-pretrain-seconds", "-1"], "student_pretrain_seconds must be > 0 CPU seconds and finite, got -1.0"),
    ("v3-distill", ["--eval-k", "0"], "eval_k must be >= 1, got 0"),
    ("v3-distill", ["--sample-limit", "0"], "sample_limit must be >= 1, got 0"),
    ("v3-distill", ["--model-preset", "tiny-3m"], "model_preset: unknown DeepSeek-V3 preset 'tiny-3m'; known presets: "
                                                  "['16b', '671b', 'tiny-10m', 'tiny-2m', 'tiny-50m']"),
    ("v3-zero", ["--max-seconds", "nan"], "max_seconds must be > 0 CPU seconds and finite, got nan"),
    ("v3-zero", ["--max-seconds", "inf"], "max_seconds must be > 0 CPU seconds and finite, got inf"),
    ("v3-zero", ["--eval-limit", "0"], "eval_limit must be >= 1, got 0"),
    ("v3-zero", ["--preset", "tiny-3m"], "preset: unknown DeepSeek-V3 preset 'tiny-3m'; known presets: "
                                         "['16b', '671b', 'tiny-10m', 'tiny-2m', 'tiny-50m']"),
])
def test_pretrain_budgets_counts_and_presets_are_checked_before_any_work(capfd, tmp_path, command, args, message):
    """NaN/inf/negative budgets and --eval-k 0 were taken; a bad --model-preset printed the error, then
    the student's child process printed its own traceback (capfd sees that process's stderr too)."""
    out = tmp_path / "run"
    assert main(["pretrain", command, "--output", str(out), "--no-progress", *args]) == 2
    captured = capfd.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {message}"] and captured.out == ""
    assert not out.exists()


@pytest.mark.parametrize("command", ["v3-distill", "v3-zero"])
def test_pretrain_output_that_is_a_file_is_one_error_and_the_file_is_kept(capsys, tmp_path, command):
    """v3-zero failed with NotADirectoryError's traceback; v3-distill started its child process first."""
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert main(["pretrain", command, "--output", str(out), "--no-progress"]) == 2
    assert _err(capsys) == f"error: --output {out} is an existing file; pass a directory"
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("trainer, preset", [("sft", "cpu_gsm8k"), ("grpo", "cpu_demo")])
def test_resume_without_a_checkpoint_fails_before_any_work(capsys, tmp_path, trainer, preset):
    """`--resume` of a directory with only config.yaml ran the full before-evaluation, wrote
    eval/before.json, then failed; of a directory that did not exist, it created it."""
    missing = tmp_path / "missing"
    assert main(["train", trainer, "--preset", preset, "--resume", "--output", str(missing),
                 "--eval-before", "true", "--eval-limit", "2"]) == 2
    assert "no complete checkpoint" in _err(capsys) and not missing.exists()
    started = tmp_path / "started"
    assert main(["train", trainer, "--preset", preset, "--output", str(started), "--print-config"]) == 0
    started.mkdir()
    (started / "config.yaml").write_text(capsys.readouterr().out)
    before = sorted(p.name for p in started.rglob("*"))
    assert main(["train", trainer, "--resume", "--output", str(started), "--eval-before", "true", "--eval-limit", "2"]) == 2
    assert "no complete checkpoint" in _err(capsys)
    assert sorted(p.name for p in started.rglob("*")) == before


def test_resume_whose_checkpoint_went_after_the_checks_names_that(tmp_path):
    """``check_run_dir`` found a checkpoint; removed before ``resume_latest`` loads it, the guard says
    so and gives the fix, instead of a bare "no complete checkpoint"."""
    import shutil

    from r1kit.config import SFTConfig
    from r1kit.errors import R1kitError
    from r1kit.train.recipe import check_run_dir, resume_latest

    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    check_run_dir(run, True, SFTConfig())                          # passes: there is a complete checkpoint
    shutil.rmtree(run / "checkpoint-2")
    with pytest.raises(R1kitError) as err:
        resume_latest(None, run)
    assert str(err.value) == (f"--resume: no complete checkpoint in {run} any more (there was one when the "
                              "run's checks ran: was it removed since?); run without --resume to start it")


@pytest.mark.parametrize("trainer, preset", [("sft", "cpu_sft_demo"), ("grpo", "cpu_demo")])
def test_fresh_start_over_the_logs_of_a_start_that_never_checkpointed_is_refused(capsys, tmp_path, trainer, preset):
    """A run interrupted at step 4, before its first checkpoint, started again without --resume appended
    to its metrics.jsonl: steps 1 2 3 4 1 2 3 4."""
    run = tmp_path / "sft4"
    run.mkdir()
    rows = "".join(f'{{"step": {i}, "loss": 1.0}}\n' for i in range(1, 5))
    (run / "metrics.jsonl").write_text(rows)
    assert main(["train", trainer, "--preset", preset, "--max-steps", "40", "--output", str(run)]) == 2
    assert _err(capsys) == (f"error: {run / 'metrics.jsonl'} holds the steps of an earlier start that stopped before "
                            f"its first checkpoint (nothing to --resume); choose another --output, or remove {run} "
                            "(or its metrics.jsonl) to start over")
    assert (run / "metrics.jsonl").read_text() == rows and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_demo_script_starts_over_a_run_that_never_checkpointed_and_resumes_one_that_did(tmp_path):
    """scripts/demo.sh (`make demo`), with a stand-in `.venv/bin/r1kit` that records its arguments: a run
    stopped before its first checkpoint is started over without --resume (its step logs removed, its
    eval/before.json kept), one with a checkpoint is resumed."""
    import shutil
    import subprocess
    from pathlib import Path

    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "scripts" / "demo.sh", root / "scripts" / "demo.sh")
    fake = root / ".venv" / "bin" / "r1kit"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "$@" > args.txt\nls runs/demo runs/demo/eval > files.txt\n')
    fake.chmod(0o755)
    run = root / "runs" / "demo"
    (run / "eval").mkdir(parents=True)
    for name in ("metrics.jsonl", "samples.jsonl", "eval/before.json"):
        (run / name).write_text("{}\n")
    subprocess.run(["bash", str(root / "scripts" / "demo.sh")], check=True, capture_output=True)
    assert (root / "args.txt").read_text().split() == [
        "train", "sft", "--preset", "cpu_gsm8k", "--output", "runs/demo", "--eval-before", "true", "--eval-after", "true"]
    assert (root / "files.txt").read_text().split() == ["runs/demo:", "eval", "runs/demo/eval:", "before.json"]
    (run / "checkpoint-5").mkdir()
    subprocess.run(["bash", str(root / "scripts" / "demo.sh")], check=True, capture_output=True)
    assert (root / "args.txt").read_text().split()[-1] == "--resume"


@pytest.mark.parametrize("raised", ["oserror", "safetensors"])
def test_a_full_disk_mid_write_is_one_error_exit_1_and_the_previous_artifact_is_kept(capsys, tmp_path, tiny_model_dir,
                                                                                    monkeypatch, raised):
    """A full disk (errno 28) while writing an artifact was a traceback; the previous artifact must stay."""
    import errno
    import os

    from safetensors import SafetensorError

    import r1kit.io

    out = tmp_path / "exported"
    assert main(["export", str(tiny_model_dir), "--format", "hf", "--output", str(out)]) == 0
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full(path):
        if raised == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "model.safetensors"))
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(r1kit.io, "apply_umask", full)  # after the files are written, before the rename
    assert main(["export", str(tiny_model_dir), "--format", "hf", "--output", str(out)]) == 1
    err = _err(capsys)
    where = (f"on {tmp_path}/.exported.tmp" if raised == "oserror" else "writing safetensors: Error while serializing")
    assert err.startswith(f"error: the system failed {where}") and "No space left on device" in err, err
    assert err.endswith("artifacts and checkpoints are written atomically, so none already written was changed; "
                        "fix the cause and rerun (a training run: with --resume)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous and "model.safetensors" in previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary left behind
    monkeypatch.setattr(r1kit.io, "apply_umask", lambda path: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        main(["export", str(tiny_model_dir), "--format", "hf", "--output", str(out)])
