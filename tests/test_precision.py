"""The CUDA-oriented paths (half precision, torch.compile) exercised on the CPU with the tiny models,
so none of them is left untested where no GPU is available."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instdiffedit import InstDiffEdit
from tests.conftest import TINY_ATTENTION_RES

IMG = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
OPTS = dict(steps=4, attention_res=TINY_ATTENTION_RES, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_edit_runs_and_stays_close_to_fp32(tiny_sd, pipe, one_thread, dtype):
    half = InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cpu", dtype)
    assert {p.dtype for p in half.unet.parameters()} == {dtype}
    a, b = pipe.mask(IMG, "a red circle", **OPTS), half.mask(IMG, "a red circle", **OPTS)
    assert torch.isfinite(b.soft_latent).all()
    assert (a.soft_latent - b.soft_latent.float()).abs().mean() < 0.1  # same map up to half-precision rounding
    res = half.edit(IMG, "a red circle", **OPTS)
    assert res.image.size == IMG.size and np.isfinite(np.asarray(res.image)).all()


@pytest.mark.slow
def test_compiled_unets_give_the_eager_result(tiny_sd, pipe, one_thread):
    pytest.importorskip("torch._inductor")
    compiled = InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cpu", torch.float32,
                                            compile=True)
    eager = pipe.edit(IMG, "a red circle", **OPTS)
    comp = compiled.edit(IMG, "a red circle", **OPTS)
    diff = np.abs(np.asarray(eager.image, dtype=int) - np.asarray(comp.image, dtype=int))
    assert diff.max() <= 2  # float reassociation in fused kernels, at most a rounding step of 8-bit
    assert np.array_equal(np.asarray(eager.mask), np.asarray(comp.mask))
