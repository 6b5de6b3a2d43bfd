"""Checkpoints: one format, written atomically, resumed exactly.

Layout of ``<run>/checkpoint-<step>/``:
  policy/            HF directory (config.json, model.safetensors, tokenizer files)
  reference/         the reference model, only when beta > 0 and it has been re-synced
  optimizer.pt       optimizer and LR-scheduler state dicts (optimizer None when dcp/ holds it)
  dcp/               FSDP2 runs: model and optimizer shards (``torch.distributed.checkpoint``, one file
                     per rank; loads on any number of ranks, ``load_sharded``)
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1kit.errors import R1kitError
from r1kit.io import atomic_dir

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Snapshot of every RNG a run draws from."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, step: int, *, policy, tokenizer, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, reference=None, keep: int = 2, policy_state_dict: dict | None = None,
                    sharded: Path | None = None) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and prune all but the newest ``keep``.
    FSDP2: ``policy_state_dict`` is the gathered full state dict for ``policy/`` and ``sharded`` the
    finished ``dcp.save`` directory (model and optimizer), moved in as ``dcp/`` before the rename.

    Returns the checkpoint path.
    """
    final = run_dir / f"checkpoint-{step}"
    try:
        with atomic_dir(final) as tmp:
            policy.save_pretrained(tmp / "policy", safe_serialization=True,      # r1kit's V3 takes no state_dict
                                   **({} if policy_state_dict is None else {"state_dict": policy_state_dict}))
            tokenizer.save_pretrained(tmp / "policy")
            if reference is not None:
                reference.save_pretrained(tmp / "reference", safe_serialization=True)
            torch.save({"optimizer": optimizer.state_dict() if sharded is None else None,
                        "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
            if sharded is not None:
                os.replace(sharded, tmp / "dcp")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
    finally:
        if sharded is not None:  # a failure before the move: no stray shards beside the checkpoints
            shutil.rmtree(sharded, ignore_errors=True)
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


def load_training_state(ckpt: Path, optimizer, scheduler, model=None, sharded: bool = False) -> dict:
    """Restore optimizer, scheduler and RNG states from ``ckpt``; return its trainer_state dict. A
    sharded (FSDP2) checkpoint's optimizer comes from ``dcp/`` and needs ``model`` (parameter names);
    ``sharded``: a whole optimizer state (ddp / one process) goes into this FSDP2 ``model``'s shards.

    Raises:
        R1kitError: the checkpoint is incomplete (names the missing file).
    """
    for name in ("optimizer.pt", "rng.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise R1kitError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    if opt["optimizer"] is None:
        load_sharded(ckpt / "dcp", model, optimizer, with_model=False)
    elif sharded:
        load_whole_optimizer_into_shards(model, optimizer, opt["optimizer"], ckpt)
    else:
        try:
            optimizer.load_state_dict(opt["optimizer"])
        except ValueError as err:                  # torch: parameter groups or sizes do not match
            raise R1kitError(f"{ckpt}/optimizer.pt does not match this run's trainable parameters ({err}); "
                             "resume with the model, LoRA and config of that run, or choose another --output") from None
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
    tensors = read_tensors(policy_dir)
    check_same_model(policy, tensors, policy_dir)
    policy.load_state_dict(tensors, strict=False)


def check_same_model(policy, tensors: dict[str, torch.Tensor], policy_dir: Path) -> None:
    """Refuse a checkpoint's weights that another model or config wrote (``v3_io.tensor_problems``: a
    weight missing, a shape that differs, a name this policy lacks). Every rank reads the same files,
    so every rank raises the same error before any collective.

    Raises:
        R1kitError: names the checkpoint, the mismatches and the fix.
    """
    from r1kit.models.v3_io import tensor_problems

    problems = tensor_problems(policy, tensors)
    if problems:
        raise R1kitError(f"{policy_dir} was written by a different model or config ({'; '.join(problems)}); "
                         "resume with the --model and model settings of that run, or choose another --output")


def init_optimizer_state(optimizer) -> None:
    """Give an optimizer that never stepped its state tensors (one step at lr 0, torch's
    ``_init_optim_state``), the keys a distributed load fills in place; the gradients are kept."""
    from torch.distributed.checkpoint import state_dict as sd

    grads = [(p, p.grad) for group in optimizer.param_groups for p in group["params"]]
    for p, _ in grads:                  # _init_optim_state steps only when no grad is set
        p.grad = None
    sd._init_optim_state(optimizer)
    for p, g in grads:                  # the trainers keep zero tensors as grads (never None)
        p.grad = g


def load_whole_into_shards(model, policy_dir: Path) -> None:
    """A whole checkpoint's ``policy/`` weights into an FSDP2 model: every rank reads them all and keeps
    its shards (``set_model_state_dict`` with ``full_state_dict``), so a 1-process checkpoint resumes
    on N FSDP2 ranks.

    Raises:
        R1kitError: another model or config wrote it (``check_same_model``).
    """
    from torch.distributed.checkpoint import state_dict as sd

    from r1kit.models.v3_io import read_tensors

    tensors = read_tensors(policy_dir)
    check_same_model(model, tensors, policy_dir)
    sd.set_model_state_dict(model, tensors, options=sd.StateDictOptions(full_state_dict=True, strict=False))


def load_whole_optimizer_into_shards(model, optimizer, state: dict, ckpt: Path) -> None:
    """A whole ``optimizer.state_dict()`` (parameters numbered in the order the trainer gave them: the
    trainable ``named_parameters``) into the shards of an FSDP2 ``model``'s optimizer, by name.

    Raises:
        R1kitError: the numbering does not match this run's trainable parameters.
    """
    from torch.distributed.checkpoint import state_dict as sd

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    numbered = [i for g in state["param_groups"] for i in g["params"]]
    if sorted(numbered) != list(range(len(names))):
        raise R1kitError(f"{ckpt}/optimizer.pt holds {len(numbered)} parameters, this run trains {len(names)}; "
                         "resume with the model, LoRA and config of that run, or choose another --output")
    by_name = {"state": {names[i]: st for i, st in state["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    init_optimizer_state(optimizer)
    sd.set_optimizer_state_dict(model, optimizer, by_name, options=sd.StateDictOptions(full_state_dict=True))


def load_sharded(dcp_dir: Path, model, optimizer, with_model: bool) -> None:
    """Load a ``dcp/`` directory's optimizer state (and the model's, with ``with_model``) into this
    process's ``model``/``optimizer``, sharded (FSDP2) or not: ``torch.distributed.checkpoint``
    reshards at load time, so a checkpoint of N ranks loads on M (keys are the parameter names).

    Raises:
        R1kitError: a rank's shard or the metadata is missing or does not match (names the directory).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import state_dict as sd

    if not (dcp_dir / ".metadata").is_file():
        raise R1kitError(f"checkpoint {dcp_dir.parent} is incomplete: {dcp_dir}/.metadata is missing")
    init_optimizer_state(optimizer)
    state = {"optimizer": sd.get_optimizer_state_dict(model, optimizer)}
    if with_model:
        state["model"] = sd.get_model_state_dict(model)
    try:
        dcp.load(state, checkpoint_id=str(dcp_dir))
    except (Exception, CheckpointException) as err:        # CheckpointException is a BaseException
        raise R1kitError(f"cannot load the sharded checkpoint {dcp_dir}: {_first_error(err)}; "
                         "every rank's file (__N_0.distcp) must be there, written by this model and config") from None
    if with_model:
        sd.set_model_state_dict(model, state["model"])
    sd.set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _first_error(err: BaseException) -> str:
    """The root cause of a DCP failure in one line (a CheckpointException wraps each rank's error)."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}" if str(err) else type(err).__name__
