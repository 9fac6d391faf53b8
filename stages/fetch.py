"""Stage fetch: CIFAR-10 from the configured source -> data/cifar10/{train,test}.npz + meta.json."""

import argparse
from pathlib import Path

from ddpm_cifar.data.fetch import fetch_cifar10
from ddpm_cifar.runtime.stage import stage

PARAMS = ("data",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--cache", type=Path, default=Path("data/download"))
    args = ap.parse_args()
    with stage("fetch", args.params, PARAMS, [args.out.parent, args.out, args.cache]) as run:
        cfg = run.params.section("data")
        meta = fetch_cifar10(cfg.source, args.out, cache_dir=args.cache, md5=cfg.md5)
    print(f"fetched {meta['n_train']} train / {meta['n_test']} test images "
          f"({meta['format']}, official: {meta['official']}) into {args.out}")


if __name__ == "__main__":
    main()
