//! Hostile bytes: every reader of a file that a user or a disk hands us runs on thousands of
//! seeded mutations of a real file of its kind (`e2e::mutate`), in process. For each input:
//!
//! - no panic (caught and reported with the input);
//! - no allocation driven by an unchecked length: while the reader runs, no single allocation on
//!   its thread may exceed a bound set by the input's size ([`alloc_bound`]);
//! - the outcome is one of *rejected* (an error), *accepted-and-identical* (the reader's content,
//!   a canonical re-serialisation of everything it returns, equals the original's) or
//!   *accepted-and-different*, and it must agree with the reader's contract:
//!   - a mutation accepted as identical must be *neutral* by a definition independent of the
//!     reader (per reader below: the same generic JSON/TOML value, the recorded hash unchanged,
//!     or never for binary files with checksums), else the reader accepted damage as the original;
//!   - a neutral mutation must not change the content (the reader depends on formatting);
//!   - a *checked* reader (its bytes carry a checksum or are held to a hash: shards, manifest and
//!     its sha256, the documents index, work files, checkpoint files) never accepts a different
//!     content; an unchecked one (user-edited TOML, a tokenizer) may, and the count is reported;
//!   - every other input of a checked reader gets its checksum recomputed ("resealed": a hostile
//!     writer rather than a disk), so the damage reaches the checks behind the checksum; those
//!     are judged as unchecked where nothing else binds the content.
//!
//! `FUZZ_ITERS=N` runs N inputs per reader (the soak; CI runs the defaults of each test),
//! `FUZZ_SEED` changes the seed. A failure names the reader, the seed, the iteration and the
//! kind of mutation, and leaves the input in `$CARGO_TARGET_TMPDIR/fuzz-failures/`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use e2e::mutate::{Field, Mutator, Shape};
use pipeline::format::{DOCUMENTS_FILE, MANIFEST_SHA_FILE, Manifest, ShardHeader, Split};
use pipeline::work::WorkReader;
use sha2::{Digest, Sha256};
use trainer::checkpoint;
use trainer::config::Config;

// ---- the allocation bound -------------------------------------------------------------------

/// The system allocator, with a per-thread bound on single allocations that the fuzz loop sets
/// around each reader call. Requests over the bound are recorded (and served, so the reader
/// runs on); requests over [`REFUSED`] are refused, which aborts the test process loudly rather
/// than swapping the machine.
struct Bounded;

const REFUSED: usize = 4 << 30;

