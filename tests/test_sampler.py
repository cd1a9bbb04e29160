"""sampler/ against diffusers' LMSDiscreteScheduler and DDIMScheduler (diffusers only here)."""
from __future__ import annotations

import pytest
import torch

from sampler import (
    DDIMSampler,
    LMSSampler,
    SchedulerConfig,
    add_noise,
    cfg,
    cfg_batched,
    get_velocity,
    lms_coefficient,
    make_sampler,
)

diffusers = pytest.importorskip("diffusers")
import numpy as np  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from bench.common import diffusers_lms_module, diffusers_lms_scheduler  # noqa: E402

# The real class (the top-level `diffusers.LMSDiscreteScheduler` is a dummy without scipy; where scipy is
# absent, bench.common.QuadShim, an exact 21-point Gauss-Legendre rule, stands in for scipy.integrate).
LMSDiscreteScheduler = diffusers_lms_module().LMSDiscreteScheduler

# stable-diffusion-v1-4/scheduler/scheduler_config.json
SD14_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-6


def authors_lms(**kw) -> LMSDiscreteScheduler:
    """The authors' scheduler: explicit constructor, default "linspace" spacing."""
    return diffusers_lms_scheduler(**kw)


def sd14_ddim(**kw) -> DDIMScheduler:
    return DDIMScheduler.from_config({**SD14_SCHEDULER_CONFIG, **kw})


def to64(sched) -> None:
    """Make diffusers' tables float64 (same float32 values) so that its per-step scalar
    arithmetic, and the LMS coefficient integrand, run in float64 like ours on fp64 samples."""
    if isinstance(sched, LMSDiscreteScheduler):
        sched.sigmas = sched.sigmas.double()
    else:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()


_ACP = DDIMSampler().alphas_cumprod  # SD v1.x abar_t, float32


def float64_lms_coefficients(d: LMSDiscreteScheduler) -> None:
    """diffusers evaluates the LMS-coefficient integrand with its float32 sigma tensors, so its
    coefficients carry ~5e-7 relative error (it is the same with the real scipy.quad). For float32
    trajectories, let it evaluate the integrand in float64 (same sigma values): its steps then
    agree with ours bit for bit; ``test_lms_float32_against_stock_diffusers`` covers the rest."""
    orig = d.get_lms_coefficient

    def coefficient(order, t, current_order):
        sigmas = d.sigmas
        d.sigmas = sigmas.double()
        try:
            return orig(order, t, current_order)
        finally:
            d.sigmas = sigmas

    d.get_lms_coefficient = coefficient


def same_precision(d, dtype) -> None:
    if dtype == torch.float64:
        to64(d)
    elif isinstance(d, LMSDiscreteScheduler):
        float64_lms_coefficients(d)


