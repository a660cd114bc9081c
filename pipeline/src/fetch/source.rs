//! [`HubSource`]: the hub dataset as a [`Source`] of parquet files.
//!
//! At open: resolve `--revision` to a commit sha (once; every later request names the sha) and
//! list the subset's parquet files. The first `fetch` downloads that file, measures the
//! LLaMA-2/GPT-2 ratio on it, prints the plan and checks the disk (a run with nothing left to
//! tokenize downloads nothing). Then, while the pipeline tokenizes file k, file k+1 of its order
//! downloads on a background thread (started when file k is handed over, or by the pipeline's
//! `prefetch`), but only when the files before k+1 are estimated to fall short of the budget,
//! so a file beyond need is never requested. `fetch` of a file the estimate did not foresee
//! downloads it on the spot; `release` deletes what this run downloaded unless
//! `--keep-downloads`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};

use super::FetchError;
use super::cache::{RepoCache, is_commit_sha, is_sha256, sha256_file};
use super::client::{Client, Fetched, HubRepo, Wanted};
use super::env::HubEnv;
use super::plan::{self, Estimator, human_bytes};
use crate::source::{Source, SourceFile, SourceInfo, processing_order};
use crate::tokenize::Tokenizer;

/// What to read from the hub and for which budget.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `--dataset`, e.g. `HuggingFaceFW/fineweb-edu`.
    pub dataset: String,
    /// `--subset`: the folder of the repo to read, e.g. `sample/10BT`.
    pub subset: String,
    /// `--revision`: branch, tag or commit; resolved to a commit sha once.
    pub revision: String,
    /// `--keep-downloads`: keep each parquet file in the hub cache after use.
    pub keep_downloads: bool,
    /// Tokens the pipeline takes from the stream (train + eval, `<s>`/`</s>` included).
    pub tokens_needed: u64,
    /// `--seed`: gives the pipeline's file order ([`processing_order`]), which the plan follows.
    pub seed: u64,
    /// `--out`: its filesystem must also hold the shards.
    pub out_dir: PathBuf,
}

/// Where one file stands in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Started,
    Released,
}

pub struct HubSource {
    client: Client,
    cache: RepoCache,
    repo: HubRepo,
    commit: String,
    offline: bool,
    keep: bool,
    tokens_needed: u64,
    files: Vec<SourceFile>,
    /// The pipeline's processing order (indices into `files`), which the plan follows.
    order: Vec<usize>,
    state: Vec<State>,
    /// Estimated pipeline tokens of each file once its counts are read.
    tokens: Vec<Option<f64>>,
    estimator: Option<Estimator>,
    inflight: HashMap<usize, JoinHandle<Result<Fetched>>>,
    ready: HashMap<usize, Fetched>,
    /// Set until the first `fetch`, which downloads that file, measures it and plans the rest.
    /// Deferred so a run that needs no file (dataset complete, or a resume whose remaining
    /// files are already tokenized) downloads nothing.
    planner: Option<Planner>,
}

/// What the plan needs besides the source itself.
struct Planner {
    /// The reference backend of the run's tokenizer (same ids as any backend), for the ratio.
    tokenizer: Tokenizer,
    cache_dir: PathBuf,
    out_dir: PathBuf,
}

impl std::fmt::Debug for HubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSource")
            .field("repo", &self.repo.id)
            .field("commit", &self.commit)
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

