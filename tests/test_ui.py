"""The chat page (nanochat/ui.html) in a real headless Chromium, driven by selenium, against the real server
(nanochat/server.py under uvicorn on 127.0.0.1) serving a tiny random model: streaming, stop, multi-turn, edit
and regenerate, tool-call blocks and their round trip, sampling controls bounded by the server's /health, errors,
bearer tokens, a server that goes away and comes back (a failed message keeps its own bubble), the markdown
renderer (code blocks with a copy button, tables, links) against HTML injection, and the page at phone width.

Needs Debian's `chromium` and `chromium-driver` (skipped, saying so, when they are absent). Screenshots go to
$NANOCHAT_TEST_ARTIFACTS when set (CI keeps them), else to a pytest temporary directory.
"""

import json
import os
import shutil
import socket
import threading
import time
import urllib.request

import pytest
import torch
import uvicorn

from nanochat.gpt import GPT, GPTConfig
from nanochat.server import Settings, create_app
from nanochat.tokenizer import SPECIAL_TOKENS

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MODEL_NAME = "nanochat-tiny-ui-test"
CONTEXT = 2048  # room for the stop test's long reply
LONG_REPLY = 1500  # tokens: ~4 s at the ~2.7 ms/token the tiny model streams on 2 CPU cores, ample time to stop it
SHORT_REPLY = 24
INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    return (chromium, chromedriver) if chromium and chromedriver else None


pytestmark = pytest.mark.skipif(
    browser_paths() is None,
    reason="needs a headless Chromium: install Debian's packages with `apt-get install chromium chromium-driver`",
)


# ---------------------------------------------------------------------------- server and browser


def tiny_model() -> GPT:
    """A random 2-layer model. lm_head rows of the special tokens are zeroed: their logit is then 0, below every
    top-k cut of the other (~N(0, 2.4)) logits, so replies never end early or open a tool call at random."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=CONTEXT, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)  # plain construction: every weight is overwritten below, and GPT.build's meta path is slow
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name == "wte.weight" else 0.3)  # the default init would only ever say token 0
        model.lm_head.weight[-len(SPECIAL_TOKENS) :] = 0.0  # specials take the last ids of the 512-token vocab
    return model.eval()


class LiveServer:
    """The real app under uvicorn in a thread, on a fixed 127.0.0.1 port so it can stop and start again."""

    def __init__(self, settings: Settings, port: int):
        self.settings, self.port = settings, port
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> "LiveServer":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(create_app(self.settings), log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def get(self, path: str, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=5) as response:
            return json.load(response)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def settings(small_tokenizer):
    model = tiny_model()
    assert small_tokenizer.get_vocab_size() == 512
    return Settings(model_loader=lambda device_index: (model, small_tokenizer, MODEL_NAME), max_batch=4)


@pytest.fixture(scope="module")
def server(settings):
    live = LiveServer(settings, free_port()).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # explicit paths: selenium-manager must not try to download a browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    browser.set_script_timeout(10)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> str:
    directory = os.environ.get("NANOCHAT_TEST_ARTIFACTS") or str(tmp_path_factory.mktemp("ui-screenshots"))
    os.makedirs(directory, exist_ok=True)
    return directory


# ---------------------------------------------------------------------------- page helpers


def wait(driver, condition, timeout=15, message=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), message)


def open_page(driver, url: str) -> None:
    """A fresh page (empty conversation) whose header shows the model from /health; every POST body it sends is
    recorded in window.__requests."""
    driver.get(url)
    wait(driver, lambda: driver.find_element(By.ID, "model-name").text == MODEL_NAME, message="model name")
    driver.execute_script("""
        window.__requests = [];
        const original = window.fetch;
        window.fetch = (url, init) => {
            if (init && init.body) window.__requests.push(JSON.parse(init.body));
            return original(url, init);
        };""")


def set_input(driver, element_id: str, value) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def streaming(driver) -> bool:
    return driver.execute_script("return document.body.dataset.streaming") == "true"


def wait_idle(driver, timeout=15) -> None:
    wait(driver, lambda: not streaming(driver), timeout, "the reply to finish")


def send(driver, text: str) -> None:
    driver.find_element(By.ID, "message-input").send_keys(text)
    driver.find_element(By.ID, "send-button").click()
    wait_idle(driver)


def messages(driver) -> list[dict]:
    """Each rendered message: its role, text, finish reason and note."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#messages .message')].map(m => ({
            role: m.dataset.role,
            text: (m.querySelector('.bubble') || {}).textContent || '',
            finish: m.dataset.finish || null,
            note: (m.querySelector('.note') || {}).textContent || null,
        }));""")


def reply_text(driver, index: int) -> str:
    """The raw text of the assistant message at `index` as the page keeps it (the bubble shows it rendered)."""
    script = "return window.nanochat.state.conversation[arguments[0]].parts.map(p => p.text || '').join('')"
    return driver.execute_script(script, index)


def requests_sent(driver) -> list[dict]:
    return driver.execute_script("return window.__requests")


def banner(driver) -> str | None:
    """The error banner's text, or None while it is hidden."""
    shown = driver.find_element(By.ID, "error-banner").is_displayed()
    return driver.find_element(By.ID, "error-text").text if shown else None


