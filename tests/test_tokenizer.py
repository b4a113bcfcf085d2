"""nanochat.tokenizer: training, the saved format, encoding, token_bytes and the chat protocol."""

import json
import os

import pytest

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

VOCAB = 1024


@pytest.fixture(scope="module")
def tokenizer(wiki_docs) -> Tokenizer:
    """A throwaway tokenizer trained on the first 400 Wikipedia articles."""
    return Tokenizer.train_from_iterator(wiki_docs[:400], VOCAB)


def test_vocab_layout_puts_specials_after_merges_in_order(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB
    ids = [tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tokenizer.get_bos_token_id() == VOCAB - len(SPECIAL_TOKENS)


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["text"], 264)


def test_encode_decode_round_trip_and_no_special_from_text(tokenizer, wiki_docs):
    text = "<|bos|>hello <|assistant_end|> world <|user_start|>" + wiki_docs[-1][:2000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert not set(ids) & {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}


def test_batch_encode_equals_single_and_adds_specials(tokenizer, wiki_docs):
    docs = wiki_docs[-8:]
    bos = tokenizer.get_bos_token_id()
    end = tokenizer.encode_special("<|assistant_end|>")
    batch = tokenizer.encode(docs, prepend="<|bos|>", append=end, num_threads=2)
    assert batch == [[bos] + tokenizer.encode(doc) + [end] for doc in docs]
    with pytest.raises(TypeError, match="str or a list of str"):
        tokenizer.encode(42)
    with pytest.raises(KeyError, match="not a special token"):
        tokenizer.encode("x", prepend="<|nope|>")


def test_save_load_round_trip_in_a_plain_versioned_format(tokenizer, tmp_path, wiki_docs):
    path = tokenizer.save(str(tmp_path))
    with open(path) as f:
        data = json.load(f)
    assert data["format"] == "nanochat-tokenizer" and data["version"] == 1
    assert data["special_tokens"] == SPECIAL_TOKENS
    assert len(data["tokens"]) == VOCAB - len(SPECIAL_TOKENS)
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]  # written atomically, no leftovers
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded.get_pattern() == tokenizer.get_pattern()
    for doc in wiki_docs[-5:]:
        assert loaded.encode(doc) == tokenizer.encode(doc)


def test_load_errors_say_what_to_do(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        Tokenizer.load(str(tmp_path / "missing"))
    path = tokenizer.save(str(tmp_path))
    with open(path) as f:
        data = json.load(f)
    for change, message in [({"version": 99}, "format version 99"), ({"format": "pickle"}, "not a nanochat-tokenizer")]:
        with open(path, "w") as f:
            json.dump({**data, **change}, f)
        with pytest.raises(ValueError, match=message):
            Tokenizer.load(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"format": "nanochat-tok')  # truncated file
    with pytest.raises(ValueError, match="not a readable tokenizer file"):
        Tokenizer.load(str(tmp_path))


def test_token_bytes_counts_raw_bytes_and_sums_to_utf8_length(tokenizer):
    token_bytes = tokenizer.token_bytes()
    assert len(token_bytes) == VOCAB
    assert all(token_bytes[tokenizer.encode_special(name)] == 0 for name in SPECIAL_TOKENS)
    assert token_bytes[:256] == [1] * 256
    # Tokens that are not valid UTF-8 alone (parts of multi-byte characters) count their own bytes,
    # so the per-token sum equals the text's UTF-8 length even for text made of such pieces.
    partial = [i for i in range(256, VOCAB - len(SPECIAL_TOKENS)) if not _is_utf8(tokenizer.id_to_bytes(i))]
    text = "naïve café 日本語 emoji 🙂👍🏽 — ok"
    ids = tokenizer.encode(text)
    assert sum(token_bytes[i] for i in ids) == len(text.encode("utf-8"))
    assert any(not _is_utf8(tokenizer.id_to_bytes(i)) for i in ids), "text should exercise partial-character tokens"
    assert all(token_bytes[i] == len(tokenizer.id_to_bytes(i)) for i in partial)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------- chat protocol


def expected_render(tok, pieces):
    """(ids, mask) from a list of (special name or text, mask) pieces."""
    ids, mask = [], []
    for piece, trained in pieces:
        tokens = [tok.encode_special(piece)] if piece in SPECIAL_TOKENS else tok.encode(piece)
        ids += tokens
        mask += [trained] * len(tokens)
    return ids, mask


def test_render_conversation_masks_every_part_type(tokenizer):
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 12*7?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute. "},
                    {"type": "python", "text": "12*7"},
                    {"type": "python_output", "text": "84"},
                    {"type": "text", "text": " It is 84."},
                ],
            },
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ]
    }
    ids, mask = tokenizer.render_conversation(conversation)
    assert (ids, mask) == expected_render(
        tokenizer,
        [
            ("<|bos|>", 0),
            ("<|user_start|>", 0),
            ("Be brief.\n\nWhat is 12*7?", 0),
            ("<|user_end|>", 0),
            ("<|assistant_start|>", 0),
            ("Let me compute. ", 1),
            ("<|python_start|>", 1),
            ("12*7", 1),
            ("<|python_end|>", 1),
            ("<|output_start|>", 0),
            ("84", 0),
            ("<|output_end|>", 0),
            (" It is 84.", 1),
            ("<|assistant_end|>", 1),
            ("<|user_start|>", 0),
            ("Thanks!", 0),
            ("<|user_end|>", 0),
            ("<|assistant_start|>", 0),
            ("You're welcome.", 1),
            ("<|assistant_end|>", 1),
        ],
    )


def test_render_conversation_truncates_ids_and_mask_together(tokenizer):
    messages = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 200}]
    ids, mask = tokenizer.render_conversation(messages, max_tokens=50)
    full_ids, full_mask = tokenizer.render_conversation(messages)
    assert len(ids) == len(mask) == 50
    assert (ids, mask) == (full_ids[:50], full_mask[:50])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant' where 'user' was expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user message"),
        ([{"role": "user", "content": ["not", "a", "string"]}], "user content must be a string"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
            "part 0",
        ),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}], "string or a list of parts"),
        ([{"content": "no role"}], "must be a dict with 'role' and 'content'"),
    ],
)
def test_malformed_conversations_raise_clear_errors(tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.render_conversation(messages)


def test_render_for_completion_drops_the_answer_and_primes_the_assistant(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids = tokenizer.render_for_completion(messages)
    prompt_ids, _ = tokenizer.render_conversation(messages[:1])
    assert ids == prompt_ids + [tokenizer.encode_special("<|assistant_start|>")]
    assert tokenizer.render_for_completion(messages[:1]) == ids
