//! Planning (serial, no I/O): places the next documents of the seeded order in their splits and
//! cuts them into stretches, reading only the work file's index.

use super::stream::Stream;
use super::{Assembler, NEW_SHARDS_PER_WINDOW};
use crate::work::WorkReader;

/// A document placed in its split: its position there and how many of its tokens fit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placed {
    /// Record index in the work file.
    pub(super) doc: u32,
    pub(super) position: u64,
    pub(super) kept: u32,
}

impl Assembler {
    /// Places the next documents of `docs` (the seeded order), up to `stretches` stretches or
    /// [`NEW_SHARDS_PER_WINDOW`] new shards (give or take the last document): each document's
    /// position in its split and how many of its tokens fit. Reads only the work file's index.
    pub(super) fn plan(
        &mut self,
        reader: &WorkReader,
        docs: &mut std::slice::Iter<'_, u32>,
        stretches: usize,
    ) -> Vec<Vec<Placed>> {
        let mut window = Vec::new();
        let (mut stretch, mut tokens) = (Vec::new(), 0);
        let room = |s: &Stream| s.placed < (s.created + NEW_SHARDS_PER_WINDOW) * s.shard_tokens();
        while window.len() < stretches && !self.done() && self.streams.iter().all(room) {
            let Some(&doc) = docs.next() else { break };
            let s = &mut self.streams[reader.split(doc as usize) as usize];
            if s.full() {
                continue;
            }
            let kept = (reader.tokens(doc as usize) as u64).min(s.capacity - s.placed);
            stretch.push(Placed {
                doc,
                position: s.placed,
                kept: kept as u32,
            });
            s.placed += kept;
            s.documents += 1;
            tokens += kept;
            if tokens >= self.stretch_tokens {
                window.push(std::mem::take(&mut stretch));
                tokens = 0;
            }
        }
        if !stretch.is_empty() {
            window.push(stretch);
        }
        window
    }
}
