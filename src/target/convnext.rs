//! ConvNeXt and ConvNeXt V2 (timm's `convnext_*` / `convnextv2_*`, torchvision's `convnext_*`
//! and transformers' `ConvNext(V2)Model` / `ConvNext(V2)ForImageClassification`, the last two
//! renamed to timm's names at load), with depths and widths read from the weights. LayerScale is
//! folded into each block's second linear layer at load; V2's global response normalisation
//! (GRN) runs between the two.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};

use super::{LayerInfo, LayerKind, NetInfo, Recorder, TargetNetwork, Weights};
use crate::error::Result;
use crate::nn::{self, Act, LayerNorm, Linear};

/// Every LayerNorm of the network but transformers' last (`layer_norm_eps` in its config).
const EPS: f64 = 1e-6;

/// How a ConvNeXt checkpoint names its tensors and modules. The network is built from timm's
/// names; a layer is listed under the checkpoint's own module name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// timm's: `stem.0`, `stages.N.downsample.1`, `stages.N.blocks.M.conv_dw`, `head.fc`.
    Timm,
    /// torchvision's: `features.0`, downsampling at `features.2`, `.4`, `.6`, stages at
    /// `features.1`, `.3`, `.5`, `.7`, `classifier`.
    Torchvision,
    /// transformers': `convnext.embeddings`, `convnext.encoder.stages.N.layers.M`, the head
    /// `classifier` (`ConvNextForImageClassification`; `convnextv2.` in V2); no prefix and no
    /// head in `ConvNext(V2)Model`.
    Transformers { prefix: &'static str },
}

impl Layout {
    /// The layout of a weights file with these tensors.
    pub fn of(has: impl Fn(&str) -> bool) -> Self {
        if has("features.0.0.weight") && has("features.1.0.block.0.weight") {
            return Layout::Torchvision;
        }
        ["convnext.", "convnextv2.", ""]
            .into_iter()
            .find(|p| {
                has(&format!("{p}embeddings.patch_embeddings.weight"))
                    && has(&format!("{p}encoder.stages.0.layers.0.dwconv.weight"))
            })
            .map_or(Layout::Timm, |prefix| Layout::Transformers { prefix })
    }

    /// Whether these tensors are a ConvNeXt's under timm's names.
    pub fn is_convnext(has: impl Fn(&str) -> bool) -> bool {
        has("stem.0.weight") && has("stages.0.blocks.0.conv_dw.weight")
    }

    /// The tensors under timm's names; a tensor with none keeps its own, for the unused-tensor
    /// check to report.
    pub fn to_timm(self, tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        if self == Layout::Timm {
            return tensors;
        }
        tensors
            .into_iter()
            .map(|(k, t)| (self.timm_name(&k).unwrap_or(k), t))
            .collect()
    }

    fn timm_name(self, name: &str) -> Option<String> {
        let (module, param) = name.rsplit_once('.')?;
        let module = match self {
            Layout::Timm => return None,
            Layout::Torchvision => Self::torchvision_module(module)?,
            Layout::Transformers { prefix } => match module {
                "classifier" if !prefix.is_empty() => "head.fc".into(),
                _ => Self::transformers_module(module.strip_prefix(prefix)?)?,
            },
        };
        let param = match param {
            "layer_scale" | "layer_scale_parameter" => "gamma",
            p => p,
        };
        Some(format!("{module}.{param}"))
    }

    /// timm's module for a torchvision one (a block's own parameter, `layer_scale`, sits on
    /// the block).
    fn torchvision_module(module: &str) -> Option<String> {
        match module {
            "classifier.0" => return Some("head.norm".into()),
            "classifier.2" => return Some("head.fc".into()),
            _ => {}
        }
        let mut parts = module.strip_prefix("features.")?.split('.');
        let i: usize = parts.next()?.parse().ok()?;
        let rest: Vec<&str> = parts.collect();
        // Even entries after the stem downsample; odd ones are the stages.
        let downsampling = i.is_multiple_of(2);
        match (i, rest.as_slice()) {
            (0, [j @ ("0" | "1")]) => Some(format!("stem.{j}")),
            (_, [j @ ("0" | "1")]) if downsampling => {
                Some(format!("stages.{}.downsample.{j}", i / 2))
            }
            (_, [m]) if !downsampling => Some(format!("stages.{}.blocks.{m}", i / 2)),
            (_, [m, "block", j]) if !downsampling => {
                let part = match *j {
                    "0" => "conv_dw",
                    "2" => "norm",
                    "3" => "mlp.fc1",
                    "5" => "mlp.fc2",
                    _ => return None,
                };
                Some(format!("stages.{}.blocks.{m}.{part}", i / 2))
            }
            _ => None,
        }
    }