def message_button(driver, index: int, testid: str):
    return driver.find_element(By.CSS_SELECTOR, f'#messages .message[data-index="{index}"] [data-testid="{testid}"]')


def load_conversation(driver, conversation: list[dict]) -> None:
    driver.execute_script("window.nanochat.state.conversation = arguments[0]; window.nanochat.render();", conversation)


# ---------------------------------------------------------------------------- tests


def test_reply_streams_and_stop_cancels_it(driver, server):
    open_page(driver, server.url)
    set_input(driver, "max-tokens", LONG_REPLY)
    driver.find_element(By.ID, "message-input").send_keys("Tell me a long story")
    driver.find_element(By.ID, "send-button").click()
    bubble = driver.find_element(By.CSS_SELECTOR, '#messages .message[data-role="assistant"] .bubble')
    stop = driver.find_element(By.ID, "stop-button")
    assert stop.is_displayed() and not driver.find_element(By.ID, "send-button").is_displayed()
    wait(driver, lambda: len(bubble.text) > 0, message="the first text delta")
    first = len(bubble.text)
    wait(driver, lambda: len(bubble.text) > first, message="more text while still streaming")
    assert streaming(driver), "the reply finished before Stop could be tested: raise LONG_REPLY"
    stop.click()
    wait_idle(driver, timeout=5)
    user, reply = messages(driver)
    assert (user["role"], user["text"], reply["role"]) == ("user", "Tell me a long story", "assistant")
    assert reply["finish"] == "cancelled" and reply["note"] == "Stopped." and reply["text"]
    assert driver.find_element(By.ID, "send-button").is_displayed() and not stop.is_displayed()
    assert banner(driver) is None
    # Stopping dropped the connection, and the server freed the row: nothing is left generating.
    wait(driver, lambda: server.get("/stats")["in_flight"] == 0, timeout=5, message="the server to cancel")
    assert requests_sent(driver)[0]["max_tokens"] == LONG_REPLY


