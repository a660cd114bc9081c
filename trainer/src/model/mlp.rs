//! SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6) with BitLinear
//! projections: `out = down_proj(silu(gate) * up)`.
//!
//! `gate_up` is one fused BitLinear [2F, hidden]: rows 0..F-1 are the gate, rows F..2F-1 the up
//! projection, each with its own weight scale.
//!
//! Backward of the gate (the hand-written pass): with `s = sigmoid(gate)`,
//! `d gate = dh * up * s * (1 + gate * (1 - s))` and `d up = dh * silu(gate)`.

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::Gradients;
use super::bitlinear::BitLinear;
use super::norm::RmsNorm;
use crate::config::ModelConfig;
use crate::cpu;

/// What the hand-written backward of one feed-forward layer reads: the quantized weights (once per
/// step) and the fused gate/up projection output `[batch, seq, 2F]`. Everything after it is
/// recomputed elementwise.
#[derive(Debug)]
pub struct MlpTape {
    w_gate_up: Tensor,
    w_down: Tensor,
    gate_up: Tensor,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: BitLinear,
    /// Optional RMSNorm on the input of down_proj (`model.sub_norm`).
    sub_norm: Option<RmsNorm>,
    down_proj: BitLinear,
    ffn_hidden_size: usize,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let f = cfg.ffn_hidden_size;
        let gate_up = BitLinear::load(vb.pp("gate_up"), cfg.hidden_size, &[f, f])?;
        let sub_norm = match cfg.sub_norm {
            true => Some(RmsNorm::load(vb.pp("sub_norm"), f, cfg.norm_eps)?),
            false => None,
        };
        let down_proj = BitLinear::load(vb.pp("down_proj"), f, &[cfg.hidden_size])?;
        Ok(Mlp {
            gate_up,
            sub_norm,
            down_proj,
            ffn_hidden_size: f,
        })
    }

    /// The inference form (see [`BitLinear::freeze`]).
    pub fn freeze(&self) -> Result<Self> {
        Ok(Mlp {
            gate_up: self.gate_up.freeze()?,
            sub_norm: self.sub_norm.as_ref().map(RmsNorm::freeze),
            down_proj: self.down_proj.freeze()?,
            ffn_hidden_size: self.ffn_hidden_size,
        })
    }

    /// `x: [batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = swiglu_with_tensor_ops(&self.gate_up.forward(x)?, self.ffn_hidden_size)?;
        let h = match &self.sub_norm {
            Some(norm) => norm.forward(&h)?,
            None => h,
        };
        self.down_proj.forward(&h)
    }

    /// The training forward of the hand-written pass: the output and what [`Mlp::backward`]
    /// needs. Same values as [`Mlp::forward`].
    pub fn forward_taped(&self, x: &Tensor) -> Result<(Tensor, MlpTape)> {
        let w_gate_up = self.gate_up.quantized_weight()?;
        let w_down = self.down_proj.quantized_weight()?;
        let gate_up = self.gate_up.forward_untracked(x, &w_gate_up)?;
        let h = swiglu(&gate_up, self.ffn_hidden_size)?;
        let h = match &self.sub_norm {
            Some(norm) => norm.forward_untracked(&h)?,
            None => h,
        };
        let out = self.down_proj.forward_untracked(&h, &w_down)?;
        Ok((
            out,
            MlpTape {
                w_gate_up,
                w_down,
                gate_up,
            },
        ))
    }

    /// The backward of [`Mlp::forward_taped`] at input `x`: returns `dx` and adds the gradients
    /// of the projections (and of the sub-norm) to `grads`.
    pub fn backward(
        &self,
        tape: MlpTape,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Gradients,
    ) -> Result<Tensor> {
        let h = swiglu(&tape.gate_up, self.ffn_hidden_size)?;
        let dh = match &self.sub_norm {
            Some(norm) => {
                let normed = norm.forward_untracked(&h)?;
                let d = self.down_proj.backward(&normed, &tape.w_down, dy, grads)?;
                norm.backward(&h, &d, grads)?
            }
            None => self.down_proj.backward(&h, &tape.w_down, dy, grads)?,
        };
        drop(h);
        let d_gate_up = swiglu_backward(&tape.gate_up, &dh, self.ffn_hidden_size)?;
        drop(tape.gate_up);
        self.gate_up.backward(x, &tape.w_gate_up, &d_gate_up, grads)
    }

    pub fn gate_up(&self) -> &BitLinear {
        &self.gate_up
    }

    pub fn down_proj(&self) -> &BitLinear {
        &self.down_proj
    }
}

/// `silu(gate) * up` from the fused projection output `gate_up: [..., 2F]`, outside the autograd
/// graph (one fused pass on the CPU, [`cpu::SwiGlu`]).
fn swiglu(gate_up: &Tensor, f: usize) -> Result<Tensor> {
    if cpu::fusable(gate_up) {
        return gate_up.contiguous()?.apply_op1_no_bwd(&cpu::SwiGlu);
    }
    swiglu_with_tensor_ops(gate_up, f)
}

/// [`swiglu`] composed from differentiable tensor ops (the autograd path's form).
fn swiglu_with_tensor_ops(gate_up: &Tensor, f: usize) -> Result<Tensor> {
    gate_up.narrow(D::Minus1, 0, f)?.silu()? * gate_up.narrow(D::Minus1, f, f)?
}

/// The gradient at `gate_up: [..., 2F]` from `dh` at `silu(gate) * up` (see the module doc).
fn swiglu_backward(gate_up: &Tensor, dh: &Tensor, f: usize) -> Result<Tensor> {
    if cpu::fusable(gate_up) {
        return gate_up
            .contiguous()?
            .apply_op2_no_bwd(&dh.contiguous()?, &cpu::SwiGluBackward);
    }
    swiglu_backward_with_tensor_ops(gate_up, dh, f)
}

fn swiglu_backward_with_tensor_ops(gate_up: &Tensor, dh: &Tensor, f: usize) -> Result<Tensor> {
    let gate = gate_up.narrow(D::Minus1, 0, f)?;
    let up = gate_up.narrow(D::Minus1, f, f)?;
    let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
    let d_silu = (&sig * ((&gate * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
    let d_gate = ((dh * &up)? * d_silu)?;
    let d_up = (dh * gate.silu()?)?;
    Tensor::cat(&[d_gate, d_up], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The largest difference relative to the largest value.
    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    /// The fused SwiGLU passes against the tensor ops, to a few ulp of the largest value: the
    /// fused form's `exp` is not libm's (`cpu::exp`, at most 2 ulp).
    #[test]
    fn fused_swiglu_equals_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let f = 50;
        let gate_up = (Tensor::randn(0f32, 1.0, (3, 7, 2 * f), &dev)? * 3.0)?;
        let dh = Tensor::randn(0f32, 1.0, (3, 7, f), &dev)?;
        let h = swiglu(&gate_up, f)?;
        assert!(max_rel(&h, &swiglu_with_tensor_ops(&gate_up, f)?)? < 1e-6);
        let d = swiglu_backward(&gate_up, &dh, f)?;
        assert!(max_rel(&d, &swiglu_backward_with_tensor_ops(&gate_up, &dh, f)?)? < 1e-6);
        Ok(())
    }
}
