//! Trainer end to end on synthetic shards written in the real format: resume exactness, the loss
//! falling, the data order through the shards, and refusals of bad input. CPU only; a tiny model
//! keeps each test at seconds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use pipeline::format::{Manifest, Split};
use trainer::checkpoint;
use trainer::config::{Config, Knot};
use trainer::data::{DataOrder, SplitData};
use trainer::setup::{DeviceChoice, Resume, RunOptions};
use trainer::synthetic::{Pattern, SyntheticSpec, write_dataset};
use trainer::train;

const TOKENIZER_SHA: &str = "bcd04f0eadf90287bd26e1a183ac487d8a141b09b06aecb7725bbdd343640f2e";

/// A model small enough for hundreds of CPU steps in seconds, in the same family as the
/// 95M model of configs/bitnet-95m.toml.
pub(crate) fn tiny_config(seq_len: usize, batch: usize, total_steps: u64) -> Config {
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

pub(crate) fn write_config(dir: &Path, c: &Config) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, c.to_toml_string()).unwrap();
    path
}

pub(crate) fn shards(dir: &Path, seq_len: u32, train: u64, pattern: Pattern) -> PathBuf {
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

pub(crate) fn opts(shards: &Path, config: &Path, runs: &Path, steps: Option<u64>) -> RunOptions {
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

/// Each step's loss (as written, so equal text is equal bits) and batch hash, from a run's
/// metrics/scalars.jsonl.
pub(crate) fn logged_steps(run_dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(run_dir.join("metrics/scalars.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let loss = line
                .split_once("\"loss\":")
                .and_then(|(_, rest)| rest.split(',').next())
                .expect("a loss field")
                .to_string();
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (loss, v["batch_sha256"].as_str().unwrap().to_string())
        })
        .collect()
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

    let a = train::run(&opts(&data, &config, &tmp.path().join("a"), None)).unwrap();
    assert_eq!((a.start_step, a.final_step), (0, 20));

    let runs_b = tmp.path().join("b");
    let b1 = train::run(&opts(&data, &config, &runs_b, Some(10))).unwrap();
    assert_eq!(b1.final_step, 10);
    assert!(b1.last_checkpoint.ends_with("checkpoints/step_000010"));
    let mut resume = opts(&data, &config, &runs_b, Some(20));
    resume.config = None;
    resume.resume = Some(Resume::Latest);
    let b2 = train::run(&resume).unwrap();
    assert_eq!((b2.start_step, b2.final_step), (10, 20));
    assert_eq!(
        b2.run_dir, b1.run_dir,
        "resume continues in the same run folder"
    );

    // The resumed run rewrites the log of steps 11..=20 into the same file: every step's loss
    // and batch equal the uninterrupted run's.
    let full = logged_steps(&a.run_dir);
    assert_eq!(full.len(), 20);
    assert_eq!(
        full,
        logged_steps(&b2.run_dir),
        "per-step losses or batches differ"
    );
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
    assert_eq!(state.loss.map(|l| l.to_string()), Some(full[19].0.clone()));
}

#[test]
fn loss_falls_on_learnable_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 150;
    let cfg = tiny_config(32, 8, steps);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 32, steps * 8, Pattern::Learnable);
    let s = train::run(&opts(&data, &config, &tmp.path().join("runs"), None)).unwrap();
    let scalars: Vec<serde_json::Value> =
        std::fs::read_to_string(s.run_dir.join("metrics/scalars.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let losses: Vec<f64> = scalars
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (start, end) = (mean(&losses[..10]), mean(&losses[losses.len() - 10..]));
    // ln(64) = 4.16 at the start; the next token is a function of the current one.
    assert!(start > 3.8, "initial loss {start}");
    assert!(
        end < 0.5 * start,
        "loss went from {start:.3} to only {end:.3}: {losses:?}"
    );
    assert!(
        scalars
            .iter()
            .all(|r| r["grad_norm"].as_f64().is_some_and(|g| g > 0.0))
    );
}

#[test]
fn data_order_reads_the_permuted_sequences_without_repetition() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 16, 230, Pattern::Position);
    let manifest = Manifest::load(&data).unwrap();
    let train = SplitData::open(&manifest, &data, Split::Train).unwrap();
    let order = DataOrder::new(42, train.num_sequences());
    let batch = 10;
    let mut seen = HashSet::new();
    for step in 1..=23 {
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
    let err = train::run(&opts(&data, &config, &runs, Some(8))).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("needs 32 train sequences") && msg.contains("hold 30"),
        "{msg}"
    );
    assert!(msg.contains("pipeline prepare --tokens 512"), "{msg}");
    assert!(!runs.exists(), "a refused run leaves no run folder");
    // 7 steps fit (28 sequences): the run starts (and only warns about total_steps).
    train::run(&opts(&data, &config, &runs, Some(7))).unwrap();
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
        train::run(&opts(&data, &config, &runs, None)).unwrap_err()
    );
    assert!(
        msg.contains("tokenizer sha256") && msg.contains(&"ab".repeat(32)),
        "{msg}"
    );

    let other_len = tiny_config(32, 4, 10);
    let config = write_config(tmp.path(), &other_len);
    let msg = format!(
        "{:#}",
        train::run(&opts(&data, &config, &runs, None)).unwrap_err()
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
        train::run(&opts(&data, &config, &runs, None)).unwrap_err()
    );
    assert!(
        msg.contains("train-00001.bin") && msg.contains("truncated"),
        "{msg}"
    );

    // A flipped payload byte passes the cheap checks; the default background re-hash catches it
    // and stops the run before it saves weights trained past step 0.
    let mut damaged = bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    std::fs::write(&shard, &damaged).unwrap();
    let mut verify = opts(&data, &config, &runs, Some(3));
    verify.verify_data = true;
    let msg = format!("{:#}", train::run(&verify).unwrap_err());
    assert!(
        msg.contains("train-00001.bin: payload sha256")
            && msg.contains("the run stopped before writing a checkpoint")
            && msg.contains(&format!(
                "hint: delete {}",
                data.join("manifest.json").display()
            ))
            && msg.contains("--no-verify-data"),
        "{msg}"
    );
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let saved: Vec<u64> = checkpoint::list_complete(&run.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(saved, [0], "only the initial weights were saved");

    // --no-verify-data trains on the damaged shards.
    let summary = train::run(&opts(&data, &config, &runs, Some(3))).unwrap();
    assert_eq!(summary.final_step, 3);
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
    let err = train::run(&opts(&data, &config, &tmp.path().join("runs"), None)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model.hidden_size") && msg.contains("66") && msg.contains("num_heads"),
        "{msg}"
    );
}

