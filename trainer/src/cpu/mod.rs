//! Fused CPU passes for the elementwise work of the hand-written training pass.
//!
//! Each kernel does in one pass over f32 memory, split by rows across the thread pool, what a
//! chain of candle tensor ops does in several single-purpose passes, each allocating a new tensor.
//! The model calls them on the CPU only; every other device keeps the tensor ops, which remain
//! the reference: the tests below check each kernel against its tensor-op form, bit for bit where
//! the arithmetic is the same sequence of f32 operations, and say the tolerance where a sum is
//! taken in another order.
//!
//! Measured effect in BENCHMARKS.md ("Trainer memory and step time against PyTorch").

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Result,
    Shape, Tensor,
};
use rayon::prelude::*;

pub mod batched;
pub mod int8;

/// Rows per task: enough work that scheduling is noise (a 768-wide row is about a microsecond).
const MIN_ROWS_PER_TASK: usize = 16;

/// The contiguous f32 memory of a tensor.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(x), Some((start, end))) => Ok(&x[start..end]),
        _ => candle_core::bail!("{what} must be a contiguous f32 tensor"),
    }
}

/// The contiguous f32 memory of a tensor, to write in place.
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(x), Some((start, end))) => Ok(&mut x[start..end]),
        _ => candle_core::bail!("{what} must be a contiguous f32 tensor"),
    }
}

/// The last dimension of a layout (the row length of the kernels).
fn row_len(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("a fused kernel needs a non-empty last dimension"),
    }
}

/// Whether `x` can take the fused CPU path: a CPU f32 tensor (and, in tests, the thread has not
/// asked for the tensor ops that other devices run, [`with_tensor_ops_only`]).
pub fn fusable(x: &Tensor) -> bool {
    #[cfg(test)]
    if TENSOR_OPS_ONLY.get() {
        return false;
    }
    x.device().is_cpu() && x.dtype() == DType::F32
}

#[cfg(test)]
thread_local! {
    static TENSOR_OPS_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every fused pass of this thread replaced by its tensor ops: the path CUDA takes,
/// tested on the CPU.
#[cfg(test)]
pub fn with_tensor_ops_only<R>(f: impl FnOnce() -> R) -> R {
    TENSOR_OPS_ONLY.set(true);
    let r = f();
    TENSOR_OPS_ONLY.set(false);
    r
}

/// `f32::round` (halves away from zero, signed zeros kept) written so that it vectorizes: the
/// baseline x86-64 target has no rounding instruction, so `f32::round` is a call per element.
/// Exact for `|v| < 2^31`; larger values saturate, which every caller clamps away. NaN stays NaN.
#[inline(always)]
pub fn round_half_away(v: f32) -> f32 {
    let t = ((v as i32) as f32).copysign(v);
    let r = if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    };
    if v.is_nan() { v } else { r }
}

/// Defines a row function twice, compiled for AVX-512 and for the baseline target, and calls
/// the first where the CPU has AVX-512F (checked once, then a cached load). The kernels' loops are
/// plain Rust that the compiler vectorizes: 16 f32 lanes under AVX-512F, 4 on the x86-64
/// baseline (SSE2).
macro_rules! vectorized {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// `e^x` in f32 without a call per element, so that a loop of it vectorizes (libm's `expf` is a
/// scalar call): Cody-Waite reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, and Cephes' degree-6
/// polynomial for `e^r` (`expf.c`, S. Moshier). At most 2 ulp from the correctly rounded value
/// (test `exp_is_within_two_ulp`); 0 below -87 (where `e^x < 1.7e-38`), NaN stays NaN. Arguments
/// above 88 are clamped there: the kernels only take it of `x <= 0` (softmax) and of `-g` for a
/// SiLU input `g`, where `g / (1 + e^-g)` is then below 1e-35 in magnitude either way.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (|t| < 2^22 here).
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(-87.0, 88.0);
    let n = (c * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 { 0.0 } else { e * two_n }
}

/// Lanes of the row reductions: independent partial results the compiler keeps in one vector
/// register (a sequential f32 sum or max cannot be vectorized, its order is fixed).
const LANES: usize = 16;

/// `fold(init, f(x_i))` over `x` in `LANES` interleaved partial folds, combined at the end with
/// the same `fold`. For `max` the result is the sequential one; for `+` it is the same sum in
/// another order.
#[inline(always)]
fn fold_lanes(x: &[f32], init: f32, f: impl Fn(f32) -> f32, fold: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = fold(acc[j], f(c[j]));
        }
    }
    let head = acc.into_iter().fold(init, &fold);
    rest.iter().fold(head, |a, &v| fold(a, f(v)))
}

