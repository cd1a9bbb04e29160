"""How the denoising loops run on a device: eagerly, or replayed from one captured CUDA graph; and which
model sits on the accelerator when memory is short.

A loop is written as a *step function* ``step(i)`` that reads and writes its state in place (latents,
sampler history, attention sums: tensors allocated before or at the first step) and finds everything
that changes from step to step through the step index ``i``. ``i`` is a Python int when the step runs
eagerly, or a (1,) int64 tensor on the device when it is replayed: samplers, attention stores and the
mask look their per-step values up in device tables, never on the host. ``run_steps`` then runs

* ``graph=False``: every step eagerly, ``step(i)``;
* ``graph=True`` on CUDA: the first step eagerly (it allocates the state and decides what is decided
  once, e.g. Eq. 8's P), the second step captured in a ``torch.cuda.CUDAGraph`` with ``i`` in a static
  device buffer, and every step from the second on as a replay of that graph after writing its index
  into the buffer. Python code inside the step runs only once (at capture), so a step must not keep
  per-step state on the host; counters kept on the host (the pipeline's UNet-evaluation count) are
  advanced by what the captured step added, once per replay;
* ``graph=True`` elsewhere (the CPU, in tests): the same step function with ``i`` as a device tensor in
  the same static buffer, run eagerly: what a replay computes, without a graph.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def run_steps(step: Callable[[object], object], indices: Iterable[int], index_of: Callable[[int], torch.Tensor],
              graph: bool = False, counters: dict[str, int] | None = None):
    """Run ``step`` over ``indices`` (see module docstring); returns the last step's return value.

    index_of(i) gives step i's (1,) int64 device tensor (``sampler.index``); counters is a dict of host
    counts that the step's Python code advances (replays advance it by the captured step's increments).
    """
    out, static_i, cuda_graph, added = None, None, None, {}
    for k, i in enumerate(indices):
        if not graph or k == 0:
            out = step(i)
            continue
        if static_i is None:
            static_i = index_of(i).clone()  # the one buffer every replay reads its step index from
            if static_i.device.type == "cuda":
                before = dict(counters or {})
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    out = step(static_i)  # recorded, not run: the replay below runs it
                added = {key: n - before.get(key, 0) for key, n in (counters or {}).items()}
                static_i.copy_(index_of(i))
                cuda_graph.replay()
                continue
        static_i.copy_(index_of(i))
        if cuda_graph is None:
            out = step(static_i)
        else:
            cuda_graph.replay()
            for key, n in added.items():
                counters[key] += n
    return out


class Placement:
    """``offload``: only the model in use is on the accelerator, the others wait on the host.

    ``use(model)`` moves `model` to ``device`` and every other registered model to ``host``. It is
    called before each model runs (a dictionary look-up when it is already there), so stage 1 holds the
    text encoder, then the VAE, then the UNet, and the finish the inpainting UNet: the peak is one UNet's
    weights plus activations, for cards with 8 GB. Off, every model stays on ``device``.
    """

    def __init__(self, models: dict[str, nn.Module | None], device: torch.device, offload: bool,
                 host: torch.device | str = "cpu"):
        self.device, self.offload, self.host = torch.device(device), offload, torch.device(host)
        self.models = {name: m for name, m in models.items() if m is not None}
        self.where = {name: self.device for name in self.models}  # where each model is now
        self.moves: list[tuple[str, str]] = []  # (model, device) of every move made, in order
        if offload:
            for name in self.models:
                self._move(name, self.host)

    def _move(self, name: str, device: torch.device) -> None:
        self.models[name].to(device)
        self.where[name] = device
        self.moves.append((name, str(device)))

    def use(self, model: nn.Module) -> None:
        if not self.offload:
            return
        for name, m in self.models.items():
            want = self.device if m is model else self.host
            if self.where[name] != want:
                self._move(name, want)
