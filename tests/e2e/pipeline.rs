//! `pipeline prepare | verify | inspect` end to end, proving the properties the pipeline promises:
//! 1 exact tokenization, 2 thread- and run-determinism, 3 eval fixed / train prefix across
//! budgets (100K and 1M), 4 disjoint splits, 5 crash + resume byte-identical, 6 verify catches
//! damage, and the bad-input errors. Property 7 (flat memory) is a benchmark:
//! `pipeline/bench/memory.sh`.
//!
//! Most runs use a *small source*: the shipped sample re-cut into files of 40 documents (documents
//! over 64 KB left out), so a run tokenizes a few hundred KB and the budget decides how many files
//! are read.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray, StringViewArray};
use arrow::datatypes::{DataType, Field, Schema};
use e2e::fixtures;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pipeline::format::{Manifest, Split};
use pipeline::prepare::{Outcome, PrepareConfig, prepare};
use pipeline::source::{LocalSource, Source};
use pipeline::tokenize::Tokenizer;

const BIN: &str = env!("CARGO_BIN_EXE_pipeline-e2e");

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::load(&fixtures::tokenizer_json()).expect("fixture tokenizer"))
}

/// (id, text) of every sample document, in sorted-file then row order.
fn sample_documents() -> &'static [(String, String)] {
    static DOCS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut paths: Vec<PathBuf> = fs::read_dir(fixtures::sample_source().join("sample/10BT"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        let mut docs = Vec::new();
        for p in paths {
            let reader = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(&p).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let ids = batch
                    .column_by_name("id")
                    .unwrap()
                    .as_string::<i32>()
                    .clone();
                let texts = batch
                    .column_by_name("text")
                    .unwrap()
                    .as_string::<i32>()
                    .clone();
                for i in 0..batch.num_rows() {
                    docs.push((ids.value(i).to_owned(), texts.value(i).to_owned()));
                }
            }
        }
        docs
    })
}

/// Writes a parquet file with an `id` and an optional `text` column (given type).
fn write_parquet(path: &Path, rows: &[(&str, Option<&str>)], text: Option<DataType>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)));
    let mut fields = vec![Field::new("id", DataType::Utf8, false)];
    let mut cols = vec![ids];
    match text {
        Some(DataType::Utf8View) => {
            fields.push(Field::new("text", DataType::Utf8View, true));
            cols.push(Arc::new(StringViewArray::from_iter(
                rows.iter().map(|r| r.1),
            )));
        }
        Some(DataType::Utf8) => {
            fields.push(Field::new("text", DataType::Utf8, true));
            cols.push(Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))));
        }
        Some(other) => panic!("unsupported {other}"),
        None => {
            fields.push(Field::new("content", DataType::Utf8, true));
            cols.push(Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))));
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let mut w = ArrowWriter::try_new(fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The small source (see the module doc), built once per test process.
pub(crate) fn small_source() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<&(String, String)> = sample_documents()
            .iter()
            .filter(|d| d.1.len() <= 64 * 1024)
            .collect();
        for (k, chunk) in docs.chunks(40).enumerate() {
            let rows: Vec<(&str, Option<&str>)> = chunk
                .iter()
                .map(|d| (d.0.as_str(), Some(d.1.as_str())))
                .collect();
            let path = dir.path().join(format!("sample/10BT/{k:03}_00000.parquet"));
            write_parquet(&path, &rows, Some(DataType::Utf8));
        }
        dir
    })
    .path()
}

fn config(out: &Path, tokens: u64) -> PrepareConfig {
    e2e::fixtures::prepare_config(out, tokens, 64)
}

fn run_prepare(cfg: &PrepareConfig, source: &Path) -> anyhow::Result<Outcome> {
    let mut src = LocalSource::open(source)?;
    prepare(cfg, &mut src, tokenizer())
}

/// A prepared small-source dataset at `tokens`, shared by the read-only tests.
fn prepared(tokens: u64) -> &'static Path {
    static DIRS: OnceLock<std::sync::Mutex<HashMap<u64, &'static Path>>> = OnceLock::new();
    let mut dirs = DIRS.get_or_init(Default::default).lock().unwrap();
    dirs.entry(tokens).or_insert_with(|| {
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        let out = dir.path().join("shards");
        run_prepare(&config(&out, tokens), small_source()).unwrap();
        Box::leak(out.into_boxed_path())
    })
}

