"""r1kit's one native kernel: decode attention that reads each slot's own positions only.

The engine's torch decode attention (two batched matmuls over the cache block) reads every slot's
cache up to the longest slot's length and runs (G x d)(d x T) products that oneDNN/MKL do not
batch well; at batch 64 it took a quarter of a bf16 decode step on two threads. ``decode_attention.c``
(beside this file) does the same arithmetic, with the same bf16 roundings, in one OpenMP loop over
(slot, KV head), each item reading only that slot's visible positions.

The C file is compiled on first use with the system C compiler (``$CC`` or ``cc``: ``-O3
-march=native -fopenmp``) into ``~/.cache/r1kit/kernels`` (``$R1KIT_KERNEL_DIR``), named by a hash
of the source, the flags, the compiler's version and the CPU's flags, written atomically and loaded
with ``ctypes`` (which releases the GIL during the call). Its OpenMP runtime is torch's own
(``libgomp.so.1`` is already loaded, the dynamic linker reuses it by soname), and it runs on
``torch.get_num_threads()`` threads. The engine uses it where it was compiled with AVX-512 (its
portable C loops, for other CPUs, are tested but slower than torch's matmuls). Without a compiler,
without AVX-512, or with ``R1KIT_NATIVE=0``, ``kernel()`` is None and the engine keeps its torch
path; ``status()`` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LANES = 16  # the C kernel needs head_dim % LANES == 0


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _kernel_dir() -> Path:
    return Path(os.environ.get("R1KIT_KERNEL_DIR") or Path.home() / ".cache" / "r1kit" / "kernels")


def _build(extra_flags: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    """Compile (once per source, flags, compiler and CPU) and load the kernel; (library, status).
    ``extra_flags`` go after ``FLAGS`` (the tests build the portable loops with ``-mno-avx512f``)."""
    if os.environ.get("R1KIT_NATIVE", "1") == "0":
        return None, "off (R1KIT_NATIVE=0)"
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"off (no C compiler {cc!r}: {e})"
    source = SOURCE.read_text()
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([source, " ".join(flags), version, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"decode_attention-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                run = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                     text=True, timeout=300)
                if run.returncode:
                    tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                    return None, f"off ({cc} failed: {tail})"
                os.replace(built, target)  # atomic: a concurrent build or reader sees a whole file
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"off (could not build in {target.parent}: {e})"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"off (could not load {target}: {e})"
    for name in ("decode_attention_bf16", "decode_attention_f32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    if not lib.decode_attention_simd():
        return lib, f"built, not used (no AVX-512 on this CPU: its portable loops are slower than torch's) ({target.name})"
    return lib, f"on ({target.name})"


@lru_cache(maxsize=1)
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    return _build()


def status() -> str:
    """'on (file)' or 'off (why)': whether the engine's decode attention runs the C kernel."""
    return _loaded()[1]


def kernel(dtype: torch.dtype, head_dim: int):
    """``decode_attention`` when the C kernel is built and handles ``dtype`` and ``head_dim``, else None."""
    lib, state = _loaded()
    if not state.startswith("on") or dtype not in (torch.bfloat16, torch.float32) or head_dim % LANES:
        return None
    return decode_attention


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Attention of one query token per slot over that slot's first ``lengths[s]`` cached positions.

    Args:
        q: (w, K, G, d) queries, G query heads per KV head; bf16 or fp32.
        keys, values: (S, K, T, d), S >= w, contiguous, ``q``'s dtype: one layer of the cache.
        lengths: (w,) int64, 1 <= lengths[s] <= T.
        scale: the score multiplier (d ** -0.5 for Llama).
        lib: the built library to call (default: the one ``status()`` describes).

    Returns:
        (w, K, G, d) in ``q``'s dtype: softmax(scale · q kᵀ) v per slot and head, with HF eager
        attention's roundings in bf16 (scores and probabilities rounded to bf16).

    Raises:
        ValueError: the shapes, dtypes or layouts do not fit together.
        RuntimeError: the kernel is not built, or it could not allocate its scratch memory.
    """
    lib = lib or _loaded()[0]
    if lib is None:
        raise RuntimeError(f"the decode attention kernel is {status()}")
    w, K, G, d = q.shape
    S, _, T, _ = keys.shape
    if not (keys.shape == values.shape == (S, K, T, d) and S >= w and lengths.shape == (w,)):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, lengths {tuple(lengths.shape)} do not fit (w,K,G,d)/(S,K,T,d)/(w,)")
    if not (keys.dtype == values.dtype == q.dtype and keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("decode_attention: q, keys and values need one dtype, keys and values contiguous")
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    fn = lib.decode_attention_bf16 if q.dtype == torch.bfloat16 else lib.decode_attention_f32
    code = fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), lengths.data_ptr(), out.data_ptr(),
              w, K, G, T, d, float(scale), torch.get_num_threads())
    if code:
        raise RuntimeError("decode attention kernel: out of memory for its scratch buffers")
    return out
