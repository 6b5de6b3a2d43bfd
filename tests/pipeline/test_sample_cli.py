"""`r1kit sample` on bad input: one `error:` line naming the field or flag, exit status 2."""

import json
import socket

import pytest

from r1kit.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, needle", [
    (["--languages", "en,xx"], "unknown language code 'xx': give an ISO 639-1 code"),
    (["--num-samples", "0"], "num_samples must be >= 1"),
    (["--min-language-consistency", "1.5"], "min_language_consistency must be in [0, 1]"),
    (["--teacher-url", "localhost:8000"], "teacher_url must be an http(s) URL"),
    (["--teacher-url", "http://127.0.0.1:9/v1", "--teacher-api", "completions"], "give teacher_tokenizer"),
    (["--temperature", "hot"], "temperature: cannot read 'hot'"),
    (["--preset", "nope"], "unknown sample preset 'nope'"),
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
])
def test_sample_config_errors(capsys, tmp_path, args, needle):
    assert main(["sample", "--output", str(tmp_path / "out"), *args]) == 2
    assert needle in _err(capsys)


def test_refused_teacher_url(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "2"}) + "\n")
    rc = main(["sample", "--teacher-url", f"http://127.0.0.1:{port}/v1", "--task", str(task), "--num-samples", "1",
               "--max-retries", "0", "--decontaminate", "false", "--output", str(tmp_path / "out")])
    assert rc == 2 and "refused the connection" in _err(capsys)
    assert (tmp_path / "out" / "plan.json").is_file()  # what was written stays: a rerun resumes
    # nothing was sampled, so a rerun with other settings is not refused for them (it meets the URL again)
    rc = main(["sample", "--teacher-url", f"http://127.0.0.1:{port}/v1", "--task", str(task), "--num-samples", "2",
               "--max-retries", "0", "--decontaminate", "false", "--output", str(tmp_path / "out")])
    assert rc == 2 and "refused the connection" in _err(capsys)
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["config"]["num_samples"] == 2


def test_output_that_holds_something_else(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["sample", "--output", str(tmp_path / "out")]) == 2
    assert "is not a sample run directory" in _err(capsys)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