thread_local! {
    static BOUND: Cell<usize> = const { Cell::new(usize::MAX) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// The reader and input index being run, for the message before a refusal aborts.
    static CURRENT: Cell<(&'static str, u64)> = const { Cell::new(("", 0)) };
}

impl Bounded {
    fn check(size: usize) -> bool {
        let over = BOUND.try_with(|b| size > b.get()).unwrap_or(false);
        if over {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
        let refused = over && size > REFUSED;
        if refused {
            use std::io::Write;
            // Formatting integers and a static str into stderr allocates nothing.
            let _ = BOUND.try_with(|b| b.set(usize::MAX));
            let (name, i) = CURRENT.try_with(|c| c.get()).unwrap_or(("", 0));
            let _ = writeln!(
                std::io::stderr(),
                "fuzz {name}: input {i} made the reader ask for {size} bytes at once; refused (FUZZ_SEED and the input index reproduce it)"
            );
        }
        !refused
    }
}

// SAFETY: every call is forwarded to `System` with the caller's layout unchanged; the only
// addition is a thread-local read and write of two integers, which allocate nothing.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::check(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::check(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::check(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

/// The largest single allocation a reader may make for an input of `len` bytes: a few times the
/// input (a parsed copy, a decompressed index), plus room for fixed-size tables. A length field
/// trusted without a check against the file size asks for far more.
fn alloc_bound(len: usize, factor: usize) -> usize {
    factor * len + (8 << 20)
}

/// Runs `f` with the allocation bound set on this thread; returns its result and the largest
/// request over the bound (0 if none).
fn bounded<T>(bound: usize, f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    BOUND.with(|b| b.set(bound));
    let out = f();
    BOUND.with(|b| b.set(usize::MAX));
    (out, LARGEST.with(|l| l.get()))
}

// ---- the loop -------------------------------------------------------------------------------

/// What a reader promises about accepted mutations (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contract {
    /// Never accepts a different content.
    Checked,
    /// May accept a different content (a valid edit); never damage as the original.
    Unchecked,
    /// As `Unchecked`, but the content is a probe of the reader's result rather than all of it,
    /// so "identical" cannot be told from "different outside the probe": only panics,
    /// allocations and neutral mutations are judged.
    Probed,
}

/// Whether a mutated input means the same as the original, judged without the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Neutral {
    /// The same meaning: if accepted, the content must be identical.
    Same,
    /// The same meaning if the reader's documented defaults or checks make it so (a config key
    /// left out; compressed bytes under a checksum of their decoded content): either outcome.
    Either,
    /// Another meaning: if accepted, the content must differ.
    No,
}

/// Recomputes a checksum inside the input.
type Reseal = dyn Fn(&mut Vec<u8>);
/// Runs a reader on an input; the flag says whether it was resealed (for checksums kept in
/// another file, which the reader then writes).
type Read<'a> = dyn Fn(&[u8], bool) -> anyhow::Result<Vec<u8>> + 'a;

/// One reader under test.
struct Target<'a> {
    name: &'static str,
    original: Vec<u8>,
    shape: Shape,
    contract: Contract,
    /// The contract of resealed inputs (a forged checksum binds nothing it covers).
    resealed_contract: Contract,
    /// Allocation bound factor (see [`alloc_bound`]).
    alloc_factor: usize,
    /// CI inputs; `FUZZ_ITERS` overrides.
    iters: u64,
    /// Runs the reader on the bytes (resealed or not), returns its content.
    read: &'a Read<'a>,
    /// Whether a mutated input means the same as the original, judged without the reader.
    neutral: &'a dyn Fn(&[u8]) -> Neutral,
    /// Applied to every other mutation before reading: recomputes a checksum so that the
    /// mutation reaches the checks behind it (a hostile writer, not a disk).
    reseal: Option<&'a Reseal>,
}

#[derive(Debug, Default)]
struct Tally {
    tried: u64,
    rejected: u64,
    identical: u64,
    different: u64,
    /// Of `different`, inputs with a recomputed checksum (judged by `resealed_contract`).
    different_resealed: u64,
    /// Accepted-and-different, by kind of mutation.
    different_by_kind: BTreeMap<String, u64>,
}

fn iterations(default: u64) -> u64 {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f022)
}

fn fuzz(t: Target<'_>) -> Tally {
    let original = (t.read)(&t.original, false)
        .unwrap_or_else(|e| panic!("{}: the original is refused: {e:#}", t.name));
    let seed = seed() ^ pipeline::rng::mix64(t.name.len() as u64 ^ t.name.as_bytes()[0] as u64);
    let mut m = Mutator::new(seed);
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let iters = iterations(t.iters);
    let started = std::time::Instant::now();
    for i in 0..iters {
        let (mut input, kind) = m.mutate(&t.original, &t.shape);
        let resealed = match t.reseal {
            Some(reseal) if i % 2 == 1 => {
                reseal(&mut input);
                true
            }
            _ => false,
        };
        if input == t.original {
            continue;
        }
        tally.tried += 1;
        let bound = alloc_bound(input.len().max(t.original.len()), t.alloc_factor);
        CURRENT.with(|c| c.set((t.name, i)));
        let (result, largest) = bounded(bound, || {
            catch_unwind(AssertUnwindSafe(|| (t.read)(&input, resealed)))
        });
        let mut fail = |why: String| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            let file = dir.join(format!(
                "{}-{seed:x}-{i}.bin",
                t.name.replace(['/', ' '], "_")
            ));
            let _ = fs::create_dir_all(&dir).and_then(|()| fs::write(&file, &input));
            failures.push(format!(
                "{}: input {i} (seed {seed:#x}, {kind:?}{}): {why}; input saved as {}",
                t.name,
                if resealed { ", resealed" } else { "" },
                file.display()
            ));
        };
        if largest > 0 {
            fail(format!(
                "allocated {largest} bytes at once for a {}-byte input (bound {bound})",
                input.len()
            ));
        }
        let neutral = (t.neutral)(&input);
        let contract = if resealed {
            t.resealed_contract
        } else {
            t.contract
        };
        match result {
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                fail(format!("panicked: {msg}"));
            }
            Ok(Err(_)) => tally.rejected += 1,
            Ok(Ok(content)) if content == original => {
                tally.identical += 1;
                if neutral == Neutral::No && contract != Contract::Probed {
                    fail("a non-neutral mutation was accepted as the original".into());
                }
            }
            Ok(Ok(_)) => {
                tally.different += 1;
                tally.different_resealed += u64::from(resealed);
                *tally
                    .different_by_kind
                    .entry(format!("{kind:?}"))
                    .or_default() += 1;
                if neutral == Neutral::Same {
                    fail("a neutral mutation changed the content".into());
                } else if contract == Contract::Checked {
                    fail("damage was accepted as a different content".into());
                }
            }
        }
        if failures.len() >= 10 {
            break;
        }
    }
    eprintln!(
        "fuzz {:<26} tried {:>6}  rejected {:>6}  accepted-identical {:>5}  accepted-different {:>5} (resealed {:>5}) {:.1} s {:?}",
        t.name,
        tally.tried,
        tally.rejected,
        tally.identical,
        tally.different,
        tally.different_resealed,
        started.elapsed().as_secs_f64(),
        tally.different_by_kind
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    tally
}

