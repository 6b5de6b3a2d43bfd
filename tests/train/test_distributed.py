"""Data parallel on 2 gloo processes equals one process on the same global batch (float64, 1e-10):
one GRPO update for each loss_type (a group straddles the ranks, the ranks hold unequal token
counts), one with β > 0, two mini-batches and two iterations, and one SFT step; bad settings are one
clear error on every rank; the ``--nproc`` launcher refuses a port in use and runs torchrun.

One process group serves the whole module: a single ``spawn`` of 2 ranks runs every scenario and
saves its tensors, which the tests compare with the same scenarios run here in one process.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1kit.config import SFTConfig, load_config
from r1kit.data.base import Example
from r1kit.data.sft_data import TokenizedExample
from safetensors.torch import load_file, save_file

from r1kit.errors import ConfigError, R1kitError
from r1kit.models.loading import load_policy
from r1kit.rewards.base import Verdict
from r1kit.rollout.hf import HFGenerateEngine
from r1kit.train.grpo import GRPOTrainer, RewardScorer, Rollout
from r1kit.train.loop import DataCursor
from r1kit.train.losses import LOSS_TYPES, group_advantages
from r1kit.train.checkpoint import load_policy_weights
from r1kit.train.distributed import current, shard_bounds
from r1kit.train.sft import SFTTrainer

HERE = Path(__file__).parent
WORLD = 2
G, GROUPS = 4, 3                     # 12 completions: rank 0 holds 0-5, rank 1 6-11; group 1 straddles
FSDP2_SCENARIOS = ("grpo", "dapo_beta_minibatches")
GRPO_SCENARIOS = {lt: dict(loss_type=lt) for lt in LOSS_TYPES} | {
    "dapo_beta_minibatches": dict(loss_type="dapo", beta=0.05, steps_per_generation=2, num_iterations=2)}


class _NoVerifier:
    name = "none"

    def verify_batch(self, completions, examples, truncated=None):
        return [Verdict(False, 0.0, "none") for _ in completions]


def _rollout(vocab: int = 1000) -> Rollout:
    """Varied prompt/completion lengths (unequal tokens per rank); group 1 (A = 0) straddles the ranks."""
    g = torch.Generator().manual_seed(7)
    n = G * GROUPS
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    adv, std = group_advantages(rewards, G)
    prompts = [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(GROUPS) for _ in range(G)]
    comps = [torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    ex = Example("toy/0", "p", "1")
    return Rollout(examples=[ex] * n, prompt_ids=prompts, completion_ids=comps,
                   sampling_logprobs=[[0.0] * len(c) for c in comps], truncated=[False] * n, texts=[""] * n,
                   rewards_per_func=rewards[:, None], rewards=rewards, advantages=adv, group_std=std,
                   verdicts=[Verdict(False, 0.0, "x")] * n)


def _grpo_update(model_dir: str, run_dir: Path, **over) -> dict[str, torch.Tensor]:
    """One GRPO round's updates on the fixed rollout; the summed gradients and the updated weights."""
    torch.manual_seed(0)                               # the mini-batch order (rank 0's, broadcast)
    model, tok = load_policy(model_dir, dtype=torch.float64)
    cfg = load_config(overrides=dict(learning_rate=1e-2, max_grad_norm=0.5, num_generations=G, prompts_per_step=GROUPS,
                                     bf16="false", max_completion_length=8, micro_batch_size=2) | over)
    tr = GRPOTrainer(cfg, model, tok, [Example("toy/0", "p", "1")], lambda e: e.prompt,
                     RewardScorer(cfg, _NoVerifier(), []), HFGenerateEngine(model, tok), run_dir)
    ro = _rollout()
    index = tr.forwarded(ro)
    tr.compute_old_and_ref(ro, index)
    stats = tr.update(ro, index)
    out = {f"grad/{n}": _full(p.grad) for n, p in model.named_parameters()}
    out |= {f"param/{n}": _full(p.detach()) for n, p in model.named_parameters()}
    out["loss"], out["grad_norm"] = torch.tensor(stats["loss"]), torch.tensor(stats["grad_norm"])
    return out


