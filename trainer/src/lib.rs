//! `trainer`: the BitNet b1.58 model in candle, trained on memory-mapped token shards.
//!
//! - [`config`]: the run configuration (one serde tree, validated once).
//! - [`model`]: the network, its parameters and their count; [`cpu`]: the fused CPU passes of its
//!   hand-written training pass.
//! - [`schedule`], [`optim`]: learning-rate/weight-decay schedules and AdamW with clipping.
//! - [`data`]: the seeded, repetition-free data order over memory-mapped shards and the prefetcher.
//! - [`documents`]: the documents behind a step's batch (`trainer batch`, anomaly dumps).
//! - [`checkpoint`], [`run_dir`]: what a run writes to disk and how resume finds it.
//! - [`setup`]: everything before the first step; [`train`]: the training loop, top to bottom;
//!   [`bench`](mod@bench): speed measurements.
//! - [`export`]: a checkpoint as a Hugging Face transformers folder, and our logits to check it.
//! - [`cli`]: the `trainer` command line.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device_check;
pub mod documents;
pub mod export;
pub mod instrument;
pub mod model;
pub mod optim;
pub mod run_dir;
pub mod schedule;
pub mod setup;
pub mod synthetic;
pub mod train;
