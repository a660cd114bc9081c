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
        let (_, _, h) = self.hidden(&self.gate_up.forward(x)?)?;
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
        let (_, _, h) = self.hidden(&gate_up)?;
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
        let (gate, up, h) = self.hidden(&tape.gate_up)?;
        let dh = match &self.sub_norm {
            Some(norm) => {
                let normed = norm.forward_untracked(&h)?;
                let d = self.down_proj.backward(&normed, &tape.w_down, dy, grads)?;
                norm.backward(&h, &d, grads)?
            }
            None => self.down_proj.backward(&h, &tape.w_down, dy, grads)?,
        };
        drop(h);
        let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let d_silu = (&sig * ((&gate * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
        let d_gate = ((&dh * &up)? * d_silu)?;
        let d_up = (&dh * gate.silu()?)?;
        drop(tape.gate_up);
        let d_gate_up = Tensor::cat(&[d_gate, d_up], D::Minus1)?;
        self.gate_up.backward(x, &tape.w_gate_up, &d_gate_up, grads)
    }

    /// `gate, up` (views of the fused projection output) and `silu(gate) * up`.
    fn hidden(&self, gate_up: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let f = self.ffn_hidden_size;
        let gate = gate_up.narrow(D::Minus1, 0, f)?;
        let up = gate_up.narrow(D::Minus1, f, f)?;
        let h = (gate.silu()? * &up)?;
        Ok((gate, up, h))
    }

    pub fn gate_up(&self) -> &BitLinear {
        &self.gate_up
    }

    pub fn down_proj(&self) -> &BitLinear {
        &self.down_proj
    }
}
