//! Trainer end to end on synthetic shards written in the real format: resume exactness, the loss
//! falling, the data order through the shards, and refusals of bad input. CPU only; a tiny model
//! keeps each test at seconds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use pipeline::format::{Manifest, Split};
use trainer::checkpoint;
use trainer::config::{Config, Knot};
use trainer::data::{DataOrder, TrainData};
use trainer::synthetic::{Pattern, SyntheticSpec, write_dataset};
use trainer::train::{
    self, DeviceChoice, Hooks, NoHooks, Resume, RunContext, RunOptions, StepRecord,
};

const TOKENIZER_SHA: &str = "bcd04f0eadf90287bd26e1a183ac487d8a141b09b06aecb7725bbdd343640f2e";

/// A model small enough for hundreds of CPU steps in seconds, in the same family as the plan's.
fn tiny_config(seq_len: usize, batch: usize, total_steps: u64) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    let mut c = Config::load(&path).expect("configs/tiny.toml loads");
    c.model.vocab_size = 64;
    c.model.hidden_size = 32;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.ffn_hidden_size = 64;
    c.model.max_seq_length = seq_len;
    c.training.seq_len = seq_len;
    c.training.batch_size = batch;
    c.training.total_steps = total_steps;
    c.training.peak_lr = 1e-2;
    c.training.warmup_steps = 10;
    c.training.lr_knots = vec![
        Knot {
            step: 0,
            value: 0.0,
        },
        Knot {
            step: 10,
            value: 1e-2,
        },
        Knot {
            step: total_steps.max(20),
            value: 1e-3,
        },
    ];
    c.training.wd_knots = vec![
        Knot {
            step: 0,
            value: 0.1,
        },
        Knot {
            step: total_steps.max(20) / 2,
            value: 0.0,
        },
    ];
    c.instrumentation.checkpoint_every = 0;
    c.validate().expect("test config is valid");
    c
}

fn write_config(dir: &Path, c: &Config) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, c.to_toml_string()).unwrap();
    path
}

fn shards(dir: &Path, seq_len: u32, train: u64, pattern: Pattern) -> PathBuf {
    let out = dir.join("shards");
    write_dataset(
        &out,
        &SyntheticSpec {
            seq_len,
            vocab_size: 64,
            train_sequences: train,
            eval_sequences: 8,
            sequences_per_shard: 50,
            tokenizer_sha256: TOKENIZER_SHA.into(),
            pattern,
        },
    )
    .unwrap();
    out
}

fn opts(shards: &Path, config: &Path, runs: &Path, steps: Option<u64>) -> RunOptions {
    RunOptions {
        shards: shards.to_owned(),
        config: Some(config.to_owned()),
        run_dir: runs.to_owned(),
        steps,
        resume: None,
        device: DeviceChoice::Cpu,
        verify_data: false,
    }
}

/// Records every step's record and batch indices.
#[derive(Default)]
struct Recorder {
    steps: Vec<(StepRecord, Vec<u64>)>,
}

impl Hooks for Recorder {
    fn after_step(
        &mut self,
        _ctx: &RunContext,
        rec: &StepRecord,
        _model: &trainer::model::BitNet,
        batch: &trainer::data::Batch,
    ) -> train::HookResult {
        self.steps.push((rec.clone(), batch.indices.clone()));
        Ok(())
    }
}

/// The raw bytes of a checkpoint's model.safetensors (equal bytes: bit-identical weights).
fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap()
}

