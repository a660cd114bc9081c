//! A shard being written by the stretches of a window, at offsets of its `.tmp` file: a thread
//! of its own hashes the payload as far as it is written, then seals it ([`format::shard::seal`])
//! or, on a resumed run, keeps the identical shard already there.
//!
//! [`format::shard::seal`]: crate::format::shard::seal

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::WRITE_BYTES;
use crate::crash;
use crate::format::shard::{HEADER_BYTES, ShardHeader, seal, start_writeback};
use crate::format::{ShardEntry, Split, tmp_path};
use crate::outdir::WRITE_HINT;

/// A shard being written: `<name>.tmp`, written at offsets by the stretches. A thread of its own
/// hashes the payload as far as it is written (told after each window), so hashing overlaps the
/// next windows and the shards of a file hash in parallel; once the last byte is hashed, the
/// thread writes the header, fsyncs and renames ([`finish_shard`]).
pub(super) struct OpenShard {
    pub(super) path: PathBuf,
    pub(super) file: Arc<File>,
    /// Taken for each write (see `write_at`).
    pub(super) write_turn: Mutex<()>,
    /// Position of the shard's first token in the split's stream.
    pub(super) start: u64,
    /// Payload tokens.
    pub(super) tokens: u64,
    /// Payload tokens written so far (as last told to the thread).
    pub(super) written: u64,
    /// Tells the thread how many payload tokens are written; `None` once all are.
    pub(super) to_thread: Option<Sender<u64>>,
    pub(super) thread: JoinHandle<Result<(ShardEntry, bool)>>,
    /// The `shard started` crash point was passed.
    pub(super) started: bool,
}

/// A shard whose every byte is written; its thread finishes it.
pub(super) struct Finishing {
    pub(super) split: Split,
    pub(super) thread: JoinHandle<Result<(ShardEntry, bool)>>,
}

impl OpenShard {
    /// `header` is final but for the payload hash.
    pub(super) fn create(path: PathBuf, header: ShardHeader, start: u64) -> Result<Self> {
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
    pub(super) fn end(&self) -> u64 {
        self.start + self.tokens
    }

    /// Writes `bytes` at token `offset` of the payload, and starts their writeback.
    pub(super) fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
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
    pub(super) fn written_through(&mut self, position: u64) {
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
/// time; once all of it is hashed, seals it. When the final name
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
        seal(file, &header, path).with_context(ctx)?;
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
