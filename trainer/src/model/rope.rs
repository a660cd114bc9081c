//! Rotary position embedding (Su et al. 2021, RoFormer eq. 34) in the rotate-half convention of HF
//! Llama: feature i is rotated together with feature i + head_dim/2, not with its neighbour.
//!
//! `inv_freq[i] = theta^(-2i/head_dim)`, `angle = pos * inv_freq`, `cos, sin = cos/sin(cat(angle,
//! angle))`, `x' = x * cos + cat(-x[hd/2:], x[:hd/2]) * sin`. The angles are computed in f64 and
//! rounded once to f32. Composed from differentiable ops because candle-nn 0.11's fused `rope`
//! has no backward pass (candle issue #2168).

use candle_core::{D, Device, Result, Tensor};

/// Precomputed cos/sin tables, [max_seq_length, head_dim] each.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_seq_length: usize,
        theta: f64,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_length * head_dim);
        let mut sin = Vec::with_capacity(max_seq_length * head_dim);
        for pos in 0..max_seq_length {
            for j in 0..head_dim {
                let i = j % half;
                let inv_freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_seq_length, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_seq_length, head_dim), device)?,
        })
    }

    /// `x: [batch, heads, seq, head_dim] -> [batch, heads, seq, head_dim]` at positions
    /// `index_pos .. index_pos + seq`.
    pub fn forward(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_, _, seq, head_dim) = x.dims4()?;
        let half = head_dim / 2;
        let cos = self.cos.narrow(0, index_pos, seq)?;
        let sin = self.sin.narrow(0, index_pos, seq)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
    }

    /// The backward of [`Rope::forward`], which is linear in `x`: its transpose,
    /// `dx = dy * cos + cat(z2, -z1)` with `z = dy * sin` split in halves `z1, z2`.
    pub fn backward(&self, dy: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_, _, seq, head_dim) = dy.dims4()?;
        let half = head_dim / 2;
        let cos = self.cos.narrow(0, index_pos, seq)?;
        let sin = self.sin.narrow(0, index_pos, seq)?;
        let z = dy.broadcast_mul(&sin)?;
        let z1 = z.narrow(D::Minus1, 0, half)?;
        let z2 = z.narrow(D::Minus1, half, half)?;
        dy.broadcast_mul(&cos)?
            .add(&Tensor::cat(&[&z2, &z1.neg()?], D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norms_are_kept() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 16, 10_000.0, &dev)?;
        let x = Tensor::arange(0f32, 2.0 * 16.0 * 8.0, &dev)?.reshape((1, 2, 16, 8))?;
        let y = rope.forward(&x, 0)?;
        let d = (y.narrow(2, 0, 1)? - x.narrow(2, 0, 1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d == 0.0);
        let nx = x.sqr()?.sum(D::Minus1)?;
        let ny = y.sqr()?.sum(D::Minus1)?;
        let rel = ((nx.clone() - ny)?.abs()? / nx)?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(rel < 1e-5, "{rel}");
        // Rotate-half pairing: with only feature 0 set, position 1 moves it into feature hd/2.
        let mut e = vec![0f32; 2 * 8];
        e[8] = 1.0;
        let y = rope.forward(&Tensor::from_vec(e, (1, 1, 2, 8), &dev)?, 0)?;
        let row: Vec<f32> = y.narrow(2, 1, 1)?.flatten_all()?.to_vec1()?;
        assert!(
            (row[0] - 1f32.cos()).abs() < 1e-6 && (row[4] - 1f32.sin()).abs() < 1e-6,
            "{row:?}"
        );
        Ok(())
    }

    #[test]
    fn an_offset_rotates_like_the_same_positions_of_a_longer_sequence() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 16, 10_000.0, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 10, 8), &dev)?;
        let full = rope.forward(&x, 0)?.narrow(2, 6, 4)?;
        let tail = rope.forward(&x.narrow(2, 6, 4)?.contiguous()?, 6)?;
        let d = (full - tail)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
