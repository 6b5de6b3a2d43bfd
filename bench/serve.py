"""Serving speed: ``r1kit serve`` on the embedded model under 1, 8 and 32 concurrent streaming clients.

Starts ``r1kit serve smollm2-135m-instruct`` on a free loopback port (or uses ``--url``), then for
each concurrency c sends ``--requests-per-client`` x c chat requests through the ``openai`` client,
c at a time, each a fixed GSM8K test question with ``max_tokens`` fixed and temperature 0 (the same
work every run; output tokens are counted from the server's usage, since a reply may end at EOS
first). Per concurrency it prints (SERVE_SPEC §7, ``vllm bench serve``'s metrics): completed /
failed requests, request throughput, output tokens/s, and p50 / p99 of TTFT (first token chunk,
reasoning or content), time to first answer token (first content chunk), TPOT ((latency - TTFT) /
(tokens - 1)) and ITL (gap between token chunks). The CPU's flags and load are printed first: on a
shared machine the numbers are the share of the CPU this run got; for our server the line also gives
the server process's CPU seconds over the level (``server_cpu_s``) and output tokens per such second,
which other jobs on the machine do not change as much. A last scenario per server
(``--burst-after``): at the largest concurrency a quarter of the clients stream first and the rest
arrive together seconds later; ``early_itl`` (the first quarter's inter-token gaps) shows how long
the burst's prefill stalls streams already running, what chunked prefill bounds.

Our server runs once per ``--max-num-batched-tokens`` value (default ``0 512``: whole-prompt prefill,
then chunked prefill, i.e. before -> after in one run). ``--before REV`` first runs, per value, the
server as it was at git revision REV (its ``src`` exported with ``git archive``), so a change to the
engine or server is measured before -> after in one run. Then, when ``llama-cpp-python[server]`` is
installed, llama.cpp's own server (``python -m llama_cpp.server``) on the model's GGUF written by
``r1kit export`` (``--gguf-dtype``, bf16 by default: the dtype our engine computes in on a CPU with
native bf16), with the same prompts and lengths. The last lines give per server
``batching_gain=<output tok/s at the largest c / at the smallest>`` (target >= 8 at 32) and ours
over llama.cpp's at the largest c (target >= 1).

    PYTHONPATH=src python bench/serve.py [--concurrency 1 8 32] [--max-tokens 128] [--llama-cpp auto|off|URL] [--before REV [--before-last]]
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


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                    burst_after: float = 0.0) -> dict:
    """``concurrency`` clients working through ``prompts``; with ``burst_after`` > 0 only the first
    quarter start at once and the rest join ``burst_after`` seconds later, all together (a burst of
    prompts arriving while streams decode); ``early_itl`` is then the first quarter's ITL."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    queue = list(prompts)
    results, failed, early_itl = [], 0, []
    early = max(1, concurrency // 4) if burst_after > 0 else concurrency

    async def worker(i: int):
        nonlocal failed
        if i >= early:
            await asyncio.sleep(burst_after)
        while queue:
            q = queue.pop(0)
            try:
                results.append(await one_request(client, model, q, max_tokens))
                if i < early:
                    early_itl.extend(results[-1]["itl"])
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                failed += 1
                print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    out_tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    return {"c": concurrency, "completed": len(results), "failed": failed, "wall_s": wall,
            "req_s": len(results) / wall, "out_tok_s": out_tokens / wall, "out_tokens": out_tokens,
            "ttft": [r["ttft"] for r in results], "ttfat": [r["ttfat"] for r in results if r["ttfat"] is not None],
            "tpot": [r["tpot"] for r in results if r["tpot"] is not None], "itl": itl, "early_itl": early_itl,
            "burst_after": burst_after}


def report(name: str, m: dict) -> str:
    ms = lambda v, q: f"{1000 * pct(v, q):.0f}"  # noqa: E731
    return (f"{name} c={m['c']} completed={m['completed']} failed={m['failed']} req_s={m['req_s']:.3f} "
            f"out_tok_s={m['out_tok_s']:.1f} out_tokens={m['out_tokens']} "
            f"ttft_ms_p50={ms(m['ttft'], 50)} ttft_ms_p99={ms(m['ttft'], 99)} "
            f"ttfat_ms_p50={ms(m['ttfat'], 50)} ttfat_ms_p99={ms(m['ttfat'], 99)} "
            f"tpot_ms_p50={ms(m['tpot'], 50)} tpot_ms_p99={ms(m['tpot'], 99)} "
            f"itl_ms_p50={ms(m['itl'], 50)} itl_ms_p99={ms(m['itl'], 99)}"
            + (f" server_cpu_s={m['server_cpu_s']:.1f} out_tok_per_server_cpu_s={m['out_tokens'] / m['server_cpu_s']:.1f}"
               if m.get("server_cpu_s") else "")
            + (f" burst_after_s={m['burst_after']:g} early_itl_ms_p99={ms(m['early_itl'], 99)} "
               f"early_itl_ms_max={ms(m['early_itl'], 100)}" if m["burst_after"] else ""))


def wait_for_line(proc: subprocess.Popen, pattern: str, what: str) -> str:
    """Echo ``proc``'s output until a line matches ``pattern``; returns the match's group 1. The rest
    of its output is drained by a thread (a full pipe would block the server)."""
    import threading

    for line in proc.stdout:
        print("  " + line.rstrip())
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return m.group(1)
    raise SystemExit(f"{what} did not start (exit {proc.wait()})")


def start_server(args, max_num_batched_tokens: int, src: Path = ROOT / "src") -> tuple[subprocess.Popen, str]:
    """``r1kit serve`` from the package in ``src`` on a free port; returns (process, its /v1 base)."""
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "r1kit.cli", "serve", args.model, "--port", "0", "--max-num-seqs",
           str(max(args.concurrency)), "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
           "--max-num-batched-tokens", str(max_num_batched_tokens)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, wait_for_line(proc, r"on (http://127\.0\.0\.1:\d+/v1)", "the r1kit server")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_cpp(args, workdir: Path) -> tuple[subprocess.Popen, str]:
    """Export the model as GGUF (``--gguf-dtype``, our exporter) and start llama-cpp-python's server
    on it with every core; returns (process, its /v1 base)."""
    gguf = workdir / f"model-{args.gguf_dtype}.gguf"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([sys.executable, "-m", "r1kit.cli", "export", args.model, "--format", "gguf", "--dtype",
                    args.gguf_dtype, "--output", str(gguf)], env=env, check=True)
    port, cores = free_port(), str(args.llama_cpp_threads or os.cpu_count())
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "default", "--host",
           "127.0.0.1", "--port", str(port), "--n_ctx", str(args.max_model_len), "--n_threads", cores,
           "--n_threads_batch", cores, "--interrupt_requests", "False"]  # by default a new request cancels the running one
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_line(proc, r"(Uvicorn running on)", "llama-cpp-python's server")
    return proc, f"http://127.0.0.1:{port}/v1"


