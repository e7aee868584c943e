//! cuDNN's forward algorithm chosen by measurement, once per convolution shape. candle asks
//! cuDNN's heuristic, which on an H200 picks algorithms that run ResNet-50's f16 convolutions
//! at 13.6 TFLOP/s where IMPLICIT_PRECOMP_GEMM reaches 37 (the performance issue's ncu
//! figures); which algorithm wins depends on the shape, so each is timed.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::conv::CudnnFwdAlgo;
use candle_core::{DType, Result, Tensor};

/// Whether convolutions on CUDA search for their algorithm: yes unless `DND_CONV_SEARCH=0`.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DND_CONV_SEARCH").map_or(true, |v| v != "0"))
}

/// The algorithms tried: cuDNN's own pick (`None`) and those whose workspace stays small.
/// FFT and GEMM are left out: their workspaces grow with the whole batch (gigabytes at SD's
/// sizes) against the 12 GB budget; DIRECT is not implemented by cuDNN.
const CANDIDATES: [Option<CudnnFwdAlgo>; 6] = [
    None,
    Some(CudnnFwdAlgo::ImplicitPrecompGemm),
    Some(CudnnFwdAlgo::ImplicitGemm),
    Some(CudnnFwdAlgo::Winograd),
    Some(CudnnFwdAlgo::WinogradNonFused),
    Some(CudnnFwdAlgo::FftTiling),
];

/// Input dims, weight dims, padding, stride, dtype.
type Key = ([usize; 4], [usize; 4], usize, usize, DType);

/// `x.conv2d(w, padding, stride, 1, 1)` on CUDA with the fastest algorithm for its shape,
/// measured the first time the shape is seen.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    static CHOSEN: OnceLock<Mutex<HashMap<Key, Option<CudnnFwdAlgo>>>> = OnceLock::new();
    let key: Key = (
        x.dims4()?.into(),
        w.dims4()?.into(),
        padding,
        stride,
        x.dtype(),
    );
    let chosen = CHOSEN.get_or_init(Default::default);
    let known = chosen
        .lock()
        .expect("no panics while held")
        .get(&key)
        .copied();
    let algo = match known {
        Some(algo) => algo,
        None => {
            let algo = fastest(x, w, padding, stride)?;
            tracing::debug!(?key, ?algo, "cuDNN algorithm chosen");
            chosen
                .lock()
                .expect("no panics while held")
                .insert(key, algo);
            algo
        }
    };
    x.conv2d_with_algo(w, padding, stride, 1, 1, algo)
}

/// The candidate with the least time over two runs after one to warm up; those cuDNN refuses
/// for this shape are skipped. cuDNN's own pick always runs, so there is always one.
fn fastest(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Option<CudnnFwdAlgo>> {
    let dev = x.device();
    let mut best: Option<(Duration, Option<CudnnFwdAlgo>)> = None;
    for algo in CANDIDATES {
        let run = || x.conv2d_with_algo(w, padding, stride, 1, 1, algo);
        match run() {
            // cuDNN's own pick failing is a real error, not a refusal.
            Err(e) if algo.is_none() => return Err(e),
            Err(_) => continue,
            Ok(_) => {}
        }
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..2 {
            run()?;
        }
        dev.synchronize()?;
        let took = t.elapsed();
        if best.is_none_or(|(b, _)| took < b) {
            best = Some((took, algo));
        }
    }
    Ok(best.and_then(|(_, algo)| algo))
}
