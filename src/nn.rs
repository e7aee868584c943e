//! Building blocks shared by the models: linear layers that only use plain 2-D products, head
//! splitting and attention (BLIP, CLIP, the SD text encoder, the VAE); convolution and GroupNorm
//! that take our fused kernels for f32 on the CPU and candle's ops elsewhere (ResNet, the VAE,
//! the tiny decoder); and the mapping of load failures to an error that names the model and
//! the file.

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::cpu_ops::{CpuConv, CpuGroupNorm, CpuUpConv};
use crate::hub::{Draw, ResolvedModel};

use crate::{Error, Result};

/// N(0, 1) values of `shape` on the CPU, the same for the same seed on every run.
pub(crate) fn seeded_randn(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = rand_distr::StandardNormal
        .sample_iter(&mut rng)
        .take(shape.iter().product())
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// An activation applied in the epilogue of a linear layer or convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    None,
    Relu,
    /// The exact (erf) GELU.
    Gelu,
    /// OpenAI CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
}

impl Act {
    pub(crate) fn relu_if(relu: bool) -> Self {
        if relu {
            Act::Relu
        } else {
            Act::None
        }
    }

    /// Its code in `gpu_ops/kernels.cu`'s epilogue.
    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn code(self) -> i32 {
        match self {
            Act::None => 0,
            Act::Relu => 1,
            Act::Gelu => 2,
            Act::QuickGelu => 3,
        }
    }

    /// Applied with candle's ops.
    pub(crate) fn apply(self, t: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::None => Ok(t),
            Act::Relu => t.relu(),
            Act::Gelu => t.gelu_erf(),
            Act::QuickGelu => &t * candle_nn::ops::sigmoid(&(&t * 1.702)?)?,
        }
    }
}

/// `x @ w.T + b` over the last dimension, flattening leading dimensions first (candle's CPU
/// matmul mishandles batched transposed operands, so only plain 2-D products are used).
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, w, b, None, Act::None)
}

/// `act(x @ w.T + b (+ residual))`: with a bias on CUDA, the bias, residual and activation in
/// one epilogue kernel after the product.
fn linear_with(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("linear input has a dimension");
    let (n, out): (usize, usize) = (lead.iter().product(), w.dim(0)?);
    let y = x.contiguous()?.reshape((n, *last))?.matmul(&w.t()?)?;
    let residual = residual.map(|r| r.reshape((n, out))).transpose()?;
    let y = epilogue(y, b, residual.as_ref(), act)?;
    let mut shape = lead.to_vec();
    shape.push(out);
    Ok(y.reshape(shape)?)
}

/// A linear layer loaded from `{prefix}.weight` / `{prefix}.bias`.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        vb: &VarBuilder,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        let w = vb.get((out, inp), "weight")?;
        let b = if bias {
            Some(vb.get(out, "bias")?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    pub(crate) fn new(w: Tensor, b: Option<Tensor>) -> Self {
        Self { w, b }
    }

    /// A biased map over channels stored either as a linear layer (weight `(out, inp)`) or as a
    /// 1x1 convolution (`(out, inp, 1, 1)`), as diffusers' checkpoints hold it one way or the
    /// other.
    pub(crate) fn load_pointwise(
        vb: &VarBuilder,
        inp: usize,
        out: usize,
    ) -> candle_core::Result<Self> {
        let w = match vb.get((out, inp), "weight") {
            Ok(w) => w,
            Err(_) => vb.get((out, inp, 1, 1), "weight")?.reshape((out, inp))?,
        };
        Ok(Self::new(w, Some(vb.get(out, "bias")?)))
    }

    pub(crate) fn out_features(&self) -> usize {
        self.w.dims()[0]
    }

    /// `parts` as one layer whose output is theirs side by side (weights and biases stacked
    /// along the output, a missing bias as zeros): one product and one epilogue instead of
    /// several, as for an attention's q, k and v.
    pub(crate) fn stacked(parts: &[Linear]) -> candle_core::Result<Self> {
        let w = Tensor::cat(&parts.iter().map(|p| &p.w).collect::<Vec<_>>(), 0)?;
        let b = if parts.iter().any(|p| p.b.is_some()) {
            let biases = parts
                .iter()
                .map(|p| match &p.b {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(p.w.dim(0)?, p.w.dtype(), p.w.device()),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }

    /// `act(self(x))`, in the product's epilogue on CUDA.
    pub(crate) fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        linear_with(x, &self.w, self.b.as_ref(), None, act)
    }

    /// diffusers' GEGLU of `self(x)`: on CUDA the bias is added by the GEGLU kernel as it reads
    /// the product, which is so written and read once (an epilogue pass would write it whole,
    /// 2 x inner wide, and the GEGLU read it again).
    pub(crate) fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        geglu(&linear(x, &self.w, None)?, self.b.as_ref())
    }

    /// `self(x) + residual`, in the product's epilogue on CUDA.
    pub(crate) fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        linear_with(x, &self.w, self.b.as_ref(), Some(residual), Act::None)
    }

    /// `self` over the H*W tokens of a feature map `x` `(N, C_in, H, W)`: `(N, H*W, C_out)`.
    /// The product reads the map transposed in place (a transposed operand to cuBLAS), where
    /// the tokens would otherwise be copied out first.
    pub(crate) fn forward_map_to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        // A view of channels-last storage is its tokens already.
        let tokens = match channels_last_storage(x)? {
            Some(rows) => rows.reshape((n, h * w, c))?,
            None => x.reshape((n, c, h * w))?.transpose(1, 2)?,
        };
        let y = tokens.broadcast_matmul(&self.w.t()?)?;
        let out = self.out_features();
        let y = epilogue(
            y.reshape((n * h * w, out))?,
            self.b.as_ref(),
            None,
            Act::None,
        )?;
        Ok(y.reshape((n, h * w, out))?)
    }

    /// `self` over tokens `t` `(N, H*W, C_in)` as a feature map `(N, C_out, H, W)`, plus
    /// `residual` of that shape: one product writes the map (the weight times the tokens
    /// transposed in place), then one pass adds the bias and residual, where the tokens'
    /// output would otherwise be copied into the map.
    pub(crate) fn forward_tokens_to_map(
        &self,
        t: &Tensor,
        (h, w): (usize, usize),
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (n, out) = (t.dim(0)?, self.out_features());
        // Where the residual is a view of channels-last storage, the output's tokens are the
        // map's storage: the layer as is, and the map a view of it.
        if let Some(rows) = channels_last_storage(residual)? {
            let rows = rows.reshape((n, h * w, out))?;
            let y = self.forward_residual(t, &rows)?;
            return Ok(y.reshape((n, h, w, out))?.permute((0, 3, 1, 2))?);
        }
        let y = self.w.broadcast_left(n)?.matmul(&t.transpose(1, 2)?)?;
        let residual = residual.reshape((n, out, h * w))?;
        let y = epilogue(y, self.b.as_ref(), Some(&residual), Act::None)?;
        Ok(y.reshape((n, out, h, w))?)
    }
}

