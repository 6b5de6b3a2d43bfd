"""The C kernels (r1kit/rollout/native.py) against the torch arithmetic they replace.

The decode reference is the engine's torch decode attention (two batched matmuls over the masked
cache block, HF eager attention's bf16 roundings), in float64 for the fp32 kernel; the prefill
reference (tokens of several slots, scores kept fp32) is torch's scaled_dot_product_attention. Shapes cover the
register paths (d = 64 with 1-5 query heads per KV head, d = 128 with 1-3), the generic loops
(d = 32, 16) and lengths of 1, of T, and not a multiple of 16; the portable loops (CPUs without
AVX-512) are built with ``-mno-avx512f`` and held to the same reference.
"""

from __future__ import annotations

import pytest
import torch

from r1kit.rollout import native
from r1kit.rollout.engine import Engine

SHAPES = [(3, 3, 64), (2, 5, 64), (1, 1, 64), (1, 2, 128), (2, 3, 128), (2, 2, 32), (1, 4, 16)]  # (K, G, d)


def reference(q, keys, values, lengths, scale, dtype):
    """The engine's torch path: scores = round(scale q kᵀ + mask), p = round(softmax), out = p v."""
    w, K, G, d = q.shape
    T = keys.shape[2]
    hidden = torch.arange(T)[None] >= lengths[:, None]  # (w, T)
    bias = torch.zeros(w, 1, 1, T, dtype=dtype).masked_fill_(hidden[:, None, None], float("-inf"))
    bias = bias.expand(w, K, G, T).reshape(w * K, G, T)
    scores = torch.baddbmm(bias, q.reshape(w * K, G, d), keys[:w].reshape(w * K, T, d).transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(dtype)
    return torch.bmm(probs, values[:w].reshape(w * K, T, d)).view(w, K, G, d)


def case(K, G, d, dtype, w=6, S=8, T=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(S, K, T, d, generator=g).to(dtype)
    values = torch.randn(S, K, T, d, generator=g).to(dtype)
    q = (2 * torch.randn(w, K, G, d, generator=g)).to(dtype)
    lengths = torch.tensor([1, T, 17, 16, 33, 79][:w])
    return q, keys, values, lengths, d**-0.5


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The kernel built without AVX-512: the loops a CPU without it would run."""
    import os

    old = os.environ.get("R1KIT_KERNEL_DIR")
    os.environ["R1KIT_KERNEL_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    try:
        lib, state = native._build(("-mno-avx512f",))
    finally:
        os.environ.pop("R1KIT_KERNEL_DIR") if old is None else os.environ.__setitem__("R1KIT_KERNEL_DIR", old)
    if lib is None:
        pytest.skip(f"no C compiler: {state}")
    assert lib.cache_attention_simd() == 0 and state.startswith("built, not used")
    return lib


def built():
    lib = native._loaded()[0]
    if lib is None:
        pytest.skip(f"decode attention kernel {native.status()}")
    return lib


@pytest.mark.parametrize("K,G,d", SHAPES)
@pytest.mark.parametrize("which", ["default", "portable"])
def test_bf16_kernel_equals_the_torch_path_to_one_rounding(K, G, d, which, request):
    lib = request.getfixturevalue("portable") if which == "portable" else built()
    q, keys, values, lengths, scale = case(K, G, d, torch.bfloat16)
    ours = native.cache_attention(q, keys, values, lengths, scale, lib=lib).float()
    ref = reference(q, keys, values, lengths, scale, torch.bfloat16).float()
    # Same roundings, fp32 sums in another order: a score or output may land one bf16 step apart.
    torch.testing.assert_close(ours, ref, rtol=2**-7, atol=2**-7)
    assert (ours == ref).float().mean() > 0.97


@pytest.mark.parametrize("K,G,d", SHAPES)
@pytest.mark.parametrize("which", ["default", "portable"])
def test_fp32_kernel_equals_float64_attention(K, G, d, which, request):
    lib = request.getfixturevalue("portable") if which == "portable" else built()
    q, keys, values, lengths, scale = case(K, G, d, torch.float32, seed=1)
    ours = native.cache_attention(q, keys, values, lengths, scale, lib=lib)
    ref = reference(q.double(), keys.double(), values.double(), lengths, scale, torch.float64)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 sums of up to 80 terms


def prefill_case(K, G, d, dtype, seed=2):
    """Prompt tokens of 3 slots (a 5-token prefix then 7 tokens; 9 tokens; 1 token), in mixed order."""
    g = torch.Generator().manual_seed(seed)
    S, T = 4, 40
    keys = torch.randn(S, K, T, d, generator=g).to(dtype)
    values = torch.randn(S, K, T, d, generator=g).to(dtype)
    slots = torch.tensor([2] * 7 + [0] * 9 + [3])
    lengths = torch.cat([torch.arange(6, 13), torch.arange(1, 10), torch.tensor([1])])  # position + 1
    order = torch.randperm(len(slots), generator=g)
    q = (2 * torch.randn(len(slots), K, G, d, generator=g)).to(dtype)
    return q, keys, values, lengths[order], slots[order], d**-0.5


def sdpa_rows(q, keys, values, lengths, slots, scale):
    """Each token alone through torch's scaled_dot_product_attention over its slot's first positions."""
    w, K, G, d = q.shape
    out = []
    for r in range(w):
        k = keys[slots[r], :, : lengths[r]][None]  # (1, K, n, d)
        v = values[slots[r], :, : lengths[r]][None]
        qr = q[r].reshape(1, K * G, 1, d)
        out.append(torch.nn.functional.scaled_dot_product_attention(qr, k, v, scale=scale, enable_gqa=True).view(K, G, d))
    return torch.stack(out)


@pytest.mark.parametrize("K,G,d", [(3, 3, 64), (2, 3, 128), (1, 4, 16)])
def test_prefill_tokens_of_several_slots_equal_sdpa(K, G, d):
    """``slots`` with scores kept fp32 (the prefill): fp32 equals float64 attention; bf16 is as close
    to float64 as torch's bf16 scaled_dot_product_attention is."""
    lib = built()
    q, keys, values, lengths, slots, scale = prefill_case(K, G, d, torch.float32)
    ours = native.cache_attention(q, keys, values, lengths, scale, slots, round_scores=False, lib=lib)
    exact = sdpa_rows(q.double(), keys.double(), values.double(), lengths, slots, scale)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    qb, kb, vb = q.bfloat16(), keys.bfloat16(), values.bfloat16()
    ours = native.cache_attention(qb, kb, vb, lengths, scale, slots, round_scores=False, lib=lib).double()
    exact = sdpa_rows(qb.double(), kb.double(), vb.double(), lengths, slots, scale)
    torch_bf16 = sdpa_rows(qb, kb, vb, lengths, slots, scale).double()
    assert (ours - exact).abs().max() <= 2**-6
    assert (ours - exact).abs().mean() <= 1.25 * (torch_bf16 - exact).abs().mean() + 1e-4


def test_slots_outside_the_cache_are_refused():
    built()
    q, keys, values, lengths, slots, scale = prefill_case(3, 3, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 4\)"):
        native.cache_attention(q, keys, values, lengths, scale, slots + 2)


def test_positions_past_a_slots_length_are_never_read():
    lib = built()
    q, keys, values, lengths, scale = case(3, 3, 64, torch.bfloat16)
    clean = native.cache_attention(q, keys, values, lengths, scale, lib=lib)
    for s, n in enumerate(lengths.tolist()):
        keys[s, :, n:] = float("nan")
        values[s, :, n:] = float("nan")
    keys[len(lengths):] = float("nan")  # slots past w
    assert torch.equal(native.cache_attention(q, keys, values, lengths, scale, lib=lib), clean)


def test_mismatched_shapes_are_refused_before_the_c_call():
    built()
    q, keys, values, lengths, scale = case(3, 3, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        native.cache_attention(q, keys[:, :2], values[:, :2], lengths, scale)
    with pytest.raises(ValueError, match="one dtype"):
        native.cache_attention(q, keys.float(), values.float(), lengths, scale)


def test_r1kit_native_0_keeps_the_engine_on_its_torch_path(monkeypatch):
    from tests.rollout.test_engine import PROMPTS, hf_greedy, tiny_llama
    from r1kit.rollout.base import SamplingParams

    model = tiny_llama()
    monkeypatch.setenv("R1KIT_NATIVE", "0")
    native._loaded.cache_clear()
    try:
        assert native.status() == "off (R1KIT_NATIVE=0)" and not native.available(torch.float32, 64)
        for spelling in ("false", "No", "off"):
            monkeypatch.setenv("R1KIT_NATIVE", spelling)
            assert native._build()[1] == f"off (R1KIT_NATIVE={spelling})"
        monkeypatch.setenv("R1KIT_NATIVE", "0")
        engine = Engine(model, [], dtype=torch.float32, max_batch=2)
        assert not engine.adapter.native
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
        assert [c.token_ids for c in out] == [hf_greedy(model, p, 8) for p in PROMPTS]
    finally:
        monkeypatch.delenv("R1KIT_NATIVE")
        native._loaded.cache_clear()


def test_the_engine_uses_the_kernel_where_it_is_on():
    from tests.rollout.test_engine import tiny_llama

    engine = Engine(tiny_llama(), [], dtype=torch.float32)
    assert engine.adapter.native == native.status().startswith("on")


ROWS = [1, 64, 300]  # one decode row, a batch, a prefill (the last one above the threading threshold)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("which", ["default", "portable"])
def test_add_rms_norm_equals_the_residual_add_and_hf_rmsnorm(dtype, n, which, request):
    from r1kit.rollout.engine import rms_norm

    lib = request.getfixturevalue("portable") if which == "portable" else built()
    g = torch.Generator().manual_seed(n)
    x, delta = (3 * torch.randn(n, 576, generator=g)).to(dtype), torch.randn(n, 576, generator=g).to(dtype)
    weight = (1 + torch.randn(576, generator=g) / 4).to(dtype)
    ref_x = x + delta
    ref = rms_norm(ref_x, weight, 1e-5)
    ours = native.add_rms_norm(x, delta, weight, 1e-5, lib=lib)
    assert torch.equal(x, ref_x)  # the add happened in place, rounded as torch rounds it
    tol = dict(rtol=2**-7, atol=2**-7) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, ref, **tol)  # fp32 mean in another summation order
    assert dtype == torch.float32 or (ours == ref).float().mean() > 0.99  # bf16: rarely a rounding apart
    torch.testing.assert_close(native.add_rms_norm(ref_x.clone(), None, weight, 1e-5, lib=lib), ours, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("which", ["default", "portable"])
def test_silu_mul_equals_torch_swiglu(dtype, n, which, request):
    lib = request.getfixturevalue("portable") if which == "portable" else built()
    gate_up = (4 * torch.randn(n, 2 * 1544, generator=torch.Generator().manual_seed(n))).to(dtype)  # F not a multiple of 16
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp under- and overflow, zeros
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    ours = native.silu_mul(gate_up, lib=lib)
    tol = dict(rtol=2**-7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, ref, **tol)
    assert dtype == torch.float32 or (ours == ref).float().mean() > 0.99  # bf16: rarely a rounding apart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("which", ["default", "portable"])
def test_rope_store_equals_hf_rotary_and_the_cache_write(dtype, which, request):
    from r1kit.rollout.engine import rotate

    lib = request.getfixturevalue("portable") if which == "portable" else built()
    n, H, K, d, S, T = 70, 9, 3, 64, 8, 48
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, H + 2 * K, d, generator=g).to(dtype)
    angles = torch.arange(T)[:, None] * 10000 ** (-torch.arange(0, d, 2) / d)  # (T, d/2)
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(dtype)
    slots, positions = torch.randint(0, S, (n,), generator=g), torch.randperm(S * T, generator=g)[:n]
    slots, positions = positions // T, positions % T  # distinct (slot, position) pairs
    keys, values = torch.zeros(S, K, T, d, dtype=dtype), torch.zeros(S, K, T, d, dtype=dtype)
    q, k = native.rope_store(qkv, cos, sin, slots, positions, keys, values, lib=lib)
    ref = rotate(qkv[:, : H + K], cos[positions][:, None], sin[positions][:, None])
    assert torch.equal(q, ref[:, :H]) and torch.equal(k, ref[:, H:])  # the same three roundings
    ref_keys, ref_values = torch.zeros_like(keys), torch.zeros_like(values)
    ref_keys[slots, :, positions] = ref[:, H:]
    ref_values[slots, :, positions] = qkv[:, H + K :]
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


def test_bf16_engine_with_kernels_tracks_its_torch_path():
    """The whole bf16 engine on the tiny model with the C kernels and without: the same greedy tokens,
    and prompt logits as close to the fp32 engine's as the torch path's are (the prefill attention
    rounds the probabilities where torch's scaled_dot_product_attention rounds its unnormalized
    weights: both land ~0.02 from fp32 on average here)."""
    from r1kit.rollout.base import SamplingParams
    from tests.rollout.test_engine import PROMPTS, tiny_llama

    built()
    model = tiny_llama()
    on = Engine(model, [], dtype=torch.bfloat16, max_batch=4)
    off = Engine(model, [], dtype=torch.bfloat16, max_batch=4)
    off.adapter.native = False
    if not on.adapter.native:
        pytest.skip(f"the engine does not use the kernels here: {native.status()}")
    params = SamplingParams(max_tokens=12, temperature=0)
    assert [c.token_ids for c in on.generate(PROMPTS, params)] == [c.token_ids for c in off.generate(PROMPTS, params)]

    def prompt_logits(engine):
        s = max(map(len, PROMPTS))
        tokens = torch.tensor([p + [0] * (s - len(p)) for p in PROMPTS])
        cache = engine.adapter.new_cache(len(PROMPTS), 64)
        return engine.adapter.prefill(tokens, torch.tensor([len(p) for p in PROMPTS]), cache,
                                      torch.arange(len(PROMPTS))).float()

    exact = prompt_logits(Engine(model, [], dtype=torch.float32, max_batch=4))
    ours, torch_path = (prompt_logits(e) - exact for e in (on, off))
    assert ours.abs().max() < 0.25
    assert ours.abs().mean() <= 1.25 * torch_path.abs().mean()


@pytest.mark.parametrize("which", ["default", "portable"])
def test_softmax_rows_equals_torch_softmax(which, request):
    lib = request.getfixturevalue("portable") if which == "portable" else built()
    x = 8 * torch.randn(5, 49157, generator=torch.Generator().manual_seed(0))  # V not a multiple of 16
    x[1, :100] = float("-inf")  # masked entries
    x[2] = 0.0  # uniform
    ours = native.softmax_rows(x, lib=lib)
    torch.testing.assert_close(ours, x.softmax(-1), rtol=1e-6, atol=1e-9)
    assert torch.all(ours[1, :100] == 0)


def test_a_damaged_cached_library_is_rebuilt_and_a_missing_compiler_keeps_torch(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    monkeypatch.setenv("R1KIT_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    flags = ("-mno-avx512f", "-O1")  # a library no other test has loaded (dlopen reuses a loaded path)
    version = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout
    target = native._target([*native.FLAGS, *flags], version)
    target.write_bytes(b"not a shared library")
    lib, state = native._build(flags)
    assert lib is not None and state.startswith("built, not used") and target.stat().st_size > 1000
    monkeypatch.setenv("CC", f"env {tmp_path / 'no-such-cc'}")  # CC with a launcher word, as "ccache gcc"
    lib, state = native._build(flags)
    assert lib is None and "no-such-cc" in state


def test_a_valid_library_built_for_another_name_is_rebuilt(tmp_path, monkeypatch):
    """A loadable library copied over the cache name of another build (an older source, other flags)
    is caught by its compiled-in key and rebuilt, and the rebuilt one is what gets loaded."""
    import shutil
    import subprocess

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    monkeypatch.setenv("R1KIT_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    version = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout
    other, ours = ("-mno-avx512f", "-O2", "-g0"), ("-mno-avx512f", "-O2", "-g1")
    assert native._build(other)[0] is not None
    target = native._target([*native.FLAGS, *ours], version)
    shutil.copy(native._target([*native.FLAGS, *other], version), target)
    lib, state = native._build(ours)
    assert lib is not None and lib.r1kit_kernels_key() == native._key(target).encode(), state
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # the temporary link is gone
        [native._target([*native.FLAGS, *f], version).name for f in (other, ours)])
    import os
    import time

    old = native._target([*native.FLAGS, *other], version)
    os.utime(old, (time.time() - 15 * 86400,) * 2)  # untouched for 15 days
    target.unlink()
    assert native._build(ours)[0] is not None  # a new build removes the stale library
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_read_only_cache_still_serves_its_library(tmp_path, monkeypatch):
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    monkeypatch.setenv("R1KIT_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    flags = ("-mno-avx512f", "-O2", "-g2")
    assert native._build(flags)[0] is not None

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(native.os, "utime", read_only)
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("rebuilt a good cached library"))
    lib, state = native._build(flags)
    assert lib is not None and state.startswith("built, not used")
