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
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import outset
from methods import EditError, EditOptions, Job, MaskOutput, check_finite, guidance_cause, add_arguments, get_method, options_from_args
from model.runtime import Placement, run_steps
from sampler import SchedulerConfig, cfg, make_sampler
from weights import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, WeightsError, load

TOY_MODEL = str(Path(__file__).resolve().parent / "assets" / "toy-sd")
TOY_INPAINT_MODEL = str(Path(__file__).resolve().parent / "assets" / "toy-sd-inpaint")
MAX_PIXELS = 64_000_000  # larger inputs are refused as possible decompression bombs


def check_device(device: str) -> torch.device:
    """A device this build of torch can run on, or one EditError line saying why not."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise EditError(f"--device '{device}' is not a torch device") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise EditError(f"--device {device}: CUDA is not available here")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise EditError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices here")
    elif d.type == "mps":
        if not torch.backends.mps.is_built():
            raise EditError(f"--device {device}: this torch build has no MPS support")
        if not torch.backends.mps.is_available():
            raise EditError(f"--device {device}: MPS is not available on this machine")
    elif d.type != "cpu":
        raise EditError(f"--device {device}: only cpu, cuda and mps devices can run an edit")
    return d


def check_text(text: str, what: str) -> None:
    """Text that can be tokenised and written to run.json: valid Unicode (no lone surrogates, which is how
    Python hands over command-line bytes that are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EditError(f"{what} is not valid UTF-8 text (undecodable byte at character {e.start})") from None


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

# What Pillow's decoders and plugins raise on malformed data, after open() as well as in it (EXIF parsing
# in exif_transpose, lazy decoding in convert): SyntaxError "not a TIFF file" from a WebP's EXIF block,
# struct.error from a short TIFF tag, ... Named, not `Exception`, so a bug of ours still shows itself.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, IndexError, KeyError,
                 ZeroDivisionError, OverflowError, MemoryError, RecursionError, NotImplementedError,
                 struct.error)


