//! dnd's own CUDA kernels (`kernels.cu`), for the ops where candle's CUDA path goes through
//! memory several times: GroupNorm with its affine map and SiLU (SD's UNet and VAE); a
//! convolution's or linear layer's bias (+ SD's time embedding) + residual + ReLU in one pass
//! (every convolution of ResNet, the UNet, the VAE and TAESD, every biased linear layer); the
//! GEGLU of SD's feed-forward layers, whose halves candle reads strided; and flash attention
//! on tensor cores, which never holds the T x T scores. With cuDNN, convolutions go through an
//! op of ours (`cudnn_conv`). On CUDA builds the kernels are
//! compiled at run time by NVRTC (`cuda.rs`), so the build needs no nvcc beyond candle's own.
//! Without a GPU they are tested by compiling the same source as host C++ under an emulation
//! of CUDA's launch model (`emu.hpp`, `emu_main.cpp`) and comparing with the CPU path.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn_conv;
#[cfg(feature = "cuda")]
pub(crate) mod setup;
#[cfg(feature = "cudnn")]
pub(crate) use cuda::interleave_phases;
#[cfg(feature = "cuda")]
pub(crate) use cuda::keep_kernels_in;
#[cfg(feature = "cuda")]
pub(crate) use cuda::{
    bias_act, enabled, flash_applies, flash_attention, geglu, group_norm, layer_norm,
    max_pool_channels_last, normalise_pixels, upsample_nearest2x,
};

/// dnd's CUDA kernels by family. `DND_GPU_KERNELS_OFF` names families to hand back to candle's
/// ops one by one (to step around a kernel that misbehaves on some GPU while keeping the rest);
/// `DND_GPU_KERNELS=0` hands back all of them. Each `--check` of one fused op names the family it
/// isolates, so a failing check says what to turn off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// GroupNorm (+ SiLU), on NCHW and channels-last storage.
    GroupNorm,
    /// Bias (+ SD's time embedding) + residual + activation after a convolution or linear layer.
    Epilogue,
    /// SD's GEGLU.
    Geglu,
    LayerNorm,
    /// Flash attention on tensor cores.
    FlashAttention,
    /// Nearest 2x upsampling.
    Upsample,
    /// An upsampler's convolution computed on the small input, phase by phase (with cuDNN).
    UpsampleConv,
    /// ResNet's stem max pool on channels-last storage.
    MaxPool,
    /// 8-bit images normalised into a network's input.
    Pixels,
    /// Grouped convolutions (ResNeXt's, ConvNeXt's depthwise) as one call of our cuDNN op with
    /// cuDNN's group count; off, candle's conv2d runs one convolution per group.
    GroupedConv,
}

impl Kernel {
    pub const ALL: [Kernel; 10] = [
        Kernel::GroupNorm,
        Kernel::Epilogue,
        Kernel::Geglu,
        Kernel::LayerNorm,
        Kernel::FlashAttention,
        Kernel::Upsample,
        Kernel::UpsampleConv,
        Kernel::MaxPool,
        Kernel::Pixels,
        Kernel::GroupedConv,
    ];

    /// The name `DND_GPU_KERNELS_OFF` and `--check`'s reports use.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::GroupNorm => "group_norm",
            Kernel::Epilogue => "epilogue",
            Kernel::Geglu => "geglu",
            Kernel::LayerNorm => "layer_norm",
            Kernel::FlashAttention => "flash_attention",
            Kernel::Upsample => "upsample",
            Kernel::UpsampleConv => "upsample_conv",
            Kernel::MaxPool => "max_pool",
            Kernel::Pixels => "pixels",
            Kernel::GroupedConv => "grouped_conv",
        }
    }
}

/// `DND_GPU_KERNELS_OFF`'s comma-separated family names (spaces and empty entries ignored).
fn parse_off(list: &str) -> Result<Vec<Kernel>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            Kernel::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
                    format!(
                        "DND_GPU_KERNELS_OFF names {name:?}, which is no kernel of dnd's: use some of {}",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

/// The kernel families `DND_GPU_KERNELS_OFF` turns off (read once), or why it cannot be read.
pub fn kernels_off() -> Result<&'static [Kernel], String> {
    static OFF: std::sync::OnceLock<Result<Vec<Kernel>, String>> = std::sync::OnceLock::new();
    OFF.get_or_init(|| parse_off(&std::env::var("DND_GPU_KERNELS_OFF").unwrap_or_default()))
        .as_deref()
        .map_err(Clone::clone)
}

/// Whether `kernel` replaces candle's ops on CUDA: our kernels on (`DND_GPU_KERNELS` not 0) and
/// this family not named in `DND_GPU_KERNELS_OFF` (`device::open` refuses a list it cannot
/// read, so a bad one never gets here; should it, nothing is turned off).
#[cfg(feature = "cuda")]
pub(crate) fn on(kernel: Kernel) -> bool {
    cuda::enabled() && kernels_off().map_or(true, |off| !off.contains(&kernel))
}

