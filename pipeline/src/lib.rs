//! `pipeline`: FineWeb-Edu parquet -> exact LLaMA-2 token ids -> fingerprinted uint16 shards.
//!
//! [`format`] (the on-disk shard layout and `manifest.json`) is always compiled: it is the one
//! definition shared by the writer here and the reader in the trainer, and needs no parquet,
//! tokenizer or HTTP code. Everything that produces shards sits behind the default `prepare`
//! feature.

pub mod format;

#[cfg(feature = "prepare")]
pub mod fetch;
#[cfg(feature = "prepare")]
pub mod shuffle;
#[cfg(feature = "prepare")]
pub mod source;
#[cfg(feature = "prepare")]
pub mod tokenize;
