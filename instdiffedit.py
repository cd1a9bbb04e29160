#!/usr/bin/env python3
"""InstDiffEdit: instant, mask-guided text-driven image editing (Zou et al., AAAI 2024, arXiv 2401.07709).

Stage 1 runs Stable Diffusion from the noised source image (strength r) with the edit text as the
only prompt, n rounds at once. At every step the 16x16 cross-attention maps give an instant mask
(Eq. 6-9, `mask/`) that guides the denoising (Eq. 4-5). Stage 2 hands the final mask to the SD
inpainting UNet, which generates the edit from pure noise.

    python instdiffedit.py --image cat.jpg --edit "a dog"
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from methods import REGISTRY, EditError, EditOptions, Job, MaskOutput, add_arguments, get_method, options_from_args
from sampler import SchedulerConfig, cfg, make_sampler
from weights import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, WeightsError, load

TOY_MODEL = str(Path(__file__).resolve().parent / "assets" / "toy-sd")
TOY_INPAINT_MODEL = str(Path(__file__).resolve().parent / "assets" / "toy-sd-inpaint")
MAX_PIXELS = 64_000_000  # larger inputs are refused as possible decompression bombs


# ---------------------------------------------------------------- options and results
# EditError, EditOptions (the validated options) and MaskOutput live with the method registry (methods/)

@dataclass
class EditResult:
    image: Image.Image        # edited image at the input's original size
    mask: Image.Image         # binary mask at the input's original size
    soft_mask: Image.Image    # refined soft map at the input's original size
    P: list[int]
    words: list[str]
    word_maps: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)  # mask_s (the method), finish_s (inpainting)
    unet_evals: int = 0       # UNet image-evaluations of the edit (batch rows, counted at every call)
    unet_evals_by_model: dict[str, int] = field(default_factory=dict)  # {"unet": ..., "inpaint_unet": ...}


# ---------------------------------------------------------------- images

def load_image(path: str | Path) -> Image.Image:
    """Open any image PIL reads as 8-bit RGB, EXIF orientation applied, alpha composited on white."""
    from PIL import ImageOps
    path = Path(path)
    if not path.is_file():
        raise EditError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise EditError(f"{path}: empty file")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EditError(f"{path}: image is over the {MAX_PIXELS:,}-pixel limit (possible decompression bomb)") from None
    except Exception as e:
        raise EditError(f"{path}: not a readable image ({' '.join(str(e).split())[:150]})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: rescale, don't clip
        import numpy as np
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


def to_tensor(img: Image.Image, size: int, device, dtype) -> torch.Tensor:
    """RGB PIL -> (1, 3, size, size) in [-1, 1]; the authors resize every input to a square."""
    import numpy as np
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None].to(device=device, dtype=dtype)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()
    return Image.fromarray(x.numpy(), "RGB")


def map_to_pil(m: torch.Tensor, size: tuple[int, int], binary: bool = False) -> Image.Image:
    """(H, W) map in [0, 1] -> greyscale PIL of `size` (W, H)."""
    x = m.float()[None, None]
    x = (F.interpolate(x, size=(size[1], size[0]), mode="nearest") if binary
         else F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False))
    x = (x[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return Image.fromarray(x.numpy(), "L")


def load_mask(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A user mask (white = edit) -> bool (H, W) at `size`; colour or empty images are refused."""
    import numpy as np
    img = load_image(path)
    a = np.asarray(img, dtype=np.int16)
    if np.abs(a - a.mean(axis=2, keepdims=True)).max() > 8:
        raise EditError(f"{path}: not a mask (it has colour; expected black and white, white = region to edit)")
    m = a[..., 0] > 127
    if not m.any():
        raise EditError(f"{path}: the mask is empty (no white pixels)")
    if img.size != size:
        m = np.asarray(Image.fromarray(m).resize(size, Image.NEAREST))
    return torch.from_numpy(m.copy())


# ---------------------------------------------------------------- the pipeline

