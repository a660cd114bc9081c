//! Which steps get a checkpoint (step 0, every `checkpoint_every`, the last step before the stage
//! change and the stage change itself, the end) and which checkpoints stay on disk
//! (keep all, or a ring of the newest plus every `keep_every` plus the stage-boundary pair).
//! Both are pure functions of steps, so they are tested at every boundary without a model.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Keep every checkpoint where disk space allows (the default), or a ring of the newest plus
/// milestones where it does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// `keep_all` or `ring`.
    pub policy: RetentionKind,
    /// Ring only: how many of the newest checkpoints to keep (5 in bitnet-95m.toml).
    pub ring_last: usize,
    /// Ring only: checkpoints at multiples of this step are kept forever (10,000 in
    /// bitnet-95m.toml).
    pub keep_every: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            policy: RetentionKind::KeepAll,
            ring_last: 5,
            keep_every: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionKind {
    KeepAll,
    Ring,
}

/// The checkpoint steps of one run, derived from the config and the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSchedule {
    /// `checkpoint_every` (5,000 in bitnet-95m.toml).
    pub every: u64,
    /// The schedule's `total_steps` (60,000 in bitnet-95m.toml); the final checkpoint.
    pub total_steps: u64,
    /// First step of stage 2 (30,000 in bitnet-95m.toml), from the LR/WD schedule; `None` for one
    /// stage.
    pub stage_boundary: Option<u64>,
}

impl CheckpointSchedule {
    /// Whether the state after `step` updates is checkpointed. A run stopped early by `--steps`
    /// or Ctrl-C also writes its last step; that is the caller's decision, not this schedule's.
    pub fn is_checkpoint_step(&self, step: u64) -> bool {
        if step > self.total_steps {
            return false;
        }
        step == 0
            || (self.every > 0 && step.is_multiple_of(self.every))
            || step == self.total_steps
            || self
                .stage_boundary
                .is_some_and(|b| b > 0 && (step == b - 1 || step == b))
    }

    /// Every checkpoint step of the whole run, ascending.
    pub fn all_steps(&self) -> Vec<u64> {
        let mut s: BTreeSet<u64> = BTreeSet::from([0, self.total_steps]);
        if self.every > 0 {
            s.extend((0..=self.total_steps).step_by(self.every as usize));
        }
        if let Some(b) = self
            .stage_boundary
            .filter(|&b| b > 0 && b <= self.total_steps)
        {
            s.insert(b - 1);
            s.insert(b);
        }
        s.into_iter().collect()
    }
}

/// The steps among `existing` that the policy keeps. The newest checkpoint is always kept (it
/// is what `--resume latest` needs), whatever the policy.
pub fn retained(
    existing: &[u64],
    policy: &RetentionConfig,
    stage_boundary: Option<u64>,
) -> BTreeSet<u64> {
    let all: BTreeSet<u64> = existing.iter().copied().collect();
    match policy.policy {
        RetentionKind::KeepAll => all,
        RetentionKind::Ring => {
            let mut keep: BTreeSet<u64> = all
                .iter()
                .rev()
                .take(policy.ring_last.max(1))
                .copied()
                .collect();
            for &s in &all {
                let milestone = policy.keep_every > 0 && s.is_multiple_of(policy.keep_every);
                let boundary = stage_boundary.is_some_and(|b| b > 0 && (s == b - 1 || s == b));
                if milestone || boundary {
                    keep.insert(s);
                }
            }
            keep
        }
    }
}

/// The steps among `existing` that the policy deletes, ascending.
pub fn to_delete(
    existing: &[u64],
    policy: &RetentionConfig,
    stage_boundary: Option<u64>,
) -> Vec<u64> {
    let keep = retained(existing, policy, stage_boundary);
    let mut del: Vec<u64> = existing
        .iter()
        .copied()
        .filter(|s| !keep.contains(s))
        .collect();
    del.sort_unstable();
    del.dedup();
    del
}

/// The most checkpoints on disk at once while `upcoming` (ascending) are written after
/// `existing`: each new folder is complete before retention deletes the ones it drops, so the
/// peak is the kept set plus the one being written. What a run must have space for.
pub fn peak_on_disk(
    existing: &[u64],
    upcoming: &[u64],
    policy: &RetentionConfig,
    stage_boundary: Option<u64>,
) -> usize {
    let mut on_disk: Vec<u64> = existing.to_vec();
    let mut peak = on_disk.len();
    for &step in upcoming {
        if on_disk.contains(&step) {
            continue;
        }
        on_disk.push(step);
        peak = peak.max(on_disk.len());
        on_disk = retained(&on_disk, policy, stage_boundary)
            .into_iter()
            .collect();
    }
    peak
}

/// `step_NNNNNN` (6 digits, the engine's checkpoint folder name).
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step_{step:06}")
}

