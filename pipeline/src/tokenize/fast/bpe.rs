//! The BPE merge loop on one chunk of symbol ids, with exactly the merge order of Hugging Face
//! `tokenizers` 0.23 (`models/bpe/word.rs`, `Word::merge_all`): repeatedly merge the adjacent pair
//! with the lowest merge rank, ties broken by the leftmost position, until no adjacent pair has a
//! merge. `merge_all` gets there with a heap of `(rank, pos)` entries that it re-validates on pop;
//! every valid pair is in its heap and stale entries are skipped, so it always merges the minimal
//! valid `(rank, pos)` pair, which is what both loops here do.
//!
//! Two loops, one order: [`merge_small`] rescans an array of pair ranks (O(n^2), but no heap and
//! no allocation: most chunks are one word of a few symbols); [`merge_large`] is the heap with a
//! linked list (O(n log n)), so a 1 MB chunk without spaces is not quadratic.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::MergeMap;

/// Chunks with at most this many symbols use [`merge_small`]; longer ones [`merge_large`].
pub(super) const SMALL_CHUNK_SYMBOLS: usize = 48;

/// No merge: larger than every real rank (ranks are indices into a list of < 2^32 merges).
const NO_RANK: u32 = u32::MAX;

/// Merges `syms` (initial symbol ids, left to right) in place and leaves the final ids.
pub(super) fn merge(merges: &MergeMap, syms: &mut Vec<u32>, large: &mut LargeBuffers) {
    if syms.len() <= SMALL_CHUNK_SYMBOLS {
        merge_small(merges, syms);
    } else {
        merge_large(merges, syms, large);
    }
}

