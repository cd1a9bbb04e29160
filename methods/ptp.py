"""Prompt-to-Prompt (Hertz et al. 2022, arXiv 2208.01626), a Table 1 baseline, after a 50-step DDIM
inversion as the InstDiffEdit paper's appendix ran it.

The source image is DDIM-inverted with the source text (guidance 1, sampler/inversion.py). From the
inverted noise two branches are denoised in one batch, the source text and the edit text, both with
CFG. While the edit branch denoises, its attention is taken from the source branch (``PtPControl``):

* cross-attention: for the first ``ptp_cross`` of the steps the edit branch's text maps are the source's,
  routed through a token map (word swap: source word -> edit word; refinement: the globally aligned
  tokens, new tokens keep their own maps);
* self-attention: for the first ``ptp_self`` of the steps the edit branch's self-attention maps are
  the source's, on every layer except the full-resolution ones (the official code's ``<= 32**2``
  pixels at SD's 64x64 latent);
* optional local blending (``--ptp-blend``): after each step the edit branch is kept equal to the
  source branch outside a mask made from the changed words' cross-attention maps.

Defaults follow the official notebook (github:google/prompt-to-prompt, prompt-to-prompt_stable):
cross 0.8, self 0.4, blend threshold 0.3, 50 DDIM steps, CFG 7.5. Word pairs of different length
are aligned as the InstDiffEdit authors did: the shorter phrase is padded by repeating its last
word (``ptp_align pad``, the default); ``refine`` uses the official refinement mapping instead, and
``replace`` refuses phrases of different word counts.

Differences from the official code, each deliberate: the tokens after the last word (end token and
padding) are paired end-to-end (the official replace mapper pairs them by position, misaligning them
when the phrases have different token counts); the inversion is plain DDIM (no null-text optimisation,
as the appendix says); the scheduler is the model's own DDIM configuration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import UNetControl
from sampler import DDIMSampler
from sampler.guidance import cfg
from sampler.inversion import ddim_invert

from .base import Edited, Job, Method, register, report_step
from .options import EditError, EditOptions, Option

ALIGN_MODES = ("pad", "refine", "replace")


# ---------------------------------------------------------------- aligning the two prompts

def pad_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """The two phrases as word lists of equal length: the shorter one repeats its last word
    (the InstDiffEdit authors' alignment for PtP)."""
    s, t = source.split(), target.split()
    if not s or not t:
        raise EditError(f"ptp needs a non-empty source and edit text (got {source!r} and {target!r})")
    n = max(len(s), len(t))
    return s + [s[-1]] * (n - len(s)), t + [t[-1]] * (n - len(t))


def _positions(tokenizer, words: list[str]) -> list[list[int]]:
    """Sequence positions (0 = start token) of each word's BPE pieces in ``" ".join(words)``."""
    out, pos = [], 1
    for w in words:
        n = len(tokenizer.tokens(w))
        out.append(list(range(pos, pos + n)))
        pos += n
    if pos - 1 != len(tokenizer.tokens(" ".join(words))):  # CLIP splits words independently; check it
        raise EditError(f"ptp cannot place the tokens of {' '.join(words)!r} word by word")
    if pos >= tokenizer.max_length:
        raise EditError(f"ptp: {' '.join(words)!r} is longer than the text encoder's {tokenizer.max_length - 2} tokens")
    return out


def replace_mapper(tokenizer, src_words: list[str], tgt_words: list[str]) -> torch.Tensor:
    """(L, L) token map for a word swap: ``edit_maps = source_maps @ M`` (L = the text length, 77).

    Equal words map token to token; a swapped word's source tokens spread their attention evenly
    over its edit tokens (so the attention mass per word is kept, as in the official mapper)."""
    if len(src_words) != len(tgt_words):
        raise EditError(f"ptp cannot align {' '.join(src_words)!r} ({len(src_words)} words) with "
                        f"{' '.join(tgt_words)!r} ({len(tgt_words)} words) word for word; "
                        f"use --ptp-align pad or refine")
    L = tokenizer.max_length
    M = torch.zeros(L, L)
    M[0, 0] = 1  # start token
    ps_all, pt_all = _positions(tokenizer, src_words), _positions(tokenizer, tgt_words)
    for ps, pt in zip(ps_all, pt_all):
        if len(ps) == len(pt):
            M[ps, pt] = 1.0
        else:
            M[torch.tensor(ps)[:, None], torch.tensor(pt)[None, :]] = 1.0 / len(pt)
    i, j = ps_all[-1][-1] + 1, pt_all[-1][-1] + 1  # end tokens, then padding, paired in order
    while i < L and j < L:
        M[i, j] = 1.0
        i, j = i + 1, j + 1
    for k in range(j, L):  # edit positions left over (its text is shorter): same position
        M[k, k] = 1.0
    return M


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (L,), known (L,)) for a refinement: ``edit_maps[..., j] = source_maps[..., index[j]]``
    where ``known[j]`` is 1, and the edit's own map for its new tokens (``known`` 0).

    The token ids of both texts (with start and end tokens) are globally aligned (Needleman-Wunsch:
    match +1, mismatch -1, gap 0, as the official ``seq_aligner``); positions past the edit's end token
    map to themselves."""
    x = tokenizer.encode(source)[0].tolist()
    y = tokenizer.encode(target)[0].tolist()
    lx, ly = (len(tokenizer.tokens(p)) + 2 for p in (source, target))
    x, y = x[:lx], y[:ly]
    score = [[0] * (ly + 1) for _ in range(lx + 1)]
    move = [[0] * (ly + 1) for _ in range(lx + 1)]  # 1: gap in x (new edit token), 2: gap in y, 3: pair
    for a in range(1, lx + 1):
        move[a][0] = 2
    for b in range(1, ly + 1):
        move[0][b] = 1
    for a in range(1, lx + 1):
        for b in range(1, ly + 1):
            options = (score[a][b - 1], score[a - 1][b], score[a - 1][b - 1] + (1 if x[a - 1] == y[b - 1] else -1))
            score[a][b] = max(options)
            move[a][b] = 1 + options.index(score[a][b])  # ties: new token, then dropped token, then pair
    L = tokenizer.max_length
    index, known = torch.arange(L), torch.ones(L)
    a, b = lx, ly
    while a > 0 or b > 0:
        m = move[a][b]
        if m == 3:
            a, b = a - 1, b - 1
            index[b] = a
        elif m == 1:
            b -= 1
            index[b], known[b] = 0, 0.0
        else:
            a -= 1
    return index, known


# ---------------------------------------------------------------- the attention control

class PtPControl(UNetControl):
    """Edits the edit branch's attention from the source branch's, by layer and step.

    The UNet batch is ``[uncond source, uncond edit, cond source, cond edit]``; as in the official
    code only the conditional pair is edited. Set ``step`` before each UNet call; call ``blend(x)``
    after each sampler step when local blending is on.
    """

    def __init__(self, steps: int, cross: float, self_: float, latent_size: tuple[int, int],
                 mapper: torch.Tensor | None = None, refine: tuple[torch.Tensor, torch.Tensor] | None = None,
                 blend_tokens: tuple[list[int], list[int]] | None = None, blend_threshold: float = 0.3):
        self.cross_steps = int(cross * steps)      # edit cross-attention while step < this
        self.self_steps = int(self_ * steps)       # edit self-attention while step < this
        h, w = latent_size
        self.self_max_pixels = (h // 2) * (w // 2)  # official: <= 32**2 at the 64x64 latent
        self.blend_grid = (h // 4, w // 4)          # official: the 16x16 cross-attention layers
        self.mapper, self.refine = mapper, refine
        self.blend_tokens, self.blend_threshold = blend_tokens, blend_threshold
        self.step = 0
        self._maps = None  # (2, pixels, tokens): source/edit cross-attention summed over heads-averaged layers

    def wants(self, name, hw):
        if name.endswith("attn2"):
            return self.step < self.cross_steps or (self.blend_tokens is not None and tuple(hw) == self.blend_grid)
        if name.endswith("attn1"):
            return self.step < self.self_steps and hw[0] * hw[1] <= self.self_max_pixels
        return False

    def attention(self, name, probs):
        if probs.shape[0] != 4:
            raise ValueError(f"layer {name!r}: batch {probs.shape[0]}, PtP runs [uncond, cond] x [source, edit]")
        src, own = probs[2], probs[3]
        if name.endswith("attn1"):
            new = src
        elif self.step < self.cross_steps:
            new = self.cross_replace(src, own)
        else:
            new = own
        if new is not own:
            probs = torch.cat([probs[:3], new[None]])
        if name.endswith("attn2") and self.blend_tokens is not None and \
                probs.shape[2] == self.blend_grid[0] * self.blend_grid[1]:
            m = probs[2:].mean(1)  # after the edit, as the official store sees it; mean over heads
            self._maps = m if self._maps is None else self._maps + m
        return probs

    def cross_replace(self, src: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """The edit branch's cross-attention (heads, pixels, tokens) from the source's."""
        if self.refine is not None:
            index, known = self.refine
            return src[..., index] * known + own * (1 - known)
        return src @ self.mapper

    @torch.no_grad()
    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """Local blending of the two branches x (2, C, h, w): outside the changed words' maps the
        edit branch is set to the source branch."""
        if self.blend_tokens is None or self._maps is None:
            return x
        masks = []
        for k, tokens in enumerate(self.blend_tokens):
            m = self._maps[k][:, tokens].sum(-1).unflatten(0, self.blend_grid)[None, None]
            m = F.max_pool2d(m, 3, stride=1, padding=1)
            m = F.interpolate(m, size=x.shape[-2:], mode="nearest")
            masks.append(m / m.max() > self.blend_threshold)
        mask = (masks[0] | masks[1]).to(x.dtype)
        return torch.stack([x[0], x[0] + mask[0] * (x[1] - x[0])])


# ---------------------------------------------------------------- the method

CROSS = Option("ptp_cross", float, 0.8, "PtP: fraction of steps whose edit cross-attention is the source's", 0, 1)
SELF = Option("ptp_self", float, 0.4, "PtP: fraction of steps whose edit self-attention is the source's", 0, 1)
ALIGN = Option("ptp_align", str, "pad", "PtP: word pairs of different length: pad the shorter with its last "
               "word (InstDiffEdit authors), refine (official refinement map) or replace (refuse)",
               choices=ALIGN_MODES)
BLEND = Option("ptp_blend", bool, False, "PtP: local blending with the changed words' attention maps",
               flag="--ptp-blend")
BLEND_TH = Option("ptp_blend_threshold", float, 0.3, "PtP: local blending threshold", 0, 1)


def build_control(tokenizer, source: str, target: str, o: EditOptions, latent_size) -> PtPControl:
    """The PtP control for one source/edit pair under options o (raises EditError when unalignable)."""
    mapper = refine = None
    if o.ptp_align == "refine":
        refine = refine_mapper(tokenizer, source, target)
        src_words, tgt_words = source.split(), target.split()
        _positions(tokenizer, src_words), _positions(tokenizer, tgt_words)  # length checks
    else:
        src_words, tgt_words = pad_words(source, target) if o.ptp_align == "pad" else (source.split(), target.split())
        mapper = replace_mapper(tokenizer, src_words, tgt_words)
    blend = None
    if o.ptp_blend:
        ps, pt = _positions(tokenizer, src_words), _positions(tokenizer, tgt_words)
        changed_src = sorted({p for w, pos in zip(src_words, ps) if w not in tgt_words for p in pos})
        changed_tgt = sorted({p for w, pos in zip(tgt_words, pt) if w not in src_words for p in pos})
        if not changed_src or not changed_tgt:
            raise EditError(f"ptp --ptp-blend needs a changed word on both sides: {source!r} -> {target!r}")
        blend = (changed_src, changed_tgt)
    return PtPControl(o.steps, o.ptp_cross, o.ptp_self, latent_size, mapper, refine, blend, o.ptp_blend_threshold)


@register
class PromptToPrompt(Method):
    name = "ptp"
    help = "Prompt-to-Prompt after DDIM inversion: the edit branch reuses the source's attention (baseline)"
    options = (CROSS, SELF, ALIGN, BLEND, BLEND_TH)
    defaults = {"sampler": "ddim"}
    makes_mask = False
    samplers = ("ddim",)  # it inverts with DDIM
    needs_source = True
    uses_inpaint = False
    takes_mask = False

    @torch.no_grad()
    def edit(self, pipe, job: Job) -> Edited:
        x, _ = run_ptp(pipe, job)
        return Edited(pipe.decode(x[1:])[0], None)


def run_ptp(pipe, job: Job, control: PtPControl | None = None) -> tuple[torch.Tensor, PtPControl]:
    """Invert job.x0 with the source text, then denoise [source, edit] under the PtP control.
    Returns the final latents (2, C, h, w) of both branches and the control."""
    o = job.o
    z0 = pipe.encode_image(job.x0)
    control = control or build_control(pipe.tokenizer, o.source, job.text, o, tuple(z0.shape[-2:]))
    emb_src = pipe.encode_text(o.source)  # (2, 77, D): [uncond, cond]
    sampler: DDIMSampler = pipe.sampler(o)
    counted = lambda x, t, ctx, control=None: pipe.call_unet(pipe.unet, x, t, ctx, recorder=control)
    x_T = ddim_invert(counted, sampler, z0, emb_src[1:]).noise  # guidance 1, as the official notebooks
    ctx = torch.cat([emb_src[:1], job.emb[:1], emb_src[1:], job.emb[1:]])  # [u, u, c_src, c_edit]
    x = x_T.expand(2, -1, -1, -1)
    for i in pipe.progress(range(len(sampler.timesteps)), job.progress, "ptp"):
        control.step = i
        uncond, cond = counted(torch.cat([x, x]), sampler.timesteps[i], ctx, control).chunk(2)
        x = sampler.step(cfg(uncond, cond, o.guidance), i, x)
        x = control.blend(x)
        report_step(job.callback, "ptp", i, sampler.timesteps[i], x)
    return x, control
