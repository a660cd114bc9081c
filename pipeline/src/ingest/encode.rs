//! The tokenizer pool's task: a run of consecutive documents of one record batch -> their
//! work-file records, each document's ids framed by [`crate::frame`], and the counts they add
//! to their file's meta.

use std::ops::Range;

use anyhow::{Context, Result, anyhow};

use crate::documents::Batch;
use crate::format::Split;
use crate::frame::{Frame, IdTooLarge};
use crate::split;
use crate::tokenize::Tokenizer;
use crate::work::{RecordHead, Records, WorkMeta};

/// Text per tokenizer task: large enough that handing it over (a task, a message to the writer,
/// a wake-up) costs nothing next to encoding it (about 5 ms at 45 MB/s), small enough that
/// threads finish close together (64 KiB made four times the messages and wake-ups).
pub(super) const TASK_BYTES: usize = 256 << 10;

/// A run of consecutive documents of one record batch, encoded into work-file records on a
/// tokenizer thread.
#[derive(Default)]
pub(super) struct EncodedRun {
    pub(super) records: Records,
    pub(super) counts: RunCounts,
}

/// What a run adds to its file's [`WorkMeta`].
#[derive(Default)]
pub(super) struct RunCounts {
    pub(super) empty_documents: u64,
    pub(super) text_bytes: u64,
    /// Train, eval.
    pub(super) documents: [u64; 2],
    pub(super) tokens: [u64; 2],
}

impl RunCounts {
    pub(super) fn add_to(&self, meta: &mut WorkMeta) {
        let [train_docs, eval_docs] = self.documents;
        let documents = train_docs + eval_docs;
        meta.documents += documents;
        meta.empty_documents += self.empty_documents;
        meta.text_bytes += self.text_bytes;
        meta.train_documents += train_docs;
        meta.eval_documents += eval_docs;
        meta.train_tokens += self.tokens[0];
        meta.eval_tokens += self.tokens[1];
    }
}

/// Encodes documents `docs` of `batch` into framed records ([`Frame`]; an empty text is
/// counted and skipped). The id buffer is reused; the records of the run share one buffer.
pub(super) fn encode_run(
    tok: &Tokenizer,
    batch: &Batch,
    docs: Range<usize>,
    text_bytes: usize,
    name: &str,
) -> Result<EncodedRun> {
    let frame = Frame::new(tok.bos_id(), tok.eos_id());
    let mut run = EncodedRun::default();
    // English prose averages 3-4 bytes of text per 2-byte token: room for the records of most
    // runs without regrowing the buffer.
    run.records
        .reserve(text_bytes * 3 / 4 + docs.len() * 128, docs.len());
    let mut ids = Vec::new();
    for i in docs {
        let text = match batch.text(i) {
            Some(t) if !t.is_empty() => t,
            _ => {
                run.counts.empty_documents += 1;
                continue;
            }
        };
        let (row, id) = (batch.row(i), batch.id(i));
        ids.clear();
        tok.encode(text, &mut ids)
            .with_context(|| format!("{name}: row {row} (id {id})"))?;
        let split = split::route(id);
        let head = RecordHead {
            split,
            row,
            id,
            text_bytes: text.len() as u64,
        };
        // Only a broken tokenizer gives an id past u16.
        run.records
            .push(&head, frame, &ids)
            .map_err(|IdTooLarge(t)| anyhow!("{name}: row {row}: token id {t} does not fit u16"))?;
        let s = (split == Split::Eval) as usize;
        run.counts.documents[s] += 1;
        run.counts.tokens[s] += ids.len() as u64 + 2;
        run.counts.text_bytes += text.len() as u64;
    }
    Ok(run)
}
