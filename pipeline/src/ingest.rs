//! The stage of `prepare` that reads: source files -> work files (one per source file, under
//! `OUT/.work/`), in the seeded processing order, only until the tokens collected cover the train
//! budget plus the eval set, with each finished work file handed straight to assembly. A finished
//! work file is never redone.
//!
//! One stream runs through all the files, so no tokenizer thread waits at the end of a record
//! batch or of a file, and no core waits for a serial assembly at the end:
//!
//! ```text
//! driver (calling thread)   fetch and open files (sha256 on a helper thread per file), queue
//!    |                      their row groups
//!    v
//! decoding threads          row group -> record batches (one thread per 8 tokenizer threads)
//!    |
//!    v
//! driver                    cut the batches, in order, into runs of about 256 KiB of text,
//!    |                      numbered
//!    v
//! tokenizer pool (rayon)    encode each run into work-file records, in any order
//!    |  encoded runs, numbered
//!    v
//! writer thread             put everything back in number order, append to the work file,
//!    |                      finish it (fsync, rename); count tokens in file order
//!    |  finished files, in order
//!    +--------------------------> assembly thread: the file's documents, in their seeded order,
//!    v                            into the shards and the documents index (`crate::assemble`),
//!                                 in parallel stretches (a pool as large as the tokenizer's)
//! driver                    stop once a prefix of the files covers the need
//! ```
//!
//! The driver takes the decoded batches in file order and the writer handles every item in the
//! order the driver numbered it, so the work files are byte-identical to a serial run for any
//! thread count, and assembly sees the same files in the same order as a serial run. A file
//! resumed from an earlier run's work file goes through the writer too, in its place. Memory is
//! bounded: at most one row group more than there are decoding threads is queued, each holding at
//! most `MAX_DECODED_BATCHES` record batches, and `InFlight` stops the driver while 2 MiB of
//! text per tokenizer thread (at least 8 MiB) sits between it and the writer; assembly holds a
//! window of its plan, about 2 MiB per stretch being written and 1 MiB per shard being hashed
//! (`crate::assemble`).
//!
//! Read-ahead: the driver starts the next file while the current file's last documents are
//! still being tokenized, when the source says reading it early costs nothing but CPU (a local
//! folder, [`Source::fetch_is_free`]). The writer counts tokens in file order and stops at the
//! file that covers the need, so early work past it is dropped: the workers skip what is left,
//! nothing of it is written or assembled (the writes are those of a serial run), and an error in
//! it (a corrupt file past the need) does not count. The result is the shortest prefix of the
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

use crate::assemble::{Assembler, WorkInput};
use crate::crash;
use crate::documents::{BATCH_ROWS, Batch, ParquetFile};
use crate::fetch::cache::sha256_file_unless;
use crate::format::Split;
use crate::prepare::{PrepareConfig, WORK_DIR};
use crate::progress::{Counts, Progress};
use crate::source::{self, Source, SourceFile};
use crate::split;
use crate::tokenize::Tokenizer;
use crate::work::{IdTooLarge, RecordHead, Records, WorkKey, WorkMeta, WorkReader, WorkWriter};

/// One decoding thread per this many tokenizer threads: a thread decodes parquet at about
/// 700 MB/s of text (snappy, Arrow string views, UTF-8 checks), a tokenizer thread encodes about
/// 50 MB/s (BENCHMARKS.md, "Tokenizer speed"), so one per 8 leaves room on slower cores.
const THREADS_PER_DECODER: usize = 8;
/// Messages (record batches and the end) a row group may have decoded before the driver takes
/// them: a decoder that is not working on the row group the driver reads runs this far ahead.
/// Row groups of up to 3 x [`BATCH_ROWS`] rows fit whole; larger ones overlap only this far.
const MAX_DECODED_BATCHES: usize = 4;
/// Text per tokenizer task: large enough that handing it over (a task, a message to the writer,
/// a wake-up) costs nothing next to encoding it (about 5 ms at 45 MB/s), small enough that
/// threads finish close together (64 KiB made four times the messages and wake-ups).
const TASK_BYTES: usize = 256 << 10;
/// Bookkeeping charged per document on top of its text (id, row, the encoded ids' `Vec`).
const DOC_OVERHEAD: u64 = 256;

/// Text bytes allowed between the driver and the writer: 2 MiB per tokenizer thread, at least
/// 8 MiB, so one long document at the head of the order does not starve the other threads.
fn in_flight_cap(threads: usize) -> u64 {
    (threads as u64 * (2 << 20)).max(8 << 20)
}

/// What the stage read: the meta of the work file of each source file used, in processing
/// order.
#[derive(Debug)]
pub(crate) struct Tokenized {
    pub metas: Vec<WorkMeta>,
    pub fresh: Fresh,
}