    /// timm's module for a transformers one (its prefix removed).
    fn transformers_module(module: &str) -> Option<String> {
        match module {
            "embeddings.patch_embeddings" => return Some("stem.0".into()),
            "embeddings.layernorm" => return Some("stem.1".into()),
            "layernorm" => return Some("head.norm".into()),
            _ => {}
        }
        let (s, rest) = module.strip_prefix("encoder.stages.")?.split_once('.')?;
        if let Some(j) = rest.strip_prefix("downsampling_layer.") {
            return Some(format!("stages.{s}.downsample.{j}"));
        }
        let rest = rest.strip_prefix("layers.")?;
        let (m, part) = match rest.split_once('.') {
            Some((m, part)) => (m, Some(part)),
            None => (rest, None),
        };
        let part = match part {
            None => return Some(format!("stages.{s}.blocks.{m}")),
            Some("dwconv") => "conv_dw",
            Some("layernorm") => "norm",
            Some("pwconv1") => "mlp.fc1",
            Some("pwconv2") => "mlp.fc2",
            Some("grn") => "mlp.grn",
            Some(_) => return None,
        };
        Some(format!("stages.{s}.blocks.{m}.{part}"))
    }

    fn stem(self) -> String {
        match self {
            Layout::Timm => "stem".into(),
            Layout::Torchvision => "features.0".into(),
            Layout::Transformers { prefix } => format!("{prefix}embeddings"),
        }
    }

    /// Stage `s` (from 0), or its block `b`.
    fn stage(self, s: usize, b: Option<usize>) -> String {
        let stage = match self {
            Layout::Timm => format!("stages.{s}"),
            Layout::Torchvision => format!("features.{}", 2 * s + 1),
            Layout::Transformers { prefix } => format!("{prefix}encoder.stages.{s}"),
        };
        match (self, b) {
            (_, None) => stage,
            (Layout::Timm, Some(b)) => format!("{stage}.blocks.{b}"),
            (Layout::Torchvision, Some(b)) => format!("{stage}.{b}"),
            (Layout::Transformers { .. }, Some(b)) => format!("{stage}.layers.{b}"),
        }
    }

    /// The pooled features before the head's LayerNorm; transformers pools inside its model.
    fn pool(self) -> Option<&'static str> {
        match self {
            Layout::Timm => Some("head.global_pool"),
            Layout::Torchvision => Some("avgpool"),
            Layout::Transformers { .. } => None,
        }
    }

    fn head_norm(self) -> String {
        match self {
            Layout::Timm => "head.norm".into(),
            Layout::Torchvision => "classifier.0".into(),
            Layout::Transformers { prefix } => format!("{prefix}layernorm"),
        }
    }

    fn head(self) -> &'static str {
        match self {
            Layout::Timm => "head.fc",
            Layout::Torchvision => "classifier.2",
            Layout::Transformers { .. } => "classifier",
        }
    }
}

/// LayerNorm over the channels of `(N, C, H, W)` (timm's `LayerNorm2d`), left a view of
/// channels-last storage.
fn norm_2d(norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    let y = norm.forward(&x.permute((0, 2, 3, 1))?.contiguous()?)?;
    Ok(y.permute((0, 3, 1, 2))?)
}

/// A convolution whose stride is its kernel size (the stem's patchify, the downsampling).
fn patchify(w: &Weights, p: &str, dev: &Device, dt: DType) -> Result<nn::Conv> {
    let weight = w.get(&format!("{p}.weight"), None)?;
    let (c_out, k) = (weight.dim(0)?, weight.dim(2)?);
    let bias = w.get(&format!("{p}.bias"), Some(&[c_out]))?;
    Ok(nn::Conv::new(weight, bias, (k, 0), false, dev, dt)?.channels_last()?)
}

