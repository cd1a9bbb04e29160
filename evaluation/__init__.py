"""Evaluation of InstDiffEdit: metrics (IoU, C_m, C_non, rate), dataset lists, runner, report.

See ``metrics.py``, ``datasets.py``, ``runner.py`` and ``report.py`` for the conventions.
"""

from .datasets import EditItem, find_image, find_mask, load_list, parse_list, safe_id
from .metrics import EditMetrics, MetricUnavailable, change_rates, mask_iou, to_bool_mask
from .runner import run_dataset, summarize

__all__ = [
    "EditItem",
    "EditMetrics",
    "MetricUnavailable",
    "change_rates",
    "find_image",
    "find_mask",
    "load_list",
    "mask_iou",
    "parse_list",
    "run_dataset",
    "safe_id",
    "summarize",
    "to_bool_mask",
]
