"""instant_mask against an independent re-implementation of the authors' mask path (tests/authors_mask.py:
numpy, Pillow, OpenCV) on 240 generated attention-map cases.

The cases: one-word edit texts; texts with multi-token, hyphenated and punctuated words (``t-shirt,``,
``Shih-Tzu``); blobs touching the border; a word whose Eq. 7 similarity lies within 1e-3 of gamma1 (0.9)
or gamma2 (0.6) (24 cases, 10 %: there any float path must disagree now and then with the authors'
rounding); flat maps. Bars: P identical in >= 97 % of the cases and mask IoU median >= 0.995 at
the defaults (floats where the authors round to uint8), >= 99 % and >= 0.999 with ``exact_authors``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mask import instant_mask
from model.tokenizer import Tokenizer
from tests.clip_vocab import real_clip_vocab_folder

cv2 = pytest.importorskip("cv2", reason="the oracle needs OpenCV: pip install opencv-python-headless")
from tests.authors_mask import authors_mask  # noqa: E402  (imports cv2)

G, LATENT = 16, 64
ONE_WORD = ["dog", "raccoon", "Shih-Tzu", "t-shirt", "ping-pong", "dog,", "axolotl", "Skateboarding"]
TEXTS = ["a dog", "a red t-shirt", "a ping-pong table", "a fluffy Shih-Tzu", "a dog, sleeping",
         "go skateboarding", "a raccoon wearing a hat", "a Shih-Tzu in a t-shirt, smiling",
         "an axolotl, please", "a black-and-white cat", "two ping-pong balls on a table",
         "a kumquat"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_folder(real_clip_vocab_folder(tmp_path_factory))


def blob(rng, border=False):
    """A Gaussian bump on the 16x16 grid; with ``border`` its centre lies on the grid's edge."""
    cy, cx = rng.uniform(0, G - 1, 2)
    if border:
        edge = rng.integers(4)
        cy, cx = [(0, cx), (G - 1, cx), (cy, 0), (cy, G - 1)][edge]
    s = rng.uniform(1.0, 3.5)
    y, x = np.mgrid[0:G, 0:G]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))


def word_maps(rng, n_words, border):
    """Raw maps of [SOT, word..., EOT]: SOT low on the objects, each word related to an object or not."""
    objects = [blob(rng, border and k == 0) for k in range(rng.integers(1, 3))]
    fg = np.clip(sum(objects), 0, 1)
    rows = [0.9 - 0.8 * fg + 0.05 * rng.random((G, G))]
    for _ in range(n_words):
        kind = rng.integers(3)
        if kind == 0:    # the object itself, scaled, with a little noise
            m = objects[rng.integers(len(objects))] * rng.uniform(0.2, 2) + rng.uniform(0, 0.3) * rng.random((G, G))
        elif kind == 1:  # something else
            m = blob(rng) + rng.uniform(0, 0.5) * rng.random((G, G))
        else:            # diffuse
            m = rng.random((G, G)) * rng.uniform(0.1, 1)
        rows.append(m * rng.uniform(0.01, 0.2))
    rows.append(rng.random((G, G)) * 0.1 + 0.2 * fg)
    return [r.astype(np.float32) for r in rows]


def token_maps(rng, tok, text, rows):
    """(77, G, G) maps per token position: a word's tokens vary around its map (their mean is not it),
    padding after EOT random (must be ignored)."""
    words = tok.words(text)
    out = np.zeros((77, G, G), np.float32)
    out[0] = rows[0]
    for (_, positions), m in zip(words, rows[1:-1]):
        for p in positions:
            out[p] = m * rng.uniform(0.5, 1.5)
    eot = words[-1][1][-1] + 1
    out[eot] = rows[-1]
    out[eot + 1:] = rng.random((76 - eot, G, G))
    return torch.from_numpy(out), [pos for _, pos in words]


def set_similarity(maps, positions, target, rng):
    """Mix a non-index word towards another map until its Eq. 7 similarity is ``target``, as the
    authors compute it (``exact_authors``, which equals the oracle on every case here)."""
    res = instant_mask(maps, positions, (LATENT, LATENT), exact_authors=True)
    index = int(res.index)
    k = int(rng.choice([w for w in range(1, len(positions) + 1) if w != index]))
    base = maps[positions[index - 1]].mean(0)
    other = torch.from_numpy(blob(rng).astype(np.float32)) * base.max()
    lo, hi = 0.0, 1.0
    for _ in range(40):
        t = (lo + hi) / 2
        for p in positions[k - 1]:
            maps[p] = (1 - t) * base + t * other
        res = instant_mask(maps, positions, (LATENT, LATENT), exact_authors=True)
        if int(res.index) != index:
            return False
        s = float(res.similarity[k])
        if abs(s - target) < 1e-4:
            return True
        lo, hi = (t, hi) if s > target else (lo, t)
    return False