/// Ctrl-C on a real `trainer run`: the step in flight finishes, a checkpoint of it is written, the
/// process exits cleanly, and `--resume latest` finds that checkpoint.
#[test]
fn ctrl_c_finishes_the_step_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(16, 4, 5000);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 16, 20_000, Pattern::Position);
    let runs = tmp.path().join("runs");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_trainer-e2e"))
        .args(["run", "--device", "cpu", "--shards"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--run-dir")
        .arg(&runs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt once a few steps are logged.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let logged = |runs: &Path| -> usize {
        std::fs::read_dir(runs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|run| {
                std::fs::read_to_string(run.path().join("metrics/scalars.jsonl"))
                    .map_or(0, |t| t.lines().count())
            })
            .sum()
    };
    while logged(&runs) < 3 {
        assert!(std::time::Instant::now() < deadline, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let last = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let state = checkpoint::load_state(&last).unwrap();
    assert!(
        state.step >= 3 && state.step < 5000,
        "stopped at {}",
        state.step
    );
    assert!(last.ends_with(checkpoint::folder_name(state.step)));
    let run_dir = last.parent().unwrap().parent().unwrap();
    assert_eq!(
        logged_steps(run_dir).len() as u64,
        state.step,
        "one logged line per finished step"
    );
    assert_eq!(trainer::run_dir::latest_checkpoint(&runs).unwrap(), last);
}

/// `trainer data-order --steps N` names the batch that step N of scalars.jsonl trained on, so a
/// run's data order can be checked from its log alone; step 0 (the initial weights) has none.
#[test]
fn data_order_prints_the_batches_the_log_records() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(16, 4, 20);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 16, 100, Pattern::Position);
    let s = train::run(&opts(&data, &config, &tmp.path().join("runs"), Some(3))).unwrap();
    let logged: Vec<String> = logged_steps(&s.run_dir)
        .into_iter()
        .map(|(_, sha)| sha)
        .collect();
    let data_order = |steps: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trainer-e2e"))
            .args(["data-order", "--steps", steps, "--shards"])
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = data_order("1..4");
    assert!(out.status.success(), "{out:?}");
    let printed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            assert_eq!(w.next(), Some("step"), "{l}");
            w.next().unwrap();
            assert_eq!(w.next(), Some("sha256"), "{l}");
            w.next().unwrap().to_string()
        })
        .collect();
    assert_eq!(printed, logged);
    let out = data_order("0");
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("step 0 is the initial weights") && err.contains("hint:"),
        "{err}"
    );
}

