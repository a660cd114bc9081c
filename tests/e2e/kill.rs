//! `kill -9` at random moments: real `pipeline prepare` and `trainer run` processes are killed
//! with SIGKILL after seeded random delays, and the same command run again (the trainer with
//! `--resume latest` once a checkpoint exists) must end byte-identical (the dataset folder) and
//! bit-identical (the final checkpoint, one `scalars.jsonl` line per step with the same losses
//! and batches) to an uninterrupted run. The crash-point tests stop at known points; this one
//! stops anywhere, so a new code path that loses resumability fails here.
//!
//! Each episode starts a fresh folder and kills it until a run completes, so kills land in every
//! phase. CI kills a few times per command; `KILL_SOAK=N` kills N times each (`KILL_SEED`
//! changes the delays).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pipeline::rng::SplitMix64;
use trainer::checkpoint;
use trainer::synthetic::Pattern;

fn kills(default: u32) -> u32 {
    std::env::var("KILL_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rng(stream: u64) -> SplitMix64 {
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b11_0009);
    SplitMix64::new(seed ^ stream)
}

/// Runs `cmd` (stderr to `log`) and sends it SIGKILL after `after` unless it exits first.
/// Returns whether it was killed; a run that exits on its own must succeed.
fn run_or_kill(cmd: &mut Command, after: Duration, log: &Path) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + after;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "{cmd:?} failed after earlier kills: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return false;
        }
        if Instant::now() >= deadline {
            // std's Child::kill is SIGKILL on Unix: no handler, no destructor runs.
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills commands built by `command(folder)` at random moments until `target` kills are done
/// (or `budget` is spent), one fresh folder per episode, each episode ending with a run that
/// completes (for a finished folder, a no-op that succeeds); `check(folder)` then
/// compares it with the uninterrupted run. Returns how many kills left the folder in each state
/// that `phase(folder)` names.
#[allow(clippy::too_many_arguments)]
fn kill_episodes(
    tmp: &Path,
    name: &str,
    uninterrupted: Duration,
    target: u32,
    budget: Duration,
    command: &dyn Fn(&Path) -> Command,
    check: &dyn Fn(&Path, u32),
    phase: &dyn Fn(&Path) -> &'static str,
) -> BTreeMap<&'static str, u32> {
    let mut rng = rng(name.len() as u64);
    let started = Instant::now();
    let log = tmp.join(format!("{name}.log"));
    let mut killed = 0;
    let mut phases = BTreeMap::new();
    for episode in 0.. {
        if killed >= target || started.elapsed() > budget {
            break;
        }
        let folder = tmp.join(format!("{name}-{episode}"));
        let mut in_episode = 0;
        // Kill at a random moment of an uninterrupted run's length (a resumed run is shorter, so
        // some resumes complete: every episode ends).
        while killed < target {
            let after = uninterrupted.mul_f64(rng.next_f64());
            if !run_or_kill(&mut command(&folder), after, &log) {
                break;
            }
            killed += 1;
            in_episode += 1;
            *phases.entry(phase(&folder)).or_default() += 1;
        }
        // The kills are done: the same command again completes.
        assert!(!run_or_kill(
            &mut command(&folder),
            Duration::from_secs(600),
            &log
        ));
        check(&folder, in_episode);
    }
    phases
}

#[test]
fn prepare_killed_at_random_moments_resumes_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let source = crate::pipeline::small_source()
        .to_string_lossy()
        .into_owned();
    let command = |out: &Path| {
        let out = out.to_string_lossy().into_owned();
        let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline-e2e"));
        c.args(crate::pipeline::cli_args(&out, &source, "100K", "64"))
            .env("RUST_LOG", "warn");
        // Re-running a complete folder is a no-op that succeeds.
        c
    };
    let reference = tmp.path().join("reference");
    let t = Instant::now();
    let o = command(&reference).output().unwrap();
    assert!(o.status.success(), "{}", crate::pipeline::stderr(&o));
    let uninterrupted = t.elapsed();

    let check = |out: &Path, kills: u32| {
        assert!(
            !out.join(pipeline::format::WORK_DIR).exists(),
            "{}: work files left after {kills} kills",
            out.display()
        );
        crate::pipeline::assert_same_folder(&reference, out);
    };
    // What the killed process had written: nothing yet, work files, shards, the manifest.
    let phase = |out: &Path| {
        let names: Vec<String> = std::fs::read_dir(out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let work = std::fs::read_dir(out.join(pipeline::format::WORK_DIR)).map_or(0, |d| d.count());
        if names.iter().any(|n| n == "manifest.json") {
            "complete"
        } else if names.iter().any(|n| n.ends_with(".bin")) {
            "shards"
        } else if work > 0 {
            "work files"
        } else {
            "nothing written"
        }
    };
    let phases = kill_episodes(
        tmp.path(),
        "prepare",
        uninterrupted,
        kills(12),
        Duration::from_secs(30),
        &command,
        &check,
        &phase,
    );
    let killed: u32 = phases.values().sum();
    eprintln!(
        "kill -9: prepare killed {killed} times (uninterrupted run {:.2} s), every resume byte-identical; folder at the kill: {phases:?}",
        uninterrupted.as_secs_f64()
    );
    // The delays span a whole run, so kills land after it wrote something, not only at start-up.
    assert!(phases.keys().any(|p| *p != "nothing written"), "{phases:?}");
}

