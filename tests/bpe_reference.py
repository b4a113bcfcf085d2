"""Slow, obviously-correct BPE in Python, for checking the Rust trainer and explaining HF's merge order.

`naive_bpe` recounts every pair before every merge. `Replay` applies a given merge sequence incrementally
and reports, for each step, the count of the merged pair and the highest count of any pair at that moment:
a merge sequence is a valid greedy BPE exactly when the two are equal at every step.
"""

import heapq
from collections import Counter, defaultdict


def word_counts(texts, split) -> Counter:
    """Counts of each chunk's UTF-8 bytes, as the trainer sees them."""
    counts = Counter()
    for text in texts:
        counts.update(chunk.encode("utf-8") for chunk in split(text))
    return counts


def naive_bpe(counts: Counter, num_merges: int) -> list[tuple[int, int]]:
    """Most frequent adjacent pair, ties broken by the smaller (left, right) pair; merged left to right."""
    words = [(list(word), n) for word, n in counts.items()]
    merges = []
    for k in range(num_merges):
        pair_counts = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        words = [(merge_ids(ids, best, 256 + k), n) for ids, n in words]
    return merges


def merge_ids(ids, pair, new):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Replay:
    """Applies merges given as byte-string pairs, tracking every pair's count incrementally."""

    def __init__(self, counts: Counter):
        self.words = [[bytes([b]) for b in word] for word in counts]
        self.weights = list(counts.values())
        self.pairs = Counter()
        self.where = defaultdict(set)
        for w, tokens in enumerate(self.words):
            for pair in zip(tokens, tokens[1:]):
                self.pairs[pair] += self.weights[w]
                self.where[pair].add(w)
        self.heap = [(-c, p) for p, c in self.pairs.items()]
        heapq.heapify(self.heap)

    def max_count(self) -> int:
        while self.heap:
            c, p = self.heap[0]
            if self.pairs.get(p, 0) == -c:
                return -c
            heapq.heappop(self.heap)
            if self.pairs.get(p, 0) > 0:
                heapq.heappush(self.heap, (-self.pairs[p], p))
        return 0

    def apply(self, pair: tuple[bytes, bytes]) -> int:
        """Merges `pair` everywhere; returns its count just before the merge."""
        count = self.pairs.get(pair, 0)
        merged = pair[0] + pair[1]
        for w in list(self.where.pop(pair, ())):
            tokens, n = self.words[w], self.weights[w]
            for old in zip(tokens, tokens[1:]):
                self.pairs[old] -= n
            out = merge_ids(tokens, pair, merged)
            self.words[w] = out
            for new in zip(out, out[1:]):
                self.pairs[new] += n
                self.where[new].add(w)
                heapq.heappush(self.heap, (-self.pairs[new], new))
        self.pairs.pop(pair, None)
        return count


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, as HF's ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
