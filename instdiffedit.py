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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import outset
from mask.diffedit import DiffEditMask, diffedit_mask
from mask.instant import instant_mask
from mask.store import AttentionStore
from sampler import SchedulerConfig, cfg, make_sampler
from weights import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, WeightsError, load

TOY_MODEL = str(Path(__file__).resolve().parent / "assets" / "toy-sd")
TOY_INPAINT_MODEL = str(Path(__file__).resolve().parent / "assets" / "toy-sd-inpaint")
MAX_PIXELS = 64_000_000  # larger inputs are refused as possible decompression bombs


_GUIDANCE_CAUSE = ("guidance {g} too large in magnitude, broken weights, or fp16 overflow: "
                   "try a guidance near 7.5 or --dtype fp32")


class EditError(ValueError):
    """Bad user input; the CLI prints the message on one line and exits non-zero."""


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


def check_finite(x: torch.Tensor, stage: str, cause: str) -> torch.Tensor:
    """Never silent garbage: one reduction per stage (not per step); a NaN/inf becomes one error line."""
    if not bool(torch.isfinite(x).all()):
        raise EditError(f"{stage} produced NaN or inf values ({cause})")
    return x


# ---------------------------------------------------------------- options and results

@dataclass
class EditOptions:
    strength: float = 0.5     # noise strength r: stage 1 runs the last int(steps * r) steps
    threshold: float = 0.2    # phi: binarisation threshold of the refined map (Eq. 9)
    rounds: int = 3           # n parallel denoising rounds whose attention maps are averaged
    steps: int = 50           # inference steps of both stages
    guidance: float = 7.5     # classifier-free guidance scale
    sampler: str = "lms"      # "lms" (the authors') or "ddim"
    seed: int = 0             # master seed: every round's noise and the inpainting noise derive from it
    gamma1: float = 0.9       # Eq. 8: similarity at or above which a word joins the mask
    gamma2: float = 0.6       # Eq. 8: similarity at or below which a word is subtracted
    attention: str = "running"  # "running": mean of the maps of all steps so far (authors); "instant"
    attention_res: int = 16     # cross-attention maps recorded at this grid: the authors' 16x16 (SD v1.4: latent / 4)
    inpaint: bool = True      # False: decode the Eq. 5 result of round 0 instead of inpainting
    method: str = "instdiffedit"  # or the paper's baselines: "diffedit", "sdedit"
    source: str = ""          # DiffEdit only: text describing the source image ("" = unconditional)
    diffedit_samples: int = 10  # DiffEdit: noise samples averaged (the InstDiffEdit authors used 10)
    diffedit_ratio: float = 3.0  # DiffEdit: clamp at ratio x mean difference, binarise at half (diffusers)
    diffedit_blur: int = 0    # DiffEdit: Gaussian blur kernel before thresholding (authors: 5; 0 = none)

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise EditError(f"threshold {self.threshold} is outside [0, 1]")
        if not 0.0 < self.strength <= 1.0:
            raise EditError(f"strength {self.strength} is outside (0, 1]")
        if self.rounds < 1:
            raise EditError(f"rounds {self.rounds} must be at least 1")
        if self.steps < 1:
            raise EditError(f"steps {self.steps} must be at least 1")
        if int(self.steps * self.strength) < 1:
            raise EditError(f"strength {self.strength} x steps {self.steps} leaves no step to run")
        if self.sampler not in ("lms", "ddim"):
            raise EditError(f"sampler '{self.sampler}' is not one of lms, ddim")
        if self.method not in ("instdiffedit", "diffedit", "sdedit"):
            raise EditError(f"method '{self.method}' is not one of instdiffedit, diffedit, sdedit")
        if self.diffedit_samples < 1:
            raise EditError(f"diffedit_samples {self.diffedit_samples} must be at least 1")
        if self.attention not in ("running", "instant"):
            raise EditError(f"attention '{self.attention}' is not one of running, instant")
        if self.attention_res < 1:
            raise EditError(f"attention_res {self.attention_res} must be at least 1")


@dataclass
class MaskOutput:
    mask: torch.Tensor        # (H, W) bool at latent resolution
    soft: torch.Tensor        # (H, W) float in [0, 1] at latent resolution
    P: torch.Tensor           # Eq. 8 positions, one per word (SOT and EOT included, 0)
    words: list[str]          # ["<sot>", word..., "<eot>"], aligned with P and word_maps
    word_maps: torch.Tensor   # (words, H, W) normalised maps the mask was built from
    latents: torch.Tensor     # (rounds, C, h, w) Eq. 5 result after the last step


