"""Plug-and-Play (Tumanyan et al. 2022, arXiv 2211.12572), a Table 1 baseline, at the defaults of the
official code (github:MichalGeyer/pnp-diffusers: ``preprocess.py``, ``pnp.py``, ``pnp_utils.py``,
``config_pnp.yaml``), which the InstDiffEdit authors ran "with default parameters" (paper appendix).

1. The source image is DDIM-inverted at guidance 1 with an empty prompt (``preprocess.py``:
   ``--inversion_prompt ''``) over 999 steps (``--steps 999``: every timestep 1..999), and the
   inverted latent of every level is kept.
2. Denoising runs ``steps`` (50) DDIM steps from the inverted latent at ``timesteps[0]``. Each UNet
   call is one batch ``[source, uncond edit, cond edit]``: the source row is the *inverted latent of
   that step's level* (not a denoised trajectory) with the empty prompt; the two edit rows are the
   current latent with the unconditional and the edit text, combined by CFG 7.5.
3. ``PnPControl`` copies the source row into both edit rows at
   * the residual features (conv2 output, before the skip) of SD's ``up_blocks[1].resnets[1]``
     (the paper's decoder layer 4) for the first ``pnp_feature`` 0.8 of the steps, and
   * the self-attention of SD's ``up_blocks[1].attentions[1:]``, ``up_blocks[2]`` and ``up_blocks[3]``
     (decoder layers 4-11) for the first ``pnp_attn`` 0.5 of the steps. The official code copies the
     source's queries and keys; the attention probabilities softmax(q k^T / sqrt(d)) are a function of
     q and k alone, so copying the probabilities (what we do) is the same operation.

Layers on other UNets are found by their place in the decoder, not by resolution: up-block index
counted from the bottom (diffusers' ``up_blocks[0]`` is the lowest resolution in every layout) and
resnet / attention index inside the block. SD's ``(block 1, resnet 1)`` stays ``(1, 1)``; the
self-attention set is every decoder transformer from ``(block 1, attention 1)`` on. On the toy model
(three levels, two resnets per up block, no attention in the top up block) that is
``up_blocks.1.resnets.1`` and ``up_blocks.1.attentions.1``. A UNet without them gets a one-line error.

Where we differ from the official code: the unconditional text is empty (the example config has the
negative prompt "ugly, blurry, black, low res, unrealistic"; ``--pnp-negative`` sets one); the
model's own DDIM scheduler configuration, including v-prediction (the official inversion assumes
epsilon prediction); ``--pnp-inversion-text source`` inverts with the source text, which the
official README recommends but does not default to.
"""
from __future__ import annotations

import torch

from model.attention import UNetControl
from sampler import DDIMSampler, make_sampler
from sampler.guidance import cfg
from sampler.inversion import ddim_invert

from .base import Edited, Job, Method, register, report_step
from .options import EditError, EditOptions, Option

# SD's layers, as (up-block index from the bottom, index inside the block); see the docstring.
FEATURE_LAYER = (1, 1)      # pnp_utils.register_conv_control_efficient: up_blocks[1].resnets[1]
ATTN_FIRST_LAYER = (1, 1)   # register_attention_control_efficient: {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}


def injection_layers(unet) -> tuple[str, list[str]]:
    """(name of the feature layer, names of the self-attention layers) PnP injects on this UNet."""
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile wrapper
    b, r = FEATURE_LAYER
    ups = unet.up_blocks
    if len(ups) <= b or len(ups[b].resnets) <= r:
        raise EditError(f"pnp injects features at up_blocks.{b}.resnets.{r} (SD's decoder layer 4); this UNet has "
                        f"{len(ups)} up blocks with {[len(u.resnets) for u in ups]} resnets")
    attn = [f"up_blocks.{i}.attentions.{a}.transformer_blocks.{k}.attn1"
            for i, up in enumerate(ups) for a, tr in enumerate(up.attentions or [])
            for k in range(len(tr.transformer_blocks)) if (i, a) >= ATTN_FIRST_LAYER]
    if not attn:
        raise EditError(f"pnp injects self-attention from up_blocks.{ATTN_FIRST_LAYER[0]}.attentions."
                        f"{ATTN_FIRST_LAYER[1]} on; this UNet has no decoder attention there")
    return f"up_blocks.{b}.resnets.{r}", attn


