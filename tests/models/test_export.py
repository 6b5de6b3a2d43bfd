"""``r1kit export``: GGUF round trip through transformers' GGUF loader (weights rounded exactly as the
dtype says, logits, tokenizer ids, chat template), the embedded model against the GGUF that llama.cpp's
own converter wrote, HF export of a Llama and of r1kit's DeepSeek-V3, atomic writes, bad input.

A tiny random Llama with a 300-token byte-level BPE tokenizer (trained here, seeded by its corpus)
keeps the dtype matrix fast: transformers' loader parses the whole token list twice per load.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from r1kit.cli import main
from r1kit.errors import R1kitError
from r1kit.models.export import export_gguf, export_hf, permute_for_llama_cpp

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["What is 17 times 23?", "  two  spaces\nand a newline", "<|im_start|>user\nhi<|im_end|>", "naïve café ü 1234"]
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "<think>2+3=5</think> 5"}]


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer, 300 tokens, three special ones) with a ChatML template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = ["What is the sum of two numbers? The answer is 5.", "Think step by step, then answer.",
              "user assistant system <think> reasoning </think>", "naïve café über 0123456789"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHATML)


def small_llama(vocab_size: int, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, D=64, 4 query heads over 2 KV heads, head dim 16; norms randomized so they matter."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def load_gguf(path: Path):
    """(model, tokenizer) through transformers' GGUF loader, as ``load_policy`` reads a .gguf."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def rounded(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """``w`` rounded as a GGUF ``dtype`` tensor stores it (f16/bf16 elementwise; 1-D tensors stay fp32)."""
    if w.dim() < 2:
        return w
    return w.half().float() if dtype == "f16" else w.bfloat16().float()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# Max |logit change| from rounding the weights, relative to max |logit|: a few units of the format's
# relative precision (f16 2^-11, bf16 2^-8, Q8_0 half a step of 1/127 of each 32-block's max).
LOGIT_TOLERANCE = {"f16": 4e-3, "bf16": 3e-2, "q8_0": 3e-2}


