//! Which documents trained step N, on shards prepared from the real sample: the documents index
//! lookup rebuilds every train document from the sequences that hold it (checked against
//! SentencePiece's ids), `trainer batch` names the batch that scalars.jsonl logged, and an anomaly
//! dump names the same documents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::fixtures;
use pipeline::format::{DocumentIndex, Manifest, Split};
use pipeline::source::LocalSource;
use pipeline::tokenize::Tokenizer;
use serde_json::Value;
use trainer::config::{Config, Knot};
use trainer::data::SplitData;
use trainer::setup::{DeviceChoice, RunOptions};
use trainer::train;

const SEQ_LEN: u64 = 128;

/// Shards of the sample (seq_len 128, 40K train tokens: 313 sequences).
fn prepared(dir: &Path) -> PathBuf {
    let out = dir.join("shards");
    let tok = Tokenizer::load(&fixtures::tokenizer_json()).unwrap();
    let mut src = LocalSource::open(&fixtures::sample_source()).unwrap();
    pipeline::prepare::prepare(&fixtures::prepare_config(&out, 40_000, 64), &mut src, &tok)
        .unwrap();
    out
}

/// Every train document, put back together from the lookups of the sequences that hold it,
/// equals SentencePiece's ids framed by `<s>` `</s>`: the index names the right documents at
/// the right token ranges.
#[test]
fn sequence_lookups_rebuild_every_document_of_the_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = prepared(tmp.path());
    let manifest = Manifest::load(&dir).unwrap();
    let data = SplitData::open(&manifest, &dir, Split::Train).unwrap();
    let (index, _) = DocumentIndex::open(&dir).unwrap();
    let mut pieces: HashMap<String, (Vec<u32>, u64, String, u64)> = HashMap::new();
    let mut order = Vec::new();
    let mut seq = vec![0u32; SEQ_LEN as usize];
    for s in 0..data.num_sequences() {
        data.copy_sequence(s, &mut seq);
        let docs = index.sequence(Split::Train, SEQ_LEN, s).unwrap();
        let mut at = 0;
        for d in docs {
            let [a, b] = d.sequence_tokens;
            assert_eq!(a, at, "sequence {s}: documents tile the sequence");
            at = b;
            let entry = pieces.entry(d.id.clone()).or_insert_with(|| {
                order.push(d.id.clone());
                (Vec::new(), d.tokens, d.file.clone(), d.row)
            });
            assert_eq!(entry.0.len() as u64, d.document_tokens[0], "{}", d.id);
            entry.0.extend_from_slice(&seq[a as usize..b as usize]);
        }
        assert_eq!(at, SEQ_LEN, "sequence {s} is covered");
    }
    let reference = fixtures::reference_ids();
    let mut whole = 0;
    for id in &order {
        let (tokens, n, file, row) = &pieces[id];
        let r = &reference[id];
        assert_eq!((file, *row), (&r.file, r.row), "{id}");
        assert_eq!(tokens[0], 1, "{id} starts with <s>");
        if tokens.len() as u64 == *n {
            whole += 1;
            assert_eq!(*tokens.last().unwrap(), 2, "{id} ends with </s>");
            let ids = tokens[1..tokens.len() - 1].iter().copied();
            assert_eq!(fixtures::ids_sha256(ids), r.sha256, "{id}");
        }
    }
    assert!(whole > 10, "{whole} whole documents checked");
    assert_eq!(index.documents(Split::Train), order.len() as u64);
}

