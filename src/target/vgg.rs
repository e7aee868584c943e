//! VGG-11/13/16/19 (with or without BatchNorm) and AlexNet in torchvision's layout: a
//! `features` sequence of convolutions (BatchNorm), ReLUs and max pools, an adaptive average
//! pool, and a `classifier` of linear layers, ReLUs and dropouts. The sequence is read from the
//! weights: every convolution is followed by its ReLU, and a gap in the indices before the next
//! convolution (and the end of the sequence) is a max pool. BatchNorm is folded into the
//! convolutions at load.

use candle_core::{DType, Device, Tensor};

use super::{LayerInfo, LayerKind, NetInfo, Recorder, TargetNetwork, Weights};
use crate::error::Result;
use crate::nn::{self, Linear};

/// One convolution of `features`, its BatchNorm folded in.
struct Conv {
    /// Its place in the layer list; its BatchNorm's, ReLU's and max pool's follow.
    layer: usize,
    conv: nn::Conv,
    /// With BatchNorm: the convolution alone, for a tap between it and its BatchNorm.
    raw: Option<nn::Conv>,
    /// Whether a max pool follows its ReLU.
    pool: bool,
}

pub struct Vgg {
    info: NetInfo,
    convs: Vec<Conv>,
    /// The max pools' window (2 in VGG, 3 in AlexNet); stride 2.
    pool_window: usize,
    /// The adaptive average pool's output side.
    pooled: usize,
    /// Linear layers, each with whether a ReLU follows.
    classifier: Vec<(Linear, bool)>,
    /// The adaptive pool's place in the layer list; the classifier's layers follow.
    avgpool_layer: usize,
}

/// Whether these tensors are a torchvision VGG's or AlexNet's.
pub fn is_vgg(has: impl Fn(&str) -> bool) -> bool {
    has("features.0.weight") && (has("classifier.0.weight") || has("classifier.1.weight"))
}

fn conv_out(size: usize, k: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - k) / stride + 1
}

