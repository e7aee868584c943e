//! Vision Transformer with timm's names (`vit_base_patch16_224.*`, DeiT, DeiT III, DINOv2,
//! CLIP towers): patch_embed, cls_token, reg_token (registers), pos_embed, norm_pre (CLIP),
//! blocks.N (pre-norm attention + MLP, LayerScale when the weights have it), norm, head
//! (absent in DINOv2). torchvision's and transformers' ViTs (transformers' DINOv2 and CLIP
//! too) are renamed to those names at load ([`Layout`]). A neuron of a token layer is one
//! dimension of the CLS token; the patch tokens give its H x W map.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};

use super::{LayerInfo, LayerKind, NetInfo, Recorder, TargetNetwork, Weights};
use crate::error::Result;
use crate::nn::{attention, merge_heads, Act, LayerNorm, Linear};
use crate::probe::Preprocess;

/// timm's and torchvision's LayerNorm epsilon; transformers' configs give theirs.
const LN_EPS: f64 = 1e-6;

/// Whose names a ViT's weights and layers carry. torchvision's `vit_b_16` and friends and
/// transformers' `ViTForImageClassification` are the same network as timm's ViT: their weights
/// are renamed to timm's at load ([`Layout::to_timm`]), and their layers keep their own names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Timm,
    Torchvision,
    /// transformers' `ViTForImageClassification` (its names under `vit.`) or `ViTModel`.
    Transformers {
        prefix: &'static str,
    },
    /// transformers' `Dinov2Model` / `Dinov2ForImageClassification` (names under `dinov2.`)
    /// and their `Dinov2WithRegisters` twins (under `dinov2_with_registers.`): LayerScale,
    /// position embeddings resized to the input, a head reading the class token beside the
    /// patch tokens' mean.
    Dinov2 {
        prefix: &'static str,
    },
    /// transformers' CLIP image tower (`CLIPModel`, `CLIPVisionModel`,
    /// `CLIPVisionModelWithProjection`; names under `vision_model.`): a norm before the blocks,
    /// QuickGELU, the projection as a head without bias. A CLIPModel's text tower is not read.
    Clip,
}

impl Layout {
    /// The layout of a weights file with these tensors.
    pub fn of(has: impl Fn(&str) -> bool) -> Self {
        if has("vision_model.embeddings.class_embedding") {
            return Layout::Clip;
        }
        if has("conv_proj.weight") && has("encoder.pos_embedding") {
            return Layout::Torchvision;
        }
        for prefix in ["dinov2.", "dinov2_with_registers.", ""] {
            if has(&format!("{prefix}embeddings.mask_token"))
                && has(&format!("{prefix}encoder.layer.0.norm1.weight"))
            {
                return Layout::Dinov2 { prefix };
            }
        }
        for prefix in ["vit.", ""] {
            if has(&format!("{prefix}embeddings.cls_token"))
                && has(&format!("{prefix}encoder.layer.0.layernorm_before.weight"))
            {
                return Layout::Transformers { prefix };
            }
        }
        Layout::Timm
    }

    /// The tensors renamed to timm's names (transformers' separate q, k and v joined as timm's
    /// qkv); a tensor with no timm name keeps its own, for the unused-tensor check to report.
    pub fn to_timm(self, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        match self {
            Layout::Timm => Ok(tensors),
            Layout::Torchvision => Ok(tensors
                .into_iter()
                .map(|(k, t)| (Self::torchvision_name(&k).unwrap_or(k), t))
                .collect()),
            Layout::Transformers { prefix } | Layout::Dinov2 { prefix } => {
                joined(tensors, |k| match k.strip_prefix(prefix).unwrap_or(k) {
                    // The pooler (ViTModel's tanh layer on the CLS token) feeds no layer dnd
                    // taps; DINOv2's mask token stands in for masked patches in training only.
                    n if n.starts_with("pooler.") || n == "embeddings.mask_token" => {
                        Some(Renamed::Drop)
                    }
                    n => Self::transformers_name(n),
                })
            }
            Layout::Clip => joined(tensors, Self::clip_name),
        }
    }

