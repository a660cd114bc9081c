//! Work files -> shards. Takes the work files in processing order (each as soon as it is
//! finished, while `prepare` tokenizes the next ones), the documents of each in a seeded
//! permutation (the bounded shuffle: a document moves only within its source file), sends each
//! document to its split, packs each split's stream into back-to-back `seq_len` sequences
//! (documents cross sequence and shard boundaries; the last partial sequence is dropped) and
//! writes the shards and the documents index.
//!
//! Records are read one at a time with one `pread` each, so memory does not grow with the
//! budget; token bytes go from the work file to the shard as they are (both little-endian u16).
//! Hashing and writing a shard ([`ShardWriter`]) and compressing the index (`IndexWriter`) run
//! on threads of their own, so packing the next sequences overlaps them; they hold at most a few
//! MiB (1 MiB blocks, 4 queued, per open shard; 256 KiB batches, 4 queued, for the index).
//! On a resumed run a shard that already exists under its final name is compared sequence by
//! sequence with what this run produces and kept untouched when identical; only a differing or
//! missing shard is (re)written.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crash;
use crate::format::shard::{ShardHeader, ShardReader, ShardWriter, sync_parent, tmp_path};
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
    train: Packer,
    eval: Packer,
    index: IndexWriter,
    /// The record being read.
    buf: Vec<u8>,
}

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler")
            .field("train_sequences", &self.train.sequences)
            .field("eval_sequences", &self.eval.sequences)
            .finish_non_exhaustive()
    }
}

impl Assembler {
    pub fn create(layout: &Layout) -> Result<Self> {
        Ok(Assembler {
            train: Packer::new(layout, Split::Train, layout.train_sequences),
            eval: Packer::new(layout, Split::Eval, layout.eval_sequences),
            index: IndexWriter::create(&layout.out.join(DOCUMENTS_FILE))?,
            buf: Vec::new(),
        })
    }

    /// Both splits are full; later work files add nothing.
    pub fn done(&self) -> bool {
        self.train.done() && self.eval.done()
    }

    /// Adds the next work file of the processing order.
    pub fn add(&mut self, input: &WorkInput) -> Result<()> {
        let reader = WorkReader::open(&input.work)?;
        let order = document_order(reader.len(), self.train.layout.seed, &input.source_path);
        for j in order {
            if self.done() {
                break;
            }
            let doc = reader.read(j as usize, &mut self.buf)?;
            let packer = match doc.head.split {
                Split::Train => &mut self.train,
                Split::Eval => &mut self.eval,
            };
            if packer.done() {
                continue;
            }
            let position = packer.position();
            let kept = packer.push_document(doc.tokens, doc.head.text_bytes)?;
            self.index.push(&IndexLine {
                split: doc.head.split,
                id: doc.head.id,
                file: &input.source_path,
                row: doc.head.row,
                position,
                tokens: doc.len() as u64,
                kept,
            })?;
        }
        Ok(())
    }

    /// Writes the documents index; the splits must be full.
    pub fn finish(self) -> Result<Assembled> {
        anyhow::ensure!(
            self.done(),
            "internal: the work files hold fewer tokens than their metadata promised; hint: delete {}/.work and re-run",
            self.train.layout.out.display()
        );
        let Assembler {
            mut train,
            eval,
            index,
            ..
        } = self;
        index.finish()?;
        crash::point("documents index written");
        Ok(Assembled {
            shards_written: train.written + eval.written,
            first_train_ids: std::mem::take(&mut train.first_ids),
            train: train.into_info(),
            eval: eval.into_info(),
        })
    }
}

/// Packs one split's document stream into sequences and shards.
struct Packer {
    layout: Layout,
    split: Split,
    target: u64,
    /// The sequence being filled, as little-endian u16 (the payload's bytes).
    seq: Vec<u8>,
    sequences: u64,
    sink: Option<Sink>,
    shards: Vec<ShardEntry>,
    documents: u64,
    text_bytes: u64,
    first_ids: Vec<u16>,
    written: u64,
}

