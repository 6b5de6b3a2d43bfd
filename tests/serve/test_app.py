"""The serving layer in process (httpx's ASGI transport; it buffers streams, which these tests do not
need): an engine that fails mid-stream gives an in-band error chunk and the loop keeps serving; the
HF-generate fallback serves a model without an engine adapter, labelled as such; the R1 setting's
prompt; the detokenizer holds back a split UTF-8 character."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from r1kit.rollout.engine import SequenceDelta
from r1kit.serve.app import ChoiceState, Detokenizer, ServeConfig, Server, create_app, token_bytes
from r1kit.serve.protocol import ChatCompletionRequest
from r1kit.serve.runner import EngineLoop, make_serving_engine
from serve_helpers import CONTENT, REASONING

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


class FailingEngine:
    """Request API stub: the first step of a request emits one token, the second raises."""

    max_batch = 4

    def __init__(self, token: int) -> None:
        self.token, self.live, self.fail_next = token, [], False

    def check_request(self, prompt_ids, params, top_logprobs=0):
        params.validate()

    def add_request(self, request_id, prompt_ids, params, top_logprobs=0):
        self.live.append(request_id)

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("kernel exploded")
        self.fail_next = True
        return [SequenceDelta(rid, 0, [self.token], [-0.5], None, None) for rid in self.live]

    def abort(self, request_id, index=None):
        self.live = [r for r in self.live if r != request_id]
        return True

    def has_unfinished(self):
        return bool(self.live)

    def stats(self):
        return {"slots_total": 4, "slots_in_use": len(self.live), "waiting": 0, "requests": len(self.live), "steps": 0}


class OneTokenEngine(FailingEngine):
    """Request API stub: every request gets one token, then finish_reason "length"."""

    def step(self):
        done, self.live = self.live, []
        return [SequenceDelta(rid, 0, [self.token], [-0.5], None, "length") for rid in done]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


def call(app, path: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.post(path, json=body)

    return asyncio.run(go())


def test_engine_failure_after_the_stream_started_is_an_in_band_error(tokenizer):
    loop = EngineLoop(FailingEngine(tokenizer(" Hello", add_special_tokens=False)["input_ids"][0]), max_waiting=4)
    loop.start()
    try:
        app = create_app(Server(loop, tokenizer, ServeConfig(model="m")))
        r = call(app, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True})
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Hello"
        error = json.loads(events[-2])["error"]
        assert "kernel exploded" in error["message"] and error["type"] == "server_error"
        assert loop.stats()["requests_in_flight"] == 0
        again = call(app, "/v1/chat/completions", {"model": "m", "messages": MESSAGES})  # the loop still serves
        assert again.status_code == 503 and "kernel exploded" in again.json()["error"]["message"]
    finally:
        loop.stop()


def test_hf_fallback_serves_a_model_without_an_adapter(scripted_model_dir):
    tok = AutoTokenizer.from_pretrained(scripted_model_dir)
    model = LlamaForCausalLM.from_pretrained(scripted_model_dir, dtype=torch.float32).eval()
    engine, label = make_serving_engine(model, tok, "hf", "fp32", max_num_seqs=4, max_model_len=256)
    assert "one request at a time" in label
    loop = EngineLoop(engine, max_waiting=4, label=label)
    loop.start()
    try:
        cfg = ServeConfig(model="m", max_model_len=256)
        app = create_app(Server(loop, tok, cfg))
        r = call(app, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "temperature": 0, "stop": " is"})
        msg = r.json()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == (REASONING, "The answer")
        streamed = call(app, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "temperature": 0, "stream": True})
        deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in streamed.text.splitlines()
                  if x.startswith("data: {")]
        assert "".join(d.get("content", "") for d in deltas) == CONTENT
        bad = call(app, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "logprobs": True, "top_logprobs": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"
    finally:
        loop.stop()


def test_r1_setting_prefills_think_and_folds_the_system_prompt(tokenizer):
    server = Server(None, tokenizer, ServeConfig(model="m", think=True))
    req = ChatCompletionRequest(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "2+2?"}])
    text = server.render_chat(req)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert "Be brief.\n\n2+2?" in text and text.count("<|im_start|>system") == 1  # only the template's default
    plain = Server(None, tokenizer, ServeConfig(model="m")).render_chat(req)
    assert plain.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nBe brief." in plain


def test_detokenizer_holds_back_a_split_utf8_character(tokenizer):
    ids = tokenizer("né 🙂 ok", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "né 🙂 ok" and all("\ufffd" not in p for p in pieces)


def test_logprob_bytes_are_each_tokens_own_bytes_when_a_token_splits_a_character(tokenizer):
    # SmolLM2's byte-level BPE spells "日" (e6 97 a5) as two tokens, e6 97 and a5: each decodes alone
    # to U+FFFD, whose UTF-8 (ef bf bd) is not the token's bytes.
    ids = tokenizer("日本 né 🙂", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    assert [token_bytes(tokenizer, i) for i in ids[:2]] == [[0xE6, 0x97], [0xA5]]
    assert b"".join(bytes(token_bytes(tokenizer, i)) for i in ids) == "日本 né 🙂".encode()
    assert token_bytes(tokenizer, tokenizer.eos_token_id) == list(tokenizer.eos_token.encode())
    choice = ChoiceState(0, tokenizer, False, [], True, logprobs=1)
    entry = choice.chat_logprobs([(ids[0], -0.5, [(ids[1], -1.0)])])["content"][0]
    assert entry["bytes"] == [0xE6, 0x97] and entry["top_logprobs"][0]["bytes"] == [0xA5]


def test_logprob_bytes_of_sentencepiece_byte_fallback_pieces():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<0xE6>": 1, "<0x97>": 2, "<0xA5>": 3, "\u2581": 4, "a": 5, "\u2581a": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a")], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ids = tok("a a日", add_special_tokens=False)["input_ids"]
    assert ids == [5, 6, 1, 2, 3]
    assert [token_bytes(tok, i) for i in ids] == [[0x61], [0x20, 0x61], [0xE6], [0x97], [0xA5]]


def test_deepseek_v3_is_served_through_its_own_engine(tmp_path):
    from r1kit.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from r1kit.models.loading import load_policy, save_pretrained_atomic
    from r1kit.models.v3_pretrain import char_tokenizer
    from r1kit.rollout.base import SamplingParams

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=22, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                           n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                           num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1)
    path = save_pretrained_atomic(DeepseekV3ForCausalLM(cfg).eval(), char_tokenizer(), tmp_path / "v3")
    model, tok = load_policy(str(path))
    engine, label = make_serving_engine(model, tok, "auto", "fp32", max_num_seqs=4, max_model_len=64)
    assert "V3SamplingEngine" in label
    expected = engine.engine.generate([tok("7+8=").input_ids], SamplingParams(max_tokens=6, temperature=0))[0]
    loop = EngineLoop(engine, max_waiting=4, label=label)
    loop.start()
    try:
        app = create_app(Server(loop, tok, ServeConfig(model="v3", max_model_len=64)))
        r = call(app, "/v1/completions", {"model": "v3", "prompt": "7+8=", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == tok.decode(expected.token_ids, skip_special_tokens=True)
        assert choice["finish_reason"] == expected.finish_reason and r.json()["usage"]["completion_tokens"] == len(expected.token_ids)
    finally:
        loop.stop()


def test_earlier_reasoning_is_not_fed_back_into_the_prompt(tokenizer):
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "SECRET-THOUGHT", "reasoning": "SECRET-THOUGHT"},
        {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}]}])
    text = Server(None, tokenizer, ServeConfig(model="m")).render_chat(req)
    assert "SECRET-THOUGHT" not in text and "<|im_start|>assistant\n4<|im_end|>" in text and "and 3+3?" in text


TOOL_TURN = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Let me compute."},
             {"role": "tool", "tool_call_id": "call_1", "content": "RESULT-4"}]


def test_developer_is_rendered_as_system(tokenizer):
    server = Server(None, tokenizer, ServeConfig(model="m"))
    as_developer = server.render_chat(ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]))
    as_system = server.render_chat(ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]))
    assert as_developer == as_system and "<|im_start|>system\nBe brief.<|im_end|>" in as_developer


def test_tool_messages_are_served_where_the_template_renders_them(tokenizer):
    """SmolLM2's template renders any role, so a tool result reaches the prompt and the request is served."""
    loop = EngineLoop(OneTokenEngine(tokenizer(" Hello", add_special_tokens=False)["input_ids"][0]), max_waiting=4)
    server = Server(loop, tokenizer, ServeConfig(model="m"))
    text = server.render_chat(ChatCompletionRequest(model="m", messages=TOOL_TURN))
    assert text.endswith("<|im_start|>tool\nRESULT-4<|im_end|>\n<|im_start|>assistant\n")
    loop.start()
    try:
        r = call(create_app(server), "/v1/chat/completions", {"model": "m", "messages": TOOL_TURN, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello", r.text
    finally:
        loop.stop()


@pytest.mark.parametrize("template, why", [
    # raises on any role but user/assistant/system, as many templates do (jinja raise_exception)
    ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
     "{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
     "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
     "refused the messages (unsupported role tool)"),
    # drops the messages it does not know without a word
    ("{% for m in messages %}{% if m['role'] in ['user', 'assistant', 'system'] %}"
     "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n",
     "leaves tool messages out (message 2)"),
])
def test_tool_messages_a_template_cannot_render_are_a_400_naming_the_role(embedded_dir, template, why):
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = template
    app = create_app(Server(EngineLoop(FailingEngine(0), max_waiting=4), tok, ServeConfig(model="m")))
    r = call(app, "/v1/chat/completions", {"model": "m", "messages": TOOL_TURN})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[2].role" and err["type"] == "invalid_request_error"
    assert why in err["message"] and "r1kit has no tool calling" in err["message"]
    plain = call(app, "/v1/chat/completions", {"model": "m", "messages": TOOL_TURN[:1] + [
        {"role": "developer", "content": "x"}], "max_tokens": 1})  # the same template, no tool message
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "messages[1].role"  # system after the turn


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "tool_call_id": "c", "content": "4"}], "messages[0].role"),  # a tool result answers a call
    (TOOL_TURN[:1] + [{"role": "tool", "tool_call_id": "c", "content": "4"}], "messages[1].role"),
    (TOOL_TURN[:2] + [{"role": "tool", "content": "4"}], "messages[2].tool_call_id"),
    (TOOL_TURN[:2] + [{"role": "tool", "tool_call_id": "c", "content": ""}], "messages[2].content"),
    (TOOL_TURN + [{"role": "assistant", "content": "4"}], "messages[3].role"),  # must end with user or tool
    ([{"role": "function", "content": "4"}], "messages[0].role"),  # roles OpenAI deprecated or never had
    ([{"role": "wizard", "content": "4"}], "messages[0].role"),
])
def test_bad_tool_and_unknown_roles_are_400s(tokenizer, messages, param):
    app = create_app(Server(EngineLoop(FailingEngine(0), max_waiting=4), tokenizer, ServeConfig(model="m")))
    r = call(app, "/v1/chat/completions", {"model": "m", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("stop, ok", [(["a", "b", "c", "d"], True), (["a", "b", "c", "d", "e"], False),
                                      ([], True), ("", False), (["x", ""], False)])
def test_stop_takes_at_most_4_non_empty_strings(tokenizer, stop, ok):
    """OpenAI allows up to 4 stop sequences; an empty one would end every completion before its first
    token (the stream's ``find("")`` is 0), so it is refused rather than answered with nothing."""
    loop = EngineLoop(OneTokenEngine(tokenizer(" Hello", add_special_tokens=False)["input_ids"][0]), max_waiting=4)
    loop.start()
    try:
        app = create_app(Server(loop, tokenizer, ServeConfig(model="m")))
        for path, prompt in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})):
            r = call(app, path, {"model": "m", **prompt, "stop": stop, "max_tokens": 1})
            if ok:
                assert r.status_code == 200, r.text
            else:
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    finally:
        loop.stop()


