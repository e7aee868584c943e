#!/usr/bin/env python3
"""PyTorch side of the CPU ratio in docs/PERFORMANCE.md: torchvision ResNet-50 forward at
224 px, batch 16, f32, random weights (same shapes as `cargo bench --bench activations`),
and PIL decode + torchvision preprocessing of the same JPEG.

    pip install torch torchvision pillow
    python3 tools/bench_torch_cpu.py
"""
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


def main():
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


if __name__ == "__main__":
    main()
