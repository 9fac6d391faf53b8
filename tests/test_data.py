"""Tests for fetching CIFAR-10 and image folders into .npz splits (ddpm_cifar.data.fetch and the readers
it uses) and for loading them back (ddpm_cifar.data.splits)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from ddpm_cifar.data import cifar_archive, splits
from ddpm_cifar.data.fetch import fetch_cifar10
from ddpm_cifar.runtime import fileio
from ddpm_cifar.runtime.errors import UserError

if TYPE_CHECKING:  # fixtures hand these over; conftest is not imported at run time
    from conftest import TinyCifarArchive, TinyImageFolder


def _chw_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """Independent of the library's reshape: pixel (y, x) channel c sits at c*1024 + y*32 + x."""
    n = rows.shape[0]
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for c in range(3):
        out[..., c] = rows[:, c * 1024:(c + 1) * 1024].reshape(n, 32, 32)
    return out


def _fetch(source: str | Path, tmp_path: Path, **kwargs: object) -> dict:
    return fetch_cifar10(str(source), tmp_path / "out", cache_dir=tmp_path / "cache",
                         **kwargs)  # type: ignore[arg-type]


# --- official python format ---------------------------------------------------------------


def test_official_format_round_trips_pixels_and_labels(
        tiny_cifar_archive: TinyCifarArchive, tmp_path: Path) -> None:
    arc = tiny_cifar_archive
    meta = _fetch(arc.path, tmp_path, md5=arc.md5)

    assert meta == {
        "source": str(arc.path), "format": "cifar10-python", "official": False,
        "archive_md5": arc.md5, "classes": list(cifar_archive.CIFAR10_CLASSES),
        "n_train": 20, "n_test": 4,
    }
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    for split, rows, labels in (("train", arc.rows_train, arc.labels_train),
                                ("test", arc.rows_test, arc.labels_test)):
        images, got_labels = splits.load_split(tmp_path / "out", split)
        assert images.dtype == np.uint8 and images.shape == (len(rows), 32, 32, 3)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(images, _chw_rows_to_nhwc(rows))
        np.testing.assert_array_equal(got_labels, labels)
    # Spot-check one pixel by hand: image 7, row 3, column 5, blue channel.
    images, _ = splits.load_split(tmp_path / "out", "train")
    assert images[7, 3, 5, 2] == arc.rows_train[7, 2 * 1024 + 3 * 32 + 5]


def test_official_format_with_md5_none_is_accepted(
        tiny_cifar_archive: TinyCifarArchive, tmp_path: Path) -> None:
    meta = _fetch(tiny_cifar_archive.path, tmp_path, md5=None)
    assert meta["format"] == "cifar10-python" and meta["official"] is False
    assert meta["archive_md5"] == tiny_cifar_archive.md5
    images, _ = splits.load_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(images, _chw_rows_to_nhwc(tiny_cifar_archive.rows_test))


def test_official_format_reads_numpy1_pickles(
        make_cifar_archive: Callable[..., TinyCifarArchive], tmp_path: Path) -> None:
    arc = make_cifar_archive(legacy_numpy_names=True)
    assert b"numpy.core.multiarray" in _member_bytes(arc.path, "cifar-10-batches-py/test_batch")
    _fetch(arc.path, tmp_path, md5=None)
    images, labels = splits.load_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(images, _chw_rows_to_nhwc(arc.rows_test))
    np.testing.assert_array_equal(labels, arc.labels_test)


@pytest.mark.parametrize("md5", ["0" * 32, cifar_archive.CIFAR10_MD5])
def test_official_format_with_wrong_md5_is_rejected(
        tiny_cifar_archive: TinyCifarArchive, tmp_path: Path, md5: str) -> None:
    with pytest.raises(UserError) as info:
        _fetch(tiny_cifar_archive.path, tmp_path, md5=md5)
    msg = str(info.value)
    assert "not the official" in msg and tiny_cifar_archive.md5 in msg and md5 in msg
    assert "data.md5" in msg and "null" in msg
    assert not (tmp_path / "out").exists()


