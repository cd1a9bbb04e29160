"""The command line (`instdiffedit.main`) end to end on the tiny random SD folders of tests/conftest.py:
outputs and run.json, options, every bad input of the spec (one-line error, non-zero exit, nothing
half-written, nothing overwritten), and the image modes the loader accepts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import images
import instdiffedit
import outset
from instdiffedit import OUTPUTS, main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
ALL = set(OUTPUTS)
BASIC = ALL - {"attention.png", "steps.png"}  # attention.png: --save-attention, steps.png: --save-steps


@pytest.fixture
def cli(tiny_sd, capsys):
    """cli(*args) -> (exit code, stdout, stderr); the tiny models, 4 steps, 2 rounds, quiet, on the CPU."""
    base = ["--model", str(tiny_sd.sd), "--inpaint-model", str(tiny_sd.inpaint), "--attention-res", "8",
            "--steps", "4", "--rounds", "2", "--device", "cpu", "--quiet"]

    def run(*args):
        capsys.readouterr()
        rc = main(base + [str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def picture(size=(24, 20), seed=0) -> Image.Image:
    """A smooth colour picture (a 4x4 random grid upsampled)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB").resize(size, Image.BILINEAR)


@pytest.fixture
def image(tmp_path) -> Path:
    p = tmp_path / "input.png"
    picture().save(p)
    return p


def files(folder: Path) -> set[str]:
    """The names a user sees (the output store, outset.STORE, holds the versions behind them)."""
    return {p.name for p in folder.iterdir() if p.name != outset.STORE} if folder.exists() else set()


def assert_error(rc, err, *fragments):
    """A one-line `error: ...` on stderr, non-zero exit, no traceback."""
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != outset.STORE}


# ---------------------------------------------------------------- 5. end to end

def test_writes_every_file_and_run_json(cli, tiny_sd, image, tmp_path):
    out = tmp_path / "out"
    rc, _stdout, err = cli("--image", image, "--edit", "a red ball", "--out", out, "--save-attention", "--save-steps",
                           "--seed", 9)
    assert rc == 0, err
    assert files(out) == ALL  # and no .partial-* folder left behind
    for name in ("edited.png", "mask.png", "soft_mask.png", "overlay.png"):
        with Image.open(out / name) as im:
            assert im.size == (24, 20), name
    with Image.open(out / "mask.png") as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) <= {0, 255}
    rec = json.loads((out / "run.json").read_text())
    assert rec["edit"] == "a red ball" and rec["image"] == str(image)
    assert rec["model"] == str(tiny_sd.sd) and rec["inpaint_model"] == str(tiny_sd.inpaint)
    assert rec["mask_file"] is None
    o = rec["options"]
    assert o["seed"] == 9 and o["steps"] == 4 and o["rounds"] == 2 and o["attention_res"] == 8
    assert o["threshold"] == 0.2 and o["strength"] == 0.5 and o["sampler"] == "lms" and o["inpaint"] is True
    assert rec["words"] == ["<sot>", "a", "red", "ball", "<eot>"] and len(rec["P"]) == 5
    assert all(isinstance(p, int) for p in rec["P"])
    assert {"python", "torch", "transformers", "pillow"} <= set(rec["versions"])
    t = rec["timings_s"]
    assert {"load", "mask_s", "finish_s", "total"} <= set(t) and t["total"] >= t["load"] >= 0
    assert rec["device"] == "cpu" and rec["dtype"] == "float32"


def test_no_inpaint(cli, image, tmp_path):
    out = tmp_path / "o"
    rc, _, err = cli("--image", image, "--edit", "a cat", "--out", out, "--no-inpaint")
    assert rc == 0, err
    assert files(out) == BASIC
    rec = json.loads((out / "run.json").read_text())
    assert rec["options"]["inpaint"] is False and rec["inpaint_model"] is None


def test_no_inpaint_does_not_need_an_inpainting_model(cli, image, tmp_path):
    rc, _, err = cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o", "--no-inpaint",
                     "--inpaint-model", tmp_path / "nowhere")
    assert rc == 0, err


