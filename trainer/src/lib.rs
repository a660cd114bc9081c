//! `trainer`: the BitNet b1.58 model in candle, trained on memory-mapped token shards.
//!
//! - [`config`]: the run configuration (one serde tree, validated once).
//! - [`model`]: the network, its parameters and their count.
//! - [`schedule`], [`optim`]: learning-rate/weight-decay schedules and AdamW with clipping.
//! - [`data`]: the seeded, repetition-free data order over memory-mapped shards and the prefetcher.
//! - [`checkpoint`], [`run_dir`]: what a run writes to disk and how resume finds it.
//! - [`train`]: the training loop, top to bottom; [`bench`]: speed measurements.
//! - [`cli`]: the `trainer` command line.

pub mod config;
pub mod model;
pub mod schedule;
pub mod instrument;
