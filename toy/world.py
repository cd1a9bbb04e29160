"""Deterministic synthetic scenes with exact per-object masks, captions and edit cases.

Geometry is resolution independent: centres and sizes are fractions of the image side,
so a Scene renders at any size.  Rendering supersamples each pixel on an ss x ss grid
(sample points never lie on pixel edges); the image is the average colour, and an
object's mask is "more than half of the pixel's samples show this object" -- i.e. the
thresholded coverage of its VISIBLE part (later objects occlude earlier ones).  Object
masks are therefore pairwise disjoint and background_mask is exactly their complement.

Seeds: a scene is `sample_scene(np.random.default_rng(scene_seed))`.  Training scene
seeds are drawn in [0, TRAIN_SEED_LIMIT); benchmark cases of seed set "a" use seeds
BENCHMARK_SEED + i (>= TRAIN_SEED_LIMIT), so the two never share a scene seed.  Seed set "b"
(BENCHMARK_SEED_SETS["b"] + i) is a second fixed held-out set, disjoint from "a", for checking
that benchmark figures hold out of sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

COLOURS = {  # name -> RGB.  chartreuse / turquoise / magenta are the rare-word candidates
    "red": (220, 30, 30), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (120, 50, 170), "orange": (245, 140, 20),
    "white": (245, 245, 245), "black": (20, 20, 20), "pink": (250, 150, 190),
    "grey": (128, 128, 128), "brown": (120, 75, 35), "turquoise": (50, 215, 200),
    "magenta": (225, 20, 200), "chartreuse": (160, 235, 0),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "hexagon", "diamond",
          "crescent", "trapezoid")
KINDS = ("main", "secondary", "background")
TRAIN_SEED_LIMIT = 10**9      # training scene seeds are < this
BENCHMARK_SEED_SETS = {"a": 2 * 10**9, "b": 3 * 10**9}  # seed set -> seed of its case 0 (case i: + i)
BENCHMARK_SEED = BENCHMARK_SEED_SETS["a"]  # the fixed set every figure is tuned and reported on
MAX_OBJECTS = 3
# Object sizes (full extent, fraction of the image side) are drawn uniformly from a range: the one the bundled
# model was trained on, for training scenes and benchmark cases alike. --object-sizes changes the benchmark's
# (README, "Object scale": 0.35-0.7 puts the edited objects at the scale of real datasets' objects).
TRAIN_OBJECT_SIZES = (0.2, 0.5)
BENCHMARK_OBJECT_SIZES = TRAIN_OBJECT_SIZES


def _ngon(n, r=1.0, phase=90.0):
    a = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_STAR = _ngon(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None]
_POLYGONS = {  # local coords: u right, v up, shape fits in [-1, 1]^2 (square fills it)
    "triangle": _ngon(3) - [0.0, 0.25], "star": _STAR, "hexagon": _ngon(6, phase=0.0),
    "diamond": np.array([[0, 1], [0.7, 0], [0, -1], [-0.7, 0]], float),
    "trapezoid": np.array([[-1, -0.6], [1, -0.6], [0.5, 0.6], [-0.5, 0.6]], float),
}


def _in_polygon(u, v, poly):
    """Even-odd rule, vectorised over points (works for the concave star)."""
    inside = np.zeros(u.shape, bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, 0)):
        if y0 == y1:
            continue
        crosses = (v < y0) != (v < y1)
        xint = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < xint)
    return inside


def _inside(shape, u, v):
    d2 = u * u + v * v
    if shape == "circle":
        return d2 <= 1.0
    if shape == "ring":
        return (d2 <= 1.0) & (d2 >= 0.55 ** 2)
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "crescent":
        return (d2 <= 1.0) & ((u - 0.45) ** 2 + (v - 0.1) ** 2 > 0.8 ** 2)
    return _in_polygon(u, v, _POLYGONS[shape])


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float      # centre, fraction of width (x right)
    cy: float      # centre, fraction of height (y down)
    size: float    # full extent (diameter / square side), fraction of image side
    angle: float   # degrees, counter-clockwise


@dataclass(frozen=True)
class Scene:
    background: str
    ground: float | None    # horizon height (fraction from top); below it a darker shade
    objects: tuple[Obj, ...]


def sample_scene(rng, n_objects=None, min_objects=1, object_sizes=TRAIN_OBJECT_SIZES):
    """One to three objects with distinct shapes and distinct colours (both differ from
    the background), sizes uniform in object_sizes (fractions of the side; 20-50 % by default),
    allowed to overlap partially."""
    lo, hi = check_object_sizes(object_sizes)
    n = int(rng.integers(min_objects, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    ground = float(rng.uniform(0.55, 0.8)) if rng.random() < 0.4 else None
    cols = rng.permutation([c for c in names if c != bg])[:n]
    shapes = rng.permutation(SHAPES)[:n]
    # rejection: every object keeps >= 70% of its area visible. Large objects may not fit: after 50 tries
    # the scene drops its last object (down to min_objects; never when n_objects is fixed), and if nothing
    # fits it keeps the most visible draw, so no object named in a caption is hidden behind the others.
    best = None
    fewest = n if n_objects is not None else min_objects  # n >= min_objects when it is drawn
    for k in range(n, fewest - 1, -1):
        for _ in range(50):
            objs = []
            for shape, col in zip(shapes[:k], cols[:k]):
                size = float(rng.uniform(lo, hi))
                cx, cy = rng.uniform(0.55 * size, 1 - 0.55 * size, 2)
                angle = 0.0 if shape in ("circle", "ring") else float(rng.uniform(-15, 15))
                objs.append(Obj(str(shape), str(col), float(cx), float(cy), size, angle))
            scene = Scene(bg, ground, tuple(objs))
            visible = min(_visible_fractions(scene))
            if visible >= 0.7:
                return scene
            if best is None or visible > best[0]:
                best = (visible, scene)
    return best[1]


def _visible_fractions(scene, size=32):
    lab = label_map(scene, size, 1)
    return [(lab == i + 1).sum() / max(label_map(replace(scene, objects=(o,)), size, 1).sum(), 1)
            for i, o in enumerate(scene.objects)]


def scene_from_seed(seed, **kw):
    return sample_scene(np.random.default_rng(seed), **kw)


def label_map(scene, size=128, ss=4):
    """(size*ss)^2 int8 map of sample points: 0 = background, i+1 = object i (on top)."""
    S = size * ss
    lab = np.zeros((S, S), np.int8)
    for i, o in enumerate(scene.objects):
        r, ext = o.size * S / 2, o.size * S / 2 * math.sqrt(2) + 1
        cx, cy = o.cx * S, o.cy * S
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, S)
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, S)
        if x0 >= x1 or y0 >= y1:
            continue
        x = (np.arange(x0, x1) + 0.5 - cx) / r
        y = (np.arange(y0, y1) + 0.5 - cy) / r
        c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
        X, Y = x[None, :], -y[:, None]             # v axis points up
        u, v = c * X + s * Y, -s * X + c * Y        # rotate by -angle into local frame
        lab[y0:y1, x0:x1][_inside(o.shape, u, v)] = i + 1
    return lab


def render(scene, size=128, ss=4):
    """-> (image uint8 HxWx3, [visible bool HxW mask per object], background bool HxW)."""
    lab = label_map(scene, size, ss)
    S = size * ss
    bg = np.array(COLOURS[scene.background], np.float32)
    pal = np.array([bg] + [COLOURS[o.colour] for o in scene.objects], np.float32)
    img = pal[lab]
    if scene.ground is not None:
        gy = int(round(scene.ground * S))
        ground_col = 0.7 * bg + 0.3 * np.float32(60.0)
        img[gy:][lab[gy:] == 0] = ground_col
    img = img.reshape(size, ss, size, ss, 3).mean((1, 3))
    half = ss * ss / 2
    blocks = lab.reshape(size, ss, size, ss)
    masks = [(blocks == i + 1).sum((1, 3)) > half for i in range(len(scene.objects))]
    background = ~np.logical_or.reduce(masks) if masks else np.ones((size, size), bool)
    return np.round(img).astype(np.uint8), masks, background


def caption(scene):
    parts = [_a(f"{o.colour} {o.shape}") for o in scene.objects]
    objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{objs} on {_a(scene.background)} background"


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def training_batch(seed, batch=16, size=128, ss=2):
    """-> (images float (B,3,H,W) in [-1,1], captions, masks bool (B,1+MAX_OBJECTS,H,W)).
    masks[:, 0] is the background, masks[:, 1+i] object i (all False if absent)."""
    scene_seeds = np.random.default_rng(seed).integers(0, TRAIN_SEED_LIMIT, batch)
    imgs = np.zeros((batch, size, size, 3), np.uint8)
    masks = np.zeros((batch, 1 + MAX_OBJECTS, size, size), bool)
    caps = []
    for b, s in enumerate(scene_seeds):
        scene = scene_from_seed(int(s))
        imgs[b], obj_masks, masks[b, 0] = render(scene, size, ss)
        for i, m in enumerate(obj_masks):
            masks[b, 1 + i] = m
        caps.append(caption(scene))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, caps, torch.from_numpy(masks)


@dataclass
class EditCase:
    id: str
    seed: int
    scene: Scene
    source_caption: str
    edit_text: str           # the only prompt used for the edit
    kind: str                # "main" | "secondary" | "background"
    gt_mask: np.ndarray      # bool HxW, region that must change
    target_scene: Scene      # scene after the ideal edit
    target: int | None       # index of the edited object (None for background)
    attribute: str           # "colour" | "shape" | "background"


def absent_colours(scene) -> list[str]:
    """The colours that nothing in the scene has (objects or background), in COLOURS' order."""
    used = {o.colour for o in scene.objects} | {scene.background}
    return [c for c in COLOURS if c not in used]


