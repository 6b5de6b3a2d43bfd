"""End to end: ``r1kit serve RUN_DIR`` as a real uvicorn process on a free loopback port (one per module),
the scripted tiny Llama (tests/serve/serve_helpers.py) in the run's final/ behind it, driven by the
official ``openai`` client and, where exact status codes and bodies matter, by httpx."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from serve_helpers import CONTENT, LOOP_PROMPT, REASONING, REPLY, ServerProcess

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
REPLY_TOKENS = 18  # the 17 tokens of REPLY and <|im_end|>
REASONING_TOKENS = 11  # "<think>Two and two make four</think>"


@pytest.fixture(scope="module")
def server(scripted_run_dir):
    proc = ServerProcess(scripted_run_dir, "--max-num-seqs", "4", "--max-queue", "2", "--max-n", "4")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx.get(server.base + "/health", timeout=10).json()


def collect_chat_stream(stream) -> dict:
    """Per choice index: reasoning, content, finish_reason; plus ids, created and the usage chunk."""
    out = {"choices": {}, "ids": set(), "created": set(), "usage": None, "roles": [], "chunks": 0}
    for chunk in stream:
        out["chunks"] += 1
        out["ids"].add(chunk.id)
        out["created"].add(chunk.created)
        if not chunk.choices:
            out["usage"] = chunk.usage
            continue
        assert len(chunk.choices) == 1
        c = chunk.choices[0]
        got = out["choices"].setdefault(c.index, {"reasoning": "", "reasoning_content": "", "content": "",
                                                  "finish_reason": None, "logprobs": []})
        extra = c.delta.model_extra or {}
        if c.delta.role:
            out["roles"].append((c.index, c.delta.role))
        got["reasoning"] += extra.get("reasoning") or ""
        got["reasoning_content"] += extra.get("reasoning_content") or ""
        got["content"] += c.delta.content or ""
        if c.logprobs and c.logprobs.content:
            got["logprobs"] += c.logprobs.content
        if c.finish_reason:
            assert got["finish_reason"] is None
            got["finish_reason"] = c.finish_reason
    return out


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(server)
    assert h["status"] == "ok" and h["slots_total"] == 4 and "continuous batching" in h["engine"]


def test_chat_splits_reasoning_from_content(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0)
    msg = r.choices[0].message
    assert msg.content == CONTENT
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == REASONING
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.completion_tokens, r.usage.completion_tokens_details.reasoning_tokens) == (REPLY_TOKENS, REASONING_TOKENS)
    assert r.usage.total_tokens == r.usage.prompt_tokens + REPLY_TOKENS


def test_streamed_chat_equals_the_whole_reply(client):
    out = collect_chat_stream(client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len(out["ids"]) == 1 and len(out["created"]) == 1 and out["roles"] == [(0, "assistant")]
    got = out["choices"][0]
    assert got["reasoning"] == got["reasoning_content"] == REASONING and got["content"] == CONTENT
    assert got["finish_reason"] == "stop"
    assert out["usage"].completion_tokens == REPLY_TOKENS
    assert out["usage"].completion_tokens_details.reasoning_tokens == REASONING_TOKENS
    assert out["chunks"] >= 10  # token by token, not one buffered reply


def test_n2_streams_one_choice_per_chunk_with_its_index(client):
    out = collect_chat_stream(client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=1.0, seed=3, n=2, stream=True,
        stream_options={"include_usage": True}))
    assert sorted(out["choices"]) == [0, 1] and sorted(out["roles"]) == [(0, "assistant"), (1, "assistant")]
    for got in out["choices"].values():
        assert (got["reasoning"], got["content"], got["finish_reason"]) == (REASONING, CONTENT, "stop")
    assert out["usage"].completion_tokens == 2 * REPLY_TOKENS
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=1.0, seed=3, n=2)
    assert [c.message.content for c in again.choices] == [CONTENT, CONTENT]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_answer_not_the_reasoning(client, stream):
    def ask(stop, **extra):
        kw = dict(model="tiny", messages=MESSAGES, temperature=0, stop=stop, extra_body=extra)
        if not stream:
            c = client.chat.completions.create(**kw).choices[0]
            return c.message.model_extra["reasoning_content"], c.message.content, c.finish_reason
        got = collect_chat_stream(client.chat.completions.create(**kw, stream=True))["choices"][0]
        return got["reasoning_content"], got["content"] or None, got["finish_reason"]  # no content chunk = null

    assert ask([" make"]) == (REASONING, CONTENT, "stop")  # only inside the reasoning: ignored, EOS ends it
    assert ask(" an") == (REASONING, "The", "stop")  # in the reasoning (" and") and after it (" answer")
    assert ask(["4", " is"]) == (REASONING, "The answer", "stop")
    assert ask([" make"], stop_in_reasoning=True) == ("Two and two", None, "stop")  # the opt-in


def test_stop_string_counts_tokens_up_to_the_stop(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, stop=[" an"])
    assert r.usage.completion_tokens == 13  # ... "</think>", "The", " answer"


def test_logprobs_are_the_models_own(client, scripted_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == REPLY + "<|im_end|>"
    tok = AutoTokenizer.from_pretrained(scripted_model_dir)
    model = LlamaForCausalLM.from_pretrained(scripted_model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = tok(REPLY, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    ref = logp.gather(1, torch.tensor(reply)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), ref, atol=1e-4, rtol=1e-4)
    for e, row in zip(entries, logp):
        assert e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 2
        assert abs(e.top_logprobs[1].logprob - row.topk(2).values[1].item()) < 1e-3
    streamed = collect_chat_stream(client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, logprobs=True, stream=True))["choices"][0]["logprobs"]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_include_reasoning_false_drops_it(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                       extra_body={"include_reasoning": False})
    msg = r.choices[0].message
    assert msg.content == CONTENT and msg.model_extra["reasoning_content"] is None
    assert r.usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS


def test_max_tokens_spent_on_thinking_leaves_content_null(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_completion_tokens=6,
                                       max_tokens=100)  # max_completion_tokens wins
    c = r.choices[0]
    assert (c.finish_reason, c.message.content, c.message.model_extra["reasoning_content"]) == ("length", None, "Two and two")


def test_completions_return_raw_text(client):
    r = client.completions.create(model="tiny", prompt=LOOP_PROMPT, max_tokens=5, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (" di do la di do", "length", 5)
    assert len(client.completions.create(model="tiny", prompt=LOOP_PROMPT, temperature=0).choices[0].text.split()) == 16
    s = client.completions.create(model="tiny", prompt=LOOP_PROMPT, temperature=0, stop=" la", logprobs=1)
    assert s.choices[0].text == " di do" and s.choices[0].finish_reason == "stop"
    assert s.choices[0].logprobs.tokens[:2] == [" di", " do"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=LOOP_PROMPT, max_tokens=7, temperature=0, stream=True) if c.choices)
    assert streamed == " di do la di do la di"


BAD = [
    # (body, status, param)
    (b'{"model": "tiny", "messages": [', 400, "body"),
    (b"\xff\xfe{}", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages[1].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400, "messages[1].role"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": -0.5}, 400, "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e309}', 400, "temperature"),
    ({"model": "tiny", "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "la " * 3000}]}, 400, "messages"),
    ({"model": "tiny", "messages": MESSAGES, "n": 0}, 400, "n"),
    ({"model": "tiny", "messages": MESSAGES, "n": 5}, 400, "n"),
    ({"model": "tiny", "messages": MESSAGES, "n": "two"}, 400, "n"),
    ({"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": MESSAGES, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "messages": MESSAGES, "stop": 3}, 400, "stop"),
    ({"model": "tiny", "messages": MESSAGES, "stream": "maybe"}, 400, "stream"),
    ({"model": "tiny", "messages": MESSAGES, "seed": 2**64}, 400, "seed"),
    ({"model": "tiny", "messages": MESSAGES, "logit_bias": {"42": 5}}, 400, "logit_bias"),
    ({"model": "tiny", "messages": MESSAGES, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "tiny", "messages": MESSAGES, "frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"model": "tiny", "messages": MESSAGES, "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "messages": MESSAGES, "seed": -(2**63) - 1}, 400, "seed"),
    ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_input_is_an_openai_error_naming_the_field(server, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"], err


def test_bad_completions_input_and_unknown_routes(server, client):
    post = lambda body: httpx.post(server.url + "/completions", json=body, timeout=30)  # noqa: E731
    for body, param in [({"model": "tiny", "prompt": ""}, "prompt"), ({"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
                        ({"model": "tiny", "prompt": ["a", "b"], "stream": True}, "prompt"),
                        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
                        ({"model": "tiny", "prompt": "x", "seed": 2**64}, "seed"),
                        ({"model": "tiny", "prompt": "x", "suffix": "end"}, "suffix")]:
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.get(server.url + "/nowhere", timeout=10).status_code == 404
    assert "error" in httpx.get(server.url + "/nowhere", timeout=10).json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0).choices[0].message.content == CONTENT


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(server)
        if h["slots_in_use"] == 0 and h["requests_in_flight"] == 0:
            return h
        time.sleep(0.01)
    raise AssertionError(f"server not idle: {h}")


def test_disconnect_mid_stream_frees_the_slot(server):
    before = wait_idle(server)
    body = {"model": "tiny", "prompt": LOOP_PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert health(server)["slots_in_use"] == 1
        closed = time.monotonic()
    after = wait_idle(server)
    assert time.monotonic() - closed < 3.0
    assert after["aborted_total"] == before["aborted_total"] + 1
    assert after["steps"] - before["steps"] < 1900  # it did not run to max_tokens


def test_disconnect_before_a_json_reply_frees_the_slot_too(server):
    before = wait_idle(server)
    body = {"model": "tiny", "prompt": LOOP_PROMPT, "max_tokens": 1900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    after = wait_idle(server)
    assert after["aborted_total"] == before["aborted_total"] + 1
    assert after["steps"] - before["steps"] < 1900


def test_full_queue_answers_503_and_the_server_recovers(server, client):
    wait_idle(server)
    body = {"model": "tiny", "prompt": LOOP_PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        streams = [http.stream("POST", server.url + "/completions", json=body) for _ in range(6)]  # 4 slots + 2 queued
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * 6
            assert health(server)["sequences_in_flight"] == 6
            full = http.post(server.url + "/chat/completions", json={"model": "tiny", "messages": MESSAGES})
            assert full.status_code == 503 and "full" in full.json()["error"]["message"]
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="tiny", messages=MESSAGES)
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    wait_idle(server)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0).choices[0].message.content == CONTENT


def test_unimplemented_sampling_fields_at_their_no_op_values_are_accepted(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "logit_bias": {}, "presence_penalty": 0,
            "frequency_penalty": 0.0, "best_of": 1, "user": "someone"}
    r = httpx.post(server.url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
