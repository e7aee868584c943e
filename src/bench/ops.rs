//! `ops.*` rows: each op dnd fuses, timed through dnd's path (our CUDA kernels and cuDNN op
//! on a GPU, our fused kernels in f32 on the CPU) and through candle's plain
//! ops, in the same process on the same inputs: the before/after of each lever, at the largest
//! shape SD meets it at 512 px.

use candle_core::{Module, Tensor};

use super::Bench;
use crate::error::Result;
use crate::nn;

impl Bench<'_> {
    pub(super) fn time_fused_ops(&mut self) -> Result<()> {
        if !self.group("ops") {
            return Ok(());
        }
        let (dev, dt) = (self.device.clone(), self.dtype);
        let quick = self.opts.quick;
        let bytes = dt.size_in_bytes() as f64;

        // GroupNorm + SiLU as in SD's VAE decoder at 512 px, four latents (one CUDA chunk).
        let (n, c, side) = if quick { (2, 32, 32) } else { (4, 128, 512) };
        let x = self.random(&[n, c, side, side])?;
        let (gamma, beta) = (self.random(&[c])?, self.random(&[c])?);
        let vars = [("weight", &gamma), ("bias", &beta)].map(|(k, t)| (k.to_string(), t.clone()));
        let vb = candle_nn::VarBuilder::from_tensors(vars.into_iter().collect(), dt, &dev);
        let ours = nn::GroupNorm::load(&vb, 32, c, 1e-6)?;
        let plain = candle_nn::GroupNorm::new(gamma, beta, c, 32, 1e-6)?;
        // Read once, written once: the least any implementation moves.
        let gb = 2.0 * x.elem_count() as f64 * bytes / 1e9;
        let note = format!("({n}, {c}, {side}, {side}) in 32 groups, then SiLU; GB moved at least");
        self.measure("ops.group_norm_silu.dnd", gb, "GB/s", &note, || {
            ours.forward(&x, true)?;
            Ok(())
        })?;
        self.measure("ops.group_norm_silu.candle", gb, "GB/s", &note, || {
            plain.forward(&x)?.silu()?;
            Ok(())
        })?;
        // The same map channels-last, as the VAE's convolutions leave it (candle's GroupNorm
        // would copy it to NCHW first).
        let nhwc = x
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .permute((0, 3, 1, 2))?;
        let note = format!("{note}; channels-last storage");
        self.measure(
            "ops.group_norm_silu_channels_last.dnd",
            gb,
            "GB/s",
            &note,
            || {
                ours.forward(&nhwc, true)?;
                Ok(())
            },
        )?;

        // A batch of resized, cropped 8-bit images becoming ResNet-50's input on the device: dnd
        // sends the pixels and normalises them there; candle's path (dnd's before) normalised
        // to f32 on the CPU's cores, sent those, then converted them.
        let pre = crate::probe::Preprocess::imagenet();
        let n = if quick { 4 } else { 256 };
        let pixels: Vec<u8> = (0..n * pre.values_per_image())
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let note = format!("{n} images of 224x224, 8-bit HWC on the CPU -> normalised NCHW");
        self.measure("ops.input_pixels.dnd", n as f64, "images/s", &note, || {
            pre.input(&pixels, &dev, dt)?;
            Ok(())
        })?;
        self.measure(
            "ops.input_pixels.candle",
            n as f64,
            "images/s",
            &note,
            || {
                let cpu = pre.input(&pixels, &candle_core::Device::Cpu, candle_core::DType::F32)?;
                cpu.to_device(&dev)?.to_dtype(dt)?;
                Ok(())
            },
        )?;

        // A resnet block's last 3x3 convolution at 64x64 latents, 16 rows: bias, residual, ReLU.
        let shape = if quick { (2, 16, 16) } else { (16, 320, 64) };
        self.time_conv3x3("ops.conv3x3_residual_relu", shape, true, false)?;
        // ResNet-50's layer3 3x3 convolution at 224 px, batch 256, with bias and ReLU: dnd's
        // path channels-last (on an NHWC input, as the previous layer leaves it), candle's NCHW.
        let shape = if quick { (2, 16, 14) } else { (256, 256, 14) };
        self.time_conv3x3("ops.conv3x3_channels_last", shape, false, true)?;

        // The VAE's last upsampler at 512 px, 4 images: nearest 2x from 256x256, then a 3x3
        // convolution, 256 channels. dnd's path channels-last, candle's upsampling then NCHW.
        let shape = if quick { (2, 16, 8) } else { (4, 256, 256) };
        self.time_upsample_conv(shape)?;

        // The UNet's feed-forward GEGLU at 64x64 latents, 16 rows.
        let (rows, inner) = if quick {
            (2 * 256, 128)
        } else {
            (16 * 4096, 1280)
        };
        let h = self.random(&[rows, 2 * inner])?;
        let gb = 3.0 * (rows * inner) as f64 * bytes / 1e9;
        let note = format!("({rows}, {}) -> ({rows}, {inner}); GB moved", 2 * inner);
        self.measure("ops.geglu.dnd", gb, "GB/s", &note, || {
            nn::geglu(&h, None)?;
            Ok(())
        })?;
        self.measure("ops.geglu.candle", gb, "GB/s", &note, || {
            (h.narrow(1, 0, inner)? * h.narrow(1, inner, inner)?.gelu_erf()?)?;
            Ok(())
        })?;
        // The whole first half of that feed-forward: the 2 * inner wide linear layer, its bias
        // and GEGLU; the bias added by the GEGLU kernel, against its own epilogue pass before
        // the GEGLU (dnd's path until the former).
        let dim = inner / 4;
        let x = self.random(&[rows, dim])?;
        let layer = nn::Linear::new(
            self.random(&[2 * inner, dim])?,
            Some(self.random(&[2 * inner])?),
        );
        let note = format!("({rows}, {dim}) -> ({rows}, {inner}); rows/s");
        self.measure("ops.linear_geglu.dnd", rows as f64, "rows/s", &note, || {
            layer.forward_geglu(&x)?;
            Ok(())
        })?;
        self.measure(
            "ops.linear_geglu.separate",
            rows as f64,
            "rows/s",
            &note,
            || {
                nn::geglu(&layer.forward(&x)?, None)?;
                Ok(())
            },
        )?;

        // CLIP ViT-B/16's LayerNorm at batch 64: 64 x 197 rows of 768.
        let (rows, c) = if quick { (64, 768) } else { (64 * 197, 768) };
        let x = self.random(&[rows, c])?;
        let (gamma, beta) = (self.random(&[c])?, self.random(&[c])?);
        let ours = nn::LayerNorm::new(gamma.clone(), beta.clone(), 1e-5);
        let plain = candle_nn::LayerNorm::new(gamma, beta, 1e-5);
        let gb = 2.0 * x.elem_count() as f64 * bytes / 1e9;
        let note = format!("({rows}, {c}); GB moved at least");
        self.measure("ops.layer_norm.dnd", gb, "GB/s", &note, || {
            ours.forward(&x)?;
            Ok(())
        })?;
        self.measure("ops.layer_norm.candle", gb, "GB/s", &note, || {
            plain.forward(&x)?;
            Ok(())
        })?;

        // SD 1.x's self-attention at 64x64 latents, 16 rows: 8 heads of 40 over 4096 tokens;
        // CLIP ViT-B/16's at batch 64: 12 heads of 64 over 197.
        let shapes = if quick {
            [
                ("ops.attention", [2, 2, 256, 40]),
                ("ops.attention_d64", [2, 2, 197, 64]),
            ]
        } else {
            [
                ("ops.attention", [16, 8, 4096, 40]),
                ("ops.attention_d64", [64, 12, 197, 64]),
            ]
        };
        for (row, [b, heads, tokens, d]) in shapes {
            let qkv: Vec<Tensor> = (0..3)
                .map(|_| self.random(&[b, heads, tokens, d]))
                .collect::<Result<_>>()?;
            let scale = 1.0 / (d as f64).sqrt();
            let tflop = 4.0 * (b * heads * tokens * tokens * d) as f64 / 1e12;
            let note = format!(
                "({b}, {heads}, {tokens}, {d}), {}",
                nn::attention_path(&qkv[0], &qkv[1], &qkv[2])
            );
            self.measure(&format!("{row}.dnd"), tflop, "TFLOP/s", &note, || {
                nn::attention(&qkv[0], &qkv[1], &qkv[2], scale, None)?;
                Ok(())
            })?;
            let note = format!("({b}, {heads}, {tokens}, {d}), scores in pieces of at most 2^28");
            self.measure(&format!("{row}.candle"), tflop, "TFLOP/s", &note, || {
                nn::unfused_attention(&qkv[0], &qkv[1], &qkv[2], scale)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// `{row}.dnd` and `{row}.candle`: a 3x3 convolution of `(n, c, side, side)` with bias,
    /// `residual` if asked, and ReLU, through `nn::Conv` (channels-last if asked, from an NHWC
    /// input) and through candle's conv2d and broadcast ops.
    fn time_conv3x3(
        &mut self,
        row: &str,
        (n, c, side): (usize, usize, usize),
        residual: bool,
        channels_last: bool,
    ) -> Result<()> {
        let (dev, dt) = (self.device.clone(), self.dtype);
        let x = if channels_last {
            self.random(&[n, side, side, c])?.permute((0, 3, 1, 2))?
        } else {
            self.random(&[n, c, side, side])?
        };
        let x_nchw = x.contiguous()?;
        let r = self.random(&[n, c, side, side])?;
        let w = (self.random(&[c, c, 3, 3])? * (1.0 / (9.0 * c as f64).sqrt()))?;
        let bias = self.random(&[c])?;
        let mut conv = nn::Conv::new(w.clone(), bias.clone(), (1, 1), true, &dev, dt)?;
        if channels_last {
            conv = conv.channels_last()?;
        }
        let tflop = 2.0 * (n * c * c * 9 * side * side) as f64 / 1e12;
        let plus = if residual { " + residual" } else { "" };
        let note = format!("3x3 on ({n}, {c}, {side}, {side}), + bias{plus}, ReLU");
        self.measure(&format!("{row}.dnd"), tflop, "TFLOP/s", &note, || {
            if residual {
                conv.forward_residual(&x, &r)?;
            } else {
                conv.forward(&x)?;
            }
            Ok(())
        })?;
        let b4 = bias.reshape((1, c, 1, 1))?;
        self.measure(&format!("{row}.candle"), tflop, "TFLOP/s", &note, || {
            let y = x_nchw.conv2d(&w, 1, 1, 1, 1)?.broadcast_add(&b4)?;
            if residual { (y + &r)? } else { y }.relu()?;
            Ok(())
        })
    }

    /// Nearest 2x upsampling and a 3x3 convolution with its bias, in TFLOP/s of the
    /// convolution of the upsampled map (dnd's computes it on the small input, with 16/36 of
    /// those operations).
    fn time_upsample_conv(&mut self, (n, c, side): (usize, usize, usize)) -> Result<()> {
        let (dev, dt) = (self.device.clone(), self.dtype);
        let x = self.random(&[n, side, side, c])?.permute((0, 3, 1, 2))?;
        let x_nchw = x.contiguous()?;
        let w = (self.random(&[c, c, 3, 3])? * (1.0 / (9.0 * c as f64).sqrt()))?;
        let bias = self.random(&[c])?;
        let up = nn::Conv::upsampling(w.clone(), bias.clone(), &dev, dt)?.channels_last()?;
        let tflop = 2.0 * (n * c * c * 9 * 4 * side * side) as f64 / 1e12;
        let note = format!(
            "nearest 2x of ({n}, {c}, {side}, {side}), 3x3 + bias; TFLOP/s of the convolution \
             of the upsampled map"
        );
        self.measure("ops.upsample_conv3x3.dnd", tflop, "TFLOP/s", &note, || {
            up.forward(&x)?;
            Ok(())
        })?;
        let b4 = bias.reshape((1, c, 1, 1))?;
        self.measure(
            "ops.upsample_conv3x3.candle",
            tflop,
            "TFLOP/s",
            &note,
            || {
                x_nchw
                    .upsample_nearest2d(2 * side, 2 * side)?
                    .conv2d(&w, 1, 1, 1, 1)?
                    .broadcast_add(&b4)?;
                Ok(())
            },
        )
    }

    /// N(0, 1) values of `shape` on the bench's device, in its dtype.
    fn random(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &self.device)?.to_dtype(self.dtype)?)
    }
}
