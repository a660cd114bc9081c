//! The `[instrumentation]` section of a run config: how often each probe of plan section 5 runs,
//! the anomaly thresholds, the checkpoint retention policy and a test-only hook that forces each
//! anomaly. Every field has a default equal to the plan's value, so a config may omit the section.

use serde::{Deserialize, Serialize};

use super::anomaly::AnomalyKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstrumentationConfig {
    /// Steps between console lines (`metrics/scalars.jsonl` gets every step regardless).
    pub log_every: u64,
    /// Steps between the per-layer -1/0/+1 fractions and absmean scales (plan: 1,000).
    pub quant_stats_every: u64,
    /// Steps between frozen evals over the eval split (plan: 1,000).
    pub eval_every: u64,
    /// Eval sequences per eval; `None` = the whole eval split of the shards (plan: 10,000).
    pub eval_sequences: Option<u64>,
    /// Sequences per eval forward pass (memory, not results: the loss is a mean over tokens).
    pub eval_batch_size: usize,
    /// Steps between text-sample rounds (5 prompts x 3 modes; plan: 1,000).
    pub sample_every: u64,
    /// New tokens per sample (plan: 50).
    pub sample_max_new_tokens: usize,
    /// Steps between regular checkpoints (plan: 5,000); step 0, the stage boundary pair and the
    /// last step are always added.
    pub checkpoint_every: u64,
    /// Which checkpoints survive on disk.
    pub retention: RetentionConfig,
    /// Anomaly triggers and dump limits.
    pub anomaly: AnomalyConfig,
    /// Peak accelerator FLOP/s used for MFU (e.g. 989e12 for H100 bf16 dense); `None` on CPU
    /// (mfu is then null).
    pub peak_flops: Option<f64>,
    /// TEST ONLY: force anomaly events at given steps so tests see every dump. Empty in real
    /// configs; a non-empty list is printed as a warning at start.
    pub test_hooks: Vec<ForcedAnomaly>,
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
            test_hooks: Vec::new(),
        }
    }
}

/// Plan 5.B: "keep all checkpoints if disk space allows" or the ring alternative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// `keep_all` or `ring`.
    pub policy: RetentionKind,
    /// Ring only: how many of the newest checkpoints to keep (plan: 5).
    pub ring_last: usize,
    /// Ring only: checkpoints at multiples of this step are kept forever (plan: 10,000).
    pub keep_every: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            policy: RetentionKind::KeepAll,
            ring_last: 5,
            keep_every: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionKind {
    KeepAll,
    Ring,
}

/// Plan 5.F triggers; the thresholds are the plan's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// A loss above `spike_factor` x its moving average is a spike (plan: 2).
    pub spike_factor: f64,
    /// Window of that moving average, in steps; no spike is reported before it is full (plan: 100).
    pub spike_window: usize,
    /// Mean entropy (nats) across the prompts of a sampling round below this is a collapse (plan: 1.0).
    pub entropy_collapse_below: f64,
    /// Greedy `max_repetition` above this is a repetition surge (plan: 20).
    pub repetition_surge_above: u64,
    /// At most this many dumps per run, so a diverging run cannot fill the disk.
    pub max_dumps: usize,
    /// At least this many steps between two dumps of the same kind.
    pub min_steps_between_dumps: u64,
    /// Consecutive NaN/Inf losses (each update skipped) after which the run stops.
    pub max_consecutive_nonfinite: u32,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            spike_factor: 2.0,
            spike_window: 100,
            entropy_collapse_below: 1.0,
            repetition_surge_above: 20,
            max_dumps: 20,
            min_steps_between_dumps: 500,
            max_consecutive_nonfinite: 5,
        }
    }
}

/// TEST ONLY: at `step`, perturb the detector's input so that `event` fires through the real
/// detector, dump and (for NaN/Inf) skip-update path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForcedAnomaly {
    pub step: u64,
    pub event: AnomalyKind,
}

impl InstrumentationConfig {
    /// Checks the intervals once at start; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("log_every", self.log_every),
            ("quant_stats_every", self.quant_stats_every),
            ("eval_every", self.eval_every),
            ("sample_every", self.sample_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(format!(
                    "[instrumentation] {name} = 0; hint: use a positive number of steps"
                ));
            }
        }
        if self.eval_batch_size == 0 {
            return Err("[instrumentation] eval_batch_size = 0; hint: use e.g. 32".into());
        }
        if self.anomaly.spike_window == 0 || self.anomaly.spike_factor <= 1.0 {
            return Err("[instrumentation.anomaly] spike_window must be > 0 and spike_factor > 1; hint: the plan uses 100 and 2.0".into());
        }
        if self.retention.policy == RetentionKind::Ring
            && (self.retention.ring_last == 0 || self.retention.keep_every == 0)
        {
            return Err("[instrumentation.retention] ring_last and keep_every must be > 0 for policy = \"ring\"; hint: the plan uses 5 and 10000".into());
        }
        Ok(())
    }

    /// Whether a periodic probe with interval `every` runs after `step` updates.
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
    fn parses_hooks_and_rejects_unknown_keys() {
        let c: InstrumentationConfig = toml::from_str(
            "eval_every = 5\n[retention]\npolicy = \"ring\"\n[[test_hooks]]\nstep = 3\nevent = \"loss_spike\"\n",
        )
        .unwrap();
        assert_eq!(c.eval_every, 5);
        assert_eq!(c.retention.policy, RetentionKind::Ring);
        assert_eq!(c.test_hooks[0].event, AnomalyKind::LossSpike);
        assert!(toml::from_str::<InstrumentationConfig>("eval_evry = 5").is_err());
        let zero: InstrumentationConfig = toml::from_str("sample_every = 0").unwrap();
        assert!(zero.validate().unwrap_err().contains("sample_every"));
    }
}
