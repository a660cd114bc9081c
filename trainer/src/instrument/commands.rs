//! The user-facing commands built on the probes: `trainer eval` (eval loss of any checkpoint),
//! `trainer sample` (generate from any checkpoint with the KV cache), `trainer batch` (the
//! documents a step trained on, with their text) and `trainer report`.
//! Each returns what it printed, so tests call them directly.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use pipeline::format::{DocumentInSequence, Manifest};
use serde::Serialize;

use super::eval::EvalRecord;
use super::generator::CachedGenerator;
use super::probes::{EvalSet, PromptCodec};
use super::report;
use super::sample::{self, Mode, SampleKey, SampleRecord};
use crate::checkpoint;
use crate::config::Config;
use crate::data::{DataOrder, batch_hash};
use crate::documents::{open_index, sequence_documents, step_sequences};
use crate::model::Params;
use crate::setup::{self, DeviceChoice, select_device};

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

/// Options of `trainer batch`.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub shards: PathBuf,
    pub config: PathBuf,
    /// The update, counted from 1 as in metrics/scalars.jsonl.
    pub step: u64,
    /// Add each document's text within the sequence.
    pub decode: bool,
}

/// What `trainer batch` prints (`--json`: this, serialized).
#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    pub step: u64,
    /// As in metrics/scalars.jsonl and `trainer data-order`.
    pub batch_sha256: String,
    pub seq_len: u64,
    pub sequences: Vec<BatchSequence>,
}

/// One train sequence of the batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchSequence {
    /// Index of the sequence in the train split.
    pub index: u64,
    pub documents: Vec<BatchDocument>,
}

/// A document's share of a sequence, and with `--decode` the text of those tokens.
#[derive(Debug, Clone, Serialize)]
pub struct BatchDocument {
    #[serde(flatten)]
    pub document: DocumentInSequence,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// `trainer batch --shards DIR --step N`: the sequences of step N and the documents in each.
pub fn batch_documents(o: &BatchOptions) -> Result<BatchReport> {
    let cfg = Config::load(&o.config)?;
    let shards = setup::open_shards(&o.shards, &cfg)?;
    let order = DataOrder::new(cfg.training.seed, shards.data.num_sequences());
    let indices = step_sequences(&order, o.step, cfg.training.batch_size)?;
    let tokens = shards.data.load(&indices);
    let seq_len = shards.data.seq_len();
    let codec = match o.decode {
        true => Some(PromptCodec::open(&o.shards, &shards.manifest)?),
        false => None,
    };
    let index = open_index(&o.shards)?;
    let found = sequence_documents(&index, &indices, seq_len as u64)?;
    let sequences = found
        .into_iter()
        .zip(tokens.chunks_exact(seq_len))
        .map(|(seq, ids)| BatchSequence {
            index: seq.index,
            documents: seq
                .documents
                .into_iter()
                .map(|d| {
                    let [a, b] = d.sequence_tokens.map(|t| t as usize);
                    BatchDocument {
                        text: codec.as_ref().map(|c| c.decode(&ids[a..b])),
                        document: d,
                    }
                })
                .collect(),
        })
        .collect();
    Ok(BatchReport {
        step: o.step,
        batch_sha256: batch_hash(&tokens),
        seq_len: seq_len as u64,
        sequences,
    })
}

/// Human-readable form of a batch: per sequence, one line per document (its tokens in the
/// sequence, id, source file and row, and which of its own tokens those are), then its text.
pub fn format_batch(r: &BatchReport) -> String {
    let mut out = format!(
        "step {} | {} train sequences of {} tokens | batch_sha256 {}\n",
        r.step,
        r.sequences.len(),
        r.seq_len,
        r.batch_sha256
    );
    for seq in &r.sequences {
        out.push_str(&format!("sequence {}\n", seq.index));
        for d in &seq.documents {
            let doc = &d.document;
            let [a, b] = doc.sequence_tokens;
            let [da, db] = doc.document_tokens;
            out.push_str(&format!(
                "  tokens {a:>5}..{b:<5} {} | {} row {} | its tokens {da}..{db} of {}\n",
                doc.id, doc.file, doc.row, doc.tokens
            ));
            if let Some(text) = &d.text {
                for line in text.lines() {
                    out.push_str(&format!("      | {line}\n"));
                }
            }
        }
    }
    out
}

/// `trainer report runs/<id>`.
pub fn report_run(run: &Path) -> Result<report::ReportOutput> {
    report::write_report(run)
}
