//! Instrumentation of a training run: the run folder's metadata, per-step scalars, ternary
//! statistics, the frozen eval, text samples, anomaly dumps, the checkpoint schedule and
//! retention, and the report. The folder names, file names and JSON keys (the run-folder contract,
//! README) are a contract with the user's analysis tools: fields may be added, never renamed.
//!
//! ```text
//! runs/<run_id>/
//!   meta/{config.json, provenance.json, dataset_fingerprint.json}
//!   checkpoints/step_NNNNNN/
//!   metrics/scalars.jsonl      every step; ternary keys every quant_stats_every
//!   eval/eval_results.jsonl    every eval_every
//!   samples/samples.jsonl      every sample_every: 5 prompts x 3 modes
//!   anomalies/step_NNNNNN_<event>/
//!   report/                    `trainer report runs/<run_id>`
//! ```

pub mod anomaly;
pub mod commands;
pub mod config;
pub mod eval;
pub mod generator;
pub mod metrics;
pub mod plots;
pub mod probes;
pub mod provenance;
pub mod report;
pub mod retention;
pub mod run_log;
pub mod sample;
pub mod ternary;

pub use config::InstrumentationConfig;
pub use run_log::RunLog;
