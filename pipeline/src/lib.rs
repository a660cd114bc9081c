//! `pipeline`: FineWeb-Edu parquet -> exact LLaMA-2 token ids -> fingerprinted uint16 shards.
//!
//! [`format`](mod@format) (the on-disk shard layout and `manifest.json`) is always compiled: it
//! is the one definition shared by the writer here and the reader in the trainer, and needs no
//! parquet, tokenizer or HTTP code; so is [`rng`], the generator of both crates. Everything that
//! produces shards sits behind the default `prepare` feature. [`lock`] (one writer per folder)
//! and [`disk`] (free space) serve both crates' writing commands.

pub mod disk;
pub mod format;
pub mod lock;
pub mod rng;

#[cfg(feature = "prepare")]
pub mod assemble;
#[cfg(feature = "prepare")]
pub mod budget;
#[cfg(feature = "prepare")]
pub mod cli;
#[cfg(feature = "prepare")]
pub mod crash;
#[cfg(feature = "prepare")]
pub mod documents;
#[cfg(feature = "prepare")]
pub mod fetch;
#[cfg(feature = "prepare")]
pub mod frame;
#[cfg(feature = "prepare")]
pub mod ingest;
#[cfg(feature = "prepare")]
pub mod inspect;
#[cfg(feature = "prepare")]
pub mod outdir;
#[cfg(feature = "prepare")]
pub mod prepare;
#[cfg(feature = "prepare")]
pub mod progress;
#[cfg(feature = "prepare")]
pub mod shuffle;
#[cfg(feature = "prepare")]
pub mod source;
#[cfg(feature = "prepare")]
pub mod split;
#[cfg(feature = "prepare")]
pub mod stats;
#[cfg(feature = "prepare")]
pub mod tokenize;
#[cfg(feature = "prepare")]
pub mod verify;
#[cfg(feature = "prepare")]
pub mod work;
