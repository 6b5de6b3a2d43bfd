"""``r1kit serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over r1kit's engine.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``
(the engine's slots, queue and counters). The contract (the project's serving spec, after vLLM's and SGLang's servers):

- Chat prompts are rendered with the model's chat template; with ``think`` (the R1 setting) the
  assistant turn is prefilled with ``<think>\\n`` and system messages are folded into the first user
  turn (R1's usage notes: no system prompt). The reasoning split of every choice is
  ``split_reasoning`` (``reasoning_content`` and ``reasoning`` both), streamed by ``ReasoningStream``;
  client ``stop`` strings end the content only; ``/v1/completions`` returns raw text (no split).
  ``stop_in_reasoning: true`` (an r1kit extension) makes them end the reasoning too.
- ``max_tokens`` counts reasoning tokens; unset, it is the rest of ``max_model_len`` (vLLM); a prompt
  that leaves no room, or prompt + max_tokens over ``max_model_len``, is a 400 naming both counts.
- Logprobs are the engine's sampling logprobs, ``log_softmax(logits / T)`` (T = 1 when greedy), for
  every generated token, reasoning included; ``top_logprobs`` come from the same distribution.
- Errors: ``{"error": {...}}``; 400 for bad requests (never FastAPI's 422) with ``param``; 404 for an
  unknown model or route; 503 when the queue is full or the server is draining; after a stream has
  started, an error is sent in-band (``data: {"error": ...}`` then ``data: [DONE]``).
- A client that disconnects mid-stream aborts its request; the slot is free before the next decode.
- SIGTERM (or Ctrl-C): stop admitting (503), let requests in flight finish for up to
  ``shutdown_timeout`` seconds, abort the rest (finish_reason "abort"), exit 0. A second signal exits
  at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.convert_slow_tokenizer import bytes_to_unicode

from r1kit.data.reasoning import reasoning_span
from r1kit.errors import R1kitError
from r1kit.rollout.base import SamplingParams
from r1kit.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    RequestError,
    Usage,
    error_body,
    parse_request,
)
from r1kit.serve.reasoning import ReasoningStream
from r1kit.serve.runner import EngineLoop, RequestHandle

THINK_PREFILL = "<think>\n"
BYTE_LEVEL_DECODER = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2 byte-level alphabet
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def _decoder_types(node) -> set[str]:
    """The ``type`` of a tokenizers decoder and of every decoder nested in it (its JSON form)."""
    if isinstance(node, dict):
        return {node.get("type")} | set().union(*(_decoder_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_decoder_types(v) for v in node))
    return set()


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The raw bytes of token ``token_id`` alone: the OpenAI logprobs ``bytes`` field.

    A token may hold part of a multi-byte UTF-8 character (byte-level BPE splits "日" = e6 97 a5
    into two tokens), so the bytes come from the token's vocabulary piece, not from decoding it to
    text (which yields U+FFFD): a byte-level piece maps back through the GPT-2 byte alphabet, a
    SentencePiece ``<0xNN>`` piece is that byte, and "▁" is a space. Added and special tokens, and
    tokenizers without such a decoder, give the UTF-8 of their decoded text. Concatenating the
    bytes of a completion's tokens gives the completion's UTF-8 bytes.
    """
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if piece is None or decoder is None or token_id in getattr(tokenizer, "added_tokens_decoder", {}):
        return list(tokenizer.decode([token_id]).encode("utf-8"))
    types = _decoder_types(json.loads(decoder.__getstate__()))
    if "ByteLevel" in types and all(c in BYTE_LEVEL_DECODER for c in piece):
        return [BYTE_LEVEL_DECODER[c] for c in piece]
    if "ByteFallback" in types and (m := BYTE_FALLBACK.fullmatch(piece)):
        return [int(m.group(1), 16)]
    if types & {"Metaspace", "Replace"}:
        return list(piece.replace("\u2581", " ").encode("utf-8"))
    return list(tokenizer.decode([token_id]).encode("utf-8"))