def export_src(rev: str, workdir: Path) -> Path:
    """The package source as it was at git revision ``rev``, exported under ``workdir``; returns its src."""
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    return workdir / "src"


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), None without one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int | None, fn) -> dict:
    """``fn()``'s level metrics with the server's CPU seconds over it (``server_cpu_s``) when its pid is known."""
    before = cpu_seconds(pid)
    m = fn()
    after = cpu_seconds(pid)
    m["server_cpu_s"] = None if before is None or after is None else after - before
    return m


def run_levels(name: str, url: str, model: str | None, args, burst: bool = True, pid: int | None = None) -> list[dict]:
    """Warm up, then every concurrency level against one server (and the burst scenario when
    ``burst``); prints one line per level, with the server process's CPU seconds when ``pid`` is given."""
    import openai

    model = model or openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
    asyncio.run(run_level(url, model, questions(1), 1, 4))  # warm-up
    levels = []
    for c in args.concurrency:
        prompts = questions(max(args.min_requests, c * args.requests_per_client))
        levels.append(measured(pid, lambda: asyncio.run(run_level(url, model, prompts, c, args.max_tokens))))
        print(report(name, levels[-1]), flush=True)
    if burst and args.burst_after > 0:
        c = max(args.concurrency)
        burst = measured(pid, lambda: asyncio.run(run_level(url, model, questions(c), c, args.max_tokens,
                                                               args.burst_after)))
        print(report(name + " burst", burst), flush=True)
    return levels


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    import importlib.util
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--url", default=None, help="an r1kit server already running (its /v1 base)")
    ap.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[0, 512],
                    help="start our server once per value (0 = whole prompts, N = chunked prefill of N tokens/step)")
    ap.add_argument("--llama-cpp", default="auto",
                    help="auto: llama-cpp-python's server on the model's GGUF when llama_cpp is installed; off; "
                         "or the /v1 base of a llama.cpp server already running on the same model")
    ap.add_argument("--gguf-dtype", default="bf16", help="the GGUF llama.cpp serves (f16, bf16, q8_0)")
    ap.add_argument("--llama-cpp-threads", type=int, default=0,
                    help="llama.cpp's threads (0 = every core; on a loaded machine its spinning thread pool "
                         "stalls: 1 may be the fair setting)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=2, help="requests per client at each concurrency")
    ap.add_argument("--min-requests", type=int, default=3, help="requests at least per concurrency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--burst-after", type=float, default=4.0,
                    help="then, at the largest concurrency, a quarter of the clients start and the rest join "
                         "this many seconds later (0 = skip): early_itl shows how long the burst stalls their streams")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--before", default=None, help="also run the server as it was at this git revision, first")
    ap.add_argument("--before-last", action="store_true", help="run the --before server after ours instead")
    args = ap.parse_args()
    print(cpu_line(), f"uptime_load={' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results: dict[str, list[dict]] = {}
    if args.url:
        results["r1kit"] = run_levels("r1kit", args.url, None, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            sources = [("r1kit", ROOT / "src")]
            if args.before:
                old = (f"r1kit@{args.before}", export_src(args.before, Path(tmp)))
                sources = sources + [old] if args.before_last else [old] + sources
            for label, src in sources:
                for budget in args.max_num_batched_tokens:
                    name = f"{label}[max_num_batched_tokens={budget or 'whole'}]"
                    proc, url = start_server(args, budget, src)
                    try:
                        results[name] = run_levels(name, url, args.model, args, pid=proc.pid)
                    finally:
                        stop(proc)
    if args.llama_cpp != "off":
        if args.llama_cpp.startswith("http"):
            results["llama.cpp"] = run_levels("llama.cpp", args.llama_cpp, "default", args, burst=False)
        elif importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]'); skipped")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                proc, url = start_llama_cpp(args, Path(tmp))
                try:
                    # llama-cpp-python's server runs one request at a time: the burst scenario tells nothing
                    results[f"llama.cpp[{args.gguf_dtype}]"] = run_levels(f"llama.cpp[{args.gguf_dtype}]", url,
                                                                          "default", args, burst=False)
                finally:
                    stop(proc)
    print(f"load_1min_after={os.getloadavg()[0]:.2f} (a shared machine: numbers are this run's share of the CPU)")
    for name, levels in results.items():
        print(f"{name} batching_gain={levels[-1]['out_tok_s'] / levels[0]['out_tok_s']:.2f} "
              f"(out tok/s at c={levels[-1]['c']} / at c={levels[0]['c']})")
    theirs = next((v for k, v in results.items() if k.startswith("llama.cpp")), None)
    if theirs:
        for name, levels in results.items():
            if not name.startswith("llama.cpp"):
                print(f"{name} vs_llama_cpp_at_c={levels[-1]['c']}: "
                      f"{levels[-1]['out_tok_s'] / theirs[-1]['out_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
