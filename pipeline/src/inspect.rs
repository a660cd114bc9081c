//! `pipeline inspect`: a summary of a dataset folder (splits, sequences, tokens, shards,
//! fingerprints), as text or `--json`, and the token ids (or text) of one sequence.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Result, bail};

use crate::format::{Manifest, Split, TOKENIZER_FILE};
use crate::tokenize::Tokenizer;

/// The human summary of a manifest.
pub fn summary(dir: &Path, m: &Manifest) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "dataset    {}", dir.display());
    let _ = writeln!(
        s,
        "source     {} @ {} ({} files read)",
        m.dataset.repo,
        m.dataset.revision,
        m.dataset.files.len()
    );
    let _ = writeln!(
        s,
        "tokenizer  {} (sha256 {})",
        m.tokenizer.source, m.tokenizer.sha256
    );
    let _ = writeln!(
        s,
        "format     v{}, seq_len {}, vocab {}, bos {}, eos {}, seed {}, {} sequences/shard",
        m.format_version,
        m.seq_len,
        m.vocab_size,
        m.bos_id,
        m.eos_id,
        m.seed,
        m.sequences_per_shard
    );
    for split in [Split::Train, Split::Eval] {
        let i = m.split(split);
        let bytes: u64 = i.shards.iter().map(|s| s.bytes).sum();
        let _ = writeln!(
            s,
            "{:<10} {} sequences, {} tokens, {} documents, {} shards, {:.1} MB",
            split.name(),
            i.sequences,
            i.tokens,
            i.documents,
            i.shards.len(),
            bytes as f64 / 1e6
        );
    }
    let _ = writeln!(
        s,
        "first 1000 token ids sha256  {}",
        m.fingerprint.first_1000_token_ids_sha256
    );
    let _ = writeln!(
        s,
        "dataset sha256               {}",
        m.fingerprint.dataset_sha256
    );
    let _ = writeln!(
        s,
        "pipeline   {} (commit {})",
        m.pipeline.version, m.pipeline.git_commit
    );
    s
}

/// The JSON summary: the manifest itself (a stable interface).
pub fn summary_json(m: &Manifest) -> String {
    serde_json::to_string_pretty(m).expect("manifest serializes")
}

/// The token ids of sequence `n` of `split`.
pub fn sequence(dir: &Path, m: &Manifest, split: Split, n: u64) -> Result<Vec<u32>> {
    let info = m.split(split);
    if n >= info.sequences {
        bail!(
            "--sequence {n}: the {split} split has {} sequences (0..{}); hint: pick a smaller N",
            info.sequences,
            info.sequences.saturating_sub(1)
        );
    }
    for reader in m.open_split(dir, split)? {
        let first = reader.header().first_sequence;
        if n < first + reader.num_sequences() as u64 {
            let mut out = vec![0u32; m.seq_len as usize];
            reader.copy_sequence((n - first) as usize, &mut out);
            return Ok(out);
        }
    }
    unreachable!("open_split checked that the shards cover every sequence")
}

/// The text of `ids` decoded with the dataset's own tokenizer copy.
pub fn decode(dir: &Path, ids: &[u32]) -> Result<String> {
    Tokenizer::load(&dir.join(TOKENIZER_FILE))?.decode(ids)
}
