"""Edit-quality benchmark on the synthetic world, where every ground-truth mask is exact.

    python -m toy.benchmark                      # defaults, ablations, baselines (make eval-toy)
    python -m toy.benchmark --n 20 --no-ablation --no-methods
    python -m toy.benchmark --table1 --methods-n 16    # every registered method on the same cases (make table1)
    python -m toy.benchmark --table1 --methods ptp,pnp --methods-n 12   # InstDiffEdit and the methods named

Cases come from ``toy.world.benchmark_cases`` (fixed seeds, disjoint from training): main-object,
secondary-object and background edits, the edit text the only prompt (paper Sec. 4). Metrics as in
the paper's appendix: mask IoU, C_m, C_non, C_m / C_non (dataset level: mean C_m / mean C_non, as
Table 1), seconds per edit. Also reported: the start-token map alone as the mask (no Eq. 6-9
refinement), the r x phi ablation of Table 2 (masks only), every registered method (methods/) on the
same model with its counted UNet evaluations per edit, and the inpainting finish given the ground-truth
mask, which separates the finish's C_non from the mask's.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.metrics import change_rates, mask_iou
from evaluation.stats import bootstrap_ci, ratio_of_means
from mask.filters import binomial_blur
from mask.instant import minmax
from methods import REGISTRY, EditError, EditOptions, add_arguments, get_method, options_from_args
from toy.world import KINDS, add_case_arguments, benchmark_cases, check_object_sizes, render

ROOT = Path(__file__).resolve().parents[1]
MODEL, INPAINT_MODEL = ROOT / "assets" / "toy-sd", ROOT / "assets" / "toy-sd-inpaint"


def source_text(case) -> str:
    """What the source image shows at the edited place (methods with needs_source, e.g. DiffEdit, use it)."""
    s = case.scene
    if case.target is None:
        return f"a {s.background} background"
    o = s.objects[case.target]
    return f"a {o.colour} {o.shape}"


def sot_only_mask(word_maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Baseline: the inverted start-token map alone, blurred and thresholded like Eq. 9's output."""
    soft = minmax(binomial_blur(binomial_blur(word_maps[0].float())))
    return soft > threshold


def upsample_mask(mask: torch.Tensor, size: int) -> np.ndarray:
    """A latent-grid mask (h, w) -> a bool size x size image mask, each cell a block (nearest)."""
    return F.interpolate(mask.float()[None, None], size=(size, size), mode="nearest")[0, 0].cpu().numpy() > 0.5


def run_cases(pipe, cases, method: str = "instdiffedit", full: bool = True, gt_mask: bool = False,
              **options) -> list[dict]:
    """One row per case. full=False: masks only (stage 1), no inpainting, no change rates.
    gt_mask: the inpainting finish gets the exact ground-truth mask (what a perfect stage 1 would give)."""
    rows, threshold = [], pipe.options(method, **options).threshold  # validated once, before any case
    for case in cases:
        src = render(case.scene, pipe.size)[0]
        img = Image.fromarray(src)
        tic = time.perf_counter()
        row = {"id": case.id, "kind": case.kind, "edit": case.edit_text, "method": method}
        if full:
            res = pipe.edit(img, case.edit_text, method=method, source=source_text(case),
                            mask=torch.from_numpy(case.gt_mask) if gt_mask else None, **options)
            row["seconds"] = time.perf_counter() - tic
            edited = np.asarray(res.image)
            row["c_m"], row["c_non"], _ = change_rates(edited, src, case.gt_mask)
            pred = np.asarray(res.mask) > 127 if get_method(method).makes_mask else None
            maps, row["unet_evals"] = res.word_maps, res.unet_evals
        else:
            out = pipe.mask(img, case.edit_text, method=method, source=source_text(case), **options)
            row["seconds"] = time.perf_counter() - tic
            pred, maps, row["unet_evals"] = upsample_mask(out.mask_latent, pipe.size), out.word_maps, out.unet_evals
        if pred is not None:
            row["iou"] = mask_iou(pred, case.gt_mask)
        if maps is not None and len(maps):  # attention methods: word_maps[0] is the start token's map
            row["iou_sot_only"] = mask_iou(upsample_mask(sot_only_mask(maps, threshold), pipe.size),
                                           case.gt_mask)
        rows.append(row)
    return rows


