//! f32 CPU kernels for the convolutional models' hot spots (the target network, SD's VAE, the
//! tiny decoder).
//!
//! Convolution + bias (+ residual, + ReLU) as one fused operation: per image and band of output
//! rows, im2col into a bounded `[C_in * k * k, rows * W_out]` buffer (1x1 stride-1
//! convolutions need none) and one GEMM that writes NCHW output directly on top of the bias,
//! with the ReLU applied while the output is still in cache. Images of a batch run in parallel.
//! candle's own CPU conv2d runs 3x3 convolutions at a third of GEMM speed and builds the whole
//! im2col matrix of a batch at once (gigabytes at 512 px); this runs them at GEMM speed in a
//! few megabytes per thread (docs/PERFORMANCE.md).
//!
//! GroupNorm (+ SiLU) in two passes over each group: statistics, then the affine map and the
//! activation, where candle needs a dozen broadcast operations and temporaries.
//!
//! Attention in blocks of queries, never the whole score matrix (`attention`). The softmax and
//! SiLU take their exponentials from a polynomial the compiler vectorises (`exp_lane`), not
//! libm's scalar `expf`.

mod attention;

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};
use rayon::prelude::*;

pub(crate) use attention::CpuAttention;

thread_local! {
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The im2col buffer of one band holds at most this many floats (16 MiB): every ResNet layer at
/// 224 px fits in one band; SD's VAE at 512 px takes a few output rows at a time.
const BAND_FLOATS: usize = 4 << 20;

pub(crate) struct CpuConv {
    /// `[c_out, c_in * k * k]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Input channels of one group, which each filter sees.
    c_in: usize,
    c_out: usize,
    /// Input and output channels split into this many groups, each its own convolution
    /// (ResNeXt's 3x3s).
    groups: usize,
    k: usize,
    stride: usize,
    pad: usize,
    pub(crate) relu: bool,
}

impl CpuConv {
    /// `weight` is `[c_out, c_in, k, k]` row-major.
    pub(crate) fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        c_in: usize,
        k: usize,
        stride: usize,
        pad: usize,
        relu: bool,
    ) -> Self {
        let c_out = bias.len();
        assert_eq!(weight.len(), c_out * c_in * k * k, "conv weight shape");
        Self {
            weight,
            bias,
            c_in,
            c_out,
            groups: 1,
            k,
            stride,
            pad,
            relu,
        }
    }

    /// Makes this a grouped convolution: `c_in` (of `new`) is then one group's input
    /// channels, and the input has `groups` times as many.
    pub(crate) fn set_groups(&mut self, groups: usize) {
        assert_eq!(self.c_out % groups, 0, "grouped conv output channels");
        self.groups = groups;
    }

    fn out_size(&self, size: usize) -> usize {
        (size + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Rows `(ci, ky, kx)`, columns the output positions of rows `oy0..oy1`; zero where the
    /// window leaves the image.
    fn im2col(&self, x: &[f32], h: usize, w: usize, (oy0, oy1): (usize, usize), col: &mut [f32]) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let ow = self.out_size(w);
        let n = (oy1 - oy0) * ow;
        // Output columns whose input column ix = ox*s + kx - p lies inside [0, w).
        let cols = |kx: usize| {
            let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
            let hi = if w + p > kx {
                (w + p - kx - 1) / s + 1
            } else {
                0
            }
            .min(ow);
            (lo, hi)
        };
        for ci in 0..self.c_in {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut col[((ci * k + ky) * k + kx) * n..][..n];
                    let (ox_lo, ox_hi) = cols(kx);
                    for (oy, dst) in (oy0..oy1).zip(row.chunks_mut(ow)) {
                        let iy = (oy * s + ky) as isize - p as isize;
                        if iy < 0 || iy >= h as isize || ox_lo >= ox_hi {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        dst[..ox_lo].fill(0.0);
                        dst[ox_hi..].fill(0.0);
                        let ix0 = ox_lo * s + kx - p;
                        if s == 1 {
                            dst[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
                        } else {
                            for (j, d) in dst[ox_lo..ox_hi].iter_mut().enumerate() {
                                *d = src[ix0 + j * s];
                            }
                        }
                    }
                }
            }
        }
    }

    /// One image: `x` is `[c_in * groups, h, w]`, `out` is `[c_out, oh, ow]`; `residual` (same
    /// shape as `out`) is added before the ReLU, as at the end of a ResNet block.
    fn image(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
        parallelism: gemm::Parallelism,
    ) {
        let n = self.out_size(h) * self.out_size(w);
        match residual {
            Some(r) => {
                for ((o, r), &b) in out.chunks_mut(n).zip(r.chunks(n)).zip(&self.bias) {
                    o.iter_mut().zip(r).for_each(|(o, r)| *o = r + b);
                }
            }
            None => {
                for (o, &b) in out.chunks_mut(n).zip(&self.bias) {
                    o.fill(b);
                }
            }
        }
        if self.c_in == 1 && self.groups == self.c_out && self.stride == 1 {
            self.depthwise(x, (h, w), out);
        } else {
            self.grouped_gemm(x, (h, w), out, parallelism);
        }
        if self.relu {
            out.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }

    /// A depthwise convolution of stride 1 (ConvNeXt's 7x7s), accumulated into `out`: each
    /// tap adds a weighted input row to an output row, in cache, where im2col and a one-row
    /// GEMM per channel would pass over k * k times the map in memory.
    fn depthwise(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32]) {
        let (k, p) = (self.k, self.pad);
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let planes = x.chunks(h * w).zip(self.weight.chunks(k * k));
        for ((plane, taps), o) in planes.zip(out.chunks_mut(oh * ow)) {
            for (oy, orow) in o.chunks_mut(ow).enumerate() {
                for (ky, row_taps) in taps.chunks(k).enumerate() {
                    let Some(iy) = (oy + ky).checked_sub(p).filter(|&iy| iy < h) else {
                        continue;
                    };
                    let irow = &plane[iy * w..(iy + 1) * w];
                    for (kx, &t) in row_taps.iter().enumerate() {
                        // Output columns whose input column ox + kx - p lies in the row.
                        let lo = p.saturating_sub(kx);
                        let hi = (w + p).saturating_sub(kx).min(ow);
                        if lo >= hi {
                            continue;
                        }
                        let src = &irow[lo + kx - p..hi + kx - p];
                        for (o, &v) in orow[lo..hi].iter_mut().zip(src) {
                            *o += t * v;
                        }
                    }
                }
            }
        }
    }

    /// Each group's GEMM (one group: the whole convolution), accumulated into `out`.
    fn grouped_gemm(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        out: &mut [f32],
        parallelism: gemm::Parallelism,
    ) {
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let n = oh * ow;
        let kk = self.c_in * self.k * self.k;
        // Each group's filters read its input channels and write its output channels.
        let c_out = self.c_out / self.groups;
        let groups = x
            .chunks(self.c_in * h * w)
            .zip(self.weight.chunks(c_out * kk))
            .zip(out.chunks_mut(c_out * n));
        for ((x, weight), out) in groups {
            // out[:, first..first + cols] += weight @ rhs, where rhs is [kk, cols] with row
            // stride `rhs_stride`: a band of output rows is a column range of the [c_out, n]
            // output.
            let gemm_into =
                |out: &mut [f32], first: usize, cols: usize, rhs: &[f32], rhs_stride| {
                    assert!(first + cols <= n && rhs.len() >= (kk - 1) * rhs_stride + cols);
                    assert!(weight.len() == c_out * kk && out.len() == c_out * n);
                    // SAFETY: row-major [c_out, n] output (column offset `first`, `cols` columns) +=
                    // [c_out, kk] @ [kk, cols]; the asserts above bound every address, and `out`
                    // does not alias the inputs.
                    unsafe {
                        gemm::gemm(
                            c_out,
                            cols,
                            kk,
                            out.as_mut_ptr().add(first),
                            1,
                            n as isize,
                            true,
                            weight.as_ptr(),
                            1,
                            kk as isize,
                            rhs.as_ptr(),
                            1,
                            rhs_stride as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            parallelism,
                        );
                    }
                };
            if self.k == 1 && self.stride == 1 && self.pad == 0 {
                gemm_into(out, 0, n, x, n);
            } else {
                let rows = (BAND_FLOATS / (kk * ow)).clamp(1, oh);
                // One im2col buffer per thread, reused across calls: no allocation or page
                // faults.
                COL.with_borrow_mut(|buf| {
                    buf.resize(kk * rows * ow, 0.0);
                    for oy0 in (0..oh).step_by(rows) {
                        let oy1 = (oy0 + rows).min(oh);
                        let cols = (oy1 - oy0) * ow;
                        self.im2col(x, h, w, (oy0, oy1), &mut buf[..kk * cols]);
                        gemm_into(out, oy0 * ow, cols, &buf[..kk * cols], cols);
                    }
                });
            }
        }
    }
}

impl CpuConv {
    fn run(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != self.c_in * self.groups {
            candle_core::bail!(
                "dnd-cpu-conv2d: input has {c} channels, weights expect {}",
                self.c_in * self.groups
            )
        }
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let out_shape = Shape::from((b, self.c_out, oh, ow));
        let residual = match residual {
            Some((s, l)) if l.shape() == &out_shape => Some(contiguous_f32(s, l)?),
            Some((_, l)) => candle_core::bail!(
                "dnd-cpu-conv2d: residual {:?} does not match output {out_shape:?}",
                l.shape()
            ),
            None => None,
        };
        let per_out = self.c_out * oh * ow;
        let per_in = c * h * w;
        let mut out = vec![0f32; b * per_out];
        let res_of = |i: usize| residual.map(|r| &r[i * per_out..(i + 1) * per_out]);
        per_image(&mut out, per_out, |i, o, par| {
            self.image(&x[i * per_in..][..per_in], h, w, res_of(i), o, par)
        });
        Ok((CpuStorage::F32(out), out_shape))
    }
}

/// Nearest 2x upsampling followed by a 3x3 convolution (stride 1, padding 1), as SD's VAE and
/// TAESD upsample, computed on the small input: each of the four output phases (even/odd row,
/// even/odd column) is a 2x2 convolution whose taps are sums of the 3x3 taps, so the work is
/// 16/36 of convolving the upsampled image, which is never built.
pub(crate) struct CpuUpConv {
    /// Phase `2 * py + px`: a 2x2 convolution with padding 1 whose output row t, column u
    /// is output pixel (2 (t - py) + py, 2 (u - px) + px).
    phases: Vec<CpuConv>,
    bias: Vec<f32>,
}

/// The 2x2 filters of the four output phases of nearest 2x upsampling followed by the 3x3
/// convolution `weight` (`[c_out, c_in, 3, 3]`, row-major), stacked phase by phase as
/// `[4 * c_out, c_in, 2, 2]`, phase `2 * py + px` first at `py`. With padding 1 on the small
/// input, a phase's output row t, column u is output pixel (2 (t - py) + py, 2 (u - px) + px).
pub(crate) fn upsample_phase_filters(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    assert_eq!(weight.len(), c_out * c_in * 9, "conv weight shape");
    // Which 3x3 taps land on small-image offset 0 or 1 of the 2x2 window, per phase: even
    // rows see rows (i-1, i) through taps (0 | 1+2), odd rows (i, i+1) through (0+1 | 2).
    let taps = |phase: usize, d: usize| -> &'static [usize] {
        match (phase, d) {
            (0, 0) => &[0],
            (0, _) => &[1, 2],
            (_, 0) => &[0, 1],
            _ => &[2],
        }
    };
    let mut stacked = vec![0f32; 4 * c_out * c_in * 4];
    for (ph, w2) in stacked.chunks_mut(c_out * c_in * 4).enumerate() {
        let (py, px) = (ph / 2, ph % 2);
        for (o, chunk) in w2.chunks_mut(4).enumerate() {
            let w3 = &weight[o * 9..o * 9 + 9];
            for (d, v) in chunk.iter_mut().enumerate() {
                let (dy, dx) = (d / 2, d % 2);
                *v = taps(py, dy)
                    .iter()
                    .flat_map(|&ky| taps(px, dx).iter().map(move |&kx| w3[ky * 3 + kx]))
                    .sum();
            }
        }
    }
    stacked
}

