//! Stage 1 of `prepare`: source files -> work files (one per source file, under `OUT/.work/`),
//! in the seeded processing order, only until the tokens collected cover the train budget plus
//! the eval set. A finished work file is never redone.
//!
//! One stream runs through all the files, so no tokenizer thread waits at the end of a record
//! batch or of a file:
//!
//! ```text
//! driver (calling thread)   fetch and open files (sha256 on a helper thread per file), queue
//!    |                      their row groups
//!    v
//! decoding threads          row group -> record batches (one thread per 8 tokenizer threads)
//!    |
//!    v
//! driver                    cut the batches, in order, into runs of about 64 KiB of text,
//!    |                      numbered
//!    v
//! tokenizer pool (rayon)    encode each run, in any order
//!    |  encoded runs, numbered
//!    v
//! writer thread             put everything back in number order, append to the work file,
//!    |                      finish it (fsync, rename)
//!    |  finished files
//!    v
//! driver                    count tokens; stop once a prefix of the files covers the need
//! ```
//!
//! The driver takes the decoded batches in file order and the writer handles every item in the
//! order the driver numbered it, so the work files are byte-identical to a serial run for any
//! thread count. Memory is bounded: at most one row group more than there are decoding threads
//! is queued, each holding at most [`MAX_DECODED_BATCHES`] record batches, and [`InFlight`]
//! stops the driver while 2 MiB of text per tokenizer thread (at least 8 MiB) sits between it
//! and the writer.
//!
//! Read-ahead: the driver starts the next file while the current file's last documents are
//! still being tokenized, when the source says reading it early costs nothing but CPU (a local
//! folder, [`Source::fetch_is_free`]). The writer counts tokens in file order and stops at the
//! file that covers the need, so early work past it is dropped: the workers skip what is left,
//! nothing of it is written (the writes and crash points are those of a serial run), and an error
//! in it (a corrupt file past the need) does not count. The result is the shortest prefix of the
//! order that covers the need, exactly as in a serial run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::assemble::WorkInput;
use crate::crash;
use crate::documents::{BATCH_ROWS, Batch, ParquetFile};
use crate::fetch::cache::sha256_file_unless;
use crate::format::Split;
use crate::prepare::{PrepareConfig, WORK_DIR};
use crate::progress::{Counts, Progress};
use crate::source::{self, Source, SourceFile};
use crate::split;
use crate::tokenize::Tokenizer;
use crate::work::{WorkDoc, WorkKey, WorkMeta, WorkReader, WorkWriter};

/// One decoding thread per this many tokenizer threads: a thread decodes parquet at about
/// 700 MB/s of text (snappy, Arrow string views, UTF-8 checks), a tokenizer thread encodes about
/// 50 MB/s (BENCHMARKS.md, "Tokenizer speed"), so one per 8 leaves room on slower cores.
const THREADS_PER_DECODER: usize = 8;
/// Messages (record batches and the end) a row group may have decoded before the driver takes
/// them: a decoder that is not working on the row group the driver reads runs this far ahead.
/// Row groups of up to 3 x [`BATCH_ROWS`] rows fit whole; larger ones overlap only this far.
const MAX_DECODED_BATCHES: usize = 4;
/// Text per tokenizer task: large enough that handing it over costs nothing next to encoding it
/// (about 1.5 ms at 45 MB/s), small enough that threads finish close together.
const TASK_BYTES: usize = 64 << 10;
/// Bookkeeping charged per document on top of its text (id, row, the encoded ids' `Vec`).
const DOC_OVERHEAD: u64 = 256;

/// Text bytes allowed between the driver and the writer: 2 MiB per tokenizer thread, at least
/// 8 MiB, so one long document at the head of the order does not starve the other threads.
fn in_flight_cap(threads: usize) -> u64 {
    (threads as u64 * (2 << 20)).max(8 << 20)
}

/// What the tokenizing stage produced: one work file per source file used, in processing order.
#[derive(Debug)]
pub(crate) struct Tokenized {
    pub inputs: Vec<WorkInput>,
    pub metas: Vec<WorkMeta>,
    pub fresh: Fresh,
}

/// What this run tokenized itself (work files finished by an earlier run are not counted).
#[derive(Debug, Default)]
pub(crate) struct Fresh {
    pub files: u64,
    pub text_bytes: u64,
    pub tokens: u64,
    pub seconds: f64,
}

