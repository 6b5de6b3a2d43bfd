"""Data-parallel training on torch.distributed: process group, shards, gradient reduction, launch.

A run launched by ``torchrun --nproc-per-node N -m r1kit train grpo|sft ...`` (or ``r1kit train ...
--nproc N``, which execs exactly that) has N ranks that each hold the whole model (``ddp``) or a
shard of it (``fsdp2``, ``torch.distributed.fsdp.fully_shard``). The contract (SCALE_SPEC §1-2):

  * the data order, the seeds and the data cursor are global: every rank draws the same global batch
    (``DataCursor``) and takes its contiguous slice (``shard_bounds``), so a run's prompts do not
    depend on N; GRPO groups may straddle ranks;
  * GRPO: each rank samples and scores its slice of the round's completions, the slices are gathered
    (``all_gather_objects``) so every rank holds the whole round, and advantages are computed on it
    (as TRL gathers rewards before its group statistics);
  * every loss normalizer is the global count (SCALE_SPEC §1: TRL, verl, OpenRLHF, torchtitan); each
    rank's loss is its share of the global step loss, so the global gradient is the **sum** over ranks:
    ``ddp`` all-reduces the flat gradient with SUM once per optimizer update (``sum_gradients``),
    ``fsdp2`` reduce-scatters with divide factor 1 (torchtitan's guard against the gloo averaging bug,
    pytorch #162338) in float32;
  * rank 0 alone writes metrics, samples, plots, checkpoints and ``final/``; every rank reports its
    errors; collectives time out after ``dist_timeout_minutes``;
  * DeepSeek-V3 experts split over the ranks (``r1kit.models.expert_parallel``) are marked
    ``expert_parallel``: ``sum_gradients`` leaves their gradients alone (already the whole batch's)
    and ``clip_grad_norm`` sums their squared norms over ranks.

Why not ``torch.nn.parallel.DistributedDataParallel``: the GRPO forward runs the model twice per
micro-batch (shared-prefix KV cache) and calls its decoder directly (padding-free path), which DDP's
one-forward-one-backward reducer does not follow; one SUM all-reduce of the accumulated gradient per
update is what DDP with ``no_sync`` over the micro-batches does, minus the bucket overlap.

Backend: gloo on CPU; with CUDA, NCCL for CUDA tensors and gloo for CPU ones (``backend_for``).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from r1kit.errors import ConfigError, R1kitError

DATA_PARALLEL = ("ddp", "fsdp2")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the data-parallel group.

    Attributes:
        rank: 0 .. world_size - 1 (torchrun's RANK).
        world_size: N processes (1 = not distributed).
        local_rank: rank on this node (the CUDA device index under NCCL).
        strategy: "ddp" or "fsdp2" (only meaningful with world_size > 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(cuda: bool | None = None) -> str:
    """``gloo`` on a CPU machine; with CUDA (or ``cuda`` True) ``cpu:gloo,cuda:nccl``: NCCL for CUDA
    tensors, gloo for the CPU tensors and objects (r1kit's trainers keep the model where it was loaded)."""
    return "cpu:gloo,cuda:nccl" if (torch.cuda.is_available() if cuda is None else cuda) else "gloo"


def current(strategy: str = "ddp") -> DistEnv:
    """The DistEnv of the initialized default process group (world_size 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv(strategy=strategy)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                   strategy)


def init_distributed(timeout_minutes: float, strategy: str = "ddp") -> DistEnv:
    """Join the process group torchrun described in the environment (WORLD_SIZE, RANK, MASTER_ADDR,
    MASTER_PORT), with ``timeout_minutes`` on every collective; a process not started by torchrun
    (WORLD_SIZE unset or 1) stays single. An already initialized group (tests) is reused.

    Raises:
        ConfigError: unknown ``strategy``; R1kitError: the rendezvous failed (names MASTER_ADDR:PORT).
    """
    if strategy not in DATA_PARALLEL:
        raise ConfigError(f"data_parallel must be one of {DATA_PARALLEL}, got {strategy!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current(strategy)
    backend = backend_for()
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as err:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise R1kitError(f"rank {os.environ.get('RANK', '?')}: joining the process group at {where} failed "
                         f"({err}); check --master-port / MASTER_PORT and that every rank started") from None
    return current(strategy)


def shutdown() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, env: DistEnv) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of ``n`` global items that ``env.rank`` owns: equal slices when
    world_size divides n (checked at start), rank-ordered near-equal ones otherwise (a DAPO round that
    kept fewer groups)."""
    return env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size


def check_divisible(n: int, world_size: int, what: str, fix: str) -> None:
    """Raise ConfigError (the same on every rank, before any collective) when ``world_size`` ranks cannot
    share ``n`` items (``what`` names the setting) equally, or when there are fewer items than ranks."""
    if world_size <= 1:
        return
    if n < world_size:
        raise ConfigError(f"{world_size} processes but {what} = {n} per step: some rank would get nothing; "
                          f"{fix}, or launch fewer processes (--nproc / --nproc-per-node)")
    if n % world_size:
        raise ConfigError(f"{what} = {n} is not divisible by the {world_size} processes; {fix}, or launch a "
                          "number of processes (--nproc / --nproc-per-node) that divides it")


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled; small metadata such as token ids and rewards)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_scalars(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Each value summed over ranks (float64 all-reduce; the same keys on every rank)."""
    if not env.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def max_int(value: int, env: DistEnv) -> int:
    """The largest ``value`` over ranks."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def comm_device() -> torch.device:
    """Where the small scalar collectives run: the CPU (gloo is in every group r1kit creates)."""
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (a no-op in one process)."""
    if env.enabled:
        dist.all_reduce(tensor)
    return tensor


def broadcast_parameters(model: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does at construction): a LoRA adapter's
    random init, or a model built under per-rank seeds, then starts identical everywhere."""
    if not env.enabled:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def sum_gradients(params: Sequence[torch.nn.Parameter], env: DistEnv) -> None:
    """All-reduce (SUM) the accumulated ``.grad`` of ``params`` in one flat buffer per dtype: with every
    rank's loss already divided by the global normalizer, the sum is the single-process gradient of
    the global batch (the ``ddp`` strategy; FSDP2 reduces in its backward hooks instead).

    A parameter without a gradient on this rank (a DeepSeek-V3 expert none of its tokens chose) joins
    the buffer as zeros, so every rank reduces the same layout (the DDP unused-parameter trap, pytorch
    #68862), and stays without one only if it had none on any rank, as in one process. Parameters
    marked ``expert_parallel`` (``models.expert_parallel``) are skipped: their owner's gradient is
    already the whole batch's."""
    if not env.enabled or env.strategy == "fsdp2":
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if not getattr(p, "expert_parallel", False):
            by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        present = torch.tensor([p.grad is not None for p in group], dtype=group[0].dtype, device=group[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
                         + [present])
        dist.all_reduce(flat)
        offset = 0
        for p, seen in zip(group, flat[-len(group):].tolist()):
            summed = flat[offset:offset + p.numel()].view_as(p)
            if not seen:
                p.grad = None
            elif p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            offset += p.numel()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a causal LM (transformers models and r1kit's DeepSeek-V3: ``model.layers``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"data_parallel=fsdp2 found no decoder layers (model.model.layers) in "
                          f"{type(inner).__name__}; use data_parallel=ddp")
    return list(layers)


def shard_model(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) on each decoder layer, then on the root (embeddings, final norm, head),
    in place. Gradients are reduce-scattered with divide factor 1 and ReduceOp.SUM (our losses already carry the
    global normalizer; torchtitan's guard against the gloo averaging bug, pytorch #162338) in at least
    float32 (``reduce_dtype``; bf16 collectives over gloo are unsupported in older torch).

    Raises:
        ConfigError: a scalar (0-d) parameter, which fully_shard refuses (names it and the fix).
    """
    if not env.enabled or env.strategy != "fsdp2":
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    for name, p in model.named_parameters():
        if p.dim() == 0:
            raise ConfigError(f"data_parallel=fsdp2 cannot shard the scalar parameter {name!r} (fully_shard refuses "
                              "0-d parameters): make it a 1-element tensor, or use data_parallel=ddp")
    dtype = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(reduce_dtype=torch.promote_types(dtype, torch.float32))
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)   # a plain SUM: gloo has no PREMUL_SUM (fp32 grads)
    return model


def full_state_dict(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The whole (unsharded) state dict of an FSDP2 model on rank 0, on the CPU, a tied weight under its
    first name only; None on the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):    # tied weights (lm_head = embeddings)
        if id(p) in seen:                                              # are written once, as save_pretrained does
            full.pop(name, None)
        seen.add(id(p))
    return full if env.is_main else None


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` (max_norm <= 0: no clipping) returning the global norm as a plain tensor
    (FSDP2's sharded gradients give a DTensor norm, reduced over ranks). With expert-parallel
    parameters (each rank holds different experts) the squared norm is the replicated part plus the
    experts' squares summed over ranks, so every rank clips by the same factor."""
    max_norm = max_norm if max_norm > 0 else float("inf")
    params = [p for p in params if p.grad is not None]
    experts = [p.grad for p in params if getattr(p, "expert_parallel", False)]
    if not experts:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    replicated = [p.grad for p in params if not getattr(p, "expert_parallel", False)]
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in experts]).sum()
    dist.all_reduce(squares)
    squares = squares + sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in replicated)
    norm = squares.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


# ----- launch -----

def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP listener already holds ``host:port`` (the rendezvous port torchrun would bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def torchrun_argv(argv: Sequence[str], nproc: int, master_port: int) -> list[str]:
    """The torchrun command line that ``r1kit ... --nproc N`` execs: ``python -m torch.distributed.run
    --standalone``-style single-node launch of ``-m r1kit`` with the same arguments minus the launcher's.

    Raises:
        ConfigError: nproc < 1, or ``master_port`` is already in use (names --master-port).
    """
    import sys

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if port_in_use(master_port):
        raise ConfigError(f"--master-port {master_port} is already in use on this machine (another run's "
                          "rendezvous?); pass a free --master-port")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(master_port), "-m", "r1kit", *argv]
