//! rustbpe: a byte-level BPE tokenizer trainer for nanochat.
//!
//! Training streams text, splits it with a regex-exact pre-tokenizer (`split`), counts unique chunks in
//! parallel (`count`) and learns merges incrementally (`train`). The result is exported as mergeable
//! ranks for tiktoken, which does all encoding. The Python module (feature `python`, turned on by
//! maturin) lives in `python.rs`; everything else is plain Rust so `cargo test` needs no interpreter.

pub mod count;
pub mod split;
pub mod train;

#[cfg(feature = "python")]
mod python;
