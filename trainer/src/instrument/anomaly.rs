//! Anomaly triggers and debug dumps -> `anomalies/step_NNNNNN_<event>/`.
//!
//! Triggers: a loss above `spike_factor` x its moving average (once the window is full); a NaN/Inf
//! loss or gradient norm; an entropy collapse (mean entropy of a sampling round below the
//! threshold); a repetition surge (greedy `max_repetition` above the threshold). Dumps are rate
//! limited. A NaN/Inf step skips its update; after `max_consecutive_nonfinite` in a row the run
//! stops (the caller writes a final checkpoint of the last good state).
//!
//! The dump itself is written by [`DumpWriter`]: the caller feeds it the activations, ternary
//! statistics, top-20 distributions, gradient norms and batch indices it has; everything goes to a
//! temporary folder renamed at the end, so a half dump never carries the final name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::metrics::MovingAverage;
use super::plots;
use super::ternary::{LayerTernary, PROJECTIONS};
use crate::documents::SequenceDocuments;

/// The anomaly triggers and dump limits; every default is the value in configs/bitnet-95m.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// A loss above `spike_factor` x its moving average is a spike (2 in bitnet-95m.toml).
    pub spike_factor: f64,
    /// Window of that moving average, in steps; no spike is reported before it is full (100 in
    /// bitnet-95m.toml).
    pub spike_window: usize,
    /// Mean entropy (nats) across the prompts of a sampling round below this is a collapse (1.0 in
    /// bitnet-95m.toml).
    pub entropy_collapse_below: f64,
    /// Greedy `max_repetition` above this is a repetition surge (20 in bitnet-95m.toml).
    pub repetition_surge_above: u64,
    /// Check the sampling rounds for entropy collapse and repetition surge only from the end of
    /// the LR warmup (`training.warmup_steps`, read off `lr_knots`) on; `false` checks every
    /// round, as the plan does. Default `true`, a deviation from the plan: a model that has not
    /// yet learned anything repeats one token in greedy decoding, so the untrained weights of
    /// step 0 trip `repetition_surge` in every run, and a dump that fires every time says
    /// nothing about the run.
    pub sample_triggers_after_warmup: bool,
    /// Check the greedy samples for a repetition surge at all. Default `true` (the plan). A model
    /// too small to leave greedy loops makes the check fire on every round of a healthy run, so
    /// it says nothing: configs/tiny.toml sets `false`, measured on a healthy 2,000-step run whose
    /// greedy samples repeat one token 48-51 times in about 55 tokens (the prompt included) in
    /// at least one of the five prompts at every round (README, quick demo). The entropy check
    /// stays on.
    pub repetition_surge_check: bool,
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
            sample_triggers_after_warmup: true,
            repetition_surge_check: true,
            max_dumps: 20,
            min_steps_between_dumps: 500,
            max_consecutive_nonfinite: 5,
        }
    }
}

impl AnomalyConfig {
    /// The first step whose sampling round is checked for entropy collapse and repetition surge,
    /// for a run with `warmup_steps` of LR warmup.
    pub fn round_checks_from(&self, warmup_steps: u64) -> u64 {
        if self.sample_triggers_after_warmup {
            warmup_steps
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    LossSpike,
    /// `nan_inf_loss`: the `anomaly_flag` that the run-folder contract (README) names for a NaN/Inf
    /// loss.
    NanInfLoss,
    NanInfGradNorm,
    EntropyCollapse,
    RepetitionSurge,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 5] = [
        AnomalyKind::LossSpike,
        AnomalyKind::NanInfLoss,
        AnomalyKind::NanInfGradNorm,
        AnomalyKind::EntropyCollapse,
        AnomalyKind::RepetitionSurge,
    ];

    /// The `<event>` of the dump folder and the `anomaly_flag` of scalars.jsonl.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::LossSpike => "loss_spike",
            AnomalyKind::NanInfLoss => "nan_inf_loss",
            AnomalyKind::NanInfGradNorm => "nan_inf_grad_norm",
            AnomalyKind::EntropyCollapse => "entropy_collapse",
            AnomalyKind::RepetitionSurge => "repetition_surge",
        }
    }

    /// Whether the step's update must be skipped (its gradients are not numbers).
    pub fn skips_update(self) -> bool {
        matches!(self, AnomalyKind::NanInfLoss | AnomalyKind::NanInfGradNorm)
    }
}

