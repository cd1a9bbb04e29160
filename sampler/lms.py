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
        # derivative history, newest first: a fixed device buffer (order, *sample shape) and a device count
        # of the slots filled, updated in place, so a step never reads host state and can be captured once
        # in a CUDA graph and replayed (instdiffedit.py, --cuda-graphs)
        self._history: torch.Tensor | None = None
        self._filled: torch.Tensor | None = None

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
        self._steps = torch.arange(N, device=self.device)  # step indices as device tensors: no host copy per step
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._history = self._filled = None

    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting noise: sigma_max ("linspace"/"trailing") or sqrt(sigma_max^2 + 1)."""
        self._require_timesteps()
        return self._init_noise_sigma

    def index(self, i) -> torch.Tensor:
        """Step index i (int, or a (1,) int64 tensor on the device) as a (1,) device tensor."""
        return i if isinstance(i, torch.Tensor) else self._steps[i:i + 1]

    def sigma_at(self, i) -> torch.Tensor:
        """sigma of step i (0-d float32 tensor on the device; (1,) for a tensor i); i = N gives the final 0."""
        self._require_timesteps()
        return self.sigmas[i] if not isinstance(i, torch.Tensor) else self.sigmas.index_select(0, i)

    def scale_model_input(self, sample: torch.Tensor, i) -> torch.Tensor:
        """x / sqrt(sigma_i^2 + 1): the UNet input for the sigma-space sample."""
        cdt = self._cdt(sample)
        sigma = self.sigma_at(i).to(cdt)
        return (sample.to(cdt) / ((sigma**2 + 1) ** 0.5)).to(sample.dtype)

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor) -> torch.Tensor:
        """One LMS step from sigma_i to sigma_{i+1}; returns the new sample.

        ``i`` is a Python int or a (1,) int64 device tensor (a CUDA graph replays one captured step
        for every i). Keeps the last ``order`` derivatives; call ``reset()`` (or ``set_timesteps``)
        between runs. Same operation order as diffusers, so trajectories agree to float rounding.
        """
        N = self._require_timesteps()
        if not isinstance(i, torch.Tensor) and not 0 <= i < N:
            raise IndexError(f"step index {i} out of range for {N} steps")
        cdt = self._cdt(sample)
        x = sample.to(cdt)
        out = model_output.to(cdt)
        sigma = self.sigma_at(i).to(cdt)

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
        if self._history is None or self._history.shape[1:] != derivative.shape or self._history.dtype != cdt:
            self._history = torch.zeros((self.order, *derivative.shape), dtype=cdt, device=derivative.device)
            self._filled = torch.zeros(1, dtype=torch.long, device=derivative.device)
        self._history[1:] = self._history[:-1].clone()  # shift the history; the oldest falls off
        self._history[0] = derivative
        self._filled.add_(1).clamp_(max=self.order)

        # coefficient row of this step: diffusers' order min(i + 1, order) from the schedule index, or
        # with restart_order the history actually collected; slots beyond the history get 0, as
        # diffusers' zip over the shorter history leaves them out
        idx = self.index(i)
        order = self._filled if self.restart_order else (idx + 1).clamp(max=self.order)
        row = self._coeffs.flatten(0, 1).index_select(0, (order - 1) * N + idx)[0]  # (order,) float64
        j = torch.arange(self.order, device=row.device)
        coeffs = torch.where(j < torch.minimum(order, self._filled), row, torch.zeros_like(row)).to(cdt)
        acc = coeffs[0] * self._history[0]
        for k in range(1, self.order):  # sequential sum in diffusers' order; absent slots add exact zeros
            acc = acc + coeffs[k] * self._history[k]
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
