"""Tiny random Stable Diffusion models built with diffusers/transformers (the reference
implementations) and saved in the real SD v1.x folder layout, for loader and pipeline tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers_unet import diffusers_unet, tiny_unet_config

TEXT_DIM = 32


def tiny_vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=16)


def tiny_clip_config(vocab_size: int = 49408) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")


def _perturb(model: torch.nn.Module, seed: int, noise: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model.eval()


def reference_models(in_channels: int = 4, seed: int = 0, unet_config: dict | None = None):
    """(unet, vae, text_encoder) from diffusers/transformers with random weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = diffusers_unet(unet_config or tiny_unet_config(in_channels, cross_attention_dim=TEXT_DIM), seed)
    torch.manual_seed(seed + 10)
    vae = _perturb(AutoencoderKL(**tiny_vae_config()), seed + 11)
    torch.manual_seed(seed + 20)
    clip = _perturb(CLIPTextModel(CLIPTextConfig(**tiny_clip_config())), seed + 21, noise=0.02)
    return unet, vae, clip


def add_text_model_prefix(path: Path) -> None:
    """transformers 5.x saves CLIP keys without the `text_model.` prefix that real SD files carry."""
    sd = load_file(str(path))
    save_file({("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}, str(path))


def save_sd_folder(folder: Path, unet, vae, clip, tokenizer_folder: Path | None,
                   scheduler_config: dict | None = None) -> Path:
    """Write diffusers' layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    add_text_model_prefix(folder / "text_encoder" / "model.safetensors")
    if tokenizer_folder is not None:
        shutil.copytree(tokenizer_folder, folder / "tokenizer", dirs_exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config or {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}))
    return folder