def _values(rows: list[dict], key: str, kind: str | None = None) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key]) and kind in (None, r["kind"])]


def _paired(rows: list[dict], a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Two per-case columns, over the cases that have both (C_m and C_non of one edit)."""
    both = [r for r in rows if all(r.get(k) is not None and np.isfinite(r[k]) for k in (a, b))]
    return np.array([r[a] for r in both]), np.array([r[b] for r in both])


def summarise(rows: list[dict]) -> dict:
    def mean(key, kind=None):
        vals = _values(rows, key, kind)
        return float(np.mean(vals)) if vals else None
    out = {"n": len(rows), "seconds": mean("seconds"), "unet_evals": mean("unet_evals"), "iou": mean("iou"),
           "iou_sot_only": mean("iou_sot_only"),
           "c_m": mean("c_m"), "c_non": mean("c_non")}
    c_m, c_non = _paired(rows, "c_m", "c_non")
    out["rate"] = float(c_m.mean() / c_non.mean()) if len(c_m) and c_non.mean() > 0 else None
    for kind in KINDS:
        out[f"iou_{kind}"] = mean("iou", kind)
    out["ci"] = confidence_intervals(rows)
    return out


def confidence_intervals(rows: list[dict], level: float = 0.95) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap intervals over cases (evaluation.stats) of every summary figure:
    IoU overall and per kind, the SOT-only IoU, C_m, C_non, and the rate as a ratio of means
    (C_m and C_non of a case resampled together). Figures without values are left out."""
    ci = {}
    for key in ("iou", "iou_sot_only", "c_m", "c_non"):
        if vals := _values(rows, key):
            ci[key] = bootstrap_ci(vals, level=level)
    for kind in KINDS:
        if vals := _values(rows, "iou", kind):
            ci[f"iou_{kind}"] = bootstrap_ci(vals, level=level)
    c_m, c_non = _paired(rows, "c_m", "c_non")
    if len(c_m) and c_non.mean() > 0:
        ci["rate"] = bootstrap_ci((c_m, c_non), statistic=ratio_of_means, level=level)
    return ci


def by_size(rows: list[dict], cases, grid: int) -> dict[str, list[dict]]:
    """Each kind's cases in thirds by the size of what is edited (a background edit: all the objects,
    where its C_non is measured), as cells of a grid x grid attention map: how mask IoU and rate depend
    on how many map cells an object spans. A cell is the same share of the image on SD's maps, so the
    cell counts compare directly."""
    share = {c.id: float(c.gt_mask.mean() if c.target is not None else 1 - c.gt_mask.mean()) for c in cases}
    out = {}
    for kind in KINDS:
        ranked = sorted((r for r in rows if r["kind"] == kind and r["id"] in share), key=lambda r: share[r["id"]])
        if len(ranked) < 3:
            continue
        out[kind] = []
        for name, part in zip(("small", "middle", "large"), np.array_split(np.arange(len(ranked)), 3)):
            sub = [ranked[i] for i in part]
            s = summarise(sub)
            cells = grid * grid * float(np.mean([share[r["id"]] for r in sub]))
            out[kind].append({"third": name, "n": len(sub), "cells": cells, "iou": s["iou"], "rate": s["rate"],
                              "ci": {k: s["ci"][k] for k in ("iou", "rate") if k in s["ci"]}})
    return out


# Mean share of the image covered by an annotated object's bounding box (ImageNet's ILSVRC 2012 analysis page,
# "Average Object Scale", per class): the scale of real editing datasets' objects, for comparison with the toy's.
REFERENCE_OBJECT_SCALE = {"ILSVRC 2012": 0.358, "PASCAL VOC": 0.241}


def bbox_share(mask: np.ndarray) -> float:
    """Area of the bounding box of a boolean mask, as a share of the image (0 for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return 0.0
    return float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / mask.size)


def object_scale(cases) -> dict[str, float]:
    """Mean bounding-box share of the edited object (its visible mask in the source), per object kind: the
    toy's counterpart of REFERENCE_OBJECT_SCALE."""
    out = {}
    for kind in ("main", "secondary"):
        shares = [bbox_share(render(c.scene, c.gt_mask.shape[0])[1][c.target]) for c in cases if c.kind == kind]
        if shares:
            out[kind] = float(np.mean(shares))
    return out


def size_table(strata: dict[str, list[dict]], grid: int) -> str:
    lines = [f"| kind | third | n | cells of the {grid}x{grid} map | IoU | rate |", "|---|---|---|---|---|---|"]
    for kind, parts in strata.items():
        for s in parts:
            lines.append(f"| {kind} | {s['third']} | {s['n']} | {s['cells']:.0f} | {_fmt_ci(s, 'iou', pct=True)} | "
                         f"{_fmt_ci(s, 'rate')} |")
    return "\n".join(lines)


def grid_comparison(pipe, cases, grids, options: dict) -> dict[str, dict]:
    """Masks only, at the defaults, from the cross-attention maps of each grid in turn."""
    return {f"{g}x{g} maps": summarise(run_cases(pipe, cases, full=False, **{**options, "attention_res": g}))
            for g in grids}


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def _fmt_ci(s: dict, key: str, pct=False) -> str:
    """'61.1 [58.0, 64.1]': the figure and its 95% CI, when the summary has one."""
    ci = s.get("ci", {}).get(key)
    return _fmt(s[key], pct) + (f" [{_fmt(ci[0], pct)}, {_fmt(ci[1], pct)}]" if ci else "")


def table(title: str, summaries: dict[str, dict]) -> str:
    lines = [f"\n{title}", f"| {'setting':<28} | n | s/edit | UNet evals/edit | IoU | IoU SOT-only | "
             "IoU main / sec / bg | C_m % | C_non % | rate |", "|" + "---|" * 10]
    for name, s in summaries.items():
        per_kind = " / ".join(_fmt_ci(s, f"iou_{k}", True) for k in KINDS)
        evals = "-" if s.get("unet_evals") is None else f"{s['unet_evals']:.0f}"
        lines.append(f"| {name:<28} | {s['n']} | {_fmt(s['seconds'])} | {evals} | {_fmt_ci(s, 'iou', True)} | "
                     f"{_fmt_ci(s, 'iou_sot_only', True)} | {per_kind} | {_fmt_ci(s, 'c_m', True)} | "
                     f"{_fmt_ci(s, 'c_non', True)} | {_fmt_ci(s, 'rate')} |")
    return "\n".join(lines) + "\n[a, b]: 95% bootstrap interval over the cases (evaluation/stats.py)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--inpaint-model", default=str(INPAINT_MODEL))
    p.add_argument("--n", type=int, default=240, help="cases at the default settings (default 240)")
    p.add_argument("--ablation-n", type=int, default=60, help="cases per r x phi cell (masks only)")
    p.add_argument("--methods-n", type=int, default=60, help="cases for the comparison of all registered methods")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--no-methods", action="store_true")
    p.add_argument("--table1", action="store_true",
                   help="only the toy Table 1: every registered method on the same --methods-n cases")
    p.add_argument("--methods", default=None,
                   help="comma-separated registered methods to compare besides instdiffedit (default: all)")
    add_case_arguments(p)
    p.add_argument("--grids", type=int, nargs="+", default=None, metavar="G",
                   help="also compare the mask from the maps of each of these grids (e.g. 8 16 32), masks only, "
                        "on --ablation-n cases")
    p.add_argument("--out", default=None, help="default runs/eval-toy (seed set a) or runs/eval-toy-b")
    add_arguments(p, with_method=False)  # every method option (all methods run; each gets those that apply)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out or str(ROOT / "runs" / ("eval-toy" if args.seed_set == "a" else f"eval-toy-{args.seed_set}"))
    try:
        sizes = check_object_sizes(args.object_sizes)
    except ValueError as e:
        print(f"error: --object-sizes: {e}", file=sys.stderr)
        return 2
    given = options_from_args(args)
    chosen = list(REGISTRY) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in chosen:
        if m not in REGISTRY:
            print(f"error: --methods: {m!r} is not one of {', '.join(REGISTRY)}", file=sys.stderr)
            return 2
    if args.table1:
        args.n, args.no_ablation, args.no_methods = args.methods_n, True, False

    def options_for(method: str) -> dict:
        return {k: v for k, v in given.items() if k in get_method(method).option_specs()}

    try:  # bad options: one line before anything is loaded (only for the methods that will run)
        for method in ["instdiffedit"] + ([] if args.no_methods else chosen):
            EditOptions(method, **options_for(method))
    except EditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from instdiffedit import InstDiffEdit
    from weights import WeightsError
    torch.manual_seed(0)
    try:
        pipe = InstDiffEdit.from_pretrained(args.model, args.inpaint_model, device="cpu", dtype=torch.float32)
    except (OSError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cases = benchmark_cases(max(args.n, args.ablation_n, args.methods_n), size=pipe.size, seed_set=args.seed_set,
                            object_sizes=sizes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, report = {}, []

    rows = run_cases(pipe, cases[: args.n], **options_for("instdiffedit"))
    results["default"] = {"summary": summarise(rows), "rows": rows, "seed_set": args.seed_set,
                          "object_sizes": list(sizes)}
    report.append(table(f"InstDiffEdit at its defaults (r 0.5, phi 0.2, n 3, LMS 50 steps, CFG 7.5), seed set "
                        f"{args.seed_set}, object sizes {sizes[0]}-{sizes[1]}",
                        {"instdiffedit": results["default"]["summary"]}))
    print(report[-1], flush=True)
    grid = pipe.options("instdiffedit", **options_for("instdiffedit")).attention_res
    results["default"]["by_size"] = strata = by_size(rows, cases, grid)
    results["default"]["object_scale"] = scale = object_scale(cases[: args.n])
    report.append("Edited objects' bounding box, mean share of the image: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in scale.items()) + " (real datasets: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in REFERENCE_OBJECT_SCALE.items()) + ")")
    print(report[-1], flush=True)
    if strata:
        report.append("By the size of what is edited (thirds of each kind; a background edit: all its objects)\n"
                      + size_table(strata, grid))
        print(report[-1], flush=True)

    if not args.no_methods:
        subset = cases[: args.methods_n]
        comp = {"instdiffedit": summarise([r for r in rows if r["id"] in {c.id for c in subset}])}
        for method in chosen:
            if method != "instdiffedit":
                r = run_cases(pipe, subset, method=method, **options_for(method))
                results[method] = {"summary": summarise(r), "rows": r}
                comp[method] = results[method]["summary"]
        r = run_cases(pipe, subset, gt_mask=True, **options_for("instdiffedit"))
        results["gt_mask"] = {"summary": summarise(r), "rows": r}
        comp["ground-truth mask + finish"] = results["gt_mask"]["summary"]
        ins = comp["instdiffedit"]
        ratios = [f"{name}: {_fmt(s['unet_evals'] / ins['unet_evals'])}x UNet evals, "
                  f"{_fmt(s['seconds'] / ins['seconds'])}x s/edit"
                  + (f", IoU InstDiffEdit/{name} {_fmt(ins['iou'] / s['iou'])}" if s["iou"] else "")
                  for name, s in comp.items() if name in REGISTRY and name != "instdiffedit"]
        report.append(table(f"Toy Table 1: every registered method on the same model, samplers, seeds and "
                            f"{len(subset)} cases", comp)
                      + "\nCost relative to InstDiffEdit: " + "; ".join(ratios))
        print(report[-1], flush=True)

    if not args.no_ablation:
        subset = cases[: args.ablation_n]
        abl = {}
        for r_ in (0.4, 0.5, 0.6):
            for phi in (0.1, 0.2, 0.3):
                rs = run_cases(pipe, subset, full=False, **{**options_for("instdiffedit"), "strength": r_,
                                                            "threshold": phi})
                abl[f"r={r_} phi={phi}"] = summarise(rs)
        results["ablation"] = abl
        report.append(table(f"Ablation, masks only ({len(subset)} cases per cell; Table 2 of the paper)", abl))
        print(report[-1], flush=True)

    if args.grids:
        subset = cases[: args.ablation_n]
        results["grids"] = grid_comparison(pipe, subset, args.grids, options_for("instdiffedit"))
        report.append(table(f"Masks from the maps of each grid, masks only ({len(subset)} cases; latent "
                            f"{pipe.size // pipe.vae_factor}x{pipe.size // pipe.vae_factor})", results["grids"]))
        print(report[-1], flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "report.md").write_text("\n".join(report) + "\n")
    with open(out / "rows.csv", "w", newline="") as f:
        keys = ["method", "id", "kind", "edit", "seconds", "unet_evals", "iou", "iou_sot_only", "c_m", "c_non"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for name, res in results.items():
            for row in res.get("rows", []) if isinstance(res, dict) else []:
                w.writerow(row)
    print(f"\nwrote {out}/results.json, report.md, rows.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
