//! Instrumentation end to end: a tiny CPU run on synthetic shards (with the
//! LLaMA-2 tokenizer.json fixture for the prompts) whose run folder is checked file by file and
//! key by key: meta/, metrics/scalars.jsonl, eval/eval_results.jsonl, samples/samples.jsonl,
//! anomalies/ (thresholds set so that real events fire; each flag and dump checked against the
//! logged values), checkpoint schedule and retention,
//! `trainer eval` / `trainer sample` on a checkpoint, and `trainer report`. A second run with an
//! absurd learning rate diverges for real and must stop after N NaN/Inf steps with a checkpoint.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use trainer::config::{Config, Knot};
use trainer::data::{DataOrder, SplitData, batch_hash};
use trainer::instrument::commands;
use trainer::instrument::retention;
use trainer::instrument::retention::RetentionKind;
use trainer::schedule::checkpoint_schedule;
use trainer::setup::{DeviceChoice, Resume, RunOptions};
use trainer::synthetic::{Pattern, SyntheticSpec, write_dataset};
use trainer::train;

const TOTAL_STEPS: u64 = 24;
const BOUNDARY: u64 = 12;

fn tokenizer_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/tokenizer.json")
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Synthetic learnable shards over the LLaMA-2 vocabulary plus the tokenizer the prompts need.
fn shards(dir: &Path) -> PathBuf {
    let out = dir.join("shards");
    let sha = sha256_file(&tokenizer_fixture());
    let mut m = write_dataset(
        &out,
        &SyntheticSpec {
            seq_len: 64,
            vocab_size: 32_000,
            train_sequences: 128,
            eval_sequences: 12,
            sequences_per_shard: 50,
            tokenizer_sha256: sha,
            pattern: Pattern::Learnable,
        },
    )
    .unwrap();
    // Synthetic shards have no source text; give the eval split a byte count so bits/byte is
    // computed (4 bytes per token, about English with the LLaMA-2 tokenizer).
    m.eval.text_bytes = m.eval.tokens * 4;
    m.save(&out).unwrap();
    std::fs::copy(tokenizer_fixture(), out.join("tokenizer.json")).unwrap();
    out
}

/// configs/tiny.toml shrunk to seconds on CPU, with every probe due within 24 steps.
fn config(total_steps: u64, peak_lr: f64) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    let mut c = Config::load(&path).expect("configs/tiny.toml loads");
    c.model.hidden_size = 32;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.ffn_hidden_size = 64;
    c.model.max_seq_length = 64;
    c.training.seq_len = 64;
    c.training.batch_size = 4;
    c.training.total_steps = total_steps;
    c.training.lr_knots = vec![
        Knot {
            step: 0,
            value: 0.0,
        },
        Knot {
            step: 4,
            value: peak_lr,
        },
        Knot {
            step: BOUNDARY,
            value: peak_lr * 0.5,
        },
        Knot {
            step: total_steps.max(BOUNDARY + 1),
            value: peak_lr * 0.01,
        },
    ];
    c.training.wd_knots = vec![
        Knot {
            step: 0,
            value: 0.1,
        },
        Knot {
            step: BOUNDARY,
            value: 0.0,
        },
    ];
    // The engine's checkpoint steps, by the rule of the run-folder contract for this config
    // (step 0, every 8, the stage-boundary pair, the end).
    let i = &mut c.instrumentation;
    i.log_every = 5;
    i.quant_stats_every = 4;
    i.eval_every = 8;
    i.eval_batch_size = 5; // 12 eval sequences: batches of 5, 5, 2
    i.sample_every = 12;
    i.sample_max_new_tokens = 12;
    i.checkpoint_every = 8;
    i.retention.policy = RetentionKind::Ring;
    i.retention.ring_last = 2;
    i.retention.keep_every = 16;
    i.anomaly.spike_window = 5;
    i.anomaly.max_dumps = 10;
    i.anomaly.min_steps_between_dumps = 1;
    i.anomaly.max_consecutive_nonfinite = 3;
    // Every sampling round is checked, the initial weights' too (whose dumps have no batch).
    i.anomaly.sample_triggers_after_warmup = false;
    c.validate().expect("test config is valid");
    c
}