@pytest.mark.parametrize("sampler", ["ddim", "lms"])
def test_sampler_steps_and_strength(cli, image, tmp_path, sampler):
    out = tmp_path / "o"
    rc, _, err = cli("--image", image, "--edit", "a cat", "--out", out, "--sampler", sampler, "--steps", 6,
                     "--strength", 0.34, "--threshold", 0.5, "--rounds", 1, "--attention", "last")
    assert rc == 0, err
    o = json.loads((out / "run.json").read_text())["options"]
    assert (o["sampler"], o["steps"], o["strength"], o["threshold"], o["rounds"], o["attention"]) == \
        (sampler, 6, 0.34, 0.5, 1, "last")


def test_user_mask_of_another_size_is_resized(cli, image, tmp_path):
    mask = np.zeros((50, 60), np.uint8)  # (H, W) for a 24x20 (W x H) image
    mask[25:, :] = 255
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    out = tmp_path / "o"
    rc, _, err = cli("--image", image, "--edit", "a cat", "--out", out, "--mask", tmp_path / "m.png",
                     "--save-attention")
    assert rc == 0, err
    assert files(out) == BASIC  # no attention maps without stage 1
    rec = json.loads((out / "run.json").read_text())
    assert rec["mask_file"] == str(tmp_path / "m.png") and rec["words"] == [] and rec["P"] == []
    with Image.open(out / "mask.png") as im:
        m = np.asarray(im)
    assert m.shape == (20, 24) and (m[:8] == 0).all() and (m[13:] == 255).all()


def test_user_mask_errors(cli, image, tmp_path):
    picture((24, 20), seed=3).save(tmp_path / "colour.png")
    out = tmp_path / "o"
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", out, "--mask", tmp_path / "colour.png")[::2],
                 "not a mask")
    Image.new("L", (24, 20), 0).save(tmp_path / "black.png")
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", out, "--mask", tmp_path / "black.png")[::2],
                 "empty")
    Image.new("L", (24, 20), 255).save(tmp_path / "white.png")
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", out, "--mask", tmp_path / "white.png",
                      "--no-inpaint")[::2], "--no-inpaint")
    assert not out.exists()


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--image" in text and "--attention-res" in text and "--overwrite" in text


@pytest.mark.parametrize("args", [["--bogus"], ["--steps", "many"], ["--threshold", "abc"], ["--sampler", "euler"],
                                  ["--attention-res", "x"], []])