/// The steps of the complete `step_NNNNNN` folders in `checkpoints_dir` (temporary folders of
/// an interrupted write have another name and are ignored).
pub fn list_checkpoints(checkpoints_dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(checkpoints_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name.strip_prefix("step_") else {
            continue;
        };
        if digits.len() >= 6
            && digits.bytes().all(|b| b.is_ascii_digit())
            && entry.file_type()?.is_dir()
            && let Ok(step) = digits.parse()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the checkpoints the policy drops; returns the deleted steps. Called after each new
/// checkpoint is complete, so a crash in between leaves extra checkpoints, never missing ones.
pub fn apply_retention(
    checkpoints_dir: &Path,
    policy: &RetentionConfig,
    stage_boundary: Option<u64>,
) -> std::io::Result<Vec<u64>> {
    let existing = list_checkpoints(checkpoints_dir)?;
    let steps: Vec<u64> = existing.iter().map(|(s, _)| *s).collect();
    let del = to_delete(&steps, policy, stage_boundary);
    for (step, path) in &existing {
        if del.contains(step) {
            std::fs::remove_dir_all(path)?;
        }
    }
    Ok(del)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule_95m() -> CheckpointSchedule {
        CheckpointSchedule {
            every: 5000,
            total_steps: 60_000,
            stage_boundary: Some(30_000),
        }
    }

    #[test]
    fn plan_checkpoint_steps() {
        let s = schedule_95m();
        let expect = vec![
            0, 5000, 10_000, 15_000, 20_000, 25_000, 29_999, 30_000, 35_000, 40_000, 45_000,
            50_000, 55_000, 60_000,
        ];
        assert_eq!(s.all_steps(), expect);
        for step in 0..=61_000 {
            assert_eq!(
                s.is_checkpoint_step(step),
                expect.contains(&step),
                "step {step}"
            );
        }
    }

    #[test]
    fn end_and_boundary_off_the_grid() {
        let s = CheckpointSchedule {
            every: 4,
            total_steps: 10,
            stage_boundary: Some(6),
        };
        assert_eq!(s.all_steps(), vec![0, 4, 5, 6, 8, 10]);
        let one_stage = CheckpointSchedule {
            stage_boundary: None,
            ..s
        };
        assert_eq!(one_stage.all_steps(), vec![0, 4, 8, 10]);
    }

    #[test]
    fn keep_all_keeps_everything() {
        let p = RetentionConfig::default();
        let steps = schedule_95m().all_steps();
        assert!(to_delete(&steps, &p, Some(30_000)).is_empty());
    }

    #[test]
    fn ring_keeps_last_five_milestones_and_boundary_pair() {
        let p = RetentionConfig {
            policy: RetentionKind::Ring,
            ring_last: 5,
            keep_every: 10_000,
        };
        let steps = schedule_95m().all_steps();
        // Halfway through: everything written so far up to step 35,000.
        let so_far: Vec<u64> = steps.iter().copied().filter(|&s| s <= 35_000).collect();
        let keep: Vec<u64> = retained(&so_far, &p, Some(30_000)).into_iter().collect();
        // last five: 20k, 25k, 29,999, 30k, 35k; milestones 0, 10k, 20k, 30k; pair 29,999/30k.
        assert_eq!(
            keep,
            vec![0, 10_000, 20_000, 25_000, 29_999, 30_000, 35_000]
        );
        assert_eq!(to_delete(&so_far, &p, Some(30_000)), vec![5000, 15_000]);
        // At the end the pair survives although it left the ring.
        let keep: Vec<u64> = retained(&steps, &p, Some(30_000)).into_iter().collect();
        assert_eq!(
            keep,
            vec![
                0, 10_000, 20_000, 29_999, 30_000, 40_000, 45_000, 50_000, 55_000, 60_000
            ]
        );
    }

    #[test]
    fn peak_on_disk_of_the_95m_run() {
        let steps = schedule_95m().all_steps();
        assert_eq!(steps.len(), 14);
        let keep_all = RetentionConfig::default();
        assert_eq!(peak_on_disk(&[], &steps, &keep_all, Some(30_000)), 14);
        // Resumed at 35,000: the checkpoints already there count, the rest come on top.
        let (done, rest) = steps.split_at(9);
        assert_eq!(peak_on_disk(done, rest, &keep_all, Some(30_000)), 14);
        let ring = RetentionConfig {
            policy: RetentionKind::Ring,
            ring_last: 5,
            keep_every: 10_000,
        };
        // The end state of ring_keeps_last_five_milestones_and_boundary_pair (10 folders), plus
        // the one being written before retention drops the oldest of the ring.
        assert_eq!(peak_on_disk(&[], &steps, &ring, Some(30_000)), 11);
    }

    #[test]
    fn ring_always_keeps_the_newest() {
        let p = RetentionConfig {
            policy: RetentionKind::Ring,
            ring_last: 1,
            keep_every: 1000,
        };
        assert_eq!(to_delete(&[0, 7, 13], &p, None), vec![7]);
    }

    #[test]
    fn apply_retention_deletes_only_dropped_folders() {
        let dir = tempfile::tempdir().unwrap();
        for s in [0u64, 2, 4, 5, 6, 8] {
            std::fs::create_dir(dir.path().join(checkpoint_dir_name(s))).unwrap();
        }
        // An interrupted write and a stray file are ignored.
        std::fs::create_dir(dir.path().join("step_000010.tmp")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let p = RetentionConfig {
            policy: RetentionKind::Ring,
            ring_last: 2,
            keep_every: 4,
        };
        let del = apply_retention(dir.path(), &p, Some(6)).unwrap();
        assert_eq!(del, vec![2]);
        let left: Vec<u64> = list_checkpoints(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![0, 4, 5, 6, 8]);
        assert!(dir.path().join("step_000010.tmp").exists());
    }
}
