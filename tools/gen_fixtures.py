#!/usr/bin/env python3
"""Writes the small random-weight fixtures and reference outputs under tests/fixtures/.

Everything here is produced by the reference libraries themselves (torchvision, timm,
transformers, PIL), so the Rust parity tests compare against what a real checkpoint computes in
PyTorch. Rerunning it reproduces the files byte for byte (fixed seeds).

    pip install torch torchvision timm transformers safetensors numpy pillow datasets
    python3 tools/gen_fixtures.py
"""
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import timm
from timm.models.resnet import BasicBlock, Bottleneck
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.models import save_for_hf

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
IMAGES = ROOT / "images"
EDGE = ROOT / "edge"
MODELS = ROOT / "models"


def synthetic_photo(rng, w, h):
    """Smooth colour fields with a few hard edges: enough structure for resampling to matter."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.002, 0.05), rng.uniform(0.002, 0.05), rng.uniform(0, 6.28)
            img[..., c] += np.sin(x * fx + y * fy + ph)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, min(w, h) / 3)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = rng.uniform(-3, 3, 3)
    img += rng.normal(0, 0.15, img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return Image.fromarray((img * 255).round().astype(np.uint8))


def write_images(rng):
    IMAGES.mkdir(parents=True, exist_ok=True)
    # Sizes chosen to hit odd centre-crop offsets (Python's round-half-even), upscaling and both aspects.
    specs = [("a_landscape.png", 333, 250), ("b_portrait.png", 240, 417), ("c_small.png", 100, 80),
             ("d_photo.jpg", 500, 375)]
    paths = []
    for name, w, h in specs:
        img = synthetic_photo(rng, w, h)
        p = IMAGES / name
        img.save(p, quality=92) if name.endswith(".jpg") else img.save(p)
        paths.append(p)
    return paths


def write_edge_cases(rng):
    EDGE.mkdir(parents=True, exist_ok=True)
    synthetic_photo(rng, 64, 48).convert("CMYK").save(EDGE / "cmyk.jpg", quality=95)
    # Left half red, right half blue, stored sideways with EXIF orientation 6 (rotate 90 CW to view).
    arr = np.zeros((40, 20, 3), np.uint8)
    arr[:20, :, 0] = 255
    arr[20:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(EDGE / "exif_rotated.jpg", exif=exif, quality=95)
    g16 = (np.linspace(0, 65535, 32 * 24).reshape(24, 32)).astype(np.uint16)
    Image.fromarray(g16).save(EDGE / "gray16.png")
    # A PNG whose header claims 100000 x 100000 pixels: a decompression bomb.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    (EDGE / "bomb.png").write_bytes(bomb)


def randomise_batchnorm(model, gen):
    """Random init leaves BN as identity; random statistics make BN folding observable."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_mean.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var.data = torch.rand(m.num_features, generator=gen) + 0.5


def capture(model, x, names, run=None):
    """The outputs of the modules `names` (a tuple's first part) while `run()` runs (default:
    the model on `x`), and what it returns."""
    outs = {}  # cloned: the ReLUs that follow run in place and would overwrite them
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(
        lambda _m, _i, o, n=n: outs.__setitem__(n, (o[0] if isinstance(o, tuple) else o).clone())) for n in names]
    with torch.no_grad():
        result = run() if run else model(x)
    for h in hooks:
        h.remove()
    return outs, result


def pooled(t, pool):
    if t.dim() == 4:
        return t.mean(dim=(2, 3)) if pool == "mean" else t.amax(dim=(2, 3))
    if t.dim() == 3:  # ViT tokens: the CLS token
        return t[:, 0, :]
    return t


def write_resnet(name, block, layers, half, x, gen):
    torch.manual_seed(0)
    model = timm.create_model("resnet50.tv_in1k", pretrained=False, block=block, layers=layers,
                              channels=(8, 16, 32, 64), stem_width=8, num_classes=10, zero_init_last=False).eval()
    randomise_batchnorm(model, gen)
    if half:  # store f16 weights; the reference computes with the same rounded values in f32
        model = model.half().float()
    folder = MODELS / name
    args = dict(layers=list(layers), channels=[8, 16, 32, 64], stem_width=8, num_classes=10, zero_init_last=False,
                block=block.__name__)
    save_for_hf(model.half() if half else model, folder, safe_serialization=True, model_args=args)
    save_resnet_reference(model.float(), x, name, "layer3", None)