@dataclass
class ServeConfig:
    """Settings of ``r1kit serve`` (each is a ``--flag``)."""

    model: str  # HF dir, .gguf, r1kit run dir, or the embedded alias (load_policy)
    served_model_name: str | None = None  # the "model" clients send (default: MODEL as given)
    host: str = "127.0.0.1"  # interface to bind (loopback only by default)
    port: int = 8000  # TCP port (0 = any free one)
    max_num_seqs: int = 32  # engine slots: sequences decoded together
    max_model_len: int = 2048  # prompt + completion tokens per sequence (sizes the KV cache)
    max_num_batched_tokens: int = 512  # tokens per engine step, decodes included (chunked prefill); 0 = whole prompts
    max_queue: int = 64  # sequences that may wait for a slot; beyond that 503
    max_n: int = 8  # the largest n a request may ask for
    think: bool = False  # R1 setting: prefill "<think>\n", fold system messages into the user turn
    shutdown_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    dtype: str = "auto"  # engine weights: auto (bf16 where native), bf16, fp32
    backend: str = "auto"  # auto (r1kit engine when the model has an adapter, else hf), engine, hf


class Detokenizer:
    """Token ids → text deltas for one choice; holds back bytes of an incomplete UTF-8 character
    (decodes a short window of recent tokens, as TGI/vLLM do). Special tokens are skipped."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.text += now[len(before) :]
        return now[len(before) :]

    def flush(self) -> str:
        full = self._decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta


class ChoiceState:
    """One choice of a request: detokenizer, reasoning/stop stream, logprobs, token counts.

    Args:
        index: the choice index.
        tokenizer: the model's tokenizer.
        think_in_prompt: the prompt ends inside ``<think>``.
        stop: client stop strings (content only).
        split: split reasoning from content (chat); False = raw text (completions).
        logprobs: None = no logprobs, else how many top alternatives per token.
        stop_in_reasoning: the stop strings also end the reasoning.
    """

    def __init__(self, index: int, tokenizer, think_in_prompt: bool, stop: list[str], split: bool,
                 logprobs: int | None, stop_in_reasoning: bool = False) -> None:
        self.index, self.tokenizer, self.split = index, tokenizer, split
        self.think_in_prompt = think_in_prompt
        self.detok = Detokenizer(tokenizer)
        self.stream = ReasoningStream(think_in_prompt, stop, split, stop_in_reasoning)
        self.want_logprobs = logprobs
        self.pending_logprobs: list[tuple[int, float, list | None]] = []
        self.offsets: list[tuple[int, int]] = []  # char range of each counted token's text
        self.finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        """Completion tokens: up to the one that completed a stop string, if any."""
        return len(self.offsets)

    def add(self, delta) -> tuple[str, str]:
        """Consume one engine delta; returns (reasoning, content) text to send. Sets ``finish_reason``
        when the choice ends (the engine finished it, or a stop string ended the content)."""
        reasoning = content = ""
        tops = delta.top_logprobs or [None] * len(delta.token_ids)
        for token, lp, top in zip(delta.token_ids, delta.logprobs, tops):
            start = len(self.detok.text)
            r, c = self.stream.feed(self.detok.push(token))
            reasoning, content = reasoning + r, content + c
            self.offsets.append((start, len(self.detok.text)))
            if self.want_logprobs is not None:
                self.pending_logprobs.append((token, lp, top))
            if self.stream.stopped:
                self.finish_reason = "stop"
                break
        if self.finish_reason is None and delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            r, c = self.stream.feed(self.detok.flush())
            reasoning, content = reasoning + r, content + c
            if self.stream.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is not None:
            r, c = self.stream.finish()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def take_logprobs(self) -> list:
        """The logprob entries not sent yet (they go with the next chunk that carries text)."""
        taken, self.pending_logprobs = self.pending_logprobs, []
        return taken

    def reasoning_tokens(self) -> int:
        """Generated tokens whose text lies in the reasoning block (tags included)."""
        span = None if not self.split else reasoning_span(self.stream.text, self.think_in_prompt)
        if span is None:
            return 0
        end = len(self.stream.text) if span.end is None else span.end
        return sum(1 for s, e in self.offsets if e > s and s < end and e > span.start)

    def chat_logprobs(self, entries: list) -> dict | None:
        if self.want_logprobs is None:
            return None
        return {"content": [self._entry(t, lp, top) for t, lp, top in entries]}

    def _entry(self, token: int, lp: float, top) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": token_bytes(self.tokenizer, token),
                "top_logprobs": [{"token": self.tokenizer.decode([i]), "logprob": v,
                                  "bytes": token_bytes(self.tokenizer, i)} for i, v in (top or [])[: self.want_logprobs]]}

    def completion_logprobs(self, entries: list, offset: int) -> dict | None:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        if self.want_logprobs is None:
            return None
        tokens, offsets = [], []
        for t, _, _ in entries:
            tokens.append(self.tokenizer.decode([t]))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.tokenizer.decode([i]): v for i, v in (top or [])[: self.want_logprobs]}
                                 if self.want_logprobs else None for _, _, top in entries],
                "text_offset": offsets}


@dataclass
class Prepared:
    """A validated request ready for the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    think_in_prompt: bool
    stop: list[str]
    logprobs: int | None  # None = off, else top alternatives per token
    stream: bool
    include_usage: bool
    stop_in_reasoning: bool = False


