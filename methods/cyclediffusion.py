"""CycleDiffusion (Wu and De la Torre 2022, arXiv 2210.05559), a Table 1 baseline of the paper.

A stochastic DDIM (eta > 0) is a deterministic map from its latent code -- the start x_T and one
noise z_t per step -- to an image. CycleDiffusion encodes the source image into that code under the
SOURCE text, then decodes the same code under the EDIT text:

  encode   x_T = sqrt(abar_T) z0 + sqrt(1 - abar_T) n              (start at strength r, Eq. 1)
           x_prev ~ q(x_prev | x_t, z0)                              (the posterior, sampler.posterior_sample)
           z_t = (x_prev - mu(x_t, eps_source)) / s_t               (the step inverted, sampler.noise_of_step)
  decode   y_prev = mu(y_t, eps_edit) + s_t z_t                     (DDIM step, eta > 0; y_T = x_T)

The encoder needs no UNet call to draw x_prev; it needs the source prediction eps_source only to
recover z_t. Both predictions of a step are one UNet call here, so the encode and decode run in one
loop (the official code runs the whole encoding first: the same numbers).

Defaults are those of the official code (github.com/ChenWu98/cycle-diffusion,
config/experiments/translate_text2img256_stable_diffusion_stochastic_custom.cfg, SD v1.4), which the
InstDiffEdit authors ran "with default parameters" (paper appendix). Where diffusers'
CycleDiffusionPipeline (0.42, pipelines.deprecated) differs:

  option                  official (ours)                      diffusers' default
  steps                   99 (custom_steps; timesteps 981..1)  50
  strength                0.7 (skip_steps 30 of 99)            0.8
  guidance                3 (the official tries 1, 3, 5)       7.5
  cycle_source_guidance   1 (encoder scale)                    1 (source_guidance_scale)
  cycle_eta               0.1                                  0.1 (eta)

The official code decodes every decoder scale (1, 3, 5) x skip (30, 40) and keeps the candidate with
the best directional CLIP score. Ranking needs CLIP's image tower, which this project does not have;
we run one candidate, the middle scale at the first skip. With a guidance scale of 1 a branch
is evaluated on its conditional text alone, as the official code does (3 UNet image-evaluations per
step at the defaults); diffusers evaluates [uncond, cond] for both texts whenever guidance > 1 (4 per
step) and ignores source_guidance_scale when guidance_scale <= 1. Values agree (tests/test_cyclediffusion.py
matches the pipeline to 1e-4 at equal settings). diffusers' noise recovery assumes an epsilon-
predicting UNet; ours follows the model's prediction type (the toy model predicts v).
Options used: source (required), strength, steps, guidance, seed, cycle_eta, cycle_source_guidance;
the sampler is DDIM.
"""
from __future__ import annotations

import torch

from sampler import cfg

from .base import Edited, Job, Method, register, report_step
from .options import EditOptions, Option

ETA = Option("cycle_eta", float, 0.1, "CycleDiffusion: DDIM eta of its encoder and decoder (official and diffusers: "
             "0.1)", 0, 1, min_open=True)
SOURCE_GUIDANCE = Option("cycle_source_guidance", float, 1.0, "CycleDiffusion: guidance scale of the source text "
                         "in the encoder (official: 1, the conditional prediction alone)", 0, 100)


def _branch(x: torch.Tensor, emb: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet inputs of one text: [uncond, cond] for CFG, the conditional text alone at scale 1."""
    n = x.shape[0]
    if scale == 1:
        return x, emb[1:2].expand(n, -1, -1)
    return torch.cat([x, x]), emb.repeat_interleave(n, dim=0)


def _guide(out: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1:
        return out
    uncond, cond = out.chunk(2)
    return cfg(uncond, cond, scale)


@torch.no_grad()
def cycle_latents(pipe, x0: torch.Tensor, edit_emb: torch.Tensor, source_emb: torch.Tensor, o: EditOptions,
                  gen: torch.Generator, progress: bool = False, callback=None) -> torch.Tensor:
    """The edited latents (B, 4, h, w) of images x0 (B, 3, H, W) in [-1, 1].

    `edit_emb`, `source_emb`: `pipe.encode_text` embeddings, (2, 77, D) [uncond, cond]. Noise is drawn
    from `gen` (CPU) in diffusers' order: the VAE posterior sample, the start noise, then one posterior
    noise per step but the last. `callback`: callback_on_step_end, after each step with the edit path's latents."""
    s = pipe.sampler(o)  # DDIM (CycleDiffusion.check)
    start = s.start_index(o.strength)
    # the latents stay float32: z is recovered by dividing by s_t (~1e-3), so keep the source path exact
    z0 = pipe.vae.encode(x0).sample(gen).float() * pipe.scale  # a posterior sample, as official and diffusers
    shape = z0.shape
    x = s.add_noise_at(z0, torch.randn(shape, generator=gen).to(z0.device), start)  # Eq. 1, the source path
    y = x  # the edit path starts from the same x_T
    last = len(s.timesteps) - 1
    for i in pipe.progress(range(start, len(s.timesteps)), progress, "cyclediffusion"):
        t = s.timesteps[i]
        (xa, xc), (ya, yc) = _branch(x, source_emb, o.cycle_source_guidance), _branch(y, edit_emb, o.guidance)
        out = pipe.call_unet(pipe.unet, torch.cat([xa, ya]).to(pipe.dtype), t, torch.cat([xc, yc])).float()
        eps_source = _guide(out[:len(xa)], o.cycle_source_guidance)
        eps_edit = _guide(out[len(xa):], o.guidance)
        n = None if i == last else torch.randn(shape, generator=gen).to(z0.device)
        x_prev = s.posterior_sample(x, z0, i, o.cycle_eta, n)          # encode: x_prev ~ q(x_prev | x_t, z0)
        z = s.noise_of_step(eps_source, i, x, x_prev, o.cycle_eta)     # ... and the step's latent code z_t
        y = s.step(eps_edit, i, y, eta=o.cycle_eta, variance_noise=z)  # decode the same code under the edit text
        x = x_prev
        report_step(callback, "cyclediffusion", i - start, t, y)
    return y


@register
class CycleDiffusion(Method):
    name = "cyclediffusion"
    help = "encode the image under the source text into a stochastic DDIM's noise, decode it under the edit " \
           "text; no mask (baseline)"
    options = (ETA, SOURCE_GUIDANCE)
    defaults = {"steps": 99, "strength": 0.7, "guidance": 3.0, "sampler": "ddim"}  # the official code's
    makes_mask = False
    samplers = ("ddim",)  # its encoder is a stochastic DDIM
    needs_source = True  # the pipeline refuses an empty source
    uses_inpaint = False
    takes_mask = False

    @torch.no_grad()
    def edit(self, pipe, job: Job) -> Edited:
        o = job.o
        lat = cycle_latents(pipe, job.x0, job.emb, pipe.encode_text(o.source), o, job.gen, job.progress,
                            job.callback)
        return Edited(pipe.decode(lat.to(pipe.dtype))[0], None)