/// A fired trigger with the numbers that fired it (written as `event.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    pub step: u64,
    pub event: AnomalyKind,
    /// The observed value (loss, grad norm, mean entropy or max repetition); `null` if not finite.
    pub value: Option<f64>,
    /// The threshold it crossed (for a spike: factor x moving average).
    pub threshold: Option<f64>,
    pub detail: String,
}

/// `step_NNNNNN_<event>`.
pub fn dump_dir_name(step: u64, kind: AnomalyKind) -> String {
    format!("step_{step:06}_{}", kind.name())
}

/// What a sampling round tells the detector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundStats {
    /// `mean_entropy` of every record of the round.
    pub mean_entropies: Vec<f64>,
    /// `max_repetition` of the greedy records.
    pub greedy_max_repetition: Vec<u64>,
}

/// The stateful triggers.
#[derive(Debug, Clone)]
pub struct AnomalyDetector {
    cfg: AnomalyConfig,
    loss_ma: MovingAverage,
}

impl AnomalyDetector {
    pub fn new(cfg: AnomalyConfig) -> Self {
        AnomalyDetector {
            loss_ma: MovingAverage::new(cfg.spike_window),
            cfg,
        }
    }

    pub fn config(&self) -> &AnomalyConfig {
        &self.cfg
    }

    /// Restores the window after a resume from the logged losses of the steps before it.
    pub fn prime(&mut self, losses: impl IntoIterator<Item = f64>) {
        for l in losses {
            self.loss_ma.push(l);
        }
    }

    /// Checks one training step. The loss joins the moving average after the check (a spike is
    /// compared with the steps before it); non-finite values never join it.
    pub fn observe_step(&mut self, step: u64, loss: f64, grad_norm: f64) -> Option<AnomalyEvent> {
        let fin = |v: f64| v.is_finite().then_some(v);
        let ev = if !loss.is_finite() {
            Some(AnomalyEvent {
                step,
                event: AnomalyKind::NanInfLoss,
                value: None,
                threshold: None,
                detail: format!("loss is {loss}; the update was skipped"),
            })
        } else if !grad_norm.is_finite() {
            Some(AnomalyEvent {
                step,
                event: AnomalyKind::NanInfGradNorm,
                value: None,
                threshold: None,
                detail: format!("gradient norm is {grad_norm}; the update was skipped"),
            })
        } else {
            match self.loss_ma.mean() {
                Some(ma) if self.loss_ma.is_full() && loss > self.cfg.spike_factor * ma => {
                    Some(AnomalyEvent {
                        step,
                        event: AnomalyKind::LossSpike,
                        value: fin(loss),
                        threshold: Some(self.cfg.spike_factor * ma),
                        detail: format!(
                            "loss {loss:.4} > {} x moving average {ma:.4} over the last {} steps",
                            self.cfg.spike_factor, self.cfg.spike_window
                        ),
                    })
                }
                _ => None,
            }
        };
        self.loss_ma.push(loss);
        ev
    }

    /// Checks one sampling round (entropy collapse, repetition surge).
    pub fn observe_round(&self, step: u64, r: &RoundStats) -> Vec<AnomalyEvent> {
        let mut out = Vec::new();
        if !r.mean_entropies.is_empty() {
            let mean = r.mean_entropies.iter().sum::<f64>() / r.mean_entropies.len() as f64;
            if mean < self.cfg.entropy_collapse_below {
                out.push(AnomalyEvent {
                    step,
                    event: AnomalyKind::EntropyCollapse,
                    value: Some(mean),
                    threshold: Some(self.cfg.entropy_collapse_below),
                    detail: format!(
                        "mean entropy {mean:.3} nats over {} samples < {}",
                        r.mean_entropies.len(),
                        self.cfg.entropy_collapse_below
                    ),
                });
            }
        }
        if let Some(&m) = r.greedy_max_repetition.iter().max()
            && self.cfg.repetition_surge_check
            && m > self.cfg.repetition_surge_above
        {
            out.push(AnomalyEvent {
                step,
                event: AnomalyKind::RepetitionSurge,
                value: Some(m as f64),
                threshold: Some(self.cfg.repetition_surge_above as f64),
                detail: format!(
                    "greedy max_repetition {m} > {}",
                    self.cfg.repetition_surge_above
                ),
            });
        }
        out
    }
}

