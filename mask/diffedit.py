"""DiffEdit's masks (Couairon et al. 2022, arXiv 2210.11427), the baseline of InstDiffEdit's Table 1.

The source image is noised (strength 0.5) with several noise samples; the UNet predicts the noise
conditioned on the source text and on the edit text; where the two predictions differ, the edit must
change the image. Two ways to turn the predictions into a mask:

* ``diffedit_paper_mask``: as the InstDiffEdit authors did for Table 1 (their model/diffedit.py), on
  the last step's predictions of full denoising runs: per-sample L2 norm over channels, mean over
  samples, min-max, 8-bit, ``cv2.GaussianBlur(m, (5, 5), 1)``, binarised at ``threshold``.
* ``diffedit_mask``: diffusers' ``generate_mask``: mean |difference| over samples and channels,
  clamped at ``ratio`` times its mean, rescaled to [0, 1], binarised at 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .instant import gaussian_blur, minmax


@dataclass
class DiffEditMask:
    soft: torch.Tensor  # (H, W) map in [0, 1] before binarisation
    mask: torch.Tensor  # (H, W) bool


def diffedit_mask(pred_source: torch.Tensor, pred_edit: torch.Tensor, ratio: float = 3.0) -> DiffEditMask:
    """pred_*: (samples, C, H, W) guided noise predictions under the source and the edit text."""
    diff = (pred_edit.float() - pred_source.float()).abs().mean(dim=(0, 1))  # mean over samples, channels
    clamp = (diff.mean() * ratio).clamp_min(torch.finfo(diff.dtype).tiny)  # all-equal predictions: empty mask
    soft = diff.clamp(0, clamp) / clamp
    return DiffEditMask(soft, soft > 0.5)


def diffedit_paper_mask(pred_source: torch.Tensor, pred_edit: torch.Tensor, threshold: float = 0.3,
                        blur_kernel: int = 5, blur_sigma: float = 1.0) -> DiffEditMask:
    """pred_*: (samples, C, H, W) last-step guided noise predictions of the two prompts' denoising runs."""
    diff = (pred_source.float() - pred_edit.float()).pow(2).sum(dim=1).sqrt()  # L2 over channels, per sample
    m = minmax(diff.mean(dim=0))  # mean over samples; flat maps become 0 (empty mask), never nan
    m = (m * 255).to(torch.uint8).float()  # the authors' 8-bit image (truncation, as numpy's astype)
    m = gaussian_blur(m, blur_kernel, blur_sigma)  # cv2.GaussianBlur(m, (5, 5), 1): reflect-101 border
    return DiffEditMask(m / 255, m > 255 * threshold)