/// What this run tokenized itself (work files finished by an earlier run are not counted).
#[derive(Debug, Default)]
pub(crate) struct Fresh {
    pub files: u64,
    pub text_bytes: u64,
    pub tokens: u64,
    /// From the start of the stage until the last work file was finished.
    pub seconds: f64,
}

/// Tokenizes source files in processing order into work files, only until the tokens collected
/// cover the train budget and the eval set, reusing finished work files; each work file goes to
/// `assembler` (on a thread of its own) as soon as it is finished. Returns the assembler with
/// every file of the covering prefix added.
pub(crate) fn tokenize_and_assemble(
    cfg: &PrepareConfig,
    source: &mut dyn Source,
    tok: &Tokenizer,
    assembler: Assembler,
) -> Result<(Tokenized, Assembler)> {
    let start = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads.max(1))
        .thread_name(|i| format!("tokenize-{i}"))
        .build()
        .context("cannot start the tokenizer threads")?;
    // As many for assembly: idle while the tokenizer threads work (a file's stretches take a
    // fraction of its tokenizing time), all of them busy on the last file, which nothing else
    // overlaps. On a pool of its own it overlaps the tokenizing like the other helpers.
    let assembly_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads.max(1))
        .thread_name(|i| format!("assemble-{i}"))
        .build()
        .context("cannot start the assembly threads")?;
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
    let (assemble_tx, assemble_rx) = mpsc::channel();
    let assembly_failed = AtomicBool::new(false);
    let decoders = cfg.threads.max(1).div_ceil(THREADS_PER_DECODER);
    let (outcome, slots, progress, seconds, assembled) = std::thread::scope(|ts| {
        let (in_flight, tally, assembly_failed) = (&in_flight, &tally, &assembly_failed);
        let assembly_pool = &assembly_pool;
        let assembling = named("assemble")
            .spawn_scoped(ts, move || {
                assemble_in_order(assembler, assemble_rx, assembly_pool, assembly_failed)
            })
            .expect("the OS starts a thread");
        let to_writer = ToWriter {
            need,
            in_flight,
            tally,
            stop,
            assemble: assemble_tx,
            assembly_failed,
        };
        named("write")
            .spawn_scoped(ts, move || write_in_order(item_rx, done_tx, to_writer))
            .expect("the OS starts a thread");
        for i in 0..decoders {
            named(&format!("decode-{i}"))
                .spawn_scoped(ts, || decode_row_groups(&job_rx))
                .expect("the OS starts a thread");
        }
        let tokenized = pool.in_place_scope(|scope| {
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
            let seconds = start.elapsed().as_secs_f64();
            // Whatever is still queued is beyond the prefix (or the run failed): skip it.
            stop.store(true, Ordering::SeqCst);
            (outcome, driver.slots, driver.progress, seconds)
        });
        let (outcome, slots, progress, seconds) = tokenized;
        let assembled = assembling.join().expect("assembly thread panicked");
        (outcome, slots, progress, seconds, assembled)
    });
    progress.finish();
    // An assembly error explains the stage's (which only says that assembly stopped).
    let assembler = assembled?;
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
        metas: Vec::with_capacity(used),
        fresh: Fresh {
            seconds,
            ..Fresh::default()
        },
    };
    for slot in slots.into_iter().take(used) {
        let Slot::Done { meta, fresh } = slot else {
            unreachable!("a covering prefix is finished")
        };
        if fresh {
            tokenized.fresh.files += 1;
            tokenized.fresh.text_bytes += meta.text_bytes;
            tokenized.fresh.tokens += meta.train_tokens + meta.eval_tokens;
        }
        tokenized.metas.push(meta);
    }
    Ok((tokenized, assembler))
}

