"""Fetch CIFAR-10 (or a CIFAR-sized image folder) into two ``.npz`` files the later stages read.

Accepted sources:

* ``"official"``: the official ``cifar-10-python.tar.gz``, downloaded into a cache folder and
  checked against its published MD5.
* a path to a ``.tar.gz`` / ``.tgz`` / ``.tar``: either the official python-format archive
  (a copy made elsewhere) or a tarball of an image folder; the format is told from the content.
* a path to a directory: an image folder.

An image folder is ``train/<class>/*.png|jpg|jpeg`` plus ``test/<class>/*``, or a single level
of ``<class>/`` sub-folders (then everything is training data). Every image must be 32x32.

Output: ``train.npz`` and ``test.npz`` (``images`` uint8 NHWC, ``labels`` int64) and
``meta.json`` describing where the data came from.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import fileio
from .errors import UserError

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
FORMAT_IMAGE_FOLDER = "image-folder"

IMAGE_SIZE = 32
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_SPLITS = ("train", "test")
_LAYOUT_HINT = "train/<class>/<image> and test/<class>/<image>, or <class>/<image>"

_OFFICIAL_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META_BATCH = "batches.meta"
_OFFICIAL_MEMBERS = (*_TRAIN_BATCHES, _TEST_BATCH, _META_BATCH)

# Raised by the extraction filters (Python 3.12, backported to 3.11.4); absent before that.
_FilterError: type[Exception] = getattr(
    tarfile, "FilterError", type("_NoFilterError", (Exception,), {})
)

# One split: (images uint8 NHWC, labels int64).
Split = tuple[np.ndarray, np.ndarray]
# A file's path inside an image folder or archive, as components (root-relative).
_Key = tuple[str, ...]

# Errors that a truncated or corrupt (compressed) tar raises while being read.
_TAR_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


# --------------------------------------------------------------------------------------------
# Tar safety
# --------------------------------------------------------------------------------------------


def _walk_inside(parts: Iterable[str], links: set[_Key]) -> _Key | None:
    """Resolve ``parts`` lexically from the archive root.

    Returns the normalised path, or None when it climbs above the root or continues *below*
    a link member: where such a path lands on disk depends on the link's target, which a
    lexical check cannot follow (``b -> .`` then ``b/../x`` escapes although it looks inside).
    """
    stack: list[str] = []
    for comp in parts:
        if comp in ("", "."):
            continue
        if stack and tuple(stack) in links:
            return None
        if comp == "..":
            if not stack:
                return None
            stack.pop()
        else:
            stack.append(comp)
    return tuple(stack)


def _member_problem(member: tarfile.TarInfo, links: set[_Key]) -> str | None:
    """Why extracting ``member`` could write outside the target folder, or None if it is safe."""
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return "device, fifo or other special file"
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "path contains '..'"
    where = _walk_inside(parts, links)
    if where is None:
        return "path goes through a link inside the archive"
    if not where and not member.isdir():
        return "empty name"
    if member.issym():
        if member.linkname.startswith("/"):
            return f"symlink to absolute path {member.linkname!r}"
        # A symlink target is relative to the folder that holds the link.
        if _walk_inside([*where[:-1], *member.linkname.split("/")], links) is None:
            return f"symlink target {member.linkname!r} leaves the archive or goes through a link"
    if member.islnk():
        if member.linkname.startswith("/"):
            return f"hard link to absolute path {member.linkname!r}"
        # A hard link target is relative to the archive root.
        if _walk_inside(member.linkname.split("/"), links) is None:
            return f"hard link target {member.linkname!r} leaves the archive or goes through a link"
    return None


def _link_members(members: Sequence[tarfile.TarInfo]) -> set[_Key]:
    return {
        tuple(p for p in m.name.split("/") if p not in ("", "."))
        for m in members
        if m.issym() or m.islnk()
    }


def _check_members(members: Sequence[tarfile.TarInfo], label: str) -> None:
    """Raise :class:`UserError` for the first member that is unsafe to extract or read."""
    links = _link_members(members)
    for member in members:
        problem = _member_problem(member, links)
        if problem is not None:
            raise UserError(f"{label}: refusing unsafe archive member {member.name!r}: {problem}")


def _tar_label(tar: tarfile.TarFile) -> str:
    return str(tar.name) if tar.name else "tar archive"


def safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract every member of ``tar`` into ``dest``, refusing archives that could escape it.

    All members are checked before anything is written, so a rejected archive leaves ``dest``
    untouched. Rejected: absolute names, ``..``, paths through a link member, symlinks and hard
    links whose target lies outside ``dest``, and device/fifo members. Links already on disk
    in ``dest`` are followed by the check too. Where Python offers it (3.12, 3.11.4+), the
    ``data`` extraction filter is applied as well, as a second line of defence.
    """
    label = _tar_label(tar)
    try:
        members = tar.getmembers()
    except _TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: cannot read the archive: {exc}") from exc
    _check_members(members, label)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def inside(path: Path) -> bool:
        # resolve() follows links that already exist under dest, which the lexical check
        # above cannot see.
        return path.resolve().is_relative_to(root)

    for member in members:
        target = root / member.name
        ok = inside(target)
        if ok and member.issym():
            ok = inside(target.parent / member.linkname)
        if ok and member.islnk():
            ok = inside(root / member.linkname)
        if not ok:
            raise UserError(
                f"{label}: refusing unsafe archive member {member.name!r}: "
                "it would land outside the target folder"
            )

    try:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(root, members=members)
    except _FilterError as exc:
        raise UserError(f"{label}: refusing unsafe archive member: {exc}") from exc
    except _TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: cannot extract the archive: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Official python format