impl HubSource {
    /// Resolves the revision and lists the subset; the first `fetch` plans the downloads.
    pub fn open(opts: &HubOptions, env: &HubEnv, tokenizer: &Tokenizer) -> Result<Self> {
        let repo = HubRepo::dataset(&opts.dataset);
        let cache = RepoCache::new(&env.cache_dir, hf_hub::RepoType::Dataset, &opts.dataset);
        let client = Client::new(env);
        let subset = opts.subset.trim_matches('/');
        let (commit, mut files) = if env.offline {
            offline_listing(&cache, &opts.dataset, &opts.revision, subset)?
        } else {
            online_listing(&client, &cache, &repo, &opts.revision, subset)?
        };
        files.retain(|f| f.path.ends_with(".parquet"));
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if files.is_empty() {
            bail!(
                "--subset {subset}: no parquet files in {}@{commit}; hint: check --subset (FineWeb-Edu has e.g. sample/10BT, sample/100BT, data/CC-MAIN-2024-10) and --dataset",
                opts.dataset
            );
        }
        if let Some(f) = files.iter().find(|f| f.sha256.is_none()) {
            tracing::warn!(
                "{}: the listing gives no LFS sha256, so it cannot be verified after download",
                f.path
            );
        }
        let n = files.len();
        let order = processing_order(&files, opts.seed);
        let total: u64 = files.iter().map(|f| f.size).sum();
        tracing::info!(
            "hub: {}@{commit} {subset}: {n} parquet files, {}{}",
            opts.dataset,
            human_bytes(total),
            if env.offline {
                " (offline: HF_HUB_OFFLINE, cache only)"
            } else {
                ""
            }
        );
        let planner = Planner {
            tokenizer: Tokenizer::from_bytes(tokenizer.json().to_vec())?,
            cache_dir: env.cache_dir.clone(),
            out_dir: opts.out_dir.clone(),
        };
        Ok(HubSource {
            client,
            cache,
            repo,
            commit,
            offline: env.offline,
            keep: opts.keep_downloads,
            tokens_needed: opts.tokens_needed,
            files,
            order,
            state: vec![State::Idle; n],
            tokens: vec![None; n],
            estimator: None,
            inflight: HashMap::new(),
            ready: HashMap::new(),
            planner: Some(planner),
        })
    }

    /// The pinned commit sha every request used.
    pub fn commit(&self) -> &str {
        &self.commit
    }

    /// Downloads `first` (the first file the pipeline asks for), measures the LLaMA-2/GPT-2
    /// ratio on it, prints the plan for the files after it and checks the disk.
    fn plan(&mut self, first: usize, p: Planner) -> Result<()> {
        let order = self.order.clone();
        if !self.offline
            && self
                .cache
                .lookup(&self.commit, &self.files[first].path)
                .is_none()
        {
            plan::check_disk(&[(p.cache_dir.clone(), self.files[first].size)])?;
        }
        // The pipeline needs this file: it is also the measuring sample.
        self.state[first] = State::Started;
        let fetched = self.get(first)?;
        let path = fetched.path.clone();
        self.ready.insert(first, fetched);
        let counts = plan::file_counts(&path)?;
        let ratio = plan::measure_ratio(&path, &p.tokenizer, plan::RATIO_SAMPLE_BYTES)?;
        let Some(ratio) = ratio else {
            tracing::warn!(
                "{}: no token_count column, so no download plan: files are downloaded one at a time as the pipeline asks for them",
                self.files[first].path
            );
            return Ok(());
        };
        let mut est = Estimator::new(ratio.value());
        let first_tokens = est.observe(counts, self.files[first].size);
        self.tokens[first] = first_tokens;
        self.estimator = Some(est.clone());

        let need = self.tokens_needed as f64;
        // Files before `first` in the order were tokenized by an earlier, interrupted run.
        let pos = order.iter().position(|&j| j == first).unwrap_or(0);
        let mut covered = self.tokens_before(first, &est) + first_tokens.unwrap_or(0.0);
        let mut planned = vec![first];
        for &i in &order[pos + 1..] {
            if covered >= need {
                break;
            }
            covered += est.guess(self.files[i].size);
            planned.push(i);
        }
        let bytes: u64 = planned.iter().map(|&i| self.files[i].size).sum();
        let rest: Vec<u64> = planned[1..]
            .iter()
            .filter(|&&i| {
                self.cache
                    .lookup(&self.commit, &self.files[i].path)
                    .is_none()
            })
            .map(|&i| self.files[i].size)
            .collect();
        // Beyond the first file (already on disk): everything when kept, else one more file at
        // a time (file k is read while k+1 downloads; k is deleted before k+2 starts).
        let downloads = if self.offline {
            0
        } else if self.keep {
            rest.iter().sum()
        } else {
            rest.iter().copied().max().unwrap_or(0)
        };
        // u16 tokens, twice: the work files (all tokenized documents) are still on disk when
        // the shards are assembled from them.
        let shards = self.tokens_needed * 2 * 2;
        tracing::info!(
            "plan: {} has {} GPT-2 tokens; LLaMA-2/GPT-2 = {:.4} (measured on {} documents, {}) -> ~{:.0} pipeline tokens",
            self.files[first].path,
            counts.gpt2_tokens.unwrap_or(0),
            ratio.value(),
            ratio.docs,
            human_bytes(ratio.text_bytes),
            first_tokens.unwrap_or(0.0)
        );
        tracing::info!(
            "plan: {} tokens needed -> ~{} of {} files{}, {} (~{:.0} tokens); disk needed: {} more in {} ({}), {} of shards and work files in {}",
            self.tokens_needed,
            planned.len(),
            self.files.len(),
            if pos > 0 {
                format!(" after the {pos} an earlier run tokenized")
            } else {
                String::new()
            },
            human_bytes(bytes),
            covered,
            human_bytes(downloads),
            p.cache_dir.display(),
            if self.keep {
                "--keep-downloads"
            } else {
                "each file deleted after use"
            },
            human_bytes(shards),
            p.out_dir.display()
        );
        if covered < need {
            tracing::warn!(
                "plan: the whole subset holds only ~{covered:.0} tokens, less than the {} needed",
                self.tokens_needed
            );
        }
        let disks = plan::check_disk(&[
            (p.cache_dir.clone(), downloads),
            (p.out_dir.clone(), shards),
        ])?;
        for d in disks {
            tracing::info!(
                "plan: disk of {}: {} needed, {} free",
                d.dir.display(),
                human_bytes(d.needed),
                human_bytes(d.free)
            );
        }
        Ok(())
    }

