"""The server's OpenAI surface on a real uvicorn on 127.0.0.1, key required: validation errors as sentences,
logprobs against a plain forward, fields we cannot honour, models by id, unknown routes, the limits the page
reads from /health, top_k's "off", and schema-driven fuzzing with and without the key."""

import json
import math

import httpx
import pytest
import torch
from test_server import USER, ServerThread, tiny_model

from nanochat.engine import Engine, ReplyRenderer
from nanochat.server import Settings, load_default, openai_text

KEY = {"Authorization": "Bearer k3y"}
NAME = "nanochat-test"


@pytest.fixture(scope="module")
def model_and_tokenizer(small_tokenizer):
    return tiny_model(), small_tokenizer


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    """Default request limits (8,000 characters a message, ...) but replies of at most 64 tokens."""
    model, tokenizer = model_and_tokenizer
    settings = Settings(
        model_loader=lambda i: (model, tokenizer, NAME), api_key="k3y", max_tokens=16, max_tokens_limit=64
    )
    with ServerThread(settings) as running:
        yield running


def post(server, body: dict, path="/v1/chat/completions") -> httpx.Response:
    content = json.dumps({"messages": USER, "max_tokens": 4, **body})  # NaN and Infinity as JavaScript writes them
    headers = {**KEY, "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


# ---------------------------------------------------------------------------- validation as sentences


@pytest.mark.parametrize(
    "change, param, message",
    [
        ({"temperature": math.nan}, "temperature", "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature", "temperature must be a finite number"),
        ({"top_p": -math.inf}, "top_p", "top_p must be a finite number"),
        ({"temperature": 5}, "temperature", "temperature must be at most 2"),
        ({"temperature": -1}, "temperature", "temperature must be at least 0"),
        ({"top_k": -1}, "top_k", "top_k must be at least 0"),
        ({"top_k": 201}, "top_k", "top_k must be at most 200"),
        ({"top_p": 0}, "top_p", "top_p must be greater than 0"),
        ({"max_tokens": 65}, "max_tokens", "max_tokens must be at most 64"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be at least 1"),
        ({"n": 9}, "n", "n must be at most 8"),
        ({"n": "abc"}, "n", "n must be an integer"),
        ({"seed": -1}, "seed", "seed must be at least 0"),
        ({"stop": list("abcde")}, "stop", "stop must hold at most 4 stop sequences"),
        ({"stop": ["ok", ""]}, "stop.1", "stop.1 must not be empty"),
        ({"stop": "x" * 201}, "stop", "stop must be at most 200 characters"),
        ({"model": "m" * 201}, "model", "model must be at most 200 characters"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "top_logprobs must be at most 20"),
        ({"logprobs": "maybe"}, "logprobs", "logprobs must be true or false"),
        ({"stream_options": {"include_usage": 3}}, "stream_options.include_usage", None),
        ({"messages": []}, "messages", "messages must not be empty"),
        ({"messages": USER * 101}, "messages", "messages must hold at most 100 messages"),
        ({"messages": "hi"}, "messages", "messages must be a list"),
        (
            {"messages": [{"role": "user", "content": "x" * 8001}]},
            "messages.0.content",
            "messages.0.content must be at most 8,000 characters",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 8001}]}]},
            "messages.0.content.0.text",
            "messages.0.content.0.text must be at most 8,000 characters",
        ),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
            "messages.0.content must be a string or a list",
        ),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages.0.role",
            "messages.0.role must be 'system', 'user' or 'assistant'",
        ),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "messages.0.content is required"),
        (
            {"messages": [{"role": "user", "content": "x" * 7000}] * 5},
            "messages",
            "messages must hold at most 32,000 characters in all; these hold 35,000",
        ),
    ],
)
def test_a_refused_request_says_what_is_wrong_in_a_sentence(server, change, param, message):
    response = post(server, change)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] == (message or f"{param} must be true or false")


# ---------------------------------------------------------------------------- the page's vocabulary


def test_health_gives_the_limits_the_page_sets_its_inputs_from(server):
    health = httpx.get(server.url + "/health").json()  # open, like the page
    assert health["limits"] == {
        "max_temperature": 2.0,
        "max_top_k": 200,
        "max_tokens": 64,
        "max_message_chars": 8000,
        "max_messages": 100,
        "max_total_chars": 32000,
    }
    assert health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 16}


