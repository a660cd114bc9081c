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
//!
//! [`Assembler`] runs the windows; `plan`, `write`, `shard` (a shard being written, its
//! hashing thread and its sealing) and `index` hold the steps above, `stream` each split's
//! stream of placed tokens.

mod index;
mod plan;
mod shard;
mod stream;
mod write;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::crash;
use crate::format::manifest::first_token_ids;
use crate::format::{DOCUMENTS_FILE, ShardReader, Split, SplitInfo, WORK_DIR};
use crate::shuffle;
use crate::work::WorkReader;

use index::IndexWriter;
use shard::Finishing;
use stream::Stream;

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

/// One split's token bytes a stretch gathers before writing them (one `pwrite`); also what a
/// shard's thread reads back and hashes at a time.
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

    /// Waits for the last shards and writes the documents index; the splits must be full.
    pub fn finish(mut self) -> Result<Assembled> {
        while !self.finishing.is_empty() {
            self.join_finishing()?;
        }
        anyhow::ensure!(
            self.done() && self.streams.iter().all(|s| s.open.is_empty()),
            "internal: the work files hold fewer tokens than their metadata promised; hint: delete {} and re-run",
            self.layout.out.join(WORK_DIR).display()
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
            first_train_ids: first_train_ids(&layout.out, &train.shards)?,
            train: train.into_info(),
            eval: eval.into_info(),
        })
    }
}

/// The fingerprint's first train ids, read back from the finished shards.
fn first_train_ids(out: &Path, shards: &[crate::format::ShardEntry]) -> Result<Vec<u16>> {
    let readers = shards
        .iter()
        .map(|entry| ShardReader::open(&out.join(&entry.file)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(first_token_ids(readers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
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
            records.push(&head, Frame { bos: 1, eos: 2 }, &ids).unwrap();
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
