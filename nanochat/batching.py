"""Continuous batching: concurrent generation requests share one model's decode steps.

Contract:
- A `BatchingWorker` owns one model and a KVCache of `max_batch` full-context rows. Its thread prefills each
  queued request alone into a free row, then decodes all active rows one step at a time; a finished or cancelled
  request leaves at once and the last row moves into its place, so n requests are an n-row forward.
  `WorkerPool` spreads requests over workers (one per GPU), least loaded first.
- `submit(request)` is thread-safe. `request.emit(event)` is called on the worker thread: a `TokenEvent(token,
  mask)` per generated token (the stop token excluded), then one `DoneEvent(finish_reason, completion_tokens)`,
  finish_reason "stop", "length" (max_tokens), "context", "cancelled" or "error".
- Each request samples with its own parameters and random stream (`engine.row_keys`): its tokens do not depend
  on the other requests in the batch.

Not here: HTTP and text (nanochat/server.py); the KV cache, sampler and tool handling (nanochat/engine.py).
"""

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat.engine import Engine, KVCache, ToolState, finish_reason, row_keys, sample_next_token


@dataclass
class TokenEvent:
    token: int
    mask: int  # 1 = sampled, 0 = forced by the calculator tool


@dataclass
class DoneEvent:
    finish_reason: str  # stop | length | context | cancelled | error
    completion_tokens: int
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    emit: Callable[[TokenEvent | DoneEvent], None]
    max_tokens: int | None = None  # None = until the context is full
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42
    sample_index: int = 0  # which of n samples of one prompt (the OpenAI `n`): picks the random stream
    # set it from any thread to cancel: the worker frees the request's row before its next decode step
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Slot:
    request: Request
    budget: int
    key: torch.Tensor  # () int64: the request's random stream
    state: ToolState
    generated: int = 0
    last_token: int = 0


