//! Pre-tokenization: cutting text into the chunks that BPE merges never cross.
//!
//! Two engines behind one type. Any pattern runs through `fancy-regex` (the engine tiktoken uses, so
//! training and inference split alike). The default pattern — GPT-4's with numbers grouped 1–2 digits —
//! also has a hand-written scanner that produces exactly the regex's matches, several times faster.
//! `tests/test_rustbpe.py` checks the two agree on the whole Wikipedia sample; the unit tests here check
//! the edge cases one by one. Character classes are read from `regex-syntax`, the crate the regex
//! engine itself uses, so both engines see the same Unicode tables.

use std::sync::OnceLock;

/// nanochat's split pattern: GPT-4's (`cl100k_base`) with `\p{N}{1,2}` instead of `\p{N}{1,3}`
/// (val bpb 0.965 vs 0.972 at depth 12, 32K vocab: karpathy/nanochat dev/LOG.md, Jan 2026).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// Class bits of one character.
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 4; // \s (Unicode White_Space)
const NEWLINE: u8 = 8; // \r or \n (always together with SPACE)

struct Tables {
    /// Class bits of every code point below 0x10000.
    bmp: Vec<u8>,
    /// Sorted, disjoint (start, end, bits) ranges for the astral planes.
    astral: Vec<(u32, u32, u8)>,
    /// Characters that `(?i:s)`, `(?i:d)`, ... match, for the contraction alternative.
    fold_sdmt: Vec<char>,
    fold_l: Vec<char>,
    fold_v: Vec<char>,
    fold_e: Vec<char>,
    fold_r: Vec<char>,
}

/// The code point ranges a single-class regex matches, as regex-syntax defines them.
fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("built-in class pattern parses");
    match hir.kind() {
        regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("unexpected HIR for {pattern}: {other:?}"),
    }
}

fn chars_of(pattern: &str) -> Vec<char> {
    class_ranges(pattern)
        .into_iter()
        .flat_map(|(a, b)| (a..=b).filter_map(char::from_u32))
        .collect()
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut bmp = vec![0u8; 0x10000];
        let mut astral_bits: Vec<(u32, u32, u8)> = Vec::new();
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (start, end) in class_ranges(pattern) {
                for cp in start..=end.min(0xFFFF) {
                    bmp[cp as usize] |= bit;
                }
                if end > 0xFFFF {
                    astral_bits.push((start.max(0x10000), end, bit));
                }
            }
        }
        bmp[b'\r' as usize] |= NEWLINE;
        bmp[b'\n' as usize] |= NEWLINE;
        // The three classes are disjoint, so the astral ranges never overlap and can be sorted as is.
        astral_bits.sort_unstable();
        Tables {
            bmp,
            astral: astral_bits,
            fold_sdmt: chars_of("(?i)[sdmt]"),
            fold_l: chars_of("(?i)l"),
            fold_v: chars_of("(?i)v"),
            fold_e: chars_of("(?i)e"),
            fold_r: chars_of("(?i)r"),
        }
    })
}

impl Tables {
    #[inline]
    fn bits(&self, c: char) -> u8 {
        let cp = c as u32;
        if cp < 0x10000 {
            return self.bmp[cp as usize];
        }
        // The first range that does not end before `cp`, if it contains `cp`.
        let i = self.astral.partition_point(|&(_, end, _)| end < cp);
        match self.astral.get(i) {
            Some(&(start, _, bits)) if start <= cp => bits,
            _ => 0,
        }
    }
}

/// The character starting at byte `i` of `s` (which must be a char boundary) and its class bits.
#[inline]
fn char_at(t: &Tables, s: &str, i: usize) -> Option<(char, u8, usize)> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        return Some((b as char, t.bmp[b as usize], 1));
    }
    let c = s[i..].chars().next()?;
    Some((c, t.bits(c), c.len_utf8()))
}

/// End of the run of characters from `i` whose bits satisfy `keep`.
#[inline]
fn run_end(t: &Tables, s: &str, mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
    let bytes = s.as_bytes();
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x80 {
            if !keep(t.bmp[b as usize]) {
                break;
            }
            i += 1;
        } else {
            match char_at(t, s, i) {
                Some((_, bits, len)) if keep(bits) => i += len,
                _ => break,
            }
        }
    }
    i
}

#[inline]
fn is_symbol(bits: u8) -> bool {
    bits & (LETTER | NUMBER | SPACE) == 0
}