def save_resnet_reference(model, x, name, map_layer, map_channels):
    """A timm ResNet's reference: each tap mean- and max-pooled under torchvision's names, the
    feature map of `map_layer` (its first `map_channels`, or all), the logits."""
    taps = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer2.0", "layer3", "layer4",
            "layer4.0", "global_pool", "fc"]
    outs, logits = capture(model, x, taps)
    ref = {}
    for t in taps:
        # timm calls the stem activation act1 and the pooling global_pool; torchvision relu/avgpool.
        ours = {"act1": "relu", "global_pool": "avgpool"}.get(t, t)
        o = outs[t].flatten(1) if t == "global_pool" else outs[t]
        ref[f"mean/{ours}"] = pooled(o, "mean").contiguous()
        if o.dim() == 4:
            ref[f"max/{ours}"] = pooled(o, "max").contiguous()
    ref[f"map/{map_layer}"] = outs[map_layer][:, :map_channels].contiguous()
    ref["logits"] = logits.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / f"{name}.reference.safetensors")


def write_resnet_cifar(x):
    """A CIFAR ResNet as such checkpoints are made from timm's (or torchvision's): conv1 replaced
    by a 3x3 convolution of stride 1 and the max pool by an identity, saved with timm's config
    for 32 px inputs. Basic blocks, f16; run on the 224 px fixture batch, which the network
    takes as it is (it is fully convolutional)."""
    torch.manual_seed(14)
    gen = torch.Generator().manual_seed(14)
    args = dict(block=BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                zero_init_last=False)
    model = timm.create_model("resnet18", pretrained=False, **args,
                              pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0)).eval()
    model.conv1 = torch.nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    randomise_batchnorm(model, gen)
    model = model.half().float()
    save_for_hf(model.half(), MODELS / "resnet_cifar", safe_serialization=True,
                model_args=dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8, num_classes=10,
                                zero_init_last=False, block="BasicBlock"))
    save_resnet_reference(model.float(), x, "resnet_cifar", "layer4", 6)  # the tests read channel 5


def write_resnext_and_resnet_d(x):
    """timm's ResNet variants with the torchvision layout's names but other shapes:
    - resnext: grouped 3x3 convolutions (cardinality 4, as resnext50_32x4d's 32);
    - resnet_d: the tiered deep stem (three 3x3 convolutions, 6 then 8 channels, as resnet26t's)
      and average-pool shortcuts (avg_down, as resnet50d's), run on the batch's top-left 208 px,
      so that layer4's shortcut pools a 13x13 map to 7x7 (ceil mode, the last windows overhang).
    Both f16; the tests read channel 5 of layer4's map."""
    for name, args, size in [
        ("resnext", dict(cardinality=4, base_width=16), 224),
        ("resnet_d", dict(stem_type="deep_tiered", avg_down=True), 208),
    ]:
        torch.manual_seed(15)
        gen = torch.Generator().manual_seed(15)
        args = dict(layers=[1, 2, 1, 1], channels=[8, 16, 32, 64], stem_width=8, num_classes=10, zero_init_last=False,
                    **args)
        model = timm.create_model("resnet50", pretrained=False, block=Bottleneck, **args).eval()
        randomise_batchnorm(model, gen)
        model = model.half().float()
        save_for_hf(model.half(), MODELS / name, safe_serialization=True, model_args=dict(block="Bottleneck", **args))
        save_resnet_reference(model.float(), x[:, :, :size, :size], name, "layer4", 6)


def save_cnn_reference(model, x, name, taps, map_layer, run=None):
    """A convolutional network's reference: each tap mean- and max-pooled (a pooled 1x1 map
    flattened), channels 0-5 of `map_layer`'s feature map (the tests read channel 5), the logits."""
    outs, logits = capture(model, x, taps, run)
    ref = {}
    for t in taps:
        o = outs[t]
        o = o.flatten(1) if o.dim() == 4 and o.shape[2:] == (1, 1) else o
        ref[f"mean/{t}"] = pooled(o, "mean").contiguous()
        if o.dim() == 4:
            ref[f"max/{t}"] = pooled(o, "max").contiguous()
    ref[f"map/{map_layer}"] = outs[map_layer][:, :6].contiguous()
    logits = getattr(logits, "logits", logits)
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        ref["logits"] = logits.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / f"{name}.reference.safetensors")


