//! The dataset format: fixed-length uint16 shard files and the `manifest.json` that lists them.
//! `shards/README.md` documents the same layout byte by byte for readers in other languages.

pub mod manifest;
pub mod shard;

pub use manifest::{Manifest, ShardEntry, SplitInfo};
pub use shard::{FormatError, ShardHeader, ShardReader, Split};

/// Version of the shard header and manifest layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside a dataset folder. Its presence marks the dataset complete.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Copy of the tokenizer inside a dataset folder, so the folder is self-contained.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
