//! Everything `trainer run` does before its first step, in the order it happens:
//!
//! 1. [`resolve`]: on resume, the lock of the run folder (a second process on it fails here);
//!    the config (the file, or the checkpoint's own config when resuming), validated whole; the
//!    device; the shards checked against the config (format, seq_len, vocab, tokenizer, sizes,
//!    header checksums; the payload hashes are checked on a background thread while the run
//!    starts, [`crate::data::PayloadCheck`]); the data budget (a run whose steps need more
//!    sequences than the shards hold is refused); the free space the checkpoints need (a warning).
//!    A resume whose checkpoint already is where the run stops ends here ([`Plan::NothingToDo`]).
//!    Nothing is written but the lock.
//! 2. [`Resolved::begin`]: a fresh run creates its folder, initialises weights and moments and
//!    writes `step_000000`; a resumed run loads its checkpoint and continues in its folder.
//!
//! Also the process-level set-up of the binary: Ctrl-C handling and the allocator tuning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use pipeline::format::{Manifest, Split};

use crate::checkpoint::{self, RngState, ScheduleState, ShardFingerprint, TrainState};
use crate::config::Config;
use crate::data::{self, DataOrder, SplitData};
use crate::instrument::retention;
use crate::model::Params;
use crate::optim::AdamW;
use crate::run_dir::{self, RunDir};
use crate::schedule;

/// The config `trainer run` uses when neither --config nor a checkpoint names one.
pub const DEFAULT_CONFIG: &str = "configs/bitnet-95m.toml";

/// Which device to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has CUDA and a GPU is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Picks the device; `cuda` fails with a hint on builds without the `cuda` feature.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        // A CUDA build on a machine without a usable GPU: candle's `cuda_if_available` errors
        // instead of answering "no", so fall back here (measured with a stub libcuda).
        DeviceChoice::Auto => Ok(Device::cuda_if_available(0).unwrap_or_else(|e| {
            tracing::warn!("no usable CUDA device ({e}); training on the CPU");
            Device::Cpu
        })),
        DeviceChoice::Cuda => Device::new_cuda(0).context(
            "--device cuda: no usable CUDA device; hint: build with `--features cuda` on a machine with a GPU, or use --device cpu",
        ),
    }
}

/// `cpu` or `cuda:N`, for log lines.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint of the newest run under --run-dir (or of that run).
    Latest,
    /// A checkpoint folder `runs/<id>/checkpoints/step_NNNNNN`.
    Checkpoint(PathBuf),
}

/// The inputs of `trainer run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The dataset folder (`manifest.json` + shards).
    pub shards: PathBuf,
    /// Config file; `None` = [`DEFAULT_CONFIG`], or the checkpoint's config on resume.
    pub config: Option<PathBuf>,
    /// Folder of runs (`runs/`), or one run folder for `--resume latest`.
    pub run_dir: PathBuf,
    /// Stop once this many steps are done (counted from the start of the run), writing `step_N`.
    pub steps: Option<u64>,
    pub resume: Option<Resume>,
    pub device: DeviceChoice,
    /// Re-hash every train and eval payload on a background thread while the run starts, and
    /// stop before the first checkpoint after step 0 on a mismatch (`--no-verify-data`: false).
    pub verify_data: bool,
}

/// The shards, opened and checked against the config.
pub struct Shards {
    /// The dataset folder.
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub data: Arc<SplitData>,
    pub fingerprint: ShardFingerprint,
}

/// Loads the manifest, checks it against `cfg` and opens the train split (headers checked against
/// the manifest; the payloads are re-hashed by [`data::PayloadCheck`]).
pub fn open_shards(dir: &Path, cfg: &Config) -> Result<Shards> {
    let manifest = Manifest::load(dir)?;
    data::check_manifest(&manifest, dir, cfg)?;
    let data = SplitData::open(&manifest, dir, Split::Train)?;
    let fingerprint = ShardFingerprint {
        dataset_sha256: manifest.fingerprint.dataset_sha256.clone(),
        train_sequences: manifest.train.sequences,
        first_1000_token_ids_sha256: manifest.fingerprint.first_1000_token_ids_sha256.clone(),
        tokenizer_sha256: manifest.tokenizer.sha256.clone(),
    };
    Ok(Shards {
        dir: dir.to_owned(),
        manifest,
        data: Arc::new(data),
        fingerprint,
    })
}