def randomise_layer_norms_and_scales(model, gen):
    """Random biases, LayerNorm affine maps and LayerScale: at their initial values (0, 1 and
    1e-6) the blocks would be near identities and these parameters unobservable."""
    for n, p in model.named_parameters():
        if n.endswith(("gamma", "layer_scale", "layer_scale_parameter", "grn.weight")):
            p.data = torch.randn(p.shape, generator=gen) * 0.5
        elif n.endswith("bias"):
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1


def write_convnext(x):
    """ConvNeXts at small widths (8, 16, 24, 32; depths 1, 2, 1, 1), f16, with random LayerNorms
    and LayerScale, as each library builds and saves them:
    - convnext_timm: timm's convnext_tiny class (save_for_hf);
    - convnext_timm_conv_mlp: timm's conv_mlp form (convnext_atto's: the MLP as 1x1
      convolutions, LayerNorm2d) without LayerScale;
    - convnext_torchvision: torchvision's ConvNeXt, its state dict as model.safetensors;
    - convnext_transformers: ConvNextForImageClassification (save_pretrained);
    - convnext_transformers_model: ConvNextModel (no prefix, no classifier);
    - convnextv2_timm, convnextv2_transformers: ConvNeXt V2 (a GRN in each block's MLP, no
      LayerScale) by timm (convnextv2_tiny's class) and transformers
      (ConvNextV2ForImageClassification);
    - convnext_timm_head_mlp: timm's head with a hidden layer (convnext_large_mlp's)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from transformers import (ConvNextConfig, ConvNextForImageClassification, ConvNextModel, ConvNextV2Config,
                              ConvNextV2ForImageClassification)
    dims, depths = [8, 16, 24, 32], [1, 2, 1, 1]
    for seed, name in enumerate(["convnext_timm", "convnext_timm_conv_mlp", "convnext_torchvision",
                                 "convnext_transformers", "convnext_transformers_model", "convnextv2_timm",
                                 "convnextv2_transformers", "convnext_timm_head_mlp"]):
        torch.manual_seed(30 + seed)
        gen = torch.Generator().manual_seed(30 + seed)
        folder = MODELS / name
        timm_made = name.endswith(("_timm", "conv_mlp", "head_mlp"))
        if timm_made:
            args = dict(depths=depths, dims=dims, num_classes=10)
            if name.endswith("conv_mlp"):
                args.update(conv_mlp=True, ls_init_value=None)
            if name.endswith("head_mlp"):
                args.update(head_hidden_size=12)
            arch = "convnextv2_tiny" if name.startswith("convnextv2") else "convnext_tiny"
            model = timm.create_model(arch, pretrained=False, **args).eval()
            taps = ["stem", "stages.0", "stages.0.blocks.0", "stages.1", "stages.1.blocks.1", "stages.2",
                    "stages.3", "head.global_pool", "head.norm"] + (["head.pre_logits"] if "head_hidden_size" in args
                                                                    else []) + ["head.fc"]
            map_layer, run = "stages.2", None
        elif name == "convnext_torchvision":
            setting = [CNBlockConfig(a, b, n) for a, b, n in zip(dims, dims[1:] + [None], depths)]
            model = ConvNeXt(setting, num_classes=10).eval()
            taps = ["features.0", "features.1", "features.1.0", "features.3", "features.3.1", "features.5",
                    "features.7", "avgpool", "classifier.0", "classifier.2"]
            map_layer, run = "features.5", None
        elif name.startswith("convnextv2"):
            model = ConvNextV2ForImageClassification(ConvNextV2Config(hidden_sizes=dims, depths=depths,
                                                                      num_labels=10)).eval()
            p, head = "convnextv2.", True
        else:
            cfg = ConvNextConfig(hidden_sizes=dims, depths=depths, num_labels=10)
            head = name == "convnext_transformers"
            model = (ConvNextForImageClassification if head else ConvNextModel)(cfg).eval()
            p = "convnext." if head else ""
        if not timm_made and name != "convnext_torchvision":
            taps = [f"{p}embeddings", f"{p}encoder.stages.0", f"{p}encoder.stages.0.layers.0", f"{p}encoder.stages.1",
                    f"{p}encoder.stages.1.layers.1", f"{p}encoder.stages.2", f"{p}encoder.stages.3",
                    f"{p}layernorm"] + (["classifier"] if head else [])
            map_layer, run = f"{p}encoder.stages.2", lambda: model(pixel_values=x)
        randomise_layer_norms_and_scales(model, gen)
        model = model.half().float()
        if timm_made:
            save_for_hf(model.half(), folder, safe_serialization=True, model_args=args)
        elif name == "convnext_torchvision":
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
        else:
            model.half().save_pretrained(folder, safe_serialization=True)
        save_cnn_reference(model.float(), x, name, taps, map_layer, run)


def write_vgg(x):
    """torchvision's VGG (with and without BatchNorm) and AlexNet at small widths, their state
    dicts as model.safetensors, f16: the classes themselves, with narrower convolutions and
    classifiers of the same module structure (torchvision builds theirs at full width). Run on
    the batch's top-left 200 px, where the adaptive average pool resamples (6 to 7 in VGG, 5 to
    6 in AlexNet)."""
    from torch import nn
    from torchvision.models import AlexNet
    from torchvision.models.vgg import VGG, make_layers
    size = 200
    for seed, name in enumerate(["vgg", "vgg_bn", "alexnet"]):
        torch.manual_seed(40 + seed)
        gen = torch.Generator().manual_seed(40 + seed)
        if name == "alexnet":
            model = AlexNet(num_classes=10)
            model.features = nn.Sequential(
                nn.Conv2d(3, 8, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(8, 12, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
            model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16 * 36, 16), nn.ReLU(inplace=True),
                                             nn.Dropout(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 10))
            classifier = ["classifier.1", "classifier.2", "classifier.4", "classifier.5", "classifier.6"]
        else:
            cfg = [8, "M", 16, "M", 16, 16, "M", 24, "M", 24, 24, "M"]
            model = VGG(make_layers(cfg, batch_norm=name == "vgg_bn"), num_classes=10)
            model.classifier = nn.Sequential(nn.Linear(24 * 49, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 16),
                                             nn.ReLU(True), nn.Dropout(), nn.Linear(16, 10))
            classifier = ["classifier.0", "classifier.1", "classifier.3", "classifier.4", "classifier.6"]
        model.eval()
        randomise_batchnorm(model, gen)
        for n, p in model.named_parameters():
            if n.endswith("bias") and not isinstance(dict(model.named_modules())[n.rsplit(".", 1)[0]],
                                                     nn.BatchNorm2d):
                p.data = torch.randn(p.shape, generator=gen) * 0.1
        model = model.half().float()
        folder = MODELS / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if "num_batches" not in k},
                  folder / "model.safetensors")
        taps = [f"features.{i}" for i in range(len(model.features))] + ["avgpool"] + classifier
        map_layer = f"features.{len(model.features) - 2}"  # the last ReLU
        save_cnn_reference(model, x[:, :, :size, :size], name, taps, map_layer)


def write_vit(x, gen):
    torch.manual_seed(1)
    model = timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", pretrained=False, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():  # timm zero-initialises the head and small-inits tokens; make them matter
        for p in (model.cls_token, model.pos_embed, model.head.weight, model.head.bias):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    folder = MODELS / "vit_tiny"
    save_for_hf(model, folder, safe_serialization=True,
                model_args=dict(embed_dim=64, depth=2, num_heads=2, num_classes=10))
    taps = ["blocks.0", "blocks.1", "norm", "head"]
    outs, logits = capture(model, x, taps)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["map/blocks.1"] = outs["blocks.1"][:, 1:, :].contiguous()
    ref["logits"] = logits.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_tiny.reference.safetensors")
    return model


def write_vit_dinov2(x):
    """DINOv2's timm layout (vit_small_patch14_dinov2): 14 px patches, LayerScale on both
    branches (ls1/ls2.gamma, as DeiT III has too) and no head. At 224 px as timm's
    pretrained_cfg_overlay sets it, and stored in f16 (the reference computes with the same
    rounded values in f32), so the folder stays small."""
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, embed_dim=64, depth=2,
                              num_heads=2, img_size=224, pretrained_cfg_overlay=dict(input_size=(3, 224, 224))).eval()
    with torch.no_grad():  # timm initialises the scales at 1e-5; make the branches matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name in ("cls_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = model.half().float()
    save_for_hf(model.half(), MODELS / "vit_dinov2_tiny", safe_serialization=True,
                model_args=dict(embed_dim=64, depth=2, num_heads=2, img_size=224))
    model = model.float()
    taps = ["blocks.0", "blocks.1", "norm"]
    outs, _ = capture(model, x, taps)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["map/blocks.1"] = outs["blocks.1"][:, 1:, 7].contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_dinov2_tiny.reference.safetensors")


def write_vit_deit3(x):
    """DeiT III's timm layout (deit3_small_patch16_224): position embeddings without the class
    token's row (no_embed_class), LayerScale, a head. Narrow, one block, f16."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    args = dict(embed_dim=32, depth=1, num_heads=2, num_classes=5)
    model = timm.create_model("deit3_small_patch16_224.fb_in1k", pretrained=False, **args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name in ("cls_token", "pos_embed", "head.weight", "head.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    assert model.no_embed_class and model.pos_embed.shape[1] == 196
    model = model.half().float()
    save_for_hf(model.half(), MODELS / "vit_deit3_tiny", safe_serialization=True, model_args=args)
    model = model.float()
    taps = ["blocks.0", "norm", "head"]
    outs, logits = capture(model, x, taps)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["logits"] = logits.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_deit3_tiny.reference.safetensors")


def write_vit_torchvision(x):
    """torchvision's VisionTransformer (the vit_b_16 family's class) at a small width, its
    state_dict as safetensors as the ResNet fixtures are, stored in f16. One 64-wide head: a
    torchvision state_dict does not record the head count, and every torchvision ViT has
    64-wide heads (ViT-H's 80-wide ones excepted), which is what dnd assumes."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    model = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=1,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    with torch.no_grad():  # torchvision zero-initialises the head; make it and the tokens matter
        for p in (model.class_token, model.encoder.pos_embedding, model.heads.head.weight, model.heads.head.bias):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = model.half().float()
    folder = MODELS / "vit_torchvision_tiny"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    taps = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "encoder.ln", "heads.head"]
    outs, logits = capture(model, x, taps)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["logits"] = logits.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_torchvision_tiny.reference.safetensors")


def write_vit_transformers(x, paths):
    """transformers' ViTForImageClassification (google/vit-base-patch16-224's class) at a small
    width, saved by save_pretrained with its ViTImageProcessor (both sides to 224, bilinear,
    mean and std 0.5), stored in f16; with the processor's pixels for the fixture images (every
    7th row and column)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    image_size=224, patch_size=16, num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")) or name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = model.half().float()
    folder = MODELS / "vit_transformers_tiny"
    model.half().save_pretrained(folder, safe_serialization=True)
    processor = ViTImageProcessor(size={"height": 224, "width": 224})
    processor.save_pretrained(folder)
    model = model.float()
    # transformers 5 calls the layers vit.layers.N; the checkpoint (and dnd) vit.encoder.layer.N.
    taps = {"vit.layers.0": "vit.encoder.layer.0", "vit.layers.1": "vit.encoder.layer.1",
            "vit.layernorm": "vit.layernorm", "classifier": "classifier"}
    outs, logits = capture(model, x, taps, lambda: model(pixel_values=x).logits)
    ref = {f"cls/{ours}": pooled(outs[t], "mean").contiguous() for t, ours in taps.items()}
    ref["logits"] = logits.contiguous()
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
    ref["pixels/every7"] = pixels[:, :, ::7, ::7].contiguous()  # the whole image, sampled: small
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_transformers_tiny.reference.safetensors")


