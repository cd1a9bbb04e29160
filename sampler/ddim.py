"""DDIM sampler (Song et al. 2020), as diffusers' DDIMScheduler; eta = 0 by default.

x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - s^2) eps_pred (+ s z),
x0_pred = (x - sqrt(1 - abar_t) eps_pred) / sqrt(abar_t), s = eta * sqrt(var(t, prev)).
As in diffusers the "previous" timestep is t - T // N whatever the spacing, and abar_prev is
``alphas_cumprod[0]`` (or 1 with ``set_alpha_to_one``) once that drops below 0.
The sample lives in the Eq. 1 space (init_noise_sigma = 1, scale_model_input = identity).
"""
from __future__ import annotations

import torch

from .base import Sampler
from .schedule import SchedulerConfig, add_noise, inference_timesteps


class DDIMSampler(Sampler):
    default_spacing = "leading"  # DDIMScheduler's default; DDIMScheduler.from_config(SD v1.4)

    def __init__(self, config: SchedulerConfig | None = None, device: torch.device | str | None = None, eta: float = 0.0):
        super().__init__(config, device)
        self.eta = float(eta)
        self._alpha_t: torch.Tensor | None = None  # [N] float32: abar at timesteps[i]
        self._alpha_prev: torch.Tensor | None = None  # [N] float32: abar at timesteps[i] - T // N

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self._set_device(device)
        cfg = self.config
        N = int(num_inference_steps)
        T = cfg.num_train_timesteps
        ts = inference_timesteps(N, T, self.timestep_spacing, cfg.steps_offset).round().to(torch.int64)
        if int(ts.max()) >= T:
            raise ValueError(
                f"{N} steps with {self.timestep_spacing!r} spacing and steps_offset={cfg.steps_offset} "
                f"give timestep {int(ts.max())} >= num_train_timesteps={T}"
            )
        acp = self.schedule.alphas_cumprod  # CPU float32
        final = torch.tensor(1.0) if cfg.set_alpha_to_one else acp[0]
        prev = ts - T // N
        alpha_t = acp[ts]
        alpha_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
        self.num_inference_steps = N
        self.timesteps = ts.to(self.device)
        self._alpha_t = alpha_t.to(self.device)
        self._alpha_prev = alpha_prev.to(self.device)
        self.reset()

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        eta: float | None = None,
        variance_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM step from timesteps[i] to timesteps[i] - T // N; returns the new sample.

        ``eta`` (default: the sampler's, 0) > 0 adds ``eta * sqrt(var) * z`` with z =
        ``variance_noise`` or drawn from ``generator``. Same operation order as diffusers.
        """
        N = self._require_timesteps()
        if not 0 <= i < N:
            raise IndexError(f"step index {i} out of range for {N} steps")
        eta = self.eta if eta is None else float(eta)
        cdt = self._cdt(sample)
        x = sample.to(cdt)
        out = model_output.to(cdt)
        alpha_prod_t = self._alpha_t[i].to(cdt)
        alpha_prod_t_prev = self._alpha_prev[i].to(cdt)
        beta_prod_t = 1 - alpha_prod_t
        x0, eps = self._x0_eps(out, x, alpha_prod_t)
        self.pred_original_sample = x0.to(sample.dtype)

        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
        prev = alpha_prod_t_prev ** (0.5) * x0 + direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either variance_noise or generator, not both")
            if variance_noise is None:
                variance_noise = torch.randn(
                    out.shape, generator=generator, device=out.device, dtype=out.dtype
                )
            prev = prev + std_dev_t * variance_noise.to(cdt)
        return prev.to(sample.dtype)

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, alpha_prod_t: torch.Tensor):
        """(x0, eps) predicted from the model output at noise level abar = alpha_prod_t."""
        beta_prod_t = 1 - alpha_prod_t
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = (x - beta_prod_t ** (0.5) * out) / alpha_prod_t ** (0.5)
            eps = out
        elif pt == "sample":
            x0 = out
            eps = (x - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        elif pt == "v_prediction":
            x0 = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * out
            eps = (alpha_prod_t**0.5) * out + (beta_prod_t**0.5) * x
        else:  # pragma: no cover - rejected by SchedulerConfig
            raise ValueError(f"prediction_type={pt!r}")
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def inverse_step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM *inversion* step: the reverse of ``step(., i, .)``.

        ``sample`` sits at the level of ``timesteps[i] - T // N`` (the clean latent for the last
        index); the model output is taken at ``timesteps[i]`` and the result sits at that level:
        x_t = sqrt(abar_t) x0_pred + sqrt(1 - abar_t) eps_pred, with (x0, eps) predicted at the
        lower level. This is diffusers' DDIMInverseScheduler, and the inversion loop of
        prompt-to-prompt's null-text notebook and of pnp-diffusers' preprocess.py: the UNet sees the
        lower-level sample with the higher timestep (the approximation DDIM inversion makes).
        """
        N = self._require_timesteps()
        if not 0 <= i < N:
            raise IndexError(f"step index {i} out of range for {N} steps")
        cdt = self._cdt(sample)
        alpha_from = self._alpha_prev[i].to(cdt)
        alpha_to = self._alpha_t[i].to(cdt)
        x0, eps = self._x0_eps(model_output.to(cdt), sample.to(cdt), alpha_from)
        return (alpha_to ** (0.5) * x0 + (1 - alpha_to) ** (0.5) * eps).to(sample.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Eq. 1 at integer timestep(s) t (scalar or one per sample), as diffusers."""
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def add_noise_at(self, x0: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        """Eq. 1 at the timestep of step index i (int, or a [B] tensor of indices)."""
        self._require_timesteps()
        if isinstance(i, torch.Tensor):
            t = self.timesteps[i.to(self.timesteps.device).long().flatten()]
        else:
            t = self.timesteps[i]
        return add_noise(x0, noise, t, self.alphas_cumprod)
