//! ResNet-18/34/50/101/152 (torchvision's layout, which timm's `resnet*` share, and
//! transformers' `ResNetForImageClassification` / `ResNetModel`, renamed to it at load), with
//! block type, depth, widths and groups read from the weights: wide ResNets, ResNeXt, and timm's
//! deep-stem and average-pool-shortcut variants (`resnet50d`, `resnet50c`, `resnet26t`) too.
//! BatchNorm is folded into the convolutions at load time: one fused conv instead of conv +
//! four broadcast ops per layer.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{LayerInfo, LayerKind, NetInfo, Recorder, TargetNetwork, Weights};
use crate::cpu_ops::MaxPool3x3s2;
use crate::error::Result;
use crate::nn;
use crate::nn::linear;

/// How a ResNet checkpoint names its tensors and modules. The network is built from
/// torchvision's names; a layer is listed under the checkpoint's own module name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// torchvision's and timm's: `conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`.
    Torchvision,
    /// transformers' `ResNetForImageClassification` (its names under `resnet.`, the head
    /// `classifier.1`) or `ResNetModel` (no prefix, no head).
    Transformers { prefix: &'static str },
}

impl Layout {
    /// The layout of a weights file with these tensors.
    pub fn of(has: impl Fn(&str) -> bool) -> Self {
        ["resnet.", ""]
            .into_iter()
            .find(|p| has(&format!("{p}embedder.embedder.convolution.weight")))
            .map_or(Layout::Torchvision, |prefix| Layout::Transformers {
                prefix,
            })
    }

    /// The tensors under torchvision's names; a tensor with none keeps its own, for the
    /// unused-tensor check to report.
    pub fn to_torchvision(self, tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        let Layout::Transformers { prefix } = self else {
            return tensors;
        };
        tensors
            .into_iter()
            .map(|(k, t)| {
                let name = match k.as_str() {
                    "classifier.1.weight" => Some("fc.weight".to_string()),
                    "classifier.1.bias" => Some("fc.bias".to_string()),
                    _ => k.strip_prefix(prefix).and_then(Self::transformers_name),
                };
                (name.unwrap_or(k), t)
            })
            .collect()
    }

    /// torchvision's name for a transformers ResNet tensor (its prefix removed).
    fn transformers_name(name: &str) -> Option<String> {
        // A ResNetConvLayer's convolution and BatchNorm.
        let conv_bn = |rest: &str, conv: &str, bn: &str| match rest.split_once('.')? {
            ("convolution", p) => Some(format!("{conv}.{p}")),
            ("normalization", p) => Some(format!("{bn}.{p}")),
            _ => None,
        };
        if let Some(rest) = name.strip_prefix("embedder.embedder.") {
            return conv_bn(rest, "conv1", "bn1");
        }
        let (stage, rest) = name.strip_prefix("encoder.stages.")?.split_once('.')?;
        let (i, rest) = rest.strip_prefix("layers.")?.split_once('.')?;
        let block = format!("layer{}.{i}", stage.parse::<usize>().ok()? + 1);
        if let Some(rest) = rest.strip_prefix("shortcut.") {
            return conv_bn(
                rest,
                &format!("{block}.downsample.0"),
                &format!("{block}.downsample.1"),
            );
        }
        let (j, rest) = rest.strip_prefix("layer.")?.split_once('.')?;
        let j = j.parse::<usize>().ok()? + 1;
        conv_bn(rest, &format!("{block}.conv{j}"), &format!("{block}.bn{j}"))
    }

    /// The stem's taps: its convolution, BatchNorm, activation and max pool.
    fn stem(self) -> [String; 4] {
        match self {
            Layout::Torchvision => ["conv1", "bn1", "relu", "maxpool"].map(String::from),
            Layout::Transformers { prefix } => [
                "embedder.embedder.convolution",
                "embedder.embedder.normalization",
                "embedder.embedder",
                "embedder",
            ]
            .map(|n| format!("{prefix}{n}")),
        }
    }

    /// Stage `s` (from 0), or its block `b`.
    fn stage(self, s: usize, b: Option<usize>) -> String {
        match (self, b) {
            (Layout::Torchvision, None) => format!("layer{}", s + 1),
            (Layout::Torchvision, Some(b)) => format!("layer{}.{b}", s + 1),
            (Layout::Transformers { prefix }, None) => format!("{prefix}encoder.stages.{s}"),
            (Layout::Transformers { prefix }, Some(b)) => {
                format!("{prefix}encoder.stages.{s}.layers.{b}")
            }
        }
    }