class InstDiffEdit:
    def __init__(self, sd, inpaint_unet=None, device="cpu", dtype=torch.float32):
        self.unet, self.vae, self.text_encoder, self.tokenizer = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer
        self.inpaint_unet = inpaint_unet
        self.scheduler_config = SchedulerConfig.from_dict(sd.scheduler_config) if sd.scheduler_config else SchedulerConfig()
        self.device, self.dtype = torch.device(device), dtype
        self.scale = self.vae.config.scaling_factor
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size = self.unet.config.sample_size * self.vae_factor  # the trained image size: 512 for SD v1.x
        self.unet_evals: dict[str, int] = {}  # UNet image-evaluations since the last edit()/mask() began

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, inpaint_model: str | None = DEFAULT_INPAINT_MODEL,
                        device: str | None = None, dtype: torch.dtype | None = None, compile: bool = False):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        sd = load(model, device=device, dtype=dtype)
        inpaint = load(inpaint_model, components=("unet",), device=device, dtype=dtype).unet if inpaint_model else None
        if inpaint is not None and inpaint.config.in_channels != 9:
            raise WeightsError(f"{inpaint_model}: the inpainting UNet must take 9 input channels, "
                               f"this one takes {inpaint.config.in_channels}")
        pipe = cls(sd, inpaint, device, dtype)
        if compile:
            pipe.unet = torch.compile(pipe.unet)
            if pipe.inpaint_unet is not None:
                pipe.inpaint_unet = torch.compile(pipe.inpaint_unet)
        return pipe

    # -- text and latents

    @torch.no_grad()
    def encode_text(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer.encode([prompt, ""]).to(self.device)
        cond, uncond = self.text_encoder(ids).to(self.dtype).chunk(2)
        return torch.cat([uncond, cond])  # (2, 77, D): [unconditional, conditional]

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).mean * self.scale  # the posterior mean: no extra sampling noise

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale)

    # -- what every method shares (methods/base.py lists it)

    def call_unet(self, unet, inp: torch.Tensor, t, ctx: torch.Tensor, recorder=None) -> torch.Tensor:
        """THE UNet call of every method: counts the image-evaluations (batch rows) it runs."""
        key = "inpaint_unet" if unet is self.inpaint_unet else "unet"
        self.unet_evals[key] = self.unet_evals.get(key, 0) + inp.shape[0]
        return unet(inp, t, ctx, recorder=recorder)

    def unet_cfg(self, unet, sampler, x, i, t, emb, guidance, extra=None, recorder=None):
        """One classifier-free-guided model prediction for a batch x of n latents; emb is (2, 77, D)."""
        n = x.shape[0]
        inp = sampler.scale_model_input(torch.cat([x, x]), i)
        if extra is not None:  # inpainting: mask and masked-image latents as extra channels
            inp = torch.cat([inp, torch.cat([extra, extra])], dim=1)
        ctx = emb.repeat_interleave(n, dim=0)  # [uncond x n, cond x n]
        uncond, cond = self.call_unet(unet, inp, t, ctx, recorder).chunk(2)
        return cfg(uncond, cond, guidance)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(seed)  # noise drawn on the CPU: the same on every device

    def sampler(self, o: EditOptions):
        """A fresh sampler (no LMS history) with o.steps timesteps set."""
        sampler = make_sampler(o.sampler, self.scheduler_config)
        sampler.set_timesteps(o.steps, self.device)
        return sampler

    def noised(self, x0: torch.Tensor, o: EditOptions, gen: torch.Generator, n: int):
        """Source latents z0 (n copies), n noises (one per round or sample), and z0 noised to strength r."""
        z0 = self.encode_image(x0)
        sampler = self.sampler(o)
        start = sampler.start_index(o.strength)
        eps = torch.randn((n, *z0.shape[1:]), generator=gen).to(self.device, self.dtype)
        z0 = z0.expand(n, -1, -1, -1)
        return sampler, start, z0, eps, sampler.add_noise_at(z0, eps, start)

    def progress(self, it, enabled: bool, desc: str):
        return _progress(it, enabled, desc)

    def finish(self, job: Job, mask: torch.Tensor) -> torch.Tensor:
        """The inpainting finish every mask method shares: (3, S, S) edit of job.x0 inside `mask`."""
        if not job.o.inpaint:
            raise EditError(f"--no-inpaint decodes InstDiffEdit's Eq. 5 result: it needs the instdiffedit "
                            f"method and no --mask (method {job.o.method})")
        tic = _clock(self.device)
        out = self.inpaint(job.x0, mask, job.emb, job.o, job.gen, job.progress)[0]
        job.timings["finish_s"] = _clock(self.device) - tic
        return out

    # -- the inpainting finish

    @torch.no_grad()
    def inpaint(self, x0: torch.Tensor, mask: torch.Tensor, prompt: str | torch.Tensor, o: EditOptions,
                gen: torch.Generator, progress: bool = False) -> torch.Tensor:
        """SD inpainting from pure noise: UNet input = [noisy latents, latent mask, masked-image latents].

        `prompt` is the text or its encode_text embedding (edit() passes the one stage 1 used)."""
        if self.inpaint_unet is None:
            raise EditError("no inpainting model loaded (pass inpaint_model, or use --no-inpaint)")
        m = mask.to(self.device, self.dtype)[None, None]  # (1, 1, h, w) at latent size
        m_img = F.interpolate(m, size=x0.shape[-2:], mode="nearest")
        masked = self.encode_image(x0 * (m_img < 0.5))
        emb = self.encode_text(prompt) if isinstance(prompt, str) else prompt
        sampler = self.sampler(o)
        x = torch.randn(masked.shape, generator=gen).to(self.device, self.dtype) * sampler.init_noise_sigma
        extra = torch.cat([m, masked], dim=1)
        for i in _progress(range(len(sampler.timesteps)), progress, "inpainting"):
            t = sampler.timesteps[i]
            x = sampler.step(self.unet_cfg(self.inpaint_unet, sampler, x, i, t, emb, o.guidance, extra), i, x)
        return self.decode(x)

    # -- public API

    def options(self, method: str = "instdiffedit", **options) -> EditOptions:
        """Validated options; also checks those that depend on the loaded model."""
        o = EditOptions(method, **options)
        train_steps = self.scheduler_config.num_train_timesteps
        if o.steps > train_steps:
            raise EditError(f"steps {o.steps} is more than the model's {train_steps} training timesteps")
        return o

    def _prepare(self, image, edit: str, o: EditOptions):
        if not isinstance(edit, str) or not edit.strip():
            raise EditError("the edit text is empty")
        if get_method(o.method).needs_source and not o.source.strip():
            raise EditError(f"method {o.method} needs the text of what the image shows (--source / source=)")
        img = load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
        return img, to_tensor(img, self.size, self.device, self.dtype)

    def _job(self, image, edit: str, o: EditOptions, progress: bool, mask=None):
        img, x0 = self._prepare(image, edit, o)
        job = Job(x0, edit, self.encode_text(edit), o, self._generator(o.seed), None, progress)
        if mask is not None:
            h, w = (s // self.vae_factor for s in x0.shape[-2:])
            job.mask = F.interpolate(mask.float()[None, None], size=(h, w), mode="area")[0, 0].to(self.device) > 0.5
        self.unet_evals = {}  # call_unet counts into this
        return img, job

    def mask(self, image, edit: str, progress: bool = False, method: str = "instdiffedit",
             **options) -> MaskOutput:
        """The mask of `method` alone (InstDiffEdit: stage 1); EditError for a method that makes none."""
        o = self.options(method, **options)
        m = get_method(method)
        if not m.makes_mask:
            raise EditError(f"method {method} makes no mask")
        tic = _clock(self.device)
        _, job = self._job(image, edit, o, progress)
        out = m.mask(self, job)
        out.seconds, out.unet_evals = _clock(self.device) - tic, sum(self.unet_evals.values())
        return out

    def edit(self, image, edit: str, mask: torch.Tensor | None = None, progress: bool = False,
             method: str = "instdiffedit", **options) -> EditResult:
        """Edit `image` (path or PIL) toward the text `edit` with `method` (see methods.REGISTRY).
        `mask` (bool, any size) replaces the method's own mask."""
        o = self.options(method, **options)
        tic = _clock(self.device)
        img, job = self._job(image, edit, o, progress, mask)
        out = get_method(method).edit(self, job)
        total = _clock(self.device) - tic
        timings = {"mask_s": total - job.timings.get("finish_s", 0.0), "finish_s": job.timings.get("finish_s", 0.0)}
        h, w = job.x0.shape[-2] // self.vae_factor, job.x0.shape[-1] // self.vae_factor
        st = out.mask
        m = torch.ones(h, w, dtype=torch.bool) if st is None else st.mask  # no mask: the whole image may change
        soft = m.float() if st is None else st.soft
        maps = st.word_maps if st is not None and st.word_maps is not None else torch.zeros(0, h, w)
        P = [int(v) for v in st.P] if st is not None else []
        size = img.size
        return EditResult(to_pil(out.image).resize(size, Image.BICUBIC), map_to_pil(m, size, binary=True),
                          map_to_pil(soft, size), P, st.words if st is not None else [], maps.float().cpu(),
                          timings, sum(self.unet_evals.values()), dict(self.unet_evals))


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False, file=sys.stderr)


