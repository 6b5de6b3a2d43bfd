"""MTP self-speculative decoding on a tiny V3 pretrained from scratch: acceptance rate and main-model
forward passes, against plain greedy decoding (the anchor) on the same prompts.

A micro V3 MoE (2 layers, 8 experts, 1 MTP module) is pretrained on generated arithmetic for
--seconds, then both decoders answer the same held-out prompts. Speculative tokens must equal the
greedy ones exactly (checked here); each accepted draft saves one main-model forward.

Run: PYTHONPATH=src python bench/mtp_speculative.py --seconds 60     (last line: mtp_acceptance_rate=<rate>)
"""

import argparse
import random
import time

import torch

from r1kit.models.v3_decode import generate, mtp_speculative_generate
from r1kit.data.arithmetic import random_problem
from r1kit.models.v3_pretrain import PretrainConfig, char_tokenizer, pretrain

MICRO = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2, q_lora_rank=64,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = PretrainConfig(steps=100_000, max_seconds=args.seconds, batch_size=32, lr=3e-3,
                         bias_update_speed=0.01, overrides=MICRO)
    model, history = pretrain(cfg)
    print(f"pretrained steps={history['steps']} final_lm_loss={history['lm'][-1]:.3f} final_mtp_loss={history['mtp'][-1]:.3f}")
    tok, rng = char_tokenizer(), random.Random(7)
    eos = tok.eos_token_id
    drafted = accepted = produced = 0
    plain_seconds = spec_seconds = 0.0
    for _ in range(args.prompts):
        prompt = tok(random_problem(rng, split="test")[0]).input_ids
        start = time.perf_counter()
        plain = generate(model, torch.tensor([prompt]), 8, eos_token_id=eos)[0, len(prompt):].tolist()
        plain_seconds += time.perf_counter() - start
        start = time.perf_counter()
        result = mtp_speculative_generate(model, prompt, 8, eos_token_id=eos)
        spec_seconds += time.perf_counter() - start
        plain = plain[: plain.index(eos) + 1] if eos in plain else plain
        if result.tokens != plain:
            raise SystemExit(f"speculative tokens {result.tokens} differ from greedy {plain}")
        drafted, accepted, produced = drafted + result.drafted, accepted + result.accepted, produced + len(plain)
    print(f"tokens={produced} greedy_main_forwards={produced} speculative_main_forwards={drafted + args.prompts}")
    print(f"greedy_seconds={plain_seconds:.2f} speculative_seconds={spec_seconds:.2f}")
    print(f"mtp_acceptance_rate={accepted / max(drafted, 1):.3f}")


if __name__ == "__main__":
    main()
