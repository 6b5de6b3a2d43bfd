"""GRPO on Ray: rollout and reward workers as Ray actors, the trainer in the driver (SCALE_SPEC §5).

The pattern of verl and OpenRLHF, on r1kit's own pieces:

  * **rollout workers** (``RolloutWorker``): each holds a copy of the policy and r1kit's sampling engine
    (``runtime.make_engine``); one call samples one group (G completions of one prompt) with the seed
    ``grpo.group_seed(seed, step, round, group)``, so which worker draws a group cannot change it;
  * **reward workers** (``RewardWorker``): each holds the run's ``RewardScorer`` (the verifier from
    ``runtime.make_verifier`` and the reward functions) and scores one group per call;
  * **the driver** (``RayGRPOTrainer``, a ``GRPOTrainer`` whose ``sample_round`` seam runs on the
    actors): it hands out groups, scores each as soon as it is sampled, and then computes advantages and
    updates the policy with the single-process code (``group_advantages``, ``GRPOTrainer.update``).
    With ``ray_overlap`` off one step equals the single-process step with ``rollout_group_seeds``
    (same groups, advantages and weights: ``tests/train/test_ray_grpo.py``).

Weights are published once per step as one object (``ray.put`` of the merged state dict) with a version
number (= optimizer steps taken); every group carries the version it was drawn with, and staleness
(trainer step − sample version) is logged. Every wait has ``ray_sync_timeout``.

Faults: a worker that dies (``ray.kill``: ``RayActorError``; killed by Ray's memory monitor:
``OutOfMemoryError``, see ``RayCluster.dead``) is replaced by a fresh actor
that loads the latest weights, and its unfinished groups are re-issued; each group's result is taken
once (by group index), so a step has every group exactly once. ``ray_groups.jsonl`` in the run
directory logs (step, round, group, prompt id, rollout and reward worker, version, attempts) of every group;
``--resume`` drops its rows of the steps after the checkpoint, like ``metrics.jsonl``. The checkpoints are
``GRPOTrainer``'s, so a run whose driver was killed resumes from its last one (the workers of the dead
driver are Ray's to clean up: they die with their job).

Overlap (``ray_overlap``): the round of step t+1 is sampled (with the weights of version t) while step
t trains, so every sample is one step stale; the rollout importance-sampling correction
(``rollout_importance_sampling_correction``, π_old/π_rollout from the engine's sampling logprobs)
reweights it. A checkpoint taken in overlap mode stores the data cursor from before the next step's
prefetched round, so a resumed run draws that step's problems again (with the same group seeds).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from r1kit.data.base import Example
from r1kit.errors import ConfigError, R1kitError
from r1kit.train.grpo import GRPOTrainer, RewardScorer, Rollout
from r1kit.train.loop import merged_for_save, merged_weights_view


class RayWorkerError(R1kitError):
    """A Ray worker failed in a way r1kit does not retry (a reward function raised, a sync timed out)."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the ray package: pip install 'r1kit[ray]'") from None
    return ray


# ----- the actors (plain classes; ``ray.remote`` wraps them in ``RayCluster``) -----

class RolloutWorker:
    """A policy copy and a sampling engine on one Ray actor.

    Args:
        name: the worker's name in metrics and logs ("rollout0", "rollout0.r1" after a restart).
        model: the (merged) policy module, float32; its weights are replaced by ``load_weights``.
        tokenizer: for EOS ids, stop strings and decoding.
        backend, dtype, max_batch_size: ``runtime.make_engine`` arguments.
        num_threads: torch intra-op threads of this process.
    """

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, backend: str, dtype: torch.dtype,
                 max_batch_size: int, num_threads: int):
        from r1kit.runtime import make_engine

        torch.set_num_threads(num_threads)
        self.name, self.model, self.tokenizer = name, model.eval(), tokenizer
        self.engine = make_engine(model, tokenizer, backend, dtype, max_batch_size)
        self.version = -1

    def ready(self) -> str:
        return self.name

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> tuple[int, float]:
        """Load the published state dict (one object) as policy ``version``; returns (version, seconds)."""
        t0 = time.perf_counter()
        self.model.load_state_dict(state_dict)
        self.engine.update_weights(self.model)
        self.version = version
        return version, time.perf_counter() - t0

    def generate_group(self, gid: int, prompt_ids: list[int], params) -> dict:
        """Sample one group (``params.n`` completions of ``prompt_ids`` with ``params.seed``)."""
        t0 = time.perf_counter()
        comps = self.engine.generate([prompt_ids], params)
        texts = self.tokenizer.batch_decode([o.token_ids for o in comps], skip_special_tokens=True)
        return {"gid": gid, "worker": self.name, "version": self.version, "completions": comps, "texts": texts,
                "seconds": time.perf_counter() - t0, "tokens": sum(len(o.token_ids) for o in comps)}