def new_colour(scene, rng) -> str:
    """A colour that nothing in the scene has (objects or background)."""
    return str(rng.choice(absent_colours(scene)))


def edit_object(scene, idx, rng):
    """Object idx with one attribute changed to a value absent from the scene; the other attribute
    (unique in the scene by construction) still names it. -> (new object, "colour" | "shape")."""
    o = scene.objects[idx]
    if rng.random() < 0.5:
        return replace(o, colour=new_colour(scene, rng)), "colour"
    shape = str(rng.choice([s for s in SHAPES if s not in {p.shape for p in scene.objects}]))
    return replace(o, shape=shape, angle=0.0 if shape in ("circle", "ring") else o.angle), "shape"


def make_edit_case(seed, kind, size=128, object_sizes=BENCHMARK_OBJECT_SIZES):
    """Object edits change one attribute of the target; the unchanged one (unique in the
    scene by construction) names the target.  gt_mask: colour edit -> target's visible
    mask; shape edit -> union of its visible masks before and after; background -> all
    non-object pixels."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, min_objects=2 if kind == "secondary" else 1, object_sizes=object_sizes)
    _, masks, bgmask = render(scene, size)
    objs = list(scene.objects)
    if kind == "background":
        new_bg = new_colour(scene, rng)
        target = replace(scene, background=new_bg)
        return EditCase(f"{seed}-background", seed, scene, caption(scene),
                        _a(f"{new_bg} background"), kind, bgmask, target, None, "background")
    areas = [m.sum() for m in masks]
    main = int(np.argmax(areas))
    idx = main if kind == "main" else int(rng.choice([i for i in range(len(objs)) if i != main]))
    new, attr = edit_object(scene, idx, rng)
    objs[idx] = new
    target = replace(scene, objects=tuple(objs))
    gt = masks[idx] if attr == "colour" else masks[idx] | render(target, size)[1][idx]
    return EditCase(f"{seed}-{kind}", seed, scene, caption(scene),
                    _a(f"{new.colour} {new.shape}"), kind, gt, target, idx, attr)


def edit_cases(seed, count, size=128, object_sizes=BENCHMARK_OBJECT_SIZES):
    """Case i uses seed `seed + i` and kind KINDS[i % 3] (balanced)."""
    return [make_edit_case(seed + i, KINDS[i % 3], size, object_sizes) for i in range(count)]


def add_case_arguments(p) -> None:
    """The options that choose benchmark cases, for every command that runs them (toy.benchmark,
    toy.inversion_quality): the seed set and the world's object sizes."""
    p.add_argument("--seed-set", choices=sorted(BENCHMARK_SEED_SETS), default="a",
                   help="fixed case seeds: a (the set every figure is reported on) or b (disjoint, out of sample)")
    add_object_sizes_argument(p, BENCHMARK_OBJECT_SIZES, "benchmark scenes", "0.35 0.7: edited objects at the "
                              "scale of ImageNet's and PASCAL's")


