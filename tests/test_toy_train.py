"""toy/train.py: the edit phrases it grounds are edit texts of the benchmark's kind, and the script runs
end to end (a few steps) and writes folders that load through the SD loader."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toy import world
from toy.train import edit_phrase, main
from weights import load

ROOT = Path(__file__).resolve().parents[1]


def test_edit_phrase_changes_one_attribute_and_points_at_its_target():
    rng = np.random.default_rng(1)
    kinds = set()
    for seed in range(60):
        scene = world.scene_from_seed(seed)
        text, region = edit_phrase(scene, rng)
        used = {o.colour for o in scene.objects} | {scene.background}
        words = text.split()[1:]  # drop the article
        if region == 0:
            assert words[1] == "background" and words[0] not in used, text
            kinds.add("background")
            continue
        o = scene.objects[region - 1]
        colour, shape = words
        kept_colour, kept_shape = colour == o.colour, shape == o.shape
        assert kept_colour != kept_shape, (text, o)  # exactly one attribute changed
        if kept_shape:  # new colour, absent from the scene
            assert colour not in used, text
            kinds.add("colour")
        else:  # new shape, absent from the scene; the kept colour names only this object
            assert shape not in {p.shape for p in scene.objects}, text
            assert [p.colour for p in scene.objects].count(colour) == 1, text
            kinds.add("shape")
    assert kinds == {"background", "colour", "shape"}


def test_training_script_runs_end_to_end(tmp_path, one_thread):
    main(["--out", str(tmp_path), "--vae-from", str(ROOT / "assets" / "toy-sd"), "--scenes", "64",
          "--unet-steps", "2", "--inpaint-steps", "2", "--inpaint-examples", "32", "--check-scenes", "2"])
    sd = load(str(tmp_path / "toy-sd"))
    inpaint = load(str(tmp_path / "toy-sd-inpaint"), components=("unet",)).unet
    assert sd.unet.config.in_channels == 4 and inpaint.config.in_channels == 9
    log = json.loads((tmp_path / "toy-sd" / "training_log.json").read_text())
    assert log["phases"]["unet"]["steps"] == 2 and log["phases"]["unet"]["edit_phrases"] == pytest.approx(0.2)
