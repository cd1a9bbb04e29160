"""The GPU path, checked on the CPU with the tiny models wherever CUDA is not needed:

* the loops as step functions replayed from one capture (model/runtime.py): on the CPU make_fx stands in
  for the CUDA graph (the step's Python runs once, its tensor operations are replayed), and the result
  equals the eager loop and a loop written here with diffusers' LMS scheduler;
* no host synchronisation inside the loops: the loops run with every model and tensor on the meta device,
  where reading a value on the host raises, and no tensor is copied between devices during a step;
* torch.compile: one graph per UNet, no recompile across steps;
* offload: only the model in use is on the device;
* fp16 VAE decode: redone in fp32 only when it overflows.
With CUDA, the loops also run under torch.cuda.set_sync_debug_mode("error").
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from images import to_tensor
from instdiffedit import InstDiffEdit
from mask.instant import instant_mask
from mask.store import AttentionStore
from methods.instdiffedit import stage1
from model.runtime import Placement, run_steps
from tests.conftest import TINY_ATTENTION_RES

IMG = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
OPTS = dict(steps=8, attention_res=TINY_ATTENTION_RES, seed=5, strength=0.6)
EDIT = "a red circle"


def _pipe(tiny_sd, **kw) -> InstDiffEdit:
    return InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cpu", torch.float32, **kw)


def test_run_steps_replays_the_captured_step_with_device_indices():
    seen, counters, state = [], {"calls": 0}, torch.zeros(1)

    def step(i):
        seen.append(i if isinstance(i, int) else "tensor")
        counters["calls"] += 1
        state.add_(i if isinstance(i, int) else i.float())  # in place: what a replay must repeat
        return state * 10

    table = torch.arange(10)
    out = run_steps(step, range(3, 8), lambda i: table[i:i + 1], graph=True, counters=counters)
    assert seen == [3, "tensor"]  # eager first step, then one trace; the other three are replays
    assert state.item() == 3 + 4 + 5 + 6 + 7 and out.item() == 250
    assert counters["calls"] == 5  # replays advance host counters by what the captured step added


def test_graphed_loops_equal_the_eager_loops(tiny_sd, pipe, one_thread):
    graphed = _pipe(tiny_sd, cuda_graphs=True)
    a, b = pipe.edit(IMG, EDIT, **OPTS), graphed.edit(IMG, EDIT, **OPTS)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert np.array_equal(np.asarray(a.soft_mask), np.asarray(b.soft_mask)) and a.P == b.P
    assert a.unet_evals == b.unet_evals and a.unet_evals_by_model == b.unet_evals_by_model
    ma, mb = pipe.mask(IMG, EDIT, **OPTS), graphed.mask(IMG, EDIT, **OPTS)
    assert torch.equal(ma.latents, mb.latents) and torch.equal(ma.soft_latent, mb.soft_latent)


def test_graphed_stage1_equals_a_loop_with_diffusers_lms(tiny_sd, one_thread):
    """Stage 1 replayed from one trace against the loop written out with diffusers' LMSDiscreteScheduler,
    Python-int steps and a fresh instant_mask call per step."""
    from bench.common import diffusers_lms_scheduler  # diffusers' LMSDiscreteScheduler, as the authors set it
    graphed = _pipe(tiny_sd, cuda_graphs=True)
    got = graphed.mask(IMG, EDIT, **OPTS)

    o = graphed.options(**OPTS)
    x0 = to_tensor(IMG, graphed.size, "cpu", torch.float32)
    emb = graphed.encode_text(EDIT)
    z0 = graphed.encode_image(x0)
    gen = torch.Generator().manual_seed(o.seed)
    eps = torch.randn((o.rounds, *z0.shape[1:]), generator=gen)
    sched = diffusers_lms_scheduler()
    sched.set_timesteps(o.steps)
    start = o.steps - int(o.steps * o.strength)
    z0 = z0.expand(o.rounds, -1, -1, -1)
    x = sched.add_noise(z0, eps, sched.timesteps[start:start + 1])
    h, w = z0.shape[-2:]
    store = AttentionStore((h, w), rounds=o.rounds, factor=h // o.attention_res)
    positions = [pos for _, pos in graphed.tokenizer.words(EDIT)]
    P = None
    ctx = torch.cat([emb[:1].expand(o.rounds, -1, -1), emb[1:].expand(o.rounds, -1, -1)])
    for i in range(start, o.steps):
        t = sched.timesteps[i]
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        uncond, cond = graphed.unet(inp, t, ctx, recorder=store).chunk(2)
        store.end_step()
        x = sched.step(uncond + o.guidance * (cond - uncond), t, x).prev_sample
        res = instant_mask(store.maps(), positions, (h, w), P=P, gamma1=o.gamma1, gamma2=o.gamma2,
                           threshold=o.threshold)
        P = res.P
        y = sched.add_noise(z0, eps, t.reshape(1))
        x = y + res.mask.float() * (x - y)
    assert torch.equal(got.mask_latent, res.mask)
    assert (got.soft_latent - res.soft).abs().max() < 1e-5
    assert (got.latents - x).abs().max() < 1e-4 * x.abs().max()


class _HostTraffic(TorchDispatchMode):
    """Every operation that reads a tensor's value on the host or copies between devices."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.events.append(str(func))
        ins = {a.device.type for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor) and a.dim() > 0}
        outs = {t.device.type for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        if ins and outs and ins != outs:
            self.events.append(f"{func}: {sorted(ins)} -> {sorted(outs)}")
        return out


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_loops_never_touch_the_host(tiny_sd, one_thread, cuda_graphs, monkeypatch):
    """Both loops with every model on the meta device: a value read on the host (.item(), .tolist(),
    bool(tensor), .cpu()) raises there, and the dispatch mode sees every cross-device copy. The one
    finiteness check per stage (and per decode), after the loop, reads one value by design: skipped here."""
    import instdiffedit
    import methods.instdiffedit
    for module in (instdiffedit, methods.instdiffedit):
        monkeypatch.setattr(module, "check_finite", lambda x, *a: x)
    meta = _pipe(tiny_sd, cuda_graphs=cuda_graphs)
    for m in (meta.unet, meta.inpaint_unet, meta.vae, meta.text_encoder):
        m.to("meta")
    meta.device = meta.placement.device = torch.device("meta")
    traffic = []
    run = meta.run_steps

    def watched(step, sampler, indices, unet, eager=False):
        def inner(i):
            with _HostTraffic() as mode:
                out = step(i)
            traffic.extend(mode.events)
            return out
        return run(inner, sampler, indices, unet, eager)

    meta.run_steps = watched
    meta.decode = lambda z: z  # after the loop: its one finiteness check reads a value by design
    o = meta.options(**OPTS)
    x0 = to_tensor(IMG, meta.size, "meta", torch.float32)
    st = stage1(meta, x0, EDIT, o, torch.Generator().manual_seed(0))  # tensors: mask() would make pictures
    assert st.mask.device.type == "meta"
    meta.inpaint(x0, st.mask, EDIT, o, torch.Generator().manual_seed(0))
    assert traffic == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: proves on the device that no step synchronises")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_loops_never_synchronise_on_cuda(tiny_sd, cuda_graphs):
    gpu = InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cuda", torch.float16,
                                       cuda_graphs=cuda_graphs)
    run = gpu.run_steps

    def strict(step, sampler, indices, unet, eager=False):
        def inner(i):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(i)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run(inner, sampler, indices, unet, eager)

    gpu.run_steps = strict
    res = gpu.edit(IMG, EDIT, **OPTS)
    assert res.image.size == IMG.size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: device memory with and without offload")