fn run(dir: &Path, shards: &Path, c: &Config) -> anyhow::Result<PathBuf> {
    let cfg_path = dir.join("config.toml");
    std::fs::write(&cfg_path, c.to_toml_string()).unwrap();
    let opts = RunOptions {
        shards: shards.to_owned(),
        config: Some(cfg_path),
        run_dir: dir.join("runs"),
        steps: None,
        resume: None,
        device: DeviceChoice::Cpu,
        verify_data: false,
    };
    let summary = train::run(&opts);
    summary.map(|s| s.run_dir)
}

fn jsonl(p: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        text.ends_with('\n'),
        "{}: last line is complete",
        p.display()
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("`{k}` is not a number in {v}"))
}

fn has_keys(v: &Value, keys: &[&str], what: &str) {
    for k in keys {
        assert!(v.get(k).is_some(), "{what}: key `{k}` missing in {v}");
    }
}

#[test]
fn tiny_run_writes_the_whole_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shards(tmp.path());
    // Thresholds every sampling round crosses (any entropy, any repeated token) and a spike
    // factor barely above 1, so real events fire; the flags and dumps are checked against the
    // logged values below.
    let mut c = config(TOTAL_STEPS, 3e-3);
    c.instrumentation.anomaly.entropy_collapse_below = 1e9;
    c.instrumentation.anomaly.repetition_surge_above = 0;
    c.instrumentation.anomaly.repetition_surge_check = true; // off in configs/tiny.toml
    c.instrumentation.anomaly.spike_factor = 1.0001;
    c.instrumentation.anomaly.max_dumps = 100;
    let run_dir = run(tmp.path(), &shards, &c).expect("the tiny run succeeds");
    let name = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("bitnet_") && name.contains("_fineweb_T"),
        "{name}"
    );

    // meta/
    let cfg = json(&run_dir.join("meta/config.json"));
    has_keys(
        &cfg["model"],
        &[
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_hidden_size",
            "head_dim",
            "total_params",
            "embeddings_tied",
        ],
        "config.model",
    );
    has_keys(
        &cfg["training"],
        &[
            "seq_len",
            "batch_size",
            "grad_accumulation_steps",
            "total_steps",
            "total_tokens",
            "peak_lr",
            "warmup_steps",
            "stage1_wd",
            "stage2_wd",
            "grad_clip_norm",
            "adam_beta1",
            "adam_beta2",
        ],
        "config.training",
    );
    has_keys(
        &cfg["data"],
        &["dataset", "split", "streaming", "tokenizer"],
        "config.data",
    );
    assert_eq!(cfg["model"]["head_dim"], 8);
    assert_eq!(cfg["training"]["total_tokens"], TOTAL_STEPS * 4 * 64);
    assert_eq!(
        cfg["model"]["total_params"].as_u64().unwrap(),
        trainer::model::parameter_count(&c.model) as u64
    );
    let prov = json(&run_dir.join("meta/provenance.json"));
    has_keys(
        &prov,
        &[
            "git_commit",
            "git_dirty",
            "rustc_version",
            "candle_version",
            "cuda_version",
            "gpu_model",
            "gpu_count",
            "cpu_model",
            "seeds",
            "timestamp_utc",
            "run_id",
            "command_line",
        ],
        "provenance",
    );
    assert_eq!(prov["run_id"], name.as_str());
    assert!(prov["timestamp_utc"].as_str().unwrap().ends_with('Z'));
    let fp = json(&run_dir.join("meta/dataset_fingerprint.json"));
    has_keys(
        &fp,
        &[
            "dataset_name",
            "hf_revision",
            "first_1000_token_ids_sha256",
            "tokenizer_sha256",
            "dataset_sha256",
            "train_sequences",
            "eval_sequences",
            "expected_repetition_rate",
            "tokenizer_vocab_size",
        ],
        "fingerprint",
    );
    let manifest = pipeline::format::Manifest::load(&shards).unwrap();
    assert_eq!(
        fp["first_1000_token_ids_sha256"],
        manifest.fingerprint.first_1000_token_ids_sha256.as_str()
    );
    assert_eq!(
        fp["dataset_sha256"],
        manifest.fingerprint.dataset_sha256.as_str()
    );
    assert_eq!(fp["train_sequences"], 128);
    assert_eq!(fp["eval_sequences"], 12);
    // 24 steps x 4 sequences = 96 <= 128: no sequence is needed twice.
    assert_eq!(fp["expected_repetition_rate"], 0.0);

    // metrics/scalars.jsonl: one line per step, the contract's keys, ternary keys every 4 steps.
    let manifest = pipeline::format::Manifest::load(&shards).unwrap();
    let train_data = SplitData::open(&manifest, &shards, pipeline::format::Split::Train).unwrap();
    let order = DataOrder::new(c.training.seed, train_data.num_sequences());
    let scalars = jsonl(&run_dir.join("metrics/scalars.jsonl"));
    assert_eq!(
        scalars
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=TOTAL_STEPS).collect::<Vec<_>>()
    );
    for r in &scalars {
        has_keys(
            r,
            &[
                "step",
                "tokens_seen",
                "loss",
                "lr",
                "wd",
                "grad_norm",
                "step_time_ms",
                "tokens_per_sec",
                "gpu_mem_allocated_gb",
                "gpu_mem_reserved_gb",
                "data_wait_ms",
                "mfu",
                "batch_sha256",
            ],
            "scalars",
        );
        let step = r["step"].as_u64().unwrap();
        assert_eq!(r["tokens_seen"].as_u64().unwrap(), step * 256);
        // The batch of step N is the one `trainer data-order --steps N` names.
        let batch = train_data.load(&order.batch(step, c.training.batch_size));
        assert_eq!(
            r["batch_sha256"],
            batch_hash(&batch),
            "batch of step {step}"
        );
        assert!(r["gpu_mem_allocated_gb"].is_null(), "CPU run");
        assert!(num(r, "step_time_ms") > 0.0 && num(r, "tokens_per_sec") > 0.0);
        assert!(num(r, "lr") >= 0.0 && num(r, "lr") <= 3e-3 + 1e-12);
        assert_eq!(
            num(r, "wd"),
            if step - 1 < BOUNDARY { 0.1 } else { 0.0 },
            "wd of update {}",
            step - 1
        );
        let ternary = r.get("L0_attn_qkv_zero_pct").is_some();
        assert_eq!(ternary, step % 4 == 0, "ternary keys at step {step}");
        if ternary {
            for l in 0..2 {
                for p in ["attn_qkv", "attn_out_proj", "ffn_gate_up", "ffn_down_proj"] {
                    let f: Vec<f64> = ["neg1", "zero", "pos1"]
                        .iter()
                        .map(|s| num(r, &format!("L{l}_{p}_{s}_pct")))
                        .collect();
                    assert!(f.iter().all(|x| (0.0..=1.0).contains(x)), "{f:?}");
                    assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{p}: {f:?}");
                    assert!(num(r, &format!("L{l}_{p}_absmean")) > 0.0);
                }
                assert!(num(r, &format!("L{l}_absmean_scale")) > 0.0);
            }
        }
        assert!(num(r, "loss") > 0.0 && num(r, "loss") < 20.0);
        assert_eq!(r["update_applied"], true);
    }
    // A loss spike is flagged exactly where the loss exceeds spike_factor x the mean of the
    // previous spike_window losses (here recomputed from the log).
    let losses: Vec<f64> = scalars.iter().map(|r| num(r, "loss")).collect();
    let window = c.instrumentation.anomaly.spike_window;
    let mut spikes = Vec::new();
    for (i, r) in scalars.iter().enumerate() {
        let ma = (i >= window).then(|| losses[i - window..i].iter().sum::<f64>() / window as f64);
        let spike = ma.is_some_and(|ma| losses[i] > c.instrumentation.anomaly.spike_factor * ma);
        let flag = r.get("anomaly_flag").and_then(|f| f.as_str());
        assert_eq!(flag, spike.then_some("loss_spike"), "step {}", i + 1);
        if spike {
            spikes.push(i as u64 + 1);
        }
    }

    // eval/eval_results.jsonl at 0, 8, 16, 24 over all 12 eval sequences.
    let evals = jsonl(&run_dir.join("eval/eval_results.jsonl"));
    assert_eq!(
        evals
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 8, 16, 24]
    );
    for r in &evals {
        has_keys(
            r,
            &[
                "step",
                "eval_loss",
                "train_loss",
                "train_eval_gap",
                "eval_ppl",
                "bits_per_byte",
                "eval_seconds",
            ],
            "eval",
        );
        let l = num(r, "eval_loss");
        assert!(l > 0.0 && l < 20.0);
        assert!((num(r, "eval_ppl") - l.exp()).abs() < 1e-6 * l.exp());
        assert!((num(r, "bits_per_byte") - l / std::f64::consts::LN_2 / 4.0).abs() < 1e-9);
        assert_eq!(r["eval_sequences"], 12);
        assert_eq!(r["eval_predicted_tokens"], 12 * 63);
        if r["step"] == 0 {
            assert!(r["train_loss"].is_null());
            // Untrained, near-uniform over 32,000 tokens.
            assert!((l - 32_000f64.ln()).abs() < 0.5, "{l}");
        } else {
            let gap = num(r, "train_eval_gap");
            assert!((num(r, "train_loss") - l - gap).abs() < 1e-9);
        }
    }
    // The same eval through `trainer eval` on the step-24 checkpoint.
    let ckpt = run_dir.join("checkpoints/step_000024");
    let rec = commands::eval_checkpoint(&ckpt, &shards, DeviceChoice::Cpu, None, None).unwrap();
    assert_eq!(rec.step, 24);
    assert!(
        (rec.eval_loss - num(&evals[3], "eval_loss")).abs() < 1e-6,
        "{} vs {}",
        rec.eval_loss,
        evals[3]["eval_loss"]
    );

    // samples/samples.jsonl: 5 prompts x 3 modes at steps 0, 12, 24.
    let samples = jsonl(&run_dir.join("samples/samples.jsonl"));
    assert_eq!(samples.len(), 3 * 15);
    for (round, step) in [0u64, 12, 24].into_iter().enumerate() {
        let recs = &samples[round * 15..(round + 1) * 15];
        let keys: BTreeSet<(String, String)> = recs
            .iter()
            .map(|r| {
                assert_eq!(r["step"].as_u64(), Some(step));
                (
                    r["prompt"].as_str().unwrap().to_owned(),
                    r["mode"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(keys.len(), 15);
    }
    for r in &samples {
        has_keys(
            r,
            &[
                "step",
                "prompt",
                "mode",
                "seed",
                "generated_text",
                "generated_ids",
                "mean_entropy",
                "max_repetition",
                "unique_tokens",
                "total_tokens",
                "logits_first_10",
            ],
            "sample",
        );
        let ids = r["generated_ids"].as_array().unwrap();
        assert_eq!(ids[0], 1, "starts with <s>");
        assert_eq!(r["total_tokens"].as_u64().unwrap() as usize, ids.len());
        assert!(
            r["max_repetition"].as_u64().unwrap() >= 1 && r["unique_tokens"].as_u64().unwrap() >= 1
        );
        assert!(num(r, "mean_entropy") > 0.0 && num(r, "mean_entropy") <= 32_000f64.ln() + 1e-9);
        let first = &r["logits_first_10"].as_array().unwrap()[0];
        has_keys(
            first,
            &["pos", "entropy", "top5_tokens", "top5_probs"],
            "logits_first_10",
        );
        let p: Vec<f64> = first["top5_probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]) && p.len() == 5);
    }
    // Seeds are per (prompt, step, mode): greedy is reproducible, seeds differ across steps.
    let s0: Vec<u64> = samples[..15]
        .iter()
        .map(|r| r["seed"].as_u64().unwrap())
        .collect();
    let s1: Vec<u64> = samples[15..30]
        .iter()
        .map(|r| r["seed"].as_u64().unwrap())
        .collect();
    assert_ne!(s0, s1);
    assert_eq!(s0.iter().collect::<BTreeSet<_>>().len(), 15);
    let sampled = commands::sample_checkpoint(
        &commands::SampleOptions {
            checkpoint: ckpt.clone(),
            shards: shards.clone(),
            prompt: "The quick brown fox".into(),
            mode: trainer::instrument::sample::Mode::Greedy,
            max_new_tokens: 12,
            seed: None,
        },
        DeviceChoice::Cpu,
    )
    .unwrap();
    let logged = samples[30..]
        .iter()
        .find(|r| r["prompt"] == "The quick brown fox" && r["mode"] == "greedy")
        .unwrap();
    assert_eq!(
        serde_json::to_value(&sampled.generated_ids).unwrap(),
        logged["generated_ids"],
        "`trainer sample` reproduces the run's greedy sample"
    );

    // anomalies/: one dump per event, each complete: the spikes, and both round triggers at
    // every sampling round (steps 0, 12, 24).
    let anomalies = run_dir.join("anomalies");
    let mut dumps: Vec<String> = std::fs::read_dir(&anomalies)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dumps.sort();
    let mut expected: Vec<String> = spikes
        .iter()
        .map(|s| format!("step_{s:06}_loss_spike"))
        .collect();
    for s in [0, 12, 24] {
        expected.push(format!("step_{s:06}_entropy_collapse"));
        expected.push(format!("step_{s:06}_repetition_surge"));
    }
    expected.sort();
    assert_eq!(dumps, expected);
    for d in &dumps {
        let dir = anomalies.join(d);
        let ev = json(&dir.join("event.json"));
        let step = ev["step"].as_u64().unwrap();
        assert!(d.starts_with(&format!("step_{step:06}_")), "{d}: {ev}");
        let t = json(&dir.join("prompt_The_quick_brown_fox_top20.json"));
        assert_eq!(t["tokens"].as_array().unwrap().len(), 20);
        assert!(num(&t, "entropy") > 0.0);
        let files = |suffix: &str| {
            std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(suffix)
                })
                .count()
        };
        assert_eq!(files("_top20.json"), 5, "{d}");
        for l in 0..2 {
            assert!(dir.join(format!("L{l}_quant_dist.png")).exists(), "{d}");
        }
        if step == 0 {
            // The initial weights' round has no training batch to recompute activations on.
            assert!(!dir.join("batch_indices.json").exists(), "{d}");
            continue;
        }
        for l in 0..2 {
            for f in [
                format!("L{l}_attn_activations.png"),
                format!("L{l}_ffn_activations.png"),
                format!("L{l}_qkv_quant_dist.png"),
                format!("L{l}_quant_dist.png"),
            ] {
                assert!(
                    std::fs::metadata(dir.join(&f))
                        .map(|m| m.len() > 1000)
                        .unwrap_or(false),
                    "{d}/{f}"
                );
            }
        }
        let g = json(&dir.join("grad_norms.json"));
        assert_eq!(
            g.as_object().unwrap().len(),
            trainer::model::parameter_shapes(&c.model).len()
        );
        assert!(num(&g, "token_embeddings.weight") > 0.0);
        // The dump names the batch of its step, as scalars.jsonl and `data-order` do.
        let b = json(&dir.join("batch_indices.json"));
        assert_eq!(b["step"], step);
        assert_eq!(b["sequence_indices"].as_array().unwrap().len(), 4);
        assert_eq!(
            b["batch_sha256"],
            scalars[step as usize - 1]["batch_sha256"]
        );
        assert!(
            json(&dir.join("activation_stats.json"))["L1_ffn"]["count"]
                .as_u64()
                .unwrap()
                == 4 * 64 * 32
        );
    }

    // Checkpoints: the contract's schedule (0, every 8, the boundary pair, the end) after the ring
    // retention (last 2 + multiples of 16 + the pair).
    let sched = checkpoint_schedule(&c);
    assert_eq!(sched.all_steps(), vec![0, 8, 11, 12, 16, 24]);
    let kept: Vec<u64> = retention::retained(
        &sched.all_steps(),
        &c.instrumentation.retention,
        Some(BOUNDARY),
    )
    .into_iter()
    .collect();
    assert_eq!(kept, vec![0, 11, 12, 16, 24]);
    let on_disk: Vec<u64> = retention::list_checkpoints(&run_dir.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(on_disk, kept);

    // trainer report
    let out = commands::report_run(&run_dir).unwrap();
    assert_eq!(out.dir, run_dir.join("report"));
    assert_eq!(out.plots.len(), 7);
    for p in &out.plots {
        let bytes = std::fs::read(p).unwrap();
        assert!(
            bytes.len() > 5000 && &bytes[1..4] == b"PNG",
            "{}",
            p.display()
        );
    }
    let md = std::fs::read_to_string(run_dir.join("report/summary.md")).unwrap();
    assert!(
        md.contains("| last step | 24 |") && md.contains("step 12: entropy_collapse"),
        "{md}"
    );
    // E2E_KEEP_RUN=1 keeps the folder for looking at the plots.
    if std::env::var_os("E2E_KEEP_RUN").is_some() {
        eprintln!("kept {}", tmp.keep().display());
    }
}

#[test]
fn a_diverging_run_stops_after_consecutive_nonfinite_steps_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shards(tmp.path());
    let mut c = config(TOTAL_STEPS, 1e30);
    c.instrumentation.eval_every = 1000;
    c.instrumentation.sample_every = 1000;
    let err = run(tmp.path(), &shards, &c).expect_err("the run must stop");
    let msg = format!("{err:#}");
    assert!(msg.contains("3 consecutive steps with a NaN/Inf"), "{msg}");
    let run_dir = std::fs::read_dir(tmp.path().join("runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let scalars = jsonl(&run_dir.join("metrics/scalars.jsonl"));
    let last = scalars.last().unwrap()["step"].as_u64().unwrap();
    assert!(last < TOTAL_STEPS, "stopped early at {last}");
    let tail = &scalars[scalars.len() - 3..];
    for r in tail {
        assert_eq!(r["update_applied"], false, "{r}");
        assert!(r["anomaly_flag"].as_str().unwrap().starts_with("nan_inf"));
    }
    let ckpts: Vec<u64> = retention::list_checkpoints(&run_dir.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(ckpts.last(), Some(&last), "final checkpoint at the stop");
    assert!(run_dir.join("anomalies").read_dir().unwrap().count() >= 1);
}

#[test]
fn a_resumed_run_continues_the_same_files_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shards(tmp.path());
    let c = config(TOTAL_STEPS, 3e-3);
    let cfg_path = tmp.path().join("config.toml");
    std::fs::write(&cfg_path, c.to_toml_string()).unwrap();
    let mut opts = RunOptions {
        shards: shards.clone(),
        config: Some(cfg_path),
        run_dir: tmp.path().join("runs"),
        steps: Some(10),
        resume: None,
        device: DeviceChoice::Cpu,
        verify_data: false,
    };
    let first = train::run(&opts).unwrap();
    // Pretend the crash lost the last logged line's newline and a later eval line existed.
    let scalars_path = first.run_dir.join("metrics/scalars.jsonl");
    let mut text = std::fs::read_to_string(&scalars_path).unwrap();
    text.push_str("{\"step\": 11, \"loss\"");
    std::fs::write(&scalars_path, text).unwrap();
    opts.steps = None;
    opts.config = None;
    opts.resume = Some(Resume::Checkpoint(
        first.run_dir.join("checkpoints/step_000010"),
    ));
    let second = train::run(&opts).unwrap();
    assert_eq!(first.run_dir, second.run_dir);
    let run_dir = second.run_dir;
    let steps = |file: &str| -> Vec<u64> {
        jsonl(&run_dir.join(file))
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        steps("metrics/scalars.jsonl"),
        (1..=TOTAL_STEPS).collect::<Vec<_>>()
    );
    assert_eq!(steps("eval/eval_results.jsonl"), vec![0, 8, 16, 24]);
    let s = steps("samples/samples.jsonl");
    assert_eq!(s.len(), 45);
    assert_eq!(s.iter().filter(|&&x| x == 0).count(), 15);
    assert!(
        run_dir
            .join("meta/provenance_resume_step_000010.json")
            .is_file()
    );
    // The eval after the resume sees the train-loss average of the steps before it too.
    let evals = jsonl(&run_dir.join("eval/eval_results.jsonl"));
    assert!(evals[2]["train_loss"].is_number());
}
