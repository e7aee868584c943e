//! A tiny autoencoder's decoder (diffusers' `AutoencoderTiny`, e.g. `madebyollin/taesd`) in
//! place of Stable Diffusion's VAE: plain 3x3 convolutions, ReLU and nearest upsampling, far
//! cheaper than the VAE's decoder (no GroupNorm, no attention, 64 channels). Its images are
//! close to the VAE's but not the same, so it is a setting (`decoder = tiny`), off by default.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::hub::ResolvedModel;
use crate::nn::{self, Conv};
use crate::Result;

#[derive(Debug, Deserialize)]
struct Config {
    latent_channels: usize,
    out_channels: usize,
    decoder_block_out_channels: Vec<usize>,
    num_decoder_blocks: Vec<usize>,
    #[serde(default = "d_two")]
    upsampling_scaling_factor: usize,
    #[serde(default = "d_relu")]
    act_fn: String,
    #[serde(default = "d_nearest")]
    upsample_fn: String,
}

fn d_two() -> usize {
    2
}
fn d_relu() -> String {
    "relu".into()
}
fn d_nearest() -> String {
    "nearest".into()
}

enum Layer {
    /// A convolution (its ReLU, where it has one, fused into it).
    Conv(Conv),
    /// `relu(conv(relu(conv(relu(conv(x))))) + x)`, every ReLU and the sum fused.
    Block(Box<[Conv; 3]>),
    Upsample,
}

/// The decoder of a tiny autoencoder.
pub struct TinyDecoder {
    layers: Vec<Layer>,
    scale: usize,
    device: Device,
    dtype: DType,
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> candle_core::Result<Conv> {
    Conv::load(&vb, (cin, cout, 3), (1, 1), bias)
}

/// Channels-last (on CUDA with cuDNN), as every convolution but the last, whose three output
/// channels cuDNN's NHWC tensor-core kernels would not take: the maps stay NHWC in between.
fn conv_relu(vb: VarBuilder, cin: usize, cout: usize) -> candle_core::Result<Conv> {
    conv(vb, cin, cout, true)?.with_relu().channels_last()
}

impl TinyDecoder {
    /// Loads `config.json` and the decoder's weights (`decoder.layers.N`, diffusers' names).
    pub fn load(model: &ResolvedModel, device: &Device, dtype: DType) -> Result<Self> {
        let label = model.label();
        let config_path = model.required("config.json");
        let cfg: Config = nn::read_json(&label, config_path)?;
        let widths = &cfg.decoder_block_out_channels;
        if cfg.act_fn != "relu"
            || cfg.upsample_fn != "nearest"
            || widths.len() != cfg.num_decoder_blocks.len()
            || widths.is_empty()
            || widths.iter().any(|&w| w != widths[0])
        {
            return Err(nn::mismatch(
                &label,
                Some(config_path),
                &"only TAESD-style tiny decoders are supported: ReLU, nearest upsampling, one width throughout",
            ));
        }
        let (vb, weights) =
            nn::weights(model, "diffusion_pytorch_model.safetensors", dtype, device)?;
        let vb = vb.pp("decoder.layers");
        let w = widths[0];
        let build = || -> candle_core::Result<Vec<Layer>> {
            // The indices of diffusers' nn.Sequential: activations and upsampling hold none.
            let mut layers = vec![Layer::Conv(conv_relu(vb.pp(0), cfg.latent_channels, w)?)];
            let mut i = 2;
            let last = cfg.num_decoder_blocks.len() - 1;
            for (b, &n) in cfg.num_decoder_blocks.iter().enumerate() {
                for _ in 0..n {
                    let p = vb.pp(i).pp("conv");
                    layers.push(Layer::Block(Box::new([
                        conv_relu(p.pp(0), w, w)?,
                        conv_relu(p.pp(2), w, w)?,
                        conv_relu(p.pp(4), w, w)?,
                    ])));
                    i += 1;
                }
                if b == last {
                    layers.push(Layer::Conv(conv(vb.pp(i), w, cfg.out_channels, true)?));
                } else if cfg.upsampling_scaling_factor == 2 {
                    // Upsampling and the convolution after it, as one.
                    i += 1;
                    layers.push(Layer::Conv(
                        Conv::load_upsampling(&vb.pp(i), (w, w), false)?.channels_last()?,
                    ));
                } else {
                    layers.push(Layer::Upsample);
                    i += 1;
                    layers.push(Layer::Conv(conv(vb.pp(i), w, w, false)?.channels_last()?));
                }
                i += 1;
            }
            Ok(layers)
        };
        let layers = build().map_err(|e| nn::mismatch(&label, Some(weights), &e))?;
        Ok(Self {
            layers,
            scale: cfg.upsampling_scaling_factor,
            device: device.clone(),
            dtype,
        })
    }

    /// Latents (B, 4, h, w) as the UNet leaves them to images in [0, 1], (B, 3, H, W), f32 on
    /// the CPU: the contract of the VAE's decode.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decode_on_device(latents)?.to_device(&Device::Cpu)?)
    }

    /// `decode`, the images left on the model's device.
    pub fn decode_on_device(&self, latents: &Tensor) -> Result<Tensor> {
        let mut x = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        // diffusers clamps the latents softly first.
        x = ((x / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Block(convs) => {
                    let [a, b, c] = &**convs;
                    c.forward_residual(&b.forward(&a.forward(&x)?)?, &x)?
                }
                Layer::Upsample => nn::upsample_nearest(&x, self.scale)?,
            };
        }
        // diffusers returns 2x - 1 and pipelines map that back with /2 + 0.5: x itself.
        Ok(x.to_dtype(DType::F32)?.clamp(0.0, 1.0)?)
    }
}