class RewardWorker:
    """The run's RewardScorer (verifier + reward functions) on one Ray actor."""

    def __init__(self, name: str, scorer: RewardScorer, num_threads: int):
        torch.set_num_threads(num_threads)
        self.name, self.scorer = name, scorer

    def ready(self) -> str:
        return self.name

    def score_group(self, gid: int, example: Example, texts: list[str], lengths: list[int],
                    truncated: list[bool]) -> dict:
        """(rewards_per_func (G, F), verdicts) of one group. Raises RayWorkerError naming the prompt and
        the worker when the verifier or a reward function raises."""
        try:
            rpf, verdicts = self.scorer(texts, [example] * len(texts), lengths, truncated)
        except Exception as err:  # noqa: BLE001 - any reward-code failure is reported with its prompt
            raise RayWorkerError(f"reward worker {self.name} failed on prompt {example.id!r} (group {gid}): "
                                 f"{type(err).__name__}: {err}") from None
        return {"gid": gid, "worker": self.name, "rewards_per_func": rpf, "verdicts": verdicts}


# ----- the cluster -----

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")   # + empty SETTINGS


def probe_address(address: str, timeout: float = 10.0) -> None:
    """Check within ``timeout`` s that ``address`` (host:port or ray://host:port) is a gRPC server, as a
    Ray GCS (port 6379 by default) and the Ray Client server (10001) are: it must accept a TCP connection
    and answer the HTTP/2 client preface with a SETTINGS frame (RFC 9113 §3.4). ``ray.init`` itself
    retries an unreachable or wrong port for minutes. Skipped under RAY_USE_TLS (the handshake is TLS).

    Raises:
        ConfigError: malformed address, refused or timed-out connection, or a server that is not gRPC.
    """
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray_address {address!r} must be host:port, ray://host:port or auto")
    fix = ("start the cluster (`ray start --head`), give the head's GCS address (HEAD_IP:6379, printed by `ray "
           "start`) or ray://HEAD_IP:10001, or leave ray_address unset for a local cluster")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        raise ConfigError(f"ray_address {address!r} did not answer within {timeout:g} s: {fix}") from None
    except OSError as err:
        raise ConfigError(f"ray_address {address!r} is unreachable ({err}): {fix}") from None
    if len(head) < 9 or head[3] != 0x4:
        raise ConfigError(f"ray_address {address!r} answered, but not as a Ray GCS or Ray Client server (gRPC): "
                          f"wrong port? {fix}")


def connect(address: str | None, num_cpus: int | None, timeout: float = 10.0) -> None:
    """``ray.init(address)`` for an existing cluster, else a local cluster of ``num_cpus`` logical CPUs
    (default ``os.cpu_count()``). A host:port address is probed first (``probe_address``), so an
    unreachable or wrong one fails in ``timeout`` s instead of hanging.

    Raises:
        ConfigError: ray missing, the address unreachable or not Ray's, or ``ray.init`` refusing it.
    """
    ray = _ray()
    if address and address != "auto":
        probe_address(address, timeout)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            import r1kit

            src = str(Path(r1kit.__file__).resolve().parents[1])   # workers import this r1kit, not another install
            path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"ray.init(address={address!r}) failed: {err}") from None


