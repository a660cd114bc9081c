//! The run configuration: one serde tree read from a TOML file (`configs/*.toml`), with the section
//! and key names of the run folder's `meta/config.json` (the run-folder contract, README), so a
//! config and the record of the run it drove read the same; validated once by
//! [`Config::validate`]. Derived quantities (head_dim, tokens per step, total tokens) are methods,
//! never stored twice.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors from reading or validating a configuration; each names the file or the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}; hint: check the path given to --config")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}; hint: compare with configs/bitnet-95m.toml")]
    Parse { path: String, detail: String },
    /// An `[instrumentation]` value; the message names the field and carries the hint.
    #[error("config {0}")]
    Instrumentation(String),
    #[error("config field `{field}`: {detail}; hint: {hint}")]
    Invalid {
        field: &'static str,
        detail: String,
        hint: &'static str,
    },
}

/// The whole configuration of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The network.
    pub model: ModelConfig,
    /// Batches, optimizer and schedules.
    pub training: TrainingConfig,
    /// Which token shards the run expects (checked against `manifest.json` before step 0).
    pub data: DataConfig,
    /// Metrics, eval, samples, anomaly dumps, checkpoint retention; every field defaults to its
    /// value in configs/bitnet-95m.toml (`peak_flops` aside), so the section may be omitted.
    #[serde(default)]
    pub instrumentation: crate::instrument::InstrumentationConfig,
}

/// The BitNet b1.58 network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens in the vocabulary (LLaMA-2: 32,000); rows of the tied embedding / LM head.
    pub vocab_size: usize,
    /// Width of the residual stream (d_model).
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads; head_dim = hidden_size / num_heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention); kv head j serves query heads j*r .. j*r+r-1,
    /// r = num_heads / num_kv_heads.
    pub num_kv_heads: usize,
    /// Inner width of the SwiGLU feed-forward (per gate and per up projection).
    pub ffn_hidden_size: usize,
    /// Longest sequence the model is built for, in tokens (RoPE tables cover it).
    pub max_seq_length: usize,
    /// RMSNorm epsilon added to mean(x^2), for numerical safety at small activations.
    pub norm_eps: f64,
    /// RoPE base frequency theta (`inv_freq[i] = theta^(-2i/head_dim)`).
    pub rope_theta: f64,
    /// Extra learnable RMSNorm on the inputs of out_proj and down_proj, as the public BitNet b1.58
    /// reproductions do (+2 * hidden_size parameters per block). Off in the 95M model
    /// (configs/bitnet-95m.toml).
    #[serde(default)]
    pub sub_norm: bool,
    /// Standard deviation of the normal initialisation of every matrix (norm weights start at 1).
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

fn default_init_std() -> f64 {
    0.02
}

/// One knot of a piecewise schedule: the value at `step`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knot {
    /// Steps done when `value` holds: step N (counted from 1) uses the schedule at N - 1, so
    /// the knot at 0 is the first step's value.
    pub step: u64,
    /// Learning rate or weight decay at that step.
    pub value: f64,
}

/// Batches, optimizer, schedules, checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Tokens per training sequence; must equal the shards' seq_len.
    pub seq_len: usize,
    /// Sequences per optimizer step (the global batch, split into grad_accumulation_steps
    /// micro-batches of batch_size / grad_accumulation_steps sequences).
    pub batch_size: usize,
    /// Micro-batches per optimizer step; the gradient is their mean, the same math as one batch.
    pub grad_accumulation_steps: usize,
    /// Optimizer steps of the whole run; the schedules and the data budget follow it, also when a
    /// run is stopped early with --steps.
    pub total_steps: u64,
    /// Learning rate: linear between knots, constant after the last (first knot at step 0).
    pub lr_knots: Vec<Knot>,
    /// Weight decay: piecewise constant, each knot holds from its step until the next knot.
    pub wd_knots: Vec<Knot>,
    /// Clip the global gradient L2 norm to this value (torch clip_grad_norm_ semantics).
    pub grad_clip_norm: f64,
    /// AdamW first-moment decay.
    pub adam_beta1: f64,
    /// AdamW second-moment decay.
    pub adam_beta2: f64,
    /// AdamW denominator epsilon.
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f64,
    /// Seed of the weight initialisation and of the data order permutation.
    pub seed: u64,
    /// How the gradients are computed (the same math either way).
    #[serde(default)]
    pub backward: Backward,
}

