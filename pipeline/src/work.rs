//! Work files: the tokenized documents of one source file, in file order, kept under
//! `OUT/.work/` until the dataset is complete. Assembly reads them in the seeded document order.
//!
//! A work file is written to a temporary name and renamed when complete, so a file under its final
//! name is always whole; an interrupted `prepare` keeps every finished work file and never
//! tokenizes that source file again. Layout (all integers little-endian):
//!
//! ```text
//! records   one per kept document, in file order:
//!           u8 split (0 train, 1 eval) | u64 row | u64 text_bytes | u32 id_len | id (UTF-8)
//!           | u32 n_tokens | n_tokens x u16 (framed: <s> ids </s>)
//! index     n_docs x (u64 offset | u32 n_tokens | u32 split): where each record starts, and
//!           what assembly plans with, so it places documents without reading them
//! meta      JSON (WorkMeta)
//! trailer   u64 index_offset | u64 n_docs | u64 meta_len | sha256 of all bytes before the
//!           trailer | 8-byte magic "TOKWORK3"
//! ```
//!
//! Opening a work file re-hashes it (one sequential read, about a second per GB): records carry
//! no check of their own, and a damaged one would otherwise become wrong shard tokens. A file
//! that fails is tokenized again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::shard::{Writeback, sync_parent};
use crate::format::{Split, tmp_path};
use crate::frame::{Frame, IdTooLarge};
use crate::outdir::WRITE_HINT;

const MAGIC: [u8; 8] = *b"TOKWORK3";
const TRAILER_BYTES: u64 = 8 + 8 + 8 + 32 + 8;
/// Where the trailer's sha256 starts.
const TRAILER_HASH_AT: usize = 24;
/// A record's fixed head: split, row, text_bytes, id length.
const HEAD_BYTES: u64 = 1 + 8 + 8 + 4;
/// One index entry: offset, token count, split code.
const ENTRY_BYTES: u64 = 8 + 4 + 4;

/// What a work file was made from and what it holds; compared on resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkMeta {
    /// Identity of the inputs that determine the records: the source file (path and size), the
    /// tokenizer sha256 and the split rule. A work file whose key differs is redone.
    pub key: WorkKey,
    pub source_sha256: String,
    pub rows: u64,
    /// Documents written (rows minus empty documents).
    pub documents: u64,
    pub empty_documents: u64,
    pub text_bytes: u64,
    pub train_tokens: u64,
    pub eval_tokens: u64,
    pub train_documents: u64,
    pub eval_documents: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkKey {
    pub source_path: String,
    pub source_size: u64,
    pub tokenizer_sha256: String,
    pub split_rule: String,
}

impl WorkMeta {
    /// The meta of a source file of `rows` rows before any document is counted.
    pub fn new(key: WorkKey, rows: u64) -> Self {
        WorkMeta {
            key,
            source_sha256: String::new(),
            rows,
            documents: 0,
            empty_documents: 0,
            text_bytes: 0,
            train_tokens: 0,
            eval_tokens: 0,
            train_documents: 0,
            eval_documents: 0,
        }
    }

    pub fn tokens(&self, split: Split) -> u64 {
        match split {
            Split::Train => self.train_tokens,
            Split::Eval => self.eval_tokens,
        }
    }
}

/// Encoded documents laid out as work-file records, built on a tokenizer thread so the writer
/// only copies bytes ([`WorkWriter::append`]).
#[derive(Debug, Default)]
pub struct Records {
    bytes: Vec<u8>,
    /// Each record's index entry, with the offset relative to `bytes`.
    entries: Vec<Entry>,
}

/// A record's index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    offset: u64,
    /// Framed tokens.
    tokens: u32,
    split: Split,
}

impl Records {
    /// Appends the record of one document: its head, then its ids framed by `frame`. Nothing is
    /// appended when an id does not fit u16.
    pub fn push(
        &mut self,
        head: &RecordHead<'_>,
        frame: Frame,
        ids: &[u32],
    ) -> Result<(), IdTooLarge> {
        let b = &mut self.bytes;
        let start = b.len();
        let tokens = Frame::len(ids.len()) as u32;
        b.push(head.split.code() as u8);
        b.extend(head.row.to_le_bytes());
        b.extend(head.text_bytes.to_le_bytes());
        b.extend((head.id.len() as u32).to_le_bytes());
        b.extend(head.id.as_bytes());
        b.extend(tokens.to_le_bytes());
        if let Err(e) = frame.write(ids, b) {
            b.truncate(start);
            return Err(e);
        }
        self.entries.push(Entry {
            offset: start as u64,
            tokens,
            split: head.split,
        });
        Ok(())
    }

