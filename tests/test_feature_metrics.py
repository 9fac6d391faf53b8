"""Inception Score, KID and precision/recall on feature arrays: against torch-fidelity 0.4.0, a
brute-force computation, and properties (KID unbiased where FID is not, precision/recall oriented)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from ddpm_cifar.evaluation import feature_metrics as fm
from ddpm_cifar.evaluation.fid import frechet_distance, statistics
from ddpm_cifar.runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def _gaussian(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return shift + scale * np.random.default_rng(seed).normal(size=(n, d))


# Inception Score


@pytest.mark.parametrize(("n", "splits", "seed"), [(500, 10, 2020), (503, 7, 1), (10, 10, 3)])
def test_inception_score_equals_torch_fidelity(n: int, splits: int, seed: int) -> None:
    logits = _gaussian(seed, n, 1008, scale=3.0)
    ours = fm.inception_score(logits, splits=splits, seed=seed)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=splits, rng_seed=seed)
    assert ours.mean == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours.std == pytest.approx(theirs["inception_score_std"], rel=1e-6)
    assert (ours.splits, ours.n) == (splits, n)


def test_inception_score_of_confident_even_classes_is_the_class_count() -> None:
    # Each image certain of one class, 10 classes equally often in every split: exp(log 10) = 10.
    logits = np.full((200, 1008), -1e3)
    logits[np.arange(200), np.arange(200) % 10] = 1e3
    score = fm.inception_score(logits, splits=1)
    assert score.mean == pytest.approx(10.0, rel=1e-12)
    assert score.std == 0.0


# KID


def test_kid_equals_torch_fidelity() -> None:
    gen, ref = _gaussian(0, 300, 64, shift=0.3), _gaussian(1, 400, 64)
    ours = fm.kid(gen, ref, subsets=20, subset_size=100, seed=7)
    theirs = kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), kid_subsets=20,
                                    kid_subset_size=100, rng_seed=7, verbose=False)
    assert ours.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
    assert (ours.subsets, ours.subset_size, ours.n, ours.reference_n) == (20, 100, 300, 400)
    assert ours.error_bar == "std over 20 subsets of 100 of the 300 samples and 400 reference images"


def test_kid_is_unbiased_where_fid_is_not() -> None:
    # Independent pairs of sets from one Gaussian. The subsets of one pair overlap, so their std /
    # sqrt(subsets) understates the error of that pair's mean; the means of independent pairs are
    # independent, so the standard error of their mean is an honest yardstick.
    pairs = 8
    kids, fids = [], []
    for i in range(pairs):
        a, b = _gaussian(100 + 2 * i, 1000, 32), _gaussian(101 + 2 * i, 1000, 32)
        result = fm.kid(a, b, subsets=50, subset_size=250)
        assert abs(result.mean) < 3 * result.std  # the loose per-pair check
        kids.append(result.mean)
        fids.append(frechet_distance(statistics(a), statistics(b)))
    kid_z = np.mean(kids) / (np.std(kids, ddof=1) / np.sqrt(pairs))
    fid_z = np.mean(fids) / (np.std(fids, ddof=1) / np.sqrt(pairs))
    assert abs(kid_z) < 3, kids
    assert fid_z > 20 and min(fids) > 0.3, fids  # FID's bias at n = 1,000, d = 32 is ~0.6


def test_kid_halves_subsets_that_would_cover_a_whole_set() -> None:
    gen, ref = _gaussian(2, 1000, 64, shift=0.1), _gaussian(3, 1000, 64)
    result = fm.kid(gen, ref, subsets=100, subset_size=1000)
    assert result.subset_size == 500
    assert result.std > 0
    assert result.error_bar == ("std over 100 subsets of 500 (half the 1,000 samples: subsets of all of "
                                "them would all be equal)")
    # The halved run is exactly torch-fidelity's at subset size 500 (at 1,000 = n it would use the
    # whole sets in every subset and report a std of 0).
    theirs = kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), kid_subsets=100,
                                    kid_subset_size=500, rng_seed=2020, verbose=False)
    assert result.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert result.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)


@pytest.mark.parametrize(("n", "reference_n", "which"), [(50, 200, "50 samples"),
                                                         (200, 50, "50 reference images")])
def test_kid_halving_names_the_smaller_set(n: int, reference_n: int, which: str) -> None:
    result = fm.kid(_gaussian(4, n, 8), _gaussian(5, reference_n, 8), subsets=10, subset_size=100)
    assert result.subset_size == 25
    assert f"subsets of 25 (half the {which}:" in result.error_bar
    assert result.std > 0


# Precision and recall


def _brute_precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Full float64 distance matrices by differences, not by the dot-product expansion."""

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))

    real_radii = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    gen_radii = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = (dist(gen, real) <= real_radii[None, :]).any(axis=1).mean()
    recall = (dist(real, gen) <= gen_radii[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equal_brute_force(k: int, chunk: int) -> None:
    gen, real = _gaussian(6, 60, 8, shift=0.4, scale=1.3), _gaussian(7, 80, 8)
    result = fm.precision_recall(gen, real, k=k, chunk=chunk)
    assert (result.precision, result.recall) == _brute_precision_recall(gen, real, k)
    assert (result.k, result.n, result.reference_n) == (k, 60, 80)
    assert 0 < result.precision < 1 and 0 < result.recall < 1  # neither trivially 0 nor 1


@pytest.mark.parametrize("save_cpu_ram", [False, True])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_precision_recall_equal_torch_fidelity(chunk: int, save_cpu_ram: bool) -> None:
    gen, real = _gaussian(8, 60, 8, shift=0.4, scale=1.3), _gaussian(9, 80, 8)
    result = fm.precision_recall(gen, real, k=3, chunk=chunk)
    # 0.4.0's convention: features_1 generated, features_2 real. It returns float32 fractions;
    # rel 1e-6 still tells counts apart (adjacent ones differ by >= 1/80).
    theirs = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), prc_neighborhood=3,
                                    prc_batch_size=chunk, save_cpu_ram=save_cpu_ram, verbose=False)
    assert result.precision == pytest.approx(theirs["precision"], rel=1e-6)
    assert result.recall == pytest.approx(theirs["recall"], rel=1e-6)