def add_object_sizes_argument(p, default, scenes: str, note: str) -> None:
    """--object-sizes LOW HIGH, for benchmark and training commands alike (validate with check_object_sizes)."""
    p.add_argument("--object-sizes", type=float, nargs=2, metavar=("LOW", "HIGH"), default=default,
                   help=f"object sizes of the {scenes}, fractions of the image side (default {default[0]} "
                        f"{default[1]}, the bundled model's training range; {note})")


def check_object_sizes(object_sizes) -> tuple[float, float]:
    lo, hi = object_sizes
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"object sizes {lo} {hi} must satisfy 0 < low <= high <= 1 (fractions of the side)")
    return float(lo), float(hi)


def benchmark_cases(n=240, size=128, seed_set="a", object_sizes=BENCHMARK_OBJECT_SIZES):
    """A fixed held-out benchmark: seed set "a" (the default: seeds BENCHMARK_SEED .. + n - 1) or "b"
    (seeds BENCHMARK_SEED_SETS["b"] ..., disjoint from "a" for any n < 10**9)."""
    if seed_set not in BENCHMARK_SEED_SETS:
        raise ValueError(f"seed set {seed_set!r} is not one of {sorted(BENCHMARK_SEED_SETS)}")
    if n >= BENCHMARK_SEED_SETS["b"] - BENCHMARK_SEED_SETS["a"]:
        raise ValueError(f"n={n} cases would run set a into set b")
    return edit_cases(BENCHMARK_SEED_SETS[seed_set], n, size, object_sizes)
