"""InstDiffEdit instant attention masks: attention capture (store), Eq. 6-9 (instant) and the
Pillow/OpenCV filters they use, written in torch (filters)."""
from mask.filters import (binomial_blur, default_sigma, gaussian_blur, gaussian_kernel1d, pil_resize,
                          pil_weights)
from mask.instant import MaskResult, instant_mask, minmax
from mask.store import AttentionStore

__all__ = ["AttentionStore", "MaskResult", "instant_mask", "binomial_blur", "gaussian_blur",
           "gaussian_kernel1d", "default_sigma", "minmax", "pil_resize", "pil_weights"]
