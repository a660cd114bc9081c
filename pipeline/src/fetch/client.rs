//! HTTP to the hub: revision -> commit sha, the paginated tree listing, and verified, resumable
//! downloads into the [`RepoCache`].
//!
//! A download is: `HEAD .../resolve/<commit>/<path>` without following redirects (headers
//! `X-Repo-Commit`, `X-Linked-Etag` = sha256, `X-Linked-Size`, `Location` = a signed CDN URL),
//! then `GET <Location>` with `Range: bytes=<on disk>-` into `blobs/<sha256>.incomplete`. When the
//! connection drops it continues from the bytes on disk; when the signed URL has expired (the
//! CDN answers 403/410) it resolves again. 429/5xx/connection errors are retried with exponential
//! backoff and jitter, or after exactly `Retry-After` when the server says so. Finally the sha256
//! of the whole file must equal the LFS oid, or the file is deleted and the run fails.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::{Repo, RepoType};
use ureq::http::Response;

use super::FetchError;
use super::cache::{RepoCache, is_commit_sha, is_sha256, sha256_file};
use super::env::HubEnv;
use super::progress::DownloadProgress;

/// How hard to try before giving up on a request.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Failed attempts in a row before the error is returned (progress resets the count).
    pub attempts: u32,
    /// First backoff; doubles per failure, with jitter in [50%, 100%].
    pub base: Duration,
    pub max_backoff: Duration,
    /// A `Retry-After` longer than this is cut to it (a misconfigured mirror must not stall us
    /// for hours).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            base: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// A repo on the hub: a dataset or a model, by id (`owner/name`).
#[derive(Debug, Clone)]
pub struct HubRepo {
    pub kind: RepoType,
    pub id: String,
}

impl HubRepo {
    pub fn dataset(id: &str) -> Self {
        HubRepo {
            kind: RepoType::Dataset,
            id: id.to_owned(),
        }
    }

    pub fn model(id: &str) -> Self {
        HubRepo {
            kind: RepoType::Model,
            id: id.to_owned(),
        }
    }

    fn at(&self, revision: &str) -> Repo {
        Repo::with_revision(self.id.clone(), self.kind, revision.to_owned())
    }

    fn kind_plural(&self) -> &'static str {
        match self.kind {
            RepoType::Dataset => "datasets",
            RepoType::Model => "models",
            RepoType::Space => "spaces",
        }
    }
}

/// A file of a listing: relative path, size and (for LFS files) sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    pub path: String,
    pub size: u64,
    pub sha256: Option<String>,
}

/// What a download asks for. `revision` goes into the URL: the pinned commit for dataset files,
/// a branch for the tokenizer (whose commit then comes from `X-Repo-Commit`).
#[derive(Debug, Clone)]
pub struct Wanted {
    pub repo: HubRepo,
    pub revision: String,
    pub path: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

/// A file now in the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The file's path in the repo, e.g. `sample/10BT/000_00000.parquet`.
    pub file: String,
    /// `snapshots/<commit>/<path>` (what the pipeline opens).
    pub path: PathBuf,
    /// Cache key of the blob (its sha256 for LFS files).
    pub key: String,
    /// Verified sha256, when the hub published one.
    pub sha256: Option<String>,
    pub commit: String,
    /// This run transferred it (so this run may delete it); false when it was already cached.
    pub downloaded: bool,
}

/// One attempt's outcome, for [`Client::with_retries`].
enum Step<T> {
    Done(T),
    Retry {
        after: Option<Duration>,
        why: String,
        /// Bytes arrived before the failure: the attempt counter restarts.
        progressed: bool,
    },
    Fail(anyhow::Error),
}

