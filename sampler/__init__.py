"""Hand-written samplers for Stable Diffusion v1.x (no diffusers): LMS and DDIM, the noise
schedule (paper Eq. 1), and classifier-free guidance.

    s = make_sampler("lms", SchedulerConfig.from_dict(scheduler_config_json))
    s.set_timesteps(50, device)
    i0 = s.start_index(0.5)                       # 25: the last 25 of 50 steps are run
    x = s.add_noise_at(z0, eps, i0)               # = s.add_noise(z0, eps, s.timesteps[i0])
    for i in range(i0, len(s)):
        e = unet(s.scale_model_input(x, i), s.timesteps[i], text)
        x = s.step(e, i, x)
"""
from __future__ import annotations

import torch

from .base import Sampler
from .ddim import DDIMSampler
from .dpmsolver import DPMSolverSDESampler
from .guidance import cfg, cfg_batched
from .lms import LMSSampler, lms_coefficient
from .schedule import NoiseSchedule, SchedulerConfig, add_noise, get_velocity, make_betas

SAMPLERS = {"lms": LMSSampler, "lmsdiscrete": LMSSampler, "ddim": DDIMSampler, "dpmsolversde": DPMSolverSDESampler}


def make_sampler(
    name: str,
    config: SchedulerConfig | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> Sampler:
    """``"lms"`` (the authors' sampler), ``"ddim"`` or ``"dpmsolver-sde"`` (SDE-DPM-Solver++(2M), LEDITS++'s);
    extra kwargs go to the class (LMS: ``order``, ``restart_order``; DDIM: ``eta``)."""
    key = name.lower().replace("_", "").replace("-", "").removesuffix("sampler").removesuffix("scheduler")
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use 'lms', 'ddim' or 'dpmsolver-sde'")
    return SAMPLERS[key](config, device, **kwargs)


__all__ = [
    "Sampler",
    "LMSSampler",
    "DDIMSampler",
    "DPMSolverSDESampler",
    "SchedulerConfig",
    "NoiseSchedule",
    "make_sampler",
    "make_betas",
    "add_noise",
    "get_velocity",
    "cfg",
    "cfg_batched",
    "lms_coefficient",
]
