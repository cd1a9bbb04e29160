"""CycleDiffusion (methods/cyclediffusion.py) on the tiny random SD models (tests/conftest.py): latents and
decoded image against diffusers' CycleDiffusionPipeline on the same modules, seed and settings; the
official schedule; UNet evaluations counted per edit; the registry's front ends; bad input."""
from __future__ import annotations

import pytest
import torch

from methods import EditError
from methods.cyclediffusion import cycle_latents
from tests.test_pipeline import LATENT, _image, _pil

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
    o = pipe.options("cyclediffusion", steps=12, strength=0.75, guidance=guidance,
                     cycle_source_guidance=source_guidance, cycle_eta=0.1, source=source)

    ours_lat = cycle_latents(pipe, x0, pipe.encode_text(edit), pipe.encode_text(source), o,
                             torch.Generator().manual_seed(seed))
    ours_img = pipe.decode(ours_lat)

    kw = dict(prompt=edit, source_prompt=source, image=(x0 + 1) / 2, strength=o.strength,
              num_inference_steps=o.steps, guidance_scale=o.guidance, source_guidance_scale=o.cycle_source_guidance,
              eta=o.cycle_eta)
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

    o = pipe.options("cyclediffusion")
    s = pipe.sampler(o)
    assert isinstance(s, DDIMSampler)
    official = [t + 1 for t in range(0, 1000, 1000 // 99)][:99]
    assert s.timesteps.tolist() == official[::-1]
    skip = 30
    assert s.start_index(o.strength) == skip
    assert int(s.timesteps[s.start_index(o.strength)]) == official[99 - skip - 1]
    assert (o.cycle_eta, o.cycle_source_guidance, o.guidance) == (0.1, 1.0, 3.0)


@pytest.mark.parametrize("guidance,source_guidance,per_step", [(3.0, 1.0, 3), (1.0, 1.0, 2), (3.0, 2.0, 4)])
def test_edit_counts_unet_image_evaluations(pipe, guidance, source_guidance, per_step):
    """pipe.edit through the registry; a branch at scale 1 is evaluated on its conditional text alone (the
    official code's cost), counted at the call: per_step x the int(steps r) steps run."""
    res = pipe.edit(_pil(0), "a cat", method="cyclediffusion", source="a dog", steps=10, strength=0.5,
                    guidance=guidance, cycle_source_guidance=source_guidance)
    assert res.unet_evals == res.unet_evals_by_model["unet"] == per_step * 5
    assert res.image.size == (24, 20) and res.P == [] and res.word_maps.shape[0] == 0


def test_same_seed_same_output_and_bad_input(pipe):
    kw = dict(method="cyclediffusion", source="a dog", steps=6, strength=0.5)
    a = pipe.edit(_pil(0), "a cat", **kw).image.tobytes()
    assert a == pipe.edit(_pil(0), "a cat", **kw).image.tobytes()
    assert a != pipe.edit(_pil(0), "a cat", **kw, seed=1).image.tobytes()
    for source in ("", "  "):
        with pytest.raises(EditError, match="needs the text of what the image shows"):
            pipe.edit(_pil(0), "a cat", **{**kw, "source": source})
    with pytest.raises(EditError, match="takes no mask"):
        pipe.edit(_pil(0), "a cat", mask=torch.ones(4, 4, dtype=torch.bool), **kw)
    with pytest.raises(EditError, match="makes no mask"):
        pipe.mask(_pil(0), "a cat", **kw)
    for bad, what in [(dict(cycle_eta=0.0), "cycle_eta 0.0 is outside"), (dict(cycle_eta=1.5), "cycle_eta 1.5"),
                      (dict(sampler="lms"), "sampler 'lms' does not apply"), (dict(inpaint=False), "never inpaints"),
                      (dict(strength=0.1), "leaves no step"), (dict(cycle_source_guidance=-2.0), "outside"),
                      (dict(rounds=2, diffedit_samples=3), "diffedit_samples' does not apply")]:
        with pytest.raises(EditError, match=what):
            pipe.edit(_pil(0), "a cat", **{**kw, **bad})