    fn pool(self) -> String {
        match self {
            Layout::Torchvision => "avgpool".into(),
            Layout::Transformers { prefix } => format!("{prefix}pooler"),
        }
    }

    fn head(self) -> &'static str {
        match self {
            Layout::Torchvision => "fc",
            Layout::Transformers { .. } => "classifier",
        }
    }
}

/// Where a ResNet downsamples, which its weights do not say.
#[derive(Clone, Copy, Debug)]
struct Strides {
    /// The first stage's stride: 1 after the stem's max pool, 2 in transformers' ResNets
    /// saved with `downsample_in_first_stage`.
    first_stage: usize,
    /// A bottleneck strides its first 1x1 convolution (ResNet v1, transformers'
    /// `downsample_in_bottleneck`) rather than its 3x3 (v1.5: torchvision's, microsoft/resnet-*).
    in_first_conv: bool,
}

impl Strides {
    /// From transformers' config.json; torchvision's where it says nothing. Errors on an
    /// activation other than ReLU, the one this network runs.
    fn of(w: &Weights, config: Option<&serde_json::Value>) -> Result<Self> {
        let flag = |key: &str| {
            config
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        };
        w.check_hidden_act(config, "relu", "ResNet")?;
        Ok(Self {
            first_stage: if flag("downsample_in_first_stage") {
                2
            } else {
                1
            },
            in_first_conv: flag("downsample_in_bottleneck"),
        })
    }
}

/// A convolution of the network, padded by k / 2 as every torchvision ResNet convolution is.
struct Conv(nn::Conv);

impl Conv {
    fn new(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        relu: bool,
        dev: &Device,
        dt: DType,
    ) -> Result<Self> {
        let k = weight.dim(2)?;
        Ok(Self(nn::Conv::new(
            weight,
            bias,
            (stride, k / 2),
            relu,
            dev,
            dt,
        )?))
    }

    /// Convolution `conv` with BatchNorm `bn` folded into its weights and bias.
    fn folded(
        w: &Weights,
        conv: &str,
        bn: &str,
        stride: usize,
        relu: bool,
        dev: &Device,
        dt: DType,
    ) -> Result<Self> {
        let weight = w.get(&format!("{conv}.weight"), None)?;
        let (scale, shift) = w.batch_norm(bn, weight.dim(0)?)?;
        let weight = weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
        Self::new(weight, shift, stride, relu, dev, dt)
    }

    /// The same weights as a convolution in `groups` groups (ResNeXt's 3x3s).
    fn grouped(self, groups: usize) -> Self {
        Self(self.0.grouped(groups))
    }

