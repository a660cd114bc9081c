//! `trainer run`: the training loop, top to bottom (in the spirit of llm.c's `train_gpt2.c`).
//!
//! 1. Resolve the config (the file, or the checkpoint's own config when resuming) and the device.
//! 2. Check the shards against the config (format, seq_len, vocab, tokenizer, sizes, header
//!    checksums; payload hashes with --verify-data) before anything is written.
//! 3. Refuse a run whose steps need more sequences than the shards hold; warn if the full
//!    `total_steps` would.
//! 4. Fresh run: create the run folder, initialise weights and moments, write `step_000000`.
//!    Resume: load the checkpoint and continue in its run folder.
//! 5. For each step: take the prefetched batch, forward/backward over the micro-batches, clip,
//!    AdamW with lr(step)/wd(step), report to the hooks, checkpoint when due, on the last step of
//!    --steps and on Ctrl-C.
//!
//! Hook points for instrumentation ([`Hooks`]): run start, after every step (a [`StepRecord`] with
//! step, loss, lr, wd, pre-clip grad norm, step time, data wait), after every checkpoint, run end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use pipeline::format::{Manifest, Split};

use crate::checkpoint::{self, RngState, ScheduleState, ShardFingerprint, TrainState};
use crate::config::{Config, TrainingConfig};
use crate::data::{self, Batch, DataOrder, Prefetcher, TrainData};
use crate::model::{BitNet, Params};
use crate::optim::{self, AdamW, Grads};
use crate::run_dir::{self, RunDir};
use crate::schedule;

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
    /// Config file; `None` = `configs/bitnet-95m.toml`, or the checkpoint's config on resume.
    pub config: Option<PathBuf>,
    /// Folder of runs (`runs/`), or one run folder for `--resume latest`.
    pub run_dir: PathBuf,
    /// Stop once this many updates are done (absolute step), writing `step_N` first.
    pub steps: Option<u64>,
    pub resume: Option<Resume>,
    pub device: DeviceChoice,
    /// Re-hash every train payload before step 0.
    pub verify_data: bool,
}

pub const DEFAULT_CONFIG: &str = "configs/bitnet-95m.toml";

/// What the loop knows about the run, for the hooks.
#[derive(Debug)]
pub struct RunContext {
    pub config: Config,
    pub run: RunDir,
    pub device: Device,
    pub shards: PathBuf,
    pub manifest: Manifest,
    /// First update this invocation runs (0 for a fresh run).
    pub start_step: u64,
    /// Updates done when this invocation stops (unless interrupted).
    pub stop_step: u64,
    /// Set by [`RunContext::request_stop`]: finish the current step, checkpoint, stop.
    stop_requested: AtomicBool,
}

impl RunContext {
    /// Makes the loop stop after the current step with a checkpoint, as Ctrl-C does (for hooks,
    /// e.g. an anomaly policy).
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }
}

/// One optimizer update, as reported to the hooks.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// 0-based update index; the weights after it are those of checkpoint `step_{step+1}`.
    pub step: u64,
    /// Tokens consumed including this update.
    pub tokens_seen: u64,
    /// Mean cross-entropy of the batch (mean over micro-batches).
    pub loss: f64,
    pub lr: f64,
    pub wd: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Forward, backward and optimizer time of this step.
    pub step_time: Duration,
    /// Time the loop waited for the prefetcher before this step.
    pub data_wait: Duration,
}

/// What a hook returns; an error stops the run.
pub type HookResult = Result<()>;

