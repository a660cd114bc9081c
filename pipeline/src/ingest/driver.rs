//! The driver (the calling thread): opens the source files in the processing order, queues
//! their row groups for the decoding threads, cuts the decoded batches into numbered runs for the
//! tokenizer pool, learns from the writer which files are finished, and stops at the shortest
//! prefix of the order that covers the need.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};

use super::decode::{DecodeJob, Decoded, MAX_DECODED_BATCHES};
use super::encode::{TASK_BYTES, encode_run};
use super::in_flight::{DOC_OVERHEAD, InFlight};
use super::order::{Failed, Finished, Item, Numbered, Tally};
use crate::assemble::WorkInput;
use crate::documents::{BATCH_ROWS, Batch, ParquetFile};
use crate::fetch::cache::sha256_file_unless;
use crate::outdir::work_path;
use crate::progress::{Counts, Progress};
use crate::source::{Source, SourceFile};
use crate::split;
use crate::tokenize::Tokenizer;
use crate::work::{WorkKey, WorkMeta, WorkReader};

/// Where the file at one position of the processing order stands.
pub(super) enum Slot {
    /// Opened, its documents on their way to the writer; not finished yet.
    Pending,
    /// Its work file is finished; `fresh` when this run tokenized it.
    Done { meta: WorkMeta, fresh: bool },
}

/// The calling thread: reads the files in order and feeds the pool; learns from the writer which
/// files are finished, and decides when to stop.
pub(super) struct Driver<'a, 'scope> {
    pub(super) out: &'a Path,
    pub(super) source: &'a mut dyn Source,
    pub(super) tok: &'scope Tokenizer,
    pub(super) progress: Progress,
    pub(super) files: &'a [SourceFile],
    pub(super) order: &'a [usize],
    pub(super) need: [u64; 2],
    pub(super) scope: &'a rayon::Scope<'scope>,
    pub(super) tx: Sender<Numbered>,
    pub(super) done: Receiver<Result<Finished, Failed>>,
    pub(super) in_flight: &'scope InFlight,
    pub(super) stop: &'scope AtomicBool,
    /// The same flag, for the hash threads.
    pub(super) hash_stop: &'a Arc<AtomicBool>,
    pub(super) tally: &'scope Tally,
    /// Number of the next item sent to the writer.
    pub(super) seq: u64,
    /// One per position of the order read so far.
    pub(super) slots: Vec<Slot>,
    /// Row groups for the decoding threads.
    pub(super) jobs: Sender<DecodeJob>,
    pub(super) decoders: usize,
    /// What the driver handles next, in order: file starts, row groups (decoding, or queued
    /// for a decoder), file ends.
    pub(super) ahead: VecDeque<Ahead>,
    /// `Ahead::Rows` entries in `ahead`.
    pub(super) queued_groups: usize,
    /// The file whose row groups are being queued.
    pub(super) opening: Option<Opening>,
    /// The sha256 of each file being read, computed next to its decoding.
    pub(super) hashers: HashMap<usize, FileHash>,
    /// The next position of the order to open.
    pub(super) next_k: usize,
}

/// A file of the order, opened, whose row groups are being queued.
pub(super) struct Opening {
    k: usize,
    file: ParquetFile,
    next_group: usize,
}

/// One entry of the driver's queue.
pub(super) enum Ahead {
    /// File `k` starts: its work file is created.
    Start {
        k: usize,
        work: PathBuf,
        meta: WorkMeta,
    },
    /// A row group of file `k`: its record batches arrive on `rx`, in order, then `None`.
    Rows { k: usize, rx: Receiver<Decoded> },
    /// File `k`'s last row group was sent.
    End { k: usize },
    /// File `k` could not be opened.
    Failed { k: usize, error: anyhow::Error },
    /// File `k` is already in a finished work file (made by an earlier run).
    Resumed {
        k: usize,
        meta: WorkMeta,
        input: WorkInput,
    },
}

impl Driver<'_, '_> {
    /// Reads files until a prefix of the order covers the need: `Some(prefix length)`, or
    /// `None` when all files together fall short.
    pub(super) fn run(&mut self) -> Result<Option<usize>> {
        loop {
            if let Some(n) = self.fill()? {
                return Ok(Some(n));
            }
            let Some(next) = self.ahead.pop_front() else {
                break;
            };
            if let Some(n) = self.handle(next)? {
                return Ok(Some(n));
            }
        }
        // Everything is read: wait for the files still being tokenized.
        loop {
            if let Some(n) = self.covered() {
                return Ok(Some(n));
            }
            if !self.slots.iter().any(|s| matches!(s, Slot::Pending)) {
                return Ok(None);
            }
            let finished = self.done.recv();
            self.finished(finished.map_err(|_| writer_gone())?)?;
        }
    }

