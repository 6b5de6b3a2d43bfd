"""The engine thread of ``r1kit serve``: one loop drives the engine's request API, off the event loop.

HTTP handlers (on the asyncio loop) ``submit`` requests and ``abort`` them; the thread applies those
between engine steps (so a new request joins the running batch at the next step and an abort frees
its slot before the next decode) and hands each step's token deltas to the request's asyncio queue.
A model loop on the event loop would starve ``/health`` and serialize requests (SERVE_SPEC §5).

The queue is bounded: sequences waiting or decoding are at most ``slots + max_waiting``; beyond
that, and once draining for shutdown, ``submit`` raises a 503 ``RequestError``. An exception inside
an engine step fails the requests in flight (an in-band error for streams) and the loop goes on.

Models without an adapter for r1kit's engine (any other transformers model through HF ``generate``;
r1kit's DeepSeek-V3 through ``V3SamplingEngine``) are served by ``OneRequestAtATime``: each step runs
the oldest request to its end in one batch ``generate`` call. It has no continuous batching, cannot
stop a request once it runs, and sends each choice in one delta; ``/health`` says so.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from r1kit.errors import ConfigError
from r1kit.models.loading import ENGINE_DTYPES, check_engine_dtype
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Engine, SequenceDelta
from r1kit.serve.protocol import RequestError

SERVE_BACKENDS = ("auto", "engine", "hf")  # --backend values
SERVE_DTYPES = ENGINE_DTYPES  # --dtype values: auto = bf16 where the CPU has native bf16 matmuls, else fp32


def check_serving_choices(backend: str, dtype: str) -> None:
    """Raise ConfigError naming the flag and exactly the values it takes when ``backend`` is not one of
    ``SERVE_BACKENDS`` or ``dtype`` not one of ``SERVE_DTYPES`` (called before the model loads)."""
    if backend not in SERVE_BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(SERVE_BACKENDS)}, got {backend!r}")
    check_engine_dtype(dtype)


class OneRequestAtATime:
    """The engine request API over a batch ``SamplingEngine`` (module docstring).

    Args:
        engine: an HF ``HFGenerateEngine`` or a ``V3SamplingEngine``.
        max_model_len: prompt + completion tokens at most.
        label: how ``/health`` names it.
    """

    max_batch = 1

    def __init__(self, engine, max_model_len: int, label: str) -> None:
        self.engine, self.max_model_len, self.label = engine, max_model_len, label
        self.waiting: deque[tuple[object, list[int], SamplingParams]] = deque()
        self.steps = 0

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0) -> None:
        params.validate()
        if top_logprobs:
            raise ConfigError(f"top_logprobs needs r1kit's engine; this model is served by {self.label}")
        if not 0 < len(prompt_ids) < self.max_model_len:
            raise ConfigError(f"prompt 0 has {len(prompt_ids)} tokens; it must have 1 to {self.max_model_len - 1}")

    def add_request(self, request_id, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0) -> None:
        self.check_request(prompt_ids, params, top_logprobs)
        self.waiting.append((request_id, list(prompt_ids), params))

    def step(self) -> list[SequenceDelta]:
        """Run the oldest waiting request to its end; one delta per choice."""
        if not self.waiting:
            return []
        request_id, prompt, params = self.waiting.popleft()
        self.steps += 1
        return [SequenceDelta(request_id, j, c.token_ids, c.logprobs, None, c.finish_reason)
                for j, c in enumerate(self.engine.generate([prompt], params))]

    def abort(self, request_id, index: int | None = None) -> bool:
        """Drop a waiting request (a running one cannot be stopped)."""
        for item in self.waiting:
            if item[0] == request_id:
                self.waiting.remove(item)
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def stats(self) -> dict:
        return {"slots_total": 1, "slots_in_use": 0, "waiting": len(self.waiting), "prefilling": 0,
                "requests": len(self.waiting), "steps": self.steps}


def make_serving_engine(model: torch.nn.Module, tokenizer, backend: str, dtype: str,
                        max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int | None = None):
    """(engine with the request API, its label): r1kit's engine when the model type has an adapter
    (``backend`` "auto" or "engine"; ``max_num_batched_tokens`` turns on its chunked prefill), else
    ``OneRequestAtATime`` over ``runtime.make_engine``.

    Raises ConfigError for "engine" without an adapter, a backend or dtype not in ``check_serving_choices``,
    or a KV cache over budget."""
    from r1kit.models.deepseek_v3 import DeepseekV3ForCausalLM
    from r1kit.models.loading import resolve_dtype
    from r1kit.rollout.engine import ADAPTERS
    from r1kit.runtime import make_engine

    has_adapter = getattr(model.config, "model_type", None) in ADAPTERS and not isinstance(model, DeepseekV3ForCausalLM)
    check_serving_choices(backend, dtype)
    torch_dtype = resolve_dtype(dtype)
    if backend == "engine" or (backend == "auto" and has_adapter):
        engine = Engine(model, tokenizer, dtype=torch_dtype, max_batch=max_num_seqs, max_model_len=max_model_len,
                        max_num_batched_tokens=max_num_batched_tokens)
        engine.open_requests()
        chunks = f", chunked prefill of {max_num_batched_tokens} tokens/step" if max_num_batched_tokens else ""
        return engine, (f"r1kit engine ({engine.dtype}, {max_num_seqs} slots, continuous batching{chunks}, "
                        f"{engine.compute_path})")
    if isinstance(model, DeepseekV3ForCausalLM):
        label = "r1kit DeepSeek-V3 V3SamplingEngine: one request at a time, no continuous batching"
    else:
        label = "transformers generate: one request at a time, no continuous batching"
    return OneRequestAtATime(make_engine(model, tokenizer, "auto" if isinstance(model, DeepseekV3ForCausalLM) else "hf",
                                         torch_dtype), max_model_len, label), label


@dataclass
class RequestHandle:
    """A submitted request as its handler sees it: ``events`` yields lists of ``SequenceDelta`` (one
    list per engine step) and finally None; an ``Exception`` instead when the engine failed."""

    request_id: int
    n: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: set[int] = field(default_factory=set)

    def push(self, item) -> None:
        """Thread-safe put onto ``events``; dropped when the handler's event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop was closed: nobody is listening
            pass


