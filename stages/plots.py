"""Stage plots: the training curves as PNGs (the study's figures), and our FID beside the quoted
baselines (and the measured pretrained DDPM, when scored), as a PNG and as CSV data for `dvc plots`.
A FID that is not comparable with published numbers goes to a panel and a chart of its own."""

import argparse
from pathlib import Path

import pandas as pd

from ddpm_cifar.evaluation.plots import save_fid_comparison, save_training_curves
from ddpm_cifar.evaluation.reports import fid_tables, load_baselines, load_report
from ddpm_cifar.runtime.fileio import atomic_path
from ddpm_cifar.runtime.stage import stage

PARAMS: tuple[str, ...] = ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--fid", type=Path, default=Path("reports/fid.json"))
    ap.add_argument("--pretrained", type=Path, default=Path("reports/pretrained_fid.json"))
    ap.add_argument("--baselines", type=Path, default=Path("baselines.yaml"))
    ap.add_argument("--live", type=Path, default=Path("dvclive"), help="the train stage's DVCLive folder")
    ap.add_argument("--out", type=Path, default=Path("plots"))
    args = ap.parse_args()
    with stage("plots", args.params, PARAMS, [args.out]):
        ours = load_report(args.fid, "evaluate")
        baselines = load_baselines(args.baselines)
        pretrained = load_report(args.pretrained, "pretrained")
        measured = [pretrained] if pretrained.get("enabled") else []
        save_fid_comparison(ours, baselines, args.out / "fid_comparison.png", measured=measured)
        tables = fid_tables(ours, baselines, measured)
        for name, rows in zip(("fid_published.csv", "fid_measured.csv"), tables, strict=True):
            with atomic_path(args.out / name) as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False)
        save_training_curves(args.live, args.out / "loss_curve.png", args.out / "fid_curve.png")
    print(f"FID comparison, training curves -> {args.out}/")


if __name__ == "__main__":
    main()
