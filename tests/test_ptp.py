"""Prompt-to-Prompt (methods/ptp.py): token maps, the attention control by layer and step, and the
method end to end on the tiny SD."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from methods import EditError
from methods.ptp import PtPControl, build_control, refine_mapper, replace_mapper, run_ptp

STEPS = 10  # cross 0.8 -> steps 0..7 edited, self 0.4 -> steps 0..3


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())


def make_job(pipe, image, source, edit, **options):
    o = pipe.options("ptp", source=source, steps=STEPS, **options)
    return pipe._job(image, edit, o, False)[1]


class Spy(PtPControl):
    """Logs every layer the UNet offers and what the control did there."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.asked, self.calls = [], []

    def wants(self, name, hw):
        yes = super().wants(name, hw)
        self.asked.append((self.step, name, tuple(hw), yes))
        return yes

    def attention(self, name, probs):
        out = super().attention(name, probs)
        self.calls.append((self.step, name, probs.clone(), out.clone()))
        return out


def spy_for(pipe, job):
    c = build_control(pipe.tokenizer, job.o.source, job.text, job.o, (8, 8))
    spy = Spy(STEPS, job.o.ptp_cross, job.o.ptp_self, (8, 8), c.mapper, c.refine, c.blend_tokens)
    return spy


def test_identical_prompts_reproduce_the_source_branch(pipe, image, one_thread):
    job = make_job(pipe, image, "a red cat on a mat", "a red cat on a mat")
    x, _ = run_ptp(pipe, job)
    assert torch.equal(x[0], x[1])
    assert pipe.unet_evals["unet"] == STEPS + 4 * STEPS  # inversion (guidance 1) + [u, u, c, c] per step


def test_replaced_maps_are_the_sources_at_the_chosen_layers_and_steps_only(pipe, image, one_thread):
    job = make_job(pipe, image, "a red cat on a mat", "a red dog on a mat")  # one-token swap
    spy = spy_for(pipe, job)
    run_ptp(pipe, job, spy)
    cross_steps, self_steps = int(0.8 * STEPS), int(0.4 * STEPS)
    assert (cross_steps, self_steps) == (8, 4)
    # what was controlled: every cross-attention layer while step < 8, the self-attention layers
    # below full resolution (the tiny UNet: the 4x4 mid block) while step < 4; no ResNet block
    controlled = {(s, n) for s, n, hw, yes in spy.asked if yes}
    want = {(s, n) for s, n, hw, _ in spy.asked
            if (n.endswith("attn2") and s < 8) or (n.endswith("attn1") and s < 4 and hw == (4, 4))}
    assert controlled == want
    assert any(n.endswith("attn1") and hw == (8, 8) for _, n, hw, _ in spy.asked)  # offered, refused
    assert any(".resnets." in n for _, n, _, _ in spy.asked)
    swapped = pipe.tokenizer.words("a red cat on a mat")[2][1]  # positions of "cat" (= "dog")
    assert swapped == [3]
    for step, name, before, after in spy.calls:
        assert torch.equal(after[:3], before[:3])  # uncond rows and the source branch untouched
        assert not torch.equal(before[3], before[2])  # the edit branch had maps of its own
        assert torch.equal(after[3], before[2])  # ... and now has the source's (token map = identity)


def test_token_maps(pipe):
    tok = pipe.tokenizer
    # word swap after padding "a cat" -> "a cat cat": cat->big, cat->dog, end token to end token
    M = replace_mapper(tok, ["a", "cat", "cat"], ["a", "big", "dog"])
    assert M[0, 0] == M[1, 1] == M[2, 2] == M[3, 3] == M[4, 4] == 1
    assert M[:5, :5].sum() == 5 and M.sum() == 77
    # a one-token word swapped for a two-token one spreads its attention over both (mass kept)
    pieces = tok.words("a xylophonist")[1][1]  # one word, several BPE pieces
    assert len(pieces) > 1
    M = replace_mapper(tok, ["a", "cat"], ["a", "xylophonist"])
    assert all(M[2, p] == 1 / len(pieces) for p in pieces) and M[2].sum() == 1
    assert M[3, pieces[-1] + 1] == 1  # end tokens paired although the token counts differ
    # refinement: "a cat" -> "a big cat": SOT, a, big (new), cat, EOT
    index, known = refine_mapper(tok, "a cat", "a big cat")
    assert index[:5].tolist()[:2] == [0, 1] and index[3] == 2 and index[4] == 3
    assert known[:5].tolist() == [1, 1, 0, 1, 1]


def test_unalignable_pair_and_bad_options(pipe, image):
    with pytest.raises(EditError, match=r"cannot align 'a purple circle' \(3 words\) with 'a blue circle on grass'"):
        pipe.edit(image, "a blue circle on grass", method="ptp", source="a purple circle", ptp_align="replace",
                  steps=2)
    with pytest.raises(EditError, match="ptp_self 2.0 is outside"):
        pipe.options("ptp", source="a cat", ptp_self=2.0)
    with pytest.raises(EditError, match="sampler 'lms'"):
        pipe.options("ptp", source="a cat", sampler="lms")
    with pytest.raises(EditError, match="changed word"):
        pipe.edit(image, "a cat", method="ptp", source="a cat", ptp_blend=True, steps=2)


def test_edit_end_to_end_with_local_blend(pipe, image, one_thread):
    res = pipe.edit(image, "a red dog", method="ptp", source="a red cat", ptp_blend=True, steps=STEPS,
                    ptp_align="refine")
    assert res.image.size == image.size
    assert res.unet_evals == STEPS + 4 * STEPS
