//! `trainer run`: the training loop, top to bottom (in the spirit of llm.c's `train_gpt2.c`).
//! What happens before the first step (config, device, shards, data budget, run folder, initial
//! checkpoint) is in [`crate::setup`]; what a run writes besides checkpoints is in
//! [`RunLog`].
//!
//! Steps count updates from 1: step N trains on the batch of step N (`trainer data-order
//! --steps N`), and checkpoint `step_N` holds the weights after it; `step_000000` holds the
//! initial weights.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Tensor;

use crate::checkpoint;
use crate::config::{Backward, TrainingConfig};
use crate::data::{PayloadCheck, Prefetcher};
use crate::instrument::InstrumentationConfig;
use crate::instrument::run_log::{ProbeInputs, RunLog, StepReport};
use crate::model::{BitNet, Gradients, Params, group_thousands};
use crate::optim::{self, AdamW, Grads};
use crate::schedule;
use crate::setup::{self, Plan, RunOptions};

/// What a `run` did; `start_step == final_step` when the checkpoint resumed from already was
/// where the run stops (nothing trained, nothing written).
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub start_step: u64,
    /// Steps done at the end (the step of the last checkpoint).
    pub final_step: u64,
    pub last_checkpoint: PathBuf,
    /// Stopped early: Ctrl-C, or too many NaN/Inf steps in a row.
    pub interrupted: bool,
}

