"""Inception Score, KID and precision/recall from Inception feature arrays the caller already has.

Nothing here runs a network or touches the disk: the inputs are numpy arrays (logits for the
Inception Score, pool3 features for KID and precision/recall), and everything is computed in
float64.

* :func:`inception_score` and :func:`kid` reproduce torch-fidelity 0.4.0 (``metric_isc.py``,
  ``metric_kid.py``) draw for draw: the same seeded ``np.random.RandomState``, the same splits and
  subsets, the same estimators. The one deviation is that :func:`kid` halves subsets that would
  otherwise cover a whole set (torch-fidelity refuses them), see its docstring.
* :func:`precision_recall` is Kynkäänniemi et al. 2019 (as torch-fidelity 0.4.0's
  ``prc_features_to_metric(generated, real)``), computed in row chunks so a full distance
  matrix is never held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.errors import UserError

# The fewest features KID accepts on either side: halving gives subsets of at least 2, the least
# the unbiased MMD^2 (a mean over pairs i != j) is defined for.
KID_MIN_SAMPLES = 4


@dataclass(frozen=True)
class InceptionScore:
    mean: float
    std: float
    splits: int
    n: int


@dataclass(frozen=True)
class Kid:
    mean: float
    std: float  # standard deviation of the subsets' MMD^2 (an error bar only when subsets differ)
    subsets: int
    subset_size: int
    n: int  # generated features given
    reference_n: int  # reference features given
    error_bar: str  # one sentence saying how std was obtained, for the report


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float  # fraction of generated samples inside the real manifold
    recall: float  # fraction of real samples inside the generated manifold
    k: int
    n: int  # generated samples used
    reference_n: int  # real samples used


def _checked_2d(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as a 2-D numpy array (its dtype kept, converting 50,000 rows is the caller's cost)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise UserError(f"{name} must have shape (N, d), got {array.shape}")
    if not np.isfinite(array).all():
        raise UserError(f"{name} contains NaN or infinite values")
    return array


def _same_dims(features: np.ndarray, reference: np.ndarray) -> None:
    if features.shape[1] != reference.shape[1]:
        raise UserError(f"features have {features.shape[1]} dimensions but the reference features have "
                        f"{reference.shape[1]}: they must come from the same network layer")


def inception_score(logits: np.ndarray, *, splits: int = 10, seed: int = 2020) -> InceptionScore:
    """Inception Score of (N, C) unbiased Inception logits (C = 1008 for the FID Inception).

    As torch-fidelity 0.4.0: rows shuffled with ``RandomState(seed).permutation(N)``, cut into
    ``splits`` chunks at i*N//splits, each scored exp(mean_x KL(p(y|x) || mean_x p(y|x))); the mean
    and the population std (ddof 0) over the chunks.
    """
    logits = _checked_2d(logits, "logits")
    n = logits.shape[0]
    if splits < 1:
        raise UserError(f"the Inception Score needs splits >= 1, got {splits}")
    if n < splits:
        raise UserError(f"the Inception Score over {splits} splits needs at least {splits} images, got {n}")
    x = logits[np.random.RandomState(seed).permutation(n)].astype(np.float64)
    # log-softmax via the row maximum, so that large logits cannot overflow exp.
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        # p log(p/q) -> 0 as p -> 0: where a class's probability underflowed to 0 in the whole
        # chunk, q is 0 too and 0 * inf would be NaN (torch-fidelity's result there; equal otherwise).
        with np.errstate(divide="ignore", invalid="ignore"):
            log_marginal = np.log(p_chunk.mean(axis=0, keepdims=True))
            terms = np.where(p_chunk > 0, p_chunk * (log_p_chunk - log_marginal), 0.0)
        scores.append(float(np.exp(terms.sum(axis=1).mean())))
    return InceptionScore(mean=float(np.mean(scores)), std=float(np.std(scores)), splits=splits, n=n)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of (m, d) x and (m, d) y with k(a, b) = (a.b / d + 1)^3.

    The within-set means leave out the diagonal (i == j), the cross term keeps all m^2 pairs:
    torch-fidelity's (and Binkowski et al.'s) ``mmd_est="unbiased"``.
    """
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def _kid_subset_size(subset_size: int, subsets: int, n: int, reference_n: int) -> tuple[int, str]:
    """The subset size to use and the sentence that says how the std over subsets was obtained."""
    smallest = min(n, reference_n)
    if subset_size < smallest:
        return subset_size, (f"std over {subsets:,} subsets of {subset_size:,} of the {n:,} samples "
                             f"and {reference_n:,} reference images")
    # Subsets as big as a whole set would be (nearly) that set every time, so all subsets would
    # agree and their std would be ~0, which must not pass for an error bar: half the set differs.
    half = smallest // 2
    which = f"{n:,} samples" if n <= reference_n else f"{reference_n:,} reference images"
    return half, (f"std over {subsets:,} subsets of {half:,} (half the {which}: subsets of all of "
                  "them would all be equal)")


