"""Loading GSM8K train with validated golds, against parsing every gold with math-verify.

Anchor (same run): ``math_verify.parse`` on each of the 7,473 golds, which is what validating
golds costs without r1kit's plain-number fast path. Also reports MathVerifier throughput on
boxed numeric completions (what the accuracy reward costs per GRPO step).

    PYTHONPATH=src python bench/gold_parsing.py

Last line: ``gsm8k_load_speedup=<anchor time / load_task time>``.
"""

import time

from math_verify import parse

from r1kit.data.loading import load_task
from r1kit.rewards.math import MathVerifier


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    load_s = seconds(lambda: load_task("gsm8k", "train"))
    examples = load_task("gsm8k", "train")
    anchor_s = seconds(lambda: [parse(f"${ex.gold}$", parsing_timeout=None) for ex in examples])
    verifier = MathVerifier()
    batch = examples[:500]
    completions = [f"<think>...</think> \\boxed{{{ex.gold}}}" for ex in batch]
    verify_s = seconds(lambda: verifier.verify_batch(completions, batch))
    print(f"load_task_gsm8k_train_s={load_s:.3f}")
    print(f"mathverify_parse_all_golds_s={anchor_s:.3f}")
    print(f"verify_per_s={len(batch) / verify_s:.0f}")
    print(f"gsm8k_load_speedup={anchor_s / load_s:.1f}")


if __name__ == "__main__":
    main()
