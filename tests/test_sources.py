"""Model resolution: the bundled toy model and CLIP vocabulary, --tokenizer, and one error listing every
missing model with the `hf download --include ...` command that fetches exactly what the loader reads."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.clip_vocab import real_clip_vocab_folder
from tests.tiny_sd import sd_structured_references, write_single_file
from weights import WeightsError, bundled_tokenizer, load

ROOT = Path(__file__).resolve().parents[1]

# A file list in the manner of CompVis/stable-diffusion-v1-4 on the hub, with the pickles, Flax and fp16
# copies and the safety checker that a plain `hf download` would fetch.
SD14_FILES = """model_index.json README.md v1-variants-scores.jpg feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.safetensors safety_checker/pytorch_model.bin
scheduler/scheduler_config.json text_encoder/config.json text_encoder/model.safetensors
text_encoder/model.fp16.safetensors text_encoder/pytorch_model.bin text_encoder/flax_model.msgpack
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.bin unet/diffusion_flax_model.msgpack vae/config.json
vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.bin""".split()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return real_clip_vocab_folder(tmp_path_factory)


def _offline_error(code: str, tmp_path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    return r.stdout + r.stderr


def _selected(command: str) -> set[str]:
    """The files of SD14_FILES that `command` would download, by huggingface_hub's own pattern filter."""
    from huggingface_hub.utils import filter_repo_objects
    words = shlex.split(command)
    patterns = [words[i + 1] for i, w in enumerate(words) if w == "--include"]
    return set(filter_repo_objects(SD14_FILES, allow_patterns=patterns))


def test_cli_lists_both_missing_models_in_one_error(tmp_path):
    # the image is checked first: make it exist so that the models are what fails
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    out = _offline_error("import instdiffedit, sys; sys.exit(instdiffedit.main(['--image', 'x.png', "
                         "'--edit', 'a dog', '--out', 'o', '--device', 'cpu']))", tmp_path)
    assert "Traceback" not in out and out.startswith("error: 2 models this run needs are not available")
    commands = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("hf download")]
    assert len(commands) == 2
    sd, inpaint = commands
    assert sd.startswith("hf download CompVis/stable-diffusion-v1-4 ")
    assert inpaint.startswith("hf download stable-diffusion-v1-5/stable-diffusion-inpainting ")
    assert "--no-inpaint" in out and "--inpaint-model" in out
    # fp32 on the CPU: exactly the configs, fp32 safetensors, tokenizer and scheduler; no pickles, Flax, fp16
    assert _selected(sd) == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                             "text_encoder/model.safetensors", "unet/config.json",
                             "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                             "vae/diffusion_pytorch_model.safetensors", "tokenizer/merges.txt",
                             "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                             "tokenizer/vocab.json"}
    assert _selected(inpaint) == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}


def test_api_lists_hub_and_local_problems_together(tmp_path):
    out = _offline_error("from instdiffedit import InstDiffEdit\n"
                         "InstDiffEdit.from_pretrained('CompVis/stable-diffusion-v1-4', './nowhere', 'cpu', "
                         "tokenizer='openai/clip-vit-large-patch14')", tmp_path)
    last = out.strip().splitlines()
    head = next(ln for ln in last if ln.startswith("weights.errors.WeightsError:"))
    assert head.endswith("3 models this run needs are not available:")
    assert any(ln.startswith("  - inpaint model: ./nowhere: no such file or folder") for ln in last)
    tok = [ln.strip() for ln in last if ln.strip().startswith("hf download openai/clip-vit-large-patch14")]
    assert len(tok) == 1 and "vocab.json" in tok[0] and "safetensors" not in tok[0]


def test_toy_is_a_model_name_everywhere():
    from instdiffedit import InstDiffEdit
    sd = load("toy", components=("tokenizer", "scheduler"))
    assert len(sd.tokenizer.tok) == 49408
    pipe = InstDiffEdit.from_pretrained("toy", device="cpu")
    assert pipe.inpaint_unet is not None and pipe.inpaint_unet.config.in_channels == 9  # "auto": toy-inpaint
    assert pipe.sources["model"].revision is None and pipe.sources["inpaint model"].path.name == "toy-sd-inpaint"


def test_single_file_uses_the_bundled_vocabulary_offline(tmp_path, vocab, monkeypatch):
    """No hub access at all: a single file gets SD v1.x's CLIP vocabulary from the package."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    refs = sd_structured_references()
    f = write_single_file(tmp_path / "sd.safetensors", *refs)
    unet, vae, clip = refs
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": clip.config.to_dict()}
    sd = load(f, components=("text_encoder", "tokenizer"), configs=configs)
    # the bundled vocabulary gives the same ids as the real CLIP vocabulary rebuilt from OpenAI's BPE file
    ref = load(f, components=("tokenizer",), configs=configs, tokenizer_source=vocab).tokenizer
    text = "a photograph of an astronaut riding a horse, trending"
    assert torch.equal(sd.tokenizer.encode(text), ref.encode(text))
    assert bundled_tokenizer().is_dir()


def test_tokenizer_override_for_a_folder(tmp_path, vocab):
    from tests.tiny_sd import reference_models, save_sd_folder
    folder = save_sd_folder(tmp_path / "sd", *reference_models(), None)  # no tokenizer/ in the folder
    with pytest.raises(WeightsError, match="vocab.json"):
        load(folder, components=("tokenizer",))
    sd = load(folder, components=("tokenizer",), tokenizer_source=vocab)
    assert sd.tokenizer.encode("a cat")[0, :4].tolist() == [49406, 320, 2368, 49407]