/// Neutral for JSON: the same generic JSON value (whitespace, key order of the same keys, number
/// spelling of the same value: `0` for `0.0`).
fn same_json(original: &[u8]) -> impl Fn(&[u8]) -> Neutral + use<> {
    let want: serde_json::Value = serde_json::from_slice(original).expect("original is JSON");
    move |b| {
        same_if(serde_json::from_slice::<serde_json::Value>(b).is_ok_and(|v| json_eq(&v, &want)))
    }
}

/// JSON equality with numbers compared by value (an integer equals the float of the same value).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::{Array, Number, Object};
    match (a, b) {
        (Number(x), Number(y)) if x.is_f64() || y.is_f64() => x.as_f64() == y.as_f64(),
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Object(x), Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn same_if(same: bool) -> Neutral {
    if same { Neutral::Same } else { Neutral::No }
}

/// Neutral for a JSON file whose reader ignores keys it does not know (the manifest: "fields may
/// be added, never renamed"): the same generic value once keys absent from the original are
/// dropped.
fn same_json_known_keys(original: &[u8]) -> impl Fn(&[u8]) -> Neutral + use<> {
    fn known(v: &serde_json::Value, like: &serde_json::Value) -> serde_json::Value {
        match (v, like) {
            (serde_json::Value::Object(o), serde_json::Value::Object(l)) => o
                .iter()
                .filter_map(|(k, x)| Some((k.clone(), known(x, l.get(k)?))))
                .collect(),
            (serde_json::Value::Array(a), serde_json::Value::Array(l)) => a
                .iter()
                .zip(l.iter().chain(std::iter::repeat(&serde_json::Value::Null)))
                .map(|(x, y)| known(x, y))
                .collect(),
            _ => v.clone(),
        }
    }
    let want: serde_json::Value = serde_json::from_slice(original).expect("original is JSON");
    move |b| {
        same_if(
            serde_json::from_slice::<serde_json::Value>(b)
                .is_ok_and(|v| json_eq(&known(&v, &want), &want)),
        )
    }
}

/// Neutral for the config TOML: the same generic TOML table (whitespace, comments, number
/// spelling of the same value: `1` for `1.0`); that table with keys left out is `Either` (a key
/// left out takes its documented default, which may or may not be the value left out).
fn same_toml(original: &[u8]) -> impl Fn(&[u8]) -> Neutral + use<> {
    fn eq(a: &toml::Value, b: &toml::Value) -> bool {
        use toml::Value::{Array, Float, Integer, Table};
        match (a, b) {
            (Integer(x), Float(y)) | (Float(y), Integer(x)) => *x as f64 == *y,
            (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| eq(x, y)),
            (Table(x), Table(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| eq(v, w)))
            }
            _ => a == b,
        }
    }
    fn within(v: &toml::Value, of: &toml::Value) -> bool {
        match (v, of) {
            (toml::Value::Table(t), toml::Value::Table(o)) => t
                .iter()
                .all(|(k, x)| o.get(k).is_some_and(|y| within(x, y))),
            _ => eq(v, of),
        }
    }
    let parse = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<toml::Table>().ok())
            .map(toml::Value::Table)
    };
    let want = parse(original).expect("original is TOML");
    move |b| match parse(b) {
        Some(v) if eq(&v, &want) => Neutral::Same,
        Some(v) if within(&v, &want) => Neutral::Either,
        _ => Neutral::No,
    }
}

