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
//! most `decode::MAX_DECODED_BATCHES` record batches, and `InFlight` stops the driver while 2 MiB of
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
//!
//! This module lays out the threads (`tokenize_and_assemble`); each kind of thread has a
//! module of its own: `driver`, `decode`, `encode` (the tokenizer pool's task) and
//! `order` (the writer); `in_flight` is the memory budget between them.

mod decode;
mod driver;
mod encode;
mod in_flight;
mod order;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::assemble::{Assembler, WorkInput};
use crate::progress::Progress;
use crate::source::{self, Source};
use crate::tokenize::Tokenizer;
use crate::work::WorkMeta;

use decode::{THREADS_PER_DECODER, decode_row_groups};
use driver::{Driver, Slot};
use in_flight::{InFlight, in_flight_cap};
use order::{Tally, ToWriter, write_in_order};

/// What the stage is asked for.
#[derive(Debug, Clone)]
pub(crate) struct Need {
    /// The output folder; work files go to its `.work/`.
    pub out: PathBuf,
    /// Seed of the processing order.
    pub seed: u64,
    /// Tokenizer threads (as many again for assembly); does not change the output.
    pub threads: usize,
    /// Train and eval tokens to collect.
    pub tokens: [u64; 2],
}

/// How the stage ended.
#[derive(Debug)]
pub(crate) enum Ingested {
    /// A prefix of the processing order covers the need; the assembler holds every file of it.
    Covered(Tokenized, Box<Assembler>),
    /// All `files` source files together hold only `have` train and eval tokens.
    Short { files: usize, have: [u64; 2] },
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
/// `assembler` (on a thread of its own) as soon as it is finished. This lays out the stage's
/// threads (the module doc draws them).
pub(crate) fn tokenize_and_assemble(
    cfg: &Need,
    source: &mut dyn Source,
    tok: &Tokenizer,
    assembler: Assembler,
) -> Result<Ingested> {
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
    let need = cfg.tokens;
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
    Ok(match outcome? {
        Some(used) => Ingested::Covered(tokenized(slots, used, seconds), Box::new(assembler)),
        None => Ingested::Short {
            files: files.len(),
            have: collected(&slots),
        },
    })
}

/// What the first `used` files (all finished) gave, and what of it this run tokenized.
fn tokenized(slots: Vec<Slot>, used: usize, seconds: f64) -> Tokenized {
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
    tokenized
}

/// Train and eval tokens of the finished files.
fn collected(slots: &[Slot]) -> [u64; 2] {
    slots.iter().fold([0, 0], |h, s| match s {
        Slot::Done { meta, .. } => [h[0] + meta.train_tokens, h[1] + meta.eval_tokens],
        Slot::Pending => h,
    })
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
