//! Choosing the compute device and float type.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// `--device auto|cpu|cuda[:N]|metal`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("{s:?} is not a device: use auto, cpu, cuda, cuda:N or metal")
                }),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

/// `--dtype auto|f32|f16|bf16`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DTypeSpec {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl FromStr for DTypeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "{other:?} is not a float type: use auto, f32, f16 or bf16"
            )),
        }
    }
}

impl TryFrom<String> for DTypeSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Where GPU builds keep the kernels they compile at run time (NVRTC takes seconds over them
/// at the first GPU op of every process), for later runs to read; call before the first GPU
/// op. Nothing on builds without CUDA.
pub fn keep_kernels_in(dir: std::path::PathBuf) {
    #[cfg(feature = "cuda")]
    crate::gpu_ops::keep_kernels_in(dir);
    #[cfg(not(feature = "cuda"))]
    let _ = dir;
}

/// Opens the device. `auto` takes a GPU when this binary was built with one and one is present.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    let fail = |reason: String| Error::Device {
        spec: spec.to_string(),
        reason,
    };
    // A misspelt kernel name would otherwise turn nothing off, silently.
    crate::gpu_ops::kernels_off().map_err(fail)?;
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(prepared(d));
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        DeviceSpec::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(fail(
                    "this dnd was built without CUDA: rebuild with `cargo build --release --features cuda`, or use --device cpu".into(),
                ));
            }
            Device::new_cuda(n)
                .map(prepared)
                .map_err(|e| fail(format!("cannot open GPU {n}: {e}")))
        }
        DeviceSpec::Metal => {
            if !candle_core::utils::metal_is_available() {
                return Err(fail(
                    "this dnd was built without Metal: rebuild with `cargo build --release --features metal`, or use --device cpu".into(),
                ));
            }
            Device::new_metal(0).map_err(|e| fail(format!("cannot open the Metal device: {e}")))
        }
    }
}

/// `device` set up before its first allocation (`gpu_ops::setup`); where that fails it runs
/// at cudarc's defaults, a little slower, and the log says why.
fn prepared(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        if let Err(e) = crate::gpu_ops::setup::prepare(d) {
            tracing::warn!("cannot set up the GPU's memory pool, left at its defaults: {e}");
        }
    }
    device
}

/// Gives the memory a GPU keeps for later allocations back to the driver, for other
/// processes while dnd idles; nothing on the CPU. A failure is only logged.
pub fn release_cached_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        if let Err(e) = crate::gpu_ops::setup::release_cached(d) {
            tracing::warn!("cannot release the GPU's cached memory: {e}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// f32 on the CPU (candle's CPU matmul has no bf16), f16 on a GPU unless asked otherwise.
pub fn dtype_for(spec: DTypeSpec, device: &Device) -> Result<DType> {
    match (spec, device.is_cpu()) {
        (DTypeSpec::Auto, true) | (DTypeSpec::F32, _) => Ok(DType::F32),
        (DTypeSpec::Auto, false) | (DTypeSpec::F16, _) => Ok(DType::F16),
        (DTypeSpec::Bf16, false) => Ok(DType::BF16),
        (DTypeSpec::Bf16, true) => Err(Error::Device {
            spec: "cpu".into(),
            reason: "bf16 does not run on the CPU: use --dtype f32 (or auto)".into(),
        }),
    }
}

/// A short human name, for logs and tables.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Which kernels run on `device` in `dtype`, for reports: whose fused ops (convolution
/// epilogues, GroupNorm, GEGLU): dnd's (f32 on the CPU; on CUDA unless `DND_GPU_KERNELS=0`,
/// with the families `DND_GPU_KERNELS_OFF` names) or candle's; and on CUDA with cuDNN, whose
/// cuDNN call convolves (dnd's: f32 accumulation, algorithms measured per shape,
/// channels-last; unless `DND_CUDNN_CONV=0`).
pub fn kernels(device: &Device, dtype: DType) -> String {
    let ours = match device {
        Device::Cpu => dtype == DType::F32,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::gpu_ops::enabled(),
        _ => false,
    };
    let off = crate::gpu_ops::kernels_off().unwrap_or_default();
    let fused = if !ours {
        "candle's ops".to_string()
    } else if device.is_cuda() && !off.is_empty() {
        let names: Vec<&str> = off.iter().map(|k| k.name()).collect();
        format!(
            "dnd's fused ops but {} (DND_GPU_KERNELS_OFF)",
            names.join(", ")
        )
    } else {
        "dnd's fused ops".to_string()
    };
    #[cfg(feature = "cudnn")]
    if device.is_cuda() {
        use crate::gpu_ops::cudnn_conv;
        let algos = match (cudnn_conv::enabled(), cudnn_conv::channels_last()) {
            (false, _) => "candle's cuDNN convolutions",
            (true, true) => "dnd's cuDNN convolutions, channels-last",
            (true, false) => "dnd's cuDNN convolutions, NCHW",
        };
        return format!("{fused}, {algos}");
    }
    fused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CUDA:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn auto_is_f32_on_cpu_and_bf16_is_refused_there() {
        let cpu = open(DeviceSpec::Auto).unwrap();
        if cpu.is_cpu() {
            assert_eq!(dtype_for(DTypeSpec::Auto, &cpu).unwrap(), DType::F32);
            assert!(dtype_for(DTypeSpec::Bf16, &cpu).is_err());
        }
    }
}