def test_official_format_missing_batch_is_rejected(
        make_cifar_archive: Callable[..., TinyCifarArchive], tmp_path: Path) -> None:
    arc = make_cifar_archive(skip=("data_batch_3",))
    with pytest.raises(UserError, match="data_batch_3"):
        _fetch(arc.path, tmp_path, md5=None)


def test_official_format_refuses_pickle_that_runs_code(
        make_cifar_archive: Callable[..., TinyCifarArchive], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    arc = make_cifar_archive(batch_override={"data_batch_1": pickle.dumps({b"data": Evil()})})
    with pytest.raises(UserError, match="data_batch_1"):
        _fetch(arc.path, tmp_path, md5=None)
    assert not marker.exists()


# --- image folders ---------------------------------------------------------------------------


def _assert_matches(out_dir: Path, folder: TinyImageFolder) -> None:
    for split in ("train", "test"):
        images, labels = splits.load_split(out_dir, split)
        np.testing.assert_array_equal(images, folder.expected[split][0])
        np.testing.assert_array_equal(labels, folder.expected[split][1])


def test_image_folder_tarball_and_directory_load_identically(
        tiny_imagefolder: TinyImageFolder, tiny_imagefolder_tarball: Path, tmp_path: Path) -> None:
    meta_tar = fetch_cifar10(str(tiny_imagefolder_tarball), tmp_path / "from_tar",
                             cache_dir=tmp_path / "cache")
    meta_dir = fetch_cifar10(str(tiny_imagefolder.root), tmp_path / "from_dir",
                             cache_dir=tmp_path / "cache")
    for meta in (meta_tar, meta_dir):
        assert meta["format"] == "image-folder" and meta["official"] is False
        assert meta["classes"] == ["ant", "moose", "zebra"]
        assert (meta["n_train"], meta["n_test"]) == (9, 6)
    assert meta_dir["archive_md5"] is None
    assert meta_tar["archive_md5"] == fileio.file_digest(tiny_imagefolder_tarball, "md5")
    _assert_matches(tmp_path / "from_tar", tiny_imagefolder)
    _assert_matches(tmp_path / "from_dir", tiny_imagefolder)


def test_image_folder_rgb_png_pixels_are_exact(
        tiny_imagefolder: TinyImageFolder, tmp_path: Path) -> None:
    # ant/b.png is the second training image (sorted class, then sorted file: a, b, c).
    with Image.open(tiny_imagefolder.root / "train" / "ant" / "b.png") as img:
        assert img.mode == "RGB"
        pixels = np.asarray(img)
    fetch_cifar10(str(tiny_imagefolder.root), tmp_path / "out", cache_dir=tmp_path / "c")
    images, labels = splits.load_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images[1], pixels)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_without_splits_is_all_train(
        tiny_imagefolder: TinyImageFolder, tmp_path: Path) -> None:
    meta = fetch_cifar10(str(tiny_imagefolder.root / "train"), tmp_path / "out",
                         cache_dir=tmp_path / "c")
    assert (meta["n_train"], meta["n_test"]) == (9, 0)
    _, labels = splits.load_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(labels, tiny_imagefolder.expected["train"][1])
    images, labels = splits.load_split(tmp_path / "out", "test")
    assert images.shape == (0, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (0,)


def test_image_folder_ignores_default_md5(
        tiny_imagefolder_tarball: Path, tmp_path: Path) -> None:
    # data.md5 defaults to the official hash; it must not block an image-folder source.
    meta = _fetch(tiny_imagefolder_tarball, tmp_path, md5=cifar_archive.CIFAR10_MD5)
    assert meta["format"] == "image-folder"


def test_wrong_size_image_is_rejected_naming_the_file(
        tiny_imagefolder: TinyImageFolder, tmp_path: Path) -> None:
    bad = tiny_imagefolder.root / "test" / "moose" / "big.png"
    Image.new("RGB", (64, 64)).save(bad)
    with pytest.raises(UserError, match=r"test/moose/big\.png.*64x64"):
        fetch_cifar10(str(tiny_imagefolder.root), tmp_path / "out", cache_dir=tmp_path / "c")
    assert not (tmp_path / "out" / "train.npz").exists()


def test_wrong_size_image_in_tarball_is_rejected_naming_the_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 31)).save(buf, format="PNG")
    tarball = tmp_path / "bad.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("train/cat/odd.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(UserError, match=r"train/cat/odd\.png.*32x31"):
        _fetch(tarball, tmp_path)


