"""SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", stochastic multistep variant), as diffusers'
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)`` with its defaults
(midpoint solver type, last sigma zero, first-order first and last steps). LEDITS++ samples and inverts
with it.

In log-SNR time lambda = log(alpha / sigma) (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)), one step
from s to t with h = lambda_t - lambda_s and the data prediction x0(s) is

    x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z

with D0 = x0(s) and D1 = (x0(s) - x0(s_prev)) h / h_prev (second order) or D1 = 0 (first order).
The sample lives in the Eq. 1 space (init_noise_sigma = 1, scale_model_input = identity).
``noise_std(i)`` is the factor of z, so an inversion can solve for the z that lands on a given x_t.
"""
from __future__ import annotations

import torch

from .base import Sampler
from .schedule import SchedulerConfig, add_noise, train_sigmas


class DPMSolverSDESampler(Sampler):
    default_spacing = "linspace"  # DPMSolverMultistepScheduler's default

    def __init__(self, config: SchedulerConfig | None = None, device: torch.device | str | None = None):
        super().__init__(config, device)
        self.sigmas: torch.Tensor | None = None   # [N + 1] float32 on the CPU: k-diffusion sigma, then 0
        self._prev_x0: torch.Tensor | None = None  # data prediction of the previous step (multistep history)
        self._steps_taken = 0                      # steps since set_timesteps (first step: first order)

    def _timesteps(self, n: int) -> torch.Tensor:
        """diffusers' DPM-Solver timesteps (its own formulas: 'leading' uses T // (N + 1), unlike DDIM)."""
        T, spacing = self.config.num_train_timesteps, self.timestep_spacing
        if spacing == "linspace":
            ts = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
        elif spacing == "leading":
            ts = (torch.arange(n + 1, dtype=torch.float64) * (T // (n + 1))).round().flip(0)[:-1]
            ts = ts + self.config.steps_offset
        else:  # trailing
            ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        return ts.to(torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self._set_device(device)
        n = int(num_inference_steps)
        if not 1 <= n < self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={n} must be in [1, {self.config.num_train_timesteps})")
        ts = self._timesteps(n)
        sig = train_sigmas(self.schedule.alphas_cumprod)[ts]
        self.sigmas = torch.cat([sig, torch.zeros(1)])  # the last step goes to sigma 0: the clean sample
        self.timesteps = ts.to(self.device)
        self.num_inference_steps = len(ts)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._prev_x0, self._steps_taken = None, 0

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        return sample

    def _alpha_sigma_lambda(self, k: int):
        """alpha_t, sigma_t and log-SNR lambda_t at sigma index k (float32 scalars, CPU, as diffusers)."""
        s = self.sigmas[k]
        alpha = 1 / (s**2 + 1) ** 0.5
        sigma = s * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _h(self, i: int) -> torch.Tensor:
        return self._alpha_sigma_lambda(i + 1)[2] - self._alpha_sigma_lambda(i)[2]

    def noise_std(self, i: int) -> torch.Tensor:
        """Factor of the fresh noise z in step i: sigma_t sqrt(1 - e^-2h) (0 at the last step)."""
        _, sigma_t, _ = self._alpha_sigma_lambda(i + 1)
        return sigma_t * torch.sqrt(1.0 - torch.exp(-2 * self._h(i)))

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor,
             variance_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """One step from timesteps[i] to the next; z = ``variance_noise`` or drawn from ``generator``.

        Steps must run in order after ``set_timesteps`` (the multistep history is the previous step's)."""
        N = self._require_timesteps()
        if not 0 <= i < N:
            raise IndexError(f"step index {i} out of range for {N} steps")
        x = sample.to(torch.float32)
        out = model_output.to(torch.float32)
        alpha_s, sigma_s, lam_s = self._alpha_sigma_lambda(i)
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(i + 1)
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = (x - sigma_s * out) / alpha_s
        elif pt == "v_prediction":
            x0 = alpha_s * x - sigma_s * out
        else:  # "sample"
            x0 = out
        self.pred_original_sample = x0.to(sample.dtype)
        if variance_noise is None:
            variance_noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device)
        z = variance_noise.to(device=out.device, dtype=torch.float32)
        h = lam_t - lam_s
        d = x0  # D0 + D1 / 2, first order: D1 = 0
        if self._steps_taken >= 1 and i < N - 1:  # second order except on the first and the last step
            h_prev = lam_s - self._alpha_sigma_lambda(i - 1)[2]
            d = x0 + 0.5 * ((1.0 / (h_prev / h)) * (x0 - self._prev_x0))
        prev = ((sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * d
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * z)
        self._prev_x0 = x0
        self._steps_taken += 1
        return prev.to(model_output.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Eq. 1 at integer timestep(s) t."""
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def add_noise_at(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Eq. 1 at the timestep of step index i."""
        self._require_timesteps()
        return add_noise(x0, noise, self.timesteps[i], self.alphas_cumprod)