def test_multi_turn_edit_and_regenerate(driver, server):
    open_page(driver, server.url)
    set_input(driver, "temperature", 0)  # greedy: the same conversation always gets the same reply
    set_input(driver, "max-tokens", SHORT_REPLY)
    send(driver, "What is the capital of France?")
    send(driver, "And of Germany?")
    conversation = messages(driver)
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    first_reply = reply_text(driver, 1)
    assert first_reply and conversation[3]["text"] and conversation[1]["finish"] == "length"
    second = requests_sent(driver)[1]
    assert second["temperature"] == 0 and second["top_k"] == 50 and second["max_tokens"] == SHORT_REPLY
    assert second["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": [{"type": "text", "text": first_reply}]},
        {"role": "user", "content": "And of Germany?"},
    ]

    # Editing the first message drops everything after it and answers the new text.
    message_button(driver, 0, "edit-button").click()
    editor = driver.find_element(By.CSS_SELECTOR, '[data-testid="edit-input"]')
    editor.clear()
    editor.send_keys("What is the capital of Spain?")
    driver.find_element(By.CSS_SELECTOR, '[data-testid="edit-submit"]').click()
    wait_idle(driver)
    user, reply = messages(driver)
    assert user["text"] == "What is the capital of Spain?" and reply["text"] and reply["text"] != first_reply
    assert requests_sent(driver)[-1]["messages"] == [{"role": "user", "content": "What is the capital of Spain?"}]

    # Regenerating replaces the last reply: greedy gives it back unchanged, sampling gives another.
    message_button(driver, 1, "regenerate-button").click()
    wait_idle(driver)
    assert messages(driver) == [user, reply]
    assert requests_sent(driver)[-1]["messages"] == [{"role": "user", "content": "What is the capital of Spain?"}]
    set_input(driver, "temperature", 1.0)
    set_input(driver, "top-k", 7)
    message_button(driver, 1, "regenerate-button").click()
    wait_idle(driver)
    (user_after, sampled) = messages(driver)
    assert user_after == user and sampled["text"] and sampled["text"] != reply["text"]
    assert requests_sent(driver)[-1]["temperature"] == 1.0 and requests_sent(driver)[-1]["top_k"] == 7

    # "New conversation" empties the page; the next request carries only the new message.
    driver.find_element(By.ID, "new-conversation").click()
    assert messages(driver) == []
    send(driver, "Hello again")
    assert requests_sent(driver)[-1]["messages"] == [{"role": "user", "content": "Hello again"}]


def test_tool_calls_render_as_blocks_and_round_trip(driver, server):
    open_page(driver, server.url)
    set_input(driver, "max-tokens", SHORT_REPLY)
    load_conversation(driver, [
        {"role": "user", "content": "What is 12*5, and 1/0?"},
        {"role": "assistant", "finish": "stop", "note": None, "parts": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "tool", "expression": "12*5", "output": "60"},
            {"type": "tool", "expression": "1/0", "output": None},
            {"type": "text", "text": "So it is **60**."},
        ]},
    ])  # fmt: skip
    blocks = driver.find_elements(By.CSS_SELECTOR, '#messages [data-testid="tool-call"]')
    assert [b.text for b in blocks] == ["calculator: 12*5 \u2192 60", "calculator: 1/0 \u2192 (refused)"]
    assert driver.find_element(By.CSS_SELECTOR, "#messages strong").text == "60"
    assert "<|python_start|>" not in driver.find_element(By.ID, "messages").text

    send(driver, "Thanks")
    assert banner(driver) is None, banner(driver)  # the server accepted the parts
    assert messages(driver)[-1]["role"] == "assistant" and messages(driver)[-1]["text"]
    assert requests_sent(driver)[-1]["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*5"},
            {"type": "python_output", "text": "60"},
            {"type": "python", "text": "1/0"},  # refused: no output part
            {"type": "text", "text": "So it is **60**."},
        ],
    }


def test_model_output_cannot_inject_html(driver, server):
    open_page(driver, server.url)
    markdown = "\n".join([
        f"Hello {INJECTION} **bold <i>x</i>** and *it* and `<b>code</b>` and snake_case_name.",
        "[bad](javascript:window.__pwned=3) [good](https://example.com/a?b=1)",
        "",
        "- one",
        "- <svg onload=window.__pwned=4>",
        "",
        "```html",
        f"{INJECTION}",
        "```",
    ])  # fmt: skip
    probe = driver.execute_script(
        """const box = document.createElement('div');
        document.body.appendChild(box);
        box.appendChild(window.renderMarkdown(arguments[0]));
        return {
            text: box.textContent,
            tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
            links: [...box.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.rel, a.textContent]),
            code: [...box.querySelectorAll('code')].map(c => c.textContent),
        };""",
        markdown,
    )
    assert set(probe["tags"]) <= {"p", "br", "strong", "em", "code", "a", "ul", "li", "pre", "div", "button"}
    assert probe["tags"].count("li") == 2 and "pre" in probe["tags"]
    assert probe["links"] == [["https://example.com/a?b=1", "noopener noreferrer nofollow", "good"]]
    assert probe["code"] == ["<b>code</b>", INJECTION]
    assert INJECTION in probe["text"] and "<i>x</i>" in probe["text"] and "snake_case_name" in probe["text"]
    assert "[bad](javascript:window.__pwned=3)" in probe["text"]

    # The same through the page: a user message and a reply holding markup stay text.
    send(driver, f"Please repeat {INJECTION}")
    conversation = driver.execute_script("return window.nanochat.state.conversation")
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    reply = {"role": "assistant", "finish": "stop", "note": None, "parts": [{"type": "text", "text": markdown}]}
    load_conversation(driver, conversation + [{"role": "user", "content": "Again"}, reply])
    shown = driver.find_element(By.ID, "messages")
    assert INJECTION in shown.text
    assert not shown.find_elements(By.CSS_SELECTOR, "img, script, svg, i, b, a[href^='javascript']")
    time.sleep(0.2)  # an onerror/onload handler would have run by now
    assert driver.execute_script("return window.__pwned") is None