def test_argparse_rejects(capsys, tmp_path, args):
    base = [] if not args else ["--image", str(tmp_path / "x.png"), "--edit", "a cat", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(base + args)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_subprocess_exit_code_and_no_traceback(tiny_sd, image, tmp_path):
    """A real process: an error found after the models are loaded (attention grid 3 does not divide the 8x8
    latent) gives exit 2 and one `error:` line, no traceback; an unknown flag, argparse's exit 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(REPO / "instdiffedit.py"), "--image", str(image), "--edit", "a cat",
           "--out", str(tmp_path / "o"), "--model", str(tiny_sd.sd), "--inpaint-model", str(tiny_sd.inpaint),
           "--steps", "4", "--rounds", "1", "--device", "cpu", "--quiet"]
    p = subprocess.run(cmd + ["--attention-res", "3"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "attention_res 3" in errors[0], p.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 6. bad inputs

def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG file declaring width x height: signature, IHDR, a short IDAT, IEND (a decompression bomb's
    header: PIL learns the size before any pixel is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images(cli, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    cases = {"garbage.png": "not a readable image", "empty.png": "empty file", "missing.png": "no such file",
             "bomb.png": "pixel limit"}
    for name, fragment in cases.items():
        assert_error(*cli("--image", tmp_path / name, "--edit", "a cat", "--out", out)[::2], name, fragment)
    (tmp_path / "dir.png").mkdir()
    assert_error(*cli("--image", tmp_path / "dir.png", "--edit", "a cat", "--out", out)[::2])
    assert not out.exists()


def test_pixel_limit(cli, image, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # load_image sets it: restore after
    monkeypatch.setattr(images, "MAX_PIXELS", 300)  # 24 x 20 = 480 pixels: over the limit
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o")[::2], "pixel limit")
    monkeypatch.setattr(images, "MAX_PIXELS", 400)  # between the limit and twice it: PIL only warns
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o")[::2], "pixel limit")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--edit", ""], "empty"), (["--edit", "  \t "], "empty"),
    (["--threshold", "-0.1"], "threshold"), (["--threshold", "1.01"], "threshold"),
    (["--strength", "0"], "strength"), (["--strength", "1.5"], "strength"), (["--strength", "-1"], "strength"),
    (["--rounds", "0"], "rounds"), (["--rounds", "-2"], "rounds"), (["--steps", "0"], "steps"),
    (["--steps", "3", "--strength", "0.2"], "no step"), (["--attention-res", "0"], "attention_res"),
])
def test_bad_options(cli, image, tmp_path, args, fragment):
    argv = ["--image", image, "--edit", "a cat", "--out", tmp_path / "o"] + args
    assert_error(*cli(*argv)[::2], fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,fragments", [
    (["--steps", "1001"], ["steps 1001", "1000 training timesteps"]),
    (["--attention-res", "2"], ["attention_res 2", "8x8, 4x4"]),  # divides the 8x8 latent, but no layer there
    (["--device", "meta"], ["meta", "only cpu, cuda and mps"]),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"], ["cuda"]),
    (["--device", "mps"], ["mps"]),
    (["--device", "tpu"], ["tpu"]),
    (["--edit", "a \udcff cat"], ["--edit", "not valid UTF-8"]),
    (["--method", "diffedit", "--source", "a \udcfe"], ["--source", "not valid UTF-8"]),
])
def test_model_dependent_and_environment_errors(cli, image, tmp_path, args, fragments):
    import torch
    if args[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    argv = ["--image", image, "--edit", "a cat", "--out", tmp_path / "o"] + args
    assert_error(*cli(*argv)[::2], *fragments)
    assert not (tmp_path / "o").exists()


def test_memory_estimate_refuses_before_allocating(cli, image, tmp_path, monkeypatch):
    monkeypatch.setattr(instdiffedit, "_free_memory", lambda device: 2 ** 20)  # 1 MiB free
    import methods.instdiffedit as method
    monkeypatch.setattr(method, "stage1", lambda *a, **k: pytest.fail("ran stage 1"))
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o", "--rounds", 64)[::2],
                 "needs at least", "UNet batch of 128", "GiB is free")
    assert not (tmp_path / "o").exists()


def test_memory_estimate_of_an_absurd_run(pipe):
    """A million rounds at SD v1.4's size would need terabytes: refused against the real free memory."""
    with pytest.raises(instdiffedit.EditError, match="needs at least"):
        pipe.check_memory(2 * 10 ** 9)


@pytest.mark.parametrize("guidance", ["-1e38", "3e38", "nan", "inf"])
def test_absurd_guidance_is_refused_before_running(cli, image, tmp_path, guidance):
    out = tmp_path / "o"
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", out, f"--guidance={guidance}")[::2], "guidance")
    assert not out.exists()


@pytest.mark.parametrize("method,stage", [("instdiffedit", "stage 1"), ("sdedit", "SDEdit denoising")])
def test_non_finite_stages_are_an_error_not_a_black_image(cli, image, tmp_path, monkeypatch, method, stage):
    """A UNet that overflows (here: its output times inf) stops the run at the end of the stage, naming it."""
    from model.unet import UNet2DConditionModel
    real = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, *a, **k: real(self, *a, **k) * float("inf"))
    out = tmp_path / "o"
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", out, "--method", method)[::2],
                 "produced NaN or inf", stage)
    assert not out.exists()


