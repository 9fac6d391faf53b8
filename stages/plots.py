"""Stage plots: our FID beside the quoted baselines (and the measured pretrained DDPM, when scored)
-> plots/fid_comparison.png."""

import argparse
import json
from pathlib import Path

import yaml

from ddpm_cifar.cli import run
from ddpm_cifar.plots import save_fid_comparison

PARAMS: tuple[str, ...] = ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fid", type=Path, default=Path("metrics/fid.json"))
    ap.add_argument("--pretrained", type=Path, default=Path("metrics/pretrained_fid.json"))
    ap.add_argument("--baselines", type=Path, default=Path("baselines.yaml"))
    ap.add_argument("--out", type=Path, default=Path("plots/fid_comparison.png"))
    args = ap.parse_args()
    ours = json.loads(args.fid.read_text())
    baselines = yaml.safe_load(args.baselines.read_text())["baselines"]
    measured = [{"name": name, **report} for name, report in json.loads(args.pretrained.read_text()).items()
                if report.get("enabled")]
    save_fid_comparison(ours, baselines, args.out, measured=measured)
    print(f"FID comparison -> {args.out}")


if __name__ == "__main__":
    run(main)