def post_raw(app, path: str, content: bytes) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.post(path, content=content, headers={"content-type": "application/json"})

    return asyncio.run(go())


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
     "messages[0].content"),  # valid JSON, not text: the tokenizer raised a TypeError (500) before
    ("/v1/completions", b'{"model": "m", "prompt": ["ok", "\\udc00"]}', "prompt[1]"),
    ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, "body"),  # RecursionError (500) before
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": True}).encode(), "max_tokens"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES, "n": "2"}).encode(), "n"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES, "stream": "yes"}).encode(), "stream"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}]}).encode(),
     "tools"),  # would change the output: refused, not ignored
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES,
                                         "response_format": {"type": "json_object"}}).encode(), "response_format"),
    ("/v1/completions", json.dumps({"model": "m", "prompt": ["a"] * 5}).encode(), "prompt"),  # over --max-queue 4
])
def test_bodies_a_lax_server_mishandled_are_400s_naming_the_field(tokenizer, path, body, param):
    app = create_app(Server(EngineLoop(FailingEngine(0), max_waiting=4), tokenizer, ServeConfig(model="m", max_queue=4)))
    r = post_raw(app, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_no_op_values_of_refused_fields_and_integer_floats_are_accepted(tokenizer):
    loop = EngineLoop(OneTokenEngine(tokenizer(" Hello", add_special_tokens=False)["input_ids"][0]), max_waiting=4)
    loop.start()
    try:
        app = create_app(Server(loop, tokenizer, ServeConfig(model="m")))
        r = call(app, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 1, "temperature": 1,
                                               "top_p": 1, "tools": [], "tool_choice": "none",
                                               "response_format": {"type": "text"}})
        assert r.status_code == 200, r.text
    finally:
        loop.stop()
