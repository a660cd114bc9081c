//! The hub's part of `pipeline prepare`'s command line: `--dataset`, `--subset`, `--revision`,
//! `--keep-downloads` (flattened into the prepare arguments), and the two entry points the CLI
//! calls for `--source hub` and `--tokenizer <hub repo>`.

use std::path::PathBuf;

use anyhow::Result;

use super::{
    DEFAULT_DATASET, DEFAULT_REVISION, DEFAULT_SUBSET, HubEnv, HubOptions, HubSource,
    fetch_tokenizer,
};
use crate::tokenize::Tokenizer;

/// Which hub dataset `--source hub` reads, and what happens to the downloads.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Hub dataset repo read by `--source hub`.
    #[arg(long, default_value = DEFAULT_DATASET)]
    pub dataset: String,
    /// Folder of the dataset repo whose parquet files are read (recursively).
    #[arg(long, default_value = DEFAULT_SUBSET)]
    pub subset: String,
    /// Branch, tag or commit of the dataset; resolved to a commit sha once and recorded in the
    /// manifest (`dataset.revision`).
    #[arg(long, default_value = DEFAULT_REVISION)]
    pub revision: String,
    /// Keep the downloaded parquet files in the hub cache (default: delete each once its
    /// documents are tokenized, so the disk holds at most two at a time).
    #[arg(long)]
    pub keep_downloads: bool,
}

/// What the run will take from the stream, for the download plan.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Train tokens: train sequences x seq_len.
    pub train_tokens: u64,
    /// Eval tokens: eval sequences x seq_len.
    pub eval_tokens: u64,
    pub seed: u64,
    pub out: PathBuf,
}

/// Share of documents routed to eval (`split::EVAL_RULE`: "< 2% of 2^64").
const EVAL_PERCENT: u64 = 2;

/// Stream tokens needed so both splits fill: train gets 98% of documents, eval 2%.
pub fn stream_tokens(train_tokens: u64, eval_tokens: u64) -> u64 {
    let train = train_tokens
        .saturating_mul(100)
        .div_ceil(100 - EVAL_PERCENT);
    let eval = eval_tokens.saturating_mul(100).div_ceil(EVAL_PERCENT);
    train.max(eval)
}

/// `--source hub`: opens the dataset (resolve, list, first file, plan). The CLI passes
/// [`HubEnv::from_env`]; tests pass their loopback server.
pub fn open_source(
    env: &HubEnv,
    args: &HubArgs,
    budget: &Budget,
    tok: &Tokenizer,
) -> Result<HubSource> {
    let opts = HubOptions {
        dataset: args.dataset.clone(),
        subset: args.subset.clone(),
        revision: args.revision.clone(),
        keep_downloads: args.keep_downloads,
        tokens_needed: stream_tokens(budget.train_tokens, budget.eval_tokens),
        seed: budget.seed,
        out_dir: budget.out.clone(),
    };
    HubSource::open(&opts, env, tok)
}

/// `--tokenizer <owner/name>`: `tokenizer.json` of that model repo (main), from the hub cache or
/// downloaded into it. Gated repos without access fail with the `HF_TOKEN` explanation.
pub fn tokenizer_path(env: &HubEnv, repo: &str) -> Result<PathBuf> {
    let (path, source) = fetch_tokenizer(env, repo, DEFAULT_REVISION)?;
    tracing::info!("tokenizer: {source} ({})", path.display());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_covers_both_splits() {
        assert!(
            crate::split::EVAL_RULE.contains("< 2% of 2^64"),
            "keep EVAL_PERCENT in sync"
        );
        // The plan's budget: train dominates.
        assert_eq!(stream_tokens(98, 1), 100);
        // Tiny budgets with a large eval set: eval dominates.
        assert_eq!(stream_tokens(100, 2048), 102_400);
    }
}
