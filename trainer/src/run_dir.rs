//! The run folder `runs/<run_id>/`: its name, its creation, its lock, and finding the run and
//! checkpoint that `--resume latest` means. Everything that creates folders under `runs/` lives
//! here.
//!
//! A [`RunDir`] holds the folder's [`FolderLock`] (`runs/<run_id>/.lock`) for as long as it or a
//! clone lives: one process at a time trains in a run folder, and a second `trainer run --resume`
//! on it (a requeued job, a second terminal) fails at once, naming the holder.
//!
//! ```text
//! runs/<run_id>/
//!   checkpoints/step_NNNNNN/{model.safetensors, optimizer.safetensors, state.json,
//!                            checksums.sha256}
//! ```
//! (instrumentation adds meta/, metrics/, eval/, samples/, anomalies/ next to checkpoints/).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use pipeline::lock::FolderLock;

use crate::checkpoint;
use crate::config::Config;
use crate::model::parameter_count;

/// Name of the checkpoints folder inside a run.
pub const CHECKPOINTS: &str = "checkpoints";

/// `bitnet_<size>_<dataset>_T<budget>_<unix time>`, e.g. `bitnet_95M_fineweb_T1.97B_1703097600`
/// (the run-folder contract, README), derived from the config: parameter count, `[data] dataset`, total tokens.
pub fn run_id(cfg: &Config, unix_time: u64) -> String {
    crate::instrument::provenance::run_id(
        parameter_count(&cfg.model) as u64,
        &cfg.data.dataset,
        cfg.total_tokens(),
        unix_time,
    )
}

/// What the error for a run folder held by another process suggests besides waiting.
const LOCK_HINT: &str = "then resume with --resume latest (Ctrl-C or kill -INT makes a run write a checkpoint before it stops); a run without --resume gets a folder of its own";

/// An existing run folder, locked by this process.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
    _lock: Arc<FolderLock>,
}

impl RunDir {
    /// Creates `root/<run_id>/checkpoints/` for a fresh run; a name taken in the same second gets a
    /// `_1`, `_2`, ... suffix.
    pub fn create(root: &Path, cfg: &Config) -> Result<RunDir> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = run_id(cfg, now);
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating the run folder root {}", root.display()))?;
        for n in 0.. {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}_{n}")
            };
            let path = root.join(&name);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let lock = FolderLock::acquire(&path, LOCK_HINT)?;
                    std::fs::create_dir(path.join(CHECKPOINTS)).with_context(|| {
                        format!("creating {}", path.join(CHECKPOINTS).display())
                    })?;
                    return Ok(RunDir {
                        path,
                        _lock: Arc::new(lock),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        unreachable!("some suffix is free")
    }

    /// The run a checkpoint folder `runs/<id>/checkpoints/step_NNNNNN` belongs to, locked for
    /// this process: fails at once when another process holds it.
    pub fn of_checkpoint(checkpoint: &Path) -> Result<RunDir> {
        let checkpoints = checkpoint.parent().filter(|p| p.ends_with(CHECKPOINTS));
        match checkpoints.and_then(Path::parent) {
            Some(run) => Ok(RunDir {
                path: run.to_owned(),
                _lock: Arc::new(FolderLock::acquire(run, LOCK_HINT)?),
            }),
            None => bail!(
                "{}: not inside `<run>/checkpoints/`; hint: pass runs/<run_id>/checkpoints/step_NNNNNN",
                checkpoint.display()
            ),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run id (the folder name).
    pub fn id(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.path.join(CHECKPOINTS)
    }
}

/// What `--resume latest` means: with `dir` a run folder (it has `checkpoints/`), that run's
/// newest complete checkpoint; with `dir` a folder of runs, the newest complete checkpoint of the
/// run written to most recently.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(CHECKPOINTS).is_dir() {
        return checkpoint::list_complete(&dir.join(CHECKPOINTS))?
            .pop()
            .map(|(_, p)| p)
            .with_context(|| {
                format!(
                    "{}: no complete checkpoint; hint: start a fresh run without --resume",
                    dir.display()
                )
            });
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list runs; hint: pass --run-dir", dir.display()))?;
    for entry in entries {
        let run = entry?.path();
        let Some((_, ckpt)) = checkpoint::list_complete(&run.join(CHECKPOINTS))
            .ok()
            .and_then(|mut v| v.pop())
        else {
            continue;
        };
        let written = std::fs::metadata(ckpt.join(checkpoint::STATE_FILE))?.modified()?;
        if best
            .as_ref()
            .is_none_or(|(t, p)| (written, &ckpt) > (*t, p))
        {
            best = Some((written, ckpt));
        }
    }
    best.map(|(_, p)| p).with_context(|| {
        format!(
            "{}: no run with a complete checkpoint; hint: start a fresh run without --resume",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_run_id_matches_the_plan_format() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(
            run_id(&cfg, 1_703_097_600),
            "bitnet_95M_fineweb_T1.97B_1703097600"
        );
    }
}
