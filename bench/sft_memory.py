"""Resident memory of SFT steps over a run: flat with the fix, growing without it.

The embedded SmolLM2-135M on GSM8K worked solutions (variable lengths, ~150-500 tokens), bf16
autocast where the CPU has it, AdamW, one intra-op thread. Each variant runs in a fresh process
(oneDNN's caches and the heap start empty) for ``--steps`` steps at ``--batch`` examples and prints
``rss_mb`` (VmRSS after the step, as in metrics.jsonl) per step:

  before  pad_to_multiple_of=1 and no ``release_free_memory`` (the code before the fix);
  after   the defaults (pad_to_multiple_of=32, freed heap released after each step).

Growth = RSS at the last step − RSS at step 3 (steps 1-2 allocate AdamW state and warm up), MiB.

Measured (2-core AVX512-BF16 CPU shared with other jobs, torch 2.13, --steps 30 --batch 1): before
3008 MiB at step 3 → 3620 at step 30 (+612, still rising); after 2460 → 2533 (+74, flat from step 20
on, when every length bucket has been seen).

Run: PYTHONPATH=src python bench/sft_memory.py [--steps 30] [--batch 1] [--variants before,after]
  (last line: before_growth_mb=... after_growth_mb=... before_peak_mb=... after_peak_mb=...)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from typing import Any, Callable


def run_variant(variant: str, steps: int, batch: int, examples: int) -> list[float]:
    import torch

    from r1kit.config import SFTConfig, load_config
    from r1kit.data.sft_data import load_sft_rows, tokenize_rows
    from r1kit.models.loading import load_policy
    from r1kit.runtime import make_render
    from r1kit.train import loop, sft

    torch.set_num_threads(1)
    over = dict(max_steps=steps, per_device_train_batch_size=batch, num_threads=1, save_steps=0, plot=False,
                eval_limit=0, max_train_cpu_seconds=None)
    if variant == "before":
        over["pad_to_multiple_of"] = 1
        loop.release_free_memory = lambda: None

    def make(out: str):
        cfg = load_config("cpu_sft_demo", overrides={**over, "output": out}, cls=SFTConfig)
        torch.manual_seed(cfg.seed)
        policy, tok = load_policy(cfg.model, dtype=torch.float32)
        _, template = make_render(cfg.template, tok)
        rows = load_sft_rows(cfg.data, cfg.data_split, limit=examples)
        exs, _ = tokenize_rows(rows, tok, template, cfg.max_length, cfg.overlong)
        return sft.SFTTrainer(cfg, policy, tok, exs, out)

    return rss_curve(make)


def rss_curve(make_trainer: Callable[[str], Any]) -> list[float]:
    """``rss_mb`` per step of the ``TrainLoop`` that ``make_trainer(output dir)`` builds, trained in a
    temporary directory removed after. Its final checkpoint is not written (1.6 GB for the 135M model
    and AdamW; the bench measures memory, and the save comes after the last step's ``rss_mb``)."""
    with tempfile.TemporaryDirectory(prefix="memory_bench_") as out:
        trainer = make_trainer(out)
        trainer.save = lambda: None
        return [m["rss_mb"] for m in trainer.train(progress=False)]


def compare(script: str, run: Callable[[str, argparse.Namespace], list[float]], steps: int = 30, batch: int = 1,
            extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """The command line of a memory bench (this one, ``grpo_memory.py``): each of ``--variants`` of
    ``script`` in a fresh process (``run(variant, args)`` there returns its per-step ``rss_mb``), the
    CPU flags line, each variant's curve, and the last line ``<variant>_growth_mb=... <variant>_peak_mb=...``
    (growth: the last step's RSS − step 3's, MiB)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--variants", default="before,after")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    if extra:
        extra(ap)
    a, argv = ap.parse_args(), sys.argv[1:]
    if a.variant:
        print(json.dumps(run(a.variant, a)))
        return
    import torch

    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
    print(f"cpu: avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags} "
          f"torch {torch.__version__} steps={a.steps} batch={a.batch}")
    out = {}
    for v in a.variants.split(","):
        res = subprocess.run([sys.executable, script, *argv, "--variant", v], capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{v} failed:\n{res.stderr[-2000:]}")
        rss = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{v}: rss_mb per step " + " ".join(f"{r:.0f}" for r in rss), flush=True)
        out[f"{v}_growth_mb"] = rss[-1] - rss[min(2, len(rss) - 1)]
        out[f"{v}_peak_mb"] = max(rss)
    print(" ".join(f"{k}={v:.0f}" for k, v in out.items()))


if __name__ == "__main__":
    compare(__file__, lambda v, a: run_variant(v, a.steps, a.batch, a.examples),
            extra=lambda ap: ap.add_argument("--examples", type=int, default=400))
