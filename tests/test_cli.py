"""The command line: bad input gives one `error:` line naming the field and exit status 2 (no
traceback unless --debug); `r1kit eval` writes its JSON and markdown reports; `--print-config` shows
the resolved GRPO config."""

import json
from pathlib import Path

import pytest
import yaml

from r1kit.cli import main, report_name
from r1kit.config import load_config


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, needle", [
    (["--num-generations", "1"], "num_generations must be >= 2"),
    (["--prompts-per-step", "3", "--num-generations", "2", "--steps-per-generation", "4"], "not divisible by steps_per_generation"),
    (["--learning-rate", "abc"], "learning_rate: cannot read 'abc'"),
    (["--loss-type", "ppo"], "loss_type must be one of"),
    (["--max-completion-length", "0"], "max_completion_length must be >= 1"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["--preset", "no_such_preset"], "unknown preset 'no_such_preset'; known presets: cpu_demo, cpu_demo_gsm8k, dapo"),
    (["--rollout-importance-sampling-mode", "tis"], "rollout_importance_sampling_mode must be one of"),
    (["--rollout-importance-sampling-clip-max", "0.5"], "rollout_importance_sampling_clip_max must be >= 1, got 0.5"),
    (["--rollout-importance-sampling-mode", "token_truncate", "--rollout-importance-sampling-clip-max", "none"],
     "token_truncate needs rollout_importance_sampling_clip_max or rollout_importance_sampling_clip_min"),
])
def test_train_config_errors(capsys, tmp_path, args, needle):
    assert main(["train", "grpo", "--output", str(tmp_path / "r"), *args]) == 2
    assert needle in _err(capsys)


def test_missing_model(capsys, tmp_path, toy_task):
    rc = main(["train", "grpo", "--model", str(tmp_path / "nope"), "--task", str(toy_task), "--output", str(tmp_path / "r")])
    assert rc == 2 and "not found" in _err(capsys)


def test_completion_budget_too_small_for_template(capsys, tmp_path, toy_task, tiny_model_dir):
    rc = main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(toy_task), "--template", "chat_boxed",
               "--max-completion-length", "3", "--output", str(tmp_path / "r")])
    assert rc == 2 and "too small for template 'chat_boxed'" in _err(capsys)


def test_bad_rows_name_the_row(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    rc = main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(bad), "--output", str(tmp_path / "r")])
    line = _err(capsys)
    assert rc == 2 and "row 2" in line and "bad.jsonl" in line
    bad.write_text('{"question": "1+1?", "answer": "\\\\frac{"}\n')
    rc = main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(bad), "--output", str(tmp_path / "r")])
    line = _err(capsys)
    assert rc == 2 and "row 1" in line


def test_debug_shows_traceback(tmp_path):
    from r1kit.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "grpo", "--num-generations", "1", "--output", str(tmp_path / "r")])


def test_existing_run_needs_resume(capsys, tmp_path, toy_task, tiny_model_dir):
    (tmp_path / "r" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "r" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    rc = main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(toy_task), "--output", str(tmp_path / "r")])
    assert rc == 2 and "--resume" in _err(capsys)


def test_eval_writes_reports(capsys, tmp_path, toy_task, tiny_model_dir):
    out = tmp_path / "ev"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", str(toy_task), "--k", "2", "--limit", "3",
               "--max-tokens", "4", "--template", "direct", "--dtype", "fp32", "--output", str(out)])
    assert rc == 0
    name = "toy_k2"  # a local file's report is named after its stem (it has no split)
    data = json.loads((out / f"{name}.json").read_text())
    assert data["n_problems"] == 3 and data["k"] == 2 and len(data["per_problem"]) == 3
    assert all(len(p["correct"]) == 2 for p in data["per_problem"])
    md = (out / f"{name}.md").read_text()
    assert "| pass@1 |" in md and "| prior-free pass@1 |" in md
    # a local file has no training split: that baseline is named as not computed, the rest is reported
    assert f"not computed: {toy_task} is a local file, which has no training split" in md
    priors = json.loads((out / f"{name}.priors.json").read_text())
    assert priors["results"][str(tiny_model_dir)]["answers"]["n"] == 6
    assert priors["baselines"]["eval_mode"]["accuracy"] == pytest.approx(1 / 3)  # golds 1, 3, 5: each 1/3