/// The assembly thread: adds the work files the writer hands over, in order, until the splits
/// are full (the writer stops at the file that fills them). Each file's stretches run on `pool`.
/// On an error it raises `failed`, so the writer stops the stage, and returns the error.
fn assemble_in_order(
    mut assembler: Assembler,
    files: Receiver<WorkInput>,
    pool: &rayon::ThreadPool,
    failed: &AtomicBool,
) -> Result<Assembler> {
    for input in files {
        if assembler.done() {
            continue;
        }
        if let Err(e) = pool.install(|| assembler.add(&input)) {
            failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
    }
    Ok(assembler)
}

/// A thread builder with a name (shown by `top -H`, `perf` and panics).
fn named(name: &str) -> std::thread::Builder {
    std::thread::Builder::new().name(name.to_owned())
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
    hashers: HashMap<usize, FileHash>,
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
    /// File `k` is already in a finished work file (made by an earlier run).
    Resumed {
        k: usize,
        meta: WorkMeta,
        input: WorkInput,
    },
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
                let thread = named("sha256")
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
enum FileHash {
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
struct Finished {
    k: usize,
    meta: WorkMeta,
    fresh: bool,
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

/// What the writer thread shares with the rest of the stage.
struct ToWriter<'a> {
    /// Train and eval tokens the stage must collect.
    need: [u64; 2],
    in_flight: &'a InFlight,
    tally: &'a Tally,
    stop: &'a AtomicBool,
    /// Finished work files, in order, for the assembly thread.
    assemble: Sender<WorkInput>,
    assembly_failed: &'a AtomicBool,
}

/// The writer thread: handles the items in number order, reports each finished work file (or
/// the first error) to the driver and hands it to the assembly thread. It counts the tokens of
/// the files in order too, and sets `stop` as soon as they cover `need`: nothing past that file
/// is ever written or assembled, so a run makes the same writes (and crash points) however far
/// the driver read ahead. Once `stop` is set it only drains the channel.
fn write_in_order(rx: Receiver<Numbered>, done: Sender<Result<Finished, Failed>>, w: ToWriter<'_>) {
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
            run.counts.add_to(&mut w.meta, tally);
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

/// A run of consecutive documents of one record batch, encoded into work-file records on a
/// tokenizer thread.
#[derive(Default)]
struct EncodedRun {
    records: Records,
    counts: RunCounts,
}

/// What a run adds to its file's [`WorkMeta`].
#[derive(Default)]
struct RunCounts {
    empty_documents: u64,
    text_bytes: u64,
    /// Train, eval.
    documents: [u64; 2],
    tokens: [u64; 2],
}

impl RunCounts {
    fn add_to(&self, meta: &mut WorkMeta, tally: &Tally) {
        let [train_docs, eval_docs] = self.documents;
        let documents = train_docs + eval_docs;
        meta.documents += documents;
        meta.empty_documents += self.empty_documents;
        meta.text_bytes += self.text_bytes;
        meta.train_documents += train_docs;
        meta.eval_documents += eval_docs;
        meta.train_tokens += self.tokens[0];
        meta.eval_tokens += self.tokens[1];
        tally.documents.fetch_add(documents, Ordering::Relaxed);
        tally
            .text_bytes
            .fetch_add(self.text_bytes, Ordering::Relaxed);
        for (t, n) in tally.tokens.iter().zip(self.tokens) {
            t.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Encodes documents `docs` of `batch` as `<s>` + ids + `</s>` records (an empty text is
/// counted and skipped). The id buffer is reused; the records of the run share one buffer.
fn encode_run(
    tok: &Tokenizer,
    batch: &Batch,
    docs: Range<usize>,
    text_bytes: usize,
    name: &str,
) -> Result<EncodedRun> {
    // The tokenizer check guarantees vocab <= 65,536, so the control ids fit u16.
    let frame = |id: u32| u16::try_from(id).expect("control ids fit u16 (vocab is checked)");
    let (bos, eos) = (frame(tok.bos_id()), frame(tok.eos_id()));
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
            .push(&head, bos, &ids, eos)
            .map_err(|IdTooLarge(t)| anyhow!("{name}: row {row}: token id {t} does not fit u16"))?;
        let s = (split == Split::Eval) as usize;
        run.counts.documents[s] += 1;
        run.counts.tokens[s] += ids.len() as u64 + 2;
        run.counts.text_bytes += text.len() as u64;
    }
    Ok(run)
}

/// A byte budget shared by the driver (takes) and the writer (gives back). One item larger
/// than the whole budget still passes when nothing else is in flight. A driver that had to wait
/// goes on only once the budget is half free, so it wakes once per burst of items rather than
/// once per item the writer finishes.
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
        let mut waited = false;
        while !s.1 && !self.may_take(s.0, n, waited) {
            waited = true;
            s = self.freed.wait(s).expect("in-flight lock");
        }
        s.0 += n;
    }

    /// Whether `n` more may go in with `now` in flight; `waited`: the caller already had to wait.
    fn may_take(&self, now: u64, n: u64, waited: bool) -> bool {
        now == 0 || (now + n <= self.cap && (!waited || now <= self.cap / 2))
    }

    fn release(&self, n: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        s.0 -= n;
        if s.0 <= self.cap / 2 {
            self.freed.notify_all();
        }
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

    #[test]
    fn a_waiting_driver_goes_on_only_once_half_the_budget_is_free() {
        let f = InFlight::new(10);
        // Not waited yet: whatever fits goes.
        assert!(f.may_take(6, 4, false));
        assert!(!f.may_take(7, 4, false));
        // Waited: it fits, but more than half is still in flight.
        assert!(!f.may_take(6, 4, true));
        assert!(f.may_take(5, 4, true));
        assert!(!f.may_take(5, 6, true));
        // Nothing in flight: anything goes.
        assert!(f.may_take(0, 25, true));
    }
}
