//! Captures what `meta/provenance.json` reports about the build: the rustc that compiled the
//! trainer and the candle-core version locked in the workspace's Cargo.lock.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRAINER_RUSTC_VERSION={version}");

    // The lock file sits at the workspace root, one level above this crate.
    // Read at run time (not `env!`): a compiled build script may be reused from another checkout.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let lock = std::path::Path::new(&manifest_dir).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let candle = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|text| {
            let at = text.find("name = \"candle-core\"")?;
            let rest = &text[at..];
            let v = rest.lines().find(|l| l.starts_with("version = "))?;
            Some(
                v.trim_start_matches("version = ")
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRAINER_CANDLE_VERSION={candle}");
    println!("cargo:rerun-if-changed=build.rs");
}
