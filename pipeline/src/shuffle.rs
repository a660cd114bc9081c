//! Seeded, platform-independent shuffles (file order, document order within a file).
//!
//! The workspace's generator ([`SplitMix64`]) and Fisher–Yates, written out here rather than
//! taken from a crate, because the shard bytes depend on them: a dependency update must never
//! change a dataset.

use sha2::{Digest, Sha256};

use crate::rng::SplitMix64;

/// A 64-bit stream key derived from the seed and a label (e.g. a file path), so each file gets its
/// own independent permutation that depends only on the seed and the file's name.
pub fn key(seed: u64, label: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(label.as_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("sha256 has 32 bytes"))
}

/// Fisher–Yates shuffle of `items` with the stream `key`.
pub fn shuffle<T>(items: &mut [T], key: u64) {
    let mut rng = SplitMix64::new(key);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// A seeded permutation of `0..n`.
pub fn permutation(n: usize, key: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    shuffle(&mut p, key);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_is_stable() {
        let p = permutation(1000, key(42, "a"));
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(p, permutation(1000, key(42, "a")));
        assert_ne!(p, permutation(1000, key(42, "b")));
        // The generator's own values are pinned in `rng`.
        assert_eq!(
            &permutation(5, key(42, "x"))[..],
            &permutation(5, key(42, "x"))[..]
        );
    }
}