# --------------------------------------------------------------------------------------------


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
        raise UserError(f"{label}: not a CIFAR-10 python batch: {exc}") from exc
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


def _official_key(member: tarfile.TarInfo) -> str | None:
    """The batch name if ``member`` is one of the official files, else None."""
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if len(parts) >= 2 and parts[-2] == _OFFICIAL_DIR and parts[-1] in _OFFICIAL_MEMBERS:
        return parts[-1]
    return None


def _read_official(tar: tarfile.TarFile, found: dict[str, tarfile.TarInfo], label: str
                   ) -> tuple[list[str], dict[str, Split]]:
    missing = [name for name in _OFFICIAL_MEMBERS if name not in found]
    if missing:
        raise UserError(
            f"{label}: looks like the CIFAR-10 python archive but lacks "
            f"{', '.join(f'{_OFFICIAL_DIR}/{m}' for m in missing)}"
        )
    raw: dict[str, bytes] = {}
    # Read in archive order so a compressed stream is decompressed once, front to back.
    for name, member in sorted(found.items(), key=lambda kv: kv[1].offset_data):
        fh = tar.extractfile(member)
        if fh is None:
            raise UserError(f"{label}: {member.name} is not a regular file")
        with fh:
            raw[name] = fh.read()

    meta = _load_batch(raw[_META_BATCH], f"{label}:{_OFFICIAL_DIR}/{_META_BATCH}")
    names = meta.get(b"label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{label}: {_META_BATCH} has no b'label_names' list")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def arrays(batch_names: Sequence[str]) -> Split:
        parts = [
            _batch_arrays(_load_batch(raw[b], f"{label}:{_OFFICIAL_DIR}/{b}"), len(classes),
                          f"{label}:{_OFFICIAL_DIR}/{b}")
            for b in batch_names
        ]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    return classes, {"train": arrays(_TRAIN_BATCHES), "test": arrays([_TEST_BATCH])}


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Which file goes where: per split, the (path, label) pairs in output order."""

    classes: list[str]
    splits: dict[str, list[tuple[_Key, int]]]


def _is_image(parts: _Key) -> bool:
    # Hidden entries are skipped: e.g. macOS "._x.jpg" resource forks are not images.
    if any(p.startswith(".") for p in parts):
        return False
    return PurePosixPath(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES


def _plan_image_folder(paths: Sequence[_Key], label: str) -> _Plan:
    """Work out the layout from the image paths alone (relative, as component tuples)."""
    if not paths:
        raise UserError(f"{label}: no .png/.jpg/.jpeg images found; expected {_LAYOUT_HINT}")
    # Drop wrapper folders that every path shares (e.g. an archive made with
    # `tar czf x.tgz mydata/`), but never the split folder or the class folder itself.
    skip = 0
    while (all(len(p) > skip + 2 for p in paths)
           and len({p[skip] for p in paths}) == 1
           and paths[0][skip] not in _SPLITS):
        skip += 1
    rel = [p[skip:] for p in paths]
    has_splits = any(r[0] in _SPLITS for r in rel)

    entries: dict[str, list[tuple[str, str, _Key]]] = {s: [] for s in _SPLITS}
    for full, r in zip(paths, rel, strict=True):
        if has_splits and len(r) == 3 and r[0] in _SPLITS:
            entries[r[0]].append((r[1], r[2], full))
        elif not has_splits and len(r) == 2:
            entries["train"].append((r[0], r[1], full))
        else:
            raise UserError(
                f"{label}: {'/'.join(full)} does not fit the image-folder layout ({_LAYOUT_HINT})"
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
        raise UserError(f"{name}: cannot decode the image: {exc}") from exc


def _empty_split(n: int) -> Split:
    return (np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            np.zeros((n,), dtype=np.int64))


def _decode_plan(plan: _Plan, order: Iterable[_Key], read: Callable[[_Key], bytes | Path],
                 name_of: Callable[[_Key], str]) -> dict[str, Split]:
    """Decode every planned image, visiting them in ``order`` (the cheapest read order)."""
    out = {split: _empty_split(len(items)) for split, items in plan.splits.items()}
    slot: dict[_Key, tuple[str, int]] = {}
    for split, items in plan.splits.items():
        for i, (path, label) in enumerate(items):
            slot[path] = (split, i)
            out[split][1][i] = label
    todo = [p for p in order if p in slot]
    for path in tqdm(todo, desc="decode images", unit="img", mininterval=1.0):
        split, i = slot[path]
        out[split][0][i] = _decode_image(read(path), name_of(path))
    return out


def _member_parts(member: tarfile.TarInfo) -> _Key:
    return tuple(p for p in member.name.split("/") if p not in ("", "."))


def _read_image_folder_tar(tar: tarfile.TarFile, members: Sequence[tarfile.TarInfo], label: str
                           ) -> tuple[list[str], dict[str, Split]]:
    # Links are read too (tarfile resolves them inside the archive); directories never are.
    by_parts = {
        _member_parts(m): m
        for m in members
        if not m.isdir() and _member_parts(m) and _is_image(_member_parts(m))
    }
    plan = _plan_image_folder(sorted(by_parts), label)

    def read(parts: _Key) -> bytes:
        fh = tar.extractfile(by_parts[parts])
        if fh is None:
            raise UserError(f"{label}:{'/'.join(parts)} is not a regular file")
        with fh:
            return fh.read()

    # Archive order, so a gzip stream is read once front to back instead of seeking back.
    order = sorted(by_parts, key=lambda p: by_parts[p].offset_data)
    try:
        out = _decode_plan(plan, order, read, lambda p: f"{label}:{'/'.join(p)}")
    except _TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: cannot read the archive: {exc}") from exc
    return plan.classes, out


def _read_image_folder_dir(root: Path) -> tuple[list[str], dict[str, Split]]:
    paths: list[_Key] = []
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


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _read_tarball(path: Path, md5: str | None, archive_md5: str
                  ) -> tuple[str, list[str], dict[str, Split]]:
    label = str(path)
    try:
        tar = tarfile.open(path, "r:*")
    except _TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: not a readable .tar/.tar.gz archive: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except _TAR_READ_ERRORS as exc:
            raise UserError(f"{label}: cannot read the archive: {exc}") from exc
        # Members are read straight from the archive, never extracted, but the same rules
        # apply so an archive is accepted or refused the same way however it is consumed.
        _check_members(members, label)
        official = {key: m for m in members if (key := _official_key(m)) is not None}
        if official:
            if md5 is not None and archive_md5 != md5:
                raise UserError(
                    f"{label} is not the official CIFAR-10 archive: its MD5 is {archive_md5}, "
                    f"expected {md5}; set data.md5 to null in params.yaml to "
                    "accept it anyway"
                )
            classes, splits = _read_official(tar, official, label)
            return FORMAT_OFFICIAL, classes, splits
        classes, splits = _read_image_folder_tar(tar, members, label)
        return FORMAT_IMAGE_FOLDER, classes, splits


def _fetch_official_archive(cache_dir: Path, md5: str | None) -> Path:
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


def _save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # np.savez appends ".npz" to a *name* that lacks it, so hand it an open file instead.
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)


def fetch_cifar10(source: str, out_dir: Path, *, cache_dir: Path,
                  md5: str | None = CIFAR10_MD5) -> dict[str, Any]:
    """Turn ``source`` into ``out_dir/{train,test}.npz`` and ``out_dir/meta.json``.

    ``md5`` applies to the official python-format archive only (downloaded or local); None
    accepts any archive in that format. Image folders are never checked against it.
    Returns the dict written to ``meta.json``.
    """
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir)
    if md5 is not None:
        md5 = md5.strip().lower()  # hashes copied from elsewhere may be upper case
    archive_md5: str | None
    if source == "official":
        path = _fetch_official_archive(cache_dir, md5)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(
                f"data source {source!r} does not exist; set data.source in params.yaml to "
                "'official', a .tar.gz archive, or an image folder"
            )

    if path.is_dir():
        fmt, archive_md5 = FORMAT_IMAGE_FOLDER, None
        classes, splits = _read_image_folder_dir(path)
    else:
        archive_md5 = fileio.file_digest(path, "md5")
        fmt, classes, splits = _read_tarball(path, md5, archive_md5)

    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    if len(train_x) == 0:
        raise UserError(f"{source}: no training images found; expected {_LAYOUT_HINT}")
    meta: dict[str, Any] = {
        "source": source,
        "format": fmt,
        "official": fmt == FORMAT_OFFICIAL and archive_md5 == CIFAR10_MD5,
        "archive_md5": archive_md5,
        "classes": list(classes),
        "n_train": int(len(train_x)),
        "n_test": int(len(test_x)),
    }
    _save_split(out_dir / "train.npz", train_x, train_y)
    _save_split(out_dir / "test.npz", test_x, test_y)
    # meta.json last: its presence means both splits were written completely.
    fileio.write_json(out_dir / "meta.json", meta)
    return meta


def load_split(data_dir: Path, split: str) -> Split:
    """Load ``data_dir/<split>.npz`` as (images uint8 NHWC, labels int64)."""
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise UserError(f"{path} not found; run the fetch stage first (dvc repro fetch)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, zlib.error) as exc:
        raise UserError(f"{path} is unreadable ({exc}); rerun the fetch stage (dvc repro fetch)") \
            from exc
    expected = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise UserError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 "
                        f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3); rerun the fetch stage "
                        "(dvc repro fetch)")
    if labels.shape != (images.shape[0],):
        raise UserError(f"{path}: {labels.shape} labels for {images.shape[0]} images; "
                        "rerun the fetch stage (dvc repro fetch)")
    return images, labels.astype(np.int64, copy=False)