/// `x` `(N, C, H, W)` as its `(N, H, W, C)` storage where it is a view of channels-last
/// memory (as channels-last convolutions leave their outputs), else None.
pub(crate) fn channels_last_storage(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if x.rank() != 4 || x.is_contiguous() {
        return Ok(None);
    }
    let rows = x.permute((0, 2, 3, 1))?;
    Ok(rows.is_contiguous().then_some(rows))
}

/// `x` `(N, ...)` stacked `times` over along the first dimension (`(times * N, ...)`: all of
/// `x`, then all of it again), keeping channels-last storage where `x` is a view of it.
pub(crate) fn repeat_rows(x: &Tensor, times: usize) -> Result<Tensor> {
    if times == 1 {
        return Ok(x.clone());
    }
    match channels_last_storage(x)? {
        Some(rows) => Ok(Tensor::cat(&vec![&rows; times], 0)?.permute((0, 3, 1, 2))?),
        None => Ok(Tensor::cat(&vec![x; times], 0)?),
    }
}

/// `parts` `(N, C_i, H, W)` side by side along the channels. Where any part is a view of
/// channels-last storage (the UNet's feature maps meeting their skips) so is the result: each
/// part's NHWC rows copied once into the output's; `Tensor::cat` otherwise, which would lay a
/// concatenation of NHWC views out channel-major.
pub(crate) fn cat_channels(parts: &[&Tensor]) -> Result<Tensor> {
    let mut channels_last = false;
    for p in parts {
        channels_last |= channels_last_storage(p)?.is_some();
    }
    if !channels_last {
        return Ok(Tensor::cat(parts, 1)?);
    }
    let rows = parts
        .iter()
        .map(|p| p.permute((0, 2, 3, 1))?.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 3)?.permute((0, 3, 1, 2))?)
}

/// A 2-D convolution with bias, optionally followed by ReLU: our fused kernel for f32 on the
/// CPU; elsewhere candle's conv2d (cuDNN where built with it) followed by the bias, residual and
/// ReLU in one kernel of ours on CUDA (`gpu_ops`), as candle's ops otherwise.
pub(crate) struct Conv {
    imp: ConvImpl,
    c_out: usize,
}

enum ConvImpl {
    Cpu(CpuConv),
    /// Nearest 2x upsampling, then this 3x3 convolution, fused on the CPU.
    CpuUp {
        op: CpuUpConv,
        relu: bool,
    },
    /// candle's conv2d (or cuDNN through `gpu_ops`) without its bias, which the epilogue adds.
    Device {
        /// `(K, C, R, S)`, or `(K, R, S, C)` when `channels_last`.
        weight: Tensor,
        stride_padding: (usize, usize),
        bias: Tensor,
        relu: bool,
        upsample: bool,
        /// For candle's conv2d (without cuDNN: one convolution per group); our cuDNN op reads
        /// it from the shapes.
        groups: usize,
        /// Computed in NHWC by cuDNN (see `channels_last`).
        #[cfg(feature = "cudnn")]
        channels_last: bool,
        /// With `upsample`, channels-last and our kernels: the four output phases' 2x2 filters
        /// `(4K, 2, 2, C)`, which compute the upsampled convolution on the small input.
        #[cfg(feature = "cudnn")]
        phases: Option<Tensor>,
    },
}