    /// Keeps the decoders busy: queues row groups (one more than there are decoders), opening
    /// the next files of the order when allowed. Waits only when nothing else is queued.
    /// `Some(n)` when the first `n` files turned out to cover the need.
    fn fill(&mut self) -> Result<Option<usize>> {
        while self.queued_groups <= self.decoders {
            if let Some(o) = &mut self.opening {
                if o.next_group < o.file.row_groups() {
                    // Room for the whole row group (and its end), up to a bound.
                    let batches = o
                        .file
                        .row_group_rows(o.next_group)
                        .div_ceil(BATCH_ROWS as u64);
                    let room = (batches as usize + 1).min(MAX_DECODED_BATCHES);
                    let (tx, rx) = mpsc::sync_channel(room);
                    let job = DecodeJob {
                        file: o.file.clone(),
                        group: o.next_group,
                        tx,
                    };
                    o.next_group += 1;
                    let k = o.k;
                    self.jobs
                        .send(job)
                        .expect("decoding threads outlive the driver");
                    self.ahead.push_back(Ahead::Rows { k, rx });
                    self.queued_groups += 1;
                    continue;
                }
                let k = o.k;
                self.opening = None;
                self.ahead.push_back(Ahead::End { k });
            }
            if self.next_k == self.order.len() {
                return Ok(None);
            }
            let k = self.next_k;
            match self.may_open(k, self.ahead.is_empty())? {
                Permit::Covered(n) => return Ok(Some(n)),
                Permit::NotYet => return Ok(None),
                Permit::Open => {}
            }
            self.next_k += 1;
            if let Err(error) = self.open(k) {
                // Reported when its turn comes (and only if the files before it fall short).
                self.ahead.push_back(Ahead::Failed { k, error });
                self.next_k = self.order.len();
            }
        }
        Ok(None)
    }

    /// Whether file `k` may be opened now: when the files before it are finished and fall
    /// short, or when reading it early is free. Otherwise waits for the writer when `wait`,
    /// else answers `NotYet`.
    fn may_open(&mut self, k: usize, wait: bool) -> Result<Permit> {
        loop {
            self.take_finished()?;
            if let Some(n) = self.covered() {
                return Ok(Permit::Covered(n));
            }
            let pending = self.slots.iter().any(|s| matches!(s, Slot::Pending));
            if !pending || self.source.fetch_is_free(self.order[k]) {
                return Ok(Permit::Open);
            }
            if !wait {
                return Ok(Permit::NotYet);
            }
            let finished = self.done.recv();
            self.finished(finished.map_err(|_| writer_gone())?)?;
        }
    }

    /// Handles the next entry of the queue. `Some(n)` when, meanwhile, the first `n` files
    /// turned out to cover the need.
    fn handle(&mut self, next: Ahead) -> Result<Option<usize>> {
        match next {
            Ahead::Start { k, work, meta } => self.send(Item::Start { k, work, meta }),
            Ahead::Rows { k, rx } => {
                self.queued_groups -= 1;
                let name: Arc<str> = self.files[self.order[k]].path.as_str().into();
                loop {
                    let batch = match rx.recv() {
                        Ok(Ok(Some(batch))) => batch,
                        Ok(Ok(None)) => break,
                        Err(_) => bail!("{name}: the thread decoding it stopped unexpectedly"),
                        Ok(Err(e)) => {
                            // A hash mismatch explains a decode error, so it is reported first.
                            let e = self.sha256(k).and(Err(e));
                            return self.unless_covered(k, e);
                        }
                    };
                    self.dispatch(batch, &name);
                    self.send(Item::BatchEnd);
                    self.take_finished()?;
                    if let Some(n) = self.covered() {
                        return Ok(Some(n));
                    }
                    self.show_progress();
                }
            }
            Ahead::End { k } => match self.sha256(k) {
                Ok(sha) => self.send(Item::End { sha }),
                Err(e) => return self.unless_covered(k, Err(e)),
            },
            Ahead::Failed { k, error } => return self.unless_covered(k, Err(error)),
            Ahead::Resumed { k, meta, input } => self.send(Item::Resumed { k, meta, input }),
        }
        Ok(None)
    }

    /// File `k`'s sha256, checked against the source's.
    fn sha256(&mut self, k: usize) -> Result<String> {
        let sha = match self.hashers.remove(&k).expect("a hash per file read") {
            FileHash::Verified(sha) => sha,
            FileHash::Hashing(thread) => thread.join().expect("hash thread panicked")?,
        };
        check_sha256(&self.files[self.order[k]], &sha)?;
        Ok(sha)
    }

