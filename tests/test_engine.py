"""nanochat.engine on CPU: the engine against the slow reference `GPT.generate`, the KV cache, sampling, the
calculator tool, stop conditions, the context limit, finish reasons and the reply renderer."""

import pytest
import torch

from nanochat.engine import Engine, KVCache, ReplyRenderer, finish_reason, row_keys, sample_next_token
from nanochat.gpt import GPT, GPTConfig

VOCAB = 512


# Every part of the 2026 recipe on: short windows (4 keys) so prompts and replies run far past them
NEW_PARTS = {"value_embeds": True, "resid_scalars": True, "backout": True, "window_pattern": "SL", "short_window": 4,
             "qk_scale": 1.2, "n_layer": 3}  # fmt: skip


def randomized(seed=0, n_layer=2, n_kv_head=2, n_embd=64, sequence_len=64, **parts) -> GPT:
    """A tiny model with every weight random (the default init zeroes projections and lm_head)."""
    config = GPTConfig(sequence_len, VOCAB, n_layer, n_head=4, n_kv_head=n_kv_head, n_embd=n_embd, **parts)
    torch.manual_seed(seed)
    model = GPT.build(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name == "wte.weight" else 0.3)
    return model.eval()


class ScriptedModel(GPT):
    """A real GPT (so the cache is exercised) whose logits are replaced by a plan: it says the next token of
    `plan` after each token it is fed, or `after_output` once it has been fed <|output_end|>."""

    def __init__(self, plan, tokenizer, sequence_len=64):
        super().__init__(GPTConfig(sequence_len, VOCAB, 1, 2, 2, 32))
        self.init_weights()
        self.plan, self.fed = list(plan), []
        self.output_end = tokenizer.encode_special("<|output_end|>")
        self.after_output = tokenizer.encode_special("<|assistant_end|>")

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_to_keep=0):
        super().forward(idx, kv_cache=kv_cache, logits_to_keep=1)
        first_call = not self.fed
        self.fed += idx[0].tolist()
        if self.output_end in self.fed:
            token = self.after_output
        else:
            generated = 0 if first_call else len(self.fed) - self.prompt_len
            token = self.plan[min(generated, len(self.plan) - 1)]
        if first_call:
            self.prompt_len = len(self.fed)
        logits = torch.full((idx.size(0), 1, VOCAB), -10.0)
        logits[:, :, token] = 10.0
        return logits


def prompt_of(tokenizer, text="The history of the city"):
    return tokenizer.encode(text, prepend="<|bos|>")


# ---------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("n_kv_head, parts", [(4, {}), (2, {}), (1, {}), (2, NEW_PARTS), (1, NEW_PARTS)])
def test_greedy_engine_equals_the_uncached_reference(small_tokenizer, n_kv_head, parts):
    model = randomized(seed=n_kv_head, n_kv_head=n_kv_head, **parts)
    engine = Engine(model, small_tokenizer, prefill_chunk=4)
    for text in ["The history of the city", "In 1990, a new", "x"]:
        prompt = prompt_of(small_tokenizer, text)
        reference = list(model.generate(prompt, max_tokens=24, temperature=0))
        completion = engine.generate_batch(prompt, max_tokens=24, temperature=0)[0]
        stopped = completion.finish_reason == "stop"
        assert completion.tokens == reference[: len(completion.tokens)]
        assert len(completion.tokens) == 24 or stopped
        if stopped:  # the reference has no stop rule: it emitted the stop token at the same place
            assert reference[len(completion.tokens)] in engine.stop_ids


@pytest.mark.parametrize("parts", [{}, NEW_PARTS])
def test_chunked_prefill_equals_one_shot(small_tokenizer, parts):
    model = randomized(seed=3, **parts)
    prompt = prompt_of(small_tokenizer, "A long prompt, long enough to be cut into several chunks of tokens.")
    results = []
    for chunk in [1, 3, 7, 1000]:
        engine = Engine(model, small_tokenizer, prefill_chunk=chunk)
        cache = KVCache.for_model(model, 1, len(prompt))
        results.append((engine.prefill(cache, prompt), cache))
    logits, cache = results[-1]
    assert cache.lengths.tolist() == [len(prompt)]
    for other_logits, other_cache in results[:-1]:
        assert torch.allclose(other_logits, logits, atol=1e-5)
        assert torch.allclose(other_cache.k, cache.k, atol=1e-5) and torch.allclose(other_cache.v, cache.v, atol=1e-5)