fn never(_: &[u8]) -> Neutral {
    Neutral::No
}

/// A copy of `dir` (files only, one level) under `into`.
fn copy_dir(dir: &Path, into: &Path) -> PathBuf {
    fs::create_dir_all(into).unwrap();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), into.join(e.file_name())).unwrap();
        }
    }
    into.to_owned()
}

// ---- the files: a real small dataset, a work file, a checkpoint -----------------------------

/// A complete small dataset and the first work file of the run that made it (taken from a
/// `prepare` crashed right after that work file), made once per test process.
struct PreparedFiles {
    _tmp: tempfile::TempDir,
    dataset: PathBuf,
    work_file: PathBuf,
}

fn prepared() -> &'static PreparedFiles {
    static P: OnceLock<PreparedFiles> = OnceLock::new();
    P.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("shards");
        let out_s = out.to_string_lossy().into_owned();
        let source = crate::pipeline::small_source()
            .to_string_lossy()
            .into_owned();
        let args = crate::pipeline::cli_args(&out_s, &source, "30K", "32");
        let o = crate::pipeline::pipeline(&args, &[("PIPELINE_TEST_ABORT_AFTER", "2")]);
        assert!(
            crate::pipeline::stderr(&o).contains("aborting at `work file finished`"),
            "{}",
            crate::pipeline::stderr(&o)
        );
        let work = fs::read_dir(out.join(pipeline::format::WORK_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "tok"))
            .expect("a finished work file");
        let work_file = tmp.path().join("work.tok");
        fs::copy(&work, &work_file).unwrap();
        let o = crate::pipeline::pipeline(&args, &[]);
        assert!(o.status.success(), "{}", crate::pipeline::stderr(&o));
        PreparedFiles {
            _tmp: tmp,
            dataset: out,
            work_file,
        }
    })
}

/// A checkpoint of a one-step tiny run (vocabulary 64, hidden 32).
fn checkpoint_dir() -> &'static Path {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = crate::trainer::tiny_config(16, 2, 4);
        let config = crate::trainer::write_config(tmp.path(), &cfg);
        let data =
            crate::trainer::shards(tmp.path(), 16, 40, trainer::synthetic::Pattern::Learnable);
        let s = trainer::train::run(&crate::trainer::opts(
            &data,
            &config,
            &tmp.path().join("runs"),
            Some(1),
        ))
        .unwrap();
        (tmp, s.last_checkpoint)
    })
    .1
}

fn u32_fields(offsets: &[usize]) -> Vec<Field> {
    offsets
        .iter()
        .map(|&offset| Field { offset, width: 4 })
        .collect()
}

// ---- the readers ----------------------------------------------------------------------------

/// A shard as the trainer and `verify` read it: the manifest's checks of every header of the
/// split, then the payload hashes. Every other input also gets a valid header checksum, so
/// hostile header fields reach the checks behind it. The header alone (`ShardHeader::read_from`)
/// runs on every input too, for panics and allocations.
#[test]
fn hostile_shards_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(&prepared().dataset, &tmp.path().join("d"));
    let name = Split::Train.shard_file_name(1);
    let path = dir.join(&name);
    let original = fs::read(&path).unwrap();
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        let _ = ShardHeader::read_from(&path);
        let m = Manifest::load(&dir)?;
        let readers = m.open_split(&dir, Split::Train)?;
        for r in &readers {
            r.verify_payload()?;
        }
        let r = &readers[1];
        let mut content = format!("{:?}", r.header()).into_bytes();
        for i in 0..r.num_sequences() {
            content.extend_from_slice(r.sequence_bytes(i));
        }
        Ok(content)
    };
    let reseal = |b: &mut Vec<u8>| {
        if b.len() >= 1024 {
            let d = Sha256::digest(&b[..1016]);
            b[1016..1024].copy_from_slice(&d[..8]);
        }
    };
    let mut fields = u32_fields(&[8, 12, 16, 20, 24, 28, 32, 36]);
    fields.extend([40, 48, 56].map(|offset| Field { offset, width: 8 }));
    fuzz(Target {
        name: "shard",
        original: original.clone(),
        shape: Shape {
            text: false,
            fields,
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Checked,
        alloc_factor: 2,
        iters: 3000,
        read: &read,
        neutral: &never,
        reseal: Some(&reseal),
    });
    fs::write(&path, &original).unwrap();
}