def test_server_errors_show_in_a_banner_until_the_next_success(driver, server, artifacts):
    open_page(driver, server.url)
    set_input(driver, "max-tokens", SHORT_REPLY)
    set_input(driver, "top-k", 100000)  # above the server's max_top_k: a 400 naming the field
    send(driver, "Hello")
    text = banner(driver)
    assert text and "top_k" in text and "200" in text, text
    assert [m["role"] for m in messages(driver)] == ["user"]  # the failed reply is dropped, the question kept
    driver.save_screenshot(os.path.join(artifacts, "desktop-error-banner.png"))

    set_input(driver, "top-k", 50)
    message_button(driver, 0, "retry-button").click()
    wait_idle(driver)
    assert banner(driver) is None
    assert [m["role"] for m in messages(driver)] == ["user", "assistant"] and messages(driver)[1]["text"]


def test_bearer_token_is_asked_for_once_and_busy_is_shown(driver, settings):
    guarded = Settings(**{**settings.__dict__, "api_key": "sekret", "max_concurrent": 1})
    secured = LiveServer(guarded, free_port()).start()
    try:
        open_page(driver, secured.url)
        set_input(driver, "max-tokens", SHORT_REPLY)
        driver.execute_script("window.__prompts = 0; window.prompt = () => { window.__prompts++; return 'sekret'; };")
        send(driver, "Hello")
        send(driver, "Again")
        assert driver.execute_script("return window.__prompts") == 1
        assert driver.execute_script("return sessionStorage.getItem('nanochat-api-key')") == "sekret"
        assert [m["role"] for m in messages(driver)] == ["user", "assistant"] * 2 and banner(driver) is None

        # A wrong key is asked for again once, and the server's refusal is shown.
        driver.execute_script("sessionStorage.setItem('nanochat-api-key', 'stale'); window.prompt = () => 'wrong';")
        send(driver, "Once more")
        assert "Authorization: Bearer" in (banner(driver) or "")

        # Another client holds the only slot: the page shows the server's 429 message.
        body = {"messages": [{"role": "user", "content": "Hog"}], "max_tokens": LONG_REPLY, "top_k": 50}
        hog = urllib.request.Request(
            secured.url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sekret"},
        )
        with urllib.request.urlopen(hog, timeout=10) as stream:
            assert stream.readline().startswith(b"data: ")
            driver.execute_script("sessionStorage.setItem('nanochat-api-key', 'sekret');")
            send(driver, "Am I next?")
            assert "busy" in (banner(driver) or ""), banner(driver)
        cancelled = lambda: secured.get("/stats", key="sekret")["in_flight"] == 0  # noqa: E731
        wait(driver, cancelled, timeout=5, message="the hog to be cancelled")
        message_button(driver, len(messages(driver)) - 1, "retry-button").click()
        wait_idle(driver)
        assert banner(driver) is None and messages(driver)[-1]["role"] == "assistant"
        # The questions whose replies failed keep their own bubbles; only the one asked again is sent.
        assert [m["text"] for m in messages(driver)[-3:-1]] == ["Once more", "Am I next?"]
        assert requests_sent(driver)[-1]["messages"][-1] == {"role": "user", "content": "Am I next?"}
    finally:
        secured.stop()