@pytest.mark.parametrize("parts", [{}, NEW_PARTS])
def test_rows_at_different_positions_decode_as_if_alone(small_tokenizer, parts):
    """Continuous batching's case: two prompts of different lengths in one cache, decoded in one forward."""
    model = randomized(seed=4, **parts)
    engine = Engine(model, small_tokenizer)
    prompts = [prompt_of(small_tokenizer, "Short"), prompt_of(small_tokenizer, "A much longer prompt than the first")]
    assert len(prompts[0]) != len(prompts[1])
    batch = KVCache.for_model(model, 2, 40)
    alone = []
    for row, prompt in enumerate(prompts):
        single = KVCache.for_model(model, 1, 40)
        engine.prefill(single, prompt)
        batch.copy_prefix_from(single, rows=[row])
        next_ids = torch.tensor([[7]])
        alone.append(model(next_ids, kv_cache=single)[:, -1])
        alone.append(model(torch.tensor([[9]]), kv_cache=single)[:, -1])
    assert batch.lengths.tolist() == [len(p) for p in prompts]
    first = model(torch.tensor([[7], [7]]), kv_cache=batch)[:, -1]
    second = model(torch.tensor([[9], [9]]), kv_cache=batch)[:, -1]
    assert torch.allclose(first, torch.cat([alone[0], alone[2]]), atol=1e-5)
    assert torch.allclose(second, torch.cat([alone[1], alone[3]]), atol=1e-5)
    batch.set_length(1, len(prompts[1]))  # roll row 1 back: decoding 7 again gives the same logits
    assert batch.lengths.tolist() == [len(prompts[0]) + 2, len(prompts[1])]
    again = model(torch.tensor([[9], [7]]), kv_cache=batch)[:, -1]
    assert torch.allclose(again[1], alone[2][0], atol=1e-5)


def test_head_view_shares_the_cache_and_copy_prefix_from_moves_a_row(small_tokenizer):
    """The batching worker runs n active rows through head(n) and compacts finished rows with copy_prefix_from."""
    model = randomized(seed=10)
    engine = Engine(model, small_tokenizer)
    cache = KVCache.for_model(model, 3, 40)
    for row, text in enumerate(["One", "Two words", "Three words here"]):
        single = KVCache.for_model(model, 1, 40)
        engine.prefill(single, prompt_of(small_tokenizer, text))
        cache.copy_prefix_from(single, rows=[row])
    lengths = cache.lengths.tolist()
    cache.copy_prefix_from(cache, rows=[0], source_row=2)  # row 0 leaves; the last row takes its place
    assert cache.lengths.tolist() == [lengths[2], lengths[1], lengths[2]]
    head = cache.head(2)
    logits = model(torch.tensor([[5], [6]]), kv_cache=head)[:, -1]
    assert cache.lengths.tolist() == [lengths[2] + 1, lengths[1] + 1, lengths[2]]  # advanced through the view
    assert cache.lengths_tensor.tolist() == cache.lengths.tolist()
    # row 0 now continues "Three words here": the same logits as that prompt alone
    single = KVCache.for_model(model, 1, 40)
    engine.prefill(single, prompt_of(small_tokenizer, "Three words here"))
    alone = model(torch.tensor([[5]]), kv_cache=single)[:, -1]
    assert torch.allclose(logits[0], alone[0], atol=1e-5)
    assert torch.allclose(cache.k[:, 0, :, : lengths[2] + 1], single.k[:, 0, :, : lengths[2] + 1], atol=1e-5)


# ---------------------------------------------------------------------------- sampling


def test_samples_are_reproducible_by_seed_and_independent_per_row(small_tokenizer):
    model = randomized(seed=5)
    engine = Engine(model, small_tokenizer)
    prompt = prompt_of(small_tokenizer)

    def run(num_samples, seed):
        completions = engine.generate_batch(prompt, num_samples, max_tokens=12, temperature=1.5, seed=seed)
        return [c.tokens for c in completions]

    four = run(4, seed=1)
    assert run(4, seed=1) == four
    assert run(4, seed=2) != four
    assert len({tuple(tokens[:1]) for tokens in four}) > 1  # each row sampled its own first token
    assert len({tuple(tokens) for tokens in four}) == 4
    assert run(2, seed=1) == four[:2]  # row i depends on (seed, i) only, not on how many rows run


def test_top_k_and_top_p_never_sample_outside_their_sets():
    torch.manual_seed(0)
    logits = torch.randn(3, 100) * 3
    keys = row_keys(7, 3, "cpu")
    top5 = set()
    for step in range(300):
        steps = torch.full((3,), step)
        token = sample_next_token(logits, 1.0, top_k=5, keys=keys, steps=steps)
        assert all(token[i].item() in logits[i].topk(5).indices.tolist() for i in range(3))
        top5.add(token[0].item())
        token = sample_next_token(logits, 0.7, top_p=0.5, keys=keys, steps=steps)
        for i in range(3):
            probs = torch.softmax(logits[i] / 0.7, dim=-1)
            order = probs.argsort(descending=True)
            needed = int((probs[order].cumsum(0) < 0.5).sum()) + 1  # smallest prefix reaching 0.5
            assert token[i].item() in order[:needed].tolist()
    assert len(top5) == 5  # and every member of the set does get sampled
    greedy = sample_next_token(logits, 0.0)
    assert torch.equal(greedy, logits.argmax(dim=-1))
    only_one = sample_next_token(logits, 1.0, top_k=1, keys=keys, steps=torch.zeros(3, dtype=torch.long))
    assert torch.equal(only_one, greedy)


