"""Instant attention mask (InstDiffEdit, Eq. 6-9), as the authors realise it.

Input: one cross-attention map per token (from ``mask.store.AttentionStore.maps()``, usually
16x16) and the token positions of each word of the edit text. Output: the refined soft map and
the binary mask at latent resolution.

Pipeline (docs/method-notes.md, "Mask from attention"; paper Eq. 6-9):

1. Word maps. Keep the maps of ``[SOT, words..., EOT]`` (padding after EOT is dropped). A word
   (a space-separated word of the edit text, see ``Tokenizer.words``) split into several BPE
   tokens gets the mean of its tokens' raw maps. Every map is upsampled to the latent size with
   Pillow's bicubic filter (``mask.filters.pil_resize``), which is what the authors' 8-bit
   ``Image.resize`` does, after scaling to 255 / max and truncating to whole levels as the
   authors' uint8 cast does; the result is clipped to [0, 255] as their 8-bit image clips the
   filter's overshoot, then min-max normalised. The SOT map is inverted first: SOT attends to the background, so the
   inverted map highlights the object.
   Upsampling first (as the authors do) means Eq. 6-9, the blur and the mask all live at latent
   resolution, which is what the masked blending of Eq. 4-5 needs.
2. Eq. 6: the index map is the word map most cosine-similar to the inverted SOT map
   (SOT itself and EOT are not candidates).
3. Eq. 7: cosine similarity of every map with the index map.
4. Eq. 8: ``P_i = 1`` if ``S_i >= gamma1``, ``-1`` if ``S_i <= gamma2``, else 0; SOT and EOT get 0.
   The paper writes strict inequalities, the authors' code uses inclusive ones (default);
   ``strict=True`` gives the paper's. P is computed at the first step only and passed back in at
   later steps.
5. Eq. 9: ``refined = clamp(minmax(mean of P=+1 maps) - minmax(mean of P=-1 maps), 0)``, then
   OpenCV's 5x5 binomial blur applied twice, min-max normalisation, and ``mask = soft > threshold``.
   With a single word (maps SOT, word, EOT) the word map is the refined map (P = [0, 1, 0]).

``exact_authors=True`` also reproduces the authors' later 8-bit steps: the resize by Pillow's
fixed-point 8-bit code (rounded to whole levels), the inversion as ``255 - x``, and the second uint8
truncation after the min-max. The defaults keep those in floats (any float dtype and device);
docs/method-notes.md has how closely each agrees with the authors' code.

Flat maps: where the authors divide 0 by 0 (a flat map in a min-max gives NaN, and a NaN refined map
an empty mask), ``minmax`` returns zeros, so the result stays finite.

Everything is vectorised over maps and free of host syncs (the index of Eq. 6 stays a tensor), so
it can run on the GPU at every denoising step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mask.filters import binomial_blur, gaussian_blur, pil_resize

# A map whose value range is below this fraction of its magnitude is treated as flat: float
# rounding (e.g. blurring a constant map) must not be stretched into a full [0, 1] pattern.
FLAT_RTOL = 1e-5
# Norm floor for the cosine similarities (a zero map has similarity 0 with everything).
NORM_EPS = 1e-12


@dataclass
class MaskResult:
    """Output of :func:`instant_mask`. Rows of ``word_maps``, ``similarity`` and ``P`` are aligned
    and ordered ``[SOT, word_1, ..., word_W, EOT]`` (length ``W + 2``).

    P: (W + 2,) float32 in {-1, 0, 1}; entries for SOT and EOT are 0 (Eq. 8).
    index: 0-dim int64 tensor, row of the index map in ``word_maps`` (1..W) (Eq. 6);
        ``None`` when P was given (Eq. 6-7 are only evaluated at the first step).
    similarity: (W + 2,) cosine similarity of each row with the index map (Eq. 7); ``None`` when P
        was given.
    word_maps: (W + 2, H, W) min-max normalised maps at latent size, row 0 the inverted SOT map.
    soft: (H, W) blurred, min-max normalised refined map in [0, 1].
    mask: (H, W) bool, ``soft > threshold`` (Eq. 9).
    """
    P: torch.Tensor
    index: torch.Tensor | None
    similarity: torch.Tensor | None
    word_maps: torch.Tensor
    soft: torch.Tensor
    mask: torch.Tensor


def minmax(x: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Min-max normalise over the last ``dims`` dimensions. Flat maps become zeros, never NaN."""
    flat = x.flatten(-dims)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    ok = rng > FLAT_RTOL * scale  # False for flat maps, including all-zero ones (0 > 0)
    out = torch.where(ok, (flat - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(flat))
    return out.view_as(x)


def _word_token_maps(token_maps: torch.Tensor, words: list[list[int]]) -> torch.Tensor:
    """(W + 2, h, w) raw maps of [SOT, words..., EOT]; multi-token words averaged."""
    eot = max(p for word in words for p in word) + 1
    rows = [token_maps[0]]
    for word in words:
        lo, hi = min(word), max(word)
        if hi - lo + 1 == len(word) and len(set(word)) == len(word):
            rows.append(token_maps[lo:hi + 1].mean(0))  # contiguous BPE pieces: a view, no index copy
        else:
            rows.append(torch.stack([token_maps[p] for p in word]).mean(0))
    rows.append(token_maps[eot])
    return torch.stack(rows)



UPSAMPLERS = ("bicubic", "bilinear")  # Pillow's filters; "bicubic" is what the authors' resize uses
BLURS = ("binomial", "gaussian")      # "binomial" is the authors' cv2.GaussianBlur((5, 5), 0)


def _normalised_maps(raw: torch.Tensor, size: tuple[int, int], upsample: str,
                     exact_authors: bool) -> torch.Tensor:
    """(n, H, W) word maps at latent size in [0, 1], row 0 the inverted SOT map (step 1)."""
    # Eq. 6-9 start from the authors' first uint8 cast, uint8(255 * map / max), reproduced exactly (a
    # truncation on the device): on the 16x16 grid its error is upsampled 16-fold and does not average
    # out, so it is the rounding that moves the Eq. 7 similarities most. A flat zero map gives 0 where
    # the authors' 0 / 0 casts NaN to 0.
    top = raw.flatten(1).amax(1).view(-1, 1, 1)
    q = torch.where(top > 0, torch.trunc(255 * raw / torch.where(top > 0, top, 1)), 0)
    if exact_authors:
        # Pillow's 8-bit resize, SOT inverted as 255 - x, min-max, uint8 again; then back to [0, 1] as
        # ToTensor does
        up = pil_resize(q, size, "bicubic", uint8=True)
        up[0] = 255 - up[0]
        return torch.trunc(minmax(up / 255) * 255) / 255
    # the later steps stay in floats. The second cast is left out: where the 8-bit image spans 0..255
    # (two thirds of the maps in tests/test_mask_oracle.py), the authors' min-max returns whole levels
    # and that cast changes nothing, so modelling it over-corrects Eq. 7 (docs/method-notes.md).
    up = pil_resize(q, size, upsample).clamp(0, 255)  # the 8-bit image clips the cubic's overshoot
    up[0] = -up[0]  # inverted SOT; min-max makes it 1 - minmax(SOT), and keeps a flat SOT at 0
    return minmax(up)


def instant_mask(token_maps: torch.Tensor, words: list[list[int]], latent_size: tuple[int, int],
                 P: torch.Tensor | None = None, gamma1: float = 0.9, gamma2: float = 0.6,
                 threshold: float = 0.2, upsample: str = "bicubic", blur: str = "binomial",
                 blur_kernel: int = 5, blur_sigma: float | None = None, blur_times: int = 2,
                 strict: bool = False, exact_authors: bool = False) -> MaskResult:
    """Instant attention mask of InstDiffEdit (Eq. 6-9) for one edit text.

    Args:
        token_maps: (T, h, w) attention per token position, position 0 = SOT. Either the full
            77-token sequence or just ``[SOT, prompt tokens..., EOT]``; maps after EOT are ignored.
        words: token positions of each word of the edit text, in order, e.g. ``[[1], [2, 3]]``.
            Positions start at 1; EOT is at ``max position + 1``.
        latent_size: (H, W) of the output maps and mask.
        P: position vector from an earlier call (``result.P``, length W + 2). When given, Eq. 6-8
            are skipped and P is reused (the paper computes P at the first step only).
        gamma1, gamma2: Eq. 8 thresholds. threshold: Eq. 9 binarisation threshold phi.
        upsample: "bicubic" (Pillow's, the authors') or "bilinear" (no overshoot, slightly softer).
        blur: "binomial" (OpenCV's 5-tap [1, 4, 6, 4, 1] / 16, the authors') or "gaussian"
            (``blur_kernel`` taps, ``blur_sigma``; None -> OpenCV's formula, 1.1 for 5).
        blur_times: how often the blur is applied (the authors: twice).
        strict: use the paper's strict inequalities in Eq. 8 instead of the authors' inclusive ones.
        exact_authors: also reproduce the authors' uint8 steps (needs the default upsample and blur).
    """
    if not words or any(not word for word in words):
        raise ValueError("words must be a non-empty list of non-empty position lists")
    if min(p for word in words for p in word) < 1:
        raise ValueError("word positions start at 1 (position 0 is the start token)")
    if upsample not in UPSAMPLERS:
        raise ValueError(f"upsample '{upsample}' is not one of {', '.join(UPSAMPLERS)}")
    if blur not in BLURS:
        raise ValueError(f"blur '{blur}' is not one of {', '.join(BLURS)}")
    if exact_authors and (upsample, blur) != ("bicubic", "binomial"):
        raise ValueError("exact_authors reproduces the authors' bicubic resize and binomial blur: "
                         f"it cannot be combined with upsample='{upsample}', blur='{blur}'")
    eot = max(p for word in words for p in word) + 1
    if eot >= token_maps.shape[0]:
        raise ValueError(f"EOT position {eot} is outside the {token_maps.shape[0]} token maps")
    n_words = len(words)
    n = n_words + 2
    H, W = latent_size

    # 1. word maps at latent size, normalised; SOT inverted
    raw = _word_token_maps(token_maps.float(), words)                       # (n, h, w)
    maps = _normalised_maps(raw, (H, W), upsample, exact_authors)
    flat = maps.flatten(1)                                                   # (n, H*W)

    index = similarity = None
    if P is None:
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        if n_words == 1:
            # one word: its map is the refined map (authors' special case), no Eq. 6-8 needed
            P = torch.zeros(n, dtype=torch.float32, device=maps.device)
            P[1] = 1
            index = torch.ones((), dtype=torch.long, device=maps.device)
            similarity = unit @ unit[1]
        else:
            # Eq. 6: index map = word most similar to the inverted SOT map; SOT and EOT not candidates
            index = (unit[1:n - 1] @ unit[0]).argmax() + 1                  # tensor, no host sync
            # Eq. 7: similarity of every map with the index map
            similarity = unit @ unit.index_select(0, index.view(1))[0]
            # Eq. 8: +1 = same concept as the index, -1 = unrelated, 0 = undecided; SOT/EOT 0
            if strict:
                pos, neg = similarity > gamma1, similarity < gamma2
            else:
                pos, neg = similarity >= gamma1, similarity <= gamma2
            P = pos.float() - neg.float()
            P[0] = 0
            P[-1] = 0
    else:
        P = P.to(device=maps.device, dtype=torch.float32)
        if P.shape != (n,):
            raise ValueError(f"P has shape {tuple(P.shape)}, expected ({n},) for {n_words} words + SOT/EOT")

    # Eq. 9: aggregate. Means via weight vectors (no host-side branching on P); an empty group gives
    # an all-zero mean, which min-max maps to zeros, i.e. "subtract only when there are -1 maps".
    w_pos = (P == 1).float()
    w_neg = (P == -1).float()
    pos_mean = (w_pos @ flat) / w_pos.sum().clamp_min(1)
    neg_mean = (w_neg @ flat) / w_neg.sum().clamp_min(1)
    refined = (minmax(pos_mean, 1) - minmax(neg_mean, 1)).clamp_min(0).view(1, H, W)

    # Eq. 9: filtering (applied blur_times, as the authors do), normalise, binarise
    soft = refined
    for _ in range(blur_times):
        soft = binomial_blur(soft) if blur == "binomial" else gaussian_blur(soft, blur_kernel, blur_sigma)
    soft = minmax(soft)[0]
    return MaskResult(P=P, index=index, similarity=similarity, word_maps=maps, soft=soft,
                      mask=soft > threshold)
