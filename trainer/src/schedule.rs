//! Learning-rate and weight-decay schedules as pure functions of the optimizer step (plan section 4).
//!
//! The learning rate is piecewise linear between the knots of `training.lr_knots` and constant
//! after the last one; the weight decay is piecewise constant (`training.wd_knots`: each value holds
//! from its step until the next knot). Update `s` (0-based; it turns checkpoint `step_s` into
//! `step_{s+1}`) uses `lr(s)` and `wd(s)`, as the reference does, so `lr(0) = 0`.

use crate::config::{Knot, TrainingConfig};

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

/// Both schedules of a training config at one step.
pub fn at(cfg: &TrainingConfig, step: u64) -> (f64, f64) {
    (lr_at(&cfg.lr_knots, step), wd_at(&cfg.wd_knots, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> TrainingConfig {
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
        let t = plan();
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
            let (l, w) = at(&t, step);
            assert!(close(l, lr), "lr({step}) = {l}, expected {lr}");
            assert_eq!(w, wd, "wd({step})");
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
