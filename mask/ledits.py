"""LEDITS++'s implicit masks (Brack et al., CVPR 2024), recomputed at every denoising step and per edit
concept c:

* M1 (attention mask): the concept's cross-attention map, summed over its prompt tokens, smoothed
  (3x3 Gaussian), and kept where it reaches its lambda-quantile (lambda 0.9: the top 10% of pixels).
* M2 (noise mask): |guidance direction| summed over latent channels, kept where it reaches its
  lambda-quantile.
* The concept's guidance is applied inside M1 * M2 (the intersection, the default), M1 alone, or M2 alone.

The maps come from ``ConceptAttention``, a recorder object passed to ``unet(..., recorder=)`` (see
``model/attention.py``): it keeps this step's cross-attention of the concept rows of the batch
``[uncond, concept 1, ..., concept C]``, at one query grid (latent / 4: SD's 16x16 layers), outside the
mid block, as diffusers' LEditsPPPipelineStableDiffusion does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .instant import gaussian_blur

# diffusers' LEDITS++ smoothing kernel is written with sigma 0.5 but computes exp(-((x - m) / (2 sigma))^2),
# i.e. a Gaussian of standard deviation sqrt(2) * 0.5
SMOOTHING_SIGMA = 2**-0.5


class ConceptAttention:
    """Recorder: mean over layers and heads of one step's cross-attention of each concept row.

    Layers at the ``grid`` query resolution are kept, the mid block excluded. ``take()`` hands out
    (C, h, w, tokens) and starts the next step empty.
    """

    def __init__(self, grid: tuple[int, int], concepts: int):
        self.grid, self.concepts = tuple(grid), concepts
        self._sum: torch.Tensor | None = None  # (C, query pixels, tokens): sum over layers and heads
        self._heads = 0                        # layer-heads summed so far in this step

    def wants(self, name: str, hw: tuple[int, int]) -> bool:
        return tuple(hw) == self.grid and not name.startswith("mid_block")

    def record(self, name: str, probs: torch.Tensor) -> None:
        b, heads, q, _ = probs.shape
        if b != 1 + self.concepts:
            raise ValueError(f"layer {name!r}: batch {b}, expected 1 + {self.concepts} concepts")
        s = probs[1:].float().sum(1)  # the unconditional row 0 is not a concept
        self._sum = s if self._sum is None else self._sum + s
        self._heads += heads  # every (layer, head) pair weighs the same, as in diffusers' average

    def take(self) -> torch.Tensor:
        if self._sum is None:
            raise RuntimeError(f"no cross-attention layer at the {self.grid} grid was recorded")
        out = (self._sum / self._heads).unflatten(1, self.grid)
        self._sum, self._heads = None, 0
        return out


def _quantile_mask(x: torch.Tensor, q: float) -> torch.Tensor:
    """1 where x reaches its q-quantile over the last two dims (torch.quantile's linear interpolation)."""
    thr = torch.quantile(x.flatten(-2).float(), q, dim=-1).to(x.dtype)
    return (x >= thr[..., None, None]).to(x.dtype)


def attention_mask(maps: torch.Tensor, tokens: int, threshold: float, size: tuple[int, int]) -> torch.Tensor:
    """M1 of one concept: maps (h', w', tokens) -> (H, W) {0, 1} at the latent ``size``.

    The map is the sum over sequence positions 1 .. tokens (position 0 is the start token)."""
    a = maps[..., 1:1 + tokens].sum(-1)
    a = gaussian_blur(a, 3, SMOOTHING_SIGMA)  # reflect-101 border, as diffusers pads
    m = _quantile_mask(a, threshold)
    return F.interpolate(m[None, None], size=size, mode="nearest")[0, 0]


def noise_mask(direction: torch.Tensor, threshold: float) -> torch.Tensor:
    """M2 of one concept: direction (C, H, W) guidance -> (H, W) {0, 1}."""
    return _quantile_mask(direction.abs().sum(0), threshold)
