"""GRPO step time: r1kit's trainer against TRL's GRPOTrainer, same model, data, G, lengths and batch.

Both run in child processes of this script, one after the other, with the same thread count, on the
embedded SmolLM2-135M-Instruct, SVAMP train problems with the `direct` template, the same accuracy
reward (r1kit's math verifier), G completions per prompt, the same max completion length, learning
rate and loss (dapo, beta 0). Each reports the median wall time of its steps after a warm-up step.

    .venv/bin/python bench/grpo_step.py [--steps 4] [--generations 8] [--prompts 2] [--max-tokens 64] [--full-update]

Last line: ``ratio_vs_trl=<r1kit median step time / TRL median step time>`` (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def common_examples(n: int):
    from r1kit.data.loading import load_task

    return load_task("svamp", "train")[:n]


def run_r1kit(args) -> dict:
    import torch

    from r1kit.config import load_config
    from r1kit.models.loading import load_policy, resolve_bf16
    from r1kit.rewards.functions import build_reward_functions
    from r1kit.runtime import make_engine, make_render, make_verifier
    from r1kit.train.grpo import GRPOTrainer, RewardScorer

    torch.manual_seed(0)
    cfg = load_config(overrides=dict(
        task="svamp", template="direct", answer_extraction="any", reward_funcs=["accuracy"],
        num_generations=args.generations, prompts_per_step=args.prompts, max_completion_length=args.max_tokens,
        learning_rate=1e-6, loss_type="dapo", beta=0.0, micro_batch_size=args.generations * args.prompts,
        max_steps=args.steps + 1, bf16=args.bf16, rollout_backend=args.backend, output=args.out, save_steps=0,
        log_completions_steps=0, temperature=1.0, skip_zero_advantage=not args.full_update))
    policy, tok = load_policy("smollm2-135m-instruct")
    render, _ = make_render(cfg.template, tok)
    verifier = make_verifier("svamp", "any")
    rewards = build_reward_functions(cfg.reward_funcs, None, verifier)
    dtype = torch.bfloat16 if resolve_bf16(cfg.bf16) else torch.float32
    engine = make_engine(policy, tok, cfg.rollout_backend, dtype)
    trainer = GRPOTrainer(cfg, policy, tok, common_examples(64), render, RewardScorer(cfg, verifier, rewards),
                          engine, args.out)
    times, tokens, fwd = [], [], []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        m = trainer.train_step()
        times.append(time.perf_counter() - t)
        tokens.append(m["completions/mean_length"] * args.generations * args.prompts)
        fwd.append(m["forwarded_fraction"])
    return {"step_s": times[1:], "completion_tokens": tokens[1:], "forwarded_fraction": fwd[1:]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1kit.data.templates import get_template
    from r1kit.models.loading import load_policy, resolve_bf16
    from r1kit.runtime import make_verifier

    torch.manual_seed(0)
    policy, tok = load_policy("smollm2-135m-instruct")
    tok.padding_side = "left"
    instruction = get_template("direct").instruction
    exs = common_examples(64)
    by_prompt = {}
    rows = []
    for e in exs:
        content = f"{e.prompt.strip()}\n\n{instruction}"
        by_prompt[content] = e
        rows.append({"prompt": [{"role": "user", "content": content}]})
    verifier = make_verifier("svamp", "any")

    def accuracy(prompts, completions, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        ex = [by_prompt[p[-1]["content"]] for p in prompts]
        return [v.score for v in verifier.verify_batch(texts, ex)]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    bf16 = resolve_bf16(args.bf16)
    cfg = GRPOConfig(
        output_dir=args.out, num_generations=args.generations, per_device_train_batch_size=args.generations * args.prompts,
        gradient_accumulation_steps=1, max_completion_length=args.max_tokens, learning_rate=1e-6, beta=0.0,
        loss_type="dapo", max_steps=args.steps + 1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=bf16, temperature=1.0, seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[accuracy], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": times[1:], "completion_tokens": [x * args.generations * args.prompts for x in lengths[1:]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--bf16", default="auto")
    p.add_argument("--backend", default="auto", help="r1kit rollout backend: auto, engine or hf")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--full-update", action="store_true",
                   help="r1kit forwards every completion, zero-advantage ones included, as TRL does "
                        "(default: they are skipped, which leaves the update unchanged when beta = 0)")
    p.add_argument("--which", choices=["r1kit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/r1kit-bench-grpo")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.which:
        res = run_r1kit(args) if args.which == "r1kit" else run_trl(args)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for which in ("r1kit", "trl"):
        cmd = [sys.executable, __file__, "--which", which] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
        results[which] = json.loads(line[0][7:])
    for which, r in results.items():
        extra = (f" forwarded_fraction={statistics.mean(r['forwarded_fraction']):.2f}" if "forwarded_fraction" in r else "")
        print(f"{which}: median_step_s={statistics.median(r['step_s']):.2f} steps={r['step_s']} "
              f"mean_completion_tokens={statistics.mean(r['completion_tokens']):.0f}{extra}")
    ratio = statistics.median(results["r1kit"]["step_s"]) / statistics.median(results["trl"]["step_s"])
    print(f"ratio_vs_trl={ratio:.3f}")


if __name__ == "__main__":
    main()
