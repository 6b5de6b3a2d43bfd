"""GRPO step time through Ray: 1 vs 2 rollout workers, overlap off/on, the weight-sync time, and how
the step would split on a GPU cluster, on paper (``paper_estimate``), printed beside the CPU figures.

A random tiny Llama (hidden 64, 2 layers, SmolLM2's 49k vocabulary: the lm_head dominates) or, with
``--model``, any model directory; the toy sums task; r1kit's engine in each worker; ``--steps`` steps
per setting after one warm-up step (which pays for the actors' start). Reports the median step time,
its split (rollout incl. scoring, update, weight sync: ``time/rollout``, ``time/update`` minus
``ray/weight_sync_s``), weight-sync time (``ray.put`` of the state dict + every worker's load) and
rollout tokens/s per worker. The reward is ``toy_rewards:distinct_chars`` (tests/train), which varies on
a random model, so every step runs a real update. On a 2-core box two rollout workers share the same two cores with the
trainer, so no speed-up is expected here; the point is the overhead and the bookkeeping.

The estimate on paper (``PaperCluster``: every assumption a field with its source) is a 7B policy,
vLLM rollout workers on N_r H100s, an FSDP trainer on N_t H100s; docs/SCALE.md ("Ray") discusses it.

Run: PYTHONPATH=src python bench/ray_rollout.py [--steps 3] [--model DIR] [--sync-model smollm2-135m-instruct]
     PYTHONPATH=src python bench/ray_rollout.py --paper-only      (the estimate alone, no Ray)
(last line: step_s_1w=... step_s_2w=... step_s_overlap=... weight_sync_s=...)
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOY_REWARDS = HERE.parent / "tests" / "train"          # toy_rewards.distinct_chars: varies on a random model,
REWARD = "toy_rewards:distinct_chars"                   # so every step runs a real update (``format`` is 0 for all)


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
        model=model, task=str(task), template="direct", answer_extraction="any", reward_funcs=[REWARD],
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
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "time/rollout", "time/update", "ray/weight_sync_s")}
    return {"step_s": med["wall"], "rollout_s": med["time/rollout"],
            "update_s": med["time/update"] - med["ray/weight_sync_s"], "sync_s": med["ray/weight_sync_s"],
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


@dataclass
class PaperCluster:
    """One GRPO step of a 7B policy on H100s, on paper. Every field is an assumption; its source follows."""

    params: float = 7.6e9                # Qwen2.5-7B: 7.61B parameters (its model card)
    weight_bytes: int = 2                # bf16 weights published to the rollout engines
    prompts: int = 64                    # prompts_per_step
    num_generations: int = 16            # G (R1 / DeepSeekMath use 16)
    prompt_tokens: int = 256             # mean prompt length
    completion_tokens: int = 1024        # mean completion length
    max_completion_tokens: int = 2048    # the longest completion of the step (<= the vLLM figure's max-seq-len)
    vllm_tok_s: float = 8088.0           # output tok/s on 1 H100 SXM, Llama 3.1 8B, vLLM 0.6.0, 10 scheduler steps,
    #                                      5000 prompts, max-num-seqs 256, max-seq-len 2048 (LambdaLabsML/vllm-benchmark,
    #                                      benchmark_v0.md); data-parallel engines scale it ~linearly (same report)
    vllm_itl_s: float = 0.0079           # s per token of a lone sequence: Mistral-7B-v0.3, 1 H100, 10 prompts, median
    #                                      ITL 7.9 ms (same repo, results/prompt_10/1xH100-80GB-SXM/...tp1_len2000.json)
    verify_s: float = 1 / 307            # s per math verification, LaTeX answer (bench/verifier.py here: 307/CPU-s)
    beta_forward: bool = True            # beta > 0 (the r1 presets: 0.001): one reference forward per token
    peak_flops: float = 989e12           # H100 SXM dense bf16 FLOP/s (NVIDIA datasheet)
    mfu: tuple = ((8, 0.40), (16, 0.37), (32, 0.31))   # trainer GPUs -> MFU (verl, Qwen3-30B-A3B; SCALE_SPEC §6)
    d2h_gb_s: float = 25.0               # GPU->host copy of the gathered state dict (PCIe Gen5 x16 is 64 GB/s raw)
    put_gb_s: float = 10.0               # ray.put into the object store (memcpy-bound; 1.9 GB/s on this 2-core box)
    net_gb_s: float = 10.0               # Ray object transfer to one rollout node (TCP; the NIC: 400 Gb/s = 50 GB/s)
    nccl_gb_s: float = 40.0              # NCCL broadcast bus bandwidth over 400 Gb/s InfiniBand (verl/OpenRLHF's path)
    gpus_per_node: int = 8

    def mfu_at(self, n: int) -> float:
        pts = sorted(self.mfu)
        if n <= pts[0][0]:
            return pts[0][1]
        for (n0, m0), (n1, m1) in zip(pts, pts[1:]):
            if n <= n1:
                return m0 + (m1 - m0) * math.log(n / n0) / math.log(n1 / n0)
        return pts[-1][1]

    def phases(self, rollout_gpus: int, trainer_gpus: int) -> dict[str, float]:
        """Seconds of each phase of one step: rollout (max of the throughput bound and the longest
        completion decoded alone), the last group's scoring (the others are scored while sampling goes
        on), the update (FLOPs / (GPUs x peak x MFU)), the one-object weight sync, and NCCL's for contrast."""
        B = self.prompts * self.num_generations
        gen_tokens = B * self.completion_tokens
        rollout = max(gen_tokens / (rollout_gpus * self.vllm_tok_s), self.max_completion_tokens * self.vllm_itl_s)
        score_tail = self.num_generations * self.verify_s
        train_tokens = B * (self.prompt_tokens + self.completion_tokens)
        flops = (6 + 2 * self.beta_forward) * self.params * train_tokens      # fwd+bwd (6P) + reference fwd (2P)
        update = flops / (trainer_gpus * self.peak_flops * self.mfu_at(trainer_gpus))
        gb = self.params * self.weight_bytes / 1e9
        nodes = math.ceil(rollout_gpus / self.gpus_per_node)
        sync = gb / self.d2h_gb_s + gb / self.put_gb_s + nodes * gb / self.net_gb_s + gb / self.d2h_gb_s
        return {"rollout": rollout, "score_tail": score_tail, "update": update, "sync": sync,
                "nccl_sync": gb / self.nccl_gb_s, "gen_tokens": gen_tokens, "flops": flops, "gb": gb}


