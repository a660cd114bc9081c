//! The documents index `documents.jsonl.zst` (one JSON line per document: where its tokens went)
//! and its lookup sidecar `documents.idx`, which answers "which documents does sequence N of a
//! split hold" without reading the whole index.
//!
//! The JSON lines are in stream order, train and eval interleaved, in one zstd stream: finding a
//! sequence's documents there means decompressing and parsing every line before it (about two
//! million lines for the plan's 1.97B tokens). The sidecar holds the same lines regrouped by
//! split into independent zstd frames of [`FRAME_LINES`] lines, and a table with each frame's
//! token range: a lookup binary-searches the table and decompresses the one or two frames that
//! overlap the sequence.
//!
//! Sidecar layout, all integers little-endian:
//!
//! ```text
//! 0    8   magic `DOCINDEX`
//! 8    4   version u32 (SIDECAR_VERSION)
//! 12   4   lines per frame u32
//! 16   8   size of documents.jsonl.zst u64
//! 24   8   its mtime: seconds since the epoch u64
//! 32   4   its mtime: nanoseconds u32, then 4 bytes zero
//! 40   32  its sha256
//! 72   8   frames u64
//! 80   8   offset of the frame table u64
//! 88   40  zero
//! 128      the frames (zstd), then the table: per frame, split u32 (0 train, 1 eval), lines u32,
//!          first position u64, end position u64, offset u64, length u64; by split, then position
//! ```
//!
//! The sidecar is a cache: built on first use, written atomically (temporary name, fsync,
//! rename), and rebuilt whenever the documents file's size, or its mtime and sha256, differ
//! from those recorded.

use std::borrow::Cow;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::shard::sync_parent;
use super::{DOCUMENTS_FILE, DOCUMENTS_SIDECAR_FILE, Split, tmp_path};

/// One line of `documents.jsonl.zst` (the writer borrows its strings, a reader may own them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DocumentLine<'a> {
    pub split: Split,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Source file, as in the manifest's `dataset.files[].path`.
    #[serde(borrow)]
    pub file: Cow<'a, str>,
    /// Row of the document in its source file.
    pub row: u64,
    /// Position of the document's `<s>` in its split's token stream (sequence = position / seq_len).
    pub position: u64,
    /// Framed tokens of the document (`<s>` ids `</s>`).
    pub tokens: u64,
    /// Tokens of the document inside the split (fewer when the end of the split cuts it).
    pub kept: u64,
}

/// Lines per zstd frame of the sidecar: a lookup decompresses about 170 KB of JSON per frame.
pub const FRAME_LINES: u32 = 1024;
const MAGIC: [u8; 8] = *b"DOCINDEX";
const SIDECAR_VERSION: u32 = 1;
const HEADER_BYTES: usize = 128;
const ENTRY_BYTES: usize = 40;
/// zstd level of the sidecar's frames (the documents file's own level).
const ZSTD_LEVEL: i32 = 3;

/// Errors of the documents index; each names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DocumentsError {
    #[error(
        "{path}: not found; hint: `pipeline prepare` writes it; a dataset from `trainer synthetic-shards` has no documents"
    )]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot write {path}: {source}; hint: the lookup index is built once next to {DOCUMENTS_FILE}, so the dataset folder must be writable the first time"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: line {line}: {detail}; hint: the file is damaged, re-run `pipeline prepare --force`"
    )]
    BadLine {
        path: PathBuf,
        line: u64,
        detail: String,
    },
    #[error(
        "{path}: damaged ({detail}); hint: delete it, the next lookup rebuilds it from {DOCUMENTS_FILE}"
    )]
    BadSidecar { path: PathBuf, detail: String },
}

/// A document's share of one sequence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DocumentInSequence {
    pub id: String,
    pub file: String,
    pub row: u64,
    /// The document's line in `documents.jsonl.zst` (see [`DocumentLine`]).
    pub position: u64,
    pub tokens: u64,
    pub kept: u64,
    /// Its tokens in the sequence, `[start, end)` counted from the sequence's first token.
    pub sequence_tokens: [u64; 2],
    /// The same tokens counted from the document's `<s>`, `[start, end)` of `tokens`.
    pub document_tokens: [u64; 2],
}

/// The size and mtime of the documents file, which decide whether a sidecar can be trusted
/// without hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    secs: u64,
    nanos: u32,
}

