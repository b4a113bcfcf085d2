"""The tokenizer: trained by rustbpe, run by tiktoken, plus the chat protocol.

Contract:
- Byte-level BPE with nanochat's split pattern and 9 special tokens, whose ids follow the merged tokens.
- `encode` never produces a special token from plain text (a literal "<|bos|>" in a document is just bytes);
  specials enter only through `encode_special` and the chat renderers.
- Saved as one JSON file (`tokenizer.json`): format name, version, pattern, the token byte strings in rank
  order (base64) and the special tokens. Plain data, readable without this code; no pickles.
- `render_conversation` turns a chat into (ids, mask) where mask 1 marks what the model is trained to say.

Not here: reading datasets (nanochat/dataset.py), training loops, or the tokenizer CLI (scripts/tok_train.py).
"""

import base64
import json
import os
from collections.abc import Iterable

import tiktoken

import rustbpe
from nanochat.common import atomic_write

# <|bos|> starts every document and conversation; the assistant calls the Python tool between python_start/end,
# and the tool's output is inserted between output_start/end (never trained on).
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]  # fmt: skip

# GPT-4's pattern with numbers grouped 1-2 digits, not 1-3 (d12 val bpb 0.965 vs 0.972; nanochat dev/LOG.md).
SPLIT_PATTERN = rustbpe.DEFAULT_PATTERN

FORMAT_NAME = "nanochat-tokenizer"
FORMAT_VERSION = 1
FILENAME = "tokenizer.json"