impl Conv {
    /// `weight` `[c_out, c_in, k, k]` and `bias` `[c_out]` on any device, in any dtype; they
    /// are moved to `dev` / `dt`.
    pub(crate) fn new(
        weight: Tensor,
        bias: Tensor,
        (stride, padding): (usize, usize),
        relu: bool,
        dev: &Device,
        dt: DType,
    ) -> candle_core::Result<Self> {
        let conv = Self::build(weight, bias, (stride, padding), false, dev, dt)?;
        Ok(if relu { conv.with_relu() } else { conv })
    }

    /// Nearest 2x upsampling followed by the 3x3 convolution (padding 1) at `{prefix}`, as SD's
    /// VAE and TAESD upsample: on the CPU in f32 computed on the small input, elsewhere
    /// upsampled, then convolved.
    pub(crate) fn load_upsampling(
        vb: &VarBuilder,
        (c_in, c_out): (usize, usize),
        bias: bool,
    ) -> candle_core::Result<Self> {
        let (weight, bias) = Self::weights(vb, (c_in, c_out, 3), bias)?;
        Self::upsampling(weight, bias, vb.device(), vb.dtype())
    }

    /// `load_upsampling` from tensors: `weight` `[c_out, c_in, 3, 3]`, `bias` `[c_out]`.
    pub(crate) fn upsampling(
        weight: Tensor,
        bias: Tensor,
        dev: &Device,
        dt: DType,
    ) -> candle_core::Result<Self> {
        Self::build(weight, bias, (1, 1), true, dev, dt)
    }

    /// A square `k`x`k` convolution from `{prefix}.weight` and `{prefix}.bias`, no ReLU.
    pub(crate) fn load(
        vb: &VarBuilder,
        shape: (usize, usize, usize),
        stride_padding: (usize, usize),
        bias: bool,
    ) -> candle_core::Result<Self> {
        let (weight, bias) = Self::weights(vb, shape, bias)?;
        Self::build(weight, bias, stride_padding, false, vb.device(), vb.dtype())
    }

    fn weights(
        vb: &VarBuilder,
        (c_in, c_out, k): (usize, usize, usize),
        bias: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let weight = vb.get((c_out, c_in, k, k), "weight")?;
        let bias = if bias {
            vb.get(c_out, "bias")?
        } else {
            Tensor::zeros(c_out, vb.dtype(), vb.device())?
        };
        Ok((weight, bias))
    }

    /// `upsample` only with a 3x3 kernel, stride 1, padding 1.
    fn build(
        weight: Tensor,
        bias: Tensor,
        (stride, padding): (usize, usize),
        upsample: bool,
        dev: &Device,
        dt: DType,
    ) -> candle_core::Result<Self> {
        let (c_out, c_in, k, _) = weight.dims4()?;
        let imp = if dev.is_cpu() && dt == DType::F32 {
            let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1();
            let (w, b) = (flat(&weight)?, flat(&bias)?);
            if upsample {
                ConvImpl::CpuUp {
                    op: CpuUpConv::new(&w, b, c_in),
                    relu: false,
                }
            } else {
                ConvImpl::Cpu(CpuConv::new(w, b, c_in, k, stride, padding, false))
            }
        } else {
            ConvImpl::Device {
                weight: weight.to_device(dev)?.to_dtype(dt)?,
                stride_padding: (stride, padding),
                bias: bias.to_device(dev)?.to_dtype(dt)?,
                relu: false,
                upsample,
                groups: 1,
                #[cfg(feature = "cudnn")]
                channels_last: false,
                #[cfg(feature = "cudnn")]
                phases: None,
            }
        };
        Ok(Self { imp, c_out })
    }

    /// The same convolution computed channels-last (NHWC) on CUDA with cuDNN, where cuDNN's
    /// tensor-core kernels are fastest, as PyTorch runs ResNet; elsewhere unchanged. Inputs and
    /// outputs keep their logical `(N, C, H, W)` shape: the output is a view of NHWC storage,
    /// which the next channels-last convolution reads without a copy (any other input is
    /// copied into NHWC first), as do our GroupNorm and upsampling kernels, and which every
    /// other op reads through its strides.
    #[cfg_attr(not(feature = "cudnn"), allow(unused_mut))]
    pub(crate) fn channels_last(mut self) -> candle_core::Result<Self> {
        #[cfg(feature = "cudnn")]
        if let ConvImpl::Device {
            weight,
            channels_last,
            upsample,
            phases,
            groups,
            ..
        } = &mut self.imp
        {
            use crate::gpu_ops::cudnn_conv;
            if weight.device().is_cuda()
                && cudnn_conv::enabled()
                && cudnn_conv::channels_last()
                && (*groups == 1 || crate::gpu_ops::on(crate::gpu_ops::Kernel::GroupedConv))
            {
                if *upsample && crate::gpu_ops::on(crate::gpu_ops::Kernel::UpsampleConv) {
                    *phases = Some(upsample_phase_filters_nhwc(weight)?);
                }
                *weight = weight.permute((0, 2, 3, 1))?.contiguous()?;
                *channels_last = true;
            }
        }
        Ok(self)
    }

