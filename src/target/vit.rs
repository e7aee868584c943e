//! Vision Transformer with timm's names (`vit_base_patch16_224.*`, DeiT, DeiT III, DINOv2):
//! patch_embed, cls_token, pos_embed, blocks.N (pre-norm attention + MLP, LayerScale when the
//! weights have it), norm, head (absent in DINOv2); or torchvision's (`vit_b_16`, ...), renamed. A neuron of a token layer is one
//! dimension of the CLS token; the patch tokens give its H x W map.

use candle_core::{DType, Device, Module, Tensor, D};

use super::{LayerInfo, LayerKind, NetInfo, Recorder, TargetNetwork, Weights};
use crate::error::Result;
use crate::nn::{attention, merge_heads, Act, LayerNorm, Linear};
use crate::probe::Preprocess;

const LN_EPS: f64 = 1e-6;

/// Whose names a ViT's weights and layers carry. torchvision's `vit_b_16` and friends are the
/// same network as timm's ViT: their weights are renamed to timm's at load
/// ([`Layout::timm_name`]), and their layers keep torchvision's module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Timm,
    Torchvision,
}

impl Layout {
    /// The layout of a weights file with this tensor.
    pub fn of(has: impl Fn(&str) -> bool) -> Self {
        if has("conv_proj.weight") && has("encoder.pos_embedding") {
            Layout::Torchvision
        } else {
            Layout::Timm
        }
    }

    /// timm's name for a torchvision ViT tensor; `None` keeps the name (and so leaves it for
    /// the unused-tensor check to report).
    pub fn timm_name(name: &str) -> Option<String> {
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
        }
    }

    fn norm(self) -> &'static str {
        match self {
            Layout::Timm => "norm",
            Layout::Torchvision => "encoder.ln",
        }
    }

    fn head(self) -> &'static str {
        match self {
            Layout::Timm => "head",
            Layout::Torchvision => "heads.head",
        }
    }
}

/// `{p}.weight` and `{p}.bias` of `d` as a LayerNorm on `dev` in `dt`.
fn norm(w: &Weights, p: &str, d: usize, dev: &Device, dt: DType) -> Result<LayerNorm> {
    let get = |name: &str| -> Result<Tensor> {
        Ok(w.get(&format!("{p}.{name}"), Some(&[d]))?
            .to_device(dev)?
            .to_dtype(dt)?)
    };
    Ok(LayerNorm::new(get("weight")?, get("bias")?, LN_EPS))
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

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
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
        let h = self.fc1.forward_act(&self.norm2.forward(&x)?, Act::Gelu)?;
        self.fc2.forward_residual(&h, &x)
    }
}

pub struct Vit {
    info: NetInfo,
    patch_w: Tensor,
    patch_b: Tensor,
    patch: usize,
    cls: Tensor,
    pos: Tensor,
    /// Whether `pos` has a row for the class token, or is added to the patch tokens alone.
    pos_has_cls: bool,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Option<Linear>,
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
            ("reg_token", "register tokens"),
            ("dist_token", "a distillation token (DeiT distilled)"),
            (
                "fc_norm.weight",
                "its tokens averaged before the head (global_pool avg, MAE-style)",
            ),
            (
                "norm_pre.weight",
                "a norm before the blocks (CLIP-style image towers)",
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
        // Head count is not in the weights: timm's config.json records it in model_args; the
        // standard ViTs (Ti/S/B/L) all use 64-dimensional heads.
        let heads = config
            .and_then(|c| c.pointer("/model_args/num_heads"))
            .and_then(|v| v.as_u64())
            .map(|h| h as usize)
            .unwrap_or(if d == 1280 { 16 } else { (d / 64).max(1) });
        if d % heads != 0 {
            return Err(w.mismatch(format!(
                "embedding width {d} is not divisible by {heads} heads"
            )));
        }
        let grid = pre.crop as usize / patch;
        let tokens = 1 + grid * grid;
        let pos = w.get("pos_embed", None)?;
        // DeiT III's position embeddings leave out the class token (timm's no_embed_class).
        let pos_has_cls = pos.dims() == [1, tokens, d];
        if !pos_has_cls && pos.dims() != [1, tokens - 1, d] {
            return Err(w.mismatch(format!(
                "pos_embed has shape {:?} but a {}px input with {patch}px patches needs [1, {tokens}, {d}] (or [1, {}, {d}] without the class token)",
                pos.dims(),
                pre.crop,
                tokens - 1
            )));
        }
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
                    norm1: norm(w, &format!("{p}.norm1"), d, device, dtype)?,
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
                    norm2: norm(w, &format!("{p}.norm2"), d, device, dtype)?,
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
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = if w.contains("head.weight") {
            let classes = w.dims("head.weight")?[0];
            Some(lin(w, "head", classes, d, device, dtype)?)
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
        layers.push(tokens_layer(layout.norm().into()));
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
            patch_b: to(w.get("patch_embed.proj.bias", Some(&[d]))?)?,
            patch,
            cls: to(w.get("cls_token", Some(&[1, 1, d]))?)?,
            pos: to(pos)?,
            pos_has_cls,
            blocks,
            norm: norm(w, "norm", d, device, dtype)?,
            head,
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
        let p = x
            .conv2d(&self.patch_w, 0, self.patch, 1, 1)?
            .broadcast_add(&self.patch_b.reshape((1, (), 1, 1))?)?;
        let p = p.flatten_from(2)?.transpose(1, 2)?; // [B, N, D]
        let cls = self.cls.broadcast_as((b, 1, self.cls.dim(D::Minus1)?))?;
        let mut h = if self.pos_has_cls {
            Tensor::cat(&[&cls, &p], 1)?.broadcast_add(&self.pos)?
        } else {
            Tensor::cat(&[&cls, &p.broadcast_add(&self.pos)?], 1)?
        }
        .contiguous()?;
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if rec.record(i, &h) {
                return rec.finish();
            }
        }
        h = self.norm.forward(&h)?;
        if rec.record(self.blocks.len(), &h) {
            return rec.finish();
        }
        if let Some(head) = &self.head {
            let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
            rec.record(self.blocks.len() + 1, &head.forward(&cls)?);
        }
        rec.finish()
    }
}
