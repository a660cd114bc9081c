//! One shard file: a 1,024-byte little-endian header, then `num_sequences * seq_len` u16 tokens.
//!
//! The header carries everything needed to use the file on its own (seq_len, vocab, BOS/EOS, the
//! position of its first sequence in the split) and a sha256 of the payload, so a reader can check
//! a shard against the manifest without hashing gigabytes; `verify` re-hashes the payload.
//! Writing goes to `<name>.tmp`, and [`seal`] writes the header, fsyncs and renames: a file under
//! its final name is always complete. The layout is documented byte by byte in `shards/README.md`.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::{FORMAT_VERSION, tmp_path};

/// First 8 bytes of every shard.
pub const MAGIC: [u8; 8] = *b"TOKSHARD";
/// Size of the header; the token payload starts here.
pub const HEADER_BYTES: usize = 1024;
/// Width of one token in the payload.
pub const TOKEN_BYTES: usize = 2;
/// Largest vocabulary whose ids fit the payload's u16 tokens.
pub const MAX_VOCAB: u32 = 65_536;
/// Offset of the header's own checksum (first 8 bytes of sha256 of bytes 0..1016).
const HEADER_CHECKSUM_AT: usize = HEADER_BYTES - 8;
/// Start of the reserved bytes (zero up to the checksum).
const RESERVED: usize = 96;

/// Errors a shard reader can report; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: not a token shard (bad magic {found:?}); hint: is this a shard folder made by `pipeline prepare`?"
    )]
    BadMagic { path: PathBuf, found: [u8; 8] },
    #[error(
        "{path}: shard format version {found}, this build reads version {expected}; hint: re-run `pipeline prepare` with this version"
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "{path}: header checksum mismatch (the header was modified or damaged); hint: re-run the same `pipeline prepare` with --force to repair it"
    )]
    HeaderChecksum { path: PathBuf },
    #[error("{path}: header field `{field}` is invalid: {detail}")]
    BadField {
        path: PathBuf,
        field: &'static str,
        detail: String,
    },
    #[error(
        "{path}: {actual} bytes on disk, the header promises {expected} (truncated or padded); hint: re-run the same `pipeline prepare` with --force to repair it"
    )]
    Size {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{path}: payload sha256 {actual} differs from {expected}; hint: the shard is corrupt, re-run the same `pipeline prepare` with --force to repair it"
    )]
    PayloadHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl FormatError {
    fn io(path: &Path, source: io::Error) -> Self {
        FormatError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Which split a shard belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            Split::Train => 0,
            Split::Eval => 1,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Split::Train),
            1 => Some(Split::Eval),
            _ => None,
        }
    }

    /// File name of shard `index` of this split: `train-00000.bin`, `eval-00003.bin`.
    pub fn shard_file_name(self, index: usize) -> String {
        format!("{}-{index:05}.bin", self.name())
    }
}

/// Whether `name` is a shard file name of either split, or a temporary of one
/// (`train-00002.bin.tmp`).
pub fn is_shard_file(name: &str) -> bool {
    (name.starts_with("train-") || name.starts_with("eval-"))
        && (name.ends_with(".bin") || name.ends_with(".bin.tmp"))
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "eval" => Ok(Split::Eval),
            other => Err(format!(
                "unknown split `{other}`; expected `train` or `eval`"
            )),
        }
    }
}

/// The decoded 1,024-byte header of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    pub format_version: u32,
    pub split: Split,
    pub seq_len: u32,
    pub vocab_size: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    /// Position of this shard in its split (0 for `train-00000.bin`).
    pub shard_index: u64,
    pub num_sequences: u64,
    /// Index, within the split, of this shard's first sequence.
    pub first_sequence: u64,
    /// sha256 of the payload (all bytes after the header).
    pub payload_sha256: [u8; 32],
}

