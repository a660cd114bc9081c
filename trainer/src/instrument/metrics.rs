//! Per-step scalars -> `metrics/scalars.jsonl`, one JSON object per line, each line
//! written with one `write` and flushed, so a crash loses at most the line being written. Also the
//! train-loss moving average, model FLOPs utilisation and the dense console line.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An append-only JSON-lines file. Every record is serialized to one buffer ending in `\n`,
/// written with a single `write_all` and flushed; nothing is buffered between records.
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Opens `path` for appending (created with its parent folder if missing). On resume the
    /// file is truncated to its last complete line first, so a torn line never stays.
    pub fn append(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if let Ok(text) = std::fs::read(path) {
            let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if end < text.len() {
                OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .set_len(end as u64)?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonlWriter {
            path: path.to_owned(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()
    }

    /// Drops every record whose `step` is above `step` (a resumed run re-logs those steps).
    pub fn truncate_after_step(path: &Path, step: u64) -> std::io::Result<()> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(());
        };
        let mut keep = String::with_capacity(text.len());
        for line in text.lines() {
            let s = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
            match s {
                Some(s) if s <= step => {
                    keep.push_str(line);
                    keep.push('\n');
                }
                _ => {}
            }
        }
        if keep.len() != text.len() {
            pipeline::format::shard::write_atomic(path, keep.as_bytes())?;
        }
        Ok(())
    }
}

/// Reads every complete record of a JSON-lines file (a torn last line is skipped).
pub fn read_jsonl(path: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// One line of `metrics/scalars.jsonl`: the keys of the run-folder contract, then ours, then (every
/// `quant_stats_every` steps) the per-layer ternary keys in `extra`. A NaN/Inf loss or norm is
/// written as `null` (JSON has no NaN) with `anomaly_flag` set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepScalars {
    pub step: u64,
    pub tokens_seen: u64,
    pub loss: f64,
    pub lr: f64,
    pub wd: f64,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    pub step_time_ms: f64,
    pub tokens_per_sec: f64,
    /// `null` on CPU. On CUDA both are the device memory the driver reports for this process
    /// (`nvidia-smi`, sampled every 100 steps): candle has no caching allocator whose allocated
    /// and reserved bytes could be told apart.
    pub gpu_mem_allocated_gb: Option<f64>,
    pub gpu_mem_reserved_gb: Option<f64>,
    /// Time the step waited for its batch from the prefetch thread.
    pub data_wait_ms: f64,
    /// Model FLOPs utilisation in [0, 1]; `null` without a configured peak.
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly_flag: Option<String>,
    /// Whether the optimizer update was applied (false on a skipped NaN/Inf step).
    pub update_applied: bool,
    /// sha256 of the step's batch (its tokens as little-endian u16, as in the shards): what
    /// `trainer data-order --steps N` prints for the same step.
    pub batch_sha256: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Mean of the last `window` finite values (the `train_loss` of eval lines: 100 steps).
#[derive(Debug, Clone)]
pub struct MovingAverage {
    window: usize,
    values: std::collections::VecDeque<f64>,
    sum: f64,
}

impl MovingAverage {
    pub fn new(window: usize) -> Self {
        MovingAverage {
            window: window.max(1),
            values: Default::default(),
            sum: 0.0,
        }
    }

    /// Adds a value; non-finite values are ignored (they would poison the mean forever).
    pub fn push(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.values.push_back(v);
        self.sum += v;
        if self.values.len() > self.window {
            self.sum -= self.values.pop_front().expect("non-empty");
        }
    }

    pub fn mean(&self) -> Option<f64> {
        // Re-sum instead of trusting the running sum: 60k additions drift in the last bits.
        (!self.values.is_empty())
            .then(|| self.values.iter().sum::<f64>() / self.values.len() as f64)
    }

    pub fn is_full(&self) -> bool {
        self.values.len() == self.window
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.values.iter().copied()
    }
}

/// Training FLOPs per token: 6 N for the matmuls of forward + backward over the non-embedding
/// parameters plus the LM head, and 6 * 2 * L * seq * hidden for the attention scores and
/// values (PaLM, Chowdhery et al. 2022, appendix B). The tied embedding lookup is free, its use
/// as the LM head is not, so `N` is all parameters here.
pub fn flops_per_token(params: u64, num_layers: u64, seq_len: u64, hidden: u64) -> f64 {
    6.0 * params as f64 + 12.0 * (num_layers * seq_len * hidden) as f64
}

/// MFU = achieved model FLOP/s over the peak; `None` without a peak.
pub fn mfu(flops_per_token: f64, tokens_per_sec: f64, peak_flops: Option<f64>) -> Option<f64> {
    peak_flops
        .filter(|p| *p > 0.0)
        .map(|p| flops_per_token * tokens_per_sec / p)
}

/// `3h12m`, `4m05s`, `12s`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `141k`, `2.3M`, `950`.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The dense console line (llm.c style):
/// `step 1200/60000 | loss 3.452 | norm 0.81 | lr 1.42e-03 | wd 0.10 | 231 ms | 141k tok/s | mfu 31.2% | eta 3h12m`.
/// `ms` and `tok/s` are means over the log interval; ETA extrapolates that mean to `stop_step`
/// (where this invocation stops: `--steps` or `total_steps`).
pub fn console_line(
    s: &StepScalars,
    total_steps: u64,
    stop_step: u64,
    mean_step_ms: f64,
) -> String {
    let remaining = stop_step.saturating_sub(s.step) as f64 * mean_step_ms / 1000.0;
    let tok_s = if mean_step_ms > 0.0 {
        s.tokens_per_sec * s.step_time_ms / mean_step_ms
    } else {
        s.tokens_per_sec
    };
    let mut line = format!(
        "step {}/{} | loss {:.3} | norm {:.2} | lr {:.2e} | wd {:.2} | {:.0} ms | {} tok/s",
        s.step,
        total_steps,
        s.loss,
        s.grad_norm,
        s.lr,
        s.wd,
        mean_step_ms,
        si(tok_s)
    );
    if let Some(m) = s.mfu {
        line.push_str(&format!(" | mfu {:.1}%", m * 100.0));
    }
    line.push_str(&format!(" | eta {}", format_duration(remaining)));
    if let Some(flag) = &s.anomaly_flag {
        line.push_str(&format!(" | ANOMALY {flag}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(step: u64) -> StepScalars {
        StepScalars {
            step,
            tokens_seen: step * 32 * 1024,
            loss: 3.4521,
            lr: 1.42e-3,
            wd: 0.1,
            grad_norm: 0.8123,
            step_time_ms: 231.0,
            tokens_per_sec: 32768.0 / 0.231,
            gpu_mem_allocated_gb: None,
            gpu_mem_reserved_gb: None,
            data_wait_ms: 0.1,
            mfu: Some(0.3123),
            anomaly_flag: None,
            update_applied: true,
            batch_sha256: "ab".repeat(32),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn jsonl_lines_are_complete_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics/scalars.jsonl");
        let mut w = JsonlWriter::append(&path).unwrap();
        let mut s = scalars(1);
        s.extra.insert("L0_attn_qkv_zero_pct".into(), 0.31.into());
        w.write(&s).unwrap();
        // Visible to another reader before the writer is dropped.
        let rows = read_jsonl(&path).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["L0_attn_qkv_zero_pct"], 0.31);
        assert!(rows[0]["gpu_mem_allocated_gb"].is_null());
        let back: StepScalars = serde_json::from_value(rows[0].clone()).unwrap();
        assert_eq!(back, s);
        // A NaN loss becomes null, not invalid JSON.
        let mut nan = scalars(2);
        nan.loss = f64::NAN;
        nan.anomaly_flag = Some("nan_inf_loss".into());
        w.write(&nan).unwrap();
        drop(w);
        // A torn line (crash mid-write) is cut when the file is reopened.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\": 3, \"lo")
            .unwrap();
        let mut w = JsonlWriter::append(&path).unwrap();
        w.write(&scalars(3)).unwrap();
        let rows = read_jsonl(&path).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows[1]["loss"].is_null());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        JsonlWriter::truncate_after_step(&path, 1).unwrap();
        assert_eq!(read_jsonl(&path).unwrap().len(), 1);
    }

    #[test]
    fn moving_average_window() {
        let mut ma = MovingAverage::new(3);
        assert_eq!(ma.mean(), None);
        for v in [1.0, 2.0, f64::NAN, 3.0] {
            ma.push(v);
        }
        assert!(ma.is_full());
        assert_eq!(ma.mean(), Some(2.0));
        ma.push(7.0);
        assert_eq!(ma.mean(), Some(4.0));
    }

    #[test]
    fn mfu_and_console_line() {
        // The 95M model of bitnet-95m.toml at 141k tok/s on a 989 TFLOP/s part.
        let f = flops_per_token(95_367_936, 8, 1024, 768);
        assert!((f - (6.0 * 95_367_936.0 + 12.0 * 8.0 * 1024.0 * 768.0)).abs() < 1.0);
        let m = mfu(f, 141_000.0, Some(989e12)).unwrap();
        assert!(m > 0.08 && m < 0.1, "{m}");
        assert_eq!(mfu(f, 1.0, None), None);
        let line = console_line(&scalars(1200), 60_000, 60_000, 231.0);
        assert_eq!(
            line,
            "step 1200/60000 | loss 3.452 | norm 0.81 | lr 1.42e-3 | wd 0.10 | 231 ms | 142k tok/s | mfu 31.2% | eta 3h46m"
        );
        assert_eq!(format_duration(65.0), "1m05s");
        assert_eq!(format_duration(9.4), "9s");
    }
}
