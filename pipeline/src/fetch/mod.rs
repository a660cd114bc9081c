//! The Hugging Face hub as a [`Source`](crate::source::Source) of parquet files (`--source hub`,
//! the default), and the hub tokenizer (`--tokenizer meta-llama/Llama-2-7b-hf`).
//!
//! What this module owns, and why it is not simply `hf_hub::api::sync`:
//! - [`env`](mod@env): `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE`, read here
//!   because hf-hub 0.5 reads only `HF_HOME` and `HF_ENDPOINT`, and a user of the Python tools
//!   expects all of them to work.
//! - [`client`]: the HTTP side on ureq 3 (the client hf-hub 0.5 uses). hf-hub 0.5's
//!   `download()` does not verify sha256, does not honour `Retry-After`, retries nothing but the
//!   body, and follows the signed redirect inside ureq so an expired one cannot be re-resolved;
//!   a 2 GB parquet file needs all four. Every request names the pinned commit sha.
//! - [`cache`]: the on-disk cache in the hub's own layout (`blobs/`, `snapshots/<sha>/`, `refs/`),
//!   with paths from `hf_hub::{Cache, Repo}`, so a cache filled by Python `huggingface_hub` serves
//!   us and ours serves it; offline mode reads only from it.
//! - [`plan`]: how many files the token budget needs (parquet `token_count` x the LLaMA-2/GPT-2
//!   ratio measured on the first file), the printed plan and the free-space check.
//! - [`source`]: [`HubSource`], which downloads file k+1 while the pipeline tokenizes file k and
//!   never starts a file the budget does not need.
//! - [`tokenizer`]: the gated default tokenizer, its bundled copy, and the check against the known
//!   LLaMA-2 file.
//! - [`cli`]: `--dataset`, `--subset`, `--revision`, `--keep-downloads` and the entry points the
//!   `prepare` command calls.

pub mod cache;
pub mod cli;
pub mod client;
pub mod env;
pub mod plan;
mod progress;
pub mod source;
pub mod tokenizer;

pub use cli::{Budget, HubArgs};
pub use env::HubEnv;
pub use progress::bars as progress_bars;
pub use source::{HubOptions, HubSource};
pub use tokenizer::{
    LLAMA2_TOKENIZER_SHA256, bundled_llama2_tokenizer, check_llama2_tokenizer, fetch_tokenizer,
};

use std::path::PathBuf;

/// Default `--dataset`.
pub const DEFAULT_DATASET: &str = "HuggingFaceFW/fineweb-edu";
/// Default `--subset`: a uniform random sample of the corpus, 14 parquet files of about 2 GB.
pub const DEFAULT_SUBSET: &str = "sample/10BT";
/// Default `--revision`, resolved to a commit sha once per run.
pub const DEFAULT_REVISION: &str = "main";
/// Default `--tokenizer` (a gated model repo).
pub const DEFAULT_TOKENIZER_REPO: &str = "meta-llama/Llama-2-7b-hf";

/// Failures a caller (or a test) may want to tell apart; each message is one line with a hint.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{repo}: the hub answered {status} for {file}: the repo is gated or private; hint: accept its licence on {page} and export HF_TOKEN=hf_... (a read token from https://huggingface.co/settings/tokens; `huggingface-cli login` also works), or, for the tokenizer, pass a local file with --tokenizer PATH/tokenizer.json"
    )]
    Gated {
        repo: String,
        /// The repo's page, where access is requested.
        page: String,
        file: String,
        status: u16,
    },
    #[error(
        "{file}: sha256 mismatch (expected {expected}, got {actual}); the download was deleted and nothing was written; hint: re-run to download it again; if it repeats, the mirror at HF_ENDPOINT serves different bytes than the hub lists"
    )]
    ShaMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error(
        "HF_HUB_OFFLINE is set and {file} is not in the cache (looked for {}); hint: run once online (unset HF_HUB_OFFLINE) with --keep-downloads to fill the cache, or point HF_HUB_CACHE/HF_HOME at a cache that has it",
        looked.display()
    )]
    OfflineMissing { file: String, looked: PathBuf },
    #[error(
        "not enough free disk space in {}: the plan needs {} and {} are free; hint: free some space, point HF_HUB_CACHE (downloads) or --out (shards) at a larger disk, or lower --tokens",
        dir.display(), plan::human_bytes(*needed), plan::human_bytes(*free)
    )]
    DiskFull {
        dir: PathBuf,
        needed: u64,
        free: u64,
    },
}
