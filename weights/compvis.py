"""CompVis (original LDM) single-file checkpoint -> diffusers key layout, by rules.

The original `sd-v1-4.ckpt` / `.safetensors` holds all three networks under
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (CLIP). The layouts differ only in a handful of systematic
ways, so a few rules replace a per-key table (compare diffusers' convert_from_ckpt.py):

* UNet: ``input_blocks.i`` / ``output_blocks.i`` are flat lists; block and layer indices follow by
  index arithmetic from ``layers_per_block``. ResNet sub-layers have other names.
* VAE: ``decoder.up`` is stored in reverse order; mid-block attention is a 1x1 conv with
  ``q/k/v/proj_out`` names (the loader squeezes (C, C, 1, 1) weights to linear by shape).
* CLIP: strip the prefix.

Keys outside the three networks (``model_ema.*``, schedule buffers, ``loss.*``) are ignored.
"""
from __future__ import annotations

import re

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(key: str, layers_per_block: int = 2) -> str:
    per_block = layers_per_block + 1  # resnets (+ attentions) then one down/up-sampler slot
    simple = {"input_blocks.0.0.": "conv_in.", "time_embed.0.": "time_embedding.linear_1.",
              "time_embed.2.": "time_embedding.linear_2.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"middle_block\.(\d)\.(.*)", key):
        i, rest = int(m[1]), m[2]
        return ("mid_block.attentions.0." + rest if i == 1
                else f"mid_block.resnets.{i // 2}." + _sub(rest, _RESNET))
    if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", key):
        i, k, rest = int(m[1]) - 1, int(m[2]), m[3]
        b, j = divmod(i, per_block)
        if j == layers_per_block:  # the downsampler slot
            return f"down_blocks.{b}.downsamplers.0.conv." + rest.removeprefix("op.")
        return (f"down_blocks.{b}.resnets.{j}." + _sub(rest, _RESNET) if k == 0
                else f"down_blocks.{b}.attentions.{j}." + rest)
    if m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", key):
        i, k, rest = int(m[1]), int(m[2]), m[3]
        b, j = divmod(i, per_block)
        if k == 0:
            return f"up_blocks.{b}.resnets.{j}." + _sub(rest, _RESNET)
        if rest.startswith("conv."):  # Upsample sits after the resnet (and the attention, if any)
            return f"up_blocks.{b}.upsamplers.0." + rest
        return f"up_blocks.{b}.attentions.{j}." + rest
    return key


def vae_key(key: str, num_blocks: int = 4) -> str:
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.",
                 lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    if m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(.*)", key):
        return f"{m[1]}.mid_block.attentions.0." + _sub(m[2], _VAE_ATTN)
    if m := re.match(r"encoder\.down\.(\d+)\.(block|downsample)\.(.*)", key):
        return (f"encoder.down_blocks.{m[1]}.resnets." + m[3] if m[2] == "block"
                else f"encoder.down_blocks.{m[1]}.downsamplers.0." + m[3])
    if m := re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", key):
        b = num_blocks - 1 - int(m[1])  # CompVis stores the decoder's up blocks lowest-resolution last
        return (f"decoder.up_blocks.{b}.resnets." + m[3] if m[2] == "block"
                else f"decoder.up_blocks.{b}.upsamplers.0." + m[3])
    return key


def clip_key(key: str) -> str:
    return key.removeprefix("text_model.")


def split_single_file(keys, layers_per_block: int = 2, vae_blocks: int = 4) -> dict[str, dict[str, str]]:
    """Map every CompVis key to (component, diffusers key): returns {component: {new_key: old_key}}.
    Only names are converted here; tensors are read one at a time by the loader."""
    out: dict[str, dict[str, str]] = {name: {} for name in PREFIXES}
    convert = {"unet": lambda k: unet_key(k, layers_per_block), "vae": lambda k: vae_key(k, vae_blocks),
               "text_encoder": clip_key}
    for key in keys:
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if not rest.startswith("loss."):
                    out[name][convert[name](rest)] = key
                break
    return out
