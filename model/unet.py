"""The Stable Diffusion v1.x denoising UNet, written out by hand.

Architecture from Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (the LDM UNet with spatial-transformer cross-attention to CLIP text tokens). Module and
parameter names mirror diffusers' ``UNet2DConditionModel`` exactly, so a diffusers ``unet``
state dict loads with ``load_state_dict(sd, strict=True)`` and no key mapping.

Only the SD v1.x variant is implemented (SD v1.4/v1.5 and the 9-channel inpainting UNet);
``UNetConfig.from_dict`` refuses diffusers configs that would need anything else.

The model has no buffers: the sinusoidal timestep embedding is computed on the fly, so the
whole network can be built on the meta device and filled with ``load_state_dict(assign=True)``.

Attention probabilities (self and cross) and ResNet features are exposed to an optional
``control`` passed down ``forward`` (the protocol is in ``model/attention.py``); the older
observe-only ``recorder=`` still works and only reaches the ``attn2`` layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention, AttentionRecorder, UNetControl, as_control, name_layers

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig:
    sample_size: int | tuple[int, int] = 64  # latent side at training resolution (512 px / 8); informational only
    in_channels: int = 4  # 4 latent channels; 9 for the inpainting UNet (latent + mask + masked-image latent)
    out_channels: int = 4  # predicted noise has the latent's shape
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution level
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block; up blocks get one more (for the extra skip)
    # Despite the name, SD v1.x diffusers configs store the NUMBER OF HEADS here (a historical
    # diffusers quirk); the head width is channels // heads (40, 80, 160, 160 for SD v1.x).
    # An int applies to every level; a tuple gives one value per down block (up blocks reversed).
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768  # CLIP ViT-L/14 text hidden size
    norm_num_groups: int = 32  # GroupNorm groups in resnets, transformers and the output norm
    norm_eps: float = 1e-5  # GroupNorm eps in resnets and the output norm (transformer norms use 1e-6)
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin], the LDM ordering
    freq_shift: int = 0  # frequencies are exp(-ln(10000) * i / (half - freq_shift))

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        for name in ("attention_head_dim", "layers_per_block", "sample_size"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(f"need one down and one up block per entry of block_out_channels ({n}), got "
                             f"{len(self.down_block_types)} down / {len(self.up_block_types)} up")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported UNet config: down_block_types contains {t!r}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unsupported UNet config: up_block_types contains {t!r}")
        for name in ("attention_head_dim", "layers_per_block"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"unsupported UNet config: {name}={v!r} (need {n} entries)")

    def heads(self) -> tuple[int, ...]:
        h = self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.block_out_channels)

    def layers(self) -> tuple[int, ...]:
        n = self.layers_per_block
        return n if isinstance(n, tuple) else (n,) * len(self.block_out_channels)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Read a diffusers ``unet/config.json`` dict; raise ValueError on anything SD v1.x doesn't use."""
        ours = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key == "_class_name" and value != "UNet2DConditionModel":
                raise ValueError(f"unsupported UNet config: _class_name={value!r}")
            if key.startswith("_") or key in _INERT:
                continue
            if key in ours:
                if key == "cross_attention_dim" and not isinstance(value, int):
                    raise ValueError(f"unsupported UNet config: cross_attention_dim={value!r} (need one int)")
                if key == "norm_num_groups" and not isinstance(value, int):
                    raise ValueError(f"unsupported UNet config: norm_num_groups={value!r} (need an int)")
                if key == "attention_head_dim" and value is None:
                    raise ValueError("unsupported UNet config: attention_head_dim=None")
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _DEFAULTS:
                if not _is_default(key, value):
                    raise ValueError(f"unsupported UNet config: {key}={value!r}")
            else:
                raise ValueError(f"unknown UNet config key: {key}={value!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Diffusers ``UNet2DConditionModel`` keyword arguments for the same network."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# diffusers config keys we don't store, with the one value that gives SD v1.x behaviour
_DEFAULTS = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "dual_cross_attention": False, "use_linear_projection": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
# keys whose value cannot change inference here: dropout is off in eval, and the head count of the
# (refused) text addition embedding is unused
_INERT = {"dropout", "addition_embed_type_num_heads"}


def _is_default(key: str, value) -> bool:
    default = _DEFAULTS[key]
    if value == default:
        return True
    if key == "mid_block_only_cross_attention":
        return value is False  # None means "same as only_cross_attention", which must be False
    # per-block lists that repeat the default, e.g. only_cross_attention: [false, false, false, false]
    return default is not None and isinstance(value, (list, tuple)) and len(value) > 0 \
        and all(v == default for v in value)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) fp32, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.name = ""  # dotted module path (set by the UNet), for controls

    def forward(self, x, temb, control: UNetControl | None = None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if control is not None and control.wants(self.name, tuple(h.shape[-2:])):
            h = control.features(self.name, h)  # the residual branch, before the skip is added
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' dropout slot; kept so the last linear is still named net.2
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        dim_head = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, control, hw):
        x = x + self.attn1(self.norm1(x), control=control, hw=hw)
        x = x + self.attn2(self.norm2(x), context, control=control, hw=hw)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The LDM "spatial transformer": pixels become tokens that attend to each other and to the text."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, control=None):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (b, c, h, w) -> (b, h*w, c)
        for block in self.transformer_blocks:
            y = block(y, context, control, (h, w))
        y = y.transpose(1, 2).unflatten(2, (h, w))  # (b, h*w, c) -> (b, c, h, w)
        return self.proj_out(y) + x


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # interpolating to the skip's size (rather than a fixed 2x) is what keeps odd latent sizes
        # aligned with their skips; for even sizes the two are the same nearest-neighbour grid
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (``cross_attn``) or DownBlock2D."""

    def __init__(self, in_ch, out_ch, temb_dim, n_layers, heads, context_dim, groups, eps, cross_attn, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim, groups, eps)
                                      for i in range(n_layers)])
        self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, context_dim, groups)
                                         for _ in range(n_layers)]) if cross_attn else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x, temb, context, control):
        skips = []
        attentions = self.attentions or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(x, temb, control)
            if attn is not None:
                x = attn(x, context, control)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (``cross_attn``) or UpBlock2D; consumes one skip per resnet."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_dim, n_layers, heads, context_dim, groups, eps,
                 cross_attn, upsample):
        super().__init__()
        # resnet i sees [running features, skip]: the last skip comes from the level below
        # (in_ch channels), the others from this level (out_ch)
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n_layers - 1 else out_ch),
                          out_ch, temb_dim, groups, eps)
            for i in range(n_layers)])
        self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, context_dim, groups)
                                         for _ in range(n_layers)]) if cross_attn else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips, temb, context, control, upsample_size):
        attentions = self.attentions or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb, control)
            if attn is not None:
                x = attn(x, context, control)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch, temb_dim, heads, context_dim, groups, eps):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, context_dim, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_dim, groups, eps) for _ in range(2)])

    def forward(self, x, temb, context, control):
        x = self.resnets[0](x, temb, control)
        x = self.attentions[0](x, context, control)
        return self.resnets[1](x, temb, control)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch = cfg.block_out_channels
        heads, layers = cfg.heads(), cfg.layers()
        temb_dim = ch[0] * 4
        common = dict(temb_dim=temb_dim, context_dim=cfg.cross_attention_dim,
                      groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        n = len(ch)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)

        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], n_layers=layers[i], heads=heads[i],
                      cross_attn=t == "CrossAttnDownBlock2D", downsample=i < n - 1, **common)
            for i, t in enumerate(cfg.down_block_types)])
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], heads=heads[-1], **common)
        rch, rheads, rlayers = ch[::-1], heads[::-1], layers[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], n_layers=rlayers[i] + 1, heads=rheads[i],
                    cross_attn=t == "CrossAttnUpBlock2D", upsample=i < n - 1, **common)
            for i, t in enumerate(cfg.up_block_types)])

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        name_layers(self, Attention, ResnetBlock2D)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, control: UNetControl | None = None,
                recorder: AttentionRecorder | None = None) -> torch.Tensor:
        """sample (B, in_channels, H, W), encoder_hidden_states (B, tokens, cross_attention_dim) -> (B, out, H, W).

        ``control`` observes or replaces attention probabilities and ResNet features (see
        ``model/attention.py``); ``recorder`` is the older observe-only cross-attention protocol."""
        cfg = self.config
        control = as_control(control, recorder)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(sample.dtype))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, control)
            skips += s
        x = self.mid_block(x, temb, context, control)
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            level_skips, skips = skips[-n_skips:], skips[:-n_skips]
            # the next level's skip fixes the upsampled size (matters for odd sizes)
            size = skips[-1].shape[-2:] if skips else None
            x = block(x, level_skips, temb, context, control, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