    /// The same weights as a convolution in `groups` groups (ResNeXt's, ConvNeXt's depthwise):
    /// the input has `groups` times the channels the weights' second dimension says.
    pub(crate) fn grouped(mut self, n: usize) -> Self {
        match &mut self.imp {
            ConvImpl::Cpu(op) => op.set_groups(n),
            ConvImpl::Device { groups, .. } => *groups = n,
            ConvImpl::CpuUp { .. } => unreachable!("upsampling convolutions are not grouped"),
        }
        self
    }

    /// The same convolution with ReLU applied to its output (in the same pass on the CPU).
    pub(crate) fn with_relu(mut self) -> Self {
        match &mut self.imp {
            ConvImpl::Cpu(op) => op.relu = true,
            ConvImpl::CpuUp { relu, .. } | ConvImpl::Device { relu, .. } => *relu = true,
        }
        self
    }

    pub(crate) fn out_channels(&self) -> usize {
        self.c_out
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, None)
    }

    /// `conv(x) + residual`, then the ReLU if this convolution has one: the end of a residual
    /// block in one pass on the CPU and one epilogue kernel on CUDA.
    pub(crate) fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.run(x, Some(residual), None)
    }

    /// `conv(x) + shift[n, c]` for a convolution without ReLU and a per-image shift `(N, C)`
    /// (SD's time embedding): added with the bias in the epilogue kernel on CUDA.
    pub(crate) fn forward_shifted(&self, x: &Tensor, shift: &Tensor) -> Result<Tensor> {
        match &self.imp {
            ConvImpl::Device { relu: false, .. } => self.run(x, None, Some(shift)),
            _ => Ok(self
                .forward(x)?
                .broadcast_add(&shift.unsqueeze(2)?.unsqueeze(3)?)?),
        }
    }

    /// `shift`: a per-image `(N, C)` added to the bias, on the device paths only.
    fn run(&self, x: &Tensor, residual: Option<&Tensor>, shift: Option<&Tensor>) -> Result<Tensor> {
        let shifted = |bias: &Tensor| -> candle_core::Result<Tensor> {
            match shift {
                Some(s) => bias.unsqueeze(0)?.broadcast_add(s),
                None => Ok(bias.clone()),
            }
        };
        match &self.imp {
            ConvImpl::Cpu(op) => {
                let x = x.contiguous()?;
                Ok(match residual {
                    Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, op)?,
                    None => x.apply_op1_no_bwd(op)?,
                })
            }
            ConvImpl::CpuUp { op, relu } => {
                let y = x.contiguous()?.apply_op1_no_bwd(op)?;
                epilogue(y, None, residual, Act::relu_if(*relu))
            }
            #[cfg(feature = "cudnn")]
            ConvImpl::Device {
                phases: Some(phases),
                bias,
                relu: false,
                ..
            } if residual.is_none() && shift.is_none() => {
                upsampled_conv_channels_last(phases, bias, x)
            }
            #[cfg(feature = "cudnn")]
            ConvImpl::Device {
                weight,
                stride_padding,
                bias,
                relu,
                upsample,
                channels_last: true,
                ..
            } => {
                // Upsampled channels-last where x is (our kernel reads its storage in place).
                let x = if *upsample {
                    upsample_nearest(x, 2)?
                } else {
                    x.clone()
                };
                channels_last_conv(
                    weight,
                    *stride_padding,
                    &shifted(bias)?,
                    *relu,
                    &x,
                    residual,
                )
            }
            ConvImpl::Device {
                weight,
                stride_padding,
                bias,
                relu,
                upsample,
                groups,
                ..
            } => {
                let y = candle_conv(weight, *stride_padding, *upsample, *groups, x)?;
                epilogue(y, Some(&shifted(bias)?), residual, Act::relu_if(*relu))
            }
        }
    }
}

/// `Conv::run` for a channels-last convolution: `x`, `residual` and the result are `(N, C, H,
/// W)` views of NHWC storage; the epilogue runs on each image's `(H W, C)` rows, `bias` `(C)`
/// or per image `(N, C)`.
#[cfg(feature = "cudnn")]
fn channels_last_conv(
    weight: &Tensor,
    (stride, padding): (usize, usize),
    bias: &Tensor,
    relu: bool,
    x: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    use crate::gpu_ops::cudnn_conv::{conv2d, Format};
    let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1));
    let y = conv2d(&nhwc(x)?, weight, padding, stride, Format::Nhwc)?;
    let (n, p, q, k) = y.dims4()?;
    let rows = |t: Tensor| t.contiguous()?.reshape((n, p * q, k));
    let residual = residual.map(|r| rows(nhwc(r)?)).transpose()?;
    let act = Act::relu_if(relu);
    let y = if y.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::Epilogue) {
        crate::gpu_ops::bias_act(&rows(y)?, bias, residual.as_ref(), act, true)?
    } else {
        let bias = bias.reshape((bias.elem_count() / k, 1, k))?;
        candle_epilogue(rows(y)?, Some(&bias), residual.as_ref(), act)?
    };
    Ok(y.reshape((n, p, q, k))?.permute((0, 3, 1, 2))?)
}

