//! `trainer check-device`: the accelerated path against the CPU path on the same weights and the
//! same batch. Both sides start from `Params::init` (a pure function of seed and config, identical
//! on every device), run one forward/backward (the pass `training.backward` selects) on one batch
//! of seeded random tokens and compare the loss and every parameter's gradient.
//!
//! What "agree" means (the CUDA side runs its matmuls in bf16 with f32 accumulation and f32 master
//! weights, the CPU side is f32 throughout; see `model::matmul_dtype_for`):
//! - loss: relative difference at most [`LOSS_REL_TOL`] = 2^-8, one bf16 ulp at 1.0. Each matmul
//!   operand is rounded to bf16 once (unit roundoff 2^-9) and accumulated in f32; the loss is a mean
//!   over batch*(seq-1) positions whose rounding errors are independent, so it should land well
//!   inside one ulp. The slack covers the few int8/ternary level flips that rounding causes in the
//!   BitLinear quantizers (each moves one token's output by about 1e-3 relative, see the shared
//!   reference's README).
//! - gradients: cosine similarity above [`GRAD_COSINE_MIN`] = 0.99 for every parameter tensor
//!   (bf16 rounding of the operands moves a gradient's direction only slightly; a wrong kernel or
//!   a missing term gives far less).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use pipeline::rng::SplitMix64;
use serde::Serialize;

use crate::config::Config;
use crate::model::Params;
use crate::setup::{DeviceChoice, select_device};
use crate::train::loss_and_gradients;

/// Largest accepted |loss_device - loss_cpu| / |loss_cpu|: one bf16 ulp at 1.0 (2^-8).
pub const LOSS_REL_TOL: f64 = 1.0 / 256.0;
/// Smallest accepted per-tensor gradient cosine similarity.
pub const GRAD_COSINE_MIN: f64 = 0.99;

/// Inputs of `trainer check-device`.
#[derive(Debug, Clone)]
pub struct DeviceCheckOptions {
    pub config: PathBuf,
    /// Sequences in the batch [default: the config's batch_size].
    pub batch: Option<usize>,
    /// Seed of the random tokens (the weights use the config's seed).
    pub seed: u64,
    /// The device checked against the CPU.
    pub device: DeviceChoice,
}

/// One parameter's gradient, device against CPU.
#[derive(Debug, Clone, Serialize)]
pub struct GradAgreement {
    pub name: String,
    pub cosine: f64,
    /// ||g_device - g_cpu|| / ||g_cpu||.
    pub rel_l2: f64,
}

/// Result of `trainer check-device`, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceCheckResult {
    pub device: String,
    pub batch: usize,
    pub seq_len: usize,
    pub loss_cpu: f64,
    pub loss_device: f64,
    pub loss_rel_diff: f64,
    pub loss_rel_tol: f64,
    pub min_grad_cosine: f64,
    pub min_grad_cosine_tensor: String,
    pub grad_cosine_min: f64,
    pub max_grad_rel_l2: f64,
    pub grads: Vec<GradAgreement>,
    pub passed: bool,
}

/// (parameter name, flattened f32 gradient), in canonical parameter order.
type NamedGrads = Vec<(String, Vec<f32>)>;

/// Loss and gradients of one forward/backward, computed as training computes them
/// (`training.backward`).
fn loss_and_grads(
    cfg: &Config,
    tokens: &[u32],
    shape: (usize, usize),
    device: &Device,
) -> Result<(f64, NamedGrads)> {
    let params = Params::init(&cfg.model, cfg.training.seed, device)?;
    let model = params.model(&cfg.model)?;
    let tokens = Tensor::from_slice(tokens, shape, device)?;
    let (loss, store) =
        loss_and_gradients(&model, &params, &tokens, 1, cfg.training.backward, None)?;
    let mut grads = Vec::new();
    for (name, g) in store {
        let g = g
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        grads.push((name, g));
    }
    Ok((loss, grads))
}

/// Cosine similarity and relative L2 distance of `a` (checked) against `b` (reference), in f64.
/// Two all-zero vectors agree (cosine 1); one all-zero against a non-zero one does not (0).
pub fn agreement(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut ab, mut aa, mut bb, mut dd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
        dd += (x - y) * (x - y);
    }
    let cosine = if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    };
    let rel_l2 = if bb == 0.0 {
        dd.sqrt()
    } else {
        (dd / bb).sqrt()
    };
    (cosine, rel_l2)
}