def _sft_examples() -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(3)
    return [TokenizedExample(f"ex{i}", torch.randint(3, 1000, (3 + i,), generator=g).tolist(),
                             torch.randint(3, 1000, (2 + 3 * (i % 3),), generator=g).tolist()) for i in range(6)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain copy of a tensor or of an FSDP2 DTensor's whole value."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _sft_step(model_dir: str, run_dir: Path, **over) -> dict[str, torch.Tensor]:
    """One SFT train_step over a global batch of 4 examples (2 per rank, micro-batches of 1)."""
    model, tok = load_policy(model_dir, dtype=torch.float64)
    cfg = load_config(overrides=over | dict(bf16="false", output=str(run_dir), lr_scheduler="constant", learning_rate=1e-2,
                                     max_grad_norm=0.5, plot=False, save_steps=0, max_steps=3,
                                     per_device_train_batch_size=1, gradient_accumulation_steps=4), cls=SFTConfig)
    tr = SFTTrainer(cfg, model, tok, _sft_examples(), run_dir)
    m = tr.train_step()
    out = {f"param/{n}": _full(p.detach()) for n, p in model.named_parameters()}
    out |= {k: torch.tensor(m[k]) for k in ("loss", "grad_norm", "mean_token_accuracy", "trained_tokens")}
    return out


def _bad_settings(model_dir: str, run_dir: Path) -> dict[str, str]:
    """The error each bad data-parallel setting raises on this rank."""
    errors = {}
    try:
        _grpo_update(model_dir, run_dir, num_generations=3, prompts_per_step=1)
    except ConfigError as err:
        errors["grpo_indivisible"] = str(err)
    model, tok = load_policy(model_dir, dtype=torch.float64)
    cfg = load_config(overrides=dict(bf16="false", output=str(run_dir), per_device_train_batch_size=1,
                                     gradient_accumulation_steps=1), cls=SFTConfig)
    try:
        SFTTrainer(cfg, model, tok, _sft_examples(), run_dir)
    except ConfigError as err:
        errors["sft_too_few"] = str(err)
    other = run_dir / "other_model"                       # the same weights but one of another shape
    other.mkdir(parents=True)
    save_file({k: torch.ones(3) if k == "model.norm.weight" else v.clone() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}, str(other / "model.safetensors"))
    try:
        load_policy_weights(model, other)
    except R1kitError as err:
        errors["other_model"] = str(err)
    return errors


def _scenarios(model_dir: str, tmp: Path) -> dict:
    results = {}
    for strategy in ("ddp", "fsdp2"):
        for name, over in GRPO_SCENARIOS.items():
            if strategy == "ddp" or name in FSDP2_SCENARIOS:
                results[f"{strategy}/grpo/{name}"] = _grpo_update(model_dir, tmp / strategy / name,
                                                                  data_parallel=strategy, **over)
        results[f"{strategy}/sft"] = _sft_step(model_dir, tmp / strategy / "sft", data_parallel=strategy)
    results["mean_loss_grads"] = _fsdp2_mean_loss_grads()
    return results


def _fsdp2_mean_loss_grads() -> dict[str, torch.Tensor]:
    """Plain ``fully_shard`` (default averaging) of a float64 MLP, each rank's loss the mean over its
    equal half of 8 rows: the averaged gradient equals one process's mean over all 8 rows. Under the
    gloo summing bug (pytorch #162338) it would come out 2×."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    env = current()
    if env.enabled:
        fully_shard(mlp[0])
        fully_shard(mlp)
    lo, hi = shard_bounds(len(x), env)
    mlp(x[lo:hi]).pow(2).mean().backward()
    return {n: _full(p.grad) for n, p in mlp.named_parameters()}


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        tmp = Path(out) / f"rank{rank}"
        results = _scenarios(model_dir, tmp)
        results["errors"] = _bad_settings(model_dir, tmp)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, two_ranks_dir):
    out = two_ranks_dir
    mp.start_processes(_worker, args=(_free_port(), str(tiny_model_dir), str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tmp_path_factory):
    return _scenarios(str(tiny_model_dir), tmp_path_factory.mktemp("single"))


def test_the_rollout_straddles_ranks_with_unequal_tokens():
    ro = _rollout()
    half = len(ro) // WORLD
    assert (half % G) != 0                                                   # a group is cut by the rank boundary
    tokens = [sum(len(c) for c in ro.completion_ids[r * half:(r + 1) * half]) for r in range(WORLD)]
    assert tokens[0] != tokens[1]


def _assert_equal_results(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-10, msg=k)


@pytest.mark.parametrize("key", [f"ddp/grpo/{n}" for n in GRPO_SCENARIOS] + [f"fsdp2/grpo/{n}" for n in FSDP2_SCENARIOS])
def test_grpo_update_on_two_ranks_equals_one_process(two_ranks, one_rank, key):
    ref = one_rank[key]
    assert any(v.abs().max() > 0 for k, v in ref.items() if k.startswith("grad/"))
    for rank in range(WORLD):
        _assert_equal_results(two_ranks[rank][key], ref)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sft_step_on_two_ranks_equals_one_process(two_ranks, one_rank, strategy):
    for rank in range(WORLD):
        _assert_equal_results(two_ranks[rank][f"{strategy}/sft"], one_rank[f"{strategy}/sft"])
    batch = [_sft_examples()[i] for i in DataCursor(6, seed=0).take(4)]        # the global batch, shuffled
    assert one_rank["ddp/sft"]["trained_tokens"].item() == sum(len(e.completion_ids) for e in batch)
    assert len(batch[0].completion_ids) + len(batch[1].completion_ids) != \
        len(batch[2].completion_ids) + len(batch[3].completion_ids)           # unequal tokens per rank


def test_fsdp2_averaging_is_not_a_sum_on_gloo(two_ranks, one_rank):
    """The guard is divide factor 1 with our own global normalizer (the parity tests above); this
    checks the pinned torch's default averaging too, which gave N× gradients before PR #171458."""
    for rank in range(WORLD):
        _assert_equal_results(two_ranks[rank]["mean_loss_grads"], one_rank["mean_loss_grads"])


def test_bad_settings_are_one_clear_error_on_every_rank(two_ranks, two_ranks_dir):
    for rank in range(WORLD):
        errors = two_ranks[rank]["errors"]
        assert "prompts_per_step × num_generations (1 × 3) = 3 is not divisible by the 2 processes" in \
            errors["grpo_indivisible"]
        assert "--prompts-per-step" in errors["grpo_indivisible"]
        assert "2 processes but examples_per_step" in errors["sft_too_few"]
        assert "--nproc" in errors["sft_too_few"]
        assert errors["other_model"] == (f"{two_ranks_dir / f'rank{rank}' / 'other_model'} was written by a "
                                         "different model or config (mis-shaped (1): model.norm.weight: checkpoint "
                                         "(3,) vs model (32,)); resume with the --model and model settings of that run, or "
                                         "choose another --output")
    assert {k: v for k, v in two_ranks[0]["errors"].items() if k != "other_model"} == \
        {k: v for k, v in two_ranks[1]["errors"].items() if k != "other_model"}


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1] / "src")]))
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "r1kit", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kw)


