"""The Python API in the diffusers manner: inputs in every form (path, PIL, numpy, tensors, lists), masks
including the PIL mask edit() returns, diffusers' keyword names, .to(), the step callback, and one result
type for mask() and edit(). Tiny random models (conftest), so only equality between forms is asserted."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from images import as_image
from instdiffedit import EditResult, InstDiffEdit
from methods import EditError, StepState
from methods.options import SHARED_BY_NAME

OPTS = dict(steps=4, rounds=1, attention_res=8)  # the tiny UNet's cross-attention grid


@pytest.fixture(scope="module")
def img() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB")


def _same(a: EditResult, b: EditResult) -> bool:
    return (np.array_equal(np.asarray(a.image), np.asarray(b.image)) and torch.equal(a.mask_latent, b.mask_latent)
            and torch.equal(a.soft_latent, b.soft_latent))


def test_every_image_form_gives_the_same_edit(pipe, img, tmp_path, one_thread):
    ref = pipe.edit(img, "a red cup", **OPTS)
    a = np.array(img)
    img.save(tmp_path / "x.png")
    chw01 = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    forms = {"path": tmp_path / "x.png", "str": str(tmp_path / "x.png"), "numpy": a,
             "tensor [0,1]": chw01, "tensor [-1,1]": chw01 * 2 - 1, "tensor uint8": torch.from_numpy(a).permute(2, 0, 1),
             "tensor 1x3xHxW": chw01[None], "RGBA PIL": img.convert("RGBA")}
    for name, x in forms.items():
        assert np.array_equal(np.asarray(as_image(x)), a), name
    assert _same(pipe.edit(forms["numpy"], "a red cup", **OPTS), ref)
    assert _same(pipe.edit(forms["tensor [-1,1]"], "a red cup", **OPTS), ref)


def test_bad_image_forms_are_one_line_errors():
    with pytest.raises(EditError, match="float64"):
        as_image(np.zeros((8, 8, 3)))
    with pytest.raises(EditError, match="outside"):
        as_image(torch.full((3, 8, 8), 2.0))
    with pytest.raises(EditError, match="channels first"):
        as_image(torch.zeros(8, 8, 3))
    with pytest.raises(EditError, match="expected a path"):
        as_image(42)


def test_a_list_is_a_batch_of_independent_edits(pipe, img, one_thread):
    other = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = pipe.edit([img, np.asarray(other)], ["a red cup", "a blue cup"], **OPTS)
    assert isinstance(out, list) and len(out) == 2
    assert _same(out[0], pipe.edit(img, "a red cup", **OPTS))
    assert _same(out[1], pipe.edit(other, "a blue cup", **OPTS))
    with pytest.raises(EditError, match="2 images but 3 edit texts"):
        pipe.edit([img, img], ["a", "b", "c"], **OPTS)


def test_mask_forms_including_the_returned_pil_mask(pipe, img, one_thread):
    first = pipe.edit(img, "a red cup", **OPTS)
    again = pipe.edit(img, "a red cup", mask=first.mask, **OPTS)  # what edit() returned goes back in
    assert torch.equal(again.mask_latent, first.mask_latent)
    # the forms below are only told apart by a mask that is neither empty nor full
    assert first.mask_latent.any() and not first.mask_latent.all(), "the tiny model's mask is trivial here"
    m = np.asarray(first.mask) > 127
    for form in (m, torch.from_numpy(m), torch.from_numpy(m).float(), (m * 255).astype(np.uint8),
                 Image.fromarray(m)):
        assert torch.equal(pipe.edit(img, "a red cup", mask=form, **OPTS).mask_latent, first.mask_latent)
    with pytest.raises(EditError, match="empty"):
        pipe.edit(img, "a red cup", mask=np.zeros((4, 4), bool), **OPTS)


def test_diffusers_keyword_names_and_generator(pipe, img, one_thread):
    ref = pipe.edit(img, "a red cup", steps=4, guidance=3.0, seed=7, rounds=1, attention_res=8)
    alias = pipe.edit(img, "a red cup", num_inference_steps=4, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(7), rounds=1, attention_res=8)
    assert _same(ref, alias)
    with pytest.raises(EditError, match="disagree"):
        pipe.edit(img, "a red cup", steps=4, num_inference_steps=5)


def test_one_result_type_and_the_step_callback(pipe, img, one_thread):
    seen: list[tuple[int, StepState]] = []
    res = pipe.edit(img, "a red cup", strength=0.5, callback_on_step_end=lambda i, t, s: seen.append((i, s)),
                    **OPTS)
    stage1 = [(i, s) for i, s in seen if s.stage == "mask"]
    finish = [(i, s) for i, s in seen if s.stage == "inpaint"]
    assert [i for i, _ in stage1] == [0, 1] and [i for i, _ in finish] == [0, 1, 2, 3]  # int(4 * 0.5) and 4
    last = stage1[-1][1]
    assert torch.equal(last.soft.cpu(), res.soft_latent) and torch.equal(last.mask.cpu(), res.mask_latent)
    assert last.word_maps.shape[0] == len(last.words) == len(res.words)
    m = pipe.mask(img, "a red cup", strength=0.5, **OPTS)
    assert type(m) is type(res) is EditResult and m.image is None
    assert torch.equal(m.mask_latent, res.mask_latent) and m.P == res.P


def test_keywords_are_the_option_specs_and_documented():
    """The explicit keywords of edit() are exactly the shared options (methods/options.py), each documented."""
    params = set(inspect.signature(InstDiffEdit.edit).parameters)
    api_only = {"self", "image", "edit", "mask", "method", "num_inference_steps", "guidance_scale", "generator",
                "callback_on_step_end", "progress", "method_options"}
    assert params - api_only == set(SHARED_BY_NAME)
    for name in SHARED_BY_NAME:
        assert f"\n            {name} (" in InstDiffEdit.edit.__doc__


def test_to_moves_every_network(tiny_sd):
    p = InstDiffEdit.from_pretrained(str(tiny_sd.sd), str(tiny_sd.inpaint), "cpu", torch.float32)
    assert p.to("cpu", torch.bfloat16) is p and p.dtype == torch.bfloat16
    assert {q.dtype for net in (p.unet, p.vae, p.text_encoder, p.inpaint_unet) for q in net.parameters()} \
        == {torch.bfloat16}
    with pytest.raises(EditError, match="meta"):
        p.to("meta")


def test_keep_unmasked_pastes_the_original_outside_the_feathered_mask(pipe, one_thread):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    m = np.zeros((64, 64), bool)
    m[16:48, 16:48] = True
    plain = pipe.edit(img, "a red cup", mask=m, **OPTS)
    kept = pipe.edit(img, "a red cup", mask=m, keep_unmasked=True, **OPTS)
    a, b, src = (np.asarray(x, dtype=np.int16) for x in (plain.image, kept.image, img))
    far_out = np.ones((64, 64), bool)
    far_out[10:54, 10:54] = False  # more than the 1-px feather (64 px image) away from the mask's edge
    assert np.array_equal(b[far_out], src[far_out]) and not np.array_equal(a[far_out], src[far_out])
    assert np.array_equal(b[22:42, 22:42], a[22:42, 22:42])  # deep inside: the edit itself


def test_devices_and_half_precision_on_the_cpu():
    from instdiffedit import check_precision, default_dtype, resolve_device
    with pytest.raises(EditError, match="meta: only cpu, cuda and mps"):
        resolve_device("meta")
    if not torch.backends.mps.is_built():
        with pytest.raises(EditError, match="this torch build has no MPS support"):
            resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(EditError, match="CUDA is not available here"):
            resolve_device("cuda:1")
        assert resolve_device(None).type in ("mps", "cpu")
    assert default_dtype(torch.device("mps")) == torch.float16 == default_dtype(torch.device("cuda"))
    with pytest.warns(RuntimeWarning, match="fp16 on the CPU is slower than fp32"):
        check_precision(torch.device("cpu"), torch.float16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision(torch.device("cpu"), torch.float32)
        check_precision(torch.device("cpu"), torch.bfloat16)  # measured faster than fp32 here: no warning
