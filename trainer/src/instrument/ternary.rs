//! Per-layer statistics of the ternary weights: the fraction of -1, 0 and +1 in each quantized
//! projection and its absmean scale gamma. The
//! quantizer is BitNet b1.58's (Ma et al. 2024, eq. 1-3): gamma = max(mean|W|, 1e-5),
//! W_q = clamp(round(W / gamma), -1, 1), with one gamma per original projection of a fused
//! weight (q, k, v of `qkv_proj`; gate, up of `gate_up`), as the engine quantizes them.
//!
//! Key names (a contract with the user's tools): `L{i}_attn_qkv_{neg1,zero,pos1}_pct`,
//! `L{i}_attn_out_proj_...`, `L{i}_ffn_gate_up_...`, `L{i}_ffn_down_proj_...` — fractions in
//! [0, 1] as the contract defines them (`(w == -1).float().mean()`), despite the `_pct` suffix —
//! plus `L{i}_{proj}_absmean` and `L{i}_absmean_scale` (mean over the layer's projections).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Counts of one (possibly fused) quantized weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TernaryCounts {
    pub neg1: u64,
    pub zero: u64,
    pub pos1: u64,
    /// gamma of each original projection, in row order.
    pub gammas: Vec<f32>,
}

impl TernaryCounts {
    pub fn total(&self) -> u64 {
        self.neg1 + self.zero + self.pos1
    }

    /// (neg1, zero, pos1) as fractions of all weights.
    pub fn fractions(&self) -> [f64; 3] {
        let n = self.total().max(1) as f64;
        [
            self.neg1 as f64 / n,
            self.zero as f64 / n,
            self.pos1 as f64 / n,
        ]
    }

    pub fn mean_gamma(&self) -> f64 {
        if self.gammas.is_empty() {
            return 0.0;
        }
        self.gammas.iter().map(|&g| g as f64).sum::<f64>() / self.gammas.len() as f64
    }
}

/// Quantizes `w` [rows, cols] on its device, one gamma per block of `part_rows` rows (their sum
/// must be `rows`), and counts the signs. Two reductions per part: with q in {-1, 0, 1},
/// sum|q| = (#-1) + (#+1) and sum q = (#+1) - (#-1). Sums of at most 2^24 ones are exact in f32.
pub fn ternary_counts(w: &Tensor, part_rows: &[usize]) -> candle_core::Result<TernaryCounts> {
    let (rows, cols) = w.dims2()?;
    if part_rows.iter().sum::<usize>() != rows {
        candle_core::bail!("ternary_counts: parts {part_rows:?} do not add up to {rows} rows");
    }
    let w = w.to_dtype(DType::F32)?;
    let mut out = TernaryCounts {
        neg1: 0,
        zero: 0,
        pos1: 0,
        gammas: Vec::with_capacity(part_rows.len()),
    };
    let mut start = 0;
    for &n in part_rows {
        let part = w.narrow(0, start, n)?;
        start += n;
        let gamma = part.abs()?.mean_all()?.to_scalar::<f32>()?.max(1e-5);
        let q = (part / gamma as f64)?.round()?.clamp(-1f32, 1f32)?;
        let nonzero = q.abs()?.sum_all()?.to_scalar::<f32>()? as u64;
        let signed = q.sum_all()?.to_scalar::<f32>()? as i64;
        let pos1 = (nonzero as i64 + signed) / 2;
        let neg1 = nonzero as i64 - pos1;
        out.pos1 += pos1 as u64;
        out.neg1 += neg1 as u64;
        out.zero += (n * cols) as u64 - nonzero;
        out.gammas.push(gamma);
    }
    Ok(out)
}

/// The four projections of one block, by their key names.
pub const PROJECTIONS: [&str; 4] = ["attn_qkv", "attn_out_proj", "ffn_gate_up", "ffn_down_proj"];

/// The statistics of one block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTernary {
    pub layer: usize,
    /// In [`PROJECTIONS`] order.
    pub projections: Vec<TernaryCounts>,
}