@dataclass
class _Pool:
    """Actors of one kind, each in a slot; a dead one is replaced in its slot."""

    kind: str
    make: Callable[[str], Any]
    handles: list = field(default_factory=list)
    names: list = field(default_factory=list)
    restarts: list = field(default_factory=list)

    def start(self, n: int) -> None:
        for i in range(n):
            self.names.append(f"{self.kind}{i}")
            self.restarts.append(0)
            self.handles.append(self.make(self.names[i]))

    def replace(self, slot: int) -> Any:
        self.restarts[slot] += 1
        self.names[slot] = f"{self.kind}{slot}.r{self.restarts[slot]}"
        self.handles[slot] = self.make(self.names[slot])
        return self.handles[slot]


class RayCluster:
    """The rollout and reward actors of one run, weight publication, and fault-tolerant group sampling.

    Args:
        cfg: the GRPOConfig (ray_* fields, rollout_backend).
        model: the merged policy (its initial weights start the rollout workers).
        tokenizer: the policy's tokenizer.
        scorer: the RewardScorer the reward workers run.
        rollout_dtype: the engines' weight dtype.

    Raises:
        ConfigError: the workers need more logical CPUs than the cluster has (an existing one, or a local
            one of --ray-num-cpus; checked before creating any actor: Ray would wait forever, verl #503),
            or they did not start within ray_sync_timeout.
    """

    def __init__(self, cfg, model: torch.nn.Module, tokenizer, scorer: RewardScorer,
                 rollout_dtype: torch.dtype | None):
        ray = _ray()
        self.ray, self.cfg = ray, cfg
        need = (cfg.rollout_workers + cfg.reward_workers) * cfg.ray_worker_cpus
        # a local cluster started here gets at least the logical CPUs its workers reserve (they may exceed the
        # cores: the workers then share them); an existing cluster, or --ray-num-cpus, is checked as it is
        connect(cfg.ray_address, cfg.ray_num_cpus or max(os.cpu_count() or 1, math.ceil(need)))
        have = ray.cluster_resources().get("CPU", 0.0)
        if need > have:
            raise ConfigError(f"rollout_workers={cfg.rollout_workers} + reward_workers={cfg.reward_workers} at "
                              f"ray_worker_cpus={cfg.ray_worker_cpus:g} need {need:g} CPUs but the Ray cluster has "
                              f"{have:g}: lower the worker counts or --ray-worker-cpus, or add nodes")
        # what a dead worker's pending call raises: killed (ray.kill, node or process death) or killed by
        # Ray's memory monitor when the node runs low on memory (OutOfMemoryError is no RayActorError)
        self.dead = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)
        opts = dict(num_cpus=cfg.ray_worker_cpus, max_restarts=0)
        rollout_cls, reward_cls = ray.remote(**opts)(RolloutWorker), ray.remote(**opts)(RewardWorker)
        model_ref, tok_ref, scorer_ref = ray.put(model), ray.put(tokenizer), ray.put(scorer)
        self.rollout = _Pool("rollout", lambda name: rollout_cls.remote(
            name, model_ref, tok_ref, cfg.rollout_backend, rollout_dtype, 64, cfg.ray_worker_threads))
        self.reward = _Pool("reward", lambda name: reward_cls.remote(name, scorer_ref, cfg.ray_worker_threads))
        self.rollout.start(cfg.rollout_workers)
        self.reward.start(cfg.reward_workers)
        try:
            self._wait([h.ready.remote() for h in self.rollout.handles + self.reward.handles], "start the workers",
                       error=ConfigError)
        except self.dead as err:
            raise ConfigError(f"a Ray worker failed to start: {err}") from None
        self.weights_ref, self.version = None, -1
        self.pending_loads: list = []
        self.load_seconds: list[float] = []
        self.worker_stats: dict[str, list[float]] = {}   # slot name -> [tokens, seconds]

    def _wait(self, refs: list, what: str, error=RayWorkerError):
        """``ray.get(refs)`` within ray_sync_timeout, else ``error`` naming what was waited for."""
        try:
            return self.ray.get(refs, timeout=self.cfg.ray_sync_timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise error(f"Ray workers did not {what} within ray_sync_timeout={self.cfg.ray_sync_timeout:g} s: check "
                        "`ray status` for missing CPUs or dead nodes, or raise --ray-sync-timeout") from None

    @property
    def restarts(self) -> int:
        return sum(self.rollout.restarts) + sum(self.reward.restarts)

    # ----- weights -----
    def publish(self, model: torch.nn.Module, version: int, wait: bool = True) -> float:
        """Publish ``model``'s state dict as one object (``ray.put``) tagged ``version`` and have every
        rollout worker load it; with ``wait`` block until all have (timeout: ray_sync_timeout), else the
        acknowledgements are awaited by the next ``finish_loads``. Returns the seconds spent here."""
        t0 = time.perf_counter()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        self.weights_ref, self.version = self.ray.put(state), version
        self.pending_loads = [h.load_weights.remote(self.weights_ref, version) for h in self.rollout.handles]
        if wait:
            self.finish_loads()
        return time.perf_counter() - t0

    def finish_loads(self) -> None:
        """Wait for the outstanding weight loads (a dead worker's is dropped: it is replaced on use)."""
        refs, self.pending_loads = self.pending_loads, []
        for ref in refs:
            try:
                _, seconds = self._wait(ref, f"load weights version {self.version}")
                self.load_seconds.append(seconds)
            except self.dead:
                pass

    def _replace_rollout(self, slot: int, dead) -> Any:
        if self.rollout.handles[slot] is dead:             # not yet replaced by an earlier failed call
            self._check_restarts(self.rollout.names[slot])
            handle = self.rollout.replace(slot)
            handle.load_weights.remote(self.weights_ref, self.version)   # runs before any generate call
        return self.rollout.handles[slot]

    def _check_restarts(self, name: str) -> None:
        if self.restarts >= self.cfg.ray_max_restarts:
            raise RayWorkerError(f"worker {name} died and ray_max_restarts={self.cfg.ray_max_restarts} workers were "
                                 "already replaced in this run: check the workers' memory and logs (`ray logs`)")

    # ----- one round -----
    def dispatch(self, groups: list[tuple[int, list[int], Any]]) -> dict:
        """Submit each (group index, prompt ids, seeded params) to a rollout worker, round-robin;
        returns the pending round for ``collect``."""
        calls = {}
        for k, (gid, pids, params) in enumerate(groups):
            slot = k % len(self.rollout.handles)
            handle = self.rollout.handles[slot]
            calls[handle.generate_group.remote(gid, pids, params)] = (gid, slot, handle, 1)
        return {"groups": {g[0]: g for g in groups}, "calls": calls}

    def collect(self, pending: dict, examples: list[Example], log: list[dict]) -> Rollout:
        """Wait for every group of a dispatched round, scoring each on a reward worker as soon as it is
        sampled; a dead worker is replaced and its groups re-issued; each group is taken once.

        Raises:
            RayWorkerError: a reward function raised (after ray_reward_retries retries on other workers),
                a result did not come within ray_sync_timeout, or too many workers died.
        """
        ray = self.ray
        gen_calls: dict = dict(pending["calls"])
        score_calls: dict = {}
        samples: dict[int, dict] = {}
        scores: dict[int, dict] = {}
        self.score_attempts: dict[int, int] = {}
        n_groups, next_reward = len(pending["groups"]), 0
        while len(scores) < n_groups:
            refs = list(gen_calls) + list(score_calls)
            ready, _ = ray.wait(refs, num_returns=1, timeout=self.cfg.ray_sync_timeout)
            if not ready:
                missing = sorted(set(pending["groups"]) - set(scores))
                raise RayWorkerError(f"groups {missing} got no result within ray_sync_timeout="
                                     f"{self.cfg.ray_sync_timeout:g} s: check `ray status`, or raise --ray-sync-timeout")
            ref = ready[0]
            if ref in gen_calls:
                gid, slot, handle, attempt = gen_calls.pop(ref)
                try:
                    out = ray.get(ref)
                except self.dead:
                    handle = self._replace_rollout(slot, handle)
                    _, pids, params = pending["groups"][gid]
                    gen_calls[handle.generate_group.remote(gid, pids, params)] = (gid, slot, handle, attempt + 1)
                    continue
                except ray.exceptions.RayTaskError as err:
                    raise RayWorkerError(f"rollout worker {self.rollout.names[slot]} failed on prompt "
                                         f"{examples[gid].id!r} (group {gid}): {err.cause if err.cause else err}") from None
                if gid in samples:                         # never count a group twice
                    continue
                out["attempts"] = attempt
                samples[gid] = out
                st = self.worker_stats.setdefault(f"rollout{slot}", [0.0, 0.0])
                st[0], st[1] = st[0] + out["tokens"], st[1] + out["seconds"]
                slot_r = next_reward % len(self.reward.handles)
                next_reward += 1
                score_calls[self._score(slot_r, gid, examples[gid], out)] = (gid, slot_r, self.reward.handles[slot_r], 0)
            else:
                gid, slot_r, handle, retries = score_calls.pop(ref)
                try:
                    result = ray.get(ref)
                    if gid not in scores:                  # never count a group's rewards twice
                        scores[gid] = result
                except self.dead:
                    if self.reward.handles[slot_r] is handle:
                        self._check_restarts(self.reward.names[slot_r])
                        self.reward.replace(slot_r)
                    score_calls[self._score(slot_r, gid, examples[gid], samples[gid])] = (
                        gid, slot_r, self.reward.handles[slot_r], retries)
                except ray.exceptions.RayTaskError as err:
                    cause = err.cause if isinstance(getattr(err, "cause", None), RayWorkerError) else None
                    msg = str(cause) if cause else f"reward worker {self.reward.names[slot_r]} failed on prompt " \
                                                   f"{examples[gid].id!r} (group {gid}): {err}"
                    if retries >= self.cfg.ray_reward_retries:
                        raise RayWorkerError(f"{msg}; stopping (ray_reward_retries={self.cfg.ray_reward_retries}): fix the "
                                             "reward function, or raise --ray-reward-retries to re-score on "
                                             "another worker first") from None
                    slot_r = (slot_r + 1) % len(self.reward.handles)
                    score_calls[self._score(slot_r, gid, examples[gid], samples[gid])] = (
                        gid, slot_r, self.reward.handles[slot_r], retries + 1)
        order = sorted(pending["groups"])
        comps, texts, rpf, verdicts, versions = [], [], [], [], []
        for gid in order:
            s = samples[gid]
            comps += [replace(o, prompt_index=gid) for o in s["completions"]]
            texts += s["texts"]
            rpf.append(scores[gid]["rewards_per_func"])
            verdicts += scores[gid]["verdicts"]
            versions += [s["version"]] * len(s["completions"])
            log.append({"group": gid, "prompt_id": examples[gid].id, "worker": s["worker"],
                        "reward_worker": scores[gid]["worker"], "version": s["version"], "attempts": s["attempts"],
                        "reward_attempts": self.score_attempts[gid]})
        return Rollout.of_round([examples[gid] for gid in order], [pending["groups"][gid][1] for gid in order],
                                comps, texts, torch.cat(rpf), verdicts, versions)

    def _score(self, slot: int, gid: int, example: Example, sample: dict):
        """Submit one group's scoring to reward worker ``slot`` (counted in ``score_attempts``)."""
        self.score_attempts[gid] = self.score_attempts.get(gid, 0) + 1
        comps = sample["completions"]
        return self.reward.handles[slot].score_group.remote(gid, example, sample["texts"],
                                                            [len(o.token_ids) for o in comps],
                                                            [o.truncated for o in comps])

    def shutdown(self) -> None:
        for h in self.rollout.handles + self.reward.handles:
            self.ray.kill(h)


class RayGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rounds are sampled and scored on Ray actors (module docstring).

    Args: those of ``GRPOTrainer``, plus ``rollout_dtype`` for the workers' engines. ``engine`` is kept
    for evaluation in the driver only. Raises ConfigError as ``RayCluster``.
    """

    desc = "grpo/ray"

    def __init__(self, cfg, policy, tokenizer, train_examples, render, scorer, engine, run_dir: Path,
                 rollout_dtype: torch.dtype | None = None):
        cfg.rollout_group_seeds = True
        self.in_step = False
        super().__init__(cfg, policy, tokenizer, train_examples, render, scorer, engine, run_dir)
        self.cluster = RayCluster(cfg, merged_for_save(policy), tokenizer, scorer, rollout_dtype)
        self.sync_seconds = self.cluster.publish(merged_weights_view(policy), self.step)
        self.prefetched: tuple | None = None
        self.in_step = False
        self.round_log: list[dict] = []
        self.groups_path = self.run_dir / "ray_groups.jsonl"
        self.logger.step_logs.append(self.groups_path)       # --resume drops the rows of steps after the checkpoint

    # ----- the seam -----
    def _dispatch(self, exs: list[Example], pids: list[list[int]], round_index: int, step: int) -> dict:
        return self.cluster.dispatch([(g, p, self.group_params(round_index, g, step)) for g, p in enumerate(pids)])

    def _collect(self, pending: dict, exs: list[Example], round_index: int, step: int) -> Rollout:
        log: list[dict] = []
        sr = self.cluster.collect(pending, exs, log)
        self.round_log += [{"step": step + 1, "round": round_index, **row} for row in log]
        return sr

    def sample_round(self, exs, pids, round_index):
        """One round on the actors (the ``GRPOTrainer.sample_round`` seam), with the current weights."""
        return self._collect(self._dispatch(exs, pids, round_index, self.step), exs, round_index, self.step)

    def next_round(self, round_index: int):
        """Overlap off: ``GRPOTrainer.next_round``. On: hand out the round dispatched during the previous
        step (or dispatch it now on the first step), then dispatch the next step's round at once, with
        the current weights, so it samples while this step trains."""
        if not self.cfg.ray_overlap:
            return super().next_round(round_index)
        if self.prefetched is None:
            self.prefetched = self._prefetch(self.step)
        exs, pending, step = self.prefetched
        self.prefetched = self._prefetch(self.step + 1) if self.step + 1 < self.total_steps else None
        return self._collect(pending, exs, round_index, step)

    def _prefetch(self, step: int) -> tuple:
        self.cursor_before_prefetch = (self.data.epoch, self.data.cursor)
        exs = self.next_examples(self.cfg.prompts_per_step)
        pids = [self.prompt_ids(e) for e in exs]
        return exs, self._dispatch(exs, pids, 0, step), step

    def generate_and_score(self):
        ro = super().generate_and_score()
        self.last_versions = ro.policy_versions or []
        return ro

    def state(self) -> dict:
        """``GRPOTrainer.state`` with, in overlap mode, the data cursor from before the round already
        drawn for the next step, so a resumed run samples that step's problems again (same seeds)."""
        st = super().state()
        if self.prefetched is not None:
            st["epoch"], st["cursor"] = self.cursor_before_prefetch
        return st

    def refresh_engine(self) -> None:
        """Publish the updated weights to the rollout workers as version ``step`` (the local engine, kept
        for evaluation, is refreshed by ``refresh_local_engine``). Overlap: the load is not awaited here."""
        version = self.step + 1 if self.in_step else self.step    # train_step counts the step after this
        self.sync_seconds = self.cluster.publish(merged_weights_view(self.policy), version,
                                                 wait=not self.cfg.ray_overlap)

    def refresh_local_engine(self) -> None:
        super().refresh_engine()

    def train_step(self) -> dict[str, float]:
        """``GRPOTrainer.train_step`` with the Ray metrics: weight-sync time, staleness, restarts,
        per-worker tokens/s; appends this step's groups to ``ray_groups.jsonl``."""
        self.round_log = []
        self.cluster.worker_stats = {}
        self.cluster.load_seconds = []
        step_before = self.step
        self.in_step = True
        try:
            m = super().train_step()
        finally:
            self.in_step = False
        stale = [step_before - v for v in self.last_versions]
        m["ray/weight_sync_s"] = self.sync_seconds
        m["ray/worker_load_s"] = max(self.cluster.load_seconds, default=float("nan"))
        m["ray/staleness_mean"] = sum(stale) / max(len(stale), 1)
        m["ray/staleness_max"] = float(max(stale, default=0))
        m["ray/worker_restarts"] = float(self.cluster.restarts)
        for i in range(self.cfg.rollout_workers):
            tok, sec = self.cluster.worker_stats.get(f"rollout{i}", [0.0, 0.0])
            m[f"ray/rollout{i}/tokens_per_s"] = tok / sec if sec > 0 else float("nan")
        with open(self.groups_path, "a") as f:
            for row in self.round_log:
                f.write(json.dumps(row) + "\n")
        return m

    def close(self) -> None:
        self.cluster.shutdown()
