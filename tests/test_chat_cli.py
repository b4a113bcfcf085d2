"""scripts.chat_cli: the conversation it builds (the tokenizer's protocol, trimmed whole turns), what it prints,
its commands, and the real script run on a tiny sft checkpoint: one-shot, piped interactive, in a real
pseudo-terminal (keys typed during a reply), overfull, missing; its flags and chat_web's speaking one vocabulary."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from itertools import chain

import pytest
import torch

from conftest import REPO
from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.engine import ContextFullError, Engine, ReplyRenderer
from nanochat.gpt import GPT, GPTConfig
from nanochat.quantize import quantize_model
from nanochat.tokenizer import SPECIAL_TOKENS
from scripts import chat_cli, chat_web
from scripts.chat_cli import (
    QuitChat,
    Sampling,
    Session,
    apply_command,
    close_turn,
    render_prompt,
    reply_room,
    respond,
    terminal_text,
    trim_to_fit,
    user_turn_tokens,
)

CONTEXT = 64
DEFAULTS = Sampling(temperature=0.6, top_k=50, top_p=None, max_tokens=512)  # the script's flag defaults
LONG_MESSAGE = "Tell me everything about the history of the city and its rivers"  # ~15 tokens


def randomized(seed=0, context=CONTEXT, never_special=False) -> GPT:
    """A tiny model with every weight random (the default init zeroes projections and lm_head, so it would only
    ever say token 0). never_special: lm_head rows of the special tokens zeroed, so their logit 0 stays below
    every top-k cut of the others (~N(0, 2.4)): replies never end early, they run to --max-tokens."""
    torch.manual_seed(seed)
    model = GPT.build(GPTConfig(sequence_len=context, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name == "wte.weight" else 0.3)
        if never_special:
            model.lm_head.weight[-len(SPECIAL_TOKENS) :] = 0.0  # specials take the last ids of the vocab
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, small_tokenizer):
    """A base dir holding the small tokenizer and a random 64-token-context model saved as the sft stage's d2."""
    root = tmp_path_factory.mktemp("nanochat")
    small_tokenizer.save(str(root / "tokenizer"))
    save_checkpoint(str(root / "chatsft_checkpoints" / "d2"), 1, randomized())
    return root


@pytest.fixture
def engine(base_dir, small_tokenizer, monkeypatch):
    """The checkpoint loaded exactly as the script loads it on the CPU."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    model, _ = load_model("sft", "cpu", "eval", dtype=torch.float32)
    return Engine(model, small_tokenizer)


def pushed(tokenizer, tokens) -> list[str]:
    """What the script writes for each token of a reply, then at its end."""
    renderer = ReplyRenderer(tokenizer, hide_special=True)
    pieces = [renderer.push(t) for t in tokens] + [renderer.finish()]
    return ["".join(map(terminal_text, p)) for p in pieces]


def shown(tokenizer, tokens) -> str:
    return "".join(pushed(tokenizer, tokens))


@pytest.fixture(scope="module")
def script_env(tmp_path_factory):
    """The environment the script runs in. Where bytecode is not written (PYTHONDONTWRITEBYTECODE), every
    process would compile torch from source again (~5 s of CPU each on 2 cores): the script's runs share a
    bytecode cache in a temp dir instead. Elsewhere the usual __pycache__ directories serve."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_DEVICE", "NANOCHAT_DTYPE")}
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return env


def run_script(env, base_dir, *args, stdin=""):
    env = {**env, "NANOCHAT_BASE_DIR": str(base_dir)}
    return subprocess.run(
        [sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *args],
        cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the conversation


def test_turns_render_as_the_tokenizers_chat_protocol(small_tokenizer):
    tok = small_tokenizer
    special = tok.encode_special
    messages = [
        {"role": "user", "content": "What is 12 times 5?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute "},
                {"type": "python", "text": "12*5"},
                {"type": "python_output", "text": "60"},
                {"type": "text", "text": " so it is 60."},
            ],
        },
        {"role": "user", "content": "And café ☕ times 2?"},
        {"role": "assistant", "content": "No idea."},
        {"role": "user", "content": "Thanks"},
    ]
    reply_1 = [
        *tok.encode("Let me compute "), special("<|python_start|>"), *tok.encode("12*5"), special("<|python_end|>"),
        special("<|output_start|>"), *tok.encode("60"), special("<|output_end|>"), *tok.encode(" so it is 60."),
    ]  # fmt: skip
    turns = [
        close_turn(tok, user_turn_tokens(tok, messages[0]["content"]), reply_1),
        close_turn(tok, user_turn_tokens(tok, messages[2]["content"]), tok.encode("No idea.")),
    ]
    prompt = render_prompt(tok, turns, user_turn_tokens(tok, "Thanks"))
    assert prompt == tok.render_for_completion(messages)
    assert [tok.get_bos_token_id(), *chain(*turns)] == tok.render_conversation(messages[:4])[0]


