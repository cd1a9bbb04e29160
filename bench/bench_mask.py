#!/usr/bin/env python3
"""What InstDiffEdit's instant mask costs per denoising step, next to the UNet step it rides on (CPU, fp32).

1. Mask bookkeeping per step at SD v1.4 shapes (64x64 latent, 16x16 maps, 77 tokens, 8 heads,
   n=3 rounds with CFG -> batch 6): ``AttentionStore.record`` on the five recorded layers'
   probabilities + ``end_step`` + ``maps`` + ``instant_mask`` for a 6-word edit text, at the first
   step (Eq. 6-8 evaluated) and at a later step (P reused).
2. The recording attention path: the attention core of the five 16x16 ``attn2`` layers with the
   explicit fp32 softmax (recorder attached) against ``F.scaled_dot_product_attention`` (no
   recorder), at their real shapes; and one whole UNet forward at batch 6 with and without the
   AttentionStore.
   The bar for (mask bookkeeping) / (UNet step) is <= 2%.
3. One whole edit (defaults: 50 steps, strength 0.5, 3 rounds, inpainting finish) on a tiny model:
   the bundled toy model (assets/toy-sd + assets/toy-sd-inpaint) when present, otherwise a tiny
   random SD with SD v1.4's block structure built like tests/tiny_sd.py. Prints the load time,
   EditResult.timings, and where stage 1's time goes.

    python bench/bench_mask.py [--quick] [--json out.json] [--skip-unet] [--skip-edit]

All timings in one part are interleaved repetitions (rotating order), reported as medians and ratios;
the machine is shared, so read the ratios rather than the seconds.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ROOT,
    env_info,
    interleaved,
    loadavg,
    median,
    paired_ratio,
    summary,
    table,
    write_json,
)

EDIT_TEXT = "a blue square on grey background"  # 6 words
LATENT, GRID, TOKENS, HEADS, ROUNDS = 64, 16, 77, 8, 3
BATCH = 2 * ROUNDS  # [uncond x n, cond x n]
RECORDED = ["down_blocks.2.attentions.0.transformer_blocks.0.attn2",
            "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.2.transformer_blocks.0.attn2"]


def clip_vocab_gz() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")  # located, never imported (its __init__ needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return p if p.is_file() else None


def word_positions(text: str, workdir: Path) -> tuple[list[list[int]], str]:
    """Token positions of each word, from the real CLIP tokenizer when its vocabulary is at hand."""
    gz = clip_vocab_gz()
    if gz is not None:
        from model.tokenizer import Tokenizer, write_clip_vocab
        folder = workdir / "clip_vocab"
        if not (folder / "merges.txt").is_file():
            write_clip_vocab(gz, folder)
        words = Tokenizer.from_folder(folder).words(text)
        return [pos for _, pos in words], "CLIP tokenizer"
    return [[i + 1] for i in range(len(text.split()))], "one token per word (CLIP vocabulary not found)"


# ---------------------------------------------------------------- 1. mask bookkeeping

def bench_mask_step(positions, reps: int, log) -> dict:
    import torch

    from mask.instant import instant_mask
    from mask.store import AttentionStore
    g = torch.Generator().manual_seed(0)
    probs = [(torch.randn(BATCH, HEADS, GRID * GRID, TOKENS, generator=g) * 3).softmax(-1) for _ in RECORDED]
    store = AttentionStore((LATENT, LATENT), rounds=ROUNDS, cfg=True)
    P = {}

    def record_and_close():
        for name, p in zip(RECORDED, probs):
            store.record(name, p)
        store.end_step()

    def first_step():  # Eq. 6-8 evaluated
        record_and_close()
        P["P"] = instant_mask(store.maps(), positions, (LATENT, LATENT)).P

    def later_step():  # P reused, as at every step after the first
        record_and_close()
        instant_mask(store.maps(), positions, (LATENT, LATENT), P=P["P"])

    def later_step_1thread():  # small ops: on a busy machine a second thread mostly waits for a core
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            later_step()
        finally:
            torch.set_num_threads(n)

    def maps_only():
        store.maps()

    def instant_only():
        instant_mask(maps, positions, (LATENT, LATENT), P=P["P"])

    with torch.inference_mode():
        first_step()
        maps = store.maps()
        fns = {"first step": first_step, "later step": later_step, "record x5 + end_step": record_and_close,
               "maps": maps_only, "instant_mask (P given)": instant_only}
        if torch.get_num_threads() > 1:
            fns["later step, 1 thread"] = later_step_1thread
        times = interleaved(fns, reps, warmup=3)
    log(f"  mask step: later step median {median(times['later step']) * 1e3:.2f} ms")
    return {"times_s": {k: summary(v) for k, v in times.items()},
            "shapes": {"probs": [BATCH, HEADS, GRID * GRID, TOKENS], "layers": len(RECORDED),
                       "latent": [LATENT, LATENT]}}


# ---------------------------------------------------------------- 2. attention path and UNet step

class NullRecorder:
    """Asks for every 16x16 layer and throws the maps away: the attention path alone."""

    def wants(self, name, hw):
        return tuple(hw) == (GRID, GRID)

    def record(self, name, probs):
        pass


def build_unet(folder: str | None, log):
    import torch
    tic = time.perf_counter()
    if folder:
        from weights import load
        unet = load(folder, components=("unet",), device="cpu", dtype=torch.float32).unet
        how = f"loaded from {folder}"
    else:
        from model.unet import UNet2DConditionModel, UNetConfig
        torch.manual_seed(0)
        unet = UNet2DConditionModel(UNetConfig()).eval().requires_grad_(False)  # SD v1.4 config, random init
        how = "SD v1.4 config, random init"
    log(f"  UNet ({how}) ready in {time.perf_counter() - tic:.1f} s")
    return unet, how


def bench_attention(unet, reps: int, log) -> dict:
    """The five recorded attn2 layers' attention core: explicit fp32 softmax (recorder attached) vs SDPA.

    The layers are copies of the UNet's own, with the q/k/v/out projections replaced by identities
    (the context is fed at the inner width), so ``Attention.forward`` runs unchanged on the real
    shapes -- q (6, 8, 256, 160), k/v (6, 8, 77, 160) -- but the ~5 GFLOP of projections, identical
    on both paths, no longer drown the difference in timing noise.
    """
    import copy

    import torch
    from torch import nn
    layers = dict(unet.named_modules())
    attn = []
    for n in RECORDED:
        a = copy.deepcopy(layers[n])
        a.to_q, a.to_k, a.to_v, a.to_out = nn.Identity(), nn.Identity(), nn.Identity(), nn.ModuleList([nn.Identity()])
        attn.append(a)
    inner = [layers[n].to_q.out_features for n in RECORDED]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, GRID * GRID, c, generator=g) for c in inner]
    ctxs = [torch.randn(BATCH, TOKENS, c, generator=g) * 0.3 for c in inner]
    null = NullRecorder()

    def sdpa():
        for a, x, c in zip(attn, xs, ctxs):
            a(x, c)

    def explicit():
        for a, x, c in zip(attn, xs, ctxs):
            a(x, c, recorder=null, hw=(GRID, GRID))

    with torch.inference_mode():
        times = interleaved({"SDPA": sdpa, "explicit softmax": explicit}, reps, warmup=3)
        ref = torch.cat([a(x, c) for a, x, c in zip(attn, xs, ctxs)])
        rec = torch.cat([a(x, c, recorder=null, hw=(GRID, GRID)) for a, x, c in zip(attn, xs, ctxs)])
    log(f"  5 attn2 cores: SDPA {median(times['SDPA']) * 1e3:.1f} ms, "
        f"explicit {median(times['explicit softmax']) * 1e3:.1f} ms")
    return {"times_s": {k: summary(v) for k, v in times.items()},
            "ratio_explicit_over_sdpa": paired_ratio(times["explicit softmax"], times["SDPA"]),
            "extra_s": median([a - b for a, b in zip(times["explicit softmax"], times["SDPA"])]),
            "max_abs_diff": (ref - rec).abs().max().item(),
            "heads": layers[RECORDED[0]].heads, "channels": inner}


def bench_unet_step(unet, reps: int, warmup: int, log) -> dict:
    import torch

    from mask.store import AttentionStore
    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    ctx = torch.randn(BATCH, TOKENS, 768, generator=g)
    t = torch.tensor(500)
    store = AttentionStore((LATENT, LATENT), rounds=ROUNDS, cfg=True)

    def plain():
        unet(x, t, ctx)

    def recorded():
        unet(x, t, ctx, recorder=store)
        store.end_step()

    with torch.inference_mode():
        times = interleaved({"UNet": plain, "UNet + AttentionStore": recorded}, reps, warmup, log)
    return {"times_s": {k: summary(v) for k, v in times.items()},
            "ratio_recorded_over_plain": paired_ratio(times["UNet + AttentionStore"], times["UNet"]),
            "shapes": {"sample": [BATCH, 4, LATENT, LATENT], "encoder_hidden_states": [BATCH, TOKENS, 768]}}


# ---------------------------------------------------------------- 3. whole edit on a tiny model

def build_tiny(folder: Path, latent: int = 32) -> tuple[Path, Path]:
    """Tiny random SD (SD v1.4 block structure, narrow widths) and its 9-channel inpainting UNet."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.tokenizer import write_clip_vocab
    from tests.helpers_unet import diffusers_unet
    from tests.tiny_sd import _perturb, save_sd_folder
    gz = clip_vocab_gz()
    if gz is None:
        raise SystemExit("the tiny model needs the CLIP vocabulary: pip install --no-deps open-clip-torch")
    vocab = write_clip_vocab(gz, folder / "vocab")
    cfg = lambda c: dict(in_channels=c, block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
                         cross_attention_dim=32, norm_num_groups=8, sample_size=latent)
    unet, inpaint = diffusers_unet(cfg(4), 0), diffusers_unet(cfg(9), 1)
    torch.manual_seed(2)
    vae = _perturb(AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=2, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4), 3)
    torch.manual_seed(4)
    clip = _perturb(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=12, num_attention_heads=4)), 5, 0.02)
    sd = save_sd_folder(folder / "tiny-sd", unet, vae, clip, vocab)
    inpaint.save_pretrained(folder / "tiny-sd-inpaint" / "unet")
    return sd, folder / "tiny-sd-inpaint"


