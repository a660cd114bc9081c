//! The forward matmul of BitLinear on integers, for CPUs with AVX-512 VNNI.
//!
//! `y = q(x) @ W_q^T` with `q(x) = L / s` (int8 levels `L` and one scale `s` per token) and
//! `W_q = T * gamma` (ternary `T` and one scale per output row) is
//! `y[m, n] = (sum_k L[m, k] * T[n, k]) * gamma[n] / s[m]`. The sum is of integers: at most
//! `128 * K` in magnitude, exact in i32, where the f32 matmul rounds each partial sum. So this is
//! the same value as the f32 path up to that path's rounding (test
//! `int8_forward_equals_the_exact_product`), at four int8 products per lane and instruction
//! (`vpdpbusd`) instead of one f32 product.
//!
//! `vpdpbusd` multiplies unsigned bytes by signed bytes, so the activations are stored as
//! `L + 128` (0..=255) and `128 * sum_k T[n, k]` is subtracted from each sum.
//!
//! Layout: activations row-major `[rows, K4]` (K rounded up to 4, padded with level 0); weights
//! in groups of 16 output rows, each `[K4 / 4][16][4]` bytes, so that one 64-byte load holds four
//! consecutive `k` of 16 outputs. A tile is `MR` rows by `NR` = 32 outputs (two vectors of 16 i32
//! sums); a task is `MC` rows against every output, so the weight panel of a tile is reused by
//! `MC / MR` tiles.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use super::{f32_slice, row_len};

/// Rows per tile.
const MR: usize = 8;
/// Outputs per tile: two vectors of 16 i32 lanes.
const NR: usize = 32;
/// Outputs per packed weight group: one vector.
const GROUP: usize = 16;
/// Rows per parallel task.
const MC: usize = 128;

/// Whether this CPU runs [`Int8Linear`] (AVX-512 F, BW and VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `(x [..., K], W_q [N, K]) -> q(x) @ W_q^T [..., N]`, f32 in and out, where `W_q` is a
/// quantized BitLinear weight (every row `T * gamma`) and `q` the per-token int8 activation
/// quantization. Only where [`available`].
pub struct Int8Linear;

