//! BitLinear of BitNet b1.58 (Ma et al. 2024, arXiv:2402.17764, eqs. 1-3; activation quantization
//! as in BitNet, arXiv:2310.11453 eq. 4).
//!
//! - Activations, per token: `s = 127 / max(max|x|, 1e-5)`, `x_q = clamp(round(x * s), -128, 127) / s`.
//! - Weights, per original projection: `gamma = max(mean|W|, 1e-5)`,
//!   `W_q = clamp(round(W / gamma), -1, 1) * gamma`. A fused weight (qkv, gate_up) is quantized part
//!   by part, each with its own gamma, exactly as separate BitLinear layers would be.
//! - Straight-through estimator: the forward uses the quantized values, the backward treats both
//!   quantizers as the identity (`dx = dy @ W_q`, `dW = dy^T @ x_q`). It is written as
//!   `q(x).detach() + (x - x.detach())`: the second term is exactly zero in the forward pass (so the
//!   forward values are the quantized ones bit for bit) and has gradient 1 with respect to `x`.
//! - Quantization runs in f32; the matmul runs in the model's matmul dtype (bf16 on CUDA).
//! - Inference ([`BitLinear::freeze`]): the weight is quantized once and kept transposed
//!   (`W_q^T`, [in, out], contiguous); each call only quantizes the activations. Same values as the
//!   training forward, no straight-through terms and no graph.
//!
//! - The hand-written pass ([`BitLinear::forward_untracked`], [`BitLinear::backward`]) quantizes
//!   the weight once per step and keeps nothing of the activations: the backward recomputes
//!   `q(x)` from the layer input, which the caller keeps anyway, bit for bit.
//!
//! Rounding: candle's `round` rounds halves away from zero, torch's to even; this only differs at
//! exact ties.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{Gradients, matmul, matmul_dtype_for};
use crate::cpu;

/// A bias-free linear layer with ternary weights and int8 activations.
#[derive(Debug, Clone)]
pub struct BitLinear {
    /// [out_features, in_features], f32 latent (master) weights.
    weight: Tensor,
    /// Row counts of the original projections fused in `weight` (one gamma each).
    parts: Vec<usize>,
    /// `W_q^T` [in_features, out_features], quantized once by [`BitLinear::freeze`]; `None` while
    /// training.
    frozen_t: Option<Tensor>,
    matmul_dtype: DType,
}

impl BitLinear {
    /// `weight: [sum(parts), in_features]`.
    pub fn load(vb: VarBuilder, in_features: usize, parts: &[usize]) -> Result<Self> {
        let out: usize = parts.iter().sum();
        let weight = vb.get((out, in_features), "weight")?;
        Ok(BitLinear {
            matmul_dtype: matmul_dtype_for(weight.device()),
            weight,
            parts: parts.to_vec(),
            frozen_t: None,
        })
    }

    /// The inference form: the weight detached and quantized once.
    pub fn freeze(&self) -> Result<Self> {
        let weight = self.weight.detach();
        let frozen_t = quantize_weight(&weight, &self.parts)?.t()?.contiguous()?;
        Ok(BitLinear {
            weight,
            parts: self.parts.clone(),
            frozen_t: Some(frozen_t),
            matmul_dtype: self.matmul_dtype,
        })
    }

    /// `x: [batch, seq, in_features] -> [batch, seq, out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w_t) = &self.frozen_t {
            return matmul(&quantize_activations(x)?, w_t, self.matmul_dtype);
        }
        let x_q = straight_through(x, &quantize_activations(&x.detach())?)?;
        let w_q = straight_through(
            &self.weight,
            &quantize_weight(&self.weight.detach(), &self.parts)?,
        )?;
        matmul(&x_q, &w_q.t()?, self.matmul_dtype)
    }

    /// `W_q` [out_features, in_features], outside the autograd graph: what the hand-written pass
    /// multiplies by, forward and backward.
    pub fn quantized_weight(&self) -> Result<Tensor> {
        quantize_weight(&self.weight.detach(), &self.parts)
    }

    /// `y = q(x) @ w_q^T` outside the autograd graph, `w_q` from [`BitLinear::quantized_weight`]
    /// (on integers where the CPU has AVX-512 VNNI, [`cpu::int8`]).
    pub fn forward_untracked(&self, x: &Tensor, w_q: &Tensor) -> Result<Tensor> {
        if cpu::fusable(x) && self.matmul_dtype == DType::F32 && cpu::int8::available() {
            return x
                .contiguous()?
                .apply_op2_no_bwd(&w_q.contiguous()?, &cpu::int8::Int8Linear);
        }
        matmul(&quantize_activations(x)?, &w_q.t()?, self.matmul_dtype)
    }

    /// The straight-through backward at input `x: [..., in]`: returns `dx = dy @ W_q` and adds
    /// `dW = dy^T @ q(x)` (summed over every token) to `grads`.
    pub fn backward(
        &self,
        x: &Tensor,
        w_q: &Tensor,
        dy: &Tensor,
        grads: &mut Gradients,
    ) -> Result<Tensor> {
        let (out, inp) = w_q.dims2()?;
        let x_q = quantize_activations(x)?.reshape(((), inp))?;
        let dy_2d = dy.reshape(((), out))?;
        grads.add(&self.weight, matmul(&dy_2d.t()?, &x_q, self.matmul_dtype)?)?;
        matmul(dy, w_q, self.matmul_dtype)
    }

    /// The latent weight, [out_features, in_features].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Row counts of the projections fused in the weight, one weight scale each.
    pub fn parts(&self) -> &[usize] {
        &self.parts
    }

    /// The ternary levels {-1, 0, +1} of the weight (for statistics), [out_features, in_features].
    pub fn ternary_levels(&self) -> Result<Tensor> {
        let mut levels = Vec::with_capacity(self.parts.len());
        let mut offset = 0;
        for &rows in &self.parts {
            let w = self.weight.narrow(0, offset, rows)?.detach();
            levels.push(
                w.broadcast_div(&absmean(&w)?)?
                    .round()?
                    .clamp(-1f32, 1f32)?,
            );
            offset += rows;
        }
        Tensor::cat(&levels, 0)
    }
}

