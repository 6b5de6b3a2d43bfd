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
    flags = " ".join(capsys.readouterr().out.split()).split(" --")[1:]
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