@pytest.mark.parametrize("context_len,room", [(64, 8), (64, 16), (100, 1), (40, 8)])
def test_trimming_keeps_the_newest_whole_turns_that_fit(context_len, room):
    turns = [[100 + i] * length for i, length in enumerate([9, 4, 13, 7, 2, 11, 6, 5])]  # each turn recognisable
    user = [7] * 6
    kept = trim_to_fit(turns, user, context_len, room)
    assert kept == turns[len(turns) - len(kept) :]  # a suffix: whole turns, the newest ones, in order
    used = 1 + sum(map(len, kept)) + len(user)
    assert used + room <= context_len
    if len(kept) < len(turns):  # one more turn would not have fit
        assert used + len(turns[-len(kept) - 1]) + room > context_len
    assert trim_to_fit([], user, context_len, room) == []


def test_a_message_too_long_alone_is_refused_clearly():
    room = reply_room(CONTEXT, 512)
    assert room == 16  # a quarter of the context, not all of --max-tokens
    longest = CONTEXT - 1 - room
    assert trim_to_fit([[1] * 5], [7] * longest, CONTEXT, room) == []  # just fits, alone
    with pytest.raises(ContextFullError, match=rf"{longest + 1} tokens.*at most {longest}.*shorten it"):
        trim_to_fit([[1] * 5], [7] * (longest + 1), CONTEXT, room)
    assert reply_room(2048, 512) == 512 and reply_room(2048, 0) == 1


# ---------------------------------------------------------------------------- what is printed


def test_reply_text_shows_the_calculator_and_hides_markers(small_tokenizer):
    tok = small_tokenizer
    special = tok.encode_special
    call = [special("<|python_start|>"), *tok.encode("12*5"), special("<|python_end|>")]
    output = [special("<|output_start|>"), *tok.encode("60"), special("<|output_end|>")]
    assert shown(tok, [*tok.encode("So "), *call, *output, *tok.encode(" done")]) == "So [calculator: 12*5 = 60] done"
    refused = [special("<|python_start|>"), *tok.encode("x()"), special("<|python_end|>")]
    assert shown(tok, [*refused, *tok.encode(" ok")]) == "[calculator: x()] ok"
    assert shown(tok, refused) == "[calculator: x()]"  # closed even when the reply ends there
    assert shown(tok, [*tok.encode("a"), special("<|user_start|>"), *tok.encode("b")]) == "ab"


def test_reply_text_never_splits_a_character(small_tokenizer):
    text = "naïve café — 日本語 🙂"
    pieces = pushed(small_tokenizer, small_tokenizer.encode(text))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # some tokens were parts of a character, held back until it was whole


# ---------------------------------------------------------------------------- commands


def test_commands_change_the_settings_and_clear_the_conversation():
    session = Session(DEFAULTS, seed=0, turns=[[1, 2, 3]])
    assert "temperature 0.2" in apply_command("/temperature 0.2", session, CONTEXT)
    assert session.sampling.temperature == 0.2
    for bad in ["/temperature -1", "/temperature warm", "/temperature", "/topk -3", "/topp 0", "/topp 1.5"]:
        answer = apply_command(bad, session, CONTEXT)
        assert "must be" in answer and "unchanged" in answer, bad
    assert session.sampling == Sampling(0.2, 50, None, 512)
    apply_command("/topk 0", session, CONTEXT)
    apply_command("/topp 0.9", session, CONTEXT)
    assert (session.sampling.top_k, session.sampling.top_p) == (None, 0.9)
    apply_command("/topk 5", session, CONTEXT)
    apply_command("/topp 1", session, CONTEXT)
    assert (session.sampling.top_k, session.sampling.top_p) == (5, None)
    help_text = apply_command("/help", session, CONTEXT)
    assert "/clear" in help_text and "top-k 5" in help_text and "1 turn," in help_text and "4 of" in help_text
    assert apply_command("/clear", session, CONTEXT) == "[new conversation]" and session.turns == []
    assert "unknown command /nope" in apply_command("/nope 3", session, CONTEXT)
    with pytest.raises(QuitChat):
        apply_command("/quit", session, CONTEXT)


# ---------------------------------------------------------------------------- replies, in process


