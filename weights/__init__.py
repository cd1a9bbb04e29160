"""Read SD v1.x checkpoints (hub id, diffusers folder, CompVis single file) into our modules."""
from .errors import WeightsError
from .loader import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, StableDiffusion, load

__all__ = ["WeightsError", "load", "StableDiffusion", "DEFAULT_MODEL", "DEFAULT_INPAINT_MODEL"]