def write_resnet_transformers(x, paths):
    """transformers' ResNets (microsoft/resnet-* classes) at small widths, saved by save_pretrained
    in f16 with random BatchNorm statistics:
    - resnet_transformers_tiny: ResNetForImageClassification, bottleneck blocks, the defaults of
      microsoft/resnet-50, with its ConvNextImageProcessor (shortest edge 224 / crop_pct 0.875,
      bicubic, crop 224) and that processor's pixels for the fixture images (every 7th row and
      column), from transformers' PIL processor and its default torchvision one;
    - resnet_transformers_basic: basic blocks (microsoft/resnet-18's);
    - resnet_transformers_model: ResNetModel (no classifier, no `resnet.` prefix) with the stride
      in the bottleneck's first 1x1 convolution and in the first stage."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification, ResNetModel
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    kinds = {
        "resnet_transformers_tiny": (ResNetForImageClassification, dict(layer_type="bottleneck")),
        "resnet_transformers_basic": (ResNetForImageClassification, dict(layer_type="basic")),
        "resnet_transformers_model": (ResNetModel, dict(layer_type="bottleneck", downsample_in_bottleneck=True,
                                                        downsample_in_first_stage=True)),
    }
    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    for seed, (name, (cls, extra)) in enumerate(kinds.items()):
        torch.manual_seed(20 + seed)
        gen = torch.Generator().manual_seed(20 + seed)
        cfg = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1], num_labels=10,
                           **extra)
        model = cls(cfg).eval()
        randomise_batchnorm(model, gen)
        model = model.half().float()
        folder = MODELS / name
        model.half().save_pretrained(folder, safe_serialization=True)
        model = model.float()
        p = "resnet." if cls is ResNetForImageClassification else ""
        taps = [f"{p}embedder.embedder.convolution", f"{p}embedder.embedder.normalization",
                f"{p}embedder.embedder", f"{p}embedder", f"{p}encoder.stages.0", f"{p}encoder.stages.1",
                f"{p}encoder.stages.1.layers.0", f"{p}encoder.stages.2", f"{p}encoder.stages.3",
                f"{p}encoder.stages.3.layers.0", f"{p}pooler"] + (["classifier"] if p else [])
        outs, _ = capture(model, x, taps, lambda: model(pixel_values=x))
        ref = {}
        for t in taps:
            o = outs[t].flatten(1) if t.endswith("pooler") else outs[t]
            ref[f"mean/{t}"] = pooled(o, "mean").contiguous()
            if o.dim() == 4:
                ref[f"max/{t}"] = pooled(o, "max").contiguous()
        if name == "resnet_transformers_tiny":
            ref["map/stages.2"] = outs[f"{p}encoder.stages.2"][:, :6].contiguous()  # the tests read channel 5
            ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, **imagenet).save_pretrained(folder)
            images = [Image.open(q).convert("RGB") for q in paths]
            for backend, proc in [("pil", ConvNextImageProcessorPil), ("torchvision", ConvNextImageProcessor)]:
                pixels = proc(size={"shortest_edge": 224}, crop_pct=0.875, **imagenet)(
                    images, return_tensors="pt").pixel_values
                ref[f"pixels/{backend}/every7"] = pixels[:, :, ::7, ::7].contiguous()
        save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / f"{name}.reference.safetensors")


def write_vit_dinov2_transformers(x, paths):
    """transformers' Dinov2ForImageClassification (facebook/dinov2-*'s classes) at a small width,
    trained at 518 px (37 x 37 position embeddings) and run at 224 as facebook/dinov2-*'s
    BitImageProcessor gives it (shortest edge 256, bicubic, crop 224): transformers resizes the
    position embeddings to 16 x 16 (bicubic). Its head reads the class token and the patch
    tokens' mean. Saved by save_pretrained in f16 with the processor, random LayerScale; with
    the processor's pixels (every 7th row and column), PIL's and torchvision's."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2ForImageClassification
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14,
                       num_labels=10)
    model = Dinov2ForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings", "lambda1")) or name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = model.half().float()
    folder = MODELS / "vit_dinov2_transformers"
    model.half().save_pretrained(folder, safe_serialization=True)
    kw = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
              resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    BitImageProcessor(**kw).save_pretrained(folder)
    model = model.float()
    taps = ["dinov2.encoder.layer.0", "dinov2.encoder.layer.1", "dinov2.layernorm", "classifier"]
    outs, logits = capture(model, x, taps, lambda: model(pixel_values=x).logits)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["logits"] = logits.contiguous()
    ref["map/dinov2.encoder.layer.1"] = outs["dinov2.encoder.layer.1"][:, 1:, :8].contiguous()  # 8 neurons: small
    images = [Image.open(q).convert("RGB") for q in paths]
    for backend, proc in [("pil", BitImageProcessorPil), ("torchvision", BitImageProcessor)]:
        pixels = proc(**kw)(images, return_tensors="pt").pixel_values
        ref[f"pixels/{backend}/every7"] = pixels[:, :, ::7, ::7].contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_dinov2_transformers.reference.safetensors")