impl Stamp {
    fn of(path: &Path) -> Result<Self, DocumentsError> {
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DocumentsError::Missing {
                path: path.to_owned(),
            },
            _ => io_err(path, e),
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        Ok(Stamp {
            size: meta.len(),
            secs: mtime.as_secs(),
            nanos: mtime.subsec_nanos(),
        })
    }
}

/// The sidecar header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    stamp: Stamp,
    sha256: [u8; 32],
    frames: u64,
    table_offset: u64,
}

impl Header {
    fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&SIDECAR_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&FRAME_LINES.to_le_bytes());
        b[16..24].copy_from_slice(&self.stamp.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.stamp.secs.to_le_bytes());
        b[32..36].copy_from_slice(&self.stamp.nanos.to_le_bytes());
        b[40..72].copy_from_slice(&self.sha256);
        b[72..80].copy_from_slice(&self.frames.to_le_bytes());
        b[80..88].copy_from_slice(&self.table_offset.to_le_bytes());
        b
    }

    /// `None` for anything this build did not write: another version or frame size is stale.
    fn parse(b: &[u8; HEADER_BYTES]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if b[0..8] != MAGIC || u32_at(8) != SIDECAR_VERSION || u32_at(12) != FRAME_LINES {
            return None;
        }
        Some(Header {
            stamp: Stamp {
                size: u64_at(16),
                secs: u64_at(24),
                nanos: u32_at(32),
            },
            sha256: b[40..72].try_into().expect("32 bytes"),
            frames: u64_at(72),
            table_offset: u64_at(80),
        })
    }
}

/// One frame of the sidecar: `lines` documents of `split` covering positions
/// `first_position..end_position` of its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    split: Split,
    lines: u32,
    first_position: u64,
    end_position: u64,
    offset: u64,
    length: u64,
}

impl Frame {
    fn to_bytes(self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..4].copy_from_slice(&self.split.code().to_le_bytes());
        b[4..8].copy_from_slice(&self.lines.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_position.to_le_bytes());
        b[16..24].copy_from_slice(&self.end_position.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Frame {
            split: Split::from_code(u32_at(0))?,
            lines: u32_at(4),
            first_position: u64_at(8),
            end_position: u64_at(16),
            offset: u64_at(24),
            length: u64_at(32),
        })
    }
}

/// An open sidecar: the frame table in memory, the frames read on demand.
#[derive(Debug)]
pub struct DocumentIndex {
    path: PathBuf,
    file: File,
    /// Train frames, then eval frames, each by position.
    frames: Vec<Frame>,
}

/// Whether [`DocumentIndex::open`] found a current sidecar or had to build one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Current,
    /// Built (missing, stale or damaged before), with the documents read.
    Built {
        documents: u64,
    },
}

impl DocumentIndex {
    /// Opens the sidecar of dataset folder `dir`, building it first when it is missing, stale
    /// (the documents file changed) or not readable by this build.
    pub fn open(dir: &Path) -> Result<(Self, Opened), DocumentsError> {
        let documents = dir.join(DOCUMENTS_FILE);
        let sidecar = dir.join(DOCUMENTS_SIDECAR_FILE);
        let stamp = Stamp::of(&documents)?;
        if let Some(header) = read_header(&sidecar)
            && header.stamp.size == stamp.size
            && (header.stamp == stamp || header.sha256 == sha256_of(&documents)?)
            && let Ok(index) = Self::load(&sidecar, &header)
        {
            return Ok((index, Opened::Current));
        }
        let t0 = Instant::now();
        let count = build(&documents, &sidecar).inspect_err(|_| {
            // A half-written sidecar is of no use; its final name was never touched.
            let _ = fs::remove_file(tmp_path(&sidecar));
        })?;
        tracing::info!(
            "built {} from {} ({count} documents, {:.1} s)",
            sidecar.display(),
            documents.display(),
            t0.elapsed().as_secs_f64()
        );
        let header = read_header(&sidecar).ok_or_else(|| DocumentsError::BadSidecar {
            path: sidecar.clone(),
            detail: "its header did not read back".into(),
        })?;
        let index = Self::load(&sidecar, &header)?;
        Ok((index, Opened::Built { documents: count }))
    }