/// `manifest.json` as `pipeline verify` reads it: held to `manifest.json.sha256`, then checked
/// against every shard and the tokenizer copy. No change of its bytes is neutral.
#[test]
fn hostile_manifests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(&prepared().dataset, &tmp.path().join("d"));
    let path = Manifest::path(&dir);
    let original = fs::read(&path).unwrap();
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        pipeline::verify::verify(&dir)?;
        Ok(format!("{:?}", Manifest::load(&dir)?).into_bytes())
    };
    fuzz(Target {
        name: "manifest.json",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Checked,
        alloc_factor: 8,
        iters: 1000,
        read: &read,
        neutral: &never,
        reseal: None,
    });
}

/// `manifest.json.sha256` as `pipeline verify` reads it. Neutral: the recorded hash (the first
/// word) is unchanged; the file name after it is for `sha256sum -c` and not read.
#[test]
fn hostile_manifest_hash_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(&prepared().dataset, &tmp.path().join("d"));
    let path = dir.join(MANIFEST_SHA_FILE);
    let original = fs::read(&path).unwrap();
    let first_word = |b: &[u8]| {
        b.split(|c| c.is_ascii_whitespace())
            .find(|w| !w.is_empty())
            .map(<[u8]>::to_vec)
    };
    let want = first_word(&original);
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        pipeline::verify::verify(&dir)?;
        Ok(format!("{:?}", Manifest::load(&dir)?).into_bytes())
    };
    let neutral = |b: &[u8]| same_if(first_word(b) == want);
    fuzz(Target {
        name: "manifest.json.sha256",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Checked,
        alloc_factor: 8,
        iters: 800,
        read: &read,
        neutral: &neutral,
        reseal: None,
    });
}

/// `manifest.json` edited and re-hashed (a hostile writer, or a reader that skips the hash file,
/// as the trainer does): `verify`, and the trainer's opening of both splits, must stay
/// panic-free and in bounds. Different values the shards cannot contradict (a seed, a source
/// file's hash) are accepted: the manifest is then a different, self-consistent one. Neutral:
/// the same generic JSON value once keys the manifest does not define are dropped.
#[test]
fn hostile_rehashed_manifests_are_checked_against_the_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(&prepared().dataset, &tmp.path().join("d"));
    let path = Manifest::path(&dir);
    let original = fs::read(&path).unwrap();
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        let sha = hex::encode(Sha256::digest(b));
        fs::write(
            dir.join(MANIFEST_SHA_FILE),
            format!("{sha}  manifest.json\n"),
        )?;
        if let Ok(m) = Manifest::load(&dir) {
            for split in [Split::Train, Split::Eval] {
                let _ = trainer::data::SplitData::open(&m, &dir, split);
            }
        }
        pipeline::verify::verify(&dir)?;
        Ok(format!("{:?}", Manifest::load(&dir)?).into_bytes())
    };
    let neutral = same_json_known_keys(&original);
    fuzz(Target {
        name: "manifest.json (re-hashed)",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Unchecked,
        resealed_contract: Contract::Unchecked,
        alloc_factor: 8,
        iters: 1500,
        read: &read,
        neutral: &neutral,
        reseal: None,
    });
}

