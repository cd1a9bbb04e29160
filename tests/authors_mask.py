"""Test-only oracle: the InstDiffEdit authors' mask path (Eq. 6-9), re-implemented plainly with
numpy, Pillow and OpenCV, the libraries their code calls, step for step as docs/method-notes.md
describes it. It shares no code with mask/.

Input: raw per-token maps (T, h, w) with SOT at 0, the edit text and a transformers CLIPTokenizer.
Output: the Eq. 8 position vector (None for a one-word text, which skips Eq. 6-8) and the 64x64
binary mask. Where the authors divide 0 by 0 (a flat map in a min-max), the NaN is kept, as in
their code: ``AuthorsMask.nan`` says so, and the mask of a NaN map is empty.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageChops


@dataclass
class AuthorsMask:
    P: list[int] | None     # [0, words..., 0]; None for a single word
    mask: np.ndarray        # (64, 64) bool
    nan: bool               # a 0 / 0 happened in Eq. 9 (their mask is then empty)
    undefined: bool = False  # no word has a positive similarity to SOT: their Eq. 6 has no index


def _group_words(ids: list[int], text: str, clip_tok, maps: np.ndarray) -> list[np.ndarray]:
    """Raw map per [SOT, word..., EOT]: the decoded tokens are joined until they spell the next
    space-separated word (case-insensitive); the word's map is the mean of those tokens' maps."""
    words = text.split(" ")
    if len(ids) <= len(words) + 2:  # one token per word
        return [maps[i] for i in range(len(ids))]
    out, j, spelled, pending = [maps[0]], 0, "", []
    for i in range(1, len(ids) - 1):
        piece = clip_tok.decode(int(ids[i]))
        if piece == words[j]:
            out.append(maps[i])
            j += 1
            continue
        spelled += piece
        pending.append(maps[i])
        if spelled.lower() == words[j].lower():
            out.append(np.mean(np.stack(pending), 0, dtype=np.float32))
            spelled, pending = "", []
            j += 1
    out.append(maps[len(ids) - 1])
    return out


def _to_uint8_image(m: np.ndarray, size: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 of a zero map: NaN, cast to 0
        scaled = (np.float32(255) * m / m.max()).astype(np.uint8)
    return Image.fromarray(scaled).resize((size, size))  # Pillow's default filter for 'L': BICUBIC


def _renormalise(img: Image.Image) -> np.ndarray:
    """min-max of the image in [0, 1], times 255, truncated to uint8."""
    x = np.asarray(img).astype(np.float32) / np.float32(255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return ((x - x.min()) / (x.max() - x.min()) * np.float32(255)).astype(np.uint8)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _minmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x - x.min()) / (x.max() - x.min())


def authors_mask(token_maps: np.ndarray, text: str, clip_tok, threshold: float = 0.2,
                 gamma1: float = 0.9, gamma2: float = 0.6, size: int = 64) -> AuthorsMask:
    ids = clip_tok.encode(text)  # with start and end tokens
    raw = _group_words(ids, text, clip_tok, np.asarray(token_maps, dtype=np.float32))
    images = [_to_uint8_image(m, size) for m in raw]
    images[0] = ImageChops.invert(images[0])  # SOT: 255 - x
    maps = [_renormalise(im) for im in images]
    undefined = False
    if len(maps) == 3:  # one word: its map is the refined map
        P, refined = None, maps[1].astype(np.float32) / np.float32(255)
    else:
        sims_sot = [_cosine(m, maps[0]) for m in maps[1:-1]]
        best, index = 0.0, None
        for k, s in enumerate(sims_sot):  # first word with the largest positive similarity
            if s > best:
                best, index = s, k
        if index is None:
            return AuthorsMask(None, np.zeros((size, size), bool), False, undefined=True)
        sims = [1.0 if k == index else _cosine(m, maps[1 + index]) for k, m in enumerate(maps[1:-1])]
        P = [0] + [1 if s >= gamma1 else -1 if s <= gamma2 else 0 for s in sims] + [0]
        as_float = [m.astype(np.float32) / np.float32(255) for m in maps]
        objects = sum(f for f, p in zip(as_float, P) if p == 1) / np.float32(P.count(1))
        refined = _minmax(objects)
        if P.count(-1):
            back = sum(f for f, p in zip(as_float, P) if p == -1) / np.float32(P.count(-1))
            refined = np.maximum(refined - _minmax(back), np.float32(0))
    soft = cv2.GaussianBlur(refined, (5, 5), 0)
    soft = cv2.GaussianBlur(soft, (5, 5), 0)
    soft = _minmax(soft)
    nan = bool(np.isnan(soft).any())
    with np.errstate(invalid="ignore"):
        mask = soft > threshold
    return AuthorsMask(P, mask, nan, undefined)
