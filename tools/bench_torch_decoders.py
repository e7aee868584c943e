#!/usr/bin/env python3
"""PyTorch side of the CPU decoder rows in docs/PERFORMANCE.md: diffusers' AutoencoderKL
(SD-Turbo's VAE config) and AutoencoderTiny (TAESD) decoding the same number of 64x64 latents
(512 px images) as `dnd bench --device cpu --only sd-turbo.vae,taesd`, f32, random weights,
configs from assets/bench/full (written by tools/gen_bench_configs.py).

    pip install torch diffusers
    python3 tools/bench_torch_decoders.py --threads 2 --images 8
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

ROOT = Path(__file__).resolve().parent.parent / "assets" / "bench" / "full"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", choices=["vae", "taesd"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latents = torch.randn(args.images, 4, 64, 64)
    rows = []
    for name, cls, cfg in [("vae", AutoencoderKL, ROOT / "sd-turbo/vae/config.json"),
                           ("taesd", AutoencoderTiny, ROOT / "taesd/config.json")]:
        if args.only and args.only != name:
            continue
        model = cls.from_config(json.loads(cfg.read_text())).eval()
        with torch.inference_mode():
            ts = []
            for _ in range(args.runs):
                t = time.perf_counter()
                # one image at a time would be unfair to PyTorch; decode the batch at once
                model.decode(latents).sample
                ts.append(time.perf_counter() - t)
        best = sorted(ts)[len(ts) // 2]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append((name, best))
        print(f"{name}: {args.images} images in {best:.1f} s ({best / args.images:.2f} s/image), "
              f"peak RSS so far {peak:.1f} GiB, torch {torch.__version__}, {args.threads} threads")


if __name__ == "__main__":
    main()