/// `documents.jsonl.zst` as a downstream tool reads it (the toolkit itself only writes it): the
/// zstd frame, then one JSON object per line with the documented keys. Checked: the frame
/// carries a checksum of its content. Bits zstd does not read may change: `Either`.
#[test]
fn hostile_documents_indexes_are_refused() {
    let original = fs::read(prepared().dataset.join(DOCUMENTS_FILE)).unwrap();
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        // A window no larger than the writer's (level 3: 2 MiB): the frame header's window size
        // is a length like any other, and an unbounded decoder allocates what it says.
        let mut d = zstd::stream::Decoder::new(b)?;
        d.window_log_max(22)?;
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut text)?;
        for line in std::str::from_utf8(&text)?.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            for key in ["split", "id", "file"] {
                anyhow::ensure!(v[key].is_string(), "{key}");
            }
            for key in ["row", "position", "tokens", "kept"] {
                anyhow::ensure!(v[key].is_u64(), "{key}");
            }
        }
        Ok(text)
    };
    fuzz(Target {
        name: "documents.jsonl.zst",
        original,
        shape: Shape::default(),
        contract: Contract::Checked,
        resealed_contract: Contract::Checked,
        alloc_factor: 64,
        iters: 4000,
        read: &read,
        neutral: &|_| Neutral::Either,
        reseal: None,
    });
}

/// A work file of an interrupted `prepare` as assembly reads it: trailer and its sha256, index,
/// meta, then every record. A work file it refuses is tokenized again. Every other input gets a
/// valid trailer hash, so damage reaches the index and record checks behind it.
#[test]
fn hostile_work_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("00000-x.tok");
    let original = fs::read(&prepared().work_file).unwrap();
    let len = original.len();
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        let r = WorkReader::open(&path)?;
        let mut content = format!("{:?}", r.meta()).into_bytes();
        let mut buf = Vec::new();
        for i in 0..r.len() {
            let rec = r.read(i, &mut buf)?;
            content.extend(format!("{:?}", rec.head).bytes());
            content.extend_from_slice(rec.tokens);
        }
        Ok(content)
    };
    let reseal = |b: &mut Vec<u8>| {
        if b.len() >= 64 {
            let body = b.len() - 64;
            let h = Sha256::digest(&b[..body]);
            b[body + 24..body + 56].copy_from_slice(&h);
        }
    };
    // The trailer's index offset, count and meta length.
    let fields = [64, 56, 48]
        .map(|back| Field {
            offset: len - back,
            width: 8,
        })
        .to_vec();
    fuzz(Target {
        name: "work file (.work/*.tok)",
        original,
        shape: Shape {
            text: false,
            fields,
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Unchecked,
        alloc_factor: 2,
        iters: 3000,
        read: &read,
        neutral: &never,
        reseal: Some(&reseal),
    });
}

/// Writes `bytes` as `file` of checkpoint `dir`; when `resealed`, also records their sha256 in
/// `checksums.sha256` (a hostile writer), else restores the original checksums file.
fn write_checkpoint_file(
    dir: &Path,
    file: &str,
    bytes: &[u8],
    resealed: bool,
) -> std::io::Result<()> {
    fs::write(dir.join(file), bytes)?;
    let sums = fs::read_to_string(checkpoint_dir().join(checkpoint::CHECKSUMS_FILE))?;
    let sums = if resealed {
        let sha = hex::encode(Sha256::digest(bytes));
        sums.lines()
            .map(|l| match l.split_once("  ") {
                Some((_, name)) if name == file => format!("{sha}  {name}\n"),
                _ => format!("{l}\n"),
            })
            .collect()
    } else {
        sums
    };
    fs::write(dir.join(checkpoint::CHECKSUMS_FILE), sums)
}

/// Does nothing to the bytes: the checksum of a checkpoint file lives in another file, which the
/// reader closure rewrites when told the input is resealed.
fn reseal_elsewhere(_: &mut Vec<u8>) {}

/// A checkpoint's `state.json` as `--resume` reads it: held to `checksums.sha256`, then parsed
/// and the stored config validated. Checked; resealed inputs (a consistent edit) reach the
/// parser and the config checks and may be a different valid state. Neutral: the same generic
/// JSON value.
#[test]
fn hostile_checkpoint_states_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(checkpoint_dir(), &tmp.path().join("ck"));
    let original = fs::read(dir.join(checkpoint::STATE_FILE)).unwrap();
    let read = |b: &[u8], resealed: bool| -> anyhow::Result<Vec<u8>> {
        write_checkpoint_file(&dir, checkpoint::STATE_FILE, b, resealed)?;
        Ok(serde_json::to_vec(&checkpoint::load_state(&dir)?)?)
    };
    let neutral = same_json(&original);
    fuzz(Target {
        name: "checkpoint state.json",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Unchecked,
        alloc_factor: 8,
        iters: 2000,
        read: &read,
        neutral: &neutral,
        reseal: Some(&reseal_elsewhere),
    });
}

