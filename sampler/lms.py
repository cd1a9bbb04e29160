"""Linear multistep (LMS) sampler on the sigma scale, as diffusers' LMSDiscreteScheduler.

The sample lives in the "k-diffusion" space x = x0 + sigma * eps, sigma_t = sqrt((1-abar_t)/abar_t)
(so x_sigma = x_t / sqrt(abar_t) with x_t of Eq. 1). The UNet sees x / sqrt(sigma^2 + 1) = x_t.
One step integrates dx/dsigma = (x - x0_pred)/sigma from sigma_i to sigma_{i+1} by Adams-Bashforth
of order up to 4 on the non-uniform sigma grid: the coefficient of the derivative k steps back is
the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through
sigma_i, ..., sigma_{i-order+1}. diffusers integrates it with scipy.integrate.quad; the integrand
is a polynomial of degree order-1 <= 3, so two-point Gauss-Legendre quadrature (exact up to
degree 3) gives it exactly, with no scipy. All coefficients are tabulated in ``set_timesteps``.
"""
from __future__ import annotations

import math

import torch

from .base import Sampler
from .schedule import SchedulerConfig, inference_timesteps, interp, train_sigmas

_GL_NODE = 1.0 / math.sqrt(3.0)  # two-point Gauss-Legendre nodes +-1/sqrt(3), weights 1