/// Caps the number of dumps: at most `max_dumps` per run and one per kind per
/// `min_steps_between_dumps` steps.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    max_dumps: usize,
    min_gap: u64,
    written: usize,
    last: BTreeMap<AnomalyKind, u64>,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(cfg: &AnomalyConfig) -> Self {
        RateLimiter {
            max_dumps: cfg.max_dumps,
            min_gap: cfg.min_steps_between_dumps,
            written: 0,
            last: BTreeMap::new(),
            suppressed: 0,
        }
    }

    /// Whether a dump of `kind` at `step` may be written; records it if so.
    pub fn allow(&mut self, step: u64, kind: AnomalyKind) -> bool {
        let too_soon = self
            .last
            .get(&kind)
            .is_some_and(|&l| step.saturating_sub(l) < self.min_gap);
        if self.written >= self.max_dumps || too_soon {
            self.suppressed += 1;
            return false;
        }
        self.written += 1;
        self.last.insert(kind, step);
        true
    }

    /// Counts existing dumps (after a resume) so the cap holds over the whole run.
    pub fn note_existing(&mut self, step: u64, kind: AnomalyKind) {
        self.written += 1;
        let e = self.last.entry(kind).or_insert(step);
        *e = (*e).max(step);
    }

    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// What to do after a step, given whether its loss and norm were finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFiniteVerdict {
    /// Finite: apply the update.
    Apply,
    /// Skip this update; the run continues.
    Skip { consecutive: u32 },
    /// Skip, and stop the run: `consecutive` non-finite steps in a row.
    Stop { consecutive: u32 },
}

/// Counts NaN/Inf steps: in a row (for the stop) and in total (for the summary).
#[derive(Debug, Clone, Default)]
pub struct NonFiniteGuard {
    max_consecutive: u32,
    consecutive: u32,
    total: u64,
}

impl NonFiniteGuard {
    pub fn new(max_consecutive: u32) -> Self {
        NonFiniteGuard {
            max_consecutive: max_consecutive.max(1),
            ..Default::default()
        }
    }

    pub fn check(&mut self, loss: f64, grad_norm: f64) -> NonFiniteVerdict {
        if loss.is_finite() && grad_norm.is_finite() {
            self.consecutive = 0;
            return NonFiniteVerdict::Apply;
        }
        self.consecutive += 1;
        self.total += 1;
        if self.consecutive >= self.max_consecutive {
            NonFiniteVerdict::Stop {
                consecutive: self.consecutive,
            }
        } else {
            NonFiniteVerdict::Skip {
                consecutive: self.consecutive,
            }
        }
    }

    pub fn total_skipped(&self) -> u64 {
        self.total
    }
}

/// The stop message of a run that diverged.
pub fn nonfinite_stop_message(step: u64, consecutive: u32, last_good: u64) -> String {
    format!(
        "stopping at step {step}: {consecutive} consecutive steps with a NaN/Inf loss or gradient norm (updates skipped); \
         the weights of step {last_good} were saved as the final checkpoint; \
         hint: see the anomalies/ folder, lower peak_lr or resume from an earlier checkpoint"
    )
}

/// One prompt's next-token distribution, for `prompt_<...>_top20.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTop20 {
    pub prompt: String,
    pub tokens: Vec<String>,
    pub token_ids: Vec<u32>,
    pub probs: Vec<f64>,
    /// Of the full distribution, in nats.
    pub entropy: f64,
}

/// `prompt_{first 20 chars, spaces as _}_top20.json` (the name of the run-folder contract).
pub fn top20_file_name(prompt: &str) -> String {
    let head: String = prompt.chars().take(20).collect();
    let safe: String = head
        .replace(' ', "_")
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("prompt_{safe}_top20.json")
}

/// Writes one dump; see the module doc.
#[derive(Debug)]
pub struct DumpWriter {
    tmp: PathBuf,
    dest: PathBuf,
    files: Vec<String>,
    activation_stats: BTreeMap<String, plots::ValueStats>,
    notes: Vec<String>,
}

