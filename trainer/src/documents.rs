//! Which documents a step trained on: the train sequences of the step's batch
//! ([`DataOrder::batch`], the step numbering of `metrics/scalars.jsonl`) and, for each, the
//! documents whose tokens it holds, from the dataset's documents index through its lookup sidecar
//! ([`DocumentIndex`], built once, then a few frames read per sequence). `trainer batch` prints
//! them; anomaly dumps record them.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use pipeline::format::{DOCUMENTS_FILE, documents::Opened};
use pipeline::format::{DocumentInSequence, DocumentIndex, Split};
use serde::Serialize;

use crate::data::DataOrder;

/// One train sequence of a batch and the documents it holds, in token order.
#[derive(Debug, Clone, Serialize)]
pub struct SequenceDocuments {
    /// Index of the sequence in the train split.
    pub index: u64,
    pub documents: Vec<DocumentInSequence>,
}

/// The train sequence indices of `step` (counted from 1), checked against the split's size.
pub fn step_sequences(order: &DataOrder, step: u64, batch_size: usize) -> Result<Vec<u64>> {
    if step == 0 {
        bail!(
            "--step 0: step 0 is the initial weights and reads no batch; hint: steps count updates from 1, as in metrics/scalars.jsonl"
        );
    }
    let available = order.len() / batch_size as u64;
    if step > available {
        bail!(
            "--step {step}: the train split's {} sequences hold {available} batches of {batch_size}; hint: steps count updates from 1, as in metrics/scalars.jsonl",
            order.len()
        );
    }
    Ok(order.batch(step, batch_size))
}

/// The documents of each train sequence in `indices`.
pub fn sequence_documents(
    index: &DocumentIndex,
    indices: &[u64],
    seq_len: u64,
) -> Result<Vec<SequenceDocuments>> {
    indices
        .iter()
        .map(|&i| {
            Ok(SequenceDocuments {
                index: i,
                documents: index.sequence(Split::Train, seq_len, i)?,
            })
        })
        .collect()
}

/// Opens the documents index of dataset folder `dir`, saying so when it had to be built.
pub fn open_index(dir: &Path) -> Result<DocumentIndex> {
    let (index, opened) = DocumentIndex::open(dir)?;
    if let Opened::Built { documents } = opened {
        tracing::info!(
            "indexed {documents} documents of {} for lookups (once; later lookups reuse it)",
            dir.join(DOCUMENTS_FILE).display()
        );
    }
    Ok(index)
}

/// The documents index for the anomaly dumps of a run: opened at the first dump that needs it
/// (so a run that never dumps never builds it), and a failure is kept and reported in each dump
/// rather than stopping the run.
#[derive(Debug)]
pub struct LazyIndex {
    dir: PathBuf,
    index: Option<Result<DocumentIndex, String>>,
}

impl LazyIndex {
    pub fn new(dir: &Path) -> Self {
        LazyIndex {
            dir: dir.to_owned(),
            index: None,
        }
    }

    /// The documents of each train sequence in `indices`, or why they cannot be named.
    pub fn sequence_documents(
        &mut self,
        indices: &[u64],
        seq_len: u64,
    ) -> Result<Vec<SequenceDocuments>, String> {
        let dir = &self.dir;
        let index = self
            .index
            .get_or_insert_with(|| open_index(dir).map_err(|e| format!("{e:#}")));
        match index {
            Ok(index) => sequence_documents(index, indices, seq_len).map_err(|e| format!("{e:#}")),
            Err(e) => Err(e.clone()),
        }
    }
}
