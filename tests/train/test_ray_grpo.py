"""GRPO on a real local Ray cluster (one per module, ``ray.init(num_cpus=2)`` through ``connect``):
a step through Ray equals the single-process step; every group is drawn exactly once, also when a
rollout worker is killed mid-step; placement beyond the cluster and bad input fail at once."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from r1kit.config import load_config  # noqa: E402
from r1kit.data.loading import load_task  # noqa: E402
from r1kit.errors import ConfigError  # noqa: E402
from r1kit.train import ray_grpo  # noqa: E402
from r1kit.train.recipe import make_grpo_trainer  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module", autouse=True)
def cluster():
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), old) if p)   # toy_rewards in the workers
    ray_grpo.connect(None, 2)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def _cfg(tiny_model_dir, toy_task, out, **over):
    return load_config(overrides=dict(
        model=str(tiny_model_dir), task=str(toy_task), template="direct", answer_extraction="any",
        reward_funcs=["toy_rewards:distinct_chars"], num_generations=4, prompts_per_step=4,
        max_completion_length=6, learning_rate=1e-2, max_steps=3, bf16="false", rollout_backend="engine",
        rollout_group_seeds=True, output=str(out), plot=False, log_completions_steps=0, save_steps=0,
        rollout_workers=2, reward_workers=1, ray_worker_cpus=0.5, ray_sync_timeout=120.0) | over)


def _trainer(cfg, out):
    return make_grpo_trainer(cfg, load_task(cfg.task, cfg.train_split), out)


def _capture(trainer):
    """Record each step's rollout (groups, rewards, advantages) as the trainer produces it."""
    seen = []
    orig = trainer.generate_and_score

    def wrapped():
        ro = orig()
        seen.append(ro)
        return ro

    trainer.generate_and_score = wrapped
    return seen


def test_ray_steps_equal_single_process_and_survive_a_killed_worker(tiny_model_dir, toy_task, tmp_path):
    local = _trainer(_cfg(tiny_model_dir, toy_task, tmp_path / "local"), tmp_path / "local")
    local_seen = _capture(local)
    ray_tr = _trainer(_cfg(tiny_model_dir, toy_task, tmp_path / "ray", ray=True), tmp_path / "ray")
    ray_seen = _capture(ray_tr)
    try:
        killed = {}
        orig_dispatch = ray_tr.cluster.dispatch

        def dispatch_then_kill(groups):           # step 2: kill rollout0 after its groups were handed out
            pending = orig_dispatch(groups)
            if ray_tr.step == 1:
                killed["handle"] = ray_tr.cluster.rollout.handles[0]
                ray.kill(killed["handle"])
            return pending

        ray_tr.cluster.dispatch = dispatch_then_kill
        metrics = []
        for _ in range(3):
            local.train_step()
            metrics.append(ray_tr.train_step())
            a, b = local_seen[-1], ray_seen[-1]
            assert a.completion_ids == b.completion_ids and a.prompt_ids == b.prompt_ids
            assert torch.equal(a.rewards, b.rewards) and torch.equal(a.advantages, b.advantages)
            assert a.advantages.abs().sum() > 0
            for (name, p), q in zip(local.policy.named_parameters(), ray_tr.policy.parameters()):
                assert torch.equal(p, q), name
        init = load_task(str(toy_task), "train")
        assert killed and metrics[0]["ray/worker_restarts"] == 0 and metrics[2]["ray/worker_restarts"] == 1
        rows = [json.loads(x) for x in (tmp_path / "ray" / "ray_groups.jsonl").read_text().splitlines()]
        for step in (1, 2, 3):
            mine = [r for r in rows if r["step"] == step]
            assert sorted(r["group"] for r in mine) == [0, 1, 2, 3]       # every group once: no duplicate, no gap
            assert all(r["version"] == step - 1 for r in mine)           # drawn with the weights of that step
        workers = {step: {r["worker"] for r in rows if r["step"] == step} for step in (1, 2, 3)}
        assert workers[1] == {"rollout0", "rollout1"}
        assert "rollout0.r1" in workers[2] and workers[3] == {"rollout0.r1", "rollout1"}   # the replacement serves
        assert any(r["attempts"] == 2 for r in rows if r["step"] == 2)
        assert metrics[0]["ray/staleness_max"] == 0.0 and metrics[0]["ray/weight_sync_s"] > 0
        assert metrics[0]["ray/rollout0/tokens_per_s"] > 0 and metrics[0]["ray/rollout1/tokens_per_s"] > 0
        assert len(init) > 0
    finally:
        ray_tr.close()