/// Per-token 8-bit absmax fake quantization of the rows of `x` (see
/// [`crate::model::bitlinear::quantize_activations`]): `s = 127 / max(max|x|, 1e-5)`,
/// `clamp(round(x * s), -128, 127) / s`, the same f32 operations as the tensor ops.
pub struct QuantizeActivations;

impl CustomOp1 for QuantizeActivations {
    fn name(&self) -> &'static str {
        "quantize-activations"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "quantize-activations: the input")?;
        let n = row_len(l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(y, x)| quantize_activation_row(x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

vectorized! {
    fn quantize_activation_row(x: &[f32], y: &mut [f32]) {
        let amax = fold_lanes(x, 0.0, f32::abs, f32::max);
        let s = (1.0 / amax.max(1e-5)) * 127.0 + 0.0;
        for (y, &x) in y.iter_mut().zip(x) {
            *y = round_half_away(x * s).clamp(-128.0, 127.0) / s;
        }
    }
}

vectorized! {
    /// The int8 levels of [`quantize_activation_row`] plus 128 into `a` (bytes 0..=255), and
    /// the row's scale `s` (NaN where the row holds a NaN or an infinity, as the f32 form's
    /// output would be).
    fn quantize_row_to_bytes(x: &[f32], a: &mut [u8]) -> f32 {
        let amax = fold_lanes(x, 0.0, f32::abs, f32::max);
        let poison = fold_lanes(x, 0.0, |v| v * 0.0, |a, b| a + b);
        let s = (1.0 / amax.max(1e-5)) * 127.0 + 0.0;
        for (a, &x) in a.iter_mut().zip(x) {
            *a = level_byte(round_half_away(x * s).clamp(-128.0, 127.0)) ^ 0x80;
        }
        s + poison
    }
}

/// `f` of each chunk of 2^16 of `x` in parallel, summed in f64 in the order of the chunks: the
/// same bits whatever the thread pool does (rayon's own `sum` adds in the order the work was
/// split and stolen, which varies from run to run).
fn chunked_sum(x: &[f32], f: impl Fn(&[f32]) -> f32 + Sync + Send) -> f64 {
    let partial: Vec<f32> = x.par_chunks(1 << 16).map(f).collect();
    partial.into_iter().map(f64::from).sum()
}

/// The sum of the squares of a contiguous CPU f32 tensor: f32 in 16 lanes per chunk of 2^16,
/// the chunks summed in f64.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    let (storage, layout) = t.storage_and_layout();
    let x = match &*storage {
        candle_core::Storage::Cpu(s) => f32_slice(s, layout, "sum-of-squares: the tensor")?,
        _ => candle_core::bail!("sum-of-squares: a CPU tensor is needed"),
    };
    Ok(chunked_sum(x, square_sum))
}

vectorized! {
    fn square_sum(x: &[f32]) -> f32 {
        fold_lanes(x, 0.0, |v| v * v, |a, b| a + b)
    }
}

/// The two's-complement byte of an integral `v` in `-128..=127`: adding 1.5 * 2^23 puts the
/// integer in the low mantissa bits (pure bit operations, which vectorize where a float to
/// integer conversion with Rust's saturation does not do as well).
#[inline(always)]
pub fn level_byte(v: f32) -> u8 {
    (v + 12_582_912.0).to_bits() as u8
}

/// Ternary absmean fake quantization of a weight `[rows, cols]`, one scale per row group in
/// `parts` (see [`crate::model::bitlinear::quantize_weight`]): `gamma = max(mean|w|, 1e-5)`,
/// `clamp(round(w / gamma), -1, 1) * gamma`. The sum of the mean is taken in another order than
/// candle's, so gamma can differ from the tensor ops' in its last bits; the elementwise part is
/// the same f32 operations.
pub struct QuantizeWeight<'a> {
    pub parts: &'a [usize],
}

