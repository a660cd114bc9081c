//! Writing the documents index (`documents.jsonl.zst`, its lines are
//! [`DocumentLine`](crate::format::DocumentLine)): one JSON line per document, in the order of
//! the splits' streams, compressed on a thread of its own.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

use crate::format::shard::sync_parent;
use crate::format::tmp_path;
use crate::outdir::WRITE_HINT;
use anyhow::{Context, Result};

/// Streams JSON lines through zstd into `<path>.tmp`, then fsync + rename. Compression runs on a
/// thread of its own, fed [`INDEX_BATCH_BYTES`] of lines at a time, so it overlaps the writing
/// of the shards.
pub(super) struct IndexWriter {
    pub(super) path: PathBuf,
    pub(super) batch: Vec<u8>,
    /// `None` once the thread stopped (on an error: its result says why).
    pub(super) to_thread: Option<SyncSender<Vec<u8>>>,
    pub(super) thread: Option<JoinHandle<Result<File>>>,
}

/// JSON lines handed to the compressing thread at once.
const INDEX_BATCH_BYTES: usize = 256 << 10;

impl IndexWriter {
    pub(super) fn create(path: &Path) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp)
            .with_context(|| format!("cannot create {}; {WRITE_HINT}", tmp.display()))?;
        let mut enc = zstd::stream::Encoder::new(std::io::BufWriter::new(file), 3)
            .with_context(|| format!("cannot start zstd for {}", tmp.display()))?;
        // The frame's content checksum: without it a flipped byte of the compressed stream can
        // decode to other documents and positions without an error (`zstd -t` checks it too).
        enc.include_checksum(true)
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
    pub(super) fn push_lines(&mut self, lines: &[u8]) -> Result<()> {
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

    pub(super) fn finish(mut self) -> Result<()> {
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

    /// Found by the hostile-bytes test: without the frame checksum, single flipped bits in the
    /// compressed index decoded to other lines. Now every flip is an error or (in bits zstd does
    /// not read) decodes to the same lines.
    #[test]
    fn every_flipped_bit_of_the_index_is_an_error_or_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl.zst");
        let mut lines = String::new();
        for i in 0..50 {
            lines.push_str(&format!(
                "{{\"split\":\"train\",\"id\":\"<urn:uuid:{i:04}>\",\"file\":\"f\",\"row\":{i},\"position\":{},\"tokens\":{},\"kept\":{}}}\n",
                i * 300,
                100 + i,
                100 + i
            ));
        }
        let mut w = IndexWriter::create(&path).unwrap();
        w.push_lines(lines.as_bytes()).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            zstd::stream::decode_all(&bytes[..]).unwrap(),
            lines.as_bytes()
        );
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(text) = zstd::stream::decode_all(&b[..]) {
                    assert_eq!(text, lines.as_bytes(), "byte {i} bit {bit}");
                }
            }
        }
    }
}