def test_image_outside_layout_is_rejected_naming_the_file(
        tiny_imagefolder: TinyImageFolder, tmp_path: Path) -> None:
    (tiny_imagefolder.root / "val" / "ant").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tiny_imagefolder.root / "val" / "ant" / "v.png")
    with pytest.raises(UserError, match=r"val/ant/v\.png"):
        fetch_cifar10(str(tiny_imagefolder.root), tmp_path / "out", cache_dir=tmp_path / "c")


# --- archives: unsafe members, links, damage ------------------------------------------------


def _reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _unsafe_cases(tmp_path: Path) -> dict[str, list[tarfile.TarInfo]]:
    """Each case's last member is the one that must be named as unsafe."""
    fifo = tarfile.TarInfo("train/cat/pipe")
    fifo.type = tarfile.FIFOTYPE
    device = tarfile.TarInfo("train/cat/dev")
    device.type = tarfile.CHRTYPE
    return {
        "dotdot": [_reg("train/cat/ok.txt"), _reg("../evil.txt")],
        "absolute": [_reg(str(tmp_path / "abs_evil.txt"))],
        "symlink_out": [_link("train/cat/link", "../../../evil_target")],
        "symlink_abs": [_link("link", str(tmp_path))],
        # `b -> .` is harmless alone, but b/../evil.txt then escapes although it looks inside.
        "through_link": [_link("b", "."), _reg("b/../evil.txt")],
        # Where b/x.png lands depends on b's target, which a lexical check cannot follow.
        "below_link": [_link("b", "train"), _reg("b/cat/x.png")],
        "link_chain": [_link("b", "."), _link("c", "b/..")],
        "hardlink_out": [_link("h", "../evil.txt", tarfile.LNKTYPE)],
        "hardlink_abs": [_link("h", str(tmp_path / "x"), tarfile.LNKTYPE)],
        "fifo": [fifo],
        "device": [device],
    }


CASES = ["dotdot", "absolute", "symlink_out", "symlink_abs", "through_link", "below_link",
         "link_chain", "hardlink_out", "hardlink_abs", "fifo", "device"]


@pytest.mark.parametrize("case", CASES)
def test_fetch_rejects_unsafe_tarball(
        case: str, make_tarball: Callable[[str, list[tarfile.TarInfo]], Path],
        tmp_path: Path) -> None:
    members = _unsafe_cases(tmp_path)[case]
    tarball = make_tarball(f"{case}.tar.gz", members)
    with tarfile.open(tarball) as tar:
        if case == "absolute":
            assert tar.getnames()[0].startswith("/")  # the header really holds an absolute name
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UserError, match="refusing unsafe archive member") as info:
        _fetch(tarball, tmp_path)
    msg = str(info.value)
    assert f"member {members[-1].name!r}" in msg and "\n" not in msg
    assert set(tmp_path.rglob("*")) == before


