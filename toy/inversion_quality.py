"""How well DDIM inversion reconstructs the benchmark's source images with a model (default: the toy).

    python -m toy.inversion_quality                        # 60 scenes of seed set a, guidance 1 and 7.5
    python -m toy.inversion_quality --n 30 --guidance 1 --seed-set b

For each source image: encode (posterior mean), invert with DDIM (sampler/inversion.py) for --steps
steps under the source caption at guidance g, denoise the inverted latent again with DDIM under the
same caption and guidance, decode, and compare with the source: PSNR (dB, on 8-bit pixels) and mean
absolute pixel error (0-255). The VAE alone (encode + decode) is the ceiling any inversion can reach
and is reported beside it. Inversion-based methods (DiffEdit as published, Prompt-to-Prompt,
Plug-and-Play, LEDITS++) start from this reconstruction, so its error is a floor under their C_non.
Every figure carries a 95% bootstrap interval over the scenes (evaluation/stats.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evaluation.stats import bootstrap_ci
from sampler import DDIMSampler
from sampler.inversion import ddim_invert
from toy.world import add_case_arguments, benchmark_cases, check_object_sizes, render

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, as the pipeline saves images."""
    return ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def reconstruct(pipe, src: np.ndarray, caption: str, guidance: float, steps: int) -> dict[str, np.ndarray]:
    """-> {"vae": encode+decode, "inversion": invert then regenerate} as uint8 images."""
    x = torch.from_numpy(src).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(pipe.device, pipe.dtype)
    z0 = pipe.encode_image(x)
    emb = pipe.encode_text(caption)  # [uncond, cond]
    sampler = DDIMSampler(pipe.scheduler_config)
    sampler.set_timesteps(steps, pipe.device)
    z = ddim_invert(pipe.unet, sampler, z0, emb[1:], emb[:1], guidance=guidance).noise
    for i, t in enumerate(sampler.timesteps):
        if guidance == 1.0:
            out = pipe.call_unet(pipe.unet, z, t, emb[1:])
        else:
            out = pipe.unet_cfg(pipe.unet, sampler, z, i, t, emb, guidance)
        z = sampler.step(out, i, z)
    return {"vae": to_uint8(pipe.decode(z0)), "inversion": to_uint8(pipe.decode(z))}


def measure(pipe, cases, guidances=(1.0, 7.5), steps: int = 50) -> dict:
    rows = []
    for case in cases:
        src = render(case.scene, pipe.size)[0]
        for g in guidances:
            rec = reconstruct(pipe, src, case.source_caption, g, steps)
            rows.append({"id": case.id, "guidance": g, **{
                f"{k}_{name}": f(src, img) for k, img in rec.items()
                for name, f in (("psnr", psnr), ("mae", lambda a, b: float(np.abs(a.astype(int) - b).mean())))}})
    summary = {}
    for g in guidances:
        sub = [r for r in rows if r["guidance"] == g]
        summary[str(g)] = {k: {"mean": float(np.mean([r[k] for r in sub])), "ci": bootstrap_ci([r[k] for r in sub])}
                           for k in ("inversion_psnr", "inversion_mae", "vae_psnr", "vae_mae")} | {"n": len(sub)}
    return {"summary": summary, "rows": rows, "steps": steps}


def table(res: dict) -> str:
    lines = ["| guidance | n | inversion PSNR (dB) | inversion MAE (0-255) | VAE alone PSNR | VAE alone MAE |",
             "|---|---|---|---|---|---|"]
    for g, s in res["summary"].items():
        cell = [f"{s[k]['mean']:.2f} [{s[k]['ci'][0]:.2f}, {s[k]['ci'][1]:.2f}]"
                for k in ("inversion_psnr", "inversion_mae", "vae_psnr", "vae_mae")]
        lines.append(f"| {g} | {s['n']} | " + " | ".join(cell) + " |")
    return "\n".join(lines) + f"\nDDIM {res['steps']} steps each way; [a, b]: 95% bootstrap interval over scenes"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"))
    p.add_argument("--n", type=int, default=60, help="source scenes: those of the first N benchmark cases")
    add_case_arguments(p)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "runs" / "inversion-toy"))
    a = p.parse_args(argv)
    if a.n < 1 or a.steps < 1:
        p.error(f"--n {a.n} and --steps {a.steps} must be at least 1")
    try:
        sizes = check_object_sizes(a.object_sizes)
    except ValueError as e:
        p.error(f"--object-sizes: {e}")
    from instdiffedit import InstDiffEdit
    pipe = InstDiffEdit.from_pretrained(a.model, None, device="cpu", dtype=torch.float32)
    cases = benchmark_cases(a.n, size=pipe.size, seed_set=a.seed_set, object_sizes=sizes)
    res = measure(pipe, cases, a.guidance, a.steps)
    res["seed_set"], res["object_sizes"] = a.seed_set, list(sizes)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    print(f"wrote {out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