class Server:
    """The app's state: the engine loop, tokenizer and settings; routes are in ``create_app``."""

    def __init__(self, loop: EngineLoop, tokenizer, cfg: ServeConfig) -> None:
        self.loop, self.tokenizer, self.cfg = loop, tokenizer, cfg
        self.model_name = cfg.served_model_name or cfg.model
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(f"model {name!r} is not served here; this server serves {self.model_name!r}",
                               "model", status=404, code="model_not_found")

    def render_chat(self, req: ChatCompletionRequest) -> str:
        """The chat prompt text (template from the tokenizer; R1 prefill with ``think``). ``developer``
        messages render as ``system``; ``tool`` messages (with their ``tool_call_id``) only where the
        template renders them: a template that raises on them or leaves their content out is a 400
        naming the first one's ``messages[i].role``."""
        messages = []
        for m in req.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role == "tool":
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        if self.cfg.think:
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            messages = [m for m in messages if m["role"] != "system"]
            if system:
                messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", "messages")
        tools = [i for i, m in enumerate(req.messages) if m.role == "tool"]
        no_tools = ("this model's chat template {}; r1kit has no tool calling of its own: send the tool's result "
                    "in a user message instead")
        marks = iter(f"r1kit-tool-message-{i}" for i in tools)  # the tool messages keep their order
        marked = [dict(m, content=next(marks)) if m["role"] == "tool" else m for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # does each tool message reach the prompt? Rendered once more with a marker as its content
            probe = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True) if tools else ""
        except Exception as e:  # noqa: BLE001 - a template that refuses the messages (jinja raise_exception)
            if tools:
                raise RequestError(no_tools.format(f"refused the messages ({e})"), f"messages[{tools[0]}].role") from None
            raise RequestError(f"the chat template refused the messages: {e}", "messages") from None
        for i in tools:
            if f"r1kit-tool-message-{i}" not in probe:
                raise RequestError(no_tools.format(f"leaves tool messages out (message {i})"), f"messages[{i}].role")
        if self.cfg.think and not text.endswith(THINK_PREFILL):
            text += THINK_PREFILL
        return text

    def prepare(self, req, prompt_text: str | None, prompt_field: str) -> Prepared:
        from r1kit.data.templates import encode_prompt

        ids = encode_prompt(prompt_text, self.tokenizer)
        limit = self.cfg.max_model_len
        if len(ids) >= limit:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server's context (max_model_len) is "
                               f"{limit}, which leaves no room for a completion: shorten it", prompt_field)
        chat = isinstance(req, ChatCompletionRequest)
        wanted = req.completion_limit() if chat else req.max_tokens
        field_name = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
        if wanted is not None and len(ids) + wanted > limit:
            raise RequestError(f"the prompt has {len(ids)} tokens and {field_name} is {wanted}: together "
                               f"{len(ids) + wanted}, over this server's context of {limit} tokens", field_name)
        params = SamplingParams(max_tokens=wanted or limit - len(ids), temperature=req.temperature, top_p=req.top_p,
                                top_k=max(req.top_k, 0), n=req.n, seed=req.seed)
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        self.loop.check(ids, params, logprobs or 0, prompt_field)
        think_in_prompt = chat and prompt_text.rfind("<think>") > prompt_text.rfind("</think>")
        return Prepared(ids, params, think_in_prompt, req.stop_list(), logprobs, req.stream,
                        bool(req.stream_options and req.stream_options.include_usage),
                        chat and req.stop_in_reasoning)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_of(prompt_tokens: int, choices: list[ChoiceState], reasoning: bool) -> dict:
    completion = sum(c.tokens for c in choices)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
                  completion_tokens_details={"reasoning_tokens": sum(c.reasoning_tokens() for c in choices)}
                  if reasoning else None)
    return usage.model_dump(exclude_none=True)


