"""Continuous batching: concurrent generation requests share one model's decode steps.

Contract:
- A `BatchingWorker` owns one model and a KVCache of `max_batch` full-context rows. Its thread alternates one
  prefill forward with one decode step of all active rows. The prefill forward spends at most `prefill_budget`
  prompt tokens: queued short prompts (first come, first served, while rows are free) go through it together
  as one padded batch; a prompt longer than the budget goes alone, one budget-sized chunk per step. So a burst
  of arrivals costs the running streams one bounded forward per token, and its prompts share forwards instead of
  queueing one by one (dev/BENCHMARKS.md). A finished or cancelled request leaves at once and the last row moves
  into its place, so n requests are an n-row forward.
  `WorkerPool` spreads requests over workers (one per GPU), least loaded first.
- `submit(request)` is thread-safe. `request.emit(event)` is called on the worker thread: a `TokenEvent(token,
  mask)` per generated token (the stop token excluded; with `request.logprobs` = k also the token's
  log-probability and the k likeliest), then one `DoneEvent(finish_reason, completion_tokens)`, finish_reason
  "stop", "length" (max_tokens), "context", "cancelled" or "error".
- Each request samples with its own parameters and random stream (`engine.row_keys`), and a prompt's chunks
  start at the same positions whatever else is queued: its tokens do not depend on the other requests.

Not here: HTTP and text (nanochat/server.py); the KV cache, sampler and tool handling (nanochat/engine.py).
"""

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat.engine import Engine, KVCache, ToolState, finish_reason, row_keys, sample_next_token


@dataclass
class TokenEvent:
    token: int
    mask: int  # 1 = sampled, 0 = forced by the calculator tool
    logprob: float | None = None  # with Request.logprobs: the model's log-probability of `token`
    top_logprobs: list[tuple[int, float]] | None = None  # ... and its k likeliest (token, logprob), best first


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
    logprobs: int | None = None  # None = off; k >= 0: each TokenEvent carries logprob and the k likeliest
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


@dataclass
class _Wave:
    """Prompts being prefilled together: row j of `cache` holds requests[j]'s prompt, `fed` positions so far."""

    requests: list[Request]
    cache: KVCache
    fed: int = 0


