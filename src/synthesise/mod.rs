//! Text-to-image synthesis (METHOD step 3.1): Stable Diffusion 1.x/2.x from a diffusers folder
//! (`model_index.json`, `scheduler/`, `text_encoder/`, `tokenizer/`, `unet/`, `vae/`), every
//! part built from its own config. Every part is ours, on candle-core/nn: the CLIP text encoder,
//! the tokenizer assembly, the UNet (`unet.rs`), the VAE's decoder (`vae.rs`), the blocks they
//! share (`blocks.rs`) and the schedulers.

mod blocks;
pub mod scheduler;
mod tiny;
mod unet;
mod vae;

use candle_core::{DType, Device, Module, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Deserialize;

use crate::clip::{Encoder, EncoderConfig};
use crate::hub::ResolvedModel;
use crate::nn;
use crate::Result;
pub use scheduler::{Kind, Scheduler, SchedulerConfig};
pub use tiny::TinyDecoder;

#[derive(Clone, Debug, Deserialize)]
struct TextConfig {
    #[serde(flatten)]
    encoder: EncoderConfig,
    vocab_size: usize,
    max_position_embeddings: usize,
}

/// Stable Diffusion's CLIP text encoder (`text_model.*`), last hidden state after the final
/// layer norm, causal attention.
struct TextEncoder {
    tokens: Tensor,
    positions: Tensor,
    encoder: Encoder,
    final_ln: nn::LayerNorm,
}

impl TextEncoder {
    fn load(cfg: &TextConfig, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.encoder.hidden_size;
        // transformers < 5 saves under `text_model.`, 5.x without the prefix.
        let m = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        Ok(Self {
            tokens: m.get((cfg.vocab_size, d), "embeddings.token_embedding.weight")?,
            positions: m.get(
                (cfg.max_position_embeddings, d),
                "embeddings.position_embedding.weight",
            )?,
            encoder: Encoder::load(&cfg.encoder, m.pp("encoder"))?,
            final_ln: nn::layer_norm(&m.pp("final_layer_norm"), d, cfg.encoder.layer_norm_eps)?,
        })
    }

    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.tokens.dim(1)?;
        let x = self
            .tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?
            .broadcast_add(&self.positions.narrow(0, 0, t)?.unsqueeze(0)?)?;
        let mask = nn::causal_mask(t, x.dtype(), x.device())?;
        let x = self.encoder.forward(&x, Some(&mask))?;
        Ok(self.final_ln.forward(&x)?)
    }
}

/// CLIP's BPE tokenizer as transformers runs it: NFC, whitespace squeezed, lower-cased, split
/// on CLIP's pattern, byte-level BPE with `</w>` word ends; start and end tokens, truncated and
/// padded to the model length with the folder's pad token.
struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl PromptTokenizer {
    fn load(model: &ResolvedModel, text_positions: usize) -> Result<Self> {
        let label = model.label();
        let inner = match model.file("tokenizer/tokenizer.json") {
            Some(p) => tokenizers::Tokenizer::from_file(p)
                .map_err(|e| nn::mismatch(&label, Some(p), &e))?,
            None => clip_bpe(model)?,
        };
        let read = |name: &str| -> Result<serde_json::Value> {
            match model.file(name) {
                Some(p) => nn::read_json(&label, p),
                None => Ok(serde_json::json!({})),
            }
        };
        let cfg = read("tokenizer/tokenizer_config.json")?;
        // transformers lets special_tokens_map.json override tokenizer_config.json.
        let special = read("tokenizer/special_tokens_map.json")?;
        let token = |key: &str, default: &str| -> String {
            match special.get(key).or_else(|| cfg.get(key)) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or(default)
                    .to_string(),
                None => default.to_string(),
            }
        };
        let id = |t: String| {
            inner.token_to_id(&t).ok_or_else(|| {
                nn::mismatch(
                    &label,
                    model
                        .file("tokenizer/tokenizer.json")
                        .or(model.file("tokenizer/vocab.json")),
                    &format!("token {t:?} is not in the vocabulary"),
                )
            })
        };
        let max_len = cfg
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .map_or(77, |v| v as usize)
            .min(text_positions);
        Ok(Self {
            bos: id(token("bos_token", "<|startoftext|>"))?,
            eos: id(token("eos_token", "<|endoftext|>"))?,
            pad: id(token("pad_token", "<|endoftext|>"))?,
            max_len,
            inner,
        })
    }

    fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| crate::Error::Model {
                model: "synthesiser tokenizer".into(),
                detail: format!("cannot tokenize {prompt:?}: {e}"),
            })?;
        let mut ids = vec![self.bos];
        ids.extend(enc.get_ids().iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }
}

/// The tokenizer.json transformers would write for a CLIP vocab.json + merges.txt.
fn clip_bpe(model: &ResolvedModel) -> Result<tokenizers::Tokenizer> {
    let label = model.label();
    let vocab_path = model.required("tokenizer/vocab.json");
    let merges_path = model.required("tokenizer/merges.txt");
    let vocab: serde_json::Value = nn::read_json(&label, vocab_path)?;
    let merges: Vec<String> = std::fs::read_to_string(merges_path)
        .map_err(|e| nn::mismatch(&label, Some(merges_path), &e))?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
                  "byte_fallback": false, "vocab": vocab, "merges": merges}
    });
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| nn::mismatch(&label, Some(vocab_path), &e))
}

