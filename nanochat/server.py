"""The web chat server: the page, a streaming API for it, and an OpenAI-compatible API, over continuous batching.

Contract:
- `create_app(settings)` builds the app from two routers sharing a typed `ServerState` on `app.state.server`
  (nanochat/server_state.py); the lifespan hook loads the models (a BatchingWorker per device).
- `GET /` the page (nanochat/ui.html); `GET /stats`; `POST /chat/completions` streams the page's Server-Sent
  Events (`{"type": "text" | "tool" | "error" | "done", ...}`). `GET /health` (open, like the page): status,
  ready, model, device, workers, queue_depth, active, and what the page sets its inputs from:
  `"limits": {"max_temperature", "max_top_k", "max_tokens", "max_message_chars", "max_messages",
  "max_total_chars"}` (the most a request may ask) and `"defaults": {"temperature", "top_k", "max_tokens"}`.
- `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`: OpenAI's chat completions API, streamed
  (chunks, then `data: [DONE]`) or not, with temperature, top_p, top_k, max_tokens / max_completion_tokens, stop,
  seed, n, stream_options.include_usage, logprobs / top_logprobs (0-20). Calculator calls read as
  `<<expression=result>>` (GSM8K's notation). The model id is `nanochat-<tag>-<source>-step<N>` (e.g.
  nanochat-d4-sft-step30); `model` may be that, "nanochat" or left out; another is a 404 `model_not_found`.
- top_k 0 or null = off (the CLI's vocabulary); left out, the server's default applies.
- Bodies are pydantic models bounded by `Settings`; every error is in OpenAI's shape, `{"error": {"message",
  "type", "param", "code"}}`, the message one sentence naming the field and the limit. Codes: invalid_value,
  context_length_exceeded, unsupported_parameter (tools, response_format other than text, logit_bias, ...: we
  refuse what we cannot honour), model_not_found, unknown_url (404), method_not_allowed (405).
- Model work runs on the workers' threads, never the event loop; a client that disconnects frees its row.
- Off by default: a bearer key (`api_key`, on all but the page and /health) and a cap on requests in flight
  (`max_concurrent`); both, and the body cap (`max_body_bytes`), answer before the body is read.

Not here: the batching worker (nanochat/batching.py), the command line (scripts/chat_web.py).
"""

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nanochat.batching import BatchingWorker, DoneEvent, TokenEvent, WorkerPool
from nanochat.engine import ReplyRenderer
from nanochat.server_state import (
    ERROR_HANDLERS,
    SSE_HEADERS,
    ServerState,
    Settings,
    check_model,
    check_openai_request,
    error_response,
    finish_generation,
    request_models,
    sse,
    start_generation,
)

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")
# GET /health's "limits": the bounds a request must keep (the page sets its inputs from them) -> Settings fields
LIMITS = {
    "max_temperature": "max_temperature", "max_top_k": "max_top_k", "max_tokens": "max_tokens_limit",
    "max_message_chars": "max_message_chars", "max_messages": "max_messages", "max_total_chars": "max_total_chars",
}  # fmt: skip


def page_event(piece: tuple) -> dict:
    if piece[0] == "text":
        return {"type": "text", "text": piece[1]}
    return {"type": "tool", "expression": piece[1], "output": piece[2]}


# ---------------------------------------------------------------------------- the page's routes
page_router = APIRouter()


@page_router.get("/", include_in_schema=False)
async def page():
    return FileResponse(UI_PATH, media_type="text/html")


@page_router.get("/health")
async def health(request: Request):
    state: ServerState = request.app.state.server
    pool = state.pool
    settings = state.settings
    return {
        "status": "ok",
        "ready": state.ready,
        "model": state.model_name,
        "device": state.device,
        "workers": len(pool.workers) if pool else 0,
        "queue_depth": pool.queue_depth if pool else 0,
        "active": pool.active if pool else 0,
        "limits": {name: getattr(settings, field) for name, field in LIMITS.items()},
        "defaults": {"temperature": settings.temperature, "top_k": settings.top_k, "max_tokens": settings.max_tokens},
    }


@page_router.get("/stats")
async def stats(request: Request):
    state: ServerState = request.app.state.server
    workers = [
        {"name": w.name, "device": str(w.device), "active": len(w.slots), "queued": w.queued, **w.stats}
        for w in (state.pool.workers if state.pool else [])
    ]
    return {"in_flight": state.in_flight, "workers": workers}