class PnPControl(UNetControl):
    """Copies the source row of the batch ``[source, uncond edit, cond edit]`` into both edit rows, at
    the feature layer while ``step < feature_steps`` and the self-attention layers while
    ``step < attn_steps``. Set ``step`` before each UNet call."""

    def __init__(self, feature_layer: str, attn_layers: list[str], feature_steps: int, attn_steps: int):
        self.feature_layer, self.attn_layers = feature_layer, frozenset(attn_layers)
        self.feature_steps, self.attn_steps = feature_steps, attn_steps
        self.step = 0

    def wants(self, name, hw):
        return (name == self.feature_layer and self.step < self.feature_steps) or \
            (name in self.attn_layers and self.step < self.attn_steps)

    def attention(self, name, probs):
        return self.inject(name, probs)

    def features(self, name, h):
        return self.inject(name, h)

    @staticmethod
    def inject(name: str, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 3:
            raise ValueError(f"layer {name!r}: batch {x.shape[0]}, PnP runs [source, uncond edit, cond edit]")
        return x[:1].expand_as(x)  # both edit rows (uncond and cond) get the source's, as the official code


# ---------------------------------------------------------------- the method

FEATURE = Option("pnp_feature", float, 0.8, "PnP: fraction of steps with the source's decoder features injected "
                 "(tau_f)", 0, 1)
ATTN = Option("pnp_attn", float, 0.5, "PnP: fraction of steps with the source's decoder self-attention injected "
              "(tau_A)", 0, 1)
INV_STEPS = Option("pnp_inversion_steps", int, 999, "PnP: DDIM inversion steps (official: 999, every timestep; "
                   "must pass through the denoising timesteps)", 1, 10_000)
INV_TEXT = Option("pnp_inversion_text", str, "empty", "PnP: invert with the empty prompt (official default) or "
                  "the source text", choices=("empty", "source"))
NEGATIVE = Option("pnp_negative", str, "", "PnP: unconditional (negative) text of the edit's CFG "
                  "(official example config: 'ugly, blurry, black, low res, unrealistic')")


@register
class PlugAndPlay(Method):
    name = "pnp"
    help = "Plug-and-Play after DDIM inversion: the edit reuses the source's decoder features and self-attention (baseline)"
    options = (FEATURE, ATTN, INV_STEPS, INV_TEXT, NEGATIVE)
    defaults = {"sampler": "ddim"}
    makes_mask = False
    samplers = ("ddim",)  # it inverts with DDIM
    uses_inpaint = False
    takes_mask = False

    def check(self, o: EditOptions) -> None:
        if o.pnp_inversion_text == "source" and not o.source.strip():
            raise EditError("pnp --pnp-inversion-text source needs the text of what the image shows (--source)")

    @torch.no_grad()
    def edit(self, pipe, job: Job) -> Edited:
        x, _ = run_pnp(pipe, job)
        return Edited(pipe.decode(x)[0], None)


def source_latents(pipe, job: Job, sampler: DDIMSampler) -> list[torch.Tensor]:
    """The inverted latent at the level of each denoising timestep (index i: what step i starts from)."""
    o = job.o
    inv_sampler = make_sampler("ddim", pipe.scheduler_config)
    try:
        inv_sampler.set_timesteps(o.pnp_inversion_steps, pipe.device)
    except ValueError as e:  # more steps than the schedule has timesteps
        raise EditError(f"pnp_inversion_steps {o.pnp_inversion_steps}: {e}") from None
    where = {int(t): k for k, t in enumerate(inv_sampler.timesteps.tolist())}
    missing = [int(t) for t in sampler.timesteps.tolist() if int(t) not in where]
    if missing:
        raise EditError(f"pnp_inversion_steps {o.pnp_inversion_steps} does not pass through timestep {missing[0]} of "
                        f"the {o.steps} denoising steps (use 999, or steps {o.steps} itself)")
    emb = pipe.encode_text(o.source)[1:] if o.pnp_inversion_text == "source" else job.emb[:1]  # "" encoded
    counted = lambda x, t, ctx, control=None: pipe.call_unet(pipe.unet, x, t, ctx, recorder=control)
    inv = ddim_invert(counted, inv_sampler, pipe.encode_image(job.x0), emb)  # guidance 1, as preprocess.py
    return [inv.at(where[int(t)]) for t in sampler.timesteps.tolist()]


def run_pnp(pipe, job: Job, control: PnPControl | None = None,
            source: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, PnPControl]:
    """Invert job.x0, then denoise the edit under the PnP control. ``source`` (one latent per step)
    replaces the inverted latents as the source branch's input. Returns the edit's final latent
    (1, C, h, w) and the control."""
    o = job.o
    sampler: DDIMSampler = pipe.sampler(o)
    if control is None:
        feature_layer, attn_layers = injection_layers(pipe.unet)
        control = PnPControl(feature_layer, attn_layers, int(o.pnp_feature * o.steps), int(o.pnp_attn * o.steps))
    source = source if source is not None else source_latents(pipe, job, sampler)
    uncond = pipe.encode_text(o.pnp_negative)[1:] if o.pnp_negative else job.emb[:1]
    ctx = torch.cat([job.emb[:1], uncond, job.emb[1:]])  # [source: "", uncond edit, cond edit]
    x = source[0]
    for i in pipe.progress(range(len(sampler.timesteps)), job.progress, "pnp"):
        control.step = i
        inp = torch.cat([source[i], x, x])
        _, u, c = pipe.call_unet(pipe.unet, inp, sampler.timesteps[i], ctx, recorder=control).chunk(3)
        x = sampler.step(cfg(u, c, o.guidance), i, x)
        report_step(job.callback, "pnp", i, sampler.timesteps[i], x)
    return x, control
