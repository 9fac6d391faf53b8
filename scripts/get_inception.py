"""Download pytorch-fid's official FID Inception weights and verify their SHA-256 prefix."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm_cifar.evaluation.inception import OFFICIAL_INCEPTION_FILENAME, download_official_inception
from ddpm_cifar.runtime.errors import UserError

DEFAULT_PATH = Path("data/inception") / OFFICIAL_INCEPTION_FILENAME


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", default=str(DEFAULT_PATH),
                        help=f"where to put the weights (default: {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        path = download_official_inception(args.path)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"official FID Inception weights at {path}")


if __name__ == "__main__":
    main()
