//! The user-facing commands built on the probes: `trainer eval` (eval loss of any checkpoint),
//! `trainer sample` (generate from any checkpoint with the KV cache) and `trainer report`.
//! Each returns what it printed, so tests call them directly.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use pipeline::format::Manifest;

use super::eval::EvalRecord;
use super::generator::CachedGenerator;
use super::probes::{EvalSet, PromptCodec};
use super::report;
use super::sample::{self, Mode, SampleKey, SampleRecord};
use crate::checkpoint;
use crate::config::Config;
use crate::model::Params;
use crate::setup::{DeviceChoice, select_device};

/// A checkpoint's weights and the config stored with it.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<(Config, Params, u64)> {
    let state = checkpoint::load_state(dir)?;
    let path = dir.join(checkpoint::MODEL_FILE);
    let params = Params::load(&path, &state.config.model, device).with_context(|| {
        format!(
            "loading {}; hint: pass a folder runs/<id>/checkpoints/step_NNNNNN",
            path.display()
        )
    })?;
    Ok((state.config, params, state.step))
}

/// `trainer eval --checkpoint DIR --shards DIR [--json]`: the frozen eval of one checkpoint.
pub fn eval_checkpoint(
    checkpoint: &Path,
    shards: &Path,
    device: DeviceChoice,
    batch_size: Option<usize>,
    sequences: Option<u64>,
) -> Result<EvalRecord> {
    let device = &select_device(device)?;
    let (cfg, params, step) = load_checkpoint(checkpoint, device)?;
    let manifest = Manifest::load(shards)?;
    crate::data::check_manifest(&manifest, shards, &cfg)?;
    let set = EvalSet::open(
        shards,
        &manifest,
        sequences.or(cfg.instrumentation.eval_sequences),
    )?;
    let model = params.model(&cfg.model)?;
    set.record(
        &model,
        device,
        batch_size.unwrap_or(cfg.instrumentation.eval_batch_size),
        step,
        step * cfg.tokens_per_step(),
        None,
    )
}

/// Human-readable form of an eval record.
pub fn format_eval(r: &EvalRecord) -> String {
    format!(
        "step {} | eval loss {:.4} | ppl {:.2} | bits/byte {} | {} sequences ({} predicted tokens) in {:.1}s",
        r.step,
        r.eval_loss,
        r.eval_ppl,
        r.bits_per_byte.map_or("-".into(), |b| format!("{b:.4}")),
        r.eval_sequences,
        r.eval_predicted_tokens,
        r.eval_seconds
    )
}

/// Options of `trainer sample`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub checkpoint: PathBuf,
    /// Shard folder whose `tokenizer.json` encodes the prompt.
    pub shards: PathBuf,
    pub prompt: String,
    pub mode: Mode,
    pub max_new_tokens: usize,
    /// `None`: the stable seed of (prompt 0, checkpoint step, mode).
    pub seed: Option<u64>,
}

/// `trainer sample`: one generation with the KV cache, as a samples.jsonl record.
pub fn sample_checkpoint(o: &SampleOptions, device: DeviceChoice) -> Result<SampleRecord> {
    let (cfg, params, step) = load_checkpoint(&o.checkpoint, &select_device(device)?)?;
    let manifest = Manifest::load(&o.shards)?;
    let codec = PromptCodec::open(&o.shards, &manifest)?;
    let model = params.model(&cfg.model)?.freeze()?;
    let ids = codec.encode(&o.prompt)?;
    anyhow::ensure!(
        ids.len() < model.max_seq_length(),
        "--prompt: {} tokens, the model holds at most {}; hint: shorten the prompt",
        ids.len(),
        model.max_seq_length()
    );
    let max_new = o.max_new_tokens.min(model.max_seq_length() - ids.len());
    let seed = o
        .seed
        .unwrap_or_else(|| sample::stable_seed(0, step, o.mode));
    let g = sample::generate(
        &mut CachedGenerator::new(&model),
        &ids,
        o.mode,
        seed,
        max_new,
        Some(codec.eos),
    )?;
    let key = SampleKey {
        step,
        prompt_index: 0,
        prompt: &o.prompt,
        mode: o.mode,
        seed,
    };
    let decode = |ids: &[u32]| {
        if ids.len() == 1 {
            codec.token(ids[0])
        } else {
            codec.decode(ids)
        }
    };
    Ok(SampleRecord::new(key, &g, Some(codec.eos), &decode))
}

/// `trainer report runs/<id>`.
pub fn report_run(run: &Path) -> Result<report::ReportOutput> {
    report::write_report(run)
}
