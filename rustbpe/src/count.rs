//! Counting the unique chunks of a stream of documents, in parallel.
//!
//! Each batch of documents is split across the rayon pool; every task counts into a map keyed by
//! slices of the batch (no allocation per chunk), and the task maps are folded into the running total,
//! which owns only one copy of each unique chunk. Memory therefore follows the number of unique chunks.

use crate::split::Splitter;
use rayon::prelude::*;
use rustc_hash::FxHashMap;

#[derive(Default)]
pub struct ChunkCounter {
    counts: FxHashMap<Box<str>, i64>,
    pub documents: u64,
}

impl ChunkCounter {
    pub fn add_batch(&mut self, splitter: &Splitter, batch: &[String]) -> Result<(), String> {
        let per_task = batch.len().div_ceil(rayon::current_num_threads()).max(1);
        let partial: Vec<FxHashMap<&str, i64>> = batch
            .par_chunks(per_task)
            .map(|docs| {
                let mut local: FxHashMap<&str, i64> = FxHashMap::default();
                for doc in docs {
                    splitter.for_each_chunk(doc, |chunk| *local.entry(chunk).or_insert(0) += 1)?;
                }
                Ok(local)
            })
            .collect::<Result<_, String>>()?;
        for local in partial {
            for (chunk, n) in local {
                match self.counts.get_mut(chunk) {
                    Some(total) => *total += n,
                    None => {
                        self.counts.insert(chunk.into(), n);
                    }
                }
            }
        }
        self.documents += batch.len() as u64;
        Ok(())
    }

    pub fn unique(&self) -> usize {
        self.counts.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], i64)> {
        self.counts.iter().map(|(chunk, &n)| (chunk.as_bytes(), n))
    }
}
