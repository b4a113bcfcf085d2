"""The web server for real: uvicorn on 127.0.0.1 serving a tiny random model, driven over HTTP by httpx, the
official `openai` client, concurrent streams, dropped clients (the OpenAI surface and fuzzing with the key:
tests/test_server_openai.py)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import httpx
import pytest
import torch
import uvicorn

from conftest import REPO
from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.engine import Engine, ReplyRenderer
from nanochat.gpt import GPT, GPTConfig
from nanochat.quantize import quantize_model
from nanochat.server import Settings, StopMatcher, create_app, openai_text


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT.build(GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name == "wte.weight" else 0.2)
    return model.eval()


class SlowModel(GPT):
    """A tiny model that never stops by itself and takes 50 ms a forward: requests that stay in flight."""

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_to_keep=0):
        logits = super().forward(idx, kv_cache=kv_cache, logits_to_keep=logits_to_keep)
        time.sleep(0.05)
        logits[..., self.config.vocab_size - 9 :] = float("-inf")  # the 9 special tokens come last
        return logits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread on a free port, stopped on exit."""

    def __init__(self, settings: Settings):
        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).json()["ready"]:
                    return self
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready in 60 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_and_tokenizer(small_tokenizer):
    return tiny_model(), small_tokenizer


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = Settings(
        model_loader=lambda i: (model, tokenizer, "nanochat-test"),
        max_batch=16,
        max_tokens=24,
        max_tokens_limit=64,
        max_messages=6,
        max_message_chars=400,
        max_total_chars=1000,
    )
    with ServerThread(settings) as running:
        yield running


USER = [{"role": "user", "content": "Tell me about the history of the city"}]


def read_sse(response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


# ---------------------------------------------------------------------------- the page's API


def test_health_and_models(server):
    health = httpx.get(server.url + "/health").json()
    assert health["ready"] and health["model"] == "nanochat-test" and health["device"] == "cpu"
    assert health["queue_depth"] == 0 and health["workers"] == 1
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "nanochat-test"
    assert httpx.get(server.url + "/stats").json()["workers"][0]["name"] == "worker-0"


def test_page_stream_format_and_termination(server, model_and_tokenizer):
    body = {"messages": USER, "temperature": 0.0, "max_tokens": 20}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert events[-1]["type"] == "done" and [e["type"] for e in events].count("done") == 1
    assert all(e["type"] in ("text", "tool") for e in events[:-1])
    done = events[-1]
    assert done["finish_reason"] in ("stop", "length") and 1 <= done["usage"]["completion_tokens"] <= 20
    # the streamed text is the engine's greedy reply for the same prompt, decoded whole
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.render_for_completion(USER)
    assert done["usage"]["prompt_tokens"] == len(prompt)
    expected = Engine(model, tokenizer).generate_batch(prompt, max_tokens=20, temperature=0)[0]
    if not any(t in expected.tokens for t in [tokenizer.encode_special("<|python_start|>")]):
        assert "".join(e.get("text", "") for e in events) == tokenizer.decode(expected.tokens)


# ---------------------------------------------------------------------------- OpenAI compatibility


def test_openai_client_non_streaming_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="nanochat-test", messages=USER, max_tokens=12, temperature=0.7, seed=5, n=2
    )
    assert reply.object == "chat.completion" and len(reply.choices) == 2
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in reply.choices)
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    again = client.chat.completions.create(
        model="nanochat-test", messages=USER, max_tokens=12, temperature=0.7, seed=5, n=2
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]

    stream = client.chat.completions.create(
        model="nanochat-test",
        messages=USER,
        max_tokens=12,
        temperature=0.7,
        seed=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in reply.choices]  # same seed, same answers, streamed or not
    assert reasons == [c.finish_reason for c in reply.choices]
    assert usage.completion_tokens == reply.usage.completion_tokens


