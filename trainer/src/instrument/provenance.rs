//! The run's identity, written once at start: the run id
//! `bitnet_<size>_<dataset>_T<tokens>_<unix time>`, `meta/provenance.json` (code, toolchain,
//! hardware, seeds, time, command line) and `meta/dataset_fingerprint.json` (from the shard
//! manifest). The keys of the run-folder contract (README) first; extra keys are additions, never
//! renames.

use std::path::Path;
use std::process::Command;

use pipeline::format::Manifest;
use serde::{Deserialize, Serialize};

/// rustc that compiled this binary and the candle version it links, captured by `build.rs`.
pub const RUSTC_VERSION: &str = env!("TRAINER_RUSTC_VERSION");
pub const CANDLE_VERSION: &str = env!("TRAINER_CANDLE_VERSION");

/// `95M`, `1.2B`, `850K`: a count rounded to its unit (the model size in run ids, as in
/// `bitnet_95M_...`).
pub fn count_label(n: u64, digits: usize) -> String {
    let x = n as f64;
    let (v, unit) = if x >= 1e9 {
        (x / 1e9, "B")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "K")
    } else {
        (x, "")
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{unit}")
}

/// `bitnet_95M_fineweb_T1.97B_1703097600`: model size (whole units), the dataset's short name
/// (`HuggingFaceFW/fineweb-edu` -> `fineweb`), the token budget (2 decimals) and the start time.
pub fn run_id(total_params: u64, dataset: &str, total_tokens: u64, unix_time: u64) -> String {
    let base = dataset.rsplit('/').next().unwrap_or(dataset);
    let short: String = base
        .split(['-', '_', '.'])
        .next()
        .unwrap_or(base)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    let short = if short.is_empty() {
        "data".to_string()
    } else {
        short
    };
    format!(
        "bitnet_{}_{short}_T{}_{unix_time}",
        count_label(total_params, 0),
        count_label(total_tokens, 2)
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seeds {
    /// Parameter initialisation.
    pub init: u64,
    /// The data-order permutation.
    pub data_order: u64,
    /// Base of the per-(prompt, step, mode) sample seeds (they come from a hash; see samples).
    pub sampling: String,
    /// Seed of the shard manifest's document shuffle (`pipeline prepare`).
    pub shards: u64,
}

/// `meta/provenance.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub git_commit: String,
    pub git_dirty: bool,
    pub rustc_version: String,
    pub candle_version: String,
    /// `null` without a CUDA driver.
    pub cuda_version: Option<String>,
    pub gpu_model: Option<String>,
    pub gpu_count: u32,
    pub seeds: Seeds,
    pub timestamp_utc: String,
    pub run_id: String,
    // Added.
    pub trainer_version: String,
    pub cuda_feature: bool,
    pub device: String,
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub os: String,
    pub hostname: Option<String>,
    pub command_line: Vec<String>,
    pub unix_time: u64,
}

fn run(cmd: &str, args: &[&str], cwd: Option<&Path>) -> Option<String> {
    let mut c = Command::new(cmd);
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// (commit, dirty) of the git work tree containing `dir`; ("unknown", false) outside one.
pub fn git_state(dir: &Path) -> (String, bool) {
    match run("git", &["rev-parse", "HEAD"], Some(dir)) {
        Some(commit) => {
            let dirty = run(
                "git",
                &["status", "--porcelain", "--untracked-files=no"],
                Some(dir),
            )
            .is_some_and(|s| !s.is_empty());
            (commit, dirty)
        }
        None => ("unknown".into(), false),
    }
}

/// (CUDA version, GPU model, GPU count) from `nvidia-smi`; (None, None, 0) without one.
pub fn gpu_info() -> (Option<String>, Option<String>, u32) {
    let names = run(
        "nvidia-smi",
        &["--query-gpu=name", "--format=csv,noheader"],
        None,
    );
    let names: Vec<String> = names
        .map(|s| {
            s.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let cuda = run("nvidia-smi", &[], None).and_then(|s| {
        s.split("CUDA Version:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    });
    (cuda, names.first().cloned(), names.len() as u32)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `2025-12-20T12:00:00Z` from a unix time.
pub fn utc_timestamp(unix: u64) -> String {
    pipeline::lock::utc_timestamp(unix)
}

impl Provenance {
    /// Gathers everything from the machine; `repo_dir` locates the git work tree.
    pub fn collect(
        run_id: &str,
        unix_time: u64,
        seeds: Seeds,
        device: &str,
        repo_dir: &Path,
    ) -> Self {
        let (git_commit, git_dirty) = git_state(repo_dir);
        let (cuda_version, gpu_model, gpu_count) = gpu_info();
        Provenance {
            git_commit,
            git_dirty,
            rustc_version: RUSTC_VERSION.to_string(),
            candle_version: CANDLE_VERSION.to_string(),
            cuda_version,
            gpu_model,
            gpu_count,
            seeds,
            timestamp_utc: utc_timestamp(unix_time),
            run_id: run_id.to_string(),
            trainer_version: env!("CARGO_PKG_VERSION").to_string(),
            cuda_feature: cfg!(feature = "cuda"),
            device: device.to_string(),
            cpu_model: cpu_model(),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            hostname: std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string()),
            command_line: std::env::args().collect(),
            unix_time,
        }
    }
}

/// `meta/dataset_fingerprint.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetFingerprint {
    pub dataset_name: String,
    /// The tokens the shards hold, not the 1.3T of the whole corpus: the run reads only the shards.
    pub dataset_size_tokens: String,
    pub hf_revision: String,
    pub first_1000_token_ids_sha256: String,
    pub sampling_strategy: String,
    pub tokenizer_vocab_size: u32,
    /// Fraction of the sequences this run reads that it has read before: 0 when the train
    /// split holds all `sequences_needed`.
    pub expected_repetition_rate: f64,
    // Added.
    pub tokenizer_source: String,
    pub tokenizer_sha256: String,
    pub dataset_sha256: String,
    pub format_version: u32,
    pub seq_len: u32,
    pub train_sequences: u64,
    pub train_tokens: u64,
    pub eval_sequences: u64,
    pub eval_tokens: u64,
    pub eval_text_bytes: u64,
    /// `total_steps x batch_size` of this run.
    pub sequences_needed: u64,
    /// `sequences_needed / train_sequences`.
    pub train_split_utilization: f64,
    pub source_files: usize,
    pub shard_seed: u64,
}

impl DatasetFingerprint {
    pub fn from_manifest(
        m: &Manifest,
        total_steps: u64,
        batch_size: u64,
        data_order_seed: u64,
    ) -> Self {
        let needed = total_steps * batch_size;
        let have = m.train.sequences;
        let repetition = if needed <= have || needed == 0 {
            0.0
        } else {
            (needed - have) as f64 / needed as f64
        };
        DatasetFingerprint {
            dataset_name: m.dataset.repo.clone(),
            dataset_size_tokens: format!(
                "{} train + {} eval tokens in the shards (LLaMA-2 tokenization)",
                count_label(m.train.tokens, 2),
                count_label(m.eval.tokens, 2)
            ),
            hf_revision: m.dataset.revision.clone(),
            first_1000_token_ids_sha256: m.fingerprint.first_1000_token_ids_sha256.clone(),
            sampling_strategy: format!(
                "documents shuffled (seed {}) and packed into {}-token sequences by `pipeline prepare`; \
                 the trainer reads a seeded permutation of the train sequences (seed {data_order_seed}), no sequence twice",
                m.seed, m.seq_len
            ),
            tokenizer_vocab_size: m.vocab_size,
            expected_repetition_rate: repetition,
            tokenizer_source: m.tokenizer.source.clone(),
            tokenizer_sha256: m.tokenizer.sha256.clone(),
            dataset_sha256: m.fingerprint.dataset_sha256.clone(),
            format_version: m.format_version,
            seq_len: m.seq_len,
            train_sequences: have,
            train_tokens: m.train.tokens,
            eval_sequences: m.eval.sequences,
            eval_tokens: m.eval.tokens,
            eval_text_bytes: m.eval.text_bytes,
            sequences_needed: needed,
            train_split_utilization: if have > 0 {
                needed as f64 / have as f64
            } else {
                f64::INFINITY
            },
            source_files: m.dataset.files.len(),
            shard_seed: m.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_matches_the_plan_example() {
        assert_eq!(
            run_id(
                95_367_936,
                "HuggingFaceFW/fineweb-edu",
                1_966_080_000,
                1_703_097_600
            ),
            "bitnet_95M_fineweb_T1.97B_1703097600"
        );
        assert_eq!(
            run_id(420_000, "local/sample", 102_400, 5),
            "bitnet_420K_sample_T102.4K_5"
        );
        assert_eq!(count_label(1_000_000_000, 2), "1B");
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_703_097_600), "2023-12-20T18:40:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn provenance_has_the_plan_keys() {
        let seeds = Seeds {
            init: 1,
            data_order: 2,
            sampling: "sha256".into(),
            shards: 3,
        };
        let p = Provenance::collect("r", 0, seeds, "cpu", Path::new(env!("CARGO_MANIFEST_DIR")));
        let v = serde_json::to_value(&p).unwrap();
        for k in [
            "git_commit",
            "git_dirty",
            "cuda_version",
            "gpu_model",
            "gpu_count",
            "seeds",
            "timestamp_utc",
            "run_id",
            "rustc_version",
            "candle_version",
            "command_line",
            "cpu_model",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(p.rustc_version.starts_with("rustc "), "{}", p.rustc_version);
        assert!(p.candle_version.starts_with("0."), "{}", p.candle_version);
    }
}
