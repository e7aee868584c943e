#!/usr/bin/env bash
# Builds the CUDA variant of dnd on this machine (no GPU needed; ../shared/gpu/BUILD.md) and
# packs what one device run needs into git-ignored folders of the checkout:
#   .gpu/dnd-cuda.gz        stripped, gzipped binary, --features cuda
#   .gpu/dnd-cudnn.gz       the same with cuDNN convolutions (--features cudnn), when it builds
#   .gpu/run-on-device.sh   runs a binary against the CUDA libraries of the device's torch venv
#   .gpu/device.sh          the one prepared device script (tools/gpu/device.sh)
#   .gpu/*.py               the PyTorch side of every ratio (../shared/perf)
#   .whl/                   diffusers wheels for that side (the device has no network)
# Then, with a GPU machine lent: run `bash .gpu/device.sh` there, carrying .gpu and .whl.
#
#     tools/gpu/build.sh            # both variants
#     DND_GPU_FEATURES=cuda tools/gpu/build.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=${DND_SHARED:-$ROOT/../shared}
FEATURES=${DND_GPU_FEATURES:-"cuda cudnn"}
TARGET=${CARGO_TARGET_DIR:-/tmp/dnd-cuda-target}
cd "$ROOT"
[ -f "$SHARED/gpu/env.sh" ] || { echo "no $SHARED/gpu: set DND_SHARED to the shared folder"; exit 1; }

# libjpeg-turbo (mozjpeg-sys) quietly builds without its SIMD code when nasm is missing, and
# the device's JPEG row would then time a decoder at half speed.
command -v nasm >/dev/null || { echo "nasm is missing: apt-get install nasm (JPEG decoding's SIMD code)"; exit 1; }
cargo fetch -q
[ -x "${CUDA_VENV:-/tmp/cuda-venv}/bin/python" ] || bash "$SHARED/gpu/setup-cuda13.sh"
# shellcheck source=/dev/null
. "$SHARED/gpu/env.sh"
# cuDNN to link against: the version torch 2.11 (cu130) brings to the device, so every
# symbol the binary needs is there at run time.
if [[ " $FEATURES " == *" cudnn "* ]]; then
  "$CUDA_VENV/bin/pip" install -q "nvidia-cudnn-cu13==9.19.0.56"
  CUDNN=$("$CUDA_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cudnn/lib
  ln -sfn "$CUDNN/libcudnn.so.9" "$CUDA_LINK_ROOT/lib/libcudnn.so"
fi

# Our CUDA kernels, as the binary will compile them at run time (NVRTC) and assembled for
# sm_90: their compile errors show here rather than on the device.
python3 tools/gpu/nvrtc_check.py --arch sm_90

mkdir -p .gpu
for f in /.gpu/ /.whl/; do grep -qxF "$f" .git/info/exclude 2>/dev/null || echo "$f" >> .git/info/exclude; done
for feat in $FEATURES; do
  # One target folder: the variants share everything but candle's cuDNN code (the kernels,
  # about 4 minutes here, are built once).
  echo "== cargo build --release --features $feat (CARGO_TARGET_DIR=$TARGET)"
  CARGO_TARGET_DIR="$TARGET" cargo build --release --features "$feat"
  strip -o ".gpu/dnd-$feat" "$TARGET/release/dnd"
  gzip -9f ".gpu/dnd-$feat"
done
cp "$SHARED/gpu/run-on-device.sh" "$SHARED"/perf/*.py tools/gpu/device.sh .gpu/
# The commit the binaries are of ("-dirty": with uncommitted changes), which the device log
# prints: a later session can tell whether .gpu/ is still current before spending device time.
git describe --always --dirty > .gpu/commit
if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    diffusers==0.39.0 importlib_metadata==10.2.0 zipp==4.1.2
fi
du -ch .gpu .whl | tail -1
total=$(du -cb .gpu .whl | tail -1 | cut -f1)
[ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "more than 64 MiB to ship"; exit 1; }
echo "ready: carry .gpu and .whl; on the device: bash .gpu/device.sh"
