import math
from collections import Counter

import numpy as np
import pytest
import torch

from toy.world import (BENCHMARK_OBJECT_SIZES, BENCHMARK_SEED, COLOURS, KINDS, SHAPES, TRAIN_OBJECT_SIZES,
                       TRAIN_SEED_LIMIT, Obj, Scene, benchmark_cases, caption, edit_cases, render,
                       scene_from_seed, training_batch)


@pytest.fixture(scope="module")
def bench():
    return benchmark_cases()


def test_scene_determinism():
    for seed in (0, 7, 123456):
        a, b = scene_from_seed(seed), scene_from_seed(seed)
        assert a == b
        ia, ma, ba = render(a)
        ib, mb, bb = render(b)
        assert np.array_equal(ia, ib) and np.array_equal(ba, bb)
        assert all(np.array_equal(x, y) for x, y in zip(ma, mb))
    assert scene_from_seed(0) != scene_from_seed(1)


def test_training_batch_determinism_and_format():
    x1, c1, m1 = training_batch(3, batch=4, size=64)
    x2, c2, m2 = training_batch(3, batch=4, size=64)
    assert torch.equal(x1, x2) and c1 == c2 and torch.equal(m1, m2)
    assert x1.shape == (4, 3, 64, 64) and x1.dtype == torch.float32
    assert x1.min() >= -1 and x1.max() <= 1
    assert m1.shape == (4, 4, 64, 64) and m1.dtype == torch.bool
    assert torch.equal(m1.sum(1), torch.ones(4, 64, 64, dtype=torch.long))  # a partition
    assert not torch.equal(x1, training_batch(4, batch=4, size=64)[0])


def test_training_seeds_below_limit():
    seeds = np.random.default_rng(5).integers(0, TRAIN_SEED_LIMIT, 1000)
    assert seeds.max() < TRAIN_SEED_LIMIT <= BENCHMARK_SEED


def one(obj, size=128, **kw):
    return render(Scene("grey", None, (obj,)), size, **kw)


def test_circle_area():
    for d in (0.2, 0.33, 0.5):
        _, (m,), _ = one(Obj("circle", "red", 0.5, 0.5, d, 0.0))
        r = d * 128 / 2
        assert abs(m.sum() / (math.pi * r * r) - 1) < 0.02


def test_square_area_exact():
    _, (m,), bg = one(Obj("square", "red", 0.5, 0.5, 0.25, 0.0))  # side 32 px, pixel-aligned
    assert m.sum() == 32 * 32
    assert m[48:80, 48:80].all() and bg.sum() == 128 * 128 - 32 * 32
    _, (m,), _ = one(Obj("square", "red", 0.5, 0.5, 0.25, 20.0))
    assert abs(m.sum() / 32 ** 2 - 1) < 0.02


def test_ring_area():
    _, (m,), _ = one(Obj("ring", "red", 0.5, 0.5, 0.5, 0.0))
    r = 32
    assert abs(m.sum() / (math.pi * r * r * (1 - 0.55 ** 2)) - 1) < 0.02


def test_all_shapes_render_inside_image():
    for s in SHAPES:
        img, (m,), _ = one(Obj(s, "red", 0.5, 0.5, 0.4, 10.0), size=64)
        assert 150 < m.sum() < 0.4 ** 2 * 64 ** 2 + 1
        pure = (img == COLOURS["red"]).all(-1)   # fully covered pixels
        assert not (pure & ~m).any() and pure.sum() > 0.5 * m.sum()


def test_occlusion_visible_masks():
    a = Obj("circle", "red", 0.4, 0.5, 0.4, 0.0)
    b = Obj("square", "blue", 0.625, 0.5, 0.25, 0.0)  # pixel-aligned edges
    _, (ma, mb), bg = render(Scene("grey", 0.7, (a, b)))
    _, (fa,), _ = one(a)
    _, (fb,), _ = one(b)
    assert np.array_equal(mb, fb)            # occluder fully visible
    assert not (ma & mb).any()               # occluded mask excludes occluder
    assert np.array_equal(ma, fa & ~fb)
    assert np.array_equal(bg, ~(ma | mb))


def test_random_scenes_masks_partition_and_captions():
    for seed in range(200):
        sc = scene_from_seed(seed)
        assert 1 <= len(sc.objects) <= 3
        assert len({o.shape for o in sc.objects}) == len(sc.objects)
        cols = [o.colour for o in sc.objects]
        assert len(set(cols)) == len(cols) and sc.background not in cols
        if seed < 40:
            _, masks, bg = render(sc, 64)
            total = bg.astype(int) + sum(m.astype(int) for m in masks)
            assert (total == 1).all()
            assert all(m.any() for m in masks)
        cap = caption(sc)
        for o in sc.objects:
            assert f"{o.colour} {o.shape}" in cap
        assert cap.endswith(f"{sc.background} background")


def test_caption_format():
    sc = Scene("orange", None, (Obj("circle", "red", .3, .3, .3, 0), Obj("square", "blue", .7, .7, .3, 0)))
    assert caption(sc) == "a red circle and a blue square on an orange background"


def test_benchmark_balanced_and_disjoint(bench):
    assert len(bench) == 240
    assert Counter(c.kind for c in bench) == {k: 80 for k in KINDS}
    assert all(c.seed >= TRAIN_SEED_LIMIT for c in bench)
    assert len({c.seed for c in bench}) == 240 and len({c.id for c in bench}) == 240


