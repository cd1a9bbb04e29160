"""Edit time on the CPU in fp32, fp16 and bf16, on the bundled toy model (the figure behind the fp16
warning of instdiffedit.check_precision). One thread; repetitions interleaved, the order rotating every
round; medians and ratios to fp32 from the same run.

    python bench/bench_precision.py [--reps 3] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    import warnings

    from instdiffedit import InstDiffEdit
    from weights.sources import assets_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fp16 warning is what this measures
        pipes = {n: InstDiffEdit.from_pretrained("toy", device="cpu", dtype=d)
                 for n, d in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]}
    img = assets_dir() / "examples" / "scene.png"
    names = list(pipes)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.reps):
        for n in names[r % 3:] + names[:r % 3]:
            tic = time.perf_counter()
            pipes[n].edit(img, "a blue circle", steps=args.steps)
            times[n].append(time.perf_counter() - tic)
    med = {n: statistics.median(v) for n, v in times.items()}
    for n in names:
        print(f"{n}: median {med[n]:.2f} s per edit ({args.steps} steps), {med[n] / med['fp32']:.2f}x fp32")


if __name__ == "__main__":
    main()