/// Every file of a dataset folder except `stats.json` (timings), by name.
fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "stats.json")
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                e.file_type().unwrap().is_file(),
                "unexpected entry {name} in {}",
                dir.display()
            );
            (name, fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Asserts two dataset folders are byte-identical, except `pipeline.git_commit` in the manifest
/// (and so the manifest's own sha256 file): it names the checkout at run time, and other work
/// may commit between two runs of one test. Both folders must still pass `verify`.
pub(crate) fn assert_same_folder(a: &Path, b: &Path) {
    let (fa, fb) = (folder_bytes(a), folder_bytes(b));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb), "{} vs {}", a.display(), b.display());
    let without_commit = |bytes: &[u8]| {
        let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        v["pipeline"]["git_commit"] = serde_json::Value::Null;
        serde_json::to_string_pretty(&v).unwrap()
    };
    for d in [a, b] {
        pipeline::verify::verify(d).unwrap_or_else(|e| panic!("{}: {e:#}", d.display()));
    }
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        if name == "manifest.json" {
            assert_eq!(without_commit(x), without_commit(y), "manifest.json");
            continue;
        }
        let manifest = |f: &[(String, Vec<u8>)]| f.iter().find(|x| x.0 == "manifest.json").cloned();
        if name == "manifest.json.sha256" && manifest(&fa) != manifest(&fb) {
            continue;
        }
        assert!(
            x == y,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The concatenated payloads of a split's shards: its token stream as stored.
fn split_stream(dir: &Path, split: Split) -> Vec<u8> {
    let m = Manifest::load(dir).unwrap();
    let mut out = Vec::new();
    for r in m.open_split(dir, split).unwrap() {
        for i in 0..r.num_sequences() {
            out.extend_from_slice(r.sequence_bytes(i));
        }
    }
    out
}

#[derive(Debug)]
struct IndexLine {
    split: Split,
    id: String,
    file: String,
    row: u64,
    position: u64,
    tokens: u64,
    kept: u64,
}

fn documents_index(dir: &Path) -> Vec<IndexLine> {
    let mut text = String::new();
    zstd::stream::Decoder::new(fs::File::open(dir.join("documents.jsonl.zst")).unwrap())
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {l}"));
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {l}"))
                    .to_owned()
            };
            IndexLine {
                split: s("split").parse().unwrap(),
                id: s("id"),
                file: s("file"),
                row: n("row"),
                position: n("position"),
                tokens: n("tokens"),
                kept: n("kept"),
            }
        })
        .collect()
}

pub(crate) fn pipeline(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The CLI arguments of the small-source runs.
pub(crate) fn cli_args<'a>(
    out: &'a str,
    source: &'a str,
    tokens: &'a str,
    shard_sequences: &'a str,
) -> Vec<&'a str> {
    vec![
        "prepare",
        "--tokens",
        tokens,
        "--out",
        out,
        "--source",
        source,
        "--tokenizer",
        BIN_TOKENIZER.get_or_init(|| fixtures::tokenizer_json().to_string_lossy().into_owned()),
        "--seq-len",
        "128",
        "--eval-sequences",
        "16",
        "--shard-sequences",
        shard_sequences,
        "--threads",
        "2",
    ]
}
static BIN_TOKENIZER: OnceLock<String> = OnceLock::new();

// ---- property 1: exact tokenization ---------------------------------------------------------

/// Our ids equal SentencePiece's on every document that stresses the tokenizer: literal `<s>`,
/// `</s>`, `<unk>`, emoji (byte fallback), code with tabs, the 1 MB single-line JSON, all scripts;
/// plus every 7th remaining document.
#[test]
fn ids_equal_sentencepiece_on_the_hard_documents_of_the_sample() {
    let reference = fixtures::reference_ids();
    // The reference backend (Hugging Face `tokenizers`) here; the default backend (the fast
    // encoder, when built) is what `prepare` uses in every other test of this module.
    let tok = &Tokenizer::load(&fixtures::tokenizer_json())
        .unwrap()
        .with_backend(pipeline::tokenize::Backend::Plain)
        .unwrap();
    let mut checked = (0, 0, 0);
    for (k, (id, text)) in sample_documents().iter().enumerate() {
        let literal = text.contains("<s>") || text.contains("</s>") || text.contains("<unk>");
        let hard = literal
            || id.contains("emoji")
            || id.contains("vocab.json")
            || (id.starts_with("tatoeba") && k % 3 == 0)
            || (id.starts_with("github:") && text.len() < 200_000 && k % 2 == 0);
        if !(hard || k % 7 == 0) {
            continue;
        }
        let mut ids = Vec::new();
        tok.encode(text, &mut ids).unwrap();
        let r = &reference[id];
        assert_eq!(
            ids.len() as u64,
            r.n_ids,
            "{id}: token count differs from SentencePiece"
        );
        assert_eq!(
            fixtures::ids_sha256(ids.iter().copied()),
            r.sha256,
            "{id}: ids differ from SentencePiece"
        );
        assert!(
            ids.iter().all(|&i| i > 2),
            "{id}: a control id inside a document"
        );
        checked.0 += 1;
        checked.1 += literal as usize;
        checked.2 += text.len();
    }
    assert!(checked.0 > 500 && checked.1 >= 16, "{checked:?}");
}

