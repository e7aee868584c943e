//! The decoder of Stable Diffusion's VAE (diffusers' `AutoencoderKL`: `post_quant_conv`, then
//! `decoder.*`), ours rather than candle-transformers': its convolutions and GroupNorms take our
//! fused CPU kernels (banded im2col, GroupNorm+SiLU in one pass), its attention uses only plain
//! 2-D products (candle's applies a Linear to a transposed input, which candle's CPU matmul gets
//! wrong after the first image of a batch), and it is where GPU kernels of our own plug in.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::blocks::{Norms, ResnetBlock};
use crate::nn::{self, Conv, GroupNorm, Linear};
use crate::Result;

/// diffusers builds every decoder norm with this epsilon.
const EPS: f64 = 1e-6;

/// What the decoder's shape depends on, from `vae/config.json`.
pub(super) struct Shape<'a> {
    pub latent_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: &'a [usize],
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

/// diffusers' single-head spatial self-attention of the mid block, residual included.
struct Attention {
    norm: GroupNorm,
    /// q, k and v stacked.
    qkv: Linear,
    out: Linear,
}

/// A projection under its current diffusers name or the one older checkpoints use
/// (`to_q`/`query`, ...), stored as a Linear (C, C) or as a 1x1 convolution (C, C, 1, 1).
fn projection(vb: &VarBuilder, names: [&str; 2], c: usize) -> candle_core::Result<Linear> {
    let name = if vb.contains_tensor(&format!("{}.weight", names[0])) {
        names[0]
    } else {
        names[1]
    };
    Linear::load_pointwise(&vb.pp(name), c, c)
}

impl Attention {
    fn load(vb: &VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("group_norm"), groups, c, EPS)?,
            qkv: Linear::stacked(&[
                projection(vb, ["to_q", "query"], c)?,
                projection(vb, ["to_k", "key"], c)?,
                projection(vb, ["to_v", "value"], c)?,
            ])?,
            out: projection(vb, ["to_out.0", "proj_attn"], c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let qkv = self
            .qkv
            .forward_map_to_tokens(&self.norm.forward(x, false)?)?;
        let [q, k, v]: [Tensor; 3] = nn::split_stacked_heads(&qkv, 1)?;
        // diffusers upcasts the softmax (upcast_softmax=True), which nn::attention computes in
        // f32 for every storage type; the products stay in the storage type, on tensor cores
        // (in f32 they took 5.6 of the decoder's 90 ms on an H200, at 8 images).
        let y = nn::attention(&q, &k, &v, 1.0 / (c as f64).sqrt(), None)?.squeeze(1)?;
        self.out.forward_tokens_to_map(&y, (h, w), x)
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// Nearest 2x upsampling and a convolution, as one operation.
    upsample: Option<Conv>,
}

/// `post_quant_conv` and the decoder: latents (already divided by the scaling factor) to
/// images in about [-1, 1].
pub(super) struct Decoder {
    post_quant: Option<Conv>,
    conv_in: Conv,
    mid: (ResnetBlock, Option<Attention>, ResnetBlock),
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    pub(super) fn load(vb: &VarBuilder, s: &Shape) -> candle_core::Result<Self> {
        let (groups, lat) = (s.norm_num_groups, s.latent_channels);
        let norms = Norms { groups, eps: EPS };
        // The convolutions channels-last (on CUDA with cuDNN; elsewhere nothing changes): the
        // feature maps stay NHWC from conv_in to conv_out, GroupNorm, upsampling and the
        // attention reading them in place, where NCHW maps cost cuDNN two transposes a
        // convolution (15 of the decoder's 90 ms on an H200, at 8 images).
        let resnet = |vb: &VarBuilder, c_in, c_out| {
            ResnetBlock::load(vb, (c_in, c_out), norms, None, 1.0)?.channels_last()
        };
        let conv = |vb: &VarBuilder, shape, stride_padding| {
            Conv::load(vb, shape, stride_padding, true)?.channels_last()
        };
        let widths: Vec<usize> = s.block_out_channels.iter().rev().copied().collect();
        let Some(&top) = widths.first() else {
            candle_core::bail!("vae config: block_out_channels is empty")
        };
        let d = vb.pp("decoder");
        let m = d.pp("mid_block");
        let mid = (
            resnet(&m.pp("resnets.0"), top, top)?,
            s.mid_block_add_attention
                .then(|| Attention::load(&m.pp("attentions.0"), top, groups))
                .transpose()?,
            resnet(&m.pp("resnets.1"), top, top)?,
        );
        let mut up = Vec::new();
        let mut prev = top;
        for (i, &width) in widths.iter().enumerate() {
            let u = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=s.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { width };
                    resnet(&u.pp(format!("resnets.{j}")), c_in, width)
                })
                .collect::<candle_core::Result<_>>()?;
            let upsample = (i + 1 < widths.len())
                .then(|| {
                    Conv::load_upsampling(&u.pp("upsamplers.0.conv"), (width, width), true)?
                        .channels_last()
                })
                .transpose()?;
            up.push(UpBlock { resnets, upsample });
            prev = width;
        }
        let bottom = *widths.last().expect("not empty");
        Ok(Self {
            // The two convolutions with a handful of channels on one side stay NCHW: little
            // to gain, and cuDNN's tensor-core NHWC kernels want multiples of 8.
            post_quant: s
                .use_post_quant_conv
                .then(|| Conv::load(&vb.pp("post_quant_conv"), (lat, lat, 1), (1, 0), true))
                .transpose()?,
            conv_in: conv(&d.pp("conv_in"), (lat, top, 3), (1, 1))?,
            mid,
            up,
            norm_out: GroupNorm::load(&d.pp("conv_norm_out"), groups, bottom, EPS)?,
            conv_out: Conv::load(&d.pp("conv_out"), (bottom, s.out_channels, 3), (1, 1), true)?,
        })
    }

    pub(super) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid.0.forward(&x, None)?;
        if let Some(a) = &self.mid.1 {
            x = a.forward(&x)?;
        }
        x = self.mid.2.forward(&x, None)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(conv) = &block.upsample {
                x = conv.forward(&x)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x, true)?)
    }
}
