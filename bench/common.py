"""Shared helpers of the benchmark scripts: interleaved timing, process memory, SD v1.4 reference
weights, tables and JSON. Not a test module; nothing here asserts on speed."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024


# ---------------------------------------------------------------- timing

def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Run every callable `warmup` times (untimed), then `reps` rounds in which each callable runs once.

    The order inside a round rotates (A B C, B C A, C A B, ...), so slow drift of the machine's load
    and "who runs after whom" effects spread evenly over the candidates. Returns name -> seconds per rep.
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            tic = time.perf_counter()
            fns[name]()
            if log:
                log(f"  warm-up {w + 1}/{warmup} {name}: {time.perf_counter() - tic:.3f} s")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            tic = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - tic)
        if log:
            log(f"  rep {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
    return times


def median(xs) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios: each round's two numbers were taken moments apart."""
    return statistics.median(a / b for a, b in zip(num, den))


def summary(xs: list[float]) -> dict:
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


# ---------------------------------------------------------------- memory

def proc_status() -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process in MiB, from /proc/self/status."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    except OSError:
        import resource
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return out


# ---------------------------------------------------------------- environment

def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def env_info() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "loadavg_start": loadavg()}


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------- SD v1.4 reference UNet

def sd14_diffusers_unet(seed: int = 0):
    """diffusers' UNet2DConditionModel with SD v1.4's config (859.5M parameters), random weights.

    As in tests/test_full_size.py, the zero-initialised output convolutions get small random
    weights so the network's output is not trivially zero.
    """
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()
    with torch.no_grad():
        for p in (unet.conv_out.weight, *[m.proj_out.weight for m in unet.modules() if hasattr(m, "proj_out")]):
            p.normal_(0, 0.02)
    return unet


def save_sd14_unet_folder(folder: Path, seed: int = 0) -> Path:
    """Write ``folder/unet/{config.json, diffusion_pytorch_model.safetensors}`` (fp32, ~3.4 GB)."""
    import gc
    unet = sd14_diffusers_unet(seed)
    unet.save_pretrained(folder / "unet")
    del unet
    gc.collect()
    return folder


# ---------------------------------------------------------------- diffusers' LMS scheduler without scipy

class QuadShim:
    """Stand-in for scipy.integrate where scipy is absent. diffusers' LMSDiscreteScheduler only calls
    ``integrate.quad(f, a, b, epsrel=1e-4)[0]`` on a polynomial of degree <= 3; scipy's QUADPACK evaluates
    its 21-point Gauss-Kronrod rule, exact for such a polynomial, and returns at once. A 21-point
    Gauss-Legendre rule (numpy) is likewise exact, and independent of sampler/lms.py's 2-point rule."""

    @classmethod
    def quad(cls, f, a, b, epsrel=1.49e-8):
        import numpy as np
        x, w = np.polynomial.legendre.leggauss(21)
        a, b = float(a), float(b)
        mid, half = 0.5 * (a + b), 0.5 * (b - a)
        return half * float(np.dot(w, [float(f(mid + half * t)) for t in x])), 0.0


def diffusers_lms_module():
    """diffusers' LMS scheduler module (its top-level name is a dummy without scipy), with QuadShim in
    place of scipy.integrate where scipy is not installed."""
    from diffusers.schedulers import scheduling_lms_discrete as lms
    if not hasattr(lms, "integrate"):
        lms.integrate = QuadShim
    return lms


def diffusers_lms_scheduler(**kw):
    """The authors' scheduler: LMSDiscreteScheduler(0.00085, 0.012, "scaled_linear", 1000)."""
    return diffusers_lms_module().LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", num_train_timesteps=1000, **kw)
