"""Multi-head attention shared by the UNet and the VAE, and the control protocol of the UNet.

Layout follows diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so checkpoint
keys load without a mapping table. The fast path is ``F.scaled_dot_product_attention``; a layer that
a control asks for computes the softmax explicitly, hands the probabilities to the control and
continues with whatever the control hands back.

The control is an object passed down through the UNet's ``forward`` (no global state, no
monkey-patching). It sees three kinds of layer, told apart by their dotted module path:

* ``...attn1``: self-attention (probabilities ``(batch, heads, pixels, pixels)``);
* ``...attn2``: cross-attention to the text (``(batch, heads, pixels, tokens)``);
* ``...resnets.N``: a ResNet block; the control gets its residual branch ``(batch, ch, h, w)``
  (conv2's output, before the skip is added: where Plug-and-Play injects its features).

For each layer and each forward the UNet first asks ``wants(name, hw)`` (``hw`` is the layer's
query / feature grid). Only when it says yes does the layer leave its fast path and call
``attention(name, probs)`` or ``features(name, h)``, whose return value replaces ``probs`` / ``h``
(return the argument unchanged to observe only). Layers nobody wants pay one Python call.
``UNetControl`` below is the do-nothing base; ``mask/store.py`` (InstDiffEdit's map recorder) and
``methods/ptp.py`` / ``methods/pnp.py`` are its users.

The older *recorder* protocol (``wants(name, hw)`` + ``record(name, probs)``, cross-attention
only) is still accepted by ``unet(..., recorder=)``; ``as_control`` wraps such an object.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class UNetControl:
    """Observe or replace attention probabilities and ResNet features, layer by layer.

    Subclasses override what they need. ``wants`` is the gate: a layer for which it returns False
    keeps the SDPA fast path and never calls ``attention``/``features``.
    """

    def wants(self, name: str, hw: tuple[int, int]) -> bool:
        return False

    def attention(self, name: str, probs: torch.Tensor) -> torch.Tensor:
        """probs: (batch, heads, query pixels, keys), fp32, rows sum to 1. Return the probs to use."""
        return probs

    def features(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """h: a ResNet block's residual branch (batch, channels, h, w). Return the branch to use."""
        return h


class AttentionRecorder(Protocol):
    """The older observe-only protocol: cross-attention (``attn2``) layers only."""

    def wants(self, name: str, hw: tuple[int, int]) -> bool: ...

    def record(self, name: str, probs: torch.Tensor) -> None: ...


class _RecorderControl(UNetControl):
    """Adapts an ``AttentionRecorder`` to the control protocol; it never sees other layers."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder

    def wants(self, name, hw):
        return name.endswith("attn2") and self.recorder.wants(name, hw)

    def attention(self, name, probs):
        self.recorder.record(name, probs)
        return probs


def as_control(control: UNetControl | None, recorder: AttentionRecorder | None) -> UNetControl | None:
    """The one control a UNet forward uses, from its ``control=`` and legacy ``recorder=`` arguments."""
    if recorder is None:
        return control
    if control is not None:
        raise ValueError("pass either control= or recorder=, not both")
    return recorder if isinstance(recorder, UNetControl) else _RecorderControl(recorder)


class Attention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.name = ""  # dotted module path, set by the owning network so controls can tell layers apart

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                control: UNetControl | None = None, hw: tuple[int, int] | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if control is not None and hw is not None and control.wants(self.name, hw):
            scale = q.shape[-1] ** -0.5
            # softmax in fp32: under fp16 the map we hand out would otherwise be coarsely quantised
            probs = (q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)
            probs = control.attention(self.name, probs)
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out[0](out)


def name_layers(root: nn.Module, *types: type) -> None:
    """Give every module of the given types under `root` its dotted path
    (e.g. ``down_blocks.2.attentions.0.transformer_blocks.0.attn2``, ``up_blocks.1.resnets.1``)."""
    for name, m in root.named_modules():
        if isinstance(m, types or (Attention,)):
            m.name = name