struct Block {
    /// The 7x7 depthwise convolution.
    conv_dw: nn::Conv,
    norm: LayerNorm,
    fc1: Linear,
    /// ConvNeXt V2's global response normalisation of the hidden features: weight and bias.
    grn: Option<(Tensor, Tensor)>,
    /// With LayerScale folded in.
    fc2: Linear,
}

/// ConvNeXt V2's GRN of channels-last `x` `(N, H, W, C)`: each channel's L2 norm over the
/// image, divided by its mean over the channels, scales the features,
/// `x + weight * (x * n) + bias`, as timm and transformers compute it (epsilon 1e-6).
fn global_response_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    // In f32: a sum of squares over a 56x56 map overflows f16.
    let norm = x.to_dtype(DType::F32)?.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
    let n = norm
        .broadcast_div(&(norm.mean_keepdim(3)? + 1e-6)?)?
        .to_dtype(x.dtype())?;
    let scaled = x.broadcast_mul(&n)?.broadcast_mul(weight)?;
    Ok((x + scaled)?.broadcast_add(bias)?)
}

impl Block {
    fn load(w: &Weights, p: &str, c: usize, dev: &Device, dt: DType) -> Result<Self> {
        let dw = w.get(&format!("{p}.conv_dw.weight"), None)?;
        if dw.dims().len() != 4 || dw.dims()[..2] != [c, 1] {
            return Err(w.mismatch(format!(
                "{p}.conv_dw.weight has shape {:?}, not a depthwise convolution of {c} channels",
                dw.dims()
            )));
        }
        let k = dw.dim(2)?;
        let bias = w.get(&format!("{p}.conv_dw.bias"), Some(&[c]))?;
        let conv_dw = nn::Conv::new(dw, bias, (1, k / 2), false, dev, dt)?
            .grouped(c)
            .channels_last()?;
        // timm's conv_mlp variants (convnext_atto ...) hold the MLP as 1x1 convolutions.
        let matrix = |name: &str| -> Result<Tensor> {
            let t = w.get(&format!("{p}.{name}.weight"), None)?;
            Ok(t.flatten_from(1)?)
        };
        let (fc1, mut fc2) = (matrix("mlp.fc1")?, matrix("mlp.fc2")?);
        let hidden = fc1.dim(0)?;
        if fc1.dims() != [hidden, c] || fc2.dims() != [c, hidden] {
            return Err(w.mismatch(format!(
                "{p}.mlp's weights have shapes {:?} and {:?}, not a {c} -> hidden -> {c} MLP",
                fc1.dims(),
                fc2.dims()
            )));
        }
        let b1 = w.get(&format!("{p}.mlp.fc1.bias"), Some(&[hidden]))?;
        let mut b2 = w.get(&format!("{p}.mlp.fc2.bias"), Some(&[c]))?;
        let grn = if w.contains(&format!("{p}.mlp.grn.weight")) {
            // timm's are `(hidden)`, transformers' `(1, 1, 1, hidden)`.
            let get = |name: &str| -> Result<Tensor> {
                let t = w.get(&format!("{p}.mlp.grn.{name}"), None)?;
                if t.elem_count() != hidden {
                    return Err(w.mismatch(format!(
                        "{p}.mlp.grn.{name} has shape {:?}, not {hidden} values",
                        t.dims()
                    )));
                }
                Ok(t.flatten_all()?.to_device(dev)?.to_dtype(dt)?)
            };
            Some((get("weight")?, get("bias")?))
        } else {
            None
        };
        let gamma = format!("{p}.gamma");
        if w.contains(&gamma) {
            // timm's `(C)`, torchvision's `(C, 1, 1)`.
            let g = w.get(&gamma, None)?.flatten_all()?;
            if g.elem_count() != c {
                return Err(w.mismatch(format!(
                    "{gamma} has {} values for {c} channels",
                    g.elem_count()
                )));
            }
            fc2 = fc2.broadcast_mul(&g.reshape((c, 1))?)?;
            b2 = b2.mul(&g)?;
        }
        let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(dev)?.to_dtype(dt)?) };
        Ok(Self {
            conv_dw,
            norm: w.layer_norm(&format!("{p}.norm"), c, EPS, dev, dt)?,
            fc1: Linear::new(on(fc1)?, Some(on(b1)?)),
            grn,
            fc2: Linear::new(on(fc2)?, Some(on(b2)?)),
        })
    }

    /// `x + fc2(grn(gelu(fc1(norm(conv_dw(x))))))` (no GRN in V1), the MLP over channels-last
    /// rows. The output is an `(N, C, H, W)` view of them, which the next channels-last
    /// convolution (cuDNN builds) reads in place, as it does the residual; elsewhere they are
    /// copied to NCHW and back.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv_dw.forward(x)?.permute((0, 2, 3, 1))?;
        let h = self.norm.forward(&h.contiguous()?)?;
        let mut h = self.fc1.forward_act(&h, Act::Gelu)?;
        if let Some((weight, bias)) = &self.grn {
            h = global_response_norm(&h, weight, bias)?;
        }
        let y = self.fc2.forward_residual(&h, &x.permute((0, 2, 3, 1))?)?;
        Ok(y.permute((0, 3, 1, 2))?)
    }
}