async def events(server: Server, handle: RequestHandle, choices: list[ChoiceState]):
    """Yield (choice, reasoning delta, content delta, logprob entries) as the engine produces them;
    stops a choice in the engine as soon as a stop string ends it. Raises the engine's error."""
    open_choices = {c.index for c in choices}
    while open_choices:
        item = await handle.events.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        for delta in item:
            choice = choices[delta.index]
            if delta.index not in open_choices:
                continue
            reasoning, content = choice.add(delta)
            if choice.finish_reason is not None:
                open_choices.discard(delta.index)
                if delta.finish_reason is None:  # ended by a stop string: free its slot now
                    server.loop.abort(handle, delta.index)
            yield choice, reasoning, content


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving ``server``."""
    app = FastAPI(title="r1kit serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": str(e)}
        return JSONResponse(error_body(str(first["msg"]), "invalid_request_error", None, 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                                       None, e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error", None, 500),
                            status_code=500)

    @app.get("/health")
    async def health():
        stats = server.loop.stats()
        return JSONResponse({"status": "draining" if stats["draining"] else "ok", **stats},
                            status_code=503 if stats["draining"] else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "r1kit", "max_model_len": server.cfg.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await request.body(), ChatCompletionRequest)
        server.check_model(req.model)
        req.check(server.cfg.max_n)
        prep = server.prepare(req, server.render_chat(req), "messages")
        return await run(server, prep, request, chat=True, include_reasoning=req.include_reasoning)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await request.body(), CompletionRequest)
        server.check_model(req.model)
        req.check(server.cfg.max_n)
        prompts, most = req.prompts(), max(1, server.cfg.max_queue)  # a request's prompts run one after another
        if len(prompts) > most:
            raise RequestError(f"at most {most} prompts per request on this server (--max-queue), got "
                               f"{len(prompts)}: send them in several requests", "prompt")
        preps = [server.prepare(req, p, "prompt") for p in prompts]
        if len(preps) > 1 and req.stream:
            raise RequestError("streaming takes one prompt; send the prompts as separate requests", "prompt")
        if len(preps) > 1:
            outs = [json.loads((await run(server, p, request, chat=False)).body) for p in preps]
            merged = outs[0]
            merged["choices"] = [dict(c, index=i) for i, c in enumerate(c for o in outs for c in o["choices"])]
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                merged["usage"][key] = sum(o["usage"][key] for o in outs)
            return JSONResponse(merged)
        return await run(server, preps[0], request, chat=False)

    return app


async def until_disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read: only the disconnect
    message is left to receive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run(server: Server, prep: Prepared, request: Request, chat: bool, include_reasoning: bool = True):
    """Submit ``prep`` and answer it: a JSON response, or an SSE stream. A client that disconnects
    before a JSON response is ready aborts the request, like a stream's."""
    handle = server.loop.submit(prep.prompt_ids, prep.params, prep.logprobs or 0)
    choices = [ChoiceState(j, server.tokenizer, prep.think_in_prompt, prep.stop, chat, prep.logprobs,
                           prep.stop_in_reasoning) for j in range(prep.params.n)]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if prep.stream:
        return StreamingResponse(stream(server, handle, choices, prep, rid, created, chat, include_reasoning),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async def collect() -> None:
        async for _ in events(server, handle, choices):
            pass

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: nobody will read the answer
            work.cancel()
            return JSONResponse(error_body("the client disconnected", "invalid_request_error", None, 499),
                                status_code=499)
        work.result()
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - the engine failed this request
        raise RequestError(f"the engine failed: {type(e).__name__}: {e}", status=503) from None
    finally:
        gone.cancel()
        if any(c.finish_reason is None for c in choices):
            server.loop.abort(handle)
    usage = usage_of(len(prep.prompt_ids), choices, chat)
    if chat:
        out = []
        for c in choices:
            split = c.stream.result
            reasoning = split.reasoning if include_reasoning else None
            out.append(ChatChoice(index=c.index, message=ChatMessageOut(content=split.content, reasoning_content=reasoning,
                                                                       reasoning=reasoning),
                                  logprobs=c.chat_logprobs(c.take_logprobs()), finish_reason=c.finish_reason))
        body = ChatCompletionResponse(id=rid, created=created, model=server.model_name, choices=out, usage=usage)
    else:
        out = [CompletionChoice(index=c.index, text=c.stream.result.content or "", logprobs=c.completion_logprobs(c.take_logprobs(), 0),
                                finish_reason=c.finish_reason) for c in choices]
        body = CompletionResponse(id=rid, created=created, model=server.model_name, choices=out, usage=usage)
    return JSONResponse(body.model_dump())


async def stream(server: Server, handle: RequestHandle, choices: list[ChoiceState], prep: Prepared, rid: str,
                 created: int, chat: bool, include_reasoning: bool):
    """The SSE body: per choice a role chunk, text deltas, a finish chunk; usage; ``[DONE]``.
    Closing the connection aborts the request (the generator is closed or cancelled)."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict) -> str:
        return sse({"id": rid, "object": kind, "created": created, "model": server.model_name, "choices": [choice]})

    sent = [0] * len(choices)  # completions: characters sent per choice (text_offset)
    try:
        if chat:
            for c in choices:
                yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        try:
            async for c, reasoning, content in events(server, handle, choices):
                if not include_reasoning:
                    reasoning = ""
                if reasoning or content or c.finish_reason is not None:
                    entries = c.take_logprobs()
                    if chat:
                        delta = {}
                        if reasoning:
                            delta.update(reasoning_content=reasoning, reasoning=reasoning)
                        if content:
                            delta["content"] = content
                        if delta:
                            yield chunk({"index": c.index, "delta": delta, "logprobs": c.chat_logprobs(entries),
                                         "finish_reason": None})
                            entries = []
                        if c.finish_reason is not None:
                            yield chunk({"index": c.index, "delta": {}, "logprobs": c.chat_logprobs(entries) if entries else None,
                                         "finish_reason": c.finish_reason})
                    else:
                        yield chunk({"index": c.index, "text": content,
                                     "logprobs": c.completion_logprobs(entries, sent[c.index]),
                                     "finish_reason": c.finish_reason})
                        sent[c.index] += len(content)
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(error_body(f"the engine failed: {type(e).__name__}: {e}", "server_error", None, 500))
            yield "data: [DONE]\n\n"
            return
        if prep.include_usage:
            yield sse({"id": rid, "object": kind, "created": created, "model": server.model_name, "choices": [],
                       "usage": usage_of(len(prep.prompt_ids), choices, chat)})
        yield "data: [DONE]\n\n"
    finally:
        if any(c.finish_reason is None for c in choices):  # the client went away
            server.loop.abort(handle)


class DrainingServer:
    """uvicorn, with SIGTERM/SIGINT draining the engine loop before it stops (module docstring)."""

    def __init__(self, app: FastAPI, loop: EngineLoop, cfg: ServeConfig, on_ready=None) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # noqa: ARG002 - uvicorn's signature
                outer.on_signal()

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if on_ready is not None:
                    on_ready(self)

        self.loop, self.cfg = loop, cfg
        self.server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                             timeout_graceful_shutdown=5))
        self.signalled = False

    def on_signal(self) -> None:
        if self.signalled:  # the second signal: stop now
            self.server.should_exit = self.server.force_exit = True
            return
        self.signalled = True
        self.loop.start_draining()
        threading.Thread(target=self._drain, name="r1kit-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        while self.loop.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.loop.in_flight():
            self.loop.abort_all()
            time.sleep(0.2)
        self.server.should_exit = True

    def run(self) -> None:
        self.server.run()
        self.loop.stop()


def check_port_free(host: str, port: int) -> None:
    """Raise R1kitError naming ``--port`` when ``host:port`` cannot be bound (in use, or no such
    interface), before the model loads; port 0 (a free one) always passes. Binds as uvicorn does
    (SO_REUSEADDR), so a port in TIME_WAIT passes."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise R1kitError(f"--host {host!r} does not resolve ({e}); pass an address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise R1kitError(f"--port {port} on {host} cannot be bound ({e.strerror}): another server holds it; "
                             "pass another --port, or --port 0 for a free one") from None


def serve(cfg: ServeConfig) -> None:
    """Load ``cfg.model``, start the engine thread and serve until SIGTERM. Raises R1kitError for a
    model that does not load or an engine that cannot be built (KV cache over budget, ...), and
    ConfigError before the model loads for a --backend or --dtype ``check_serving_choices`` refuses."""
    from r1kit.models.loading import load_policy
    from r1kit.serve.runner import check_serving_choices, make_serving_engine

    check_serving_choices(cfg.backend, cfg.dtype)
    for name in ("max_num_seqs", "max_model_len", "max_n"):
        if getattr(cfg, name) < 1:
            raise R1kitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_queue < 0 or not cfg.shutdown_timeout >= 0 or cfg.shutdown_timeout == float("inf"):
        raise R1kitError(f"--max-queue and --shutdown-timeout must be finite and >= 0, got {cfg.max_queue} and "
                         f"{cfg.shutdown_timeout}")
    if not 0 <= cfg.port <= 65535:
        raise R1kitError(f"--port must be in 0..65535 (0 = any free port), got {cfg.port}")
    check_port_free(cfg.host, cfg.port)
    if cfg.max_num_batched_tokens != 0 and not cfg.max_num_seqs <= cfg.max_num_batched_tokens:
        raise R1kitError(f"--max-num-batched-tokens must be 0 (whole prompts) or >= --max-num-seqs "
                         f"({cfg.max_num_seqs}) so a step can decode every slot and still prefill, "
                         f"got {cfg.max_num_batched_tokens}")
    model, tokenizer = load_policy(cfg.model)
    context = getattr(model.config, "max_position_embeddings", None) or cfg.max_model_len
    cfg.max_model_len = min(cfg.max_model_len, context)
    engine, label = make_serving_engine(model, tokenizer, cfg.backend, cfg.dtype, cfg.max_num_seqs, cfg.max_model_len,
                                        cfg.max_num_batched_tokens or None)
    loop = EngineLoop(engine, cfg.max_queue, label)
    loop.start()
    server = Server(loop, tokenizer, cfg)

    def ready(uv) -> None:
        port = uv.servers[0].sockets[0].getsockname()[1] if uv.servers else cfg.port
        print(f"r1kit serve: {server.model_name} on http://{cfg.host}:{port}/v1 ({label}, max_model_len "
              f"{cfg.max_model_len})", flush=True)

    DrainingServer(create_app(server), loop, cfg, on_ready=ready).run()
    print("r1kit serve: stopped", flush=True)
