"""Stage fetch: CIFAR-10 from the configured source -> data/cifar10/{train,test}.npz + meta.json."""

import argparse
from pathlib import Path

from ddpm_cifar.data.fetch import fetch_cifar10
from ddpm_cifar.runtime.config import load_params
from ddpm_cifar.runtime.outputs import claim_outputs
from ddpm_cifar.runtime.stage import run

PARAMS = ("data",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--cache", type=Path, default=Path("data/download"))
    args = ap.parse_args()
    cfg = load_params(args.params, PARAMS).section("data")
    with claim_outputs("fetch", [args.out.parent, args.out, args.cache]):
        meta = fetch_cifar10(cfg.source, args.out, cache_dir=args.cache, md5=cfg.md5)
    print(f"fetched {meta['n_train']} train / {meta['n_test']} test images "
          f"({meta['format']}, official: {meta['official']}) into {args.out}")


if __name__ == "__main__":
    run(main)
