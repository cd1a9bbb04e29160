"""Provenance: what run.json (and an evaluation run's config.json) records about a run, so that a result
can be traced to its inputs, models, libraries and code, and replayed (`instdiffedit.py --replay`).

Inputs and local model files are identified by their sha256, hub models by their revision, outputs by a
hash of their pixels (so the PNG encoder's choices do not matter), the code by its git commit.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from instdiffedit import InstDiffEdit


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (read in 16 MiB blocks: model files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def pixels_sha256(img: Image.Image) -> str:
    """Hash of an image's mode, size and pixels: equal outputs hash equal whatever PNG encoder wrote them."""
    return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()


def model_hashes(pipe: "InstDiffEdit") -> dict[str, dict[str, str]]:
    """sha256 of the weight files of each local or bundled model (hub models are pinned by their revision)."""
    out = {}
    for role, r in pipe.sources.items():
        if r.revision is None:
            files = [r.path] if r.path.is_file() else sorted(f for f in r.path.rglob("*")
                                                             if f.suffix in (".safetensors", ".ckpt", ".bin"))
            out[role] = {str(f.relative_to(r.path) if f != r.path else f.name): sha256_file(f) for f in files}
    return out


def versions(device: torch.device | None = None) -> dict[str, str | None]:
    """Library versions, and the CUDA build and GPU name when running on one (for run.json, config.json)."""
    import huggingface_hub
    import numpy
    import PIL
    import safetensors
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__, "transformers": transformers.__version__,
           "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__,
           "pillow": PIL.__version__}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def code_commit() -> str | None:
    """The git commit of the code that runs (with "+dirty" for uncommitted changes); None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or Path(head.stdout.split()[0]).resolve() != here:
            return None  # not a checkout of this code (e.g. installed into a venv inside some repository)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.split()[1] + ("+dirty" if dirty else "")


def model_record(pipe: "InstDiffEdit") -> dict[str, dict]:
    """Each model's source as given, its hub revision (snapshot commit) and local path."""
    return {role: {"source": r.source, "revision": r.revision, "path": str(r.path)} for role, r in pipe.sources.items()}