def test_replies_are_the_engines_and_turns_chain(engine, small_tokenizer):
    tok = small_tokenizer
    sampling = Sampling(temperature=0.8, top_k=20, top_p=None, max_tokens=12)
    session, written, notices = Session(sampling, seed=5), [], []
    expected_turns = []
    for n, message in enumerate(["hello", "and then?"]):
        user = user_turn_tokens(tok, message)
        prompt = render_prompt(tok, expected_turns, user)
        expected = engine.generate_batch(prompt, max_tokens=12, temperature=0.8, top_k=20, seed=5 + n)[0]
        written.clear()
        assert respond(engine, session, message, written.append, notices.append)
        assert "".join(written) == shown(tok, expected.tokens) + "\n"
        expected_turns.append(user + expected.tokens + [tok.encode_special("<|assistant_end|>")])
        assert session.turns == expected_turns
    assert session.replies == 2


def test_an_overfull_conversation_drops_old_turns_and_goes_on(engine, small_tokenizer):
    tok = small_tokenizer
    session, notices = Session(Sampling(0.6, 50, None, max_tokens=8), seed=0), []
    room = reply_room(CONTEXT, 8)
    dropped_total = 0
    for i in range(8):
        before = list(session.turns)
        message = f"{LONG_MESSAGE} {i}"
        assert respond(engine, session, message, lambda text: None, notices.append)
        kept = session.turns[:-1]
        assert kept == before[len(before) - len(kept) :]  # the newest turns survive, whole and in order
        assert 1 + sum(map(len, kept)) + len(user_turn_tokens(tok, message)) + room <= CONTEXT
        dropped_total += len(before) - len(kept)
    drops = [re.fullmatch(r"\[dropped (\d+) old turns? to fit the context\]", n) for n in notices if "dropped" in n]
    assert drops and all(drops)
    assert dropped_total == sum(int(match.group(1)) for match in drops) > 0

    before, notices[:] = list(session.turns), []
    assert not respond(engine, session, LONG_MESSAGE * 5, lambda text: None, notices.append)
    assert session.turns == before and "shorten it" in notices[0]


def test_the_loop_survives_ctrl_c_and_ends_at_end_of_input(engine, small_tokenizer):
    """Ctrl-C at the prompt drops the line; Ctrl-C mid-reply keeps what was said and closes the turn; Ctrl-D
    (EOFError) leaves."""
    tok = small_tokenizer
    session, written, notices = Session(Sampling(0.0, None, None, max_tokens=10), seed=0), [], []
    inputs = iter([KeyboardInterrupt, "  ", "hello", "/topk 3", "go on", EOFError])
    interrupt_after = {"writes": None}

    def read_line(prompt):
        item = next(inputs)
        if isinstance(item, type):
            raise item
        interrupt_after["writes"] = 3 if item == "go on" else None
        return item

    def write(text):
        if interrupt_after["writes"] is not None:
            if interrupt_after["writes"] == 0:
                interrupt_after["writes"] = None
                raise KeyboardInterrupt  # as if Ctrl-C arrived while the reply was printing
            interrupt_after["writes"] -= 1
        written.append(text)

    chat_cli.chat_loop(engine, session, read_line, write, notices.append)
    assert next(inputs, "exhausted") == "exhausted"
    assert session.replies == 2 and len(session.turns) == 2 and session.sampling.top_k == 3
    assert "[reply stopped]" in notices
    user = user_turn_tokens(tok, "go on")
    cut_reply = session.turns[1][len(user) : -1]
    assert session.turns[1][: len(user)] == user and session.turns[1][-1] == tok.encode_special("<|assistant_end|>")
    assert 1 <= len(cut_reply) < 10  # stopped early: prefix "Assistant: " and two tokens written, the third not


# ---------------------------------------------------------------------------- the script


def test_one_shot_prints_the_reply_and_exits_0(script_env, base_dir, engine, small_tokenizer):
    """-p prints the reply and nothing else: here it fills the model's context, and the notice a conversation
    gets then ("older turns will be dropped") would mean nothing to a one-shot caller."""
    prompt = render_prompt(small_tokenizer, [], user_turn_tokens(small_tokenizer, "hello"))
    expected = engine.generate_batch(prompt, max_tokens=200, temperature=0.6, top_k=50, seed=42)[0]
    assert len(prompt) + len(expected.tokens) == CONTEXT  # the reply ran until the context was full
    result = run_script(script_env, base_dir, "-p", "hello", "--max-tokens", "200")
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown(small_tokenizer, expected.tokens) + "\n"
    banner, *rest = result.stderr.splitlines()
    assert banner.startswith("chat_cli: sft d2 step 1") and rest == []