def lms_coefficient(sigmas: list[float], order: int, i: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial l_j through
    the nodes sigmas[i], sigmas[i-1], ..., sigmas[i-order+1] (l_j = 1 at sigmas[i-j]).

    Same quantity as diffusers' ``LMSDiscreteScheduler.get_lms_coefficient(order, i, j)``,
    computed exactly (degree order-1 <= 3) by two-point Gauss-Legendre quadrature in float64.
    """
    if not 1 <= order <= 4 or not 0 <= j < order or i - order + 1 < 0:
        raise ValueError(f"bad LMS coefficient request order={order} i={i} j={j}")

    if any(sigmas[i - j] == sigmas[i - k] for k in range(order) if k != j):
        # Repeated nodes (e.g. "leading" spacing with N = T: timesteps 1000 and 999 both clamp to
        # sigma_999): the Lagrange basis is undefined; diffusers divides by zero there too.
        return float("nan")

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k == j:
                continue
            prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    a, b = sigmas[i], sigmas[i + 1]
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    return half * (basis(mid - half * _GL_NODE) + basis(mid + half * _GL_NODE))


class LMSSampler(Sampler):
    """LMSDiscreteScheduler (order 4) with diffusers' numerics; see module docstring.

    ``order``: maximal multistep order (diffusers' ``step(order=4)`` default).
    ``restart_order``: diffusers (and so the authors) pick the order of step i as
    ``min(i + 1, order)`` from the *schedule* index, even when a run starts mid-schedule
    (strength < 1) with an empty derivative history; the step then uses only the first of the
    order-4 coefficients (that is what ``zip`` over the shorter history does). That is the default
    here. ``restart_order=True`` instead ramps the order up from 1 with the history actually
    collected (textbook Adams-Bashforth start-up); it only changes runs that start at i0 > 0.
    """

    default_spacing = "linspace"  # LMSDiscreteScheduler's default; the authors' setting

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        device: torch.device | str | None = None,
        order: int = 4,
        restart_order: bool = False,
    ):
        super().__init__(config, device)
        if not 1 <= int(order) <= 4:
            raise ValueError(f"order={order!r} must be in 1..4")
        self.order = int(order)
        self.restart_order = bool(restart_order)
        # sigma_t of all training timesteps, float32 as diffusers (CPU copy for tabulation).
        self._train_sigmas_cpu = train_sigmas(self.schedule.alphas_cumprod)
        self.train_sigmas = self._train_sigmas_cpu.to(self.device)
        self.sigmas: torch.Tensor | None = None  # [N+1] float32, last = 0
        self._coeffs: torch.Tensor | None = None  # [order, N, order] float64
        self._init_noise_sigma: float | None = None
        self.derivatives: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self._set_device(device)
        cfg = self.config
        N = int(num_inference_steps)
        ts64 = inference_timesteps(N, cfg.num_train_timesteps, self.timestep_spacing, cfg.steps_offset)
        ts32 = ts64.to(torch.float32)  # diffusers keeps LMS timesteps as float32 (fractional for linspace)
        # numpy.interp(t, arange(T), sigmas) in float64 at the float32 timesteps, cast to float32.
        sig = interp(ts32, self._train_sigmas_cpu).to(torch.float32)
        sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float32)])

        # LMS coefficient tables: coeffs[o-1, i, j] for order o, step i, history offset j.
        s = [float(v) for v in sigmas.tolist()]
        coeffs = torch.zeros(self.order, N, self.order, dtype=torch.float64)
        for o in range(1, self.order + 1):
            for i in range(o - 1, N):
                for j in range(o):
                    coeffs[o - 1, i, j] = lms_coefficient(s, o, i, j)

        if self.timestep_spacing in ("linspace", "trailing"):
            init_sigma = sigmas.max()
        else:
            init_sigma = (sigmas.max() ** 2 + 1) ** 0.5
        self._init_noise_sigma = float(init_sigma)

        self.num_inference_steps = N
        self.timesteps = ts32.to(self.device)
        self.sigmas = sigmas.to(self.device)
        self.train_sigmas = self._train_sigmas_cpu.to(self.device)
        self._coeffs = coeffs.to(self.device)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.derivatives = []

    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting noise: sigma_max ("linspace"/"trailing") or sqrt(sigma_max^2 + 1)."""
        self._require_timesteps()
        return self._init_noise_sigma

    def sigma_at(self, i: int) -> torch.Tensor:
        """sigma of step i (0-d float32 tensor on the device); i = N gives the final 0."""
        self._require_timesteps()
        return self.sigmas[i]

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        """x / sqrt(sigma_i^2 + 1): the UNet input for the sigma-space sample."""
        self._require_timesteps()
        cdt = self._cdt(sample)
        sigma = self.sigmas[i].to(cdt)
        return (sample.to(cdt) / ((sigma**2 + 1) ** 0.5)).to(sample.dtype)

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        """One LMS step from sigma_i to sigma_{i+1}; returns the new sample.

        Keeps the last ``order`` derivatives; call ``reset()`` (or ``set_timesteps``) between runs.
        Same operation order as diffusers, so trajectories agree to float rounding.
        """
        N = self._require_timesteps()
        if not 0 <= i < N:
            raise IndexError(f"step index {i} out of range for {N} steps")
        cdt = self._cdt(sample)
        x = sample.to(cdt)
        out = model_output.to(cdt)
        sigma = self.sigmas[i].to(cdt)

        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = x - sigma * out
        elif pt == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        elif pt == "sample":
            x0 = out
        else:  # pragma: no cover - rejected by SchedulerConfig
            raise ValueError(f"prediction_type={pt!r}")
        self.pred_original_sample = x0.to(sample.dtype)

        derivative = (x - x0) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > self.order:
            self.derivatives.pop(0)

        order = min(len(self.derivatives), self.order) if self.restart_order else min(i + 1, self.order)
        coeffs = self._coeffs[order - 1, i].to(cdt)
        acc = None
        for j, d in zip(range(order), reversed(self.derivatives)):
            term = coeffs[j] * d
            acc = term if acc is None else acc + term
        return (x + acc).to(sample.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x0 + sigma(t) * noise, as diffusers' LMSDiscreteScheduler.add_noise.

        This is the sigma-space counterpart of Eq. 1 (it equals Eq. 1 divided by sqrt(abar_t)),
        i.e. the right starting point / re-noised source latent for this sampler. ``t`` is a
        timestep value (float or int, scalar or one per sample). diffusers looks t up in
        ``timesteps``; here sigma(t) is interpolated from the training sigmas exactly as
        ``set_timesteps`` does, which gives the identical float32 sigma for every scheduled
        timestep and also accepts timesteps off the schedule, without a host sync.
        """
        if isinstance(t, torch.Tensor):
            tt = t.to(device=x0.device).flatten()
        else:
            tt = torch.tensor([float(t)], device=x0.device)
        sigma = interp(tt.to(torch.float32), self.train_sigmas.to(x0.device)).to(torch.float32)
        return self._add_sigma_noise(x0, noise, sigma)

    def add_noise_at(self, x0: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        """``add_noise`` at the timestep of step index i (int, or a [B] tensor of indices)."""
        self._require_timesteps()
        if isinstance(i, torch.Tensor):
            sigma = self.sigmas.to(x0.device)[i.to(x0.device).long().flatten()]
        else:
            sigma = self.sigmas[i].to(x0.device).reshape(1)
        return self._add_sigma_noise(x0, noise, sigma)

    def _add_sigma_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cdt = self._cdt(x0)
        sigma = sigma.to(cdt).reshape(-1, *([1] * (x0.ndim - 1)))
        return (x0.to(cdt) + noise.to(cdt) * sigma).to(x0.dtype)