/// Forward value `q`, gradient of the identity with respect to `x`.
fn straight_through(x: &Tensor, q: &Tensor) -> Result<Tensor> {
    q.add(&(x - x.detach())?)
}

/// Per-token 8-bit absmax fake quantization, `x: [..., features]` (one fused pass on the CPU,
/// the same values as the tensor ops).
pub fn quantize_activations(x: &Tensor) -> Result<Tensor> {
    if cpu::fusable(x) {
        return x.contiguous()?.apply_op1_no_bwd(&cpu::QuantizeActivations);
    }
    quantize_activations_with_tensor_ops(x)
}

fn quantize_activations_with_tensor_ops(x: &Tensor) -> Result<Tensor> {
    let s = x
        .abs()?
        .max_keepdim(D::Minus1)?
        .clamp(1e-5f32, f32::INFINITY)?
        .recip()?
        .affine(127.0, 0.0)?;
    x.broadcast_mul(&s)?
        .round()?
        .clamp(-128f32, 127f32)?
        .broadcast_div(&s)
}

/// `max(mean|w|, 1e-5)` as a 0-dim tensor.
fn absmean(w: &Tensor) -> Result<Tensor> {
    w.abs()?.mean_all()?.clamp(1e-5f32, f32::INFINITY)
}

/// Ternary absmean fake quantization, one scale per row group in `parts` (one fused pass per part
/// on the CPU, see [`cpu::QuantizeWeight`]).
pub fn quantize_weight(w: &Tensor, parts: &[usize]) -> Result<Tensor> {
    if cpu::fusable(w) {
        return w
            .contiguous()?
            .apply_op1_no_bwd(&cpu::QuantizeWeight { parts });
    }
    quantize_weight_with_tensor_ops(w, parts)
}

fn quantize_weight_with_tensor_ops(w: &Tensor, parts: &[usize]) -> Result<Tensor> {
    let mut out = Vec::with_capacity(parts.len());
    let mut offset = 0;
    for &rows in parts {
        let part = w.narrow(0, offset, rows)?;
        let gamma = absmean(&part)?;
        out.push(
            part.broadcast_div(&gamma)?
                .round()?
                .clamp(-1f32, 1f32)?
                .broadcast_mul(&gamma)?,
        );
        offset += rows;
    }
    Tensor::cat(&out, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn quantizers_match_hand_values() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -1.0, 0.25, 0.0]], &dev)?;
        let q: Vec<f32> = quantize_activations(&x)?.flatten_all()?.to_vec1()?;
        // s = 127: 0.5*127 = 63.5 -> 64 (half away from zero), 0.25*127 = 31.75 -> 32.
        assert_eq!(q, vec![64.0 / 127.0, -1.0, 32.0 / 127.0, 0.0]);
        // Two parts with different scales: gamma 1.0 for the first row, 0.1 for the second.
        let w = Tensor::new(&[[1.4f32, -0.4, 0.6, -1.6], [0.1, -0.1, 0.04, 0.16]], &dev)?;
        let q: Vec<f32> = quantize_weight(&w, &[1, 1])?.flatten_all()?.to_vec1()?;
        let expect = [1.0, 0.0, 1.0, -1.0, 0.1, -0.1, 0.0, 0.1];
        for (a, b) in q.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{q:?}");
        }
        Ok(())
    }

    /// The fused CPU quantizers against their tensor ops: the activations bit for bit; the weight
    /// to its last bits (gamma's sum is taken in another order), with the same ternary levels.
    #[test]
    fn fused_quantizers_equal_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (37, 300), &dev)? * 4.0)?;
        let fused = quantize_activations(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let ops = quantize_activations_with_tensor_ops(&x)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(
            fused
                .iter()
                .zip(&ops)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let w = Tensor::randn(0f32, 0.02, (96, 130), &dev)?;
        let fused = quantize_weight(&w, &[64, 32])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let ops = quantize_weight_with_tensor_ops(&w, &[64, 32])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in fused.iter().zip(&ops) {
            assert_eq!(
                a.signum() * (*a != 0.0) as i32 as f32,
                b.signum() * (*b != 0.0) as i32 as f32
            );
            assert!((a - b).abs() <= 2e-6 * b.abs(), "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn straight_through_gradients_are_the_identity() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[0.3f32, -0.7, 0.11], &dev)?)?;
        let q = quantize_activations(&x.detach())?;
        let y = straight_through(&x, &q)?;
        assert_eq!(
            y.to_vec1::<f32>()?,
            q.to_vec1::<f32>()?,
            "forward is exactly q(x)"
        );
        let grads = (y * Tensor::new(&[1f32, 2.0, 3.0], &dev)?)?
            .sum_all()?
            .backward()?;
        assert_eq!(
            grads.get(&x).unwrap().to_vec1::<f32>()?,
            vec![1.0, 2.0, 3.0]
        );
        Ok(())
    }
}
