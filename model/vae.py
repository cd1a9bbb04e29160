"""The Stable Diffusion v1.x autoencoder (KL-regularised VAE, 8x spatial downsampling).

Architecture follows LDM's ``AutoencoderKL`` (https://github.com/CompVis/latent-diffusion,
``ldm/modules/diffusionmodules/model.py``) in the module layout of diffusers' ``AutoencoderKL``
(``diffusers/models/autoencoders/{autoencoder_kl,vae}.py``, ``unets/unet_2d_blocks.py``,
``resnet.py``), so a diffusers ``vae/`` state dict loads with ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention

GN_EPS = 1e-6  # every GroupNorm in the SD VAE uses 1e-6, not torch's 1e-5


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels (RGB)
    out_channels: int = 3  # decoded image channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder widths, finest first; one 2x down per step
    layers_per_block: int = 2  # resnets per encoder block (the decoder uses one more)
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    scaling_factor: float = 0.18215  # z is multiplied by this before the UNet sees it (unit variance)

    # diffusers config keys we accept but that change nothing here
    _IGNORED = {"sample_size", "force_upcast"}
    # keys whose only supported value is the SD v1 one
    _REQUIRED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                 "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
                 "latents_std": None}

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Build from a diffusers ``vae/config.json`` dict; raise ValueError on settings we don't implement."""
        names = {f.name for f in fields(cls)}
        kw = {}
        for k, v in d.items():
            if k.startswith("_") or k in cls._IGNORED:
                continue
            if k in cls._REQUIRED:
                if v != cls._REQUIRED[k]:
                    raise ValueError(f"unsupported VAE config: {k}={v!r} (only {cls._REQUIRED[k]!r})")
            elif k in ("down_block_types", "up_block_types"):
                want = "DownEncoderBlock2D" if k == "down_block_types" else "UpDecoderBlock2D"
                if any(t != want for t in v):
                    raise ValueError(f"unsupported VAE config: {k}={v!r} (only {want})")
            elif k in names:
                kw[k] = tuple(v) if k == "block_out_channels" else v
            else:
                raise ValueError(f"unknown VAE config key: {k}={v!r}")
        cfg = cls(**kw)
        for k in ("down_block_types", "up_block_types"):
            if k in d and len(d[k]) != len(cfg.block_out_channels):
                raise ValueError(f"unsupported VAE config: {k}={d[k]!r} (need one per block_out_channels entry)")
        return cfg


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=GN_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=GN_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__(query_dim=c, heads=1, dim_head=c, bias=True)
        self.group_norm = nn.GroupNorm(groups, c, eps=GN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (b, c, h, w) -> (b, h*w, c)
        t = self.group_norm(x).flatten(2).transpose(1, 2)
        t = super().forward(t)
        # (b, h*w, c) -> (b, c, h, w)
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LDM pads right/bottom only, so the stride-2 grid stays aligned with the top-left pixel
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_layers)])
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_layers)])
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=GN_EPS)
        # twice the latent channels: mean and log-variance
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, self.logvar = moments.chunk(2, dim=1)
        # the clamp keeps exp() finite in fp16 and matches diffusers/LDM bit for bit
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # draw on the generator's device (as diffusers' randn_tensor does) so CPU seeds give the same z everywhere
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> posterior over unscaled z (B, 4, H/8, W/8)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled z (divide UNet latents by ``config.scaling_factor`` first) -> image, roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample_posterior else post.mean)
