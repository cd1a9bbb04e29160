"""Train the toy Stable Diffusion (and its inpainting UNet) from scratch on toy.world scenes.

    python -m toy.train --out assets --seed 0            # writes assets/toy-sd, assets/toy-sd-inpaint

Same architecture as SD v1.x, smaller configs, trained on one thread of a shared 2-core CPU in
about 75 minutes (VAE ~10, rendering + encoding ~4, UNet ~32, inpainting data + training ~29 at the
defaults):

* VAE (our AutoencoderKL): 128x128 RGB -> 4x32x32 latents (3 blocks, downsampling factor 4).
  L1 + L2 reconstruction + 1e-6 KL on random 64x64 crops, then a few steps on whole images (so the
  mid-block self-attention sees the 32x32 token grid it meets at inference). Frozen afterwards;
  ``scaling_factor`` = 1 / std of the training latents, stored in vae/config.json.
* Text encoder (our CLIPTextModel) with the real CLIP BPE vocabulary (49408 tokens, rebuilt from
  the open-clip-torch wheel's bpe_simple_vocab_16e6.txt.gz), trained jointly with
* the base UNet (our UNet2DConditionModel): latent 32x32, levels 32/16/8, cross-attention at 16x16 and
  8x8 only, so the recorded 16x16 maps are the absolute 16x16 maps InstDiffEdit uses on SD v1.4.
  Optionally (phase 2b, --grow-steps N) it is then grown into UNET_CONFIG's layout, cross-attention at
  every level and in the mid block as SD has it relative to its latent, and trained N more steps with
  the text encoder frozen (see grow_unet and assets/TRAINING.md).
  SD's noise schedule (scaled_linear 0.00085..0.012, 1000 steps) with v-prediction: at this budget
  epsilon-prediction learned to ignore the text (the noise is predictable from the noisy latent at
  low noise, where most of the epsilon loss is), v-prediction did not.
  Captions: the full caption, one object's phrase ("a red circle"), the background phrase
  ("an orange background") or empty (10%, for classifier-free guidance).
  Grounding losses: trained with the diffusion loss alone for ~1600 steps (25 minutes), the model
  used the text (colours were right) but its 16x16 word maps did not localise at all (IoU 0.09-0.15 against
  the object masks, a centred disc scores 0.10): most attention went to the 62 padding tokens and
  the word maps were flat. So, as TokenCompose (Wang et al., CVPR 2024) does for SD with
  segmentation masks, its two grounding losses are added for t < 800 (see grounding_losses): the
  token loss (--token-loss, default 0.2) alone was gamed (the words' maps collapsed to near-zero
  mass with a few spikes: IoU 0.06 in the check below), so the pixel loss (--pixel-loss, default
  0.2), a per-cell BCE on the raw probabilities, comes with it. These shape where the words'
  attention goes; InstDiffEdit still reads the raw cross-attention probabilities at inference.
  Edit phrases (--edit-phrases, default 0.2 of the samples): an edit text reads like a caption with
  one attribute wrong ("a blue circle" for a red circle), a text no training caption ever was, and
  with captions alone the shape word's map lost its object on such texts (map IoU often 0). So a
  share of samples get such a text (built like the benchmark's, from training scenes) with both of
  its words grounded on the object (or the background) it points at. These samples train only the
  grounding losses: the diffusion loss would teach the model to ignore colour words. With
  --confusable-colours, a share of their colour edits get a new colour that looks like another object's
  (a hard negative), so the colour word's map must follow the shape word to the right object.
  Caveat: the toy benchmark then measures how InstDiffEdit turns well-grounded maps into masks,
  not whether grounding emerges unsupervised as it does in SD v1.4.
* Inpainting UNet: the same config with 9 input channels, cat([noisy latent, mask, masked-image
  latent]) as SD's, initialised from the trained UNet (extra input channels zero), with the
  frozen VAE and text encoder. Masks: an object's mask (dilated, or its box) with that object's
  phrase (40%), the background mask (grown into the objects with --inpaint-bg-dilate) with the
  background phrase (25%), random boxes / ellipses (25%) and the whole image (10%) with the full
  caption, 10% empty captions. Masks live on the latent grid (4x4 pixel blocks), as the pipeline's
  masks do.

UNet and text encoder weights are EMA averages (decay 0.999 with warm-up). Everything is seeded
from --seed; with the default step counts a run is deterministic on a given machine / thread
count. ``--minutes-budget M`` instead sizes the UNet and inpainting step counts to fit M minutes
from speeds measured during the run (the counts used are written to training_log.json; pass them
back with --unet-steps / --inpaint-steps to reproduce the run).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.clip import CLIPTextConfig, CLIPTextModel
from model.tokenizer import Tokenizer, write_clip_vocab
from model.unet import UNet2DConditionModel, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from sampler.schedule import NoiseSchedule, SchedulerConfig, add_noise, get_velocity
from toy import world

SIZE = 128  # image side
VAE_CONFIG = dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
# The base UNet (phase 2, trained jointly with the text encoder; the inpainting UNet starts from it):
# cross-attention at 16x16 and 8x8 only, which is cheap on a CPU.
BASE_UNET_CONFIG = dict(sample_size=SIZE // 4, in_channels=4, out_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4,
                        cross_attention_dim=TEXT_CONFIG["hidden_size"], norm_num_groups=16)
# The shipped UNet (phase 2b, grown from the base): cross-attention at every level (32x32, 16x16, 8x8)
# and in the mid block, as SD v1.x has it relative to its latent (64/32/16 of a 64x64 latent, mid at
# 8), so word maps exist at latent/1, /2 and /4. One head of width 32 at 32x32: four heads of width 8
# made the 1024-token self-attention ~1.7x slower on the CPU (the maps are head means either way).
UNET_CONFIG = {**BASE_UNET_CONFIG, "down_block_types": ("CrossAttnDownBlock2D",) * 3,
               "up_block_types": ("CrossAttnUpBlock2D",) * 3, "attention_head_dim": (1, 4, 4)}
SCHEDULER = SchedulerConfig(prediction_type="v_prediction")  # otherwise SD v1.4's schedule


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data

def _render(seeds, object_sizes=world.TRAIN_OBJECT_SIZES):
    out = []
    for s in seeds:
        scene = world.scene_from_seed(int(s), object_sizes=object_sizes)
        img, masks, _ = world.render(scene, SIZE)  # ss=4, as the benchmark renders
        lab = np.zeros((SIZE, SIZE), np.int8)
        for i, m in enumerate(masks):
            lab[m] = i + 1
        out.append((scene, img, lab))
    return out


def render_scenes(n: int, seed: int, object_sizes=world.TRAIN_OBJECT_SIZES):
    """n training scenes: (scenes, images uint8 (n,H,W,3), labels int8 (n,H,W): 0 bg, i+1 object i)."""
    seeds = np.random.default_rng([seed, 1]).integers(0, world.TRAIN_SEED_LIMIT, n)
    chunks = np.array_split(seeds, 32)
    if n <= 256:  # a pool's start-up costs more than it saves
        parts = [r for chunk in chunks for r in _render(chunk, object_sizes)]
    else:  # spawn, not fork: a forked child of a process whose torch threads run can deadlock on their locks
        with get_context("spawn").Pool(2) as pool:
            parts = [r for chunk in pool.starmap(_render, [(c, object_sizes) for c in chunks]) for r in chunk]
    scenes = [p[0] for p in parts]
    return scenes, np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def object_phrase(o) -> str:
    return world._a(f"{o.colour} {o.shape}")


def background_phrase(scene) -> str:
    return world._a(f"{scene.background} background")


def training_caption(scene, rng) -> str:
    """Full caption 55%, one object's phrase 25%, background phrase 10%, empty 10%."""
    r = rng.random()
    if r < 0.10:
        return ""
    if r < 0.65:
        return world.caption(scene)
    if r < 0.90:
        return object_phrase(scene.objects[rng.integers(len(scene.objects))])
    return background_phrase(scene)