def test_offload_keeps_one_unet_on_cuda(tiny_sd):
    gpu = InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cuda", torch.float16, offload=True)
    seen = []
    call = gpu.call_unet

    def spy(unet, *a, **k):
        seen.append({n: next(m.parameters()).device.type for n, m in gpu.placement.models.items()})
        return call(unet, *a, **k)

    gpu.call_unet = spy
    gpu.edit(IMG, EDIT, **OPTS)
    assert {tuple(sorted(d.items())) for d in seen} == {(("inpaint_unet", "cpu"), ("unet", "cuda")),
                                                       (("inpaint_unet", "cuda"), ("unet", "cpu"))}


class _Bookkeeping(Placement):
    """Placement that records moves without making them (the CPU has no second device to move to)."""

    def _move(self, name, device):
        self.where[name] = device
        self.moves.append((name, str(device)))


def test_offload_keeps_only_the_model_in_use_on_the_device(tiny_sd, pipe, one_thread):
    off = _pipe(tiny_sd, offload=True)
    models = {"unet": off.unet, "inpaint_unet": off.inpaint_unet}
    off.placement = _Bookkeeping(models, torch.device("cpu"), offload=True, host="meta")
    assert set(off.placement.where.values()) == {torch.device("meta")}
    on_device_at_unet_calls = []
    call = off.call_unet

    def spy(unet, *a, **k):
        out = call(unet, *a, **k)
        on_device_at_unet_calls.append(sorted(n for n, d in off.placement.where.items() if d.type == "cpu"))
        return out

    off.call_unet = spy
    res = off.edit(IMG, EDIT, **OPTS)
    assert {tuple(c) for c in on_device_at_unet_calls} == {("unet",), ("inpaint_unet",)}
    names = [n for n, d in off.placement.moves if d == "cpu"]
    assert names == ["unet", "inpaint_unet"]  # one visit each, in turn
    ref = pipe.edit(IMG, EDIT, **OPTS)
    assert np.array_equal(np.asarray(ref.image), np.asarray(res.image))