@pytest.mark.parametrize(("dtype", "tied"), [("f16", False), ("bf16", True), ("q8_0", False)])
def test_gguf_round_trip_through_transformers(tmp_path, small_tokenizer, dtype, tied):
    source = small_llama(len(small_tokenizer) + 3, tied)  # 3 rows beyond the tokenizer: [PAD<id>] tokens
    path = export_gguf(source, small_tokenizer, tmp_path / f"m-{dtype}.gguf", dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    loaded, tok = load_gguf(path)
    assert loaded.config.tie_word_embeddings == tied and loaded.config.vocab_size == source.config.vocab_size

    theirs, ours = loaded.state_dict(), source.state_dict()
    assert set(theirs) == set(ours)
    for name, w in ours.items():
        if dtype == "q8_0" and w.dim() == 2:  # per 32-block: half a step of max/127, + 127 steps x the f16 scale error
            blocks = w.reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / 127
            assert ((theirs[name].reshape(-1, 32) - blocks).abs() <= (0.5 + 127 * 2**-11) * step + 1e-7).all(), name
        else:
            assert torch.equal(theirs[name], rounded(w, dtype)), name

    ids = small_tokenizer(TEXTS[0] + " " + TEXTS[3])["input_ids"]
    ref = logits(source, ids)
    scale = ref.abs().max()
    assert (logits(loaded, ids) - ref).abs().max() <= LOGIT_TOLERANCE[dtype] * scale
    if dtype != "q8_0":  # the loaded model is the source with rounded weights, nothing else
        twin = copy.deepcopy(source)
        twin.load_state_dict({n: rounded(w, dtype) for n, w in ours.items()})
        torch.testing.assert_close(logits(loaded, ids), logits(twin, ids), atol=1e-5, rtol=1e-5)

    for text in TEXTS:
        assert tok(text)["input_ids"] == small_tokenizer(text)["input_ids"], text
    assert tok.chat_template == CHATML
    assert (tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
            == small_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


def test_permutation_interleaves_each_heads_rotary_halves():
    # one head of dim 4: HF rows (a0, a1, b0, b1) pair a_i with b_i; llama.cpp wants (a0, b0, a1, b1)
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_for_llama_cpp(w, 1).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]
    two_heads = torch.arange(8.0)[:, None]
    assert permute_for_llama_cpp(two_heads, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_cli_exports_gguf_and_a_failed_export_keeps_the_old_file(tmp_path, small_tokenizer, capsys, monkeypatch):
    src = tmp_path / "model"
    small_llama(len(small_tokenizer), tied=True).save_pretrained(src)
    small_tokenizer.save_pretrained(src)
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", str(src), "--format", "gguf", "--dtype", "q8_0", "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temporary one
    before = out.read_bytes()

    import r1kit.models.export as export

    def broken(model, dtype):
        yield from []
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "llama_gguf_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(src), "--format", "gguf", "--output", str(out)])
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--format", "onnx"], "--format must be one of gguf, hf, got 'onnx'"),
    (["--format", "gguf", "--dtype", "q4_0"], "--dtype for --format gguf must be one of f16, bf16, q8_0"),
    (["--format", "hf", "--dtype", "q8_0"], "--dtype for --format hf must be one of fp32, bf16, fp16"),
])
def test_cli_refuses_bad_flags_before_loading(tmp_path, capsys, args, needle):
    assert main(["export", str(tmp_path / "no-such-model"), *args, "--output", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err


def test_export_never_replaces_what_it_would_lose(tmp_path, small_tokenizer, capsys):
    """A fresh user's `export RUN --format hf --output ANOTHER_RUN` replaced that run's checkpoints,
    metrics and final/ with six HF files, and `--format gguf --output README.md` overwrote the README."""
    src = tmp_path / "model"
    small_llama(len(small_tokenizer), tied=True).save_pretrained(src)
    small_tokenizer.save_pretrained(src)
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    notes = tmp_path / "README.md"
    notes.write_text("keep me")
    cases = [(["--format", "hf", "--output", str(run)], f"--output {run} holds a run's metrics.jsonl, not an earlier HF export"),
             (["--format", "hf", "--output", str(src)], "is (or holds) the model being exported"),
             (["--format", "hf", "--output", str(tmp_path)], "is (or holds) the model being exported"),
             (["--format", "gguf", "--output", str(notes)], "exists and is not a GGUF file")]
    for args, needle in cases:
        assert main(["export", str(src), *args]) == 2, args
        assert needle in capsys.readouterr().err, args
    assert notes.read_text() == "keep me" and sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "metrics.jsonl"]
    hf = tmp_path / "hf"  # an earlier export of the same format is replaced
    for _ in range(2):
        assert main(["export", str(src), "--format", "hf", "--output", str(hf)]) == 0
    gguf = tmp_path / "m.gguf"
    for _ in range(2):
        assert main(["export", str(src), "--format", "gguf", "--output", str(gguf)]) == 0
    assert gguf.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize(("files", "what"), [
    ({"config.yaml": "num_generations: 4\nlearning_rate: 1.0e-06\n"}, "a GRPO training run (its config.yaml)"),
    ({"config.yaml": "packing: true\nlearning_rate: 1.0e-05\n"}, "an SFT run (its config.yaml)"),
    ({"plan.json": "{}"}, "a rejection-sampling run (its plan.json)"),
    ({"manifest.json": '{"stage": "cold_start", "kind": "sft", "key": "ab"}'}, "a stage of a pipeline (its manifest.json)"),
])
def test_export_refuses_an_r1kit_run_naming_its_kind(tmp_path, files, what):
    """A run directory that also looks like an HF export (config.json, weights, no subdirectory) is
    refused by the kind ``runs.run_kind`` reads, with the fix; nothing in it is touched."""
    from r1kit.errors import ConfigError
    from r1kit.models.export import check_export_target

    run = tmp_path / "run"
    run.mkdir()
    for name, text in {"config.json": "{}", "model.safetensors": "w", **files}.items():
        (run / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        check_export_target(tmp_path / "model", run, "hf")
    assert str(err.value) == (f"--output {run} holds {what}, not an earlier HF export; pass a new path, or "
                              "remove it yourself if it is meant to go")
    (run / "config.yaml").unlink(missing_ok=True)
    for name in ("plan.json", "manifest.json"):
        (run / name).unlink(missing_ok=True)
    check_export_target(tmp_path / "model", run, "hf")          # the same files, no run's: an earlier export


def test_gguf_refuses_what_llama_cpp_would_run_differently(small_tokenizer, tmp_path):
    model = small_llama(len(small_tokenizer), tied=True)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(R1kitError, match="default rope only"):
        export_gguf(model, small_tokenizer, tmp_path / "x.gguf")
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    model.config.model_type = "qwen2"
    with pytest.raises(R1kitError, match="use --format hf"):
        export_gguf(model, small_tokenizer, tmp_path / "x.gguf")
    model.config.model_type = "llama"
    with pytest.raises(R1kitError, match="embedding rows"):
        export_gguf(small_llama(100, tied=True), small_tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_hf_export_of_a_llama_in_bf16(tmp_path, small_tokenizer):
    source = small_llama(len(small_tokenizer), tied=False)
    out = export_hf(source, small_tokenizer, tmp_path / "hf", "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and next(source.parameters()).dtype == torch.float32  # source untouched
    for name, w in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w.bfloat16()), name
    assert AutoTokenizer.from_pretrained(out)(TEXTS[0])["input_ids"] == small_tokenizer(TEXTS[0])["input_ids"]


def test_hf_export_of_r1kits_deepseek_v3_loads_in_transformers(tmp_path, small_tokenizer):
    from transformers import DeepseekV3ForCausalLM

    from r1kit.models.loading import load_policy
    from r1kit.models.v3_io import save_deepseek_v3
    from tests.models.v3_helpers import tiny_model

    model = tiny_model()
    src = save_deepseek_v3(model, tmp_path / "v3")
    small_tokenizer.save_pretrained(src)
    out = tmp_path / "exported"
    assert main(["export", str(src), "--format", "hf", "--output", str(out)]) == 0
    ids = torch.tensor([[5, 17, 3, 42, 8, 96]])
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(DeepseekV3ForCausalLM.from_pretrained(out).eval()(ids).logits, ref,
                                   atol=1e-5, rtol=1e-5)
        again, tok = load_policy(str(out))
        assert again.config.num_nextn_predict_layers == 1  # the MTP layer travels too
        torch.testing.assert_close(again(ids).logits, ref, atol=1e-6, rtol=1e-6)
    assert tok(TEXTS[0])["input_ids"] == small_tokenizer(TEXTS[0])["input_ids"]
    assert main(["export", str(src), "--format", "gguf", "--output", str(tmp_path / "v3.gguf")]) == 2

    assert main(["export", str(src), "--format", "hf", "--dtype", "bf16", "--output", str(out)]) == 0
    half, _ = load_policy(str(out), dtype="bf16")
    source = model.state_dict()
    for name, t in half.named_parameters():  # weights rounded to bf16
        assert torch.equal(t, source[name].bfloat16()), name
    biases = [n for n, _ in half.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(half.get_buffer(n), source[n]) for n in biases)  # fp32 (spec §3.2)


@pytest.mark.slow
def test_embedded_model_gguf_matches_llama_cpps_own_conversion(tmp_path, embedded_dir):
    """Export the embedded SmolLM2 (f16) and load it back through ``load_policy``: logits within f16
    rounding, same tokenizer ids and chat template. The cache was dequantized from the Q4_1 GGUF that
    llama.cpp's converter wrote, so our tensors must equal that file's (dequantized, f16-rounded) in
    llama.cpp's own layout, q/k permutation included, and our metadata must equal its metadata."""
    from gguf import GGUFReader, dequantize

    from r1kit.models.embedded import embedded_gguf_path
    from r1kit.models.loading import load_policy

    source, tokenizer = load_policy("smollm2-135m-instruct")
    path = export_gguf(source, tokenizer, tmp_path / "smollm2-f16.gguf", "f16", name="SmolLM2-135M-Instruct")
    ours, ref = GGUFReader(path), GGUFReader(embedded_gguf_path())
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    # The cached tokenizer splits with GPT-2's regex; SmolLM's own also splits digits one by one. Its
    # merges join no digits, so both give the same ids; we name the one the tokenizer has.
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    ref_tensors = {t.name: t for t in ref.tensors}
    for t in ours.tensors:
        if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
            expected = dequantize(ref_tensors[t.name].data, ref_tensors[t.name].tensor_type)
            got = dequantize(t.data, t.tensor_type)
            np.testing.assert_allclose(got, expected.astype(np.float16).astype(np.float32), rtol=0, atol=0)

    loaded, tok = load_policy(str(path))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert tok.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) == ids
    assert tok.chat_template == tokenizer.chat_template
    for text in TEXTS:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ref_logits, got = logits(source, ids), logits(loaded, ids)
    assert (got - ref_logits).abs().max() <= LOGIT_TOLERANCE["f16"] * ref_logits.abs().max()
    assert torch.equal(got.argmax(-1), ref_logits.argmax(-1))


def test_llama_cpp_runs_the_export(tmp_path, small_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; the llama.cpp "
                                    "round trip runs where it is (pip install llama-cpp-python)")
    source = small_llama(len(small_tokenizer), tied=False)
    path = export_gguf(source, small_tokenizer, tmp_path / "m.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    text = TEXTS[0]
    ids = small_tokenizer(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    ref = logits(source, ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]))
    assert (got - ref).abs().max() <= LOGIT_TOLERANCE["f16"] * ref.abs().max() * 4
