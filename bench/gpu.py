"""One-call GPU benchmark: a 512x512 edit with ours (eager fp16, compiled, compiled + CUDA graphs, offload)
against the authors' pipeline reproduced with diffusers, in the same run, on the same random weights.

    python bench/gpu.py                 # CUDA: SD v1.4 sizes, random weights built on the device, no downloads
    python bench/gpu.py --tiny          # the same code on the CPU with the toy model's configs (CI runs this)

Sections, in order (each prints its elapsed time; --budget-s skips what would not fit, with a note):

  unet_step    one UNet forward, fp16, 64x64 latent, 77x768 text: ours vs diffusers' UNet2DConditionModel
               (its default SDPA processor), batch 2 (one CFG pair) and 6 (3 rounds x CFG); ours also with
               the recorder on (the 16x16 cross-attention layers leave SDPA for one explicit softmax)
  mask_share   InstDiffEdit's own work per stage-1 step (store, Eq. 6-9, Eq. 5, the LMS step) as a share of
               the whole step
  ours_eager   seconds per edit (stage 1, finish, total), fp16, and peak device memory above the start
  authors      their pipeline: fp32 stage 1 whose attention store keeps every map with <= 32x32 queries
               (self and cross) and moves each step's maps, mask and latents through the CPU (PIL, OpenCV,
               numpy) as model/InstDiffEdit.py does; then diffusers' fp16 StableDiffusionInpaintPipeline
  offload      ours with only the UNet in use on the device: its cost in seconds
  compiled     ours with torch.compile'd UNets (the first call compiles: not timed)
  graphs       ours compiled + the loops replayed from CUDA graphs (captured once per loop per edit); with
               --tiny on the CPU: the make_fx stand-in for the graphs (model/runtime.py), without compile

Medians of --reps (>= 5) edits after one warm-up edit. Writes --out (JSON, with the GPU's name).
Bars (issue 14): total <= 1.0 s per 512 edit with compile + graphs on an H100/H200-class GPU; >= 6x faster
than the authors' pipeline; our UNet step <= 1.0x diffusers'; mask work <= 2% of the stage-1 step.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import diffusers_lms_scheduler, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-sd"
EDIT = "a blue circle"
GiB = 2**30


# ---------------------------------------------------------------- timing and budget

class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def reps(self, name: str, one_s: float, want: int, minimum: int = 5) -> int:
        """How many timed edits fit (at least `minimum`, else 0 with a note)."""
        fit = int(self.left() / max(one_s, 1e-6))
        if fit < minimum:
            self.skipped.append(f"{name}: {one_s:.2f} s per run x {minimum} does not fit the {self.left():.0f} s left")
            return 0
        return min(want, fit)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    tic = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - tic, out


def peak_start(device) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_above(device, start: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - start) / GiB if device.type == "cuda" else None


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------- models: one set of random weights

def configs(tiny: bool) -> dict[str, dict]:
    """diffusers/transformers configs: SD v1.4's (our dataclass defaults), or the toy model's (--tiny)."""
    from model.clip import CLIPTextConfig
    from model.unet import UNetConfig
    from model.vae import VAEConfig
    if tiny:
        read = lambda c: {k: v for k, v in json.loads((TOY / c / "config.json").read_text()).items()
                          if not k.startswith("_")}
        unet, vae, clip = read("unet"), read("vae"), read("text_encoder")
    else:
        unet = UNetConfig().to_dict()
        v = asdict(VAEConfig())
        vae = {**v, "down_block_types": ["DownEncoderBlock2D"] * len(v["block_out_channels"]),
               "up_block_types": ["UpDecoderBlock2D"] * len(v["block_out_channels"])}
        clip = asdict(CLIPTextConfig())
    clip = {k: v for k, v in clip.items() if k in asdict(CLIPTextConfig())}
    return {"unet": unet, "inpaint_unet": {**unet, "in_channels": 9}, "vae": vae, "text_encoder": clip}


def build_models(device: torch.device, tiny: bool, seed: int = 0) -> dict:
    """diffusers/transformers modules with random weights (built on the device: fast, no download), and
    ours loaded from their state dicts by the project's loader (strict; fp16 tensors shared, not copied)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from weights.loader import build, load_tokenizer
    cfg = configs(tiny)
    half = torch.float16 if device.type == "cuda" else torch.float32  # the CPU (--tiny) runs fp32 throughout
    torch.manual_seed(seed)
    ref = {}
    with torch.device(device):
        for name in ("unet", "inpaint_unet"):
            u = UNet2DConditionModel(**cfg[name]).eval().requires_grad_(False)
            with torch.no_grad():  # the zero-initialised output layers get weights: outputs are not trivially 0
                for p in (u.conv_out.weight, *[m.proj_out.weight for m in u.modules() if hasattr(m, "proj_out")]):
                    p.normal_(0, 0.02)
            ref[name] = u
        ref["vae"] = AutoencoderKL(**cfg["vae"]).eval().requires_grad_(False)
        ref["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval().requires_grad_(False)
    fp32 = {k: ref[k] for k in ("unet", "vae", "text_encoder")}  # the authors' stage 1 runs in fp32
    fp16 = {k: copy.deepcopy(m).to(half) for k, m in ref.items()}
    del ref
    ours = {}
    for name, m in fp16.items():
        comp = "unet" if "unet" in name else name
        sd = m.state_dict()
        if comp == "text_encoder":
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        config = {k: v for k, v in cfg[name].items()}
        ours[name] = build(comp, {k: (lambda v=v: v) for k, v in sd.items()}, f"bench {name}", config, device, half)
    return {"fp32": fp32, "fp16": fp16, "ours": ours, "tokenizer": load_tokenizer(TOY / "tokenizer"),
            "dtype": half, "config": cfg}


def our_pipe(models, device, **options):
    from instdiffedit import InstDiffEdit
    from weights.loader import StableDiffusion
    o = models["ours"]
    sd = StableDiffusion(unet=o["unet"], vae=o["vae"], text_encoder=o["text_encoder"], tokenizer=models["tokenizer"])
    return InstDiffEdit(sd, o["inpaint_unet"], device, models["dtype"], **options)


def test_image(size: int) -> Image.Image:
    return Image.open(ROOT / "assets" / "examples" / "scene.png").convert("RGB").resize((size, size), Image.BICUBIC)


# ---------------------------------------------------------------- the authors' pipeline, reproduced

class AuthorsStore:
    """Their attention store's structure (model/attention_store.py): every attention map (self and cross)
    with at most 32x32 queries, conditional half, appended per step and summed over steps in place."""

    def __init__(self):
        self.step_store = self.empty()
        self.store: dict[str, list[torch.Tensor]] = {}
        self.cur_step, self.layer, self.n_layers = 0, 0, 0

    @staticmethod
    def empty():
        return {f"{p}_{k}": [] for p in ("down", "mid", "up") for k in ("cross", "self")}

    def __call__(self, probs: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:
        h = probs.shape[0]
        if probs.shape[1] <= 32**2:
            self.step_store[f"{place}_{'cross' if is_cross else 'self'}"].append(probs[h // 2:])
        self.layer += 1
        if self.layer == self.n_layers:  # the step's last layer: fold it into the running sums
            self.layer, self.cur_step = 0, self.cur_step + 1
            if not self.store:
                self.store = self.step_store
            else:
                for key in self.store:
                    for i, t in enumerate(self.store[key]):
                        t += self.step_store[key][i]
            self.step_store = self.empty()
        return probs

    def average(self):  # a new tensor for every stored map, every step, as theirs
        return {key: [t / self.cur_step for t in ts] for key, ts in self.store.items()}


class AuthorsProcessor:
    """A diffusers attention processor with an explicit softmax in every layer, handed to the store."""

    def __init__(self, store: AuthorsStore, place: str):
        self.store, self.place = store, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = self.store(attn.get_attention_scores(q, k, None), is_cross, self.place)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


class Authors:
    """model/InstDiffEdit.py's edit, step for step: fp32 SD for stage 1 with the mask computed on the CPU
    from PIL images every step, the blend on the CPU, then the fp16 inpainting pipeline."""

    def __init__(self, models, device, size: int, steps: int = 50, strength: float = 0.5, rounds: int = 3):
        from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline
        from transformers import CLIPTokenizer
        self.device, self.size, self.steps, self.strength, self.rounds = device, size, steps, strength, rounds
        f32 = models["fp32"]
        self.unet, self.vae, self.text_encoder = f32["unet"], f32["vae"], f32["text_encoder"]
        self.tokenizer = CLIPTokenizer(str(TOY / "tokenizer" / "vocab.json"), str(TOY / "tokenizer" / "merges.txt"),
                                       model_max_length=77)
        self.scheduler = diffusers_lms_scheduler()
        f16 = models["fp16"]
        self.inpaint = StableDiffusionInpaintPipeline(
            vae=f16["vae"], text_encoder=f16["text_encoder"], tokenizer=self.tokenizer, unet=f16["inpaint_unet"],
            scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.inpaint.set_progress_bar_config(disable=True)
        self.store = AuthorsStore()
        procs = {}
        for name in self.unet.attn_processors:
            procs[name] = AuthorsProcessor(self.store, name.split("_")[0])
        self.unet.set_attn_processor(procs)
        self.store.n_layers = len(procs)
        self.res = self.unet.config.sample_size // 4  # the 16x16 maps for SD v1.4

    def embed(self, text: str) -> torch.Tensor:
        ids = self.tokenizer([text], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        # theirs: through numpy fp16 on the host, then back to the device
        e = torch.from_numpy(self.text_encoder(ids)[0].cpu().numpy().astype(np.float16))
        return e.expand(self.rounds, -1, -1).to(self.device)

    @torch.no_grad()
    def stage1(self, img: Image.Image, text: str, seed: int = 0) -> Image.Image:
        from PIL import ImageChops
        import cv2
        d, n, lat = self.device, self.rounds, self.unet.config.sample_size
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(d)
        latent = self.vae.encode(x * 2 - 1).latent_dist.sample() * 0.18215
        self.store.__init__()
        self.store.n_layers = len(self.unet.attn_processors)
        emb = torch.cat([self.embed(""), self.embed(text)]).float()
        sch = self.scheduler
        sch.set_timesteps(self.steps)
        init = int(self.steps * self.strength)
        g = torch.Generator(d).manual_seed(seed)
        noises = torch.cat([torch.randn(latent.shape, generator=g, device=d) for _ in range(n)])
        t0 = sch.timesteps[-init]
        latents = torch.cat([sch.add_noise(latent, noises[j:j + 1], torch.tensor([t0])) for j in range(n)])
        tokens = self.tokenizer.encode(text)
        P, mask = [], None
        for tm in sch.timesteps[-init:]:
            or_latents = torch.cat([copy.deepcopy(sch).add_noise(latent, noises[j:j + 1], torch.tensor([tm]))
                                    for j in range(n)])
            inp = sch.scale_model_input(torch.cat([latents] * 2), tm)
            uncond, cond = self.unet(inp, tm, encoder_hidden_states=emb).sample.chunk(2)
            latents = sch.step(uncond + 7.5 * (cond - uncond), tm, latents).prev_sample
            # the mask, on the host: maps -> 8-bit PIL images -> similarities -> OpenCV blur
            avg = self.store.average()
            sel = [m.reshape(n, -1, self.res, self.res, m.shape[-1]) for key in ("up_cross", "down_cross")
                   for m in avg[key] if m.shape[1] == self.res**2]
            maps = torch.cat(sel, 0).mean(0)
            maps = (maps.sum(0) / maps.shape[0]).cpu()
            images = []
            for i in range(len(tokens)):
                m = maps[:, :, i]
                images.append(Image.fromarray((255 * m / m.max()).numpy().astype(np.uint8)).resize((lat, lat)))
            images[0] = ImageChops.invert(images[0])
            arrs = []
            for im in images:
                a = np.asarray(im, dtype=np.float32) / 255
                arrs.append(((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8).astype(np.float32) / 255)
            if len(arrs) == 3:
                refined = arrs[1]
            else:
                if not P:
                    flat = [a.flatten() for a in arrs]
                    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
                    index = 1 + int(np.argmax([cos(f, flat[0]) for f in flat[1:-1]]))
                    P = [0] + [1 if s >= 0.9 else -1 if s <= 0.6 else 0
                               for s in (cos(f, flat[index]) for f in flat[1:-1])] + [0]
                obj = np.mean([a for a, p in zip(arrs, P) if p == 1], 0)
                obj = (obj - obj.min()) / (obj.max() - obj.min())
                back = [a for a, p in zip(arrs, P) if p == -1]
                if back:
                    b = np.mean(back, 0)
                    refined = np.clip(obj - (b - b.min()) / (b.max() - b.min()), 0, None)
                else:
                    refined = obj
            soft = cv2.GaussianBlur(cv2.GaussianBlur(refined.astype(np.float32), (5, 5), 0), (5, 5), 0)
            soft = (soft - soft.min()) / (soft.max() - soft.min())
            mask = Image.fromarray(((soft > 0.2) * 255).astype(np.uint8))
            # Eq. 5 on the host, as theirs: latents and source to the CPU, blend, back to the device
            m = torch.from_numpy(np.asarray(mask.resize((lat, lat)), dtype=np.float32) / 255)
            m = m.expand(latents.shape[1], -1, -1)[None]
            lc, oc = latents.cpu(), or_latents.cpu()
            latents = (oc + m * (lc - oc)).to(d)
        return mask

    def edit(self, img: Image.Image, text: str, seed: int = 0) -> dict:
        t1, mask = timed(lambda: self.stage1(img, text, seed), self.device)
        g = torch.Generator(self.device).manual_seed(seed)
        t2, _ = timed(lambda: self.inpaint(prompt=text, image=img, mask_image=mask.resize((self.size, self.size)),
                                           num_inference_steps=self.steps, generator=g).images[0], self.device)
        return {"stage1_s": t1, "finish_s": t2, "total_s": t1 + t2}


# ---------------------------------------------------------------- sections

def edit_times(run, reps: int, budget: Budget, name: str, device) -> dict | None:
    """One warm-up edit, then `reps` timed ones (fewer if the budget says so): medians and peak memory."""
    t_warm, _ = timed(run, device)
    n = budget.reps(name, t_warm, reps)
    if n == 0:
        return None
    start = peak_start(device)
    rows = [run() for _ in range(n)]
    out = {k: med([r[k] for r in rows]) for k in rows[0]}
    out.update(n=n, warmup_s=t_warm, peak_gib_above_start=peak_above(device, start), all=rows)
    return out


def ours_run(pipe, img, steps, device):
    def run():
        t, res = timed(lambda: pipe.edit(img, EDIT, steps=steps), device)
        return {"stage1_s": res.timings["mask_s"], "finish_s": res.timings["finish_s"], "total_s": t}
    return run


def unet_step(models, device, tiny: bool, iters: int) -> dict:
    """Ours vs diffusers' fp16 UNet forward (same weights), batch 2 and 6; ours with the recorder too."""
    from mask.store import AttentionStore
    ours, ref = models["ours"]["unet"], models["fp16"]["unet"]
    c = models["config"]["unet"]
    lat, ctx_dim, dt = c["sample_size"], c["cross_attention_dim"], models["dtype"]
    out = {}
    for b in (2, 6):
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 4, lat, lat, generator=g).to(device, dt)
        ctx = torch.randn(b, 77, ctx_dim, generator=g).to(device, dt)
        t = torch.tensor(500.0, device=device)
        store = AttentionStore((lat, lat), rounds=b // 2, factor=4)
        fns = {"ours": lambda: ours(x, t, ctx), "diffusers": lambda: ref(x, t, encoder_hidden_states=ctx).sample,
               "ours_recording": lambda: ours(x, t, ctx, recorder=store)}
        times = {k: [] for k in fns}
        with torch.no_grad():
            for f in fns.values():
                f()  # warm-up
            for r in range(iters):
                for k in list(fns)[r % 3:] + list(fns)[:r % 3]:  # rotate the order each round
                    times[k].append(timed(fns[k], device)[0])
                store.end_step()
        out[f"batch{b}"] = {**{f"{k}_s": med(v) for k, v in times.items()},
                            "ratio_ours_vs_diffusers": med([a / d for a, d in zip(times["ours"], times["diffusers"])]),
                            "ratio_recording_vs_ours": med([a / d for a, d in zip(times["ours_recording"], times["ours"])])}
    return out


def mask_share(pipe, img, steps: int, device, iters: int) -> dict:
    """One stage-1 step split: the UNet call (with the recorder) and everything InstDiffEdit adds (store
    close, Eq. 6-9, the LMS step, Eq. 5), timed apart on the state of a real stage 1."""
    from mask.instant import instant_mask
    from mask.store import AttentionStore
    from images import to_tensor
    o = pipe.options(steps=steps)
    with torch.no_grad():
        x0 = to_tensor(img, pipe.size, device, pipe.dtype)
        emb = pipe.encode_text(EDIT)
        sampler, start, z0, eps, x = pipe.noised(x0, o, torch.Generator().manual_seed(0), o.rounds)
        h, w = z0.shape[-2:]
        store = AttentionStore((h, w), rounds=o.rounds, factor=h // o.attention_res, tokens=77, device=device)
        positions = [p for _, p in pipe.tokenizer.words(EDIT)]
        i = start
        pred = pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timestep(i), emb, o.guidance, recorder=store)
        P = None

        def unet():
            return pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timestep(i), emb, o.guidance, recorder=store)

        def ours_work():
            nonlocal P
            store.end_step()
            x_next = sampler.step(pred, i, x)
            res = instant_mask(store.maps(), positions, (h, w), P=P, threshold=o.threshold)
            P = res.P
            y = sampler.add_noise_at(z0, eps, i)
            return y + res.mask.to(x.dtype) * (x_next - y)

        ours_work()
        tu, tm = [], []
        for _ in range(iters):
            tu.append(timed(unet, device)[0])
            sampler.reset()
            tm.append(timed(ours_work, device)[0])
    return {"unet_s": med(tu), "mask_and_step_s": med(tm), "share": med([m / (u + m) for u, m in zip(tu, tm)])}


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy-model configs on the CPU (the CI run of this script)")
    p.add_argument("--reps", type=int, default=5, help="timed edits per variant after one warm-up (>= 5)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (stage 1 runs strength x steps)")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip sections that would not fit in this time")
    p.add_argument("--out", default="runs/bench-gpu/gpu.json", help="JSON results")
    p.add_argument("--only", default=None, help="comma-separated sections to run (default all)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled sections (the CPU tests use 'eager': same dynamo "
                        "path, no minutes of C++ compilation)")
    args = p.parse_args(argv)
    if args.reps < 5:
        print("error: --reps must be at least 5 (medians of >= 5 timed edits)", file=sys.stderr)
        return 2
    if not args.tiny and not torch.cuda.is_available():
        print("error: bench/gpu.py needs CUDA (use --tiny on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    sections = ("unet_step", "mask_share", "ours_eager", "authors", "compiled", "graphs", "offload")
    only = set(args.only.split(",")) if args.only else set(sections)
    if only - set(sections):
        print(f"error: --only {args.only}: sections are {', '.join(sections)}", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "compile_backend": args.compile_backend,
              "mode": "tiny" if args.tiny else "sd-v1.4 sizes, random weights", "torch": torch.__version__,
              "reps": args.reps, "steps": args.steps, "sections": {}, "elapsed_s": {}}
    import diffusers
    result["diffusers"] = diffusers.__version__

    def log(name, tic):
        result["elapsed_s"][name] = round(time.perf_counter() - tic, 2)
        print(f"[{budget.elapsed():6.1f} s] {name}: {time.perf_counter() - tic:.1f} s", flush=True)

    tic = time.perf_counter()
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # not its advice on casting modules we cast on purpose
    models = build_models(device, args.tiny)
    result["dtype"] = str(models["dtype"]).removeprefix("torch.")
    size = models["config"]["unet"]["sample_size"] * 2 ** (len(models["config"]["vae"]["block_out_channels"]) - 1)
    img = test_image(size)
    result["image"] = f"{size}x{size}"
    log("build", tic)
    pipe = our_pipe(models, device)
    S = result["sections"]
    iters = 3 if args.tiny else 10
    for name in sections:
        if name not in only:
            continue
        if name in ("compiled", "graphs") and not args.tiny and budget.left() < 150 and "comp" not in locals():
            budget.skipped.append(f"{name}: {budget.left():.0f} s left, and compiling two UNets takes minutes")
            continue
        if budget.left() <= 0:
            budget.skipped.append(f"{name}: budget spent")
            continue
        tic = time.perf_counter()
        if name == "unet_step":
            S[name] = unet_step(models, device, args.tiny, iters)
        elif name == "mask_share":
            S[name] = mask_share(pipe, img, args.steps, device, iters)
        elif name == "ours_eager":
            S[name] = edit_times(ours_run(pipe, img, args.steps, device), args.reps, budget, name, device)
        elif name == "authors":
            a = Authors(models, device, size, args.steps)
            S[name] = edit_times(lambda: a.edit(img, EDIT), args.reps, budget, name, device)
            from diffusers.models.attention_processor import AttnProcessor2_0
            a.unet.set_attn_processor(AttnProcessor2_0())  # SDPA again, as the fp32 UNet was built
            del a
        elif name == "offload":
            # its own copies of the UNets: moving them must not move the modules the other sections share
            own = {**models, "ours": {**models["ours"], "unet": copy.deepcopy(models["ours"]["unet"]),
                                      "inpaint_unet": copy.deepcopy(models["ours"]["inpaint_unet"])}}
            off = our_pipe(own, device, offload=True)
            S[name] = edit_times(ours_run(off, img, args.steps, device), args.reps, budget, name, device)
            del off, own
        elif name == "compiled":
            comp = our_pipe(models, device, compile=args.compile_backend)
            S[name] = edit_times(ours_run(comp, img, args.steps, device), args.reps, budget, name, device)
        elif name == "graphs":
            if "compiled" not in only:
                comp = our_pipe(models, device, compile=args.compile_backend)
            graphed = our_pipe(models, device, cuda_graphs=True)
            if device.type == "cuda":  # the compiled UNets, reused (the CPU's make_fx stand-in cannot trace them)
                graphed.unet, graphed.inpaint_unet = comp.unet, comp.inpaint_unet
                graphed.placement.models = {"unet": comp.unet, "inpaint_unet": comp.inpaint_unet}
            S[name] = edit_times(ours_run(graphed, img, args.steps, device), args.reps, budget, name, device)
        log(name, tic)
        gc.collect()
    result["skipped"] = budget.skipped
    result["vae_fp32_decodes"] = pipe.vae_fp32_decodes
    result["total_elapsed_s"] = round(budget.elapsed(), 1)
    print(report(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def report(r: dict) -> str:
    S, f = r["sections"], lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    rows, dt = [], r["dtype"]
    for name, label in (("ours_eager", f"ours, eager {dt}"), ("compiled", "ours, compiled"),
                        ("graphs", "ours, compiled + CUDA graphs"), ("offload", "ours, eager, --offload"),
                        ("authors", "authors' pipeline (diffusers)")):
        s = S.get(name)
        if s:
            rows.append([label, f(s["stage1_s"]), f(s["finish_s"]), f(s["total_s"]), f(s["peak_gib_above_start"], 2)])
    lines = [f"device: {r['device']} ({r['mode']}, image {r.get('image')}, torch {r['torch']}, "
             f"diffusers {r['diffusers']})", table(rows, ["seconds per edit (median)", "stage 1", "finish", "total",
                                                          "peak GiB"])]
    if S.get("authors") and S.get("graphs"):
        lines.append(f"authors / ours compiled + graphs: {S['authors']['total_s'] / S['graphs']['total_s']:.1f}x")
    if S.get("authors") and S.get("ours_eager"):
        lines.append(f"authors / ours eager: {S['authors']['total_s'] / S['ours_eager']['total_s']:.1f}x")
    if S.get("unet_step"):
        for b, s in S["unet_step"].items():
            lines.append(f"UNet step {b}: ours {f(s['ours_s'] * 1e3, 1)} ms, diffusers {f(s['diffusers_s'] * 1e3, 1)} ms, "
                         f"ratio {f(s['ratio_ours_vs_diffusers'])}; recording / plain {f(s['ratio_recording_vs_ours'])}")
    if S.get("mask_share"):
        s = S["mask_share"]
        lines.append(f"mask work per stage-1 step: {f(s['mask_and_step_s'] * 1e3, 2)} ms of "
                     f"{f((s['unet_s'] + s['mask_and_step_s']) * 1e3, 1)} ms = {100 * s['share']:.2f}%")
    for note in r["skipped"]:
        lines.append(f"skipped: {note}")
    lines.append(f"total time {r['total_elapsed_s']} s; sections: {r['elapsed_s']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
