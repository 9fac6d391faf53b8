"""Stage inception: make sure the FID Inception weights named in params are present and valid.

A missing file is downloaded when it is the official one, and made here when it is named
inception-random-seedN.pth (random weights, for offline smoke runs: their FIDs are flagged as not
comparable). Offline, a missing official file stops the stage with one line that names the file and
where to put it. A file already there (official or not) is kept: DVC records its hash, so replacing
it reruns everything that scored with it.
"""

import argparse
from pathlib import Path

from ddpm_cifar.evaluation.inception import (
    OFFICIAL_INCEPTION_FILENAME,
    OFFICIAL_INCEPTION_URL,
    download_official_inception,
    load_inception,
    random_inception_seed,
    save_random_inception,
)
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.stage import stage

PARAMS = ("fid.inception_weights",)


def ensure(path: Path) -> None:
    """Make, download or check the file at ``path``."""
    seed = random_inception_seed(path)
    if not path.is_file() and seed is not None:
        save_random_inception(path, seed=seed)  # the same bytes for the same seed, on any machine
    elif not path.is_file():
        if path.name != OFFICIAL_INCEPTION_FILENAME:
            load_inception(path)  # raises the message that says how to make or get this file
        try:
            download_official_inception(path)
        except UserError as exc:
            raise UserError(
                f"Inception weights {path} are missing and could not be downloaded "
                f"({exc.__cause__ or exc}). Copy {OFFICIAL_INCEPTION_FILENAME} from {OFFICIAL_INCEPTION_URL} "
                f"to {path}; for a non-comparable smoke run, set "
                "fid.inception_weights: data/inception/inception-random-seed0.pth (made by this stage)"
            ) from exc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    with stage("inception", args.params, PARAMS) as run:
        path = Path(run.params.key("fid.inception_weights"))
        with run.claim([path.parent]):
            ensure(path)
        _, info = load_inception(path, exact=True)  # only checked: no features, no need to fold
    kind = "official" if info.official else "NOT the official weights: FIDs will be flagged"
    print(f"Inception weights {path}: sha256 {info.sha256[:12]}… ({kind})")


if __name__ == "__main__":
    main()
