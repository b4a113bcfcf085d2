"""The Rust BPE trainer against slow references: Python BPE, the regex engines, and HF tokenizers."""

import json
import subprocess
import sys
import threading
import time

import pytest
import regex

import rustbpe
from bpe_reference import Replay, bytes_to_unicode, naive_bpe, word_counts

PATTERN = rustbpe.DEFAULT_PATTERN

UNICODE_EDGE_CASES = [
    "",
    "plain ASCII text, with punctuation!?",
    "naïve café résumé — “quotes” ‘single’ …",
    "e\u0301 combining marks \u0301\u0302 and a lone one",
    "日本語のテキストと漢字、カタカナ。中文文本。한국어 텍스트입니다.",
    "emoji 🙂 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵",
    "whitespace \t\t tabs \r\n CRLF \u00a0nbsp \u2003em \u3000ideographic \u2028line sep\n\n\n",
    "zero width \u200b\u200c\u200d joiners and \ufeffBOM",
    "numbers 1 22 333 4444 ١٢٣٤ ⅧⅨ ½¾ 𝟙𝟚𝟛",
    "RTL עברית العربية mixed with LTR",
    "\x00\x01\x7f control characters \x1b[31m",
    "contractions: it's, we're, they'll, I'VE, Don'T, 'ſ",
    "<|bos|> <|assistant_end|> special-token lookalikes",
    'math ∑ ∫ √ ∞ ≠ ≤ ≥ and code: fn main() { println!("{}", x); }',
    "a" * 1000 + " " * 100 + "ab" * 300,
    "𐍈 Gothic, 𓀀 hieroglyphs, 🀄 mahjong",
]
# Short cases, one alternative of the pattern (or one boundary between two) at a time.
SPLIT_EDGE_CASES = [
    " ", "\n", "\r\n", " \n ", "  a", "\t\tb", "'s", "'S", "'ſ", "'ll'LL'Ve're'rE", "'x", "''s", "don't",
    "it'sn't", " 'hello", "(hello)", "a1b22c333", "١٢٣ ⅷ ½", "emoji 🙂🙂 👍🏽 family 👨‍👩‍👧", "mixed\u00a0nbsp\u2003em",
    "tab\tsep\x0bvt\x0cff", "a\u200bzero-width", "x \u0301combining e\u0301", "  \r\n\r\n  x", "$$ 100 %% ?!",
    " !x", "  !x", "line\n  ...\n", "  ", "   \U0001F600", "Ǆǅǆ ß ﬁ", "𝟙𝟚 𝐀𝐁", "\ufeffbom", "a\u2028b\u2029c",
]  # fmt: skip


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def tiktoken_encoding(tok):
    """The trained ranks as a tiktoken encoding: nanochat encodes only through tiktoken."""
    import tiktoken

    ranks = dict(tok.get_mergeable_ranks())
    return tiktoken.Encoding(name="t", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})


def ranks_to_merges(tok) -> list[tuple[bytes, bytes]]:
    """Each merge as (left bytes, right bytes)."""
    vocab = [token for token, _ in tok.get_mergeable_ranks()]
    return [(vocab[a], vocab[b]) for a, b in tok.get_merges()]


# ---------------------------------------------------------------------------- merge order


def test_merges_identical_to_naive_python_bpe(wiki_docs):
    texts = wiki_docs[:12] + UNICODE_EDGE_CASES  # ~30 KB: small enough to recount every pair at every step
    counts = word_counts(texts, lambda t: regex.findall(PATTERN, t))
    expected = naive_bpe(counts, 300)
    tok = train(texts, 256 + 300)
    assert tok.get_merges() == expected
    assert len(tok.get_mergeable_ranks()) == 556


def test_overlapping_and_repeated_pairs_match_naive_python_bpe():
    """Words where one occurrence of a pair overlaps the next, or two merges sit side by side."""
    corpus = {"aaaa": 3, "aaa": 5, "abab": 2, "ababab": 1, "ba": 4, "abcabc": 2, "bcbc": 2, "x": 100, "aabb": 1,
              "😀😀": 2, "hello": 3, "yellow": 2, "hell": 1}  # fmt: skip
    text = " ".join(" ".join([word] * n) for word, n in corpus.items())
    counts = word_counts([text], lambda t: t.split())
    for num_merges in (1, 2, 5, 10, 20, 40):
        assert train([text], 256 + num_merges, pattern=r"\S+").get_merges() == naive_bpe(counts, num_merges)


