"""The OpenAI request and response models of ``r1kit serve`` (pydantic), and the error shape.

Requests: ``POST /v1/chat/completions`` (``ChatCompletionRequest``) and ``POST /v1/completions``
(``CompletionRequest``), the fields of SERVE_SPEC §1. Fields that do not change the output
(``user``, ``metadata``, ...) are ignored, as vLLM does; OpenAI sampling fields this server does
not implement (``logit_bias``, ``presence_penalty``, ``frequency_penalty``, ``best_of``, ``suffix``)
are a 400 naming the field when set to anything but their no-op default, rather than silently
giving other output than asked for; a known field of the wrong type or out of range is a
``RequestError`` (400) whose ``param`` names it (``messages[1].role``, ``top_p``).

Responses follow OpenAI's shapes with both reasoning field names (``reasoning_content``: DeepSeek,
SGLang, llama.cpp; ``reasoning``: vLLM, Ollama), SERVE_SPEC §2.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1kit.errors import R1kitError

TOP_LOGPROBS_MAX = 20  # OpenAI's limit for chat top_logprobs
STOP_MAX = 4  # OpenAI's limit: "up to 4 sequences where the API will stop generating further tokens"
COMPLETION_LOGPROBS_MAX = 5  # OpenAI's limit for the legacy completions logprobs


class RequestError(R1kitError):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body.

    Args:
        message: what is wrong and how to fix it.
        param: the request field at fault (``messages[0].content``), or None.
        status: 400 bad request, 404 unknown model, 503 full or shutting down.
    """

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.TYPES.get(self.status, "invalid_request_error"), self.param,
                          self.code or self.status)