/// A checkpoint's `checksums.sha256` as loading reads it. Checked. Neutral: the first line
/// naming each of the three files is unchanged (other lines are not read, as by `sha256sum -c`
/// they would only add checks).
#[test]
fn hostile_checkpoint_checksums_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(checkpoint_dir(), &tmp.path().join("ck"));
    let path = dir.join(checkpoint::CHECKSUMS_FILE);
    let original = fs::read(&path).unwrap();
    let (model_out, opt_out) = (tmp.path().join("m"), tmp.path().join("o"));
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        let loaded = checkpoint::load(&dir, &Device::Cpu)?;
        loaded.params.save(&model_out)?;
        loaded.optimizer.save(&opt_out)?;
        let mut content = serde_json::to_vec(&loaded.state)?;
        content.extend(fs::read(&model_out)?);
        content.extend(fs::read(&opt_out)?);
        Ok(content)
    };
    let recorded = |b: &[u8]| -> Vec<Option<String>> {
        let text = String::from_utf8_lossy(b);
        [
            checkpoint::MODEL_FILE,
            checkpoint::OPTIMIZER_FILE,
            checkpoint::STATE_FILE,
        ]
        .iter()
        .map(|f| {
            text.lines()
                .find(|l| l.split_once("  ").is_some_and(|(_, n)| n == *f))
                .map(str::to_owned)
        })
        .collect()
    };
    let want = recorded(&original);
    let neutral = |b: &[u8]| same_if(std::str::from_utf8(b).is_ok() && recorded(b) == want);
    fuzz(Target {
        name: "checkpoint checksums.sha256",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Checked,
        alloc_factor: 8,
        iters: 800,
        read: &read,
        neutral: &neutral,
        reseal: None,
    });
}

/// Neutral for safetensors: the same header length, the same generic JSON header, the same
/// tensor bytes.
fn same_safetensors(original: &[u8]) -> impl Fn(&[u8]) -> Neutral + use<> {
    fn split(b: &[u8]) -> Option<(serde_json::Value, &[u8])> {
        let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
        let header = b.get(8..8usize.checked_add(n)?)?;
        Some((serde_json::from_slice(header).ok()?, &b[8 + n..]))
    }
    let original = original.to_vec();
    move |b| {
        same_if(
            b.get(..8) == original.get(..8)
                && matches!((split(b), split(&original)), (Some(x), Some(y)) if x == y),
        )
    }
}

fn fuzz_checkpoint_tensors(name: &'static str, file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(checkpoint_dir(), &tmp.path().join("ck"));
    let original = fs::read(dir.join(file)).unwrap();
    let (model_out, opt_out) = (tmp.path().join("m"), tmp.path().join("o"));
    let read = |b: &[u8], resealed: bool| -> anyhow::Result<Vec<u8>> {
        write_checkpoint_file(&dir, file, b, resealed)?;
        let loaded = checkpoint::load(&dir, &Device::Cpu)?;
        // The content: both files as the trainer would write them back.
        loaded.params.save(&model_out)?;
        loaded.optimizer.save(&opt_out)?;
        let mut content = fs::read(&model_out)?;
        content.extend(fs::read(&opt_out)?);
        Ok(content)
    };
    let neutral = same_safetensors(&original);
    fuzz(Target {
        name,
        original,
        shape: Shape {
            text: false,
            fields: vec![Field {
                offset: 0,
                width: 8,
            }],
        },
        contract: Contract::Checked,
        resealed_contract: Contract::Unchecked,
        alloc_factor: 4,
        iters: 1500,
        read: &read,
        neutral: &neutral,
        reseal: Some(&reseal_elsewhere),
    });
}

/// `model.safetensors` as `--resume` loads it: held to `checksums.sha256`, then parsed.
/// Checked; resealed inputs reach the safetensors parser and the shape checks.
#[test]
fn hostile_model_safetensors_are_refused() {
    fuzz_checkpoint_tensors("model.safetensors", checkpoint::MODEL_FILE);
}

