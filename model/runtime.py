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
* ``graph=True`` elsewhere (the CPU, in tests): the same protocol with ``torch.fx``'s ``make_fx`` in
  place of the CUDA graph. Tracing the second step runs its Python once and records its tensor
  operations, in-place updates of the state included; every later step replays the recording. A step
  that kept per-step state on the host (a Python counter used as a divisor, a list of past tensors)
  gives different numbers here than eagerly, as it would under a CUDA graph.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
from torch import nn


def run_steps(step: Callable[[object], object], indices: Iterable[int], index_of: Callable[[int], torch.Tensor],
              graph: bool = False, counters: dict[str, int] | None = None):
    """Run ``step`` over ``indices`` (see module docstring); returns the last step's return value.

    index_of(i) gives step i's (1,) int64 device tensor (``sampler.index``); counters is a dict of host
    counts that the step's Python code advances (replays advance it by the captured step's increments).
    """
    counters = counters if counters is not None else {}
    indices = iter(indices)
    first = next(indices, None)
    if first is None:
        return None
    if graph and index_of(first).device.type == "cuda":
        # the whole loop on one side stream: the eager first step makes the lazy initialisations (cuBLAS
        # workspace, ...) on the stream the capture then uses, as torch.cuda.graphs asks
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = _loop(step, first, indices, index_of, counters, side)
        main.wait_stream(side)
        return out
    return _loop(step, first, indices, index_of if graph else None, counters, None)


def _loop(step, first, rest, index_of, counters, stream):
    out, static_i, replay, added = step(first), None, None, {}
    for i in rest:
        if index_of is None:
            out = step(i)
            continue
        if replay is None:  # capture (or trace) this step once
            static_i = index_of(i).clone()  # the one buffer every replay reads its step index from
            before = dict(counters)
            replay, out = _capture_cuda(step, static_i, stream) if stream is not None else _trace(step, static_i)
            added = {key: n - before.get(key, 0) for key, n in counters.items()}
            continue
        static_i.copy_(index_of(i))
        out = replay(out)
        for key, n in added.items():
            counters[key] += n
    return out


def _capture_cuda(step, static_i, stream):
    """Capture step(static_i) in a CUDA graph and run it once; replays rewrite the captured outputs.

    capture_begin/end directly rather than the torch.cuda.graph context, which also runs a full
    gc.collect() and empties the allocator's cache on entry: tens of milliseconds at every edit."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        g.capture_begin()
        try:
            out = step(static_i)  # recorded, not run
        finally:
            g.capture_end()
    g.replay()

    def replay(out):
        g.replay()
        return out  # the captured output tensors, overwritten in place by the replay
    return replay, out


def _trace(step, static_i):
    """make_fx stand-in for a CUDA graph (CPU tests): tracing runs the step once, replays rerun its ops."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._pytree import tree_flatten

    spec = {}

    def flat_step(i):
        out = step(i)
        spec["out"] = out
        leaves, spec["tree"] = tree_flatten(_as_tree(out))
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    graph = make_fx(flat_step)(static_i)

    def replay(out):
        fresh = iter(graph(static_i))
        leaves, _ = tree_flatten(_as_tree(out))
        return _from_tree(out, [next(fresh) if isinstance(t, torch.Tensor) else t for t in leaves], spec["tree"])
    return replay, spec["out"]


def _as_tree(out):
    return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else out


def _from_tree(like, leaves, tree):
    from torch.utils._pytree import tree_unflatten
    value = tree_unflatten(leaves, tree)
    return dataclasses.replace(like, **value) if dataclasses.is_dataclass(like) else value


class Placement:
    """``offload``: only the model in use is on the accelerator, the others wait on the host.

    ``use(model)`` moves `model` to ``device`` and every other registered model to ``host``. The pipeline
    calls it before each UNet call (a dictionary look-up when the model is already there), so stage 1
    holds the UNet and the finish the inpainting UNet: one UNet's weights at a time, for 8 GB cards.
    Off, every model stays on ``device``.
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
