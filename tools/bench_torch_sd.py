#!/usr/bin/env python3
"""PyTorch side of the CPU Stable Diffusion rows in docs/PERFORMANCE.md: diffusers' UNet (one
step), AutoencoderKL decode (SD-Turbo's VAE) and AutoencoderTiny decode (TAESD) at the shapes
of `dnd bench --device cpu --only sd-turbo.unet,sd-turbo.vae,taesd`: 8 latents of 64x64
(512 px images), f32, random weights, configs from assets/bench/full (written by
tools/gen_bench_configs.py).

    pip install torch diffusers
    python3 tools/bench_torch_sd.py --threads 2 --only unet
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

ROOT = Path(__file__).resolve().parent.parent / "assets" / "bench" / "full"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", choices=["unet", "vae", "taesd"], action="append")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latents = torch.randn(args.images, 4, 64, 64)
    parts = {
        "unet": (UNet2DConditionModel, "sd-turbo/unet/config.json"),
        "vae": (AutoencoderKL, "sd-turbo/vae/config.json"),
        "taesd": (AutoencoderTiny, "taesd/config.json"),
    }
    for name in args.only or parts:
        cls, cfg = parts[name]
        model = cls.from_config(json.loads((ROOT / cfg).read_text())).eval()
        if name == "unet":
            # SD-Turbo runs without guidance: one row per image, 77 text tokens of 1024.
            text = torch.randn(args.images, 77, model.config.cross_attention_dim)
            run = lambda: model(latents, torch.tensor(500), encoder_hidden_states=text).sample
        else:
            run = lambda: model.decode(latents).sample
        with torch.inference_mode():
            ts = []
            for _ in range(args.runs):
                t = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t)
        median = sorted(ts)[len(ts) // 2]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{name}: {args.images} images in {median:.1f} s ({median / args.images:.2f} s/image), "
              f"peak RSS {peak:.1f} GiB, torch {torch.__version__}, {args.threads} threads", flush=True)


if __name__ == "__main__":
    main()
