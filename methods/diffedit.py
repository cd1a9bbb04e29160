"""DiffEdit (Couairon et al. 2022, arXiv 2210.11427), the main baseline of Table 1, in named variants:

    diffedit           as the InstDiffEdit authors ran it for Table 1 (their model/diffedit.py): for each
                       of 10 noise samples and each of two prompts (source text, edit text), the whole
                       denoising from strength 0.5 (25 of 50 LMS steps, CFG 7.5); the last step's guided
                       noise predictions differ where the edit goes. L2 over channels, mean over samples,
                       min-max, 8-bit, 5x5 Gaussian blur (sigma 1), threshold 0.3; then our inpainting
                       finish with the edit text. 10 x 2 x 25 guided calls: the paper's 64 s per edit.
    diffedit-mask      diffusers' one-step mask (StableDiffusionDiffEditPipeline.generate_mask: one guided
                       prediction per sample and prompt at the start step), then our inpainting finish.
    diffedit-original  (not yet here) Couairon et al. as diffusers implements it: DDIM inversion to the
                       encode ratio and masked DDIM decoding, no inpainting model. It needs the DDIM
                       inversion of the PtP/PnP work; it registers as one more class in this file.

Both need the source text (option `source`, e.g. the dataset list's source phrase); without one they
refuse. Differences from the authors' script: the VAE posterior mean instead of a sample, and the noise
of all samples drawn from the one master generator (the same noise for both prompts, as theirs).
"""
from __future__ import annotations

import torch

from mask.diffedit import diffedit_mask, diffedit_paper_mask

from .base import Job, MaskOutput, Method, register
from .options import Option

SAMPLES = Option("diffedit_samples", int, 10, "DiffEdit: noise samples averaged (the InstDiffEdit authors: 10)", 1, 1024)
RATIO = Option("diffedit_ratio", float, 3.0, "diffedit-mask: clamp at ratio x mean difference, binarise at half "
               "(diffusers' mask_thresholding_ratio)", 0, 1000, min_open=True)


@register
class DiffEditPaper(Method):
    needs_source = True  # the pipeline refuses an empty source
    name = "diffedit"
    help = "DiffEdit as the InstDiffEdit authors ran it for Table 1 (10 samples x 2 prompts x full denoising)"
    options = (SAMPLES,)
    defaults = {"threshold": 0.3}  # their script's --threshold

    @torch.no_grad()
    def mask(self, pipe, job: Job) -> MaskOutput:
        o = job.o
        emb_source = pipe.encode_text(o.source)
        # every sample's noise is drawn once and used for both prompts (the authors re-seed per sample)
        sampler, start, _, _, x_start = pipe.noised(job.x0, o, job.gen, o.diffedit_samples)
        last = []
        for k, emb in enumerate((emb_source, job.emb)):
            sampler = pipe.sampler(o)  # fresh: LMS keeps a history of derivatives
            x, pred = x_start, None
            for i in pipe.progress(range(start, len(sampler.timesteps)), job.progress, f"diffedit prompt {k + 1}/2"):
                pred = pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timesteps[i], emb, o.guidance)
                x = sampler.step(pred, i, x)
            last.append(pred)  # the guided noise prediction of the last step
        res = diffedit_paper_mask(last[0], last[1], o.threshold)
        return MaskOutput(res.mask, res.soft)


@register
class DiffEditMask(Method):
    needs_source = True
    name = "diffedit-mask"
    help = "DiffEdit's one-step mask as diffusers' generate_mask computes it, then inpainting"
    options = (SAMPLES, RATIO)

    @torch.no_grad()
    def mask(self, pipe, job: Job) -> MaskOutput:
        o = job.o
        emb_source = pipe.encode_text(o.source)
        sampler, start, _, _, x = pipe.noised(job.x0, o, job.gen, o.diffedit_samples)
        t = sampler.timesteps[start]
        pred_source = pipe.unet_cfg(pipe.unet, sampler, x, start, t, emb_source, o.guidance)
        pred_edit = pipe.unet_cfg(pipe.unet, sampler, x, start, t, job.emb, o.guidance)
        res = diffedit_mask(pred_source, pred_edit, o.diffedit_ratio)
        return MaskOutput(res.mask, res.soft)
