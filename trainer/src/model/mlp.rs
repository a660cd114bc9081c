//! SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6) with BitLinear
//! projections: `out = down_proj(silu(gate) * up)`.
//!
//! `gate_up` is one fused BitLinear [2F, hidden]: rows 0..F-1 are the gate, rows F..2F-1 the up
//! projection, each with its own weight scale.

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::ModelShape;
use super::bitlinear::BitLinear;
use super::norm::RmsNorm;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: BitLinear,
    /// Optional RMSNorm on the input of down_proj (`model.sub_norm`).
    sub_norm: Option<RmsNorm>,
    down_proj: BitLinear,
    ffn_hidden_size: usize,
}

impl Mlp {
    pub fn load(vb: VarBuilder, s: &ModelShape) -> Result<Self> {
        let f = s.ffn_hidden_size;
        let gate_up = BitLinear::load(vb.pp("gate_up"), s.hidden_size, &[f, f], s.matmul_dtype)?;
        let sub_norm = match s.sub_norm {
            true => Some(RmsNorm::load(vb.pp("sub_norm"), f, s.norm_eps)?),
            false => None,
        };
        let down_proj = BitLinear::load(vb.pp("down_proj"), f, &[s.hidden_size], s.matmul_dtype)?;
        Ok(Mlp {
            gate_up,
            sub_norm,
            down_proj,
            ffn_hidden_size: f,
        })
    }

    /// `x: [batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.ffn_hidden_size;
        let gu = self.gate_up.forward(x)?;
        let gate = gu.narrow(D::Minus1, 0, f)?;
        let up = gu.narrow(D::Minus1, f, f)?;
        let h = (gate.silu()? * up)?;
        let h = match &self.sub_norm {
            Some(norm) => norm.forward(&h)?,
            None => h,
        };
        self.down_proj.forward(&h)
    }

    pub fn gate_up(&self) -> &BitLinear {
        &self.gate_up
    }

    pub fn down_proj(&self) -> &BitLinear {
        &self.down_proj
    }
}
