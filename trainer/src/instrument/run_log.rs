//! [`RunLog`]: everything a training run writes besides its checkpoints:
//! `meta/`, `metrics/scalars.jsonl`, `eval/eval_results.jsonl`, `samples/samples.jsonl`,
//! `anomalies/`, the console line, and checkpoint retention. The training loop calls it at each
//! point of a step (`train.rs` shows when); it never changes what the loop computes.
//!
//! Steps count updates from 1: the record of step N is written after the N-th update, with the
//! weights of checkpoint `step_N`. A fresh run evaluates and samples the initial weights as
//! step 0.
//!
//! NaN/Inf: the loop skips the update of a step whose gradient norm is not finite (a NaN/Inf loss
//! makes it so). The log counts consecutive such steps and, after `max_consecutive_nonfinite`,
//! tells the loop to stop ([`RunLog::must_stop`]; the loop then writes the final checkpoint of the
//! unchanged weights) and fails the run with a clear message.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use pipeline::format::TOKENIZER_FILE;

use super::anomaly::{
    AnomalyDetector, AnomalyEvent, DumpWriter, NonFiniteGuard, NonFiniteVerdict, RateLimiter,
    RoundStats, list_dumps, nonfinite_stop_message,
};
use super::config::InstrumentationConfig;
use super::eval::EvalRecord;
use super::metrics::{self, JsonlWriter, MovingAverage, StepScalars};
use super::probes::{self, EvalSet, PromptCodec};
use super::provenance::{DatasetFingerprint, Provenance, Seeds, utc_timestamp};
use super::retention;
use super::sample::{FIXED_PROMPTS, Mode, SampleRecord};
use crate::config::Config;
use crate::data::Batch;
use crate::documents::LazyIndex;
use crate::model::{BitNet, Params, parameter_count};
use crate::run_dir::RunDir;
use crate::schedule::{checkpoint_schedule, stage_boundary};
use crate::setup::Resolved;

/// Window of the train-loss moving average written next to each eval (100 steps, as the
/// `train_loss` key of the run-folder contract defines it).
pub const TRAIN_LOSS_WINDOW: usize = 100;

/// Paths inside `runs/<run_id>/` (the names of the run-folder contract, README).
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

/// `meta/config.json`: the resolved config under the section and key names of the run-folder
/// contract, plus its derived keys (head_dim, total_params, embeddings_tied, total_tokens).
pub fn config_json(cfg: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("the config serializes");
    let m = &cfg.model;
    v["model"]["head_dim"] = m.head_dim().into();
    v["model"]["total_params"] = (parameter_count(m) as u64).into();
    v["model"]["embeddings_tied"] = true.into();
    let t = &cfg.training;
    v["training"]["total_tokens"] = cfg.total_tokens().into();
    v["training"]["peak_lr"] = t.peak_lr().into();
    v["training"]["warmup_steps"] = t.warmup_steps().into();
    v["training"]["stage1_wd"] = t.stage1_wd().into();
    v["training"]["stage2_wd"] = t.stage2_wd().into();
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

/// The eval split and the prompt tokenizer, opened before anything is written.
#[derive(Debug)]
pub struct ProbeInputs {
    eval_set: EvalSet,
    /// `None` for a dataset without `tokenizer.json` (e.g. `trainer synthetic-shards`): no text
    /// samples and no top-20 lists in dumps, said once at start.
    codec: Option<PromptCodec>,
    /// The documents of a dump's batch.
    documents: LazyIndex,
}

impl ProbeInputs {
    pub fn open(r: &Resolved) -> Result<Self> {
        let (dir, manifest) = (&r.shards.dir, &r.shards.manifest);
        let codec = if dir.join(TOKENIZER_FILE).exists() {
            Some(PromptCodec::open(dir, manifest)?)
        } else {
            tracing::warn!(
                "{} has no {TOKENIZER_FILE}: the run writes no text samples and no top-20 lists in anomaly dumps",
                dir.display()
            );
            None
        };
        Ok(ProbeInputs {
            eval_set: EvalSet::open(dir, manifest, r.config.instrumentation.eval_sequences)?,
            codec,
            documents: LazyIndex::new(dir),
        })
    }
}

/// What the loop measured in one step.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The step (counted from 1).
    pub step: u64,
    /// Mean cross-entropy of the batch (mean over micro-batches).
    pub loss: f64,
    /// Global gradient norm before clipping; not finite when the update was skipped.
    pub grad_norm: f64,
    pub lr: f64,
    pub wd: f64,
    /// Forward, backward and optimizer time of this step.
    pub step_time: Duration,
    /// Time the loop waited for the prefetcher before this step.
    pub data_wait: Duration,
}

