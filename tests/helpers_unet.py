"""Shared builders for UNet tests: tiny diffusers configs and a diffusers reference model."""
from __future__ import annotations

import torch


def tiny_unet_config(in_channels: int = 4, **overrides) -> dict:
    """Keyword arguments for diffusers' ``UNet2DConditionModel`` (and for our ``UNetConfig``): a 2-level
    net with one cross-attention level, small enough to run in milliseconds on CPU."""
    cfg = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=2,  # number of heads, as in SD v1.x configs
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    cfg.update(overrides)
    return cfg


def three_level_unet_config(in_channels: int = 4, **overrides) -> dict:
    """3 levels, cross-attention on the top two, per-level head counts, 2 layers per block."""
    cfg = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    return cfg


def diffusers_unet(config: dict, seed: int = 0, noise: float = 0.05):
    """A randomly initialised diffusers UNet in eval mode, with every parameter perturbed so that
    zero-initialised layers (and unit norms) don't make the comparison trivially pass."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model