    /// Channels-last on CUDA with cuDNN (`nn::Conv::channels_last`): every convolution, the
    /// stem's too, whose 3-channel input is the one copy into NHWC (cuDNN transposed it there
    /// and back inside an NCHW stem) and whose output our max pool reads in place.
    fn channels_last(self) -> Result<Self> {
        Ok(Self(self.0.channels_last()?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }

    /// `relu(conv(x) + residual)`: the end of a block, fused on the CPU.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.0.forward_residual(x, residual)
    }
}

/// A block's projection shortcut: torchvision's strided 1x1 convolution (`downsample.0`, its
/// BatchNorm `downsample.1`), or timm's "average down" (`avg_down`: `downsample.0` a 2x2
/// average pool where the block strides, then the 1x1 convolution `downsample.1` of stride 1,
/// BatchNorm `downsample.2`).
struct Downsample {
    avg_pool: bool,
    conv: Conv,
}

impl Downsample {
    fn load(
        w: &Weights,
        block: &str,
        stride: usize,
        dev: &Device,
        dt: DType,
    ) -> Result<Option<Self>> {
        let p = format!("{block}.downsample");
        let (avg_pool, conv, bn, stride) = if w.contains(&format!("{p}.0.weight")) {
            (false, format!("{p}.0"), format!("{p}.1"), stride)
        } else if w.contains(&format!("{p}.1.weight")) {
            (stride > 1, format!("{p}.1"), format!("{p}.2"), 1)
        } else {
            return Ok(None);
        };
        let conv = Conv::folded(w, &conv, &bn, stride, false, dev, dt)?.channels_last()?;
        Ok(Some(Self { avg_pool, conv }))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.avg_pool {
            self.conv.forward(&avg_pool_2x2_ceil(x)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// PyTorch's `AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`: at an odd size the
/// last row or column of windows overhangs the map and averages the values inside it only.
fn avg_pool_2x2_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ph, pw) = (h % 2, w % 2);
    let padded = x.pad_with_zeros(2, 0, ph)?.pad_with_zeros(3, 0, pw)?;
    let mean = padded.avg_pool2d(2)?;
    if ph == 0 && pw == 0 {
        return Ok(mean);
    }
    // avg_pool2d divided every window by 4; an overhanging one covers 2 values, or 1.
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let covered = |i: usize, n: usize, odd: usize| if odd == 1 && i == n - 1 { 1.0 } else { 2.0 };
    let scale: Vec<f32> = (0..oh)
        .flat_map(|i| (0..ow).map(move |j| 4.0 / (covered(i, oh, ph) * covered(j, ow, pw))))
        .collect();
    let scale = Tensor::from_vec(scale, (1, 1, oh, ow), x.device())?.to_dtype(x.dtype())?;
    Ok(mean.broadcast_mul(&scale)?)
}

struct Block {
    /// All but the last apply their ReLU; the last adds the residual, then applies it.
    convs: Vec<Conv>,
    downsample: Option<Downsample>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (last, first) = self.convs.split_last().expect("blocks have convs");
        let mut h = x.clone();
        for c in first {
            h = c.forward(&h)?;
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        last.forward_residual(&h, &identity)
    }
}

pub struct ResNet {
    info: NetInfo,
    /// A deep stem's convolutions before its last (`conv1.0` and `conv1.3`, each with its
    /// BatchNorm and ReLU); none in the one-convolution stem.
    deep_stem: Vec<Conv>,
    /// conv1 (a deep stem's last convolution) alone, then bn1 as an affine map: used only when
    /// conv1 or bn1 is tapped.
    conv1: Conv,
    bn1_scale: Tensor,
    bn1_shift: Tensor,
    /// conv1 + bn1 + relu fused: the usual path.
    stem: Conv,
    stages: Vec<Vec<Block>>,
    fc: Option<(Tensor, Tensor)>,
    /// The stem's max pool (an identity in CIFAR ResNets).
    pool: bool,
}

fn conv_out(size: usize, k: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - k) / stride + 1
}

impl ResNet {
    /// From weights under torchvision's names, its layers listed under them.
    pub fn load(w: &Weights, input: usize, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_as(w, None, Layout::Torchvision, input, device, dtype)
    }

