"""The official CIFAR-10 python-format archive: download, MD5, and its pickled batches.

``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1..5`` (training),
``test_batch`` and ``batches.meta`` (the class names), each a Python 2 pickle. The pickles are
loaded by an unpickler that only builds numpy arrays and plain containers, so a foreign archive
in this format cannot run code. Members are read from the archive in place
(:mod:`ddpm_cifar.data.tar_members`).
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import fileio
from ..runtime.errors import UserError
from .splits import IMAGE_SIZE, Split
from .tar_members import TAR_READ_ERRORS, member_parts, one_line, read_member

try:  # numpy >= 2 moved the pickle helper; old pickles still name numpy.core.multiarray
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

FORMAT_OFFICIAL = "cifar10-python"

_OFFICIAL_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META_BATCH = "batches.meta"
_OFFICIAL_MEMBERS = (*_TRAIN_BATCHES, _TEST_BATCH, _META_BATCH)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers.

    A pickle can run arbitrary code when loaded, and a user-supplied archive need not be the
    official one (data.md5 may be null), so only the globals a CIFAR batch needs are allowed.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes with protocol < 3 as codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _load_batch(data: bytes, label: str) -> dict[bytes, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise UserError(f"{label}: not a CIFAR-10 python batch: {one_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{label}: not a CIFAR-10 python batch (a {type(obj).__name__})")
    return obj


def _batch_arrays(batch: dict[bytes, Any], n_classes: int, label: str) -> Split:
    data = batch.get(b"data")
    labels = batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise UserError(f"{label}: b'data' is not a uint8 array of shape (N, 3072)")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{label}: b'labels' is not a list of integers") from exc
    if labels_arr.shape != (data.shape[0],):
        raise UserError(f"{label}: {labels_arr.size} labels for {data.shape[0]} images")
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() >= n_classes):
        raise UserError(f"{label}: labels outside 0..{n_classes - 1}")
    # Each row holds the red, then green, then blue 32x32 plane (CHW); the pipeline uses NHWC.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels_arr


def official_members(members: Sequence[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    """The official files among ``members``, by batch name; empty when the format is another."""
    found = {}
    for member in members:
        parts = member_parts(member)
        if len(parts) >= 2 and parts[-2] == _OFFICIAL_DIR and parts[-1] in _OFFICIAL_MEMBERS:
            found[parts[-1]] = member
    return found


def _read_raw(tar: tarfile.TarFile, found: dict[str, tarfile.TarInfo], label: str) -> dict[str, bytes]:
    missing = [name for name in _OFFICIAL_MEMBERS if name not in found]
    if missing:
        raise UserError(
            f"{label}: looks like the CIFAR-10 python archive but lacks "
            f"{', '.join(f'{_OFFICIAL_DIR}/{m}' for m in missing)}"
        )
    raw: dict[str, bytes] = {}
    # Read in archive order so a compressed stream is decompressed once, front to back.
    try:
        for name, member in sorted(found.items(), key=lambda kv: kv[1].offset_data):
            raw[name] = read_member(tar, member, f"{label}: {member.name}")
    except TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: cannot read the archive: {one_line(exc)}") from exc
    return raw


def read_official(tar: tarfile.TarFile, found: dict[str, tarfile.TarInfo], label: str
                  ) -> tuple[list[str], dict[str, Split]]:
    """Class names and the train/test splits of the archive whose official files are ``found``."""
    raw = _read_raw(tar, found, label)
    meta = _load_batch(raw[_META_BATCH], f"{label}:{_OFFICIAL_DIR}/{_META_BATCH}")
    names = meta.get(b"label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{label}: {_META_BATCH} has no b'label_names' list")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def arrays(batch_names: Sequence[str]) -> Split:
        parts = []
        for b in batch_names:
            where = f"{label}:{_OFFICIAL_DIR}/{b}"
            parts.append(_batch_arrays(_load_batch(raw[b], where), len(classes), where))
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    return classes, {"train": arrays(_TRAIN_BATCHES), "test": arrays([_TEST_BATCH])}


def cached_official_archive(cache_dir: Path, md5: str | None) -> Path:
    """``cache_dir/cifar-10-python.tar.gz``, downloaded unless a copy with the right MD5 is there."""
    archive = cache_dir / "cifar-10-python.tar.gz"
    if archive.is_file() and (md5 is None or fileio.file_digest(archive, "md5") == md5):
        return archive
    try:
        fileio.download(CIFAR10_URL, archive, md5=md5)
    except UserError as exc:
        reason = str(exc).replace("\n", " ")
        raise UserError(
            f"could not download the CIFAR-10 archive ({reason}); download "
            f"cifar-10-python.tar.gz elsewhere and set data.source in params.yaml to its local "
            "path (or to an image folder / .tar.gz of class sub-folders)"
        ) from exc
    return archive