    /// timm's name for a transformers CLIP tensor; the text tower and the logit scale dropped.
    fn clip_name(name: &str) -> Option<Renamed> {
        if name.starts_with("text_model.")
            || name.starts_with("text_projection.")
            || name == "logit_scale"
            || name.ends_with("position_ids")
        {
            return Some(Renamed::Drop);
        }
        let fixed = match name {
            "vision_model.embeddings.class_embedding" => Some("cls_token"),
            "vision_model.embeddings.patch_embedding.weight" => Some("patch_embed.proj.weight"),
            "vision_model.embeddings.position_embedding.weight" => Some("pos_embed"),
            "vision_model.pre_layrnorm.weight" => Some("norm_pre.weight"),
            "vision_model.pre_layrnorm.bias" => Some("norm_pre.bias"),
            "vision_model.post_layernorm.weight" => Some("norm.weight"),
            "vision_model.post_layernorm.bias" => Some("norm.bias"),
            "visual_projection.weight" => Some("head.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(Renamed::To(f.to_string()));
        }
        let rest = name.strip_prefix("vision_model.encoder.layers.")?;
        let (i, part) = rest.split_once('.')?;
        let (part, kind) = part.rsplit_once('.')?;
        let qkv = |n: usize| Some(Renamed::Qkv(format!("blocks.{i}.attn.qkv.{kind}"), n));
        let timm = match part {
            "self_attn.q_proj" => return qkv(0),
            "self_attn.k_proj" => return qkv(1),
            "self_attn.v_proj" => return qkv(2),
            "self_attn.out_proj" => "attn.proj",
            "layer_norm1" => "norm1",
            "layer_norm2" => "norm2",
            "mlp.fc1" | "mlp.fc2" => part,
            _ => return None,
        };
        Some(Renamed::To(format!("blocks.{i}.{timm}.{kind}")))
    }

    /// timm's name for a transformers ViT or DINOv2 tensor (the `vit.` or `dinov2.` prefix
    /// removed).
    fn transformers_name(name: &str) -> Option<Renamed> {
        let fixed = match name {
            "embeddings.cls_token" => Some("cls_token"),
            "embeddings.register_tokens" => Some("reg_token"),
            "embeddings.position_embeddings" => Some("pos_embed"),
            "embeddings.patch_embeddings.projection.weight" => Some("patch_embed.proj.weight"),
            "embeddings.patch_embeddings.projection.bias" => Some("patch_embed.proj.bias"),
            "layernorm.weight" => Some("norm.weight"),
            "layernorm.bias" => Some("norm.bias"),
            "classifier.weight" => Some("head.weight"),
            "classifier.bias" => Some("head.bias"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(Renamed::To(f.to_string()));
        }
        let rest = name.strip_prefix("encoder.layer.")?;
        let (i, part) = rest.split_once('.')?;
        // DINOv2's LayerScale, timm's ls1 / ls2.
        if let Some(n) = part
            .strip_prefix("layer_scale")
            .and_then(|p| p.strip_suffix(".lambda1"))
        {
            return Some(Renamed::To(format!("blocks.{i}.ls{n}.gamma")));
        }
        let (part, kind) = part.rsplit_once('.')?; // kind: weight or bias
        let qkv = |n: usize| Some(Renamed::Qkv(format!("blocks.{i}.attn.qkv.{kind}"), n));
        let timm = match part {
            "attention.attention.query" => return qkv(0),
            "attention.attention.key" => return qkv(1),
            "attention.attention.value" => return qkv(2),
            "layernorm_before" => "norm1",
            "attention.output.dense" => "attn.proj",
            "layernorm_after" => "norm2",
            "intermediate.dense" => "mlp.fc1",
            "output.dense" => "mlp.fc2",
            // DINOv2's, timm's already but for the gated MLP of the giant model, whose shapes
            // then tell it apart.
            "norm1" | "norm2" | "mlp.fc1" | "mlp.fc2" => part,
            "mlp.weights_in" => "mlp.fc1",
            "mlp.weights_out" => "mlp.fc2",
            _ => return None,
        };
        Some(Renamed::To(format!("blocks.{i}.{timm}.{kind}")))
    }

    /// timm's name for a torchvision ViT tensor.
    fn torchvision_name(name: &str) -> Option<String> {
        let fixed = match name {
            "class_token" => Some("cls_token"),
            "conv_proj.weight" => Some("patch_embed.proj.weight"),
            "conv_proj.bias" => Some("patch_embed.proj.bias"),
            "encoder.pos_embedding" => Some("pos_embed"),
            "encoder.ln.weight" => Some("norm.weight"),
            "encoder.ln.bias" => Some("norm.bias"),
            "heads.head.weight" => Some("head.weight"),
            "heads.head.bias" => Some("head.bias"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.to_string());
        }
        let rest = name.strip_prefix("encoder.layers.encoder_layer_")?;
        let (i, part) = rest.split_once('.')?;
        let timm = match part {
            "ln_1.weight" => "norm1.weight",
            "ln_1.bias" => "norm1.bias",
            "self_attention.in_proj_weight" => "attn.qkv.weight",
            "self_attention.in_proj_bias" => "attn.qkv.bias",
            "self_attention.out_proj.weight" => "attn.proj.weight",
            "self_attention.out_proj.bias" => "attn.proj.bias",
            "ln_2.weight" => "norm2.weight",
            "ln_2.bias" => "norm2.bias",
            // torchvision 0.12 named the MLP's layers linear_1 / linear_2.
            "mlp.0.weight" | "mlp.linear_1.weight" => "mlp.fc1.weight",
            "mlp.0.bias" | "mlp.linear_1.bias" => "mlp.fc1.bias",
            "mlp.3.weight" | "mlp.linear_2.weight" => "mlp.fc2.weight",
            "mlp.3.bias" | "mlp.linear_2.bias" => "mlp.fc2.bias",
            _ => return None,
        };
        Some(format!("blocks.{i}.{timm}"))
    }

    fn block(self, i: usize) -> String {
        match self {
            Layout::Timm => format!("blocks.{i}"),
            Layout::Torchvision => format!("encoder.layers.encoder_layer_{i}"),
            Layout::Transformers { prefix } | Layout::Dinov2 { prefix } => {
                format!("{prefix}encoder.layer.{i}")
            }
            Layout::Clip => format!("vision_model.encoder.layers.{i}"),
        }
    }

    fn norm(self) -> String {
        match self {
            Layout::Timm => "norm".into(),
            Layout::Torchvision => "encoder.ln".into(),
            Layout::Transformers { prefix } | Layout::Dinov2 { prefix } => {
                format!("{prefix}layernorm")
            }
            Layout::Clip => "vision_model.post_layernorm".into(),
        }
    }

    fn head(self) -> &'static str {
        match self {
            Layout::Timm => "head",
            Layout::Torchvision => "heads.head",
            Layout::Transformers { .. } | Layout::Dinov2 { .. } => "classifier",
            Layout::Clip => "visual_projection",
        }
    }
}

/// What a transformers ViT tensor becomes in timm's layout.
enum Renamed {
    To(String),
    /// Row block `.1` (0 query, 1 key, 2 value) of timm's joined qkv tensor `.0`.
    Qkv(String, usize),
    /// Not part of the image network.
    Drop,
}

/// `tensors` under the names `name` gives them (their own where it gives none), q, k and v
/// joined, a class token and position embeddings stored without their leading 1 given it.
fn joined(
    tensors: HashMap<String, Tensor>,
    name: impl Fn(&str) -> Option<Renamed>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    let mut qkv: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    for (k, t) in tensors {
        match name(&k) {
            Some(Renamed::To(n)) => {
                out.insert(n, t);
            }
            Some(Renamed::Qkv(n, i)) => {
                qkv.entry(n).or_default()[i] = Some(t);
            }
            Some(Renamed::Drop) => {}
            None => {
                out.insert(k, t);
            }
        }
    }
    for (name, parts) in qkv {
        match parts {
            [Some(q), Some(k), Some(v)] => {
                out.insert(name, Tensor::cat(&[q, k, v], 0)?);
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{name}: the query, key or value projection is missing"
                ))
                .into())
            }
        }
    }
    // CLIP keeps its class embedding as (d) and its position embeddings as (tokens, d).
    for (key, rank) in [("cls_token", 1), ("pos_embed", 2)] {
        if let Some(t) = out.get_mut(key).filter(|t| t.rank() == rank) {
            *t = t.unsqueeze(0)?;
            if rank == 1 {
                *t = t.unsqueeze(0)?;
            }
        }
    }
    Ok(out)
}

