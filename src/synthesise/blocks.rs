//! Building blocks that SD's UNet and VAE share, with diffusers' names.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::nn::{Conv, GroupNorm, Linear};
use crate::Result;

/// diffusers' `ResnetBlock2D` ("default" time-embedding mode): GroupNorm+SiLU+conv twice, the
/// projected time embedding added between them when there is one, and a shortcut (a 1x1
/// convolution when the width changes).
pub(super) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    time: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    /// diffusers divides the sum by `output_scale_factor`; 1 in every SD checkpoint.
    scale: f64,
}

/// How a block's norms are built.
#[derive(Clone, Copy)]
pub(super) struct Norms {
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock {
    /// `temb`: the width of the time embedding, for UNet blocks.
    pub(super) fn load(
        vb: &VarBuilder,
        (c_in, c_out): (usize, usize),
        norms: Norms,
        temb: Option<usize>,
        scale: f64,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), norms.groups, c_in, norms.eps)?,
            conv1: Conv::load(&vb.pp("conv1"), (c_in, c_out, 3), (1, 1), true)?,
            time: temb
                .map(|t| Linear::load(&vb.pp("time_emb_proj"), t, c_out, true))
                .transpose()?,
            norm2: GroupNorm::load(&vb.pp("norm2"), norms.groups, c_out, norms.eps)?,
            conv2: Conv::load(&vb.pp("conv2"), (c_out, c_out, 3), (1, 1), true)?,
            shortcut: (c_in != c_out)
                .then(|| Conv::load(&vb.pp("conv_shortcut"), (c_in, c_out, 1), (1, 0), true))
                .transpose()?,
            scale,
        })
    }

    /// The block with its convolutions channels-last (`Conv::channels_last`), as the VAE and
    /// UNet run: its GroupNorms then read their outputs in place.
    pub(super) fn channels_last(mut self) -> candle_core::Result<Self> {
        self.conv1 = self.conv1.channels_last()?;
        self.conv2 = self.conv2.channels_last()?;
        self.shortcut = self.shortcut.map(Conv::channels_last).transpose()?;
        Ok(self)
    }

    /// `temb` is the time embedding after its SiLU, (B, temb width).
    pub(super) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(x, true)?;
        let h = match (&self.time, temb) {
            (Some(proj), Some(t)) => self.conv1.forward_shifted(&h, &proj.forward(t)?)?,
            _ => self.conv1.forward(&h)?,
        };
        let h = self.norm2.forward(&h, true)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        // The shortcut is added inside the last convolution's output pass.
        let y = self.conv2.forward_residual(&h, &skip)?;
        Ok(if self.scale == 1.0 {
            y
        } else {
            (y / self.scale)?
        })
    }
}