    /// Room for `records` more records of `bytes` bytes in all.
    pub fn reserve(&mut self, bytes: usize, records: usize) {
        self.bytes.reserve(bytes);
        self.entries.reserve(records);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a record says about its document, besides the tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHead<'a> {
    pub split: Split,
    pub row: u64,
    pub id: &'a str,
    pub text_bytes: u64,
}

/// One record read back ([`WorkReader::read`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub head: RecordHead<'a>,
    /// `<s>` ids `</s>` as little-endian u16, the byte layout of the shards.
    pub tokens: &'a [u8],
}

impl Record<'_> {
    /// Framed tokens of the document.
    pub fn len(&self) -> usize {
        self.tokens.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Streams records into `<path>.tmp`; [`WorkWriter::finish`] appends index, meta and trailer,
/// fsyncs and renames. Unbuffered: records arrive a run (about 256 KiB of text) at a time.
pub struct WorkWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: File,
    offset: u64,
    index: Vec<Entry>,
    writeback: Writeback,
    /// Of every byte written so far (the trailer's hash).
    hasher: Sha256,
}

impl std::fmt::Debug for WorkWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WorkWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp)
            .with_context(|| format!("cannot create {}; {WRITE_HINT}", tmp.display()))?;
        Ok(WorkWriter {
            path: path.to_owned(),
            tmp,
            out: file,
            offset: 0,
            index: Vec::new(),
            writeback: Writeback::default(),
            hasher: Sha256::new(),
        })
    }

    /// Appends `records` (in order) to the file.
    pub fn append(&mut self, records: &Records) -> Result<()> {
        self.out
            .write_all(&records.bytes)
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        self.hasher.update(&records.bytes);
        let base = self.offset;
        self.index.extend(records.entries.iter().map(|e| Entry {
            offset: base + e.offset,
            ..*e
        }));
        self.offset += records.bytes.len() as u64;
        self.writeback.wrote(&self.out, self.offset);
        Ok(())
    }

    pub fn finish(mut self, meta: &WorkMeta) -> Result<()> {
        let ctx = || format!("cannot write {}", self.tmp.display());
        let meta_json = serde_json::to_vec(meta).expect("meta serializes");
        let mut tail =
            Vec::with_capacity(ENTRY_BYTES as usize * self.index.len() + meta_json.len() + 32);
        for e in &self.index {
            tail.extend(e.offset.to_le_bytes());
            tail.extend(e.tokens.to_le_bytes());
            tail.extend(e.split.code().to_le_bytes());
        }
        tail.extend(&meta_json);
        self.hasher.update(&tail);
        tail.extend(self.offset.to_le_bytes());
        tail.extend((self.index.len() as u64).to_le_bytes());
        tail.extend((meta_json.len() as u64).to_le_bytes());
        tail.extend(self.hasher.finalize());
        tail.extend(MAGIC);
        self.out.write_all(&tail).with_context(ctx)?;
        self.out.sync_all().with_context(ctx)?;
        drop(self.out);
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot rename {}", self.tmp.display()))?;
        sync_parent(&self.path).with_context(|| format!("cannot sync {}", self.path.display()))?;
        Ok(())
    }
}

/// A finished work file opened for random access (records are read with `pread`).
#[derive(Debug)]
pub struct WorkReader {
    path: PathBuf,
    file: File,
    index: Vec<Entry>,
    /// Where the records end (the index starts).
    records_end: u64,
    meta: WorkMeta,
}