fn retry<T>(why: impl Into<String>) -> Step<T> {
    Step::Retry {
        after: None,
        why: why.into(),
        progressed: false,
    }
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    pub retry: RetryPolicy,
    /// Set to abandon a download at the next chunk (the partial file stays for a later resume).
    cancel: Arc<AtomicBool>,
    /// Some request of this client got an HTTP answer: the network and the endpoint work, so a
    /// connection error is worth the full retry policy. Before that, it most likely means no
    /// network or a wrong `HF_ENDPOINT`, and minutes of retries would only hide it.
    reached: Arc<AtomicBool>,
    unreached_failures: Arc<std::sync::atomic::AtomicU32>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(env: &HubEnv) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Statuses are answers to act on (429, expired signed URL), not errors.
            .http_status_as_error(false)
            // Redirects are followed by hand: the resolve answer carries the headers we check,
            // and an expired signed URL must send us back to resolve.
            .max_redirects(0)
            // Raw bytes: a transparently gunzipped body would break Range offsets and sha256.
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .user_agent(format!(
                "pipeline/{}; hf-hub/0.5; rust",
                env!("CARGO_PKG_VERSION")
            ))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // A stalled body (no byte for this long) is a connection error to retry.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            endpoint: env.endpoint.clone(),
            token: env.token.clone(),
            retry: RetryPolicy::default(),
            cancel: Arc::new(AtomicBool::new(false)),
            reached: Arc::new(AtomicBool::new(false)),
            unreached_failures: Arc::new(std::sync::atomic::AtomicU32::new(0)),
        }
    }

    pub(crate) fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `GET`/`HEAD` once. The token goes only to the hub itself (`auth`), never to the signed
    /// URL a resolve redirects to: that URL carries its own signature, and the CDN may be anyone.
    fn call(
        &self,
        head: bool,
        url: &str,
        range_from: Option<u64>,
        auth: bool,
    ) -> Result<Response<ureq::Body>, ureq::Error> {
        let mut req = if head {
            self.agent.head(url)
        } else {
            self.agent.get(url)
        };
        if let Some(token) = &self.token
            && auth
            && url.starts_with(&self.endpoint)
        {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(from) = range_from {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let resp = req.call();
        if resp.is_ok() {
            self.reached.store(true, Ordering::Relaxed);
        }
        resp
    }

    /// Runs `attempt` until it is done or fails for good; waits between tries.
    fn with_retries<T>(&self, what: &str, mut attempt: impl FnMut() -> Step<T>) -> Result<T> {
        let mut failures = 0u32;
        loop {
            match attempt() {
                Step::Done(v) => return Ok(v),
                Step::Fail(e) => return Err(e),
                Step::Retry {
                    after,
                    why,
                    progressed,
                } => {
                    if self.cancel.load(Ordering::Relaxed) {
                        bail!("{what}: cancelled");
                    }
                    if progressed {
                        failures = 0;
                    }
                    failures += 1;
                    if failures >= self.retry.attempts {
                        bail!(
                            "{what}: giving up after {failures} failed attempts in a row, last: {why}; hint: check the network and HF_ENDPOINT ({}), then re-run: finished downloads are kept and partial ones resume",
                            self.endpoint
                        );
                    }
                    let wait = match after {
                        Some(d) => d.min(self.retry.max_retry_after),
                        None if progressed => Duration::from_millis(200),
                        None => self.backoff(failures),
                    };
                    tracing::warn!(
                        "{what}: {why}; retry {failures}/{} in {:.1}s",
                        self.retry.attempts - 1,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// `base * 2^(n-1)`, capped, times a random factor in [0.5, 1.0] ("equal jitter") so many
    /// clients hit by the same outage do not come back in lockstep.
    fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .retry
            .base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16));
        let capped = exp.min(self.retry.max_backoff);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(n);
        let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        capped.mul_f64(0.5 + 0.5 * unit)
    }

    /// Classifies a request that got no answer: a dropped or refused connection may be
    /// transient and is retried; a host that does not resolve or a bad URL is not (without
    /// network, retrying would only delay the error by minutes).
    fn transport<T>(&self, e: ureq::Error) -> Step<T> {
        let unreachable = || {
            Step::Fail(anyhow!(
                "{}: {e}; hint: check the network and HF_ENDPOINT; without network, set HF_HUB_OFFLINE=1 to use the hub cache, or pass --source DIR and --tokenizer PATH",
                self.endpoint
            ))
        };
        match e {
            ureq::Error::HostNotFound
            | ureq::Error::BadUri(_)
            | ureq::Error::RequireHttpsOnly(_)
            | ureq::Error::InvalidProxyUrl => unreachable(),
            _ if !self.reached.load(Ordering::Relaxed)
                && self.unreached_failures.fetch_add(1, Ordering::Relaxed) >= 1 =>
            {
                unreachable()
            }
            e => retry(e.to_string()),
        }
    }

    /// Classifies an answer that is not what we wanted.
    fn bad_status<T>(&self, what: &str, repo: &HubRepo, resp: &Response<ureq::Body>) -> Step<T> {
        let status = resp.status().as_u16();
        match status {
            429 | 408 | 500..=599 => Step::Retry {
                after: retry_after(resp),
                why: format!("HTTP {status}"),
                progressed: false,
            },
            401 | 403 => Step::Fail(
                FetchError::Gated {
                    repo: repo.id.clone(),
                    page: format!("https://huggingface.co/{}", repo.at("main").url()),
                    file: what.to_owned(),
                    status,
                }
                .into(),
            ),
            404 => Step::Fail(anyhow!(
                "{what}: not found on {} ({} {}: HTTP 404{}); hint: check --dataset, --subset and --revision (or the --tokenizer repo id)",
                self.endpoint,
                repo.kind_plural(),
                repo.id,
                header(resp, "x-error-code")
                    .map(|c| format!(", {c}"))
                    .unwrap_or_default()
            )),
            _ => Step::Fail(anyhow!(
                "{what}: unexpected HTTP {status} from {}; hint: check HF_ENDPOINT",
                self.endpoint
            )),
        }
    }

    /// `GET /api/{datasets|models}/{repo}/revision/{rev}` -> the commit sha.
    pub fn resolve_revision(&self, repo: &HubRepo, revision: &str) -> Result<String> {
        let url = format!("{}/api/{}", self.endpoint, repo.at(revision).api_url());
        let what = format!("{} revision {revision}", repo.id);
        let json: serde_json::Value =
            self.with_retries(&what, || match self.call(false, &url, None, true) {
                Err(e) => self.transport(e),
                Ok(resp) if resp.status().is_success() => match read_json(resp) {
                    Ok(v) => Step::Done(v),
                    Err(e) => retry(e.to_string()),
                },
                Ok(resp) => self.bad_status(&what, repo, &resp),
            })?;
        let sha = json
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| is_commit_sha(s))
            .ok_or_else(|| {
                anyhow!("{url}: the answer has no 40-hex `sha`; hint: is HF_ENDPOINT a hub?")
            })?;
        Ok(sha.to_owned())
    }

    /// Every file below `folder` at `commit` (`/api/.../tree/...?recursive=true`, following
    /// `Link: <...>; rel="next"` pages).
    pub fn list_tree(&self, repo: &HubRepo, commit: &str, folder: &str) -> Result<Vec<TreeFile>> {
        let folder = folder.trim_matches('/');
        let mut url = Some(format!(
            "{}/api/{}/{}/tree/{commit}/{}?recursive=true&expand=false",
            self.endpoint,
            repo.kind_plural(),
            repo.id,
            encode_path(folder)
        ));
        let what = format!("{}@{commit}: listing of {folder}", repo.id);
        let mut files = Vec::new();
        while let Some(page_url) = url.take() {
            let (entries, next) =
                self.with_retries(&what, || match self.call(false, &page_url, None, true) {
                    Err(e) => self.transport(e),
                    Ok(resp) if resp.status().is_success() => {
                        let next = header(&resp, "link").and_then(|l| next_link(&l));
                        match read_json::<Vec<serde_json::Value>>(resp) {
                            Ok(v) => Step::Done((v, next)),
                            Err(e) => retry(e.to_string()),
                        }
                    }
                    Ok(resp) => self.bad_status(&what, repo, &resp),
                })?;
            for e in entries {
                if e.get("type").and_then(|t| t.as_str()) != Some("file") {
                    continue;
                }
                let path = e.get("path").and_then(|p| p.as_str());
                let size = e.get("size").and_then(|s| s.as_u64());
                let (Some(path), Some(size)) = (path, size) else {
                    bail!(
                        "{what}: an entry lacks `path` or `size`: {e}; hint: is HF_ENDPOINT a hub?"
                    );
                };
                let sha256 = e
                    .pointer("/lfs/oid")
                    .and_then(|o| o.as_str())
                    .map(|o| o.trim_start_matches("sha256:").to_owned())
                    .filter(|o| is_sha256(o));
                files.push(TreeFile {
                    path: path.to_owned(),
                    size,
                    sha256,
                });
            }
            url = next.map(|n| self.absolute(&n));
        }
        Ok(files)
    }

    fn absolute(&self, url: &str) -> String {
        if url.starts_with('/') {
            // A relative Location/Link is relative to the hub's origin.
            let origin_end = self
                .endpoint
                .find("://")
                .and_then(|i| self.endpoint[i + 3..].find('/').map(|j| i + 3 + j))
                .unwrap_or(self.endpoint.len());
            format!("{}{url}", &self.endpoint[..origin_end])
        } else {
            url.to_owned()
        }
    }

    fn resolve_url(&self, w: &Wanted) -> String {
        let repo = w.repo.at(&w.revision);
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            repo.url(),
            repo.url_revision(),
            encode_path(&w.path)
        )
    }

    /// `HEAD` on the resolve URL: where the bytes are and what they must hash to.
    fn resolve(&self, w: &Wanted, url: &str) -> Step<Resolved> {
        let mut url = url.to_owned();
        // A relative redirect stays on the hub (a renamed repo): follow it, as huggingface_hub
        // does. An absolute one is the signed CDN URL the bytes come from.
        let mut hops = 0;
        let (resp, location, direct) = loop {
            let resp = match self.call(true, &url, None, true) {
                Err(e) => return self.transport(e),
                Ok(r) => r,
            };
            let status = resp.status();
            if !(status.is_success() || status.is_redirection()) {
                return self.bad_status(&w.path, &w.repo, &resp);
            }
            if status.is_success() {
                break (resp, url.clone(), true);
            }
            let Some(l) = header(&resp, "location") else {
                return Step::Fail(anyhow!("{url}: redirect without Location"));
            };
            if l.starts_with('/') && hops < 5 {
                hops += 1;
                url = self.absolute(&l);
                continue;
            }
            break (resp, self.absolute(&l), false);
        };
        let unquote = |v: String| v.trim_start_matches("W/").trim_matches('"').to_owned();
        Step::Done(Resolved {
            commit: header(&resp, "x-repo-commit"),
            etag: header(&resp, "x-linked-etag")
                .or_else(|| header(&resp, "etag"))
                .map(unquote),
            size: header(&resp, "x-linked-size")
                .or_else(|| header(&resp, "content-length"))
                .and_then(|s| s.parse().ok()),
            location,
            direct,
        })
    }

    /// Brings `w` into `cache`: verified, resumable, retried. Returns the snapshot path.
    pub fn download(&self, cache: &RepoCache, w: &Wanted) -> Result<Fetched> {
        let resolve_url = self.resolve_url(w);
        let what = w.path.clone();
        let meta = self.with_retries(&what, || self.resolve(w, &resolve_url))?;

        let commit = match (&meta.commit, is_commit_sha(&w.revision)) {
            (Some(c), true) if *c != w.revision => bail!(
                "{}: the hub served commit {c} for pinned revision {}; hint: the mirror at HF_ENDPOINT does not honour pinned revisions",
                w.path,
                w.revision
            ),
            (_, true) => w.revision.clone(),
            (Some(c), false) if is_commit_sha(c) => c.clone(),
            _ => bail!(
                "{}: the hub's answer has no X-Repo-Commit; hint: is HF_ENDPOINT a hub?",
                w.path
            ),
        };
        let linked_sha = meta.etag.clone().filter(|e| is_sha256(e));
        let sha256 = match (&w.sha256, &linked_sha) {
            (Some(listed), Some(linked)) if !listed.eq_ignore_ascii_case(linked) => bail!(
                "{}: the tree listing says sha256 {listed} but resolve says {linked}; hint: re-run (the listing is re-read); if it repeats the mirror is inconsistent",
                w.path
            ),
            (Some(s), _) | (None, Some(s)) => Some(s.to_ascii_lowercase()),
            (None, None) => None,
        };
        let size = w.size.or(meta.size).ok_or_else(|| {
            anyhow!(
                "{}: the hub gave no size (X-Linked-Size / Content-Length)",
                w.path
            )
        })?;
        let key = match (&sha256, &meta.etag) {
            (Some(s), _) => s.clone(),
            (None, Some(e)) if !e.is_empty() && !e.contains('/') => e.clone(),
            _ => bail!("{}: the hub gave no ETag to name the file by", w.path),
        };
        if sha256.is_none() {
            tracing::warn!(
                "{}: not an LFS file, the hub publishes no sha256 for it; only its size is checked",
                w.path
            );
        }

        let blob = cache.blob(&key);
        if let Some(dir) = blob.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the hub cache folder {}", dir.display()))?;
        }
        let lock = cache
            .lock(&key)
            .with_context(|| format!("{}: cannot lock its cache entry", w.path))?;
        let downloaded = if blob.metadata().is_ok_and(|m| m.len() == size) {
            verify(&blob, &w.path, sha256.as_deref())?;
            false
        } else {
            let part = cache.partial(&key);
            self.transfer(w, &resolve_url, (meta.location, meta.direct), &part, size)?;
            verify(&part, &w.path, sha256.as_deref())?;
            fs::rename(&part, &blob)
                .with_context(|| format!("cannot move {} into place", part.display()))?;
            true
        };
        drop(lock);
        let path = cache
            .link(&commit, &w.path, &key)
            .with_context(|| format!("{}: cannot link it into the cache snapshot", w.path))?;
        cache
            .write_ref(&w.revision, &commit)
            .with_context(|| format!("{}: cannot write the cache ref", w.repo.id))?;
        Ok(Fetched {
            file: w.path.clone(),
            path,
            key,
            sha256,
            commit,
            downloaded,
        })
    }

    /// Fills `part` up to `size` bytes, resuming from what it already holds.
    fn transfer(
        &self,
        w: &Wanted,
        resolve_url: &str,
        location: (String, bool),
        part: &std::path::Path,
        size: u64,
    ) -> Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .with_context(|| format!("cannot open {}", part.display()))?;
        let on_disk = |file: &File| file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = on_disk(&file);
        if start > 0 && start < size {
            tracing::info!("{}: resuming at byte {start} of {size}", w.path);
        }
        let mut progress = DownloadProgress::new(&w.path, size, start.min(size));
        let mut location = Some(location);
        let mut buf = vec![0u8; 1 << 18];
        self.with_retries(&w.path, || {
            let mut have = on_disk(&file);
            if have > size {
                // Longer than the file can be: not ours to trust; start over.
                if let Err(e) = file.set_len(0) {
                    return Step::Fail(e.into());
                }
                have = 0;
            }
            if have == size {
                return Step::Done(());
            }
            let (url, direct) = match &location {
                Some(l) => l.clone(),
                None => match self.resolve(w, resolve_url) {
                    Step::Done(r) => {
                        location = Some((r.location.clone(), r.direct));
                        (r.location, r.direct)
                    }
                    Step::Retry { after, why, .. } => {
                        return Step::Retry {
                            after,
                            why,
                            progressed: false,
                        };
                    }
                    Step::Fail(e) => return Step::Fail(e),
                },
            };
            // The token only for a file the hub serves itself, never for a signed URL.
            let resp = match self.call(false, &url, (have > 0).then_some(have), direct) {
                Err(e) => return self.transport(e),
                Ok(r) => r,
            };
            let status = resp.status().as_u16();
            match status {
                206 => {
                    let from = header(&resp, "content-range")
                        .and_then(|r| content_range_start(&r))
                        .unwrap_or(u64::MAX);
                    if from != have {
                        // Not the bytes we asked for: drop the partial file, fetch it whole.
                        if let Err(e) = file.set_len(0) {
                            return Step::Fail(e.into());
                        }
                        return retry(format!("server answered range {from} for {have}"));
                    }
                }
                200 => {
                    // The server ignored Range and sends the whole file.
                    if have > 0
                        && let Err(e) = file.set_len(0)
                    {
                        return Step::Fail(e.into());
                    }
                    have = 0;
                }
                416 => {
                    if let Err(e) = file.set_len(0) {
                        return Step::Fail(e.into());
                    }
                    return retry("HTTP 416 for the partial file; starting over");
                }
                401 | 403 | 404 | 410 if !direct => {
                    // The signed CDN URL expired (S3 says 403): resolve again, right away.
                    location = None;
                    return Step::Retry {
                        after: Some(Duration::ZERO),
                        why: format!("the signed download URL answered {status} (expired)"),
                        progressed: false,
                    };
                }
                _ => return self.bad_status(&w.path, &w.repo, &resp),
            }
            let mut body = resp.into_body().into_reader();
            let mut got = 0u64;
            loop {
                if self.cancel.load(Ordering::Relaxed) {
                    return Step::Fail(anyhow!("{}: download cancelled", w.path));
                }
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        return Step::Retry {
                            after: None,
                            why: format!("connection error after {} bytes: {e}", have + got),
                            progressed: got > 0,
                        };
                    }
                };
                let room = (size - have - got).min(n as u64) as usize;
                if let Err(e) = file.write_all(&buf[..room]) {
                    return Step::Fail(anyhow::Error::from(e).context(format!(
                        "cannot write {}; hint: is the disk full?",
                        part.display()
                    )));
                }
                got += room as u64;
                progress.set(have + got);
                if room < n {
                    break;
                }
            }
            if have + got < size {
                return Step::Retry {
                    after: None,
                    why: format!("connection closed at byte {} of {size}", have + got),
                    progressed: got > 0,
                };
            }
            Step::Done(())
        })?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", part.display()))?;
        progress.finish();
        Ok(())
    }
}