/// candle's nearest 2x upsampling of `x`, then its 3x3 convolution by `weight` (padding 1) and
/// `bias`: what the upsampling convolutions must compute.
#[cfg(test)]
pub(crate) fn upsample_then_conv(
    x: &candle_core::Tensor,
    weight: &candle_core::Tensor,
    bias: &candle_core::Tensor,
) -> candle_core::Tensor {
    let (_, _, h, w) = x.dims4().unwrap();
    x.upsample_nearest2d(2 * h, 2 * w)
        .unwrap()
        .conv2d(weight, 1, 1, 1, 1)
        .unwrap()
        .broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1)).unwrap())
        .unwrap()
}

impl CpuUpConv {
    /// `weight` is the 3x3 convolution's `[c_out, c_in, 3, 3]`, row-major.
    pub(crate) fn new(weight: &[f32], bias: Vec<f32>, c_in: usize) -> Self {
        let c_out = bias.len();
        let phases = upsample_phase_filters(weight, c_out, c_in)
            .chunks(c_out * c_in * 4)
            .map(|w2| CpuConv::new(w2.to_vec(), vec![0.0; c_out], c_in, 2, 1, 1, false))
            .collect();
        Self { phases, bias }
    }

    /// One image: `x` is `[c_in, h, w]`, `out` is `[c_out, 2h, 2w]`.
    fn image(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], par: gemm::Parallelism) {
        let (oh, ow) = (2 * h, 2 * w);
        let n = oh * ow;
        for (o, &b) in out.chunks_mut(n).zip(&self.bias) {
            o.fill(b);
        }
        let first = &self.phases[0];
        let kk = first.c_in * 4;
        // The 2x2 convolutions' outputs are (h + 1) x (w + 1); each phase uses h x w of them.
        let cw = w + 1;
        let rows = (BAND_FLOATS / (kk * cw)).clamp(1, h);
        COL.with_borrow_mut(|buf| {
            for (ph, conv) in self.phases.iter().enumerate() {
                let (py, px) = (ph / 2, ph % 2);
                for t0 in (py..py + h).step_by(rows) {
                    let t1 = (t0 + rows).min(py + h);
                    let cols = (t1 - t0) * cw;
                    buf.resize(buf.len().max(kk * cols), 0.0);
                    conv.im2col(x, h, w, (t0, t1), &mut buf[..kk * cols]);
                    for t in t0..t1 {
                        let oy = 2 * (t - py) + py;
                        let rhs = (t - t0) * cw + px;
                        assert!(rhs + (kk - 1) * cols + w <= kk * cols);
                        assert!(oy * ow + px + 2 * (w - 1) + (conv.c_out - 1) * n < out.len());
                        // SAFETY: out[:, oy, px::2] (c_out rows of stride n, w columns of
                        // stride 2) += weight [c_out, kk] @ col[:, rhs..rhs + w] (row stride
                        // cols); the asserts bound both, and nothing aliases.
                        unsafe {
                            gemm::gemm(
                                conv.c_out,
                                w,
                                kk,
                                out.as_mut_ptr().add(oy * ow + px),
                                2,
                                n as isize,
                                true,
                                conv.weight.as_ptr(),
                                1,
                                kk as isize,
                                buf.as_ptr().add(rhs),
                                1,
                                cols as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                par,
                            );
                        }
                    }
                }
            }
        });
    }
}