def paper_estimate(pc: PaperCluster | None = None) -> list[str]:
    """The estimate's lines: the assumptions, then step time and phase shares for rollout GPUs 4..32
    (trainer on 8), overlap off (sum) and on (max(rollout, update + sync) + the scoring tail)."""
    pc = pc or PaperCluster()
    p8 = pc.phases(8, 8)
    lines = [f"paper: {pc.params / 1e9:.1f}B policy, {pc.prompts}x{pc.num_generations} completions of "
             f"{pc.completion_tokens} (max {pc.max_completion_tokens}) tokens after {pc.prompt_tokens}-token prompts = "
             f"{p8['gen_tokens'] / 1e6:.2f}M generated tokens; vLLM {pc.vllm_tok_s:.0f} tok/s per H100 "
             f"(LambdaLabsML/vllm-benchmark, Llama 3.1 8B, vLLM 0.6.0), lone-sequence ITL {pc.vllm_itl_s * 1e3:.1f} ms; "
             f"update {p8['flops']:.2e} FLOP (8P per token, beta > 0) at MFU {pc.mfu_at(8):.2f} of "
             f"{pc.peak_flops / 1e12:.0f} TFLOP/s; weights {p8['gb']:.1f} GB bf16 as one object"]
    lines.append(f"paper: {'rollout GPUs':>12} {'rollout':>8} {'score':>6} {'update':>7} {'sync':>6} "
                 f"{'step':>7} {'roll%':>6} {'upd%':>5} {'sync%':>6} {'overlap':>8} {'nccl_sync':>9}")
    for n in (4, 8, 16, 32):
        ph = pc.phases(n, 8)
        step = ph["rollout"] + ph["score_tail"] + ph["update"] + ph["sync"]
        over = max(ph["rollout"], ph["update"] + ph["sync"]) + ph["score_tail"]
        lines.append(f"paper: {n:>12} {ph['rollout']:>7.1f}s {ph['score_tail']:>5.2f}s {ph['update']:>6.1f}s "
                     f"{ph['sync']:>5.1f}s {step:>6.1f}s {100 * ph['rollout'] / step:>5.0f}% "
                     f"{100 * ph['update'] / step:>4.0f}% {100 * ph['sync'] / step:>5.0f}% {over:>7.1f}s "
                     f"{ph['nccl_sync']:>8.2f}s")
    for nt in (16, 32):
        ph = pc.phases(32, nt)
        step = ph["rollout"] + ph["score_tail"] + ph["update"] + ph["sync"]
        lines.append(f"paper: 32 rollout + {nt} trainer GPUs (MFU {pc.mfu_at(nt):.2f}): update {ph['update']:.1f}s, "
                     f"step {step:.1f}s (overlap {max(ph['rollout'], ph['update'] + ph['sync']) + ph['score_tail']:.1f}s)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--sync-model", default=None, help="also time the weight sync alone for this model (1 and 2 workers)")
    p.add_argument("--paper-only", action="store_true", help="print the GPU-cluster estimate on paper and exit")
    args = p.parse_args()
    if args.paper_only:
        print("\n".join(paper_estimate()))
        return
    sys.path.insert(0, str(HERE))
    from serve import cpu_line   # the CPU line shared by the benches

    from r1kit.train.ray_grpo import connect

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TOY_REWARDS), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(TOY_REWARDS))                  # the driver and (through connect) the workers
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
    for line in paper_estimate():                        # beside the CPU figures above
        print(line)
    m = results["1w"]
    print(f"measured here, 1 worker: rollout {100 * m['rollout_s'] / m['step_s']:.0f}% / update "
          f"{100 * m['update_s'] / m['step_s']:.0f}% / sync {100 * m['sync_s'] / m['step_s']:.0f}% of the step "
          "(a tiny random model on 2 shared cores: the shares say nothing of a GPU cluster)")
    print(f"step_s_1w={results['1w']['step_s']:.3f} step_s_2w={results['2w']['step_s']:.3f} "
          f"step_s_overlap={results['overlap']['step_s']:.3f} weight_sync_s={results['1w']['sync_s']:.4f}")


if __name__ == "__main__":
    main()
