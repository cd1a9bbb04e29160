"""The shipped toy model (assets/toy-sd, assets/toy-sd-inpaint): it loads through the real SD code
path, and on a fixed subset of the held-out synthetic benchmark its InstDiffEdit masks stay above an
IoU floor and its whole edits above a C_m / C_non floor, so a regression in the model code, the
sampler, the mask code or the inpainting finish fails the build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instdiffedit import TOY_INPAINT_MODEL, TOY_MODEL, InstDiffEdit, main
from toy.benchmark import run_cases, summarise
from toy.world import benchmark_cases

# Measured on these 20 cases at the default settings with the shipped (grown, then hard-negative
# continued) UNet: IoU 0.591 (start-token map alone: 0.306); 0.589 before that continuation, and the base
# UNet it was grown from gave 0.585 (assets/TRAINING.md). The floor leaves margin for platform-dependent
# float rounding over 25 guided steps.
IOU_FLOOR = 0.45
SUBSET = 20
# Whole edits (mask + inpainting finish) on the first 12 cases: C_m / C_non measured 5.01 with the shipped
# models (4.30 before the UNet's hard-negative continuation, 3.79 before the inpainting UNet's
# continuation on background masks that reach into the objects, 3.97 before its keep-weighted one, 3.62
# with the base UNet; 240 cases: 3.84 [3.44, 4.30]), so a regression in the inpainting UNet, its
# conditioning or the finish shows up here. The floor sits 30 % under the shipped figure and under every
# shipped model's so far (the lowest: 3.62).
RATE_FLOOR = 3.5
RATE_SUBSET = 12


@pytest.fixture(scope="module")
def toy():
    return InstDiffEdit.from_pretrained(TOY_MODEL, TOY_INPAINT_MODEL, "cpu", torch.float32)


def test_shipped_weights_are_small_and_load_like_sd(toy):
    files = [f for d in (TOY_MODEL, TOY_INPAINT_MODEL) for f in Path(d).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    assert toy.inpaint_unet.config.in_channels == 9 and toy.size == 128
    assert toy.scheduler_config.prediction_type == "v_prediction"


def test_mask_iou_on_benchmark_subset(toy, one_thread):
    rows = run_cases(toy, benchmark_cases(SUBSET, size=toy.size), full=False)
    s = summarise(rows)
    assert s["iou"] >= IOU_FLOOR, s
    assert s["iou"] > s["iou_sot_only"], s  # Eq. 6-9 refine the start-token map


def test_edit_rate_on_benchmark_subset(toy, one_thread):
    s = summarise(run_cases(toy, benchmark_cases(RATE_SUBSET, size=toy.size)))
    assert s["rate"] >= RATE_FLOOR, s


def test_demo_command_writes_every_file(tmp_path, one_thread):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    assert main(["--image", str(root / "assets" / "examples" / "scene.png"), "--edit", "a yellow background",
                 "--model", "toy", "--out", str(out), "--save-attention", "--save-steps", "--quiet"]) == 0
    for name in ("edited.png", "mask.png", "soft_mask.png", "overlay.png", "attention.png", "steps.png", "run.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["words"] == ["<sot>", "a", "yellow", "background", "<eot>"]


def test_benchmark_gt_mask_row_gives_the_finish_the_exact_mask(toy, one_thread):
    cases = benchmark_cases(3, size=toy.size)
    rows = run_cases(toy, cases, gt_mask=True, steps=4)
    for case, row in zip(cases, rows):
        # the mask the finish used is the ground truth on the 4-pixel latent grid: only rims differ
        assert row["iou"] > 0.85, (case.id, row)
        assert row["c_m"] > 0 and row["c_non"] >= 0 and "iou_sot_only" not in row, row