impl CustomOp1 for QuantizeWeight<'_> {
    fn name(&self) -> &'static str {
        "quantize-weight"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = f32_slice(s, l, "quantize-weight: the weight")?;
        let cols = row_len(l)?;
        if self.parts.iter().sum::<usize>() * cols != w.len() {
            candle_core::bail!("quantize-weight: the parts do not cover the weight's rows");
        }
        let mut y = vec![0f32; w.len()];
        let mut offset = 0;
        for &rows in self.parts {
            let (start, end) = (offset, offset + rows * cols);
            let part = &w[start..end];
            // Per chunk of 2^16 an f32 sum in 16 lanes of 4,096 terms each, the chunks in f64.
            let sum = chunked_sum(part, absolute_sum);
            let mean = (sum as f32) * (1.0 / part.len() as f64) as f32 + 0.0;
            let gamma = mean.max(1e-5);
            y[start..end]
                .par_chunks_mut(1 << 16)
                .zip(part.par_chunks(1 << 16))
                .for_each(|(y, w)| quantize_weight_chunk(w, y, gamma));
            offset = end;
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

vectorized! {
    fn absolute_sum(x: &[f32]) -> f32 {
        fold_lanes(x, 0.0, f32::abs, |a, b| a + b)
    }
}

vectorized! {
    fn quantize_weight_chunk(w: &[f32], y: &mut [f32], gamma: f32) {
        for (y, &w) in y.iter_mut().zip(w) {
            *y = round_half_away(w / gamma).clamp(-1.0, 1.0) * gamma;
        }
    }
}

/// `silu(gate) * up` from the fused projection output `[..., 2F]` (gate in the first half of each
/// row, up in the second) -> `[..., F]`; `silu(g) = g / (1 + exp(-g))` as candle computes it,
/// with [`exp`] for libm's.
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let gate_up = f32_slice(s, l, "swiglu: the gate/up projection")?;
        let f = row_len(l)? / 2;
        let mut h = vec![0f32; gate_up.len() / 2];
        h.par_chunks_mut(f)
            .zip(gate_up.par_chunks(2 * f))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(h, gu)| swiglu_row(gu, h));
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("row_len checked the rank") = f;
        Ok((CpuStorage::F32(h), Shape::from(dims)))
    }
}

vectorized! {
    fn swiglu_row(gate_up: &[f32], h: &mut [f32]) {
        let (gate, up) = gate_up.split_at(h.len());
        for ((h, &g), &u) in h.iter_mut().zip(gate).zip(up) {
            *h = (g / (1.0 + exp(-g))) * u;
        }
    }
}

/// The backward of [`SwiGlu`]: `(gate_up [..., 2F], dh [..., F]) -> d gate_up [..., 2F]`, with
/// `s = 1 / (exp(-g) + 1)`, `d gate = (dh * up) * (s * (g * (1 - s) + 1))`, `d up = dh * silu(g)`
/// (the order of the tensor ops of [`crate::model::mlp::Mlp::backward`]).
pub struct SwiGluBackward;

impl CustomOp2 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate_up = f32_slice(s1, l1, "swiglu-backward: the gate/up projection")?;
        let dh = f32_slice(s2, l2, "swiglu-backward: the gradient")?;
        let f = row_len(l1)? / 2;
        if row_len(l2)? != f || dh.len() * 2 != gate_up.len() {
            candle_core::bail!("swiglu-backward: the gradient is not half the projection's size");
        }
        let mut d = vec![0f32; gate_up.len()];
        d.par_chunks_mut(2 * f)
            .zip(gate_up.par_chunks(2 * f).zip(dh.par_chunks(f)))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(d, (gu, dh))| swiglu_backward_row(gu, dh, d));
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

vectorized! {
    fn swiglu_backward_row(gate_up: &[f32], dh: &[f32], d: &mut [f32]) {
        let f = dh.len();
        let (gate, up) = gate_up.split_at(f);
        let (d_gate, d_up) = d.split_at_mut(f);
        for i in 0..f {
            let (g, u, dh) = (gate[i], up[i], dh[i]);
            let e = exp(-g);
            let sig = 1.0 / (e * 1.0 + 1.0);
            let d_silu = sig * ((g * (1.0 - sig)) * 1.0 + 1.0);
            d_gate[i] = (dh * u) * d_silu;
            d_up[i] = dh * (g / (1.0 + e));
        }
    }
}