impl CustomOp1 for CpuUpConv {
    fn name(&self) -> &'static str {
        "dnd-cpu-upsample2x-conv3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let first = &self.phases[0];
        if c != first.c_in {
            candle_core::bail!(
                "{}: input has {c} channels, weights expect {}",
                self.name(),
                first.c_in
            )
        }
        let per_out = first.c_out * 4 * h * w;
        let per_in = c * h * w;
        let mut out = vec![0f32; b * per_out];
        per_image(&mut out, per_out, |i, o, par| {
            self.image(&x[i * per_in..][..per_in], h, w, o, par)
        });
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, first.c_out, 2 * h, 2 * w)),
        ))
    }
}

/// Runs `image(i, out_i, parallelism)` over the images of `out` (`per_out` floats each): one
/// image per thread when there are enough of them (no synchronisation inside the GEMM), else
/// one image at a time with a parallel GEMM.
fn per_image(
    out: &mut [f32],
    per_out: usize,
    image: impl Fn(usize, &mut [f32], gemm::Parallelism) + Sync,
) {
    if per_out == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if out.len() / per_out >= threads {
        out.par_chunks_mut(per_out)
            .enumerate()
            .for_each(|(i, o)| image(i, o, gemm::Parallelism::None));
    } else {
        for (i, o) in out.chunks_mut(per_out).enumerate() {
            image(i, o, gemm::Parallelism::Rayon(threads));
        }
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("dnd's CPU kernels take f32 tensors")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("dnd's CPU kernels take contiguous tensors")
    };
    Ok(&data[start..end])
}