def write_vit_registers(x):
    """ViTs with register tokens between the class token and the patches, f16:
    - vit_reg4_dinov2_tiny: timm's vit_small_patch14_reg4_dinov2 (4 registers, position
      embeddings for the patches alone, LayerScale, no head) at 224 px;
    - vit_reg_pos_tiny: a timm ViT with 2 registers whose position embeddings cover every
      token (no_embed_class false) and a head.
    The references' maps are the patch tokens (registers left out)."""
    for name, seed, arch, args, regs in [
        ("vit_reg4_dinov2_tiny", 11, "vit_small_patch14_reg4_dinov2.lvd142m",
         dict(embed_dim=64, depth=2, num_heads=2, img_size=224), 4),
        ("vit_reg_pos_tiny", 12, "vit_base_patch16_224.augreg2_in21k_ft_in1k",
         dict(embed_dim=32, depth=1, num_heads=2, num_classes=5, reg_tokens=2, no_embed_class=False), 2),
    ]:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        overlay = dict(pretrained_cfg_overlay=dict(input_size=(3, 224, 224))) if "dinov2" in arch else {}
        model = timm.create_model(arch, pretrained=False, **args, **overlay).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("gamma") or pname in ("cls_token", "reg_token", "pos_embed", "head.weight",
                                                        "head.bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        assert model.num_prefix_tokens == 1 + regs
        model = model.half().float()
        save_for_hf(model.half(), MODELS / name, safe_serialization=True, model_args=args)
        model = model.float()
        taps = ["blocks.0", "norm"] + (["head"] if "num_classes" in args else [])
        outs, logits = capture(model, x, taps)
        ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
        ref["map/norm"] = outs["norm"][:, 1 + regs:, 7].contiguous()
        if "num_classes" in args:
            ref["logits"] = logits.contiguous()
        save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / f"{name}.reference.safetensors")


