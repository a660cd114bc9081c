//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x^2, last dim) + eps) * weight`.
//!
//! Written as a composition of differentiable tensor ops: candle-nn 0.11's fused `rms_norm` has no
//! backward pass, so gradients would silently stop there (candle issue #2168).
//!
//! Backward (the hand-written pass, [`RmsNorm::backward`]): with `r = 1/rms(x)` and
//! `x_hat = x * r`, `dweight = sum over tokens of dy * x_hat` and
//! `dx = r * (g - x_hat * mean(g * x_hat))` where `g = dy * weight`. It keeps nothing from the
//! forward pass but its input: `r` is recomputed. On the CPU the untracked forward and the
//! backward are fused passes ([`crate::cpu::RmsNorm`] and the two after it).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::Gradients;
use crate::cpu;

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
        if cpu::fusable(x) {
            let norm = cpu::RmsNorm {
                eps: self.eps as f32,
            };
            return x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight.detach(), &norm);
        }
        self.apply(x, &self.weight.detach())
    }

    /// The hand-written backward of [`RmsNorm::forward`] at input `x`: returns `dx` and adds
    /// `dweight` to `grads`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<Tensor> {
        if cpu::fusable(x) {
            let eps = self.eps as f32;
            let (x, dy) = (x.contiguous()?, dy.contiguous()?);
            let dweight = x.apply_op2_no_bwd(&dy, &cpu::RmsNormWeightGrad { eps })?;
            grads.add(&self.weight, dweight)?;
            return x.apply_op3_no_bwd(&dy, &self.weight.detach(), &cpu::RmsNormBackward { eps });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// The fused CPU passes against the tensor ops, to f32 round-off (sums in another order).
    #[test]
    fn fused_passes_equal_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let mut norm = RmsNorm::load(vb, 40, 1e-5)?;
        norm.weight = Tensor::randn(1f32, 0.1, 40, &dev)?;
        let x = Tensor::randn(0f32, 2.0, (5, 9, 40), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (5, 9, 40), &dev)?;
        let y = norm.forward_untracked(&x)?;
        let mut grads = Gradients::default();
        let dx = norm.backward(&x, &dy, &mut grads)?;
        let (y_ops, dx_ops, grads_ops) = crate::cpu::with_tensor_ops_only(|| {
            let mut g = Gradients::default();
            let y = norm.forward_untracked(&x)?;
            let dx = norm.backward(&x, &dy, &mut g)?;
            Ok::<_, candle_core::Error>((y, dx, g))
        })?;
        assert!(max_abs(&y, &y_ops)? < 1e-6);
        assert!(max_abs(&dx, &dx_ops)? < 1e-5);
        let (dw, dw_ops) = (grads.get(&norm.weight), grads_ops.get(&norm.weight));
        assert!(max_abs(dw.expect("dweight"), dw_ops.expect("dweight"))? < 1e-4);
        Ok(())
    }
}
