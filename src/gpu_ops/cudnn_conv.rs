//! Convolutions through cuDNN by an op of ours rather than candle's. candle's call describes
//! f16 convolutions with f16 accumulation (cuDNN's "true half" configuration), takes cuDNN's
//! heuristic algorithm, which on an H200 runs ResNet-50's f16 convolutions at 13.6 TFLOP/s
//! where implicit precomputed GEMM reaches 37 (the performance issue's ncu figures), builds its
//! descriptors and allocates and zeroes a workspace on every call, and knows only NCHW, where
//! PyTorch runs ResNet channels-last on cuDNN's NHWC tensor-core kernels. Here, as PyTorch sets
//! cuDNN up: f32 accumulation with tensor-op math for 16-bit types, NCHW or NHWC (`Format`),
//! and per shape the forward algorithm measured fastest once, its descriptors kept, one
//! workspace per device that only grows. A shape that differs from a measured one only in its
//! batch size, within the same power of two, takes that shape's algorithm unmeasured: the
//! pipeline's batches of crops change size with every neuron, and a measurement runs each of
//! cuDNN's algorithms three times, on every layer.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};

use super::cuda::{by_dtype, output, view, Cuda2, Op2};

use sys::cudnnConvolutionFwdAlgo_t as Algo;

/// Whether convolutions on CUDA take this op: yes unless `DND_CUDNN_CONV=0`, which gives them
/// back to candle's conv2d (NCHW only, its heuristic algorithm), for comparison.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DND_CUDNN_CONV").map_or(true, |v| v != "0"))
}

/// Whether the networks that can run channels-last do (`nn::Conv::channels_last`): yes unless
/// `DND_CHANNELS_LAST=0`, which keeps every map NCHW while convolutions still take this op.
pub(crate) fn channels_last() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DND_CHANNELS_LAST").map_or(true, |v| v != "0"))
}

/// The memory order of a convolution's input, filter and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Format {
    /// Input `(N, C, H, W)`, filter `(K, C, R, S)`, output `(N, K, P, Q)`.
    Nchw,
    /// Input `(N, H, W, C)`, filter `(K, R, S, C)`, output `(N, P, Q, K)`.
    Nhwc,
}

/// The convolution of CUDA `x` by `w` (no bias; dilation 1), both in `format`; grouped (ResNeXt,
/// ConvNeXt's depthwise) where `w`'s filters see a fraction of `x`'s channels.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    format: Format,
) -> Result<Tensor> {
    let op = CudnnConv {
        padding,
        stride,
        format,
    };
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Cuda2(op))
}

/// Algorithms whose workspace exceeds this are not tried: FFT and GEMM grow theirs with the
/// batch, to gigabytes at SD's sizes, against the 12 GB budget.
const WORKSPACE_CAP: usize = 512 << 20;

/// Every forward algorithm cuDNN implements (DIRECT it does not).
const ALGOS: [Algo; 7] = [
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
    Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];

struct CudnnConv {
    padding: usize,
    stride: usize,
    format: Format,
}

/// `[N, C, H, W]` of the input and `[K, C, R, S]` of the filter, whatever the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Dims {
    x: [usize; 4],
    w: [usize; 4],
}

impl CudnnConv {
    fn dims(&self, xl: &Layout, wl: &Layout) -> Result<Dims> {
        let (x, w) = (xl.shape().dims4()?, wl.shape().dims4()?);
        let dims = match self.format {
            Format::Nchw => Dims {
                x: [x.0, x.1, x.2, x.3],
                w: [w.0, w.1, w.2, w.3],
            },
            Format::Nhwc => Dims {
                x: [x.0, x.3, x.1, x.2],
                w: [w.0, w.3, w.1, w.2],
            },
        };
        let [_, c, h, wd] = dims.x;
        let [_, wc, r, s] = dims.w;
        if wc == 0 || c % wc != 0 || h + 2 * self.padding < r || wd + 2 * self.padding < s {
            candle_core::bail!(
                "dnd-cudnn-conv2d: input {:?} and filter {:?} ({:?}) do not fit",
                xl.dims(),
                wl.dims(),
                self.format
            )
        }
        Ok(dims)
    }