    fn load(path: &Path, header: &Header) -> Result<Self, DocumentsError> {
        let bad = |detail: String| DocumentsError::BadSidecar {
            path: path.to_owned(),
            detail,
        };
        let mut file = File::open(path).map_err(|e| io_err(path, e))?;
        let len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let table_bytes = header
            .frames
            .checked_mul(ENTRY_BYTES as u64)
            .filter(|n| header.table_offset.checked_add(*n) == Some(len))
            .ok_or_else(|| bad(format!("{len} bytes do not end with its frame table")))?;
        let mut table = vec![0u8; table_bytes as usize];
        file.seek(SeekFrom::Start(header.table_offset))
            .and_then(|_| file.read_exact(&mut table))
            .map_err(|e| io_err(path, e))?;
        let frames = table
            .chunks_exact(ENTRY_BYTES)
            .map(|b| {
                Frame::parse(b)
                    .filter(|f| f.offset + f.length <= header.table_offset)
                    .ok_or_else(|| bad("a frame entry is invalid".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DocumentIndex {
            path: path.to_owned(),
            file,
            frames,
        })
    }

    /// The documents with tokens in sequence `sequence` of `split` (sequences of `seq_len`
    /// tokens), in stream order. Empty for a sequence past the end of the split.
    pub fn sequence(
        &self,
        split: Split,
        seq_len: u64,
        sequence: u64,
    ) -> Result<Vec<DocumentInSequence>, DocumentsError> {
        let (start, end) = (sequence * seq_len, (sequence + 1) * seq_len);
        let frames = self.split_frames(split);
        let first = frames.partition_point(|f| f.end_position <= start);
        let mut out = Vec::new();
        for frame in frames[first..]
            .iter()
            .take_while(|f| f.first_position < end)
        {
            let text = self.read_frame(frame)?;
            for (i, line) in text.split(|&b| b == b'\n').enumerate() {
                if line.is_empty() {
                    continue;
                }
                let doc: DocumentLine =
                    serde_json::from_slice(line).map_err(|e| DocumentsError::BadSidecar {
                        path: self.path.clone(),
                        detail: format!("frame at byte {}, line {}: {e}", frame.offset, i + 1),
                    })?;
                let (a, b) = (doc.position, doc.position + doc.kept);
                if a < end && b > start {
                    let (s, e) = (a.max(start), b.min(end));
                    out.push(DocumentInSequence {
                        sequence_tokens: [s - start, e - start],
                        document_tokens: [s - a, e - a],
                        id: doc.id.into_owned(),
                        file: doc.file.into_owned(),
                        row: doc.row,
                        position: doc.position,
                        tokens: doc.tokens,
                        kept: doc.kept,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Documents listed for `split`.
    pub fn documents(&self, split: Split) -> u64 {
        self.split_frames(split)
            .iter()
            .map(|f| f.lines as u64)
            .sum()
    }

    fn split_frames(&self, split: Split) -> &[Frame] {
        let a = self
            .frames
            .partition_point(|f| f.split.code() < split.code());
        let b = self
            .frames
            .partition_point(|f| f.split.code() <= split.code());
        &self.frames[a..b]
    }

    fn read_frame(&self, frame: &Frame) -> Result<Vec<u8>, DocumentsError> {
        let mut compressed = vec![0u8; frame.length as usize];
        let mut file = &self.file;
        file.seek(SeekFrom::Start(frame.offset))
            .and_then(|_| file.read_exact(&mut compressed))
            .map_err(|e| io_err(&self.path, e))?;
        zstd::stream::decode_all(&compressed[..]).map_err(|e| DocumentsError::BadSidecar {
            path: self.path.clone(),
            detail: format!("frame at byte {}: {e}", frame.offset),
        })
    }
}

fn io_err(path: &Path, source: io::Error) -> DocumentsError {
    DocumentsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The sidecar's header, or `None` when there is no sidecar or it is not one this build wrote.
fn read_header(path: &Path) -> Option<Header> {
    let mut b = [0u8; HEADER_BYTES];
    File::open(path).ok()?.read_exact(&mut b).ok()?;
    Header::parse(&b)
}

fn sha256_of(path: &Path) -> Result<[u8; 32], DocumentsError> {
    let mut reader = HashingReader::new(File::open(path).map_err(|e| io_err(path, e))?);
    io::copy(&mut reader, &mut io::sink()).map_err(|e| io_err(path, e))?;
    Ok(reader.digest())
}

/// Hashes the bytes read through it, so the sidecar's build hashes the documents file in the
/// same pass that decompresses it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn digest(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Lines of one split waiting to fill a frame.
#[derive(Debug, Default)]
struct Pending {
    text: Vec<u8>,
    lines: u32,
    first_position: u64,
    /// Where the split's next document must start: positions tile the stream.
    next_position: u64,
}

/// Checks that `doc` starts at `expected`, where its split's previous document ended (positions
/// tile each split's stream), and keeps 1 to `tokens` tokens; returns where the next one starts.
fn next_position(doc: &DocumentLine, expected: u64) -> Result<u64, String> {
    if doc.position != expected || doc.kept == 0 || doc.kept > doc.tokens {
        return Err(format!(
            "{} document at position {} keeping {} of {} tokens; expected one at {expected} keeping 1 to `tokens`",
            doc.split.name(),
            doc.position,
            doc.kept,
            doc.tokens,
        ));
    }
    Ok(doc.position + doc.kept)
}

/// Reads the whole of `dir/documents.jsonl.zst` (zstd checks its content checksum at the end),
/// checks every line as the sidecar's build does, and that the splits hold `documents` (train,
/// eval) lines, as the manifest says. Reads only: `prepare --force` uses it before it trusts a
/// complete dataset.
pub fn check(dir: &Path, documents: [u64; 2]) -> Result<(), DocumentsError> {
    let path = dir.join(DOCUMENTS_FILE);
    let file = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DocumentsError::Missing { path: path.clone() },
        _ => io_err(&path, e),
    })?;
    let decoder = zstd::stream::read::Decoder::new(file).map_err(|e| io_err(&path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, decoder);
    let (mut line, mut count, mut next, mut lines) = (Vec::new(), 0u64, [0u64; 2], [0u64; 2]);
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .map_err(|e| io_err(&path, e))?
            == 0
        {
            break;
        }
        count += 1;
        let bad = |detail: String| DocumentsError::BadLine {
            path: path.clone(),
            line: count,
            detail,
        };
        let doc: DocumentLine = serde_json::from_slice(&line).map_err(|e| bad(e.to_string()))?;
        let split = doc.split.code() as usize;
        next[split] = next_position(&doc, next[split]).map_err(bad)?;
        lines[split] += 1;
    }
    if lines != documents {
        return Err(DocumentsError::BadLine {
            path,
            line: count,
            detail: format!(
                "the file ends after {} train and {} eval documents, the manifest counts {} and {}",
                lines[0], lines[1], documents[0], documents[1]
            ),
        });
    }
    Ok(())
}

/// Builds the sidecar of `documents` at `out` (atomically); returns the documents read.
fn build(documents: &Path, out: &Path) -> Result<u64, DocumentsError> {
    // Stamp before reading: a file replaced between the stamp and the read leaves a stamp that
    // does not match it, so the next open falls back to comparing the sha256 (of what was read).
    let stamp = Stamp::of(documents)?;
    let source = File::open(documents).map_err(|e| io_err(documents, e))?;
    let mut decoder = zstd::stream::read::Decoder::new(HashingReader::new(source))
        .map_err(|e| io_err(documents, e))?;
    let tmp = tmp_path(out);
    let write_err = |e: io::Error| DocumentsError::Write {
        path: tmp.clone(),
        source: e,
    };
    let mut w = BufWriter::new(File::create(&tmp).map_err(write_err)?);
    w.write_all(&[0u8; HEADER_BYTES]).map_err(write_err)?;
    let mut offset = HEADER_BYTES as u64;
    let mut frames = Vec::new();
    let mut pending = [Pending::default(), Pending::default()];
    let mut count = 0u64;
    {
        let mut reader = BufReader::with_capacity(1 << 20, &mut decoder);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err(documents, e))?;
            if n == 0 {
                break;
            }
            count += 1;
            let bad = |detail: String| DocumentsError::BadLine {
                path: documents.to_owned(),
                line: count,
                detail,
            };
            let doc: DocumentLine =
                serde_json::from_slice(&line).map_err(|e| bad(e.to_string()))?;
            let p = &mut pending[doc.split.code() as usize];
            let next = next_position(&doc, p.next_position).map_err(bad)?;
            if p.lines == 0 {
                p.first_position = doc.position;
            }
            p.next_position = next;
            p.text.extend_from_slice(&line);
            if line.last() != Some(&b'\n') {
                p.text.push(b'\n');
            }
            p.lines += 1;
            if p.lines == FRAME_LINES {
                frames.push(flush(doc.split, p, &mut w, &mut offset).map_err(write_err)?);
            }
        }
    }
    for split in [Split::Train, Split::Eval] {
        let p = &mut pending[split.code() as usize];
        if p.lines > 0 {
            frames.push(flush(split, p, &mut w, &mut offset).map_err(write_err)?);
        }
    }
    // The zstd frame may end before the file does (padding, skippable frames): hash it all.
    let mut rest = decoder.finish();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| io_err(documents, e))?;
    let sha256 = rest.into_inner().digest();

    frames.sort_by_key(|f| (f.split.code(), f.first_position));
    for f in &frames {
        w.write_all(&f.to_bytes()).map_err(write_err)?;
    }
    let header = Header {
        stamp,
        sha256,
        frames: frames.len() as u64,
        table_offset: offset,
    };
    let mut file = w.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&header.to_bytes()))
        .and_then(|_| file.sync_all())
        .map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, out)
        .and_then(|_| sync_parent(out))
        .map_err(|e| DocumentsError::Write {
            path: out.to_owned(),
            source: e,
        })?;
    Ok(count)
}

/// Compresses a split's pending lines into one frame at `offset`.
fn flush(split: Split, p: &mut Pending, w: &mut impl Write, offset: &mut u64) -> io::Result<Frame> {
    let compressed = zstd::bulk::compress(&p.text, ZSTD_LEVEL)?;
    w.write_all(&compressed)?;
    let frame = Frame {
        split,
        lines: p.lines,
        first_position: p.first_position,
        end_position: p.next_position,
        offset: *offset,
        length: compressed.len() as u64,
    };
    *offset += compressed.len() as u64;
    p.text.clear();
    p.lines = 0;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Writes `documents.jsonl.zst` with `n` documents of random lengths, train and eval
    /// interleaved as the pipeline writes them; returns the lines.
    fn write_documents(dir: &Path, n: usize, seed: u64) -> Vec<DocumentLine<'static>> {
        let mut rng = SplitMix64::new(seed);
        let mut next = [0u64; 2];
        let mut docs = Vec::new();
        let mut text = Vec::new();
        for i in 0..n {
            let split = if rng.below(10) == 0 {
                Split::Eval
            } else {
                Split::Train
            };
            let tokens = 3 + rng.next_u64() % 300;
            let kept = if i == n - 1 { tokens / 2 + 1 } else { tokens };
            let doc = DocumentLine {
                split,
                id: format!("<urn:uuid:{seed}-{i}>").into(),
                file: format!("sample/10BT/{:03}_00000.parquet", i / 500).into(),
                row: i as u64 % 500,
                position: next[split.code() as usize],
                tokens,
                kept,
            };
            next[split.code() as usize] += kept;
            serde_json::to_writer(&mut text, &doc).unwrap();
            text.push(b'\n');
            docs.push(doc);
        }
        let z = zstd::stream::encode_all(&text[..], 3).unwrap();
        fs::write(dir.join(DOCUMENTS_FILE), z).unwrap();
        docs
    }

    /// The documents of a sequence by reading every line: what the sidecar must reproduce.
    fn scan(
        docs: &[DocumentLine],
        split: Split,
        seq_len: u64,
        seq: u64,
    ) -> Vec<(String, [u64; 2])> {
        let (start, end) = (seq * seq_len, (seq + 1) * seq_len);
        docs.iter()
            .filter(|d| d.split == split && d.position < end && d.position + d.kept > start)
            .map(|d| {
                let s = d.position.max(start) - start;
                let e = (d.position + d.kept).min(end) - start;
                (d.id.to_string(), [s, e])
            })
            .collect()
    }

    fn lookup(
        index: &DocumentIndex,
        split: Split,
        seq_len: u64,
        seq: u64,
    ) -> Vec<(String, [u64; 2])> {
        let found = index.sequence(split, seq_len, seq).unwrap();
        for d in &found {
            let [s, e] = d.document_tokens;
            assert!(s < e && e <= d.kept, "{d:?}");
            assert_eq!(e - s, d.sequence_tokens[1] - d.sequence_tokens[0]);
        }
        found
            .into_iter()
            .map(|d| (d.id, d.sequence_tokens))
            .collect()
    }

    #[test]
    fn every_sequence_matches_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        // More than two frames per split, so lookups cross frame boundaries.
        let docs = write_documents(dir.path(), 3 * FRAME_LINES as usize, 7);
        let (index, opened) = DocumentIndex::open(dir.path()).unwrap();
        assert_eq!(
            opened,
            Opened::Built {
                documents: docs.len() as u64
            }
        );
        assert!(index.frames.len() > 3, "{}", index.frames.len());
        for split in [Split::Train, Split::Eval] {
            let listed = docs.iter().filter(|d| d.split == split).count() as u64;
            assert_eq!(index.documents(split), listed);
            let end: u64 = docs
                .iter()
                .filter(|d| d.split == split)
                .map(|d| d.kept)
                .sum();
            for seq_len in [64, 1000] {
                for seq in 0..end.div_ceil(seq_len) + 1 {
                    let want = scan(&docs, split, seq_len, seq);
                    assert_eq!(
                        lookup(&index, split, seq_len, seq),
                        want,
                        "{split:?} {seq_len} {seq}"
                    );
                    // Tokens of a sequence inside the split are covered exactly once.
                    let covered: u64 = want.iter().map(|(_, [s, e])| e - s).sum();
                    assert_eq!(covered, end.saturating_sub(seq * seq_len).min(seq_len));
                }
            }
        }
        let first = &index.sequence(Split::Train, 64, 0).unwrap()[0];
        let line = docs.iter().find(|d| d.split == Split::Train).unwrap();
        assert_eq!((first.file.as_str(), first.row), (&*line.file, line.row));
    }