struct Resolved {
    commit: Option<String>,
    etag: Option<String>,
    size: Option<u64>,
    /// Where the bytes are: a signed CDN URL, or the hub URL itself for a non-LFS file.
    location: String,
    /// `location` is the hub itself (send the token), not a signed URL.
    direct: bool,
}

/// Checks `path` against the expected sha256; a mismatch deletes the file.
fn verify(path: &std::path::Path, name: &str, sha256: Option<&str>) -> Result<()> {
    let Some(expected) = sha256 else {
        return Ok(());
    };
    let actual =
        sha256_file(path).with_context(|| format!("cannot read {} to hash it", path.display()))?;
    if actual != expected {
        fs::remove_file(path).ok();
        return Err(FetchError::ShaMismatch {
            file: name.to_owned(),
            expected: expected.to_owned(),
            actual,
        }
        .into());
    }
    Ok(())
}

fn header(resp: &Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn read_json<T: serde::de::DeserializeOwned>(resp: Response<ureq::Body>) -> Result<T> {
    let bytes = resp
        .into_body()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// `Retry-After: <seconds>`; an HTTP-date (rare on the hub) falls back to our own backoff.
fn retry_after(resp: &Response<ureq::Body>) -> Option<Duration> {
    let v = header(resp, "retry-after")?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The `rel="next"` target of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        is_next.then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

/// First byte of `Content-Range: bytes <first>-<last>/<size>`.
fn content_range_start(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Percent-encodes a repo path for a URL, keeping `/` separators.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next_page() {
        let l = r#"<https://huggingface.co/api/datasets/a/b/tree/x/y?recursive=true&cursor=ZZ>; rel="next""#;
        assert_eq!(
            next_link(l).as_deref(),
            Some("https://huggingface.co/api/datasets/a/b/tree/x/y?recursive=true&cursor=ZZ")
        );
        assert_eq!(next_link(r#"<https://x/1>; rel="prev""#), None);
        assert_eq!(
            next_link(r#"<https://x/1>; rel="prev", <https://x/3>; rel="next""#).as_deref(),
            Some("https://x/3")
        );
    }

    #[test]
    fn content_range_and_paths() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(
            encode_path("sample/10BT/a b.parquet"),
            "sample/10BT/a%20b.parquet"
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let c = Client::new(&HubEnv::from_lookup(|_| None));
        for n in 1..=10 {
            let d = c.backoff(n);
            let full = (c.retry.base * (1 << (n - 1))).min(c.retry.max_backoff);
            assert!(d >= full / 2 && d <= full, "attempt {n}: {d:?} vs {full:?}");
        }
    }

    #[test]
    fn an_endpoint_never_reached_fails_fast_with_an_offline_hint() {
        // A port nothing listens on: refused at once, like a machine without network.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut env = HubEnv::from_lookup(|_| None);
        env.endpoint = format!("http://127.0.0.1:{port}");
        let mut c = Client::new(&env);
        c.retry.base = Duration::from_millis(10);
        let start = std::time::Instant::now();
        let err = c
            .resolve_revision(&HubRepo::dataset("a/b"), "main")
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("HF_HUB_OFFLINE") && msg.contains("hint:"),
            "{msg}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn relative_locations_join_the_endpoint_origin() {
        let mut env = HubEnv::from_lookup(|_| None);
        env.endpoint = "http://127.0.0.1:8080/mirror".into();
        let c = Client::new(&env);
        assert_eq!(c.absolute("/x/y"), "http://127.0.0.1:8080/x/y");
        assert_eq!(c.absolute("https://cdn/x"), "https://cdn/x");
    }
}