struct Stage {
    /// LayerNorm, then the strided convolution; none in the first stage.
    downsample: Option<(LayerNorm, nn::Conv)>,
    blocks: Vec<Block>,
}

pub struct ConvNext {
    info: NetInfo,
    stem: nn::Conv,
    stem_norm: LayerNorm,
    stages: Vec<Stage>,
    head_norm: LayerNorm,
    /// timm's hidden head layer, GELU after it.
    pre_logits: Option<Linear>,
    head: Option<Linear>,
    /// Whether the pooled features are a layer of their own (not in transformers' list).
    pool_listed: bool,
}

impl ConvNext {
    /// From weights under timm's names; `layout` says which names the checkpoint's layers go
    /// by, `config` is transformers' config.json (its last LayerNorm's epsilon, activation).
    pub(super) fn load(
        w: &Weights,
        config: Option<&serde_json::Value>,
        layout: Layout,
        input: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if let Layout::Transformers { .. } = layout {
            w.check_hidden_act(config, "gelu", "ConvNeXt")?;
        }
        if w.contains("norm_pre.weight") {
            return Err(w.mismatch(
                "this ConvNeXt normalises before pooling (norm_pre.weight, timm's head_norm_first), which dnd does not run".into(),
            ));
        }
        let stem = patchify(w, "stem.0", device, dtype)?;
        let stem_w = w.dims("stem.0.weight")?;
        let mut c = stem_w[0];
        let stem_norm = w.layer_norm("stem.1", c, EPS, device, dtype)?;
        let mut hw = input / stem_w[2];
        let mut layers = Vec::new();
        let spatial = |name: String, c: usize, hw: usize| LayerInfo {
            name,
            neurons: c,
            shape: vec![c, hw, hw],
            kind: LayerKind::Spatial,
        };
        layers.push(spatial(layout.stem(), c, hw));
        let mut stages = Vec::new();
        let mut depths = Vec::new();
        let mut widths = Vec::new();
        while w.contains(&format!("stages.{}.blocks.0.conv_dw.weight", stages.len())) {
            let s = stages.len();
            let p = format!("stages.{s}");
            let downsample = if w.contains(&format!("{p}.downsample.1.weight")) {
                let ln = w.layer_norm(&format!("{p}.downsample.0"), c, EPS, device, dtype)?;
                let conv = patchify(w, &format!("{p}.downsample.1"), device, dtype)?;
                let k = w.dims(&format!("{p}.downsample.1.weight"))?[2];
                (c, hw) = (conv.out_channels(), hw / k);
                Some((ln, conv))
            } else {
                None
            };
            let blocks = (0..)
                .map(|b| format!("{p}.blocks.{b}"))
                .take_while(|b| w.contains(&format!("{b}.conv_dw.weight")))
                .map(|b| Block::load(w, &b, c, device, dtype))
                .collect::<Result<Vec<_>>>()?;
            layers.push(spatial(layout.stage(s, None), c, hw));
            for b in 0..blocks.len() {
                layers.push(spatial(layout.stage(s, Some(b)), c, hw));
            }
            depths.push(blocks.len());
            widths.push(c);
            stages.push(Stage { downsample, blocks });
        }
        let vector = |name: String, n: usize| LayerInfo {
            name,
            neurons: n,
            shape: vec![n],
            kind: LayerKind::Vector,
        };
        if let Some(pool) = layout.pool() {
            layers.push(vector(pool.into(), c));
        }
        let head_eps = match layout {
            Layout::Transformers { .. } => config
                .and_then(|c| c.get("layer_norm_eps"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-12),
            _ => EPS,
        };
        let head_norm = w.layer_norm("head.norm", c, head_eps, device, dtype)?;
        layers.push(vector(layout.head_norm(), c));
        let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        let linear = |p: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                on(w.get(&format!("{p}.weight"), Some(&[out, inp]))?)?,
                Some(on(w.get(&format!("{p}.bias"), Some(&[out]))?)?),
            ))
        };
        // timm's head with a hidden layer (`convnext_large_mlp`): a linear layer and GELU
        // between the LayerNorm and the classifier.
        let mut features = c;
        let pre_logits = if w.contains("head.pre_logits.fc.weight") {
            let hidden = w.dims("head.pre_logits.fc.weight")?[0];
            layers.push(vector("head.pre_logits".into(), hidden));
            let fc = linear("head.pre_logits.fc", hidden, c)?;
            features = hidden;
            Some(fc)
        } else {
            None
        };
        let head = if w.contains("head.fc.weight") {
            let classes = w.dims("head.fc.weight")?[0];
            layers.push(vector(layout.head().into(), classes));
            Some(linear("head.fc", classes, features)?)
        } else {
            None
        };
        let size = match (depths.as_slice(), widths.first()) {
            ([3, 3, 9, 3], Some(96)) => "_tiny",
            ([3, 3, 27, 3], Some(96)) => "_small",
            ([3, 3, 27, 3], Some(128)) => "_base",
            ([3, 3, 27, 3], Some(192)) => "_large",
            ([3, 3, 27, 3], Some(256)) => "_xlarge",
            _ => "",
        };
        let v2 = stages
            .iter()
            .flat_map(|s| &s.blocks)
            .any(|b| b.grn.is_some());
        let name = format!("convnext{}{size}", if v2 { "v2" } else { "" });
        Ok(Self {
            info: NetInfo {
                architecture: format!("{name} (depths {depths:?}, widths {widths:?})"),
                layers,
                device: device.clone(),
                dtype,
            },
            stem,
            stem_norm,
            stages,
            head_norm,
            pre_logits,
            head,
            pool_listed: layout.pool().is_some(),
        })
    }
}

