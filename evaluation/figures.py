"""Figures people put in papers, from an edit's results: the per-word attention maps colour-mapped over
the source image with their labels and Eq. 8 positions P, the mask as a smooth outline over the image,
and the soft mask at every step as one strip (the paper's Fig. 3 kind).

Here, in evaluation/, because the run reports and pages reuse them, and the CLI writes them for one edit.
Only Pillow, numpy and torch: no plotting library. Maps are upsampled bicubically (never nearest
neighbour), so a 16x16 map shows as a smooth field and the mask's outline has no staircase.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# viridis, sampled at 9 points (matplotlib's values); perceptually uniform and readable in greyscale
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)
P_COLOURS = {1: (0, 158, 115), -1: (213, 94, 0), 0: (150, 150, 150)}  # Eq. 8: joins, subtracted, neither
P_MEANING = {1: "in mask", -1: "subtracted", 0: "unused"}
OUTLINE = (255, 48, 48)


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font at `size` px (its tiny bitmap font only when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis)."""
    t = np.clip(x, 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    f = (t - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - f) + _VIRIDIS[lo + 1] * f).round().astype(np.uint8)


def smooth(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float array at `size` (W, H), bicubic, clamped to the map's own range."""
    x = m.detach().float().cpu()[None, None]
    y = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False)
    return y.clamp(float(x.min()), float(x.max()))[0, 0].numpy()


def heat_overlay(img: Image.Image, m: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """The map (min-max normalised) colour-mapped and blended over the image."""
    a = smooth(m, img.size)
    a = (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else np.zeros_like(a)
    heat = Image.fromarray(colormap(a), "RGB")
    return Image.blend(img.convert("RGB"), heat, alpha)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill=(0, 0, 0)) -> None:
    draw.text(xy, text, fill=fill, font=font(size))


def _fit(text: str, width: int, size: int) -> str:
    f = font(size)
    while text and f.getlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def attention_figure(img: Image.Image, words: list[str], maps: torch.Tensor, P: list[int],
                     cell: int = 192) -> Image.Image:
    """The source, then one tile per word: its attention map over the image, its word and P (Eq. 8),
    framed in P's colour (green: the word's map joins the mask, orange: subtracted, grey: unused)."""
    pad, text = max(4, cell // 32), max(14, cell // 10)
    label_h = 2 * text + 3 * pad
    n = 1 + len(words)
    fig = Image.new("RGB", (n * (cell + pad) + pad, cell + label_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    base = img.convert("RGB").resize((cell, cell), Image.BICUBIC)
    fig.paste(base, (pad, pad))
    _label(draw, (pad, cell + 2 * pad), "source", text)
    for k, word in enumerate(words):
        x = pad + (k + 1) * (cell + pad)
        p = P[k] if k < len(P) else 0
        if k < len(maps):
            fig.paste(heat_overlay(base, maps[k]), (x, pad))
        draw.rectangle([x - 2, pad - 2, x + cell + 1, pad + cell + 1], outline=P_COLOURS.get(p, P_COLOURS[0]),
                       width=3)
        _label(draw, (x, cell + 2 * pad), _fit(word, cell, text), text)
        _label(draw, (x, cell + 3 * pad + text), f"P = {p:+d}  {P_MEANING.get(p, '')}" if p else
               f"P = 0  {P_MEANING[0]}", int(text * 0.85),
               fill=P_COLOURS.get(p, P_COLOURS[0]))
    return fig


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Boundary band of a bool mask, `width` px wide (dilation minus erosion)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    k = 2 * (width // 2) + 1
    return (np.asarray(im.filter(ImageFilter.MaxFilter(k))) > 127) & ~(np.asarray(im.filter(ImageFilter.MinFilter(k))) > 127)


def mask_outline(img: Image.Image, mask: torch.Tensor, tint: float = 0.25) -> Image.Image:
    """The mask (bool, any resolution) as a smooth outline over the image, its inside lightly tinted.
    The mask is upsampled bicubically and cut at 0.5, so its edge follows the cells without a staircase."""
    img = img.convert("RGB")
    inside = smooth(mask.float(), img.size) > 0.5
    a = np.asarray(img, dtype=np.float64).copy()
    a[inside] = a[inside] * (1 - tint) + np.array(OUTLINE) * tint
    a[outline(inside, max(2, round(min(img.size) / 150)))] = OUTLINE
    return Image.fromarray(a.round().astype(np.uint8), "RGB")


def strip_masks(state) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What `steps_strip` draws of one step callback's methods.StepState (--save-steps, the page's live
    view): its (soft mask, mask) on the CPU, or None for a step that has no mask and for the inpainting
    finish, whose fixed mask would repeat the last one at every step."""
    if state.soft is None or state.stage == "inpaint":
        return None
    return state.soft.float().cpu(), state.mask.cpu()


def steps_strip(img: Image.Image, soft_masks: list[torch.Tensor], masks: list[torch.Tensor] | None = None,
                cell: int = 128, per_row: int = 10) -> Image.Image:
    """The soft mask after every denoising step over the image, left to right (rows of `per_row`), with
    that step's binary mask as an outline when `masks` are given."""
    pad, text = 4, max(12, cell // 9)
    n = len(soft_masks)
    rows = max(1, -(-n // per_row))
    cols = min(n, per_row) if n else 1
    fig = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text + 2 * pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    base = img.convert("RGB").resize((cell, cell), Image.BICUBIC)
    for k, soft in enumerate(soft_masks):
        x = pad + (k % per_row) * (cell + pad)
        y = pad + (k // per_row) * (cell + text + 2 * pad)
        a = smooth(soft, (cell, cell)).clip(0, 1)  # the soft mask is already in [0, 1]: no renormalising
        tile = Image.blend(base, Image.fromarray(colormap(a), "RGB"), 0.6)
        if masks is not None:
            t = np.asarray(tile).copy()
            t[outline(smooth(masks[k].float(), (cell, cell)) > 0.5, 2)] = OUTLINE
            tile = Image.fromarray(t)
        fig.paste(tile, (x, y))
        _label(draw, (x, y + cell + 2), f"step {k + 1}", text)
    return fig
