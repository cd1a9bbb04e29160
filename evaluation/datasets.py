"""Parser for the authors' dataset list files (Editing-Mask, ImageNet, Imagen).

Formats (fields separated by exactly ``" <> "``):

* 4 fields, Imagen style: ``id <> caption <> source phrase <> edit phrase``.
  ``image_file = f"{caption}_2.jpg"`` (the caption verbatim, final full stop included),
  ``source_text`` = the source phrase, ``edit_text`` = the edit phrase verbatim (e.g.
  ``a raccoon``, ``go skateboarding``; it is the prompt, see method-notes). ``id`` is the
  first field (``"1"`` .. ``"360"``), the caption is kept in ``EditItem.caption``.
* 3 fields, ImageNet style: ``ILSVRC2012_val_XXXXXXXX.JPEG <> source class <> target class``.
  ``image_file`` = the first field, ``id`` = its stem (``ILSVRC2012_val_XXXXXXXX``),
  ``source_text = f"a {source class}"``, ``edit_text = f"a {target class}"`` (always "a",
  also before vowels, as the authors do).

What the shipped files look like (checked): no blank lines, no stray spaces around fields,
no duplicate ids; ``Editing-Mask_list.txt`` has CRLF line ends and mixes both formats (lines
1-100 Imagen style, identical to lines of ``Imagen_list.txt``; lines 101-200 ImageNet style,
identical to lines of ``ImageNet_list.txt``); the last line of each file has no newline.

Parsing rules: line ends (LF / CRLF) and surrounding whitespace are stripped; blank lines and
lines starting with ``#`` are skipped (``line_no`` is still the 1-based physical line); each
field is stripped and must be non-empty; a 3-field line's first field must be an image file
name (``.jpeg/.jpg/.png``); anything else, and duplicate ids within one file, raise
``ValueError("<path>:<line>: ...")``.

Human masks (Editing-Mask only; their layout is not published with the lists, so this is
our convention): ``mask_file = f"{image stem}.png"`` relative to a mask folder.
:func:`find_mask` also accepts ``<stem>_mask.png``, ``<id>.png``, ``<id>_mask.png`` and
``.jpg``/``.jpeg`` variants, directly in the folder or one sub-folder down. Masks are read as
grey and thresholded at > 127. Items of the ImageNet and Imagen lists get ``mask_file=None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = [
    "DATASET_LISTS",
    "EditItem",
    "find_image",
    "find_mask",
    "load_list",
    "parse_list",
    "parse_lines",
    "safe_id",
]

SEP = " <> "
IMAGE_EXTS = (".jpeg", ".jpg", ".png")

#: dataset name -> the authors' list file name (in their repository's dataset_txt/)
DATASET_LISTS = {
    "editing-mask": "Editing-Mask_list.txt",
    "imagenet": "ImageNet_list.txt",
    "imagen": "Imagen_list.txt",
}


@dataclass(frozen=True)
class EditItem:
    """One edit of a dataset list.

    ``image_file`` and ``mask_file`` are names relative to an image / mask folder;
    ``line_no`` is the 1-based line in ``list_file``."""

    id: str
    image_file: str
    source_text: str
    edit_text: str
    mask_file: str | None
    line_no: int
    caption: str | None = None  # Imagen-style lines: the generation prompt of the image
    list_file: str | None = None

    @property
    def safe_id(self) -> str:
        return safe_id(self.id)


def safe_id(item_id: str) -> str:
    """Folder-safe version of an id: characters outside ``[A-Za-z0-9._-]`` become ``_``.

    A leading dot is replaced too (no hidden / ``..`` folders)."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", str(item_id))
    if not s or s.startswith("."):
        s = "_" + s
    return s


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and "/" not in name and "\\" not in name