def test_invalid_yaml_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward_funcs: [accuracy\nbeta: 0\n")
    assert main(["train", "grpo", "--config", str(bad), "--output", str(tmp_path / "r")]) == 2
    line = _err(capsys)
    assert "bad.yaml is not valid YAML at line" in line


def test_overlong_training_prompt_is_refused_before_any_work(capsys, tmp_path, tiny_model_dir):
    """A training prompt longer than max_prompt_length is an error naming the row before the first
    step (it used to surface mid-run, when the row was first drawn)."""
    task = tmp_path / "t.jsonl"
    rows = [{"question": "What is 1 plus 2?", "answer": "3"}] * 5 + [{"question": "word " * 300, "answer": "1"}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r"
    rc = main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(task), "--template", "r1_zero",
               "--max-prompt-length", "150", "--num-generations", "2", "--prompts-per-step", "1",
               "--max-completion-length", "16", "--output", str(out), "--eval-before", "false"])
    err = _err(capsys)
    assert rc == 2 and "prompt of t/5 " in err and "> max_prompt_length=150" in err
    assert not (out / "metrics.jsonl").exists()


def test_eval_takes_stop_strings(capsys, tmp_path, toy_task, tiny_model_dir):
    out = tmp_path / "ev"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", str(toy_task), "--k", "1", "--limit", "2",
               "--max-tokens", "4", "--template", "direct", "--dtype", "fp32", "--stop", "\\n", "--output", str(out)])
    assert rc == 0
    data = json.loads(next(out.glob("*.json")).read_text())
    assert data["settings"]["stop"] == ["\n"]