/// A run checked from end to end, before anything is written.
pub struct Resolved {
    pub config: Config,
    pub device: Device,
    pub shards: Shards,
    /// The permutation of the train sequences that gives every step its batch.
    pub order: DataOrder,
    /// The checkpoint to continue from.
    pub resume_from: Option<PathBuf>,
    /// Steps already done (0 for a fresh run).
    pub start_step: u64,
    /// Steps done when this invocation stops (unless interrupted).
    pub stop_step: u64,
    run_dir: PathBuf,
    /// The run folder of the checkpoint, locked for this process.
    resumed_run: Option<RunDir>,
}

/// What `trainer run` is to do, once resolved.
pub enum Plan {
    /// Train from `start_step` to `stop_step`.
    Train(Box<Resolved>),
    /// The checkpoint resumed from already is where this command stops (a finished run, or a
    /// requeued `--steps N` job that reached N): nothing to train, nothing to write.
    NothingToDo(NothingToDo),
}

/// A resume with nothing left to do.
#[derive(Debug, Clone)]
pub struct NothingToDo {
    /// The run folder, untouched.
    pub run_dir: PathBuf,
    /// The checkpoint the command would have resumed from.
    pub checkpoint: PathBuf,
    pub step: u64,
    /// One line for the user: where the run stands and how to train further.
    pub message: String,
}

/// Resolves the config, the device, the shards and the data budget of a run (step 1 of the
/// module docs). Writes nothing.
pub fn resolve(opts: &RunOptions) -> Result<Plan> {
    let resume_from = match &opts.resume {
        None => None,
        Some(Resume::Latest) => Some(run_dir::latest_checkpoint(&opts.run_dir)?),
        Some(Resume::Checkpoint(p)) => Some(p.clone()),
    };
    // Before anything else: a second process resuming the same run fails at once.
    let resumed_run = resume_from
        .as_deref()
        .map(RunDir::of_checkpoint)
        .transpose()?;
    let stored = resume_from
        .as_deref()
        .map(checkpoint::load_state)
        .transpose()?;
    let config = match (&resume_from, &stored) {
        (Some(ckpt), Some(state)) => {
            if let Some(path) = &opts.config
                && Config::load(path)? != state.config
            {
                bail!(
                    "{}: differs from the config stored in {}; hint: omit --config when resuming (the run keeps its own config)",
                    path.display(),
                    ckpt.join(checkpoint::STATE_FILE).display()
                );
            }
            state.config.clone()
        }
        _ => Config::load(opts.config.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG)))?,
    };
    let start_step = stored.as_ref().map_or(0, |s| s.step);
    let total = config.training.total_steps;
    let stop_step = opts.steps.unwrap_or(total).min(total);
    if let (Some(ckpt), Some(run)) = (&resume_from, &resumed_run)
        && stop_step <= start_step
    {
        // Before the device and the shards: a requeued job of a finished run exits cleanly even
        // where those are gone.
        return nothing_to_do(ckpt, run, start_step, stop_step, total, opts.steps)
            .map(Plan::NothingToDo);
    }
    let device = select_device(opts.device)?;
    let shards = open_shards(&opts.shards, &config)?;

    let order = DataOrder::new(config.training.seed, shards.data.num_sequences());
    let manifest_path = Manifest::path(&opts.shards);
    data::check_budget(&order, &manifest_path, &config, start_step, stop_step)?;
    if let Err(e) = data::check_budget(&order, &manifest_path, &config, 0, total) {
        tracing::warn!("the full run of total_steps = {total} cannot finish on these shards: {e}");
    }
    let disk_dir = resumed_run
        .as_ref()
        .map_or(opts.run_dir.clone(), |r| r.path().to_owned());
    if let Some(warning) = disk_shortfall(&config, &disk_dir, start_step, stop_step) {
        tracing::warn!("{warning}");
    }
    Ok(Plan::Train(Box::new(Resolved {
        config,
        device,
        shards,
        order,
        resume_from,
        start_step,
        stop_step,
        run_dir: opts.run_dir.clone(),
        resumed_run,
    })))
}

