"""toy/train.py: the edit phrases it grounds are edit texts of the benchmark's kind, and the script runs
end to end (a few steps) and writes folders that load through the SD loader."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toy import world
import torch

from model.unet import UNet2DConditionModel, UNetConfig
from toy.train import (BASE_UNET_CONFIG, SCHEDULER, UNET_CONFIG, MapRecorder, confusable_colour, diffusion_loss,
                       edit_phrase, edit_targets, grounding_losses, grow_unet, keep_cell_weights, ldm_init, main,
                       make_inpaint_mask)
from sampler.schedule import NoiseSchedule
from weights import load

ROOT = Path(__file__).resolve().parents[1]


def test_edit_phrase_changes_one_attribute_and_points_at_its_target():
    rng = np.random.default_rng(1)
    kinds = set()
    for seed in range(60):
        scene = world.scene_from_seed(seed)
        text, region, kept = edit_phrase(scene, rng)
        used = {o.colour for o in scene.objects} | {scene.background}
        words = text.split()[1:]  # drop the article
        if region == 0:
            assert words[1] == "background" and words[0] not in used and kept is None, text
            kinds.add("background")
            continue
        o = scene.objects[region - 1]
        colour, shape = words
        kept_colour, kept_shape = colour == o.colour, shape == o.shape
        assert kept_colour != kept_shape, (text, o)  # exactly one attribute changed
        assert kept == (o.shape if kept_shape else o.colour), (text, kept)
        if kept_shape:  # new colour, absent from the scene
            assert colour not in used, text
            kinds.add("colour")
        else:  # new shape, absent from the scene; the kept colour names only this object
            assert shape not in {p.shape for p in scene.objects}, text
            assert [p.colour for p in scene.objects].count(colour) == 1, text
            kinds.add("shape")
    assert kinds == {"background", "colour", "shape"}


def test_confusable_colour_looks_like_another_object():
    # red circle (the target) beside an orange square on white. Absent colours nearest orange (245, 140, 20)
    # by hand: yellow (240, 220, 40) at 82.6, then brown at 141, pink at 170; red is taken.
    scene = world.Scene("white", None, (world.Obj("circle", "red", 0.3, 0.5, 0.3, 0.0),
                                         world.Obj("square", "orange", 0.7, 0.5, 0.3, 0.0)))
    assert confusable_colour(scene, 0) == "yellow"
    # seen from the square, the other object is red (220, 30, 30): brown (120, 75, 35) at 110, then orange
    # at 113 (taken by the square itself) and grey at 166
    assert confusable_colour(scene, 1) == "brown"


def test_edit_phrase_with_confusable_colours_changes_only_colour_edits():
    seen = 0
    for seed in range(80):
        scene = world.scene_from_seed(seed)
        plain = edit_phrase(scene, np.random.default_rng(seed))
        hard = edit_phrase(scene, np.random.default_rng(seed), confusable=1.0)
        text, region, kept = hard
        colour_edit = region > 0 and kept == scene.objects[region - 1].shape
        if colour_edit and len(scene.objects) > 1:
            assert text.split()[1] == confusable_colour(scene, region - 1) and hard[1:] == plain[1:], (plain, hard)
            seen += 1
        else:  # shape, background and one-object edits: as without the option
            assert hard == plain
    assert seen >= 5


def test_edit_targets_ground_both_words_or_only_the_kept_one():
    words = [("a", [1]), ("brown", [2]), ("triangle", [3, 4])]  # "triangle" as two BPE pieces
    assert edit_targets(words, 2, "triangle") == [([2], 2), ([3, 4], 2)]
    assert edit_targets(words, 2, "triangle", "kept") == [([3, 4], 2)]
    bg = [("a", [1]), ("brown", [2]), ("background", [3])]  # a background edit has no kept word
    assert edit_targets(bg, 0, None, "kept") == edit_targets(bg, 0, None) == [([2], 0), ([3], 0)]


def test_grown_unet_starts_as_the_base_unet_with_maps_at_every_level(one_thread):
    torch.manual_seed(0)
    base = UNet2DConditionModel(UNetConfig(**BASE_UNET_CONFIG)).eval()
    for p in base.parameters():  # a "trained" base: no zero branches anywhere
        torch.nn.init.normal_(p, std=0.05)
    grown = UNet2DConditionModel(UNetConfig(**UNET_CONFIG)).eval()
    ldm_init(grown)
    grow_unet(grown, base)
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([10, 700]), torch.randn(2, 77, 64)
    rec = MapRecorder()
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx, recorder=rec), base(x, t, ctx), rtol=1e-4, atol=1e-5)
    # maps at latent/1, /2, /4 (8x8: down, mid and two up layers), as SD's 64/32/16 (+ mid at 8)
    assert {g: len(v) for g, v in rec.probs.items()} == {32: 3, 16: 3, 8: 4}
    with pytest.raises(ValueError, match="sub-network"):
        grow_unet(base, grown)


def test_training_script_runs_end_to_end(tmp_path, one_thread):
    main(["--out", str(tmp_path), "--vae-from", str(ROOT / "assets" / "toy-sd"), "--scenes", "64",
          "--unet-steps", "2", "--grow-steps", "2", "--inpaint-steps", "2", "--inpaint-examples", "32",
          "--check-scenes", "2"])
    sd = load(str(tmp_path / "toy-sd"))
    inpaint = load(str(tmp_path / "toy-sd-inpaint"), components=("unet",)).unet
    assert sd.unet.config.in_channels == 4 and inpaint.config.in_channels == 9
    assert sd.unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3
    assert inpaint.config.down_block_types == BASE_UNET_CONFIG["down_block_types"]  # started from the base
    log = json.loads((tmp_path / "toy-sd" / "training_log.json").read_text())
    assert log["phases"]["unet"]["steps"] == 2 and log["phases"]["unet"]["edit_phrases"] == pytest.approx(0.2)
    grow = log["phases"]["grow"]
    assert grow["steps"] == 2 and grow["text_encoder"] == "frozen" and grow["grounding_grids"] == [32, 16, 8]
    assert "colour_word_full_caption_32" in log["attention_localisation"]


def test_inpaint_resume_continues_the_given_unet(tmp_path, one_thread):
    """--inpaint-resume starts phase 3 from the given inpainting UNet (0 steps return it unchanged; the
    fresh start zero-initialises the mask channels instead) and records where it came from."""
    shipped = ROOT / "assets" / "toy-sd-inpaint"
    common = ["--vae-from", str(ROOT / "assets" / "toy-sd"), "--unet-from", str(ROOT / "assets" / "toy-sd"),
              "--scenes", "32", "--inpaint-examples", "32", "--check-scenes", "1"]
    # the shipped UNet is grown: it is not grown again, and holds no base UNet for a fresh phase 3
    with pytest.raises(SystemExit, match="holds a grown UNet already: pass --grow-steps 0, or --grow-resume"):
        main(["--out", str(tmp_path / "x"), "--inpaint-resume", str(shipped), *common])
    with pytest.raises(SystemExit, match="pass --inpaint-from or --inpaint-resume"):
        main(["--out", str(tmp_path / "x"), "--grow-steps", "0", *common])
    common += ["--grow-steps", "0"]
    main(["--out", str(tmp_path / "r0"), "--inpaint-resume", str(shipped), "--inpaint-steps", "0", *common])
    before = load(str(shipped), components=("unet",)).unet.state_dict()
    after = load(str(tmp_path / "r0" / "toy-sd-inpaint"), components=("unet",)).unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert before["conv_in.weight"][:, 4:].abs().sum() > 0  # not what a fresh start would give
    main(["--out", str(tmp_path / "r1"), "--inpaint-resume", str(shipped), "--inpaint-steps", "1", *common])
    moved = load(str(tmp_path / "r1" / "toy-sd-inpaint"), components=("unet",)).unet.state_dict()
    assert not torch.equal(moved["conv_in.weight"], before["conv_in.weight"])
    record = json.loads((tmp_path / "r1" / "toy-sd" / "training_log.json").read_text())["phases"]["inpaint"]
    assert record["resumed_from"] == str(shipped) and record["steps"] == 1
    shipped_log = json.loads((ROOT / "assets" / "toy-sd" / "training_log.json").read_text())
    assert record["earlier"] == shipped_log["phases"]["inpaint"]  # the shipped run's own record, carried over
    grow = json.loads((tmp_path / "r1" / "toy-sd" / "training_log.json").read_text())["phases"]["grow"]
    assert shipped_log["phases"]["grow"]["steps"] > 0  # the shipped UNet's own phase 2b
    assert grow == {"steps": 0, "reused_from": str(ROOT / "assets" / "toy-sd"), "record": shipped_log["phases"]["grow"]}


def test_grow_resume_continues_the_shipped_grown_unet(tmp_path, one_thread):
    """--grow-resume trains the grown UNet of --unet-from further (phase 2b, text encoder unchanged) and
    keeps the run it continued in the record; without --unet-from it is refused before any work."""
    shipped = ROOT / "assets" / "toy-sd"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--grow-resume", "--vae-from", str(shipped)])
    main(["--out", str(tmp_path / "g"), "--vae-from", str(shipped), "--unet-from", str(shipped), "--grow-resume",
          "--grow-steps", "1", "--inpaint-from", str(ROOT / "assets" / "toy-sd-inpaint"), "--scenes", "32",
          "--inpaint-examples", "32", "--check-scenes", "1"])
    before, after = (load(str(d), components=("unet", "text_encoder")) for d in (shipped, tmp_path / "g" / "toy-sd"))
    b, a = before.unet.state_dict(), after.unet.state_dict()
    assert b.keys() == a.keys() and any(not torch.equal(b[k], a[k]) for k in b)  # trained, same layout
    tb, ta = before.text_encoder.state_dict(), after.text_encoder.state_dict()
    assert all(torch.equal(tb[k], ta[k]) for k in tb)  # frozen: the inpainting UNet stays valid
    record = json.loads((tmp_path / "g" / "toy-sd" / "training_log.json").read_text())["phases"]["grow"]
    shipped_log = json.loads((shipped / "training_log.json").read_text())
    assert record["steps"] == 1 and record["initialised_from"] == "grown UNet"
    assert record["resumed_from"] == str(shipped) and record["earlier"] == shipped_log["phases"]["grow"]
    # the copied inpainting UNet's own training record comes along (from the folder beside it)
    inpaint = json.loads((tmp_path / "g" / "toy-sd" / "training_log.json").read_text())["phases"]["inpaint"]
    assert inpaint["reused_from"] == str(ROOT / "assets" / "toy-sd-inpaint")
    assert inpaint["record"]["inpaint"] == shipped_log["phases"]["inpaint"]


def test_bad_object_sizes_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--object-sizes", "0.5", "0.2"])
    assert "--object-sizes" in capsys.readouterr().err and not (tmp_path / "toy-sd").exists()


def test_inpaint_keep_weight_weights_the_cells_outside_the_mask():
    """--inpaint-keep-weight: the loss is a weighted mean over latent cells, W outside the mask and 1
    inside, against v = sqrt(abar) noise - sqrt(1 - abar) z0 computed here by hand (a UNet that
    predicts 0, so the loss is the weighted mean of v squared); weight 1 is the plain MSE."""
    acp = NoiseSchedule(SCHEDULER).alphas_cumprod
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.4).float()

    def zero_unet(x, t, ctx, recorder=None):
        return torch.zeros(x.shape[0], 4, *x.shape[2:])

    def loss(cell_weight):
        return diffusion_loss(zero_unet, z0, None, acp, torch.Generator().manual_seed(3), cell_weight=cell_weight)[0]

    g = torch.Generator().manual_seed(3)  # the draws diffusion_loss makes, in its order: timesteps, then noise
    t = torch.randint(0, len(acp), (3,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    a = acp[t].double().view(3, 1, 1, 1)
    v2 = (a.sqrt() * noise - (1 - a).sqrt() * z0).pow(2).mean(1, keepdim=True)  # per cell, over channels
    assert keep_cell_weights(mask, 1.0) is None  # SD's uniform loss
    assert float(loss(None)) == pytest.approx(float(v2.mean()), rel=1e-5)
    cells = keep_cell_weights(mask, 5.0)
    assert torch.equal(cells, torch.where(mask > 0, 1.0, 5.0))  # the kept cells (mask 0) weigh 5
    expected = float((v2 * cells).sum() / cells.sum())
    assert float(loss(cells)) == pytest.approx(expected, rel=1e-5)
    assert float(loss(cells)) != pytest.approx(float(v2.mean()), rel=1e-3)


def test_pixel_loss_per_word_is_one_bce_per_word():
    """The pixel grounding loss against a BCE written out here: by default one term per region, on the
    probability summed over the words naming it; per word, one term per word on its own probability
    (a word of two BPE tokens: their sum). Two layers, two heads, a 2x2 grid, 6 token positions."""
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(1, 2, 4, 6, generator=g), -1) for _ in range(2)]
    cov = torch.tensor([[[1.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.5, 1.0]]])  # background, object 1
    targets = [[([1], 1), ([2, 3], 1), ([4], 0)]]  # colour word, a two-token shape word, "background"
    a = (probs[0] + probs[1]).mean(1)[0] / 2  # (cells, tokens): mean over layers and heads

    def bce(p, c):
        p = p.clamp(1e-6, 1 - 1e-6)
        return float(-(c * p.log() + (1 - c) * (1 - p).log()).mean())

    summed = (bce(a[:, 1:4].sum(1), cov[0, 1]) + bce(a[:, 4], cov[0, 0])) / 2
    each = (bce(a[:, 1], cov[0, 1]) + bce(a[:, 2:4].sum(1), cov[0, 1]) + bce(a[:, 4], cov[0, 0])) / 3
    keep = torch.tensor([True])
    tok, pix = grounding_losses(probs, cov, targets, keep)
    tok_w, pix_w = grounding_losses(probs, cov, targets, keep, per_word=True)
    assert float(pix) == pytest.approx(summed, rel=1e-5)
    assert float(pix_w) == pytest.approx(each, rel=1e-5)
    assert summed != pytest.approx(each, rel=1e-3)
    assert float(tok_w) == float(tok)  # the token loss is per word either way


def test_background_masks_reach_into_the_objects_only_with_bg_dilate():
    """--inpaint-bg-dilate N: a background mask is the background grown by 0..N px (checked against a
    dilation by a square window written here), so it covers object edges; 0 gives the exact background
    on the latent grid."""
    scene = world.scene_from_seed(5)
    _, masks, _ = world.render(scene, 128)
    lab = np.zeros((128, 128), np.int8)
    for i, m in enumerate(masks):
        lab[m] = i + 1

    def on_grid(m):  # the latent-grid rule of make_inpaint_mask (a 4x4 block is masked when > half is)
        return m.reshape(32, 4, 32, 4).mean((1, 3)) > 0.5

    def grown(r):
        pad = np.pad(lab == 0, r)
        return np.any([pad[dy:dy + 128, dx:dx + 128] for dy in range(2 * r + 1) for dx in range(2 * r + 1)], 0)

    def background_masks(bg_dilate, seed):
        rng, out = np.random.default_rng(seed), []
        while len(out) < 12:
            lm, kind, _ = make_inpaint_mask(scene, lab, rng, bg_dilate)
            if kind == "background":
                out.append(lm.numpy())
        return out

    exact = on_grid(lab == 0)
    assert all(np.array_equal(m, exact) for m in background_masks(0, 0))
    dilated = background_masks(8, 0)
    allowed = [on_grid(grown(r)) for r in range(9)]
    assert all(any(np.array_equal(m, a) for a in allowed) for m in dilated)
    assert any(m.sum() > exact.sum() + 20 for m in dilated)  # object edges are masked


def test_bad_inpaint_keep_weight_is_refused_before_any_work(tmp_path, capsys):
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--inpaint-keep-weight", bad])
        assert "--inpaint-keep-weight" in capsys.readouterr().err and not (tmp_path / "toy-sd").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--inpaint-bg-dilate", "-1"])
    assert "--inpaint-bg-dilate" in capsys.readouterr().err and not (tmp_path / "toy-sd").exists()
