"""What LMSSampler and DDIMSampler share: config, schedule, timesteps, strength -> start index."""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule, SchedulerConfig, compute_dtype


class Sampler:
    """Common interface of the samplers.

    Usage (``i`` is always the step index into ``timesteps``, never the timestep value)::

        s = LMSSampler(config)                  # or DDIMSampler(config), make_sampler("lms")
        s.set_timesteps(50, device)             # also resets any per-run state
        x = noise * s.init_noise_sigma          # from pure noise, or, for strength r:
        i0 = s.start_index(r); x = s.add_noise_at(z0, noise, i0)
        for i in range(i0, len(s.timesteps)):
            eps = unet(s.scale_model_input(x, i), s.timesteps[i], ...)
            x = s.step(eps, i, x)

    Everything per step stays on the device (tables are looked up with Python ints), so the
    loop issues no host synchronisation.
    """

    #: spacing used when ``config.timestep_spacing`` is None (diffusers' default for the class)
    default_spacing: str = "leading"

    def __init__(self, config: SchedulerConfig | None = None, device: torch.device | str | None = None):
        self.config = config if config is not None else SchedulerConfig()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.schedule = NoiseSchedule(self.config)  # CPU, float32 (see schedule.py)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.pred_original_sample: torch.Tensor | None = None  # x0 predicted by the last step()

    @property
    def timestep_spacing(self) -> str:
        return self.config.timestep_spacing or self.default_spacing

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        raise NotImplementedError

    def _set_device(self, device) -> None:
        if device is not None:
            self.device = torch.device(device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)

    def reset(self) -> None:
        """Forget per-run state (LMS derivative history); ``set_timesteps`` calls it."""
        self.pred_original_sample = None

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, device) first")
        return self.num_inference_steps

    def __len__(self) -> int:
        return self._require_timesteps()

    def start_index(self, strength: float) -> int:
        """First step index for noise strength r, as the authors (and diffusers' img2img) do it.

        ``init = int(num_steps * r)``; the run starts at ``timesteps[-init]``, i.e. the last
        ``init`` steps are run: the returned index is ``num_steps - init``. For r = 1 that is 0
        (the full run); when ``init`` is 0 (r = 0, or r < 1/num_steps) it is ``num_steps``: no
        step to run. (The authors' ``timesteps[-init:]`` would be the full run for init = 0,
        a Python slicing accident that we do not reproduce.)
        """
        n = self._require_timesteps()
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be in [0, 1]")
        init = int(n * strength)
        return n - init

    def timestep(self, i) -> torch.Tensor:
        """The UNet's timestep of step i as a (1,) device tensor, for an int i or a (1,) device tensor i: the
        same shape either way, so a compiled UNet sees the same input at an eager and a replayed step."""
        self._require_timesteps()
        return self.timesteps.index_select(0, i) if isinstance(i, torch.Tensor) else self.timesteps[i:i + 1]

    def start_timestep(self, strength: float) -> torch.Tensor:
        """``timesteps[start_index(strength)]`` (the timestep at which the source is noised)."""
        i = self.start_index(strength)
        if i >= self._require_timesteps():
            raise ValueError(f"strength={strength!r} gives no denoising step with {self.num_inference_steps} steps")
        return self.timesteps[i]

    # -- to be provided by the subclasses -------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def add_noise_at(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _cdt(sample: torch.Tensor) -> torch.dtype:
        return compute_dtype(sample.dtype)
