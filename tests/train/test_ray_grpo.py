"""GRPO on a real local Ray cluster (one per module, ``ray.init(num_cpus=2)`` through ``connect``):
a step through Ray equals the single-process step; every group is drawn and scored exactly once, also
when a rollout or a reward worker is killed mid-step; a run whose driver is killed resumes to the same
weights; placement beyond the cluster and bad input fail at once, with one error."""

import json
import os
import re
import signal
import subprocess
import sys
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


SRC = HERE.parents[1] / "src"


@pytest.fixture(scope="module")
def once_dir(tmp_path_factory):
    """Where toy_rewards.raises_once_on_three keeps its marker (the workers see it through the env)."""
    return tmp_path_factory.mktemp("once")


@pytest.fixture(scope="module", autouse=True)
def cluster(once_dir):
    """The module's cluster. The raylet starts with toy_rewards and this checkout's r1kit on PYTHONPATH,
    so the workers of another driver (a CLI run given its address) import them too. Ray's memory monitor
    is off: it counts the memory of every process on this shared machine and killed the tests' workers
    (0.15 GB each) when other jobs filled it; a real out-of-memory is still the kernel's to stop."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "R1KIT_TEST_ONCE_DIR", "RAY_memory_monitor_refresh_ms")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(SRC), saved["PYTHONPATH"]) if p)
    os.environ["R1KIT_TEST_ONCE_DIR"] = str(once_dir)
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    ray_grpo.connect(None, 2)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


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


def test_ray_steps_equal_single_process_and_survive_killed_workers(tiny_model_dir, toy_task, tmp_path):
    """Four steps through Ray against four single-process steps: equal groups, rewards, advantages and
    weights after every step, although rollout0 is killed in step 2 (after its groups were handed out)
    and the reward worker in step 3 (after it was given the first group to score): each is replaced, its
    unfinished groups re-issued or re-scored, each group taken once, and the replacements serve step 4."""
    steps = 4
    local = _trainer(_cfg(tiny_model_dir, toy_task, tmp_path / "local", max_steps=steps), tmp_path / "local")
    local_seen = _capture(local)
    ray_tr = _trainer(_cfg(tiny_model_dir, toy_task, tmp_path / "ray", ray=True, max_steps=steps), tmp_path / "ray")
    ray_seen = _capture(ray_tr)
    try:
        killed = {}
        orig_dispatch, orig_score = ray_tr.cluster.dispatch, ray_tr.cluster._score

        def dispatch_then_kill(groups):           # step 2: kill rollout0 after its groups were handed out
            pending = orig_dispatch(groups)
            if ray_tr.step == 1:
                killed["rollout"] = ray_tr.cluster.rollout.handles[0]
                ray.kill(killed["rollout"])
            return pending

        def score_then_kill(slot, gid, example, sample):   # step 3: kill reward0 once it holds a group
            ref = orig_score(slot, gid, example, sample)
            if ray_tr.step == 2 and "reward" not in killed:
                killed["reward"] = ray_tr.cluster.reward.handles[0]
                ray.kill(killed["reward"])
            return ref

        ray_tr.cluster.dispatch, ray_tr.cluster._score = dispatch_then_kill, score_then_kill
        metrics = []
        for _ in range(steps):
            local.train_step()
            metrics.append(ray_tr.train_step())
            a, b = local_seen[-1], ray_seen[-1]
            assert a.completion_ids == b.completion_ids and a.prompt_ids == b.prompt_ids
            assert torch.equal(a.rewards, b.rewards) and torch.equal(a.advantages, b.advantages)
            assert a.advantages.abs().sum() > 0
            for (name, p), q in zip(local.policy.named_parameters(), ray_tr.policy.parameters()):
                assert torch.equal(p, q), name
        assert set(killed) == {"rollout", "reward"}
        assert [m["ray/worker_restarts"] for m in metrics] == [0, 1, 2, 2]
        rows = [json.loads(x) for x in (tmp_path / "ray" / "ray_groups.jsonl").read_text().splitlines()]
        for step in range(1, steps + 1):
            mine = [r for r in rows if r["step"] == step]
            assert sorted(r["group"] for r in mine) == [0, 1, 2, 3]       # every group once: no duplicate, no gap
            assert all(r["version"] == step - 1 for r in mine)           # drawn with the weights of that step
        by_step = {step: [r for r in rows if r["step"] == step] for step in range(1, steps + 1)}
        workers = {step: {r["worker"] for r in mine} for step, mine in by_step.items()}
        assert workers[1] == {"rollout0", "rollout1"}
        assert "rollout0.r1" in workers[2] and workers[3] == workers[4] == {"rollout0.r1", "rollout1"}
        assert any(r["attempts"] == 2 for r in by_step[2])                # rollout0's groups were re-issued
        reward_workers = {step: {r["reward_worker"] for r in mine} for step, mine in by_step.items()}
        assert reward_workers[1] == reward_workers[2] == {"reward0"}
        assert "reward0.r1" in reward_workers[3] and reward_workers[4] == {"reward0.r1"}   # the replacement serves
        assert any(r["reward_attempts"] == 2 for r in by_step[3])         # its groups were re-scored...
        assert all(r["reward_attempts"] == 1 for s in (1, 2, 4) for r in by_step[s])
        assert all(r["reward_worker"] == "reward0.r1" for r in by_step[3] if r["reward_attempts"] == 2)
        assert metrics[0]["ray/staleness_max"] == 0.0 and metrics[0]["ray/weight_sync_s"] > 0
        assert metrics[0]["ray/rollout0/tokens_per_s"] > 0 and metrics[0]["ray/rollout1/tokens_per_s"] > 0
    finally:
        ray_tr.close()


def _cli_args(model, task, out, address):
    return ["train", "grpo", "--model", str(model), "--task", str(task), "--template", "direct",
            "--answer-extraction", "any", "--reward-funcs", "toy_rewards:distinct_chars", "--num-generations", "4",
            "--prompts-per-step", "2", "--max-completion-length", "6", "--learning-rate", "1e-2",
            "--max-steps", "5", "--save-steps", "1", "--save-total-limit", "10", "--bf16", "false",
            "--num-threads", "1", "--rollout-backend", "engine", "--plot", "false", "--no-progress",
            "--ray", "--ray-address", address, "--rollout-workers", "1", "--reward-workers", "1",
            "--ray-worker-cpus", "0.5", "--ray-sync-timeout", "120", "--output", str(out)]


def test_driver_killed_then_resumed_equals_an_uninterrupted_run(tiny_model_dir, toy_task, tmp_path):
    """A real ``r1kit train grpo --ray`` driver (its own process, on this module's cluster through
    --ray-address) killed with SIGKILL once checkpoint-2 exists; the cluster outlives it and Ray removes
    the dead driver's workers with its job, so ``--resume`` gets their CPUs back and continues from the
    last checkpoint. Final weights, metrics steps and logged groups equal an uninterrupted run's, bit for
    bit: float32 throughout, per-group sampling seeds, and the checkpoint holds the optimizer, scheduler,
    RNG and data cursor, so the resumed steps run the same arithmetic in the same order."""
    from safetensors.torch import load_file

    from r1kit.cli import main

    address = ray.get_runtime_context().gcs_address
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(SRC)]))
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "r1kit.cli", *_cli_args(tiny_model_dir, toy_task, killed, address)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (killed / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "final").exists(), "the driver finished before it was killed"
    assert main(_cli_args(tiny_model_dir, toy_task, killed, address) + ["--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(_cli_args(tiny_model_dir, toy_task, straight, address)) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)            # training moved the weights

    def rows(run, name):
        return [json.loads(x) for x in (run / name).read_text().splitlines()]

    assert [r["step"] for r in rows(killed, "metrics.jsonl")] == [1, 2, 3, 4, 5]   # no step logged twice
    assert [r["reward"] for r in rows(killed, "metrics.jsonl")] == [r["reward"] for r in rows(straight, "metrics.jsonl")]
    keys = ("step", "round", "group", "prompt_id", "version")
    groups_a = [tuple(r[k] for k in keys) for r in rows(straight, "ray_groups.jsonl")]
    groups_b = [tuple(r[k] for k in keys) for r in rows(killed, "ray_groups.jsonl")]
    assert groups_b == groups_a and len(groups_a) == 5 * 2 and len(set(groups_a)) == len(groups_a)


@pytest.mark.parametrize("retries", [0, 1])
def test_a_raising_reward_names_the_prompt_and_the_worker(tiny_model_dir, toy_task, tmp_path, once_dir, retries):
    """The reward raises on its first call for "What is 3 plus 4?" (toy/3). With ray_reward_retries=0 the
    step stops with one error naming the prompt and the worker; with 1 (and two reward workers) the group
    is re-scored on the other worker and every group's rewards are the real ones (distinct_chars), none a
    silent 0."""
    from toy_rewards import distinct_chars

    (once_dir / "three").unlink(missing_ok=True)
    cfg = _cfg(tiny_model_dir, toy_task, tmp_path, ray=True, rollout_workers=1, reward_workers=1 + retries,
               reward_funcs=["toy_rewards:raises_once_on_three"], ray_reward_retries=retries)
    tr = _trainer(cfg, tmp_path)
    seen = _capture(tr)
    try:
        if retries == 0:
            with pytest.raises(ray_grpo.RayWorkerError, match=r"reward worker reward0 failed on prompt 'toy/3' "
                               r"\(group \d\): ValueError: three, once; stopping \(ray_reward_retries=0\)"):
                for _ in range(3):
                    tr.train_step()
            return
        for _ in range(3):
            tr.train_step()
    finally:
        tr.close()
    assert (once_dir / "three").exists()                          # it did raise once
    rows = [json.loads(x) for x in (tmp_path / "ray_groups.jsonl").read_text().splitlines()]
    three = [r for r in rows if r["prompt_id"] == "toy/3"]
    assert len(three) == 1 and three[0]["reward_attempts"] == 2
    assert all(r["reward_attempts"] == 1 for r in rows if r["prompt_id"] != "toy/3")
    for ro in seen:
        want = torch.tensor(distinct_chars(ro.texts, ro.examples))
        assert torch.equal(ro.rewards, want.to(ro.rewards.dtype))


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


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                     # nothing listens there now
    return port


@pytest.fixture(scope="module")
def http_port():
    """A plain HTTP server on loopback: a wrong port (a Ray dashboard, say), not a GCS."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_port
    srv.shutdown()


