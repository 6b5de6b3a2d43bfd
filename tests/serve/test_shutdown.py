"""SIGTERM under concurrent streams, against a real ``r1kit serve`` process: in-flight streams finish
with every token, new requests get 503, /health says draining, the process exits 0; past
``--shutdown-timeout`` what is left ends with finish_reason "abort"."""

from __future__ import annotations

import signal
import threading

import httpx
import openai

from serve_helpers import LOOP_PROMPT, ServerProcess

LOOP = [" di", " do", " la"]


def stream_completion(client, max_tokens: int, started: threading.Event, out: dict) -> None:
    text, finish, usage = "", None, None
    for chunk in client.completions.create(model="tiny", prompt=LOOP_PROMPT, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        started.set()
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    out.update(text=text, finish=finish, usage=usage)


def start_streams(server, count: int, max_tokens: int):
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    started = [threading.Event() for _ in range(count)]
    outs = [{} for _ in range(count)]
    threads = [threading.Thread(target=stream_completion, args=(client, max_tokens, s, o)) for s, o in zip(started, outs)]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(60)
    return threads, outs


def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits(scripted_model_dir):
    server = ServerProcess(scripted_model_dir, "--shutdown-timeout", "60")
    try:
        threads, outs = start_streams(server, 3, 300)
        server.proc.send_signal(signal.SIGTERM)
        late = httpx.post(server.url + "/chat/completions", timeout=30,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        h = httpx.get(server.base + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["draining"] and h.json()["requests_in_flight"] >= 1
        for t in threads:
            t.join(120)
        expected = "".join(LOOP[i % 3] for i in range(300))
        for out in outs:
            assert (out["finish"], out["usage"].completion_tokens, out["text"]) == ("length", 300, expected)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_past_the_shutdown_timeout_streams_end_with_abort(scripted_model_dir):
    server = ServerProcess(scripted_model_dir, "--shutdown-timeout", "0")
    try:
        threads, outs = start_streams(server, 2, 2000)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        for out in outs:
            assert out["finish"] == "abort" and 0 < out["usage"].completion_tokens < 2000
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