/// The 2x2 filters of an upsampling 3x3 convolution's four output phases (`cpu_ops`), stacked
/// phase by phase as one `(4K, 2, 2, C)` channels-last filter on `weight`'s device and dtype.
#[cfg(feature = "cudnn")]
fn upsample_phase_filters_nhwc(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (k, c, _, _) = weight.dims4()?;
    let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let stacked = crate::cpu_ops::upsample_phase_filters(&w, k, c);
    Tensor::from_vec(stacked, (4 * k, c, 2, 2), &Device::Cpu)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .to_device(weight.device())?
        .to_dtype(weight.dtype())
}

/// Nearest 2x upsampling of `x` then its 3x3 convolution, computed on the small input: one
/// cuDNN convolution by the phases' 2x2 filters (16/36 of the work, and the upsampled map never
/// written), then one pass placing each phase's outputs and adding the bias. `x` and the
/// result are `(N, C, H, W)` views of NHWC storage.
#[cfg(feature = "cudnn")]
fn upsampled_conv_channels_last(phases: &Tensor, bias: &Tensor, x: &Tensor) -> Result<Tensor> {
    use crate::gpu_ops::cudnn_conv::{conv2d, Format};
    let y = conv2d(&x.permute((0, 2, 3, 1))?, phases, 1, 1, Format::Nhwc)?;
    Ok(crate::gpu_ops::interleave_phases(&y, bias)?.permute((0, 3, 1, 2))?)
}

/// candle's convolution (without bias), after nearest 2x upsampling when `upsample`; with
/// cuDNN, our cuDNN op (`gpu_ops::cudnn_conv`), which reads the groups from the shapes.
fn candle_conv(
    weight: &Tensor,
    (stride, padding): (usize, usize),
    upsample: bool,
    groups: usize,
    x: &Tensor,
) -> Result<Tensor> {
    let x = if upsample {
        upsample_nearest(x, 2)?
    } else {
        x.clone()
    };
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda()
        && crate::gpu_ops::cudnn_conv::enabled()
        && (groups == 1 || crate::gpu_ops::on(crate::gpu_ops::Kernel::GroupedConv))
    {
        use crate::gpu_ops::cudnn_conv::{conv2d, Format};
        return Ok(conv2d(&x, weight, padding, stride, Format::Nchw)?);
    }
    Ok(x.conv2d(weight, padding, stride, 1, groups)?)
}

/// Nearest upsampling of `(N, C, H, W)` by `scale`: one kernel of ours on CUDA at 2x,
/// candle's elsewhere.
pub(crate) fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if scale == 2 && x.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::Upsample) {
        return Ok(crate::gpu_ops::upsample_nearest2x(x)?);
    }
    let (_, _, h, w) = x.dims4()?;
    Ok(x.upsample_nearest2d(scale * h, scale * w)?)
}

/// `act(y + bias (+ residual))` for `y` `(N, C, ...)` and `bias` `(C)` or `(N, C)`: one kernel
/// of ours on CUDA, candle's ops (as its Conv2d adds a bias) elsewhere.
fn epilogue(
    y: Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(b) = bias
        .filter(|_| y.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::Epilogue))
    {
        return Ok(crate::gpu_ops::bias_act(&y, b, residual, act, false)?);
    }
    let bias = bias
        .map(|b| {
            let mut shape = vec![b.elem_count() / y.dim(1)?, y.dim(1)?];
            shape.resize(y.rank(), 1);
            b.reshape(shape)
        })
        .transpose()?;
    candle_epilogue(y, bias.as_ref(), residual, act)
}

/// The epilogue in candle's ops, `bias` already shaped to broadcast over `y`.
fn candle_epilogue(
    y: Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let mut y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    if let Some(r) = residual {
        y = (y + r)?;
    }
    Ok(act.apply(y)?)
}