class EngineLoop:
    """Runs ``engine`` (the request API of ``Engine`` or ``OneRequestAtATime``) in a thread.

    Args:
        engine: the engine.
        max_waiting: sequences that may wait for a slot beyond the engine's slots.
        label: how ``/health`` names the engine.
    """

    def __init__(self, engine, max_waiting: int, label: str = "") -> None:
        self.engine, self.label = engine, label
        self.capacity = engine.max_batch + max_waiting
        self.cond = threading.Condition()
        self.ops: deque[tuple] = deque()
        self.handles: dict[int, RequestHandle] = {}
        self.ids = itertools.count()
        self.outstanding = 0  # sequences submitted and not finished
        self.draining = False
        self.stopping = False
        self.aborted_total = 0
        self.thread = threading.Thread(target=self._run, name="r1kit-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the thread (requests still in flight are failed)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0,
              prompt_field: str = "prompt") -> None:
        """The engine's own validation, as a 400 RequestError naming the field (``prompt_field`` for
        the prompt: "messages" for chat)."""
        try:
            self.engine.check_request(prompt_ids, params, top_logprobs)
        except ConfigError as e:
            message = str(e)
            field_name = message.split()[0]
            raise RequestError(message, field_name if field_name in (
                "max_tokens", "temperature", "top_p", "top_k", "n", "top_logprobs") else prompt_field) from None

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0) -> RequestHandle:
        """Queue a request (called on the event loop). Raises RequestError 503 when the queue is full
        or the server is shutting down."""
        with self.cond:
            if self.draining:
                raise RequestError("the server is shutting down; retry on another replica", status=503)
            if self.outstanding + params.n > self.capacity:
                raise RequestError(f"the server is full ({self.outstanding} sequences in flight, at most "
                                   f"{self.capacity}); retry later", status=503)
            handle = RequestHandle(next(self.ids), params.n, asyncio.get_running_loop(), unfinished=set(range(params.n)))
            self.handles[handle.request_id] = handle
            self.outstanding += params.n
            self.ops.append(("add", handle.request_id, list(prompt_ids), params, top_logprobs))
            self.cond.notify()
        return handle

    def abort(self, handle: RequestHandle, index: int | None = None) -> None:
        """Stop choice ``index`` of the request (all when None); no more events come for it."""
        with self.cond:
            self.ops.append(("abort", handle.request_id, index))
            self.cond.notify()

    def abort_all(self) -> None:
        """Stop every request in flight; their streams end with finish_reason "abort"."""
        with self.cond:
            for request_id in list(self.handles):
                self.ops.append(("abort", request_id, None, "notify"))
            self.cond.notify()

    def start_draining(self) -> None:
        with self.cond:
            self.draining = True

    def in_flight(self) -> int:
        with self.cond:
            return len(self.handles)

    def stats(self) -> dict:
        """Engine counters plus the loop's own (for /health)."""
        with self.cond:
            return {**self.engine.stats(), "engine": self.label, "requests_in_flight": len(self.handles),
                    "sequences_in_flight": self.outstanding, "aborted_total": self.aborted_total,
                    "draining": self.draining}

    def _retire(self, handle: RequestHandle, indices) -> None:
        """Mark choices finished (lock held); forget the request when none is left."""
        for j in indices:
            if j in handle.unfinished:
                handle.unfinished.discard(j)
                self.outstanding -= 1
        if not handle.unfinished and self.handles.pop(handle.request_id, None) is not None:
            handle.push(None)

    def _apply(self, op: tuple) -> None:
        kind, request_id = op[0], op[1]
        handle = self.handles.get(request_id)
        if handle is None:
            return
        if kind == "add":
            try:
                self.engine.add_request(request_id, op[2], op[3], op[4])
            except Exception as e:  # validated before submit; anything here fails this request only
                handle.push(e)
                self._retire(handle, list(handle.unfinished))
            return
        index = op[2]
        indices = sorted(handle.unfinished) if index is None else [index]
        self.engine.abort(request_id, index)
        self.aborted_total += len([j for j in indices if j in handle.unfinished])
        if len(op) > 3:  # abort_all: tell the handler
            handle.push([SequenceDelta(request_id, j, [], [], None, "abort") for j in indices if j in handle.unfinished])
        self._retire(handle, indices)

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._iterate()
            except Exception as e:  # noqa: BLE001 - never let the loop die: fail what is in flight
                self._fail_all(e)
        with self.cond:
            for handle in list(self.handles.values()):
                handle.push(RuntimeError("the server stopped"))

    def _iterate(self) -> None:
        """Wait for work, apply queued submissions and aborts, then one engine step."""
        with self.cond:
            while not self.ops and not self.engine.has_unfinished() and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return
            ops, self.ops = list(self.ops), deque()
            for op in ops:
                self._apply(op)
        if self.engine.has_unfinished():
            self._dispatch(self.engine.step())

    def _dispatch(self, deltas: list[SequenceDelta]) -> None:
        by_request: dict[int, list[SequenceDelta]] = {}
        for d in deltas:
            by_request.setdefault(d.request_id, []).append(d)
        with self.cond:
            for request_id, items in by_request.items():
                handle = self.handles.get(request_id)
                if handle is None:
                    continue
                items = [d for d in items if d.index in handle.unfinished]
                if items:
                    handle.push(items)
                self._retire(handle, [d.index for d in items if d.finish_reason is not None])

    def _fail_all(self, error: Exception) -> None:
        """An engine step raised: abort everything in the engine, send the error to every request."""
        with self.cond:
            for request_id, handle in list(self.handles.items()):
                try:
                    self.engine.abort(request_id)
                except Exception:  # noqa: BLE001 - the engine is already failing; drop what it holds
                    pass
                handle.push(error)
                self._retire(handle, list(handle.unfinished))
