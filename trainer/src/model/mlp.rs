//! SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6) with BitLinear
//! projections: `out = down_proj(silu(gate) * up)`.
//!
//! `gate_up` is one fused BitLinear [2F, hidden]: rows 0..F-1 are the gate, rows F..2F-1 the up
//! projection, each with its own weight scale.

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::bitlinear::BitLinear;
use super::norm::RmsNorm;
use crate::config::ModelConfig;

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