    /// From weights under torchvision's names (`layout` says which names the checkpoint's
    /// layers go by) and, for a transformers ResNet, its config.json.
    pub(super) fn load_as(
        w: &Weights,
        config: Option<&serde_json::Value>,
        layout: Layout,
        input: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let bottleneck = w.contains("layer1.0.conv3.weight");
        let strides = Strides::of(w, config)?;
        // timm's anti-aliased ResNets blur before each stride with a filter that is not saved:
        // their weights are a plain ResNet's, and only the architecture's name tells.
        if let Some(arch) = config
            .and_then(|c| c.get("architecture"))
            .and_then(|a| a.as_str())
            .filter(|a| {
                ["resnetaa", "resnextaa", "resnetblur"]
                    .iter()
                    .any(|v| a.contains(v))
            })
        {
            return Err(w.mismatch(format!(
                "config.json names {arch}, an anti-aliased ResNet (blur pooling before each stride), which dnd does not run"
            )));
        }
        // timm's deep stem: three 3x3 convolutions (the first strided), BatchNorm and ReLU
        // between them, its last one's BatchNorm `bn1`.
        let deep = w.contains("conv1.0.weight");
        let (deep_stem, conv1) = if deep {
            let convs = [("conv1.0", "conv1.1", 2), ("conv1.3", "conv1.4", 1)]
                .into_iter()
                .map(|(c, b, st)| Conv::folded(w, c, b, st, true, device, dtype)?.channels_last())
                .collect::<Result<Vec<_>>>()?;
            (convs, "conv1.6")
        } else if w.contains("conv1.weight") {
            (Vec::new(), "conv1")
        } else {
            return Err(w.mismatch(
                "no conv1.weight (torchvision's stem) or conv1.0.weight (timm's deep stem)".into(),
            ));
        };
        let stem_w = w.get(&format!("{conv1}.weight"), None)?;
        let stem_c = stem_w.dim(0)?;
        // A 3x3 stem is the CIFAR ResNet's (torchvision's or timm's with conv1 replaced by a 3x3
        // convolution of stride 1 and the max pool by an identity, as CIFAR checkpoints are
        // made): the weights cannot say otherwise, and the 7x7 stem's stride and pool would
        // shrink a 32 px image to 8 px before the first block.
        let cifar = !deep && stem_w.dim(2)? == 3;
        if cifar {
            tracing::info!("conv1 is 3x3: the CIFAR stem (stride 1, no max pool)");
        }
        let stem_stride = if cifar || deep { 1 } else { 2 };
        let (scale, shift) = w.batch_norm("bn1", stem_c)?;
        let conv1_alone = Conv::new(
            stem_w.clone(),
            shift.zeros_like()?,
            stem_stride,
            false,
            device,
            dtype,
        )?;
        let stem =
            Conv::folded(w, conv1, "bn1", stem_stride, true, device, dtype)?.channels_last()?;
        let mut stages = Vec::new();
        let mut depths = Vec::new();
        // Channels into the next convolution: a grouped one's (ResNeXt's) filters see a
        // fraction of them.
        let mut c_in = stem_c;
        let mut groups = 1;
        for s in 1..=4 {
            let mut blocks = Vec::new();
            while w.contains(&format!("layer{s}.{}.conv1.weight", blocks.len())) {
                let b = blocks.len();
                let p = format!("layer{s}.{b}");
                let stride = match (s, b) {
                    (1, 0) => strides.first_stage,
                    (_, 0) => 2,
                    _ => 1,
                };
                let n_convs = if bottleneck { 3 } else { 2 };
                // torchvision puts the stride on the 3x3 conv: conv2 in bottlenecks, conv1 in basic blocks.
                let strided = if bottleneck && !strides.in_first_conv {
                    2
                } else {
                    1
                };
                let convs = (1..=n_convs)
                    .map(|i| {
                        let st = if i == strided { stride } else { 1 };
                        let (c, b) = (format!("{p}.conv{i}"), format!("{p}.bn{i}"));
                        let dims = w.dims(&format!("{c}.weight"))?;
                        // Filters seeing a fraction of the channels: a grouped convolution.
                        let g = match dims.as_slice() {
                            &[c_out, per_group, _, _]
                                if per_group > 0
                                    && c_in % per_group == 0
                                    && c_out % (c_in / per_group) == 0 =>
                            {
                                c_in / per_group
                            }
                            _ => {
                                return Err(w.mismatch(format!(
                                    "{c}.weight has shape {dims:?}, which no convolution of {c_in} input channels has"
                                )))
                            }
                        };
                        groups = groups.max(g);
                        c_in = dims[0];
                        Conv::folded(w, &c, &b, st, true, device, dtype)?
                            .grouped(g)
                            .channels_last()
                    })
                    .collect::<Result<Vec<_>>>()?;
                let downsample = Downsample::load(w, &p, stride, device, dtype)?;
                blocks.push(Block { convs, downsample });
            }
            if blocks.is_empty() {
                return Err(w.mismatch(format!(
                    "stage layer{s} has no blocks (no layer{s}.0.conv1.weight)"
                )));
            }
            depths.push(blocks.len());
            stages.push(blocks);
        }
        let fc = if w.contains("fc.weight") {
            Some((
                w.get("fc.weight", None)?
                    .to_device(device)?
                    .to_dtype(dtype)?,
                w.get("fc.bias", None)?.to_device(device)?.to_dtype(dtype)?,
            ))
        } else {
            None
        };
        let depth = match (bottleneck, depths.as_slice()) {
            (false, [2, 2, 2, 2]) => "18",
            (false, [3, 4, 6, 3]) => "34",
            (true, [3, 4, 6, 3]) => "50",
            (true, [3, 4, 23, 3]) => "101",
            (true, [3, 8, 36, 3]) => "152",
            _ => "",
        };
        let mut arch = if groups > 1 {
            // torchvision's and timm's names: groups x each group's width in the first stage.
            let width = stages[0][0].convs[1].0.out_channels() / groups;
            format!("resnext{depth}_{groups}x{width}d")
        } else {
            format!("resnet{depth}")
        };
        arch += &format!(
            " ({} blocks {depths:?}",
            if bottleneck { "bottleneck" } else { "basic" }
        );
        if deep {
            arch += ", deep stem";
        }
        if stages
            .iter()
            .flatten()
            .any(|b| b.downsample.as_ref().is_some_and(|d| d.avg_pool))
        {
            arch += ", average-pool shortcuts";
        }
        arch += ")";

        // Output shapes at this input size.
        let mut layers = Vec::new();
        let spatial = |name: &str, c: usize, hw: usize| LayerInfo {
            name: name.to_string(),
            neurons: c,
            shape: vec![c, hw, hw],
            kind: LayerKind::Spatial,
        };
        let k = stem_w.dim(2)?;
        let mut hw = if deep {
            conv_out(input, 3, 2, 1)
        } else {
            input
        };
        hw = conv_out(hw, k, stem_stride, k / 2);
        let [conv, bn, act, pool] = layout.stem();
        for n in [conv, bn, act] {
            layers.push(spatial(&n, stem_c, hw));
        }
        if !cifar {
            hw = conv_out(hw, 3, 2, 1);
        }
        layers.push(spatial(&pool, stem_c, hw));
        let mut channels = stem_c;
        for (s, blocks) in stages.iter().enumerate() {
            // A stride-2 1x1 convolution gives the size a padded 3x3 one does.
            let stride = if s == 0 { strides.first_stage } else { 2 };
            hw = conv_out(hw, 3, stride, 1);
            channels = blocks[0]
                .convs
                .last()
                .expect("blocks have convs")
                .0
                .out_channels();
            layers.push(spatial(&layout.stage(s, None), channels, hw));
            for b in 0..blocks.len() {
                layers.push(spatial(&layout.stage(s, Some(b)), channels, hw));
            }
        }
        layers.push(LayerInfo {
            name: layout.pool(),
            neurons: channels,
            shape: vec![channels],
            kind: LayerKind::Vector,
        });
        if let Some((fw, _)) = &fc {
            let classes = fw.dim(0)?;
            if fw.dim(1)? != channels {
                return Err(w.mismatch(format!(
                    "fc.weight takes {} features but layer4 gives {channels}",
                    fw.dim(1)?
                )));
            }
            layers.push(LayerInfo {
                name: layout.head().into(),
                neurons: classes,
                shape: vec![classes],
                kind: LayerKind::Vector,
            });
        }
        Ok(Self {
            info: NetInfo {
                architecture: arch,
                layers,
                device: device.clone(),
                dtype,
            },
            deep_stem,
            conv1: conv1_alone,
            stem,
            bn1_scale: scale
                .reshape((1, (), 1, 1))?
                .to_device(device)?
                .to_dtype(dtype)?,
            bn1_shift: shift
                .reshape((1, (), 1, 1))?
                .to_device(device)?
                .to_dtype(dtype)?,
            stages,
            fc,
            pool: !cifar,
        })
    }
}

impl TargetNetwork for ResNet {
    fn info(&self) -> &NetInfo {
        &self.info
    }

