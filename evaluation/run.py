"""Run one editing method over one of the paper's dataset lists: resumable, self-describing, shardable.

    python -m evaluation.run --list Editing-Mask_list.txt --images DIR --masks DIR \\
        --method instdiffedit --out runs/editing-mask-instdiffedit
    python -m evaluation.run ... --shard 0/4                  # one of 4 independent processes / array jobs
    torchrun --nproc-per-node 8 -m evaluation.run ...         # 8 GPUs of one node, one rank per GPU
    python -m evaluation.report runs/editing-mask-*           # Table-1-style comparison

The first run writes config.json (method, every option, models with their resolved revisions, seed,
versions, code commit); a later run on the same --out with other settings is refused unless --force.
Items are claimed (a claim file) before they are computed, so any number of processes may share one
--out; summary.json and the report are computed from the per-item files. The list formats are parsed
by ``evaluation.datasets``; missing images are reported and skipped.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from .datasets import parse_list
from .runner import RunConflict, collect_summary, run_dataset


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the summary is written and the run ends with one line."""


def _on_sigterm(signum, frame):
    raise Stopped()


def _stopped(e: KeyboardInterrupt, what: str) -> int:
    """Ctrl-C or SIGTERM: one line, and the shell's exit code for the signal."""
    print(f"{'terminated' if isinstance(e, Stopped) else 'interrupted'}: {what}", file=sys.stderr)
    return 143 if isinstance(e, Stopped) else 130


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not i/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text}: want 0 <= i < N")
    return i, n


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_parser() -> argparse.ArgumentParser:
    from instdiffedit import DTYPES
    from methods import add_arguments
    from weights import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="instdiffedit-eval", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--list", required=True, help="dataset list file (Editing-Mask, ImageNet or Imagen format)")
    p.add_argument("--images", required=True, help="folder with the list's images")
    p.add_argument("--masks", default=None, help="folder with human masks, for IoU / C_m / C_non (any list)")
    p.add_argument("--out", required=True, help="run folder (resumable: finished items are skipped)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, folder, single file or 'toy'")
    p.add_argument("--inpaint-model", default="auto",
                   help=f"default: {DEFAULT_INPAINT_MODEL} (the toy one with --model toy)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun), mps, cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--limit", type=int, default=None, help="stop after this many new items")
    p.add_argument("--shard", type=_shard, default=None, help="i/N: items i, i+N, ... (independent processes)")
    p.add_argument("--force", action="store_true", help="start --out over when its config.json has other settings")
    p.add_argument("--quiet", action="store_true", help="no per-item progress lines")
    add_arguments(p)  # --method and every method's options, as in instdiffedit.py
    return p


def main(argv=None) -> int:
    from instdiffedit import DTYPES, EditError, InstDiffEdit
    from provenance import code_commit, model_record, versions
    from methods import EditOptions, get_method, options_from_args
    from weights import WeightsError

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # from here on SIGTERM is a KeyboardInterrupt (Stopped)
    options = options_from_args(args)  # the source text comes from each item, not from --source
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist = None
    try:
        method = get_method(args.method)
        EditOptions(args.method, **options)  # refuse bad options before loading anything
        for flag, folder in (("--images", args.images), ("--masks", args.masks)):
            if folder is not None and not Path(folder).is_dir():
                raise EditError(f"{flag} {folder}: no such folder")
        if world > 1 and args.shard is not None:
            raise EditError("--shard and torchrun both split the list: use one of them")
        shard = args.shard or (rank, world)
        items = parse_list(args.list, with_masks=True if args.masks else None)  # --masks: every list has masks
        device = args.device
        if device is None and world > 1:
            import torch
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"
        if world > 1:  # torchrun: the process group only serves the final barrier, so gloo on any device
            import datetime

            import torch.distributed as dist
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        dtype = DTYPES[args.dtype] if args.dtype else None
        inpaint = args.inpaint_model if method.uses_inpaint and options.get("inpaint", True) else None
        pipe = InstDiffEdit.from_pretrained(args.model, inpaint, device, dtype, tokenizer=args.tokenizer)
        o = pipe.options(args.method, **options)  # the checks that need the model (steps)
    except (ValueError, OSError, EditError, WeightsError) as e:
        print(f"error: {' '.join(str(e).split()) if not isinstance(e, WeightsError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped(e, "before the first item: nothing was written")

    resolved = {k: v for k, v in o.as_dict().items() if k != "source"}  # every option, defaults included
    models = model_record(pipe)
    config = {
        "identity": {  # what changes results: a resumed run must match it
            "method": args.method, "options": resolved, "dtype": str(pipe.dtype).removeprefix("torch."),
            "models": {role: {"source": m["source"], "revision": m["revision"]} for role, m in models.items()},
            "list": {"file": Path(args.list).name, "sha256": _sha256(Path(args.list))},
            "masks": args.masks is not None, "image_size": pipe.size,
        },
        "models": models, "list_file": str(Path(args.list).resolve()), "images": str(Path(args.images).resolve()),
        "masks": str(Path(args.masks).resolve()) if args.masks else None, "device": str(pipe.device),
        "code_commit": code_commit(), "versions": versions(pipe.device), "command": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }

    def edit_fn(image, item):
        tic = time.perf_counter()
        res = pipe.edit(image, item.edit_text, method=args.method, **{**options, "source": item.source_text or ""})
        mask = np.asarray(res.mask) > 127 if method.makes_mask else None
        return res.image, mask, time.perf_counter() - tic, {"unet_evals": res.unet_evals}

    out = Path(args.out)
    try:
        summary = run_dataset(items, args.images, out, edit_fn, args.masks, method=args.method, image_size=pipe.size,
                              limit=args.limit, verbose=not args.quiet, config=config, force=args.force,
                              shard=shard, on_error="record")  # a failing item is listed; a rerun retries it
    except RunConflict as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped(e, "summary.json counts what is done; rerun the same command to resume")
    if dist is not None:
        dist.barrier()  # every rank's items are on disk: rank 0 writes the whole run's summary and report
        if rank == 0:
            summary = collect_summary(items, out, Path(args.images), Path(args.masks) if args.masks else None,
                                      summary["config_id"], method=args.method, interrupted=False,
                                      shard=f"all {world} ranks")
        dist.destroy_process_group()
    if rank == 0:
        from .report import write_report
        write_report([out])
        print(f"{summary['n_done']}/{summary['n_items']} done, {summary['n_missing']} missing, {summary['n_failed']} "
              f"failed -> {out}/summary.json, {out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