/// The shards hold exactly `<s>` + SentencePiece ids + `</s>` for each document the index lists.
#[test]
fn shard_tokens_are_framed_sentencepiece_ids() {
    let dir = prepared(100_000);
    let reference = fixtures::reference_ids();
    let streams = [
        split_stream(dir, Split::Train),
        split_stream(dir, Split::Eval),
    ];
    let mut whole = 0;
    for d in documents_index(dir) {
        let stream = &streams[(d.split == Split::Eval) as usize];
        let at = d.position as usize * 2;
        let toks: Vec<u32> = stream[at..at + d.kept as usize * 2]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect();
        assert_eq!(toks[0], 1, "{}: no <s> at its position", d.id);
        let r = &reference[&d.id];
        assert_eq!(d.tokens, r.n_ids + 2, "{}", d.id);
        if d.kept == d.tokens {
            assert_eq!(*toks.last().unwrap(), 2, "{}: no </s>", d.id);
            assert_eq!(
                fixtures::ids_sha256(toks[1..toks.len() - 1].iter().copied()),
                r.sha256,
                "{}",
                d.id
            );
            whole += 1;
        }
    }
    assert!(whole > 10, "{whole}");
}

// ---- property 2: determinism ----------------------------------------------------------------

#[test]
fn one_thread_two_threads_and_a_second_run_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    // 16 threads: two parquet decoding threads, so row groups are decoded out of order.
    for (name, threads) in [("t1", 1), ("t2", 2), ("t2-again", 2), ("t16", 16)] {
        let out = tmp.path().join(name);
        let mut cfg = config(&out, 100_000);
        cfg.threads = threads;
        run_prepare(&cfg, small_source()).unwrap();
        dirs.push(out);
    }
    assert_same_folder(&dirs[0], &dirs[1]);
    assert_same_folder(&dirs[1], &dirs[2]);
    assert_same_folder(&dirs[1], &dirs[3]);
    assert_same_folder(&dirs[1], prepared(100_000));
}

/// One file of 7-row row groups: at 16 threads two decoding threads take turns on them, and
/// the dataset is the one a single thread makes.
#[test]
fn row_groups_decoded_in_parallel_give_the_same_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("src/sample/10BT/000_00000.parquet");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let docs: Vec<&(String, String)> = sample_documents()
        .iter()
        .filter(|d| d.1.len() <= 64 * 1024)
        .take(300)
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(docs.iter().map(|d| &d.0))),
        Arc::new(StringArray::from_iter_values(docs.iter().map(|d| &d.1))),
    ];
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(7))
        .build();
    let mut w = ArrowWriter::try_new(
        fs::File::create(&path).unwrap(),
        schema.clone(),
        Some(props),
    )
    .unwrap();
    w.write(&RecordBatch::try_new(schema, cols).unwrap())
        .unwrap();
    w.close().unwrap();

    let mut dirs = Vec::new();
    for threads in [1, 16] {
        let out = tmp.path().join(format!("t{threads}"));
        let mut cfg = config(&out, 100_000);
        cfg.threads = threads;
        run_prepare(&cfg, &tmp.path().join("src")).unwrap();
        dirs.push(out);
    }
    assert_same_folder(&dirs[0], &dirs[1]);
}

/// The fast tokenizer (the default) and the plain `tokenizers` path (`--tokenizer-impl reference`)
/// give byte-identical datasets.
#[test]
fn fast_and_reference_tokenizers_give_byte_identical_datasets() {
    use pipeline::tokenize::Backend;
    assert_eq!(tokenizer().backend(), Backend::Fast);
    let reference = Tokenizer::load(&fixtures::tokenizer_json())
        .unwrap()
        .with_backend(Backend::Plain)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reference");
    let mut src = LocalSource::open(small_source()).unwrap();
    prepare(&config(&out, 100_000), &mut src, &reference).unwrap();
    assert_same_folder(&out, prepared(100_000));
}

// ---- property 3: budgets --------------------------------------------------------------------

#[test]
fn eval_is_identical_across_budgets_and_train_is_a_prefix() {
    // Budgets of 100K, 300K and 1M: at 100K the eval set alone already needs enough files
    // for 300K, so only the 1M run reads more files than the 100K run.
    let small = prepared(100_000);
    let ms = Manifest::load(small).unwrap();
    assert_eq!(ms.train.sequences, 100_000u64.div_ceil(128));
    let ts = split_stream(small, Split::Train);
    for tokens in [300_000, 1_000_000] {
        let large = prepared(tokens);
        let ml = Manifest::load(large).unwrap();
        assert_eq!(ml.train.sequences, tokens.div_ceil(128));
        assert_eq!(ms.eval, ml.eval, "eval shard list, 100K vs {tokens}");
        for s in &ms.eval.shards {
            assert_eq!(
                fs::read(small.join(&s.file)).unwrap(),
                fs::read(large.join(&s.file)).unwrap(),
                "{} (100K vs {tokens})",
                s.file
            );
        }
        let tl = split_stream(large, Split::Train);
        assert!(
            tl.len() > ts.len() && tl.starts_with(&ts),
            "train(100K) is a prefix of train({tokens})"
        );
        assert_eq!(
            ms.fingerprint.first_1000_token_ids_sha256,
            ml.fingerprint.first_1000_token_ids_sha256
        );
        if tokens == 1_000_000 {
            assert!(
                ml.dataset.files.len() > ms.dataset.files.len(),
                "the larger budget reads more files"
            );
        }
    }
}