impl WorkReader {
    /// Opens and checks the trailer, index and meta; any inconsistency is an error (the caller
    /// then redoes the file).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        let bad = |what: &str| anyhow::anyhow!("{}: damaged work file ({what})", path.display());
        if len < TRAILER_BYTES {
            return Err(bad("too short"));
        }
        let mut t = [0u8; TRAILER_BYTES as usize];
        file.read_exact_at(&mut t, len - TRAILER_BYTES)?;
        let u = |i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if t[TRAILER_BYTES as usize - 8..] != MAGIC {
            return Err(bad("bad magic"));
        }
        let (index_offset, n, meta_len) = (u(0), u(1), u(2));
        let expected = index_offset
            .checked_add(
                n.checked_mul(ENTRY_BYTES)
                    .ok_or_else(|| bad("index size"))?,
            )
            .and_then(|x| x.checked_add(meta_len))
            .and_then(|x| x.checked_add(TRAILER_BYTES));
        if expected != Some(len) {
            return Err(bad("size"));
        }
        if hash_prefix(&file, len - TRAILER_BYTES)?[..] != t[TRAILER_HASH_AT..TRAILER_HASH_AT + 32]
        {
            return Err(bad("sha256 mismatch"));
        }
        let mut raw = vec![0u8; (n * ENTRY_BYTES) as usize];
        file.read_exact_at(&mut raw, index_offset)?;
        let index = raw
            .chunks_exact(ENTRY_BYTES as usize)
            .map(|c| {
                let code = u32::from_le_bytes(c[12..16].try_into().expect("4 bytes"));
                Some(Entry {
                    offset: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                    tokens: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
                    split: Split::from_code(code)?,
                })
            })
            .collect::<Option<Vec<Entry>>>()
            .ok_or_else(|| bad("index split code"))?;
        let mut meta_raw = vec![0u8; meta_len as usize];
        file.read_exact_at(&mut meta_raw, index_offset + n * ENTRY_BYTES)?;
        let meta: WorkMeta = serde_json::from_slice(&meta_raw).map_err(|_| bad("meta"))?;
        // Records lie back to back from offset 0 up to the index, so each one's length is the
        // distance to the next.
        let increasing = index.first().is_none_or(|e| e.offset == 0)
            && index.windows(2).all(|w| w[0].offset < w[1].offset)
            && index.last().is_none_or(|e| e.offset < index_offset);
        if meta.documents != n || !increasing {
            return Err(bad("index"));
        }
        Ok(WorkReader {
            path: path.to_owned(),
            file,
            index,
            records_end: index_offset,
            meta,
        })
    }

    pub fn meta(&self) -> &WorkMeta {
        &self.meta
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Split of record `i`, from the index (checked against the record when it is read).
    pub fn split(&self, i: usize) -> Split {
        self.index[i].split
    }

    /// Framed tokens of record `i`, from the index (checked against the record when it is read).
    pub fn tokens(&self, i: usize) -> usize {
        self.index[i].tokens as usize
    }

    /// Reads record `i` (in file order) with one `pread` into `buf`, which the record borrows.
    pub fn read<'b>(&self, i: usize, buf: &'b mut Vec<u8>) -> Result<Record<'b>> {
        let ctx = || format!("cannot read record {i} of {}", self.path.display());
        let at = self.index[i].offset;
        let end = self.index.get(i + 1).map_or(self.records_end, |e| e.offset);
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{}: damaged work file (record {i}: {what})",
                self.path.display()
            )
        };
        if end < at + HEAD_BYTES + 4 {
            return Err(bad("too short"));
        }
        buf.resize((end - at) as usize, 0);
        self.file.read_exact_at(buf, at).with_context(ctx)?;
        let buf: &'b [u8] = buf;
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
        let split = Split::from_code(u32::from(buf[0]))
            .ok_or_else(|| bad(&format!("split code {}", buf[0])))?;
        let id_end = HEAD_BYTES as usize + u32_at(17) as usize;
        if buf.len() < id_end + 4 {
            return Err(bad("id length"));
        }
        let id = std::str::from_utf8(&buf[HEAD_BYTES as usize..id_end])
            .map_err(|_| bad("id is not UTF-8"))?;
        let tokens = &buf[id_end + 4..];
        let n = u32_at(id_end);
        if tokens.len() != 2 * n as usize || n != self.index[i].tokens {
            return Err(bad("token count"));
        }
        if split != self.index[i].split {
            return Err(bad("split differs from the index"));
        }
        Ok(Record {
            head: RecordHead {
                split,
                row: u64_at(1),
                id,
                text_bytes: u64_at(9),
            },
            tokens,
        })
    }
}

