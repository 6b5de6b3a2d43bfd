"""Data-parallel SFT step time on 1 and N gloo processes, and the gradient all-reduce's share of it.

A random Llama (hidden 256, 4 layers, SmolLM2's 49k vocabulary: 15.7M parameters, a 63 MB fp32
gradient), a global batch of 8 examples of 128 tokens (micro-batches of 2), fp32, `data_parallel=ddp`:
each process forwards/backwards its 8/N examples, then `distributed.sum_gradients` all-reduces the
flat gradient. Step and all-reduce times are medians over the timed steps (one warm-up step), wall
seconds, one intra-op thread per process. On a 2-core CPU the N processes share the same cores, so
no speed-up is to be expected; the number is for the record (docs/SCALE.md has the scaling model).

Run: PYTHONPATH=src python bench/ddp.py [--nproc 2] [--steps 3]
  (last line: nproc=N step_s=... allreduce_s=... comm_share=...)
"""

import argparse
import datetime
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model_and_tokenizer():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from r1kit.models.embedded import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tok


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    from r1kit.config import SFTConfig, load_config
    from r1kit.data.sft_data import TokenizedExample
    from r1kit.train import distributed, sft

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=5))
    comm: list[float] = []
    reduce = distributed.sum_gradients

    def timed_reduce(params, env):
        t = time.perf_counter()
        reduce(params, env)
        comm.append(time.perf_counter() - t)

    sft.distributed.sum_gradients = timed_reduce
    model, tok = _model_and_tokenizer()
    g = torch.Generator().manual_seed(1)
    examples = [TokenizedExample(f"ex{i}", torch.randint(3, 40000, (32,), generator=g).tolist(),
                                 torch.randint(3, 40000, (96,), generator=g).tolist()) for i in range(64)]
    cfg = load_config(overrides=dict(bf16="false", output=str(Path(out) / "run"), per_device_train_batch_size=2,
                                     gradient_accumulation_steps=4, max_steps=steps + 1, learning_rate=1e-4,
                                     save_steps=0, plot=False), cls=SFTConfig)
    trainer = sft.SFTTrainer(cfg, model, tok, examples, Path(out) / "run")
    times = []
    for _ in range(steps + 1):
        distributed.barrier(trainer.dist)
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    if rank == 0:
        step_s, comm_s = statistics.median(times[1:]), (statistics.median(comm[1:]) if world > 1 else 0.0)
        Path(out, "result.txt").write_text(f"{step_s} {comm_s}")
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, steps: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, port, steps, out), nprocs=world, join=True, start_method="spawn")
        step_s, comm_s = map(float, Path(out, "result.txt").read_text().split())
    return step_s, comm_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    base, _ = measure(1, args.steps)
    print(f"nproc=1 step_s={base:.3f} allreduce_s=0.000 comm_share=0.00")
    step_s, comm_s = measure(args.nproc, args.steps)
    print(f"(same global batch of 8 examples; speed-up {base / step_s:.2f}x on this machine's shared cores)")
    print(f"nproc={args.nproc} step_s={step_s:.3f} allreduce_s={comm_s:.3f} comm_share={comm_s / step_s:.2f}")


if __name__ == "__main__":
    main()
