"""Seeded mutation fuzzing of the two readers of untrusted files: `load_image` and the checkpoint loader.

Each case is a valid file (an image in one of six formats, or a tiny SD folder) with a few random
byte-level mutations: flipped bytes, overwritten runs, a truncation, an inserted or deleted run. The
only exceptions allowed out of the reader are the project's own (EditError, WeightsError); anything
else is a "foreign" exception and a failure.

    python -m tests.fuzz --images 300 --checkpoints 300   # prints the figures the README quotes
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


def base_image(fmt: str, seed: int) -> bytes:
    """A small picture with an EXIF orientation where the format carries EXIF (exif_transpose runs)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), "RGB").resize((20, 14), Image.BILINEAR)
    if fmt in ("PNG", "TIFF") and seed % 2:
        im = im.convert("RGBA")
    if fmt == "GIF":
        im = im.convert("P", palette=Image.ADAPTIVE, colors=16)
    kwargs = {}
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = 1 + seed % 8  # orientation
        kwargs["exif"] = exif
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _exif_at(data: bytes) -> int | None:
    """Where the EXIF block's TIFF header starts (little- or big-endian), if the file has one."""
    found = [i for i in (data.find(b"II*\x00", 1), data.find(b"MM\x00*", 1)) if i > 0]
    return min(found) if found else None


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random mutations; a third of the cases aim some at the EXIF block, which exif_transpose parses
    after the image itself has decoded (uniform mutations reach it in about 1 case in 900)."""
    b = bytearray(data)
    exif = _exif_at(data) if rng.random() < 0.33 else None
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if exif is not None and kind < 0.5:  # a few bytes of the EXIF header and first entries
            for _ in range(rng.randint(1, 3)):
                b[min(exif + rng.randrange(48), len(b) - 1)] = rng.randrange(256)
        elif kind < 0.45 and b:      # flip a few bytes
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind < 0.6 and b:     # overwrite a run with an "interesting" value
            i = rng.randrange(len(b))
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
        elif kind < 0.75:          # truncate
            del b[rng.randrange(len(b) + 1):]
        elif kind < 0.9:           # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif b:                    # delete a run
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 16)]
    return bytes(b)


def _attempt(call, ours: type[Exception], counts: Counter, foreign: Counter, label: str) -> None:
    """Run one fuzz case: count it as loaded, refused (our own error type) or foreign (anything else)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        counts["loaded"] += 1
    except ours:
        counts["refused"] += 1
    except Exception as e:  # noqa: BLE001 -- counting what escapes is the point
        counts["foreign"] += 1
        foreign[f"{label} {type(e).__name__}: {str(e)[:70]}"] += 1


def fuzz_images(n: int, seed: int = 0, folder: Path | None = None) -> dict:
    """n mutated images through images.load_image: counts of loaded, refused and foreign outcomes."""
    from images import load_image
    from methods import EditError
    rng = random.Random(seed)
    bases = {f: [base_image(f, s) for s in range(4)] for f in FORMATS}
    counts, foreign = Counter(), Counter()
    tmp = Path(tempfile.mkdtemp(dir=folder))
    try:
        for i in range(n):
            fmt = FORMATS[i % len(FORMATS)]
            p = tmp / f"case{i}.{fmt.lower()}"
            p.write_bytes(mutate(rng.choice(bases[fmt]), rng))
            _attempt(lambda: load_image(p).tobytes(), EditError, counts, foreign, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cases": n, **counts, "foreign_kinds": dict(foreign)}


# ---------------------------------------------------------------- checkpoints

def tiny_folder(root: Path) -> Path:
    """A tiny SD folder (unet, vae, text_encoder, no tokenizer) from tests/tiny_sd.py's references."""
    from tests.tiny_sd import reference_models, save_sd_folder
    return save_sd_folder(root / "sd", *reference_models(in_channels=4, seed=0), None)


def _mutate_config(text: str, rng: random.Random) -> str:
    """A config with one value replaced by a value of a wrong type or range."""
    cfg = json.loads(text)
    key = rng.choice(sorted(cfg))
    cfg[key] = rng.choice([0, -1, "64", "x", None, [], {}, 1e308, -0.5, True, [1, "a"], 2 ** 70])
    return json.dumps(cfg if rng.random() > 0.05 else [cfg])


def fuzz_checkpoints(n: int, seed: int = 0, folder: Path | None = None) -> dict:
    """n mutated copies of a tiny SD folder through weights.load: one file per case is mutated (a
    safetensors file at the byte level, or a config.json / scheduler config with a wrong value)."""
    import torch

    from weights import WeightsError, load
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(dir=folder))
    counts, foreign = Counter(), Counter()
    try:
        good = tiny_folder(tmp / "good")
        targets = sorted(p.relative_to(good) for p in good.rglob("*") if p.suffix in (".safetensors", ".json"))
        originals = {t: (good / t).read_bytes() for t in targets}
        case = tmp / "case"
        shutil.copytree(good, case)
        for i in range(n):
            t = targets[i % len(targets)]
            if t.suffix == ".json":
                (case / t).write_text(_mutate_config(originals[t].decode(), rng))
            else:
                (case / t).write_bytes(_mutate_safetensors(originals[t], rng))
            _attempt(lambda: load(case, components=("unet", "vae", "text_encoder", "scheduler"), dtype=torch.float32),
                     WeightsError, counts, foreign, t)
            (case / t).write_bytes(originals[t])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cases": n, **counts, "foreign_kinds": dict(foreign)}


def _mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Half the cases mutate the JSON header (dtypes, shapes, offsets), half the bytes anywhere."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if rng.random() < 0.5:
        return mutate(data, rng)
    key = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["dtype", "dtype", "shape", "data_offsets"])
    if field == "dtype":
        header[key]["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL",
                                           "F8_E4M3", "F8_E5M2", "X9"])
    elif field == "shape":
        header[key]["shape"] = rng.choice([[], [0], [1] * 5, list(reversed(header[key]["shape"]))])
    else:
        a, b = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[b, a], [a, a], [a, b + 8], [a + 1, b + 1]])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--checkpoints", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    for name, fn, n in (("images", fuzz_images, a.images), ("checkpoints", fuzz_checkpoints, a.checkpoints)):
        tic = time.perf_counter()
        r = fn(n, a.seed)
        print(f"{name}: {json.dumps(r)}  ({time.perf_counter() - tic:.1f} s)")


if __name__ == "__main__":
    main()
