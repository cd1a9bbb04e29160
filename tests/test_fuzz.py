"""Seeded fuzzing in CI (tests/fuzz.py): mutated images through load_image and mutated checkpoint folders
through the loader. Nothing but the project's own errors (EditError, WeightsError) may escape."""
from __future__ import annotations

import pytest

import images
from tests.fuzz import fuzz_checkpoints, fuzz_images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mutated_images_raise_only_edit_error(tmp_path):
    r = fuzz_images(300, seed=0, folder=tmp_path)
    assert r["foreign_kinds"] == {} and r.get("foreign", 0) == 0, r
    assert r["loaded"] >= 30 and r["refused"] >= 30, r  # the mutations span both outcomes


def test_the_image_fuzzer_reaches_the_steps_after_open(tmp_path, monkeypatch):
    """The guard matters: with only OSError caught (the decoders' usual class), the same 300 cases let
    foreign exceptions out, so the fuzzer reaches the steps where they are raised."""
    monkeypatch.setattr(images, "DECODE_ERRORS", (OSError,))
    r = fuzz_images(300, seed=0, folder=tmp_path)
    assert r.get("foreign", 0) > 0, r


def test_mutated_checkpoints_raise_only_weights_error(tmp_path):
    r = fuzz_checkpoints(150, seed=0, folder=tmp_path)
    assert r["foreign_kinds"] == {} and r.get("foreign", 0) == 0, r
    assert r["loaded"] >= 10 and r["refused"] >= 50, r