def edit_phrase(scene, rng, confusable: float = 0.0) -> tuple[str, int, str | None]:
    """An edit text for this scene, the region it points at (0 = background, i + 1 = object i) and, for
    an object edit, the word that still names the object (its shape after a colour edit, its colour
    after a shape edit; None for a background edit).

    Made with the benchmark's own edit rules (toy.world.new_colour / edit_object; training scenes, not
    benchmark seeds). The text does not describe the image, so these samples train only the grounding
    losses (see train_unet), never the diffusion loss. confusable: the share of colour edits, in scenes
    with another object, whose new colour is instead a hard negative (confusable_colour); 0 draws exactly
    the random numbers that the runs before the option drew."""
    k = int(rng.integers(len(scene.objects) + 1))
    if k == len(scene.objects):
        return background_phrase(replace(scene, background=world.new_colour(scene, rng))), 0, None
    new, attr = world.edit_object(scene, k, rng)
    if attr == "colour" and confusable > 0 and len(scene.objects) > 1 and rng.random() < confusable:
        new = replace(new, colour=confusable_colour(scene, k))
    return object_phrase(new), k + 1, new.shape if attr == "colour" else new.colour


def confusable_colour(scene, k: int) -> str:
    """The colour, absent from the scene, nearest (in RGB) to the colour of an object other than k.
    Why: on the benchmark a colour edit's mask misses when the new colour word's map goes to the object
    whose colour looks most like it (assets/TRAINING.md); with this colour the look points at the wrong
    object, and only the shape word tells the UNet which one is meant."""
    others = [world.COLOURS[o.colour] for i, o in enumerate(scene.objects) if i != k]
    return min(world.absent_colours(scene), key=lambda c: min(math.dist(world.COLOURS[c], rgb) for rgb in others))


EDIT_GROUNDINGS = ("both", "kept")


def edit_targets(words, region: int, kept: str | None, grounding: str = "both") -> list[tuple[list[int], int]]:
    """Grounding targets of an edit phrase (see word_targets): its colour and shape words -> the region it
    points at ("both"), or, with "kept", an object edit's kept word alone. The changed word of an object
    edit names nothing in the image, and CLIP's causal text encoder gives it the same embedding whichever
    object (or the background) the rest of the phrase points at ("a brown" in "a brown triangle" and "a
    brown background"), so grounding it teaches a map the word cannot determine. Yet the benchmark got
    worse with "kept": Eq. 6-8 mostly pick the changed colour word's map, which only "both" puts on the
    object (assets/TRAINING.md), so the shipped recipe keeps "both"."""
    if grounding == "kept" and kept is not None:
        return [(pos, region) for w, pos in words if w == kept]
    return [(pos, region) for w, pos in words if w not in ("a", "an")]


class TokenCache:
    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.cache, self.word_cache = tokenizer, {}, {}

    def words(self, caption: str):
        if caption not in self.word_cache:
            self.word_cache[caption] = self.tok.words(caption)
        return self.word_cache[caption]

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok.encode(c)[0]
        return torch.stack([self.cache[c] for c in captions])


# ---------------------------------------------------------------- training helpers

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class EMA:
    def __init__(self, modules, decay=0.999):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def ldm_init(unet: UNet2DConditionModel) -> None:
    """LDM's zero-initialised residual branches (resnet conv2, transformer proj_out, conv_out)."""
    for name, m in unet.named_modules():
        if name.endswith("conv2") or name.endswith("proj_out") or name == "conv_out":
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)


def grow_unet(unet: UNet2DConditionModel, base: UNet2DConditionModel) -> None:
    """Copy a trained base UNet into a UNet with more cross-attention levels. Every base weight has
    the same name and shape in the grown UNet; the added transformers keep ldm_init's zero proj_out,
    so the grown UNet starts as exactly the base UNet's function and only learns to use them."""
    own, theirs = unet.state_dict(), base.state_dict()
    added = set(own) - set(theirs)
    if set(theirs) - set(own) or any(own[k].shape != v.shape for k, v in theirs.items()):
        raise ValueError("the base UNet is not a sub-network of the grown UNet")
    if any(".attentions." not in k for k in added):
        raise ValueError("growing may only add transformer blocks")
    unet.load_state_dict({**own, **theirs}, strict=True)