@dataclass
class EditResult:
    image: Image.Image        # edited image at the input's original size
    mask: Image.Image         # binary mask at the input's original size
    soft_mask: Image.Image    # refined soft map at the input's original size
    P: list[int]
    words: list[str]
    word_maps: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


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
    def __init__(self, sd, inpaint_unet=None, device="cpu", dtype=torch.float32):
        self.unet, self.vae, self.text_encoder, self.tokenizer = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer
        self.inpaint_unet = inpaint_unet
        self.scheduler_config = SchedulerConfig.from_dict(sd.scheduler_config) if sd.scheduler_config else SchedulerConfig()
        self.device, self.dtype = torch.device(device), dtype
        self.scale = self.vae.config.scaling_factor
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size = self.unet.config.sample_size * self.vae_factor  # the trained image size: 512 for SD v1.x

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, inpaint_model: str | None = DEFAULT_INPAINT_MODEL,
                        device: str | None = None, dtype: torch.dtype | None = None, compile: bool = False):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
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
        return check_finite(self.vae.decode(z / self.scale), "the VAE decoder",
                            "its weights or scaling_factor, or fp16 overflow: try --dtype fp32")

    def _unet_cfg(self, unet, sampler, x, i, t, emb, guidance, extra=None, recorder=None):
        """One classifier-free-guided model prediction for a batch x of n latents; emb is (2, 77, D)."""
        n = x.shape[0]
        inp = sampler.scale_model_input(torch.cat([x, x]), i)
        if extra is not None:  # inpainting: mask and masked-image latents as extra channels
            inp = torch.cat([inp, torch.cat([extra, extra])], dim=1)
        ctx = emb.repeat_interleave(n, dim=0)  # [uncond x n, cond x n]
        uncond, cond = unet(inp, t, ctx, recorder=recorder).chunk(2)
        return cfg(uncond, cond, guidance)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(seed)  # noise drawn on the CPU: the same on every device

    # -- stage 1: instant mask and mask-guided denoising (Eq. 4-9)

    def _noised(self, x0: torch.Tensor, o: EditOptions, gen: torch.Generator, n: int):
        """Source latents z0 (n copies), n noises (one per round), and z0 noised to strength r."""
        z0 = self.encode_image(x0)
        sampler = make_sampler(o.sampler, self.scheduler_config)
        sampler.set_timesteps(o.steps, self.device)
        start = sampler.start_index(o.strength)
        eps = torch.randn((n, *z0.shape[1:]), generator=gen).to(self.device, self.dtype)
        z0 = z0.expand(n, -1, -1, -1)
        return sampler, start, z0, eps, sampler.add_noise_at(z0, eps, start)

    @torch.no_grad()
    def _stage1(self, x0: torch.Tensor, edit: str, o: EditOptions, gen: torch.Generator,
                progress: bool = False, emb: torch.Tensor | None = None) -> MaskOutput:
        words = self.tokenizer.words(edit)  # [(word, [token positions])], positions count SOT as 0
        emb = self.encode_text(edit) if emb is None else emb
        sampler, start, z0, eps, x = self._noised(x0, o, gen, o.rounds)
        h, w = z0.shape[-2:]
        grids = self.cross_attention_grids(h)
        if o.attention_res not in grids:
            raise EditError(f"attention_res {o.attention_res}: this UNet has cross-attention only at the "
                            f"{', '.join(f'{g}x{g}' for g in grids)} grids of its {h}x{w} latent")
        store = AttentionStore((h, w), rounds=o.rounds, cfg=True, mode=o.attention, factor=h // o.attention_res)
        positions = [pos for _, pos in words]
        P, res = None, None
        for i in _progress(range(start, len(sampler.timesteps)), progress, "mask + guided denoising"):
            t = sampler.timesteps[i]
            pred = self._unet_cfg(self.unet, sampler, x, i, t, emb, o.guidance, recorder=store)
            store.end_step()
            x = sampler.step(pred, i, x)
            # Eq. 6-9 on the maps so far; P (Eq. 8) is fixed at the first step and reused
            res = instant_mask(store.maps(), positions, (h, w), P=P, gamma1=o.gamma1, gamma2=o.gamma2,
                               threshold=o.threshold)
            P = res.P
            # Eq. 5: outside the mask, the latents follow the source image noised to this step
            y = sampler.add_noise_at(z0, eps, i)
            m = res.mask.to(x.dtype)
            x = y + m * (x - y)
        check_finite(x, "stage 1 (mask-guided denoising)", _GUIDANCE_CAUSE.format(g=o.guidance))
        names = ["<sot>"] + [wd for wd, _ in words] + ["<eot>"]
        return MaskOutput(res.mask, res.soft, res.P, names, res.word_maps, x)

    # -- baselines on the same models, samplers and seeds (paper Table 1)

    @torch.no_grad()
    def _sdedit(self, x0: torch.Tensor, emb: torch.Tensor, o: EditOptions, gen: torch.Generator,
                progress: bool = False) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): noise to strength r, denoise with the edit text, no mask."""
        sampler, start, _, _, x = self._noised(x0, o, gen, 1)
        for i in _progress(range(start, len(sampler.timesteps)), progress, "sdedit"):
            x = sampler.step(self._unet_cfg(self.unet, sampler, x, i, sampler.timesteps[i], emb, o.guidance), i, x)
        return self.decode(check_finite(x, "SDEdit denoising", _GUIDANCE_CAUSE.format(g=o.guidance)))

    @torch.no_grad()
    def _diffedit(self, x0: torch.Tensor, emb: torch.Tensor, o: EditOptions, gen: torch.Generator) -> DiffEditMask:
        """DiffEdit's mask: noise predictions under the source and the edit text differ where the edit goes."""
        sampler, start, _, _, x = self._noised(x0, o, gen, o.diffedit_samples)
        t = sampler.timesteps[start]
        pred_source = self._unet_cfg(self.unet, sampler, x, start, t, self.encode_text(o.source), o.guidance)
        pred_edit = self._unet_cfg(self.unet, sampler, x, start, t, emb, o.guidance)
        check_finite(pred_edit - pred_source, "DiffEdit's noise difference", _GUIDANCE_CAUSE.format(g=o.guidance))
        return diffedit_mask(pred_source, pred_edit, o.diffedit_ratio, o.diffedit_blur or None)

    # -- stage 2: inpainting finish

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
        sampler = make_sampler(o.sampler, self.scheduler_config)
        sampler.set_timesteps(o.steps, self.device)
        x = torch.randn(masked.shape, generator=gen).to(self.device, self.dtype) * sampler.init_noise_sigma
        extra = torch.cat([m, masked], dim=1)
        for i in _progress(range(len(sampler.timesteps)), progress, "inpainting"):
            t = sampler.timesteps[i]
            x = sampler.step(self._unet_cfg(self.inpaint_unet, sampler, x, i, t, emb, o.guidance, extra), i, x)
        check_finite(x, "the inpainting finish", _GUIDANCE_CAUSE.format(g=o.guidance))
        return self.decode(x)

    # -- public API

    def _prepare(self, image, edit: str, o: EditOptions):
        o.check()
        if not edit or not edit.strip():
            raise EditError("the edit text is empty")
        check_text(edit, "the edit text")
        check_text(o.source, "the source text")
        T = self.scheduler_config.num_train_timesteps
        if o.steps > T:
            raise EditError(f"steps {o.steps} is more than the model's {T} training timesteps")
        self.check_memory(2 * max(o.rounds if o.method == "instdiffedit" else 1,
                                  o.diffedit_samples if o.method == "diffedit" else 1))
        img = load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
        return img, to_tensor(img, self.size, self.device, self.dtype)

    def mask(self, image, edit: str, progress: bool = False, **options) -> MaskOutput:
        """The InstDiffEdit mask alone (stage 1)."""
        o = EditOptions(**options)
        _, x0 = self._prepare(image, edit, o)
        return self._stage1(x0, edit, o, self._generator(o.seed), progress)

    def edit(self, image, edit: str, mask: torch.Tensor | None = None, progress: bool = False,
             **options) -> EditResult:
        """Edit `image` (path or PIL) toward the text `edit`. `mask` (bool, any size) skips stage 1."""
        o = EditOptions(**options)
        img, x0 = self._prepare(image, edit, o)
        gen = self._generator(o.seed)
        timings: dict[str, float] = {}
        tic = _clock(self.device)
        emb = self.encode_text(edit)  # once: stage 1 and the finish share it
        h, w = (s // self.vae_factor for s in x0.shape[-2:])
        soft, P, words, maps, st1 = None, [], [], torch.zeros(0, h, w), None
        if mask is not None:
            m = F.interpolate(mask.float()[None, None], size=(h, w), mode="area")[0, 0].to(self.device) > 0.5
        elif o.method == "instdiffedit":
            st1 = self._stage1(x0, edit, o, gen, progress, emb)
            m, soft, P, words, maps = st1.mask, st1.soft, [int(v) for v in st1.P.tolist()], st1.words, st1.word_maps
        elif o.method == "diffedit":
            de = self._diffedit(x0, emb, o, gen)
            m, soft = de.mask, de.soft
        else:  # sdedit: no mask, the whole image may change
            m = torch.ones(h, w, dtype=torch.bool, device=self.device)
        timings["mask_s"] = _clock(self.device) - tic
        tic = _clock(self.device)
        if o.method == "sdedit" and mask is None:
            out = self._sdedit(x0, emb, o, gen, progress)[0]
        elif o.inpaint:
            out = self.inpaint(x0, m, emb, o, gen, progress)[0]
        else:
            if st1 is None:
                raise EditError("--no-inpaint decodes InstDiffEdit's Eq. 5 result: it needs the instdiffedit "
                                "method and no --mask")
            out = self.decode(st1.latents[:1])[0]
        timings["finish_s"] = _clock(self.device) - tic
        size = img.size
        edited = to_pil(out).resize(size, Image.BICUBIC)
        soft = m.float() if soft is None else soft
        return EditResult(edited, map_to_pil(m, size, binary=True), map_to_pil(soft, size), P, words,
                          maps.float().cpu(), timings)


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


def _fraction(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a number") from None


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
    p.add_argument("--strength", type=_fraction, default=0.5, help="noise strength r in (0, 1] (default 0.5)")
    p.add_argument("--threshold", type=_fraction, default=0.2, help="mask threshold phi in [0, 1] (default 0.2)")
    p.add_argument("--rounds", type=int, default=3, help="parallel denoising rounds n (default 3)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    p.add_argument("--guidance", type=_fraction, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", choices=["lms", "ddim"], default="lms", help="scheduler (default lms, as the authors)")
    p.add_argument("--attention", choices=["running", "instant"], default="running",
                   help="maps averaged over the steps so far (authors, default) or this step's only")
    p.add_argument("--attention-res", type=int, default=16,
                   help="grid of the cross-attention maps used for the mask (default 16, SD v1.x: latent / 4)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets")
    p.add_argument("--method", choices=["instdiffedit", "diffedit", "sdedit"], default="instdiffedit",
                   help="InstDiffEdit (default) or the paper's baselines DiffEdit / SDEdit, on the same models")
    p.add_argument("--source", default="", help="DiffEdit only: text describing the input image")
    p.add_argument("--mask", default=None, help="use this mask (white = edit) instead of generating one")
    p.add_argument("--no-inpaint", action="store_true", help="decode the Eq. 5 result instead of inpainting")
    p.add_argument("--save-attention", action="store_true", help="also write the labelled per-word attention maps")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
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
    check_text(args.source, "--source")
    opts = EditOptions(strength=args.strength, threshold=args.threshold, rounds=args.rounds, steps=args.steps,
                       guidance=args.guidance, sampler=args.sampler, seed=args.seed, attention=args.attention,
                       attention_res=args.attention_res,
                       inpaint=not args.no_inpaint, method=args.method, source=args.source)
    opts.check()
    if args.no_inpaint and args.mask:
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

    tic = time.perf_counter()
    needs_inpaint = opts.inpaint and (opts.method != "sdedit" or user_mask is not None)  # SDEdit needs no mask finish
    pipe = InstDiffEdit.from_pretrained(model, inpaint_model if needs_inpaint else None, device, dtype, args.compile)
    load_s = time.perf_counter() - tic
    tokens = pipe.tokenizer._body(args.edit)[1]  # the uncut count (tokens() is already cut to 75)
    if tokens > 75:
        print(f"warning: the edit text has {tokens} tokens; only the first 75 are used", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="prompt has .* tokens")  # warned once just above
        res = pipe.edit(img, args.edit, mask=user_mask, progress=not args.quiet, **asdict(opts))

    record = {
        "image": str(image), "edit": args.edit, "model": model,
        "inpaint_model": inpaint_model if needs_inpaint else None, "mask_file": args.mask,
        "options": asdict(opts), "device": str(pipe.device), "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile, "words": res.words, "P": res.P,
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
