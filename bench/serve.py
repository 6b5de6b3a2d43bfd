"""Serving speed: ``r1kit serve`` on the embedded model under 1, 8 and 32 concurrent streaming clients.

Starts ``r1kit serve smollm2-135m-instruct`` on a free loopback port (or uses ``--url``), then for
each concurrency c sends ``--requests-per-client`` x c chat requests through the ``openai`` client,
c at a time, each a fixed GSM8K test question with ``max_tokens`` fixed and temperature 0 (the same
work every run; output tokens are counted from the server's usage, since a reply may end at EOS
first). Per concurrency it prints (SERVE_SPEC §7, ``vllm bench serve``'s metrics): completed /
failed requests, request throughput, output tokens/s, and p50 / p99 of TTFT (first token chunk,
reasoning or content), time to first answer token (first content chunk), TPOT ((latency - TTFT) /
(tokens - 1)) and ITL (gap between token chunks). The CPU's flags and load are printed first: on a
shared machine the numbers are the share of the CPU this run got.

The last line is ``batching_gain=<output tok/s at the largest c / at c=1>`` (target >= 8 at 32).
llama.cpp's server is compared when ``--llama-cpp-url`` points at one serving the same model
(``python -m llama_cpp.server --model <gguf>``), with the same prompts and lengths.

    PYTHONPATH=src python bench/serve.py [--concurrency 1 8 32] [--max-tokens 128] [--url http://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "data" / "gsm8k" / "test.jsonl"


def cpu_line() -> str:
    """CPU model, cores, the SIMD flags that decide matmul speed, and the 1-minute load."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if "flags" in info else set()
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"]
    return (f"cpu={name.group(1).strip() if name else '?'!r} cores={os.cpu_count()} "
            f"flags={','.join(f for f in wanted if f in flags)} load_1min={os.getloadavg()[0]:.2f}")


def questions(count: int) -> list[str]:
    with open(GSM8K) as f:
        return [json.loads(line)["question"] for _, line in zip(range(count), f)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one_request(client, model: str, question: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = first_answer = None
    chunk_times, tokens = [], None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            text = (c.delta.content or "") + (extra.get("reasoning_content") or "")
            if text:
                chunk_times.append(now)
                first = first or now
            if c.delta.content and first_answer is None:
                first_answer = now
    end = time.perf_counter()
    tokens = tokens if tokens is not None else len(chunk_times)
    return {"ttft": (first or end) - start, "ttfat": (first_answer - start) if first_answer else None,
            "latency": end - start, "tokens": tokens,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
            "tpot": ((end - (first or end)) / (tokens - 1)) if tokens > 1 else None}


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    queue = list(prompts)
    results, failed = [], 0

    async def worker():
        nonlocal failed
        while queue:
            q = queue.pop(0)
            try:
                results.append(await one_request(client, model, q, max_tokens))
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                failed += 1
                print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    out_tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    return {"c": concurrency, "completed": len(results), "failed": failed, "wall_s": wall,
            "req_s": len(results) / wall, "out_tok_s": out_tokens / wall, "out_tokens": out_tokens,
            "ttft": [r["ttft"] for r in results], "ttfat": [r["ttfat"] for r in results if r["ttfat"] is not None],
            "tpot": [r["tpot"] for r in results if r["tpot"] is not None], "itl": itl}


def report(name: str, m: dict) -> str:
    ms = lambda v, q: f"{1000 * pct(v, q):.0f}"  # noqa: E731
    return (f"{name} c={m['c']} completed={m['completed']} failed={m['failed']} req_s={m['req_s']:.3f} "
            f"out_tok_s={m['out_tok_s']:.1f} out_tokens={m['out_tokens']} "
            f"ttft_ms_p50={ms(m['ttft'], 50)} ttft_ms_p99={ms(m['ttft'], 99)} "
            f"ttfat_ms_p50={ms(m['ttfat'], 50)} ttfat_ms_p99={ms(m['ttfat'], 99)} "
            f"tpot_ms_p50={ms(m['tpot'], 50)} tpot_ms_p99={ms(m['tpot'], 99)} "
            f"itl_ms_p50={ms(m['itl'], 50)} itl_ms_p99={ms(m['itl'], 99)}")


def start_server(args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "r1kit.cli", "serve", args.model, "--port", "0", "--max-num-seqs",
           str(max(args.concurrency)), "--max-model-len", str(args.max_model_len), "--dtype", args.dtype]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print("  " + line.rstrip())
        m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--url", default=None, help="an r1kit server already running (its /v1 base)")
    ap.add_argument("--llama-cpp-url", default=None, help="a llama.cpp server on the same model (its /v1 base)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=1, help="requests per client at each concurrency")
    ap.add_argument("--min-requests", type=int, default=3, help="requests at least per concurrency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    print(cpu_line())
    proc, url = (None, args.url) if args.url else start_server(args)
    model = args.model if not args.url else None
    try:
        import openai

        model = model or openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
        asyncio.run(run_level(url, model, questions(1), 1, 4))  # warm-up
        levels = []
        for c in args.concurrency:
            prompts = questions(max(args.min_requests, c * args.requests_per_client))
            m = asyncio.run(run_level(url, model, prompts, c, args.max_tokens))
            print(report("r1kit", m), flush=True)
            levels.append(m)
            if args.llama_cpp_url:
                print(report("llama.cpp", asyncio.run(run_level(args.llama_cpp_url, "default", prompts, c,
                                                                  args.max_tokens))), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"load_1min_after={os.getloadavg()[0]:.2f} (a shared machine: numbers are this run's share of the CPU)")
    print(f"batching_gain={levels[-1]['out_tok_s'] / levels[0]['out_tok_s']:.2f}")


if __name__ == "__main__":
    main()