    /// Estimated tokens in the files the pipeline reads before file `i`: when they cover the
    /// budget, file `i` is beyond need. Counted in processing order, so files a resumed run
    /// skips (their work is already done) count too.
    fn tokens_before(&self, i: usize, est: &Estimator) -> f64 {
        self.order
            .iter()
            .take_while(|&&j| j != i)
            .map(|&j| self.tokens[j].unwrap_or_else(|| est.guess(self.files[j].size)))
            .sum()
    }

    /// Whether the estimate says file `i` is needed (always, without an estimate).
    fn needed(&self, i: usize) -> bool {
        self.estimator
            .as_ref()
            .is_none_or(|est| self.tokens_before(i, est) < self.tokens_needed as f64)
    }

    fn wanted(&self, i: usize) -> Wanted {
        Wanted {
            repo: self.repo.clone(),
            revision: self.commit.clone(),
            path: self.files[i].path.clone(),
            size: Some(self.files[i].size),
            sha256: self.files[i].sha256.clone(),
        }
    }

    /// File `i` from the cache (offline) or the hub, on this thread.
    fn get(&self, i: usize) -> Result<Fetched> {
        let fetched = if self.offline {
            self.cached(i)?
        } else {
            self.mark_temporary(i);
            self.client.download(&self.cache, &self.wanted(i))?
        };
        Ok(self.adopt(fetched))
    }

