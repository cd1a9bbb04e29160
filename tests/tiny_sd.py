"""Tiny random Stable Diffusion models built with diffusers/transformers (the reference
implementations) and saved in the real SD v1.x folder layout, for loader and pipeline tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers_unet import diffusers_unet, tiny_unet_config

TEXT_DIM = 32
# Key lists (with shapes) of the real SD v1.4 checkpoints: the CompVis single file and the diffusers
# unet / vae / text_encoder folders. Facts about the checkpoint format, committed with the tests.
KEYS = Path(__file__).resolve().parent / "data" / "sd-v1-keys"


def reference_keys(name: str) -> set[str]:
    return {line.split()[0] for line in (KEYS / name).read_text().splitlines() if line.strip()}


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


def _inputs(unet_ref, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    c = unet_ref.config
    x = torch.randn(2, c.in_channels, size, size, generator=g)
    ctx = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


def assert_same_networks(ours, refs, atol=1e-5, latent=8, image=16):
    unet_ref, vae_ref, clip_ref = refs
    with torch.no_grad():
        if ours.unet is not None:
            x, t, ctx = _inputs(unet_ref, size=latent)
            assert (ours.unet(x, t, ctx) - unet_ref(x, t, ctx).sample).abs().max() <= atol
        if ours.vae is not None:
            img = torch.rand(1, 3, image, image, generator=torch.Generator().manual_seed(1)) * 2 - 1
            post, ref_post = ours.vae.encode(img), vae_ref.encode(img).latent_dist
            assert (post.mean - ref_post.mean).abs().max() <= atol
            assert (post.logvar - ref_post.logvar).abs().max() <= atol
            z = post.mean
            assert (ours.vae.decode(z) - vae_ref.decode(z).sample).abs().max() <= atol
        if ours.text_encoder is not None:
            ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(2))
            ids[:, 0], ids[:, 9:] = 49406, 49407
            ref = clip_ref(ids).last_hidden_state
            assert (ours.text_encoder(ids) - ref).abs().max() <= atol


def sd_structured_references(in_channels=4, width=(32, 32, 64, 64), vae_width=(16, 16, 32, 32),
                             text_dim=32, heads=2, seed=0):
    """Reference models with SD v1.4's block structure (so the same checkpoint key NAMES) but any widths."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = diffusers_unet(dict(in_channels=in_channels, block_out_channels=width, attention_head_dim=heads,
                               cross_attention_dim=text_dim, norm_num_groups=8, sample_size=8), seed)
    torch.manual_seed(seed + 1)
    vae = _perturb(AutoencoderKL(block_out_channels=vae_width, layers_per_block=2, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4), seed + 2)
    torch.manual_seed(seed + 3)
    clip = _perturb(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=text_dim, intermediate_size=64,
                                                 num_hidden_layers=12, num_attention_heads=4)), seed + 4, 0.02)
    return unet, vae, clip


def write_single_file(path: Path, unet, vae, clip, extra: dict | None = None) -> Path:
    """Write the models in the CompVis layout, with key names from the real v1.4 key list."""
    from weights import compvis
    parts = compvis.split_single_file(sorted(reference_keys("single_file_ldm.txt")))
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": clip.state_dict()}
    out = {}
    for comp, mapping in parts.items():
        for new, old in mapping.items():
            if new not in states[comp]:
                continue  # position_ids: a buffer in some transformers versions only
            v = states[comp][new]
            if comp == "vae" and ".attentions.0.to_" in new and new.endswith("weight"):
                v = v[:, :, None, None]  # CompVis stores the VAE attention as 1x1 convolutions
            out[old] = v.contiguous()
    out.update(extra or {})
    save_file(out, str(path))
    return path
