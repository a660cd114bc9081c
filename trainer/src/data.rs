//! Training data: the shard manifest checks, memory-mapped train sequences, the seeded
//! repetition-free order in which steps read them, the prefetch thread, and the background
//! re-hash of every payload against the manifest ([`PayloadCheck`]).
//!
//! Order: batch `s` holds positions `s*B .. s*B+B-1` of a keyed pseudo-random permutation of all
//! train sequence indices `0..N`. The permutation is a 6-round Feistel network on the smallest
//! even-width power of two >= N, restricted to `0..N` by cycle walking (Black & Rogaway 2002,
//! "Ciphers with arbitrary finite domains"), keyed by the config seed. It is a bijection, so
//! different positions never map to the same sequence, and it is a pure function of (seed, N,
//! position): no table of N entries is stored and any step's batch can be computed directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pipeline::format::{FormatError, Manifest, ShardReader, Split};
use pipeline::rng::mix64;

use crate::config::Config;

/// Errors about the shards the trainer is given; each says what differs.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(
        "{manifest}: {field} is {found} in the shards but {expected} in the config ({config_field}); hint: {hint}"
    )]
    Mismatch {
        manifest: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
        config_field: &'static str,
        hint: &'static str,
    },
    #[error(
        "{manifest}: the run needs {needed} train sequences (steps {start}..{stop} x batch {batch}) but the shards hold {available}; hint: run `pipeline prepare --tokens {tokens}` or more, or stop earlier with --steps"
    )]
    TooFewSequences {
        manifest: PathBuf,
        needed: u64,
        available: u64,
        start: u64,
        stop: u64,
        batch: u64,
        tokens: u64,
    },
}

/// Checks that the shards were made for this config (seq_len, vocabulary, tokenizer).
/// The format version is checked by `Manifest::load`; sizes, positions and header checksums by
/// `Manifest::open_split`.
pub fn check_manifest(manifest: &Manifest, dir: &Path, cfg: &Config) -> Result<(), DataError> {
    let mismatch =
        |field, found: String, expected: String, config_field, hint| DataError::Mismatch {
            manifest: Manifest::path(dir),
            field,
            found,
            expected,
            config_field,
            hint,
        };
    if manifest.seq_len as usize != cfg.training.seq_len {
        return Err(mismatch(
            "seq_len",
            manifest.seq_len.to_string(),
            cfg.training.seq_len.to_string(),
            "training.seq_len",
            "re-run `pipeline prepare --seq-len` with the config's value, or use a config for these shards",
        ));
    }
    if manifest.vocab_size as usize != cfg.model.vocab_size {
        return Err(mismatch(
            "vocab_size",
            manifest.vocab_size.to_string(),
            cfg.model.vocab_size.to_string(),
            "model.vocab_size",
            "the shards were tokenized with another vocabulary; use the matching tokenizer or config",
        ));
    }
    if !manifest
        .tokenizer
        .sha256
        .eq_ignore_ascii_case(&cfg.data.tokenizer_sha256)
    {
        return Err(mismatch(
            "tokenizer sha256",
            manifest.tokenizer.sha256.clone(),
            cfg.data.tokenizer_sha256.clone(),
            "data.tokenizer_sha256",
            "the shards were made with another tokenizer.json; re-run `pipeline prepare` with the config's tokenizer",
        ));
    }
    Ok(())
}

/// The keyed bijection `0..n -> 0..n` (Feistel network + cycle walking).
#[derive(Debug, Clone)]
pub struct DataOrder {
    n: u64,
    half_bits: u32,
    keys: [u64; Self::ROUNDS],
}

impl DataOrder {
    const ROUNDS: usize = 6;

    pub fn new(seed: u64, n: u64) -> Self {
        // Smallest even bit width whose power of two covers n, so cycle walking needs < 4 tries
        // on average.
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let mut keys = [0u64; Self::ROUNDS];
        for (r, k) in keys.iter_mut().enumerate() {
            *k = mix64(seed ^ mix64(0x5EED_0F0D_A7A0_0000 + r as u64));
        }
        DataOrder { n, half_bits, keys }
    }