/// Lines of metrics/scalars.jsonl written so far by the runs under `runs`.
fn logged_lines(runs: &Path) -> usize {
    std::fs::read_dir(runs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|run| {
            std::fs::read_to_string(run.path().join("metrics/scalars.jsonl"))
                .map_or(0, |t| t.lines().count())
        })
        .sum()
}

/// `trainer run` as a child process with these arguments (after `run --device cpu`).
fn trainer_cmd(args: &[&std::ffi::OsStr]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_trainer-e2e"));
    c.args(["run", "--device", "cpu"]).args(args);
    c
}

/// One process per run folder: a second `trainer run --resume latest` on a run that is training
/// (a requeued job, a second terminal) fails at once, naming the first; once the first is killed
/// with SIGKILL, its lock never blocks: the resume takes the folder over.
#[test]
fn a_second_run_on_a_busy_run_folder_fails_at_once_and_a_killed_holder_never_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &tiny_config(16, 4, 5000));
    let data = shards(tmp.path(), 16, 20_000, Pattern::Position);
    let runs = tmp.path().join("runs");
    let (d, c, r) = (data.as_os_str(), config.as_os_str(), runs.as_os_str());
    let mut first = trainer_cmd(&[
        "--shards".as_ref(),
        d,
        "--config".as_ref(),
        c,
        "--run-dir".as_ref(),
        r,
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while logged_lines(&runs) < 2 {
        assert!(std::time::Instant::now() < deadline, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let resume = |extra: &[&std::ffi::OsStr]| {
        let mut args = vec![
            "--shards".as_ref(),
            d,
            "--run-dir".as_ref(),
            r,
            "--resume".as_ref(),
            "latest".as_ref(),
        ];
        args.extend_from_slice(extra);
        trainer_cmd(&args).env("RUST_LOG", "warn").output().unwrap()
    };
    let started = std::time::Instant::now();
    let second = resume(&[]);
    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(!second.status.success(), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "it waited"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("another process is writing to this folder")
            && line.contains(&format!("(pid {} on host ", first.id()))
            && line.contains(", started 20")
            && line.contains(
                "hint: wait for it to finish or stop it, then resume with --resume latest"
            ),
        "{line}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the refused run disturbed the first"
    );

    // kill -9: no clean-up runs, the kernel drops the lock with the process.
    first.kill().unwrap();
    first.wait().unwrap();
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let left = std::fs::read_to_string(run.join(".lock")).unwrap();
    assert!(left.starts_with("pid "), "{left}");
    let third = resume(&["--steps".as_ref(), "2".as_ref()]);
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    let last = PathBuf::from(String::from_utf8(third.stdout).unwrap().trim());
    assert_eq!(
        last,
        run.join("checkpoints").join(checkpoint::folder_name(2))
    );
    assert_eq!(std::fs::read_to_string(run.join(".lock")).unwrap(), "");
}

/// Whether this machine lets an unprivileged user mount a tmpfs in a user namespace (`unshare
/// -rm`): then the full-disk test fills a real filesystem.
fn user_tmpfs_available(dir: &Path) -> bool {
    std::process::Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs \"$1\"",
            "sh",
        ])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A checkpoint that does not fit: the run warns at start with the numbers, stops with one line
/// naming the OS error once, the space a checkpoint needs and where, and leaves no partial
/// `.step_NNNNNN.tmp` folder holding the space that was missing. A real full disk (ENOSPC, a
/// small tmpfs in a user namespace) where the machine allows it, else the file-size limit
/// (RLIMIT_FSIZE with SIGXFSZ ignored: EFBIG), which goes through the same path.
#[test]
fn a_checkpoint_on_a_full_disk_removes_its_partial_folder_and_says_what_it_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(16, 4, 20);
    let config = write_config(tmp.path(), &cfg);
    let data = shards(tmp.path(), 16, 200, Pattern::Position);
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let needed = checkpoint::bytes_needed(&cfg.model);
    // Room for the run folder but not for one checkpoint's model file.
    let limit_kib = (needed / 3 / 2 / 1024).max(8);
    let trainer_args = [
        "run",
        "--device",
        "cpu",
        "--shards",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--run-dir",
        runs.to_str().unwrap(),
        "--steps",
        "2",
    ];
    let tmpfs = user_tmpfs_available(&runs);
    let out = if tmpfs {
        // Mounted in the namespace only: the listing of what is left is taken there.
        let script = "mount -t tmpfs -o size=$1 tmpfs \"$2\" || exit 97; runs=$2; shift 2; \"$@\"; rc=$?; find \"$runs\" -name '*.tmp' -o -name 'step_*'; exit $rc";
        std::process::Command::new("unshare")
            .args(["-rm", "sh", "-c", script, "sh", &format!("{limit_kib}k")])
            .arg(&runs)
            .arg(env!("CARGO_BIN_EXE_trainer-e2e"))
            .args(trainer_args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    } else {
        eprintln!(
            "no user namespaces here: filling the file-size limit (EFBIG) instead of a tmpfs"
        );
        let script = "trap '' XFSZ; ulimit -f $1; shift; exec \"$@\"";
        std::process::Command::new("sh")
            .args(["-c", script, "sh", &limit_kib.to_string()])
            .arg(env!("CARGO_BIN_EXE_trainer-e2e"))
            .args(trainer_args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert_ne!(out.status.code(), Some(97), "mount failed: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    let line = errors[0];
    let os_error = if tmpfs {
        "(os error 28)"
    } else {
        "(os error 27)"
    };
    assert_eq!(line.matches("(os error").count(), 1, "{line}");
    assert!(
        line.contains(os_error)
            && line.contains(".step_000000.tmp/model.safetensors")
            && line.contains(&format!(
                "a checkpoint needs about {} in {}/",
                pipeline::disk::human_bytes(needed),
                runs.display()
            ))
            && line.contains(".step_000000.tmp was removed")
            && line.contains("hint: free some space"),
        "{line}"
    );
    if tmpfs {
        let left = String::from_utf8_lossy(&out.stdout);
        assert!(left.trim().is_empty(), "left behind: {left}");
        assert!(
            err.contains(&format!("not enough free disk space in {}", runs.display()))
                && err.contains("2 more checkpoints of"),
            "{err}"
        );
    } else {
        let checkpoints = std::fs::read_dir(&runs)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("checkpoints");
        let left: Vec<_> = std::fs::read_dir(&checkpoints).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

/// Every file under `dir` but the lock (whose holder line comes and goes with each process), with
/// its bytes and modification time: equal snapshots mean nothing in the folder was written.
fn folder_snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name() != Some(".lock".as_ref()) {
                let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
                files.push((path.clone(), std::fs::read(&path).unwrap(), modified));
            }
        }
    }
    files.sort();
    files
}

/// A requeued job re-runs its command line: `--resume latest` on a run whose checkpoint already
/// reached where that command stops (total_steps, or its own --steps) says so and exits 0 without
/// writing to the run folder; an explicit --steps below the checkpoint of an unfinished run is a
/// mistake and stays an error naming the flag, with a hint that fits.
#[test]
fn resuming_a_finished_run_does_nothing_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &tiny_config(16, 4, 6));
    let data = shards(tmp.path(), 16, 200, Pattern::Position);
    let (complete, partial) = (tmp.path().join("complete"), tmp.path().join("partial"));
    let done = train::run(&opts(&data, &config, &complete, None)).unwrap();
    assert_eq!(done.final_step, 6);
    let stopped = train::run(&opts(&data, &config, &partial, Some(4))).unwrap();
    assert_eq!(stopped.final_step, 4);

    let resume = |runs: &Path, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--shards".as_ref(),
            data.as_os_str(),
            "--run-dir".as_ref(),
            runs.as_os_str(),
            "--resume".as_ref(),
            "latest".as_ref(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let out = trainer_cmd(&args).env("RUST_LOG", "info").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, String::from_utf8(out.stdout).unwrap(), stderr)
    };
    let id = |s: &train::RunSummary| {
        s.run_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };

    let before = folder_snapshot(&done.run_dir);
    let scalars = std::fs::read(done.run_dir.join("metrics/scalars.jsonl")).unwrap();
    for extra in [
        &[][..],
        &["--steps", "6"],
        &["--steps", "3"],
        &["--steps", "9"],
    ] {
        let (status, stdout, stderr) = resume(&complete, extra);
        assert!(status.success(), "{extra:?}: {status:?}\n{stderr}");
        assert!(
            stderr.contains(&format!(
                "run {} is already complete at step 6 of total_steps 6; nothing to do (to train further, raise training.total_steps in a new run)",
                id(&done)
            )),
            "{extra:?}: {stderr}"
        );
        assert!(!stderr.contains("resuming from"), "{extra:?}: {stderr}");
        assert_eq!(
            PathBuf::from(stdout.trim()),
            done.last_checkpoint,
            "{extra:?}"
        );
        assert_eq!(
            std::fs::read(done.run_dir.join("metrics/scalars.jsonl")).unwrap(),
            scalars,
            "{extra:?}: scalars.jsonl changed"
        );
        assert!(
            folder_snapshot(&done.run_dir) == before,
            "{extra:?}: the run folder changed"
        );
    }

    // A job with its own --steps, requeued after it reached them: nothing to do either.
    let before = folder_snapshot(&stopped.run_dir);
    let (status, stdout, stderr) = resume(&partial, &["--steps", "4"]);
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "run {} is already at step 4 (--steps 4); nothing to do (to train further, pass a larger --steps, up to total_steps 6)",
            id(&stopped)
        )),
        "{stderr}"
    );
    assert_eq!(PathBuf::from(stdout.trim()), stopped.last_checkpoint);
    assert!(
        folder_snapshot(&stopped.run_dir) == before,
        "the run folder changed"
    );

    // Below the checkpoint of an unfinished run: an error, and still nothing written.
    let (status, stdout, stderr) = resume(&partial, &["--steps", "2"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains(&format!(
            "--steps 2: the checkpoint {} is already at step 4; hint: omit --steps or pass one from 5 to total_steps 6 to train on, or resume from a checkpoint at or before step 2 to train that part again",
            stopped.last_checkpoint.display()
        )),
        "{line}"
    );
    assert!(
        folder_snapshot(&stopped.run_dir) == before,
        "the run folder changed"
    );
}
