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
target) and say so:
* timesteps: diffusers runs the last ``steps`` of int(steps * (1 + skip)) "leading" timesteps; the
  authors spread ``steps`` from T (1 - skip) - 1 to 1;
* M2 is intersected with M1 only at t <= 800 (M1 alone above); the authors intersect at every step;
* a guided inversion (``source_guidance`` with ``invert_prompt``): diffusers swaps the two embeddings
  (its guidance points away from the prompt); we use eps_uncond + s (eps_prompt - eps_uncond), as the
  authors do. The parity test runs the unguided inversion, diffusers' default.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from instdiffedit import EditError
from mask.ledits import ConceptAttention, attention_mask, noise_mask
from sampler import make_sampler

MASKS = ("intersect", "attention", "noise")
SAMPLERS = ("dpmsolver-sde", "ddim")
M2_FROM_T = 800  # diffusers intersects with the noise mask M2 only at timesteps t <= 800


@dataclass
class LeditsOptions:
    steps: int = 30            # inversion (and edit) steps actually run (diffusers' num_inversion_steps)
    skip: float = 0.15         # share of the schedule skipped at the noisy end: int(steps * (1 + skip)) in all
    guidance: float = 5.0      # s_e: edit guidance scale of every concept
    threshold: float = 0.9     # lambda: masks keep pixels at or above this quantile (0.9: top 10%)
    mask: str = "intersect"    # implicit mask: "intersect" (M1 x M2), "attention" (M1) or "noise" (M2)
    warmup: int = 0            # edit steps without guidance at the start
    cooldown: int = 0          # guidance stops at this edit step (0: never)
    remove_source: bool = True  # the source phrase, when given, is a removal (negative) concept
    invert_prompt: str = ""    # text that guides the inversion ("" = unconditional, the default)
    source_guidance: float = 3.5  # CFG scale of the inversion when invert_prompt is given
    sampler: str = "dpmsolver-sde"  # "dpmsolver-sde" (SDE-DPM-Solver++ 2M, the default) or "ddim" (eta 1)
    seed: int = 0              # master seed: the inversion's noises are drawn from it on the CPU

    def check(self) -> None:
        if self.steps < 1:
            raise EditError(f"steps {self.steps} must be at least 1")
        if not 0.0 <= self.skip < 1.0:
            raise EditError(f"skip {self.skip} is outside [0, 1)")
        if not 0.0 <= self.threshold <= 1.0:
            raise EditError(f"threshold {self.threshold} is outside [0, 1]")
        if self.mask not in MASKS:
            raise EditError(f"mask '{self.mask}' is not one of {', '.join(MASKS)}")
        if self.sampler not in SAMPLERS:
            raise EditError(f"sampler '{self.sampler}' is not one of {', '.join(SAMPLERS)}")
        if self.warmup < 0 or self.cooldown < 0:
            raise EditError(f"warmup {self.warmup} and cooldown {self.cooldown} must be >= 0")


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


def make_ledits_sampler(pipe, o: LeditsOptions):
    """diffusers' LEDITS++ pipeline forces "leading" spacing, steps_offset 1 and no clipping."""
    config = replace(pipe.scheduler_config, timestep_spacing="leading", steps_offset=1, clip_sample=False)
    return make_sampler(o.sampler, config, **({"eta": 1.0} if o.sampler == "ddim" else {}))


@torch.no_grad()
def invert(pipe, z0: torch.Tensor, o: LeditsOptions, gen: torch.Generator,
           prompt_emb: torch.Tensor | None = None) -> Inversion:
    """Edit-friendly inversion of z0 (1, C, h, w). prompt_emb: (2, 77, D) [uncond, prompt] or (1, 77, D)."""
    sampler = make_ledits_sampler(pipe, o)
    total = int(o.steps * (1 + o.skip))
    sampler.set_timesteps(total, pipe.device)
    start = total - o.steps
    xs: list[torch.Tensor | None] = [None] * (o.steps + 1)  # xs[k]: before edit step k; xs[steps] = z0
    xs[o.steps] = z0
    for k in reversed(range(o.steps)):  # noises drawn from the cleanest timestep up, as diffusers draws them
        eps = torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype)
        xs[k] = sampler.add_noise_at(z0, eps, start + k)
    sampler.set_timesteps(total, pipe.device)  # fresh multistep history
    zs = torch.zeros(o.steps, *z0.shape, device=z0.device, dtype=z0.dtype)
    for k in range(o.steps):
        i, t = start + k, sampler.timesteps[start + k]
        if prompt_emb.shape[0] == 2:
            pred = pipe._unet_cfg(pipe.unet, sampler, xs[k], i, t, prompt_emb, o.source_guidance)
        else:
            pred = pipe.unet(sampler.scale_model_input(xs[k], i), t, prompt_emb)
        mean = sampler.step(pred, i, xs[k], variance_noise=torch.zeros_like(z0))
        std = sampler.noise_std(i)
        if std > 0:  # the last DPM step lands on sigma 0: no noise, z stays 0
            zs[k] = (xs[k + 1] - mean) / std
            xs[k + 1] = mean + std * zs[k]  # as reproduced by the edit: no error accumulates
    return Inversion(xs[0], zs, start, total)


