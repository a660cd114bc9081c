//! Writing a window (parallel, on the current rayon pool): each stretch copies its documents'
//! token bytes into the shards with one `pwrite` per MiB of each split and formats their index
//! lines; the index lines then go out in order.

use anyhow::Result;
use rayon::prelude::*;

use super::plan::Placed;
use super::shard::Finishing;
use super::stream::Stream;
use super::{Assembler, WRITE_BYTES};
use crate::crash;
use crate::format::DocumentLine;
use crate::work::WorkReader;

/// What a written stretch hands back: its index lines, in order, and the text bytes it added per
/// split.
struct Written {
    lines: Vec<u8>,
    text_bytes: [u64; 2],
}

impl Assembler {
    /// Writes `window`, its stretches in parallel; then lets the shards' threads hash as far as
    /// it wrote, and hands over the shards it completed. The index lines go out in order, so the
    /// documents index is that of a serial run.
    pub(super) fn write(
        &mut self,
        reader: &WorkReader,
        file: &str,
        window: &[Vec<Placed>],
    ) -> Result<()> {
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
            &DocumentLine {
                split: doc.head.split,
                id: doc.head.id.into(),
                file: file.into(),
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
