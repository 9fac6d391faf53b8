"""Every metric of a set of generated images from one Inception pass: FID against the reference
statistics; KID and precision/recall against the reference's stored features; the Inception Score of
the images alone. Of a sample set, of a model (sampled with the sample section's settings) and during
training. What makes them comparable with published numbers: reports.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion.generate import for_sampling, generate_images_sharded
from ..diffusion.process import GaussianDiffusion, Model
from ..diffusion.samplers import SAMPLING_VERSION
from ..runtime.config import SampleConfig, TrainConfig
from ..runtime.distributed import broadcast_from_main
from ..runtime.errors import UserError
from ..runtime.fileio import file_digest
from .feature_metrics import InceptionScore, Kid, PrecisionRecall, inception_score, kid, precision_recall
from .fid import Reference, check_count, frechet_distance, load_reference, statistics
from .inception import FidInceptionV3, features_sharded, load_inception, unbiased_logits
from .reports import check_same_inception

KID_SUBSET_SIZE = 1000  # torch-fidelity's and the KID paper's; fewer when the sets are smaller
KID_SUBSETS = 100
PR_NEIGHBOURS = 3  # Kynkäänniemi et al.'s k, and the ADM evaluator's


@dataclass(frozen=True)
class Scores:
    """The metrics of ``n`` generated images. KID and precision/recall are None when the reference holds
    no features (``missing`` says why); the Inception Score and precision/recall are None when not asked
    for (the training-time evaluation measures FID and KID only)."""

    n: int
    fid: float
    inception_score: InceptionScore | None = None
    kid: Kid | None = None
    precision_recall: PrecisionRecall | None = None
    missing: str | None = None

    def values(self) -> dict[str, float]:
        """The numbers, flat: fid, is, is_std, kid, kid_std, precision, recall (those measured)."""
        out = {"fid": self.fid}
        if self.inception_score is not None:
            out |= {"is": self.inception_score.mean, "is_std": self.inception_score.std}
        if self.kid is not None:
            out |= {"kid": self.kid.mean, "kid_std": self.kid.std}
        if self.precision_recall is not None:
            out |= {"precision": self.precision_recall.precision, "recall": self.precision_recall.recall}
        return out


def no_features_reason(reference: Reference) -> str | None:
    """Why KID and precision/recall cannot be measured against ``reference``, or None."""
    if reference.features is not None and len(reference.features) >= 4:
        return None
    given = reference.meta.get("provided")
    if given:
        return f"the reference {given} holds FID statistics only, no features"
    return "the reference holds no features (fid.reference_features is 0)"


def score_features(features: np.ndarray, reference: Reference, inception: FidInceptionV3, *,
                   full: bool = True) -> Scores:
    """The metrics of (N, 2048) pool3 features; ``full`` adds the Inception Score and precision/recall
    to FID and KID."""
    n = len(features)
    fid = frechet_distance(statistics(features), reference.stats)
    missing = no_features_reason(reference)
    ref_features = reference.features if missing is None else None
    kid_value = pr = is_value = None
    if ref_features is not None and n >= 4:
        kid_value = kid(features, ref_features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
    if full and ref_features is not None and min(n, len(ref_features)) > PR_NEIGHBOURS + 1:
        # The same number of each, as Kynkäänniemi et al.: the k-NN radii grow as a set shrinks.
        m = min(n, len(ref_features))
        pr = precision_recall(features[:m], ref_features[:m], k=PR_NEIGHBOURS)
    if full and n >= 10:
        is_value = inception_score(unbiased_logits(features, inception))
    return Scores(n, fid, is_value, kid_value, pr, missing)


def score_sharded(images: np.ndarray, inception: FidInceptionV3, reference: Reference, *, batch_size: int,
                  device: torch.device, full: bool = True, progress: bool = True) -> Scores:
    """The metrics of ``images`` (uint8 NHWC, the same on every rank), Inception's batches split over the
    process group's ranks; every rank returns them. Without a group, one process does it all."""
    check_count(len(images))  # on every rank alike, before Inception
    feats = features_sharded(images, inception, batch_size=batch_size, device=device, progress=progress)
    scores = score_features(feats, reference, inception, full=full) if feats is not None else None
    return broadcast_from_main(scores)  # type: ignore[arg-type]


