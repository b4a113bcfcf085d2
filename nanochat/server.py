"""The web chat server: the page, a streaming API for it, and an OpenAI-compatible API, over continuous batching.

Contract:
- `create_app(settings)` builds the FastAPI app; models load in the lifespan hook (one BatchingWorker per
  device, nanochat/batching.py), so importing this module does nothing.
- `GET /` the chat page (nanochat/ui.html); `GET /health`; `GET /stats`; `POST /chat/completions` streams
  Server-Sent Events for the page (`{"type": "text" | "tool" | "error" | "done", ...}`);
  `POST /v1/chat/completions` (streaming or not; temperature, top_p, top_k, max_tokens, stop, seed, n, usage,
  finish_reason) and `GET /v1/models` follow OpenAI's chat completions API, so its clients work unchanged.
- Requests are validated by pydantic models whose bounds come from `Settings`; every violation is a 400 with
  an OpenAI-style JSON error naming the field (`param`). Model work runs on the workers' threads, never on the
  event loop. A client that disconnects cancels its request, which frees its batch row before the next step.
- Text is decoded incrementally (never a split character); calculator calls reach the page as tool events and
  OpenAI clients as `<<expression=result>>` (GSM8K's notation) inside the text.
- Bearer-token authentication (`api_key`) and a cap on concurrent requests (`max_concurrent`) are off by
  default; the default bind address is 127.0.0.1.

Not here: the batching worker (nanochat/batching.py), the command line (scripts/chat_web.py).
"""

import asyncio
import json
import os
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanochat.batching import BatchingWorker, DoneEvent, TokenEvent, WorkerPool
from nanochat.batching import Request as GenerationRequest
from nanochat.engine import TextStream

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")


@dataclass
class Settings:
    # Model
    source: str = "sft"  # checkpoint stage: base | mid | sft | rl
    model_tag: str | None = None
    step: int | None = None
    device_type: str | None = None  # None = autodetect
    num_gpus: int = 1  # one batching worker per GPU
    max_batch: int = 32  # requests decoded together per worker
    # model_loader(device_index) -> (model, tokenizer, model name): replaces checkpoint loading (tests, embedding)
    model_loader: Callable | None = None
    # Access
    api_key: str | None = None  # bearer token required on the API when set
    max_concurrent: int = 0  # requests in flight at once, 0 = no cap (beyond it: 429)
    # Request limits
    max_messages: int = 100
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens_limit: int = 2048  # the most a client may ask for per reply
    max_choices: int = 8  # OpenAI `n`
    max_top_k: int = 200
    max_temperature: float = 2.0
    max_stop_sequences: int = 4
    # Defaults when a request leaves them out
    temperature: float = 0.8
    top_k: int | None = 50
    max_tokens: int = 512


# ---------------------------------------------------------------------------- request models


def request_models(settings: Settings):
    """The request bodies, their bounds taken from the settings (declarative, so the OpenAPI schema shows them)."""

    class Part(BaseModel):
        type: Literal["text", "python", "python_output"] = "text"
        text: str = Field(max_length=settings.max_message_chars)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str | list[Part] = Field(max_length=settings.max_message_chars)

        def chars(self) -> int:
            return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content)

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for
        messages: list[Message] = Field(min_length=1, max_length=settings.max_messages)
        temperature: float | None = Field(None, ge=0.0, le=settings.max_temperature)
        top_k: int | None = Field(None, ge=1, le=settings.max_top_k)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        max_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)

        @field_validator("messages")
        @classmethod
        def total_size(cls, messages):
            total = sum(message.chars() for message in messages)
            if total > settings.max_total_chars:
                raise ValueError(f"messages hold {total} characters in all; the limit is {settings.max_total_chars}")
            return messages

    class PageRequest(Common):
        pass

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class OpenAIRequest(Common):
        model: str | None = Field(None, max_length=200)
        max_completion_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit)
        n: int = Field(1, ge=1, le=settings.max_choices)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None

        @field_validator("stop")
        @classmethod
        def stop_sequences(cls, value):
            values = [value] if isinstance(value, str) else value or []
            if len(values) > settings.max_stop_sequences:
                raise ValueError(f"at most {settings.max_stop_sequences} stop sequences")
            if any(not 1 <= len(v) <= 200 for v in values):
                raise ValueError("each stop sequence must be 1 to 200 characters")
            return values

    return PageRequest, OpenAIRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