    /// A file read ahead may fail where a serial run would never have opened it (a corrupt
    /// file past the need): the error of file `k` counts only once the files before it are
    /// finished and fall short.
    fn unless_covered(&mut self, k: usize, read: Result<Option<usize>>) -> Result<Option<usize>> {
        let Err(e) = read else { return read };
        loop {
            if let Some(n) = self.covered() {
                return Ok(Some(n));
            }
            if self.slots[..k]
                .iter()
                .all(|s| matches!(s, Slot::Done { .. }))
            {
                return Err(e);
            }
            let finished = self.done.recv();
            self.finished(finished.map_err(|_| writer_gone())?)?;
        }
    }

    /// The length of the shortest prefix of finished files that covers the need, if any.
    fn covered(&self) -> Option<usize> {
        let mut have = [0u64; 2];
        for (n, slot) in self.slots.iter().enumerate() {
            let Slot::Done { meta, .. } = slot else {
                return None;
            };
            have[0] += meta.train_tokens;
            have[1] += meta.eval_tokens;
            if have[0] >= self.need[0] && have[1] >= self.need[1] {
                return Some(n + 1);
            }
        }
        None
    }

    /// Takes the files the writer has finished so far, without waiting.
    fn take_finished(&mut self) -> Result<()> {
        loop {
            match self.done.try_recv() {
                Ok(f) => self.finished(f)?,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(writer_gone()),
            }
        }
    }

    fn finished(&mut self, f: Result<Finished, Failed>) -> Result<()> {
        let Finished { k, meta, fresh } = match f {
            Ok(f) => f,
            // The writer works in order, so every file before `k` is finished: when they cover
            // the need, file `k` was read ahead for nothing and its error does not count.
            Err(Failed { k, error }) => {
                return match self.covered() {
                    Some(n) if n <= k => Ok(()),
                    _ => Err(error),
                };
            }
        };
        if fresh {
            self.source.release(self.order[k])?;
        }
        self.slots[k] = Slot::Done { meta, fresh };
        self.show_progress();
        Ok(())
    }

    /// Opens file `k` of the order and queues its start, or takes its finished work file.
    fn open(&mut self, k: usize) -> Result<()> {
        let file = &self.files[self.order[k]];
        let key = WorkKey {
            source_path: file.path.clone(),
            source_size: file.size,
            tokenizer_sha256: self.tok.sha256().to_owned(),
            split_rule: split::EVAL_RULE.to_owned(),
        };
        let work = work_path(self.out, k, &file.path);
        if let Ok(r) = WorkReader::open(&work)
            && r.meta().key == key
        {
            // A run killed between finishing this work file and releasing the source file
            // may have left its download behind.
            self.source.release(self.order[k])?;
            let input = WorkInput {
                work,
                source_path: file.path.clone(),
            };
            let meta = r.meta().clone();
            self.ahead.push_back(Ahead::Resumed { k, meta, input });
            // Finished once the writer has handed it to assembly, in order with the rest.
            self.slots.push(Slot::Pending);
            return Ok(());
        }

        self.progress.file_started(&file.path);
        self.slots.push(Slot::Pending);
        if let Some(&next) = self.order.get(k + 1)
            && self.worth_prefetching()
        {
            self.source.prefetch(next)?;
        }
        let local = self.source.fetch(self.order[k])?;
        let verified = self.source.verified_sha256(self.order[k]);
        let parquet = match ParquetFile::open(&local, &file.path) {
            Ok(parquet) => parquet,
            Err(e) => {
                // A hash mismatch explains an unreadable file, so it is reported first.
                if verified.is_none() {
                    check_sha256(file, &hash(&local, &file.path, &AtomicBool::new(false))?)?;
                }
                return Err(e);
            }
        };
        let hasher = match verified {
            Some(sha) => FileHash::Verified(sha),
            // Hashing runs next to the decoding (the file is read twice, the second time from
            // the page cache). Not scoped: a hash thread still running when the stage ends
            // belongs to a file read ahead for nothing, and stops at `stop` instead of being
            // waited for.
            None => {
                let (local, name, stop) =
                    (local.clone(), file.path.clone(), self.hash_stop.clone());
                let thread = std::thread::Builder::new()
                    .name("sha256".into())
                    .spawn(move || hash(&local, &name, &stop))
                    .context("cannot start a hashing thread")?;
                FileHash::Hashing(thread)
            }
        };
        self.hashers.insert(k, hasher);
        let meta = WorkMeta::new(key, parquet.rows());
        self.ahead.push_back(Ahead::Start { k, work, meta });
        self.opening = Some(Opening {
            k,
            file: parquet,
            next_group: 0,
        });
        Ok(())
    }

