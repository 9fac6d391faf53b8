"""Stage ref_stats: Inception statistics of the FID reference set, and the pool3 features of its first
fid.reference_features images (for KID and precision/recall) -> data/fid_ref.npz (cached by DVC).

Under torchrun (params distributed) each rank runs Inception on its share of the images."""

import argparse
import json
from pathlib import Path

from ddpm_cifar.data.splits import load_split
from ddpm_cifar.evaluation.fid import check_count, load_reference, save_reference, statistics
from ddpm_cifar.evaluation.inception import features_sharded, load_inception
from ddpm_cifar.evaluation.reports import reference_meta
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.stage import stage

PARAMS = ("fid", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--out", type=Path, default=Path("data/fid_ref.npz"))
    args = ap.parse_args()
    with stage("ref_stats", args.params, PARAMS, [args.out.parent]) as run:
        cfg, device = run.params.section("fid"), run.device
        inception, info = load_inception(cfg.inception_weights, device, exact=cfg.exact_inception)
        if cfg.reference in ("train", "test"):
            images, _ = load_split(args.data, cfg.reference)
            if cfg.reference_count > len(images):  # not silently fewer than asked for
                raise UserError(f"fid.reference_count {cfg.reference_count} exceeds the {len(images):,} "
                                f"images of the {cfg.reference} split in {args.data}: lower it, or 0 for all")
            if cfg.reference_count:
                images = images[: cfg.reference_count]
            check_count(len(images))  # on every rank alike, before Inception
            feats = features_sharded(images, inception, batch_size=cfg.batch_size, device=device)
            if feats is None:
                return  # not rank 0: its features went to rank 0, which writes the file
            stats, kept = statistics(feats), feats[: cfg.reference_features]
            data_meta = json.loads((args.data / "meta.json").read_text())
            meta = reference_meta(f"cifar10-{cfg.reference}", stats.n, data_meta, info)
        else:  # precomputed statistics (e.g. pytorch-fid's); trusted only as far as its own meta says
            given = load_reference(cfg.reference)
            stats, kept = given.stats, given.features
            meta = {**reference_meta(cfg.reference, stats.n, {}, info), **given.meta,
                    "provided": cfg.reference}
        if run.main:
            meta["features_n"] = 0 if kept is None else len(kept)
            save_reference(args.out, stats, meta, kept if kept is not None and len(kept) else None)
            print(f"reference statistics of {meta['reference']} ({stats.n} images, features of "
                  f"{meta['features_n']}) -> {args.out}")


if __name__ == "__main__":
    main()