#[test]
fn resume_reproduces_the_uninterrupted_run_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(16, 4, 20);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 16, 200, Pattern::Learnable);

    let mut full = Recorder::default();
    let a = train::run(
        &opts(&data, &config, &tmp.path().join("a"), None),
        &mut full,
    )
    .unwrap();
    assert_eq!((a.start_step, a.final_step), (0, 20));

    let runs_b = tmp.path().join("b");
    let mut first = Recorder::default();
    let b1 = train::run(&opts(&data, &config, &runs_b, Some(10)), &mut first).unwrap();
    assert_eq!(b1.final_step, 10);
    assert!(b1.last_checkpoint.ends_with("checkpoints/step_000010"));
    let mut second = Recorder::default();
    let mut resume = opts(&data, &config, &runs_b, Some(20));
    resume.config = None;
    resume.resume = Some(Resume::Latest);
    let b2 = train::run(&resume, &mut second).unwrap();
    assert_eq!((b2.start_step, b2.final_step), (10, 20));
    assert_eq!(
        b2.run_dir, b1.run_dir,
        "resume continues in the same run folder"
    );

    let losses_a: Vec<u64> = full.steps.iter().map(|(r, _)| r.loss.to_bits()).collect();
    let losses_b: Vec<u64> = first
        .steps
        .iter()
        .chain(&second.steps)
        .map(|(r, _)| r.loss.to_bits())
        .collect();
    assert_eq!(losses_a, losses_b, "per-step losses differ");
    let order_a: Vec<&Vec<u64>> = full.steps.iter().map(|(_, i)| i).collect();
    let order_b: Vec<&Vec<u64>> = first
        .steps
        .iter()
        .chain(&second.steps)
        .map(|(_, i)| i)
        .collect();
    assert_eq!(order_a, order_b, "resume changed the data order");
    assert_eq!(
        weights(&a.last_checkpoint),
        weights(&b2.last_checkpoint),
        "final weights differ"
    );
    // The moments too, so a second resume would also be exact.
    let opt = |d: &Path| std::fs::read(d.join(checkpoint::OPTIMIZER_FILE)).unwrap();
    assert_eq!(opt(&a.last_checkpoint), opt(&b2.last_checkpoint));

    // Checkpoint layout: step_000000 (initial weights), the last step before the stage change
    // (the wd knot at 10), the stage change = the --steps stop, the end; no temp folders.
    let names: Vec<String> = std::fs::read_dir(b1.run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        ["step_000000", "step_000009", "step_000010", "step_000020"]
    );
    let state = checkpoint::load_state(&b2.last_checkpoint).unwrap();
    assert_eq!(state.step, 20);
    assert_eq!(state.tokens_seen, 20 * 4 * 16);
    assert_eq!(state.config, cfg);
    assert_eq!(state.loss.map(f64::to_bits), losses_a.last().copied());
}

#[test]
fn loss_falls_on_learnable_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 150;
    let cfg = tiny_config(32, 8, steps);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 32, steps * 8, Pattern::Learnable);
    let mut rec = Recorder::default();
    train::run(
        &opts(&data, &config, &tmp.path().join("runs"), None),
        &mut rec,
    )
    .unwrap();
    let losses: Vec<f64> = rec.steps.iter().map(|(r, _)| r.loss).collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (start, end) = (mean(&losses[..10]), mean(&losses[losses.len() - 10..]));
    // ln(64) = 4.16 at the start; the next token is a function of the current one.
    assert!(start > 3.8, "initial loss {start}");
    assert!(
        end < 0.5 * start,
        "loss went from {start:.3} to only {end:.3}: {losses:?}"
    );
    assert!(
        rec.steps
            .iter()
            .all(|(r, _)| r.grad_norm.is_finite() && r.grad_norm > 0.0)
    );
}

#[test]
fn data_order_reads_the_permuted_sequences_without_repetition() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 16, 230, Pattern::Position);
    let manifest = Manifest::load(&data).unwrap();
    let train = TrainData::open(&manifest, &data).unwrap();
    let order = DataOrder::new(42, train.num_sequences());
    let batch = 10;
    let mut seen = HashSet::new();
    for step in 0..23 {
        let idx = order.batch(step, batch);
        assert_eq!(
            idx,
            DataOrder::new(42, 230).batch(step, batch),
            "same (seed, step), same batch"
        );
        let tokens = train.load(&idx);
        for (row, &i) in tokens.chunks_exact(16).zip(&idx) {
            // Position pattern: the sequence's tokens say which sequence was read (across shards).
            let expect: Vec<u32> = (0..16).map(|p| ((i * 16 + p) % 64) as u32).collect();
            assert_eq!(row, expect.as_slice(), "sequence {i}");
            assert!(seen.insert(i), "sequence {i} used twice (step {step})");
        }
    }
    assert_eq!(
        seen.len(),
        230,
        "23 steps of 10 cover all 230 sequences exactly once"
    );
}

