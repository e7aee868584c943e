//! `dnd bench`: every default architecture at its published size with random weights on the
//! chosen device, so nothing is downloaded: the target's activation pass (from tensors, and
//! from JPEG files through decoding), BLIP captions, Stable Diffusion (UNet steps, VAE decode,
//! whole generations; the tiny autoencoder's decode), CLIP, and the whole pipeline per neuron with an LLM that answers at
//! once. Each figure is the median of several runs after a warm-up, the device synchronised
//! before the clock is read, with the peak memory seen while it ran. `--quick` runs the same
//! code on reduced configs of the same families (assets/bench/quick), for CI on a CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::activations::{extract, ActivationCache, ExtractOptions, Pool};
use crate::caption::{Blip, Generation};
use crate::clip::ClipVision;
use crate::config::{self, Decoder, Preset, Settings, SettingsArgs};
use crate::error::{Error, Result};
use crate::hub::{Draw, ResolvedModel, Role};
use crate::pipeline::{self, Decoding, Job, ModelId, ModelIds, Models, Params};
use crate::probe::ProbeSet;
use crate::store::Store;
use crate::summarise::window::Window;
use crate::summarise::{BoxFuture, Llm, LlmError, Message};
use crate::synthesise::{Sampling, StableDiffusion, TinyDecoder};
use crate::target::{random_resnet_weights, ResNet, Target, Weights};

pub mod check;
mod ops;

/// What to measure and how hard.
#[derive(Clone, Debug)]
pub struct Options {
    /// Reduced configs and batches (CI on a CPU).
    pub quick: bool,
    /// Timed runs after the warm-up, at most.
    pub runs: usize,
    /// A measurement stops repeating once its runs took this long (at least one run).
    pub budget: Duration,
    /// Only measurements whose name starts with one of these (all when empty).
    pub only: Vec<String>,
    /// Neurons of the amortised end-to-end runs.
    pub neurons: usize,
    /// How long each answer of the end-to-end runs' mock LLM takes.
    pub llm_latency: Duration,
    /// Distinct concepts the end-to-end runs' mock LLM answers with, in turn (0: a new one at
    /// every call).
    pub llm_concepts: usize,
    /// Scratch folder: configs, tokenizers, JPEGs, store, caches.
    pub work: PathBuf,
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Stable key, e.g. `sd-turbo.generate.steps4.b10`.
    pub name: String,
    /// Items per second (images, captions), or seconds per neuron for `e2e.*`.
    pub value: f64,
    pub unit: &'static str,
    /// Median seconds of one run.
    pub seconds: f64,
    pub runs: usize,
    /// Peak memory seen during the runs: device memory in use on CUDA, the process's peak
    /// resident set on the CPU; `None` where it cannot be read.
    pub peak_memory_bytes: Option<u64>,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub dnd_version: &'static str,
    pub device: String,
    pub dtype: String,
    /// Which kernels ran (`device::kernels`).
    pub kernels: String,
    /// Threads decoding and preprocessing on the CPU (rayon's pool: the cores this process
    /// may use, cgroup quotas included), which bound the `resnet50.jpeg` row.
    pub cpu_threads: usize,
    /// Whether JPEG decoding runs libjpeg-turbo's SIMD code ([`crate::probe::jpeg_simd`]),
    /// which halves the `resnet50.jpeg` row when missing.
    pub jpeg_simd: bool,
    pub quick: bool,
    pub rows: Vec<Row>,
}

impl Report {
    /// A report with no rows yet.
    pub fn new(device: &Device, dtype: DType, quick: bool) -> Self {
        Self {
            dnd_version: env!("CARGO_PKG_VERSION"),
            device: crate::device::describe(device),
            dtype: format!("{dtype:?}").to_lowercase(),
            kernels: crate::device::kernels(device, dtype),
            cpu_threads: rayon::current_num_threads(),
            jpeg_simd: crate::probe::jpeg_simd(),
            quick,
            rows: Vec::new(),
        }
    }
}

/// Runs every selected measurement on `device`, reporting each row as it is done.
pub fn run(
    device: &Device,
    dtype: DType,
    opts: &Options,
    on_row: &mut dyn FnMut(&Row),
) -> Result<Report> {
    let mut b = Bench {
        device: device.clone(),
        dtype,
        draw: Draw::Fast,
        opts: opts.clone(),
        rows: Vec::new(),
        on_row: Box::new(|r: &Row| on_row(r)),
    };
    b.prepare()?;
    b.target()?;
    b.captioner()?;
    b.synthesiser("sd-turbo")?;
    b.synthesiser("sd-v1-4")?;
    b.clip()?;
    b.time_fused_ops()?;
    b.end_to_end(Preset::Fast, Decoder::Vae)?;
    b.end_to_end(Preset::Fast, Decoder::Tiny)?;
    b.end_to_end(Preset::Fast, Decoder::Hybrid)?;
    b.end_to_end(Preset::Paper, Decoder::Vae)?;
    Ok(Report {
        rows: b.rows,
        ..Report::new(device, dtype, opts.quick)
    })
}