    /// `[N, K, P, Q]` of the output.
    fn out(&self, d: &Dims) -> [usize; 4] {
        let side = |i: usize, k: usize| (i + 2 * self.padding - k) / self.stride + 1;
        [d.x[0], d.w[0], side(d.x[2], d.w[2]), side(d.x[3], d.w[3])]
    }

    fn shape(&self, [n, k, p, q]: [usize; 4]) -> Shape {
        match self.format {
            Format::Nchw => (n, k, p, q).into(),
            Format::Nhwc => (n, p, q, k).into(),
        }
    }
}

impl Op2 for CudnnConv {
    const NAME: &'static str = "dnd-cudnn-conv2d";

    fn cuda(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dims = self.dims(xl, wl)?;
        let out = by_dtype!(x, launch(self, dims, (x, xl), (w, wl), x.device()));
        Ok((out, self.shape(self.out(&dims))))
    }
}

/// What a shape needs on every call after the first: its descriptors and chosen algorithm.
struct Plan<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: Algo,
    workspace: usize,
}

type Key = (DeviceId, DType, Format, Dims, usize, usize);

/// `key` with its batch size rounded up to a power of two: the shapes that share an algorithm.
fn family(key: &Key) -> Key {
    let mut f = *key;
    f.3.x[0] = f.3.x[0].next_power_of_two();
    f
}

// cuDNN handles and descriptors are neither Send nor Sync, so they live per thread (as candle
// keeps its handle); the engine runs every model on one thread.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::default();
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::default();
    static PLANS: RefCell<HashMap<Key, Box<dyn Any>>> = RefCell::default();
    /// The algorithm measured for each family of shapes (`family`).
    static MEASURED: RefCell<HashMap<Key, Algo>> = RefCell::default();
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// Runs `f` with this device's workspace, grown to at least `bytes` first.
fn with_workspace<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(&mut CudaSlice<u8>) -> Result<R>,
) -> Result<R> {
    WORKSPACES.with(|ws| {
        let mut ws = ws.borrow_mut();
        if ws.get(&dev.id()).is_none_or(|w| w.len() < bytes) {
            // The old one is freed in stream order, after the work queued on it.
            ws.insert(dev.id(), output::<u8>(dev, bytes.max(1))?);
        }
        f(ws.get_mut(&dev.id()).expect("inserted above"))
    })
}

fn launch<T>(
    op: &CudnnConv,
    dims: Dims,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>>
where
    T: CudaDType + CudnnDataType + DeviceRepr + WithDType,
{
    let x = view::<T>(x, xl, "input")?;
    let w = view::<T>(w, wl, "filter")?;
    let out = op.out(&dims);
    let mut y = output::<T>(dev, out.iter().product())?;
    let key: Key = (dev.id(), T::DTYPE, op.format, dims, op.padding, op.stride);
    let known = PLANS.with(|p| p.borrow().contains_key(&key));
    if !known {
        let mut plan = plan::<T>(op, dims, out, dev)?;
        let family = family(&key);
        let kin = MEASURED.with(|m| m.borrow().get(&family).copied());
        // A kin shape's algorithm, where cuDNN takes it for this shape within the cap.
        let reused = kin.and_then(|algo| match plan.forward().get_workspace_size(algo) {
            Ok(bytes) if bytes <= WORKSPACE_CAP => Some((algo, bytes)),
            _ => None,
        });
        if let Some((algo, bytes)) = reused {
            (plan.algo, plan.workspace) = (algo, bytes);
            tracing::debug!(?key, ?algo, "cuDNN algorithm of a kin shape reused");
        } else {
            // Every run of the search computes the whole output, so `y` is done when it ends.
            let plan = choose(plan, dev, |fwd, algo, ws| {
                // SAFETY: the descriptors were made from these tensors' dims and dtype.
                unsafe { fwd.launch(algo, Some(ws), (T::one(), T::zero()), &x, &w, &mut y) }?;
                Ok(())
            })?;
            tracing::debug!(?key, algo = ?plan.algo, "cuDNN algorithm chosen");
            MEASURED.with(|m| m.borrow_mut().insert(family, plan.algo));
            PLANS.with(|p| p.borrow_mut().insert(key, Box::new(plan)));
            return Ok(y);
        }
        PLANS.with(|p| p.borrow_mut().insert(key, Box::new(plan)));
    }
    PLANS.with(|p| {
        let plans = p.borrow();
        let plan = plans[&key]
            .downcast_ref::<Plan<T>>()
            .expect("plans are keyed by dtype");
        with_workspace(dev, plan.workspace, |ws| {
            // SAFETY: as above.
            unsafe {
                plan.forward()
                    .launch(plan.algo, Some(ws), (T::one(), T::zero()), &x, &w, &mut y)
            }?;
            Ok(())
        })
    })?;
    Ok(y)
}

impl<T: CudnnDataType> Plan<T> {
    fn forward(&self) -> ConvForward<'_, T, f32, T> {
        ConvForward {
            conv: &self.conv,
            x: &self.x,
            w: &self.w,
            y: &self.y,
        }
    }
}

