"""Pretrain a tiny DeepSeek-V3 MoE from scratch on generated arithmetic, on the CPU.

The first half of "R1-Zero in miniature": a character-level corpus of sums and differences
(``"37+48=85"``), next-token + λ·MTP + α·balance loss, the aux-loss-free router-bias update after
every optimizer step, and a log of the loss curve and per-layer expert load. The result is a
checkpoint (HF layout, ``r1kit.models.v3_io``) and ``history.json``; greedy accuracy on held-out
problems is the starting reward for GRPO.

Run: PYTHONPATH=src python -m r1kit.models.v3_pretrain --out runs/v3-tiny --max-seconds 600 --threads 1
(last line: ``final_lm_loss=<value>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1kit.errors import ConfigError
from r1kit.models.deepseek_v3 import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    pretrain_loss,
    update_router_bias,
)
from r1kit.models.v3_decode import generate
from r1kit.models.v3_io import save_deepseek_v3


class CharTokenizer:
    """Characters of arithmetic text; ids 0/1/2 are bos/eos/pad (V3's bos 0, eos 1)."""

    specials = ("<bos>", "<eos>", "<pad>")
    chars = "0123456789+-=*() \n"
    bos, eos, pad = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.specials) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        """bos + one id per character. Raises ConfigError naming an unknown character."""
        unknown = set(text) - set(self.chars)
        if unknown:
            raise ConfigError(f"characters {sorted(unknown)} are not in the arithmetic alphabet {self.chars!r}")
        return [self.bos] + [len(self.specials) + self.chars.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        """Characters of the non-special ids, stopping at eos."""
        out = []
        for i in ids:
            if i == self.eos:
                break
            if i >= len(self.specials):
                out.append(self.chars[i - len(self.specials)])
        return "".join(out)


def arithmetic_problem(rng: random.Random, max_operand: int) -> tuple[str, str]:
    """A random ``a+b=`` or ``a-b=`` prompt and its answer (a, b in [0, max_operand])."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if rng.random() < 0.5:
        return f"{a}+{b}=", str(a + b)
    return f"{a}-{b}=", str(a - b)


def training_batch(
    tok: CharTokenizer, rng: random.Random, batch_size: int, max_operand: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size problems with answers, right-padded: input_ids, attention_mask (b, s)."""
    rows = []
    for _ in range(batch_size):
        prompt, answer = arithmetic_problem(rng, max_operand)
        rows.append(tok.encode(prompt + answer) + [tok.eos])
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), tok.pad)
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@dataclass
class PretrainConfig:
    """What ``pretrain`` runs."""

    preset: str = "tiny-10m"  # model shape (models/presets); vocab_size is set to the tokenizer's
    steps: int = 2000  # optimizer steps at most
    max_seconds: float = 600.0  # wall-clock budget; training stops at whichever comes first
    batch_size: int = 32  # problems per step
    max_operand: int = 99  # operands in [0, max_operand]
    lr: float = 3e-3  # AdamW peak learning rate, linear warm-up over warmup_steps
    warmup_steps: int = 20
    bias_update_speed: float = 0.001  # γ of the router-bias update (V3 report §4.2)
    seed: int = 0
    overrides: dict = dataclasses.field(default_factory=dict)  # DeepseekV3Config fields to change


def build_model(cfg: PretrainConfig, tok: CharTokenizer) -> DeepseekV3ForCausalLM:
    """The preset with the tokenizer's vocabulary, bos/eos and ``overrides``, seeded."""
    fields = {**dataclasses.asdict(DeepseekV3Config.preset(cfg.preset)), **cfg.overrides}
    fields.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos, eos_token_id=tok.eos,
                  bias_update_speed=cfg.bias_update_speed)
    torch.manual_seed(cfg.seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**fields))


def pretrain(cfg: PretrainConfig) -> tuple[DeepseekV3ForCausalLM, dict]:
    """Train from scratch; returns the model (eval mode) and the history: per step ``loss``, ``lm``,
    ``mtp``, ``balance`` and ``max_over_mean`` (worst MoE layer), plus ``steps``, ``seconds``, ``tokens``."""
    tok = CharTokenizer()
    model = build_model(cfg, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps))
    rng = random.Random(cfg.seed)
    history = {key: [] for key in ("loss", "lm", "mtp", "balance", "max_over_mean")}
    start, tokens = time.monotonic(), 0
    for _ in range(cfg.steps):
        ids, mask = training_batch(tok, rng, cfg.batch_size, cfg.max_operand)
        parts = pretrain_loss(model, model(ids, attention_mask=mask), ids, mask)
        parts["loss"].backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        loads = update_router_bias(model)
        for key in ("loss", "lm", "mtp", "balance"):
            history[key].append(parts[key].item())
        history["max_over_mean"].append(max((v for k, v in loads.items() if k.endswith("max_over_mean")), default=1.0))
        tokens += int(mask.sum())
        if time.monotonic() - start > cfg.max_seconds:
            break
    history.update(steps=len(history["loss"]), seconds=time.monotonic() - start, tokens=tokens)
    return model.eval(), history


def arithmetic_accuracy(model: DeepseekV3ForCausalLM, n: int = 64, max_operand: int = 99, seed: int = 1) -> float:
    """Fraction of ``n`` held-out problems whose greedy completion (up to eos) is the exact answer."""
    tok, rng = CharTokenizer(), random.Random(seed)
    problems = [arithmetic_problem(rng, max_operand) for _ in range(n)]
    prompts = [tok.encode(p) for p, _ in problems]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=tok.eos, pad_token_id=tok.pad)
    answers = [tok.decode(row[width:].tolist()) for row in out]
    return sum(a == gold for a, (_, gold) in zip(answers, problems)) / n


def main(argv: list[str] | None = None) -> None:
    """Command line: pretrain, save the checkpoint and history.json under --out, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default=PretrainConfig.preset)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--max-seconds", type=float, default=PretrainConfig.max_seconds)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (1 is fastest on a busy 2-core machine; default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(preset=args.preset, steps=args.steps, max_seconds=args.max_seconds,
                         batch_size=args.batch_size, seed=args.seed)
    model, history = pretrain(cfg)
    history["accuracy"] = arithmetic_accuracy(model)
    save_deepseek_v3(model, args.out)
    (args.out / "history.json").write_text(json.dumps(history))
    every = max(1, history["steps"] // 10)
    for step in range(0, history["steps"], every):
        print(f"step={step} lm={history['lm'][step]:.3f} mtp={history['mtp'][step]:.3f} "
              f"max_over_mean={history['max_over_mean'][step]:.2f}")
    print(f"steps={history['steps']} seconds={history['seconds']:.0f} tokens_per_s={history['tokens'] / history['seconds']:.0f}")
    print(f"greedy_accuracy={history['accuracy']:.3f}")
    print(f"final_lm_loss={history['lm'][-1]:.4f}")


if __name__ == "__main__":
    main()