async def page_completion(request: Request, body):
    state: ServerState = request.app.state.server
    tokens, queues, requests = start_generation(state, body, 1, body.max_tokens or state.settings.max_tokens)

    async def stream() -> AsyncIterator[str]:
        renderer = ReplyRenderer(state.tokenizer)
        try:
            while True:
                # Whatever has arrived goes out in one write: a client that reads slower than the model decodes
                # gets fewer, larger chunks instead of a growing backlog.
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
            finish_generation(state, requests)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---------------------------------------------------------------------------- OpenAI's routes
openai_router = APIRouter(prefix="/v1")


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nanochat"}


@openai_router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state.server.model_name)]}


@openai_router.get("/models/{model_id:path}")
async def model_by_id(request: Request, model_id: str):
    check_model(request.app.state.server, model_id)
    return model_card(request.app.state.server.model_name)


async def openai_completion(request: Request, body):
    state: ServerState = request.app.state.server
    check_openai_request(state, body)
    max_tokens = body.max_completion_tokens or body.max_tokens or state.settings.max_tokens
    tokens, queues, requests = start_generation(state, body, body.n, max_tokens)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    merged = merge_choices(queues, requests, state.tokenizer, body.stop)
    if not body.stream:
        texts, reasons, counts = [""] * body.n, [None] * body.n, [0] * body.n
        entries = [[] for _ in range(body.n)]

        async def collect():
            async for index, text, logprob_entries, reason, count in merged:
                texts[index] += text
                entries[index] += logprob_entries
                if reason is not None:
                    reasons[index], counts[index] = reason, count

        try:
            if not await unless_client_leaves(request, collect()):
                return Response(status_code=499)  # nobody reads it; 499 is nginx's "client closed request"
        finally:
            finish_generation(state, requests)  # cancels every row still decoding
        choices = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
             "logprobs": {"content": entries[i]} if body.logprobs else None}
            for i in range(body.n)
        ]  # fmt: skip
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage_of(tokens, counts)}

    async def stream() -> AsyncIterator[str]:
        chunk = {**head, "object": "chat.completion.chunk"}
        counts = [0] * body.n
        try:
            for i in range(body.n):
                delta = {"role": "assistant", "content": ""}
                yield sse({**chunk, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
            async for index, text, logprob_entries, reason, count in merged:
                if text or logprob_entries:
                    choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
                    if body.logprobs:
                        choice["logprobs"] = {"content": logprob_entries}
                    yield sse({**chunk, "choices": [choice]})
                if reason is not None:
                    counts[index] = count
                    yield sse({**chunk, "choices": [{"index": index, "delta": {}, "finish_reason": reason}]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage_of(tokens, counts)})
            yield "data: [DONE]\n\n"
        finally:
            finish_generation(state, requests)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


async def unless_client_leaves(request: Request, work) -> bool:
    """Awaits `work`, unless the client hangs up first (ASGI's http.disconnect, which the receive channel delivers
    once the body is read): then cancels it and returns False, so a reply nobody will read stops decoding."""
    task = asyncio.ensure_future(work)

    async def hangup():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hangup())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # no-op once done
    if not task.done():
        return False
    task.result()  # the work's own error, if any, goes on up
    return True


def usage_of(tokens: list[int], counts: list[int]) -> dict:
    completion = sum(counts)
    return {"prompt_tokens": len(tokens), "completion_tokens": completion, "total_tokens": len(tokens) + completion}


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


def openai_text(piece: tuple) -> str:
    """How a rendered piece reads in plain text: tool calls in GSM8K's <<expression=result>> notation."""
    if piece[0] == "text":
        return piece[1]
    _, expression, output = piece
    return f"<<{expression}={output}>>" if output is not None else f"<<{expression}>>"


OPENAI_FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "error": "stop"}


def logprob_entry(tokenizer, event: TokenEvent) -> dict:
    """A token and its logprob in OpenAI's shape: token (its text), logprob, bytes, the likeliest alternatives."""

    def item(token: int, logprob: float) -> dict:
        raw = tokenizer.id_to_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {**item(event.token, event.logprob), "top_logprobs": [item(t, lp) for t, lp in event.top_logprobs]}