// ---- property 4: disjoint splits ------------------------------------------------------------

#[test]
fn no_document_is_in_both_splits_or_twice_and_eval_follows_the_id_rule() {
    let dir = prepared(1_000_000);
    let m = Manifest::load(dir).unwrap();
    let index = documents_index(dir);
    let mut seen = HashSet::new();
    let mut by_split: HashMap<Split, HashSet<&str>> = HashMap::new();
    for d in &index {
        assert!(seen.insert(&d.id), "{} appears twice", d.id);
        by_split.entry(d.split).or_default().insert(&d.id);
        assert_eq!(
            pipeline::split::route(&d.id),
            d.split,
            "{} is in the wrong split",
            d.id
        );
        assert!(
            d.file.starts_with("sample/10BT/") && d.kept > 0 && d.kept <= d.tokens && d.row < 40
        );
    }
    let (train, eval) = (&by_split[&Split::Train], &by_split[&Split::Eval]);
    assert!(train.is_disjoint(eval));
    assert_eq!(
        (train.len() as u64, eval.len() as u64),
        (m.train.documents, m.eval.documents)
    );
    // Documents tile each split's stream back to back.
    for split in [Split::Train, Split::Eval] {
        let mut next = 0;
        for d in index.iter().filter(|d| d.split == split) {
            assert_eq!(d.position, next, "{}", d.id);
            next += d.kept;
        }
        assert_eq!(next, m.split(split).tokens, "{split}");
    }
}

// ---- property 5: crash anywhere, resume, byte-identical -------------------------------------

#[test]
fn killed_at_every_crash_point_then_resumed_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let source = small_source().to_string_lossy().into_owned();
    let reference = tmp.path().join("reference");
    let ref_s = reference.to_string_lossy().into_owned();
    let o = pipeline(&cli_args(&ref_s, &source, "100K", "256"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let mut kinds = HashSet::new();
    for n in 1.. {
        let out = tmp.path().join(format!("crash-{n}"));
        let out_s = out.to_string_lossy().into_owned();
        let args = cli_args(&out_s, &source, "100K", "256");
        let o = pipeline(&args, &[("PIPELINE_TEST_ABORT_AFTER", &n.to_string())]);
        if o.status.success() {
            // Every kind of crash point was hit: mid work file, after it, mid shard, after it,
            // and after each of the final files.
            assert_eq!(kinds.len(), 8, "{kinds:?}");
            break;
        }
        assert!(
            stderr(&o).contains("aborting at"),
            "run {n} failed without the crash hook: {}",
            stderr(&o)
        );
        let kind = stderr(&o)
            .split("aborting at `")
            .nth(1)
            .unwrap()
            .split('`')
            .next()
            .unwrap()
            .to_owned();
        kinds.insert(kind);
        let manifest_written = stderr(&o).contains("aborting at `manifest written`");
        assert_eq!(
            out.join("manifest.json").exists(),
            manifest_written,
            "crash {n}"
        );
        if !manifest_written {
            // A folder without a manifest is never complete.
            let v = pipeline(&["verify", &out_s], &[]);
            assert!(
                !v.status.success() && stderr(&v).contains("no complete dataset"),
                "{}",
                stderr(&v)
            );
        }
        // Shards finished before the crash must not be rewritten by the resume.
        let finished: Vec<(PathBuf, u64)> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .map(|p| {
                let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).unwrap());
                (p, ino)
            })
            .collect();
        let o = pipeline(&args, &[]);
        assert!(o.status.success(), "resume after crash {n}: {}", stderr(&o));
        for (p, ino) in finished {
            let now = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).unwrap());
            assert_eq!(now, ino, "crash {n}: {} was rewritten", p.display());
        }
        assert!(!out.join(".work").exists());
        assert_same_folder(&reference, &out);
    }
}

/// One writer per `--out`: while another process holds the folder, `prepare` fails at once,
/// naming the holder, and writes nothing; the lock of a process that died (killed mid-run, no
/// clean-up) never blocks the next run.
#[test]
fn a_second_prepare_on_a_held_folder_fails_at_once_and_a_dead_holder_never_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_string_lossy().into_owned();
    let source = small_source().to_string_lossy().into_owned();
    let args = cli_args(&out_s, &source, "100K", "64");

    fs::create_dir_all(&out).unwrap();
    let held = pipeline::lock::FolderLock::acquire(&out, "").unwrap();
    let started = std::time::Instant::now();
    let o = pipeline(&args, &[]);
    let msg = stderr(&o);
    assert!(!o.status.success(), "{msg}");
    assert!(
        msg.contains(&format!("pid {} on host ", std::process::id()))
            && msg.contains(", started 20")
            && msg.contains("another process is writing to this folder")
            && msg.contains("hint: wait for it to finish or stop it, or choose another --out"),
        "{msg}"
    );
    assert_eq!(msg.trim().lines().count(), 1, "one line: {msg}");
    assert!(started.elapsed().as_secs() < 10, "it waited for the lock");
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [".lock"], "the refused run wrote into the folder");
    drop(held);

    // A run that dies holding the lock (abort: no destructors, like kill -9) leaves its line in
    // the lock file; the next run takes the folder over and finishes.
    let o = pipeline(&args, &[("PIPELINE_TEST_ABORT_AFTER", "2")]);
    assert!(stderr(&o).contains("aborting at"), "{}", stderr(&o));
    let left = fs::read_to_string(out.join(".lock")).unwrap();
    assert!(
        left.starts_with("pid ") && left.contains("prepare"),
        "{left}"
    );
    let o = pipeline(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(out.join(".lock")).unwrap(), "");
}

