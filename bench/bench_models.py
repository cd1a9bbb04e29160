#!/usr/bin/env python3
"""Our SD v1.4 UNet and loader next to diffusers', on the same full-size random weights (CPU, fp32).

(a) UNet forward time at SD's sampling shapes (batch 2 = one CFG pair, 64x64 latent, 77x768 text):
    ours, diffusers' UNet2DConditionModel (its default SDPA attention processor), and ours with the
    AttentionStore recorder on the five 16x16 cross-attention layers. Both models are loaded from
    the same diffusers-layout folder, run in the same process with the same thread count under
    torch.inference_mode(); repetitions are interleaved (rotating order) and reported as medians
    and as ratios to diffusers (the bar for ours/diffusers is <= 1.0).
(b) Load time and peak RSS of ``weights.load(folder, components=("unet",))`` against
    ``diffusers.UNet2DConditionModel.from_pretrained(folder/unet)``. Every load runs in a fresh
    subprocess that first imports torch, diffusers and our modules; its VmHWM (peak RSS) before
    the load is the baseline, and the delta is what the load itself added.

    python bench/bench_models.py [--quick] [--json out.json] [--folder DIR]

Timings on a shared machine are noisy: compare the ratios (taken side by side), not the absolute
seconds, and rerun before drawing conclusions from a few percent.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    MiB,
    env_info,
    interleaved,
    loadavg,
    median,
    paired_ratio,
    proc_status,
    save_sd14_unet_folder,
    summary,
    table,
    write_json,
)

CHILD_FLAG = "--_child"


# ---------------------------------------------------------------- (b) load, one fresh process each

def _child(kind: str, folder: str) -> None:
    """Run inside a fresh subprocess: import everything, note the baseline, load once, print JSON."""
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel as DiffusersUNet
    from diffusers.utils import is_accelerate_available

    import model.unet  # noqa: F401
    from weights import load
    diffusers.utils.logging.set_verbosity_error()
    base = proc_status()
    out = {"kind": kind, "baseline": base, "accelerate": is_accelerate_available()}
    if kind != "imports":
        tic = time.perf_counter()
        if kind == "ours":
            unet = load(folder, components=("unet",), device="cpu", dtype=torch.float32).unet
        else:
            unet = DiffusersUNet.from_pretrained(str(Path(folder) / "unet"), torch_dtype=torch.float32).eval()
        out["load_s"] = time.perf_counter() - tic
        out["after_load"] = proc_status()
        # Both loaders may hand back parameters that are still lazy views of the memory-mapped file;
        # one read pass over every weight (the least any first forward does) makes the comparison fair.
        tic = time.perf_counter()
        with torch.no_grad():
            for p in unet.parameters():
                p.sum()
        out["touch_s"] = time.perf_counter() - tic
        out["params"] = sum(p.numel() for p in unet.parameters())
        out["param_mib"] = sum(p.numel() * p.element_size() for p in unet.parameters()) / MiB
    out["after"] = proc_status()
    print(json.dumps(out))


def _run_child(kind: str, folder: Path) -> dict:
    import torch
    r = subprocess.run([sys.executable, __file__, CHILD_FLAG, kind, "--folder", str(folder),
                        "--threads", str(torch.get_num_threads())],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} load subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_load(folder: Path, reps: int, log) -> dict:
    # read the weights once so every timed load finds them in the page cache (none pays for the disk)
    for f in (folder / "unet").iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 * MiB):
                pass
    runs: dict[str, list[dict]] = {"imports": [], "ours": [], "diffusers": []}
    names = list(runs)
    for r in range(reps):
        k = r % len(names)
        for kind in names[k:] + names[:k]:
            res = _run_child(kind, folder)
            runs[kind].append(res)
            extra = (f" load {res['load_s']:.2f} s + touch {res['touch_s']:.2f} s, peak after load "
                     f"{res['after_load']['VmHWM']:.0f} MiB," if "load_s" in res else "")
            log(f"  load rep {r + 1}/{reps} {kind}:{extra} peak {res['after']['VmHWM']:.0f} MiB")
    out = {"runs": runs, "accelerate": runs["imports"][0]["accelerate"]}
    for kind in ("ours", "diffusers"):
        rs = runs[kind]
        out[kind] = {
            "load_s": summary([x["load_s"] for x in rs]),
            "touch_s": summary([x["touch_s"] for x in rs]),
            "ready_s": summary([x["load_s"] + x["touch_s"] for x in rs]),
            "peak_after_load_mib": median([x["after_load"]["VmHWM"] for x in rs]),
            "baseline_peak_mib": median([x["baseline"]["VmHWM"] for x in rs]),
            "peak_mib": median([x["after"]["VmHWM"] for x in rs]),
            "delta_peak_mib": median([x["after"]["VmHWM"] - x["baseline"]["VmHWM"] for x in rs]),
            "rss_after_mib": median([x["after"]["VmRSS"] for x in rs]),
            "rss_anon_after_mib": median([x["after"].get("RssAnon", float("nan")) for x in rs]),
            "rss_file_after_mib": median([x["after"].get("RssFile", float("nan")) for x in rs]),
            "param_mib": rs[0]["param_mib"],
        }
    out["imports_only_peak_mib"] = median([x["after"]["VmHWM"] for x in runs["imports"]])
    out["ratio_load_s"] = paired_ratio([x["load_s"] for x in runs["ours"]], [x["load_s"] for x in runs["diffusers"]])
    ready = lambda rs: [x["load_s"] + x["touch_s"] for x in rs]
    out["ratio_ready_s"] = paired_ratio(ready(runs["ours"]), ready(runs["diffusers"]))
    out["ratio_delta_peak"] = out["ours"]["delta_peak_mib"] / out["diffusers"]["delta_peak_mib"]
    return out


# ---------------------------------------------------------------- (a) forward

def bench_forward(folder: Path, reps: int, warmup: int, log) -> dict:
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from mask.store import AttentionStore
    from weights import load
    diffusers.utils.logging.set_verbosity_error()

    ours = load(folder, components=("unet",), device="cpu", dtype=torch.float32).unet
    ref = DiffusersUNet.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).eval()
    processors = sorted({type(p).__name__ for p in ref.attn_processors.values()})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(500)
    store = AttentionStore((64, 64), rounds=1, cfg=True)  # batch 2 = [uncond, cond]
    recorded: set[str] = set()

    class Spy:  # which layers actually recorded (checked once, outside the timings)
        def wants(self, name, hw):
            return store.wants(name, hw)

        def record(self, name, probs):
            recorded.add(name)
            store.record(name, probs)

    outs = {}

    def run_ours():
        outs["ours"] = ours(x, t, ctx)

    def run_diffusers():
        outs["diffusers"] = ref(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    def run_recorder():
        outs["recorder"] = ours(x, t, ctx, recorder=store)
        store.end_step()

    with torch.inference_mode():
        ours(x, t, ctx, recorder=Spy())  # also the first (untimed) warm-up of the recording path
        store.reset()
        times = interleaved({"ours": run_ours, "diffusers": run_diffusers, "ours+recorder": run_recorder},
                            reps, warmup, log)
        max_diff = (outs["ours"] - outs["diffusers"]).abs().max().item()
        max_diff_rec = (outs["recorder"] - outs["diffusers"]).abs().max().item()
    d = times["diffusers"]
    return {
        "shapes": {"sample": [2, 4, 64, 64], "encoder_hidden_states": [2, 77, 768], "timestep": 500},
        "diffusers_attn_processors": processors,
        "recorded_layers": sorted(recorded),
        "times_s": {k: summary(v) for k, v in times.items()},
        "ratio_ours_over_diffusers": paired_ratio(times["ours"], d),
        "ratio_recorder_over_diffusers": paired_ratio(times["ours+recorder"], d),
        "ratio_recorder_over_ours": paired_ratio(times["ours+recorder"], times["ours"]),
        "ratio_of_medians_ours_over_diffusers": median(times["ours"]) / median(d),
        "max_abs_diff_ours_vs_diffusers": max_diff,
        "max_abs_diff_recorder_vs_diffusers": max_diff_rec,
    }


# ---------------------------------------------------------------- report

def report_forward(f: dict) -> None:
    ts = f["times_s"]
    print("\n(a) UNet forward, SD v1.4 full size, fp32 CPU, batch 2 (CFG pair), 64x64 latent, 77x768 context")
    print(f"    diffusers attention processors: {', '.join(f['diffusers_attn_processors'])}; "
          f"recorder on {len(f['recorded_layers'])} layers: {', '.join(f['recorded_layers'])}")
    rows = []
    for name, ratio in (("diffusers", 1.0), ("ours", f["ratio_ours_over_diffusers"]),
                        ("ours+recorder", f["ratio_recorder_over_diffusers"])):
        s = ts[name]
        rows.append([name, f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}", str(s["n"]), f"{ratio:.3f}"])
    print(table(rows, ["model", "median s", "min s", "max s", "reps", "/ diffusers"]))
    print(f"    ours / diffusers = {f['ratio_ours_over_diffusers']:.3f} (median of paired ratios; ratio of medians "
          f"{f['ratio_of_medians_ours_over_diffusers']:.3f}); bar <= 1.0: "
          f"{'met' if f['ratio_ours_over_diffusers'] <= 1.0 else 'NOT met'}")
    print(f"    recorder cost: ours+recorder / ours = {f['ratio_recorder_over_ours']:.3f}")
    print(f"    parity: max |ours - diffusers| = {f['max_abs_diff_ours_vs_diffusers']:.2e}, "
          f"with recorder {f['max_abs_diff_recorder_vs_diffusers']:.2e}")


def report_load(b: dict) -> None:
    print("\n(b) UNet load from the diffusers-layout folder (fresh subprocess per load, weights already in page cache)")
    print("    load = the loader call; ready = load + one read pass over every weight (both loaders may return")
    print("    lazy views of the memory-mapped file, paged in on first use); RSS in MiB, delta = peak - baseline")
    rows = []
    for name in ("ours", "diffusers"):
        s = b[name]
        rows.append([name, f"{s['load_s']['median']:.2f}", f"{s['ready_s']['median']:.2f}",
                     f"{s['baseline_peak_mib']:.0f}", f"{s['peak_after_load_mib']:.0f}", f"{s['peak_mib']:.0f}",
                     f"{s['delta_peak_mib']:.0f}", f"{s['rss_anon_after_mib']:.0f}", f"{s['rss_file_after_mib']:.0f}"])
    print(table(rows, ["loader", "load s", "ready s", "baseline", "peak@load", "peak@ready", "delta",
                       "anon", "file-backed"]))
    print(f"    imports-only process: peak RSS {b['imports_only_peak_mib']:.0f} MiB; "
          f"fp32 parameters: {b['ours']['param_mib']:.0f} MiB")
    print(f"    ours / diffusers: load {b['ratio_load_s']:.3f}, ready {b['ratio_ready_s']:.3f} "
          f"(medians of paired ratios); peak-RSS delta {b['ratio_delta_peak']:.3f}")
    if not b["accelerate"]:
        print("    note: accelerate is not installed, so diffusers runs with low_cpu_mem_usage=False, "
              "its default in this environment")


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        import torch
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))  # the parent's count
        _child(sys.argv[2], sys.argv[sys.argv.index("--folder") + 1])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (3 forward reps, 2 load reps)")
    p.add_argument("--reps", type=int, default=None, help="interleaved forward repetitions (default 7; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up forwards per model (default 1)")
    p.add_argument("--load-reps", type=int, default=None, help="loads per loader (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--folder", default=None,
                   help="reuse this diffusers-layout folder (with unet/) instead of writing random SD v1.4 weights")
    p.add_argument("--only", choices=["forward", "load"], default=None, help="run one part only")
    p.add_argument("--json", default=None, help="also write all figures (and raw timings) to this file")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    load_reps = args.load_reps or (2 if args.quick else 3)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    info = env_info()
    print(f"bench_models: torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs, "
          f"load average {info['loadavg_start']}; forward reps {reps} (+{args.warmup} warm-up), load reps {load_reps}")

    tmp = None
    if args.folder:
        folder = Path(args.folder)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-sd14-"))
        folder = tmp / "sd14"
        tic = time.perf_counter()
        save_sd14_unet_folder(folder)
        log(f"wrote random SD v1.4 UNet to {folder} in {time.perf_counter() - tic:.1f} s")
    result = {"env": info}
    try:
        if args.only in (None, "load"):
            result["load"] = bench_load(folder, load_reps, log)
        if args.only in (None, "forward"):
            result["forward"] = bench_forward(folder, reps, args.warmup, log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["env"]["loadavg_end"] = loadavg()
    if "forward" in result:
        report_forward(result["forward"])
    if "load" in result:
        report_load(result["load"])
    print(f"\nload average at start {info['loadavg_start']}, at end {result['env']['loadavg_end']} "
          f"({info['cpus']} CPUs): the machine is shared, so read the ratios, not the seconds")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