    /// Before downloading without `--keep-downloads`: mark the blob as ours to delete.
    fn mark_temporary(&self, i: usize) {
        let Some(key) = &self.files[i].sha256 else {
            return;
        };
        if self.keep || self.cache.blob(key).exists() {
            return;
        }
        let mark = self.cache.temporary_mark(key);
        let made = mark
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::File::create(&mark).map(drop));
        if let Err(e) = made {
            tracing::warn!("cannot write {}: {e}", mark.display());
        }
    }

    /// A blob marked temporary (by this run or a killed one) is deleted after use, unless this
    /// run keeps downloads, which adopts it.
    fn adopt(&self, mut f: Fetched) -> Fetched {
        let mark = self.cache.temporary_mark(&f.key);
        if mark.exists() {
            if self.keep {
                std::fs::remove_file(&mark).ok();
                f.downloaded = false;
            } else {
                f.downloaded = true;
            }
        }
        f
    }

    /// File `i` from the cache only (offline).
    fn cached(&self, i: usize) -> Result<Fetched> {
        let f = &self.files[i];
        let Some(path) = self.cache.lookup(&self.commit, &f.path) else {
            return Err(FetchError::OfflineMissing {
                file: format!("{}@{}: {}", self.repo.id, self.commit, f.path),
                looked: self.cache.pointer(&self.commit, &f.path),
            }
            .into());
        };
        let actual =
            sha256_file(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(expected) = &f.sha256
            && *expected != actual
        {
            return Err(FetchError::ShaMismatch {
                file: f.path.clone(),
                expected: expected.clone(),
                actual,
            }
            .into());
        }
        Ok(Fetched {
            file: f.path.clone(),
            path,
            key: actual.clone(),
            sha256: Some(actual),
            commit: self.commit.clone(),
            downloaded: false,
        })
    }

    fn delete_download(&self, f: &Fetched) {
        if f.downloaded
            && !self.keep
            && let Err(e) = self.cache.remove(&f.commit, &f.file, &f.key)
        {
            tracing::warn!("cannot delete the download {}: {e}", f.path.display());
        }
    }
}

impl Source for HubSource {
    fn describe(&self) -> SourceInfo {
        SourceInfo {
            repo: self.repo.id.clone(),
            revision: self.commit.clone(),
        }
    }

    fn files(&self) -> &[SourceFile] {
        &self.files
    }

    fn fetch(&mut self, i: usize) -> Result<PathBuf> {
        if let Some(p) = self.planner.take() {
            self.plan(i, p)?;
        }
        if !self.ready.contains_key(&i) {
            let fetched = match self.inflight.remove(&i) {
                Some(handle) => self.adopt(handle.join().map_err(|_| {
                    anyhow!("{}: the download thread panicked", self.files[i].path)
                })??),
                None => {
                    if !self.needed(i) {
                        tracing::info!(
                            "{}: fetching one more file than planned (the estimate was short)",
                            self.files[i].path
                        );
                    }
                    self.state[i] = State::Started;
                    self.get(i)?
                }
            };
            self.state[i] = State::Started;
            if let Some(est) = &mut self.estimator
                && self.tokens[i].is_none()
            {
                // Refine: the real token_count of this file replaces the size-based guess.
                let counts = plan::file_counts(&fetched.path)?;
                self.tokens[i] = est.observe(counts, self.files[i].size);
            }
            self.ready.insert(i, fetched);
        }
        // Start the next file of the order now, so it downloads while this one is tokenized
        // (prefetch declines when the estimate says it is beyond need).
        if self.estimator.is_some()
            && let Some(pos) = self.order.iter().position(|&j| j == i)
            && let Some(&next) = self.order.get(pos + 1)
        {
            self.prefetch(next)?;
        }
        Ok(self.ready[&i].path.clone())
    }

    /// A fetch hashes the bytes it hands over: a download or a cached blob is checked against
    /// the listing's LFS sha256 (files without one are only size-checked: `None`, and the
    /// pipeline hashes them), and the offline cache hashes what it finds.
    fn verified_sha256(&self, i: usize) -> Option<String> {
        self.ready.get(&i).and_then(|f| f.sha256.clone())
    }

    fn prefetch(&mut self, i: usize) -> Result<()> {
        // Before the plan there is no estimate: the pipeline's first fetch comes first.
        if self.offline
            || self.planner.is_some()
            || i >= self.files.len()
            || self.state[i] != State::Idle
        {
            return Ok(());
        }
        if !self.needed(i) {
            tracing::debug!(
                "not prefetching {}: the files before it should cover the {} tokens needed",
                self.files[i].path,
                self.tokens_needed
            );
            return Ok(());
        }
        self.state[i] = State::Started;
        let client = self.client.clone();
        let cache = self.cache.clone();
        self.mark_temporary(i);
        let wanted = self.wanted(i);
        let handle = std::thread::Builder::new()
            .name(format!("download-{i}"))
            .spawn(move || client.download(&cache, &wanted))
            .context("cannot start a download thread")?;
        self.inflight.insert(i, handle);
        Ok(())
    }