/// Descriptors for one shape; the algorithm still cuDNN's heuristic pick.
fn plan<T: CudnnDataType + WithDType>(
    op: &CudnnConv,
    d: Dims,
    out: [usize; 4],
    dev: &CudaDevice,
) -> Result<Plan<T>> {
    let cudnn = handle(dev)?;
    let i32s = |a: [usize; 4]| -> Result<[i32; 4]> {
        let mut r = [0i32; 4];
        for (r, a) in r.iter_mut().zip(a) {
            *r = i32::try_from(a).map_err(|_| {
                candle_core::Error::Msg(format!("dnd-cudnn-conv2d: dimension {a} over 2^31"))
            })?;
        }
        Ok(r)
    };
    let format = match op.format {
        Format::Nchw => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Format::Nhwc => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    };
    let (p, s) = (op.padding as i32, op.stride as i32);
    let mut conv = cudnn.create_conv2d::<f32>(
        [p, p],
        [s, s],
        [1, 1],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    if T::DTYPE != DType::F32 {
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
    }
    // Filters seeing C / groups channels each; the dims (a plan's key) determine it.
    let groups = d.x[1] / d.w[1];
    if groups > 1 {
        conv.set_group_count(groups as i32)?;
    }
    let x = cudnn.create_4d_tensor::<T>(format, i32s(d.x)?)?;
    let w = cudnn.create_4d_filter::<T>(format, i32s(d.w)?)?;
    let y = cudnn.create_4d_tensor::<T>(format, i32s(out)?)?;
    let mut plan = Plan {
        conv,
        x,
        w,
        y,
        algo: Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        workspace: 0,
    };
    plan.algo = plan.forward().pick_algorithm()?;
    plan.workspace = plan.forward().get_workspace_size(plan.algo)?;
    Ok(plan)
}

/// `plan` with the algorithm that took least time over two runs of `run` after one to warm
/// up, among cuDNN's heuristic pick and every algorithm it accepts for the shape within
/// `WORKSPACE_CAP`. The heuristic pick must run; the others may refuse.
fn choose<T: CudnnDataType>(
    mut plan: Plan<T>,
    dev: &CudaDevice,
    mut run: impl FnMut(&ConvForward<'_, T, f32, T>, Algo, &mut CudaSlice<u8>) -> Result<()>,
) -> Result<Plan<T>> {
    let stream = dev.cuda_stream();
    let mut best: Option<(Duration, Algo, usize)> = None;
    let heuristic = plan.algo;
    for algo in std::iter::once(heuristic).chain(ALGOS.into_iter().filter(|&a| a != heuristic)) {
        let fwd = plan.forward();
        let bytes = match fwd.get_workspace_size(algo) {
            Ok(b) if b <= WORKSPACE_CAP || algo == heuristic => b,
            Err(e) if algo == heuristic => return Err(e.into()),
            _ => continue,
        };
        let timed = with_workspace(dev, bytes, |ws| {
            run(&fwd, algo, ws)?;
            stream.synchronize().w()?;
            let t = Instant::now();
            for _ in 0..2 {
                run(&fwd, algo, ws)?;
            }
            stream.synchronize().w()?;
            Ok(t.elapsed())
        });
        match timed {
            Ok(took) if best.is_none_or(|(b, ..)| took < b) => best = Some((took, algo, bytes)),
            Ok(_) => {}
            Err(e) if algo == heuristic => return Err(e),
            Err(_) => {}
        }
    }
    // The heuristic pick ran, or its error was returned.
    let (_, algo, workspace) = best.expect("a timed algorithm");
    plan.algo = algo;
    plan.workspace = workspace;
    Ok(plan)
}