/// `optimizer.safetensors` as `--resume` loads it, like `model.safetensors`.
#[test]
fn hostile_optimizer_safetensors_are_refused() {
    fuzz_checkpoint_tensors("optimizer.safetensors", checkpoint::OPTIMIZER_FILE);
}

/// A config TOML as `trainer run --config` reads it (parsed and validated). Unchecked: any
/// valid config is a user's choice. Neutral: the same generic TOML table.
#[test]
fn hostile_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.toml");
    let original =
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml")).unwrap();
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        fs::write(&path, b)?;
        Ok(Config::load(&path)?.to_toml_string().into_bytes())
    };
    let neutral = same_toml(&original);
    fuzz(Target {
        name: "config TOML",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Unchecked,
        resealed_contract: Contract::Unchecked,
        alloc_factor: 8,
        iters: 2000,
        read: &read,
        neutral: &neutral,
        reseal: None,
    });
}

/// `tokenizer.json` as `prepare --tokenizer` and `inspect` load it. Probed: the content is the
/// vocabulary size, BOS/EOS and the ids of a few texts (all scripts, byte fallback), not the
/// whole model.
#[test]
fn hostile_tokenizers_are_refused() {
    let original = fs::read(e2e::fixtures::tokenizer_json()).unwrap();
    let probes = [
        "The quick brown fox, 1,234.5 times.",
        "  leading spaces\tand tabs\n",
        "naïve café Ωμέγα привет 你好 こんにちは",
        "emoji 🦀 and <s> literal </s>",
    ];
    let read = |b: &[u8], _: bool| -> anyhow::Result<Vec<u8>> {
        let t = pipeline::tokenize::Tokenizer::from_bytes(b.to_vec())?;
        let mut content = format!("{} {} {}", t.vocab_size(), t.bos_id(), t.eos_id()).into_bytes();
        for p in probes {
            let mut ids = Vec::new();
            t.encode(p, &mut ids)?;
            content.extend(format!(" {ids:?}").bytes());
        }
        Ok(content)
    };
    let neutral = same_json(&original);
    fuzz(Target {
        name: "tokenizer.json",
        original,
        shape: Shape {
            text: true,
            fields: Vec::new(),
        },
        contract: Contract::Probed,
        resealed_contract: Contract::Probed,
        alloc_factor: 8,
        iters: 100,
        read: &read,
        neutral: &neutral,
        reseal: None,
    });
}

/// Counts no dataset can have, in a manifest re-hashed to match: `verify` and the trainer's
/// opening of the splits refuse them without overflowing. Regression for two findings of the
/// re-hashed manifest reader: `verify` multiplied `sequences x seq_len` unchecked (a panic in
/// debug builds), and a shard entry's `bytes` was never compared with the file.
#[test]
fn huge_counts_in_a_rehashed_manifest_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_dir(&prepared().dataset, &tmp.path().join("d"));
    let path = Manifest::path(&dir);
    let original: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    for (pointer, value) in [
        ("/train/sequences", u64::MAX),
        ("/eval/sequences", u64::MAX / 2),
        ("/train/tokens", u64::MAX),
        ("/seq_len", u32::MAX as u64),
        ("/train/shards/0/sequences", u64::MAX),
        ("/train/shards/1/first_sequence", u64::MAX),
        ("/train/shards/0/bytes", u64::MAX),
    ] {
        let mut m = original.clone();
        *m.pointer_mut(pointer).unwrap() = value.into();
        let text = serde_json::to_string_pretty(&m).unwrap() + "\n";
        fs::write(&path, &text).unwrap();
        let sha = hex::encode(Sha256::digest(text.as_bytes()));
        fs::write(
            dir.join(MANIFEST_SHA_FILE),
            format!("{sha}  manifest.json\n"),
        )
        .unwrap();
        assert!(pipeline::verify::verify(&dir).is_err(), "{pointer}");
        let m = Manifest::load(&dir).unwrap();
        for split in [Split::Train, Split::Eval] {
            let _ = trainer::data::SplitData::open(&m, &dir, split);
        }
    }
}
