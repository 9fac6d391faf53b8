"""Stage frontier: FID and KID of the EMA weights (sample.weights) under each sampler setting of
frontier.curves, on the first frontier.n of the sample stage's seeds, timed -> plots/frontier.csv (a row
per setting, for `dvc plots`) and plots/frontier.png. Off unless frontier.enabled; then both files say so.

The sample stage's images stand in for the setting that made them. A killed run resumes from
samples/frontier_partial. Under torchrun (params distributed) the ranks share sampling and Inception."""

import argparse
import shutil
from pathlib import Path

from ddpm_cifar.diffusion.generate import for_sampling, load_samples
from ddpm_cifar.evaluation import frontier
from ddpm_cifar.evaluation.fid import load_reference
from ddpm_cifar.evaluation.inception import load_inception
from ddpm_cifar.evaluation.reports import check_same_inception, comparability
from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.fileio import file_digest
from ddpm_cifar.runtime.stage import stage

PARAMS = ("frontier", "sample.seed", "sample.weights", "fid.inception_weights", "fid.batch_size",
          "fid.exact_inception", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", type=Path, default=Path("models/ema.pt"), help="the final EMA weights")
    ap.add_argument("--best", type=Path, default=Path("models/ema_best.pt"), help="the best EMA weights")
    ap.add_argument("--samples", type=Path, default=Path("samples/samples.npz"))
    ap.add_argument("--ref", type=Path, default=Path("data/fid_ref.npz"))
    ap.add_argument("--partial", type=Path, default=Path("samples/frontier_partial"))
    ap.add_argument("--csv", type=Path, default=Path("plots/frontier.csv"))
    ap.add_argument("--png", type=Path, default=Path("plots/frontier.png"))
    args = ap.parse_args()
    with stage("frontier", args.params, PARAMS, [args.csv.parent, args.png.parent, args.partial]) as run:
        params, device, cfg = run.params, run.device, run.params.section("frontier")
        if not cfg.enabled:
            if run.main:
                frontier.write_disabled(args.csv, args.png)
                shutil.rmtree(args.partial, ignore_errors=True)
                print(f"frontier.enabled is false: nothing measured (turn it on: {frontier.ENABLE})")
            return
        weights = args.best if params.key("sample.weights") == "best" else args.checkpoint
        # The files first, Inception (seconds to load) last: a damaged file stops the stage at once.
        samples, reference = load_samples(args.samples), load_reference(args.ref)
        model = checkpoint.load_model(weights, device)
        frontier.check_steps(cfg, model.diffusion.num_timesteps)
        inception, info = load_inception(params.key("fid.inception_weights"), device,
                                         exact=params.key("fid.exact_inception"))
        check_same_inception(reference.meta, info)
        sampling = frontier.Sampling(for_sampling(model.net, device), model.diffusion, model.shape,
                                     file_digest(weights), params.key("sample.seed"), device)
        scoring = frontier.Scoring(inception, info, reference, file_digest(args.ref),
                                   params.key("fid.batch_size"))
        rows = frontier.measure(cfg, sampling, scoring, samples=samples, partial=args.partial)
        if run.main:
            frontier.write_csv(args.csv, rows)
            frontier.save_plot(rows, args.png, n=cfg.n, reasons=comparability(reference.meta, info, cfg.n))
            shutil.rmtree(args.partial, ignore_errors=True)  # every row is in the CSV now
            print(f"{len(rows)} sampler settings, {cfg.n} images each -> {args.csv}, {args.png}")


if __name__ == "__main__":
    main()