def test_more_workers_than_cpus_fails_within_seconds(tiny_model_dir, toy_task, tmp_path):
    cfg = _cfg(tiny_model_dir, toy_task, tmp_path, ray=True, rollout_workers=5, ray_worker_cpus=1.0)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"need 6 CPUs but the Ray cluster has 2.*--ray-worker-cpus"):
        _trainer(cfg, tmp_path)
    assert time.perf_counter() - t0 < 30


def test_a_raising_reward_names_the_prompt_and_the_worker(tiny_model_dir, toy_task, tmp_path):
    cfg = _cfg(tiny_model_dir, toy_task, tmp_path, ray=True, rollout_workers=1,
               reward_funcs=["toy_rewards:raises_on_three"])
    tr = _trainer(cfg, tmp_path)
    try:
        with pytest.raises(ray_grpo.RayWorkerError,
                           match=r"reward worker reward0 failed on prompt 'toy/\d+'.*ValueError: three.*ray_reward_retries=0"):
            for _ in range(3):
                tr.train_step()
    finally:
        tr.close()


def test_overlap_trains_one_step_stale_with_the_importance_correction(tiny_model_dir, toy_task, tmp_path):
    cfg = _cfg(tiny_model_dir, toy_task, tmp_path, ray=True, rollout_workers=1, ray_overlap=True,
               rollout_importance_sampling_correction=True, max_steps=2)
    tr = _trainer(cfg, tmp_path)
    try:
        m = [tr.train_step()]
        # step 2's problems are already drawn; a checkpoint now stores the cursor from before them
        assert tr.data.cursor == 8 and tr.state()["cursor"] == 4
        m.append(tr.train_step())
    finally:
        tr.close()
    assert [x["ray/staleness_max"] for x in m] == [0.0, 1.0]    # step 1 draws with version 0, so does step 2
    # step 2's samples come from version 0 while the policy has moved once: the correction sees a ratio != 1
    key = "sampling/importance_sampling_ratio"
    assert abs(m[1][f"{key}/mean"] - 1) > 1e-6 and m[1][f"{key}/min"] <= m[1][f"{key}/max"]
    rows = [json.loads(x) for x in (tmp_path / "ray_groups.jsonl").read_text().splitlines()]
    assert [(r["step"], r["version"]) for r in rows] == [(1, 0)] * 4 + [(2, 0)] * 4
    assert tr.prefetched is None and tr.state()["cursor"] == 8      # nothing drawn beyond max_steps


@pytest.mark.parametrize("over, match", [
    (dict(rollout_workers=0), "rollout_workers must be >= 1"),
    (dict(reward_workers=0), "reward_workers must be >= 1"),
    (dict(ray_overlap=True), "rollout-importance-sampling-correction true"),
    (dict(ray_overlap=True, rollout_importance_sampling_correction=True, dynamic_sampling=True),
     "cannot honour dynamic_sampling"),
])
def test_bad_ray_config_is_one_clear_error(tiny_model_dir, toy_task, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tiny_model_dir, toy_task, tmp_path, ray=True, **over).validate()


def test_unreachable_address_fails_fast():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                     # nothing listens there now
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"ray_address '127.0.0.1:{port}' is unreachable"):
        ray_grpo.connect(f"127.0.0.1:{port}", None)
    assert time.perf_counter() - t0 < 15


def test_cli_refuses_zero_workers_with_one_error_line(tiny_model_dir, toy_task, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "r1kit.cli", "train", "grpo", "--model", str(tiny_model_dir),
                        "--task", str(toy_task), "--ray", "--rollout-workers", "0", "--output", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parents[1] / "src")))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: rollout_workers must be >= 1 under ray, got 0"
