//! Checkpoints `runs/<run_id>/checkpoints/step_NNNNNN/`: the state after N optimizer updates
//! (`step_000000` holds the initial weights).
//!
//! - `model.safetensors`: every parameter, f32, under its canonical name (read by outside tools).
//! - `optimizer.safetensors`: the AdamW moments `m.<name>`, `v.<name>`.
//! - `state.json`: [`TrainState`] (step, tokens seen, schedule, RNG description, loss, the whole
//!   config, the shard fingerprint).
//! - `checksums.sha256`: the sha256 of the three files (`sha256sum -c` format), checked when a
//!   checkpoint is loaded, so a damaged byte is an error rather than other weights or moments.
//!   Checkpoints written without it load unchecked.
//!
//! A checkpoint is written into `.step_NNNNNN.tmp/`, every file is fsynced, and the folder is then
//! renamed: a folder named `step_NNNNNN` is always complete, and resume never sees a half one. A
//! write that fails (a full disk) removes the partial folder, so it does not hold on to the space
//! that was missing, and says how much a checkpoint needs.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, Knot, ModelConfig};
use crate::model::{Params, parameter_count};
use crate::optim::AdamW;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CHECKSUMS_FILE: &str = "checksums.sha256";

/// Everything besides tensors that resuming needs, plus what a reader wants to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer updates done; the next update is `step` (0-based) with lr(step), wd(step).
    pub step: u64,
    /// `step * batch_size * seq_len`.
    pub tokens_seen: u64,
    pub schedule: ScheduleState,
    pub rng: RngState,
    /// Mean training loss of the last update (None for step 0).
    pub loss: Option<f64>,
    /// The full configuration of the run; resume uses it, not the config file.
    pub config: Config,
    pub shards: ShardFingerprint,
}

/// The schedules are pure functions of the step; this records them and their value at `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub current_step: u64,
    /// Learning rate the next update uses.
    pub lr: f64,
    /// Weight decay the next update uses.
    pub wd: f64,
    pub lr_knots: Vec<Knot>,
    pub wd_knots: Vec<Knot>,
}

/// All randomness is a pure function of the seed, so the "RNG state" is the seed and the name of
/// each generator (nothing stateful to save).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    /// `splitmix64-box-muller per tensor name`.
    pub init: String,
    /// `feistel6-cycle-walk`: batch s = positions s*B..s*B+B-1 of the keyed permutation.
    pub data_order: String,
}

impl RngState {
    pub fn new(seed: u64) -> Self {
        RngState {
            seed,
            init: "splitmix64-box-muller per tensor name".into(),
            data_order: "feistel6-cycle-walk over train sequences".into(),
        }
    }
}

/// Which shards the run reads; resume refuses other shards (the data order would change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardFingerprint {
    pub dataset_sha256: String,
    pub train_sequences: u64,
    pub first_1000_token_ids_sha256: String,
    pub tokenizer_sha256: String,
}

/// `step_000123`.
pub fn folder_name(step: u64) -> String {
    format!("step_{step:06}")
}

/// About how many bytes one checkpoint of this model takes: the f32 weights and the two f32
/// AdamW moments, plus the safetensors headers and `state.json` (under 64 kB for the 95M model).
pub fn bytes_needed(model: &ModelConfig) -> u64 {
    parameter_count(model) as u64 * 4 * 3 + 64 * 1024
}

/// Writes a checkpoint for `state.step` into `checkpoints/` atomically; returns its folder.
pub fn save(
    checkpoints: &Path,
    params: &Params,
    opt: &AdamW,
    state: &TrainState,
) -> Result<PathBuf> {
    let name = folder_name(state.step);
    let final_dir = checkpoints.join(&name);
    let tmp = checkpoints.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    if let Err(e) = write_files(&tmp, params, opt, state) {
        // The partial folder holds the space that just ran out; nothing can use it.
        let removed = fs::remove_dir_all(&tmp).is_ok();
        return Err(write_error(
            e,
            &tmp,
            removed,
            bytes_needed(&state.config.model),
        ));
    }
    if final_dir.exists() {
        // Re-writing a step (a resumed run stopping where it started): replace the old folder.
        let old = checkpoints.join(format!(".{name}.old"));
        let _ = fs::remove_dir_all(&old);
        fs::rename(&final_dir, &old)
            .with_context(|| format!("moving {} aside", final_dir.display()))?;
        fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {}", tmp.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {}", tmp.display()))?;
    }
    // Persist the rename itself.
    if let Ok(d) = File::open(checkpoints) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

