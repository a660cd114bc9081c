//! The output folder of `prepare` while it is being made: where the work files go, the hint
//! for a file that cannot be written there, and the clean-up of files the finished dataset does
//! not list. The names themselves are the format's ([`crate::format`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};

use crate::format::{WORK_DIR, is_tmp_file, shard::is_shard_file, work_file_name};

/// Ends the error of a file `prepare` cannot create in the output folder.
pub const WRITE_HINT: &str = "hint: --out must be a writable folder with free space";

/// `OUT/.work/00003-000_00000.tok`: the work file of the source file at position `k` of the
/// processing order.
pub fn work_path(out: &Path, k: usize, source_path: &str) -> PathBuf {
    out.join(WORK_DIR).join(work_file_name(k, source_path))
}

/// Removes every temporary file, and every shard file not named in `keep`: leftovers of an
/// earlier run with a larger budget or of an interrupted write.
pub fn remove_stale_files(out: &Path, keep: &HashSet<&str>) -> Result<()> {
    for entry in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (is_shard_file(&name) && !keep.contains(name.as_str())) || is_tmp_file(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Removes the work folder, several files at a time: dropping a file's cached pages is most of
/// the cost of deleting it (about 1 ms per 4 MB here, over a second for the work files of the full
/// run), and that part runs outside the folder's lock.
pub fn remove_work_dir(out: &Path, threads: usize) -> Result<()> {
    let dir = out.join(WORK_DIR);
    if !dir.exists() {
        return Ok(());
    }
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, files.len().max(1)) {
            s.spawn(|| {
                while let Some(f) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    // Whatever is left is removed (or reported) below.
                    let _ = std::fs::remove_file(f);
                }
            });
        }
    });
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))
}
