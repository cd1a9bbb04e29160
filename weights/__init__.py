"""Read SD v1.x checkpoints (hub id, diffusers folder, CompVis single file, bundled toy) into our modules."""
from .errors import WeightsError
from .loader import StableDiffusion, load
from .sources import (BUNDLED, DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, Need, Resolved, bundled_tokenizer,
                      default_inpaint_model, resolve_models)

__all__ = ["WeightsError", "load", "StableDiffusion", "DEFAULT_MODEL", "DEFAULT_INPAINT_MODEL", "BUNDLED",
           "Need", "Resolved", "bundled_tokenizer", "default_inpaint_model", "resolve_models"]