def test_grpo_help_says_presets_override_the_defaults_shown(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "grpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert e.value.code == 0
    assert "The defaults shown are the base GRPOConfig values: --preset overrides them" in text
    assert "presets: cpu_demo, cpu_demo_gsm8k, dapo, dr_grpo, r1, r1_zero." in text
    assert "per completion (default: 256)" in text  # the base max_completion_length; cpu_demo sets 48


def test_print_config_shows_the_resolved_preset_without_loading_a_model(capsys, tmp_path):
    """The model path does not exist: nothing is loaded. The YAML is the preset over the defaults,
    flags over the preset, and loads back into the same config."""
    base = ["train", "grpo", "--model", str(tmp_path / "no_such_model"), "--print-config"]
    assert main([*base, "--preset", "cpu_demo"]) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert (cfg["num_generations"], cfg["stop"], cfg["task"], cfg["max_completion_length"]) == (8, ["\n"], "svamp", 48)
    assert cfg["model"] == str(tmp_path / "no_such_model") and cfg["epsilon"] == 0.2  # a field the preset leaves
    (tmp_path / "c.yaml").write_text(printed)
    assert load_config(yaml_path=str(tmp_path / "c.yaml")) == load_config("cpu_demo", overrides={"model": cfg["model"]})
    assert main([*base, "--preset", "cpu_demo", "--num-generations", "4", "--stop", "###"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["num_generations"], cfg["stop"], cfg["task"]) == (4, ["###"], "svamp")


def test_eval_report_names():
    assert report_name("gsm8k", "test", 1) == "gsm8k_test_k1"
    assert report_name("owner/dataset", "train", 4) == "owner_dataset_train_k4"
    assert report_name("data/dir/my.file.jsonl", "test", 1) == "my.file_k1"
    assert report_name("probs.parquet", "validation", 2) == "probs_k2"


@pytest.mark.parametrize("args, needle", [
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--max-tokens", "-3"], "--max-tokens must be >= 1, got -3"),
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--limit", "-1"], "--limit must be >= 1, got -1"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
])
def test_eval_counts_and_sampling_values_are_refused_before_any_model_loads(capsys, tmp_path, toy_task, args, needle):
    """The model does not exist: the value is refused first (a later check would say 'not found')."""
    rc = main(["eval", "--model", str(tmp_path / "no_such_model"), "--task", str(toy_task), *args])
    assert rc == 2 and _err(capsys) == f"error: {needle}"


def test_eval_output_that_is_a_file_is_refused_before_any_model_loads(capsys, tmp_path, toy_task):
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    rc = main(["eval", "--model", str(tmp_path / "no_such_model"), "--task", str(toy_task), "--output", str(existing)])
    assert rc == 2 and _err(capsys) == f"error: --output {existing} is an existing file; pass a directory"
    assert existing.read_text() == "keep me"


def test_eval_on_an_empty_task_file_names_it(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", str(empty)])
    assert rc == 2 and _err(capsys) == f"error: task {str(empty)!r} split 'test' has no problems to evaluate"


def test_eval_takes_the_answer_prior_from_the_run_else_the_tasks_train_split(toy_task):
    import argparse

    from r1kit.cli import prior_golds

    args = argparse.Namespace(task="svamp", prompt_field=None, answer_field=None)
    golds, source = prior_golds(args, {})
    assert len(golds) == 700 and source == "700 training problems of svamp/train"
    golds, source = prior_golds(argparse.Namespace(task=str(toy_task), prompt_field=None, answer_field=None),
                                {"task": "svamp", "train_split": "train", "max_train_examples": 10})
    assert len(golds) == 10 and source == "10 training problems of svamp/train"  # the run's own training data
    golds, source = prior_golds(argparse.Namespace(task=str(toy_task), prompt_field=None, answer_field=None), {})
    assert golds is None and source == f"{toy_task} is a local file, which has no training split to take the answer prior from"


@pytest.mark.parametrize("make_args", [
    lambda f: ["train", "grpo", "--preset", "cpu_demo", "--output", f],
    lambda f: ["train", "sft", "--preset", "cpu_sft_demo", "--output", f],
    lambda f: ["sample", "--preset", "cpu_demo", "--output", f],
    lambda f: ["export", "smollm2-135m-instruct", "--format", "hf", "--output", f],
    lambda f: ["export", "smollm2-135m-instruct", "--format", "gguf", "--output", f + "/x.gguf"],
])
def test_output_that_is_a_file_is_one_error(capsys, tmp_path, make_args):
    """--output naming an existing file (or a path under one) is refused before any model loads."""
    path = tmp_path / "afile"
    path.write_text("keep me")
    assert main(make_args(str(path))) == 2
    assert "afile" in _err(capsys)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("make_args", [
    lambda f, m: ["train", "grpo", "--preset", "cpu_demo", "--max-steps", "1", "--output", f],
    lambda f, m: ["train", "sft", "--preset", "cpu_sft_demo", "--max-steps", "1", "--output", f],
    lambda f, m: ["eval", "--model", m, "--task", "gsm8k", "--limit", "1", "--output", f],
    lambda f, m: ["export", m, "--format", "gguf", "--output", f + ".gguf"],
    lambda f, m: ["export", m, "--format", "hf", "--output", f],
    lambda f, m: ["sample", "--preset", "cpu_demo", "--output", f],
    lambda f, m: ["pipeline", "r1", "--preset", "cpu_r1", "--output", f],
    lambda f, m: ["distill", "--preset", "rft_svamp", "--output", f],
    lambda f, m: ["pretrain", "v3-zero", "--output", f],
])
def test_output_that_cannot_be_created_is_one_error_before_any_work(capsys, tmp_path, make_args):
    """`--output /proc/r1` was a FileNotFoundError traceback from the metrics logger, or (eval) came after
    the whole evaluation, losing its results. The model does not exist: a check after loading would say
    'not found'."""
    out = "/proc/r1kit-no-such/run"
    assert main(make_args(out, str(tmp_path / "no_such_model"))) == 2
    err = _err(capsys)
    assert err.startswith(f"error: --output {out}") and "cannot be written: No such file or directory" in err, err


def test_output_in_a_read_only_directory_is_one_error_before_any_work(capsys, tmp_path, toy_task, monkeypatch):
    """A read-only mount (errno 30) made `r1kit eval` crash in save_result after the whole evaluation."""
    import errno
    import os

    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    out = tmp_path / "ro" / "ev"
    assert main(["eval", "--model", str(tmp_path / "no_such_model"), "--task", str(toy_task), "--output", str(out)]) == 2
    err = _err(capsys)
    assert err.startswith(f"error: --output {out} cannot be written: Read-only file system ({out}/.r1kit-write-probe.")
    assert not (tmp_path / "ro").exists()  # the directories the check made are removed again


def test_gguf_output_that_is_a_directory_is_one_error(capsys, tmp_path):
    assert main(["export", "smollm2-135m-instruct", "--format", "gguf", "--output", str(tmp_path)]) == 2
    assert "is an existing directory" in _err(capsys)


def test_serve_port_out_of_range_is_one_error(capsys):
    assert main(["serve", "smollm2-135m-instruct", "--port", "99999"]) == 2
    assert "--port must be in 0..65535" in _err(capsys)


@pytest.mark.parametrize("command, args, needle", [
    (["train", "grpo"], ["--temperature", "nan"], "temperature must be > 0 for GRPO sampling, got nan"),
    (["train", "grpo"], ["--temperature", "inf"], "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (["train", "grpo"], ["--top-k", "-1"], "top_k must be >= 0 (0 = off), got -1"),
    (["train", "grpo"], ["--eval-temperature", "-1"], "eval_temperature must be a finite number >= 0"),
    (["train", "sft"], ["--eval-top-p", "2"], "eval_top_p must be in (0, 1], got 2.0"),
    (["pipeline", "r1"], ["--preset", "cpu_r1", "--eval-temperature", "-0.5"], "eval_temperature must be a finite"),
    (["sample"], ["--teacher", "no_such_model", "--task", "gsm8k", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
])
def test_sampling_fields_are_refused_before_any_model_loads(capsys, tmp_path, command, args, needle):
    """An evaluation temperature of a training run was read only when the run evaluated, after training.
    The model does not exist: a check after loading would say 'not found'."""
    model = [] if command == ["sample"] else ["--model", str(tmp_path / "no_such_model")]
    assert main([*command, "--output", str(tmp_path / "r"), *model, *args]) == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "r").exists()


def _leaf_parsers(parser, path=()):
    """(subcommand words, parser) of every subcommand that takes flags itself."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_an_unknown_flag_shows_the_subcommands_usage_and_names_the_flag(capsys):
    """Plain argparse hands a subparser's unknown flags up to `r1kit`, whose usage lists no subcommand flag."""
    from r1kit.cli import build_parser

    leaves = dict(_leaf_parsers(build_parser()))
    assert sorted(" ".join(p) for p in leaves) == [
        "distill", "eval", "export", "pipeline r1", "pretrain v3-distill", "pretrain v3-zero", "sample", "serve",
        "tasks", "train grpo", "train sft"]
    for path, parser in leaves.items():
        required = []  # what the subcommand needs before it reads further (its required flags and positionals)
        for action in parser._actions:
            if not action.option_strings and action.dest != "help":
                required.append("x")
            elif action.required:
                required += [action.option_strings[0], "x"]
        with pytest.raises(SystemExit) as exit_:
            main([*path, *required, "--bogus", "1"])
        err = capsys.readouterr().err
        name = "r1kit " + " ".join(path)
        assert exit_.value.code == 2, path
        assert err.startswith(f"usage: {name} ") and f"\n{name}: error: unrecognized arguments: --bogus 1\n" in err, err
    with pytest.raises(SystemExit):
        main(["--bogus", "tasks"])  # a top-level unknown flag: the top-level usage
    assert capsys.readouterr().err.splitlines()[-1] == "r1kit: error: unrecognized arguments: --bogus"


def test_serve_token_budget_below_the_slots_is_one_error_before_loading(capsys):
    assert main(["serve", "smollm2-135m-instruct", "--max-num-seqs", "32", "--max-num-batched-tokens", "16"]) == 2
    assert "--max-num-batched-tokens must be 0 (whole prompts) or >= --max-num-seqs (32)" in _err(capsys)


def test_nproc_that_cannot_share_the_batch_is_one_error_before_torchrun(capsys, tmp_path):
    """It was printed once per rank, then torchrun's ChildFailedError traceback."""
    assert main(["train", "grpo", "--preset", "cpu_demo", "--nproc", "3", "--output", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert err.count("error:") == 1 and "is not divisible by the 3 processes" in err
    assert main(["train", "sft", "--preset", "cpu_sft_demo", "--nproc", "3", "--output", str(tmp_path / "s")]) == 2
    assert "examples_per_step (per_device_train_batch_size × gradient_accumulation_steps" in _err(capsys)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_serve_on_a_port_in_use_is_one_error_before_loading(capsys):
    """It was uvicorn's 'ERROR: [Errno 98] ... address already in use' after the model loaded, exit 3."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "smollm2-135m-instruct", "--port", str(port)]) == 2
    err = _err(capsys)
    assert f"--port {port} on 127.0.0.1 cannot be bound" in err and "--port 0 for a free one" in err
    assert main(["serve", "smollm2-135m-instruct", "--shutdown-timeout", "nan"]) == 2
    assert "--shutdown-timeout must be finite and >= 0" in _err(capsys)


def test_eval_first_line_names_the_compute_path_as_serve_does(capsys, tmp_path, toy_task, tiny_model_dir):
    """eval did not say whether the engine ran the C kernels or torch ops; serve's first line did. The
    tiny model's head_dim 8 is no multiple of 16, so the kernels, where built, are not used for it."""
    from r1kit.models.loading import load_policy
    from r1kit.rollout import native
    from r1kit.serve.runner import make_serving_engine

    rc = main(["eval", "--model", str(tiny_model_dir), "--task", str(toy_task), "--limit", "1", "--max-tokens", "2",
               "--template", "direct", "--dtype", "fp32", "--output", str(tmp_path / "ev")])
    assert rc == 0
    path = ("torch ops: C kernels on, not for torch.float32 with head_dim 8" if native.enabled()
            else f"torch ops: C kernels {native.status()}")
    assert capsys.readouterr().out.splitlines()[0] == f"r1kit eval: {tiny_model_dir} on r1kit engine (torch.float32, {path})"
    model, tok = load_policy(str(tiny_model_dir))
    _, label = make_serving_engine(model, tok, "engine", "fp32", max_num_seqs=2, max_model_len=64)
    assert label.endswith(f", {path})")  # serve's first line names it in the same words


def test_eval_keeps_finished_problems_when_interrupted_and_resumes_them(capsys, monkeypatch, tmp_path, toy_task,
                                                                        tiny_model_dir):
    """eval wrote nothing until every problem was done: a Ctrl-C lost the whole run. Now each problem's
    record is appended to <report>.partial.jsonl as it is scored; an interruption says how many are
    kept and where, and --resume samples only the rest. Greedy, so the resumed run must equal an
    uninterrupted one."""
    from r1kit.eval.evaluate import PartialRecords

    argv = ["eval", "--model", str(tiny_model_dir), "--task", str(toy_task), "--limit", "5", "--max-tokens", "4",
            "--template", "direct", "--dtype", "fp32", "--temperature", "0"]
    out = tmp_path / "ev"
    append = PartialRecords.append

    def interrupt_after_two(self, row):
        append(self, row)
        if self.count == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialRecords, "append", interrupt_after_two)
    assert main(argv + ["--output", str(out)]) == 130
    partial = out / "toy_k1.partial.jsonl"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: 2 of 5 problems done, their records are in {partial} "
                   "(rerun with --resume to continue)"]
    lines = partial.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["settings"]["max_tokens"] == 4
    assert not (out / "toy_k1.json").exists()
    kept = [json.loads(line) for line in lines[1:]]
    monkeypatch.setattr(PartialRecords, "append", append)

    assert main(argv + ["--output", str(out)]) == 2  # a rerun without --resume does not overwrite them
    assert "pass --resume to reuse them, or delete it to start over" in _err(capsys)
    assert main(argv + ["--output", str(out), "--k", "1", "--max-tokens", "5", "--resume"]) == 2
    assert _err(capsys).endswith("was written with max_tokens = 4, this run has 5: rerun with the same arguments, "
                                 "or delete the file to start over")
    with partial.open("a") as f:
        f.write('{"id": "cut off mid-wr')  # what a kill during a write leaves: dropped on resume
    assert main(argv + ["--output", str(out), "--resume"]) == 0
    assert f"2 reused from {partial}" in capsys.readouterr().out
    resumed = json.loads((out / "toy_k1.json").read_text())
    assert not partial.exists() and resumed["per_problem"][:2] == kept
    assert main(argv + ["--output", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "toy_k1.json").read_text())
    assert resumed == whole and len(whole["per_problem"]) == 5


def test_check_writable_leaves_the_dirs_it_made_under_torchrun(tmp_path, monkeypatch):
    """Alone it removes the directories it made for its probe; as one rank of a torchrun it keeps them,
    since another rank may have checked the same path and be about to write there."""
    from r1kit.io import check_writable

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_writable(tmp_path / "a" / "b", "dir")
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_writable(tmp_path / "a" / "b", "dir")
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
