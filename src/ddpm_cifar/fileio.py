"""Atomic file writes, checksums and downloads with a progress bar.

Every output the pipeline writes goes through a temporary file in the same folder and an
``os.replace``, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the final file the usual umask-derived mode instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | Path, *, md5: str | None = None, sha256_prefix: str | None = None,
             timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, then verify its checksum.

    The file appears at ``dest`` only once complete and verified. Network failures raise a
    :class:`UserError` whose message the caller extends with how to supply the file offline.
    """
    dest = Path(dest)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (fixed https URLs)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot download {url}: {exc}") from exc
    total = int(response.headers.get("Content-Length") or 0) or None
    with atomic_path(dest) as tmp, response, open(tmp, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"download {dest.name}"
    ) as bar:
        try:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"download of {url} broke off: {exc}") from exc
        out.close()
        verify_checksum(tmp, md5=md5, sha256_prefix=sha256_prefix, name=url)
    return dest


def verify_checksum(path: str | Path, *, md5: str | None = None, sha256_prefix: str | None = None,
                    name: str | None = None) -> None:
    """Raise :class:`UserError` if ``path`` does not have the expected MD5 / SHA-256 prefix."""
    label = name or str(path)
    if md5 is not None:
        got = file_digest(path, "md5")
        if got != md5:
            raise UserError(f"{label}: MD5 {got} does not match the expected {md5}")
    if sha256_prefix is not None:
        got = file_digest(path, "sha256")
        if not got.startswith(sha256_prefix):
            raise UserError(f"{label}: SHA-256 {got} does not start with the expected {sha256_prefix}")
