//! The Python module: one class, `Tokenizer`, and one helper, `split`.
//!
//! Contract: every bad input becomes a Python exception with a message naming the problem; nothing
//! here panics on user data. The GIL is held only to pull strings from the iterator: splitting and
//! counting run on a worker thread while the next batch is pulled, and merging runs detached.

use crate::count::ChunkCounter;
use crate::split::{Splitter, DEFAULT_PATTERN};
use crate::train;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

/// A byte-level BPE tokenizer: train it, then export its ranks to tiktoken.
#[pyclass(module = "rustbpe")]
#[derive(Default)]
pub struct Tokenizer {
    merges: Vec<(u32, u32)>,
    pattern: String,
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    let name = object.get_type().name();
    name.map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Pulls up to `size` strings from the iterator; an empty batch means it is exhausted.
fn pull_batch(
    iter: &mut Bound<'_, PyIterator>,
    size: usize,
    seen: &mut u64,
) -> PyResult<Vec<String>> {
    let mut batch = Vec::with_capacity(size);
    while batch.len() < size {
        let Some(item) = iter.next() else { break };
        let item = item?;
        let text = item.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterator of str, but item {} is of type {}",
                *seen,
                type_name(&item)
            ))
        })?;
        let text = text.to_str().map_err(|e| {
            PyValueError::new_err(format!(
                "item {} is not valid Unicode text (lone surrogate?): {e}",
                *seen
            ))
        })?;
        batch.push(text.to_owned());
        *seen += 1;
    }
    Ok(batch)
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer {
            merges: Vec::new(),
            pattern: DEFAULT_PATTERN.to_string(),
        }
    }

    /// Trains on the strings of `iterator` until it is exhausted, learning `vocab_size - 256` merges.
    /// `pattern` is the split regex (default: nanochat's GPT-4-style pattern); `buffer_size` is how many
    /// strings are pulled per batch. Returns the number of merges learned, which is smaller than asked
    /// when the text runs out of pairs.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None, verbose = false))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
        verbose: bool,
    ) -> PyResult<usize> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
            )));
        }
        if vocab_size > u32::MAX as i64 / 2 {
            return Err(PyValueError::new_err(format!(
                "vocab_size {vocab_size} is too large"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern, false).map_err(PyValueError::new_err)?;
        let mut iter = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;
        let started = Instant::now();

        // Count chunks on a worker thread while this thread pulls the next batch from Python.
        let counter = std::thread::scope(|scope| -> PyResult<ChunkCounter> {
            let (send, receive) = sync_channel::<Vec<String>>(1);
            let worker = scope.spawn(|| -> Result<ChunkCounter, String> {
                let mut counter = ChunkCounter::default();
                for batch in receive {
                    counter.add_batch(&splitter, &batch)?;
                }
                Ok(counter)
            });
            let mut seen = 0u64;
            let pulled: PyResult<()> = (|| loop {
                let batch = pull_batch(&mut iter, buffer_size, &mut seen)?;
                if batch.is_empty() {
                    return Ok(());
                }
                // A closed channel means the worker stopped on an error; join below reports it.
                if py.detach(|| send.send(batch)).is_err() {
                    return Ok(());
                }
            })();
            drop(send);
            let counted = py.detach(|| worker.join());
            pulled?;
            match counted {
                Ok(result) => result.map_err(PyValueError::new_err),
                Err(_) => Err(PyValueError::new_err("chunk counting thread panicked")),
            }
        })?;
        if verbose {
            eprintln!(
                "rustbpe: {} documents, {} unique chunks counted in {:.2}s",
                counter.documents,
                counter.unique(),
                started.elapsed().as_secs_f64()
            );
        }

        let num_merges = (vocab_size - 256) as usize;
        let merging = Instant::now();
        let merges = py.detach(|| {
            train::train(counter.iter(), num_merges, |done, total| {
                if verbose {
                    let seconds = merging.elapsed().as_secs_f64();
                    let eta_min = seconds * (total - done) as f64 / done as f64 / 60.0;
                    eprintln!(
                        "rustbpe: {done}/{total} merges ({:.0}%), {seconds:.2}s, ETA {eta_min:.1} min",
                        100.0 * done as f64 / total as f64
                    );
                }
            })
        });
        self.merges = merges;
        self.pattern = pattern;
        Ok(self.merges.len())
    }

    /// The split pattern the tokenizer was trained with.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// `[(token_bytes, rank), ...]` in rank order: the 256 bytes, then one entry per merge.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        train::token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect()
    }

    /// The merges in order, as `(left_id, right_id)`; merge k created token 256 + k.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.merges.clone()
    }
}

/// Splits `text` into chunks with `pattern` (default: nanochat's). `force_regex` uses the regex engine
/// even for the default pattern, which has a faster hand-written scanner; the two agree exactly.
#[pyfunction]
#[pyo3(signature = (text, pattern = None, force_regex = false))]
fn split(text: &str, pattern: Option<&str>, force_regex: bool) -> PyResult<Vec<String>> {
    let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN), force_regex)
        .map_err(PyValueError::new_err)?;
    let mut chunks = Vec::new();
    splitter
        .for_each_chunk(text, |c| chunks.push(c.to_owned()))
        .map_err(PyValueError::new_err)?;
    Ok(chunks)
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split, m)?)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
