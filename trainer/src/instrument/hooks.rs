//! [`Instrumentation`]: the plan's section 5 plugged into the training loop through
//! `train::Hooks`. It writes `meta/`, `metrics/scalars.jsonl`, `eval/eval_results.jsonl`,
//! `samples/samples.jsonl` and `anomalies/`, prints the console line, applies checkpoint
//! retention and stops a run after too many NaN/Inf steps.
//!
//! Steps: the engine reports update `rec.step` (0-based); every record here uses
//! `step = rec.step + 1`, the number of updates done, which is also the checkpoint name and makes
//! `tokens_seen = step x batch x seq_len` as in the plan. Eval and samples at step N use the
//! weights of checkpoint `step_N`; a fresh run evaluates and samples the initial weights (step 0).
//!
//! NaN/Inf: the engine skips the update of a step whose gradient norm is not finite (a NaN/Inf
//! loss makes it so). These hooks count consecutive such steps and, after
//! `max_consecutive_nonfinite`, ask the loop to stop (it then writes the final checkpoint of the
//! unchanged weights) and fail the run with a clear message.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::anomaly::{
    AnomalyDetector, AnomalyEvent, DumpWriter, NonFiniteGuard, NonFiniteVerdict, RateLimiter,
    RoundStats, TestHooks, list_dumps, nonfinite_stop_message,
};
use super::config::InstrumentationConfig;
use super::eval::EvalRecord;
use super::metrics::{self, JsonlWriter, MovingAverage, StepScalars};
use super::probes::{self, EvalSet, PromptCodec};
use super::provenance::{DatasetFingerprint, Provenance, Seeds, utc_timestamp};
use super::retention::{self, CheckpointSchedule};
use super::sample::{FIXED_PROMPTS, Mode, SampleRecord};
use crate::config::Config;
use crate::data::Batch;
use crate::model::{BitNet, Params, parameter_count};
use crate::train::{Hooks, RunContext, RunSummary, StepRecord};

/// Window of the train-loss moving average written next to each eval (plan: 100).
pub const TRAIN_LOSS_WINDOW: usize = 100;

/// Paths inside `runs/<run_id>/` (the plan's names).
pub fn meta_dir(run: &Path) -> PathBuf {
    run.join("meta")
}
pub fn scalars_path(run: &Path) -> PathBuf {
    run.join("metrics").join("scalars.jsonl")
}
pub fn eval_path(run: &Path) -> PathBuf {
    run.join("eval").join("eval_results.jsonl")
}
pub fn samples_path(run: &Path) -> PathBuf {
    run.join("samples").join("samples.jsonl")
}
pub fn anomalies_dir(run: &Path) -> PathBuf {
    run.join("anomalies")
}

/// The first step of the last stage: the last knot where the weight decay changes (plan: 30,000).
pub fn stage_boundary(cfg: &Config) -> Option<u64> {
    let k = &cfg.training.wd_knots;
    k.windows(2)
        .rev()
        .find(|w| w[1].value != w[0].value)
        .map(|w| w[1].step)
}

/// The plan's checkpoint schedule for this config.
pub fn checkpoint_schedule(cfg: &Config) -> CheckpointSchedule {
    CheckpointSchedule {
        every: cfg.instrumentation.checkpoint_every,
        total_steps: cfg.training.total_steps,
        stage_boundary: stage_boundary(cfg),
    }
}

