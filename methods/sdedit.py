"""SDEdit (Meng et al. 2022), a Table 1 baseline: noise the source to strength r, denoise with the edit
text, decode. No mask, no inpainting model: the whole image may change.
Options used: strength, steps, guidance, sampler, seed.
"""
from __future__ import annotations

import torch

from .base import Edited, Job, Method, register
from .options import EditError


@register
class SDEdit(Method):
    name = "sdedit"
    help = "noise to strength r and denoise with the edit text; no mask (baseline)"
    makes_mask = False
    uses_inpaint = False

    @torch.no_grad()
    def edit(self, pipe, job: Job) -> Edited:
        if job.mask is not None:
            raise EditError("method sdedit edits the whole image and takes no mask")
        if not job.o.inpaint:
            raise EditError("--no-inpaint is InstDiffEdit's; sdedit never inpaints")
        o = job.o
        sampler, start, _, _, x = pipe.noised(job.x0, o, job.gen, 1)
        for i in pipe.progress(range(start, len(sampler.timesteps)), job.progress, "sdedit"):
            x = sampler.step(pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timesteps[i], job.emb, o.guidance), i, x)
        return Edited(pipe.decode(x)[0], None)