/// Runs the check; the result says whether both criteria hold (the caller decides the exit code).
pub fn check_device(opts: &DeviceCheckOptions) -> Result<DeviceCheckResult> {
    let cfg = Config::load(&opts.config)?;
    let b = opts.batch.unwrap_or(cfg.training.batch_size);
    let t = cfg.training.seq_len;
    if b == 0 {
        bail!("--batch must be at least 1");
    }
    let device = select_device(opts.device)?;
    let mut rng = SplitMix64::new(opts.seed);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| (rng.next_u64() % cfg.model.vocab_size as u64) as u32)
        .collect();
    let (loss_cpu, grads_cpu) = loss_and_grads(&cfg, &tokens, (b, t), &Device::Cpu)?;
    let (loss_device, grads_device) = loss_and_grads(&cfg, &tokens, (b, t), &device)?;
    let grads: Vec<GradAgreement> = grads_device
        .iter()
        .zip(&grads_cpu)
        .map(|((name, g), (_, r))| {
            let (cosine, rel_l2) = agreement(g, r);
            GradAgreement {
                name: name.clone(),
                cosine,
                rel_l2,
            }
        })
        .collect();
    let worst = grads
        .iter()
        .min_by(|a, b| a.cosine.total_cmp(&b.cosine))
        .context("the model has no parameters")?;
    let max_grad_rel_l2 = grads.iter().map(|g| g.rel_l2).fold(0.0, f64::max);
    let loss_rel_diff = (loss_device - loss_cpu).abs() / loss_cpu.abs().max(f64::MIN_POSITIVE);
    // NaN anywhere fails both comparisons.
    let passed = loss_rel_diff <= LOSS_REL_TOL && grads.iter().all(|g| g.cosine > GRAD_COSINE_MIN);
    Ok(DeviceCheckResult {
        device: format!("{device:?}"),
        batch: b,
        seq_len: t,
        loss_cpu,
        loss_device,
        loss_rel_diff,
        loss_rel_tol: LOSS_REL_TOL,
        min_grad_cosine: worst.cosine,
        min_grad_cosine_tensor: worst.name.clone(),
        grad_cosine_min: GRAD_COSINE_MIN,
        max_grad_rel_l2,
        grads,
        passed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_of_known_vectors() {
        let (c, r) = agreement(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        assert!((c - 1.0).abs() < 1e-12 && r == 0.0);
        let (c, r) = agreement(&[-1.0, -2.0], &[1.0, 2.0]);
        assert!((c + 1.0).abs() < 1e-12 && (r - 2.0).abs() < 1e-12);
        let (c, _) = agreement(&[1.0, 0.0], &[0.0, 1.0]);
        assert!(c.abs() < 1e-12);
        assert_eq!(agreement(&[0.0, 0.0], &[0.0, 0.0]).0, 1.0);
        assert_eq!(agreement(&[0.0, 0.0], &[1.0, 0.0]).0, 0.0);
        let (c, _) = agreement(&[f32::NAN, 1.0], &[1.0, 1.0]);
        assert!(c.is_nan(), "NaN must not pass the cosine bar: {c}");
    }

    /// CPU against CPU runs the whole command and must agree exactly (same kernels, same order).
    #[test]
    fn cpu_against_cpu_agrees_exactly() {
        let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.toml");
        let r = check_device(&DeviceCheckOptions {
            config: PathBuf::from(cfg),
            batch: Some(2),
            seed: 7,
            device: DeviceChoice::Cpu,
        })
        .unwrap();
        assert!(r.passed, "{r:?}");
        assert_eq!(r.loss_cpu, r.loss_device);
        assert!(r.loss_cpu > 5.0, "random init on 32k vocab: {}", r.loss_cpu);
        assert_eq!(
            r.grads.len(),
            Params::init(
                &Config::load(std::path::Path::new(cfg)).unwrap().model,
                0,
                &Device::Cpu
            )
            .unwrap()
            .iter()
            .count()
        );
        assert!(r.grads.iter().all(|g| g.rel_l2 == 0.0));
    }
}
