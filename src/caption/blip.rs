//! BLIP image captioning (transformers' `BlipForConditionalGeneration`), vision encoder and
//! text decoder both ours: candle 0.11.1's decoder fails in f16 (an f32 mask added to f16
//! scores) and at batch > 1 (position embeddings not broadcast). Greedy decoding with a KV
//! cache that lives for one batch; cross-attention keys and values are computed once per batch.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::hub::ResolvedModel;
use crate::nn::{
    self, attention, merge_heads, split_heads, split_stacked_heads, Act, LayerNorm, Linear,
};
use crate::probe::Preprocess;
use crate::Result;

fn d_vocab() -> usize {
    30524
}
fn d_768() -> usize {
    768
}
fn d_3072() -> usize {
    3072
}
fn d_12() -> usize {
    12
}
fn d_8() -> usize {
    8
}
fn d_512() -> usize {
    512
}
fn d_eps_text() -> f64 {
    1e-12
}
fn d_eps_vision() -> f64 {
    1e-5
}
fn d_bos() -> u32 {
    30522
}
fn d_sep() -> u32 {
    102
}
fn d_384() -> usize {
    384
}
fn d_16() -> usize {
    16
}

/// `text_config` of a BLIP `config.json`; absent keys take transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct TextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_768")]
    pub encoder_hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_8")]
    pub num_attention_heads: usize,
    #[serde(default = "d_512")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps_text")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    #[serde(default = "d_sep")]
    pub sep_token_id: u32,
    #[serde(default)]
    pub pad_token_id: u32,
}

/// `vision_config` of a BLIP `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_384")]
    pub image_size: usize,
    #[serde(default = "d_16")]
    pub patch_size: usize,
    #[serde(default = "d_eps_vision")]
    pub layer_norm_eps: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
}