async def merge_choices(queues, requests, tokenizer, stops):
    """Yields (choice index, text delta, logprob entries, finish reason or None, completion tokens) across the n
    choices as their tokens arrive; a stop sequence ends its choice (and cancels its row). The entries are the
    tokens that arrived since the last yield (with logprobs asked for; else empty)."""
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
                    entries = [logprob_entry(tokenizer, event)] if event.logprob is not None else []
                    if matchers[i].stopped:
                        requests[i].cancelled.set()
                        yield i, text, entries, "stop", counts[i]
                        continue
                    if text or entries:
                        yield i, text, entries, None, counts[i]
                    pending[asyncio.ensure_future(queues[i].get())] = i
                    continue
                assert isinstance(event, DoneEvent)
                text = "".join(matchers[i].push(openai_text(p)) for p in renderers[i].finish())
                reason = "stop" if matchers[i].stopped else OPENAI_FINISH[event.finish_reason]
                text += matchers[i].pending  # held back in case a stop followed; "" once stopped
                yield i, text, [], reason, event.completion_tokens
    finally:
        for future in pending:
            future.cancel()


# ---------------------------------------------------------------------------- the app
def load_default(settings: Settings, device_index: int):
    """(model, tokenizer, name) from the checkpoint the settings name, on device `device_index`."""
    import torch

    from nanochat.checkpoint import checkpoint_dir, load_model
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
    tag = os.path.basename(checkpoint_dir(settings.source, settings.model_tag))  # "d4": the directory load_model read
    name = f"nanochat-{tag}-{settings.source}-step{meta['step']}"
    return model, get_tokenizer(), name


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServerState = app.state.server
    settings = state.settings
    loader = settings.model_loader or partial(load_default, settings)
    workers = []
    for i in range(max(1, settings.num_gpus)):
        model, tokenizer, name = await asyncio.to_thread(loader, i)
        if settings.quantize:
            from nanochat.quantize import SCHEMES, quantize_model

            await asyncio.to_thread(quantize_model, model, SCHEMES[settings.quantize])
            name = f"{name}-{settings.quantize}"
        workers.append(BatchingWorker(model, tokenizer, settings.max_batch, f"worker-{i}", settings.compile))
    state.pool = WorkerPool(workers).start()
    state.tokenizer, state.model_name, state.device = tokenizer, name, str(workers[0].device)
    state.context_len, state.ready = workers[0].engine.context_len, True
    try:
        yield
    finally:
        state.ready = False
        state.pool.stop()


def typed_body(handler, model: type):
    """`handler` as an endpoint whose `body` FastAPI parses as `model` (which carries this app's limits)."""

    async def endpoint(request: Request, body):
        return await handler(request, body)

    endpoint.__annotations__ = {"request": Request, "body": model}
    endpoint.__name__ = handler.__name__  # the operation's name in the OpenAPI schema
    return endpoint


OPEN_PATHS = ("/", "/health")  # the page and the monitors' health check need no key; everything else does


class Gate:
    """ASGI middleware that answers before the body is read: 401 (`WWW-Authenticate: Bearer`, RFC 6750) without
    the key on every path but OPEN_PATHS, and 413 for a body over `max_body_bytes` (by Content-Length, or as soon
    as the chunks read exceed it)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        limit, api_key = self.settings.max_body_bytes, self.settings.api_key
        authorization = headers.get("authorization", "")
        token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        if api_key and scope["path"] not in OPEN_PATHS and not secrets.compare_digest(token.encode(), api_key.encode()):
            message = "a valid 'Authorization: Bearer <key>' header is required"
            response = error_response(401, message, None, "authentication_error", "invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        if int(headers.get("content-length") or 0) > limit:
            return await error_response(413, f"the request body is over {limit} bytes")(scope, receive, send)
        read = 0

        async def capped_receive():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:  # FastAPI re-raises an HTTPException met while reading; openai_error shapes it
                raise HTTPException(413, f"the request body is over {limit} bytes")
            return message

        await self.app(scope, capped_receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    page_request, openai_request = request_models(settings)
    app = FastAPI(title="nanochat", lifespan=lifespan, exception_handlers=ERROR_HANDLERS)
    app.state.server = ServerState(settings)
    app.add_middleware(Gate, settings=settings)
    app.include_router(page_router)
    app.add_api_route("/chat/completions", typed_body(page_completion, page_request), methods=["POST"])
    app.include_router(openai_router)
    app.add_api_route("/v1/chat/completions", typed_body(openai_completion, openai_request), methods=["POST"])
    return app