struct Bench<'a> {
    device: Device,
    dtype: DType,
    draw: Draw,
    opts: Options,
    rows: Vec<Row>,
    on_row: Box<dyn FnMut(&Row) + 'a>,
}

/// Sizes of one mode.
struct Sizes {
    target_batch: usize,
    images: usize,
    caption_batches: [usize; 2],
    caption_tokens: usize,
    sd_batches: [usize; 2],
    clip_batch: usize,
}

const FULL: Sizes = Sizes {
    target_batch: 256,
    images: 2048,
    caption_batches: [10, 50],
    caption_tokens: 32,
    sd_batches: [10, 50],
    clip_batch: 64,
};
const QUICK: Sizes = Sizes {
    target_batch: 8,
    images: 24,
    caption_batches: [2, 4],
    caption_tokens: 8,
    sd_batches: [2, 4],
    clip_batch: 4,
};

macro_rules! assets {
    ($($mode:literal / $path:literal),* $(,)?) => {
        &[$(($mode, $path, include_str!(concat!("../../assets/bench/", $mode, "/", $path)))),*]
    };
}

/// The configs of assets/bench (written by tools/gen_bench_configs.py): (mode, path, text).
const CONFIGS: &[(&str, &str, &str)] = assets![
    "full" / "resnet50/config.json",
    "full" / "blip-large/config.json",
    "full" / "blip-large/preprocessor_config.json",
    "full" / "blip-base/config.json",
    "full" / "blip-base/preprocessor_config.json",
    "full" / "clip-vit-b16/config.json",
    "full" / "clip-vit-b16/preprocessor_config.json",
    "full" / "sd-turbo/model_index.json",
    "full" / "sd-turbo/scheduler/scheduler_config.json",
    "full" / "sd-turbo/text_encoder/config.json",
    "full" / "sd-turbo/unet/config.json",
    "full" / "sd-turbo/vae/config.json",
    "full" / "sd-v1-4/model_index.json",
    "full" / "sd-v1-4/scheduler/scheduler_config.json",
    "full" / "sd-v1-4/text_encoder/config.json",
    "full" / "sd-v1-4/unet/config.json",
    "full" / "sd-v1-4/vae/config.json",
    "full" / "taesd/config.json",
    "quick" / "resnet50/config.json",
    "quick" / "blip-large/config.json",
    "quick" / "blip-large/preprocessor_config.json",
    "quick" / "blip-base/config.json",
    "quick" / "blip-base/preprocessor_config.json",
    "quick" / "clip-vit-b16/config.json",
    "quick" / "clip-vit-b16/preprocessor_config.json",
    "quick" / "sd-turbo/model_index.json",
    "quick" / "sd-turbo/scheduler/scheduler_config.json",
    "quick" / "sd-turbo/text_encoder/config.json",
    "quick" / "sd-turbo/unet/config.json",
    "quick" / "sd-turbo/vae/config.json",
    "quick" / "sd-v1-4/model_index.json",
    "quick" / "sd-v1-4/scheduler/scheduler_config.json",
    "quick" / "sd-v1-4/text_encoder/config.json",
    "quick" / "sd-v1-4/unet/config.json",
    "quick" / "sd-v1-4/vae/config.json",
    "quick" / "taesd/config.json",
];

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl Bench<'_> {
    fn sizes(&self) -> &'static Sizes {
        if self.opts.quick {
            &QUICK
        } else {
            &FULL
        }
    }

    fn models_dir(&self) -> PathBuf {
        self.opts.work.join("models")
    }

    /// The measurement `name` is asked for.
    fn wanted(&self, name: &str) -> bool {
        self.opts.only.is_empty() || self.opts.only.iter().any(|o| name.starts_with(o.as_str()))
    }

    /// Some measurement of the group `name` (models loaded together) is asked for.
    fn group(&self, name: &str) -> bool {
        self.wanted(name) || self.opts.only.iter().any(|o| o.starts_with(name))
    }

    /// Writes the configs, synthetic tokenizers of the real vocabulary sizes (the weights are
    /// random, so the words are too), and a folder of JPEG probing images.
    fn prepare(&mut self) -> Result<()> {
        self.prepare_models()?;
        probe_images(&self.opts.work.join("probe"), self.sizes().images)
    }

    /// The configs and tokenizers alone.
    fn prepare_models(&mut self) -> Result<()> {
        let mode = if self.opts.quick { "quick" } else { "full" };
        let dir = self.models_dir();
        for (m, path, text) in CONFIGS {
            if *m == mode {
                let p = dir.join(path);
                std::fs::create_dir_all(p.parent().expect("a parent")).map_err(io(&p))?;
                std::fs::write(&p, text).map_err(io(&p))?;
            }
        }
        for blip in ["blip-large", "blip-base"] {
            bert_tokenizer(&dir.join(blip).join("tokenizer.json"))?;
        }
        for sd in ["sd-turbo", "sd-v1-4"] {
            clip_vocab(&dir.join(sd).join("tokenizer"))?;
        }
        Ok(())
    }

    fn model(&self, role: Role, name: &str) -> Result<ResolvedModel> {
        ResolvedModel::random(role, &self.models_dir().join(name), self.draw)
    }

    fn random_target(&self) -> Result<Target> {
        let weights = Weights::from_tensors(
            "resnet50 (random)",
            "memory",
            random_resnet_weights(50, 1000)?,
        )?;
        self.target_on(&weights, &self.device, self.dtype)
    }

    /// ResNet-50 with `weights`, preprocessing from the bench config.
    fn target_on(&self, weights: &Weights, device: &Device, dtype: DType) -> Result<Target> {
        let dir = self.models_dir().join("resnet50");
        let config: serde_json::Value = crate::nn::read_json("resnet50", &dir.join("config.json"))?;
        let preprocess = crate::probe::Preprocess::from_timm_config(&config)
            .expect("the bench config has a pretrained_cfg");
        Ok(Target {
            net: Box::new(ResNet::load(
                weights,
                preprocess.crop as usize,
                device,
                dtype,
            )?),
            preprocess,
            name: "resnet50 (random weights)".into(),
            weights_hash: "random".into(),
        })
    }

    /// Times one call of `f` with no warm-up, for what a first call costs; records the row.
    fn measure_first(
        &mut self,
        name: &str,
        items: f64,
        note: &str,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !self.wanted(name) {
            return Ok(());
        }
        let watch = Peak::start(&self.device);
        self.device.synchronize()?;
        let t = Instant::now();
        f()?;
        self.device.synchronize()?;
        let seconds = t.elapsed().as_secs_f64();
        self.emit(Row {
            name: name.to_string(),
            value: items / seconds,
            unit: "images/s",
            seconds,
            runs: 1,
            peak_memory_bytes: watch.stop(),
            note: note.to_string(),
        });
        Ok(())
    }

    /// Times `f`: one warm-up, then up to `runs` runs within the budget; records the row.
    fn measure(
        &mut self,
        name: &str,
        items: f64,
        unit: &'static str,
        note: &str,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        if !self.wanted(name) {
            return Ok(());
        }
        let watch = Peak::start(&self.device);
        let t = Instant::now();
        f()?;
        self.device.synchronize()?;
        let warm = t.elapsed();
        let mut times = Vec::new();
        let mut note = note.to_string();
        if warm > self.opts.budget && !self.opts.budget.is_zero() {
            // Too slow to repeat within the budget: the warm-up run is the figure (its
            // one-time costs are small next to it).
            times.push(warm.as_secs_f64());
            note.push_str("; one run, the warm-up (over the budget)");
        }
        let repeat = times.is_empty();
        {
            let _profiled = Profiled::start(&self.device);
            let started = Instant::now();
            while repeat
                && (times.is_empty()
                    || (times.len() < self.opts.runs && started.elapsed() < self.opts.budget))
            {
                let t = Instant::now();
                f()?;
                self.device.synchronize()?;
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let seconds = times[times.len() / 2];
        let value = if unit == "s/neuron" {
            seconds / items
        } else {
            items / seconds
        };
        self.emit(Row {
            name: name.to_string(),
            value,
            unit,
            seconds,
            runs: times.len(),
            peak_memory_bytes: watch.stop(),
            note,
        });
        Ok(())
    }

    fn emit(&mut self, row: Row) {
        (self.on_row)(&row);
        self.rows.push(row);
    }

    fn target(&mut self) -> Result<()> {
        if !self.group("resnet50") {
            return Ok(());
        }
        let s = self.sizes();
        let target = self.random_target()?;
        let size = target.preprocess.crop as usize;
        let last = target.layers().len() - 1;
        let forward = |x: &Tensor| -> Result<()> {
            target.net.forward(x, &[last])?;
            Ok(())
        };
        let x = self.pixels(s.target_batch, size)?;
        self.measure(
            &format!("resnet50.forward.b{}", s.target_batch),
            s.target_batch as f64,
            "images/s",
            &format!("{size} px, preprocessed tensors on the device"),
            || forward(&x),
        )?;
        // Batch sizes the process has not run, as the pipeline's batches of crops come (their
        // size changes with every neuron). On cuDNN the first call of a size whose power-of-two
        // family is new measures the algorithms of every convolution; the next size of that
        // family takes them unmeasured. Against that size's steady forward.
        // 48 (3 with --quick): not a power of two, so `fresh + 1` is of its family (33..=64).
        let fresh = (s.target_batch * 3 / 16).max(3);
        for (b, what) in [
            (fresh, "a new power-of-two family"),
            (fresh + 1, "the family just measured"),
        ] {
            let x = self.pixels(b, size)?;
            self.measure_first(
                &format!("resnet50.first_call.b{b}"),
                b as f64,
                &format!("the first forward at batch {b}, a size never run, of {what}"),
                || forward(&x),
            )?;
        }
        let b = fresh + 1;
        let x = self.pixels(b, size)?;
        self.measure(
            &format!("resnet50.forward.b{b}"),
            b as f64,
            "images/s",
            "the steady forward at the second first_call row's size",
            || forward(&x),
        )?;
        if self.group("resnet50.jpeg") {
            let probe = ProbeSet::open(&self.opts.work.join("probe"))?;
            let n = probe.len();
            let layer = target.layer_index("layer4")?;
            let cancel = AtomicBool::new(false);
            self.measure(
                &format!("resnet50.jpeg.b{}", s.target_batch),
                n as f64,
                "images/s",
                &format!("{n} JPEG files: decode, preprocess, forward to layer4, pool"),
                || {
                    let opts = ExtractOptions {
                        pool: Pool::Mean,
                        batch_size: s.target_batch,
                        cache: None,
                    };
                    extract(&target, &probe, &[layer], opts, &mut |_| {}, &cancel)?;
                    Ok(())
                },
            )?;
            // The CPU side alone: whether the row above is bound by decoding (too few cores,
            // a quota, a decoder without SIMD) or by the device.
            let threads = rayon::current_num_threads();
            self.measure(
                &format!("resnet50.jpeg.decode.b{}", s.target_batch),
                n as f64,
                "images/s",
                &format!("the same {n} files decoded, resized and cropped on {threads} threads, nothing else"),
                || {
                    let pre = &target.preprocess;
                    let b = s.target_batch;
                    crate::probe::for_each_batch(&probe.images, pre, b, &cancel, |_| Ok(()))
                },
            )?;
        }
        Ok(())
    }

    /// Preprocessed pixels `(b, 3, side, side)` already on the device in the model's type, as
    /// PyTorch's side of the model rows takes them.
    fn pixels(&self, b: usize, side: usize) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (b, 3, side, side), &self.device)?.to_dtype(self.dtype)?)
    }

    fn captioner(&mut self) -> Result<()> {
        for name in ["blip-large", "blip-base"] {
            if !self.group(name) {
                continue;
            }
            let blip = Blip::load(
                &self.model(Role::Captioner, name)?,
                &self.device,
                self.dtype,
            )?;
            let s = self.sizes();
            let side = blip.preprocess().crop as usize;
            // The end token is banned throughout, so every caption has all its tokens.
            let gen = Generation {
                max_new_tokens: s.caption_tokens,
                min_length: s.caption_tokens + 2,
            };
            let b = s.caption_batches[0];
            let pixels = self.pixels(b, side)?;
            self.measure(
                &format!("{name}.vision.b{b}"),
                b as f64,
                "images/s",
                "the vision tower alone, preprocessed pixels on the device",
                || {
                    blip.encode(&pixels)?;
                    Ok(())
                },
            )?;
            for b in s.caption_batches {
                let pixels = self.pixels(b, side)?;
                self.measure(
                    &format!("{name}.captions.b{b}"),
                    b as f64,
                    "captions/s",
                    &format!("{} new tokens each, greedy, batched", s.caption_tokens),
                    || {
                        blip.generate(&pixels, &gen)?;
                        Ok(())
                    },
                )?;
            }
        }
        Ok(())
    }

    fn synthesiser(&mut self, name: &str) -> Result<()> {
        // The tiny decoder's row shares SD-Turbo's latents.
        let taesd = name == "sd-turbo" && self.group("taesd");
        if !(self.group(name) || taesd) {
            return Ok(());
        }
        let sd = StableDiffusion::load(
            &self.model(Role::Synthesiser, name)?,
            &self.device,
            self.dtype,
        )?;
        let settings = self.settings(if name == "sd-turbo" {
            Preset::Fast
        } else {
            Preset::Paper
        })?;
        // The model rows at 8 images (with guidance, SD 1.x's UNet at the 16 rows of PyTorch's
        // side, every row its own latent); whole generations in the preset's batches.
        let chunk = 8;
        let batch = settings.synthesis_batch.max(1);
        // The preset's guidance: classifier-free guidance doubles the UNet's batch.
        let guidance = settings.guidance;
        let double = if guidance > 1.0 { 2 } else { 1 };
        let noise = sd.noise(chunk.max(batch) * double, &sampling(&settings, 1))?;
        let rows = double * chunk;
        let text = sd.encode_prompts(&vec!["one realistic image of a dog"; rows])?;
        let latents = noise.narrow(0, 0, rows)?;
        self.measure(
            &format!("{name}.unet.b{rows}"),
            rows as f64,
            "rows/s",
            "one UNet step, a latent a row",
            || {
                sd.predict_noise(&latents, 500.0, &text)?;
                Ok(())
            },
        )?;
        // With guidance, a step of the preset's batch as the pipeline runs it (each latent
        // with its prompt's and the empty prompt's rows: the first resnet and self-attention
        // once a latent), then with every row computed in full, as the reference does.
        if double == 2 {
            let rows = 2 * batch;
            let text = sd.encode_prompts(&vec!["one realistic image of a dog"; rows])?;
            let latents = noise.narrow(0, 0, batch)?;
            let pairs = Tensor::cat(&[&latents, &latents], 0)?;
            for (key, x, how) in [
                ("", &latents, "shared before the first cross-attention"),
                (".unshared", &pairs, "every row in full"),
            ] {
                self.measure(
                    &format!("{name}.unet.b{rows}{key}"),
                    rows as f64,
                    "rows/s",
                    &format!("one guided UNet step of {batch} latents, {how}"),
                    || {
                        sd.predict_noise(x, 500.0, &text)?;
                        Ok(())
                    },
                )?;
            }
        }
        let noise = noise.narrow(0, 0, chunk)?;
        // As PyTorch's side: latents in, images out, on the device.
        let on_device = noise.to_device(&self.device)?.to_dtype(self.dtype)?;
        self.measure(
            &format!("{name}.vae.b{chunk}"),
            chunk as f64,
            "images/s",
            "VAE decode on the device",
            || {
                sd.decode_on_device(&on_device)?;
                Ok(())
            },
        )?;
        if name == "sd-turbo" && self.group("taesd") {
            let tiny = TinyDecoder::load(
                &self.model(Role::TinyVae, "taesd")?,
                &self.device,
                self.dtype,
            )?;
            self.measure(
                &format!("taesd.decode.b{chunk}"),
                chunk as f64,
                "images/s",
                "tiny autoencoder decode (--decoder tiny), same latents as the VAE row",
                || {
                    tiny.decode_on_device(&on_device)?;
                    Ok(())
                },
            )?;
        }
        for steps in [1, 4, 50] {
            for b in self.sizes().sd_batches {
                let key = format!("{name}.generate.steps{steps}.b{b}");
                if !self.group(&key) {
                    continue;
                }
                let sampling = sampling(&settings, steps);
                let noise = sd.noise(b, &sampling)?;
                let prompts = vec!["one realistic image of a dog"; b];
                self.measure(
                    &key,
                    b as f64,
                    "images/s",
                    &format!(
                        "prompts encoded, {steps} steps, guidance {guidance}, decoded; in batches of {batch}"
                    ),
                    || {
                        for start in (0..b).step_by(batch) {
                            let len = batch.min(b - start);
                            let mut sched = sd.scheduler(&sampling)?;
                            let out = sd.denoise(
                                &noise.narrow(0, start, len)?,
                                &prompts[start..start + len],
                                &mut sched,
                                guidance,
                            )?;
                            sd.decode(&out)?;
                        }
                        Ok(())
                    },
                )?;
            }
        }
        Ok(())
    }

    fn clip(&mut self) -> Result<()> {
        if !self.group("clip") {
            return Ok(());
        }
        let clip = ClipVision::load(
            &self.model(Role::Clip, "clip-vit-b16")?,
            &self.device,
            self.dtype,
        )?;
        let b = self.sizes().clip_batch;
        let side = clip.preprocess().crop as usize;
        let pixels = self.pixels(b, side)?;
        self.measure(
            &format!("clip-vit-b16.embed.b{b}"),
            b as f64,
            "images/s",
            "image embeddings from preprocessed pixels on the device",
            || {
                clip.embed(&pixels)?;
                Ok(())
            },
        )
    }

    fn settings(&self, preset: Preset) -> Result<Settings> {
        let empty = self.opts.work.join("settings.toml");
        std::fs::write(&empty, "").map_err(io(&empty))?;
        let mut args = SettingsArgs {
            preset: Some(preset),
            ..Default::default()
        };
        if self.opts.quick {
            // Fewer candidates and images; the preset's models, steps and guidance stay.
            args.candidates = Some(2);
            args.images_per_concept = Some(2);
            args.top_k = Some(4);
            args.top_images = Some(4);
            args.caption_tokens = Some(8);
        }
        Ok(config::load_with_env(Some(&empty), &args, &|_| None)?.settings)
    }

    /// Seconds per neuron of the whole pipeline with the preset's models and parameters and
    /// `decoder`, the layer's activations already cached: one neuron alone, then a batch.
    fn end_to_end(&mut self, preset: Preset, decoder: Decoder) -> Result<()> {
        let key = match decoder {
            Decoder::Vae => format!("e2e.{preset}"),
            Decoder::Tiny => format!("e2e.{preset}-taesd"),
            Decoder::Hybrid => format!("e2e.{preset}-hybrid"),
        };
        if !self.group(&key) {
            return Ok(());
        }
        let (captioner, synthesiser) = match preset {
            Preset::Fast => ("blip-large", "sd-turbo"),
            Preset::Paper => ("blip-base", "sd-v1-4"),
        };
        let resolved = [
            self.model(Role::Captioner, captioner)?,
            self.model(Role::Synthesiser, synthesiser)?,
            self.model(Role::Clip, "clip-vit-b16")?,
            self.model(Role::TinyVae, "taesd")?,
        ];
        let tiny_vae = (decoder != Decoder::Vae).then_some(&resolved[3]);
        let settings = self.settings(preset)?;
        let llm: Arc<dyn Llm> = Arc::new(MockLlm {
            calls: Default::default(),
            latency: self.opts.llm_latency,
            concepts: self.opts.llm_concepts,
            window: Window::new(settings.llm_concurrency),
        });
        let models = Models {
            target: self.random_target()?,
            captioner: Blip::load(&resolved[0], &self.device, self.dtype)?,
            synthesiser: StableDiffusion::load(&resolved[1], &self.device, self.dtype)?,
            clip: ClipVision::load(&resolved[2], &self.device, self.dtype)?,
            decoding: Decoding::load(decoder, tiny_vae, &self.device, self.dtype)?,
            ids: ModelIds {
                target: ModelId {
                    source: "resnet50 (random)".into(),
                    revision: None,
                },
                captioner: ModelId::of(&resolved[0]),
                synthesiser: ModelId::of(&resolved[1]),
                clip: ModelId::of(&resolved[2]),
                llm: llm.model().to_string(),
                tiny_vae: tiny_vae.map(ModelId::of),
                hybrid: decoder == Decoder::Hybrid,
            },
        };
        let params = Params::from_settings(&settings, Pool::Mean)?;
        let probe = ProbeSet::open(&self.opts.work.join("probe"))?;
        let cache = ActivationCache::new(&self.opts.work.join("cache"));
        let runtime = tokio::runtime::Runtime::new().map_err(io(&self.opts.work))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = AtomicBool::new(false);
        let store_path = self.opts.work.join(format!("{key}.sqlite"));
        let neurons = self.opts.neurons.max(1);
        let mut next = 0;
        let mut job = |n: usize| {
            let j = Job {
                layer: "layer4".into(),
                neurons: (next..next + n).collect(),
                params: params.clone(),
                force: true,
            };
            next += n;
            j
        };
        // Seconds per neuron of each stage in the last run, from the pipeline's own events
        // (a wave's batched work charged to its neurons in equal shares): where the time goes.
        let stages = std::cell::RefCell::new(BTreeMap::<pipeline::Stage, f64>::new());
        // The last run's synthetic images: (generated, copied from a concept made before).
        let images = std::cell::Cell::new((0, 0));
        // Every neuron must come out described: a failed one would make the time a lie.
        let mut described = |job: Job| -> Result<()> {
            // A new store each run, as the reference caches nothing: no LLM answer or synthetic
            // image comes from an earlier run's (random captions repeat from neuron to neuron).
            for part in ["", "-wal", "-shm", ".images"] {
                let old = PathBuf::from(format!("{}{part}", store_path.display()));
                let _ = std::fs::remove_file(&old).or_else(|_| std::fs::remove_dir_all(&old));
            }
            let store = Arc::new(Store::open(&store_path)?);
            let ctx = pipeline::Context {
                models: &models,
                probe: &probe,
                store: &store,
                llm: &llm,
                cache: Some(&cache),
                runtime: runtime.handle(),
                events: &tx,
                cancel: &cancel,
            };
            while rx.try_recv().is_ok() {}
            let summary = pipeline::run(&ctx, &job)?;
            images.set((summary.images_made, summary.images_reused));
            let mut last = stages.borrow_mut();
            last.clear();
            let n = job.neurons.len() as f64;
            while let Ok(event) = rx.try_recv() {
                if let pipeline::Event::StageFinished { stage, seconds, .. } = event {
                    // Each neuron's event holds its share of a wave's work, but the whole of
                    // the job's one activation pass (or cache load).
                    let share = match stage {
                        pipeline::Stage::Activations => seconds / n,
                        _ => seconds,
                    };
                    *last.entry(stage).or_default() += share / n;
                }
            }
            if summary.failed.is_empty() {
                Ok(())
            } else {
                Err(Error::Model {
                    model: "bench".into(),
                    detail: format!("neurons {:?} failed in the end-to-end run", summary.failed),
                })
            }
        };
        // The layer's activation pass happens once per layer: done (and cached) before timing.
        described(job(1))?;
        stages.take();
        let decoder = match decoder {
            Decoder::Vae => "VAE",
            Decoder::Tiny => "TAESD",
            Decoder::Hybrid => "TAESD, the VAE for CLIP's top images",
        };
        let llm = match self.opts.llm_latency.as_secs_f64() {
            0.0 => "an in-process LLM answering at once".to_string(),
            s => format!(
                "an in-process LLM answering after {s} s, {} calls at once",
                settings.llm_concurrency
            ),
        };
        let llm = match self.opts.llm_concepts {
            0 => llm,
            n => format!("{llm}, from {n} concepts in turn"),
        };
        let note = format!(
            "{preset} preset ({captioner}, {synthesiser}, {} steps, {decoder}); {llm}",
            settings.steps
        );
        let one = format!("{key}.one");
        self.measure(&one, 1.0, "s/neuron", &note, || described(job(1)))?;
        self.stage_rows(&one, &stages.take());
        let batch = format!("{key}.batch{neurons}");
        self.measure(
            &batch,
            neurons as f64,
            "s/neuron",
            &format!("{note}; {neurons} neurons in one job, amortised"),
            || described(job(neurons)),
        )?;
        self.stage_rows(&batch, &stages.take());
        let (made, reused) = images.get();
        if reused > 0 {
            let share = reused as f64 / (made + reused) as f64;
            self.emit(Row {
                name: format!("{batch}.reused"),
                value: share,
                unit: "share",
                seconds: 0.0,
                runs: 1,
                peak_memory_bytes: None,
                note: format!(
                    "synthetic images of {batch}'s last run copied from a concept made before in the job ({reused} of {}) rather than generated",
                    made + reused
                ),
            });
        }
        Ok(())
    }

    /// A row per pipeline stage of `row`'s last run, `{row}.{stage}`, in seconds per neuron.
    fn stage_rows(&mut self, row: &str, stages: &BTreeMap<pipeline::Stage, f64>) {
        for (&stage, &seconds) in stages {
            let name = stage.name();
            let note = if stage == pipeline::Stage::Concepts {
                // The LLM runs beside the models (the next wave's crops and captions): only
                // what they leave uncovered adds to a neuron's time.
                format!("a neuron's LLM calls in {row}'s last run, overlapping the models' work")
            } else {
                format!("the {name} stage's share of {row}'s last run")
            };
            self.emit(Row {
                name: format!("{row}.{name}"),
                value: seconds,
                unit: "s/neuron",
                seconds,
                runs: 1,
                peak_memory_bytes: None,
                note,
            });
        }
    }
}

