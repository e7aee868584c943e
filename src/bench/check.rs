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
use crate::gpu_ops::Kernel;
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
    /// The family of dnd's kernels this check isolates (`DND_GPU_KERNELS_OFF` takes the
    /// name); none for the models' checks, which run many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<&'static str>,
    /// ||got - want|| / ||want||; NaN (`null` in JSON) when it could not run.
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

/// Runs every check, reporting each as it is done: each fused op alone first, so that the first
/// failure names the kernel family to blame (`Check::kernel`), then the models. A check that
/// cannot run (an error on the device) is reported failed with its error, and the rest still
/// run.
pub fn run(
    device: &Device,
    dtype: DType,
    opts: &Options,
    on_check: &mut dyn FnMut(&Check),
) -> Result<Vec<Check>> {
    let mut sink = Sink {
        on_check,
        checks: Vec::new(),
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
    same.check_fused_ops(!opts.quick, &mut sink);
    same.against_cpu(&mut sink);
    if !opts.quick && !device.is_cpu() {
        let mut full = bench(false, Draw::Fast, "check-full");
        full.prepare_models()?;
        full.rows_alone(&mut sink);
    }
    Ok(sink.checks)
}

/// Where checks go as they are done.
struct Sink<'r> {
    on_check: &'r mut dyn FnMut(&Check),
    checks: Vec<Check>,
}

impl Sink<'_> {
    /// Check `name`: its relative `error`, or failed with the reason it could not run.
    fn record(
        &mut self,
        name: String,
        kernel: Option<Kernel>,
        tolerance: f64,
        note: &str,
        error: Result<f64>,
    ) {
        let (error, note) = match error {
            Ok(e) => (e, note.to_string()),
            Err(e) => (f64::NAN, format!("could not run: {e}")),
        };
        let c = Check {
            name,
            kernel: kernel.map(Kernel::name),
            error,
            tolerance,
            note,
        };
        (self.on_check)(&c);
        self.checks.push(c);
    }

    /// One fused op of `kernel`'s family against candle's ops on the CPU: `f` returns the
    /// relative error, and may reword `note`.
    fn op(
        &mut self,
        name: &str,
        kernel: Kernel,
        tolerance: f64,
        note: &str,
        f: impl FnOnce(&mut String) -> Result<f64>,
    ) {
        let mut note = note.to_string();
        let error = f(&mut note);
        self.record(name.into(), Some(kernel), tolerance, &note, error);
    }

    /// A group of model checks; an error ends the group, reported as a failed check named
    /// after it.
    fn guard(&mut self, name: &str, tolerance: f64, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Err(e) = f(self) {
            self.record(name.into(), None, tolerance, "", Err(e));
        }
    }
}

