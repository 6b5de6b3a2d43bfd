"""How rollout time grows with completion length and with the group size G (r1kit's engine,
embedded model, chat-templated GSM8K prompts, EOS ignored so every completion has exactly the
requested length).

Prints one table row per setting, then last ``len_doubling_time_ratio=<mean time(2L) / time(L)>``
(2.0 = linear in length; below 2 means fixed costs such as prefill are being amortized).

    PYTHONPATH=src python bench/rollout_scaling.py [--prompts 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from rollout import chat_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1kit.models.embedded import embedded_model_dir
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine


def timed(engine: Engine, prompts: list[list[int]], group: int, new_tokens: int) -> float:
    """Seconds for one ``generate`` of ``group`` completions of ``new_tokens`` tokens per prompt."""
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, n=group, seed=0)
    start = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per generate call (B)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128], help="completion lengths at G=8")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 16], help="group sizes at length 64")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(model, [], dtype="auto", max_batch=64)
    prompts = chat_prompts(tokenizer, args.prompts)
    timed(engine, prompts, 1, 2)  # warm-up
    print(f"engine dtype={engine.dtype} threads={args.threads} B={args.prompts} prompt_tokens={[len(p) for p in prompts]}")
    print(f"{'G':>3} {'new_tokens':>10} {'sequences':>9} {'seconds':>8} {'tok/s':>7} {'ms/step':>8}")
    rows = [(8, n) for n in args.lengths] + [(g, 64) for g in args.groups if g != 8 or 64 not in args.lengths]
    seconds = {}
    for group, new_tokens in rows:
        seconds[group, new_tokens] = t = timed(engine, prompts, group, new_tokens)
        sequences = args.prompts * group
        print(f"{group:>3} {new_tokens:>10} {sequences:>9} {t:>8.2f} {sequences * new_tokens / t:>7.1f} {1e3 * t / new_tokens:>8.1f}")
    lengths = sorted(args.lengths)
    doublings = [seconds[8, 2 * n] / seconds[8, n] for n in lengths if 2 * n in lengths]
    print(f"len_doubling_time_ratio={sum(doublings) / len(doublings):.2f}")


if __name__ == "__main__":
    main()
