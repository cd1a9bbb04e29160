"""sampler/dpmsolver.py against diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
solver_order=2), and the noise factors both stochastic samplers expose for edit-friendly inversion."""
from __future__ import annotations

import pytest
import torch

from sampler import DDIMSampler, DPMSolverSDESampler, SchedulerConfig, make_sampler

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from tests.test_sampler import SD14_SCHEDULER_CONFIG, fake_model  # noqa: E402

SHAPE = (2, 4, 8, 8)
# diffusers' own numpy 2 warning when it builds its sigma table
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _pair(spacing: str, prediction_type: str = "epsilon"):
    extra = {"timestep_spacing": spacing, "prediction_type": prediction_type}
    d = DPMSolverMultistepScheduler.from_config({**SD14_SCHEDULER_CONFIG, **extra},
                                                algorithm_type="sde-dpmsolver++", solver_order=2)
    return DPMSolverSDESampler(SchedulerConfig.from_dict({**SD14_SCHEDULER_CONFIG, **extra})), d


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [7, 20, 34])
def test_timesteps_and_sigmas_match_diffusers(spacing, n):
    ours, d = _pair(spacing)
    ours.set_timesteps(n)
    d.set_timesteps(n)
    assert torch.equal(ours.timesteps, d.timesteps)
    assert torch.allclose(ours.sigmas, d.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("start", [0, 5])
def test_trajectory_with_given_noise_matches_diffusers(spacing, prediction_type, start):
    """Full and partial runs (a partial run starts first-order, like LEDITS++'s skipped steps)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(25, *SHAPE, generator=g)
    zs = torch.randn(25, *SHAPE, generator=g)
    ours, d = _pair(spacing, prediction_type)
    ours.set_timesteps(24)
    d.set_timesteps(24)
    x = xr = torch.randn(SHAPE, generator=g)
    for i in range(start, 24):
        t = d.timesteps[i]
        x = ours.step(fake_model(x, t, i, table, prediction_type), i, x, variance_noise=zs[i])
        xr = d.step(fake_model(xr, t, i, table, prediction_type), t, xr, variance_noise=zs[i]).prev_sample
        assert (x - xr).abs().max() <= 1e-5, i


def test_generator_noise_is_drawn_like_diffusers():
    ours, d = _pair("leading")
    ours.set_timesteps(10)
    d.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    e = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    a = ours.step(e, 0, x, generator=torch.Generator().manual_seed(3))
    b = d.step(e, d.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["ddim", "dpmsolver-sde"])
def test_noise_std_is_the_factor_of_the_noise(name):
    """step(z) - step(0) == noise_std(i) * z at every step, and the last DPM step is noiseless."""
    kw = {"eta": 1.0} if name == "ddim" else {}
    a = make_sampler(name, SchedulerConfig(timestep_spacing="leading"), **kw)
    b = make_sampler(name, SchedulerConfig(timestep_spacing="leading"), **kw)
    a.set_timesteps(12)
    b.set_timesteps(12)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g)
    for i in range(12):
        e, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        with_z, without = a.step(e, i, x, variance_noise=z), b.step(e, i, x, variance_noise=torch.zeros(SHAPE))
        assert torch.allclose(with_z - without, a.noise_std(i) * z, atol=1e-5)
        assert a.noise_std(i) > 0 or (name == "dpmsolver-sde" and i == 11)
        x = with_z


def test_ddim_noise_std_is_diffusers_variance():
    d = DDIMScheduler.from_config(SD14_SCHEDULER_CONFIG)
    d.set_timesteps(15)
    ours = DDIMSampler(SchedulerConfig.from_dict(SD14_SCHEDULER_CONFIG))
    ours.set_timesteps(15)
    for i, t in enumerate(d.timesteps):
        prev = t - 1000 // 15
        assert torch.allclose(ours.noise_std(i, eta=0.5), 0.5 * d._get_variance(t, prev) ** 0.5, rtol=1e-6)


def test_steps_out_of_range_and_reset():
    s = DPMSolverSDESampler()
    with pytest.raises(RuntimeError):
        s.step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE))
    s.set_timesteps(5)
    with pytest.raises(IndexError):
        s.step(torch.zeros(SHAPE), 5, torch.zeros(SHAPE))
    with pytest.raises(ValueError):
        s.set_timesteps(0)