def make_cases(tok, n=240, seed=0):
    """(kind, text, maps (77, G, G)) cases; near-threshold cases within 1e-3 of gamma1 / gamma2."""
    rng = np.random.default_rng(seed)
    kinds = ["one-word"] * 40 + ["text"] * 106 + ["border"] * 40 + ["near-0.9"] * 12 + ["near-0.6"] * 12 + ["flat"] * 30
    cases = []
    for kind in kinds[:n]:
        while True:
            text = str(rng.choice(ONE_WORD if kind == "one-word" else TEXTS))
            rows = word_maps(rng, len(text.split()), border=kind == "border")
            maps, positions = token_maps(rng, tok, text, rows)
            if kind == "flat":  # a flat word, SOT or EOT map (zero or constant)
                which = int(rng.integers(len(positions) + 2))
                value = float(rng.choice([0.0, 0.05]))
                targets = [0] if which == 0 else [positions[-1][-1] + 1] if which == len(positions) + 1 \
                    else positions[which - 1]
                for p in targets:
                    maps[p] = value
            if kind.startswith("near"):
                gamma = float(kind.split("-")[1])
                if not set_similarity(maps, positions, gamma + rng.uniform(-9e-4, 9e-4), rng):
                    continue
            cases.append((kind, text, maps))
            break
    return cases


def iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def agreement(tok, cases, **options):
    """Fraction of cases with identical P, the mask IoUs, and how many cases the authors' code leaves
    NaN (flat-map 0 / 0) or without an index; those are not compared (our results stay finite)."""
    same_P, ious, nan_cases, by_kind = [], [], 0, {}
    for kind, text, maps in cases:
        ref = authors_mask(maps.numpy(), text, tok.tok)
        ours = instant_mask(maps, [pos for _, pos in tok.words(text)], (LATENT, LATENT), **options)
        assert torch.isfinite(ours.soft).all() and torch.isfinite(ours.P).all()
        if ref.undefined:
            continue
        if ref.nan:
            nan_cases += 1
            continue
        P_ref = [0, 1, 0] if ref.P is None else ref.P
        same_P.append([int(v) for v in ours.P.tolist()] == P_ref)
        ious.append(iou(ours.mask.numpy(), ref.mask))
        by_kind.setdefault(kind, []).append(same_P[-1])
    print("P identical by kind:", {k: f"{np.mean(v):.2f} of {len(v)}" for k, v in by_kind.items()})
    return float(np.mean(same_P)), np.array(ious), nan_cases


@pytest.fixture(scope="module")
def cases(tok):
    return make_cases(tok)


def test_cases_cover_the_brief(tok, cases):
    assert len(cases) >= 200
    kinds = {k for k, _, _ in cases}
    assert kinds == {"one-word", "text", "border", "near-0.9", "near-0.6", "flat"}
    texts = {t for _, t, _ in cases}
    assert any("-" in t and "," in t for t in texts) and any(len(t.split()) == 1 for t in texts)
    # near-threshold cases really sit within 1e-3 of a threshold
    for kind, text, maps in cases:
        if kind.startswith("near"):
            sims = instant_mask(maps, [p for _, p in tok.words(text)], (LATENT, LATENT),
                                exact_authors=True).similarity
            assert (sims - float(kind.split("-")[1])).abs().min() <= 1e-3


@pytest.mark.parametrize("options, min_same_P, min_median_iou", [
    # the defaults miss 6 of these 221 (near-threshold cases, where the authors' later uint8 roundings
    # decide, and an Eq. 6 near-tie): 97.3 %, at the bar; docs/method-notes.md has other case seeds
    ({}, 0.97, 0.995),
    ({"exact_authors": True}, 0.99, 0.999),
])
def test_agrees_with_authors_code(tok, cases, options, min_same_P, min_median_iou):
    same_P, ious, nan_cases = agreement(tok, cases, **options)
    print(f"\n{options or 'defaults'}: P identical {same_P:.3f} over {len(ious)} cases, IoU median "
          f"{np.median(ious):.4f}, mean {ious.mean():.4f}, p5 {np.percentile(ious, 5):.4f}; "
          f"{nan_cases} cases NaN in the authors' code")
    assert len(ious) >= 200
    assert same_P >= min_same_P
    assert np.median(ious) >= min_median_iou
    assert nan_cases >= 1  # the flat cases do reach the authors' 0 / 0


def test_old_choices_disagree_more(tok, cases):
    """The bilinear / sigma-1.1 options are what the defaults used to be: they agree less (guards the
    test against cases too easy to tell the filters apart)."""
    new_P, new_iou, _ = agreement(tok, cases)
    old_P, old_iou, _ = agreement(tok, cases, upsample="bilinear", blur="gaussian")
    assert old_P < new_P and np.median(old_iou) < np.median(new_iou)