fn d_true() -> bool {
    true
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_groups() -> usize {
    32
}
#[derive(Clone, Debug, Deserialize)]
struct VaeConfig {
    out_channels: usize,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    latent_channels: usize,
    #[serde(default = "d_groups")]
    norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    scaling_factor: f64,
    #[serde(default = "d_true")]
    use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    mid_block_add_attention: bool,
}

/// How one batch of images is made.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Sampling {
    pub steps: usize,
    pub guidance: f64,
    /// `None`: the folder's scheduler.
    pub scheduler: Option<Kind>,
    pub seed: u64,
    /// Output side in pixels; `None`: the UNet's sample size times the VAE's scale.
    pub size: Option<usize>,
}

/// A loaded Stable Diffusion.
pub struct StableDiffusion {
    tokenizer: PromptTokenizer,
    text: TextEncoder,
    unet: unet::Unet,
    vae: vae::Decoder,
    scheduler: SchedulerConfig,
    scaling_factor: f64,
    latent_channels: usize,
    vae_scale: usize,
    sample_size: usize,
    device: Device,
    dtype: DType,
}

impl StableDiffusion {
    pub fn load(model: &ResolvedModel, device: &Device, dtype: DType) -> Result<Self> {
        let label = model.label();
        let text_cfg: TextConfig =
            nn::read_json(&label, model.required("text_encoder/config.json"))?;
        let unet_path = model.required("unet/config.json");
        let unet_cfg: unet::Config = nn::read_json(&label, unet_path)?;
        let vae_cfg: VaeConfig = nn::read_json(&label, model.required("vae/config.json"))?;
        let scheduler: SchedulerConfig =
            nn::read_json(&label, model.required("scheduler/scheduler_config.json"))?;
        let plan = unet_cfg
            .plan()
            .map_err(|e| nn::mismatch(&label, Some(unet_path), &e))?;
        let weights = |file: &str| nn::weights(model, file, dtype, device);
        let (vb, p) = weights("text_encoder/model.safetensors")?;
        let text =
            TextEncoder::load(&text_cfg, vb).map_err(|e| nn::mismatch(&label, Some(p), &e))?;
        let (vb, p) = weights("unet/diffusion_pytorch_model.safetensors")?;
        let unet = unet::Unet::load(&vb, &unet_cfg, &plan)
            .map_err(|e| nn::mismatch(&label, Some(p), &e))?;
        let (vb, p) = weights("vae/diffusion_pytorch_model.safetensors")?;
        let vae = vae::Decoder::load(
            &vb,
            &vae::Shape {
                latent_channels: vae_cfg.latent_channels,
                out_channels: vae_cfg.out_channels,
                block_out_channels: &vae_cfg.block_out_channels,
                layers_per_block: vae_cfg.layers_per_block,
                norm_num_groups: vae_cfg.norm_num_groups,
                use_post_quant_conv: vae_cfg.use_post_quant_conv,
                mid_block_add_attention: vae_cfg.mid_block_add_attention,
            },
        )
        .map_err(|e| nn::mismatch(&label, Some(p), &e))?;
        Ok(Self {
            tokenizer: PromptTokenizer::load(model, text_cfg.max_position_embeddings)?,
            text,
            unet,
            vae,
            scheduler,
            scaling_factor: vae_cfg.scaling_factor,
            latent_channels: vae_cfg.latent_channels,
            vae_scale: 1 << vae_cfg.block_out_channels.len().saturating_sub(1),
            sample_size: unet_cfg.sample_size,
            device: device.clone(),
            dtype,
        })
    }

    /// Token ids (B, model length) of `prompts`.
    pub fn token_ids(&self, prompts: &[&str]) -> Result<Tensor> {
        let rows = prompts
            .iter()
            .map(|p| self.tokenizer.ids(p))
            .collect::<Result<Vec<_>>>()?;
        let len = self.tokenizer.max_len;
        Ok(Tensor::from_vec(
            rows.concat(),
            (prompts.len(), len),
            &self.device,
        )?)
    }