    fn release(&mut self, i: usize) -> Result<()> {
        if let Some(handle) = self.inflight.remove(&i)
            && let Ok(Ok(f)) = handle.join()
        {
            self.ready.insert(i, f);
        }
        if let Some(f) = self.ready.remove(&i) {
            self.delete_download(&f);
        } else if let Some(key) = &self.files[i].sha256
            && !self.keep
            && self.cache.temporary_mark(key).exists()
        {
            // Downloaded by a run killed after it finished this file's work file.
            if let Err(e) = self.cache.remove(&self.commit, &self.files[i].path, key) {
                tracing::warn!("cannot delete the download of {}: {e}", self.files[i].path);
            }
        }
        if i < self.state.len() {
            self.state[i] = State::Released;
        }
        Ok(())
    }
}

impl Drop for HubSource {
    fn drop(&mut self) {
        // Abandon downloads in flight (their partial files stay and resume next run) and delete
        // finished downloads nobody released, so an error does not leave gigabytes behind.
        self.client.cancel_flag().store(true, Ordering::Relaxed);
        let mut left: Vec<Fetched> = self.ready.drain().map(|(_, f)| f).collect();
        for (_, handle) in self.inflight.drain() {
            if let Ok(Ok(f)) = handle.join() {
                left.push(f);
            }
        }
        for f in &left {
            self.delete_download(f);
        }
    }
}

fn online_listing(
    client: &Client,
    cache: &RepoCache,
    repo: &HubRepo,
    revision: &str,
    subset: &str,
) -> Result<(String, Vec<SourceFile>)> {
    let commit = client.resolve_revision(repo, revision)?;
    if revision != commit {
        tracing::info!("hub: {} revision {revision} is commit {commit}", repo.id);
    }
    cache
        .write_ref(revision, &commit)
        .with_context(|| format!("cannot write {}", cache.ref_file(revision).display()))?;
    let files: Vec<SourceFile> = client
        .list_tree(repo, &commit, subset)?
        .into_iter()
        .map(|t| SourceFile {
            path: t.path,
            size: t.size,
            sha256: t.sha256,
        })
        .collect();
    if let Err(e) = cache.save_listing(&commit, subset, &files) {
        tracing::warn!("cannot save the listing for offline runs: {e}");
    }
    Ok((commit, files))
}

fn offline_listing(
    cache: &RepoCache,
    dataset: &str,
    revision: &str,
    subset: &str,
) -> Result<(String, Vec<SourceFile>)> {
    let commit = if is_commit_sha(revision) {
        revision.to_owned()
    } else {
        cache
            .read_ref(revision)
            .ok_or_else(|| FetchError::OfflineMissing {
                file: format!("{dataset} revision {revision}"),
                looked: cache.ref_file(revision),
            })?
    };
    if let Some(files) = cache.load_listing(&commit, subset) {
        return Ok((commit, files));
    }
    // A cache filled by Python `huggingface_hub` has no listing of ours: use its snapshot.
    let root = cache.pointer(&commit, "");
    let mut files = Vec::new();
    scan_snapshot(&root, &root.join(subset), &mut files);
    if files.is_empty() {
        return Err(FetchError::OfflineMissing {
            file: format!("{dataset}@{commit}: the listing of {subset}"),
            looked: cache.listing_file(&commit, subset),
        }
        .into());
    }
    tracing::warn!(
        "offline: no saved listing for {subset}; using the {} files present in the cache snapshot",
        files.len()
    );
    Ok((commit, files))
}

fn scan_snapshot(root: &Path, dir: &Path, out: &mut Vec<SourceFile>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            scan_snapshot(root, &path, out);
        } else if let (Ok(meta), Ok(rel)) = (std::fs::metadata(&path), path.strip_prefix(root)) {
            // Blobs are named by their sha256: the link target says what the bytes must hash to.
            let sha256 = std::fs::read_link(&path)
                .ok()
                .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
                .filter(|n| is_sha256(n));
            out.push(SourceFile {
                path: rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/"),
                size: meta.len(),
                sha256,
            });
        }
    }
}