def clip_init(te: CLIPTextModel) -> None:
    """CLIP / transformers initialisation of the embeddings (std 0.02 tokens, 0.01 positions)."""
    torch.nn.init.normal_(te.embeddings.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(te.embeddings.position_embedding.weight, std=0.01)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------- phase 1: VAE

def train_vae(images: np.ndarray, steps: int, full_steps: int, seed: int, log_every=50):
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    vae = AutoencoderKL(VAEConfig(**VAE_CONFIG, scaling_factor=1.0))
    with torch.no_grad():  # start with a near-deterministic posterior (std ~0.007), where training ends up anyway
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = -10.0
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    total, hist, t = steps + full_steps, [], Timer()
    for step in range(total):
        full = step >= steps
        bs, crop = (8, SIZE) if full else (16, 64)
        idx = rng.integers(len(images), size=bs)
        y0, x0 = rng.integers(0, SIZE - crop + 1, 2)
        x = to_tensor(images[idx, y0:y0 + crop, x0:x0 + crop])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, 1e-3, 50)
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum((1, 2, 3)).mean()
        loss = l1 + mse + 1e-6 * kl / x[0].numel()  # SD's 1e-6 weight on per-sample sums
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(l1.item())
        if step % log_every == 0 or step == total - 1:
            log(f"vae {step}/{total} l1 {np.mean(hist[-log_every:]):.4f} kl {kl.item():.1f} ({t():.0f}s)")
    vae.eval().requires_grad_(False)
    return vae, {"steps": total, "crop_steps": steps, "full_steps": full_steps, "batch_crop": 16,
                 "batch_full": 8, "final_l1": float(np.mean(hist[-50:])), "seconds": round(t(), 1)}


@torch.no_grad()
def encode_all(vae, images: np.ndarray, bs=64) -> torch.Tensor:
    """Posterior means (unscaled) of uint8 images, in batches."""
    return torch.cat([vae.encode(to_tensor(images[i:i + bs])).mean for i in range(0, len(images), bs)])


# ---------------------------------------------------------------- phase 2: UNet + text encoder