def fake_model(x: torch.Tensor, t, i: int, table: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """A deterministic stand-in 'UNet' of the (scaled, i.e. Eq. 1 space) input and t.

    It predicts the target of a fixed 'clean latent' (``table[0]``, plus a per-step random
    perturbation ``table[i]`` and a smooth function of x), so trajectories converge to O(1) values
    like a real model's do. (A model output independent of x would leave LMS latents at O(50),
    where float32 rounding alone is ~4e-6.)
    """
    abar = _ACP[torch.as_tensor(t).round().long()].to(x.dtype)
    x0 = table[0].to(x.dtype) + 0.1 * table[i].to(x.dtype) + 0.05 * torch.tanh(x)
    eps = (x - abar**0.5 * x0) / (1 - abar) ** 0.5
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return abar**0.5 * eps - (1 - abar) ** 0.5 * x0
    return x0


def run_ours(s, x, table, start=0):
    for i in range(start, len(s.timesteps)):
        e = fake_model(s.scale_model_input(x, i), s.timesteps[i], i, table, s.prediction_type)
        x = s.step(e, i, x)
    return x


def run_diffusers(d, x, table, start=0):
    if start and isinstance(d, LMSDiscreteScheduler):
        d.set_begin_index(start)
    for i in range(start, len(d.timesteps)):
        t = d.timesteps[i]
        e = fake_model(d.scale_model_input(x, t), t, i, table, d.config.prediction_type)
        x = d.step(e, t, x).prev_sample
    return x


def pair(name, prediction_type, spacing=None):
    extra = {"prediction_type": prediction_type}
    if spacing is not None:
        extra["timestep_spacing"] = spacing
    if name == "lms":
        d = authors_lms(**extra) if spacing is None else LMSDiscreteScheduler.from_config({**SD14_SCHEDULER_CONFIG, **extra})
    else:
        d = sd14_ddim(**extra)
    ours = make_sampler(name, SchedulerConfig.from_dict({**SD14_SCHEDULER_CONFIG, **extra}))
    return ours, d


# ---------------------------------------------------------------------------------------- schedule


def test_schedule_tables_match_diffusers():
    s = DDIMSampler(SchedulerConfig())
    d = sd14_ddim()
    assert torch.equal(s.schedule.betas, d.betas)
    assert torch.equal(s.schedule.alphas_cumprod, d.alphas_cumprod)
    lin = DDIMSampler(SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    dl = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(lin.schedule.alphas_cumprod, dl.alphas_cumprod)


@pytest.mark.parametrize("n", [1, 7, 25, 50, 333, 1000])
def test_timesteps_match_diffusers(n):
    for spacing in (None, "linspace", "leading", "trailing"):
        for name in ("lms", "ddim"):
            ours, d = pair(name, "epsilon", spacing)
            d.set_timesteps(n)
            if name == "ddim" and int(d.timesteps.max()) >= 1000:  # leading + offset 1 with N = 1000
                with pytest.raises(ValueError, match="1000"):  # diffusers fails later, in step()
                    ours.set_timesteps(n)
                continue
            ours.set_timesteps(n)
            assert ours.timesteps.dtype == d.timesteps.dtype, (name, spacing)
            assert torch.equal(ours.timesteps, d.timesteps), (name, spacing, n)
            if name == "lms":
                assert torch.equal(ours.sigmas, d.sigmas), (spacing, n)
                assert ours.init_noise_sigma == float(d.init_noise_sigma), (spacing, n)
            else:
                assert ours.init_noise_sigma == d.init_noise_sigma == 1.0


def test_default_spacings():
    lms, ddim = LMSSampler(), DDIMSampler()
    lms.set_timesteps(50)
    ddim.set_timesteps(50)
    assert lms.timestep_spacing == "linspace" and float(lms.timesteps[0]) == 999.0
    assert ddim.timestep_spacing == "leading" and ddim.timesteps[0].item() == 981 and ddim.timesteps[-1].item() == 1


def test_lms_coefficients_exact():
    d = authors_lms()
    d.set_timesteps(50)
    to64(d)  # float64 integrand in scipy.quad
    s = [float(v) for v in d.sigmas]
    for i in (0, 1, 2, 3, 10, 25, 48, 49):
        order = min(i + 1, 4)
        for j in range(order):
            ref = d.get_lms_coefficient(order, i, j)
            ours = lms_coefficient(s, order, i, j)
            assert ours == pytest.approx(ref, rel=1e-10, abs=1e-13), (i, j)
            # independent exact check: integrate the Lagrange basis polynomial analytically
            others = [s[i - k] for k in range(order) if k != j]
            poly = np.polynomial.Polynomial([1.0])
            for o in others:
                poly = poly * np.polynomial.Polynomial([-o, 1.0]) / (s[i - j] - o)
            antider = poly.integ()
            assert ours == pytest.approx(antider(s[i + 1]) - antider(s[i]), rel=1e-10, abs=1e-13), (i, j)


# ---------------------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("name", ["lms", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_trajectory_matches_diffusers(name, prediction_type, dtype):
    g = torch.Generator().manual_seed(0)
    ours, d = pair(name, prediction_type)
    ours.set_timesteps(50)
    d.set_timesteps(50)
    same_precision(d, dtype)
    table = torch.randn(50, *SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    x_ours = noise * ours.init_noise_sigma
    x_ref = noise * d.init_noise_sigma
    assert torch.equal(x_ours, x_ref)
    out = run_ours(ours, x_ours, table)
    ref = run_diffusers(d, x_ref, table)
    assert out.dtype == dtype
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("name", ["lms", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_partial_trajectory_strength_half(name, prediction_type, dtype):
    """Strength 0.5: init = int(50 * 0.5) = 25, noise z0 at timesteps[-25], run the last 25 steps."""
    g = torch.Generator().manual_seed(1)
    ours, d = pair(name, prediction_type)
    ours.set_timesteps(50)
    d.set_timesteps(50)
    same_precision(d, dtype)
    table = torch.randn(50, *SHAPE, generator=g, dtype=torch.float64)
    z0 = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)

    i0 = ours.start_index(0.5)
    assert i0 == 25 and torch.equal(ours.timesteps[i0], d.timesteps[-25])
    t0 = d.timesteps[-25]
    x_ref = d.add_noise(z0, eps, t0.reshape(1).repeat(SHAPE[0]))
    x_ours = ours.add_noise_at(z0, eps, i0)
    assert (x_ours - x_ref).abs().max().item() <= TOL
    assert (ours.add_noise(z0, eps, ours.timesteps[i0]) - x_ref).abs().max().item() <= TOL

    out = run_ours(ours, x_ours, table, start=i0)
    ref = run_diffusers(d, x_ref, table, start=i0)
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("start", [0, 25])
def test_lms_float32_against_stock_diffusers(start):
    """Unpatched diffusers in float32: only its float32-evaluated LMS coefficients differ from
    our exact ones (<= 1e-6 relative), moving the result by a few float32 ulps."""
    g = torch.Generator().manual_seed(8)
    ours, d = pair("lms", "epsilon")
    ours.set_timesteps(50)
    d.set_timesteps(50)
    s = [float(v) for v in d.sigmas]
    for i in range(50):
        order = min(i + 1, 4)
        for j in range(order):
            assert lms_coefficient(s, order, i, j) == pytest.approx(d.get_lms_coefficient(order, i, j), rel=1e-6, abs=1e-9)
    table = torch.randn(50, *SHAPE, generator=g, dtype=torch.float64)
    z0 = torch.randn(SHAPE, generator=g).float()
    eps = torch.randn(SHAPE, generator=g).float()
    x = ours.add_noise_at(z0, eps, start) if start else eps * ours.init_noise_sigma
    out, ref = run_ours(ours, x, table, start), run_diffusers(d, x, table, start)
    assert (out - ref).abs().max().item() <= 4e-6  # |x| ~ 4 here: float32 ulp 4.8e-7


def test_mask_guided_loop_matches_diffusers():
    """The authors' loop: after each step, x = y + M * (x - y) with y = add_noise(z0, eps_j, t_i)
    (each round j its own noise), 3 rounds as one batch, LMS from strength 0.5."""
    g = torch.Generator().manual_seed(2)
    ours, d = pair("lms", "epsilon")
    ours.set_timesteps(50)
    d.set_timesteps(50)
    to64(d)
    shape = (3, 4, 8, 8)
    table = torch.randn(50, *shape, generator=g, dtype=torch.float64)
    z0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).expand(shape)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(shape[0], 1, 8, 8, generator=g) > 0.5).double()
    i0 = ours.start_index(0.5)

    x = ours.add_noise_at(z0, eps, i0)
    for i in range(i0, 50):
        e = fake_model(ours.scale_model_input(x, i), ours.timesteps[i], i, table)
        x = ours.step(e, i, x)
        y = ours.add_noise_at(z0, eps, i)
        x = y + mask * (x - y)

    t0 = d.timesteps[i0]
    xr = d.add_noise(z0, eps, t0.repeat(3))
    # No set_begin_index: with it, diffusers' add_noise after a step would use sigma of step i+1;
    # the authors' (older) diffusers looked the timestep up, i.e. sigma of step i, as we do.
    for i in range(i0, 50):
        t = d.timesteps[i]
        e = fake_model(d.scale_model_input(xr, t), t, i, table)
        xr = d.step(e, t, xr).prev_sample
        y = d.add_noise(z0, eps, t.repeat(3))
        xr = y + mask * (xr - y)
    assert (x - xr).abs().max().item() <= TOL


def test_ddim_eta_with_variance_noise():
    g = torch.Generator().manual_seed(3)
    ours, d = pair("ddim", "epsilon")
    ours.set_timesteps(20)
    d.set_timesteps(20)
    to64(d)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    xr = x.clone()
    for i in range(20):
        e = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        x = ours.step(e, i, x, eta=0.7, variance_noise=z)
        xr = d.step(e, d.timesteps[i], xr, eta=0.7, variance_noise=z).prev_sample
    assert (x - xr).abs().max().item() <= TOL



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_posterior_sample_and_step_noise_match_cyclediffusion(dtype):
    """posterior_sample and noise_of_step against the module functions of diffusers'
    CycleDiffusionPipeline (posterior_sample, compute_noise), 99 SD v1.4 DDIM steps from index 30
    (the official CycleDiffusion schedule), eta 0.1; the last step returns x0 in both."""
    from diffusers.pipelines.deprecated.stable_diffusion_variants import pipeline_cycle_diffusion as ref

    ours, d = pair("ddim", "epsilon")
    n, eta = 99, 0.1
    ours.set_timesteps(n)
    d.set_timesteps(n)
    if dtype == torch.float64:
        to64(d)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(SHAPE, generator=g, dtype=dtype)
    x = ours.add_noise_at(x0, torch.randn(SHAPE, generator=g, dtype=dtype), 30)
    for i in range(30, n):
        e = torch.randn(SHAPE, generator=g, dtype=dtype)  # a model's noise prediction
        seed = 100 + i
        prev_ref = ref.posterior_sample(d, x, d.timesteps[i], x0, torch.Generator().manual_seed(seed), eta)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        prev = ours.posterior_sample(x, x0, i, eta, None if i == n - 1 else z)
        assert (prev - prev_ref).abs().max().item() <= TOL
        noise = ours.noise_of_step(e, i, x, prev, eta)
        noise_ref = ref.compute_noise(d, prev_ref, x, d.timesteps[i], e, eta)
        # z is prev / s with s ~ 1e-3 .. 1e-2: relative to its size (std ~1)
        assert (noise - noise_ref).abs().max().item() <= (1e-4 if dtype == torch.float32 else TOL)
        # the step inverted: stepping with the recovered noise lands on prev
        assert (ours.step(e, i, x, eta=eta, variance_noise=noise) - prev).abs().max().item() <= 1e-5
        x = prev
    assert torch.equal(x, x0)



@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_noise_of_step_inverts_step_for_every_prediction_type(prediction_type):
    """diffusers' compute_noise assumes epsilon; ours converts the output like step() does, so stepping
    with the recovered noise lands on the given sample for v and x0 predictions too (fp64)."""
    ours, _ = pair("ddim", prediction_type)
    ours.set_timesteps(20)
    g = torch.Generator().manual_seed(6)
    for i in (0, 7, 19):
        x, out, target = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
        z = ours.noise_of_step(out, i, x, target, 0.3)
        assert (ours.step(out, i, x, eta=0.3, variance_noise=z) - target).abs().max().item() <= 1e-9


def test_restart_order_option():
    g = torch.Generator().manual_seed(4)
    table = torch.randn(50, *SHAPE, generator=g, dtype=torch.float64)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    a, b = LMSSampler(), LMSSampler(restart_order=True)
    for s in (a, b):
        s.set_timesteps(50)
    # From step 0 the two coincide (the order ramps up from 1 either way) ...
    assert torch.equal(run_ours(a, x * a.init_noise_sigma, table), run_ours(b, x * b.init_noise_sigma, table))
    # ... and from mid-schedule they differ (diffusers uses order-4 coefficient 0 alone at first).
    a.reset()
    b.reset()
    xa = run_ours(a, a.add_noise_at(x, x, 25), table, start=25)
    xb = run_ours(b, b.add_noise_at(x, x, 25), table, start=25)
    assert (xa - xb).abs().max().item() > 1e-4


def test_reset_between_runs():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(50, *SHAPE, generator=g, dtype=torch.float64)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    s = LMSSampler()
    s.set_timesteps(50)
    first = run_ours(s, x * s.init_noise_sigma, table)
    s.reset()
    assert torch.equal(run_ours(s, x * s.init_noise_sigma, table), first)
    s.set_timesteps(50)  # also resets
    assert torch.equal(run_ours(s, x * s.init_noise_sigma, table), first)


# ---------------------------------------------------------------------------------------- add_noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_velocity_match_diffusers(dtype):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    d = sd14_ddim()
    for t in (torch.tensor([0, 999]), torch.tensor([500, 17]), torch.tensor([981])):
        assert torch.equal(add_noise(x0, eps, t), d.add_noise(x0, eps, t))
        assert torch.equal(get_velocity(x0, eps, t), d.get_velocity(x0, eps, t))
        assert torch.equal(DDIMSampler().add_noise(x0, eps, t), d.add_noise(x0, eps, t))
    # python int timestep broadcasts over the batch
    assert torch.equal(add_noise(x0, eps, 400), d.add_noise(x0, eps, torch.tensor([400])))

    lms, dl = LMSSampler(), authors_lms()
    lms.set_timesteps(50)
    dl.set_timesteps(50)
    for idx in ([0, 49], [25, 25], [3, 40]):
        t = dl.timesteps[idx]
        ref = dl.add_noise(x0, eps, t)
        assert torch.equal(lms.add_noise(x0, eps, t), ref)
        assert torch.equal(lms.add_noise_at(x0, eps, torch.tensor(idx)), ref)


def test_lms_add_noise_is_scaled_eq1():
    """LMS space = Eq. 1 / sqrt(abar_t): scale_model_input of the LMS-noised latent is Eq. 1."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    lms = LMSSampler(SchedulerConfig(timestep_spacing="leading"))
    lms.set_timesteps(50)
    for i in (0, 25, 49):
        xs = lms.scale_model_input(lms.add_noise_at(x0, eps, i), i)
        t = int(lms.timesteps[i])
        assert (xs - add_noise(x0, eps, t)).abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------- misc


@pytest.mark.parametrize("n", [50, 10, 37])
def test_start_index(n):
    s = LMSSampler()
    s.set_timesteps(n)
    for r in (0.0, 0.01, 0.25, 0.29, 0.3, 0.5, 0.75, 0.8, 0.99, 1.0):
        init = int(n * r)
        i0 = s.start_index(r)
        assert i0 == n - init
        # diffusers' img2img: t_start = max(N - min(int(N * r), N), 0)
        assert i0 == max(n - min(int(n * r), n), 0)
        if init:
            assert torch.equal(s.timesteps[i0:], s.timesteps[-init:])
            assert torch.equal(s.start_timestep(r), s.timesteps[-init])
    assert s.start_index(0.0) == n  # nothing to run
    with pytest.raises(ValueError):
        s.start_index(1.5)
    with pytest.raises(ValueError):
        s.start_timestep(0.0)


def test_config_from_dict():
    c = SchedulerConfig.from_dict(SD14_SCHEDULER_CONFIG)
    assert c == SchedulerConfig()
    assert c.steps_offset == 1 and c.set_alpha_to_one is False and c.clip_sample is False
    assert c.timestep_spacing is None and c.prediction_type == "epsilon"
    v = SchedulerConfig.from_dict({**SD14_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    assert v.prediction_type == "v_prediction"
    for bad in (
        {"use_karras_sigmas": True},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"prediction_type": "flow"},
        {"timestep_spacing": "karras"},
        {"trained_betas": [0.1, 0.2]},
        {"thresholding": True},
        {"some_new_key": 3},
    ):
        key, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=key):
            SchedulerConfig.from_dict({**SD14_SCHEDULER_CONFIG, **bad})
        with pytest.raises(ValueError, match=repr(value) if not isinstance(value, list) else r"0\.1"):
            SchedulerConfig.from_dict({**SD14_SCHEDULER_CONFIG, **bad})


def test_make_sampler_and_cfg():
    assert isinstance(make_sampler("lms"), LMSSampler)
    assert isinstance(make_sampler("LMSDiscrete"), LMSSampler)
    assert isinstance(make_sampler("ddim", eta=0.0), DDIMSampler)
    with pytest.raises(ValueError):
        make_sampler("euler")
    u, t = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(cfg(u, t, 7.5), u + 7.5 * (t - u))
    assert torch.equal(cfg(u, t, 1.0), u + 1.0 * (t - u))
    assert torch.equal(cfg_batched(torch.cat([u, t]), 7.5), cfg(u, t, 7.5))


def test_half_precision_runs():
    s = LMSSampler()
    s.set_timesteps(10)
    x = torch.randn(SHAPE).half() * s.init_noise_sigma
    for i in range(10):
        x = s.step(torch.randn(SHAPE).half(), i, x)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["lms", "ddim"])
def test_cuda_loop_has_no_host_sync_and_matches_cpu(name):
    """The mask-guided loop on the GPU issues no host synchronisation and matches the CPU run."""
    g = torch.Generator().manual_seed(9)
    table = torch.randn(50, *SHAPE, generator=g, dtype=torch.float64)
    z0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    mask = (torch.rand(SHAPE[0], 1, 8, 8, generator=g) > 0.5).double()
    results = []
    for device in ("cpu", "cuda"):
        s = make_sampler(name)
        s.set_timesteps(50, device)
        tab, z, e, m = (v.to(device) for v in (table, z0, eps, mask))
        acp = _ACP.to(device)
        i0 = s.start_index(0.5)
        torch.cuda.synchronize()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            x = s.add_noise_at(z, e, i0)
            for i in range(i0, 50):
                xin = s.scale_model_input(x, i)
                abar = acp[s.timesteps[i].round().long()].double()
                pred = (xin - abar**0.5 * (tab[0] + 0.1 * tab[i])) / (1 - abar) ** 0.5
                x = s.step(pred, i, x)
                y = s.add_noise(z, e, s.timesteps[i])
                x = y + m * (x - y)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append(x.cpu())
    assert (results[0] - results[1]).abs().max().item() <= 1e-10
