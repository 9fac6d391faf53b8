"""Image folders, as a directory or a tar archive: layout, class labels, decoding.

An image folder is ``train/<class>/*.png|jpg|jpeg`` plus ``test/<class>/*``, or a single level
of ``<class>/`` sub-folders (then everything is training data), possibly inside wrapper folders
that every path shares. Classes are numbered in sorted order of their names; within a split the
images come sorted by class, then by file name. Every image must be 32x32; it is converted to
RGB. Hidden files and folders (``.name``) are skipped. In an archive, members are read in place
(:mod:`ddpm_cifar.data.tar_members`), links included, in archive order.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..runtime.errors import UserError
from .splits import IMAGE_SIZE, Split
from .tar_members import TAR_READ_ERRORS, Parts, member_parts, one_line, read_member

FORMAT_IMAGE_FOLDER = "image-folder"
LAYOUT_HINT = "train/<class>/<image> and test/<class>/<image>, or <class>/<image>"

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Plan:
    """Which file goes where: per split, the (path, label) pairs in output order."""

    classes: list[str]
    splits: dict[str, list[tuple[Parts, int]]]


def _is_image(parts: Parts) -> bool:
    # Hidden entries are skipped: e.g. macOS "._x.jpg" resource forks are not images.
    if any(p.startswith(".") for p in parts):
        return False
    return PurePosixPath(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES


def _plan_image_folder(paths: Sequence[Parts], label: str) -> _Plan:
    """Work out the layout from the image paths alone (relative, as component tuples)."""
    if not paths:
        raise UserError(f"{label}: no .png/.jpg/.jpeg images found; expected {LAYOUT_HINT}")
    # Drop wrapper folders that every path shares (e.g. an archive made with
    # `tar czf x.tgz mydata/`), but never the split folder or the class folder itself.
    skip = 0
    while (all(len(p) > skip + 2 for p in paths)
           and len({p[skip] for p in paths}) == 1
           and paths[0][skip] not in _SPLITS):
        skip += 1
    rel = [p[skip:] for p in paths]
    has_splits = any(r[0] in _SPLITS for r in rel)

    entries: dict[str, list[tuple[str, str, Parts]]] = {s: [] for s in _SPLITS}
    for full, r in zip(paths, rel, strict=True):
        if has_splits and len(r) == 3 and r[0] in _SPLITS:
            entries[r[0]].append((r[1], r[2], full))
        elif not has_splits and len(r) == 2:
            entries["train"].append((r[0], r[1], full))
        else:
            raise UserError(
                f"{label}: {'/'.join(full)} does not fit the image-folder layout ({LAYOUT_HINT})"
            )
    classes = sorted({cls for items in entries.values() for cls, _, _ in items})
    index = {cls: i for i, cls in enumerate(classes)}
    splits = {
        split: [(full, index[cls]) for cls, _, full in sorted(items)]
        for split, items in entries.items()
    }
    return _Plan(classes=classes, splits=splits)


def _decode_image(data: bytes | Path, name: str) -> np.ndarray:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as img:
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise UserError(
                    f"{name}: image is {img.size[0]}x{img.size[1]}, CIFAR-10 images are "
                    f"{IMAGE_SIZE}x{IMAGE_SIZE}; resize the data set first"
                )
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"{name}: cannot decode the image: {one_line(exc)}") from exc


def _empty_split(n: int) -> Split:
    return (np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            np.zeros((n,), dtype=np.int64))


def _decode_plan(plan: _Plan, order: Iterable[Parts], read: Callable[[Parts], bytes | Path],
                 name_of: Callable[[Parts], str]) -> dict[str, Split]:
    """Decode every planned image, visiting them in ``order`` (the cheapest read order)."""
    out = {split: _empty_split(len(items)) for split, items in plan.splits.items()}
    slot: dict[Parts, tuple[str, int]] = {}
    for split, items in plan.splits.items():
        for i, (path, label) in enumerate(items):
            slot[path] = (split, i)
            out[split][1][i] = label
    todo = [p for p in order if p in slot]
    for path in tqdm(todo, desc="decode images", unit="img", mininterval=1.0):
        split, i = slot[path]
        out[split][0][i] = _decode_image(read(path), name_of(path))
    return out


def read_image_folder_tar(tar: tarfile.TarFile, members: Sequence[tarfile.TarInfo], label: str
                          ) -> tuple[list[str], dict[str, Split]]:
    """Class names and train/test splits of the image folder held by the (checked) archive."""
    # Links are read too (tarfile resolves them inside the archive); directories never are.
    by_parts = {
        member_parts(m): m
        for m in members
        if not m.isdir() and member_parts(m) and _is_image(member_parts(m))
    }
    plan = _plan_image_folder(sorted(by_parts), label)

    def name_of(parts: Parts) -> str:
        return f"{label}:{'/'.join(parts)}"

    def read(parts: Parts) -> bytes:
        return read_member(tar, by_parts[parts], name_of(parts))

    # Archive order, so a gzip stream is read once front to back instead of seeking back.
    order = sorted(by_parts, key=lambda p: by_parts[p].offset_data)
    try:
        out = _decode_plan(plan, order, read, name_of)
    except TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: cannot read the archive: {one_line(exc)}") from exc
    return plan.classes, out


def read_image_folder_dir(root: Path) -> tuple[list[str], dict[str, Split]]:
    """Class names and train/test splits of the image folder at ``root`` (links followed)."""
    paths: list[Parts] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root).parts
        for fname in filenames:
            parts = (*rel, fname)
            if _is_image(parts):
                paths.append(parts)
    paths.sort()
    plan = _plan_image_folder(paths, str(root))
    out = _decode_plan(plan, paths, lambda p: root.joinpath(*p), lambda p: str(root.joinpath(*p)))
    return plan.classes, out