/// Stage 1: tokenizes source files in processing order into work files, only until the tokens
/// collected cover the train budget and the eval set; reuses finished work files.
pub(crate) fn tokenize_until_covered(
    cfg: &PrepareConfig,
    source: &mut dyn Source,
    tok: &Tokenizer,
) -> Result<Tokenized> {
    let start = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads.max(1))
        .build()
        .context("cannot start the tokenizer threads")?;
    let need = [
        cfg.train_sequences() * cfg.seq_len as u64,
        cfg.eval_sequences * cfg.seq_len as u64,
    ];
    let files = source.files().to_vec();
    let order = source::processing_order(&files, cfg.seed);
    let in_flight = InFlight::new(in_flight_cap(cfg.threads));
    // Shared with the hash threads too, which are not scoped (see `Driver::open`).
    let hash_stop = Arc::new(AtomicBool::new(false));
    let stop: &AtomicBool = &hash_stop;
    let tally = Tally::default();
    let (item_tx, item_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let (job_tx, job_rx) = mpsc::channel();
    let job_rx = Mutex::new(job_rx);
    let decoders = cfg.threads.max(1).div_ceil(THREADS_PER_DECODER);
    let (outcome, slots, progress) = std::thread::scope(|ts| {
        let (in_flight, tally) = (&in_flight, &tally);
        ts.spawn(move || write_in_order(item_rx, done_tx, need, in_flight, tally, stop));
        for _ in 0..decoders {
            ts.spawn(|| decode_row_groups(&job_rx));
        }
        pool.in_place_scope(|scope| {
            let mut driver = Driver {
                out: &cfg.out,
                source,
                tok,
                progress: Progress::new(files.len() as u64, need[0] + need[1]),
                files: &files,
                order: &order,
                need,
                scope,
                tx: item_tx,
                done: done_rx,
                in_flight,
                stop,
                hash_stop: &hash_stop,
                tally,
                seq: 0,
                slots: Vec::new(),
                jobs: job_tx,
                decoders,
                ahead: VecDeque::new(),
                queued_groups: 0,
                opening: None,
                hashers: HashMap::new(),
                next_k: 0,
            };
            let outcome = driver.run();
            // Whatever is still queued is beyond the prefix (or the run failed): skip it.
            stop.store(true, Ordering::SeqCst);
            (outcome, driver.slots, driver.progress)
        })
    });
    progress.finish();
    let used = match outcome? {
        Some(n) => n,
        None => {
            let have = slots.iter().fold([0, 0], |h, s| match s {
                Slot::Done { meta, .. } => [h[0] + meta.train_tokens, h[1] + meta.eval_tokens],
                Slot::Pending => h,
            });
            bail!(
                "--source {}: its {} files hold {} train + {} eval tokens, but --tokens {} with --seq-len {} and --eval-sequences {} need {} train + {} eval tokens; hint: lower --tokens or --eval-sequences, or use a larger source",
                source.describe().repo,
                files.len(),
                have[0],
                have[1],
                cfg.tokens,
                cfg.seq_len,
                cfg.eval_sequences,
                need[0],
                need[1]
            );
        }
    };
    let mut tokenized = Tokenized {
        inputs: Vec::with_capacity(used),
        metas: Vec::with_capacity(used),
        fresh: Fresh::default(),
    };
    for (k, slot) in slots.into_iter().take(used).enumerate() {
        let Slot::Done { meta, fresh } = slot else {
            unreachable!("a covering prefix is finished")
        };
        if fresh {
            tokenized.fresh.files += 1;
            tokenized.fresh.text_bytes += meta.text_bytes;
            tokenized.fresh.tokens += meta.train_tokens + meta.eval_tokens;
        }
        let path = &files[order[k]].path;
        tokenized.inputs.push(WorkInput {
            work: work_path(&cfg.out, k, path),
            source_path: path.clone(),
        });
        tokenized.metas.push(meta);
    }
    tokenized.fresh.seconds = start.elapsed().as_secs_f64();
    Ok(tokenized)
}

/// `OUT/.work/00003-000_00000.tok`: the position in the processing order and the file's stem.
fn work_path(out: &Path, k: usize, source_path: &str) -> PathBuf {
    let stem = source_path.rsplit('/').next().unwrap_or(source_path);
    let stem = stem.strip_suffix(".parquet").unwrap_or(stem);
    out.join(WORK_DIR).join(format!("{k:05}-{stem}.tok"))
}

/// Where the file at one position of the processing order stands.
enum Slot {
    /// Opened, its documents on their way to the writer; not finished yet.
    Pending,
    /// Its work file is finished; `fresh` when this run tokenized it.
    Done { meta: WorkMeta, fresh: bool },
}

