"""outset.publish: all-or-nothing output sets. A simulated kill at every file operation (from the k-th
operation on, every operation fails, as if the process had died there) leaves exactly the old set or
the new set readable in the folder, and the next run leaves no litter."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import outset

OPS = ("mkdir", "symlink", "replace", "rename", "unlink", "rmdir", "link", "open")


def view(out: Path) -> dict[str, bytes]:
    """What a reader sees: every top-level name that opens (following links), except the store."""
    seen = {}
    for name in os.listdir(out):
        p = out / name
        if name == outset.STORE or not os.path.exists(p):  # a dangling link reads as absent
            continue
        if os.path.isdir(p):
            for sub in sorted(os.listdir(p)):
                seen[f"{name}/{sub}"] = (p / sub).read_bytes()
        else:
            seen[name] = p.read_bytes()
    return seen


def litter(out: Path) -> list[str]:
    """Anything beyond the current set, its links and the user's own files."""
    store = out / outset.STORE
    extra = [e for e in os.listdir(store) if e not in (outset.CURRENT, os.readlink(store / outset.CURRENT))]
    extra += [e for e in os.listdir(out) if os.path.islink(out / e) and not os.path.exists(out / e)]
    return extra


OLD = {"edited.png": b"old edited", "mask.png": b"old mask", "attention.png": b"old attention",
       "sub/a.txt": b"old sub a"}
NEW = {"edited.png": b"new edited", "mask.png": b"new mask", "run.json": b"{}", "sub/b.txt": b"new sub b"}


def writers(files: dict[str, bytes]) -> dict:
    """Half the files as bytes, half through a writer function (as the CLI's PIL saves are)."""
    def writer(data):
        def write(path: Path):
            with open(path, "xb") as f:
                f.write(data)
        return write
    return {n: (d if i % 2 else writer(d)) for i, (n, d) in enumerate(files.items())}


class Killed(Exception):
    pass


def count_ops(monkeypatch, fail_from: int | None) -> list[int]:
    """Wrap the os calls outset makes (and builtins.open, the writers'); fail every call from `fail_from` on."""
    calls = [0]
    real_open = open

    def wrap(fn):
        def inner(*a, **k):
            calls[0] += 1
            if fail_from is not None and calls[0] >= fail_from:
                raise Killed(f"killed at operation {calls[0]}")
            return fn(*a, **k)
        return inner
    for name in OPS:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr("builtins.open", wrap(real_open))
    return calls


def start(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_bytes(b"the user's own file")
    outset.publish(out, writers(OLD))
    return out


def test_publish_replaces_the_set_and_keeps_other_files(tmp_path):
    out = start(tmp_path)
    assert view(out) == {**OLD, "notes.txt": b"the user's own file"}
    outset.publish(out, writers(NEW))
    assert view(out) == {**NEW, "notes.txt": b"the user's own file"}  # attention.png, sub/a.txt gone with the old set
    assert litter(out) == [] and len(os.listdir(out / outset.STORE)) == 2
    assert outset.current_names(out) == {"edited.png", "mask.png", "run.json", "sub"}


def test_kill_at_every_operation(tmp_path, monkeypatch):
    out = start(tmp_path)
    with monkeypatch.context() as m:
        total = count_ops(m, None)
        outset.publish(out, writers(NEW))
    n_ops = total[0]
    assert n_ops >= 15  # every mkdir, write, link, switch and removal is a separate point
    outcomes = {"old": 0, "new": 0}
    user = {"notes.txt": b"the user's own file"}
    for k in range(1, n_ops + 2):
        case = tmp_path / f"k{k}"
        out = start(case)
        with monkeypatch.context() as m:
            count_ops(m, k)
            try:
                outset.publish(out, writers(NEW))
            except Killed:
                pass
        seen = view(out)
        assert seen in ({**OLD, **user}, {**NEW, **user}), (k, sorted(seen))
        outcomes["old" if seen == {**OLD, **user} else "new"] += 1
        outset.publish(out, writers({"edited.png": b"third"}))  # the next run cleans whatever was left
        assert view(out) == {"edited.png": b"third", **user} and litter(out) == [], k
        shutil.rmtree(case)
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes  # the kill points span the switch


def test_kill_while_adopting_legacy_plain_files(tmp_path, monkeypatch):
    """Plain files from a run before the store existed are the old set, at every kill point."""
    def legacy_out(root: Path) -> Path:
        out = root / "out"
        out.mkdir(parents=True)
        for n in ("edited.png", "mask.png"):
            (out / n).write_bytes(OLD[n])
        return out
    with monkeypatch.context() as m:
        total = count_ops(m, None)
        outset.publish(legacy_out(tmp_path / "full"), writers(NEW), legacy=("edited.png", "mask.png", "run.json"))
    old = {n: OLD[n] for n in ("edited.png", "mask.png")}
    for k in range(1, total[0] + 2):
        out = legacy_out(tmp_path / f"k{k}")
        with monkeypatch.context() as m:
            count_ops(m, k)
            try:
                outset.publish(out, writers(NEW), legacy=("edited.png", "mask.png", "run.json"))
            except Killed:
                pass
        assert view(out) in (old, NEW), (k, view(out))
        outset.publish(out, writers(NEW), legacy=("edited.png", "mask.png", "run.json"))
        assert view(out) == NEW and litter(out) == []


def test_a_failing_writer_leaves_the_old_set_and_no_partial_folder(tmp_path):
    out = start(tmp_path)

    def disk_full(path):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        outset.publish(out, {"edited.png": b"x", "mask.png": disk_full})
    assert view(out) == {**OLD, "notes.txt": b"the user's own file"} and litter(out) == []


def test_refuses_foreign_entries(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "edited.png").write_bytes(b"a user's file, not ours")
    with pytest.raises(OSError, match="not an output"):
        outset.publish(out, {"edited.png": b"x"})
    assert (out / "edited.png").read_bytes() == b"a user's file, not ours"