def test_non_finite_decoder_output_names_the_vae(cli, image, tmp_path, monkeypatch):
    from model.vae import AutoencoderKL
    real = AutoencoderKL.decode
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z: real(self, z) * float("nan"))
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o")[::2], "VAE decoder")


def test_out_of_memory_and_internal_errors_are_one_line(cli, image, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 17592186044416 bytes.")
    monkeypatch.setattr(instdiffedit.InstDiffEdit, "edit", oom)
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o")[::2], "out of memory",
                 "--rounds")

    def bug(*a, **k):
        return 1 / 0
    monkeypatch.setattr(instdiffedit.InstDiffEdit, "edit", bug)
    monkeypatch.delenv(instdiffedit.TRACEBACK_ENV, raising=False)
    rc, _, err = cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o")
    assert rc == 3
    assert_error(rc, err, "internal error", "ZeroDivisionError", instdiffedit.TRACEBACK_ENV)
    monkeypatch.setenv(instdiffedit.TRACEBACK_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        cli("--image", image, "--edit", "a cat", "--out", tmp_path / "o")


def test_edit_text_over_75_tokens_warns_and_succeeds(cli, image, tmp_path):
    edit = " ".join(["dog"] * 90)
    rc, _, err = cli("--image", image, "--edit", edit, "--out", tmp_path / "o")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "90 tokens" in lines[0], err
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["edit"] == edit and len(rec["words"]) == 75 + 2  # truncated to 75 words + SOT, EOT


def test_unwritable_output(cli, image, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "afile" / "sub")[::2], "not a folder")
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "afile")[::2], "not a folder")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into 0o500 folders: permissions cannot block it")
def test_read_only_output_folder(cli, image, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_error(*cli("--image", image, "--edit", "a cat", "--out", ro / "o")[::2], "not writable")
        assert_error(*cli("--image", image, "--edit", "a cat", "--out", ro)[::2], "not writable")
    finally:
        ro.chmod(0o700)
    assert files(ro) == set()


def test_not_writable_output_folder_is_refused_before_computing(cli, image, tmp_path, monkeypatch):
    """The permission check itself (the test above cannot run as root): an unwritable folder is refused up
    front, before the models are loaded."""
    real = os.access
    monkeypatch.setattr(instdiffedit.os, "access", lambda p, m: False if m == os.W_OK else real(p, m))
    monkeypatch.setattr(instdiffedit.InstDiffEdit, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "ro").mkdir()
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "ro")[::2], "not writable")
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "ro" / "a" / "b")[::2], "not writable")
    assert files(tmp_path / "ro") == set()


