"""LEDITS++ (methods/ledits.py) against diffusers' LEditsPPPipelineStableDiffusion on tiny random weights:
the same folder loaded into both, the same seed (all inversion noise drawn on the CPU in the same order).

The tiny model: 32x32 images (diffusers' LEDITS++ wants multiples of 32), a 2-level VAE (16x16 latents)
and a 3-level UNet with cross-attention at 16x16 and at 4x4 = latent / 4, the grid LEDITS++ reads its
masks from (SD's 16x16 of 64x64). The 16x16 layers and the mid block must be left out of the maps."""
from __future__ import annotations

import pytest
import torch

import instdiffedit
from images import to_pil, to_tensor
from mask.ledits import ConceptAttention, attention_mask, noise_mask
from methods import EditOptions
from methods.ledits import Concept, guided_denoise, invert

diffusers = pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning"),
]

SIZE = 32
UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
EDIT, SOURCE = "a blue circle", "a red square"
RES = 4  # attention_res: the cross-attention grid at latent / 4, as SD's 16x16 at a 64x64 latent


@pytest.fixture(scope="module")
def tiny(tiny_sd, tmp_path_factory):
    """(our pipe, reference modules, vocab folder) for a LEDITS++-shaped tiny SD."""
    from tests.tiny_sd import reference_models, save_sd_folder
    refs = reference_models(seed=3, unet_config=UNET)
    folder = save_sd_folder(tmp_path_factory.mktemp("ledits") / "sd", *refs, tiny_sd.vocab)
    pipe = instdiffedit.InstDiffEdit.from_pretrained(str(folder), None, "cpu", torch.float32)
    return pipe, refs, tiny_sd.vocab


def _image():
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")
    return to_pil(x[0] * 2 - 1)


class _DDIMIntTimesteps(diffusers.DDIMScheduler):
    """diffusers 0.42.1's LEDITS++ inversion noises with float timesteps (torch.Tensor([t])), which
    DDIMScheduler.add_noise cannot index with (IndexError): the DDIM path of the pipeline is broken
    there. This shim casts them to integers; nothing else changes."""

    def add_noise(self, original_samples, noise, timesteps):
        return super().add_noise(original_samples, noise, timesteps.long())


def _reference(tiny, sampler: str):
    from transformers import CLIPTokenizer

    from tests.test_sampler import SD14_SCHEDULER_CONFIG
    _, (unet, vae, clip), vocab = tiny
    sched = (_DDIMIntTimesteps.from_config(SD14_SCHEDULER_CONFIG) if sampler == "ddim"
             else diffusers.PNDMScheduler.from_config(SD14_SCHEDULER_CONFIG))  # -> SDE-DPM-Solver++ 2M
    ref = diffusers.LEditsPPPipelineStableDiffusion(
        vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77),
        unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("sampler,mask", [("dpmsolver-sde", "intersect"), ("ddim", "intersect"),
                                          ("dpmsolver-sde", "noise")])
