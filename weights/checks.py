"""Checks on what a checkpoint folder declares, before anything is built from it: config values (type and
range, one rule per kind of field, read off the config dataclasses' own annotations), sharded-index
files, and tensor dtypes. Every failure is a one-line WeightsError naming the file and the key."""
from __future__ import annotations

import math
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch

from .errors import WeightsError

MAX_INT = 10 ** 6  # no SD v1.x size comes near (vocabulary 49,408; 1000 timesteps): beyond is garbage
ZERO_OK = {"freq_shift", "steps_offset"}  # integer fields where 0 is meaningful; all others are sizes >= 1
# Tensor dtypes a weight may be stored in; each is cast explicitly to the run's dtype (fp32, fp16 or bf16).
# Integers and bools are not weights; float8 needs scales this loader does not read.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kind(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(v, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(v, a) for a in args)
    if origin is tuple:
        elem = args[0] if args else object
        return isinstance(v, (tuple, list)) and len(v) > 0 and all(_matches(x, elem) for x in v)
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str:
        return isinstance(v, str)
    return True  # a type no config uses: no rule


def _range_problem(name: str, v) -> str | None:
    """The range rule of one scalar (or each element of a tuple): sizes >= 1, floats finite and > 0."""
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(x, bool) or x is None or isinstance(x, str):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            return "is not finite"
        if isinstance(x, int) and not (0 if name in ZERO_OK else 1) <= x <= MAX_INT:
            return f"is outside [{0 if name in ZERO_OK else 1}, {MAX_INT:,}]"
        if isinstance(x, float) and x <= 0:
            return "must be > 0"
    return None


def check_config(cfg, label: str) -> None:
    """Every field of a config dataclass against its annotation and the range rule."""
    assert is_dataclass(cfg)
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if not _matches(v, hints[f.name]):
            raise WeightsError(f"{label}: config key '{f.name}' = {v!r} is not of type {_kind(hints[f.name])}")
        problem = _range_problem(f.name, v)
        if problem:
            raise WeightsError(f"{label}: config key '{f.name}' = {v!r} {problem}")
    if hasattr(cfg, "beta_start") and not cfg.beta_start < cfg.beta_end < 1:
        raise WeightsError(f"{label}: config keys 'beta_start' = {cfg.beta_start!r}, 'beta_end' = {cfg.beta_end!r}: "
                           "need 0 < beta_start < beta_end < 1")


def config_object(data, path: Path) -> dict:
    """A config file's top level must be a JSON object."""
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def shard_names(index, path: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names: plain file names beside it, nothing else."""
    wm = config_object(index, path).get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise WeightsError(f"{path}: key 'weight_map' must be a non-empty object of tensor name -> shard file")
    for key, shard in wm.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise WeightsError(f"{path}: key 'weight_map'.'{key}' = {shard!r} is not a .safetensors file name "
                               "in the same folder")
    return sorted(set(wm.values()))


def weight_dtype(t: torch.Tensor, key: str, label: str) -> None:
    if t.dtype not in WEIGHT_DTYPES:
        raise WeightsError(f"{label}: key '{key}' is stored as {str(t.dtype).removeprefix('torch.')}; weights must be "
                           "float32, float16, bfloat16 or float64")


def plausible_scale(component: str, maxima: list[float], label: str) -> None:
    """A documented plausibility check, not proof: trained (or randomly initialised) weight matrices have
    largest entries of order 0.01-10. fp16 bytes stored under a bf16 label decode to 1e-19..1e-5, so the
    median over a network's weight matrices of their largest |value| falls below 1e-3; that is refused."""
    if len(maxima) >= 4:
        med = sorted(maxima)[len(maxima) // 2]
        if med < 1e-3:
            raise WeightsError(f"{label}: the {component}'s weights are implausibly small (median of the weight "
                               f"matrices' largest |value| {med:.1e}): fp16 data stored under a bf16 label, or "
                               "another wrong dtype?")