def test_failure_while_writing_leaves_nothing_half_written(cli, image, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert cli("--image", image, "--edit", "a cat", "--out", out)[0] == 0
    before = snapshot(out)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(instdiffedit.json, "dumps", disk_full)  # run.json fails after the PNGs are written
    assert_error(*cli("--image", image, "--edit", "a dog", "--out", out, "--overwrite", "--seed", 5)[::2],
                 "No space left")
    assert snapshot(out) == before  # the earlier results, untouched; no partial files, no .partial-* folder
    out2 = tmp_path / "fresh"
    assert_error(*cli("--image", image, "--edit", "a dog", "--out", out2)[::2], "No space left")
    assert files(out2) == set()


def test_earlier_results_are_kept_without_overwrite(cli, image, tmp_path):
    out = tmp_path / "o"
    assert cli("--image", image, "--edit", "a cat", "--out", out, "--save-attention")[0] == 0
    before = snapshot(out)
    assert_error(*cli("--image", image, "--edit", "a dog", "--out", out, "--seed", 3)[::2], "exists", "--overwrite")
    assert snapshot(out) == before
    # a single earlier output is enough to refuse
    for name in sorted(before):
        if name != "run.json":
            (out / name).unlink()
    assert_error(*cli("--image", image, "--edit", "a dog", "--out", out)[::2], "run.json", "exists")
    # --overwrite replaces them, and leaves no stale output of the earlier run behind
    assert cli("--image", image, "--edit", "a dog", "--out", out, "--seed", 3, "--overwrite")[0] == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["edit"] == "a dog" and rec["options"]["seed"] == 3
    assert files(out) == BASIC


def test_stale_outputs_are_removed_on_overwrite(cli, image, tmp_path):
    out = tmp_path / "o"
    assert cli("--image", image, "--edit", "a cat", "--out", out, "--save-attention", "--save-steps")[0] == 0
    assert files(out) == ALL
    assert cli("--image", image, "--edit", "a dog", "--out", out, "--overwrite")[0] == 0
    assert files(out) == BASIC  # the old attention.png and steps.png belonged to "a cat"


def test_input_is_never_overwritten(cli, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    inp = d / "edited.png"
    picture().save(inp)
    data = inp.read_bytes()
    assert_error(*cli("--image", inp, "--edit", "a cat", "--out", d)[::2], "exists")
    assert_error(*cli("--image", inp, "--edit", "a cat", "--out", d, "--overwrite")[::2], "input would be overwritten")
    # the same folder reached through another path
    assert_error(*cli("--image", inp, "--edit", "a cat", "--out", d / ".." / "d", "--overwrite")[::2], "input")
    assert inp.read_bytes() == data and files(d) == {"edited.png"}
    # an input that only shares the folder is fine
    e = tmp_path / "e"
    e.mkdir()
    picture().save(e / "photo.png")
    data = (e / "photo.png").read_bytes()
    rc, _, err = cli("--image", e / "photo.png", "--edit", "a cat", "--out", e)
    assert rc == 0, err
    assert (e / "photo.png").read_bytes() == data and files(e) == BASIC | {"photo.png"}


def test_inputs_are_never_written(cli, tmp_path):
    """Not a --mask that is an earlier output inside --out, not through a symlink, not a hard link."""
    out = tmp_path / "o"
    Image.new("L", (24, 20), 255).save(tmp_path / "white.png")
    picture().save(tmp_path / "in.png")
    assert cli("--image", tmp_path / "in.png", "--edit", "a cat", "--out", out)[0] == 0
    before = snapshot(out)
    # the previous run's mask.png as --mask, reached directly and through a symlink elsewhere
    (tmp_path / "link.png").symlink_to(out / "mask.png")
    for mask in (out / "mask.png", tmp_path / "link.png"):
        assert_error(*cli("--image", tmp_path / "in.png", "--edit", "a cat", "--out", out, "--overwrite",
                          "--mask", mask)[::2], str(mask), "input would be overwritten")
    # an input hard-linked to an output name
    d = tmp_path / "d"
    d.mkdir()
    os.link(tmp_path / "in.png", d / "soft_mask.png")
    assert_error(*cli("--image", tmp_path / "in.png", "--edit", "a cat", "--out", d, "--overwrite")[::2],
                 "input would be overwritten")
    # a file of the output store itself
    store_file = out / outset.STORE / outset.CURRENT / "edited.png"
    assert_error(*cli("--image", store_file, "--edit", "a cat", "--out", out, "--overwrite")[::2], "input")
    assert snapshot(out) == before and files(d) == {"soft_mask.png"}


def test_output_name_that_is_a_symlink_loop(cli, image, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    os.symlink("edited.png", out / "edited.png")  # points at itself
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", out, "--overwrite")[::2], "edited.png",
                 "symlink loop")
    os.symlink("loop2", tmp_path / "loop2")
    assert_error(*cli("--image", image, "--edit", "a cat", "--out", tmp_path / "loop2")[::2], "symlink loop")


def test_outputs_switch_as_one_set(cli, image, tmp_path):
    """The outputs are links into the store's current version; the user's other files stay."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli("--image", image, "--edit", "a cat", "--out", out, "--save-attention", "--save-steps")[0] == 0
    assert all(os.path.islink(out / n) for n in ALL) and outset.current_names(out) == ALL
    assert cli("--image", image, "--edit", "a dog", "--out", out, "--overwrite")[0] == 0
    assert files(out) == BASIC | {"notes.txt"} and outset.current_names(out) == BASIC
    assert len(os.listdir(out / outset.STORE)) == 2  # current and its one version folder


# ---------------------------------------------------------------- input image modes

def _save_mode(tmp_path: Path, mode: str) -> tuple[Path, tuple[int, int]]:
    """An input of `mode` (as PIL opens it back) and its expected output size."""
    rgb = picture((24, 20), seed=1)
    p = tmp_path / f"in_{mode.replace(';', '_')}.png"
    if mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize((24, 20)))
    elif mode == "LA":
        im = rgb.convert("LA")
    elif mode == "P":
        im = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    elif mode == "L":
        im = rgb.convert("L")
    elif mode == "I;16":
        a = np.tile(np.linspace(0, 65535, 24, dtype=np.uint16), (20, 1))
        im = Image.fromarray(a)
    elif mode == "EXIF6":
        p = tmp_path / "in_exif.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        picture((30, 20), seed=2).save(p, exif=exif, quality=95)
        return p, (20, 30)
    elif mode == "tall":
        im = picture((13, 37), seed=4)
    else:  # "wide"
        im = picture((50, 9), seed=5)
    im.save(p)
    return p, im.size


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "EXIF6", "tall", "wide"])
def test_input_modes_and_sizes(cli, tmp_path, mode):
    p, size = _save_mode(tmp_path, mode)
    if mode in ("RGBA", "LA", "P", "L", "I;16"):
        with Image.open(p) as im:
            assert im.mode.startswith(mode.split(";")[0]), im.mode
    out = tmp_path / "o"
    rc, _, err = cli("--image", p, "--edit", "a cat", "--out", out)
    assert rc == 0, err
    for name in ("edited.png", "mask.png", "soft_mask.png", "overlay.png"):
        with Image.open(out / name) as im:
            assert im.size == size, (name, im.size, size)


def test_load_image_modes(tmp_path):
    """What the loader makes of them: RGB, alpha on white, 16-bit rescaled (not clipped), EXIF applied."""
    p, _ = _save_mode(tmp_path, "I;16")
    a = np.asarray(images.load_image(p))
    assert a.shape == (20, 24, 3) and a[:, 0].max() <= 1 and a[:, -1].min() >= 254 and 120 < a[0, 12, 0] < 140
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.save(tmp_path / "clear.png")
    assert np.asarray(images.load_image(tmp_path / "clear.png")).min() == 255  # transparent -> white
    p, size = _save_mode(tmp_path, "EXIF6")
    assert images.load_image(p).size == size == (20, 30)
    for mode in ("LA", "P", "L"):
        p, size = _save_mode(tmp_path, mode)
        img = images.load_image(p)
        assert img.mode == "RGB" and img.size == size


def test_same_seed_same_files(cli, image, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert cli("--image", image, "--edit", "a cat", "--out", tmp_path / name, "--seed", seed)[0] == 0
        runs[name] = {n: (tmp_path / name / n).read_bytes() for n in ("edited.png", "mask.png", "soft_mask.png")}
    assert runs["a"] == runs["b"]
    assert runs["a"]["edited.png"] != runs["c"]["edited.png"]


# ---------------------------------------------------------------- device-level flags (On a GPU)

def test_device_flags_in_run_json_and_their_errors(cli, image, tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli("--image", image, "--edit", "a red ball", "--out", out, "--offload", "--channels-last")
    assert rc == 0, err
    rec = json.loads((out / "run.json").read_text())
    assert rec["offload"] is True and rec["channels_last"] is True and rec["cuda_graphs"] is False
    assert rec["vae_fp32_decodes"] == 0
    rc, _, err = cli("--image", image, "--edit", "a red ball", "--out", tmp_path / "o2", "--cuda-graphs")
    assert_error(rc, err, "--cuda-graphs needs a CUDA device")
    assert not (tmp_path / "o2").exists()