/// Before it writes, `prepare` compares what the run will put in `--out` (work files and shards)
/// with the free space there and warns with both numbers, for a local source too. A budget of
/// 20T tokens needs about 80 TB; the small source then runs short, so nothing big is written.
#[test]
fn prepare_warns_when_its_output_will_not_fit_on_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_string_lossy().into_owned();
    let source = small_source().to_string_lossy().into_owned();
    let (free, _) = pipeline::disk::free_space(tmp.path()).unwrap();
    assert!(
        free < 80_000_000_000_000,
        "this disk holds the whole budget"
    );
    let o = pipeline(&cli_args(&out_s, &source, "20000B", "131072"), &[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let warning = format!(
        "not enough free disk space in {out_s}: the work files and shards still to write need 80."
    );
    assert!(
        err.contains(&warning) && err.contains(" are free; hint: "),
        "{err}"
    );
}

#[test]
fn a_finished_work_file_is_not_tokenized_again() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_string_lossy().into_owned();
    let source = small_source().to_string_lossy().into_owned();
    let args = cli_args(&out_s, &source, "100K", "64");
    // Crash point 2 is the first `work file finished` (after the first file's one batch).
    let o = pipeline(&args, &[("PIPELINE_TEST_ABORT_AFTER", "2")]);
    assert!(
        stderr(&o).contains("aborting at `work file finished`"),
        "{}",
        stderr(&o)
    );
    let o = pipeline(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(
        stats["files_tokenized"],
        stats["files_read"].as_u64().unwrap() - 1,
        "{stats}"
    );
    // Re-running a complete folder with the same settings does nothing and succeeds.
    let o = pipeline(&args, &[("RUST_LOG", "info")]);
    assert!(
        o.status.success() && stderr(&o).contains("already holds this dataset"),
        "{}",
        stderr(&o)
    );
}

/// `prepare` reads the next file ahead while the current one finishes; a file read ahead that
/// the budget turns out not to need must not matter, even when it is corrupt.
#[test]
fn a_corrupt_file_past_the_need_is_never_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let sample = fixtures::sample_source();
    let files = LocalSource::open(&sample).unwrap().files().to_vec();
    let order = pipeline::source::processing_order(&files, config(&src, 1).seed);
    for (k, &i) in order.iter().enumerate() {
        let path = src.join(&files[i].path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let bytes = fs::read(sample.join(&files[i].path)).unwrap();
        // The second file of the order is cut short.
        let keep = if k == 1 { bytes.len() / 3 } else { bytes.len() };
        fs::write(&path, &bytes[..keep]).unwrap();
    }
    let second = &files[order[1]].path;

    // One sample file holds about 1.9M tokens: 100K needs only the first.
    let out = tmp.path().join("small");
    let Outcome::Written { stats, .. } = run_prepare(&config(&out, 100_000), &src).unwrap() else {
        panic!("a fresh folder is written")
    };
    assert_eq!(stats.files_read, 1);
    let reference = tmp.path().join("reference");
    run_prepare(&config(&reference, 100_000), &sample).unwrap();
    for split in [Split::Train, Split::Eval] {
        assert!(
            split_stream(&out, split) == split_stream(&reference, split),
            "{split}"
        );
    }

    // 3M needs the second file: now it is an error, naming the file.
    let err = run_prepare(&config(&tmp.path().join("large"), 3_000_000), &src).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(second.as_str()) && msg.contains("hint:"),
        "{msg}"
    );
}

// ---- property 6: verify ---------------------------------------------------------------------

