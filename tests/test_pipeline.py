"""The InstDiffEdit pipeline on tiny random SD models (tests/conftest.py): the inpainting finish against
diffusers' StableDiffusionInpaintPipeline, Eq. 5 at every step, seed determinism, multi-token words."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import instdiffedit
import methods.instdiffedit as method_instdiffedit
from images import to_pil, to_tensor
from instdiffedit import EditOptions
from mask.instant import MaskResult
from sampler import make_sampler

RES = 8  # the tiny UNet's cross-attention grid (conftest.TINY_ATTENTION_RES)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' own noise, not ours: numpy 2 __array__ copy keyword; LMS "steps_offset should be 1"
    # (the pipeline rewrites it; it does not affect "linspace" spacing)
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning"),
]

SIZE, LATENT = 16, 8  # the tiny models' image and latent sizes


def _image(seed: int = 0) -> torch.Tensor:
    """(1, 3, 16, 16) in [-1, 1], a smooth random picture (values of 8-bit pixels, as `to_tensor` gives)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")
    return (x * 255).round() / 127.5 - 1


def _mask() -> torch.Tensor:
    """(8, 8) bool at latent size: an irregular blob, not aligned to halves."""
    m = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    m[2:7, 1:5] = True
    m[1, 3] = m[4, 6] = True
    return m


def _pil(seed: int = 0, size=(24, 20)) -> Image.Image:
    x = _image(seed)[0]
    return to_pil(x).resize(size, Image.BICUBIC)


# ---------------------------------------------------------------- 1. inpainting parity with diffusers

