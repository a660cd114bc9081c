//! Causal grouped-query attention for the hand-written training pass, computed in blocks of
//! query rows, keeping only the log-sum-exp of each row (the FlashAttention recipe, Dao et al.
//! 2022, sections 3.1-3.2, at the granularity of tensor ops).
//!
//! Forward, per block of `QUERY_BLOCK` query rows `i0..i1`: scores against keys `0..i1` only
//! (the later keys are masked anyway), `lse = max + ln(sum exp(s - max))` per row, the
//! probabilities `P = exp(s - lse)`, the output; the probabilities are dropped and the
//! log-sum-exp kept. Backward, per block: `P` is recomputed the same way, then with
//! `D = rowsum(dO * O)`: `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - D) * scale`, `dQ = dS K`,
//! `dK += dS^T Q`. On the CPU the scaling, masking, log-sum-exp, exponentials and `dS` are fused
//! passes ([`crate::cpu`]); the matmuls are candle's everywhere.
//!
//! What a layer keeps between the passes is therefore q, k, v, o and one f32 per query row,
//! instead of several `[batch, heads, T, T]` tensors. Scale, mask and softmax are those of
//! [`super::attention::grouped_attention`], and the GQA layout too: kv head j serves query heads
//! `j*r .. j*r+r-1`, which are stacked along the row axis and share one matmul with their kv head.

use candle_core::{D, DType, Result, Tensor};

use crate::cpu::{self, RowMask};

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
    /// Per query block, `[b, nkv, r*n, 1]`, f32.
    lse: Vec<Tensor>,
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

/// One block of query rows `i0..i0+n` (of `r` stacked query heads) against keys `0..i0+n`.
#[derive(Debug, Clone, Copy)]
struct Block {
    r: usize,
    i0: usize,
    n: usize,
    /// `1 / sqrt(head_dim)`.
    scale: f64,
}

impl Block {
    fn keys(&self) -> usize {
        self.i0 + self.n
    }

    fn cpu_mask(&self) -> RowMask {
        RowMask::Causal {
            first: self.i0,
            n: self.n,
        }
    }

    /// The unscaled scores `q_rows @ k^T` of the block, `[b, nkv, r*n, keys]`.
    fn raw_scores(&self, q_rows: &Tensor, k: &Tensor, dtype: DType) -> Result<Tensor> {
        batched_matmul(q_rows, &k.narrow(2, 0, self.keys())?.t()?, dtype)
    }

    /// Tensor ops: the scaled scores with the causal mask added (`-inf` above the diagonal).
    fn masked(&self, s: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, nkv, rn, keys) = s.dims4()?;
        (s * self.scale)?
            .reshape((b, nkv, self.r, self.n, keys))?
            .broadcast_add(&mask.narrow(0, self.i0, self.n)?.narrow(1, 0, keys)?)?
            .reshape((b, nkv, rn, keys))
    }

    /// The log-sum-exp of each row of the scaled, masked scores, `[b, nkv, r*n, 1]`.
    fn log_sum_exp(&self, s: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if cpu::fusable(s) {
            return s.apply_op1_no_bwd(&cpu::RowLogSumExp {
                scale: self.scale as f32,
                mask: self.cpu_mask(),
            });
        }
        let x = self.masked(s, mask)?;
        let max = x.max_keepdim(D::Minus1)?;
        max.broadcast_add(
            &x.broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?,
        )
    }

    /// The probabilities `exp(scaled masked scores - lse)` from the raw scores (overwritten on
    /// the CPU).
    fn probabilities(&self, s: Tensor, lse: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if cpu::fusable(&s) {
            s.inplace_op2(
                lse,
                &cpu::SoftmaxFromLse {
                    scale: self.scale as f32,
                    mask: self.cpu_mask(),
                },
            )?;
            return Ok(s);
        }
        self.masked(&s, mask)?.broadcast_sub(lse)?.exp()
    }
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
    let scale = 1.0 / (hd as f64).sqrt();
    let q5 = q.reshape((b, nkv, r, t, hd))?;
    let mut outs = Vec::new();
    let mut lse = Vec::new();
    for (i0, n) in blocks(t) {
        let block = Block { r, i0, n, scale };
        let s = block.raw_scores(&rows(&q5, i0, n)?, &k, dtype)?;
        let block_lse = block.log_sum_exp(&s, mask)?;
        let p = block.probabilities(s, &block_lse, mask)?;
        let o = batched_matmul(&p, &v.narrow(2, 0, block.keys())?, dtype)?;
        outs.push(o.reshape((b, nkv, r, n, hd))?);
        lse.push(block_lse);
    }
    let o = Tensor::cat(&outs, 3)?.reshape((b, nh, t, hd))?;
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
    for ((i0, n), block_lse) in blocks(t).zip(lse) {
        let block = Block { r, i0, n, scale };
        let keys = block.keys();
        let q_rows = rows(&q5, i0, n)?;
        let do_rows = rows(&do5, i0, n)?;
        let delta = (&do_rows * rows(&o5, i0, n)?)?.sum_keepdim(D::Minus1)?;
        let s = block.raw_scores(&q_rows, k, dtype)?;
        let p = block.probabilities(s, block_lse, mask)?;
        let v_keys = v.narrow(2, 0, keys)?;
        let k_keys = k.narrow(2, 0, keys)?;
        dv = (dv + batched_matmul(&p.t()?, &do_rows, dtype)?.pad_with_zeros(2, 0, t - keys)?)?;
        let dp = batched_matmul(&do_rows, &v_keys.t()?, dtype)?;
        let ds = softmax_backward(dp, &p, &delta, scale)?;
        dqs.push(batched_matmul(&ds, &k_keys, dtype)?.reshape((b, nkv, r, n, hd))?);
        dk = (dk + batched_matmul(&ds.t()?, &q_rows, dtype)?.pad_with_zeros(2, 0, t - keys)?)?;
    }
    Ok(FlashGrads {
        dq: Tensor::cat(&dqs, 3)?.reshape((b, nh, t, hd))?,
        dk,
        dv,
    })
}

/// `dS = (P * (dP - delta)) * scale` (`dp` overwritten on the CPU).
fn softmax_backward(dp: Tensor, p: &Tensor, delta: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu::fusable(&dp) {
        dp.inplace_op3(
            p,
            delta,
            &cpu::SoftmaxBackward {
                scale: scale as f32,
            },
        )?;
        return Ok(dp);
    }
    (p * dp.broadcast_sub(delta)?)? * scale
}

/// `a @ b` over the batch dimensions (see [`super::matmul`]): on the CPU in f32 one thread per
/// matrix ([`cpu::batched::BatchedMatmul`]), the attention's products being many and small.
fn batched_matmul(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if cpu::fusable(a) && dtype == DType::F32 && a.rank() >= 3 {
        return a.apply_op2_no_bwd(b, &cpu::batched::BatchedMatmul);
    }
    super::matmul(a, b, dtype)
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
