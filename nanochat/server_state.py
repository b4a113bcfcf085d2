"""What the chat server's routes share: settings, the request models they bound, the typed state on
`app.state.server`, OpenAI-shaped errors (a failed bound as one sentence: `explain`), the checks a model cannot
declare (`check_openai_request`: the model asked for, OpenAI fields we cannot honour), and turning a validated
request into generation rows (`start_generation`: n rows submitted to the workers, their events delivered to
asyncio queues on the loop).

Not here: the routes (nanochat/server.py), the batching worker (nanochat/batching.py).
"""

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

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
    """The request bodies, their bounds taken from the settings (declarative, so the OpenAPI schema shows them);
    `explain` turns a failed bound into a sentence."""
    Text = Annotated[str, Field(max_length=settings.max_message_chars)]
    Number = partial(Field, None, allow_inf_nan=False)  # NaN and infinity are refused, not compared

    class Part(BaseModel):
        type: Literal["text", "python", "python_output"] = "text"
        text: Text

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: Text | list[Part]

        def chars(self) -> int:
            return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content)

    class PageRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for
        messages: list[Message] = Field(min_length=1, max_length=settings.max_messages)
        temperature: float | None = Number(ge=0.0, le=settings.max_temperature)
        top_k: int | None = Field(None, ge=0, le=settings.max_top_k)  # 0 or null = off (omitted: the default)
        top_p: float | None = Number(gt=0.0, le=1.0)
        max_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)

        @field_validator("messages")
        @classmethod
        def total_size(cls, messages):
            total = sum(message.chars() for message in messages)
            if total > settings.max_total_chars:
                limit = settings.max_total_chars
                raise ValueError(f"messages must hold at most {limit:,} characters in all; these hold {total:,}")
            return messages

    class StreamOptions(BaseModel):
        include_usage: bool = False

    Stop = Annotated[str, Field(min_length=1, max_length=200)]

    class OpenAIRequest(PageRequest):
        model_config = ConfigDict(extra="allow")  # kept so that check_openai_request can refuse what we lack
        model: str | None = Field(None, max_length=200)
        max_completion_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit)
        n: int = Field(1, ge=1, le=settings.max_choices)
        stop: Stop | Annotated[list[Stop], Field(max_length=settings.max_stop_sequences)] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: bool | None = False
        top_logprobs: int | None = Field(None, ge=0, le=20)

        @field_validator("stop")
        @classmethod
        def stop_sequences(cls, value):
            return [value] if isinstance(value, str) else value or []

    return PageRequest, OpenAIRequest


NOUNS = {"messages": "messages", "stop": "stop sequences", "content": "parts"}  # what a list of each holds
# pydantic's "<kind>_type" errors in words
KINDS = {"string": "a string", "int": "an integer", "int_from": "a whole number", "float": "a number", "list": "a list",
         "bool": "true or false", "dict": "an object", "model": "an object"}  # fmt: skip


def number(value) -> str:
    """2.0 -> "2", 8000 -> "8,000": bounds as people write them."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def field_path(error: dict) -> list:
    """An error's location in the body, without "body" and the union branch names pydantic adds ("str", ...)."""
    branch = lambda part: isinstance(part, str) and (part in ("str", "int") or not part.isidentifier())  # noqa: E731
    return [part for part in error["loc"] if part != "body" and not branch(part)]