/// Instrumentation entry points; every method defaults to doing nothing.
pub trait Hooks {
    fn on_start(&mut self, _ctx: &RunContext, _params: &Params) -> Result<()> {
        Ok(())
    }
    /// After update `rec.step` with the model holding the updated weights and the batch it used.
    fn after_step(
        &mut self,
        _ctx: &RunContext,
        _rec: &StepRecord,
        _model: &BitNet,
        _batch: &Batch,
    ) -> Result<()> {
        Ok(())
    }
    /// After checkpoint `step_{step}` was written to `dir`.
    fn after_checkpoint(&mut self, _ctx: &RunContext, _step: u64, _dir: &Path) -> Result<()> {
        Ok(())
    }
    fn on_end(&mut self, _ctx: &RunContext, _summary: &RunSummary) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing.
#[derive(Debug, Default)]
pub struct NoHooks;
impl Hooks for NoHooks {}

/// What a `run` did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub start_step: u64,
    /// Updates done at the end (the step of the last checkpoint).
    pub final_step: u64,
    /// Loss of every update this invocation ran, in order.
    pub losses: Vec<f64>,
    pub last_checkpoint: PathBuf,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
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

/// Asks every running loop in this process to stop after its current step (what Ctrl-C does).
/// Prefer [`RunContext::request_stop`], which only stops its own run.
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// The shards, opened and checked against the config.
pub struct Shards {
    pub manifest: Manifest,
    pub data: Arc<TrainData>,
    pub fingerprint: ShardFingerprint,
}

/// Loads the manifest, checks it against `cfg`, opens (and with `verify` re-hashes) the train split.
pub fn open_shards(dir: &Path, cfg: &Config, verify: bool) -> Result<Shards> {
    let manifest = Manifest::load(dir)?;
    data::check_manifest(&manifest, dir, cfg)?;
    let data = TrainData::open(&manifest, dir)?;
    if verify {
        tracing::info!(
            "re-hashing {} train shards (--verify-data)",
            manifest.train.shards.len()
        );
        manifest.verify_payloads(dir, Split::Train)?;
    }
    let fingerprint = ShardFingerprint {
        dataset_sha256: manifest.fingerprint.dataset_sha256.clone(),
        train_sequences: manifest.train.sequences,
        first_1000_token_ids_sha256: manifest.fingerprint.first_1000_token_ids_sha256.clone(),
        tokenizer_sha256: manifest.tokenizer.sha256.clone(),
    };
    Ok(Shards {
        manifest,
        data: Arc::new(data),
        fingerprint,
    })
}

/// Loss and pre-clip gradient norm of one update.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub loss: f64,
    pub grad_norm: f64,
}

/// One optimizer update on `tokens: [batch, seq]` split into `grad_accumulation_steps`
/// micro-batches: mean loss, gradients of the mean, clipping, AdamW with lr(step), wd(step).
/// A non-finite gradient norm skips the parameter update (the weights stay usable) and is
/// reported through the returned norm.
pub fn train_step(
    model: &BitNet,
    params: &Params,
    opt: &mut AdamW,
    tokens: &Tensor,
    step: u64,
    t: &TrainingConfig,
    mut phases: Option<&mut PhaseTimes>,
) -> Result<StepOutcome> {
    let accum = t.grad_accumulation_steps;
    let (loss, mut grads) =
        loss_and_gradients(model, params, tokens, accum, phases.as_deref_mut())?;
    let t0 = Instant::now();
    let grad_norm = optim::clip_grad_norm(&mut grads, t.grad_clip_norm)?;
    let t1 = Instant::now();
    let (lr, wd) = schedule::at(t, step);
    if grad_norm.is_finite() {
        opt.step(params, &grads, step, lr, wd)?;
    } else {
        tracing::warn!("step {step}: gradient norm {grad_norm}; update skipped");
    }
    if let Some(p) = phases {
        tokens.device().synchronize()?;
        p.clip += t1 - t0;
        p.optimizer += t1.elapsed();
    }
    Ok(StepOutcome { loss, grad_norm })
}

/// Wall time spent in each phase of a step (`trainer bench`). Only measured when asked for: the
/// device is then synchronised at every phase boundary (the loss and the gradient norm are read
/// back anyway), so a timed step is slightly slower than an untimed one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// Embedding, blocks (BitLinear quantization included), LM head and loss.
    pub forward: Duration,
    /// `loss.backward()` and the accumulation of micro-batch gradients.
    pub backward: Duration,
    /// Global gradient norm and clipping.
    pub clip: Duration,
    /// The AdamW update of every parameter.
    pub optimizer: Duration,
}

