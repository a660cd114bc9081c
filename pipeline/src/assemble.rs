//! Work files -> shards. Takes the work files in processing order (each as soon as it is
//! finished, while `prepare` tokenizes the next ones), the documents of each in a seeded
//! permutation (the bounded shuffle: a document moves only within its source file), sends each
//! document to its split, packs each split's stream into back-to-back `seq_len` sequences
//! (documents cross sequence and shard boundaries; the last partial sequence is dropped) and
//! writes the shards and the documents index.
//!
//! The packing is spread over threads, so the last file's assembly, which nothing overlaps, takes
//! every core rather than one:
//!
//! - **Plan** (serial, no I/O): the work file's index gives each document's split and token
//!   count, so a walk through the seeded order places every document (its position in its split
//!   and how many of its tokens fit) and cuts the order into stretches of about
//!   `STRETCH_TOKENS` tokens, a window of `STRETCHES_PER_THREAD` per thread at a time (fewer
//!   when the window would reach more than `NEW_SHARDS_PER_WINDOW` new shards).
//! - **Write** (parallel, on the current rayon pool): each stretch reads its records with one
//!   `pread` each and writes its token bytes where the plan put them, with `pwrite` into the
//!   shards' `.tmp` files (a stretch's documents of one split are back to back, so that is one
//!   write per MiB); it formats its documents' index lines.
//! - **Hash**: each shard has a thread that reads back and hashes its payload as far as the
//!   finished windows have written it, so hashing overlaps the next windows and the shards of a
//!   file hash in parallel. A shard whose last window is written gets its header, fsync and
//!   rename next to the next window (or at the end).
//! - **Index**: the stretches' lines go out in order, to a zstd thread (`IndexWriter`).
//!
//! The plan is the same for any thread count and any stretch size, so the bytes are those of a
//! serial packing. Memory does not grow with the budget: a window holds its plan and index lines
//! (a few MB at 16 threads), each stretch one record and 1 MiB per split, each hashing thread
//! 1 MiB, the index thread a few 256 KiB batches; token bytes go from the work file to the shard
//! as they are (both little-endian u16).
//!
//! On a resumed run a shard that already exists under its final name, with this run's header
//! and a payload that hashes to it, is kept untouched and this run's temporary is removed; only a
//! differing or missing shard is renamed into place.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crash;
use crate::format::shard::{
    HEADER_BYTES, ShardHeader, ShardReader, start_writeback, sync_parent, tmp_path,
};
use crate::format::{FORMAT_VERSION, ShardEntry, Split, SplitInfo};
use crate::prepare::WRITE_HINT;
use crate::shuffle;
use crate::work::WorkReader;

/// Name of the documents index inside a dataset folder.
pub const DOCUMENTS_FILE: &str = "documents.jsonl.zst";

/// How many train token ids the `first_1000_token_ids_sha256` fingerprint covers.
pub const FINGERPRINT_TOKENS: usize = 1000;

/// Fixed inputs of the assembly.
#[derive(Debug, Clone)]
pub struct Layout {
    pub out: PathBuf,
    pub seq_len: u32,
    pub vocab_size: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    pub seed: u64,
    pub sequences_per_shard: u64,
    pub train_sequences: u64,
    pub eval_sequences: u64,
}

/// One work file to assemble and the source file it came from.
#[derive(Debug, Clone)]
pub struct WorkInput {
    pub work: PathBuf,
    pub source_path: String,
}

#[derive(Debug)]
pub struct Assembled {
    pub train: SplitInfo,
    pub eval: SplitInfo,
    pub first_train_ids: Vec<u16>,
    /// Shards written by this run (the rest were already on disk and identical).
    pub shards_written: u64,
}

/// One line of `documents.jsonl.zst`.
#[derive(Debug, Serialize)]
struct IndexLine<'a> {
    split: Split,
    id: &'a str,
    file: &'a str,
    row: u64,
    /// Position of the document's `<s>` in its split's token stream (sequence = position / seq_len).
    position: u64,
    /// Framed tokens of the document (`<s>` ids `</s>`).
    tokens: u64,
    /// Tokens of the document inside the split (fewer when the end of the split cuts it).
    kept: u64,
}

/// The seeded order of documents inside one source file.
pub fn document_order(n: usize, seed: u64, source_path: &str) -> Vec<u32> {
    shuffle::permutation(n, shuffle::key(seed, &format!("documents:{source_path}")))
}

