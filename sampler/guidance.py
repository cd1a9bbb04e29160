"""Classifier-free guidance (Ho & Salimans 2022), as used by SD and by the InstDiffEdit authors."""
from __future__ import annotations

import torch


def cfg(noise_pred_uncond: torch.Tensor, noise_pred_text: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (text - uncond); scale 7.5 in the paper (scale 1 returns ``text``)."""
    return noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)


def cfg_batched(noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """``cfg`` of a UNet output over the batch ``cat([uncond, text])`` (unconditional half FIRST)."""
    if noise_pred.shape[0] % 2:
        raise ValueError(f"batch of {noise_pred.shape[0]} cannot be split into uncond/text halves")
    uncond, text = noise_pred.chunk(2)
    return cfg(uncond, text, scale)