#[test]
fn verify_passes_intact_folders_and_names_every_kind_of_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let src = prepared(100_000);
    assert!(pipeline::verify::verify(src).is_ok());
    let o = pipeline(&["verify", &src.to_string_lossy()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let m = Manifest::load(src).unwrap();
    let shards: Vec<String> = m
        .train
        .shards
        .iter()
        .chain(&m.eval.shards)
        .map(|s| s.file.clone())
        .collect();
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        fs::create_dir_all(&d).unwrap();
        for (f, bytes) in folder_bytes(src) {
            fs::write(d.join(f), bytes).unwrap();
        }
        d
    };
    let expect_err = |d: &Path, needle: &str| {
        let err = format!("{:#}", pipeline::verify::verify(d).unwrap_err());
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    for (k, shard) in shards.iter().enumerate() {
        // One flipped bit in the payload (a different position in each shard) and in the header.
        let d = copy(&format!("flip-{k}"));
        let mut bytes = fs::read(d.join(shard)).unwrap();
        let at = 1024 + (k * 977) % (bytes.len() - 1024);
        bytes[at] ^= 0x01;
        fs::write(d.join(shard), &bytes).unwrap();
        expect_err(&d, shard);
        bytes[at] ^= 0x01;
        bytes[56] ^= 0x80;
        fs::write(d.join(shard), &bytes).unwrap();
        expect_err(&d, shard);
    }
    let d = copy("truncated");
    let last = shards.last().unwrap();
    let bytes = fs::read(d.join(last)).unwrap();
    fs::write(d.join(last), &bytes[..bytes.len() - 2]).unwrap();
    expect_err(&d, last);
    let d = copy("missing");
    fs::remove_file(d.join(&shards[1])).unwrap();
    expect_err(&d, &shards[1]);
    let d = copy("edited-manifest");
    let text = fs::read_to_string(d.join("manifest.json")).unwrap();
    fs::write(
        d.join("manifest.json"),
        text.replacen("\"seed\": 42", "\"seed\": 43", 1),
    )
    .unwrap();
    expect_err(&d, "manifest.json");
    let d = copy("edited-tokenizer");
    let mut tok = fs::read(d.join("tokenizer.json")).unwrap();
    tok.push(b' ');
    fs::write(d.join("tokenizer.json"), tok).unwrap();
    expect_err(&d, "tokenizer.json");
    // The CLI exits non-zero on damage, naming the file.
    let o = pipeline(&["verify", &d.to_string_lossy()], &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("tokenizer.json"),
        "{}",
        stderr(&o)
    );
}

// ---- inspect --------------------------------------------------------------------------------

#[test]
fn inspect_prints_summary_json_and_sequences() {
    let dir = prepared(100_000);
    let d = dir.to_string_lossy().into_owned();
    let o = pipeline(&["inspect", &d], &[]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success());
    assert!(
        text.contains("train      782 sequences, 100096 tokens"),
        "{text}"
    );
    assert!(
        text.contains("eval       16 sequences, 2048 tokens"),
        "{text}"
    );
    let o = pipeline(&["inspect", &d, "--json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["train"]["sequences"], 782);
    let o = pipeline(&["inspect", &d, "--sequence", "0", "--split", "train"], &[]);
    let ids: Vec<u32> = String::from_utf8(o.stdout)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let stream = split_stream(dir, Split::Train);
    let want: Vec<u32> = stream[..256]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect();
    assert_eq!(ids, want);
    let o = pipeline(
        &[
            "inspect",
            &d,
            "--sequence",
            "0",
            "--split",
            "train",
            "--decode",
        ],
        &[],
    );
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        text.trim_end(),
        tokenizer().decode(&want).unwrap().trim_end()
    );
    let o = pipeline(&["inspect", &d, "--sequence", "16", "--split", "eval"], &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("--sequence 16"),
        "{}",
        stderr(&o)
    );
}

// ---- documents: empty texts, string layouts -------------------------------------------------

#[test]
fn empty_documents_are_skipped_and_counted_and_utf8view_text_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = sample_documents();
    let mut rows: Vec<(&str, Option<&str>)> = Vec::new();
    for (k, d) in docs
        .iter()
        .filter(|d| d.1.len() < 20_000)
        .take(200)
        .enumerate()
    {
        rows.push((d.0.as_str(), Some(d.1.as_str())));
        if k % 50 == 0 {
            rows.push(if k % 100 == 0 {
                ("empty-a", Some(""))
            } else {
                ("empty-b", None)
            });
        }
    }
    let src = tmp.path().join("src");
    write_parquet(&src.join("a.parquet"), &rows, Some(DataType::Utf8View));
    let out = tmp.path().join("out");
    let mut cfg = config(&out, 20_000);
    cfg.eval_sequences = 1;
    let Outcome::Written { stats, .. } = run_prepare(&cfg, &src).unwrap() else {
        panic!("fresh folder")
    };
    assert_eq!(
        (stats.documents_read, stats.documents_skipped_empty),
        (204, 4)
    );
    assert_eq!(stats.documents_kept, 200);
    assert!(
        documents_index(&out)
            .iter()
            .all(|d| !d.id.starts_with("empty"))
    );
}

// ---- bad input ------------------------------------------------------------------------------

/// Runs the CLI and expects a one-line error containing `needles` and a hint, and no manifest.
fn expect_cli_error(args: &[&str], out: &Path, needles: &[&str]) {
    let o = pipeline(args, &[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "succeeded: {args:?}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    // Progress lines may precede it; the error is the single last line.
    assert_eq!(
        err.lines().rfind(|l| !l.trim().is_empty()),
        Some(lines[0]),
        "{err}"
    );
    for n in needles {
        assert!(lines[0].contains(n), "expected `{n}` in: {err}");
    }
    assert!(lines[0].contains("hint:"), "{err}");
    assert!(
        !out.join("manifest.json").exists(),
        "a manifest was left behind"
    );
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out");
    let out_s = out.to_string_lossy().into_owned();
    let small = small_source().to_string_lossy().into_owned();
    let with = |source: &str, tokens: &'static str| -> Vec<String> {
        cli_args(&out_s, source, tokens, "64")
            .into_iter()
            .map(str::to_owned)
            .collect()
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_cli_error(&a, &out, needles);
    };

    // A parquet file without `text`.
    let no_text = t.join("no-text");
    write_parquet(
        &no_text.join("sample/10BT/000_00000.parquet"),
        &[("a", Some("x"))],
        None,
    );
    run(
        with(&no_text.to_string_lossy(), "1K"),
        &["sample/10BT/000_00000.parquet", "no `text` column"],
    );

    // A truncated parquet file.
    let truncated = t.join("truncated");
    fs::create_dir_all(truncated.join("sample/10BT")).unwrap();
    let good = fs::read(fixtures::sample_source().join("sample/10BT/001_00000.parquet")).unwrap();
    fs::write(
        truncated.join("sample/10BT/001_00000.parquet"),
        &good[..good.len() / 3],
    )
    .unwrap();
    run(
        with(&truncated.to_string_lossy(), "1K"),
        &["001_00000.parquet", "corrupt or truncated"],
    );

    // A source folder with no parquet.
    let empty = t.join("empty");
    fs::create_dir_all(&empty).unwrap();
    run(
        with(&empty.to_string_lossy(), "1K"),
        &["--source", "no *.parquet"],
    );

    // Budgets that are not counts.
    for bad in ["0", "lots"] {
        expect_cli_error(
            &[
                "prepare", "--tokens", bad, "--out", &out_s, "--source", &small,
            ],
            &out,
            &["--tokens", &format!("`{bad}`")],
        );
    }

    // Tokenizers that cannot make u16 shards.
    let json: serde_json::Value = serde_json::from_slice(tokenizer().json()).unwrap();
    let mut big = json.clone();
    let vocab = big["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..34_000 {
        vocab.insert(format!("extra{i}"), (32_000 + i).into());
    }
    let big_path = t.join("big/tokenizer.json");
    fs::create_dir_all(big_path.parent().unwrap()).unwrap();
    fs::write(&big_path, serde_json::to_vec(&big).unwrap()).unwrap();
    let mut args = with(&small, "1K");
    args[8] = big_path.to_string_lossy().into_owned();
    run(args, &["big/tokenizer.json", "exceeds 65536"]);
    let mut no_eos = json;
    no_eos["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["content"] != "</s>");
    no_eos["model"]["vocab"]
        .as_object_mut()
        .unwrap()
        .remove("</s>");
    let no_eos_path = t.join("no-eos/tokenizer.json");
    fs::create_dir_all(no_eos_path.parent().unwrap()).unwrap();
    fs::write(&no_eos_path, serde_json::to_vec(&no_eos).unwrap()).unwrap();
    let mut args = with(&small, "1K");
    args[8] = no_eos_path.to_string_lossy().into_owned();
    run(args, &["no-eos/tokenizer.json", "`</s>`"]);

    // A source too small for the budget says how much it holds.
    let one_file = t.join("one-file");
    fs::create_dir_all(one_file.join("sample/10BT")).unwrap();
    let first = small_source().join("sample/10BT/000_00000.parquet");
    fs::copy(first, one_file.join("sample/10BT/000_00000.parquet")).unwrap();
    run(
        with(&one_file.to_string_lossy(), "50M"),
        &["--source", "1 files hold", "need 50000000 train"],
    );
}

/// Shards are assembled while later files are still tokenized: a shard that cannot be written
/// stops the whole run with that file named (not a hang, not a vaguer error of the stage).
#[test]
fn a_shard_that_cannot_be_written_stops_the_run_and_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("train-00001.bin.tmp")).unwrap();
    let out_s = out.to_string_lossy().into_owned();
    let source = small_source().to_string_lossy().into_owned();
    expect_cli_error(
        &cli_args(&out_s, &source, "100K", "64"),
        &out,
        &["cannot create", "train-00001.bin.tmp", "--out"],
    );
}

#[test]
fn a_complete_dataset_with_other_settings_is_kept_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_string_lossy().into_owned();
    let source = small_source().to_string_lossy().into_owned();
    let o = pipeline(&cli_args(&out_s, &source, "20K", "64"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = folder_bytes(&out);

    let other = cli_args(&out_s, &source, "30K", "64");
    let o = pipeline(&other, &[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--out")
            && err.contains("different settings")
            && err.contains("tokens 20000 -> 30000")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        folder_bytes(&out),
        before,
        "the existing dataset was touched"
    );

    let mut forced = other.clone();
    forced.push("--force");
    let o = pipeline(&forced, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::load(&out).unwrap();
    assert_eq!(m.train.sequences, 30_000u64.div_ceil(128));
    assert!(pipeline::verify::verify(&out).is_ok());
}

/// `prepare --force` with the same settings on a damaged dataset (a flipped payload or header
/// byte, a truncated or missing shard, a broken or edited manifest, an edited tokenizer copy, a
/// flipped byte of the documents index) says what is damaged and ends with the dataset a fresh
/// prepare makes, verified; it never stops at the damage it was asked to repair.
#[test]
fn prepare_force_with_the_same_settings_repairs_any_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let source = small_source().to_string_lossy().into_owned();
    let fresh = tmp.path().join("fresh");
    let fresh_s = fresh.to_string_lossy().into_owned();
    let o = pipeline(&cli_args(&fresh_s, &source, "20K", "64"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::load(&fresh).unwrap();
    let (first, last) = (
        m.train.shards[0].file.clone(),
        m.eval.shards.last().unwrap().file.clone(),
    );
    let flip = |path: &Path, at: fn(usize) -> usize, mask: u8| {
        let mut bytes = fs::read(path).unwrap();
        let i = at(bytes.len());
        bytes[i] ^= mask;
        fs::write(path, bytes).unwrap();
    };
    type Damage<'a> = (&'a str, &'a str, Box<dyn Fn(&Path) + 'a>);
    let damages: [Damage; 8] = [
        (
            "payload",
            &first,
            Box::new(|d| flip(&d.join(&first), |n| n - 100, 0x01)),
        ),
        (
            "header",
            &first,
            Box::new(|d| flip(&d.join(&first), |_| 56, 0x80)),
        ),
        (
            "truncated",
            &last,
            Box::new(|d| {
                let bytes = fs::read(d.join(&last)).unwrap();
                fs::write(d.join(&last), &bytes[..bytes.len() - 2]).unwrap();
            }),
        ),
        (
            "missing",
            &first,
            Box::new(|d| fs::remove_file(d.join(&first)).unwrap()),
        ),
        (
            "broken-manifest",
            "manifest.json",
            Box::new(|d| {
                let text = fs::read_to_string(d.join("manifest.json")).unwrap();
                fs::write(d.join("manifest.json"), &text[..text.len() / 2]).unwrap();
            }),
        ),
        (
            "edited-manifest",
            "manifest.json",
            Box::new(|d| {
                let text = fs::read_to_string(d.join("manifest.json")).unwrap();
                let edited = text.replacen("\"dataset_sha256\": \"", "\"dataset_sha256\": \"0", 1);
                assert_ne!(edited, text);
                fs::write(d.join("manifest.json"), edited).unwrap();
            }),
        ),
        (
            "tokenizer",
            "tokenizer.json",
            Box::new(|d| flip(&d.join("tokenizer.json"), |n| n / 2, 0x04)),
        ),
        (
            "documents",
            "documents.jsonl.zst",
            Box::new(|d| flip(&d.join("documents.jsonl.zst"), |n| n / 2, 0x10)),
        ),
    ];
    for (name, file, damage) in &damages {
        let d = tmp.path().join(name);
        fs::create_dir_all(&d).unwrap();
        for (f, bytes) in folder_bytes(&fresh) {
            fs::write(d.join(f), bytes).unwrap();
        }
        damage(&d);
        let d_s = d.to_string_lossy().into_owned();
        let mut args = cli_args(&d_s, &source, "20K", "64");
        args.push("--force");
        let o = pipeline(&args, &[]);
        let err = stderr(&o);
        assert!(o.status.success(), "{name}: {err}");
        assert!(err.contains(file), "{name}: the damage is not named: {err}");
        assert_same_folder(&fresh, &d);
    }
}

// ---- golden files ---------------------------------------------------------------------------

/// Compares `text` with `tests/fixtures/golden/<name>`; `UPDATE_GOLDEN=1` rewrites the file.
fn golden(name: &str, text: &str) {
    let path = fixtures::dir().join("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
    }
    let want = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; hint: run with UPDATE_GOLDEN=1", path.display()));
    assert!(
        want == text,
        "{} differs (UPDATE_GOLDEN=1 rewrites it after review):\n{text}",
        path.display()
    );
}

/// The manifest and `inspect` summary of the shipped sample at `--tokens 100K`, pinned: any change
/// to the tokens, the order, the split rule or the layout changes the fingerprints and fails here.
/// Only what names this machine or checkout is redacted.
#[test]
fn manifest_and_inspect_of_the_sample_match_the_golden_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    run_prepare(&config(&out, 100_000), &fixtures::sample_source()).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let redact = |v: &mut serde_json::Value| *v = "<redacted>".into();
    redact(&mut m["dataset"]["repo"]);
    redact(&mut m["pipeline"]["config"]["source"]["repo"]);
    redact(&mut m["pipeline"]["git_commit"]);
    golden(
        "manifest-sample-100K.json",
        &format!("{}\n", serde_json::to_string_pretty(&m).unwrap()),
    );

    let o = pipeline(&["inspect", &out.to_string_lossy()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    // The folder, the source folder and the commit name this machine and checkout.
    let text: String = text
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["dataset", w, ..] | ["source", w, ..] | ["pipeline", w, ..] if *w != "sha256" => {
                    format!("{} <redacted>\n", words[0])
                }
                _ => format!("{l}\n"),
            }
        })
        .collect();
    golden("inspect-sample-100K.txt", &text);
}
