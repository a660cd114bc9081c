//! Causal grouped-query attention for the hand-written training pass, computed in blocks of
//! query rows, keeping only the log-sum-exp of each row (the FlashAttention recipe, Dao et al.
//! 2022, sections 3.1-3.2, at the granularity of tensor ops).
//!
//! Forward, per block of `QUERY_BLOCK` query rows `i0..i1`: scores against keys `0..i1` only
//! (the later keys are masked anyway), softmax, output; the block's probabilities are dropped and
//! `lse = max + ln(sum exp(s - max))` is kept per row. Backward, per block: the probabilities are
//! recomputed as `P = exp(s - lse)`, then with `D = rowsum(dO * O)`:
//! `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - D)`, `dQ = dS K * scale`, `dK += dS^T Q * scale`.
//!
//! What a layer keeps between the passes is therefore q, k, v, o and one f32 per query row,
//! instead of several `[batch, heads, T, T]` tensors. Scale, mask and softmax are those of
//! [`super::attention::grouped_attention`], and the GQA layout too: kv head j serves query heads
//! `j*r .. j*r+r-1`, which are stacked along the row axis and share one matmul with their kv head.

use candle_core::{D, DType, Result, Tensor};

use super::matmul;

/// Query rows per block. The causal skip leaves (n + 1) / 2n of the full score matrix for n
/// blocks (56% at T = 1024); a block's scores are `batch * heads * 128 * T` f32.
const QUERY_BLOCK: usize = 128;

/// What the backward pass reads: the inputs, the output and the per-row log-sum-exp.
#[derive(Debug)]
pub struct FlashSaved {
    /// `[b, nh, t, hd]`, after RoPE.
    pub q: Tensor,
    /// `[b, nkv, t, hd]`, after RoPE.
    pub k: Tensor,
    /// `[b, nkv, t, hd]`.
    pub v: Tensor,
    /// `[b, nh, t, hd]`.
    pub o: Tensor,
    /// `[b, nkv, r, t, 1]`, f32.
    lse: Tensor,
}

/// Gradients of q, k and v, in their shapes.
pub struct FlashGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// The query rows `i0..i0+n` of `x: [b, nkv, r, t, hd]` as `[b, nkv, r*n, hd]`.
fn rows(x: &Tensor, i0: usize, n: usize) -> Result<Tensor> {
    let (b, nkv, r, _, hd) = x.dims5()?;
    x.narrow(3, i0, n)?
        .contiguous()?
        .reshape((b, nkv, r * n, hd))
}

/// The blocks `(i0, n)` covering `0..t`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(QUERY_BLOCK)
        .map(move |i0| (i0, QUERY_BLOCK.min(t - i0)))
}

/// Masked, scaled scores of query rows `i0..i0+n` against keys `0..i0+n`:
/// `[b, nkv, r, n, i0+n]`.
fn scores(
    q_rows: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    (r, i0, n): (usize, usize, usize),
    dtype: DType,
) -> Result<Tensor> {
    let (b, nkv, _, hd) = k.dims4()?;
    let keys = i0 + n;
    let k = k.narrow(2, 0, keys)?;
    let s = (matmul(q_rows, &k.t()?, dtype)? * (1.0 / (hd as f64).sqrt()))?;
    s.reshape((b, nkv, r, n, keys))?
        .broadcast_add(&mask.narrow(0, i0, n)?.narrow(1, 0, keys)?)
}

/// `q: [b, nh, t, hd]`, `k, v: [b, nkv, t, hd]` (contiguous), `mask: [t, t]` (0 / -inf, causal)
/// -> the output `[b, nh, t, hd]` and what [`backward`] needs.
pub fn forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: &Tensor,
    dtype: DType,
) -> Result<(Tensor, FlashSaved)> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let r = nh / nkv;
    let q5 = q.reshape((b, nkv, r, t, hd))?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (i0, n) in blocks(t) {
        let s = scores(&rows(&q5, i0, n)?, &k, mask, (r, i0, n), dtype)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        drop(s);
        let sum = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&sum)?.reshape((b, nkv, r * n, i0 + n))?;
        let o = matmul(&p, &v.narrow(2, 0, i0 + n)?, dtype)?;
        outs.push(o.reshape((b, nkv, r, n, hd))?);
        lses.push((max + sum.log()?)?);
    }
    let o = Tensor::cat(&outs, 3)?.reshape((b, nh, t, hd))?;
    let lse = Tensor::cat(&lses, 3)?;
    Ok((o.clone(), FlashSaved { q, k, v, o, lse }))
}