    /// Number of sequences permuted.
    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            (l, r) = (r, l ^ (mix64(r ^ k) & mask));
        }
        (l << self.half_bits) | r
    }

    /// The sequence index at `position` of the permutation (`position < n`).
    pub fn sequence_at(&self, position: u64) -> u64 {
        assert!(
            position < self.n,
            "position {position} outside 0..{}",
            self.n
        );
        let mut x = self.feistel(position);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }

    /// The sequence indices of step `step` (the `step`-th update, counted from 1) with `batch`
    /// sequences per step: positions `(step - 1) * batch .. step * batch` of the permutation.
    pub fn batch(&self, step: u64, batch: usize) -> Vec<u64> {
        assert!(step >= 1, "steps count updates from 1; step 0 has no batch");
        let start = (step - 1) * batch as u64;
        (start..start + batch as u64)
            .map(|p| self.sequence_at(p))
            .collect()
    }
}

/// One split of a dataset, memory-mapped: random access to any sequence by its index in the
/// split (the train split for the batches, the eval split for the frozen eval).
#[derive(Debug)]
pub struct SplitData {
    readers: Vec<ShardReader>,
    /// Index of the first sequence of each shard, ascending.
    firsts: Vec<u64>,
    num_sequences: u64,
    seq_len: usize,
}

impl SplitData {
    /// Opens the shards of `split` listed in the manifest, checking each header against it.
    pub fn open(manifest: &Manifest, dir: &Path, split: Split) -> Result<Self, DataError> {
        let readers = manifest.open_split(dir, split)?;
        let firsts = readers.iter().map(|r| r.header().first_sequence).collect();
        let info = match split {
            Split::Train => &manifest.train,
            Split::Eval => &manifest.eval,
        };
        Ok(SplitData {
            readers,
            firsts,
            num_sequences: info.sequences,
            seq_len: manifest.seq_len as usize,
        })
    }

