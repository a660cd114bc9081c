//! The dataset format: fixed-length uint16 shard files and the `manifest.json` that lists them,
//! and the name of every file in a dataset folder. `shards/README.md` documents the same layout
//! byte by byte for readers in other languages.
//!
//! A dataset folder (`pipeline prepare --out`):
//!
//! ```text
//! train-00000.bin ...       shards (Split::shard_file_name), each sealed by shard::seal
//! eval-00000.bin ...
//! documents.jsonl.zst       DOCUMENTS_FILE: where each document went
//! documents.idx             DOCUMENTS_SIDECAR_FILE: its lookup index, built on first use
//! stats.json                STATS_FILE: the run's counts and timings
//! tokenizer.json            TOKENIZER_FILE: the tokenizer copy
//! manifest.json.sha256      MANIFEST_SHA_FILE
//! manifest.json             MANIFEST_FILE: written last; its presence marks the dataset complete
//! .work/00003-x.tok         WORK_DIR, work_file_name: an unfinished run's tokenized files
//! *.tmp                     tmp_path: a file being written, renamed into place when complete
//! .lock                     crate::lock::LOCK_FILE: held by the `prepare` writing the folder
//! ```

pub mod documents;
pub mod manifest;
pub mod shard;

use std::path::{Path, PathBuf};

pub use documents::{DocumentInSequence, DocumentIndex, DocumentLine, DocumentsError};
pub use manifest::{Manifest, ShardEntry, SplitInfo};
pub use shard::{FormatError, ShardHeader, ShardReader, Split};

/// Version of the shard header and manifest layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside a dataset folder. Its presence marks the dataset complete.
pub const MANIFEST_FILE: &str = "manifest.json";
/// sha256 of `manifest.json`, written just before it (`sha256sum -c` format), so `verify`
/// detects any edit of the manifest.
pub const MANIFEST_SHA_FILE: &str = "manifest.json.sha256";
/// Copy of the tokenizer inside a dataset folder, so the folder is self-contained.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The documents index: one JSON line per document, saying where its tokens went.
pub const DOCUMENTS_FILE: &str = "documents.jsonl.zst";
/// The lookup index of [`DOCUMENTS_FILE`] (by split and position), built from it on first use
/// and rebuilt when it changes; a cache, never part of the fingerprints.
pub const DOCUMENTS_SIDECAR_FILE: &str = "documents.idx";
/// The statistics of the run that made the folder.
pub const STATS_FILE: &str = "stats.json";
/// Folder holding the work files of an unfinished run; removed once the dataset is complete.
pub const WORK_DIR: &str = ".work";

/// `00003-000_00000.tok`: the work file of the source file at position `k` of the processing
/// order, named by its position and the source file's stem.
pub fn work_file_name(k: usize, source_path: &str) -> String {
    let stem = source_path.rsplit('/').next().unwrap_or(source_path);
    let stem = stem.strip_suffix(".parquet").unwrap_or(stem);
    format!("{k:05}-{stem}.tok")
}

/// `<path>.tmp`: where a file is written before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Whether `name` is a temporary file (see [`tmp_path`]).
pub fn is_tmp_file(name: &str) -> bool {
    name.ends_with(".tmp")
}
