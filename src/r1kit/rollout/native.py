"""r1kit's native kernels (``kernels.c`` beside this file): the parts of the engine's Llama-family
forward that eager torch ops do badly on a CPU.

- ``cache_attention``: in the decode step, the torch path (two batched matmuls over the cache block)
  reads every slot's cache up to the longest slot's length and runs (G x d)(d x T) products that
  oneDNN/MKL do not batch well (at batch 64, a quarter of a bf16 decode step on two threads, and it
  did not scale to the second thread); in a prefill, one ``scaled_dot_product_attention`` call per
  prompt and layer (1,920 calls, 0.5 s of the bench's 13 s batch-64 rollout). The kernel does the
  same arithmetic, with the same bf16 roundings, in one OpenMP loop over (token, KV head), each item
  reading only the cached positions its token sees (prefill: 0.16 s). On AVX512-BF16 CPUs its bf16
  dot products are ``vdpbf16ps`` (exact bf16 products, fp32 sums): 1.6x faster on a cache-resident
  layer; a batch-64 layer read from DRAM stays at the read bandwidth (~17 GB/s here) either way.
- ``add_rms_norm``, ``silu_mul``, ``rope_store``: the residual add + RMSNorm, SwiGLU's activation,
  and rotary + cache write, each one pass instead of 4-10 small torch ops (and their dispatch) per
  layer, with the roundings of the torch ops they replace.
- ``softmax_rows``: the sampler's fp32 softmax over the vocabulary (torch's took 7 ms for 64 x 49152
  on one core).

The C file is compiled on first use with the system C compiler (``$CC`` or ``cc``: ``-O3
-march=native -fopenmp``) into ``~/.cache/r1kit/kernels`` (``$R1KIT_KERNEL_DIR``), named by a hash
of the source, the flags, the compiler's version and the CPU's flags, written atomically and loaded
with ``ctypes`` (which releases the GIL during the call). Its OpenMP runtime is torch's own
(``libgomp.so.1`` is already loaded, the dynamic linker reuses it by soname), and it runs on
``torch.get_num_threads()`` threads. The engine uses them where they were compiled with AVX-512
(the portable C loops, for other CPUs, are tested but slower than torch's matmuls). Without a compiler,
without AVX-512, or with ``R1KIT_NATIVE=0`` (or false/no/off), ``available()`` is False and the engine keeps its torch
path; ``status()`` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LANES = 16  # the C kernel needs head_dim % LANES == 0
STALE_DAYS = 14  # a new build removes the cache's libraries older than this
OFF = {"0", "false", "no", "off"}  # R1KIT_NATIVE values that keep the engine on its torch path


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
    switch = os.environ.get("R1KIT_NATIVE", "1").strip().lower()
    if switch in OFF:
        return None, f"off (R1KIT_NATIVE={os.environ['R1KIT_NATIVE']})"
    cc = shlex.split(os.environ.get("CC") or "cc")  # CC may carry a launcher or flags: "ccache gcc"
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"off (no C compiler {shlex.join(cc)!r}: {e})"
    flags = [*FLAGS, *extra_flags]
    target = _target(flags, version)
    problem = None if target.exists() else _compile(cc, flags, target)
    if problem:
        return None, problem
    lib = _load(target)
    if lib is None:  # a damaged, stale or foreign file under this name: build it again, once
        problem = _compile(cc, flags, target)
        if problem:
            return None, problem
        lib = _load(target, fresh=True)
        if lib is None:
            return None, f"off (could not load {target} after rebuilding it)"
    if not lib.cache_attention_simd():
        return lib, f"built, not used (compiled without AVX-512: its portable loops are slower than torch's) ({target.name})"
    return lib, f"on ({target.name})"


def _load(target: Path, fresh: bool = False) -> ctypes.CDLL | None:
    """The library at ``target`` with its signatures declared, if it loads, has every symbol and was
    built for this name (its compiled-in key is the name's hash); else None. ``fresh`` loads it
    through a new hard link, since the dynamic linker hands back an already loaded file by name."""
    path = target
    if fresh:
        path = target.with_name(f"{target.stem}.{os.getpid()}.{time.monotonic_ns()}.so")
        try:
            os.link(target, path)
        except OSError:
            return None
    try:
        lib = _bind(ctypes.CDLL(str(path)))
        if lib.r1kit_kernels_key() != _key(target).encode():
            return None
        try:
            os.utime(target)  # in use: not stale (_remove_stale)
        except OSError:
            pass  # a read-only cache still serves its library
        return lib
    except (OSError, AttributeError):
        return None
    finally:
        if fresh:
            path.unlink(missing_ok=True)


def _key(target: Path) -> str:
    return target.stem.removeprefix("kernels-")


def _target(flags: list[str], compiler_version: str) -> Path:
    """The cached library for this source, these flags, this compiler and this CPU."""
    parts = [SOURCE.read_text(), " ".join(flags), compiler_version, _cpu_flags()]
    return _kernel_dir() / f"kernels-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def _compile(cc: list[str], flags: list[str], target: Path) -> str | None:
    """Build ``kernels.c`` into ``target`` (written atomically); None, or the status saying why not."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            key = f'-DR1KIT_KERNELS_KEY="{_key(target)}"'  # checked on load (_load)
            run = subprocess.run([*cc, *flags, key, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                 text=True, timeout=300)
            if run.returncode:
                tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                return f"off ({shlex.join(cc)} failed: {tail})"
            os.replace(built, target)  # atomic: a concurrent build or reader sees a whole file
    except (OSError, subprocess.SubprocessError) as e:
        return f"off (could not build in {target.parent}: {e})"
    _remove_stale(target)
    return None


def _remove_stale(keep: Path) -> None:
    """Delete the cache's other libraries untouched for ``STALE_DAYS`` (older sources, compilers;
    a process that has one loaded keeps its mapping): one build per version would pile up."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in keep.parent.glob("kernels-*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures on ``lib`` (AttributeError when a symbol is missing)."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "cache_attention": (ctypes.c_int, [ptr] * 6 + [i64] * 5 + [f32, i32, i32]),
        "add_rms_norm": (None, [ptr] * 4 + [i64] * 2 + [f32, i32]),
        "silu_mul": (None, [ptr] * 2 + [i64] * 2 + [i32]),
        "rope_store": (None, [ptr] * 9 + [i64] * 5 + [i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        for suffix in ("bf16", "f32"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.restype, fn.argtypes = restype, argtypes
    lib.softmax_rows_f32.restype, lib.softmax_rows_f32.argtypes = None, [ptr] * 2 + [i64] * 2 + [i32]
    lib.r1kit_kernels_key.restype, lib.r1kit_kernels_key.argtypes = ctypes.c_char_p, []
    return lib


@lru_cache(maxsize=1)
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    return _build()


def status() -> str:
    """'on (file)', 'built, not used (why)' or 'off (why)': whether the engine runs the C kernels."""
    return _loaded()[1]


def enabled() -> bool:
    """Whether the kernels are built with AVX-512 and loaded (``status()`` "on")."""
    return status().startswith("on")


def available(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the engine runs its attention and elementwise steps in C for ``dtype`` and
    ``head_dim``: ``enabled()``, the dtype is bf16 or fp32 and head_dim a multiple of 16."""
    return enabled() and dtype in (torch.bfloat16, torch.float32) and head_dim % LANES == 0


def cache_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                    scale: float, slots: torch.Tensor | None = None, round_scores: bool = True,
                    lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Attention of w query tokens over the cache, token r over the first ``lengths[r]`` positions of
    its slot: the decode step (token r in slot r) and the prompt tokens of a prefill (``slots``, each
    token's key and value already written at its own position).

    Args:
        q: (w, K, G, d) queries, G query heads per KV head; bf16 or fp32.
        keys, values: (S, K, T, d), contiguous, ``q``'s dtype: one layer of the cache.
        lengths: (w,) int64, 1 <= lengths[r] <= T.
        scale: the score multiplier (d ** -0.5 for Llama).
        slots: (w,) int64 cache slot of each token, in [0, S); None = token r in slot r (w <= S).
        round_scores: in bf16, round the scores to bf16 before the softmax (HF eager attention, as the
            decode step's torch path does), else keep them fp32 (torch's CPU
            ``scaled_dot_product_attention``, the prefill's torch path); ignored in fp32.
        lib: the built library to call (default: the one ``status()`` describes).

    Returns:
        (w, K, G, d) in ``q``'s dtype: softmax(scale · q kᵀ) v per token and head; in bf16 the
        probabilities (and with ``round_scores`` the scores) rounded to bf16.

    Raises:
        ValueError: the shapes, dtypes, layouts or slots do not fit together.
        RuntimeError: the kernel is not built, or it could not allocate its scratch memory.
    """
    fn = _fn(lib, "cache_attention", q.dtype)
    w, K, G, d = q.shape
    S, _, T, _ = keys.shape
    fits = slots.shape == (w,) if slots is not None else S >= w
    if not (keys.shape == values.shape == (S, K, T, d) and fits and lengths.shape == (w,)):
        raise ValueError(f"cache_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, lengths {tuple(lengths.shape)}"
                         f"{'' if slots is None else f', slots {tuple(slots.shape)}'} do not fit "
                         "(w,K,G,d)/(S,K,T,d)/(w,)")
    if not (keys.dtype == values.dtype == q.dtype and keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("cache_attention: q, keys and values need one dtype, keys and values contiguous")
    if slots is not None:
        slots = slots.to(torch.int64).contiguous()
        if w and not 0 <= int(slots.min()) <= int(slots.max()) < S:  # the C loop indexes the cache by them
            raise ValueError(f"cache_attention: slots must be in [0, {S}), got {slots.min()}..{slots.max()}")
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    code = fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), lengths.data_ptr(),
              None if slots is None else slots.data_ptr(), out.data_ptr(), w, K, G, T, d, float(scale),
              int(round_scores), torch.get_num_threads())
    if code:
        raise RuntimeError("attention kernel: out of memory for its scratch buffers")
    return out


def _fn(lib: ctypes.CDLL | None, name: str, dtype: torch.dtype):
    lib = lib or _loaded()[0]
    if lib is None:
        raise RuntimeError(f"the engine's C kernels are {status()}")
    return getattr(lib, f"{name}_{'bf16' if dtype == torch.bfloat16 else 'f32'}")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The residual add then RMSNorm of a decoder layer, in one pass: ``x += delta`` in place (when
    ``delta`` is given), then returns ``weight * rms_norm(x)`` (HF ``LlamaRMSNorm``: statistics in
    fp32, the normalized rows rounded to the dtype before the weight).

    Args: x (n, D) contiguous, bf16 or fp32 (modified); delta (n, D) like x, or None; weight (D,).
    Returns: (n, D), x's dtype.
    """
    n, D = x.shape
    out = torch.empty_like(x)
    _fn(lib, "add_rms_norm", x.dtype)(x.data_ptr(), None if delta is None else delta.contiguous().data_ptr(),
                                       weight.data_ptr(), out.data_ptr(), n, D, eps, torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """SwiGLU's activation ``silu(gate) * up`` of gate_up (n, 2F) = [gate | up] (contiguous), each op
    rounded to the dtype as torch does; returns (n, F)."""
    n, two_f = gate_up.shape
    out = gate_up.new_empty(n, two_f // 2)
    _fn(lib, "silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), n, two_f // 2, torch.get_num_threads())
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
               positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k (HF ``apply_rotary_pos_emb``, half-split, each op rounded to the
    dtype) and the cache write of k and v, in one pass over the rows.

    Args:
        qkv: (n, H + 2K, d) contiguous projections of n tokens.
        cos, sin: (P, d) rotary tables, indexed by position.
        slots, positions: (n,) int64: each token's cache slot and position (< T, < P).
        keys, values: (S, K, T, d) contiguous: one layer of the cache, written at [slot, :, position].

    Returns:
        q (n, H, d) and k (n, K, d), rotated, qkv's dtype.
    """
    n, width, d = qkv.shape
    S, K, T, _ = keys.shape
    H = width - 2 * K
    q, k = qkv.new_empty(n, H, d), qkv.new_empty(n, K, d)
    _fn(lib, "rope_store", qkv.dtype)(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                                       positions.data_ptr(), q.data_ptr(), k.data_ptr(), keys.data_ptr(),
                                       values.data_ptr(), n, H, K, T, d, torch.get_num_threads())
    return q, k


def softmax_rows(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """softmax over the last dim of fp32 x (b, V) (contiguous); (b, V) fp32, each row summing to 1
    within fp32 rounding."""
    b, V = x.shape
    out = torch.empty_like(x)
    (lib or _loaded()[0]).softmax_rows_f32(x.data_ptr(), out.data_ptr(), b, V, torch.get_num_threads())
    return out