def test_stop_sequences_cut_the_reply(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    full = client.chat.completions.create(model="nanochat-test", messages=USER, max_tokens=40, temperature=0).choices[0]
    text = full.message.content
    assert len(text) > 6
    stop = text[3:6]
    cut = client.chat.completions.create(
        model="nanochat-test", messages=USER, max_tokens=40, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_stop_matcher_holds_back_partial_matches():
    matcher = StopMatcher(["END", "xyz"])
    assert matcher.push("abc E") == "abc "  # "E" may begin "END"
    assert matcher.push("N") == ""
    assert matcher.push("Dmore") == "" and matcher.stopped
    plain = StopMatcher(["END"])
    assert plain.push("hello E") == "hello " and plain.push("nd") == "End" and plain.pending == ""


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": 5.0}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": USER * 7}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 401}]}, "messages.0.content"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x" * 400}] * 3}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages.1.role"),
        ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}, "messages"),
    ],
)
def test_every_limit_is_a_400_naming_the_field(server, change, param):
    body = {"messages": USER, "max_tokens": 4, **change}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]


def test_malformed_json_and_overlong_conversation_are_400(server):
    response = httpx.post(
        server.url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()
    # 950 characters (under the character limit) but more tokens than the model's 256-position context
    long_turns = [{"role": r, "content": "9 " * 95} for r in ("user", "assistant", "user", "assistant", "user")]
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": long_turns, "max_tokens": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "context" in error["message"] and error["param"] == "messages"


# ---------------------------------------------------------------------------- batching


async def _stream_text(client: httpx.AsyncClient, url: str, seed: int) -> str:
    body = {"messages": USER, "temperature": 1.0, "top_k": 40, "max_tokens": 24, "seed": seed}
    text = ""
    async with client.stream("POST", url + "/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] != "error", event
                text += event.get("text", "")
    return text


def test_sixteen_concurrent_streams_each_equal_its_answer_alone(server):
    async def run():
        async with httpx.AsyncClient() as client:
            alone = [await _stream_text(client, server.url, seed) for seed in range(16)]
            together = await asyncio.gather(*(_stream_text(client, server.url, seed) for seed in range(16)))
        return alone, together

    steps_before = httpx.get(server.url + "/stats").json()["workers"][0]["steps"]
    alone, together = asyncio.run(run())
    assert together == alone
    assert len(set(alone)) > 8  # different seeds, different answers
    # shared decode steps: 16 streams took far fewer steps than 32 one-at-a-time runs of up to 24 tokens each
    steps = httpx.get(server.url + "/stats").json()["workers"][0]["steps"] - steps_before
    assert steps < 16 * 24 + 2 * 24


def test_a_burst_of_arrivals_does_not_stall_a_running_stream(model_and_tokenizer):
    """16 requests arriving while a stream decodes share prefill forwards, one between two decode steps: the
    stream's tokens keep coming (before, the 16 were prefilled one by one, 16 x 50 ms without a token)."""
    model, tokenizer = model_and_tokenizer
    settings = Settings(model_loader=lambda i: (slow_copy(model), tokenizer, "slow"), max_tokens=64)

    async def run(url):
        async with httpx.AsyncClient() as client:
            body, gaps, burst, last = {"messages": USER, "temperature": 1.0, "max_tokens": 48}, [], None, None
            async with client.stream("POST", url + "/chat/completions", json=body, timeout=60) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.monotonic()
                    if burst is not None and not burst.done():
                        gaps.append(now - last)
                    last = now
                    if burst is None:  # the stream is decoding: now the burst
                        burst = asyncio.ensure_future(
                            asyncio.gather(*(_stream_text(client, url, seed) for seed in range(16)))
                        )
            await burst
        return gaps

    with ServerThread(settings) as running:
        forwards = httpx.get(running.url + "/stats").json()["workers"][0]["prefill_forwards"]
        gaps = asyncio.run(run(running.url))
        worker = httpx.get(running.url + "/stats").json()["workers"][0]
    assert worker["completed"] == 17 and len(gaps) >= 10
    assert max(gaps) < 0.4, sorted(gaps)[-3:]  # a decode step or two (50 ms each) at most, never 16 prefills
    assert worker["prefill_forwards"] - forwards < 16  # arrivals shared forwards


def test_prompts_prefilled_together_or_in_chunks_answer_as_the_engine_does_alone(model_and_tokenizer):
    """A BatchingWorker with a 16-token prefill budget: two short prompts share a forward, a 40-token prompt goes
    alone in chunks of 16, 16 and 8 between decode steps; each reply is the engine's for its prompt alone."""
    from nanochat.batching import BatchingWorker, DoneEvent, Request

    model, tokenizer = model_and_tokenizer
    bos = tokenizer.get_bos_token_id()
    prompts = [[bos, 10, 11, 12], [bos, 20, 21, 22], [bos, 30, 31, 32, 33, 34], [bos, *range(40, 79)]]
    worker = BatchingWorker(model, tokenizer, max_batch=8, prefill_budget=16)
    replies = [[] for _ in prompts]
    done = threading.Semaphore(0)
    for i, prompt in enumerate(prompts):  # all queued before the worker starts: the waves are known
        emit = lambda event, i=i: done.release() if isinstance(event, DoneEvent) else replies[i].append(event.token)  # noqa: E731
        worker.submit(Request(prompt, emit, max_tokens=10, temperature=1.0, seed=i))
    worker.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        worker.stop()
    engine = Engine(model, tokenizer)
    for i, prompt in enumerate(prompts):
        assert replies[i] == engine.generate_batch(prompt, max_tokens=10, temperature=1.0, seed=i)[0].tokens, i
    assert worker.stats["prefill_forwards"] == 1 + 1 + 3  # {4, 4}, {6}, then 40 in three chunks


def slow_copy(model) -> "SlowModel":
    slow = SlowModel(model.config)
    slow.load_state_dict(model.state_dict())
    return slow.eval()


def idle_worker(url: str) -> dict:
    """The worker's stats once no request is active or in flight (20 s at most): a dropped client's rows are freed."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(url + "/stats").json()
        worker = stats["workers"][0]
        if worker["active"] == 0 and stats["in_flight"] == 0:
            return worker
        time.sleep(0.05)
    raise AssertionError(f"rows still busy after 20 s: {stats}")


def test_a_client_that_drops_frees_its_row(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = Settings(model_loader=lambda i: (slow_copy(model), tokenizer, "slow"), max_tokens=64)
    with ServerThread(settings) as running:
        body = {"messages": USER, "temperature": 1.0, "max_tokens": 64}  # 64 x 50 ms: still running when we go
        with httpx.stream("POST", running.url + "/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # one event, then hang up
        worker = idle_worker(running.url)
        assert worker["cancelled"] == 1 and worker["completed"] == 0
        assert worker["tokens"] < 40  # freed long before its 64 tokens


def test_a_non_streaming_client_that_drops_frees_its_rows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = Settings(model_loader=lambda i: (slow_copy(model), tokenizer, "slow"), max_tokens=64)
    with ServerThread(settings) as running:
        body = {"messages": USER, "n": 4, "max_tokens": 64, "stream": False}  # 4 rows x 64 x 50 ms: 3 s and more
        with pytest.raises(httpx.ReadTimeout):  # hang up while the reply is being decoded
            httpx.post(running.url + "/v1/chat/completions", json=body, timeout=0.5)
        worker = idle_worker(running.url)
        assert worker["cancelled"] == 4 and worker["completed"] == 0
        assert worker["tokens"] < 4 * 40  # freed long before their 4 x 64 tokens


# ---------------------------------------------------------------------------- access control


def test_bearer_token_and_concurrency_cap(model_and_tokenizer):
    fast, tokenizer = model_and_tokenizer
    model = slow_copy(fast)
    settings = Settings(
        model_loader=lambda i: (model, tokenizer, "guarded"), api_key="s3cret", max_concurrent=1, max_tokens=64
    )
    with ServerThread(settings) as running:
        body = {"messages": USER, "max_tokens": 4}
        assert httpx.post(running.url + "/v1/chat/completions", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(running.url + "/v1/chat/completions", json=body, headers=wrong).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(running.url + "/v1/chat/completions", json=body, headers=good).status_code == 200
        assert httpx.get(running.url + "/health").status_code == 200  # health stays open for monitors
        long_body = {"messages": USER, "max_tokens": 64, "temperature": 1.0}
        with httpx.stream("POST", running.url + "/chat/completions", json=long_body, headers=good) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it would close the stream
            next(lines)
            busy = httpx.post(running.url + "/v1/chat/completions", json=body, headers=good)
            assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]


# ---------------------------------------------------------------------------- several workers


def test_requests_are_balanced_across_workers(model_and_tokenizer):
    """--num-gpus N runs one worker per device; here two CPU workers, each with its own copy of the model."""
    model, tokenizer = model_and_tokenizer
    settings = Settings(model_loader=lambda i: (slow_copy(model), tokenizer, "pair"), num_gpus=2, max_tokens=8)

    async def run(url):
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(_stream_text(client, url, seed) for seed in range(8)))

    with ServerThread(settings) as running:
        assert httpx.get(running.url + "/health").json()["workers"] == 2
        asyncio.run(run(running.url))
        workers = httpx.get(running.url + "/stats").json()["workers"]
    assert [w["name"] for w in workers] == ["worker-0", "worker-1"]
    assert all(w["requests"] >= 2 for w in workers) and sum(w["requests"] for w in workers) == 8


# ---------------------------------------------------------------------------- quantized weights


def greedy_text(model, tokenizer, max_tokens: int) -> str:
    """The engine's greedy reply to USER as the OpenAI API renders it."""
    prompt = tokenizer.render_for_completion(USER)
    completion = Engine(model, tokenizer).generate_batch(prompt, 1, max_tokens, temperature=0)[0]
    renderer = ReplyRenderer(tokenizer)
    return "".join(openai_text(p) for t in completion.tokens for p in renderer.push(t)) + "".join(
        openai_text(p) for p in renderer.finish()
    )


def test_chat_web_refuses_int4_for_a_width_its_groups_do_not_divide(tmp_path, small_tokenizer, monkeypatch):
    """A model 64 wide cannot take int4's groups of 128: one line before serving, not a failed startup."""
    from scripts import chat_web

    small_tokenizer.save(str(tmp_path / "tokenizer"))
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "d2"), 1, tiny_model())
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="--quantize int4: group_size 128 does not divide in_features 64"):
        chat_web.main(["--device-type", "cpu", "--quantize", "int4"])
    with pytest.raises(SystemExit, match="--compile and --quantize do not combine"):
        chat_web.main(["--device-type", "cpu", "--quantize", "int8", "--compile"])