def test_ties_break_toward_the_smaller_pair():
    # ("c","d") and ("a","b") occur 3 times each; ("x","y") twice.
    tok = train(["cd cd cd ab ab ab xy xy"], 256 + 3, pattern=r"\S+")
    merges = [(chr(a), chr(b)) for a, b in tok.get_merges()]
    assert merges == [("a", "b"), ("c", "d"), ("x", "y")]


def test_stops_when_text_runs_out_of_pairs():
    tok = train(["ab ab"], 1000)
    assert len(tok.get_mergeable_ranks()) == 256 + len(tok.get_merges()) < 1000


def test_batches_and_generators_do_not_change_the_result(wiki_docs):
    texts = wiki_docs[:200]
    reference = train(texts, 1000).get_merges()
    assert train((t for t in texts), 1000, buffer_size=7).get_merges() == reference
    assert train(texts, 1000, buffer_size=1).get_merges() == reference


@pytest.mark.slow
def test_matches_hf_tokenizers_up_to_tie_order(wiki_docs):
    """HF's BPE trainer, same pattern and vocab: every difference in merge order is a tie in counts.

    HF breaks ties by its own token ids (ByteLevel characters), not by bytes. Replaying each trainer's
    merges on the same chunk counts shows both always merge a pair of the highest count; cutting the
    vocabulary where the counts strictly drop (not inside a tie) then gives the same token set, and the
    same encoded length on held-out text.
    """
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    train_docs, heldout = wiki_docs[:1500], wiki_docs[-300:]  # ~3 MB of training text
    counts = word_counts(train_docs, lambda t: rustbpe.split(t))

    # Our merges and the count of each at the time it was made; pick a vocab size at a strict drop.
    ours_full = ranks_to_merges(train(train_docs, 256 + 2200))
    replay = Replay(counts)
    our_counts = []
    for pair in ours_full:
        assert replay.max_count() == replay.pairs.get(pair, 0), "our trainer skipped a more frequent pair"
        our_counts.append(replay.apply(pair))
    num_merges = next(k for k in range(2000, 2200) if our_counts[k - 1] > our_counts[k])
    ours = ours_full[:num_merges]

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(train_docs, trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    hf_merges = []
    for merge in json.loads(hf.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        hf_merges.append((bytes(to_byte[c] for c in left), bytes(to_byte[c] for c in right)))
    assert len(hf_merges) == num_merges

    # HF's sequence is a valid greedy BPE on the same counts: each merge had the highest count.
    replay = Replay(counts)
    hf_counts = []
    for step, pair in enumerate(hf_merges):
        assert replay.max_count() == replay.pairs.get(pair, 0), f"HF merge {step} {pair} was not a most frequent pair"
        hf_counts.append(replay.apply(pair))
    # Equal counts step by step, and the same merges within every run of equal count: the sequences
    # differ only by the order of tied merges.
    assert hf_counts == our_counts[:num_merges]
    runs = {}
    for k, count in enumerate(hf_counts):
        runs.setdefault(count, ([], []))
        runs[count][0].append(ours[k])
        runs[count][1].append(hf_merges[k])
    for count, (our_run, hf_run) in runs.items():
        assert set(our_run) == set(hf_run), f"the merges with count {count} differ"
    assert sum(a != b for a, b in zip(ours, hf_merges)) > 0, "no tie was ordered differently: test lost its point"

    # Same vocabulary -> same encoded length on held-out text.
    ours_tok = tiktoken_encoding(train(train_docs, 256 + num_merges))
    our_len = sum(len(ours_tok.encode_ordinary(doc)) for doc in heldout)
    hf_len = sum(len(enc.ids) for enc in hf.encode_batch(heldout))
    assert our_len == hf_len


# ---------------------------------------------------------------------------- pre-tokenizer


@pytest.mark.slow
def test_fast_splitter_equals_the_regex_on_the_whole_wikipedia_sample(wiki_docs):
    """The hand-written scanner against fancy-regex (tiktoken's engine) and Python's `regex`, every article."""
    compiled = regex.compile(PATTERN)
    for i, doc in enumerate(wiki_docs):
        fast = rustbpe.split(doc)
        assert fast == rustbpe.split(doc, force_regex=True), f"article {i} splits differently from fancy-regex"
        assert fast == compiled.findall(doc), f"article {i} splits differently from Python regex"


def test_fast_splitter_equals_the_regex_on_unicode_edge_cases():
    compiled = regex.compile(PATTERN)
    for text in UNICODE_EDGE_CASES + SPLIT_EDGE_CASES:
        assert rustbpe.split(text) == rustbpe.split(text, force_regex=True) == compiled.findall(text), text


def test_custom_pattern_is_used_for_training_and_encoding():
    tok = train(["hello world hello world"], 260, pattern=r"\S+|\s+")
    assert tok.get_pattern() == r"\S+|\s+"
    assert rustbpe.split("a  b", pattern=r"\S+|\s+") == ["a", "  ", "b"]


# ---------------------------------------------------------------------------- encoding


def test_exported_ranks_round_trip_unicode_edge_cases_through_tiktoken(wiki_docs):
    enc = tiktoken_encoding(train(wiki_docs[:300] + UNICODE_EDGE_CASES, 2000))
    texts = UNICODE_EDGE_CASES + SPLIT_EDGE_CASES + wiki_docs[-20:]
    for text in texts:
        assert enc.decode_bytes(enc.encode_ordinary(text)).decode("utf-8") == text
    assert sum(map(len, enc.encode_ordinary_batch(texts))) < sum(len(t.encode()) for t in texts) / 2  # merges used


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"vocab_size": 255}, ValueError, "vocab_size must be at least 256"),
        ({"vocab_size": -1}, ValueError, "vocab_size must be at least 256"),
        ({"vocab_size": 300, "pattern": "(unclosed"}, ValueError, "invalid split pattern"),
        ({"vocab_size": 300, "buffer_size": 0}, ValueError, "buffer_size must be at least 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        rustbpe.Tokenizer().train_from_iterator(iter(["some text"]), **kwargs)


def test_non_string_items_raise_type_error_naming_the_item():
    with pytest.raises(TypeError, match=r"item 2 is of type int"):
        train(["ok", "fine", 3, "never reached"], 300)
    with pytest.raises(TypeError, match=r"item 0 is of type bytes"):
        train([b"bytes are not text"], 300)


def test_non_iterable_raises_type_error():
    with pytest.raises(TypeError, match="expects an iterable of str, got int"):
        rustbpe.Tokenizer().train_from_iterator(42, 300)


def test_lone_surrogate_raises_value_error():
    with pytest.raises(ValueError, match="not valid Unicode"):
        train(["fine", "bad \ud800 surrogate"], 300)


def test_iterator_exception_propagates_after_many_batches():
    def texts():
        for i in range(20_000):
            yield f"document {i} text"
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        train(texts(), 300, buffer_size=1000)


# ---------------------------------------------------------------------------- resources


def test_training_releases_the_gil(wiki_docs):
    """A Python thread keeps running while the trainer works."""
    ticks = 0
    done = threading.Event()

    def tick():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    start = time.time()
    train(wiki_docs * 2, 16000)
    elapsed = time.time() - start
    done.set()
    thread.join()
    # Holding the GIL throughout would allow only a handful of ticks; free, the thread ticks ~1000/s.
    assert ticks > 100 * elapsed, (ticks, elapsed)


@pytest.mark.slow
def test_memory_follows_unique_chunks_not_corpus_size():
    """Streaming 8x more text of the same vocabulary must not grow peak memory by more than a few MB."""
    script = """
import resource, sys, rustbpe
words = [f"w{i} " for i in range(2000)]
def texts(n):
    for i in range(n):
        yield "".join(words[(i * 7 + j) % 2000] for j in range(400))  # ~2.4 KB, all words seen early
tok = rustbpe.Tokenizer()
tok.train_from_iterator(texts(int(sys.argv[1])), 3000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    peak = {}
    for n in (10_000, 80_000):  # 24 MB and 192 MB of text
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, check=True)
        peak[n] = int(out.stdout.strip()) / 1024
    assert peak[80_000] - peak[10_000] < 16, peak
