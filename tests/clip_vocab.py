"""The real CLIP BPE vocabulary for tests, rebuilt from the file shipped in the open-clip-torch wheel.

Install with ``pip install --no-deps open-clip-torch`` (``--no-deps``: it would pull torchvision). The
package is only located, never imported, since its ``__init__`` imports torchvision.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from model.tokenizer import write_clip_vocab


def clip_bpe_gz_path() -> Path | None:
    """Path of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` inside the open_clip package, or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def real_clip_vocab_folder(tmp_path_factory) -> Path:
    """A ``tokenizer/`` folder (vocab.json + merges.txt) with CLIP's 49408-token vocabulary.

    Skips the calling test when the open-clip-torch wheel is absent. Built once per test session.
    """
    gz = clip_bpe_gz_path()
    if gz is None:
        pytest.skip("real CLIP vocabulary needs the open-clip-torch wheel: pip install --no-deps open-clip-torch")
    folder = tmp_path_factory.getbasetemp() / "clip_vocab"
    if not (folder / "merges.txt").is_file():
        write_clip_vocab(gz, folder)
    return folder
