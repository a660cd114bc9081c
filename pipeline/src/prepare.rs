//! `pipeline prepare`: source parquet files -> exact LLaMA-2 tokens -> shards + manifest.
//!
//! [`crate::ingest`] tokenizes source files in the seeded processing order into one work file
//! per source file (`OUT/.work/`), only until the tokens collected cover the train budget plus
//! the eval set; a finished work file is never redone. Each finished work file goes straight to
//! [`crate::assemble`], on its own thread, which packs it into the shards and the documents
//! index while the next files are tokenized. Then `stats.json`, the tokenizer copy, and last,
//! atomically, `manifest.json`. Every step can be killed and re-run: the result is
//! byte-identical. One `prepare` at a time writes a folder: the whole call holds its
//! [`FolderLock`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::assemble::{Assembled, Assembler, Layout};
use crate::crash;
use crate::disk;
use crate::format::manifest::{
    self, DatasetInfo, Fingerprint, PipelineInfo, SourceFile as ManifestFile, TokenizerInfo,
};
use crate::format::shard::{self, HEADER_BYTES, TOKEN_BYTES, is_shard_file, write_atomic};
use crate::format::{
    FORMAT_VERSION, MANIFEST_FILE, MANIFEST_SHA_FILE, Manifest, STATS_FILE, Split, TOKENIZER_FILE,
    WORK_DIR,
};
use crate::frame;
use crate::ingest::{self, Ingested, Tokenized};
use crate::lock::FolderLock;
use crate::outdir::{remove_stale_files, remove_work_dir};
use crate::source::{self, Source};
use crate::split;
use crate::stats::Stats;
use crate::tokenize::Tokenizer;
use crate::work::WorkMeta;

/// Default sequences per shard: 131,072 x 1,024 tokens x 2 bytes = 256 MiB.
pub const DEFAULT_SHARD_SEQUENCES: u64 = 131_072;
/// How the document order is derived, recorded in the manifest's config.
pub const DOCUMENT_ORDER: &str =
    "files: seeded shuffle of sorted paths; documents: seeded permutation within each file";

/// The settings of one `prepare` run.
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub tokens: u64,
    pub out: PathBuf,
    pub seq_len: u32,
    pub eval_sequences: u64,
    pub seed: u64,
    /// Tokenizer threads; does not change the output.
    pub threads: usize,
    /// Replace a dataset made with other settings; re-read one made with these and rebuild it
    /// when damaged.
    pub force: bool,
    pub sequences_per_shard: u64,
    /// `tokenizer.source` for the manifest (the `--tokenizer` value).
    pub tokenizer_source: String,
    /// `tokenizer.bundled` for the manifest: the default hub repo could not be read and the
    /// copy built into the binary was used.
    pub tokenizer_bundled: bool,
}

impl PrepareConfig {
    pub fn train_sequences(&self) -> u64 {
        self.tokens.div_ceil(self.seq_len as u64)
    }

    fn validate(&self) -> Result<()> {
        if self.seq_len < 2 {
            bail!(
                "--seq-len {}: must be at least 2; hint: the default is 1024",
                self.seq_len
            );
        }
        if self.eval_sequences == 0 {
            bail!(
                "--eval-sequences 0: the eval split needs at least one sequence; hint: the default is 10000"
            );
        }
        if self.sequences_per_shard == 0 {
            bail!(
                "--shard-sequences 0: must be at least 1; hint: the default {DEFAULT_SHARD_SEQUENCES} gives 256 MiB shards at --seq-len 1024"
            );
        }
        if self.tokens == 0 {
            bail!("--tokens 0: the budget must be positive; hint: write e.g. 1.97B, 500M or 250K");
        }
        Ok(())
    }
}

/// What a `prepare` call did.
#[derive(Debug)]
pub enum Outcome {
    /// The folder already held this exact dataset; nothing was written.
    AlreadyComplete(Box<Manifest>),
    Written {
        manifest: Box<Manifest>,
        stats: Stats,
    },
}

/// The resolved settings that determine the bytes of the shards (`pipeline.config`); two runs
/// with equal configs produce identical folders.
fn resolved_config(
    cfg: &PrepareConfig,
    tok: &Tokenizer,
    repo: &str,
    revision: &str,
) -> serde_json::Value {
    serde_json::json!({
        "tokens": cfg.tokens,
        "train_sequences": cfg.train_sequences(),
        "eval_sequences": cfg.eval_sequences,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "sequences_per_shard": cfg.sequences_per_shard,
        "tokenizer_sha256": tok.sha256(),
        "source": { "repo": repo, "revision": revision },
        "split_rule": split::EVAL_RULE,
        "document_order": DOCUMENT_ORDER,
        "documents": frame::RULE,
    })
}

