"""Fast generation: a preallocated KV cache, batched sampling, the calculator tool, replies as text.

Contract:
- `Engine(model, tokenizer).generate(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed)` prefills
  the prompt once, copies its cache into `num_samples` rows and yields a column of tokens and one of masks per
  step (1 = sampled, 0 = forced by the tool); `generate_batch` returns a `Completion` per row.
- Rows stop on `<|assistant_end|>` or `<|bos|>` (yielded, mask 1), at `max_tokens`, or when the context is full
  (`token_budget`; no room at all raises `ContextFullError`).
- Sampling: greedy at temperature 0, else temperature, top-k, top-p, with noise hashed from (seed, row, step,
  token id): row i of a request is the same alone, beside other requests, and on every device.
- Tool use: `<|python_start|> expr <|python_end|>` gets `<|output_start|> result <|output_end|>` forced (mask 0)
  from `nanochat.execution.use_calculator`. `ToolState` is the one reading of these markers, for the engine and
  for `ReplyRenderer` (text and tool calls for the server and the CLI).
- The model is used as given (load it in the compute dtype); `compile_decode=True` decodes through torch.compile
  over a static KV cache (CUDA graphs on a GPU).

Not here: chat rendering (tokenizer.py), many requests (batching.py), quantization (quantize.py), speculative
decoding (slower at this size: dev/LOG.md). The slow reference the tests hold this against is `GPT.generate`.
"""

import codecs
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from nanochat.execution import use_calculator
from nanochat.tokenizer import SPECIAL_TOKENS

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class ContextFullError(ValueError):
    """The conversation no longer fits in the model's context."""


# ---------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of `batch_size` rows of up to `max_len` positions, allocated once; gpt.py's protocol
    (`max_len`, `prepare(T)`, `insert_kv`). Each row has its own length (continuous batching), kept on the host
    too so shapes never wait for the device; state changes in place, so `head(n)` can share it.

    static=True makes every decode step the same computation on the same tensors (torch.compile and CUDA graphs
    capture it whole): attention spans all `max_len` keys and the step never reads the host lengths; the caller
    checks capacity and calls `advance_host` after each step.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, head_dim, max_len, dtype, device, static=False):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.lengths = np.zeros(batch_size, dtype=np.int64)  # host copy of each row's length
        self.lengths_tensor = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._key_index = torch.arange(max_len, device=device)
        self._positions = None  # (B, T) positions of the tokens being inserted, set by prepare
        self._span = max_len  # keys returned by insert_kv
        self._aligned = True
        self.static = static
        if static:  # fixed addresses let CUDA graphs write into the cache in place across replays
            from torch._dynamo import mark_static_address

            for tensor in (self.k, self.v, self.lengths_tensor):
                mark_static_address(tensor)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, static: bool = False) -> "KVCache":
        c = model.config
        dtype = model.compute_dtype or model.wte.weight.dtype
        device = model.wte.weight.device
        return cls(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len, dtype, device, static)

    def prepare(self, T: int):
        """Positions (B, T) of T new tokens per row, and the attention mask (None when every key is visible)."""
        positions = self.lengths_tensor[:, None] + self._key_index[:T]  # (B, T)
        self._positions = positions
        if self.static:
            return positions, (self._key_index <= positions[:, :, None])[:, None]  # (B, 1, T, max_len)
        end = int(self.lengths.max()) + T
        if end > self.max_len:
            raise ContextFullError(f"{end} positions do not fit in a KV cache of {self.max_len}")
        self._span = end
        self._aligned = bool(self.lengths.min() == self.lengths.max())
        if T == 1 and self._aligned:
            return positions, None
        # key j is visible to the new token at position p iff j <= p: the row's own past and itself. Stale
        # keys of a shorter row (beyond its length) sit at j > p and stay hidden.
        mask = self._key_index[:end] <= positions[:, :, None]  # (B, T, S)
        return positions, mask[:, None]  # (B, 1, T, S): the same for every head

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv_head, T, head_dim) at each row's positions; return keys and values 0..S-1."""
        T = k.size(2)
        if self._aligned and not self.static:
            start = int(self.lengths[0])
            self.k[layer_idx, :, :, start : start + T] = k
            self.v[layer_idx, :, :, start : start + T] = v
        else:
            index = self._positions[:, None, :, None].expand_as(k)  # (B, n_kv_head, T, head_dim)
            self.k[layer_idx].scatter_(2, index, k)
            self.v[layer_idx].scatter_(2, index, v)
        if layer_idx == self.num_layers - 1:
            self.lengths_tensor += T
            if not self.static:
                self.lengths += T
        if self.static:
            return self.k[layer_idx], self.v[layer_idx]
        return self.k[layer_idx, :, :, : self._span], self.v[layer_idx, :, :, : self._span]

    def advance_host(self, T: int) -> None:
        """Static caches: record on the host the T positions a step added on the device."""
        self.lengths += T

    def set_length(self, row: int, length: int) -> None:
        """Forget everything in `row` past `length` (0 frees the row)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} positions; cannot set its length to {length}")
        self.lengths[row] = length
        self.lengths_tensor[row] = length

    def head(self, num_rows: int) -> "KVCache":
        """The first `num_rows` rows as a cache sharing this one's storage, so n requests run an n-row forward."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k, view.v = self.k[:, :num_rows], self.v[:, :num_rows]
        view.lengths, view.lengths_tensor = self.lengths[:num_rows], self.lengths_tensor[:num_rows]
        view.batch_size = num_rows
        return view

    def copy_prefix_from(self, source: "KVCache", rows=None, source_row: int = 0) -> None:
        """Copy `source_row` of a cache (a prefilled prompt, or this one's row moving) into `rows` (default: all)."""
        rows = list(range(self.batch_size)) if rows is None else list(rows)
        length = int(source.lengths[source_row])
        if length > self.max_len:
            raise ContextFullError(f"a prefix of {length} positions does not fit in a KV cache of {self.max_len}")
        # (L, 1, H, length, D), broadcast over the rows
        self.k[:, rows, :, :length] = source.k[:, source_row : source_row + 1, :, :length]
        self.v[:, rows, :, :length] = source.v[:, source_row : source_row + 1, :, :length]
        self.lengths[rows] = length
        self.lengths_tensor[rows] = length