# ---------------------------------------------------------------------------- tokens to text


class ReplyRenderer:
    """Turns one reply's tokens into text deltas and tool calls, as `("text", str)` / `("tool", expr, output)`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.text = TextStream(tokenizer)
        self.expression: list[int] | None = None  # inside <|python_start|> ... <|python_end|>
        self.output: list[int] | None = None  # inside <|output_start|> ... <|output_end|>
        self.awaiting_output: str | None = None  # an expression whose output may follow

    def push(self, token: int) -> list[tuple]:
        pieces = []
        if self.awaiting_output is not None and self.output is None and token != self.output_start:
            pieces.append(("tool", self.awaiting_output, None))  # the calculator refused it: no output
            self.awaiting_output = None
        if token == self.python_start:
            pieces += self._flush_text()
            self.expression = []
        elif token == self.python_end and self.expression is not None:
            self.awaiting_output, self.expression = self.tokenizer.decode(self.expression), None
        elif token == self.output_start and self.awaiting_output is not None:
            self.output = []
        elif token == self.output_end and self.output is not None:
            pieces.append(("tool", self.awaiting_output, self.tokenizer.decode(self.output)))
            self.awaiting_output, self.output = None, None
        elif self.output is not None:
            self.output.append(token)
        elif self.expression is not None:
            self.expression.append(token)
        else:
            text = self.text.push(token)
            if text:
                pieces.append(("text", text))
        return pieces

    def _flush_text(self) -> list[tuple]:
        text = self.text.flush()
        return [("text", text)] if text else []

    def finish(self) -> list[tuple]:
        pieces = self._flush_text()
        if self.awaiting_output is not None:
            pieces.append(("tool", self.awaiting_output, None))
            self.awaiting_output = None
        return pieces


class StopMatcher:
    """Holds back text that might begin a stop sequence; cuts the text at the first complete one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def openai_text(piece: tuple) -> str:
    """How a rendered piece reads in plain text: tool calls in GSM8K's <<expression=result>> notation."""
    if piece[0] == "text":
        return piece[1]
    _, expression, output = piece
    return f"<<{expression}={output}>>" if output is not None else f"<<{expression}>>"


# ---------------------------------------------------------------------------- the app