def write_vit_dinov2_registers_transformers(x):
    """transformers' Dinov2WithRegistersForImageClassification (facebook/dinov2-with-registers-*
    classes) at a small width, trained at 518 px and run at 224 with facebook's processor as
    vit_dinov2_transformers is: 4 registers after the class token, position embeddings resized
    by antialiased bicubic interpolation (where DINOv2's own are not antialiased), a head on the
    class token and the patch tokens' mean. f16."""
    from transformers import (BitImageProcessor, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersForImageClassification)
    torch.manual_seed(13)
    gen = torch.Generator().manual_seed(13)
    cfg = Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=518,
                                    patch_size=14, num_labels=10, num_register_tokens=4)
    model = Dinov2WithRegistersForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "register_tokens", "position_embeddings", "lambda1")) \
                    or name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = model.half().float()
    folder = MODELS / "vit_dinov2_registers_transformers"
    model.half().save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    model = model.float()
    prefix = "dinov2_with_registers"
    taps = [f"{prefix}.encoder.layer.0", f"{prefix}.encoder.layer.1", f"{prefix}.layernorm", "classifier"]
    outs, logits = capture(model, x, taps, lambda: model(pixel_values=x).logits)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["logits"] = logits.contiguous()
    ref[f"map/{prefix}.layernorm"] = outs[f"{prefix}.layernorm"][:, 5:, 3].contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()},
              MODELS / "vit_dinov2_registers_transformers.reference.safetensors")


