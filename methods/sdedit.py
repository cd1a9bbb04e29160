"""SDEdit (Meng et al. 2022), a Table 1 baseline: noise the source to strength r, denoise with the edit
text, decode. No mask, no inpainting model: the whole image may change.
Options used: strength, steps, guidance, sampler, seed.
"""
from __future__ import annotations

import torch

from .base import Edited, Job, Method, check_finite, guidance_cause, register, report_step


@register
class SDEdit(Method):
    name = "sdedit"
    help = "noise to strength r and denoise with the edit text; no mask (baseline)"
    makes_mask = False
    uses_inpaint = False
    takes_mask = False

    @torch.no_grad()
    def edit(self, pipe, job: Job) -> Edited:
        o = job.o
        sampler, start, _, _, x = pipe.noised(job.x0, o, job.gen, 1)
        for i in pipe.progress(range(start, len(sampler.timesteps)), job.progress, "sdedit"):
            x = sampler.step(pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timesteps[i], job.emb, o.guidance), i, x)
            report_step(job.callback, "sdedit", i - start, sampler.timesteps[i], x)
        return Edited(pipe.decode(check_finite(x, "SDEdit denoising", guidance_cause(o.guidance)))[0], None)
