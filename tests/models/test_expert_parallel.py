"""Expert parallelism on 2 gloo processes equals one process (float64): the DeepSeek-V3 MoE forward and
backward with the routed experts split over the ranks (rank 0 experts 0-3, rank 1 experts 4-7) and the
global batch split over them too, including a batch where rank 1's experts receive no token (their
gradients are zeros, not missing); the clipped gradient norm and the router-bias update are the same
on both ranks and equal one process's.

One ``spawn`` of 2 ranks runs every scenario and saves its tensors; the tests compare them with the
same scenarios run here in one process.
"""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from v3_helpers import one_thread, tiny_model  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.errors import ConfigError
from r1kit.models.expert_parallel import shard_experts
from r1kit.train import distributed
from r1kit.train.grpo import balance_experts

WORLD, BATCH, SEQ, GAMMA = 2, 4, 6, 0.01
SCENARIOS = ("routed", "rank1_idle")      # rank1_idle: experts 4-7 (rank 1's) are never chosen


def _model(scenario: str):
    model = tiny_model(seed=0).cast(torch.float64).train()
    if scenario == "rank1_idle":
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias[4:] = -10.0      # sigmoid scores are < 1: never in a top-K
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (BATCH, SEQ), generator=g)
    probe = torch.randn(BATCH, SEQ, 97, generator=g, dtype=torch.float64)      # d loss / d logits
    return ids, probe


def _step(scenario: str) -> dict:
    """Forward + backward of this rank's rows of the global batch (all rows in one process) under a loss
    whose sum over ranks is the one-process loss; then the data-parallel gradient sum, the clipped
    norm and the router-bias update. Returns logits, gradients (None kept as None), norm, biases."""
    env = distributed.current()
    model = _model(scenario)
    if env.enabled:
        shard_experts(model)
    ids, probe = _batch()
    lo, hi = distributed.shard_bounds(BATCH, env)
    out = model(ids[lo:hi])
    loss = (out.logits * probe[lo:hi]).sum() + (out.mtp_logits[0] * probe[lo:hi, 1:]).sum() \
        + out.balance_loss * (hi - lo) / BATCH                   # balance loss: a mean over sequences
    loss.backward()
    params = list(model.parameters())
    distributed.sum_gradients(params, env)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    norm = distributed.clip_grad_norm(params, max_norm=0.5)
    loads = [moe.tokens_per_expert.clone() for moe in model.moe_layers()]
    balance_experts(model, GAMMA, env)
    return {"logits": out.logits.detach(), "rows": (lo, hi), "grads": grads, "norm": norm.detach(),
            "clipped": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "loads": loads, "biases": [moe.gate.e_score_correction_bias.clone() for moe in model.moe_layers()]}


def _unused_gradient_sum() -> dict:
    """sum_gradients when a parameter has a gradient on rank 0 only, another on no rank."""
    env = distributed.current()
    used, rank0_only, unused = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3))
    used.grad = torch.full((3,), 1.0 + env.rank, dtype=torch.float64)
    if env.rank == 0:
        rank0_only.grad = torch.arange(3, dtype=torch.float64)
    distributed.sum_gradients([used, rank0_only, unused], env)
    return {"used": used.grad, "rank0_only": rank0_only.grad, "unused": unused.grad}


def _indivisible_experts() -> str:
    model = tiny_model(n_routed_experts=3, n_group=1, topk_group=1, num_experts_per_tok=2)
    try:
        shard_experts(model)
    except ConfigError as err:
        return str(err)
    return ""


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {s: _step(s) for s in SCENARIOS}
        results["unused"] = _unused_gradient_sum()
        results["indivisible"] = _indivisible_experts()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_rank():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {s: _step(s) for s in SCENARIOS}
    finally:
        torch.set_num_threads(before)


def _close(a, b, msg):
    d = (a - b).abs().max().item()
    assert d <= 1e-10, f"{msg}: max |diff| {d:.3g}, max |ref| {b.abs().max().item():.3g}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_forward_and_backward_with_experts_split_over_two_ranks_equal_one_process(two_ranks, one_rank, scenario):
    ref = one_rank[scenario]
    for rank in range(WORLD):
        ours = two_ranks[rank][scenario]
        lo, hi = ours["rows"]
        assert (lo, hi) == (2 * rank, 2 * rank + 2)
        _close(ours["logits"], ref["logits"][lo:hi], f"rank {rank} logits")
        local = range(4 * rank, 4 * rank + 4)
        for name, grad in ref["grads"].items():
            if ".experts." in name and int(name.split(".experts.")[1].split(".")[0]) not in local:
                assert name not in ours["grads"]                      # another rank's expert: not held here
                continue
            assert ours["grads"][name] is not None, name              # held here: a gradient, even if no token came
            _close(ours["grads"][name], torch.zeros_like(ours["grads"][name]) if grad is None else grad, name)
        _close(ours["norm"], ref["norm"], "grad norm")
        for name, grad in ours["clipped"].items():
            _close(grad, ref["clipped"].get(name, torch.zeros_like(grad)), f"clipped {name}")
    assert ref["norm"] > 0.5                                          # the clip is active
    assert sum(".experts." in n for n in two_ranks[0][scenario]["grads"]) == \
        sum(".experts." in n for n in ref["grads"]) // 2


def test_idle_rank_experts_get_zero_gradients_where_one_process_has_none(two_ranks, one_rank):
    ref = one_rank["rank1_idle"]
    idle = [n for n in ref["grads"] if any(f".experts.{e}." in n for e in range(4, 8))]
    assert idle and all(ref["grads"][n] is None for n in idle)        # one process: no gradient at all
    for name in idle:
        grad = two_ranks[1]["rank1_idle"]["grads"][name]
        assert grad is not None and grad.abs().max() == 0
    for loads, tokens in zip(ref["loads"], (BATCH * SEQ, BATCH * (SEQ - 1))):     # main MoE layer, MTP layer
        assert loads[4:].sum() == 0 and loads[:4].sum() == tokens * 3                  # top-3 of experts 0-3


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_router_bias_update_uses_loads_summed_over_ranks_and_is_identical(two_ranks, one_rank, scenario):
    ref = one_rank[scenario]
    mine = [r[scenario]["loads"] for r in two_ranks]
    assert any(not torch.equal(a, b) for a, b in zip(*mine))           # each rank counted its own tokens
    for a, b, total in zip(*mine, ref["loads"]):
        assert torch.equal(a + b, total)
    for rank in range(WORLD):
        for ours, want in zip(two_ranks[rank][scenario]["biases"], ref["biases"]):
            assert torch.equal(ours, want)
    before = _model(scenario).moe_layers()[0].gate.e_score_correction_bias
    assert not torch.equal(ref["biases"][0], before)


def test_sum_gradients_fills_a_missing_gradient_and_keeps_one_missing_everywhere(two_ranks):
    for rank in range(WORLD):
        got = two_ranks[rank]["unused"]
        assert torch.equal(got["used"], torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(got["rank0_only"], torch.arange(3, dtype=torch.float64))
        assert got["unused"] is None


def test_experts_not_divisible_by_ranks_is_one_clear_error_on_every_rank(two_ranks):
    for rank in range(WORLD):
        assert two_ranks[rank]["indivisible"] == ("n_routed_experts = 3 is not divisible by the 2 expert-parallel "
                                                  "ranks; launch a number of processes that divides it")


def test_shard_experts_without_a_process_group_is_refused():
    with pytest.raises(ConfigError, match="needs a process group: launch with torchrun"):
        shard_experts(tiny_model())