impl CustomOp1 for CpuConv {
    fn name(&self) -> &'static str {
        "dnd-cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(storage, layout, None)
    }
}

/// The same convolution with a residual input added before the ReLU.
impl CustomOp2 for CpuConv {
    fn name(&self) -> &'static str {
        "dnd-cpu-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s1, l1, Some((s2, l2)))
    }
}

/// PyTorch's `MaxPool2d(kernel_size=3, stride=2, padding=1)` (the ResNet stem's) for f32 NCHW
/// on the CPU, in one pass; candle needs two padding copies and a generic pooling kernel.
pub(crate) struct MaxPool3x3s2;

impl CustomOp1 for MaxPool3x3s2 {
    fn name(&self) -> &'static str {
        "dnd-cpu-maxpool3x3s2"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for oy in 0..oh {
                    let (y0, y1) = ((2 * oy).saturating_sub(1), (2 * oy + 2).min(h));
                    for ox in 0..ow {
                        let (x0, x1) = ((2 * ox).saturating_sub(1), (2 * ox + 2).min(w));
                        let mut m = f32::NEG_INFINITY;
                        for row in plane[y0 * w..y1 * w].chunks(w) {
                            m = row[x0..x1].iter().fold(m, |m, &v| m.max(v));
                        }
                        o[oy * ow + ox] = m;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

/// GroupNorm over (B, C, ...) f32 with a per-channel affine map, then SiLU when `silu`.
pub(crate) struct CpuGroupNorm<'a> {
    pub(crate) gamma: &'a [f32],
    pub(crate) beta: &'a [f32],
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
}

impl CustomOp1 for CpuGroupNorm<'_> {
    fn name(&self) -> &'static str {
        "dnd-cpu-group-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let dims = layout.shape().dims();
        let c = dims.get(1).copied().unwrap_or(0);
        if c != self.gamma.len() || self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!(
                "dnd-cpu-group-norm: {c} channels for {} weights in {} groups",
                self.gamma.len(),
                self.groups
            )
        }
        let plane: usize = dims[2..].iter().product();
        let per_group = c / self.groups;
        let len = per_group * plane;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(i, (o, x))| {
                // Two passes in f64, as PyTorch's (Welford) statistics are exact to f32 rounding.
                let mean = sum_f64(x, |v| v) / len as f64;
                let var = sum_f64(x, |v| (v - mean) * (v - mean)) / len as f64;
                let rstd = 1.0 / (var + self.eps).sqrt();
                let first = (i % self.groups) * per_group;
                for (j, (o, x)) in o.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                    let scale = (rstd * self.gamma[first + j] as f64) as f32;
                    let shift = self.beta[first + j] - (mean as f32) * scale;
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = x * scale + shift;
                    }
                    if self.silu {
                        silu(o);
                    }
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `e^x` for f32 within 2 ulp on [-87.3, 88.3] (Cephes' `expf` polynomial after reducing by
/// powers of 2), clamped to that range; free of branches and calls, so loops over it vectorise.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // x - n ln 2, with ln 2 split in two so the product is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    (p * r * r + r + 1.0) * two_n
}

/// Runs `body` compiled for AVX2 + FMA where the CPU has them (8 lanes), else for the
/// baseline (4 lanes): the crate is built for baseline x86-64.
#[inline(always)]
fn widest<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU was just found to have the features `avx2` is compiled for.
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// `xs[i] = e^(xs[i] - shift)`, returning their sum (summed in eight lanes: a sum in order
/// would not vectorise).
fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    widest(
        #[inline(always)]
        || {
            for x in xs.iter_mut() {
                *x = exp_lane(*x - shift);
            }
            let mut lanes = [0f32; 8];
            let chunks = xs.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().sum();
            for c in chunks {
                for i in 0..8 {
                    lanes[i] += c[i];
                }
            }
            lanes.iter().sum::<f32>() + tail
        },
    )
}