/// Packs work files, in processing order, into the shards of both splits and the documents
/// index. `prepare` feeds it each work file as soon as it is finished, so assembly runs next to
/// the tokenizing of the files after it.
pub struct Assembler {
    layout: Layout,
    /// Train, then eval.
    streams: [Stream; 2],
    index: IndexWriter,
    /// Shards whose every byte is written, in order: their threads hash what is left, write
    /// the header and rename; joined in order, at most `threads` left unjoined.
    finishing: VecDeque<Finishing>,
    /// Tokens per stretch (`STRETCH_TOKENS`; smaller in tests).
    stretch_tokens: u64,
}

/// Tokens of the documents one task places: enough that a task's bookkeeping is small next to
/// its copying (2 MiB of token bytes, hundreds of documents), small enough that a window of them
/// spreads over every thread.
const STRETCH_TOKENS: u64 = 1 << 20;
/// Stretches planned per thread at once: a window ends when its slowest stretch does, so each
/// thread gets several.
const STRETCHES_PER_THREAD: usize = 4;
/// One split's token bytes a stretch gathers before writing them (one `pwrite`).
const WRITE_BYTES: usize = 1 << 20;
/// New shards a window may reach per split: bounds the threads and open files when shards are
/// small (`--shard-sequences`); with the default 256 MiB shards a window reaches one or two.
const NEW_SHARDS_PER_WINDOW: u64 = 4;

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler")
            .field("train_placed", &self.streams[0].placed)
            .field("eval_placed", &self.streams[1].placed)
            .finish_non_exhaustive()
    }
}

impl Assembler {
    pub fn create(layout: &Layout) -> Result<Self> {
        Ok(Assembler {
            layout: layout.clone(),
            streams: [
                Stream::new(layout, Split::Train, layout.train_sequences),
                Stream::new(layout, Split::Eval, layout.eval_sequences),
            ],
            index: IndexWriter::create(&layout.out.join(DOCUMENTS_FILE))?,
            finishing: VecDeque::new(),
            stretch_tokens: STRETCH_TOKENS,
        })
    }

    /// Both splits are full; later work files add nothing.
    pub fn done(&self) -> bool {
        self.streams.iter().all(Stream::full)
    }

    /// Adds the next work file of the processing order, on the threads of the current rayon
    /// pool (`prepare` gives it a pool as large as its tokenizer pool).
    pub fn add(&mut self, input: &WorkInput) -> Result<()> {
        if self.done() {
            return Ok(());
        }
        let reader = WorkReader::open(&input.work)?;
        let order = document_order(reader.len(), self.layout.seed, &input.source_path);
        let mut docs = order.iter();
        let threads = rayon::current_num_threads();
        loop {
            let window = self.plan(&reader, &mut docs, threads * STRETCHES_PER_THREAD);
            if window.is_empty() {
                return Ok(());
            }
            self.write(&reader, &input.source_path, &window)?;
            // Shards not yet finished are bounded (a thread and a file each); an error in one
            // stops the run here rather than at the end.
            while let Some(f) = self.finishing.front()
                && (self.finishing.len() > threads || f.thread.is_finished())
            {
                self.join_finishing()?;
            }
        }
    }

    /// Joins the oldest finishing shard and records it.
    fn join_finishing(&mut self) -> Result<()> {
        let f = self.finishing.pop_front().expect("a finishing shard");
        let (entry, wrote) = f.thread.join().expect("shard thread panicked")?;
        let s = &mut self.streams[f.split as usize];
        s.shards.push(entry);
        s.shards_written += wrote as u64;
        Ok(())
    }

    /// Places the next documents of `docs` (the seeded order), up to `stretches` stretches or
    /// [`NEW_SHARDS_PER_WINDOW`] new shards (give or take the last document): each document's
    /// position in its split and how many of its tokens fit. Reads only the work file's index.
    fn plan(
        &mut self,
        reader: &WorkReader,
        docs: &mut std::slice::Iter<'_, u32>,
        stretches: usize,
    ) -> Vec<Vec<Placed>> {
        let mut window = Vec::new();
        let (mut stretch, mut tokens) = (Vec::new(), 0);
        let room = |s: &Stream| s.placed < (s.created + NEW_SHARDS_PER_WINDOW) * s.shard_tokens();
        while window.len() < stretches && !self.done() && self.streams.iter().all(room) {
            let Some(&doc) = docs.next() else { break };
            let s = &mut self.streams[reader.split(doc as usize) as usize];
            if s.full() {
                continue;
            }
            let kept = (reader.tokens(doc as usize) as u64).min(s.capacity - s.placed);
            stretch.push(Placed {
                doc,
                position: s.placed,
                kept: kept as u32,
            });
            s.placed += kept;
            s.documents += 1;
            tokens += kept;
            if tokens >= self.stretch_tokens {
                window.push(std::mem::take(&mut stretch));
                tokens = 0;
            }
        }
        if !stretch.is_empty() {
            window.push(stretch);
        }
        window
    }

