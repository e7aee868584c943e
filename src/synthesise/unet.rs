//! Stable Diffusion's denoiser, diffusers' `UNet2DConditionModel` as SD 1.x and 2.x use it
//! (`CrossAttnDownBlock2D` / `DownBlock2D` and their up mirrors, `UNetMidBlock2DCrossAttn`),
//! built from `unet/config.json` with diffusers' weight names. Ours rather than
//! candle-transformers' so that its convolutions and GroupNorms take our fused CPU kernels, its
//! attention runs in pieces small enough for candle's CUDA softmax (which overflows above 2^31
//! scores: SD 1.x at 512 px from 17 rows), any group count works, and GPU kernels of our own
//! have a place to go.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::blocks::{Norms, ResnetBlock};
use crate::nn::{self, Conv, GroupNorm, LayerNorm, Linear};
use crate::Result;

fn d_true() -> bool {
    true
}
fn d_groups() -> usize {
    32
}
fn d_one() -> serde_json::Value {
    serde_json::json!(1)
}
fn d_padding() -> usize {
    1
}
fn d_scale() -> f64 {
    1.0
}
fn d_eps() -> f64 {
    1e-5
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct Config {
    in_channels: usize,
    out_channels: usize,
    pub sample_size: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    layers_per_block: usize,
    #[serde(default)]
    attention_head_dim: Option<serde_json::Value>,
    #[serde(default)]
    num_attention_heads: Option<serde_json::Value>,
    cross_attention_dim: usize,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default = "d_groups")]
    norm_num_groups: usize,
    #[serde(default = "d_eps")]
    norm_eps: f64,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "d_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "d_padding")]
    downsample_padding: usize,
    #[serde(default = "d_scale")]
    mid_block_scale_factor: f64,
    #[serde(default = "d_one")]
    transformer_layers_per_block: serde_json::Value,
    // Features of other UNets, refused with the reason when set.
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    only_cross_attention: serde_json::Value,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    mid_block_type: Option<String>,
    #[serde(default)]
    time_embedding_type: Option<String>,
    #[serde(default)]
    conv_in_kernel: Option<usize>,
    #[serde(default)]
    conv_out_kernel: Option<usize>,
}

/// One value per block, from a number or a list.
fn per_block(v: &serde_json::Value, n: usize) -> Option<Vec<usize>> {
    match v {
        serde_json::Value::Number(x) => Some(vec![x.as_u64()? as usize; n]),
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect(),
        _ => None,
    }
}

/// The checked shape of a UNet.
pub(super) struct Plan {
    heads: Vec<usize>,
    layers: Vec<usize>,
    cross: Vec<bool>,
}

impl Config {
    /// What SD 1.x/2.x UNets have, checked; anything else is refused with the reason.
    pub(super) fn plan(&self) -> std::result::Result<Plan, String> {
        if self.addition_embed_type.is_some() || self.class_embed_type.is_some() {
            return Err("UNets with added/class embeddings (SDXL and kin) are not supported; use an SD 1.x or 2.x checkpoint".into());
        }
        let unsupported = [
            (
                // false, or one false per block
                match &self.only_cross_attention {
                    serde_json::Value::Null | serde_json::Value::Bool(false) => false,
                    serde_json::Value::Array(a) => a.iter().any(|v| v != &serde_json::json!(false)),
                    _ => true,
                },
                "only_cross_attention",
            ),
            (self.dual_cross_attention, "dual_cross_attention"),
            (
                self.resnet_time_scale_shift
                    .as_deref()
                    .is_some_and(|s| s != "default"),
                "resnet_time_scale_shift other than \"default\"",
            ),
            (
                self.mid_block_type
                    .as_deref()
                    .is_some_and(|s| s != "UNetMidBlock2DCrossAttn"),
                "a mid block other than UNetMidBlock2DCrossAttn",
            ),
            (
                self.time_embedding_type
                    .as_deref()
                    .is_some_and(|s| s != "positional"),
                "a time embedding other than \"positional\"",
            ),
            (
                self.conv_in_kernel.is_some_and(|k| k != 3)
                    || self.conv_out_kernel.is_some_and(|k| k != 3),
                "conv_in/conv_out kernels other than 3",
            ),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(bad, _)| *bad) {
            return Err(format!(
                "{what} is not supported (SD 1.x/2.x UNets have none)"
            ));
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        // diffusers' legacy naming: attention_head_dim holds head counts unless
        // num_attention_heads is given.
        let heads = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .map_or(Some(vec![8; n]), |v| per_block(v, n))
            .ok_or("attention_head_dim is neither a number nor a list")?;
        let layers = per_block(&self.transformer_layers_per_block, n)
            .ok_or("transformer_layers_per_block is neither a number nor a list")?;
        if heads.len() != n || layers.len() != n || self.down_block_types.len() != n {
            return Err("block lists of different lengths".into());
        }
        let cross = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(format!("block type {other} is not supported")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mirrored: Vec<String> = self
            .down_block_types
            .iter()
            .rev()
            .map(|t| t.replace("Down", "Up"))
            .collect();
        if mirrored != self.up_block_types {
            return Err(format!(
                "up blocks {:?} do not mirror down blocks {:?}",
                self.up_block_types, self.down_block_types
            ));
        }
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "{c} channels do not split into {} groups",
                    self.norm_num_groups
                ));
            }
            // Heads matter where attention runs: the cross-attention levels, and the middle
            // block at the last level's width.
            if (cross[i] || i == n - 1) && (h == 0 || c % h != 0) {
                return Err(format!("{c} channels do not split into {h} heads"));
            }
        }
        Ok(Plan {
            heads,
            layers,
            cross,
        })
    }
}

