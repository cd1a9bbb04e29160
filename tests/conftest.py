"""Session fixtures for the pipeline and CLI tests: tiny random SD v1.x folders (diffusers layout, the
real CLIP vocabulary) built once per session from tests/tiny_sd.py, and a loaded `InstDiffEdit`.

The tiny models: 16x16 images, 8x8 latents, cross-attention at 8x8 (so `attention_res=8`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("INSTDIFFEDIT_TRACEBACK", "1")  # a bug in the CLI shows its traceback in the tests

TINY_ATTENTION_RES = 8  # the tiny UNet's cross-attention runs at the full 8x8 latent


@dataclass
class TinySD:
    sd: Path            # diffusers-layout SD folder (unet, vae, text_encoder, tokenizer, scheduler)
    inpaint: Path       # folder with a 9-channel inpainting unet/
    vocab: Path         # tokenizer folder (real CLIP BPE vocabulary)
    refs: tuple         # (unet, vae, text_encoder) diffusers/transformers reference modules of `sd`
    inpaint_unet: object  # diffusers reference of the inpainting UNet


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> TinySD:
    from tests.clip_vocab import real_clip_vocab_folder
    from tests.tiny_sd import reference_models, save_sd_folder

    vocab = real_clip_vocab_folder(tmp_path_factory)
    root = tmp_path_factory.mktemp("tiny_sd")
    refs = reference_models(in_channels=4, seed=0)
    save_sd_folder(root / "sd", *refs, vocab)
    inpaint_unet = reference_models(in_channels=9, seed=5)[0]
    inpaint_unet.save_pretrained(root / "inpaint" / "unet")
    return TinySD(root / "sd", root / "inpaint", vocab, refs, inpaint_unet)


@pytest.fixture(scope="session")
def pipe(tiny_sd):
    """`InstDiffEdit` on the tiny folders, fp32 on the CPU (shared: tests must not modify it)."""
    from instdiffedit import InstDiffEdit
    return InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cpu", torch.float32)


@pytest.fixture
def one_thread():
    """Run torch on one thread: the tiny models are far faster so on a shared, busy CPU (with 2 threads
    competing against other jobs they can be 100x slower). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