class BatchingWorker:
    def __init__(self, model, tokenizer, max_batch=16, name="worker-0", compile_decode=False, backend=None):
        """compile_decode: Engine's torch.compile path; every step then runs all max_batch rows of a static cache
        (idle ones on a dummy token, reset after), compute that a bandwidth-bound GPU step hides."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = Engine(model, tokenizer, compile_decode=compile_decode, backend=backend)
        self.model, self.max_batch, self.name = model, max_batch, name
        self.device = self.engine.device
        self.cache = KVCache.for_model(model, max_batch, self.engine.context_len, static=compile_decode)
        self.slots: list[_Slot] = []  # active requests; slot i lives in cache row i
        self.pending: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens": 0, "steps": 0}

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> "BatchingWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.pending.put(None)  # wake a worker waiting for work
        self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        self.stats["requests"] += 1
        self.pending.put(request)

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._admit(block=not self.slots)
                if self.slots:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 -- a failed step ends its requests, never the worker
                for slot in self.slots:
                    self._finish_request(slot.request, "error", slot.generated, f"{type(e).__name__}: {e}")
                self.slots.clear()
                self.cache.lengths[:] = 0
                self.cache.lengths_tensor.zero_()

    def _admit(self, block: bool) -> None:
        """Move queued requests into free rows: prefill each and sample its first token."""
        while len(self.slots) < self.max_batch and not self._stop.is_set():
            try:
                request = self.pending.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if block:
                    continue
                return
            if request is None:
                return
            block = False
            if request.cancelled.is_set():
                self._finish_request(request, "cancelled", 0)
                continue
            try:
                budget = self.engine.token_budget(len(request.prompt), request.max_tokens)
                prompt_cache = KVCache.for_model(self.model, 1, len(request.prompt))
                logits = self.engine.prefill(prompt_cache, request.prompt)  # (1, V)
            except Exception as e:  # noqa: BLE001 -- a bad request fails alone
                self._finish_request(request, "error", 0, f"{type(e).__name__}: {e}")
                continue
            self.cache.copy_prefix_from(prompt_cache, rows=[len(self.slots)])
            key = row_keys(request.seed, request.sample_index + 1, self.device)[request.sample_index]
            slot = _Slot(request, budget, key, ToolState(self.engine.tokenizer))
            self.slots.append(slot)
            self._emit_next_tokens([slot], logits)
            self._drop_finished()

    def _decode_step(self) -> None:
        n = len(self.slots)
        if self.cache.static:
            ids = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)  # idle rows: token 0
            ids[:n, 0] = torch.tensor([slot.last_token for slot in self.slots], device=self.device)
            logits = self.engine.decode(ids, self.cache)[:n]  # (n, V)
            self.cache.advance_host(1)
            self.cache.lengths[n:], self.cache.lengths_tensor[n:] = 0, 0  # idle rows stay empty
        else:
            ids = torch.tensor([[slot.last_token] for slot in self.slots], dtype=torch.long, device=self.device)
            logits = self.engine.decode(ids, self.cache.head(n))  # (n, V)
        self.stats["steps"] += 1
        self._emit_next_tokens(self.slots, logits)
        self._drop_finished()

    def _emit_next_tokens(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Sample one token per slot (rows with equal sampling parameters in one call) and emit it."""
        sampled = [0] * len(slots)
        groups: dict[tuple, list[int]] = {}
        for i, slot in enumerate(slots):
            groups.setdefault((slot.request.temperature, slot.request.top_k, slot.request.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            keys = torch.stack([slots[i].key for i in rows])
            steps = torch.tensor([slots[i].generated for i in rows], dtype=torch.long, device=self.device)
            tokens = sample_next_token(logits[index], temperature, top_k, top_p, keys, steps).tolist()
            for i, token in zip(rows, tokens):
                sampled[i] = token
        for slot, token in zip(slots, sampled):
            token, mask = self.engine.next_token(slot.state, token)
            slot.last_token = token
            slot.generated += 1
            if not slot.state.done:
                slot.request.emit(TokenEvent(token, mask))
                self.stats["tokens"] += 1

    def _drop_finished(self) -> None:
        """Finish requests that stopped, ran out of budget or were cancelled; compact the rows."""
        i = 0
        while i < len(self.slots):
            slot = self.slots[i]
            if slot.request.cancelled.is_set():
                reason = "cancelled"
            elif slot.state.done or slot.generated >= slot.budget:
                reason = finish_reason(slot.state.done, slot.budget, slot.request.max_tokens)
            else:
                i += 1
                continue
            tokens = slot.generated - (1 if reason == "stop" else 0)  # the stop token is not part of the reply
            self._finish_request(slot.request, reason, tokens)
            last = len(self.slots) - 1
            if i != last:
                self.cache.copy_prefix_from(self.cache, rows=[i], source_row=last)
                self.slots[i] = self.slots[last]
            self.cache.set_length(last, 0)
            self.slots.pop()

    def _finish_request(self, request: Request, reason: str, tokens: int, error: str | None = None) -> None:
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "completed")
        self.stats[key] += 1
        try:
            request.emit(DoneEvent(reason, tokens, error))
        except Exception:  # noqa: BLE001, S110 -- a consumer that went away must not stop the worker
            pass


class WorkerPool:
    """One BatchingWorker per device; each request goes to the least loaded."""

    def __init__(self, workers: list[BatchingWorker]):
        if not workers:
            raise ValueError("a WorkerPool needs at least one worker")
        self.workers = workers
        self._lock = threading.Lock()

    def start(self) -> "WorkerPool":
        for worker in self.workers:
            worker.start()
        return self

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def submit(self, request: Request) -> BatchingWorker:
        with self._lock:
            worker = min(self.workers, key=lambda w: len(w.slots) + w.pending.qsize())  # active plus queued
            worker.submit(request)
        return worker

    @property
    def queue_depth(self) -> int:
        return sum(worker.pending.qsize() for worker in self.workers)

    @property
    def active(self) -> int:
        return sum(len(worker.slots) for worker in self.workers)