struct VisionLayer {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl VisionLayer {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            ln1: nn::layer_norm(&vb.pp("layer_norm1"), d, eps)?,
            qkv: Linear::load(&vb.pp("self_attn.qkv"), d, 3 * d, true)?,
            proj: Linear::load(&vb.pp("self_attn.projection"), d, d, true)?,
            ln2: nn::layer_norm(&vb.pp("layer_norm2"), d, eps)?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self
            .qkv
            .forward(&self.ln1.forward(x)?)?
            .reshape((b, t, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let a = attention(&q.contiguous()?, &k, &v, 1.0 / (hd as f64).sqrt(), None)?;
        let x = self.proj.forward_residual(&merge_heads(&a)?, x)?;
        let h = self.fc1.forward_act(&self.ln2.forward(&x)?, Act::Gelu)?;
        self.fc2.forward_residual(&h, &x)
    }
}

struct Vision {
    class: Tensor,
    patch: candle_nn::Conv2d,
    position: Tensor,
    layers: Vec<VisionLayer>,
    post: LayerNorm,
}

impl Vision {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let n = (cfg.image_size / p).pow(2) + 1;
        let e = vb.pp("embeddings");
        let conv = candle_nn::Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        Ok(Self {
            class: e.get((1, 1, d), "class_embedding")?,
            patch: candle_nn::conv2d(3, d, p, conv, e.pp("patch_embedding"))?,
            position: e.get((1, n, d), "position_embedding")?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| VisionLayer::load(cfg, vb.pp(format!("encoder.layers.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            post: nn::layer_norm(&vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
        })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.class.dim(2)?;
        let class = self.class.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(self.post.forward(&x)?)
    }
}

struct TextLayer {
    /// The self-attention's q, k and v stacked.
    qkv: Linear,
    out: Linear,
    ln_attn: LayerNorm,
    xq: Linear,
    /// The cross-attention's k and v stacked.
    xkv: Linear,
    xout: Linear,
    ln_cross: LayerNorm,
    up: Linear,
    down: Linear,
    ln_out: LayerNorm,
}

impl TextLayer {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, e, eps) = (cfg.hidden_size, cfg.encoder_hidden_size, cfg.layer_norm_eps);
        let (a, x) = (vb.pp("attention"), vb.pp("crossattention"));
        Ok(Self {
            qkv: Linear::stacked(&[
                Linear::load(&a.pp("self.query"), d, d, true)?,
                Linear::load(&a.pp("self.key"), d, d, true)?,
                Linear::load(&a.pp("self.value"), d, d, true)?,
            ])?,
            out: Linear::load(&a.pp("output.dense"), d, d, true)?,
            ln_attn: nn::layer_norm(&a.pp("output.LayerNorm"), d, eps)?,
            xq: Linear::load(&x.pp("self.query"), d, d, true)?,
            xkv: Linear::stacked(&[
                Linear::load(&x.pp("self.key"), e, d, true)?,
                Linear::load(&x.pp("self.value"), e, d, true)?,
            ])?,
            xout: Linear::load(&x.pp("output.dense"), d, d, true)?,
            ln_cross: nn::layer_norm(&x.pp("output.LayerNorm"), d, eps)?,
            up: Linear::load(&vb.pp("intermediate.dense"), d, cfg.intermediate_size, true)?,
            down: Linear::load(&vb.pp("output.dense"), cfg.intermediate_size, d, true)?,
            ln_out: nn::layer_norm(&vb.pp("output.LayerNorm"), d, eps)?,
        })
    }
}

/// Per-layer keys and values of one batch: self-attention grows a token at a time, the
/// cross-attention ones are the image's, fixed.
struct Cache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
}

struct TextDecoder {
    words: Tensor,
    positions: Tensor,
    ln_emb: LayerNorm,
    layers: Vec<TextLayer>,
    head_dense: Linear,
    head_ln: LayerNorm,
    head: Linear,
    heads: usize,
}

impl TextDecoder {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let bert = vb.pp("bert");
        let words = bert.get((cfg.vocab_size, d), "embeddings.word_embeddings.weight")?;
        let p = vb.pp("cls.predictions");
        // transformers ties the output projection to the word embeddings unless saved apart.
        let head_w = if p.contains_tensor("decoder.weight") {
            p.get((cfg.vocab_size, d), "decoder.weight")?
        } else {
            words.clone()
        };
        Ok(Self {
            positions: bert.get(
                (cfg.max_position_embeddings, d),
                "embeddings.position_embeddings.weight",
            )?,
            ln_emb: nn::layer_norm(&bert.pp("embeddings.LayerNorm"), d, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| TextLayer::load(cfg, bert.pp(format!("encoder.layer.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            head_dense: Linear::load(&p.pp("transform.dense"), d, d, true)?,
            head_ln: nn::layer_norm(&p.pp("transform.LayerNorm"), d, cfg.layer_norm_eps)?,
            head: Linear::new(head_w, Some(p.get(cfg.vocab_size, "bias")?)),
            words,
            heads: cfg.num_attention_heads,
        })
    }

    fn cache(&self, image: &Tensor) -> Result<Cache> {
        // Made contiguous once here rather than at every step by the unfused attention.
        let cross_kv = self
            .layers
            .iter()
            .map(|l| {
                let [k, v] = split_stacked_heads(&l.xkv.forward(image)?, self.heads)?;
                Ok((k.contiguous()?, v.contiguous()?))
            })
            .collect::<Result<_>>()?;
        Ok(Cache {
            self_kv: vec![None; self.layers.len()],
            cross_kv,
        })
    }

    /// Logits of the next token after `ids` (B, T new tokens at position `past`).
    fn step(&self, ids: &Tensor, past: usize, cache: &mut Cache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.words.dim(1)?;
        let tok = self
            .words
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let pos = self.positions.narrow(0, past, t)?.unsqueeze(0)?;
        let mut x = self.ln_emb.forward(&tok.broadcast_add(&pos)?)?;
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mask = if t > 1 {
            Some(nn::causal_mask(t, x.dtype(), x.device())?)
        } else {
            None
        };
        for (i, l) in self.layers.iter().enumerate() {
            let [q, mut k, mut v] = split_stacked_heads(&l.qkv.forward(&x)?, self.heads)?;
            if let Some((pk, pv)) = &cache.self_kv[i] {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            cache.self_kv[i] = Some((k.clone(), v.clone()));
            let a = merge_heads(&attention(&q, &k, &v, scale, mask.as_ref())?)?;
            x = l.ln_attn.forward(&l.out.forward_residual(&a, &x)?)?;
            let q = split_heads(&l.xq.forward(&x)?, self.heads)?;
            let (ck, cv) = &cache.cross_kv[i];
            let a = merge_heads(&attention(&q, ck, cv, scale, None)?)?;
            x = l.ln_cross.forward(&l.xout.forward_residual(&a, &x)?)?;
            let h = l.up.forward_act(&x, Act::Gelu)?;
            x = l.ln_out.forward(&l.down.forward_residual(&h, &x)?)?;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let h = self
            .head_ln
            .forward(&self.head_dense.forward_act(&last, Act::Gelu)?)?;
        self.head.forward(&h)
    }
}

/// Greedy decoding limits (transformers' `max_new_tokens` and `min_length`; the length
/// counts the start token, as transformers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Generation {
    pub max_new_tokens: usize,
    pub min_length: usize,
}

impl Default for Generation {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            min_length: 5,
        }
    }
}

/// A loaded BLIP captioner.
pub struct Blip {
    vision: Vision,
    text: TextDecoder,
    cfg: TextConfig,
    tokenizer: tokenizers::Tokenizer,
    preprocess: Preprocess,
    device: Device,
    dtype: DType,
}

impl Blip {
    pub fn load(model: &ResolvedModel, device: &Device, dtype: DType) -> Result<Self> {
        let label = model.label();
        let config_path = model.required("config.json");
        let cfg: Config = nn::read_json(&label, config_path)?;
        let preprocess = match Preprocess::of_model(model)? {
            Some(p) => p,
            None => Preprocess::from_hf_processor(&serde_json::json!({
                "size": cfg.vision_config.image_size
            }))
            .expect("an integer size is a valid processor config"),
        };
        let (vb, weights) = nn::weights(model, "model.safetensors", dtype, device)?;
        let load = || -> candle_core::Result<(Vision, TextDecoder)> {
            Ok((
                Vision::load(&cfg.vision_config, vb.pp("vision_model"))?,
                TextDecoder::load(&cfg.text_config, vb.pp("text_decoder"))?,
            ))
        };
        let (vision, text) = load().map_err(|e| nn::mismatch(&label, Some(weights), &e))?;
        let tok_path = model.required("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(tok_path)
            .map_err(|e| nn::mismatch(&label, Some(tok_path), &e))?;
        Ok(Self {
            vision,
            text,
            cfg: cfg.text_config,
            tokenizer,
            preprocess,
            device: device.clone(),
            dtype,
        })
    }

    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Decoded images as this model's input, on its device in its type.
    pub fn pixels<I: std::borrow::Borrow<image::RgbImage> + Sync>(
        &self,
        images: &[I],
    ) -> Result<Tensor> {
        self.preprocess.batch(images, &self.device, self.dtype)
    }

    /// Greedy token ids (start token first, padded after the end token) for a batch of
    /// preprocessed images (B, 3, S, S), as transformers' `generate` returns them.
    pub fn generate(&self, pixels: &Tensor, gen: &Generation) -> Result<Vec<Vec<u32>>> {
        let b = pixels.dim(0)?;
        let mut cache = self.start(pixels)?;
        let (bos, eos, pad) = (
            self.cfg.bos_token_id,
            self.cfg.sep_token_id,
            self.cfg.pad_token_id,
        );
        let mut seqs: Vec<Vec<u32>> = vec![vec![bos]; b];
        let mut done = vec![false; b];
        let mut next = Tensor::from_vec(vec![bos; b], (b, 1), &self.device)?;
        for step in 0..gen.max_new_tokens {
            let mut logits = self
                .text
                .step(&next, step, &mut cache)?
                .to_dtype(DType::F32)?;
            if step + 1 < gen.min_length {
                // transformers' MinLengthLogitsProcessor: no end token before min_length.
                let mut ban = vec![0f32; logits.dim(1)?];
                ban[eos as usize] = f32::NEG_INFINITY;
                logits = logits.broadcast_add(&Tensor::new(ban, &self.device)?)?;
            }
            let ids = nn::argmax_last(&logits)?;
            for (i, &id) in ids.iter().enumerate() {
                let id = if done[i] { pad } else { id };
                seqs[i].push(id);
                done[i] |= id == eos;
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let last: Vec<u32> = seqs.iter().map(|s| *s.last().expect("non-empty")).collect();
            next = Tensor::from_vec(last, (b, 1), &self.device)?;
        }
        Ok(seqs)
    }

    /// The vision tower's output (B, tokens, width) for a batch of preprocessed images.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision
            .forward(&pixels.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The text decoder's cache for a batch of preprocessed images.
    fn start(&self, pixels: &Tensor) -> Result<Cache> {
        self.text.cache(&self.encode(pixels)?)
    }

    /// The decoder's logits (B, steps, vocab), f32, at each step when fed `ids` (start token
    /// first, one row per image): what `generate` chooses from, for comparing devices.
    pub fn logits(&self, pixels: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
        let mut cache = self.start(pixels)?;
        let steps = ids
            .iter()
            .map(Vec::len)
            .min()
            .unwrap_or(0)
            .saturating_sub(1);
        let mut out = Vec::with_capacity(steps);
        for step in 0..steps {
            let column: Vec<u32> = ids.iter().map(|row| row[step]).collect();
            let next = Tensor::from_vec(column, (ids.len(), 1), &self.device)?;
            out.push(
                self.text
                    .step(&next, step, &mut cache)?
                    .to_dtype(DType::F32)?,
            );
        }
        Ok(Tensor::stack(&out, 1)?)
    }

    /// The text of greedy ids, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| crate::Error::Model {
                model: "captioner".into(),
                detail: format!("tokenizer failed to decode {ids:?}: {e}"),
            })
    }
}