    pub fn num_sequences(&self) -> u64 {
        self.num_sequences
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Copies sequence `index` of the split into `out` (`seq_len` tokens).
    pub fn copy_sequence(&self, index: u64, out: &mut [u32]) {
        let shard = self.firsts.partition_point(|&f| f <= index) - 1;
        let local = (index - self.firsts[shard]) as usize;
        self.readers[shard].copy_sequence(local, out);
    }

    /// The tokens of the given sequences, concatenated: `[indices.len() * seq_len]`.
    pub fn load(&self, indices: &[u64]) -> Vec<u32> {
        let mut tokens = vec![0u32; indices.len() * self.seq_len];
        for (chunk, &i) in tokens.chunks_exact_mut(self.seq_len).zip(indices) {
            self.copy_sequence(i, chunk);
        }
        tokens
    }
}

/// Refuses a run whose steps `start + 1 ..= stop` need more sequences than the shards hold.
pub fn check_budget(
    order: &DataOrder,
    manifest_path: &Path,
    cfg: &Config,
    start: u64,
    stop: u64,
) -> Result<(), DataError> {
    let batch = cfg.training.batch_size as u64;
    let needed = stop * batch;
    if needed > order.len() {
        return Err(DataError::TooFewSequences {
            manifest: manifest_path.to_owned(),
            needed,
            available: order.len(),
            start,
            stop,
            batch,
            tokens: needed * cfg.training.seq_len as u64,
        });
    }
    Ok(())
}

/// sha256 (hex) of a batch's tokens written as little-endian u16, as stored in the shards (the
/// hash of the manifest's token fingerprint).
pub fn batch_hash(tokens: &[u32]) -> String {
    let ids: Vec<u16> = tokens.iter().map(|&t| t as u16).collect();
    pipeline::format::manifest::token_ids_sha256(&ids)
}

/// Lowers the calling thread to the lowest CPU priority (niceness 19: on Linux niceness is per
/// thread) and the idle I/O class, so the data check runs on what the training threads leave
/// idle and yields whenever they are busy. Best effort: a refusal is logged and the check runs
/// at normal priority. (The idle I/O class only matters under an I/O scheduler that honours it,
/// such as BFQ.)
fn yield_to_training() {
    #[cfg(target_os = "linux")]
    {
        // ioprio_set(2): IOPRIO_WHO_PROCESS with a thread id names that thread; the idle class
        // takes no level.
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        const IOPRIO_CLASS_SHIFT: u32 = 13;
        // SAFETY: gettid takes nothing; setpriority and ioprio_set take integers (this thread's
        // id and a priority) and touch no memory of ours.
        let (nice, io) = unsafe {
            let tid = libc::gettid();
            (
                libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19),
                libc::syscall(
                    libc::SYS_ioprio_set,
                    IOPRIO_WHO_PROCESS,
                    tid as libc::c_long,
                    IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
                ),
            )
        };
        if nice != 0 || io != 0 {
            tracing::debug!(
                "data check: lowering its thread's priority failed ({}); it runs at normal priority",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Re-hashes every train and eval payload against its header's sha256 (checked against the
/// manifest when the shards were opened) on a background thread, so a flipped byte on disk never
/// trains silently yet the first steps do not wait for gigabytes of hashing. The training loop
/// polls it after each step and waits for it before any checkpoint after step 0: a run on
/// damaged shards stops before it writes weights trained on them.
#[derive(Debug)]
pub struct PayloadCheck {
    dir: PathBuf,
    started: Instant,
    handle: Option<JoinHandle<Result<u64, FormatError>>>,
    /// Set once the thread is joined; a later poll or wait returns it again.
    outcome: Option<Result<(), String>>,
}

impl PayloadCheck {
    /// Starts re-hashing the shards of `manifest` in `dir`; `enabled = false` (`--no-verify-data`)
    /// checks nothing.
    pub fn start(manifest: &Manifest, dir: &Path, enabled: bool) -> Self {
        let mut check = PayloadCheck {
            dir: dir.to_owned(),
            started: Instant::now(),
            handle: None,
            outcome: None,
        };
        if !enabled {
            tracing::info!("--no-verify-data: shard payloads are not re-hashed");
            check.outcome = Some(Ok(()));
            return check;
        }
        let (manifest, dir) = (manifest.clone(), dir.to_owned());
        let handle = std::thread::Builder::new()
            .name("verify-data".into())
            .spawn(move || {
                yield_to_training();
                let mut bytes = 0;
                for split in [Split::Train, Split::Eval] {
                    for reader in manifest.open_split(&dir, split)? {
                        reader.verify_payload()?;
                        bytes += reader.header().file_bytes();
                    }
                }
                Ok(bytes)
            })
            .expect("spawning the data check thread");
        check.handle = Some(handle);
        check
    }

    /// The outcome if the check has finished (`Ok` while it runs).
    pub fn poll(&mut self) -> anyhow::Result<()> {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            self.join();
        }
        self.result()
    }

    /// Waits for the check to finish (`before` names what waits, for the log) and returns its
    /// outcome.
    pub fn wait(&mut self, before: &str) -> anyhow::Result<()> {
        if self.handle.is_some() {
            let t = Instant::now();
            self.join();
            let waited = t.elapsed();
            if waited > Duration::from_millis(100) {
                tracing::info!(
                    "waited {:.1} s for the data check before {before}",
                    waited.as_secs_f64()
                );
            }
        }
        self.result()
    }

    fn join(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let outcome = match handle.join() {
            Ok(Ok(bytes)) => {
                tracing::info!(
                    "data check: every train and eval shard matches {} ({} hashed in {:.1} s, beside training)",
                    Manifest::path(&self.dir).display(),
                    pipeline::disk::human_bytes(bytes),
                    self.started.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Ok(Err(FormatError::PayloadHash {
                path,
                expected,
                actual,
            })) => Err(format!(
                "{}: payload sha256 {actual} differs from {expected} recorded when it was written (the file was damaged since); the run stopped before writing a checkpoint trained on it; hint: delete {} and re-run the `pipeline prepare` command that made these shards (it keeps the intact shards and rewrites this one), or pass --no-verify-data to train anyway",
                path.display(),
                Manifest::path(&self.dir).display()
            )),
            Ok(Err(e)) => Err(format!(
                "the data check stopped the run: {e}; --no-verify-data skips this check"
            )),
            Err(_) => Err("the data check thread panicked".into()),
        };
        self.outcome = Some(outcome);
    }

    fn result(&self) -> anyhow::Result<()> {
        match &self.outcome {
            Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
            _ => Ok(()),
        }
    }
}

/// One step's worth of data.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The step this batch feeds (the `step`-th update, counted from 1).
    pub step: u64,
    /// Sequence indices within the train split.
    pub indices: Vec<u64>,
    /// `[batch_size * seq_len]` tokens, row-major.
    pub tokens: Vec<u32>,
    /// [`batch_hash`] of `tokens`.
    pub sha256: String,
}

/// A background thread that loads the batches of steps `start + 1 ..= stop` ahead of the training
/// loop (`start` updates are already done).
#[derive(Debug)]
pub struct Prefetcher {
    rx: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// `depth`: batches loaded ahead (2 is enough to hide a load behind one step).
    pub fn spawn(
        data: Arc<SplitData>,
        order: DataOrder,
        batch_size: usize,
        start: u64,
        stop: u64,
        depth: usize,
    ) -> Self {
        let (tx, rx): (SyncSender<Batch>, Receiver<Batch>) = sync_channel(depth);
        let handle = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                for step in start + 1..=stop {
                    let indices = order.batch(step, batch_size);
                    let tokens = data.load(&indices);
                    let sha256 = batch_hash(&tokens);
                    if tx
                        .send(Batch {
                            step,
                            indices,
                            tokens,
                            sha256,
                        })
                        .is_err()
                    {
                        return; // the loop stopped early (--steps, Ctrl-C, error)
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Prefetcher {
            rx,
            handle: Some(handle),
        }
    }

    /// The next batch and how long the caller waited for it.
    pub fn next(&self) -> Option<(Batch, Duration)> {
        let t = Instant::now();
        let b = self.rx.recv().ok()?;
        Some((b, t.elapsed()))
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver first makes a blocked `send` fail, so the thread ends.
        let (_, dead) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, dead));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The data check's thread runs at niceness 19 and in the idle I/O class; the thread that
    /// spawned it keeps its own priority (niceness is per thread on Linux).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_data_check_thread_yields_to_training() {
        // SAFETY: gettid/getpriority/ioprio_get take integers and touch no memory of ours.
        let priorities = || unsafe {
            let tid = libc::gettid();
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            let io = libc::syscall(libc::SYS_ioprio_get, 1 as libc::c_long, tid as libc::c_long);
            (nice, io >> 13)
        };
        let caller = priorities();
        let lowered = std::thread::spawn(move || {
            yield_to_training();
            priorities()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (19, 3), "niceness, I/O class (3: idle)");
        assert_eq!(priorities(), caller, "the caller's priority changed");
    }

    #[test]
    fn order_is_a_permutation_for_awkward_sizes() {
        for n in [1u64, 2, 3, 5, 17, 64, 65, 1000, 4097] {
            let o = DataOrder::new(42, n);
            let seen: HashSet<u64> = (0..n).map(|p| o.sequence_at(p)).collect();
            assert_eq!(seen.len() as u64, n, "n = {n}");
            assert!(seen.iter().all(|&x| x < n));
        }
    }

    #[test]
    fn order_is_keyed_and_pure() {
        let n = 2_000_000;
        let a = DataOrder::new(42, n);
        let b = DataOrder::new(42, n);
        let c = DataOrder::new(43, n);
        assert_eq!(a.batch(1234, 32), b.batch(1234, 32));
        assert_ne!(a.batch(1234, 32), c.batch(1234, 32));
        // Not the identity nor a shift: consecutive positions land far apart.
        let batch = a.batch(1, 32);
        assert_eq!(
            batch[0],
            a.sequence_at(0),
            "step 1 reads the first positions"
        );
        assert!(
            batch.windows(2).filter(|w| w[1] == w[0] + 1).count() < 2,
            "{batch:?}"
        );
        // Steps never share a sequence (here: the first 2,000 steps of 32).
        let mut seen = HashSet::new();
        for s in 1..=2000 {
            for i in a.batch(s, 32) {
                assert!(seen.insert(i), "sequence {i} repeated at step {s}");
            }
        }
    }
}
