"""Stage ref_stats: Inception statistics of the FID reference set -> data/fid_ref.npz (cached by DVC).

Under torchrun (params distributed) each rank runs Inception on its share of the images."""

import argparse
import json
from pathlib import Path

from ddpm_cifar.data.splits import load_split
from ddpm_cifar.evaluation.fid import load_inception, load_stats, save_stats, statistics_sharded
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
        inception, info = load_inception(cfg.inception_weights, device)
        if cfg.reference in ("train", "test"):
            images, _ = load_split(args.data, cfg.reference)
            if cfg.reference_count > len(images):  # not silently fewer than asked for
                raise UserError(f"fid.reference_count {cfg.reference_count} exceeds the {len(images):,} "
                                f"images of the {cfg.reference} split in {args.data}: lower it, or 0 for all")
            if cfg.reference_count:
                images = images[: cfg.reference_count]
            stats = statistics_sharded(images, inception, batch_size=cfg.batch_size, device=device)
            if stats is None:
                return  # not rank 0: its features went to rank 0, which writes the file
            data_meta = json.loads((args.data / "meta.json").read_text())
            meta = reference_meta(f"cifar10-{cfg.reference}", stats.n, data_meta, info)
        else:  # precomputed statistics (e.g. pytorch-fid's); trusted only as far as its own meta says
            stats, given = load_stats(cfg.reference)
            meta = {**reference_meta(cfg.reference, stats.n, {}, info), **given, "provided": cfg.reference}
        if run.main:
            save_stats(args.out, stats, meta)
            print(f"reference statistics of {meta['reference']} ({stats.n} images) -> {args.out}")


if __name__ == "__main__":
    main()
