//! The writer thread, which puts the stage back in order: the tokenizer pool encodes runs in
//! any order, the writer handles them (and every other item) in the order the driver numbered
//! them, so each work file is byte-identical to a serial run's. It appends to the work file,
//! finishes it (fsync, rename), counts tokens in file order, hands each finished file to the
//! assembly thread and stops the stage at the file that covers the need.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use anyhow::{Result, anyhow};

use super::encode::{EncodedRun, RunCounts};
use super::in_flight::InFlight;
use crate::assemble::WorkInput;
use crate::crash;
use crate::work::{WorkMeta, WorkWriter};

/// One item for the writer, numbered by the driver; `cost` goes back to [`InFlight`] once the
/// writer is done with it.
pub(super) struct Numbered {
    pub(super) seq: u64,
    pub(super) cost: u64,
    pub(super) item: Item,
}

pub(super) enum Item {
    /// The file at position `k` of the order starts: create its work file.
    Start {
        k: usize,
        work: PathBuf,
        meta: WorkMeta,
    },
    /// A run of consecutive documents, encoded.
    Docs(Result<EncodedRun>),
    /// A run the pool did not encode because the stage was stopping.
    Skipped,
    /// The end of a record batch (a crash point).
    BatchEnd,
    /// The file's last documents were sent; `sha` is its checked sha256.
    End { sha: String },
    /// The file at position `k`, whose work file an earlier run finished.
    Resumed {
        k: usize,
        meta: WorkMeta,
        input: WorkInput,
    },
}

/// A file whose work file is finished and handed to assembly; `fresh` when this run wrote it.
pub(super) struct Finished {
    pub(super) k: usize,
    pub(super) meta: WorkMeta,
    pub(super) fresh: bool,
}

/// The writer's first error, in the file at position `k`; it writes nothing after it.
pub(super) struct Failed {
    pub(super) k: usize,
    pub(super) error: anyhow::Error,
}

/// Counters of the documents written so far, for the progress display.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) documents: AtomicU64,
    pub(super) text_bytes: AtomicU64,
    /// Train, eval.
    pub(super) tokens: [AtomicU64; 2],
}

impl Tally {
    fn add(&self, run: &RunCounts) {
        let [train_docs, eval_docs] = run.documents;
        (self.documents).fetch_add(train_docs + eval_docs, Ordering::Relaxed);
        (self.text_bytes).fetch_add(run.text_bytes, Ordering::Relaxed);
        for (t, n) in self.tokens.iter().zip(run.tokens) {
            t.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// What the writer thread shares with the rest of the stage.
pub(super) struct ToWriter<'a> {
    /// Train and eval tokens the stage must collect.
    pub(super) need: [u64; 2],
    pub(super) in_flight: &'a InFlight,
    pub(super) tally: &'a Tally,
    pub(super) stop: &'a AtomicBool,
    /// Finished work files, in order, for the assembly thread.
    pub(super) assemble: Sender<WorkInput>,
    pub(super) assembly_failed: &'a AtomicBool,
}

/// The writer thread: handles the items in number order, reports each finished work file (or
/// the first error) to the driver and hands it to the assembly thread. It counts the tokens of
/// the files in order too, and sets `stop` as soon as they cover `need`: nothing past that file
/// is ever written or assembled, so a run makes the same writes (and crash points) however far
/// the driver read ahead. Once `stop` is set it only drains the channel.
pub(super) fn write_in_order(
    rx: Receiver<Numbered>,
    done: Sender<Result<Finished, Failed>>,
    w: ToWriter<'_>,
) {
    // Whatever happens here, never leave the driver waiting for room.
    struct Release<'a>(&'a InFlight);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _release = Release(w.in_flight);

    let mut early = BTreeMap::new();
    let mut next = 0u64;
    let mut open: Option<OpenWork> = None;
    // The file position of the item being handled, for errors.
    let mut k = 0;
    let mut failed = false;
    let mut have = [0u64; 2];
    for msg in rx {
        early.insert(msg.seq, msg);
        while let Some(msg) = early.remove(&next) {
            next += 1;
            if let Item::Start { k: start, .. } | Item::Resumed { k: start, .. } = &msg.item {
                k = *start;
            }
            if !failed && w.assembly_failed.load(Ordering::SeqCst) {
                failed = true;
                let error = anyhow!("assembling the shards failed");
                let _ = done.send(Err(Failed { k, error }));
            }
            if !failed && !w.stop.load(Ordering::SeqCst) {
                match handle(&mut open, msg.item, w.tally) {
                    Ok(Some((f, input))) => {
                        // A closed channel: assembly failed, which `assembly_failed` reports.
                        let _ = w.assemble.send(input);
                        have = [have[0] + f.meta.train_tokens, have[1] + f.meta.eval_tokens];
                        if have[0] >= w.need[0] && have[1] >= w.need[1] {
                            w.stop.store(true, Ordering::SeqCst);
                        }
                        let _ = done.send(Ok(f));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        failed = true;
                        let _ = done.send(Err(Failed { k, error }));
                    }
                }
            }
            w.in_flight.release(msg.cost);
        }
    }
}

/// The work file being written.
struct OpenWork {
    k: usize,
    work: PathBuf,
    writer: WorkWriter,
    meta: WorkMeta,
    /// False once a run of it was skipped: it must never be finished.
    whole: bool,
}

/// Handles one item; a finished work file comes back with its input for assembly.
fn handle(
    open: &mut Option<OpenWork>,
    item: Item,
    tally: &Tally,
) -> Result<Option<(Finished, WorkInput)>> {
    match item {
        Item::Start { k, work, meta } => {
            *open = Some(OpenWork {
                k,
                writer: WorkWriter::create(&work)?,
                work,
                meta,
                whole: true,
            });
        }
        Item::Docs(run) => {
            let w = open.as_mut().expect("documents follow their file's start");
            let run = run?;
            w.writer.append(&run.records)?;
            run.counts.add_to(&mut w.meta);
            tally.add(&run.counts);
        }
        Item::Skipped => {
            if let Some(w) = open {
                w.whole = false;
            }
        }
        Item::BatchEnd => crash::point("work batch written"),
        Item::Resumed { k, meta, input } => {
            let fresh = false;
            return Ok(Some((Finished { k, meta, fresh }, input)));
        }
        Item::End { sha } => {
            let mut w = open.take().expect("a file's end follows its start");
            if !w.whole {
                return Ok(None);
            }
            w.meta.source_sha256 = sha;
            w.writer.finish(&w.meta)?;
            crash::point("work file finished");
            let input = WorkInput {
                work: w.work,
                source_path: w.meta.key.source_path.clone(),
            };
            return Ok(Some((
                Finished {
                    k: w.k,
                    meta: w.meta,
                    fresh: true,
                },
                input,
            )));
        }
    }
    Ok(None)
}