def parse_lines(
    lines: Iterable[str], source: str = "<lines>", with_masks: bool = False
) -> list[EditItem]:
    """Parse list lines (see module docstring); ``source`` names the file in errors."""
    items: list[EditItem] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(SEP)]
        where = f"{source}:{line_no}"
        if len(fields) not in (3, 4):
            raise ValueError(
                f"{where}: expected 3 or 4 fields separated by {SEP!r}, got {len(fields)}: {line[:120]!r}"
            )
        if any(not f for f in fields):
            raise ValueError(f"{where}: empty field in {line[:120]!r}")
        if any("<>" in f for f in fields):
            raise ValueError(f"{where}: malformed separator (expected {SEP!r}) in {line[:120]!r}")
        if len(fields) == 4:
            item_id, caption, src, edit = fields
            image_file = f"{caption}_2.jpg"
            if "/" in caption or "\\" in caption:
                raise ValueError(f"{where}: caption contains a path separator: {caption[:120]!r}")
            source_text, edit_text = src, edit
        else:
            image_file, src_class, tgt_class = fields
            if not _is_image_name(image_file):
                raise ValueError(
                    f"{where}: first field of a 3-field line must be an image file name "
                    f"({'/'.join(IMAGE_EXTS)}), got {image_file!r}"
                )
            item_id = Path(image_file).stem
            caption = None
            source_text, edit_text = f"a {src_class}", f"a {tgt_class}"
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r} (first on line {seen[item_id]})")
        seen[item_id] = line_no
        mask_file = f"{Path(image_file).stem}.png" if with_masks else None
        items.append(
            EditItem(
                id=item_id,
                image_file=image_file,
                source_text=source_text,
                edit_text=edit_text,
                mask_file=mask_file,
                line_no=line_no,
                caption=caption,
                list_file=source,
            )
        )
    return items


def parse_list(path: str | Path, with_masks: bool | None = None) -> list[EditItem]:
    """Parse one list file. ``with_masks=None`` means: True when the file name contains
    ``Editing-Mask`` (the only list with human masks)."""
    path = Path(path)
    if with_masks is None:
        with_masks = "editing-mask" in path.name.lower()
    text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    return parse_lines(text.splitlines(), source=str(path), with_masks=with_masks)


def load_list(name: str, lists_dir: str | Path) -> list[EditItem]:
    """Parse a dataset by name (``editing-mask``, ``imagenet``, ``imagen``) from ``lists_dir``, a
    folder holding the authors' list files (their repository's ``dataset_txt/``; not shipped here)."""
    key = name.lower().replace("_", "-")
    if key not in DATASET_LISTS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASET_LISTS)}")
    return parse_list(Path(lists_dir) / DATASET_LISTS[key])


def _find(dirpath: Path, names: list[str]) -> Path | None:
    for name in names:
        p = dirpath / name
        if p.is_file():
            return p
    try:
        subdirs = sorted(d for d in dirpath.iterdir() if d.is_dir())
    except OSError:
        return None
    for sub in subdirs:
        for name in names:
            p = sub / name
            if p.is_file():
                return p
    return None


def _with_exts(stem: str, first: str | None = None) -> list[str]:
    exts = [".png", ".jpg", ".jpeg", ".JPEG", ".JPG", ".PNG"]
    names = [first] if first else []
    names += [stem + e for e in exts if stem + e != first]
    return names


def find_image(item: EditItem, image_dir: str | Path) -> Path | None:
    """Path of the item's input image, or ``None`` when it is not there (runners skip it).

    Looks for ``image_file`` in ``image_dir`` and then one sub-folder down (e.g.
    ``Imagen/`` and ``ImageNet/`` next to each other, or ImageNet's per-synset folders),
    also accepting the same stem with another image extension."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        return None
    return _find(image_dir, _with_exts(Path(item.image_file).stem, item.image_file))


def find_mask(item: EditItem, mask_dir: str | Path | None) -> Path | None:
    """Path of the item's human mask, or ``None`` (no mask for this item / not found)."""
    if mask_dir is None or item.mask_file is None:
        return None
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        return None
    stem = Path(item.image_file).stem
    names: list[str] = []
    for base in (stem, stem + "_mask", item.id, item.id + "_mask"):
        for n in _with_exts(base, item.mask_file if base == stem else None):
            if n not in names:
                names.append(n)
    return _find(mask_dir, names)
