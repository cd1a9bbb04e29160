"""DiffEdit's mask (Couairon et al. 2022, arXiv 2210.11427), the baseline of InstDiffEdit's Table 1.

The source image is noised (strength 0.5) with several noise samples; the UNet predicts the noise
once conditioned on the source text and once on the edit text; where the two predictions differ,
the edit must change the image. Thresholding follows diffusers' ``generate_mask``: the map is
clamped at ``ratio`` times its mean, rescaled to [0, 1] and binarised at 0.5. The InstDiffEdit
authors also blurred the map (5x5) before thresholding: ``blur_kernel=5`` does that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .filters import gaussian_blur


@dataclass
class DiffEditMask:
    soft: torch.Tensor  # (H, W) clamped, rescaled difference map in [0, 1]
    mask: torch.Tensor  # (H, W) bool


def diffedit_mask(pred_source: torch.Tensor, pred_edit: torch.Tensor, ratio: float = 3.0,
                  blur_kernel: int | None = None) -> DiffEditMask:
    """pred_*: (samples, C, H, W) guided noise predictions under the source and the edit text."""
    diff = (pred_edit.float() - pred_source.float()).abs().mean(dim=(0, 1))  # mean over samples, channels
    if blur_kernel:
        diff = gaussian_blur(diff, blur_kernel)
    clamp = (diff.mean() * ratio).clamp_min(torch.finfo(diff.dtype).tiny)  # all-equal predictions: empty mask
    soft = diff.clamp(0, clamp) / clamp
    return DiffEditMask(soft, soft > 0.5)