def load_image(path: str | Path) -> Image.Image:
    """Open any image PIL reads as 8-bit RGB, EXIF orientation applied, alpha composited on white.
    Every decoding step runs inside one guard: only EditError leaves this function."""
    path = Path(path)
    try:
        if not path.is_file():
            raise EditError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise EditError(f"{path}: empty file")
    except OSError as e:  # e.g. a symlink loop, a name too long
        raise EditError(f"{path}: cannot be read ({_one_line(e)})") from None
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EditError(f"{path}: image is over the {MAX_PIXELS:,}-pixel limit (possible decompression bomb)") from None
    except DECODE_ERRORS as e:
        raise EditError(f"{path}: not a readable image ({type(e).__name__}: {_one_line(e)[:150]})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any mode -> RGB: EXIF orientation, 16-bit/float rescaled, alpha on white."""
    import numpy as np
    from PIL import ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: rescale, don't clip
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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
    """The models and what every method shares. Device-level options (all off by default):

    compile        torch.compile each UNet (static shapes: compiled once per input shape, no recompile
                   across steps); a string names the backend (tests use "eager")
    cuda_graphs    run the stage-1 and inpainting loops as replays of one CUDA graph per loop
                   (model/runtime.py; LMS sampler only). Off CUDA the same step function runs eagerly with
                   the step index as a device tensor, which is what the tests exercise on the CPU
    offload        keep only the UNet in use on the device, the other on the CPU (8 GB cards); the text
                   encoder and the VAE (about 0.4 GB in fp16) stay on the device
    channels_last  UNets in the channels-last memory format; unmeasured on a GPU here, so off by default
    """

    def __init__(self, sd, inpaint_unet=None, device="cpu", dtype=torch.float32, *, compile: bool | str = False,
                 cuda_graphs: bool = False, offload: bool = False, channels_last: bool = False):
        self.unet, self.vae, self.text_encoder, self.tokenizer = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer
        self.inpaint_unet = inpaint_unet
        self.scheduler_config = SchedulerConfig.from_dict(sd.scheduler_config) if sd.scheduler_config else SchedulerConfig()
        self.device, self.dtype = torch.device(device), dtype
        self.scale = self.vae.config.scaling_factor
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size = self.unet.config.sample_size * self.vae_factor  # the trained image size: 512 for SD v1.x
        self.unet_evals: dict[str, int] = {}  # UNet image-evaluations since the last edit()/mask() began
        if cuda_graphs and compile and self.device.type != "cuda":
            raise ValueError("cuda_graphs with compile needs CUDA: off CUDA the replay is traced with make_fx, "
                             "which cannot trace compiled UNets")
        self.cuda_graphs = cuda_graphs
        self.vae_fp32_decodes = 0  # decodes redone in fp32 because the half-precision one overflowed
        if channels_last:
            for m in (self.unet, self.inpaint_unet):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        if compile:  # dynamic=False: one graph per input shape, never a shape-generic recompile
            backend = compile if isinstance(compile, str) else "inductor"
            self.unet = torch.compile(self.unet, dynamic=False, backend=backend)
            if self.inpaint_unet is not None:
                self.inpaint_unet = torch.compile(self.inpaint_unet, dynamic=False, backend=backend)
        if offload:
            self.text_encoder.to(self.device)
            self.vae.to(self.device)
        self.placement = Placement({"unet": self.unet, "inpaint_unet": self.inpaint_unet}, self.device, offload)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, inpaint_model: str | None = DEFAULT_INPAINT_MODEL,
                        device: str | None = None, dtype: torch.dtype | None = None, compile: bool | str = False,
                        cuda_graphs: bool = False, offload: bool = False, channels_last: bool = False):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        where = "cpu" if offload else device  # offload: load on the host; each UNet visits the device in turn
        sd = load(model, device=where, dtype=dtype)
        inpaint = load(inpaint_model, components=("unet",), device=where, dtype=dtype).unet if inpaint_model else None
        if inpaint is not None and inpaint.config.in_channels != 9:
            raise WeightsError(f"{inpaint_model}: the inpainting UNet must take 9 input channels, "
                               f"this one takes {inpaint.config.in_channels}")
        return cls(sd, inpaint, device, dtype, compile=compile, cuda_graphs=cuda_graphs, offload=offload,
                   channels_last=channels_last)

    def cross_attention_grids(self, latent: int) -> list[int]:
        """Query grids (side) where the UNet has cross-attention, for a square latent of side `latent`:
        the levels of its CrossAttn down/up blocks and the mid block (lowest level), from its config."""
        c = self.unet.config
        sides = [latent]
        for _ in c.down_block_types[1:]:
            sides.append((sides[-1] + 1) // 2)  # stride-2 conv, padding 1
        grids = {sides[i] for i, t in enumerate(c.down_block_types) if t.startswith("CrossAttn")}
        grids |= {sides[-1 - j] for j, t in enumerate(c.up_block_types) if t.startswith("CrossAttn")}
        return sorted(grids | {sides[-1]}, reverse=True)

    def check_memory(self, batch: int) -> None:
        """Refuse a run whose UNet batch cannot fit, before allocating. The estimate is a lower bound:
        the first level's activations (a resnet holds about 8 tensors of batch x C0 x latent pixels)
        plus the batch's latents, so only runs that surely cannot fit are refused."""
        latent = self.size // self.vae_factor
        c0 = self.unet.config.block_out_channels[0]
        item = torch.finfo(self.dtype).bits // 8
        need = batch * latent * latent * (8 * c0 + 4 * self.unet.config.in_channels) * item
        free = _free_memory(self.device)
        if free is not None and need > free:
            raise EditError(f"this run needs at least {need / 2**30:,.1f} GiB for a UNet batch of {batch} "
                            f"(--rounds or DiffEdit samples x 2 for guidance) on {self.device}, and "
                            f"{free / 2**30:,.1f} GiB is free")

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
        """Latents -> image. In half precision the decoder's activations can pass fp16's 65504 (SD's VAE
        is known to); the result is checked once (one host sync per decode, after the loops) and only
        when it is not finite decoded again with the decoder upcast to fp32. What is still not finite
        stops the run with one line."""
        z = z / self.scale
        x = self.vae.decode(z)
        if bool(torch.isfinite(x).all()):
            return x
        cause = "its weights or scaling_factor, or fp16 overflow: try --dtype fp32"
        if x.dtype != torch.float32:
            self.vae_fp32_decodes += 1
            cause = "its weights or scaling_factor (decoded again in fp32 after an fp16 overflow)"
            parts = (self.vae.post_quant_conv, self.vae.decoder)  # what decode() runs; the encoder stays as is
            try:
                for m in parts:
                    m.float()
                x = self.vae.decode(z.float())  # fp32: the image itself may lie outside fp16's range
            finally:
                for m in parts:
                    m.to(self.dtype)  # fp16 -> fp32 -> fp16 is exact: the weights are unchanged
        return check_finite(x, "the VAE decoder", cause)

    # -- what every method shares (methods/base.py lists it)

    def call_unet(self, unet, inp: torch.Tensor, t, ctx: torch.Tensor, recorder=None) -> torch.Tensor:
        """THE UNet call of every method: counts the image-evaluations (batch rows) it runs."""
        key = "inpaint_unet" if unet is self.inpaint_unet else "unet"
        self.unet_evals[key] = self.unet_evals.get(key, 0) + inp.shape[0]
        self.placement.use(unet)
        return unet(inp, t, ctx, recorder=recorder)

    def unet_cfg(self, unet, sampler, x, i, t, emb, guidance, extra=None, recorder=None):
        """One classifier-free-guided model prediction for a batch x of n latents; emb is (2, 77, D)."""
        n = x.shape[0]
        inp = sampler.scale_model_input(torch.cat([x, x]), i)
        if extra is not None:  # inpainting: mask and masked-image latents as extra channels
            inp = torch.cat([inp, torch.cat([extra, extra])], dim=1)
        ctx = emb[:, None].expand(-1, n, -1, -1).flatten(0, 1)  # [uncond x n, cond x n]
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

    def run_steps(self, step, sampler, indices, unet):
        """Run a denoising loop's step function over `indices`, eagerly or as CUDA-graph replays
        (model/runtime.py; self.cuda_graphs), with `unet` (the one the step calls) placed on the device
        before the loop (offload). Returns the last step's return value."""
        if self.cuda_graphs and not hasattr(sampler, "index"):
            raise EditError(f"cuda_graphs needs a sampler that takes device step indices (lms), not "
                            f"{type(sampler).__name__}")
        self.placement.use(unet)
        index_of = sampler.index if self.cuda_graphs else None
        return run_steps(step, indices, index_of, self.cuda_graphs, self.unet_evals)

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

        def step(i):  # in place on x; i is an int, or a device tensor when replayed (run_steps)
            pred = self.unet_cfg(self.inpaint_unet, sampler, x, i, sampler.timestep(i), emb, o.guidance, extra)
            x.copy_(sampler.step(pred, i, x))

        self.run_steps(step, sampler, _progress(range(len(sampler.timesteps)), progress, "inpainting"),
                       self.inpaint_unet)
        check_finite(x, "the inpainting finish", guidance_cause(o.guidance))
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
        check_text(edit, "the edit text")
        check_text(o.source, "the source text")
        self.check_memory(get_method(o.method).unet_batch(o))
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


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None where it cannot be asked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


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
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (once per input shape)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the stage-1 and inpainting steps from CUDA graphs (CUDA, --sampler lms)")
    p.add_argument("--offload", action="store_true",
                   help="keep only the model in use on the GPU, the others on the CPU (8 GB cards; slower)")
    p.add_argument("--channels-last", action="store_true",
                   help="UNets in channels-last memory format (not measured to help here; off by default)")
    p.add_argument("--mask", default=None, help="use this mask (white = edit) instead of generating one")
    p.add_argument("--save-attention", action="store_true", help="also write the labelled per-word attention maps")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    add_arguments(p)  # --method and every method's options, from their specs (methods/options.py)
    return p


OUTPUTS = ("edited.png", "mask.png", "soft_mask.png", "overlay.png", "attention.png", "run.json")


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11's resolve)
        raise EditError(f"{p}: cannot be resolved (a symlink loop?)") from None


def _same_file(a: Path, b: Path) -> bool:
    """The same file by path, through a symlink, or as a hard link (same st_dev and st_ino)."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work: an --out that cannot be a folder, earlier results without --overwrite,
    and any input that an output (or the removal of the previous output set) would write over."""
    if os.path.islink(out) and not os.path.exists(out):
        raise EditError(f"{out}: --out is a dangling symlink or a symlink loop")
    if out.exists() and not out.is_dir():
        raise EditError(f"{out}: exists and is not a folder")
    names = [out / n for n in OUTPUTS]
    for p in names:  # a dangling link of our own is litter of an interrupted run: outset removes it
        ours = os.path.join(outset.STORE, outset.CURRENT, p.name)
        if os.path.islink(p) and not os.path.exists(p) and os.readlink(p) != ours:
            raise EditError(f"{p}: is a dangling symlink or a symlink loop; remove it or choose another --out")
    if out.is_dir() and not overwrite:
        clash = [p for p in names if p.exists()]
        if clash:
            raise EditError(f"{clash[0]}: exists (use --overwrite, or another --out)")
    store = _resolved(out / outset.STORE)
    for inp in inputs:
        if any(os.path.lexists(p) and _same_file(p, inp) for p in names) or \
                any(_resolved(p) == _resolved(inp) for p in names) or _resolved(inp).is_relative_to(store):
            raise EditError(f"{inp}: the input would be overwritten by an output; choose another --out")
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
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError, and so is the
        # CPU allocator's "can't allocate memory"; any other RuntimeError is not anticipated
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) \
                and "allocate" not in str(e) and "out of memory" not in str(e):
            return _internal(e)
        print(f"error: out of memory ({_one_line(e)[:120]}); try fewer --rounds, --dtype fp16 on CUDA, "
              "or a smaller model", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the top level only: a bug is one line, with how to see it all
        return _internal(e)


TRACEBACK_ENV = "INSTDIFFEDIT_TRACEBACK"


def _internal(e: BaseException) -> int:
    """An exception no check anticipated is a bug of ours, not bad input: say so in one line (exit 3) and
    tell how to get the traceback, which INSTDIFFEDIT_TRACEBACK=1 prints (tests and CI set it)."""
    if os.environ.get(TRACEBACK_ENV):
        raise e
    print(f"error: internal error, please report it: {type(e).__name__}: {_one_line(e)[:200]} "
          f"(rerun with {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
    return 3


def run(args) -> int:
    t_start = time.perf_counter()
    image, out = Path(args.image), Path(args.out)
    if not args.edit.strip():
        raise EditError("--edit is empty")
    check_text(args.edit, "--edit")
    given = options_from_args(args)
    opts = EditOptions(args.method, **given)
    check_text(opts.source, "--source")
    method = get_method(args.method)
    if not opts.inpaint and args.mask:
        raise EditError("--no-inpaint decodes the stage-1 result, which --mask skips: use one of them")
    _check_out(out, [image] + ([Path(args.mask)] if args.mask else []), args.overwrite)
    img = load_image(image)
    user_mask = load_mask(args.mask, img.size) if args.mask else None
    model, inpaint_model = args.model, args.inpaint_model
    if model == "toy":
        model, inpaint_model = TOY_MODEL, inpaint_model or TOY_INPAINT_MODEL
    inpaint_model = inpaint_model or DEFAULT_INPAINT_MODEL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise EditError(f"--cuda-graphs needs a CUDA device (--device {device})")
    if args.cuda_graphs and opts.sampler != "lms":
        raise EditError(f"--cuda-graphs needs --sampler lms (its steps take device step indices), not {opts.sampler}")

    tic = time.perf_counter()
    needs_inpaint = opts.inpaint and method.uses_inpaint
    pipe = InstDiffEdit.from_pretrained(model, inpaint_model if needs_inpaint else None, device, dtype, args.compile,
                                        args.cuda_graphs, args.offload, args.channels_last)
    load_s = time.perf_counter() - tic
    tokens = pipe.tokenizer._body(args.edit)[1]  # the uncut count (tokens() is already cut to 75)
    if tokens > 75:
        print(f"warning: the edit text has {tokens} tokens; only the first 75 are used", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="prompt has .* tokens")  # warned once just above
        res = pipe.edit(img, args.edit, mask=user_mask, progress=not args.quiet, method=args.method, **given)

    record = {
        "image": str(image), "edit": args.edit, "model": model,
        "inpaint_model": inpaint_model if needs_inpaint else None, "mask_file": args.mask,
        "options": opts.as_dict(), "unet_evals": res.unet_evals, "unet_evals_by_model": res.unet_evals_by_model,
        "device": str(pipe.device), "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile, "cuda_graphs": args.cuda_graphs, "offload": args.offload,
        "channels_last": args.channels_last, "vae_fp32_decodes": pipe.vae_fp32_decodes,
        "words": res.words, "P": res.P,
        "timings_s": {"load": round(load_s, 3), **{k: round(v, 3) for k, v in res.timings.items()},
                      "total": round(time.perf_counter() - t_start, 3)},
        "versions": _versions(),
    }
    files = {"edited.png": res.image.save, "mask.png": res.mask.save, "soft_mask.png": res.soft_mask.save,
             "overlay.png": overlay(img, res.mask).save}
    if args.save_attention and res.words:
        files["attention.png"] = attention_grid(res.words, res.word_maps, res.P).save
    files["run.json"] = (json.dumps(record, indent=2) + "\n").encode()
    # all or nothing: the new set replaces the previous one in one atomic switch (outset.py)
    outset.publish(out, files, legacy=OUTPUTS)
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
