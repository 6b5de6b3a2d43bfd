"""Chunked prefill in CPU seconds: the serving engine's steps under bench/serve.py's burst, timed per step.

bench/serve.py measures TTFT and ITL in wall seconds through HTTP, which on a shared machine are
mostly the share of the CPU the server got. This drives the engine's request API directly, in one
process, with one torch thread, and times every ``step()`` in this process's CPU seconds: 8
streams start, and after they have decoded ``--burst-after`` tokens the other 24 prompts arrive at
once (bench/serve.py's burst scenario: the GSM8K chat prompts, greedy, ``--max-tokens`` each, EOS
ignored). From the step times it derives, per engine:

* ITL: for each stream, the CPU seconds of the steps between two of its tokens (p50, p99, max);
* TTFT: the CPU seconds of the steps from a request's arrival to its first token (p50, p99);
* the whole scenario's CPU seconds and output tokens per CPU second.

``--before REV`` runs the engine as it was at git revision REV (bench/rollout.py's loader) beside
today's, alternating ``--reps`` times (before, now, before, now, ...), and prints the median of each
metric over the repetitions, so a scheduler change is measured before -> after in one run.

    PYTHONPATH=src python bench/serve_steps.py [--before REV] [--max-num-batched-tokens 512] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from rollout import chat_prompts, engine_class_at
from serve import cpu_line, pct
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1kit.models.embedded import embedded_model_dir
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine


def burst(engine, prompts: list[list[int]], early: int, burst_after: int, max_tokens: int) -> dict:
    """``early`` requests start; once they have ``burst_after`` tokens the rest arrive together.
    Returns the step CPU times and each request's arrival step and token steps."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    arrival, token_steps, step_s = {}, {i: [] for i in range(len(prompts))}, []
    for i in range(early):
        engine.add_request(i, prompts[i], params)
        arrival[i] = 0
    step = 0
    while engine.has_unfinished() or len(arrival) < len(prompts):
        if len(arrival) < len(prompts) and len(token_steps[0]) >= burst_after:
            for i in range(early, len(prompts)):
                engine.add_request(i, prompts[i], params)
                arrival[i] = step
        start = time.process_time()
        deltas = engine.step()
        step_s.append(time.process_time() - start)
        for d in deltas:
            token_steps[d.request_id].append(step)
        step += 1
    return {"step_s": step_s, "arrival": arrival, "token_steps": token_steps}


def metrics(run: dict) -> dict:
    """ITL and TTFT in CPU seconds (sums of step times), total CPU seconds, tokens per CPU second."""
    elapsed = [0.0]
    for s in run["step_s"]:
        elapsed.append(elapsed[-1] + s)  # elapsed[k] = CPU seconds before step k
    itl, ttft = [], []
    for rid, steps in run["token_steps"].items():
        ttft.append(elapsed[steps[0] + 1] - elapsed[run["arrival"][rid]])
        itl.extend(elapsed[b + 1] - elapsed[a + 1] for a, b in zip(steps, steps[1:]))
    tokens = sum(len(s) for s in run["token_steps"].values())
    return {"itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "itl_max": max(itl), "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "cpu_s": elapsed[-1], "tok_per_cpu_s": tokens / elapsed[-1],
            "steps": len(run["step_s"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="also run the engine at this git revision, alternating")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--burst-after", type=int, default=8, help="tokens the first quarter decodes before the burst")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompts = chat_prompts(tokenizer, args.clients)
    engines = ([(f"before={args.before}", engine_class_at(args.before))] if args.before else []) + [("now", Engine)]
    kwargs = dict(dtype=dtype, max_batch=args.clients, max_model_len=1024,
                  max_num_batched_tokens=args.max_num_batched_tokens)
    built = {name: cls(model, [], **kwargs) for name, cls in engines}
    print(f"clients={args.clients} early={args.clients // 4} burst_after_tokens={args.burst_after} "
          f"max_tokens={args.max_tokens} max_num_batched_tokens={args.max_num_batched_tokens} dtype={args.dtype} "
          f"threads=1 clock=cpu prompt_tokens={sum(map(len, prompts))} load_1min={os.getloadavg()[0]:.2f}")
    for engine in built.values():  # warm-up
        burst(engine, prompts[:4], 1, 2, 4)
    results = {name: [] for name in built}
    for _ in range(args.reps):
        for name, engine in built.items():
            results[name].append(metrics(burst(engine, prompts, args.clients // 4, args.burst_after, args.max_tokens)))
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name} itl_ms_p50={1000 * med['itl_p50']:.0f} itl_ms_p99={1000 * med['itl_p99']:.0f} "
              f"itl_ms_max={1000 * med['itl_max']:.0f} ttft_ms_p50={1000 * med['ttft_p50']:.0f} "
              f"ttft_ms_p99={1000 * med['ttft_p99']:.0f} cpu_s={med['cpu_s']:.1f} "
              f"tok_per_cpu_s={med['tok_per_cpu_s']:.1f} steps={med['steps']:.0f} (median of {len(runs)})")
    print(f"load_1min_after={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
