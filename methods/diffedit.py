"""DiffEdit (Couairon et al. 2022, arXiv 2210.11427), the main baseline of Table 1, in named variants:

    diffedit           as the InstDiffEdit authors ran it for Table 1 (their model/diffedit.py): for each
                       of 10 noise samples and each of two prompts (source text, edit text), the whole
                       denoising from strength 0.5 (25 of 50 LMS steps, CFG 7.5); the last step's guided
                       noise predictions differ where the edit goes. L2 over channels, mean over samples,
                       min-max, 8-bit, 5x5 Gaussian blur (sigma 1), threshold 0.3; then our inpainting
                       finish with the edit text. 10 x 2 x 25 guided calls: the paper's 64 s per edit.
    diffedit-mask      diffusers' one-step mask (StableDiffusionDiffEditPipeline.generate_mask: one guided
                       prediction per sample and prompt at the start step), then our inpainting finish.
    diffedit-original  Couairon et al. as diffusers' StableDiffusionDiffEditPipeline runs it: the one-step
                       mask of diffedit-mask on VAE posterior samples (from `strength`, diffusers'
                       mask_encode_strength 0.5), DDIM inversion of the source under the source
                       text up to the encoding ratio (diffedit_encode_ratio, diffusers'
                       inpaint_strength 0.8), then DDIM decoding under the edit text that keeps the
                       inverted latents outside the mask at every step. No inpainting model.

All need the source text (option `source`, e.g. the dataset list's source phrase); without one they
refuse. Differences of `diffedit` from the authors' script: the VAE posterior mean instead of a sample,
and the noise of all samples drawn from the one master generator (the same noise for both prompts, as
theirs). `diffedit-original` draws its noise in the pipeline's order (tests/test_diffedit_original.py
matches mask, inverted latents and output to 1e-4): VAE posterior samples and start noise of the mask,
then the VAE posterior sample that is inverted. Like diffusers, the blend after decoding step i uses the
inverted latent at the level step i started from (one level above the result; the last step blends with
the first inverted latent, not z0). Unlike diffusers at guidance <= 1, the guidance formula is applied
at every scale (as all our methods).
"""
from __future__ import annotations

import torch

from mask.diffedit import diffedit_mask, diffedit_paper_mask
from sampler.inversion import ddim_invert

from .base import Edited, Job, MaskOutput, Method, check_finite, guidance_cause, register, report_step
from .options import EditError, EditOptions, Option

SAMPLES = Option("diffedit_samples", int, 10, "DiffEdit: noise samples averaged (the InstDiffEdit authors: 10)", 1, 1024)
RATIO = Option("diffedit_ratio", float, 3.0, "diffedit-mask, diffedit-original: clamp at ratio x mean difference, "
               "binarise at half (diffusers' mask_thresholding_ratio)", 0, 1000, min_open=True)
ENCODE_RATIO = Option("diffedit_encode_ratio", float, 0.8, "diffedit-original: DDIM-invert the last int(steps x "
                      "ratio) steps and decode them (Couairon et al.'s encoding ratio; diffusers' inpaint_strength)",
                      0, 1, min_open=True)


@register
class DiffEditPaper(Method):
    needs_source = True  # the pipeline refuses an empty source
    name = "diffedit"
    help = "DiffEdit as the InstDiffEdit authors ran it for Table 1 (10 samples x 2 prompts x full denoising)"
    options = (SAMPLES,)
    defaults = {"threshold": 0.3}  # their script's --threshold

    def unet_batch(self, o: EditOptions) -> int:
        return 2 * o.diffedit_samples  # all noise samples in one CFG batch

    @torch.no_grad()
    def mask(self, pipe, job: Job) -> MaskOutput:
        o = job.o
        emb_source = pipe.encode_text(o.source)
        # every sample's noise is drawn once and used for both prompts (the authors re-seed per sample)
        sampler, start, _, _, x_start = pipe.noised(job.x0, o, job.gen, o.diffedit_samples)
        last = []
        for k, (stage, emb) in enumerate((("diffedit:source", emb_source), ("diffedit:edit", job.emb))):
            sampler = pipe.sampler(o)  # fresh: LMS keeps a history of derivatives
            x, pred = x_start, None
            for i in pipe.progress(range(start, len(sampler.timesteps)), job.progress, f"diffedit prompt {k + 1}/2"):
                pred = pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timesteps[i], emb, o.guidance)
                x = sampler.step(pred, i, x)
                report_step(job.callback, stage, i - start, sampler.timesteps[i], x)
            last.append(pred)  # the guided noise prediction of the last step
        check_finite(last[1] - last[0], "DiffEdit's noise difference", guidance_cause(o.guidance))
        res = diffedit_paper_mask(last[0], last[1], o.threshold)
        return MaskOutput(res.mask, res.soft)