/// Which entries of a row of scores are kept: all of them, or the causal prefix of a block of
/// query rows.
#[derive(Debug, Clone, Copy)]
pub enum RowMask {
    /// Every column (the LM head's logits).
    None,
    /// Scores `[..., r * n, keys]` of query rows `first..first + n`, stacked `r` times (the query
    /// heads of a kv group): row `i` may see keys `0..=first + i % n`.
    Causal { first: usize, n: usize },
}

impl RowMask {
    /// The number of leading columns row `row` keeps.
    fn visible(&self, row: usize, cols: usize) -> usize {
        match *self {
            RowMask::None => cols,
            RowMask::Causal { first, n } => (first + row % n + 1).min(cols),
        }
    }
}

/// The log-sum-exp of each row of `scale * x` over its visible columns, `[..., rows, cols] ->
/// [..., rows, 1]`: `max + ln(sum exp(scale * x - max))`, as the tensor ops compute it (the
/// masked columns are `-inf` there and add nothing).
pub struct RowLogSumExp {
    pub scale: f32,
    pub mask: RowMask,
}

impl CustomOp1 for RowLogSumExp {
    fn name(&self) -> &'static str {
        "row-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "row-logsumexp: the scores")?;
        let cols = row_len(l)?;
        let rows_per_matrix = l.dims().iter().rev().nth(1).copied().unwrap_or(1);
        let mut out = vec![0f32; x.len() / cols];
        let scale = self.scale;
        out.par_iter_mut()
            .zip(x.par_chunks(cols))
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(i, (out, x))| {
                let x = &x[..self.mask.visible(i % rows_per_matrix, cols)];
                *out = row_log_sum_exp(x, scale);
            });
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("row_len checked the rank") = 1;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

vectorized! {
    fn row_log_sum_exp(x: &[f32], scale: f32) -> f32 {
        let max = fold_lanes(x, f32::NEG_INFINITY, |v| v * scale + 0.0, f32::max);
        let sum = fold_lanes(x, 0.0, |v| exp((v * scale + 0.0) - max), |a, b| a + b);
        max + sum.ln()
    }
}

/// In place: `x = exp(scale * x - lse)` over each row's visible columns, 0 over the rest: the
/// softmax probabilities from the scores and their [`RowLogSumExp`].
pub struct SoftmaxFromLse {
    pub scale: f32,
    pub mask: RowMask,
}

impl InplaceOp2 for SoftmaxFromLse {
    fn name(&self) -> &'static str {
        "softmax-from-lse"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let cols = row_len(l1)?;
        let rows_per_matrix = l1.dims().iter().rev().nth(1).copied().unwrap_or(1);
        let x = f32_slice_mut(s1, l1, "softmax-from-lse: the scores")?;
        let lse = f32_slice(s2, l2, "softmax-from-lse: the log-sum-exp")?;
        if lse.len() * cols != x.len() {
            candle_core::bail!("softmax-from-lse: one log-sum-exp per row is needed");
        }
        let scale = self.scale;
        x.par_chunks_mut(cols)
            .zip(lse.par_iter())
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(i, (x, &lse))| {
                let (seen, hidden) = x.split_at_mut(self.mask.visible(i % rows_per_matrix, cols));
                softmax_row(seen, scale, lse);
                hidden.fill(0.0);
            });
        Ok(())
    }
}

vectorized! {
    fn softmax_row(x: &mut [f32], scale: f32, lse: f32) {
        for v in x {
            *v = exp((*v * scale + 0.0) - lse);
        }
    }
}

/// In place, the softmax backward: `dp = (p * (dp - delta)) * scale` with one `delta` per row.
pub struct SoftmaxBackward {
    pub scale: f32,
}

