"""Noise schedule of Stable Diffusion v1.x (paper Eq. 1) and its configuration.

Numerics. The schedule tables (betas, alphas_cumprod, LMS sigmas) are built exactly the way
diffusers builds them: betas from ``torch.linspace`` in float32, ``alphas_cumprod`` as a
float32 ``torch.cumprod`` on the CPU, LMS sigmas interpolated in float64 and stored as float32.
That keeps our trajectories within float rounding of diffusers' schedulers, which the
InstDiffEdit authors used. (The original CompVis training code built the same schedule in
float64; the two differ by about 1e-5 relative in ``alphas_cumprod`` near t = 999.
``make_betas(config, dtype=torch.float64)`` gives that variant.) All per-step arithmetic is then
done in the sample's dtype (at least float32) from these float32 values, as diffusers does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# Keys of a diffusers scheduler_config.json that do not affect LMS/DDIM sampling; any value.
IGNORED_CONFIG_KEYS = frozenset({"_class_name", "_diffusers_version", "skip_prk_steps"})
# Keys accepted only at the value that leaves our samplers' behaviour unchanged.
NEUTRAL_CONFIG_VALUES: dict[str, tuple | None] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "dynamic_thresholding_ratio": None,  # any value: only used when thresholding is on
    "sample_max_value": None,  # any value: only used when thresholding is on
    "rescale_betas_zero_snr": (False,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "variance_type": ("fixed_small", None),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler settings; defaults are SD v1.4's ``scheduler/scheduler_config.json``.

    SD v1.4 ships a PNDMScheduler config (``steps_offset: 1``, ``set_alpha_to_one: false``,
    ``skip_prk_steps: true``, ``clip_sample: false``) without ``timestep_spacing`` or
    ``prediction_type``. Loading it into diffusers' DDIMScheduler gives "leading" spacing with
    offset 1; into LMSDiscreteScheduler gives "linspace" spacing (its default), which is also what
    the InstDiffEdit authors get from ``LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", num_train_timesteps=1000)``. Hence ``timestep_spacing=None``
    means "the sampler's own default" (LMS: linspace, DDIM: leading).
    """

    # T: number of diffusion steps the model was trained with; timesteps are 0 .. T-1.
    num_train_timesteps: int = 1000
    # beta at t = 0.
    beta_start: float = 0.00085
    # beta at t = T-1.
    beta_end: float = 0.012
    # "scaled_linear": betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (SD v1.x);
    # "linear": betas = linspace(beta_start, beta_end, T).
    beta_schedule: str = "scaled_linear"
    # What the UNet predicts: "epsilon" (the noise; SD v1.x), "v_prediction"
    # (v = sqrt(abar) eps - sqrt(1 - abar) x0; SD 2.x 768), or "sample" (x0 itself).
    prediction_type: str = "epsilon"
    # Added to every inference timestep with "leading" spacing (SD v1.x: 1, giving 981 ... 1 for
    # 50 steps). Ignored by "linspace" and "trailing", as in diffusers.
    steps_offset: int = 1
    # How the inference timesteps are picked from 0 .. T-1: "linspace", "leading", "trailing",
    # or None for the sampler's default (LMS: "linspace", DDIM: "leading"; see class docstring).
    timestep_spacing: str | None = None
    # DDIM only: alpha_cumprod "before" t = 0 used by the last step; True -> 1.0,
    # False -> alphas_cumprod[0] (SD v1.x: False).
    set_alpha_to_one: bool = False
    # DDIM only: clamp the predicted x0 to [-clip_sample_range, clip_sample_range] (SD v1.x: False).
    clip_sample: bool = False
    # DDIM only: the clamp range used when clip_sample is True.
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing={self.timestep_spacing!r} is not supported; use one of {TIMESTEP_SPACINGS} or None"
            )
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if int(self.steps_offset) != self.steps_offset:
            raise ValueError(f"steps_offset={self.steps_offset!r} must be an integer")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        """Read a diffusers ``scheduler/scheduler_config.json`` dict.

        Keys we implement are taken over; keys that cannot change LMS/DDIM sampling are ignored;
        anything else (unknown keys, or known keys at values we do not implement, e.g.
        ``use_karras_sigmas: true``) raises ValueError naming the key and value.
        """
        own = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in IGNORED_CONFIG_KEYS:
                continue
            elif key in NEUTRAL_CONFIG_VALUES:
                allowed = NEUTRAL_CONFIG_VALUES[key]
                if allowed is not None and value not in allowed:
                    raise ValueError(f"unsupported scheduler config: {key}={value!r} (supported: {allowed})")
            else:
                raise ValueError(f"unsupported scheduler config key: {key}={value!r}")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"unsupported scheduler config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "SchedulerConfig":
        """``from_dict`` of a ``scheduler_config.json`` file."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_betas(config: SchedulerConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Betas on the CPU. float32 reproduces diffusers bit for bit; float64 is CompVis' variant."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=dtype)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=dtype) ** 2
    raise ValueError(f"beta_schedule={config.beta_schedule!r} is not supported")


class NoiseSchedule:
    """betas, alphas, alphas_cumprod (abar_t) of the training schedule, float32, on ``device``."""

    def __init__(self, config: SchedulerConfig | None = None, device: torch.device | str | None = None):
        self.config = config or SchedulerConfig()
        betas = make_betas(self.config)  # CPU: cumprod order must not depend on the device
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.betas = betas.to(device)
        self.alphas = alphas.to(device)
        self.alphas_cumprod = alphas_cumprod.to(device)

    def to(self, device: torch.device | str | None) -> "NoiseSchedule":
        self.betas = self.betas.to(device)
        self.alphas = self.alphas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Eq. 1: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v-prediction target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        return get_velocity(x0, noise, t, self.alphas_cumprod)


@lru_cache(maxsize=1)
def _default_alphas_cumprod() -> torch.Tensor:
    return NoiseSchedule(SchedulerConfig()).alphas_cumprod


def _abar_at(t, alphas_cumprod: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """abar_t in ``like``'s compute dtype, shaped [B or 1, 1, ..., 1] to broadcast against ``like``."""
    acp = _default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    cdt = compute_dtype(like.dtype)
    acp = acp.to(device=like.device, dtype=cdt)
    if isinstance(t, torch.Tensor):
        idx = t.to(device=like.device)
        if idx.is_floating_point():
            idx = idx.round()
        idx = idx.long().flatten()
    else:
        idx = torch.tensor([int(t)], device=like.device, dtype=torch.long)
    return acp[idx].reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

    ``t``: an int, a 0-d tensor, or one timestep per sample ([B]); integer timesteps 0 .. T-1.
    ``alphas_cumprod`` defaults to SD v1.x's schedule. Same arithmetic as diffusers'
    DDIMScheduler/DDPMScheduler ``add_noise`` (computed in the sample dtype, at least float32).
    """
    abar = _abar_at(t, alphas_cumprod, x0)
    out = abar**0.5 * x0.to(abar.dtype) + (1 - abar) ** 0.5 * noise.to(abar.dtype)
    return out.to(x0.dtype)


def get_velocity(x0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """v-prediction training target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (as diffusers)."""
    abar = _abar_at(t, alphas_cumprod, x0)
    out = abar**0.5 * noise.to(abar.dtype) - (1 - abar) ** 0.5 * x0.to(abar.dtype)
    return out.to(x0.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sampler arithmetic dtype: the sample's dtype, but at least float32 (fp16/bf16 upcast)."""
    return torch.promote_types(dtype, torch.float32)


def inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    spacing: str,
    steps_offset: int = 0,
) -> torch.Tensor:
    """The inference timesteps, descending, as float64 values on the CPU (not yet rounded/cast).

    Mirrors the numpy formulas diffusers uses (so the float32/int64 casts done by the samplers
    give identical values):
      linspace: i * (T-1)/(N-1), i = 0..N-1 (numpy.linspace arithmetic; last = T-1 exactly);
      leading:  round(i * (T // N)) + steps_offset;
      trailing: round(T - i * T/N) - 1.
    ``linspace`` is returned unrounded: LMS keeps the fractional timesteps, DDIM rounds them.
    """
    N, T = int(num_inference_steps), int(num_train_timesteps)
    if N < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be >= 1")
    if N > T:
        raise ValueError(f"num_inference_steps={N} cannot exceed num_train_timesteps={T}")
    if spacing == "linspace":
        if N == 1:
            ts = torch.zeros(1, dtype=torch.float64)  # numpy.linspace(0, T-1, 1) == [0.]
        else:
            step = float(T - 1) / (N - 1)
            ts = torch.arange(N, dtype=torch.float64) * step + 0.0
            ts[-1] = T - 1
    elif spacing == "leading":
        ratio = T // N
        ts = torch.round(torch.arange(N, dtype=torch.float64) * ratio) + steps_offset
    elif spacing == "trailing":
        ratio = T / N
        return torch.round(torch.arange(T, 0, -ratio, dtype=torch.float64)) - 1  # already descending
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
    return ts.flip(0)


def interp(x: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp(x, arange(len(fp)), fp) in float64, on the device, without host syncs."""
    x = x.to(torch.float64)
    fp = fp.to(device=x.device, dtype=torch.float64)
    n = fp.shape[0]
    lo = torch.floor(x).clamp(0, n - 1)
    lo_i = lo.long()
    hi_i = (lo_i + 1).clamp(max=n - 1)
    frac = x - lo
    y_lo = fp[lo_i]
    slope = fp[hi_i] - fp[lo_i]
    y = torch.where(frac == 0, y_lo, slope * frac + y_lo)
    y = torch.where(x <= 0, fp[0], y)
    return torch.where(x >= n - 1, fp[n - 1], y)


def train_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), float32 as diffusers (the LMS/"k-diffusion" noise level)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


__all__ = [
    "SchedulerConfig",
    "NoiseSchedule",
    "make_betas",
    "add_noise",
    "get_velocity",
    "inference_timesteps",
    "interp",
    "train_sigmas",
    "compute_dtype",
]
