//! Unmasked softmax attention for f32 on the CPU, blocked as flash attention is on the GPU:
//! per block of query rows, the block's scores against every key go to a reused per-thread
//! buffer (q k^T by one GEMM, the softmax with a vectorised exp, then p v by another GEMM), so
//! the (T, T) score matrix is never built. candle's path builds it, reads and writes it again
//! for the softmax and reads it for p v: at SD's 4096 tokens, gigabytes per layer, most of
//! them fresh pages, and a scalar `expf` per score.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::{contiguous_f32, exp_sum};

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A block's scores hold at most about this many floats (8 MiB), in blocks of up to 512
/// queries: each block's two products pack the keys and values anew, which costs most where
/// those are too large for the core's cache (the VAE's 512-wide head: 3x slower in blocks of
/// 32 than of 512), while the scores stay in the last-level cache.
const BLOCK_SCORES: usize = 1 << 21;

/// `softmax(q k^T * scale) v` for q `(B, H, Tq, D)`, k `(B, H, Tk, D)`, v `(B, H, Tk, Dv)`.
pub(crate) struct CpuAttention {
    pub(crate) scale: f32,
}

/// The sizes of one batch-head.
#[derive(Clone, Copy)]
struct Dims {
    tk: usize,
    d: usize,
    dv: usize,
}

impl CpuAttention {
    /// One block of `m` query rows of one batch-head: `q` `(m, d)`, `k` `(tk, d)`, `v`
    /// `(tk, dv)` into `out` `(m, dv)`, with `scores` `(m, tk)` as scratch.
    fn block(&self, q: &[f32], k: &[f32], v: &[f32], n: Dims, scores: &mut [f32], out: &mut [f32]) {
        let Dims { tk, d, dv } = n;
        let m = out.len() / dv;
        assert!(q.len() == m * d && k.len() == tk * d && v.len() == tk * dv);
        assert!(scores.len() == m * tk);
        // SAFETY: scores (m, tk) row-major = scale * q (m, d) row-major @ k^T, k^T being k
        // (tk, d) row-major read with column stride d and row stride 1; the asserts above
        // bound every address and the output aliases no input.
        unsafe {
            gemm::gemm(
                m,
                tk,
                d,
                scores.as_mut_ptr(),
                1,
                tk as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let mut inv_sums = Vec::with_capacity(m);
        for row in scores.chunks_mut(tk) {
            let max = row_max(row);
            inv_sums.push(1.0 / exp_sum(row, max));
        }
        // SAFETY: out (m, dv) row-major = p (m, tk) row-major @ v (tk, dv) row-major, bounded
        // by the asserts above; the output aliases no input.
        unsafe {
            gemm::gemm(
                m,
                dv,
                tk,
                out.as_mut_ptr(),
                1,
                dv as isize,
                false,
                scores.as_ptr(),
                1,
                tk as isize,
                v.as_ptr(),
                1,
                dv as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        // Normalised after the product: m x dv divisions instead of m x tk.
        for (row, inv) in out.chunks_mut(dv).zip(inv_sums) {
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// The largest element, in eight lanes so that it vectorises.
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "dnd-cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (b, h, tq, d) = l1.shape().dims4()?;
        let (kb, kh, tk, kd) = l2.shape().dims4()?;
        let (vb, vh, vt, dv) = l3.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || (vb, vh, vt) != (b, h, tk) || tk == 0 {
            candle_core::bail!(
                "{}: q {:?}, k {:?}, v {:?} do not fit together",
                self.name(),
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let shape = Shape::from((b, h, tq, dv));
        let mut out = vec![0f32; shape.elem_count()];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), shape));
        }
        let dims = Dims { tk, d, dv };
        let rows = (BLOCK_SCORES / tk).clamp(16, 512);
        out.par_chunks_mut(tq * dv)
            .enumerate()
            .for_each(|(i, out)| {
                let (q, k, v) = (
                    &q[i * tq * d..][..tq * d],
                    &k[i * tk * d..][..tk * d],
                    &v[i * tk * dv..][..tk * dv],
                );
                out.par_chunks_mut(rows * dv)
                    .enumerate()
                    .for_each(|(j, out)| {
                        let m = out.len() / dv;
                        let q = &q[j * rows * d..][..m * d];
                        SCORES.with_borrow_mut(|s| {
                            s.resize(m * tk, 0.0);
                            self.block(q, k, v, dims, &mut s[..m * tk], out)
                        });
                    });
            });
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::cpu_ops::tests::max_diff;
    use crate::nn::seeded_randn;

    /// candle's ops, unblocked: the reference.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let s = ((q * scale).unwrap()).matmul(&k.t().unwrap()).unwrap();
        candle_nn::ops::softmax_last_dim(&s)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn blocked_attention_equals_candles_ops() {
        // Partial blocks (600 queries in blocks of 512, 20 in blocks of 16), one key, value
        // widths other than the key's, and scores large enough for the max shift to matter.
        for (i, &(b, h, tq, tk, d, dv, spread)) in [
            (2, 3, 5, 7, 4, 6, 1.0),
            (1, 2, 300, 77, 40, 40, 4.0),
            (1, 1, 600, 4096, 32, 32, 1.0),
            (1, 1, 20, 140_000, 4, 4, 1.0),
            (3, 1, 1, 1, 8, 8, 1.0),
            (1, 2, 17, 33, 16, 512, 30.0),
        ]
        .iter()
        .enumerate()
        {
            let draw = |s: &[usize], seed| (seeded_randn(s, seed).unwrap() * spread).unwrap();
            let q = draw(&[b, h, tq, d], 3 * i as u64);
            let k = draw(&[b, h, tk, d], 3 * i as u64 + 1);
            let v = draw(&[b, h, tk, dv], 3 * i as u64 + 2);
            let scale = 1.0 / (d as f64).sqrt();
            let ours = q
                .apply_op3_no_bwd(
                    &k,
                    &v,
                    &CpuAttention {
                        scale: scale as f32,
                    },
                )
                .unwrap();
            assert_eq!(ours.dims(), &[b, h, tq, dv]);
            let diff = max_diff(ours, plain(&q, &k, &v, scale));
            assert!(diff < 2e-5 * spread as f32, "case {i}: {diff}");
        }
    }
}
