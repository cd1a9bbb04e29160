"""InstDiffEdit (Zou et al., AAAI 2024): the instant mask from the UNet's own cross-attention.

Stage 1 runs SD from the noised source (strength r) with the edit text as the only prompt, n rounds
at once. At every step the cross-attention maps give an instant mask (Eq. 6-9, mask/instant.py) that
guides the denoising (Eq. 4-5). The inpainting finish (pipe.finish) then generates the edit.
Options used: strength, threshold, rounds, steps, guidance, sampler, seed, attention, attention_res,
gamma1, gamma2, inpaint (False: decode round 0's Eq. 5 result instead of inpainting); its own:
exact_authors.
"""
from __future__ import annotations

import torch

from mask.instant import instant_mask
from mask.store import AttentionStore

from .base import Edited, Job, MaskOutput, Method, check_finite, guidance_cause, register, report_step
from .options import EditError, EditOptions, Option


@torch.no_grad()
def stage1(pipe, x0: torch.Tensor, edit: str, o: EditOptions, gen: torch.Generator,
           progress: bool = False, emb: torch.Tensor | None = None, callback=None) -> MaskOutput:
    """Instant mask and mask-guided denoising (Eq. 4-9), all n rounds in one batch.
    `callback(step, t, StepState)` runs after every step (callback_on_step_end)."""
    words = pipe.tokenizer.words(edit)  # [(word, [token positions])], positions count SOT as 0
    emb = pipe.encode_text(edit) if emb is None else emb
    sampler, start, z0, eps, x = pipe.noised(x0, o, gen, o.rounds)
    h, w = z0.shape[-2:]
    grids = pipe.cross_attention_grids(h)
    if o.attention_res not in grids:
        raise EditError(f"attention_res {o.attention_res}: this UNet has cross-attention only at the "
                        f"{', '.join(f'{g}x{g}' for g in grids)} grids of its {h}x{w} latent")
    store = AttentionStore((h, w), rounds=o.rounds, cfg=True, mode=o.attention, factor=h // o.attention_res,
                           tokens=emb.shape[1], device=x.device)  # buffers now: a compiled UNet sees them at step 1
    positions = [pos for _, pos in words]
    names = ["<sot>"] + [wd for wd, _ in words] + ["<eot>"]
    P = None  # Eq. 8's positions: decided at the first step, reused after

    def step(i):
        """One mask-guided denoising step, in place on x; i is an int, or a device tensor when replayed
        from a CUDA graph (pipe.run_steps), so nothing here reads a tensor's value on the host."""
        nonlocal P
        pred = pipe.unet_cfg(pipe.unet, sampler, x, i, sampler.timestep(i), emb, o.guidance, recorder=store)
        store.end_step()
        x_next = sampler.step(pred, i, x)
        # Eq. 6-9 on the maps so far; P (Eq. 8) is fixed at the first step and reused
        res = instant_mask(store.maps(), positions, (h, w), P=P, gamma1=o.gamma1, gamma2=o.gamma2,
                           threshold=o.threshold, exact_authors=o.exact_authors)
        P = res.P
        # Eq. 5: outside the mask, the latents follow the source image noised to this step
        y = sampler.add_noise_at(z0, eps, i)
        x.copy_(y + res.mask.to(x.dtype) * (x_next - y))
        if callback is not None:  # eager steps only (run_steps is told so): i is an int here
            report_step(callback, "mask", i - start, sampler.timesteps[i], x, res.mask, res.soft, res.word_maps, names)
        return res

    res = pipe.run_steps(step, sampler, pipe.progress(range(start, len(sampler.timesteps)), progress,
                                                     "mask + guided denoising"), pipe.unet,
                         eager=callback is not None)
    check_finite(x, "stage 1 (mask-guided denoising)", guidance_cause(o.guidance))
    return MaskOutput(res.mask, res.soft, res.P, names, res.word_maps, x)


@register
class InstDiffEdit(Method):
    name = "instdiffedit"
    help = "the instant attention mask + inpainting (the paper's method)"
    options = (Option("exact_authors", bool, False, "also reproduce the authors' uint8 rounding in the mask "
                      "(bit for bit)"),)

    def unet_batch(self, o: EditOptions) -> int:
        return 2 * o.rounds

    def mask(self, pipe, job: Job) -> MaskOutput:
        return stage1(pipe, job.x0, job.text, job.o, job.gen, job.progress, job.emb, job.callback)

    def edit(self, pipe, job: Job) -> Edited:
        if job.mask is not None or job.o.inpaint:
            return super().edit(pipe, job)
        st1 = self.mask(pipe, job)  # --no-inpaint: the Eq. 5 result of round 0 is the edit
        return Edited(pipe.decode(st1.latents[:1])[0], st1)
