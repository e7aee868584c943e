//! The kernels of `kernels.cu` as candle custom ops on CUDA tensors: compiled by NVRTC once per
//! process, loaded into each device's context on first use.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Tensor, WithDType,
};

use super::vec_path;
use crate::nn::Act;

const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "dnd_gpu_ops";
const THREADS: u32 = 256;
/// Elements of a group per block of the GroupNorm kernels: 32 per thread.
const GROUP_CHUNK: usize = 8192;

/// Whether our kernels replace candle's ops on CUDA: yes unless `DND_GPU_KERNELS=0` (to compare
/// against candle's path, or to step around a kernel that misbehaves on some GPU).
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DND_GPU_KERNELS").map_or(true, |v| v != "0"))
}

/// Whether `dev` has the tensor-core mma of sm_80 on, which the flash attention kernels need
/// (asked of the driver once per device).
fn has_mma(dev: &CudaDevice) -> Result<bool> {
    static KNOWN: OnceLock<Mutex<HashMap<DeviceId, bool>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    if let Some(&mma) = known.lock().expect("no panics while held").get(&dev.id()) {
        return Ok(mma);
    }
    let (major, _) = dev.cuda_stream().context().compute_capability().w()?;
    known
        .lock()
        .expect("no panics while held")
        .insert(dev.id(), major >= 8);
    Ok(major >= 8)
}

/// Where compiled kernels are kept between runs (`keep_kernels_in`); none: every process
/// compiles them.
static KERNEL_CACHE: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Keep the kernels' PTX in `dir` once compiled, and read it from there in later runs: NVRTC
/// takes seconds over them, at the first use of a GPU op in every process. The first call wins.
pub(crate) fn keep_kernels_in(dir: std::path::PathBuf) {
    let _ = KERNEL_CACHE.set(dir);
}

/// The kernels as PTX for `dev`: for compute_80 where it has mma (the flash attention kernels
/// included), for NVRTC's default target before that.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    type Compiled = OnceLock<std::result::Result<String, String>>;
    static WITH_MMA: Compiled = OnceLock::new();
    static WITHOUT: Compiled = OnceLock::new();
    let (cell, arch) = if has_mma(dev)? {
        (&WITH_MMA, Some("compute_80"))
    } else {
        (&WITHOUT, None)
    };
    cell.get_or_init(|| {
        let compile = || {
            let opts = nvrtc::CompileOptions {
                arch,
                ..Default::default()
            };
            nvrtc::compile_ptx_with_opts(SOURCE, opts)
                .map(|p| p.to_src())
                .map_err(|e| e.to_string())
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers; a failure leaves 0.0, which only weakens the key.
        let _ = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        let key = format!("{SOURCE}\0{arch:?}\0NVRTC {major}.{minor}");
        super::compiled_once(KERNEL_CACHE.get().map(|d| d.as_path()), &key, compile)
    })
    .as_deref()
    .map_err(|e| {
        candle_core::Error::Msg(format!(
            "NVRTC could not compile dnd's CUDA kernels ({e}); set DND_GPU_KERNELS=0 to use candle's ops instead"
        ))
    })
}

/// Storage `s` as a slice of `T`s, or an error naming `what`.
fn slice_of<'a, T: CudaDType + WithDType>(
    s: &'a CudaStorage,
    what: &str,
) -> Result<&'a CudaSlice<T>> {
    match s.as_cuda_slice::<T>() {
        Ok(slice) => Ok(slice),
        Err(_) => candle_core::bail!(
            "dnd-gpu-ops: the {what} is {:?}, the input {:?}",
            s.dtype(),
            T::DTYPE
        ),
    }
}

/// Storage `s` under layout `l` as a contiguous view of `T`s.
pub(super) fn view<'a, T: CudaDType + WithDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let slice = slice_of::<T>(s, what)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("dnd-gpu-ops: the {what} must be contiguous"),
    }
}

/// An uninitialised output of `len` elements.
pub(super) fn output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every op of ours writes each element of its output (cuDNN's convolution too: it
    // adds nothing of the old output), and workspaces are scratch.
    unsafe { dev.alloc::<T>(len) }
}

/// Runs `$run::<T>(args)` for the dtype of storage `$x` (or for `dtype $dt` on `device $dev`),
/// wrapping the slice it returns.
macro_rules! by_dtype {
    ($x:expr, $run:ident($($arg:expr),*)) => {
        by_dtype!(dtype $x.dtype(), device $x.device(), $run($($arg),*))
    };
    (dtype $dt:expr, device $dev:expr, $run:ident($($arg:expr),*)) => {{
        let dev = $dev.clone();
        let storage = match $dt {
            DType::F32 => CudaStorage::wrap_cuda_slice($run::<f32>($($arg),*)?, dev),
            DType::F16 => CudaStorage::wrap_cuda_slice($run::<half::f16>($($arg),*)?, dev),
            DType::BF16 => CudaStorage::wrap_cuda_slice($run::<half::bf16>($($arg),*)?, dev),
            dt => candle_core::bail!("dnd-gpu-ops: f32, f16 or bf16 only, not {dt:?}"),
        };
        storage
    }};
}
#[cfg(feature = "cudnn")]
pub(super) use by_dtype;