impl InplaceOp3 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let cols = row_len(l1)?;
        let dp = f32_slice_mut(s1, l1, "softmax-backward: dP")?;
        let p = f32_slice(s2, l2, "softmax-backward: P")?;
        let delta = f32_slice(s3, l3, "softmax-backward: delta")?;
        if p.len() != dp.len() || delta.len() * cols != dp.len() {
            candle_core::bail!("softmax-backward: P, dP and delta do not match");
        }
        let scale = self.scale;
        dp.par_chunks_mut(cols)
            .zip(p.par_chunks(cols).zip(delta.par_iter()))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(dp, (p, &delta))| softmax_backward_row(dp, p, delta, scale));
        Ok(())
    }
}

vectorized! {
    fn softmax_backward_row(dp: &mut [f32], p: &[f32], delta: f32, scale: f32) {
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = (p * (*dp - delta)) * scale + 0.0;
        }
    }
}

/// In place, the gradient of the mean cross-entropy at the logits: `x = exp(x - lse) * per_row`,
/// then `- per_row` at each row's target (u32).
pub struct CrossEntropyBackward {
    pub per_row: f32,
}

impl InplaceOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let cols = row_len(l1)?;
        let x = f32_slice_mut(s1, l1, "cross-entropy-backward: the logits")?;
        let lse = f32_slice(s2, l2, "cross-entropy-backward: the log-sum-exp")?;
        let targets = match (s3, l3.contiguous_offsets()) {
            (CpuStorage::U32(t), Some((start, end))) => &t[start..end],
            _ => candle_core::bail!("cross-entropy-backward: the targets must be contiguous u32"),
        };
        if lse.len() * cols != x.len() || targets.len() != lse.len() {
            candle_core::bail!("cross-entropy-backward: one log-sum-exp and target per row");
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= cols) {
            candle_core::bail!("cross-entropy-backward: target {t} is outside the vocabulary");
        }
        let per_row = self.per_row;
        x.par_chunks_mut(cols)
            .zip(lse.par_iter().zip(targets.par_iter()))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(x, (&lse, &t))| {
                cross_entropy_row(x, lse, per_row);
                x[t as usize] += -per_row;
            });
        Ok(())
    }
}

vectorized! {
    fn cross_entropy_row(x: &mut [f32], lse: f32, per_row: f32) {
        for v in x {
            *v = exp(*v - lse) * per_row + 0.0;
        }
    }
}

/// `1 / sqrt(mean(x^2) + eps)` of a row, as [`crate::model::norm::RmsNorm`]'s tensor ops
/// compute it (the sum in lanes).
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = fold_lanes(x, 0.0, |v| v * v, |a, b| a + b) * (1.0 / x.len() as f64) as f32 + 0.0;
    1.0 / (ms * 1.0 + eps).sqrt()
}