# ---------------------------------------------------------------- pictures for people

def overlay(img: Image.Image, mask: Image.Image) -> Image.Image:
    red = Image.new("RGB", img.size, (255, 40, 40))
    return Image.composite(Image.blend(img, red, 0.5), img, mask)


def attention_grid(words: list[str], maps: torch.Tensor, P: list[int], cell: int = 128) -> Image.Image:
    """One labelled tile per word map (with its Eq. 8 position P), side by side."""
    from PIL import ImageDraw
    n = max(len(words), 1)
    grid = Image.new("RGB", (cell * n, cell + 16), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, word in enumerate(words):
        if k < len(maps):
            grid.paste(map_to_pil(maps[k], (cell, cell)).convert("RGB"), (k * cell, 16))
        label = f"{word} P={P[k]:+d}" if k < len(P) else word
        draw.text((k * cell + 2, 2), label[:22], fill=(0, 0, 0))
    return grid


# ---------------------------------------------------------------- CLI

EXAMPLES = """examples:
  python instdiffedit.py --image dog.jpg --edit "a raccoon"              # SD v1.4 from the hub
  python instdiffedit.py --image dog.jpg --edit "a raccoon" --model ./sd14 --seed 7
  python instdiffedit.py --image scene.png --edit "a blue circle" --model toy   # bundled toy model
  python instdiffedit.py --image dog.jpg --edit "a cat" --mask mask.png  # skip mask generation
"""

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instdiffedit.py", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument("--edit", required=True, help='edit text, the only prompt (e.g. "a raccoon")')
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"SD v1.x: hub id, diffusers folder or single file, or 'toy' (default: {DEFAULT_MODEL})")
    p.add_argument("--inpaint-model", default=None,
                   help=f"inpainting UNet source (default: {DEFAULT_INPAINT_MODEL}; the toy one with --model toy)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets")
    p.add_argument("--mask", default=None, help="use this mask (white = edit) instead of generating one")
    p.add_argument("--save-attention", action="store_true", help="also write the labelled per-word attention maps")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    add_arguments(p)  # --method and every method's options, from their specs (methods/options.py)
    return p