impl Bench<'_> {
    /// dnd's fused ops on the device (our CUDA kernels, unless turned off) against candle's
    /// plain ops on the CPU in f32, at the shapes SD uses at 512 px when `full`: each kernel
    /// family checked on its own, so a failure of a model check after can be traced to one.
    fn check_fused_ops(&self, full: bool, sink: &mut Sink) {
        use candle_core::Module;
        if !self.group("ops") {
            return;
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
        // `t` on the device as a view of channels-last storage, as cuDNN's convolutions leave it.
        let nhwc = |t: &Tensor| -> Result<Tensor> {
            Ok(on(t)?
                .permute((0, 2, 3, 1))?
                .contiguous()?
                .permute((0, 3, 1, 2))?)
        };
        let note = "dnd's fused op on the device against candle's ops on the CPU in f32";

        // GroupNorm + SiLU as in SD's VAE decoder (4 planes per group), on NCHW storage and on
        // channels-last storage; then at the UNet's widths channels-last, whose blocks take one
        // row of 320 channels, or 1280 in two slices. Activations far from 0.
        let vae = if full { (128, 256) } else { (32, 16) };
        let unet = [
            (320, if full { 64 } else { 4 }),
            (1280, if full { 16 } else { 2 }),
        ];
        let cases = [
            ("ops.group_norm_silu".to_string(), vae, false, 1e-6, 11),
            (
                "ops.group_norm_silu_channels_last".into(),
                vae,
                true,
                1e-6,
                11,
            ),
        ]
        .into_iter()
        .chain(unet.map(|(c, side)| {
            (
                format!("ops.group_norm_silu_channels_last_c{c}"),
                (c, side),
                true,
                1e-5,
                34,
            )
        }));
        for (name, (c, side), channels_last, eps, seed) in cases {
            sink.op(&name, Kernel::GroupNorm, tol, note, |_| {
                let x = ((randn(&[2, c, side, side], seed)? * 3.0)? + 20.0)?;
                let (gamma, beta) = (randn(&[c], seed + 1)?, randn(&[c], seed + 2)?);
                let want = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, 32, eps)?
                    .forward(&x)?
                    .silu()?;
                let vb = vars(&[("weight", &gamma), ("bias", &beta)])?;
                let norm = crate::nn::GroupNorm::load(&vb, 32, c, eps)?;
                let x = if channels_last { nhwc(&x)? } else { on(&x)? };
                rel_err(&norm.forward(&x, true)?, &want)
            });
        }

        // A 3x3 convolution with its epilogue: bias + residual + ReLU, and bias + a time
        // embedding per image, as in SD's resnet blocks; the latter channels-last too, as the
        // UNet's resnets run with cuDNN (each image's shift over its NHWC rows).
        let (c, side) = if full { (320, 64) } else { (16, 12) };
        let conv_case = || -> Result<[Tensor; 5]> {
            Ok([
                randn(&[2, c, side, side], 14)?,
                (randn(&[c, c, 3, 3], 15)? * (1.0 / (9.0 * c as f64).sqrt()))?,
                randn(&[c], 16)?,
                randn(&[2, c, side, side], 17)?,
                randn(&[2, c], 18)?,
            ])
        };
        sink.op(
            "ops.conv_residual_relu",
            Kernel::Epilogue,
            tol,
            note,
            |_| {
                let [x, w, bias, residual, _] = conv_case()?;
                let conv = x.conv2d(&w, 1, 1, 1, 1)?;
                let want =
                    (conv.broadcast_add(&bias.reshape((1, c, 1, 1))?)? + &residual)?.relu()?;
                let op = crate::nn::Conv::new(w, bias, (1, 1), true, dev, dt)?;
                rel_err(&op.forward_residual(&on(&x)?, &on(&residual)?)?, &want)
            },
        );
        for (name, channels_last) in [
            ("ops.conv_time_shift", false),
            ("ops.conv_time_shift_channels_last", true),
        ] {
            sink.op(name, Kernel::Epilogue, tol, note, |_| {
                let [x, w, bias, _, shift] = conv_case()?;
                let want = x
                    .conv2d(&w, 1, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
                    .broadcast_add(&shift.reshape((2, c, 1, 1))?)?;
                let op = crate::nn::Conv::new(w, bias, (1, 1), false, dev, dt)?;
                let got = if channels_last {
                    op.channels_last()?
                        .forward_shifted(&nhwc(&x)?, &on(&shift)?)?
                } else {
                    op.forward_shifted(&on(&x)?, &on(&shift)?)?
                };
                rel_err(&got, &want)
            });
        }

        // ResNet's convolutions channels-last (NHWC through cuDNN where built with it): a 3x3
        // one with residual and ReLU on an NCHW input, then a strided 1x1 one reading the first
        // one's NHWC output in place, as a bottleneck's downsample does.
        sink.op(
            "ops.conv_channels_last",
            Kernel::Epilogue,
            tol,
            note,
            |_| {
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
                let want =
                    h.conv2d(&w1, 0, 2, 1, 1)?
                        .broadcast_add(&b1.reshape((1, 2 * c, 1, 1))?)?;
                let conv3 = crate::nn::Conv::new(w3, b3, (1, 1), true, dev, dt)?.channels_last()?;
                let conv1 =
                    crate::nn::Conv::new(w1, b1, (2, 0), false, dev, dt)?.channels_last()?;
                let got = conv1.forward(&conv3.forward_residual(&on(&x)?, &on(&residual)?)?)?;
                rel_err(&got, &want)
            },
        );

        // Grouped convolutions (through cuDNN's group count where built with it): ResNeXt's
        // strided 3x3 in 4 groups (32 at full size) and ConvNeXt's depthwise 7x7, NCHW and
        // channels-last, each reading channels-last storage.
        for (name, groups, k, stride, channels_last) in [
            ("ops.conv_grouped", 4, 3, 2, false),
            ("ops.conv_grouped_channels_last", 4, 3, 2, true),
            ("ops.conv_depthwise_channels_last", 0, 7, 1, true),
        ] {
            sink.op(name, Kernel::GroupedConv, tol, note, |_| {
                let (c, side) = if full { (256, 28) } else { (16, 10) };
                let groups = match (groups, full) {
                    (0, _) => c,
                    (_, true) => 32,
                    (g, false) => g,
                };
                let fan_in = (k * k * c / groups) as f64;
                let w = (randn(&[c, c / groups, k, k], 41)? * fan_in.sqrt().recip())?;
                let (x, b) = (randn(&[2, c, side, side], 42)?, randn(&[c], 43)?);
                let want = x
                    .conv2d(&w, k / 2, stride, 1, groups)?
                    .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
                let op =
                    crate::nn::Conv::new(w, b, (stride, k / 2), false, dev, dt)?.grouped(groups);
                let op = if channels_last {
                    op.channels_last()?
                } else {
                    op
                };
                rel_err(&op.forward(&nhwc(&x)?)?, &want)
            });
        }

        // ResNet's stem pool (3x3, stride 2, padding 1) on the stem's channels-last output
        // after its ReLU, at ResNet-50's 112 x 112 x 64.
        sink.op(
            "ops.max_pool_channels_last",
            Kernel::MaxPool,
            tol,
            note,
            |_| {
                let (c, side) = if full { (64, 112) } else { (16, 9) };
                let x = randn(&[2, c, side, side], 40)?.relu()?;
                let want = x
                    .pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .max_pool2d_with_stride(3, 2)?;
                rel_err(&crate::target::stem_pool(&nhwc(&x)?)?, &want)
            },
        );

        // Nearest 2x upsampling as the UNet's upsamplers take it, NCHW and channels-last.
        for (name, channels_last) in [
            ("ops.upsample_nearest2x", false),
            ("ops.upsample_nearest2x_channels_last", true),
        ] {
            sink.op(name, Kernel::Upsample, tol, note, |_| {
                let (c, side) = if full { (1280, 16) } else { (16, 5) };
                let x = randn(&[2, c, side, side], 41)?;
                let want = x.upsample_nearest2d(2 * side, 2 * side)?;
                let x = if channels_last { nhwc(&x)? } else { on(&x)? };
                rel_err(&crate::nn::upsample_nearest(&x, 2)?, &want)
            });
        }

        // The VAE's last upsampler channels-last: nearest 2x, then a 3x3 convolution with its
        // bias (on cuDNN computed on the small input, phase by phase).
        sink.op(
            "ops.upsample_conv_channels_last",
            Kernel::UpsampleConv,
            tol,
            note,
            |_| {
                let (c, side) = if full { (256, 128) } else { (16, 6) };
                let x = randn(&[2, c, side, side], 37)?;
                let w = (randn(&[c, c, 3, 3], 38)? * (1.0 / (9.0 * c as f64).sqrt()))?;
                let b = randn(&[c], 39)?;
                let want = x
                    .upsample_nearest2d(2 * side, 2 * side)?
                    .conv2d(&w, 1, 1, 1, 1)?
                    .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
                let up = crate::nn::Conv::upsampling(w, b, dev, dt)?.channels_last()?;
                rel_err(&up.forward(&nhwc(&x)?)?, &want)
            },
        );

        // A batch of resized, cropped 8-bit images as a network's input: normalised on the
        // device (our kernel on CUDA) against the CPU's f32 normalisation, every level.
        sink.op(
            "ops.normalise_pixels",
            Kernel::Pixels,
            tol,
            "8-bit pixels normalised on the device against the CPU's f32",
            |_| {
                let pre = crate::probe::Preprocess::imagenet();
                let n = if full { 64 } else { 2 };
                let pixels: Vec<u8> = (0..n * pre.values_per_image())
                    .map(|i| (i * 7 % 251) as u8)
                    .collect();
                let want = pre.input(&pixels, &Device::Cpu, DType::F32)?;
                rel_err(&pre.input(&pixels, dev, dt)?, &want)
            },
        );

        // LayerNorm over the UNet's tokens at 64x64 latents, activations far from 0.
        sink.op("ops.layer_norm", Kernel::LayerNorm, tol, note, |_| {
            let (tokens, dim) = if full { (4096, 320) } else { (64, 40) };
            let x = ((randn(&[2, tokens, dim], 31)? * 3.0)? + 20.0)?;
            let (gamma, beta) = (randn(&[dim], 32)?, randn(&[dim], 33)?);
            let want = candle_nn::LayerNorm::new(gamma.clone(), beta.clone(), 1e-5).forward(&x)?;
            let norm = crate::nn::LayerNorm::new(on(&gamma)?, on(&beta)?, 1e-5);
            rel_err(&norm.forward(&on(&x)?)?, &want)
        });

        // The UNet's feed-forward at 64x64 latents: a biased linear layer, then GEGLU.
        let (tokens, dim) = if full { (4096, 320) } else { (64, 32) };
        // A plain 2-D product (candle's CPU matmul mishandles batched transposed operands).
        let linear = || -> Result<[Tensor; 4]> {
            let x = randn(&[2, tokens, dim], 19)?;
            let w = (randn(&[8 * dim, dim], 20)? * (1.0 / (dim as f64).sqrt()))?;
            let b = randn(&[8 * dim], 21)?;
            let h = x
                .reshape((2 * tokens, dim))?
                .matmul(&w.t()?.contiguous()?)?
                .broadcast_add(&b)?
                .reshape((2, tokens, 8 * dim))?;
            Ok([x, w, b, h])
        };
        sink.op("ops.linear_bias", Kernel::Epilogue, tol, note, |_| {
            let [x, w, b, h] = linear()?;
            let got = crate::nn::Linear::new(on(&w)?, Some(on(&b)?)).forward(&on(&x)?)?;
            rel_err(&got, &h)
        });
        // GEGLU of the same layer's output, its bias added by the GEGLU kernel on CUDA.
        sink.op("ops.geglu", Kernel::Geglu, tol, note, |_| {
            let [x, w, b, h] = linear()?;
            let inner = 4 * dim;
            let want = (h.narrow(2, 0, inner)? * h.narrow(2, inner, inner)?.gelu_erf()?)?;
            let layer = crate::nn::Linear::new(on(&w)?, Some(on(&b)?));
            rel_err(&layer.forward_geglu(&on(&x)?)?, &want)
        });

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
            sink.op(name, Kernel::FlashAttention, tol, note, |note| {
                let qkv: Vec<Tensor> = (seed..seed + 3)
                    .map(|seed| randn(&[2, heads, tokens, d], seed))
                    .collect::<candle_core::Result<_>>()?;
                let scale = 1.0 / (d as f64).sqrt();
                let want = crate::nn::attention(&qkv[0], &qkv[1], &qkv[2], scale, None)?;
                let (q, k, v) = (on(&qkv[0])?, on(&qkv[1])?, on(&qkv[2])?);
                let fused = if crate::nn::attention_is_fused(&q, &k, &v) {
                    "flash attention kernel"
                } else {
                    "attention in pieces"
                };
                *note = format!("{fused} on the device against attention on the CPU in f32");
                rel_err(&crate::nn::attention(&q, &k, &v, scale, None)?, &want)
            });
        }
    }

    /// The quick models on the CPU in f32 and on the device, same weights, same inputs.
    fn against_cpu(&self, sink: &mut Sink) {
        let cpu = Device::Cpu;
        let (dev, dt) = (self.device.clone(), self.dtype);
        let tol = tolerance(dt);
        let note = "device against the CPU in f32, same weights and inputs";
        if self.group("resnet50") {
            sink.guard("resnet50", tol, |sink| {
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
                    let name = format!("resnet50.{tap}.b3");
                    sink.record(name, None, tol, note, rel_err(g, w));
                }
                Ok(())
            });
        }
        if self.group("clip") {
            sink.guard("clip-vit-b16", tol, |sink| {
                let m = self.model(Role::Clip, "clip-vit-b16")?;
                let (a, b) = (
                    ClipVision::load(&m, &cpu, DType::F32)?,
                    ClipVision::load(&m, &dev, dt)?,
                );
                let side = a.preprocess().crop as usize;
                let x = randn(&[3, 3, side, side], 2)?;
                let e = rel_err(&b.embed(&x)?, &a.embed(&x)?);
                sink.record("clip-vit-b16.embed.b3".into(), None, tol, note, e);
                Ok(())
            });
        }
        for name in ["blip-large", "blip-base"] {
            if !self.group(name) {
                continue;
            }
            sink.guard(name, tol, |sink| {
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
                let e = rel_err(&b.logits(&x, &ids)?, &a.logits(&x, &ids)?);
                sink.record(format!("{name}.logits.b3"), None, tol, note, e);
                Ok(())
            });
        }
        for name in ["sd-turbo", "sd-v1-4"] {
            if !self.group(name) {
                continue;
            }
            sink.guard(name, tol, |sink| {
                let m = self.model(Role::Synthesiser, name)?;
                let (a, b) = (
                    StableDiffusion::load(&m, &cpu, DType::F32)?,
                    StableDiffusion::load(&m, &dev, dt)?,
                );
                let prompts = ["one realistic image of a dog", "stripes", ""];
                let text = a.encode_prompts(&prompts)?;
                let e = rel_err(&b.encode_prompts(&prompts)?, &text);
                sink.record(format!("{name}.text.b3"), None, tol, note, e);
                let latents = a.noise(5, &sampling_seed(4))?;
                let three = latents.narrow(0, 0, 3)?;
                let e = rel_err(
                    &b.predict_noise(&three, 500.0, &text)?,
                    &a.predict_noise(&three, 500.0, &text)?,
                );
                sink.record(format!("{name}.unet.b3"), None, tol, note, e);
                // Five latents: more than one chunk of the device's VAE decode.
                let e = rel_err(&b.decode(&latents)?, &a.decode(&latents)?);
                sink.record(format!("{name}.vae.b5"), None, tol, note, e);
                Ok(())
            });
        }
        if self.group("taesd") {
            sink.guard("taesd", tol, |sink| {
                let m = self.model(Role::TinyVae, "taesd")?;
                let (a, b) = (
                    TinyDecoder::load(&m, &cpu, DType::F32)?,
                    TinyDecoder::load(&m, &dev, dt)?,
                );
                let z = randn(&[3, 4, 16, 16], 5)?;
                let e = rel_err(&b.decode(&z)?, &a.decode(&z)?);
                sink.record("taesd.decode.b3".into(), None, tol, note, e);
                Ok(())
            });
        }
    }

    /// Full-size models on the device: a batch's first and last rows against the same rows
    /// computed alone.
    fn rows_alone(&self, sink: &mut Sink) {
        let (dev, dt) = (self.device.clone(), self.dtype);
        let tol = tolerance(dt);
        if self.group("resnet50") {
            sink.guard("resnet50.rows", tol, |sink| {
                let target = self.random_target()?;
                let last = target.layers().len() - 1;
                let x = randn(&[64, 3, 224, 224], 6)?
                    .to_device(&dev)?
                    .to_dtype(dt)?;
                let all = target.net.forward(&x, &[last])?.remove(0);
                let alone = |i: usize| Ok(target.net.forward(&x.i(i..i + 1)?, &[last])?.remove(0));
                let e = worst_row(&all, &alone);
                sink.record("resnet50.rows.b64".into(), None, tol, "fc logits", e);
                Ok(())
            });
        }
        if self.group("clip") {
            sink.guard("clip-vit-b16.rows", tol, |sink| {
                let clip = ClipVision::load(&self.model(Role::Clip, "clip-vit-b16")?, &dev, dt)?;
                let side = clip.preprocess().crop as usize;
                let x = randn(&[64, 3, side, side], 7)?;
                let all = clip.embed(&x)?;
                let e = worst_row(&all, &|i| clip.embed(&x.i(i..i + 1)?));
                sink.record("clip-vit-b16.rows.b64".into(), None, tol, "embeddings", e);
                Ok(())
            });
        }
        if self.group("blip-large") {
            sink.guard("blip-large.rows", tol, |sink| {
                let blip = Blip::load(&self.model(Role::Captioner, "blip-large")?, &dev, dt)?;
                let side = blip.preprocess().crop as usize;
                let x = randn(&[10, 3, side, side], 8)?;
                let gen = Generation {
                    max_new_tokens: 32,
                    min_length: 34,
                };
                let ids = blip.generate(&x, &gen)?;
                let all = blip.logits(&x, &ids)?;
                let e = worst_row(&all, &|i| blip.logits(&x.i(i..i + 1)?, &ids[i..i + 1]));
                let name = "blip-large.logits.rows.b10".into();
                sink.record(name, None, tol, "32 teacher-forced steps", e);
                Ok(())
            });
        }
        if self.group("sd-v1-4") {
            sink.guard("sd-v1-4.rows", tol, |sink| {
                let m = self.model(Role::Synthesiser, "sd-v1-4")?;
                let sd = StableDiffusion::load(&m, &dev, dt)?;
                // 20 rows: 20 x 8 heads x 4096^2 scores, past candle's 2^31 softmax limit.
                let z = sd.noise(20, &sampling_seed(9))?;
                let text = randn(&[20, 77, 768], 10)?;
                let all = sd.predict_noise(&z, 500.0, &text)?;
                let e = worst_row(&all, &|i| {
                    sd.predict_noise(&z.i(i..i + 1)?, 500.0, &text.i(i..i + 1)?)
                });
                let note = "512 px; past the 2^31-score softmax limit";
                sink.record("sd-v1-4.unet.rows.b20".into(), None, tol, note, e);
                // Guidance's pairs: 2 latents for 4 text rows, shared up to the first
                // cross-attention, against the 4 rows in full.
                let (z, text) = (z.narrow(0, 0, 2)?, text.narrow(0, 0, 4)?);
                let shared = sd.predict_noise(&z, 500.0, &text)?;
                let full = sd.predict_noise(&Tensor::cat(&[&z, &z], 0)?, 500.0, &text)?;
                let note = "2 latents for 4 text rows against every row in full";
                let e = rel_err(&shared, &full);
                sink.record("sd-v1-4.unet.shared.b4".into(), None, tol, note, e);
                Ok(())
            });
        }
        if self.group("sd-turbo") {
            sink.guard("sd-turbo.rows", tol, |sink| {
                let m = self.model(Role::Synthesiser, "sd-turbo")?;
                let sd = StableDiffusion::load(&m, &dev, dt)?;
                let z = sd.noise(8, &sampling_seed(11))?;
                let all = sd.decode(&z)?;
                let e = worst_row(&all, &|i| sd.decode(&z.i(i..i + 1)?));
                sink.record("sd-turbo.vae.rows.b8".into(), None, tol, "512 px images", e);
                Ok(())
            });
        }
    }
}

/// The larger relative error of `batch`'s first and last rows against `alone(i)`, row `i`
/// computed alone (NaN if either has one).
fn worst_row(batch: &Tensor, alone: &dyn Fn(usize) -> Result<Tensor>) -> Result<f64> {
    let n = batch.dim(0)?;
    let mut worst: f64 = 0.0;
    for i in [0, n - 1] {
        let e = rel_err(&alone(i)?, &batch.i(i..i + 1)?)?;
        worst = if e.is_nan() || worst.is_nan() {
            f64::NAN
        } else {
            worst.max(e)
        };
    }
    Ok(worst)
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
            kernel: None,
            error: f64::NAN,
            tolerance: 1.0,
            note: String::new(),
        };
        assert!(!nan.passed());
    }
}
