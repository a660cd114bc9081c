//! The `[instrumentation]` section of a run config: how often each probe runs (quant stats, eval,
//! samples, checkpoints), the anomaly thresholds and the checkpoint retention policy. Every field
//! defaults to its value in configs/bitnet-95m.toml (`peak_flops` aside, which depends on the
//! hardware), so a config may omit the section.

use serde::{Deserialize, Serialize};

use super::anomaly::AnomalyConfig;
use super::retention::{RetentionConfig, RetentionKind};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstrumentationConfig {
    /// Steps between console lines (`metrics/scalars.jsonl` gets every step regardless). Every
    /// interval of this section may be 0: never (a console line still closes the run).
    pub log_every: u64,
    /// Steps between the per-layer -1/0/+1 fractions and absmean scales (1,000 in bitnet-95m.toml).
    pub quant_stats_every: u64,
    /// Steps between frozen evals over the eval split (1,000 in bitnet-95m.toml; step 0 included).
    pub eval_every: u64,
    /// Eval sequences per eval; `None` = the whole eval split of the shards (10,000
    /// sequences from `pipeline prepare` by default).
    pub eval_sequences: Option<u64>,
    /// Sequences per eval forward pass (memory, not results: the loss is a mean over tokens).
    pub eval_batch_size: usize,
    /// Steps between text-sample rounds (5 prompts x 3 modes; 1,000 in bitnet-95m.toml; step 0
    /// included).
    pub sample_every: u64,
    /// New tokens per sample (50 in bitnet-95m.toml).
    pub sample_max_new_tokens: usize,
    /// Steps between regular checkpoints (5,000 in bitnet-95m.toml); step 0, the stage boundary
    /// pair and the last step are always written.
    pub checkpoint_every: u64,
    /// Which checkpoints survive on disk.
    pub retention: RetentionConfig,
    /// Anomaly triggers and dump limits.
    pub anomaly: AnomalyConfig,
    /// Peak accelerator FLOP/s used for MFU (e.g. 989e12 for H100 bf16 dense); `None` on CPU
    /// (mfu is then null).
    pub peak_flops: Option<f64>,
}

impl Default for InstrumentationConfig {
    fn default() -> Self {
        InstrumentationConfig {
            log_every: 10,
            quant_stats_every: 1000,
            eval_every: 1000,
            eval_sequences: None,
            eval_batch_size: 32,
            sample_every: 1000,
            sample_max_new_tokens: 50,
            checkpoint_every: 5000,
            retention: RetentionConfig::default(),
            anomaly: AnomalyConfig::default(),
            peak_flops: None,
        }
    }
}

impl InstrumentationConfig {
    /// Checks the section (part of `Config::validate`); the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.eval_batch_size == 0 {
            return Err("[instrumentation] eval_batch_size = 0; hint: use e.g. 32".into());
        }
        if self.anomaly.spike_window == 0 || self.anomaly.spike_factor <= 1.0 {
            return Err("[instrumentation.anomaly] spike_window must be > 0 and spike_factor > 1; hint: configs/bitnet-95m.toml uses 100 and 2.0".into());
        }
        if self.retention.policy == RetentionKind::Ring
            && (self.retention.ring_last == 0 || self.retention.keep_every == 0)
        {
            return Err("[instrumentation.retention] ring_last and keep_every must be > 0 for policy = \"ring\"; hint: configs/bitnet-95m.toml uses 5 and 10000".into());
        }
        Ok(())
    }

    /// Whether a periodic probe with interval `every` (0: never) runs after `step` steps.
    pub fn due(every: u64, step: u64) -> bool {
        every > 0 && step.is_multiple_of(every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_the_plan_values() {
        let c: InstrumentationConfig = toml::from_str("").unwrap();
        assert_eq!(c, InstrumentationConfig::default());
        assert_eq!(c.eval_every, 1000);
        assert_eq!(c.checkpoint_every, 5000);
        assert_eq!(c.anomaly.spike_window, 100);
        c.validate().unwrap();
    }

    #[test]
    fn parses_sections_and_rejects_unknown_keys() {
        let c: InstrumentationConfig =
            toml::from_str("eval_every = 5\n[retention]\npolicy = \"ring\"\n").unwrap();
        assert_eq!(c.eval_every, 5);
        assert_eq!(c.retention.policy, RetentionKind::Ring);
        assert!(toml::from_str::<InstrumentationConfig>("eval_evry = 5").is_err());
        let off: InstrumentationConfig = toml::from_str("sample_every = 0").unwrap();
        off.validate().unwrap();
        assert!(!InstrumentationConfig::due(off.sample_every, 0));
        let ring: InstrumentationConfig =
            toml::from_str("retention = { policy = \"ring\", ring_last = 0 }").unwrap();
        assert!(ring.validate().unwrap_err().contains("ring_last"));
    }
}
