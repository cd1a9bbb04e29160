"""The wheel: built offline from the checkout, installed apart from it, its console script runs the bundled
toy model (package data) from a folder that has no checkout in sight."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_its_console_script_edits_with_the_toy_model(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(wheels), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("instdiffedit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("instdiffedit-")}
    # exactly what the README's "Installing" lists
    assert top == {"instdiffedit.py", "images.py", "provenance.py", "outset.py", "page.py", "model", "sampler", "mask",
                   "methods", "weights", "evaluation", "instdiffedit_assets"}
    assert "instdiffedit_assets/toy-sd/tokenizer/vocab.json" in names
    assert "instdiffedit_assets/toy-sd-inpaint/unet/diffusion_pytorch_model.safetensors" in names

    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    # only the installed copy is importable: the checkout is neither on the path nor the working folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = target / "bin" / "instdiffedit"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0 and "--tokenizer" in r.stdout, r.stderr[-2000:]
    where = subprocess.run([sys.executable, "-c", "import instdiffedit, weights.sources as s; "
                            "print(instdiffedit.__file__); print(s.assets_dir())"],
                           capture_output=True, text=True, cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where

    scene = target / "instdiffedit_assets" / "examples" / "scene.png"
    r = subprocess.run([str(script), "--image", str(scene), "--edit", "a blue circle", "--model", "toy",
                        "--steps", "10", "--out", "out", "--quiet"], capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((work / "out" / "run.json").read_text())
    assert run["model"] == "toy" and (work / "out" / "edited.png").stat().st_size > 0
    r = subprocess.run([str(target / "bin" / "instdiffedit-eval"), "--help"], capture_output=True, text=True,
                       cwd=work, env=env)
    assert r.returncode == 0 and "--list" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([str(target / "bin" / "instdiffedit-page"), "--help"], capture_output=True, text=True,
                       cwd=work, env=env)  # the page itself needs the `page` extra (Gradio): tests/test_page.py
    assert r.returncode == 0 and "--port" in r.stdout, r.stderr[-2000:]