/// `blocks` blocks of `THREADS` threads.
fn blocks_of_threads(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `n` elements, eight an iteration on a vectorised path (`vec`):
/// enough blocks to fill the card, no more than the elements need.
fn grid_stride(n: u64, vec: i32) -> LaunchConfig {
    let iterations = if vec == 0 { n } else { n.div_ceil(8) };
    blocks_of_threads(iterations.div_ceil(THREADS as u64).clamp(1, 65_535) as usize)
}

pub(super) fn not_on_cpu() -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("dnd-gpu-ops run on CUDA only")
}

/// A one-input op of ours: only its CUDA side, which `Cuda1` makes a candle custom op.
trait Op1 {
    const NAME: &'static str;
    fn cuda(&self, x: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)>;
}

struct Cuda1<O>(O);

impl<O: Op1> candle_core::CustomOp1 for Cuda1<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0.cuda((x, xl))
    }
}

/// A two-input op of ours: only its CUDA side, which `Cuda2` makes a candle custom op.
pub(super) trait Op2 {
    const NAME: &'static str;
    fn cuda(
        &self,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>;
}

pub(super) struct Cuda2<O>(pub(super) O);

impl<O: Op2> CustomOp2 for Cuda2<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.0.cuda((a, al), (b, bl))
    }
}

/// A three-input op of ours: only its CUDA side, which `Cuda3` makes a candle custom op.
trait Op3 {
    const NAME: &'static str;
    fn cuda(
        &self,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        c: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>;
}

struct Cuda3<O>(O);

impl<O: Op3> CustomOp3 for Cuda3<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.0.cuda((a, al), (b, bl), (c, cl))
    }
}

/// `(channels, plane)` of an NCHW-like layout: dim 1, and the product of the dims after it.
fn channels_plane(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    if dims.len() < 2 {
        candle_core::bail!("dnd-gpu-ops: expected (N, C, ...), got {:?}", dims)
    }
    Ok((dims[1], dims[2..].iter().product()))
}

/// A norm's affine map must hold a weight and a bias for each of its `c` channels.
fn check_affine(op: &str, c: usize, gl: &Layout, bl: &Layout) -> Result<()> {
    if gl.shape().elem_count() != c || bl.shape().elem_count() != c {
        candle_core::bail!("{op}: {c} channels, weights and biases of another size")
    }
    Ok(())
}

/// GroupNorm over `groups` of a CUDA `x` `(N, C, ...)`, its affine map, then SiLU when `silu`:
/// three kernels, whatever the size of the groups. A view of channels-last storage is
/// normalised in place of it, the output another such view.
pub(crate) fn group_norm(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormOp { groups, eps, silu };
    if let Some(rows) = crate::nn::channels_last_storage(x)? {
        let c = rows.dim(3)?;
        if super::group_norm_nhwc_threads(c, groups).is_some() {
            return rows
                .apply_op3_no_bwd(gamma, beta, &Cuda3(GroupNormNhwc(op)))?
                .permute((0, 3, 1, 2));
        }
    }
    x.contiguous()?.apply_op3_no_bwd(gamma, beta, &Cuda3(op))
}

/// GroupNorm's middle step, whatever the layout: the (count, mean, sum of squared deviations)
/// of each of `groups` groups' `chunks` chunks, group after group, into each group's (mean,
/// 1 / std).
fn combine_chunks(
    stats: &CudaSlice<f32>,
    groups: usize,
    chunks: u64,
    eps: f64,
    dev: &CudaDevice,
) -> Result<CudaSlice<f32>> {
    let norm = output::<f32>(dev, 2 * groups)?;
    let func = dev.get_or_load_custom_func("group_combine", MODULE, ptx(dev)?)?;
    let eps = eps as f32;
    let mut args = func.builder();
    args.arg(stats).arg(&norm).arg(&chunks).arg(&eps);
    // SAFETY: the arguments match group_combine's signature in kernels.cu.
    unsafe { args.launch(blocks_of_threads(groups)) }.w()?;
    Ok(norm)
}

/// GroupNorm over channels-last `(N, H, W, C)` storage.
struct GroupNormNhwc(GroupNormOp);

/// Elements of an image per block of `group_stats_nhwc`: a chunk of whole pixels about this
/// long.
const NHWC_CHUNK: usize = 32_768;

