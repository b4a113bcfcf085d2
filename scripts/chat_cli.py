"""Chat with a trained model in the terminal, or get one reply with -p.

    python -m scripts.chat_cli                                   # the sft model: largest depth, last step
    python -m scripts.chat_cli -i base -g d20                    # any stage (base | mid | sft | rl), any model
    python -m scripts.chat_cli -p "Why is the sky blue?"         # one reply on stdout, then exit
    python -m scripts.chat_cli --quantize int8 --device-type cpu # int8 weights: 2-4x faster CPU decode
    python -m scripts.chat_cli -i base -g d2 --device-type cpu -m 32 -p "hi"   # a tiny CPU run

In the chat, /help lists the commands. Ctrl-C stops a reply (what was said is kept); quit, exit or Ctrl-D leaves.
Keys pressed while a reply is printing are dropped: they are not shown and do not start the next message.

Contract:
- The conversation is kept as exact token ids, one closed turn per exchange: `<|user_start|> message <|user_end|>
  <|assistant_start|>`, the reply's own ids (the calculator's output included), `<|assistant_end|>`; the prompt is
  `<|bos|>` + the turns + the new message, as `tokenizer.render_for_completion` without re-encoding replies.
- Before each reply the oldest turns are dropped whole, with a notice, until there is room for a reply
  (`reply_room`); a message that does not fit alone is refused, the conversation unchanged.
- A calculator call shows as `[calculator: 12*5 = 60]`, no other special token is shown. Reply n samples with
  seed `--seed` + n. `--quantize` and `--compile` do not combine yet (dev/LOG.md).
- Replies and command answers go to stdout, the banner and notices to stderr. With -p, stdout is the reply and
  nothing else; no notice says how it ended (Ctrl-C: exit code 130). User errors (a missing checkpoint or
  tokenizer, a message too long with -p) end with one line and exit code 1 (bad flags: argparse's 2).
- On a terminal, echo is off while a reply streams and whatever was typed meanwhile is discarded when it ends
  (termios TCSAFLUSH): it never shows inside the reply nor sends a line of its own.
- Flags share their short forms with scripts/chat_web.py (-i -g -s -t -k -m); 0 turns top-k off in both.

Commands: /help, /clear, /temperature X, /topk N, /topp P; quit, exit, /quit or Ctrl-D leave. Ctrl-C at the
prompt drops the line.

Not here: serving (scripts/chat_web.py), sampling and the tool (nanochat/engine.py), chat rendering (tokenizer.py).
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import chain

from nanochat.checkpoint import STAGES, CheckpointError, checkpoint_dir, load_model
from nanochat.common import compute_init
from nanochat.engine import ContextFullError, Engine, ReplyRenderer, finish_reason
from nanochat.quantize import SCHEMES, quantize_model
from nanochat.tokenizer import get_tokenizer

try:
    import termios
except ImportError:  # Windows: no terminal modes to change
    termios = None

QUIT_WORDS = ("quit", "exit", "/quit", "/exit")

HELP = """commands:
  /clear            start a new conversation
  /temperature X    sampling temperature (0 = greedy)
  /topk N           sample among the N most likely tokens (0 = off)
  /topp P           sample from the smallest set of tokens with probability P (1 = off)
  /help             this list and the current settings
  quit, exit, /quit or Ctrl-D: leave.  Ctrl-C stops a reply."""


# ---------------------------------------------------------------------------- settings
def _parse(text: str, kind, valid, requirement: str):
    """`kind(text)` if it converts and passes `valid`, else an error saying what is expected (flags and commands)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}")
    return value


def parse_temperature(text: str) -> float:
    return _parse(text, float, lambda t: t >= 0 and t != float("inf"), "temperature must be a number >= 0")


def parse_top_k(text: str) -> int | None:
    return _parse(text, int, lambda k: k >= 0, "top-k must be an integer >= 0 (0 = off)") or None


def parse_top_p(text: str) -> float | None:
    top_p = _parse(text, float, lambda p: 0 < p <= 1, "top-p must be a number in (0, 1] (1 = off)")
    return None if top_p == 1 else top_p


def parse_max_tokens(text: str) -> int:
    return _parse(text, int, lambda n: n >= 1, "max tokens must be an integer >= 1")


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_k: int | None  # None = off
    top_p: float | None  # None = off
    max_tokens: int  # per reply; the model's context may cut a reply shorter

    def describe(self) -> str:
        return (
            f"temperature {self.temperature}, top-k {self.top_k or 'off'}, top-p {self.top_p or 'off'}, "
            f"at most {self.max_tokens} tokens per reply"
        )


