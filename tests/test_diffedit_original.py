"""DiffEdit as Couairon et al. designed it (methods/diffedit.py, `diffedit-original`) on the tiny random SD
models (tests/conftest.py): mask, inverted latents and edited image against diffusers'
StableDiffusionDiffEditPipeline (generate_mask, invert, __call__) on the same modules, scheduler settings and
noise; UNet evaluations counted per edit; bad input."""
from __future__ import annotations

import pytest
import torch

from methods import EditError, Job, get_method
from tests.test_pipeline import LATENT, _image, _pil

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' own warnings: the deprecated pipeline, numpy 2 __array__ copy keyword
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

METHOD = get_method("diffedit-original")


def _reference(tiny_sd):
    """diffusers' StableDiffusionDiffEditPipeline on the reference modules of the tiny folder, with SD v1.4's
    DDIM and the DDIM inverse scheduler from the same config (as diffusers' DiffEdit example sets them)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated import StableDiffusionDiffEditPipeline
    from transformers import CLIPTokenizer

    from tests.test_sampler import SD14_SCHEDULER_CONFIG

    unet, vae, clip = tiny_sd.refs
    ref = StableDiffusionDiffEditPipeline(
        vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(str(tiny_sd.vocab), model_max_length=77),
        unet=unet, scheduler=diffusers.DDIMScheduler.from_config(SD14_SCHEDULER_CONFIG),
        inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(SD14_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _job(pipe, x0, edit, o, seed):
    pipe.unet_evals = {}
    return Job(x0, edit, pipe.encode_text(edit), o, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strength,encode_ratio,guidance", [(0.5, 0.8, 7.5), (0.7, 0.5, 3.0)])
def test_matches_diffusers_diffedit_pipeline(pipe, tiny_sd, strength, encode_ratio, guidance):
    """One CPU generator through generate_mask, invert and __call__, as our method draws from the master seed:
    the mask's VAE posterior samples and noise, then the inverted VAE sample (decoding with eta 0 draws none).
    10 DDIM steps, 3 noise samples: mask, every inverted latent and the image to <= 1e-4."""
    ref = _reference(tiny_sd)
    x0, seed, n, steps = _image(3), 5, 3, 10
    edit, source = "a red apple on a table", "a green pear"
    o = pipe.options("diffedit-original", steps=steps, strength=strength, guidance=guidance, diffedit_samples=n,
                     diffedit_ratio=2.0, diffedit_encode_ratio=encode_ratio, source=source)

    gen = torch.Generator().manual_seed(seed)
    img01 = (x0 + 1) / 2
    ref_mask = ref.generate_mask(image=img01, target_prompt=edit, source_prompt=source, num_maps_per_mask=n,
                                 mask_encode_strength=strength, mask_thresholding_ratio=o.diffedit_ratio,
                                 num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np")
    ref_inv = ref.invert(prompt=source, image=img01, num_inference_steps=steps, inpaint_strength=encode_ratio,
                         guidance_scale=guidance, generator=gen).latents  # (1, levels, 4, h, w): noisiest first
    ref_img = ref(prompt=edit, mask_image=ref_mask, image_latents=ref_inv, inpaint_strength=encode_ratio,
                  num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt").images

    job = _job(pipe, x0, edit, o, seed)
    mask = METHOD.mask(pipe, job)
    sampler, inv = METHOD.invert(pipe, job)
    res = METHOD.edit(pipe, _job(pipe, x0, edit, o, seed))

    levels = int(steps * encode_ratio)
    assert ref_mask.shape == (1, LATENT, LATENT) and ref_inv.shape == (1, levels, 4, LATENT, LATENT)
    assert 0 < int(mask.mask.sum()) < LATENT * LATENT  # a real partition, not all or nothing
    assert torch.equal(mask.mask, torch.from_numpy(ref_mask[0]).bool())
    assert torch.equal(res.mask.mask, mask.mask)
    assert inv.start == steps - levels and len(inv.latents) == levels + 1
    for k in range(levels):  # diffusers' latents[k] sits at the level of timesteps[start + k]
        assert (inv.at(inv.start + k) - ref_inv[0, k]).abs().max() <= 1e-4
    assert ((res.image.clamp(-1, 1) + 1) / 2 - ref_img[0]).abs().max() <= 1e-4
    # not trivially equal: another seed gives another image; the edit kept the source outside the mask only
    other = METHOD.edit(pipe, _job(pipe, x0, edit, o, seed + 1))
    assert ((other.image.clamp(-1, 1) + 1) / 2 - ref_img[0]).abs().max() > 1e-3


def test_edit_counts_unet_image_evaluations(pipe):
    """Counted at the call: the mask's 2 texts x CFG x samples, then 2 per inverted and per decoded step."""
    res = pipe.edit(_pil(0), "a cat", method="diffedit-original", source="a dog", steps=10, diffedit_samples=3,
                    diffedit_encode_ratio=0.8)
    assert res.unet_evals == res.unet_evals_by_model["unet"] == 2 * 2 * 3 + 2 * 8 + 2 * 8
    assert res.image.size == (24, 20)
    m = pipe.mask(_pil(0), "a cat", method="diffedit-original", source="a dog", steps=10, diffedit_samples=3)
    assert m.unet_evals == 12 and m.mask_latent.shape == (LATENT, LATENT)
    assert METHOD.unet_batch(pipe.options("diffedit-original", source="a", diffedit_samples=3)) == 6


def test_user_mask_replaces_its_own(pipe):
    """A user mask skips the method's own (no mask UNet calls); what it covers decides what may change.
    (An empty mask, which would show the outside restored exactly, is refused by the API as a bad input.)"""
    kw = dict(method="diffedit-original", source="a dog", steps=10, seed=3)
    half = torch.zeros(4, 4, dtype=torch.bool)
    half[:, :2] = True
    a = pipe.edit(_pil(0), "a cat", mask=half, **kw)
    assert a.unet_evals == 2 * 8 + 2 * 8  # no mask computed
    assert a.image.tobytes() == pipe.edit(_pil(0), "a cat", mask=half, **kw).image.tobytes()
    full = pipe.edit(_pil(0), "a cat", mask=torch.ones(4, 4, dtype=torch.bool), **kw)
    assert full.image.tobytes() != a.image.tobytes()


def test_same_seed_same_output_and_bad_input(pipe):
    kw = dict(method="diffedit-original", source="a dog", steps=6, diffedit_samples=2)
    a = pipe.edit(_pil(0), "a cat", **kw).image.tobytes()
    assert a == pipe.edit(_pil(0), "a cat", **kw).image.tobytes()
    assert a != pipe.edit(_pil(0), "a cat", **kw, seed=1).image.tobytes()
    with pytest.raises(EditError, match="needs the text of what the image shows"):
        pipe.edit(_pil(0), "a cat", **{**kw, "source": " "})
    for bad, what in [(dict(diffedit_encode_ratio=0.0), "diffedit_encode_ratio 0.0 is outside"),
                      (dict(diffedit_encode_ratio=1.5), "diffedit_encode_ratio 1.5 is outside"),
                      (dict(diffedit_encode_ratio=0.1), "leaves no step to invert"),
                      (dict(sampler="lms"), "sampler 'lms' does not apply"), (dict(inpaint=False), "never inpaints"),
                      (dict(diffedit_ratio=0.0), "diffedit_ratio 0.0 is outside"),
                      (dict(cycle_eta=0.5), "cycle_eta' does not apply")]:
        with pytest.raises(EditError, match=what):
            pipe.edit(_pil(0), "a cat", **{**kw, **bad})