    /// The text encoder's last hidden state of `prompts`, f32. Each distinct prompt is encoded
    /// once: a batch of images holds Q images per concept, and guidance adds the empty prompt
    /// for every row.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut distinct: Vec<&str> = Vec::new();
        let rows: Vec<u32> = prompts
            .iter()
            .map(|p| {
                let i = distinct.iter().position(|d| d == p).unwrap_or_else(|| {
                    distinct.push(p);
                    distinct.len() - 1
                });
                i as u32
            })
            .collect();
        let hidden = self
            .text
            .forward(&self.token_ids(&distinct)?)?
            .to_dtype(DType::F32)?;
        if distinct.len() == prompts.len() {
            return Ok(hidden); // all distinct: already in order
        }
        Ok(hidden.index_select(&Tensor::new(rows, &self.device)?, 0)?)
    }

    /// One UNet noise prediction, f32: for `latents` (B, ...) and `text` (R x B, ...), each
    /// block of B text rows with all the latents (R = 2: classifier-free guidance's pairs),
    /// giving R x B rows.
    pub fn predict_noise(&self, latents: &Tensor, t: f64, text: &Tensor) -> Result<Tensor> {
        let x = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let c = text.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.unet.forward(&x, t, &c)?.to_dtype(DType::F32)?)
    }

    /// The scheduler of this folder for `sampling`.
    pub fn scheduler(&self, sampling: &Sampling) -> Result<Scheduler> {
        Scheduler::new(&self.scheduler, sampling.scheduler, sampling.steps)
    }

    /// Runs the reverse process from unit Gaussian `noise` (B, C, h, w) for one prompt per
    /// row, with classifier-free guidance against the empty prompt when guidance > 1 (as
    /// diffusers' StableDiffusionPipeline). Returns the final latents, f32.
    pub fn denoise(
        &self,
        noise: &Tensor,
        prompts: &[&str],
        sched: &mut Scheduler,
        guidance: f64,
    ) -> Result<Tensor> {
        let cond = self.encode_prompts(prompts)?;
        let guided = guidance > 1.0;
        let text = if guided {
            let uncond = self.encode_prompts(&vec![""; prompts.len()])?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond
        };
        let mut latents =
            (noise.to_device(&self.device)?.to_dtype(DType::F32)? * sched.init_noise_sigma())?;
        let timesteps = sched.timesteps().to_vec();
        for t in timesteps {
            // With guidance, each latent goes in once for its two rows of `text`.
            let input = sched.scale_model_input(&latents)?;
            let noise_pred = self.predict_noise(&input, t, &text)?;
            let noise_pred = if guided {
                let b = prompts.len();
                let (u, c) = (noise_pred.narrow(0, 0, b)?, noise_pred.narrow(0, b, b)?);
                (&u + ((c - &u)? * guidance)?)?
            } else {
                noise_pred
            };
            latents = sched.step(&noise_pred, &latents)?;
        }
        Ok(latents)
    }

    /// How many latents one VAE decode takes. On the CPU one: a 512 px image's top-level
    /// tensors are 134 MB each, and every kernel is parallel within an image. On CUDA four:
    /// candle 0.11.1's conv2d without cuDNN overflows 32-bit im2col counts from batch 8
    /// (measured on an H200).
    fn vae_chunk(&self) -> usize {
        match self.device {
            Device::Cpu => 1,
            _ => 4,
        }
    }

    /// VAE decode of latents to images in [0, 1], (B, 3, H, W), f32 on the CPU.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decode_on_device(latents)?.to_device(&Device::Cpu)?)
    }

    /// `decode`, the images left on the model's device.
    pub fn decode_on_device(&self, latents: &Tensor) -> Result<Tensor> {
        let x = (latents.to_device(&self.device)?.to_dtype(self.dtype)? / self.scaling_factor)?;
        let n = x.dim(0)?;
        let mut parts = Vec::with_capacity(n.div_ceil(self.vae_chunk()));
        for start in (0..n).step_by(self.vae_chunk()) {
            let len = self.vae_chunk().min(n - start);
            let img = self
                .vae
                .forward(&x.narrow(0, start, len)?)?
                .to_dtype(DType::F32)?;
            parts.push(((img / 2.0)? + 0.5)?.clamp(0.0, 1.0)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Where the model runs, and its latents live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Seeded unit Gaussian latents for `n` images, drawn on the CPU so a seed gives the same
    /// images on every device.
    pub fn noise(&self, n: usize, sampling: &Sampling) -> Result<Tensor> {
        let side = sampling
            .size
            .map_or(self.sample_size, |s| s / self.vae_scale);
        let count = n * self.latent_channels * side * side;
        let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
        let v: Vec<f32> = rand_distr::StandardNormal
            .sample_iter(&mut rng)
            .take(count)
            .collect();
        Ok(Tensor::from_vec(
            v,
            (n, self.latent_channels, side, side),
            &Device::Cpu,
        )?)
    }

    /// `n` images of `prompt`, as 8-bit RGB.
    pub fn generate(
        &self,
        prompt: &str,
        n: usize,
        sampling: &Sampling,
    ) -> Result<Vec<image::RgbImage>> {
        let noise = self.noise(n, sampling)?;
        let mut sched = self.scheduler(sampling)?;
        let latents = self.denoise(&noise, &vec![prompt; n], &mut sched, sampling.guidance)?;
        to_rgb(&self.decode_on_device(&latents)?)
    }
}

/// (B, 3, H, W) floats in [0, 1], on any device, to 8-bit images: converted where they are,
/// so a GPU sends the CPU a quarter of the bytes and leaves it no work on the pixels.
pub fn to_rgb(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, _, h, w) = images.dims4()?;
    let bytes = (images.permute((0, 2, 3, 1))?.contiguous()? * 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    Ok(bytes
        .chunks(h * w * 3)
        .take(b)
        .map(|c| image::RgbImage::from_raw(w as u32, h as u32, c.to_vec()).expect("h*w*3 bytes"))
        .collect())
}