/// The calling thread: reads the files in order and feeds the pool; learns from the writer which
/// files are finished, and decides when to stop.
struct Driver<'a, 'scope> {
    out: &'a Path,
    source: &'a mut dyn Source,
    tok: &'scope Tokenizer,
    progress: Progress,
    files: &'a [SourceFile],
    order: &'a [usize],
    need: [u64; 2],
    scope: &'a rayon::Scope<'scope>,
    tx: Sender<Numbered>,
    done: Receiver<Result<Finished, Failed>>,
    in_flight: &'scope InFlight,
    stop: &'scope AtomicBool,
    /// The same flag, for the hash threads.
    hash_stop: &'a Arc<AtomicBool>,
    tally: &'scope Tally,
    /// Number of the next item sent to the writer.
    seq: u64,
    /// One per position of the order read so far.
    slots: Vec<Slot>,
    /// Row groups for the decoding threads.
    jobs: Sender<DecodeJob>,
    decoders: usize,
    /// What the driver handles next, in order: file starts, row groups (decoding, or queued
    /// for a decoder), file ends.
    ahead: VecDeque<Ahead>,
    /// `Ahead::Rows` entries in `ahead`.
    queued_groups: usize,
    /// The file whose row groups are being queued.
    opening: Option<Opening>,
    /// The sha256 of each file being read, computed next to its decoding.
    hashers: HashMap<usize, JoinHandle<Result<String>>>,
    /// The next position of the order to open.
    next_k: usize,
}

/// A file of the order, opened, whose row groups are being queued.
struct Opening {
    k: usize,
    file: ParquetFile,
    next_group: usize,
}

/// One entry of the driver's queue.
enum Ahead {
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
    /// A file already in a finished work file: the writer counts its tokens in order.
    Resumed { tokens: [u64; 2] },
}

/// A row group for a decoding thread; its record batches go down `tx`, which holds at most
/// [`MAX_DECODED_BATCHES`] of them.
struct DecodeJob {
    file: ParquetFile,
    group: usize,
    tx: SyncSender<Decoded>,
}

/// A record batch of a row group; `None` after its last one, so a row group whose decoder died
/// is never taken for complete.
type Decoded = Result<Option<Batch>>;

/// A decoding thread: decodes the row groups it is given, until the driver is gone.
fn decode_row_groups(jobs: &Mutex<Receiver<DecodeJob>>) {
    loop {
        let job = jobs.lock().expect("decode job lock").recv();
        let Ok(DecodeJob { file, group, tx }) = job else {
            return;
        };
        let mut docs = match file.row_group(group) {
            Ok(docs) => docs,
            Err(e) => {
                let _ = tx.send(Err(e));
                continue;
            }
        };
        loop {
            let batch = docs.next_batch();
            let last = !matches!(batch, Ok(Some(_)));
            // A closed channel: the driver stopped reading this row group.
            if tx.send(batch).is_err() || last {
                break;
            }
        }
    }
}

