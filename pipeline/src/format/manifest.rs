//! `manifest.json`: the list of shards with their hashes, the source files, the tokenizer and the
//! fingerprints. Written last and atomically by `pipeline prepare`; its presence marks a complete
//! dataset. The key names are a stable interface (documented in `shards/README.md`): fields may be
//! added, never renamed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shard::{self, FormatError, ShardReader, Split};
use super::{FORMAT_VERSION, MANIFEST_FILE};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub seq_len: u32,
    pub vocab_size: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    /// Seed of the file and document shuffles.
    pub seed: u64,
    /// Sequences per shard file (the last shard of a split may hold fewer).
    pub sequences_per_shard: u64,
    pub tokenizer: TokenizerInfo,
    pub dataset: DatasetInfo,
    pub train: SplitInfo,
    pub eval: SplitInfo,
    pub fingerprint: Fingerprint,
    pub pipeline: PipelineInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// Where the tokenizer came from: a hub repo id or the path given to `--tokenizer`.
    pub source: String,
    /// sha256 of the tokenizer.json bytes (the copy is stored next to the manifest).
    pub sha256: String,
    /// `true` when `source` (the default hub repo) could not be read and the copy of its
    /// tokenizer.json built into `pipeline` was used, after checking its sha256. Written only
    /// when true; manifests without the key load as `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bundled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Hub dataset repo (`HuggingFaceFW/fineweb-edu`) or the local source folder.
    pub repo: String,
    /// Commit sha the hub revision resolved to; `local` for a folder source.
    pub revision: String,
    /// The source files actually read, in processing order.
    pub files: Vec<SourceFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path inside the repo, e.g. `sample/10BT/000_00000.parquet`.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub sequences: u64,
    /// `sequences * seq_len`.
    pub tokens: u64,
    /// Documents with at least one token in this split.
    pub documents: u64,
    /// UTF-8 bytes of text behind the split's tokens (a document cut by the end of the split
    /// counts in proportion to its tokens kept); the denominator of bits-per-byte.
    pub text_bytes: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the dataset folder, e.g. `train-00000.bin`.
    pub file: String,
    pub sequences: u64,
    /// sha256 of the payload (the bytes after the 1,024-byte header), as in the shard header.
    pub sha256: String,
    /// Index within the split of the shard's first sequence.
    pub first_sequence: u64,
    /// Size of the whole file in bytes.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// sha256 of the first 1,000 train token ids as little-endian u16 (as stored in the shards).
    pub first_1000_token_ids_sha256: String,
    /// See [`dataset_sha256`].
    pub dataset_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineInfo {
    pub version: String,
    pub git_commit: String,
    /// The resolved `prepare` settings that determine the bytes of the shards.
    pub config: serde_json::Value,
}