impl TargetNetwork for ConvNext {
    fn info(&self) -> &NetInfo {
        &self.info
    }

    fn forward(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        let mut rec = Recorder::new(taps);
        let x = x.to_device(&self.info.device)?.to_dtype(self.info.dtype)?;
        let mut h = norm_2d(&self.stem_norm, &self.stem.forward(&x)?)?;
        if rec.record(0, &h) {
            return rec.finish();
        }
        // Layer list order: the stage entry, then its blocks.
        let mut idx = 1;
        for stage in &self.stages {
            if let Some((ln, conv)) = &stage.downsample {
                h = conv.forward(&norm_2d(ln, &h)?)?;
            }
            for (b, block) in stage.blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if rec.record(idx + 1 + b, &h) {
                    return rec.finish();
                }
            }
            if rec.record(idx, &h) {
                return rec.finish();
            }
            idx += 1 + stage.blocks.len();
        }
        h = h.mean((2, 3))?;
        if self.pool_listed {
            if rec.record(idx, &h) {
                return rec.finish();
            }
            idx += 1;
        }
        h = self.head_norm.forward(&h)?;
        if rec.record(idx, &h) {
            return rec.finish();
        }
        if let Some(fc) = &self.pre_logits {
            h = fc.forward_act(&h, Act::Gelu)?;
            idx += 1;
            if rec.record(idx, &h) {
                return rec.finish();
            }
        }
        if let Some(head) = &self.head {
            rec.record(idx + 1, &head.forward(&h)?);
        }
        rec.finish()
    }
}
