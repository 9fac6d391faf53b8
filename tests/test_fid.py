"""FID: distance against closed forms, statistics, and the offline Inception (random weights)."""

from __future__ import annotations

import gc
import os
import pickle
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from ddpm_cifar.evaluation import fid, inception
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.fileio import file_digest

DIM = 16


def _random_cov(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    """A full-rank, non-diagonal covariance (dim, dim)."""
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


@pytest.fixture(scope="session")
def random_inception_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Written once: the file is ~96 MB and building it costs seconds.
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    inception.save_random_inception(path, seed=0)
    return path


@pytest.fixture(scope="session")
def random_inception(random_inception_path: Path) -> tuple[torch.nn.Module, inception.InceptionInfo]:
    return inception.load_inception(random_inception_path, exact=True)  # pytorch-fid's op sequence


@pytest.fixture
def images() -> np.ndarray:
    # Few and small: Inception resizes to 299x299 anyway, at ~0.1 s per image on CPU.
    return np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


# --- distance ---------------------------------------------------------------------------------


def test_frechet_distance_of_identical_stats_is_zero() -> None:
    rng = np.random.default_rng(1)
    s = fid.FidStats(mu=rng.normal(size=DIM), sigma=_random_cov(rng), n=100)
    assert abs(fid.frechet_distance(s, s)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
    s1, s2 = rng.uniform(0.1, 3.0, size=DIM), rng.uniform(0.1, 3.0, size=DIM)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    a, b = fid.FidStats(mu1, np.diag(s1), 10), fid.FidStats(mu2, np.diag(s2), 10)
    got = fid.frechet_distance(a, b)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_matches_eigendecomposition_for_full_covariances() -> None:
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
    s1, s2 = _random_cov(rng), _random_cov(rng)
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the inner matrix is symmetric PSD, so its
    # square root comes from eigh alone, independently of scipy.linalg.sqrtm.
    r1 = _sqrt_psd(s1)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    got = fid.frechet_distance(fid.FidStats(mu1, s1, 10), fid.FidStats(mu2, s2, 10))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > 0


def test_frechet_distance_rejects_mismatched_dimensions() -> None:
    rng = np.random.default_rng(4)
    a = fid.FidStats(rng.normal(size=DIM), _random_cov(rng), 10)
    b = fid.FidStats(rng.normal(size=DIM + 1), _random_cov(rng, DIM + 1), 10)
    with pytest.raises(UserError, match="shape"):
        fid.frechet_distance(a, b)


# --- statistics -------------------------------------------------------------------------------


def test_statistics_are_float64_mean_and_covariance() -> None:
    feats = np.random.default_rng(5).normal(size=(50, DIM)).astype(np.float32)
    s = fid.statistics(feats)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    assert s.n == 50
    f64 = feats.astype(np.float64)
    np.testing.assert_array_equal(s.mu, np.mean(f64, axis=0))
    np.testing.assert_array_equal(s.sigma, np.cov(f64, rowvar=False))


@pytest.mark.parametrize("n", [0, 1])
def test_statistics_need_two_images(n: int) -> None:
    with pytest.raises(UserError, match="at least 2"):
        fid.statistics(np.zeros((n, DIM)))


def test_compute_statistics_needs_two_images(random_inception, images: np.ndarray) -> None:
    model, _ = random_inception
    with pytest.raises(UserError, match="at least 2"):
        fid.compute_statistics(images[:1], model, batch_size=4, device="cpu", progress=False)


def test_stats_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    s = fid.FidStats(rng.normal(size=DIM), _random_cov(rng), 123)
    fid.save_reference(tmp_path / "s.npz", s, {"split": "train", "inception_sha256": "abc"})
    ref = fid.load_reference(tmp_path / "s.npz")
    got, meta = ref.stats, ref.meta
    np.testing.assert_array_equal(got.mu, s.mu)
    np.testing.assert_array_equal(got.sigma, s.sigma)
    assert got.n == 123 and ref.features is None
    assert meta == {"split": "train", "inception_sha256": "abc"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp file left behind


def test_reference_features_round_trip_as_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(20, DIM)).astype(np.float32).astype(np.float64)  # what Inception gives
    s = fid.statistics(feats)
    fid.save_reference(tmp_path / "s.npz", s, {}, features=feats[:12])
    ref = fid.load_reference(tmp_path / "s.npz")
    assert ref.features is not None and ref.features.dtype == np.float32 and ref.features.shape == (12, DIM)
    np.testing.assert_array_equal(ref.features.astype(np.float64), feats[:12])  # nothing lost


def test_reference_with_more_features_than_statistics_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    s = fid.FidStats(np.zeros(DIM), np.eye(DIM), 5)
    fid.save_reference(tmp_path / "fid_ref.npz", s, {}, features=rng.normal(size=(6, DIM)))
    with pytest.raises(UserError, match="features of 6 images but statistics of 5"):
        fid.load_reference(tmp_path / "fid_ref.npz")


def test_load_reference_accepts_pytorch_fid_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=DIM).astype(np.float32), _random_cov(rng).astype(np.float32)
    np.savez_compressed(tmp_path / "ref.npz", mu=mu, sigma=sigma)  # pytorch-fid's --save-stats
    ref = fid.load_reference(tmp_path / "ref.npz")
    got, meta = ref.stats, ref.meta
    assert got.n == -1 and meta == {} and ref.features is None
    assert got.mu.dtype == np.float64 and got.sigma.dtype == np.float64
    np.testing.assert_array_equal(got.sigma, sigma.astype(np.float64))


def test_load_reference_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        fid.load_reference(tmp_path / "nope.npz")


# --- Inception --------------------------------------------------------------------------------


def test_random_inception_round_trips(random_inception_path: Path, random_inception) -> None:
    model, info = random_inception
    assert info.official is False
    assert info.path == str(random_inception_path)
    assert info.sha256 == file_digest(random_inception_path, "sha256")
    assert not model.training
    built = inception.build_inception(seed=0).state_dict()
    loaded = model.state_dict()
    assert built.keys() == loaded.keys()
    for k in built:
        assert torch.equal(built[k], loaded[k]), k
    other = inception.build_inception(seed=1).state_dict()
    assert not torch.equal(other["Conv2d_1a_3x3.conv.weight"], built["Conv2d_1a_3x3.conv.weight"])


def test_state_dict_keys_are_those_of_pytorch_fid(random_inception) -> None:
    """The official file is fid_inception_v3()'s state dict: build that model (its download
    stubbed with our weights) and check it takes our keys strictly and gives our features."""
    import pytorch_fid.inception as pfi

    model, _ = random_inception
    state = model.state_dict()
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        reference = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ours = model(x)  # (2, 2048)
        theirs = reference(x)[0].flatten(1)  # [(2, 2048, 1, 1)] -> (2, 2048)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_features_shape_dtype_and_determinism(random_inception, images: np.ndarray) -> None:
    model, _ = random_inception
    a = inception.inception_features(images, model, batch_size=2, device="cpu", progress=False)
    b = inception.inception_features(images, model, batch_size=3, device="cpu", progress=False)
    assert a.shape == (3, 2048) and a.dtype == np.float64
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # batching does not change features
    assert not np.allclose(a[0], a[1])  # different images, different features
    # No frechet_distance here: sqrtm of a 2048x2048 matrix alone takes ~10 s on 2 cores.


def test_features_refuse_float_images(random_inception, images: np.ndarray) -> None:
    model, _ = random_inception
    with pytest.raises((TypeError, UserError), match="uint8"):
        inception.inception_features(images.astype(np.float32) / 255, model, batch_size=2,
                               device="cpu", progress=False)


def test_missing_weights_file_names_path_and_official_file(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "inception.pth"
    with pytest.raises(UserError) as exc:
        inception.load_inception(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert inception.OFFICIAL_INCEPTION_FILENAME in msg
    assert "get_inception.py" in msg and "make_random_inception.py" in msg
    assert "\n" not in msg


def test_invalid_weights_file_is_a_user_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="garbage.pth"):
        inception.load_inception(garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(UserError, match="wrong.pth.*missing keys"):
        inception.load_inception(wrong)


# --- files that are not what they should be ---------------------------------------------------

# What torch and numpy say of a file they will not load safely: advice to turn the safety off.
LIBRARY_ADVICE = ("weights_only", "allow_pickle", "pickle", "trust", "add_safe_globals", "http")


class RunsCode:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _truncated(path: Path, write) -> None:
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_bad(path: Path, kind: str, marker: Path) -> None:
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "code-pickle":
        path.write_bytes(pickle.dumps({"mu": RunsCode(marker)}))
    elif kind == "code-in-torch-zip":
        torch.save({"Conv2d_1a_3x3.conv.weight": RunsCode(marker)}, path)
    elif kind == "truncated-state-dict":
        # A small state dict cut short fails as the 96 MB one does: at the missing zip directory.
        _truncated(path, lambda p: torch.save(inception.FidInceptionV3().fc.state_dict(), p))
    elif kind == "truncated-stats":
        stats = fid.FidStats(np.zeros(DIM), np.eye(DIM), 5)
        _truncated(path, lambda p: fid.save_reference(p, stats, {"a": 1}))
    elif kind == "empty":
        path.write_bytes(b"")


# The reason a refusal gives for the kinds of bad file that have one of their own.
REASON = {
    "code-in-torch-zip": "(it holds a Python object (posix.system)",
    "truncated-state-dict": "(truncated or corrupt: a damaged zip archive)",
    "truncated-stats": "(truncated or corrupt: a damaged zip archive)",
    "empty": "(empty or cut short)",
}


def _refusal(load, path: Path) -> str:
    # No warning either: torch warns over two lines about a foreign pickle's protocol before refusing it.
    with pytest.raises(UserError) as info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        load(path)
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    message = str(info.value)
    assert "\n" not in message, message
    assert not [w for w in LIBRARY_ADVICE if w in message.lower()], message
    return message


@pytest.mark.parametrize("kind", ["random-bytes", "code-pickle", "code-in-torch-zip", "truncated-state-dict",
                                  "empty"])
def test_unreadable_inception_weights_are_one_line_of_ours(tmp_path: Path, kind: str) -> None:
    path, marker = tmp_path / "inception.pth", tmp_path / "code-ran"
    _write_bad(path, kind, marker)
    message = _refusal(inception.load_inception, path)
    assert not marker.exists()
    assert message.startswith(f"{path} is not a readable Inception weights file (")
    assert message.endswith(
        f"): get the official file again with `python scripts/get_inception.py {path}` "
        f"(it replaces a damaged file), or copy {inception.OFFICIAL_INCEPTION_FILENAME} to {path}")
    assert REASON.get(kind, "") in message


def test_unreadable_random_inception_says_the_stage_makes_it_again(tmp_path: Path) -> None:
    path = tmp_path / "inception-random-seed3.pth"
    path.write_bytes(b"\x00" * 100)
    assert _refusal(inception.load_inception, path).endswith(
        "remove it and rerun `dvc repro`, whose inception stage makes it again (or "
        f"`python scripts/make_random_inception.py {path} --seed 3`)")


@pytest.mark.parametrize("kind", ["random-bytes", "code-pickle", "truncated-stats", "empty"])
def test_unreadable_stats_are_one_line_of_ours(tmp_path: Path, kind: str) -> None:
    path, marker = tmp_path / "fid_ref.npz", tmp_path / "code-ran"
    _write_bad(path, kind, marker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        message = _refusal(fid.load_reference, path)
        gc.collect()  # a file left open by the failed load would warn as it is collected
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not marker.exists()
    assert message.startswith(f"{path} is not an FID statistics .npz (")
    # tests/test_damaged_files.py runs this command in a DVC project
    assert message.endswith("): remove it and rerun `dvc repro`, whose ref_stats stage writes it again")
    assert REASON.get(kind, "") in message


def test_stats_that_are_one_array_or_python_objects_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "mu.npy", np.zeros(DIM))
    assert "(it holds a single array, not named arrays)" in _refusal(fid.load_reference, tmp_path / "mu.npy")
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(DIM))
    assert "(it holds arrays of Python objects, which a safe load refuses)" in _refusal(
        fid.load_reference, tmp_path / "objects.npz")


@pytest.mark.parametrize(("members", "why"), [
    (dict(mu=np.array([0.0, np.nan, 1.0]), sigma=np.eye(3)), "its 'mu' holds NaN or infinite values"),
    (dict(mu=np.zeros(3), sigma=np.full((3, 3), np.inf)), "its 'sigma' holds NaN or infinite values"),
    (dict(mu=np.zeros(3), sigma=np.eye(2)), "its 'sigma' has shape (2, 2): d is 3 in 'mu'"),
    (dict(mu=np.zeros((3, 1)), sigma=np.eye(3)), "its 'mu' has shape (3, 1), not (d,)"),
    (dict(mu=np.zeros(3), sigma=np.eye(3), meta="not json"), "its 'meta' is not the JSON text of an object"),
    (dict(mu=np.zeros(3), sigma=np.eye(3), n=np.float64(2.5)), "its 'n' is float64, not integers"),
], ids=["nan-mu", "inf-sigma", "sigma-of-another-size", "mu-not-a-vector", "meta-not-json", "n-not-whole"])
def test_stats_that_are_not_finite_or_do_not_fit_are_refused(tmp_path: Path, members: dict, why: str) -> None:
    path = tmp_path / "fid_ref.npz"
    np.savez(path, **members)
    assert _refusal(fid.load_reference, path) == (
        f"{path} is not an FID statistics .npz ({why}): remove it and rerun `dvc repro`, whose ref_stats "
        "stage writes it again")


def test_a_given_reference_says_what_to_give(tmp_path: Path) -> None:
    path = tmp_path / "cifar10_train_stats.npz"  # fid.reference: statistics computed elsewhere
    path.write_bytes(b"")
    assert _refusal(fid.load_reference, path) == (
        f"{path} is not an FID statistics .npz (empty or cut short): give a .npz of 'mu' (d,) and 'sigma' "
        "(d, d), as pytorch-fid's --save-stats writes, in fid.reference")
