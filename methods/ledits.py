"""LEDITS++ (Brack et al., "LEDITS++: Limitless Image Editing using Text-to-Image Models", CVPR 2024), on
our models and samplers, matched to diffusers' LEditsPPPipelineStableDiffusion.

1. Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024). The source latents z0 are noised
   independently to every timestep of the run, x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps_t (Eq. 1),
   then, from the noisiest down, the sampler's stochastic step from x_t is solved for the noise map z_t
   that lands exactly on x_{t-1}: z_t = (x_{t-1} - mean_t(x_t)) / std_t. Replaying the steps with these
   z_t reconstructs z0; the edit replays them with a changed noise estimate.
2. Semantic guidance with implicit masks. At each step the UNet sees [uncond, concept 1, ..., concept C];
   eps = eps_uncond + sum_c M_c * s_e * (+-1) * (eps_c - eps_uncond), with M_c the implicit mask of
   ``mask/ledits.py`` (M1 attention mask x M2 noise mask). The edit phrase is added (+1); the source
   phrase, when given, is removed (-1): a removal concept.

Where diffusers differs from the authors' code (ml-research/ledits_pp), we follow diffusers (the parity
target): its timesteps are the last ``steps`` of int(steps * (1 + skip)) "leading" ones (the authors
spread ``steps`` from T (1 - skip) - 1 to 1), and it intersects with M2 only at t <= 800 (M1 alone above;
the authors intersect at every step). Not implemented: the inversion guided by a source prompt (diffusers
0.42.1 swaps its two embeddings there, so its guidance points away from the prompt), guidance rescale.

Registered as method "ledits"; options: steps (default 30), guidance (s_e, default 5), threshold (lambda,
default 0.9), seed, source (the removal concept), and its own ledits_* options below. A user mask
multiplies the guidance, as diffusers' user_mask does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mask.ledits import ConceptAttention, attention_mask, noise_mask
from sampler import make_sampler

from .base import Edited, Job, MaskOutput, Method, register, report_step
from .options import EditError, EditOptions, Option

M2_FROM_T = 800  # diffusers intersects with the noise mask M2 only at timesteps t <= 800

SKIP = Option("ledits_skip", float, 0.15, "LEDITS++: share of the schedule skipped at the noisy end "
              "(int(steps * (1 + skip)) timesteps, the last `steps` run)", 0, 1, max_open=True)
MASK = Option("ledits_mask", str, "intersect", "LEDITS++ implicit mask: intersect (attention M1 x noise M2, "
              "the paper's), attention (M1) or noise (M2)", choices=("intersect", "attention", "noise"))
SAMPLER = Option("ledits_sampler", str, "dpmsolver-sde", "LEDITS++ sampler: dpmsolver-sde (SDE-DPM-Solver++ 2M, "
                 "the default) or ddim (eta 1, edit-friendly DDPM)", choices=("dpmsolver-sde", "ddim"))
WARMUP = Option("ledits_warmup", int, 0, "LEDITS++: edit steps without guidance at the start", 0, 10_000)
COOLDOWN = Option("ledits_cooldown", int, 0, "LEDITS++: guidance stops at this edit step (0: never)", 0, 10_000)
REMOVE = Option("ledits_remove_source", bool, True, "LEDITS++: guide away from the source text when one is "
                "given (--ledits-keep-source: the edit text alone)", flag="--ledits-keep-source")


@dataclass
class Concept:
    emb: torch.Tensor      # (77, D) text embedding
    tokens: int            # prompt tokens after the start token whose attention makes M1
    reverse: bool = False  # True: a removal concept (guidance away from it)


@dataclass
class Inversion:
    x_T: torch.Tensor      # (1, C, h, w) the noisiest latents, where the edit starts
    zs: torch.Tensor       # (steps, 1, C, h, w) noise map of each edit step
    start: int             # index of the first edit step in the sampler's timesteps
    total: int             # timesteps in the sampler's schedule


@dataclass
class LeditsResult:
    image: torch.Tensor       # (1, 3, H, W) edited image in [-1, 1]
    mask: torch.Tensor        # (h, w) bool: pixels guided at some step (union of the concepts' masks)
    soft: torch.Tensor        # (h, w) share of the steps in which a pixel was guided
    activation: torch.Tensor  # (steps, concepts, h, w) each step's mask per concept (0 when unguided)
    inversion: Inversion


def make_ledits_sampler(pipe, o: EditOptions):
    """A fresh sampler with the run's timesteps; diffusers' LEDITS++ pipeline forces "leading" spacing,
    steps_offset 1 and no clipping."""
    config = replace(pipe.scheduler_config, timestep_spacing="leading", steps_offset=1, clip_sample=False)
    sampler = make_sampler(o.ledits_sampler, config, **({"eta": 1.0} if o.ledits_sampler == "ddim" else {}))
    sampler.set_timesteps(int(o.steps * (1 + o.ledits_skip)), pipe.device)
    return sampler


@torch.no_grad()
def invert(pipe, z0: torch.Tensor, o: EditOptions, gen: torch.Generator, uncond: torch.Tensor,
           progress: bool = False) -> Inversion:
    """Edit-friendly inversion of z0 (1, C, h, w) under the unconditional embedding uncond (77, D)."""
    sampler = make_ledits_sampler(pipe, o)
    total = len(sampler.timesteps)
    start = total - o.steps
    xs: list[torch.Tensor | None] = [None] * (o.steps + 1)  # xs[k]: before edit step k; xs[steps] = z0
    xs[o.steps] = z0
    for k in reversed(range(o.steps)):  # noises drawn from the cleanest timestep up, as diffusers draws them
        eps = torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype)
        xs[k] = sampler.add_noise_at(z0, eps, start + k)
    zs = torch.zeros(o.steps, *z0.shape, device=z0.device, dtype=z0.dtype)
    for k in pipe.progress(range(o.steps), progress, "ledits++ inversion"):
        i = start + k
        pred = pipe.call_unet(pipe.unet, sampler.scale_model_input(xs[k], i), sampler.timesteps[i], uncond[None])
        mean = sampler.step(pred, i, xs[k], variance_noise=torch.zeros_like(z0))
        std = sampler.noise_std(i)
        if std > 0:  # the last DPM step lands on sigma 0: no noise, z stays 0
            zs[k] = (xs[k + 1] - mean) / std
            xs[k + 1] = mean + std * zs[k]  # as reproduced by the edit: no error accumulates
    return Inversion(xs[0], zs, start, total)


@torch.no_grad()
def guided_denoise(pipe, inv: Inversion, uncond: torch.Tensor, concepts: list[Concept], o: EditOptions,
                   user_mask: torch.Tensor | None = None, progress: bool = False, callback=None):
    """Replay the inversion with semantic guidance; returns the latents and the per-step masks.
    `callback`: callback_on_step_end, after each step with the union of that step's concept masks."""
    sampler = make_ledits_sampler(pipe, o)
    x = inv.x_T
    h, w = x.shape[-2:]
    n = len(concepts)
    emb = torch.cat([uncond[None]] + [c.emb[None] for c in concepts])  # [uncond, concept 1, ..., concept C]
    if h % o.attention_res or w % o.attention_res:
        raise EditError(f"attention_res {o.attention_res} does not divide the {h}x{w} latent")
    factor = h // o.attention_res  # the shared attention_res option: 16 = SD's latent / 4, as diffusers uses
    store = ConceptAttention((h // factor, w // factor), n) if n and o.ledits_mask != "noise" else None
    activation = torch.zeros(inv.zs.shape[0], n, h, w)
    for k in pipe.progress(range(inv.zs.shape[0]), progress, "ledits++ edit"):
        i = inv.start + k
        t = sampler.timesteps[i]
        inp = sampler.scale_model_input(x, i).expand(1 + n, -1, -1, -1)
        preds = pipe.call_unet(pipe.unet, inp, t, emb, recorder=store)
        uncond_pred, guidance = preds[:1], torch.zeros_like(preds[:1])
        try:
            maps = store.take() if store is not None else None
        except RuntimeError as e:  # a UNet without cross-attention at latent / 4
            raise EditError(f"ledits: {e}") from None
        for c, concept in enumerate(concepts):
            if k < o.ledits_warmup or (o.ledits_cooldown and k >= o.ledits_cooldown):
                continue
            direction = (preds[c + 1:c + 2] - uncond_pred) * (-o.guidance if concept.reverse else o.guidance)
            if user_mask is not None:
                direction = direction * user_mask.to(direction.dtype)
            if o.ledits_mask == "noise":
                m = noise_mask(direction[0], o.threshold)
            else:
                m = attention_mask(maps[c], concept.tokens, o.threshold, (h, w))  # M1
                if o.ledits_mask == "intersect" and t <= M2_FROM_T:
                    m = m * noise_mask(direction[0], o.threshold)  # M1 x M2
            activation[k, c] = m.float().cpu()
            guidance = guidance + direction * m
        x = sampler.step(uncond_pred + guidance, i, x, variance_noise=inv.zs[k])
        if callback is not None:  # its mask: this step's guided pixels, any concept (derived only when asked)
            union = activation[k].amax(0).to(x.device) if n else torch.zeros((h, w), device=x.device)
            report_step(callback, "ledits", k, t, x, union > 0, union)
    return x, activation


@register
class Ledits(Method):
    name = "ledits"
    help = "LEDITS++ (Brack et al. 2024): edit-friendly inversion + masked semantic guidance, no inpainting"
    options = (SKIP, MASK, SAMPLER, WARMUP, COOLDOWN, REMOVE)
    defaults = {"steps": 30, "guidance": 5.0, "threshold": 0.9}  # diffusers' invert() and __call__ defaults
    uses_inpaint = False

    @torch.no_grad()
    def run(self, pipe, job: Job) -> LeditsResult:
        o = job.o
        if int(o.steps * (1 + o.ledits_skip)) > pipe.scheduler_config.num_train_timesteps:
            raise EditError(f"steps {o.steps} with ledits_skip {o.ledits_skip} is more than the model's "
                            f"{pipe.scheduler_config.num_train_timesteps} training timesteps")
        texts = [job.text] + ([o.source] if o.source.strip() and o.ledits_remove_source else [])
        uncond = job.emb[0]
        embs = [job.emb[1]] + ([pipe.encode_text(o.source)[1]] if len(texts) == 2 else [])
        concepts = [Concept(e, len(pipe.tokenizer.tokens(txt)), reverse=j == 1)  # the source is removed
                    for j, (e, txt) in enumerate(zip(embs, texts))]
        inv = invert(pipe, pipe.encode_image(job.x0), o, job.gen, uncond, job.progress)
        mask = None if job.mask is None else job.mask.to(pipe.device)
        x, activation = guided_denoise(pipe, inv, uncond, concepts, o, mask, job.progress, job.callback)
        soft = activation.amax(1).mean(0).to(pipe.device)  # union of the concepts, share of the steps
        return LeditsResult(pipe.decode(x), soft > 0, soft, activation, inv)

    def mask(self, pipe, job: Job) -> MaskOutput:
        res = self.run(pipe, job)
        return MaskOutput(res.mask, res.soft)

    def edit(self, pipe, job: Job) -> Edited:
        res = self.run(pipe, job)
        return Edited(res.image[0], MaskOutput(res.mask, res.soft) if job.mask is None else
                      MaskOutput(job.mask, job.mask.float()))