/// Runs (or resumes) training.
pub fn run(opts: &RunOptions) -> Result<RunSummary> {
    // Everything is checked before anything is written.
    let r = match setup::resolve(opts)? {
        Plan::Train(r) => r,
        Plan::NothingToDo(done) => {
            tracing::info!("{}", done.message);
            return Ok(RunSummary {
                run_dir: done.run_dir,
                start_step: done.step,
                final_step: done.step,
                last_checkpoint: done.checkpoint,
                interrupted: false,
            });
        }
    };
    let inputs = ProbeInputs::open(&r)?;
    // Re-hashes the shards beside step 0 and the first steps; checked before every later
    // checkpoint, so no weights trained on damaged data are saved.
    let mut payloads = PayloadCheck::start(&r.shards.manifest, &r.shards.dir, opts.verify_data);
    let setup::Begun {
        run,
        params,
        optimizer: mut opt,
        initial_checkpoint,
    } = r.begin()?;
    let (cfg, icfg) = (&r.config, &r.config.instrumentation);
    let due = InstrumentationConfig::due;
    let checkpoints = schedule::checkpoint_schedule(cfg);
    let mut log = RunLog::start(&r, &run, &params, inputs)?;
    let model = params.model(&cfg.model)?;
    tracing::info!(
        "run {} | {} parameters | device {} | steps {}..={} of {} | {} tokens/step",
        run.id(),
        group_thousands(params.count() as u64),
        setup::device_label(&r.device),
        r.start_step + 1,
        r.stop_step,
        cfg.training.total_steps,
        cfg.tokens_per_step()
    );
    let mut last_checkpoint = initial_checkpoint;
    if last_checkpoint.is_some() {
        // A fresh run: the initial weights are evaluated and sampled as step 0.
        log.after_checkpoint(0)?;
        if due(icfg.eval_every, 0) {
            log.eval(0, &model)?;
        }
        if due(icfg.sample_every, 0) {
            log.sample(0)?;
            log.dump_anomalies(&model, None)?;
        }
    }

    let prefetch = Prefetcher::spawn(
        r.shards.data.clone(),
        r.order.clone(),
        cfg.training.batch_size,
        r.start_step,
        r.stop_step,
        2,
    );
    let mut step = r.start_step;
    let mut interrupted = false;
    while step < r.stop_step {
        step += 1;
        let (batch, data_wait) = prefetch
            .next()
            .context("the prefetch thread stopped early")?;
        debug_assert_eq!(batch.step, step);
        let t0 = Instant::now();
        let tokens = Tensor::from_slice(
            &batch.tokens,
            (cfg.training.batch_size, cfg.training.seq_len),
            &r.device,
        )?;
        let out = train_step(
            &model,
            &params,
            &mut opt,
            &tokens,
            step,
            &cfg.training,
            None,
        )?;
        let (lr, wd) = schedule::of_step(&cfg.training, step);
        let report = StepReport {
            step,
            loss: out.loss,
            grad_norm: out.grad_norm,
            lr,
            wd,
            step_time: t0.elapsed(),
            data_wait,
        };
        log.step(&report, &batch)?;
        if due(icfg.eval_every, step) {
            log.eval(step, &model)?;
        }
        if due(icfg.sample_every, step) {
            log.sample(step)?;
        }
        log.dump_anomalies(&model, Some(&batch))?;
        payloads.poll()?;

        interrupted = setup::take_stop_request() || log.must_stop();
        if checkpoints.is_checkpoint_step(step) || step == r.stop_step || interrupted {
            payloads.wait(&format!("checkpoint {}", checkpoint::folder_name(step)))?;
            let state = r.train_state(step, Some(out.loss));
            let dir = checkpoint::save(&run.checkpoints(), &params, &opt, &state)?;
            tracing::info!("checkpoint {}", dir.display());
            log.after_checkpoint(step)?;
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

    let last_checkpoint =
        last_checkpoint.unwrap_or_else(|| run.checkpoints().join(checkpoint::folder_name(step)));
    log.finish(&last_checkpoint)?;
    Ok(RunSummary {
        run_dir: run.path().to_owned(),
        start_step: r.start_step,
        final_step: step,
        last_checkpoint,
        interrupted,
    })
}

/// Loss and pre-clip gradient norm of one update.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub loss: f64,
    pub grad_norm: f64,
}

/// Step `step` (counted from 1): one optimizer update on `tokens: [batch, seq]` split into
/// `grad_accumulation_steps` micro-batches: mean loss, gradients of the mean, clipping, AdamW with
/// the schedules' values for this step.
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
    let (loss, grads) = loss_and_gradients(
        model,
        params,
        tokens,
        accum,
        t.backward,
        phases.as_deref_mut(),
    )?;
    let t0 = Instant::now();
    let (grad_norm, clip) = optim::clip_coefficient(&grads, t.grad_clip_norm)?;
    let t1 = Instant::now();
    let (lr, wd) = schedule::of_step(t, step);
    if grad_norm.is_finite() {
        opt.step(params, &grads, clip, step, lr, wd)?;
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
    /// The global gradient norm and the clipping coefficient (the scaling itself happens inside
    /// the AdamW update).
    pub clip: Duration,
    /// The AdamW update of every parameter.
    pub optimizer: Duration,
}

/// Mean loss and its gradient for every parameter over `tokens: [batch, seq]`, computed as
/// `accum` equal micro-batches: each micro-batch's loss gradient is scaled by 1/accum and the
/// gradients are summed, which is the gradient of the whole batch's mean. `backward` chooses the
/// hand-written pass or candle's autograd (same math).
pub fn loss_and_gradients(
    model: &BitNet,
    params: &Params,
    tokens: &Tensor,
    accum: usize,
    backward: Backward,
    mut phases: Option<&mut PhaseTimes>,
) -> Result<(f64, Grads)> {
    let micro = tokens.dim(0)? / accum;
    let scale = 1.0 / accum as f64;
    let mut grads = Grads::new();
    let mut loss_sum = 0.0;
    for i in 0..accum {
        let tokens = tokens.narrow(0, i * micro, micro)?;
        let t0 = Instant::now();
        let (loss, t1, micro_grads) = match backward {
            Backward::Manual => {
                let pass = model.forward_taped(&tokens, scale)?;
                // Reading the loss back synchronises the device: the forward pass is done here.
                let loss = pass.loss().to_scalar::<f32>()?;
                (loss, Instant::now(), pass.backward()?)
            }
            Backward::Autograd => {
                let loss = model.loss(&tokens)?;
                let value = loss.to_scalar::<f32>()?;
                let t1 = Instant::now();
                let store = loss.affine(scale, 0.0)?.backward()?;
                let mut g = Gradients::default();
                for (name, var) in params.iter() {
                    let grad = store
                        .get(var)
                        .with_context(|| format!("no gradient reached `{name}`"))?;
                    g.add(var, grad.clone())?;
                }
                (value, t1, g)
            }
        };
        loss_sum += loss as f64;
        for (name, var) in params.iter() {
            let g = micro_grads
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::Device;

    use super::*;
    use crate::config::Config;

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
        let (loss1, g1) = loss_and_gradients(&model, &params, &tokens, 1, Backward::Manual, None)?;
        let (loss4, g4) = loss_and_gradients(&model, &params, &tokens, 4, Backward::Manual, None)?;
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
