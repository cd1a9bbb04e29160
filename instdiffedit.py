#!/usr/bin/env python3
"""InstDiffEdit: instant, mask-guided text-driven image editing (Zou et al., AAAI 2024, arXiv 2401.07709).

Stage 1 runs Stable Diffusion from the noised source image (strength r) with the edit text as the
only prompt, n rounds at once. At every step the 16x16 cross-attention maps give an instant mask
(Eq. 6-9, `mask/`) that guides the denoising (Eq. 4-5). Stage 2 hands the final mask to the SD
inpainting UNet, which generates the edit from pure noise. This file holds the pipeline (the models and
what every method shares) and the CLI; the methods are in methods/, image and mask input/output in
images.py, and what run.json records about a run in provenance.py.

    python instdiffedit.py --image cat.jpg --edit "a dog"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import outset
from evaluation.figures import attention_figure, mask_outline, steps_strip, strip_masks
# images.py and provenance.py are the homes of the names below, imported for this file's use only: the
# README's Python API from this module is InstDiffEdit and EditResult, so nothing here is a re-export.
from images import as_image, as_mask, expand_images, keep_unmasked, load_image, load_mask, map_to_pil, to_pil, to_tensor
from methods import (EditError, EditOptions, Job, MaskOutput, add_arguments, check_finite, get_method, guidance_cause,
                     options_from_args, report_step)
from methods.options import SHARED_BY_NAME
from model.runtime import Placement, run_steps
from provenance import code_commit, model_hashes, model_record, pixels_sha256, sha256_file, versions
from sampler import SchedulerConfig, cfg, make_sampler
from weights import (DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, Need, WeightsError, default_inpaint_model, load,
                     resolve_models)
from weights.sources import BUNDLED, assets_dir
from weights.errors import one_line

TOY_MODEL = str(assets_dir() / BUNDLED["toy"])  # the bundled toy model: --model toy
TOY_INPAINT_MODEL = str(assets_dir() / BUNDLED["toy-inpaint"])


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
    """What edit() and mask() return (from mask(), `image` is None). Pictures are PIL images at the
    input's own size and orientation; tensors are on the CPU at latent size (the model's size / 8)."""
    image: Image.Image | None  # the edited image; None from mask()
    mask: Image.Image         # binary mask, "L" (255 = edited); edit(mask=...) takes it back as is
    soft_mask: Image.Image    # the soft map the mask was thresholded from, "L"
    P: list[int]              # InstDiffEdit's Eq. 8 positions, one per word ([] for other methods)
    words: list[str]          # ["<sot>", word..., "<eot>"], aligned with P and word_maps
    word_maps: torch.Tensor   # (words, h, w) normalised cross-attention maps the mask was built from
    mask_latent: torch.Tensor  # (h, w) bool: the mask the method used
    soft_latent: torch.Tensor  # (h, w) float in [0, 1]
    latents: torch.Tensor | None = None  # InstDiffEdit: (rounds, C, h, w) Eq. 5 latents after the last step
    timings: dict[str, float] = field(default_factory=dict)  # mask_s (the method), finish_s (inpainting)
    unet_evals: int = 0       # UNet image-evaluations of the edit (batch rows, counted at every call)
    unet_evals_by_model: dict[str, int] = field(default_factory=dict)  # {"unet": ..., "inpaint_unet": ...}


# ---------------------------------------------------------------- devices

def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device (checked by check_device: the one place), else cuda, else mps, else cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return check_device(str(device))


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (cuda, mps), where it halves memory and time; fp32 on the CPU."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


# Edit time on the CPU relative to fp32, measured on the bundled toy model, one thread (README,
# "Devices"): fp16 37.8x, bf16 0.86x (this CPU computes bf16 natively). Only fp16 is worth a warning.
CPU_SLOW_DTYPES = {torch.float16: "37.8x"}


def check_precision(device: torch.device, dtype: torch.dtype) -> None:
    """fp16 on the CPU works but is far slower than fp32: say so (Python shows it once)."""
    if device.type == "cpu" and dtype in CPU_SLOW_DTYPES:
        warnings.warn(f"fp16 on the CPU is slower than fp32, not faster (measured {CPU_SLOW_DTYPES[dtype]} the fp32 "
                      f"time on the toy model); use fp32 (the CPU default) or bf16", RuntimeWarning, stacklevel=3)


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
        self.sources = {}  # role -> weights.Resolved (path, hub revision), filled by from_pretrained
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
    def from_pretrained(cls, model: str = DEFAULT_MODEL, inpaint_model: str | None = "auto",
                        device: str | None = None, dtype: torch.dtype | None = None, compile: bool | str = False,
                        tokenizer: str | None = None, cuda_graphs: bool = False, offload: bool = False,
                        channels_last: bool = False) -> "InstDiffEdit":
        """Load the models and return a ready pipeline.

        model: SD v1.x: a hub repo id, a diffusers-layout folder, a CompVis single file (.safetensors
            or .ckpt), or "toy" (the small model bundled with the package).
        inpaint_model: the 9-channel inpainting UNet, in the same forms. "auto" (default): "toy-inpaint"
            for the toy model, else stable-diffusion-v1-5/stable-diffusion-inpainting. None: no
            inpainting (mask() and edit(inpaint=False) still work).
        device: "cuda", "mps", "cpu", "cuda:1", ... (default: cuda, else mps, else cpu).
        dtype: default fp16 on cuda and mps, fp32 on the CPU.
        compile, cuda_graphs, offload, channels_last: the device-level options (class docstring).
        tokenizer: a tokenizer folder, model folder or hub id replacing the model's own; a single file
            has none and uses the CLIP vocabulary bundled with the package (SD v1.x's).

        Every source is located first (hub ids are fetched, only the files read) and everything
        missing is listed in one WeightsError before any weight is read.
        """
        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        check_precision(device, dtype)
        inpaint_model = default_inpaint_model(model) if inpaint_model == "auto" else inpaint_model
        parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        own = tuple(c for c in parts if c != "tokenizer") if tokenizer else parts  # what the model source gives
        needs = [Need("model", str(model), own, "pass a local folder or single file (--model PATH)")]
        if inpaint_model:
            needs.append(Need("inpaint model", str(inpaint_model), ("unet",),
                              "pass a local one (--inpaint-model PATH) or do without it (--no-inpaint, "
                              "or inpaint_model=None in Python)"))
        if tokenizer:
            needs.append(Need("tokenizer", str(tokenizer), ("tokenizer",),
                              "pass a local tokenizer folder, or leave --tokenizer out"))
        found = resolve_models(needs, half=dtype in (torch.float16, torch.bfloat16))
        tok = found["tokenizer"].path if tokenizer else None
        where = "cpu" if offload else device  # offload: load on the host; each UNet visits the device in turn
        sd = load(found["model"].path, parts, device=where, dtype=dtype, tokenizer_source=tok)
        inpaint = None
        if inpaint_model:
            inpaint = load(found["inpaint model"].path, components=("unet",), device=where, dtype=dtype).unet
            if inpaint.config.in_channels != 9:
                raise WeightsError(f"{inpaint_model}: the inpainting UNet must take 9 input channels, "
                                   f"this one takes {inpaint.config.in_channels}")
        pipe = cls(sd, inpaint, device, dtype, compile=compile, cuda_graphs=cuda_graphs, offload=offload,
                   channels_last=channels_last)
        pipe.sources = found
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

    def run_steps(self, step, sampler, indices, unet, eager: bool = False):
        """Run a denoising loop's step function over `indices`, eagerly or as CUDA-graph replays
        (model/runtime.py; self.cuda_graphs), with `unet` (the one the step calls) placed on the device
        before the loop (offload). eager: every step in Python, e.g. for a per-step callback, which a
        replay would not call. Returns the last step's return value."""
        graph = self.cuda_graphs and not eager
        if graph and not hasattr(sampler, "index"):
            raise EditError(f"cuda_graphs needs a sampler that takes device step indices (lms), not "
                            f"{type(sampler).__name__}")
        self.placement.use(unet)
        return run_steps(step, indices, sampler.index if graph else None, graph, self.unet_evals)

    def finish(self, job: Job, mask: torch.Tensor) -> torch.Tensor:
        """The inpainting finish every mask method shares: (3, S, S) edit of job.x0 inside `mask`."""
        if not job.o.inpaint:
            raise EditError(f"--no-inpaint decodes InstDiffEdit's Eq. 5 result: it needs the instdiffedit "
                            f"method and no --mask (method {job.o.method})")
        tic = _clock(self.device)
        out = self.inpaint(job.x0, mask, job.emb, job.o, job.gen, job.progress, job.callback)[0]
        job.timings["finish_s"] = _clock(self.device) - tic
        return out

    # -- the inpainting finish

    @torch.no_grad()
    def inpaint(self, x0: torch.Tensor, mask: torch.Tensor, prompt: str | torch.Tensor, o: EditOptions,
                gen: torch.Generator, progress: bool = False, callback=None) -> torch.Tensor:
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
            if callback is not None:  # eager steps only (run_steps is told so): i is an int here
                report_step(callback, "inpaint", i, sampler.timesteps[i], x, mask, mask.float())

        self.run_steps(step, sampler, _progress(range(len(sampler.timesteps)), progress, "inpainting"),
                       self.inpaint_unet, eager=callback is not None)
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

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "InstDiffEdit":
        """Move every network to `device` (and `dtype`) in place; returns the pipeline, as torch does."""
        device = resolve_device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        check_precision(device, dtype)
        for net in (self.unet, self.vae, self.text_encoder, self.inpaint_unet):
            if net is not None:
                net.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        return self

    def _prepare(self, image, edit: str, o: EditOptions):
        if not isinstance(edit, str) or not edit.strip():
            raise EditError("the edit text is empty")
        if get_method(o.method).needs_source and not o.source.strip():
            raise EditError(f"method {o.method} needs the text of what the image shows (--source / source=)")
        check_text(edit, "the edit text")
        check_text(o.source, "the source text")
        self.check_memory(get_method(o.method).unet_batch(o))
        img = as_image(image)
        return img, to_tensor(img, self.size, self.device, self.dtype)

    def _job(self, image, edit: str, o: EditOptions, progress: bool, mask=None, generator=None, callback=None):
        img, x0 = self._prepare(image, edit, o)
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            raise EditError("generator must be a CPU torch.Generator (all noise is drawn on the CPU)")
        job = Job(x0, edit, self.encode_text(edit), o, generator or self._generator(o.seed), None, progress,
                  callback=callback)
        if mask is not None:
            h, w = (s // self.vae_factor for s in x0.shape[-2:])
            m = as_mask(mask, img.size)
            job.mask = F.interpolate(m.float()[None, None], size=(h, w), mode="area")[0, 0].to(self.device) > 0.5
        self.unet_evals = {}  # call_unet counts into this
        return img, job

    def _result(self, img: Image.Image, job: Job, st: MaskOutput | None, image: torch.Tensor | None,
                timings: dict[str, float]) -> "EditResult":
        h, w = job.x0.shape[-2] // self.vae_factor, job.x0.shape[-1] // self.vae_factor
        m = torch.ones(h, w, dtype=torch.bool) if st is None else st.mask  # no mask: the whole image may change
        soft = m.float() if st is None else st.soft
        maps = st.word_maps if st is not None and st.word_maps is not None else torch.zeros(0, h, w)
        size = img.size
        edited = None if image is None else to_pil(image).resize(size, Image.BICUBIC)
        if edited is not None and job.o.keep_unmasked and st is not None:
            edited = keep_unmasked(img, edited, m)
        return EditResult(
            image=edited,
            mask=map_to_pil(m, size, binary=True), soft_mask=map_to_pil(soft, size),
            P=[int(v) for v in st.P] if st is not None else [], words=st.words if st is not None else [],
            word_maps=maps.float().cpu(), mask_latent=m.cpu(), soft_latent=soft.float().cpu(),
            latents=None if st is None or st.latents is None else st.latents.cpu(), timings=timings,
            unet_evals=sum(self.unet_evals.values()), unet_evals_by_model=dict(self.unet_evals))

    ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}  # diffusers' names for ours

    def _run(self, kind: str, call: dict):
        """edit() and mask() (`call`: their arguments): options gathered and checked once, then one image
        or a list of them."""
        image, edit, mask, method = call["image"], call["edit"], call.get("mask"), call["method"]
        progress, generator, callback = call["progress"], call["generator"], call["callback_on_step_end"]
        given = {k: v for k, v in call.items() if k in SHARED_BY_NAME and v is not None} | call["method_options"]
        for alias, ours in self.ALIASES.items():
            value = call[alias]
            if value is not None:
                if given.get(ours, value) != value:
                    raise EditError(f"{ours}={given[ours]} and {alias}={value} disagree; pass one of them")
                given[ours] = value
        o = self.options(method, **given)
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] > 1:
            image = list(image)
        if not isinstance(image, (list, tuple)):
            return self._one(kind, image, edit, mask, o, progress, generator, callback)
        n = len(image)
        edits = edit if isinstance(edit, (list, tuple)) else [edit] * n
        masks = mask if isinstance(mask, (list, tuple)) else [mask] * n
        if len(edits) != n or len(masks) != n:
            raise EditError(f"{n} images but {len(edits)} edit texts and {len(masks)} masks")
        return [self._one(kind, im, ed, mk, o, progress, generator, callback) for im, ed, mk in zip(image, edits, masks)]

    def _one(self, kind, image, edit, mask, o, progress, generator, callback) -> "EditResult":
        m = get_method(o.method)
        if mask is not None and not m.takes_mask:
            raise EditError(f"method {o.method} edits the whole image and takes no mask")
        if kind == "mask" and not m.makes_mask:  # refused before the image is encoded
            raise EditError(f"method {o.method} makes no mask")
        tic = _clock(self.device)
        img, job = self._job(image, edit, o, progress, mask, generator, callback)
        if kind == "mask":
            st = m.mask(self, job)
            return self._result(img, job, st, None, {"mask_s": _clock(self.device) - tic})
        out = m.edit(self, job)
        total = _clock(self.device) - tic
        finish = job.timings.get("finish_s", 0.0)
        return self._result(img, job, out.mask, out.image, {"mask_s": total - finish, "finish_s": finish})

    def edit(self, image, edit: str | list[str], mask=None, *, method: str = "instdiffedit",
             strength: float | None = None, threshold: float | None = None, rounds: int | None = None,
             steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
             seed: int | None = None, attention: str | None = None, attention_res: int | None = None,
             gamma1: float | None = None, gamma2: float | None = None, inpaint: bool | None = None,
             source: str | None = None, keep_unmasked: bool | None = None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, generator: torch.Generator | None = None,
             callback_on_step_end=None, progress: bool = False, **method_options) -> "EditResult | list[EditResult]":
        """Edit `image` toward the text `edit` (the only prompt) with `method`; returns an EditResult.

        image: a path, PIL image, numpy uint8 H x W x 3 array, or tensor 3 x H x W (float in [0, 1] or
            [-1, 1]: see `images.as_image`), or a list of them (or a B x 3 x H x W tensor) for a batch, which
            returns a list of results. Each image is resized to the model's square size (512 for SD v1.x)
            and the outputs come back at its own size.
        edit: the edit text, or one per image of a batch.
        mask: skips the method's mask: a path, PIL image (e.g. an earlier result's `.mask`), bool or
            [0, 1] array or tensor H x W (any size; white / True = edit), or one per image.
        method: a name in methods.REGISTRY: "instdiffedit" (default), "diffedit", "sdedit", ...
        num_inference_steps, guidance_scale: diffusers' names for `steps` and `guidance`.
        generator: a CPU torch.Generator to draw all the noise from, instead of one seeded with `seed`.
        callback_on_step_end: called as f(step, t, state) after every denoising step of every method
            (not after inversion steps); `state` is a methods.StepState (stage, latents, the mask and soft
            mask in use or None, word maps and words).
        progress: show progress bars.
        Every other keyword is a method option (None: the method's default); a method's own options
        (e.g. diffedit_samples) go in **method_options. The options:
        """
        return self._run("edit", locals())

    def mask(self, image, edit: str | list[str], *, method: str = "instdiffedit",
             strength: float | None = None, threshold: float | None = None, rounds: int | None = None,
             steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
             seed: int | None = None, attention: str | None = None, attention_res: int | None = None,
             gamma1: float | None = None, gamma2: float | None = None, source: str | None = None,
             num_inference_steps: int | None = None, guidance_scale: float | None = None,
             generator: torch.Generator | None = None, callback_on_step_end=None, progress: bool = False,
             **method_options) -> "EditResult | list[EditResult]":
        """The mask of `method` alone (InstDiffEdit: stage 1, no inpainting), as an EditResult whose
        `image` is None. Arguments as for edit(); EditError for a method that makes no mask. The options:
        """
        return self._run("mask", locals())


