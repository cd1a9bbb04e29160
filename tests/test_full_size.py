"""SD v1.4 at its real size (859.5M-parameter UNet, random weights, 64x64 latent): strict loads of the
diffusers layout and of the CompVis single file, and UNet parity with diffusers. About a minute or
two on 2 CPU cores and ~12 GB of RAM; marked slow, still run in CI."""
from __future__ import annotations

import gc

import pytest
import torch

from tests.tiny_sd import assert_same_networks, write_single_file
from weights import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd14_references():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()  # SD v1.4's config
    with torch.no_grad():  # zero-initialised output convs would make the parity check trivial
        for p in (unet.conv_out.weight, *[m.proj_out.weight for m in unet.modules() if hasattr(m, "proj_out")]):
            p.normal_(0, 0.02)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12)).eval()  # ViT-L/14 text tower: SD v1.x's
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    return unet, vae, clip


def test_full_size_diffusers_layout(tmp_path, sd14_references):
    unet, _, _ = sd14_references
    unet.save_pretrained(tmp_path / "sd14" / "unet")
    ours = load(tmp_path / "sd14", components=("unet",))
    assert sum(p.numel() for p in ours.unet.parameters()) == 859_520_964
    assert_same_networks(ours, (unet, None, None), atol=1e-4, latent=64)


def test_full_size_single_file(tmp_path, sd14_references):
    gc.collect()
    f = write_single_file(tmp_path / "sd-v1-4.safetensors", *sd14_references)
    ours = load(f, components=("unet", "vae", "text_encoder"))
    assert_same_networks(ours, sd14_references, atol=1e-4, latent=64, image=64)