class Tokenizer:
    """A tiktoken Encoding plus nanochat's special tokens and chat rendering."""

    def __init__(self, encoding: tiktoken.Encoding, pattern: str, bos_token: str = "<|bos|>", mergeable_ranks=None):
        self.encoding = encoding
        self.pattern = pattern
        self.bos_token = bos_token
        self._mergeable_ranks = mergeable_ranks  # token bytes in rank order, when known
        self._special_ids = {name: encoding.encode_single_token(name) for name in encoding.special_tokens_set}

    # ------------------------------------------------------------------ construction

    @classmethod
    def train_from_iterator(
        cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN, verbose: bool = False
    ) -> "Tokenizer":
        """Trains on the strings of `texts`; `vocab_size` counts the 256 bytes, the merges and the specials."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size must be at least {minimum} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), "
                f"got {vocab_size}"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern, verbose=verbose)
        # Text with too few distinct pairs yields fewer merges: the vocabulary is then smaller than asked.
        return cls.from_ranks([token for token, _ in trainer.get_mergeable_ranks()], trainer.get_pattern())

    @classmethod
    def from_ranks(cls, ranks: list[bytes], pattern: str) -> "Tokenizer":
        if len(set(ranks)) != len(ranks):
            raise ValueError("token byte strings must be unique: the merge table is corrupt")
        mergeable_ranks = {token: rank for rank, token in enumerate(ranks)}
        special_tokens = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens), pattern, "<|bos|>", ranks)  # fmt: skip

    @classmethod
    def from_pretrained(cls, name: str) -> "Tokenizer":
        """A tiktoken encoding such as "gpt2" or "cl100k_base" (downloaded by tiktoken on first use)."""
        encoding = tiktoken.get_encoding(name)
        return cls(encoding, encoding._pat_str, bos_token="<|endoftext|>")

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        path = os.path.join(directory, FILENAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no tokenizer at {path}: train one with `python -m scripts.tok_train` "
                f"(or point NANOCHAT_BASE_DIR at the directory that holds tokenizer/{FILENAME})"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable tokenizer file ({e}); retrain with scripts.tok_train") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME} file")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {data.get('version')}, this code reads {FORMAT_VERSION}")
        if data.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"{path} has special tokens {data.get('special_tokens')}, expected {SPECIAL_TOKENS}")
        ranks = [base64.b64decode(token) for token in data["tokens"]]
        return cls.from_ranks(ranks, data["pattern"])

    def save(self, directory: str) -> str:
        """Writes tokenizer.json atomically (temp file + rename); returns its path."""
        if self._mergeable_ranks is None:
            raise ValueError("only a tokenizer trained by nanochat can be saved")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILENAME)
        tokens = [base64.b64encode(token).decode("ascii") for token in self._mergeable_ranks]
        # Special token ids follow the tokens, in the listed order.
        data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "pattern": self.pattern,
                "special_tokens": SPECIAL_TOKENS, "tokens": tokens}  # fmt: skip
        atomic_write(path, lambda f: f.write(json.dumps(data).encode("utf-8")))
        return path

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_bos_token_id(self) -> int:
        return self._special_ids[self.bos_token]

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of this tokenizer") from None

    def get_pattern(self) -> str:
        return self.pattern

    def id_to_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every token (0 for specials), for bits per byte.

        Counted on the raw bytes, so a token that is only part of a multi-byte character counts its own
        bytes (decoding it to text first would count a 3-byte U+FFFD instead).
        """
        specials = set(self._special_ids.values())
        return [0 if i in specials else len(self.id_to_bytes(i)) for i in range(self.get_vocab_size())]

    # ------------------------------------------------------------------ text

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Encodes a str (-> list of ids) or a list of str (-> list of lists, threaded).

        `prepend`/`append` are a special token name or id added to each sequence. Special-token text inside
        `text` is encoded as ordinary bytes.
        """
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.encoding.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            batch = self.encoding.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [pre + ids + post for ids in batch]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def _as_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    # ------------------------------------------------------------------ chat

    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) for a conversation; mask 1 = the model is trained to produce this token.

        `conversation` is a list of messages (or a dict with "messages"): an optional system message, then
        user and assistant turns alternating, starting with user. User content is a string; assistant
        content is a string or a list of parts {"type": "text" | "python" | "python_output", "text": ...}.
        Trained: assistant text, python code with its delimiters, and <|assistant_end|>. Not trained:
        <|bos|>, user turns, <|assistant_start|>, tool output with its delimiters. Cut to `max_tokens`.
        """
        messages = _validated_messages(conversation)
        ids, mask = [], []

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self.encode_special
        add([self.get_bos_token_id()], 0)
        for message in messages:
            if message["role"] == "user":
                add([sp("<|user_start|>"), *self.encode(message["content"]), sp("<|user_end|>")], 0)
                continue
            add([sp("<|assistant_start|>")], 0)
            content = message["content"]
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add([sp("<|python_start|>"), *tokens, sp("<|python_end|>")], 1)
                else:  # python_output: produced by the tool at inference, so never a training target
                    add([sp("<|output_start|>"), *tokens, sp("<|output_end|>")], 0)
            add([sp("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids that ask the model for the next assistant turn.

        A trailing assistant message (the reference answer in an eval set) is dropped, which leaves the
        conversation ending with a user message (alternation guarantees it).
        """
        messages = _validated_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation(messages, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]


PART_TYPES = ("text", "python", "python_output")


def _validated_messages(conversation) -> list[dict]:
    """Checks the shape of a conversation and merges a leading system message into the first user turn."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of messages (or a dict with a 'messages' list)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        system, first = messages[0]["content"], messages[1]["content"]
        if not isinstance(system, str) or not isinstance(first, str):
            raise ValueError("system and user message contents must be strings")
        messages = [{"role": "user", "content": system + "\n\n" + first}] + messages[2:]
    for i, message in enumerate(messages):
        expected, content = ("user", "assistant")[i % 2], message["content"]
        if message["role"] != expected:
            raise ValueError(
                f"message {i} has role {message['role']!r} where {expected!r} was expected: turns must alternate "
                "user/assistant, starting with user (a system message may come first)"
            )
        if isinstance(content, str):
            continue
        if expected == "user" or not isinstance(content, list):
            kinds = "a string" if expected == "user" else "a string or a list of parts"
            raise ValueError(f"message {i}: {expected} content must be {kinds}")
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in PART_TYPES and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"message {i} part {j} must be {{'type': one of {PART_TYPES}, 'text': str}}, got {part!r:.80}"
                )
    return messages


def get_tokenizer(base_dir: str | None = None) -> Tokenizer:
    """The tokenizer trained by scripts.tok_train, from `<base dir>/tokenizer/`."""
    from nanochat.common import get_base_dir

    return Tokenizer.load(os.path.join(base_dir or get_base_dir(), "tokenizer"))