def _options_doc() -> str:
    """The options section of edit() and mask(), from the specs (methods/options.py): defined once."""
    from methods.options import all_specs
    lines = []
    for spec in all_specs().values():
        rng = f", in {spec.range_text()}" if spec.min is not None or spec.max is not None else ""
        choices = f", one of {', '.join(spec.choices)}" if spec.choices else ""
        lines.append(f"            {spec.name} ({spec.type.__name__}, default {spec.default!r}{rng}{choices}): {spec.help}")
    return "\n" + "\n".join(lines) + "\n"


InstDiffEdit.edit.__doc__ += _options_doc()
InstDiffEdit.mask.__doc__ += _options_doc()


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
    p.add_argument("--image", nargs="+", default=None,
                   help="input image(s): files, folders or globs (any format PIL reads); several images are a "
                        "batch: models load once, one output folder per image under --out")
    p.add_argument("--edit", default=None, help='edit text, the only prompt (e.g. "a raccoon")')
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--replay", default=None, metavar="RUN_JSON",
                   help="rerun what a run.json records and report whether the outputs match")
    p.add_argument("--save-steps", action="store_true", help="also write steps.png: the soft mask at every step")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"SD v1.x: hub id, diffusers folder or single file, or 'toy' (default: {DEFAULT_MODEL})")
    p.add_argument("--inpaint-model", default=None,
                   help=f"inpainting UNet source (default: {DEFAULT_INPAINT_MODEL}; the toy one with --model toy)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id replacing the model's own (default: the model's; a single "
                        "file uses the CLIP vocabulary bundled with the package, so it works offline)")
    p.add_argument("--device", default=None, help="cuda, mps, cpu, cuda:1, ... (default: cuda, else mps, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on cuda/mps, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (once per input shape)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the stage-1 and inpainting steps from CUDA graphs (CUDA, --sampler lms)")
    p.add_argument("--offload", action="store_true",
                   help="keep only the UNet in use on the GPU, the other on the CPU (8 GB cards; slower)")
    p.add_argument("--channels-last", action="store_true",
                   help="UNets in channels-last memory format (not measured to help here; off by default)")
    p.add_argument("--mask", default=None, help="use this mask (white = edit) instead of generating one")
    p.add_argument("--save-attention", action="store_true", help="also write the labelled per-word attention maps")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-image lines (a batch still ends with its summary line)")
    add_arguments(p)  # --method and every method's options, from their specs (methods/options.py)
    return p