/// Runs `prepare` with an opened source and tokenizer, holding the lock of `--out` throughout.
pub fn prepare(cfg: &PrepareConfig, source: &mut dyn Source, tok: &Tokenizer) -> Result<Outcome> {
    let lock = lock_out(&cfg.out)?;
    prepare_locked(cfg, &lock, source, tok)
}

/// Creates `out` and locks it for this process: a second `prepare` on the same folder fails here,
/// at once, naming the holder. The CLI calls it before opening the source (which may download).
pub fn lock_out(out: &Path) -> Result<FolderLock> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    Ok(FolderLock::acquire(out, "or choose another --out")?)
}

/// [`prepare`] for a caller that already holds the lock of `cfg.out` ([`lock_out`]).
pub fn prepare_locked(
    cfg: &PrepareConfig,
    _lock: &FolderLock,
    source: &mut dyn Source,
    tok: &Tokenizer,
) -> Result<Outcome> {
    let wall = Instant::now();
    cfg.validate()?;
    let info = source.describe();
    let config = resolved_config(cfg, tok, &info.repo, &info.revision);
    let out = &cfg.out;

    if let Some(done) = existing_dataset(cfg, &config)? {
        remove_work_dir(out, cfg.threads)?;
        return Ok(Outcome::AlreadyComplete(Box::new(done)));
    }
    let needed = disk_needed(cfg).saturating_sub(bytes_written(out));
    if let Some(warning) = disk::shortfall(
        out,
        needed,
        "the work files and shards still to write",
        "free some space or point --out at a larger disk; prepare can be re-run after a full disk and resumes",
    ) {
        tracing::warn!("{warning}");
    }
    std::fs::create_dir_all(out.join(WORK_DIR))
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    let git = GitCommit::start();

    // Tokenizing into work files, only as many source files as the budget needs, and assembling
    // each finished work file into the shards and the documents index right away.
    let layout = Layout {
        out: out.clone(),
        seq_len: cfg.seq_len,
        vocab_size: tok.vocab_size(),
        bos_id: tok.bos_id(),
        eos_id: tok.eos_id(),
        seed: cfg.seed,
        sequences_per_shard: cfg.sequences_per_shard,
        train_sequences: cfg.train_sequences(),
        eval_sequences: cfg.eval_sequences,
    };
    let assembler = Assembler::create(&layout)?;
    let need = ingest::Need {
        out: out.clone(),
        seed: cfg.seed,
        threads: cfg.threads,
        tokens: [
            cfg.train_sequences() * cfg.seq_len as u64,
            cfg.eval_sequences * cfg.seq_len as u64,
        ],
    };
    let (tokenized, assembler) = match ingest::tokenize_and_assemble(&need, source, tok, assembler)?
    {
        Ingested::Covered(tokenized, assembler) => (tokenized, *assembler),
        Ingested::Short { files, have } => bail!(
            "--source {}: its {files} files hold {} train + {} eval tokens, but --tokens {} with --seq-len {} and --eval-sequences {} need {} train + {} eval tokens; hint: lower --tokens or --eval-sequences, or use a larger source",
            info.repo,
            have[0],
            have[1],
            cfg.tokens,
            cfg.seq_len,
            cfg.eval_sequences,
            need.tokens[0],
            need.tokens[1]
        ),
    };
    let assembled = assembler.finish()?;
    let keep = assembled
        .train
        .shards
        .iter()
        .chain(&assembled.eval.shards)
        .map(|s| s.file.as_str())
        .collect();
    remove_stale_files(out, &keep)?;

    let manifest = build_manifest(
        cfg,
        tok,
        &info,
        &tokenized.metas,
        &assembled,
        config,
        git.wait(),
    );
    let stats = build_stats(cfg, &tokenized, &assembled, wall);
    write_atomic(
        &out.join(STATS_FILE),
        format!(
            "{}\n",
            serde_json::to_string_pretty(&stats).expect("stats serialize")
        )
        .as_bytes(),
    )
    .with_context(|| format!("cannot write {}", out.join(STATS_FILE).display()))?;
    crash::point("stats written");
    write_atomic(&out.join(TOKENIZER_FILE), tok.json())
        .with_context(|| format!("cannot write {}", out.join(TOKENIZER_FILE).display()))?;
    crash::point("tokenizer copied");
    save_manifest(out, &manifest)?;
    crash::point("manifest written");
    remove_work_dir(out, cfg.threads)?;
    Ok(Outcome::Written {
        manifest: Box::new(manifest),
        stats,
    })
}