def test_nproc_refuses_a_port_in_use(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli(["train", "sft", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"),
                  "--nproc", "2", "--master-port", str(port)])
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --master-port {port} is already in use on this machine (another run's "
                                "rendezvous?); pass a free --master-port")


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc; torchrun starts its ranks in sessions of their own)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        top = todo.pop()
        kids = [p for p, pp in parent.items() if pp == top]
        out += kids
        todo += kids
    return out


def _sft_args(model_dir, out, steps: int = 12) -> list[str]:
    return ["train", "sft", "--model", str(model_dir), "--data", "gsm8k", "--max-train-examples", "8",
            "--max-steps", str(steps), "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
            "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--bf16", "false", "--save-steps", "1",
            "--save-total-limit", "3", "--plot", "false", "--output", str(out), "--no-progress"]


def test_torchrun_run_killed_then_resumed_on_one_rank_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """``r1kit train sft --nproc 2`` (torchrun, gloo), the whole job killed with SIGKILL after a
    checkpoint, resumed in one process: the final weights equal a one-process run of the same steps.
    Not bit-exact: the 2-rank gradient is a sum of two partial sums (another float32 order)."""
    import signal
    import time

    from r1kit.cli import main

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1] / "src")]))
    proc = subprocess.Popen([sys.executable, "-m", "r1kit", *_sft_args(tiny_model_dir, killed), "--nproc", "2",
                             "--master-port", str(_free_port())], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended before checkpoint-2: {proc.stderr.read()}"
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:                    # torchrun and both ranks at once
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    rows = [json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:2] == [1, 2] and len({r["step"] for r in rows}) == len(rows)  # rank 0 alone
    assert main(_sft_args(tiny_model_dir, killed) + ["--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(_sft_args(tiny_model_dir, straight)) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3       # training moved the weights
    steps = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_fsdp2_refuses_a_scalar_parameter_by_name():
    from r1kit.train.distributed import DistEnv, shard_model

    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ConfigError, match=r"cannot shard the scalar parameter 'scale'.*data_parallel=ddp"):
        shard_model(model, DistEnv(rank=0, world_size=2, strategy="fsdp2"))


@pytest.fixture(scope="module")
def straight_sft(tiny_model_dir, tmp_path_factory) -> Path:
    """A 4-step one-process SFT run (checkpoints 2-4 and final/): the reference the resumed runs must end at."""
    from r1kit.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_sft_args(tiny_model_dir, out, steps=4)) == 0
    return out


def _assert_same_final(run: Path, ref: Path) -> None:
    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{run.name} {k}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_one_process_checkpoint_resumes_on_two_ranks(tiny_model_dir, straight_sft, tmp_path, strategy):
    """The other way round: a one-process run cut back to checkpoint-2 resumes under torchrun on 2 ranks
    (ddp: every rank loads the one checkpoint; fsdp2: every rank takes its shards of the whole weights
    and optimizer state) and ends where the uninterrupted run ends. Not bit-exact: from step 3 the
    gradient is a sum of two ranks' partial sums (another float32 order)."""
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(straight_sft, resumed)
    for name in ("checkpoint-3", "checkpoint-4", "final"):
        shutil.rmtree(resumed / name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1] / "src")]))
    r = subprocess.run([sys.executable, "-m", "r1kit", *_sft_args(tiny_model_dir, resumed, steps=4), "--resume",
                        "--data-parallel", strategy, "--nproc", "2", "--master-port", str(_free_port())], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "checkpoint-2" in r.stdout
    assert (resumed / "checkpoint-4" / "dcp").is_dir() == (strategy == "fsdp2")
    _assert_same_final(resumed, straight_sft)
    assert [json.loads(ln)["step"] for ln in (resumed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    a = load_file(str(straight_sft / "final" / "model.safetensors"))
    b = load_file(str(straight_sft / "checkpoint-2" / "policy" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4      # steps 3-4 moved the weights


def test_resume_with_another_model_is_one_clear_error(tiny_model_dir, straight_sft, tmp_path, capsys):
    """--resume of a run with a model of another shape: one error line naming the checkpoint and --model."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from r1kit.cli import main

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
                     ).save_pretrained(other)
    tok.save_pretrained(other)
    run = tmp_path / "run"
    shutil.copytree(straight_sft, run)
    shutil.rmtree(run / "final")
    before = [(run / f).read_bytes() for f in ("checkpoint-4/policy/model.safetensors", "config.yaml")]
    assert main(_sft_args(other, run, steps=5) + ["--resume"]) == 2  # another --model than config.yaml's
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume of {run} with settings that change the result: model: {str(tiny_model_dir)!r} → "
                   f"{str(other)!r}. Resume with the run's own settings (--resume without --preset/--config reuses "
                   f"{run / 'config.yaml'}), or start a new run with another --output (r1kit/config.py RESUME_FIELDS "
                   "lists what a resume may change)"]
    assert [(run / f).read_bytes() for f in ("checkpoint-4/policy/model.safetensors", "config.yaml")] == before
    # the same --model path as config.yaml's, but the directory now holds a model of another shape
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(tiny_model_dir), str(other)))
    before = [(run / f).read_bytes() for f in ("checkpoint-4/policy/model.safetensors", "config.yaml")]
    assert main(_sft_args(other, run, steps=5) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'checkpoint-4' / 'policy'} was written by a "
                                               "different model or config (mis-shaped (")
    assert "model.embed_tokens.weight: checkpoint (49152, 32) vs model (49152, 16)" in err[0]
    assert err[0].endswith("resume with the --model and model settings of that run, or choose another --output")
    assert [(run / f).read_bytes() for f in ("checkpoint-4/policy/model.safetensors", "config.yaml")] == before


def test_fsdp2_sharded_checkpoint_of_two_ranks_resumes_on_one(tiny_model_dir, straight_sft, tmp_path):
    """FSDP2 on 2 ranks (torchrun): checkpoints hold one DCP shard per rank and a gathered HF policy;
    ``final/`` is one HF directory; the run cut back to checkpoint-2 resumes in one process (DCP
    reshards the optimizer) and ends where a one-process run ends. A missing shard is one error."""
    import shutil

    from r1kit.cli import main

    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1] / "src")]))
    r = subprocess.run([sys.executable, "-m", "r1kit", *_sft_args(tiny_model_dir, two, steps=4), "--data-parallel",
                        "fsdp2", "--nproc", "2", "--master-port", str(_free_port())], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (two / "checkpoint-2" / "dcp").iterdir()) == [".metadata", "__0_0.distcp",
                                                                               "__1_0.distcp"]
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for name in ("checkpoint-3", "checkpoint-4", "final"):
        shutil.rmtree(resumed / name)
    broken = tmp_path / "broken"
    shutil.copytree(resumed, broken)
    (broken / "checkpoint-2" / "dcp" / "__1_0.distcp").unlink()
    with pytest.raises(R1kitError, match="cannot load the sharded checkpoint .*checkpoint-2/dcp"):
        main(_sft_args(tiny_model_dir, broken, steps=4) + ["--resume", "--debug"])
    assert main(_sft_args(tiny_model_dir, resumed, steps=4) + ["--resume"]) == 0
    for run in (two, resumed):
        _assert_same_final(run, straight_sft)
