#!/usr/bin/env python3
"""Writes the random-weight fixtures of the describe pipeline under tests/fixtures/:
attention crops (OpenCV), a tiny BLIP captioner and a tiny CLIP (transformers), a tiny Stable
Diffusion in diffusers' folder layout (diffusers + transformers), and what each reference library
computes on them. Fixed seeds: a rerun reproduces the files.

    pip install torch transformers diffusers opencv-python-headless pillow safetensors numpy
    python3 tools/gen_pipeline_fixtures.py
"""
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODELS = ROOT / "models"
IMAGES = sorted((ROOT / "images").iterdir())


def save(path, tensors):
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}, path)


def scramble(model, gen, std=0.2):
    """transformers/diffusers initialise with tiny weights that make every logit alike; wider
    random weights keep greedy decoding far from ties so token-exact parity is meaningful."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# attention crops: the reference's OpenCV calls on min-max scaled, PIL-resized neuron maps
# ---------------------------------------------------------------------------------------------
def iou(a, b):
    area = lambda r: abs(r[2] - r[0]) * abs(r[3] - r[1])
    ox = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    oy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ox * oy
    return inter / (area(a) + area(b) - inter)


def write_crops(rng):
    cases, tensors = [], {}
    specs = [(7, 7, 333, 250), (14, 14, 240, 417), (7, 7, 100, 80), (4, 4, 64, 64), (7, 7, 375, 375),
             (14, 14, 500, 375)]
    for i, (mh, mw, w, h) in enumerate(specs):
        y, x = np.mgrid[0:mh, 0:mw].astype(np.float32)
        m = rng.normal(0, 0.2, (mh, mw)).astype(np.float32)
        for _ in range(rng.integers(1, 5)):
            cy, cx, s = rng.uniform(0, mh), rng.uniform(0, mw), rng.uniform(0.5, 2.0)
            m += rng.uniform(1, 4) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
        u8 = np.round((m - m.min()) / (m.max() - m.min()) * 255).astype(np.uint8)
        heat = np.array(Image.fromarray(u8).resize((w, h), Image.BICUBIC))
        t, binary = cv2.threshold(heat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        for c in contours:
            bx, by, bw, bh = cv2.boundingRect(c)
            boxes.append([bx, by, bx + bw, by + bh])
        # stable sort, largest first (the reference's cmp_to_key sort)
        ordered = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        kept = []
        for b in ordered:
            if len(kept) == 4:
                break
            if all(iou(b, k) <= 0.5 for k in kept) and iou(b, [0, 0, w, h]) < 0.8:
                kept.append(b)
        tensors[f"map{i}"] = torch.from_numpy(m)
        tensors[f"heat{i}"] = torch.from_numpy(heat)
        cases.append({"width": w, "height": h, "threshold": int(t), "boxes": boxes, "kept": kept})
    save(ROOT / "crops.safetensors", tensors)
    (ROOT / "crops.json").write_text(json.dumps(cases, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# BLIP captioner
# ---------------------------------------------------------------------------------------------
WORDS = ("a an the of on in with and at is are photo picture image close up view man woman dog cat "
         "red blue green white black striped wooden metal water sky grass tree car street building "
         "shirt table sitting standing large small two there some").split()


def write_blip(gen):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    folder = MODELS / "blip_tiny"
    shutil.rmtree(folder, ignore_errors=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ed", "##ing", "[DEC]"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizer(str(Path(tmp) / "vocab.txt"), bos_token="[DEC]", model_max_length=512)
    dec = vocab.index("[DEC]")
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=48, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=dec, sep_token_id=3, pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=96, patch_size=16, projection_dim=16),
        projection_dim=16, image_text_hidden_size=32)
    model = BlipForConditionalGeneration(cfg).eval()
    scramble(model, gen, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    proc = BlipImageProcessorPil(size={"height": 96, "width": 96}, resample=3, image_mean=OPENAI_CLIP_MEAN,
                                 image_std=OPENAI_CLIP_STD)
    proc.save_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in IMAGES]
    pixels = proc(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, max_new_tokens=32, min_length=5)
        one = [model.generate(pixel_values=pixels[i:i + 1], max_new_tokens=32, min_length=5)[0]
               for i in range(len(images))]
        # the smallest gap between the best and second-best logit along the greedy path
        gap = min_greedy_gap(model, pixels, ids)
    captions = tok.batch_decode(ids, skip_special_tokens=True)
    save(MODELS / "blip_tiny.reference.safetensors", {"pixel_values": pixels, "ids": ids})
    (MODELS / "blip_tiny.reference.json").write_text(json.dumps({
        "images": [p.name for p in IMAGES], "captions": captions,
        "ids_one_by_one": [t.tolist() for t in one], "min_logit_gap": gap}, indent=1) + "\n")


def min_greedy_gap(model, pixels, ids):
    vision = model.vision_model(pixel_values=pixels).last_hidden_state
    logits = model.text_decoder(input_ids=ids[:, :-1], encoder_hidden_states=vision).logits
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


# ---------------------------------------------------------------------------------------------
# CLIP image embeddings (the scoring weights)
# ---------------------------------------------------------------------------------------------
def write_clip(gen):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = MODELS / "clip_tiny"
    shutil.rmtree(folder, ignore_errors=True)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    scramble(model, gen, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    proc.save_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in IMAGES]
    pixels = proc(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels)
        emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
    save(MODELS / "clip_tiny.reference.safetensors", {"pixel_values": pixels, "image_embeds": emb})


def write_clip_vision():
    """clip_tiny's image tower alone, as CLIPVisionModelWithProjection saves it (its config is the
    vision config, no text tower); the reference is its own output on clip_tiny's pixels."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    folder = MODELS / "clip_vision_tiny"
    shutil.rmtree(folder, ignore_errors=True)
    full = CLIPModel.from_pretrained(MODELS / "clip_tiny").eval()
    cfg = full.config.vision_config
    cfg.projection_dim = full.config.projection_dim
    with torch.random.fork_rng():  # the other writers' initialisations stay as they were
        model = CLIPVisionModelWithProjection(cfg).eval()
    missing = model.load_state_dict(full.state_dict(), strict=False).missing_keys
    assert not missing, missing
    model.save_pretrained(folder, safe_serialization=True)
    pixels = load_file(MODELS / "clip_tiny.reference.safetensors")["pixel_values"]
    with torch.no_grad():
        emb = model(pixel_values=pixels).image_embeds
    save(MODELS / "clip_vision_tiny.reference.safetensors", {"image_embeds": emb})