/// GroupNorm with its affine map (`{prefix}.weight`, `{prefix}.bias`), optionally followed by
/// SiLU: one fused pass for f32 on the CPU and one kernel of ours on CUDA (`gpu_ops`);
/// candle_nn's GroupNorm and candle's SiLU elsewhere.
pub(crate) struct GroupNorm {
    cpu: Option<(Vec<f32>, Vec<f32>)>,
    inner: candle_nn::GroupNorm,
    #[cfg(feature = "cuda")]
    affine: (Tensor, Tensor),
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn load(
        vb: &VarBuilder,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        let (gamma, beta) = (vb.get(channels, "weight")?, vb.get(channels, "bias")?);
        let cpu = if vb.device().is_cpu() && vb.dtype() == DType::F32 {
            Some((gamma.to_vec1()?, beta.to_vec1()?))
        } else {
            None
        };
        Ok(Self {
            cpu,
            #[cfg(feature = "cuda")]
            affine: (gamma.clone(), beta.clone()),
            inner: candle_nn::GroupNorm::new(gamma, beta, channels, groups, eps)?,
            groups,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if let Some((gamma, beta)) = self.cpu.as_ref().filter(|_| x.dtype() == DType::F32) {
            return Ok(x.contiguous()?.apply_op1_no_bwd(&CpuGroupNorm {
                gamma,
                beta,
                groups: self.groups,
                eps: self.eps,
                silu,
            })?);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::GroupNorm) {
            let (gamma, beta) = &self.affine;
            return Ok(crate::gpu_ops::group_norm(
                x,
                (gamma, beta),
                self.groups,
                self.eps,
                silu,
            )?);
        }
        let y = candle_core::Module::forward(&self.inner, x)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

/// diffusers' GEGLU over the last dimension of `h` (+ `bias`): the first half times the exact
/// GELU of the second; one kernel of ours on CUDA, the bias added as it reads, where candle would
/// add it in a pass of its own and read both halves strided.
pub(crate) fn geglu(h: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if h.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::Geglu) {
        return Ok(crate::gpu_ops::geglu(h, bias)?);
    }
    let h = match bias {
        Some(b) => h.broadcast_add(b)?,
        None => h.clone(),
    };
    let half = h.dim(D::Minus1)? / 2;
    Ok((h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?)
}

/// LayerNorm over the last dimension with its affine map: one kernel of ours on CUDA
/// (`gpu_ops`; candle's takes a fifth of the card's bandwidth), candle_nn's elsewhere.
pub(crate) struct LayerNorm {
    inner: candle_nn::LayerNorm,
    /// candle_nn's LayerNorm keeps its eps to itself.
    #[cfg(feature = "cuda")]
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            #[cfg(feature = "cuda")]
            eps,
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
        }
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(beta) = self.inner.bias().filter(|_| {
            x.device().is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::LayerNorm)
        }) {
            return crate::gpu_ops::layer_norm(x, self.inner.weight(), beta, self.eps);
        }
        self.inner.forward(x)
    }
}

/// `{prefix}.weight` and `{prefix}.bias` of `dim` as a LayerNorm.
pub(crate) fn layer_norm(vb: &VarBuilder, dim: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(dim, "weight")?,
        vb.get(dim, "bias")?,
        eps,
    ))
}

/// (B, T, H*D) -> (B, H, T, D), a view: the flash attention kernel reads the heads in place,
/// the other paths make them contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    Ok(x.reshape((b, t, heads, c / heads))?.transpose(1, 2)?)
}

/// (B, T, P*H*D), the output of `P` stacked projections (`Linear::stacked`) -> each part
/// split into heads, (B, H, T, D) views.
pub(crate) fn split_stacked_heads<const P: usize>(x: &Tensor, heads: usize) -> Result<[Tensor; P]> {
    use candle_core::IndexOp;
    let (b, t, c) = x.dims3()?;
    let x = x.reshape((b, t, P, heads, c / (P * heads)))?;
    let mut parts = Vec::with_capacity(P);
    for i in 0..P {
        parts.push(x.i((.., .., i))?.transpose(1, 2)?);
    }
    Ok(parts.try_into().expect("P parts"))
}

/// (B, H, T, D) -> (B, T, H*D).
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?)
}

/// Attention score elements (B x H x T x T) computed at once; above it the batch-heads are
/// split. candle 0.11.1's CUDA softmax overflows 32-bit indexing above 2^31 elements (SD 1.x at
/// 512 px from 17 rows), and smaller pieces also bound the memory the scores take.
const SCORES_AT_ONCE: usize = 1 << 28;

/// softmax(q k^T * scale + mask) v over (B, H, T, D) tensors; the mask, when given, is added
/// to the scores in their own dtype (candle's BLIP decoder breaks in f16 by adding an f32 one).
/// Unmasked 16-bit attention on CUDA runs in our flash attention kernel (`gpu_ops`), unmasked
/// f32 attention on the CPU in blocks of queries, never building the whole score matrix
/// (`cpu_ops::CpuAttention`).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if mask.is_none() && crate::gpu_ops::flash_applies(q, k, v) {
        return Ok(crate::gpu_ops::flash_attention(q, k, v, scale)?);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    match mask {
        Some(_) => attend(&q, &k, &v, scale, mask),
        None if cpu_blocked(&q) => {
            let op = crate::cpu_ops::CpuAttention {
                scale: scale as f32,
            };
            Ok(q.apply_op3_no_bwd(&k, &v, &op)?)
        }
        None => unfused_attention(&q, &k, &v, scale),
    }
}

/// Whether unmasked `attention` runs blocked on the CPU (`cpu_ops::CpuAttention`).
fn cpu_blocked(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32
}

