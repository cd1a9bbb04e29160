"""All-or-nothing output sets: a kill at any moment leaves --out holding either the previous complete set
of outputs or the new complete set, never a mix.

A single rename is the only atomic switch a POSIX file system offers, and it switches one directory
entry. So the outputs live behind one entry, in a hidden store inside --out:

    out/edited.png -> .instdiffedit/current/edited.png     (one relative symlink per output, made once)
    out/.instdiffedit/current -> v-<id>                     (the switch: replaced with one os.replace)
    out/.instdiffedit/v-<id>/edited.png, mask.png, ...      (one folder per complete set)

`publish` writes the new set into a fresh `v-<id>` folder, adds a top-level link for every name the new
set brings, then points `current` at the new folder with one `os.replace`. Readers who open
`out/edited.png` resolve through `current`, so they see one set or the other. A link whose target is
not in the current set dangles, which reads as "no such file": consistent with whichever set is
current. Whatever a kill leaves behind (an unfinished `v-<id>`, a temporary link, an old version,
dangling links) is removed by the next `publish` or `clean`. Only entries of the store and top-level
links into it are ever touched: the user's other files in --out are left alone.

Files are created with O_EXCL in the fresh folder, so no existing file (an input included) is ever
opened for writing. Names may contain "/" (per-image subfolders): the top-level link then points at
the first component.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

STORE = ".instdiffedit"   # the hidden store inside --out
CURRENT = "current"       # the store's switch: a symlink to the current version folder
Writer = Union[bytes, Callable[[Path], None]]  # the file's bytes, or a function that writes the file at a path


def _link_target(name: str) -> str:
    return os.path.join(STORE, CURRENT, name)


def _is_ours(link: Path, name: str) -> bool:
    return os.path.islink(link) and os.readlink(link) == _link_target(name)


def current_names(out: Path) -> set[str]:
    """Top-level names of the current output set (empty if none)."""
    cur = Path(out) / STORE / CURRENT
    return set(os.listdir(cur)) if os.path.isdir(cur) else set()


def clean(out: Path) -> None:
    """Remove what an interrupted run left: versions that are not current, temporary links, and top-level
    links into the store whose target is not in the current set."""
    out, store = Path(out), Path(out) / STORE
    if not os.path.isdir(store) or os.path.islink(store):
        return
    keep = os.readlink(store / CURRENT) if os.path.islink(store / CURRENT) else None
    for entry in os.listdir(store):
        p = store / entry
        if entry == CURRENT or entry == keep:
            continue
        if entry.startswith("v-") and os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif entry.startswith(".tmp-"):
            os.unlink(p)
    names = current_names(out)
    for entry in os.listdir(out):
        if entry != STORE and _is_ours(out / entry, entry) and entry not in names:
            os.unlink(out / entry)


def _write(path: Path, data: Writer) -> None:
    os.makedirs(path.parent, exist_ok=True)
    if isinstance(data, (bytes, bytearray)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        data(path)
    if not os.path.isfile(path):
        raise OSError(f"{path}: the writer made no file")


def _replace_with_link(path: Path, target: str, store: Path) -> None:
    """Make `path` a symlink to `target` in one step (a temporary link renamed over it)."""
    tmp = store / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _adopt_legacy(out: Path, store: Path, legacy: Iterable[str]) -> None:
    """Plain output files from before the store existed become the current set first (hard links, or
    copies), then each is replaced by its link: every step shows the same old set."""
    plain = [n for n in legacy if os.path.isfile(out / n) and not os.path.islink(out / n)]
    if not plain or os.path.lexists(store / CURRENT):
        return
    v = store / f"v-{time.time_ns()}-{os.getpid()}-old"
    os.mkdir(v)
    for n in plain:
        try:
            os.link(out / n, v / n)
        except OSError:
            shutil.copy2(out / n, v / n)
    _replace_with_link(store / CURRENT, v.name, store)
    for n in plain:
        _replace_with_link(out / n, _link_target(n), store)


def publish(out: Path, files: Mapping[str, Writer], legacy: Iterable[str] = ()) -> None:
    """Replace the output set in `out` by `files` ({name: bytes or writer(path)}), all or nothing.

    `legacy`: names whose plain files (written by an older version, without the store) belong to the
    previous set. Any other top-level entry of a new name that is not our link is refused: the caller
    decides about overwriting before calling."""
    out = Path(out)
    store = out / STORE
    os.makedirs(out, exist_ok=True)
    if os.path.islink(store) or (os.path.lexists(store) and not os.path.isdir(store)):
        raise OSError(f"{store}: exists and is not the output store folder")
    os.makedirs(store, exist_ok=True)
    clean(out)
    _adopt_legacy(out, store, legacy)
    tops = sorted({n.split("/")[0] for n in files})
    for top in tops:
        link = out / top
        if os.path.lexists(link) and not _is_ours(link, top) and top not in legacy:
            raise OSError(f"{link}: exists and is not an output of this program")
    v = store / f"v-{time.time_ns()}-{os.getpid()}"
    os.mkdir(v)
    try:
        for name, data in files.items():
            _write(v / name, data)
        for top in tops:  # new names' links dangle (= absent) until the switch below
            if not _is_ours(out / top, top):
                _replace_with_link(out / top, _link_target(top), store)
        _replace_with_link(store / CURRENT, v.name, store)  # the one atomic switch
    except BaseException:
        shutil.rmtree(v, ignore_errors=True)  # best effort; the next run's clean() removes what is left
        raise
    clean(out)