fn sampling(s: &Settings, steps: usize) -> Sampling {
    Sampling {
        steps,
        guidance: s.guidance,
        scheduler: crate::synthesise::Kind::parse(&s.scheduler),
        seed: 0,
        size: None,
    }
}

/// A WordPiece tokenizer.json of BLIP's 30,524 ids ([PAD] 0, [SEP] 102, [DEC] 30522), words
/// made up.
fn bert_tokenizer(path: &Path) -> Result<()> {
    const SPECIAL: [(u32, &str); 5] = [
        (0, "[PAD]"),
        (100, "[UNK]"),
        (101, "[CLS]"),
        (102, "[SEP]"),
        (30522, "[DEC]"),
    ];
    let mut vocab = serde_json::Map::new();
    for id in 0..30524u32 {
        let word = SPECIAL
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| format!("w{id}"), |(_, w)| w.to_string());
        vocab.insert(word, id.into());
    }
    let added: Vec<_> = SPECIAL
        .iter()
        .map(|(id, w)| {
            serde_json::json!({"id": id, "content": w, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(path, json.to_string()).map_err(io(path))
}

/// A CLIP BPE vocabulary of 49,408 ids (byte symbols, then made-up words, then the start and
/// end tokens) with no merges.
fn clip_vocab(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut vocab = serde_json::Map::new();
    let bytes: Vec<char> = (b'!'..=b'~')
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .map(char::from)
        .chain((0..256u32).filter_map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            (!printable).then(|| char::from_u32(256 + b)).flatten()
        }))
        .collect();
    for c in &bytes {
        vocab.insert(c.to_string(), (vocab.len() as u32).into());
    }
    for c in &bytes {
        vocab.insert(format!("{c}</w>"), (vocab.len() as u32).into());
    }
    while vocab.len() < 49406 {
        vocab.insert(format!("w{}</w>", vocab.len()), (vocab.len() as u32).into());
    }
    vocab.insert("<|startoftext|>".into(), 49406u32.into());
    vocab.insert("<|endoftext|>".into(), 49407u32.into());
    let v = dir.join("vocab.json");
    std::fs::write(&v, serde_json::Value::Object(vocab).to_string()).map_err(io(&v))?;
    let m = dir.join("merges.txt");
    std::fs::write(&m, "#version: 0.2\n").map_err(io(&m))
}

/// `n` photo-sized JPEGs (500x375, smooth colour fields with noise), written once.
fn probe_images(dir: &Path, n: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let present = std::fs::read_dir(dir).map_err(io(dir))?.count();
    if present == n {
        return Ok(());
    }
    for i in 0..n {
        let img = image::RgbImage::from_fn(500, 375, |x, y| {
            let h = (x * 7 + y * 13 + i as u32 * 101) % 251;
            image::Rgb([
                ((x + i as u32 * 17) % 256) as u8,
                ((y * 2 + h) % 256) as u8,
                ((x + y + h) % 256) as u8,
            ])
        });
        let p = dir.join(format!("{i:05}.jpg"));
        img.save(&p).map_err(|e| Error::Probe {
            path: p.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// The LLM of the end-to-end runs: answers every prompt after `latency` (by default at once,
/// so the figures are the models' time; with a latency, what the pipeline leaves of it
/// unhidden), at most `llm_concurrency` at once, as the endpoint client. Every answer is a
/// concept no other call got, so that each neuron has the reference's five distinct
/// candidates (none that METHOD's clean-up would merge or extend with a "background" one),
/// and the work timed is the reference's 5 x Q images.
struct MockLlm {
    calls: std::sync::atomic::AtomicUsize,
    latency: Duration,
    concepts: usize,
    window: Window,
}

impl Llm for MockLlm {
    fn model(&self) -> &str {
        "mock (bench)"
    }

    fn chat<'a>(
        &'a self,
        _: &'a [Message],
        _: f32,
        on_text: &'a (dyn Fn(&str) + Send + Sync),
    ) -> BoxFuture<'a, std::result::Result<String, LlmError>> {
        const CONCEPTS: [&str; 5] = ["red stripes", "blue sky", "dogs", "wheels", "brick walls"];
        let mut call = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.concepts > 0 {
            call %= self.concepts;
        }
        let text = format!(
            "{} {}",
            CONCEPTS[call % CONCEPTS.len()],
            call / CONCEPTS.len()
        );
        let latency = self.latency;
        Box::pin(async move {
            if !latency.is_zero() {
                let _slot = self.window.enter().await.map_err(|_| LlmError::Cancelled)?;
                tokio::time::sleep(latency).await;
            }
            on_text(&text);
            Ok(text)
        })
    }
}

/// Peak memory while a measurement runs.
struct Peak {
    #[cfg(feature = "cuda")]
    sampler: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
    cpu: bool,
}

impl Peak {
    fn start(device: &Device) -> Self {
        if device.is_cpu() {
            // Linux: "5" resets the peak resident set to the current one.
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        } else {
            // The memory earlier rows left in the GPU's pool would count as this row's.
            crate::device::release_cached_memory(device);
        }
        Self {
            #[cfg(feature = "cuda")]
            sampler: cuda_sampler(device),
            cpu: device.is_cpu(),
        }
    }

    fn stop(self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some((stop, thread)) = self.sampler {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            return thread.join().ok();
        }
        if self.cpu {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let kb: u64 = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            return Some(kb * 1024);
        }
        None
    }
}

/// The timed runs as the CUDA profiler's range (cuProfilerStart to cuProfilerStop, a no-op
/// when no profiler is attached): `ncu --profile-from-start off` then sees those runs alone,
/// not the warm-up with cuDNN's algorithm search.
struct Profiled {
    #[cfg(feature = "cuda")]
    _range: Option<candle_core::cuda_backend::cudarc::driver::Profiler>,
}

impl Profiled {
    fn start(device: &Device) -> Self {
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Self {
            #[cfg(feature = "cuda")]
            _range: match device {
                Device::Cuda(d) => d
                    .cuda_stream()
                    .context()
                    .bind_to_thread()
                    .ok()
                    .and_then(|()| candle_core::cuda_backend::cudarc::driver::Profiler::new().ok()),
                _ => None,
            },
        }
    }
}

/// Samples the device memory in use every 2 ms until told to stop; returns the most seen.
#[cfg(feature = "cuda")]
fn cuda_sampler(device: &Device) -> Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)> {
    use std::sync::atomic::Ordering;
    let Device::Cuda(d) = device else {
        return None;
    };
    let ctx = d.cuda_stream().context().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut peak = 0u64;
        loop {
            if let Ok((free, total)) = ctx.mem_get_info() {
                peak = peak.max((total - free) as u64);
            }
            if flag.load(Ordering::SeqCst) {
                return peak;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    Some((stop, thread))
}
