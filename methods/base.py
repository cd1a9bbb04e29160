"""What a method is, what it gets from the pipeline, and the registry that every front end reads.

A method is a subclass of `Method` registered with `@register`. The pipeline (instdiffedit.InstDiffEdit)
calls `method.edit(pipe, job)` (or `method.mask(pipe, job)` for pipe.mask()) with:

    pipe   the models (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.inpaint_unet) and the
           shared machinery: pipe.encode_text(text), pipe.encode_image(x), pipe.decode(z),
           pipe.sampler(o) (a fresh sampler with its timesteps set), pipe.noised(x0, o, gen, n),
           pipe.unet_cfg(unet, sampler, x, i, t, emb, guidance) (the one counted UNet call),
           pipe.finish(job, mask) (the inpainting finish), pipe.progress(iterable, job.progress, label),
           pipe.run_steps(step, sampler, indices, unet, eager) (a loop written as an in-place step function,
           run eagerly or replayed from a CUDA graph: model/runtime.py; stage 1 of instdiffedit.py)
    job    one edit: the source x0, the edit text and its embedding, the validated options o, the seeded
           CPU generator gen (draw all noise from it), a user mask if one was given

A mask method implements `mask()` only; `edit()` then finishes with the inpainting model. Each denoising
loop of a method calls `report_step(job.callback, stage, step, t, latents, ...)` after every step (the
per-step callback, `StepState`; the finish reports its own); a loop run by pipe.run_steps passes
eager=job.callback is not None, since a CUDA-graph replay would not call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .options import SHARED_BY_NAME, EditError, EditOptions, Option


@dataclass
class MaskOutput:
    mask: torch.Tensor        # (H, W) bool at latent resolution
    soft: torch.Tensor        # (H, W) float in [0, 1] at latent resolution
    P: torch.Tensor | list = field(default_factory=list)  # InstDiffEdit's Eq. 8 positions, one per word
    words: list[str] = field(default_factory=list)        # ["<sot>", word..., "<eot>"], aligned with P, word_maps
    word_maps: torch.Tensor | None = None  # (words, H, W) normalised maps the mask was built from
    latents: torch.Tensor | None = None    # InstDiffEdit: (rounds, C, h, w) Eq. 5 result after the last step
    unet_evals: int = 0       # UNet image-evaluations (batch rows) this mask took, counted at the call
    seconds: float = 0.0      # wall time of the mask


@dataclass
class Job:
    """One edit as a method sees it."""
    x0: torch.Tensor          # (1, 3, S, S) source image in [-1, 1] at the model's size
    text: str                 # the edit text
    emb: torch.Tensor         # pipe.encode_text(text): (2, 77, D) [unconditional, conditional]
    o: EditOptions            # validated options (shared + the method's own)
    gen: torch.Generator      # CPU generator seeded with o.seed: all noise of the edit comes from it
    mask: torch.Tensor | None = None  # user mask, bool at latent size: skips the method's own mask
    progress: bool = False    # show progress bars
    timings: dict[str, float] = field(default_factory=dict)  # pipe.finish records finish_s here
    callback: object = None   # f(step, t, StepState) after every denoising step (callback_on_step_end):
                              # every denoising loop calls report_step(job.callback, ...) after each step


@dataclass
class StepState:
    """What callback_on_step_end sees after a denoising step (tensors on the pipeline's device; read only).

    Every method reports every step of each of its denoising loops (a step that moves the latents toward
    the image), counted from 0 within its stage, through `report_step`. Inversion loops (the DDIM
    inversions of PtP, PnP and diffedit-original, LEDITS++'s edit-friendly inversion) are not reported:
    they climb from the image to noise, so within a stage the timesteps t only go down. CycleDiffusion
    encodes and decodes in one loop; its steps report the decoded (edit) latents."""
    stage: str                # the loop: "mask" (InstDiffEdit's stage 1, after Eq. 5), "inpaint" (the shared
                              # finish), else the method's name ("sdedit", "ptp", ...; DiffEdit's two prompts:
                              # "diffedit:source", "diffedit:edit")
    latents: torch.Tensor     # (batch, C, h, w) latents after the step (InstDiffEdit: its rounds; DiffEdit: its
                              # samples; PtP: [source, edit])
    mask: torch.Tensor | None = None  # (h, w) bool: the mask in use at this step (the finish and diffedit-original's
                              # decoding: their fixed mask; LEDITS++: the step's implicit masks, united); None: no mask
    soft: torch.Tensor | None = None  # (h, w) float in [0, 1]: the current soft mask; None exactly when mask is
    word_maps: torch.Tensor | None = None  # (words, h, w) maps so far (stage "mask")
    words: list[str] = field(default_factory=list)


def report_step(callback, stage: str, step: int, t, latents: torch.Tensor, mask: torch.Tensor | None = None,
                soft: torch.Tensor | None = None, word_maps: torch.Tensor | None = None,
                words: list[str] | None = None) -> None:
    """After a denoising step: callback(step, t, StepState), when the edit has a callback (job.callback).
    The latents are copied, so that a loop may go on updating its own in place."""
    if callback is not None:
        callback(step, t, StepState(stage, latents.clone(), mask, soft, word_maps, words or []))


@dataclass
class Edited:
    image: torch.Tensor       # (3, S, S) decoded edit in [-1, 1]
    mask: MaskOutput | None   # the mask the edit used (None: the method edits the whole image)


def check_finite(x: torch.Tensor, stage: str, cause: str) -> torch.Tensor:
    """Never silent garbage: one reduction per stage (not per step); a NaN/inf becomes one error line."""
    if not bool(torch.isfinite(x).all()):
        raise EditError(f"{stage} produced NaN or inf values ({cause})")
    return x


def guidance_cause(guidance: float) -> str:
    """The likely causes of non-finite latents after a guided denoising loop, for check_finite."""
    return (f"guidance {guidance} too large in magnitude, broken weights, or fp16 overflow: "
            "try a guidance near 7.5 or --dtype fp32")


class Method:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""                 # one line for --help and the README's table
    options: ClassVar[tuple[Option, ...]] = ()  # the method's own options (shared ones: options.SHARED)
    defaults: ClassVar[dict] = {}            # the method's defaults for shared options, e.g. {"threshold": 0.3}
    makes_mask: ClassVar[bool] = True        # pipe.mask() works; benchmarks score the mask's IoU
    needs_source: ClassVar[bool] = False     # needs a text describing the input image (option `source`)
    uses_inpaint: ClassVar[bool] = True      # finishes with the inpainting UNet (the CLI loads it)
    takes_mask: ClassVar[bool] = True        # a user mask replaces (LEDITS++: weights) the method's own
    samplers: ClassVar[tuple[str, ...] | None] = None  # the samplers it runs with (None: any)

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        return {**SHARED_BY_NAME, **{s.name: s for s in cls.options}}

    def check(self, o: EditOptions) -> None:
        """Checks across this method's options; raise EditError."""

    def unet_batch(self, o: EditOptions) -> int:
        """The largest UNet batch the method runs (rows), for the memory estimate made before allocating."""
        return 2  # one classifier-free-guidance pair

    def mask(self, pipe, job: Job) -> MaskOutput:
        raise EditError(f"method {self.name} makes no mask")

    def edit(self, pipe, job: Job) -> Edited:
        m = self.mask(pipe, job) if job.mask is None else MaskOutput(job.mask, job.mask.float())
        return Edited(pipe.finish(job, m.mask), m)


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make the method available to the API, the CLIs and the benchmarks."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    for spec in cls.options:  # one flag per name across all methods
        if spec.name in SHARED_BY_NAME or any(spec.name == s.name and spec != s
                                              for m in REGISTRY.values() for s in m.options):
            raise ValueError(f"{cls.name}: option {spec.name} is already defined differently")
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise EditError(f"method {name!r} is not one of {', '.join(REGISTRY)}") from None