def test_server_down_shows_a_banner_until_it_returns(driver, settings, artifacts):
    live = LiveServer(settings, free_port()).start()
    try:
        open_page(driver, live.url)
        set_input(driver, "max-tokens", SHORT_REPLY)
        live.stop()
        send(driver, "Are you there?")
        assert "Cannot reach the server" in (banner(driver) or "")
        assert [m["role"] for m in messages(driver)] == ["user"]
        live.start()  # the page polls /health while the banner is up
        wait(driver, lambda: banner(driver) is None, timeout=10, message="the banner to clear")
        message_button(driver, 0, "retry-button").click()
        wait_idle(driver)
        assert [m["role"] for m in messages(driver)] == ["user", "assistant"] and banner(driver) is None
    finally:
        live.stop()


def test_screenshots_desktop_and_phone_width(driver, server, artifacts):
    open_page(driver, server.url)
    set_input(driver, "max-tokens", SHORT_REPLY)
    load_conversation(driver, [
        {"role": "user", "content": "What is 12*5? Show your work, with some code."},
        {"role": "assistant", "finish": "stop", "note": None, "parts": [
            {"type": "text", "text": "Let me use the calculator:\n\n"},
            {"type": "tool", "expression": "12*5", "output": "60"},
            {"type": "text", "text": "The answer is **60**. In Python:\n\n```python\nprint(12 * 5)  # a long line "
             "that must scroll inside its block rather than widen the page on a phone\n```\n\n- *twelve*\n- five\n\n"
             "| factor | value | a wide column that must scroll inside its box on a phone |\n|---|--:|---|\n"
             "| twelve | 12 | see https://en.wikipedia.org/wiki/Multiplication |\n| five | 5 | |"},
        ]},
    ])  # fmt: skip
    send(driver, "Thanks! Now say something long.")
    driver.save_screenshot(os.path.join(artifacts, "desktop-conversation.png"))

    driver.set_window_size(375, 812)
    try:
        width = driver.execute_script("return window.innerWidth")
        assert width <= 400, width
        # Nothing is wider than the screen, and the controls are on it.
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width
        for element_id in ("message-input", "send-button", "new-conversation", "temperature", "top-k"):
            rect = driver.find_element(By.ID, element_id).rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= width, (element_id, rect)
        driver.execute_script("const s = document.getElementById('scroller'); s.scrollTop = s.scrollHeight;")
        driver.save_screenshot(os.path.join(artifacts, "phone-conversation.png"))
    finally:
        driver.set_window_size(1280, 900)