/// A resume from `ckpt` (at step `at`) whose `stop` (`--steps`, at most `total_steps`) is not
/// past it.
/// A run at `total_steps` is complete, whatever --steps says; a requeued job re-runs its command
/// line, so a `--steps N` equal to the checkpoint's step is done too. An explicit --steps below
/// the checkpoint of an unfinished run cannot be honoured (the steps past it are trained
/// already), so it is an error rather than a silent success that could hide a mistyped target.
fn nothing_to_do(
    ckpt: &Path,
    run: &RunDir,
    at: u64,
    stop: u64,
    total: u64,
    steps: Option<u64>,
) -> Result<NothingToDo> {
    let message = match steps {
        _ if at >= total => format!(
            "run {} is already complete at step {at} of total_steps {total}; nothing to do (to train further, raise training.total_steps in a new run)",
            run.id()
        ),
        Some(n) if n == at => format!(
            "run {} is already at step {at} (--steps {n}); nothing to do (to train further, pass a larger --steps, up to total_steps {total})",
            run.id()
        ),
        // Without --steps the stop is total_steps, handled above: this is --steps below `at`.
        _ => bail!(
            "--steps {stop}: the checkpoint {} is already at step {at}; hint: omit --steps or pass one from {} to total_steps {total} to train on, or resume from a checkpoint at or before step {stop} to train that part again",
            ckpt.display(),
            at + 1,
        ),
    };
    Ok(NothingToDo {
        run_dir: run.path().to_owned(),
        checkpoint: ckpt.to_owned(),
        step: at,
        message,
    })
}

/// The warning for a run whose checkpoints (steps `start` (exclusive; 0 for a fresh run, which
/// writes step 0) to `stop`, as many at once as the retention policy keeps) need more space than
/// `dir`'s filesystem has free; `None` when they fit.
pub fn disk_shortfall(cfg: &Config, dir: &Path, start: u64, stop: u64) -> Option<String> {
    let schedule = schedule::checkpoint_schedule(cfg);
    let existing: Vec<u64> = retention::list_checkpoints(&dir.join(run_dir::CHECKPOINTS))
        .unwrap_or_default()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let fresh = existing.is_empty() && start == 0;
    let mut upcoming: Vec<u64> = schedule
        .all_steps()
        .into_iter()
        .filter(|&s| (s > start || (fresh && s == 0)) && s < stop)
        .collect();
    upcoming.push(stop);
    let policy = &cfg.instrumentation.retention;
    let peak = retention::peak_on_disk(&existing, &upcoming, policy, schedule.stage_boundary);
    let new = peak.saturating_sub(existing.len()) as u64;
    let each = checkpoint::bytes_needed(&cfg.model);
    let policy_name = match policy.policy {
        retention::RetentionKind::KeepAll => "keep_all".to_owned(),
        retention::RetentionKind::Ring => format!(
            "ring, ring_last = {}, keep_every = {}",
            policy.ring_last, policy.keep_every
        ),
    };
    pipeline::disk::shortfall(
        dir,
        new * each,
        &format!(
            "{new} more checkpoints of {} (at most {peak} on disk at once under retention {policy_name})",
            pipeline::disk::human_bytes(each)
        ),
        "free some space or use a --run-dir on a larger disk (a fresh run can keep fewer checkpoints with [instrumentation] retention = { policy = \"ring\", ... }); a checkpoint that does not fit stops the run, which then resumes with --resume latest",
    )
}

/// The run folder, the weights and the optimizer moments the loop starts from.
pub struct Begun {
    pub run: RunDir,
    pub params: Params,
    pub optimizer: AdamW,
    /// `step_000000` of a fresh run.
    pub initial_checkpoint: Option<PathBuf>,
}

impl Resolved {
    /// Creates the run folder and writes `step_000000` (fresh run), or loads the checkpoint
    /// (resume); step 2 of the module docs.
    pub fn begin(&self) -> Result<Begun> {
        let cfg = &self.config;
        match &self.resume_from {
            Some(ckpt) => {
                let run = self
                    .resumed_run
                    .clone()
                    .expect("resolve locks the run folder of every resumed checkpoint");
                let loaded = checkpoint::load(ckpt, &self.device)?;
                checkpoint::check_same_shards(
                    &loaded.state,
                    &self.shards.fingerprint,
                    &self.shards.dir,
                )?;
                tracing::info!(
                    "resuming from {} (step {})",
                    ckpt.display(),
                    loaded.state.step
                );
                Ok(Begun {
                    run,
                    params: loaded.params,
                    optimizer: loaded.optimizer,
                    initial_checkpoint: None,
                })
            }
            None => {
                let params = Params::init(&cfg.model, cfg.training.seed, &self.device)?;
                let optimizer = AdamW::new(&params, &cfg.training)?;
                let run = RunDir::create(&self.run_dir, cfg)?;
                let state = self.train_state(0, None);
                let dir = checkpoint::save(&run.checkpoints(), &params, &optimizer, &state)?;
                Ok(Begun {
                    run,
                    params,
                    optimizer,
                    initial_checkpoint: Some(dir),
                })
            }
        }
    }

