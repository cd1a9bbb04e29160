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


# Half precision against fp32 on the same tiny weights, per component: max |half - fp32| / max |fp32|
# for one call of the text encoder, the UNet and the VAE decoder: a few units of the format's rounding
# (fp16 eps 9.8e-4, bf16 eps 7.8e-3). After the 4-step stage-1 loop: the soft mask's mean absolute
# difference (maps in [0, 1]), the share of mask pixels that flipped, and the mean relative difference of
# the latents where the mask agrees (a flipped pixel takes the other Eq. 5 branch). Guidance 7.5 multiplies
# the UNet's difference (cond - uncond), hence stage-1 bounds about 10x the one-call ones.
# Measured (this CPU): fp16 text 1.1e-3, unet 2.4e-3, vae 1.4e-3, soft 4.2e-3, flipped 1/64, stage1 1.6e-2;
# bf16 text 1.0e-2, unet 1.6e-2, vae 7.7e-3, soft 4.6e-3, flipped 0, stage1 4.2e-2.
HALF_TOL = {torch.float16: {"unet": 5e-3, "vae": 5e-3, "text": 5e-3, "soft": 2e-2, "flipped": 5e-2, "stage1": 4e-2},
            torch.bfloat16: {"unet": 4e-2, "vae": 4e-2, "text": 4e-2, "soft": 2e-2, "flipped": 5e-2, "stage1": 1e-1}}


def _rel(half: torch.Tensor, ref: torch.Tensor) -> float:
    return float((half.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_components_within_tolerance_of_fp32(tiny_sd, pipe, one_thread, dtype):
    half = InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cpu", dtype)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    emb = pipe.encode_text("a red circle")
    t = torch.tensor(500.0)
    with torch.no_grad():
        err = {
            "text": _rel(half.encode_text("a red circle"), emb),
            "unet": _rel(half.unet(z.to(dtype), t, emb.to(dtype)), pipe.unet(z, t, emb)),
            "vae": _rel(half.decode(z.to(dtype)), pipe.decode(z)),
        }
    a, b = pipe.mask(IMG, "a red circle", **OPTS), half.mask(IMG, "a red circle", **OPTS)
    err["soft"] = float((b.soft_latent.float() - a.soft_latent).abs().mean())
    same = (a.mask_latent == b.mask_latent).expand_as(a.latents)  # a flipped pixel takes the other Eq. 5 branch
    err["stage1"] = float((b.latents.float() - a.latents)[same].abs().mean() / a.latents[same].abs().mean())
    err["flipped"] = float((a.mask_latent != b.mask_latent).float().mean())
    assert all(err[k] <= HALF_TOL[dtype][k] for k in err), (err, HALF_TOL[dtype])
    assert half.vae_fp32_decodes == 0  # the tiny VAE does not overflow: the fallback is not what passed
