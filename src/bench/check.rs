//! `dnd bench --check`: does the device compute what the CPU computes? Every model family is
//! built twice from the same seeded random weights at the reduced (`--quick`) sizes, once on
//! the CPU in f32 and once on the device in its dtype, and their outputs compared. Then, on a
//! GPU and unless `--quick`, the full-size models run batches against the same rows alone:
//! candle 0.11.1 has bugs that only show at large batches (DESIGN.md), and our own modules
//! work around them, so this is where a device run proves they hold.

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Serialize;

use super::{Bench, Options};
use crate::caption::{Blip, Generation};
use crate::clip::ClipVision;
use crate::error::Result;
use crate::hub::{Draw, Role};
use crate::nn::seeded_randn as randn;
use crate::synthesise::{StableDiffusion, TinyDecoder};
use crate::target::{random_resnet_weights, Weights};

/// One comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// e.g. `sd-turbo.unet.b3` (device against CPU) or `sd-v1-4.unet.rows.b20` (a batch
    /// against its rows alone).
    pub name: String,
    /// ||got - want|| / ||want||.
    pub error: f64,
    pub tolerance: f64,
    pub note: String,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Relative error allowed at `dtype`: f32 agrees to summation order; half precision to its
/// 8 (bf16) or 11 (f16) bits, accumulated over a deep network.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-3,
        DType::F16 => 2e-2,
        _ => 5e-2,
    }
}

/// ||a - b|| / ||b|| over all elements (NaN when either has a NaN or they differ in shape).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let cpu = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?)
    };
    let (a, b) = (cpu(a)?, cpu(b)?);
    if a.dims() != b.dims() {
        return Ok(f64::NAN);
    }
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    let e = norm(&(&a - &b)?)? / norm(&b)?.max(1e-30);
    Ok(if e.is_finite() { e } else { f64::NAN })
}

/// Runs every check, reporting each as it is done.
pub fn run(
    device: &Device,
    dtype: DType,
    opts: &Options,
    on_check: &mut dyn FnMut(&Check),
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut report = |name: String, error: f64, tolerance: f64, note: &str| {
        let c = Check {
            name,
            error,
            tolerance,
            note: note.to_string(),
        };
        on_check(&c);
        checks.push(c);
    };
    let bench = |quick: bool, draw: Draw, sub: &str| Bench {
        device: device.clone(),
        dtype,
        draw,
        opts: Options {
            quick,
            work: opts.work.join(sub),
            ..opts.clone()
        },
        rows: Vec::new(),
        on_row: Box::new(|_: &super::Row| {}),
    };
    let mut same = bench(true, Draw::Seeded, "check-quick");
    same.prepare_models()?;
    same.against_cpu(&mut report)?;
    same.check_fused_ops(!opts.quick, &mut report)?;
    if !opts.quick && !device.is_cpu() {
        let mut full = bench(false, Draw::Fast, "check-full");
        full.prepare_models()?;
        full.rows_alone(&mut report)?;
    }
    Ok(checks)
}

type Report<'r> = dyn FnMut(String, f64, f64, &str) + 'r;