    /// Writes `window`, its stretches in parallel; then lets the shards' threads hash as far as
    /// it wrote, and hands over the shards it completed. The index lines go out in order, so the
    /// documents index is that of a serial run.
    fn write(&mut self, reader: &WorkReader, file: &str, window: &[Vec<Placed>]) -> Result<()> {
        for s in &mut self.streams {
            s.open_through_placed()?;
        }
        let streams = &self.streams;
        let written = window
            .par_iter()
            .map(|stretch| write_stretch(reader, file, streams, stretch))
            .collect::<Result<Vec<_>>>()?;
        for out in written {
            self.index.push_lines(&out.lines)?;
            for (s, bytes) in self.streams.iter_mut().zip(out.text_bytes) {
                s.text_bytes += bytes;
            }
        }
        for s in &mut self.streams {
            for shard in s.open.iter_mut().filter(|o| o.start < s.placed) {
                if !shard.started {
                    shard.started = true;
                    crash::point("shard started");
                }
                shard.written_through(s.placed);
            }
            while s.open.front().is_some_and(|o| o.to_thread.is_none()) {
                let shard = s.open.pop_front().expect("checked");
                self.finishing.push_back(Finishing {
                    split: s.split,
                    thread: shard.thread,
                });
            }
        }
        Ok(())
    }

    /// Waits for the last shards and writes the documents index; the splits must be full.
    pub fn finish(mut self) -> Result<Assembled> {
        while !self.finishing.is_empty() {
            self.join_finishing()?;
        }
        anyhow::ensure!(
            self.done() && self.streams.iter().all(|s| s.open.is_empty()),
            "internal: the work files hold fewer tokens than their metadata promised; hint: delete {}/.work and re-run",
            self.layout.out.display()
        );
        let Assembler {
            layout,
            streams: [train, eval],
            index,
            ..
        } = self;
        index.finish()?;
        crash::point("documents index written");
        Ok(Assembled {
            shards_written: train.shards_written + eval.shards_written,
            first_train_ids: first_ids(&layout.out, &train.shards)?,
            train: train.into_info(),
            eval: eval.into_info(),
        })
    }
}

/// A document placed in its split: its position there and how many of its tokens fit.
#[derive(Debug, Clone, Copy)]
struct Placed {
    /// Record index in the work file.
    doc: u32,
    position: u64,
    kept: u32,
}

/// What a written stretch hands back: its index lines, in order, and the text bytes it added per
/// split.
struct Written {
    lines: Vec<u8>,
    text_bytes: [u64; 2],
}

/// Copies the tokens of a stretch's documents into the shards, one `pwrite` per
/// [`WRITE_BYTES`] of each split (a stretch's documents of one split lie back to back in it), and
/// formats their index lines.
fn write_stretch(
    reader: &WorkReader,
    file: &str,
    streams: &[Stream; 2],
    stretch: &[Placed],
) -> Result<Written> {
    let mut out = Written {
        lines: Vec::with_capacity(stretch.len() * 160),
        text_bytes: [0; 2],
    };
    let mut record = Vec::new();
    // Per split: the position of the first gathered token, and the gathered bytes.
    let mut pending: [(u64, Vec<u8>); 2] = Default::default();
    for p in stretch {
        let doc = reader.read(p.doc as usize, &mut record)?;
        let split = doc.head.split as usize;
        let (at, bytes) = &mut pending[split];
        if bytes.is_empty() {
            *at = p.position;
            bytes.reserve_exact(WRITE_BYTES);
        }
        debug_assert_eq!(
            *at + bytes.len() as u64 / 2,
            p.position,
            "stretch not contiguous"
        );
        let mut rest = &doc.tokens[..2 * p.kept as usize];
        while !rest.is_empty() {
            let take = (WRITE_BYTES - bytes.len()).min(rest.len());
            bytes.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if bytes.len() == WRITE_BYTES {
                streams[split].write_at(*at, bytes)?;
                *at += WRITE_BYTES as u64 / 2;
                bytes.clear();
            }
        }
        let n = doc.len() as u128;
        out.text_bytes[split] += (doc.head.text_bytes as u128 * p.kept as u128 / n) as u64;
        serde_json::to_writer(
            &mut out.lines,
            &IndexLine {
                split: doc.head.split,
                id: doc.head.id,
                file,
                row: doc.head.row,
                position: p.position,
                tokens: doc.len() as u64,
                kept: p.kept as u64,
            },
        )
        .expect("index line serializes");
        out.lines.push(b'\n');
    }
    for (s, (at, bytes)) in streams.iter().zip(&pending) {
        if !bytes.is_empty() {
            s.write_at(*at, bytes)?;
        }
    }
    Ok(out)
}

