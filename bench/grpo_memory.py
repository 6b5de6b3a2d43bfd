"""Resident memory of GRPO steps over a run, with and without rounded micro-batch lengths.

The embedded SmolLM2-135M on GSM8K train problems (``cpu_demo_gsm8k``: chat_boxed prompts of varied
length, completions up to 128 tokens), bf16 autocast and rollout where the CPU has it, one intra-op
thread, ``--batch`` prompts × 4 completions per step, every completion forwarded and backpropagated
(``skip_zero_advantage`` off: the 135M model solves few GSM8K problems, so most groups have zero
advantage and would skip the update). Each variant runs in a fresh process (``sft_memory.compare``):

  before  pad_to_multiple_of=1 (the code before GRPO rounded its lengths);
  after   the default pad_to_multiple_of=32.

Both release the freed heap after each step (``loop.release_free_memory``, shared with SFT).
Growth = RSS at the last step − RSS at step 3, MiB.

Measured (2-core AVX512-BF16 CPU shared with other jobs, torch 2.13, --steps 20 --batch 1, ~6 min CPU
per variant): before 3073 MiB at step 3 → 3343 at step 20 (+270, ~16 MiB a step, still rising); after
3057 → 3171 (+114, ~7 MiB a step, still rising). Then the rollout engine's prefill matmuls got
rounded row counts too (``rollout.engine.padded_rows``), and ``--variants after`` measured 3061 at
step 3 → 3101 at step 20 (+41), flat over the last five steps (one run, load 1-4).

Run: PYTHONPATH=src python bench/grpo_memory.py [--steps 20] [--batch 1] [--variants before,after]
  (last line: before_growth_mb=... before_peak_mb=... after_growth_mb=... after_peak_mb=...)
"""

from pathlib import Path

from sft_memory import compare, rss_curve  # bench/ is this script's directory


def run_variant(variant: str, steps: int, batch: int) -> list[float]:
    import torch

    from r1kit.config import load_config
    from r1kit.data.loading import load_task
    from r1kit.train.recipe import make_grpo_trainer

    torch.set_num_threads(1)
    over = dict(max_steps=steps, prompts_per_step=batch, num_generations=4, micro_batch_size=4 * batch,
                num_threads=1, save_steps=0, log_completions_steps=0, plot=False, eval_limit=0,
                max_train_minutes=None, max_train_cpu_seconds=None, skip_zero_advantage=False)
    if variant == "before":
        over["pad_to_multiple_of"] = 1

    def make(out: str):
        cfg = load_config("cpu_demo_gsm8k", overrides={**over, "output": out})
        torch.manual_seed(cfg.seed)
        return make_grpo_trainer(cfg, load_task(cfg.task, cfg.train_split)[:400], Path(out))

    return rss_curve(make)


if __name__ == "__main__":
    compare(__file__, lambda v, a: run_variant(v, a.steps, a.batch), steps=20, batch=1)