@register
class DiffEditMask(Method):
    needs_source = True
    name = "diffedit-mask"
    help = "DiffEdit's one-step mask as diffusers' generate_mask computes it, then inpainting"
    options = (SAMPLES, RATIO)

    def unet_batch(self, o: EditOptions) -> int:
        return 2 * o.diffedit_samples  # all noise samples in one CFG batch

    @torch.no_grad()
    def mask(self, pipe, job: Job) -> MaskOutput:
        sampler, start, _, _, x = pipe.noised(job.x0, job.o, job.gen, job.o.diffedit_samples)
        return one_step_mask(pipe, job, sampler, start, x)


def one_step_mask(pipe, job: Job, sampler, start: int, x: torch.Tensor) -> MaskOutput:
    """generate_mask's map from the source noised to timesteps[start] (x: one latent per noise sample): one
    guided prediction per sample under each text at that step, then diffedit_mask."""
    o, t = job.o, sampler.timesteps[start]
    pred_source = pipe.unet_cfg(pipe.unet, sampler, x, start, t, pipe.encode_text(o.source), o.guidance)
    pred_edit = pipe.unet_cfg(pipe.unet, sampler, x, start, t, job.emb, o.guidance)
    check_finite(pred_edit - pred_source, "DiffEdit's noise difference", guidance_cause(o.guidance))
    res = diffedit_mask(pred_source, pred_edit, o.diffedit_ratio)
    return MaskOutput(res.mask, res.soft)


@register
class DiffEditOriginal(Method):
    needs_source = True
    uses_inpaint = False
    name = "diffedit-original"
    help = "DiffEdit as Couairon et al. designed it (diffusers' pipeline): one-step mask, DDIM inversion to the " \
           "encoding ratio, masked DDIM decoding; no inpainting model"
    options = (SAMPLES, RATIO, ENCODE_RATIO)
    defaults = {"sampler": "ddim"}  # its inversion and decoding are DDIM

    def check(self, o: EditOptions) -> None:
        if o.sampler != "ddim":
            raise EditError(f"sampler {o.sampler!r} does not apply to method diffedit-original: it inverts with DDIM")
        if int(o.steps * o.diffedit_encode_ratio) < 1:
            raise EditError(f"diffedit_encode_ratio {o.diffedit_encode_ratio} x steps {o.steps} leaves no step "
                            "to invert")

    def unet_batch(self, o: EditOptions) -> int:
        return 2 * o.diffedit_samples  # the mask's CFG batch; inversion and decoding run 2

    def _latents(self, pipe, x0: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        """n VAE posterior samples of x0 (one draw of n x latent noise, as diffusers encodes n copies)."""
        post = pipe.vae.encode(x0)
        eps = torch.randn((n, *post.mean.shape[1:]), generator=gen).to(post.mean.device, post.mean.dtype)
        return (post.mean + post.std * eps) * pipe.scale

    @torch.no_grad()
    def mask(self, pipe, job: Job) -> MaskOutput:
        """DiffEdit step 1, as generate_mask: `strength` (0.5) is its mask_encode_strength."""
        o = job.o
        z0 = self._latents(pipe, job.x0, job.gen, o.diffedit_samples)
        sampler = pipe.sampler(o)
        start = sampler.start_index(o.strength)
        eps = torch.randn(z0.shape, generator=job.gen).to(z0.device, z0.dtype)
        return one_step_mask(pipe, job, sampler, start, sampler.add_noise_at(z0, eps, start))

    @torch.no_grad()
    def invert(self, pipe, job: Job):
        """DiffEdit step 2 (encoding), as diffusers' invert(): a VAE posterior sample, DDIM-inverted under the
        source text (guided) up to the encoding ratio. Returns the sampler and the Inversion."""
        o = job.o
        z0 = self._latents(pipe, job.x0, job.gen, 1)
        sampler = pipe.sampler(o)
        emb = pipe.encode_text(o.source)
        counted = lambda x, t, ctx, control=None: pipe.call_unet(pipe.unet, x, t, ctx)
        inv = ddim_invert(counted, sampler, z0, emb[1:], emb[:1], o.guidance,
                          start=sampler.start_index(o.diffedit_encode_ratio))
        return sampler, inv

    @torch.no_grad()
    def edit(self, pipe, job: Job) -> Edited:
        if not job.o.inpaint:
            raise EditError("--no-inpaint is InstDiffEdit's; diffedit-original never inpaints")
        o = job.o
        m = self.mask(pipe, job) if job.mask is None else MaskOutput(job.mask, job.mask.float())
        sampler, inv = self.invert(pipe, job)
        keep = m.mask.to(inv.noise.device, inv.noise.dtype)[None, None]  # 1: the edit text decodes, 0: the source
        x = inv.noise  # DiffEdit step 3: decoding with mask guidance
        for i in pipe.progress(range(inv.start, len(sampler.timesteps)), job.progress, "diffedit-original"):
            x = sampler.step(pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timesteps[i], job.emb, o.guidance), i, x)
            x = keep * x + (1 - keep) * inv.at(i)  # outside the mask: the inverted source (diffusers' level)
            report_step(job.callback, self.name, i - inv.start, sampler.timesteps[i], x, m.mask, m.soft)
        check_finite(x, "DiffEdit's masked DDIM decoding", guidance_cause(o.guidance))
        return Edited(pipe.decode(x)[0], m)
