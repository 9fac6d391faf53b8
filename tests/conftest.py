"""Shared fixtures. Data fixtures build tiny stand-ins for CIFAR-10 so tests never download.

Also what every test module may use: the ``one_thread`` fixture, and :func:`require` for an optional
dependency (``from conftest import require``), which skips a test where the package is missing but
fails it under CI.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import factories
import numpy as np
import pytest
from PIL import Image

from ddpm_cifar.evaluation.inception import save_random_inception


def in_ci() -> bool:
    """Whether this is a CI run: the env var CI set and non-empty (GitHub's runners and .ci/run)."""
    return bool(os.environ.get("CI"))


def missing(message: str, module_level: bool = False) -> NoReturn:
    """Skips the test, or under CI fails it: there the setup installs every optional piece the tests
    use, so a missing one is a broken setup, not a reason to pass by not running."""
    if in_ci():
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def require(module: str, module_level: bool = False) -> ModuleType:
    """``pytest.importorskip`` that fails instead under CI (:func:`missing`): the imported module."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        missing(f"cannot import {module}: {first} (the test extra installs it: make setup)", module_level)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test (:func:`factories.one_thread`). Modules of tests on
    tiny tensors apply it to each of their tests: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with factories.one_thread():
        yield

TINY_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class TinyCifarArchive:
    """A tiny archive in the official CIFAR-10 python layout and the arrays it holds."""

    path: Path
    md5: str
    rows_train: np.ndarray  # (N, 3072) uint8, each row CHW as in the official pickles
    rows_test: np.ndarray
    labels_train: np.ndarray  # int64
    labels_test: np.ndarray
    classes: tuple[str, ...]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _batch_pickle(rows: np.ndarray, labels: np.ndarray, legacy_numpy_names: bool) -> bytes:
    batch = {b"batch_label": b"tiny", b"labels": [int(v) for v in labels], b"data": rows,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))]}
    data = pickle.dumps(batch, protocol=2)
    if legacy_numpy_names:
        # The real archive was pickled by Python 2 with numpy 1.x, which names the module
        # numpy.core.multiarray; numpy 2 writes numpy._core.multiarray.
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


@pytest.fixture
def make_cifar_archive(tmp_path: Path) -> Callable[..., TinyCifarArchive]:
    """Factory: write a tiny CIFAR-10 python-format .tar.gz (5 train batches of 4, test of 4)."""

    def make(name: str = "cifar-10-python.tar.gz", *, seed: int = 0, per_batch: int = 4,
             legacy_numpy_names: bool = False,
             batch_override: dict[str, bytes] | None = None,
             skip: tuple[str, ...] = ()) -> TinyCifarArchive:
        rng = np.random.default_rng(seed)
        rows = [rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8) for _ in range(6)]
        labels = [rng.integers(0, 10, size=per_batch).astype(np.int64) for _ in range(6)]
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        payloads = {n: _batch_pickle(r, lab, legacy_numpy_names)
                    for n, r, lab in zip(names, rows, labels, strict=True)}
        payloads["batches.meta"] = pickle.dumps(
            {b"label_names": [c.encode() for c in TINY_CLASSES], b"num_cases_per_batch": per_batch},
            protocol=2,
        )
        payloads["readme.html"] = b"<html>tiny</html>"
        payloads.update(batch_override or {})
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in payloads.items():
                if member not in skip:
                    _add_bytes(tar, f"cifar-10-batches-py/{member}", data)
        return TinyCifarArchive(
            path=path,
            md5=hashlib.md5(path.read_bytes()).hexdigest(),
            rows_train=np.concatenate(rows[:5]),
            rows_test=rows[5],
            labels_train=np.concatenate(labels[:5]),
            labels_test=labels[5],
            classes=TINY_CLASSES,
        )

    return make


@pytest.fixture
def tiny_cifar_archive(make_cifar_archive: Callable[..., TinyCifarArchive]) -> TinyCifarArchive:
    return make_cifar_archive()


@dataclass(frozen=True)
class TinyImageFolder:
    """A tiny image folder: ``root/{train,test}/<class>/*.png`` and the pixels it should load.

    ``expected[split]`` is (images NHWC uint8, labels int64) in the order a loader must
    produce: classes sorted by name, files sorted by name within a class.
    """

    root: Path
    classes: tuple[str, ...]
    expected: dict[str, tuple[np.ndarray, np.ndarray]]


def _png(pixels: np.ndarray, mode: str) -> bytes:
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _decoded_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> TinyImageFolder:
    """Three classes created in unsorted order, file names created in unsorted order."""
    rng = np.random.default_rng(1)
    classes_created = ("zebra", "ant", "moose")  # sorted: ant, moose, zebra
    files = {"train": ("b.png", "c.png", "a.png"), "test": ("y.png", "x.png")}
    root = tmp_path / "imagefolder"
    blobs: dict[tuple[str, str, str], bytes] = {}
    for split, names in files.items():
        for cls in classes_created:
            for i, fname in enumerate(names):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                # One greyscale and one palette image: the loader must convert them to RGB.
                mode = {0: "RGB", 1: "L", 2: "P"}[i % 3] if split == "train" else "RGB"
                blobs[(split, cls, fname)] = _png(pixels, mode)
    for (split, cls, fname), data in blobs.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / fname).write_bytes(data)
    classes = tuple(sorted(classes_created))
    expected = {}
    for split, names in files.items():
        order = [(cls, f) for cls in classes for f in sorted(names)]
        expected[split] = (
            np.stack([_decoded_rgb(blobs[(split, cls, f)]) for cls, f in order]),
            np.array([classes.index(cls) for cls, _ in order], dtype=np.int64),
        )
    return TinyImageFolder(root=root, classes=classes, expected=expected)


@pytest.fixture
def tiny_imagefolder_tarball(tiny_imagefolder: TinyImageFolder, tmp_path: Path) -> Path:
    """The ``tiny_imagefolder`` tree as a .tar.gz, inside a wrapper folder, members shuffled."""
    paths = sorted(p for p in tiny_imagefolder.root.rglob("*") if p.is_file())
    order = np.random.default_rng(2).permutation(len(paths))
    tarball = tmp_path / "imagefolder.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for i in order:
            rel = paths[i].relative_to(tiny_imagefolder.root).as_posix()
            _add_bytes(tar, f"tiny/{rel}", paths[i].read_bytes())
    return tarball


@pytest.fixture
def make_tarball(tmp_path: Path) -> Callable[[str, list[tarfile.TarInfo]], Path]:
    """Factory: write a .tar.gz from raw TarInfo headers (regular members get b"x" as data)."""

    def make(name: str, members: list[tarfile.TarInfo]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for info in members:
                if info.isreg():
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"x"))
                else:
                    tar.addfile(info)
        return path

    return make


@pytest.fixture(scope="session")
def e2e_random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~91 MB and a few seconds to build: once per session.
    path = tmp_path_factory.mktemp("e2e_inception") / "inception-random-seed0.pth"
    save_random_inception(path, seed=0)
    return path