/// `compile()`'s text, kept in `dir` under a name drawn from `key` (everything the text
/// depends on): read from there when an earlier run left it, written there (atomically, a
/// failure only logged) when not. Without `dir`, compiled.
#[cfg(any(feature = "cuda", test))]
fn compiled_once(
    dir: Option<&std::path::Path>,
    key: &str,
    compile: impl FnOnce() -> Result<String, String>,
) -> Result<String, String> {
    let Some(dir) = dir else {
        return compile();
    };
    let hash = blake3::hash(key.as_bytes()).to_hex();
    let path = dir.join(format!("kernels-{}.ptx", &hash[..16]));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text);
    }
    let text = compile()?;
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let kept = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, &text))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(
            "cannot keep the compiled GPU kernels in {}: {e}",
            dir.display()
        );
    }
    Ok(text)
}

/// Which vectorised path the memory-bound kernels of `kernels.cu` take (0: none). Those paths
/// move eight 16-bit elements with one 16-byte access, so they need a 16-bit type, operands
/// that start 16-byte aligned (`aligned`: every start offset a multiple of 8 elements; cudarc's
/// allocations are aligned further) and shapes that keep every group of eight whole.
#[cfg(any(feature = "cuda", test))]
mod vec_path {
    use candle_core::DType;

    fn eligible(dt: DType, aligned: bool) -> bool {
        matches!(dt, DType::F16 | DType::BF16) && aligned
    }

    /// The epilogue over `n` elements of (N, C, plane): 1 where eight share a bias (plane a
    /// multiple of 8), 2 where they take eight consecutive ones (a linear layer's rows).
    pub(crate) fn bias_act(dt: DType, aligned: bool, n: usize, plane: usize, bias: usize) -> i32 {
        if !eligible(dt, aligned) || !n.is_multiple_of(8) {
            0
        } else if plane.is_multiple_of(8) {
            1
        } else if plane == 1 && bias.is_multiple_of(8) {
            2
        } else {
            0
        }
    }

    /// GroupNorm's statistics over groups of `len` elements in chunks of `chunk`.
    pub(crate) fn group_stats(dt: DType, aligned: bool, len: usize, chunk: usize) -> i32 {
        i32::from(eligible(dt, aligned) && len.is_multiple_of(8) && chunk.is_multiple_of(8))
    }

    /// GroupNorm's output, eight elements of one channel at a time.
    pub(crate) fn group_apply(dt: DType, aligned: bool, plane: usize, chunk: usize) -> i32 {
        i32::from(eligible(dt, aligned) && plane.is_multiple_of(8) && chunk.is_multiple_of(8))
    }

    /// The kernels that take rows of `row` elements eight at a time: GEGLU (each half of a
    /// row), nearest upsampling (a plane's width, or a channels-last pixel's channels), max
    /// pooling and GroupNorm on channels-last storage (channels), LayerNorm (the row).
    pub(crate) fn rows_of_eights(dt: DType, aligned: bool, row: usize) -> i32 {
        i32::from(eligible(dt, aligned) && row.is_multiple_of(8))
    }
}

/// Threads a block of `group_stats_nhwc` takes for `c` channels in `groups` groups: each thread
/// keeps to fixed channels, so a multiple of `c` (about 256, at most 1024) up to 1024 channels,
/// above that `c` split into at most 4 equal slices (`NHWC_SLICES` in kernels.cu) of at most
/// 1024; None where neither holds, or for more groups than the kernel's 1024 (GroupNorm then
/// runs on NCHW storage).
#[cfg(any(feature = "cuda", test))]
pub(crate) fn group_norm_nhwc_threads(c: usize, groups: usize) -> Option<usize> {
    if c == 0 || groups == 0 || groups > 1024 || !c.is_multiple_of(groups) {
        return None;
    }
    if c <= 1024 {
        return Some(c * (256 / c).max(1));
    }
    (2..=4)
        .find(|&s| c.is_multiple_of(s) && c / s <= 1024)
        .map(|s| c / s)
}

