"""Images and masks in and out: files, the in-memory forms people hand over, and tensors.

Every image and mask reaching the pipeline from outside passes through here, so this is where untrusted
input is decoded. Each decoding step runs inside one guard, and the only exception that leaves
is an EditError whose message is one line naming the file or value at fault (the CLI prints it as
`error: ...`); the pixel limit keeps a decompression bomb from being decoded at all. The rest converts
between PIL images and the pipeline's tensors, and pastes the original back outside the edit's mask.
"""
from __future__ import annotations

import struct
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from methods.options import EditError
from weights.errors import one_line

MAX_PIXELS = 64_000_000  # larger inputs are refused as possible decompression bombs

# ---------------------------------------------------------------- files and pictures

# What Pillow's decoders and plugins raise on malformed data, after open() as well as in it (EXIF parsing
# in exif_transpose, lazy decoding in convert): SyntaxError "not a TIFF file" from a WebP's EXIF block,
# struct.error from a short TIFF tag, ... Named, not `Exception`, so a bug of ours still shows itself.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, IndexError, KeyError,
                 ZeroDivisionError, OverflowError, MemoryError, RecursionError, NotImplementedError,
                 struct.error)


def load_image(path: str | Path) -> Image.Image:
    """Open any image PIL reads as 8-bit RGB, EXIF orientation applied, alpha composited on white.
    Every decoding step runs inside one guard: only EditError leaves this function."""
    path = Path(path)
    try:
        if not path.is_file():
            raise EditError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise EditError(f"{path}: empty file")
    except OSError as e:  # e.g. a symlink loop, a name too long
        raise EditError(f"{path}: cannot be read ({one_line(e)})") from None
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EditError(f"{path}: image is over the {MAX_PIXELS:,}-pixel limit (possible decompression bomb)") from None
    except DECODE_ERRORS as e:
        raise EditError(f"{path}: not a readable image ({type(e).__name__}: {one_line(e, 150)})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any mode -> RGB: EXIF orientation, 16-bit/float rescaled, alpha on white."""
    import numpy as np
    from PIL import ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: rescale, don't clip
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


def to_tensor(img: Image.Image, size: int, device, dtype) -> torch.Tensor:
    """RGB PIL -> (1, 3, size, size) in [-1, 1]; the authors resize every input to a square."""
    import numpy as np
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None].to(device=device, dtype=dtype)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()
    return Image.fromarray(x.numpy(), "RGB")


