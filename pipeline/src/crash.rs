//! A test hook that makes `prepare` crash at a chosen point, standing in for `kill -9`.
//!
//! With `PIPELINE_TEST_ABORT_AFTER=N` in the environment, the N-th call to [`point`] aborts the
//! process (`std::process::abort`: no destructors, no flushing, like a kill). The resume test runs
//! `prepare` with N = 1, 2, ... until a run completes, and checks that each crashed folder, once
//! re-run, ends byte-identical to an uninterrupted run. Without the variable [`point`] does nothing.
//!
//! The points (N counts all of them):
//! - per source file tokenized, on the writer thread: `work batch written` after each record
//!   batch (the work file is still a `.tmp`; a file of up to 512 rows has one batch), then
//!   `work file finished`;
//! - per shard, in assembly, which starts on a file once its work file is finished and so runs
//!   beside the tokenizing of the next files: `shard started` (its `.tmp` holds the first window
//!   written into it), `shard finished` (renamed, or an identical shard kept);
//! - at the end: `documents index written`, `stats written`, `tokenizer copied`,
//!   `manifest written`.
//!
//! The two threads' points interleave differently from run to run; the first file's are always
//! first, so with one-batch source files N = 2 crashes right after the first file's work file is
//! safe.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
static COUNT: AtomicU64 = AtomicU64::new(0);

/// Marks a point where a crash must be survivable; `what` is logged when the hook fires.
pub fn point(what: &str) {
    let limit = LIMIT.get_or_init(|| {
        std::env::var("PIPELINE_TEST_ABORT_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(limit) = *limit {
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        if n == limit {
            eprintln!("PIPELINE_TEST_ABORT_AFTER={limit}: aborting at `{what}`");
            std::process::abort();
        }
    }
}