/// Mean loss and its gradient for every parameter over `tokens: [batch, seq]`, computed as
/// `accum` equal micro-batches: each micro-batch's mean loss is scaled by 1/accum before its
/// backward pass and the gradients are summed, which is the gradient of the whole batch's mean.
pub fn loss_and_gradients(
    model: &BitNet,
    params: &Params,
    tokens: &Tensor,
    accum: usize,
    mut phases: Option<&mut PhaseTimes>,
) -> Result<(f64, Grads)> {
    let micro = tokens.dim(0)? / accum;
    let mut grads = Grads::new();
    let mut loss_sum = 0.0;
    for i in 0..accum {
        let t0 = Instant::now();
        let loss = model.loss(&tokens.narrow(0, i * micro, micro)?)?;
        // Reading the loss back synchronises the device: the forward pass is done here.
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let loss = if accum > 1 {
            loss.affine(1.0 / accum as f64, 0.0)?
        } else {
            loss
        };
        let store = loss.backward()?;
        for (name, var) in params.iter() {
            let g = store
                .get(var)
                .with_context(|| format!("no gradient reached `{name}`"))?;
            match grads.get_mut(name) {
                Some(acc) => *acc = (&*acc + g)?,
                None => {
                    grads.insert(name.clone(), g.clone());
                }
            }
        }
        if let Some(p) = phases.as_deref_mut() {
            tokens.device().synchronize()?;
            p.forward += t1 - t0;
            p.backward += t1.elapsed();
        }
    }
    Ok((loss_sum / accum as f64, grads))
}

fn train_state(
    cfg: &Config,
    step: u64,
    loss: Option<f64>,
    shards: &ShardFingerprint,
) -> TrainState {
    let (lr, wd) = schedule::at(&cfg.training, step);
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
        shards: shards.clone(),
    }
}