def map_to_pil(m: torch.Tensor, size: tuple[int, int], binary: bool = False) -> Image.Image:
    """(H, W) map in [0, 1] -> greyscale PIL of `size` (W, H)."""
    x = m.float()[None, None]
    x = (F.interpolate(x, size=(size[1], size[0]), mode="nearest") if binary
         else F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False))
    x = (x[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return Image.fromarray(x.numpy(), "L")


def load_mask(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A user mask (white = edit) -> bool (H, W) at `size`; colour or empty images are refused."""
    return as_mask(Path(path), size)


# ---------------------------------------------------------------- inputs in the forms people have

def as_image(image) -> Image.Image:
    """One image in any accepted form -> RGB PIL.

    str or Path: a file PIL reads. PIL.Image: any mode (alpha composited on white). numpy: uint8,
    H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grey). torch.Tensor: 3 x H x W (or 1 x 3 x H x W) float,
    read as [0, 1] when no value is negative and as [-1, 1] otherwise (diffusers' rule; a [-1, 1] image
    without a single negative value would be misread, so pass such images as uint8), or uint8 3 x H x W."""
    import numpy as np
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, torch.Tensor):
        x = image.detach().cpu()
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise EditError(f"image tensor of shape {tuple(image.shape)}: expected 3 x H x W (channels first)")
        if x.dtype == torch.uint8:
            a = x.permute(1, 2, 0).numpy()
        elif x.is_floating_point():
            x = x.float()
            if not torch.isfinite(x).all() or x.min() < -1 or x.max() > 1:
                raise EditError("image tensor has values outside [-1, 1] (expected [0, 1] or [-1, 1] floats)")
            x = (x + 1) / 2 if x.min() < 0 else x
            a = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        else:
            raise EditError(f"image tensor of dtype {x.dtype}: expected float in [0, 1] / [-1, 1] or uint8")
        return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise EditError(f"image array of dtype {image.dtype}: expected uint8 H x W x 3 "
                            "(for floats, pass a torch tensor C x H x W in [0, 1] or [-1, 1])")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return _to_rgb(Image.fromarray(np.ascontiguousarray(image)))
        raise EditError(f"image array of shape {image.shape}: expected H x W x 3, H x W x 4 or H x W")
    raise EditError(f"image of type {type(image).__name__}: expected a path, PIL image, numpy array or tensor")


def as_mask(mask, size: tuple[int, int]) -> torch.Tensor:
    """A mask in any accepted form (white / True / > 0.5 = edit) -> bool (H, W) tensor at `size` (W, H).

    The forms of `as_image`, plus what edit() returns (an "L" PIL image) and bool or [0, 1] float
    arrays and tensors of shape H x W (or 1 x H x W). Colour images and empty masks are refused."""
    import numpy as np
    name = str(mask) if isinstance(mask, (str, Path)) else f"mask {type(mask).__name__}"
    if isinstance(mask, (str, Path, Image.Image)) or (isinstance(mask, np.ndarray) and mask.dtype == np.uint8
                                                       and mask.ndim == 3):
        a = np.asarray(as_image(mask), dtype=np.int16)
        if np.abs(a - a.mean(axis=2, keepdims=True)).max() > 8:
            raise EditError(f"{name}: not a mask (it has colour; expected black and white, white = region to edit)")
        m = a[..., 0] > 127
    else:
        t = torch.as_tensor(np.asarray(mask)) if isinstance(mask, np.ndarray) else mask
        if not isinstance(t, torch.Tensor):
            raise EditError(f"{name}: expected a path, PIL image, numpy array or tensor")
        t = t.detach().cpu()
        t = t[0] if t.dim() == 3 and t.shape[0] == 1 else t
        if t.dim() != 2:
            raise EditError(f"{name} of shape {tuple(t.shape)}: expected H x W")
        m = (t > 127 if t.dtype == torch.uint8 else t.float() > 0.5 if t.is_floating_point() else t != 0).numpy()
    if not m.any():
        raise EditError(f"{name}: the mask is empty (no white pixels)")
    if m.shape[::-1] != tuple(size):
        m = np.asarray(Image.fromarray(m).resize(tuple(size), Image.NEAREST))
    return torch.from_numpy(m.copy())


# ---------------------------------------------------------------- the edited picture

def keep_unmasked(original: Image.Image, edited: Image.Image, mask: torch.Tensor) -> Image.Image:
    """The original pixels outside the mask, the edit inside, blended across a feathered edge: the mask
    (latent size) upsampled smoothly, cut at 0.5, then blurred by 4 px per 512 px of image (A1111's
    default mask blur), so no seam shows where the two meet."""
    from PIL import ImageFilter

    from evaluation.figures import smooth
    inside = Image.fromarray(((smooth(mask.float(), original.size) > 0.5) * 255).astype("uint8"), "L")
    feather = inside.filter(ImageFilter.GaussianBlur(max(1.0, 4 * min(original.size) / 512)))
    return Image.composite(edited, original.convert("RGB"), feather)


# ---------------------------------------------------------------- the CLI's --image values

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def expand_images(specs: list[str]) -> tuple[list[Path], bool]:
    """--image values -> image files, and whether this is a batch (a folder, a glob or several values).
    A folder gives its image files (by suffix, sorted); a pattern that is not a file is a glob."""
    import glob
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise EditError(f"{spec}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif not p.exists() and glob.has_magic(spec):
            found = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
            if not found:
                raise EditError(f"{spec}: matches no file")
            files += found
        else:
            files.append(p)  # a missing file is reported with the other per-image errors
    unique = list(dict.fromkeys(files))
    one = specs[0]
    batch = len(specs) > 1 or Path(one).is_dir() or (not Path(one).exists() and glob.has_magic(one))
    return unique, batch