def test_quantized_weights_answer_as_the_engine_on_them(script_env, base_dir, engine, small_tokenizer):
    """--quantize int8: the reply is the engine's on an int8 copy of the checkpoint, printed the same way."""
    quantize_model(engine.model, bits=8)
    prompt = render_prompt(small_tokenizer, [], user_turn_tokens(small_tokenizer, "hello"))
    expected = engine.generate_batch(prompt, max_tokens=16, temperature=0.6, top_k=50, seed=42)[0]
    result = run_script(script_env, base_dir, "-p", "hello", "--max-tokens", "16", "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown(small_tokenizer, expected.tokens) + "\n"
    assert "with int8 weights" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # ~15-30 s: tracing the model once
def test_compile_decodes_through_torch_compile_with_the_same_reply(base_dir, engine, small_tokenizer, monkeypatch):
    """--compile: the engine decodes through torch.compile (here its quick aot_eager backend; inductor needs a
    C++ toolchain) and says the same reply as the eager engine."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    prompt = render_prompt(small_tokenizer, [], user_turn_tokens(small_tokenizer, "hello"))
    expected = engine.generate_batch(prompt, max_tokens=12, temperature=0.6, top_k=50, seed=42)[0]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(chat_cli, "Engine", lambda *args, **kwargs: Engine(*args, **kwargs, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    written = []
    monkeypatch.setattr(chat_cli, "write_stdout", written.append)
    assert chat_cli.main(["--device-type", "cpu", "--max-tokens", "12", "--compile", "-p", "hello"]) == 0
    assert "".join(written) == shown(small_tokenizer, expected.tokens) + "\n"
    assert counters["stats"]["unique_graphs"] == 1  # the decode step ran as one compiled graph


def test_interactive_session_through_stdin(script_env, base_dir):
    lines = [
        "hello", "/temperature 0", "/topk 5", "how are you?", "/clear", "",
        *[f"{LONG_MESSAGE} {i}" for i in range(6)], LONG_MESSAGE * 5, "again", "quit", "never read",
    ]  # fmt: skip
    result = run_script(script_env, base_dir, "--max-tokens", "8", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out, err = result.stdout, result.stderr
    assert "temperature 0.0, top-k 50" in out and "temperature 0.0, top-k 5," in out
    assert "[new conversation]" in out
    assert out.count("Assistant: ") == 9  # every message but the oversized one got a reply
    assert "[dropped" in err and "to fit the context]" in err
    assert "shorten it" in err
    assert "never read" not in out and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_error(script_env, tmp_path):
    result = run_script(script_env, tmp_path, "-p", "hello")
    assert result.returncode == 1 and result.stdout == ""
    assert "chatsft_checkpoints" in result.stderr and "scripts/chat_sft.py" in result.stderr
    assert "--source" in result.stderr and "Traceback" not in result.stderr


def test_other_user_errors_exit_1_with_a_message(base_dir, monkeypatch, capsys, tmp_path):
    def exit_code(*args):
        try:
            return chat_cli.main(["--device-type", "cpu", "--max-tokens", "4", *args])
        except SystemExit as e:
            return e.code

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    cases = [
        (["--source", "base", "--model-tag", "d2"], r"no complete base checkpoint .*scripts/base_train\.py"),
        (["--step", "7"], "step 7 has no complete checkpoint"),
        (["-p", LONG_MESSAGE * 5], "shorten it"),
        (["--temperature", "-1"], "temperature must be a number >= 0"),  # argparse's code 2, before any loading
        (["--quantize", "int4", "-p", "hi"], "--quantize int4: .*group_size 128 does not divide in_features 64"),
        (["--quantize", "int8", "--compile"], "--compile and --quantize do not combine"),  # code 2: a flag error
    ]
    for args, message in cases:
        assert exit_code(*args) == (2 if "--temperature" in args or "--compile" in args else 1), args
        assert re.search(message, capsys.readouterr().err), args
    (tmp_path / "chatsft_checkpoints").mkdir()
    os.symlink(base_dir / "chatsft_checkpoints" / "d2", tmp_path / "chatsft_checkpoints" / "d2")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # the model but no tokenizer
    assert exit_code("-p", "hi") == 1
    assert re.search(r"no tokenizer .*scripts\.tok_train", capsys.readouterr().err)


# ---------------------------------------------------------------------------- in a terminal


@pytest.fixture(scope="module")
def long_reply_dir(tmp_path_factory, small_tokenizer):
    """A base dir whose sft model has a 1,024-token context and never ends a reply early."""
    root = tmp_path_factory.mktemp("nanochat-long")
    small_tokenizer.save(str(root / "tokenizer"))
    save_checkpoint(str(root / "chatsft_checkpoints" / "d2"), 1, randomized(context=1024, never_special=True))
    return root


class Terminal:
    """The script on a real pseudo-terminal: what it prints is read from the master side, keys are written to it."""

    def __init__(self, env, base_dir, *args):
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # rows, columns
        env = {**env, "NANOCHAT_BASE_DIR": str(base_dir), "TERM": "dumb"}
        command = [sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *args]
        tty = {"stdin": self.slave, "stdout": self.slave, "stderr": self.slave}
        self.process = subprocess.Popen(command, cwd=REPO, env=env, **tty)
        self.output = b""

    def read_until(self, text: str, start: int = 0, timeout: float = 120) -> int:
        """Reads until `text` shows at or after output offset `start`; returns the offset just past it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text.encode(), start)) == -1:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {text!r} within {timeout} s; the terminal shows: {self.output.decode(errors='replace')}"
            try:
                self.output += os.read(self.master, 65536)
            except OSError:  # EIO: nobody holds the terminal any more
                raise AssertionError(f"no {text!r}; the terminal shows: {self.output.decode()}") from None
        return found + len(text)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def echoes(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


def test_keys_typed_during_a_reply_are_not_echoed_nor_sent(script_env, long_reply_dir):
    """Typed while the reply streams, text and Enter neither show inside the reply nor send a second message;
    the terminal is left echoing again."""
    terminal = Terminal(script_env, long_reply_dir, "--max-tokens", "1000")
    try:
        prompt_end = terminal.read_until("User: ")
        terminal.type("hello\r")
        reply_start = terminal.read_until("Assistant: ", prompt_end)
        terminal.read_until(" ", reply_start)  # a few tokens in: echo is off by now
        terminal.type("typed ahead\r")
        typed_at = len(terminal.output)
        reply_end = terminal.read_until("User: ", reply_start)
        assert typed_at < reply_end - 200, "the reply ended before the keys were typed: make it longer"
        terminal.type("quit\r")
        assert terminal.process.wait(timeout=60) == 0, terminal.output.decode(errors="replace")
        assert terminal.echoes()
    finally:
        terminal.close()
    shown_text = terminal.output.decode(errors="replace")
    assert "typed ahead" not in shown_text, shown_text
    assert shown_text.count("Assistant: ") == 1  # the Enter typed meanwhile did not send a message


# ---------------------------------------------------------------------------- flags


def test_chat_cli_and_chat_web_share_one_vocabulary_of_flags(capsys):
    """A short flag means the same in both scripts (or exists in one only), 0 turns top-k off in both, and
    --help is the usage text, not the contract."""
    short = ["-i", "base", "-g", "d3", "-s", "7", "-t", "0", "-k", "0", "-m", "9"]
    cli, web = chat_cli.build_parser().parse_args(short), chat_web.parse_args(short)
    for name in ("source", "model_tag", "step", "temperature", "top_k", "max_tokens"):
        assert getattr(cli, name) == getattr(web, name), name
    assert (cli.source, cli.model_tag, cli.step, cli.top_k, cli.max_tokens) == ("base", "d3", 7, None, 9)
    assert chat_cli.build_parser().parse_args(["-p", "hi"]).prompt == "hi"
    for bad, message in [(["-p", "8080"], "unrecognized arguments"), (["--top-k", "-1"], r"top-k must be .*0 = off")]:
        with pytest.raises(SystemExit):
            chat_web.parse_args(bad)  # -p is chat_cli's prompt; chat_web's port is --port only
        assert re.search(message, capsys.readouterr().err), bad
    assert chat_web.parse_args(["--port", "8080"]).port == 8080
    for parse in (chat_cli.build_parser().parse_args, chat_web.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = capsys.readouterr().out
        assert "0 = off" in text and "Contract" not in text and len(text.splitlines()) < 50, text


def test_one_shot_stopped_by_ctrl_c_keeps_what_was_said_and_exits_130(script_env, long_reply_dir):
    env = {**script_env, "NANOCHAT_BASE_DIR": str(long_reply_dir)}
    command = [sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "-m", "1000", "-p", "hello"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        said = process.stdout.read(20)  # the reply is streaming
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and len(said) == 20 and rest.endswith(b"\n")
    assert len(err.decode().splitlines()) == 1  # the banner; no notice of how the reply ended
