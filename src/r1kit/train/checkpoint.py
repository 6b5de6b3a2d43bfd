"""Checkpoints: one format, written atomically, resumed exactly.

Layout of ``<run>/checkpoint-<step>/``:
  policy/            HF directory (config.json, model.safetensors, tokenizer files)
  reference/         the reference model, only when beta > 0 and it has been re-synced
  optimizer.pt       optimizer and LR-scheduler state dicts
  rng.pt             torch, python and numpy RNG states
  trainer_state.json step, data cursor (epoch, position), guard counters
  config.yaml        the resolved run config

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash while
saving never leaves a half-written ``checkpoint-N`` and never harms the previous one (GRPO_SPEC §5).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1kit.errors import R1kitError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Snapshot of every RNG a run draws from."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, step: int, *, policy, tokenizer, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, reference=None, keep: int = 2) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and prune all but the newest ``keep``.

    Returns the checkpoint path.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp", dir=run_dir))
    try:
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        if reference is not None:
            reference.save_pretrained(tmp / "reference", safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (temporary directories are ignored)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was written at, from its trainer_state.json."""
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


def load_training_state(ckpt: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG states from ``ckpt``; return its trainer_state dict.

    Raises:
        R1kitError: the checkpoint is incomplete (names the missing file).
    """
    for name in ("optimizer.pt", "rng.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise R1kitError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_policy_weights(policy, policy_dir: Path) -> None:
    """Load a checkpoint's ``policy/`` weights into ``policy`` in place: the LoRA adapter weights of a
    PEFT policy (``adapter_model.safetensors``), else every tensor of the HF directory.

    Raises:
        R1kitError: the directory holds no weights of the kind the policy needs.
    """
    from r1kit.models.v3_io import read_tensors

    adapter = policy_dir / "adapter_model.safetensors"
    if hasattr(policy, "peft_config"):
        if not adapter.is_file():
            raise R1kitError(f"{policy_dir} holds no LoRA adapter (adapter_model.safetensors) for this LoRA run")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy, load_file(adapter))
        return
    policy.load_state_dict(read_tensors(policy_dir), strict=False)
