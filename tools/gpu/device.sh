#!/usr/bin/env bash
# The one prepared device run (copied into .gpu/ by tools/gpu/build.sh): the PyTorch side and
# dnd bench on the same card in the same run, each part time-boxed so the whole stays inside one
# device call (about 9 minutes of work). The device returns at most 8 files, so the results
# gather in one folder that is packed into $OUT/results.tgz after every part (a run cut short
# still returns what it finished) and the log goes to $OUT/device.log.
#
#     run: bash .gpu/device.sh        (carry: .gpu, .whl)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/dnd-out}; RES=/tmp/dnd-results; mkdir -p "$OUT" "$RES"
exec > >(tee "$OUT/device.log") 2>&1
BACK=$OUT
pack() { tar czf "$BACK/results.tgz.part" -C "$RES" . && mv "$BACK/results.tgz.part" "$BACK/results.tgz"; }
date -u; echo "dnd at $(cat "$HERE/commit" 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
# The JPEG row scaled to 1,400 images/s where 16 cores should decode several times that: the
# cores this container may really use (a CPU quota would explain it).
echo "nproc $(nproc); cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo -); $(lscpu | grep -m1 'Model name')"
T0=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - T0) )); }
# ONLY=NAME,NAME,... (a second call on a still-warm machine) runs only the parts so named.
part() {  # part NAME SECONDS command...: runs it with a time limit, logs how it ended, returns its status
  local name=$1 secs=$2; shift 2
  [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]] && { echo "== $name: skipped (ONLY)"; return 0; }
  (( secs > $(left) )) && secs=$(left)
  (( secs < 20 )) && { echo "== $name: skipped, $(left) s left"; return 124; }
  echo "== $name (limit ${secs}s)"; local t=$(date +%s) rc
  timeout "$secs" "$@"; rc=$?; echo "== $name: exit $rc after $(( $(date +%s) - t )) s"; pack; return $rc
}
bench() {  # bench VARIANT NAME SECONDS dnd-bench-args...
  local variant=$1 name=$2 secs=$3; shift 3
  [ -f "$HERE/dnd-$variant.gz" ] || { echo "== $name: no dnd-$variant.gz"; return 127; }
  part "$name" "$secs" bash "$HERE/run-on-device.sh" "$HERE/dnd-$variant.gz" bench --device cuda \
    --work /tmp/dnd-bench --json "$RES/$name.json" "$@"
}

# PyTorch side: diffusers from the shipped wheels (the device has no network).
if ls "$HERE"/../.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$HERE"/../.whl/*.whl && export PYTHONPATH=/tmp/site
fi
# dnd, cuDNN build: first that the device computes what the CPU does (f32 and f16, reduced
# sizes), and that full-size batches equal their rows alone (candle's large-batch bugs); then
# the rows of the PyTorch table, whole generations, per neuron.
V=cudnn; [ -f "$HERE/dnd-cudnn.gz" ] || V=cuda
# A binary that cannot start (a library missing there) ends the run at once, leaving device time
# for a rebuild and a second try.
bash "$HERE/run-on-device.sh" "$HERE/dnd-$V.gz" --version || { echo "== dnd-$V does not start"; exit 3; }
# With our CUDA kernels and our cuDNN convolution op (gpu_ops) first. Should a check fail: the
# fused ops are checked first, each naming its kernel family, so the family of the first failing
# check is turned off alone (DND_GPU_KERNELS_OFF) and the checks run again, up to three
# families. Should that not do, the same checks with every map NCHW (DND_CHANNELS_LAST=0), then
# with candle's convolution, then with candle's path throughout, tell which of ours is to blame,
# and the timings run without it, so that every figure is of a run that computes the right
# thing. A check cut short by its time limit (exit 124) proves nothing either way.
OURS=1
failed() { local rc=$?; (( rc != 0 && rc != 124 )) && OURS=0; return 0; }
passed() { local rc=$?; (( rc == 0 || rc == 124 )); }
first_kernel() {  # first_kernel JSON...: the kernel family of the first failing check, if any
  python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        checks = json.load(open(path))
    except (OSError, ValueError):
        continue
    for c in checks:
        if c.get("error") is None or c["error"] > c["tolerance"]:
            print(c.get("kernel") or "")
            sys.exit(0)
PY
}
bench $V check-f32 60 --check --quick --dtype f32 || failed
bench $V check-f16 120 --check || failed
if [ $OURS = 0 ]; then
  OFF=; LAST="$RES/check-f16.json $RES/check-f32.json"
  for try in 1 2 3; do
    k=$(first_kernel $LAST)
    { [ -z "$k" ] || [[ ",$OFF," == *",$k,"* ]]; } && break
    OFF=${OFF:+$OFF,}$k; echo "== turning off our $OFF kernels"
    if ( export DND_GPU_KERNELS_OFF=$OFF; bench $V check-f16-off$try 90 --check ) || passed; then
      OURS=1; break
    fi
    LAST="$RES/check-f16-off$try.json"
  done
  # A family whose own check failed stays off whatever comes next.
  [ -n "$OFF" ] && export DND_GPU_KERNELS_OFF=$OFF
