"""DiffEdit's mask on constructed noise predictions with a known answer."""
import torch

from mask.diffedit import diffedit_mask


def test_region_where_predictions_differ_is_the_mask():
    h = w = 16
    region = torch.zeros(h, w, dtype=torch.bool)
    region[4:12, 2:10] = True  # 64 of 256 pixels
    src = torch.randn(3, 4, h, w, generator=torch.Generator().manual_seed(0))
    # the edit prediction differs by 1.0 inside the region and 0.1 outside, in every sample and channel,
    # with alternating signs (the mask uses |difference|)
    sign = torch.where(torch.arange(4) % 2 == 0, 1.0, -1.0)[None, :, None, None]
    edit = src + sign * torch.where(region, 1.0, 0.1)
    res = diffedit_mask(src, edit)
    # mean difference m = (64*1 + 192*0.1)/256 = 0.325; clamp at 3m = 0.975 -> the region saturates at 1,
    # outside 0.1/0.975 = 0.1026; binarised at 0.5
    assert torch.equal(res.mask, region)
    assert torch.allclose(res.soft[region], torch.ones(()))
    assert torch.allclose(res.soft[~region], torch.full((), 0.1 / 0.975))


def test_samples_are_averaged_before_thresholding():
    h = w = 8
    src = torch.zeros(2, 1, h, w)
    edit = torch.zeros(2, 1, h, w)
    edit[0, 0, :, :4] = 1.0   # sample 0 sees the left half change
    edit[1, 0, :2, :] = 1.0   # sample 1 sees the top rows change
    res = diffedit_mask(src, edit, ratio=1.0)
    # averaged map: 1 where both (top-left 2x4), 0.5 where one, 0 where none; mean m = (8*1 + 24*0.5)/64
    m = (8 * 1 + 24 * 0.5) / 64
    expected_soft = (edit.mean(0)[0].clamp(0, m) / m)
    assert torch.allclose(res.soft, expected_soft)
    assert torch.equal(res.mask, expected_soft > 0.5)


def test_identical_predictions_give_an_empty_mask_without_nan():
    x = torch.randn(2, 4, 8, 8)
    res = diffedit_mask(x, x.clone())
    assert not res.mask.any() and torch.isfinite(res.soft).all()