/// The first [`FINGERPRINT_TOKENS`] train ids, read back from the finished shards.
fn first_ids(out: &Path, shards: &[ShardEntry]) -> Result<Vec<u16>> {
    let mut ids = Vec::with_capacity(FINGERPRINT_TOKENS);
    for entry in shards {
        let r = ShardReader::open(&out.join(&entry.file))?;
        for i in 0..r.num_sequences() {
            if ids.len() == FINGERPRINT_TOKENS {
                return Ok(ids);
            }
            let want = FINGERPRINT_TOKENS - ids.len();
            ids.extend(
                r.sequence_bytes(i)
                    .chunks_exact(2)
                    .take(want)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            );
        }
    }
    Ok(ids)
}

/// One split's token stream: back-to-back documents, cut into `seq_len` sequences and
/// `sequences_per_shard`-sequence shards, up to the split's size.
struct Stream {
    layout: Layout,
    split: Split,
    /// Tokens of the full split.
    capacity: u64,
    /// Tokens placed so far (planned: written once the window that placed them is).
    placed: u64,
    documents: u64,
    text_bytes: u64,
    /// Shards created and not yet completely written, in order.
    open: VecDeque<OpenShard>,
    /// Shards created so far (finished, finishing or open).
    created: u64,
    /// Finished shards, in order.
    shards: Vec<ShardEntry>,
    /// Of those, the ones this run wrote (the rest were on disk already, identical).
    shards_written: u64,
}

impl Stream {
    fn new(layout: &Layout, split: Split, sequences: u64) -> Self {
        Stream {
            layout: layout.clone(),
            split,
            capacity: sequences * layout.seq_len as u64,
            placed: 0,
            documents: 0,
            text_bytes: 0,
            open: VecDeque::new(),
            created: 0,
            shards: Vec::new(),
            shards_written: 0,
        }
    }

    fn full(&self) -> bool {
        self.placed == self.capacity
    }

    fn shard_tokens(&self) -> u64 {
        self.layout.sequences_per_shard * self.layout.seq_len as u64
    }

    /// Creates the shards that the placed tokens reach.
    fn open_through_placed(&mut self) -> Result<()> {
        while self.created * self.shard_tokens() < self.placed {
            let start = self.created * self.shard_tokens();
            let tokens = self.shard_tokens().min(self.capacity - start);
            let seq_len = self.layout.seq_len as u64;
            let header = ShardHeader {
                format_version: FORMAT_VERSION,
                split: self.split,
                seq_len: self.layout.seq_len,
                vocab_size: self.layout.vocab_size,
                bos_id: self.layout.bos_id,
                eos_id: self.layout.eos_id,
                shard_index: self.created,
                num_sequences: tokens / seq_len,
                first_sequence: start / seq_len,
                payload_sha256: [0; 32],
            };
            let path = self
                .layout
                .out
                .join(self.split.shard_file_name(self.created as usize));
            self.open.push_back(OpenShard::create(path, header, start)?);
            self.created += 1;
        }
        Ok(())
    }

    /// Writes token bytes that start at `position` of the stream into the shards that hold them.
    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        let end = position + bytes.len() as u64 / 2;
        for shard in self
            .open
            .iter()
            .filter(|o| o.start < end && position < o.end())
        {
            let from = position.max(shard.start);
            let to = end.min(shard.end());
            let part = &bytes[2 * (from - position) as usize..2 * (to - position) as usize];
            shard.write_at(from - shard.start, part)?;
        }
        Ok(())
    }

    fn into_info(self) -> SplitInfo {
        SplitInfo {
            sequences: self.capacity / self.layout.seq_len as u64,
            tokens: self.capacity,
            documents: self.documents,
            text_bytes: self.text_bytes,
            shards: self.shards,
        }
    }
}

