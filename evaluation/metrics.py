"""Evaluation metrics of InstDiffEdit (paper appendix, "Evaluation Metrics").

Conventions (chosen here, the paper is silent on them):

* Images are uint8 ``HxWx3`` arrays or PIL images (converted to RGB; a 2-D array is
  treated as a one-channel image). Edited and source images must have the same size;
  resizing is the caller's job (the runner resizes the input to 512x512 before editing).
* Masks: see :func:`to_bool_mask`. ``True`` = "edit here" / "inside the human mask".
* :func:`mask_iou`: ``|pred & gt| / |pred | gt|``; when both masks are empty the union is
  empty and the IoU is defined as ``empty`` (default 1.0: the two masks agree exactly).
* :func:`change_rates`: per-pixel change ``p = |edited - source| / 255`` averaged over the
  colour channels, so ``p`` is in [0, 1]; ``C_m`` = mean of ``p`` inside the human mask,
  ``C_non`` = mean outside, ``rate = C_m / C_non``. Values are fractions (the paper prints
  them in percent). Guards: ``C_m`` is NaN when the mask is empty, ``C_non`` is NaN when the
  mask covers the whole image; ``rate`` is ``inf`` when ``C_non == 0 < C_m`` and NaN when
  ``C_non == C_m == 0`` or either is NaN.
* Dataset level (see the runner's summary): the paper's Table 1 rate equals
  ``mean(C_m) / mean(C_non)`` (22.7 / 6.1 = 3.72 ~ 3.71, 19.5 / 8.0 = 2.44 ~ 2.45, ...), so
  the summary reports that ratio as ``rate``; the mean of finite per-item rates is given
  separately as ``rate_mean_per_item``.

Optional metrics (:func:`lpips_distance`, :func:`clip_score`) go through ``torchmetrics`` and
only run when it is importable *and* the weights are on disk; otherwise they raise
:class:`MetricUnavailable` whose message starts with ``"skipped: "``. Nothing is installed or
downloaded. CLIPScore is torchmetrics' definition, ``100 * max(cos(E_image, E_text), 0)``
(range 0..100); the paper's Table 1 numbers (about 0.24) look like the plain cosine, i.e.
this value / 100 -- unverified.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EditMetrics",
    "MetricUnavailable",
    "change_rates",
    "clip_score",
    "lpips_distance",
    "mask_iou",
    "optional_metrics",
    "to_bool_mask",
    "to_rgb_array",
]


# ----------------------------------------------------------------------------- inputs
def to_rgb_array(image: Any) -> np.ndarray:
    """PIL image or array -> uint8 array ``HxWxC`` (RGB for PIL / 4-channel inputs).

    A 2-D array becomes ``HxWx1``. Float arrays are not accepted (ambiguous scale)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[2] == 4:  # RGBA: drop alpha
        arr = arr[:, :, :3]
    return arr