/// The files of a checkpoint, each fsynced, into the (new) folder `tmp`.
fn write_files(tmp: &Path, params: &Params, opt: &AdamW, state: &TrainState) -> Result<()> {
    fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    params
        .save(&tmp.join(MODEL_FILE))
        .with_context(|| format!("writing {}", tmp.join(MODEL_FILE).display()))?;
    opt.save(&tmp.join(OPTIMIZER_FILE))
        .with_context(|| format!("writing {}", tmp.join(OPTIMIZER_FILE).display()))?;
    let mut json = serde_json::to_string_pretty(state).expect("state serializes");
    json.push('\n');
    fs::write(tmp.join(STATE_FILE), json)
        .with_context(|| format!("writing {}", tmp.join(STATE_FILE).display()))?;
    let mut sums = String::new();
    for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let p = tmp.join(f);
        let sha = sha256_file(&p).with_context(|| format!("hashing {}", p.display()))?;
        sums.push_str(&format!("{sha}  {f}\n"));
    }
    fs::write(tmp.join(CHECKSUMS_FILE), sums)
        .with_context(|| format!("writing {}", tmp.join(CHECKSUMS_FILE).display()))?;
    for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CHECKSUMS_FILE] {
        let p = tmp.join(f);
        File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("fsync {}", p.display()))?;
    }
    Ok(())
}

/// One line for a checkpoint that could not be written. The writers wrap the OS error several
/// times (candle, safetensors, our context), each repeating its text, so an I/O failure is
/// reported once, from the innermost `io::Error`; a full disk also gets the space it needs.
fn write_error(e: anyhow::Error, tmp: &Path, removed: bool, needed: u64) -> anyhow::Error {
    let dir = tmp.parent().unwrap_or(tmp);
    let what = format!("{e}");
    let cleanup = if removed {
        format!("the partial {} was removed", tmp.display())
    } else {
        format!("remove the partial {} by hand", tmp.display())
    };
    let Some(io) = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) else {
        return anyhow::anyhow!("{e:#}; {cleanup}");
    };
    if !pipeline::disk::is_out_of_space(io) {
        return anyhow::anyhow!("{what}: {io}; {cleanup}");
    }
    let free = pipeline::disk::free_space(dir).map_or_else(
        |_| "unknown".to_owned(),
        |(free, _)| pipeline::disk::human_bytes(free),
    );
    anyhow::anyhow!(
        "{what}: {io}; a checkpoint needs about {} in {} and {free} are free there; {cleanup}; hint: free some space there (or move the run folder to a larger disk) and run again; --resume latest continues from the newest checkpoint",
        pipeline::disk::human_bytes(needed),
        dir.display()
    )
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Loaded {
    pub params: Params,
    pub optimizer: AdamW,
    pub state: TrainState,
}

/// sha256 (hex) of a file, read in 1 MiB pieces.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Checks `file` of checkpoint `dir` against `checksums.sha256`; `actual` is its sha256. A
/// checkpoint without the checksums file (written before it existed) is not checked.
fn check_sum(dir: &Path, file: &str, actual: &str) -> Result<()> {
    let sums_path = dir.join(CHECKSUMS_FILE);
    let sums = match fs::read(&sums_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", sums_path.display())),
    };
    let hint = "hint: the checkpoint is damaged; resume from an earlier one (--resume runs/<run_id>/checkpoints/step_NNNNNN)";
    let recorded = std::str::from_utf8(&sums)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (sha, name) = l.split_once("  ")?;
                (name == file).then_some(sha)
            })
        })
        .with_context(|| format!("{}: no sha256 of {file}; {hint}", sums_path.display()))?;
    if recorded != actual {
        bail!(
            "{}: sha256 {actual} differs from {recorded} recorded in {CHECKSUMS_FILE}; {hint}",
            dir.join(file).display()
        );
    }
    Ok(())
}

/// Reads `state.json` only (checked against `checksums.sha256`).
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "reading {}; hint: pass a complete checkpoint folder step_NNNNNN",
            path.display()
        )
    })?;
    check_sum(dir, STATE_FILE, &hex::encode(Sha256::digest(&bytes)))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{}: not a trainer state file (not UTF-8)", path.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a trainer state file", path.display()))?;
    state
        .config
        .validate()
        .with_context(|| format!("{}: the stored config", path.display()))?;
    Ok(state)
}