def error_body(message: str, type_: str, param: str | None = None, code: int | str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Fields(BaseModel):
    """Request objects: fields this server does not use are ignored (vLLM's behaviour)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(Fields):
    include_usage: bool = False


class TextPart(Fields):
    type: Literal["text"]
    text: str


class ChatMessage(Fields):
    """One message. ``reasoning_content``/``reasoning`` of earlier assistant turns are accepted and not
    fed back into the prompt (the DeepSeek API rule). ``developer`` is OpenAI's newer name for
    ``system`` and is rendered as one. ``tool`` (a tool's result, with ``tool_call_id``) is accepted
    only where the model's chat template renders it (``Server.render_chat``): r1kit has no tool calling
    of its own, and an assistant message's ``tool_calls`` are ignored."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class SamplingRequest(Fields):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1 = off (vLLM spells off as -1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM takes it
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI sampling fields not implemented here: refused unless at their no-op value (check).
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check(self, max_n: int) -> None:
        """Cross-field rules; raises RequestError naming the field."""
        if self.n > max_n:
            raise RequestError(f"n must be at most {max_n} on this server, got {self.n}", "n")
        stops = self.stop_list()
        if len(stops) > STOP_MAX:
            raise RequestError(f"stop takes at most {STOP_MAX} strings (OpenAI's limit), got {len(stops)}", "stop")
        if "" in stops:
            raise RequestError(f"stop string {stops.index('')} is empty: an empty string would end every completion "
                               "before its first token; leave it out", "stop")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        for name, value, no_op in (("logit_bias", self.logit_bias, not self.logit_bias),
                                   ("presence_penalty", self.presence_penalty, not self.presence_penalty),
                                   ("frequency_penalty", self.frequency_penalty, not self.frequency_penalty),
                                   ("best_of", self.best_of, self.best_of in (None, 1, self.n))):
            if not no_op:
                raise RequestError(f"{name} is not supported by this server (got {value!r}); leave it out", name)


# Conversation order (system/developer messages only before it): the roles that may follow each role.
NEXT_ROLES = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"),
              "tool": ("tool", "assistant", "user")}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    # Refused unless at their no-op value (check): no tool calling, no constrained decoding.
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    include_reasoning: bool = True
    stop_in_reasoning: bool = False  # r1kit extension: stop strings end the reasoning too

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        for name, value, no_op in (("tools", self.tools, not self.tools),
                                   ("tool_choice", self.tool_choice, self.tool_choice in (None, "none")),
                                   ("response_format", self.response_format,
                                    self.response_format in (None, {"type": "text"}))):
            if not no_op:  # they would change the output: r1kit has no tool calling or constrained decoding
                raise RequestError(f"{name} is not supported by this server (got {value!r}); leave it out", name)
        previous = None  # the role of the last conversation message (system/developer ones excluded)
        for i, m in enumerate(self.messages):
            if m.role in ("system", "developer"):
                if previous is not None:
                    raise RequestError(f"a {m.role} message must come before the conversation, found at {i}",
                                       f"messages[{i}].role")
                continue
            expected = NEXT_ROLES[previous]
            if m.role not in expected:
                raise RequestError(f"messages must alternate user and assistant turns, starting with user (tool "
                                   f"results follow an assistant turn); message {i} is {m.role!r} where "
                                   f"{' or '.join(map(repr, expected))} was expected", f"messages[{i}].role")
            if m.role in ("user", "tool") and not m.text():
                raise RequestError(f"message {i} ({m.role}) has no content", f"messages[{i}].content")
            if m.role == "tool" and not m.tool_call_id:
                raise RequestError(f"message {i} (tool) has no tool_call_id: a tool message answers the tool call "
                                   "of that id", f"messages[{i}].tool_call_id")
            previous = m.role
        if previous not in ("user", "tool"):
            raise RequestError("the last message must be a user (or tool) message",
                               f"messages[{len(self.messages) - 1}].role")

    def completion_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens (the former wins: OpenAI deprecated the latter)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, gt=0)  # OpenAI's legacy default
    logprobs: int | None = Field(None, ge=0, le=COMPLETION_LOGPROBS_MAX)
    echo: bool = False
    suffix: str | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.echo:
            raise RequestError("echo is not supported", "echo")
        if self.suffix:
            raise RequestError("suffix is not supported by this server; leave it out", "suffix")
        prompts = self.prompts()
        if not prompts:
            raise RequestError("prompt is empty", "prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise RequestError(f"prompt {i} is empty", "prompt")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def param_of(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI's ``param``: ``("messages", 0, "role")`` → ``messages[0].role``.
    Union member tags pydantic adds (``str``, ``list[str]``) are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part or "(" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def _lone_surrogate(value, path: str = "") -> str | None:
    """The field path (``messages[0].content``) of the first string in ``value`` holding a lone
    surrogate code point, "" for the top level, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found is not None:
            return found
    return None


def parse_request(raw: bytes, model: type[SamplingRequest]) -> SamplingRequest:
    """Decode, parse and validate a request body. Raises RequestError (400) naming the field for a
    body that is not UTF-8, not JSON, not an object, or a field of the wrong type or out of range."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 (byte {e.start}): send JSON in UTF-8", "body") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           "body") from None
    except RecursionError:
        raise RequestError("the request body nests JSON too deeply", "body") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", "body")
    where = _lone_surrogate(data)
    if where is not None:  # valid JSON (\ud800), but no tokenizer can encode it
        raise RequestError(f"{where or 'body'}: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                           "which is not text: send valid Unicode", where)
    try:
        # Strict, as OpenAI: true is not an integer, "2" is not n, "yes" is not stream (JSON mode: 1 is a float).
        return model.model_validate_json(text, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        param = param_of(tuple(first["loc"]))
        raise RequestError(f"{param or 'body'}: {first['msg']}", param) from None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: dict | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None
    reasoning_content: str | None
    reasoning: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None
    finish_reason: str


class _Response(BaseModel):
    """The envelope both endpoints answer with (OpenAI: id, object, created, model, choices, usage)."""

    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletionResponse(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str


class CompletionResponse(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]