impl ShardHeader {
    /// Bytes of one sequence in the payload.
    pub fn sequence_bytes(&self) -> u64 {
        self.seq_len as u64 * TOKEN_BYTES as u64
    }

    /// Exact size of the file this header describes.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.num_sequences * self.sequence_bytes()
    }

    pub fn payload_sha256_hex(&self) -> String {
        hex::encode(self.payload_sha256)
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.split.code().to_le_bytes());
        b[20..24].copy_from_slice(&(TOKEN_BYTES as u32).to_le_bytes());
        b[24..28].copy_from_slice(&self.seq_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[32..36].copy_from_slice(&self.bos_id.to_le_bytes());
        b[36..40].copy_from_slice(&self.eos_id.to_le_bytes());
        b[40..48].copy_from_slice(&self.shard_index.to_le_bytes());
        b[48..56].copy_from_slice(&self.num_sequences.to_le_bytes());
        b[56..64].copy_from_slice(&self.first_sequence.to_le_bytes());
        b[64..96].copy_from_slice(&self.payload_sha256);
        let check = header_checksum(&b);
        b[HEADER_CHECKSUM_AT..].copy_from_slice(&check);
        b
    }

    /// Decodes and validates a header; `path` only names the file in errors.
    pub fn decode(b: &[u8], path: &Path) -> Result<Self, FormatError> {
        let p = || path.to_owned();
        if b.len() < HEADER_BYTES {
            return Err(FormatError::Size {
                path: p(),
                expected: HEADER_BYTES as u64,
                actual: b.len() as u64,
            });
        }
        let magic: [u8; 8] = b[0..8].try_into().expect("8-byte slice");
        if magic != MAGIC {
            return Err(FormatError::BadMagic {
                path: p(),
                found: magic,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4-byte slice"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8-byte slice"));
        let format_version = u32_at(8);
        if format_version != FORMAT_VERSION {
            return Err(FormatError::Version {
                path: p(),
                found: format_version,
                expected: FORMAT_VERSION,
            });
        }
        if b[HEADER_CHECKSUM_AT..HEADER_BYTES] != header_checksum(&b[..HEADER_BYTES]) {
            return Err(FormatError::HeaderChecksum { path: p() });
        }
        let bad = |field, detail: String| FormatError::BadField {
            path: p(),
            field,
            detail,
        };
        if u32_at(12) as usize != HEADER_BYTES {
            return Err(bad(
                "header_bytes",
                format!("{} != {HEADER_BYTES}", u32_at(12)),
            ));
        }
        if u32_at(20) as usize != TOKEN_BYTES {
            return Err(bad(
                "token_bytes",
                format!("{} != {TOKEN_BYTES}", u32_at(20)),
            ));
        }
        let split = Split::from_code(u32_at(16))
            .ok_or_else(|| bad("split", format!("unknown split code {}", u32_at(16))))?;
        let seq_len = u32_at(24);
        if seq_len < 2 {
            return Err(bad("seq_len", format!("{seq_len} < 2")));
        }
        let vocab_size = u32_at(28);
        if vocab_size == 0 || vocab_size > MAX_VOCAB {
            return Err(bad(
                "vocab_size",
                format!("{vocab_size} does not fit u16 tokens"),
            ));
        }
        let num_sequences = u64_at(48);
        // The size the header promises is computed before the file is compared with it; a count
        // no file can hold must be an error, not an overflow.
        if num_sequences
            .checked_mul(seq_len as u64 * TOKEN_BYTES as u64)
            .and_then(|n| n.checked_add(HEADER_BYTES as u64))
            .is_none()
        {
            return Err(bad(
                "num_sequences",
                format!("{num_sequences} sequences of {seq_len} tokens exceed any file size"),
            ));
        }
        // Zero as written; a header that carries something there was not made by this format.
        if let Some(i) = b[RESERVED..HEADER_CHECKSUM_AT].iter().position(|&x| x != 0) {
            return Err(bad(
                "reserved",
                format!("byte {} is not zero", RESERVED + i),
            ));
        }
        Ok(ShardHeader {
            format_version,
            split,
            seq_len,
            vocab_size,
            bos_id: u32_at(32),
            eos_id: u32_at(36),
            shard_index: u64_at(40),
            num_sequences,
            first_sequence: u64_at(56),
            payload_sha256: b[64..96].try_into().expect("32-byte slice"),
        })
    }

    /// Reads and validates only the header of `path` (cheap: 1 KiB), and checks the file size.
    pub fn read_from(path: &Path) -> Result<Self, FormatError> {
        let mut f = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let mut b = [0u8; HEADER_BYTES];
        let len = f.metadata().map_err(|e| FormatError::io(path, e))?.len();
        if len < HEADER_BYTES as u64 {
            return Err(FormatError::Size {
                path: path.to_owned(),
                expected: HEADER_BYTES as u64,
                actual: len,
            });
        }
        f.read_exact(&mut b).map_err(|e| FormatError::io(path, e))?;
        let h = Self::decode(&b, path)?;
        if len != h.file_bytes() {
            return Err(FormatError::Size {
                path: path.to_owned(),
                expected: h.file_bytes(),
                actual: len,
            });
        }
        Ok(h)
    }
}

