//! Causal grouped-query self-attention (Ainslie et al. 2023, GQA) with RoPE and BitLinear
//! projections.
//!
//! `qkv_proj` is one fused BitLinear [(nh + 2*nkv) * hd, hidden] whose rows are the nh query heads,
//! then the nkv key heads, then the nkv value heads (hd rows each); each of q, k and v gets its own
//! weight scale. Key/value head j serves query heads j*r .. j*r+r-1 (r = nh / nkv), computed
//! without materialising repeated k/v: the r query heads of a group are stacked along the
//! sequence axis and share one matmul with their kv head. Softmax is composed from differentiable
//! ops (candle-nn 0.11's `softmax_last_dim` has no backward, candle issue #2168).

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::bitlinear::BitLinear;
use super::flash::{self, FlashSaved};
use super::norm::RmsNorm;
use super::rope::Rope;
use super::{Gradients, matmul, matmul_dtype_for};
use crate::config::ModelConfig;

/// What the hand-written backward of one attention layer reads: the quantized weights (once per
/// step) and the attention's q, k, v, output and row log-sum-exp. The layer input is not kept:
/// the block recomputes it from its residual input.
#[derive(Debug)]
pub struct AttentionTape {
    w_qkv: Tensor,
    w_out: Tensor,
    flash: FlashSaved,
}

/// One layer's keys and values of the positions seen so far, `[batch, nkv, len, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKvCache {
    /// Appends `k, v: [batch, nkv, t, head_dim]`; returns the keys and values of every position
    /// held, `[batch, nkv, len + t, head_dim]`.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.kv {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    qkv_proj: BitLinear,
    /// Optional RMSNorm on the input of out_proj (`model.sub_norm`).
    sub_norm: Option<RmsNorm>,
    out_proj: BitLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    matmul_dtype: DType,
}

impl Attention {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim());
        let qkv_proj = BitLinear::load(
            vb.pp("qkv_proj"),
            cfg.hidden_size,
            &[nh * hd, nkv * hd, nkv * hd],
        )?;
        let sub_norm = match cfg.sub_norm {
            true => Some(RmsNorm::load(vb.pp("sub_norm"), nh * hd, cfg.norm_eps)?),
            false => None,
        };
        let out_proj = BitLinear::load(vb.pp("out_proj"), nh * hd, &[cfg.hidden_size])?;
        Ok(Attention {
            qkv_proj,
            sub_norm,
            out_proj,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            matmul_dtype: matmul_dtype_for(vb.device()),
        })
    }

    /// The inference form (see [`BitLinear::freeze`]).
    pub fn freeze(&self) -> Result<Self> {
        Ok(Attention {
            qkv_proj: self.qkv_proj.freeze()?,
            sub_norm: self.sub_norm.as_ref().map(RmsNorm::freeze),
            out_proj: self.out_proj.freeze()?,
            ..self.clone()
        })
    }

    /// `x: [batch, seq, hidden] -> [batch, seq, hidden]` for the positions
    /// `index_pos .. index_pos + seq`. Without `cache` the keys are this call's; with it, the
    /// cached positions come first and this call's keys and values are appended.
    /// `mask: [seq, keys]` (0 or -inf), keys = cached + seq.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        index_pos: usize,
        mask: &Tensor,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward(x)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, start * hd, n * hd)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope.forward(&heads(0, nh)?, index_pos)?;
        let k = rope.forward(&heads(nh, nkv)?, index_pos)?;
        let v = heads(nh + nkv, nkv)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let y = grouped_attention(&q, &k, &v, mask, self.matmul_dtype)?;
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let y = match &self.sub_norm {
            Some(norm) => norm.forward(&y)?,
            None => y,
        };
        self.out_proj.forward(&y)
    }

    /// The training forward of the hand-written pass, from position 0 without a cache:
    /// `x: [batch, seq, hidden]` (the normed block input) -> the output and what
    /// [`Attention::backward`] needs. Same values as [`Attention::forward`] up to the summation
    /// order of the blocked softmax.
    pub fn forward_taped(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
    ) -> Result<(Tensor, AttentionTape)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let w_qkv = self.qkv_proj.quantized_weight()?;
        let w_out = self.out_proj.quantized_weight()?;
        let qkv = self.qkv_proj.forward_untracked(x, &w_qkv)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, start * hd, n * hd)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope.forward(&heads(0, nh)?, 0)?;
        let k = rope.forward(&heads(nh, nkv)?, 0)?;
        let v = heads(nh + nkv, nkv)?;
        drop(qkv);
        let (o, flash) = flash::forward(q, k, v, mask, self.matmul_dtype)?;
        let y = o.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let y = match &self.sub_norm {
            Some(norm) => norm.forward_untracked(&y)?,
            None => y,
        };
        let out = self.out_proj.forward_untracked(&y, &w_out)?;
        Ok((
            out,
            AttentionTape {
                w_qkv,
                w_out,
                flash,
            },
        ))
    }

    /// The backward of [`Attention::forward_taped`] at input `x`: returns `dx` and adds the
    /// gradients of the projections (and of the sub-norm) to `grads`.
    pub fn backward(
        &self,
        tape: AttentionTape,
        x: &Tensor,
        dy: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        grads: &mut Gradients,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let y = tape.flash.o.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let dy = match &self.sub_norm {
            Some(norm) => {
                let normed = norm.forward_untracked(&y)?;
                let d = self.out_proj.backward(&normed, &tape.w_out, dy, grads)?;
                norm.backward(&y, &d, grads)?
            }
            None => self.out_proj.backward(&y, &tape.w_out, dy, grads)?,
        };
        drop(y);
        let d_o = dy.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let g = flash::backward(&tape.flash, &d_o, mask, self.matmul_dtype)?;
        drop(tape.flash);
        let merge = |x: &Tensor, n: usize| x.transpose(1, 2)?.reshape((b, t, n * hd));
        let dqkv = Tensor::cat(
            &[
                merge(&rope.backward(&g.dq, 0)?, nh)?,
                merge(&rope.backward(&g.dk, 0)?, nkv)?,
                merge(&g.dv, nkv)?,
            ],
            D::Minus1,
        )?;
        self.qkv_proj.backward(x, &tape.w_qkv, &dqkv, grads)
    }

    pub fn qkv_proj(&self) -> &BitLinear {
        &self.qkv_proj
    }

    pub fn out_proj(&self) -> &BitLinear {
        &self.out_proj
    }
}