/// RMSNorm of the rows of `x [..., d]` with `weight [d]`: `(x * inv_rms) * weight`.
pub struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm: the input")?;
        let w = f32_slice(s2, l2, "rms-norm: the weight")?;
        let d = row_len(l1)?;
        if w.len() != d {
            candle_core::bail!("rms-norm: weight of {} for rows of {d}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        let eps = self.eps;
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(y, x)| rms_norm_row(x, w, eps, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

vectorized! {
    fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let inv = inv_rms(x, eps);
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = (x * inv) * w;
        }
    }
}

/// The input gradient of [`RmsNorm`]: `(x [..., d], dy [..., d], weight [d]) -> dx`, with
/// `x_hat = x * inv_rms`, `g = dy * weight`: `dx = (g - x_hat * mean(g * x_hat)) * inv_rms`.
pub struct RmsNormBackward {
    pub eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm-backward: the input")?;
        let dy = f32_slice(s2, l2, "rms-norm-backward: the gradient")?;
        let w = f32_slice(s3, l3, "rms-norm-backward: the weight")?;
        let d = row_len(l1)?;
        if w.len() != d || dy.len() != x.len() {
            candle_core::bail!("rms-norm-backward: input, gradient and weight do not match");
        }
        let mut dx = vec![0f32; x.len()];
        let eps = self.eps;
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(dx, (x, dy))| rms_norm_backward_row(x, dy, w, eps, dx));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

vectorized! {
    fn rms_norm_backward_row(x: &[f32], dy: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
        let inv = inv_rms(x, eps);
        // mean(g * x_hat) with g = dy * w, x_hat = x * inv.
        let mut acc = [0f32; LANES];
        let mut tail = 0f32;
        let chunks = x.len() / LANES * LANES;
        for i in (0..chunks).step_by(LANES) {
            for j in 0..LANES {
                acc[j] += (dy[i + j] * w[i + j]) * (x[i + j] * inv);
            }
        }
        for i in chunks..x.len() {
            tail += (dy[i] * w[i]) * (x[i] * inv);
        }
        let mean = (acc.into_iter().fold(0.0, |a, b| a + b) + tail) * (1.0 / x.len() as f64) as f32 + 0.0;
        for i in 0..x.len() {
            let x_hat = x[i] * inv;
            dx[i] = ((dy[i] * w[i]) - x_hat * mean) * inv;
        }
    }
}

/// The weight gradient of [`RmsNorm`]: `(x [..., d], dy [..., d]) -> sum over rows of
/// dy * x_hat`, `[d]`, summed per task of rows and then across tasks in order (another order than
/// the tensor ops' column sum, the same on every run).
pub struct RmsNormWeightGrad {
    pub eps: f32,
}

impl CustomOp2 for RmsNormWeightGrad {
    fn name(&self) -> &'static str {
        "rms-norm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm-weight-grad: the input")?;
        let dy = f32_slice(s2, l2, "rms-norm-weight-grad: the gradient")?;
        let d = row_len(l1)?;
        if dy.len() != x.len() {
            candle_core::bail!("rms-norm-weight-grad: input and gradient sizes differ");
        }
        let eps = self.eps;
        let rows_per_task = 64;
        // Per task a partial sum over its rows; the partials added in task order (not rayon's
        // reduction order, which varies from run to run).
        let partials: Vec<Vec<f32>> = x
            .par_chunks(d * rows_per_task)
            .zip(dy.par_chunks(d * rows_per_task))
            .map(|(x, dy)| {
                let mut acc = vec![0f32; d];
                for (x, dy) in x.chunks(d).zip(dy.chunks(d)) {
                    rms_norm_weight_grad_row(x, dy, eps, &mut acc);
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; d];
        for partial in partials {
            dw.iter_mut().zip(&partial).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(dw), Shape::from(d)))
    }
}

vectorized! {
    fn rms_norm_weight_grad_row(x: &[f32], dy: &[f32], eps: f32, acc: &mut [f32]) {
        let inv = inv_rms(x, eps);
        for ((a, &x), &dy) in acc.iter_mut().zip(x).zip(dy) {
            *a += dy * (x * inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_half_away_equals_f32_round_bit_for_bit() {
        let mut values = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
        ];
        values.extend((-300..300).map(|k| k as f32 + 0.5));
        values.extend((-3000..3000).map(|k| k as f32 * 0.0137));
        values.extend([
            1e-40,
            -1e-40,
            8_388_607.5,
            16_777_217.0,
            -1_073_741_824.0,
            2e9,
        ]);
        for v in values {
            assert_eq!(round_half_away(v).to_bits(), v.round().to_bits(), "{v}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0u32;
        for i in 0..=1_750_000 {
            let x = -87.0 + i as f32 * 1e-4;
            let exact = (x as f64).exp() as f32;
            let ulps = exp(x).to_bits().abs_diff(exact.to_bits());
            worst = worst.max(ulps);
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn level_byte_is_twos_complement() {
        for v in -128i32..=127 {
            assert_eq!(level_byte(v as f32) as i8 as i32, v);
        }
    }

    #[test]
    fn sum_of_squares_equals_the_tensor_ops() -> Result<()> {
        let t = Tensor::randn(0f32, 1.0, (3, 70_001), &Device::Cpu)?;
        let fused = sum_of_squares(&t)?;
        let ops = t
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert!((fused - ops).abs() / ops < 1e-6, "{fused} vs {ops}");
        Ok(())
    }

    /// candle's matmul and the one-thread-per-matrix one, on strided views (a transposed and a
    /// narrowed operand), give the same bits: the same gemm kernels sum over k in the same order.
    #[test]
    fn batched_matmul_equals_candles() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 40, 16), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (2, 3, 50, 16), &dev)?
            .narrow(2, 0, 33)?
            .t()?;
        let mine = a.apply_op2_no_bwd(&b, &batched::BatchedMatmul)?;
        let candle = a.matmul(&b)?;
        let d = (mine - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
