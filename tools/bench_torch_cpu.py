#!/usr/bin/env python3
"""PyTorch side of the CPU ratio in docs/PERFORMANCE.md: torchvision ResNet-50 forward at
224 px, batch 16, f32, random weights (same shapes as `cargo bench --bench activations`),
and PIL decode + torchvision preprocessing of the same JPEG.

    pip install torch torchvision pillow safetensors
    python3 tools/bench_torch_cpu.py

With `--e2e DIR` it also writes an end-to-end workload (N synthetic 500x375 JPEGs and random
ResNet-50 weights in torchvision names as DIR/resnet50/model.safetensors) and times PyTorch
over it: decode, preprocess, forward, layer4 mean-pooled, as `dnd activations` does:

    python3 tools/bench_torch_cpu.py --e2e /tmp/dnd-e2e
    time dnd activations --target /tmp/dnd-e2e/resnet50 --probe /tmp/dnd-e2e/probe \
        --layer layer4 --no-cache --top 1 >/dev/null
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

BATCH = 16


def timed(fn, warm=2, n=10):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def e2e(root: Path, n: int, batch: int):
    import numpy as np
    from safetensors.torch import save_file

    probe, weights = root / "probe", root / "resnet50"
    probe.mkdir(parents=True, exist_ok=True)
    weights.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = probe / f"{i:05d}.jpg"
        if not p.exists():
            base = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
            Image.fromarray(base).resize((500, 375), Image.BICUBIC).save(p, quality=90)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights / "model.safetensors")
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    files = sorted(probe.glob("*.jpg"))

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(files[i]).convert("RGB"))

    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers)
        pooled = []
        hook = model.layer4.register_forward_hook(lambda _m, _i, o: pooled.append(o.mean(dim=(2, 3))))
        t = time.perf_counter()
        with torch.inference_mode():
            for x in loader:
                model(x)
        dt = time.perf_counter() - t
        hook.remove()
        print(f"end to end, {len(files)} JPEGs, batch {batch}, {workers} loader workers: "
              f"{dt:.1f} s, {len(files) / dt:.1f} images/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", type=Path, help="write and time the end-to-end workload in this folder")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(BATCH, 3, 224, 224)
    with torch.inference_mode():
        t = timed(lambda: model(x))
    print(f"resnet50 forward b{BATCH} f32 (NCHW): {t * 1000:.0f} ms/batch, {BATCH / t:.1f} images/s")
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        t = timed(lambda: model_cl(x_cl))
    print(f"resnet50 forward b{BATCH} f32 (channels-last): {t * 1000:.0f} ms/batch, {BATCH / t:.1f} images/s")

    path = Path(__file__).resolve().parent.parent / "tests/fixtures/images/d_photo.jpg"
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    t = timed(lambda: tf(Image.open(path).convert("RGB")), warm=20, n=200)
    print(f"decode + preprocess 500x375 jpeg: {t * 1e6:.0f} us/image, {1 / t:.0f} images/s (one thread)")
    if args.e2e:
        e2e(args.e2e, args.images, 32)


if __name__ == "__main__":
    main()