def test_inversion_and_edit_match_diffusers(tiny, sampler, mask):
    pipe, _, _ = tiny
    o = EditOptions("ledits", steps=10, attention_res=RES, ledits_skip=0.15, ledits_sampler=sampler, ledits_mask=mask, seed=11)
    ref = _reference(tiny, sampler)
    assert type(ref.scheduler).__name__ == ("_DDIMIntTimesteps" if sampler == "ddim" else "DPMSolverMultistepScheduler")
    assert sampler == "ddim" or ref.scheduler.config.algorithm_type == "sde-dpmsolver++"
    img = _image()
    ref.invert(image=img, num_inversion_steps=o.steps, skip=o.ledits_skip, generator=torch.Generator().manual_seed(o.seed))
    out = ref(editing_prompt=[EDIT, SOURCE], reverse_editing_direction=[False, True], edit_guidance_scale=o.guidance,
              edit_threshold=o.threshold, use_intersect_mask=mask == "intersect", use_cross_attn_mask=False,
              output_type="latent").images

    # ours, on the same folder
    x0 = to_tensor(img, SIZE, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(o.seed)
    ids = pipe.tokenizer.encode(["", EDIT, SOURCE])
    uncond, e_edit, e_src = pipe.text_encoder(ids)
    inv = invert(pipe, pipe.encode_image(x0), o, gen, uncond)
    assert (inv.x_T - ref.init_latents).abs().max() <= 1e-4
    assert (inv.zs - ref.zs).abs().max() <= 1e-4
    # diffusers 0.42.1 with transformers 5 sums the attention of 75 positions after the start token (the
    # tokenizer's return_length counts the padding); the paper, and our default, use the prompt's own tokens
    concepts = [Concept(e_edit, 75), Concept(e_src, 75, reverse=True)]
    x, activation = guided_denoise(pipe, inv, uncond, concepts, o)
    ref_act = ref.activation_mask[:, :, 0, 0]  # (steps, concepts, h, w), its channels are copies
    assert torch.equal(activation, ref_act)
    assert 0 < activation.mean() < 0.5  # the masks select, neither nothing nor everything
    # the tiny random UNet under guidance 5 drives the latents up to |x| ~ 9 after 10 steps, and float32
    # rounding (diffusers' AttnProcessor vs our SDPA, ~1e-7 relative) grows with them: 1e-4 of their scale
    assert (x - out).abs().max() <= 1e-4 * max(1.0, out.abs().max().item())
    image, ref_image = pipe.decode(x), ref.vae.decode(out / ref.vae.config.scaling_factor).sample
    assert (image - ref_image).abs().max() <= 1e-4


def test_reconstruction_without_concepts_returns_the_source_latents(tiny):
    """With no concept the edit replays the inversion's noise maps: z0 comes back (to float rounding).
    DDIM (eta 1) has noise in every step; SDE-DPM-Solver++'s last step goes to sigma 0 without noise, so
    there the run ends on the model's x0 prediction instead (as in diffusers)."""
    pipe, _, _ = tiny
    o = EditOptions("ledits", steps=8, attention_res=RES, ledits_skip=0.2, ledits_sampler="ddim")
    z0 = pipe.encode_image(to_tensor(_image(), SIZE, "cpu", torch.float32))
    uncond = pipe.text_encoder(pipe.tokenizer.encode([""]))[0]
    inv = invert(pipe, z0, o, torch.Generator().manual_seed(0), uncond)
    x, activation = guided_denoise(pipe, inv, uncond, [], o)
    assert (x - z0).abs().max() <= 1e-4 and activation.numel() == 0


def test_registered_method(tiny):
    """pipe.edit/pipe.mask with method="ledits": the source phrase becomes a removal concept (one more UNet
    row per step), the mask is the union of the guided pixels, UNet evaluations are counted at the call,
    the same seed gives the same bytes, and bad options get one-line errors."""
    pipe, _, _ = tiny
    kw = dict(method="ledits", steps=6, attention_res=RES, ledits_skip=0.2)
    a = pipe.edit(_image(), EDIT, source=SOURCE, **kw)
    b = pipe.edit(_image(), EDIT, source=SOURCE, **kw)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.unet_evals == 6 * 1 + 6 * 3  # inversion: uncond; edit: [uncond, edit, source]
    alone = pipe.edit(_image(), EDIT, **kw)
    assert alone.unet_evals == 6 + 6 * 2 and alone.image.tobytes() != a.image.tobytes()
    m = pipe.mask(_image(), EDIT, source=SOURCE, **kw)
    assert m.mask_latent.shape == (16, 16) and m.mask_latent.any() and not m.mask_latent.all()
    assert torch.equal(m.mask_latent, m.soft_latent > 0) and m.unet_evals == a.unet_evals
    with pytest.raises(instdiffedit.EditError, match="ledits_mask 'box'"):
        pipe.edit(_image(), EDIT, method="ledits", ledits_mask="box")
    with pytest.raises(instdiffedit.EditError, match="ledits_skip 1"):
        pipe.edit(_image(), EDIT, method="ledits", ledits_skip=1.0)
    with pytest.raises(instdiffedit.EditError, match="never inpaints"):
        pipe.edit(_image(), EDIT, method="ledits", inpaint=False)


def test_masks_on_constructed_maps():
    """M1 keeps the top (1 - lambda) of the smoothed token-summed map; M2 the top of |direction|."""
    maps = torch.zeros(4, 4, 5)
    maps[0, 0, 1] = 1.0       # token 1 peaks in a corner
    maps[3, 3, 2] = 0.5       # token 2 in the opposite corner
    maps[1, 2, 4] = 9.0       # position 4 is outside the 2 summed tokens
    m = attention_mask(maps, tokens=2, threshold=0.9, size=(8, 8))
    assert m.shape == (8, 8) and m[0, 0] == 1 and m[7, 7] == 1 and m[2:4, 4:6].sum() == 0
    direction = torch.zeros(4, 10, 10)
    direction[:, 2, 3] = -1.0  # a sign does not matter
    assert torch.equal(noise_mask(direction, 0.99).nonzero(), torch.tensor([[2, 3]]))


def test_recorder_keeps_the_grid_and_averages_every_layer_head():
    store = ConceptAttention((2, 2), concepts=1)
    assert store.wants("down_blocks.2.attentions.0.transformer_blocks.0.attn2", (2, 2))
    assert not store.wants("mid_block.attentions.0.transformer_blocks.0.attn2", (2, 2))
    assert not store.wants("down_blocks.0.attentions.0.transformer_blocks.0.attn2", (8, 8))
    a = torch.zeros(2, 1, 4, 3)
    a[1, 0, :, 0] = 1.0        # layer with 1 head: token 0
    b = torch.zeros(2, 3, 4, 3)
    b[1, :, :, 2] = 1.0        # layer with 3 heads: token 2
    store.record("x", a)
    store.record("y", b)
    out = store.take()
    assert out.shape == (1, 2, 2, 3)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.25, 0.0, 0.75]))
    with pytest.raises(RuntimeError):
        store.take()
