//! How dnd sets up a CUDA device before its first allocation, and what it gives back when idle.

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

/// Host-side costs candle leaves at cudarc's defaults, both paid per allocation:
///
/// - cudarc's event tracking makes two CUDA events for every allocation (and destroys them with
///   it), which it only uses to order work between streams it created. candle's device runs on
///   CUDA's per-thread default stream and dnd creates no other, so they are never used.
/// - Allocations come from the device's default memory pool (`cuMemAllocAsync`), whose release
///   threshold of 0 hands every unused byte back to the driver at each synchronisation (every
///   copy to the CPU, every timed run), so the next step maps its memory again. Kept instead,
///   as PyTorch's caching allocator keeps it; `release_cached` gives it back when idle.
///
/// `DND_CUDA_SETUP=0` leaves both at cudarc's defaults, for comparison.
pub(crate) fn prepare(dev: &CudaDevice) -> Result<()> {
    if std::env::var("DND_CUDA_SETUP").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    // SAFETY: tracking only matters between streams of this context; candle's device uses the
    // per-thread default stream and dnd never calls `new_stream` (nor does candle's
    // `Device::new_cuda`), so no allocation is shared between streams cudarc orders.
    unsafe { dev.disable_event_tracking() };
    if let Some(pool) = pool(dev)? {
        let mut keep = u64::MAX;
        // SAFETY: a valid pool, and the attribute's value is a cuuint64_t.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        }
        .result()
        .w()?;
    }
    Ok(())
}

/// Gives the memory the pool keeps but no tensor uses back to the driver (for other processes
/// on the GPU while dnd waits for its next job). Synchronises the device first.
pub(crate) fn release_cached(dev: &CudaDevice) -> Result<()> {
    if let Some(pool) = pool(dev)? {
        dev.synchronize()?;
        // SAFETY: a valid pool.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result().w()?;
    }
    Ok(())
}

/// The device's default memory pool, where cudarc allocates; None where the device has none
/// (cudarc then allocates synchronously).
fn pool(dev: &CudaDevice) -> Result<Option<sys::CUmemoryPool>> {
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: an out-pointer and the context's own device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .w()?;
    Ok(Some(pool))
}