/// diffusers' `Attention` as the transformer blocks use it: no biases on q/k/v, a bias on the
/// output projection. q, k and v are stacked where they read the same input (one product
/// instead of three or two): all three in self-attention (`attn1`), k and v from the context
/// in cross-attention (`attn2`).
enum Attention {
    Own {
        qkv: Linear,
        rest: AttnRest,
    },
    Cross {
        q: Linear,
        kv: Linear,
        rest: AttnRest,
    },
}

/// What self- and cross-attention share once q, k and v are split into heads.
struct AttnRest {
    out: Linear,
    heads: usize,
    upcast: bool,
}

/// The shape of an attention layer: its width, its context's width (its own for
/// self-attention), heads, and whether scores are taken in f32.
#[derive(Clone, Copy)]
struct AttnShape {
    dim: usize,
    context: usize,
    heads: usize,
    upcast: bool,
}

impl Attention {
    /// Self-attention reads `s.dim` wide inputs; cross-attention `s.context` wide contexts.
    fn load(vb: &VarBuilder, s: AttnShape, cross: bool) -> candle_core::Result<Self> {
        let AttnShape {
            dim,
            context,
            heads,
            upcast,
        } = s;
        let q = Linear::load(&vb.pp("to_q"), dim, dim, false)?;
        let width = if cross { context } else { dim };
        let k = Linear::load(&vb.pp("to_k"), width, dim, false)?;
        let v = Linear::load(&vb.pp("to_v"), width, dim, false)?;
        let rest = AttnRest {
            out: Linear::load(&vb.pp("to_out.0"), dim, dim, true)?,
            heads,
            upcast,
        };
        Ok(if cross {
            Self::Cross {
                q,
                kv: Linear::stacked(&[k, v])?,
                rest,
            }
        } else {
            Self::Own {
                qkv: Linear::stacked(&[q, k, v])?,
                rest,
            }
        })
    }

    /// `residual + attention(x, context)`: keys and values from `context` in cross-attention,
    /// from `x` itself in self-attention (which reads only `x`); the residual added in the
    /// output projection's epilogue.
    fn forward(&self, x: &Tensor, context: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Self::Own { qkv, rest } => {
                let [q, k, v] = nn::split_stacked_heads(&qkv.forward(x)?, rest.heads)?;
                rest.forward(q, k, v, residual)
            }
            Self::Cross { q, kv, rest } => {
                let [k, v] = nn::split_stacked_heads(&kv.forward(context)?, rest.heads)?;
                let q = nn::split_heads(&q.forward(x)?, rest.heads)?;
                rest.forward(q, k, v, residual)
            }
        }
    }
}