/// `meta/config.json`: the resolved config under the plan's section and key names, plus the
/// derived keys the plan lists (head_dim, total_params, embeddings_tied, total_tokens).
pub fn config_json(cfg: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("the config serializes");
    let m = &cfg.model;
    v["model"]["head_dim"] = (m.hidden_size / m.num_heads).into();
    v["model"]["total_params"] = (parameter_count(m) as u64).into();
    v["model"]["embeddings_tied"] = true.into();
    v["training"]["total_tokens"] = cfg.total_tokens().into();
    // The shards are read from local memory-mapped files, not streamed from the hub.
    v["data"]["streaming"] = false.into();
    v["checkpoint_schedule"] = checkpoint_schedule(cfg).all_steps().into();
    v
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("serializing JSON")?;
    text.push('\n');
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    pipeline::format::shard::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The run's instrumentation state.
#[derive(Debug, Default)]
pub struct Instrumentation {
    inner: Option<State>,
    /// Set when the run must fail at its end (too many NaN/Inf steps).
    stop_reason: Option<String>,
}

#[derive(Debug)]
struct State {
    icfg: InstrumentationConfig,
    run: PathBuf,
    params: Params,
    scalars: JsonlWriter,
    evals: JsonlWriter,
    samples: JsonlWriter,
    eval_set: EvalSet,
    codec: PromptCodec,
    train_ma: MovingAverage,
    detector: AnomalyDetector,
    limiter: RateLimiter,
    guard: NonFiniteGuard,
    hooks: TestHooks,
    flops_per_token: f64,
    interval_ms: Vec<f64>,
    last_good_step: u64,
    gpu_mem_gb: Option<f64>,
}

impl Instrumentation {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&mut self) -> Result<&mut State> {
        self.inner
            .as_mut()
            .context("instrumentation used before on_start")
    }
}

/// Memory the driver reports for this process on the GPU, in GB (`nvidia-smi`); `None` without.
fn gpu_process_memory_gb() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (pid, mib) = l.split_once(',')?;
        (pid.trim() == me).then(|| {
            mib.trim()
                .parse::<f64>()
                .ok()
                .map(|m| m * 1024.0 * 1024.0 / 1e9)
        })?
    })
}

impl State {
    fn model(&self, cfg: &Config) -> Result<BitNet> {
        Ok(self.params.model(&cfg.model)?)
    }

    fn eval(&mut self, ctx: &RunContext, model: &BitNet, step: u64) -> Result<EvalRecord> {
        let rec = self.eval_set.record(
            model,
            &ctx.device,
            self.icfg.eval_batch_size,
            step,
            step * ctx.config.tokens_per_step(),
            self.train_ma.mean(),
        )?;
        self.evals.write(&rec)?;
        tracing::info!(
            "eval step {step} | loss {:.4} | ppl {:.2} | bpb {} | {} sequences in {:.1}s",
            rec.eval_loss,
            rec.eval_ppl,
            rec.bits_per_byte.map_or("-".into(), |b| format!("{b:.4}")),
            rec.eval_sequences,
            rec.eval_seconds
        );
        Ok(rec)
    }

    /// Samples the fixed prompts; returns the records and any round anomalies.
    fn sample(&mut self, ctx: &RunContext, step: u64) -> Result<Vec<AnomalyEvent>> {
        let t0 = Instant::now();
        let model = self.params.model(&ctx.config.model)?.freeze()?;
        let records =
            probes::sampling_round(&model, &self.codec, step, self.icfg.sample_max_new_tokens)?;
        for r in &records {
            self.samples.write(r)?;
        }
        tracing::info!(
            "samples step {step} | {} generations in {:.1}s | greedy: {:?}",
            records.len(),
            t0.elapsed().as_secs_f64(),
            records.iter().find(|r| r.mode == "greedy").map(|r| r
                .generated_text
                .chars()
                .take(80)
                .collect::<String>())
        );
        Ok(self.round_events(step, &records))
    }

    fn round_events(&self, step: u64, records: &[SampleRecord]) -> Vec<AnomalyEvent> {
        let stats = RoundStats {
            mean_entropies: records.iter().map(|r| r.mean_entropy).collect(),
            greedy_max_repetition: records
                .iter()
                .filter(|r| r.mode == Mode::Greedy.name())
                .map(|r| r.max_repetition)
                .collect(),
        };
        let forced = !self.hooks.is_empty()
            && (self
                .hooks
                .forced(step, super::anomaly::AnomalyKind::EntropyCollapse)
                || self
                    .hooks
                    .forced(step, super::anomaly::AnomalyKind::RepetitionSurge));
        self.detector
            .observe_round(step, &self.hooks.round(step, stats), forced)
    }