/// A linear layer from `{p}.weight` `(out, inp)` and `{p}.bias`.
fn lin(w: &Weights, p: &str, out: usize, inp: usize, dev: &Device, dt: DType) -> Result<Linear> {
    scaled_lin(w, p, None, out, inp, dev, dt)
}

/// A linear layer whose output timm's LayerScale (`{scale}.gamma`, when the weights have it:
/// DeiT III, DINOv2) multiplies before the residual: folded into its rows and bias at load,
/// so the forward pass is the plain ViT's.
fn scaled_lin(
    w: &Weights,
    p: &str,
    scale: Option<&str>,
    out: usize,
    inp: usize,
    dev: &Device,
    dt: DType,
) -> Result<Linear> {
    let mut weight = w.get(&format!("{p}.weight"), Some(&[out, inp]))?;
    let mut bias = w.get(&format!("{p}.bias"), Some(&[out]))?;
    if let Some(gamma) = scale
        .map(|s| format!("{s}.gamma"))
        .filter(|g| w.contains(g))
    {
        let gamma = w.get(&gamma, Some(&[out]))?;
        weight = weight.broadcast_mul(&gamma.reshape((out, 1))?)?;
        bias = bias.mul(&gamma)?;
    }
    let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(dev)?.to_dtype(dt)?) };
    Ok(Linear::new(on(weight)?, Some(on(bias)?)))
}

