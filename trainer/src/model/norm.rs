//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x^2, last dim) + eps) * weight`.
//!
//! Written as a composition of differentiable tensor ops: candle-nn 0.11's fused `rms_norm` has no
//! backward pass, so gradients would silently stop there (candle issue #2168).
//!
//! Backward (the hand-written pass, [`RmsNorm::backward`]): with `r = 1/rms(x)` and
//! `x_hat = x * r`, `dweight = sum over tokens of dy * x_hat` and
//! `dx = r * (g - x_hat * mean(g * x_hat))` where `g = dy * weight`. It keeps nothing from the
//! forward pass but its input: `r` is recomputed.

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::Gradients;

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
        self.apply(x, &self.weight)
    }

    /// [`RmsNorm::forward`] outside the autograd graph (the hand-written pass).
    pub fn forward_untracked(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, &self.weight.detach())
    }

    /// The hand-written backward of [`RmsNorm::forward`] at input `x`: returns `dx` and adds
    /// `dweight` to `grads`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<Tensor> {
        let inv = self.inv_rms(x)?;
        let x_hat = x.broadcast_mul(&inv)?;
        let size = x.dim(D::Minus1)?;
        let dweight = (dy * &x_hat)?.reshape(((), size))?.sum(0)?;
        grads.add(&self.weight, dweight)?;
        let g = dy.broadcast_mul(&self.weight.detach())?;
        let mean = (&g * &x_hat)?.mean_keepdim(D::Minus1)?;
        (g - x_hat.broadcast_mul(&mean)?)?.broadcast_mul(&inv)
    }

    /// `1 / sqrt(mean(x^2) + eps)` over the last dimension, `[..., 1]`.
    fn inv_rms(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        (ms + self.eps)?.sqrt()?.recip()
    }

    fn apply(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.inv_rms(x)?)?.broadcast_mul(weight)
    }
}
