//! The local hub cache, in the layout Python `huggingface_hub` and `hf_hub` share:
//!
//! ```text
//! $HF_HUB_CACHE/datasets--HuggingFaceFW--fineweb-edu/
//!   refs/main                                  commit sha the branch pointed to when last resolved
//!   blobs/<sha256>                             the file's bytes, named by its LFS oid
//!   blobs/<sha256>.incomplete                  a download in progress (resumed with HTTP Range)
//!   snapshots/<commit>/sample/10BT/000_00000.parquet -> ../../../../blobs/<sha256>
//!   .pipeline-listings/<commit>/sample--10BT.json    our addition: the tree listing, for offline runs
//! ```
//!
//! Paths come from `hf_hub::{Cache, Repo}` so both tools agree on them. The listing file is ours:
//! offline mode must know which files exist (to name a missing one) without asking the hub.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Re-exported so callers can build a [`RepoCache`] without depending on hf-hub.
pub use hf_hub::RepoType;
use hf_hub::{Cache, Repo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::source::SourceFile;

/// One repo's folder in the hub cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    cache: Cache,
    kind: RepoType,
    id: String,
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct ListedFile {
    path: String,
    size: u64,
    sha256: Option<String>,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, kind: RepoType, id: &str) -> Self {
        let repo = Repo::new(id.to_owned(), kind);
        RepoCache {
            cache: Cache::new(cache_dir.to_owned()),
            kind,
            id: id.to_owned(),
            root: cache_dir.join(repo.folder_name()),
        }
    }

    fn repo_at(&self, revision: &str) -> hf_hub::CacheRepo {
        self.cache.repo(Repo::with_revision(
            self.id.clone(),
            self.kind,
            revision.to_owned(),
        ))
    }

    /// `blobs/<key>` (key: the sha256 for LFS files, the git etag otherwise).
    pub fn blob(&self, key: &str) -> PathBuf {
        self.repo_at("main").blob_path(key)
    }

    /// `blobs/<key>.incomplete`, where a download accumulates until verified.
    pub fn partial(&self, key: &str) -> PathBuf {
        self.blob(&format!("{key}.incomplete"))
    }

    /// `snapshots/<commit>/<path>`.
    pub fn pointer(&self, commit: &str, path: &str) -> PathBuf {
        self.repo_at(commit).pointer_path(commit).join(path)
    }

    /// `refs/<revision>`.
    pub fn ref_file(&self, revision: &str) -> PathBuf {
        self.root.join("refs").join(revision)
    }

    /// The commit `revision` pointed to when it was last resolved online.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let sha = fs::read_to_string(self.ref_file(revision)).ok()?;
        let sha = sha.trim();
        is_commit_sha(sha).then(|| sha.to_owned())
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> io::Result<()> {
        if revision != commit {
            self.repo_at(revision).create_ref(commit)?;
        }
        Ok(())
    }

    /// The snapshot entry for `path` at `commit` if its blob is present.
    pub fn lookup(&self, commit: &str, path: &str) -> Option<PathBuf> {
        let pointer = self.pointer(commit, path);
        // `exists` follows the symlink: a dangling link (blob deleted) is a miss.
        pointer.exists().then_some(pointer)
    }

    /// Points `snapshots/<commit>/<path>` at `blobs/<key>` (a relative symlink, as the hub does).
    pub fn link(&self, commit: &str, path: &str, key: &str) -> io::Result<PathBuf> {
        let pointer = self.pointer(commit, path);
        if let Some(dir) = pointer.parent() {
            fs::create_dir_all(dir)?;
        }
        if pointer.symlink_metadata().is_ok() {
            fs::remove_file(&pointer)?;
        }
        #[cfg(unix)]
        {
            // From snapshots/<commit>/<a>/<b>/file up to the repo folder: one `..` per folder.
            let depth = 1 + path.split('/').count();
            let mut target = PathBuf::new();
            for _ in 0..depth {
                target.push("..");
            }
            target.push("blobs");
            target.push(key);
            std::os::unix::fs::symlink(target, &pointer)?;
        }
        #[cfg(not(unix))]
        fs::copy(self.blob(key), &pointer).map(|_| ())?;
        Ok(pointer)
    }

    /// `.pipeline-downloads/<key>`: marks a blob downloaded without `--keep-downloads`, so it is
    /// deleted after use even when the run that fetched it was killed before using it. Without
    /// the mark, a blob found in the cache is the user's and never deleted.
    pub fn temporary_mark(&self, key: &str) -> PathBuf {
        self.root.join(".pipeline-downloads").join(key)
    }

    /// Deletes a downloaded file: its snapshot entry, its blob and its temporary mark.
    pub fn remove(&self, commit: &str, path: &str, key: &str) -> io::Result<()> {
        let pointer = self.pointer(commit, path);
        if pointer.symlink_metadata().is_ok() {
            fs::remove_file(&pointer)?;
        }
        // The mark goes last: if we die before, the next run still knows the blob is temporary.
        for f in [self.blob(key), self.temporary_mark(key)] {
            match fs::remove_file(f) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Holds `.locks/<repo folder>/<key>.lock` (the lock Python `huggingface_hub` takes for
    /// the same blob) while a download writes `blobs/<key>.incomplete`: two processes appending
    /// to one partial file would corrupt it. Waits for the other process if needed.
    pub fn lock(&self, key: &str) -> io::Result<BlobLock> {
        use std::os::fd::AsRawFd;
        let folder = self.root.file_name().unwrap_or_default();
        let path = self
            .cache
            .path()
            .join(".locks")
            .join(folder)
            .join(format!("{key}.lock"));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on a file descriptor we own and keep open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            tracing::info!(
                "waiting for another process downloading the same file into this cache ({})",
                path.display()
            );
            // SAFETY: as above; this call blocks until the other holder closes its descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(BlobLock { _file: file })
    }

    /// Our record of the tree listing of `folder` at `commit`.
    pub fn listing_file(&self, commit: &str, folder: &str) -> PathBuf {
        let name = folder.trim_matches('/').replace('/', "--");
        self.root
            .join(".pipeline-listings")
            .join(commit)
            .join(format!("{name}.json"))
    }

    pub fn save_listing(&self, commit: &str, folder: &str, files: &[SourceFile]) -> io::Result<()> {
        let listed: Vec<ListedFile> = files
            .iter()
            .map(|f| ListedFile {
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
            })
            .collect();
        let path = self.listing_file(commit, folder);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(&listed).map_err(io::Error::other)?;
        crate::format::shard::write_atomic(&path, &json)
    }

    pub fn load_listing(&self, commit: &str, folder: &str) -> Option<Vec<SourceFile>> {
        let json = fs::read(self.listing_file(commit, folder)).ok()?;
        let listed: Vec<ListedFile> = serde_json::from_slice(&json).ok()?;
        Some(
            listed
                .into_iter()
                .map(|f| SourceFile {
                    path: f.path,
                    size: f.size,
                    sha256: f.sha256,
                })
                .collect(),
        )
    }
}

/// An exclusive lock on one blob of the cache; released when dropped (the descriptor closes).
#[derive(Debug)]
pub struct BlobLock {
    _file: fs::File,
}

/// A full 40-hex git commit sha (what `--revision` may already be).
pub fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A 64-hex sha256 (an LFS oid).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_file_unless(path, &AtomicBool::new(false))
}

/// [`sha256_file`] that gives up (`ErrorKind::Interrupted`) once `stop` is set, checked every
/// MiB: `prepare` stops hashing a file it read ahead for nothing.
pub fn sha256_file_unless(path: &Path, stop: &AtomicBool) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "hashing stopped",
            ));
        }
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_gives_up_once_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        fs::write(&path, b"abc").unwrap();
        let sha = sha256_file(&path).unwrap();
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_file_unless(&path, &AtomicBool::new(false)).unwrap(),
            sha
        );
        let err = sha256_file_unless(&path, &AtomicBool::new(true)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn layout_matches_the_hub_cache() {
        let dir = tempfile::tempdir().unwrap();
        let c = RepoCache::new(dir.path(), RepoType::Dataset, "HuggingFaceFW/fineweb-edu");
        let root = dir.path().join("datasets--HuggingFaceFW--fineweb-edu");
        let commit = "a".repeat(40);
        let key = "b".repeat(64);
        assert_eq!(c.blob(&key), root.join("blobs").join(&key));
        assert_eq!(c.ref_file("main"), root.join("refs/main"));

        std::fs::create_dir_all(root.join("blobs")).unwrap();
        std::fs::write(c.blob(&key), b"bytes").unwrap();
        let p = c.link(&commit, "sample/10BT/x.parquet", &key).unwrap();
        assert_eq!(
            p,
            root.join("snapshots")
                .join(&commit)
                .join("sample/10BT/x.parquet")
        );
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"bytes",
            "relative link resolves"
        );
        assert_eq!(c.lookup(&commit, "sample/10BT/x.parquet"), Some(p.clone()));

        c.write_ref("main", &commit).unwrap();
        assert_eq!(c.read_ref("main"), Some(commit.clone()));

        let lock = c.lock(&key).unwrap();
        assert!(
            dir.path()
                .join(".locks/datasets--HuggingFaceFW--fineweb-edu")
                .join(format!("{key}.lock"))
                .exists()
        );
        drop(lock);
        drop(c.lock(&key).unwrap());

        c.remove(&commit, "sample/10BT/x.parquet", &key).unwrap();
        assert!(c.lookup(&commit, "sample/10BT/x.parquet").is_none());
        assert!(!c.blob(&key).exists());
    }
}
