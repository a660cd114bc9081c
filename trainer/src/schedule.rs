//! Schedules as pure functions of the step: the learning rate, the weight decay, and which steps
//! are checkpointed.
//!
//! The learning rate is piecewise linear between the knots of `training.lr_knots` and constant
//! after the last one; the weight decay is piecewise constant (`training.wd_knots`: each value holds
//! from its step until the next knot). A knot's `step` counts steps done, so step N (the N-th
//! update, which turns checkpoint `step_{N-1}` into `step_N`) uses `lr(N-1)` and `wd(N-1)`, as the
//! reference does: step 1 has `lr(0) = 0`.

use crate::config::{Config, Knot, TrainingConfig};
use crate::instrument::retention::CheckpointSchedule;

/// Learning rate of update `step`.
pub fn lr_at(knots: &[Knot], step: u64) -> f64 {
    let Some(last) = knots.last() else {
        return 0.0;
    };
    if step >= last.step {
        return last.value;
    }
    // Knots are validated to start at 0 and increase, so some window brackets `step`.
    for w in knots.windows(2) {
        let (a, b) = (w[0], w[1]);
        if step >= a.step && step < b.step {
            let frac = (step - a.step) as f64 / (b.step - a.step) as f64;
            return a.value + (b.value - a.value) * frac;
        }
    }
    knots[0].value
}

/// Weight decay of update `step`.
pub fn wd_at(knots: &[Knot], step: u64) -> f64 {
    knots
        .iter()
        .take_while(|k| k.step <= step)
        .last()
        .map_or(0.0, |k| k.value)
}

/// Both schedules once `done` steps are done: the values the next step uses.
pub fn after(cfg: &TrainingConfig, done: u64) -> (f64, f64) {
    (lr_at(&cfg.lr_knots, done), wd_at(&cfg.wd_knots, done))
}

/// The learning rate and weight decay of step `step` (counted from 1): the schedules after
/// `step - 1` steps, so step 1 has lr 0 as in the reference.
pub fn of_step(cfg: &TrainingConfig, step: u64) -> (f64, f64) {
    after(cfg, step - 1)
}

/// The first step of the last stage: the last knot where the weight decay changes (30,000
/// in bitnet-95m.toml).
pub fn stage_boundary(t: &TrainingConfig) -> Option<u64> {
    t.wd_knots
        .windows(2)
        .rev()
        .find(|w| w[1].value != w[0].value)
        .map(|w| w[1].step)
}

/// The checkpoint steps of a run: step 0, every `checkpoint_every`, the stage boundary pair and
/// the end.
pub fn checkpoint_schedule(cfg: &Config) -> CheckpointSchedule {
    CheckpointSchedule {
        every: cfg.instrumentation.checkpoint_every,
        total_steps: cfg.training.total_steps,
        stage_boundary: stage_boundary(&cfg.training),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn training_95m() -> TrainingConfig {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        crate::config::Config::load(&path).unwrap().training
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    /// Check values from ../shared/reference/README.md.
    #[test]
    fn plan_schedule_at_every_boundary() {
        let t = training_95m();
        let cases = [
            (0, 0.0, 0.1),
            (374, 1.496e-3, 0.1),
            (375, 1.5e-3, 0.1),
            (29_999, 1.000_016_877_6e-3, 0.1),
            (30_000, 1e-3, 0.0),
            (59_999, 1.503_283_33e-5, 0.0),
            (60_000, 1.5e-5, 0.0),
            (70_000, 1.5e-5, 0.0),
        ];
        for (step, lr, wd) in cases {
            let (l, w) = after(&t, step);
            assert!(close(l, lr), "lr({step}) = {l}, expected {lr}");
            assert_eq!(w, wd, "wd({step})");
        }
    }

    #[test]
    fn plan_checkpoints_at_the_stage_boundary_pair() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        let c = crate::config::Config::load(&path).unwrap();
        let s = checkpoint_schedule(&c);
        for step in [0, 5000, 29_999, 30_000, 60_000] {
            assert!(s.is_checkpoint_step(step), "{step}");
        }
        for step in [1, 29_998, 30_001, 60_001] {
            assert!(!s.is_checkpoint_step(step), "{step}");
        }
    }

    #[test]
    fn microsoft_two_stage_shape_is_a_config_change() {
        // Constant peak, then a drop at the stage boundary followed by a linear decay.
        let k = |step, value| Knot { step, value };
        let knots = [k(0, 0.0), k(10, 1.0), k(50, 1.0), k(51, 0.5), k(100, 0.0)];
        assert_eq!(lr_at(&knots, 5), 0.5);
        assert_eq!(lr_at(&knots, 30), 1.0);
        assert_eq!(lr_at(&knots, 51), 0.5);
        assert_eq!(lr_at(&knots, 100), 0.0);
        assert_eq!(wd_at(&[k(0, 0.1), k(5, 0.0)], 4), 0.1);
        assert_eq!(wd_at(&[k(0, 0.1), k(5, 0.0)], 5), 0.0);
    }
}