def write_vit_clip(x):
    """CLIP image towers as targets, f16:
    - vit_clip_timm: timm's vit_base_patch16_clip_quickgelu_224 (OpenAI's CLIP ViT-B/16 tower:
      a norm before the blocks, QuickGELU, LayerNorm eps 1e-5, no patch bias, the projection as
      the head), small;
    - vit_clip_transformers: transformers' CLIPModel (openai/clip-vit-base-patch16's class),
      small, with its image processor; the text tower is in the file and unused."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(15)
    gen = torch.Generator().manual_seed(15)
    args = dict(embed_dim=48, depth=2, num_heads=2, num_classes=16)
    model = timm.create_model("vit_base_patch16_clip_quickgelu_224.openai", pretrained=False, **args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed", "head.weight", "head.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("mlp.fc1.weight"):  # inputs where QuickGELU and GELU part
                p.mul_(6.0)
    model = model.half().float()
    save_for_hf(model.half(), MODELS / "vit_clip_timm", safe_serialization=True, model_args=args)
    model = model.float()
    taps = ["blocks.0", "blocks.1", "norm", "head"]
    outs, logits = capture(model, x, taps)
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    ref["logits"] = logits.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, MODELS / "vit_clip_timm.reference.safetensors")

    cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                      num_attention_heads=2, max_position_embeddings=16),
                     vision_config=dict(image_size=224, patch_size=16, hidden_size=48, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=2), projection_dim=16)
    clip = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith(("class_embedding", "position_embedding.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    clip = clip.half().float()
    folder = MODELS / "vit_clip_transformers"
    clip.half().save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    clip = clip.float()
    taps = ["vision_model.encoder.layers.0", "vision_model.encoder.layers.1", "vision_model.post_layernorm",
            "visual_projection"]
    outs, embeds = capture(clip, x, taps, lambda: clip.get_image_features(pixel_values=x))
    ref = {f"cls/{t}": pooled(outs[t], "mean").contiguous() for t in taps}
    embeds = embeds if torch.is_tensor(embeds) else embeds.pooler_output
    ref["logits"] = embeds.contiguous()
    save_file({k: v.clone().contiguous() for k, v in ref.items()},
              MODELS / "vit_clip_transformers.reference.safetensors")


def write_parquet_shard():
    """A dataset shard as the Hub stores image datasets: `datasets`' Image feature in parquet."""
    from datasets import Dataset, Features, Image as HFImage, Value
    files = [IMAGES / "c_small.png", EDGE / "exif_rotated.jpg", None, EDGE / "cmyk.jpg"]
    rows = {"label": ["small", "rotated", "missing", "cmyk"],
            "image": [None if f is None else {"bytes": f.read_bytes(), "path": None} for f in files]}
    ds = Dataset.from_dict(rows, features=Features({"label": Value("string"), "image": HFImage()}))
    import pyarrow.parquet as pq
    # The table `datasets` built, with its feature metadata, snappy-compressed as Hub shards are.
    pq.write_table(ds.data.table, ROOT / "probe_shard.parquet", compression="snappy")