def _reference(tiny_sd, sampler: str = "lms"):
    """diffusers' StableDiffusionInpaintPipeline on the reference modules of the tiny folders."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTokenizer

    from tests.test_sampler import (  # installs the scipy.quad shim
        SD14_SCHEDULER_CONFIG,
        LMSDiscreteScheduler,
    )

    if sampler == "lms":  # the authors' scheduler
        sched = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    else:
        sched = diffusers.DDIMScheduler.from_config(SD14_SCHEDULER_CONFIG)
    _, vae, clip = tiny_sd.refs
    ref = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(str(tiny_sd.vocab), model_max_length=77),
        unet=tiny_sd.inpaint_unet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _spy_decode(pipe, monkeypatch) -> list:
    """Record the latents our pipeline decodes."""
    seen, real = [], pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda z: seen.append(z) or real(z))
    return seen


@pytest.mark.parametrize("sampler", ["lms", "ddim"])
def test_inpaint_matches_diffusers_inpaint_pipeline(pipe, tiny_sd, monkeypatch, sampler):
    """Our stage 2 (`InstDiffEdit.inpaint`) = StableDiffusionInpaintPipeline, same modules, noise, mask and
    masked-image latents. Latents and decoded images to <= 1e-4."""
    ref = _reference(tiny_sd, sampler)
    vae = tiny_sd.refs[1]
    x0, m = _image(1), _mask()
    o = EditOptions(steps=6, sampler=sampler, guidance=7.5)
    prompt = "a red apple"
    seed = 1234

    decoded = _spy_decode(pipe, monkeypatch)
    ours_img = pipe.inpaint(x0, m, prompt, o, torch.Generator().manual_seed(seed))
    ours_lat = decoded[0]

    # The same inputs for diffusers: our initial noise is randn(generator) * init_noise_sigma, and diffusers
    # multiplies given `latents` by its init_noise_sigma; the mask at pixel size (nearest), which diffusers
    # binarises and resizes (nearest) back to exactly our latent mask; the masked-image latents as ours:
    # the VAE posterior MEAN of image * (mask < 0.5), times the scaling factor.
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))
    mask_px = torch.nn.functional.interpolate(m.float()[None, None], size=(SIZE, SIZE), mode="nearest")
    seen_mask = ref.mask_processor.preprocess(mask_px, height=SIZE, width=SIZE)  # diffusers' binarise + resize
    assert torch.equal(torch.nn.functional.interpolate(seen_mask, size=(LATENT, LATENT)), m.float()[None, None])
    with torch.no_grad():
        masked = vae.encode(x0 * (mask_px < 0.5)).latent_dist.mean * vae.config.scaling_factor
    kw = {"prompt": prompt, "image": (x0 + 1) / 2, "mask_image": mask_px, "masked_image_latents": masked, "height": SIZE,
              "width": SIZE, "num_inference_steps": o.steps, "guidance_scale": o.guidance, "strength": 1.0}
    ref_lat = ref(**kw, latents=noise.clone(), output_type="latent").images
    ref_img = ref(**kw, latents=noise.clone(), output_type="pt").images  # decoded, to [0, 1] and clamped

    assert ours_lat.shape == ref_lat.shape == (1, 4, LATENT, LATENT)
    assert (ours_lat - ref_lat).abs().max() <= 1e-4
    assert ((ours_img.clamp(-1, 1) + 1) / 2 - ref_img).abs().max() <= 1e-4
    assert ours_lat.abs().max() > 0.1  # not trivially zero


def test_inpaint_masked_image_convention_is_diffusers(pipe, tiny_sd, monkeypatch):
    """Let diffusers build the masked image itself (image * (mask < 0.5), pixel mask binarised at 0.5):
    with its VAE encoding switched from a posterior *sample* to the posterior *mode* (= mean, which is what
    we use), it agrees with ours: same masked-image convention (masked pixels set to 0, i.e. grey)."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_inpaint as inp,
    )

    real = inp.retrieve_latents
    monkeypatch.setattr(inp, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        real(out, generator, sample_mode="argmax"))
    ref = _reference(tiny_sd, "lms")

    x0, m = _image(2), _mask()
    o = EditOptions(steps=4)
    decoded = _spy_decode(pipe, monkeypatch)
    pipe.inpaint(x0, m, "a cat", o, torch.Generator().manual_seed(7))
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(7))
    mask_px = torch.nn.functional.interpolate(m.float()[None, None], size=(SIZE, SIZE), mode="nearest")
    ref_lat = ref(prompt="a cat", image=(x0 + 1) / 2, mask_image=mask_px, height=SIZE, width=SIZE,
                  num_inference_steps=o.steps, guidance_scale=o.guidance, latents=noise, output_type="latent").images
    assert (decoded[0] - ref_lat).abs().max() <= 1e-4


# ---------------------------------------------------------------- 2. Eq. 5 after every step

def _spy_stage1(monkeypatch, fixed_mask: torch.Tensor | None = None):
    """Record the latents entering every sampler step (= the Eq. 5 result of the step before) and the mask
    of every step; with `fixed_mask`, `instant_mask` returns that mask instead of its own."""
    log = {"steps": [], "masks": []}
    real_make, real_mask = instdiffedit.make_sampler, method_instdiffedit.instant_mask

    def make(*a, **k):
        s = real_make(*a, **k)
        real_step = s.step
        s.step = lambda pred, i, x: log["steps"].append((i, x.clone())) or real_step(pred, i, x)
        return s

    def mask(*a, **k):
        res = real_mask(*a, **k)
        if fixed_mask is not None:
            res = MaskResult(res.P, res.index, res.similarity, res.word_maps, res.soft, fixed_mask.clone())
        log["masks"].append(res.mask.clone())
        return res

    monkeypatch.setattr(instdiffedit, "make_sampler", make)
    monkeypatch.setattr(method_instdiffedit, "instant_mask", mask)
    return log


