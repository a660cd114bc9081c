//! The README's quick demo, command for command: `prepare` from the shipped parquet with the
//! bundled tokenizer, then 200 steps of configs/tiny.toml. It must print no warning (a newcomer
//! reads every WARN as something to fix) and show learning at its three evals.

use std::path::Path;
use std::process::Command;

use e2e::fixtures;

/// `pipeline prepare ... --tokens 2.1M --seq-len 128 --eval-sequences 256` and `trainer run
/// --config configs/tiny.toml --steps 200`, as README.md runs them: no WARN or ERROR line in
/// either, and the eval loss falls from step 0 to 100 to 200.
#[test]
fn the_quick_demo_runs_without_a_warning_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    let prepare = Command::new(env!("CARGO_BIN_EXE_pipeline-e2e"))
        .arg("prepare")
        .arg("--source")
        .arg(fixtures::sample_source())
        .arg("--tokenizer")
        .arg(fixtures::tokenizer_json())
        .args([
            "--tokens",
            "2.1M",
            "--seq-len",
            "128",
            "--eval-sequences",
            "256",
        ])
        .arg("--out")
        .arg(&shards)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&prepare.stderr).into_owned()
        + &String::from_utf8_lossy(&prepare.stdout);
    assert!(prepare.status.success(), "prepare failed:\n{log}");
    assert_no_warning("pipeline prepare", &log);

    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    let run = Command::new(env!("CARGO_BIN_EXE_trainer-e2e"))
        .args(["run", "--device", "cpu", "--steps", "200"])
        .arg("--shards")
        .arg(&shards)
        .arg("--config")
        .arg(&config)
        .arg("--run-dir")
        .arg(tmp.path().join("runs"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&run.stderr).into_owned() + &String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "trainer run failed:\n{log}");
    assert_no_warning("trainer run", &log);

    // "eval step N | loss X | ..."
    let evals: Vec<(u64, f64)> = log
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("eval step ")? + "eval step ".len()..];
            let (step, rest) = rest.split_once(" | loss ")?;
            let loss = rest.split_whitespace().next()?;
            Some((step.parse().ok()?, loss.parse().ok()?))
        })
        .collect();
    let steps: Vec<u64> = evals.iter().map(|e| e.0).collect();
    assert_eq!(steps, [0, 100, 200], "evals of the demo:\n{log}");
    assert!(
        evals[0].1 > evals[1].1 && evals[1].1 > evals[2].1,
        "the eval loss does not fall: {evals:?}"
    );
}

fn assert_no_warning(what: &str, log: &str) {
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        warnings.is_empty(),
        "{what} warned:\n{}",
        warnings.join("\n")
    );
}
