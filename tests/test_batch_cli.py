"""The CLI on many images (files, folders, globs; models loaded once; one folder per image; a failing
image reported and the rest done), --replay of a run.json, and the figures it writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import instdiffedit
from instdiffedit import main
from tests.test_cli import BASIC, cli, files, picture  # noqa: F401  (cli is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for k in range(3):
        picture(seed=k).save(d / f"p{k}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_folder_glob_and_files_load_models_once(cli, folder, tmp_path, monkeypatch):
    loads = []
    real = instdiffedit.InstDiffEdit.from_pretrained.__func__
    monkeypatch.setattr(instdiffedit.InstDiffEdit, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
    rc, out, err = cli("--image", folder, "--edit", "a cat", "--out", tmp_path / "o")
    assert rc == 0, err
    assert len(loads) == 1 and files(tmp_path / "o") == {"p0", "p1", "p2"}
    assert all(files(tmp_path / "o" / f"p{k}") == BASIC for k in range(3))
    assert "3/3 images edited" in out
    # each image's edit is the one a single run gives
    rc, _, err = cli("--image", folder / "p1.png", "--edit", "a cat", "--out", tmp_path / "single")
    assert rc == 0, err
    a, b = (np.asarray(Image.open(p / "edited.png")) for p in (tmp_path / "o" / "p1", tmp_path / "single"))
    assert np.array_equal(a, b)
    rc, _, err = cli("--image", str(folder / "p[02].png"), folder / "p1.png", "--edit", "a cat", "--out",
                     tmp_path / "g")
    assert rc == 0, err
    assert files(tmp_path / "g") == {"p0", "p1", "p2"}


def test_a_failing_image_is_reported_and_the_rest_continue(cli, folder, tmp_path):
    (folder / "broken.png").write_bytes(b"not a png")
    rc, out, err = cli("--image", folder, "--edit", "a cat", "--out", tmp_path / "o")
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: {folder / 'broken.png'}: not a readable image")
    assert lines[-1].startswith(f"3/4 images edited into {tmp_path / 'o'}/, 1 failed (")
    assert files(tmp_path / "o") == {"p0", "p1", "p2"}
    rc, _, err = cli("--image", str(folder / "*.jpg"), "--edit", "a cat", "--out", tmp_path / "x")
    assert rc == 2 and err.startswith("error: ") and "matches no file" in err


def test_replay_reports_whether_outputs_match(cli, folder, tmp_path, capsys):
    rc, _, err = cli("--image", folder / "p0.png", "--edit", "a cat", "--out", tmp_path / "o", "--seed", 4)
    assert rc == 0, err
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["argv"][:2] == ["--model", rec["models"]["model"]["source"]] and rec["image_sha256"]
    assert set(rec["outputs_sha256"]) == {"edited.png", "mask.png", "soft_mask.png"}
    assert rec["models"]["model"]["revision"] is None and rec["model_sha256"]["model"]  # local: file hashes
    capsys.readouterr()
    assert main(["--replay", str(tmp_path / "o" / "run.json")]) == 0
    assert "outputs match" in capsys.readouterr().out
    rec["outputs_sha256"]["edited.png"] = "0" * 64  # as if the run had produced another image
    (tmp_path / "o" / "run.json").write_text(json.dumps(rec))
    assert main(["--replay", str(tmp_path / "o" / "run.json")]) == 1
    assert "outputs DIFFER (edited.png)" in capsys.readouterr().out
    picture(seed=9).save(folder / "p0.png")  # the input changed since
    main(["--replay", str(tmp_path / "o" / "run.json")])
    assert "has changed since the run" in capsys.readouterr().err


def test_figures_are_smooth_and_labelled():
    from evaluation.figures import attention_figure, mask_outline, smooth, steps_strip
    img = Image.new("RGB", (256, 256), (200, 200, 200))
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[2:6, 2:6] = True  # a square of 4 x 4 cells of 32 px
    nearest = np.kron(m.numpy(), np.ones((32, 32), bool))
    up = smooth(m.float(), img.size) > 0.5
    # nearest neighbour keeps the cells' square corner; the bicubic upsampling rounds it off
    assert nearest[66, 66] and not up[66, 66] and up[128, 128] and not up[10, 10]
    over = np.asarray(mask_outline(img, m))
    red = (over == (255, 48, 48)).all(axis=2)
    assert red[128, 60:70].any() and red[60:70, 128].any() and not red[128, 128]  # a band at the edge only
    fig = attention_figure(img, ["<sot>", "cat", "<eot>"], torch.rand(3, 8, 8), [0, 1, 0], cell=128)
    assert fig.size[0] > 4 * 128 and fig.size[1] > 128 + 20
    strip = steps_strip(img, [torch.rand(8, 8) for _ in range(12)], [m] * 12, cell=64, per_row=10)
    assert strip.size[0] > 10 * 64 and strip.size[1] > 2 * 64  # two rows of tiles