impl Packer {
    fn new(layout: &Layout, split: Split, target: u64) -> Self {
        Packer {
            layout: layout.clone(),
            split,
            target,
            seq: Vec::with_capacity(2 * layout.seq_len as usize),
            sequences: 0,
            sink: None,
            shards: Vec::new(),
            documents: 0,
            text_bytes: 0,
            first_ids: Vec::new(),
            written: 0,
        }
    }

    fn done(&self) -> bool {
        self.sequences == self.target
    }

    /// Position of the next token in the split's stream.
    fn position(&self) -> u64 {
        self.sequences * self.layout.seq_len as u64 + self.seq.len() as u64 / 2
    }

    /// Appends a document (`tokens`: little-endian u16); returns how many of its tokens made it
    /// into the split.
    fn push_document(&mut self, tokens: &[u8], text_bytes: u64) -> Result<u64> {
        let seq_bytes = 2 * self.layout.seq_len as usize;
        let mut kept = 0usize;
        let mut rest = tokens;
        while !rest.is_empty() && !self.done() {
            let take = (seq_bytes - self.seq.len()).min(rest.len());
            self.seq.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            kept += take / 2;
            if self.seq.len() == seq_bytes {
                self.emit()?;
            }
        }
        if kept > 0 {
            self.documents += 1;
            let n = tokens.len() as u128 / 2;
            self.text_bytes += (text_bytes as u128 * kept as u128 / n) as u64;
        }
        Ok(kept as u64)
    }

    fn emit(&mut self) -> Result<()> {
        if self.split == Split::Train && self.first_ids.len() < FINGERPRINT_TOKENS {
            let n = (FINGERPRINT_TOKENS - self.first_ids.len()).min(self.seq.len() / 2);
            self.first_ids.extend(
                self.seq[..2 * n]
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            );
        }
        if self.sink.is_none() {
            let index = self.shards.len() as u64;
            let header = ShardHeader {
                format_version: FORMAT_VERSION,
                split: self.split,
                seq_len: self.layout.seq_len,
                vocab_size: self.layout.vocab_size,
                bos_id: self.layout.bos_id,
                eos_id: self.layout.eos_id,
                shard_index: index,
                num_sequences: 0,
                first_sequence: self.sequences,
                payload_sha256: [0; 32],
            };
            let path = self
                .layout
                .out
                .join(self.split.shard_file_name(index as usize));
            self.sink = Some(Sink::open(path, header)?);
        }
        let sink = self.sink.as_mut().expect("opened above");
        sink.push(&self.seq)?;
        self.seq.clear();
        self.sequences += 1;
        let in_shard = self.sequences - sink.header.first_sequence;
        if in_shard == 1 {
            crash::point("shard started");
        }
        if in_shard == self.layout.sequences_per_shard || self.done() {
            let sink = self.sink.take().expect("open");
            let (entry, wrote) = sink.finish()?;
            self.written += wrote as u64;
            self.shards.push(entry);
            crash::point("shard finished");
        }
        Ok(())
    }

    fn into_info(self) -> SplitInfo {
        SplitInfo {
            sequences: self.sequences,
            tokens: self.sequences * self.layout.seq_len as u64,
            documents: self.documents,
            text_bytes: self.text_bytes,
            shards: self.shards,
        }
    }
}

/// Where a shard's sequences go: a new file, or a comparison with an identical-looking file that
/// a previous (interrupted) run already finished.
struct Sink {
    path: PathBuf,
    header: ShardHeader,
    count: u64,
    state: SinkState,
}

enum SinkState {
    /// The writer hashes what it writes.
    Write(ShardWriter),
    /// The existing file, and the hash of the sequences that matched it so far (checked
    /// against its header at the end).
    Check(ShardReader, Sha256),
}