    /// Prefetch the file after the one starting now only when the files read so far suggest it
    /// will be needed, so a downloading source does not fetch a file beyond the budget: the
    /// finished files' average, counted once for each file not finished yet (this one
    /// included), must fall short. Before any file is finished there is no estimate, and nothing
    /// is prefetched.
    fn worth_prefetching(&self) -> bool {
        let done: Vec<&WorkMeta> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Done { meta, .. } => Some(meta),
                Slot::Pending => None,
            })
            .collect();
        if done.is_empty() {
            return false;
        }
        let pending = (self.slots.len() - done.len()) as u64;
        let n = done.len() as u64;
        let have = [
            done.iter().map(|m| m.train_tokens).sum::<u64>(),
            done.iter().map(|m| m.eval_tokens).sum::<u64>(),
        ];
        let projected = [
            have[0] + have[0] / n * pending,
            have[1] + have[1] / n * pending,
        ];
        projected[0] < self.need[0] || projected[1] < self.need[1]
    }

    /// Sends a record batch to the pool in runs of about [`TASK_BYTES`] of text.
    fn dispatch(&mut self, batch: Batch, name: &Arc<str>) {
        let batch = Arc::new(batch);
        let (mut start, mut bytes) = (0, 0);
        for i in 0..batch.len() {
            bytes += batch.text(i).map_or(0, str::len);
            if bytes >= TASK_BYTES || i + 1 == batch.len() {
                self.spawn(&batch, start..i + 1, bytes, name);
                (start, bytes) = (i + 1, 0);
            }
        }
    }

    fn spawn(&mut self, batch: &Arc<Batch>, docs: Range<usize>, bytes: usize, name: &Arc<str>) {
        let cost = bytes as u64 + DOC_OVERHEAD * docs.len() as u64;
        self.in_flight.acquire(cost);
        let seq = self.next_seq();
        let (tx, tok, stop) = (self.tx.clone(), self.tok, self.stop);
        let (batch, name) = (batch.clone(), name.clone());
        self.scope.spawn(move |_| {
            let item = if stop.load(Ordering::Relaxed) {
                Item::Skipped
            } else {
                Item::Docs(encode_run(tok, &batch, docs, bytes, &name))
            };
            // A closed channel means the writer is gone; the driver reports that.
            let _ = tx.send(Numbered { seq, cost, item });
        });
    }

    fn send(&mut self, item: Item) {
        let seq = self.next_seq();
        let _ = self.tx.send(Numbered { seq, cost: 0, item });
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq - 1
    }

    fn show_progress(&mut self) {
        let mut resumed = [0u64; 2];
        let mut files_done = 0;
        for slot in &self.slots {
            if let Slot::Done { meta, fresh } = slot {
                files_done += 1;
                if !fresh {
                    resumed[0] += meta.train_tokens;
                    resumed[1] += meta.eval_tokens;
                }
            }
        }
        let t = self.tally;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let tokens = [
            resumed[0] + load(&t.tokens[0]),
            resumed[1] + load(&t.tokens[1]),
        ];
        self.progress.update(Counts {
            files_done,
            documents: load(&t.documents),
            tokens: tokens[0].min(self.need[0]) + tokens[1].min(self.need[1]),
            text_bytes: load(&t.text_bytes),
        });
    }
}

/// The sha256 of a file being read.
pub(super) enum FileHash {
    /// The source checked the bytes when it fetched them (a verified download).
    Verified(String),
    /// Computed on a thread of its own.
    Hashing(JoinHandle<Result<String>>),
}

/// Answer of [`Driver::may_open`].
enum Permit {
    Open,
    NotYet,
    /// The first `n` files cover the need.
    Covered(usize),
}

fn writer_gone() -> anyhow::Error {
    anyhow!("the work file writer stopped unexpectedly")
}

fn hash(local: &Path, name: &str, stop: &AtomicBool) -> Result<String> {
    sha256_file_unless(local, stop)
        .with_context(|| format!("{name}: cannot read {}", local.display()))
}

/// Fails when the source lists a sha256 for `file` and `sha` differs from it.
fn check_sha256(file: &SourceFile, sha: &str) -> Result<()> {
    if let Some(expected) = &file.sha256
        && !expected.eq_ignore_ascii_case(sha)
    {
        bail!(
            "{}: sha256 {sha} differs from the source's {expected}; hint: the file is corrupt, delete it and fetch it again",
            file.path
        );
    }
    Ok(())
}