/// The run's log; see the module docs.
#[derive(Debug)]
pub struct RunLog {
    config: Config,
    icfg: InstrumentationConfig,
    device: Device,
    run: RunDir,
    params: Params,
    start_step: u64,
    stop_step: u64,
    scalars: JsonlWriter,
    evals: JsonlWriter,
    samples: JsonlWriter,
    inputs: ProbeInputs,
    train_ma: MovingAverage,
    detector: AnomalyDetector,
    limiter: RateLimiter,
    guard: NonFiniteGuard,
    /// Anomalies of the current step, dumped by [`RunLog::dump_anomalies`].
    pending: Vec<AnomalyEvent>,
    flops_per_token: f64,
    interval_ms: Vec<f64>,
    last_good_step: u64,
    gpu_mem_gb: Option<f64>,
    /// Set when the run must fail at its end (too many NaN/Inf steps).
    stop_reason: Option<String>,
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RunLog {
    /// Writes `meta/` (a resumed run adds `provenance_resume_step_N.json`), opens the JSONL files
    /// (dropping records past the step resumed from: they are re-run) and restores the moving
    /// windows from the logged losses.
    pub fn start(r: &Resolved, run: &RunDir, params: &Params, inputs: ProbeInputs) -> Result<Self> {
        let cfg = &r.config;
        let icfg = cfg.instrumentation.clone();
        let path = run.path();
        let meta = meta_dir(path);
        let seeds = Seeds {
            init: cfg.training.seed,
            data_order: cfg.training.seed,
            sampling:
                "first 4 bytes of sha256(\"{prompt_index}:{step}:{mode}\"), recorded per sample"
                    .into(),
            shards: r.shards.manifest.seed,
        };
        let repo = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let prov = Provenance::collect(
            &run.id(),
            unix_now(),
            seeds,
            &format!("{:?}", r.device),
            &repo,
        );
        if r.start_step == 0 || !meta.join("config.json").exists() {
            write_json(&meta.join("config.json"), &config_json(cfg))?;
            write_json(&meta.join("provenance.json"), &prov)?;
            write_json(
                &meta.join("dataset_fingerprint.json"),
                &DatasetFingerprint::from_manifest(
                    &r.shards.manifest,
                    cfg.training.total_steps,
                    cfg.training.batch_size as u64,
                    cfg.training.seed,
                ),
            )?;
        } else {
            write_json(
                &meta.join(format!("provenance_resume_step_{:06}.json", r.start_step)),
                &prov,
            )?;
        }

        for p in [scalars_path(path), eval_path(path), samples_path(path)] {
            JsonlWriter::truncate_after_step(&p, r.start_step)?;
        }
        let mut detector = AnomalyDetector::new(icfg.anomaly.clone());
        let mut train_ma = MovingAverage::new(TRAIN_LOSS_WINDOW);
        if r.start_step > 0 {
            let past: Vec<f64> = metrics::read_jsonl(&scalars_path(path))
                .unwrap_or_default()
                .iter()
                .filter_map(|r| r.get("loss").and_then(|l| l.as_f64()))
                .collect();
            detector.prime(past.iter().copied());
            past.iter().for_each(|&l| train_ma.push(l));
        }
        let mut limiter = RateLimiter::new(&icfg.anomaly);
        for (step, kind) in list_dumps(&anomalies_dir(path)) {
            limiter.note_existing(step, kind);
        }
        let m = &cfg.model;
        Ok(RunLog {
            scalars: JsonlWriter::append(&scalars_path(path))?,
            evals: JsonlWriter::append(&eval_path(path))?,
            samples: JsonlWriter::append(&samples_path(path))?,
            config: cfg.clone(),
            device: r.device.clone(),
            run: run.clone(),
            params: params.clone(),
            start_step: r.start_step,
            stop_step: r.stop_step,
            inputs,
            train_ma,
            detector,
            limiter,
            guard: NonFiniteGuard::new(icfg.anomaly.max_consecutive_nonfinite),
            pending: Vec::new(),
            flops_per_token: metrics::flops_per_token(
                parameter_count(m) as u64,
                m.num_layers as u64,
                cfg.training.seq_len as u64,
                m.hidden_size as u64,
            ),
            interval_ms: Vec::new(),
            last_good_step: r.start_step,
            gpu_mem_gb: None,
            stop_reason: None,
            icfg,
        })
    }

    /// Records one step: its line in scalars.jsonl (with the ternary statistics when due), the
    /// console line when due, and the loss and gradient-norm triggers.
    pub fn step(&mut self, rep: &StepReport, batch: &Batch) -> Result<()> {
        let step = rep.step;
        let verdict = self.guard.check(rep.loss, rep.grad_norm);
        let event = self.detector.observe_step(step, rep.loss, rep.grad_norm);
        self.train_ma.push(rep.loss);

        let step_ms = rep.step_time.as_secs_f64() * 1e3;
        let tokens_per_sec =
            self.config.tokens_per_step() as f64 / rep.step_time.as_secs_f64().max(1e-9);
        // `nvidia-smi` takes tens of ms: ask every 100 steps (and at the first step) and repeat
        // the last answer in between; never on CPU.
        if self.device.is_cuda() && (step == self.start_step + 1 || step.is_multiple_of(100)) {
            self.gpu_mem_gb = gpu_process_memory_gb();
        }
        let mut s = StepScalars {
            step,
            tokens_seen: step * self.config.tokens_per_step(),
            loss: rep.loss,
            lr: rep.lr,
            wd: rep.wd,
            grad_norm: rep.grad_norm,
            step_time_ms: step_ms,
            tokens_per_sec,
            gpu_mem_allocated_gb: self.gpu_mem_gb,
            gpu_mem_reserved_gb: self.gpu_mem_gb,
            data_wait_ms: rep.data_wait.as_secs_f64() * 1e3,
            mfu: metrics::mfu(self.flops_per_token, tokens_per_sec, self.icfg.peak_flops),
            anomaly_flag: event.as_ref().map(|e| e.event.name().to_string()),
            update_applied: rep.grad_norm.is_finite(),
            batch_sha256: batch.sha256.clone(),
            extra: Default::default(),
        };
        if InstrumentationConfig::due(self.icfg.quant_stats_every, step) {
            for layer in probes::quant_stats(&self.params, &self.config.model)? {
                layer.insert_keys(&mut s.extra);
            }
        }
        self.scalars.write(&s)?;
        self.interval_ms.push(step_ms);
        if InstrumentationConfig::due(self.icfg.log_every, step) || step == self.stop_step {
            let mean = self.interval_ms.iter().sum::<f64>() / self.interval_ms.len() as f64;
            tracing::info!(
                "{}",
                metrics::console_line(&s, self.config.training.total_steps, self.stop_step, mean)
            );
            self.interval_ms.clear();
        }
        self.pending.extend(event);

        match verdict {
            NonFiniteVerdict::Apply => self.last_good_step = step,
            NonFiniteVerdict::Skip { consecutive } => {
                tracing::warn!(
                    "step {step}: NaN/Inf loss or gradient norm, update skipped ({consecutive} in a row)"
                );
            }
            NonFiniteVerdict::Stop { consecutive } => {
                let msg = nonfinite_stop_message(step, consecutive, self.last_good_step);
                tracing::error!("{msg}");
                self.stop_reason = Some(msg);
            }
        }
        Ok(())
    }

    /// Whether the run must stop now (too many NaN/Inf steps in a row).
    pub fn must_stop(&self) -> bool {
        self.stop_reason.is_some()
    }

    /// The frozen eval of the weights after `step` steps -> eval_results.jsonl.
    pub fn eval(&mut self, step: u64, model: &BitNet) -> Result<EvalRecord> {
        // The inference form: no autograd graph, and the LM head in chunks.
        let rec = self.inputs.eval_set.record(
            &model.freeze()?,
            &self.device,
            self.icfg.eval_batch_size,
            step,
            step * self.config.tokens_per_step(),
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

    /// Samples the fixed prompts with the weights after `step` steps -> samples.jsonl, and checks
    /// the round's entropy and repetition.
    pub fn sample(&mut self, step: u64) -> Result<()> {
        let Some(codec) = &self.inputs.codec else {
            return Ok(());
        };
        let t0 = Instant::now();
        let model = self.params.model(&self.config.model)?.freeze()?;
        let records = probes::sampling_round(&model, codec, step, self.icfg.sample_max_new_tokens)?;
        for r in &records {
            self.samples.write(r)?;
        }
        let greedy = records
            .iter()
            .find(|r| r.mode == Mode::Greedy.name())
            .map_or(String::new(), |r| {
                r.generated_text.chars().take(80).collect::<String>()
            });
        tracing::info!(
            "samples step {step} | {} generations in {:.1}s | greedy: {greedy:?}",
            records.len(),
            t0.elapsed().as_secs_f64(),
        );
        let from = (self.icfg.anomaly).round_checks_from(self.config.training.warmup_steps());
        if step >= from {
            let stats = round_stats(&records);
            self.pending
                .extend(self.detector.observe_round(step, &stats));
        }
        Ok(())
    }

    /// Writes a dump (where the rate limit allows) for each anomaly of this step, recomputing
    /// activations and gradient norms on `batch` (none for the initial weights).
    pub fn dump_anomalies(&mut self, model: &BitNet, batch: Option<&Batch>) -> Result<()> {
        for event in std::mem::take(&mut self.pending) {
            self.dump(model, &event, batch)?;
        }
        Ok(())
    }

    fn dump(&mut self, model: &BitNet, event: &AnomalyEvent, batch: Option<&Batch>) -> Result<()> {
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
        let m = &self.config.model;
        let mut w = DumpWriter::begin(&anomalies_dir(self.run.path()), event)?;
        w.note(format!(
            "weights: after step {} (unchanged by a skipped NaN/Inf update); activations and gradient norms are recomputed on the triggering batch with them",
            event.step
        ));
        let inf = self.params.model(m)?.freeze()?;
        if let Some(b) = batch {
            let tokens = Tensor::from_slice(
                &b.tokens,
                (b.indices.len(), self.config.training.seq_len),
                &self.device,
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
            let seq_len = self.config.training.seq_len as u64;
            let documents = self
                .inputs
                .documents
                .sequence_documents(&b.indices, seq_len);
            if let Err(why) = &documents {
                w.note(format!("no document ids: {why}"));
            }
            w.batch_indices(b.step, &b.indices, &b.sha256, documents.as_deref().ok())?;
        }
        w.ternary(&probes::quant_stats(&self.params, m)?)?;
        if let Some(codec) = &self.inputs.codec {
            for prompt in FIXED_PROMPTS {
                w.top20(&probes::top20(&inf, codec, prompt)?)?;
            }
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

    /// Applies the retention policy once checkpoint `step_N` is complete.
    pub fn after_checkpoint(&mut self, step: u64) -> Result<()> {
        let dir = self.run.checkpoints();
        let policy = &self.icfg.retention;
        let deleted =
            retention::apply_retention(&dir, policy, stage_boundary(&self.config.training))
                .with_context(|| format!("applying checkpoint retention in {}", dir.display()))?;
        if !deleted.is_empty() {
            tracing::info!("retention after step {step}: removed checkpoints {deleted:?}");
        }
        Ok(())
    }

    /// The closing line; fails the run if it was stopped by NaN/Inf steps (`last_checkpoint`
    /// holds the unchanged weights).
    pub fn finish(self, last_checkpoint: &Path) -> Result<()> {
        tracing::info!(
            "instrumentation: {} skipped (NaN/Inf) updates, {} dumps suppressed by the rate limit; report: `trainer report {}` ({})",
            self.guard.total_skipped(),
            self.limiter.suppressed(),
            self.run.path().display(),
            utc_timestamp(unix_now())
        );
        if let Some(msg) = self.stop_reason {
            anyhow::bail!("{msg} ({})", last_checkpoint.display());
        }
        Ok(())
    }
}

/// What a sampling round tells the anomaly triggers.
fn round_stats(records: &[SampleRecord]) -> RoundStats {
    RoundStats {
        mean_entropies: records.iter().map(|r| r.mean_entropy).collect(),
        greedy_max_repetition: records
            .iter()
            .filter(|r| r.mode == Mode::Greedy.name())
            .map(|r| r.max_repetition)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_95m() -> Config {
        Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml"))
            .unwrap()
    }

    #[test]
    fn plan_schedule_and_config_json() {
        let c = config_95m();
        assert_eq!(stage_boundary(&c.training), Some(30_000));
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