impl DumpWriter {
    /// Starts `anomalies_dir/step_NNNNNN_<event>/` (as a `.tmp` folder) with its `event.json`.
    pub fn begin(anomalies_dir: &Path, event: &AnomalyEvent) -> Result<Self> {
        let dest = anomalies_dir.join(dump_dir_name(event.step, event.event));
        let tmp = anomalies_dir.join(format!("{}.tmp", dump_dir_name(event.step, event.event)));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = DumpWriter {
            tmp,
            dest,
            files: Vec::new(),
            activation_stats: BTreeMap::new(),
            notes: Vec::new(),
        };
        w.json("event.json", event)?;
        Ok(w)
    }

    fn json<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        let mut text = serde_json::to_string_pretty(value).context("serializing anomaly JSON")?;
        text.push('\n');
        let path = self.tmp.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.files.push(name.to_owned());
        Ok(())
    }

    /// `L{i}_attn_activations.png` / `L{i}_ffn_activations.png`: histogram of one block's
    /// attention or feed-forward output on the triggering batch.
    pub fn activations(&mut self, layer: usize, which: &str, values: &[f32]) -> Result<()> {
        let name = format!("L{layer}_{which}_activations.png");
        let title = format!(
            "Layer {layer} {} output",
            if which == "attn" {
                "attention"
            } else {
                "feed-forward"
            }
        );
        let st = plots::histogram(&self.tmp.join(&name), &title, values)?;
        self.activation_stats
            .insert(format!("L{layer}_{which}"), st);
        self.files.push(name);
        Ok(())
    }

    /// `L{i}_qkv_quant_dist.png` (the chart of the run-folder contract) and `L{i}_quant_dist.png`
    /// (all four projections): bars of the -1/0/+1 fractions.
    pub fn ternary(&mut self, layers: &[LayerTernary]) -> Result<()> {
        for l in layers {
            let i = l.layer;
            let groups: Vec<String> = PROJECTIONS.iter().map(|p| p.to_string()).collect();
            let values: Vec<Vec<f64>> = l
                .projections
                .iter()
                .map(|c| c.fractions().to_vec())
                .collect();
            let name = format!("L{i}_quant_dist.png");
            plots::grouped_bars(
                &self.tmp.join(&name),
                &format!("Layer {i} ternary weights"),
                &groups,
                &["-1", "0", "+1"],
                &values,
            )?;
            self.files.push(name);
            let name = format!("L{i}_qkv_quant_dist.png");
            plots::grouped_bars(
                &self.tmp.join(&name),
                &format!("Layer {i} QKV weight quantization"),
                &groups[..1],
                &["-1", "0", "+1"],
                &values[..1],
            )?;
            self.files.push(name);
        }
        self.json("ternary_stats.json", &layers)
    }

    /// A line for `index.json` saying how the contents were obtained.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn top20(&mut self, t: &PromptTop20) -> Result<()> {
        self.json(&top20_file_name(&t.prompt), t)
    }

    /// `grad_norms.json`: parameter name -> L2 norm of its gradient (pre-clip).
    pub fn grad_norms(&mut self, norms: &BTreeMap<String, f64>) -> Result<()> {
        // JSON has no NaN: non-finite norms are written as strings so they stay visible.
        let v: BTreeMap<&String, serde_json::Value> = norms
            .iter()
            .map(|(k, &n)| {
                (
                    k,
                    if n.is_finite() {
                        n.into()
                    } else {
                        n.to_string().into()
                    },
                )
            })
            .collect();
        self.json("grad_norms.json", &v)
    }

    /// `batch_indices.json`: the train-split sequence indices of the triggering batch, its
    /// `batch_sha256` (as in scalars.jsonl and `trainer data-order`), and when the dataset's
    /// documents index could be read, the ids of its documents (`document_ids`, each once, in
    /// batch order) and each sequence's documents as `trainer batch --json` lists them
    /// (`sequences`); both `null` otherwise (a note says why).
    pub fn batch_indices(
        &mut self,
        step: u64,
        indices: &[u64],
        sha256: &str,
        documents: Option<&[SequenceDocuments]>,
    ) -> Result<()> {
        let ids = documents.map(|seqs| {
            let mut seen = std::collections::HashSet::new();
            seqs.iter()
                .flat_map(|s| &s.documents)
                .filter(|d| seen.insert(d.id.as_str()))
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
        });
        self.json(
            "batch_indices.json",
            &serde_json::json!({
                "step": step,
                "sequence_indices": indices,
                "batch_sha256": sha256,
                "document_ids": ids,
                "sequences": documents,
            }),
        )
    }

    /// Writes `activation_stats.json` and the file index, then renames the folder into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if !self.activation_stats.is_empty() {
            let st = std::mem::take(&mut self.activation_stats);
            self.json("activation_stats.json", &st)?;
        }
        let files = std::mem::take(&mut self.files);
        let notes = std::mem::take(&mut self.notes);
        self.json(
            "index.json",
            &serde_json::json!({ "files": files, "notes": notes }),
        )?;
        if self.dest.exists() {
            std::fs::remove_dir_all(&self.dest)
                .with_context(|| format!("replacing {}", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("renaming {} into place", self.tmp.display()))?;
        Ok(self.dest)
    }
}

