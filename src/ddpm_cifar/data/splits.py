"""The data set on disk: ``train.npz`` and ``test.npz``, as the fetch stage writes them.

Each file holds ``images`` (uint8, NHWC, 32x32 RGB) and ``labels`` (int64, one per image); a
``meta.json`` beside them says where the data came from (:mod:`ddpm_cifar.data.fetch`, which turns a
CIFAR-10 archive or an image folder into these files). Training and the reference statistics
read them with :func:`load_split`, which needs none of the readers of the sources.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import fileio
from ..runtime.loaders import Array, Source, load_json, load_npz

IMAGE_SIZE = 32

# One split: (images uint8 NHWC, labels int64).
Split = tuple[np.ndarray, np.ndarray]
SPLIT = Source("a CIFAR-10 split .npz", "restore it with `dvc checkout --force data/cifar10` (or rerun "
               "`dvc repro fetch`)", missing="run the fetch stage first (`dvc repro fetch`)")
SPLIT_ARRAYS = {"images": Array("uint8", ("N", IMAGE_SIZE, IMAGE_SIZE, 3)), "labels": Array("int", ("N",))}
# data/cifar10 is a cached output of the fetch stage: a checkout restores it as the last run left it.
META = Source("a data set description", "restore it with `dvc checkout --force data/cifar10` (or rerun "
              "`dvc repro`, whose fetch stage writes it again)")


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split to ``path`` atomically (a reader never sees half a file)."""
    # np.savez appends ".npz" to a *name* that lacks it, so hand it an open file instead.
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)


def load_split(data_dir: Path, split: str) -> Split:
    """Load ``data_dir/<split>.npz`` as (images uint8 NHWC, labels int64), checked."""
    arrays = load_npz(Path(data_dir) / f"{split}.npz", SPLIT_ARRAYS, SPLIT)
    return arrays["images"], arrays["labels"].astype(np.int64, copy=False)


def load_meta(folder: Path) -> dict | None:
    """The data set's provenance that the fetch stage writes beside the splits, if there."""
    meta = folder / "meta.json"
    return load_json(meta, META) if meta.is_file() else None