/// Reads a whole checkpoint onto `device`, every file checked against `checksums.sha256`.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let state = load_state(dir)?;
    for f in [MODEL_FILE, OPTIMIZER_FILE] {
        let p = dir.join(f);
        let sha = sha256_file(&p).with_context(|| format!("reading {}", p.display()))?;
        check_sum(dir, f, &sha)?;
    }
    let params = Params::load(&dir.join(MODEL_FILE), &state.config.model, device)
        .with_context(|| format!("loading {}", dir.join(MODEL_FILE).display()))?;
    let optimizer = AdamW::load(
        &dir.join(OPTIMIZER_FILE),
        &params,
        &state.config.training,
        device,
    )
    .with_context(|| format!("loading {}", dir.join(OPTIMIZER_FILE).display()))?;
    Ok(Loaded {
        params,
        optimizer,
        state,
    })
}

/// Complete checkpoints in `checkpoints/`, ascending by step (temporary folders are ignored).
pub fn list_complete(checkpoints: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(checkpoints) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", checkpoints.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(digits) = name.strip_prefix("step_") else {
            continue;
        };
        if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !path.join(STATE_FILE).is_file() {
            continue;
        }
        out.push((digits.parse::<u64>()?, path));
    }
    out.sort();
    Ok(out)
}

/// Checks that the shards given to a resumed run are those it started with.
pub fn check_same_shards(state: &TrainState, now: &ShardFingerprint, dir: &Path) -> Result<()> {
    if state.shards != *now {
        bail!(
            "{}: the checkpoint was trained on shards with dataset_sha256 {} ({} train sequences), --shards has {} ({}); hint: resume with the original --shards folder",
            dir.display(),
            state.shards.dataset_sha256,
            state.shards.train_sequences,
            now.dataset_sha256,
            now.train_sequences
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_dir::latest_checkpoint;

    /// Found by the hostile-bytes test: a flipped bit in a weight or moment loaded as another
    /// checkpoint. Every file is now held to checksums.sha256.
    #[test]
    fn a_damaged_checkpoint_file_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("step_000001");
        fs::create_dir_all(&dir).unwrap();
        let files = [
            (MODEL_FILE, b"model bytes".to_vec()),
            (OPTIMIZER_FILE, b"moment bytes".to_vec()),
            (STATE_FILE, b"{}".to_vec()),
        ];
        let mut sums = String::new();
        for (f, bytes) in &files {
            fs::write(dir.join(f), bytes).unwrap();
            sums.push_str(&format!("{}  {f}\n", hex::encode(Sha256::digest(bytes))));
        }
        fs::write(dir.join(CHECKSUMS_FILE), &sums).unwrap();
        for (f, bytes) in &files {
            let actual = sha256_file(&dir.join(f)).unwrap();
            check_sum(&dir, f, &actual).unwrap();
            let mut damaged = bytes.clone();
            damaged[1] ^= 0x10;
            fs::write(dir.join(f), &damaged).unwrap();
            let actual = sha256_file(&dir.join(f)).unwrap();
            let err = check_sum(&dir, f, &actual).unwrap_err().to_string();
            assert!(err.contains(f) && err.contains("hint:"), "{err}");
            fs::write(dir.join(f), bytes).unwrap();
        }
        // state.json goes through load_state: refused before it is parsed.
        fs::write(dir.join(STATE_FILE), b"{ }").unwrap();
        let err = format!("{:#}", load_state(&dir).unwrap_err());
        assert!(err.contains("differs from"), "{err}");
        // A checkpoint written before the checksums file is not checked.
        fs::remove_file(dir.join(CHECKSUMS_FILE)).unwrap();
        check_sum(&dir, MODEL_FILE, "anything").unwrap();
    }

    #[test]
    fn only_complete_checkpoints_are_listed_and_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("run_a").join("checkpoints");
        for (name, complete) in [
            ("step_000000", true),
            ("step_000010", true),
            ("step_000020", false), // crashed before state.json: not a checkpoint
            (".step_000030.tmp", true),
            ("notes", true),
        ] {
            fs::create_dir_all(ck.join(name)).unwrap();
            if complete {
                fs::write(ck.join(name).join(STATE_FILE), "{}").unwrap();
            }
        }
        let listed: Vec<u64> = list_complete(&ck)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(listed, [0, 10]);
        assert_eq!(folder_name(30_000), "step_030000");
        // `--resume latest` on the run folder and on the folder of runs.
        let run = tmp.path().join("run_a");
        assert_eq!(latest_checkpoint(&run).unwrap(), ck.join("step_000010"));
        assert_eq!(
            latest_checkpoint(tmp.path()).unwrap(),
            ck.join("step_000010")
        );
        let empty = tempfile::tempdir().unwrap();
        let err = latest_checkpoint(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no run with a complete checkpoint"), "{err}");
    }
}
