"""Fetch only the files we need from the Hugging Face Hub (or its local cache).

`snapshot_download` honours HF_HUB_OFFLINE and the HF cache (HF_HOME / HF_HUB_CACHE) by itself; we
only choose allow-patterns so a download takes the safetensors of the requested components and
precision, never `.ckpt`/`.bin` pickles or the other precision's copy.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import WeightsError

# weight file stem per component in the diffusers folder layout
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def allow_patterns(components, half: bool) -> list[str]:
    pats = ["model_index.json"]
    for comp in components:
        if comp == "tokenizer":
            pats.append("tokenizer/*")
        elif comp == "scheduler":
            pats.append("scheduler/*.json")
        else:
            variant = ".fp16" if half else ""
            pats += [f"{comp}/config.json", f"{comp}/{STEMS[comp]}{variant}.safetensors",
                     f"{comp}/{STEMS[comp]}{variant}.safetensors.index.json",
                     f"{comp}/{STEMS[comp]}{variant}-*.safetensors"]
    return pats


def _has_weights(folder: Path, comp: str) -> bool:
    return comp in ("tokenizer", "scheduler") or any((folder / comp).glob("*.safetensors"))


def download(repo_id: str, components, half: bool) -> Path:
    """Return the local snapshot folder of `repo_id` holding `components`."""
    from huggingface_hub import snapshot_download

    def fetch(half_: bool) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns(components, half_)))
        except Exception as e:  # offline, not cached, gated, no network: all end here
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(e).__name__
            raise WeightsError(
                f"{repo_id}: could not get the model from the Hugging Face Hub ({why}); "
                f"fetch it on a connected machine with `hf download {repo_id}` (it lands in the HF "
                f"cache, HF_HOME) or pass a local folder or .safetensors file") from None

    folder = fetch(half)
    if not all(_has_weights(folder, c) for c in components):
        folder = fetch(not half)  # the repo has only the other precision
    return folder