impl Sink {
    fn open(path: PathBuf, header: ShardHeader) -> Result<Self> {
        let state =
            match ShardReader::open(&path) {
                Ok(r) if same_slot(r.header(), &header) => SinkState::Check(r, Sha256::new()),
                _ => SinkState::Write(ShardWriter::create(&path, header.clone()).with_context(
                    || format!("cannot create {}; {WRITE_HINT}", tmp_path(&path).display()),
                )?),
            };
        Ok(Sink {
            path,
            header,
            count: 0,
            state,
        })
    }

    /// One sequence, as payload bytes.
    fn push(&mut self, seq: &[u8]) -> Result<()> {
        if let SinkState::Check(r, hasher) = &mut self.state {
            if (self.count as usize) < r.num_sequences()
                && r.sequence_bytes(self.count as usize) == seq
            {
                hasher.update(seq);
                self.count += 1;
                return Ok(());
            }
            self.switch_to_write()?;
        }
        let SinkState::Write(w) = &mut self.state else {
            unreachable!("switched to write above")
        };
        w.push_le(seq)
            .with_context(|| format!("cannot write {}", tmp_path(&self.path).display()))?;
        self.count += 1;
        Ok(())
    }

    /// The existing file differs from this run: rewrite it, starting with the sequences that
    /// matched so far (copied from the existing file).
    fn switch_to_write(&mut self) -> Result<()> {
        let ctx = || format!("cannot write {}", tmp_path(&self.path).display());
        let mut w = ShardWriter::create(&self.path, self.header.clone()).with_context(ctx)?;
        if let SinkState::Check(r, _) = &self.state {
            for i in 0..self.count as usize {
                w.push_le(r.sequence_bytes(i)).with_context(ctx)?;
            }
        }
        self.state = SinkState::Write(w);
        Ok(())
    }

    /// Returns the manifest entry and whether a file was written.
    fn finish(mut self) -> Result<(ShardEntry, bool)> {
        if let SinkState::Check(r, hasher) = &self.state {
            let h = r.header();
            let sha: [u8; 32] = hasher.clone().finalize().into();
            if h.num_sequences != self.count || h.payload_sha256 != sha {
                self.switch_to_write()?;
            }
        }
        let file = self
            .path
            .file_name()
            .expect("shard path has a name")
            .to_string_lossy()
            .into_owned();
        let (header, wrote) = match self.state {
            SinkState::Check(r, _) => (r.header().clone(), false),
            SinkState::Write(w) => (
                w.finish()
                    .with_context(|| format!("cannot finish {}", self.path.display()))?,
                true,
            ),
        };
        Ok((
            ShardEntry {
                file,
                sequences: header.num_sequences,
                sha256: header.payload_sha256_hex(),
                first_sequence: header.first_sequence,
                bytes: header.file_bytes(),
            },
            wrote,
        ))
    }
}

/// Whether an existing shard sits in the same slot of the same kind of dataset.
fn same_slot(a: &ShardHeader, b: &ShardHeader) -> bool {
    (
        a.split,
        a.seq_len,
        a.vocab_size,
        a.bos_id,
        a.eos_id,
        a.shard_index,
        a.first_sequence,
    ) == (
        b.split,
        b.seq_len,
        b.vocab_size,
        b.bos_id,
        b.eos_id,
        b.shard_index,
        b.first_sequence,
    )
}

/// Streams JSON lines through zstd into `<path>.tmp`, then fsync + rename. Compression runs on a
/// thread of its own, fed [`INDEX_BATCH_BYTES`] of lines at a time, so it overlaps the packing of
/// the shards (it was about an eighth of the assembly).
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

    fn push(&mut self, line: &IndexLine<'_>) -> Result<()> {
        serde_json::to_writer(&mut self.batch, line).expect("index line serializes");
        self.batch.push(b'\n');
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
        let mut a = Assembler::create(layout)?;
        for input in inputs {
            a.add(input)?;
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
}
