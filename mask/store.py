"""Cross-attention store for InstDiffEdit's instant masks.

One user of the UNet control protocol of ``model/attention.py`` (observe only)::

    wants(name, hw) -> bool          # asked by every attention layer and ResNet block with its grid
    attention(name, probs) -> probs  # probs: (batch, heads, query pixels, tokens), fp32; returned as is

``record(name, probs)`` is the same observation under the older recorder protocol's name.

What is kept (method notes, "Attention capture"):

* only cross-attention maps (``wants`` accepts ``attn2`` layers only);
* only layers whose query grid is ``(H // factor, W // factor)`` of the latent ``(H, W)``; with
  the default factor 4 and a 64x64 latent that is the 16x16 grid: the two ``down_blocks.2`` and the
  three ``up_blocks.1`` layers (the mid block runs at 8x8 and is skipped);
* only the conditional half of a classifier-free-guidance batch. The UNet batch is laid out
  ``[uncond x n, cond x n]`` for n parallel rounds, so the conditional rows are ``probs[n:]``;
* averaged over heads, layers and rounds;
* ``mode="running"`` (authors' default): the map handed out after step t is the mean over all
  steps run so far (the authors' store sums every step and divides by the step count);
  ``mode="last"``: the map of the last closed step only.

Everything is accumulated in place in fp32 on the device the probabilities arrive on: no per-step
host copies, no ``.item()`` syncs and no Python lists of per-step tensors. The only Python-side
state is a pair of integer counters (layers recorded in the open step, steps closed).

Usage per denoising step::

    eps = unet(latents, t, text, control=store)   # recorder=store works too
    store.end_step()                  # or store.step()
    maps = store.maps()               # (tokens, H // factor, W // factor)
"""
from __future__ import annotations

from typing import Callable

import torch

from model.attention import UNetControl

MODES = ("running", "last")


class AttentionStore(UNetControl):
    """Accumulates head/layer/round-averaged cross-attention maps at one query resolution.

    Args:
        latent_size: latent ``(H, W)`` (64x64 for 512x512 images).
        rounds: number n of parallel rounds in the batch.
        cfg: whether classifier-free guidance doubles the batch to ``[uncond x n, cond x n]``
            (only the conditional half is recorded). Without CFG the whole batch of n is used.
        mode: ``"running"`` (mean over all closed steps) or ``"last"`` (last closed step).
        factor: downsampling of the recorded query grid relative to the latent (4 -> 16x16).
        layer_filter: optional extra predicate on the layer name. ``None`` accepts every
            cross-attention (``attn2``) layer at the grid.
    """

    def __init__(self, latent_size: tuple[int, int], rounds: int = 1, cfg: bool = True,
                 mode: str = "running", factor: int = 4,
                 layer_filter: Callable[[str], bool] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if rounds < 1 or factor < 1:
            raise ValueError("rounds and factor must be >= 1")
        h, w = latent_size
        if h % factor or w % factor:
            raise ValueError(f"latent size {latent_size} is not divisible by factor {factor}")
        self.grid = (h // factor, w // factor)
        self.rounds = rounds
        self.cfg = cfg
        self.mode = mode
        self.layer_filter = layer_filter
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (call before a new edit)."""
        self._step_sum: torch.Tensor | None = None   # (tokens, query pixels): sum over layers, open step
        self._total: torch.Tensor | None = None      # (tokens, query pixels): running sum / last step
        self._layers = 0                             # layers recorded in the open step
        self.num_steps = 0                           # steps closed that contained records

    # -- control protocol ----------------------------------------------------------------------
    def wants(self, name: str, hw: tuple[int, int]) -> bool:
        if tuple(hw) != self.grid or not name.endswith("attn2"):
            return False
        return self.layer_filter is None or self.layer_filter(name)

    def attention(self, name: str, probs: torch.Tensor) -> torch.Tensor:
        self.record(name, probs)
        return probs  # observe only

    def record(self, name: str, probs: torch.Tensor) -> None:
        b, _, q, _ = probs.shape
        expected = 2 * self.rounds if self.cfg else self.rounds
        if b != expected:  # shape metadata only, no host sync
            raise ValueError(f"layer {name!r}: batch {b}, expected {expected} "
                             f"(rounds={self.rounds}, cfg={self.cfg})")
        if q != self.grid[0] * self.grid[1]:
            raise ValueError(f"layer {name!r}: {q} query pixels, expected grid {self.grid}")
        cond = probs[self.rounds:] if self.cfg else probs
        # mean over rounds and heads -> (query pixels, tokens); fp32 so long sums stay accurate
        m = cond.float().mean(dim=(0, 1))
        if self._step_sum is None:
            self._step_sum = torch.zeros(m.shape[1], m.shape[0], dtype=torch.float32, device=m.device)
        self._step_sum.add_(m.t())  # layers are summed now and divided by their count at end_step
        self._layers += 1

    # -- step bookkeeping ------------------------------------------------------------------------
    def end_step(self) -> None:
        """Close the current denoising step (call once after each UNet call)."""
        if self._layers == 0:
            return  # nothing recorded (e.g. a UNet call without this recorder): not a step
        step_mean = self._step_sum.div_(self._layers)  # mean over layers, in place
        if self._total is None:
            self._total = torch.zeros_like(step_mean)
        if self.mode == "running":
            self._total.add_(step_mean)
        else:
            self._total.copy_(step_mean)
        self._step_sum.zero_()
        self._layers = 0
        self.num_steps += 1

    step = end_step

    def maps(self) -> torch.Tensor:
        """(tokens, H // factor, W // factor) map: mean over heads, layers, rounds (and steps when
        running). A fresh tensor, so later steps do not change what the caller holds."""
        if self._total is None:
            raise RuntimeError("no closed step with recorded attention: call end_step() after the UNet")
        out = self._total / self.num_steps if self.mode == "running" else self._total.clone()
        return out.unflatten(1, self.grid)