def score_model(model: Model, diffusion: GaussianDiffusion, cfg: SampleConfig, inception: FidInceptionV3,
                reference: Reference, *, shape: tuple[int, int, int], fid_batch_size: int,
                device: torch.device,
                cache_dir: Path | None = None, cache_key: str = "", desc: str = "sample") -> Scores:
    """Sample ``cfg.n`` images (C, H, W) = ``shape`` with the sample section's settings and seeds, and
    score them, both sharded over the process group's ranks (every rank returns the scores)."""
    seeds = [cfg.seed + i for i in range(cfg.n)]
    images = generate_images_sharded(model, diffusion, seeds, cfg.sampler,
                                     batch_size=cfg.batch_size, shape=shape, device=device,
                                     cache_dir=cache_dir, cache_key=cache_key, desc=desc, everywhere=True)
    assert images is not None
    return score_sharded(images, inception, reference, batch_size=fid_batch_size, device=device)


@dataclass(frozen=True)
class TrainingScorer:
    """The training-time evaluation: ``fn`` (EMA model, diffusion) -> {column: value} on every rank,
    its log ``columns``, its ``id`` (what the values depend on besides the weights) and ``meta`` (what
    they are measured against, for the train report)."""

    fn: Callable[[torch.nn.Module, GaussianDiffusion], dict[str, float]]
    columns: tuple[str, ...]
    id: str
    meta: dict[str, Any]


def training_evaluation(inception_weights: str | Path, ref_path: Path, cfg: TrainConfig,
                        shape: tuple[int, int, int], device: torch.device, *,
                        exact_inception: bool = False) -> TrainingScorer:
    """FID (and KID ± std, when the reference holds features) of the EMA model during training,
    sampled with ``cfg.fid_sampler`` on the same seeds 0..n-1 every time, for a smooth curve. In a
    process group the ranks share the sampling and the Inception batches."""
    inception, info = load_inception(inception_weights, device, exact=exact_inception)
    reference = load_reference(ref_path)
    check_same_inception(reference.meta, info)
    missing = no_features_reason(reference)
    if cfg.best_metric == "kid" and missing:
        raise UserError(f"train.best_metric kid needs the reference's features, but {missing}: set "
                        "train.best_metric to fid, or fid.reference_features above 0")
    columns = ("fid",) if missing else ("fid", "kid", "kid_std")
    seeds, spec = list(range(cfg.fid_samples)), cfg.fid_sampler

    def evaluate(model: torch.nn.Module, diffusion: GaussianDiffusion) -> dict[str, float]:
        images = generate_images_sharded(for_sampling(model, device), diffusion, seeds, spec,
                                         batch_size=cfg.fid_batch_size, shape=shape, device=device,
                                         progress=False, everywhere=True)
        assert images is not None
        scores = score_sharded(images, inception, reference, batch_size=cfg.fid_batch_size, device=device,
                               full=False, progress=False)
        return {c: v for c, v in scores.values().items() if c in columns}

    meta = {"fid_inception_official": info.official, "fid_reference": reference.meta.get("reference"),
            "fid_reference_n": reference.meta.get("reference_n"), "fid_samples": cfg.fid_samples,
            "kid_reference_features": None if missing else len(reference.features),  # type: ignore[arg-type]
            "kid_missing": missing}
    fid_id = training_fid_id(info.id, file_digest(ref_path), cfg) + f":{','.join(columns)}"
    return TrainingScorer(evaluate, columns, fid_id, meta)


def training_fid_id(inception_id: str, ref_digest: str, cfg: TrainConfig) -> str:
    """What the training-time curve depends on besides the weights: when it changes, the curve
    already logged is dropped rather than continued with values that are not comparable."""
    return (f"{inception_id}:{ref_digest}:{SAMPLING_VERSION}:{cfg.fid_samples}:"
            f"{cfg.fid_sampler.key()}:{cfg.fid_batch_size}")
