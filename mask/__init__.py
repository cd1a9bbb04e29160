"""InstDiffEdit instant attention masks: attention capture (store) and Eq. 6-9 (instant)."""
from mask.instant import (MaskResult, default_sigma, gaussian_blur, gaussian_kernel1d,
                          instant_mask, minmax)
from mask.store import AttentionStore

__all__ = ["AttentionStore", "MaskResult", "instant_mask", "gaussian_blur", "gaussian_kernel1d",
           "default_sigma", "minmax"]