impl AttnRest {
    fn forward(&self, q: Tensor, k: Tensor, v: Tensor, residual: &Tensor) -> Result<Tensor> {
        let dtype = q.dtype();
        let (q, k, v) = if self.upcast && !nn::attention_is_fused(&q, &k, &v) {
            (
                q.to_dtype(DType::F32)?,
                k.to_dtype(DType::F32)?,
                v.to_dtype(DType::F32)?,
            )
        } else {
            (q, k, v)
        };
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let y = nn::attention(&q, &k, &v, scale, None)?.to_dtype(dtype)?;
        self.out.forward_residual(&nn::merge_heads(&y)?, residual)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention to the text, GEGLU
/// feed-forward, each behind a LayerNorm and around a residual.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    geglu: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    /// `s.context`: the cross-attention's context width.
    fn load(vb: &VarBuilder, s: AttnShape) -> candle_core::Result<Self> {
        let dim = s.dim;
        let inner = 4 * dim;
        Ok(Self {
            norm1: nn::layer_norm(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), s, false)?,
            norm2: nn::layer_norm(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), s, true)?,
            norm3: nn::layer_norm(&vb.pp("norm3"), dim, 1e-5)?,
            geglu: Linear::load(&vb.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::load(&vb.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    /// With `expand` > 1, `x` holds the rows that `context`'s blocks of rows share: the
    /// self-attention, which sees no context, runs on them once, and its output is repeated
    /// `expand` times before the cross-attention.
    fn forward(&self, x: &Tensor, context: &Tensor, expand: usize) -> Result<Tensor> {
        use candle_core::Module;
        let h = self.norm1.forward(x)?;
        let x = nn::repeat_rows(&self.attn1.forward(&h, &h, x)?, expand)?;
        let x = self.attn2.forward(&self.norm2.forward(&x)?, context, &x)?;
        let h = self.geglu.forward_geglu(&self.norm3.forward(&x)?)?;
        self.ff_out.forward_residual(&h, &x)
    }
}

/// diffusers' `Transformer2DModel` over a feature map: GroupNorm, projection in, transformer
/// blocks over the H*W tokens, projection out, residual. The projections are linear layers
/// (SD 2.x, `use_linear_projection`) or 1x1 convolutions (SD 1.x): the same map, taken from
/// whichever shape the checkpoint holds.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn load(
        vb: &VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        cfg: &Config,
    ) -> candle_core::Result<Self> {
        let blocks = (0..layers)
            .map(|i| {
                TransformerBlock::load(
                    &vb.pp(format!("transformer_blocks.{i}")),
                    AttnShape {
                        dim: channels,
                        context: cfg.cross_attention_dim,
                        heads,
                        upcast: cfg.upcast_attention,
                    },
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), cfg.norm_num_groups, channels, 1e-6)?,
            proj_in: Linear::load_pointwise(&vb.pp("proj_in"), channels, channels)?,
            blocks,
            proj_out: Linear::load_pointwise(&vb.pp("proj_out"), channels, channels)?,
        })
    }

    /// `expand` as `TransformerBlock::forward`'s (the first block's), the map's residual
    /// repeated to match.
    fn forward(&self, x: &Tensor, context: &Tensor, expand: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut t = self
            .proj_in
            .forward_map_to_tokens(&self.norm.forward(x, false)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(&t, context, if i == 0 { expand } else { 1 })?;
        }
        let x = nn::repeat_rows(x, expand)?;
        self.proj_out.forward_tokens_to_map(&t, (h, w), &x)
    }
}

/// One resolution level: resnets, each followed by a spatial transformer in cross-attention
/// blocks, then the resampling convolution unless it is the last level.
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    resample: Option<Conv>,
}

impl Level {
    /// Resnet `i` and its transformer; `expand` as `SpatialTransformer::forward`'s, `temb`
    /// the rows of `x`.
    fn step(
        &self,
        i: usize,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        expand: usize,
    ) -> Result<Tensor> {
        let x = self.resnets[i].forward(x, Some(temb))?;
        match self.attentions.get(i) {
            Some(a) => a.forward(&x, context, expand),
            None => Ok(x),
        }
    }
}

/// The loaded denoiser.
pub(super) struct Unet {
    conv_in: Conv,
    time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    time_1: Linear,
    time_2: Linear,
    down: Vec<Level>,
    mid: (ResnetBlock, SpatialTransformer, ResnetBlock),
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
    center_input: bool,
    downsample_padding: usize,
}

