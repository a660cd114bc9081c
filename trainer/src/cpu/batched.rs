//! Batched matmul on the CPU with the batch split across the threads.
//!
//! candle's CPU matmul runs the matrices of a batch one after another, each split across the
//! threads: right for one large product, slow for the attention's many small ones (a block of
//! 256 query rows against at most 1,024 keys, of head size 64), where each product is too small
//! to split well. Here every matrix is one task of the thread pool and runs single-threaded, on
//! the same `gemm` kernels and strides candle would use. Measured effect in BENCHMARKS.md.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// `(a [..., m, k], b [..., k, n]) -> a @ b [..., m, n]`, f32, same batch dimensions, any
/// strides.
pub struct BatchedMatmul;

/// The element offsets of every matrix of a batch, in order.
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let stride = l.stride();
    let rank = dims.len();
    let mut offsets = vec![l.start_offset()];
    for d in 0..rank - 2 {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..dims[d]).map(move |i| o + i * stride[d]))
            .collect();
    }
    offsets
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("batched-matmul: f32 operands are needed");
        };
        let (da, db) = (l1.dims(), l2.dims());
        let rank = da.len();
        if rank < 2
            || db.len() != rank
            || da[..rank - 2] != db[..rank - 2]
            || da[rank - 1] != db[rank - 2]
        {
            candle_core::bail!("batched-matmul: shapes {da:?} and {db:?} do not multiply");
        }
        let (m, k, n) = (da[rank - 2], da[rank - 1], db[rank - 1]);
        let (sa, sb) = (l1.stride(), l2.stride());
        let (a_offsets, b_offsets) = (batch_offsets(l1), batch_offsets(l2));
        let mut dst = vec![0f32; a_offsets.len() * m * n];
        if m * n > 0 {
            dst.par_chunks_mut(m * n)
                .zip(a_offsets.par_iter().zip(b_offsets.par_iter()))
                .for_each(|(dst, (&ao, &bo))| {
                    // SAFETY: the operands' layouts address only their storage (candle's
                    // invariant), `dst` is this matrix's m x n, written whole (read_dst false).
                    unsafe {
                        gemm(
                            m,
                            n,
                            k,
                            dst.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            a[ao..].as_ptr(),
                            sa[rank - 1] as isize,
                            sa[rank - 2] as isize,
                            b[bo..].as_ptr(),
                            sb[rank - 1] as isize,
                            sb[rank - 2] as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        )
                    }
                });
        }
        let mut dims = da.to_vec();
        dims[rank - 1] = n;
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}
