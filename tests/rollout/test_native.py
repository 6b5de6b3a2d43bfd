"""The C decode attention (r1kit/rollout/native.py) against the torch arithmetic it replaces.

The reference is the engine's torch decode attention (two batched matmuls over the masked cache
block, HF eager attention's bf16 roundings), in float64 for the fp32 kernel. Shapes cover the
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
    assert lib.decode_attention_simd() == 0 and state.startswith("built, not used")
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
    ours = native.decode_attention(q, keys, values, lengths, scale, lib=lib).float()
    ref = reference(q, keys, values, lengths, scale, torch.bfloat16).float()
    # Same roundings, fp32 sums in another order: a score or output may land one bf16 step apart.
    torch.testing.assert_close(ours, ref, rtol=2**-7, atol=2**-7)
    assert (ours == ref).float().mean() > 0.97


@pytest.mark.parametrize("K,G,d", SHAPES)
@pytest.mark.parametrize("which", ["default", "portable"])
def test_fp32_kernel_equals_float64_attention(K, G, d, which, request):
    lib = request.getfixturevalue("portable") if which == "portable" else built()
    q, keys, values, lengths, scale = case(K, G, d, torch.float32, seed=1)
    ours = native.decode_attention(q, keys, values, lengths, scale, lib=lib)
    ref = reference(q.double(), keys.double(), values.double(), lengths, scale, torch.float64)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 sums of up to 80 terms


def test_positions_past_a_slots_length_are_never_read():
    lib = built()
    q, keys, values, lengths, scale = case(3, 3, 64, torch.bfloat16)
    clean = native.decode_attention(q, keys, values, lengths, scale, lib=lib)
    for s, n in enumerate(lengths.tolist()):
        keys[s, :, n:] = float("nan")
        values[s, :, n:] = float("nan")
    keys[len(lengths):] = float("nan")  # slots past w
    assert torch.equal(native.decode_attention(q, keys, values, lengths, scale, lib=lib), clean)


def test_mismatched_shapes_are_refused_before_the_c_call():
    built()
    q, keys, values, lengths, scale = case(3, 3, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        native.decode_attention(q, keys[:, :2], values[:, :2], lengths, scale)
    with pytest.raises(ValueError, match="one dtype"):
        native.decode_attention(q, keys.float(), values.float(), lengths, scale)


def test_r1kit_native_0_keeps_the_engine_on_its_torch_path(monkeypatch):
    from tests.rollout.test_engine import PROMPTS, hf_greedy, tiny_llama
    from r1kit.rollout.base import SamplingParams

    model = tiny_llama()
    monkeypatch.setenv("R1KIT_NATIVE", "0")
    native._loaded.cache_clear()
    try:
        assert native.status() == "off (R1KIT_NATIVE=0)" and native.kernel(torch.float32, 64) is None
        engine = Engine(model, [], dtype=torch.float32, max_batch=2)
        assert engine.adapter.attend is None
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
        assert [c.token_ids for c in out] == [hf_greedy(model, p, 8) for p in PROMPTS]
    finally:
        monkeypatch.delenv("R1KIT_NATIVE")
        native._loaded.cache_clear()


def test_the_engine_uses_the_kernel_where_it_is_on():
    from tests.rollout.test_engine import tiny_llama

    engine = Engine(tiny_llama(), [], dtype=torch.float32)
    assert (engine.adapter.attend is not None) == native.status().startswith("on")