    /// Writes one dump (if the rate limit allows) for `event` on the batch `tokens`.
    fn dump(
        &mut self,
        ctx: &RunContext,
        model: &BitNet,
        event: &AnomalyEvent,
        batch: Option<&Batch>,
    ) -> Result<()> {
        if !self.limiter.allow(event.step, event.event) {
            tracing::warn!(
                "anomaly {} at step {} (dump suppressed by the rate limit): {}",
                event.event.name(),
                event.step,
                event.detail
            );
            return Ok(());
        }
        let t0 = Instant::now();
        let m = &ctx.config.model;
        let mut w = DumpWriter::begin(&anomalies_dir(&self.run), event)?;
        w.note(format!(
            "weights: after update {} (unchanged by a skipped NaN/Inf update); activations and gradient norms are recomputed on the triggering batch with them",
            event.step
        ));
        let inf = self.params.model(m)?.freeze()?;
        if let Some(b) = batch {
            let tokens = Tensor::from_slice(
                &b.tokens,
                (b.indices.len(), ctx.config.training.seq_len),
                &ctx.device,
            )?;
            let acts = inf.branch_outputs(&tokens)?;
            for (layer, branches) in acts.iter().enumerate() {
                let (attn, ffn) = (&branches.attention, &branches.feedforward);
                let a: Vec<f32> = attn
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                w.activations(layer, "attn", &a)?;
                let f: Vec<f32> = ffn
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                w.activations(layer, "ffn", &f)?;
            }
            drop(acts);
            w.grad_norms(&probes::grad_norms(model, &self.params, &tokens)?)?;
            w.batch_indices(b.step + 1, &b.indices)?;
        }
        w.ternary(&probes::quant_stats(&self.params, m)?)?;
        for prompt in FIXED_PROMPTS {
            w.top20(&probes::top20(&inf, &self.codec, prompt)?)?;
        }
        let dir = w.finish()?;
        tracing::warn!(
            "[ANOMALY] {} at step {}: {} -> {} ({:.1}s)",
            event.event.name(),
            event.step,
            event.detail,
            dir.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

impl Hooks for Instrumentation {
    fn on_start(&mut self, ctx: &RunContext, params: &Params) -> Result<()> {
        let cfg = &ctx.config;
        let icfg = cfg.instrumentation.clone();
        icfg.validate().map_err(anyhow::Error::msg)?;
        let run = ctx.run.path().to_owned();
        let meta = meta_dir(&run);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let seeds = Seeds {
            init: cfg.training.seed,
            data_order: cfg.training.seed,
            sampling:
                "first 4 bytes of sha256(\"{prompt_index}:{step}:{mode}\"), recorded per sample"
                    .into(),
            shards: ctx.manifest.seed,
        };
        let repo = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let prov = Provenance::collect(
            &ctx.run.id(),
            now,
            seeds,
            &format!("{:?}", ctx.device),
            &repo,
        );
        if ctx.start_step == 0 || !meta.join("config.json").exists() {
            write_json(&meta.join("config.json"), &config_json(cfg))?;
            write_json(&meta.join("provenance.json"), &prov)?;
            write_json(
                &meta.join("dataset_fingerprint.json"),
                &DatasetFingerprint::from_manifest(
                    &ctx.manifest,
                    cfg.training.total_steps,
                    cfg.training.batch_size as u64,
                    cfg.training.seed,
                ),
            )?;
        } else {
            // A resumed run keeps its start provenance and records each resume beside it.
            write_json(
                &meta.join(format!("provenance_resume_step_{:06}.json", ctx.start_step)),
                &prov,
            )?;
        }
        if !icfg.test_hooks.is_empty() {
            tracing::warn!(
                "[instrumentation] test_hooks is set: anomalies will be forced at {:?}",
                icfg.test_hooks
            );
        }

        // Records past the checkpoint we resume from are re-run and re-logged.
        for p in [scalars_path(&run), eval_path(&run), samples_path(&run)] {
            JsonlWriter::truncate_after_step(&p, ctx.start_step)?;
        }
        let mut detector = AnomalyDetector::new(icfg.anomaly.clone());
        let mut train_ma = MovingAverage::new(TRAIN_LOSS_WINDOW);
        if ctx.start_step > 0 {
            let past: Vec<f64> = metrics::read_jsonl(&scalars_path(&run))
                .unwrap_or_default()
                .iter()
                .filter_map(|r| r.get("loss").and_then(|l| l.as_f64()))
                .collect();
            detector.prime(past.iter().copied());
            past.iter().for_each(|&l| train_ma.push(l));
        }
        let mut limiter = RateLimiter::new(&icfg.anomaly);
        for (step, kind) in list_dumps(&anomalies_dir(&run)) {
            limiter.note_existing(step, kind);
        }
        let m = &cfg.model;
        let state = State {
            eval_set: EvalSet::open(&ctx.shards, &ctx.manifest, icfg.eval_sequences)?,
            codec: PromptCodec::open(&ctx.shards, &ctx.manifest)?,
            scalars: JsonlWriter::append(&scalars_path(&run))?,
            evals: JsonlWriter::append(&eval_path(&run))?,
            samples: JsonlWriter::append(&samples_path(&run))?,
            params: params.clone(),
            train_ma,
            detector,
            limiter,
            guard: NonFiniteGuard::new(icfg.anomaly.max_consecutive_nonfinite),
            hooks: TestHooks::new(icfg.test_hooks.clone()),
            flops_per_token: metrics::flops_per_token(
                parameter_count(m) as u64,
                m.num_layers as u64,
                cfg.training.seq_len as u64,
                m.hidden_size as u64,
            ),
            interval_ms: Vec::new(),
            last_good_step: ctx.start_step,
            gpu_mem_gb: None,
            icfg,
            run,
        };
        self.inner = Some(state);
        let st = self.state()?;
        if ctx.start_step == 0 {
            let model = st.model(cfg)?;
            if InstrumentationConfig::due(st.icfg.eval_every, 0) {
                st.eval(ctx, &model, 0)?;
            }
            if InstrumentationConfig::due(st.icfg.sample_every, 0) {
                for ev in st.sample(ctx, 0)? {
                    st.dump(ctx, &model, &ev, None)?;
                }
            }
        }
        Ok(())
    }

    fn after_step(
        &mut self,
        ctx: &RunContext,
        rec: &StepRecord,
        model: &BitNet,
        batch: &Batch,
    ) -> Result<()> {
        let st = self.state()?;
        let cfg = &ctx.config;
        let step = rec.step + 1;
        let loss = st.hooks.loss(step, rec.loss, &st.icfg.anomaly);
        let grad_norm = st.hooks.grad_norm(step, rec.grad_norm);
        let forced = loss != rec.loss || grad_norm.to_bits() != rec.grad_norm.to_bits();
        let verdict = st.guard.check(loss, grad_norm);
        let event = st.detector.observe_step(step, loss, grad_norm, forced);
        // The eval's train_loss average follows the real losses, also on forced (test) steps.
        st.train_ma.push(rec.loss);

        let step_ms = rec.step_time.as_secs_f64() * 1e3;
        let tokens_per_sec = cfg.tokens_per_step() as f64 / rec.step_time.as_secs_f64().max(1e-9);
        // `nvidia-smi` takes tens of ms: ask every 100 steps (and at the first step) and repeat
        // the last answer in between; never on CPU.
        if ctx.device.is_cuda() && (step == ctx.start_step + 1 || step.is_multiple_of(100)) {
            st.gpu_mem_gb = gpu_process_memory_gb();
        }
        let mut s = StepScalars {
            step,
            tokens_seen: rec.tokens_seen,
            loss,
            lr: rec.lr,
            wd: rec.wd,
            grad_norm,
            step_time_ms: step_ms,
            tokens_per_sec,
            gpu_mem_allocated_gb: st.gpu_mem_gb,
            gpu_mem_reserved_gb: st.gpu_mem_gb,
            data_wait_ms: rec.data_wait.as_secs_f64() * 1e3,
            mfu: metrics::mfu(st.flops_per_token, tokens_per_sec, st.icfg.peak_flops),
            anomaly_flag: event.as_ref().map(|e| e.event.name().to_string()),
            update_applied: rec.grad_norm.is_finite(),
            extra: Default::default(),
        };
        if forced {
            // The logged loss/norm are the values the test hook fed the detector.
            s.extra.insert("forced_by_test_hook".into(), true.into());
            s.extra
                .insert("engine_loss".into(), serde_json::json!(rec.loss));
        }
        if InstrumentationConfig::due(st.icfg.quant_stats_every, step) {
            for layer in probes::quant_stats(&st.params, &cfg.model)? {
                layer.insert_keys(&mut s.extra);
            }
        }
        st.scalars.write(&s)?;
        st.interval_ms.push(step_ms);
        if InstrumentationConfig::due(st.icfg.log_every, step) || step == ctx.stop_step {
            let mean = st.interval_ms.iter().sum::<f64>() / st.interval_ms.len().max(1) as f64;
            tracing::info!(
                "{}",
                metrics::console_line(&s, cfg.training.total_steps, ctx.stop_step, mean)
            );
            st.interval_ms.clear();
        }

        let mut events: Vec<AnomalyEvent> = event.into_iter().collect();
        if InstrumentationConfig::due(st.icfg.eval_every, step) {
            st.eval(ctx, model, step)?;
        }
        if InstrumentationConfig::due(st.icfg.sample_every, step) {
            events.extend(st.sample(ctx, step)?);
        }
        for ev in &events {
            st.dump(ctx, model, ev, Some(batch))?;
        }

        match verdict {
            NonFiniteVerdict::Apply => st.last_good_step = step,
            NonFiniteVerdict::Skip { consecutive } => {
                tracing::warn!(
                    "step {step}: NaN/Inf loss or gradient norm, update skipped ({consecutive} in a row)"
                );
            }
            NonFiniteVerdict::Stop { consecutive } => {
                let msg = nonfinite_stop_message(step, consecutive, st.last_good_step);
                tracing::error!("{msg}");
                self.stop_reason = Some(msg);
                ctx.request_stop();
            }
        }
        Ok(())
    }

    fn after_checkpoint(&mut self, ctx: &RunContext, step: u64, _dir: &Path) -> Result<()> {
        let policy = &ctx.config.instrumentation.retention;
        let deleted =
            retention::apply_retention(&ctx.run.checkpoints(), policy, stage_boundary(&ctx.config))
                .with_context(|| {
                    format!(
                        "applying checkpoint retention in {}",
                        ctx.run.checkpoints().display()
                    )
                })?;
        if !deleted.is_empty() {
            tracing::info!("retention after step {step}: removed checkpoints {deleted:?}");
        }
        Ok(())
    }

    fn on_end(&mut self, _ctx: &RunContext, summary: &RunSummary) -> Result<()> {
        if let Some(st) = self.inner.as_ref() {
            tracing::info!(
                "instrumentation: {} skipped (NaN/Inf) updates, {} dumps suppressed by the rate limit; report: `trainer report {}` ({})",
                st.guard.total_skipped(),
                st.limiter.suppressed(),
                summary.run_dir.display(),
                utc_timestamp(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                )
            );
        }
        if let Some(msg) = self.stop_reason.take() {
            anyhow::bail!("{msg} ({})", summary.last_checkpoint.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Config {
        Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml"))
            .unwrap()
    }

    #[test]
    fn plan_schedule_and_config_json() {
        let c = plan();
        assert_eq!(stage_boundary(&c), Some(30_000));
        assert_eq!(
            checkpoint_schedule(&c).all_steps(),
            vec![
                0, 5000, 10_000, 15_000, 20_000, 25_000, 29_999, 30_000, 35_000, 40_000, 45_000,
                50_000, 55_000, 60_000
            ]
        );
        let v = config_json(&c);
        assert_eq!(v["model"]["total_params"], 95_367_936);
        assert_eq!(v["model"]["head_dim"], 64);
        assert_eq!(v["model"]["embeddings_tied"], true);
        assert_eq!(v["training"]["total_tokens"], 1_966_080_000u64);
        for k in [
            "peak_lr",
            "warmup_steps",
            "stage1_wd",
            "stage2_wd",
            "grad_clip_norm",
            "adam_beta1",
            "adam_beta2",
        ] {
            assert!(v["training"].get(k).is_some(), "{k}");
        }
        assert_eq!(v["data"]["dataset"], "HuggingFaceFW/fineweb-edu");
        assert_eq!(v["instrumentation"]["eval_every"], 1000);
    }
}