/// transformers' DINOv2 position embeddings `(1, 1 + g*g, d)` for a `grid x grid` input: the
/// class token's row as it is and the patches' g x g grid resized as its
/// `interpolate_pos_encoding` does (bicubic, `antialias` with registers); as they are when g
/// is the grid (or they are not such a grid: the caller names the shape).
fn resize_positions(pos: &Tensor, grid: usize, antialias: bool) -> Result<Tensor> {
    let (_, n, d) = pos.dims3()?;
    let g = ((n.max(1) - 1) as f64).sqrt().round() as usize;
    if g == grid || g * g + 1 != n {
        return Ok(pos.clone());
    }
    let rows = pos.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = rows[..d].to_vec();
    out.extend(bicubic_grid(&rows[d..], d, g, grid, antialias));
    Ok(Tensor::from_vec(
        out,
        (1, 1 + grid * grid, d),
        pos.device(),
    )?)
}

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` of a `from x from` grid of
/// `d`-wide rows to `to x to`, in f32, along the rows then the columns. Without antialiasing:
/// Keys' cubic with A = -0.75 at four source positions, edges repeated; with it (when
/// shrinking): PIL's filter, A = -0.5 stretched over the scale, weights normalised.
fn bicubic_grid(rows: &[f32], d: usize, from: usize, to: usize, antialias: bool) -> Vec<f32> {
    let taps = bicubic_taps(from, to, antialias);
    // Along each row: (from, to, d).
    let mut wide = vec![0f32; from * to * d];
    for y in 0..from {
        for (ox, (idx, w)) in taps.iter().enumerate() {
            let dst = &mut wide[(y * to + ox) * d..][..d];
            for (&x, &wx) in idx.iter().zip(w) {
                let src = &rows[(y * from + x) * d..][..d];
                dst.iter_mut().zip(src).for_each(|(o, &v)| *o += wx * v);
            }
        }
    }
    // Then down each column.
    let mut out = vec![0f32; to * to * d];
    for (oy, (idx, w)) in taps.iter().enumerate() {
        for ox in 0..to {
            let dst = &mut out[(oy * to + ox) * d..][..d];
            for (&y, &wy) in idx.iter().zip(w) {
                let src = &wide[(y * to + ox) * d..][..d];
                dst.iter_mut().zip(src).for_each(|(o, &v)| *o += wy * v);
            }
        }
    }
    out
}

/// Per output index along one axis: the source indices and their weights.
fn bicubic_taps(from: usize, to: usize, antialias: bool) -> Vec<(Vec<usize>, Vec<f32>)> {
    let cubic = |a: f32, x: f32| {
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    let scale = from as f32 / to as f32;
    (0..to)
        .map(|o| {
            if antialias {
                let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
                let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
                let center = scale * (o as f32 + 0.5);
                let lo = ((center - support + 0.5) as i64).max(0) as usize;
                let hi = ((center + support + 0.5) as i64).min(from as i64) as usize;
                let w: Vec<f32> = (lo..hi)
                    .map(|j| cubic(-0.5, (j as f32 - center + 0.5) * inv))
                    .collect();
                let total: f32 = w.iter().sum();
                let w = if total != 0.0 {
                    w.iter().map(|v| v / total).collect()
                } else {
                    w
                };
                ((lo..hi).collect(), w)
            } else {
                let real = scale * (o as f32 + 0.5) - 0.5;
                let i = (real.floor() as i64).min(from as i64 - 1);
                let t = (real - i as f32).clamp(0.0, 1.0);
                let idx = [-1i64, 0, 1, 2]
                    .map(|j| (i + j).clamp(0, from as i64 - 1) as usize)
                    .to_vec();
                let w = [t + 1.0, t, 1.0 - t, 2.0 - t]
                    .map(|x| cubic(-0.75, x))
                    .to_vec();
                (idx, w)
            }
        })
        .collect()
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Act,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x)?)?
            .reshape((b, t, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let y = attention(&q, &k, &v, (hd as f64).powf(-0.5), None)?;
        let x = self.proj.forward_residual(&merge_heads(&y)?, x)?;
        let h = self.fc1.forward_act(&self.norm2.forward(&x)?, self.act)?;
        self.fc2.forward_residual(&h, &x)
    }
}

pub struct Vit {
    info: NetInfo,
    patch_w: Tensor,
    patch_b: Option<Tensor>,
    patch: usize,
    /// The class token and the register tokens (between it and the patches), their position
    /// embeddings added at load where they have them.
    cls: Tensor,
    registers: Option<Tensor>,
    /// Added to the patch tokens.
    patch_pos: Tensor,
    /// CLIP's LayerNorm before the blocks.
    norm_pre: Option<LayerNorm>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Option<Linear>,
    /// Whether the head reads the patch tokens' mean beside the class token.
    head_reads_mean: bool,
}

impl Vit {
    pub fn load(
        w: &Weights,
        config: Option<&serde_json::Value>,
        pre: &Preprocess,
        layout: Layout,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let pw = w.dims("patch_embed.proj.weight")?;
        let (d, patch) = (pw[0], pw[2]);
        if !w.contains("cls_token") {
            return Err(w.mismatch(
                "this ViT has no cls_token; dnd needs the class token as the neuron value".into(),
            ));
        }
        // Variants that would otherwise fail on a tensor's shape or absence, far from the cause.
        for (tensor, variant) in [
            ("dist_token", "a distillation token (DeiT distilled)"),
            (
                "fc_norm.weight",
                "its tokens averaged before the head (global_pool avg, MAE-style)",
            ),
        ] {
            if w.contains(tensor) {
                return Err(w.mismatch(format!(
                    "this ViT has {variant} ({tensor}), which dnd does not run; the plain timm ViT (vit_*_patch16_224.*) does"
                )));
            }
        }
        let depth = (0..)
            .take_while(|i| w.contains(&format!("blocks.{i}.norm1.weight")))
            .count();
        // A CLIPModel nests its image tower's settings.
        let config = config.map(|c| c.get("vision_config").unwrap_or(c));
        // timm's CLIP towers (vit_*_clip_*) use LayerNorm's epsilon of 1e-5, which their
        // config.json does not record; QuickGELU is in the architecture's name.
        let timm_arch = config
            .and_then(|c| c.get("architecture"))
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        // Head count is not in the weights: timm's config.json records it in model_args and
        // transformers' as num_attention_heads; the standard ViTs (Ti/S/B/L) all use
        // 64-dimensional heads.
        let heads = config
            .and_then(|c| {
                c.pointer("/model_args/num_heads")
                    .or_else(|| c.get("num_attention_heads"))
            })
            .and_then(|v| v.as_u64())
            .map(|h| h as usize)
            .unwrap_or(if d == 1280 { 16 } else { (d / 64).max(1) });
        if d % heads != 0 {
            return Err(w.mismatch(format!(
                "embedding width {d} is not divisible by {heads} heads"
            )));
        }
        let eps = config
            .and_then(|c| c.get("layer_norm_eps"))
            .and_then(|v| v.as_f64())
            .unwrap_or(if timm_arch.contains("_clip_") {
                1e-5
            } else {
                LN_EPS
            });
        let act_name = config
            .and_then(|c| {
                c.get("hidden_act")
                    .or_else(|| c.pointer("/model_args/act_layer"))
            })
            .and_then(|v| v.as_str())
            .unwrap_or(if timm_arch.contains("quickgelu") {
                "quick_gelu"
            } else {
                "gelu"
            });
        let act = match act_name {
            "gelu" => Act::Gelu,
            "quick_gelu" => Act::QuickGelu,
            other => {
                return Err(w.mismatch(format!(
                    "config.json's activation is {other:?}; dnd's ViT runs gelu and quick_gelu"
                )))
            }
        };
        let grid = pre.crop as usize / patch;
        let tokens = 1 + grid * grid;
        // Register tokens (DINOv2 with registers) sit between the class token and the patches.
        let mut registers = None;
        let mut n_reg = 0;
        if w.contains("reg_token") {
            let r = w.get("reg_token", None)?;
            match r.dims() {
                [1, n, width] if *width == d => n_reg = *n,
                other => {
                    return Err(w.mismatch(format!(
                        "reg_token has shape {other:?}, not [1, registers, {d}]"
                    )))
                }
            }
            registers = Some(r);
        }
        let mut pos = w.get("pos_embed", None)?;
        if let Layout::Dinov2 { .. } = layout {
            // transformers resizes DINOv2's antialiased when it has registers, not otherwise.
            pos = resize_positions(&pos, grid, n_reg > 0)?;
        }
        // The position embeddings cover the patches alone (timm's no_embed_class: DeiT III,
        // timm's DINOv2 with registers), the class token and the patches (registers then
        // have none), or every token. Those of the class token and registers are added to
        // them here, once.
        let patches = tokens - 1;
        let prefix = match pos.dims() {
            [1, r, width] if *width == d && *r == patches => 0,
            [1, r, width] if *width == d && *r == patches + 1 => 1,
            [1, r, width] if *width == d && n_reg > 0 && *r == patches + 1 + n_reg => 1 + n_reg,
            other => {
                let registers = match n_reg {
                    0 => String::new(),
                    n => format!(", [1, {}, {d}] with its {n} registers", tokens + n),
                };
                return Err(w.mismatch(format!(
                    "pos_embed has shape {other:?} but a {}px input with {patch}px patches needs [1, {tokens}, {d}] (or [1, {patches}, {d}] without the class token{registers})",
                    pre.crop
                )));
            }
        };
        let mut cls = w.get("cls_token", Some(&[1, 1, d]))?;
        if prefix > 0 {
            cls = (cls + pos.narrow(1, 0, 1)?)?;
        }
        if let (Some(r), true) = (&mut registers, prefix > 1) {
            *r = (&*r + pos.narrow(1, 1, n_reg)?)?;
        }
        let patch_pos = pos.narrow(1, prefix, patches)?;
        let to = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        let blocks = (0..depth)
            .map(|i| {
                let p = format!("blocks.{i}");
                let hidden = w.dims(&format!("{p}.mlp.fc1.weight"))?[0];
                if w.dims(&format!("{p}.mlp.fc2.weight"))?.get(1) == Some(&(hidden / 2)) {
                    return Err(w.mismatch(format!(
                        "{p}.mlp is a gated MLP (SwiGLU, as in DINOv2 giant), which dnd does not run; plain-MLP ViTs (DINOv2 small to large, DeiT, vit_*) do"
                    )));
                }
                Ok(Block {
                    norm1: w.layer_norm(&format!("{p}.norm1"), d, eps, device, dtype)?,
                    qkv: lin(w, &format!("{p}.attn.qkv"), 3 * d, d, device, dtype)?,
                    proj: scaled_lin(
                        w,
                        &format!("{p}.attn.proj"),
                        Some(&format!("{p}.ls1")),
                        d,
                        d,
                        device,
                        dtype,
                    )?,
                    norm2: w.layer_norm(&format!("{p}.norm2"), d, eps, device, dtype)?,
                    fc1: lin(w, &format!("{p}.mlp.fc1"), hidden, d, device, dtype)?,
                    fc2: scaled_lin(
                        w,
                        &format!("{p}.mlp.fc2"),
                        Some(&format!("{p}.ls2")),
                        d,
                        hidden,
                        device,
                        dtype,
                    )?,
                    heads,
                    act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // transformers' DINOv2 classifier reads the class token and the patch tokens' mean.
        let head_reads_mean = matches!(layout, Layout::Dinov2 { .. });
        let head = if w.contains("head.weight") {
            let classes = w.dims("head.weight")?[0];
            let inputs = if head_reads_mean { 2 * d } else { d };
            // CLIP's projection has no bias.
            Some(if w.contains("head.bias") {
                lin(w, "head", classes, inputs, device, dtype)?
            } else {
                let weight = w.get("head.weight", Some(&[classes, inputs]))?;
                Linear::new(weight.to_device(device)?.to_dtype(dtype)?, None)
            })
        } else {
            None
        };
        let tokens_layer = |name: String| LayerInfo {
            name,
            neurons: d,
            shape: vec![tokens, d],
            kind: LayerKind::Tokens { grid: (grid, grid) },
        };
        let mut layers: Vec<LayerInfo> =
            (0..depth).map(|i| tokens_layer(layout.block(i))).collect();
        layers.push(tokens_layer(layout.norm()));
        if let Some(h) = &head {
            let classes = h.out_features();
            layers.push(LayerInfo {
                name: layout.head().into(),
                neurons: classes,
                shape: vec![classes],
                kind: LayerKind::Vector,
            });
        }
        Ok(Self {
            info: NetInfo {
                architecture: format!(
                    "vit (patch {patch}, width {d}, depth {depth}, {heads} heads)"
                ),
                layers,
                device: device.clone(),
                dtype,
            },
            patch_w: to(w.get("patch_embed.proj.weight", None)?)?,
            // CLIP's patch embedding has no bias.
            patch_b: match w.contains("patch_embed.proj.bias") {
                true => Some(to(w.get("patch_embed.proj.bias", Some(&[d]))?)?),
                false => None,
            },
            norm_pre: match w.contains("norm_pre.weight") {
                true => Some(w.layer_norm("norm_pre", d, eps, device, dtype)?),
                false => None,
            },
            patch,
            cls: to(cls)?,
            registers: registers.map(to).transpose()?,
            patch_pos: to(patch_pos)?,
            blocks,
            norm: w.layer_norm("norm", d, eps, device, dtype)?,
            head,
            head_reads_mean,
        })
    }
}

impl TargetNetwork for Vit {
    fn info(&self) -> &NetInfo {
        &self.info
    }

    fn forward(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        let mut rec = Recorder::new(taps);
        let x = x.to_device(&self.info.device)?.to_dtype(self.info.dtype)?;
        let b = x.dim(0)?;
        let mut p = x.conv2d(&self.patch_w, 0, self.patch, 1, 1)?;
        if let Some(bias) = &self.patch_b {
            p = p.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
        }
        let p = p.flatten_from(2)?.transpose(1, 2)?; // [B, N, D]
        let d = self.cls.dim(D::Minus1)?;
        let mut tokens = vec![self.cls.broadcast_as((b, 1, d))?];
        let n_reg = match &self.registers {
            Some(r) => {
                tokens.push(r.broadcast_as((b, r.dim(1)?, d))?);
                r.dim(1)?
            }
            None => 0,
        };
        tokens.push(p.broadcast_add(&self.patch_pos)?);
        let mut h = Tensor::cat(&tokens, 1)?.contiguous()?;
        if let Some(n) = &self.norm_pre {
            h = n.forward(&h)?;
        }
        // A layer's tokens as dnd taps them: the class token and the patches.
        let tapped = |h: &Tensor| -> Result<Tensor> {
            if n_reg == 0 {
                return Ok(h.clone());
            }
            let patches = h.narrow(1, 1 + n_reg, h.dim(1)? - 1 - n_reg)?;
            Ok(Tensor::cat(&[&h.narrow(1, 0, 1)?, &patches], 1)?)
        };
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if rec.wants(i) && rec.record(i, &tapped(&h)?) {
                return rec.finish();
            }
        }
        h = self.norm.forward(&h)?;
        if rec.wants(self.blocks.len()) && rec.record(self.blocks.len(), &tapped(&h)?) {
            return rec.finish();
        }
        if let Some(head) = &self.head {
            let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
            let input = if self.head_reads_mean {
                let patches = h.narrow(1, 1 + n_reg, h.dim(1)? - 1 - n_reg)?.mean(1)?;
                Tensor::cat(&[&cls, &patches], 1)?
            } else {
                cls
            };
            rec.record(self.blocks.len() + 1, &head.forward(&input)?);
        }
        rec.finish()
    }
}
