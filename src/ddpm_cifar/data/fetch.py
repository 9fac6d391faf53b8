"""Fetch CIFAR-10 (or a CIFAR-sized image folder) into the data set the later stages read.

Accepted sources:

* ``"official"``: the official ``cifar-10-python.tar.gz``, downloaded into a cache folder and
  checked against its published MD5.
* a path to a ``.tar.gz`` / ``.tgz`` / ``.tar``: either the official python-format archive
  (a copy made elsewhere) or a tarball of an image folder; the format is told from the content.
* a path to a directory: an image folder.

The readers live in :mod:`ddpm_cifar.data.cifar_archive` (official format) and
:mod:`ddpm_cifar.data.image_folder`; archives are opened and vetted by :mod:`ddpm_cifar.data.tar_members`.
Output: ``train.npz``, ``test.npz`` (:mod:`ddpm_cifar.data.splits`) and ``meta.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime import fileio
from ..runtime.errors import UserError
from .cifar_archive import (
    CIFAR10_MD5,
    FORMAT_OFFICIAL,
    cached_official_archive,
    official_members,
    read_official,
)
from .image_folder import (
    FORMAT_IMAGE_FOLDER,
    LAYOUT_HINT,
    read_image_folder_dir,
    read_image_folder_tar,
)
from .splits import Split, save_split
from .tar_members import open_checked


def _read_tarball(path: Path, md5: str | None, archive_md5: str
                  ) -> tuple[str, list[str], dict[str, Split]]:
    """(format, classes, splits) of an archive in either format, told apart by its members."""
    label = str(path)
    with open_checked(path) as (tar, members):
        official = official_members(members)
        if official:
            if md5 is not None and archive_md5 != md5:
                raise UserError(
                    f"{label} is not the official CIFAR-10 archive: its MD5 is {archive_md5}, "
                    f"expected {md5}; set data.md5 to null in params.yaml to "
                    "accept it anyway"
                )
            classes, splits = read_official(tar, official, label)
            return FORMAT_OFFICIAL, classes, splits
        classes, splits = read_image_folder_tar(tar, members, label)
        return FORMAT_IMAGE_FOLDER, classes, splits


def _source_path(source: str, cache_dir: Path, md5: str | None) -> Path:
    if source == "official":
        return cached_official_archive(cache_dir, md5)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data source {source!r} does not exist; set data.source in params.yaml to "
            "'official', a .tar.gz archive, or an image folder"
        )
    return path


def fetch_cifar10(source: str, out_dir: Path, *, cache_dir: Path,
                  md5: str | None = CIFAR10_MD5) -> dict[str, Any]:
    """Turn ``source`` into ``out_dir/{train,test}.npz`` and ``out_dir/meta.json``.

    ``md5`` applies to the official python-format archive only (downloaded or local); None
    accepts any archive in that format. Image folders are never checked against it.
    Returns the dict written to ``meta.json``.
    """
    out_dir = Path(out_dir)
    if md5 is not None:
        md5 = md5.strip().lower()  # hashes copied from elsewhere may be upper case
    path = _source_path(source, Path(cache_dir), md5)
    archive_md5: str | None
    if path.is_dir():
        fmt, archive_md5 = FORMAT_IMAGE_FOLDER, None
        classes, splits = read_image_folder_dir(path)
    else:
        archive_md5 = fileio.file_digest(path, "md5")
        fmt, classes, splits = _read_tarball(path, md5, archive_md5)

    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    if len(train_x) == 0:
        raise UserError(f"{source}: no training images found; expected {LAYOUT_HINT}")
    meta: dict[str, Any] = {
        "source": source,
        "format": fmt,
        "official": fmt == FORMAT_OFFICIAL and archive_md5 == CIFAR10_MD5,
        "archive_md5": archive_md5,
        "classes": list(classes),
        "n_train": int(len(train_x)),
        "n_test": int(len(test_x)),
    }
    save_split(out_dir / "train.npz", train_x, train_y)
    save_split(out_dir / "test.npz", test_x, test_y)
    # meta.json last: its presence means both splits were written completely.
    fileio.write_json(out_dir / "meta.json", meta)
    return meta