/// A shard being written: `<name>.tmp`, written at offsets by the stretches. A thread of its own
/// hashes the payload as far as it is written (told after each window), so hashing overlaps the
/// next windows and the shards of a file hash in parallel; once the last byte is hashed, the
/// thread writes the header, fsyncs and renames ([`finish_shard`]).
struct OpenShard {
    path: PathBuf,
    file: Arc<File>,
    /// Taken for each write (see `write_at`).
    write_turn: Mutex<()>,
    /// Position of the shard's first token in the split's stream.
    start: u64,
    /// Payload tokens.
    tokens: u64,
    /// Payload tokens written so far (as last told to the thread).
    written: u64,
    /// Tells the thread how many payload tokens are written; `None` once all are.
    to_thread: Option<Sender<u64>>,
    thread: JoinHandle<Result<(ShardEntry, bool)>>,
    /// The `shard started` crash point was passed.
    started: bool,
}

/// A shard whose every byte is written; its thread finishes it.
struct Finishing {
    split: Split,
    thread: JoinHandle<Result<(ShardEntry, bool)>>,
}

impl OpenShard {
    /// `header` is final but for the payload hash.
    fn create(path: PathBuf, header: ShardHeader, start: u64) -> Result<Self> {
        let tmp = tmp_path(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}; {WRITE_HINT}", tmp.display()))?;
        let file = Arc::new(file);
        let tokens = header.num_sequences * header.seq_len as u64;
        let (to_thread, written) = mpsc::channel::<u64>();
        let thread = {
            let (file, path) = (Arc::clone(&file), path.clone());
            std::thread::Builder::new()
                .name("shard-hash".into())
                .spawn(move || finish_shard(&path, &file, header, written))
                .context("cannot start a shard thread")?
        };
        Ok(OpenShard {
            path,
            file,
            write_turn: Mutex::new(()),
            start,
            tokens,
            written: 0,
            to_thread: Some(to_thread),
            thread,
            started: false,
        })
    }

    /// Position just past the shard's last token in the split's stream.
    fn end(&self) -> u64 {
        self.start + self.tokens
    }

    /// Writes `bytes` at token `offset` of the payload, and starts their writeback.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let at = HEADER_BYTES as u64 + 2 * offset;
        // The kernel serializes writes to one file anyway (ext4 holds the inode lock for each);
        // a thread that waits here sleeps instead of spinning on that lock.
        let _turn = self.write_turn.lock().unwrap_or_else(|e| e.into_inner());
        self.file.write_all_at(bytes, at).with_context(|| {
            format!(
                "cannot write {}; {WRITE_HINT}",
                tmp_path(&self.path).display()
            )
        })?;
        start_writeback(&self.file, at, bytes.len() as u64);
        Ok(())
    }

    /// Every token of the split's stream before `position` is written: lets the thread hash that
    /// far. Once the whole shard is written the channel closes (`to_thread` is `None`).
    fn written_through(&mut self, position: u64) {
        let tokens = position.clamp(self.start, self.end()) - self.start;
        if tokens > self.written {
            self.written = tokens;
            if let Some(tx) = &self.to_thread {
                // A thread that stopped (a read error) says why when it is joined.
                let _ = tx.send(tokens);
            }
        }
        if self.written == self.tokens {
            self.to_thread = None;
        }
    }
}

/// The thread of a shard being written: hashes its payload as far as `written` says, 1 MiB at a
/// time; once all of it is hashed writes the header, fsyncs and renames. When the final name
/// already holds exactly this shard (a resumed run), that file is kept untouched and the
/// temporary is removed. Returns the manifest entry and whether a file was written.
fn finish_shard(
    path: &Path,
    file: &File,
    header: ShardHeader,
    written: Receiver<u64>,
) -> Result<(ShardEntry, bool)> {
    let tmp = tmp_path(path);
    let ctx = || format!("cannot write {}; {WRITE_HINT}", tmp.display());
    let payload = header.file_bytes() - HEADER_BYTES as u64;
    let (mut hasher, mut buf) = (Sha256::new(), vec![0u8; WRITE_BYTES]);
    let mut done = 0u64;
    for tokens in written {
        hash_payload(file, &mut hasher, &mut buf, done..2 * tokens)
            .with_context(|| format!("cannot read back {}", tmp.display()))?;
        done = 2 * tokens;
    }
    anyhow::ensure!(
        done == payload,
        "{}: assembly stopped before the shard was written ({done} of {payload} bytes)",
        tmp.display()
    );
    let header = ShardHeader {
        payload_sha256: hasher.finalize().into(),
        ..header
    };
    let keep = already_there(path, &header);
    if keep {
        std::fs::remove_file(&tmp).with_context(ctx)?;
    } else {
        file.write_all_at(&header.encode(), 0).with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        std::fs::rename(&tmp, path).with_context(ctx)?;
        sync_parent(path).with_context(ctx)?;
    }
    crash::point("shard finished");
    let entry = ShardEntry {
        file: path
            .file_name()
            .expect("shard path has a name")
            .to_string_lossy()
            .into_owned(),
        sequences: header.num_sequences,
        sha256: header.payload_sha256_hex(),
        first_sequence: header.first_sequence,
        bytes: header.file_bytes(),
    };
    Ok((entry, !keep))
}

