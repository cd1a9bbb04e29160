"""Dataset runs on toy scenes: config.json and refusal of other settings, --masks with any list, folder
errors, --shard, and a 2-process torchrun (gloo, CPU) whose merged result equals a single-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "toy", "--steps", "4", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from toy.world import benchmark_cases, render
    root = tmp_path_factory.mktemp("toydata")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    lines = []
    for c in benchmark_cases(4):
        name = f"scene{c.seed}.png"
        Image.fromarray(render(c.scene, 128)[0]).save(root / "images" / name)
        Image.fromarray(c.gt_mask.astype(np.uint8) * 255).save(root / "masks" / name)
        src = f"{c.scene.background} background" if c.target is None else \
            f"{c.scene.objects[c.target].colour} {c.scene.objects[c.target].shape}"
        lines.append(f"{name} <> {src} <> {c.edit_text.split(' ', 1)[1]}")  # ImageNet format: "a" + class
    (root / "toy_list.txt").write_text("\n".join(lines) + "\n")
    return root


def _run(data: Path, out: Path, *extra: str) -> int:
    from evaluation.run import main
    return main(["--list", str(data / "toy_list.txt"), "--images", str(data / "images"), "--masks",
                 str(data / "masks"), "--out", str(out), *ARGS, *extra])


def _items(out: Path) -> dict[str, tuple[bytes, dict]]:
    res = {}
    for mj in sorted(out.glob("*/metrics.json")):
        row = json.loads(mj.read_text())
        res[row["id"]] = ((mj.parent / "edited.png").read_bytes(),
                          {k: row.get(k) for k in ("iou", "c_m", "c_non", "unet_evals", "config_id")})
    return res


@pytest.fixture(scope="module")
def single(toy_data, tmp_path_factory):
    # one thread, as the torchrun ranks below (OMP_NUM_THREADS=1): float sums depend on the thread count,
    # and the comparison is byte for byte
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single") / "run"
        assert _run(toy_data, out) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_config_masks_and_refusing_other_settings(toy_data, single, capsys):
    cfg = json.loads((single / "config.json").read_text())
    ident = cfg["identity"]
    assert ident["method"] == "instdiffedit" and ident["options"]["steps"] == 4 and ident["options"]["seed"] == 0
    assert ident["models"]["model"]["source"] == "toy" and cfg["versions"]["torch"]
    summary = json.loads((single / "summary.json").read_text())
    # the list's name has no "Editing-Mask" in it, and --masks is still used: every item has an IoU
    assert summary["complete"] and summary["n_done"] == 4 and summary["n_iou"] == 4
    report = (single / "report.md").read_text()
    assert "## Settings" in report and "steps=4" in report and "incomplete" not in report
    capsys.readouterr()
    assert _run(toy_data, single, "--seed", "1") == 2  # resuming with another seed: refused
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "options.seed 0 -> 1" in err and "--force" in err
    assert json.loads((single / "config.json").read_text())["identity"]["options"]["seed"] == 0


def test_force_starts_over_and_the_report_flags_incomplete_runs(toy_data, tmp_path):
    out = tmp_path / "run"
    assert _run(toy_data, out, "--limit", "2") == 0  # two items at seed 0
    assert _run(toy_data, out, "--seed", "1", "--force", "--limit", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_done"] == 1 and not summary["complete"]  # seed-0 items no longer count
    assert "(incomplete: 1/4)" in (out / "report.md").read_text()


def test_missing_folders_are_errors(toy_data, tmp_path, capsys):
    from evaluation.run import main
    for flag in ("--images", "--masks"):
        args = {"--images": str(toy_data / "images"), "--masks": str(toy_data / "masks")}
        args[flag] = str(tmp_path / "nope")
        code = main(["--list", str(toy_data / "toy_list.txt"), "--out", str(tmp_path / "o"),
                     *[x for kv in args.items() for x in kv], *ARGS])
        assert code == 2 and f"error: {flag} {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


@pytest.mark.slow  # two model loads per torchrun rank plus two --shard runs: about 25 s
def test_shards_and_torchrun_equal_one_process(toy_data, single, tmp_path, one_thread):
    expected = _items(single)
    # two independent --shard processes (run one after the other here) into one folder
    sharded = tmp_path / "sharded"
    assert _run(toy_data, sharded, "--shard", "0/2") == 0
    assert json.loads((sharded / "summary.json").read_text())["n_done"] == 2
    assert _run(toy_data, sharded, "--shard", "1/2") == 0
    assert _items(sharded) == expected
    # torchrun, 2 CPU ranks (gloo), sharing one --out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "evaluation.run",
                        "--list", str(toy_data / "toy_list.txt"), "--images", str(toy_data / "images"),
                        "--masks", str(toy_data / "masks"), "--out", str(out), *ARGS],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _items(out) == expected  # same bytes and metrics, item by item
    summary, ref = json.loads((out / "summary.json").read_text()), json.loads((single / "summary.json").read_text())
    assert summary["complete"] and summary["n_done"] == 4 and summary["shard"] == "all 2 ranks"
    assert {k: summary[k] for k in ("iou", "c_m", "c_non", "rate")} == {k: ref[k] for k in ("iou", "c_m", "c_non", "rate")}
    assert not list(out.glob("*/.claim"))


@pytest.mark.slow  # a subprocess loads the toy model and edits until the signal: about 20-45 s
def test_sigterm_ends_with_one_line_and_a_consistent_summary(toy_data, tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "evaluation.run", "--list", str(toy_data / "toy_list.txt"),
                          "--images", str(toy_data / "images"), "--out", str(out), "--model", "toy",
                          "--steps", "12", "--device", "cpu", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.time() + 300
    while not list(out.glob("*/metrics.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert err.strip().splitlines() == ["terminated: summary.json counts what is done; rerun the same command "
                                        "to resume"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and not summary["complete"]
    assert summary["n_done"] == len(list(out.glob("*/metrics.json"))) >= 1
    assert not list(out.glob("*/.claim"))