/// How unmasked `attention` runs on these operands, for reports.
pub(crate) fn attention_path(q: &Tensor, k: &Tensor, v: &Tensor) -> &'static str {
    if attention_is_fused(q, k, v) {
        "flash attention kernel"
    } else if cpu_blocked(q) {
        "blocked: the scores of up to 512 queries at a time, never the whole matrix"
    } else {
        "scores in pieces of at most 2^28"
    }
}

/// Unmasked attention through candle's ops: q k^T, softmax, then p v, in pieces of at most
/// `SCORES_AT_ONCE` scores.
pub(crate) fn unfused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_in_pieces(q, k, v, scale, SCORES_AT_ONCE)
}

/// Whether unmasked `attention` on these operands runs fused (our flash attention kernel on
/// CUDA): its scores and softmax are f32 whatever the storage type, so half-precision
/// operands need no upcast against overflow.
pub(crate) fn attention_is_fused(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::gpu_ops::flash_applies(q, k, v)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v);
        false
    }
}

/// Unmasked attention with at most `at_once` score elements per piece.
fn attention_in_pieces(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    at_once: usize,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (tk, dv) = (k.dim(2)?, v.dim(3)?);
    let rows = (at_once / (tq * tk).max(1)).max(1);
    if b * h <= rows {
        return attend(q, k, v, scale, None);
    }
    let flat = |x: &Tensor, t, d| x.contiguous()?.reshape((b * h, 1, t, d));
    let (q, k, v) = (flat(q, tq, d)?, flat(k, tk, d)?, flat(v, tk, dv)?);
    let parts = (0..b * h)
        .step_by(rows)
        .map(|i| {
            let n = rows.min(b * h - i);
            attend(
                &q.narrow(0, i, n)?,
                &k.narrow(0, i, n)?,
                &v.narrow(0, i, n)?,
                scale,
                None,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?.reshape((b, h, tq, dv))?)
}

fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    // Scaled before the product: a pass over (B, H, T, D) rather than over the T x T scores.
    let scores = (q * scale)?.matmul(&k.t()?.contiguous()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    // The softmax in f32 whatever the storage type, as PyTorch's fused attention computes it
    // and diffusers' upcast_softmax asks: half-precision scores lose too much in exp.
    let probs = match scores.dtype() {
        DType::F32 | DType::F64 => candle_nn::ops::softmax_last_dim(&scores)?,
        dt => candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dt)?,
    };
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// An additive causal mask (T, T): 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?.to_dtype(dtype)?)
}

/// The weights file `file` of `model` (or its shards) as a VarBuilder in `dtype` on `device`
/// (memory-mapped), with the path naming it; random weights when the model asks for them (`dnd bench`).
pub(crate) fn weights<'a>(
    model: &'a ResolvedModel,
    file: &str,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, &'a Path)> {
    let (path, files) = model.weight_files(file);
    if let Some(draw) = model.random_weights() {
        let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights(draw));
        return Ok((
            VarBuilder::from_backend(backend, dtype, device.clone()),
            path,
        ));
    }
    // SAFETY: the files are not modified while mapped; dnd only ever reads model folders.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| unreadable(&model.label(), path, &e))?;
    Ok((vb, path))
}

/// A weights file that is not safetensors, or is cut short (an interrupted download).
pub(crate) fn unreadable(label: &str, path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::ModelMismatch {
        model: label.to_string(),
        file: path.display().to_string(),
        detail: format!("not a readable safetensors file ({e})"),
        fix: "re-download it (`dnd models fetch`) or convert the checkpoint to safetensors".into(),
    }
}

/// Weights of any name and shape: N(0, 0.02) matrices, unit norm scales, zero biases. Timing
/// does not depend on the values, and these keep activations in range (no overflow to inf,
/// no underflow to slow denormals).
struct RandomWeights(Draw);

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !dtype.is_float() {
            return Tensor::zeros(s, dtype, dev);
        }
        let t = match s.rank() {
            1 if name.ends_with("weight") => Tensor::ones(s, DType::F32, dev)?,
            1 => Tensor::zeros(s, DType::F32, dev)?,
            _ if self.0 == Draw::Fast => Tensor::randn(0f32, 0.02, s, dev)?,
            _ => {
                // FNV-1a of the name: the same tensor for the same name on every device.
                let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
                });
                (seeded_randn(s.dims(), seed)? * 0.02)?.to_device(dev)?
            }
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape: {name} was asked for without one"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A weights file that does not fit the architecture its config describes.
pub(crate) fn mismatch(label: &str, file: Option<&Path>, e: &dyn std::fmt::Display) -> Error {
    Error::ModelMismatch {
        model: label.to_string(),
        file: file.map(|f| f.display().to_string()).unwrap_or_default(),
        // candle appends a backtrace to some errors; the first line is the message.
        detail: e.to_string().lines().next().unwrap_or_default().to_string(),
        fix: "use the checkpoint's own folder as published on the Hub (its config.json must describe its weights)".into(),
    }
}

