//! One split's token stream: the documents placed so far, back to back, and the shards they
//! reach (open while being written, then finished in order).

use std::collections::VecDeque;

use anyhow::Result;

use super::Layout;
use super::shard::OpenShard;
use crate::format::{FORMAT_VERSION, ShardEntry, ShardHeader, Split, SplitInfo};

/// One split's token stream: back-to-back documents, cut into `seq_len` sequences and
/// `sequences_per_shard`-sequence shards, up to the split's size.
pub(super) struct Stream {
    pub(super) layout: Layout,
    pub(super) split: Split,
    /// Tokens of the full split.
    pub(super) capacity: u64,
    /// Tokens placed so far (planned: written once the window that placed them is).
    pub(super) placed: u64,
    pub(super) documents: u64,
    pub(super) text_bytes: u64,
    /// Shards created and not yet completely written, in order.
    pub(super) open: VecDeque<OpenShard>,
    /// Shards created so far (finished, finishing or open).
    pub(super) created: u64,
    /// Finished shards, in order.
    pub(super) shards: Vec<ShardEntry>,
    /// Of those, the ones this run wrote (the rest were on disk already, identical).
    pub(super) shards_written: u64,
}

impl Stream {
    pub(super) fn new(layout: &Layout, split: Split, sequences: u64) -> Self {
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

    pub(super) fn full(&self) -> bool {
        self.placed == self.capacity
    }

    pub(super) fn shard_tokens(&self) -> u64 {
        self.layout.sequences_per_shard * self.layout.seq_len as u64
    }

    /// Creates the shards that the placed tokens reach.
    pub(super) fn open_through_placed(&mut self) -> Result<()> {
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
    pub(super) fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
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

    pub(super) fn into_info(self) -> SplitInfo {
        SplitInfo {
            sequences: self.capacity / self.layout.seq_len as u64,
            tokens: self.capacity,
            documents: self.documents,
            text_bytes: self.text_bytes,
            shards: self.shards,
        }
    }
}
