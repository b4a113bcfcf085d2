"""What the chat server's routes share: settings, the request models they bound, the typed state on
`app.state.server`, OpenAI-shaped errors, and turning a validated request into generation rows
(`start_generation`: n rows submitted to the workers, their events delivered to asyncio queues on the loop).

Not here: the routes (nanochat/server.py), the batching worker (nanochat/batching.py).
"""

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from nanochat.batching import Request as GenerationRequest
from nanochat.batching import WorkerPool

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Settings:
    # Model
    source: str = "sft"  # checkpoint stage: base | mid | sft | rl
    model_tag: str | None = None
    step: int | None = None
    device_type: str | None = None  # None = autodetect
    num_gpus: int = 1  # one batching worker per GPU
    max_batch: int = 32  # requests decoded together per worker
    quantize: str | None = None  # None = the checkpoint's float weights; "int8" | "int4" (nanochat/quantize.py)
    compile: bool = False  # decode through torch.compile, every step the same shapes (CUDA graphs on a GPU)
    # model_loader(device_index) -> (model, tokenizer, model name): replaces checkpoint loading (tests, embedding)
    model_loader: Callable | None = None
    # Access
    api_key: str | None = None  # bearer token required on all but the page and /health when set
    max_concurrent: int = 0  # requests in flight at once, 0 = no cap (beyond it: 429)
    max_body_bytes: int = 1 << 20  # larger request bodies are refused (413) before they are read
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
def request_models(settings: Settings) -> tuple[type, type]:
    """The request bodies, their bounds taken from the settings (declarative, so the OpenAPI schema shows them)."""

    class Part(BaseModel):
        type: Literal["text", "python", "python_output"] = "text"
        text: str = Field(max_length=settings.max_message_chars)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str | list[Part] = Field(max_length=settings.max_message_chars)

        def chars(self) -> int:
            return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content)

    class PageRequest(BaseModel):
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

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class OpenAIRequest(PageRequest):
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


# ---------------------------------------------------------------------------- state and errors
@dataclass
class ServerState:
    """What the handlers share, on `app.state.server`; the lifespan hook fills in the model's part."""

    settings: Settings
    pool: WorkerPool | None = None
    tokenizer: Any = None
    model_name: str | None = None
    device: str | None = None
    context_len: int = 0
    ready: bool = False
    in_flight: int = 0  # requests between submission and their last event


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


async def openai_error(request: Request, exc: Exception) -> JSONResponse:
    """Every error in OpenAI's shape, Starlette's own (404, 405, a body too large, ...) and unexpected ones too."""
    if isinstance(exc, APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param)
    if isinstance(exc, HTTPException):
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), None, kind)
    return error_response(500, f"internal server error ({type(exc).__name__})", None, "server_error")


ERROR_HANDLERS = dict.fromkeys((RequestValidationError, APIError, HTTPException, Exception), openai_error)


# ---------------------------------------------------------------------------- generation
def prompt_tokens(state: ServerState, body) -> list[int]:
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
        tokens = state.tokenizer.render_for_completion(messages)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    if len(tokens) >= state.context_len:
        message = (
            f"the conversation is {len(tokens)} tokens and the model's context is {state.context_len}: "
            "drop old turns or start a new conversation"
        )
        raise APIError(400, message, "messages", "context_length_exceeded")
    return tokens


def start_generation(state: ServerState, body, n: int, max_tokens: int):
    """Submit n rows of body's prompt; returns (prompt tokens, queues, requests), queues fed Token/DoneEvents."""
    tokens = prompt_tokens(state, body)
    settings = state.settings
    if not state.ready:
        raise APIError(503, "the model is still loading", None, "server_error")
    if settings.max_concurrent and state.in_flight >= settings.max_concurrent:
        raise APIError(429, f"the server is busy ({settings.max_concurrent} requests in flight); retry", None)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
    loop = asyncio.get_running_loop()
    queues = [asyncio.Queue() for _ in range(n)]
    requests = [
        GenerationRequest(
            prompt=tokens,
            emit=partial(loop.call_soon_threadsafe, events.put_nowait),  # from the worker's thread
            max_tokens=max_tokens,
            temperature=settings.temperature if body.temperature is None else body.temperature,
            top_k=settings.top_k if body.top_k is None else body.top_k,
            top_p=body.top_p,
            seed=seed,
            sample_index=index,
        )
        for index, events in enumerate(queues)
    ]
    state.in_flight += 1
    for generation in requests:
        state.pool.submit(generation)
    return tokens, queues, requests


def finish_generation(state: ServerState, requests) -> None:
    for generation in requests:
        generation.cancelled.set()  # no-op for finished ones; frees the row of any still running
    state.in_flight -= 1


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