/// About how many bytes the output folder holds at its fullest, just before the work files are
/// removed: the work files (every tokenized document, until both splits are covered) and the
/// shards.
pub fn disk_needed(cfg: &PrepareConfig) -> u64 {
    let seq = cfg.seq_len as u64;
    let (train, eval) = (cfg.train_sequences() * seq, cfg.eval_sequences * seq);
    let work = crate::fetch::cli::stream_tokens(train, eval) * TOKEN_BYTES as u64;
    let shards_count = cfg.train_sequences().div_ceil(cfg.sequences_per_shard)
        + cfg.eval_sequences.div_ceil(cfg.sequences_per_shard);
    let shards = (train + eval) * TOKEN_BYTES as u64 + shards_count * HEADER_BYTES as u64;
    work + shards
}

/// Bytes of the work files and shards already in `out` (an interrupted run resumes with them).
fn bytes_written(out: &Path) -> u64 {
    let size_of = |dir: &Path, keep: fn(&str) -> bool| -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| keep(&e.file_name().to_string_lossy()))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    size_of(out, is_shard_file) + size_of(&out.join(WORK_DIR), |_| true)
}

/// Checks an existing manifest in the output folder: `Some` when it is this exact dataset,
/// `None` when the folder holds no complete dataset (or `--force` allows replacing it).
///
/// With the same settings, a plain re-run checks the shards' headers and sizes against the
/// manifest; `--force` re-reads every byte (as `pipeline verify`, and the documents index) and
/// rebuilds a damaged dataset, keeping the shards that still hash right.
fn existing_dataset(cfg: &PrepareConfig, config: &serde_json::Value) -> Result<Option<Manifest>> {
    let out = &cfg.out;
    let path = out.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(None);
    }
    match Manifest::load(out) {
        Ok(m) if &m.pipeline.config == config && cfg.force => match damage(out, &m) {
            Ok(()) => Ok(Some(m)),
            Err(e) => {
                tracing::warn!(
                    "--out {}: the dataset is damaged: {e:#}; --force: rebuilding it (shards that still hash right are kept)",
                    out.display()
                );
                forget_manifest(out)?;
                Ok(None)
            }
        },
        Ok(m) if &m.pipeline.config == config => {
            // Same settings: the dataset is complete if its shards still match the manifest.
            for split in [Split::Train, Split::Eval] {
                m.open_split(out, split).map_err(|e| {
                    let msg = e.to_string();
                    let hint = if msg.contains("hint:") {
                        ""
                    } else {
                        "; hint: re-run with --force to repair it"
                    };
                    anyhow!(
                        "--out {}: the dataset is complete but damaged: {msg}{hint}",
                        out.display()
                    )
                })?;
            }
            Ok(Some(m))
        }
        other => {
            let what = match other {
                Ok(m) => format!(
                    "a complete dataset made with different settings ({})",
                    describe_difference(&m.pipeline.config, config)
                ),
                Err(e) => format!("a dataset whose manifest is unreadable ({e})"),
            };
            if !cfg.force {
                bail!(
                    "--out {}: holds {what}; hint: choose another --out, or pass --force to replace it",
                    out.display()
                )
            }
            tracing::warn!(
                "--out {}: holds {what}; --force: replacing it",
                out.display()
            );
            forget_manifest(out)?;
            Ok(None)
        }
    }
}

/// What is wrong with the complete dataset `m` in `out`, reading every byte: the checks of
/// `pipeline verify` (manifest checksum, every payload hash, tokenizer copy, fingerprints) and
/// every line of the documents index.
fn damage(out: &Path, m: &Manifest) -> Result<()> {
    crate::verify::verify(out)?;
    crate::format::documents::check(out, [m.train.documents, m.eval.documents])?;
    Ok(())
}

/// `--force`: the folder stops being a complete dataset before anything is rewritten.
fn forget_manifest(out: &Path) -> Result<()> {
    let path = out.join(MANIFEST_FILE);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    let _ = std::fs::remove_file(out.join(MANIFEST_SHA_FILE));
    shard::sync_parent(&path).ok();
    Ok(())
}

/// `seed 42 -> 7, tokens 100000 -> 300000`: the config keys that differ.
fn describe_difference(old: &serde_json::Value, new: &serde_json::Value) -> String {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return "unrecognised config".into();
    };
    let diffs: Vec<String> = n
        .iter()
        .filter(|(k, v)| o.get(*k) != Some(v))
        .map(|(k, v)| {
            let was = o.get(k).map_or("missing".to_string(), |x| x.to_string());
            format!("{k} {was} -> {v}")
        })
        .collect();
    if diffs.is_empty() {
        "different config".into()
    } else {
        diffs.join(", ")
    }
}