/// The sum of `f(x)` over `xs` in f64, in eight independent lanes: a single running sum waits
/// on each addition's latency and does not vectorise.
fn sum_f64(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    widest(
        #[inline(always)]
        || {
            let mut lanes = [0f64; 8];
            let chunks = xs.chunks_exact(8);
            let tail: f64 = chunks.remainder().iter().map(|&x| f(x as f64)).sum();
            for c in chunks {
                for i in 0..8 {
                    lanes[i] += f(c[i] as f64);
                }
            }
            lanes.iter().sum::<f64>() + tail
        },
    )
}

/// `x * sigmoid(x)` in place.
fn silu(xs: &mut [f32]) {
    widest(
        #[inline(always)]
        || {
            for x in xs.iter_mut() {
                *x /= 1.0 + exp_lane(-*x);
            }
        },
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The largest absolute difference of two f32 tensors.
    pub(crate) fn max_diff(a: Tensor, b: Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn vectorised_exp_is_within_two_ulp_and_clamps() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_lane(x) as f64 - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_lane(0.0), 1.0);
        assert!(exp_lane(-1000.0) > 0.0 && exp_lane(-1000.0) < 1e-37);
        assert!(exp_lane(1000.0).is_finite());
        let mut xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
        let want: f32 = xs.iter().map(|x| (x - 9.0).exp()).sum();
        let sum = exp_sum(&mut xs, 9.0);
        assert!((sum - want).abs() < 1e-6 * want, "{sum} vs {want}");
        assert!((xs[36] - 1.0).abs() < 1e-7);
    }

    #[test]
    fn matches_candle_conv2d_for_every_resnet_shape() {
        let dev = Device::Cpu;
        // (c_in, c_out, size, k, stride, pad): 7x7 stem, 3x3 s1/s2, 1x1 s1/s2, odd sizes.
        for (ci, co, hw, k, s, p) in [
            (3, 8, 23, 7, 2, 3),
            (4, 6, 9, 3, 1, 1),
            (4, 6, 9, 3, 2, 1),
            (5, 7, 8, 1, 1, 0),
            (5, 7, 9, 1, 2, 0),
        ] {
            for batch in [1, 3] {
                let x = Tensor::randn(0f32, 1.0, (batch, ci, hw, hw), &dev).unwrap();
                let w = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
                // relu?(candle's conv2d + bias [+ residual]), the reference.
                let reference = |residual: Option<&Tensor>, relu: bool| {
                    let mut y = x
                        .conv2d(&w, p, s, 1, 1)
                        .unwrap()
                        .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                        .unwrap();
                    if let Some(r) = residual {
                        y = (y + r).unwrap();
                    }
                    if relu {
                        y = y.relu().unwrap();
                    }
                    y
                };
                for relu in [false, true] {
                    let op = CpuConv::new(
                        w.flatten_all().unwrap().to_vec1().unwrap(),
                        b.to_vec1().unwrap(),
                        ci,
                        k,
                        s,
                        p,
                        relu,
                    );
                    let diff = max_diff(x.apply_op1_no_bwd(&op).unwrap(), reference(None, relu));
                    assert!(diff < 1e-3, "{ci}->{co} {k}x{k} s{s} b{batch}: {diff}");
                    let r = Tensor::randn(0f32, 1.0, reference(None, false).dims(), &dev).unwrap();
                    let diff = max_diff(
                        x.apply_op2_no_bwd(&r, &op).unwrap(),
                        reference(Some(&r), relu),
                    );
                    assert!(
                        diff < 1e-3,
                        "residual {ci}->{co} {k}x{k} s{s} b{batch}: {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn grouped_conv_matches_candle_conv2d() {
        // ResNeXt's 3x3s (strided and not), a grouped 1x1, and depthwise 7x7s (ConvNeXt's, by
        // the direct kernel), on maps wider and narrower than the filter, and a strided one.
        let dev = Device::Cpu;
        for (ci, co, groups, k, s, p, side) in [
            (8, 8, 4, 3, 1, 1, 9),
            (8, 16, 4, 3, 2, 1, 9),
            (6, 9, 3, 1, 1, 0, 9),
            (5, 5, 5, 7, 1, 3, 9),
            (5, 5, 5, 7, 1, 3, 2),
            (4, 4, 4, 3, 2, 1, 9),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, ci, side, side), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (co, ci / groups, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let mut op = CpuConv::new(
                w.flatten_all().unwrap().to_vec1().unwrap(),
                b.to_vec1().unwrap(),
                ci / groups,
                k,
                s,
                p,
                false,
            );
            op.set_groups(groups);
            let want = x
                .conv2d(&w, p, s, 1, groups)
                .unwrap()
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let diff = max_diff(x.apply_op1_no_bwd(&op).unwrap(), want);
            assert!(
                diff < 1e-3,
                "{ci}->{co} in {groups} groups, {k}x{k} s{s}: {diff}"
            );
        }
    }

    #[test]
    fn banded_im2col_matches_candle_conv2d() {
        // 512 channels x 3x3 x 1000 columns needs more than one band per output row.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 512, 3, 1000), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (4, 512, 3, 3), &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        const { assert!(512 * 9 * 1000 > BAND_FLOATS) };
        for s in [1, 2] {
            let op = CpuConv::new(
                w.flatten_all().unwrap().to_vec1().unwrap(),
                b.to_vec1().unwrap(),
                512,
                3,
                s,
                1,
                false,
            );
            let want = x.conv2d(&w, 1, s, 1, 1).unwrap();
            let diff = max_diff(x.apply_op1_no_bwd(&op).unwrap(), want);
            assert!(diff < 1e-3, "stride {s}: {diff}");
        }
    }

    #[test]
    fn group_norm_matches_candle_nn() {
        let dev = Device::Cpu;
        for (dims, groups) in [
            (vec![2, 8, 5, 7], 4),
            (vec![3, 6, 10], 3),
            (vec![1, 4, 2, 2], 4),
        ] {
            let c = dims[1];
            // An offset mean, as activations have: the statistics must not lose it.
            let x = (Tensor::randn(0f32, 3.0, dims.as_slice(), &dev).unwrap() + 5.0).unwrap();
            let gamma = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let beta = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let reference =
                candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-6).unwrap();
            let want = candle_core::Module::forward(&reference, &x).unwrap();
            let (g, bt) = (
                gamma.to_vec1::<f32>().unwrap(),
                beta.to_vec1::<f32>().unwrap(),
            );
            for silu in [false, true] {
                let op = CpuGroupNorm {
                    gamma: &g,
                    beta: &bt,
                    groups,
                    eps: 1e-6,
                    silu,
                };
                let got = x.apply_op1_no_bwd(&op).unwrap();
                let want = if silu {
                    want.silu().unwrap()
                } else {
                    want.clone()
                };
                let diff = max_diff(got, want);
                assert!(
                    diff < 1e-4,
                    "{dims:?} in {groups} groups, silu {silu}: {diff}"
                );
            }
        }
    }

    #[test]
    fn upsampled_conv_matches_upsample_then_candle_conv2d() {
        let dev = Device::Cpu;
        for (b, ci, co, h, w) in [(1, 3, 5, 4, 6), (3, 4, 2, 5, 5), (2, 6, 3, 1, 7)] {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let want = upsample_then_conv(&x, &wt, &bias);
            let op = CpuUpConv::new(
                &wt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                bias.to_vec1().unwrap(),
                ci,
            );
            let got = x.apply_op1_no_bwd(&op).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(got, want);
            assert!(diff < 1e-4, "b{b} {ci}->{co} {h}x{w}: {diff}");
        }
    }

    #[test]
    fn maxpool_matches_padded_candle_pooling() {
        let dev = Device::Cpu;
        for hw in [7, 8, 112] {
            // Negative values too: padding must act as -inf, not zero.
            let x = Tensor::randn(0f32, 1.0, (2, 3, hw, hw), &dev).unwrap();
            let got = x.apply_op1_no_bwd(&MaxPool3x3s2).unwrap();
            let padded = x
                .pad_with_same(2, 1, 1)
                .unwrap()
                .pad_with_same(3, 1, 1)
                .unwrap();
            let want = padded.max_pool2d_with_stride(3, 2).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(max_diff(got, want), 0.0, "size {hw}");
        }
    }
}