impl CustomOp2 for Int8Linear {
    fn name(&self) -> &'static str {
        "int8-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !available() {
            candle_core::bail!("int8-linear needs AVX-512 VNNI");
        }
        let x = f32_slice(s1, l1, "int8-linear: the input")?;
        let w = f32_slice(s2, l2, "int8-linear: the weight")?;
        let k = row_len(l1)?;
        let (n, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("int8-linear: input features {k}, weight columns {wk}");
        }
        let m = x.len() / k;
        let k4 = k.div_ceil(4) * 4;
        let (a, s) = quantize_activations(x, k, k4);
        let (b, colsum, gamma) = pack_weight(w, n, k, k4);
        let mut y = vec![0f32; m * n];
        if m > 0 && n > 0 {
            y.par_chunks_mut(MC * n)
                .zip(a.par_chunks(MC * k4))
                .zip(s.par_chunks(MC))
                .for_each(|((y, a), s)| {
                    let rows = s.len();
                    for panel in 0..n.div_ceil(NR) {
                        let b = &b[panel * NR * k4..(panel + 1) * NR * k4];
                        let cols = NR.min(n - panel * NR);
                        for r0 in (0..rows).step_by(MR) {
                            let mut acc = [[0i32; NR]; MR];
                            // SAFETY: `available()` was checked above; `a` holds MR whole padded
                            // rows from `r0` (see `quantize_activations`), `b` one packed panel.
                            unsafe { tile(&a[r0 * k4..(r0 + MR) * k4], b, k4, &mut acc) };
                            for (r, acc) in acc.iter().enumerate().take(rows - r0) {
                                let cols = panel * NR..panel * NR + cols;
                                scale_sums(
                                    &acc[..cols.len()],
                                    &colsum[cols.clone()],
                                    &gamma[cols.clone()],
                                    s[r0 + r],
                                    &mut y[(r0 + r) * n..][cols],
                                );
                            }
                        }
                    }
                });
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("row_len checked the rank") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

super::vectorized! {
    /// `y = ((sum - 128 * colsum) * gamma) / s` per output: the tile's sums back to f32.
    fn scale_sums(sums: &[i32], colsum: &[i32], gamma: &[f32], s: f32, y: &mut [f32]) {
        for (((y, &sum), &colsum), &gamma) in y.iter_mut().zip(sums).zip(colsum).zip(gamma) {
            *y = ((sum - 128 * colsum) as f32 * gamma) / s;
        }
    }
}

/// The int8 levels of each row of `x: [m, k]` plus 128, as `k4` bytes per row (padding: level 0,
/// i.e. 128), and each row's scale `s = 127 / max(max|x|, 1e-5)`, computed as
/// [`super::QuantizeActivations`] does. The rows of the last, partial task are padded to a
/// multiple of `MR` so that a tile always reads whole rows.
fn quantize_activations(x: &[f32], k: usize, k4: usize) -> (Vec<u8>, Vec<f32>) {
    let m = x.len() / k;
    let padded_rows = (m / MC) * MC + (m % MC).div_ceil(MR) * MR;
    let mut a = vec![128u8; padded_rows * k4];
    let mut s = vec![0f32; m];
    a.par_chunks_mut(k4)
        .zip(x.par_chunks(k))
        .zip(s.par_iter_mut())
        .with_min_len(16)
        .for_each(|((a, x), s)| *s = super::quantize_row_to_bytes(x, a));
    (a, s)
}

/// The ternary levels of `w: [n, k]` packed in groups of 16 rows (`[k4 / 4][16][4]` bytes each;
/// rows past `n` are zero), each row's level sum and its scale `gamma` (the magnitude of its
/// non-zero entries, all equal in a quantized weight; 0 for an all-zero row).
fn pack_weight(w: &[f32], n: usize, k: usize, k4: usize) -> (Vec<i8>, Vec<i32>, Vec<f32>) {
    let padded = n.div_ceil(NR) * NR;
    let mut b = vec![0i8; padded * k4];
    let mut colsum = vec![0i32; padded];
    let mut gamma = vec![0f32; padded];
    b.par_chunks_mut(GROUP * k4)
        .zip(colsum.par_chunks_mut(GROUP))
        .zip(gamma.par_chunks_mut(GROUP))
        .enumerate()
        .for_each(|(g, ((b, colsum), gamma))| {
            let mut levels = vec![0i8; k4];
            for c in 0..GROUP.min(n.saturating_sub(g * GROUP)) {
                let row = &w[(g * GROUP + c) * k..][..k];
                (colsum[c], gamma[c]) = ternary_levels(row, &mut levels[..k]);
                for (step, four) in levels.chunks_exact(4).enumerate() {
                    b[step * GROUP * 4 + c * 4..][..4].copy_from_slice(four);
                }
            }
        });
    (b, colsum, gamma)
}

super::vectorized! {
    /// The levels `sign(w)` of a quantized weight row, their sum and the row's scale `max|w|`.
    fn ternary_levels(row: &[f32], levels: &mut [i8]) -> (i32, f32) {
        let sign = |v: f32| (v > 0.0) as i32 as f32 - (v < 0.0) as i32 as f32;
        for (t, &v) in levels.iter_mut().zip(row) {
            *t = super::level_byte(sign(v)) as i8;
        }
        // Integers below 2^24 in magnitude: the f32 sum is exact.
        let sum = super::fold_lanes(row, 0.0, sign, |a, b| a + b);
        (sum as i32, super::fold_lanes(row, 0.0, f32::abs, f32::max))
    }
}

/// One tile: `acc[r][c] = sum_k a[r, k] * b[c, k]` for `MR` rows of `a` (`[MR, k4]` bytes, u8)
/// and the `NR` outputs of a packed panel `b` (two groups), in i32.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `a` must hold `MR * k4` bytes, `b` `NR * k4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile(a: &[u8], b: &[i8], k4: usize, acc: &mut [[i32; NR]; MR]) {
    use std::arch::x86_64::*;
    assert!(a.len() >= MR * k4 && b.len() >= NR * k4);
    let (b0, b1) = b.split_at(GROUP * k4);
    let mut sums = [[_mm512_setzero_si512(); 2]; MR];
    for step in 0..k4 / 4 {
        // SAFETY: `step * 64 + 64 <= GROUP * k4` bytes of each group, asserted above.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_si512(b0.as_ptr().add(step * 64).cast()),
                _mm512_loadu_si512(b1.as_ptr().add(step * 64).cast()),
            )
        };
        for (r, sums) in sums.iter_mut().enumerate() {
            // SAFETY: `r * k4 + step * 4 + 4 <= MR * k4`, asserted above.
            let four = unsafe {
                a.as_ptr()
                    .add(r * k4 + step * 4)
                    .cast::<i32>()
                    .read_unaligned()
            };
            let av = _mm512_set1_epi32(four);
            sums[0] = _mm512_dpbusd_epi32(sums[0], av, v0);
            sums[1] = _mm512_dpbusd_epi32(sums[1], av, v1);
        }
    }
    for (acc, sums) in acc.iter_mut().zip(&sums) {
        let (lo, hi) = acc.split_at_mut(GROUP);
        // SAFETY: each half holds 16 i32.
        unsafe {
            _mm512_storeu_si512(lo.as_mut_ptr().cast(), sums[0]);
            _mm512_storeu_si512(hi.as_mut_ptr().cast(), sums[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: &[u8], _: &[i8], _: usize, _: &mut [[i32; NR]; MR]) {
    unreachable!("int8-linear is only offered where available()");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bitlinear::{quantize_activations, quantize_weight};
    use candle_core::{Device, Tensor};

    /// Against the exact product computed in f64 from the levels, and against the f32 matmul of
    /// the fake-quantized tensors, on shapes with partial tiles, groups and panels (rows 1..=150,
    /// outputs not a multiple of 16, features not a multiple of 4) and two weight scales.
    #[test]
    fn int8_forward_equals_the_exact_product() -> Result<()> {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return Ok(());
        }
        let dev = Device::Cpu;
        for (rows, k, parts) in [
            (1, 4, vec![16]),
            (7, 37, vec![20, 13]),
            (150, 130, vec![40, 33]),
        ] {
            let n: usize = parts.iter().sum();
            let x = (Tensor::randn(0f32, 1.0, (rows, k), &dev)? * 3.0)?;
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            let w_q = quantize_weight(&w, &parts)?;
            let y = x.apply_op2_no_bwd(&w_q, &Int8Linear)?;
            assert_eq!(y.dims(), &[rows, n]);
            let x_q = quantize_activations(&x)?;
            let f32_path = x_q.matmul(&w_q.t()?)?;
            // Exact: levels L = x_q * s and T * gamma = w_q, multiplied and summed in f64.
            let (xq, wq): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (x_q.to_vec2()?, w_q.to_vec2()?);
            let ys: Vec<Vec<f32>> = y.to_vec2()?;
            let fs: Vec<Vec<f32>> = f32_path.to_vec2()?;
            for r in 0..rows {
                for c in 0..n {
                    let exact: f64 = (0..k).map(|i| xq[r][i] as f64 * wq[c][i] as f64).sum();
                    let scale = (0..k)
                        .map(|i| (xq[r][i] as f64 * wq[c][i] as f64).abs())
                        .sum::<f64>()
                        .max(1e-30);
                    let (e_int8, e_f32) = (
                        (ys[r][c] as f64 - exact).abs() / scale,
                        (fs[r][c] as f64 - exact).abs() / scale,
                    );
                    // Two f32 roundings of the exact sum (times gamma, over s), each 2^-24,
                    // against the f32 matmul's rounding of every partial sum.
                    assert!(e_int8 < 2.5e-7, "{rows}x{k}x{n} [{r},{c}]: {e_int8:e}");
                    assert!(e_f32 < 1e-5, "{rows}x{k}x{n} [{r},{c}]: {e_f32:e}");
                }
            }
        }
        Ok(())
    }

    /// A NaN in a token's features makes that token's outputs NaN, as in the f32 matmul.
    #[test]
    fn a_nan_input_gives_nan_outputs() -> Result<()> {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return Ok(());
        }
        let dev = Device::Cpu;
        let mut x = vec![0.5f32; 2 * 8];
        x[3] = f32::NAN;
        let x = Tensor::from_vec(x, (2, 8), &dev)?;
        let w_q = quantize_weight(&Tensor::randn(0f32, 0.02, (16, 8), &dev)?, &[16])?;
        let y: Vec<Vec<f32>> = x.apply_op2_no_bwd(&w_q, &Int8Linear)?.to_vec2()?;
        assert!(y[0].iter().all(|v| v.is_nan()), "{:?}", y[0]);
        assert!(y[1].iter().all(|v| v.is_finite()), "{:?}", y[1]);
        Ok(())
    }
}
