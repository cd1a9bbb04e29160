"""Known-answer tests for mask/ (AttentionStore, Eq. 6-9, Gaussian blur).

Expected values come from the construction of the inputs (region sizes, cosine similarity of
indicator maps by formula, hand-derived 1-D profiles), not from running the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mask import AttentionStore, default_sigma, gaussian_blur, gaussian_kernel1d, instant_mask, minmax

G = 16  # attention grid


def box(r0, r1, c0, c1, size=G):
    """Indicator of rows r0..r1, cols c0..c1 (inclusive)."""
    m = torch.zeros(size, size)
    m[r0:r1 + 1, c0:c1 + 1] = 1
    return m


# ---- "a big red car" scene (16x16 grid) --------------------------------------------------------
# A: the car (rows 4-11, cols 4-11, 64 px). SOT lights the complement of A, so inverted SOT = 1_A.
# car = 1_A with the corner pixel p = (11, 11) at 0.5; red = A without col 11 (A', 56 px);
# big = A plus rows 12-14 (C, 112 px); a = rows 0-1 (B, 32 px, disjoint); EOT = 1_A (the best
# match of all: it must be excluded from Eq. 6).
A = box(4, 11, 4, 11)
A_RED = box(4, 11, 4, 10)
C = A + box(12, 14, 0, 15)
B = box(0, 1, 0, 15)
CAR = A.clone()
CAR[11, 11] = 0.5
WORDS = [[1], [2], [3], [4]]  # a, big, red, car; EOT at 5


def scene_maps():
    g = torch.Generator().manual_seed(0)
    rows = [
        0.9 - 0.7 * A,        # SOT (affine in 1 - 1_A: min-max makes it exactly 1 - 1_A)
        0.01 + 0.05 * B,      # a
        0.02 + 0.03 * C,      # big
        0.01 + 0.07 * A_RED,  # red
        (15 + 240 * CAR) / 256,  # car (levels 15, 135, 255 of 255 exactly, through the uint8 cast too)
        0.02 + 0.3 * A,       # EOT
    ]
    pads = torch.rand(3, G, G, generator=g)  # padding tokens after EOT: must be ignored
    return torch.cat([torch.stack(rows), pads])


def expected_scene_similarity():
    # cosine of non-negative maps = <x, y> / (|x| |y|); car has |car|^2 = 63 + 0.25
    car_sq = 63.25
    a_car = 63.5  # <1_A, car> = 63 * 1 + 0.5
    return torch.tensor([
        a_car / math.sqrt(64 * car_sq),     # inverted SOT = 1_A
        0.0,                                # a: disjoint
        a_car / math.sqrt(112 * car_sq),    # big: C contains A
        56 / math.sqrt(56 * car_sq),        # red: A' misses col 11, where p lies
        1.0,                                # car: the index itself
        a_car / math.sqrt(64 * car_sq),     # EOT = 1_A
    ])


def test_scene_index_similarity_and_P_exact():
    res = instant_mask(scene_maps(), WORDS, (G, G))
    # Eq. 6: cos with 1_A: car 63.5/sqrt(64*63.25)=0.998 > red 0.935 > big 0.756 > a 0; EOT (1.0) excluded
    assert res.index.item() == 4
    # Eq. 7
    torch.testing.assert_close(res.similarity, expected_scene_similarity(), atol=1e-5, rtol=0)
    # Eq. 8: a 0 <= 0.6 -> -1; big 0.754 in between -> 0; red 0.941 >= 0.9 -> 1; car 1; SOT/EOT 0
    assert torch.equal(res.P, torch.tensor([0., -1., 0., 1., 1., 0.]))
    # word maps: min-max normalised, SOT inverted
    torch.testing.assert_close(res.word_maps[0], A)
    torch.testing.assert_close(res.word_maps[1], B)
    torch.testing.assert_close(res.word_maps[4], CAR)
    assert res.mask.dtype == torch.bool and res.mask.shape == (G, G)
    assert res.soft.min() >= 0 and res.soft.max() <= 1


def test_scene_mask_at_latent_size_is_region_A():
    res = instant_mask(scene_maps(), WORDS, (64, 64))
    assert torch.equal(res.P, torch.tensor([0., -1., 0., 1., 1., 0.]))
    assert res.word_maps.shape == (6, 64, 64)
    a64 = A.repeat_interleave(4, 0).repeat_interleave(4, 1).bool()
    b64 = B.repeat_interleave(4, 0).repeat_interleave(4, 1).bool()

    def dilate(m, r):
        return F.max_pool2d(m[None, None].float(), 2 * r + 1, 1, r)[0, 0].bool()

    def erode(m, r):
        return ~dilate(~m, r)

    m = res.mask
    # Upsampling puts the 16->64 edge midway in a 4-px ramp and the double blur widens it:
    # the 0.2 contour sits ~2 px outside A's boundary (see the 1-D derivation in the one-word test).
    assert not (m & b64).any()                         # the P=-1 word's region is cut out
    assert (m | ~erode(a64, 2)).all()                  # A's interior is covered
    assert not (m & ~dilate(a64, 3)).any()             # nothing far outside A
    ref = dilate(a64, 2)
    iou = (m & ref).sum() / (m | ref).sum()
    assert iou >= 0.9


def test_P_reuse_keeps_given_P_and_uses_it():
    first = instant_mask(scene_maps(), WORDS, (G, G))
    # later step, different maps: P is not recomputed
    other = scene_maps().flip(-1)
    res = instant_mask(other, WORDS, (G, G), P=first.P)
    assert torch.equal(res.P, first.P)
    assert res.index is None and res.similarity is None
    # a P that only keeps 'a' makes the mask follow B (rows 0-1), not the car
    P = torch.tensor([0., 1., 0., 0., 0., 0.])
    res = instant_mask(scene_maps(), WORDS, (G, G), P=P)
    assert torch.equal(res.P, P)
    assert res.mask[0:2].all()
    assert not res.mask[4:].any()
    with pytest.raises(ValueError):
        instant_mask(scene_maps(), WORDS, (G, G), P=torch.zeros(4))


def test_strict_inequalities_option():
    # red's similarity is moved to exactly gamma1 by choosing gamma1 = its formula value
    s_red = 56 / math.sqrt(56 * 63.25)
    inclusive = instant_mask(scene_maps(), WORDS, (G, G), gamma1=s_red - 1e-7)
    strict = instant_mask(scene_maps(), WORDS, (G, G), gamma1=s_red + 1e-7, strict=True)
    assert inclusive.P[3] == 1 and strict.P[3] == 0


def test_multi_token_word_uses_mean_of_raw_maps():
    # "a dragonfly" -> words [[1], [2, 3]], EOT 4. Token 2 lights L, token 3 lights R three times
    # as strongly; their mean 0.05 L + 0.2 R normalises to L: 1/4, R: 1, elsewhere 0, which is
    # neither part alone nor the mean of the normalised parts (1/2, 1/2). As in the authors' uint8
    # cast of 255 * map / max, L's 63.75 is truncated to 63 of 255.
    L = box(0, 15, 0, 5)
    R = box(0, 15, 10, 15)
    maps = torch.stack([1 - L - R, 0.02 * B, 0.1 * L, 0.4 * R, 0.5 * L, torch.rand(G, G)])
    res = instant_mask(maps, [[1], [2, 3]], (G, G))
    torch.testing.assert_close(res.word_maps[2], L * (63 / 255) + R)
    assert res.P.shape == (4,)
    # non-contiguous positions take the same mean
    maps2 = torch.stack([1 - L - R, 0.1 * L, 0.02 * B, 0.4 * R, 0.5 * L])
    res2 = instant_mask(maps2, [[1, 3], [2]], (G, G))
    torch.testing.assert_close(res2.word_maps[1], L * (63 / 255) + R)


def _ref_profile_1d():
    """Pure-python 1-D reference: a 16-px step (first 8 on) -> bilinear x4 (half-pixel centres,
    edge clamp) -> 5-tap Gaussian (sigma 1.1) twice with reflect-101 borders -> min-max."""
    src = [1.0] * 8 + [0.0] * 8
    up = []
    for x in range(64):
        s = (x + 0.5) / 4 - 0.5
        i0 = math.floor(s)
        f = s - i0
        a, b = src[min(max(i0, 0), 15)], src[min(max(i0 + 1, 0), 15)]
        up.append(a * (1 - f) + b * f)
    k = [math.exp(-(i - 2) ** 2 / (2 * 1.1 ** 2)) for i in range(5)]
    k = [v / sum(k) for v in k]

    def refl(i):
        return -i if i < 0 else (2 * 63 - i if i > 63 else i)

    prof = up
    for _ in range(2):
        prof = [sum(k[j] * prof[refl(x + j - 2)] for j in range(5)) for x in range(64)]
    lo, hi = min(prof), max(prof)
    return [(v - lo) / (hi - lo) for v in prof]


def test_one_word_uses_word_map_directly():
    # the bilinear / sigma-1.1 options, against a hand-written 1-D reference
    # "car": maps SOT, car, EOT. The SOT map is deliberately unrelated: with one word P is [0, 1, 0]
    # and the refined map is the car map itself (left half of the grid).
    left = box(0, 15, 0, 7)
    maps = torch.stack([B, 0.05 * left + 0.01, torch.ones(G, G) * 0.3])
    res = instant_mask(maps, [[1]], (64, 64), upsample="bilinear", blur="gaussian")
    assert torch.equal(res.P, torch.tensor([0., 1., 0.]))
    assert res.index.item() == 1
    expected = torch.tensor(_ref_profile_1d()).expand(64, 64)
    torch.testing.assert_close(res.soft, expected, atol=1e-5, rtol=0)
    # By hand: upsampled edge ramp 0.875/0.625/0.375/0.125 at cols 30-33; after the double blur the
    # profile is point-symmetric about 31.5, g(30) = 0.781 so g(33) = 0.219 > 0.2, and g(29) = 0.905
    # so g(34) = 0.095 < 0.2: the mask is exactly columns 0..33.
    want = torch.zeros(64, 64, dtype=torch.bool)
    want[:, :34] = True
    assert torch.equal(res.mask, want)


@pytest.mark.parametrize("value", [0.0, 0.37])
def test_flat_maps_give_no_nan(value):
    maps = torch.full((6, G, G), value)
    res = instant_mask(maps, WORDS, (64, 64))
    for t in (res.similarity, res.word_maps, res.soft, res.P):
        assert torch.isfinite(t).all()
    assert not res.mask.any()
    # a constant map blurred picks up float rounding; min-max must still call it flat
    assert torch.equal(minmax(gaussian_blur(torch.full((1, 64, 64), 0.3)))[0], torch.zeros(64, 64))


def test_gaussian_kernel_matches_opencv_formula():
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    assert sigma == pytest.approx(1.1)
    assert default_sigma(5) == pytest.approx(1.1)
    raw = [math.exp(-(i - 2) ** 2 / (2 * sigma ** 2)) for i in range(5)]
    want = torch.tensor([v / sum(raw) for v in raw])
    k = gaussian_kernel1d(5)
    torch.testing.assert_close(k, want)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(gaussian_kernel1d(5, 2.0),
                               torch.tensor([math.exp(-(i - 2) ** 2 / 8) for i in range(5)]) /
                               sum(math.exp(-(i - 2) ** 2 / 8) for i in range(5)))


def test_gaussian_blur_separable_and_reflect101_border():
    k = gaussian_kernel1d(5)
    x = torch.zeros(12, 12)
    x[6, 6] = 1
    torch.testing.assert_close(gaussian_blur(x)[4:9, 4:9], torch.outer(k, k))
    # reflect-101 mirrors about the edge pixel: an impulse in column 1 reappears at column -1, so
    # column 0 receives k[1] + k[3] (zero or replicate padding would give k[3] only)
    y = torch.zeros(2, 8, 8)
    y[:, :, 1] = 1
    out = gaussian_blur(y)
    torch.testing.assert_close(out[:, :, 0], torch.full((2, 8), (k[1] + k[3]).item()))


# ---- AttentionStore ---------------------------------------------------------------------------
N, HEADS, T = 2, 2, 3
GRID = (4, 4)  # latent 16x16, factor 4
Q = 16


def cond_value(step, layer, rnd, head):
    return 100 * step + 10 * layer + rnd + 0.1 * head


def make_probs(step, layer):
    """[uncond x N, cond x N] batch. Cond entry (r, h, q, t) = cond_value + q/1000 + t; the uncond
    half is 1e3 so any leak shows."""
    p = torch.full((2 * N, HEADS, Q, T), 1e3)
    q = torch.arange(Q, dtype=torch.float32).view(Q, 1) / 1000
    t = torch.arange(T, dtype=torch.float32).view(1, T)
    for r in range(N):
        for h in range(HEADS):
            p[N + r, h] = cond_value(step, layer, r, h) + q + t
    return p


def feed(store, steps):
    names = ["down_blocks.2.attentions.0.transformer_blocks.0.attn2",
             "up_blocks.1.attentions.2.transformer_blocks.0.attn2"]
    for s in range(steps):
        for layer, name in enumerate(names):
            if store.wants(name, GRID):
                store.record(name, make_probs(s, layer))
        # another resolution: not wanted, and would spoil the average if recorded
        assert not store.wants("mid_block.attentions.0.transformer_blocks.0.attn2", (2, 2))
        store.end_step()


def expected_step_map(step):
    # mean over 2 layers, 2 rounds, 2 heads of 100 s + 10 l + r + 0.1 h = 100 s + 5 + 0.5 + 0.05
    c = sum(cond_value(step, l, r, h) for l in range(2) for r in range(N) for h in range(HEADS)) / 8
    assert c == pytest.approx(100 * step + 5.55)
    q = torch.arange(Q, dtype=torch.float32).view(GRID) / 1000
    return torch.stack([c + q + t for t in range(T)])  # (T, 4, 4), row-major query layout


def test_store_running_mean():
    store = AttentionStore((16, 16), rounds=N, cfg=True, mode="running")
    assert store.wants("x.attn2", GRID) and not store.wants("x.attn2", (8, 8))
    feed(store, 1)
    torch.testing.assert_close(store.maps(), expected_step_map(0))
    two_steps = AttentionStore((16, 16), rounds=N, cfg=True, mode="running")
    feed(two_steps, 2)
    assert two_steps.num_steps == 2
    torch.testing.assert_close(two_steps.maps(), (expected_step_map(0) + expected_step_map(1)) / 2)
    assert two_steps.maps().dtype == torch.float32 and two_steps.maps().shape == (T, 4, 4)


def test_store_instant_mode_and_reset():
    store = AttentionStore((16, 16), rounds=N, cfg=True, mode="last")
    feed(store, 2)
    torch.testing.assert_close(store.maps(), expected_step_map(1))
    store.reset()
    with pytest.raises(RuntimeError):
        store.maps()
    feed(store, 1)
    torch.testing.assert_close(store.maps(), expected_step_map(0))


def test_store_without_cfg_and_checks():
    store = AttentionStore((16, 16), rounds=N, cfg=False)
    p = make_probs(0, 0)[N:]  # only the conditional rows
    store.record("a.attn2", p)
    store.end_step()
    store.end_step()  # empty step: ignored
    assert store.num_steps == 1
    c = sum(cond_value(0, 0, r, h) for r in range(N) for h in range(HEADS)) / 4
    q = torch.arange(Q, dtype=torch.float32).view(GRID) / 1000
    torch.testing.assert_close(store.maps(), torch.stack([c + q + t for t in range(T)]))
    with pytest.raises(ValueError):
        store.record("a.attn2", make_probs(0, 0))  # CFG-sized batch for a no-CFG store
    filtered = AttentionStore((16, 16), rounds=N, layer_filter=lambda n: n.startswith("up_"))
    assert not filtered.wants("down_blocks.2.x.attn2", GRID)
    assert filtered.wants("up_blocks.1.x.attn2", GRID)


def test_store_feeds_instant_mask():
    # end-to-end shape check: store maps (77 tokens at 16x16) -> mask at 64x64
    store = AttentionStore((64, 64), rounds=1, cfg=True)
    probs = torch.rand(2, 8, 256, 77).softmax(-1)
    store.record("up.attn2", probs)
    store.end_step()
    res = instant_mask(store.maps(), [[1], [2]], (64, 64))
    assert res.mask.shape == (64, 64) and res.P.shape == (4,)
