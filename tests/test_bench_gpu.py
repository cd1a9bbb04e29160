"""bench/gpu.py runs its whole code path on the CPU with the toy model's configs (--tiny), so the one GPU
run it is written for is never its first run. Nothing here asserts on speed."""
from __future__ import annotations

import json

import pytest

from bench import gpu

TIMED = ("stage1_s", "finish_s", "total_s")


def _run(tmp_path, *extra, steps: int = 4):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--steps", str(steps), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _check_edit_section(s: dict) -> None:
    assert s["n"] == 5 and len(s["all"]) == 5
    assert all(s[k] > 0 for k in TIMED) and s["total_s"] >= s["stage1_s"]


@pytest.mark.slow
def test_tiny_run_without_compilation(tmp_path, one_thread, capsys):
    r = _run(tmp_path, "--only", "unet_step,mask_share,ours_eager,authors,offload")
    assert r["device"] == "cpu" and r["mode"] == "tiny" and r["skipped"] == []
    S = r["sections"]
    for name in ("ours_eager", "authors", "offload"):
        _check_edit_section(S[name])
    for b in ("batch2", "batch6"):
        assert S["unet_step"][b]["ours_s"] > 0 and S["unet_step"][b]["ratio_ours_vs_diffusers"] > 0
    assert 0 < S["mask_share"]["share"] < 1
    printed = capsys.readouterr().out
    assert "authors' pipeline (diffusers)" in printed and "ours, eager float32" in printed


@pytest.mark.slow
def test_tiny_run_compiled_and_graphed(tmp_path, one_thread):
    """The compiled sections through dynamo with the 'eager' backend (inductor's CPU code generation
    would take minutes here; the GPU run uses inductor). 6 steps: 3 stage-1 steps, so that the graphs
    section's stand-in captures one step and replays another."""
    r = _run(tmp_path, "--only", "compiled,graphs", "--compile-backend", "eager", steps=6)
    assert r["skipped"] == []
    for name in ("compiled", "graphs"):
        _check_edit_section(r["sections"][name])


def test_budget_guard_skips_with_a_note(tmp_path, one_thread):
    r = _run(tmp_path, "--only", "ours_eager,authors", "--budget-s", "0.5")
    assert r["sections"] == {} or all(v is None for v in r["sections"].values())
    assert r["skipped"] and all("does not fit" in s or "budget spent" in s for s in r["skipped"])


def test_bad_arguments_are_one_line_errors(capsys):
    assert gpu.main(["--tiny", "--reps", "3"]) == 2
    assert gpu.main(["--tiny", "--only", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