def _half_mask() -> torch.Tensor:
    m = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    m[:, : LATENT // 2] = True
    return m


@pytest.mark.parametrize("sampler,fixed", [("lms", True), ("ddim", True), ("lms", False)])
def test_eq5_unmasked_latents_follow_the_noised_source(pipe, monkeypatch, sampler, fixed):
    """After each step, outside the mask the latents are exactly y = add_noise_at(z0, eps, i) (each round
    its own eps), inside they are the denoised ones; the last step's result is `MaskOutput.latents`."""
    log = _spy_stage1(monkeypatch, _half_mask() if fixed else None)
    o = EditOptions(steps=8, strength=0.5, rounds=2, sampler=sampler, attention_res=RES, seed=11)
    x0 = _image(3)
    out = method_instdiffedit.stage1(pipe, x0, "a green frog", o, pipe._generator(o.seed))

    # the same z0, eps and schedule, rebuilt here
    z0 = pipe.encode_image(x0).expand(o.rounds, -1, -1, -1)
    eps = torch.randn((o.rounds, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(o.seed))
    s = make_sampler(sampler, pipe.scheduler_config)
    s.set_timesteps(o.steps)
    start = s.start_index(o.strength)
    steps = [i for i, _ in log["steps"]]
    assert steps == list(range(start, o.steps)) and len(log["masks"]) == len(steps) == 4
    assert torch.equal(log["steps"][0][1], s.add_noise_at(z0, eps, start))  # the noised source, per round
    after = [x for _, x in log["steps"][1:]] + [out.latents]  # the Eq. 5 result of each step
    partial = False
    for i, m, x in zip(steps, log["masks"], after):
        y = s.add_noise_at(z0, eps, i)
        keep = ~m.expand_as(x)
        assert torch.equal(x[keep], y[keep]), f"step {i}: unmasked latents are not y_i"
        if m.any():
            assert (x[~keep] != y[~keep]).any(), f"step {i}: the masked region did not denoise"
        partial |= bool(m.any() and not m.all())
    assert partial  # the test is not vacuous: some step had a mask with both regions
    if fixed:
        assert torch.equal(out.mask, _half_mask())
    assert not torch.equal(out.latents[0], out.latents[1])  # rounds have their own noise


# ---------------------------------------------------------------- 3. determinism

def test_same_seed_is_bitwise_identical_and_another_seed_differs(pipe):
    img = _pil(4)
    kw = {"steps": 5, "rounds": 2, "attention_res": RES}
    a = pipe.edit(img, "a yellow banana", seed=3, **kw)
    b = pipe.edit(img, "a yellow banana", seed=3, **kw)
    c = pipe.edit(img, "a yellow banana", seed=4, **kw)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes() and a.soft_mask.tobytes() == b.soft_mask.tobytes()
    assert a.P == b.P and torch.equal(a.word_maps, b.word_maps)
    assert a.image.tobytes() != c.image.tobytes()
    assert a.image.size == img.size == a.mask.size


def test_seed_drives_the_stage1_noise_and_the_inpainting_noise(pipe):
    x0 = _image(5)
    o = EditOptions(steps=4, rounds=2, attention_res=RES)
    m1 = method_instdiffedit.stage1(pipe, x0, "a dog", o, pipe._generator(1))
    m2 = method_instdiffedit.stage1(pipe, x0, "a dog", o, pipe._generator(1))
    m3 = method_instdiffedit.stage1(pipe, x0, "a dog", o, pipe._generator(2))
    assert torch.equal(m1.latents, m2.latents) and torch.equal(m1.soft, m2.soft)
    assert not torch.equal(m1.latents, m3.latents)
    i1 = pipe.inpaint(x0, _mask(), "a dog", o, pipe._generator(1))
    i2 = pipe.inpaint(x0, _mask(), "a dog", o, pipe._generator(2))
    assert not torch.equal(i1, i2)


def test_edit_encodes_the_text_once_and_equals_the_two_stages_run_apart(pipe):
    """edit() hands stage 1's text embedding to the finish; the result is what the stages give alone."""
    img = _pil(6)
    o = EditOptions(steps=4, rounds=2, attention_res=RES, seed=9)
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    try:
        res = pipe.edit(img, "a red kite", steps=4, rounds=2, attention_res=RES, seed=9)
    finally:
        hook.remove()
    assert len(calls) == 1
    x0 = to_tensor(img, pipe.size, pipe.device, pipe.dtype)
    gen = pipe._generator(9)
    st1 = method_instdiffedit.stage1(pipe, x0, "a red kite", o, gen)
    out = pipe.inpaint(x0, st1.mask, "a red kite", o, gen)[0]
    apart = to_pil(out).resize(img.size, Image.BICUBIC)
    assert res.image.tobytes() == apart.tobytes()


# ---------------------------------------------------------------- 4. multi-token words

def test_multi_token_word_is_one_entry(pipe, monkeypatch):
    """'zebracorn' is three CLIP BPE tokens (ze, brac, orn</w>): one word, one P entry, one map."""
    edit = "a zebracorn on grass"
    assert pipe.tokenizer.tokens(edit) == ["a</w>", "ze", "brac", "orn</w>", "on</w>", "grass</w>"]
    seen = []
    real = method_instdiffedit.instant_mask
    monkeypatch.setattr(method_instdiffedit, "instant_mask", lambda maps, positions, *a, **k:
                        seen.append(positions) or real(maps, positions, *a, **k))
    res = pipe.edit(_pil(6), edit, steps=4, rounds=1, attention_res=RES)
    assert res.words == ["<sot>", "a", "zebracorn", "on", "grass", "<eot>"]
    assert len(res.P) == len(res.words) == res.word_maps.shape[0] == 6
    assert res.P[0] == res.P[-1] == 0 and set(res.P) <= {-1, 0, 1}
    assert all(isinstance(p, int) for p in res.P)
    assert seen[0] == [[1], [2, 3, 4], [5], [6]]


def test_mask_api_and_user_mask(pipe):
    img = _pil(7, size=(20, 28))
    mo = pipe.mask(img, "a cup", steps=4, rounds=1, attention_res=RES)
    assert mo.mask_latent.shape == mo.soft_latent.shape == (LATENT, LATENT) and mo.mask_latent.dtype == torch.bool
    assert mo.image is None and mo.mask.size == img.size  # the same EditResult as edit(), without an image
    assert mo.latents.shape == (1, 4, LATENT, LATENT)
    user = torch.zeros(28, 20, dtype=torch.bool)
    user[10:, :] = True
    res = pipe.edit(img, "a cup", mask=user, steps=4)
    assert res.words == [] and res.P == [] and res.image.size == (20, 28)
    assert res.mask.getpixel((5, 27)) == 255 and res.mask.getpixel((5, 0)) == 0


def test_no_inpaint_decodes_round0_and_options_are_checked(pipe):
    res = pipe.edit(_pil(8), "a hat", steps=4, rounds=2, attention_res=RES, inpaint=False)
    assert res.image.size == (24, 20)
    for bad in ({"threshold": 1.5}, {"strength": 0.0}, {"rounds": 0}, {"attention_res": 0},
                {"steps": 2, "strength": 0.2}, {"sampler": "euler"}, {"attention_res": 3}):
        with pytest.raises(instdiffedit.EditError):
            pipe.edit(_pil(8), "a hat", **{"steps": 4, "attention_res": RES, **bad})
    with pytest.raises(instdiffedit.EditError, match="empty"):
        pipe.edit(_pil(8), "   ", steps=4)


def test_exact_authors_reaches_instant_mask(pipe, monkeypatch):
    """--exact-authors / exact_authors=True is handed to instant_mask at every step (the CLI flag too)."""
    import methods.instdiffedit as method
    seen = []
    real = method.instant_mask
    monkeypatch.setattr(method, "instant_mask", lambda *a, **k: seen.append(k["exact_authors"]) or real(*a, **k))
    pipe.mask(_pil(9), "a red t-shirt", steps=4, rounds=1, attention_res=RES, exact_authors=True)
    assert seen and all(seen)
    assert instdiffedit.build_parser().parse_args(["--image", "x", "--edit", "y", "--exact-authors"]).exact_authors
