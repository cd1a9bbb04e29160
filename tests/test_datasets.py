"""List parser on the authors' dataset list files (when present beside the repository), malformed lines,
and the resumable runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import (
    EditItem,
    find_image,
    find_mask,
    load_list,
    parse_lines,
    parse_list,
    safe_id,
)
from evaluation.runner import run_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LISTS = SHARED / "reference" / "dataset-lists"
needs_lists = pytest.mark.skipif(
    not LISTS.is_dir(), reason=f"the authors' dataset list files are not at {LISTS}"
)


def _raw_lines(name):
    return (LISTS / name).read_text().splitlines()


# ----------------------------------------------------------------------------- shared lists
@needs_lists
def test_editing_mask_list():
    items = parse_list(LISTS / "Editing-Mask_list.txt")
    assert len(items) == 200
    raw = _raw_lines("Editing-Mask_list.txt")
    first = items[0]
    assert raw[0].split(" <> ")[0] == first.id == "1"
    assert first.image_file == (
        "An oil painting of a Shiba Inu dog wearing a cowboy hat and black leather jacket "
        "playing a guitar in a garden._2.jpg"
    )
    assert first.source_text == "Shiba Inu dog"
    assert first.edit_text == "a raccoon"  # no CR left from the CRLF file
    assert first.mask_file == Path(first.image_file).stem + ".png"
    assert first.line_no == 1
    assert sum(1 for it in items if it.caption is not None) == 100  # mixed formats
    last = items[-1]
    assert last.line_no == 200
    assert last.id == "ILSVRC2012_val_00040775"
    assert last.image_file == "ILSVRC2012_val_00040775.JPEG"
    assert (last.source_text, last.edit_text) == ("a tarantula", "a wolf spider")
    assert last.mask_file == "ILSVRC2012_val_00040775.png"
    # every parsed field is a substring of its raw line
    for it in items:
        line = raw[it.line_no - 1]
        assert it.edit_text.removeprefix("a ") in line if it.caption is None else it.edit_text in line
        assert not any(s != s.strip() for s in (it.id, it.image_file, it.source_text, it.edit_text))


@needs_lists
def test_imagenet_list():
    items = load_list("imagenet", LISTS)
    assert len(items) == 1092
    raw = _raw_lines("ImageNet_list.txt")
    assert raw[0] == "ILSVRC2012_val_00028602.JPEG <> beagle <> Afghan hound"
    it = items[0]
    assert (it.id, it.image_file, it.source_text, it.edit_text, it.mask_file, it.line_no) == (
        "ILSVRC2012_val_00028602",
        "ILSVRC2012_val_00028602.JPEG",
        "a beagle",
        "a Afghan hound",
        None,
        1,
    )
    for k in (0, 500, 1091):
        f, s, t = raw[k].split(" <> ")
        assert items[k].image_file == f and items[k].edit_text == f"a {t}" and items[k].source_text == f"a {s}"
        assert items[k].line_no == k + 1


@needs_lists
def test_imagen_list():
    items = load_list("imagen", LISTS)
    assert len(items) == 360
    assert [it.id for it in items] == [str(i) for i in range(1, 361)]
    raw = _raw_lines("Imagen_list.txt")
    for k in (0, 8, 359):
        i, cap, src, edit = raw[k].split(" <> ")
        it = items[k]
        assert (it.id, it.caption, it.source_text, it.edit_text) == (i, cap, src, edit)
        assert it.image_file == f"{cap}_2.jpg" and it.mask_file is None
    assert items[359].edit_text == "riding a bike"


# ----------------------------------------------------------------------------- parser edge cases
def test_blank_and_comment_lines_keep_line_numbers():
    items = parse_lines(["", "# note", "3 <> A cap. <> cap <> a dog  \r", "  ", "X.JPEG <> a <> b"], "f.txt")
    assert [(it.id, it.line_no) for it in items] == [("3", 3), ("X", 5)]
    assert items[0].edit_text == "a dog" and items[1].edit_text == "a b"


@pytest.mark.parametrize(
    "bad, match",
    [
        ("1 <> caption only", "expected 3 or 4 fields"),
        ("1 <> a <> b <> c <> d", "expected 3 or 4 fields"),
        ("1 <>  <> b <> c", "empty field"),
        ("not_an_image <> beagle <> hound", "image file name"),
        ("1 <> cap <> src<>x <> edit", "malformed separator"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, match):
    f = tmp_path / "list.txt"
    f.write_text("1 <> ok caption. <> ok <> a cat\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=match) as exc:
        parse_list(f)
    assert f"{f}:3:" in str(exc.value)


def test_duplicate_id(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("A.JPEG <> x <> y\r\nA.JPEG <> x <> z\r\n")
    with pytest.raises(ValueError, match=r"list.txt:2: duplicate id 'A' \(first on line 1\)"):
        parse_list(f)


def test_safe_id():
    assert safe_id("ILSVRC2012_val_00000001") == "ILSVRC2012_val_00000001"
    assert safe_id("a/b c") == "a_b_c"
    assert safe_id("..") == "_.."


def test_find_image_and_mask(tmp_path):
    (tmp_path / "img" / "ImageNet").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    it = parse_lines(["X_1.JPEG <> a <> b", "7 <> A cap. <> cap <> a dog"], "f", with_masks=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "img" / "ImageNet" / "X_1.JPEG", format="JPEG")
    assert find_image(it[0], tmp_path / "img") == tmp_path / "img" / "ImageNet" / "X_1.JPEG"
    assert find_image(it[1], tmp_path / "img") is None  # "A cap._2.jpg" missing
    assert find_image(it[0], tmp_path / "nope") is None
    Image.new("L", (4, 4)).save(tmp_path / "masks" / "A cap._2_mask.png")
    assert find_mask(it[1], tmp_path / "masks") == tmp_path / "masks" / "A cap._2_mask.png"
    assert find_mask(it[0], tmp_path / "masks") is None
    assert find_mask(it[1], None) is None


# ----------------------------------------------------------------------------- runner
def _fake_dataset(tmp_path, n=4, missing=("m",)):
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    lines = [f"{i} <> caption {i}. <> thing <> a dog" for i in range(n)]
    lines += [f"{m} <> caption {m}. <> thing <> a dog" for m in missing]
    items = parse_lines(lines, "fake.txt", with_masks=True)
    rng = np.random.default_rng(0)
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    for it in items[:n]:
        Image.fromarray(rng.integers(0, 205, (8, 8, 3), dtype=np.uint8)).save(img_dir / it.image_file.replace(".jpg", ".png"))
        Image.fromarray(gt).save(mask_dir / it.mask_file)
    return items, img_dir, mask_dir, gt > 0


class DummyEdit:
    """+51 inside the predicted mask (the top half of the 2:6 square), fails on call `fail_at`."""

    def __init__(self, fail_at=None):
        self.calls = []
        self.fail_at = fail_at

    def __call__(self, image, item):
        self.calls.append(item.id)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("simulated interruption")
        arr = np.asarray(image).copy()
        mask = np.zeros(arr.shape[:2], bool)
        mask[2:4, 2:6] = True
        arr[mask] += 51
        return Image.fromarray(arr), mask, 0.25


def test_runner_resumes_and_reports_missing(tmp_path):
    items, img_dir, mask_dir, gt = _fake_dataset(tmp_path)
    out = tmp_path / "run"
    inputs_before = {p: p.read_bytes() for p in list(img_dir.iterdir()) + list(mask_dir.iterdir())}

    edit1 = DummyEdit(fail_at=3)
    with pytest.raises(RuntimeError, match="simulated"):  # the missing item 'm' is last: not reached
        run_dataset(items, img_dir, out, edit1, mask_dir=mask_dir, image_size=None, method="Dummy")
    assert edit1.calls == ["0", "1", "2"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0", "1"]  # failed item left nothing
    partial = json.loads((out / "summary.json").read_text())
    assert partial["n_done"] == 2 and partial["interrupted"] and not partial["complete"]

    # an interruption mid-item: outputs present but no metrics.json -> not counted as done
    (out / "2").mkdir()
    (out / "2" / "edited.png").write_bytes(b"half-written")

    edit2 = DummyEdit()
    with pytest.warns(UserWarning, match="missing image for item 'm'"):
        summary = run_dataset(items, img_dir, out, edit2, mask_dir=mask_dir, image_size=None, method="Dummy")
    assert edit2.calls == ["2", "3"]  # items 0 and 1 were not recomputed
    assert summary["n_done"] == 4 and summary["n_computed"] == 2 and summary["n_skipped_done"] == 2
    assert summary["missing"] == ["m"] and summary["n_missing"] == 1 and summary["n_skipped"] == 1
    assert not summary["complete"] and not summary["interrupted"]
    # IoU: pred 8 px inside a 16 px gt -> 0.5; C_m: 8 of 16 px changed by 51 -> 0.1; C_non 0
    assert summary["iou"] == pytest.approx(0.5) and summary["n_iou"] == 4
    assert summary["c_m"] == pytest.approx(0.1) and summary["c_non"] == 0.0
    assert summary["rate"] is None  # inf is stored as null in strict JSON
    assert summary["seconds"] == pytest.approx(0.25) and summary["method"] == "Dummy"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_done"] == 4 and on_disk["missing"] == ["m"]

    for i in "0123":
        d = out / i
        assert (d / "edited.png").is_file() and (d / "mask.png").is_file() and (d / "metrics.json").is_file()
        assert (np.asarray(Image.open(d / "mask.png")) > 0).sum() == 8
    assert not list(out.rglob("*.tmp"))
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("id,seconds,iou,c_m,c_non,rate")
    assert [l.split(",")[0] for l in csv_lines[1:]] == ["0", "1", "2", "3"]

    # third run: everything done, nothing recomputed
    edit3 = DummyEdit()
    with pytest.warns(UserWarning, match="missing image"):
        summary = run_dataset(items, img_dir, out, edit3, mask_dir=mask_dir, image_size=None)
    assert edit3.calls == [] and summary["n_skipped_done"] == 4 and summary["method"] == "run"
    assert {p: p.read_bytes() for p in inputs_before} == inputs_before  # inputs untouched


def test_runner_resize_no_mask_and_record_errors(tmp_path):
    items, img_dir, _mask_dir, _ = _fake_dataset(tmp_path, n=3, missing=())

    def edit(image, item):
        if item.id == "1":
            raise ValueError("boom")
        assert image.size == (16, 16)  # input resized to image_size
        return image.resize((4, 4)), None, 1.0

    with pytest.warns(UserWarning, match="edit_fn failed on item '1'"):
        summary = run_dataset(items, img_dir, tmp_path / "out", edit, image_size=16, on_error="record")
    assert summary["n_done"] == 2 and summary["failed"][0]["id"] == "1" and summary["n_failed"] == 1
    assert summary["resized_outputs"] == 2
    assert summary["iou"] is None and summary["c_m"] is None and summary["n_gt_mask"] == 0
    assert not (tmp_path / "out" / "0" / "mask.png").exists()


def test_runner_refuses_to_write_into_inputs(tmp_path):
    items, img_dir, _mask_dir, _ = _fake_dataset(tmp_path, n=1, missing=())
    with pytest.raises(ValueError, match="out_dir must differ"):
        run_dataset(items, img_dir, img_dir, DummyEdit())


def test_edit_item_positional_fields():
    it = EditItem("1", "a.jpg", "src", "a dog", None, 3)
    assert it.caption is None and it.safe_id == "1"


def test_runner_keeps_the_figures_edit_fn_reports(tmp_path):
    """edit_fn may return a fourth element, a dict of its own per-item figures (the counted UNet evals)."""
    items, img_dir, mask_dir, _ = _fake_dataset(tmp_path, n=2, missing=())
    evals = iter([100, 300])

    def edit(image, item):
        return (*DummyEdit()(image, item), {"unet_evals": next(evals)})

    summary = run_dataset(items, img_dir, tmp_path / "run", edit, mask_dir=mask_dir, image_size=None)
    rows = [json.loads((tmp_path / "run" / i / "metrics.json").read_text()) for i in ("0", "1")]
    assert [r["unet_evals"] for r in rows] == [100, 300]
    assert summary["unet_evals"] == pytest.approx(200) and summary["n_unet_evals"] == 2