impl Manifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Loads `dir/manifest.json`. A folder without one is not a (complete) dataset.
    pub fn load(dir: &Path) -> Result<Manifest, FormatError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                FormatError::BadField {
                    path: path.clone(),
                    field: "manifest.json",
                    detail: "missing: the folder holds no complete dataset; hint: run `pipeline prepare --out <dir>` (an interrupted prepare resumes)".into(),
                }
            } else {
                FormatError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| FormatError::BadField {
            path: path.clone(),
            field: "manifest.json",
            detail: format!("not a valid manifest: {e}"),
        })?;
        if m.format_version != FORMAT_VERSION {
            return Err(FormatError::Version {
                path,
                found: m.format_version,
                expected: FORMAT_VERSION,
            });
        }
        Ok(m)
    }

    /// The bytes of `manifest.json`: pretty JSON and a newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("manifest serializes");
        text.push('\n');
        text
    }

    /// Writes `dir/manifest.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        shard::write_atomic(&Self::path(dir), self.to_json().as_bytes())
    }

    pub fn split(&self, split: Split) -> &SplitInfo {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }

    /// Opens every shard of `split` and checks each against the manifest without hashing
    /// payloads: header checksum, seq_len, vocab, BOS/EOS, position, sequence count, file size
    /// (the header's and the manifest's), payload sha256. Use [`Manifest::verify_payloads`] to re-hash.
    pub fn open_split(&self, dir: &Path, split: Split) -> Result<Vec<ShardReader>, FormatError> {
        let info = self.split(split);
        let mut next_first = 0u64;
        let mut readers = Vec::with_capacity(info.shards.len());
        for (i, entry) in info.shards.iter().enumerate() {
            let path = dir.join(&entry.file);
            let reader = ShardReader::open(&path)?;
            let h = reader.header();
            let mismatch = |field: &'static str, header: String, manifest: String| {
                Err(FormatError::BadField {
                    path: path.clone(),
                    field,
                    detail: format!(
                        "header says {header}, manifest says {manifest}; hint: the folder mixes files of different datasets, re-run `pipeline prepare`"
                    ),
                })
            };
            if h.split != split {
                return mismatch("split", h.split.to_string(), split.to_string());
            }
            if h.seq_len != self.seq_len {
                return mismatch("seq_len", h.seq_len.to_string(), self.seq_len.to_string());
            }
            if h.vocab_size != self.vocab_size {
                return mismatch(
                    "vocab_size",
                    h.vocab_size.to_string(),
                    self.vocab_size.to_string(),
                );
            }
            if (h.bos_id, h.eos_id) != (self.bos_id, self.eos_id) {
                return mismatch(
                    "bos_id/eos_id",
                    format!("{}/{}", h.bos_id, h.eos_id),
                    format!("{}/{}", self.bos_id, self.eos_id),
                );
            }
            if h.shard_index != i as u64 {
                return mismatch("shard_index", h.shard_index.to_string(), i.to_string());
            }
            if h.first_sequence != next_first || entry.first_sequence != next_first {
                return mismatch(
                    "first_sequence",
                    h.first_sequence.to_string(),
                    next_first.to_string(),
                );
            }
            if h.num_sequences != entry.sequences {
                return mismatch(
                    "num_sequences",
                    h.num_sequences.to_string(),
                    entry.sequences.to_string(),
                );
            }
            if h.file_bytes() != entry.bytes {
                return mismatch("bytes", h.file_bytes().to_string(), entry.bytes.to_string());
            }
            if h.payload_sha256_hex() != entry.sha256 {
                return mismatch(
                    "payload_sha256",
                    h.payload_sha256_hex(),
                    entry.sha256.clone(),
                );
            }
            next_first += h.num_sequences;
            readers.push(reader);
        }
        if next_first != info.sequences {
            return Err(FormatError::BadField {
                path: Self::path(dir),
                field: "sequences",
                detail: format!(
                    "{split} shards hold {next_first} sequences, manifest says {}",
                    info.sequences
                ),
            });
        }
        Ok(readers)
    }

    /// Re-hashes every payload of `split` against the manifest.
    pub fn verify_payloads(&self, dir: &Path, split: Split) -> Result<(), FormatError> {
        for reader in self.open_split(dir, split)? {
            reader.verify_payload()?;
        }
        Ok(())
    }
}

/// The dataset hash: sha256 over one line `split\tfile\tsequences\tsha256\n` per shard, train
/// shards then eval shards. It changes whenever any token of any shard changes.
pub fn dataset_sha256(train: &SplitInfo, eval: &SplitInfo) -> String {
    let mut h = Sha256::new();
    for (split, info) in [(Split::Train, train), (Split::Eval, eval)] {
        for s in &info.shards {
            h.update(format!("{split}\t{}\t{}\t{}\n", s.file, s.sequences, s.sha256).as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// How many train token ids the `first_1000_token_ids_sha256` fingerprint covers.
pub const FINGERPRINT_TOKENS: usize = 1000;

/// The first [`FINGERPRINT_TOKENS`] token ids stored in `shards` (a split's, in order), or all
/// of them when they hold fewer.
pub fn first_token_ids(shards: impl IntoIterator<Item = ShardReader>) -> Vec<u16> {
    let mut ids = Vec::with_capacity(FINGERPRINT_TOKENS);
    'shards: for reader in shards {
        for i in 0..reader.num_sequences() {
            for b in reader.sequence_bytes(i).chunks_exact(2) {
                if ids.len() == FINGERPRINT_TOKENS {
                    break 'shards;
                }
                ids.push(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
    ids
}

/// sha256 of token ids written as little-endian u16, the fingerprint of the first 1,000 ids.
pub fn token_ids_sha256(ids: &[u16]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    hex::encode(h.finalize())
}