fn header_checksum(b: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(&b[..HEADER_CHECKSUM_AT]);
    d[..8].try_into().expect("sha256 has 32 bytes")
}

/// A shard opened for reading through a memory map; no shard is ever read into memory whole.
#[derive(Debug)]
pub struct ShardReader {
    path: PathBuf,
    header: ShardHeader,
    map: Mmap,
}

impl ShardReader {
    /// Opens `path`, validates its header and checks that the file size matches it exactly.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: shards are written once under a temporary name and renamed into place; nothing in
        // this toolkit writes to a file under its final name afterwards. Another process truncating
        // the file while it is mapped would be outside that contract (as for any mmap reader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let header = ShardHeader::decode(&map, path)?;
        if map.len() as u64 != header.file_bytes() {
            return Err(FormatError::Size {
                path: path.to_owned(),
                expected: header.file_bytes(),
                actual: map.len() as u64,
            });
        }
        Ok(ShardReader {
            path: path.to_owned(),
            header,
            map,
        })
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_sequences(&self) -> usize {
        self.header.num_sequences as usize
    }

    /// The raw little-endian bytes of sequence `i` (relative to this shard).
    pub fn sequence_bytes(&self, i: usize) -> &[u8] {
        assert!(i < self.num_sequences(), "sequence {i} out of range");
        let n = self.header.sequence_bytes() as usize;
        let start = HEADER_BYTES + i * n;
        &self.map[start..start + n]
    }

    /// Copies sequence `i` (relative to this shard) into `out`, widening to u32.
    pub fn copy_sequence(&self, i: usize, out: &mut [u32]) {
        let bytes = self.sequence_bytes(i);
        assert_eq!(
            out.len() * TOKEN_BYTES,
            bytes.len(),
            "output length != seq_len"
        );
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(TOKEN_BYTES)) {
            *o = u16::from_le_bytes([b[0], b[1]]) as u32;
        }
    }

    /// Re-hashes the payload and compares it with the header.
    pub fn verify_payload(&self) -> Result<(), FormatError> {
        let actual = Sha256::digest(&self.map[HEADER_BYTES..]);
        if actual.as_slice() != self.header.payload_sha256 {
            return Err(FormatError::PayloadHash {
                path: self.path.clone(),
                expected: self.header.payload_sha256_hex(),
                actual: hex::encode(actual),
            });
        }
        Ok(())
    }
}

/// Streams sequences into `<path>.tmp`, one after the other; [`ShardWriter::finish`] seals it.
/// For synthetic datasets and tests: `prepare` writes each shard in parallel stretches, at
/// offsets, and seals it with the same [`seal`].
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    header: ShardHeader,
    hasher: Sha256,
    bytes: Vec<u8>,
    writeback: Writeback,
}

