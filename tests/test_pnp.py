"""Plug-and-Play (methods/pnp.py): reconstruction under full injection, the exact set of injected
layers and steps, counted UNet evaluations, one-line errors, and the CLI on the toy model."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from methods import EditError
from methods.pnp import PnPControl, injection_layers, run_pnp, source_latents
from model.unet import UNet2DConditionModel, UNetConfig
from tests.tiny_sd import TEXT_DIM

STEPS = 10  # feature 0.8 -> steps 0..7 injected, attention 0.5 -> steps 0..4
ROOT = Path(__file__).resolve().parents[1]
SD_ATTN = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"  # pnp_utils' {1: [1, 2], 2: [0, 1, 2], 3: ...}
           for b, blocks in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))) for a in blocks]


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())


def make_job(pipe, image, edit="a red dog", **options):
    o = pipe.options("pnp", **{"steps": STEPS, "pnp_inversion_steps": STEPS, **options})
    return pipe._job(image, edit, o, False)[1]


def sd_layout_unet() -> UNet2DConditionModel:
    """SD v1.x's layout (4 levels, 3 resnets per up block, attention in up blocks 1-3) at toy width."""
    torch.manual_seed(3)
    cfg = UNetConfig(block_out_channels=(16, 16, 16, 16), layers_per_block=2, attention_head_dim=2,
                     cross_attention_dim=TEXT_DIM, norm_num_groups=8)
    return UNet2DConditionModel(cfg).eval()