    /// What `state.json` records after `step` steps.
    pub fn train_state(&self, step: u64, loss: Option<f64>) -> TrainState {
        let cfg = &self.config;
        let (lr, wd) = schedule::after(&cfg.training, step);
        TrainState {
            step,
            tokens_seen: step * cfg.tokens_per_step(),
            schedule: ScheduleState {
                current_step: step,
                lr,
                wd,
                lr_knots: cfg.training.lr_knots.clone(),
                wd_knots: cfg.training.wd_knots.clone(),
            },
            rng: RngState::new(cfg.training.seed),
            loss,
            config: cfg.clone(),
            shards: self.shards.fingerprint.clone(),
        }
    }
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C (SIGINT) finish the current step, write a checkpoint and stop.
pub fn install_sigint_handler() {
    #[cfg(unix)]
    {
        extern "C" fn on_sigint(_: libc::c_int) {
            // Only an atomic store: async-signal-safe.
            STOP_REQUESTED.store(true, Ordering::SeqCst);
        }
        // SAFETY: `on_sigint` only performs an atomic store, which is async-signal-safe, and has
        // the `extern "C" fn(c_int)` signature `signal` expects.
        unsafe {
            libc::signal(
                libc::SIGINT,
                on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// Whether Ctrl-C was pressed since the last call (the flag is cleared).
pub fn take_stop_request() -> bool {
    STOP_REQUESTED.swap(false, Ordering::SeqCst)
}

/// Keeps freed CPU tensor memory in the process instead of returning it to the kernel.
///
/// glibc serves every allocation above 32 MiB (the logits of a tiny config with the 32k
/// vocabulary are 130 MB) with a fresh mmap and unmaps it on free, so each step page-faults
/// gigabytes back in. Measured on `trainer bench --config configs/tiny.toml` (2 cores): 3.8 s ->
/// 1.9 s per step, page faults 3.5M -> 0.43M. Call once at program start, before other threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc malloc tunables; it is called before any other thread
    // exists, and both values are in range (0 mmaps; trim threshold 2 GB < i32::MAX).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2_000_000_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 95M run keeps all 14 checkpoints of about 1.14 GB each: 16 GB, more than most
    /// scratch disks have spare; the warning gives both numbers.
    #[test]
    fn disk_warning_counts_the_checkpoints_the_retention_policy_keeps() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        let mut cfg = Config::load(&path).unwrap();
        assert_eq!(
            checkpoint::bytes_needed(&cfg.model) / 10_000_000,
            114,
            "a 95M checkpoint is about 1.14 GB"
        );
        let dir = tempfile::tempdir().unwrap();
        let (free, _) = pipeline::disk::free_space(dir.path()).unwrap();
        let need = 14 * checkpoint::bytes_needed(&cfg.model);
        let warning = disk_shortfall(&cfg, dir.path(), 0, 60_000);
        if free < need {
            let w = warning.expect("a warning");
            assert!(
                w.contains("14 more checkpoints of 1.14 GB (at most 14 on disk at once under retention keep_all) need 16.02 GB"),
                "{w}"
            );
        } else {
            assert!(warning.is_none());
        }
        // Stopping at step 2 writes step 0 and step 2 only.
        cfg.model.vocab_size = 64_000_000;
        let two = 2 * checkpoint::bytes_needed(&cfg.model);
        assert!(
            two > free,
            "the test needs a checkpoint larger than the free space"
        );
        let w = disk_shortfall(&cfg, dir.path(), 0, 2).expect("a warning");
        assert!(w.contains("2 more checkpoints of"), "{w}");
    }
}