/// How the gradients are computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backward {
    /// The hand-written pass: keeps only what the backward reads (the activation memory of the
    /// README's budget).
    #[default]
    Manual,
    /// candle's autograd over the composed forward: the reference the hand-written pass is
    /// tested against, with several times its activation memory.
    Autograd,
}

fn default_adam_eps() -> f64 {
    1e-8
}

/// The dataset the run expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Source dataset (informational; the shards' manifest names what was actually read).
    pub dataset: String,
    /// Split of the source dataset the shards were cut from.
    #[serde(default = "default_split")]
    pub split: String,
    /// Tokenizer name (informational).
    pub tokenizer: String,
    /// sha256 of the tokenizer.json the shards were made with; the trainer refuses shards whose
    /// manifest names another one (token ids would mean different things).
    pub tokenizer_sha256: String,
}

fn default_split() -> String {
    "train".into()
}

impl ModelConfig {
    /// Features per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

impl TrainingConfig {
    /// The highest learning rate: the largest value of `lr_knots` (1.5e-3 in bitnet-95m.toml).
    pub fn peak_lr(&self) -> f64 {
        self.lr_knots.iter().map(|k| k.value).fold(0.0, f64::max)
    }

    /// Steps of warmup: the step of the first lr knot at the peak (375 in bitnet-95m.toml).
    pub fn warmup_steps(&self) -> u64 {
        let peak = self.peak_lr();
        self.lr_knots
            .iter()
            .find(|k| k.value == peak)
            .map_or(0, |k| k.step)
    }

    /// Weight decay of the first stage: the first value of `wd_knots` (0.1 in bitnet-95m.toml).
    pub fn stage1_wd(&self) -> f64 {
        self.wd_knots.first().map_or(0.0, |k| k.value)
    }

    /// Weight decay of the last stage: the last value of `wd_knots` (0.0 in bitnet-95m.toml).
    pub fn stage2_wd(&self) -> f64 {
        self.wd_knots.last().map_or(0.0, |k| k.value)
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse { detail, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                detail,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            detail: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML text (what `Config::from_toml_str` reads back).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a config always serializes to TOML")
    }

    /// Checks every cross-field constraint once, so the rest of the code may rely on them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        let t = &self.training;
        let invalid = |field, detail: String, hint| {
            Err(ConfigError::Invalid {
                field,
                detail,
                hint,
            })
        };
        for (field, v) in [
            ("model.vocab_size", m.vocab_size),
            ("model.hidden_size", m.hidden_size),
            ("model.num_layers", m.num_layers),
            ("model.num_heads", m.num_heads),
            ("model.num_kv_heads", m.num_kv_heads),
            ("model.ffn_hidden_size", m.ffn_hidden_size),
            ("training.batch_size", t.batch_size),
            (
                "training.grad_accumulation_steps",
                t.grad_accumulation_steps,
            ),
        ] {
            if v == 0 {
                return invalid(field, "must be positive".into(), "set a positive value");
            }
        }
        if m.vocab_size > pipeline::format::shard::MAX_VOCAB as usize {
            return invalid(
                "model.vocab_size",
                format!("{} does not fit the u16 tokens of the shards", m.vocab_size),
                "use a vocabulary of at most 65,536 tokens",
            );
        }
        if !m.hidden_size.is_multiple_of(m.num_heads) {
            return invalid(
                "model.hidden_size",
                format!(
                    "{} is not divisible by model.num_heads = {}",
                    m.hidden_size, m.num_heads
                ),
                "choose hidden_size = num_heads * head_dim",
            );
        }
        if !m.num_heads.is_multiple_of(m.num_kv_heads) {
            return invalid(
                "model.num_heads",
                format!(
                    "{} is not divisible by model.num_kv_heads = {}",
                    m.num_heads, m.num_kv_heads
                ),
                "each kv head must serve the same number of query heads",
            );
        }
        if !m.head_dim().is_multiple_of(2) {
            return invalid(
                "model.hidden_size",
                format!("head_dim {} is odd", m.head_dim()),
                "RoPE rotates pairs of features, so head_dim must be even",
            );
        }
        if !(positive(m.norm_eps) && positive(m.rope_theta) && positive(m.init_std)) {
            return invalid(
                "model.norm_eps/rope_theta/init_std",
                "must be positive".into(),
                "configs/bitnet-95m.toml uses 1e-5, 10000.0 and 0.02",
            );
        }
        if t.seq_len < 2 || t.seq_len > m.max_seq_length {
            return invalid(
                "training.seq_len",
                format!(
                    "{} is not within 2..=model.max_seq_length ({})",
                    t.seq_len, m.max_seq_length
                ),
                "the loss needs at least two tokens and RoPE covers max_seq_length",
            );
        }
        if !t.batch_size.is_multiple_of(t.grad_accumulation_steps) {
            return invalid(
                "training.grad_accumulation_steps",
                format!(
                    "training.batch_size {} is not divisible by {}",
                    t.batch_size, t.grad_accumulation_steps
                ),
                "micro-batches must all have the same size",
            );
        }
        if t.total_steps == 0 {
            return invalid(
                "training.total_steps",
                "must be positive".into(),
                "e.g. 60000",
            );
        }
        check_knots("training.lr_knots", &t.lr_knots)?;
        check_knots("training.wd_knots", &t.wd_knots)?;
        if !positive(t.grad_clip_norm) {
            return invalid(
                "training.grad_clip_norm",
                "must be positive".into(),
                "configs/bitnet-95m.toml uses 1.0",
            );
        }
        for (field, b) in [
            ("training.adam_beta1", t.adam_beta1),
            ("training.adam_beta2", t.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return invalid(
                    field,
                    format!("{b} is not in [0, 1)"),
                    "configs/bitnet-95m.toml uses 0.9 and 0.95",
                );
            }
        }
        if !positive(t.adam_eps) {
            return invalid(
                "training.adam_eps",
                "must be positive".into(),
                "torch's default is 1e-8",
            );
        }
        if self.data.tokenizer_sha256.len() != 64
            || !self
                .data
                .tokenizer_sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        {
            return invalid(
                "data.tokenizer_sha256",
                format!(
                    "`{}` is not a sha256 hex digest",
                    self.data.tokenizer_sha256
                ),
                "run `sha256sum tokenizer.json` on the tokenizer the shards were made with",
            );
        }
        self.instrumentation
            .validate()
            .map_err(ConfigError::Instrumentation)
    }

