"""Fetch only the files we need from the Hugging Face Hub (or its local cache).

`snapshot_download` honours HF_HUB_OFFLINE and the HF cache (HF_HOME / HF_HUB_CACHE) by itself; we
only choose allow-patterns so a download takes the safetensors of the requested components and
precision, never `.ckpt`/`.bin` pickles or the other precision's copy. The same patterns make the
`hf download ... --include ...` command an error message suggests, so it fetches what we would.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from .errors import WeightsError

# weight file stem per component in the diffusers folder layout
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# a tokenizer lives in tokenizer/ of an SD repo, or at the top of a tokenizer-only repo
# (e.g. openai/clip-vit-large-patch14); a pattern that matches nothing fetches nothing
TOKENIZER_FILES = ["tokenizer/*", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


def allow_patterns(components, half: bool) -> list[str]:
    pats = ["model_index.json"]
    for comp in components:
        if comp == "tokenizer":
            pats += TOKENIZER_FILES
        elif comp == "scheduler":
            pats.append("scheduler/*.json")
        else:
            variant = ".fp16" if half else ""
            pats += [f"{comp}/config.json", f"{comp}/{STEMS[comp]}{variant}.safetensors",
                     f"{comp}/{STEMS[comp]}{variant}.safetensors.index.json",
                     f"{comp}/{STEMS[comp]}{variant}-*.safetensors"]
    return pats


def download_command(repo_id: str, components, half: bool) -> str:
    """The `hf download` command that fetches exactly what `download` would ask for."""
    return f"hf download {repo_id} " + " ".join(f"--include {shlex.quote(p)}"
                                                 for p in allow_patterns(components, half))


class NotAvailable(WeightsError):
    """A hub model that could not be fetched; `command` fetches only the files the loader reads."""

    def __init__(self, repo_id: str, why: str, command: str):
        self.repo_id, self.why, self.command = repo_id, why, command
        super().__init__(f"{repo_id}: could not get the model from the Hugging Face Hub ({why}); fetch it "
                         f"on a connected machine with `{command}` (it lands in the HF cache, HF_HOME) "
                         f"or pass a local folder or .safetensors file")


def _has_weights(folder: Path, comp: str) -> bool:
    if comp == "tokenizer":
        return (folder / "tokenizer" / "vocab.json").is_file() or (folder / "vocab.json").is_file()
    return comp == "scheduler" or any((folder / comp).glob("*.safetensors"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download(repo_id: str, components, half: bool) -> Path:
    """Return the local snapshot folder of `repo_id` holding `components` (raises NotAvailable)."""
    from huggingface_hub import snapshot_download

    def fetch(half_: bool) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns(components, half_)))
        except Exception as e:  # offline, not cached, gated, no network: all end here
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline() else type(e).__name__
            raise NotAvailable(repo_id, why, download_command(repo_id, components, half)) from None

    folder = fetch(half)
    if not all(_has_weights(folder, c) for c in components):
        folder = fetch(not half)  # the repo has only the other precision
    lacking = [c for c in components if not _has_weights(folder, c)]
    if lacking:
        raise NotAvailable(repo_id, f"the snapshot has no {', '.join(lacking)} files",
                           download_command(repo_id, components, half))
    return folder


def revision(folder: Path) -> str | None:
    """The commit hash of a hub snapshot folder (.../snapshots/<hash>); None for other folders."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None
