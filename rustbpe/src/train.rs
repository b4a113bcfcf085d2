//! Byte-level BPE training on counted chunks.
//!
//! Input: every unique chunk of the corpus with its count (memory grows with unique chunks, never with
//! the corpus). Output: the merges in order; merge k creates token id 256 + k.
//!
//! The rule is the standard one: merge the most frequent adjacent pair, ties broken by the smaller pair
//! `(left, right)`, occurrences replaced left to right without overlap. The work is incremental:
//! - `PairStat.words` lists the words a pair occurs in (append-only; stale entries are harmless, a merge
//!   that finds nothing in a word changes nothing), so a merge touches only the words containing it;
//! - the counts change by local deltas while a word is rewritten in place;
//! - a max-heap holds (count, pair) entries refreshed lazily: counts of existing pairs only ever fall
//!   (every pair that gains is new, built on the token just created), so a popped entry whose count
//!   still matches is the true maximum, and a stale one is re-pushed with its current count.

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A pair of token ids packed as `left << 32 | right`; integer order is the tie-break order.
type Pair = u64;

#[inline]
fn pack(left: u32, right: u32) -> Pair {
    (left as u64) << 32 | right as u64
}

#[inline]
fn unpack(pair: Pair) -> (u32, u32) {
    ((pair >> 32) as u32, pair as u32)
}

#[derive(Default)]
struct PairStat {
    count: i64,
    /// Indices of words that contain (or once contained) the pair.
    words: Vec<u32>,
}

/// Unique words, stored flat: word `w` is `tokens[start[w] .. start[w] + len[w]]` (shrinks as it merges).
struct Words {
    tokens: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    /// Words of one byte never hold a pair, so they are dropped up front.
    fn new<'a>(chunks: impl Iterator<Item = (&'a [u8], i64)>) -> Self {
        let mut words = Words {
            tokens: Vec::new(),
            start: Vec::new(),
            len: Vec::new(),
            count: Vec::new(),
        };
        for (bytes, count) in chunks {
            if bytes.len() < 2 {
                continue;
            }
            words.start.push(words.tokens.len());
            words.len.push(bytes.len() as u32);
            words.count.push(count);
            words.tokens.extend(bytes.iter().map(|&b| b as u32));
        }
        words
    }

    fn word(&self, w: usize) -> &[u32] {
        &self.tokens[self.start[w]..self.start[w] + self.len[w] as usize]
    }
}

/// Counts every adjacent pair (overlapping ones too: "aaa" holds ("a","a") twice), in parallel.
fn initial_pairs(words: &Words) -> FxHashMap<Pair, PairStat> {
    let n = words.len.len();
    let per_task = n.div_ceil(rayon::current_num_threads() * 4).max(1024);
    let partial: Vec<FxHashMap<Pair, PairStat>> = (0..n)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|from| {
            let mut local: FxHashMap<Pair, PairStat> = FxHashMap::default();
            for w in from..(from + per_task).min(n) {
                let count = words.count[w];
                for window in words.word(w).windows(2) {
                    let stat = local.entry(pack(window[0], window[1])).or_default();
                    stat.count += count;
                    if stat.words.last() != Some(&(w as u32)) {
                        stat.words.push(w as u32);
                    }
                }
            }
            local
        })
        .collect();
    let mut pairs = FxHashMap::default();
    for local in partial {
        for (pair, stat) in local {
            let total: &mut PairStat = pairs.entry(pair).or_default();
            total.count += stat.count;
            total.words.extend(stat.words);
        }
    }
    pairs
}

/// State threaded through the rewriting of the words of one merge.
struct MergeStep<'a> {
    pairs: &'a mut FxHashMap<Pair, PairStat>,
    /// Pairs created in this step (they contain the new token), pushed on the heap at the end.
    created: Vec<Pair>,
}

