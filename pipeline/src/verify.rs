//! `pipeline verify`: re-hash every shard against the manifest and check that the manifest, the
//! tokenizer copy and the fingerprints are the ones `prepare` wrote. The first mismatch is an
//! error naming the file.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::format::manifest::{dataset_sha256, first_token_ids, token_ids_sha256};
use crate::format::{MANIFEST_SHA_FILE, Manifest, Split, TOKENIZER_FILE};

/// What `verify` checked, for its report line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub shards: usize,
    pub sequences: u64,
    pub bytes: u64,
}

pub fn verify(dir: &Path) -> Result<Verified> {
    let manifest_path = Manifest::path(dir);
    let bytes = std::fs::read(&manifest_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{}: missing, the folder holds no complete dataset; hint: run `pipeline prepare --out {}` (an interrupted prepare resumes)", manifest_path.display(), dir.display())
        } else {
            anyhow!("{}: {e}", manifest_path.display())
        }
    })?;
    let sidecar = dir.join(MANIFEST_SHA_FILE);
    let recorded = std::fs::read_to_string(&sidecar).with_context(|| {
        format!(
            "{}: cannot read; hint: re-run `pipeline prepare` to rewrite it",
            sidecar.display()
        )
    })?;
    let recorded = recorded.split_whitespace().next().unwrap_or("");
    let actual = hex::encode(Sha256::digest(&bytes));
    if recorded != actual {
        bail!(
            "{}: sha256 {actual} differs from {recorded} recorded in {MANIFEST_SHA_FILE} (the manifest was edited); hint: re-run `pipeline prepare --force` to rebuild",
            manifest_path.display()
        );
    }
    let m = Manifest::load(dir)?;

    let mut shards = 0;
    let mut total_bytes = 0;
    for split in [Split::Train, Split::Eval] {
        let info = m.split(split);
        // Checked: a manifest can be edited and re-hashed, and its counts are not yet held to
        // the shards here.
        if info.sequences.checked_mul(m.seq_len as u64) != Some(info.tokens) {
            bail!(
                "{}: {split}.tokens {} != sequences x seq_len",
                manifest_path.display(),
                info.tokens
            );
        }
        for reader in m.open_split(dir, split)? {
            reader.verify_payload()?;
            shards += 1;
            total_bytes += reader.header().file_bytes();
        }
    }

    let tok_path = dir.join(TOKENIZER_FILE);
    let tok = std::fs::read(&tok_path).with_context(|| {
        format!(
            "{}: cannot read the tokenizer copy; hint: re-run `pipeline prepare`",
            tok_path.display()
        )
    })?;
    let tok_sha = hex::encode(Sha256::digest(&tok));
    if tok_sha != m.tokenizer.sha256 {
        bail!(
            "{}: sha256 {tok_sha} differs from the manifest's {}; hint: the copy was replaced, re-run `pipeline prepare --force`",
            tok_path.display(),
            m.tokenizer.sha256
        );
    }

    let ds = dataset_sha256(&m.train, &m.eval);
    if ds != m.fingerprint.dataset_sha256 {
        bail!(
            "{}: fingerprint.dataset_sha256 does not match the shard list",
            manifest_path.display()
        );
    }
    let first = first_token_ids(m.open_split(dir, Split::Train)?);
    if token_ids_sha256(&first) != m.fingerprint.first_1000_token_ids_sha256 {
        bail!(
            "{}: fingerprint.first_1000_token_ids_sha256 does not match {}",
            manifest_path.display(),
            m.train
                .shards
                .first()
                .map_or("the train shards", |s| s.file.as_str())
        );
    }
    Ok(Verified {
        shards,
        sequences: m.train.sequences + m.eval.sequences,
        bytes: total_bytes,
    })
}
