"""Expert parallelism for the DeepSeek-V3 MoE: routed experts split over ranks, tokens moved by all-to-all.

With N ranks and E routed experts, rank r keeps experts [r·E/N, (r+1)·E/N) (the others become None in
``MoE.experts``, as in DeepSeek-V3's ``inference/model.py``, so state-dict names keep their global
index); the router (``gate``, its bias buffer) and the shared expert stay replicated. Each MoE forward
on every rank (torchtitan's ``token_dispatcher.py`` pattern, SCALE_SPEC §4):

  1. sort the (T·K) token-expert assignments by expert; count them per expert (E,);
  2. all-to-all of the counts (E/N per peer), so each rank learns how many rows it will receive;
  3. variable-split ``all_to_all_single`` of the token rows to the experts' owners;
  4. every local expert runs on its rows (also on zero rows, so an expert that received no token
     has a zero gradient, not a missing one: the DDP unused-parameter trap, pytorch #68862);
  5. the reverse all-to-all brings the outputs back, weighted and summed per token as in one process.

The backward of each all-to-all is the all-to-all with the splits swapped, so an expert's gradient on
its owner holds the contributions of every rank's tokens: expert gradients are not all-reduced
(``distributed.sum_gradients`` skips parameters marked ``expert_parallel``) and the gradient norm
adds their squares over ranks (``distributed.clip_grad_norm``). The router-bias update stays the
data-parallel one: expert loads all-reduced over ranks first (``train.grpo.balance_experts``).

gloo runs ``all_to_all_single`` on CPU tensors (checked with the pinned torch 2.13.0+cpu, zero-size
splits included); NCCL on CUDA tensors. The expert-parallel group is the whole data-parallel world
(N = world size). Every rank must run the same sequence of MoE forwards (same layers, same number of
calls), or the collectives hang until the process group's timeout.

Notation: T tokens on this rank, K experts per token, E routed experts, N ranks, L = E/N local
experts, R rows received, d hidden size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from r1kit.errors import ConfigError
from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM, Routing


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with autograd: the backward sends the gradients back along the
    same splits reversed."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(rows, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, send_splits, recv_splits, ctx.group), None, None, None


def _exchange(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """rows (Σ send_splits, ...) -> (Σ recv_splits, ...): chunk j goes to rank j, chunk j of the result
    came from rank j."""
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
    return out


class ExpertDispatcher:
    """Runs a MoE's routed experts split over the ranks of ``group`` (``MoE.dispatcher``).

    Attributes:
        group: the expert-parallel process group (None: the default group).
        size: N ranks; rank: this rank in the group; first: global index of the first local expert.
        local: L = E / N experts per rank.
    """

    def __init__(self, n_experts: int, group=None):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.local = n_experts // self.size
        self.first = self.rank * self.local

    def __call__(self, experts: nn.ModuleList, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """flat (T, d), routing of those T tokens -> Σ_k w_k·Expert_k(x) (T, d), flat's dtype."""
        n, k = self.size, routing.indices.shape[1]
        expert_of = routing.indices.reshape(-1)  # (T·K,) assignment i is token i // K
        order = expert_of.argsort(stable=True)
        token_of = order // k  # (T·K,) tokens sorted by expert
        counts = torch.bincount(expert_of, minlength=n * self.local)  # (E,) rows for each expert
        recv_counts = _exchange(counts, [self.local] * n, [self.local] * n, self.group)  # (N·L,) by source rank
        send_splits = counts.view(n, self.local).sum(1).tolist()
        recv_splits = recv_counts.view(n, self.local).sum(1).tolist()
        received = _AllToAll.apply(flat[token_of], recv_splits, send_splits, self.group)  # (R, d)
        local_id = torch.arange(self.local, device=flat.device).repeat(n).repeat_interleave(recv_counts)  # (R,)
        outputs = torch.zeros_like(received)
        for e in range(self.local):
            rows = torch.where(local_id == e)[0]
            outputs = outputs.index_copy(0, rows, experts[self.first + e](received[rows]).to(received.dtype))
        returned = _AllToAll.apply(outputs, send_splits, recv_splits, self.group)  # (T·K, d) in sent order
        weighted = returned * routing.weights.reshape(-1)[order, None]
        return torch.zeros_like(flat).index_add(0, token_of, weighted.to(flat.dtype))


def shard_experts(model: DeepseekV3ForCausalLM, group=None) -> DeepseekV3ForCausalLM:
    """Split every MoE's routed experts over the ranks of ``group`` (default: the whole world), in
    place: rank r keeps experts [r·E/N, (r+1)·E/N), marks their parameters ``expert_parallel`` and
    drops the others; router and shared expert are untouched. Call it on identical replicas (same
    seed or ``distributed.broadcast_parameters`` first). Returns the model.

    Raises:
        ConfigError: no process group, a group other than the whole world, or E not divisible by N
            (names n_routed_experts and the fix).
    """
    if not dist.is_initialized():
        raise ConfigError("expert parallelism needs a process group: launch with torchrun --nproc-per-node N")
    size = dist.get_world_size(group)
    if size != dist.get_world_size():
        raise ConfigError(f"the expert-parallel group has {size} of the {dist.get_world_size()} ranks; r1kit "
                          "shards experts over the whole data-parallel world (pass group=None)")
    n_experts = model.config.n_routed_experts
    if n_experts % size:
        raise ConfigError(f"n_routed_experts = {n_experts} is not divisible by the {size} expert-parallel ranks; "
                          "launch a number of processes that divides it")
    for moe in model.moe_layers():
        moe.dispatcher = ExpertDispatcher(n_experts, group)
        lo, hi = moe.dispatcher.first, moe.dispatcher.first + moe.dispatcher.local
        for i in range(n_experts):
            if lo <= i < hi:
                for p in moe.experts[i].parameters():
                    p.expert_parallel = True
            else:
                moe.experts[i] = None
    return model
