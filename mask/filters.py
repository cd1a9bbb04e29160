"""Image filters of the mask path, written in torch so they run on the maps' own device.

The authors build the mask with Pillow and OpenCV on the host. These are the same operations as
matrices and convolutions:

- ``pil_resize``: Pillow's ``Image.resize`` (BICUBIC by default, the filter Pillow uses for an 'L'
  image when none is given, which is what the authors' ``.resize((64, 64))`` does). Pillow's bicubic
  is the Keys kernel with a = -0.5 (``F.interpolate(mode="bicubic")`` uses a = -0.75), sampled at
  output-pixel centres, with the kernel's support cut at the image border and the remaining taps
  renormalised to sum to 1 (so the border is neither padded nor mirrored). It is separable:
  horizontal pass, then vertical. ``uint8=True`` follows Pillow's 8-bit path, which rounds the
  taps to 22-bit fixed point and rounds and clips each pass to 0..255.
- ``binomial_blur``: ``cv2.GaussianBlur(img, (5, 5), 0)``. With sigma 0 and a kernel of 7 or less
  OpenCV takes a fixed binomial table, so the kernel is [1, 4, 6, 4, 1] / 16; border
  BORDER_REFLECT_101 (mirror without repeating the edge pixel).
- ``gaussian_blur``: a sampled Gaussian of any size and sigma (the ``blur="gaussian"`` option).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

# Pillow's fixed-point precision for 8-bit images: 32 bits minus 8 for the pixel, minus 2 headroom
# for kernels whose taps sum above 1 or below 0 before the final clip.
PIL_PRECISION_BITS = 22


def keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (Keys 1981); Pillow's BICUBIC uses a = -0.5."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1             # |x| < 1
    far = (((x - 5) * x + 8) * x - 4) * a                  # 1 <= |x| < 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def triangle(x: torch.Tensor) -> torch.Tensor:
    """Linear interpolation kernel (Pillow's BILINEAR)."""
    return (1 - x.abs()).clamp_min(0)


PIL_FILTERS = {"bicubic": (keys_cubic, 2.0), "bilinear": (triangle, 1.0)}  # kernel, support (pixels)


@lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, filter: str = "bicubic", uint8: bool = False,
                device: torch.device | str | None = None) -> torch.Tensor:
    """(out_size, in_size) float64 matrix of one Pillow resampling pass along one axis, built on `device`
    (default CPU) and cached per device: no host-to-device copy in a denoising step, where it would be a
    host synchronisation (and could not be captured in a CUDA graph).

    Row j holds the taps of output pixel j, whose centre sits at input coordinate
    ``(j + 0.5) * in_size / out_size``. When downscaling, the kernel is stretched by the scale (an
    antialiasing filter). The taps that fall inside the image are kept and divided by their sum.
    With ``uint8`` the taps are Pillow's fixed-point integers (rounded half away from zero), so a
    pass is ``(2^21 + row . pixels) >> 22``.
    """
    kernel, support = PIL_FILTERS[filter]
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = support * stretch
    centre = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale  # (out,)
    # first and one-past-last input pixel of each row, rounded as Pillow does (C casts truncate)
    lo = torch.trunc(centre - support + 0.5).clamp_min(0)
    hi = torch.trunc(centre + support + 0.5).clamp_max(in_size)
    pos = torch.arange(in_size, dtype=torch.float64, device=device)               # (in,)
    inside = (pos[None] >= lo[:, None]) & (pos[None] < hi[:, None])
    w = torch.where(inside, kernel((pos[None] - centre[:, None] + 0.5) / stretch), torch.zeros(()))
    total = w.sum(1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones(())), w)
    if uint8:
        w = torch.trunc(w * (1 << PIL_PRECISION_BITS) + 0.5 * torch.sign(w))
    return w


def pil_resize(x: torch.Tensor, size: tuple[int, int], filter: str = "bicubic", uint8: bool = False) -> torch.Tensor:
    """Resize the last two dims of ``x`` to ``size`` = (H, W) as Pillow's ``Image.resize`` does.

    Float input follows Pillow's 'F' images (float taps, no clipping). ``uint8=True`` follows
    Pillow's 'L' images: ``x`` holds integers 0..255 (any float dtype) and so does the result, each
    pass rounded and clipped as Pillow's fixed-point code does; it is computed in float64, where the
    integer sums are exact. The weight matrices are built from the sizes alone; the map itself
    stays on its device.
    """
    H, W = size
    h, w = x.shape[-2:]
    dtype = torch.float64 if uint8 else x.dtype
    y = x.to(dtype)
    # Pillow resizes horizontally first, then vertically; it skips a pass whose size is unchanged
    if w != W:
        y = y @ pil_weights(w, W, filter, uint8, x.device).to(dtype).T
        if uint8:
            y = _fixed_point_to_uint8(y)
    if h != H:
        y = pil_weights(h, H, filter, uint8, x.device).to(dtype) @ y
        if uint8:
            y = _fixed_point_to_uint8(y)
    return y.to(x.dtype)


def _fixed_point_to_uint8(s: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a fixed-point sum: add one half, shift right (floor), clip to 0..255."""
    one = float(1 << PIL_PRECISION_BITS)
    return torch.floor((s + one / 2) / one).clamp(0, 255)


BINOMIAL_5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)  # OpenCV's fixed 5-tap table for sigma <= 0


def separable_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Convolve the last two dims of ``x`` with the odd 1-D kernel ``k`` along both axes.

    Border: torch ``'reflect'`` = OpenCV's default BORDER_REFLECT_101, so a blob at the border is
    not darkened the way zero padding would.
    """
    r = k.numel() // 2
    shape = x.shape
    y = x.reshape(-1, 1, shape[-2], shape[-1])
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))  # along width
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))  # along height
    return y.reshape(shape)


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """``cv2.GaussianBlur(x, (5, 5), 0)``: the [1, 4, 6, 4, 1] / 16 kernel, reflect-101 border."""
    return separable_conv(x, binomial_taps(x.device, x.dtype))


def binomial_taps(device, dtype) -> torch.Tensor:
    """BINOMIAL_5 made on the device (no host-to-device copy in a step): with d = |k - 2|, the row
    C(4, k) = 1, 4, 6, 4, 1 is 6 - 1.5 d - 0.5 d^2, exact in floating point."""
    d = (torch.arange(5, device=device, dtype=dtype) - 2).abs()
    return (6 - 1.5 * d - 0.5 * d * d) / 16


def default_sigma(kernel_size: int) -> float:
    """OpenCV's ``getGaussianKernel`` formula for sigma <= 0 (also torchvision's default); 1.1 for 5.
    OpenCV itself only uses it above 7 taps; below, it takes its binomial table."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_kernel1d(kernel_size: int, sigma: float | None = None, *, device=None,
                      dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian ``exp(-(i - (k-1)/2)^2 / (2 sigma^2))``, i = 0..k-1."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if sigma is None or sigma <= 0:
        sigma = default_sigma(kernel_size)
    x = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, kernel_size: int = 5, sigma: float | None = None) -> torch.Tensor:
    """Separable sampled-Gaussian blur over the last two dims of ``x``, reflect-101 border."""
    return separable_conv(x, gaussian_kernel1d(kernel_size, sigma, device=x.device, dtype=x.dtype))
