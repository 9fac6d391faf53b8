"""Atomic file writes, checksums and downloads with a progress bar.

Every output the pipeline writes goes through a temporary file in the same folder and an
``os.replace``, so an interrupted run never leaves a half-written file behind; the temporary files a
killed run leaves are removed by the next run (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .errors import UserError

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name lets a later run tell a killed writer's leftover from a file
    # still being written (remove_stale_temp_files).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


# What atomic_path names its temporary files: ".<target name>.<pid>.<mkstemp's 8 random characters>.tmp";
# without a pid, ".<name>.<random>.tmp", is what tempfile makes for outputs.py's ".write-check." probe.
_RANDOM = r"[a-z0-9_]{8}"  # tempfile._RandomNameSequence: 8 of lowercase letters, digits and "_"
_TEMP_WITH_PID = re.compile(rf"\.(?P<name>.+)\.(?P<pid>[1-9][0-9]*)\.{_RANDOM}\.tmp")
_TEMP_WITHOUT_PID = re.compile(rf"\.(?P<name>.+)\.{_RANDOM}\.tmp")
# A temp file whose writer cannot be told (no pid in its name) is kept this long after its last write:
# every atomic write in the pipeline writes its file within minutes of opening it.
STALE_WITHOUT_PID_S = 3600.0
# A temp file whose pid is alive is kept this long: the pid may have been reused by an unrelated
# process after the writer was killed, so past a day the file is taken for a leftover all the same.
STALE_WITH_LIVE_PID_S = 24 * 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except (OverflowError, OSError):
        return False  # not a pid this system can have
    return True


def _is_stale(name: str, age_s: float) -> bool:
    """Whether a file called ``name``, last written ``age_s`` seconds ago, is a temp file of
    atomic_path's that no live writer will move into place."""
    if match := _TEMP_WITH_PID.fullmatch(name):
        return age_s > STALE_WITH_LIVE_PID_S or not _pid_alive(int(match["pid"]))
    return _TEMP_WITHOUT_PID.fullmatch(name) is not None and age_s > STALE_WITHOUT_PID_S


def remove_stale_temp_files(*folders: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` that killed writers left in ``folders``
    (not in their subfolders); returns the paths removed.

    Only names of atomic_path's pattern are candidates (``.<name>.<pid>.<random>.tmp``, or
    ``.<name>.<random>.tmp`` of a write-check probe), and only plain files. One with a pid goes when
    that process no longer exists (or after :data:`STALE_WITH_LIVE_PID_S`); one without, after
    :data:`STALE_WITHOUT_PID_S` since its last write. A missing folder has nothing to remove.
    """
    removed: list[Path] = []
    now = time.time()
    for folder in map(Path, folders):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if _is_stale(entry.name, now - entry.stat(follow_symlinks=False).st_mtime):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except FileNotFoundError:
                continue  # gone meanwhile: moved into place by its writer, or removed by another run
    return removed


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain Python values, never code."""
    import torch  # here, not at the top: the stages that only fetch and write files do without it

    with warnings.catch_warnings():
        # Torch warns, over two lines, about a foreign pickle's protocol just before refusing it;
        # the caller's one-line error says all there is to say.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def why_unreadable(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` or ``np.load(allow_pickle=False)`` failed, in a few
    words of our own. The libraries' messages span lines and advise turning the safe loading off
    (``weights_only=False``, ``allow_pickle=True``): for a damaged or foreign file that is the one
    thing not to do, so of their text only a refused class's name, or a first line without such
    advice, is passed on."""
    text = str(exc)
    if isinstance(exc, EOFError) or (isinstance(exc, ValueError) and "No data left" in text):
        return "empty or cut short"
    if isinstance(exc, zipfile.BadZipFile) or "PytorchStreamReader" in text or "central directory" in text:
        return "truncated or corrupt: a damaged zip archive"
    if found := re.search(r"\bGLOBAL ([\w.]+)", text):  # the pickle opcode naming a class to build
        return f"it holds a Python object ({found[1]}) that a safe load refuses to build"
    if "Object arrays cannot be loaded" in text:
        return "it holds arrays of Python objects, which a safe load refuses"
    if "inline_container" in text:
        return "a zip archive, but not one PyTorch wrote"
    if isinstance(exc, (pickle.UnpicklingError, ValueError, KeyError, UnicodeDecodeError, TypeError)):
        return "truncated, corrupt or another kind of file: its bytes are not in the expected format"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if not first or any(w in first.lower() for w in ("pickle", "weights_only", "trust", "unsafe")):
        return f"truncated or corrupt ({type(exc).__name__})"
    return f"truncated or corrupt: {first}"


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