OUTPUTS = ("edited.png", "mask.png", "soft_mask.png", "overlay.png", "attention.png", "steps.png", "run.json")


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


@dataclass
class Session:
    """What a caller that runs main() again and again (page.py) keeps between runs: the last loaded
    models, so that a run with the same model flags does not load them again, and a step callback."""
    loaded: dict = field(default_factory=dict)  # load arguments -> (pipeline, run.json's facts on its models)
    on_step: object = None    # also called as f(step, t, state) after every denoising step (callback_on_step_end)


def main(argv: list[str] | None = None, session: Session | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"  # the CLI's warnings: one line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.replay and (not args.image or args.edit is None):
        parser.error("--image and --edit are required (or --replay RUN_JSON)")
    try:
        return run(args, argv, session)
    except (EditError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. writing the results failed (permissions, disk full): one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError, and so is the
        # CPU allocator's "can't allocate memory"; any other RuntimeError is not anticipated
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) \
                and "allocate" not in str(e) and "out of memory" not in str(e):
            return _internal(e)
        print(f"error: out of memory ({one_line(e, 120)}); try fewer --rounds, --dtype fp16 on CUDA, "
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
    print(f"error: internal error, please report it: {type(e).__name__}: {one_line(e, 200)} "
          f"(rerun with {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
    return 3


def output_folders(images: list[Path], out: Path) -> list[Path]:
    """One folder per image under --out, named after the image (name-2, name-3, ... for repeats)."""
    seen: dict[str, int] = {}
    outs = []
    for im in images:
        n = seen[im.stem] = seen.get(im.stem, 0) + 1
        outs.append(out / (im.stem if n == 1 else f"{im.stem}-{n}"))
    return outs


def run(args, argv: list[str], session: Session | None = None) -> int:
    if args.replay:
        return replay(Path(args.replay), args)
    t_start = time.perf_counter()
    images, batch = expand_images(args.image)
    root = Path(args.out)
    outs = output_folders(images, root) if batch else [root]
    if not args.edit.strip():
        raise EditError("--edit is empty")
    check_text(args.edit, "--edit")
    given = options_from_args(args)
    opts = EditOptions(args.method, **given)
    check_text(opts.source, "--source")
    method = get_method(args.method)
    if not opts.inpaint and args.mask:
        raise EditError("--no-inpaint decodes the stage-1 result, which --mask skips: use one of them")
    for image, out in zip(images, outs):  # every output clash before loading anything
        _check_out(out, [image] + ([Path(args.mask)] if args.mask else []), args.overwrite)
    if args.mask and not Path(args.mask).is_file():
        raise EditError(f"{args.mask}: no such file")
    if not batch:
        load_image(images[0])  # a single bad input: its one-line error before the models load
    model = args.model
    inpaint_model = args.inpaint_model or default_inpaint_model(model)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise EditError(f"--cuda-graphs needs a CUDA device (--device {device})")
    if args.cuda_graphs and opts.sampler != "lms":
        raise EditError(f"--cuda-graphs needs --sampler lms (its steps take device step indices), not {opts.sampler}")

    tic = time.perf_counter()
    needs_inpaint = opts.inpaint and method.uses_inpaint
    key = (model, inpaint_model if needs_inpaint else None, str(device), dtype, args.compile, args.tokenizer,
           args.cuda_graphs, args.offload, args.channels_last)
    if session is not None and key in session.loaded:
        pipe, facts = session.loaded[key]
    else:
        pipe = InstDiffEdit.from_pretrained(key[0], key[1], device, dtype, args.compile, tokenizer=args.tokenizer,
                                            cuda_graphs=args.cuda_graphs, offload=args.offload,
                                            channels_last=args.channels_last)
        facts = {"models": model_record(pipe), "model_sha256": model_hashes(pipe), "versions": versions(pipe.device)}
        if session is not None:
            session.loaded = {key: (pipe, facts)}  # the last models only: the ones before are freed
    load_s = time.perf_counter() - tic
    tokens = pipe.tokenizer._body(args.edit)[1]  # the uncut count (tokens() is already cut to 75)
    if tokens > 75:
        print(f"warning: the edit text has {tokens} tokens; only the first 75 are used", file=sys.stderr)
    shared = {"model": model, "inpaint_model": inpaint_model if needs_inpaint else None,
              "command": ["instdiffedit", *argv], "argv": argv, "code_commit": code_commit(), **facts,
              "load_s": load_s}
    failed = []
    for k, (image, out) in enumerate(zip(images, outs)):
        try:
            secs = edit_one(pipe, image, out, args, opts, given, shared, session.on_step if session else None)
        except Exception as e:  # in a batch any failure is this image's: report it, go on with the rest
            if not batch:
                raise
            failed.append(image)
            msg = " ".join(str(e).split()) if isinstance(e, (EditError, WeightsError, OSError)) \
                else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"error: {msg if str(image) in msg else f'{image}: {msg}'}", file=sys.stderr)
            continue
        if not args.quiet:
            made = ", ".join(n for n in OUTPUTS if (out / n).is_file())
            print(f"{f'[{k + 1}/{len(images)}] ' if batch else ''}wrote {out}/: {made}  ({secs:.1f} s)")
    if batch:
        print(f"{len(images) - len(failed)}/{len(images)} images edited into {root}/, {len(failed)} failed"
              + (f" ({', '.join(str(f) for f in failed[:5])}{', ...' if len(failed) > 5 else ''})" if failed else "")
              + f"  ({time.perf_counter() - t_start:.1f} s)", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def edit_one(pipe: InstDiffEdit, image: Path, out: Path, args, opts: EditOptions, given: dict, shared: dict,
             on_step=None) -> float:
    """Edit one image and write its output folder (all files or none); returns the seconds it took.
    `on_step(step, t, state)` is called after every denoising step, as callback_on_step_end."""
    tic = time.perf_counter()
    img = load_image(image)
    user_mask = load_mask(args.mask, img.size) if args.mask else None
    steps: list = []

    def keep(i, t, st):
        drawn = strip_masks(st) if args.save_steps else None
        if drawn is not None:
            steps.append(drawn)
        if on_step is not None:
            on_step(i, t, st)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="prompt has .* tokens")  # the CLI warned once
        res = pipe.edit(img, args.edit, mask=user_mask, progress=not args.quiet, method=args.method,
                        callback_on_step_end=keep if args.save_steps or on_step is not None else None, **given)
    pictures = {"edited.png": res.image, "mask.png": res.mask, "soft_mask.png": res.soft_mask,
                "overlay.png": mask_outline(img, res.mask_latent)}
    if args.save_attention and res.words:
        pictures["attention.png"] = attention_figure(img, res.words, res.word_maps, res.P)
    if steps:
        pictures["steps.png"] = steps_strip(img, [soft for soft, _ in steps], [m for _, m in steps])
    elif args.save_steps:  # e.g. SDEdit: its steps have no mask to draw
        print(f"warning: --save-steps: method {args.method} has no mask at its denoising steps; no steps.png",
              file=sys.stderr)
    record = {
        "image": str(image), "image_sha256": sha256_file(image), "edit": args.edit,
        "mask_file": args.mask, "mask_sha256": sha256_file(Path(args.mask)) if args.mask else None,
        "method": args.method, "options": opts.as_dict(), "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."), "compile": args.compile, "cuda_graphs": args.cuda_graphs,
        "offload": args.offload, "channels_last": args.channels_last, "vae_fp32_decodes": pipe.vae_fp32_decodes,
        "unet_evals": res.unet_evals, "unet_evals_by_model": res.unet_evals_by_model, "words": res.words, "P": res.P,
        "outputs_sha256": {name: pixels_sha256(p) for name, p in pictures.items()
                           if name in ("edited.png", "mask.png", "soft_mask.png")},
        **{k: v for k, v in shared.items() if k != "load_s"},
        "timings_s": {"load": round(shared["load_s"], 3), **{k: round(v, 3) for k, v in res.timings.items()},
                      "total": round(shared["load_s"] + time.perf_counter() - tic, 3)},  # a batch loads once
    }
    _write_outputs(out, pictures, record)
    return time.perf_counter() - tic


def _write_outputs(out: Path, pictures: dict[str, Image.Image], record: dict) -> None:
    """All or nothing: the new set replaces the previous one in one atomic switch (outset.py)."""
    files: dict = {name: picture.save for name, picture in pictures.items()}
    files["run.json"] = (json.dumps(record, indent=2) + "\n").encode()
    outset.publish(out, files, legacy=OUTPUTS)


def replay(path: Path, args) -> int:
    """Rerun the edit a run.json records, into a temporary folder, and say whether the outputs match."""
    try:
        rec = json.loads(path.read_text())
        argv = list(rec["argv"])
    except (OSError, ValueError, KeyError, TypeError):
        raise EditError(f"{path}: not a run.json of instdiffedit (no argv)") from None
    notes = []
    image = Path(rec["image"])
    if not image.is_file():
        raise EditError(f"{path}: its input {image} is gone")
    if sha256_file(image) != rec.get("image_sha256"):
        notes.append(f"input {image} has changed since the run")
    if rec.get("mask_file") and sha256_file(Path(rec["mask_file"])) != rec.get("mask_sha256"):
        notes.append(f"mask {rec['mask_file']} has changed since the run")
    if rec.get("code_commit") and rec["code_commit"] != code_commit():
        notes.append(f"code {code_commit()} differs from the run's {rec['code_commit']}")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="instdiffedit-replay-") as tmp:
        again = build_parser().parse_args(_replace_flag(_replace_flag(argv, "--image", [str(image)]),
                                                        "--out", [tmp]) + ["--overwrite", "--quiet"])
        again.device = args.device or rec.get("device")
        code = run(again, argv)
        if code:
            return code
        new = json.loads((Path(tmp) / "run.json").read_text())
    for role, m in rec.get("models", {}).items():
        now = new["models"].get(role, {})
        if m.get("revision") != now.get("revision"):
            notes.append(f"{role} {m.get('source')}: revision {now.get('revision')} (run: {m.get('revision')})")
    if rec.get("model_sha256") != new.get("model_sha256"):
        notes.append("local model files differ from the run's (model_sha256)")
    diff = [n for n, h in rec.get("outputs_sha256", {}).items() if new["outputs_sha256"].get(n) != h]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if diff:
        print(f"replay of {path}: outputs DIFFER ({', '.join(diff)})")
        return 1
    print(f"replay of {path}: outputs match ({', '.join(rec.get('outputs_sha256', {}))} identical pixels)")
    return 0


def _replace_flag(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """argv without `flag` and its values (up to the next --option), then `flag values`."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith(flag + "="):
            i += 1
        elif argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        else:
            out.append(argv[i])
            i += 1
    return out + [flag, *values]


if __name__ == "__main__":
    sys.exit(main())