class Timer:
    """Wraps a callable and sums its wall time (the benchmark's own instrumentation)."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, 0.0, 0

    def __call__(self, *a, **kw):
        tic = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.total += time.perf_counter() - tic
            self.calls += 1


def bench_edit(workdir: Path, steps: int, threads: int, log) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    import instdiffedit
    import methods.instdiffedit as method_instdiffedit  # where stage 1 calls instant_mask
    from mask.store import AttentionStore
    from toy.world import render, scene_from_seed

    toy, toy_inpaint = Path(instdiffedit.TOY_MODEL), Path(instdiffedit.TOY_INPAINT_MODEL)
    if toy.is_dir() and toy_inpaint.is_dir():
        model, inpaint_model, what = toy, toy_inpaint, f"bundled toy model ({toy.relative_to(ROOT)})"
    else:
        tic = time.perf_counter()
        model, inpaint_model = build_tiny(workdir)
        what = "tiny random SD v1.4-structured model (assets/toy-sd + assets/toy-sd-inpaint not both present)"
        log(f"  built the tiny model in {time.perf_counter() - tic:.1f} s")

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    tic = time.perf_counter()
    pipe = instdiffedit.InstDiffEdit.from_pretrained(str(model), str(inpaint_model), device="cpu",
                                                     dtype=torch.float32)
    load_s = time.perf_counter() - tic
    img = Image.fromarray(render(scene_from_seed(0), size=pipe.size // 2)[0])
    lat = pipe.unet.config.sample_size
    # the toy model is made for the pipeline's default (16x16 maps); the tiny stand-in records the
    # layers SD v1.4 records, at latent / 4
    attention_res = instdiffedit.EditOptions().attention_res if model == toy else lat // 4

    # instrumentation: time spent in the networks and in the mask bookkeeping during the edit
    timers = {"stage-1 UNet": Timer(pipe.unet.forward), "inpainting UNet": Timer(pipe.inpaint_unet.forward),
              "text encoder": Timer(pipe.text_encoder.forward), "VAE encode": Timer(pipe.vae.encode),
              "VAE decode": Timer(pipe.vae.decode), "instant_mask": Timer(method_instdiffedit.instant_mask),
              "AttentionStore.maps": Timer(AttentionStore.maps), "AttentionStore.end_step": Timer(AttentionStore.end_step)}
    pipe.unet.forward, pipe.inpaint_unet.forward = timers["stage-1 UNet"], timers["inpainting UNet"]
    pipe.text_encoder.forward = timers["text encoder"]
    pipe.vae.encode, pipe.vae.decode = timers["VAE encode"], timers["VAE decode"]
    old = method_instdiffedit.instant_mask, AttentionStore.maps, AttentionStore.end_step
    method_instdiffedit.instant_mask = timers["instant_mask"]
    AttentionStore.maps = lambda self: timers["AttentionStore.maps"](self)
    AttentionStore.end_step = lambda self: timers["AttentionStore.end_step"](self)
    try:
        tic = time.perf_counter()
        res = pipe.edit(img, EDIT_TEXT, steps=steps, attention_res=attention_res)
        total = time.perf_counter() - tic
    finally:
        method_instdiffedit.instant_mask, AttentionStore.maps, AttentionStore.end_step = old
        torch.set_num_threads(threads_before)
    return {"model": what, "threads": threads, "image_size": pipe.size, "latent": lat, "attention_res": attention_res,
            "edit": EDIT_TEXT, "steps": steps,
            "words": res.words, "P": res.P, "mask_fraction": float(np.asarray(res.mask).mean() / 255),
            "load_s": load_s, "edit_s": total, "timings": res.timings,
            "parts": {k: {"s": v.total, "calls": v.calls} for k, v in timers.items()},
            "unet_params": pipe.unet.num_params}


# ---------------------------------------------------------------- report

def ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def report(r: dict) -> None:
    m = r["mask_step"]["times_s"]
    print(f"\n1. Mask bookkeeping per step, SD v1.4 shapes: probs {r['mask_step']['shapes']['probs']} x "
          f"{len(RECORDED)} layers, 64x64 latent, edit \"{EDIT_TEXT}\" -> positions {r['positions']} ({r['tokenizer']})")
    print(table([[k, ms(v["median"]), ms(v["min"]), str(v["n"])] for k, v in m.items()],
                ["part", "median ms", "min ms", "reps"]))
    later, first = m["later step"]["median"], m["first step"]["median"]
    if "unet" in r:
        u = r["unet"]["times_s"]
        a = r["attention"]
        T = u["UNet"]["median"]
        print(f"\n2. Recording attention path and UNet step at batch {BATCH} (n={ROUNDS} rounds with CFG), "
              f"UNet: {r['unet_how']}")
        print(table([[k, ms(v["median"]), ms(v["min"]), str(v["n"])] for k, v in a["times_s"].items()],
                    [f"5 attn2 cores ({a['heads']} heads x {a['channels'][0] // a['heads']})", "median ms", "min ms", "reps"]))
        print(f"    explicit / SDPA = {a['ratio_explicit_over_sdpa']:.3f}; extra {ms(a['extra_s'])} ms per step "
              f"(max |diff| {a['max_abs_diff']:.1e})")
        print(table([[k, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{v['max']:.3f}", str(v["n"])] for k, v in u.items()],
                    ["whole UNet forward", "median s", "min s", "max s", "reps"]))
        print(f"    UNet + AttentionStore / UNet = {r['unet']['ratio_recorded_over_plain']:.3f} "
              f"(whole forwards: paired median, noisy at this size)")
        total = a["extra_s"] + later
        print("\n   Per step, relative to one plain UNet step "
              f"({T:.3f} s):")
        rows = [["mask bookkeeping, first step", ms(first), f"{100 * first / T:.3f}%"],
                ["mask bookkeeping, later steps", ms(later), f"{100 * later / T:.3f}%"],
                ["recording attention path (5 cores)", ms(a["extra_s"]), f"{100 * a['extra_s'] / T:.3f}%"],
                ["total extra per later step", ms(total), f"{100 * total / T:.3f}%"]]
        print(table(rows, ["cost", "ms", "of UNet step"]))
        print(f"    bar (mask bookkeeping <= 2% of a UNet step): "
              f"{'met' if max(first, later) / T <= 0.02 else 'NOT met'}")
    if "edit" in r:
        e = r["edit"]
        print(f"\n3. One whole edit on the {e['model']}: {e['image_size']} px image, {e['latent']}x{e['latent']} latent, "
              f"{e['unet_params'] / 1e6:.2f}M-parameter UNet, {e['attention_res']}x{e['attention_res']} maps, "
              f"{e['steps']} steps, strength 0.5, 3 rounds, {e['threads']} thread(s), "
              f"edit \"{e['edit']}\"")
        rows = [["load (InstDiffEdit.from_pretrained)", f"{e['load_s']:.3f}", ""]]
        rows += [[f"EditResult.timings[{k!r}]", f"{v:.3f}", ""] for k, v in e["timings"].items()]
        rows += [["edit() wall", f"{e['edit_s']:.3f}", ""]]
        rows += [[f"  of which {k}", f"{v['s']:.3f}", str(v["calls"])] for k, v in e["parts"].items()]
        print(table(rows, ["stage", "s", "calls"]))
        st1 = e["timings"].get("mask_s", e["timings"].get("mask_and_guided_denoising_s"))
        mk = sum(e["parts"][k]["s"] for k in ("instant_mask", "AttentionStore.maps", "AttentionStore.end_step"))
        if st1:
            print(f"    mask bookkeeping = {100 * mk / st1:.1f}% of stage 1 on this tiny model "
                  f"(the UNet is tiny here, so this share says nothing about SD v1.4; see part 2)")
        print(f"    words {e['words']}, P {e['P']}, mask covers {100 * e['mask_fraction']:.1f}% of the image")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--reps", type=int, default=None, help="UNet forwards per variant (default 4; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed UNet forwards per variant (default 1)")
    p.add_argument("--mask-reps", type=int, default=None, help="mask-step repetitions (default 200; quick 50)")
    p.add_argument("--attn-reps", type=int, default=None, help="attention-core repetitions (default 100; quick 30)")
    p.add_argument("--steps", type=int, default=50, help="inference steps of the tiny edit (default 50)")
    p.add_argument("--edit-threads", type=int, default=1,
                   help="torch threads for the tiny edit (default 1: its ops are small, and on a shared machine "
                        "a second thread mostly waits for a core, slowing them by up to ~50x)")
    p.add_argument("--folder", default=None, help="load the full-size UNet from this SD folder instead of random init")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--skip-unet", action="store_true", help="skip the full-size UNet parts")
    p.add_argument("--skip-edit", action="store_true", help="skip the tiny-model edit")
    p.add_argument("--json", default=None, help="also write all figures (and raw timings) to this file")
    args = p.parse_args(argv)
    reps = args.reps or (2 if args.quick else 4)
    mask_reps = args.mask_reps or (50 if args.quick else 200)
    attn_reps = args.attn_reps or (30 if args.quick else 100)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    info = env_info()
    print(f"bench_mask: torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs, load average "
          f"{info['loadavg_start']}; UNet reps {reps} (+{args.warmup} warm-up), mask reps {mask_reps}, "
          f"attention reps {attn_reps}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-mask-"))
    r: dict = {"env": info}
    try:
        r["positions"], r["tokenizer"] = word_positions(EDIT_TEXT, workdir)
        r["mask_step"] = bench_mask_step(r["positions"], mask_reps, log)
        if not args.skip_unet:
            unet, r["unet_how"] = build_unet(args.folder, log)
            r["attention"] = bench_attention(unet, attn_reps, log)
            r["unet"] = bench_unet_step(unet, reps, args.warmup, log)
            del unet
            gc.collect()
        if not args.skip_edit:
            r["edit"] = bench_edit(workdir, args.steps, args.edit_threads, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    r["env"]["loadavg_end"] = loadavg()
    report(r)
    print(f"\nload average at start {info['loadavg_start']}, at end {r['env']['loadavg_end']} ({info['cpus']} CPUs): "
          "the machine is shared, so read the ratios, not the seconds")
    write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
