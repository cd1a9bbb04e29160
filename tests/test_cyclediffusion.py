"""CycleDiffusion (methods/cyclediffusion.py) on the tiny random SD models (tests/conftest.py): latents and
decoded image against diffusers' CycleDiffusionPipeline on the same modules, seed and settings; the
official schedule; UNet evaluations per step; bad input."""
from __future__ import annotations

import pytest
import torch

from instdiffedit import EditError
from methods.cyclediffusion import CycleDiffusionOptions, cycle_latents, cyclediffusion
from tests.test_pipeline import LATENT, _image

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' own warnings: the deprecated pipeline, numpy 2 __array__ copy keyword
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _reference(tiny_sd):
    """diffusers' CycleDiffusionPipeline on the reference modules of the tiny folder, SD v1.4's DDIM."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated import CycleDiffusionPipeline
    from transformers import CLIPTokenizer

    from tests.test_sampler import SD14_SCHEDULER_CONFIG

    unet, vae, clip = tiny_sd.refs
    ref = CycleDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(str(tiny_sd.vocab), model_max_length=77),
        unet=unet, scheduler=diffusers.DDIMScheduler.from_config(SD14_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("guidance,source_guidance", [(3.0, 1.0), (5.0, 2.0)])
def test_matches_diffusers_cyclediffusion_pipeline(pipe, tiny_sd, guidance, source_guidance):
    """Same modules, seed (CPU generator: VAE sample, start noise, posterior noises in the same order),
    12 DDIM steps from strength 0.75, eta 0.1: latents and decoded image to <= 1e-4."""
    ref = _reference(tiny_sd)
    x0, seed = _image(2), 77
    edit, source = "a red apple on a table", "a green pear"
    o = CycleDiffusionOptions(steps=12, strength=0.75, guidance=guidance, source_guidance=source_guidance, eta=0.1)

    ours_lat = cycle_latents(pipe, x0, pipe.encode_text(edit), pipe.encode_text(source), o,
                             torch.Generator().manual_seed(seed))
    ours_img = cyclediffusion(pipe, x0, edit, source, o, torch.Generator().manual_seed(seed))

    kw = dict(prompt=edit, source_prompt=source, image=(x0 + 1) / 2, strength=o.strength,
              num_inference_steps=o.steps, guidance_scale=o.guidance, source_guidance_scale=o.source_guidance,
              eta=o.eta)
    ref_lat = ref(**kw, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    ref_img = ref(**kw, generator=torch.Generator().manual_seed(seed), output_type="pt").images  # [0, 1], clamped

    assert ours_lat.shape == ref_lat.shape == (1, 4, LATENT, LATENT)
    assert (ours_lat - ref_lat).abs().max() <= 1e-4
    assert ((ours_img.clamp(-1, 1) + 1) / 2 - ref_img).abs().max() <= 1e-4
    # not trivially equal: another seed, or the edit text as source, gives other latents
    other = cycle_latents(pipe, x0, pipe.encode_text(edit), pipe.encode_text(source), o, torch.Generator().manual_seed(1))
    assert (other - ref_lat).abs().max() > 1e-2
    same_text = cycle_latents(pipe, x0, pipe.encode_text(edit), pipe.encode_text(edit), o,
                              torch.Generator().manual_seed(seed))
    assert (same_text - ref_lat).abs().max() > 1e-3


def test_default_schedule_is_the_official_one(pipe):
    """Official: LDM's make_ddim_timesteps("uniform", 99, 1000) = range(0, 1000, 1000 // 99)[:99] + 1, and
    skip_steps 30 -> the run starts at timestep ddim_timesteps[99 - 30 - 1] (its `alphas[refine_steps - 1]`)."""
    from sampler import DDIMSampler

    o = CycleDiffusionOptions()
    s = DDIMSampler(pipe.scheduler_config)
    s.set_timesteps(o.steps)
    official = [t + 1 for t in range(0, 1000, 1000 // 99)][:99]
    assert s.timesteps.tolist() == official[::-1]
    skip = 30
    assert s.start_index(o.strength) == skip
    assert int(s.timesteps[s.start_index(o.strength)]) == official[99 - skip - 1]
    assert (o.eta, o.source_guidance, o.guidance) == (0.1, 1.0, 3.0)


@pytest.mark.parametrize("guidance,source_guidance,per_step", [(3.0, 1.0, 3), (1.0, 1.0, 2), (3.0, 2.0, 4)])
def test_unet_image_evaluations_per_step(pipe, guidance, source_guidance, per_step):
    """A branch at scale 1 is evaluated on its conditional text only (the official code's cost)."""
    calls = []

    def unet(x, t, ctx):
        calls.append(x.shape[0])
        return pipe.unet(x, t, ctx)

    o = CycleDiffusionOptions(steps=10, strength=0.5, guidance=guidance, source_guidance=source_guidance)
    cycle_latents(pipe, _image(0), pipe.encode_text("a cat"), pipe.encode_text("a dog"), o,
                  torch.Generator().manual_seed(0), unet=unet)
    assert calls == [per_step] * 5


def test_same_seed_same_output_and_bad_input(pipe):
    o = CycleDiffusionOptions(steps=6, strength=0.5)
    a = cyclediffusion(pipe, _image(0), "a cat", "a dog", o)
    assert torch.equal(a, cyclediffusion(pipe, _image(0), "a cat", "a dog", o))
    assert not torch.equal(a, cyclediffusion(pipe, _image(0), "a cat", "a dog", CycleDiffusionOptions(6, 0.5, seed=1)))
    for source in (None, "", "  "):
        with pytest.raises(EditError, match="needs a source text"):
            cyclediffusion(pipe, _image(0), "a cat", source, o)
    with pytest.raises(EditError, match="edit text is empty"):
        cyclediffusion(pipe, _image(0), " ", "a dog", o)
    for bad, what in [(dict(eta=0.0), "eta 0.0"), (dict(eta=1.5), "eta 1.5"), (dict(strength=0.0), "strength"),
                      (dict(steps=4, strength=0.2), "leaves no step"), (dict(guidance=-1.0), "guidance -1.0"),
                      (dict(source_guidance=-2.0), "source_guidance -2.0"), (dict(steps=0), "steps 0")]:
        with pytest.raises(EditError, match=what):
            CycleDiffusionOptions(**bad).check()