    #[test]
    fn a_current_sidecar_is_reused_and_a_stale_one_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        write_documents(dir.path(), 100, 1);
        assert!(matches!(
            DocumentIndex::open(dir.path()).unwrap().1,
            Opened::Built { .. }
        ));
        assert_eq!(DocumentIndex::open(dir.path()).unwrap().1, Opened::Current);

        // The same bytes under a new mtime: the sha256 vouches for the sidecar.
        let path = dir.path().join(DOCUMENTS_FILE);
        let bytes = fs::read(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, &bytes).unwrap();
        assert_eq!(DocumentIndex::open(dir.path()).unwrap().1, Opened::Current);

        // Other documents: rebuilt, and the answers are the new file's.
        let docs = write_documents(dir.path(), 100, 2);
        let (index, opened) = DocumentIndex::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Built { documents: 100 });
        assert_eq!(
            lookup(&index, Split::Train, 50, 3),
            scan(&docs, Split::Train, 50, 3)
        );

        // A damaged sidecar is rebuilt too.
        let sidecar = dir.path().join(DOCUMENTS_SIDECAR_FILE);
        let len = fs::metadata(&sidecar).unwrap().len();
        File::options()
            .write(true)
            .open(&sidecar)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(matches!(
            DocumentIndex::open(dir.path()).unwrap().1,
            Opened::Built { .. }
        ));
        assert!(!tmp_path(&sidecar).exists());
    }

    #[test]
    fn bad_input_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let err = DocumentIndex::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(DOCUMENTS_FILE) && err.contains("hint:"),
            "{err}"
        );

        let text = concat!(
            r#"{"split":"train","id":"a","file":"f","row":0,"position":0,"tokens":5,"kept":5}"#,
            "\n",
            r#"{"split":"train","id":"b","file":"f","row":1,"position":7,"tokens":5,"kept":5}"#,
            "\n"
        );
        let path = dir.path().join(DOCUMENTS_FILE);
        fs::write(&path, zstd::stream::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        let err = DocumentIndex::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("expected one at 5"),
            "{err}"
        );
        assert!(!dir.path().join(DOCUMENTS_SIDECAR_FILE).exists());
        assert!(!tmp_path(&dir.path().join(DOCUMENTS_SIDECAR_FILE)).exists());

        fs::write(
            &path,
            zstd::stream::encode_all(&b"{not json\n"[..], 3).unwrap(),
        )
        .unwrap();
        let err = DocumentIndex::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("hint:"), "{err}");
    }
}