@torch.no_grad()
def guided_denoise(pipe, inv: Inversion, uncond: torch.Tensor, concepts: list[Concept], o: LeditsOptions):
    """Replay the inversion with semantic guidance; returns the latents and the per-step masks."""
    sampler = make_ledits_sampler(pipe, o)
    sampler.set_timesteps(inv.total, pipe.device)
    x = inv.x_T
    h, w = x.shape[-2:]
    n = len(concepts)
    emb = torch.cat([uncond[None]] + [c.emb[None] for c in concepts])  # [uncond, concept 1, ..., concept C]
    store = ConceptAttention((h // 4, w // 4), n) if n and o.mask != "noise" else None
    activation = torch.zeros(inv.zs.shape[0], n, h, w)
    for k in range(inv.zs.shape[0]):
        i = inv.start + k
        t = sampler.timesteps[i]
        preds = pipe.unet(sampler.scale_model_input(x, i).expand(1 + n, -1, -1, -1), t, emb, recorder=store)
        uncond_pred, guidance = preds[:1], torch.zeros_like(preds[:1])
        maps = store.take() if store is not None else None
        for c, concept in enumerate(concepts):
            if k < o.warmup or (o.cooldown and k >= o.cooldown):
                continue
            direction = (preds[c + 1:c + 2] - uncond_pred) * (-o.guidance if concept.reverse else o.guidance)
            if o.mask == "noise":
                m = noise_mask(direction[0], o.threshold)
            else:
                m = attention_mask(maps[c], concept.tokens, o.threshold, (h, w))  # M1
                if o.mask == "intersect" and t <= M2_FROM_T:
                    m = m * noise_mask(direction[0], o.threshold)  # M1 x M2
            activation[k, c] = m.float().cpu()
            guidance = guidance + direction * m
        x = sampler.step(uncond_pred + guidance, i, x, variance_noise=inv.zs[k])
    return x, activation


def ledits(pipe, image, edit: str, source: str = "", o: LeditsOptions | None = None) -> LeditsResult:
    """LEDITS++ edit of `image` (path, PIL, or (1, 3, H, W) tensor in [-1, 1]) toward `edit`.

    The source phrase, when given and ``o.remove_source``, is guided away from (a removal concept)."""
    o = o or LeditsOptions()
    if isinstance(image, torch.Tensor):
        o.check()
        x0 = image.to(pipe.device, pipe.dtype)
    else:
        x0 = pipe._prepare(image, edit, o)[1]
    texts = [""] + [edit] + ([source] if source and o.remove_source else [])
    ids = pipe.tokenizer.encode(texts + ([o.invert_prompt] if o.invert_prompt else [])).to(pipe.device)
    embs = pipe.text_encoder(ids).to(pipe.dtype)
    uncond = embs[0]
    concepts = [Concept(embs[j], len(pipe.tokenizer.tokens(texts[j])), reverse=j == 2) for j in range(1, len(texts))]
    prompt_emb = torch.stack([uncond, embs[-1]]) if o.invert_prompt else uncond[None]
    gen = torch.Generator("cpu").manual_seed(o.seed)  # all noise on the CPU: the same on every device
    inv = invert(pipe, pipe.encode_image(x0), o, gen, prompt_emb)
    x, activation = guided_denoise(pipe, inv, uncond, concepts, o)
    soft = activation.amax(1).mean(0)  # union of the concepts, share of steps
    return LeditsResult(pipe.decode(x), soft > 0, soft, activation, inv)