fn group_norm_nhwc_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &GroupNormOp,
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let (n, h, w, c) = xl.shape().dims4()?;
    let Some(threads) = super::group_norm_nhwc_threads(c, op.groups) else {
        candle_core::bail!(
            "dnd-gpu-group-norm: no block shape for {c} channels in {} groups",
            op.groups
        )
    };
    let vec = vec_path::rows_of_eights(T::DTYPE, xl.start_offset().is_multiple_of(8), c);
    let x = view::<T>(x, xl, "input")?;
    let (g, b) = (view::<T>(g, gl, "weight")?, view::<T>(b, bl, "bias")?);
    let dt = T::DTYPE.as_str();
    let pixels = h * w;
    let chunk_px = (NHWC_CHUNK / c).max(1);
    let chunks = pixels.div_ceil(chunk_px);
    let (c_, groups) = (c as i32, op.groups as i32);
    let (pixels_, chunk_px_) = (pixels as u64, chunk_px as u64);
    // (count, mean, sum of squared deviations) per chunk of each group, as group_stats.
    let stats = output::<f32>(dev, 3 * n * op.groups * chunks)?;
    let func = dev.get_or_load_custom_func(&format!("group_stats_nhwc_{dt}"), MODULE, ptx(dev)?)?;
    let mut args = func.builder();
    args.arg(&x)
        .arg(&stats)
        .arg(&pixels_)
        .arg(&c_)
        .arg(&groups)
        .arg(&chunk_px_);
    let cfg = LaunchConfig {
        grid_dim: ((n * chunks) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match group_stats_nhwc's signature in kernels.cu; the block is a
    // multiple of c threads or a slice of c, as it requires.
    unsafe { args.launch(cfg) }.w()?;

    let norm = combine_chunks(&stats, n * op.groups, chunks as u64, op.eps, dev)?;

    let y = output::<T>(dev, x.len())?;
    let func = dev.get_or_load_custom_func(&format!("group_apply_nhwc_{dt}"), MODULE, ptx(dev)?)?;
    let (total, image, silu) = (x.len() as u64, (pixels * c) as u64, i32::from(op.silu));
    let mut args = func.builder();
    args.arg(&x).arg(&norm).arg(&g).arg(&b).arg(&y);
    args.arg(&total)
        .arg(&image)
        .arg(&c_)
        .arg(&groups)
        .arg(&silu)
        .arg(&vec);
    // SAFETY: the arguments match group_apply_nhwc's signature in kernels.cu; the three
    // kernels run in order on the device's stream.
    unsafe { args.launch(grid_stride(total, vec)) }.w()?;
    Ok(y)
}

impl Op3 for GroupNormNhwc {
    const NAME: &'static str = "dnd-gpu-group-norm-nhwc";

    fn cuda(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        check_affine(Self::NAME, xl.shape().dims4()?.3, gl, bl)?;
        let out = by_dtype!(
            x,
            group_norm_nhwc_launch(&self.0, (x, xl), (g, gl), (b, bl), x.device())
        );
        Ok((out, xl.shape().clone()))
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

fn group_norm_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &GroupNormOp,
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let (channels, plane) = channels_plane(xl)?;
    let len = (channels / op.groups * plane).max(1);
    if len >= u32::MAX as usize {
        candle_core::bail!("dnd-gpu-group-norm: groups of {len} elements, over the kernel's 2^32")
    }
    let aligned = xl.start_offset().is_multiple_of(8);
    let vec_stats = vec_path::group_stats(T::DTYPE, aligned, len, GROUP_CHUNK);
    let vec_apply = vec_path::group_apply(T::DTYPE, aligned, plane, GROUP_CHUNK);
    let x = view::<T>(x, xl, "input")?;
    let (g, b) = (view::<T>(g, gl, "weight")?, view::<T>(b, bl, "bias")?);
    let blocks = (x.len() / len) * len.div_ceil(GROUP_CHUNK);
    let cfg = blocks_of_threads(blocks);
    let (len, chunk) = (len as u64, GROUP_CHUNK as u64);
    // (count, mean, sum of squared deviations) per chunk of each group.
    let stats = output::<f32>(dev, 3 * blocks)?;
    let name = format!("group_stats_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let mut args = func.builder();
    args.arg(&x)
        .arg(&stats)
        .arg(&len)
        .arg(&chunk)
        .arg(&vec_stats);
    // SAFETY: the arguments match group_stats' signature in kernels.cu.
    unsafe { args.launch(cfg) }.w()?;

    let norm = combine_chunks(
        &stats,
        x.len() / len as usize,
        len.div_ceil(chunk),
        op.eps,
        dev,
    )?;

    let y = output::<T>(dev, x.len())?;
    let name = format!("group_apply_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let (channels, groups) = (channels as i32, op.groups as i32);
    let (plane, silu) = (plane as u64, i32::from(op.silu));
    let mut args = func.builder();
    args.arg(&x).arg(&norm).arg(&g).arg(&b).arg(&y);
    args.arg(&channels).arg(&groups).arg(&plane).arg(&chunk);
    args.arg(&silu).arg(&vec_apply);
    // SAFETY: the arguments match group_apply's signature in kernels.cu; the three kernels run
    // in order on the device's stream.
    unsafe { args.launch(cfg) }.w()?;
    Ok(y)
}

impl Op3 for GroupNormOp {
    const NAME: &'static str = "dnd-gpu-group-norm";

    fn cuda(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (channels, _) = channels_plane(xl)?;
        check_affine(Self::NAME, channels, gl, bl)?;
        if self.groups == 0 || channels % self.groups != 0 {
            candle_core::bail!(
                "dnd-gpu-group-norm: {channels} channels in {} groups",
                self.groups
            )
        }
        let out = by_dtype!(
            x,
            group_norm_launch(self, (x, xl), (g, gl), (b, bl), x.device())
        );
        Ok((out, xl.shape().clone()))
    }
}

/// A convolution's or linear layer's epilogue `act(x + bias (+ residual))` over `(N, C, ...)`,
/// or with `channels_last` over rows `(N, pixels, C)`; the bias `(C)` or `(N, C)`:
/// `x.apply_op2_no_bwd(&bias, ..)` or `x.apply_op3_no_bwd(&bias, &residual, ..)`.
struct BiasAct {
    act: Act,
    channels_last: bool,
}

fn bias_act_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &BiasAct,
    (x, xl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let bias_len = bl.shape().elem_count();
    // The kernel's (plane, bias length, elements an image): channels-last rows find an image's
    // biases by `image`; (N, C, plane) by a bias as long as the images' channels.
    let (channels, plane, per_image) = if op.channels_last {
        let (_, pixels, c) = xl.shape().dims3()?;
        (c, 1, pixels * c)
    } else {
        let (c, plane) = channels_plane(xl)?;
        (c, plane, 0)
    };
    let (bias_len, image) = if bias_len == channels {
        (bias_len, 0)
    } else if bias_len == xl.dims()[0] * channels {
        if op.channels_last {
            (channels, per_image)
        } else {
            (bias_len, 0)
        }
    } else {
        candle_core::bail!(
            "dnd-gpu-bias-act: a bias of {bias_len} for {:?}: one per channel or per image and channel",
            xl.dims()
        )
    };
    let aligned = [Some(xl), Some(bl), residual.map(|(_, rl)| rl)]
        .into_iter()
        .flatten()
        .all(|l| l.start_offset().is_multiple_of(8));
    let vec = vec_path::bias_act(T::DTYPE, aligned, xl.shape().elem_count(), plane, bias_len);
    let x = view::<T>(x, xl, "input")?;
    let b = view::<T>(b, bl, "bias")?;
    let r = match residual {
        Some((_, rl)) if rl.shape() != xl.shape() => {
            candle_core::bail!("dnd-gpu-bias-act: the residual's shape differs from the input's")
        }
        Some((r, rl)) => Some(view::<T>(r, rl, "residual")?),
        None => None,
    };
    let name = format!("bias_act_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let y = output::<T>(dev, x.len())?;
    let (n, bias_len, plane, image) = (x.len() as u64, bias_len as u64, plane as u64, image as u64);
    let (act, null) = (op.act.code(), 0u64);
    let mut args = func.builder();
    args.arg(&x).arg(&b);
    match &r {
        Some(r) => args.arg(r),
        None => args.arg(&null),
    };
    args.arg(&y)
        .arg(&n)
        .arg(&bias_len)
        .arg(&plane)
        .arg(&image)
        .arg(&act)
        .arg(&vec);
    let cfg = grid_stride(n, vec);
    // SAFETY: the arguments match bias_act's signature in kernels.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(y)
}

impl Op2 for BiasAct {
    const NAME: &'static str = "dnd-gpu-bias-act";

    fn cuda(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(x, bias_act_launch(self, (x, xl), (b, bl), None, x.device()));
        Ok((out, xl.shape().clone()))
    }
}

impl Op3 for BiasAct {
    const NAME: &'static str = "dnd-gpu-bias-act";

    fn cuda(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        (r, rl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(
            x,
            bias_act_launch(self, (x, xl), (b, bl), Some((r, rl)), x.device())
        );
        Ok((out, xl.shape().clone()))
    }
}

/// `act(y + bias (+ residual))` for a CUDA `y` `(N, C, ...)`, or with `channels_last` rows
/// `(N, pixels, C)`, and `bias` `(C)` or `(N, C)`, in one kernel.
pub(crate) fn bias_act(
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    act: Act,
    channels_last: bool,
) -> Result<Tensor> {
    let op = BiasAct { act, channels_last };
    let y = y.contiguous()?;
    match residual {
        Some(r) => y.apply_op3_no_bwd(bias, &r.contiguous()?, &Cuda3(op)),
        None => y.apply_op2_no_bwd(bias, &Cuda2(op)),
    }
}

/// LayerNorm over the last dimension of a CUDA `x` with the affine map `gamma`, `beta`: one
/// kernel, a warp a row.
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(gamma, beta, &Cuda3(LayerNormOp { eps }))
}

struct LayerNormOp {
    eps: f64,
}

fn layer_norm_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &LayerNormOp,
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let c = xl.dims().last().copied().unwrap_or(1).max(1);
    let aligned = [xl, gl, bl]
        .iter()
        .all(|l| l.start_offset().is_multiple_of(8));
    let vec = vec_path::rows_of_eights(T::DTYPE, aligned, c);
    let x = view::<T>(x, xl, "input")?;
    let (g, b) = (view::<T>(g, gl, "weight")?, view::<T>(b, bl, "bias")?);
    let y = output::<T>(dev, x.len())?;
    let name = format!("layer_norm_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let (rows, c_, eps) = ((x.len() / c) as u64, c as i32, op.eps as f32);
    let mut args = func.builder();
    args.arg(&x).arg(&g).arg(&b).arg(&y);
    args.arg(&rows).arg(&c_).arg(&eps).arg(&vec);
    // One warp a row.
    let cfg = blocks_of_threads((x.len() / c).div_ceil(THREADS as usize / 32));
    // SAFETY: the arguments match layer_norm's signature in kernels.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(y)
}

impl Op3 for LayerNormOp {
    const NAME: &'static str = "dnd-gpu-layer-norm";

    fn cuda(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        check_affine(Self::NAME, xl.dims().last().copied().unwrap_or(0), gl, bl)?;
        let out = by_dtype!(
            x,
            layer_norm_launch(self, (x, xl), (g, gl), (b, bl), x.device())
        );
        Ok((out, xl.shape().clone()))
    }
}

/// diffusers' GEGLU over the last dimension of a CUDA `x` `(..., 2 * inner)`: the first half
/// times the exact GELU of the second, in one kernel; `bias` (`2 * inner`, the linear layer's
/// that made `x`) added on the way in.
pub(crate) fn geglu(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op2_no_bwd(&b.contiguous()?, &Cuda2(Geglu)),
        None => x.apply_op1_no_bwd(&Cuda1(Geglu)),
    }
}

struct Geglu;

fn geglu_launch<T: CudaDType + DeviceRepr + WithDType>(
    (x, xl): (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let last = xl.dims().last().copied().unwrap_or(0);
    if let Some((_, bl)) = bias {
        if bl.shape().elem_count() != last {
            candle_core::bail!(
                "dnd-gpu-geglu: a bias of {} for rows of {last}",
                bl.shape().elem_count()
            );
        }
    }
    let aligned = [Some(xl), bias.map(|(_, bl)| bl)]
        .into_iter()
        .flatten()
        .all(|l| l.start_offset().is_multiple_of(8));
    let vec = vec_path::rows_of_eights(T::DTYPE, aligned, last / 2);
    let x = view::<T>(x, xl, "input")?;
    let b = bias.map(|(b, bl)| view::<T>(b, bl, "bias")).transpose()?;
    let (rows, inner) = ((x.len() / last.max(1)) as u64, (last / 2) as u64);
    let name = format!("geglu_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let y = output::<T>(dev, x.len() / 2)?;
    let null = 0u64;
    let mut args = func.builder();
    args.arg(&x);
    match &b {
        Some(b) => args.arg(b),
        None => args.arg(&null),
    };
    args.arg(&y).arg(&rows).arg(&inner).arg(&vec);
    let cfg = grid_stride(rows * inner, vec);
    // SAFETY: the arguments match geglu's signature in kernels.cu (a null bias is none).
    unsafe { args.launch(cfg) }.w()?;
    Ok(y)
}

impl Geglu {
    fn run(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let mut dims = xl.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last % 2 == 0 => *last /= 2,
            _ => candle_core::bail!("dnd-gpu-geglu: the last dimension of {dims:?} must be even"),
        }
        let out = by_dtype!(x, geglu_launch((x, xl), bias, x.device()));
        Ok((out, Shape::from(dims)))
    }
}

impl Op1 for Geglu {
    const NAME: &'static str = "dnd-gpu-geglu";

    fn cuda(&self, x: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
        self.run(x, None)
    }
}

impl Op2 for Geglu {
    const NAME: &'static str = "dnd-gpu-geglu-bias";

    fn cuda(
        &self,
        x: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        self.run(x, Some(bias))
    }
}

/// Resized, cropped 8-bit images `(N, S, S, 3)` on CUDA as a network's input `(N, 3, S, S)` in
/// `dtype`: `(v / 255 - mean) / std` per channel, as the CPU computes it, in one kernel.
pub(crate) fn normalise_pixels(
    x: &Tensor,
    mean: [f32; 3],
    std: [f32; 3],
    dtype: DType,
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&Cuda1(NormalisePixels { mean, std, dtype }))
}

struct NormalisePixels {
    mean: [f32; 3],
    std: [f32; 3],
    dtype: DType,
}

fn normalise_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &NormalisePixels,
    (x, xl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let (n, h, w, _) = xl.shape().dims4()?;
    let x = view::<u8>(x, xl, "pixels")?;
    let y = output::<T>(dev, x.len())?;
    let (n, plane) = (n as u64, (h * w) as u64);
    let name = format!("normalise_pixels_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let mut args = func.builder();
    args.arg(&x).arg(&y).arg(&n).arg(&plane);
    for v in op.mean.iter().chain(&op.std) {
        args.arg(v);
    }
    // SAFETY: the arguments match normalise_pixels's signature in kernels.cu.
    unsafe { args.launch(grid_stride(n * 3 * plane, 0)) }.w()?;
    Ok(y)
}

impl Op1 for NormalisePixels {
    const NAME: &'static str = "dnd-gpu-normalise-pixels";

    fn cuda(&self, (x, xl): (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
        let (n, h, w, c) = xl.shape().dims4()?;
        if c != 3 || x.dtype() != DType::U8 {
            candle_core::bail!(
                "dnd-gpu-ops: pixels are 8-bit (N, H, W, 3), not {:?} {:?}",
                x.dtype(),
                xl.dims()
            );
        }
        let dev = x.device();
        let y = by_dtype!(dtype self.dtype, device dev, normalise_launch(self, (x, xl), dev));
        Ok((y, Shape::from((n, 3, h, w))))
    }
}

/// Nearest 2x upsampling of a CUDA `x` `(N, C, H, W)` in one kernel.
pub(crate) fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    match crate::nn::channels_last_storage(x)? {
        Some(rows) => rows
            .apply_op1_no_bwd(&Cuda1(Upsample2x { nhwc: true }))?
            .permute((0, 3, 1, 2)),
        None => x
            .contiguous()?
            .apply_op1_no_bwd(&Cuda1(Upsample2x { nhwc: false })),
    }
}

/// Nearest 2x upsampling of contiguous `(N, C, H, W)`, or with `nhwc` of `(N, H, W, C)`.
struct Upsample2x {
    nhwc: bool,
}

fn upsample_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &Upsample2x,
    (x, xl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let dims = xl.shape().dims4()?;
    let aligned = xl.start_offset().is_multiple_of(8);
    let x = view::<T>(x, xl, "input")?;
    let y = output::<T>(dev, 4 * x.len())?;
    let dt = T::DTYPE.as_str();
    if op.nhwc {
        let (n, h, w, c) = dims;
        let vec = vec_path::rows_of_eights(T::DTYPE, aligned, c);
        let (rows, w, c) = ((n * h) as u64, w as u64, c as u64);
        let func =
            dev.get_or_load_custom_func(&format!("upsample2x_nhwc_{dt}"), MODULE, ptx(dev)?)?;
        let mut args = func.builder();
        args.arg(&x).arg(&y).arg(&rows).arg(&w).arg(&c).arg(&vec);
        // SAFETY: the arguments match upsample2x_nhwc's signature in kernels.cu.
        unsafe { args.launch(grid_stride(rows * w * c, vec)) }.w()?;
        return Ok(y);
    }
    let (n, c, h, w) = dims;
    let vec = vec_path::rows_of_eights(T::DTYPE, aligned, w);
    let (rows, w) = ((n * c * h) as u64, w as u64);
    let func = dev.get_or_load_custom_func(&format!("upsample2x_{dt}"), MODULE, ptx(dev)?)?;
    let mut args = func.builder();
    args.arg(&x).arg(&y).arg(&rows).arg(&w).arg(&vec);
    // SAFETY: the arguments match upsample2x's signature in kernels.cu.
    unsafe { args.launch(grid_stride(rows * w, vec)) }.w()?;
    Ok(y)
}

impl Op1 for Upsample2x {
    const NAME: &'static str = "dnd-gpu-upsample2x";

    fn cuda(&self, (x, xl): (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
        let (n, a, b, c) = xl.shape().dims4()?;
        let y = by_dtype!(x, upsample_launch(self, (x, xl), x.device()));
        let shape = if self.nhwc {
            (n, 2 * a, 2 * b, c)
        } else {
            (n, a, 2 * b, 2 * c)
        };
        Ok((y, Shape::from(shape)))
    }
}

/// Nearest 2x upsampling then a 3x3 convolution, its second half: `phases` `(N, H+1, W+1, 4K)`
/// holds the four output phases' convolutions of the small input by 2x2 filters (padding 1,
/// channels-last); returns `(N, 2H, 2W, K)` with each phase in its places and `bias` `(K)`
/// added, in one pass. (cuDNN builds: the first half is a channels-last cuDNN convolution.)
#[cfg(feature = "cudnn")]
pub(crate) fn interleave_phases(phases: &Tensor, bias: &Tensor) -> Result<Tensor> {
    phases
        .contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &Cuda2(InterleavePhases))
}

#[cfg(feature = "cudnn")]
struct InterleavePhases;

#[cfg(feature = "cudnn")]
fn interleave_launch<T: CudaDType + DeviceRepr + WithDType>(
    (x, xl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let (n, h1, w1, k4) = xl.shape().dims4()?;
    let (h, w, k) = (h1 - 1, w1 - 1, k4 / 4);
    let aligned = xl.start_offset().is_multiple_of(8) && bl.start_offset().is_multiple_of(8);
    let vec = vec_path::rows_of_eights(T::DTYPE, aligned, k);
    let x = view::<T>(x, xl, "phases")?;
    let b = view::<T>(b, bl, "bias")?;
    let y = output::<T>(dev, n * 4 * h * w * k)?;
    let func = dev.get_or_load_custom_func(
        &format!("interleave_phases_nhwc_{}", T::DTYPE.as_str()),
        MODULE,
        ptx(dev)?,
    )?;
    let (n, h, w, k) = (n as u64, h as u64, w as u64, k as u64);
    let mut args = func.builder();
    args.arg(&x)
        .arg(&b)
        .arg(&y)
        .arg(&n)
        .arg(&h)
        .arg(&w)
        .arg(&k)
        .arg(&vec);
    // SAFETY: the arguments match interleave_phases_nhwc's signature in kernels.cu.
    unsafe { args.launch(grid_stride(n * 4 * h * w * k, vec)) }.w()?;
    Ok(y)
}

#[cfg(feature = "cudnn")]
impl Op2 for InterleavePhases {
    const NAME: &'static str = "dnd-gpu-interleave-phases";

    fn cuda(
        &self,
        x: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (n, h1, w1, k4) = x.1.shape().dims4()?;
        if h1 < 2 || w1 < 2 || k4 % 4 != 0 || b.1.shape().elem_count() != k4 / 4 {
            candle_core::bail!(
                "dnd-gpu-interleave-phases: phases {:?} and bias {:?} do not fit",
                x.1.dims(),
                b.1.dims()
            )
        }
        let y = by_dtype!(x.0, interleave_launch(x, b, x.0.device()));
        Ok((y, Shape::from((n, 2 * (h1 - 1), 2 * (w1 - 1), k4 / 4))))
    }
}

/// Max pooling of a CUDA `x` `(N, C, H, W)` held channels-last (NHWC storage, as our cuDNN
/// convolutions leave it), `window` x `window` at `stride` with `padding` rows and columns of
/// -inf around, as PyTorch's max_pool2d: one kernel reading the NHWC storage in place. The
/// result is an `(N, C, P, Q)` view of NHWC storage too.
pub(crate) fn max_pool_channels_last(
    x: &Tensor,
    window: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = MaxPool {
        window,
        stride,
        padding,
    };
    x.permute((0, 2, 3, 1))?
        .contiguous()?
        .apply_op1_no_bwd(&Cuda1(op))?
        .permute((0, 3, 1, 2))
}

struct MaxPool {
    window: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool {
    /// `(N, H, W, C)` in, `(N, P, Q, C)` out.
    fn dims(&self, l: &Layout) -> Result<([usize; 4], [usize; 4])> {
        let (n, h, w, c) = l.shape().dims4()?;
        let out = |len: usize| (len + 2 * self.padding).checked_sub(self.window);
        match (out(h), out(w)) {
            (Some(p), Some(q)) if self.stride > 0 && 2 * self.padding <= self.window => Ok((
                [n, h, w, c],
                [n, p / self.stride + 1, q / self.stride + 1, c],
            )),
            _ => candle_core::bail!(
                "dnd-gpu-max-pool: window {}, stride {}, padding {} on {h}x{w}",
                self.window,
                self.stride,
                self.padding
            ),
        }
    }
}

fn max_pool_launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &MaxPool,
    (x, xl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let ([n, h, w, c], [_, p, q, _]) = op.dims(xl)?;
    let vec = vec_path::rows_of_eights(T::DTYPE, xl.start_offset().is_multiple_of(8), c);
    let x = view::<T>(x, xl, "input")?;
    let outputs = n * p * q * c;
    let y = output::<T>(dev, outputs)?;
    let name = format!("max_pool_nhwc_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let dims = [n, h, w, c, p, q, op.window, op.stride, op.padding];
    let Ok(dims) = dims
        .map(i32::try_from)
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()
    else {
        candle_core::bail!("dnd-gpu-max-pool: a dimension of {dims:?} is over 2^31")
    };
    let mut args = func.builder();
    args.arg(&x).arg(&y);
    for d in &dims {
        args.arg(d);
    }
    args.arg(&vec);
    let cfg = grid_stride(outputs as u64, vec);
    // SAFETY: the arguments match max_pool_nhwc's signature in kernels.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(y)
}

impl Op1 for MaxPool {
    const NAME: &'static str = "dnd-gpu-max-pool";

    fn cuda(&self, (x, xl): (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
        let (_, out) = self.dims(xl)?;
        let y = by_dtype!(x, max_pool_launch(self, (x, xl), x.device()));
        Ok((y, Shape::from(out.to_vec())))
    }
}

/// Whether `flash_attention` takes these operands: 16-bit (B, H, T, D) tensors on a CUDA device
/// with mma (sm_80 on), the same D for q, k and v, a multiple of 8 up to 160; and our kernels
/// not turned off.
pub(crate) fn flash_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let candle_core::Device::Cuda(dev) = q.device() else {
        return false;
    };
    let (Ok((b, h, _, d)), Ok(kd), Ok(vd)) = (q.dims4(), k.dims4(), v.dims4()) else {
        return false;
    };
    super::on(super::Kernel::FlashAttention)
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && kd == vd
        && (kd.0, kd.1, kd.3) == (b, h, d)
        && d % 8 == 0
        && d <= 160
        && has_mma(dev).unwrap_or(false)
}

/// softmax(q k^T * scale) v for operands `flash_applies` takes, in one kernel that never holds
/// the T x T scores. The operands may be strided views (heads split from (B, T, H*D)
/// projections are read in place); the result is a (B, H, Tq, D) view of (B, Tq, H, D)
/// memory, which merges back into (B, Tq, H*D) without a copy.
pub(crate) fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // The kernel takes any batch, head and row strides, but the head dimension contiguous.
    let rows_contiguous = |t: &Tensor| -> Result<Tensor> {
        let l = t.layout();
        if l.stride()[3] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (
        rows_contiguous(q)?,
        rows_contiguous(k)?,
        rows_contiguous(v)?,
    );
    q.apply_op3_no_bwd(&k, &v, &Cuda3(FlashAttention { scale }))?
        .transpose(1, 2)
}

struct FlashAttention {
    scale: f64,
}

/// Batch, head and row strides of a (B, H, T, D) operand, in elements (`Strides` in
/// kernels.cu).
#[repr(C)]
struct Strides {
    batch: u64,
    head: u64,
    row: u64,
}

// SAFETY: plain old data, laid out as the kernels' `Strides` (three 64-bit integers).
unsafe impl DeviceRepr for Strides {}

impl Strides {
    fn of(l: &Layout) -> Self {
        let s = l.stride();
        Self {
            batch: s[0] as u64,
            head: s[1] as u64,
            row: s[2] as u64,
        }
    }
}

/// A view of `s` from `l`'s start to the end of the storage: all a strided operand can reach.
fn strided<'a, T: CudaDType + WithDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    Ok(slice_of::<T>(s, what)?.slice(l.start_offset()..))
}

fn flash_launch<T: CudaDType + DeviceRepr + WithDType>(
    scale: f64,
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let (b, h, tq, d) = ql.shape().dims4()?;
    let tk = kl.shape().dims4()?.2;
    let Some((d8, rows)) = super::flash_kernel(d) else {
        candle_core::bail!("dnd-gpu-flash-attention: head size {d} over 160")
    };
    let strides = [Strides::of(ql), Strides::of(kl), Strides::of(vl)];
    // Keys and values load with cp.async, 16 bytes at a time, where they start 16-byte aligned
    // (cudarc's allocations are) and every stride keeps them so.
    let aligned = |l: &Layout| {
        l.start_offset().is_multiple_of(8) && l.stride()[..3].iter().all(|s| s.is_multiple_of(8))
    };
    let vec = i32::from(aligned(kl) && aligned(vl));
    let (q, k, v) = (
        strided::<T>(q, ql, "query")?,
        strided::<T>(k, kl, "key")?,
        strided::<T>(v, vl, "value")?,
    );
    let name = format!("flash_attention_{}_{d8}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let out = output::<T>(dev, b * h * tq * d)?;
    let (h_, tq_, tk_, d_, rows_) = (h as i32, tq as i32, tk as i32, d as i32, rows as i32);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let mut args = func.builder();
    args.arg(&q).arg(&k).arg(&v).arg(&out);
    args.arg(&h_).arg(&tq_).arg(&tk_).arg(&d_).arg(&scale_log2);
    args.arg(&strides[0])
        .arg(&strides[1])
        .arg(&strides[2])
        .arg(&vec)
        .arg(&rows_);
    let cfg = LaunchConfig {
        grid_dim: ((b * h * tq.div_ceil(rows)) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match flash_attention's signature in kernels.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(out)
}

impl Op3 for FlashAttention {
    const NAME: &'static str = "dnd-gpu-flash-attention";

    fn cuda(
        &self,
        (q, ql): (&CudaStorage, &Layout),
        (k, kl): (&CudaStorage, &Layout),
        (v, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let out = match q.dtype() {
            DType::F16 | DType::BF16 => by_dtype!(
                q,
                flash_launch(self.scale, (q, ql), (k, kl), (v, vl), q.device())
            ),
            dt => candle_core::bail!("dnd-gpu-flash-attention: f16 or bf16 only, not {dt:?}"),
        };
        let (b, h, tq, d) = ql.shape().dims4()?;
        Ok((out, Shape::from((b, tq, h, d))))
    }
}