def test_compiled_unets_compile_once_and_never_recompile(tiny_sd, one_thread):
    """Dynamo's graphs (the backend does not matter for guards): one per UNet (batch 6 with the recorder,
    the 9-channel inpainting UNet at batch 2), none added by later steps or a second edit. (The two UNets
    share one forward code object, so dynamo's own error_on_recompile would count the second UNet.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    comp = _pipe(tiny_sd, compile="eager")
    comp.edit(IMG, EDIT, **OPTS)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    comp.edit(IMG, EDIT, **{**OPTS, "seed": 6})  # all steps of a second edit reuse both graphs
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_fp16_vae_decode_falls_back_to_fp32_only_when_it_overflows(tiny_sd, one_thread):
    half = InstDiffEdit.from_pretrained(str(tiny_sd.sd), None, "cpu", torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    ok = half.decode(z)
    assert half.vae_fp32_decodes == 0 and ok.dtype == torch.float16 and torch.isfinite(ok).all()
    with torch.no_grad():
        half.vae.decoder.conv_in.weight.mul_(40000)  # pushes the first activations past fp16's 65504
    ref = copy.deepcopy(half.vae).float()  # the same (fp16-rounded) weights, decoded in fp32
    with torch.no_grad():
        assert not torch.isfinite(half.vae.decoder.conv_in(half.vae.post_quant_conv(z / half.scale))).all()
        want = ref.decode((z / half.scale).float())  # the fp16 latents, as decode() divides them
    weights = {k: v.clone() for k, v in half.vae.state_dict().items()}
    got = half.decode(z)
    assert half.vae_fp32_decodes == 1 and torch.isfinite(got).all()
    assert (got - want).abs().max() < 1e-5
    after = half.vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in weights.items())


def test_mask_filter_constants_are_made_on_the_device():
    """The authors' filters' constants come from device arithmetic, not host copies, and equal the tables."""
    from mask.filters import BINOMIAL_5, binomial_taps, pil_weights
    assert binomial_taps("cpu", torch.float64).tolist() == list(BINOMIAL_5)
    with _HostTraffic() as mode:
        on_meta = pil_weights(16, 64, "bicubic", False, torch.device("meta"))
        taps = binomial_taps(torch.device("meta"), torch.float32)
    assert on_meta.device.type == "meta" and on_meta.shape == (64, 16) and taps.shape == (5,)
    assert mode.events == []
    assert torch.equal(pil_weights(16, 64, "bicubic", True, "cpu"), pil_weights(16, 64, "bicubic", True))


def test_a_step_callback_runs_every_step_even_with_cuda_graphs(tiny_sd, pipe, one_thread):
    """A replay would not call Python: with a callback the loops run eagerly, and give the same edit."""
    graphed = _pipe(tiny_sd, cuda_graphs=True)
    seen = []
    res = graphed.edit(IMG, EDIT, callback_on_step_end=lambda i, t, st: seen.append((st.stage, i)), **OPTS)
    n_mask = int(OPTS["steps"] * OPTS["strength"])  # stage 1 runs the last int(steps x strength) steps
    assert seen == [("mask", k) for k in range(n_mask)] + [("inpaint", k) for k in range(OPTS["steps"])]
    assert np.array_equal(np.asarray(res.image), np.asarray(pipe.edit(IMG, EDIT, **OPTS).image))
