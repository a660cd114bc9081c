//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x^2, last dim) + eps) * weight`.
//!
//! Written as a composition of differentiable tensor ops: candle-nn 0.11's fused `rms_norm` has no
//! backward pass, so gradients would silently stop there (candle issue #2168).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

/// A learnable RMSNorm over the last dimension, no bias.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight`: `[size]`, initialised to ones.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        Ok(RmsNorm { weight, eps })
    }

    /// The inference form: the weight detached from the parameters.
    pub fn freeze(&self) -> Self {
        RmsNorm {
            weight: self.weight.detach(),
            eps: self.eps,
        }
    }

    /// `x: [..., size] -> [..., size]` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)
    }
}