@dataclass
class Session:
    sampling: Sampling
    seed: int
    turns: list[list[int]] = field(default_factory=list)  # closed turns, oldest first (see the contract)
    replies: int = 0  # replies so far: reply n samples with seed + n


# ---------------------------------------------------------------------------- conversation
def user_turn_tokens(tokenizer, message: str) -> list[int]:
    """`<|user_start|> message <|user_end|> <|assistant_start|>`: the tokenizer's rendering of a one-message
    chat without its `<|bos|>`, so the chat protocol lives in one place (nanochat/tokenizer.py)."""
    return tokenizer.render_for_completion([{"role": "user", "content": message}])[1:]


def render_prompt(tokenizer, turns: list[list[int]], user_tokens: list[int]) -> list[int]:
    """The prompt asking for the next reply: `<|bos|>`, every closed turn, the new user message."""
    return [tokenizer.get_bos_token_id(), *chain.from_iterable(turns), *user_tokens]


def close_turn(tokenizer, user_tokens: list[int], reply_tokens: list[int]) -> list[int]:
    """A finished turn: the user message, the reply exactly as generated, `<|assistant_end|>`. A reply cut short
    (max tokens, Ctrl-C) is closed the same way, so the next turn always starts on the protocol."""
    return [*user_tokens, *reply_tokens, tokenizer.encode_special("<|assistant_end|>")]