def calm_unet(unet):
    """A copy of the tiny UNet with its output layer scaled by 0.1 (noise predictions of std ~0.05, as
    tests/test_inversion.py's round trip): an unscaled random UNet's predictions swing so fast with
    the latent that no DDIM inversion comes back near its source."""
    unet = copy.deepcopy(unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet


class Spy(PnPControl):
    """Logs what each controlled layer got and gave back."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def inject(self, name, x):
        out = super().inject(name, x)
        self.calls.append((self.step, name, x.clone(), out.clone()))
        return out


def test_full_injection_with_the_source_prompt_reproduces_the_reconstruction(pipe, image, one_thread):
    # the edit text is the inversion's (the empty prompt, the official default), injection at every step
    pipe = copy.copy(pipe)
    pipe.unet = calm_unet(pipe.unet)
    job = make_job(pipe, image, pnp_feature=1.0, pnp_attn=1.0)
    job.text, job.emb = "", pipe.encode_text("")
    sampler = pipe.sampler(job.o)
    src = source_latents(pipe, job, sampler)
    # the inversion's reconstruction: plain DDIM from the inverted noise with the same text, guidance 1
    traj, x = [], src[0]
    for i, t in enumerate(sampler.timesteps):
        traj.append(x)
        x = sampler.step(pipe.unet(x, t, job.emb[:1]), i, x)
    recon = x
    # with the reconstruction's own latents as the source branch, injecting at every step changes
    # nothing but float rounding: the batch of 3 rounds differently from the reference's batch of 1
    # (measured 2e-5 after 10 steps; an injection of anything else moves the latents by O(0.1))
    out, _ = run_pnp(pipe, job, source=traj)
    assert torch.allclose(out, recon, atol=1e-4, rtol=0)
    # with the inverted latents as the source branch (what PnP does): the reconstruction within the
    # inversion's own error, and no farther from the source latent than the reconstruction is.
    # Measured on this UNet at 10 steps: |out - recon| mean 0.027, max 0.107; |recon - z0| mean 0.057,
    # |out - z0| mean 0.046 (latents of std ~1)
    out, _ = run_pnp(pipe, job, source=src)
    z0 = pipe.encode_image(job.x0)
    err = (out - recon).abs()
    assert err.mean() <= 0.05 and err.max() <= 0.2, (err.mean(), err.max())
    assert (out - z0).abs().mean() <= (recon - z0).abs().mean()


def test_injected_layers_and_steps_are_exactly_the_official_set(pipe, image, one_thread):
    sd = copy.copy(pipe)  # the tiny pipeline with an SD-layout UNet: the layer names are SD's own
    sd.unet = sd_layout_unet()
    feature, attn = injection_layers(sd.unet)
    assert (feature, attn) == ("up_blocks.1.resnets.1", SD_ATTN)
    job = make_job(sd, image)
    spy = Spy(feature, attn, int(0.8 * STEPS), int(0.5 * STEPS))
    with torch.no_grad():
        run_pnp(sd, job, spy)
    done = {(s, n) for s, n, _, _ in spy.calls}
    want = {(s, feature) for s in range(8)} | {(s, n) for s in range(5) for n in SD_ATTN}
    assert done == want and len(spy.calls) == len(want)
    for step, name, before, after in spy.calls:
        assert not torch.equal(before[2], before[0])  # the edit had values of its own (text, and latent after step 0)
        assert torch.equal(before[1], before[0]) == (step == 0)  # uncond edit row = source row only at step 0
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[0]) and torch.equal(after[2], before[0])


def test_layer_mapping_on_other_unets():
    toy = json.loads((ROOT / "assets" / "toy-sd" / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(toy))
    # the toy UNet has decoder attention at every level (two per up block): from up_blocks.1.attentions.1
    # on, that is one at 16x16 and both at 32x32
    assert injection_layers(unet) == ("up_blocks.1.resnets.1", [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
                                                               for b, a in ((1, 1), (2, 0), (2, 1))])
    with torch.device("meta"):
        one_level = UNet2DConditionModel(UNetConfig(block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                                    up_block_types=("UpBlock2D",), norm_num_groups=8))
        no_attn = UNet2DConditionModel(UNetConfig(block_out_channels=(8, 8), norm_num_groups=8,
                                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")))
    with pytest.raises(EditError, match=r"up_blocks.1.resnets.1 .* this UNet has 1 up blocks with \[3\] resnets"):
        injection_layers(one_level)
    with pytest.raises(EditError, match="no decoder attention there"):
        injection_layers(no_attn)


def test_unet_evaluations_per_edit(pipe, image, one_thread):
    res = pipe.edit(image, "a red dog", method="pnp", steps=STEPS, pnp_inversion_steps=20)
    assert res.image.size == image.size and res.mask.getextrema() == (255, 255)  # no mask: the whole image
    assert res.unet_evals == 20 + 3 * STEPS  # inversion at guidance 1 + [source, uncond, cond] per step
    res = pipe.edit(image, "a red dog", method="pnp")  # the official defaults: 999 + 3 x 50
    assert res.unet_evals == 999 + 3 * 50 == 1149


def test_bad_options(pipe, image):
    with pytest.raises(EditError, match=r"pnp_feature 1.5 is outside \[0, 1\]"):
        pipe.options("pnp", pnp_feature=1.5)
    with pytest.raises(EditError, match=r"pnp_attn -0.1 is outside"):
        pipe.options("pnp", pnp_attn=-0.1)
    with pytest.raises(EditError, match="sampler 'lms'"):
        pipe.options("pnp", sampler="lms")
    with pytest.raises(EditError, match="pnp_inversion_text 'noun' is not one of empty, source"):
        pipe.options("pnp", pnp_inversion_text="noun")
    with pytest.raises(EditError, match="needs the text of what the image shows"):
        pipe.options("pnp", pnp_inversion_text="source")
    with pytest.raises(EditError, match="pnp_inversion_steps 7 does not pass through timestep 901 of the 10"):
        pipe.edit(image, "a dog", method="pnp", steps=10, pnp_inversion_steps=7)
    with pytest.raises(EditError, match="pnp_inversion_steps 1000: "):
        pipe.edit(image, "a dog", method="pnp", steps=10, pnp_inversion_steps=1000)
    with pytest.raises(EditError, match="takes no mask"):
        pipe.edit(image, "a dog", method="pnp", steps=2, mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(EditError, match="option 'ptp_self' does not apply to method pnp"):
        pipe.options("pnp", ptp_self=0.3)


def test_cli_on_the_toy_model(tmp_path, one_thread, capsys):
    from instdiffedit import main
    out = tmp_path / "pnp"
    assert main(["--image", str(ROOT / "assets" / "examples" / "scene.png"), "--edit", "a blue circle",
                 "--model", "toy", "--method", "pnp", "--steps", "10", "--pnp-inversion-steps", "100",
                 "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["unet_evals"] == 100 + 3 * 10 and run["options"]["pnp_feature"] == 0.8
    assert Image.open(out / "edited.png").size == Image.open(ROOT / "assets" / "examples" / "scene.png").size
    capsys.readouterr()
    assert main(["--image", str(ROOT / "assets" / "examples" / "scene.png"), "--edit", "a blue circle",
                 "--model", "toy", "--method", "pnp", "--pnp-attn", "2", "--out", str(tmp_path / "bad"),
                 "--quiet"]) != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["error: pnp_attn 2.0 is outside [0, 1]"]


@pytest.mark.slow  # loads both toy models and runs three rows: ~25 s on the loaded 2-core machine
def test_toy_table1_runs_the_chosen_methods(tmp_path, one_thread, capsys):
    from toy.benchmark import main as bench
    assert bench(["--table1", "--methods", "pnp", "--methods-n", "1", "--steps", "2", "--pnp-inversion-steps", "2",
                  "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == {"default", "pnp", "gt_mask"}
    assert res["pnp"]["rows"][0]["unet_evals"] == 2 + 3 * 2 and "iou" not in res["pnp"]["rows"][0]
    capsys.readouterr()
    assert bench(["--table1", "--methods", "pnp,foo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --methods: 'foo' is not one of instdiffedit, ") and "\n" not in err


def test_inversion_and_negative_texts_reach_the_unet(pipe, image, one_thread):
    seen = []

    class Logged(type(pipe)):
        def call_unet(self, unet, inp, t, ctx, recorder=None):
            seen.append(ctx)
            return super().call_unet(unet, inp, t, ctx, recorder)

    logged = copy.copy(pipe)
    logged.__class__ = Logged
    logged.edit(image, "a red dog", method="pnp", steps=2, pnp_inversion_steps=2, pnp_inversion_text="source",
                source="a red cat", pnp_negative="blurry")
    inversion, denoising = seen[:2], seen[2:]
    assert all(torch.equal(c[0], pipe.encode_text("a red cat")[1]) for c in inversion)
    ctx = denoising[0]  # [source: "", uncond edit: the negative text, cond edit: the edit text]
    assert torch.equal(ctx[0], pipe.encode_text("")[0]) and torch.equal(ctx[1], pipe.encode_text("blurry")[1])
    assert torch.equal(ctx[2], pipe.encode_text("a red dog")[1]) and len(denoising) == 2
    seen.clear()  # the defaults: the empty prompt for the inversion and as the unconditional text
    logged.edit(image, "a red dog", method="pnp", steps=2, pnp_inversion_steps=2, source="a red cat")
    empty = pipe.encode_text("")[0]
    assert all(torch.equal(c[0], empty) for c in seen[:2]) and torch.equal(seen[2][1], empty)