def test_seed_sets_are_disjoint_fixed_and_held_out(bench):
    b = benchmark_cases(240, seed_set="b")
    assert benchmark_cases(240, seed_set="a")[5].edit_text == bench[5].edit_text  # "a" is the default
    assert min(c.seed for c in b) > max(c.seed for c in bench) and all(c.seed >= TRAIN_SEED_LIMIT for c in b)
    assert not {c.seed for c in b} & {c.seed for c in bench}
    # different seeds could still draw the same scene: the sets share no scene either
    assert not {c.scene for c in b} & {c.scene for c in bench}
    assert Counter(c.kind for c in b) == {k: 80 for k in KINDS}
    assert [c.edit_text for c in benchmark_cases(6, seed_set="b")] == [c.edit_text for c in b[:6]]
    with pytest.raises(ValueError, match="'c'"):
        benchmark_cases(3, seed_set="c")


def test_benchmark_deterministic(bench):
    again = edit_cases(BENCHMARK_SEED, 6)
    for a, b in zip(again, bench[:6]):
        assert a.scene == b.scene and a.edit_text == b.edit_text
        assert np.array_equal(a.gt_mask, b.gt_mask)


def test_edit_cases_targets_and_masks(bench):
    for c in bench:
        _, masks, bg = render(c.scene)
        assert c.source_caption == caption(c.scene)
        if c.kind == "background":
            assert c.target is None and np.array_equal(c.gt_mask, bg)
            assert c.target_scene.objects == c.scene.objects
            assert c.target_scene.background != c.scene.background
            assert c.edit_text.endswith(f"{c.target_scene.background} background")
            continue
        objs, new = c.scene.objects, c.target_scene.objects
        t = c.target
        areas = [m.sum() for m in masks]
        assert (t == int(np.argmax(areas))) == (c.kind == "main")
        changed = [i for i in range(len(objs)) if objs[i] != new[i]]
        assert changed == [t] and c.target_scene.background == c.scene.background
        o, n = objs[t], new[t]
        assert c.edit_text.endswith(f"{n.colour} {n.shape}")
        assert (o.colour != n.colour) + (o.shape != n.shape) == 1   # one attribute changed
        # the kept attribute identifies the target uniquely in the source scene
        key = "shape" if c.attribute == "colour" else "colour"
        assert [getattr(p, key) for p in objs].count(getattr(o, key)) == 1
        # the new value does not collide with anything else in the scene
        assert getattr(n, c.attribute) not in [getattr(p, c.attribute) for p in objs]
        if c.attribute == "colour":
            assert n.colour != c.scene.background and np.array_equal(c.gt_mask, masks[t])
        else:
            assert np.array_equal(c.gt_mask, masks[t] | render(c.target_scene)[1][t])


def test_object_sizes_training_and_benchmark_ranges(bench):
    """Scenes draw object sizes uniformly from the given range; the benchmark's default is the range the bundled
    model was trained on, and a larger range (--object-sizes) keeps each case's shapes and colours."""
    lo, hi = TRAIN_OBJECT_SIZES
    assert lo <= BENCHMARK_OBJECT_SIZES[0] <= BENCHMARK_OBJECT_SIZES[1] <= hi
    train = [o.size for s in range(300) for o in scene_from_seed(s).objects]
    assert lo <= min(train) < lo + 0.02 and hi - 0.02 < max(train) <= hi
    sizes = [o.size for c in bench for o in c.scene.objects]
    assert BENCHMARK_OBJECT_SIZES[0] <= min(sizes) and max(sizes) <= BENCHMARK_OBJECT_SIZES[1]
    large = benchmark_cases(30, object_sizes=(0.35, 0.7))
    assert [tuple((o.shape, o.colour) for o in c.scene.objects) for c in large] == \
        [tuple((o.shape, o.colour) for o in c.scene.objects) for c in bench[:30]]
    large_sizes = [o.size for c in large for o in c.scene.objects]
    assert min(large_sizes) >= 0.35 and max(large_sizes) > hi
    fixed = benchmark_cases(6, object_sizes=(0.4, 0.4))
    assert {o.size for c in fixed for o in c.scene.objects} == {0.4}
    for bad in ((0.5, 0.3), (0.0, 0.3), (0.3, 1.2)):
        with pytest.raises(ValueError, match="object sizes"):
            benchmark_cases(3, object_sizes=bad)


def test_benchmark_command_rejects_bad_object_sizes(capsys):
    from toy.benchmark import main
    assert main(["--object-sizes", "0.6", "0.2", "--n", "3", "--no-methods", "--no-ablation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --object-sizes") and "0.6 0.2" in err and "\n" not in err


def test_large_objects_never_hide_a_named_object():
    """With objects up to 0.7 of the side, three of them often cannot all stay >= 70 % visible: the scene then
    has fewer objects (or, with a fixed count, the most visible draw), never an object hidden behind others."""
    from toy.world import _visible_fractions, sample_scene
    scenes = [scene_from_seed(s, object_sizes=(0.6, 0.7)) for s in range(40)]
    assert all(min(_visible_fractions(sc)) >= 0.7 for sc in scenes)
    fixed = sample_scene(np.random.default_rng(3), n_objects=3, object_sizes=(0.7, 0.7))
    assert len(fixed.objects) == 3 and min(_visible_fractions(fixed)) > 0
