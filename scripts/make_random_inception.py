"""Write a random-weight FID Inception file for offline smoke tests.

FIDs computed with it are NOT comparable to published numbers or to FIDs computed with other
weights; use scripts/get_inception.py for the official file.
"""

from __future__ import annotations

import argparse
import sys

from ddpm_cifar.evaluation.inception import load_inception, save_random_inception
from ddpm_cifar.runtime.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="where to write the .pth state dict")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    try:
        save_random_inception(args.path, seed=args.seed)
        _, info = load_inception(args.path, exact=True)  # proves the file loads before anyone relies on it
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote random-weight Inception (seed {args.seed}) to {info.path}, sha256 {info.sha256}")
    print("WARNING: FIDs computed with these weights are NOT comparable to any other FID; "
          "for real numbers run `python scripts/get_inception.py`.")


if __name__ == "__main__":
    main()
