"""Run one editing method over one of the paper's dataset lists, resumably.

    python -m evaluation.run --list Editing-Mask_list.txt --images DIR --masks DIR \\
        --method instdiffedit --out runs/editing-mask-instdiffedit
    python -m evaluation.report runs/editing-mask-*          # Table-1-style comparison

The list formats are parsed by ``evaluation.datasets``; per-item outputs, resumption and the
summary are ``evaluation.runner.run_dataset``'s. Missing images are reported and skipped.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from .datasets import parse_list
from .runner import run_dataset


def main(argv=None) -> int:
    from instdiffedit import DTYPES, EditError, InstDiffEdit
    from methods import EditOptions, add_arguments, get_method, options_from_args
    from weights import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, WeightsError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--list", required=True, help="dataset list file (Editing-Mask, ImageNet or Imagen format)")
    p.add_argument("--images", required=True, help="folder with the list's images")
    p.add_argument("--masks", default=None, help="folder with human masks (Editing-Mask), for IoU / C_m / C_non")
    p.add_argument("--out", required=True, help="run folder (resumable: finished items are skipped)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--inpaint-model", default=DEFAULT_INPAINT_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--limit", type=int, default=None, help="stop after this many new items")
    add_arguments(p)  # --method and every method's options, as in instdiffedit.py
    args = p.parse_args(argv)
    options = options_from_args(args)  # the source text comes from each item, not from --source
    method = get_method(args.method)
    try:
        EditOptions(args.method, **options)  # refuse bad options before loading anything
        items = parse_list(args.list)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[args.dtype] if args.dtype else None
        inpaint = args.inpaint_model if method.uses_inpaint and options.get("inpaint", True) else None
        pipe = InstDiffEdit.from_pretrained(args.model, inpaint, device, dtype)
        pipe.options(args.method, **options)  # the checks that need the model (steps)
    except (ValueError, EditError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def edit_fn(image, item):
        tic = time.perf_counter()
        res = pipe.edit(image, item.edit_text, method=args.method, **{**options, "source": item.source_text or ""})
        mask = np.asarray(res.mask) > 127 if method.makes_mask else None
        return res.image, mask, time.perf_counter() - tic, {"unet_evals": res.unet_evals}

    summary = run_dataset(items, args.images, args.out, edit_fn, args.masks, method=args.method,
                          image_size=pipe.size, limit=args.limit, verbose=True)
    print(f"{summary['n_done']}/{summary['n_items']} done, {summary['n_missing']} missing -> {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