def reply_room(context_len: int, max_tokens: int) -> int:
    """Context positions kept free for a reply: all of max_tokens, but at most a quarter of the context, so a
    large --max-tokens does not wipe the history (a reply may still run on while the context lasts)."""
    return max(1, min(max_tokens, context_len // 4))


def trim_to_fit(turns: list[list[int]], user_tokens: list[int], context_len: int, room: int) -> list[list[int]]:
    """The newest whole turns that fit in `context_len` beside `<|bos|>`, the new message and `room` reply tokens,
    oldest first. Raises ContextFullError when the message does not fit even alone."""
    longest_message = context_len - 1 - room  # 1 for <|bos|>
    space = longest_message - len(user_tokens)  # positions left for old turns
    if space < 0:
        raise ContextFullError(
            f"your message is {len(user_tokens)} tokens with its markers, but the model's context of "
            f"{context_len} tokens holds at most {longest_message} beside a {room}-token reply; shorten it "
            "(the conversation is unchanged)"
        )
    kept, used = [], 0
    for turn in reversed(turns):
        if used + len(turn) > space:
            break  # stop at the first turn that does not fit: what is kept is always the newest turns
        kept.append(turn)
        used += len(turn)
    return kept[::-1]


# ---------------------------------------------------------------------------- replies
def terminal_text(piece: tuple) -> str:
    """A rendered piece as printed; a refused calculator call as `[calculator: expr]`."""
    if piece[0] == "text":
        return piece[1]
    _, expression, output = piece
    return f"[calculator: {expression}]" if output is None else f"[calculator: {expression} = {output}]"


FINISH_NOTICES = {
    "length": "[the reply reached the limit of {max_tokens} tokens (--max-tokens)]",
    "context": "[the reply filled the model's context; older turns will be dropped]",
    "interrupted": "[reply stopped]",
}


def stream_reply(engine: Engine, prompt: list[int], sampling: Sampling, seed: int, write) -> tuple[list[int], str]:
    """Generates one reply to `prompt`, writing its text as it comes. Returns (reply ids, the stop token
    excluded; finish reason: "stop" | "length" | "context" | "interrupted" by Ctrl-C)."""
    budget = engine.token_budget(len(prompt), sampling.max_tokens)
    renderer = ReplyRenderer(engine.tokenizer, hide_special=True)  # special tokens are protocol, not text
    reply, finish = [], None
    steps = engine.generate(
        prompt, 1, sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.top_p, seed=seed
    )
    try:
        for column, masks in steps:
            if column[0] in engine.stop_ids and masks[0] == 1:
                finish = "stop"
                break
            reply.append(column[0])
            write("".join(map(terminal_text, renderer.push(column[0]))))
    except KeyboardInterrupt:
        finish = "interrupted"
    finally:
        steps.close()
    write("".join(map(terminal_text, renderer.finish())))
    return reply, finish or finish_reason(False, budget, sampling.max_tokens)


def respond(engine: Engine, session: Session, message: str, write, notice, prefix: str = "") -> str | None:
    """One user message -> one streamed reply, added to the session as a closed turn; returns its finish reason.
    Old turns are dropped first if needed. None, with the session unchanged, when the message cannot fit at all."""
    tokenizer = engine.tokenizer
    user_tokens = user_turn_tokens(tokenizer, message)
    room = reply_room(engine.context_len, session.sampling.max_tokens)
    try:
        kept = trim_to_fit(session.turns, user_tokens, engine.context_len, room)
    except ContextFullError as e:
        notice(f"[{e}]")
        return None
    dropped = len(session.turns) - len(kept)
    if dropped:
        notice(f"[dropped {dropped} old turn{'s' if dropped > 1 else ''} to fit the context]")
    session.turns = kept
    write(prefix)
    prompt = render_prompt(tokenizer, kept, user_tokens)
    reply, finish = stream_reply(engine, prompt, session.sampling, session.seed + session.replies, write)
    write("\n")
    session.replies += 1
    session.turns.append(close_turn(tokenizer, user_tokens, reply))
    return finish


# ---------------------------------------------------------------------------- commands
class QuitChat(Exception):
    """The user asked to leave."""


SETTERS = {  # command -> (Sampling field, parser)
    "/temperature": ("temperature", parse_temperature),
    "/topk": ("top_k", parse_top_k),
    "/topp": ("top_p", parse_top_p),
}


def apply_command(line: str, session: Session, context_len: int) -> str:
    """Runs a `/command` line against the session; returns the answer to print. Raises QuitChat to leave."""
    name, _, value = line.strip().partition(" ")
    name, value = name.lower(), value.strip()
    if name in QUIT_WORDS:
        raise QuitChat
    if name == "/help":
        turns, used = len(session.turns), 1 + sum(len(turn) for turn in session.turns)  # 1 for <|bos|>
        return (
            f"{HELP}\nnow: {session.sampling.describe()}; {turns} turn{'' if turns == 1 else 's'}, "
            f"{used} of the model's {context_len} context tokens"
        )
    if name == "/clear":
        session.turns = []
        return "[new conversation]"
    if name in SETTERS:
        attribute, parse = SETTERS[name]
        try:
            parsed = parse(value)
        except argparse.ArgumentTypeError as e:
            return f"[{e}; unchanged: {session.sampling.describe()}]"
        session.sampling = replace(session.sampling, **{attribute: parsed})
        return f"[{session.sampling.describe()}]"
    return f"[unknown command {name}; /help lists the commands]"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for users (chat_cli and chat_web): the usage text as written, each default after its flag's help."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        return action.help if unset else f"{action.help} (default: %(default)s)"


# ---------------------------------------------------------------------------- the loop
def chat_loop(engine: Engine, session: Session, read_line: Callable[[str], str], write, notice) -> None:
    """The REPL: read a line, run a command or reply to it, until quit, exit, /quit or end of input."""
    while True:
        try:
            line = read_line("User: ").strip()
        except EOFError:  # Ctrl-D, or the end of piped input
            write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            write("\n")
            continue
        if not line:
            continue
        if line.lower() in QUIT_WORDS:
            return
        if line.startswith("/"):
            try:
                write(apply_command(line, session, engine.context_len) + "\n\n")
            except QuitChat:
                return
            continue
        with typing_discarded():
            finish = respond(engine, session, line, write, notice, prefix="Assistant: ")
        if finish not in (None, "stop"):
            notice(FINISH_NOTICES[finish].format(max_tokens=session.sampling.max_tokens))
        write("\n")


@contextlib.contextmanager
def typing_discarded():
    """On a terminal: echo off for the block, and the keys typed meanwhile discarded at its end, so they neither
    show inside a streaming reply nor send a line of their own. Elsewhere (pipes, Windows) nothing changes."""
    if termios is None or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = [*saved[:3], saved[3] & ~termios.ECHO, *saved[4:]]  # index 3: local modes; ISIG stays, so Ctrl-C works
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)  # TCSAFLUSH: unread input is discarded first


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # streamed tokens must show as they come, not when a line ends


def write_notice(text: str) -> None:
    sys.stdout.flush()  # keep stdout and stderr in order on a terminal
    print(text, file=sys.stderr, flush=True)


def read_stdin_line(prompt: str) -> str:
    line = input(prompt)
    if not sys.stdin.isatty():  # piped input is not echoed: print it so the transcript reads as a chat
        write_stdout(line + "\n")
    return line


def build_parser() -> argparse.ArgumentParser:
    usage = __doc__.partition("\nContract:")[0]  # what a user needs; the contract is for readers of the code
    parser = argparse.ArgumentParser(description=usage, formatter_class=HelpFormatter)
    # Model
    parser.add_argument("-i", "--source", choices=STAGES, default="sft", metavar="STAGE", help="base|mid|sft|rl")
    parser.add_argument("-g", "--model-tag", metavar="TAG", help="model directory, e.g. d20 (default: largest depth)")
    parser.add_argument("-s", "--step", type=int, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], help="default: the best available")
    parser.add_argument("--quantize", choices=sorted(SCHEMES), help="int8 or int4 weights: faster on a CPU")
    parser.add_argument("--compile", action="store_true", help="compile decoding (the first reply is slow)")
    # Sampling
    parser.add_argument("-t", "--temperature", type=parse_temperature, default=0.6, metavar="T", help="0 = greedy")
    parser.add_argument(
        "-k", "--top-k", type=parse_top_k, default=50, metavar="K", help="the K likeliest tokens; 0 = off"
    )
    parser.add_argument("--top-p", type=parse_top_p, metavar="P", help="nucleus sampling; 1 = off (default)")
    parser.add_argument("-m", "--max-tokens", type=parse_max_tokens, default=512, metavar="N", help="per reply")
    parser.add_argument("--seed", type=int, default=42, help="reply n samples with seed + n")
    # Mode
    parser.add_argument("-p", "--prompt", help="reply to this one message on stdout, then exit")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile and args.quantize:  # dev/LOG.md: inductor cannot lower the quantized matmuls (torch 2.15)
        parser.error("--compile and --quantize do not combine yet: torch.compile fails on the quantized layers")

    # ---------------------------------------------------------------- init and model
    try:
        runtime = compute_init(args.device_type, args.seed)
        model, meta = load_model(args.source, runtime.device, "eval", args.model_tag, args.step, dtype=runtime.dtype)
        tokenizer = get_tokenizer()
    except FileNotFoundError as e:
        parser.exit(
            1, f"chat_cli: {e}\nchat_cli: --source picks another stage ({' | '.join(STAGES)}), --model-tag and "
            "--step another checkpoint\n",
        )  # fmt: skip
    except (CheckpointError, RuntimeError, ValueError) as e:  # also no CUDA, a bad NANOCHAT_DEVICE or NANOCHAT_DTYPE
        parser.exit(1, f"chat_cli: {e}\n")
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        parser.exit(
            1, f"chat_cli: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model was trained on "
            f"{model.config.vocab_size}: this checkpoint was made with a different tokenizer\n",
        )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())  # before quantizing: quantized layers hold buffers
    if args.quantize:
        try:
            quantize_model(model, SCHEMES[args.quantize])
        except ValueError as e:  # int4: a layer width its group size does not divide
            parser.exit(1, f"chat_cli: --quantize {args.quantize}: {e}\n")
    engine = Engine(model, tokenizer, compile_decode=args.compile)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_tokens)
    session = Session(sampling, args.seed)
    tag = os.path.basename(checkpoint_dir(args.source, args.model_tag))
    write_notice(
        f"chat_cli: {args.source} {tag} step {meta['step']}, {params:,} "
        f"parameters, context {engine.context_len} tokens, on {runtime.device} in {runtime.dtype}"
        f"{' with ' + args.quantize + ' weights' if args.quantize else ''}{', compiled' if args.compile else ''}; "
        f"{sampling.describe()}, seed {args.seed}"
    )

    # ---------------------------------------------------------------- chat
    if args.prompt is not None:
        finish = respond(engine, session, args.prompt, write_stdout, write_notice)
        return 1 if finish is None else 130 if finish == "interrupted" else 0
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # line editing and history for input(); absent on Windows
            import readline  # noqa: F401
    write_notice("type /help for commands; quit, exit or Ctrl-D to leave")
    chat_loop(engine, session, read_stdin_line, write_stdout, write_notice)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while loading: leave quietly, with the shell's code for SIGINT
        sys.exit(130)