impl ShardWriter {
    /// `header.num_sequences` and `header.payload_sha256` are filled in by `finish`.
    pub fn create(path: &Path, header: ShardHeader) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp_path(path))?);
        out.write_all(&[0u8; HEADER_BYTES])?;
        Ok(ShardWriter {
            path: path.to_owned(),
            out,
            header: ShardHeader {
                num_sequences: 0,
                payload_sha256: [0; 32],
                ..header
            },
            hasher: Sha256::new(),
            bytes: Vec::new(),
            writeback: Writeback::default(),
        })
    }

    /// Appends one sequence of exactly `seq_len` tokens.
    pub fn push(&mut self, tokens: &[u16]) -> io::Result<()> {
        assert_eq!(
            tokens.len(),
            self.header.seq_len as usize,
            "sequence length != seq_len"
        );
        self.bytes.clear();
        self.bytes
            .extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
        self.hasher.update(&self.bytes);
        self.out.write_all(&self.bytes)?;
        self.header.num_sequences += 1;
        let on_disk = self.header.file_bytes() - self.out.buffer().len() as u64;
        self.writeback.wrote(self.out.get_ref(), on_disk);
        Ok(())
    }

    pub fn num_sequences(&self) -> u64 {
        self.header.num_sequences
    }

    /// Seals the shard ([`seal`]) and returns its final header.
    pub fn finish(self) -> io::Result<ShardHeader> {
        let header = ShardHeader {
            payload_sha256: self.hasher.finalize().into(),
            ..self.header
        };
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        seal(&file, &header, &self.path)?;
        Ok(header)
    }
}