impl Driver<'_, '_> {
    /// Reads files until a prefix of the order covers the need: `Some(prefix length)`, or
    /// `None` when all files together fall short.
    fn run(&mut self) -> Result<Option<usize>> {
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
            Ahead::Resumed { tokens } => self.send(Item::Resumed { tokens }),
        }
        Ok(None)
    }

    /// File `k`'s sha256, checked against the source's.
    fn sha256(&mut self, k: usize) -> Result<String> {
        let hasher = self.hashers.remove(&k).expect("a hash per file read");
        let sha = hasher.join().expect("hash thread panicked")?;
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
        let Finished { k, meta } = match f {
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
        self.source.release(self.order[k])?;
        self.slots[k] = Slot::Done { meta, fresh: true };
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
            let tokens = [r.meta().train_tokens, r.meta().eval_tokens];
            self.ahead.push_back(Ahead::Resumed { tokens });
            self.slots.push(Slot::Done {
                meta: r.meta().clone(),
                fresh: false,
            });
            self.show_progress();
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
        let parquet = match ParquetFile::open(&local, &file.path) {
            Ok(parquet) => parquet,
            Err(e) => {
                // A hash mismatch explains an unreadable file, so it is reported first.
                check_sha256(file, &hash(&local, &file.path, &AtomicBool::new(false))?)?;
                return Err(e);
            }
        };
        // Hashing runs next to the decoding (the file is read twice, the second time from the
        // page cache). Not scoped: a hash thread still running when the stage ends belongs to a
        // file read ahead for nothing, and stops at `stop` instead of being waited for.
        let hasher = {
            let (local, name, stop) = (local.clone(), file.path.clone(), self.hash_stop.clone());
            std::thread::spawn(move || hash(&local, &name, &stop))
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
                Item::Docs(encode_run(tok, &batch, docs, &name))
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

/// One item for the writer, numbered by the driver; `cost` goes back to [`InFlight`] once the
/// writer is done with it.
struct Numbered {
    seq: u64,
    cost: u64,
    item: Item,
}

enum Item {
    /// The file at position `k` of the order starts: create its work file.
    Start {
        k: usize,
        work: PathBuf,
        meta: WorkMeta,
    },
    /// A run of consecutive documents, encoded (`None`: an empty document, skipped).
    Docs(Result<Vec<Option<WorkDoc>>>),
    /// A run the pool did not encode because the stage was stopping.
    Skipped,
    /// The end of a record batch (a crash point).
    BatchEnd,
    /// The file's last documents were sent; `sha` is its checked sha256.
    End { sha: String },
    /// A file whose work file an earlier run finished, with its train and eval tokens.
    Resumed { tokens: [u64; 2] },
}

/// A file whose work file the writer finished.
struct Finished {
    k: usize,
    meta: WorkMeta,
}

/// The writer's first error, in the file at position `k`; it writes nothing after it.
struct Failed {
    k: usize,
    error: anyhow::Error,
}

/// Counters of the documents written so far, for the progress display.
#[derive(Default)]
struct Tally {
    documents: AtomicU64,
    text_bytes: AtomicU64,
    /// Train, eval.
    tokens: [AtomicU64; 2],
}

/// The writer thread: handles the items in number order, and reports each finished work file
/// (or the first error) to the driver. It counts the tokens of the files in order too, and sets
/// `stop` as soon as they cover `need`: nothing past that file is ever written, so a run makes
/// the same writes (and crash points) however far the driver read ahead. Once `stop` is set it
/// only drains the channel.
fn write_in_order(
    rx: Receiver<Numbered>,
    done: Sender<Result<Finished, Failed>>,
    need: [u64; 2],
    in_flight: &InFlight,
    tally: &Tally,
    stop: &AtomicBool,
) {
    // Whatever happens here, never leave the driver waiting for room.
    struct Release<'a>(&'a InFlight);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _release = Release(in_flight);

    let mut early = BTreeMap::new();
    let mut next = 0u64;
    let mut open: Option<OpenWork> = None;
    // The file position of the item being handled, for errors.
    let mut k = 0;
    let mut failed = false;
    let mut have = [0u64; 2];
    let mut count = |tokens: [u64; 2]| {
        have = [have[0] + tokens[0], have[1] + tokens[1]];
        if have[0] >= need[0] && have[1] >= need[1] {
            stop.store(true, Ordering::SeqCst);
        }
    };
    for msg in rx {
        early.insert(msg.seq, msg);
        while let Some(msg) = early.remove(&next) {
            next += 1;
            if let Item::Start { k: start, .. } = &msg.item {
                k = *start;
            }
            if let Item::Resumed { tokens } = msg.item {
                count(tokens);
            } else if !failed && !stop.load(Ordering::SeqCst) {
                match handle(&mut open, msg.item, tally) {
                    Ok(Some(finished)) => {
                        count([finished.meta.train_tokens, finished.meta.eval_tokens]);
                        let _ = done.send(Ok(finished));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        failed = true;
                        let _ = done.send(Err(Failed { k, error }));
                    }
                }
            }
            in_flight.release(msg.cost);
        }
    }
}

/// The work file being written.
struct OpenWork {
    k: usize,
    writer: WorkWriter,
    meta: WorkMeta,
    /// False once a run of it was skipped: it must never be finished.
    whole: bool,
}

fn handle(open: &mut Option<OpenWork>, item: Item, tally: &Tally) -> Result<Option<Finished>> {
    match item {
        Item::Start { k, work, meta } => {
            *open = Some(OpenWork {
                k,
                writer: WorkWriter::create(&work)?,
                meta,
                whole: true,
            });
        }
        Item::Docs(docs) => {
            let w = open.as_mut().expect("documents follow their file's start");
            for doc in docs? {
                match doc {
                    Some(doc) => {
                        count_document(&doc, &mut w.meta, tally);
                        w.writer.push(&doc)?;
                    }
                    None => w.meta.empty_documents += 1,
                }
            }
        }
        Item::Skipped => {
            if let Some(w) = open {
                w.whole = false;
            }
        }
        Item::BatchEnd => crash::point("work batch written"),
        Item::Resumed { .. } => unreachable!("counted by the writer loop"),
        Item::End { sha } => {
            let mut w = open.take().expect("a file's end follows its start");
            if !w.whole {
                return Ok(None);
            }
            w.meta.source_sha256 = sha;
            w.writer.finish(&w.meta)?;
            crash::point("work file finished");
            return Ok(Some(Finished {
                k: w.k,
                meta: w.meta,
            }));
        }
    }
    Ok(None)
}

fn count_document(doc: &WorkDoc, meta: &mut WorkMeta, tally: &Tally) {
    meta.documents += 1;
    meta.text_bytes += doc.text_bytes;
    let n = doc.tokens.len() as u64;
    let s = match doc.split {
        Split::Train => {
            meta.train_tokens += n;
            meta.train_documents += 1;
            0
        }
        Split::Eval => {
            meta.eval_tokens += n;
            meta.eval_documents += 1;
            1
        }
    };
    tally.documents.fetch_add(1, Ordering::Relaxed);
    tally
        .text_bytes
        .fetch_add(doc.text_bytes, Ordering::Relaxed);
    tally.tokens[s].fetch_add(n, Ordering::Relaxed);
}

/// Encodes documents `docs` of `batch`; the id buffer is reused, so the only allocations per
/// document are its tokens and its id.
fn encode_run(
    tok: &Tokenizer,
    batch: &Batch,
    docs: Range<usize>,
    name: &str,
) -> Result<Vec<Option<WorkDoc>>> {
    let mut ids = Vec::new();
    docs.map(|i| encode_document(tok, batch, i, &mut ids, name))
        .collect()
}

/// `<s>` + ids + `</s>` of document `i` of `batch`, or `None` for an empty text.
fn encode_document(
    tok: &Tokenizer,
    batch: &Batch,
    i: usize,
    ids: &mut Vec<u32>,
    name: &str,
) -> Result<Option<WorkDoc>> {
    let text = match batch.text(i) {
        Some(t) if !t.is_empty() => t,
        _ => return Ok(None),
    };
    let (row, id) = (batch.row(i), batch.id(i));
    ids.clear();
    tok.encode(text, ids)
        .with_context(|| format!("{name}: row {row} (id {id})"))?;
    let mut tokens = Vec::with_capacity(ids.len() + 2);
    tokens.push(tok.bos_id() as u16);
    for &id in ids.iter() {
        // The tokenizer check guarantees vocab <= 65,536, so this only fails on a broken tokenizer.
        tokens.push(
            u16::try_from(id)
                .map_err(|_| anyhow!("{name}: row {row}: token id {id} does not fit u16"))?,
        );
    }
    tokens.push(tok.eos_id() as u16);
    Ok(Some(WorkDoc {
        split: split::route(id),
        row,
        text_bytes: text.len() as u64,
        id: id.to_owned(),
        tokens,
    }))
}

/// A byte budget shared by the driver (takes) and the writer (gives back). One item larger
/// than the whole budget still passes when nothing else is in flight.
struct InFlight {
    cap: u64,
    state: Mutex<(u64, bool)>,
    freed: Condvar,
}

impl InFlight {
    fn new(cap: u64) -> Self {
        InFlight {
            cap,
            state: Mutex::new((0, false)),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self, n: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        while !s.1 && s.0 > 0 && s.0 + n > self.cap {
            s = self.freed.wait(s).expect("in-flight lock");
        }
        s.0 += n;
    }

    fn release(&self, n: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        s.0 -= n;
        self.freed.notify_all();
    }

    /// The writer is gone: nothing waits any more.
    fn close(&self) {
        let mut s = self.state.lock().expect("in-flight lock");
        s.1 = true;
        self.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_blocks_at_the_cap_and_lets_one_oversized_item_through() {
        let f = InFlight::new(10);
        f.acquire(25); // alone: passes
        let waited = std::thread::scope(|s| {
            let t = s.spawn(|| {
                let t0 = Instant::now();
                f.acquire(5);
                t0.elapsed()
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            f.release(25);
            t.join().unwrap()
        });
        assert!(waited >= std::time::Duration::from_millis(40), "{waited:?}");
        f.acquire(5); // 10 in flight: at the cap, still fits
        f.close();
        f.acquire(100); // closed: never waits
    }
}