#[test]
fn trainer_killed_at_random_moments_resumes_bit_identical() {
    const STEPS: u64 = 40;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = crate::trainer::tiny_config(16, 4, STEPS);
    // Several checkpoints, so kills land before, between and during them.
    cfg.instrumentation.checkpoint_every = 8;
    cfg.validate().unwrap();
    let config = crate::trainer::write_config(tmp.path(), &cfg);
    let data = crate::trainer::shards(tmp.path(), 16, STEPS * 4, Pattern::Learnable);
    let command = |runs: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_trainer-e2e"));
        c.args(["run", "--device", "cpu", "--shards"])
            .arg(&data)
            .arg("--run-dir")
            .arg(runs)
            .env("RUST_LOG", "warn");
        // What a requeued job does after a kill: resume once a checkpoint exists, else start
        // again. Resuming a finished run is a no-op that succeeds.
        match trainer::run_dir::latest_checkpoint(runs) {
            Ok(_) => c.args(["--resume", "latest"]),
            Err(_) => c.arg("--config").arg(&config),
        };
        c
    };
    let reference = tmp.path().join("reference");
    let t = Instant::now();
    let o = command(&reference).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let uninterrupted = t.elapsed();
    let final_of = |runs: &Path| -> PathBuf {
        let last = trainer::run_dir::latest_checkpoint(runs).unwrap();
        assert!(
            last.ends_with(checkpoint::folder_name(STEPS)),
            "{}",
            last.display()
        );
        last
    };
    let reference_final = final_of(&reference);
    let reference_run = reference_final.parent().unwrap().parent().unwrap();
    let reference_steps = crate::trainer::logged_steps(reference_run);
    assert_eq!(reference_steps.len() as u64, STEPS);

    let check = |runs: &Path, kills: u32| {
        let last = final_of(runs);
        for file in [
            checkpoint::MODEL_FILE,
            checkpoint::OPTIMIZER_FILE,
            checkpoint::STATE_FILE,
        ] {
            assert!(
                std::fs::read(last.join(file)).unwrap()
                    == std::fs::read(reference_final.join(file)).unwrap(),
                "{file} differs from the uninterrupted run's after {kills} kills"
            );
        }
        // One line per step, steps 1..=STEPS in order, each with the uninterrupted loss and batch.
        let run = last.parent().unwrap().parent().unwrap();
        let text = std::fs::read_to_string(run.join("metrics/scalars.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            steps,
            (1..=STEPS).collect::<Vec<_>>(),
            "after {kills} kills"
        );
        assert_eq!(
            crate::trainer::logged_steps(run),
            reference_steps,
            "after {kills} kills"
        );
    };
    // The checkpoints the killed run left to resume from.
    let phase = |runs: &Path| match trainer::run_dir::latest_checkpoint(runs) {
        Err(_) => "no checkpoint",
        Ok(last) if last.ends_with(checkpoint::folder_name(0)) => "step 0 checkpoint",
        Ok(_) => "later checkpoint",
    };
    let phases = kill_episodes(
        tmp.path(),
        "trainer",
        uninterrupted,
        kills(12),
        Duration::from_secs(30),
        &command,
        &check,
        &phase,
    );
    let killed: u32 = phases.values().sum();
    eprintln!(
        "kill -9: trainer run killed {killed} times (uninterrupted run {:.2} s), every resume bit-identical; checkpoints at the kill: {phases:?}",
        uninterrupted.as_secs_f64()
    );
    assert!(phases.contains_key("later checkpoint"), "{phases:?}");
}
