//! The tokenizer from the hub (`--tokenizer meta-llama/Llama-2-7b-hf`, the default) and the check
//! that a tokenizer, from anywhere, is the LLaMA-2 one the trainer's models are sized for.
//!
//! `meta-llama/Llama-2-7b-hf` is gated: without an accepted licence and a token the hub answers
//! 401/403, which becomes [`FetchError::Gated`] explaining `HF_TOKEN` and `--tokenizer PATH`.
//! When the default is not overridden, `prepare` then uses [`bundled_llama2_tokenizer`], the same
//! file built into the binary.

use std::path::PathBuf;

use anyhow::Result;

use super::FetchError;
use super::cache::{RepoCache, is_commit_sha};
use super::client::{Client, HubRepo, Wanted};
use super::env::HubEnv;

/// sha256 of `tokenizer.json` in `meta-llama/Llama-2-7b-hf` (also the copy in
/// `tests/fixtures/tokenizer/`, see its provenance note).
pub const LLAMA2_TOKENIZER_SHA256: &str =
    "bcd04f0eadf90287bd26e1a183ac487d8a141b09b06aecb7725bbdd343640f2e";

/// `tokenizer.json` of `meta-llama/Llama-2-7b-hf`, built into the binary from
/// `tests/fixtures/tokenizer/tokenizer.json` (byte-identical to the hub file, see the fixtures'
/// provenance note), so a first run needs no gated download.
const BUNDLED_LLAMA2_TOKENIZER: &[u8] =
    include_bytes!("../../../tests/fixtures/tokenizer/tokenizer.json");

/// The bundled LLaMA-2 `tokenizer.json`, after checking that its sha256 is
/// [`LLAMA2_TOKENIZER_SHA256`] (the `data.tokenizer_sha256` of the configs): a different file is
/// never used in its place.
pub fn bundled_llama2_tokenizer() -> Result<&'static [u8]> {
    use sha2::{Digest, Sha256};
    let sha = hex::encode(Sha256::digest(BUNDLED_LLAMA2_TOKENIZER));
    anyhow::ensure!(
        sha == LLAMA2_TOKENIZER_SHA256,
        "the tokenizer.json built into this binary has sha256 {sha}, not the LLaMA-2 file's {LLAMA2_TOKENIZER_SHA256}; hint: restore tests/fixtures/tokenizer/tokenizer.json and rebuild, or pass --tokenizer PATH/tokenizer.json"
    );
    Ok(BUNDLED_LLAMA2_TOKENIZER)
}

/// Warns (clearly, once) when `sha256` is not the known LLaMA-2 tokenizer; returns whether it is.
/// A different tokenizer is allowed (the manifest records its hash), but a model trained on it is
/// not the LLaMA-2-vocabulary model the configs describe, and its token counts differ.
pub fn check_llama2_tokenizer(sha256: &str, source: &str) -> bool {
    let known = sha256.eq_ignore_ascii_case(LLAMA2_TOKENIZER_SHA256);
    if !known {
        tracing::warn!(
            "tokenizer {source} is NOT the LLaMA-2 tokenizer: its tokenizer.json has sha256 {sha256}, the known LLaMA-2 file has {LLAMA2_TOKENIZER_SHA256}; shards made with it hold different ids than a LLaMA-2 model expects (hint: use --tokenizer meta-llama/Llama-2-7b-hf or a verified copy of its tokenizer.json)"
        );
    }
    known
}

/// `tokenizer.json` of hub model `repo` at `revision`, in the hub cache. Returns its local path
/// and `repo@commit` for the manifest. Offline, only the cache is consulted.
pub fn fetch_tokenizer(env: &HubEnv, repo: &str, revision: &str) -> Result<(PathBuf, String)> {
    const FILE: &str = "tokenizer.json";
    let cache = RepoCache::new(&env.cache_dir, hf_hub::RepoType::Model, repo);
    if env.offline {
        let commit = if is_commit_sha(revision) {
            Some(revision.to_owned())
        } else {
            cache.read_ref(revision)
        };
        let Some(commit) = commit else {
            return Err(FetchError::OfflineMissing {
                file: format!("{repo}/{FILE} (revision {revision})"),
                looked: cache.ref_file(revision),
            }
            .into());
        };
        return match cache.lookup(&commit, FILE) {
            Some(path) => Ok((path, format!("{repo}@{commit}"))),
            None => Err(FetchError::OfflineMissing {
                file: format!("{repo}/{FILE}"),
                looked: cache.pointer(&commit, FILE),
            }
            .into()),
        };
    }
    let client = Client::new(env);
    let fetched = client.download(
        &cache,
        &Wanted {
            repo: HubRepo::model(repo),
            revision: revision.to_owned(),
            path: FILE.to_owned(),
            size: None,
            sha256: None,
        },
    )?;
    Ok((fetched.path, format!("{repo}@{}", fetched.commit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_is_the_known_llama2_tokenizer() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizer/tokenizer.json");
        let sha = super::super::cache::sha256_file(&path).unwrap();
        assert!(check_llama2_tokenizer(&sha, "fixture"));
        assert!(!check_llama2_tokenizer(&"0".repeat(64), "other"));
    }

    #[test]
    fn the_bundled_copy_is_the_fixture_byte_for_byte() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizer/tokenizer.json");
        assert_eq!(
            bundled_llama2_tokenizer().unwrap(),
            std::fs::read(path).unwrap()
        );
    }

    #[test]
    fn offline_without_cache_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = HubEnv {
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            cache_dir: dir.path().to_owned(),
            offline: true,
        };
        let err = fetch_tokenizer(&env, "meta-llama/Llama-2-7b-hf", "main").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("meta-llama/Llama-2-7b-hf/tokenizer.json"),
            "{msg}"
        );
        assert!(msg.contains("refs/main") && msg.contains("hint:"), "{msg}");
    }
}