def test_top_k_zero_or_null_is_off(server, model_and_tokenizer):
    """top_k 0 and null sample from the whole vocabulary, as the engine does with top_k None; left out, the server's
    default (50) applies."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.render_for_completion(USER)
    engine = Engine(model, tokenizer)
    sampling = {"temperature": 1.5, "seed": 11}
    whole = engine.generate_batch(prompt, max_tokens=16, top_k=None, **sampling)[0].tokens
    top50 = engine.generate_batch(prompt, max_tokens=16, top_k=50, **sampling)[0].tokens
    assert whole != top50  # so the test can tell them apart

    def reply(**top_k) -> str:
        response = post(server, {"max_tokens": 16, **sampling, **top_k})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    renderer = ReplyRenderer(tokenizer)
    expected = "".join(openai_text(p) for t in whole for p in renderer.push(t))
    expected += "".join(openai_text(p) for p in renderer.finish())
    assert reply(top_k=0) == reply(top_k=None) == expected != reply()


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_the_models_own_through_the_openai_client(server, model_and_tokenizer):
    from openai import OpenAI

    model, tokenizer = model_and_tokenizer
    client = OpenAI(base_url=server.url + "/v1", api_key="k3y")
    common = {"model": NAME, "messages": USER, "max_tokens": 12, "temperature": 0, "logprobs": True}
    reply = client.chat.completions.create(**common, top_logprobs=5)
    entries = reply.choices[0].logprobs.content
    prompt = tokenizer.render_for_completion(USER)
    tokens = Engine(model, tokenizer).generate_batch(prompt, max_tokens=12, temperature=0)[0].tokens
    assert len(entries) == len(tokens) == reply.usage.completion_tokens
    with torch.no_grad():  # one plain forward over prompt + reply: log_softmax at each position before a token
        expected = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
    for position, (entry, token) in enumerate(zip(entries, tokens)):
        assert bytes(entry.bytes) == tokenizer.id_to_bytes(token)
        assert entry.logprob <= 0
        assert abs(entry.logprob - expected[len(prompt) - 1 + position, token].item()) < 1e-4
        alternatives = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(alternatives) == 5 and alternatives == sorted(alternatives, reverse=True)
        assert abs(alternatives[0] - entry.logprob) < 1e-6  # greedy: the chosen token is the likeliest
    stream = client.chat.completions.create(**common, top_logprobs=2, stream=True)
    streamed = [
        entry for chunk in stream for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    plain = client.chat.completions.create(model=NAME, messages=USER, max_tokens=4)
    assert plain.choices[0].logprobs is None
    response = post(server, {"top_logprobs": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


# ---------------------------------------------------------------------------- what this server does not do


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"10": 5}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
    ],
)
def test_a_field_the_server_cannot_honour_is_refused_by_name(server, field, value):
    response = post(server, {field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


def test_fields_asking_for_nothing_are_accepted(server):
    harmless = {"response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0, "tools": None}
    assert post(server, {**harmless, "user": "someone", "store": False}).status_code == 200


def test_models_by_id_and_an_unknown_model(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y")
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=4)
    assert refused.value.code == "model_not_found" and "gpt-4o" in refused.value.message
    missing = httpx.get(server.url + "/v1/models/gpt-4o", headers=KEY)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert post(server, {}).status_code == 200  # no model at all: the one served (OpenAI requires it; we do not)
    assert post(server, {"model": "nanochat"}).status_code == 200  # the family name: whichever is served


def test_unknown_routes_methods_and_bodies_in_openais_shape(server):
    nowhere = httpx.get(server.url + "/v1/nowhere", headers=KEY)
    assert nowhere.status_code == 404 and nowhere.json()["error"] == {
        "message": "Unknown request URL: GET /v1/nowhere (GET /docs lists them)",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_url",
    }
    empty = httpx.post(server.url + "/v1/chat/completions", headers=KEY)
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "the request needs a JSON body"
    wrong = httpx.delete(server.url + "/v1/chat/completions", headers=KEY)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    error = wrong.json()["error"]
    assert error["code"] == "method_not_allowed" and error["message"].startswith("DELETE /v1/chat/completions")


def test_the_model_id_names_its_tag_stage_and_step(tmp_path, small_tokenizer, monkeypatch):
    from nanochat.checkpoint import save_checkpoint

    small_tokenizer.save(str(tmp_path / "tokenizer"))
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "d2"), 7, tiny_model())
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    _, _, name = load_default(Settings(device_type="cpu"), 0)
    assert name == "nanochat-d2-sft-step7"


# ---------------------------------------------------------------------------- fuzzing with the key on


def test_fuzzing_with_the_key_finds_no_server_errors_and_without_it_only_401(server):
    """schemathesis generates requests (valid and invalid) from the server's OpenAPI schema, fetched and sent with
    the bearer key: none may 5xx. The same operations without the key: every one a 401 in OpenAI's shape."""
    import hypothesis
    import schemathesis

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=KEY)
    failures, calls, unauthorised = [], [], []
    for operation in schema.get_all_operations():
        operation = operation.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # a GET without parameters has no invalid form
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.settings(max_examples=20, deadline=None, database=None, derandomize=True)
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=server.url, headers=KEY, timeout=60)
                calls.append((case.path, response.status_code))
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))
                if case.path in ("/", "/health"):
                    return
                bare = case.call(base_url=server.url, timeout=60)
                if bare.status_code != 401 or bare.json()["error"]["code"] != "invalid_api_key":
                    unauthorised.append((case.method, case.path, bare.status_code, bare.text[:200]))

            check()
    assert not failures, failures
    assert not unauthorised, unauthorised
    posts = [code for path, code in calls if path.endswith("completions")]
    assert len(posts) >= 60 and 200 in posts and 400 in posts  # both accepted and refused requests were tried
