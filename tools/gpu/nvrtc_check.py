#!/usr/bin/env python3
"""Compiles dnd's CUDA kernels (src/gpu_ops/kernels.cu) the way the binary does at run time,
through NVRTC, then assembles the PTX for a GPU with ptxas: a compile check that needs no GPU.

    CUDA_PIP_ROOT=/tmp/cuda-venv/lib/python3.11/site-packages/nvidia/cu13 \
        python3 tools/gpu/nvrtc_check.py [--arch sm_90]

(tools/gpu/build.sh runs it with CUDA_PIP_ROOT set by ../shared/gpu/env.sh.)
"""
import argparse, ctypes, os, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", help="GPU to assemble for (ptxas -arch)")
    ap.add_argument("--source", default=str(ROOT / "src/gpu_ops/kernels.cu"))
    a = ap.parse_args()
    src = Path(a.source).read_bytes()
    # The binary compiles for compute_80 on GPUs that have tensor-core mma (sm_80 on), with
    # NVRTC's default target (no options) before them.
    for opts, arch in (([b"-arch=compute_80"], a.arch), ([], "sm_75")):
        with tempfile.TemporaryDirectory() as d:
            ptx = assemble(src, opts, arch, Path(d) / "k.cubin")
        kernels = [l for l in ptx.splitlines() if l.startswith(".visible .entry")]
        print(f"ok: {len(kernels)} kernels compile with NVRTC {[o.decode() for o in opts]} and assemble for {arch}")


def cuda_root():
    cu = Path(os.environ.get("CUDA_PIP_ROOT", ""))
    if not (cu / "lib/libnvrtc.so.13").exists():
        sys.exit(f"no {cu / 'lib/libnvrtc.so.13'}: set CUDA_PIP_ROOT (source ../shared/gpu/env.sh after setup-cuda13.sh)")
    return cu


def assemble(src, opts, arch, cubin):
    """NVRTC's PTX for `src` with `opts`, assembled by ptxas for `arch` into `cubin` (ptxas's
    register and spill report printed); returns the PTX."""
    cu = cuda_root()
    # NVRTC opens its built-in headers library by name: load it first, as LD_LIBRARY_PATH
    # makes it found on the device.
    ctypes.CDLL(str(cu / "lib/libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(cu / "lib/libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None))
    argv = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode())
    check(nvrtc, rc)
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetPTX(prog, ptx))
    p = Path(cubin).with_suffix(".ptx")
    p.write_bytes(ptx.value)
    out = subprocess.run([str(cu / "bin/ptxas"), f"-arch={arch}", "-v", str(p), "-o", str(cubin)],
                         capture_output=True, text=True)
    print(out.stdout + out.stderr, end="")
    if out.returncode:
        sys.exit(f"ptxas refused the PTX NVRTC made with {opts}")
    return ptx.value.decode()


def check(nvrtc, rc):
    if rc:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"NVRTC: {nvrtc.nvrtcGetErrorString(rc).decode()}")


if __name__ == "__main__":
    main()