/// Whether `path` is a shard with exactly `header` (payload hash included) whose payload hashes
/// to it: an earlier run finished this very shard.
fn already_there(path: &Path, header: &ShardHeader) -> bool {
    match ShardHeader::read_from(path) {
        Ok(h) if &h == header => File::open(path)
            .and_then(|f| payload_sha256(&f, h.file_bytes() - HEADER_BYTES as u64))
            .is_ok_and(|sha| sha == h.payload_sha256),
        _ => false,
    }
}

/// sha256 of the `len` payload bytes after the header of `file`.
fn payload_sha256(file: &File, len: u64) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    hash_payload(file, &mut hasher, &mut vec![0u8; WRITE_BYTES], 0..len)?;
    Ok(hasher.finalize().into())
}

/// Feeds payload bytes `range` of `file` (offsets after the header) to `hasher`, read a `buf` at
/// a time.
fn hash_payload(
    file: &File,
    hasher: &mut Sha256,
    buf: &mut [u8],
    range: std::ops::Range<u64>,
) -> std::io::Result<()> {
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], HEADER_BYTES as u64 + at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}

/// Streams JSON lines through zstd into `<path>.tmp`, then fsync + rename. Compression runs on a
/// thread of its own, fed [`INDEX_BATCH_BYTES`] of lines at a time, so it overlaps the writing
/// of the shards.
struct IndexWriter {
    path: PathBuf,
    batch: Vec<u8>,
    /// `None` once the thread stopped (on an error: its result says why).
    to_thread: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<Result<File>>>,
}

/// JSON lines handed to the compressing thread at once.
const INDEX_BATCH_BYTES: usize = 256 << 10;