fi
if [ $OURS = 0 ]; then
  if ( export DND_CHANNELS_LAST=0; bench $V check-f16-nchw 90 --check ) || passed; then
    export DND_CHANNELS_LAST=0
  elif ( export DND_CUDNN_CONV=0; bench $V check-f16-candle-conv 90 --check ) || passed; then
    export DND_CUDNN_CONV=0
  else
    ( export DND_GPU_KERNELS=0 DND_CUDNN_CONV=0; bench $V check-f16-candle-ops 90 --check )
    export DND_GPU_KERNELS=0 DND_CUDNN_CONV=0
  fi
fi
OUT=$RES part torch_same_shapes 90 python3 "$HERE/torch_same_shapes.py"
# MODELS=row,row,... narrows this part (a second call that measures what changed).
bench $V bench-models 200 --runs 5 --budget 10 --only "${MODELS:-ops,resnet50,blip-large.vision,blip-large.captions,sd-turbo.unet,sd-turbo.vae,taesd,sd-v1-4.unet,sd-v1-4.vae,clip,sd-turbo.generate.steps1,sd-turbo.generate.steps4}"
# The fast preset with the VAE, TAESD, and TAESD with the VAE for CLIP's top (--decoder hybrid).
bench $V bench-e2e-fast 150 --runs 2 --budget 20 --neurons 8 --only e2e.fast
# f32 (TF32 where cuDNN and cuBLAS take it), beside PyTorch's f32 row.
bench $V bench-f32 60 --runs 5 --budget 5 --dtype f32 --only resnet50.forward,clip
# Before/after of each lever on the rows they touch: candle's own path, then our kernels with
# candle's convolution.
ROWS=resnet50.forward,sd-turbo.unet,sd-turbo.vae
[ $OURS = 1 ] && ( export DND_GPU_KERNELS=0 DND_CUDNN_CONV=0
  bench $V bench-candle-ops 60 --runs 3 --budget 5 --only $ROWS )
[ $OURS = 1 ] && ( export DND_CUDNN_CONV=0; bench $V bench-candle-conv 60 --runs 3 --budget 5 --only $ROWS )
# Our cuDNN op with every map NCHW: what channels-last buys ResNet, the UNet and the VAE.
[ $OURS = 1 ] && [ $V = cudnn ] && ( export DND_CHANNELS_LAST=0
  bench $V bench-nchw 60 --runs 3 --budget 5 --only $ROWS,sd-v1-4.unet )
# cudarc's defaults (an event pair made per allocation, the memory pool emptied at every
# synchronisation) against dnd's setup of the device, on rows with many small kernels.
( export DND_CUDA_SETUP=0; bench $V bench-cuda-defaults 60 --runs 3 --budget 5 \
  --only resnet50.forward.b256,clip,blip-large.captions.b10,sd-turbo.unet )
# The plain CUDA build (no cuDNN) on the convolution-heavy rows, to see what cuDNN buys.
[ $V = cudnn ] && bench cuda bench-nocudnn 60 --runs 3 --budget 5 --only resnet50.forward,sd-turbo.vae,sd-v1-4.unet
OUT=$RES part reference_dnd_bench 150 python3 "$HERE/reference_dnd_bench.py" --budget-seconds 120
# The paper preset per neuron, beside the reference's (its goal: 1.5x faster).
bench $V bench-e2e-paper 90 --runs 1 --budget 1 --neurons 2 --only e2e.paper.one
# Where the time goes, per kernel, for the next round of work: ncu collecting one metric (a
# single pass, no replay) over the timed run alone (dnd bench makes its timed runs the CUDA
# profiler's range; the warm-up, with cuDNN's algorithm search, stays out).
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] && [ $V = cudnn ] && for row in resnet50.forward.b256 sd-v1-4.unet.b16 sd-v1-4.vae.b8 \
    clip-vit-b16.embed.b64; do
  part "ncu-$row" 60 "$NCU" --target-processes all --profile-from-start off --clock-control none \
    --metrics gpu__time_duration.sum --print-summary per-kernel --csv --log-file "$RES/ncu-$row.csv" \
    bash "$HERE/run-on-device.sh" "$HERE/dnd-$V.gz" bench --device cuda --work /tmp/dnd-bench \
    --only "$row" --runs 1 --budget 0
done
# With the time left: the fast preset amortised with an LLM that takes 1 s an answer (how much
# of it the pipeline hides behind the models; 16 neurons, as the first and last waves' waits
# cannot be hidden), then the slow rows.
bench $V bench-e2e-llm 80 --runs 2 --budget 20 --neurons 16 --llm-latency 1 --only e2e.fast.batch
# A layer's neurons can share concepts, and a job copies the images of a concept it has made rather
# than generating them again: the fast preset amortised with the mock answering from 40
# concepts in turn (the `.reused` row: the share of images copied).
bench $V bench-e2e-reuse 70 --runs 2 --budget 20 --neurons 16 --llm-concepts 40 --only e2e.fast.batch
bench $V bench-slow "$(left)" --runs 1 --budget 1 --neurons 2 \
  --only sd-v1-4.generate.steps50.b10,sd-turbo.generate.steps50.b10,blip-base
echo "done after $(( $(date +%s) - T0 )) s"; pack; ls -la "$OUT" "$RES"