def diffusion_loss(unet, z0, ctx, acp, gen, extra=None, recorder=None, weight=None, cell_weight=None):
    """v-prediction MSE at uniform timesteps; also returns the timesteps. weight: (B,) per-sample weights;
    cell_weight: (B, 1, h, w) per-latent-cell weights, the loss a weighted mean over cells."""
    t = torch.randint(0, len(acp), (z0.shape[0],), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    x = add_noise(z0, noise, t, acp)
    if extra is not None:
        x = torch.cat([x, extra], dim=1)
    pred, target = unet(x, t, ctx, recorder=recorder), get_velocity(z0, noise, t, acp)
    if cell_weight is not None:
        return ((pred - target).pow(2) * cell_weight).mean() / cell_weight.mean(), t
    if weight is None:
        return F.mse_loss(pred, target), t
    per_sample = (pred - target).pow(2).mean((1, 2, 3))
    return (per_sample * weight).sum() / weight.sum().clamp_min(1), t


# Phase 2b's default step count: the grown UNet shipped in assets/ took 344 steps (2026-11-29); on the
# toy benchmark's 240 cases it gives the base UNet's masks (IoU -0.1 [-1.5, +1.3] points) and a higher
# C_m / C_non (+0.16 [+0.06, +0.27]) (assets/TRAINING.md). 0: no growing, ship the base UNet.
GROW_STEPS = 344
ALL_GRIDS = (32, 16, 8)  # every grid of the 32x32 latent that has cross-attention in UNET_CONFIG


def is_grown(unet) -> bool:
    """Whether a UNet has UNET_CONFIG's layout (cross-attention at every level), not the base one."""
    return tuple(unet.config.down_block_types) == tuple(UNET_CONFIG["down_block_types"])


class MapRecorder:
    """Keeps every layer's cross-attention probabilities at the given grids, {grid: [(B, heads, grid^2, 77)]};
    in training they stay inside the autograd graph (for the grounding losses)."""

    def __init__(self, grids=ALL_GRIDS):
        self.probs = {g: [] for g in grids}

    def wants(self, name, hw):
        return hw[0] == hw[1] and hw[0] in self.probs

    def record(self, name, probs):
        self.probs[int(math.isqrt(probs.shape[2]))].append(probs)


def word_targets(scene, words) -> list[tuple[list[int], int]]:
    """(token positions, region) for every word of a caption that names a region of the scene:
    an object's colour or shape word -> object i (region i + 1); the background colour and the
    word "background" -> region 0. Articles and conjunctions are left alone."""
    names = {}
    for i, o in enumerate(scene.objects):
        names[o.colour] = names[o.shape] = i + 1
    names[scene.background] = names["background"] = 0
    return [(pos, names[w]) for w, pos in words if w in names]


def grounding_losses(probs: list[torch.Tensor], cov: torch.Tensor, targets, keep: torch.Tensor,
                     per_word: bool = False):
    """TokenCompose's two grounding losses (Wang et al., CVPR 2024) on the maps of one grid (g x g).

    probs: per layer (B, heads, g*g, 77); cov: (B, regions, g*g) fraction of each cell covered
    by each region; targets[b]: word_targets of sample b; keep: (B,) bool, samples to supervise.
    Maps are the mean over heads and layers.
    * token loss: for each named word, the share of its attention (normalised over the cells) that
      falls outside its region;
    * pixel loss: binary cross-entropy between the attention probability a cell gives to the words
      naming a region (summed over those words) and the cell's coverage by that region. Without it
      the token loss alone is gamed: the words' maps shrink to near-zero mass with a few spikes.
      per_word: one BCE per word, on that word's own probability (summed over its BPE tokens), as
      TokenCompose has it for its one noun per object. With two words per object, the sum lets one
      word take all of the object's attention (the colour word did, and the shape word's 16x16 map
      stopped localising); per word, both are pushed up and both localise, but the benchmark got
      worse (assets/TRAINING.md), so the shipped recipe keeps the sum.
    """
    a = torch.stack(probs).mean((0, 2))  # (B, 256, 77)
    an = a / a.sum(1, keepdim=True).clamp_min(1e-8)  # each token's map as a distribution over cells
    tok, pix = [], []
    for b, tg in enumerate(targets):
        if not keep[b]:
            continue
        regions = {}
        for pos, region in tg:
            tok.append(1 - (an[b][:, pos].mean(1) * cov[b, region]).sum())
            regions.setdefault(region, []).extend(pos)
        groups = [(region, pos) for pos, region in tg] if per_word else regions.items()
        for region, pos in groups:
            p = a[b][:, sorted(set(pos))].sum(1).clamp(1e-6, 1 - 1e-6)
            pix.append(F.binary_cross_entropy(p, cov[b, region]))
    zero = a.sum() * 0
    return (torch.stack(tok).mean() if tok else zero), (torch.stack(pix).mean() if pix else zero)


def region_cover(labels: np.ndarray, grid: int = 16) -> torch.Tensor:
    """uint8/int8 label maps (B, 128, 128) -> (B, 1 + MAX_OBJECTS, grid^2): coverage of each cell."""
    lab = torch.from_numpy(labels.astype(np.int64))
    onehot = F.one_hot(lab, 1 + world.MAX_OBJECTS).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, SIZE // grid).flatten(2)


def train_unet(latents, scenes, labels, tokens, steps, seed, bs=32, lr=1e-3, budget_s=None, log_every=50,
               token_weight=0.1, pixel_weight=0.1, token_max_t=800, edit_phrases=0.0, te=None,
               config=BASE_UNET_CONFIG, init=None, grids=(16,), name="unet", pixel_per_word=False,
               edit_grounding="both", confusable=0.0):
    """Trains a UNet of `config` and, unless a trained text encoder `te` is given (then frozen), a text
    encoder with it. init: a trained UNet whose weights the new one starts from (grow_unet); grids: the
    grids whose cross-attention maps the grounding losses shape; edit_grounding: the edit phrases' grounded
    words (edit_targets); confusable: their share of hard-negative colours (edit_phrase)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 3)
    rng = np.random.default_rng([seed, 3])
    unet = UNet2DConditionModel(UNetConfig(**config))
    ldm_init(unet)
    if init is not None:
        grow_unet(unet, init)
    frozen_te = te is not None
    if not frozen_te:
        te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        clip_init(te)
    trained = [unet] if frozen_te else [unet, te]
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA(trained)
    acp = NoiseSchedule(SCHEDULER).alphas_cumprod
    hist, thist, phist, t = [], [], [], Timer()
    step = 0
    while step < steps:
        idx = torch.from_numpy(rng.integers(len(latents), size=bs))
        caps = [training_caption(scenes[int(i)], rng) for i in idx]
        # edit phrases (grounding only): region index, or None for an ordinary caption
        edit_region, kept = [None] * bs, [None] * bs
        if edit_phrases > 0:
            for b in np.flatnonzero(rng.random(bs) < edit_phrases):
                caps[b], edit_region[b], kept[b] = edit_phrase(scenes[int(idx[b])], rng, confusable)
        ids = tokens(caps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        rec = MapRecorder(grids) if token_weight > 0 or pixel_weight > 0 else None
        weight = torch.tensor([float(r is None) for r in edit_region]) if edit_phrases > 0 else None
        with torch.set_grad_enabled(not frozen_te):
            ctx = te(ids)
        loss, tt = diffusion_loss(unet, latents[idx], ctx, acp, gen, recorder=rec, weight=weight)
        total = loss
        if rec is not None:
            targets = [word_targets(scenes[int(i)], tokens.words(c)) if r is None else
                       edit_targets(tokens.words(c), r, k, edit_grounding)
                       for i, c, r, k in zip(idx, caps, edit_region, kept)]
            # each grid's losses on its own maps, averaged over the grids: every level localises
            per_grid = [grounding_losses(probs, region_cover(labels[idx.numpy()], g), targets, tt < token_max_t,
                                         per_word=pixel_per_word)
                        for g, probs in rec.probs.items()]
            tl, pl = (torch.stack(v).mean() for v in zip(*per_grid))
            total = loss + token_weight * tl + pixel_weight * pl
            thist.append(tl.item())
            phist.append(pl.item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        hist.append(loss.item())
        step += 1
        if budget_s is not None and step == 30:  # size the run from the measured speed
            steps = max(200, int(budget_s / (t() / 30)))
            log(f"{name}: {t() / 30:.2f}s/step -> {steps} steps for {budget_s:.0f}s")
        if step % log_every == 0 or step == steps:
            log(f"{name} {step}/{steps} loss {np.mean(hist[-log_every:]):.4f} "
                f"token {np.mean(thist[-log_every:]) if thist else 0:.4f} "
                f"pixel {np.mean(phist[-log_every:]) if phist else 0:.4f} ({t():.0f}s)")
    ema.copy_to()
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    return unet, te, {"steps": steps, "batch": bs, "lr": lr, "final_loss": float(np.mean(hist[-100:])),
                      "text_encoder": "frozen" if frozen_te else "trained jointly",
                      "grounding_grids": list(grids),
                      "initialised_from": None if init is None else ("grown UNet" if is_grown(init) else "base UNet"),
                      "token_loss_weight": token_weight, "pixel_loss_weight": pixel_weight,
                      "pixel_loss_per_word": pixel_per_word,
                      "grounding_loss_max_t": token_max_t, "edit_phrases": edit_phrases,
                      "edit_grounding": edit_grounding, "confusable_colours": confusable,
                      "final_token_loss": float(np.mean(thist[-100:])) if thist else None,
                      "token_loss_first_100": float(np.mean(thist[:100])) if thist else None,
                      "final_pixel_loss": float(np.mean(phist[-100:])) if phist else None,
                      "pixel_loss_first_100": float(np.mean(phist[:100])) if phist else None,
                      "loss_first_100": float(np.mean(hist[:100])), "seconds": round(t(), 1)}


# ---------------------------------------------------------------- phase 3: inpainting UNet

def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(m[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0.5 if r > 0 else m


def make_inpaint_mask(scene, lab: np.ndarray, rng, bg_dilate: int = 0):
    """-> (latent-grid mask (H/4, W/4) bool, kind, object index or None).
    bg_dilate: background masks grow 0..bg_dilate px into the objects (0: exactly the background). An
    InstDiffEdit background mask reaches into the objects' edges, and the UNet must then restore those
    edges, as object masks dilated into the background teach it to restore the background."""
    n = len(scene.objects)
    r = rng.random()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if r < 0.40:
        kind, obj = "object", int(rng.integers(n))
        m = torch.from_numpy(lab == obj + 1)
        if rng.random() < 0.3 and m.any():  # the object's bounding box, loosened
            ys, xs = np.nonzero(lab == obj + 1)
            pad = rng.integers(0, 10, 4)
            box = np.zeros((SIZE, SIZE), bool)
            box[max(ys.min() - pad[0], 0):ys.max() + pad[1] + 1, max(xs.min() - pad[2], 0):xs.max() + pad[3] + 1] = True
            m = torch.from_numpy(box)
        else:
            m = _dilate(m, int(rng.integers(0, 9)))
    elif r < 0.65:  # a quarter: the pipeline's background edits mask this
        kind, obj, m = "background", None, torch.from_numpy(lab == 0)
        if bg_dilate > 0:  # drawn only then, so the recipe without it keeps its random stream
            m = _dilate(m, int(rng.integers(0, bg_dilate + 1)))
    elif r < 0.90:
        kind, obj = "random", None
        m = np.zeros((SIZE, SIZE), bool)
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(0, SIZE, 2)
            w, h = rng.uniform(12, 70, 2)
            if rng.random() < 0.5:
                m |= (np.abs(xx - cx) < w / 2) & (np.abs(yy - cy) < h / 2)
            else:
                m |= ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 < 1
        m = torch.from_numpy(m)
    else:
        kind, obj, m = "full", None, torch.ones(SIZE, SIZE, dtype=torch.bool)
    lm = F.avg_pool2d(m[None, None].float(), 4)[0, 0] > 0.5  # on the latent grid, as the pipeline's masks
    if not lm.any():
        lm[SIZE // 8, SIZE // 8] = True
    return lm, kind, obj


def inpaint_caption(scene, kind, obj, rng) -> str:
    r = rng.random()
    if r < 0.10:
        return ""
    if kind == "object" and r < 0.85:
        return object_phrase(scene.objects[obj])
    if kind == "background" and r < 0.85:
        return background_phrase(scene)
    return world.caption(scene)


@torch.no_grad()
def inpaint_data(vae, scale, images, labels, scenes, n, seed, bs=64, bg_dilate=0):
    """n (scene index, latent mask, masked-image latent, kind, object) examples, each encoded once."""
    rng = np.random.default_rng([seed, 4])
    idx = rng.choice(len(images), n, replace=False)
    masks, kinds, objs = [], [], []
    for i in idx:
        lm, kind, obj = make_inpaint_mask(scenes[i], labels[i], rng, bg_dilate)
        masks.append(lm)
        kinds.append(kind)
        objs.append(obj)
    masks = torch.stack(masks)[:, None].float()  # (n, 1, 32, 32)
    masked = []
    for s in range(0, n, bs):
        x = to_tensor(images[idx[s:s + bs]])
        pm = F.interpolate(masks[s:s + bs], size=(SIZE, SIZE), mode="nearest")
        masked.append(vae.encode(x * (pm < 0.5)).mean * scale)
    return idx, masks, torch.cat(masked), kinds, objs


def keep_cell_weights(masks: torch.Tensor, keep_weight: float) -> torch.Tensor | None:
    """Per-latent-cell loss weights for phase 3: 1 inside the mask (1 = repaint), keep_weight outside it,
    where the UNet must hand the masked-image latents back; None for 1 (SD's uniform loss)."""
    return None if keep_weight == 1.0 else masks + keep_weight * (1 - masks)


def train_inpaint(main_unet, te, latents, scenes, data, tokens, steps, seed, bs=32, lr=5e-4, budget_s=None,
                  log_every=50, resume=None, keep_weight=1.0):
    """Phase 3: the 9-channel inpainting UNet, initialised from ``main_unet`` as SD's was, or, with
    ``resume`` (an inpainting UNet trained earlier with the same text encoder), continued from it.

    keep_weight: the loss weight of the latent cells outside the mask, relative to those inside. SD's
    recipe is 1 (a uniform loss); more makes the UNet learn sooner to hand back the kept cells unchanged,
    which SD's inpainting UNet does after its 595k steps and this one, after a few thousand, does not
    (what it changes there is C_non)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 5)
    rng = np.random.default_rng([seed, 5])
    idx, masks, masked, kinds, objs = data
    unet = UNet2DConditionModel(UNetConfig(**{**BASE_UNET_CONFIG, "in_channels": 9}))
    if resume is not None:
        sd = {k: v.float().clone() for k, v in resume.state_dict().items()}
    else:
        sd = {k: v.clone() for k, v in main_unet.state_dict().items()}
        w = torch.zeros_like(unet.conv_in.weight)
        w[:, :4] = sd["conv_in.weight"]  # SD inpainting's init: extra input channels start at zero
        sd["conv_in.weight"] = w
    unet.load_state_dict(sd, strict=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = EMA([unet])
    acp = NoiseSchedule(SCHEDULER).alphas_cumprod
    hist, t = [], Timer()
    step = 0
    while step < steps:
        j = rng.integers(len(idx), size=bs)
        caps = [inpaint_caption(scenes[idx[k]], kinds[k], objs[k], rng) for k in j]
        j = torch.from_numpy(j)
        with torch.no_grad():
            ctx = te(tokens(caps))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 50)
        extra = torch.cat([masks[j], masked[j]], dim=1)
        loss, _ = diffusion_loss(unet, latents[torch.from_numpy(idx)[j]], ctx, acp, gen, extra,
                                 cell_weight=keep_cell_weights(masks[j], keep_weight))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update()
        hist.append(loss.item())
        step += 1
        if budget_s is not None and step == 30:
            steps = max(200, int(budget_s / (t() / 30)))
            log(f"inpaint: {t() / 30:.2f}s/step -> {steps} steps for {budget_s:.0f}s")
        if step % log_every == 0 or step == steps:
            log(f"inpaint {step}/{steps} loss {np.mean(hist[-log_every:]):.4f} ({t():.0f}s)")
    ema.copy_to()
    unet.eval().requires_grad_(False)
    return unet, {"steps": steps, "batch": bs, "lr": lr, "keep_weight": keep_weight,
                  "final_loss": float(np.mean(hist[-100:])) if hist else None,
                  "loss_first_100": float(np.mean(hist[:100])) if hist else None, "seconds": round(t(), 1)}


# ---------------------------------------------------------------- quick check: do the word maps localise?

@torch.no_grad()
def localisation_check(unet, te, vae, tokenizer, n=50, t=500, seed=0):
    """Mean IoU between the thresholded (0.5 of max) map of a word at each grid, upsampled to 128, and
    the object's true mask, over the objects of n held-out scenes (benchmark seeds). Prompts: the full
    caption, and the object's own phrase. Keys end in the grid (e.g. colour_word_full_caption_16)."""
    gen = torch.Generator().manual_seed(seed + 7)
    acp = NoiseSchedule(SCHEDULER).alphas_cumprod
    res = {"centred_disc_baseline": []}
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = torch.from_numpy((xx - SIZE / 2 + 0.5) ** 2 + (yy - SIZE / 2 + 0.5) ** 2 < (0.35 * SIZE / 2) ** 2)

    def iou(a, b):
        return float((a & b).sum()) / max(float((a | b).sum()), 1.0)

    for i in range(n):
        scene = world.scene_from_seed(world.BENCHMARK_SEED + i)
        img, masks, _ = world.render(scene, SIZE)
        z0 = vae.encode(to_tensor(img[None])).mean * vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=gen)
        x = add_noise(z0, noise, t, acp)
        prompts = [world.caption(scene)] + [object_phrase(o) for o in scene.objects]
        rec = MapRecorder()
        unet(x.expand(len(prompts), -1, -1, -1), t, te(tokenizer.encode(prompts)), recorder=rec)
        for g, probs in rec.probs.items():
            if not probs:  # this UNet has no cross-attention at grid g
                continue
            maps = torch.stack(probs).mean((0, 2)).transpose(1, 2).unflatten(2, (g, g))  # (B, 77, g, g)

            def word_mask(p, word):
                pos = [ps for w, ps in tokenizer.words(prompts[p], split="bpe") if w == word][0]
                m = maps[p, pos].mean(0)
                m = F.interpolate(m[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
                return m >= 0.5 * m.max()

            for k, o in enumerate(scene.objects):
                gt = torch.from_numpy(masks[k])
                for key, mask in ((f"shape_word_full_caption_{g}", word_mask(0, o.shape)),
                                  (f"colour_word_full_caption_{g}", word_mask(0, o.colour)),
                                  (f"shape_word_object_phrase_{g}", word_mask(1 + k, o.shape))):
                    res.setdefault(key, []).append(iou(mask, gt))
        res["centred_disc_baseline"] += [iou(disc, torch.from_numpy(m)) for m in masks]
    return {k: round(float(np.mean(v)), 4) for k, v in res.items()} | {"objects": len(res["centred_disc_baseline"]),
                                                                         "scenes": n, "t": t}


# ---------------------------------------------------------------- writing the folders

def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save(module, path: Path, prefix: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise RuntimeError(f"{k} overflows fp16")
    save_file(sd, str(path), metadata={"format": "pt"})


def unet_config_json(config: dict, in_channels: int) -> dict:
    cfg = UNetConfig(**{**config, "in_channels": in_channels}).to_dict()
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, **cfg}


def save_main(out: Path, unet, te, vae, tokenizer_dir: Path, unet_config: dict = UNET_CONFIG) -> None:
    """assets/toy-sd in the CompVis/stable-diffusion-v1-4 diffusers layout."""
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    _write_json(out / "unet" / "config.json", unet_config_json(unet_config, 4))
    _save(unet, out / "unet" / "diffusion_pytorch_model.safetensors")
    vc = vae.config
    _write_json(out / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
        "block_out_channels": list(vc.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(vc.block_out_channels), "in_channels": 3,
        "latent_channels": vc.latent_channels, "layers_per_block": vc.layers_per_block,
        "norm_num_groups": vc.norm_num_groups, "out_channels": 3, "sample_size": SIZE,
        "scaling_factor": round(float(vc.scaling_factor), 6),
        "up_block_types": ["UpDecoderBlock2D"] * len(vc.block_out_channels)})
    _save(vae, out / "vae" / "diffusion_pytorch_model.safetensors")
    _write_json(out / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
        "model_type": "clip_text_model", "pad_token_id": 1, "projection_dim": TEXT_CONFIG["hidden_size"],
        "torch_dtype": "float16", **TEXT_CONFIG})
    _save(te, out / "text_encoder" / "model.safetensors", prefix="text_model.")
    tok = out / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        (tok / f).write_bytes((tokenizer_dir / f).read_bytes())
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    bos, eos = {**special, "content": "<|startoftext|>"}, {**special, "content": "<|endoftext|>"}
    _write_json(tok / "special_tokens_map.json",
                {"bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": eos})
    _write_json(tok / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": {"__type": "AddedToken", **bos}, "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **eos}, "errors": "replace", "model_max_length": 77,
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **eos}})
    sched = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.30.0", **{
        k: v for k, v in SCHEDULER.to_dict().items()
        if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "set_alpha_to_one",
                 "steps_offset", "clip_sample", "prediction_type")}, "skip_prk_steps": True, "trained_betas": None}
    _write_json(out / "scheduler" / "scheduler_config.json", dict(sorted(sched.items())))


