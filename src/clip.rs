//! CLIP (transformers' `CLIPModel` layout, or `CLIPVisionModelWithProjection`'s): the image
//! embeddings that weight candidates (METHOD step 3.4), and the transformer shared with Stable
//! Diffusion's text encoder.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::hub::ResolvedModel;
use crate::nn::{self, attention, merge_heads, split_stacked_heads, Act, LayerNorm, Linear};
use crate::probe::Preprocess;
use crate::Result;

fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

/// The fields of a CLIP text or vision config that shape the transformer.
#[derive(Clone, Debug, Deserialize)]
pub struct EncoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

struct Layer {
    ln1: LayerNorm,
    /// q, k and v stacked.
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// CLIP's pre-norm transformer (`encoder.layers.N`).
pub(crate) struct Encoder {
    layers: Vec<Layer>,
    heads: usize,
    act: Act,
}

impl Encoder {
    pub(crate) fn load(cfg: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            other => candle_core::bail!("unsupported hidden_act {other:?} (quick_gelu or gelu)"),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let a = l.pp("self_attn");
                Ok(Layer {
                    ln1: nn::layer_norm(&l.pp("layer_norm1"), d, eps)?,
                    qkv: Linear::stacked(&[
                        Linear::load(&a.pp("q_proj"), d, d, true)?,
                        Linear::load(&a.pp("k_proj"), d, d, true)?,
                        Linear::load(&a.pp("v_proj"), d, d, true)?,
                    ])?,
                    out: Linear::load(&a.pp("out_proj"), d, d, true)?,
                    ln2: nn::layer_norm(&l.pp("layer_norm2"), d, eps)?,
                    fc1: Linear::load(&l.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
                    fc2: Linear::load(&l.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            layers,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let d = x.dim(2)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let mut x = x.clone();
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            let [q, k, v] = split_stacked_heads(&l.qkv.forward(&h)?, self.heads)?;
            let a = merge_heads(&attention(&q, &k, &v, scale, mask)?)?;
            x = l.out.forward_residual(&a, &x)?;
            let h = l.fc1.forward_act(&l.ln2.forward(&x)?, self.act)?;
            x = l.fc2.forward_residual(&h, &x)?;
        }
        Ok(x)
    }
}

#[derive(Clone, Debug, Deserialize)]
struct VisionConfig {
    #[serde(flatten)]
    encoder: EncoderConfig,
    image_size: usize,
    patch_size: usize,
}

/// CLIP's image tower and projection: unit-free image embeddings for the similarity weights.
pub struct ClipVision {
    class: Tensor,
    patch: candle_nn::Conv2d,
    position: Tensor,
    pre: LayerNorm,
    encoder: Encoder,
    post: LayerNorm,
    projection: Linear,
    preprocess: Preprocess,
    device: Device,
    dtype: DType,
}

impl ClipVision {
    pub fn load(model: &ResolvedModel, device: &Device, dtype: DType) -> Result<Self> {
        let label = model.label();
        let cfg_path = model.required("config.json");
        let raw: serde_json::Value = nn::read_json(&label, cfg_path)?;
        // A CLIPModel nests its image tower's config; a CLIPVisionModelWithProjection's config
        // is that config itself. Their weights have the same names.
        let v: VisionConfig =
            serde_json::from_value(raw.get("vision_config").unwrap_or(&raw).clone())
                .map_err(|e| nn::mismatch(&label, Some(cfg_path), &e))?;
        let projection_dim = raw
            .get("projection_dim")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| nn::mismatch(&label, Some(cfg_path), &"no projection_dim"))?
            as usize;
        let preprocess = match Preprocess::of_model(model)? {
            Some(p) => p,
            None => Preprocess::from_hf_processor(&serde_json::json!({
                "size": v.image_size, "do_center_crop": true, "crop_size": v.image_size
            }))
            .expect("an integer size is a valid processor config"),
        };
        let (vb, weights) = nn::weights(model, "model.safetensors", dtype, device)?;
        let load = || -> candle_core::Result<Self> {
            let d = v.encoder.hidden_size;
            let n = (v.image_size / v.patch_size).pow(2) + 1;
            let m = vb.pp("vision_model");
            let e = m.pp("embeddings");
            let conv = candle_nn::Conv2dConfig {
                stride: v.patch_size,
                ..Default::default()
            };
            Ok(Self {
                class: e.get(d, "class_embedding")?,
                patch: candle_nn::conv2d_no_bias(
                    3,
                    d,
                    v.patch_size,
                    conv,
                    e.pp("patch_embedding"),
                )?,
                position: e.get((n, d), "position_embedding.weight")?,
                // (sic) transformers' name
                pre: nn::layer_norm(&m.pp("pre_layrnorm"), d, v.encoder.layer_norm_eps)?,
                encoder: Encoder::load(&v.encoder, m.pp("encoder"))?,
                post: nn::layer_norm(&m.pp("post_layernorm"), d, v.encoder.layer_norm_eps)?,
                projection: Linear::load(&vb.pp("visual_projection"), d, projection_dim, false)?,
                preprocess: preprocess.clone(),
                device: device.clone(),
                dtype,
            })
        };
        load().map_err(|e| nn::mismatch(&label, Some(weights), &e))
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

    /// Image embeddings (B, projection_dim) in f32 of preprocessed pixels (B, 3, S, S).
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        let b = x.dim(0)?;
        let patches = self.patch.forward(&x)?.flatten_from(2)?.transpose(1, 2)?;
        let d = self.class.dim(0)?;
        let class = self.class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position.unsqueeze(0)?)?;
        let x = self.encoder.forward(&self.pre.forward(&x)?, None)?;
        let pooled = self.post.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(self.projection.forward(&pooled)?.to_dtype(DType::F32)?)
    }

    /// Embeddings of decoded images, `batch` at a time.
    pub fn embed_images<I: std::borrow::Borrow<image::RgbImage> + Sync>(
        &self,
        images: &[I],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(batch.max(1)) {
            let px = self.pixels(chunk)?;
            out.extend(self.embed(&px)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}
