#!/usr/bin/env python3
"""Writes the model configs `dnd bench` builds its random-weight models from, under
assets/bench/: the published architectures at full size (BLIP-large and -base, SD-Turbo's
SD 2.1 UNet / VAE / OpenCLIP-H text encoder, SD v1.4, TAESD,
CLIP ViT-B/16, ResNet-50's timm config)
and reduced ones of the same families for `dnd bench --quick`. Only configs, written by the
reference libraries' own config classes; no weights (the bench fills them at random), no
tokenizers (the bench writes synthetic ones of the right vocabulary size).

    pip install torch transformers diffusers
    python3 tools/gen_bench_configs.py
"""
import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "assets" / "bench"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def blip(folder, vision, text_hidden, text_layers, image):
    from transformers import BlipConfig, BlipImageProcessor

    cfg = BlipConfig(
        vision_config=dict(image_size=image, patch_size=16, **vision),
        text_config=dict(vocab_size=30524, hidden_size=text_hidden, num_hidden_layers=text_layers,
                         num_attention_heads=max(text_hidden // 64, 1), intermediate_size=4 * text_hidden,
                         encoder_hidden_size=vision["hidden_size"], bos_token_id=30522, sep_token_id=102,
                         pad_token_id=0),
    )
    cfg.save_pretrained(folder)
    BlipImageProcessor(size={"height": image, "width": image}, resample=3, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(folder)


def clip(folder, hidden, layers, image):
    from transformers import CLIPConfig, CLIPImageProcessor

    CLIPConfig(vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=max(hidden // 64, 1), image_size=image, patch_size=16),
               projection_dim=512 if hidden >= 512 else hidden).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image},
                       crop_size={"height": image, "width": image}).save_pretrained(folder)


def sd(folder, unet, vae, text, scheduler):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=1))
    UNet2DConditionModel.from_config(unet).save_config(folder / "unet")
    AutoencoderKL.from_config(vae).save_config(folder / "vae")
    CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))


def taesd(folder, width):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(width,) * 4,
                    decoder_block_out_channels=(width,) * 4).save_config(folder)


def resnet(folder, size):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "resnet50", "num_classes": 1000,
        "pretrained_cfg": {"input_size": [3, size, size], "crop_pct": 0.875, "interpolation": "bilinear",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, indent=1))


SCALED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              steps_offset=1, prediction_type="epsilon")
# SD 2.1 (sd-turbo): linear projections, head dims per block, 1024-wide OpenCLIP-H text encoder.
UNET_21 = dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
               use_linear_projection=True)
# SD 1.x (v1.4): diffusers' defaults are SD 1.x's UNet.
UNET_14 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    full, quick = OUT / "full", OUT / "quick"
    resnet(full / "resnet50", 224)
    resnet(quick / "resnet50", 64)
    blip(full / "blip-large", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, layer_norm_eps=1e-5), 768, 12, 384)
    blip(full / "blip-base", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, layer_norm_eps=1e-5), 768, 12, 384)
    blip(quick / "blip-large", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2), 64, 2, 64)
    blip(quick / "blip-base", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2), 64, 1, 64)
    taesd(full / "taesd", 64)
    taesd(quick / "taesd", 8)
    clip(full / "clip-vit-b16", 768, 12, 224)
    clip(quick / "clip-vit-b16", 64, 2, 64)
    turbo_sched = dict(_class_name="EulerDiscreteScheduler", timestep_spacing="trailing", **SCALED)
    v14_sched = dict(_class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False,
                     **SCALED)
    sd(full / "sd-turbo", UNET_21, VAE,
       dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            hidden_act="gelu", projection_dim=1024), turbo_sched)
    sd(full / "sd-v1-4", UNET_14, VAE,
       dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", projection_dim=768), v14_sched)
    small_unet = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64)
    small_vae = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, sample_size=64,
                     down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    small_text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    sd(quick / "sd-turbo", dict(small_unet, attention_head_dim=[2, 4], use_linear_projection=True), small_vae,
       dict(small_text, hidden_act="gelu"), turbo_sched)
    sd(quick / "sd-v1-4", dict(small_unet, attention_head_dim=8), small_vae,
       dict(small_text, hidden_act="quick_gelu"), v14_sched)


if __name__ == "__main__":
    main()