/// Causal attention with scale 1/sqrt(head_dim) where kv head j serves query heads j*r..j*r+r-1.
/// `q: [b, nh, t, hd]`, `k, v: [b, nkv, s, hd]`, `mask: [t, s]` -> `[b, nh, t, hd]` (s = t
/// in training; s = cached + t with a key/value cache).
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    matmul_dtype: DType,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, s) = (k.dim(1)?, k.dim(2)?);
    let r = nh / nkv;
    // Query heads j*r..j*r+r-1 are consecutive, so this reshape groups them under kv head j.
    let q = q.reshape((b, nkv, r * t, hd))?;
    let scores = (matmul(&q, &k.t()?, matmul_dtype)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = scores.reshape((b, nkv, r, t, s))?.broadcast_add(mask)?;
    let probs = softmax_last_dim(&scores)?.reshape((b, nkv, r * t, s))?;
    matmul(&probs, v, matmul_dtype)?.reshape((b, nh, t, hd))
}

/// Numerically stable softmax over the last dimension, differentiable (the max is a constant).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `[t, t]` additive causal mask: 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Plain multi-head attention over explicitly repeated kv heads (repeat_interleave).
    fn repeated_heads_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let nh = q.dim(1)?;
        let nkv = k.dim(1)?;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let heads: Vec<Tensor> = (0..nh)
                .map(|h| x.narrow(1, h / (nh / nkv), 1))
                .collect::<Result<_>>()?;
            Tensor::cat(&heads, 1)
        };
        grouped_attention(q, &repeat(k)?, &repeat(v)?, mask, DType::F32)
    }

    #[test]
    fn gqa_equals_explicit_head_repetition() -> Result<()> {
        let dev = Device::Cpu;
        let (b, nh, nkv, t, hd) = (2, 6, 2, 5, 4);
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?;
        let mask = causal_mask(t, &dev)?;
        let a = grouped_attention(&q, &k, &v, &mask, DType::F32)?;
        let e = repeated_heads_attention(&q, &k, &v, &mask)?;
        let d = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "max difference {d}");
        Ok(())
    }

    #[test]
    fn attention_is_causal() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 4, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 4, 4), &dev)?;
        let mask = causal_mask(4, &dev)?;
        let full = grouped_attention(&q, &k, &v, &mask, DType::F32)?;
        // Changing the last position's k/v must not change earlier outputs.
        let k2 = Tensor::cat(&[k.narrow(2, 0, 3)?, (k.narrow(2, 3, 1)? + 5.0)?], 2)?;
        let v2 = Tensor::cat(&[v.narrow(2, 0, 3)?, (v.narrow(2, 3, 1)? - 5.0)?], 2)?;
        let part = grouped_attention(&q, &k2, &v2, &mask, DType::F32)?;
        let d = (full.narrow(2, 0, 3)? - part.narrow(2, 0, 3)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