# ---------------------------------------------------------------------------------------------
# Stable Diffusion, diffusers layout (SD 2.x flavour, as sd-turbo: linear projections, GELU text
# encoder, "!" padding, Euler with trailing timesteps)
# ---------------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_bpe_files(tmp):
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in ["one", "realistic", "image", "of", "red", "striped", "dog", "textiles", "scenes"]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


PROMPTS = ["One realistic image of red striped dog", "One realistic image of multicolored textiles", ""]


def sd_tokenizer(tmp):
    from transformers import CLIPTokenizer
    n_vocab = clip_bpe_files(tmp)
    return n_vocab, CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token="!",
                                  model_max_length=77)


def write_sd_tokenizer_json():
    """sd_tiny's tokenizer as transformers 5 saves it in a pipeline: tokenizer.json and its config, no
    vocab.json or merges.txt (the Hub's SD repos have those; a pipeline saved today does not)."""
    folder = MODELS / "sd_tokenizer_json"
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        _, tok = sd_tokenizer(tmp)
        tok.save_pretrained(folder)
    assert not (folder / "vocab.json").exists(), "transformers wrote vocab.json: the fixture tests nothing"


def write_sd(gen):
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = MODELS / "sd_tiny"
    shutil.rmtree(folder, ignore_errors=True)
    tmp = tempfile.mkdtemp()
    n_vocab, tok = sd_tokenizer(tmp)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=32, bos_token_id=n_vocab - 2,
                                        eos_token_id=n_vocab - 1, pad_token_id=1)).eval()
    scramble(text, gen, 0.1)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True).eval()
    scramble(unet, gen, 0.05)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32).eval()
    scramble(vae, gen, 0.05)
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="trailing",
                                   steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=euler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Hub SD repos ship vocab.json + merges.txt, not tokenizer.json: load the way a real repo does.
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(tmp) / name, folder / "tokenizer" / name)

    ref = {}
    g = torch.Generator().manual_seed(7)
    init = torch.randn((2, 4, 16, 16), generator=g)
    ref["init_latents"] = init
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ref["token_ids"] = ids.to(torch.int64)
        ref["text_hidden"] = text(ids)[0]
        t = torch.tensor(500)
        ref["unet_noise"] = unet(init, t, encoder_hidden_states=ref["text_hidden"][:2]).sample
        ref["vae_decoded"] = vae.decode(init / vae.config.scaling_factor).sample
        runs = {
            "euler_1": (euler, 1, 0.0),
            "euler_4": (euler, 4, 0.0),
            "dpmpp_4": (DPMSolverMultistepScheduler.from_config(euler.config), 4, 7.5),
            "dpmpp_6_leading": (DPMSolverMultistepScheduler.from_config(euler.config, timestep_spacing="leading"),
                                6, 7.5),
            "ddim_4": (DDIMScheduler.from_config(euler.config), 4, 7.5),
            "ddim_4_linspace": (DDIMScheduler.from_config(euler.config, timestep_spacing="linspace"), 4, 2.0),
            # v-prediction (SD 2.x at 768 px: DDIM or Euler in its folder)
            "euler_4_v": (EulerDiscreteScheduler.from_config(euler.config, prediction_type="v_prediction"), 4, 7.5),
            "ddim_4_v": (DDIMScheduler.from_config(euler.config, prediction_type="v_prediction"), 4, 7.5),
            "dpmpp_4_v": (DPMSolverMultistepScheduler.from_config(euler.config, prediction_type="v_prediction"), 4,
                          7.5),
            # SD 1.x's and 2.x-base's folders: PLMS (skip_prk_steps), which calls the UNet steps + 1 times
            "pndm_1": (PNDMScheduler.from_config(euler.config, skip_prk_steps=True), 1, 0.0),
            "pndm_4": (PNDMScheduler.from_config(euler.config, skip_prk_steps=True), 4, 7.5),
            "pndm_6_leading_v": (PNDMScheduler.from_config(euler.config, skip_prk_steps=True, timestep_spacing="leading",
                                                           prediction_type="v_prediction"), 6, 7.5),
        }
        ref.update(scheduler_runs(pipe, init, runs))
    save(MODELS / "sd_tiny.reference.safetensors", ref)
    (MODELS / "sd_tiny.reference.json").write_text(json.dumps({"prompts": PROMPTS}, indent=1) + "\n")