def test_balls_include_their_boundary() -> None:
    # Integer points on a line, so distances tie exactly. Real 0..4 (k=1 radii all 1): 5 and -1 lie
    # on a boundary, 2.5 inside, 7 and -2 outside: precision 3/5. Generated radii -2: 1, -1: 1,
    # 2.5: 2.5, 5: 2, 7: 2 cover every real point, 0 only on the boundaries of -1's and 2.5's balls.
    real = np.arange(5.0)[:, None]
    gen = np.array([[5.0], [7.0], [-1.0], [-2.0], [2.5]])
    result = fm.precision_recall(gen, real, k=1)
    assert (result.precision, result.recall) == (0.6, 1.0)


def test_mode_collapse_has_high_precision_low_recall() -> None:
    # Real: two clusters 12 apart; generated: only the second. Every generated sample looks real,
    # but half the real ones have no generated neighbour.
    rng = np.random.default_rng(10)
    centres = np.zeros((2, 4))
    centres[:, 0] = (-6.0, 6.0)
    real = rng.normal(size=(1000, 4)) + centres[rng.integers(0, 2, size=1000)]
    gen = rng.normal(size=(500, 4)) + centres[1]
    result = fm.precision_recall(gen, real)
    assert result.precision > 0.9, result
    assert result.recall < 0.6, result


def test_overspread_samples_have_low_precision_high_recall() -> None:
    # Generated three times as spread as real: they cover the real ones, few of them look real.
    result = fm.precision_recall(_gaussian(11, 500, 4, scale=3.0), _gaussian(12, 500, 4))
    assert result.precision < 0.4, result
    assert result.recall > 0.9, result


def test_precision_recall_hold_at_most_chunk_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    cdist = torch.cdist

    def recording_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.shape[0], b.shape[0], a.dtype, b.dtype))
        return cdist(a, b)

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    fm.precision_recall(_gaussian(13, 50, 4), _gaussian(14, 30, 4), chunk=8)
    assert calls and max(rows for rows, *_ in calls) == 8
    assert {dtype for *_, a, b in calls for dtype in (a, b)} == {torch.float64}


# Errors a user can cause


@pytest.mark.parametrize("call", [
    lambda: fm.inception_score(np.zeros((9, 1008)), splits=10),
    lambda: fm.inception_score(np.zeros(1008)),
    lambda: fm.inception_score(np.full((20, 1008), np.nan)),
    lambda: fm.kid(np.zeros((3, 8)), np.zeros((100, 8))),
    lambda: fm.kid(np.zeros((100, 8)), np.zeros((3, 8))),
    lambda: fm.kid(np.zeros((100, 8)), np.zeros((100, 9))),
    lambda: fm.kid(np.zeros((100, 8)), np.zeros((100, 8)), subsets=1),
    lambda: fm.precision_recall(np.zeros((4, 8)), np.zeros((100, 8)), k=3),
    lambda: fm.precision_recall(np.zeros((100, 8)), np.zeros((4, 8)), k=3),
    lambda: fm.precision_recall(np.zeros((100, 8)), np.zeros((100, 9))),
], ids=["is-few", "is-1d", "is-nan", "kid-few-gen", "kid-few-ref", "kid-dims", "kid-one-subset",
        "prc-few-gen", "prc-few-ref", "prc-dims"])
def test_user_errors_have_one_line_messages(call) -> None:
    with pytest.raises(UserError) as caught:
        call()
    assert str(caught.value) and "\n" not in str(caught.value)


def test_smallest_accepted_sizes() -> None:
    assert fm.inception_score(_gaussian(15, 10, 1008), splits=10).n == 10
    assert fm.kid(_gaussian(16, 4, 8), _gaussian(17, 4, 8), subsets=5).subset_size == 2
    assert fm.precision_recall(_gaussian(18, 5, 8), _gaussian(19, 5, 8), k=3).n == 5