/// [`merge_large`]'s list and heap, kept between calls so a long chunk costs no allocation
/// (with several tokenizer threads on one malloc arena, that allocation showed up at about 1%
/// of their time); capacity beyond [`KEPT_SYMBOLS`] is given back after the call.
#[derive(Default)]
pub(super) struct LargeBuffers {
    nodes: Vec<Node>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

/// Symbols' worth of [`LargeBuffers`] kept between calls: 64K (1.75 MiB).
const KEPT_SYMBOLS: usize = 1 << 16;

/// Array version: `ranks[i]`/`news[i]` describe the pair `(syms[i], syms[i + 1])`.
pub(super) fn merge_small(merges: &MergeMap, syms: &mut Vec<u32>) {
    let n = syms.len();
    if n < 2 {
        return;
    }
    if n > SMALL_CHUNK_SYMBOLS {
        // Only reached when called directly; `merge` sends long chunks to the heap.
        return merge_small_vec(merges, syms);
    }
    // A linked list in fixed arrays: symbol 0 is never absorbed (only right neighbours are), so
    // the list starts there; `next == n` ends it. `rank[i]`/`new[i]` describe the pair of live
    // symbol i and its next live symbol. No shifting, no allocation.
    const S: usize = SMALL_CHUNK_SYMBOLS;
    let lookup = |a: u32, b: u32| match merges.get(a, b) {
        Some(m) => (m.rank, m.new_id),
        None => (NO_RANK, 0),
    };
    let mut ids = [0u32; S];
    ids[..n].copy_from_slice(syms);
    let mut next = [0u8; S];
    let mut prev = [0u8; S];
    let mut rank = [NO_RANK; S];
    let mut new = [0u32; S];
    for i in 0..n {
        next[i] = (i + 1) as u8;
        prev[i] = i.wrapping_sub(1) as u8; // 255 (no previous) for i = 0; S < 255
    }
    for i in 0..n - 1 {
        (rank[i], new[i]) = lookup(ids[i], ids[i + 1]);
    }
    loop {
        // Lowest rank, leftmost on ties (strict `<` while walking left to right).
        let (mut best, mut at, mut i) = (NO_RANK, 0, 0);
        while i < n {
            if rank[i] < best {
                best = rank[i];
                at = i;
            }
            i = usize::from(next[i]);
        }
        if best == NO_RANK {
            break;
        }
        ids[at] = new[at];
        let after = usize::from(next[usize::from(next[at])]);
        next[at] = after as u8;
        (rank[at], new[at]) = if after < n {
            prev[after] = at as u8;
            lookup(ids[at], ids[after])
        } else {
            (NO_RANK, 0)
        };
        if at > 0 {
            let p = usize::from(prev[at]);
            (rank[p], new[p]) = lookup(ids[p], ids[at]);
        }
    }
    syms.clear();
    let mut i = 0;
    while i < n {
        syms.push(ids[i]);
        i = usize::from(next[i]);
    }
}

/// [`merge_small`]'s loop with heap-allocated rank arrays, for any length (tests only use it to
/// cross-check the heap loop on long inputs).
fn merge_small_vec(merges: &MergeMap, syms: &mut Vec<u32>) {
    loop {
        let mut best = (NO_RANK, 0usize, 0u32);
        for i in 0..syms.len().saturating_sub(1) {
            if let Some(m) = merges.get(syms[i], syms[i + 1])
                && m.rank < best.0
            {
                best = (m.rank, i, m.new_id);
            }
        }
        if best.0 == NO_RANK {
            return;
        }
        syms[best.1] = best.2;
        syms.remove(best.1 + 1);
    }
}

/// One symbol of the linked list; `gone` marks a symbol absorbed by its left neighbour.
#[derive(Clone, Copy)]
struct Node {
    id: u32,
    prev: u32,
    next: u32,
    gone: bool,
}

const NONE: u32 = u32::MAX;

/// Heap version, a transcription of `Word::merge_all` (without dropout): entries are
/// `(rank, pos, new_id)` with `pos` the left symbol's original index, popped smallest first; an
/// entry is stale when its left symbol was absorbed or its pair no longer merges into `new_id`.
pub(super) fn merge_large(merges: &MergeMap, syms: &mut Vec<u32>, large: &mut LargeBuffers) {
    let n = syms.len();
    if n < 2 {
        return;
    }
    let LargeBuffers { nodes, heap } = large;
    nodes.clear();
    nodes.extend((0..n).map(|i| Node {
        id: syms[i],
        prev: if i == 0 { NONE } else { i as u32 - 1 },
        next: if i + 1 == n { NONE } else { i as u32 + 1 },
        gone: false,
    }));
    heap.clear();
    heap.extend((0..n - 1).filter_map(|i| {
        merges
            .get(syms[i], syms[i + 1])
            .map(|m| Reverse((m.rank, i as u32, m.new_id)))
    }));
    while let Some(Reverse((_, pos, new_id))) = heap.pop() {
        let left = nodes[pos as usize];
        if left.gone || left.next == NONE {
            continue;
        }
        let right = nodes[left.next as usize];
        match merges.get(left.id, right.id) {
            Some(m) if m.new_id == new_id => {}
            _ => continue,
        }
        nodes[pos as usize].id = new_id;
        nodes[pos as usize].next = right.next;
        nodes[left.next as usize].gone = true;
        if right.next != NONE {
            nodes[right.next as usize].prev = pos;
        }
        if left.prev != NONE
            && let Some(m) = merges.get(nodes[left.prev as usize].id, new_id)
        {
            heap.push(Reverse((m.rank, left.prev, m.new_id)));
        }
        if right.next != NONE
            && let Some(m) = merges.get(new_id, nodes[right.next as usize].id)
        {
            heap.push(Reverse((m.rank, pos, m.new_id)));
        }
    }
    syms.clear();
    syms.extend(nodes.iter().filter(|n| !n.gone).map(|n| n.id));
    nodes.shrink_to(KEPT_SYMBOLS);
    heap.shrink_to(KEPT_SYMBOLS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::fast::Merge;

    /// a=1 b=2 c=3; ab=4 (rank 0), bc=5 (rank 1), abc=6 via (ab, c) rank 2; aa=7 rank 3.
    fn toy() -> MergeMap {
        let m = [
            ((1, 2), Merge { rank: 0, new_id: 4 }),
            ((2, 3), Merge { rank: 1, new_id: 5 }),
            ((4, 3), Merge { rank: 2, new_id: 6 }),
            ((1, 1), Merge { rank: 3, new_id: 7 }),
        ];
        MergeMap::new(&m.into_iter().collect()).unwrap()
    }

    thread_local! {
        /// Shared by every call of a test, so the heap loop also runs on buffers left by others.
        static LARGE: std::cell::RefCell<LargeBuffers> = Default::default();
    }

    fn all_loops(merges: &MergeMap, input: &[u32]) -> Vec<u32> {
        let mut a = input.to_vec();
        merge_small_vec(merges, &mut a);
        let mut b = input.to_vec();
        LARGE.with(|l| merge_large(merges, &mut b, &mut l.borrow_mut()));
        assert_eq!(a, b, "loops disagree on {input:?}");
        if input.len() <= SMALL_CHUNK_SYMBOLS {
            let mut c = input.to_vec();
            merge_small(merges, &mut c);
            assert_eq!(a, c, "small loop disagrees on {input:?}");
        }
        a
    }

    #[test]
    fn lowest_rank_first_then_leftmost() {
        let m = toy();
        // "abc": ab (rank 0) before bc (rank 1), then (ab, c) -> abc.
        assert_eq!(all_loops(&m, &[1, 2, 3]), [6]);
        // "aaa": two candidate (a, a) pairs of equal rank: the left one wins -> aa a.
        assert_eq!(all_loops(&m, &[1, 1, 1]), [7, 1]);
        // "aaab": ab (rank 0) first takes the last a, then the leftmost (a, a).
        assert_eq!(all_loops(&m, &[1, 1, 1, 2]), [7, 4]);
        assert_eq!(all_loops(&m, &[3, 2, 1]), [3, 2, 1]);
        assert_eq!(all_loops(&m, &[]), Vec::<u32>::new());
    }

    #[test]
    fn loops_agree_on_long_inputs() {
        let m = toy();
        // Deterministic pseudo-random sequences over {a, b, c}, long enough for both loops.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in [2usize, 3, 7, 47, 48, 49, 200, 1000] {
            for _ in 0..20 {
                let input: Vec<u32> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        1 + (x % 3) as u32
                    })
                    .collect();
                all_loops(&m, &input);
            }
        }
    }
}