    /// Sequences per micro-batch.
    pub fn micro_batch_size(&self) -> usize {
        self.training.batch_size / self.training.grad_accumulation_steps
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.training.batch_size * self.training.seq_len) as u64
    }

    /// Tokens of the whole run (total_steps * batch_size * seq_len).
    pub fn total_tokens(&self) -> u64 {
        self.training.total_steps * self.tokens_per_step()
    }
}

/// True for a positive number (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

fn check_knots(field: &'static str, knots: &[Knot]) -> Result<(), ConfigError> {
    let invalid = |detail: String| ConfigError::Invalid {
        field,
        detail,
        hint: "knots are {step, value} tables with the first at step 0 and steps increasing",
    };
    match knots.first() {
        None => return Err(invalid("is empty".into())),
        Some(k) if k.step != 0 => return Err(invalid(format!("first knot at step {}", k.step))),
        _ => {}
    }
    for w in knots.windows(2) {
        if w[1].step <= w[0].step {
            return Err(invalid(format!(
                "step {} follows step {}",
                w[1].step, w[0].step
            )));
        }
    }
    if let Some(k) = knots
        .iter()
        .find(|k| k.value.is_nan() || k.value < 0.0 || k.value.is_infinite())
    {
        return Err(invalid(format!(
            "value {} at step {} is not a finite non-negative number",
            k.value, k.step
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_95m() -> Config {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        Config::load(&path).unwrap()
    }

    #[test]
    fn plan_config_loads_with_the_plan_values() {
        let c = config_95m();
        assert_eq!(c.model.head_dim(), 64);
        assert_eq!(c.total_tokens(), 1_966_080_000);
        assert_eq!(c.training.total_steps, 60_000);
    }

    #[test]
    fn tiny_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.model.vocab_size, 32_000);
    }

    #[test]
    fn hidden_not_divisible_by_heads_is_refused_naming_the_fields() {
        let mut c = config_95m();
        c.model.hidden_size = 770;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("model.hidden_size") && err.contains("num_heads"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_knots_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let err = Config::from_toml_str(&text.replace("[model]\n", "[model]\nhidden_sise = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_sise"), "{err}");
        let mut c = config_95m();
        c.training.lr_knots[1].step = 0;
        assert!(c.validate().unwrap_err().to_string().contains("lr_knots"));
        let mut c = config_95m();
        c.model.vocab_size = 70_000;
        assert!(c.validate().unwrap_err().to_string().contains("u16"));
    }
}