OUTPUTS = ("edited.png", "mask.png", "soft_mask.png", "overlay.png", "attention.png", "run.json")


def _check_out(out: Path, image: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EditError(f"{out}: exists and is not a folder")
    if out.is_dir() and not overwrite:
        clash = [n for n in OUTPUTS if (out / n).exists()]
        if clash:
            raise EditError(f"{out / clash[0]}: exists (use --overwrite, or another --out)")
    if any((out / n).resolve() == image.resolve() for n in OUTPUTS):
        raise EditError(f"{image}: the input would be overwritten by an output; choose another --out")
    parent = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise EditError(f"{parent}: is not a folder, so --out {out} cannot be created")
    if not os.access(parent, os.W_OK):
        raise EditError(f"{parent}: output folder is not writable")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (EditError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. writing the results failed (permissions, disk full): one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(args) -> int:
    t_start = time.perf_counter()
    image, out = Path(args.image), Path(args.out)
    if not args.edit.strip():
        raise EditError("--edit is empty")
    given = options_from_args(args)
    opts = EditOptions(args.method, **given)
    method = get_method(args.method)
    if not opts.inpaint and args.mask:
        raise EditError("--no-inpaint decodes the stage-1 result, which --mask skips: use one of them")
    _check_out(out, image, args.overwrite)
    img = load_image(image)
    user_mask = load_mask(args.mask, img.size) if args.mask else None
    model, inpaint_model = args.model, args.inpaint_model
    if model == "toy":
        model, inpaint_model = TOY_MODEL, inpaint_model or TOY_INPAINT_MODEL
    inpaint_model = inpaint_model or DEFAULT_INPAINT_MODEL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise EditError(f"--device '{device}' is not a torch device") from None
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EditError(f"--device {device}: CUDA is not available here")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)

    tic = time.perf_counter()
    needs_inpaint = opts.inpaint and method.uses_inpaint
    pipe = InstDiffEdit.from_pretrained(model, inpaint_model if needs_inpaint else None, device, dtype, args.compile)
    load_s = time.perf_counter() - tic
    tokens = pipe.tokenizer._body(args.edit)[1]  # the uncut count (tokens() is already cut to 75)
    if tokens > 75:
        print(f"warning: the edit text has {tokens} tokens; only the first 75 are used", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="prompt has .* tokens")  # warned once just above
        res = pipe.edit(img, args.edit, mask=user_mask, progress=not args.quiet, method=args.method, **given)

    # write everything to a temporary folder first, then move: nothing half-written on failure
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        res.image.save(tmp / "edited.png")
        res.mask.save(tmp / "mask.png")
        res.soft_mask.save(tmp / "soft_mask.png")
        overlay(img, res.mask).save(tmp / "overlay.png")
        if args.save_attention and res.words:
            attention_grid(res.words, res.word_maps, res.P).save(tmp / "attention.png")
        record = {
            "image": str(image), "edit": args.edit, "model": model,
            "inpaint_model": inpaint_model if needs_inpaint else None, "mask_file": args.mask,
            "options": opts.as_dict(), "unet_evals": res.unet_evals,
            "unet_evals_by_model": res.unet_evals_by_model, "device": str(pipe.device), "dtype": str(dtype).removeprefix("torch."),
            "compile": args.compile, "words": res.words, "P": res.P,
            "timings_s": {"load": round(load_s, 3), **{k: round(v, 3) for k, v in res.timings.items()},
                          "total": round(time.perf_counter() - t_start, 3)},
            "versions": _versions(),
        }
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        made = sorted(tmp.iterdir())
        for f in made:
            os.replace(f, out / f.name)
        for n in set(OUTPUTS) - {f.name for f in made}:  # --overwrite: no stale output of an earlier run
            (out / n).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.quiet:
        print(f"wrote {out}/edited.png, mask.png, soft_mask.png, overlay.png"
              + (", attention.png" if args.save_attention and res.words else "") + ", run.json"
              + f"  ({record['timings_s']['total']:.1f} s)")
    return 0


def _versions() -> dict[str, str]:
    import PIL
    import safetensors
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "pillow": PIL.__version__}


if __name__ == "__main__":
    sys.exit(main())