def test_sampling_follows_the_softmax():
    """The hashed Gumbel noise draws from softmax(logits / T): frequencies over 20,000 draws match it."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    temperature, draws = 0.8, 20_000
    keys = row_keys(3, draws, "cpu")  # one row per draw, every row with its own key
    steps = torch.zeros(draws, dtype=torch.long)
    tokens = sample_next_token(logits.expand(draws, -1), temperature, keys=keys, steps=steps)
    frequencies = torch.bincount(tokens, minlength=5).double() / draws
    expected = torch.softmax(logits[0].double() / temperature, dim=-1)
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((frequencies - expected).abs() < 5 * standard_error).all(), (frequencies, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_samples": 0}, "num_samples"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_arguments_are_clear_errors(small_tokenizer, kwargs, message):
    engine = Engine(randomized(), small_tokenizer)
    with pytest.raises(ValueError, match=message):
        engine.generate_batch(prompt_of(small_tokenizer), **{"max_tokens": 4, **kwargs})


def test_bad_prompts_are_clear_errors(small_tokenizer):
    engine = Engine(randomized(), small_tokenizer)
    with pytest.raises(ValueError, match="empty"):
        engine.generate_batch([], max_tokens=4)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        engine.generate_batch([1, 2, 9999], max_tokens=4)


# ---------------------------------------------------------------------------- tool use and stopping


def test_calculator_call_gets_its_output_forced_with_mask_zero(small_tokenizer):
    tok = small_tokenizer
    special = tok.encode_special
    expression = tok.encode("12*5")
    plan = [special("<|python_start|>"), *expression, special("<|python_end|>"), tok.encode(" x")[0]]
    model = ScriptedModel(plan, tok)
    engine = Engine(model, tok)
    completion = engine.generate_batch(prompt_of(tok), max_tokens=30, temperature=1.0, top_k=3)[0]
    forced = [special("<|output_start|>"), *tok.encode("60"), special("<|output_end|>")]
    called = [special("<|python_start|>"), *expression, special("<|python_end|>")]
    assert completion.tokens == called + forced
    assert completion.masks == [1] * len(called) + [0] * len(forced)
    assert completion.finish_reason == "stop"  # the plan says <|assistant_end|> once the output was fed back


def test_refused_expression_gets_no_output(small_tokenizer):
    tok = small_tokenizer
    special = tok.encode_special
    plan = [special("<|python_start|>"), *tok.encode("__import__('os')"), special("<|python_end|>"), tok.encode("a")[0]]
    completion = Engine(ScriptedModel(plan, tok), tok).generate_batch(prompt_of(tok), max_tokens=25, temperature=0)[0]
    assert special("<|output_start|>") not in completion.tokens
    assert set(completion.masks) == {1} and completion.finish_reason == "length"


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_stop_tokens_and_max_tokens(small_tokenizer, stop):
    tok = small_tokenizer
    words = tok.encode(" one two")
    plan = [*words, tok.encode_special(stop)]

    def fresh_engine():  # the scripted model counts what it was fed, so each run needs its own
        return Engine(ScriptedModel(plan, tok), tok)

    completion = fresh_engine().generate_batch(prompt_of(tok), max_tokens=20, temperature=0)[0]
    assert completion.tokens == words and completion.finish_reason == "stop"
    streamed = list(fresh_engine().generate(prompt_of(tok), 1, 20, 0))
    assert [column[0] for column, _ in streamed] == plan  # the stop token is yielded
    short = fresh_engine().generate_batch(prompt_of(tok), 1, 1, temperature=0)
    assert short[0].tokens == words[:1] and short[0].finish_reason == "length"


def test_finished_rows_wait_with_mask_zero(small_tokenizer):
    model = randomized(seed=6)
    engine = Engine(model, small_tokenizer)
    steps = list(engine.generate(prompt_of(small_tokenizer), num_samples=6, max_tokens=40, temperature=2.0, seed=3))
    for row in range(6):
        tokens = [column[row] for column, _ in steps]
        masks = [mask[row] for _, mask in steps]
        ended = [i for i, t in enumerate(tokens) if t in engine.stop_ids and masks[i] == 1]
        if ended:
            first = ended[0]
            assert tokens[first + 1 :] == [tokens[first]] * (len(tokens) - first - 1)
            assert masks[first + 1 :] == [0] * (len(tokens) - first - 1)


def test_never_runs_past_the_context(small_tokenizer):
    model = randomized(seed=7, sequence_len=32)
    engine = Engine(model, small_tokenizer)
    prompt = (prompt_of(small_tokenizer, "The history of the city of London") * 4)[:28]
    assert engine.token_budget(len(prompt), 100) == 4
    completion = engine.generate_batch(prompt, max_tokens=100, temperature=0)[0]
    assert len(completion.tokens) <= 4
    if completion.finish_reason != "stop":
        assert completion.finish_reason == "context" and len(completion.tokens) == 4
    assert engine.generate_batch(prompt, max_tokens=3, temperature=0)[0].finish_reason in ("length", "stop")
    with pytest.raises(ValueError, match="no room to reply"):
        engine.generate_batch(prompt * 2, max_tokens=5)
    cache = KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# ---------------------------------------------------------------------------- text


def test_reply_text_never_splits_a_character(small_tokenizer):
    text = "naïve café — 日本語 ✓ 🙂 done"
    ids = small_tokenizer.encode(text)
    assert any(len(small_tokenizer.id_to_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # partial bytes
    renderer = ReplyRenderer(small_tokenizer)
    pieces = [piece[1] for i in ids for piece in renderer.push(i)] + [piece[1] for piece in renderer.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


# ---------------------------------------------------------------------------- compiled decode


@pytest.mark.slow  # ~15-30 s: tracing the model once
def test_compiled_decode_is_one_graph_and_equals_eager(small_tokenizer):
    """The static cache makes every decode step the same graph: one capture serves prompts of any length and
    any seed (CUDA graphs need exactly that), and the tokens equal the eager engine's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = randomized(seed=11)
    eager = Engine(model, small_tokenizer)
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(model, small_tokenizer, compile_decode=True, backend="aot_eager")
    for text, seed in [("The history of the city", 1), ("A", 2), ("In 1990, a new law was passed", 3)]:
        prompt = prompt_of(small_tokenizer, text)
        kwargs = {"num_samples": 2, "max_tokens": 16, "temperature": 0.9, "top_k": 20, "seed": seed}
        expected = [c.tokens for c in eager.generate_batch(prompt, **kwargs)]
        assert [c.tokens for c in compiled.generate_batch(prompt, **kwargs)] == expected
    assert counters["stats"]["unique_graphs"] == 1  # no recompilation across requests
    assert compiled._static_caches[2].max_len == model.config.sequence_len