# ---------------------------------------------------------------------------- sampling
def _signed(value: int) -> int:
    """A uint64 constant as the int64 torch stores (arithmetic wraps modulo 2^64 either way)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it would copy the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele, Lea, Flood 2014): a bijection that scrambles every input bit."""
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def row_keys(seed: int, num_rows: int, device) -> torch.Tensor:
    """One random stream per row of a request: (num_rows,) int64, a function of (seed, row) only."""
    rows = torch.arange(num_rows, dtype=torch.long, device=device)
    return _mix(_mix(torch.full_like(rows, _signed(seed & ((1 << 64) - 1)))) + rows)


def _uniform(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float64 for each (row key, step, token id): keys, steps (B,), token_ids (B, K)."""
    golden = _signed(0x9E3779B97F4A7C15)
    x = _mix(_mix(keys + steps * golden)[:, None] + token_ids * golden)
    return (_shift_right(x, 11).double() + 0.5) * 2.0**-53  # top 53 bits, never exactly 0 or 1


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, keys=None, steps=None) -> torch.Tensor:
    """Next token (B,) from fp32 logits (B, V): argmax at temperature 0, else a draw from softmax(logits /
    temperature) cut to the top_k tokens, then to the smallest set reaching top_p: the argmax of the logits plus
    Gumbel noise (Gumbel 1954) hashed from (keys, steps, token id)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if keys is None or steps is None:
        raise ValueError("sampling at temperature > 0 needs keys and steps (see row_keys)")
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.size(-1):
        scaled, token_ids = torch.topk(scaled, top_k, dim=-1)  # (B, k), sorted descending
    elif top_p is not None and top_p < 1.0:
        scaled, token_ids = torch.sort(scaled, dim=-1, descending=True)
    else:
        token_ids = torch.arange(scaled.size(-1), device=scaled.device).expand_as(scaled)
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        scaled = scaled.masked_fill(before >= top_p, float("-inf"))  # the top token always stays (before = 0)
    gumbel = -torch.log(-torch.log(_uniform(keys, steps, token_ids)))
    choice = (scaled.double() + gumbel).argmax(dim=-1, keepdim=True)
    return token_ids.gather(-1, choice).squeeze(-1)


# ---------------------------------------------------------------------------- tool use and text
def finish_reason(stopped: bool, budget: int, max_tokens: int | None) -> str:
    """Why a reply of at most `budget` tokens ended: "stop" (its stop token), "length" (max_tokens) or "context"."""
    if stopped:
        return "stop"
    return "length" if max_tokens is not None and budget == max_tokens else "context"


class ToolState:
    """Where one reply stands in the calculator protocol: `<|python_start|> expression <|python_end|>`, then,
    unless the tool refused it, `<|output_start|> result <|output_end|>`. The engine keeps one per row (it runs
    the calculator when a call closes); ReplyRenderer reads replies with one, so the markers are parsed once."""

    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.tokenizer = tokenizer
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.expression: list[int] | None = None  # ids since <|python_start|>
        self.output: list[int] | None = None  # ids since <|output_start|>
        self.call: str | None = None  # a closed expression whose output may still follow
        self.forced: deque[int] = deque()  # the engine's: tokens to force before sampling again
        self.done = False  # the engine's: the row has stopped

    def push(self, token: int) -> tuple[str, tuple | None]:
        """Advance past `token`. Returns (kind, finished call): kind "text" (outside any tool block), "start",
        "call" (it closed an expression, now in self.call) or "tool" (a marker or a token inside a block); the
        finished call is (expression, output), output None when the tool refused it, or None."""
        finished = None
        if self.call is not None and self.output is None and token != self.output_start:
            finished, self.call = (self.call, None), None  # no output followed: the tool refused it
        if token == self.python_start:
            self.expression, self.output = [], None
            return "start", finished
        if token == self.python_end and self.expression is not None:
            self.call, self.expression = self.tokenizer.decode(self.expression), None
            return "call", finished
        if token == self.output_start and self.call is not None:
            self.output = []
        elif token == self.output_end and self.output is not None:
            finished = (self.call, self.tokenizer.decode(self.output))
            self.call, self.output = None, None
        elif self.output is not None:
            self.output.append(token)
        elif self.expression is not None:
            self.expression.append(token)
        else:
            return "text", finished
        return "tool", finished

    def finish(self) -> tuple | None:
        """The call still waiting for an output when the reply ends: the tool refused it."""
        finished, self.call = ((self.call, None) if self.call is not None else None), None
        return finished


class ReplyRenderer:
    """One reply's tokens -> pieces `("text", str)` and `("tool", expression, output or None)` as they arrive,
    the text decoded incrementally so that no multi-byte UTF-8 character is ever split. hide_special=True drops
    the other special tokens (they are protocol, not text); the API keeps them."""

    def __init__(self, tokenizer, hide_special: bool = False):
        self.tokenizer, self.state = tokenizer, ToolState(tokenizer)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.hidden = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS} if hide_special else set()

    def push(self, token: int) -> list[tuple]:
        kind, finished = self.state.push(token)
        pieces = [("tool", *finished)] if finished else []
        if kind == "start" or token in self.hidden:
            pieces += self._flush()  # a marker ends any partial character before it
        elif kind == "text":
            text = self.decoder.decode(self.tokenizer.id_to_bytes(token))
            pieces += [("text", text)] if text else []
        return pieces

    def _flush(self) -> list[tuple]:
        text = self.decoder.decode(b"", final=True)
        return [("text", text)] if text else []

    def finish(self) -> list[tuple]:
        finished = self.state.finish()
        return self._flush() + ([("tool", *finished)] if finished else [])