/// The dumps already in `anomalies_dir`: (step, kind).
pub fn list_dumps(anomalies_dir: &Path) -> Vec<(u64, AnomalyKind)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(anomalies_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("step_") else {
            continue;
        };
        let Some((digits, event)) = rest.split_once('_') else {
            continue;
        };
        if let (Ok(step), Some(kind)) = (
            digits.parse(),
            AnomalyKind::ALL.into_iter().find(|k| k.name() == event),
        ) {
            out.push((step, kind));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instrument::ternary::TernaryCounts;

    fn cfg() -> AnomalyConfig {
        AnomalyConfig {
            spike_window: 4,
            ..AnomalyConfig::default()
        }
    }

    #[test]
    fn loss_spike_needs_a_full_window() {
        let mut d = AnomalyDetector::new(cfg());
        // 9.0 at step 2 is > 2x the mean of one value, but the window is not full yet.
        for (s, l) in [(0, 4.0), (1, 4.0), (2, 9.0), (3, 4.0)] {
            assert_eq!(d.observe_step(s, l, 1.0), None);
        }
        // Window [4, 4, 9, 4], mean 5.25: 10.4 is below 2 x 5.25 = 10.5.
        assert_eq!(d.observe_step(4, 10.4, 1.0), None);
        // Window [4, 9, 4, 10.4], mean 6.85: 13.8 is above 13.7.
        let e = d.observe_step(5, 13.8, 1.0).unwrap();
        assert_eq!(e.event, AnomalyKind::LossSpike);
        assert!((e.threshold.unwrap() - 13.7).abs() < 1e-9);
    }

    #[test]
    fn nan_inf_is_detected_and_kept_out_of_the_average() {
        let mut d = AnomalyDetector::new(cfg());
        for s in 0..4 {
            d.observe_step(s, 3.0, 1.0);
        }
        assert_eq!(
            d.observe_step(4, f64::NAN, 1.0).unwrap().event,
            AnomalyKind::NanInfLoss
        );
        assert_eq!(
            d.observe_step(5, 3.0, f64::INFINITY).unwrap().event,
            AnomalyKind::NanInfGradNorm
        );
        assert_eq!(d.observe_step(6, 5.9, 1.0), None);
        // Window [3, 3, 3, 5.9] (the NaN never joined it): 8.0 > 2 x 3.725.
        assert!(d.observe_step(7, 8.0, 1.0).is_some());
    }

    #[test]
    fn round_triggers_start_after_warmup_unless_configured_otherwise() {
        let mut c = AnomalyConfig::default();
        assert!(c.sample_triggers_after_warmup);
        assert_eq!(c.round_checks_from(375), 375);
        c.sample_triggers_after_warmup = false;
        assert_eq!(c.round_checks_from(375), 0);
        let parsed: AnomalyConfig = toml::from_str("sample_triggers_after_warmup = false").unwrap();
        assert_eq!(parsed, c);
    }

    #[test]
    fn round_triggers() {
        let d = AnomalyDetector::new(cfg());
        let ok = RoundStats {
            mean_entropies: vec![2.0, 0.5, 3.0],
            greedy_max_repetition: vec![20, 3],
        };
        assert!(d.observe_round(1, &ok).is_empty());
        let bad = RoundStats {
            mean_entropies: vec![0.9, 0.8],
            greedy_max_repetition: vec![21],
        };
        let kinds: Vec<_> = d
            .observe_round(1, &bad)
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(
            kinds,
            vec![AnomalyKind::EntropyCollapse, AnomalyKind::RepetitionSurge]
        );
        // Without the repetition check the entropy check still fires.
        let off = AnomalyDetector::new(AnomalyConfig {
            repetition_surge_check: false,
            ..cfg()
        });
        let kinds: Vec<_> = off
            .observe_round(1, &bad)
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(kinds, vec![AnomalyKind::EntropyCollapse]);
    }

    #[test]
    fn rate_limit_and_nonfinite_guard() {
        let mut r = RateLimiter::new(&AnomalyConfig {
            max_dumps: 3,
            min_steps_between_dumps: 10,
            ..AnomalyConfig::default()
        });
        assert!(r.allow(0, AnomalyKind::LossSpike));
        assert!(!r.allow(5, AnomalyKind::LossSpike));
        assert!(r.allow(5, AnomalyKind::NanInfLoss));
        assert!(r.allow(10, AnomalyKind::LossSpike));
        assert!(!r.allow(100, AnomalyKind::EntropyCollapse));
        assert_eq!(r.suppressed(), 2);

        let mut g = NonFiniteGuard::new(3);
        assert_eq!(g.check(1.0, 1.0), NonFiniteVerdict::Apply);
        assert_eq!(
            g.check(f64::NAN, 1.0),
            NonFiniteVerdict::Skip { consecutive: 1 }
        );
        assert_eq!(g.check(1.0, 1.0), NonFiniteVerdict::Apply);
        assert_eq!(
            g.check(f64::INFINITY, 1.0),
            NonFiniteVerdict::Skip { consecutive: 1 }
        );
        assert_eq!(
            g.check(1.0, f64::NAN),
            NonFiniteVerdict::Skip { consecutive: 2 }
        );
        assert_eq!(
            g.check(f64::NAN, f64::NAN),
            NonFiniteVerdict::Stop { consecutive: 3 }
        );
        assert_eq!(g.total_skipped(), 4);
        assert!(nonfinite_stop_message(9, 3, 6).contains("step 6"));
    }

    #[test]
    fn dump_folder_contents() {
        let dir = tempfile::tempdir().unwrap();
        let ev = AnomalyEvent {
            step: 42,
            event: AnomalyKind::LossSpike,
            value: Some(9.0),
            threshold: Some(6.0),
            detail: "x".into(),
        };
        let mut w = DumpWriter::begin(dir.path(), &ev).unwrap();
        let acts: Vec<f32> = (0..500).map(|i| (i as f32 * 0.37).sin()).collect();
        w.activations(0, "attn", &acts).unwrap();
        w.activations(0, "ffn", &acts).unwrap();
        let c = TernaryCounts {
            neg1: 3,
            zero: 4,
            pos1: 3,
            gammas: vec![0.1],
        };
        w.ternary(&[LayerTernary {
            layer: 0,
            projections: vec![c.clone(), c.clone(), c.clone(), c],
        }])
        .unwrap();
        w.top20(&PromptTop20 {
            prompt: "The quick brown fox".into(),
            tokens: vec!["a".into()],
            token_ids: vec![7],
            probs: vec![1.0],
            entropy: 0.0,
        })
        .unwrap();
        w.grad_norms(&BTreeMap::from([
            ("a".to_string(), 1.5),
            ("b".to_string(), f64::NAN),
        ]))
        .unwrap();
        w.batch_indices(42, &[5, 9], &"cd".repeat(32), None)
            .unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.file_name().unwrap(), "step_000042_loss_spike");
        for f in [
            "event.json",
            "L0_attn_activations.png",
            "L0_ffn_activations.png",
            "L0_qkv_quant_dist.png",
            "L0_quant_dist.png",
            "prompt_The_quick_brown_fox_top20.json",
            "grad_norms.json",
            "batch_indices.json",
            "activation_stats.json",
            "index.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("grad_norms.json")).unwrap())
                .unwrap();
        assert_eq!(g["b"], "NaN");
        assert_eq!(list_dumps(dir.path()), vec![(42, AnomalyKind::LossSpike)]);
        assert!(!dir.path().join("step_000042_loss_spike.tmp").exists());
    }
}