impl IndexWriter {
    fn create(path: &Path) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp)
            .with_context(|| format!("cannot create {}; {WRITE_HINT}", tmp.display()))?;
        let mut enc = zstd::stream::Encoder::new(std::io::BufWriter::new(file), 3)
            .with_context(|| format!("cannot start zstd for {}", tmp.display()))?;
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let thread = std::thread::Builder::new()
            .name("index-zstd".into())
            .spawn(move || {
                let ctx = || format!("cannot write {}", tmp.display());
                for batch in rx {
                    enc.write_all(&batch).with_context(ctx)?;
                }
                let buf = enc.finish().with_context(ctx)?;
                buf.into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(ctx)
            })
            .context("cannot start the documents index thread")?;
        Ok(IndexWriter {
            path: path.to_owned(),
            batch: Vec::with_capacity(INDEX_BATCH_BYTES + 4096),
            to_thread: Some(tx),
            thread: Some(thread),
        })
    }

    /// Appends whole JSON lines.
    fn push_lines(&mut self, lines: &[u8]) -> Result<()> {
        self.batch.extend_from_slice(lines);
        if self.batch.len() >= INDEX_BATCH_BYTES {
            let full = std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(INDEX_BATCH_BYTES + 4096),
            );
            self.hand_over(full)?;
        }
        Ok(())
    }

    /// Queues `batch` for the thread; a thread that stopped reports its error.
    fn hand_over(&mut self, batch: Vec<u8>) -> Result<()> {
        if let Some(tx) = &self.to_thread
            && tx.send(batch).is_ok()
        {
            return Ok(());
        }
        self.to_thread = None;
        self.join()?;
        anyhow::bail!("the documents index thread stopped")
    }

    /// Waits for the thread: the compressed file, or the error that stopped it. Once only.
    fn join(&mut self) -> Result<File> {
        let thread = self
            .thread
            .take()
            .context("the documents index thread already stopped")?;
        thread.join().expect("documents index thread panicked")
    }

    fn finish(mut self) -> Result<()> {
        let last = std::mem::take(&mut self.batch);
        if !last.is_empty() {
            self.hand_over(last)?;
        }
        self.to_thread = None;
        let file = self.join()?;
        let tmp = tmp_path(&self.path);
        let ctx = || format!("cannot write {}", tmp.display());
        file.sync_all().with_context(ctx)?;
        drop(file);
        std::fs::rename(&tmp, &self.path).with_context(ctx)?;
        sync_parent(&self.path).with_context(ctx)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::{RecordHead, Records, WorkKey, WorkMeta, WorkWriter};
    use std::fs;

    fn assemble(layout: &Layout, inputs: &[WorkInput]) -> Result<Assembled> {
        assemble_with(layout, inputs, STRETCH_TOKENS, 2)
    }

    /// Assembles on a pool of `threads` threads with stretches of `stretch_tokens` tokens.
    fn assemble_with(
        layout: &Layout,
        inputs: &[WorkInput],
        stretch_tokens: u64,
        threads: usize,
    ) -> Result<Assembled> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut a = Assembler::create(layout)?;
        a.stretch_tokens = stretch_tokens;
        for input in inputs {
            pool.install(|| a.add(input))?;
        }
        a.finish()
    }

    /// Writes a work file whose document `d` is `<s>`, then `len - 2` tokens equal to
    /// `100 * d + i` (so every token says where it came from), then `</s>`.
    fn work_file(path: &Path, docs: &[(Split, usize)]) {
        let mut w = WorkWriter::create(path).unwrap();
        for (d, &(split, len)) in docs.iter().enumerate() {
            let ids: Vec<u32> = (0..len - 2).map(|i| (100 * d + i + 3) as u32).collect();
            let id = format!("doc{d}");
            let head = RecordHead {
                split,
                row: d as u64,
                id: &id,
                text_bytes: 10 * len as u64,
            };
            let mut records = Records::default();
            records.push(&head, 1, &ids, 2).unwrap();
            w.append(&records).unwrap();
        }
        let key = WorkKey {
            source_path: "f.parquet".into(),
            source_size: 0,
            tokenizer_sha256: String::new(),
            split_rule: String::new(),
        };
        let meta = WorkMeta {
            documents: docs.len() as u64,
            ..WorkMeta::new(key, docs.len() as u64)
        };
        w.finish(&meta).unwrap();
    }

    fn layout(out: &Path) -> Layout {
        Layout {
            out: out.to_owned(),
            seq_len: 8,
            vocab_size: 32000,
            bos_id: 1,
            eos_id: 2,
            seed: 7,
            sequences_per_shard: 3,
            train_sequences: 7,
            eval_sequences: 2,
        }
    }

    fn payload(out: &Path, info: &SplitInfo) -> Vec<u16> {
        let mut all = Vec::new();
        for s in &info.shards {
            let r = ShardReader::open(&out.join(&s.file)).unwrap();
            r.verify_payload().unwrap();
            for i in 0..r.num_sequences() {
                all.extend(
                    r.sequence_bytes(i)
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]])),
                );
            }
        }
        all
    }

    #[test]
    fn packs_documents_back_to_back_and_resumes_identically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let docs: Vec<(Split, usize)> = (0..30)
            .map(|d| {
                (
                    if d % 5 == 0 {
                        Split::Eval
                    } else {
                        Split::Train
                    },
                    3 + (d * 7) % 11,
                )
            })
            .collect();
        let work = out.join("w.tok");
        work_file(&work, &docs);
        let inputs = [WorkInput {
            work,
            source_path: "f.parquet".into(),
        }];
        let l = layout(out);
        let a = assemble(&l, &inputs).unwrap();

        // The expected streams, from the document order.
        let mut want = [Vec::new(), Vec::new()];
        for j in document_order(docs.len(), l.seed, "f.parquet") {
            let (split, len) = docs[j as usize];
            let s = &mut want[(split == Split::Eval) as usize];
            s.push(1);
            s.extend((0..len - 2).map(|i| (100 * j as usize + i + 3) as u16));
            s.push(2);
        }
        want[0].truncate(7 * 8);
        want[1].truncate(2 * 8);
        assert_eq!(payload(out, &a.train), want[0]);
        assert_eq!(payload(out, &a.eval), want[1]);
        let sizes: Vec<u64> = a.train.shards.iter().map(|s| s.sequences).collect();
        assert_eq!(sizes, [3, 3, 1]);
        let firsts: Vec<u64> = a.train.shards.iter().map(|s| s.first_sequence).collect();
        assert_eq!(firsts, [0, 3, 6]);
        assert_eq!((a.train.tokens, a.eval.tokens), (56, 16));
        assert_eq!(a.first_train_ids, want[0]);
        assert_eq!(a.shards_written, 4);

        // Resume: one shard missing, one truncated, one replaced by a valid shard holding other
        // tokens in the same slot. Only those three are rewritten; the result is identical.
        let bytes = |f: &str| fs::read(out.join(f)).unwrap();
        let before: Vec<Vec<u8>> = a
            .train
            .shards
            .iter()
            .chain(&a.eval.shards)
            .map(|s| bytes(&s.file))
            .collect();
        fs::remove_file(out.join("train-00000.bin")).unwrap();
        let t1 = bytes("train-00001.bin");
        fs::write(out.join("train-00001.bin"), &t1[..t1.len() - 5]).unwrap();
        let mut other = layout(out);
        other.seed = 8;
        let other_dir = tempfile::tempdir().unwrap();
        other.out = other_dir.path().to_owned();
        assemble(&other, &inputs).unwrap();
        fs::copy(
            other_dir.path().join("eval-00000.bin"),
            out.join("eval-00000.bin"),
        )
        .unwrap();
        assert_ne!(bytes("eval-00000.bin"), before[3]);

        let b = assemble(&l, &inputs).unwrap();
        assert_eq!(b.shards_written, 3);
        let after: Vec<Vec<u8>> = b
            .train
            .shards
            .iter()
            .chain(&b.eval.shards)
            .map(|s| bytes(&s.file))
            .collect();
        assert_eq!(after, before);
        assert_eq!((b.train.clone(), b.eval.clone()), (a.train, a.eval));
    }

    /// Stretches of any size, on any number of threads, give the bytes of a serial packing:
    /// stretches that cross shard and sequence boundaries, several windows per file, shards that
    /// span two work files and are finished while the second one is written.
    #[test]
    fn stretch_size_and_threads_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(String, Vec<(Split, usize)>)> = (0..2)
            .map(|f| {
                let docs = (0..40)
                    .map(|d| {
                        let split = if (d + f) % 6 == 0 {
                            Split::Eval
                        } else {
                            Split::Train
                        };
                        (split, 2 + (d * 5 + f * 3) % 13)
                    })
                    .collect();
                (format!("f{f}.parquet"), docs)
            })
            .collect();
        let inputs: Vec<WorkInput> = files
            .iter()
            .map(|(name, docs)| {
                let work = dir.path().join(format!("{name}.tok"));
                work_file(&work, docs);
                WorkInput {
                    work,
                    source_path: name.clone(),
                }
            })
            .collect();
        // The expected streams, document by document in the seeded order of each file.
        let mut l = layout(dir.path());
        (l.train_sequences, l.eval_sequences) = (40, 4);
        let mut want = [Vec::new(), Vec::new()];
        for (name, docs) in &files {
            for j in document_order(docs.len(), l.seed, name) {
                let (split, len) = docs[j as usize];
                let s = &mut want[(split == Split::Eval) as usize];
                s.push(1u16);
                s.extend((0..len - 2).map(|i| (100 * j as usize + i + 3) as u16));
                s.push(2);
            }
        }
        assert!(
            want[0].len() > 40 * 8 && want[1].len() > 4 * 8,
            "both files are needed"
        );
        want[0].truncate(40 * 8);
        want[1].truncate(4 * 8);

        let mut first: Option<Vec<(String, Vec<u8>)>> = None;
        for (stretch_tokens, threads) in [(STRETCH_TOKENS, 1), (1, 3), (5, 2), (17, 4), (64, 1)] {
            let out = dir.path().join(format!("out-{stretch_tokens}-{threads}"));
            fs::create_dir(&out).unwrap();
            l.out = out.clone();
            let a = assemble_with(&l, &inputs, stretch_tokens, threads).unwrap();
            assert_eq!(
                payload(&out, &a.train),
                want[0],
                "{stretch_tokens} x {threads}"
            );
            assert_eq!(
                payload(&out, &a.eval),
                want[1],
                "{stretch_tokens} x {threads}"
            );
            assert_eq!(a.first_train_ids, want[0], "{stretch_tokens} x {threads}");
            let firsts: Vec<u64> = a.train.shards.iter().map(|s| s.first_sequence).collect();
            assert_eq!(firsts, (0..14).map(|i| 3 * i).collect::<Vec<_>>());
            let mut names: Vec<String> = fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let bytes: Vec<(String, Vec<u8>)> = names
                .into_iter()
                .map(|n| (n.clone(), fs::read(out.join(&n)).unwrap()))
                .collect();
            assert!(!bytes.iter().any(|(n, _)| n.ends_with(".tmp")), "{bytes:?}");
            match &first {
                None => first = Some(bytes),
                Some(f) => assert!(f == &bytes, "{stretch_tokens} x {threads} differs"),
            }
        }
    }
}
