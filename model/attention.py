"""Multi-head attention shared by the UNet and the VAE, with an optional recorder.

Layout follows diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so checkpoint
keys load without a mapping table. The fast path is ``F.scaled_dot_product_attention``; a layer that
is asked to record computes the softmax explicitly and hands the probabilities to the recorder.

The recorder is passed down through ``forward`` (no global state, no monkey-patching). Any object
with these two methods works::

    wants(name: str, hw: tuple[int, int]) -> bool   # should layer `name` at this query grid record?
    record(name: str, probs: Tensor) -> None         # probs: (batch, heads, query pixels, tokens)
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class AttentionRecorder(Protocol):
    def wants(self, name: str, hw: tuple[int, int]) -> bool: ...

    def record(self, name: str, probs: torch.Tensor) -> None: ...


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
        self.name = ""  # dotted module path, set by the owning network so recorders can tell layers apart

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                recorder: AttentionRecorder | None = None, hw: tuple[int, int] | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if recorder is not None and hw is not None and recorder.wants(self.name, hw):
            scale = q.shape[-1] ** -0.5
            # softmax in fp32: under fp16 the map we hand out would otherwise be coarsely quantised
            probs = (q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)
            recorder.record(self.name, probs)
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out[0](out)


def name_attention_layers(root: nn.Module) -> None:
    """Give every Attention under `root` its dotted path (e.g. ``down_blocks.2.attentions.0....attn2``)."""
    for name, m in root.named_modules():
        if isinstance(m, Attention):
            m.name = name