/// Runs (or resumes) training; see the module docs for the order of things.
pub fn run(opts: &RunOptions, hooks: &mut dyn Hooks) -> Result<RunSummary> {
    // 1. Config and device.
    let resume_from = match &opts.resume {
        None => None,
        Some(Resume::Latest) => Some(run_dir::latest_checkpoint(&opts.run_dir)?),
        Some(Resume::Checkpoint(p)) => Some(p.clone()),
    };
    let stored_state = resume_from
        .as_deref()
        .map(checkpoint::load_state)
        .transpose()?;
    let cfg = match (&resume_from, &stored_state) {
        (Some(ckpt), Some(state)) => {
            let stored = state.config.clone();
            if let Some(path) = &opts.config {
                let given = Config::load(path)?;
                if given != stored {
                    bail!(
                        "{}: differs from the config stored in {}; hint: omit --config when resuming (the run keeps its own config)",
                        path.display(),
                        ckpt.join(checkpoint::STATE_FILE).display()
                    );
                }
            }
            stored
        }
        _ => Config::load(opts.config.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG)))?,
    };
    let device = select_device(opts.device)?;

    // 2. Shards, checked before anything is written.
    let shards = open_shards(&opts.shards, &cfg, opts.verify_data)?;

    // 3. The data budget, before anything is written: refuse what cannot run without repetition,
    //    warn about the full run.
    let start_step = stored_state.as_ref().map_or(0, |s| s.step);
    let total = cfg.training.total_steps;
    let stop_step = opts.steps.unwrap_or(total).min(total);
    if stop_step <= start_step && resume_from.is_some() {
        bail!(
            "--steps {stop_step}: the checkpoint is already at step {start_step}; hint: pass a larger --steps (it counts updates from the start of the run)"
        );
    }

    let order = DataOrder::new(cfg.training.seed, shards.data.num_sequences());
    let manifest_path = Manifest::path(&opts.shards);
    data::check_budget(&order, &manifest_path, &cfg, start_step, stop_step)?;
    if let Err(e) = data::check_budget(&order, &manifest_path, &cfg, 0, total) {
        tracing::warn!("the full run of total_steps = {total} cannot finish on these shards: {e}");
    }

    // 4. Run folder, weights, moments.
    let (run, params, mut opt) = match &resume_from {
        Some(ckpt) => {
            let loaded = checkpoint::load(ckpt, &device)?;
            checkpoint::check_same_shards(&loaded.state, &shards.fingerprint, &opts.shards)?;
            tracing::info!(
                "resuming from {} (step {})",
                ckpt.display(),
                loaded.state.step
            );
            (
                RunDir::of_checkpoint(ckpt)?,
                loaded.params,
                loaded.optimizer,
            )
        }
        None => {
            let params = Params::init(&cfg.model, cfg.training.seed, &device)?;
            let opt = AdamW::new(&params, &cfg.training)?;
            (RunDir::create(&opts.run_dir, &cfg)?, params, opt)
        }
    };
    let ctx = RunContext {
        config: cfg.clone(),
        run: run.clone(),
        device: device.clone(),
        shards: opts.shards.clone(),
        manifest: shards.manifest.clone(),
        start_step,
        stop_step,
        stop_requested: AtomicBool::new(false),
    };
    let mut last_checkpoint = None;
    if resume_from.is_none() {
        let dir = checkpoint::save(
            &run.checkpoints(),
            &params,
            &opt,
            &train_state(&cfg, 0, None, &shards.fingerprint),
        )?;
        hooks.after_checkpoint(&ctx, 0, &dir)?;
        last_checkpoint = Some(dir);
    }
    hooks.on_start(&ctx, &params)?;
    tracing::info!(
        "run {} | {} parameters | device {:?} | steps {start_step}..{stop_step} of {total} | {} tokens/step",
        run.id(),
        crate::model::group_thousands(params.count() as u64),
        device,
        cfg.tokens_per_step()
    );

    // 5. The loop.
    let model = params.model(&cfg.model)?;
    let prefetch = Prefetcher::spawn(
        Arc::clone(&shards.data),
        order,
        cfg.training.batch_size,
        start_step,
        stop_step,
        2,
    );
    let (batch_size, seq_len) = (cfg.training.batch_size, cfg.training.seq_len);
    let mut losses = Vec::new();
    let mut step = start_step;
    let mut interrupted = false;
    while step < stop_step {
        let (batch, data_wait) = prefetch
            .next()
            .context("the prefetch thread stopped early")?;
        debug_assert_eq!(batch.step, step);
        let t0 = Instant::now();
        let tokens = Tensor::from_slice(&batch.tokens, (batch_size, seq_len), &device)?;
        let out = train_step(
            &model,
            &params,
            &mut opt,
            &tokens,
            step,
            &cfg.training,
            None,
        )?;
        let step_time = t0.elapsed();
        let (lr, wd) = schedule::at(&cfg.training, step);
        let rec = StepRecord {
            step,
            tokens_seen: (step + 1) * cfg.tokens_per_step(),
            loss: out.loss,
            lr,
            wd,
            grad_norm: out.grad_norm,
            step_time,
            data_wait,
        };
        losses.push(out.loss);
        hooks.after_step(&ctx, &rec, &model, &batch)?;
        step += 1;

        interrupted = STOP_REQUESTED.swap(false, Ordering::SeqCst)
            || ctx.stop_requested.load(Ordering::SeqCst);
        if cfg.checkpoint_due(step) || step == stop_step || interrupted {
            let state = train_state(&cfg, step, Some(out.loss), &shards.fingerprint);
            let dir = checkpoint::save(&run.checkpoints(), &params, &opt, &state)?;
            tracing::info!("checkpoint {}", dir.display());
            hooks.after_checkpoint(&ctx, step, &dir)?;
            last_checkpoint = Some(dir);
        }
        if interrupted {
            tracing::warn!(
                "interrupted: stopped after step {step} with a checkpoint; resume with --resume latest"
            );
            break;
        }
    }
    drop(prefetch);

    let summary = RunSummary {
        run_dir: run.path().to_owned(),
        start_step,
        final_step: step,
        losses,
        last_checkpoint: last_checkpoint
            .unwrap_or_else(|| run.checkpoints().join(checkpoint::folder_name(step))),
        interrupted,
    };
    hooks.on_end(&ctx, &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gradient accumulation is the same math as one batch (up to f32 summation order).
    #[test]
    fn micro_batches_give_the_full_batch_loss_and_gradients() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
        let mut cfg = Config::load(&path)?;
        cfg.model.vocab_size = 96;
        let dev = Device::Cpu;
        let params = Params::init(&cfg.model, 5, &dev)?;
        let model = params.model(&cfg.model)?;
        let tokens: Vec<u32> = (0..4 * 24).map(|i| (i * 7 + i / 5) % 96).collect();
        let tokens = Tensor::from_vec(tokens, (4, 24), &dev)?;
        let (loss1, g1) = loss_and_gradients(&model, &params, &tokens, 1, None)?;
        let (loss4, g4) = loss_and_gradients(&model, &params, &tokens, 4, None)?;
        assert!((loss1 - loss4).abs() < 1e-6 * loss1, "{loss1} vs {loss4}");
        for (name, a) in &g1 {
            let b = &g4[name];
            let diff = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let norm = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "{name} has a zero gradient");
            assert!(
                diff <= 1e-5 * norm,
                "{name}: relative difference {}",
                diff / norm
            );
        }
        Ok(())
    }
}
