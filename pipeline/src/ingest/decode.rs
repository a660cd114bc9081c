//! The decoding threads: parquet row groups -> record batches, next to the tokenizing. The
//! driver queues the row groups in order; each row group's batches come back on a channel of
//! its own, which the driver reads in order.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender};

use anyhow::Result;

use crate::documents::{Batch, ParquetFile};

/// One decoding thread per this many tokenizer threads: a thread decodes parquet at about
/// 700 MB/s of text (snappy, Arrow string views, UTF-8 checks), a tokenizer thread encodes about
/// 50 MB/s (BENCHMARKS.md, "Tokenizer speed"), so one per 8 leaves room on slower cores.
pub(super) const THREADS_PER_DECODER: usize = 8;

/// Messages (record batches and the end) a row group may have decoded before the driver takes
/// them: a decoder that is not working on the row group the driver reads runs this far ahead.
/// Row groups of up to 3 x [`BATCH_ROWS`] rows fit whole; larger ones overlap only this far.
pub(super) const MAX_DECODED_BATCHES: usize = 4;

/// A row group for a decoding thread; its record batches go down `tx`, which holds at most
/// [`MAX_DECODED_BATCHES`] of them.
pub(super) struct DecodeJob {
    pub(super) file: ParquetFile,
    pub(super) group: usize,
    pub(super) tx: SyncSender<Decoded>,
}

/// A record batch of a row group; `None` after its last one, so a row group whose decoder died
/// is never taken for complete.
pub(super) type Decoded = Result<Option<Batch>>;

/// A decoding thread: decodes the row groups it is given, until the driver is gone.
pub(super) fn decode_row_groups(jobs: &Mutex<Receiver<DecodeJob>>) {
    loop {
        let job = jobs.lock().expect("decode job lock").recv();
        let Ok(DecodeJob { file, group, tx }) = job else {
            return;
        };
        let mut docs = match file.row_group(group) {
            Ok(docs) => docs,
            Err(e) => {
                let _ = tx.send(Err(e));
                continue;
            }
        };
        loop {
            let batch = docs.next_batch();
            let last = !matches!(batch, Ok(Some(_)));
            // A closed channel: the driver stopped reading this row group.
            if tx.send(batch).is_err() || last {
                break;
            }
        }
    }
}
