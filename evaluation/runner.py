"""Generic resumable dataset runner.

``run_dataset(items, image_dir, out_dir, edit_fn, mask_dir=None)`` with
``edit_fn(image: PIL.Image, item) -> (edited PIL.Image, mask bool array or None, seconds[, extras dict])``;
the extras (e.g. ``{"unet_evals": 250}``) join the item's row; summary.json has the mean unet_evals.

Layout of ``out_dir``::

    out_dir/<safe id>/edited.png    edited image
    out_dir/<safe id>/mask.png      predicted mask (L, 0/255), only when edit_fn returned one
    out_dir/<safe id>/metrics.json  the item's metrics row; written last = "item done"
    out_dir/metrics.csv             all done items' rows in list order (rebuilt every run)
    out_dir/summary.json            means and counts (rebuilt every run, also on interruption)

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, and ``metrics.json`` goes last, so an interrupted item is never counted as done:
on the next run it is recomputed. An item is skipped as done when its ``metrics.json`` parses,
has the item's id, and the files it lists exist.

Conventions:

* The input is opened, converted to RGB and resized to ``image_size`` x ``image_size``
  (bicubic; default 512 like the authors; ``None`` keeps the original size) before it is handed
  to ``edit_fn``; metrics compare the edited image with this resized input. An edited image of
  another size is resized (bicubic) to the input's size for the metrics (counted in
  ``summary["resized_outputs"]``); the saved ``edited.png`` is what ``edit_fn`` returned.
* The human mask (if ``mask_dir`` is given and :func:`find_mask` finds it) and the predicted
  mask are resized to the input size with nearest neighbour.
* Summary counts: ``n_items``, ``n_done`` (complete items in ``out_dir``), ``n_computed`` (this
  call), ``n_skipped_done`` (already done, not recomputed), ``n_missing``, ``n_failed``,
  ``n_skipped`` (= missing + failed), ``complete`` (all items done), ``interrupted`` (the loop
  did not reach the end: error or ``limit``).
* Missing input images: ``warnings.warn`` + listed in ``summary["missing"]``, skipped (rerun
  to pick them up once present). Items with a mask file but no mask found in ``mask_dir`` are
  listed in ``summary["missing_masks"]`` and get no IoU / C_m / C_non.
* Errors in ``edit_fn`` propagate (``on_error="raise"``, default) after the summary of what is
  done has been written; ``on_error="record"`` lists them in ``summary["failed"]`` and goes on.
* Input files are never written: ``out_dir`` must differ from ``image_dir`` and ``mask_dir``,
  and no output path may coincide with an input path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .datasets import EditItem, find_image, find_mask, safe_id
from .metrics import EditMetrics, change_rates, mask_iou, to_bool_mask

__all__ = ["run_dataset", "summarize", "load_rows", "EditFn"]

EditFn = Callable[[Image.Image, EditItem], "tuple[Image.Image, Any, float]"]

METRICS_JSON = "metrics.json"
EDITED_PNG = "edited.png"
MASK_PNG = "mask.png"


# ----------------------------------------------------------------------------- atomic io
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_save_png(path: Path, image: Image.Image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def _json_clean(x: Any) -> Any:
    """Non-finite floats -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _dump_json(x: Any) -> str:
    return json.dumps(_json_clean(x), indent=2, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- helpers
def _load_rgb(path: Path, size: int | None) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return im


def _resize_mask(mask: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    if (mask.shape[1], mask.shape[0]) == size_wh:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize(size_wh, Image.Resampling.NEAREST)) > 127


def _item_done(item_dir: Path, item: EditItem) -> dict[str, Any] | None:
    """The item's stored row if it is complete, else None."""
    mj = item_dir / METRICS_JSON
    if not mj.is_file():
        return None
    try:
        row = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("id") != item.id:
        return None
    files = row.get("files") or [EDITED_PNG]
    if not all((item_dir / f).is_file() for f in files):
        return None
    return row


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def load_rows(out_dir: str | Path, items: Sequence[EditItem] | None = None) -> list[dict[str, Any]]:
    """Rows of done items: in ``items`` order when given, else every ``*/metrics.json``."""
    out_dir = Path(out_dir)
    rows = []
    if items is not None:
        for item in items:
            row = _item_done(out_dir / safe_id(item.id), item)
            if row is not None:
                rows.append(row)
        return rows
    for mj in sorted(out_dir.glob(f"*/{METRICS_JSON}")):
        try:
            rows.append(json.loads(mj.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dataset-level numbers of item rows (fractions, not percent).

    ``rate`` = mean(C_m) / mean(C_non) over items with a human mask (what the paper's Table 1
    numbers satisfy); ``rate_mean_per_item`` = mean of the finite per-item rates."""
    gt_rows = [r for r in rows if r.get("has_gt_mask")]
    c_m = _mean([r.get("c_m") for r in gt_rows])
    c_non = _mean([r.get("c_non") for r in gt_rows])
    if c_m is None or c_non is None:
        rate = None
    elif c_non == 0:
        rate = math.inf if c_m > 0 else None
    else:
        rate = c_m / c_non
    out = {
        "n_rows": len(rows),
        "seconds": _mean([r.get("seconds") for r in rows]),
        "wall_seconds": _mean([r.get("wall_seconds") for r in rows]),
        "iou": _mean([r.get("iou") for r in rows]),
        "n_iou": sum(1 for r in rows if r.get("iou") is not None),
        "c_m": c_m,
        "c_non": c_non,
        "rate": rate,
        "rate_mean_per_item": _mean([r.get("rate") for r in gt_rows]),
        "n_gt_mask": len(gt_rows),
    }
    for key in ("unet_evals", "lpips", "clip_score"):
        vals = [r.get(key) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = _mean(vals)
            out[f"n_{key}"] = len(vals)
    return out


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and not isinstance(v, (dict, list)):
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    _atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- runner
def run_dataset(
    items: Sequence[EditItem],
    image_dir: str | Path,
    out_dir: str | Path,
    edit_fn: EditFn,
    mask_dir: str | Path | None = None,
    *,
    method: str | None = None,
    image_size: int | None = 512,
    extra_metrics: Callable[[Image.Image, Image.Image, EditItem], dict[str, Any]] | None = None,
    on_error: str = "raise",
    limit: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run ``edit_fn`` over ``items``, resumably; returns the summary (also in summary.json).

    ``method`` names the run in reports (default: ``out_dir``'s folder name).
    ``extra_metrics(source, edited, item) -> dict`` adds columns (e.g.
    :func:`evaluation.metrics.optional_metrics`). ``limit`` stops after that many items have
    been computed in this call (handy for smoke runs)."""
    if on_error not in ("raise", "record"):
        raise ValueError("on_error must be 'raise' or 'record'")
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    mask_dir = Path(mask_dir) if mask_dir is not None else None
    out_res = out_dir.resolve()
    for d, what in ((image_dir, "image_dir"), (mask_dir, "mask_dir")):
        if d is not None and d.exists() and d.resolve() == out_res:
            raise ValueError(f"out_dir must differ from {what} ({d}); inputs are never overwritten")
    ids = [safe_id(it.id) for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"items map to the same output folder: {dup[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)

    missing: list[str] = []
    missing_masks: list[str] = []
    failed: list[dict[str, str]] = []
    n_computed = n_resumed = n_resized = 0
    finished = False
    t_start = time.perf_counter()

    def write_summary() -> dict[str, Any]:
        rows = load_rows(out_dir, items)
        _write_csv(out_dir / "metrics.csv", rows)
        summary = {
            "method": method or out_dir.resolve().name,
            "complete": len(rows) == len(items),
            "interrupted": not finished,
            "n_items": len(items),
            "n_done": len(rows),
            "n_computed": n_computed,
            "n_skipped_done": n_resumed,
            "n_missing": len(missing),
            "n_missing_masks": len(missing_masks),
            "n_failed": len(failed),
            "n_skipped": len(missing) + len(failed),
            "resized_outputs": n_resized,
            "image_size": image_size,
            "image_dir": str(image_dir),
            "mask_dir": str(mask_dir) if mask_dir is not None else None,
            "elapsed_seconds": time.perf_counter() - t_start,
            **summarize(rows),
            "missing": missing,
            "missing_masks": missing_masks,
            "failed": failed,
        }
        summary = _json_clean(summary)  # the returned dict equals the file (inf/nan -> None)
        _atomic_write_text(out_dir / "summary.json", _dump_json(summary))
        return summary

    try:
        for item in items:
            item_dir = out_dir / safe_id(item.id)
            if _item_done(item_dir, item) is not None:
                n_resumed += 1
                continue
            if limit is not None and n_computed >= limit:
                break
            img_path = find_image(item, image_dir)
            if img_path is None:
                warnings.warn(f"missing image for item {item.id!r}: {item.image_file!r} not in {image_dir}")
                missing.append(item.id)
                continue
            gt_path = find_mask(item, mask_dir)
            if mask_dir is not None and item.mask_file is not None and gt_path is None:
                warnings.warn(f"missing human mask for item {item.id!r} in {mask_dir}")
                missing_masks.append(item.id)
            inputs = {p.resolve() for p in (img_path, gt_path) if p is not None}
            outs = [item_dir / n for n in (EDITED_PNG, MASK_PNG, METRICS_JSON)]
            if any(o.resolve() in inputs for o in outs):
                raise ValueError(f"output for {item.id!r} would overwrite an input file")

            source = _load_rgb(img_path, image_size)
            t0 = time.perf_counter()
            try:
                edited, pred_mask, seconds, *more = edit_fn(source.copy(), item)
            except Exception as exc:
                if on_error == "raise":
                    raise
                warnings.warn(f"edit_fn failed on item {item.id!r}: {exc!r}")
                failed.append({"id": item.id, "error": repr(exc)})
                continue
            wall = time.perf_counter() - t0
            if not isinstance(edited, Image.Image):
                edited = Image.fromarray(np.asarray(edited, dtype=np.uint8))
            edited_rgb = edited.convert("RGB")
            if edited_rgb.size != source.size:
                n_resized += 1
                edited_rgb = edited_rgb.resize(source.size, Image.Resampling.BICUBIC)

            row = EditMetrics(id=item.id, seconds=float(seconds), wall_seconds=wall)
            pred = None
            if pred_mask is not None:
                pred = _resize_mask(to_bool_mask(pred_mask), source.size)
                row.has_pred_mask = True
            if gt_path is not None:
                with Image.open(gt_path) as gim:
                    gt = _resize_mask(to_bool_mask(gim), source.size)
                row.has_gt_mask = True
                row.c_m, row.c_non, row.rate = change_rates(edited_rgb, source, gt)
                if pred is not None:
                    row.iou = mask_iou(pred, gt)
            if more:  # edit_fn's own per-item figures, e.g. {"unet_evals": 1100}
                row.extra.update(more[0])
            if extra_metrics is not None:
                row.extra.update(extra_metrics(source, edited_rgb, item))

            files = [EDITED_PNG]
            _atomic_save_png(item_dir / EDITED_PNG, edited)
            if pred_mask is not None:
                raw_mask = to_bool_mask(pred_mask)
                _atomic_save_png(item_dir / MASK_PNG, Image.fromarray(raw_mask.astype(np.uint8) * 255))
                files.append(MASK_PNG)
            out_row = row.to_row()
            out_row.update(
                {
                    "image_file": str(img_path),
                    "gt_mask_file": str(gt_path) if gt_path is not None else None,
                    "source_text": item.source_text,
                    "edit_text": item.edit_text,
                    "line_no": item.line_no,
                    "files": files,
                }
            )
            _atomic_write_text(item_dir / METRICS_JSON, _dump_json(out_row))  # last: marks done
            n_computed += 1
            if verbose:
                print(f"[{n_computed}] {item.id}: {float(seconds):.2f}s iou={row.iou} c_m={row.c_m}", flush=True)
        else:
            finished = True
    except BaseException:
        try:  # record what is done, but never mask the original error
            write_summary()
        except Exception as exc:  # pragma: no cover
            warnings.warn(f"could not write summary.json after an error: {exc!r}")
        raise
    return write_summary()
