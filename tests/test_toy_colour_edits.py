"""toy.colour_edits: where a colour edit's mask lands and whether the shape word steers it. The counting
is checked on hand-built scenes and on stand-in pipelines whose masks are known (one that follows the
shape word, one that never does); the real pipeline runs it on a few cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from toy.colour_edits import diagnose, lands_on, main, nearer_other, summarise
from toy.world import EditCase, Obj, Scene, render

SCENE = Scene("white", None, (Obj("triangle", "pink", 0.3, 0.3, 0.35, 0.0),
                              Obj("circle", "red", 0.7, 0.7, 0.35, 0.0),
                              Obj("square", "blue", 0.3, 0.75, 0.3, 0.0)))


def _case(edit: str, target: int = 0) -> EditCase:
    masks = render(SCENE, 64)[1]
    return EditCase("x", 0, SCENE, "", edit, "main", masks[target], SCENE, target, "colour")


def test_lands_on_the_object_it_overlaps_best_or_none():
    masks = render(SCENE, 64)[1]
    assert lands_on(masks[1], masks)[0] == 1
    assert lands_on(masks[1] | masks[2], masks)[0] in (1, 2)
    assert lands_on(np.zeros_like(masks[0]), masks)[0] is None
    where, ious = lands_on(masks[2], masks)
    assert where == 2 and ious[2] == 1.0 and ious[0] == 0.0


def test_nearer_other_by_rgb_distance():
    # brown (120, 75, 35) is 110 from red, 216 from pink; magenta (225, 20, 200) is 133 from pink, 170 from red
    assert nearer_other(SCENE, 0, "brown")
    assert not nearer_other(SCENE, 0, "magenta")
    # orange (245, 140, 20) is 113 from red, 170 from pink: nearest the circle's own colour
    assert not nearer_other(SCENE, 1, "orange")


class _Stub:
    """A pipeline whose mask is a chosen object's visible mask: the object named by the text's shape word
    (follows=True) or always object `fixed`."""
    size = 64

    def __init__(self, follows: bool, fixed: int = 1):
        self.follows, self.fixed = follows, fixed
        self.masks = render(SCENE, 64)[1]

    def mask(self, image, text):
        shape = text.split()[-1]
        j = [o.shape for o in SCENE.objects].index(shape) if self.follows else self.fixed
        return type("Out", (), {"mask_latent": torch.from_numpy(self.masks[j])})()


def test_a_mask_that_follows_the_shape_word_is_counted_as_steered():
    s = summarise(diagnose(_Stub(follows=True), [_case("a brown triangle")]))
    assert s["colour_edits"] == 1 and s["misses"] == 0 and s["target_iou_below_0_1"] == 0
    assert s["swaps_from_hits"] == 2 and s["swaps_from_hits_moved_to_named"] == 2
    assert s["swaps_from_hits_unmoved"] == 0


def test_a_mask_the_shape_word_does_not_move_is_counted_as_a_miss_on_another_object():
    rows = diagnose(_Stub(follows=False, fixed=1), [_case("a brown triangle"), _case("an orange circle", 1)])
    s = summarise(rows)
    assert s["colour_edits"] == 2
    assert s["misses"] == 1 and s["misses_on_another_object"] == 1  # the triangle's edit lands on the circle
    assert s["target_iou_below_0_1"] == 1  # the objects do not overlap: IoU 0 with the triangle
    assert s["nearer_other_cases"] == 1 and s["misses_when_nearer_other"] == 1 and s["misses_otherwise"] == 0
    # the circle's edit was a hit; naming the triangle or the square leaves it on the circle
    assert s["swaps_from_hits"] == 2 and s["swaps_from_hits_moved_to_named"] == 0 and s["swaps_from_hits_unmoved"] == 2
    # the triangle's edit missed onto the circle; naming the square (not the circle) does not move it there
    assert s["swaps_from_misses"] == 1 and s["swaps_from_misses_moved_to_named"] == 0


def test_other_edits_are_skipped():
    shape_edit = EditCase("y", 0, SCENE, "", "a pink star", "main", render(SCENE, 64)[1][0], SCENE, 0, "shape")
    assert diagnose(_Stub(follows=True), [shape_edit]) == []


def test_runs_on_the_shipped_model(one_thread, capsys):
    assert main(["--n", "4"]) == 0  # case 0 of set a is a colour edit ("a red circle")
    out = capsys.readouterr().out
    assert "colour edits: " in out and "shape word swapped" in out


@pytest.mark.parametrize("argv, word", [(["--n", "0"], "--n 0"), (["--n", "2000000000"], "n=2000000000"),
                                        (["--model", "/nonexistent/toy"], "/nonexistent/toy")])
def test_bad_input_is_named_in_the_first_line(argv, word, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and word in err.splitlines()[0] and "Traceback" not in err