#[test]
fn refuses_a_run_needing_more_sequences_than_the_shards_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(16, 4, 100);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 16, 30, Pattern::Position);
    let runs = tmp.path().join("runs");
    let err = train::run(&opts(&data, &config, &runs, Some(8)), &mut NoHooks).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("needs 32 train sequences") && msg.contains("hold 30"),
        "{msg}"
    );
    assert!(msg.contains("pipeline prepare --tokens 512"), "{msg}");
    assert!(!runs.exists(), "a refused run leaves no run folder");
    // 7 steps fit (28 sequences): the run starts (and only warns about total_steps).
    train::run(&opts(&data, &config, &runs, Some(7)), &mut NoHooks).unwrap();
}

#[test]
fn refuses_shards_of_another_tokenizer_or_seq_len_and_truncated_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let data = shards(tmp.path(), 16, 60, Pattern::Position);

    let mut other_tok = tiny_config(16, 4, 10);
    other_tok.data.tokenizer_sha256 = "ab".repeat(32);
    let config = write_config(tmp.path(), &other_tok);
    let msg = format!(
        "{:#}",
        train::run(&opts(&data, &config, &runs, None), &mut NoHooks).unwrap_err()
    );
    assert!(
        msg.contains("tokenizer sha256") && msg.contains(&"ab".repeat(32)),
        "{msg}"
    );

    let other_len = tiny_config(32, 4, 10);
    let config = write_config(tmp.path(), &other_len);
    let msg = format!(
        "{:#}",
        train::run(&opts(&data, &config, &runs, None), &mut NoHooks).unwrap_err()
    );
    assert!(
        msg.contains("seq_len is 16 in the shards but 32 in the config"),
        "{msg}"
    );

    let ok = tiny_config(16, 4, 10);
    let config = write_config(tmp.path(), &ok);
    let shard = data.join(Split::Train.shard_file_name(1));
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 7]).unwrap();
    let msg = format!(
        "{:#}",
        train::run(&opts(&data, &config, &runs, None), &mut NoHooks).unwrap_err()
    );
    assert!(
        msg.contains("train-00001.bin") && msg.contains("truncated"),
        "{msg}"
    );

    // A flipped payload byte passes the cheap checks and is caught by --verify-data.
    let mut damaged = bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    std::fs::write(&shard, &damaged).unwrap();
    let mut verify = opts(&data, &config, &runs, Some(1));
    verify.verify_data = true;
    let msg = format!("{:#}", train::run(&verify, &mut NoHooks).unwrap_err());
    assert!(
        msg.contains("train-00001.bin") && msg.contains("payload sha256"),
        "{msg}"
    );
    assert!(!runs.exists());
}

#[test]
fn refuses_a_config_with_hidden_size_not_divisible_by_num_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("hidden_size = 64", "hidden_size = 66");
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, text).unwrap();
    let data = shards(tmp.path(), 16, 10, Pattern::Position);
    let err = train::run(
        &opts(&data, &config, &tmp.path().join("runs"), None),
        &mut NoHooks,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model.hidden_size") && msg.contains("66") && msg.contains("num_heads"),
        "{msg}"
    );
}

/// Stops through `RunContext::request_stop` (the path Ctrl-C takes) after the step it was asked in.
struct StopAfter(u64);

impl Hooks for StopAfter {
    fn after_step(
        &mut self,
        ctx: &RunContext,
        rec: &StepRecord,
        _model: &trainer::model::BitNet,
        _batch: &trainer::data::Batch,
    ) -> train::HookResult {
        if rec.step + 1 == self.0 {
            ctx.request_stop();
        }
        Ok(())
    }
}

#[test]
fn a_stop_request_finishes_the_step_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(16, 4, 20);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 16, 100, Pattern::Position);
    let s = train::run(
        &opts(&data, &config, &tmp.path().join("runs"), None),
        &mut StopAfter(3),
    )
    .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.final_step, 3);
    assert!(s.last_checkpoint.ends_with("checkpoints/step_000003"));
    assert_eq!(checkpoint::load_state(&s.last_checkpoint).unwrap().step, 3);
    assert_eq!(
        trainer::run_dir::latest_checkpoint(&tmp.path().join("runs")).unwrap(),
        s.last_checkpoint
    );
}
