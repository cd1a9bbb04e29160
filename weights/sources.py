"""Where each model of a run comes from, settled before any weight is read.

A source is a bundled name ("toy", "toy-inpaint"), a local folder or file, or a hub repo id.
`resolve_models` settles every source a run needs in one pass, so a run that lacks two models says so
in one error listing both, each with the command that fetches exactly the files the loader reads and
the options that do without it.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import WeightsError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_INPAINT_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"  # runwayml/... was deleted
BUNDLED = {"toy": "toy-sd", "toy-inpaint": "toy-sd-inpaint"}  # name -> folder under assets/
NETWORKS = ("unet", "vae", "text_encoder")


def assets_dir() -> Path:
    """assets/ of the checkout around this package, else the installed data package of the wheel."""
    here = Path(__file__).resolve().parent.parent / "assets"
    if (here / "toy-sd").is_dir():
        return here
    spec = importlib.util.find_spec("instdiffedit_assets")  # pyproject.toml installs assets/ under this name
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    raise WeightsError("the bundled assets (toy model, CLIP vocabulary) are missing: reinstall instdiffedit")


def bundled_tokenizer() -> Path:
    """The real 49,408-token CLIP vocabulary of SD v1.x, shipped with the toy model."""
    return assets_dir() / BUNDLED["toy"] / "tokenizer"


def default_inpaint_model(model: str) -> str:
    """The inpainting model that goes with `model`: the toy one for the toy model, else SD's."""
    return "toy-inpaint" if str(model) == "toy" else DEFAULT_INPAINT_MODEL


def is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/"))


def locate(source: str | Path, components, half: bool) -> Path:
    """The local file or folder of `source`, fetched from the hub (only `components`) if need be."""
    name = str(source)
    if name in BUNDLED:
        return assets_dir() / BUNDLED[name]
    p = Path(source).expanduser()
    if p.exists():
        return p
    if is_hub_id(name):
        return hub.download(name, components, half)
    raise WeightsError(f"{source}: no such file or folder, a hub repo id (owner/name) or "
                       f"bundled model ({', '.join(BUNDLED)})")


def tokenizer_dir(path: Path) -> Path:
    """A model folder's tokenizer/, or `path` itself when it is a tokenizer folder."""
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


def _lacking(path: Path, components) -> list[str]:
    """Components a local diffusers folder does not have (a single file is checked when read)."""
    if path.is_file():
        return []
    out = [c for c in components if c in NETWORKS and not (path / c).is_dir()]
    if "tokenizer" in components and not (tokenizer_dir(path) / "vocab.json").is_file():
        out.append("tokenizer")
    return out


@dataclass
class Need:
    role: str              # what the run uses it for: "model", "inpaint model", "tokenizer"
    source: str            # as the user gave it
    components: tuple      # the parts read from it
    avoid: str = ""        # how to run without it (options of the CLI / keyword arguments of the API)


@dataclass
class Resolved:
    role: str
    source: str
    path: Path             # local file or folder
    revision: str | None   # hub commit of the snapshot; None for local and bundled sources


def resolve_models(needs: list[Need], half: bool) -> dict[str, Resolved]:
    """Locate every needed model (downloading what is allowed); one error lists everything missing."""
    found, problems = {}, []
    for need in needs:
        try:
            path = locate(need.source, need.components, half)
            lacking = _lacking(path, need.components)
            if lacking:
                raise WeightsError(f"{path}: no {', '.join(lacking)} folder (expected the diffusers layout)")
            found[need.role] = Resolved(need.role, need.source, path, hub.revision(path))
        except hub.NotAvailable as e:
            problems.append(f"{need.role} {e.repo_id} ({e.why}); fetch only the files read, on a connected "
                            f"machine:\n      {e.command}" + (f"\n    or {need.avoid}" if need.avoid else ""))
        except WeightsError as e:
            problems.append(f"{need.role}: {e}" + (f"\n    or {need.avoid}" if need.avoid else ""))
    if len(problems) == 1:
        raise WeightsError(problems[0])
    if problems:
        raise WeightsError(f"{len(problems)} models this run needs are not available:\n  - "
                           + "\n  - ".join(problems))
    return found