impl MergeStep<'_> {
    #[inline]
    fn sub(&mut self, pair: Pair, count: i64) {
        if let Some(stat) = self.pairs.get_mut(&pair) {
            stat.count -= count;
        }
    }

    #[inline]
    fn add(&mut self, pair: Pair, count: i64, word: u32) {
        let stat = self.pairs.entry(pair).or_insert_with(|| {
            self.created.push(pair);
            PairStat::default()
        });
        stat.count += count;
        if stat.words.last() != Some(&word) {
            stat.words.push(word);
        }
    }

    /// Replaces (a, b) by `new` left to right in word `w`, applying the pair-count deltas as it goes.
    /// The left neighbour is read from the rewritten prefix and the right one from the original suffix,
    /// so two merges side by side ("a b a b") net out: the provisional (new, a) added by the first is
    /// taken back by the second, which adds (new, new).
    fn rewrite(&mut self, words: &mut Words, w: usize, a: u32, b: u32, new: u32) {
        let (start, len, count) = (words.start[w], words.len[w] as usize, words.count[w]);
        let tokens = &mut words.tokens[start..start + len];
        let (mut read, mut write) = (0, 0);
        while read < len {
            if read + 1 < len && tokens[read] == a && tokens[read + 1] == b {
                if write > 0 {
                    let left = tokens[write - 1];
                    self.sub(pack(left, a), count);
                    self.add(pack(left, new), count, w as u32);
                }
                if read + 2 < len {
                    let right = tokens[read + 2];
                    self.sub(pack(b, right), count);
                    self.add(pack(new, right), count, w as u32);
                }
                tokens[write] = new;
                read += 2;
            } else {
                tokens[write] = tokens[read];
                read += 1;
            }
            write += 1;
        }
        words.len[w] = write as u32;
    }
}

/// Learns up to `num_merges` merges from `(chunk bytes, count)` pairs. Returns fewer when the corpus
/// runs out of pairs. `progress(done, total)` is called about every 10% of the merges.
pub fn train<'a>(
    chunks: impl Iterator<Item = (&'a [u8], i64)>,
    num_merges: usize,
    mut progress: impl FnMut(usize, usize),
) -> Vec<(u32, u32)> {
    let mut words = Words::new(chunks);
    let mut pairs = initial_pairs(&words);
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = pairs
        .iter()
        .filter(|(_, s)| s.count > 0)
        .map(|(&p, s)| (s.count, Reverse(p)))
        .collect();
    // visited[w] = 1 + index of the last merge that rewrote word w (a pair's word list may repeat a word).
    let mut visited = vec![0u32; words.len.len()];
    let mut merges = Vec::with_capacity(num_merges);
    let report_every = (num_merges / 10).max(1);

    while merges.len() < num_merges {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pairs.get(&pair).map_or(0, |s| s.count);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(pair)));
            }
            continue;
        }
        let (a, b) = unpack(pair);
        let new = 256 + merges.len() as u32;
        merges.push((a, b));
        let occurrences = pairs.remove(&pair).map(|s| s.words).unwrap_or_default();
        let mut step = MergeStep {
            pairs: &mut pairs,
            created: Vec::new(),
        };
        for w in occurrences {
            if visited[w as usize] == merges.len() as u32 {
                continue;
            }
            visited[w as usize] = merges.len() as u32;
            step.rewrite(&mut words, w as usize, a, b, new);
        }
        let created = std::mem::take(&mut step.created);
        for p in created {
            match pairs.get(&p).map(|s| s.count) {
                Some(c) if c > 0 => heap.push((c, Reverse(p))),
                _ => {
                    pairs.remove(&p);
                }
            }
        }
        if merges.len() % report_every == 0 || merges.len() == num_merges {
            progress(merges.len(), num_merges);
        }
    }
    merges
}

/// The byte string of every token: 256 single bytes, then one per merge.
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut bytes = vocab[a as usize].clone();
        bytes.extend_from_slice(&vocab[b as usize]);
        vocab.push(bytes);
    }
    vocab
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(corpus: &[(&str, i64)], num_merges: usize) -> Vec<(u32, u32)> {
        train(
            corpus.iter().map(|(s, c)| (s.as_bytes(), *c)),
            num_merges,
            |_, _| {},
        )
    }

    #[test]
    fn ties_go_to_the_smaller_pair() {
        // ("c","d") and ("a","b") both occur 3 times: ("a","b") wins.
        let merges = fast(&[("cd", 3), ("ab", 3)], 1);
        assert_eq!(merges, vec![(b'a' as u32, b'b' as u32)]);
    }

    #[test]
    fn stops_when_pairs_run_out() {
        assert_eq!(fast(&[("ab", 1)], 10).len(), 1);
        assert!(fast(&[("a", 1)], 10).is_empty());
    }

    #[test]
    fn overlapping_occurrences_merge_left_to_right() {
        // "aaa" becomes [aa, a] and "aaaa" [aa, aa]: then (aa, a), 5 times, beats (aa, aa), 3 times.
        let merges = fast(&[("aaa", 5), ("aaaa", 3)], 2);
        assert_eq!(merges, vec![(97, 97), (256, 97)]);
    }
}