/// The gradients of q, k and v from `d_o: [b, nh, t, hd]`, recomputing the probabilities block by
/// block.
pub fn backward(
    saved: &FlashSaved,
    d_o: &Tensor,
    mask: &Tensor,
    dtype: DType,
) -> Result<FlashGrads> {
    let FlashSaved { q, k, v, o, lse } = saved;
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let r = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let q5 = q.reshape((b, nkv, r, t, hd))?;
    let o5 = o.reshape((b, nkv, r, t, hd))?;
    let do5 = d_o.reshape((b, nkv, r, t, hd))?;
    let mut dqs = Vec::new();
    let mut dk = k.zeros_like()?;
    let mut dv = v.zeros_like()?;
    for (i0, n) in blocks(t) {
        let keys = i0 + n;
        let q_rows = rows(&q5, i0, n)?;
        let do_rows = rows(&do5, i0, n)?;
        let delta = (&do_rows * rows(&o5, i0, n)?)?.sum_keepdim(D::Minus1)?;
        let p = scores(&q_rows, k, mask, (r, i0, n), dtype)?
            .broadcast_sub(&lse.narrow(3, i0, n)?)?
            .exp()?
            .reshape((b, nkv, r * n, keys))?;
        let v_keys = v.narrow(2, 0, keys)?;
        let k_keys = k.narrow(2, 0, keys)?;
        dv = (dv + matmul(&p.t()?, &do_rows, dtype)?.pad_with_zeros(2, 0, t - keys)?)?;
        let dp = matmul(&do_rows, &v_keys.t()?, dtype)?;
        let ds = ((p * dp.broadcast_sub(&delta)?)? * scale)?;
        dqs.push(matmul(&ds, &k_keys, dtype)?.reshape((b, nkv, r, n, hd))?);
        dk = (dk + matmul(&ds.t()?, &q_rows, dtype)?.pad_with_zeros(2, 0, t - keys)?)?;
    }
    Ok(FlashGrads {
        dq: Tensor::cat(&dqs, 3)?.reshape((b, nh, t, hd))?,
        dk,
        dv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::{causal_mask, grouped_attention};
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Output and gradients equal those of the composed attention under autograd, over several
    /// query blocks (t = 300: two full blocks and a partial one) and a GQA ratio of 3.
    #[test]
    fn blocks_match_the_composed_attention_and_its_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (b, nh, nkv, t, hd) = (2, 6, 2, 300, 8);
        let q = Var::randn(0f32, 1.0, (b, nh, t, hd), &dev)?;
        let k = Var::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?;
        let v = Var::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?;
        let d_o = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev)?;
        let mask = causal_mask(t, &dev)?;
        let reference = grouped_attention(&q, &k, &v, &mask, DType::F32)?;
        let grads = (&reference * &d_o)?.sum_all()?.backward()?;
        let (o, saved) = forward(
            q.as_tensor().detach(),
            k.as_tensor().detach(),
            v.as_tensor().detach(),
            &mask,
            DType::F32,
        )?;
        assert!(max_abs(&o, &reference)? < 1e-5);
        let g = backward(&saved, &d_o, &mask, DType::F32)?;
        for (name, mine, var) in [("q", &g.dq, &q), ("k", &g.dk, &k), ("v", &g.dv, &v)] {
            let expected = grads.get(var).expect("gradient reached the input");
            let d = max_abs(mine, expected)?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5 * scale.max(1.0), "d{name}: {d} (scale {scale})");
        }
        Ok(())
    }
}
