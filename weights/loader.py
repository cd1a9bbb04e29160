"""Load SD v1.x weights into our modules: a hub repo id, a diffusers-layout folder, or a single file.

Every network is built on the meta device and filled with ``load_state_dict(strict=True,
assign=True)``, reading one tensor at a time straight to the target device and dtype, so no second
full copy of the model is ever held in RAM. Checkpoints are read through safetensors; `.ckpt`/`.bin`
only through ``torch.load(weights_only=True)``, which refuses arbitrary pickled code.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from . import checks, compvis, hub
from .errors import WeightsError, one_line
from .sources import DEFAULT_MODEL, bundled_tokenizer, locate, tokenizer_dir
ALL = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

Getter = Callable[[], torch.Tensor]


def _networks():
    from model.clip import CLIPTextConfig, CLIPTextModel
    from model.unet import UNet2DConditionModel, UNetConfig
    from model.vae import AutoencoderKL, VAEConfig
    return {"unet": (UNet2DConditionModel, UNetConfig), "vae": (AutoencoderKL, VAEConfig),
            "text_encoder": (CLIPTextModel, CLIPTextConfig)}


@dataclass
class StableDiffusion:
    """What `load` returns; components that were not asked for are None."""
    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    scheduler_config: dict | None = None  # scheduler/scheduler_config.json, if the source has one
    source: str = ""


# ---------------------------------------------------------------- reading checkpoint files

def open_checkpoint(path: Path) -> dict[str, Getter]:
    """Key -> lazy tensor getter for one .safetensors (or weights-only .ckpt/.bin/.pt) file."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            keys = list(f.keys())
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({one_line(e, 200)})") from None
        return {k: (lambda k=k: _get(f, k, path)) for k in keys}
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot be read as a weights-only checkpoint ({one_line(e, 200)})") from None
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        return {k: (lambda v=v: v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise WeightsError(f"{path}: unknown checkpoint type '{path.suffix}' (want .safetensors or .ckpt)")


def _get(f, key: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:  # a truncated file fails here, not at open
        raise WeightsError(f"{path}: tensor '{key}' cannot be read ({one_line(e, 200)})") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8; RecursionError: deep nesting
        raise WeightsError(f"{path}: not valid JSON ({one_line(e, 200)})") from None


def _read_config(path: Path) -> dict:
    return checks.config_object(_read_json(path), path)


# ---------------------------------------------------------------- building one network

def build(component: str, tensors: dict[str, Getter], label: str, config: dict | None = None,
          device="cpu", dtype=torch.float32, overrides: dict | None = None,
          config_label: str | None = None) -> torch.nn.Module:
    """Build network `component` on the meta device and fill it from `tensors` (strict).

    Every stored tensor must be float32/16, bfloat16 or float64 (checks.WEIGHT_DTYPES) and is cast
    explicitly to `dtype`; integer, bool and float8 tensors are refused by key."""
    cls, cfg_cls = _networks()[component]
    config_label = config_label or label
    try:
        cfg = cfg_cls.from_dict(checks.config_object(config, Path(config_label))) if config else cfg_cls()
        for k, v in (overrides or {}).items():
            setattr(cfg, k, v)
    except (ValueError, TypeError, AttributeError) as e:  # the config classes' own refusals, wrong types
        raise WeightsError(f"{config_label}: unsupported config ({one_line(e, 200)})") from None
    checks.check_config(cfg, config_label)
    try:
        with torch.device("meta"):
            model = cls(cfg)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:  # e.g. heads not dividing the width
        raise WeightsError(f"{config_label}: the config does not describe a buildable {component} "
                           f"({one_line(e, 200)})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = {k: g for k, g in tensors.items() if not k.endswith("position_ids")}  # a buffer in HF, not a weight

    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing:
        raise WeightsError(f"{label}: missing key '{missing[0]}'" + _more(missing))
    if unexpected:
        raise WeightsError(f"{label}: unexpected key '{unexpected[0]}'" + _more(unexpected))

    state, maxima = {}, []
    for key, get in tensors.items():
        t = get()
        checks.weight_dtype(t, key, label)
        if t.dim() == 4 and t.shape[2:] == (1, 1) and len(expected[key]) == 2:
            t = t[:, :, 0, 0]  # 1x1-conv attention projections of older VAEs -> linear
        if tuple(t.shape) != expected[key]:
            raise WeightsError(
                f"{label}: key '{key}' has shape {tuple(t.shape)}, expected {expected[key]} "
                f"(an SD 2.x or other non-v1 checkpoint, or a config that does not match the weights?)")
        # a NaN/inf anywhere makes the sum non-finite (one fast pass); only then look element-wise,
        # since a sum of large finite values may also overflow
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) \
                and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{label}: key '{key}' contains NaN or inf values")
        if t.dim() >= 2 and t.numel() >= 16:  # weight matrices: a strided sample's largest |value|
            maxima.append(float(t.reshape(-1)[:: max(1, t.numel() // 4096)].float().abs().max()))
        state[key] = t.to(device=device, dtype=dtype)  # the explicit cast of every weight to the run's dtype
    checks.plausible_scale(component, maxima, label)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # whatever strict loading still finds wrong in the checkpoint
        raise WeightsError(f"{label}: cannot load the weights ({one_line(e, 200)})") from None
    return model.eval().requires_grad_(False)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


# ---------------------------------------------------------------- the diffusers folder layout

_VAE_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename(component: str, key: str) -> str:
    if component == "text_encoder":
        return key.removeprefix("text_model.")  # on disk the HF CLIP keys keep this prefix
    if component == "vae":  # diffusers < 0.14 attention names, still in the v1.4 VAE file
        return re.sub(r"\.(query|key|value|proj_attn)\.",
                      lambda m: "." + _VAE_OLD_ATTN[m[1]] + ".", key)
    return key


def weight_files(folder: Path, component: str, half: bool) -> list[Path]:
    stem = hub.STEMS[component]
    order = [f"{stem}.fp16", stem] if half else [stem, f"{stem}.fp16"]
    for name in order:
        if (folder / f"{name}.safetensors").is_file():
            return [folder / f"{name}.safetensors"]
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            return [folder / s for s in checks.shard_names(_read_json(index), index)]
    for name in order:  # pickled weights only as the last resort, read weights-only
        if (folder / f"{name}.bin").is_file():
            return [folder / f"{name}.bin"]
    raise WeightsError(f"{folder}: no {stem}.safetensors (or .fp16 / sharded / .bin variant) found")


def load_component(folder: Path, component: str, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    sub = folder / component
    if not sub.is_dir():
        raise WeightsError(f"{sub}: missing folder (expected the diffusers layout: unet/, vae/, text_encoder/, ...)")
    files = weight_files(sub, component, half=dtype in (torch.float16, torch.bfloat16))
    tensors: dict[str, Getter] = {}
    for f in files:
        tensors.update({_rename(component, k): g for k, g in open_checkpoint(f).items()})
    cfg_path = sub / "config.json"
    config = _read_config(cfg_path) if cfg_path.is_file() else None
    label = str(files[0]) if len(files) == 1 else str(sub)
    return build(component, tensors, label, config, device, dtype, config_label=str(cfg_path))


def load_tokenizer(folder: Path):
    from model.tokenizer import Tokenizer
    # SD v1 repos carry vocab.json + merges.txt; current transformers / diffusers save tokenizer.json
    bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not bpe_files and not (folder / "tokenizer.json").is_file():
        raise WeightsError(f"{folder}: missing tokenizer files (vocab.json and merges.txt, or tokenizer.json)")
    try:
        return Tokenizer.from_folder(folder)
    except Exception as e:
        raise WeightsError(f"{folder}: cannot load the CLIP tokenizer ({one_line(e, 200)})") from None


# ---------------------------------------------------------------- the CompVis single file

def load_single_file(path: Path, components, device="cpu", dtype=torch.float32,
                     tokenizer_source: str | Path | None = None, configs: dict | None = None) -> StableDiffusion:
    raw = open_checkpoint(path)
    parts = compvis.split_single_file(raw.keys())
    out = StableDiffusion(source=str(path))
    for comp in ("unet", "vae", "text_encoder"):
        if comp not in components:
            continue
        if not parts[comp]:
            raise WeightsError(f"{path}: no '{compvis.PREFIXES[comp]}*' keys (not a CompVis SD v1.x checkpoint?)")
        tensors = {new: raw[old] for new, old in parts[comp].items()}
        overrides = {}
        if comp == "unet":  # the inpainting UNet differs only in its input channels
            overrides["in_channels"] = int(raw[compvis.PREFIXES["unet"] + "input_blocks.0.0.weight"]().shape[1])
        config = (configs or {}).get(comp)  # a single file carries no config: SD v1.x unless given
        setattr(out, comp, build(comp, tensors, str(path), config, device, dtype, overrides))
    if "tokenizer" in components:  # a single file carries no tokenizer: SD v1.x's vocabulary is bundled
        src = locate(tokenizer_source, ("tokenizer",), half=False) if tokenizer_source else bundled_tokenizer()
        out.tokenizer = load_tokenizer(tokenizer_dir(src))
    return out


def check_scheduler_config(config: dict, path: Path | str) -> None:
    """The sampler's config, parsed now so that a bad value is a WeightsError at load, not an error mid-run."""
    from sampler import SchedulerConfig
    try:
        cfg = SchedulerConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: unsupported scheduler config ({one_line(e, 200)})") from None
    checks.check_config(cfg, str(path))


# ---------------------------------------------------------------- one entry point

def load(source: str | Path = DEFAULT_MODEL, components=ALL, device="cpu", dtype=torch.float32,
         tokenizer_source: str | Path | None = None, configs: dict | None = None) -> StableDiffusion:
    """Load SD v1.x from a hub repo id, a diffusers-layout folder, a CompVis single file or "toy".

    `components` picks any of unet, vae, text_encoder, tokenizer, scheduler (e.g. only ("unet",)
    for the inpainting model). `tokenizer_source` (a model or tokenizer folder, or a hub id)
    replaces the source's own tokenizer; a single file has none, so it defaults to the CLIP
    vocabulary bundled with the package. A single file takes its network configs
    from `configs` ({"unet": config.json dict, ...}; default: SD v1.x's, the UNet's input channels
    read off the weights).
    """
    components = tuple(components)
    unknown = set(components) - set(ALL)
    if unknown:
        raise WeightsError(f"unknown component '{sorted(unknown)[0]}' (choose from {', '.join(ALL)})")
    half = dtype in (torch.float16, torch.bfloat16)
    path = locate(source, components, half)
    if path.is_file():
        return load_single_file(path, components, device, dtype, tokenizer_source, configs)
    out = StableDiffusion(source=str(source))
    for comp in ("unet", "vae", "text_encoder"):
        if comp in components:
            setattr(out, comp, load_component(path, comp, device, dtype))
    if "tokenizer" in components:
        tok = locate(tokenizer_source, ("tokenizer",), half) if tokenizer_source else path
        out.tokenizer = load_tokenizer(tokenizer_dir(tok))
    if "scheduler" in components:
        cfg = path / "scheduler" / "scheduler_config.json"
        out.scheduler_config = _read_config(cfg) if cfg.is_file() else None
        if out.scheduler_config:
            check_scheduler_config(out.scheduler_config, cfg)
    return out