# ---------------------------------------------------------------------------- replies as text and tool calls


def test_reply_renderer_turns_tool_tokens_into_tool_pieces(small_tokenizer):
    tok = small_tokenizer
    special = tok.encode_special
    tokens = [
        *tok.encode("We get "), special("<|python_start|>"), *tok.encode("12*5"), special("<|python_end|>"),
        special("<|output_start|>"), *tok.encode("60"), special("<|output_end|>"), *tok.encode(" so"),
        special("<|python_start|>"), *tok.encode("bad"), special("<|python_end|>"), *tok.encode(" end"),
        special("<|user_start|>"), special("<|python_start|>"), *tok.encode("1+"), special("<|python_end|>"),
    ]  # fmt: skip
    for hide_special, marker in [(False, "<|user_start|>"), (True, "")]:
        renderer = ReplyRenderer(tok, hide_special)
        pieces = [piece for t in tokens for piece in renderer.push(t)] + renderer.finish()
        assert "".join(p[1] for p in pieces if p[0] == "text") == f"We get  so end{marker}"
        assert [p for p in pieces if p[0] == "tool"] == [
            ("tool", "12*5", "60"),
            ("tool", "bad", None),
            ("tool", "1+", None),
        ]


def test_the_renderer_reads_the_engines_replies_as_the_engine_ran_them(small_tokenizer):
    """The engine and the renderer share ToolState: the tool call the engine answered is the one rendered."""
    tok = small_tokenizer
    special = tok.encode_special
    plan = [special("<|python_start|>"), *tok.encode("7*6"), special("<|python_end|>"), tok.encode(" x")[0]]
    completion = Engine(ScriptedModel(plan, tok), tok).generate_batch(prompt_of(tok), max_tokens=30, temperature=0)[0]
    renderer = ReplyRenderer(tok)
    pieces = [piece for t in completion.tokens for piece in renderer.push(t)] + renderer.finish()
    assert pieces == [("tool", "7*6", "42")]


def test_finish_reason_is_length_only_when_max_tokens_was_reached():
    assert finish_reason(True, 10, 10) == "stop"
    assert finish_reason(False, 10, 10) == "length"
    assert finish_reason(False, 4, 10) == "context"  # the context left room for 4 of the 10 tokens asked
    assert finish_reason(False, 4, None) == "context"  # no max_tokens: only the context ends a reply
