"""Where InstDiffEdit's mask of a colour edit lands, and whether the edit text's shape word steers it.

    python -m toy.colour_edits                       # the colour edits of the first 240 cases of seed set a
    python -m toy.colour_edits --n 60 --seed-set b --out runs/colour-edits-b.json

A colour edit ("a brown triangle" on a pink triangle) names its target only by the shape word, because
the new colour is absent from the scene by construction. This measures, masks only (stage 1):

- where each colour edit's mask lands: the object it overlaps best (IoU with each object's visible
  mask), or nowhere when it overlaps no object by IoU 0.05 or more; a miss lands elsewhere than on the
  target (a mask that covers part of the target and more of another object is a miss); and how many
  masks have IoU under 0.1 with the target (the target's visible mask is the benchmark's ground truth);
- the misses split by whether another object's colour is nearer (RGB) the new colour than the
  target's own;
- steering: for every other object of a different shape, the mask of the same text with that object's
  shape word ("a brown circle"). A mask that follows the shape word moves to that object.

These are the counts behind the README's "What holds the IoU down"; no figure here is tuned on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.metrics import mask_iou
from toy.benchmark import upsample_mask
from toy.world import COLOURS, add_case_arguments, benchmark_cases, check_object_sizes, render

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "toy-sd"
NOWHERE_IOU = 0.05  # a mask overlapping no object by this IoU lands on none of them


def lands_on(pred: np.ndarray, object_masks: list[np.ndarray]) -> tuple[int | None, list[float]]:
    """-> (index of the object the mask overlaps best by IoU, or None below NOWHERE_IOU; IoU with each)."""
    ious = [mask_iou(pred, m, empty=0.0) for m in object_masks]
    best = int(np.argmax(ious)) if ious else None
    return (best if best is not None and ious[best] >= NOWHERE_IOU else None), ious


def nearer_other(scene, target: int, new: str) -> bool:
    """Is some other object's colour nearer (RGB distance) the new colour than the target's own?"""
    d = [math.dist(COLOURS[o.colour], COLOURS[new]) for o in scene.objects]  # as toy.train.confusable_colour
    return any(d[j] < d[target] for j in range(len(d)) if j != target)


def _mask(pipe, image: Image.Image, text: str) -> np.ndarray:
    return upsample_mask(pipe.mask(image, text).mask_latent, pipe.size)  # as toy.benchmark scores it


def diagnose(pipe, cases) -> list[dict]:
    """One row per colour edit among `cases` (other cases are skipped)."""
    rows = []
    for c in cases:
        if c.attribute != "colour":
            continue
        src, masks, _ = render(c.scene, pipe.size)
        image = Image.fromarray(src)
        objs, t = c.scene.objects, c.target
        new = c.edit_text.split()[1]  # "a brown triangle" / "an orange ring"
        where, ious = lands_on(_mask(pipe, image, c.edit_text), masks)
        swaps = []
        for j, o in enumerate(objs):
            if j != t and o.shape != objs[t].shape:
                w, _ = lands_on(_mask(pipe, image, f"a {new} {o.shape}"), masks)
                swaps.append({"names": j, "lands_on": w})
        rows.append({"id": c.id, "edit": c.edit_text, "target": t, "lands_on": where, "iou": ious,
                     "nearer_other": nearer_other(c.scene, t, new), "swaps": swaps})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Counts over diagnose()'s rows (see the module docstring)."""
    miss = [r for r in rows if r["lands_on"] != r["target"]]
    hits = [r for r in rows if r["lands_on"] == r["target"]]
    near = [r for r in rows if r["nearer_other"]]
    steer_hit = [s for r in hits for s in r["swaps"]]
    steer_miss = [s for r in miss for s in r["swaps"] if s["names"] != r["lands_on"]]
    return {
        "colour_edits": len(rows),
        "misses": len(miss),
        "misses_on_another_object": sum(r["lands_on"] is not None for r in miss),
        "target_iou_below_0_1": sum(r["iou"][r["target"]] < 0.1 for r in rows),  # as bad as a miss can be
        "nearer_other_cases": len(near),
        "misses_when_nearer_other": sum(r["lands_on"] != r["target"] for r in near),
        "misses_otherwise": sum(r["lands_on"] != r["target"] for r in rows if not r["nearer_other"]),
        # hits: swapping in another object's shape word; did the mask move to that object?
        "swaps_from_hits": len(steer_hit),
        "swaps_from_hits_moved_to_named": sum(s["lands_on"] == s["names"] for s in steer_hit),
        "swaps_from_hits_unmoved": sum(s["lands_on"] == r["target"] for r in hits for s in r["swaps"]),
        # misses: naming an object the mask was not on; did it move there?
        "swaps_from_misses": len(steer_miss),
        "swaps_from_misses_moved_to_named": sum(s["lands_on"] == s["names"] for s in steer_miss),
    }


def report(s: dict) -> str:
    return "\n".join([
        f"colour edits: {s['colour_edits']}; the mask lands elsewhere than on the target in {s['misses']} "
        f"({s['misses_on_another_object']} on another object, the rest on none); IoU with the target under 0.1 in "
        f"{s['target_iou_below_0_1']}",
        f"misses where another object's colour is nearer the new colour than the target's: "
        f"{s['misses_when_nearer_other']} of {s['nearer_other_cases']}; otherwise "
        f"{s['misses_otherwise']} of {s['colour_edits'] - s['nearer_other_cases']}",
        f"shape word swapped for another object's, masks that were on the target: moved to the named object "
        f"{s['swaps_from_hits_moved_to_named']} of {s['swaps_from_hits']}, stayed on the target "
        f"{s['swaps_from_hits_unmoved']}",
        f"masks that missed, named an object they were not on: moved there {s['swaps_from_misses_moved_to_named']} "
        f"of {s['swaps_from_misses']}",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--n", type=int, default=240, help="benchmark cases to take the colour edits from (default 240)")
    add_case_arguments(p)
    p.add_argument("--out", default=None, help="also write the rows and counts here (JSON)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = check_object_sizes(args.object_sizes)
        if args.n < 1:
            raise ValueError(f"--n {args.n} must be at least 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from instdiffedit import InstDiffEdit
    from weights import WeightsError
    try:
        pipe = InstDiffEdit.from_pretrained(args.model, inpaint_model=None, device="cpu", dtype=torch.float32)
    except (OSError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cases = benchmark_cases(args.n, size=pipe.size, seed_set=args.seed_set, object_sizes=sizes)
    except ValueError as e:  # --n too large for the seed set
        print(f"error: --n: {e}", file=sys.stderr)
        return 2
    rows = diagnose(pipe, cases)
    s = summarise(rows)
    print(report(s))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": s, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
