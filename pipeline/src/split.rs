//! Which documents are held out for evaluation: a fixed rule on the document `id` alone.
//!
//! A document is *eval* when the first 8 bytes of `sha256(id)`, read as a big-endian u64, fall
//! below 2% of the u64 range. The rule ignores the seed, the budget and the document's position,
//! so the eval set never changes with `--tokens`, a document can never be in both splits, and the
//! same document lands in the same split in any dataset made from FineWeb-Edu.
//! At 2% a 1.97B-token run (`configs/bitnet-95m.toml`) sees about 39M eval tokens, far above the
//! default 10,000 x 1,024.

use sha2::{Digest, Sha256};

use crate::format::Split;

/// Fraction of documents routed to eval, as a description for the manifest and README.
pub const EVAL_RULE: &str = "eval iff u64_be(sha256(id)[0..8]) < 2% of 2^64";
/// 2% of 2^64.
const EVAL_THRESHOLD: u64 = (u64::MAX / 100) * 2;

/// The split of the document with this `id`.
pub fn route(id: &str) -> Split {
    let h = Sha256::digest(id.as_bytes());
    let x = u64::from_be_bytes(h[..8].try_into().expect("sha256 has 32 bytes"));
    if x < EVAL_THRESHOLD {
        Split::Eval
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_two_percent_go_to_eval_and_the_rule_is_pinned() {
        let n = 100_000;
        let eval = (0..n)
            .filter(|i| route(&format!("<urn:uuid:{i}>")) == Split::Eval)
            .count();
        assert!((1_800..2_200).contains(&eval), "{eval}");
        // Pinned: changing the rule changes every eval set.
        let pinned: Vec<Split> = ["a", "b", "<urn:uuid:0>"]
            .iter()
            .map(|s| route(s))
            .collect();
        assert_eq!(pinned, [Split::Train, Split::Train, Split::Train]);
        let first_eval = (0..)
            .find(|i| route(&i.to_string()) == Split::Eval)
            .unwrap();
        assert_eq!(first_eval, FIRST_EVAL);
    }

    const FIRST_EVAL: u32 = 51;
}