def main():
    rng = np.random.default_rng(1234)
    gen = torch.Generator().manual_seed(1234)
    # torchvision and timm name ResNet weights identically: one fixture family serves both.
    assert set(torchvision.models.resnet50().state_dict()) == set(timm.create_model("resnet50").state_dict())
    assert set(torchvision.models.resnext50_32x4d().state_dict()) == set(
        timm.create_model("resnext50_32x4d").state_dict())
    paths = write_images(rng)
    write_edge_cases(rng)
    write_parquet_shard()

    tv = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    pre = {}
    batch = []
    for p in paths:
        t = tv(Image.open(p).convert("RGB")).half()
        pre[f"torchvision/{p.name}"] = t
        batch.append(t.float())
    x = torch.stack(batch)

    MODELS.mkdir(parents=True, exist_ok=True)
    write_resnet("resnet_basic", BasicBlock, [1, 1, 1, 1], True, x, gen)
    write_resnet("resnet_bottleneck", Bottleneck, [1, 2, 1, 1], False, x, gen)
    write_resnet_cifar(x)
    vit = write_vit(x, gen)
    write_vit_dinov2(x)
    write_vit_deit3(x)
    write_vit_torchvision(x)
    write_vit_transformers(x, paths)
    write_resnet_transformers(x, paths)
    write_vit_dinov2_transformers(x, paths)
    write_vit_registers(x)
    write_vit_dinov2_registers_transformers(x)
    write_vit_clip(x)
    write_resnext_and_resnet_d(x)
    write_convnext(x)
    write_vgg(x)

    # timm's own eval transform from the ViT's pretrained config (bicubic, crop_pct 0.9, mean/std 0.5).
    vit_tf = create_transform(**resolve_data_config({}, model=vit))
    for p in paths[:2]:
        pre[f"timm_vit/{p.name}"] = vit_tf(Image.open(p).convert("RGB")).half()
    # timm's crop_mode squash (its 384 px fine-tunes): both sides to 128 / 0.8, then the crop.
    squash_tf = create_transform(input_size=(3, 128, 128), interpolation="bicubic", crop_pct=0.8, crop_mode="squash",
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for p in paths[:2]:
        pre[f"timm_squash/{p.name}"] = squash_tf(Image.open(p).convert("RGB")).half()
    save_file({k: v.contiguous() for k, v in pre.items()}, ROOT / "preprocess.safetensors")
    import transformers
    path = ROOT / "versions.json"
    versions = json.loads(path.read_text()) if path.exists() else {}
    versions.update({"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "pillow": Image.__version__, "transformers": transformers.__version__})
    path.write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    main()
