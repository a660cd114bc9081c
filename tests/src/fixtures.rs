//! Paths to the fixtures shipped in `tests/fixtures/` (see `tests/fixtures/PROVENANCE.md`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pipeline::prepare::PrepareConfig;

/// `tests/fixtures/`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The FineWeb-Edu-shaped sample, laid out like the hub repo (`sample/10BT/*.parquet`).
pub fn sample_source() -> PathBuf {
    dir().join("fineweb-edu-sample")
}

/// The LLaMA-2 `tokenizer.json` (sha256 bcd04f0e...).
pub fn tokenizer_json() -> PathBuf {
    dir().join("tokenizer/tokenizer.json")
}

/// The `prepare` settings of the end-to-end tests: seq_len 128, 16 eval sequences, seed 42, two
/// threads, the shipped tokenizer; small shards so that a dataset has several.
pub fn prepare_config(out: &Path, tokens: u64, sequences_per_shard: u64) -> PrepareConfig {
    PrepareConfig {
        tokens,
        out: out.to_owned(),
        seq_len: 128,
        eval_sequences: 16,
        seed: 42,
        threads: 2,
        force: false,
        sequences_per_shard,
        tokenizer_source: "tests/fixtures/tokenizer/tokenizer.json".into(),
        tokenizer_bundled: false,
    }
}

/// One line of `reference/sp_ids.tsv`: SentencePiece's ids for one sample document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceIds {
    pub file: String,
    pub row: u64,
    pub id: String,
    pub utf8_bytes: u64,
    pub n_ids: u64,
    /// sha256 of the ids (no BOS/EOS) as little-endian u16.
    pub sha256: String,
}

/// SentencePiece reference ids of every sample document, keyed by document id.
pub fn reference_ids() -> HashMap<String, ReferenceIds> {
    let path = dir().join("reference/sp_ids.tsv");
    let text = std::fs::read_to_string(&path).expect("reference/sp_ids.tsv is shipped");
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 6, "bad line in {}: {line}", path.display());
            let r = ReferenceIds {
                file: f[0].to_owned(),
                row: f[1].parse().expect("row"),
                id: f[2].to_owned(),
                utf8_bytes: f[3].parse().expect("utf8_bytes"),
                n_ids: f[4].parse().expect("n_ids"),
                sha256: f[5].to_owned(),
            };
            (r.id.clone(), r)
        })
        .collect()
}

/// sha256 of token ids written as little-endian u16 (the reference file's hash).
pub fn ids_sha256(ids: impl IntoIterator<Item = u32>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for id in ids {
        h.update((id as u16).to_le_bytes());
    }
    hex::encode(h.finalize())
}