@pytest.mark.parametrize("flags, error", [
    (["--ray-address", "127.0.0.1:CLOSED"], r"ray_address '127\.0\.0\.1:\d+' is unreachable \(.*refused\): start the "
                                            r"cluster \(`ray start --head`\)"),
    (["--ray-address", "127.0.0.1:HTTP"], r"ray_address '127\.0\.0\.1:\d+' answered, but not as a Ray GCS or Ray "
                                          r"Client server \(gRPC\): wrong port\?"),
    (["--ray-address", "head-node"], r"ray_address 'head-node' must be host:port, ray://host:port or auto$"),
    (["--reward-workers", "0"], r"reward_workers must be >= 1 under ray, got 0$"),
    (["--rollout-workers", "5", "--ray-worker-cpus", "1"], r"rollout_workers=5 \+ reward_workers=1 at ray_worker_cpus=1 "
                                                          r"need 6 CPUs but the Ray cluster has 2: .*--ray-worker-cpus"),
    (["--ray-overlap"], r"ray_overlap trains on samples one step stale: set --rollout-importance-sampling-correction"),
    (["--ray-overlap", "--rollout-importance-sampling-correction", "--dynamic-sampling"],
     r"ray_overlap cannot honour dynamic_sampling \(it resamples inside the step\)"),
])
def test_bad_ray_input_is_one_error_line_within_seconds(tiny_model_dir, toy_task, tmp_path, http_port, capsys,
                                                        flags, error):
    """``r1kit train grpo --ray`` with each bad input of issue 14 (an unreachable or wrong cluster address,
    0 workers, more workers than the cluster's CPUs, overlap with an option it cannot honour): exit 2,
    one ``error:`` line naming the field and the fix, within seconds, before any step."""
    from r1kit.cli import main

    flags = [f.replace("CLOSED", str(_closed_port())).replace("HTTP", str(http_port)) for f in flags]
    out = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["train", "grpo", "--model", str(tiny_model_dir), "--task", str(toy_task), "--ray",
               "--ray-worker-cpus", "0.5", "--output", str(out), "--no-progress", *flags])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    assert re.search(error, err[0]), err[0]
    assert time.perf_counter() - t0 < 30
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


def test_a_silent_address_fails_after_the_probe_timeout():
    """A port that accepts and never answers (ray.init retries one for minutes: measured > 3 min here)
    fails after the probe's timeout."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=r"did not answer within 2 s: start the cluster"):
            ray_grpo.connect(f"127.0.0.1:{s.getsockname()[1]}", None, timeout=2.0)
        assert 1.5 < time.perf_counter() - t0 < 10
    finally:
        s.close()


def test_cli_refuses_zero_workers_with_one_error_line(tiny_model_dir, toy_task, tmp_path):
    r = subprocess.run([sys.executable, "-m", "r1kit.cli", "train", "grpo", "--model", str(tiny_model_dir),
                        "--task", str(toy_task), "--ray", "--rollout-workers", "0", "--output", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parents[1] / "src")))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: rollout_workers must be >= 1 under ray, got 0"