impl Unet {
    /// Loads the weights of a UNet whose config `plan` checked.
    pub(super) fn load(vb: &VarBuilder, cfg: &Config, plan: &Plan) -> candle_core::Result<Self> {
        let widths = &cfg.block_out_channels;
        let n = widths.len();
        let c0 = widths[0];
        let temb = 4 * c0;
        let norms = Norms {
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
        };
        // Every convolution but the 4-channel ends channels-last (on CUDA with cuDNN; elsewhere
        // nothing changes): the feature maps stay NHWC from the first resnet to the last, the
        // GroupNorms, time-embedding shifts, skips, upsampling and the transformers'
        // projections reading them in place, where NCHW maps cost cuDNN two transposes a
        // convolution (4.6 of the UNet's 60 ms on an H200, at 16 rows).
        let resnet = |vb: &VarBuilder, c_in, c_out, scale| {
            ResnetBlock::load(vb, (c_in, c_out), norms, Some(temb), scale)?.channels_last()
        };
        let resample = |vb: &VarBuilder, c, stride_padding| {
            Conv::load(vb, (c, c, 3), stride_padding, true)?.channels_last()
        };
        let transformer = |vb: &VarBuilder, c, level: usize| {
            SpatialTransformer::load(vb, c, plan.heads[level], plan.layers[level], cfg)
        };
        let mut down = Vec::new();
        let mut c_in = c0;
        for (i, &c) in widths.iter().enumerate() {
            let b = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    resnet(
                        &b.pp(format!("resnets.{j}")),
                        if j == 0 { c_in } else { c },
                        c,
                        1.0,
                    )
                })
                .collect::<candle_core::Result<_>>()?;
            let attentions = if plan.cross[i] {
                (0..cfg.layers_per_block)
                    .map(|j| transformer(&b.pp(format!("attentions.{j}")), c, i))
                    .collect::<candle_core::Result<_>>()?
            } else {
                Vec::new()
            };
            let resample = (i + 1 < n)
                .then(|| resample(&b.pp("downsamplers.0.conv"), c, (2, cfg.downsample_padding)))
                .transpose()?;
            down.push(Level {
                resnets,
                attentions,
                resample,
            });
            c_in = c;
        }
        let top = widths[n - 1];
        let m = vb.pp("mid_block");
        let mid = (
            resnet(&m.pp("resnets.0"), top, top, cfg.mid_block_scale_factor)?,
            transformer(&m.pp("attentions.0"), top, n - 1)?,
            resnet(&m.pp("resnets.1"), top, top, cfg.mid_block_scale_factor)?,
        );
        let mut up = Vec::new();
        let mut prev = top;
        for i in 0..n {
            // Up level i mirrors down level n-1-i; its resnets take the skips in reverse order.
            let level = n - 1 - i;
            let c = widths[level];
            let skip_last = widths[level.saturating_sub(1)];
            let b = vb.pp(format!("up_blocks.{i}"));
            let count = cfg.layers_per_block + 1;
            let resnets = (0..count)
                .map(|j| {
                    let skip = if j + 1 == count { skip_last } else { c };
                    let from = if j == 0 { prev } else { c };
                    resnet(&b.pp(format!("resnets.{j}")), from + skip, c, 1.0)
                })
                .collect::<candle_core::Result<_>>()?;
            let attentions = if plan.cross[level] {
                (0..count)
                    .map(|j| transformer(&b.pp(format!("attentions.{j}")), c, level))
                    .collect::<candle_core::Result<_>>()?
            } else {
                Vec::new()
            };
            let resample = (i + 1 < n)
                .then(|| resample(&b.pp("upsamplers.0.conv"), c, (1, 1)))
                .transpose()?;
            up.push(Level {
                resnets,
                attentions,
                resample,
            });
            prev = c;
        }
        Ok(Self {
            conv_in: Conv::load(&vb.pp("conv_in"), (cfg.in_channels, c0, 3), (1, 1), true)?,
            time_dim: c0,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            time_1: Linear::load(&vb.pp("time_embedding.linear_1"), c0, temb, true)?,
            time_2: Linear::load(&vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
            )?,
            conv_out: Conv::load(&vb.pp("conv_out"), (c0, cfg.out_channels, 3), (1, 1), true)?,
            center_input: cfg.center_input_sample,
            downsample_padding: cfg.downsample_padding,
        })
    }

    /// diffusers' sinusoidal `Timesteps` projection of `t` for `batch` rows, f32 on the CPU.
    fn time_features(&self, t: f64, batch: usize) -> Result<Tensor> {
        let half = self.time_dim / 2;
        let (mut first, mut second) = (Vec::with_capacity(half), Vec::with_capacity(half));
        // In f32 step by step, as diffusers computes it.
        let log_period = -(10000f64.ln() as f32);
        for i in 0..half {
            let exponent = log_period * i as f32 / (half as f32 - self.freq_shift as f32);
            let arg = (t as f32) * exponent.exp();
            first.push(arg.sin());
            second.push(arg.cos());
        }
        if self.flip_sin_to_cos {
            std::mem::swap(&mut first, &mut second);
        }
        first.extend(second);
        first.resize(self.time_dim, 0.0);
        let row = Tensor::from_vec(first, (1, self.time_dim), &Device::Cpu)?;
        Ok(row.repeat((batch, 1))?)
    }

    /// The noise prediction for `x` (B, C, h, w) at timestep `t`, conditioned on `context`
    /// (R x B, tokens, cross_attention_dim): each block of B context rows with all of `x`, as
    /// classifier-free guidance pairs each latent with the empty prompt and its own (R = 2).
    /// Returns (R x B, C, h, w) in the weights' dtype. Everything before the first
    /// cross-attention sees no context, so where the first level opens with one (SD 1.x and
    /// 2.x), it runs on the B rows once: the input convolution, the first resnet and the first
    /// self-attention (41 of SD 1.x's 804 GFLOP a row at 512 px; more of its time, as attention
    /// at 4096 tokens runs below the convolutions' rate).
    pub(super) fn forward(&self, x: &Tensor, t: f64, context: &Tensor) -> Result<Tensor> {
        let (b, rows) = (x.dim(0)?, context.dim(0)?);
        if b == 0 || rows % b != 0 {
            return Err(candle_core::Error::Msg(format!(
                "the UNet takes context rows in whole blocks of its {b} latents, not {rows}"
            ))
            .into());
        }
        let times = rows / b;
        let share = times > 1 && self.down.first().is_some_and(|l| !l.attentions.is_empty());
        let x = if share {
            x.clone()
        } else {
            nn::repeat_rows(x, times)?
        };
        let features = self
            .time_features(t, rows)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        let temb = self
            .time_2
            .forward(&self.time_1.forward(&features)?.silu()?)?
            .silu()?;
        let x = if self.center_input {
            ((x * 2.0)? - 1.0)?
        } else {
            x
        };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for (l, level) in self.down.iter().enumerate() {
            for i in 0..level.resnets.len() {
                h = if share && (l, i) == (0, 0) {
                    // Every row's time embedding is the same: the first b serve the shared rows.
                    let h = level.step(i, &h, &temb.narrow(0, 0, b)?, context, times)?;
                    skips[0] = nn::repeat_rows(&skips[0], times)?;
                    h
                } else {
                    level.step(i, &h, &temb, context, 1)?
                };
                skips.push(h.clone());
            }
            if let Some(conv) = &level.resample {
                if self.downsample_padding == 0 {
                    // diffusers pads right and bottom by one when the convolution has none.
                    h = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                }
                h = conv.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid.0.forward(&h, Some(&temb))?;
        h = self.mid.1.forward(&h, context, 1)?;
        h = self.mid.2.forward(&h, Some(&temb))?;
        for level in &self.up {
            for i in 0..level.resnets.len() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = nn::cat_channels(&[&h, &skip])?;
                h = level.step(i, &h, &temb, context, 1)?;
            }
            if let Some(conv) = &level.resample {
                // To the size of the skip it meets next (2x unless the input was odd-sized).
                let (_, _, sh, sw) = skips
                    .last()
                    .expect("skips left for the next level")
                    .dims4()?;
                let (_, _, hh, hw) = h.dims4()?;
                h = if (sh, sw) == (2 * hh, 2 * hw) {
                    nn::upsample_nearest(&h, 2)?
                } else {
                    h.upsample_nearest2d(sh, sw)?
                };
                h = conv.forward(&h)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(changes: serde_json::Value) -> Config {
        let mut v: serde_json::Value = serde_json::from_str(include_str!(
            "../../assets/bench/full/sd-v1-4/unet/config.json"
        ))
        .unwrap();
        for (k, x) in changes.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn plans_sd1_and_refuses_other_unets_with_the_reason() {
        let plan = config(serde_json::json!({})).plan().unwrap();
        assert_eq!(plan.heads, vec![8; 4]);
        assert_eq!(plan.cross, vec![true, true, true, false]);
        let ok = config(serde_json::json!({"only_cross_attention": [false, false, false, false]}));
        assert!(ok.plan().is_ok());
        for (change, says) in [
            (
                serde_json::json!({"addition_embed_type": "text_time"}),
                "SDXL",
            ),
            (
                serde_json::json!({"only_cross_attention": true}),
                "only_cross_attention",
            ),
            (
                serde_json::json!({"resnet_time_scale_shift": "scale_shift"}),
                "resnet_time_scale_shift",
            ),
            (
                serde_json::json!({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}),
                "mid block",
            ),
            (
                serde_json::json!({"down_block_types": ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}),
                "SimpleCrossAttnDownBlock2D",
            ),
            (serde_json::json!({"norm_num_groups": 48}), "groups"),
        ] {
            let e = config(change.clone()).plan().err().unwrap_or_default();
            assert!(e.contains(says), "{change}: {e}");
        }
    }
}
