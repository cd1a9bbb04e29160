"""mask/filters.py against Pillow and OpenCV themselves: the resize the authors' Image.resize does and
the blur their cv2.GaussianBlur((5, 5), 0) does."""
import numpy as np
import pytest
import torch
from PIL import Image

from mask.filters import binomial_blur, gaussian_blur, gaussian_kernel1d, pil_resize

# (h, w) -> (H, W): the UNet grids' 16->64, 8->32, 16->32, and other ratios, down- and non-square
SIZES = [((16, 16), (64, 64)), ((8, 8), (32, 32)), ((16, 16), (32, 32)), ((32, 32), (64, 64)),
         ((16, 16), (48, 48)), ((5, 7), (64, 40)), ((16, 16), (17, 63)), ((16, 16), (8, 8)),
         ((20, 30), (7, 11)), ((16, 16), (16, 64))]


def maps(rng, shape):
    """Smooth, random, binary-blob and single-pixel maps at several magnitudes."""
    h, w = shape
    yield rng.random(shape).astype(np.float32)
    yield (rng.random(shape) * 10 ** rng.uniform(-4, 3)).astype(np.float32)
    yield (rng.random(shape) > 0.7).astype(np.float32)
    one = np.zeros(shape, np.float32)
    one[rng.integers(h), 0] = 1  # touches the border
    yield one
    y, x = np.mgrid[0:h, 0:w]
    yield np.exp(-((y - h / 3) ** 2 + (x - w) ** 2) / 8).astype(np.float32)


@pytest.mark.parametrize("src, dst", SIZES)
@pytest.mark.parametrize("filt", ["bicubic", "bilinear"])
def test_pil_resize_matches_pillow_float_images(src, dst, filt):
    rng = np.random.default_rng(0)
    mode = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[filt]
    for a in maps(rng, src):
        want = np.asarray(Image.fromarray(a, "F").resize(dst[::-1], mode))
        got = pil_resize(torch.from_numpy(a), dst, filt).numpy()
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))


@pytest.mark.parametrize("src, dst", SIZES)
def test_pil_resize_uint8_matches_pillow_default_filter_exactly(src, dst):
    """The authors' call: Image.fromarray(uint8).resize(size) with Pillow's default filter (BICUBIC)."""
    rng = np.random.default_rng(1)
    for a in maps(rng, src):
        u = (255 * a / a.max()).astype(np.uint8)
        want = np.asarray(Image.fromarray(u).resize(dst[::-1]))
        got = pil_resize(torch.from_numpy(u.astype(np.float32)), dst, uint8=True)
        assert np.array_equal(got.numpy().astype(np.uint8), want)


def test_pil_resize_keeps_batch_dims_and_differs_from_torch_bicubic():
    x = torch.rand(3, 2, 16, 16)
    y = pil_resize(x, (64, 64))
    assert y.shape == (3, 2, 64, 64)
    torch.testing.assert_close(y[1, 0], pil_resize(x[1, 0], (64, 64)))
    torch_bicubic = torch.nn.functional.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
    assert (y - torch_bicubic).abs().max() > 1e-2  # a = -0.75 and edge padding: not the same filter


def test_binomial_blur_is_opencv_sigma0_5x5():
    cv2 = pytest.importorskip("cv2", reason="needs opencv-python-headless")
    rng = np.random.default_rng(2)
    for shape in [(64, 64), (16, 16), (7, 9)]:
        a = rng.random(shape).astype(np.float32)
        a[0, :] = 3  # a bright border row: reflect-101 must match
        want = cv2.GaussianBlur(cv2.GaussianBlur(a, (5, 5), 0), (5, 5), 0)
        got = binomial_blur(binomial_blur(torch.from_numpy(a))).numpy()
        assert np.abs(got - want).max() <= 1e-6
    # by hand: an impulse gives the outer product of [1, 4, 6, 4, 1] / 16
    x = torch.zeros(9, 9)
    x[4, 4] = 1
    k = torch.tensor([1, 4, 6, 4, 1]) / 16
    torch.testing.assert_close(binomial_blur(x)[2:7, 2:7], torch.outer(k, k))


def test_gaussian_option_is_opencv_with_explicit_sigma():
    cv2 = pytest.importorskip("cv2", reason="needs opencv-python-headless")
    a = np.random.default_rng(3).random((32, 32)).astype(np.float32)
    want = cv2.GaussianBlur(a, (5, 5), 1.1)
    got = gaussian_blur(torch.from_numpy(a), 5, 1.1).numpy()
    assert np.abs(got - want).max() <= 1e-6
    assert not torch.allclose(gaussian_kernel1d(5), torch.tensor([1, 4, 6, 4, 1]) / 16, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pil_resize_on_cuda_matches_cpu():
    x = torch.rand(4, 16, 16)
    for uint8 in (False, True):
        xx = (x * 255).floor() if uint8 else x
        torch.testing.assert_close(pil_resize(xx.cuda(), (64, 64), uint8=uint8).cpu(),
                                   pil_resize(xx, (64, 64), uint8=uint8), atol=1e-5, rtol=0)