# ---------------------------------------------------------------------------- the engine
@dataclass
class Completion:
    tokens: list[int]  # generated tokens, the stop token excluded
    masks: list[int]  # 1 = sampled, 0 = forced by the tool
    finish_reason: str  # "stop" | "length" (max_tokens) | "context" (the model's context is full)


class Engine:
    def __init__(self, model, tokenizer, prefill_chunk: int = 512, compile_decode: bool = False, backend=None):
        """`prefill_chunk`: prompt tokens per prefill forward. `compile_decode`: torch.compile over a reused
        full-context static cache per batch size (CUDA graphs on CUDA; the first request per size compiles).
        `backend` overrides torch.compile's (tests use "aot_eager")."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer, self.prefill_chunk = model.eval(), tokenizer, prefill_chunk
        self.context_len = model.config.sequence_len
        self.device = model.wte.weight.device
        self._static_caches: dict[int, KVCache] = {}
        self.decode = self._decode_step  # one token per row (B, 1) -> logits (B, V); compiled with compile_decode
        if compile_decode:
            mode = "reduce-overhead" if self.device.type == "cuda" and backend is None else None
            backend = backend or "inductor"
            self.decode = torch.compile(self._decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)
        self.compile_decode = compile_decode
        self.stop_ids = {tokenizer.encode_special(name) for name in STOP_TOKENS}

    def token_budget(self, prompt_len: int, max_tokens: int | None = None) -> int:
        """Tokens a prompt of `prompt_len` may still be followed by: max_tokens (None = no limit), capped by the
        model's context. Raises ContextFullError when there is no room for even one."""
        room = self.context_len - prompt_len
        if room < 1:
            raise ContextFullError(
                f"the prompt is {prompt_len} tokens and the model's context is {self.context_len}: no room to "
                "reply; shorten the conversation (drop old turns) or start a new one"
            )
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        return room if max_tokens is None else min(room, max_tokens)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, tokens: list[int]) -> torch.Tensor:
        """Run `tokens` into a batch-1 cache in chunks; return the logits after the last one, (1, V) fp32."""
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = torch.tensor([tokens[start : start + self.prefill_chunk]], dtype=torch.long, device=self.device)
            logits = self.model(chunk, kv_cache=cache, logits_to_keep=1)
        return logits[:, -1]

    @torch.inference_mode()
    def generate(
        self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yields (token column, mask column) until every row stops (a stopped row repeats its stop token, mask 0)."""
        tokens, vocab_size = list(tokens), self.model.config.vocab_size
        if not tokens:
            raise ValueError("the prompt is empty; start it with <|bos|>")
        if any(not 0 <= t < vocab_size for t in tokens):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None (off), got {top_p}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        budget = self.token_budget(len(tokens), max_tokens)
        prompt_cache = KVCache.for_model(self.model, 1, len(tokens))
        logits = self.prefill(prompt_cache, tokens).expand(num_samples, -1)  # each row samples its own first token
        if self.compile_decode:  # one reused full-context static cache per batch size
            if num_samples not in self._static_caches:
                self._static_caches[num_samples] = KVCache.for_model(self.model, num_samples, self.context_len, True)
            cache = self._static_caches[num_samples]
        else:  # the last generated token is never fed back, so prompt + budget - 1 positions are enough
            cache = KVCache.for_model(self.model, num_samples, len(tokens) + budget - 1)
        cache.copy_prefix_from(prompt_cache)
        del prompt_cache
        keys = row_keys(seed, num_samples, self.device)
        rows = [ToolState(self.tokenizer) for _ in range(num_samples)]
        column = [0] * num_samples  # a row that has stopped keeps its last token
        for step in range(budget):
            steps = torch.full((num_samples,), step, dtype=torch.long, device=self.device)
            sampled = sample_next_token(logits, temperature, top_k, top_p, keys, steps).tolist()
            masks = [0] * num_samples
            for i, row in enumerate(rows):
                if not row.done:
                    column[i], masks[i] = self.next_token(row, sampled[i])
            yield list(column), masks
            if all(row.done for row in rows) or step == budget - 1:
                return
            ids = torch.tensor(column, dtype=torch.long, device=self.device)[:, None]
            logits = self.decode(ids, cache)
            if cache.static:
                cache.advance_host(1)

    def _decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(ids, kv_cache=cache)[:, -1]

    def next_token(self, row: ToolState, sampled: int) -> tuple[int, int]:
        """(token, mask) for a row: a token the tool forces (mask 0) or the sampled one (mask 1); the row's
        tool state advances past it and, when a call closes, the calculator's result is queued to be forced."""
        forced = bool(row.forced)
        token = row.forced.popleft() if forced else sampled
        if token in self.stop_ids and not forced:
            row.done = True
        elif row.push(token)[0] == "call":
            result = use_calculator(row.call)
            if result is not None:  # a refused expression gets no output; the model goes on by itself
                row.forced.extend([row.output_start, *self.tokenizer.encode(str(result)), row.output_end])
        return token, 0 if forced else 1

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, **sampling) -> list[Completion]:
        """Runs `generate` to the end: one Completion per sample (the prompt and the stop token excluded)."""
        budget = self.token_budget(len(tokens), max_tokens)
        completions = [Completion([], [], "") for _ in range(num_samples)]
        for column, masks in self.generate(tokens, num_samples, max_tokens, **sampling):
            for completion, token, mask in zip(completions, column, masks):
                if completion.finish_reason:
                    continue
                if token in self.stop_ids and mask == 1:
                    completion.finish_reason = "stop"
                else:
                    completion.tokens.append(token)
                    completion.masks.append(mask)
        for completion in completions:
            completion.finish_reason = completion.finish_reason or finish_reason(False, budget, max_tokens)
        return completions
