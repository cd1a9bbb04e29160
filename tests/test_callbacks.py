"""The per-step callback (callback_on_step_end, methods.StepState) in every registered method: one call per
denoising step of each of the method's loops, counted here from its options as its docstring states them;
steps counted from 0 and timesteps going down within a stage (so no inversion step is reported); latents
of the latent shape; the mask fields where the method has a mask; and an edit that is the same with and
without a callback. Then --save-steps on the command line for a baseline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import instdiffedit
from methods import REGISTRY

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning"),
]

EDIT, SOURCE = "a red cat", "a grey dog"
# tiny runs: 4 steps; strength 0.75 (3 of them) where it applies; the tiny UNet's 8x8 attention grid
OPTIONS = {"steps": 4, "strength": 0.75, "seed": 3, "attention_res": 8, "rounds": 2, "diffedit_samples": 2,
           "pnp_inversion_steps": 4}


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB").resize((16, 16), Image.BILINEAR)


def _options(method: str) -> dict:
    specs = REGISTRY[method].option_specs()
    return {k: v for k, v in OPTIONS.items() if k in specs}


def _run(o) -> int:
    return int(o.steps * o.strength)  # "the last int(steps * r) steps are run"


FINISH = lambda o: ("inpaint", o.steps, 1, True)  # the shared inpainting finish: every step, from pure noise

# method -> (stage, denoising steps, latent batch, has a mask) of each loop it runs, in order, from its options
EXPECTED_STAGES = {
    "instdiffedit": lambda o: [("mask", _run(o), o.rounds, True), FINISH(o)],
    "diffedit": lambda o: [("diffedit:source", _run(o), o.diffedit_samples, False),
                           ("diffedit:edit", _run(o), o.diffedit_samples, False), FINISH(o)],
    "diffedit-mask": lambda o: [FINISH(o)],  # its mask is one prediction, no step
    "diffedit-original": lambda o: [("diffedit-original", int(o.steps * o.diffedit_encode_ratio), 1, True)],
    "sdedit": lambda o: [("sdedit", _run(o), 1, False)],
    "cyclediffusion": lambda o: [("cyclediffusion", _run(o), 1, False)],
    "ptp": lambda o: [("ptp", o.steps, 2, False)],  # [source, edit] from the full inversion
    "pnp": lambda o: [("pnp", o.steps, 1, False)],
    "ledits": lambda o: [("ledits", o.steps, 1, True)],  # int(steps * (1 + skip)) timesteps, the last `steps`
}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_denoising_step_is_reported_and_the_edit_is_unchanged(pipe, method):
    assert method in EXPECTED_STAGES, f"{method}: add its loops to EXPECTED_STAGES"
    opts = _options(method)
    o = pipe.options(method, **opts)
    seen = []
    res = pipe.edit(_image(), EDIT, method=method, source=SOURCE,
                    callback_on_step_end=lambda step, t, st: seen.append((step, float(t), st)), **opts)
    plain = pipe.edit(_image(), EDIT, method=method, source=SOURCE, **opts)
    assert np.array_equal(np.asarray(res.image), np.asarray(plain.image))  # the callback only observes
    assert torch.equal(res.mask_latent, plain.mask_latent)

    runs = []  # (stage, [(step, t, state)]) in the order the loops ran
    for step, t, st in seen:
        if not runs or runs[-1][0] != st.stage:
            runs.append((st.stage, []))
        runs[-1][1].append((step, t, st))
    expected = EXPECTED_STAGES[method](o)
    assert [(stage, len(calls)) for stage, calls in runs] == [(s, n) for s, n, _, _ in expected]
    h = w = pipe.size // pipe.vae_factor
    c = pipe.vae.config.latent_channels
    for (stage, calls), (_, n, batch, masked) in zip(runs, expected):
        assert [step for step, _, _ in calls] == list(range(n)), stage
        ts = [t for _, t, _ in calls]
        assert all(a > b for a, b in zip(ts, ts[1:])), (stage, ts)  # denoising: t goes down
        for _, _, st in calls:
            assert st.latents.shape == (batch, c, h, w), (stage, st.latents.shape)
            if masked:
                assert st.mask.dtype == torch.bool and st.mask.shape == (h, w)
                assert st.soft.shape == (h, w) and 0 <= st.soft.min() <= st.soft.max() <= 1
            else:
                assert st.mask is None and st.soft is None
            if stage in ("inpaint", "diffedit-original"):  # a fixed mask: the one the result reports
                assert torch.equal(st.mask.cpu(), res.mask_latent)
    if method == "ledits":  # the result's mask: the pixels guided at some step
        union = torch.stack([st.mask.cpu() for _, _, st in runs[0][1]]).any(0)
        assert torch.equal(union, res.mask_latent) and union.any()


def test_save_steps_draws_a_baselines_step_masks_or_says_it_has_none(tiny_sd, tmp_path, monkeypatch, capsys):
    drawn = []
    real = instdiffedit.steps_strip
    monkeypatch.setattr(instdiffedit, "steps_strip", lambda img, softs, masks: drawn.append(len(softs)) or
                        real(img, softs, masks))
    _image().save(tmp_path / "in.png")

    def cli(method, out):
        return instdiffedit.main(["--image", str(tmp_path / "in.png"), "--edit", EDIT, "--source", SOURCE,
                                  "--out", str(tmp_path / out), "--model", str(tiny_sd.sd), "--device", "cpu",
                                  "--method", method, "--steps", "4", "--attention-res", "8", "--save-steps",
                                  "--quiet"])

    assert cli("ledits", "ledits") == 0, capsys.readouterr().err
    assert drawn == [4] and (tmp_path / "ledits" / "steps.png").is_file()  # one tile per edit step
    capsys.readouterr()
    assert cli("sdedit", "sdedit") == 0
    err = capsys.readouterr().err
    assert "warning: --save-steps: method sdedit has no mask" in err and err.count("\n") == 1, err
    assert (tmp_path / "sdedit" / "edited.png").is_file() and not (tmp_path / "sdedit" / "steps.png").exists()
