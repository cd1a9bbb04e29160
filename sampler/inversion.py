"""Deterministic DDIM inversion (Song et al. 2020; as used by Prompt-to-Prompt, Plug-and-Play and
DiffEdit): run the DDIM update backwards, clean latent -> noise, so that denoising the result with
the same text retraces (approximately) the same trajectory.

    s = DDIMSampler(config); s.set_timesteps(50, device)
    inv = ddim_invert(unet, s, z0, cond)                   # guidance 1: one UNet image per step
    inv = ddim_invert(unet, s, z0, cond, uncond, guidance=7.5)   # optional classifier-free guidance
    x_T = inv.noise                                        # the latent at timesteps[0]
    inv.at(i)                                              # the latent at the level of timesteps[i]

Each step evaluates the UNet at the *higher* timestep on the *lower*-level latent
(``DDIMSampler.inverse_step``): the approximation every DDIM-inversion implementation makes, which is
why the reconstruction is close but not exact (``tests/test_inversion.py`` states how close).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ddim import DDIMSampler
from .guidance import cfg


@dataclass
class Inversion:
    latents: list[torch.Tensor]  # [z0, z at timesteps[N-1], ..., z at timesteps[0]]: clean -> noisy
    unet_evals: int  # UNet image-evaluations spent (the batch sizes summed over calls)

    @property
    def noise(self) -> torch.Tensor:
        """The inverted latent x_T, at the level of ``timesteps[0]``: where denoising starts."""
        return self.latents[-1]

    def at(self, i: int) -> torch.Tensor:
        """The inverted latent at the level of ``timesteps[i]`` (what denoising step i starts from)."""
        return self.latents[len(self.latents) - 1 - i]


@torch.no_grad()
def ddim_invert(unet, sampler: DDIMSampler, z0: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance: float = 1.0, control=None) -> Inversion:
    """Invert clean latents ``z0`` (B, 4, h, w) with text embeddings ``cond`` (B or 1, tokens, dim).

    ``guidance`` 1 (the default; what PtP's null-text and PnP's preprocessing use) calls the UNet on
    the text alone; otherwise ``uncond`` is required and each step runs the CFG batch
    ``[uncond, cond]``. ``control`` is handed to every UNet call (see ``model/attention.py``).
    """
    if not isinstance(sampler, DDIMSampler):
        raise TypeError(f"DDIM inversion needs a DDIMSampler, got {type(sampler).__name__}")
    n = len(sampler)
    guided = float(guidance) != 1.0
    if guided and uncond is None:
        raise ValueError(f"guidance={guidance} needs the unconditional embedding (uncond=)")
    b = z0.shape[0]
    cond = cond.expand(b, -1, -1)
    ctx = torch.cat([uncond.expand(b, -1, -1), cond]) if guided else cond
    x, latents, evals = z0, [z0], 0
    for i in reversed(range(n)):  # timesteps are stored high -> low; inversion climbs
        t = sampler.timesteps[i]
        if guided:
            eps = cfg(*unet(torch.cat([x, x]), t, ctx, control=control).chunk(2), guidance)
        else:
            eps = unet(x, t, ctx, control=control)
        evals += ctx.shape[0]
        x = sampler.inverse_step(eps, i, x)
        latents.append(x)
    return Inversion(latents, evals)
