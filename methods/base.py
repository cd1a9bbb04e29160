"""What a method is, what it gets from the pipeline, and the registry that every front end reads.

A method is a subclass of `Method` registered with `@register`. The pipeline (instdiffedit.InstDiffEdit)
calls `method.edit(pipe, job)` (or `method.mask(pipe, job)` for pipe.mask()) with:

    pipe   the models (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.inpaint_unet) and the
           shared machinery: pipe.encode_text(text), pipe.encode_image(x), pipe.decode(z),
           pipe.sampler(o) (a fresh sampler with its timesteps set), pipe.noised(x0, o, gen, n),
           pipe.unet_cfg(unet, sampler, x, i, t, emb, guidance) (the one counted UNet call),
           pipe.finish(job, mask) (the inpainting finish), pipe.progress(iterable, job, label)
    job    one edit: the source x0, the edit text and its embedding, the validated options o, the seeded
           CPU generator gen (draw all noise from it), a user mask if one was given

A mask method implements `mask()` only; `edit()` then finishes with the inpainting model.
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


@dataclass
class Edited:
    image: torch.Tensor       # (3, S, S) decoded edit in [-1, 1]
    mask: MaskOutput | None   # the mask the edit used (None: the method edits the whole image)


class Method:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""                 # one line for --help and the README's table
    options: ClassVar[tuple[Option, ...]] = ()  # the method's own options (shared ones: options.SHARED)
    defaults: ClassVar[dict] = {}            # the method's defaults for shared options, e.g. {"threshold": 0.3}
    makes_mask: ClassVar[bool] = True        # pipe.mask() works; benchmarks score the mask's IoU
    needs_source: ClassVar[bool] = False     # needs a text describing the input image (option `source`)
    uses_inpaint: ClassVar[bool] = True      # finishes with the inpainting UNet (the CLI loads it)

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        return {**SHARED_BY_NAME, **{s.name: s for s in cls.options}}

    def check(self, o: EditOptions) -> None:
        """Checks across this method's options; raise EditError."""

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
