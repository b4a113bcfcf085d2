"""OpenAI's chat completions API over the batching workers: `GET /v1/models`, `POST /v1/chat/completions`.

Contract: streaming (SSE chunks, `data: [DONE]` last) or not; temperature, top_p, top_k, max_tokens /
max_completion_tokens, stop, seed, n, stream_options.include_usage and finish_reason as OpenAI documents them,
so its clients work unchanged. Calculator calls read as `<<expression=result>>` (GSM8K's notation) in the text;
a stop sequence cuts its choice and frees its row.

Not here: validation and shared state (nanochat/server_state.py), the app (nanochat/server.py).
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from nanochat.batching import DoneEvent, TokenEvent
from nanochat.engine import ReplyRenderer
from nanochat.server_state import (
    SSE_HEADERS,
    finish_generation,
    prompt_tokens,
    server_state,
    sse,
    start_generation,
)

openai_router = APIRouter(prefix="/v1")


@openai_router.get("/models")
async def models(request: Request):
    name = server_state(request).model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanochat"}]}


async def openai_completion(request: Request, body):
    state = server_state(request)
    tokens = prompt_tokens(state, body)
    max_tokens = body.max_completion_tokens or body.max_tokens or state.settings.max_tokens
    queues, requests = start_generation(state, body, tokens, body.n, max_tokens)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    merged = merge_choices(queues, requests, state.tokenizer, body.stop)
    if not body.stream:
        try:
            texts, reasons, counts = [""] * body.n, [None] * body.n, [0] * body.n
            async for index, text, reason, count in merged:
                texts[index] += text
                if reason is not None:
                    reasons[index], counts[index] = reason, count
        finally:
            finish_generation(state, requests)
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
            finish_generation(state, requests)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


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

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def openai_text(piece: tuple) -> str:
    """How a rendered piece reads in plain text: tool calls in GSM8K's <<expression=result>> notation."""
    if piece[0] == "text":
        return piece[1]
    _, expression, output = piece
    return f"<<{expression}={output}>>" if output is not None else f"<<{expression}>>"


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