def test_a_failed_message_keeps_its_own_bubble(driver, settings):
    """After a send fails (here: the server is gone), the next message is a new bubble, not appended to the
    failed one; the failed one is marked and left out of the conversation sent."""
    live = LiveServer(settings, free_port()).start()
    try:
        open_page(driver, live.url)
        set_input(driver, "max-tokens", SHORT_REPLY)
        send(driver, "First question")
        live.stop()
        send(driver, "Lost question")
        assert "Cannot reach the server" in (banner(driver) or "")
        live.start()
        wait(driver, lambda: banner(driver) is None, timeout=10, message="the banner to clear")
        send(driver, "Next question")
        shown = messages(driver)
        assert [(m["role"], m["text"]) for m in shown[2:4]] == [("user", "Lost question"), ("user", "Next question")]
        assert shown[2]["note"] == "Not answered: left out of the conversation."
        assert shown[4]["role"] == "assistant" and shown[4]["text"] and banner(driver) is None
        sent = requests_sent(driver)[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[-1]["content"] == "Next question"
    finally:
        live.stop()


def test_sampling_inputs_take_their_bounds_from_the_server(driver, settings):
    """The inputs' bounds and defaults are the server's (GET /health); 0 turns top-k off; a value the server
    refuses is sent as typed, marked invalid, and the server's message is shown."""
    bounded = Settings(**{**settings.__dict__, "max_top_k": 30, "max_temperature": 1.5, "max_tokens_limit": 100,
                          "temperature": 0.3, "top_k": None, "max_tokens": SHORT_REPLY})  # fmt: skip
    live = LiveServer(bounded, free_port()).start()
    try:
        open_page(driver, live.url)
        attributes = "return ['temperature', 'top-k', 'max-tokens'].map(id => [document.getElementById(id).max, " \
            "document.getElementById(id).value, document.getElementById(id).placeholder])"  # fmt: skip
        assert driver.execute_script(attributes) == [["1.5", "0.3", ""], ["30", "0", ""], ["100", "", str(SHORT_REPLY)]]
        assert "0 = off" in driver.find_element(By.CSS_SELECTOR, "label:has(#top-k)").text
        send(driver, "Hello")  # top-k 0: off, and the server takes it
        assert banner(driver) is None and messages(driver)[-1]["role"] == "assistant"
        assert requests_sent(driver)[-1]["top_k"] == 0 and requests_sent(driver)[-1]["temperature"] == 0.3

        set_input(driver, "top-k", 31)
        assert driver.execute_script("return document.getElementById('top-k').matches(':invalid')")
        send(driver, "Again")
        text = banner(driver)
        assert text and "top_k" in text and "30" in text, text
    finally:
        live.stop()


def test_code_blocks_copy_tables_and_bare_links(driver, server):
    open_page(driver, server.url)
    origin = server.url  # headless Chromium's clipboard answers once the page is granted it
    driver.execute_cdp_cmd(
        "Browser.grantPermissions", {"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}
    )
    code = f"def f(x):\n    return '{INJECTION}'  # kept as text"
    markdown = "\n".join([
        "Here:", "```python", code, "```", "and a table:",
        "| name | value | link |", "|:-----|------:|:----:|",
        "| `a\\|b` | **2** | https://example.org/t |", f"| {INJECTION} | 3 \\| 4 |",
        "",
        "See https://example.com/docs?q=1, or (https://example.com/a_b). Not javascript:window.__pwned=5 nor "
        "JAVASCRIPT://x, and www.example.com stays text.",
    ])  # fmt: skip
    reply = {"role": "assistant", "finish": "stop", "note": None, "parts": [{"type": "text", "text": markdown}]}
    load_conversation(driver, [{"role": "user", "content": "Show me"}, reply])
    probe = driver.execute_script("""
        const bubble = document.querySelector('#messages .message[data-role="assistant"] .bubble');
        const rows = [...bubble.querySelectorAll('table tr')];
        return {
            cells: rows.map(r => [...r.children].map(c => [c.tagName.toLowerCase(), c.textContent, c.style.textAlign])),
            links: [...bubble.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.textContent, a.rel, a.target]),
            strong: [...bubble.querySelectorAll('td strong')].map(s => s.textContent),
            tags: [...bubble.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
        };""")  # fmt: skip
    assert probe["cells"] == [
        [["th", "name", ""], ["th", "value", "right"], ["th", "link", "center"]],
        [["td", "a|b", ""], ["td", "2", "right"], ["td", "https://example.org/t", "center"]],
        [["td", INJECTION, ""], ["td", "3 | 4", "right"], ["td", "", "center"]],
    ]  # a pipe escaped as \\| (in code too, as on GitHub) stays in its cell; a short row gets empty cells
    assert probe["strong"] == ["2"]
    safe = "noopener noreferrer nofollow"
    assert probe["links"] == [
        ["https://example.org/t", "https://example.org/t", safe, "_blank"],
        ["https://example.com/docs?q=1", "https://example.com/docs?q=1", safe, "_blank"],  # the comma is not in it
        ["https://example.com/a_b", "https://example.com/a_b", safe, "_blank"],  # nor the parenthesis
    ]
    assert not set(probe["tags"]) & {"img", "script", "svg", "i", "b"}
    assert driver.execute_script("return window.__pwned") is None

    copy = driver.find_element(By.CSS_SELECTOR, '#messages [data-testid="copy-code"]')
    copy.click()
    wait(driver, lambda: copy.text == "Copied", message="the copy button to confirm")
    clipboard = driver.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('failed: ' + e));"
    )
    assert clipboard == code
