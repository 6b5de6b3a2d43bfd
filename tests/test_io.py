"""Atomic writes (r1kit/io.py) and the writers built on them (checkpoints, HF directories, GGUF files):
a failure while writing leaves the previous artifact exactly as it was and no temporary sibling behind;
a finished write replaces the whole previous artifact."""

import os

import pytest
import torch

from r1kit.io import atomic_dir, atomic_file, write_atomic


def _tree(root):
    """{relative path: bytes} of every file below ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def old_dir(tmp_path):
    out = tmp_path / "final"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "sub" / "config.json").write_text('{"old": true}')
    return out


def test_a_finished_directory_replaces_the_old_one_whole(old_dir):
    with atomic_dir(old_dir) as tmp:
        assert tmp.parent == old_dir.parent and tmp.name.startswith(".final.tmp") and not list(tmp.iterdir())
        (tmp / "model.safetensors").write_bytes(b"new weights")
    assert _tree(old_dir) == {"model.safetensors": b"new weights"}  # sub/config.json of the old one is gone
    assert os.listdir(old_dir.parent) == ["final"]


def test_a_failure_mid_write_keeps_the_old_directory_and_leaves_no_temporary(old_dir):
    before = _tree(old_dir)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(old_dir) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half of the new weig")
            raise OSError("disk full")
    assert _tree(old_dir) == before
    assert os.listdir(old_dir.parent) == ["final"]


def test_a_failure_mid_write_of_a_new_directory_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "runs" / "new") as tmp:
            (tmp / "part").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "runs") == []


def test_a_failed_swap_puts_the_old_directory_back(old_dir, monkeypatch):
    """The old directory is renamed aside before the new one moves in; if that second rename fails,
    the old one is renamed back (the previous code had already deleted it by then)."""
    before, real_replace, calls = _tree(old_dir), os.replace, []

    def replace(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if len(calls) == 2:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(old_dir) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new weights")
    assert calls[0][0] == "final" and calls[0][1].startswith(".final.old") and calls[1][1] == "final"
    assert _tree(old_dir) == before
    assert os.listdir(old_dir.parent) == ["final"]


def test_files_likewise(tmp_path):
    path = tmp_path / "report.md"
    write_atomic(path, "old report")
    with pytest.raises(ValueError):
        with atomic_file(path) as tmp:
            assert tmp.name == f".report.md.{os.getpid()}.tmp"
            tmp.write_text("half a rep")
            raise ValueError
    assert path.read_text() == "old report" and os.listdir(tmp_path) == ["report.md"]
    assert write_atomic(path, "new report") == path and path.read_text() == "new report"
    assert os.listdir(tmp_path) == ["report.md"]


def test_a_checkpoint_that_fails_mid_write_keeps_the_previous_one(tiny_model_dir, tmp_path):
    """``save_checkpoint`` through ``atomic_dir``: checkpoint-2 rewritten at the same step fails while the
    tokenizer is saved (after the policy weights are written); the first checkpoint-2 is untouched, and
    neither the temporary directory nor the FSDP2 shard directory handed to it is left in the run."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from r1kit.train.checkpoint import list_checkpoints, save_checkpoint

    policy = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = tmp_path / "run"
    kw = dict(policy=policy, tokenizer=tok, optimizer=opt, scheduler=sched, config_yaml="seed: 0\n")
    save_checkpoint(run, 2, trainer_state={"step": 2, "first": True}, **kw)
    before = _tree(run / "checkpoint-2")

    class FailingTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    shards = run / ".dcp-2.tmp"
    shards.mkdir()
    (shards / "__0_0.distcp").write_bytes(b"shard")
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)  # the failed write's weights differ from the saved ones
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, 2, trainer_state={"step": 2, "first": False}, sharded=shards,
                        **{**kw, "tokenizer": FailingTokenizer()})
    assert _tree(run / "checkpoint-2") == before
    assert sorted(os.listdir(run)) == ["checkpoint-2"] and list_checkpoints(run) == [run / "checkpoint-2"]


def test_a_gguf_export_that_fails_mid_write_keeps_the_previous_file(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from r1kit.models import export

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous export")

    real = export.llama_gguf_tensors

    def tensors(*args):  # the first two tensors are added, then the writer fails
        yield from list(real(*args))[:2]
        raise MemoryError("out of memory")

    monkeypatch.setattr(export, "llama_gguf_tensors", tensors)
    with pytest.raises(MemoryError):
        export.export_gguf(model, tok, out)
    assert out.read_bytes() == b"the previous export" and os.listdir(tmp_path) == ["model.gguf"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifacts_get_the_plain_open_mode_not_a_temporarys_owner_only_one(tiny_model_dir, tmp_path, umask):
    """An HF export (transformers' safetensors writer leaves ``model.safetensors`` 0o600), a directory
    whose caller wrote owner-only files, and a file written through ``atomic_file`` all come out with
    0o666 / 0o777 less the umask (0o644 / 0o755 under 0o022), an executable keeping its execute bits."""
    from r1kit.models.export import export_model

    old = os.umask(umask)
    try:
        out = export_model(str(tiny_model_dir), "hf", tmp_path / "hf")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "secret.bin", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
        with atomic_file(tmp_path / "f.bin") as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)

    def mode(p):
        return os.stat(p).st_mode & 0o777

    assert mode(out / "model.safetensors") == mode(out / "config.json") == 0o666 & ~umask
    assert mode(out) == mode(tmp_path / "d") == mode(tmp_path / "d" / "sub") == 0o777 & ~umask
    assert mode(tmp_path / "d" / "sub" / "secret.bin") == mode(tmp_path / "f.bin") == 0o666 & ~umask
    assert mode(tmp_path / "d" / "run.sh") == 0o777 & ~umask
