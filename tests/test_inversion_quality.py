"""toy.inversion_quality: PSNR against OpenCV's, and the invert-then-regenerate loop exact where DDIM
inversion is exact (a model whose noise prediction does not depend on the latent)."""
import copy

import numpy as np
import pytest
import torch

from toy.inversion_quality import main, psnr, reconstruct
from toy.world import benchmark_cases, render


def test_psnr_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, b) == pytest.approx(cv2.PSNR(a, b), rel=1e-9)
    assert psnr(a, a) == float("inf")


class ConstantNoise(torch.nn.Module):
    """Predicts the same noise e everywhere. DDIM then moves along one ray sqrt(a) x0 + sqrt(1 - a) e,
    and inverting then denoising returns the starting latent exactly: any error is the loop's."""

    def __init__(self, shape):
        super().__init__()
        self.e = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def forward(self, x, t, ctx, recorder=None, control=None):
        return self.e.expand(x.shape[0], -1, -1, -1)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_round_trip_is_exact_for_a_latent_independent_model(pipe, one_thread, guidance):
    assert pipe.scheduler_config.prediction_type == "epsilon"  # the ray argument above is for epsilon
    oracle = copy.copy(pipe)
    oracle.unet = ConstantNoise((1, 4, pipe.size // pipe.vae_factor, pipe.size // pipe.vae_factor))
    case = benchmark_cases(1, size=pipe.size)[0]
    out = reconstruct(oracle, render(case.scene, pipe.size)[0], case.source_caption, guidance, steps=20)
    # same decoded image up to one 8-bit level (float rounding of the latent before decoding)
    assert np.abs(out["inversion"].astype(int) - out["vae"]).max() <= 1


def test_command_writes_both_guidances(pipe, tiny_sd, tmp_path, one_thread, capsys):
    assert main(["--model", str(tiny_sd.sd), "--n", "2", "--steps", "3", "--out", str(tmp_path)]) == 0
    import json
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["summary"]) == {"1.0", "7.5"} and len(res["rows"]) == 4
    s = res["summary"]["1.0"]["inversion_psnr"]
    assert s["ci"][0] <= s["mean"] <= s["ci"][1]
    assert "inversion PSNR" in capsys.readouterr().out