/// Length of the match of the default pattern starting at byte `i` (> 0 for every position).
#[inline]
fn default_match_end(t: &Tables, s: &str, i: usize) -> usize {
    let Some((c0, b0, l0)) = char_at(t, s, i) else {
        return i;
    };
    let next = char_at(t, s, i + l0);
    // '(?i:[sdmt]|ll|ve|re)
    if c0 == '\'' {
        if let Some((c1, _, l1)) = next {
            if t.fold_sdmt.contains(&c1) {
                return i + l0 + l1;
            }
            if let Some((c2, _, l2)) = char_at(t, s, i + l0 + l1) {
                let two = (t.fold_l.contains(&c1) && t.fold_l.contains(&c2))
                    || (t.fold_v.contains(&c1) && t.fold_e.contains(&c2))
                    || (t.fold_r.contains(&c1) && t.fold_e.contains(&c2));
                if two {
                    return i + l0 + l1 + l2;
                }
            }
        }
    }
    let is_letter = |b: u8| b & LETTER != 0;
    // [^\r\n\p{L}\p{N}]?+\p{L}+  (the optional prefix is possessive: no backtracking into it)
    if b0 & LETTER != 0 {
        return run_end(t, s, i + l0, is_letter);
    }
    if b0 & (NEWLINE | NUMBER) == 0 {
        if let Some((_, b1, l1)) = next {
            if b1 & LETTER != 0 {
                return run_end(t, s, i + l0 + l1, is_letter);
            }
        }
    }
    // \p{N}{1,2}
    if b0 & NUMBER != 0 {
        return match next {
            Some((_, b1, l1)) if b1 & NUMBER != 0 => i + l0 + l1,
            _ => i + l0,
        };
    }
    //  ?[^\s\p{L}\p{N}]++[\r\n]*
    let symbols_from = if is_symbol(b0) {
        Some(i)
    } else if c0 == ' ' && matches!(next, Some((_, b1, _)) if is_symbol(b1)) {
        Some(i + 1)
    } else {
        None
    };
    if let Some(start) = symbols_from {
        let end = run_end(t, s, start, is_symbol);
        return run_end(t, s, end, |b| b & NEWLINE != 0);
    }
    // Only whitespace is left. Scan its maximal run once, noting the last newline and the last char.
    let bytes = s.as_bytes();
    let (mut j, mut last_newline_end, mut last_char_start) = (i, None, i);
    while j < bytes.len() {
        match char_at(t, s, j) {
            Some((_, bits, len)) if bits & SPACE != 0 => {
                if bits & NEWLINE != 0 {
                    last_newline_end = Some(j + len);
                }
                last_char_start = j;
                j += len;
            }
            _ => break,
        }
    }
    // \s*[\r\n]
    if let Some(end) = last_newline_end {
        return end;
    }
    // \s+(?!\S): the whole run at the end of text, else the run minus its last char.
    if j == bytes.len() {
        return j;
    }
    if last_char_start > i {
        return last_char_start;
    }
    // \s+
    j
}

/// Splits text into chunks with a compiled pattern.
pub enum Splitter {
    /// The default pattern, by the hand-written scanner.
    Default,
    /// Any pattern, by fancy-regex.
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    /// The fast scanner for the default pattern, the regex engine for anything else (or when forced).
    pub fn new(pattern: &str, force_regex: bool) -> Result<Self, String> {
        if pattern == DEFAULT_PATTERN && !force_regex {
            tables();
            return Ok(Splitter::Default);
        }
        fancy_regex::Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Calls `f` with every chunk of `text`, in order. Text the pattern does not match is skipped,
    /// as `re.findall` would. Fails only if the regex engine gives up (backtrack limit).
    pub fn for_each_chunk<'a>(
        &self,
        text: &'a str,
        mut f: impl FnMut(&'a str),
    ) -> Result<(), String> {
        match self {
            Splitter::Default => {
                let t = tables();
                let mut i = 0;
                while i < text.len() {
                    let end = default_match_end(t, text, i);
                    f(&text[i..end]);
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("regex engine failed: {e}"))?;
                    f(m.as_str());
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(splitter: &Splitter, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        splitter
            .for_each_chunk(text, |c| out.push(c.to_string()))
            .unwrap();
        out
    }

    fn assert_same(text: &str) {
        let fast = split(&Splitter::new(DEFAULT_PATTERN, false).unwrap(), text);
        let slow = split(&Splitter::new(DEFAULT_PATTERN, true).unwrap(), text);
        assert_eq!(fast, slow, "splitters disagree on {text:?}");
    }

    #[test]
    fn known_splits() {
        let s = Splitter::new(DEFAULT_PATTERN, false).unwrap();
        assert_eq!(split(&s, "Hello world"), ["Hello", " world"]);
        assert_eq!(
            split(&s, "I'm 12345 ok"),
            ["I", "'m", " ", "12", "34", "5", " ok"]
        );
        assert_eq!(split(&s, "a  \n\n  b"), ["a", "  \n\n", " ", " b"]);
        assert_eq!(split(&s, "x!!\n\ny"), ["x", "!!\n\n", "y"]);
        assert_eq!(split(&s, "end   "), ["end", "   "]);
    }

    #[test]
    fn every_char_in_context_matches_regex() {
        // Each code point alone and between the characters the alternatives care about.
        let mut text = String::new();
        for cp in 0u32..=char::MAX as u32 {
            if let Some(c) = char::from_u32(cp) {
                for ctx in ["a", " ", "1", "'", "\n"] {
                    text.push_str(ctx);
                    text.push(c);
                    text.push(c);
                }
            }
        }
        assert_same(&text);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        let err = match Splitter::new("(unclosed", false) {
            Err(e) => e,
            Ok(_) => panic!("accepted a bad pattern"),
        };
        assert!(err.contains("invalid split pattern"), "{err}");
    }
}