def test_chat_web_quantize_serves_int8_weights(tmp_path, small_tokenizer, monkeypatch):
    """scripts.chat_web --quantize int8 as its own process: its replies are the engine's on an int8 copy."""
    small_tokenizer.save(str(tmp_path / "tokenizer"))
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "d2"), 1, tiny_model())
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    quantized, _ = load_model("sft", "cpu", "eval", dtype=torch.float32)
    expected = greedy_text(quantize_model(quantized, bits=8), small_tokenizer, 12)
    port = free_port()
    command = [sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", str(port)]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "NANOCHAT_DTYPE": "float32"}
    process = subprocess.Popen([*command, "--quantize", "int8"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).json()["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)
        assert httpx.get(url + "/health").json()["model"].endswith("-step1-int8")  # int8 weights loaded
        body = {"messages": USER, "max_tokens": 12, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == expected
    finally:
        process.terminate()
        process.wait(30)


# ---------------------------------------------------------------------------- the gate: key, body size, errors


@pytest.fixture(scope="module")
def guarded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = Settings(model_loader=lambda i: (model, tokenizer, "guarded"), api_key="k3y", max_body_bytes=100_000)
    with ServerThread(settings) as running:
        yield running


KEY, JSON = {"Authorization": "Bearer k3y"}, {"Content-Type": "application/json"}


def headers_only(port: int, head: str) -> str:
    """Send a request's line and headers but never its body; what the server answers within 10 s. A server that
    waited for the body would answer nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head.encode() + b"\r\n")
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
                if b"}}" in answer:  # the end of the JSON error
                    break
        except TimeoutError:
            pass
    return answer.decode()


def test_authentication_comes_before_the_body(guarded):
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n"
    answer = headers_only(guarded.port, head)
    assert answer.startswith("HTTP/1.1 401") and "www-authenticate: bearer\r\n" in answer.lower()
    assert '"type":"authentication_error"' in answer.replace(" ", "")


def test_a_body_over_the_cap_is_413_before_it_is_read(guarded):
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Length: 100001\r\n"
    answer = headers_only(guarded.port, head)
    assert answer.startswith("HTTP/1.1 413") and '"error"' in answer
    # without a Content-Length (chunked), reading stops at the cap
    chunks = (b"x" * 10_000 for _ in range(20))
    response = httpx.post(guarded.url + "/v1/chat/completions", content=chunks, headers=KEY, timeout=30)
    assert response.status_code == 413 and "100000 bytes" in response.json()["error"]["message"]
    body = {"messages": USER, "max_tokens": 2}  # under the cap, with the key: served
    assert httpx.post(guarded.url + "/v1/chat/completions", json=body, headers=KEY, timeout=60).status_code == 200


def test_the_schema_pages_need_the_key(guarded):
    for path in ["/docs", "/redoc", "/openapi.json", "/stats", "/v1/models"]:
        response = httpx.get(guarded.url + path)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
        assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(guarded.url + path, headers=KEY).status_code == 200, path
    for path in ["/", "/health"]:  # the page and the monitors' health check stay open
        assert httpx.get(guarded.url + path).status_code == 200


def test_every_error_has_openais_shape(guarded):
    responses = {
        404: httpx.get(guarded.url + "/nowhere", headers=KEY),
        405: httpx.get(guarded.url + "/v1/chat/completions", headers=KEY),
        400: httpx.post(
            guarded.url + "/v1/chat/completions",
            content=b"{not json",
            headers={**KEY, "Content-Type": "application/json"},
        ),
    }
    for status, response in responses.items():
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["message"] and isinstance(error["message"], str)


# ---------------------------------------------------------------------------- compiled decode


@pytest.mark.slow  # ~15-30 s: tracing the model once
def test_compiled_workers_answer_as_the_eager_ones(model_and_tokenizer, server, monkeypatch):
    """Settings(compile=True), i.e. chat_web --compile: the worker decodes every step through one compiled graph
    over all max_batch rows of a static cache (here torch.compile's quick aot_eager backend; inductor needs a C++
    toolchain), with requests joining and leaving, and each stream says what the eager server says."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from nanochat import server as server_module
    from nanochat.batching import BatchingWorker

    monkeypatch.setattr(server_module, "BatchingWorker", partial(BatchingWorker, backend="aot_eager"))
    model, tokenizer = model_and_tokenizer
    settings = Settings(model_loader=lambda i: (model, tokenizer, "compiled"), compile=True, max_batch=4)

    async def run(url):  # 6 streams on 4 rows: two wait, then take the rows the first ones leave
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(_stream_text(client, url, seed) for seed in range(6)))

    expected = asyncio.run(run(server.url))
    torch._dynamo.reset()
    counters.clear()
    with ServerThread(settings) as running:
        assert asyncio.run(run(running.url)) == expected
    assert counters["stats"]["unique_graphs"] == 1