def _load_default(settings: Settings, device_index: int):
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.common import autodetect_device_type, autodetect_dtype
    from nanochat.tokenizer import get_tokenizer

    device_type = settings.device_type or autodetect_device_type()
    device = torch.device("cuda", device_index) if device_type == "cuda" else torch.device(device_type)
    if device_type == "cpu":
        # Leave a core to the event loop: on 2 cores, 1 torch thread served 16 streams at 1,558 tok/s where
        # 2 threads gave 1,360 (dev/bench_server.py, dev/BENCHMARKS.md): decode matmuls are too small to split.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    dtype = autodetect_dtype(device_type)
    model, meta = load_model(settings.source, device, "eval", settings.model_tag, settings.step, dtype=dtype)
    model.compute_dtype = dtype
    name = f"nanochat-{settings.source}-{meta.get('model_tag', 'model')}-step{meta['step']}"
    return model, get_tokenizer(), name


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    PageRequest, OpenAIRequest = request_models(settings)
    state: dict = {"ready": False, "in_flight": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = settings.model_loader or (lambda i: _load_default(settings, i))
        workers = []
        for i in range(max(1, settings.num_gpus)):
            model, tokenizer, name = await asyncio.to_thread(loader, i)
            workers.append(BatchingWorker(model, tokenizer, settings.max_batch, name=f"worker-{i}"))
        state["inbox"] = Inbox(asyncio.get_running_loop())
        state.update(pool=WorkerPool(workers).start(), tokenizer=tokenizer, model_name=name, ready=True)
        state["device"] = str(workers[0].device)
        state["context_len"] = workers[0].engine.context_len
        try:
            yield
        finally:
            state["ready"] = False
            state["pool"].stop()

    app = FastAPI(title="nanochat", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
            message = "a valid 'Authorization: Bearer <key>' header is required"
            raise APIError(401, message, None, "authentication_error")

    def prompt_tokens(body) -> list[int]:
        """The chat prompt for `body.messages`; a conversation the model cannot take is a 400."""
        if body.messages[-1].role != "user":
            last = f"messages.{len(body.messages) - 1}.role"
            raise APIError(400, f"{last}: the last message must be from the user", last)
        messages = []
        for message in body.messages:
            content = message.content
            if message.role != "assistant" and not isinstance(content, str):
                content = "".join(part.text for part in content)  # OpenAI's text parts
            elif not isinstance(content, str):
                content = [part.model_dump() for part in content]
            messages.append({"role": message.role, "content": content})
        try:
            tokens = state["tokenizer"].render_for_completion(messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        if len(tokens) >= state["context_len"]:
            raise APIError(
                400,
                f"the conversation is {len(tokens)} tokens and the model's context is {state['context_len']}: "
                "drop old turns or start a new conversation",
                "messages",
                "context_length_exceeded",
            )
        return tokens

    async def start_generation(request: Request, body, tokens, n: int, max_tokens, temperature, top_k, top_p):
        """Submit n rows; returns (queues, requests). Each queue receives TokenEvent/DoneEvent from the worker."""
        if not state["ready"]:
            raise APIError(503, "the model is still loading", None, "server_error")
        if settings.max_concurrent and state["in_flight"] >= settings.max_concurrent:
            raise APIError(429, f"the server is busy ({settings.max_concurrent} requests in flight); retry", None)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
        queues, requests = [], []
        for index in range(n):
            events: asyncio.Queue = asyncio.Queue()
            emit = partial(state["inbox"].put, events)
            generation = GenerationRequest(tokens, emit, max_tokens, temperature, top_k, top_p, seed, index)
            queues.append(events)
            requests.append(generation)
        state["in_flight"] += 1
        for generation in requests:
            state["pool"].submit(generation)
        return queues, requests

    def finish_generation(requests) -> None:
        for generation in requests:
            generation.cancel()  # no-op for finished ones; frees the row of any still running
        state["in_flight"] -= 1

    def sampling(body):
        temperature = settings.temperature if body.temperature is None else body.temperature
        top_k = settings.top_k if body.top_k is None else body.top_k
        return temperature, top_k, body.top_p

    # ------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/health")
    async def health():
        pool = state.get("pool")
        return {
            "status": "ok",
            "ready": state["ready"],
            "model": state.get("model_name"),
            "device": state.get("device"),
            "workers": len(pool.workers) if pool else 0,
            "queue_depth": pool.queue_depth if pool else 0,
            "active": pool.active if pool else 0,
        }

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)  # /health stays open for monitors and the page; the details need the key
        pool = state.get("pool")
        workers = [
            {"name": w.name, "device": str(w.device), "active": len(w.slots), "queued": w.pending.qsize(), **w.stats}
            for w in (pool.workers if pool else [])
        ]
        return {"in_flight": state["in_flight"], "workers": workers}

    @app.post("/chat/completions")
    async def page_completion(request: Request, body: PageRequest):
        authorize(request)
        tokens = prompt_tokens(body)
        temperature, top_k, top_p = sampling(body)
        max_tokens = body.max_tokens or settings.max_tokens
        queues, requests = await start_generation(request, body, tokens, 1, max_tokens, temperature, top_k, top_p)

        async def stream() -> AsyncIterator[str]:
            renderer = ReplyRenderer(state["tokenizer"])
            try:
                while True:
                    # Whatever has arrived goes out in one write: a client that reads slower than the model
                    # decodes gets fewer, larger chunks instead of a growing backlog.
                    arrived = [await queues[0].get()]
                    while not queues[0].empty():
                        arrived.append(queues[0].get_nowait())
                    out = []
                    for event in arrived:
                        if isinstance(event, TokenEvent):
                            out += [sse(page_event(piece)) for piece in renderer.push(event.token)]
                            continue
                        out += [sse(page_event(piece)) for piece in renderer.finish()]
                        if event.error:
                            out.append(sse({"type": "error", "message": event.error}))
                        usage = {"prompt_tokens": len(tokens), "completion_tokens": event.completion_tokens}
                        out.append(sse({"type": "done", "finish_reason": event.finish_reason, "usage": usage}))
                        yield "".join(out)
                        return
                    if out:
                        yield "".join(out)
            finally:
                finish_generation(requests)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        name = state.get("model_name")
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_completion(request: Request, body: OpenAIRequest):
        authorize(request)
        tokens = prompt_tokens(body)
        temperature, top_k, top_p = sampling(body)
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_tokens
        queues, requests = await start_generation(request, body, tokens, body.n, max_tokens, temperature, top_k, top_p)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "created": created, "model": state["model_name"]}
        merged = merge_choices(queues, requests, state["tokenizer"], body.stop)
        if not body.stream:
            try:
                texts, reasons, counts = [""] * body.n, [None] * body.n, [0] * body.n
                async for index, text, reason, count in merged:
                    texts[index] += text
                    if reason is not None:
                        reasons[index], counts[index] = reason, count
            finally:
                finish_generation(requests)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i]}
                for i in range(body.n)
            ]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage_of(tokens, counts)}

        async def stream() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}
            counts = [0] * body.n
            try:
                for i in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield sse({**chunk, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
                async for index, text, reason, count in merged:
                    if text:
                        choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
                        yield sse({**chunk, "choices": [choice]})
                    if reason is not None:
                        counts[index] = count
                        yield sse({**chunk, "choices": [{"index": index, "delta": {}, "finish_reason": reason}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage_of(tokens, counts)})
                yield "data: [DONE]\n\n"
            finally:
                finish_generation(requests)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Inbox:
    """Hands events from worker threads to the event loop with one wakeup per burst instead of one per token:
    every call_soon_threadsafe writes the loop's wakeup pipe, and a decode step of 16 rows makes 16 events."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, deque(), threading.Lock(), False

    def put(self, queue: asyncio.Queue, event) -> None:
        """Any thread: deliver `event` to `queue` on the loop."""
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, deque(), False
        for queue, event in items:
            queue.put_nowait(event)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def page_event(piece: tuple) -> dict:
    if piece[0] == "text":
        return {"type": "text", "text": piece[1]}
    return {"type": "tool", "expression": piece[1], "output": piece[2]}


def usage_of(tokens: list[int], counts: list[int]) -> dict:
    completion = sum(counts)
    return {"prompt_tokens": len(tokens), "completion_tokens": completion, "total_tokens": len(tokens) + completion}


OPENAI_FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "error": "stop"}


async def merge_choices(queues, requests, tokenizer, stops):
    """Yields (choice index, text delta, finish reason or None, completion tokens) across the n choices as their
    tokens arrive; a stop sequence ends its choice (and cancels its row)."""
    pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
    renderers = [ReplyRenderer(tokenizer) for _ in queues]
    matchers = [StopMatcher(stops or []) for _ in queues]
    counts = [0] * len(queues)
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                event = future.result()
                if isinstance(event, TokenEvent):
                    counts[i] += 1
                    text = "".join(matchers[i].push(openai_text(p)) for p in renderers[i].push(event.token))
                    if matchers[i].stopped:
                        requests[i].cancel()
                        yield i, text, "stop", counts[i]
                        continue
                    if text:
                        yield i, text, None, counts[i]
                    pending[asyncio.ensure_future(queues[i].get())] = i
                    continue
                assert isinstance(event, DoneEvent)
                text = "".join(matchers[i].push(openai_text(p)) for p in renderers[i].finish())
                reason = "stop" if matchers[i].stopped else OPENAI_FINISH[event.finish_reason]
                text += "" if matchers[i].stopped else matchers[i].flush()
                yield i, text, reason, event.completion_tokens
    finally:
        for future in pending:
            future.cancel()