fn build_manifest(
    cfg: &PrepareConfig,
    tok: &Tokenizer,
    info: &source::SourceInfo,
    metas: &[WorkMeta],
    a: &Assembled,
    config: serde_json::Value,
    git_commit: String,
) -> Manifest {
    // Every file read is listed, also one whose documents were not all used: it is provenance.
    let files = metas
        .iter()
        .map(|m| ManifestFile {
            path: m.key.source_path.clone(),
            sha256: m.source_sha256.clone(),
            size: m.key.source_size,
            rows: m.rows,
        })
        .collect();
    Manifest {
        format_version: FORMAT_VERSION,
        seq_len: cfg.seq_len,
        vocab_size: tok.vocab_size(),
        bos_id: tok.bos_id(),
        eos_id: tok.eos_id(),
        seed: cfg.seed,
        sequences_per_shard: cfg.sequences_per_shard,
        tokenizer: TokenizerInfo {
            source: cfg.tokenizer_source.clone(),
            sha256: tok.sha256().to_owned(),
            bundled: cfg.tokenizer_bundled,
        },
        dataset: DatasetInfo {
            repo: info.repo.clone(),
            revision: info.revision.clone(),
            files,
        },
        fingerprint: Fingerprint {
            first_1000_token_ids_sha256: manifest::token_ids_sha256(&a.first_train_ids),
            dataset_sha256: manifest::dataset_sha256(&a.train, &a.eval),
        },
        train: a.train.clone(),
        eval: a.eval.clone(),
        pipeline: PipelineInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            git_commit,
            config,
        },
    }
}

/// The commit of the source tree this binary was built from, read at run time with `git`
/// (a build script would rebuild the crate on every commit); `unknown` outside a checkout.
/// Started before the data is tokenized, so the process runs meanwhile.
struct GitCommit(Option<std::process::Child>);

impl GitCommit {
    fn start() -> Self {
        let child = std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(["rev-parse", "HEAD"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        GitCommit(child.ok())
    }

    fn wait(self) -> String {
        self.0
            .and_then(|child| child.wait_with_output().ok())
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }
}

fn build_stats(cfg: &PrepareConfig, t: &Tokenized, a: &Assembled, wall: Instant) -> Stats {
    let sum = |f: fn(&WorkMeta) -> u64| t.metas.iter().map(f).sum::<u64>();
    let secs = t.fresh.seconds.max(1e-9);
    Stats {
        files_read: t.metas.len() as u64,
        documents_read: sum(|m| m.rows),
        documents_kept: sum(|m| m.documents),
        documents_skipped_empty: sum(|m| m.empty_documents),
        train_sequences: a.train.sequences,
        train_tokens: a.train.tokens,
        train_documents: a.train.documents,
        eval_sequences: a.eval.sequences,
        eval_tokens: a.eval.tokens,
        eval_documents: a.eval.documents,
        shard_bytes: a
            .train
            .shards
            .iter()
            .chain(&a.eval.shards)
            .map(|s| s.bytes)
            .sum(),
        shards_written: a.shards_written,
        files_tokenized: t.fresh.files,
        text_bytes_tokenized: t.fresh.text_bytes,
        tokens_tokenized: t.fresh.tokens,
        tokenize_seconds: t.fresh.seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        text_mb_per_s: t.fresh.text_bytes as f64 / 1e6 / secs,
        tokens_per_s: t.fresh.tokens as f64 / secs,
        threads: cfg.threads,
    }
}

/// Writes `manifest.json.sha256` then `manifest.json`, both atomically; the manifest is last.
fn save_manifest(out: &Path, m: &Manifest) -> Result<()> {
    let text = m.to_json();
    let sha = hex::encode(Sha256::digest(text.as_bytes()));
    let sidecar = out.join(MANIFEST_SHA_FILE);
    write_atomic(&sidecar, format!("{sha}  {MANIFEST_FILE}\n").as_bytes())
        .with_context(|| format!("cannot write {}", sidecar.display()))?;
    let path = Manifest::path(out);
    write_atomic(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_needed_counts_work_files_and_shards() {
        let cfg = PrepareConfig {
            tokens: 1_970_000_000,
            out: PathBuf::from("shards"),
            seq_len: 1024,
            eval_sequences: 10_000,
            seed: 42,
            threads: 1,
            force: false,
            sequences_per_shard: DEFAULT_SHARD_SEQUENCES,
            tokenizer_source: String::new(),
            tokenizer_bundled: false,
        };
        let train = cfg.train_sequences() * 1024;
        let eval = 10_000 * 1024;
        // Work files hold the documents of both splits until train (98% of them) is covered.
        let work = train * 100 / 98 * 2;
        let shards = (train + eval) * 2 + (15 + 1) * 1024;
        assert!(
            disk_needed(&cfg).abs_diff(work + shards) < 4,
            "{}",
            disk_needed(&cfg)
        );
        // About 8 GB for the 95M run's 1.97B tokens.
        assert_eq!(disk_needed(&cfg), 7_980_908_168);
    }
}
