//! Work files: the tokenized documents of one source file, in file order, kept under
//! `OUT/.work/` between the tokenizing stage and the assembly stage.
//!
//! A work file is written to a temporary name and renamed when complete, so a file under its final
//! name is always whole; an interrupted `prepare` keeps every finished work file and never
//! tokenizes that source file again. Layout (all integers little-endian):
//!
//! ```text
//! records   one per kept document, in file order:
//!           u8 split (0 train, 1 eval) | u64 row | u64 text_bytes | u32 id_len | id (UTF-8)
//!           | u32 n_tokens | n_tokens x u16 (framed: <s> ids </s>)
//! index     n_docs x u64: offset of each record
//! meta      JSON (WorkMeta)
//! trailer   u64 index_offset | u64 n_docs | u64 meta_len | 8-byte magic "TOKWORK1"
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::format::Split;
use crate::format::shard::{sync_parent, tmp_path};

const MAGIC: [u8; 8] = *b"TOKWORK1";
const TRAILER_BYTES: u64 = 32;

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

/// One tokenized document as it goes into a work file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkDoc {
    pub split: Split,
    pub row: u64,
    pub id: String,
    pub text_bytes: u64,
    /// `<s>` + ids + `</s>`.
    pub tokens: Vec<u16>,
}

/// Streams records into `<path>.tmp`; [`WorkWriter::finish`] appends index, meta and trailer,
/// fsyncs and renames.
pub struct WorkWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    index: Vec<u64>,
    buf: Vec<u8>,
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
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(WorkWriter {
            path: path.to_owned(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            offset: 0,
            index: Vec::new(),
            buf: Vec::new(),
        })
    }

    pub fn push(&mut self, doc: &WorkDoc) -> Result<()> {
        let b = &mut self.buf;
        b.clear();
        b.push(match doc.split {
            Split::Train => 0,
            Split::Eval => 1,
        });
        b.extend(doc.row.to_le_bytes());
        b.extend(doc.text_bytes.to_le_bytes());
        b.extend((doc.id.len() as u32).to_le_bytes());
        b.extend(doc.id.as_bytes());
        b.extend((doc.tokens.len() as u32).to_le_bytes());
        b.extend(doc.tokens.iter().flat_map(|t| t.to_le_bytes()));
        self.out
            .write_all(b)
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        self.index.push(self.offset);
        self.offset += b.len() as u64;
        Ok(())
    }

    pub fn finish(mut self, meta: &WorkMeta) -> Result<()> {
        let ctx = || format!("cannot write {}", self.tmp.display());
        let meta_json = serde_json::to_vec(meta).expect("meta serializes");
        for o in &self.index {
            self.out.write_all(&o.to_le_bytes()).with_context(ctx)?;
        }
        self.out.write_all(&meta_json).with_context(ctx)?;
        self.out
            .write_all(&self.offset.to_le_bytes())
            .with_context(ctx)?;
        self.out
            .write_all(&(self.index.len() as u64).to_le_bytes())
            .with_context(ctx)?;
        self.out
            .write_all(&(meta_json.len() as u64).to_le_bytes())
            .with_context(ctx)?;
        self.out.write_all(&MAGIC).with_context(ctx)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        drop(file);
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
    index: Vec<u64>,
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
        if t[24..32] != MAGIC {
            return Err(bad("bad magic"));
        }
        let (index_offset, n, meta_len) = (u(0), u(1), u(2));
        let expected = index_offset
            .checked_add(n.checked_mul(8).ok_or_else(|| bad("index size"))?)
            .and_then(|x| x.checked_add(meta_len))
            .and_then(|x| x.checked_add(TRAILER_BYTES));
        if expected != Some(len) {
            return Err(bad("size"));
        }
        let mut raw = vec![0u8; (n * 8) as usize];
        file.read_exact_at(&mut raw, index_offset)?;
        let index: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut meta_raw = vec![0u8; meta_len as usize];
        file.read_exact_at(&mut meta_raw, index_offset + n * 8)?;
        let meta: WorkMeta = serde_json::from_slice(&meta_raw).map_err(|_| bad("meta"))?;
        if meta.documents != n || index.iter().any(|&o| o >= index_offset.max(1)) {
            return Err(bad("index"));
        }
        Ok(WorkReader {
            path: path.to_owned(),
            file,
            index,
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

    /// Reads record `i` (in file order) into `doc`, reusing its buffers.
    pub fn read(&self, i: usize, doc: &mut WorkDoc) -> Result<()> {
        let ctx = || format!("cannot read record {i} of {}", self.path.display());
        let at = self.index[i];
        let mut head = [0u8; 21];
        self.file.read_exact_at(&mut head, at).with_context(ctx)?;
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
        doc.split = match head[0] {
            0 => Split::Train,
            1 => Split::Eval,
            x => bail!("{}: record {i} has split code {x}", self.path.display()),
        };
        doc.row = u64_at(1);
        doc.text_bytes = u64_at(9);
        let id_len = u32::from_le_bytes(head[17..21].try_into().expect("4 bytes")) as usize;
        let mut id = vec![0u8; id_len + 4];
        self.file
            .read_exact_at(&mut id, at + 21)
            .with_context(ctx)?;
        let n = u32::from_le_bytes(id[id_len..].try_into().expect("4 bytes")) as usize;
        id.truncate(id_len);
        doc.id = String::from_utf8(id).with_context(ctx)?;
        let mut raw = vec![0u8; n * 2];
        self.file
            .read_exact_at(&mut raw, at + 21 + id_len as u64 + 4)
            .with_context(ctx)?;
        doc.tokens.clear();
        doc.tokens.extend(
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000-x.tok");
        let docs = vec![
            WorkDoc {
                split: Split::Train,
                row: 0,
                id: "a".into(),
                text_bytes: 3,
                tokens: vec![1, 500, 2],
            },
            WorkDoc {
                split: Split::Eval,
                row: 2,
                id: "béé".into(),
                text_bytes: 9,
                tokens: vec![1, 65535, 7, 2],
            },
        ];
        let mut w = WorkWriter::create(&path).unwrap();
        for d in &docs {
            w.push(d).unwrap();
        }
        assert!(!path.exists());
        let meta = WorkMeta {
            key: WorkKey {
                source_path: "x".into(),
                source_size: 1,
                tokenizer_sha256: "t".into(),
                split_rule: "r".into(),
            },
            source_sha256: "s".into(),
            rows: 3,
            documents: 2,
            empty_documents: 1,
            text_bytes: 12,
            train_tokens: 3,
            eval_tokens: 4,
            train_documents: 1,
            eval_documents: 1,
        };
        w.finish(&meta).unwrap();
        let r = WorkReader::open(&path).unwrap();
        assert_eq!(r.meta(), &meta);
        let mut d = docs[0].clone();
        for (i, want) in docs.iter().enumerate().rev() {
            r.read(i, &mut d).unwrap();
            assert_eq!(&d, want);
        }
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(WorkReader::open(&path).is_err());
    }
}