def save_inpaint(out: Path, unet) -> None:
    """assets/toy-sd-inpaint: only the 9-channel UNet (VAE, text encoder, tokenizer: toy-sd's)."""
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"]})
    _write_json(out / "unet" / "config.json", unet_config_json(BASE_UNET_CONFIG, 9))
    _save(unet, out / "unet" / "diffusion_pytorch_model.safetensors")


def find_clip_bpe() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")  # located, never imported (it imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the CLIP vocabulary comes from the open-clip-torch wheel: pip install --no-deps open-clip-torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="assets", help="writes OUT/toy-sd and OUT/toy-sd-inpaint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=10000, help="training scenes rendered and encoded once")
    p.add_argument("--vae-steps", type=int, default=1800, help="VAE steps on 64x64 crops (batch 16)")
    p.add_argument("--vae-full-steps", type=int, default=150, help="then VAE steps on whole images (batch 8)")
    p.add_argument("--vae-from", default=None, help="load the VAE from this toy-sd folder instead of training it")
    p.add_argument("--unet-from", default=None,
                   help="load the base UNet (BASE_UNET_CONFIG's layout) and the text encoder from this toy-sd "
                        "folder instead of training them in phase 2")
    p.add_argument("--inpaint-from", default=None,
                   help="copy the inpainting UNet from this toy-sd-inpaint folder instead of training it (it must "
                        "have been trained with the same text encoder)")
    p.add_argument("--unet-steps", type=int, default=2200, help="phase 2: base UNet + text encoder steps")
    p.add_argument("--grow-steps", type=int, default=GROW_STEPS,
                   help="phase 2b: steps of the grown UNet (cross-attention at every level), text encoder frozen; "
                        "0: ship the base UNet")
    p.add_argument("--grow-lr", type=float, default=5e-4, help="phase 2b peak learning rate")
    p.add_argument("--grow-resume", action="store_true",
                   help="phase 2b continues the grown UNet of --unet-from (as assets/ ships it) for --grow-steps, "
                        "on its own sample order, instead of growing a base UNet")
    p.add_argument("--grow-minutes", type=float, default=None,
                   help="size phase 2b's step count to about this many minutes from its measured speed")
    p.add_argument("--token-loss", type=float, default=0.2,
                   help="weight of the token grounding loss on the 16x16 maps (0: off)")
    p.add_argument("--pixel-loss", type=float, default=0.2,
                   help="weight of the pixel grounding loss on the 16x16 maps (0: off; the shipped UNet of "
                        "2026-11-28 was trained with 0)")
    p.add_argument("--pixel-loss-per-word", action="store_true",
                   help="the pixel loss on each word's own attention (TokenCompose's form) instead of the sum over "
                        "the words that name a region (see grounding_losses)")
    p.add_argument("--edit-phrases", type=float, default=0.2,
                   help="share of UNet samples whose caption is an edit text (one attribute changed), "
                        "trained with the grounding losses only (0: off)")
    p.add_argument("--edit-grounding", choices=EDIT_GROUNDINGS, default="both",
                   help="the edit phrases' words the grounding losses train: both the colour and the shape word, "
                        "or an object edit's kept word alone (see edit_targets)")
    p.add_argument("--confusable-colours", type=float, default=0.0,
                   help="share of the edit phrases' colour edits (scenes with two or more objects) whose new "
                        "colour is the absent one nearest another object's: a hard negative (confusable_colour)")
    p.add_argument("--inpaint-examples", type=int, default=10000,
                   help="masked images encoded for inpainting (at most --scenes: one per scene)")
    p.add_argument("--inpaint-steps", type=int, default=7000)
    p.add_argument("--inpaint-lr", type=float, default=5e-4, help="phase 3 peak learning rate")
    p.add_argument("--inpaint-keep-weight", type=float, default=1.0,
                   help="phase 3 loss weight of the latent cells outside the mask, relative to those inside (1: "
                        "SD's uniform loss)")
    p.add_argument("--inpaint-bg-dilate", type=int, default=0,
                   help="phase 3's background masks grow a random 0..N px into the objects, as InstDiffEdit's "
                        "background masks do (0: exactly the background)")
    p.add_argument("--inpaint-resume", default=None,
                   help="phase 3 continues the inpainting UNet of this toy-sd-inpaint folder (trained with the same "
                        "text encoder) for --inpaint-steps, on freshly drawn masks and its own sample order")
    p.add_argument("--minutes-budget", type=float, default=None,
                   help="size the UNet / inpainting step counts to finish in about this many minutes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because on a shared 2-core machine a 2-thread OpenMP run slows "
                        "~20x whenever another process takes a core")
    world.add_object_sizes_argument(p, world.TRAIN_OBJECT_SIZES, "training scenes",
                                    "0.2 0.7 covers the benchmark's --object-sizes 0.35 0.7")
    p.add_argument("--check-scenes", type=int, default=50, help="held-out scenes for the localisation check")
    a = p.parse_args(argv)
    if a.inpaint_examples > a.scenes:
        p.error(f"--inpaint-examples {a.inpaint_examples} exceeds --scenes {a.scenes} (one example per scene)")
    try:
        a.object_sizes = world.check_object_sizes(a.object_sizes)
    except ValueError as e:
        p.error(f"--object-sizes: {e}")
    if not (math.isfinite(a.inpaint_keep_weight) and a.inpaint_keep_weight > 0):
        p.error(f"--inpaint-keep-weight {a.inpaint_keep_weight}: must be a positive number")
    if a.inpaint_bg_dilate < 0:
        p.error(f"--inpaint-bg-dilate {a.inpaint_bg_dilate}: must be 0 or more pixels")
    if a.grow_resume and not a.unet_from:
        p.error("--grow-resume continues the grown UNet of --unet-from: pass --unet-from")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    clock, phases = Timer(), {}
    out_main, out_inp = Path(a.out) / "toy-sd", Path(a.out) / "toy-sd-inpaint"

    tok_dir = write_clip_vocab(find_clip_bpe(), Path("runs") / "clip-vocab")
    tokenizer = Tokenizer.from_folder(tok_dir)
    tokens = TokenCache(tokenizer)

    t = Timer()
    scenes, images, labels = render_scenes(a.scenes, a.seed, a.object_sizes)
    phases["render"] = {"scenes": a.scenes, "object_sizes": list(a.object_sizes), "seconds": round(t(), 1)}
    log(f"rendered {a.scenes} scenes in {t():.0f}s")

    if a.vae_from:  # a VAE trained earlier (by this script with the same seed): skip phase 1
        from weights import load
        vae = load(a.vae_from, components=("vae",)).vae
        phases["vae"] = {"reused_from": a.vae_from}
    else:
        vae, phases["vae"] = train_vae(images, a.vae_steps, a.vae_full_steps, a.seed)
    t = Timer()
    z = encode_all(vae, images)
    # a reused VAE keeps the scale its UNets were trained with (a smaller --scenes would re-estimate it)
    scale = float(vae.config.scaling_factor) if a.vae_from else 1.0 / float(z.std())
    vae.config.scaling_factor = scale
    latents = z * scale
    rec = vae.decode(z[:64])
    phases["encode"] = {"seconds": round(t(), 1), "latent_std_unscaled": float(z.std()), "scaling_factor": scale,
                        "latent_channel_means_scaled": [round(float(v), 3) for v in latents.mean((0, 2, 3))],
                        "recon_l1_64_train_images": float((rec - to_tensor(images[:64])).abs().mean())}
    log(f"encoded latents in {t():.0f}s, scaling_factor {scale:.4f}")

    budget = None if a.minutes_budget is None else a.minutes_budget * 60
    remaining = None if budget is None else budget - clock() - 60 - 0.03 * a.inpaint_examples
    earlier = None  # the phases recorded in --unet-from's training_log.json, read once
    if a.unet_from:  # phase 2 done earlier: keep its record next to the reused weights
        from weights import load
        sd = load(a.unet_from, components=("unet", "text_encoder"))
        base, te = sd.unet.eval().requires_grad_(False), sd.text_encoder.eval().requires_grad_(False)
        if is_grown(base):  # as assets/ ships it
            if (a.grow_steps or a.grow_minutes) and not a.grow_resume:
                sys.exit(f"error: --unet-from {a.unet_from} holds a grown UNet already: pass --grow-steps 0, "
                         "or --grow-resume to continue its training")
            if not (a.inpaint_from or a.inpaint_resume):
                sys.exit(f"error: --unet-from {a.unet_from} holds no base UNet, which a new inpainting UNet starts "
                         "from: pass --inpaint-from or --inpaint-resume")
        elif tuple(base.config.down_block_types) != tuple(BASE_UNET_CONFIG["down_block_types"]):
            sys.exit(f"error: --unet-from {a.unet_from}: its UNet has cross-attention at "
                     f"{base.config.down_block_types}, not the base layout {BASE_UNET_CONFIG['down_block_types']}")
        elif a.grow_resume:
            sys.exit(f"error: --grow-resume: --unet-from {a.unet_from} holds a base UNet, not a grown one")
        prev = Path(a.unet_from) / "training_log.json"
        earlier = json.loads(prev.read_text())["phases"] if prev.is_file() else None
        phases["unet"] = {"reused_from": a.unet_from, "record": reused_record(earlier, "unet")}
    else:
        base, te, phases["unet"] = train_unet(latents, scenes, labels, tokens, a.unet_steps, a.seed,
                                              token_weight=a.token_loss, pixel_weight=a.pixel_loss,
                                              pixel_per_word=a.pixel_loss_per_word, edit_phrases=a.edit_phrases,
                                              edit_grounding=a.edit_grounding, confusable=a.confusable_colours,
                                              budget_s=None if remaining is None else 0.64 * remaining)
    # phase 2b: grow the base UNet to cross-attention at every level and train it with the text encoder
    # frozen, so the inpainting UNet (conditioned on the same text encoder) stays valid
    unet, phases["grow"] = base, {"steps": 0}
    if is_grown(base):  # grown earlier (--unet-from): keep that run's phase 2b record beside the reused UNet
        phases["grow"] = {"steps": 0, "reused_from": a.unet_from, "record": reused_record(earlier, "grow")}
    if a.grow_steps > 0 or a.grow_minutes:
        # seed + 1: its own sample order, not phase 2's again; a resumed run seed + 5, not the first 2b run's
        seed2b = a.seed + (5 if a.grow_resume else 1)
        unet, _, phases["grow"] = train_unet(latents, scenes, labels, tokens, a.grow_steps, seed2b,
                                             lr=a.grow_lr, token_weight=a.token_loss, pixel_weight=a.pixel_loss,
                                             pixel_per_word=a.pixel_loss_per_word,
                                             edit_phrases=a.edit_phrases, edit_grounding=a.edit_grounding,
                                             confusable=a.confusable_colours, te=te, config=UNET_CONFIG, init=base,
                                             grids=ALL_GRIDS, name="grow",
                                             budget_s=None if a.grow_minutes is None else 60 * a.grow_minutes)
        if a.grow_resume:  # keep the run it continued (and that run's record) beside this one
            phases["grow"]["resumed_from"] = a.unet_from
            phases["grow"]["earlier"] = earlier.get("grow") if earlier is not None else None
    save_main(out_main, unet, te, vae, tok_dir, UNET_CONFIG if is_grown(unet) else BASE_UNET_CONFIG)

    if a.inpaint_from:  # phase 3 done earlier with this text encoder: copy its folder as it is
        from weights import load
        inp = load(a.inpaint_from, components=("unet",)).unet
        prev = json.loads((Path(a.inpaint_from) / "unet" / "config.json").read_text())
        phases["inpaint"] = {"reused_from": a.inpaint_from,
                             "layout": {k: prev[k] for k in ("down_block_types", "up_block_types")}}
        # the run that wrote that folder keeps its record beside it (OUT/toy-sd/training_log.json)
        sibling = Path(a.inpaint_from).parent / "toy-sd" / "training_log.json"
        if sibling.is_file() and sibling.resolve() != (out_main / "training_log.json").resolve():
            made = json.loads(sibling.read_text())
            phases["inpaint"]["record"] = {"command": made.get("command"),
                                           **{k: made["phases"].get(k) for k in ("inpaint_data", "inpaint")}}
        if Path(a.inpaint_from).resolve() != out_inp.resolve():
            out_inp.mkdir(parents=True, exist_ok=True)
            for f in Path(a.inpaint_from).rglob("*"):
                if f.is_file():
                    (out_inp / f.relative_to(a.inpaint_from)).parent.mkdir(parents=True, exist_ok=True)
                    (out_inp / f.relative_to(a.inpaint_from)).write_bytes(f.read_bytes())
    else:
        resume = None
        if a.inpaint_resume:
            from weights import load
            resume = load(a.inpaint_resume, components=("unet",)).unet
        # a resumed run draws new masks and a new sample order (seed + 2), not the first run's again
        seed3 = a.seed + 2 if resume is not None else a.seed
        t = Timer()
        data = inpaint_data(vae, scale, images, labels, scenes, a.inpaint_examples, seed3,
                            bg_dilate=a.inpaint_bg_dilate)
        phases["inpaint_data"] = {"examples": a.inpaint_examples, "seconds": round(t(), 1),
                                  "background_dilation_px": a.inpaint_bg_dilate,
                                  "kinds": {k: data[3].count(k) for k in ("object", "background", "random", "full")}}
        remaining = None if budget is None else budget - clock() - 60
        inp, phases["inpaint"] = train_inpaint(base, te, latents, scenes, data, tokens, a.inpaint_steps, seed3,
                                               lr=a.inpaint_lr, budget_s=remaining, resume=resume,
                                               keep_weight=a.inpaint_keep_weight)
        if a.inpaint_resume:  # keep the earlier run's record (toy-sd's log holds it) beside this one
            phases["inpaint"]["resumed_from"] = a.inpaint_resume
            if earlier is not None:
                phases["inpaint"]["earlier"] = earlier.get("inpaint")
        save_inpaint(out_inp, inp)

    t = Timer()
    check = localisation_check(unet, te, vae, tokenizer, n=a.check_scenes, seed=a.seed)
    phases["localisation_check"] = {"seconds": round(t(), 1)}
    log(f"localisation check: {check}")

    n_params = {name: sum(p.numel() for p in m.parameters())
                for name, m in (("unet", unet), ("inpaint_unet", inp), ("text_encoder", te), ("vae", vae))}
    sizes = {str(f.relative_to(a.out)): f.stat().st_size for d in (out_main, out_inp) for f in sorted(d.rglob("*"))
             if f.is_file()}
    report = {
        "command": "python -m toy.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": a.seed, "wall_seconds": round(clock(), 1),
        "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "phases": phases, "parameters": n_params, "bytes_on_disk": sizes,
        "bytes_total": sum(sizes.values()), "attention_localisation": check,
        "configs": {"vae": VAE_CONFIG, "unet": UNET_CONFIG, "base_unet": BASE_UNET_CONFIG, "text_encoder": TEXT_CONFIG,
                    "scheduler": SCHEDULER.to_dict()},
    }
    _write_json(out_main / "training_log.json", report)
    log(f"done in {clock() / 60:.1f} min; {report['bytes_total'] / 1e6:.1f} MB written")


def reused_record(earlier: dict | None, phase: str) -> dict | None:
    """The training record of `phase` in the phases of the run whose folder this run reuses (None if it
    left no log); a run that had itself reused the phase holds the record one level down."""
    rec = earlier.get(phase) if earlier is not None else None
    return rec.get("record", rec) if rec else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
