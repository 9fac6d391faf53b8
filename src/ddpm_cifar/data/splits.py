"""The data set on disk: ``train.npz`` and ``test.npz``, as the fetch stage writes them.

Each file holds ``images`` (uint8, NHWC, 32x32 RGB) and ``labels`` (int64, one per image); a
``meta.json`` beside them says where the data came from (:mod:`ddpm_cifar.data.fetch`, which turns a
CIFAR-10 archive or an image folder into these files). Training and the reference statistics
read them with :func:`load_split`, which needs none of the readers of the sources.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..runtime import fileio
from ..runtime.errors import UserError
from ..runtime.loaders import Source, load_json

IMAGE_SIZE = 32

# One split: (images uint8 NHWC, labels int64).
Split = tuple[np.ndarray, np.ndarray]
# data/cifar10 is a cached output of the fetch stage: a checkout restores it as the last run left it.
META = Source("a data set description", "restore it with `dvc checkout --force data/cifar10` (or rerun "
              "`dvc repro`, whose fetch stage writes it again)")


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split to ``path`` atomically (a reader never sees half a file)."""
    # np.savez appends ".npz" to a *name* that lacks it, so hand it an open file instead.
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)


def load_split(data_dir: Path, split: str) -> Split:
    """Load ``data_dir/<split>.npz`` as (images uint8 NHWC, labels int64)."""
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise UserError(f"{path} not found; run the fetch stage first (`dvc repro fetch`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, zlib.error) as exc:
        raise UserError(f"{path} is unreadable ({exc}); rerun the fetch stage (`dvc repro fetch`)") \
            from exc
    expected = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise UserError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 "
                        f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3); rerun the fetch stage "
                        "(`dvc repro fetch`)")
    if labels.shape != (images.shape[0],):
        raise UserError(f"{path}: {labels.shape} labels for {images.shape[0]} images; "
                        "rerun the fetch stage (`dvc repro fetch`)")
    return images, labels.astype(np.int64, copy=False)


def load_meta(folder: Path) -> dict | None:
    """The data set's provenance that the fetch stage writes beside the splits, if there."""
    meta = folder / "meta.json"
    return load_json(meta, META) if meta.is_file() else None