def _image_tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            if payload is None:
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_fetch_reads_links_that_stay_inside_the_archive(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    tarball = _image_tarball(tmp_path / "links.tar.gz", [
        (_reg("train/cat/a.png"), _png_bytes(pixels)),
        (_link("train/dog/b.png", "../cat/a.png"), None),
        (_link("test/cat/c.png", "train/cat/a.png", tarfile.LNKTYPE), None),
    ])
    meta = _fetch(tarball, tmp_path)
    assert (meta["classes"], meta["n_train"], meta["n_test"]) == (["cat", "dog"], 2, 1)
    for split, n in (("train", 2), ("test", 1)):
        images, _ = splits.load_split(tmp_path / "out", split)
        np.testing.assert_array_equal(images, np.stack([pixels] * n))


def test_fetch_refuses_link_to_a_missing_member_in_one_line(tmp_path: Path) -> None:
    tarball = _image_tarball(tmp_path / "dangling.tar.gz",
                             [(_link("train/cat/a.png", "gone.png"), None)])
    with pytest.raises(UserError, match=r"train/cat/a\.png.*gone\.png") as info:
        _fetch(tarball, tmp_path)
    assert "\n" not in str(info.value)


def test_corrupt_image_is_rejected_in_one_line(
        tiny_imagefolder: TinyImageFolder, tmp_path: Path) -> None:
    bad = tiny_imagefolder.root / "train" / "ant" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(40))
    with pytest.raises(UserError, match=r"train/ant/broken\.jpg: cannot decode") as info:
        fetch_cifar10(str(tiny_imagefolder.root), tmp_path / "out", cache_dir=tmp_path / "c")
    assert "\n" not in str(info.value)
    tarball = _image_tarball(tmp_path / "bad.tar.gz", [(_reg("train/cat/x.jpg"), bad.read_bytes())])
    with pytest.raises(UserError, match=r"train/cat/x\.jpg: cannot decode") as info:
        _fetch(tarball, tmp_path)
    assert "\n" not in str(info.value)


def test_truncated_archive_is_rejected_in_one_line(
        tiny_imagefolder_tarball: Path, tmp_path: Path) -> None:
    whole = tiny_imagefolder_tarball.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="cut.tar.gz: cannot read the archive") as info:
        _fetch(cut, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


# --- sources and errors --------------------------------------------------------------------


def test_official_source_offline_gives_one_line_hint(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fileio.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as info:
        _fetch("official", tmp_path)
    msg = str(info.value)
    assert "data.source" in msg and "cifar-10-python.tar.gz" in msg and "no network" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()


def test_official_source_uses_verified_cached_archive(
        tiny_cifar_archive: TinyCifarArchive, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("a verified cached archive must not be downloaded again")

    monkeypatch.setattr(fileio.urllib.request, "urlopen", offline)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(tiny_cifar_archive.path.read_bytes())
    meta = _fetch("official", tmp_path, md5=tiny_cifar_archive.md5)
    assert meta["source"] == "official" and meta["format"] == "cifar10-python"
    assert meta["n_train"] == 20


def test_missing_source_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(UserError, match="nope.tar.gz"):
        _fetch(missing, tmp_path)


@pytest.mark.parametrize("content", [b"this is not a tar archive" * 10, b""])
def test_non_tar_file_is_rejected_in_one_line(tmp_path: Path, content: bytes) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(content)
    with pytest.raises(UserError, match="junk.tar.gz: not a readable") as info:
        _fetch(junk, tmp_path)
    assert "\n" not in str(info.value)


def test_load_split_missing_dir_tells_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dvc repro fetch"):
        splits.load_split(tmp_path / "does-not-exist", "train")


@pytest.mark.parametrize(("damage", "why"), [
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "a damaged zip archive"),
    (lambda p: np.savez(p, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(3, np.int64)),
     "'labels' has shape (3,): N is 2 in 'images'"),
    (lambda p: np.savez(p, images=np.zeros((2, 32, 32, 3), np.float32), labels=np.zeros(2, np.int64)),
     "'images' is float32, not uint8"),
])
def test_a_damaged_split_is_one_line_saying_how_to_restore_it(tmp_path: Path, damage: Any, why: str) -> None:
    path = tmp_path / "train.npz"
    damage(path)
    with pytest.raises(UserError) as info:
        splits.load_split(tmp_path, "train")
    message = str(info.value)
    assert "\n" not in message and why in message, message
    assert message.endswith("restore it with `dvc checkout --force data/cifar10` (or rerun "
                            "`dvc repro fetch`)")


def test_class_list_is_official_order() -> None:
    assert cifar_archive.CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer",
                                    "dog", "frog", "horse", "ship", "truck")


def _member_bytes(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read()