def to_bool_mask(mask: Any) -> np.ndarray:
    """Convert a mask to a 2-D bool array.

    * bool arrays are used as they are;
    * PIL images are converted to grey ``L`` and thresholded at ``> 127``;
    * integer arrays: ``> 127`` when the maximum is above 1 (0/255 images), else ``!= 0``;
    * float arrays: ``> 0.5`` (maps in [0, 1]);
    * an ``HxWxC`` array is reduced by the mean over channels first (after the rules
      above are applied to the mean's dtype class: integer -> ``> 127`` / ``!= 0``).
    """
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL.Image
        return np.asarray(mask.convert("L")) > 127
    arr = np.asarray(mask)
    if arr.ndim == 3:
        if arr.dtype == np.bool_:
            arr = arr.any(axis=2)
        elif np.issubdtype(arr.dtype, np.integer):
            arr = np.rint(arr.mean(axis=2)).astype(np.int64)
        else:
            arr = arr.mean(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr > 127 if arr.size and arr.max() > 1 else arr != 0
    if np.issubdtype(arr.dtype, np.floating):
        return arr > 0.5
    raise TypeError(f"unsupported mask dtype {arr.dtype}")


# ----------------------------------------------------------------------------- metrics
def mask_iou(pred: Any, gt: Any, empty: float = 1.0) -> float:
    """Binary IoU ``|pred & gt| / |pred | gt|`` (paper appendix, Eq. I).

    Both masks go through :func:`to_bool_mask` and must have the same shape. When both are
    empty (union of size 0) the result is ``empty`` (default 1.0: perfect agreement)."""
    p, g = to_bool_mask(pred), to_bool_mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: pred {p.shape} vs gt {g.shape}")
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return float(empty)
    return int(np.logical_and(p, g).sum()) / union


def pixel_change(edited: Any, source: Any) -> np.ndarray:
    """Per-pixel change ``|edited - source| / 255`` averaged over channels, ``HxW`` in [0, 1]."""
    e, s = to_rgb_array(edited), to_rgb_array(source)
    if e.shape != s.shape:
        raise ValueError(f"image shapes differ: edited {e.shape} vs source {s.shape}")
    diff = np.abs(e.astype(np.int16) - s.astype(np.int16)).astype(np.float64)
    return diff.mean(axis=2) / 255.0


def safe_rate(c_m: float, c_non: float) -> float:
    """``c_m / c_non`` with the guards documented in the module docstring."""
    if math.isnan(c_m) or math.isnan(c_non):
        return math.nan
    if c_non == 0.0:
        return math.inf if c_m > 0.0 else math.nan
    return c_m / c_non


def change_rates(edited: Any, source: Any, gt_mask: Any) -> tuple[float, float, float]:
    """``(C_m, C_non, rate)`` of an edit against the human mask (paper appendix, Eq. II-III).

    Fractions in [0, 1] (multiply by 100 for the paper's percent). ``gt_mask`` must have the
    image's height and width."""
    p = pixel_change(edited, source)
    m = to_bool_mask(gt_mask)
    if m.shape != p.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {p.shape}")
    n_in = int(m.sum())
    n_out = m.size - n_in
    c_m = float(p[m].sum() / n_in) if n_in else math.nan
    c_non = float(p[~m].sum() / n_out) if n_out else math.nan
    return c_m, c_non, safe_rate(c_m, c_non)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class EditMetrics:
    """One item's row. Fractions, not percent; ``None`` = not available for this item.

    ``seconds`` is what ``edit_fn`` reported, ``wall_seconds`` the runner's own clock around
    the call. ``extra`` holds optional metrics (LPIPS, CLIPScore, or "skipped: ..." texts)."""

    id: str
    seconds: float | None = None
    iou: float | None = None
    c_m: float | None = None
    c_non: float | None = None
    rate: float | None = None
    wall_seconds: float | None = None
    has_pred_mask: bool = False
    has_gt_mask: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """Flat dict for CSV / JSON; non-finite floats become ``None``."""
        row = asdict(self)
        extra = row.pop("extra")
        for k, v in extra.items():
            row.setdefault(k, v)
        return {k: _finite_or_none(v) for k, v in row.items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "EditMetrics":
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: v for k, v in row.items() if k in names}
        extra = {k: v for k, v in row.items() if k not in names and k != "extra"}
        extra.update(row.get("extra") or {})
        return cls(**kwargs, extra=extra)


# ----------------------------------------------------------------------------- optional
class MetricUnavailable(RuntimeError):
    """Raised by optional metrics that cannot run here; the message starts with 'skipped: '."""


def _require_torchmetrics(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("torchmetrics") is None:
        raise MetricUnavailable(f"skipped: {what} needs torchmetrics, which is not installed")


def _image_tensor(image: Any):
    import torch

    arr = to_rgb_array(image)
    if arr.shape[2] != 3:
        raise ValueError("LPIPS/CLIPScore need RGB images")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # 3xHxW uint8


_LPIPS_BACKBONE_FILES = {  # torchvision backbone checkpoints torchmetrics' LPIPS loads
    "alex": "alexnet-owt-",
    "vgg": "vgg16-",
    "squeeze": "squeezenet1_1-",
}


def lpips_distance(edited: Any, source: Any, net: str = "alex") -> float:
    """LPIPS between edited and source image via ``torchmetrics`` (lower = closer).

    Runs only when torchmetrics (and the torchvision it needs for LPIPS) is importable and
    the backbone checkpoint is already in ``torch.hub.get_dir()/checkpoints``; raises
    :class:`MetricUnavailable` ("skipped: ...") otherwise. Never downloads."""
    import importlib.util

    _require_torchmetrics("LPIPS")
    if importlib.util.find_spec("torchvision") is None:
        raise MetricUnavailable("skipped: torchmetrics' LPIPS needs torchvision, which is not installed")
    import torch

    if net not in _LPIPS_BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(_LPIPS_BACKBONE_FILES)}")
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    prefix = _LPIPS_BACKBONE_FILES[net]
    if not ckpt_dir.is_dir() or not any(p.name.startswith(prefix) for p in ckpt_dir.iterdir()):
        raise MetricUnavailable(
            f"skipped: LPIPS backbone weights '{prefix}*.pth' not found in {ckpt_dir} (not downloading)"
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    e = _image_tensor(edited).float().div(255.0)[None]
    s = _image_tensor(source).float().div(255.0)[None]
    with torch.no_grad():
        return float(metric(e, s))


def clip_score(image: Any, text: str, model_path: str | os.PathLike | None) -> float:
    """CLIPScore of ``image`` against ``text`` via ``torchmetrics``.

    Definition (torchmetrics): ``100 * max(cos(E_image, E_text), 0)``, range 0..100.
    ``model_path`` must be a local folder of a transformers CLIP model (for example a saved
    ``openai/clip-vit-large-patch14``); raises :class:`MetricUnavailable` ("skipped: ...")
    when torchmetrics is missing or the folder does not exist. Never downloads."""
    _require_torchmetrics("CLIPScore")
    if model_path is None or not Path(model_path).is_dir():
        raise MetricUnavailable(f"skipped: CLIPScore needs a local CLIP model folder, got {model_path!r}")
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    metric = CLIPScore(model_name_or_path=str(model_path))
    with torch.no_grad():
        return float(metric(_image_tensor(image), text))


def optional_metrics(
    edited: Any,
    source: Any,
    text: str | None = None,
    clip_model_path: str | os.PathLike | None = None,
    lpips_net: str | None = "alex",
) -> dict[str, Any]:
    """``{"lpips": value or "skipped: ...", "clip_score": value or "skipped: ..."}``.

    Pass ``lpips_net=None`` / ``text=None`` to leave a metric out entirely."""
    out: dict[str, Any] = {}
    if lpips_net is not None:
        try:
            out["lpips"] = lpips_distance(edited, source, net=lpips_net)
        except MetricUnavailable as exc:
            out["lpips"] = str(exc)
    if text is not None:
        try:
            out["clip_score"] = clip_score(edited, text, clip_model_path)
        except MetricUnavailable as exc:
            out["clip_score"] = str(exc)
    return out