    fn forward(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        let mut rec = Recorder::new(taps);
        let mut x = x.to_device(&self.info.device)?.to_dtype(self.info.dtype)?;
        for c in &self.deep_stem {
            x = c.forward(&x)?;
        }
        let mut h = if taps.iter().any(|&t| t < 2) {
            // conv1 and bn1 are observable only with BatchNorm kept apart.
            let mut h = self.conv1.forward(&x)?;
            if rec.record(0, &h) {
                return rec.finish();
            }
            h = h
                .broadcast_mul(&self.bn1_scale)?
                .broadcast_add(&self.bn1_shift)?;
            if rec.record(1, &h) {
                return rec.finish();
            }
            h.relu()?
        } else {
            self.stem.forward(&x)?
        };
        if rec.record(2, &h) {
            return rec.finish();
        }
        if self.pool {
            h = stem_pool(&h)?;
        }
        if rec.record(3, &h) {
            return rec.finish();
        }
        // Layer list order: the stage entry `layerN`, then its blocks `layerN.i`.
        let mut idx = 4;
        for blocks in &self.stages {
            let stage_idx = idx;
            for (b, block) in blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if rec.record(stage_idx + 1 + b, &h) {
                    return rec.finish();
                }
            }
            if rec.record(stage_idx, &h) {
                return rec.finish();
            }
            idx += 1 + blocks.len();
        }
        h = h.mean((2, 3))?;
        if rec.record(idx, &h) {
            return rec.finish();
        }
        if let Some((w, b)) = &self.fc {
            h = linear(&h, w, Some(b))?;
            rec.record(idx + 1, &h);
        }
        rec.finish()
    }
}

/// The stem's 3x3 max pool, stride 2, padding 1, of `h` after its ReLU (values >= 0).
pub(crate) fn stem_pool(h: &Tensor) -> candle_core::Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        h.contiguous()?.apply_op1_no_bwd(&MaxPool3x3s2)
    } else if let Some(pooled) = pool_channels_last(h) {
        pooled
    } else {
        // Inputs are >= 0 after ReLU, so zero padding equals PyTorch's -inf padding here.
        h.pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)
    }
}