/// The tiny config at seconds per run: batch 4, 8 steps, warmup 2, a sampling round every 2
/// steps whose entropy always counts as collapsed, so rounds after warmup dump.
fn config(dir: &Path) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    let mut c = Config::load(&path).unwrap();
    c.model.hidden_size = 32;
    c.model.ffn_hidden_size = 64;
    c.training.batch_size = 4;
    c.training.total_steps = 8;
    c.training.lr_knots = vec![
        Knot {
            step: 0,
            value: 0.0,
        },
        Knot {
            step: 2,
            value: 3e-3,
        },
        Knot {
            step: 8,
            value: 1e-4,
        },
    ];
    c.training.wd_knots = vec![Knot {
        step: 0,
        value: 0.1,
    }];
    let i = &mut c.instrumentation;
    i.eval_every = 0;
    i.eval_sequences = Some(16);
    i.sample_every = 2;
    i.sample_max_new_tokens = 4;
    i.checkpoint_every = 0;
    i.anomaly.entropy_collapse_below = 1e9;
    i.anomaly.repetition_surge_above = u64::MAX;
    i.anomaly.spike_factor = 1e9;
    i.anomaly.min_steps_between_dumps = 1;
    c.validate().unwrap();
    let out = dir.join("config.toml");
    std::fs::write(&out, c.to_toml_string()).unwrap();
    out
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn batch_cli(shards: &Path, config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer-e2e"))
        .arg("batch")
        .args(args)
        .arg("--shards")
        .arg(shards)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// `trainer batch --step N` prints the batch that step N of scalars.jsonl trained on, with its
/// documents; the anomaly dump of that step names the same documents; rounds before the end of
/// warmup are not checked (no step-0 dump).
#[test]
fn trainer_batch_and_anomaly_dumps_name_the_documents_of_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = prepared(tmp.path());
    let config = config(tmp.path());
    let summary = train::run(&RunOptions {
        shards: shards.clone(),
        config: Some(config.clone()),
        run_dir: tmp.path().join("runs"),
        steps: None,
        resume: None,
        device: DeviceChoice::Cpu,
        verify_data: false,
    })
    .unwrap();
    let mut dumps: Vec<String> = std::fs::read_dir(summary.run_dir.join("anomalies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dumps.sort();
    let expected: Vec<String> = [2, 4, 6, 8]
        .iter()
        .map(|s| format!("step_{s:06}_entropy_collapse"))
        .collect();
    assert_eq!(
        dumps, expected,
        "rounds from the end of warmup on, not step 0"
    );

    let scalars: Vec<Value> =
        std::fs::read_to_string(summary.run_dir.join("metrics/scalars.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    for step in [2u64, 6] {
        let out = batch_cli(&shards, &config, &["--step", &step.to_string(), "--json"]);
        assert!(out.status.success(), "{out:?}");
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed["step"], step);
        assert_eq!(
            printed["batch_sha256"],
            scalars[step as usize - 1]["batch_sha256"]
        );
        let sequences = printed["sequences"].as_array().unwrap();
        assert_eq!(sequences.len(), 4);

        let dump = json(&summary.run_dir.join(format!(
            "anomalies/step_{step:06}_entropy_collapse/batch_indices.json"
        )));
        assert_eq!(dump["batch_sha256"], printed["batch_sha256"]);
        assert_eq!(dump["sequences"], printed["sequences"]);
        let indices: Vec<&Value> = sequences.iter().map(|s| &s["index"]).collect();
        assert_eq!(
            dump["sequence_indices"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            indices
        );
        let mut ids: Vec<&str> = Vec::new();
        for s in sequences {
            let docs = s["documents"].as_array().unwrap();
            assert!(!docs.is_empty());
            for d in docs {
                for key in [
                    "id",
                    "file",
                    "row",
                    "sequence_tokens",
                    "document_tokens",
                    "tokens",
                ] {
                    assert!(d.get(key).is_some(), "{key} in {d}");
                }
                let id = d["id"].as_str().unwrap();
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let dumped: Vec<&str> = dump["document_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(dumped, ids);
    }

    // --decode: each document's line, then its text in the sequence.
    let out = batch_cli(&shards, &config, &["--step", "2", "--decode"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("step 2 | 4 train sequences of 128 tokens"),
        "{first}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("sequence ")).count(),
        4
    );
    let texts = text.lines().filter(|l| l.starts_with("      | ")).count();
    assert!(texts >= 4, "{text}");
    assert!(text.contains("<urn:uuid:"), "{text}");

    for (step, needle) in [
        ("0", "step 0 is the initial weights"),
        ("79", "hold 78 batches"),
    ] {
        let out = batch_cli(&shards, &config, &["--step", step]);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle) && err.contains("hint:"), "{err}");
    }
}