/// sha256 of the first `len` bytes of `file`.
fn hash_prefix(file: &File, len: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = 0;
    while at < len {
        let n = buf.len().min((len - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Frame = Frame { bos: 1, eos: 2 };

    fn head(split: Split, row: u64, id: &str, text_bytes: u64) -> RecordHead<'_> {
        RecordHead {
            split,
            row,
            id,
            text_bytes,
        }
    }

    #[test]
    fn round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000-x.tok");
        let mut w = WorkWriter::create(&path).unwrap();
        let mut first = Records::default();
        first
            .push(&head(Split::Train, 0, "a", 3), FRAME, &[500])
            .unwrap();
        w.append(&first).unwrap();
        let mut second = Records::default();
        second
            .push(&head(Split::Eval, 2, "béé", 9), FRAME, &[65535, 7])
            .unwrap();
        second
            .push(&head(Split::Train, 3, "", 0), FRAME, &[])
            .unwrap();
        assert_eq!(
            second.push(&head(Split::Train, 4, "x", 1), FRAME, &[65536]),
            Err(IdTooLarge(65536))
        );
        assert_eq!(second.len(), 2);
        w.append(&second).unwrap();
        assert!(!path.exists());
        let meta = WorkMeta {
            key: WorkKey {
                source_path: "x".into(),
                source_size: 1,
                tokenizer_sha256: "t".into(),
                split_rule: "r".into(),
            },
            source_sha256: "s".into(),
            rows: 4,
            documents: 3,
            empty_documents: 1,
            text_bytes: 12,
            train_tokens: 5,
            eval_tokens: 4,
            train_documents: 2,
            eval_documents: 1,
        };
        w.finish(&meta).unwrap();
        let r = WorkReader::open(&path).unwrap();
        assert_eq!(r.meta(), &meta);
        assert_eq!(r.len(), 3);
        let le = |t: &[u16]| t.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>();
        let want = [
            (head(Split::Train, 0, "a", 3), le(&[1, 500, 2])),
            (head(Split::Eval, 2, "béé", 9), le(&[1, 65535, 7, 2])),
            (head(Split::Train, 3, "", 0), le(&[1, 2])),
        ];
        let mut buf = Vec::new();
        for (i, (h, tokens)) in want.iter().enumerate().rev() {
            let rec = r.read(i, &mut buf).unwrap();
            assert_eq!((&rec.head, rec.tokens), (h, &tokens[..]));
            assert_eq!(rec.len(), tokens.len() / 2);
            // The index says the same without reading the record.
            assert_eq!((r.split(i), r.tokens(i)), (h.split, tokens.len() / 2));
        }
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(WorkReader::open(&path).is_err());
        // Found by the hostile-bytes test: a flipped bit anywhere in a record (here the row of
        // the first, a token of the last) was read back as a different document. The trailer's
        // hash refuses it.
        let index_at = bytes.len() - TRAILER_BYTES as usize - meta_json_len(&bytes) - 3 * 16;
        for at in [1, index_at - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            let err = WorkReader::open(&path).unwrap_err().to_string();
            assert!(err.contains("sha256 mismatch"), "{err}");
        }
        // Behind the hash (a file rehashed after the damage), the records are still checked.
        // A record whose token count disagrees with its length is refused.
        let mut bad = bytes.clone();
        bad[17 + 4 + 1] ^= 1;
        std::fs::write(&path, rehashed(bad)).unwrap();
        let r = WorkReader::open(&path).unwrap();
        let err = r.read(0, &mut buf).unwrap_err().to_string();
        assert!(err.contains("damaged work file"), "{err}");
        // An index entry that disagrees with its record: token count, split.
        for (field, what) in [(8, "token count"), (12, "split")] {
            let mut bad = bytes.clone();
            bad[index_at + 16 + field] ^= 1;
            std::fs::write(&path, rehashed(bad)).unwrap();
            let r = WorkReader::open(&path).unwrap();
            let err = r.read(1, &mut buf).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
    }

    /// The meta length field of a work file's trailer.
    fn meta_json_len(file: &[u8]) -> usize {
        let t = &file[file.len() - TRAILER_BYTES as usize..];
        u64::from_le_bytes(t[16..24].try_into().unwrap()) as usize
    }

    /// `file` with its trailer's hash recomputed.
    fn rehashed(mut file: Vec<u8>) -> Vec<u8> {
        let body = file.len() - TRAILER_BYTES as usize;
        let h = Sha256::digest(&file[..body]);
        file[body + TRAILER_HASH_AT..body + TRAILER_HASH_AT + 32].copy_from_slice(&h);
        file
    }
}