/// The stem's pool by our CUDA kernel where the stem left its output channels-last (cuDNN
/// builds): read in place, where candle's pool would copy it to NCHW and back. None elsewhere.
#[cfg(feature = "cuda")]
fn pool_channels_last(h: &Tensor) -> Option<candle_core::Result<Tensor>> {
    let nhwc = h.rank() == 4 && h.stride()[1] == 1 && h.dim(1).is_ok_and(|c| c > 1);
    (h.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::MaxPool) && nhwc)
        .then(|| crate::gpu_ops::max_pool_channels_last(h, 3, 2, 1))
}

#[cfg(not(feature = "cuda"))]
fn pool_channels_last(_: &Tensor) -> Option<candle_core::Result<Tensor>> {
    None
}

/// Random weights with torchvision names and shapes for a standard ResNet (`depth` 18, 34, 50,
/// 101 or 152), for benchmarks that must run without downloading a checkpoint.
pub fn random_resnet_weights(depth: usize, classes: usize) -> Result<HashMap<String, Tensor>> {
    let (bottleneck, blocks): (bool, [usize; 4]) = match depth {
        18 => (false, [2, 2, 2, 2]),
        34 => (false, [3, 4, 6, 3]),
        50 => (true, [3, 4, 6, 3]),
        101 => (true, [3, 4, 23, 3]),
        152 => (true, [3, 8, 36, 3]),
        _ => return Err(candle_core::Error::Msg(format!("no standard ResNet-{depth}")).into()),
    };
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    let conv = |m: &mut HashMap<String, Tensor>,
                name: &str,
                cout: usize,
                cin: usize,
                k: usize|
     -> Result<()> {
        let std = (2.0 / (cin * k * k) as f64).sqrt();
        m.insert(
            format!("{name}.weight"),
            Tensor::randn(0f32, std as f32, (cout, cin, k, k), &dev)?,
        );
        Ok(())
    };
    let bn = |m: &mut HashMap<String, Tensor>, name: &str, c: usize| -> Result<()> {
        m.insert(
            format!("{name}.weight"),
            Tensor::rand(0.5f32, 1.0, c, &dev)?,
        );
        m.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.1, c, &dev)?);
        m.insert(
            format!("{name}.running_mean"),
            Tensor::randn(0f32, 0.1, c, &dev)?,
        );
        m.insert(
            format!("{name}.running_var"),
            Tensor::rand(0.5f32, 1.5, c, &dev)?,
        );
        Ok(())
    };
    conv(&mut m, "conv1", 64, 3, 7)?;
    bn(&mut m, "bn1", 64)?;
    let expansion = if bottleneck { 4 } else { 1 };
    let mut cin = 64;
    for (s, &n) in blocks.iter().enumerate() {
        let planes = 64 << s;
        for b in 0..n {
            let p = format!("layer{}.{b}", s + 1);
            if bottleneck {
                conv(&mut m, &format!("{p}.conv1"), planes, cin, 1)?;
                conv(&mut m, &format!("{p}.conv2"), planes, planes, 3)?;
                conv(&mut m, &format!("{p}.conv3"), planes * 4, planes, 1)?;
            } else {
                conv(&mut m, &format!("{p}.conv1"), planes, cin, 3)?;
                conv(&mut m, &format!("{p}.conv2"), planes, planes, 3)?;
            }
            for i in 1..=(if bottleneck { 3 } else { 2 }) {
                let c = if i == 3 { planes * 4 } else { planes };
                bn(&mut m, &format!("{p}.bn{i}"), c)?;
            }
            if b == 0 && (s > 0 || cin != planes * expansion) {
                conv(
                    &mut m,
                    &format!("{p}.downsample.0"),
                    planes * expansion,
                    cin,
                    1,
                )?;
                bn(&mut m, &format!("{p}.downsample.1"), planes * expansion)?;
            }
            cin = planes * expansion;
        }
    }
    m.insert(
        "fc.weight".into(),
        Tensor::randn(0f32, 0.01, (classes, cin), &dev)?,
    );
    m.insert("fc.bias".into(), Tensor::zeros(classes, DType::F32, &dev)?);
    Ok(m)
}