/// Finishes a shard whose payload is written: `file` is `<path>.tmp`, opened for writing, with
/// [`HEADER_BYTES`] reserved at its start. Writes `header` there, fsyncs, renames the file to
/// `path` and fsyncs the folder, so a file under a shard's name is always complete. Every shard
/// is sealed here, whoever wrote its payload.
pub fn seal(file: &File, header: &ShardHeader, path: &Path) -> io::Result<()> {
    let mut at_start = file;
    at_start.seek(SeekFrom::Start(0))?;
    at_start.write_all(&header.encode())?;
    file.sync_all()?;
    fs::rename(tmp_path(path), path)?;
    sync_parent(path)
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Starts the kernel writing a growing file to disk every [`WRITEBACK_BYTES`], so the fsync that
/// finishes it waits for the last stretch only, not for the whole file (gigabytes for a work
/// file of a full FineWeb-Edu parquet file, 256 MiB for a shard). Linux:
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which queues the writeback and returns; elsewhere
/// nothing. Durability still comes from the fsync.
#[derive(Debug, Default)]
pub struct Writeback {
    started: u64,
}

/// Bytes written between two writeback starts.
pub const WRITEBACK_BYTES: u64 = 32 << 20;

impl Writeback {
    /// `file` now holds `len` bytes written through its descriptor.
    pub fn wrote(&mut self, file: &File, len: u64) {
        if len < self.started + WRITEBACK_BYTES {
            return;
        }
        start_writeback(file, self.started, len - self.started);
        self.started = len;
    }
}

/// Queues the writeback of `len` bytes of `file` from `offset` and returns (Linux:
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing). Advisory: durability comes from
/// the fsync, which then waits for less.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor and a byte range; the call only queues writeback and
        // touches no memory of ours. Its result is advisory, so errors are ignored.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// fsyncs the folder holding `path`, so a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n: u64) -> ShardHeader {
        ShardHeader {
            format_version: FORMAT_VERSION,
            split: Split::Eval,
            seq_len: 4,
            vocab_size: 32000,
            bos_id: 1,
            eos_id: 2,
            shard_index: 3,
            num_sequences: n,
            first_sequence: 12,
            payload_sha256: [0; 32],
        }
    }

    #[test]
    fn header_round_trips_and_lays_out_fields_as_documented() {
        let mut h = header(7);
        h.payload_sha256 = [0xab; 32];
        let b = h.encode();
        assert_eq!(&b[0..8], b"TOKSHARD");
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 4);
        assert_eq!(u64::from_le_bytes(b[48..56].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(b[56..64].try_into().unwrap()), 12);
        assert_eq!(ShardHeader::decode(&b, Path::new("x")).unwrap(), h);
    }

    #[test]
    fn any_flipped_header_byte_is_rejected() {
        let b = header(7).encode();
        for i in 0..HEADER_BYTES {
            let mut c = b;
            c[i] ^= 0x40;
            assert!(ShardHeader::decode(&c, Path::new("x")).is_err(), "byte {i}");
        }
    }

    /// `b` with a valid header checksum again: what a hostile writer, not a disk, produces.
    fn resealed(mut b: [u8; HEADER_BYTES]) -> [u8; HEADER_BYTES] {
        let check = header_checksum(&b);
        b[HEADER_CHECKSUM_AT..].copy_from_slice(&check);
        b
    }

    #[test]
    fn a_sequence_count_no_file_can_hold_is_an_error_not_an_overflow() {
        // Found by the hostile-bytes test: the size check multiplied num_sequences unchecked.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-00001.bin");
        for n in [u64::MAX, u64::MAX / 2, 1 << 62] {
            let mut b = header(1).encode();
            b[48..56].copy_from_slice(&n.to_le_bytes());
            let b = resealed(b);
            let err = ShardHeader::decode(&b, &path).unwrap_err();
            assert!(err.to_string().contains("num_sequences"), "{err}");
            fs::write(&path, b).unwrap();
            assert!(ShardHeader::read_from(&path).is_err());
            assert!(ShardReader::open(&path).is_err());
        }
    }

    #[test]
    fn reserved_bytes_must_be_zero_even_under_a_valid_checksum() {
        // Found by the hostile-bytes test: a resealed header with data in its reserved bytes
        // decoded as the original.
        for at in [RESERVED, 500, HEADER_CHECKSUM_AT - 1] {
            let mut b = header(1).encode();
            b[at] = 0x80;
            let err = ShardHeader::decode(&resealed(b), Path::new("x")).unwrap_err();
            assert!(err.to_string().contains("reserved"), "{err}");
        }
    }

    #[test]
    fn writer_then_reader_round_trip_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(Split::Eval.shard_file_name(3));
        let mut w = ShardWriter::create(&path, header(0)).unwrap();
        w.push(&[1, 2, 3, 65535]).unwrap();
        w.push(&[9, 8, 7, 6]).unwrap();
        assert!(!path.exists(), "final name appears only on finish");
        let h = w.finish().unwrap();
        assert_eq!(h.num_sequences, 2);
        assert!(!tmp_path(&path).exists());

        let r = ShardReader::open(&path).unwrap();
        r.verify_payload().unwrap();
        let mut out = [0u32; 4];
        r.copy_sequence(0, &mut out);
        assert_eq!(out, [1, 2, 3, 65535]);
        r.copy_sequence(1, &mut out);
        assert_eq!(out, [9, 8, 7, 6]);
        drop(r);

        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 5] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = ShardReader::open(&path)
            .unwrap()
            .verify_payload()
            .unwrap_err();
        assert!(matches!(err, FormatError::PayloadHash { .. }), "{err}");

        bytes.truncate(bytes.len() - 2);
        fs::write(&path, &bytes).unwrap();
        let err = ShardReader::open(&path).unwrap_err();
        assert!(matches!(err, FormatError::Size { .. }), "{err}");
        assert!(err.to_string().contains("eval-00003.bin"), "{err}");
    }
}