impl Bench<'_> {
    /// dnd's fused ops on the device (our CUDA kernels, unless `DND_GPU_KERNELS=0`) against
    /// candle's plain ops on the CPU in f32, at the shapes SD uses at 512 px when `full`: each
    /// kernel checked on its own, so a failure of a model check above can be traced to one.
    fn check_fused_ops(&self, full: bool, report: &mut Report) -> Result<()> {
        use candle_core::Module;
        if !self.group("ops") {
            return Ok(());
        }
        let (dev, dt) = (&self.device, self.dtype);
        let tol = tolerance(dt);
        let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(dev)?.to_dtype(dt)?) };
        let vars = |pairs: &[(&str, &Tensor)]| -> Result<candle_nn::VarBuilder<'static>> {
            let map = pairs
                .iter()
                .map(|(k, t)| Ok((k.to_string(), on(t)?)))
                .collect::<Result<std::collections::HashMap<_, _>>>()?;
            Ok(candle_nn::VarBuilder::from_tensors(map, dt, dev))
        };
        let note = "dnd's fused op on the device against candle's ops on the CPU in f32";

        // GroupNorm + SiLU as in SD's VAE decoder: 4 planes per group, activations far from 0.
        let (c, side) = if full { (128, 256) } else { (32, 16) };
        let x = ((randn(&[2, c, side, side], 11)? * 3.0)? + 20.0)?;
        let (gamma, beta) = (randn(&[c], 12)?, randn(&[c], 13)?);
        let want = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, 32, 1e-6)?
            .forward(&x)?
            .silu()?;
        let vb = vars(&[("weight", &gamma), ("bias", &beta)])?;
        let norm = crate::nn::GroupNorm::load(&vb, 32, c, 1e-6)?;
        let got = norm.forward(&on(&x)?, true)?;
        report(
            "ops.group_norm_silu".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );
        // The same on a view of channels-last storage, as the VAE's convolutions leave it.
        let nhwc = |t: &Tensor| -> Result<Tensor> {
            Ok(on(t)?
                .permute((0, 2, 3, 1))?
                .contiguous()?
                .permute((0, 3, 1, 2))?)
        };
        let got = norm.forward(&nhwc(&x)?, true)?;
        report(
            "ops.group_norm_silu_channels_last".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );
        // And at the UNet's widths, whose blocks take one row of 320 channels, or 1280 in two
        // slices.
        for (c, side) in [
            (320, if full { 64 } else { 4 }),
            (1280, if full { 16 } else { 2 }),
        ] {
            let x = ((randn(&[2, c, side, side], 34)? * 3.0)? + 20.0)?;
            let (gamma, beta) = (randn(&[c], 35)?, randn(&[c], 36)?);
            let want = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, 32, 1e-5)?
                .forward(&x)?
                .silu()?;
            let vb = vars(&[("weight", &gamma), ("bias", &beta)])?;
            let got = crate::nn::GroupNorm::load(&vb, 32, c, 1e-5)?.forward(&nhwc(&x)?, true)?;
            report(
                format!("ops.group_norm_silu_channels_last_c{c}"),
                rel_err(&got, &want)?,
                tol,
                note,
            );
        }

        // A 3x3 convolution with its epilogue: bias + residual + ReLU, and bias + a time
        // embedding per image, as in SD's resnet blocks.
        let (c, side) = if full { (320, 64) } else { (16, 12) };
        let x = randn(&[2, c, side, side], 14)?;
        let w = (randn(&[c, c, 3, 3], 15)? * (1.0 / (9.0 * c as f64).sqrt()))?;
        let (bias, residual, shift) = (
            randn(&[c], 16)?,
            randn(&[2, c, side, side], 17)?,
            randn(&[2, c], 18)?,
        );
        let conv = x.conv2d(&w, 1, 1, 1, 1)?;
        let plus_bias = conv.broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let want = (&plus_bias + &residual)?.relu()?;
        let op = crate::nn::Conv::new(w.clone(), bias.clone(), (1, 1), true, dev, dt)?;
        let got = op.forward_residual(&on(&x)?, &on(&residual)?)?;
        report(
            "ops.conv_residual_relu".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );
        let want = plus_bias.broadcast_add(&shift.reshape((2, c, 1, 1))?)?;
        let op = crate::nn::Conv::new(w, bias, (1, 1), false, dev, dt)?;
        let got = op.forward_shifted(&on(&x)?, &on(&shift)?)?;
        report(
            "ops.conv_time_shift".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );
        // The same channels-last, as the UNet's resnets run with cuDNN: each image's shift
        // over its NHWC rows.
        let got = op
            .channels_last()?
            .forward_shifted(&nhwc(&x)?, &on(&shift)?)?;
        report(
            "ops.conv_time_shift_channels_last".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );

        // ResNet's convolutions channels-last (NHWC through cuDNN where built with it): a 3x3
        // one with residual and ReLU on an NCHW input, then a strided 1x1 one reading the first
        // one's NHWC output in place, as a bottleneck's downsample does.
        let (c, side) = if full { (256, 28) } else { (16, 10) };
        let x = randn(&[2, c, side, side], 25)?;
        let residual = randn(&[2, c, side, side], 26)?;
        let w3 = (randn(&[c, c, 3, 3], 27)? * (1.0 / (9.0 * c as f64).sqrt()))?;
        let w1 = (randn(&[2 * c, c, 1, 1], 28)? * (1.0 / (c as f64).sqrt()))?;
        let (b3, b1) = (randn(&[c], 29)?, randn(&[2 * c], 30)?);
        let h = x
            .conv2d(&w3, 1, 1, 1, 1)?
            .broadcast_add(&b3.reshape((1, c, 1, 1))?)?;
        let h = (h + &residual)?.relu()?;
        let want = h
            .conv2d(&w1, 0, 2, 1, 1)?
            .broadcast_add(&b1.reshape((1, 2 * c, 1, 1))?)?;
        let conv3 = crate::nn::Conv::new(w3, b3, (1, 1), true, dev, dt)?.channels_last()?;
        let conv1 = crate::nn::Conv::new(w1, b1, (2, 0), false, dev, dt)?.channels_last()?;
        let got = conv1.forward(&conv3.forward_residual(&on(&x)?, &on(&residual)?)?)?;
        report(
            "ops.conv_channels_last".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );

        // The VAE's last upsampler channels-last: nearest 2x, then a 3x3 convolution with its
        // bias (on cuDNN computed on the small input, phase by phase).
        let (c, side) = if full { (256, 128) } else { (16, 6) };
        let x = randn(&[2, c, side, side], 37)?;
        let w = (randn(&[c, c, 3, 3], 38)? * (1.0 / (9.0 * c as f64).sqrt()))?;
        let b = randn(&[c], 39)?;
        let want = x
            .upsample_nearest2d(2 * side, 2 * side)?
            .conv2d(&w, 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
        let up = crate::nn::Conv::upsampling(w, b, dev, dt)?.channels_last()?;
        let got = up.forward(&nhwc(&x)?)?;
        report(
            "ops.upsample_conv_channels_last".into(),
            rel_err(&got, &want)?,
            tol,
            note,
        );

        // A batch of resized, cropped 8-bit images as a network's input: normalised on the
        // device (our kernel on CUDA) against the CPU's f32 normalisation, every level.
        let pre = crate::probe::Preprocess::imagenet();
        let n = if full { 64 } else { 2 };
        let pixels: Vec<u8> = (0..n * pre.values_per_image())
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let want = pre.input(&pixels, &Device::Cpu, DType::F32)?;
        let got = pre.input(&pixels, dev, dt)?;
        report(
            "ops.normalise_pixels".into(),
            rel_err(&got, &want)?,
            tol,
            "8-bit pixels normalised on the device against the CPU's f32",
        );

        // LayerNorm over the UNet's tokens at 64x64 latents, activations far from 0.
        let (tokens, dim) = if full { (4096, 320) } else { (64, 40) };
        let x = ((randn(&[2, tokens, dim], 31)? * 3.0)? + 20.0)?;
        let (gamma, beta) = (randn(&[dim], 32)?, randn(&[dim], 33)?);
        let want = candle_nn::LayerNorm::new(gamma.clone(), beta.clone(), 1e-5).forward(&x)?;
        let got = crate::nn::LayerNorm::new(on(&gamma)?, on(&beta)?, 1e-5).forward(&on(&x)?)?;
        report("ops.layer_norm".into(), rel_err(&got, &want)?, tol, note);

        // The UNet's feed-forward at 64x64 latents: a biased linear layer, then GEGLU.
        let (tokens, dim) = if full { (4096, 320) } else { (64, 32) };
        let x = randn(&[2, tokens, dim], 19)?;
        let w = (randn(&[8 * dim, dim], 20)? * (1.0 / (dim as f64).sqrt()))?;
        let b = randn(&[8 * dim], 21)?;
        // A plain 2-D product (candle's CPU matmul mishandles batched transposed operands).
        let h = x
            .reshape((2 * tokens, dim))?
            .matmul(&w.t()?.contiguous()?)?
            .broadcast_add(&b)?
            .reshape((2, tokens, 8 * dim))?;
        let got = crate::nn::Linear::new(on(&w)?, Some(on(&b)?)).forward(&on(&x)?)?;
        report("ops.linear_bias".into(), rel_err(&got, &h)?, tol, note);
        let inner = 4 * dim;
        let want = (h.narrow(2, 0, inner)? * h.narrow(2, inner, inner)?.gelu_erf()?)?;
        let got = crate::nn::geglu(&on(&h)?)?;
        report("ops.geglu".into(), rel_err(&got, &want)?, tol, note);

        // Attention as SD 1.x's UNet has it at 64x64 latents (8 heads of 40 over 4096 tokens)
        // and at its deepest level (8 heads of 160 over 64), and as CLIP ViT-B/16 (12 heads of
        // 64 over 197): on CUDA in f16/bf16 the flash attention kernels with two row tiles a
        // warp and with one, whole key tiles and a last partial one; pieces elsewhere.
        let shapes: [(&str, [usize; 3]); 3] = if full {
            [
                ("ops.attention", [8, 4096, 40]),
                ("ops.attention_d160", [8, 64, 160]),
                ("ops.attention_d64", [12, 197, 64]),
            ]
        } else {
            [
                ("ops.attention", [2, 70, 40]),
                ("ops.attention_d160", [2, 30, 160]),
                ("ops.attention_d64", [2, 130, 64]),
            ]
        };
        for (seed, (name, [heads, tokens, d])) in (22..).step_by(3).zip(shapes) {
            let qkv: Vec<Tensor> = (seed..seed + 3)
                .map(|seed| randn(&[2, heads, tokens, d], seed))
                .collect::<candle_core::Result<_>>()?;
            let scale = 1.0 / (d as f64).sqrt();
            let want = crate::nn::attention(&qkv[0], &qkv[1], &qkv[2], scale, None)?;
            let (q, k, v) = (on(&qkv[0])?, on(&qkv[1])?, on(&qkv[2])?);
            let got = crate::nn::attention(&q, &k, &v, scale, None)?;
            let fused = if crate::nn::attention_is_fused(&q, &k, &v) {
                "flash attention kernel"
            } else {
                "attention in pieces"
            };
            report(
                name.into(),
                rel_err(&got, &want)?,
                tol,
                &format!("{fused} on the device against attention on the CPU in f32"),
            );
        }
        Ok(())
    }

    /// The quick models on the CPU in f32 and on the device, same weights, same inputs.
    fn against_cpu(&mut self, report: &mut Report) -> Result<()> {
        let cpu = Device::Cpu;
        let (dev, dt) = (self.device.clone(), self.dtype);
        let tol = tolerance(dt);
        let note = "device against the CPU in f32, same weights and inputs";
        if self.group("resnet50") {
            let weights = Weights::from_tensors(
                "resnet50 (random)",
                "memory",
                random_resnet_weights(50, 1000)?,
            )?;
            let (a, b) = (
                self.target_on(&weights, &cpu, DType::F32)?,
                self.target_on(&weights, &dev, dt)?,
            );
            let last = a.layers().len() - 1;
            let layer4 = a.layer_index("layer4")?;
            let x = randn(&[3, 3, 224, 224], 1)?;
            let want = a.net.forward(&x, &[layer4, last])?;
            let got = b
                .net
                .forward(&x.to_device(&dev)?.to_dtype(dt)?, &[layer4, last])?;
            for ((w, g), tap) in want.iter().zip(&got).zip(["layer4", "fc"]) {
                report(format!("resnet50.{tap}.b3"), rel_err(g, w)?, tol, note);
            }
        }
        if self.group("clip") {
            let m = self.model(Role::Clip, "clip-vit-b16")?;
            let (a, b) = (
                ClipVision::load(&m, &cpu, DType::F32)?,
                ClipVision::load(&m, &dev, dt)?,
            );
            let side = a.preprocess().crop as usize;
            let x = randn(&[3, 3, side, side], 2)?;
            let e = rel_err(&b.embed(&x)?, &a.embed(&x)?)?;
            report("clip-vit-b16.embed.b3".into(), e, tol, note);
        }
        for name in ["blip-large", "blip-base"] {
            if !self.group(name) {
                continue;
            }
            let m = self.model(Role::Captioner, name)?;
            let (a, b) = (Blip::load(&m, &cpu, DType::F32)?, Blip::load(&m, &dev, dt)?);
            let side = a.preprocess().crop as usize;
            let x = randn(&[3, 3, side, side], 3)?;
            // Both fed the CPU's greedy tokens: near-ties may pick other words on another
            // device, the logits they pick from must agree.
            // The end token banned throughout: every row has all its steps.
            let gen = Generation {
                max_new_tokens: 8,
                min_length: 10,
            };
            let ids = a.generate(&x, &gen)?;
            let e = rel_err(&b.logits(&x, &ids)?, &a.logits(&x, &ids)?)?;
            report(format!("{name}.logits.b3"), e, tol, note);
        }
        for name in ["sd-turbo", "sd-v1-4"] {
            if !self.group(name) {
                continue;
            }
            let m = self.model(Role::Synthesiser, name)?;
            let (a, b) = (
                StableDiffusion::load(&m, &cpu, DType::F32)?,
                StableDiffusion::load(&m, &dev, dt)?,
            );
            let prompts = ["one realistic image of a dog", "stripes", ""];
            let text = a.encode_prompts(&prompts)?;
            let e = rel_err(&b.encode_prompts(&prompts)?, &text)?;
            report(format!("{name}.text.b3"), e, tol, note);
            let latents = a.noise(5, &sampling_seed(4))?;
            let three = latents.narrow(0, 0, 3)?;
            let e = rel_err(
                &b.predict_noise(&three, 500.0, &text)?,
                &a.predict_noise(&three, 500.0, &text)?,
            )?;
            report(format!("{name}.unet.b3"), e, tol, note);
            // Five latents: more than one chunk of the device's VAE decode.
            let e = rel_err(&b.decode(&latents)?, &a.decode(&latents)?)?;
            report(format!("{name}.vae.b5"), e, tol, note);
        }
        if self.group("taesd") {
            let m = self.model(Role::TinyVae, "taesd")?;
            let (a, b) = (
                TinyDecoder::load(&m, &cpu, DType::F32)?,
                TinyDecoder::load(&m, &dev, dt)?,
            );
            let z = randn(&[3, 4, 16, 16], 5)?;
            let e = rel_err(&b.decode(&z)?, &a.decode(&z)?)?;
            report("taesd.decode.b3".into(), e, tol, note);
        }
        Ok(())
    }

    /// Full-size models on the device: a batch's first and last rows against the same rows
    /// computed alone.
    fn rows_alone(&mut self, report: &mut Report) -> Result<()> {
        let (dev, dt) = (self.device.clone(), self.dtype);
        let tol = tolerance(dt);
        let mut compare = |name: String,
                           batch: &Tensor,
                           f: &dyn Fn(usize) -> Result<Tensor>,
                           note: &str|
         -> Result<()> {
            let n = batch.dim(0)?;
            let mut worst: f64 = 0.0;
            for i in [0, n - 1] {
                let e = rel_err(&f(i)?, &batch.i(i..i + 1)?)?;
                // A NaN anywhere fails the check.
                worst = if e.is_nan() || worst.is_nan() {
                    f64::NAN
                } else {
                    worst.max(e)
                };
            }
            report(name, worst, tol, note);
            Ok(())
        };
        if self.group("resnet50") {
            let target = self.random_target()?;
            let last = target.layers().len() - 1;
            let x = randn(&[64, 3, 224, 224], 6)?
                .to_device(&dev)?
                .to_dtype(dt)?;
            let all = target.net.forward(&x, &[last])?.remove(0);
            let alone = |i: usize| Ok(target.net.forward(&x.i(i..i + 1)?, &[last])?.remove(0));
            compare("resnet50.rows.b64".into(), &all, &alone, "fc logits")?;
        }
        if self.group("clip") {
            let clip = ClipVision::load(&self.model(Role::Clip, "clip-vit-b16")?, &dev, dt)?;
            let side = clip.preprocess().crop as usize;
            let x = randn(&[64, 3, side, side], 7)?;
            let all = clip.embed(&x)?;
            let alone = |i: usize| clip.embed(&x.i(i..i + 1)?);
            compare("clip-vit-b16.rows.b64".into(), &all, &alone, "embeddings")?;
        }
        if self.group("blip-large") {
            let blip = Blip::load(&self.model(Role::Captioner, "blip-large")?, &dev, dt)?;
            let side = blip.preprocess().crop as usize;
            let x = randn(&[10, 3, side, side], 8)?;
            let gen = Generation {
                max_new_tokens: 32,
                min_length: 34,
            };
            let ids = blip.generate(&x, &gen)?;
            let all = blip.logits(&x, &ids)?;
            let alone = |i: usize| blip.logits(&x.i(i..i + 1)?, &ids[i..i + 1]);
            compare(
                "blip-large.logits.rows.b10".into(),
                &all,
                &alone,
                "32 teacher-forced steps",
            )?;
        }
        if self.group("sd-v1-4") {
            let sd = StableDiffusion::load(&self.model(Role::Synthesiser, "sd-v1-4")?, &dev, dt)?;
            // 20 rows: 20 x 8 heads x 4096^2 scores, past candle's 2^31 softmax limit.
            let z = sd.noise(20, &sampling_seed(9))?;
            let text = randn(&[20, 77, 768], 10)?;
            let all = sd.predict_noise(&z, 500.0, &text)?;
            let alone = |i: usize| sd.predict_noise(&z.i(i..i + 1)?, 500.0, &text.i(i..i + 1)?);
            compare(
                "sd-v1-4.unet.rows.b20".into(),
                &all,
                &alone,
                "512 px; past the 2^31-score softmax limit",
            )?;
        }
        if self.group("sd-turbo") {
            let sd = StableDiffusion::load(&self.model(Role::Synthesiser, "sd-turbo")?, &dev, dt)?;
            let z = sd.noise(8, &sampling_seed(11))?;
            let all = sd.decode(&z)?;
            let alone = |i: usize| sd.decode(&z.i(i..i + 1)?);
            compare("sd-turbo.vae.rows.b8".into(), &all, &alone, "512 px images")?;
        }
        Ok(())
    }
}

/// Sampling settings that only fix the noise seed (the rest is unused by `noise`).
fn sampling_seed(seed: u64) -> crate::synthesise::Sampling {
    crate::synthesise::Sampling {
        steps: 1,
        guidance: 0.0,
        scheduler: None,
        seed,
        size: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_measures_the_difference_and_flags_nan_and_shapes() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let want = t(&[3.0, 4.0]);
        assert_eq!(rel_err(&want, &want).unwrap(), 0.0);
        // ||(0, 0.5)|| / ||(3, 4)|| = 0.1
        let e = rel_err(&t(&[3.0, 4.5]), &want).unwrap();
        assert!((e - 0.1).abs() < 1e-9, "{e}");
        assert!(rel_err(&t(&[3.0, f32::NAN]), &want).unwrap().is_nan());
        assert!(rel_err(&t(&[3.0, 4.0, 0.0]), &want).unwrap().is_nan());
        let nan = Check {
            name: "x".into(),
            error: f64::NAN,
            tolerance: 1.0,
            note: String::new(),
        };
        assert!(!nan.passed());
    }
}