/// PyTorch's `AdaptiveAvgPool2d(out)` of `(N, C, H, W)`: output cell i averages input rows
/// `floor(i H / out)` to `ceil((i + 1) H / out)`, and the same for columns.
fn adaptive_avg_pool(x: &Tensor, out: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == out && w == out {
        return Ok(x.clone());
    }
    if h % out == 0 && w % out == 0 {
        return Ok(x.avg_pool2d((h / out, w / out))?);
    }
    let cells = |size: usize| -> Vec<(usize, usize)> {
        (0..out)
            .map(|i| (i * size / out, ((i + 1) * size).div_ceil(out)))
            .collect()
    };
    let rows = cells(h)
        .into_iter()
        .map(|(r0, r1)| {
            let band = x.narrow(2, r0, r1 - r0)?;
            let cols = cells(w)
                .into_iter()
                .map(|(c0, c1)| band.narrow(3, c0, c1 - c0)?.mean_keepdim((2, 3)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&cols, 3)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 2)?)
}

impl Vgg {
    pub(super) fn load(w: &Weights, input: usize, device: &Device, dtype: DType) -> Result<Self> {
        // The convolutions' indices in `features`; the module after each is BatchNorm when it
        // has running statistics.
        let conv_at: Vec<usize> = (0..256)
            .filter(|i| {
                w.contains(&format!("features.{i}.weight"))
                    && !w.contains(&format!("features.{i}.running_mean"))
            })
            .collect();
        let alexnet = w.dims("features.0.weight")?.get(2) == Some(&11);
        let pool_window = if alexnet { 3 } else { 2 };
        let mut layers = Vec::new();
        let spatial = |i: usize, c: usize, hw: usize| LayerInfo {
            name: format!("features.{i}"),
            neurons: c,
            shape: vec![c, hw, hw],
            kind: LayerKind::Spatial,
        };
        let mut convs = Vec::new();
        let (mut hw, mut c_in) = (input, 3);
        for (n, &i) in conv_at.iter().enumerate() {
            let weight = w.get(&format!("features.{i}.weight"), None)?;
            let dims = weight.dims().to_vec();
            if dims.len() != 4 || dims[1] != c_in {
                return Err(w.mismatch(format!(
                    "features.{i}.weight has shape {dims:?}, not a convolution of {c_in} channels"
                )));
            }
            let (c, k) = (dims[0], dims[2]);
            // AlexNet's first convolution: 11x11, stride 4, padding 2; every other one keeps
            // the size (padding k / 2).
            let (stride, pad) = if alexnet && n == 0 {
                (4, 2)
            } else {
                (1, k / 2)
            };
            let bias = w.get(&format!("features.{i}.bias"), Some(&[c]))?;
            let bn = format!("features.{}", i + 1);
            let batch_norm = w.contains(&format!("{bn}.running_mean"));
            let (folded_w, folded_b, raw) = if batch_norm {
                let (scale, shift) = w.batch_norm(&bn, c)?;
                let raw = nn::Conv::new(
                    weight.clone(),
                    bias.clone(),
                    (stride, pad),
                    false,
                    device,
                    dtype,
                )?
                .channels_last()?;
                (
                    weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?,
                    (bias.mul(&scale)? + shift)?,
                    Some(raw),
                )
            } else {
                (weight, bias, None)
            };
            let conv = nn::Conv::new(folded_w, folded_b, (stride, pad), false, device, dtype)?
                .channels_last()?;
            hw = conv_out(hw, k, stride, pad);
            let layer = layers.len();
            layers.push(spatial(i, c, hw));
            if batch_norm {
                layers.push(spatial(i + 1, c, hw));
            }
            let relu = i + 1 + usize::from(batch_norm);
            layers.push(spatial(relu, c, hw));
            // A gap before the next convolution, or the end of the sequence: a max pool.
            let pool = conv_at.get(n + 1).is_none_or(|&next| next > relu + 1);
            if pool {
                hw = conv_out(hw, pool_window, 2, 0);
                layers.push(spatial(relu + 1, c, hw));
            }
            convs.push(Conv {
                layer,
                conv,
                raw,
                pool,
            });
            c_in = c;
        }
        // The classifier's linear layers: VGG's at 0, 3, 6; AlexNet's at 1, 4, 6.
        let linear_at: Vec<usize> = (0..32)
            .filter(|j| w.contains(&format!("classifier.{j}.weight")))
            .collect();
        let pooled = match linear_at.first() {
            Some(j) => {
                let inputs = w.dims(&format!("classifier.{j}.weight"))?[1];
                let side = ((inputs / c_in) as f64).sqrt().round() as usize;
                if side * side * c_in != inputs {
                    return Err(w.mismatch(format!(
                        "classifier.{j}.weight takes {inputs} features, not {c_in} channels of a square map"
                    )));
                }
                side
            }
            None if alexnet => 6,
            None => 7,
        };
        let avgpool_layer = layers.len();
        layers.push(LayerInfo {
            name: "avgpool".into(),
            neurons: c_in,
            shape: vec![c_in, pooled, pooled],
            kind: LayerKind::Spatial,
        });
        let mut classifier = Vec::new();
        let mut inputs = c_in * pooled * pooled;
        let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        for (n, &j) in linear_at.iter().enumerate() {
            let weight = w.get(&format!("classifier.{j}.weight"), None)?;
            let out = weight.dim(0)?;
            if weight.dims() != [out, inputs] {
                return Err(w.mismatch(format!(
                    "classifier.{j}.weight has shape {:?}, not [outputs, {inputs}]",
                    weight.dims()
                )));
            }
            let bias = w.get(&format!("classifier.{j}.bias"), Some(&[out]))?;
            let vector = |j: usize| LayerInfo {
                name: format!("classifier.{j}"),
                neurons: out,
                shape: vec![out],
                kind: LayerKind::Vector,
            };
            layers.push(vector(j));
            let relu = n + 1 < linear_at.len();
            if relu {
                layers.push(vector(j + 1));
            }
            classifier.push((Linear::new(on(weight)?, Some(on(bias)?)), relu));
            inputs = out;
        }
        let depth = convs.len() + classifier.len();
        let arch = match (alexnet, depth) {
            (true, _) => "alexnet".to_string(),
            (false, d) => format!("vgg{d}"),
        };
        let bn = if convs.iter().any(|c| c.raw.is_some()) {
            "_bn"
        } else {
            ""
        };
        Ok(Self {
            info: NetInfo {
                architecture: format!("{arch}{bn} ({} convolutions)", convs.len()),
                layers,
                device: device.clone(),
                dtype,
            },
            convs,
            pool_window,
            pooled,
            classifier,
            avgpool_layer,
        })
    }
}

impl TargetNetwork for Vgg {
    fn info(&self) -> &NetInfo {
        &self.info
    }

    fn forward(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        let mut rec = Recorder::new(taps);
        let mut h = x.to_device(&self.info.device)?.to_dtype(self.info.dtype)?;
        for c in &self.convs {
            if let Some(raw) = c.raw.as_ref().filter(|_| rec.wants(c.layer)) {
                if rec.record(c.layer, &raw.forward(&h)?) {
                    return rec.finish();
                }
            }
            h = c.conv.forward(&h)?;
            // The convolution's output, or its BatchNorm's.
            let pre_relu = c.layer + usize::from(c.raw.is_some());
            if rec.record(pre_relu, &h) {
                return rec.finish();
            }
            h = h.relu()?;
            if rec.record(pre_relu + 1, &h) {
                return rec.finish();
            }
            if c.pool {
                h = h.max_pool2d_with_stride(self.pool_window, 2)?;
                if rec.record(pre_relu + 2, &h) {
                    return rec.finish();
                }
            }
        }
        h = adaptive_avg_pool(&h, self.pooled)?;
        if rec.record(self.avgpool_layer, &h) {
            return rec.finish();
        }
        // torch.flatten(x, 1): channel-major.
        h = h.contiguous()?.flatten_from(1)?;
        let mut idx = self.avgpool_layer + 1;
        for (linear, relu) in &self.classifier {
            h = linear.forward(&h)?;
            if rec.record(idx, &h) {
                return rec.finish();
            }
            idx += 1;
            if *relu {
                h = h.relu()?;
                if rec.record(idx, &h) {
                    return rec.finish();
                }
                idx += 1;
            }
        }
        rec.finish()
    }
}