/// The flash attention kernel for head size `d` (a multiple of 8): the size it was compiled
/// for (`D8` in kernels.cu: `d` or the next one up, padded with zeros) and the query rows one
/// block takes, which the kernel checks against its own (`fa_rows`: two tiles of 16 rows a
/// warp up to 64, one above, where registers run short). None over 160.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn flash_kernel(d: usize) -> Option<(usize, usize)> {
    let d8 = [32, 40, 48, 64, 80, 96, 128, 160]
        .into_iter()
        .find(|&s| s >= d)?;
    Some((d8, if d8 <= 64 { 128 } else { 64 }))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    use candle_core::{DType, Device, Tensor};

    use crate::cpu_ops::CpuGroupNorm;

    #[test]
    fn kernels_off_reads_family_names_and_refuses_others() {
        use super::{parse_off, Kernel};
        assert_eq!(parse_off(""), Ok(vec![]));
        assert_eq!(
            parse_off(" flash_attention,,layer_norm "),
            Ok(vec![Kernel::FlashAttention, Kernel::LayerNorm])
        );
        for k in Kernel::ALL {
            assert_eq!(parse_off(k.name()), Ok(vec![k]));
        }
        let e = parse_off("epilogue,attention").unwrap_err();
        assert!(
            e.contains("\"attention\"") && e.contains("flash_attention"),
            "{e}"
        );
    }
    use crate::nn::Act;

    /// The emulator binary, built once per test run from this folder's sources.
    fn emulator() -> &'static Path {
        static BIN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
        &BIN.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let bin = dir.path().join("emu");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu_ops");
            let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
                // AddressSanitizer: a kernel reading past an operand fails its test.
                .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror"])
                .arg("-fsanitize=address")
                .arg("-o")
                .arg(&bin)
                .arg(src.join("emu_main.cpp"))
                .output()
                .expect("the kernel tests need a C++20 compiler (c++, or $CXX)");
            assert!(
                out.status.success(),
                "emu_main.cpp does not compile:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (dir, bin)
        })
        .1
    }

    /// `t` as the raw little-endian storage of `dt`; 8-bit `t` as it is.
    fn bytes(t: &Tensor, dt: DType) -> Vec<u8> {
        if t.dtype() == DType::U8 {
            return t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        }
        let t = t.to_dtype(dt).unwrap().flatten_all().unwrap();
        match dt {
            DType::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F16 => t
                .to_vec1::<half::f16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::BF16 => t
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    }

    fn from_bytes(b: &[u8], dt: DType, dims: &[usize]) -> Tensor {
        let v: Vec<f32> = match dt {
            DType::F32 => b
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F16 => b
                .chunks(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => unreachable!(),
        };
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// Runs `kernel` under the emulator: `args` are its numeric arguments, `inputs` its tensors
    /// (written in `dt`; `None` passes a null pointer); returns the output, of shape `out`,
    /// back in f32.
    fn emulate(
        kernel: &str,
        dt: DType,
        args: &[String],
        inputs: &[Option<&Tensor>],
        out: &[usize],
    ) -> Tensor {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(emulator());
        cmd.arg(kernel).arg(dt.as_str()).args(args);
        for (i, t) in inputs.iter().enumerate() {
            match t {
                Some(t) => {
                    let p = dir.path().join(format!("in{i}"));
                    std::fs::write(&p, bytes(t, dt)).unwrap();
                    cmd.arg(p);
                }
                None => {
                    cmd.arg("-");
                }
            }
        }
        let path = dir.path().join("out");
        let run = cmd.arg(&path).output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        from_bytes(&std::fs::read(path).unwrap(), dt, out)
    }

    /// The CPU's GroupNorm (+ SiLU) of NCHW `x`, eps 1e-5: what the GroupNorm kernels must give.
    fn cpu_group_norm(
        x: &Tensor,
        (gamma, beta): (&Tensor, &Tensor),
        groups: usize,
        silu: bool,
    ) -> Tensor {
        let op = CpuGroupNorm {
            gamma: &gamma.to_vec1().unwrap(),
            beta: &beta.to_vec1().unwrap(),
            groups,
            eps: 1e-5,
            silu,
        };
        x.apply_op1_no_bwd(&op).unwrap()
    }

    /// Groups of a few values around 30 can spread by 0.1, so that the f32 rounding of their
    /// mean alone, in either implementation, moves the normalised values by 2e-5.
    fn group_norm_tolerance(dt: DType) -> f32 {
        if dt == DType::F32 {
            1e-4
        } else {
            tolerance(dt)
        }
    }

    /// The input as the kernel sees it: rounded to `dt`, back in f32.
    fn rounded(t: &Tensor, dt: DType) -> Tensor {
        t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap()
    }

    /// Largest `|got - want| / max(1, |want|)`.
    fn err(got: &Tensor, want: &Tensor) -> f32 {
        let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g.len(), w.len());
        g.iter()
            .zip(&w)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0.0, f32::max)
    }

    /// Half an ulp of the output type, plus room for f32 sums taken in another order.
    fn tolerance(dt: DType) -> f32 {
        match dt {
            DType::F32 => 2e-5,
            DType::F16 => 1e-3,
            _ => 8e-3,
        }
    }

    #[test]
    fn group_norm_kernel_matches_the_cpu_group_norm() {
        let dev = Device::Cpu;
        // (dims, groups, threads, chunk): groups shorter and longer than a block and than a
        // chunk, last chunks shorter than the others, planes that do not divide the block; an
        // offset mean the statistics must not lose, and an outlier first in every group.
        // The vectorised paths where the shape allows them: 16-bit, planes and chunks of
        // multiples of 8.
        for (dims, groups, threads, chunk, outlier) in [
            (vec![2, 6, 5, 7], 3, 64, 1000, false),
            (vec![1, 4, 33, 31], 2, 256, 300, false),
            (vec![3, 8, 1, 3], 8, 32, 2, false),
            (vec![2, 4, 16, 16], 2, 128, 100, true),
            (vec![2, 4, 16, 16], 2, 128, 96, true),
            (vec![1, 8, 8, 12], 4, 64, 8, false),
        ] {
            // Seeded: a group of three values is normalised by their spread, which random
            // draws may make small enough for f32 rounding to show.
            let mut v = ((crate::nn::seeded_randn(&dims, 7).unwrap() * 2.0).unwrap() + 30.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            if outlier {
                let len = v.len() / (dims[0] * groups);
                v.iter_mut().step_by(len).for_each(|x| *x = 1000.0);
            }
            let x = Tensor::from_vec(v, dims.as_slice(), &dev).unwrap();
            let c = dims[1];
            let gamma = ((crate::nn::seeded_randn(&[c], 8).unwrap() * 0.5).unwrap() + 1.0).unwrap();
            let beta = (crate::nn::seeded_randn(&[c], 9).unwrap() * 0.5).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                for silu in [false, true] {
                    let (xr, gr, br) = (rounded(&x, dt), rounded(&gamma, dt), rounded(&beta, dt));
                    let want = cpu_group_norm(&xr, (&gr, &br), groups, silu);
                    let blocks = dims[0] * groups;
                    let plane: usize = dims[2..].iter().product();
                    let len = c / groups * plane;
                    let vec = super::vec_path::group_apply(dt, true, plane, chunk);
                    assert_eq!(
                        vec,
                        super::vec_path::group_stats(dt, true, len, chunk) & vec
                    );
                    let args = [blocks, threads, vec as usize, c, groups, plane, chunk]
                        .map(|v| v.to_string())
                        .into_iter()
                        .chain(["1e-5".into(), u8::from(silu).to_string()])
                        .collect::<Vec<_>>();
                    let inputs = [Some(&x), Some(&gamma), Some(&beta)];
                    let got = emulate("group_norm", dt, &args, &inputs, &dims);
                    let e = err(&got, &want);
                    assert!(
                        e <= group_norm_tolerance(dt),
                        "{dims:?} in {groups} groups, chunks of {chunk}, {dt:?}, silu {silu}, vec {vec}: error {e}"
                    );
                }
            }
        }
    }

    const ACTS: [Act; 4] = [Act::None, Act::Relu, Act::Gelu, Act::QuickGelu];

    #[test]
    fn channels_last_group_norm_kernels_match_the_cpu_group_norm() {
        let dev = Device::Cpu;
        // (N, C, H, W), groups, pixels a chunk: groups of 4 channels (a 16-byte load spans two)
        // and of 8; a block of 256 threads holding 4 and 1 rows of channels; a last chunk of
        // fewer pixels; activations far from 0, means rising over the channels (a thread
        // taking another slice's group mean shows), an outlier in the first pixel of each
        // image. The UNet's widths: 320 (a block of one row of channels, groups of 10) and 1280
        // (a block of 640 threads, two slices of channels a pixel); 96, two rows of 96.
        for (dims, groups, chunk_px) in [
            ([2usize, 64, 5, 7], 16usize, 16usize),
            ([1, 256, 3, 4], 32, 5),
            ([2, 320, 2, 3], 32, 4),
            ([1, 1280, 2, 3], 32, 4),
            ([1, 96, 3, 3], 24, 4),
        ] {
            let [n, c, h, w] = dims;
            let ramp = Tensor::arange(0f32, c as f32, &dev)
                .unwrap()
                .affine(20.0 / c as f64, 30.0)
                .unwrap()
                .reshape((1, c, 1, 1))
                .unwrap();
            let mut x = (crate::nn::seeded_randn(&dims, 17).unwrap() * 2.0)
                .unwrap()
                .broadcast_add(&ramp)
                .unwrap();
            let spike = Tensor::full(1000f32, (n, c, 1, 1), &dev).unwrap();
            x = x.slice_assign(&[0..n, 0..c, 0..1, 0..1], &spike).unwrap();
            let gamma =
                ((crate::nn::seeded_randn(&[c], 18).unwrap() * 0.5).unwrap() + 1.0).unwrap();
            let beta = (crate::nn::seeded_randn(&[c], 19).unwrap() * 0.5).unwrap();
            let nhwc = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let silu = dt != DType::F16;
                let (xr, gr, br) = (rounded(&x, dt), rounded(&gamma, dt), rounded(&beta, dt));
                let want = cpu_group_norm(&xr, (&gr, &br), groups, silu);
                let vec = super::vec_path::rows_of_eights(dt, true, c);
                let block = super::group_norm_nhwc_threads(c, groups).unwrap();
                let args = [3, block, vec as usize, n, h * w, c, groups, chunk_px]
                    .map(|v| v.to_string())
                    .into_iter()
                    .chain(["1e-5".into(), u8::from(silu).to_string()])
                    .collect::<Vec<_>>();
                let inputs = [Some(&nhwc), Some(&gamma), Some(&beta)];
                let got = emulate("group_norm_nhwc", dt, &args, &inputs, &[n, h, w, c])
                    .permute((0, 3, 1, 2))
                    .unwrap();
                let e = err(&got, &want);
                assert!(
                    e <= group_norm_tolerance(dt),
                    "{dims:?} in {groups} groups, {dt:?}, vec {vec}: error {e}"
                );
            }
        }
    }

    #[test]
    fn channels_last_group_norm_blocks_keep_threads_to_channels() {
        // (channels, groups) -> threads: a multiple of the channels up to 1024, a slice of
        // them above; None past four slices, for groups that do not divide the channels and
        // for more groups than the kernel holds.
        for (c, groups, want) in [
            (64, 32, Some(256)),
            (128, 32, Some(256)),
            (320, 32, Some(320)),
            (512, 32, Some(512)),
            (96, 24, Some(192)),
            (1024, 32, Some(1024)),
            (1280, 32, Some(640)),
            (4096, 32, Some(1024)),
            (4100, 4, None),
            (1283, 1, None),
            (320, 30, None),
            (2048, 2048, None),
        ] {
            assert_eq!(
                super::group_norm_nhwc_threads(c, groups),
                want,
                "{c} in {groups}"
            );
        }
    }

    #[test]
    fn compiled_kernels_are_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kernels");
        let calls = std::cell::Cell::new(0);
        let compile = || {
            calls.set(calls.get() + 1);
            Ok("ptx".to_string())
        };
        for _ in 0..2 {
            assert_eq!(
                super::compiled_once(Some(&kept), "A", compile).unwrap(),
                "ptx"
            );
        }
        assert_eq!(calls.get(), 1, "the second run reads what the first kept");
        // Another key is compiled anew; without a folder, every time.
        super::compiled_once(Some(&kept), "B", compile).unwrap();
        super::compiled_once(None, "A", compile).unwrap();
        assert_eq!(calls.get(), 3);
        // A folder that cannot be made (a file in its way) costs only the keeping.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let got = super::compiled_once(Some(&blocked.join("sub")), "A", compile).unwrap();
        assert_eq!(got, "ptx");
        // A compile error comes back, and nothing is kept.
        let failed = super::compiled_once(Some(&kept), "C", || Err("bad".into()));
        assert_eq!(failed.unwrap_err(), "bad");
        let names: Vec<_> = std::fs::read_dir(&kept).unwrap().collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// `(N, K, 2H, 2W)` from the phases' convolutions `(N, H+1, W+1, 4K)` (channels-last) and
    /// `bias`: y[n, 2i+a, 2j+b, k] = phases[n, i+a, j+b, (2a+b)K + k] + bias[k], by candle.
    fn interleaved(phases: &Tensor, bias: &Tensor) -> Tensor {
        let (n, h1, w1, k4) = phases.dims4().unwrap();
        let (h, w, k) = (h1 - 1, w1 - 1, k4 / 4);
        let part = |a: usize, b: usize| {
            let p = phases.narrow(1, a, h).unwrap().narrow(2, b, w).unwrap();
            p.narrow(3, (2 * a + b) * k, k).unwrap()
        };
        let row = |a: usize| Tensor::stack(&[part(a, 0), part(a, 1)], 3).unwrap();
        Tensor::stack(&[row(0), row(1)], 2)
            .unwrap()
            .reshape((n, 2 * h, 2 * w, k))
            .unwrap()
            .broadcast_add(bias)
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
    }

    #[test]
    fn upsampling_convolution_by_phases_matches_upsample_then_convolve() {
        // Output channels on the vectorised path (multiples of 8) and off it.
        for (n, c, h, w, k) in [(2usize, 3, 3, 4, 16), (1, 2, 2, 3, 3)] {
            let dev = &Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (k, c, 3, 3), dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, k, dev).unwrap();
            let want = crate::cpu_ops::upsample_then_conv(&x, &weight, &bias);
            // The phases' convolution as cuDNN makes it on the GPU (`nn`): candle's, by the
            // stacked 2x2 filters, padding 1, laid out channels-last.
            let flat = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let stacked = crate::cpu_ops::upsample_phase_filters(&flat, k, c);
            let filters = Tensor::from_vec(stacked, (4 * k, c, 2, 2), dev).unwrap();
            let phases = x.conv2d(&filters, 1, 1, 1, 1).unwrap();
            let phases = phases.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let e = err(&interleaved(&phases, &bias), &want);
            assert!(
                e < 1e-4,
                "{n}x{c}x{h}x{w} -> {k}: the phases give error {e}"
            );
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let want = interleaved(&rounded(&phases, dt), &rounded(&bias, dt));
                let vec = super::vec_path::rows_of_eights(dt, true, k);
                for vec in std::iter::once(0).chain((vec != 0).then_some(vec)) {
                    let args = [2, 32, vec as usize, n, h, w, k].map(|v| v.to_string());
                    let got = emulate(
                        "interleave_phases_nhwc",
                        dt,
                        &args,
                        &[Some(&phases), Some(&bias)],
                        &[n, 2 * h, 2 * w, k],
                    )
                    .permute((0, 3, 1, 2))
                    .unwrap();
                    let e = err(&got, &want);
                    assert!(e <= tolerance(dt), "{dt:?}, vec {vec}: error {e}");
                }
            }
        }
    }

    #[test]
    fn pixel_normalisation_kernel_is_the_cpu_normalisation() {
        // Every 8-bit level in every channel; a plane that leaves the last block part-filled.
        let pre = crate::probe::Preprocess::imagenet();
        let (n, side) = (3usize, 15usize);
        let pixels: Vec<u8> = (0..n * side * side * 3)
            .map(|i| (i * 7 % 256) as u8)
            .collect();
        let mut cpu = vec![0f32; pixels.len()];
        for (out, px) in cpu
            .chunks_mut(side * side * 3)
            .zip(pixels.chunks(side * side * 3))
        {
            pre.normalise(px, out);
        }
        let want = Tensor::from_vec(cpu, (n, 3, side, side), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(pixels, (n, side, side, 3), &Device::Cpu).unwrap();
        let args: Vec<String> = [2, 64, 0, n, side * side]
            .map(|v| v.to_string())
            .into_iter()
            .chain(pre.mean.iter().chain(&pre.std).map(|v| v.to_string()))
            .collect();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let got = emulate(
                "normalise_pixels",
                dt,
                &args,
                &[Some(&x)],
                &[n, 3, side, side],
            );
            // Exactly the CPU's f32 values, rounded once to the storage type.
            let want = rounded(&want, dt);
            assert_eq!(err(&got, &want), 0.0, "{dt:?}");
        }
    }

    #[test]
    fn channels_last_upsample_kernel_matches_candles_upsample() {
        // Channels on the vectorised path (multiples of 8) and off it.
        for dims in [[2usize, 16, 3, 5], [1, 3, 2, 3]] {
            let x = Tensor::randn(0f32, 1.0, &dims, &Device::Cpu).unwrap();
            let [n, c, h, w] = dims;
            let nhwc = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let want = rounded(&x, dt).upsample_nearest2d(2 * h, 2 * w).unwrap();
                let vec = super::vec_path::rows_of_eights(dt, true, c);
                for vec in std::iter::once(0).chain((vec != 0).then_some(vec)) {
                    let args = [2, 32, vec as usize, n * h, w, c].map(|v| v.to_string());
                    let got = emulate(
                        "upsample2x_nhwc",
                        dt,
                        &args,
                        &[Some(&nhwc)],
                        &[n, 2 * h, 2 * w, c],
                    )
                    .permute((0, 3, 1, 2))
                    .unwrap();
                    let e = err(&got, &want);
                    assert!(e == 0.0, "{dims:?}, {dt:?}, vec {vec}: error {e}");
                }
            }
        }
    }

    #[test]
    fn bias_act_kernel_matches_candle_ops() {
        let dev = Device::Cpu;
        // (dims, channels last): planes that take the scalar path, eight elements sharing a
        // bias, and a linear layer's rows (plane 1) taking eight consecutive biases; then
        // channels-last rows (N, pixels, C), whose per-image bias the kernel finds by the
        // elements an image holds (SD's time embedding on the UNet's NHWC maps).
        for (dims, channels_last) in [
            (vec![2usize, 5, 3, 7], false),
            (vec![2, 5, 4, 4], false),
            (vec![6, 24], false),
            (vec![3, 5, 16], true),
            (vec![2, 3, 5], true),
        ] {
            let x = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap();
            let residual = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap();
            let c = if channels_last { dims[2] } else { dims[1] };
            // Per channel, and per image and channel (a bias plus SD's time embedding).
            let per_channel = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let per_image = Tensor::randn(0f32, 1.0, (dims[0], c), &dev).unwrap();
            let n = x.elem_count();
            let plane = if channels_last {
                1
            } else {
                dims[2..].iter().product::<usize>()
            };
            for dt in [DType::F32, DType::F16, DType::BF16] {
                for bias in [&per_channel, &per_image] {
                    let images = bias.elem_count() / c;
                    // The kernel's bias length and elements an image, as the launcher passes them.
                    let (bias_len, image) = match (channels_last, images) {
                        (true, 1) => (c, 0),
                        (true, _) => (c, dims[1] * c),
                        (false, _) => (bias.elem_count(), 0),
                    };
                    let mode = super::vec_path::bias_act(dt, true, n, plane, bias_len);
                    for (res, act, vec) in [false, true]
                        .into_iter()
                        .flat_map(|r| ACTS.map(|a| (r, a)))
                        .flat_map(|(r, a)| {
                            std::iter::once((r, a, 0)).chain((mode != 0).then_some((r, a, mode)))
                        })
                    {
                        let (xr, br) = (rounded(&x, dt), rounded(bias, dt));
                        let shape = if channels_last {
                            vec![images, 1, c]
                        } else {
                            let mut shape = vec![images, c];
                            shape.resize(dims.len(), 1);
                            shape
                        };
                        let mut want = xr.broadcast_add(&br.reshape(shape).unwrap()).unwrap();
                        if res {
                            want = (want + rounded(&residual, dt)).unwrap();
                        }
                        let want = act.apply(want).unwrap();
                        // 3 blocks of 32 threads for 30-240 elements: the grid-stride loop
                        // goes round.
                        let args = [
                            3,
                            32,
                            vec as usize,
                            n,
                            bias_len,
                            plane,
                            image,
                            act.code() as usize,
                        ]
                        .map(|v| v.to_string());
                        let inputs = [Some(&x), Some(bias), res.then_some(&residual)];
                        let got = emulate("bias_act", dt, &args, &inputs, &dims);
                        let e = err(&got, &want);
                        assert!(
                            e <= tolerance(dt),
                            "{dims:?}, channels last {channels_last}, {dt:?}, bias {:?}, residual {res}, {act:?}, vec {vec}: error {e}",
                            bias.dims()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn layer_norm_kernel_matches_layer_norm() {
        // Rows that leave the last block's warps partly idle; rows of 768 (CLIP, eight elements
        // a load, three loads a lane), 264 (more groups of eight than lanes) and 20 (one
        // element a load); values far from zero on average, where E[x^2] - mean^2 would lose
        // the variance.
        let rows = 11usize;
        for c in [768usize, 264, 20] {
            let x = (Tensor::randn(0f32, 2.0, (rows, c), &Device::Cpu).unwrap() + 30.0).unwrap();
            let gamma = Tensor::randn(1f32, 0.5, c, &Device::Cpu).unwrap();
            let beta = Tensor::randn(0f32, 0.5, c, &Device::Cpu).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let (xr, gr, br) = (rounded(&x, dt), rounded(&gamma, dt), rounded(&beta, dt));
                // In f64: candle's CPU layer norm takes E[x^2] - mean^2 in f32 and loses the
                // variance here.
                let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let centred = f64_of(&xr)
                    .broadcast_sub(&f64_of(&xr).mean_keepdim(1).unwrap())
                    .unwrap();
                let var = centred.sqr().unwrap().mean_keepdim(1).unwrap();
                let want = centred
                    .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&f64_of(&gr))
                    .unwrap()
                    .broadcast_add(&f64_of(&br))
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let vec = super::vec_path::rows_of_eights(dt, true, c) as usize;
                let (warps, block) = (4, 128);
                let args = [rows.div_ceil(warps), block, vec, rows, c]
                    .map(|v| v.to_string())
                    .into_iter()
                    .chain(["1e-5".to_string()])
                    .collect::<Vec<_>>();
                let inputs = [Some(&x), Some(&gamma), Some(&beta)];
                let got = emulate("layer_norm", dt, &args, &inputs, &[rows, c]);
                let e = err(&got, &want);
                assert!(
                    e <= tolerance(dt),
                    "{rows}x{c}, {dt:?}, vec {vec}: error {e}"
                );
            }
        }
    }

    #[test]
    fn geglu_kernel_matches_candle_ops() {
        // With the linear layer's bias added in the kernel and without; inner on the vectorised
        // path (a multiple of 8) and off it.
        for (rows, inner) in [(13usize, 10usize), (7, 24)] {
            let x = Tensor::randn(0f32, 2.0, (rows, 2 * inner), &Device::Cpu).unwrap();
            let bias = (Tensor::randn(0f32, 1.0, 2 * inner, &Device::Cpu).unwrap() + 3.0).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                for b in [None, Some(&bias)] {
                    let mut h = rounded(&x, dt);
                    if let Some(b) = b {
                        h = h.broadcast_add(&rounded(b, dt)).unwrap();
                    }
                    let gate = h.narrow(1, inner, inner).unwrap().gelu_erf().unwrap();
                    let want = (h.narrow(1, 0, inner).unwrap() * gate).unwrap();
                    let vec = super::vec_path::rows_of_eights(dt, true, inner) as usize;
                    let args = [2, 32, vec, rows, inner].map(|v| v.to_string());
                    let got = emulate("geglu", dt, &args, &[Some(&x), b], &[rows, inner]);
                    let e = err(&got, &want);
                    assert!(
                        e <= tolerance(dt),
                        "{rows}x{inner}, {dt:?}, vec {vec}, bias {}: error {e}",
                        b.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn upsample_kernel_matches_candles_upsample() {
        // Widths on the vectorised path (multiples of 8) and off it; several rows per thread.
        for dims in [[2usize, 3, 5, 16], [1, 2, 3, 7], [1, 1, 2, 8]] {
            let x = Tensor::randn(0f32, 1.0, &dims, &Device::Cpu).unwrap();
            let [n, c, h, w] = dims;
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let want = rounded(&x, dt).upsample_nearest2d(2 * h, 2 * w).unwrap();
                let vec = super::vec_path::rows_of_eights(dt, true, w);
                for vec in std::iter::once(0).chain((vec != 0).then_some(vec)) {
                    let args = [2, 32, vec as usize, n * c * h, w].map(|v| v.to_string());
                    let got = emulate("upsample2x", dt, &args, &[Some(&x)], &[n, c, 2 * h, 2 * w]);
                    let e = err(&got, &want);
                    assert!(e == 0.0, "{dims:?}, {dt:?}, vec {vec}: error {e}");
                }
            }
        }
    }

    #[test]
    fn max_pool_kernel_matches_candles_pool() {
        let dev = Device::Cpu;
        // (N, C, H, W, window, stride, padding): ResNet's stem pool on odd and even sizes, with
        // channels on the vectorised path and off it; a window without padding.
        for (n, c, h, w, k, s, pad) in [
            (2usize, 16usize, 9usize, 7usize, 3usize, 2usize, 1usize),
            (1, 5, 6, 6, 3, 2, 1),
            (2, 8, 6, 5, 2, 2, 0),
        ] {
            // Negative values too, so that padding with zeros would show.
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let nhwc = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let (p, q) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
            for dt in [DType::F32, DType::F16, DType::BF16] {
                // candle's pool over the input padded with a value below every input.
                let padded = Tensor::full(-1e4f32, (n, c, h + 2 * pad, w + 2 * pad), &dev)
                    .unwrap()
                    .slice_assign(&[0..n, 0..c, pad..pad + h, pad..pad + w], &rounded(&x, dt))
                    .unwrap();
                let want = padded.max_pool2d_with_stride(k, s).unwrap();
                let vec = super::vec_path::rows_of_eights(dt, true, c);
                for vec in std::iter::once(0).chain((vec != 0).then_some(vec)) {
                    let args = [3, 32, vec as usize, n, h, w, c, p, q, k, s, pad];
                    let args = args.map(|v| v.to_string());
                    let got = emulate("max_pool", dt, &args, &[Some(&nhwc)], &[n, p, q, c]);
                    let got = got.permute((0, 3, 1, 2)).unwrap();
                    let e = err(&got, &want);
                    assert!(
                        e == 0.0,
                        "{:?}, window {k}, stride {s}, padding {pad}, {dt:?}, vec {vec}: error {e}",
                        x.dims()
                    );
                }
            }
        }
    }

    #[test]
    fn flash_attention_kernel_matches_attention() {
        let dev = Device::Cpu;
        // (head size, query rows, keys, heads split in place, `vec`): two blocks of query rows
        // and three tiles of keys, the last of each partial (SD's self-attention); fewer
        // queries than a warp's 16 rows against many keys, the last tile holding one (BLIP's
        // cross-attention to 577 image tokens); one whole tile of keys, where nothing is
        // masked; head sizes that need padding to 16 (40, 80: SD 1.x), to the next kernel's
        // size (56) and neither (32, 64: SD 2.x, CLIP, BLIP; 160: SD 1.x's deepest level), on
        // both sides of the kernels' switch from two row tiles a warp to one; heads read
        // contiguous (B, H, T, D) or in place from (B, T, H, D) projections; keys and values
        // loaded with cp.async or one by one (`vec`).
        let (b, h) = (2usize, 2usize);
        for (d, tq, tk, in_place, vec) in [
            (40usize, 150usize, 140usize, true, true),
            (40, 70, 45, true, false),
            (64, 3, 577, true, true),
            (56, 20, 64, true, true),
            (80, 70, 45, false, true),
            (160, 5, 77, false, true),
            (32, 17, 63, true, false),
        ] {
            let (d8, rows) = super::flash_kernel(d).unwrap();
            // Memory in the layout the kernel reads, and the (B, H, T, D) view of it.
            let make = |t: usize| -> (Tensor, Tensor, [usize; 3]) {
                if in_place {
                    let m = Tensor::randn(0f32, 1.0, (b, t, h, d), &dev).unwrap();
                    let view = m.transpose(1, 2).unwrap().contiguous().unwrap();
                    (m, view, [t * h * d, d, h * d])
                } else {
                    let m = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
                    (m.clone(), m, [h * t * d, t * d, d])
                }
            };
            let ((qm, q, qs), (km, k, ks), (vm, v, vs)) = (make(tq), make(tk), make(tk));
            let scale = 1.0 / (d as f64).sqrt();
            for dt in [DType::F16, DType::BF16] {
                let (qr, kr, vr) = (rounded(&q, dt), rounded(&k, dt), rounded(&v, dt));
                // The kernel writes (B, Tq, H, D).
                let want = crate::nn::attention(&qr, &kr, &vr, scale, None)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let scale_log2 = scale * std::f64::consts::LOG2_E;
                let args = [d8, b, h, tq, tk, d]
                    .map(|v| v.to_string())
                    .into_iter()
                    .chain([scale_log2.to_string()])
                    .chain([qs, ks, vs].concat().iter().map(|s| s.to_string()))
                    .chain([usize::from(vec), rows].map(|v| v.to_string()))
                    .collect::<Vec<_>>();
                let inputs = [Some(&qm), Some(&km), Some(&vm)];
                let got = emulate("flash", dt, &args, &inputs, &[b, tq, h, d]);
                let e = err(&got, &want);
                // The probabilities are rounded to the storage type before they weight v.
                assert!(
                    e <= 2.0 * tolerance(dt),
                    "head size {d}, {tq} queries, {tk} keys, in place {in_place}, vec {vec}, {dt:?}: error {e}"
                );
            }
        }
    }
}