def kid(
    features: np.ndarray,
    reference: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> Kid:
    """KID of (N, d) generated features against (R, d) reference features.

    As torch-fidelity 0.4.0's ``kid_features_to_metric`` with ``rng_seed=seed``: one
    ``RandomState(seed)``; per subset, m generated rows then m reference rows drawn without
    replacement (``choice(N, m, replace=False)``, then ``choice(R, m, replace=False)``); the
    unbiased MMD^2 of each pair; the mean and the std (ddof 0) over subsets, in float64.

    Deviation: where ``subset_size >= min(N, R)`` (torch-fidelity refuses it; accepts equality),
    m = min(N, R) // 2 instead, and ``error_bar`` says so.
    """
    features = _checked_2d(features, "features")
    reference = _checked_2d(reference, "reference features")
    _same_dims(features, reference)
    n, reference_n = len(features), len(reference)
    if min(n, reference_n) < KID_MIN_SAMPLES:
        raise UserError(f"KID needs at least {KID_MIN_SAMPLES} generated and {KID_MIN_SAMPLES} reference "
                        f"features, got {n} and {reference_n}")
    if subsets < 2:
        # The std over a single subset is 0 and would pass for a perfect error bar.
        raise UserError(f"KID needs at least 2 subsets for its std, got {subsets}")
    if subset_size < 2:
        raise UserError(f"KID needs subsets of at least 2 features, got subset_size={subset_size}")
    m, error_bar = _kid_subset_size(subset_size, subsets, n, reference_n)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        # Draw order as torch-fidelity's (generated first), so the subsets are the same ones; only
        # the subset is converted to float64, not the whole (possibly 50,000-row) array.
        x = features[rng.choice(n, m, replace=False)].astype(np.float64)
        y = reference[rng.choice(reference_n, m, replace=False)].astype(np.float64)
        mmds[i] = _mmd2_unbiased(x, y)
    return Kid(mean=float(mmds.mean()), std=float(mmds.std()), subsets=subsets, subset_size=m, n=n,
               reference_n=reference_n, error_bar=error_bar)


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance from each of the (N, d) points to its k-th nearest other point.

    Each point's distance to itself (0) is among its row's, so that is the (k+1)-th smallest.
    """
    radii = [torch.cdist(rows, points).kthvalue(k + 1, dim=1).values for rows in points.split(chunk)]
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of the (Q, d) queries within (<=) at least one ball (centres (C, d), radii (C,))."""
    inside = [(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in queries.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    features: np.ndarray,
    reference: np.ndarray,
    *,
    k: int = 3,
    chunk: int = 1000,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of (N, d) generated features
    against (R, d) real features.

    Each set's manifold is the union of balls around its points, each ball's radius the distance
    to the point's k-th nearest other point in the same set. Precision is the fraction of generated
    points inside the real manifold, recall the fraction of real points inside the generated one.
    Distances are computed ``chunk`` rows at a time in float64, so at most (chunk, max(N, R))
    distances are held at once.
    """
    features = _checked_2d(features, "features")
    reference = _checked_2d(reference, "reference features")
    _same_dims(features, reference)
    if k < 1:
        raise UserError(f"precision/recall need k >= 1 nearest neighbours, got {k}")
    if chunk < 1:
        raise UserError(f"precision/recall need chunk >= 1 rows, got {chunk}")
    n, reference_n = len(features), len(reference)
    if min(n, reference_n) <= k + 1:
        raise UserError(f"precision/recall with k={k} need more than {k + 1} generated and reference "
                        f"features, got {n} and {reference_n}")
    generated = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))
    real = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    precision = _fraction_inside(generated, real, _kth_neighbour_radii(real, k, chunk), chunk)
    recall = _fraction_inside(real, generated, _kth_neighbour_radii(generated, k, chunk), chunk)
    return PrecisionRecall(precision=precision, recall=recall, k=k, n=n, reference_n=reference_n)
