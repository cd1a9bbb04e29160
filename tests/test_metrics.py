"""Metrics on hand-made masks / images with known answers, and the Table 1 report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from evaluation import report
from evaluation.metrics import (
    EditMetrics,
    MetricUnavailable,
    change_rates,
    clip_score,
    lpips_distance,
    mask_iou,
    optional_metrics,
    to_bool_mask,
)


# ----------------------------------------------------------------------------- IoU
def test_iou_one_third():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[:, 0:2] = True  # columns 0-1: 8 px
    gt[:, 1:3] = True  # columns 1-2: 8 px; overlap column 1 = 4 px; union 12
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)
    assert mask_iou(gt, pred) == pytest.approx(1 / 3)


def test_iou_identical_disjoint_and_empty():
    a = np.zeros((4, 4), bool)
    a[0, 0] = True
    b = np.zeros((4, 4), bool)
    b[3, 3] = True
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == 0.0
    empty = np.zeros((4, 4), bool)
    assert mask_iou(empty, empty) == 1.0  # documented: empty vs empty = perfect agreement
    assert math.isnan(mask_iou(empty, empty, empty=math.nan))
    assert mask_iou(empty, a) == 0.0


def test_iou_accepts_images_and_uint8():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 255  # 0/255 grey image
    pred01 = np.zeros((4, 4), np.int64)
    pred01[:1] = 1  # 0/1 integers
    assert mask_iou(pred01, gt) == pytest.approx(0.5)
    assert mask_iou(Image.fromarray(gt), gt) == 1.0
    rgb = np.repeat(gt[:, :, None], 3, axis=2)
    assert mask_iou(Image.fromarray(rgb), gt) == 1.0
    assert mask_iou(np.where(gt > 0, 0.9, 0.1), gt) == 1.0  # float map > 0.5


def test_iou_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_to_bool_mask_rules():
    assert to_bool_mask(np.array([[0, 127, 128, 255]], np.uint8)).tolist() == [[False, False, True, True]]
    assert to_bool_mask(np.array([[0, 1]], np.uint8)).tolist() == [[False, True]]
    assert to_bool_mask(np.array([[0.5, 0.51]])).tolist() == [[False, True]]


# ----------------------------------------------------------------------------- change rates
def _images():
    src = np.full((4, 4, 3), 100, np.uint8)
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True
    return src, gt


def test_change_rates_exact_51():
    src, gt = _images()
    edited = src.copy()
    edited[gt] += 51  # exactly 51 in every channel inside the mask, 0 outside
    c_m, c_non, rate = change_rates(edited, src, gt)
    assert c_m == pytest.approx(0.2)
    assert c_non == 0.0
    assert rate == math.inf  # documented guard: C_non == 0 < C_m


def test_change_rates_mean_over_channels_and_abs():
    src, gt = _images()
    edited = src.astype(np.int16)
    edited[gt, 0] -= 51  # one channel down by 51 inside: per-pixel change 51/255/3
    edited[~gt] += np.array([51, 0, 0], np.int16)  # outside: +51 in R only
    edited[0, 0] = [100 + 102, 100, 100]  # one outside pixel changes by 102 in R
    edited = edited.astype(np.uint8)
    c_m, c_non, rate = change_rates(Image.fromarray(edited), Image.fromarray(src), gt)
    assert c_m == pytest.approx(0.2 / 3)
    # 12 outside pixels: 11 x (0.2/3) + 1 x (0.4/3)
    assert c_non == pytest.approx((11 * 0.2 / 3 + 0.4 / 3) / 12)
    assert rate == pytest.approx(c_m / c_non)


def test_change_rates_guards():
    src, gt = _images()
    c_m, c_non, rate = change_rates(src, src, gt)
    assert (c_m, c_non) == (0.0, 0.0) and math.isnan(rate)
    c_m, c_non, rate = change_rates(src, src, np.zeros((4, 4), bool))  # empty mask
    assert math.isnan(c_m) and c_non == 0.0 and math.isnan(rate)
    edited = src + 51
    c_m, c_non, rate = change_rates(edited, src, np.ones((4, 4), bool))  # full mask
    assert c_m == pytest.approx(0.2) and math.isnan(c_non) and math.isnan(rate)


def test_change_rates_checks():
    src, gt = _images()
    with pytest.raises(ValueError, match="shape"):
        change_rates(src[:3], src, gt)
    with pytest.raises(ValueError, match="mask shape"):
        change_rates(src, src, gt[:3])
    with pytest.raises(TypeError, match="uint8"):
        change_rates(src.astype(np.float32), src, gt)


def test_edit_metrics_row_roundtrip():
    m = EditMetrics(id="7", seconds=1.5, iou=0.5, c_m=0.2, c_non=0.0, rate=math.inf, extra={"lpips": 0.3})
    row = m.to_row()
    assert row["rate"] is None  # non-finite -> None (strict JSON / CSV)
    assert row["lpips"] == 0.3 and row["seconds"] == 1.5
    json.dumps(row, allow_nan=False)
    back = EditMetrics.from_row(row)
    assert back.id == "7" and back.extra["lpips"] == 0.3 and back.c_m == 0.2


# ----------------------------------------------------------------------------- optional metrics
def test_optional_metrics_skip_cleanly():
    img = np.zeros((8, 8, 3), np.uint8)
    import importlib.util

    if importlib.util.find_spec("torchmetrics") is not None:
        pytest.skip("torchmetrics is installed here; the skip path is not reachable")
    with pytest.raises(MetricUnavailable, match="^skipped: .*torchmetrics"):
        lpips_distance(img, img)
    with pytest.raises(MetricUnavailable, match="^skipped: "):
        clip_score(img, "a cat", "/nonexistent/clip")
    out = optional_metrics(img, img, text="a cat")
    assert out["lpips"].startswith("skipped: ") and out["clip_score"].startswith("skipped: ")


# ----------------------------------------------------------------------------- report
def _summary(path, **kw):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(kw))
    return path


def test_report_two_runs(tmp_path, capsys):
    a = _summary(
        tmp_path / "instdiffedit_run",
        method="InstDiffEdit",
        seconds=10.8,
        iou=0.562,
        c_m=0.227,
        c_non=0.061,
        rate=0.227 / 0.061,
        n_done=200,
    )
    b = _summary(tmp_path / "diffedit", seconds=64.0, iou=None, c_m=0.195, c_non=0.08, rate=2.4375, n_done=3)
    out = tmp_path / "rep" / "table"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "rep" / "table.md").read_text()
    lines = [l for l in printed.splitlines() if l.startswith("|")]
    assert lines[0].split("|")[1:-1] == [
        " Method       ",
        " Time (s/edit) ",
        " IoU (%) ",
        " C_m (%) ",
        " C_non (%) ",
        " rate ",
        "   n ",
    ]
    cells = [[c.strip() for c in l.split("|")[1:-1]] for l in lines[2:]]
    assert cells == [
        ["InstDiffEdit", "10.8", "56.2", "22.7", "6.1", "3.72", "200"],
        ["diffedit", "64.0", "-", "19.5", "8.0", "2.44", "3"],  # name from the folder
    ]
    assert "\n".join(lines) in md
    csv_text = (tmp_path / "rep" / "table.csv").read_text().splitlines()
    assert csv_text[0] == "method,seconds,iou,c_m,c_non,rate,n"
    first = csv_text[1].split(",")
    assert first[0] == "InstDiffEdit" and float(first[2]) == pytest.approx(56.2)
    assert csv_text[2].split(",")[2] == ""  # missing IoU


def test_report_missing_summary(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no summary.json" in capsys.readouterr().err