class BatchingWorker:
    def __init__(
        self, model, tokenizer, max_batch=16, name="worker-0", compile_decode=False, backend=None, prefill_budget=512
    ):
        """compile_decode: Engine's torch.compile path; every step then runs all max_batch rows of a static cache
        (idle ones on a dummy token, reset after), compute that a bandwidth-bound GPU step hides.
        prefill_budget: prompt tokens (padding included) one prefill forward may take between two decode steps."""
        if max_batch < 1 or prefill_budget < 1:
            raise ValueError(f"max_batch and prefill_budget must be >= 1, got {max_batch} and {prefill_budget}")
        self.engine = Engine(model, tokenizer, compile_decode=compile_decode, backend=backend)
        self.model, self.max_batch, self.name, self.prefill_budget = model, max_batch, name, prefill_budget
        self.device = self.engine.device
        self.cache = KVCache.for_model(model, max_batch, self.engine.context_len, static=compile_decode)
        self.slots: list[_Slot] = []  # active requests; slot i lives in cache row i
        self.pending: queue.Queue[Request] = queue.Queue()
        self.waiting: deque[Request] = deque()  # taken from `pending` by the worker thread, not yet prefilling
        self.wave: _Wave | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        counters = ("requests", "completed", "cancelled", "errors", "tokens", "steps", "prefill_forwards")
        self.stats = dict.fromkeys(counters, 0)

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

    @property
    def queued(self) -> int:
        """Requests not yet decoding: in the queue, taken by the worker, or being prefilled."""
        wave = self.wave  # read once: the worker thread may end it meanwhile
        return self.pending.qsize() + len(self.waiting) + (len(wave.requests) if wave else 0)

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._take(block=not (self.slots or self.waiting or self.wave))
                self._prefill_step()
                if self.slots:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 -- a failed step ends its requests, never the worker
                message = f"{type(e).__name__}: {e}"
                for slot in self.slots:
                    self._finish_request(slot.request, "error", slot.generated, message)
                for request in self.wave.requests if self.wave else []:
                    if all(slot.request is not request for slot in self.slots):  # else it is answered above
                        self._finish_request(request, "error", 0, message)
                self.slots.clear()
                self.wave = None
                self.cache.lengths[:] = 0
                self.cache.lengths_tensor.zero_()

    def _take(self, block: bool) -> None:
        """Move everything queued into `waiting` (waiting up to 0.5 s for a first request when idle); a request
        that cannot run (cancelled already, no room in the context) is answered at once."""
        while True:
            try:
                request = self.pending.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if request is None:
                return
            block = False
            try:
                if not request.prompt:
                    raise ValueError("the prompt is empty; start it with <|bos|>")
                self.engine.token_budget(len(request.prompt), request.max_tokens)
            except ValueError as e:  # ContextFullError included: a bad request fails alone
                self._finish_request(request, "error", 0, f"{type(e).__name__}: {e}")
                continue
            if request.cancelled.is_set():
                self._finish_request(request, "cancelled", 0)
            else:
                self.waiting.append(request)

    def _prefill_step(self) -> None:
        """One prefill forward of at most `prefill_budget` tokens; requests whose prompts it completes sample their
        first token and join the decoding rows."""
        if self.wave is None:
            requests, longest = [], 0
            while self.waiting and len(self.slots) + len(requests) < self.max_batch:
                if self.waiting[0].cancelled.is_set():
                    self._finish_request(self.waiting.popleft(), "cancelled", 0)
                    continue
                longest_with = max(longest, len(self.waiting[0].prompt))
                if requests and (len(requests) + 1) * longest_with > self.prefill_budget:
                    break  # a prompt too long to share a forward waits for the next one, where it goes first
                requests.append(self.waiting.popleft())
                longest = longest_with
            if not requests:
                return
            self.wave = _Wave(requests, KVCache.for_model(self.model, len(requests), longest))
        wave = self.wave
        longest = max(len(request.prompt) for request in wave.requests)
        start, end = wave.fed, min(wave.fed + self.prefill_budget, longest)  # fixed chunks, alone or not
        pieces = [request.prompt[start:end] + [0] * (end - len(request.prompt)) for request in wave.requests]
        # the logits of every prompt's last position (the others are not needed): only rows ending in this chunk
        keep = end - min(len(request.prompt) for request in wave.requests) + 1 if end == longest else 1
        ids = torch.tensor(pieces, dtype=torch.long, device=self.device)  # (rows, end - start); padding after
        with torch.inference_mode():
            logits = self.model(ids, kv_cache=wave.cache, logits_to_keep=keep)  # (rows, keep, V)
        self.stats["prefill_forwards"] += 1
        wave.fed = end
        if end < longest:
            return  # a long prompt: its next chunk after the next decode step
        joined, last = [], []
        for row, request in enumerate(wave.requests):
            if request.cancelled.is_set():
                self._finish_request(request, "cancelled", 0)
                continue
            self.cache.copy_prefix_from(wave.cache, rows=[len(self.slots)], source_row=row)
            self.cache.set_length(len(self.slots), len(request.prompt))  # the padding after it is forgotten
            budget = self.engine.token_budget(len(request.prompt), request.max_tokens)
            key = row_keys(request.seed, request.sample_index + 1, self.device)[request.sample_index]
            self.slots.append(_Slot(request, budget, key, ToolState(self.engine.tokenizer)))
            joined.append(self.slots[-1])
            last.append(logits[row, keep - 1 - (end - len(request.prompt))])
        self.wave = None
        if joined:
            self._emit_next_tokens(joined, torch.stack(last))
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
        logprobs = {}  # slot index -> the model's log-probabilities over the vocabulary (V,)
        wanted = [i for i, slot in enumerate(slots) if slot.request.logprobs is not None]
        if wanted:
            # The model's own distribution, log_softmax of the raw logits: temperature, top-k and top-p are not
            # applied (what OpenAI reports), so a greedy token's logprob equals a plain forward's.
            rows = torch.log_softmax(logits[wanted].float(), dim=-1)
            logprobs = dict(zip(wanted, rows))
        for i, (slot, token) in enumerate(zip(slots, sampled)):
            token, mask = self.engine.next_token(slot.state, token)
            slot.last_token = token
            slot.generated += 1
            if slot.state.done:
                continue
            event = TokenEvent(token, mask)
            if i in logprobs:  # a token the tool forced gets the model's logprob for it too
                values, ids = logprobs[i].topk(slot.request.logprobs)
                event.logprob = logprobs[i][token].item()
                event.top_logprobs = list(zip(ids.tolist(), values.tolist()))
            slot.request.emit(event)
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
            worker = min(self.workers, key=lambda w: len(w.slots) + w.queued)  # active plus queued
            worker.submit(request)
        return worker

    @property
    def queue_depth(self) -> int:
        return sum(worker.queued for worker in self.workers)

    @property
    def active(self) -> int:
        return sum(len(worker.slots) for worker in self.workers)