def scheduler_runs(pipe, init, runs):
    """Final latents and timesteps of `pipe` from the latents `init` with each run's scheduler,
    steps and guidance (`runs`: key -> (scheduler, steps, guidance))."""
    ref = {}
    with torch.no_grad():
        for key, (sched, steps, guidance) in runs.items():
            pipe.scheduler = sched
            out = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=guidance, latents=init.clone(),
                       height=32, width=32, output_type="latent").images
            ref[f"{key}_latents"] = out
            sched.set_timesteps(steps)
            ref[f"{key}_timesteps"] = sched.timesteps.to(torch.float32)
    return ref


def write_sd_schedulers():
    """Runs of schedulers beyond write_sd's from sd_tiny's folder and initial latents: final
    latents and timesteps. PNDM as PNDMScheduler() defaults it (skip_prk_steps false: twelve
    Runge-Kutta calls of the UNet before the linear multistep ones), UniPC (bh2 and bh1,
    each spacing, v-prediction, one step), a final sigma_min (UniPC, DPM-Solver++, Euler) and LMS
    (needs scipy).
    Written alone."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UniPCMultistepScheduler)
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "sd_tiny", safety_checker=None,
                                                   requires_safety_checker=False)
    init = load_file(MODELS / "sd_tiny.reference.safetensors")["init_latents"]
    cfg = pipe.scheduler.config
    runs = {
        "prk_4": (PNDMScheduler.from_config(cfg, skip_prk_steps=False), 4, 7.5),
        "prk_6_leading_v": (PNDMScheduler.from_config(cfg, skip_prk_steps=False, timestep_spacing="leading",
                                                      prediction_type="v_prediction"), 6, 7.5),
        "unipc_4": (UniPCMultistepScheduler.from_config(cfg), 4, 7.5),
        "unipc_1": (UniPCMultistepScheduler.from_config(cfg), 1, 0.0),
        "unipc_6_leading_v": (UniPCMultistepScheduler.from_config(cfg, timestep_spacing="leading",
                                                                  prediction_type="v_prediction"), 6, 7.5),
        # bh1 to a final sigma of zero multiplies infinity by zero in diffusers (NaN latents):
        # sigma_min keeps it finite.
        "unipc_5_bh1_linspace_sigma_min": (UniPCMultistepScheduler.from_config(
            cfg, solver_type="bh1", timestep_spacing="linspace", final_sigmas_type="sigma_min"), 5, 7.5),
        # 16 steps with a final sigma_min: DPM-Solver++'s last step stays second order.
        "dpmpp_16_sigma_min": (DPMSolverMultistepScheduler.from_config(cfg, final_sigmas_type="sigma_min"), 16, 7.5),
        "euler_4_sigma_min": (EulerDiscreteScheduler.from_config(cfg, final_sigmas_type="sigma_min"), 4, 0.0),
        "lms_5": (LMSDiscreteScheduler.from_config(cfg), 5, 7.5),
        "lms_6_leading_v": (LMSDiscreteScheduler.from_config(cfg, timestep_spacing="leading",
                                                             prediction_type="v_prediction"), 6, 7.5),
        "lms_3_linspace": (LMSDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"), 3, 0.0),
    }
    save(MODELS / "sd_schedulers.reference.safetensors", scheduler_runs(pipe, init, runs))


def write_taesd():
    """A tiny AutoencoderTiny (TAESD's architecture, 8 channels instead of 64) and its decode
    of stored latents. Its own seed, so it is written alone without touching the others."""
    from diffusers import AutoencoderTiny

    gen = torch.Generator().manual_seed(5)
    folder = MODELS / "taesd_tiny"
    shutil.rmtree(folder, ignore_errors=True)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)).eval()
    scramble(vae, gen, 0.1)
    vae.save_pretrained(folder, safe_serialization=True)
    latents = torch.randn((2, 4, 8, 8), generator=gen) * 2.0
    with torch.no_grad():
        decoded = vae.decode(latents).sample
    # what a diffusers pipeline makes of it: [-1, 1] to [0, 1]
    images = (decoded / 2 + 0.5).clamp(0, 1)
    save(MODELS / "taesd_tiny.reference.safetensors", {"latents": latents, "decoded": decoded, "images": images})


def write_vae_widths():
    """An AutoencoderKL whose widths change between blocks (8, 16, 32) as SD's do (128 ... 512),
    so the decoder's 1x1 shortcut convolutions and its up-block sizes are exercised; the
    sd_tiny VAE has one width throughout. Its own seed, written alone."""
    from diffusers import AutoencoderKL

    gen = torch.Generator().manual_seed(6)
    folder = MODELS / "vae_widths"
    shutil.rmtree(folder, ignore_errors=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 32),
                        layers_per_block=2, latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    scramble(vae, gen, 0.1)
    vae.save_pretrained(folder, safe_serialization=True)
    latents = torch.randn((2, 4, 8, 8), generator=gen)
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    images = (decoded / 2 + 0.5).clamp(0, 1)
    save(MODELS / "vae_widths.reference.safetensors", {"latents": latents, "images": images})


def write_unet_conv():
    """A UNet shaped like SD 1.x where sd_tiny's is like SD 2.x: 1x1 convolution projections
    around the transformers, head counts in the legacy `attention_head_dim` number, widths that
    change between levels, 4 groups, two layers per block, upcast attention; and its noise
    prediction at an even (8x8) and an odd (10x10) latent size, the latter taking diffusers'
    upsample-to-skip-size path. Its own seed, written alone."""
    from diffusers import UNet2DConditionModel

    gen = torch.Generator().manual_seed(8)
    folder = MODELS / "unet_conv"
    shutil.rmtree(folder, ignore_errors=True)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
                                layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=24, attention_head_dim=2, norm_num_groups=4,
                                use_linear_projection=False, upcast_attention=True).eval()
    save_unet(unet, gen, folder, 24)


def save_unet(unet, gen, folder, context):
    """A UNet scrambled and saved to `folder`, with its noise predictions for 8x8 and 10x10
    latents of batch 2 at t = 321 (context `context` wide) beside it."""
    scramble(unet, gen, 0.05)
    unet.save_pretrained(folder, safe_serialization=True)
    ref = {"context": torch.randn((2, 7, context), generator=gen)}
    with torch.no_grad():
        for side in (8, 10):
            x = torch.randn((2, 4, side, side), generator=gen)
            ref[f"latents_{side}"] = x
            ref[f"noise_{side}"] = unet(x, torch.tensor(321), encoder_hidden_states=ref["context"]).sample
    save(MODELS / f"{folder.name}.reference.safetensors", ref)


def write_unet_dummy():
    """The UNet of diffusers' own Stable Diffusion tests (`get_dummy_components`): a level
    without attention first, widths 4 and 8 in 2 groups, and the default 8 heads, one
    channel wide; and its noise prediction at an even and an odd latent size. Its own seed,
    written alone."""
    from diffusers import UNet2DConditionModel

    gen = torch.Generator().manual_seed(9)
    folder = MODELS / "unet_dummy"
    shutil.rmtree(folder, ignore_errors=True)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2).eval()
    save_unet(unet, gen, folder, 32)


def write_scheduler_dpmpp():
    """sd_tiny's scheduler swapped for DPM-Solver++ (the `dpmpp_4` run) and saved by diffusers:
    its defaults include `"lambda_min_clipped": -Infinity`, Python's JSON for -inf."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_pretrained(MODELS / "sd_tiny", subfolder="scheduler")
    folder = MODELS / "scheduler_dpmpp"
    shutil.rmtree(folder, ignore_errors=True)
    DPMSolverMultistepScheduler.from_config(euler.config).save_config(folder)
    assert "-Infinity" in (folder / "scheduler_config.json").read_text()


def write_blip_processor():
    """blip_tiny's processor saved whole by transformers 5 (`BlipProcessor.save_pretrained`),
    which writes processor_config.json, its image processor's settings under
    `image_processor`, and no preprocessor_config.json: bilinear and ImageNet's mean/std here,
    unlike blip_tiny's own file, with the pixels it makes (its PIL processor's) and those of the
    processor transformers 5 loads from the folder. Only processor_config.json is kept (the
    tokenizer is blip_tiny's)."""
    from transformers import AutoImageProcessor, BertTokenizer, BlipImageProcessorPil, BlipProcessor

    folder = MODELS / "blip_processor"
    shutil.rmtree(folder, ignore_errors=True)
    tok = BertTokenizer.from_pretrained(MODELS / "blip_tiny")
    image = BlipImageProcessorPil(size={"height": 96, "width": 96}, resample=2, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    BlipProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    for f in folder.iterdir():
        if f.name != "processor_config.json":
            f.unlink()
    images = [Image.open(p).convert("RGB") for p in IMAGES]
    pixels = image(images=images, return_tensors="pt").pixel_values
    # The folder as transformers 5 loads it back: its default (torchvision) image processor,
    # which resizes horizontally first where Pillow 13 goes vertically first.
    loaded = AutoImageProcessor.from_pretrained(folder)
    assert type(loaded).__name__ == "BlipImageProcessor", type(loaded)
    loaded_pixels = loaded(images=images, return_tensors="pt").pixel_values
    # f16 keeps the file small; the test's bound is far above its rounding.
    save_file({"pixel_values": pixels.half().contiguous(), "pixel_values_loaded": loaded_pixels.half().contiguous()},
              MODELS / "blip_processor.reference.safetensors")


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    write_crops(rng)
    write_blip(gen)
    write_clip(gen)
    write_sd(gen)
    write_sd_tokenizer_json()
    write_sd_schedulers()
    write_taesd()
    write_vae_widths()
    write_unet_conv()
    write_unet_dummy()
    write_scheduler_dpmpp()
    write_blip_processor()
    write_clip_vision()
    import diffusers
    import transformers
    versions = json.loads((ROOT / "versions.json").read_text())
    versions.update({"transformers": transformers.__version__, "diffusers": diffusers.__version__,
                     "opencv": cv2.__version__})
    (ROOT / "versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
