#!/usr/bin/env python3
"""What the UNet control protocol costs InstDiffEdit's recording, against the code before it (CPU, fp32).

Loads ``model/`` and ``mask/store.py`` as they were at a git revision (``--ref``, default ``main``)
next to the working tree's, gives both UNets the same random SD v1.4-config weights, and times
interleaved forwards of four variants: each UNet alone, and each with its AttentionStore (the old one
through ``recorder=``, the new one through ``control=``). The latent is 32x32 (batch 2: one round with
CFG) so a CPU run stays short; the store records the same five layers as at 64x64 (grid = latent / 4).

    OMP_NUM_THREADS=1 python bench/bench_control.py [--ref main] [--reps 5] [--latent 32] [--json out.json]

Read the ratios (each the median of per-round ratios), not the seconds: the machine is shared.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, env_info, interleaved, loadavg, paired_ratio, summary, write_json


def load_reference(rev: str, folder: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """``model.unet`` and ``mask.store`` at `rev`, imported as ``ref_model.*`` / ``ref_store``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "model", "mask/store.py"],
                          check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(blob)).extractall(folder, filter="data")
    pkg = folder / "ref_model"
    (folder / "model").rename(pkg)
    for f in pkg.glob("*.py"):  # the package imports itself by name
        f.write_text(f.read_text().replace("from model.", "from ref_model."))
    sys.path.insert(0, str(folder))
    import ref_model.unet as ref_unet  # noqa: E402
    store_src = (folder / "mask" / "store.py").read_text().replace("from model.", "from ref_model.")
    spec = importlib.util.spec_from_loader("ref_store", loader=None)
    ref_store = importlib.util.module_from_spec(spec)
    exec(compile(store_src, "ref_store.py", "exec"), ref_store.__dict__)
    return ref_unet, ref_store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", default="main", help="git revision of the 'before' code (default main)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--latent", type=int, default=32, help="latent side (default 32; 64 is SD's 512 px)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()

    import torch

    from mask.store import AttentionStore
    from model.unet import UNet2DConditionModel, UNetConfig
    log = lambda s: print(s, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref_unet, ref_store = load_reference(args.ref, Path(tmp))
        torch.manual_seed(0)
        new = UNet2DConditionModel(UNetConfig()).eval().requires_grad_(False)
        old = ref_unet.UNet2DConditionModel(ref_unet.UNetConfig()).eval().requires_grad_(False)
        old.load_state_dict(new.state_dict(), strict=True)
        g = torch.Generator().manual_seed(1)
        L = args.latent
        x = torch.randn(2, 4, L, L, generator=g)
        ctx = torch.randn(2, 77, 768, generator=g)
        t = torch.tensor(500)
        new_store = AttentionStore((L, L), rounds=1, cfg=True)
        old_store = ref_store.AttentionStore((L, L), rounds=1, cfg=True)
        outs = {}

        def run(name, fn):
            def go():
                outs[name] = fn()
            return go

        def old_rec():
            y = old(x, t, ctx, recorder=old_store)
            old_store.end_step()
            return y

        def new_rec():
            y = new(x, t, ctx, control=new_store)
            new_store.end_step()
            return y

        fns = {"before: UNet": run("ob", lambda: old(x, t, ctx)),
               "before: UNet + store": run("or", old_rec),
               "after: UNet": run("nb", lambda: new(x, t, ctx)),
               "after: UNet + store": run("nr", new_rec)}
        log(f"SD v1.4-config UNet (random init), batch 2, latent {L}x{L}, "
            f"threads {torch.get_num_threads()}, before = {args.ref}, load {loadavg()}")
        with torch.inference_mode():
            times = interleaved(fns, args.reps, warmup=1, log=log)
        same = (outs["nr"] - outs["or"]).abs().max().item()
        same_maps = (new_store.maps() - old_store.maps()).abs().max().item()
    T = times
    figures = {
        "after_over_before_recorded": paired_ratio(T["after: UNet + store"], T["before: UNet + store"]),
        "after_over_before_plain": paired_ratio(T["after: UNet"], T["before: UNet"]),
        "recorded_over_plain_before": paired_ratio(T["before: UNet + store"], T["before: UNet"]),
        "recorded_over_plain_after": paired_ratio(T["after: UNet + store"], T["after: UNet"]),
        "max_abs_diff_output": same, "max_abs_diff_maps": same_maps,
    }
    for k, v in T.items():
        log(f"  {k:24s} median {summary(v)['median']:.3f} s")
    for k, v in figures.items():
        log(f"  {k:30s} {v:.4g}")
    write_json(args.json, {"env": env_info(), "ref": args.ref, "latent": L, "reps": args.reps,
                           "times_s": {k: summary(v) for k, v in T.items()}, **figures})


if __name__ == "__main__":
    main()
