"""Editing methods, one module each, registered by name (see base.py for the protocol).

Every module in this package other than base and options is imported here, so a new method is one
new file with a `@register`ed class: the CLI, the API, the dataset runner and the toy benchmark see it.
"""
import importlib
import pkgutil

from .base import (REGISTRY, Edited, Job, MaskOutput, Method, StepState, check_finite, get_method, guidance_cause,
                   register, report_step)
from .options import SHARED, EditError, EditOptions, Option, add_arguments, options_from_args

_FIRST = ("instdiffedit",)  # listed first (help, tables); the rest alphabetically
for _name in sorted((m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "options")
                     and not m.name.startswith("_")), key=lambda n: (n not in _FIRST, n)):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["REGISTRY", "SHARED", "EditError", "EditOptions", "Edited", "Job", "MaskOutput", "Method", "Option",
           "StepState", "add_arguments", "check_finite", "get_method", "guidance_cause", "options_from_args", "register",
           "report_step"]
