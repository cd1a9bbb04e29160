"""The loader: diffusers folders, CompVis single files and the hub, against diffusers/transformers
models with the same weights; and every kind of bad checkpoint gives a one-line error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clip_vocab import real_clip_vocab_folder
from tests.tiny_sd import (assert_same_networks, reference_models, reference_keys, save_sd_folder,
                           sd_structured_references, write_single_file)
from weights import WeightsError, compvis, load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return real_clip_vocab_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, vocab):
    refs = reference_models()
    folder = save_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", *refs, vocab)
    return folder, refs


# ---------------------------------------------------------------- diffusers folder layout

def test_diffusers_folder_matches_reference(tiny):
    folder, refs = tiny
    sd = load(folder)
    assert_same_networks(sd, refs)
    assert sd.tokenizer.encode("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear"
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in sd.unet.parameters())


def test_tokenizer_folder_with_only_tokenizer_json(tmp_path, tiny, vocab):
    """What current transformers / diffusers save: tokenizer.json + tokenizer_config.json, no vocab.json
    or merges.txt. The ids must equal those of the vocab.json + merges.txt folder."""
    import shutil

    from transformers import CLIPTokenizerFast
    folder, _ = tiny
    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "tokenizer")
    CLIPTokenizerFast.from_pretrained(str(vocab)).save_pretrained(str(copy / "tokenizer"))
    for name in ("vocab.json", "merges.txt"):
        (copy / "tokenizer" / name).unlink(missing_ok=True)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (copy / "tokenizer").iterdir()}
    text = "a Shih-Tzu in a t-shirt, axolotl"
    new, old = load(copy, components=("tokenizer",)).tokenizer, load(folder, components=("tokenizer",)).tokenizer
    assert torch.equal(new.encode(text), old.encode(text)) and new.words(text) == old.words(text)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="tokenizer.json"):
        load(copy, components=("tokenizer",))


def test_components_and_dtype(tiny):
    folder, refs = tiny
    sd = load(folder, components=("unet",), dtype=torch.bfloat16)
    assert sd.vae is None and sd.text_encoder is None and sd.tokenizer is None
    assert {p.dtype for p in sd.unet.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in sd.unet.parameters())


def test_fp16_variant_chosen_for_half_precision(tmp_path, tiny):
    folder, (unet_ref, _, _) = tiny
    import shutil
    shutil.copytree(folder / "unet", tmp_path / "m" / "unet")
    sd32 = load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))
    # a distinguishable fp16 copy: if the loader picks it, the weights differ by this offset
    save_file({k: (v + 1).half() for k, v in sd32.items()},
              str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    w = "conv_in.weight"
    half = load(tmp_path / "m", components=("unet",), dtype=torch.float16).unet.state_dict()[w]
    full = load(tmp_path / "m", components=("unet",)).unet.state_dict()[w]
    assert torch.allclose(full, sd32[w])
    assert torch.allclose(half.float(), (sd32[w] + 1).half().float())
    # only the fp16 file present: fp32 loads it too
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert load(tmp_path / "m", components=("unet",)).unet.state_dict()[w].dtype == torch.float32


def test_old_vae_attention_names_and_1x1_conv_weights(tmp_path, tiny):
    folder, refs = tiny
    import shutil
    shutil.copytree(folder, tmp_path / "m")
    f = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(str(f)).items():
        for new, o in old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{o}.")
                v = v[:, :, None, None] if v.dim() == 2 else v
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(f))
    assert_same_networks(load(tmp_path / "m", components=("vae",)), refs)


def test_sharded_weights(tmp_path, tiny):
    folder, refs = tiny
    import json
    sd = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(tmp_path / "m" / "unet" / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    assert_same_networks(load(tmp_path / "m", components=("unet",)), refs)


# ---------------------------------------------------------------- CompVis single file

def test_compvis_rules_give_exactly_the_diffusersreference_keys():
    """The real v1.4 single-file key list, converted by our rules, is exactly the diffusers key list."""
    parts = compvis.split_single_file(sorted(reference_keys("single_file_ldm.txt")))
    assert set(parts["unet"]) == reference_keys("unet.txt")
    assert set(parts["vae"]) == reference_keys("vae.txt")
    assert set(parts["text_encoder"]) - {"embeddings.position_ids"} == reference_keys("text_encoder.txt")
    assert sum(len(p) for p in parts.values()) == len(reference_keys("single_file_ldm.txt"))  # a bijection


def _configs(refs) -> dict:
    unet, vae, clip = refs
    return {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": clip.config.to_dict()}


@pytest.mark.parametrize("in_channels", [4, 9])
def test_single_file_matches_reference(tmp_path, vocab, in_channels):
    refs = sd_structured_references(in_channels)
    # keys outside the three networks, as in the real file, are ignored
    extra = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.rand(1000)}
    f = write_single_file(tmp_path / "sd.safetensors", *refs, extra=extra)
    sd = load(f, tokenizer_source=vocab, configs=_configs(refs))
    assert sd.unet.config.in_channels == in_channels
    assert_same_networks(sd, refs)


def test_ckpt_single_file_through_weights_only(tmp_path, vocab):
    refs = sd_structured_references()
    f = write_single_file(tmp_path / "sd.safetensors", *refs)
    torch.save({"state_dict": load_file(str(f)), "global_step": 470000}, tmp_path / "sd.ckpt")
    sd = load(tmp_path / "sd.ckpt", components=("unet", "text_encoder"), configs=_configs(refs))
    assert sd.vae is None
    assert_same_networks(sd, refs)


# ---------------------------------------------------------------- the hub

def test_hub_download_asks_only_for_needed_safetensors(monkeypatch, tmp_path, tiny):
    folder, refs = tiny
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        """Like the hub: the snapshot holds only the repo files matching the patterns."""
        import fnmatch
        import shutil
        calls.append((repo_id, allow_patterns))
        snap = tmp_path / "snapshot"
        for f in folder.rglob("*"):
            rel = f.relative_to(folder).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snap / rel)
        return str(snap)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sd = load("CompVis/stable-diffusion-v1-4", components=("unet", "tokenizer"), dtype=torch.float16)
    assert sd.unet is not None and sd.tokenizer is not None
    # the folder has only fp32 weights, so after the fp16 request the loader asks for fp32
    (repo, first), (_, second) = calls
    assert repo == "CompVis/stable-diffusion-v1-4"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in first
    assert "unet/diffusion_pytorch_model.safetensors" in second and "tokenizer/*" in first
    assert not any(p.endswith((".ckpt", ".bin")) or "vae" in p or "text_encoder" in p for p in first + second)


def test_hub_offline_and_not_cached_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    code = "from weights import load\nload('CompVis/stable-diffusion-v1-4')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "CompVis/stable-diffusion-v1-4: could not get the model" in last and "HF_HUB_OFFLINE" in last
    assert "hf download CompVis/stable-diffusion-v1-4 --include" in last


# ---------------------------------------------------------------- bad inputs

def _copy(tiny, tmp_path) -> Path:
    import shutil
    return Path(shutil.copytree(tiny[0], tmp_path / "m"))


def _edit_unet(folder: Path, fn) -> Path:
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))
    return f


def _err(source, **kw) -> str:
    with pytest.raises(WeightsError) as e:
        load(source, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_and_file(tmp_path, tiny):
    assert str(tmp_path / "nope") in _err(tmp_path / "nope")
    m = _copy(tiny, tmp_path)
    (m / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert "unet" in _err(m, components=("unet",)) and "no diffusion_pytorch_model.safetensors" in _err(m)
    import shutil
    shutil.rmtree(m / "vae")
    assert "missing folder" in _err(m, components=("vae",))
    assert "no such file" in _err(tmp_path / "x.safetensors")


def test_missing_and_unexpected_key(tmp_path, tiny):
    m = _copy(tiny, tmp_path)
    f = _edit_unet(m, lambda sd: sd.pop("conv_in.bias"))
    msg = _err(m, components=("unet",))
    assert str(f) in msg and "missing key 'conv_in.bias'" in msg
    _edit_unet(m, lambda sd: sd.update({"conv_in.bias": torch.zeros(32), "extra.weight": torch.zeros(1)}))
    assert "unexpected key 'extra.weight'" in _err(m, components=("unet",))


def test_wrong_shape_names_key_and_shapes(tmp_path, tiny):
    m = _copy(tiny, tmp_path)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    # an SD 2.x-like text width (1024 instead of our 32)
    f = _edit_unet(m, lambda sd: sd.update({key: torch.zeros(sd[key].shape[0], 1024)}))
    msg = _err(m, components=("unet",))
    assert str(f) in msg and key in msg and "1024" in msg and "SD 2.x" in msg


def test_nan_weights(tmp_path, tiny):
    m = _copy(tiny, tmp_path)
    _edit_unet(m, lambda sd: sd["conv_out.weight"].view(-1).__setitem__(3, float("nan")))
    assert "'conv_out.weight' contains NaN or inf" in _err(m, components=("unet",))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "pickle", "empty"])
def test_damaged_safetensors(tmp_path, tiny, damage):
    m = _copy(tiny, tmp_path)
    f = m / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    if damage == "corrupt":
        f.write_bytes(os.urandom(len(data)))
    elif damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "pickle":
        torch.save({"conv_in.weight": torch.zeros(1)}, f)
    else:
        f.write_bytes(b"")
    msg = _err(m, components=("unet",))
    assert str(f) in msg


def test_malicious_pickle_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Boom()}))
    msg = _err(tmp_path / "evil.ckpt")
    assert "evil.ckpt" in msg and "weights-only" in msg
    assert not (tmp_path / "pwned").exists()


def test_unsupported_config_names_file_and_key(tmp_path, tiny):
    import json
    m = _copy(tiny, tmp_path)
    cfg_path = m / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_linear_projection"] = True  # SD 2.x
    cfg_path.write_text(json.dumps(cfg))
    msg = _err(m, components=("unet",))
    assert "use_linear_projection" in msg and "unet" in msg


# ---------------------------------------------------------------- hostile configs and dtypes (issue 11)

def _set_config(m: Path, comp: str, key, value, name="config.json") -> Path:
    import json
    p = m / comp / name
    cfg = json.loads(p.read_text())
    if key is None:
        cfg = [cfg]  # the whole file a JSON list
    else:
        cfg[key] = value
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("comp,key,value,fragment", [
    ("unet", None, None, "expected a JSON object"),
    ("unet", "sample_size", 0, "'sample_size' = 0"),
    ("unet", "sample_size", "64", "'sample_size' = '64'"),
    ("unet", "block_out_channels", [32, "64"], "block_out_channels"),
    ("vae", "scaling_factor", "x", "'scaling_factor' = 'x'"),
    ("vae", "scaling_factor", 0, "'scaling_factor' = 0"),
    ("vae", None, None, "expected a JSON object"),
    ("text_encoder", "hidden_size", 2 ** 70, "hidden_size"),
    ("text_encoder", "layer_norm_eps", -1.0, "layer_norm_eps"),
    ("scheduler", "num_train_timesteps", 0, "num_train_timesteps"),
    ("scheduler", "num_train_timesteps", "1000", "num_train_timesteps"),
    ("scheduler", "beta_end", -0.01, "beta_end"),
    ("scheduler", "beta_start", 0.5, "beta_start"),
    ("scheduler", "prediction_type", "noise", "prediction_type"),
    ("scheduler", None, None, "expected a JSON object"),
])
def test_bad_config_values_name_file_and_key(tmp_path, tiny, comp, key, value, fragment):
    m = _copy(tiny, tmp_path)
    p = _set_config(m, comp, key, value, "scheduler_config.json" if comp == "scheduler" else "config.json")
    msg = _err(m, components=(comp,))
    assert str(p) in msg and fragment in msg, msg


@pytest.mark.parametrize("index,fragment", [
    ([["conv_in.weight", "a.safetensors"]], "expected a JSON object"),
    ({"weight_map": ["a.safetensors"]}, "weight_map"),
    ({"weight_map": {"conv_in.weight": 3}}, "'conv_in.weight' = 3"),
    ({"weight_map": {"conv_in.weight": "../../secret.safetensors"}}, "not a .safetensors file name"),
])
def test_bad_sharded_index(tmp_path, tiny, index, fragment):
    import json
    m = _copy(tiny, tmp_path)
    (m / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    idx = m / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    idx.write_text(json.dumps(index))
    msg = _err(m, components=("unet",))
    assert str(idx) in msg and fragment in msg, msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_float_checkpoint_dtypes_are_refused_by_key(tmp_path, tiny, dtype):
    m = _copy(tiny, tmp_path)
    f = _edit_unet(m, lambda sd: sd.update({"conv_in.weight": sd["conv_in.weight"].to(dtype)}))
    msg = _err(m, components=("unet",))
    assert str(f) in msg and "'conv_in.weight'" in msg and str(dtype).removeprefix("torch.") in msg, msg


@pytest.mark.parametrize("stored,run", [(torch.float64, torch.float32), (torch.float16, torch.float32),
                                        (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_float_dtypes_are_cast_to_the_run_dtype(tmp_path, tiny, stored, run):
    m = _copy(tiny, tmp_path)
    f = m / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    save_file({k: v.to(stored) for k, v in sd.items()}, str(f))
    unet = load(m, components=("unet",), dtype=run).unet
    assert {p.dtype for p in unet.parameters()} == {run}
    assert torch.equal(unet.conv_in.weight.float(), sd["conv_in.weight"].to(stored).to(run).float())


def test_fp16_bytes_relabelled_bf16_are_refused(tmp_path, tiny):
    """The raw fp16 bytes of every tensor, with the header saying BF16: values decode to 1e-19..1e-5."""
    m = _copy(tiny, tmp_path)
    f = m / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    save_file({k: v.half().view(torch.bfloat16) for k, v in sd.items()}, str(f))
    msg = _err(m, components=("unet",))
    assert str(f) in msg and "implausibly small" in msg, msg
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(f))  # honest bf16 loads
    load(m, components=("unet",))