/// Reads and parses a JSON config file, naming it on failure. Python's non-finite floats are
/// read as null ([`python_json`]).
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(label: &str, path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| mismatch(label, Some(path), &e))?;
    let value: serde_json::Value =
        serde_json::from_str(&python_json(&text)).map_err(|e| Error::ModelMismatch {
            model: label.to_string(),
            file: path.display().to_string(),
            detail: format!("not valid JSON: {e}"),
            fix: "re-download the model (`dnd models fetch`) or fix the file".into(),
        })?;
    serde_json::from_value(value).map_err(|e| mismatch(label, Some(path), &e))
}

/// `text` with the bare words Python's `json` writes for non-finite floats (`NaN`,
/// `Infinity`, `-Infinity`), which JSON does not allow, as `null`. diffusers saves
/// DPMSolverMultistepScheduler's default `"lambda_min_clipped": -Infinity` so.
pub(crate) fn python_json(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(word) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|w| rest.starts_with(w))
            {
                out.push_str("null");
                rest = &rest[word.len()..];
                continue;
            }
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

/// The last dimension's argmax per row, as u32.
pub(crate) fn argmax_last(x: &Tensor) -> Result<Vec<u32>> {
    Ok(x.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythons_non_finite_floats_read_as_null_outside_strings() {
        let text =
            r#"{"a": -Infinity, "b": [NaN, Infinity, 1.5], "c": "NaN \" -Infinity", "d": 2}"#;
        let v: serde_json::Value = serde_json::from_str(&python_json(text)).unwrap();
        let want =
            serde_json::json!({"a": null, "b": [null, null, 1.5], "c": "NaN \" -Infinity", "d": 2});
        assert_eq!(v, want);
    }

    #[test]
    fn attention_in_pieces_equals_attention_at_once() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 6), &dev).unwrap();
        let whole = attend(&q, &k, &v, 0.5, None).unwrap();
        // 35 scores per batch-head: pieces of 1, 2 and 6 batch-heads, and all at once.
        for at_once in [1, 70, 210, 10_000] {
            let pieces = attention_in_pieces(&q, &k, &v, 0.5, at_once).unwrap();
            assert_eq!(pieces.dims(), whole.dims());
            let diff = crate::cpu_ops::tests::max_diff(pieces, whole.clone());
            assert!(diff < 1e-6, "{at_once}: {diff}");
        }
    }

    /// `t` `(N, C, H, W)` as a view of NHWC storage, as channels-last convolutions leave it.
    fn nhwc(t: &Tensor) -> Tensor {
        t.permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
    }

    #[test]
    fn projections_read_and_write_channels_last_maps_as_nchw_ones() {
        // The VAE's attention on CUDA gets views of NHWC storage (channels-last convolutions'
        // outputs): the projections take them as tokens in place, and write the map with the
        // residual back into channels-last storage; the values must be those of NCHW maps.
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 6, 3, 5);
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let x_cl = nhwc(&x);
        assert!(channels_last_storage(&x).unwrap().is_none());
        assert!(channels_last_storage(&x_cl).unwrap().is_some());
        let lin = Linear::new(
            Tensor::randn(0f32, 1.0, (c, c), &dev).unwrap(),
            Some(Tensor::randn(0f32, 1.0, c, &dev).unwrap()),
        );
        let tokens = lin.forward_map_to_tokens(&x).unwrap();
        let diff = crate::cpu_ops::tests::max_diff(
            lin.forward_map_to_tokens(&x_cl).unwrap(),
            tokens.clone(),
        );
        assert!(diff < 1e-5, "tokens: {diff}");
        let map = lin.forward_tokens_to_map(&tokens, (h, w), &x).unwrap();
        let map_cl = lin.forward_tokens_to_map(&tokens, (h, w), &x_cl).unwrap();
        assert!(channels_last_storage(&map_cl).unwrap().is_some());
        let diff = crate::cpu_ops::tests::max_diff(map_cl, map);
        assert!(diff < 1e-5, "map: {diff}");
    }

    #[test]
    fn channel_concatenation_keeps_channels_last_maps_channels_last() {
        // The UNet's up path on CUDA joins NHWC maps with skips that are NHWC views, or NCHW
        // (conv_in's output): the values are those of NCHW maps side by side, and the result
        // is NHWC storage for the next convolution to read in place.
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 2, 4, 5), &dev).unwrap();
        let want = Tensor::cat(&[&a, &b], 1).unwrap();
        let plain = cat_channels(&[&a, &b]).unwrap();
        assert!(plain.is_contiguous());
        assert_eq!(crate::cpu_ops::tests::max_diff(plain, want.clone()), 0.0);
        for (x, y) in [
            (nhwc(&a), nhwc(&b)),
            (nhwc(&a), b.clone()),
            (a.clone(), nhwc(&b)),
        ] {
            let got = cat_channels(&[&x, &y]).unwrap();
            assert!(channels_last_storage(&got).unwrap().is_some());
            assert_eq!(crate::cpu_ops::tests::max_diff(got, want.clone()), 0.0);
        }
    }
}