impl LayerTernary {
    /// Adds this layer's keys to a scalars record.
    pub fn insert_keys(&self, out: &mut BTreeMap<String, serde_json::Value>) {
        let i = self.layer;
        let mut gammas = Vec::new();
        for (name, c) in PROJECTIONS.iter().zip(&self.projections) {
            let [n, z, p] = c.fractions();
            out.insert(format!("L{i}_{name}_neg1_pct"), n.into());
            out.insert(format!("L{i}_{name}_zero_pct"), z.into());
            out.insert(format!("L{i}_{name}_pos1_pct"), p.into());
            out.insert(format!("L{i}_{name}_absmean"), c.mean_gamma().into());
            gammas.extend(c.gammas.iter().map(|&g| g as f64));
        }
        let mean = if gammas.is_empty() {
            0.0
        } else {
            gammas.iter().sum::<f64>() / gammas.len() as f64
        };
        out.insert(format!("L{i}_absmean_scale"), mean.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The quantizer written out element by element, as the reference.
    fn reference(w: &[f32], cols: usize, part_rows: &[usize]) -> TernaryCounts {
        let mut c = TernaryCounts {
            neg1: 0,
            zero: 0,
            pos1: 0,
            gammas: vec![],
        };
        let mut start = 0;
        for &n in part_rows {
            let part = &w[start * cols..(start + n) * cols];
            start += n;
            let gamma = (part.iter().map(|x| x.abs() as f64).sum::<f64>() / part.len() as f64)
                .max(1e-5) as f32;
            for &x in part {
                match (x / gamma).round().clamp(-1.0, 1.0) as i32 {
                    -1 => c.neg1 += 1,
                    0 => c.zero += 1,
                    _ => c.pos1 += 1,
                }
            }
            c.gammas.push(gamma);
        }
        c
    }

    #[test]
    fn counts_match_the_elementwise_quantizer() {
        // Parts of different scale: one shared gamma would zero out the small part entirely.
        let (rows, cols) = (24, 16);
        let mut v = Vec::with_capacity(rows * cols);
        let mut s = 12345u64;
        for r in 0..rows {
            for _ in 0..cols {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                v.push(if r < 8 { u * 0.01 } else { u });
            }
        }
        let w = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
        let parts = [8, 8, 8];
        let got = ternary_counts(&w, &parts).unwrap();
        let want = reference(&v, cols, &parts);
        assert_eq!(got.neg1, want.neg1);
        assert_eq!(got.zero, want.zero);
        assert_eq!(got.pos1, want.pos1);
        for (a, b) in got.gammas.iter().zip(&want.gammas) {
            assert!((a - b).abs() <= 1e-6 * b.abs());
        }
        assert_eq!(got.total(), (rows * cols) as u64);
        assert!(got.neg1 > 0 && got.zero > 0 && got.pos1 > 0);
        assert!(ternary_counts(&w, &[8, 8]).is_err());
    }

    #[test]
    fn all_zero_weights_use_the_gamma_floor() {
        let w = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        let c = ternary_counts(&w, &[4]).unwrap();
        assert_eq!((c.neg1, c.zero, c.pos1), (0, 16, 0));
        assert_eq!(c.gammas, vec![1e-5]);
    }

    #[test]
    fn keys_follow_the_plan() {
        let c = |neg1, zero, pos1| TernaryCounts {
            neg1,
            zero,
            pos1,
            gammas: vec![0.5, 1.5],
        };
        let l = LayerTernary {
            layer: 3,
            projections: vec![c(1, 2, 1), c(0, 4, 0), c(2, 0, 2), c(1, 1, 2)],
        };
        let mut m = BTreeMap::new();
        l.insert_keys(&mut m);
        assert_eq!(m["L3_attn_qkv_neg1_pct"], 0.25);
        assert_eq!(m["L3_attn_qkv_zero_pct"], 0.5);
        assert_eq!(m["L3_attn_out_proj_zero_pct"], 1.0);
        assert_eq!(m["L3_ffn_gate_up_pos1_pct"], 0.5);
        assert_eq!(m["L3_ffn_down_proj_pos1_pct"], 0.5);
        assert_eq!(m["L3_ffn_gate_up_absmean"], 1.0);
        assert_eq!(m["L3_absmean_scale"], 1.0);
        assert_eq!(m.len(), 4 * 4 + 1);
    }
}