def explain(errors: list[dict]) -> tuple[str | None, str]:
    """(param, one sentence naming the field and what it must be) for pydantic's errors on a request body."""
    # a union (content: text or parts; stop: text or list) reports each branch's failure; a real bound beats
    # "not this type"
    errors = sorted(errors, key=lambda e: e["type"].endswith(("_type", "_parsing")))
    kind, ctx, path = errors[0]["type"], errors[0].get("ctx", {}), field_path(errors[0])
    param = ".".join(str(part) for part in path) or None
    name, field = param or "the request", next((p for p in reversed(path) if isinstance(p, str)), "")
    if kind == "json_invalid":
        return None, f"the body is not valid JSON ({ctx.get('error', 'parse error')})"
    if kind == "missing" and not path:
        return None, "the request needs a JSON body"
    if kind == "value_error":
        return param, str(ctx["error"])
    if kind.endswith(("_type", "_parsing")) or kind == "int_from_float":
        kinds = [KINDS.get(e["type"].rsplit("_", 1)[0]) for e in errors if field_path(e) == path]
        return param, f"{name} must be {' or '.join(dict.fromkeys(k for k in kinds if k)) or 'of another type'}"
    sentences = {
        "missing": "is required",
        "finite_number": "must be a finite number",
        "literal_error": f"must be {ctx.get('expected')}",
        "greater_than_equal": f"must be at least {number(ctx.get('ge', 0))}",
        "greater_than": f"must be greater than {number(ctx.get('gt', 0))}",
        "less_than_equal": f"must be at most {number(ctx.get('le', 0))}",
        "string_too_long": f"must be at most {number(ctx.get('max_length', 0))} characters",
        "string_too_short": "must not be empty",
        "too_long": f"must hold at most {number(ctx.get('max_length', 0))} {NOUNS.get(field, 'items')}",
        "too_short": "must not be empty",
    }
    return param, f"{name} {sentences[kind]}" if kind in sentences else f"{name}: {errors[0]['msg']}"


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
    def __init__(self, status: int, message: str, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(status: int, message: str, param=None, kind="invalid_request_error", code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


async def openai_error(request: Request, exc: Exception) -> JSONResponse:
    """Every error in OpenAI's shape, Starlette's own (404, 405, a body too large, ...) and unexpected ones too."""
    if isinstance(exc, APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)
    if isinstance(exc, RequestValidationError):
        param, message = explain(list(exc.errors())) if exc.errors() else (None, "the request is not valid")
        return error_response(400, message, param, code="invalid_value")
    if isinstance(exc, HTTPException) and exc.status_code in (404, 405):  # OpenAI's words for unknown routes
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return error_response(404, f"Unknown request URL: {where} (GET /docs lists them)", code="unknown_url")
        allowed = (exc.headers or {}).get("Allow", "")
        response = error_response(405, f"{where} is not allowed; use {allowed}", code="method_not_allowed")
        response.headers["Allow"] = allowed
        return response
    if isinstance(exc, HTTPException):
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), None, kind)
    return error_response(500, f"internal server error ({type(exc).__name__})", None, "server_error")


ERROR_HANDLERS = dict.fromkeys((RequestValidationError, APIError, HTTPException, Exception), openai_error)


# ---------------------------------------------------------------------------- generation
# OpenAI fields this server cannot honour, each with the value that asks for nothing (None: none does). A request
# that asks for one gets a 400 naming it: ignoring it would hand back something else than what was asked for.
UNSUPPORTED = {
    "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "response_format": {"type": "text"},
    "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "audio": None, "modalities": ["text"],
    "prediction": None, "web_search_options": None,
}  # fmt: skip


def check_model(state: "ServerState", model: str | None) -> None:
    """The served id, "nanochat" (whichever is served) or None pass; any other is a 404 model_not_found."""
    if model not in (None, "nanochat", state.model_name):
        message = f"the model {model!r} does not exist here; this server serves {state.model_name!r}"
        raise APIError(404, message, "model", code="model_not_found")


def check_openai_request(state: "ServerState", body) -> None:
    """What the request models cannot say alone: the model asked for, fields we lack, logprobs' pairing."""
    check_model(state, body.model)
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value is not None and value != UNSUPPORTED[name]:
            message = f"{name} is not supported by this server (nanochat answers in plain text); leave it out"
            raise APIError(400, message, name, code="unsupported_parameter")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", code="invalid_value")


def prompt_tokens(state: ServerState, body) -> list[int]:
    """The chat prompt for `body.messages`; a conversation the model cannot take is a 400."""
    if body.messages[-1].role != "user":
        last = f"messages.{len(body.messages) - 1}.role"
        raise APIError(400, f"{last} must be 'user': the model answers the user's last message", last)
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
        raise APIError(400, message, "messages", code="context_length_exceeded")
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
            top_k=(body.top_k if "top_k" in body.model_fields_set else settings.top_k) or None,  # 0, null: off
            top_p=body.top_p,
            seed=seed,
            sample_index=index,
            logprobs=(getattr(body, "top_logprobs", None) or 0) if getattr(body, "logprobs", False) else None,
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
