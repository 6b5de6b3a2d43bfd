"""GRPO step time through Ray: 1 vs 2 rollout workers, overlap off/on, and the weight-sync time.

A random tiny Llama (hidden 64, 2 layers, SmolLM2's 49k vocabulary: the lm_head dominates) or, with
``--model``, any model directory; the toy sums task; r1kit's engine in each worker; ``--steps`` steps
per setting after one warm-up step (which pays for the actors' start). Reports the median step time,
weight-sync time (``ray.put`` of the state dict + every worker's load) and rollout tokens/s per worker.

On a 2-core box two rollout workers share the same two cores with the trainer, so a speed-up is not
expected here; the point is the overhead. On a GPU cluster on paper: rollout workers on their own GPUs
(vLLM) take the generation share of the step (70-90 % in R1-style runs, TRL #2610), the trainer's
update and the one-object weight sync (SCALE_SPEC §5: ~0.16 s put/get per 300 MB) stay on the trainer's
GPUs; with overlap the step costs max(generation, update) + sync instead of their sum.

Run: PYTHONPATH=src python bench/ray_rollout.py [--steps 3] [--model DIR] [--sync-model smollm2-135m-instruct]
(last line: step_s_1w=... step_s_2w=... step_s_overlap=... weight_sync_s=...)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def tiny_model(out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from r1kit.models.embedded import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def toy_task(out: Path) -> Path:
    rows = [{"question": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(32)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run(setting: dict, model: str, task: Path, steps: int, tmp: Path) -> dict:
    from r1kit.config import load_config
    from r1kit.data.loading import load_task
    from r1kit.train.recipe import make_grpo_trainer

    out = tmp / "_".join(f"{k}{v}" for k, v in setting.items())
    cfg = load_config(overrides=dict(
        model=model, task=str(task), template="direct", answer_extraction="any", reward_funcs=["format"],
        num_generations=4, prompts_per_step=4, max_completion_length=32, max_steps=steps + 1, bf16="false",
        rollout_backend="engine", output=str(out), plot=False, log_completions_steps=0, save_steps=0,
        ray=True, reward_workers=1, ray_worker_cpus=0.5, num_threads=1,
        rollout_importance_sampling_correction=True) | setting)
    tr = make_grpo_trainer(cfg, load_task(cfg.task, cfg.train_split), out)
    try:
        tr.train_step()                                   # warm-up: actor start, first caches
        rows = []
        for _ in range(steps):
            t0 = time.perf_counter()
            m = tr.train_step()
            m["wall"] = time.perf_counter() - t0
            rows.append(m)
    finally:
        tr.close()
    tps = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("tokens_per_s")}
    return {"step_s": statistics.median(r["wall"] for r in rows),
            "sync_s": statistics.median(r["ray/weight_sync_s"] for r in rows),
            "staleness": rows[-1]["ray/staleness_max"], **tps}


def sync_only(model: str, workers: int, repeats: int = 3) -> float:
    """Median seconds of ``RayCluster.publish`` (one ``ray.put`` of the state dict + every worker's
    load, awaited) of ``model`` to ``workers`` rollout workers, with no training."""
    from r1kit.config import load_config
    from r1kit.models.loading import load_policy
    from r1kit.runtime import make_verifier
    from r1kit.train.grpo import RewardScorer
    from r1kit.train.ray_grpo import RayCluster

    cfg = load_config(overrides=dict(model=model, task="gsm8k", ray=True, rollout_workers=workers, reward_workers=1,
                                     ray_worker_cpus=0.5, rollout_backend="engine", bf16="false"))
    policy, tok = load_policy(model, dtype=torch.float32)
    cluster = RayCluster(cfg, policy, tok, RewardScorer(cfg, make_verifier("gsm8k"), []), torch.float32)
    try:
        return statistics.median(cluster.publish(policy, v) for v in range(repeats))
    finally:
        cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--sync-model", default=None, help="also time the weight sync alone for this model (1 and 2 workers)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from serve import cpu_line   # the CPU line shared by the benches

    from r1kit.train.ray_grpo import connect

    print(cpu_line(), flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model or str(tiny_model(tmp / "model"))
        task = toy_task(tmp / "toy.jsonl")
        connect(None, 2)
        results = {}
        for name, setting in [("1w", dict(rollout_workers=1)), ("2w", dict(rollout_workers=2)),
                              ("overlap", dict(rollout_workers=1, ray_overlap=True))]:
            t0 = time.process_time()
            r = run(setting, model, task, args.steps, tmp)
            results[name] = r
            print(f"{name}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()) +
                  f" driver_cpu_s={time.process_time() - t0:.1f}", flush=True)
        if args.sync_model:
            for w in (1, 2):
                results[f"sync{w}"] = sync_only(args.sync_model, w)
                print(f"{args.sync_model}: weight_sync_s={results[f'sync{w}']:.3f} with {w} rollout worker(s)", flush=True)
    print(f"step_s_1w={results['1w']['step_s']:.3f} step_s_2w={results['2w']['step_s']:.3f} "
          f"step_s_overlap={results['overlap']['step_s']:.3f} weight_sync_s={results['1w']['sync_s']:.4f}")


if __name__ == "__main__":
    main()
