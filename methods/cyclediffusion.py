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

  option            official (ours)                     diffusers' default
  steps             99 (custom_steps; timesteps 981..1) 50
  strength          0.7 (skip_steps 30 of 99)           0.8
  guidance          3 (the official tries 1, 3, 5)      7.5
  source_guidance   1 (encoder scale)                   1
  eta               0.1                                 0.1

The official code decodes every decoder scale (1, 3, 5) x skip (30, 40) and keeps the candidate with
the best directional CLIP score. Ranking needs CLIP's image tower, which this project does not have;
we run one candidate, the middle scale at the first skip. With guidance or source_guidance 1 a branch
is evaluated on its conditional text alone, as the official code does (3 UNet image-evaluations per
step at the defaults); diffusers evaluates [uncond, cond] for both texts whenever guidance > 1 (4 per
step) and ignores source_guidance when guidance <= 1. Values agree (tests/test_cyclediffusion.py
matches the pipeline to 1e-4 at equal settings). diffusers' noise recovery assumes an epsilon-
predicting UNet; ours follows the model's prediction type (the toy model predicts v).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sampler import DDIMSampler, cfg

from instdiffedit import EditError, _progress


@dataclass
class CycleDiffusionOptions:
    steps: int = 99              # DDIM steps of the schedule (official custom_steps 99: timesteps 981 .. 1)
    strength: float = 0.7        # start at timesteps[steps - int(steps r)]; official skip_steps 30 of 99 -> 0.7
    guidance: float = 3.0        # CFG scale of the edit text in the decoder (official candidates 1, 3, 5)
    source_guidance: float = 1.0  # CFG scale of the source text in the encoder (official 1: conditional only)
    eta: float = 0.1             # DDIM eta > 0 of encoder and decoder (official and diffusers: 0.1)
    seed: int = 0                # master seed: VAE sample, start noise, one posterior noise per step

    def check(self) -> None:
        if self.steps < 1:
            raise EditError(f"steps {self.steps} must be at least 1")
        if not 0.0 < self.strength <= 1.0:
            raise EditError(f"strength {self.strength} is outside (0, 1]")
        if int(self.steps * self.strength) < 1:
            raise EditError(f"strength {self.strength} x steps {self.steps} leaves no step to run")
        if self.guidance < 0:
            raise EditError(f"guidance {self.guidance} must be >= 0")
        if self.source_guidance < 0:
            raise EditError(f"source_guidance {self.source_guidance} must be >= 0")
        if not 0.0 < self.eta <= 1.0:
            raise EditError(f"eta {self.eta} is outside (0, 1]: CycleDiffusion's code lives in a stochastic DDIM")


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
def cycle_latents(pipe, x0: torch.Tensor, edit_emb: torch.Tensor, source_emb: torch.Tensor,
                  o: CycleDiffusionOptions, gen: torch.Generator, unet=None, progress: bool = False) -> torch.Tensor:
    """The edited latents (B, 4, h, w) of images x0 (B, 3, H, W) in [-1, 1].

    `edit_emb`, `source_emb`: `pipe.encode_text` embeddings, (2, 77, D) [uncond, cond]. Noise is drawn
    from `gen` (CPU) in diffusers' order: the VAE posterior sample, the start noise, then one posterior
    noise per step but the last. `unet(x, t, ctx)` defaults to `pipe.unet`."""
    unet = unet or pipe.unet
    s = DDIMSampler(pipe.scheduler_config)
    s.set_timesteps(o.steps, pipe.device)
    start = s.start_index(o.strength)
    # the latents stay float32: z is recovered by dividing by s_t (~1e-3), so keep the source path exact
    z0 = pipe.vae.encode(x0).sample(gen).float() * pipe.scale  # a posterior sample, as official and diffusers
    shape = z0.shape
    x = s.add_noise_at(z0, torch.randn(shape, generator=gen).to(z0.device), start)  # Eq. 1, the source path
    y = x  # the edit path starts from the same x_T
    last = len(s.timesteps) - 1
    for i in _progress(range(start, len(s.timesteps)), progress, "cyclediffusion"):
        t = s.timesteps[i]
        (xa, ca), (ya, yc) = _branch(x, source_emb, o.source_guidance), _branch(y, edit_emb, o.guidance)
        out = unet(torch.cat([xa, ya]).to(pipe.dtype), t, torch.cat([ca, yc])).float()
        eps_source = _guide(out[:len(xa)], o.source_guidance)
        eps_edit = _guide(out[len(xa):], o.guidance)
        n = None if i == last else torch.randn(shape, generator=gen).to(z0.device)
        x_prev = s.posterior_sample(x, z0, i, o.eta, n)            # encode: x_prev ~ q(x_prev | x_t, z0)
        z = s.noise_of_step(eps_source, i, x, x_prev, o.eta)     # ... and the step's latent code z_t
        y = s.step(eps_edit, i, y, eta=o.eta, variance_noise=z)  # decode the same code under the edit text
        x = x_prev
    return y


def cyclediffusion(pipe, x0: torch.Tensor, edit: str, source: str | None, o: CycleDiffusionOptions | None = None,
                   gen: torch.Generator | None = None, unet=None, progress: bool = False) -> torch.Tensor:
    """Edit images x0 (B, 3, H, W) in [-1, 1] from `source` (the text that describes them) toward
    `edit`; returns the decoded images (B, 3, H, W)."""
    o = o or CycleDiffusionOptions()
    o.check()
    if not edit or not edit.strip():
        raise EditError("the edit text is empty")
    if source is None or not source.strip():
        raise EditError("cyclediffusion needs a source text (--source): the text that describes the input "
                        "image, under which it is encoded")
    gen = gen if gen is not None else torch.Generator("cpu").manual_seed(o.seed)
    lat = cycle_latents(pipe, x0, pipe.encode_text(edit), pipe.encode_text(source), o, gen, unet, progress)
    return pipe.decode(lat.to(pipe.dtype))

